//! The broker's other listeners — remote admin over mutual TLS
//! (`[admin] listen`) and metrics (`[metrics] listen`, TCP or a Unix
//! socket) — held to the limits of its Unix sockets.
//!
//! Every connection takes a place in the broker's fd [`Budget`] (so the
//! reserve kept for attestation stays whatever these listeners get) and
//! counts against its listener's caps: `[limits] max_connections` in all
//! and `max_connections_per_caller` per remote address. A connection
//! still in its TLS handshake (metrics: that has sent nothing yet) is
//! *pending*: at most [`PENDING_PER_ADDRESS`] per address and
//! [`PENDING_MAX`] in all; a new connection over a cap pushes out the
//! oldest pending one (of its address first), or is closed at once if
//! there is none. Either is audited (`limit`), at most a line a second
//! per listener and address.
//!
//! Deadlines ([`NetConn`]): a TLS handshake must end within
//! [`HANDSHAKE_TIMEOUT`]; a remote admin connection with no call under
//! way for `[limits] idle_timeout` is closed; a metrics connection must
//! send its request within [`HANDSHAKE_TIMEOUT`], is closed when it has
//! sent nothing for as long, and lives at most [`METRICS_MAX_AGE`]; any
//! connection whose peer does not read what it is sent for the idle
//! timeout is closed.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::conn::{Activity, CallGuard, Seen, Watch, Watched};
use super::peer::{Budget, BudgetSlot, forget_one};
use super::strangers::{Calls, CallsService};
use crate::audit::AuditLog;
use crate::config::Limits;
use crate::limits::Refusals;

/// How long a TLS handshake may take (and a metrics request may take to
/// begin).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a metrics connection stays open (a scrape takes
/// milliseconds; a scraper reconnects).
pub const METRICS_MAX_AGE: Duration = Duration::from_secs(30);
/// Pending connections (see the module doc) per remote address.
pub const PENDING_PER_ADDRESS: usize = 16;
/// Pending connections in all, per listener.
pub const PENDING_MAX: usize = 64;

/// The caps of one listener (see the module doc).
pub struct NetGate {
    name: &'static str,
    max: usize,
    max_per_address: usize,
    idle_timeout: Duration,
    state: Mutex<NetState>,
    budget: Arc<Budget>,
    audit: Arc<AuditLog>,
    refusals: Refusals,
}

#[derive(Default)]
struct NetState {
    next: u64,
    /// Open connections, oldest first.
    conns: BTreeMap<u64, Conn>,
    per_address: HashMap<String, usize>,
    /// Calls under way per remote admin connection.
    calls: HashMap<SocketAddr, Arc<Activity>>,
}

struct Conn {
    address: String,
    pending: bool,
    evict: Arc<Evict>,
    _budget: BudgetSlot,
}

impl NetState {
    /// Push out the oldest pending connection (of `address`, if given).
    fn evict_oldest(&mut self, address: Option<&str>) -> bool {
        let oldest =
            self.conns.iter().find(|(_, c)| c.pending && address.is_none_or(|a| c.address == a)).map(|(id, _)| *id);
        let Some(id) = oldest else { return false };
        self.remove(id);
        true
    }

    fn remove(&mut self, id: u64) {
        let Some(c) = self.conns.remove(&id) else { return };
        forget_one(&mut self.per_address, &c.address);
        c.evict.evict();
    }
}

/// Tells a connection pushed out by a newer one to close.
#[derive(Default)]
struct Evict {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Evict {
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().expect("evict lock").take() {
            w.wake();
        }
    }

    fn evicted(&self, cx: &mut Context<'_>) -> bool {
        *self.waker.lock().expect("evict lock") = Some(cx.waker().clone());
        self.evicted.load(Ordering::SeqCst)
    }
}

/// What a listener's connections are held to.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Pending until the first bytes arrive (metrics), not until a TLS
    /// handshake ends (remote admin).
    established_on_first_read: bool,
    /// Close when nothing was read for the idle time (metrics), not when
    /// no call was under way (remote admin).
    idle_by_reads: bool,
    idle: Duration,
    max_age: Option<Duration>,
}

impl NetGate {
    pub fn new(name: &'static str, limits: &Limits, budget: Arc<Budget>, audit: Arc<AuditLog>) -> Arc<NetGate> {
        Arc::new(NetGate {
            name,
            max: limits.max_connections,
            max_per_address: limits.max_connections_per_caller,
            idle_timeout: limits.idle_timeout,
            state: Mutex::default(),
            budget,
            audit,
            refusals: Refusals::default(),
        })
    }

