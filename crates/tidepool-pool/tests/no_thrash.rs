//! Thrashing: two models that do not fit together, their requests alternating, must not make
//! the `token` policy switch back and forth. A switch (a load) costs the whole accelerator its
//! duration on a CPU, so the pool may switch at most once per turn quota
//! (`turn_quota_ms_max`) of elapsed time, plus the first load of each model. A hand-written
//! scenario and a property over seeded random costs, SLOs and request mixes, both driven by a
//! serial engine that takes each action's predicted time.

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed setup is a failed test"
)]

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidepool_pool::{
    Action, CostEstimate, Event, ModelId, ModelSpec, Pool, PoolConfig, PoolPolicy, SeqFinished,
    SeqId,
};

const MIB: u64 = 1024 * 1024;
const MS: u64 = 1_000_000;

/// What one run of the serial engine saw.
#[derive(Debug)]
struct Outcome {
    loads: u64,
    /// Time from the first arrival until the pool was idle again.
    makespan_ns: u64,
    tokens: u64,
}

struct Costs {
    load_ns: u64,
    decode_step_ns: u64,
    prefill_ns_per_token: u64,
}

fn spec(name: &str, costs: &Costs) -> ModelSpec {
    ModelSpec {
        id: ModelId::new(name).unwrap(),
        weights_bytes: 100 * MIB,
        ctx_bytes: 20 * MIB,
        kv_bytes_per_token: 10_000,
        seqs_max: 4,
        seq_tokens_max: 1024,
        pin: false,
        keep_alive_ms: None,
        estimate: CostEstimate {
            load_ns: costs.load_ns,
            decode_step_ns: costs.decode_step_ns,
            prefill_ns_per_token: costs.prefill_ns_per_token,
            kv_transfer_ps_per_byte: 100,
        },
    }
}

/// Two models, a budget that fits one of them plus the saved-state pool.
fn config(costs: &Costs, ttft_slo_ms: u64, tbt_slo_ms: u64, quota_ms: u64) -> PoolConfig {
    let models = vec![spec("a", costs), spec("b", costs)];
    let kv_saved_bytes_max = 64 * MIB;
    let mut cfg = PoolConfig::new(PoolPolicy::Token, 120 * MIB + kv_saved_bytes_max, models);
    cfg.kv_saved_bytes_max = kv_saved_bytes_max;
    cfg.knobs.ttft_slo_ms = ttft_slo_ms;
    cfg.knobs.tbt_slo_ms = tbt_slo_ms;
    cfg.knobs.turn_quota_ms_max = quota_ms;
    cfg
}

/// Drives `cfg`'s pool through `requests` (`(at_ns, model, prompt, max_tokens)`): one action at
/// a time, each taking its predicted time (saves and restores 2 ms, evictions 1 ms).
#[expect(
    clippy::too_many_lines,
    reason = "one serial engine: a match over every kind of action"
)]
fn run(cfg: PoolConfig, requests: &[(u64, &str, u32, u32)]) -> Outcome {
    let costs = cfg.models[0].estimate;
    let mut pool = Pool::new(cfg).unwrap();
    let mut queue: BTreeMap<(u64, u64), Event> = BTreeMap::new();
    let mut order = 0_u64;
    let mut remaining: BTreeMap<SeqId, u32> = BTreeMap::new();
    let mut prompts: BTreeMap<SeqId, u32> = BTreeMap::new();
    for (i, &(at_ns, model, prompt_tokens, max_tokens)) in (0_u64..).zip(requests) {
        let seq = SeqId(i);
        remaining.insert(seq, max_tokens);
        prompts.insert(seq, prompt_tokens);
        let event = Event::RequestArrived {
            now_ns: at_ns,
            seq,
            model: ModelId::new(model).unwrap(),
            prompt_tokens,
            max_tokens,
            class: tidepool_pool::RequestClass::Online,
            cached_tokens: 0,
        };
        queue.insert((at_ns, order), event);
        order += 1;
    }
    let mut outcome = Outcome {
        loads: 0,
        makespan_ns: 0,
        tokens: 0,
    };
    let first = requests.iter().map(|r| r.0).min().unwrap_or(0);
    let mut actions = Vec::new();
    let mut events = 0_u32;
    while let Some(((now, _), event)) = queue.pop_first() {
        events += 1;
        assert!(events < 1_000_000, "livelock");
        pool.handle(event, &mut actions).unwrap();
        pool.check_invariants();
        outcome.makespan_ns = now - first;
        for action in actions.drain(..) {
            let (duration, event): (u64, Box<dyn FnOnce(u64) -> Event>) = match action {
                Action::Load { id, .. } => {
                    outcome.loads += 1;
                    let d = costs.load_ns;
                    (
                        d,
                        Box::new(move |now_ns| Event::LoadFinished {
                            now_ns,
                            action: id,
                            duration_ns: d,
                        }),
                    )
                }
                Action::Evict { id, .. } => (
                    MS,
                    Box::new(move |now_ns| Event::UnloadFinished { now_ns, action: id }),
                ),
                Action::SaveKv { id, .. } => (
                    2 * MS,
                    Box::new(move |now_ns| Event::KvSaved {
                        now_ns,
                        action: id,
                        bytes: 1,
                    }),
                ),
                Action::RestoreKv { id, .. } => (
                    2 * MS,
                    Box::new(move |now_ns| Event::KvRestored { now_ns, action: id }),
                ),
                Action::Prefill { id, seqs, .. } => {
                    let tokens: u64 = seqs.iter().map(|s| u64::from(prompts[s])).sum();
                    let mut finished = Vec::new();
                    for seq in &seqs {
                        let left = remaining.get_mut(seq).unwrap();
                        *left -= 1;
                        outcome.tokens += 1;
                        if *left == 0 {
                            finished.push(SeqFinished {
                                seq: *seq,
                                tokens_emitted: 1,
                            });
                        }
                    }
                    let d = tokens * costs.prefill_ns_per_token;
                    (
                        d,
                        Box::new(move |now_ns| Event::StepFinished {
                            now_ns,
                            action: id,
                            steps: 1,
                            duration_ns: d,
                            finished,
                        }),
                    )
                }
                Action::Decode {
                    id, seqs, steps, ..
                } => {
                    let run = seqs
                        .iter()
                        .map(|s| remaining[s])
                        .max()
                        .unwrap_or(0)
                        .min(steps);
                    let mut finished = Vec::new();
                    for seq in &seqs {
                        let left = remaining.get_mut(seq).unwrap();
                        let emitted = (*left).min(run);
                        *left -= emitted;
                        outcome.tokens += u64::from(emitted);
                        if *left == 0 {
                            let total = requests[usize::try_from(seq.0).unwrap()].3;
                            finished.push(SeqFinished {
                                seq: *seq,
                                tokens_emitted: total,
                            });
                        }
                    }
                    let d = u64::from(run) * costs.decode_step_ns;
                    (
                        d,
                        Box::new(move |now_ns| Event::StepFinished {
                            now_ns,
                            action: id,
                            steps: run,
                            duration_ns: d,
                            finished,
                        }),
                    )
                }
                Action::Release { .. } => continue,
            };
            let at = now + duration.max(1);
            queue.insert((at, order), event(at));
            order += 1;
        }
    }
    assert!(pool.is_idle(), "work left: {:?}", pool.status());
    outcome
}

