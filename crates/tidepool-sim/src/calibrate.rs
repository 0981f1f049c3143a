//! Fitting engine measurements to a profile [`Family`]: `tidepool bench calibrate` times the real
//! engine (prefills of several lengths, decode steps of several batch sizes and contexts, loads,
//! KV saves and restores) and this module turns those samples into the cost curves the simulator
//! uses, by non-negative least squares.
//!
//! The module knows nothing of the engine: samples are plain numbers, so the fit is tested with
//! synthetic data of known coefficients.

use serde::{Deserialize, Serialize};

use crate::SimError;
use crate::profile::{DECODE_TABLE_BATCH_MAX, Family, SwitchPhases, as_f64};

/// Samples of one kind in a fit, at most this many.
pub const SAMPLES_MAX: usize = 4096;

/// One prefill action: prompts of `tokens` tokens in total and `tokens_sq` = Σ length².
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillSample {
    pub tokens: u64,
    pub tokens_sq: u64,
    pub ns: u64,
}

/// One decode step of `batch` sequences holding `ctx_tokens` tokens in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeSample {
    pub batch: u32,
    pub ctx_tokens: u64,
    pub ns: u64,
}

/// Saving and restoring one sequence state of `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSample {
    pub bytes: u64,
    pub save_ns: u64,
    pub restore_ns: u64,
}

/// One prompt's prefill timed alone and, right after, another prompt of the same length with
/// `riders` decoding sequences (holding `ctx_tokens` in total) riding in its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiderSample {
    pub riders: u32,
    pub ctx_tokens: u64,
    pub prompt_tokens: u64,
    pub alone_ns: u64,
    pub with_riders_ns: u64,
}

/// Everything measured of one model family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyMeasurements {
    pub name: String,
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub seqs_max: u32,
    pub seq_tokens_max: u32,
    /// Context bytes besides the KV cells (logits, buffers the engine reports).
    pub ctx_fixed_bytes: u64,
    /// Weights in plus context creation, one sample per load.
    pub load_ns: Vec<u64>,
    pub unload_ns: Vec<u64>,
    pub prefill: Vec<PrefillSample>,
    pub decode: Vec<DecodeSample>,
    /// Absent in samples written before riders existed.
    #[serde(default)]
    pub riders: Vec<RiderSample>,
    /// The phases of a switch (absent in samples written before they were measured).
    #[serde(default)]
    pub switch: Option<SwitchPhases>,
}

/// A fitted family and how well the curves explain the samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyFit {
    pub family: Family,
    /// Root-mean-square of (fitted − measured) / measured over the prefill samples.
    pub prefill_error_rms: f64,
    /// The same over the decode samples.
    pub decode_error_rms: f64,
}

/// Fitted KV transfer costs: `kv_fixed_s + bytes / bytes_per_s`, each direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TransferFit {
    pub kv_fixed_s: f64,
    pub d2h_bytes_per_s: f64,
    pub h2d_bytes_per_s: f64,
}

fn invalid(reason: &'static str) -> SimError {
    SimError::WorkloadInvalid { reason }
}