    /// The rules of a remote admin listener.
    pub fn remote_rules(&self) -> Rules {
        Rules { established_on_first_read: false, idle_by_reads: false, idle: self.idle_timeout, max_age: None }
    }

    /// The rules of a metrics listener.
    pub fn metrics_rules(&self) -> Rules {
        Rules {
            established_on_first_read: true,
            idle_by_reads: true,
            idle: HANDSHAKE_TIMEOUT,
            max_age: Some(METRICS_MAX_AGE),
        }
    }

    /// Admit a new connection from `address`, pushing out an older
    /// pending one if need be; None: closed at once.
    fn admit(self: &Arc<Self>, address: &str) -> Option<(NetSlot, Arc<Evict>)> {
        let mut notes: Vec<String> = Vec::new();
        let admitted = {
            let mut st = self.state.lock().expect("net gate lock");
            let mine = st.per_address.get(address).copied().unwrap_or(0);
            let mine_pending = st.conns.values().filter(|c| c.pending && c.address == address).count();
            let mut ok = true;
            if mine >= self.max_per_address || mine_pending >= PENDING_PER_ADDRESS {
                let limit = if mine >= self.max_per_address {
                    format!(
                        "max_connections_per_caller ({}) reached on {} from {address}",
                        self.max_per_address, self.name
                    )
                } else {
                    format!("{PENDING_PER_ADDRESS} connections in their handshake from {address} on {}", self.name)
                };
                ok = st.evict_oldest(Some(address));
                notes.push(if ok { format!("{limit}: the oldest still in its handshake closed") } else { limit });
            }
            if ok {
                let pending = st.conns.values().filter(|c| c.pending).count();
                if st.conns.len() >= self.max || pending >= PENDING_MAX {
                    let limit = if pending >= PENDING_MAX {
                        format!("{PENDING_MAX} connections in their handshake on {}", self.name)
                    } else {
                        format!("max_connections ({}) reached on {}", self.max, self.name)
                    };
                    ok = st.evict_oldest(None);
                    notes.push(if ok { format!("{limit}: the oldest still in its handshake closed") } else { limit });
                }
            }
            let budget = if ok {
                self.budget.take_place().or_else(|| {
                    let limit = self.budget.full();
                    let freed = st.evict_oldest(None);
                    notes.push(if freed {
                        format!("{limit}: the oldest still in its handshake closed")
                    } else {
                        limit
                    });
                    if freed { self.budget.take_place() } else { None }
                })
            } else {
                None
            };
            budget.map(|budget| {
                let id = st.next;
                st.next += 1;
                let evict = Arc::new(Evict::default());
                let conn = Conn { address: address.to_owned(), pending: true, evict: evict.clone(), _budget: budget };
                st.conns.insert(id, conn);
                *st.per_address.entry(address.to_owned()).or_default() += 1;
                (NetSlot { gate: self.clone(), id, calls_at: None }, evict)
            })
        };
        let key = format!("{} {address}", self.name);
        for n in notes {
            self.refusals.refused(&self.audit, &key, &n, None);
        }
        admitted
    }

    /// A new connection as a [`NetStream`], if admitted.
    pub fn stream<S>(self: &Arc<Self>, inner: S, address: &str, rules: Rules) -> Option<NetStream<S>> {
        let (slot, evict) = self.admit(address)?;
        Some(Watched::new(inner, NetConn { slot, evict, rules, calls: None }, HANDSHAKE_TIMEOUT))
    }

    /// A call begins on the remote admin connection from `addr`.
    pub(super) fn begin(&self, addr: SocketAddr) -> Option<CallGuard> {
        Some(self.state.lock().expect("net gate lock").calls.get(&addr)?.begin())
    }
}

/// A connection's place among its listener's.
pub struct NetSlot {
    gate: Arc<NetGate>,
    id: u64,
    calls_at: Option<SocketAddr>,
}

impl NetSlot {
    /// No longer pending; calls are tracked for `addr` (remote admin).
    fn established(&mut self, addr: Option<SocketAddr>) -> Option<Arc<Activity>> {
        let mut st = self.gate.state.lock().expect("net gate lock");
        if let Some(c) = st.conns.get_mut(&self.id) {
            c.pending = false;
        }
        let addr = addr?;
        let calls = Activity::new();
        st.calls.insert(addr, calls.clone());
        self.calls_at = Some(addr);
        Some(calls)
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().expect("net gate lock");
        st.remove(self.id);
        if let Some(a) = self.calls_at {
            st.calls.remove(&a);
        }
    }
}

