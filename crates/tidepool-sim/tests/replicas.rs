//! Replicas, dispatch, the `dedicated` baseline and the speed-ups of the placement search,
//! against brute force on small markets: a hot model gets the instances it needs and meets the
//! target; `dedicated` counts are minimal (one fewer misses); the planner's bisection answers
//! what probing every accelerator count answers; the cached, incremental search gives the
//! report a from-scratch simulation of its placement gives; a searched sample never makes the
//! whole workload worse; a plan's placement file loads and is checked against the market.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup is a failed test"
)]

use tidepool_core::PoolPolicy;
use tidepool_sim::workload::MarketModel;
use tidepool_sim::{
    Arrivals, Demand, Instances, MarketSpec, PlacementFile, PoolKnobs, Popularity, Profile,
    Request, SimSpec, Workload, market, plan, plan_placement_file, read_azure_trace, simulate,
    size, size_under,
};

fn repo_file(relative: &str) -> std::path::PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap();
    std::path::Path::new(&manifest_dir)
        .join("../..")
        .join(relative)
}

fn spec(profile: Profile, policy: PoolPolicy, accelerators: u32) -> SimSpec {
    SimSpec {
        profile,
        policy,
        accelerators,
        knobs: PoolKnobs::default(),
        memory_models_max: None,
        placement_moves_max: 8,
        search_sample_requests: 0,
        search_until_attainment: None,
        instances: Instances::One,
        placement: None,
    }
}

/// One hot model (a request every `HOT_GAP_NS` of 2,700-token prompts and 450-token outputs, evenly
/// spaced: three H100s' worth under the server's knobs) and `tail` models at one request every 20 s, for `duration_s`.
const HOT_GAP_NS: u64 = 166_666_667; // 6 req/s

fn hot_market(profile: &Profile, tail: u32, duration_s: u64) -> Workload {
    let mut models = vec![MarketModel {
        id: "hot".to_owned(),
        family: 0,
        estimate: None,
    }];
    for t in 0..tail {
        models.push(MarketModel {
            id: format!("tail-{t}"),
            family: 0,
            estimate: None,
        });
    }
    let mut requests = Vec::new();
    let s = 1_000_000_000_u64;
    let mut at = 0;
    while at < duration_s * s {
        requests.push(Request {
            at_ns: at,
            model: 0,
            prompt_tokens: 2700,
            output_tokens: 450,
            class: tidepool_pool::RequestClass::Online,
        });
        at += HOT_GAP_NS;
    }
    for t in 0..tail {
        let mut at = u64::from(t) * s;
        while at < duration_s * s {
            requests.push(Request {
                at_ns: at,
                model: t + 1,
                prompt_tokens: 1000,
                output_tokens: 200,
                class: tidepool_pool::RequestClass::Online,
            });
            at += 20 * s;
        }
    }
    Workload::replay(profile, models, requests).unwrap()
}

/// A model alone on `k` accelerators of its own (`dedicated`), its requests dispatched.
fn alone(profile: &Profile, workload: &Workload, model: usize, k: u32) -> f64 {
    let requests: Vec<Request> = workload
        .requests
        .iter()
        .filter(|r| r.model as usize == model)
        .map(|r| Request { model: 0, ..*r })
        .collect();
    let only = Workload::replay(profile, vec![workload.models[model].clone()], requests).unwrap();
    let s = SimSpec {
        placement: Some(vec![(0..k).collect()]),
        ..spec(profile.clone(), PoolPolicy::Dedicated, k)
    };
    simulate(&s, &only, &mut |_| {}).unwrap().attainment
}

