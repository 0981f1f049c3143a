//! Sentence embeddings with candle's BERT (all-MiniLM-L6-v2): mean pooling over the attention
//! mask, then L2 normalisation, as sentence-transformers does for this model.
//!
//! The model runs on its own named thread fed by a bounded queue; each request is answered on a
//! oneshot. Inputs are tokenized on that thread too (CPU work stays off the async runtime), so
//! an over-long input comes back as `ContextLengthExceeded` through the oneshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tidepool_core::{ModelId, TokenCount};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::{EmbeddingEngine, Embeddings, EngineError};

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2; positions exist up to 512 but
/// the model was trained on at most 256 tokens.
pub const INPUT_TOKENS_MAX_DEFAULT: TokenCount = 256;
/// Inputs run through BERT together; bounds the activation memory of one forward pass.
const FORWARD_INPUTS_MAX: usize = 32;

/// Configuration of a [`CandleEmbeddingEngine`]; start from [`CandleEmbeddingConfig::new`].
#[derive(Debug, Clone)]
pub struct CandleEmbeddingConfig {
    pub model_id: ModelId,
    /// Directory with `config.json`, `model.safetensors` and `tokenizer.json`.
    pub dir: PathBuf,
    /// Longest input, in tokens (including `[CLS]`/`[SEP]`).
    pub input_tokens_max: TokenCount,
    /// Embedding requests waiting for the model thread; beyond it `Overloaded`.
    pub queue_len_max: u32,
    /// Inputs in one request.
    pub inputs_max: u32,
    /// `Retry-After` hint returned with `Overloaded`.
    pub overload_retry_after_ms: u32,
}

impl CandleEmbeddingConfig {
    pub fn new(model_id: ModelId, dir: impl Into<PathBuf>) -> Self {
        Self {
            model_id,
            dir: dir.into(),
            input_tokens_max: INPUT_TOKENS_MAX_DEFAULT,
            queue_len_max: 64,
            inputs_max: 2048,
            overload_retry_after_ms: 1000,
        }
    }
}

type Reply = oneshot::Sender<Result<Embeddings, EngineError>>;

struct Job {
    inputs: Vec<String>,
    reply: Reply,
}

/// all-MiniLM-L6-v2 (or another BERT sentence encoder) on candle's CPU backend.
#[derive(Debug)]
pub struct CandleEmbeddingEngine {
    model_id: ModelId,
    dimensions: usize,
    input_tokens_max: TokenCount,
    inputs_max: usize,
    commands: SyncSender<Job>,
    overload_retry_after_ms: u32,
}

fn load_error(path: &Path, reason: &impl ToString) -> EngineError {
    EngineError::Load {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl CandleEmbeddingEngine {
    /// Loads the model and tokenizer, then starts the model thread.
    pub fn load(config: CandleEmbeddingConfig) -> Result<Arc<Self>, EngineError> {
        if config.queue_len_max == 0 || config.inputs_max == 0 || config.input_tokens_max < 2 {
            return Err(load_error(
                &config.dir,
                &"queue_len_max, inputs_max >= 1, input_tokens_max >= 2",
            ));
        }
        let config_path = config.dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| load_error(&config_path, &e))?;
        let bert_config: BertConfig =
            serde_json::from_str(&text).map_err(|e| load_error(&config_path, &e))?;
        let weights_path = config.dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path).map_err(|e| load_error(&weights_path, &e))?;
        let device = Device::Cpu;
        let vars = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .map_err(|e| load_error(&weights_path, &e))?;
        let model =
            BertModel::load(vars, &bert_config).map_err(|e| load_error(&weights_path, &e))?;
        let tokenizer_path = config.dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| load_error(&tokenizer_path, &e))?;
        // The file pins truncation at 128 and padding to 128; we reject long inputs instead of
        // silently truncating, and pad per batch to its longest input.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| load_error(&tokenizer_path, &e))?;
        let dimensions = bert_config.hidden_size;
        let (commands, receiver) =
            std::sync::mpsc::sync_channel(usize::try_from(config.queue_len_max).unwrap_or(1));
        let worker = EmbedWorker {
            model,
            tokenizer,
            device,
            input_tokens_max: config.input_tokens_max,
        };
        std::thread::Builder::new()
            .name(format!("tidepool-embed-{}", config.model_id))
            .spawn(move || worker.run(&receiver))
            .map_err(|e| load_error(&config.dir, &e))?;
        Ok(Arc::new(Self {
            model_id: config.model_id,
            dimensions,
            input_tokens_max: config.input_tokens_max,
            inputs_max: usize::try_from(config.inputs_max).unwrap_or(usize::MAX),
            commands,
            overload_retry_after_ms: config.overload_retry_after_ms,
        }))
    }
}

