//! The pool benchmark's Markdown tables on stdout: one row per (policy, rate) with real and
//! simulated attainment, each policy's sustainable rate against the targets, where the engine's
//! time went (real / simulated, per action and per decode batch size), the `--sim-only` table,
//! and the comparison of several real runs with their replays.

use std::io::Write as _;
use std::path::Path;

use tidepool_pool::DecodeByBatch;

use crate::actions::per_op;
use crate::common::as_f64;
use crate::report::{PoolBenchReport, RateRow, write_files};
use crate::search::ATTAINMENT_SUSTAINABLE_MIN;
use crate::workload::Market;

/// Real-length market: `token` must sustain at least this multiple of `swap-lru`'s rate.
const TARGET_LONG_VS_SWAP_LRU_MIN: f64 = 2.0;
/// Short market: `token` must sustain at least this multiple of `swap-lru`'s rate…
const TARGET_SHORT_VS_SWAP_LRU_MIN: f64 = 1.0;
/// …and at a rate both measured be at most this many points below it (both markets).
const SAME_RATE_GAP_POINTS_MAX: f64 = 2.0;
/// The simulator's validation target: simulated attainment within this many points of the real
/// run.
const SIM_GAP_POINTS_MAX: f64 = 5.0;

/// Writes the report and its plot, then prints the tables and where the files went.
pub(crate) fn write_outputs(report: &PoolBenchReport, out_path: &Path) -> anyhow::Result<()> {
    let svg_path = write_files(report, out_path)?;
    let mut out = std::io::stdout().lock();
    write_table(&mut out, report)?;
    writeln!(
        out,
        "report: {}  plot: {}",
        out_path.display(),
        svg_path.display()
    )?;
    Ok(())
}

/// Real and simulated attainment per (policy, rate) over several real runs of one workload:
/// each run's pair, the means, and the simulator's gap to the real mean.
pub(crate) fn write_runs_table(
    out: &mut impl std::io::Write,
    reports: &[PoolBenchReport],
) -> anyhow::Result<()> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    writeln!(
        out,
        "\nattainment % over {} real runs (real / sim per run; means; sim − real mean):\n\n\
         | policy | rate req/s | runs real / sim | real mean (min–max) | sim mean | sim − real mean |\n\
         |---|---|---|---|---|---|",
        reports.len()
    )?;
    let mut within = 0;
    let mut cells = 0;
    for row in &first.rows {
        let pairs: Vec<(f64, f64)> = reports
            .iter()
            .filter_map(|report| {
                report.rows.iter().find(|r| {
                    r.policy == row.policy
                        && r.market == row.market
                        && (r.rate_per_s - row.rate_per_s).abs() < 1e-9
                })
            })
            .filter_map(|r| {
                r.sim
                    .as_ref()
                    .map(|sim| (r.attainment * 100.0, sim.attainment * 100.0))
            })
            .collect();
        if pairs.len() != reports.len() {
            writeln!(
                out,
                "| {} | {} | (missing in some runs) | | | |",
                row.policy, row.rate_per_s
            )?;
            continue;
        }
        let n = as_f64(u64::try_from(pairs.len()).unwrap_or(1));
        let real_mean = pairs.iter().map(|p| p.0).sum::<f64>() / n;
        let sim_mean = pairs.iter().map(|p| p.1).sum::<f64>() / n;
        let (lo, hi) = pairs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.0), hi.max(p.0))
        });
        let runs: Vec<String> = pairs
            .iter()
            .map(|(real, sim)| format!("{real:.1} / {sim:.1}"))
            .collect();
        let gap = sim_mean - real_mean;
        cells += 1;
        if gap.abs() <= SIM_GAP_POINTS_MAX {
            within += 1;
        }
        writeln!(
            out,
            "| {} | {} | {} | {real_mean:.1} ({lo:.1}–{hi:.1}) | {sim_mean:.1} | {gap:+.1} |",
            row.policy,
            row.rate_per_s,
            runs.join(", ")
        )?;
    }
    writeln!(
        out,
        "\nsimulator vs the real mean: {within} of {cells} cells within {SIM_GAP_POINTS_MAX} points"
    )?;
    Ok(())
}

