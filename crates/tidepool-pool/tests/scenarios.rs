//! Hand-written scenarios for the pool's contract: admission errors the gateway maps to HTTP
//! codes, the status snapshot, the swap-lru victim rule, and token-level preemption with
//! save/restore. Each drives the pool by hand, checking the exact actions it emits.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]

use tidepool_core::ModelId;
use tidepool_pool::{
    Action, CostEstimate, Event, ModelSpec, Pool, PoolConfig, PoolError, PoolPolicy, Residency,
    SeqFinished, SeqId,
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
    };
    pool.handle(event, &mut out).map(|()| out)
}

fn feed(pool: &mut Pool, event: Event) -> Vec<Action> {
    let mut out = Vec::new();
    pool.handle(event, &mut out).unwrap();
    out
}

#[test]
fn admission_errors_are_typed() {
    let mut cfg = PoolConfig::new(
        PoolPolicy::SwapLru,
        100 * MIB,
        vec![model("small", 50), model("huge", 500)],
    );
    cfg.admission_queue_len_max = 1;
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
    assert!(matches!(out.as_slice(), [Action::Prefill { seqs, .. }] if seqs == &[SeqId(1)]));
    let status = pool.status();
    assert_eq!(status.models[0].state, Residency::Resident);
    assert_eq!(
        (status.models[0].queued, status.models[0].in_flight),
        (0, 1)
    );
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
        let out = arrive(&mut pool, now, seq, name, 1).unwrap();
        let Action::Load { id, .. } = out[0].clone() else {
            panic!("{out:?}")
        };
        now += 100;
        let out = feed(
            &mut pool,
            Event::LoadFinished {
                now_ns: now,
                action: id,
                duration_ns: 100,
            },
        );
        let Action::Prefill { id, .. } = out[0].clone() else {
            panic!("{out:?}")
        };
        now += 100;
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
                duration_ns: 100,
                finished,
            },
        );
    }
    // c needs room: a finished first, so a goes.
    let out = arrive(&mut pool, now, 3, "c", 1).unwrap();
    assert!(
        matches!(&out[..], [Action::Evict { model, .. }] if model.as_str() == "a"),
        "{out:?}"
    );
    assert_eq!(pool.counters().kv_saves, 0);
}

/// token preempts a decoding model: its sequence is saved, the model evicted, and later
/// restored before it decodes again.
#[test]
fn token_preempts_with_save_and_restore() {
    let mut cfg = PoolConfig::new(
        PoolPolicy::Token,
        90 * MIB,
        vec![model("a", 50), model("b", 50)],
    );
    cfg.kv_saved_bytes_max = 20 * MIB;
    let mut pool = Pool::new(cfg).unwrap();
    let mut log = Vec::new();
    let mut pending = arrive(&mut pool, 0, 1, "a", 400).unwrap();
    pending.extend(arrive(&mut pool, 0, 2, "b", 400).unwrap());
    let mut now = 0;
    // A minimal driver: complete every engine action 1 ms later, in order.
    for _ in 0..10_000 {
        let Some(action) = pending.first().cloned() else {
            break;
        };
        pending.remove(0);
        now += 1_000_000;
        log.push(action.clone());
        let event = match action {
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
            Action::Prefill { id, .. } => Event::StepFinished {
                now_ns: now,
                action: id,
                steps: 1,
                duration_ns: 1,
                finished: vec![],
            },
            Action::Decode { id, steps, .. } => Event::StepFinished {
                now_ns: now,
                action: id,
                steps,
                duration_ns: 1,
                finished: vec![],
            },
            Action::Release { .. } => continue,
        };
        pending.extend(feed(&mut pool, event));
    }
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