/// Fits prefill `fixed + a·Σt + b·Σt²` and decode `fixed + c·B + d·Σctx` (all ≥ 0), and takes
/// medians of the load and unload times. Share 1; the caller sets it.
///
/// When the decode samples cover every batch size from 1 up, the decode step is also fitted as a
/// table, one value per batch size plus the shared `d·Σctx` ([`Family::decode_batch_ms`]): CPU
/// steps are not linear in the batch, and the line through them misprices the batch sizes a
/// lightly loaded server runs most (on the dev VM it made batch 1 a third dearer than measured).
/// The line's `fixed + c·B` is kept for batches past the table. The decode error is then the
/// table's.
pub fn fit_family(m: &FamilyMeasurements) -> Result<FamilyFit, SimError> {
    if m.prefill.len() < 3 || m.decode.len() < 3 || m.load_ns.is_empty() {
        return Err(invalid(
            "calibration needs ≥ 3 prefill and decode samples and a load",
        ));
    }
    if m.prefill.len() > SAMPLES_MAX || m.decode.len() > SAMPLES_MAX {
        return Err(invalid("more calibration samples than SAMPLES_MAX"));
    }
    let prefill_rows: Vec<([f64; 3], f64)> = m
        .prefill
        .iter()
        .map(|s| ([1.0, as_f64(s.tokens), as_f64(s.tokens_sq)], as_f64(s.ns)))
        .collect();
    let decode_rows: Vec<([f64; 3], f64)> = m
        .decode
        .iter()
        .map(|s| {
            (
                [1.0, f64::from(s.batch), as_f64(s.ctx_tokens)],
                as_f64(s.ns),
            )
        })
        .collect();
    let prefill = nnls3(&prefill_rows).ok_or_else(|| invalid("prefill samples do not fit"))?;
    let mut decode = nnls3(&decode_rows).ok_or_else(|| invalid("decode samples do not fit"))?;
    if decode[0] + decode[1] <= 0.0 {
        return Err(invalid("decode steps measured as free"));
    }
    let table = fit_decode_table(&m.decode, decode[2]);
    let decode_error_rms = match &table {
        Some(table) => {
            decode[2] = table.per_ctx_token_ns;
            table.relative_rms(&m.decode)
        }
        None => relative_rms(&decode_rows, decode),
    };
    let ms = |ns: f64| ns / 1e6;
    let family = Family {
        name: m.name.clone(),
        share: 1,
        weights_bytes: m.weights_bytes,
        kv_bytes_per_token: m.kv_bytes_per_token,
        seqs_max: m.seqs_max,
        seq_tokens_max: m.seq_tokens_max,
        ctx_fixed_bytes: m.ctx_fixed_bytes,
        prefill_fixed_ms: ms(prefill[0]),
        prefill_per_token_ms: ms(prefill[1]),
        prefill_per_token_sq_ms: ms(prefill[2]),
        decode_fixed_ms: ms(decode[0]),
        decode_per_seq_ms: ms(decode[1]),
        decode_per_1k_ctx_ms: ms(decode[2]) * 1000.0,
        decode_batch_ms: table
            .map(|t| t.batch_ns.iter().map(|&ns| ms(ns)).collect())
            .unwrap_or_default(),
        prefill_rider_ms: fit_rider_ns(&m.riders, decode[2]).map(ms),
        load_s: median(&m.load_ns) / 1e9,
        ctx_create_s: 0.0,
        unload_s: if m.unload_ns.is_empty() {
            0.0
        } else {
            median(&m.unload_ns) / 1e9
        },
        switch: m.switch,
    };
    Ok(FamilyFit {
        family,
        prefill_error_rms: relative_rms(&prefill_rows, prefill),
        decode_error_rms,
    })
}

/// A decode step as one value per batch size (no context) plus a shared slope per context token.
#[derive(Debug, Clone, PartialEq)]
struct DecodeTable {
    /// Index 0 is batch 1.
    batch_ns: Vec<f64>,
    per_ctx_token_ns: f64,
}

impl DecodeTable {
    fn predict(&self, s: &DecodeSample) -> Option<f64> {
        let base = self.batch_ns.get(batch_index(s.batch)?)?;
        Some(base + self.per_ctx_token_ns * as_f64(s.ctx_tokens))
    }

    fn relative_rms(&self, samples: &[DecodeSample]) -> f64 {
        relative_rms_of(
            samples
                .iter()
                .filter_map(|s| Some((self.predict(s)?, as_f64(s.ns)))),
        )
    }
}

/// Index of a batch size in a per-batch table (batch 1 at 0); `None` for batch 0.
fn batch_index(batch: u32) -> Option<usize> {
    usize::try_from(batch).ok()?.checked_sub(1)
}

