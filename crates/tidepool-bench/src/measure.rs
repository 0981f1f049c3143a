//! The calibration's measurements of one model on the pool's engine path
//! (`tidepool_engine::multi::Accelerator`): loads and evictions, prefills of single prompts and
//! groups, decode turns by batch size and context, prefills with riders, KV saves and restores.
//! Prompts are `prompt_for` text cut to the exact token count.

use std::time::{Duration, Instant};

use anyhow::bail;
use tidepool_core::RequestId;
use tidepool_engine::multi::{Accelerator, Calibration, ModelFrontEnd, MultiModelConfig};
use tidepool_engine::{GenerateRequest, Generation, SamplingParams};
use tidepool_sim::calibrate::{
    DecodeSample, FamilyMeasurements, PrefillSample, RiderSample, TransferSample,
};
use tidepool_sim::profile::SwitchPhases;

use crate::common::prompt_for;

/// Single-prompt prefill lengths, in tokens.
pub(crate) const PREFILL_LENGTHS: [u32; 6] = [16, 32, 64, 128, 192, 256];
/// Per-prompt lengths of the grouped prefills (`seqs_max` prompts at once).
const GROUP_PREFILL_LENGTHS: [u32; 2] = [32, 128];
/// Prompt lengths of the decode measurements (the context each sequence starts from).
pub(crate) const DECODE_CONTEXTS: [u32; 2] = [32, 256];
/// Decode steps timed per sample (one pool turn's worth at the server's `decode_steps_min`).
pub(crate) const DECODE_STEPS: u32 = 16;
/// Lengths of the sequences saved and restored.
const TRANSFER_LENGTHS: [u32; 3] = [32, 128, 256];
/// `--quick`: fewer and shorter samples (a smoke run for tests; the fit is coarser).
const QUICK_PREFILL_LENGTHS: [u32; 3] = [16, 64, 128];
const QUICK_GROUP_PREFILL_LENGTHS: [u32; 1] = [32];
const QUICK_DECODE_CONTEXTS: [u32; 2] = [32, 96];
const QUICK_DECODE_BATCHES: [u32; 2] = [1, 4];
/// Attempts at one decode sample when a sequence ends early (EOS) and spoils it.
const DECODE_ATTEMPTS_MAX: u32 = 3;
/// The resident check's turns: prompt tokens and consecutive turns (`decoding` asks
/// `DECODE_STEPS × 4` tokens, so at most 3 turns after the prefill's token).
pub(crate) const RESIDENT_CTX: u32 = 128;
pub(crate) const RESIDENT_TURNS: u32 = 3;

/// The calibration flags the measurements read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Context of one sequence, in tokens.
    pub(crate) context_tokens: u32,
    /// Sequences per model context (the decode batch limit).
    pub(crate) seqs_max: u32,
    /// Repeats of each measurement.
    pub(crate) repeats: u32,
    /// Fewer, shorter samples.
    pub(crate) quick: bool,
}

/// Each model's front end (tokenizer, request preparation), in the accelerator's model order.
pub(crate) fn front_ends(configs: &[MultiModelConfig]) -> anyhow::Result<Vec<ModelFrontEnd>> {
    Ok(configs
        .iter()
        .map(|c| ModelFrontEnd::open(c.clone()))
        .collect::<Result<_, _>>()?)
}

/// Which samples to take.
struct Plan {
    prefill: Vec<u32>,
    group_prefill: Vec<u32>,
    decode_contexts: Vec<u32>,
    decode_batches: Vec<u32>,
    /// Decoding sequences riding in a prefill (`RiderSample`), at most `seqs_max − 1`.
    riders: Vec<u32>,
    transfers: Vec<u32>,
}

