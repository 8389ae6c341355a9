//! Unix-socket connections that carry their peer's kernel identity, and
//! the limits every connection is held to until it closes.
//!
//! At accept time we take `SO_PEERCRED` (uid, gid, pid as of connect) and
//! the kernel's pidfd for that process (`SO_PEERPIDFD`, Linux 6.5+), and
//! attach them to every request on the connection. Without
//! `SO_PEERPIDFD` the connection is refused: a pid re-pinned later with
//! `pidfd_open` may be a newcomer's, if the connector exited while queued
//! (fail closed; `keyhole doctor` checks the kernel). The
//! peer is then attested once, off the accept loop: an admin's connection
//! goes to the server with the Admin service and normal HTTP/2 limits;
//! everyone else's (a *stranger's*) to a server with small windows, few
//! streams and only the Workload service (see [`crate::api::strangers`]).
//!
//! Every connection counts against its socket's limits and against the
//! broker's [`Budget`] (file descriptors and, for strangers, memory). A
//! connection that sends no HTTP/2 preface within [`PREFACE_TIMEOUT`],
//! that has had no call under way for `[limits] idle_timeout`, or whose
//! peer has not taken a byte of what we send for as long, is closed.
//!
//! The pidfd stays open for the connection's life: every call re-attests
//! its peer with it (a connection left behind by a process that exited is
//! refused, and WhoAmI answers for the process that is there now).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::conn::{Seen, Watch, Watched};
use crate::audit::AuditLog;
use crate::config::{AdminPolicy, Limits};
use crate::identity::{Attestor, Identity, Peer};
use crate::limits::Refusals;
use crate::policy::roles::RoleTable;

/// How long a new connection has to send the HTTP/2 client preface.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// The client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;
/// How long classifying a new connection (attesting its peer) may take;
/// past it the peer is a stranger.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// Peers attested at once per socket, so a flood of connections cannot
/// take every blocking thread.
const CLASSIFYING: usize = 8;
/// File descriptors a connection holds: its socket and its peer's pidfd.
pub const FDS_PER_CONNECTION: u64 = 2;
/// File descriptors kept for everything but connections (the store, the
/// audit files, Docker and Vault clients, FUSE callers' pidfds, the
/// runtime), on top of two per FUSE mount (`[limits] max_mounts`); at most
/// half the soft limit.
const RESERVED_FDS: u64 = 256;
// The FUSE callers' pidfds the attestor keeps fit well within the reserve.
const _: () = assert!((crate::identity::KNOWN_MAX as u64) <= RESERVED_FDS / 2);
/// Connections kept for admins: strangers never take the last of them.
const ADMIN_CONNECTIONS: usize = 32;

/// What tonic attaches to every request of a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: Peer,
    /// The peer as attested when the connection was accepted (None: it
    /// could not be).
    pub identity: Option<Arc<Identity>>,
    pub activity: Arc<Activity>,
}

pub use super::conn::{Activity, CallGuard};

/// The broker's connection budget, over all its sockets: connections in
/// all (from the file descriptors left once [`RESERVED_FDS`] are kept),
/// and strangers' connections (from the memory budget, see
/// [`crate::api::strangers::CONNECTION_BYTES`]).
#[derive(Debug)]
pub struct Budget {
    pub max: usize,
    pub strangers_max: usize,
    pub reserved_fds: u64,
    pub soft_nofile: u64,
    open: Mutex<(usize, usize)>,
}

impl Budget {
    /// The budget under a soft `RLIMIT_NOFILE` of `soft`.
    pub fn new(soft: u64, limits: &Limits) -> Arc<Budget> {
        let reserved_fds = (RESERVED_FDS + 2 * limits.max_mounts as u64).min(soft / 2);
        let by_fds = (soft.saturating_sub(reserved_fds) / FDS_PER_CONNECTION) as usize;
        let max = by_fds.max(1);
        let by_memory = crate::api::strangers::MAX_CONNECTIONS;
        let strangers_max = by_memory.min(max.saturating_sub(ADMIN_CONNECTIONS.min(max / 2))).max(1);
        Arc::new(Budget { max, strangers_max, reserved_fds, soft_nofile: soft, open: Mutex::default() })
    }
}

/// A place in the [`Budget`] taken by a connection that is not on one of
/// the Unix sockets (the remote admin and metrics listeners); given back
/// when it drops.
#[derive(Debug)]
pub struct BudgetSlot(Arc<Budget>);

