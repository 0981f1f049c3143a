//! The pooled engine's prompt-prefix bookkeeping: which idle slots of one model still hold a
//! finished sequence's KV, for which tokens, and which was used least recently; and which slot
//! a new prompt can copy its prefix from. The KV itself stays in the model's llama.cpp context
//! (cells allocated when the model loads); this only decides which slot a new prompt takes,
//! which idle slots are cleared to stay within `prefix_cache_tokens_max`, and which holder's KV
//! a prompt copies ([`best_donor`]). As in llama.cpp's server (`--cache-reuse` off,
//! `slot_prompt_similarity`) and the per-model engine, a prompt reuses the longest common prefix
//! of one idle slot in place; unlike it, a prompt can also copy the prefix from any other slot
//! of the model (a running sequence, or another prompt of the same prefill), so concurrent
//! requests sharing a system prompt compute it once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;

/// One idle slot's kept tokens (KV at positions `0..len`).
#[derive(Debug)]
struct Entry {
    tokens: Vec<LlamaToken>,
    /// When it was parked (a counter): the least recent is cleared first.
    parked_at: u64,
}

/// The idle slots of one model that keep KV, and the tokens they keep in total.
#[derive(Debug, Default)]
pub(crate) struct PrefixCache {
    entries: BTreeMap<i32, Entry>,
    tokens: usize,
    clock: u64,
}

impl PrefixCache {
    /// Records that idle `slot` keeps the KV of `tokens`, then drops least recently parked
    /// entries (this one last) until at most `tokens_max` tokens are kept. Returns the slots
    /// whose KV the caller must clear.
    pub(crate) fn park(
        &mut self,
        slot: i32,
        tokens: Vec<LlamaToken>,
        tokens_max: usize,
    ) -> Vec<i32> {
        self.forget(slot);
        self.clock += 1;
        self.tokens += tokens.len();
        self.entries.insert(
            slot,
            Entry {
                tokens,
                parked_at: self.clock,
            },
        );
        let mut cleared = Vec::new();
        while self.tokens > tokens_max {
            let Some(oldest) = self.least_recent() else {
                break;
            };
            self.forget(oldest);
            cleared.push(oldest);
        }
        assert!(
            self.tokens <= tokens_max,
            "the prefix cache stays within its bound"
        );
        cleared
    }

    /// The slot leaves the cache (taken, cleared or saved over).
    pub(crate) fn forget(&mut self, slot: i32) {
        if let Some(entry) = self.entries.remove(&slot) {
            self.tokens -= entry.tokens.len();
        }
    }

    pub(crate) fn holds(&self, slot: i32) -> bool {
        self.entries.contains_key(&slot)
    }

    /// The idle slot parked longest ago.
    pub(crate) fn least_recent(&self) -> Option<i32> {
        self.entries
            .iter()
            .min_by_key(|(_, e)| e.parked_at)
            .map(|(slot, _)| *slot)
    }

    /// The slot sharing the longest prefix with `prompt` (at least `min` tokens; ties: the most
    /// recently parked), and that prefix's length. At least one prompt token is left to decode,
    /// so the new sequence gets fresh logits.
    pub(crate) fn best_match(&self, prompt: &[LlamaToken], min: usize) -> Option<(i32, usize)> {
        self.entries
            .iter()
            .map(|(slot, entry)| (*slot, reusable(&entry.tokens, prompt), entry.parked_at))
            .filter(|(_, common, _)| *common >= min.max(1))
            .max_by_key(|(_, common, parked_at)| (*common, *parked_at))
            .map(|(slot, common, _)| (slot, common))
    }

