//! The simulator's replay of a pool benchmark: every (policy, rate) of a real run (or the
//! planned schedule) simulated with a profile, under the same requests, budget, SLOs, pool knobs,
//! starting residents and cost beliefs as the server had; optionally again at the engine speed
//! the run measured (`--at-run-speed`: the profile's costs scaled by what the run's engine took
//! over what the profile charged), so what is left of the gap is the scheduling model. `--replay`
//! does the same for reports an earlier run wrote, without servers.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tidepool_core::PoolPolicy;
use tidepool_sim::workload::{MarketModel, Workload};
use tidepool_sim::{Profile, SimSpec, simulate};

use crate::actions::{ActionTimes, add_to_family};
use crate::common::parse_policy;
use crate::report::{PolicySummary, PoolBenchReport, RateRow, SimRow};
use crate::speed::{apply_speed, run_speed};
use crate::table::{write_runs_table, write_table};
use crate::workload::{BenchModel, ServerKnobs};

/// The simulator's report as a row's `sim` part.
fn sim_row(report: &tidepool_sim::Report) -> SimRow {
    let counts = [
        report.prefills,
        report.decode_steps,
        report.loads,
        report.kv_saves,
        report.kv_restores,
    ];
    let mut actions = ActionTimes::new(counts, &report.in_flight_ns, report.decode_by_batch);
    for model in &report.per_model {
        add_to_family(
            &mut actions.decode_by_family,
            &model.family,
            &model.decode_by_batch,
        );
    }
    SimRow {
        attainment: report.attainment,
        ttft_ms_p99: report.ttft_ms_p99,
        loads: report.loads,
        kv_saves: report.kv_saves,
        requests_rejected: report.requests_rejected,
        actions,
        speed: None,
    }
}

