//! The pool on real models: 8 model ids (five SmolLM2-135M-Instruct instances, three Gemma-3-270M
//! instances, each loaded separately) under a budget that fits the 3 largest, all three policies; admission
//! errors; operator load/unload; scale to zero. Models from `~/.cache/tidepool/models`.
//!
//! Correctness is exact: greedy output of every request must equal the output of the same prompt
//! on an unpooled run, however often the pool preempted, saved, evicted and restored it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{GEMMA, PROMPTS, SMOLLM2, collect};
use tidepool_core::{ModelId, PoolPolicy};
use tidepool_engine::{EngineError, GenerateRequest, TextEngine};
use tidepool_pool::{PoolError, Residency};
use tidepool_runtime::{PoolRuntime, PooledModelConfig, RuntimeConfig};

const MAX_TOKENS: u32 = 16;

/// Model `id` of `file`, prompts in batches of 256 tokens.
fn model(id: &str, file: &str) -> PooledModelConfig {
    common::model(id, file, 256)
}

/// A greedy request of `MAX_TOKENS`: Gemma's prompt as plain text, SmolLM2's in its chat
/// template.
fn request(engine: &dyn TextEngine, gemma: bool, user: &str) -> GenerateRequest {
    common::request(engine, !gemma, user, MAX_TOKENS)
}

/// Model `m{i}`: Gemma for i = 2, 5, 7, SmolLM2 otherwise.
fn file_of(i: usize) -> &'static str {
    if matches!(i, 2 | 5 | 7) {
        GEMMA
    } else {
        SMOLLM2
    }
}

fn eight_models() -> Vec<PooledModelConfig> {
    (0..8)
        .map(|i| model(&format!("m{i}"), file_of(i)))
        .collect()
}

fn start(policy: PoolPolicy, models: Vec<PooledModelConfig>, fit: Option<u32>) -> Arc<PoolRuntime> {
    let mut config = RuntimeConfig::new(policy, models);
    config.pool.memory_models_max = fit;
    config.pool.kv_saved_bytes_max = 256 << 20;
    config.pool.knobs.decode_steps_min = 4;
    // Switches 1 ms apart, not the default quota's 4 s, every deadline at risk (1 ms SLOs), and a
    // queued request waiting at most 1 ms for a model to go idle (not 20 s): in a run this short
    // `token` then preempts, saving and restoring sequences, instead of finishing one model's
    // work first.
    config.pool.knobs.turn_quota_ms_max = 1;
    config.pool.knobs.ttft_slo_ms = 1;
    config.pool.knobs.tbt_slo_ms = 1;
    config.pool.knobs.switch_wait_ms_max = 1;
    match PoolRuntime::start(&config) {
        Ok(runtime) => runtime,
        Err(error) => panic_start(&error),
    }
}

#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn panic_start(error: &EngineError) -> ! {
    panic!("the pool did not start: {error}")
}

/// Greedy answers of each prompt on one SmolLM2 and one Gemma instance, one request at a time.
fn reference() -> [[String; 3]; 2] {
    let runtime = start(
        PoolPolicy::Dedicated,
        vec![model("ref-smollm2", SMOLLM2), model("ref-gemma", GEMMA)],
        None,
    );
    let engines = runtime.engines();
    let mut out: [[String; 3]; 2] = Default::default();
    for (file, answers) in out.iter_mut().enumerate() {
        for (prompt, answer) in answers.iter_mut().enumerate() {
            let engine = &engines[file];
            let generation = engine
                .submit(request(engine.as_ref(), file == 1, PROMPTS[prompt]))
                .unwrap_or_else(|e| panic_start(&e));
            *answer = collect(generation);
        }
    }
    out
}