/// One line per (policy, rate): real and simulated attainment and the real run's figures.
fn write_rows(out: &mut impl std::io::Write, rows: &[RateRow]) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n| market | pass | policy | rate req/s | attainment % | sim attainment % | goodput tok/s | p50 TTFT ms | p99 TTFT ms | switches/s | loads | kv_saves | failed |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        let sim = r.sim.as_ref().map_or_else(
            || "–".to_owned(),
            |sim| match sim.speed {
                Some(speed) => format!("{:.1} ({speed})", sim.attainment * 100.0),
                None => format!("{:.1}", sim.attainment * 100.0),
            },
        );
        writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {sim} | {:.1} | {:.0} | {:.0} | {:.2} | {} | {} | {} |",
            r.market.name(),
            r.pass,
            r.policy,
            r.rate_per_s,
            r.attainment * 100.0,
            r.goodput_tokens_per_s,
            r.ttft_ms_p50,
            r.ttft_ms_p99,
            r.switches_per_s,
            r.loads,
            r.kv_saves,
            r.requests_failed + r.requests_timed_out,
        )?;
    }
    for r in rows.iter().filter(|r| !r.stream_errors.is_empty()) {
        let errors: Vec<String> = r
            .stream_errors
            .iter()
            .map(|(code, n)| format!("{n} × `{code}`"))
            .collect();
        writeln!(
            out,
            "\n{} {} at {} req/s: streams ended by an error event: {}",
            r.market.name(),
            r.policy,
            r.rate_per_s,
            errors.join(", ")
        )?;
    }
    if rows
        .iter()
        .any(|r| r.sim.as_ref().is_some_and(|s| s.speed.is_some()))
    {
        writeln!(
            out,
            "\n(×d / p / l: --at-run-speed, the run's decode / prefill / load time over the profile's)"
        )?;
    }
    Ok(())
}

/// The rows, each policy's sustainable rate and the ratios against the targets; with a replay,
/// the simulator's gaps and the engine-time tables.
pub(crate) fn write_table(
    out: &mut impl std::io::Write,
    report: &PoolBenchReport,
) -> anyhow::Result<()> {
    write_rows(out, &report.rows)?;
    writeln!(out)?;
    for p in &report.policies {
        writeln!(
            out,
            "{}: memory budget {:.0} MiB",
            p.policy,
            as_f64(p.memory_bytes_max) / 1_048_576.0
        )?;
    }
    write_markets(out, report)?;
    let gaps: Vec<f64> = report
        .rows
        .iter()
        .filter_map(|r| {
            r.sim
                .as_ref()
                .map(|sim| (sim.attainment - r.attainment).abs() * 100.0)
        })
        .collect();
    if let Some(worst) = gaps.iter().copied().reduce(f64::max) {
        let within = gaps.iter().filter(|&&g| g <= SIM_GAP_POINTS_MAX).count();
        writeln!(
            out,
            "simulator vs real: {within} of {} rows within {SIM_GAP_POINTS_MAX} points; largest gap {worst:.1} points",
            gaps.len()
        )?;
        write_cost_table(out, &report.rows)?;
        write_batch_table(out, &report.rows, report.seqs_max)?;
    }
    Ok(())
}

/// Each market's sustainable rates (the searches' brackets), `token` over `swap-lru` against
/// the market's target, and the rates both policies measured side by side.
fn write_markets(out: &mut impl std::io::Write, report: &PoolBenchReport) -> anyhow::Result<()> {
    for market in &report.markets {
        writeln!(out, "\n{} market:", market.market.name())?;
        for search in &market.searches {
            let r = search.result;
            let edge = match (r.lo_measured, r.hi_measured) {
                (false, _) => " (below the bracket: every probe failed)",
                (true, false) => " (above the bracket: every probe passed)",
                (true, true) => "",
            };
            writeln!(
                out,
                "  {}: sustainable {} req/s, bracket [{}, {}){edge} (attainment ≥ {:.0} %)",
                search.policy,
                r.sustainable_rate_per_s,
                r.lo,
                r.hi,
                ATTAINMENT_SUSTAINABLE_MIN * 100.0
            )?;
        }
        let target = match market.market {
            Market::Short => TARGET_SHORT_VS_SWAP_LRU_MIN,
            Market::Long => TARGET_LONG_VS_SWAP_LRU_MIN,
        };
        match market.ratio("token", "swap-lru") {
            Some(ratio) => writeln!(
                out,
                "  token / swap-lru: {ratio:.2}× (target ≥ {target}×: {})",
                if ratio >= target { "met" } else { "not met" }
            )?,
            None => writeln!(
                out,
                "  token / swap-lru: – (a policy was not run or sustained nothing)"
            )?,
        }
        // Rates both measured: the same requests, so the attainments compare directly.
        let rows = |policy: &'static str| {
            report
                .rows
                .iter()
                .filter(move |r| r.market == market.market && r.policy == policy)
        };
        for token in rows("token") {
            if let Some(base) =
                rows("swap-lru").find(|b| (b.rate_per_s - token.rate_per_s).abs() < 1e-9)
            {
                let gap = (token.attainment - base.attainment) * 100.0;
                writeln!(
                    out,
                    "  at {} req/s: token {:.1} %, swap-lru {:.1} % ({gap:+.1} points{})",
                    token.rate_per_s,
                    token.attainment * 100.0,
                    base.attainment * 100.0,
                    if gap < -SAME_RATE_GAP_POINTS_MAX {
                        ", more than 2 below"
                    } else {
                        ""
                    }
                )?;
            }
        }
    }
    Ok(())
}

