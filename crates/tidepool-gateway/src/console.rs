//! The web console: its assets (embedded in the binary from `console/`, served under
//! `/console/`), its sessions (`/console/api/session`) and the CSRF rule for cookie-authenticated
//! changes.
//!
//! A session is a signed cookie, not a server-side record, so every gateway replica accepts it:
//! `tidepool_console=v1.<payload>.<mac>`, the payload naming the role, the key id and tenant (for
//! a tenant session) and the expiry, the mac HMAC-SHA256 under a key derived from the admin
//! token (a process-random key when none is configured; then sessions last as long as the
//! process). Each use re-checks what the cookie names: a tenant session ends as soon as its key
//! is revoked, suspended or loses the `tenant-admin` role, an operator session as soon as the
//! admin token changes. The cookie is `HttpOnly` and `SameSite=Strict`; a change (POST, PUT,
//! DELETE) that rides on it must also carry `X-Tidepool-Console: 1` and, when the browser sends
//! an `Origin`, the server's own ([`csrf_guard`]).

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_ledger::KeyRole;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::principal::{self, Caller, Claims, SESSION_COOKIE, cookie_value, live_key, sign};
use crate::state::{AppState, audit_context};

/// How long a console session lasts, in seconds (12 hours).
pub const SESSION_TTL_S: i64 = 12 * 60 * 60;
/// The header a cookie-authenticated change must carry.
pub const CONSOLE_HEADER: &str = "x-tidepool-console";

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The console's pages only load what the binary serves.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// `Set-Cookie` for a new session, or (with `None`) one that clears it.
fn set_cookie(state: &AppState, value: Option<&str>) -> Result<HeaderValue, ApiError> {
    let path = format!("{}/", state.base_path());
    let cookie = match value {
        Some(value) => format!(
            "{SESSION_COOKIE}={value}; Path={path}; Max-Age={SESSION_TTL_S}; HttpOnly; \
             SameSite=Strict"
        ),
        None => format!("{SESSION_COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict"),
    };
    HeaderValue::from_str(&cookie).map_err(|_| ApiError::ConsoleSignedOut)
}

/// `POST /console/api/session`: exactly one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// An API key with the `tenant-admin` role.
    pub api_key: Option<String>,
    /// The operator's admin token.
    pub admin_token: Option<String>,
}

/// A console session.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionOut {
    /// Always `console.session`.
    pub object: &'static str,
    /// `operator` or `tenant-admin`.
    pub role: &'static str,
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    /// The key's name, for a tenant session.
    pub key_name: Option<String>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
}

fn session_out(caller: &Caller, expires_at: Option<i64>) -> SessionOut {
    match caller {
        Caller::Operator => SessionOut {
            object: "console.session",
            role: "operator",
            tenant: None,
            key_id: None,
            key_name: None,
            expires_at,
        },
        Caller::Key(record) => SessionOut {
            object: "console.session",
            role: KeyRole::TenantAdmin.as_str(),
            tenant: Some(record.tenant.to_string()),
            key_id: Some(record.key_id.0.clone()),
            key_name: Some(record.name.clone()),
            expires_at,
        },
    }
}

#[utoipa::path(post, path = "/console/api/session", tag = "console", request_body = SignIn,
    responses(
        (status = 200, description = "Signed in; the session cookie is set", body = SessionOut),
        (status = 400, description = "`invalid_request_error`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`, `invalid_admin_token`", body = ErrorBody),
        (status = 403, description = "`console_role_required`, `csrf_rejected`", body = ErrorBody),
    ))]