impl Budget {
    /// Why a connection is refused when the budget is spent (audited).
    pub fn full(&self) -> String {
        format!("the broker's connection budget ({}, from its file limit of {}) reached", self.max, self.soft_nofile)
    }

    /// A place for a connection on a TCP (or metrics) listener, if one is
    /// free once the places kept for `admin.sock` are left.
    pub fn take_place(self: &Arc<Self>) -> Option<BudgetSlot> {
        let mut open = self.open.lock().expect("budget lock");
        if open.0 + ADMIN_CONNECTIONS.min(self.max / 2) >= self.max {
            return None;
        }
        open.0 += 1;
        Some(BudgetSlot(self.clone()))
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.0.open.lock().expect("budget lock").0 -= 1;
    }
}

/// A Unix-socket connection: its peer, its places in the limits and its
/// deadlines (see the module doc).
pub type PeerStream = Watched<UnixStream, PeerConn>;

/// What a [`PeerStream`] holds besides its socket.
pub struct PeerConn {
    info: ConnInfo,
    /// Counts this connection against the limits while it is open.
    admitted: Admitted,
    /// Counts a stranger's connection against the strangers' budget.
    _stranger: Option<StrangerSlot>,
    idle_timeout: Duration,
}

/// The connection limits of one socket: in all, and per caller, within
/// the broker's [`Budget`]. A connection over any is closed at once, and
/// audited (at most a line a second per caller).
///
/// A caller is what attestation proved, never a name the caller chose
/// (such as its cgroup path, which a user with a delegated cgroup picks):
/// the container, once Docker confirmed it and the peer is in its
/// namespaces; else the peer's uid (`SO_PEERCRED`, as the broker's user
/// namespace sees it: a host uid). Until its peer is attested, a
/// connection counts against its uid's *attesting* share (also held to
/// the per-caller limit), then moves to its caller's share
/// ([`Gate::settle`]).
pub struct Gate {
    name: String,
    max: usize,
    max_per_caller: usize,
    idle_timeout: Duration,
    open: Mutex<(usize, HashMap<String, usize>)>,
    budget: Arc<Budget>,
    /// Places of the budget this socket leaves to the admin socket.
    leave: usize,
    audit: Arc<AuditLog>,
    refusals: Refusals,
    classifying: Arc<Semaphore>,
    /// Log lines about peers that cannot be pinned (at most one a second).
    unpinned: crate::identity::Throttle,
}

impl Gate {
    /// The gate of socket `name`; any but the admin socket leaves the last
    /// places of the budget to it.
    pub fn new(name: impl Into<String>, limits: &Limits, budget: Arc<Budget>, audit: Arc<AuditLog>) -> Arc<Gate> {
        let name = name.into();
        let leave = if name == "admin.sock" { 0 } else { ADMIN_CONNECTIONS.min(budget.max / 2) };
        Arc::new(Gate {
            leave,
            name,
            max: limits.max_connections,
            max_per_caller: limits.max_connections_per_caller,
            idle_timeout: limits.idle_timeout,
            open: Mutex::default(),
            budget,
            audit,
            refusals: Refusals::default(),
            classifying: Arc::new(Semaphore::new(CLASSIFYING)),
            unpinned: crate::identity::Throttle::default(),
        })
    }

    fn admit(self: &Arc<Self>, peer: &Peer) -> Option<Admitted> {
        let key = attesting_key(peer);
        let refused = {
            let mut open = self.open.lock().expect("gate lock");
            let mut budget = self.budget.open.lock().expect("budget lock");
            let (total, per) = &mut *open;
            let mine = per.get(&key).copied().unwrap_or(0);
            if *total >= self.max {
                Some(format!("max_connections ({}) reached on {}", self.max, self.name))
            } else if mine >= self.max_per_caller {
                Some(format!("max_connections_per_caller ({}) reached on {}", self.max_per_caller, self.name))
            } else if budget.0 + self.leave >= self.budget.max {
                Some(self.budget.full())
            } else {
                *total += 1;
                budget.0 += 1;
                per.insert(key.clone(), mine + 1);
                None
            }
        };
        match refused {
            None => Some(Admitted { gate: self.clone(), key }),
            Some(limit) => {
                self.refuse(&caller_key(peer, None), &limit, peer);
                None
            }
        }
    }

