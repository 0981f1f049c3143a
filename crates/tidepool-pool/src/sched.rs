//! Decisions: which compute action runs next (grouped FCFS prefill vs the decode round), and
//! which transfer prepares it (load, Belady/LRU eviction, lazy KV save, restore). Pure functions
//! of the pool state; ties are broken by model index (= `ModelId` order) and `SeqId`, except that
//! eviction first prefers the model least demanded lately (`demand.rs`).

use crate::PoolPolicy;

use crate::event::{Action, SeqId};
use crate::pool::{Kv, ModelState, Phase, Pool, SeqState, Target, Turn, Work};
use crate::status::Residency;

/// Distance of a model that is not needed by anything known.
const NEVER: u64 = u64::MAX;

impl Pool {
    /// Emits every action that can start now: at most one per free lane. Online work first;
    /// a batch preemption before any online transfer; batch work only when no online request
    /// is in the pool (docs/pool.md §3.7).
    pub(crate) fn schedule(&mut self, actions: &mut Vec<Action>) {
        if self.cfg.policy == PoolPolicy::Token {
            self.promote_pending();
        }
        loop {
            let mut progressed = false;
            // A batch sequence in the way of online work leaves first (a slot clear, ≪ a step).
            if self.transfer_free()
                && let Some((model, work)) = self.batch_preemption()
            {
                self.emit_as(model, work, true, actions);
                progressed = true;
            }
            if self.compute_free() {
                progressed |= self.try_compute(actions);
            }
            if self.transfer_free()
                && let Some((model, work)) = self.next_transfer()
            {
                self.emit(model, work, actions);
                progressed = true;
            }
            if !progressed {
                progressed = self.try_batch(actions);
            }
            if !progressed {
                break;
            }
        }
    }

    /// Whether the decode turn in flight should stop at its next step boundary: a request of
    /// the turn's own model waits for its prefill, the model has a free slot, and no other model
    /// has sequences decoding, so a shorter turn delays nobody, and that request's prefill is the
    /// one the pool would run next. This is continuous batching
    /// within one model: a new request waits one step, not a whole turn. The server's driver
    /// asks between steps; the simulator asks when a request arrives during a turn. The
    /// completion event then reports the steps actually run, and the prefill credit the turn
    /// earned starts the waiting request next.
    ///
    /// A batch decode turn yields as soon as an online request is in the pool.
    pub fn decode_yield_wanted(&self) -> bool {
        if self.batch_yield_wanted() {
            return true;
        }
        let Some(model) = self.in_flight.values().find_map(|f| match f.work {
            Work::Decode(..) => Some(f.model),
            _ => None,
        }) else {
            return false;
        };
        let m = &self.models[model];
        !m.prefill_q.is_empty()
            && m.in_ctx < self.cfg.models[model].seqs_max
            && self
                .models
                .iter()
                .enumerate()
                .all(|(i, other)| i == model || other.decoding.is_empty())
            // The prefill that would run next is this model's (not an older request of another
            // model, nor one swap-lru holds back): otherwise cutting the turn gains nothing.
            && self.prefill_candidate() == Some(model)
    }

    pub(crate) fn compute_free(&self) -> bool {
        !self.compute_busy && (self.cfg.overlap_transfers || !self.transfer_busy)
    }

    pub(crate) fn transfer_free(&self) -> bool {
        !self.transfer_busy && (self.cfg.overlap_transfers || !self.compute_busy)
    }

    /// `token` admission: FCFS from the admission queue while the worst-case saved KV fits the
    /// pool and the predicted round factor α stays under its limit (or nothing is decoding).
    fn promote_pending(&mut self) {
        while let Some(&seq) = self.pending.front() {
            let Some(state) = self.seqs.get(&seq) else {
                break;
            };
            let model = state.model;
            let tokens = u64::from(state.prompt_tokens) + u64::from(state.max_tokens);
            let worst = self.cfg.models[model].saved_bytes(tokens);
            if self.kv_reserved_bytes + worst > self.cfg.kv_saved_bytes_max {
                break;
            }
            let busy = self
                .models
                .iter()
                .any(|m| !m.decoding.is_empty() || !m.prefill_q.is_empty());
            let active =
                !self.models[model].decoding.is_empty() || !self.models[model].prefill_q.is_empty();
            // `u32::MAX` disables the hold (not merely a high bar): skip the prediction.
            let hold_on = self.cfg.knobs.alpha_admit_permille_max != u32::MAX;
            if hold_on
                && busy
                && !active
                && self.alpha_permille_with(model)
                    > u64::from(self.cfg.knobs.alpha_admit_permille_max)
            {
                break;
            }
            self.pending.pop_front();
            self.kv_reserved_bytes += worst;
            self.models[model].pending -= 1;
            self.models[model].prefill_q.push_back(seq);
            if let Some(state) = self.seqs.get_mut(&seq) {
                state.phase = Phase::Queued;
                state.reserved_bytes = worst;
            }
        }
    }

    /// Predicted α (mean token gap over the TBT SLO, ×1000) if `extra` joined the round.
    fn alpha_permille_with(&self, extra: usize) -> u64 {
        let tbt_ns = self.tbt_ns();
        let mut sum_inv = 0.0_f64;
        let mut n_min = f64::INFINITY;
        let mut bytes = 0_u64;
        let mut load_ns = 0_u64;
        for (i, m) in self.models.iter().enumerate() {
            let seqs = m.decoding.len() + m.prefill_q.len();
            if seqs == 0 && i != extra {
                continue;
            }
            let seqs_max = usize::try_from(self.cfg.models[i].seqs_max).unwrap_or(1);
            let batches = seqs.div_ceil(seqs_max).max(1);
            let n = tbt_ns / as_f64(m.decode_step_ns);
            sum_inv += as_f64_usize(batches) / n;
            n_min = n_min.min(n);
            bytes = bytes
                .saturating_add(self.cfg.models[i].resident_bytes())
                .saturating_add(self.kv_demand(i, true));
            load_ns = load_ns.saturating_add(m.load_ns);
        }
        let switch_ns = if bytes <= self.cfg.memory_bytes_max {
            0
        } else {
            load_ns
        };
        let quota_ns = as_f64(self.cfg.knobs.turn_quota_ms_max) * 1e6;
        let alpha = as_f64(switch_ns) / (n_min * quota_ns) + sum_inv;
        f64_to_u64(alpha * 1000.0)
    }