#[test]
fn a_hot_model_gets_the_instances_it_needs_and_meets_the_target() {
    let profile = Profile::load("h100").unwrap();
    let workload = hot_market(&profile, 6, 120);
    let demand = size(
        &spec(profile.clone(), PoolPolicy::Token, 1),
        &workload,
        0.99,
        16,
    )
    .unwrap();
    assert_eq!(demand.instances[0], 3, "{demand:?}");
    assert!(demand.instances[1..].iter().all(|&k| k == 1), "{demand:?}");
    // Minimal: the hot model misses on two accelerators of its own, meets on three.
    assert!(alone(&profile, &workload, 0, 2) < 0.99);
    assert!(alone(&profile, &workload, 0, 3) >= 0.99);
    let report = plan(
        &spec(profile, PoolPolicy::Token, 1),
        &workload,
        0.99,
        &[PoolPolicy::Dedicated, PoolPolicy::Token],
        &mut |_| {},
    )
    .unwrap();
    let dedicated = &report.answers[0];
    assert_eq!(dedicated.accelerators, Some(3 + 6));
    let token = &report.answers[1];
    let n = token.accelerators.unwrap();
    assert!(token.attainment >= 0.99);
    assert!(token.instances_per_model[0] >= 3, "{token:?}");
    assert!(n < 3 + 6, "pooling saves against the honest baseline: {n}");
    // The answer's placement holds every instance, and the hot model's instances are on
    // distinct accelerators.
    let hot_on = token
        .per_accelerator
        .iter()
        .filter(|models| models.iter().any(|m| m == "hot"))
        .count();
    assert_eq!(hot_on, token.instances_per_model[0] as usize);
}

#[test]
fn dedicated_counts_are_minimal() {
    let profile = Profile::load("h100").unwrap();
    let workload = zipf_market(&profile, (6, 1.2), (20.0, 90.0), 4);
    let demand = size(
        &spec(profile.clone(), PoolPolicy::Token, 1),
        &workload,
        0.99,
        16,
    )
    .unwrap();
    assert!(demand.met());
    assert!(
        demand.instances[0] >= 2,
        "the head needs several: {demand:?}"
    );
    for (m, &k) in demand.instances.iter().enumerate() {
        assert!(alone(&profile, &workload, m, k) >= 0.99, "model {m} on {k}");
        if k > 1 {
            assert!(
                alone(&profile, &workload, m, k - 1) < 0.99,
                "model {m} on {}",
                k - 1
            );
        }
    }
}

/// A market of `models` with Zipf(`s`) popularity and Poisson arrivals at `rate_per_s` for
/// `duration_s`, lengths from the Azure conversation trace.
fn zipf_market(
    profile: &Profile,
    (models, s): (u32, f64),
    (rate_per_s, duration_s): (f64, f64),
    seed: u64,
) -> Workload {
    let spec_m = MarketSpec {
        models,
        popularity: Popularity::Zipf { s },
        arrivals: Arrivals::Poisson {
            rate_per_s,
            duration_s,
        },
        seed,
    };
    let rows = read_azure_trace(&repo_file("data/traces/azure-llm-2023-conv.csv")).unwrap();
    market(&spec_m, &rows, profile).unwrap()
}

fn small_market(profile: &Profile, seed: u64) -> Workload {
    zipf_market(profile, (8, 1.0), (4.0, 120.0), seed)
}

/// The bisection's answer is the first accelerator count at which a probe meets the target,
/// found by probing every count (brute force over the counts).
#[test]
fn plan_answers_what_probing_every_count_answers() {
    let profile = Profile::load("h100").unwrap();
    let workload = small_market(&profile, 5);
    let base = SimSpec {
        knobs: tidepool_sim::h100_sweep_knobs(),
        ..spec(profile.clone(), PoolPolicy::Token, 1)
    };
    let report = plan(
        &base,
        &workload,
        0.99,
        &[PoolPolicy::Dedicated, PoolPolicy::Token],
        &mut |_| {},
    )
    .unwrap();
    let top = size(&base, &workload, 0.99, plan::INSTANCES_PER_MODEL_MAX)
        .unwrap()
        .accelerators();
    let demand = token_demand(&base, &workload);
    let brute = (1..=top).find(|&n| {
        let s = SimSpec {
            accelerators: n,
            instances: Instances::Given(demand.clone()),
            ..base.clone()
        };
        simulate(&s, &workload, &mut |_| {}).unwrap().attainment >= 0.99
    });
    assert_eq!(report.answers[1].accelerators, brute);
    assert_eq!(report.answers[0].accelerators, Some(top));
}

/// A busier market than [`small_market`]: its compute estimate (every model's busy time on its
/// own instances over the span of its arrivals) is several accelerators, so the bisection's first split is
/// not at half the `dedicated` sum.
fn busy_market(profile: &Profile) -> Workload {
    zipf_market(profile, (6, 1.0), (14.0, 45.0), 11)
}

