//! Dev tooling: the "Aegaeon question" and the speed benchmarks, as reported in docs/bench/sim.md.
//! `cargo run --release -p tidepool-sim --example aegaeon -- [speed|plan MODELS|sim POLICY N MODELS
//! |market sim|plan REQUESTS MODELS ACCELERATORS]`; `market` times what `tidepool sim` /
//! `tidepool plan` do by default (the server's knobs, instances sized at 99 %, the placement
//! search) on a Zipf(1) market at 20 req/s Poisson.
//! Environment: `PROFILE` (name or TOML path), `MOVES` (placement search), `STEPS_MIN`,
//! `STEPS_MAX`, `QUOTA_MS`, `ALPHA` (pool knobs), `PROGRESS=1` (`market`: each simulation's
//! progress with its time, on stderr); `market` also reads `RATE` (req/s, default 20), `CV`
//! (Gamma arrivals of that coefficient of variation instead of Poisson), `SEED` (default 7),
//! `POLICY` (`sim`), `POLICIES` (`plan`, comma-separated) and `DETAIL=1` (`sim`: per
//! accelerator); `plan MODELS` writes its report to `$OUT.json` and `$OUT.svg` when `OUT` is set.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use tidepool_core::PoolPolicy;
use tidepool_sim::{
    Arrivals, MarketSpec, PoolKnobs, Popularity, Profile, SimSpec, market, plan, read_azure_trace,
    simulate,
};