    /// Tokens kept over all idle slots.
    #[cfg(test)]
    pub(crate) fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Tokens `a` and `b` share from their start.
pub(crate) fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How much of `prompt` the KV of `tokens` can give it: their common prefix, stopping one token
/// short of the prompt so the sequence gets fresh logits.
fn reusable(tokens: &[LlamaToken], prompt: &[LlamaToken]) -> usize {
    common_prefix(tokens, prompt).min(prompt.len().saturating_sub(1))
}

/// Whether a slot holding `tokens` positions still holds all of them in every layer: always
/// without a sliding `window`; past one, llama.cpp has dropped the first positions from the
/// window's layers, so the KV can be neither cut to a prefix nor saved whole.
pub(crate) fn fits_window(window: Option<usize>, tokens: usize) -> bool {
    window.is_none_or(|w| tokens <= w)
}

/// Among `holders` (a slot and the tokens whose KV it holds at positions `0..len`), the one
/// sharing the longest prefix with `prompt`, when that prefix is at least `min_gain` tokens
/// longer than the `have` tokens the prompt's own slot holds already; ties go to the lowest
/// slot. The prefix stops one token short of the prompt, so the sequence gets fresh logits.
pub(crate) fn best_donor<'a>(
    prompt: &[LlamaToken],
    have: usize,
    holders: impl IntoIterator<Item = (i32, &'a [LlamaToken])>,
    min_gain: usize,
) -> Option<(i32, usize)> {
    holders
        .into_iter()
        .map(|(slot, tokens)| (slot, reusable(tokens, prompt)))
        .filter(|(_, common)| *common >= have.saturating_add(min_gain.max(1)))
        .max_by_key(|(slot, common)| (*common, std::cmp::Reverse(*slot)))
}

impl PrefixCache {
    /// The idle slots and the tokens each keeps.
    pub(crate) fn held(&self) -> impl Iterator<Item = (i32, &[LlamaToken])> {
        self.entries
            .iter()
            .map(|(slot, entry)| (*slot, entry.tokens.as_slice()))
    }
}

/// A model's recent prompts, to predict before a prompt is scheduled how much of it the engine
/// will find in its KV: a slot holding the prefix, or a prompt of the same prefill computing it
/// (which the engine then copies, [`best_donor`]). The pool sizes prefills and estimates their
/// time from it (`cached_tokens` of the pool's `RequestArrived`); it is only a hint, and what
/// a response reports and the ledger bills is the engine's own count. Bounded: the last
/// `prompts_max` prompts, whose tokens the model's slots could still hold.
#[derive(Debug)]
pub struct PrefixHints {
    prompts: VecDeque<Arc<[LlamaToken]>>,
    prompts_max: usize,
    reuse_tokens_min: usize,
    window: Option<usize>,
}

impl PrefixHints {
    /// `prompts_max` 0: no hints (prefix reuse off).
    pub(crate) fn new(prompts_max: usize, reuse_tokens_min: usize, window: Option<usize>) -> Self {
        Self {
            prompts: VecDeque::with_capacity(prompts_max),
            prompts_max,
            reuse_tokens_min: reuse_tokens_min.max(1),
            window,
        }
    }

    /// The longest prefix of `prompt` a recent prompt shares (at least the reuse minimum and,
    /// with a sliding window, from a prompt that fits it; at most all but the last token), then
    /// records `prompt` as the most recent.
    pub(crate) fn expect(&mut self, prompt: &[LlamaToken]) -> usize {
        if self.prompts_max == 0 {
            return 0;
        }
        let hit = self
            .prompts
            .iter()
            .filter(|p| fits_window(self.window, p.len()))
            .map(|p| reusable(p, prompt))
            .max()
            .filter(|common| *common >= self.reuse_tokens_min)
            .unwrap_or(0);
        if self.prompts.len() == self.prompts_max {
            self.prompts.pop_front();
        }
        self.prompts.push_back(Arc::from(prompt));
        assert!(
            self.prompts.len() <= self.prompts_max,
            "prefix hints keep at most prompts_max prompts"
        );
        hit
    }

    /// Forgets every prompt: the model's KV is gone (evicted, or the engine restarted).
    pub fn clear(&mut self) {
        self.prompts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken).collect()
    }

    #[test]
    fn longest_common_prefix_wins_and_one_token_is_left() {
        let mut cache = PrefixCache::default();
        assert!(cache.park(0, toks(&[1, 2, 3, 4]), 100).is_empty());
        assert!(cache.park(1, toks(&[1, 2, 9]), 100).is_empty());
        assert_eq!(cache.best_match(&toks(&[1, 2, 3, 7]), 1), Some((0, 3)));
        // The whole prompt is cached: the last token is decoded again.
        assert_eq!(cache.best_match(&toks(&[1, 2, 3, 4]), 1), Some((0, 3)));
        assert_eq!(cache.best_match(&toks(&[5, 6]), 1), None);
        // Below the minimum: no reuse.
        assert_eq!(cache.best_match(&toks(&[1, 2, 3, 7]), 4), None);
    }

