//! The model pool over HTTP: `GET /v1/pool` (what is resident, queued and in flight, what each
//! model costs in memory and time) and the operator's `POST /admin/models/{id}/load|unload`
//! (audited).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tidepool_core::ModelId;
use tidepool_engine::multi::Calibration;
use tidepool_pool::PoolStatus;
use tidepool_runtime::{PoolRuntime, SwitchPhases};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::principal::operator;
use crate::state::{AppState, admin_audit};

/// `GET /v1/pool`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolOut {
    /// Always `pool`.
    pub object: &'static str,
    /// `dedicated`, `swap-lru` or `token`.
    pub policy: String,
    pub memory_bytes_max: u64,
    pub memory_bytes_used: u64,
    pub kv_saved_bytes: u64,
    pub kv_saved_bytes_max: u64,
    /// Resident memory the process may hold above `memory_bytes_max` while models switch
    /// (allocator slack), measured at start-up.
    pub pool_overhead_bytes: u64,
    /// Resident memory the start-up calibration left behind once every model was freed again
    /// (part of the cold process), measured.
    pub calibration_residue_bytes: u64,
    /// Online requests waiting for their prefill, all models together (batch ones: `batch`).
    pub queued: u32,
    pub models: Vec<PoolModelOut>,
    pub counters: PoolCountersOut,
    /// Batch-class requests, counted apart from the online ones (docs/pool.md §3.7).
    pub batch: PoolBatchOut,
}

/// Batch-class requests in the pool: they run only on capacity online requests leave idle.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolBatchOut {
    /// Waiting for a context slot, never started.
    pub queued: u32,
    /// In a context (running, or idle there while online work runs elsewhere).
    pub in_flight: u32,
    /// Started, then preempted for online work: waiting to be recomputed into a slot.
    pub preempted: u32,
    /// `[pool] batch_queue_max`: the bound on the three together.
    pub queue_max: u32,
    /// Since start: batch requests admitted and finished, preemptions, resumes, tokens.
    pub admitted: u64,
    pub finished: u64,
    pub preemptions: u64,
    pub resumes: u64,
    pub tokens: u64,
}

/// One pooled model.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolModelOut {
    pub id: String,
    /// `cold`, `loading`, `resident` or `evicting`.
    pub state: String,
    pub pinned: bool,
    pub queued: u32,
    pub in_flight: u32,
    /// Weights + context while not cold, plus its saved sequence states.
    pub memory_bytes: u64,
    pub saved_kv_bytes: u64,
    /// Milliseconds since the model last started loading; absent if it never did.
    pub last_switch_ms_ago: Option<u64>,
    /// Measured at start-up: weights, context (`ctx_kv_bytes + ctx_extra_bytes`), KV per token.
    pub weights_bytes: u64,
    pub ctx_bytes: u64,
    /// KV cells of every slot + the logits buffer.
    pub ctx_kv_bytes: u64,
    /// Resident memory a loaded model adds beyond weights and KV (compute buffers, file pages
    /// of repacked weights), measured from the process's resident set.
    pub ctx_extra_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// Measured at start-up: load time and one decode step, in microseconds.
    pub load_us: u64,
    pub decode_step_us: u64,
    /// The phases of a switch as the start-up calibration measured them, and the resident
    /// memory each step of that load added.
    pub calibrated: CalibratedSwitchOut,
    /// This model's last switch, phase by phase (0: not measured yet).
    pub last_switch: SwitchPhasesOut,
    /// Milliseconds since an action on the model last finished (the order `swap-lru` evicts in).
    pub last_used_ms_ago: u64,
    /// What the scheduler believes the model costs now (start-up measures, with load and
    /// decode-step times refined by every finished action).
    pub estimate: CostEstimateOut,
    /// This model's decode steps and their time by batch size (its share of
    /// `counters.decode_by_batch`).
    pub decode_by_batch: DecodeByBatchOut,
}

