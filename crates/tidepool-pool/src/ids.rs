//! The vocabulary the pool shares with every other crate: a served model's id ([`ModelId`], a
//! validated slug) and the scheduling policy ([`PoolPolicy`]). They live here, at the bottom of
//! the crate graph, so that `tidepool-core` can embed the pool's [`PoolKnobs`](crate::PoolKnobs)
//! in the `[pool]` section of the configuration; core re-exports both, so
//! `tidepool_core::ModelId` and `tidepool_core::PoolPolicy` keep working.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted slug (tenant, model, key name), in bytes.
pub const SLUG_BYTES_MAX: usize = 64;

/// Why `value` is not a slug (1..=64 bytes of `[a-z0-9._-]`, starting with a letter or digit),
/// or `None` if it is one.
pub fn slug_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return Some("must not be empty");
    }
    if value.len() > SLUG_BYTES_MAX {
        return Some("longer than 64 bytes");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("only lowercase letters, digits, '.', '_' and '-' are allowed");
    }
    if !value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Some("must start with a letter or digit");
    }
    None
}

/// A value that is not a model id: what it was (at most 64 characters) and why. Core turns it
/// into its `CoreError::InvalidId`, as for every other id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id `{value}`: {reason}")]
pub struct InvalidId {
    pub value: String,
    pub reason: &'static str,
}

/// A served model's public id, e.g. `smollm2-135m-instruct`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelId(String);

impl ModelId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
        let value = value.into();
        match slug_problem(&value) {
            None => Ok(Self(value)),
            Some(reason) => Err(InvalidId {
                value: value.chars().take(SLUG_BYTES_MAX).collect(),
                reason,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelId {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<ModelId> for String {
    fn from(value: ModelId) -> Self {
        value.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which scheduling policy the model pool uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolPolicy {
    /// Every model always resident.
    Dedicated,
    /// Request-level swapping, least recently used model evicted (Ollama-like). The default:
    /// on the CPU engine it sustains more than `token` on short outputs (docs/pool.md §3.4).
    #[default]
    SwapLru,
    /// Token-level switching (Aegaeon-like).
    Token,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_slugs() {
        assert!(ModelId::new("smollm2-135m-instruct").is_ok());
        assert!(ModelId::new("a").is_ok());
        assert!(ModelId::new("a".repeat(64)).is_ok());
        for bad in ["", "-x", "Acme", "a b", &"a".repeat(65)] {
            assert!(matches!(ModelId::new(bad), Err(InvalidId { .. })), "{bad}");
        }
    }
}

/// Which traffic a request belongs to. `Online` requests are the API's interactive calls;
/// `Batch` requests (lines of a `/v1/batches` job) run only on capacity online traffic leaves
/// idle and never take an accelerator, a slot or a switch from an online request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RequestClass {
    #[default]
    Online,
    Batch,
}
