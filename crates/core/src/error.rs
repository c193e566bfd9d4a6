use thiserror::Error;

/// Why a command was refused. Refusals are deterministic: every replica of the MDM state
/// machine refuses the same command for the same reason, so a refusal is a committed,
/// replicated outcome like any other.
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum CoreError {
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{kind} {name:?} is in use: {reason}")]
    InUse { kind: String, name: String, reason: String },
    #[error("not enough capacity: {0}")]
    NoCapacity(String),
}

impl CoreError {
    pub fn not_found(kind: &str, name: &str) -> Self {
        CoreError::NotFound { kind: kind.to_string(), name: name.to_string() }
    }
    pub fn exists(kind: &str, name: &str) -> Self {
        CoreError::AlreadyExists { kind: kind.to_string(), name: name.to_string() }
    }
    pub fn in_use(kind: &str, name: &str, reason: impl Into<String>) -> Self {
        CoreError::InUse { kind: kind.to_string(), name: name.to_string(), reason: reason.into() }
    }
}