/// Replays every row in the simulator with `profile`: the same requests, the budget each
/// server reported, the SLOs, and the pool knobs of the server's configuration.
pub(crate) fn simulate_rows(
    profile: &Profile,
    models: &[BenchModel],
    policies: &[PolicySummary],
    rows: &mut [RateRow],
    knobs: &ServerKnobs,
    at_run_speed: bool,
) -> anyhow::Result<()> {
    let market: Vec<MarketModel> = models
        .iter()
        .map(|m| {
            let family = profile
                .families
                .iter()
                .position(|f| f.name == m.family)
                .with_context(|| format!("profile has no family `{}`", m.family))?;
            Ok(MarketModel {
                id: m.id.clone(),
                family,
                estimate: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let pool_knobs = knobs.pool_knobs();
    // Every model of the market at once: what `dedicated` must fit.
    let needed: u64 = market
        .iter()
        .filter_map(|m| profile.families.get(m.family))
        .map(tidepool_sim::profile::Family::resident_bytes)
        .sum();
    for row in rows {
        let policy = parse_policy(&row.policy)?;
        let mut profile = profile.clone();
        if let Some(summary) = policies.iter().find(|p| p.policy == row.policy) {
            profile.accelerator.memory_bytes = summary.memory_bytes_max;
        }
        if policy == PoolPolicy::Dedicated {
            profile.accelerator.memory_bytes = profile
                .accelerator
                .memory_bytes
                .max(needed + knobs.kv_saved_bytes_max);
        }
        profile.accelerator.kv_saved_bytes_max = knobs.kv_saved_bytes_max;
        // The server's own cost beliefs and residents at the rate's start (the rates run one
        // after another on one server, so a later rate starts from what the earlier left).
        let mut market = market.clone();
        for (model, estimate) in market.iter_mut().zip(&row.estimates) {
            model.estimate = *estimate;
        }
        let mut workload = Workload::replay(&profile, market, row.replay.clone())?;
        workload.warm.clone_from(&row.resident_at_start);
        let spec = SimSpec {
            profile,
            policy,
            accelerators: 1,
            knobs: pool_knobs,
            memory_models_max: None,
            // One accelerator: nothing to place.
            placement_moves_max: 0,
            search_sample_requests: tidepool_sim::SEARCH_SAMPLE_REQUESTS,
            search_until_attainment: None,
            instances: tidepool_sim::Instances::One,
            placement: None,
        };
        let real = at_run_speed.then_some(&row.actions);
        row.sim = Some(simulate_row(spec, &workload, real)?);
    }
    Ok(())
}

/// One row in the simulator; given the `real` run's engine times, again at its speed
/// (`--at-run-speed`).
fn simulate_row(
    mut spec: SimSpec,
    workload: &Workload,
    real: Option<&ActionTimes>,
) -> anyhow::Result<SimRow> {
    let sim = sim_row(&simulate(&spec, workload, &mut |_| {})?);
    let Some(speed) = real.and_then(|real| run_speed(real, &sim.actions)) else {
        return Ok(sim);
    };
    apply_speed(speed, &mut spec.profile);
    Ok(SimRow {
        speed: Some(speed),
        ..sim_row(&simulate(&spec, workload, &mut |_| {})?)
    })
}

/// `--replay`: the rows of an earlier real run, simulated again with `--sim-profile` under the
/// run's own SLOs and knobs; prints the comparison and the per-action cost table.
pub(crate) fn replay_reports(
    profile_path: &Path,
    reports: &[PathBuf],
    at_run_speed: bool,
) -> anyhow::Result<()> {
    let profile = Profile::load(&profile_path.to_string_lossy())
        .with_context(|| format!("simulator profile {}", profile_path.display()))?;
    let paths = reports;
    let mut reports = Vec::with_capacity(paths.len());
    let mut out = std::io::stdout().lock();
    for path in paths {
        let mut report = replay_report(path, &profile, at_run_speed)?;
        report.sim_profile = Some(profile_path.display().to_string());
        writeln!(out, "\n{}:", path.display())?;
        write_table(&mut out, &report)?;
        reports.push(report);
    }
    if reports.len() > 1 {
        write_runs_table(&mut out, &reports)?;
    }
    Ok(())
}

/// One report of an earlier real run, its rows simulated again under `profile`.
fn replay_report(
    path: &Path,
    profile: &Profile,
    at_run_speed: bool,
) -> anyhow::Result<PoolBenchReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut report: PoolBenchReport =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    if report.rows.iter().any(|r| r.replay.is_empty()) {
        bail!(
            "{} holds no requests to replay (written before `--replay` existed): run the bench again",
            path.display()
        );
    }
    // The run's own SLOs and knobs, whatever the flags say.
    let knobs = report.knobs();
    simulate_rows(
        profile,
        &report.models,
        &report.policies,
        &mut report.rows,
        &knobs,
        at_run_speed,
    )?;
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use tidepool_sim::workload::Request;

    use super::*;
    use crate::report::finish_report;
    use crate::workload::tests::sweep;
    use crate::workload::{Market, build_workloads, planned_requests, warm_models};

    const POLICIES: [&str; 3] = ["dedicated", "swap-lru", "token"];

    /// The pool knobs of `tidepool bench pool`'s defaults.
    pub(crate) fn knobs() -> ServerKnobs {
        ServerKnobs {
            slo: crate::workload::Slo {
                ttft_ms: 3_000,
                tbt_ms: 300,
            },
            kv_saved_bytes_max: 128 * 1024 * 1024,
            decode_steps_min: 16,
            turn_quota_ms_max: 4000,
            prefill_cold_lazy: false,
            round_resident_first: false,
            prefill_riders: false,
        }
    }

    /// A row as `--sim-only` builds it: nothing measured, `replay` planned.
    fn planned_row(policy: &str, replay: Vec<Request>) -> RateRow {
        RateRow {
            policy: policy.to_owned(),
            market: Market::Short,
            pass: 0,
            rate_per_s: 0.5,
            requests: 0,
            requests_failed: 0,
            requests_timed_out: 0,
            statuses: BTreeMap::new(),
            stream_errors: BTreeMap::new(),
            tokens_expected: 0,
            tokens_on_time: 0,
            attainment: 0.0,
            goodput_tokens_per_s: 0.0,
            ttft_ms_p50: 0.0,
            ttft_ms_p99: 0.0,
            wall_s: 0.0,
            switches_per_s: 0.0,
            loads: 0,
            evictions: 0,
            kv_saves: 0,
            send_lag_ms_max: 0.0,
            actions: ActionTimes::default(),
            sim: None,
            resident_at_start: warm_models(parse_policy(policy).unwrap(), 8),
            replay,
            estimates: Vec::new(),
        }
    }

    #[test]
    fn rows_replay_in_the_simulator_deterministically() {
        let (models, schedules) = build_workloads(&sweep(&[0.5], 20)).unwrap();
        let knobs = knobs();
        let profile = Profile::load("cpu-devvm").unwrap();
        let served = planned_requests(&schedules[0]);
        let rows = || -> Vec<RateRow> {
            POLICIES
                .iter()
                .map(|policy| planned_row(policy, served.clone()))
                .collect()
        };
        let summaries: Vec<PolicySummary> = POLICIES
            .iter()
            .map(|policy| PolicySummary {
                policy: (*policy).to_owned(),
                memory_bytes_max: profile.accelerator.memory_bytes,
                sustainable_rate_per_s: 0.0,
            })
            .collect();
        let mut first = rows();
        simulate_rows(&profile, &models, &summaries, &mut first, &knobs, false).unwrap();
        let mut second = rows();
        simulate_rows(&profile, &models, &summaries, &mut second, &knobs, false).unwrap();
        for (a, b) in first.iter().zip(&second) {
            let (sa, sb) = (a.sim.as_ref().unwrap(), b.sim.as_ref().unwrap());
            assert!((0.0..=1.0).contains(&sa.attainment), "{sa:?}");
            assert!(sa.attainment.to_bits() == sb.attainment.to_bits() && sa.loads == sb.loads);
            // The pool's own accounting of the modelled time: work was done and charged.
            assert!(
                sa.actions.prefills > 0 && sa.actions.prefill_ms > 0.0,
                "{sa:?}"
            );
            assert!(
                sa.actions.decode_steps > 0 && sa.actions.decode_ms > 0.0,
                "{sa:?}"
            );
        }
        // Dedicated starts warm with every model (as the real server after its warm-up): no load
        // during the replay, never a saved sequence.
        let dedicated = first[0].sim.as_ref().unwrap();
        assert_eq!(dedicated.loads, 0, "{dedicated:?}");
        assert_eq!(warm_models(PoolPolicy::SwapLru, 8), [2, 1, 0]);
        assert_eq!(warm_models(PoolPolicy::Dedicated, 3), [2, 1, 0]);
        assert_eq!(dedicated.kv_saves, 0);
        // A profile without the market's families is an error, not a silent mismatch.
        let mut other = profile.clone();
        for f in &mut other.families {
            f.name = format!("x-{}", f.name);
        }
        assert!(simulate_rows(&other, &models, &summaries, &mut rows(), &knobs, false).is_err());
    }

    #[test]
    fn at_run_speed_simulates_each_row_at_its_measured_speed() {
        let (models, schedules) = build_workloads(&sweep(&[2.0], 20)).unwrap();
        let knobs = knobs();
        let profile = Profile::load("cpu-devvm").unwrap();
        let summaries = [PolicySummary {
            policy: "dedicated".to_owned(),
            memory_bytes_max: profile.accelerator.memory_bytes,
            sustainable_rate_per_s: 0.0,
        }];
        let served = planned_requests(&schedules[0]);
        let mut rows = vec![planned_row("dedicated", served.clone())];
        simulate_rows(&profile, &models, &summaries, &mut rows, &knobs, false).unwrap();
        let calibrated = rows[0].sim.clone().unwrap();
        assert_eq!(calibrated.speed, None);
        // A "real run" whose engine decoded 1.5× slower than the profile at every batch size
        // and prefilled 1.2× slower.
        let mut slow = calibrated.actions.clone();
        assert!(
            slow.decode_by_family.len() == 2,
            "both families decoded: {slow:?}"
        );
        for by in
            std::iter::once(&mut slow.decode_by_batch).chain(slow.decode_by_family.values_mut())
        {
            for ns in &mut by.ns {
                *ns = *ns * 3 / 2;
            }
        }
        slow.prefill_ms *= 1.2;
        let mut rows = vec![planned_row("dedicated", served)];
        rows[0].actions = slow;
        simulate_rows(&profile, &models, &summaries, &mut rows, &knobs, true).unwrap();
        let at_speed = rows[0].sim.as_ref().unwrap();
        let speed = at_speed.speed.unwrap();
        assert!((speed.decode - 1.5).abs() < 1e-6, "{speed:?}");
        assert!(
            speed.prefill.is_some_and(|p| (p - 1.2).abs() < 1e-9),
            "{speed:?}"
        );
        assert_eq!(speed.load, None, "dedicated loads nothing: {speed:?}");
        // Every modelled cost is dearer: more busy time, and no better attainment.
        assert!(
            at_speed.actions.busy_s() > calibrated.actions.busy_s() * 1.3,
            "{at_speed:?} {calibrated:?}"
        );
        assert!(
            at_speed.attainment < calibrated.attainment,
            "{at_speed:?} {calibrated:?}"
        );
    }

    /// A report written by a run holds what `--replay` needs: it reads back with every row's
    /// requests, residents and estimates, and re-simulates without servers.
    #[test]
    fn a_written_report_replays_without_servers() {
        let sweep = sweep(&[0.5], 10);
        let (models, schedules) = build_workloads(&sweep).unwrap();
        let served = planned_requests(&schedules[0]);
        let mut rows: Vec<RateRow> = POLICIES
            .iter()
            .map(|policy| planned_row(policy, served.clone()))
            .collect();
        rows[0].estimates = vec![None; models.len()];
        let memory_bytes_max = Profile::load("cpu-devvm").unwrap().accelerator.memory_bytes;
        let policies: Vec<PolicySummary> = POLICIES
            .iter()
            .map(|policy| PolicySummary {
                policy: (*policy).to_owned(),
                memory_bytes_max,
                sustainable_rate_per_s: 0.0,
            })
            .collect();
        let report = finish_report(models, policies, rows, Vec::new(), &sweep, &knobs(), None);
        let dir = std::env::temp_dir().join(format!("tidepool-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.json");
        std::fs::write(&path, serde_json::to_vec(&report).unwrap()).unwrap();
        let back: PoolBenchReport = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.rows.len(), report.rows.len());
        assert_eq!(back.rows[0].replay, served);
        assert_eq!(back.rows[0].estimates.len(), report.models.len());
        assert_eq!(
            back.rows[1].resident_at_start,
            report.rows[1].resident_at_start
        );
        let profile = Profile::load("cpu-devvm").unwrap();
        runs_table_shows_each_run_and_the_means(&path, &profile);
        // A report without requests (older runs) is refused with a clear error.
        let mut empty = serde_json::to_value(&report).unwrap();
        for row in empty["rows"].as_array_mut().unwrap() {
            row.as_object_mut().unwrap().remove("replay");
        }
        std::fs::write(&path, serde_json::to_vec(&empty).unwrap()).unwrap();
        let error = replay_report(&path, &profile, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no requests to replay"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two real runs of the workload (one report replayed twice, real attainment set apart):
    /// per cell both pairs, the real mean with its range, the simulator's gap to that mean.
    fn runs_table_shows_each_run_and_the_means(path: &Path, profile: &Profile) {
        let mut runs = [
            replay_report(path, profile, false).unwrap(),
            replay_report(path, profile, false).unwrap(),
        ];
        assert!(runs[0].rows.iter().all(|r| r.sim.is_some()));
        for (run, real) in runs.iter_mut().zip([0.9, 0.8]) {
            for row in &mut run.rows {
                row.attainment = real;
                if let Some(sim) = row.sim.as_mut() {
                    sim.attainment = 0.87;
                }
            }
        }
        let mut table = Vec::new();
        write_runs_table(&mut table, &runs).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(
            table.contains(
                "| dedicated | 0.5 | 90.0 / 87.0, 80.0 / 87.0 | 85.0 (80.0–90.0) | 87.0 | +2.0 |"
            ),
            "{table}"
        );
        assert!(table.contains("3 of 3 cells within 5 points"), "{table}");
        let paths = [path.to_owned(), path.to_owned()];
        replay_reports(Path::new("cpu-devvm"), &paths, false).unwrap();
    }
}
