//! One accelerator's simulation from what it holds: the pool configuration of its models,
//! each model's requests split over its instances ([`Routed`]), and [`run_acc`], which drives
//! the real pool over them. Accelerators are independent once dispatch is fixed, so everything
//! above (the first pass, the sizing, the placement search) is built from these calls.

use tidepool_core::ModelId;
use tidepool_pool::PoolConfig;

use crate::SimError;
use crate::profile::{Costs, model_spec};
use crate::run::{AccOutcome, AccRun, Slo};
use crate::spec::SimSpec;
use crate::workload::{Request, Workload};

pub(crate) fn pool_config(
    spec: &SimSpec,
    workload: &Workload,
    models: &[usize],
) -> Result<(PoolConfig, Vec<Costs>, Vec<ModelId>), SimError> {
    let acc = &spec.profile.accelerator;
    let mut specs = Vec::with_capacity(models.len());
    let mut costs = Vec::with_capacity(models.len());
    let mut ids = Vec::with_capacity(models.len());
    for &m in models {
        let model = &workload.models[m];
        let family = &spec.profile.families[model.family];
        let c = Costs::new(acc, family);
        let id = ModelId::new(model.id.clone()).map_err(|_| SimError::WorkloadInvalid {
            reason: "model ids must be slugs",
        })?;
        let mut model_spec = model_spec(id.clone(), family, &c, acc.kv_paged);
        if let Some(estimate) = model.estimate {
            model_spec.estimate = estimate;
        }
        specs.push(model_spec);
        costs.push(c);
        ids.push(id);
    }
    let memory_bytes_max = match spec.memory_models_max {
        None => acc.memory_bytes,
        models_max @ Some(_) => {
            tidepool_pool::memory_budget(None, models_max, acc.kv_saved_bytes_max, &specs)
        }
    };
    let mut cfg = PoolConfig::new(spec.policy, memory_bytes_max, specs);
    // What the accelerator can do comes from the profile, never from the knobs.
    cfg.kv_saved_bytes_max = acc.kv_saved_bytes_max;
    cfg.saved_kv_in_memory_budget = acc.saved_kv_in_memory_budget;
    cfg.overlap_transfers = acc.overlap_transfers;
    cfg.kv_paged = acc.kv_paged;
    cfg.knobs = spec.knobs;
    Ok((cfg, costs, ids))
}

/// What one accelerator holds: `(model, instance)` pairs in model order, the instance being
/// the accelerator's rank among the model's accelerators. With every model's instance count
/// fixed, it determines the accelerator's requests, hence its whole simulation: the key of the
/// placement search's cache.
pub(crate) type AccKey = Vec<(u32, u32)>;

/// Each accelerator's [`AccKey`] under `placement` (each model's accelerators ascending).
pub(crate) fn keys(placement: &[Vec<u32>], accelerators: usize) -> Vec<AccKey> {
    let mut keys = vec![Vec::new(); accelerators];
    for (m, accs) in placement.iter().enumerate() {
        for (slot, &a) in accs.iter().enumerate() {
            if let Some(key) = keys.get_mut(usize::try_from(a).unwrap_or(usize::MAX)) {
                key.push((acc_u32(m), acc_u32(slot)));
            }
        }
    }
    keys
}

/// One workload with each model's requests split over its instances: everything needed to
/// simulate any accelerator from its [`AccKey`].
pub(crate) struct Routed<'a> {
    pub(crate) spec: &'a SimSpec,
    pub(crate) workload: &'a Workload,
    /// Per model, per instance: request indices in arrival order.
    routes: Vec<Vec<Vec<u32>>>,
}

impl<'a> Routed<'a> {
    pub(crate) fn new(spec: &'a SimSpec, workload: &'a Workload, instances: &[u32]) -> Self {
        let mut by_model: Vec<Vec<u32>> = vec![Vec::new(); workload.models.len()];
        for (i, r) in workload.requests.iter().enumerate() {
            if let Some(list) = by_model.get_mut(usize::try_from(r.model).unwrap_or(usize::MAX)) {
                list.push(acc_u32(i));
            }
        }
        let routes = by_model
            .iter()
            .enumerate()
            .map(|(m, indices)| {
                let k = instances.get(m).copied().unwrap_or(1);
                crate::dispatch::split(
                    &workload.requests,
                    indices,
                    usize::try_from(k).unwrap_or(1),
                    spec.knobs.ttft_slo_ms,
                    spec.knobs.tbt_slo_ms,
                )
            })
            .collect();
        Self {
            spec,
            workload,
            routes,
        }
    }