/// The instances the planner gives `token`: each model's count alone under `token`, with the
/// `dedicated` sizing's busy times as predicted loads.
fn token_demand(base: &SimSpec, workload: &Workload) -> Demand {
    let dedicated = size(base, workload, 0.99, plan::INSTANCES_PER_MODEL_MAX).unwrap();
    let own = size_under(
        base,
        workload,
        0.99,
        plan::INSTANCES_PER_MODEL_MAX,
        PoolPolicy::Token,
    )
    .unwrap();
    assert!(
        own.accelerators() <= dedicated.accelerators(),
        "the planner probes up to the dedicated sum here"
    );
    Demand {
        busy_ns: dedicated.busy_ns,
        ..own
    }
}

/// Whether `n` accelerators meet `target` on `workload` as the planner probes them (its
/// instance counts, its search bound).
fn probe_meets(base: &SimSpec, workload: &Workload, demand: &Demand, n: u32, target: f64) -> bool {
    let s = SimSpec {
        accelerators: n,
        instances: Instances::Given(demand.clone()),
        search_until_attainment: Some(target),
        ..base.clone()
    };
    simulate(&s, workload, &mut |_| {}).unwrap().attainment >= target
}

/// On a busy market, where the bisection first splits at the compute estimate: without a
/// sample the answer is the first count that meets (every count probed); with a sample (whose
/// probes may give up on a hopeless search) the answer is confirmed on the whole workload — it
/// meets there and one fewer misses, both with full searches.
#[test]
fn from_the_compute_estimate_the_plan_answers_what_probing_every_count_answers() {
    let profile = Profile::load("h100").unwrap();
    let workload = busy_market(&profile);
    let base = spec(profile, PoolPolicy::Token, 1);
    let demand = token_demand(&base, &workload);
    let report = plan(&base, &workload, 0.99, &[PoolPolicy::Token], &mut |_| {}).unwrap();
    let brute =
        (1..=demand.accelerators()).find(|&n| probe_meets(&base, &workload, &demand, n, 0.99));
    assert!(
        brute.is_some_and(|n| n > 2),
        "a market of several accelerators"
    );
    assert_eq!(report.answers[0].accelerators, brute);

    let sampled = SimSpec {
        search_sample_requests: u64::try_from(workload.requests.len() / 3).unwrap(),
        ..base
    };
    let report = plan(&sampled, &workload, 0.99, &[PoolPolicy::Token], &mut |_| {}).unwrap();
    let n = report.answers[0].accelerators.unwrap();
    assert!(report.points.iter().any(|p| p.requests < report.requests));
    assert!(probe_meets(&sampled, &workload, &demand, n, 0.99));
    assert!(!probe_meets(&sampled, &workload, &demand, n - 1, 0.99));
}

