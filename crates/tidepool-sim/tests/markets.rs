//! Markets the planner must answer for besides a steady Poisson stream: bursty (Gamma) arrivals
//! have the rate and burstiness asked for, and on a small bursty market and a small busy one
//! (where the hottest model needs several accelerators) every policy reaches the target at
//! some accelerator count, each pooled policy from the instances its models need alone under
//! it.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]
#![expect(
    clippy::cast_precision_loss,
    reason = "gap statistics of at most a few ten thousand arrivals"
)]

use tidepool_core::PoolPolicy;
use tidepool_sim::{
    Arrivals, Instances, MarketSpec, PoolKnobs, Popularity, Profile, SimSpec, TraceRow, Workload,
    market, plan, read_azure_trace, size_under,
};

fn repo_file(relative: &str) -> std::path::PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap();
    std::path::Path::new(&manifest_dir)
        .join("../..")
        .join(relative)
}

fn trace() -> Vec<TraceRow> {
    read_azure_trace(&repo_file("data/traces/azure-llm-2023-conv.csv")).unwrap()
}

fn zipf_spec(models: u32, arrivals: Arrivals, seed: u64) -> MarketSpec {
    MarketSpec {
        models,
        popularity: Popularity::Zipf { s: 1.0 },
        arrivals,
        seed,
    }
}

fn zipf(profile: &Profile, models: u32, arrivals: Arrivals, seed: u64) -> Workload {
    market(&zipf_spec(models, arrivals, seed), &trace(), profile).unwrap()
}

/// Mean and coefficient of variation of the gaps between arrivals.
fn gaps(workload: &Workload) -> (f64, f64) {
    let gaps: Vec<f64> = workload
        .requests
        .windows(2)
        .map(|w| (w[1].at_ns - w[0].at_ns) as f64 / 1e9)
        .collect();
    let n = gaps.len() as f64;
    let mean = gaps.iter().sum::<f64>() / n;
    let var = gaps.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / n;
    (mean, var.sqrt() / mean)
}

#[test]
fn gamma_arrivals_have_the_asked_rate_and_burstiness() {
    let profile = Profile::load("h100").unwrap();
    let gamma = |cv, seed| {
        zipf(
            &profile,
            8,
            Arrivals::Gamma {
                rate_per_s: 20.0,
                duration_s: 2000.0,
                cv,
            },
            seed,
        )
    };
    for cv in [1.0, 4.0] {
        let w = gamma(cv, 3);
        let (mean, measured_cv) = gaps(&w);
        assert!(
            (mean - 0.05).abs() < 0.05 * 0.1,
            "cv {cv}: mean gap {mean} s, asked 0.05 s"
        );
        assert!(
            (measured_cv - cv).abs() < cv * 0.15,
            "cv {cv}: measured cv {measured_cv}"
        );
        assert_eq!(w, gamma(cv, 3), "the same seed gives the same workload");
    }
    let bad = zipf_spec(
        8,
        Arrivals::Gamma {
            rate_per_s: 20.0,
            duration_s: 10.0,
            cv: 0.0,
        },
        1,
    );
    assert!(
        market(&bad, &trace(), &profile).is_err(),
        "a zero coefficient of variation is refused"
    );
}

/// The planner's answer for every policy meets the target on `workload`.
fn every_policy_meets(workload: &Workload, what: &str) {
    let profile = Profile::load("h100").unwrap();
    let base = SimSpec {
        profile,
        policy: PoolPolicy::Token,
        accelerators: 1,
        knobs: PoolKnobs::default(),
        memory_models_max: None,
        placement_moves_max: 4,
        search_sample_requests: 0,
        search_until_attainment: None,
        instances: Instances::One,
        placement: None,
    };
    let policies = [
        PoolPolicy::Dedicated,
        PoolPolicy::SwapLru,
        PoolPolicy::Token,
    ];
    let report = plan(&base, workload, 0.99, &policies, &mut |_| {}).unwrap();
    // Each pooled policy starts from the instances each model needs alone under it.
    for a in report
        .answers
        .iter()
        .filter(|a| a.policy != PoolPolicy::Dedicated)
    {
        let own = size_under(
            &base,
            workload,
            0.99,
            plan::INSTANCES_PER_MODEL_MAX,
            a.policy,
        )
        .unwrap();
        assert_eq!(
            a.instances_per_model, own.instances,
            "{what}: {:?} answers with its own instance counts",
            a.policy
        );
    }
    let hot = report.per_model[0].dedicated_accelerators;
    assert!(
        hot >= 2,
        "{what}: the hottest model needs several accelerators ({hot})"
    );
    for a in &report.answers {
        assert!(
            a.accelerators.is_some() && a.attainment >= 0.99,
            "{what}: {:?} reaches 99 % at some count ({a:?})",
            a.policy
        );
    }
}

#[test]
fn every_policy_reaches_the_target_on_a_bursty_market() {
    let profile = Profile::load("h100").unwrap();
    let workload = zipf(
        &profile,
        6,
        Arrivals::Gamma {
            rate_per_s: 20.0,
            duration_s: 40.0,
            cv: 4.0,
        },
        5,
    );
    every_policy_meets(&workload, "Gamma cv 4");
}

#[test]
fn every_policy_reaches_the_target_on_a_busy_market() {
    let profile = Profile::load("h100").unwrap();
    let workload = zipf(
        &profile,
        12,
        Arrivals::Poisson {
            rate_per_s: 200.0,
            duration_s: 4.0,
        },
        5,
    );
    every_policy_meets(&workload, "200 req/s");
}
