//! Where secret values live, behind one trait ([`SecretSource`], in
//! `source`): the local store for every path no backend owns, and each
//! `vault` backend (Vault / OpenBao KV v2) for the paths under its name
//! (`prod/...`). `health` says whether a source answers and how fresh
//! what it caches is.
//!
//! `local` is more than a source: it is the broker's store
//! ([`Store`]) — the secrets no backend owns, and also the policy
//! (workloads, grants), the Docker volumes and their mounts, the sealed
//! copies of values fetched from Vault, and the audit log's sealed head.

pub mod health;
pub mod local;
pub mod source;
pub mod vault;

/// The broker's embedded, encrypted store (see `local`).
pub use local::LocalStore as Store;
pub use source::{SecretSource, SourceError, VaultSource};

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
