//! The calibration's resident check: does a family's decode step, measured with one model
//! loaded, hold with many models loaded and taking turns? Each family's 16-step turns alone,
//! beside the other models idle, and in rotation with them.

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tidepool_core::ModelId;
use tidepool_engine::multi::{Accelerator, ModelFrontEnd, MultiModelConfig};

use crate::measure::{Measure, RESIDENT_CTX, RESIDENT_TURNS, Settings, front_ends};

/// The resident check's batch (at most `seqs_max`).
const RESIDENT_BATCH: u32 = 4;

/// One family's decode turns with `models` models loaded (the resident check): 16-step turns
/// of `batch` sequences from `ctx` prompt tokens, `RESIDENT_TURNS` per repeat, with only this
/// model loaded (`alone`), with all loaded but the others idle (`beside`), and with every model
/// decoding in round-robin turns (`rotating`: each turn follows another model's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ResidentSample {
    pub(crate) family: String,
    pub(crate) models: u32,
    pub(crate) batch: u32,
    pub(crate) ctx: u32,
    pub(crate) alone: TurnTimes,
    pub(crate) beside: TurnTimes,
    pub(crate) rotating: TurnTimes,
}

/// A turn's first step apart from the rest: a cost of taking over from another model shows in
/// the first, the steady state in the rest. One value per turn.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct TurnTimes {
    pub(crate) first_step_ns: Vec<u64>,
    /// Mean of the turn's other steps.
    pub(crate) later_step_ns: Vec<u64>,
}

impl TurnTimes {
    fn push(&mut self, (first, later): (u64, u64)) {
        self.first_step_ns.push(first);
        self.later_step_ns.push(later);
    }

    fn extend(&mut self, turns: Vec<(u64, u64)>) {
        for turn in turns {
            self.push(turn);
        }
    }
}

/// The resident check (see [`ResidentSample`]): does a family's decode step, measured above
/// with one model loaded, hold with `--resident-models` loaded and taking turns? The first
/// `families.len()` models are each family's sample; the rest are more instances of the
/// families, loaded (and decoding, in rotation) beside them.
pub(crate) fn resident_check(
    settings: &Settings,
    resident_models: u32,
    families: &[(&str, &MultiModelConfig)],
    next_seq: &mut u64,
) -> anyhow::Result<Vec<ResidentSample>> {
    let count = if settings.quick {
        resident_models.min(2)
    } else {
        resident_models
    };
    let count = usize::try_from(count).unwrap_or(0);
    if count < 2 || families.is_empty() {
        return Ok(Vec::new());
    }
    let mut configs = Vec::with_capacity(count);
    for i in 0..count {
        let Some(&(name, base)) = families.get(i % families.len()) else {
            bail!("no family for resident model {i}");
        };
        let mut config = base.clone();
        config.model_id = ModelId::new(format!("res-{i}-{name}"))?;
        configs.push(config);
    }
    let fronts = front_ends(&configs)?;
    let mut accelerator = Accelerator::new(configs)?;
    let batch = RESIDENT_BATCH.min(settings.seqs_max);
    let mut samples: Vec<ResidentSample> = families
        .iter()
        .take(count)
        .map(|&(name, _)| ResidentSample {
            family: name.to_owned(),
            models: u32::try_from(count).unwrap_or(u32::MAX),
            batch,
            ctx: RESIDENT_CTX,
            alone: TurnTimes::default(),
            beside: TurnTimes::default(),
            rotating: TurnTimes::default(),
        })
        .collect();
    tracing::info!(models = count, "resident check");
    for _ in 0..settings.repeats {
        for (model, sample) in samples.iter_mut().enumerate() {
            for other in 0..count {
                accelerator.evict(other);
            }
            accelerator.load(model)?;
            let steps = Measure::new(&mut accelerator, &fronts, model, next_seq, settings)?
                .consecutive_turns(batch)?;
            sample.alone.extend(steps);
        }
        for model in 0..count {
            accelerator.load(model)?;
        }
        for (model, sample) in samples.iter_mut().enumerate() {
            let steps = Measure::new(&mut accelerator, &fronts, model, next_seq, settings)?
                .consecutive_turns(batch)?;
            sample.beside.extend(steps);
        }
        rotation(
            &mut accelerator,
            &fronts,
            batch,
            next_seq,
            settings,
            &mut samples,
        )?;
    }
    Ok(samples)
}

/// Every model of `accelerator` (one front each) decoding `batch` sequences, in round-robin
/// turns (`RESIDENT_TURNS` rounds); the turns of the first `samples.len()` models are recorded.
fn rotation(
    accelerator: &mut Accelerator,
    fronts: &[ModelFrontEnd],
    batch: u32,
    next_seq: &mut u64,
    settings: &Settings,
    samples: &mut [ResidentSample],
) -> anyhow::Result<()> {
    let count = fronts.len();
    let mut lives = Vec::with_capacity(count);
    for model in 0..count {
        let mut measure = Measure::new(accelerator, fronts, model, next_seq, settings)?;
        lives.push(measure.decoding(batch, RESIDENT_CTX)?);
    }
    for _ in 0..RESIDENT_TURNS {
        for (model, slot) in lives.iter_mut().enumerate() {
            let Some(live) = slot.as_mut() else {
                continue;
            };
            let mut measure = Measure::new(accelerator, fronts, model, next_seq, settings)?;
            match measure.timed_turn(live) {
                Some(ns) => {
                    if let Some(sample) = samples.get_mut(model) {
                        sample.rotating.push(ns);
                    }
                }
                None => {
                    if let Some(live) = slot.take() {
                        measure.finish(live);
                    }
                }
            }
        }
    }
    for (model, slot) in lives.iter_mut().enumerate() {
        if let Some(live) = slot.take() {
            Measure::new(accelerator, fronts, model, next_seq, settings)?.finish(live);
        }
    }
    Ok(())
}