impl Plan {
    fn new(quick: bool, seqs_max: u32) -> Self {
        let most_riders = seqs_max.saturating_sub(1);
        let mut riders = if quick {
            vec![most_riders]
        } else {
            vec![1, seqs_max / 2, most_riders]
        };
        riders.retain(|&r| r > 0);
        riders.dedup();
        if quick {
            Self {
                prefill: QUICK_PREFILL_LENGTHS.to_vec(),
                group_prefill: QUICK_GROUP_PREFILL_LENGTHS.to_vec(),
                decode_contexts: QUICK_DECODE_CONTEXTS.to_vec(),
                decode_batches: QUICK_DECODE_BATCHES
                    .iter()
                    .map(|&b| b.min(seqs_max))
                    .collect(),
                riders,
                transfers: TRANSFER_LENGTHS[..2].to_vec(),
            }
        } else {
            Self {
                prefill: PREFILL_LENGTHS.to_vec(),
                group_prefill: GROUP_PREFILL_LENGTHS.to_vec(),
                decode_contexts: DECODE_CONTEXTS.to_vec(),
                decode_batches: (1..=seqs_max).collect(),
                riders,
                transfers: TRANSFER_LENGTHS.to_vec(),
            }
        }
    }
}

/// One family's measurements on a shared accelerator.
pub(crate) struct Measure<'a> {
    accelerator: &'a mut Accelerator,
    front: &'a ModelFrontEnd,
    model: usize,
    next_seq: &'a mut u64,
    repeats: u32,
    seqs_max: u32,
    plan: Plan,
}

/// Live sequences of one sample: ids and their event receivers (kept open, drained).
pub(crate) struct Live {
    ids: Vec<u64>,
    generations: Vec<Generation>,
}

impl Live {
    fn drain(&mut self) {
        for generation in &mut self.generations {
            while generation.events.try_recv().is_ok() {}
        }
    }
}

