//! The discrete-event loop of one accelerator: the real `tidepool_pool::Pool` decides, the cost
//! model says how long each action takes, and every emitted token is checked against its
//! deadline. Virtual time only; events ordered by `(time_ns, lane)` with completions before
//! arrivals before timers.

use std::collections::BTreeMap;

use tidepool_core::ModelId;
use tidepool_pool::{Action, Event, Pool, PoolConfig, PoolError, RequestClass, SeqFinished, SeqId};

use crate::SimError;
use crate::profile::{Costs, as_f64};
use crate::workload::Request;

/// Per-request outcome accumulated while the simulation runs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SeqSim {
    pub(crate) arrival_ns: u64,
    pub(crate) prompt_tokens: u32,
    pub(crate) output_tokens: u32,
    pub(crate) emitted: u32,
    pub(crate) on_time: u32,
    pub(crate) first_token_ns: Option<u64>,
    pub(crate) last_token_ns: u64,
    pub(crate) rejected: bool,
    /// A batch-class request: reported apart, never in the attainment.
    pub(crate) batch: bool,
    // Aegaeon's lenient score: reference point and on-schedule time.
    ref_ns: u64,
    ref_k: u32,
    good_ns: u64,
}

impl SeqSim {
    /// Share of the request's service time spent on schedule (Aegaeon `compute_slo`).
    pub(crate) fn lenient_score(&self) -> f64 {
        let total = self.last_token_ns.saturating_sub(self.arrival_ns);
        if self.rejected || self.emitted == 0 {
            return 0.0;
        }
        if total == 0 {
            return 1.0;
        }
        as_f64(self.good_ns) / as_f64(total)
    }
}

/// SLOs in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slo {
    pub(crate) ttft_ns: u64,
    pub(crate) tbt_ns: u64,
}

/// What one accelerator produced.
#[derive(Debug, Default)]
pub(crate) struct AccOutcome {
    pub(crate) seqs: Vec<SeqSim>,
    pub(crate) compute_busy_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) counters: tidepool_pool::PoolCounters,
    /// Each model's decode steps by batch size (`ModelStatus::decode_by_batch`), by model id.
    pub(crate) decode_by_model: Vec<(String, tidepool_pool::DecodeByBatch)>,
    /// Online tokens missed: emitted after their deadline, or owed by a rejected request.
    pub(crate) missed_tokens: u64,
    /// The run stopped once `missed_tokens` reached its limit ([`AccRun::stop_at_missed`]):
    /// the other figures are partial and `missed_tokens` is a lower bound.
    pub(crate) stopped: bool,
}

struct Pending {
    at_ns: u64,
    event: Event,
}

/// A decode turn in flight. Its tokens are booked when it completes, so a request arriving
/// during it can still cut it short (`Pool::decode_yield_wanted`), as the server's driver does
/// between steps.
struct DecodeTurn {
    id: tidepool_pool::ActionId,
    model: usize,
    seqs: Vec<usize>,
    start_ns: u64,
    steps: u32,
    end_ns: u64,
}

/// What the compute lane is doing.
enum Compute {
    Done(Pending),
    Decode(DecodeTurn),
}

impl Compute {
    fn at_ns(&self) -> u64 {
        match self {
            Self::Done(p) => p.at_ns,
            Self::Decode(turn) => turn.end_ns,
        }
    }
}

pub(crate) struct AccRun<'a> {
    pool: Pool,
    costs: Vec<Costs>,
    ids: Vec<ModelId>,
    by_id: BTreeMap<ModelId, usize>,
    requests: &'a [(usize, Request)],
    seqs: Vec<SeqSim>,
    compute: Option<Compute>,
    transfer: Option<Pending>,
    slo: Slo,
    compute_busy_ns: u64,
    actions: Vec<Action>,
    /// Models loaded before the first request (local indices), at no cost and not counted.
    warm: Vec<usize>,
    warming: bool,
    warm_loads: u64,
    warm_evictions: u64,
    /// Online tokens missed so far (late or rejected); never decreases.
    missed_tokens: u64,
    missed_limit: Option<u64>,
}

