//! Which rates `tidepool bench pool` measures for one (market, policy): a fixed list
//! (`--rates`), or by default a bisection for the sustainable rate — the highest total arrival
//! rate whose token-deadline attainment reaches [`ATTAINMENT_SUSTAINABLE_MIN`] — on a geometric
//! scale until the bracket's ends are within [`BRACKET_RATIO_MAX`] of each other, so its
//! geometric middle is within ±10 % of both. Pure bookkeeping: the caller measures.

use serde::{Deserialize, Serialize};

/// Token-SLO attainment a rate must reach to count as sustainable, as a fraction.
pub(crate) const ATTAINMENT_SUSTAINABLE_MIN: f64 = 0.90;
/// Bisection stops once `hi / lo` is at most this (the middle is then within ±10 % of both).
pub(crate) const BRACKET_RATIO_MAX: f64 = 1.2;
/// Significant digits of a probed rate: both policies probe exactly the same rates (so the same
/// requests) while their brackets agree.
const RATE_DIGITS: i32 = 3;

/// The rates still to measure and what was measured.
#[derive(Debug, Clone)]
pub(crate) struct RateSearch {
    mode: Mode,
    /// `(rate, attainment)` in measurement order.
    probes: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
enum Mode {
    /// Fixed rates, measured in order.
    Rates(Vec<f64>),
    /// `lo` is sustainable (measured, or the assumed lower end), `hi` is not.
    Bisect { lo: f64, hi: f64 },
}

/// What a search found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct SearchResult {
    /// The highest rate known sustainable (the bracket's lower end).
    pub(crate) lo: f64,
    /// The lowest rate known not sustainable (the bracket's upper end).
    pub(crate) hi: f64,
    /// Whether `lo` was measured (false: every probe failed, the rate is below the bracket).
    pub(crate) lo_measured: bool,
    /// Whether `hi` was measured (false: every probe passed, the rate is above the bracket).
    pub(crate) hi_measured: bool,
    /// The estimate: a bisection's geometric middle when both ends were measured, else (and
    /// for a fixed list) the highest rate that passed; 0 when nothing passed.
    pub(crate) sustainable_rate_per_s: f64,
}

impl RateSearch {
    pub(crate) fn rates(rates: &[f64]) -> Self {
        Self {
            mode: Mode::Rates(rates.to_vec()),
            probes: Vec::new(),
        }
    }

    /// A bisection between `lo` (assumed sustainable) and `hi` (assumed not).
    pub(crate) fn bisect(lo: f64, hi: f64) -> Self {
        assert!(lo > 0.0 && hi > lo, "bisection bracket must be 0 < lo < hi");
        Self {
            mode: Mode::Bisect { lo, hi },
            probes: Vec::new(),
        }
    }

    /// The next rate to measure, or `None` when the search is done.
    pub(crate) fn next_rate(&self) -> Option<f64> {
        match &self.mode {
            Mode::Rates(rates) => rates.get(self.probes.len()).copied(),
            Mode::Bisect { lo, hi } => {
                (hi / lo > BRACKET_RATIO_MAX).then(|| round_rate((lo * hi).sqrt()))
            }
        }
    }

    pub(crate) fn record(&mut self, rate: f64, attainment: f64) {
        self.probes.push((rate, attainment));
        if let Mode::Bisect { lo, hi } = &mut self.mode {
            if attainment >= ATTAINMENT_SUSTAINABLE_MIN {
                *lo = rate;
            } else {
                *hi = rate;
            }
        }
    }

