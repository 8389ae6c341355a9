//! Where secret values live. `local` is the embedded encrypted store, the
//! default backend; it also keeps the policy and the sealed copies of
//! values fetched from `vault` backends (Vault / OpenBao KV v2), which
//! own every path under their name (`prod/...`).

pub mod local;
pub mod vault;

/// Errors of a remote backend. Messages name paths, never values.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("secret {0} does not exist")]
    NotFound(String),
    #[error("{path} was not changed: {detail}")]
    Conflict { path: String, detail: String },
    #[error("backend {backend} is unavailable: {reason}")]
    Unavailable { backend: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Config(String),
}

/// Metadata of one version of a secret. Never holds the value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionMeta {
    pub version: u64,
    pub created_unix_ms: i64,
    pub size: u64,
}