    /// Move an attested connection from its uid's attesting share to its
    /// caller's (see [`caller_key`]); false, and audited, if that caller
    /// already holds its limit (the connection then closes as `admitted`
    /// drops).
    fn settle(&self, admitted: &mut Admitted, peer: &Peer, identity: Option<&Identity>) -> bool {
        let key = caller_key(peer, identity);
        {
            let mut open = self.open.lock().expect("gate lock");
            let (_, per) = &mut *open;
            let mine = per.get(&key).copied().unwrap_or(0);
            if mine < self.max_per_caller {
                per.insert(key.clone(), mine + 1);
                forget_one(per, &admitted.key);
                admitted.key = key;
                return true;
            }
        }
        let limit = format!("max_connections_per_caller ({}) reached on {}", self.max_per_caller, self.name);
        self.refuse(&key, &limit, peer);
        false
    }

    /// A peer the kernel would not give a pidfd for: refused, logged and
    /// audited at most once a second.
    fn refuse_unpinned(&self, peer: &Peer, error: &io::Error) {
        if let Some(held) = self.unpinned.allow() {
            tracing::error!(
                uid = peer.uid,
                pid = peer.pid,
                error = %error,
                held_back = held,
                "refusing a connection: no SO_PEERPIDFD for its peer (keyhole needs Linux 6.5 or later)"
            );
        }
        self.refuse("unpinned", &format!("no pidfd for the peer on {} (SO_PEERPIDFD)", self.name), peer);
    }

    /// A place among the strangers' connections, if one is free.
    fn stranger(self: &Arc<Self>, peer: &Peer, key: &str) -> Option<StrangerSlot> {
        {
            let mut budget = self.budget.open.lock().expect("budget lock");
            if budget.1 < self.budget.strangers_max {
                budget.1 += 1;
                return Some(StrangerSlot(self.budget.clone()));
            }
        }
        let limit = format!("the broker's budget of {} non-admin connections reached", self.budget.strangers_max);
        self.refuse(key, &limit, peer);
        None
    }

    fn refuse(&self, key: &str, limit: &str, peer: &Peer) {
        let who = Identity::unattested(peer.uid, peer.gid, peer.pid);
        self.refusals.refused(&self.audit, key, limit, Some(&who));
    }
}

struct Admitted {
    gate: Arc<Gate>,
    key: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().expect("gate lock");
        let (total, per) = &mut *open;
        *total -= 1;
        forget_one(per, &self.key);
        self.gate.budget.open.lock().expect("budget lock").0 -= 1;
    }
}

/// One connection fewer for `key`.
pub(super) fn forget_one(per: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = per.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            per.remove(key);
        }
    }
}

/// The share a connection counts against while its peer is attested.
fn attesting_key(peer: &Peer) -> String {
    format!("uid {} (attesting)", peer.uid)
}

/// Who a connection's peer is, for the per-caller limit: its container,
/// only once attestation confirmed it; else the owner of its user
/// namespace (a user with subordinate ids runs as thousands of host uids
/// there: one caller, as for denials); else its (host) uid. Never a cgroup
/// path or any other name the caller picks.
fn caller_key(peer: &Peer, identity: Option<&Identity>) -> String {
    match identity.map(|id| (id.container_id.as_deref(), id.userns_owner)) {
        Some((Some(c), _)) => format!("container {c}"),
        Some((None, Some(owner))) => format!("userns {owner}"),
        _ => format!("uid {}", peer.uid),
    }
}

struct StrangerSlot(Arc<Budget>);

impl Drop for StrangerSlot {
    fn drop(&mut self) {
        self.0.open.lock().expect("budget lock").1 -= 1;
    }
}

/// The stream, if the gate admits its peer.
fn new_peer_stream(inner: UnixStream, gate: &Arc<Gate>) -> io::Result<Option<PeerStream>> {
    let cred = inner.peer_cred()?;
    let pid = cred.pid().unwrap_or(0);
    let mut peer = Peer { uid: cred.uid(), gid: cred.gid(), pid, pidfd: None };
    // Only the kernel's own pin of the connector: no fallback to
    // `pidfd_open(pid)`, which may pin whoever has that pid now.
    match pin_peer(inner.as_raw_fd()) {
        Ok(fd) => peer.pidfd = Some(fd),
        Err(e) => {
            gate.refuse_unpinned(&peer, &e);
            return Ok(None);
        }
    }
    let Some(admitted) = gate.admit(&peer) else { return Ok(None) };
    let conn = PeerConn {
        info: ConnInfo { peer, identity: None, activity: Activity::new() },
        admitted,
        _stranger: None,
        idle_timeout: gate.idle_timeout,
    };
    Ok(Some(Watched::new(inner, conn, PREFACE_TIMEOUT)))
}

