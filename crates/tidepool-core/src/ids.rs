//! Identifiers. Request ids are `UUIDv7` (time-ordered, so ledger rows keyed on them stay
//! append-friendly); tenants and models are validated slugs.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::CoreError;

pub use tidepool_pool::ids::SLUG_BYTES_MAX;
/// A served model's id: owned by `tidepool-pool` (the bottom crate, so core's `[pool]` section
/// can embed the pool's knobs), re-exported here.
pub use tidepool_pool::{ModelId, RequestClass};

/// Checks a slug: 1..=64 bytes of `[a-z0-9._-]`, starting with a letter or digit (the same
/// rule as [`ModelId`]'s).
pub fn validate_slug(value: &str) -> Result<(), CoreError> {
    match tidepool_pool::ids::slug_problem(value) {
        None => Ok(()),
        Some(reason) => Err(CoreError::InvalidId {
            value: value.chars().take(SLUG_BYTES_MAX).collect(),
            reason,
        }),
    }
}

/// The id of one API request; the ledger's idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub Uuid);

impl RequestId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses an inbound `x-request-id`; only UUIDs are accepted so ledger keys stay uniform.
    pub fn parse(value: &str) -> Result<Self, CoreError> {
        Uuid::parse_str(value)
            .map(Self)
            .map_err(|_| CoreError::InvalidId {
                value: value.chars().take(SLUG_BYTES_MAX).collect(),
                reason: "request ids are UUIDs",
            })
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, CoreError> {
                let value = value.into();
                validate_slug(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = CoreError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_id!(
    /// A tenant (billing customer), e.g. `acme`.
    TenantId
);

/// The public, non-secret id of an API key (the `tp-<id>` prefix part of the key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub String);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(validate_slug("smollm2-135m-instruct").is_ok());
        assert!(validate_slug("a").is_ok());
        assert!(validate_slug("").is_err());
        assert!(validate_slug("-x").is_err());
        assert!(validate_slug("Acme").is_err());
        assert!(validate_slug("a b").is_err());
        assert!(validate_slug(&"a".repeat(65)).is_err());
        assert!(validate_slug(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn request_ids_are_v7_and_parse_back() {
        let id = RequestId::new();
        assert_eq!(id.0.get_version_num(), 7);
        assert_eq!(RequestId::parse(&id.to_string()).unwrap(), id);
        assert!(RequestId::parse("not-a-uuid").is_err());
    }
}