/// Loads allowed: one per model to start, then one per quota of busy time.
fn loads_max(makespan_ns: u64, quota_ms: u64) -> u64 {
    2 + makespan_ns.div_ceil(quota_ms * MS)
}

#[test]
fn alternating_requests_of_two_models_that_do_not_fit_do_not_thrash() {
    let costs = Costs {
        load_ns: 300 * MS,
        decode_step_ns: 20 * MS,
        prefill_ns_per_token: MS,
    };
    let quota_ms = 4000;
    // a, b, a, b, …: four long requests each, 100 ms apart.
    let requests: Vec<(u64, &str, u32, u32)> = (0..8_u64)
        .map(|i| (i * 100 * MS, if i % 2 == 0 { "a" } else { "b" }, 50, 300))
        .collect();
    let outcome = run(config(&costs, 5000, 250, quota_ms), &requests);
    assert_eq!(outcome.tokens, 8 * 300);
    assert!(
        outcome.loads <= loads_max(outcome.makespan_ns, quota_ms),
        "{outcome:?}: more than one switch per {quota_ms} ms quota"
    );
}

#[test]
fn no_seed_thrashes_two_models_that_do_not_fit() {
    let mut failures = Vec::new();
    for seed in 0..200_u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let costs = Costs {
            load_ns: rng.random_range(50..1000) * MS,
            decode_step_ns: rng.random_range(5..60) * MS,
            prefill_ns_per_token: rng.random_range(1..4) * MS,
        };
        let quota_ms = rng.random_range(500..5000);
        let ttft_slo_ms = rng.random_range(1000..10_000);
        let tbt_slo_ms = rng.random_range(50..500);
        let per_model = rng.random_range(1..6_u64);
        let mut at_ns = 0;
        let requests: Vec<(u64, &str, u32, u32)> = (0..2 * per_model)
            .map(|i| {
                at_ns += rng.random_range(0..500) * MS;
                let model = if i % 2 == 0 { "a" } else { "b" };
                (
                    at_ns,
                    model,
                    rng.random_range(8..200),
                    rng.random_range(20..400),
                )
            })
            .collect();
        let outcome = run(config(&costs, ttft_slo_ms, tbt_slo_ms, quota_ms), &requests);
        if outcome.loads > loads_max(outcome.makespan_ns, quota_ms) {
            failures.push(format!(
                "seed {seed}: {outcome:?} max {} quota {quota_ms} load {} d {} ttft {ttft_slo_ms} tbt {tbt_slo_ms} n {per_model}",
                loads_max(outcome.makespan_ns, quota_ms),
                costs.load_ns / MS,
                costs.decode_step_ns / MS
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds thrash:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
