//! Batch-class work (docs/pool.md §3.7): batch sequences run only on capacity online requests
//! leave idle. This module owns when a batch sequence enters a context, decodes, has its model
//! loaded, and when it is preempted for online work, plus the assertions that batch work never
//! goes before online work. The online policies (`sched.rs`) never see a batch sequence: batch
//! ones live in `Pool::batch_q` and `ModelState::batch_decoding`, online ones never do.

use std::collections::BTreeSet;

use crate::RequestClass;
use crate::event::{Action, SeqId};
use crate::pool::{Kv, ModelState, Phase, Pool, Work};
use crate::status::Residency;

impl Pool {
    /// Online sequences the pool tracks (pending, queued, running or saved).
    pub(crate) fn online_len(&self) -> usize {
        self.seqs
            .len()
            .saturating_sub(usize::try_from(self.batch_len).unwrap_or(usize::MAX))
    }

    /// Whether `model` has online work: queued, held by admission or decoding (saved included).
    fn online_work(&self, model: usize) -> bool {
        let m = &self.models[model];
        !m.prefill_q.is_empty() || m.pending > 0 || !m.decoding.is_empty()
    }

    /// The next preemption while online requests are in the pool: a batch sequence in a context
    /// gives its slot back (its cells are dropped; the engine keeps its tokens and recomputes
    /// them on resume) when its model has online work, when a model with online work is not
    /// resident (a switch may need this model gone), or with paged KV (its cells hold memory).
    /// Checked before any online transfer, so online work finds the slots and memory it would
    /// find with no batch in the pool.
    pub(crate) fn batch_preemption(&self) -> Option<(usize, Work)> {
        if self.batch_len == 0 || self.online_len() == 0 {
            return None;
        }
        let switch_ahead = (0..self.models.len())
            .any(|i| self.online_work(i) && self.models[i].residency != Residency::Resident);
        (0..self.models.len()).find_map(|i| {
            let m = &self.models[i];
            let wanted = self.cfg.kv_paged || switch_ahead || self.online_work(i);
            if !wanted || m.busy > 0 || m.residency != Residency::Resident {
                return None;
            }
            // The most recent first: the least work to recompute.
            m.batch_decoding
                .iter()
                .rev()
                .find(|s| {
                    self.seqs
                        .get(s)
                        .is_some_and(|st| st.kv == Kv::InCtx && !st.in_action)
                })
                .map(|&seq| (i, Work::Save(seq)))
        })
    }

    /// Whether the batch decode turn in flight should stop at its next step boundary: an online
    /// request is in the pool (asked by the driver between steps, like
    /// [`Pool::decode_yield_wanted`], which includes this case).
    pub(crate) fn batch_yield_wanted(&self) -> bool {
        self.online_len() > 0
            && self
                .in_flight
                .values()
                .any(|f| f.batch && matches!(f.work, Work::Decode(..)))
    }

    /// Batch work, only while no online request is in the pool: fill a free slot of a resident
    /// model from the batch queue (prefill fresh sequences, resume a preempted one), else a
    /// decode turn (models in rotation), else a load for the queue's first sequence whose model
    /// is cold, into free memory or in place of the least recently used idle model. Returns
    /// whether an action was emitted.
    pub(crate) fn try_batch(&mut self, actions: &mut Vec<Action>) -> bool {
        if self.batch_len == 0 || self.online_len() != 0 {
            return false;
        }
        let (compute, transfer) = (self.compute_free(), self.transfer_free());
        if let Some((model, seq)) = self.batch_slot_head() {
            let fresh = self.seqs.get(&seq).is_some_and(|s| s.kv == Kv::None);
            if fresh && compute {
                let group = self.batch_prefill_group(model, seq);
                self.batch_q.retain(|s| !group.contains(s));
                self.emit_as(model, Work::Prefill(group, Vec::new()), true, actions);
                return true;
            }
            if !fresh && transfer {
                self.batch_q.retain(|s| *s != seq);
                self.emit_as(model, Work::Restore(seq), true, actions);
                return true;
            }
        }
        if compute && let Some((model, seqs)) = self.batch_turn() {
            self.batch_turn_model = model;
            let steps = self.cfg.knobs.decode_steps_min;
            self.emit_as(model, Work::Decode(seqs, steps), true, actions);
            return true;
        }
        if transfer && let Some((model, work)) = self.batch_load() {
            self.emit_as(model, work, true, actions);
            return true;
        }
        false
    }

    /// Whether a batch sequence of the batch queue is for `model`.
    pub(crate) fn batch_waits_for(&self, model: usize) -> bool {
        self.batch_len > 0
            && self
                .batch_q
                .iter()
                .any(|s| self.seqs.get(s).is_some_and(|st| st.model == model))
    }

    /// Whether `model` can take a batch sequence into its context now.
    fn batch_slot_free(&self, model: usize) -> bool {
        let m = &self.models[model];
        m.residency == Residency::Resident
            && m.busy == 0
            && m.in_ctx < self.cfg.models[model].seqs_max
    }

    /// The first sequence of the batch queue whose model can take it into a slot now.
    fn batch_slot_head(&self) -> Option<(usize, SeqId)> {
        if !(0..self.models.len()).any(|i| self.batch_slot_free(i)) {
            return None;
        }
        let free = self.memory_bytes_free();
        self.batch_q.iter().find_map(|&seq| {
            let state = self.seqs.get(&seq)?;
            (self.batch_slot_free(state.model) && state.ctx_kv_bytes <= free)
                .then_some((state.model, seq))
        })
    }