impl Watch for PeerConn {
    fn deadline(&self, seen: &Seen, now: Instant) -> Result<Instant, &'static str> {
        let due = |at: Instant, why| if now >= at { Err(why) } else { Ok(at) };
        if seen.read < PREFACE_LEN {
            return due(seen.accepted + PREFACE_TIMEOUT, "no HTTP/2 preface");
        }
        let mut next = now + self.idle_timeout;
        if let Some(since) = seen.write_blocked {
            next = next.min(due(since + self.idle_timeout, "the peer does not read what it asked for")?);
        }
        if let Some(since) = self.info.activity.idle_since() {
            next = next.min(due(since + self.idle_timeout, "idle")?);
        }
        Ok(next)
    }

    fn closing(&self, why: &'static str) {
        tracing::debug!(uid = self.info.peer.uid, pid = self.info.peer.pid, why, "closing a connection");
    }
}

impl Connected for PeerStream {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.watch.info.clone()
    }
}

type Incoming = ReceiverStream<io::Result<PeerStream>>;

/// Accept connections for tonic: admins' on the first stream, strangers'
/// on the second. Accept errors (such as running out of file descriptors)
/// are logged and retried after a pause; they never end the server.
pub fn incoming(
    listener: UnixListener,
    gate: Arc<Gate>,
    attestor: Arc<Attestor>,
    admin: Arc<AdminPolicy>,
    roles: Arc<RoleTable>,
) -> (Incoming, Incoming) {
    let (admins, admins_rx) = mpsc::channel(16);
    let (strangers, strangers_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = async { tokio::join!(admins.closed(), strangers.closed()); } => return,
            };
            let stream = accepted.and_then(|(s, _)| new_peer_stream(s, &gate));
            match stream {
                // Over a limit: closed as it drops.
                Ok(None) => {}
                Ok(Some(s)) => {
                    let route = (
                        gate.clone(),
                        attestor.clone(),
                        admin.clone(),
                        roles.clone(),
                        admins.clone(),
                        strangers.clone(),
                    );
                    tokio::spawn(classify(s, route));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    (ReceiverStream::new(admins_rx), ReceiverStream::new(strangers_rx))
}

type Route = (
    Arc<Gate>,
    Arc<Attestor>,
    Arc<AdminPolicy>,
    Arc<RoleTable>,
    mpsc::Sender<io::Result<PeerStream>>,
    mpsc::Sender<io::Result<PeerStream>>,
);

/// Attest a new connection's peer and hand the connection to the server
/// for its kind.
async fn classify(mut s: PeerStream, (gate, attestor, policy, roles, admins, strangers): Route) {
    let identity = match gate.classifying.clone().acquire_owned().await {
        Ok(permit) => {
            let peer = s.watch.info.peer.clone();
            let attest = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                attestor.attest(&peer).ok().map(|id| crate::policy::admin::decided(id, &policy))
            });
            tokio::time::timeout(CLASSIFY_TIMEOUT, attest).await.ok().and_then(Result::ok).flatten()
        }
        Err(_) => None,
    };
    // A full admin, or a scoped one (some role names it).
    let admin = identity.as_ref().is_some_and(|id| id.admin || roles.any_match(&crate::api::caller_facts(id)));
    if !gate.settle(&mut s.watch.admitted, &s.watch.info.peer, identity.as_ref()) {
        return;
    }
    s.watch.info.identity = identity.map(Arc::new);
    if admin {
        let _ = admins.send(Ok(s)).await;
        return;
    }
    let key = caller_key(&s.watch.info.peer, s.watch.info.identity.as_deref());
    if let Some(slot) = gate.stranger(&s.watch.info.peer, &key) {
        s.watch._stranger = Some(slot);
        let _ = strangers.send(Ok(s)).await;
    }
}