    pub(crate) fn result(&self) -> SearchResult {
        let passed = |&&(_, a): &&(f64, f64)| a >= ATTAINMENT_SUSTAINABLE_MIN;
        let measured = |rate: f64| self.probes.iter().any(|&(r, _)| (r - rate).abs() < 1e-12);
        let (lo, hi) = match &self.mode {
            Mode::Bisect { lo, hi } => (*lo, *hi),
            Mode::Rates(_) => {
                let lo = self
                    .probes
                    .iter()
                    .filter(passed)
                    .map(|&(r, _)| r)
                    .fold(0.0, f64::max);
                let hi = self
                    .probes
                    .iter()
                    .filter(|p| !passed(p) && p.0 > lo)
                    .map(|&(r, _)| r)
                    .fold(f64::INFINITY, f64::min);
                (lo, hi)
            }
        };
        let (lo_measured, hi_measured) = (measured(lo), measured(hi));
        let bisected = matches!(self.mode, Mode::Bisect { .. });
        let sustainable_rate_per_s = match (lo_measured, hi_measured) {
            (true, true) if bisected => round_rate((lo * hi).sqrt()),
            (true, _) => lo,
            (false, _) => 0.0,
        };
        SearchResult {
            lo,
            hi,
            lo_measured,
            hi_measured,
            sustainable_rate_per_s,
        }
    }
}

/// `rate` to [`RATE_DIGITS`] significant digits.
fn round_rate(rate: f64) -> f64 {
    if !(rate.is_finite() && rate > 0.0) {
        return rate;
    }
    let magnitude = rate.log10().floor();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the decimal exponent of a request rate is a small integer"
    )]
    let scale = 10_f64.powi(RATE_DIGITS - 1 - magnitude as i32);
    (rate * scale).round() / scale
}

#[cfg(test)]
#[expect(
    clippy::float_cmp,
    reason = "the search returns probed rates themselves, exactly"
)]
mod tests {
    use super::*;

    /// A policy whose true sustainable rate is `truth`: the search must bracket it to ±10 %.
    fn search_for(truth: f64, lo: f64, hi: f64) -> (SearchResult, usize) {
        let mut search = RateSearch::bisect(lo, hi);
        while let Some(rate) = search.next_rate() {
            let attainment = if rate <= truth { 0.95 } else { 0.5 };
            search.record(rate, attainment);
        }
        (search.result(), search.probes.len())
    }

    #[test]
    fn bisection_brackets_the_sustainable_rate_within_ten_percent() {
        for truth in [0.07, 0.13, 0.31, 0.5, 0.6] {
            let (result, probes) = search_for(truth, 0.05, 0.8);
            assert!(
                result.lo <= truth && truth < result.hi,
                "{truth}: {result:?}"
            );
            assert!(result.hi / result.lo <= BRACKET_RATIO_MAX + 1e-9);
            let estimate = result.sustainable_rate_per_s;
            assert!(
                (estimate / truth - 1.0).abs() <= 0.11,
                "{truth}: {estimate}"
            );
            // ln(16) / ln(1.2) halvings: four probes.
            assert_eq!(probes, 4, "{truth}");
        }
    }

    #[test]
    fn a_rate_outside_the_bracket_is_flagged() {
        let (below, _) = search_for(0.01, 0.05, 0.8);
        assert!(!below.lo_measured);
        assert_eq!(below.sustainable_rate_per_s, 0.0);
        let (above, _) = search_for(5.0, 0.05, 0.8);
        assert!(above.lo_measured && !above.hi_measured);
        assert_eq!(above.sustainable_rate_per_s, above.lo);
        // Near the top, the bracket's upper end was never measured: the measured end is the
        // estimate, flagged.
        let (top, _) = search_for(0.77, 0.05, 0.8);
        assert!(top.lo_measured && !top.hi_measured && top.lo <= 0.77);
        assert_eq!(top.sustainable_rate_per_s, top.lo);
    }

    #[test]
    fn equal_brackets_probe_equal_rates() {
        let a = RateSearch::bisect(0.5, 8.0);
        let b = RateSearch::bisect(0.5, 8.0);
        assert_eq!(a.next_rate(), Some(2.0));
        assert_eq!(a.next_rate(), b.next_rate());
    }

    #[test]
    fn a_fixed_list_is_measured_in_order() {
        let mut search = RateSearch::rates(&[1.0, 2.0, 3.0]);
        for (rate, attainment) in [(1.0, 0.99), (2.0, 0.92), (3.0, 0.4)] {
            assert_eq!(search.next_rate(), Some(rate));
            search.record(rate, attainment);
        }
        assert_eq!(search.next_rate(), None);
        let result = search.result();
        assert_eq!((result.lo, result.hi), (2.0, 3.0));
        assert_eq!(result.sustainable_rate_per_s, 2.0);
    }
}