impl<'a> AccRun<'a> {
    /// `requests` pairs each request with its local model index (position in `ids`).
    pub(crate) fn new(
        cfg: PoolConfig,
        costs: Vec<Costs>,
        ids: Vec<ModelId>,
        requests: &'a [(usize, Request)],
        slo: Slo,
        warm: Vec<usize>,
    ) -> Result<Self, SimError> {
        let pool = Pool::new(cfg)?;
        let by_id = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let seqs = requests
            .iter()
            .map(|(_, r)| SeqSim {
                arrival_ns: r.at_ns,
                prompt_tokens: r.prompt_tokens,
                output_tokens: r.output_tokens,
                ref_ns: r.at_ns + slo.ttft_ns,
                last_token_ns: r.at_ns,
                batch: r.class == RequestClass::Batch,
                ..SeqSim::default()
            })
            .collect();
        Ok(Self {
            pool,
            costs,
            ids,
            by_id,
            requests,
            seqs,
            compute: None,
            transfer: None,
            slo,
            compute_busy_ns: 0,
            actions: Vec::with_capacity(8),
            warm,
            warming: false,
            warm_loads: 0,
            warm_evictions: 0,
            missed_tokens: 0,
            missed_limit: None,
        })
    }

    /// Stop the run as soon as `limit` online tokens are missed: a caller that only needs to
    /// know whether the accelerator misses fewer saves the rest of the run.
    pub(crate) fn stop_at_missed(mut self, limit: u64) -> Self {
        self.missed_limit = Some(limit);
        self
    }

    /// Runs to completion; `tick` is called once per arrival (progress reporting).
    pub(crate) fn run(mut self, tick: &mut dyn FnMut()) -> Result<AccOutcome, SimError> {
        let mut next_arrival = 0_usize;
        let mut now_ns = 0_u64;
        self.warm_up()?;
        // Dedicated loads its models before traffic starts.
        self.feed(Event::Tick { now_ns: 0 })?;
        loop {
            if self
                .missed_limit
                .is_some_and(|limit| self.missed_tokens >= limit)
            {
                return Ok(self.stopped());
            }
            let arrival_at = self.requests.get(next_arrival).map(|(_, r)| r.at_ns);
            let timer_at = self.pool.next_timer_ns().filter(|&t| t > now_ns);
            let compute_at = self.compute.as_ref().map(Compute::at_ns);
            let transfer_at = self.transfer.as_ref().map(|p| p.at_ns);
            let candidates = [compute_at, transfer_at, arrival_at, timer_at];
            let Some((kind, at)) = candidates
                .iter()
                .enumerate()
                .filter_map(|(k, t)| t.map(|t| (k, t)))
                .min_by_key(|&(k, t)| (t, k))
            else {
                break;
            };
            now_ns = at;
            match kind {
                0 => {
                    let done = self.compute.take().map(|c| match c {
                        Compute::Done(p) => p.event,
                        Compute::Decode(turn) => self.finish_decode(&turn),
                    });
                    if let Some(event) = done {
                        self.feed(event)?;
                    }
                }
                1 => {
                    let done = self.transfer.take().map(|p| p.event);
                    if let Some(event) = done {
                        self.feed(event)?;
                    }
                }
                2 => {
                    self.arrive(next_arrival, at)?;
                    next_arrival += 1;
                    tick();
                }
                _ => self.feed(Event::Tick { now_ns: at })?,
            }
        }
        if !self.pool.is_idle() {
            return Err(SimError::Stalled {
                now_ns,
                seqs: self.pool.seqs_len(),
            });
        }
        Ok(self.finished())
    }