/// Least squares of `ns = a_B + d·ctx` with one intercept per batch size and `d ≥ 0`: `d` from
/// the spread of context within each batch size (`fallback_d` when no batch size was measured at
/// two contexts), each `a_B` the batch's mean less `d·` its mean context. `None` unless every
/// batch size from 1 to the largest measured (at most [`DECODE_TABLE_BATCH_MAX`]) has samples.
fn fit_decode_table(samples: &[DecodeSample], fallback_d: f64) -> Option<DecodeTable> {
    let largest = usize::try_from(samples.iter().map(|s| s.batch).max()?).ok()?;
    if largest == 0 || largest > DECODE_TABLE_BATCH_MAX {
        return None;
    }
    // Per batch size: (n, Σctx, Σns).
    let mut sums = vec![(0.0_f64, 0.0_f64, 0.0_f64); largest];
    for s in samples {
        let slot = sums.get_mut(batch_index(s.batch)?)?;
        slot.0 += 1.0;
        slot.1 += as_f64(s.ctx_tokens);
        slot.2 += as_f64(s.ns);
    }
    if sums.iter().any(|(n, _, _)| *n == 0.0) {
        return None;
    }
    let means: Vec<(f64, f64)> = sums.iter().map(|(n, c, y)| (c / n, y / n)).collect();
    let (mut covariance, mut variance) = (0.0, 0.0);
    for s in samples {
        let (c_mean, y_mean) = means.get(batch_index(s.batch)?).copied()?;
        let dc = as_f64(s.ctx_tokens) - c_mean;
        covariance += dc * (as_f64(s.ns) - y_mean);
        variance += dc * dc;
    }
    let d = if variance > 0.0 {
        (covariance / variance).max(0.0)
    } else {
        fallback_d.max(0.0)
    };
    // A step is never free: an intercept the slope drove to ≤ 0 becomes 1 ns.
    let batch_ns = means.iter().map(|(c, y)| (y - d * c).max(1.0)).collect();
    Some(DecodeTable {
        batch_ns,
        per_ctx_token_ns: d,
    })
}

/// One rider's cost besides its context term: the extra time of the prefills with riders over
/// the same-length prefills alone, less `per_ctx_token_ns` of the riders' context, per rider
/// (pooled over the samples, ≥ 0). `None` without samples that carried riders.
fn fit_rider_ns(samples: &[RiderSample], per_ctx_token_ns: f64) -> Option<f64> {
    let riders: u64 = samples.iter().map(|s| u64::from(s.riders)).sum();
    if riders == 0 {
        return None;
    }
    let extra: f64 = samples
        .iter()
        .map(|s| {
            as_f64(s.with_riders_ns) - as_f64(s.alone_ns) - per_ctx_token_ns * as_f64(s.ctx_tokens)
        })
        .sum();
    Some((extra / as_f64(riders)).max(0.0))
}

/// Fits `fixed + bytes / bandwidth` for saves and restores (one shared fixed cost).
pub fn fit_transfer(samples: &[TransferSample]) -> Result<TransferFit, SimError> {
    if samples.len() < 2 || samples.len() > SAMPLES_MAX {
        return Err(invalid("transfer fit needs 2..=SAMPLES_MAX samples"));
    }
    let rows = |pick: fn(&TransferSample) -> u64| -> Vec<([f64; 3], f64)> {
        samples
            .iter()
            .map(|s| ([1.0, as_f64(s.bytes), 0.0], as_f64(pick(s))))
            .collect()
    };
    let save = nnls3(&rows(|s| s.save_ns)).ok_or_else(|| invalid("save samples do not fit"))?;
    let restore =
        nnls3(&rows(|s| s.restore_ns)).ok_or_else(|| invalid("restore samples do not fit"))?;
    // A slope of 0 (transfers too fast to see) becomes a very high bandwidth, not a division by 0.
    let bandwidth = |ns_per_byte: f64| 1e9 / ns_per_byte.max(1e-6);
    Ok(TransferFit {
        kv_fixed_s: f64::midpoint(save[0], restore[0]) / 1e9,
        d2h_bytes_per_s: bandwidth(save[1]),
        h2d_bytes_per_s: bandwidth(restore[1]),
    })
}

