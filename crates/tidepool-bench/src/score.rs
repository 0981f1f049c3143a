//! Scoring against the token SLOs: token k of a request is on time if it arrives by
//! `TTFT_slo + k · TBT_slo` after the send; a request expects the tokens it delivered if it ended
//! normally, else at least what it asked for. A rate's row sums its requests; a policy's
//! sustainable rate is the highest rate whose attainment reaches the bar.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::actions::{ActionTimes, CountersView};
use crate::client::{End, RequestOutcome};
use crate::common::{as_f64, ms, percentile};
use crate::report::RateRow;
use crate::workload::{Market, Slo};

/// On-time and expected tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Score {
    tokens_expected: u64,
    tokens_on_time: u64,
}

impl Score {
    fn add(&mut self, other: Self) {
        self.tokens_expected += other.tokens_expected;
        self.tokens_on_time += other.tokens_on_time;
    }

    /// On-time share of the expected tokens (vacuously 1 when none were expected).
    fn attainment(self) -> f64 {
        if self.tokens_expected == 0 {
            1.0
        } else {
            as_f64(self.tokens_on_time) / as_f64(self.tokens_expected)
        }
    }
}

/// Scores one request: a normally finished stream expects what it delivered; any other end
/// expects at least `output_tokens`.
fn score(outcome: &RequestOutcome, slo: Slo) -> Score {
    let delivered = u64::try_from(outcome.tokens.len()).unwrap_or(u64::MAX);
    let tokens_expected = match outcome.end {
        End::Completed => delivered,
        End::Failed | End::TimedOut => delivered.max(u64::from(outcome.output_tokens)),
    };
    let tokens_on_time = (0_u64..)
        .zip(&outcome.tokens)
        .filter(|&(k, &at)| at <= slo.deadline(k))
        .count();
    Score {
        tokens_expected,
        tokens_on_time: u64::try_from(tokens_on_time).unwrap_or(u64::MAX),
    }
}

/// One rate of the sweep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateRun {
    pub(crate) rate_per_s: f64,
    /// Request number of the schedule's first request (prompt uniqueness).
    pub(crate) first_request: u32,
    pub(crate) duration_s: u32,
    pub(crate) slo: Slo,
}

impl RateRun {
    /// Scores a rate's outcomes into its row (the pool's counters before and after give the
    /// switches and engine times; the replay fields are left empty).
    pub(crate) fn row(
        self,
        policy: &str,
        outcomes: &[RequestOutcome],
        wall: Duration,
        before: &CountersView,
        after: &CountersView,
    ) -> RateRow {
        let mut total = Score::default();
        let mut ttft_ms = Vec::new();
        let mut statuses = BTreeMap::new();
        let mut stream_errors = BTreeMap::new();
        let (mut failed, mut timed_out) = (0_u32, 0_u32);
        let mut send_lag = Duration::ZERO;
        for outcome in outcomes {
            total.add(score(outcome, self.slo));
            ttft_ms.extend(outcome.tokens.first().copied().map(ms));
            send_lag = send_lag.max(outcome.send_lag);
            match outcome.end {
                End::Completed => {}
                End::Failed => failed += 1,
                End::TimedOut => timed_out += 1,
            }
            if let Some(status) = outcome.status.filter(|s| !(200..300).contains(s)) {
                *statuses.entry(status).or_insert(0_u32) += 1;
            }
            if let Some(code) = &outcome.error_code {
                *stream_errors.entry(code.clone()).or_insert(0_u32) += 1;
            }
        }
        let wall_s = wall.as_secs_f64();
        let loads = after.loads.saturating_sub(before.loads);
        RateRow {
            policy: policy.to_owned(),
            market: Market::default(),
            pass: 0,
            rate_per_s: self.rate_per_s,
            requests: u32::try_from(outcomes.len()).unwrap_or(u32::MAX),
            requests_failed: failed,
            requests_timed_out: timed_out,
            statuses,
            stream_errors,
            tokens_expected: total.tokens_expected,
            tokens_on_time: total.tokens_on_time,
            attainment: total.attainment(),
            goodput_tokens_per_s: as_f64(total.tokens_on_time) / f64::from(self.duration_s),
            ttft_ms_p50: percentile(&mut ttft_ms, 50),
            ttft_ms_p99: percentile(&mut ttft_ms, 99),
            wall_s,
            switches_per_s: if wall_s > 0.0 {
                as_f64(loads) / wall_s
            } else {
                0.0
            },
            loads,
            evictions: after.evictions.saturating_sub(before.evictions),
            kv_saves: after.kv_saves.saturating_sub(before.kv_saves),
            send_lag_ms_max: ms(send_lag),
            actions: ActionTimes::between(before, after),
            sim: None,
            resident_at_start: Vec::new(),
            replay: Vec::new(),
            estimates: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::outcome;

    /// A rate's row counts failed requests, tallies non-2xx statuses and, for streams that
    /// answered 200 and then ended with an error event, the event's code.
    #[test]
    fn a_row_names_why_streams_failed() {
        let run = RateRun {
            rate_per_s: 1.0,
            first_request: 0,
            duration_s: 10,
            slo: Slo {
                ttft_ms: 1000,
                tbt_ms: 100,
            },
        };
        let stalled = || RequestOutcome {
            error_code: Some("stream_stalled".to_owned()),
            ..outcome(End::Failed, 8, &[900])
        };
        let refused = RequestOutcome {
            status: Some(429),
            ..outcome(End::Failed, 8, &[])
        };
        let outcomes = [
            stalled(),
            stalled(),
            refused,
            outcome(End::Completed, 2, &[900, 950]),
        ];
        let counters = CountersView::default();
        let row = run.row(
            "token",
            &outcomes,
            Duration::from_secs(10),
            &counters,
            &counters,
        );
        assert_eq!(row.requests_failed, 3);
        assert_eq!(row.statuses, BTreeMap::from([(429, 1)]));
        assert_eq!(
            row.stream_errors,
            BTreeMap::from([("stream_stalled".to_owned(), 2)])
        );
    }

    #[test]
    fn tokens_are_scored_against_their_own_deadlines() {
        let slo = Slo {
            ttft_ms: 1000,
            tbt_ms: 100,
        };
        // Deadlines 1000, 1100, 1200, 1300: the third token is late.
        let done = outcome(End::Completed, 8, &[900, 1050, 1250, 1290]);
        assert_eq!(
            score(&done, slo),
            Score {
                tokens_expected: 4,
                tokens_on_time: 3
            }
        );
        // A rejected request misses all it asked for.
        let rejected = RequestOutcome {
            status: Some(429),
            ..outcome(End::Failed, 10, &[])
        };
        assert_eq!(
            score(&rejected, slo),
            Score {
                tokens_expected: 10,
                tokens_on_time: 0
            }
        );
        // A cut request expects its full length; its early tokens still count.
        let cut = outcome(End::TimedOut, 5, &[500, 1100]);
        let cut_score = score(&cut, slo);
        assert_eq!(
            cut_score,
            Score {
                tokens_expected: 5,
                tokens_on_time: 2
            }
        );
        let mut total = Score::default();
        for s in [score(&done, slo), score(&rejected, slo), cut_score] {
            total.add(s);
        }
        assert!((total.attainment() - 5.0 / 19.0).abs() < 1e-12);
        assert!((Score::default().attainment() - 1.0).abs() < f64::EPSILON);
    }
}