    fn tbt_ns(&self) -> f64 {
        as_f64(self.cfg.knobs.tbt_slo_ms) * 1e6
    }

    /// Starts the current target if it is runnable. Returns whether an action was emitted.
    fn try_compute(&mut self, actions: &mut Vec<Action>) -> bool {
        let Some(target) = self.current_target() else {
            return false;
        };
        match target {
            Target::Prefill { model } => {
                let m = &self.models[model];
                if m.residency != Residency::Resident || m.busy > 0 {
                    return false;
                }
                let slots = self.cfg.models[model].seqs_max - m.in_ctx;
                let seqs = self.prefill_group(model, slots, self.memory_bytes_free());
                if seqs.is_empty() {
                    return false;
                }
                self.target = None;
                if !self.prefill_urgent(model) {
                    self.prefill_credit = false;
                }
                let riders = self.riders(model);
                self.emit(model, Work::Prefill(seqs, riders), actions);
                true
            }
            Target::Decode(turn) => {
                let seqs = self.turn_seqs(turn);
                let m = &self.models[turn.model];
                let ready = m.residency == Residency::Resident
                    && m.busy == 0
                    && seqs.iter().all(|s| {
                        self.seqs
                            .get(s)
                            .is_some_and(|s| s.kv == Kv::InCtx && !s.in_action)
                    });
                if !ready {
                    return false;
                }
                self.target = None;
                // A turn run in place of a switch may come from outside the round.
                if self.round.get(self.turn) == Some(&turn) {
                    self.turn += 1;
                }
                self.prefill_credit = true;
                self.emit(turn.model, Work::Decode(seqs, turn.steps), actions);
                true
            }
        }
    }

    /// The model's decoding sequences that can ride in its next prefill: cells in the context,
    /// in no other action, client still there (`prefill_riders` on).
    fn riders(&self, model: usize) -> Vec<SeqId> {
        if !self.cfg.knobs.prefill_riders {
            return Vec::new();
        }
        self.models[model]
            .decoding
            .iter()
            .copied()
            .filter(|seq| {
                self.seqs
                    .get(seq)
                    .is_some_and(|s| s.kv == Kv::InCtx && !s.in_action && !s.cancelled)
            })
            .collect()
    }

    /// The cached target if still valid, else a fresh choice between the oldest prefill group
    /// and the next decode turn. Prefill runs when it holds a credit (one group per decode
    /// turn), when its head is about to miss its TTFT, or when nothing decodes.
    pub(crate) fn current_target(&mut self) -> Option<Target> {
        let spaced = self.switch_spacing_active();
        if let Some(target) = self.target {
            let valid = match target {
                Target::Prefill { model } => {
                    !self.models[model].prefill_q.is_empty() && self.prefill_eligible(model)
                }
                Target::Decode(turn) => !self.turn_seqs(turn).is_empty(),
            };
            if valid && !self.switch_waits(target, spaced) {
                return Some(target);
            }
            self.target = None;
        }
        let decode = self.decode_candidate();
        let prefill = if self.cfg.policy == PoolPolicy::Token && self.cfg.knobs.prefill_cold_lazy {
            // Resident models' requests and at-risk cold ones first; other cold ones wait for
            // their deadline or for an idle compute lane.
            self.oldest_queued(|m| {
                (self.models[m].residency == Residency::Resident || self.prefill_urgent(m))
                    && self.prefill_eligible(m)
            })
            .or_else(|| decode.is_none().then(|| self.prefill_candidate()).flatten())
        } else {
            self.prefill_candidate()
        };
        let mut target = match (prefill, decode) {
            (Some(model), Some(turn)) => {
                if self.prefill_credit || self.prefill_urgent(model) {
                    Target::Prefill { model }
                } else {
                    Target::Decode(turn)
                }
            }
            (Some(model), None) => Target::Prefill { model },
            (None, Some(turn)) => Target::Decode(turn),
            (None, None) => return None,
        };
        if self.switch_waits(target, spaced)
            && let Some(resident) = self.resident_target()
        {
            target = resident;
        }
        self.target = Some(target);
        Some(target)
    }

    /// `token` spaces switches where a load stalls compute (`overlap_transfers` off: a CPU):
    /// once a model was loaded, a load that would displace a model with work
    /// ([`Self::load_preempts`]) waits until a turn quota (`turn_quota_ms_max`) has passed, as
    /// long as resident models have work to run meanwhile — a switch stalls every stream, so a
    /// model switched in keeps the engine long enough to pay for its load. A load into free
    /// memory or in place of idle models goes at once (what request-level swapping does), and
    /// so does any load when nothing resident has work. So two models that do not fit together
    /// switch at most once per quota, however their requests alternate.
    pub(crate) fn switch_spacing_active(&self) -> bool {
        // With `overlap_transfers` (a GPU's copy engine) a load does not stall compute.
        if self.cfg.policy != PoolPolicy::Token || self.cfg.overlap_transfers {
            return false;
        }
        self.switch_spacing_end_ns().is_some() && self.resident_target_exists()
    }

    /// When the turn quota since the last load ends, if it has not yet (the spacing window;
    /// also the driver's timer while a load waits on it).
    pub(crate) fn switch_spacing_end_ns(&self) -> Option<u64> {
        let last = self.last_load_ns?;
        let end = last.saturating_add(self.cfg.knobs.turn_quota_ms_max.saturating_mul(1_000_000));
        (self.now_ns < end).then_some(end)
    }