    #[test]
    fn bound_clears_least_recently_parked_first() {
        let mut cache = PrefixCache::default();
        assert!(cache.park(0, toks(&[1; 4]), 10).is_empty());
        assert!(cache.park(1, toks(&[2; 4]), 10).is_empty());
        assert_eq!(cache.park(2, toks(&[3; 4]), 10), vec![0]);
        assert_eq!(cache.tokens(), 8);
        assert_eq!(cache.least_recent(), Some(1));
        // An entry larger than the bound is not kept at all.
        let cleared = cache.park(3, toks(&[4; 11]), 10);
        assert_eq!(cleared, vec![1, 2, 3]);
        assert_eq!(cache.tokens(), 0);
        // Zero turns the cache off.
        assert_eq!(cache.park(0, toks(&[1]), 0), vec![0]);
    }

    #[test]
    fn the_donor_shares_the_longest_prefix_beyond_what_the_prompt_has() {
        let a = toks(&[1, 2, 3, 4, 5]);
        let b = toks(&[1, 2, 3, 9]);
        let c = toks(&[1, 2, 3, 4, 5, 6, 7]);
        let holders = || [(4, a.as_slice()), (2, b.as_slice()), (7, c.as_slice())];
        let prompt = toks(&[1, 2, 3, 4, 5, 6]);
        // c shares all six, capped at five: one token is left to compute; a ties at five and
        // has the lower slot.
        assert_eq!(best_donor(&prompt, 0, holders(), 1), Some((4, 5)));
        // Not worth it unless it gains `min_gain` tokens over what the prompt holds.
        assert_eq!(best_donor(&prompt, 3, holders(), 2), Some((4, 5)));
        assert_eq!(best_donor(&prompt, 4, holders(), 2), None);
        assert_eq!(best_donor(&toks(&[8, 1]), 0, holders(), 1), None);
        assert_eq!(best_donor(&prompt, 0, [], 1), None);
        assert_eq!(common_prefix(&a, &b), 3);
    }

    #[test]
    fn hints_predict_a_prefix_a_recent_prompt_shares() {
        let mut hints = PrefixHints::new(2, 2, None);
        assert_eq!(hints.expect(&toks(&[1, 2, 3, 4])), 0, "nothing seen yet");
        assert_eq!(hints.expect(&toks(&[1, 2, 3, 9, 9])), 3);
        // The whole prompt seen before: its last token is computed again.
        assert_eq!(hints.expect(&toks(&[1, 2, 3, 9, 9])), 4);
        assert_eq!(
            hints.expect(&toks(&[1, 5])),
            0,
            "one token is below the minimum"
        );
        // Only the last two prompts are kept: [1, 2, 3, 4] and the first [1, 2, 3, 9, 9] are
        // gone, the second is still there.
        assert_eq!(hints.expect(&toks(&[1, 2, 3, 9, 9, 7])), 5);
        hints.clear();
        assert_eq!(hints.expect(&toks(&[1, 2, 3, 9, 9, 7])), 0, "cleared");
    }

    #[test]
    fn hints_skip_prompts_past_the_sliding_window_and_can_be_off() {
        let mut hints = PrefixHints::new(4, 1, Some(3));
        hints.expect(&toks(&[1, 2, 3, 4]));
        assert_eq!(
            hints.expect(&toks(&[1, 2, 3, 5])),
            0,
            "longer than the window"
        );
        hints.expect(&toks(&[6, 7]));
        assert_eq!(hints.expect(&toks(&[6, 7, 8])), 2);
        let mut off = PrefixHints::new(0, 1, None);
        off.expect(&toks(&[1, 2, 3]));
        assert_eq!(
            off.expect(&toks(&[1, 2, 3])),
            0,
            "no hints when reuse is off"
        );
    }

    #[test]
    fn forget_releases_the_tokens() {
        let mut cache = PrefixCache::default();
        cache.park(5, toks(&[1, 2, 3]), 10);
        assert!(cache.holds(5));
        cache.forget(5);
        assert!(!cache.holds(5));
        assert_eq!(cache.tokens(), 0);
        assert_eq!(cache.best_match(&toks(&[1, 2, 3]), 1), None);
    }
}