    /// The outcome of a run to its end.
    fn finished(self) -> AccOutcome {
        let end_ns = online_end_ns(&self.seqs);
        let mut counters = self.pool.counters();
        counters.loads = counters.loads.saturating_sub(self.warm_loads);
        counters.evictions = counters.evictions.saturating_sub(self.warm_evictions);
        let decode_by_model = self
            .pool
            .status()
            .models
            .into_iter()
            .map(|m| (m.model.to_string(), m.decode_by_batch))
            .collect();
        debug_assert_eq!(
            self.missed_tokens,
            self.seqs
                .iter()
                .filter(|s| !s.batch)
                .map(|s| u64::from(s.output_tokens.saturating_sub(s.on_time)))
                .sum::<u64>(),
            "every missed token was counted when it was missed"
        );
        AccOutcome {
            seqs: self.seqs,
            compute_busy_ns: self.compute_busy_ns,
            end_ns,
            counters,
            decode_by_model,
            missed_tokens: self.missed_tokens,
            stopped: false,
        }
    }

    /// What a run stopped at its missed-token limit knows: the missed tokens so far.
    fn stopped(self) -> AccOutcome {
        AccOutcome {
            missed_tokens: self.missed_tokens,
            stopped: true,
            ..AccOutcome::default()
        }
    }

    /// Brings the warm models in before time starts (an operator load hint each, completed at
    /// t = 0), as a server that has been running holds its popular models.
    fn warm_up(&mut self) -> Result<(), SimError> {
        self.warming = true;
        for model in self.warm.clone() {
            let Some(id) = self.ids.get(model).cloned() else {
                continue;
            };
            self.feed(Event::LoadRequested {
                now_ns: 0,
                model: id,
            })?;
            while let Some(done) = self.transfer.take() {
                self.feed(done.event)?;
            }
        }
        self.warming = false;
        Ok(())
    }

    fn arrive(&mut self, index: usize, now_ns: u64) -> Result<(), SimError> {
        let (model, request) = self.requests[index];
        let event = Event::RequestArrived {
            now_ns,
            seq: SeqId(u64::try_from(index).unwrap_or(u64::MAX)),
            model: self.ids[model].clone(),
            prompt_tokens: request.prompt_tokens,
            max_tokens: request.output_tokens,
            class: request.class,
            cached_tokens: 0,
        };
        match self.feed(event) {
            Ok(()) => {
                self.cut_decode(now_ns);
                Ok(())
            }
            Err(SimError::Pool(
                PoolError::QueueFull { .. }
                | PoolError::BatchQueueFull { .. }
                | PoolError::RequestTooLong { .. }
                | PoolError::ModelTooLarge { .. },
            )) => {
                self.seqs[index].rejected = true;
                if !self.seqs[index].batch {
                    self.missed_tokens += u64::from(self.seqs[index].output_tokens);
                }
                // The pool scheduled nothing new for a refused request; keep the lanes moving.
                self.feed(Event::Tick { now_ns })
            }
            Err(error) => Err(error),
        }
    }

    fn feed(&mut self, event: Event) -> Result<(), SimError> {
        let now_ns = event.now_ns();
        let mut actions = std::mem::take(&mut self.actions);
        actions.clear();
        let result = self.pool.handle(event, &mut actions);
        for action in &actions {
            self.execute(action, now_ns);
        }
        self.actions = actions;
        result.map_err(SimError::from)
    }

    fn model(&self, id: &ModelId) -> usize {
        self.by_id.get(id).copied().unwrap_or(0)
    }

    fn seq_index(seq: SeqId) -> usize {
        usize::try_from(seq.0).unwrap_or(usize::MAX)
    }

    /// When a load (`load`) or an eviction of `d` ns started at `now_ns` ends: at once while
    /// warming up (counted apart; a load's event still carries `d` for the estimates).
    fn transfer_end(&mut self, now_ns: u64, d: u64, load: bool) -> u64 {
        if !self.warming {
            return now_ns + d;
        }
        if load {
            self.warm_loads += 1;
        } else {
            self.warm_evictions += 1;
        }
        now_ns
    }