/// A connection on one of these listeners, closed past its deadlines
/// (see the module doc).
pub type NetStream<S> = Watched<S, NetConn>;

/// What a [`NetStream`] holds besides its stream.
pub struct NetConn {
    slot: NetSlot,
    evict: Arc<Evict>,
    rules: Rules,
    /// Calls under way (remote admin, once past its handshake).
    calls: Option<Arc<Activity>>,
}

impl Watch for NetConn {
    fn deadline(&self, seen: &Seen, now: Instant) -> Result<Instant, &'static str> {
        let due = |at: Instant, why| if now >= at { Err(why) } else { Ok(at) };
        let mut next = now + self.rules.idle;
        if seen.read == 0 {
            next = next.min(due(seen.accepted + HANDSHAKE_TIMEOUT, "nothing sent")?);
        }
        if let Some(age) = self.rules.max_age {
            next = next.min(due(seen.accepted + age, "open too long")?);
        }
        if let Some(since) = seen.write_blocked {
            next = next.min(due(since + self.rules.idle, "the peer does not read what it asked for")?);
        }
        if self.rules.idle_by_reads {
            next = next.min(due(seen.last_read + self.rules.idle, "idle")?);
        } else if let Some(since) = self.calls.as_ref().and_then(|c| c.idle_since()) {
            next = next.min(due(since + self.rules.idle, "idle")?);
        }
        Ok(next)
    }

    fn pushed_out(&self, cx: &mut Context<'_>) -> bool {
        self.evict.evicted(cx)
    }

    fn first_read(&mut self) {
        if self.rules.established_on_first_read {
            self.slot.established(None);
        }
    }

    fn closing(&self, why: &'static str) {
        tracing::debug!(listener = self.slot.gate.name, why, "closing a connection");
    }
}

impl Connected for NetStream<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.get_ref().connect_info()
    }
}

/// A remote admin connection, past its TLS handshake.
pub type RemoteStream = tokio_rustls::server::TlsStream<NetStream<TcpStream>>;

/// Accept remote admin connections: admitted by `gate`, each handshake
/// run on its own task within [`HANDSHAKE_TIMEOUT`], established ones
/// handed to tonic. Accept errors are logged and retried after a pause.
/// The listener closes as soon as `stop` turns true (a successor may bind
/// the port while calls under way finish).
pub fn remote_incoming(
    listener: TcpListener,
    gate: Arc<NetGate>,
    tls: Arc<rustls::ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> ReceiverStream<io::Result<RemoteStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let rules = gate.remote_rules();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "remote admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over a cap: closed as it drops.
            let Some(stream) = gate.stream(tcp, &addr.ip().to_string(), rules) else { continue };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(mut tls)) => {
                        let c = &mut tls.get_mut().0.watch;
                        c.calls = c.slot.established(Some(addr));
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, from = %addr, "remote admin: TLS handshake failed"),
                    Err(_) => tracing::debug!(from = %addr, "remote admin: TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A bound metrics listener held to its gate, for `axum::serve`.
pub struct MetricsListener {
    pub inner: crate::metrics::Listener,
    pub gate: Arc<NetGate>,
}

/// What a metrics connection runs on: TCP or a Unix socket.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl axum::serve::Listener for MetricsListener {
    type Io = NetStream<Box<dyn Io>>;
    type Addr = String;

    async fn accept(&mut self) -> (Self::Io, String) {
        let rules = self.gate.metrics_rules();
        loop {
            let accepted = match &self.inner {
                crate::metrics::Listener::Tcp(l) => {
                    l.accept().await.map(|(s, a)| (Box::new(s) as Box<dyn Io>, a.ip().to_string()))
                }
                crate::metrics::Listener::Unix(l) => {
                    l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn Io>, "unix".to_owned()))
                }
            };
            match accepted {
                Ok((s, address)) => {
                    if let Some(s) = self.gate.stream(s, &address, rules) {
                        return (s, address);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<String> {
        Ok(self.gate.name.to_owned())
    }
}

/// The layer of the remote admin server that tracks calls under way per
/// connection, for its idle timeout.
#[derive(Clone)]
pub struct Track(pub Arc<NetGate>);

impl<S> tower_layer::Layer<S> for Track {
    type Service = CallsService<S>;

    fn layer(&self, inner: S) -> CallsService<S> {
        Calls::tracking(self.0.clone()).layer(inner)
    }
}
