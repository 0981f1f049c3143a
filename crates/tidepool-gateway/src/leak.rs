//! The leaked-key detector (`[leak_detection]`): a pure, deterministic struct (the caller passes
//! the time) that tracks, per key and per interval of `interval_ms`, the key's request count
//! and its spend, against that key's own history: an exponentially weighted mean and variance
//! (EWMA, weight `ewma_alpha` for the newest interval) of each.
//!
//! The rule: a key with at least `min_history_intervals` intervals of history, and at least
//! `min_requests_per_interval` requests in the current interval, is suspended as soon as the
//! current interval's count (or spend) is more than `z_threshold` standard deviations above its
//! mean. The count is checked on every request (the spend on every settlement), so a burst is
//! caught within the interval it starts in, not after it. The standard deviation has a floor —
//! a quarter of the mean ([`SIGMA_FLOOR_SHARE`]), for counts also the square root of the mean
//! (a Poisson process's own spread), and at least 1 — so a perfectly regular key is not
//! suspended for a few extra requests or for organic growth. Intervals without a request
//! count as zeros (up to [`IDLE_INTERVALS_FOLDED_MAX`] of them).
//!
//! Each replica sees only its share of a key's traffic behind a load balancer; with N replicas
//! sharing it evenly, each sees a burst as the same multiple of its own history, so the
//! detection holds per replica (with `min_requests_per_interval` counted per replica).

use std::collections::HashMap;

use tidepool_core::{KeyId, LeakDetectionConfig};

/// Idle intervals folded into a key's history at most when it comes back (beyond it the
/// history has decayed to near zero anyway for any `ewma_alpha` worth using).
pub const IDLE_INTERVALS_FOLDED_MAX: u64 = 256;
/// The floor of a standard deviation, as a share of its mean: with the default `z_threshold`
/// of 6 a key must at least reach 2.5× its usual rate (or spend) to be suspended, however
/// regular its history, so organic growth is not taken for a leak.
pub const SIGMA_FLOOR_SHARE: f64 = 0.25;

/// What the detector says about a request or a spend.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok,
    /// Suspend the key; `reason` says what jumped, by how much.
    Suspend {
        reason: String,
    },
}

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    mean: f64,
    variance: f64,
}

impl Ewma {
    fn update(&mut self, alpha: f64, value: f64, first: bool) {
        if first {
            self.mean = value;
            self.variance = 0.0;
            return;
        }
        let diff = value - self.mean;
        let increment = alpha * diff;
        self.mean += increment;
        self.variance = (1.0 - alpha) * (self.variance + diff * increment);
    }
}

/// One key's history and current interval.
#[derive(Debug, Clone, Default)]
struct Track {
    /// The current interval's index (`now_ms / interval_ms`).
    interval: i64,
    requests: u64,
    spend_nanos: i64,
    /// Completed intervals folded into the EWMAs.
    history: u32,
    rate: Ewma,
    spend: Ewma,
}

/// Per-key EWMA anomaly detector; see the module docs for the rule.
#[derive(Debug)]
pub struct LeakDetector {
    config: LeakDetectionConfig,
    keys: HashMap<KeyId, Track>,
}

impl LeakDetector {
    pub fn new(config: LeakDetectionConfig) -> Self {
        assert!(config.interval_ms > 0, "validated by the config");
        Self {
            config,
            keys: HashMap::new(),
        }
    }

    /// Keys tracked now.
    pub fn keys_tracked(&self) -> usize {
        self.keys.len()
    }

    fn interval_of(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(i64::try_from(self.config.interval_ms).unwrap_or(i64::MAX))
    }

    /// The key's track, rolled forward to `now_ms`'s interval; `None` when the key is new and
    /// `keys_tracked_max` keys are already tracked.
    fn track(&mut self, key_id: &KeyId, now_ms: i64) -> Option<&mut Track> {
        let interval = self.interval_of(now_ms);
        let alpha = self.config.ewma_alpha;
        let full =
            self.keys.len() >= usize::try_from(self.config.keys_tracked_max).unwrap_or(usize::MAX);
        if full && !self.keys.contains_key(key_id) {
            return None;
        }
        let track = self.keys.entry(key_id.clone()).or_insert_with(|| Track {
            interval,
            ..Track::default()
        });
        if interval > track.interval {
            // Close the current interval, then fold the idle ones in between as zeros.
            let (requests, spend) = (as_f64(track.requests), spend_f64(track.spend_nanos));
            fold(track, alpha, requests, spend);
            let idle = u64::try_from(interval - track.interval - 1)
                .unwrap_or(0)
                .min(IDLE_INTERVALS_FOLDED_MAX);
            for _ in 0..idle {
                fold(track, alpha, 0.0, 0.0);
            }
            track.interval = interval;
            track.requests = 0;
            track.spend_nanos = 0;
        }
        Some(track)
    }

