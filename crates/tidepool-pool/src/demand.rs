//! How much a model has been asked for lately: a count of its arrivals that halves every
//! [`DEMAND_HALF_LIFE_NS`], kept in integer fixed point so the pool stays deterministic. Belady
//! eviction ranks models that nothing waits for by it, least demanded first: their next use is
//! unknown, and a model requested less often is, in expectation, requested later
//! (docs/pool.md §3.4).

/// Half-life of a model's arrival count, in ns (60 s): long enough to span several requests of
/// a rarely used model, short enough to follow a shift in popularity within minutes.
pub(crate) const DEMAND_HALF_LIFE_NS: u64 = 60_000_000_000;

/// One arrival in the fixed-point count.
const ONE: u64 = 1 << 20;

/// A model's decayed arrival count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Demand {
    /// The count at `at_ns`, `ONE` per arrival.
    weight: u64,
    at_ns: u64,
}

impl Demand {
    /// Counts an arrival at `now_ns`.
    pub(crate) fn arrive(&mut self, now_ns: u64) {
        self.weight = self.at(now_ns).saturating_add(ONE);
        self.at_ns = self.at_ns.max(now_ns);
    }

    /// The count decayed to `now_ns`: halved per whole half-life elapsed, and linearly towards
    /// the next halving within one (a chord of the exponential, never below it by more than
    /// 6 %).
    pub(crate) fn at(&self, now_ns: u64) -> u64 {
        let elapsed = now_ns.saturating_sub(self.at_ns);
        let halvings = elapsed / DEMAND_HALF_LIFE_NS;
        if halvings >= 64 {
            return 0;
        }
        let whole = self.weight >> halvings;
        let rest = u128::from(elapsed % DEMAND_HALF_LIFE_NS);
        let shed = u128::from(whole / 2) * rest / u128::from(DEMAND_HALF_LIFE_NS);
        whole - u64::try_from(shed).unwrap_or(whole / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_halves_every_half_life_and_orders_recent_demand_first() {
        let mut d = Demand::default();
        d.arrive(0);
        assert_eq!(d.at(0), ONE);
        assert_eq!(d.at(DEMAND_HALF_LIFE_NS), ONE / 2);
        assert_eq!(d.at(DEMAND_HALF_LIFE_NS / 2), ONE * 3 / 4);
        assert_eq!(d.at(3 * DEMAND_HALF_LIFE_NS), ONE / 8);
        assert_eq!(d.at(64 * DEMAND_HALF_LIFE_NS), 0);
        // Three arrivals a half-life ago outweigh one now; one now outweighs one long ago.
        let mut busy = Demand::default();
        for _ in 0..3 {
            busy.arrive(0);
        }
        let mut recent = Demand::default();
        recent.arrive(DEMAND_HALF_LIFE_NS);
        let mut old = Demand::default();
        old.arrive(0);
        let now = DEMAND_HALF_LIFE_NS;
        assert!(busy.at(now) > recent.at(now), "{busy:?} {recent:?}");
        assert!(recent.at(now) > old.at(now));
        // Time never runs backwards for the count: an earlier clock value decays nothing.
        assert_eq!(recent.at(0), ONE);
    }
}
