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
pub mod roles;
pub mod strangers;
pub mod templates;
pub mod workload;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("keyhole.v1");
}

use tonic::{Code, Request, Status};

use crate::backend::local::StoreError;
use crate::identity::{Identity, Peer};

/// Everything a call can fail with: the broker's one error type (the
/// name `ApiError` stays for the code in `api/`).
pub use crate::broker::BrokerError as ApiError;
use crate::broker::BrokerError;

/// The one place a [`BrokerError`] becomes a gRPC status.
impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let code = match &e {
            BrokerError::Policy(crate::policy::PolicyError::FileClash { .. }) => Code::FailedPrecondition,
            BrokerError::InvalidArgument(_) | BrokerError::Path(_) | BrokerError::Policy(_) => Code::InvalidArgument,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::Precondition(_) => Code::FailedPrecondition,
            BrokerError::Unavailable(_) => Code::Unavailable,
            BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::Store(StoreError::NotFound(_) | StoreError::NoVersion { .. } | StoreError::Missing(_)) => {
                Code::NotFound
            }
            BrokerError::Store(StoreError::Exists(_)) => Code::AlreadyExists,
            BrokerError::Store(StoreError::Conflict { .. }) => Code::FailedPrecondition,
            BrokerError::Backend(b) => {
                use crate::backend::BackendError as B;
                match b {
                    B::NotFound(_) => Code::NotFound,
                    B::Conflict { .. } => Code::FailedPrecondition,
                    B::Unavailable { .. } => Code::Unavailable,
                    B::Invalid(_) => Code::InvalidArgument,
                    B::Config(_) => Code::Internal,
                }
            }
            BrokerError::Store(StoreError::Tampered { .. }) => Code::DataLoss,
            BrokerError::Store(_) | BrokerError::Internal(_) => Code::Internal,
            BrokerError::Audit(_) => Code::Unavailable,
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

/// The facts about a caller that role principals match.
pub(crate) fn caller_facts(id: &Identity) -> crate::policy::roles::Caller<'_> {
    crate::policy::roles::Caller {
        uid: id.uid,
        gid: id.gid,
        groups: &id.groups,
        host: id.host && id.remote.is_none(),
        subject: id.remote.as_ref().and_then(|r| r.subject.as_ref().ok()),
    }
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
