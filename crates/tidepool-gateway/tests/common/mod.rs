//! Shared harness for the gateway's in-process tests: the whole router over a real SQLite ledger
//! in a temp dir, with test engines — the engine crate's deterministic `FakeEngine`, a scripted
//! engine whose events the test sends by hand (exact control over chunks, failures, overload,
//! and a signal when the gateway drops the generation), and a fixed embedding engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use serde_json::Value;
use tidepool_core::{Currency, Limits, ModelId, ModelKind, Nanos, RequestId, TenantId, TokenCount};
use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
use tidepool_engine::{
    ChatMessage, EmbeddingEngine, Embeddings, EngineError, EngineStats, GenerateRequest,
    Generation, GenerationEvent, TextEngine, TokenId,
};
use tidepool_gateway::{AppState, ServedModel, StateOptions, router};
use tidepool_ledger::{AuditContext, Ledger, PriceVersion, UsageEntry};
use tokio::sync::{mpsc, oneshot};
use tower::ServiceExt as _;

pub(crate) const FAKE_CHAT: &str = "fake-chat";
pub(crate) const FAKE_BASE: &str = "fake-base";
pub(crate) const SCRIPTED: &str = "scripted";
pub(crate) const EMBED: &str = "fake-embed";
pub(crate) const EMBED_DIMENSIONS: usize = 3;
/// Every test model's price: 1000 nano-units per prompt token, 2000 per completion token.
pub(crate) const INPUT_PER_MTOK: i64 = 1_000_000_000;
pub(crate) const OUTPUT_PER_MTOK: i64 = 2_000_000_000;
/// The `acme` tenant's prepaid credit: 1000 units.
pub(crate) const CREDIT_NANOS: i64 = 1_000_000_000_000;
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token";

/// The price every test model is billed at.
pub(crate) fn price(model: &str) -> PriceVersion {
    PriceVersion {
        model: id(model),
        effective_from_ms: 0,
        currency: Currency::USD,
        input_per_mtok: Nanos(INPUT_PER_MTOK),
        output_per_mtok: Nanos(OUTPUT_PER_MTOK),
        cached_input_per_mtok: Nanos(INPUT_PER_MTOK / 2),
    }
}

/// The exact cost of a request at [`price`].
pub(crate) fn cost(prompt_tokens: u32, completion_tokens: u32) -> i64 {
    (i64::from(prompt_tokens) * INPUT_PER_MTOK + i64::from(completion_tokens) * OUTPUT_PER_MTOK)
        / 1_000_000
}

/// One submission the scripted engine received: the request and the sender of its events.
#[derive(Debug)]
pub(crate) struct Submitted {
    pub(crate) request: GenerateRequest,
    pub(crate) events: mpsc::Sender<GenerationEvent>,
}

/// A text engine the test drives by hand.
#[derive(Debug)]
pub(crate) struct ScriptedEngine {
    id: ModelId,
    submitted: mpsc::Sender<Submitted>,
    pub(crate) overloaded: AtomicBool,
}

impl TextEngine for ScriptedEngine {
    fn model_id(&self) -> &ModelId {
        &self.id
    }
    fn context_tokens(&self) -> TokenCount {
        64
    }
    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        Ok(messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join(" "))
    }
    fn tokenize(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        Ok(text.split_whitespace().map(|_| 1).collect())
    }
    fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        if self.overloaded.load(Ordering::Relaxed) {
            return Err(EngineError::Overloaded {
                retry_after_ms: 1500,
            });
        }
        let (events, receiver) = mpsc::channel(16);
        self.submitted
            .try_send(Submitted { request, events })
            .map_err(|_| EngineError::Overloaded {
                retry_after_ms: 1500,
            })?;
        Ok(Generation {
            events: receiver,
            prefill_started: tidepool_engine::PrefillStart::default(),
        })
    }
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
}

/// Embeds every input as `[words, 0.5, -0.25]`; one token per word.
#[derive(Debug)]
pub(crate) struct FixedEmbedder {
    id: ModelId,
}

impl EmbeddingEngine for FixedEmbedder {
    fn model_id(&self) -> &ModelId {
        &self.id
    }
    fn dimensions(&self) -> usize {
        EMBED_DIMENSIONS
    }
    fn input_tokens_max(&self) -> TokenCount {
        8
    }
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError> {
        let (tx, rx) = oneshot::channel();
        let mut tokens = 0u32;
        let mut vectors = Vec::new();
        for input in &inputs {
            let words = u32::try_from(input.split_whitespace().count()).unwrap();
            if words > self.input_tokens_max() {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens: words,
                    max_tokens: 0,
                    context_tokens: self.input_tokens_max(),
                });
            }
            tokens += words;
            #[expect(clippy::cast_precision_loss, reason = "small test counts")]
            vectors.push(vec![words as f32, 0.5, -0.25]);
        }
        tx.send(Ok(Embeddings {
            vectors,
            prompt_tokens: tokens,
        }))
        .unwrap();
        Ok(rx)
    }
}

/// The app under test.
pub(crate) struct App {
    pub(crate) state: AppState,
    pub(crate) router: Router,
    pub(crate) ledger: Ledger,
    pub(crate) key: String,
    pub(crate) key_id: String,
    pub(crate) scripted: Arc<ScriptedEngine>,
    pub(crate) submissions: mpsc::Receiver<Submitted>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh name for a scratch directory.
fn uuid_like() -> String {
    RequestId::new().to_string()
}

pub(crate) fn id(value: &str) -> ModelId {
    ModelId::new(value).unwrap()
}

impl App {
    pub(crate) async fn new() -> Self {
        Self::with(Limits::default(), |config| config).await
    }

