//! The FUSE workers: one fixed pool of threads serves the `/dev/fuse`
//! connection of every mount, so the broker's thread count does not grow
//! with its mounts.
//!
//! Each worker has an epoll instance of its own, its own request and
//! reply buffers; every connection is watched by the epolls of two
//! workers ([`WATCHERS`]; level-triggered: a request left in the kernel's
//! queue keeps its fd ready), and every epoll watches an eventfd that
//! wakes the workers to pause or stop. A worker takes one ready
//! connection per wakeup, reads one request and answers it. A connection
//! is watched with `EPOLLEXCLUSIVE`: a request wakes one of its watchers
//! that is waiting (the other only if the first is busy), as a blocking
//! read by two threads would, instead of both, the loser's read saying
//! `EAGAIN`. `ENOENT` is a request the caller interrupted; `ENODEV` a
//! connection the kernel ended (it leaves the pool).
//!
//! # Parking
//!
//! A worker never waits. A request that must wait for something before it
//! can be answered — an open by a caller whose container the attestor is
//! still asking Docker about ([`crate::identity::Attestor::pending`]), or
//! a request on a volume mount whose owner is not learned yet — is copied
//! out and *parked*: a tokio task waits (at most [`PARK_FOR`]), then
//! answers it on a blocking thread. Parked requests are bounded in all
//! ([`PARK_MAX`]), per uid and per task; past a bound a request is
//! answered at once. The caller stays blocked in its syscall meanwhile, so
//! its `/proc/<tid>` stays its own.
//!
//! # Lifecycle
//!
//! The pool holds the mounts' [`Lifecycle`] and moves it:
//! [`Pool::pause`] (serving → quiescing, a handover) stops the workers
//! taking requests — new ones stay queued in the kernel for the successor
//! — and waits for the parked ones to be answered; [`Pool::resume`]
//! (quiescing → serving) serves again if the handover did not happen;
//! [`Pool::handed_over`] (quiescing → handed over) keeps the workers idle
//! for good; [`Pool::stop`] (→ stopping) ends them.
//!
//! # Secrets in buffers
//!
//! A worker's reply buffer is zeroed after each READ reply (up to what the
//! request could have filled); a parked request's buffers are zeroed
//! before they are freed.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use rustix::event::epoll;
use rustix::io::Errno;
use zeroize::Zeroizing;

use super::lifecycle::{Lifecycle, LifecycleError, State};
use super::workload::{FsShared, ROOT, WorkloadFs};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot set up the FUSE workers' epoll: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot start a FUSE worker or owner thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot watch a FUSE connection: {0}")]
    Watch(#[source] std::io::Error),
}

/// How long a parked request waits at most before it is answered anyway.
pub const PARK_FOR: Duration = Duration::from_secs(2);
/// Most parked requests at once, in all.
pub const PARK_MAX: usize = 1024;
/// Most parked requests at once for one uid (a stranger cannot take all).
const PARK_PER_UID: usize = 256;
/// Most parked requests at once for one task: one, as a task waits in one
/// syscall at a time, plus a few whose caller died while they waited.
const PARK_PER_TID: usize = 4;
/// Only small requests are parked (lookups, getattr, open, access).
const PARK_MAX_BYTES: usize = 4096;
/// The reply buffer of a parked request (an entry is the largest reply).
const PARKED_REPLY: usize = 4096;
/// Threads that learn volume owners (read a container's passwd). Their
/// own, not tokio's blocking pool: a read that never returns (a passwd on
/// a FUSE mount that never answers) ties up one of them, never shutdown.
const LEARNERS: usize = 2;
/// Owner lookups queued for them at most; past that a request waits
/// without one.
const LEARN_QUEUE: usize = 64;
/// How long pause and stop wait for the workers to finish their request.
const WORKER_WAIT: Duration = Duration::from_secs(5);

/// A worker's request buffer: the largest request the kernel may send for
/// any negotiated `max_write` (1 MiB of data and a page of header), as
/// fuse-backend-rs sizes its own.
const REQUEST_BUF: usize = (1 << 20) + 4096;
/// A worker's reply buffer: the largest read (`max_read`) and its header.
const REPLY_BUF: usize = super::MAX_READ + 4096;

