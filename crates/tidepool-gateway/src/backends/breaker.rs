//! The circuit breaker of one backend: opens on consecutive failures, on a high error rate or on
//! a failed health probe; after its open period lets one trial through. Sans-IO: the caller
//! passes the time.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use utoipa::ToSchema;

/// Outcomes remembered per backend for the error-rate rule of the breaker.
const OUTCOMES_WINDOW_LEN: usize = 20;
/// Outcomes needed in the window before the error rate can open the breaker.
const OUTCOMES_RATE_MIN: usize = 10;

/// Breaker state, as shown on `/v1/backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests skip this backend until the open period ends or a health probe succeeds.
    Open,
    /// One trial request decides.
    HalfOpen,
}

/// A circuit breaker: opens on `failures_max` consecutive failures, on an error rate of half or
/// more over the last [`OUTCOMES_WINDOW_LEN`] outcomes, or on a failed health probe; after
/// `open_for` lets one trial through (half-open); a success or a good probe closes it. Sans-IO:
/// the caller passes the time.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: BreakerState,
    open_until: Option<Instant>,
    trial_in_flight: bool,
    consecutive_failures: u32,
    outcomes: VecDeque<bool>,
    failures_max: u32,
    open_for: Duration,
}

impl Breaker {
    pub(crate) fn new(failures_max: u32, open_for: Duration) -> Self {
        assert!(failures_max > 0, "validated by the config");
        Self {
            state: BreakerState::Closed,
            open_until: None,
            trial_in_flight: false,
            consecutive_failures: 0,
            outcomes: VecDeque::with_capacity(OUTCOMES_WINDOW_LEN),
            failures_max,
            open_for,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may go to this backend now (a half-open breaker admits one trial).
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if self.open_until.is_some_and(|until| now >= until) {
                    self.state = BreakerState::HalfOpen;
                    self.trial_in_flight = true;
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    fn remember(&mut self, ok: bool) {
        if self.outcomes.len() == OUTCOMES_WINDOW_LEN {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(ok);
        assert!(
            self.outcomes.len() <= OUTCOMES_WINDOW_LEN,
            "window is bounded"
        );
    }

    pub(crate) fn on_success(&mut self) {
        self.remember(true);
        self.consecutive_failures = 0;
        self.trial_in_flight = false;
        self.state = BreakerState::Closed;
        self.open_until = None;
    }

    /// An attempt that says nothing about the backend's health (it was busy, the request was
    /// refused, the client left): a half-open breaker may try again.
    pub(crate) fn on_neutral(&mut self) {
        self.trial_in_flight = false;
    }

    pub(crate) fn on_failure(&mut self, now: Instant) {
        self.remember(false);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.trial_in_flight = false;
        let failed = self.outcomes.iter().filter(|ok| !**ok).count();
        let rate_open =
            self.outcomes.len() >= OUTCOMES_RATE_MIN && failed * 2 >= self.outcomes.len();
        if self.state == BreakerState::HalfOpen
            || self.consecutive_failures >= self.failures_max
            || rate_open
        {
            self.open(now);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.open_until = Some(now + self.open_for);
        self.trial_in_flight = false;
    }

    /// A health probe's result: a failed probe opens the breaker at once; a good one closes an
    /// open breaker (the backend is back) and clears the error window.
    pub(crate) fn on_probe(&mut self, ok: bool, now: Instant) {
        if ok {
            if self.state != BreakerState::Closed {
                self.state = BreakerState::Closed;
                self.open_until = None;
                self.trial_in_flight = false;
                self.consecutive_failures = 0;
                self.outcomes.clear();
            }
        } else if self.state == BreakerState::Closed || self.state == BreakerState::HalfOpen {
            self.open(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_on_consecutive_failures_and_closes_on_success() {
        let now = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(2));
        for _ in 0..2 {
            assert!(breaker.allow(now));
            breaker.on_failure(now);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.on_failure(now);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow(now), "open: no requests");
        let later = now + Duration::from_secs(2);
        assert!(breaker.allow(later), "half-open: one trial");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(!breaker.allow(later), "only one trial at a time");
        breaker.on_failure(later);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed trial reopens"
        );
        let much_later = later + Duration::from_secs(2);
        assert!(breaker.allow(much_later));
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow(much_later));
    }

    #[test]
    fn breaker_opens_on_error_rate_and_follows_probes() {
        let now = Instant::now();
        let mut breaker = Breaker::new(100, Duration::from_mins(1));
        for _ in 0..5 {
            breaker.on_success();
            breaker.on_failure(now);
        }
        assert_eq!(breaker.state(), BreakerState::Open, "half of ten failed");
        breaker.on_probe(true, now);
        assert_eq!(breaker.state(), BreakerState::Closed, "a good probe closes");
        breaker.on_probe(false, now);
        assert_eq!(breaker.state(), BreakerState::Open, "a failed probe opens");
        assert!(!breaker.allow(now));
    }
}