    /// One request of `key_id` at `now_ms`.
    pub fn on_request(&mut self, key_id: &KeyId, now_ms: i64) -> Verdict {
        let config = self.config.clone();
        let Some(track) = self.track(key_id, now_ms) else {
            return Verdict::Ok;
        };
        track.requests = track.requests.saturating_add(1);
        if !armed(&config, track) {
            return Verdict::Ok;
        }
        let mean = track.rate.mean;
        let floor = mean.max((mean * SIGMA_FLOOR_SHARE).powi(2)).max(1.0);
        let sigma = track.rate.variance.max(floor).sqrt();
        let z = (as_f64(track.requests) - track.rate.mean) / sigma;
        if z > config.z_threshold {
            return Verdict::Suspend {
                reason: format!(
                    "{} requests in the current {} s interval against a usual {:.1} \
                     (z-score {:.1} > {})",
                    track.requests,
                    config.interval_ms / 1000,
                    track.rate.mean,
                    z,
                    config.z_threshold
                ),
            };
        }
        Verdict::Ok
    }

    /// `cost_nanos` spent by a request of `key_id`, known at `now_ms` (its settlement).
    pub fn on_spend(&mut self, key_id: &KeyId, now_ms: i64, cost_nanos: i64) -> Verdict {
        let config = self.config.clone();
        let Some(track) = self.track(key_id, now_ms) else {
            return Verdict::Ok;
        };
        track.spend_nanos = track.spend_nanos.saturating_add(cost_nanos.max(0));
        if !armed(&config, track) {
            return Verdict::Ok;
        }
        let mean = track.spend.mean;
        let floor = (mean * SIGMA_FLOOR_SHARE).powi(2).max(1.0);
        let sigma = track.spend.variance.max(floor).sqrt();
        let z = (spend_f64(track.spend_nanos) - mean) / sigma;
        if z > config.z_threshold {
            return Verdict::Suspend {
                reason: format!(
                    "spend of {} nano-units in the current {} s interval against a usual {:.0} \
                     (z-score {:.1} > {})",
                    track.spend_nanos,
                    config.interval_ms / 1000,
                    mean,
                    z,
                    config.z_threshold
                ),
            };
        }
        Verdict::Ok
    }

    /// Forgets a key's current interval after it was suspended (its history stays, so a
    /// reinstated key is judged against what it did before the burst).
    pub fn reset_interval(&mut self, key_id: &KeyId) {
        if let Some(track) = self.keys.get_mut(key_id) {
            track.requests = 0;
            track.spend_nanos = 0;
        }
    }
}

/// Whether a key can be suspended now: enough history and enough requests this interval.
fn armed(config: &LeakDetectionConfig, track: &Track) -> bool {
    track.history >= config.min_history_intervals
        && track.requests >= u64::from(config.min_requests_per_interval)
}

fn fold(track: &mut Track, alpha: f64, requests: f64, spend: f64) {
    let first = track.history == 0;
    track.rate.update(alpha, requests, first);
    track.spend.update(alpha, spend, first);
    track.history = track.history.saturating_add(1);
}

#[expect(
    clippy::cast_precision_loss,
    reason = "request counts far below 2^52; a statistic, not money"
)]
fn as_f64(count: u64) -> f64 {
    count as f64
}