/// FUSE opcodes the pool looks at (`fuse_opcode` in `linux/fuse.h`).
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const ACCESS: u32 = 34;
/// `sizeof(struct fuse_in_header)`, and where `fuse_read_in.size` sits.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const READ_SIZE_AT: usize = IN_HEADER + 16;

/// How many workers' epolls watch each connection: two serve a mount's
/// requests in parallel, and a slow request holds up at most one of them.
const WATCHERS: usize = 2;

/// The epoll token of the wake eventfd; connections count from 1.
const WAKE: u64 = 0;
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// One mount's kernel connection, as the pool serves it.
pub struct Conn {
    dev: File,
    pub server: Server<Arc<WorkloadFs>>,
    pub fs: Arc<WorkloadFs>,
    token: u64,
}

impl Conn {
    /// `dev` must be nonblocking (the workers never block in a read).
    pub fn new(dev: File, fs: Arc<WorkloadFs>) -> Arc<Conn> {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        Arc::new(Conn { dev, server: Server::new(fs.clone()), fs, token })
    }

    /// The `/dev/fuse` descriptor (for notices, and for a successor).
    pub fn dev(&self) -> &File {
        &self.dev
    }

    /// Answer one request, writing the reply through `reply`. Returns how
    /// much of `reply` may hold reply bytes.
    fn answer(&self, req: &mut [u8], reply: &mut [u8]) -> usize {
        let cap = reply.len();
        let reader = match Reader::from_fuse_buffer(FuseBuf::new(req)) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable FUSE request");
                return 0;
            }
        };
        let writer = match FuseDevWriter::<()>::new(self.dev.as_raw_fd(), reply) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "no FUSE reply writer");
                return 0;
            }
        };
        match self.server.handle_message(reader, writer.into(), None, None) {
            Ok(n) => n.min(cap),
            Err(e) => {
                tracing::debug!(error = %e, "FUSE request failed");
                cap
            }
        }
    }

    /// Tell the kernel every file's attributes are stale (the owner was
    /// just learned). Attributes only: no page or directory lock is taken,
    /// so this cannot wait on a request that is itself parked.
    fn invalidate_attrs(&self) {
        let mut buf = Zeroizing::new(vec![0u8; 256]);
        for ino in self.fs.view().by_ino.keys() {
            if let Ok(w) = FuseDevWriter::<()>::new(self.dev.as_raw_fd(), &mut buf) {
                // An offset of -1: attributes, not the page cache.
                let _ = self.server.notify_inval_inode(w, *ino, u64::MAX, 0);
            }
        }
    }

    /// Ask the kernel to queue again every request this connection's
    /// previous server read and never answered (Linux 6.9+; older
    /// kernels refuse, which changes nothing).
    pub fn resend(&self) {
        let mut buf = [0u8; 64];
        if let Ok(w) = FuseDevWriter::<()>::new(self.dev.as_raw_fd(), &mut buf) {
            let _ = self.server.notify_resend(w);
        }
    }
}

/// What the pool reads of a request's `fuse_in_header` (host byte order).
#[derive(Clone, Copy, Debug)]
struct Head {
    opcode: u32,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: i32,
}

impl Head {
    fn peek(req: &[u8]) -> Option<Head> {
        let u32_at = |at: usize| req.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
        let u64_at = |at: usize| req.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes);
        Some(Head {
            opcode: u32_at(4)?,
            nodeid: u64_at(16)?,
            uid: u32_at(24)?,
            gid: u32_at(28)?,
            pid: u32_at(32)? as i32,
        })
    }
}

/// How much of a reply buffer a READ may have filled: its header and the
/// size asked for (or what the server said it wrote, if more), within the
/// buffer; all of it if the request does not say.
fn read_reply_end(req: &[u8], used: usize, cap: usize) -> usize {
    let asked = req.get(READ_SIZE_AT..READ_SIZE_AT + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
    asked.map_or(cap, |n| OUT_HEADER.saturating_add(n as usize)).max(used).min(cap)
}

/// The workers at the gate; the state they follow is the pool's
/// [`Lifecycle`], moved only under this gate's lock.
#[derive(Default)]
struct Gate {
    /// Workers waiting while no request is taken, and workers that have
    /// ended.
    idle: usize,
    exited: usize,
}

/// Parked requests in all, per uid and per task.
#[derive(Default)]
struct Counts {
    total: usize,
    by_uid: HashMap<u32, usize>,
    by_tid: HashMap<i32, usize>,
}

/// A parked request's place; given back when dropped (after its answer).
struct Slot {
    pool: Arc<Pool>,
    uid: u32,
    tid: i32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.pool.parked.lock().expect("parked lock");
        c.total -= 1;
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
        if let Some(n) = c.by_tid.get_mut(&self.tid) {
            *n -= 1;
            if *n == 0 {
                c.by_tid.remove(&self.tid);
            }
        }
        self.pool.unparked.notify_all();
    }
}