/// A switch measured at start-up, in nanoseconds and bytes.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct CalibratedSwitchOut {
    /// `llama_model_load_from_file`: map and read the GGUF, repack weights.
    pub weights_ns: u64,
    /// Of `weights_ns`, the repack into the CPU's layout (the same load without it, subtracted).
    pub repack_ns: u64,
    /// `llama_init_from_model`: KV allocation and clearing, compute-buffer reservation.
    pub context_ns: u64,
    /// The first step on a fresh context beyond the same step warm (a 64-token prompt).
    pub first_step_ns: u64,
    pub evict_ns: u64,
    /// Saving and restoring a 128-token sequence of `kv_state_bytes`.
    pub kv_save_ns: u64,
    pub kv_restore_ns: u64,
    pub kv_state_bytes: u64,
    /// Resident memory added after the weights, after the context, at the peak of the steps,
    /// and left after the model was freed.
    pub rss_after_weights_bytes: u64,
    pub rss_after_context_bytes: u64,
    pub rss_after_steps_bytes: u64,
    pub rss_after_unload_bytes: u64,
}

impl CalibratedSwitchOut {
    fn of(c: &Calibration) -> Self {
        let p = &c.phases;
        Self {
            weights_ns: p.weights_ns,
            repack_ns: p.repack_ns,
            context_ns: p.context_ns,
            first_step_ns: p.first_step_ns,
            evict_ns: p.evict_ns,
            kv_save_ns: p.kv_save_ns,
            kv_restore_ns: p.kv_restore_ns,
            kv_state_bytes: p.kv_state_bytes,
            rss_after_weights_bytes: c.memory.after_weights_bytes,
            rss_after_context_bytes: c.memory.after_context_bytes,
            rss_after_steps_bytes: c.memory.after_steps_bytes,
            rss_after_unload_bytes: c.memory.after_unload_bytes,
        }
    }
}

/// A model's last switch, in nanoseconds: the last load's phases, the last eviction, save and
/// restore.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct SwitchPhasesOut {
    pub weights_ns: u64,
    pub context_ns: u64,
    /// The first step after the load beyond the calibrated cost of a warm step of its size (an
    /// estimate); `first_step_raw_ns` is that step as measured, of `first_step_tokens` tokens.
    pub first_step_ns: u64,
    pub first_step_raw_ns: u64,
    pub first_step_tokens: u32,
    pub evict_ns: u64,
    pub kv_save_ns: u64,
    pub kv_save_bytes: u64,
    pub kv_restore_ns: u64,
}

impl SwitchPhasesOut {
    fn of(p: &SwitchPhases) -> Self {
        Self {
            weights_ns: p.weights_ns,
            context_ns: p.context_ns,
            first_step_ns: p.first_step_ns,
            first_step_raw_ns: p.first_step_raw_ns,
            first_step_tokens: p.first_step_tokens,
            evict_ns: p.evict_ns,
            kv_save_ns: p.kv_save_ns,
            kv_save_bytes: p.kv_save_bytes,
            kv_restore_ns: p.kv_restore_ns,
        }
    }
}

/// The scheduler's cost beliefs for one model, in nanoseconds.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostEstimateOut {
    pub load_ns: u64,
    pub decode_step_ns: u64,
    pub prefill_ns_per_token: u64,
    /// Saving or restoring one KV byte, in picoseconds.
    pub kv_transfer_ps_per_byte: u64,
}

/// Time engine actions were in flight, by kind, in nanoseconds (one at a time on a CPU box).
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionNsOut {
    pub load: u64,
    pub evict: u64,
    pub kv_save: u64,
    pub kv_restore: u64,
    pub prefill: u64,
    pub decode: u64,
}

/// Cumulative counts since start.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolCountersOut {
    pub loads: u64,
    pub evictions: u64,
    pub kv_saves: u64,
    pub kv_restores: u64,
    pub prefills: u64,
    pub decode_steps: u64,
    /// Tokens decoding sequences emitted riding in another request's prefill batch.
    pub rider_tokens: u64,
    /// Decode turns `token` left out of a round because their cold model could wait.
    pub switches_deferred: u64,
    pub requests_admitted: u64,
    pub requests_finished: u64,
    pub requests_cancelled: u64,
    pub requests_rejected: u64,
    pub in_flight_ns: ActionNsOut,
    pub decode_by_batch: DecodeByBatchOut,
}

/// Decode steps and their time by batch size: element `b − 1` counts turns that started with
/// `b` sequences (the last element: that many and more).
#[derive(Debug, Serialize, ToSchema)]
pub struct DecodeByBatchOut {
    pub steps: Vec<u64>,
    pub ns: Vec<u64>,
}