#[expect(
    clippy::cast_precision_loss,
    reason = "spend as a statistic only; never billed from"
)]
fn spend_f64(nanos: i64) -> f64 {
    nanos as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL_MS: i64 = 60_000;

    fn config() -> LeakDetectionConfig {
        LeakDetectionConfig {
            enabled: true,
            interval_ms: 60_000,
            ewma_alpha: 0.1,
            z_threshold: 6.0,
            min_history_intervals: 10,
            min_requests_per_interval: 20,
            keys_tracked_max: 100,
        }
    }

    /// Sends `per_interval[i]` requests spread evenly over interval `i` (from `start`); returns
    /// the first interval and request index at which the key was suspended.
    fn drive(
        detector: &mut LeakDetector,
        key: &KeyId,
        start: i64,
        per_interval: &[u64],
    ) -> Option<(usize, u64)> {
        for (index, &count) in per_interval.iter().enumerate() {
            let base = start + i64::try_from(index).unwrap() * INTERVAL_MS;
            for request in 0..count {
                let offset =
                    i64::try_from(request).unwrap() * INTERVAL_MS / i64::try_from(count).unwrap();
                if let Verdict::Suspend { .. } = detector.on_request(key, base + offset) {
                    return Some((index, request));
                }
            }
        }
        None
    }

    /// A deterministic ±30 % wobble around `mean` (seeded LCG: the same numbers every run).
    fn noisy(mean: u64, len: usize, seed: u64) -> Vec<u64> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let wobble = (state >> 33) % 61; // 0..=60
                mean * (70 + wobble) / 100
            })
            .collect()
    }

    #[test]
    fn a_steady_key_with_a_20x_burst_is_suspended_within_the_interval() {
        let mut detector = LeakDetector::new(config());
        let key = KeyId("leaked000000".into());
        let mut load = noisy(30, 12, 7);
        load.push(600); // 20× the usual 30
        let hit = drive(&mut detector, &key, 0, &load);
        let (interval, request) = hit.expect("the burst is caught");
        assert_eq!(interval, 12, "in the burst's own interval");
        assert!(
            request < 600,
            "before the interval ended: at request {request}"
        );
    }

    #[test]
    fn a_steady_key_under_the_same_total_load_is_not_suspended() {
        let mut detector = LeakDetector::new(config());
        let key = KeyId("steady000000".into());
        // The bursty key's total (12 × ~30 + 600 ≈ 960) spread evenly over the same 13
        // intervals: ~74 a minute, with the same wobble.
        let load = noisy(74, 13, 7);
        assert_eq!(drive(&mut detector, &key, 0, &load), None);
        // And it stays unsuspended for a long steady run.
        let more = noisy(74, 500, 11);
        assert_eq!(drive(&mut detector, &key, 13 * INTERVAL_MS, &more), None);
    }

    #[test]
    fn noise_below_min_requests_never_trips() {
        let mut detector = LeakDetector::new(config());
        let key = KeyId("quiet0000000".into());
        // One request a minute, then a 19× jump to 19: below min_requests_per_interval (20).
        let mut load = vec![1; 30];
        load.push(19);
        assert_eq!(drive(&mut detector, &key, 0, &load), None);
        // Mostly idle intervals with sporadic small bursts.
        let sporadic: Vec<u64> = (0..200).map(|i| if i % 7 == 0 { 15 } else { 0 }).collect();
        assert_eq!(
            drive(&mut detector, &key, 31 * INTERVAL_MS, &sporadic),
            None
        );
    }

    #[test]
    fn a_new_key_needs_history_before_it_can_trip() {
        let mut detector = LeakDetector::new(config());
        let key = KeyId("fresh0000000".into());
        // Heavy from its first minute: no history, no suspension.
        let load = vec![30, 30, 30, 600];
        assert_eq!(drive(&mut detector, &key, 0, &load), None);
    }

    #[test]
    fn a_spend_jump_suspends_too() {
        let mut detector = LeakDetector::new(config());
        let key = KeyId("spender00000".into());
        let mut now = 0;
        for _ in 0..12 {
            for _ in 0..30 {
                assert_eq!(detector.on_request(&key, now), Verdict::Ok);
                assert_eq!(detector.on_spend(&key, now, 1_000), Verdict::Ok);
                now += 1_000;
            }
            now += INTERVAL_MS - 30_000;
        }
        // Same request count, each request 50× as expensive.
        let mut suspended = false;
        for _ in 0..30 {
            detector.on_request(&key, now);
            if let Verdict::Suspend { reason } = detector.on_spend(&key, now, 50_000) {
                assert!(reason.contains("spend"), "{reason}");
                suspended = true;
                break;
            }
            now += 1_000;
        }
        assert!(suspended, "the spend jump is caught");
    }

    #[test]
    fn keys_beyond_the_tracking_limit_are_not_tracked() {
        let mut detector = LeakDetector::new(LeakDetectionConfig {
            keys_tracked_max: 2,
            ..config()
        });
        for name in ["a", "b", "c"] {
            detector.on_request(&KeyId(name.into()), 0);
        }
        assert_eq!(detector.keys_tracked(), 2);
    }
}
