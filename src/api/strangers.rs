//! What a stranger (any caller not attested as an admin when its
//! connection was accepted) may cost the broker, and the tower layer
//! every gRPC server runs: it counts the calls under way on a connection
//! (for the idle timeout, see [`crate::api::peer`]) and, on the
//! strangers' server, answers every path but the Workload service's with
//! PERMISSION_DENIED on the headers, audited, without reading a byte of
//! the body.
//!
//! # The memory budget
//!
//! A stranger's connection is served with [`STREAMS`] concurrent stream,
//! a window of [`STREAM_WINDOW`] bytes, frames of at most [`MAX_FRAME`]
//! bytes (the protocol's minimum), header lists of at most
//! [`MAX_HEADER_LIST`] bytes, requests of at most [`MAX_REQUEST`] and
//! answers of at most [`MAX_RESPONSE`] bytes. What one connection can hold
//! at most, whatever its peer sends or fails to read:
//!
//! | what | KiB |
//! |---|---|
//! | h2 read buffer: one frame being read, grown by doubling: 2 × (16 KiB + 9 B) | 33 |
//! | a header block being read: HEADERS and at most 5 CONTINUATION frames (h2's cap), 6 × 16 KiB | 96 |
//! | h2 write buffer (h2's fixed capacity; answers are chained, counted below) | 16 |
//! | HPACK tables, both ways, at the default 4 KiB | 8 |
//! | connection state, task, reset-stream queues (h2 keeps ≤ 70 entries) | 23 |
//! | **per stream**: decoded headers, 2 × 8 KiB | 16 |
//! | unread request data (the 4 KiB window) and tonic's decode buffer (8 KiB, for a 4 KiB message and one window more) | 16 |
//! | the answer: tonic's encode buffer and the frame h2 holds until the peer reads it, 2 × 16 KiB | 32 |
//! | the call's futures, its attested identity | 8 |
//!
//! That is 176 KiB + 1 × 72 KiB = 248 KiB ([`CONNECTION_BYTES`]). Data on
//! a stream that ends or is reset is dropped as it arrives, and h2 refuses
//! streams past [`STREAMS`]. An answer stays counted while its peer does
//! not read it; a stranger's connection ends after `[limits]
//! idle_timeout` (plus a grace), whatever it does, and any connection
//! whose peer takes nothing of what we send for that long is cut off.
//! Strangers' connections, over all sockets, are capped at
//! [`MAX_CONNECTIONS`] = 56 MiB / 248 KiB = 231: at most 56 MiB. The rest
//! of the 64 MiB: strangers' blocking jobs (attestation, audit lines; at
//! most [`BLOCKING`] at once, plus 8 classifications per socket: 32 ×
//! (64 KiB of stack and 32 KiB of `/proc` reads) = 3 MiB), and connections
//! not yet classified (at most 2 × `[limits] max_connections`, 2 KiB each:
//! 4 MiB at the default 1024). More connections are refused (audited, a
//! line a second per caller), more streams reset by h2.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::{Code, Status};

use super::conn::Counted;
use super::peer::ConnInfo;
use super::{BoxFuture, describe};
use crate::audit::{Event, EventKind};
use crate::broker::Broker;
use crate::identity::Identity;

/// Concurrent streams on a stranger's connection (WhoAmI is one unary call).
pub const STREAMS: u32 = 1;
/// A stranger's stream window; the connection's is at most the sum.
pub const STREAM_WINDOW: u32 = 4 << 10;
pub const CONNECTION_WINDOW: u32 = STREAMS * STREAM_WINDOW;
/// HTTP/2's smallest allowed maximum frame size.
pub const MAX_FRAME: u32 = 16 << 10;
pub const MAX_HEADER_LIST: u32 = 8 << 10;
/// The largest WhoAmI request and answer a stranger gets.
pub const MAX_REQUEST: usize = 4 << 10;
pub const MAX_RESPONSE: usize = 16 << 10;
/// What one stranger's connection can hold at most (see the module doc).
pub const CONNECTION_BYTES: usize = (176 << 10) + STREAMS as usize * (72 << 10);
/// What strangers' connections may hold, of the 64 MiB budget.
pub const CONNECTIONS_MEMORY: usize = 56 << 20;
/// Strangers' connections over all sockets.
pub const MAX_CONNECTIONS: usize = CONNECTIONS_MEMORY / CONNECTION_BYTES;
// The arithmetic, checked by the compiler.
const _: () = assert!(MAX_CONNECTIONS * CONNECTION_BYTES <= CONNECTIONS_MEMORY);
// Blocking jobs and unclassified connections (see the module doc) fit in the rest.
const _: () = assert!(CONNECTIONS_MEMORY + (3 << 20) + (4 << 20) <= 64 << 20);
const _: () = assert!(CONNECTION_WINDOW >= STREAM_WINDOW && MAX_REQUEST <= STREAM_WINDOW as usize);

