//! The `OpenAPI` document, generated from the handlers' `#[utoipa::path]` attributes and the wire
//! types. It is served at `/openapi.json` and committed as `docs/openapi.json`; a test fails when
//! the two drift (`TIDEPOOL_UPDATE_DOCS=1 cargo nextest run -p tidepool-gateway` rewrites it).
//! The `/openapi.json` handler lives here, so the handlers' modules never depend on this one.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::accounts;
use crate::audit;
use crate::batch;
use crate::console;
use crate::error::{ErrorBody, ErrorDetail};
use crate::openai;
use crate::pool;
use crate::routes;
use crate::tenant_admin;

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Tidepool",
        description = "A self-hostable, OpenAI-compatible AI cloud. Error codes: docs/errors.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::chat_completions,
        routes::completions,
        routes::embeddings,
        routes::models,
        accounts::usage,
        batch::files::upload_file,
        batch::files::list_files,
        batch::files::retrieve_file,
        batch::files::file_content,
        batch::files::delete_file,
        batch::api::create_batch,
        batch::api::list_batches,
        batch::api::retrieve_batch,
        batch::api::cancel_batch,
        accounts::create_tenant,
        accounts::get_tenant,
        accounts::create_project,
        accounts::credit,
        accounts::tenant_usage,
        accounts::statement,
        accounts::create_key,
        accounts::revoke_key,
        accounts::set_budget,
        accounts::set_rate_limits,
        audit::reinstate_key,
        audit::list_audit,
        pool::pool_status,
        pool::backends_status,
        pool::load_model,
        pool::unload_model,
        routes::healthz,
        routes::readyz,
        routes::operator_metrics,
        tenant_admin::list_keys,
        tenant_admin::list_budgets,
        tenant_admin::daily_usage,
        tenant_admin::list_tenants,
        console::sign_in,
        console::session,
        console::sign_out,
        openapi,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        openai::ChatCompletionRequest,
        openai::CompletionRequest,
        openai::EmbeddingRequest,
        openai::ChatCompletionChunk,
        openai::StringOrArray,
        openai::MessageContent,
        openai::ContentPart,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "openai", description = "OpenAI-compatible endpoints"),
        (name = "billing", description = "A key's own usage and cost"),
        (name = "batch", description = "OpenAI's Batch API: files of requests run at the batch price (docs/batch.md)"),
        (name = "pool", description = "The model pool: residency, queues, memory"),
        (name = "admin", description = "Tenants, keys, credit, budgets, limits, statements, the audit log: the admin token, or for a tenant's own keys, budgets, usage and statement a `tenant-admin` key"),
        (name = "console", description = "The web console's sessions (an HttpOnly, SameSite=Strict cookie)"),
        (name = "ops", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as pretty JSON with a trailing newline (the committed file's exact bytes).
pub fn document() -> String {
    match ApiDoc::openapi().to_pretty_json() {
        Ok(mut json) => {
            json.push('\n');
            json
        }
        Err(error) => {
            tracing::error!(%error, "cannot render the OpenAPI document");
            String::from("{}\n")
        }
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json"))
)]
pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}
