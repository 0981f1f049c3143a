//! [`SeqSet`]: a model's decoding sequences as a sorted vector. The scheduler walks the set in
//! `SeqId` order and cuts decode turns out of it by position (chunk `c` is the `c`-th run of
//! `seqs_max` ids), so positional access must be O(1); inserts and removals move at most a
//! few thousand ids, cheaper than a tree's pointer chasing at these sizes.

use crate::event::SeqId;

/// Distinct [`SeqId`]s in ascending order (the iteration order of the `BTreeSet` it replaces).
#[derive(Debug, Clone, Default)]
pub(crate) struct SeqSet(Vec<SeqId>);

impl SeqSet {
    pub(crate) fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds `seq`; false if it was there already.
    pub(crate) fn insert(&mut self, seq: SeqId) -> bool {
        match self.0.binary_search(&seq) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, seq);
                true
            }
        }
    }

    /// Removes `seq`; false if it was not there.
    pub(crate) fn remove(&mut self, seq: SeqId) -> bool {
        match self.0.binary_search(&seq) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn contains(&self, seq: SeqId) -> bool {
        self.0.binary_search(&seq).is_ok()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In ascending order.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, SeqId> {
        self.0.iter()
    }

    /// Ids `start..start + len` in ascending order (clamped to the set).
    pub(crate) fn window(&self, start: usize, len: usize) -> &[SeqId] {
        let start = start.min(self.0.len());
        let end = start.saturating_add(len).min(self.0.len());
        &self.0[start..end]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Any sequence of inserts and removals leaves the set a `BTreeSet` would hold, in the
    /// same order, with the same return values.
    #[test]
    fn behaves_as_a_btree_set() {
        let mut set = SeqSet::new();
        let mut model = BTreeSet::new();
        let mut x = 7_u64;
        for step in 0..5_000_u64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let seq = SeqId((x >> 33) % 300);
            if step % 3 == 0 {
                assert_eq!(set.remove(seq), model.remove(&seq), "remove {seq:?}");
            } else {
                assert_eq!(set.insert(seq), model.insert(seq), "insert {seq:?}");
            }
            assert_eq!(set.contains(seq), model.contains(&seq), "contains");
            assert_eq!(set.len(), model.len(), "len");
        }
        assert!(set.iter().copied().eq(model.iter().copied()), "same order");
        let chunk: Vec<SeqId> = model.iter().copied().skip(8).take(4).collect();
        assert_eq!(
            set.window(8, 4),
            chunk.as_slice(),
            "a window is skip + take"
        );
        assert!(
            set.window(10_000, 4).is_empty(),
            "a window past the end is empty"
        );
    }
}