/// Blocking jobs strangers' calls may run at once.
pub const BLOCKING: usize = 16;

/// The services a stranger may call.
const OPEN_TO_ALL: &str = "/keyhole.v1.Workload/";

/// The Admin service's methods, so an audit line names one only if it is
/// real (a caller cannot write what it likes into the log).
const ADMIN_METHODS: &[&str] = &[
    "PutSecret",
    "GetSecret",
    "ListSecrets",
    "SecretHistory",
    "DeleteSecret",
    "Status",
    "AuditLog",
    "AuditVerify",
    "AddWorkload",
    "ListWorkloads",
    "RemoveWorkload",
    "Grant",
    "Revoke",
    "ListGrants",
    "ListMounts",
    "Ping",
    "WhoAmI",
    "AddRole",
    "ListRoles",
    "RemoveRole",
    "ApplyPolicy",
    "ExportPolicy",
    "Refresh",
    "unknown",
    "PutTemplate",
    "GetTemplate",
    "ListTemplates",
    "DeleteTemplate",
];

/// The layer every gRPC server runs: it counts calls and, on the
/// strangers' server, refuses everything but the Workload service; on
/// the remote admin listener, admin calls from certificate subjects not
/// listed in `[admin] subjects`; there also (as [`super::listen::Track`])
/// it keeps each call counted on its connection, for its idle timeout.
#[derive(Clone)]
pub struct Calls {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Admins,
    Strangers(Arc<Broker>),
    Remote(Arc<Broker>),
    /// Calls counted on remote admin connections (by their address).
    Tracking(Arc<super::listen::NetGate>),
}

impl Calls {
    /// For the admins' server: counts calls.
    pub fn admins() -> Self {
        Calls { mode: Mode::Admins }
    }

    /// For the strangers' server: counts calls and refuses admin ones.
    pub fn strangers(broker: Arc<Broker>) -> Self {
        Calls { mode: Mode::Strangers(broker) }
    }

    /// For the remote admin listener (mutual TLS).
    pub fn remote(broker: Arc<Broker>) -> Self {
        Calls { mode: Mode::Remote(broker) }
    }

    /// Counts calls on the remote admin connections of `gate`.
    pub fn tracking(gate: Arc<super::listen::NetGate>) -> Self {
        Calls { mode: Mode::Tracking(gate) }
    }
}

impl<S> tower_layer::Layer<S> for Calls {
    type Service = CallsService<S>;

    fn layer(&self, inner: S) -> CallsService<S> {
        CallsService { inner, mode: self.mode.clone() }
    }
}

#[derive(Clone)]
pub struct CallsService<S> {
    inner: S,
    mode: Mode,
}

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for CallsService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: http_body::Body<Data = tonic::codegen::Bytes> + Unpin + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        let guard = match &self.mode {
            Mode::Tracking(gate) => {
                use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
                let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
                tls.and_then(|t| t.get_ref().remote_addr()).and_then(|a| gate.begin(a))
            }
            _ => info.as_ref().map(|i| i.activity.begin()),
        };
        match &self.mode {
            Mode::Strangers(broker) if !req.uri().path().starts_with(OPEN_TO_ALL) => {
                let method = admin_method(req.uri().path());
                let broker = broker.clone();
                // The body is never polled: it is dropped with `req`.
                drop(req);
                return Box::pin(async move {
                    let status = refuse(&broker, info, method).await;
                    let _guard = guard;
                    Ok(status.into_http())
                });
            }
            Mode::Remote(broker) => {
                if let Some((id, method)) = unlisted_subject(broker, &req) {
                    let broker = broker.clone();
                    drop(req);
                    return Box::pin(async move { Ok(refuse_remote(&broker, id, method).await.into_http()) });
                }
            }
            _ => {}
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let res = call.await?;
            Ok(res.map(|body| tonic::body::Body::new(Counted::new(body, guard))))
        })
    }
}

/// `Admin` method names pass; anything else is `unknown`.
fn admin_method(path: &str) -> &'static str {
    let name = path.strip_prefix("/keyhole.v1.Admin/").unwrap_or("unknown");
    ADMIN_METHODS.iter().find(|m| **m == name).copied().unwrap_or("unknown")
}