/// The peer's pin from `SO_PEERPIDFD`, or why there is none (then the
/// connection is refused: there is no fallback).
fn pin_peer(sock: std::os::fd::RawFd) -> io::Result<Arc<std::os::fd::OwnedFd>> {
    crate::sys::peer_pidfd(sock).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_mounts: usize) -> Limits {
        let mut l = crate::config::Config::from_raw(Default::default(), Default::default()).unwrap().limits;
        l.max_mounts = max_mounts;
        l
    }

    #[test]
    fn the_budget_keeps_fds_in_reserve_and_strangers_within_memory() {
        // systemd's soft 1024, hard also 1024: half kept, 256 connections.
        let b = Budget::new(1024, &limits(4096));
        assert_eq!((b.reserved_fds, b.max), (512, 256));
        assert_eq!(b.strangers_max, crate::api::strangers::MAX_CONNECTIONS.min(256 - 32));
        // Raised to a hard 20,000: 256 + 2 × 4096 kept.
        let b = Budget::new(20_000, &limits(4096));
        assert_eq!(b.reserved_fds, 256 + 8192);
        assert_eq!(b.max, (20_000 - 8448) / 2);
        assert_eq!(b.strangers_max, crate::api::strangers::MAX_CONNECTIONS);
        // Whatever the limit, connections and the reserve fit in it.
        for soft in [16, 64, 1024, 4096, 65_536] {
            let b = Budget::new(soft, &limits(100));
            assert!(b.max as u64 * FDS_PER_CONNECTION + b.reserved_fds <= soft.max(2 + b.reserved_fds), "{soft}");
            assert!(b.strangers_max <= b.max);
        }
    }

    fn gate(per_caller: usize) -> (Arc<Gate>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.log"), crate::secret::SecretBytes::copy_from(&[9; 32]));
        let mut l = limits(10);
        l.max_connections_per_caller = per_caller;
        (Gate::new("workload.sock", &l, Budget::new(20_000, &l), Arc::new(audit.unwrap())), dir)
    }

    fn peer(uid: u32) -> Peer {
        Peer { uid, gid: uid, pid: 1, pidfd: None }
    }

    fn in_container(uid: u32, c: &str) -> Identity {
        Identity { uid, container_id: Some(c.into()), ..Identity::default() }
    }

    #[test]
    fn a_callers_share_is_its_uid_or_its_attested_container_never_a_name_it_picks() {
        let (g, _dir) = gate(3);
        let host = Identity { uid: 1000, host: true, ..Identity::default() };
        // A host uid keeps 3, however many cgroups its processes are in
        // (nothing of the peer but its uid and attested container counts).
        let mut kept = Vec::new();
        for _ in 0..5 {
            if let Some(mut a) = g.admit(&peer(1000)) {
                if g.settle(&mut a, &peer(1000), Some(&host)) {
                    kept.push(a);
                }
            }
        }
        assert_eq!(kept.len(), 3);
        // Unattested (timed out): the same uid's share.
        let mut a = g.admit(&peer(1000)).expect("the attesting share is apart");
        assert!(!g.settle(&mut a, &peer(1000), None));
        drop(a);
        // Two containers running as root each have a share of their own,
        // apart from host root's.
        for c in ["c1", "c2"] {
            for _ in 0..3 {
                let mut a = g.admit(&peer(0)).unwrap();
                assert!(g.settle(&mut a, &peer(0), Some(&in_container(0, c))));
                kept.push(a);
            }
            let mut a = g.admit(&peer(0)).unwrap();
            assert!(!g.settle(&mut a, &peer(0), Some(&in_container(0, c))), "{c} over its share");
        }
        let mut a = g.admit(&peer(0)).unwrap();
        assert!(g.settle(&mut a, &peer(0), None), "host root has its own share");
        kept.push(a);
        // Being attested holds one of the uid's attesting places at most.
        let attesting: Vec<_> = (0..5).filter_map(|_| g.admit(&peer(7))).collect();
        assert_eq!(attesting.len(), 3);
        drop(attesting);
        drop(kept);
        assert!(g.open.lock().unwrap().1.is_empty(), "every place was given back");
        assert_eq!(g.open.lock().unwrap().0, 0);
    }

    #[test]
    fn a_peer_is_pinned_only_by_so_peerpidfd_with_no_fallback() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = pin_peer(a.as_raw_fd()).expect("SO_PEERPIDFD (Linux 6.5+)");
        assert_eq!(crate::sys::pidfd_pid(&fd).unwrap(), Some(std::process::id() as i32));
        // Where the kernel gives no pidfd (here: not a socket), the answer
        // is an error, never a pidfd from the pid.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(pin_peer(file.as_raw_fd()).is_err());
    }
}