    /// Whether `target` needs a load that should wait (resident work runs instead): one that
    /// would displace a model with work, while switches are spaced, for a new request's prefill
    /// until it has waited `switch_wait_ms_max`, and for a turn while its sequences' slack
    /// covers twice the load and the turn. Where a load stalls compute, a preemption for
    /// a prefill costs every stream two loads (the newcomer's model now, the victim's back
    /// later) to bring one first token forward; in the simulator it lost to waiting on both CPU
    /// markets (docs/pool.md §3.4), so the request waits for a model to go idle, as under
    /// `swap-lru`.
    fn switch_waits(&self, target: Target, spaced: bool) -> bool {
        if self.cfg.policy != PoolPolicy::Token || self.cfg.overlap_transfers {
            return false;
        }
        let model = target_model(target);
        if !self.load_preempts(model) || !self.resident_target_exists() {
            return false;
        }
        spaced
            || match target {
                Target::Prefill { model } => !self.prefill_waited_too_long(model),
                Target::Decode(turn) => !self.decode_deadline_at_risk(turn),
            }
    }

    /// Whether `model`'s oldest queued request has waited `switch_wait_ms_max` for a model to
    /// go idle: its load may then preempt one with work, so a cold model's requests are not
    /// starved by busy resident ones.
    fn prefill_waited_too_long(&self, model: usize) -> bool {
        let wait_ns = self.cfg.knobs.switch_wait_ms_max.saturating_mul(1_000_000);
        self.now_ns >= self.head_arrival(model).saturating_add(wait_ns)
    }

    /// Whether a turn's sequences, if their model's load waited, would come within twice the
    /// load and the turn of a next-token deadline.
    fn decode_deadline_at_risk(&self, turn: Turn) -> bool {
        let m = &self.models[turn.model];
        let turn_ns = u64::from(turn.steps).saturating_mul(m.decode_step_ns);
        self.decode_slack_ns(turn.model) < m.load_ns.saturating_add(turn_ns).saturating_mul(2)
    }

    /// Whether loading `model` now needs memory that a model with work holds: the model is not
    /// resident and its bytes exceed what is free plus what idle models (nothing queued,
    /// decoding, saved or in flight, not pinned) and models already leaving hold.
    fn load_preempts(&self, model: usize) -> bool {
        if !matches!(
            self.models[model].residency,
            Residency::Cold | Residency::Evicting
        ) {
            return false;
        }
        let reclaimable: u64 = (0..self.models.len())
            .filter(|&i| i != model)
            .filter(|&i| {
                let m = &self.models[i];
                let idle = m.residency == Residency::Resident
                    && !self.cfg.models[i].pin
                    && m.busy == 0
                    && m.in_ctx == 0
                    && m.pending == 0
                    && m.saved_bytes == 0
                    && m.prefill_q.is_empty()
                    && m.decoding.is_empty();
                idle || m.residency == Residency::Evicting
            })
            .map(|i| self.cfg.models[i].resident_bytes())
            .sum();
        self.cfg.models[model].full_bytes(self.cfg.kv_paged)
            > self.memory_bytes_free().saturating_add(reclaimable)
    }

    fn resident_target_exists(&self) -> bool {
        self.models.iter().any(|m| {
            m.residency == Residency::Resident
                && (!m.prefill_q.is_empty() || !m.decoding.is_empty())
        })
    }

    /// Work of a resident model to run instead of a switch: the oldest queued request of a
    /// resident model when a prefill is due (credit or nothing decodes), else the round's next
    /// turn of a resident model (moved to the current position; every turn still runs once per
    /// round), else the oldest queued request of a resident model.
    fn resident_target(&mut self) -> Option<Target> {
        let resident =
            |pool: &Self, model: usize| pool.models[model].residency == Residency::Resident;
        let prefill = self.oldest_queued(|m| resident(self, m) && self.prefill_eligible(m));
        if let Some(model) = prefill
            && self.prefill_credit
        {
            return Some(Target::Prefill { model });
        }
        let index = (self.turn..self.round.len()).find(|&i| {
            self.round
                .get(i)
                .is_some_and(|&t| resident(self, t.model) && !self.turn_seqs(t).is_empty())
        });
        if let Some(index) = index {
            self.round.swap(self.turn, index);
            return self.round.get(self.turn).copied().map(Target::Decode);
        }
        // The round holds no resident turn: a turn of a resident model's sequences outside it.
        if let Some(model) = (0..self.models.len())
            .find(|&m| resident(self, m) && !self.models[m].decoding.is_empty())
        {
            return Some(Target::Decode(Turn {
                model,
                chunk: 0,
                steps: self.cfg.knobs.decode_steps_min,
            }));
        }
        prefill.map(|model| Target::Prefill { model })
    }

    /// The model of the oldest queued request that may be prefilled now (grouped FCFS).
    fn prefill_candidate(&self) -> Option<usize> {
        if self.cfg.policy == PoolPolicy::SwapLru && self.cfg.knobs.hol_blocking {
            let head = self.oldest_queued(|_| true)?;
            return self.prefill_eligible(head).then_some(head);
        }
        let model = self.oldest_queued(|m| self.prefill_eligible(m))?;
        if self.cfg.policy == PoolPolicy::SwapLru {
            // Anti-starvation: once a request blocked on a load has waited a whole TTFT SLO,
            // newer requests stop taking the fast path, so resident models drain and free memory.
            if let Some(blocked) =
                self.oldest_queued(|m| self.models[m].residency != Residency::Resident)
            {
                let blocked_ns = self.head_arrival(blocked);
                let ttft_ns = self.cfg.knobs.ttft_slo_ms.saturating_mul(1_000_000);
                if self.head_arrival(model) > blocked_ns.saturating_add(ttft_ns) {
                    return None;
                }
            }
        }
        Some(model)
    }

    fn prefill_eligible(&self, model: usize) -> bool {
        let m = &self.models[model];
        // `token` frees slots and paged KV itself (`prepare`); the others wait for them.
        let room = m.in_ctx < self.cfg.models[model].seqs_max
            && self.head_kv_bytes(model) <= self.memory_bytes_free();
        match self.cfg.policy {
            // Paged KV is freed by `prepare`; a slot only from another of the model's own
            // sequences when that one can afford to wait (`own_slot_preemptable`).
            PoolPolicy::Token => {
                m.in_ctx < self.cfg.models[model].seqs_max || self.own_slot_preemptable(model)
            }
            PoolPolicy::Dedicated => room,
            PoolPolicy::SwapLru => m.residency == Residency::Resident && room,
        }
    }