/// The search caches each accelerator's result by what it holds and re-simulates only the
/// accelerators a move changes; its report equals a from-scratch simulation of its final
/// placement, and it never ends worse than the first placement.
#[test]
fn the_incremental_search_equals_a_full_simulation_of_its_placement() {
    let profile = Profile::load("h100").unwrap();
    let workload = zipf_market(&profile, (12, 1.0), (8.0, 120.0), 3);
    let sweep = SimSpec {
        knobs: tidepool_sim::h100_sweep_knobs(),
        placement_moves_max: 16,
        ..spec(profile.clone(), PoolPolicy::Token, 4)
    };
    // Instances sized once on the whole workload, so the sampled run below starts from the
    // same first placement.
    let demand = size(&sweep, &workload, 0.99, 4).unwrap();
    let base = SimSpec {
        instances: Instances::Given(demand),
        ..sweep
    };
    let searched = simulate(&base, &workload, &mut |_| {}).unwrap();
    assert!(searched.placement_moves > 0);
    let placement: Vec<Vec<u32>> = searched
        .per_model
        .iter()
        .map(|m| m.instances.clone())
        .collect();
    let again = simulate(
        &SimSpec {
            placement: Some(placement),
            placement_moves_max: 0,
            ..base.clone()
        },
        &workload,
        &mut |_| {},
    )
    .unwrap();
    let mut expected = again;
    expected.placement_moves = searched.placement_moves;
    expected.search_requests = searched.search_requests;
    assert_eq!(
        serde_json::to_string(&searched).unwrap(),
        serde_json::to_string(&expected).unwrap()
    );
    let first = simulate(
        &SimSpec {
            placement_moves_max: 0,
            ..base.clone()
        },
        &workload,
        &mut |_| {},
    )
    .unwrap();
    assert!(searched.tokens_on_time > first.tokens_on_time);
    // Searched on a sample (the first 200 requests), the placement is kept only if the whole
    // workload confirms it.
    let sampled = simulate(
        &SimSpec {
            search_sample_requests: 200,
            search_until_attainment: None,
            ..base
        },
        &workload,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(sampled.search_requests, 200);
    assert!(sampled.tokens_on_time >= first.tokens_on_time);
}

/// `tidepool plan`'s placement file: written, read back, checked against the market's models;
/// a model the server does not know is refused with a stable code.
#[test]
fn a_plans_placement_file_loads_and_is_checked() {
    let profile = Profile::load("h100").unwrap();
    let workload = small_market(&profile, 5);
    let report = plan(
        &spec(profile, PoolPolicy::Token, 1),
        &workload,
        0.99,
        &[PoolPolicy::Dedicated, PoolPolicy::Token],
        &mut |_| {},
    )
    .unwrap();
    let file = plan_placement_file(&report).unwrap();
    let text = file.to_toml().unwrap();
    let back = PlacementFile::parse(&text).unwrap();
    assert_eq!(back, file);
    assert_eq!(
        Some(u32::try_from(back.accelerator.len()).unwrap()),
        report.answers[1].accelerators
    );
    let ids: Vec<tidepool_core::ModelId> = workload
        .models
        .iter()
        .map(|m| tidepool_core::ModelId::new(m.id.clone()).unwrap())
        .collect();
    back.check_models(&ids).unwrap();
    for m in &workload.models {
        assert!(!back.instances(&m.id).is_empty(), "{} is placed", m.id);
    }
    let error = back.check_models(&ids[1..]).unwrap_err();
    assert!(
        matches!(
            error,
            tidepool_core::CoreError::PlacementInvalid {
                code: "placement_unknown_model",
                ..
            }
        ),
        "{error}"
    );
}

/// Models with evenly spaced requests, one stream `(gap_ns, prompt, output)` each, for
/// `duration_s`; the first starts at 0, the others a second apart.
fn streams(profile: &Profile, streams: &[(u64, u32, u32)], duration_s: u64) -> Workload {
    let s = 1_000_000_000_u64;
    let mut models = Vec::new();
    let mut requests = Vec::new();
    for (m, &(gap_ns, prompt_tokens, output_tokens)) in (0_u32..).zip(streams) {
        models.push(MarketModel {
            id: format!("m{m}"),
            family: 0,
            estimate: None,
        });
        let mut at = u64::from(m) * s;
        while at < duration_s * s {
            requests.push(Request {
                at_ns: at,
                model: m,
                prompt_tokens,
                output_tokens,
                class: tidepool_pool::RequestClass::Online,
            });
            at += gap_ns;
        }
    }
    Workload::replay(profile, models, requests).unwrap()
}

/// The first placement balances each model's busy time on its own instances: a model hotter
/// than one accelerator is not rated by one saturated accelerator's busy time (which, split
/// over its instances, looked lighter than a warm model alone), so the small models join the
/// warm model's accelerator, not the hot model's.
#[test]
fn the_first_placement_rates_a_hot_model_by_its_busy_time_on_its_instances() {
    let profile = Profile::load("h100").unwrap();
    let workload = streams(
        &profile,
        &[
            (HOT_GAP_NS, 2700, 450),
            (3_000_000_000, 1000, 200),
            (20_000_000_000, 1000, 200),
            (20_000_000_000, 1000, 200),
        ],
        120,
    );
    let base = spec(profile, PoolPolicy::Token, 4);
    let demand = size(&base, &workload, 0.99, 16).unwrap();
    assert_eq!(demand.instances, [3, 1, 1, 1], "{demand:?}");
    assert!(
        demand.busy_ns[0] / 3 > demand.busy_ns[1],
        "each hot instance is busier than the warm model: {demand:?}"
    );
    let report = simulate(
        &SimSpec {
            placement_moves_max: 0,
            instances: Instances::Given(demand),
            ..base
        },
        &workload,
        &mut |_| {},
    )
    .unwrap();
    let hot = &report.per_model[0].instances;
    let warm = report.per_model[1].accelerator;
    for small in &report.per_model[2..] {
        assert!(
            !hot.contains(&small.accelerator) && small.accelerator == warm,
            "{} on {} (hot on {hot:?}, warm on {warm})",
            small.model,
            small.accelerator
        );
    }
}
