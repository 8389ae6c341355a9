//! [`BrokerError`]: everything a broker operation (and so a gRPC call)
//! can fail with. `api/` maps it to `tonic::Status` in one place
//! (`impl From<BrokerError> for Status` in `src/api/mod.rs`); the Docker
//! plugin shows its message. Messages name paths, versions and ids —
//! never a value.
#![forbid(unsafe_code)]

use crate::audit::AuditError;
use crate::backend::BackendError;
use crate::backend::local::StoreError;
use crate::identity::IdentityError;
use crate::policy::PolicyError;
use crate::secret::PathError;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request itself is wrong (an empty value, a backend's bare name).
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The state does not allow it (a volume in use, a workload missing).
    #[error("{0}")]
    Precondition(String),
    /// It could not be done now (a mount that did not come up).
    #[error("{0}")]
    Unavailable(String),
    /// A limit was reached (calls a second, mounts).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("cannot attest the caller: {0}")]
    Unauthenticated(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The audit line could not be written, so the call fails.
    #[error("audit log unavailable, so the call was refused: {0}")]
    Audit(#[from] AuditError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A source's error keeps its kind (a store's or a backend's), so it maps
/// to the same status as before the trait.
impl From<crate::backend::SourceError> for BrokerError {
    fn from(e: crate::backend::SourceError) -> Self {
        use crate::backend::SourceError as S;
        match e {
            S::Local(e) => BrokerError::Store(e),
            S::Remote(e) => BrokerError::Backend(e),
            S::Path(e) => BrokerError::Path(e),
        }
    }
}