    fn execute(&mut self, action: &Action, now_ns: u64) {
        match action {
            Action::Load { id, model } => {
                let d = self.costs[self.model(model)].load_ns;
                let at = self.transfer_end(now_ns, d, true);
                self.set_transfer(
                    at,
                    Event::LoadFinished {
                        now_ns: at,
                        action: *id,
                        duration_ns: d,
                    },
                );
            }
            Action::Evict { id, model } => {
                let d = self.costs[self.model(model)].unload_ns;
                let d = self.transfer_end(now_ns, d, false) - now_ns;
                self.set_transfer(
                    now_ns + d,
                    Event::UnloadFinished {
                        now_ns: now_ns + d,
                        action: *id,
                    },
                );
            }
            Action::SaveKv { id, model, seq } => {
                let (d, bytes) = self.save_cost(model, *seq);
                self.set_transfer(
                    now_ns + d,
                    Event::KvSaved {
                        now_ns: now_ns + d,
                        action: *id,
                        bytes,
                    },
                );
            }
            Action::RestoreKv { id, model, seq } => {
                let d = self.restore_ns(model, *seq);
                self.set_transfer(
                    now_ns + d,
                    Event::KvRestored {
                        now_ns: now_ns + d,
                        action: *id,
                    },
                );
            }
            Action::Prefill {
                id,
                model,
                seqs,
                riders,
            } => {
                self.prefill(*id, self.model(model), seqs, riders, now_ns);
            }
            Action::Decode {
                id,
                model,
                seqs,
                steps,
            } => self.decode(*id, self.model(model), seqs, *steps, now_ns),
            Action::Release { .. } => {}
        }
    }

    /// A save's time and bytes: a batch preemption drops the cells and keeps the tokens.
    fn save_cost(&self, model: &ModelId, seq: SeqId) -> (u64, u64) {
        let s = &self.seqs[Self::seq_index(seq)];
        let tokens = u64::from(s.prompt_tokens) + u64::from(s.emitted);
        let costs = &self.costs[self.model(model)];
        if s.batch {
            (costs.save_ns(0), tokens * 4)
        } else {
            (costs.save_ns(tokens), tokens * costs.kv_bytes_per_token)
        }
    }

    /// A restore's time: a batch resume recomputes its tokens (a prefill of them).
    fn restore_ns(&self, model: &ModelId, seq: SeqId) -> u64 {
        let s = &self.seqs[Self::seq_index(seq)];
        let tokens = u64::from(s.prompt_tokens) + u64::from(s.emitted);
        let costs = &self.costs[self.model(model)];
        if s.batch {
            let t = as_f64(tokens);
            costs.prefill_ns(t, t * t)
        } else {
            costs.restore_ns(tokens)
        }
    }

    fn set_transfer(&mut self, at_ns: u64, event: Event) {
        assert!(
            self.transfer.is_none(),
            "the pool emitted two transfers at once"
        );
        self.transfer = Some(Pending { at_ns, event });
    }

    fn set_compute(&mut self, compute: Compute) {
        assert!(
            self.compute.is_none(),
            "the pool emitted two compute actions at once"
        );
        self.compute = Some(compute);
    }

    /// A prefill of `seqs`' prompts; each rider (a decoding sequence of the model) adds the
    /// profile's rider cost (`Costs::rider_ns`) and emits one token at the end too.
    fn prefill(
        &mut self,
        id: tidepool_pool::ActionId,
        model: usize,
        seqs: &[SeqId],
        riders: &[SeqId],
        now_ns: u64,
    ) {
        let (mut tokens, mut tokens_sq) = (0.0, 0.0);
        for seq in seqs {
            let t = f64::from(self.seqs[Self::seq_index(*seq)].prompt_tokens);
            tokens += t;
            tokens_sq += t * t;
        }
        let rider_indices: Vec<usize> = riders.iter().map(|s| Self::seq_index(*s)).collect();
        let (owed, rider_ctx) = self.turn_state(&rider_indices);
        let costs = &self.costs[model];
        let d = costs
            .prefill_ns(tokens, tokens_sq)
            .saturating_add(costs.rider_ns(owed.len(), rider_ctx))
            .max(1);
        let end = now_ns + d;
        let mut finished = Vec::new();
        for seq in seqs.iter().chain(riders) {
            let s = &mut self.seqs[Self::seq_index(*seq)];
            if s.emitted >= s.output_tokens {
                continue; // a rider owes nothing (the pool finishes a sequence at its last token)
            }
            if !record_token(s, end, self.slo) && !s.batch {
                self.missed_tokens += 1;
            }
            if s.emitted >= s.output_tokens {
                finished.push(SeqFinished {
                    seq: *seq,
                    tokens_emitted: s.emitted,
                });
            }
        }
        self.compute_busy_ns += d;
        self.set_compute(Compute::Done(Pending {
            at_ns: end,
            event: Event::StepFinished {
                now_ns: end,
                action: id,
                steps: 1,
                duration_ns: d,
                finished,
            },
        }));
    }