/// A volume mount's owner to learn from a parked request's caller; the
/// sender says when it is done.
type LearnJob = (Arc<Conn>, Head, tokio::sync::oneshot::Sender<()>);

/// Why a request waits: its caller's pending attestation, and/or its
/// mount's owner.
struct Wait {
    pending: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>>,
    owner: bool,
    /// An open of a leased file (`dynamic:`/`cert:`) whose caller has no
    /// lease yet: answered once it is issued (or failed, or timed out).
    lease: bool,
}

pub struct Pool {
    /// One per worker.
    epolls: Vec<OwnedFd>,
    wake: OwnedFd,
    conns: RwLock<HashMap<u64, Arc<Conn>>>,
    /// Where the mounts are in their life (checked before each request).
    lifecycle: Lifecycle,
    gate: Mutex<Gate>,
    gate_changed: Condvar,
    workers: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
    parked: Mutex<Counts>,
    unparked: Condvar,
    shared: Arc<FsShared>,
    /// Set at shutdown: parked requests stop waiting and are answered.
    hurry: tokio::sync::watch::Sender<bool>,
    learn: std::sync::mpsc::SyncSender<LearnJob>,
    answerers: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("size", &self.size).finish_non_exhaustive()
    }
}

/// Workers for this machine: one per core, at least 2, at most 64.
pub fn default_size() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 64)
}

