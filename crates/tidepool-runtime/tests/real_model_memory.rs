//! The pool's memory budget is the process's: with real models switching under a budget that
//! fits fewer models than are requested, the process's resident memory (`VmRSS`) above the cold
//! process never exceeds `memory_bytes_max` plus the overhead the runtime names
//! (`pool_overhead_bytes`). Its own test binary, so no other test shares the process's memory.
//! Models from `~/.cache/tidepool/models`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{GEMMA, PROMPTS, SMOLLM2, collect, model, request};
use tidepool_core::PoolPolicy;
use tidepool_engine::multi::resident_bytes;
use tidepool_runtime::{PoolRuntime, RuntimeConfig};

const MAX_TOKENS: u32 = 12;
/// Rounds of requests; each round sends two requests to every model.
const ROUNDS: usize = 3;
/// Interval between resident-memory samples.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(2);

/// Samples the process's resident memory until stopped: the peak, and the most it exceeded
/// what the pool counted as used at the same moment, in bytes.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    uncounted: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(runtime: &Arc<PoolRuntime>, cold: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let uncounted = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, peak, uncounted) =
                (Arc::clone(&stop), Arc::clone(&peak), Arc::clone(&uncounted));
            let runtime = Arc::clone(runtime);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = resident_bytes() {
                        peak.fetch_max(rss, Ordering::Relaxed);
                        let used = runtime.status().memory_bytes_used;
                        let above = rss.saturating_sub(cold).saturating_sub(used);
                        uncounted.fetch_max(above, Ordering::Relaxed);
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
        };
        Self {
            stop,
            peak,
            uncounted,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            handle.join().unwrap_or_default();
        }
        (
            self.peak.load(Ordering::Relaxed),
            self.uncounted.load(Ordering::Relaxed),
        )
    }
}

/// Four models, two of each file, under a budget that fits the two largest: every round evicts
/// and reloads, and `token` saves and restores sequences.
fn switching_config() -> RuntimeConfig {
    let models = vec![
        model("s0", SMOLLM2, 512),
        model("g0", GEMMA, 512),
        model("s1", SMOLLM2, 512),
        model("g1", GEMMA, 512),
    ];
    let mut config = RuntimeConfig::new(PoolPolicy::Token, models);
    config.pool.memory_models_max = Some(2);
    config.pool.kv_saved_bytes_max = 32 << 20;
    config.pool.knobs.decode_steps_min = 4;
    // Switches spaced by 1 ms, not the default quota's 4 s, so that in a run this short the
    // pool switches often and saved states take their share of the budget.
    config.pool.knobs.turn_quota_ms_max = 1;
    // Every queued request's first token at risk at once, every decoding sequence with slack to
    // spare: `token` saves sequences (of other models for a load, of a model's own for a free
    // slot) instead of letting newcomers wait.
    (config.pool.knobs.ttft_slo_ms, config.pool.knobs.tbt_slo_ms) = (1, 60_000);
    // A queued request waits at most 1 ms for a model to go idle before its load may preempt
    // one with work (the default 20 s would outlast the run).
    config.pool.knobs.switch_wait_ms_max = 1;
    config
}

#[test]
fn real_model_resident_memory_stays_within_the_budget_plus_the_named_overhead() {
    let config = switching_config();
    let runtime = PoolRuntime::start(&config).unwrap();
    let engines = runtime.engines();
    let cold = resident_bytes().unwrap();
    let sampler = Sampler::start(&runtime, cold);
    let mut running = Vec::new();
    for round in 0..ROUNDS {
        for (i, engine) in engines.iter().enumerate() {
            for k in 0..2 {
                let prompt = PROMPTS[(i + round + k) % PROMPTS.len()];
                // SmolLM2 (even ids) in its chat template, Gemma as plain text.
                let request = request(engine.as_ref(), i % 2 == 0, prompt, MAX_TOKENS);
                let generation = engine.submit(request).unwrap();
                running.push(std::thread::spawn(move || collect(generation)));
            }
        }
        // Let the round run partly before the next one arrives, so models come and go.
        std::thread::sleep(Duration::from_millis(300));
    }
    for handle in running {
        handle.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_mins(2);
    let finished = u64::try_from(ROUNDS * engines.len() * 2).unwrap();
    while runtime.status().counters.requests_finished < finished {
        assert!(Instant::now() < deadline, "requests did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (peak, uncounted) = sampler.finish();
    let status = runtime.status();
    let overhead = runtime.overhead();
    for (id, c) in runtime.calibrations() {
        eprintln!(
            "{id}: weights {} ctx_kv {} ctx_extra {} memory {:?} phases {:?}",
            c.weights_bytes, c.ctx_kv_bytes, c.ctx_extra_bytes, c.memory, c.phases
        );
    }
    for (id, phases) in runtime.switch_phases() {
        eprintln!("{id}: last switch {phases:?}");
    }
    let grown = peak.saturating_sub(cold);
    eprintln!(
        "cold {cold} peak {peak} grown {grown} uncounted at most {uncounted} budget {} overhead {overhead:?} counters {:?}",
        status.memory_bytes_max, status.counters
    );
    let c = &status.counters;
    assert!(
        c.loads > 2 && c.evictions > 0 && c.kv_saves > 0,
        "models switched and sequences were saved: {c:?}"
    );
    assert!(
        runtime.switch_phases().all(|(_, p)| p.weights_ns > 0),
        "every model's switch phases were recorded"
    );
    let allowed = status.memory_bytes_max + overhead.pool_overhead_bytes;
    assert!(
        grown <= allowed,
        "resident memory grew by {grown} bytes above the cold process, more than the budget \
         {} + the named overhead {} = {allowed}",
        status.memory_bytes_max,
        overhead.pool_overhead_bytes
    );
}