fn knobs() -> PoolKnobs {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // The knobs docs/bench/sim.md was measured with, each overridable.
    let d = tidepool_sim::h100_sweep_knobs();
    PoolKnobs {
        decode_steps_min: u32::try_from(env("STEPS_MIN", u64::from(d.decode_steps_min)))
            .unwrap_or(d.decode_steps_min),
        decode_steps_max: u32::try_from(env("STEPS_MAX", u64::from(d.decode_steps_max)))
            .unwrap_or(d.decode_steps_max),
        turn_quota_ms_max: env("QUOTA_MS", d.turn_quota_ms_max),
        alpha_admit_permille_max: u32::try_from(env(
            "ALPHA",
            u64::from(d.alpha_admit_permille_max),
        ))
        .unwrap_or(d.alpha_admit_permille_max),
        ..d
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "dev tooling: three modes in one match"
)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mut out = std::io::stdout().lock();
    let profile = Profile::load(&std::env::var("PROFILE").unwrap_or_else(|_| "h100".into()))?;
    let moves = std::env::var("MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tidepool_sim::PLACEMENT_MOVES_MAX);
    let rows = read_azure_trace(Path::new("data/traces/azure-llm-2023-conv.csv"))?;
    let spec = |policy, accelerators| SimSpec {
        profile: profile.clone(),
        policy,
        accelerators,
        knobs: knobs(),
        memory_models_max: None,
        placement_moves_max: moves,
        search_sample_requests: tidepool_sim::SEARCH_SAMPLE_REQUESTS,
        search_until_attainment: None,
        instances: tidepool_sim::Instances::One,
        placement: None,
    };
    match args.get(1).map(String::as_str) {
        Some("speed") => {
            let n: u64 = args.get(2).map_or(Ok(1_000_000), |s| s.parse())?;
            let workload = tidepool_sim::bench_workload(n, &rows, &profile, 7)?;
            let start = Instant::now();
            let report = simulate(
                &SimSpec {
                    placement_moves_max: 0,
                    ..spec(PoolPolicy::Token, tidepool_sim::BENCH_ACCELERATORS)
                },
                &workload,
                &mut |_| {},
            )?;
            writeln!(
                out,
                "{} requests in {:.2} s, attainment {:.4}",
                report.requests,
                start.elapsed().as_secs_f64(),
                report.attainment
            )?;
        }
        Some("market") => {
            let what = args.get(2).map_or("sim", String::as_str);
            let requests: u64 = args.get(3).map_or(Ok(1_000_000), |s| s.parse())?;
            let models: u32 = args.get(4).map_or(Ok(80), |s| s.parse())?;
            let n: u32 = args.get(5).map_or(Ok(16), |s| s.parse())?;
            let env_f64 = |k: &str, d: f64| {
                std::env::var(k)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(d)
            };
            let rate_per_s = env_f64("RATE", 20.0);
            #[expect(clippy::cast_precision_loss, reason = "dev tooling")]
            let duration_s = requests as f64 / rate_per_s;
            let m = MarketSpec {
                models,
                popularity: Popularity::Zipf { s: 1.0 },
                arrivals: match std::env::var("CV").ok().and_then(|v| v.parse().ok()) {
                    Some(cv) => Arrivals::Gamma {
                        rate_per_s,
                        duration_s,
                        cv,
                    },
                    None => Arrivals::Poisson {
                        rate_per_s,
                        duration_s,
                    },
                },
                seed: std::env::var("SEED")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(7),
            };
            let workload = market(&m, &rows, &profile)?;
            let shipped = SimSpec {
                knobs: PoolKnobs::default(),
                instances: tidepool_sim::Instances::Sized {
                    target_attainment: 0.99,
                },
                ..spec(PoolPolicy::Token, n)
            };
            let start = Instant::now();
            // `PROGRESS=1`: when each simulation's first pass and whole run end, on stderr.
            let trace = std::env::var("PROGRESS").is_ok_and(|v| v == "1");
            let mut progress = |p: tidepool_sim::Progress| {
                if trace {
                    writeln!(
                        std::io::stderr(),
                        "{:8.2}s {}/{}",
                        start.elapsed().as_secs_f64(),
                        p.requests_done,
                        p.requests_total
                    )
                    .ok();
                }
            };
            if what == "plan" {
                let policies: Vec<PoolPolicy> = std::env::var("POLICIES")
                    .unwrap_or_else(|_| "dedicated,swap-lru,token".into())
                    .split(',')
                    .map(|p| match p {
                        "swap-lru" => PoolPolicy::SwapLru,
                        "token" => PoolPolicy::Token,
                        _ => PoolPolicy::Dedicated,
                    })
                    .collect();
                let report = plan(&shipped, &workload, 0.99, &policies, &mut progress)?;
                for p in &report.points {
                    writeln!(
                        out,
                        "{:?} {} on {} requests: att {:.4}, {} moves",
                        p.policy, p.accelerators, p.requests, p.attainment, p.placement_moves
                    )?;
                }
                for line in &report.summary {
                    writeln!(out, "{line}")?;
                }
            } else {
                let policy = match std::env::var("POLICY").as_deref() {
                    Ok("swap-lru") => PoolPolicy::SwapLru,
                    Ok("dedicated") => PoolPolicy::Dedicated,
                    _ => PoolPolicy::Token,
                };
                let r = simulate(&SimSpec { policy, ..shipped }, &workload, &mut progress)?;
                if std::env::var("DETAIL").is_ok_and(|v| v == "1") {
                    detail(&mut out, &r)?;
                }
                writeln!(
                    out,
                    "{} requests, {} models, {} instances on {} accelerators: attainment {:.4}, {} moves on {} requests",
                    r.requests,
                    r.models,
                    r.instances,
                    r.accelerators,
                    r.attainment,
                    r.placement_moves,
                    r.search_requests
                )?;
            }
            writeln!(out, "{:.2}s", start.elapsed().as_secs_f64())?;
        }
        Some("sim") => {
            let policy = match args[2].as_str() {
                "token" => PoolPolicy::Token,
                "swap-lru" => PoolPolicy::SwapLru,
                _ => PoolPolicy::Dedicated,
            };
            let n: u32 = args[3].parse()?;
            let models: u32 = args[4].parse()?;
            let m = MarketSpec {
                models,
                popularity: Popularity::Zipf { s: 1.0 },
                arrivals: Arrivals::Trace,
                seed: 1,
            };
            let workload = market(&m, &rows, &profile)?;
            let start = Instant::now();
            let mut r = simulate(&spec(policy, n), &workload, &mut |_| {})?;
            r.per_model.truncate(5);
            writeln!(
                out,
                "{:.2}s {}",
                start.elapsed().as_secs_f64(),
                serde_json::to_string_pretty(&r)?
            )?;
        }
        _ => {
            let models: u32 = args.get(2).map_or(Ok(40), |s| s.parse())?;
            let arrivals = match args.get(3).and_then(|r| r.parse::<f64>().ok()) {
                Some(per_model) => Arrivals::Poisson {
                    rate_per_s: per_model * f64::from(models),
                    duration_s: 3600.0,
                },
                None => Arrivals::Trace,
            };
            let m = MarketSpec {
                models,
                popularity: Popularity::Zipf { s: 1.0 },
                arrivals,
                seed: 1,
            };
            let workload = market(&m, &rows, &profile)?;
            writeln!(
                out,
                "{} requests, {} prompts capped",
                workload.requests.len(),
                workload.prompts_capped
            )?;
            let start = Instant::now();
            let report = plan(
                &spec(PoolPolicy::Token, 1),
                &workload,
                0.99,
                &[
                    PoolPolicy::Dedicated,
                    PoolPolicy::SwapLru,
                    PoolPolicy::Token,
                ],
                &mut |_| {},
            )?;
            // `OUT=path/plan`: the report as `tidepool plan` writes it (`plan.json`, `plan.svg`).
            if let Ok(path) = std::env::var("OUT") {
                std::fs::write(format!("{path}.json"), serde_json::to_vec_pretty(&report)?)?;
                std::fs::write(format!("{path}.svg"), tidepool_sim::plan_svg(&report))?;
            }
            for p in &report.points {
                writeln!(
                    out,
                    "{:?} {} att {:.4} lenient {:.4} p99ttft {:.0} ms sw/s {:.2}",
                    p.policy,
                    p.accelerators,
                    p.attainment,
                    p.attainment_lenient,
                    p.ttft_ms_p99,
                    p.switches_per_s
                )?;
            }
            for line in &report.summary {
                writeln!(out, "{line}")?;
            }
            writeln!(out, "{:.2}s", start.elapsed().as_secs_f64())?;
        }
    }
    Ok(())
}

/// `DETAIL=1`: per accelerator its models, attainment and utilization, and the run's switches.
fn detail(out: &mut impl Write, r: &tidepool_sim::Report) -> std::io::Result<()> {
    writeln!(
        out,
        "loads {} evictions {} saves {} restores {} switches/s {:.2} utilization {:.3} p99 ttft {:.0} ms",
        r.loads,
        r.evictions,
        r.kv_saves,
        r.kv_restores,
        r.switches_per_s,
        r.utilization,
        r.ttft_ms_p99
    )?;
    for a in &r.per_accelerator {
        writeln!(
            out,
            "acc {:2} att {:.4} util {:.3} req {:7} models {}",
            a.accelerator,
            a.attainment,
            a.utilization,
            a.requests,
            a.models.join(" ")
        )?;
    }
    Ok(())
}