    /// An app with these limits; `fake` adjusts the fake chat engine's config.
    pub(crate) async fn with(
        limits: Limits,
        fake: impl FnOnce(FakeEngineConfig) -> FakeEngineConfig,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let ledger = Ledger::connect(&url).await.unwrap();
        Self::on(ledger, Some(dir), StateOptions::new(limits), fake).await
    }

    /// An app on an existing ledger (e.g. PostgreSQL, or a second replica), with explicit state
    /// options; prices are set and `acme` gets a key (and, when its account is new, credit).
    pub(crate) async fn on(
        ledger: Ledger,
        dir: Option<tempfile::TempDir>,
        mut options: StateOptions,
        fake: impl FnOnce(FakeEngineConfig) -> FakeEngineConfig,
    ) -> Self {
        let acme = TenantId::new("acme").unwrap();
        let created = ledger
            .create_key(&acme, "tests", &AuditContext::ADMIN)
            .await
            .unwrap();
        if ledger.account(&acme).await.unwrap().balance == Nanos::ZERO {
            ledger
                .credit(&acme, Nanos(CREDIT_NANOS), "tests", &AuditContext::ADMIN)
                .await
                .unwrap();
        }
        for model in [FAKE_CHAT, FAKE_BASE, SCRIPTED, EMBED] {
            ledger
                .set_price(&price(model), &AuditContext::ADMIN)
                .await
                .unwrap();
        }
        if options.admin_token.is_none() {
            options.admin_token = Some(ADMIN_TOKEN.to_owned());
        }
        // Batch files next to the test's database, never in the working directory.
        if options.batch.files_dir.is_none() {
            options.batch.files_dir = Some(match &dir {
                Some(dir) => dir.path().join("batch-files"),
                None => std::env::temp_dir().join(format!("tidepool-batch-{}", uuid_like())),
            });
        }
        let fake_chat = FakeEngine::start(fake(FakeEngineConfig::new(id(FAKE_CHAT)))).unwrap();
        let fake_base = FakeEngine::start(FakeEngineConfig::new(id(FAKE_BASE))).unwrap();
        let (submitted, submissions) = mpsc::channel(16);
        let scripted = Arc::new(ScriptedEngine {
            id: id(SCRIPTED),
            submitted,
            overloaded: AtomicBool::new(false),
        });
        let models = vec![
            ServedModel::text(ModelKind::Chat, fake_chat),
            ServedModel::text(ModelKind::Completion, fake_base),
            ServedModel::text(ModelKind::Chat, scripted.clone()),
            ServedModel::embedding(Arc::new(FixedEmbedder { id: id(EMBED) })),
        ];
        let state = AppState::with_options(models, ledger.clone(), options);
        Self {
            router: router(state.clone()),
            state,
            ledger,
            key: created.secret,
            key_id: created.record.key_id.0,
            scripted,
            submissions,
            _dir: dir,
        }
    }

    /// The `acme` tenant's balance now.
    pub(crate) async fn balance(&self) -> i64 {
        self.account().await.balance.0
    }

    /// The `acme` tenant's holds of requests in flight now.
    pub(crate) async fn reserved(&self) -> i64 {
        self.account().await.reserved.0
    }

    async fn account(&self) -> tidepool_ledger::Account {
        self.ledger
            .account(&TenantId::new("acme").unwrap())
            .await
            .unwrap()
    }

    pub(crate) async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.router.clone().oneshot(request).await.unwrap()
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Response<Body> {
        self.send(post(path, &self.key, body.to_string())).await
    }

    pub(crate) async fn get(&self, path: &str) -> Response<Body> {
        let request = Request::get(path)
            .header("authorization", format!("Bearer {}", self.key))
            .body(Body::empty())
            .unwrap();
        self.send(request).await
    }

    /// `GET path` as the operator (`/metrics`, `/v1/pool`, `/v1/backends`).
    pub(crate) async fn get_admin(&self, path: &str) -> Response<Body> {
        let request = Request::get(path)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Body::empty())
            .unwrap();
        self.send(request).await
    }

    /// Waits until every spawned settlement write has finished (a signal, not a sleep).
    pub(crate) async fn settle(&self) {
        let tasks = self.state.tasks();
        tasks.close();
        tasks.wait().await;
        tasks.reopen();
    }

    /// The usage entry of the request that produced `response`, after settling.
    pub(crate) async fn usage_of(&self, response: &Response<Body>) -> UsageEntry {
        self.settle().await;
        let request_id = RequestId::parse(
            response
                .headers()
                .get("x-request-id")
                .unwrap()
                .to_str()
                .unwrap(),
        )
        .unwrap();
        self.ledger
            .usage_entry(request_id)
            .await
            .unwrap()
            .expect("a usage row")
    }

    /// The next submission the scripted engine received.
    pub(crate) async fn submission(&mut self) -> Submitted {
        self.submissions.recv().await.expect("a submission")
    }
}

pub(crate) fn post(path: &str, key: &str, body: String) -> Request<Body> {
    Request::post(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

pub(crate) async fn body_bytes(response: Response<Body>) -> Vec<u8> {
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec()
}

pub(crate) async fn json(response: Response<Body>) -> Value {
    serde_json::from_slice(&body_bytes(response).await).unwrap()
}

/// Asserts an OpenAI-shaped error with this status and code; returns the `error` object.
pub(crate) async fn expect_error(
    response: Response<Body>,
    status: StatusCode,
    code: &str,
) -> Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/json",
        "content type"
    );
    let body = json(response).await;
    let error = body["error"].clone();
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].as_str().is_some(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    error
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("data: ").map(str::to_owned))
        .collect()
}