impl DecodeByBatchOut {
    fn of(by: &tidepool_pool::DecodeByBatch) -> Self {
        Self {
            steps: by.steps.to_vec(),
            ns: by.ns.to_vec(),
        }
    }
}

/// What an operator's load or unload did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelRequestOut {
    pub id: String,
    /// `load` or `unload`.
    pub requested: &'static str,
    /// The model's state right after the request (a load completes asynchronously).
    pub state: String,
}

#[expect(
    clippy::too_many_lines,
    reason = "one field after the other of the wire type, read top to bottom"
)]
fn pool_out(runtime: &PoolRuntime, status: &PoolStatus) -> PoolOut {
    let switches: Vec<(ModelId, SwitchPhases)> = runtime
        .switch_phases()
        .map(|(id, p)| (id.clone(), p))
        .collect();
    let models = status
        .models
        .iter()
        .map(|m| {
            let calibration = runtime
                .calibrations()
                .find(|(id, _)| **id == m.model)
                .map(|(_, c)| *c);
            let last_switch = switches
                .iter()
                .find(|(id, _)| *id == m.model)
                .map(|(_, p)| SwitchPhasesOut::of(p))
                .unwrap_or_default();
            PoolModelOut {
                id: m.model.to_string(),
                state: serde_plain(&m.state),
                pinned: m.pinned,
                queued: m.queued,
                in_flight: m.in_flight,
                memory_bytes: m.memory_bytes,
                saved_kv_bytes: m.saved_kv_bytes,
                last_switch_ms_ago: m
                    .last_switch_ns
                    .map(|at| status.now_ns.saturating_sub(at) / 1_000_000),
                weights_bytes: calibration.map_or(0, |c| c.weights_bytes),
                ctx_bytes: calibration.map_or(0, |c| c.ctx_bytes),
                ctx_kv_bytes: calibration.map_or(0, |c| c.ctx_kv_bytes),
                ctx_extra_bytes: calibration.map_or(0, |c| c.ctx_extra_bytes),
                kv_bytes_per_token: calibration.map_or(0, |c| c.kv_bytes_per_token),
                load_us: calibration.map_or(0, |c| c.load_ns / 1000),
                decode_step_us: calibration.map_or(0, |c| c.decode_step_ns / 1000),
                calibrated: calibration
                    .as_ref()
                    .map(CalibratedSwitchOut::of)
                    .unwrap_or_default(),
                last_switch,
                last_used_ms_ago: status.now_ns.saturating_sub(m.last_used_ns) / 1_000_000,
                estimate: CostEstimateOut {
                    load_ns: m.estimate.load_ns,
                    decode_step_ns: m.estimate.decode_step_ns,
                    prefill_ns_per_token: m.estimate.prefill_ns_per_token,
                    kv_transfer_ps_per_byte: m.estimate.kv_transfer_ps_per_byte,
                },
                decode_by_batch: DecodeByBatchOut::of(&m.decode_by_batch),
            }
        })
        .collect();
    let c = &status.counters;
    PoolOut {
        object: "pool",
        policy: serde_plain(&status.policy),
        memory_bytes_max: status.memory_bytes_max,
        memory_bytes_used: status.memory_bytes_used,
        kv_saved_bytes: status.kv_saved_bytes,
        kv_saved_bytes_max: status.kv_saved_bytes_max,
        pool_overhead_bytes: runtime.overhead().pool_overhead_bytes,
        calibration_residue_bytes: runtime.overhead().calibration_residue_bytes,
        queued: status.queued,
        models,
        counters: PoolCountersOut {
            loads: c.loads,
            evictions: c.evictions,
            kv_saves: c.kv_saves,
            kv_restores: c.kv_restores,
            prefills: c.prefills,
            decode_steps: c.decode_steps,
            rider_tokens: c.rider_tokens,
            switches_deferred: c.switches_deferred,
            requests_admitted: c.requests_admitted,
            requests_finished: c.requests_finished,
            requests_cancelled: c.requests_cancelled,
            requests_rejected: c.requests_rejected,
            in_flight_ns: ActionNsOut {
                load: c.in_flight_ns.load,
                evict: c.in_flight_ns.evict,
                kv_save: c.in_flight_ns.kv_save,
                kv_restore: c.in_flight_ns.kv_restore,
                prefill: c.in_flight_ns.prefill,
                decode: c.in_flight_ns.decode,
            },
            decode_by_batch: DecodeByBatchOut::of(&c.decode_by_batch),
        },
        batch: PoolBatchOut {
            queued: status.batch.queued,
            in_flight: status.batch.in_flight,
            preempted: status.batch.preempted,
            queue_max: status.batch.queue_max,
            admitted: c.batch_admitted,
            finished: c.batch_finished,
            preemptions: c.batch_preemptions,
            resumes: c.batch_resumes,
            tokens: c.batch_tokens,
        },
    }
}

