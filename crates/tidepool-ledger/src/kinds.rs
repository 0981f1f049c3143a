//! The closed sets that the ledger's API and its errors both name: where a reservation did not
//! fit, which per-minute limit was hit and on which scope, and a reservation's lifecycle state.
//! A leaf module (it uses nothing else of the crate), so `error` can name these types without
//! depending on `billing`.

/// Where a reservation did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// The tenant's prepaid balance (minus other open holds).
    Balance,
    ProjectBudget,
    KeyBudget,
}

/// Which per-minute limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    Requests,
    Tokens,
}

/// Which kind of scope an RPM/TPM limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScopeKind {
    Key,
    Project,
    Model,
}

impl RateScopeKind {
    /// The stored spelling back as a kind (`None`: not one of ours).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "key" => Some(Self::Key),
            "project" => Some(Self::Project),
            "model" => Some(Self::Model),
            _ => None,
        }
    }
}

/// The lifecycle of a reservation: `Open` → `Settled` | `Voided`, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    Open,
    Settled,
    Voided,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Settled => "settled",
            Self::Voided => "voided",
        }
    }

    /// The stored spelling back as a state (`None`: not one of ours).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "open" => Some(Self::Open),
            "settled" => Some(Self::Settled),
            "voided" => Some(Self::Voided),
            _ => None,
        }
    }
}