    /// Whether `token` may free a slot of `model`, all of whose slots hold its own sequences, by
    /// saving one of them for the queue head: only for a head whose first token is at risk
    /// ([`Self::prefill_urgent`]), only when the sequence that would be saved has the slack
    /// to wait out the head's prefill and its own save and restore, twice over (the margin of
    /// [`Self::decode_deadline_at_risk`]), and, where transfers run beside compute, only when
    /// the other models' turns can hide what the extra chunk costs ([`Self::chunk_hidden`]). A
    /// model's own sequences trade places at no gain in throughput: on a saturated model, saving
    /// one for every new request only moves the lateness to the saved sequence and adds its
    /// transfers, where a dedicated engine would queue the request.
    fn own_slot_preemptable(&self, model: usize) -> bool {
        if !self.prefill_urgent(model) {
            return false;
        }
        let spec = &self.cfg.models[model];
        let Some(head) = self.queue_head(model) else {
            return false;
        };
        let prefill_ns = self.prefill_ns(model, head);
        let Some(victim) = self
            .own_save_candidate(model, &[])
            .and_then(|s| self.seqs.get(&s))
        else {
            return false;
        };
        let victim_bytes =
            spec.saved_bytes(u64::from(victim.prompt_tokens) + u64::from(victim.emitted));
        let transfer_ns = victim_bytes
            .saturating_mul(spec.estimate.kv_transfer_ps_per_byte)
            .saturating_mul(2)
            / 1_000;
        self.next_token_slack_ns(victim) > prefill_ns.saturating_add(transfer_ns).saturating_mul(2)
            && (!self.cfg.overlap_transfers || self.chunk_hidden(model, victim_bytes))
    }

    /// Whether the other resident models' decode turns of one round last at least as long as
    /// saving and restoring a whole chunk of `model` (`seqs_max` sequences of `seq_bytes`): the
    /// price of the extra chunk an own-slot preemption starts. Once a model has more sequences
    /// than slots its chunks take turns, and each of those turns saves one chunk and restores
    /// another. Where transfers run beside compute (a GPU's copy engine) that is free while
    /// another model decodes; a model alone, or beside models with little to do, waits for its
    /// own transfers at every turn. On the `h100` market at 200 req/s (docs/bench/sim.md) the
    /// accelerators pairing a hot model's instance with a tail model fell to 23–52 % attainment
    /// that way, where queueing the new requests, as `swap-lru` does, met 99 %.
    fn chunk_hidden(&self, model: usize, seq_bytes: u64) -> bool {
        let spec = &self.cfg.models[model];
        let chunk_ns = seq_bytes
            .saturating_mul(u64::from(spec.seqs_max))
            .saturating_mul(spec.estimate.kv_transfer_ps_per_byte)
            .saturating_mul(2)
            / 1_000;
        let steps = u64::from(self.cfg.knobs.decode_steps_min);
        let others_ns = (0..self.models.len())
            .filter(|&i| i != model && self.models[i].residency == Residency::Resident)
            .map(|i| {
                let m = &self.models[i];
                let seqs_max = u64::from(self.cfg.models[i].seqs_max.max(1));
                let turns = u64::try_from(m.decoding.len())
                    .unwrap_or(u64::MAX)
                    .div_ceil(seqs_max);
                turns.saturating_mul(steps).saturating_mul(m.decode_step_ns)
            })
            .fold(0_u64, u64::saturating_add);
        chunk_ns <= others_ns
    }

    /// The first queued request of `model`.
    fn queue_head(&self, model: usize) -> Option<&SeqState> {
        self.models[model]
            .prefill_q
            .front()
            .and_then(|s| self.seqs.get(s))
    }

    /// The estimated time of `seq`'s prefill (the prompt tokens not hinted cached) on `model`.
    fn prefill_ns(&self, model: usize, seq: &SeqState) -> u64 {
        seq.prefill_tokens()
            .saturating_mul(self.cfg.models[model].estimate.prefill_ns_per_token)
    }

    /// Time until a decoding sequence's next-token deadline (arrival + TTFT SLO + tokens emitted
    /// × TBT SLO); 0 once it is late.
    fn next_token_slack_ns(&self, seq: &SeqState) -> u64 {
        let ttft_ns = self.cfg.knobs.ttft_slo_ms.saturating_mul(1_000_000);
        let tbt_ns = self.cfg.knobs.tbt_slo_ms.saturating_mul(1_000_000);
        seq.arrival_ns
            .saturating_add(ttft_ns)
            .saturating_add(u64::from(seq.emitted).saturating_mul(tbt_ns))
            .saturating_sub(self.now_ns)
    }

    fn head_arrival(&self, model: usize) -> u64 {
        self.queue_head(model).map_or(NEVER, |s| s.arrival_ns)
    }

    /// The model whose queue head arrived first among those passing `filter`.
    fn oldest_queued(&self, filter: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(u64, SeqId, usize)> = None;
        for (i, m) in self.models.iter().enumerate() {
            let Some(&seq) = m.prefill_q.front() else {
                continue;
            };
            if !filter(i) {
                continue;
            }
            let key = (self.head_arrival(i), seq, i);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|(_, _, i)| i)
    }

    fn prefill_urgent(&self, model: usize) -> bool {
        let Some(state) = self.queue_head(model) else {
            return false;
        };
        let prefill_ns = self.prefill_ns(model, state);
        let m = &self.models[model];
        let switch_ns = if m.residency == Residency::Resident {
            0
        } else {
            m.load_ns
        };
        let deadline = state
            .arrival_ns
            .saturating_add(self.cfg.knobs.ttft_slo_ms.saturating_mul(1_000_000));
        let slack = deadline.saturating_sub(self.now_ns);
        slack < prefill_ns.saturating_add(switch_ns).saturating_mul(2)
    }