impl Pool {
    /// Start `size` workers, serving nothing yet.
    pub fn start(shared: Arc<FsShared>, size: usize) -> Result<Arc<Pool>, PoolError> {
        let io = |e: Errno| std::io::Error::from(e);
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        let wake = rustix::event::eventfd(0, flags).map_err(|e| PoolError::Epoll(io(e)))?;
        let mut epolls = Vec::with_capacity(size);
        for _ in 0..size {
            let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| PoolError::Epoll(io(e)))?;
            epoll::add(&epoll, &wake, epoll::EventData::new_u64(WAKE), epoll::EventFlags::IN)
                .map_err(|e| PoolError::Epoll(io(e)))?;
            epolls.push(epoll);
        }
        let (learn, jobs) = std::sync::mpsc::sync_channel::<LearnJob>(LEARN_QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..LEARNERS {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("fuse-owner-{i}"))
                .spawn(move || Self::learn(&jobs))
                .map_err(PoolError::Thread)?;
        }
        let pool = Arc::new(Pool {
            epolls,
            wake,
            conns: RwLock::default(),
            lifecycle: Lifecycle::default(),
            gate: Mutex::default(),
            gate_changed: Condvar::new(),
            workers: Mutex::default(),
            size,
            parked: Mutex::default(),
            unparked: Condvar::new(),
            shared,
            hurry: tokio::sync::watch::Sender::new(false),
            learn,
            answerers: Arc::new(tokio::sync::Semaphore::new(2 * size)),
        });
        let mut workers = pool.workers.lock().expect("workers lock");
        for i in 0..size {
            let p = pool.clone();
            let t = std::thread::Builder::new().name(format!("fuse-{i}")).spawn(move || p.work(i));
            match t {
                Ok(t) => workers.push(t),
                Err(e) => {
                    drop(workers);
                    let _ = pool.stop();
                    return Err(PoolError::Thread(e));
                }
            }
        }
        drop(workers);
        Ok(pool)
    }

    /// The epolls that watch `conn`: [`WATCHERS`] neighbours, spread by
    /// its token.
    fn watchers(&self, conn: &Conn) -> impl Iterator<Item = &OwnedFd> {
        let first = (conn.token % self.size as u64) as usize;
        (0..WATCHERS.min(self.size)).map(move |k| &self.epolls[(first + k) % self.size])
    }

    /// Serve `conn` from now on.
    pub fn add(&self, conn: &Arc<Conn>) -> Result<(), PoolError> {
        self.conns.write().expect("conns lock").insert(conn.token, conn.clone());
        let event = epoll::EventData::new_u64(conn.token);
        for ep in self.watchers(conn) {
            if let Err(e) = epoll::add(ep, &conn.dev, event, epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE) {
                self.remove(conn);
                return Err(PoolError::Watch(e.into()));
            }
        }
        Ok(())
    }

    /// Stop serving `conn` (a request a worker already took is answered).
    pub fn remove(&self, conn: &Conn) {
        for ep in self.watchers(conn) {
            let _ = epoll::delete(ep, &conn.dev);
        }
        self.conns.write().expect("conns lock").remove(&conn.token);
    }

    /// Requests parked now.
    pub fn parked(&self) -> usize {
        self.parked.lock().expect("parked lock").total
    }

    /// Where the mounts are in their life.
    pub fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// Follow the lifecycle.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Serving → quiescing: stop taking requests (they stay queued in the
    /// kernel), wait for the request each worker holds, then up to `drain`
    /// for the parked ones to be answered. Returns whether nothing is left
    /// unanswered.
    pub fn pause(&self, drain: Duration) -> Result<bool, LifecycleError> {
        self.lifecycle.go(State::Quiescing)?;
        self.kick();
        let g = self.gate.lock().expect("gate lock");
        let (_g, waited) =
            self.gate_changed.wait_timeout_while(g, WORKER_WAIT, |g| g.idle + g.exited < self.size).expect("gate lock");
        let workers_done = !waited.timed_out();
        if !workers_done {
            tracing::error!("a FUSE worker did not finish its request in time");
        }
        Ok(workers_done && self.drain(drain))
    }

    /// Quiescing → serving, after a handover that did not happen.
    pub fn resume(&self) -> Result<(), LifecycleError> {
        let g = self.gate.lock().expect("gate lock");
        self.lifecycle.go(State::Serving)?;
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut count);
        drop(g);
        self.gate_changed.notify_all();
        Ok(())
    }

    /// Quiescing → handed over: a successor serves the connections; the
    /// workers stay idle until the process exits.
    pub fn handed_over(&self) -> Result<(), LifecycleError> {
        let _g = self.gate.lock().expect("gate lock");
        self.lifecycle.go(State::HandedOver).map(|_| ())
    }

    /// Serving or quiescing → stopping: end the workers (for good), then
    /// have the parked requests answered at once (waiting at most
    /// [`PARK_FOR`] for them).
    pub fn stop(&self) -> Result<(), LifecycleError> {
        {
            let _g = self.gate.lock().expect("gate lock");
            self.lifecycle.go(State::Stopping)?;
            self.gate_changed.notify_all();
        }
        self.kick();
        let g = self.gate.lock().expect("gate lock");
        let (g, _) = self.gate_changed.wait_timeout_while(g, WORKER_WAIT, |g| g.exited < self.size).expect("gate lock");
        let all = g.exited == self.size;
        drop(g);
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        if all {
            for w in workers {
                let _ = w.join();
            }
        } else {
            tracing::error!("a FUSE worker did not end in time; leaving it");
        }
        self.hurry.send_replace(true);
        self.drain(PARK_FOR);
        Ok(())
    }

    /// Wait up to `bound` for no request to be parked.
    fn drain(&self, bound: Duration) -> bool {
        let c = self.parked.lock().expect("parked lock");
        let (c, waited) = self.unparked.wait_timeout_while(c, bound, |c| c.total > 0).expect("parked lock");
        if waited.timed_out() {
            tracing::warn!(parked = c.total, "parked FUSE requests still unanswered");
        }
        c.total == 0
    }

    /// Wake every worker (the eventfd stays readable until `resume`).
    fn kick(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// A worker, after a wakeup with the gate closed: wait while no
    /// request is taken. Returns true when the worker must end.
    fn at_gate(&self) -> bool {
        let mut g = self.gate.lock().expect("gate lock");
        loop {
            let state = self.lifecycle.state();
            if state.ends_workers() {
                g.exited += 1;
                self.gate_changed.notify_all();
                return true;
            }
            if state.takes_requests() {
                return false;
            }
            g.idle += 1;
            self.gate_changed.notify_all();
            g = self
                .gate_changed
                .wait_while(g, |_| {
                    let s = self.lifecycle.state();
                    !s.takes_requests() && !s.ends_workers()
                })
                .expect("gate lock");
            g.idle -= 1;
        }
    }

    fn work(self: Arc<Self>, me: usize) {
        let mut req = vec![0u8; REQUEST_BUF];
        let mut reply = vec![0u8; REPLY_BUF];
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 1];
        loop {
            let token = match epoll::wait(&self.epolls[me], &mut events, None) {
                Ok((ready, _)) => match ready.first() {
                    Some(e) => e.data.u64(),
                    None => continue,
                },
                Err(Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "FUSE workers' epoll failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if token == WAKE || !self.lifecycle.state().takes_requests() {
                if self.at_gate() {
                    return;
                }
                continue;
            }
            let Some(conn) = self.conns.read().expect("conns lock").get(&token).cloned() else { continue };
            match rustix::io::read(&conn.dev, &mut req[..]) {
                Ok(len) => self.serve(&conn, &mut req[..len], &mut reply),
                // Another worker took it; or the caller gave up.
                Err(Errno::AGAIN | Errno::NOENT | Errno::INTR) => {}
                Err(e) => {
                    if e == Errno::NODEV {
                        tracing::info!(workload = %conn.fs.workload.name, "the kernel ended a FUSE connection");
                    } else {
                        tracing::error!(workload = %conn.fs.workload.name, error = %e, "cannot read a FUSE request");
                    }
                    self.remove(&conn);
                }
            }
        }
    }

    /// Answer one request now, or park it.
    fn serve(self: &Arc<Self>, conn: &Arc<Conn>, req: &mut [u8], reply: &mut [u8]) {
        let head = Head::peek(req);
        if let Some(h) = head {
            if let Some(wait) = self.must_wait(conn, &h) {
                if self.park(conn, h, req, wait) {
                    return;
                }
            }
        }
        let used = conn.answer(req, reply);
        if head.is_some_and(|h| h.opcode == READ) {
            // The reply carried file content: clear what it may have used.
            let end = read_reply_end(req, used, reply.len());
            reply[..end].fill(0);
            std::hint::black_box(&reply[..end]);
        }
    }

    /// Whether a request must wait before it is answered, and for what.
    /// The warm path asks two cheap questions of an OPEN and one of the
    /// rest.
    fn must_wait(&self, conn: &Conn, h: &Head) -> Option<Wait> {
        let owner = conn.fs.owner_unknown()
            && match h.opcode {
                LOOKUP | OPEN => true,
                GETATTR | ACCESS => h.nodeid != ROOT,
                _ => false,
            };
        let pending = if h.opcode == OPEN { self.shared.attestor.pending(h.pid) } else { None };
        // A leased file's first open by a container waits for its lease.
        // (Attesting here is what the open does next anyway.)
        let lease = h.opcode == OPEN
            && conn.fs.is_leased(h.nodeid)
            && (pending.is_some() || conn.fs.lease_wait(h.nodeid, h.pid, h.uid, h.gid).is_some());
        (owner || lease || pending.is_some()).then_some(Wait { pending, owner, lease })
    }

    /// Take a place for a parked request of `uid`/`tid`, if within bounds.
    fn reserve(self: &Arc<Self>, uid: u32, tid: i32) -> Option<Slot> {
        let mut c = self.parked.lock().expect("parked lock");
        let by_uid = c.by_uid.get(&uid).copied().unwrap_or(0);
        let by_tid = c.by_tid.get(&tid).copied().unwrap_or(0);
        if c.total >= PARK_MAX || by_uid >= PARK_PER_UID || by_tid >= PARK_PER_TID {
            return None;
        }
        c.total += 1;
        *c.by_uid.entry(uid).or_default() += 1;
        *c.by_tid.entry(tid).or_default() += 1;
        Some(Slot { pool: self.clone(), uid, tid })
    }

    /// Park a copy of `req`: a task waits for `wait` (bounded), then
    /// answers it on a blocking thread. False if it cannot be parked (the
    /// caller answers it at once).
    fn park(self: &Arc<Self>, conn: &Arc<Conn>, h: Head, req: &[u8], wait: Wait) -> bool {
        if req.len() > PARK_MAX_BYTES || h.pid <= 0 {
            return false;
        }
        let Some(slot) = self.reserve(h.uid, h.pid) else {
            tracing::debug!(tid = h.pid, uid = h.uid, "too many parked FUSE requests; answered at once");
            return false;
        };
        tracing::debug!(opcode = h.opcode, tid = h.pid, workload = %conn.fs.workload.name, "parked a FUSE request");
        let saved = Zeroizing::new(req.to_vec());
        let (pool, conn) = (self.clone(), conn.clone());
        self.shared.rt.spawn(async move {
            let mut hurry = pool.hurry.subscribe();
            tokio::select! {
                _ = tokio::time::timeout(PARK_FOR, pool.clone().settle(conn.clone(), h, wait)) => {}
                _ = hurry.wait_for(|h| *h) => {}
            }
            let Ok(permit) = pool.answerers.clone().acquire_owned().await else { return };
            let _ = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut saved = saved;
                let mut reply = Zeroizing::new(vec![0u8; PARKED_REPLY]);
                conn.answer(&mut saved, &mut reply);
                // Answered: its place is free again.
                drop(slot);
            })
            .await;
        });
        true
    }

    /// What a parked request waits for: its caller's attestation, then
    /// (on a volume mount whose owner is not known) learning the owner
    /// from this caller, if it is the mount's container.
    async fn settle(self: Arc<Self>, conn: Arc<Conn>, h: Head, wait: Wait) {
        let pending = wait.pending.or_else(|| if wait.owner { self.shared.attestor.pending(h.pid) } else { None });
        if let Some(p) = pending {
            p.await;
        }
        if wait.lease {
            // Issued on the runtime, not here: a waiter that times out
            // leaves the issue to finish for the next open.
            if let Some(issued) = conn.fs.lease_wait(h.nodeid, h.pid, h.uid, h.gid) {
                issued.await;
            }
        }
        if !wait.owner || !conn.fs.owner_unknown() {
            return;
        }
        let (done, learned) = tokio::sync::oneshot::channel();
        if self.learn.try_send((conn, h, done)).is_ok() {
            let _ = learned.await;
        }
    }

    /// An owner thread: learn owners until the pool goes.
    fn learn(jobs: &Mutex<std::sync::mpsc::Receiver<LearnJob>>) {
        loop {
            let job = jobs.lock().expect("jobs lock").recv();
            let Ok((conn, h, done)) = job else { return };
            if conn.fs.learn_owner(h.pid, h.uid, h.gid) {
                conn.invalidate_attrs();
            }
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_read_in_host_order() {
        let mut req = vec![0u8; IN_HEADER + 8];
        req[0..4].copy_from_slice(&48u32.to_ne_bytes());
        req[4..8].copy_from_slice(&OPEN.to_ne_bytes());
        req[16..24].copy_from_slice(&7u64.to_ne_bytes());
        req[24..28].copy_from_slice(&1000u32.to_ne_bytes());
        req[28..32].copy_from_slice(&50u32.to_ne_bytes());
        req[32..36].copy_from_slice(&4242u32.to_ne_bytes());
        let h = Head::peek(&req).unwrap();
        assert_eq!((h.opcode, h.nodeid, h.uid, h.gid, h.pid), (OPEN, 7, 1000, 50, 4242));
        assert!(Head::peek(&req[..30]).is_none());
    }

    #[test]
    fn a_read_reply_is_cleared_as_far_as_it_could_reach() {
        let mut req = vec![0u8; READ_SIZE_AT + 4];
        req[READ_SIZE_AT..].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(read_reply_end(&req, 16 + 20, REPLY_BUF), 16 + 4096);
        assert_eq!(read_reply_end(&req, REPLY_BUF, REPLY_BUF), REPLY_BUF);
        req[READ_SIZE_AT..].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(read_reply_end(&req, 0, REPLY_BUF), REPLY_BUF);
        assert_eq!(read_reply_end(&req[..READ_SIZE_AT], 0, REPLY_BUF), REPLY_BUF);
    }
}
