//! Hand-written scenarios for the pool's contract: admission errors the gateway maps to HTTP
//! codes, the status snapshot, the swap-lru victim rule, and token-level preemption with
//! save/restore. Each drives the pool by hand, checking the exact actions it emits.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]

use tidepool_pool::ModelId;
use tidepool_pool::{
    Action, ActionId, CostEstimate, Event, ModelSpec, Pool, PoolConfig, PoolError, PoolPolicy,
    Residency, SeqFinished, SeqId,
};

const MIB: u64 = 1024 * 1024;

fn model(name: &str, weights_mib: u64) -> ModelSpec {
    ModelSpec {
        id: ModelId::new(name).unwrap(),
        weights_bytes: weights_mib * MIB,
        ctx_bytes: 10 * MIB,
        kv_bytes_per_token: 1000,
        seqs_max: 2,
        seq_tokens_max: 1000,
        pin: false,
        keep_alive_ms: None,
        estimate: CostEstimate {
            load_ns: 100_000_000,
            decode_step_ns: 10_000_000,
            prefill_ns_per_token: 100_000,
            kv_transfer_ps_per_byte: 100,
        },
    }
}

fn arrive(
    pool: &mut Pool,
    now_ns: u64,
    seq: u64,
    name: &str,
    max_tokens: u32,
) -> Result<Vec<Action>, PoolError> {
    let mut out = Vec::new();
    let event = Event::RequestArrived {
        now_ns,
        seq: SeqId(seq),
        model: ModelId::new(name).unwrap(),
        prompt_tokens: 10,
        max_tokens,
        class: tidepool_pool::RequestClass::Online,
        cached_tokens: 0,
    };
    pool.handle(event, &mut out).map(|()| out)
}

fn feed(pool: &mut Pool, event: Event) -> Vec<Action> {
    let mut out = Vec::new();
    pool.handle(event, &mut out).unwrap();
    out
}