    /// Simulates accelerator `acc` holding `key` (`None` if it holds nothing).
    pub(crate) fn run(&self, acc: u32, key: &AccKey) -> Result<Option<Outcome>, SimError> {
        self.run_limited(acc, key, None)
    }

    /// [`Self::run`], stopped once `missed_limit` online tokens are missed (the outcome then
    /// says so: `AccOutcome::stopped`).
    pub(crate) fn run_limited(
        &self,
        acc: u32,
        key: &AccKey,
        missed_limit: Option<u64>,
    ) -> Result<Option<Outcome>, SimError> {
        let members: Vec<(usize, &[u32])> = key
            .iter()
            .map(|&(m, slot)| {
                let m = usize::try_from(m).unwrap_or(usize::MAX);
                let list = self
                    .routes
                    .get(m)
                    .and_then(|r| r.get(usize::try_from(slot).unwrap_or(usize::MAX)))
                    .map_or(&[][..], Vec::as_slice);
                (m, list)
            })
            .collect();
        run_acc(self.spec, self.workload, acc, &members, missed_limit)
    }

    /// Every accelerator's outcome, on every core.
    pub(crate) fn run_all(&self, keys: &[AccKey]) -> Result<Vec<Option<Outcome>>, SimError> {
        let indexed: Vec<(u32, &AccKey)> = keys
            .iter()
            .enumerate()
            .map(|(a, k)| (acc_u32(a), k))
            .collect();
        crate::par::map(&indexed, |&(a, key)| self.run(a, key))
            .into_iter()
            .collect()
    }
}

/// The workload's first `requests_max` requests, if it has more (0: never).
pub(crate) fn search_sample(workload: &Workload, requests_max: u64) -> Option<Workload> {
    let max = usize::try_from(requests_max).unwrap_or(usize::MAX);
    (max > 0 && workload.requests.len() > max).then(|| Workload {
        models: workload.models.clone(),
        requests: workload.requests[..max].to_vec(),
        prompts_capped: 0,
        warm: workload.warm.clone(),
    })
}

/// Tokens an accelerator's online requests owed but did not get on time (a lower bound if its
/// run was stopped at a limit).
pub(crate) fn missed(outcome: Option<&Outcome>) -> u64 {
    outcome.map_or(0, |o| o.result.missed_tokens)
}

/// An accelerator index (below `ACCELERATORS_MAX`) as the placement stores it.
pub(crate) fn acc_u32(acc: usize) -> u32 {
    u32::try_from(acc).unwrap_or(u32::MAX)
}

/// Simulates accelerator `acc` holding `members` — each a market model with the request
/// indices its instance here serves (`None` if it holds none), stopped once `missed_limit`
/// online tokens are missed if one is given.
pub(crate) fn run_acc(
    spec: &SimSpec,
    workload: &Workload,
    acc: u32,
    members: &[(usize, &[u32])],
    missed_limit: Option<u64>,
) -> Result<Option<Outcome>, SimError> {
    if members.is_empty() {
        return Ok(None);
    }
    let slo = Slo {
        ttft_ns: spec.knobs.ttft_slo_ms * 1_000_000,
        tbt_ns: spec.knobs.tbt_slo_ms * 1_000_000,
    };
    let models: Vec<usize> = members.iter().map(|&(m, _)| m).collect();
    let mut indexed: Vec<(u32, usize)> = members
        .iter()
        .enumerate()
        .flat_map(|(local, (_, list))| list.iter().map(move |&i| (i, local)))
        .collect();
    indexed.sort_unstable();
    let requests: Vec<(usize, Request)> = indexed
        .iter()
        .filter_map(|&(i, local)| {
            workload
                .requests
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .map(|r| (local, *r))
        })
        .collect();
    let (cfg, costs, ids) = pool_config(spec, workload, &models)?;
    let warm: Vec<usize> = workload
        .warm
        .iter()
        .filter_map(|&w| {
            models
                .iter()
                .position(|&m| usize::try_from(w).is_ok_and(|w| w == m))
        })
        .collect();
    let mut run = AccRun::new(cfg, costs, ids, &requests, slo, warm)?;
    if let Some(limit) = missed_limit {
        run = run.stop_at_missed(limit);
    }
    let result = run.run(&mut || {})?;
    Ok(Some(Outcome {
        acc,
        models,
        requests,
        result,
    }))
}

/// One accelerator's models (market indices), requests (local model index) and outcome.
pub(crate) struct Outcome {
    pub(crate) acc: u32,
    pub(crate) models: Vec<usize>,
    pub(crate) requests: Vec<(usize, Request)>,
    pub(crate) result: AccOutcome,
}