    /// Up to `slots` queued requests of `model`, FCFS, within the group and token limits (the
    /// first request always goes) and, with `kv_paged`, within `kv_bytes_free` of paged KV
    /// (empty if the first does not fit).
    fn prefill_group(&self, model: usize, slots: u32, kv_bytes_free: u64) -> Vec<SeqId> {
        let limit = usize::try_from(slots.min(self.cfg.knobs.prefill_group_len_max)).unwrap_or(0);
        let mut tokens = 0_u64;
        let mut kv_bytes = 0_u64;
        let mut group = Vec::with_capacity(limit);
        for &seq in self.models[model].prefill_q.iter().take(limit) {
            let (prompt, kv) = self
                .seqs
                .get(&seq)
                .map_or((0, 0), |s| (s.prefill_tokens(), s.ctx_kv_bytes));
            if !group.is_empty() && tokens + prompt > u64::from(self.cfg.knobs.prefill_tokens_max) {
                break;
            }
            if kv_bytes + kv > kv_bytes_free {
                break;
            }
            tokens += prompt;
            kv_bytes += kv;
            group.push(seq);
        }
        group
    }

    /// Paged KV the model's queue head needs to enter the context (0 without `kv_paged`).
    fn head_kv_bytes(&self, model: usize) -> u64 {
        self.models[model]
            .prefill_q
            .front()
            .and_then(|s| self.seqs.get(s))
            .map_or(0, |s| s.ctx_kv_bytes)
    }

    /// Paged KV the model's decoding sequences (and, with `queued`, its queued ones) hold or
    /// will hold: what it needs besides its weights to run without saving anything.
    fn kv_demand(&self, model: usize, queued: bool) -> u64 {
        if !self.cfg.kv_paged {
            return 0;
        }
        let m = &self.models[model];
        let queue = if queued { m.prefill_q.len() } else { 0 };
        m.decoding
            .iter()
            .chain(m.prefill_q.iter().take(queue))
            .filter_map(|s| self.seqs.get(s))
            .map(|s| s.ctx_kv_bytes)
            .sum()
    }

    /// The next non-empty turn of the round, rebuilding the round when it is exhausted.
    fn decode_candidate(&mut self) -> Option<Turn> {
        for _ in 0..2 {
            loop {
                if self.cfg.policy == PoolPolicy::Token && self.cfg.knobs.round_resident_first {
                    self.resident_turn_first();
                }
                let Some(&turn) = self.round.get(self.turn) else {
                    break;
                };
                if !self.turn_seqs(turn).is_empty() {
                    return Some(turn);
                }
                self.turn += 1;
            }
            self.build_round();
        }
        None
    }

    /// Moves the round's next turn of a resident model (with sequences) to the current position,
    /// so turns that need a load run last. Only reorders the rest of this round: every turn
    /// still runs once before the round is rebuilt.
    fn resident_turn_first(&mut self) {
        let resident = (self.turn..self.round.len()).find(|&i| {
            self.round.get(i).is_some_and(|&t| {
                self.models[t.model].residency == Residency::Resident
                    && !self.turn_seqs(t).is_empty()
            })
        });
        if let Some(index) = resident {
            self.round.swap(self.turn, index);
        }
    }

    /// The sequences of one turn: chunk `chunk` of the model's decoding set in `SeqId` order.
    pub(crate) fn turn_seqs(&self, turn: Turn) -> Vec<SeqId> {
        self.turn_window(turn).to_vec()
    }

    /// [`Self::turn_seqs`] without collecting them (empty once the turn's requests finished).
    fn turn_window(&self, turn: Turn) -> &[SeqId] {
        let seqs_max = usize::try_from(self.cfg.models[turn.model].seqs_max).unwrap_or(1);
        let skip = usize::try_from(turn.chunk)
            .unwrap_or(usize::MAX)
            .saturating_mul(seqs_max);
        self.models[turn.model].decoding.window(skip, seqs_max)
    }

    /// A round visits every decoding chunk once in model order. `token` sizes turns with
    /// Aegaeon's quota formula; the request-level policies use the minimum turn (they only
    /// time-share resident models).
    fn build_round(&mut self) {
        self.round.clear();
        self.turn = 0;
        for (i, m) in self.models.iter().enumerate() {
            if m.decoding.is_empty() {
                continue;
            }
            if self.cfg.policy != PoolPolicy::Token && m.residency != Residency::Resident {
                continue;
            }
            let seqs_max = usize::try_from(self.cfg.models[i].seqs_max).unwrap_or(1);
            let chunks = u32::try_from(m.decoding.len().div_ceil(seqs_max)).unwrap_or(u32::MAX);
            for chunk in 0..chunks {
                self.round.push(Turn {
                    model: i,
                    chunk,
                    steps: self.cfg.knobs.decode_steps_min,
                });
            }
        }
        if self.cfg.policy == PoolPolicy::Token {
            self.defer_unhurried_switches();
            self.assign_quotas();
        }
    }

    /// Cost-aware switching (`token`): a turn that would need its model loaded is left out of
    /// this round when its sequences can afford to wait for the next one: the earliest next-token
    /// deadline among them is more than twice the predicted round away (the round's decode steps
    /// plus the loads it pays, this model's included). The turns of resident models then run
    /// without a switch, and the skipped model comes back once its slack runs low, for a turn
    /// that a load then buys in full. Skipping happens only while some resident model has a
    /// turn in the round, so a round is never empty and nothing waits on nothing.
    fn defer_unhurried_switches(&mut self) {
        if self.round_switch_ns().is_none() {
            return;
        }
        let resident =
            |pool: &Self, turn: &Turn| pool.models[turn.model].residency == Residency::Resident;
        if !self.round.iter().any(|t| resident(self, t)) {
            return;
        }
        let mut round_ns = 0_u64;
        let mut last = None;
        for turn in &self.round {
            let m = &self.models[turn.model];
            round_ns =
                round_ns.saturating_add(u64::from(turn.steps).saturating_mul(m.decode_step_ns));
            if last != Some(turn.model) && m.residency != Residency::Resident {
                round_ns = round_ns.saturating_add(m.load_ns);
            }
            last = Some(turn.model);
        }
        let horizon = round_ns.saturating_mul(2);
        let deferred: Vec<usize> = (0..self.models.len())
            .filter(|&i| {
                let m = &self.models[i];
                m.residency == Residency::Cold
                    && !m.decoding.is_empty()
                    && self.decode_slack_ns(i) > horizon
            })
            .collect();
        if deferred.is_empty() {
            return;
        }
        self.round.retain(|t| !deferred.contains(&t.model));
        self.counters.switches_deferred = self
            .counters
            .switches_deferred
            .saturating_add(u64::try_from(deferred.len()).unwrap_or(u64::MAX));
    }