/// Runs request `seq` of model `name` (one output token) to completion where the model is cold
/// and memory is free: its load, then a prefill that finishes it, each taking `step_ns`.
/// Returns the clock after.
#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn run_one(pool: &mut Pool, mut now: u64, seq: u64, name: &str, step_ns: u64) -> u64 {
    let out = arrive(pool, now, seq, name, 1).unwrap();
    let [Action::Load { id, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    now += step_ns;
    let event = Event::LoadFinished {
        now_ns: now,
        action: *id,
        duration_ns: step_ns,
    };
    let out = feed(pool, event);
    let [Action::Prefill { id, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    now += step_ns;
    let finished = vec![SeqFinished {
        seq: SeqId(seq),
        tokens_emitted: 1,
    }];
    let event = Event::StepFinished {
        now_ns: now,
        action: *id,
        steps: 1,
        duration_ns: step_ns,
        finished,
    };
    feed(pool, event);
    now
}

#[test]
fn admission_errors_are_typed() {
    let mut cfg = PoolConfig::new(
        PoolPolicy::SwapLru,
        100 * MIB,
        vec![model("small", 50), model("huge", 500)],
    );
    cfg.knobs.admission_queue_len_max = 1;
    let mut pool = Pool::new(cfg).unwrap();
    assert!(matches!(
        arrive(&mut pool, 0, 1, "nope", 5),
        Err(PoolError::ModelNotFound { .. })
    ));
    assert!(matches!(
        arrive(&mut pool, 0, 1, "huge", 5),
        Err(PoolError::ModelTooLarge { .. })
    ));
    assert!(matches!(
        arrive(&mut pool, 0, 1, "small", 995),
        Err(PoolError::RequestTooLong { .. })
    ));
    let out = arrive(&mut pool, 0, 1, "small", 5).unwrap();
    assert!(matches!(out.as_slice(), [Action::Load { .. }]));
    assert!(matches!(
        arrive(&mut pool, 0, 2, "small", 5),
        Err(PoolError::QueueFull { .. })
    ));
    assert!(matches!(
        arrive(&mut pool, 0, 1, "small", 5),
        Err(PoolError::QueueFull { .. } | PoolError::DuplicateSeq { .. })
    ));
    assert_eq!(pool.counters().requests_rejected, 5);
}

#[test]
fn status_reports_state_queue_and_memory() {
    let cfg = PoolConfig::new(PoolPolicy::SwapLru, 100 * MIB, vec![model("a", 50)]);
    let mut pool = Pool::new(cfg).unwrap();
    let out = arrive(&mut pool, 5, 1, "a", 3).unwrap();
    let Action::Load { id, .. } = out[0].clone() else {
        panic!("expected a load, got {out:?}")
    };
    let status = pool.status();
    assert_eq!(status.models[0].state, Residency::Loading);
    assert_eq!(status.models[0].queued, 1);
    assert_eq!(status.models[0].memory_bytes, 60 * MIB);
    assert_eq!(status.models[0].last_switch_ns, Some(5));
    let out = feed(
        &mut pool,
        Event::LoadFinished {
            now_ns: 10,
            action: id,
            duration_ns: 5,
        },
    );
    let [
        Action::Prefill {
            id: prefill, seqs, ..
        },
    ] = out.as_slice()
    else {
        panic!("expected the prefill, got {out:?}")
    };
    assert_eq!(seqs, &[SeqId(1)]);
    let status = pool.status();
    assert_eq!(status.models[0].state, Residency::Resident);
    assert_eq!(
        (status.models[0].queued, status.models[0].in_flight),
        (0, 1)
    );
    // The load was in flight 5..10 ns; its 5 ns timing moved the load estimate 1/8 of the way.
    assert_eq!(status.counters.in_flight_ns.load, 5);
    assert_eq!(status.models[0].last_used_ns, 10);
    let load_estimate = status.models[0].estimate.load_ns;
    assert!(
        load_estimate < 100_000_000 && load_estimate > 80_000_000,
        "{load_estimate}"
    );
    assert_eq!(status.models[0].estimate.prefill_ns_per_token, 100_000);
    feed(
        &mut pool,
        Event::StepFinished {
            now_ns: 40,
            action: *prefill,
            steps: 1,
            duration_ns: 30,
            finished: Vec::new(),
        },
    );
    let times = pool.status().counters.in_flight_ns;
    assert_eq!((times.prefill, times.decode, times.load), (30, 0, 5));
}

/// swap-lru evicts the least recently used idle model, never a busy one, and never saves KV.
#[test]
fn swap_lru_evicts_least_recently_used_idle_model() {
    let cfg = PoolConfig::new(
        PoolPolicy::SwapLru,
        130 * MIB,
        vec![model("a", 50), model("b", 50), model("c", 50)],
    );
    let mut pool = Pool::new(cfg).unwrap();
    let mut now = 0;
    // Run one request on a, then one on b, to completion.
    for (seq, name) in [(1, "a"), (2, "b")] {
        now = run_one(&mut pool, now, seq, name, 100);
    }
    // c needs room: a finished first, so a goes.
    let out = arrive(&mut pool, now, 3, "c", 1).unwrap();
    assert!(
        matches!(&out[..], [Action::Evict { model, .. }] if model.as_str() == "a"),
        "{out:?}"
    );
    assert_eq!(pool.counters().kv_saves, 0);
}

/// A minimal driver: completes every engine action `step_ns` after the previous one, in order,
/// until nothing is pending. Returns every action emitted.
fn drive_serially(pool: &mut Pool, pending: Vec<Action>, step_ns: u64) -> Vec<Action> {
    drive_from(pool, pending, 0, step_ns).0
}

/// [`drive_serially`] from the clock value `now`; also returns the clock after.
fn drive_from(pool: &mut Pool, pending: Vec<Action>, now: u64, step_ns: u64) -> (Vec<Action>, u64) {
    let compute = |action: &Action, now: u64| match *action {
        Action::Decode { id, steps, .. } => step_event(now, id, steps, 1),
        Action::Prefill { id, .. } => step_event(now, id, 1, 1),
        ref other => transfer_done(other, now),
    };
    drive(pool, pending, now, step_ns, compute, |_, _, _, _, _| {
        Vec::new()
    })
}

/// The completion at `now_ns` of a prefill or decode action that ran `steps` steps in
/// `duration_ns` and finished nothing.
fn step_event(now_ns: u64, action: ActionId, steps: u32, duration_ns: u64) -> Event {
    Event::StepFinished {
        now_ns,
        action,
        steps,
        duration_ns,
        finished: Vec::new(),
    }
}

/// Completes every engine action `step_ns` after the previous one, in order, from the clock
/// value `now` until nothing is pending: transfers at once, prefills and decodes as `compute`
/// reports them. After each completion `after` (given the pool, the action, its completion,
/// the clock and how many actions ran) may start more work, such as an arrival. Returns every
/// action emitted and the clock after.
fn drive(
    pool: &mut Pool,
    mut pending: Vec<Action>,
    mut now: u64,
    step_ns: u64,
    mut compute: impl FnMut(&Action, u64) -> Event,
    mut after: impl FnMut(&mut Pool, &Action, &Event, u64, usize) -> Vec<Action>,
) -> (Vec<Action>, u64) {
    let mut log = Vec::new();
    for _ in 0..10_000 {
        let Some(action) = pending.first().cloned() else {
            break;
        };
        pending.remove(0);
        now += step_ns;
        log.push(action.clone());
        let event = match action {
            Action::Prefill { .. } | Action::Decode { .. } => compute(&action, now),
            Action::Release { .. } => continue,
            ref transfer => transfer_done(transfer, now),
        };
        pending.extend(feed(pool, event.clone()));
        pending.extend(after(pool, &action, &event, now, log.len()));
    }
    (log, now)
}

/// The completion at `now` of a transfer (load, evict, KV save or restore).
#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn transfer_done(action: &Action, now: u64) -> Event {
    match *action {
        Action::Load { id, .. } => Event::LoadFinished {
            now_ns: now,
            action: id,
            duration_ns: 1,
        },
        Action::Evict { id, .. } => Event::UnloadFinished {
            now_ns: now,
            action: id,
        },
        Action::SaveKv { id, .. } => Event::KvSaved {
            now_ns: now,
            action: id,
            bytes: 1,
        },
        Action::RestoreKv { id, .. } => Event::KvRestored {
            now_ns: now,
            action: id,
        },
        _ => panic!("not a transfer: {action:?}"),
    }
}

/// Drives the pool serially until it is idle with `finished` requests done; the KV saves made.
fn saves_to_completion(
    pool: &mut Pool,
    pending: Vec<Action>,
    step_ns: u64,
    finished: u64,
) -> usize {
    let log = drive_serially(pool, pending, step_ns);
    assert!(pool.is_idle(), "{:?}", pool.status());
    assert_eq!(
        pool.counters().requests_finished,
        finished,
        "every request finishes"
    );
    log.iter()
        .filter(|a| matches!(a, Action::SaveKv { .. }))
        .count()
}

/// `token` frees a slot of a model whose slots all hold its own sequences (saving one) only for
/// a request whose first token is at risk, and only when the saved sequence has the slack to wait
/// out the newcomer's prefill and its own transfers. With every sequence behind its schedule
/// (1 ms per token) none can afford it: the third request waits for a slot, as on a dedicated engine, and
/// nothing is saved. With a generous per-token deadline the same arrivals are served by saving
/// one (processor sharing between the model's own sequences).
#[test]
fn token_saves_a_models_own_sequence_only_when_it_can_wait() {
    let run = |tbt_slo_ms: u64| {
        let mut cfg = PoolConfig::new(PoolPolicy::Token, 200 * MIB, vec![model("a", 50)]);
        cfg.kv_saved_bytes_max = 20 * MIB;
        (cfg.knobs.ttft_slo_ms, cfg.knobs.tbt_slo_ms) = (1, tbt_slo_ms);
        let mut pool = Pool::new(cfg).unwrap();
        let mut pending = Vec::new();
        for seq in 1..=3 {
            pending.extend(arrive(&mut pool, 0, seq, "a", 50).unwrap());
        }
        // Each action takes 100 ms: a 16-step decode turn puts a sequence 16 tokens behind a
        // 1 ms-per-token schedule, and 1,584 ms ahead of a 10 s one.
        saves_to_completion(&mut pool, pending, 100_000_000, 3)
    };
    assert_eq!(run(1), 0, "no sequence has slack: the newcomer waits");
    assert!(run(10_000) > 0, "sequences with slack make room");
}

/// Where transfers run beside compute (a GPU), an own-slot preemption starts an extra chunk of
/// the model, and each of the chunks' turns then saves one chunk and restores another: free only
/// while other models' decode turns hide those transfers. So the arrivals of the test above, with
/// the same generous deadlines, are served with no save when the model is alone (the newcomer
/// waits for a slot, as on a dedicated engine), and by saving one when another model has decode
/// work to run meanwhile. Fails if the rule is dropped (the lone model saves) or applied
/// whatever the other models do (nothing saves).
#[test]
fn token_on_a_gpu_saves_its_own_sequence_only_when_other_turns_hide_the_chunk() {
    let run = |beside_other: bool| {
        let mut models = vec![model("a", 50)];
        if beside_other {
            models.push(model("b", 50));
        }
        let mut cfg = PoolConfig::new(PoolPolicy::Token, 200 * MIB, models);
        cfg.kv_saved_bytes_max = 20 * MIB;
        cfg.overlap_transfers = true;
        (cfg.knobs.ttft_slo_ms, cfg.knobs.tbt_slo_ms) = (1, 10_000);
        let mut pool = Pool::new(cfg).unwrap();
        let mut pending = Vec::new();
        let mut requests = 0;
        if beside_other {
            for seq in 11..=12 {
                pending.extend(arrive(&mut pool, 0, seq, "b", 400).unwrap());
                requests += 1;
            }
        }
        for seq in 1..=3 {
            pending.extend(arrive(&mut pool, 0, seq, "a", 50).unwrap());
            requests += 1;
        }
        saves_to_completion(&mut pool, pending, 100_000_000, requests)
    };
    assert_eq!(run(false), 0, "alone, the newcomer waits for a slot");
    assert!(
        run(true) > 0,
        "beside b's decode turns, a's extra chunk is hidden"
    );
}

/// `token` with two models that do not fit together (a 90 MiB budget, a 20 MiB saved pool),
/// switches allowed 1 ms apart and 1 ms SLOs (every deadline at risk), `adjust` applied; a
/// 400-token request on `a`, then one on `b`, both at 0. Returns the pool and its first actions.
fn two_models_racing(adjust: impl FnOnce(&mut PoolConfig)) -> (Pool, Vec<Action>) {
    let mut cfg = PoolConfig::new(
        PoolPolicy::Token,
        90 * MIB,
        vec![model("a", 50), model("b", 50)],
    );
    cfg.kv_saved_bytes_max = 20 * MIB;
    (
        cfg.knobs.turn_quota_ms_max,
        cfg.knobs.ttft_slo_ms,
        cfg.knobs.tbt_slo_ms,
    ) = (1, 1, 1);
    adjust(&mut cfg);
    let mut pool = Pool::new(cfg).unwrap();
    let mut pending = arrive(&mut pool, 0, 1, "a", 400).unwrap();
    pending.extend(arrive(&mut pool, 0, 2, "b", 400).unwrap());
    (pool, pending)
}

/// Two models that do not fit together, a long request on `a`, then one on `b`. Where a load
/// stalls compute (a CPU, the default) `b`'s request waits for `a` to finish rather than
/// preempting it, until it has waited `switch_wait_ms_max`; with a 1 ms limit, `a`'s sequence
/// is saved for it. Fails in both directions if the wait is dropped or never ends.
#[test]
fn token_on_a_cpu_waits_for_a_model_to_go_idle_before_preempting_it() {
    let run = |switch_wait_ms_max: u64| {
        let (mut pool, pending) = two_models_racing(|cfg| {
            cfg.knobs.switch_wait_ms_max = switch_wait_ms_max;
        });
        saves_to_completion(&mut pool, pending, 1_000_000, 2)
    };
    assert_eq!(run(20_000), 0, "b waits for a to finish");
    assert!(run(1) > 0, "past the limit, b's load preempts a");
}

/// token preempts a decoding model where transfers run beside compute (a GPU): its sequence
/// is saved, the model evicted, and later restored before it decodes again.
#[test]
fn token_preempts_with_save_and_restore() {
    // Every deadline at risk: the pool preempts and alternates between the models instead of
    // finishing one first.
    let (mut pool, pending) = two_models_racing(|cfg| cfg.overlap_transfers = true);
    let log = drive_serially(&mut pool, pending, 1_000_000);
    assert!(pool.is_idle(), "{:?}", pool.status());
    let saves = log
        .iter()
        .filter(|a| matches!(a, Action::SaveKv { .. }))
        .count();
    let restores = log
        .iter()
        .filter(|a| matches!(a, Action::RestoreKv { .. }))
        .count();
    assert!(
        saves > 0 && saves == restores,
        "saves {saves} restores {restores}"
    );
    assert_eq!(pool.counters().requests_finished, 2);
}

/// keep-alive scales an idle model to zero at `next_timer_ns`; a pinned model stays.
#[test]
fn keep_alive_scales_idle_models_to_zero_but_not_pinned_ones() {
    let mut idle = model("idle", 20);
    idle.keep_alive_ms = Some(1000);
    let mut pinned = model("pinned", 20);
    pinned.keep_alive_ms = Some(1000);
    pinned.pin = true;
    let cfg = PoolConfig::new(PoolPolicy::SwapLru, 200 * MIB, vec![idle, pinned]);
    let mut pool = Pool::new(cfg).unwrap();
    let mut now = 0;
    for (seq, name) in [(1, "idle"), (2, "pinned")] {
        let out = arrive(&mut pool, now, seq, name, 1).unwrap();
        let Action::Load { id, .. } = out[0].clone() else {
            panic!("{out:?}")
        };
        now += 10;
        let out = feed(
            &mut pool,
            Event::LoadFinished {
                now_ns: now,
                action: id,
                duration_ns: 10,
            },
        );
        let Action::Prefill { id, .. } = out[0].clone() else {
            panic!("{out:?}")
        };
        now += 10;
        let finished = vec![SeqFinished {
            seq: SeqId(seq),
            tokens_emitted: 1,
        }];
        feed(
            &mut pool,
            Event::StepFinished {
                now_ns: now,
                action: id,
                steps: 1,
                duration_ns: 10,
                finished,
            },
        );
    }
    let at = pool.next_timer_ns().unwrap();
    assert_eq!(
        at,
        20 + 1_000_000_000,
        "idle since its request finished at t = 20 ns"
    );
    let out = feed(&mut pool, Event::Tick { now_ns: at });
    let [Action::Evict { id, model }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(model.as_str(), "idle");
    feed(
        &mut pool,
        Event::UnloadFinished {
            now_ns: at + 1,
            action: *id,
        },
    );
    assert_eq!(pool.next_timer_ns(), None, "the pinned model never expires");
    let states: Vec<Residency> = pool.status().models.iter().map(|m| m.state).collect();
    assert_eq!(states, [Residency::Cold, Residency::Resident]);
}

/// Reports a prefill or decode action done, with no sequence finished.
fn step_done(pool: &mut Pool, now_ns: u64, action: ActionId, steps: u32) -> Vec<Action> {
    feed(pool, step_event(now_ns, action, steps, 10))
}

/// A `dedicated` pool with every model loaded (one transfer at a time, at t = 1, 2, … ns).
fn loaded(cfg: PoolConfig) -> Pool {
    assert_eq!(
        cfg.policy,
        PoolPolicy::Dedicated,
        "only dedicated loads at once"
    );
    let mut pool = Pool::new(cfg).unwrap();
    let mut out = feed(&mut pool, Event::Tick { now_ns: 0 });
    let mut now_ns = 0;
    while let [Action::Load { id, .. }] = out.as_slice() {
        now_ns += 1;
        out = feed(
            &mut pool,
            Event::LoadFinished {
                now_ns,
                action: *id,
                duration_ns: 1,
            },
        );
    }
    assert!(out.is_empty(), "{out:?}");
    let status = pool.status();
    assert!(
        status.models.iter().all(|m| m.state == Residency::Resident),
        "{status:?}"
    );
    pool
}

/// A request of the model whose turn is running asks the driver to cut the turn at the next
/// step (continuous batching within a model); not when the model has no free slot, and not
/// while another model has sequences decoding (its turn would be delayed).
#[test]
fn decode_yields_to_a_waiting_request_of_the_same_model_only() {
    let cfg = PoolConfig::new(
        PoolPolicy::Dedicated,
        100 * MIB,
        vec![model("a", 10), model("b", 10)],
    );
    let mut pool = loaded(cfg);
    let out = arrive(&mut pool, 20, 1, "a", 100).unwrap();
    let [Action::Prefill { id, .. }] = out.as_slice() else {
        panic!("expected a prefill, got {out:?}")
    };
    assert!(!pool.decode_yield_wanted(), "nothing decodes yet");
    let out = step_done(&mut pool, 30, *id, 1);
    let [Action::Decode { id, steps, .. }] = out.as_slice() else {
        panic!("expected a decode turn, got {out:?}")
    };
    assert!(*steps > 1);
    assert!(!pool.decode_yield_wanted(), "nothing waits");
    assert!(arrive(&mut pool, 35, 2, "a", 100).unwrap().is_empty());
    assert!(
        pool.decode_yield_wanted(),
        "a request of `a` waits, `a` has a free slot"
    );
    // The driver cuts the turn after 2 steps; the waiting request is prefilled next.
    let out = step_done(&mut pool, 40, *id, 2);
    let [
        Action::Prefill {
            id, seqs, riders, ..
        },
    ] = out.as_slice()
    else {
        panic!("expected the waiting request's prefill, got {out:?}")
    };
    assert_eq!(seqs, &[SeqId(2)]);
    assert!(riders.is_empty(), "riders are off by default");
    let out = step_done(&mut pool, 50, *id, 1);
    let [Action::Decode { seqs, .. }] = out.as_slice() else {
        panic!("expected one turn of both sequences, got {out:?}")
    };
    assert_eq!(seqs, &[SeqId(1), SeqId(2)]);
    // Both slots of `a` are taken now: a third request must wait for the turn to end.
    assert!(arrive(&mut pool, 55, 3, "a", 100).unwrap().is_empty());
    assert!(!pool.decode_yield_wanted(), "`a` has no free slot");
    // Yielding is for the turn's own model: a request of `b` waits for the turn's end.
    assert!(arrive(&mut pool, 56, 4, "b", 100).unwrap().is_empty());
    assert!(
        !pool.decode_yield_wanted(),
        "`b`'s request waits for the turn"
    );
}

/// A turn is not cut for a request whose prefill would not run next: under swap-lru with
/// head-of-line blocking, an older request of a cold model holds the queue, so cutting the
/// running model's turn for its own newer request would only shorten the turn.
#[test]
fn decode_does_not_yield_when_another_prefill_comes_first() {
    let mut cfg = PoolConfig::new(
        PoolPolicy::SwapLru,
        100 * MIB,
        vec![model("a", 50), model("b", 50)],
    );
    cfg.knobs.hol_blocking = true;
    let mut pool = Pool::new(cfg).unwrap();
    let out = arrive(&mut pool, 0, 1, "a", 100).unwrap();
    let [Action::Load { id, .. }] = out.as_slice() else {
        panic!("expected a load, got {out:?}")
    };
    let load_done = Event::LoadFinished {
        now_ns: 10,
        action: *id,
        duration_ns: 10,
    };
    let out = feed(&mut pool, load_done);
    let [Action::Prefill { id, .. }] = out.as_slice() else {
        panic!("expected a prefill, got {out:?}")
    };
    let out = step_done(&mut pool, 20, *id, 1);
    assert!(matches!(out.as_slice(), [Action::Decode { .. }]), "{out:?}");
    // `b` does not fit beside `a` (which is busy): its request waits at the head of the queue.
    assert!(arrive(&mut pool, 25, 2, "b", 100).unwrap().is_empty());
    assert!(arrive(&mut pool, 30, 3, "a", 100).unwrap().is_empty());
    assert!(
        !pool.decode_yield_wanted(),
        "the next prefill is `b`'s, held by its load"
    );
}

/// A prefill carries its model's decoding sequences as riders: each emits one token in the
/// prefill's batch, counted towards its `max_tokens` (a rider can finish there) and in
/// `rider_tokens`. Another model's sequences never ride, and with `prefill_riders` off nothing
/// does.
#[test]
fn prefill_carries_the_models_decoding_sequences() {
    for riders_on in [true, false] {
        let mut cfg = PoolConfig::new(
            PoolPolicy::Dedicated,
            100 * MIB,
            vec![model("a", 10), model("b", 10)],
        );
        cfg.knobs.prefill_riders = riders_on;
        let mut pool = loaded(cfg);
        // `a`'s request 1 (3 tokens) decodes; request 2 of `a` arrives and cuts the turn after
        // one step (request 1: 2 of 3 tokens).
        let out = arrive(&mut pool, 10, 1, "a", 3).unwrap();
        let [Action::Prefill { id, riders, .. }] = out.as_slice() else {
            panic!("expected a prefill, got {out:?}")
        };
        assert!(riders.is_empty(), "nothing decodes yet");
        let out = step_done(&mut pool, 20, *id, 1);
        let [Action::Decode { id, .. }] = out.as_slice() else {
            panic!("expected `a`'s turn, got {out:?}")
        };
        assert!(arrive(&mut pool, 25, 2, "a", 100).unwrap().is_empty());
        let out = step_done(&mut pool, 30, *id, 1);
        let [
            Action::Prefill {
                id, seqs, riders, ..
            },
        ] = out.as_slice()
        else {
            panic!("expected request 2's prefill, got {out:?}")
        };
        assert_eq!(seqs, &[SeqId(2)]);
        // With riders, request 1's third token rides in the prefill: it finishes there.
        let rode = usize::from(riders_on);
        assert_eq!(riders, &[SeqId(1)][..rode]);
        let out = step_done(&mut pool, 40, *id, 1);
        assert_eq!(pool.counters().rider_tokens, u64::from(riders_on));
        assert_eq!(pool.counters().requests_finished, u64::from(riders_on));
        let [Action::Decode { id, seqs, .. }] = out.as_slice() else {
            panic!("expected `a`'s next turn, got {out:?}")
        };
        assert_eq!(
            seqs,
            &[SeqId(1), SeqId(2)][rode..],
            "request 1 is done if it rode"
        );
        // `b`'s request does not cut `a`'s turn, and `a`'s sequences never ride in `b`'s batch.
        assert!(arrive(&mut pool, 45, 3, "b", 100).unwrap().is_empty());
        let out = step_done(&mut pool, 50, *id, 1);
        let [Action::Prefill { seqs, riders, .. }] = out.as_slice() else {
            panic!("expected `b`'s prefill, got {out:?}")
        };
        assert_eq!(seqs, &[SeqId(3)]);
        assert!(
            riders.is_empty(),
            "`a`'s sequences cannot ride in `b`'s batch"
        );
        pool.check_invariants();
    }
}

/// A model of the paged-KV scenarios: 40 MiB of weights, 1 MiB of fixed buffers, 10 kB of KV
/// per token, two slots of up to 1000 tokens.
fn paged_model(name: &str) -> ModelSpec {
    ModelSpec {
        ctx_bytes: MIB,
        kv_bytes_per_token: 10_000,
        ..model(name, 40)
    }
}

fn arrive_long(pool: &mut Pool, now_ns: u64, seq: u64, name: &str, max_tokens: u32) -> Vec<Action> {
    arrive(pool, now_ns, seq, name, max_tokens).unwrap()
}

/// With paged KV a resident model costs its weights and buffers; each sequence is charged its
/// worst-case KV (`prompt + max_tokens`) while it holds a slot, and no longer once it finishes.
/// Both models fit at once, which their up-front contexts (2 × 1000 tokens each) would not.
#[test]
fn paged_kv_charges_each_sequence_while_it_holds_a_slot() {
    let models = vec![paged_model("a"), paged_model("b")];
    let mut cfg = PoolConfig::new(PoolPolicy::SwapLru, 100 * MIB, models);
    cfg.kv_paged = true;
    cfg.overlap_transfers = true;
    let mut pool = Pool::new(cfg).unwrap();
    let seq_bytes = paged_model("a").saved_bytes(100);
    let out = arrive_long(&mut pool, 0, 1, "a", 90);
    let [Action::Load { id, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    let out = feed(
        &mut pool,
        Event::LoadFinished {
            now_ns: 1,
            action: *id,
            duration_ns: 1,
        },
    );
    let [Action::Prefill { id: prefill, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(pool.status().memory_bytes_used, 41 * MIB + seq_bytes);
    let out = arrive_long(&mut pool, 2, 2, "b", 90);
    assert!(
        matches!(out.as_slice(), [Action::Load { model, .. }] if model.as_str() == "b"),
        "b loads beside a: {out:?}"
    );
    let out = feed(
        &mut pool,
        Event::StepFinished {
            now_ns: 3,
            action: *prefill,
            steps: 1,
            duration_ns: 1,
            finished: vec![SeqFinished {
                seq: SeqId(1),
                tokens_emitted: 1,
            }],
        },
    );
    assert!(out.is_empty(), "{out:?}");
    let status = pool.status();
    assert_eq!(status.memory_bytes_used, 2 * 41 * MIB, "{status:?}");
    assert_eq!(status.models[0].memory_bytes, 41 * MIB);

    // The same models with their KV allocated up front do not fit together.
    let up_front = |name| ModelSpec {
        ctx_bytes: MIB + 2 * 1000 * 10_000,
        ..paged_model(name)
    };
    let mut cfg = PoolConfig::new(
        PoolPolicy::SwapLru,
        100 * MIB,
        vec![up_front("a"), up_front("b")],
    );
    cfg.overlap_transfers = true;
    let mut pool = Pool::new(cfg).unwrap();
    let out = arrive_long(&mut pool, 0, 1, "a", 90);
    let [Action::Load { id, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    feed(
        &mut pool,
        Event::LoadFinished {
            now_ns: 1,
            action: *id,
            duration_ns: 1,
        },
    );
    let out = arrive_long(&mut pool, 2, 2, "b", 90);
    assert!(out.is_empty(), "b waits for a to finish: {out:?}");
}

/// swap-lru with paged KV: a resident model whose next request's KV does not fit evicts the
/// least recently used idle model to make room, then prefills.
#[test]
fn swap_lru_paged_evicts_an_idle_model_for_kv_room() {
    let models = vec![paged_model("a"), paged_model("b")];
    let mut cfg = PoolConfig::new(PoolPolicy::SwapLru, 90 * MIB, models);
    cfg.kv_paged = true;
    let mut pool = Pool::new(cfg).unwrap();
    let mut now = 0;
    for (seq, name) in [(1, "a"), (2, "b")] {
        now = run_one(&mut pool, now, seq, name, 1);
    }
    // 900 tokens of KV (9 MB) do not fit the 8 MiB left beside both models: a (idle, used
    // first) goes, then b prefills.
    let out = arrive_long(&mut pool, now, 3, "b", 890);
    assert!(
        matches!(out.as_slice(), [Action::Evict { model, .. }] if model.as_str() == "a"),
        "{out:?}"
    );
    let [Action::Evict { id, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    let out = feed(
        &mut pool,
        Event::UnloadFinished {
            now_ns: now + 1,
            action: *id,
        },
    );
    assert!(
        matches!(out.as_slice(), [Action::Prefill { model, .. }] if model.as_str() == "b"),
        "{out:?}"
    );
}

/// Request `seq` of model "a" with a `prompt_tokens` prompt of which the driver expects
/// `cached_tokens` to be in the engine's KV already.
fn arrive_cached(
    pool: &mut Pool,
    now_ns: u64,
    seq: u64,
    prompt_tokens: u32,
    cached_tokens: u32,
) -> Vec<Action> {
    let mut out = Vec::new();
    let event = Event::RequestArrived {
        now_ns,
        seq: SeqId(seq),
        model: ModelId::new("a").unwrap(),
        prompt_tokens,
        max_tokens: 10,
        class: tidepool_pool::RequestClass::Online,
        cached_tokens,
    };
    pool.handle(event, &mut out).unwrap();
    out
}

/// `prefill_tokens_max` bounds the tokens a prefill computes: prompts the driver expects to
/// find mostly cached (a shared system prompt) go in one group where whole prompts would not
/// fit in one, and a hint of the whole prompt still leaves its last token to compute.
#[test]
fn prefill_groups_count_only_the_prompt_tokens_not_cached() {
    let two = vec![SeqId(2), SeqId(3)];
    let three = vec![SeqId(2), SeqId(3), SeqId(4)];
    for (cached, group) in [(0, two), (350, three.clone()), (400, three)] {
        let spec = ModelSpec {
            seqs_max: 4,
            ..model("a", 10)
        };
        let mut cfg = PoolConfig::new(PoolPolicy::Dedicated, 100 * MIB, vec![spec]);
        cfg.knobs.prefill_tokens_max = 1000;
        let mut pool = loaded(cfg);
        let out = arrive_cached(&mut pool, 20, 1, 400, cached);
        let [Action::Prefill { id, .. }] = out.as_slice() else {
            panic!("expected the first request's prefill, got {out:?}")
        };
        for seq in 2..=4 {
            let out = arrive_cached(&mut pool, 20 + seq, seq, 400, cached);
            assert!(out.is_empty(), "the engine is busy: {out:?}");
        }
        let event = Event::StepFinished {
            now_ns: 30,
            action: *id,
            steps: 1,
            duration_ns: 10,
            finished: vec![SeqFinished {
                seq: SeqId(1),
                tokens_emitted: 1,
            }],
        };
        let out = feed(&mut pool, event);
        let [Action::Prefill { seqs, .. }] = out.as_slice() else {
            panic!("expected the queued requests' prefill, got {out:?}")
        };
        assert_eq!(seqs, &group, "{cached} of 400 tokens cached");
        pool.check_invariants();
    }
}

/// Completes a prefill (`steps` = 1) or decode action over `seqs`: each runs until it owes no
/// more tokens (`owed`: tokens still due per request), the action as long as its longest.
fn step_owed(
    owed: &mut std::collections::BTreeMap<u64, u32>,
    now_ns: u64,
    action: ActionId,
    seqs: &[SeqId],
    steps: u32,
) -> Event {
    let steps = seqs
        .iter()
        .map(|s| owed[&s.0].min(steps))
        .max()
        .unwrap_or(0);
    let mut finished = Vec::new();
    for seq in seqs {
        let left = owed.get_mut(&seq.0).unwrap();
        *left -= (*left).min(steps);
        if *left == 0 {
            finished.push(SeqFinished {
                seq: *seq,
                tokens_emitted: 1,
            });
        }
    }
    Event::StepFinished {
        now_ns,
        action,
        steps,
        duration_ns: 1_000_000,
        finished,
    }
}

/// Belady eviction counts only turns that still have sequences: a model whose requests all
/// finished is idle, however near its spent turn sits in the round. Four models fit and decode
/// in one round `a`, `b`, `c`, `e`; `a`'s request finishes in its turn, and while `c`'s turn
/// runs a request for a fifth model `d` arrives. When `c`'s turn ends, `e`'s is next, then (the
/// round wrapping) `a`'s spent one, `b`'s and `c`'s, so counting the spent turn made `c` the
/// victim: its sequence was saved and the idle `a` stayed. `d`'s load goes at once (an idle
/// model can make room) and takes `a`'s place; no sequence is saved.
#[test]
fn token_evicts_an_idle_model_not_one_whose_turn_comes_later() {
    let names = ["a", "b", "c", "d", "e"];
    let mut cfg = PoolConfig::new(
        PoolPolicy::Token,
        270 * MIB,
        names.iter().map(|name| model(name, 50)).collect(),
    );
    cfg.kv_saved_bytes_max = 20 * MIB;
    let mut pool = Pool::new(cfg).unwrap();
    // Tokens each request still owes: `a`'s 100 last several rounds of 16-step turns beside
    // `b`, `c` and `e`.
    let mut owed =
        std::collections::BTreeMap::from([(1, 100_u32), (2, 400), (3, 400), (4, 2), (5, 400)]);
    let mut pending = Vec::new();
    for (seq, name) in [(1, "a"), (2, "b"), (3, "c"), (5, "e")] {
        pending.extend(arrive(&mut pool, 0, seq, name, owed[&seq]).unwrap());
    }
    let compute = |action: &Action, now: u64| match action {
        Action::Prefill { id, seqs, .. } => step_owed(&mut owed, now, *id, seqs, 1),
        Action::Decode {
            id, seqs, steps, ..
        } => step_owed(&mut owed, now, *id, seqs, *steps),
        other => transfer_done(other, now),
    };
    // `d` arrives once `a`'s request has finished and `b`'s turn has run since.
    let (mut a_done, mut d_at) = (false, None);
    let arrive_d = |pool: &mut Pool, action: &Action, event: &Event, now: u64, ran: usize| {
        if let Event::StepFinished { finished, .. } = event {
            a_done |= finished.iter().any(|f| f.seq == SeqId(1));
        }
        let b_turn = matches!(action, Action::Decode { model, .. } if model.as_str() == "b");
        if d_at.is_some() || !a_done || !b_turn {
            return Vec::new();
        }
        d_at = Some(ran);
        arrive(pool, now, 4, "d", 2).unwrap()
    };
    let (log, _) = drive(&mut pool, pending, 0, 1_000_000, compute, arrive_d);
    assert!(pool.is_idle(), "{:?}", pool.status());
    let after_d: Vec<String> = log[d_at.unwrap()..]
        .iter()
        .filter_map(|a| match a {
            Action::Evict { model, .. } => Some(format!("evict {}", model.as_str())),
            Action::SaveKv { model, .. } => Some(format!("save {}", model.as_str())),
            Action::Load { model, .. } => Some(format!("load {}", model.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        after_d.get(..2),
        Some(&["evict a".to_owned(), "load d".to_owned()][..]),
        "{after_d:?}"
    );
    assert_eq!(pool.counters().kv_saves, 0, "{after_d:?}");
}

/// Among models nothing waits for, eviction takes the one asked for least lately (a count of
/// arrivals that halves every minute), not the first in configuration order nor the least
/// recently used: `a` served three requests and `b` one, `b` the latest, both are idle, and
/// `c` needs one of their places: `b` goes.
#[test]
fn token_evicts_the_least_demanded_idle_model() {
    let mut cfg = PoolConfig::new(
        PoolPolicy::Token,
        150 * MIB,
        vec![model("a", 50), model("b", 50), model("c", 50)],
    );
    cfg.kv_saved_bytes_max = 20 * MIB;
    let mut pool = Pool::new(cfg).unwrap();
    let mut now = 0;
    for (seq, name) in [(1, "a"), (2, "a"), (3, "a"), (4, "b")] {
        now += 1_000_000;
        let pending = arrive(&mut pool, now, seq, name, 2).unwrap();
        now = drive_from(&mut pool, pending, now, 1_000_000).1;
    }
    assert!(pool.is_idle(), "{:?}", pool.status());
    let out = arrive(&mut pool, now + 1_000_000, 5, "c", 2).unwrap();
    assert!(
        matches!(&out[..], [Action::Evict { model, .. }] if model.as_str() == "b"),
        "{out:?}"
    );
}