impl EmbeddingEngine for CandleEmbeddingEngine {
    fn model_id(&self) -> &ModelId {
        &self.model_id
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn input_tokens_max(&self) -> TokenCount {
        self.input_tokens_max
    }

    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError> {
        if inputs.is_empty() {
            return Err(EngineError::InvalidRequest {
                param: "input",
                reason: "is empty".into(),
            });
        }
        if inputs.len() > self.inputs_max {
            return Err(EngineError::InvalidRequest {
                param: "input",
                reason: format!("more than {} inputs", self.inputs_max),
            });
        }
        let (reply, answer) = oneshot::channel();
        match self.commands.try_send(Job { inputs, reply }) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded {
                retry_after_ms: self.overload_retry_after_ms,
            }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShutDown),
        }
    }
}

struct EmbedWorker {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    input_tokens_max: TokenCount,
}

impl EmbedWorker {
    fn run(&self, commands: &Receiver<Job>) {
        while let Ok(job) = commands.recv() {
            if job.reply.is_closed() {
                continue;
            }
            let result = self.embed(&job.inputs);
            if job.reply.send(result).is_err() {
                tracing::debug!("embedding requester went away");
            }
        }
    }

    fn embed(&self, inputs: &[String]) -> Result<Embeddings, EngineError> {
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| EngineError::Tokenize {
                reason: e.to_string(),
            })?;
        let mut ids: Vec<&[u32]> = Vec::with_capacity(encodings.len());
        let mut prompt_tokens: TokenCount = 0;
        for encoding in &encodings {
            let len = TokenCount::try_from(encoding.get_ids().len()).unwrap_or(TokenCount::MAX);
            if len > self.input_tokens_max {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens: len,
                    max_tokens: 0,
                    context_tokens: self.input_tokens_max,
                });
            }
            prompt_tokens = prompt_tokens.saturating_add(len);
            ids.push(encoding.get_ids());
        }
        // Group inputs of similar length so padding wastes little, then restore input order.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids.get(i).map_or(0, |t| t.len()));
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for group in order.chunks(FORWARD_INPUTS_MAX) {
            let batch: Vec<&[u32]> = group.iter().filter_map(|&i| ids.get(i).copied()).collect();
            let embedded = self.forward(&batch).map_err(|e| EngineError::Embedding {
                reason: e.to_string(),
            })?;
            for (&index, vector) in group.iter().zip(embedded) {
                if let Some(slot) = vectors.get_mut(index) {
                    *slot = vector;
                }
            }
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens,
        })
    }

    /// One padded forward pass; returns one pooled, normalised vector per input.
    fn forward(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let width = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut flat_ids = Vec::with_capacity(batch.len() * width);
        let mut flat_mask = Vec::with_capacity(batch.len() * width);
        for ids in batch {
            flat_ids.extend_from_slice(ids);
            flat_mask.extend(std::iter::repeat_n(1u32, ids.len()));
            let padding = width - ids.len();
            flat_ids.extend(std::iter::repeat_n(0u32, padding));
            flat_mask.extend(std::iter::repeat_n(0u32, padding));
        }
        let shape = (batch.len(), width);
        let input_ids = Tensor::from_vec(flat_ids, shape, &self.device)?;
        let mask = Tensor::from_vec(flat_mask, shape, &self.device)?;
        let token_type_ids = input_ids.zeros_like()?;
        let hidden = self
            .model
            .forward(&input_ids, &token_type_ids, Some(&mask))?;
        // Mean over real tokens only: padding must not pull the average.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}