/// The `snake_case`/`kebab-case` name serde gives a unit variant.
fn serde_plain<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}

/// `GET /v1/backends`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackendsOut {
    /// Always `list`.
    pub object: &'static str,
    /// The region this gateway runs in (its local models, and the preferred backends).
    pub region: String,
    pub data: Vec<crate::backends::BackendStatus>,
}

#[utoipa::path(
    get,
    path = "/v1/backends",
    tag = "pool",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Every remote backend: region, zone, health, breaker, latency (never its API key)", body = BackendsOut),
        (status = 401, description = "`invalid_admin_token`", body = ErrorBody),
        (status = 404, description = "`not_found`: not the operator (an API key), or no admin token is configured", body = ErrorBody),
    )
)]
pub(crate) async fn backends_status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = operator(&state, &headers).await {
        return error.into_response();
    }
    let data = state.backends().map(|b| b.status()).unwrap_or_default();
    Json(BackendsOut {
        object: "list",
        region: state.region().to_owned(),
        data,
    })
    .into_response()
}

fn no_pool() -> ApiError {
    ApiError::ResourceNotFound {
        what: "pool",
        id: "default".to_owned(),
    }
}

#[utoipa::path(
    get,
    path = "/v1/pool",
    tag = "pool",
    security(("admin" = [])),
    responses(
        (status = 200, description = "The model pool: per model state, queue, in-flight, memory, last switch", body = PoolOut),
        (status = 401, description = "`invalid_admin_token`", body = ErrorBody),
        (status = 404, description = "`not_found`: not the operator; `resource_not_found`: no pooled model is served", body = ErrorBody),
    )
)]
pub(crate) async fn pool_status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = operator(&state, &headers).await {
        return error.into_response();
    }
    let Some(runtime) = state.pool() else {
        return no_pool().into_response();
    };
    let status = runtime.status();
    Json(pool_out(runtime, &status)).into_response()
}

#[utoipa::path(post, path = "/admin/models/{id}/load", tag = "admin",
    params(("id" = String, Path)), security(("admin" = [])),
    responses((status = 202, body = ModelRequestOut), (status = 400, description = "`model_exceeds_memory_budget`", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn load_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    model_request(&state, &headers, &id, "load")
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[utoipa::path(post, path = "/admin/models/{id}/unload", tag = "admin",
    params(("id" = String, Path)), security(("admin" = [])),
    responses((status = 202, body = ModelRequestOut), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "`model_busy`", body = ErrorBody)))]
pub(crate) async fn unload_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    model_request(&state, &headers, &id, "unload")
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Asks the pool to load or unload a model, audited as `model.load` / `model.unload` once the
/// pool took the request.
async fn model_request(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    requested: &'static str,
) -> Result<Response, ApiError> {
    operator(state, headers).await?;
    let runtime = state.pool().ok_or_else(no_pool)?;
    let not_found = || ApiError::ResourceNotFound {
        what: "pooled model",
        id: id.chars().take(128).collect(),
    };
    let model = ModelId::new(id).map_err(|_| not_found())?;
    let result = if requested == "load" {
        runtime.request_load(&model)
    } else {
        runtime.request_unload(&model)
    };
    result?;
    let state_now = runtime
        .status()
        .models
        .iter()
        .find(|m| m.model == model)
        .map(|m| serde_plain(&m.state))
        .unwrap_or_default();
    let details = serde_json::json!({ "state": state_now });
    let action = format!("model.{requested}");
    let target = format!("model:{model}");
    state
        .audit_event(&admin_audit(), &action, &target, &details)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ModelRequestOut {
            id: model.to_string(),
            requested,
            state: state_now,
        }),
    )
        .into_response())
}
