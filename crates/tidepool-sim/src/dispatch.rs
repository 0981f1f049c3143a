//! The dispatch rule: which instance of a model serves each of its requests. A request goes to
//! the instance with the fewest tokens in flight when it arrives — the prompt and output
//! tokens of the requests already sent there whose last token's deadline (arrival + TTFT +
//! (output − 1) · TBT) is still ahead — ties to the instance on the lowest accelerator index.
//!
//! The rule reads only the request stream (arrival, lengths) and the SLOs, never an
//! accelerator's state, so a router in front of several servers can run it as it is
//! ([`Dispatcher`]), and the simulator can fix every request's instance before it simulates:
//! the accelerators stay independent, and a placement move re-simulates only those whose
//! requests changed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::workload::Request;

/// Instances of one model a dispatcher spreads over (an accelerator holds one of each).
pub const INSTANCES_MAX: usize = 4096;

/// The dispatch rule for one model of `k` instances, numbered in their accelerators' order.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    ttft_ns: u64,
    tbt_ns: u64,
    /// Tokens in flight per instance.
    tokens: Vec<u64>,
    /// Requests in flight: (last-token deadline, instance, tokens), earliest first.
    in_flight: BinaryHeap<Reverse<(u64, usize, u64)>>,
}

impl Dispatcher {
    /// `k` is clamped to `1..=INSTANCES_MAX`.
    pub fn new(k: usize, ttft_slo_ms: u64, tbt_slo_ms: u64) -> Self {
        Self {
            ttft_ns: ttft_slo_ms.saturating_mul(1_000_000),
            tbt_ns: tbt_slo_ms.saturating_mul(1_000_000),
            tokens: vec![0; k.clamp(1, INSTANCES_MAX)],
            in_flight: BinaryHeap::new(),
        }
    }

    /// The instance for a request arriving at `at_ns` (non-decreasing from call to call).
    pub fn dispatch(&mut self, at_ns: u64, prompt_tokens: u32, output_tokens: u32) -> usize {
        if self.tokens.len() == 1 {
            return 0;
        }
        while let Some(&Reverse((deadline_ns, instance, tokens))) = self.in_flight.peek() {
            if deadline_ns > at_ns {
                break;
            }
            self.in_flight.pop();
            self.tokens[instance] -= tokens;
        }
        let instance = (0..self.tokens.len())
            .min_by_key(|&i| (self.tokens[i], i))
            .unwrap_or(0);
        let tokens = u64::from(prompt_tokens) + u64::from(output_tokens);
        let deadline_ns = at_ns
            .saturating_add(self.ttft_ns)
            .saturating_add(u64::from(output_tokens.saturating_sub(1)).saturating_mul(self.tbt_ns));
        self.tokens[instance] += tokens;
        self.in_flight
            .push(Reverse((deadline_ns, instance, tokens)));
        instance
    }
}

/// One model's requests (`indices` into `requests`, in arrival order) split over `k`
/// instances by [`Dispatcher`]: the request indices of each instance, in arrival order.
pub(crate) fn split(
    requests: &[Request],
    indices: &[u32],
    k: usize,
    ttft_slo_ms: u64,
    tbt_slo_ms: u64,
) -> Vec<Vec<u32>> {
    let mut dispatcher = Dispatcher::new(k, ttft_slo_ms, tbt_slo_ms);
    let mut out = vec![Vec::new(); dispatcher.tokens.len()];
    for &index in indices {
        let Some(r) = requests.get(usize::try_from(index).unwrap_or(usize::MAX)) else {
            continue;
        };
        out[dispatcher.dispatch(r.at_ns, r.prompt_tokens, r.output_tokens)].push(index);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties go to the lowest instance; a request counts until its last token's deadline; the
    /// instance with the fewest tokens in flight gets the next request.
    #[test]
    fn fewest_tokens_in_flight_wins_and_ties_go_low() {
        // TTFT 1 s, TBT 0.1 s: a 10-token output's last deadline is arrival + 1.9 s.
        let mut d = Dispatcher::new(3, 1000, 100);
        let s = 1_000_000_000;
        assert_eq!(d.dispatch(0, 90, 10), 0); // all idle: lowest
        assert_eq!(d.dispatch(0, 10, 10), 1); // 0 holds 100
        assert_eq!(d.dispatch(0, 500, 10), 2);
        assert_eq!(d.dispatch(s, 1, 1), 1); // 100 / 20 / 510: instance 1
        // At 2 s the first three have passed their deadlines; the fourth (1.0 s) too.
        assert_eq!(d.dispatch(2 * s, 1, 1), 0);
        assert_eq!(d.dispatch(2 * s, 1, 1), 1);
        let one = split(
            &[Request {
                at_ns: 0,
                model: 0,
                prompt_tokens: 1,
                output_tokens: 1,
                class: tidepool_pool::RequestClass::Online,
            }],
            &[0],
            1,
            1000,
            100,
        );
        assert_eq!(one, vec![vec![0]]);
    }
}