/// Where the engine's time went, real / simulated: mean ms per action of each kind and the
/// summed busy seconds. A kind whose means disagree is the cost the simulator mis-models.
fn write_cost_table(out: &mut impl std::io::Write, rows: &[RateRow]) -> anyhow::Result<()> {
    writeln!(
        out,
        "\nengine time per action, real / sim (ms; busy s = all kinds summed):\n\n\
         | policy | rate req/s | prefill | decode step | load | kv save | kv restore | decode steps | busy s |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        let Some(sim) = &r.sim else { continue };
        let (a, b) = (&r.actions, &sim.actions);
        writeln!(
            out,
            "| {} | {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {:.1} / {:.1} |",
            r.policy,
            r.rate_per_s,
            per_op(a.prefill_ms, a.prefills),
            per_op(b.prefill_ms, b.prefills),
            per_op(a.decode_ms, a.decode_steps),
            per_op(b.decode_ms, b.decode_steps),
            per_op(a.load_ms, a.loads),
            per_op(b.load_ms, b.loads),
            per_op(a.kv_save_ms, a.kv_saves),
            per_op(b.kv_save_ms, b.kv_saves),
            per_op(a.kv_restore_ms, a.kv_restores),
            per_op(b.kv_restore_ms, b.kv_restores),
            a.decode_steps,
            b.decode_steps,
            a.busy_s(),
            b.busy_s(),
        )?;
    }
    Ok(())
}

/// The decode step by batch size, real / simulated (mean ms per step, steps in brackets): the
/// per-action means above mix batch sizes, this table does not.
fn write_batch_table(
    out: &mut impl std::io::Write,
    rows: &[RateRow],
    seqs_max: u32,
) -> anyhow::Result<()> {
    let batches = usize::try_from(seqs_max)
        .unwrap_or(1)
        .clamp(1, tidepool_pool::DECODE_BATCH_BUCKETS);
    let header: Vec<String> = (1..=batches).map(|b| format!("B = {b}")).collect();
    writeln!(
        out,
        "\ndecode step by batch size, real / sim (mean ms per step, [steps real / sim]):\n\n\
         | policy | rate req/s | {} |\n|---|---|{}",
        header.join(" | "),
        "---|".repeat(batches)
    )?;
    let step = |by: &DecodeByBatch, bucket: usize| {
        let steps = by.steps.get(bucket).copied().unwrap_or(0);
        let ns = by.ns.get(bucket).copied().unwrap_or(0);
        (steps, (steps > 0).then(|| as_f64(ns) / as_f64(steps) / 1e6))
    };
    for r in rows {
        let Some(sim) = &r.sim else { continue };
        let cells: Vec<String> = (0..batches)
            .map(|bucket| {
                let (real_steps, real) = step(&r.actions.decode_by_batch, bucket);
                let (sim_steps, simulated) = step(&sim.actions.decode_by_batch, bucket);
                let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
                format!(
                    "{} / {} [{real_steps} / {sim_steps}]",
                    ms(real),
                    ms(simulated)
                )
            })
            .collect();
        writeln!(
            out,
            "| {} | {} | {} |",
            r.policy,
            r.rate_per_s,
            cells.join(" | ")
        )?;
    }
    Ok(())
}