    /// Time until the earliest next-token deadline among `model`'s decoding sequences
    /// (arrival + TTFT SLO + tokens emitted × TBT SLO); 0 once one is late.
    pub(crate) fn decode_slack_ns(&self, model: usize) -> u64 {
        self.models[model]
            .decoding
            .iter()
            .filter_map(|s| self.seqs.get(s))
            .map(|s| self.next_token_slack_ns(s))
            .min()
            .unwrap_or(NEVER)
    }

    /// The summed load estimates of the round's models when they (their weights, contexts and
    /// paged KV, with the saved states when they share the budget) do not all fit at once, so
    /// running the round costs loads; `None` when it costs none.
    fn round_switch_ns(&self) -> Option<u64> {
        let mut bytes = 0_u64;
        let mut switch_ns = 0_u64;
        let mut last = None;
        for turn in &self.round {
            if last != Some(turn.model) {
                bytes = bytes
                    .saturating_add(self.cfg.models[turn.model].resident_bytes())
                    .saturating_add(self.kv_demand(turn.model, false));
                switch_ns = switch_ns.saturating_add(self.models[turn.model].load_ns);
                last = Some(turn.model);
            }
        }
        let saved = if self.cfg.saved_kv_in_memory_budget {
            self.ledger.saved_bytes
        } else {
            0
        };
        (bytes.saturating_add(saved) > self.cfg.memory_bytes_max && switch_ns > 0)
            .then_some(switch_ns)
    }

    /// Aegaeon's `_assign_quota` (docs/pool.md): `n_i = TBT/d_i`, `c` = switch cost of the
    /// round, `α = max(c/(min n·Q_max) + Σ1/n, 0.5)`, `q_i = c/(n_i(α − Σ1/n))`, converted to
    /// step counts so the pool stays deterministic. A round whose models all fit at once has
    /// no switches: every turn gets `decode_steps_min`.
    fn assign_quotas(&mut self) {
        let Some(switch_ns) = self.round_switch_ns() else {
            return;
        };
        let tbt_ns = self.tbt_ns();
        let n: Vec<f64> = self
            .round
            .iter()
            .map(|t| tbt_ns / as_f64(self.models[t.model].decode_step_ns))
            .collect();
        let sum_inv: f64 = n.iter().map(|n| 1.0 / n).sum();
        let n_min = n.iter().copied().fold(f64::INFINITY, f64::min);
        let c = as_f64(switch_ns);
        let quota_max_ns = as_f64(self.cfg.knobs.turn_quota_ms_max) * 1e6;
        let alpha = (c / (n_min * quota_max_ns) + sum_inv).max(0.5);
        let spare = (alpha - sum_inv).max(c / (n_min * quota_max_ns));
        for (turn, n_i) in self.round.iter_mut().zip(&n) {
            let d_i = as_f64(self.models[turn.model].decode_step_ns);
            let q_i = (c / (n_i * spare)).min(quota_max_ns);
            let steps = f64_to_u64(q_i / d_i);
            let steps = u32::try_from(steps).unwrap_or(u32::MAX);
            turn.steps = steps.clamp(
                self.cfg.knobs.decode_steps_min,
                self.cfg.knobs.decode_steps_max,
            );
        }
    }

    /// The next transfer: keep-alive expiry first, then what the policy needs.
    fn next_transfer(&mut self) -> Option<(usize, Work)> {
        if let Some(model) = self.keep_alive_victim() {
            return Some((model, Work::Evict));
        }
        if let Some(model) = self.unload_victim() {
            return Some((model, Work::Evict));
        }
        let needed = match self.cfg.policy {
            PoolPolicy::Dedicated => {
                let cold = self
                    .models
                    .iter()
                    .position(|m| m.residency == Residency::Cold);
                cold.map(|cold| (cold, Work::Load))
            }
            PoolPolicy::SwapLru => self.swap_transfer(),
            PoolPolicy::Token => self.token_transfer(),
        };
        needed.or_else(|| self.requested_load())
    }

    /// A model an operator asked to unload, still idle (a request that arrived since cancels
    /// nothing: the model simply stays).
    fn unload_victim(&self) -> Option<usize> {
        (0..self.models.len()).find(|&i| {
            let m = &self.models[i];
            m.unload_requested && m.residency == Residency::Resident && m.is_idle()
        })
    }

    /// A model an operator asked to load, when nothing more urgent needs the transfer lane:
    /// loaded into free memory, else after evicting the least recently used idle model.
    fn requested_load(&self) -> Option<(usize, Work)> {
        let model = (0..self.models.len()).find(|&i| {
            self.models[i].load_requested && self.models[i].residency == Residency::Cold
        })?;
        self.load_or_evict_lru(model, |m| !m.load_requested && m.is_idle())
    }

    /// Loads `model` into free memory, else evicts the least recently used resident, unpinned
    /// model that `evictable` allows (ties by index).
    pub(crate) fn load_or_evict_lru(
        &self,
        model: usize,
        evictable: impl Fn(&ModelState) -> bool,
    ) -> Option<(usize, Work)> {
        if self.cfg.models[model].resident_bytes() <= self.memory_bytes_free() {
            return Some((model, Work::Load));
        }
        let victim = (0..self.models.len())
            .filter(|&i| {
                let m = &self.models[i];
                m.residency == Residency::Resident && !self.cfg.models[i].pin && evictable(m)
            })
            .min_by_key(|&i| (self.models[i].last_used_ns, i))?;
        Some((victim, Work::Evict))
    }