    /// Fresh batch sequences of `model` in queue order from `head` (which fits: it always
    /// goes), within the free slots, the group and token limits and, with paged KV, the free
    /// memory.
    fn batch_prefill_group(&self, model: usize, head: SeqId) -> Vec<SeqId> {
        let slots = self.cfg.models[model].seqs_max - self.models[model].in_ctx;
        let limit = usize::try_from(slots.min(self.cfg.knobs.prefill_group_len_max)).unwrap_or(0);
        let kv_free = self.memory_bytes_free();
        let (mut tokens, mut kv_bytes) = (0_u64, 0_u64);
        let mut group = Vec::with_capacity(limit);
        let from = self.batch_q.iter().position(|s| *s == head).unwrap_or(0);
        for &seq in self.batch_q.iter().skip(from) {
            if group.len() >= limit {
                break;
            }
            let Some(state) = self.seqs.get(&seq) else {
                continue;
            };
            if state.model != model || state.kv != Kv::None {
                continue;
            }
            let prompt = state.prefill_tokens();
            if !group.is_empty() && tokens + prompt > u64::from(self.cfg.knobs.prefill_tokens_max) {
                break;
            }
            if kv_bytes + state.ctx_kv_bytes > kv_free {
                break;
            }
            tokens += prompt;
            kv_bytes += state.ctx_kv_bytes;
            group.push(seq);
        }
        group
    }

    /// The next batch decode turn: the first model after the last one served (rotation) that is
    /// resident, idle in the engine and has batch sequences ready in its context.
    fn batch_turn(&self) -> Option<(usize, Vec<SeqId>)> {
        let n = self.models.len();
        (1..=n).find_map(|offset| {
            let model = (self.batch_turn_model + offset) % n;
            let m = &self.models[model];
            if m.residency != Residency::Resident || m.busy > 0 {
                return None;
            }
            let seqs: Vec<SeqId> = m
                .batch_decoding
                .iter()
                .copied()
                .filter(|s| {
                    self.seqs
                        .get(s)
                        .is_some_and(|st| st.kv == Kv::InCtx && !st.in_action)
                })
                .collect();
            (!seqs.is_empty()).then_some((model, seqs))
        })
    }

    /// A load for the batch queue's first sequence whose model is cold, while nothing else
    /// loads or evicts: into free memory, else in place of the least recently used idle model
    /// (nothing queued, decoding, saved or in flight, no batch sequence in its context).
    fn batch_load(&self) -> Option<(usize, Work)> {
        let moving = self
            .models
            .iter()
            .any(|m| matches!(m.residency, Residency::Loading | Residency::Evicting));
        if moving {
            return None;
        }
        let model = self.batch_q.iter().find_map(|seq| {
            let state = self.seqs.get(seq)?;
            (self.models[state.model].residency == Residency::Cold).then_some(state.model)
        })?;
        self.load_or_evict_lru(model, ModelState::is_idle)
    }

    /// Every action's sequences are of one class, the class the action is booked as; batch
    /// work other than a preemption starts only while no online request is in the pool.
    pub(crate) fn check_classes(&self, work: &Work, batch: bool) {
        let class = if batch {
            RequestClass::Batch
        } else {
            RequestClass::Online
        };
        let seqs: &[SeqId] = match work {
            Work::Save(seq) | Work::Restore(seq) => std::slice::from_ref(seq),
            Work::Prefill(seqs, riders) => {
                assert!(
                    !batch || riders.is_empty(),
                    "a batch prefill carries no riders"
                );
                seqs
            }
            Work::Decode(seqs, _) => seqs,
            Work::Load | Work::Evict => &[],
        };
        assert!(
            seqs.iter()
                .all(|s| self.seqs.get(s).is_some_and(|st| st.class == class)),
            "an action mixes online and batch sequences"
        );
        let preemption = matches!(work, Work::Save(_));
        assert!(
            !batch || preemption || self.online_len() == 0,
            "batch work started while an online request is in the pool"
        );
    }

    /// The batch bookkeeping recounted: the count and its bound, and every batch sequence in
    /// exactly one place (the batch queue, its model's `batch_decoding`, or an in-flight
    /// prefill or resume), never in an online queue; online ones never in a batch place.
    pub(crate) fn check_batch_invariants(&self) {
        let queue: BTreeSet<SeqId> = self.batch_q.iter().copied().collect();
        assert_eq!(
            queue.len(),
            self.batch_q.len(),
            "batch queue holds a duplicate"
        );
        let mut count = 0_u32;
        for (seq, state) in &self.seqs {
            let m = &self.models[state.model];
            let in_queue = queue.contains(seq);
            let decoding = m.batch_decoding.contains(seq);
            if state.class == RequestClass::Online {
                assert!(
                    !in_queue && !decoding,
                    "an online sequence in a batch place"
                );
                continue;
            }
            count += 1;
            assert!(
                !m.decoding.contains(*seq) && !m.prefill_q.contains(seq),
                "a batch sequence in an online queue"
            );
            let in_action = !state.cancelled
                && ((state.phase == Phase::Prefilling && state.kv == Kv::InCtx)
                    || matches!(state.kv, Kv::Restoring { .. }));
            let places = [in_queue, decoding, in_action];
            let cancelled_in_action = state.cancelled && state.in_action;
            assert!(
                places.iter().filter(|p| **p).count() == 1 || cancelled_in_action,
                "a batch sequence is not in exactly one place"
            );
            if in_queue {
                assert!(
                    matches!(state.kv, Kv::None | Kv::Saved { bytes: 0 }) && !state.in_action,
                    "a queued batch sequence holds cells"
                );
            }
        }
        assert_eq!(count, self.batch_len, "batch count drifted");
        assert!(
            self.batch_len <= self.cfg.knobs.batch_queue_max,
            "batch sequences over batch_queue_max"
        );
    }
}