fn ns_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl<'a> Measure<'a> {
    /// Model `model` of `accelerator`, whose models' front ends are `fronts` (same order).
    pub(crate) fn new(
        accelerator: &'a mut Accelerator,
        fronts: &'a [ModelFrontEnd],
        model: usize,
        next_seq: &'a mut u64,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        let Some(front) = fronts.get(model) else {
            bail!("no front end for model {model}");
        };
        Ok(Self {
            accelerator,
            front,
            model,
            next_seq,
            repeats: settings.repeats,
            seqs_max: settings.seqs_max,
            plan: Plan::new(settings.quick, settings.seqs_max),
        })
    }

    /// One 16-step turn of `live`: its first step's time and the mean of the others; `None` if
    /// a sequence ended in it, which spoils the sample and the rest of `live`'s turns.
    pub(crate) fn timed_turn(&mut self, live: &mut Live) -> Option<(u64, u64)> {
        let started = Instant::now();
        let first = self.accelerator.decode(self.model, &live.ids, 1);
        let first_ns = ns_since(started);
        let started = Instant::now();
        let rest = self
            .accelerator
            .decode(self.model, &live.ids, DECODE_STEPS - 1);
        let rest_ns = ns_since(started);
        live.drain();
        let whole = first.finished.is_empty()
            && rest.finished.is_empty()
            && first.steps + rest.steps == DECODE_STEPS;
        whole.then(|| (first_ns, rest_ns / u64::from(DECODE_STEPS - 1)))
    }

    /// `RESIDENT_TURNS` consecutive turns of `batch` fresh sequences (fewer if one ends early
    /// in every attempt).
    pub(crate) fn consecutive_turns(&mut self, batch: u32) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut turns = Vec::new();
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut live) = self.decoding(batch, RESIDENT_CTX)? else {
                continue;
            };
            for _ in 0..RESIDENT_TURNS {
                match self.timed_turn(&mut live) {
                    Some(turn) => turns.push(turn),
                    None => break,
                }
            }
            self.finish(live);
            if turns.len() == usize::try_from(RESIDENT_TURNS).unwrap_or(0) {
                break;
            }
            turns.clear();
        }
        Ok(turns)
    }

    pub(crate) fn family(
        &mut self,
        name: &str,
        settings: &Settings,
    ) -> anyhow::Result<(FamilyMeasurements, Vec<TransferSample>)> {
        let sizes: Calibration = self.accelerator.calibrate(self.model)?;
        let mut m = FamilyMeasurements {
            name: name.to_owned(),
            weights_bytes: sizes.weights_bytes,
            kv_bytes_per_token: sizes.kv_bytes_per_token,
            seqs_max: settings.seqs_max,
            seq_tokens_max: settings.context_tokens,
            ctx_fixed_bytes: sizes.ctx_bytes.saturating_sub(
                u64::from(settings.seqs_max)
                    * u64::from(settings.context_tokens)
                    * sizes.kv_bytes_per_token,
            ),
            load_ns: Vec::new(),
            unload_ns: Vec::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            riders: Vec::new(),
            switch: None,
        };
        let (mut weights_ns, mut context_ns) = (Vec::new(), Vec::new());
        for _ in 0..self.repeats {
            let started = Instant::now();
            let phases = self.accelerator.load(self.model)?;
            m.load_ns.push(ns_since(started));
            weights_ns.push(phases.weights_ns);
            context_ns.push(phases.context_ns);
            let started = Instant::now();
            self.accelerator.evict(self.model);
            m.unload_ns.push(ns_since(started));
        }
        m.switch = Some(switch_phases(
            &sizes,
            &weights_ns,
            &context_ns,
            &m.unload_ns,
        ));
        self.accelerator.load(self.model)?;
        for _ in 0..self.repeats {
            for len in self.plan.prefill.clone() {
                m.prefill.push(self.prefill_sample(&[len])?);
            }
            for len in self.plan.group_prefill.clone() {
                let lens = vec![len; usize::try_from(self.seqs_max).unwrap_or(1)];
                m.prefill.push(self.prefill_sample(&lens)?);
            }
            for batch in self.plan.decode_batches.clone() {
                for ctx in self.plan.decode_contexts.clone() {
                    if let Some(sample) = self.decode_sample(batch, ctx)? {
                        m.decode.push(sample);
                    }
                }
            }
            for riders in self.plan.riders.clone() {
                if let Some(sample) = self.rider_sample(riders)? {
                    m.riders.push(sample);
                }
            }
        }
        let mut transfers = Vec::new();
        for len in self.plan.transfers.clone() {
            transfers.push(self.transfer_sample(len)?);
        }
        self.accelerator.evict(self.model);
        Ok((m, transfers))
    }

    /// Registers one greedy sequence per prompt length.
    pub(crate) fn start(&mut self, lengths: &[u32], max_tokens: u32) -> anyhow::Result<Live> {
        let mut live = Live {
            ids: Vec::new(),
            generations: Vec::new(),
        };
        for &len in lengths {
            *self.next_seq += 1;
            let id = *self.next_seq;
            let request = u32::try_from(id).unwrap_or(u32::MAX);
            let mut prompt = self.front.tokenize(&prompt_for(request, len + 32))?;
            while prompt.len() < usize::try_from(len).unwrap_or(0) {
                prompt.extend_from_within(..);
            }
            prompt.truncate(usize::try_from(len).unwrap_or(0));
            let (prepared, generation) = self.front.prepare(GenerateRequest {
                request_id: RequestId::new(),
                prompt,
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens,
                    ..SamplingParams::default()
                },
                remote: None,
                class: tidepool_engine::RequestClass::Online,
            })?;
            self.accelerator.register(id, self.model, prepared, None);
            live.ids.push(id);
            live.generations.push(generation);
        }
        Ok(live)
    }

    pub(crate) fn finish(&mut self, mut live: Live) {
        for &id in &live.ids {
            self.accelerator.release(id);
        }
        live.drain();
        self.accelerator.flush();
    }

    /// Time of one prefill of new prompts of `lengths` tokens, with `riders` (sequences already
    /// decoding) in its batch.
    pub(crate) fn timed_prefill(&mut self, lengths: &[u32], riders: &[u64]) -> anyhow::Result<u64> {
        let mut live = self.start(lengths, 8)?;
        let started = Instant::now();
        self.accelerator.prefill(self.model, &live.ids, riders);
        let ns = ns_since(started);
        live.drain();
        self.finish(live);
        Ok(ns)
    }

    pub(crate) fn prefill_sample(&mut self, lengths: &[u32]) -> anyhow::Result<PrefillSample> {
        Ok(PrefillSample {
            tokens: lengths.iter().map(|&l| u64::from(l)).sum(),
            tokens_sq: lengths.iter().map(|&l| u64::from(l) * u64::from(l)).sum(),
            ns: self.timed_prefill(lengths, &[])?,
        })
    }

    /// `count` sequences of `ctx` prompt tokens, prefilled and decoding; `None` if one ended at
    /// its first token (the caller tries again).
    pub(crate) fn decoding(&mut self, count: u32, ctx: u32) -> anyhow::Result<Option<Live>> {
        let lengths = vec![ctx; usize::try_from(count).unwrap_or(1)];
        let mut live = self.start(&lengths, DECODE_STEPS * 4)?;
        let prefilled = self.accelerator.prefill(self.model, &live.ids, &[]);
        live.drain();
        if prefilled.finished.is_empty() {
            Ok(Some(live))
        } else {
            self.finish(live);
            Ok(None)
        }
    }

    /// A decode turn of `batch` sequences that start at `ctx` tokens; `None` if a sequence
    /// ended early in every attempt (the sample would not be of `batch` sequences).
    pub(crate) fn decode_sample(
        &mut self,
        batch: u32,
        ctx: u32,
    ) -> anyhow::Result<Option<DecodeSample>> {
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut live) = self.decoding(batch, ctx)? else {
                continue;
            };
            let started = Instant::now();
            let outcome = self.accelerator.decode(self.model, &live.ids, DECODE_STEPS);
            let ns = ns_since(started);
            live.drain();
            self.finish(live);
            if outcome.finished.is_empty() && outcome.steps == DECODE_STEPS {
                // Context grows by one token per step: the turn's mean is ctx + (steps + 1) / 2.
                let mean_ctx = u64::from(ctx) + u64::from(DECODE_STEPS).div_ceil(2);
                return Ok(Some(DecodeSample {
                    batch,
                    ctx_tokens: u64::from(batch) * mean_ctx,
                    ns: ns / u64::from(DECODE_STEPS),
                }));
            }
        }
        tracing::warn!(batch, ctx, "every attempt ended early; sample skipped");
        Ok(None)
    }

    /// A 128-token prompt prefilled alone, then another with `riders` sequences (decoding at
    /// 128 context tokens) in its batch; `None` if a would-be rider ended at its first token in
    /// every attempt. (A rider that ends *in* the timed prefill still had its token computed.)
    pub(crate) fn rider_sample(&mut self, riders: u32) -> anyhow::Result<Option<RiderSample>> {
        const LEN: u32 = 128;
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut decoding) = self.decoding(riders, LEN)? else {
                continue;
            };
            let alone_ns = self.timed_prefill(&[LEN], &[])?;
            let with_riders_ns = self.timed_prefill(&[LEN], &decoding.ids)?;
            decoding.drain();
            self.finish(decoding);
            return Ok(Some(RiderSample {
                riders,
                ctx_tokens: u64::from(riders) * u64::from(LEN + 1),
                prompt_tokens: u64::from(LEN),
                alone_ns,
                with_riders_ns,
            }));
        }
        tracing::warn!(riders, "every attempt ended early; rider sample skipped");
        Ok(None)
    }

    pub(crate) fn transfer_sample(&mut self, len: u32) -> anyhow::Result<TransferSample> {
        let mut live = self.start(&[len], 8)?;
        self.accelerator.prefill(self.model, &live.ids, &[]);
        live.drain();
        let id = live.ids.first().copied().unwrap_or(0);
        let started = Instant::now();
        let bytes = self.accelerator.save(id);
        let save_ns = ns_since(started);
        let started = Instant::now();
        self.accelerator.restore(id);
        let restore_ns = ns_since(started);
        self.finish(live);
        Ok(TransferSample {
            bytes,
            save_ns,
            restore_ns,
        })
    }
}

/// The phases of a switch: weights, context and evict are the medians of the timed loads and
/// evictions; repack, first step, save and restore come from the engine's own calibration.
fn switch_phases(
    calibration: &Calibration,
    weights_ns: &[u64],
    context_ns: &[u64],
    evict_ns: &[u64],
) -> SwitchPhases {
    let seconds = |ns: u64| Duration::from_nanos(ns).as_secs_f64();
    let median = |samples: &[u64], fallback: u64| {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or(fallback)
    };
    let p = &calibration.phases;
    SwitchPhases {
        weights_s: seconds(median(weights_ns, p.weights_ns)),
        repack_s: seconds(p.repack_ns),
        context_s: seconds(median(context_ns, p.context_ns)),
        first_step_s: seconds(p.first_step_ns),
        evict_s: seconds(median(evict_ns, p.evict_ns)),
        kv_save_s: seconds(p.kv_save_ns),
        kv_restore_s: seconds(p.kv_restore_ns),
        kv_state_bytes: p.kv_state_bytes,
        ctx_extra_bytes: calibration.ctx_extra_bytes,
    }
}