    /// An idle, unpinned model past its keep-alive (scale to zero).
    fn keep_alive_victim(&self) -> Option<usize> {
        if self.cfg.policy == PoolPolicy::Dedicated {
            return None;
        }
        (0..self.models.len()).find(|&i| {
            self.keep_alive_expiry(i)
                .is_some_and(|at| at <= self.now_ns)
        })
    }

    /// When model `i` may be scaled to zero, if it is idle and has a keep-alive.
    /// Never while batch sequences wait for the model: a batch load does not refresh
    /// `last_used_ns` (the online LRU order), so the model would go again at once.
    fn keep_alive_expiry(&self, i: usize) -> Option<u64> {
        let spec = &self.cfg.models[i];
        let m = &self.models[i];
        let keep_alive_ms = spec.keep_alive_ms?;
        let idle = m.residency == Residency::Resident
            && !spec.pin
            && m.is_idle()
            && !self.batch_waits_for(i);
        idle.then(|| {
            m.last_used_ns
                .saturating_add(keep_alive_ms.saturating_mul(1_000_000))
        })
    }

    /// The earliest keep-alive expiry still ahead: when the driver should send a `Tick`.
    pub fn next_timer_ns(&self) -> Option<u64> {
        if self.cfg.policy == PoolPolicy::Dedicated {
            return None;
        }
        let waiting_on_load = self.switch_spacing_active()
            && self.models.iter().any(|m| {
                m.residency != Residency::Resident
                    && (!m.prefill_q.is_empty() || !m.decoding.is_empty())
            });
        (0..self.models.len())
            .filter_map(|i| self.keep_alive_expiry(i))
            .chain(
                waiting_on_load
                    .then(|| self.switch_spacing_end_ns())
                    .flatten(),
            )
            .min()
    }

    /// `swap-lru`: load the model of the oldest request whose model is not resident, evicting
    /// the least recently used idle model (no request in flight) when memory is short.
    fn swap_transfer(&self) -> Option<(usize, Work)> {
        if let Some(evict) = self.swap_kv_room() {
            return Some(evict);
        }
        let model = if self.cfg.knobs.hol_blocking {
            self.oldest_queued(|_| true)
                .filter(|&m| self.models[m].residency != Residency::Resident)?
        } else {
            self.oldest_queued(|m| self.models[m].residency != Residency::Resident)?
        };
        if self.models[model].residency != Residency::Cold {
            return None;
        }
        self.load_or_evict_lru(model, |m| {
            m.busy == 0 && m.in_ctx == 0 && m.decoding.is_empty()
        })
    }

    /// `swap-lru` with paged KV: the oldest request of a resident model with a free slot whose
    /// KV does not fit evicts the least recently used idle model (no request in flight).
    fn swap_kv_room(&self) -> Option<(usize, Work)> {
        if !self.cfg.kv_paged {
            return None;
        }
        let free = self.memory_bytes_free();
        let model = self.oldest_queued(|m| {
            self.models[m].residency == Residency::Resident
                && self.models[m].in_ctx < self.cfg.models[m].seqs_max
                && self.head_kv_bytes(m) > free
        })?;
        let victim = (0..self.models.len())
            .filter(|&i| {
                let m = &self.models[i];
                i != model
                    && m.residency == Residency::Resident
                    && !self.cfg.models[i].pin
                    && m.busy == 0
                    && m.in_ctx == 0
                    && m.decoding.is_empty()
            })
            .min_by_key(|&i| (self.models[i].last_used_ns, i))?;
        Some((victim, Work::Evict))
    }

    /// `token`: prepare the current target, then prefetch for the next turn and the oldest
    /// prefill, evicting by Belady distance over the round order.
    fn token_transfer(&mut self) -> Option<(usize, Work)> {
        let mut wanted: Vec<(usize, Option<Turn>, bool)> = Vec::with_capacity(3);
        if let Some(target) = self.target {
            match target {
                Target::Prefill { model } => wanted.push((model, None, true)),
                Target::Decode(turn) => wanted.push((turn.model, Some(turn), true)),
            }
        }
        if let Some(&turn) = self.round.get(self.turn) {
            wanted.push((turn.model, Some(turn), false));
        }
        if let Some(model) = self.oldest_queued(|_| true) {
            wanted.push((model, None, false));
        }
        wanted
            .into_iter()
            .find_map(|(model, turn, current)| self.prepare(model, turn, current))
    }

    /// The next transfer that brings `model` (and the turn's sequences) into a runnable state.
    fn prepare(&self, model: usize, turn: Option<Turn>, current: bool) -> Option<(usize, Work)> {
        let m = &self.models[model];
        if m.busy > 0 {
            return None;
        }
        match m.residency {
            Residency::Loading | Residency::Evicting => None,
            Residency::Cold => {
                let waits = match turn {
                    Some(turn) => {
                        self.switch_waits(Target::Decode(turn), self.switch_spacing_active())
                    }
                    None => {
                        self.switch_waits(Target::Prefill { model }, self.switch_spacing_active())
                    }
                };
                if waits {
                    return None;
                }
                let need = self.cfg.models[model].resident_bytes();
                if need <= self.memory_bytes_free() {
                    Some((model, Work::Load))
                } else {
                    self.make_room(need, model, current)
                }
            }
            Residency::Resident => {
                let seqs_max = self.cfg.models[model].seqs_max;
                let Some(turn) = turn else {
                    // Prefill needs one free slot: save a decoding sequence (lazily, only now,
                    // and only one that can afford it); with paged KV also room for the head's
                    // KV.
                    if m.in_ctx >= seqs_max {
                        return self
                            .own_slot_preemptable(model)
                            .then(|| self.save_one(model, &[]))
                            .flatten();
                    }
                    let need = self.head_kv_bytes(model);
                    return (need > self.memory_bytes_free())
                        .then(|| self.free_kv(need, model, current, &[]))
                        .flatten();
                };
                let seqs = self.turn_seqs(turn);
                let (saved, need) = seqs.iter().find_map(|s| {
                    let state = self.seqs.get(s)?;
                    matches!(state.kv, Kv::Saved { .. }).then_some((*s, state.ctx_kv_bytes))
                })?;
                if m.in_ctx >= seqs_max {
                    self.save_one(model, &seqs)
                } else if need > self.memory_bytes_free() {
                    self.free_kv(need, model, current, &seqs)
                } else {
                    Some((model, Work::Restore(saved)))
                }
            }
        }
    }