/// A stranger called an admin method: refused as `AdminService` refuses
/// a non-admin (same status, message and audit line), within the call
/// rate, but on the headers alone.
async fn refuse(broker: &Arc<Broker>, info: Option<ConnInfo>, method: &'static str) -> Status {
    let Some(info) = info else { return Status::internal("request without peer credentials") };
    let b = broker.clone();
    let outcome = super::blocking_bounded(move || {
        // Attested afresh, as every call is: the process may have exited.
        let attested = b.attestor().attest(&info.peer).map(|id| crate::policy::admin::decided(id, &b.config().admin));
        let id = match attested {
            Ok(id) => id,
            Err(e) => {
                let p = &info.peer;
                let who = Identity::unattested(p.uid, p.gid, p.pid);
                let reason = e.to_string();
                let event = Event {
                    method: Some(method),
                    caller: Some(&who),
                    reason: Some(&reason),
                    ..Event::new(EventKind::Deny)
                };
                b.audit().deny(&crate::limits::caller_key(&who), &event)?;
                return Err(e.into());
            }
        };
        b.allow_call(&id, method)?;
        if id.admin || b.roles().any_match(&super::caller_facts(&id)) {
            // An admin now, not when it connected (attestation timed out).
            return Err(super::ApiError::PermissionDenied(format!(
                "{method}: this connection was not attested as an admin's when it was opened; connect again"
            )));
        }
        let event = Event {
            method: Some(method),
            caller: Some(&id),
            reason: Some("not an admin"),
            ..Event::new(EventKind::Deny)
        };
        b.audit().deny(&crate::limits::caller_key(&id), &event)?;
        Err(super::ApiError::PermissionDenied(format!(
            "{method} needs an admin caller (a host process with uid 0 or an [admin] uid/gid); the broker sees {}",
            describe(&id)
        )))
    })
    .await;
    match outcome {
        Ok(()) => Status::new(Code::Internal, "refusal without a reason"),
        Err(e) => e.into(),
    }
}

/// A remote admin call (any but Ping, open to every client the TLS
/// handshake let in) from a certificate whose subject is not listed: its
/// identity (subject and address) and method. `AdminService` checks again.
fn unlisted_subject<B>(broker: &Broker, req: &http::Request<B>) -> Option<(Identity, &'static str)> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let method = admin_method(req.uri().path());
    if method == "Ping" {
        return None;
    }
    let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let certs = tls.and_then(|t| t.peer_certs());
    let id = super::remote::caller(certs.as_deref().map(Vec::as_slice), tls.and_then(|t| t.get_ref().remote_addr()));
    let id = crate::policy::admin::decided(id, &broker.config().admin);
    // A scoped admin (some role names it): the Admin service checks each
    // call against its roles.
    let scoped = broker.roles().any_match(&super::caller_facts(&id));
    (!id.admin && !scoped).then_some((id, method))
}

/// As `AdminService` refuses a remote client whose subject is not
/// listed (same status, message and audit line), on the headers.
async fn refuse_remote(broker: &Arc<Broker>, id: Identity, method: &'static str) -> Status {
    let b = broker.clone();
    let outcome = super::blocking_bounded(move || {
        let shown = id.remote.as_ref().map(crate::identity::Remote::subject_shown).unwrap_or_default();
        b.allow_call(&id, method)?;
        let reason = "client certificate subject is not in [admin] subjects";
        b.audit().deny(
            &crate::limits::caller_key(&id),
            &Event { method: Some(method), caller: Some(&id), reason: Some(reason), ..Event::new(EventKind::Deny) },
        )?;
        Err(super::ApiError::PermissionDenied(format!(
            "{method} needs an admin: the subject {shown} is not listed in the broker's [admin] subjects"
        )))
    })
    .await;
    match outcome {
        Ok(()) => Status::new(Code::Internal, "refusal without a reason"),
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arithmetic_holds() {
        assert_eq!(CONNECTION_BYTES, 248 << 10);
        assert_eq!(MAX_CONNECTIONS, 231);
    }

    #[test]
    fn only_real_admin_methods_are_named() {
        assert_eq!(admin_method("/keyhole.v1.Admin/GetSecret"), "GetSecret");
        assert_eq!(admin_method("/keyhole.v1.Admin/DropTables"), "unknown");
        assert_eq!(admin_method("/other.Service/GetSecret"), "unknown");
        assert_eq!(admin_method("/keyhole.v1.Admin/GetSecret/../x"), "unknown");
    }
}