    fn decode(
        &mut self,
        id: tidepool_pool::ActionId,
        model: usize,
        seqs: &[SeqId],
        steps: u32,
        now_ns: u64,
    ) {
        let seqs: Vec<usize> = seqs.iter().map(|s| Self::seq_index(*s)).collect();
        let (steps, end_ns) = self.plan_decode(model, &seqs, now_ns, steps, None);
        self.set_compute(Compute::Decode(DecodeTurn {
            id,
            model,
            seqs,
            start_ns: now_ns,
            steps,
            end_ns,
        }));
    }

    /// The turn's sequences that still owe tokens, with how many, and their summed context.
    fn turn_state(&self, seqs: &[usize]) -> (Vec<(usize, u32)>, u64) {
        let owed = seqs
            .iter()
            .map(|&i| {
                (
                    i,
                    self.seqs[i]
                        .output_tokens
                        .saturating_sub(self.seqs[i].emitted),
                )
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        let ctx = seqs
            .iter()
            .map(|&i| u64::from(self.seqs[i].prompt_tokens) + u64::from(self.seqs[i].emitted))
            .sum();
        (owed, ctx)
    }

    /// Steps of a turn from `start_ns` and when they end, without booking any token: at most
    /// `steps`, fewer when every sequence finishes, and with `cut_ns` the turn ends at the
    /// first step boundary at or after it (after one step at least).
    fn plan_decode(
        &self,
        model: usize,
        seqs: &[usize],
        start_ns: u64,
        steps: u32,
        cut_ns: Option<u64>,
    ) -> (u32, u64) {
        let (owed, ctx) = self.turn_state(seqs);
        let span = TurnSpan {
            start_ns,
            steps,
            cut_ns,
        };
        walk_turn(&self.costs[model], owed, ctx, span, |_, _| {})
    }

    /// A request arrived during a decode turn: if the pool wants the turn cut short, it ends
    /// at the next step boundary instead.
    fn cut_decode(&mut self, now_ns: u64) {
        let Some(Compute::Decode(turn)) = &self.compute else {
            return;
        };
        if turn.end_ns <= now_ns || !self.pool.decode_yield_wanted() {
            return;
        }
        let (steps, end_ns) = self.plan_decode(
            turn.model,
            &turn.seqs,
            turn.start_ns,
            turn.steps,
            Some(now_ns),
        );
        if let Some(Compute::Decode(turn)) = &mut self.compute {
            turn.steps = steps;
            turn.end_ns = end_ns;
        }
    }

    /// Books the tokens of a completed turn (the same walk that planned it) and builds its
    /// completion event.
    fn finish_decode(&mut self, turn: &DecodeTurn) -> Event {
        let (owed, ctx) = self.turn_state(&turn.seqs);
        let span = TurnSpan {
            start_ns: turn.start_ns,
            steps: turn.steps,
            cut_ns: None,
        };
        let (costs, slo, seqs) = (&self.costs[turn.model], self.slo, &mut self.seqs);
        let mut finished = Vec::new();
        let mut late = 0_u64;
        let (done_steps, t) = walk_turn(costs, owed, ctx, span, |t, active| {
            for &(i, owed) in active {
                if !record_token(&mut seqs[i], t, slo) && !seqs[i].batch {
                    late += 1;
                }
                if owed == 1 {
                    finished.push(SeqFinished {
                        seq: SeqId(u64::try_from(i).unwrap_or(u64::MAX)),
                        tokens_emitted: seqs[i].emitted,
                    });
                }
            }
        });
        assert_eq!(
            t, turn.end_ns,
            "a decode turn booked other times than planned"
        );
        self.missed_tokens += late;
        let d = t - turn.start_ns;
        self.compute_busy_ns += d;
        Event::StepFinished {
            now_ns: t,
            action: turn.id,
            steps: done_steps,
            duration_ns: d,
            finished,
        }
    }
}

/// The online makespan's end: the last online token (batch requests are reported apart).
fn online_end_ns(seqs: &[SeqSim]) -> u64 {
    seqs.iter()
        .filter(|s| !s.batch)
        .map(|s| s.last_token_ns)
        .max()
        .unwrap_or(0)
}

/// Where a decode turn starts, its step budget and an optional cut time.
#[derive(Debug, Clone, Copy)]
struct TurnSpan {
    start_ns: u64,
    steps: u32,
    cut_ns: Option<u64>,
}

/// The one walk over a decode turn's steps, shared by planning and booking: each step costs
/// `decode_ns(active, ctx)`, every active sequence emits one token, a sequence leaves when it
/// owes none. `on_step(end, active)` sees each step's end and the active `(seq, owed)` pairs
/// before the step's token is counted. Returns the steps run and when the last one ended.
fn walk_turn(
    costs: &Costs,
    mut owed: Vec<(usize, u32)>,
    mut ctx: u64,
    span: TurnSpan,
    mut on_step: impl FnMut(u64, &[(usize, u32)]),
) -> (u32, u64) {
    let (mut t, mut done) = (span.start_ns, 0_u32);
    while done < span.steps && !owed.is_empty() {
        if done > 0 && span.cut_ns.is_some_and(|cut| t >= cut) {
            break;
        }
        let active = u64::try_from(owed.len()).unwrap_or(0);
        t += costs.decode_ns(as_f64(active), as_f64(ctx)).max(1);
        done += 1;
        on_step(t, &owed);
        ctx += active;
        owed.retain_mut(|(_, n)| {
            *n -= 1;
            *n > 0
        });
    }
    (done, t)
}

/// Books token `emitted` of `s` at `t`: the per-token deadline and the lenient score. True if
/// it was on time.
fn record_token(s: &mut SeqSim, t: u64, slo: Slo) -> bool {
    let k = s.emitted;
    let on_time = t <= s.arrival_ns + slo.ttft_ns + u64::from(k) * slo.tbt_ns;
    if on_time {
        s.on_time += 1;
    }
    let lenient_deadline = s.ref_ns + u64::from(k - s.ref_k) * slo.tbt_ns;
    if t <= lenient_deadline {
        s.good_ns += t - s.last_token_ns;
    } else {
        s.ref_ns = t;
        s.ref_k = k;
    }
    if k == 0 {
        s.first_token_ns = Some(t);
    }
    s.last_token_ns = t;
    s.emitted += 1;
    on_time
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example in Aegaeon's `compute_slo`: tokens at 3, 6, 7, 8 s with SLOs
    /// (TTFT 3 s, TBT 2 s) score 5/8.
    #[test]
    fn lenient_score_matches_aegaeon_example() {
        let s_ns = 1_000_000_000;
        let slo = Slo {
            ttft_ns: 3 * s_ns,
            tbt_ns: 2 * s_ns,
        };
        let mut s = SeqSim {
            output_tokens: 4,
            ref_ns: 3 * s_ns,
            ..SeqSim::default()
        };
        for t in [3, 6, 7, 8] {
            record_token(&mut s, t * s_ns, slo);
        }
        assert!((s.lenient_score() - 5.0 / 8.0).abs() < 1e-12);
        // Per-token deadlines 3, 5, 7, 9: token 1 (at 6) is late.
        assert_eq!(s.on_time, 3);
    }
}