/// Polls the pool until `done` holds (a wait on state, not a timing assertion).
fn wait_for(runtime: &PoolRuntime, what: &str, done: impl Fn(&tidepool_pool::PoolStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_mins(2);
    while !done(&runtime.status()) {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn real_model_eight_models_in_a_budget_of_three_answer_exactly_under_every_policy() {
    let expected = reference();
    for policy in [
        PoolPolicy::Token,
        PoolPolicy::SwapLru,
        PoolPolicy::Dedicated,
    ] {
        let began = Instant::now();
        let runtime = start(policy, eight_models(), Some(3));
        let engines = runtime.engines();
        let started = began.elapsed();
        // 16 concurrent requests: two prompts on each of the eight models.
        let mut running = Vec::new();
        for round in 0..2 {
            for (i, engine) in engines.iter().enumerate() {
                let prompt = (i + round) % 3;
                let gemma = file_of(i) == GEMMA;
                let generation = engine
                    .submit(request(engine.as_ref(), gemma, PROMPTS[prompt]))
                    .unwrap_or_else(|e| panic_start(&e));
                running.push((i, prompt, std::thread::spawn(move || collect(generation))));
            }
        }
        for (i, prompt, handle) in running {
            let text = handle.join().unwrap_or_default();
            let file = usize::from(file_of(i) == GEMMA);
            assert_eq!(
                text, expected[file][prompt],
                "{policy:?}: model m{i}, prompt {prompt}: output differs from the unpooled run"
            );
        }
        // A client has its `Done` before the pool hears that the action finished.
        wait_for(&runtime, "every request finished in the pool", |s| {
            s.counters.requests_finished == 16
        });
        let status = runtime.status();
        let c = status.counters;
        eprintln!(
            "{policy:?}: started in {started:?}, served in {:?}: {c:?}",
            began.elapsed().saturating_sub(started)
        );
        assert_eq!(c.requests_finished, 16, "{policy:?}: {c:?}");
        assert!(status.memory_bytes_used <= status.memory_bytes_max);
        match policy {
            PoolPolicy::Dedicated => {
                assert_eq!((c.loads, c.evictions, c.kv_saves), (8, 0, 0), "{c:?}");
            }
            // The budget fits the 3 largest (Gemma) instances, so at most 5 of the smaller
            // SmolLM2 ones: 8 loads need at least 3 evictions.
            PoolPolicy::SwapLru => {
                assert!(c.loads >= 8 && c.evictions >= 3, "{c:?}");
                assert_eq!(c.kv_saves, 0, "swap-lru never preempts: {c:?}");
            }
            PoolPolicy::Token => {
                assert!(c.loads >= 8 && c.evictions >= 3, "{c:?}");
                assert!(
                    c.kv_saves > 0 && c.kv_restores == c.kv_saves,
                    "token preempted and restored every saved sequence: {c:?}"
                );
            }
        }
    }
}

#[test]
fn real_model_a_model_over_the_whole_budget_is_refused_at_admission() {
    let mut config = RuntimeConfig::new(PoolPolicy::Token, vec![model("tiny-budget", SMOLLM2)]);
    config.pool.memory_bytes_max = Some(1 << 20);
    config.pool.kv_saved_bytes_max = 1 << 19;
    let runtime = PoolRuntime::start(&config).unwrap_or_else(|e| panic_start(&e));
    let engines = runtime.engines();
    let engine = &engines[0];
    let refused = engine.submit(request(engine.as_ref(), false, PROMPTS[0]));
    assert!(
        matches!(refused, Err(EngineError::ExceedsMemoryBudget { memory_bytes_max, .. }) if memory_bytes_max == 1 << 20),
        "{refused:?}"
    );
    assert_eq!(runtime.status().counters.requests_rejected, 1);
}

#[test]
fn real_model_operator_load_unload_and_scale_to_zero() {
    let mut idle = model("idle", SMOLLM2);
    idle.keep_alive_ms = Some(50);
    let runtime = start(
        PoolPolicy::Token,
        vec![model("a", SMOLLM2), model("b", SMOLLM2), idle],
        None,
    );
    let a = ModelId::new("a").unwrap();
    let state = |status: &tidepool_pool::PoolStatus, id: &str| {
        status
            .models
            .iter()
            .find(|m| m.model.as_str() == id)
            .map(|m| m.state)
    };
    runtime.request_load(&a).unwrap();
    wait_for(&runtime, "a resident", |s| {
        state(s, "a") == Some(Residency::Resident)
    });
    runtime.request_unload(&a).unwrap();
    wait_for(&runtime, "a cold", |s| {
        state(s, "a") == Some(Residency::Cold)
    });
    assert!(matches!(
        runtime.request_unload(&ModelId::new("nope").unwrap()),
        Err(PoolError::ModelNotFound { .. })
    ));

    // A model with a request in flight cannot be unloaded.
    let engines = runtime.engines();
    let b = &engines[1];
    let generation = b.submit(request(b.as_ref(), false, PROMPTS[1])).unwrap();
    let busy = runtime.request_unload(&ModelId::new("b").unwrap());
    assert!(matches!(busy, Err(PoolError::ModelBusy { .. })), "{busy:?}");
    collect(generation);

    // keep_alive_ms = 50: the idle model is unloaded after its request.
    let idle = &engines[2];
    let generation = idle
        .submit(request(idle.as_ref(), false, PROMPTS[2]))
        .unwrap();
    collect(generation);
    wait_for(&runtime, "idle scaled to zero", |s| {
        state(s, "idle") == Some(Residency::Cold) && s.counters.evictions >= 2
    });
}
