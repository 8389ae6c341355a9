//! The gRPC API: generated types, the services, and the one place where
//! errors become `tonic::Status`.
//!
//! Every call is attributed: the connection's [`Peer`] (from the kernel)
//! is attested into an [`Identity`] per call. Admin calls from anyone but
//! an admin are refused with PERMISSION_DENIED and audited: on the
//! headers, before any body is read, for a connection whose peer was not
//! an admin when it connected ([`strangers`]), and by the Admin service
//! itself otherwise.

pub mod admin;
pub mod conn;
pub mod listen;
pub mod peer;
mod redact;
pub mod remote;
pub mod strangers;
pub mod templates;
pub mod workload;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("keyhole.v1");
}

use tonic::{Code, Request, Status};

use crate::audit::AuditError;
use crate::backend::local::StoreError;
use crate::identity::{Identity, IdentityError, Peer};
use crate::secret::PathError;

/// Everything a call can fail with. Messages name paths, versions and
/// ids — never a value.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("cannot attest the caller: {0}")]
    Unauthenticated(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("audit log unavailable, so the call was refused: {0}")]
    Audit(#[from] AuditError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Policy(crate::policy::PolicyError::FileClash { .. }) => Code::FailedPrecondition,
            ApiError::InvalidArgument(_) | ApiError::Path(_) | ApiError::Policy(_) => Code::InvalidArgument,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Store(StoreError::NotFound(_) | StoreError::NoVersion { .. } | StoreError::Missing(_)) => {
                Code::NotFound
            }
            ApiError::Store(StoreError::Exists(_)) => Code::AlreadyExists,
            ApiError::Store(StoreError::Conflict { .. }) => Code::FailedPrecondition,
            ApiError::Backend(b) => {
                use crate::backend::BackendError as B;
                match b {
                    B::NotFound(_) => Code::NotFound,
                    B::Conflict { .. } => Code::FailedPrecondition,
                    B::Unavailable { .. } => Code::Unavailable,
                    B::Invalid(_) => Code::InvalidArgument,
                    B::Config(_) => Code::Internal,
                }
            }
            ApiError::Store(StoreError::Tampered { .. }) => Code::DataLoss,
            ApiError::Store(_) | ApiError::Internal(_) => Code::Internal,
            ApiError::Audit(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// The kernel-reported peer of the connection a request came on.
fn peer_of<T>(req: &Request<T>) -> Result<Peer, ApiError> {
    req.extensions()
        .get::<peer::ConnInfo>()
        .map(|c| c.peer.clone())
        .ok_or_else(|| ApiError::Internal("request without peer credentials".into()))
}

/// Run blocking work (the store, the audit file) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("worker failed: {e}")))?
}

/// Blocking work that any caller, admin or not, can start (attestation,
/// an audit line): at most [`strangers::BLOCKING`] at once, so a flood of
/// calls cannot take every blocking thread or the memory they would use.
async fn blocking_bounded<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(strangers::BLOCKING);
    let _slot = SLOTS.acquire().await.map_err(|e| ApiError::Internal(format!("blocking slots: {e}")))?;
    blocking(f).await
}

pub(crate) fn describe(id: &Identity) -> String {
    if let Some(r) = &id.remote {
        return format!("remote client {r}");
    }
    match &id.container_id {
        Some(c) => format!("uid {} in container {:.12}", id.uid, c),
        None if id.host => format!("host uid {}", id.uid),
        None => format!("uid {} in another namespace", id.uid),
    }
}

/// A tower layer counting gRPC calls by method and status code
/// (`keyhole_grpc_requests_total`). A call that fails inside a stream,
/// after its first response, is counted as OK.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountCalls;

impl<S> tower_layer::Layer<S> for CountCalls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Counted<S>(S);

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Counted<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let call = self.0.call(req);
        Box::pin(async move {
            let res = call.await;
            if let Ok(r) = &res {
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from);
                // Unknown methods are all one label: a caller cannot grow
                // the metrics by inventing names.
                let method = if code == Code::Unimplemented { "unknown".into() } else { method };
                let labels = crate::metrics::GrpcLabels { method, code: format!("{code:?}") };
                crate::metrics::METRICS.grpc_requests.get_or_create(&labels).inc();
            }
            res
        })
    }
}