    /// Frees `need` bytes of paged KV for `model`: other models first (Belady, as for a load),
    /// then, for the current target, one of its own decoding sequences not in `keep`.
    fn free_kv(
        &self,
        need: u64,
        model: usize,
        current: bool,
        keep: &[SeqId],
    ) -> Option<(usize, Work)> {
        self.make_room(need, model, current)
            .or_else(|| current.then(|| self.save_one(model, keep)).flatten())
    }

    /// Saves one in-context sequence of `model` not in `keep`, if the saved pool has room.
    fn save_one(&self, model: usize, keep: &[SeqId]) -> Option<(usize, Work)> {
        let seq = self.own_save_candidate(model, keep)?;
        self.save_fits(model, seq)
            .then_some((model, Work::Save(seq)))
    }

    /// The in-context sequence of `model` not in `keep` that [`Self::save_one`] would save: the
    /// most recently admitted one not in an action.
    fn own_save_candidate(&self, model: usize, keep: &[SeqId]) -> Option<SeqId> {
        self.models[model]
            .decoding_in_ctx
            .iter()
            .rev()
            .find(|s| {
                !keep.contains(s)
                    && self
                        .seqs
                        .get(s)
                        .is_some_and(|st| st.kv == Kv::InCtx && !st.in_action)
            })
            .copied()
    }

    fn save_fits(&self, model: usize, seq: SeqId) -> bool {
        let Some(state) = self.seqs.get(&seq) else {
            return false;
        };
        let bytes = self.cfg.models[model]
            .saved_bytes(u64::from(state.prompt_tokens) + u64::from(state.emitted));
        let pool_ok = self.ledger.saved_bytes + bytes <= self.cfg.kv_saved_bytes_max;
        // Memory for the save is held back by `memory_bytes_free` (saved pool headroom).
        pool_ok
    }

    /// Frees memory for `model`: the resident model used farthest in the future (Belady over
    /// the round order) goes first; its sequences are saved before it is evicted. A prefetch
    /// (`current == false`) only evicts models needed later than `model`.
    fn make_room(&self, need: u64, model: usize, current: bool) -> Option<(usize, Work)> {
        assert!(
            need > self.memory_bytes_free(),
            "make_room called with enough memory"
        );
        let protect = self.target.map(|t| match t {
            Target::Prefill { model } => model,
            Target::Decode(turn) => turn.model,
        });
        let own = self.next_use(model);
        // Farthest next use first; among equals (above all the models nothing waits for), the
        // least demanded lately, then configuration order.
        let mut victims: Vec<(std::cmp::Reverse<u64>, u64, usize)> = (0..self.models.len())
            .filter(|&i| {
                let m = &self.models[i];
                i != model
                    && Some(i) != protect
                    && m.residency == Residency::Resident
                    && !self.cfg.models[i].pin
                    && m.busy == 0
            })
            .map(|i| (self.next_use(i), i))
            .filter(|&(distance, _)| current || distance > own)
            .map(|(distance, i)| {
                let demand = self.models[i].demand.at(self.now_ns);
                (std::cmp::Reverse(distance), demand, i)
            })
            .collect();
        victims.sort_unstable();
        for (_, _, victim) in victims {
            if self.models[victim].in_ctx == 0 {
                return Some((victim, Work::Evict));
            }
            if let Some(save) = self.save_one(victim, &[]) {
                return Some(save);
            }
        }
        None
    }

    /// How soon `model` is needed: 0 for the current target, then its position in the round
    /// after the current turn, then queued prefill; `NEVER` if nothing needs it. Only turns that
    /// still have sequences count: a turn whose requests finished since the round was built
    /// (the round wraps, so a spent turn can sit just ahead) says nothing about the model, and
    /// counting it made Belady keep an idle model and save a busy one in its place.
    fn next_use(&self, model: usize) -> u64 {
        let target_model = self.target.map(|t| match t {
            Target::Prefill { model } => model,
            Target::Decode(turn) => turn.model,
        });
        if target_model == Some(model) {
            return 0;
        }
        let len = self.round.len();
        for offset in 0..len {
            let index = (self.turn + offset) % len;
            if self
                .round
                .get(index)
                .is_some_and(|&t| t.model == model && !self.turn_window(t).is_empty())
            {
                return 1 + u64::try_from(offset).unwrap_or(NEVER - 2);
            }
        }
        let m = &self.models[model];
        if !m.prefill_q.is_empty() || !m.decoding.is_empty() || m.pending > 0 {
            return 1 + u64::try_from(len).unwrap_or(NEVER - 2);
        }
        NEVER
    }
}

/// The model a compute target runs on.
fn target_model(target: Target) -> usize {
    match target {
        Target::Prefill { model } => model,
        Target::Decode(turn) => turn.model,
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "durations and byte counts are far below 2^52"
)]
fn as_f64(value: u64) -> f64 {
    value as f64
}

#[expect(clippy::cast_precision_loss, reason = "batch counts are tiny")]
fn as_f64_usize(value: usize) -> f64 {
    value as f64
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "saturating float-to-int conversion of a non-negative, clamped value"
)]
fn f64_to_u64(value: f64) -> u64 {
    if value.is_nan() || value <= 0.0 {
        0
    } else {
        value.min(1e18) as u64
    }
}