pub(crate) async fn sign_in(
    State(state): State<AppState>,
    body: Result<ApiJson<SignIn>, ApiError>,
) -> Response {
    let result = async {
        let ApiJson(body) = body?;
        let caller = match (body.api_key, body.admin_token) {
            (None, Some(token)) => {
                if state.admin_enabled() && state.is_admin_token(&token) {
                    Caller::Operator
                } else {
                    return Err(ApiError::AdminUnauthorized);
                }
            }
            (Some(secret), None) => {
                let record = state
                    .ledger()
                    .authenticate(&secret)
                    .await?
                    .ok_or(ApiError::InvalidApiKey)?;
                if record.role != KeyRole::TenantAdmin {
                    return Err(ApiError::ConsoleRoleRequired);
                }
                live_key(record)?
            }
            _ => {
                return Err(ApiError::invalid_param(
                    "api_key",
                    "give exactly one of `api_key` and `admin_token`",
                ));
            }
        };
        let expires_at = state.now_ms() / 1000 + SESSION_TTL_S;
        let claims = Claims {
            r: session_out(&caller, None).role.to_owned(),
            k: match &caller {
                Caller::Operator => None,
                Caller::Key(record) => Some(record.key_id.0.clone()),
            },
            e: expires_at,
        };
        let cookie = set_cookie(&state, Some(&sign(&state, &claims)?))?;
        let target = match &caller {
            Caller::Operator => "console:operator".to_owned(),
            Caller::Key(record) => format!("key:{}", record.key_id),
        };
        state
            .audit_event(
                &audit_context(caller.audit_actor()),
                "console.sign_in",
                &target,
                &serde_json::json!({}),
            )
            .await?;
        let mut response = Json(session_out(&caller, Some(expires_at))).into_response();
        response.headers_mut().insert(header::SET_COOKIE, cookie);
        Ok(response)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[utoipa::path(get, path = "/console/api/session", tag = "console",
    responses(
        (status = 200, description = "The current session", body = SessionOut),
        (status = 401, description = "`console_signed_out`", body = ErrorBody),
    ))]
pub(crate) async fn session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match principal::session(&state, &headers).await {
        Ok(Some((caller, claims))) => Json(session_out(&caller, Some(claims.e))).into_response(),
        Ok(None) => ApiError::ConsoleSignedOut.into_response(),
        Err(error) => error.into_response(),
    }
}

#[utoipa::path(delete, path = "/console/api/session", tag = "console",
    responses((status = 204, description = "Signed out; the cookie is cleared")))]
pub(crate) async fn sign_out(State(state): State<AppState>) -> Response {
    match set_cookie(&state, None) {
        Ok(cookie) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
        }
        Err(error) => error.into_response(),
    }
}

/// Refuses cross-site changes: a POST, PUT or DELETE to the console's own API, or to any
/// endpoint with the console's cookie and no bearer token, needs `X-Tidepool-Console: 1`, and
/// its `Origin` (when the browser sends one) must be this server. Bearer-authenticated calls
/// pass untouched: a browser never attaches a bearer token on its own.
pub(crate) async fn csrf_guard(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let changes = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if changes {
        let headers = request.headers();
        let console_api = request
            .uri()
            .path()
            .strip_prefix(state.base_path())
            .is_some_and(|path| path.starts_with("/console/api/"));
        let rides_on_cookie =
            headers.get(header::AUTHORIZATION).is_none() && cookie_value(headers).is_some();
        if (console_api || rides_on_cookie) && !same_origin_console(headers) {
            return ApiError::CsrfRejected.into_response();
        }
    }
    next.run(request).await
}

fn same_origin_console(headers: &HeaderMap) -> bool {
    let marked = headers
        .get(CONSOLE_HEADER)
        .is_some_and(|value| value.as_bytes() == b"1");
    let Some(origin) = headers.get(header::ORIGIN) else {
        return marked;
    };
    let authority = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, authority)| authority);
    let host = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let same = authority.is_some_and(|authority| {
        host(header::HOST.as_str()) == Some(authority)
            || host("x-forwarded-host") == Some(authority)
    });
    marked && same
}

/// `GET /console`: the console lives at `/console/` (relative links need the slash).
pub(crate) async fn redirect_to_index() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "console/")],
    )
        .into_response()
}

fn asset(content_type: &'static str, body: &'static str, cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

/// `GET /console/`.
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML, "no-store")
}

/// `GET /console/app.js`.
pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS, "no-cache")
}

/// `GET /console/app.css`.
pub(crate) async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS, "no-cache")
}
