//! Where secret values live. `local` is the embedded encrypted store, the
//! default backend; it also keeps the policy.

pub mod local;

/// Metadata of one version of a secret. Never holds the value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionMeta {
    pub version: u64,
    pub created_unix_ms: i64,
    pub size: u64,
}