fn median(values: &[u64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    match (
        sorted.get(n / 2),
        n.checked_sub(1).and_then(|i| sorted.get(i / 2)),
    ) {
        (Some(&hi), Some(&lo)) if n.is_multiple_of(2) => f64::midpoint(as_f64(lo), as_f64(hi)),
        (Some(&mid), _) => as_f64(mid),
        _ => 0.0,
    }
}

fn relative_rms(rows: &[([f64; 3], f64)], coef: [f64; 3]) -> f64 {
    relative_rms_of(
        rows.iter()
            .map(|(x, y)| (x[0] * coef[0] + x[1] * coef[1] + x[2] * coef[2], *y)),
    )
}

/// Root-mean-square of (fitted − measured) / measured over `(fitted, measured)` pairs whose
/// measurement is positive; 0 when there is none.
fn relative_rms_of(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    for (fitted, y) in pairs.filter(|(_, y)| *y > 0.0) {
        sum += ((fitted - y) / y).powi(2);
        n += 1.0;
    }
    if n > 0.0 { (sum / n).sqrt() } else { 0.0 }
}

/// Non-negative least squares over three columns: the best of the unconstrained solutions on
/// every subset of columns whose coefficients are all ≥ 0 (exact for three unknowns, where the
/// active-set search would visit the same subsets). `None` if no subset solves.
fn nnls3(rows: &[([f64; 3], f64)]) -> Option<[f64; 3]> {
    let mut best: Option<([f64; 3], f64)> = None;
    for mask in 1_u8..8 {
        let cols: Vec<usize> = (0..3).filter(|&c| mask & (1 << c) != 0).collect();
        let Some(solution) = least_squares(rows, &cols) else {
            continue;
        };
        if solution.iter().any(|&c| c < 0.0 || !c.is_finite()) {
            continue;
        }
        let residual: f64 = rows
            .iter()
            .map(|(x, y)| {
                (x[0] * solution[0] + x[1] * solution[1] + x[2] * solution[2] - y).powi(2)
            })
            .sum();
        if best.is_none_or(|(_, r)| residual < r * (1.0 - 1e-12)) {
            best = Some((solution, residual));
        }
    }
    best.map(|(solution, _)| solution)
}

/// Least squares on the columns `cols` (normal equations, Gaussian elimination with pivoting);
/// the other coefficients are 0. `None` when the system is singular.
fn least_squares(rows: &[([f64; 3], f64)], cols: &[usize]) -> Option<[f64; 3]> {
    let k = cols.len();
    // Scale each column to unit RMS so Σt and Σt² of very different sizes stay well conditioned.
    let scale: Vec<f64> = cols
        .iter()
        .map(|&c| {
            let ss: f64 = rows.iter().map(|(x, _)| x[c] * x[c]).sum();
            (ss / as_f64(u64::try_from(rows.len()).unwrap_or(1))).sqrt()
        })
        .collect();
    if scale.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
        return None;
    }
    let mut a = vec![vec![0.0_f64; k + 1]; k];
    for (x, y) in rows {
        for i in 0..k {
            let xi = x[cols[i]] / scale[i];
            for j in 0..k {
                a[i][j] += xi * x[cols[j]] / scale[j];
            }
            a[i][k] += xi * y;
        }
    }
    for col in 0..k {
        let pivot = (col..k).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() < 1e-9 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (row, values) in a.iter_mut().enumerate() {
            if row != col {
                let factor = values[col] / pivot_row[col];
                for (v, p) in values.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= factor * p;
                }
            }
        }
    }
    let mut out = [0.0; 3];
    for (i, &c) in cols.iter().enumerate() {
        out[c] = a[i][k] / a[i][i] / scale[i];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurements(prefill: [f64; 3], decode: [f64; 3]) -> FamilyMeasurements {
        let mut m = FamilyMeasurements {
            name: "toy".into(),
            weights_bytes: 100,
            kv_bytes_per_token: 10,
            seqs_max: 4,
            seq_tokens_max: 512,
            ctx_fixed_bytes: 7,
            load_ns: vec![300, 100, 200],
            unload_ns: vec![10, 30],
            prefill: Vec::new(),
            decode: Vec::new(),
            riders: Vec::new(),
            switch: None,
        };
        for t in [8_u64, 32, 64, 128, 192, 256] {
            let ns = prefill[0] + prefill[1] * as_f64(t) + prefill[2] * as_f64(t * t);
            m.prefill.push(PrefillSample {
                tokens: t,
                tokens_sq: t * t,
                ns: crate::profile::f64_ns(ns),
            });
        }
        for batch in 1..=4_u32 {
            for ctx in [32_u64, 224] {
                let total = ctx * u64::from(batch);
                let ns = decode[0] + decode[1] * f64::from(batch) + decode[2] * as_f64(total);
                m.decode.push(DecodeSample {
                    batch,
                    ctx_tokens: total,
                    ns: crate::profile::f64_ns(ns),
                });
            }
        }
        m
    }

    #[test]
    fn known_coefficients_are_recovered() {
        let fit = fit_family(&measurements([2e6, 5e6, 300.0], [4e6, 10e6, 2000.0])).unwrap();
        let f = &fit.family;
        assert!((f.prefill_fixed_ms - 2.0).abs() < 1e-3, "{f:?}");
        assert!((f.prefill_per_token_ms - 5.0).abs() < 1e-4, "{f:?}");
        assert!((f.prefill_per_token_sq_ms - 3e-4).abs() < 1e-6, "{f:?}");
        assert!((f.decode_fixed_ms - 4.0).abs() < 1e-3, "{f:?}");
        assert!((f.decode_per_seq_ms - 10.0).abs() < 1e-3, "{f:?}");
        assert!((f.decode_per_1k_ctx_ms - 2.0).abs() < 1e-3, "{f:?}");
        assert!((f.load_s - 200e-9).abs() < 1e-15);
        assert!((f.unload_s - 20e-9).abs() < 1e-15);
        assert!(fit.prefill_error_rms < 1e-6 && fit.decode_error_rms < 1e-6);
        // Linear samples give a linear table.
        for (batch, ms) in (1..=4_u32).zip(&f.decode_batch_ms) {
            assert!((ms - (4.0 + 10.0 * f64::from(batch))).abs() < 1e-3, "{f:?}");
        }
    }

    #[test]
    fn a_riders_cost_is_its_extra_prefill_time_less_its_context_term() {
        // Decode context slope 2000 ns/token; a rider costs 1.5 ms besides its context.
        let mut m = measurements([2e6, 5e6, 0.0], [4e6, 10e6, 2000.0]);
        assert_eq!(fit_family(&m).unwrap().family.prefill_rider_ms, None);
        for (riders, alone_ns) in [(1_u32, 640e6), (7, 655e6), (15, 630e6)] {
            let ctx_tokens = u64::from(riders) * 129;
            let extra = 1.5e6 * f64::from(riders) + 2000.0 * as_f64(ctx_tokens);
            m.riders.push(RiderSample {
                riders,
                ctx_tokens,
                prompt_tokens: 128,
                alone_ns: crate::profile::f64_ns(alone_ns),
                with_riders_ns: crate::profile::f64_ns(alone_ns + extra),
            });
        }
        let f = fit_family(&m).unwrap().family;
        let rider_ms = f.prefill_rider_ms.unwrap();
        assert!((rider_ms - 1.5).abs() < 1e-3, "{f:?}");
        // The simulator charges the riders of one sample exactly its measured extra time.
        let costs = crate::profile::Costs::new(&crate::profile::tests::accelerator(), &f);
        let s = m.riders[2];
        let charged = costs.rider_ns(15, s.ctx_tokens);
        assert!(
            charged.abs_diff(s.with_riders_ns - s.alone_ns) <= 1000,
            "{charged}"
        );
        // Riders measured as cheaper than nothing cost nothing (noise, not a rebate).
        for s in &mut m.riders {
            s.with_riders_ns = s.alone_ns;
        }
        assert_eq!(fit_family(&m).unwrap().family.prefill_rider_ms, Some(0.0));
    }

    #[test]
    fn a_decode_table_holds_each_batch_size_and_the_shared_context_slope() {
        // Batch 3 dearer than batch 4 (as Gemma-3 on the dev VM): no line fits, the table does.
        let mut m = measurements([0.0, 5e6, 0.0], [4e6, 10e6, 2000.0]);
        let step = [8e6, 15e6, 50e6, 40e6];
        for s in &mut m.decode {
            let base = step[usize::try_from(s.batch).unwrap() - 1];
            s.ns = crate::profile::f64_ns(base + 3000.0 * as_f64(s.ctx_tokens));
        }
        let fit = fit_family(&m).unwrap();
        let f = &fit.family;
        assert_eq!(f.decode_batch_ms.len(), 4, "{f:?}");
        for (fitted, want) in f.decode_batch_ms.iter().zip(step) {
            assert!((fitted - want / 1e6).abs() < 1e-3, "{f:?}");
        }
        assert!((f.decode_per_1k_ctx_ms - 3.0).abs() < 1e-3, "{f:?}");
        assert!(fit.decode_error_rms < 1e-6, "{fit:?}");
        // The simulator's cost of a step now matches every measured sample.
        let costs = crate::profile::Costs::new(&crate::profile::tests::accelerator(), f);
        for s in &m.decode {
            let simulated = costs.decode_ns(f64::from(s.batch), as_f64(s.ctx_tokens));
            assert!(simulated.abs_diff(s.ns) <= 1000, "{s:?}: {simulated}");
        }
    }

    #[test]
    fn a_gap_in_the_measured_batch_sizes_leaves_the_line_alone() {
        let mut m = measurements([0.0, 5e6, 0.0], [4e6, 10e6, 2000.0]);
        m.decode.retain(|s| s.batch != 2);
        let fit = fit_family(&m).unwrap();
        assert!(fit.family.decode_batch_ms.is_empty());
        assert!((fit.family.decode_per_seq_ms - 10.0).abs() < 1e-3);
    }

    #[test]
    fn negative_coefficients_are_clamped_to_zero() {
        // A decode that gets *faster* with context would fit a negative slope: the fit drops the
        // term instead and explains the samples with the others.
        let mut m = measurements([0.0, 5e6, 0.0], [4e6, 10e6, 0.0]);
        for s in &mut m.decode {
            s.ns = s.ns.saturating_sub(s.ctx_tokens * 100);
        }
        let fit = fit_family(&m).unwrap();
        let f = &fit.family;
        assert!(f.decode_per_1k_ctx_ms.abs() < f64::EPSILON, "{f:?}");
        assert!(f.decode_fixed_ms >= 0.0 && f.decode_per_seq_ms > 0.0);
        assert!(f.prefill_fixed_ms >= 0.0 && f.prefill_per_token_sq_ms >= 0.0);
        assert!(fit.decode_error_rms > 0.0);
    }

    #[test]
    fn too_few_samples_are_an_error() {
        let mut m = measurements([0.0, 5e6, 0.0], [4e6, 10e6, 0.0]);
        m.prefill.truncate(2);
        assert!(fit_family(&m).is_err());
        let mut m = measurements([0.0, 5e6, 0.0], [4e6, 10e6, 0.0]);
        m.load_ns.clear();
        assert!(fit_family(&m).is_err());
    }

    #[test]
    fn transfers_fit_fixed_plus_bandwidth() {
        let samples: Vec<TransferSample> = [1_000_000_u64, 4_000_000, 16_000_000]
            .iter()
            .map(|&bytes| TransferSample {
                bytes,
                save_ns: 500_000 + bytes / 5,    // 5 GB/s
                restore_ns: 500_000 + bytes / 2, // 2 GB/s
            })
            .collect();
        let fit = fit_transfer(&samples).unwrap();
        assert!((fit.kv_fixed_s - 5e-4).abs() < 1e-7, "{fit:?}");
        assert!((fit.d2h_bytes_per_s / 5e9 - 1.0).abs() < 1e-3, "{fit:?}");
        assert!((fit.h2d_bytes_per_s / 2e9 - 1.0).abs() < 1e-3, "{fit:?}");
        assert!(fit_transfer(&samples[..1]).is_err());
    }

    #[test]
    fn medians() {
        assert!((median(&[3, 1, 2]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&[4, 1, 2, 3]) - 2.5).abs() < f64::EPSILON);
        assert!(median(&[]).abs() < f64::EPSILON);
    }
}
