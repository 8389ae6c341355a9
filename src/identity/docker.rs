//! Container id → what the runtime says of it (name, image, labels, user) and
//! the ground truth a caller is checked against: the container's init
//! process (`State.Pid`), pinned by a pidfd taken at inspect time, and
//! its pid and mount namespaces ([`Confirmed`]).
//!
//! Nothing here blocks a caller on Docker: [`DockerCache::cached`] answers
//! from memory (a confirmed container, a recent "no such running
//! container", or a miss), and [`DockerCache::pending`] starts the one
//! inspect for an id (deduplicated, their total bounded) and hands back a
//! future to wait on, bounded by [`WAIT_FOR`].
//!
//! Several runtimes may be configured (`[[runtime]]`: Docker, Podman —
//! both speak Docker's Engine API): an id is asked of each in turn, on
//! its configured socket only (never one derived from a caller), and the
//! one that knows it running confirms it; the same ground truth (the
//! caller's pid and mount namespaces equal those of `State.Pid`) holds
//! whichever answers. Each runtime's events keep the cache honest.
//!
//! Kept honest by the events stream: `destroy`, `die`, `stop`, `rename`,
//! `update` and `remove` evict a container (renamed and updated ones are
//! asked about again at once), a container whose pinned init exited is
//! evicted on sight, and `create`/`start`/`restart` clear an id's negative
//! entry. A lost stream clears the cache, reconnects asking dockerd to
//! replay the events since, and lists the running containers again.
//!
//! A container's labels, as the policy sees them, are those its starter
//! set: Docker merges the image's `LABEL`s into `Config.Labels`, so the
//! image is inspected too (cached per image id, which names its content)
//! and every label whose key and value both equal the image's is dropped
//! ([`own_labels`]). An image author cannot make a container match a
//! `docker:label:` selector; an operator who sets the very pair the image
//! carries cannot be told apart from it, so that pair does not count
//! either. An image Docker no longer has leaves the container no labels.
//! Before serving, [`DockerCache::prime`] lists the running containers so
//! the common case never misses; [`DockerCache::export`] and
//! [`DockerCache::import`] carry the cache across a takeover (the
//! successor pins and checks every init again).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use tokio_stream::StreamExt;

use crate::policy::{ContainerInfo, Runtime};

/// How long one Docker call may take.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a caller may wait for the inspect of its container.
pub const WAIT_FOR: Duration = Duration::from_secs(2);
/// How long "Docker has no such container" is believed.
const UNKNOWN_TTL: Duration = Duration::from_secs(5);
/// How long "it stopped" (or "its init could not be checked") is
/// believed: short, and a `start` event clears it. A container still
/// being created, or an inspect that timed out, is not remembered at all.
const NOT_RUNNING_TTL: Duration = Duration::from_millis(500);
/// How long "Docker cannot be reached" is believed.
const UNREACHABLE_TTL: Duration = Duration::from_secs(1);
/// How soon a waiter asks again when Docker's answer settled nothing.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Most ids remembered as not confirmable at once.
const ABSENT_MAX: usize = 4096;
/// Most inspects in flight at once (distinct ids).
const INFLIGHT_MAX: usize = 32;
/// Inspects run at once while priming.
const PRIME_CONCURRENCY: usize = 8;
/// The whole priming, at most.
const PRIME_TIMEOUT: Duration = Duration::from_secs(15);
/// Most containers taken from a predecessor.
const IMPORT_MAX: usize = 65536;
/// Most images whose labels are remembered (an image id names its
/// content, so an entry never goes stale; a full cache starts over).
const IMAGES_MAX: usize = 1024;

/// A running container, confirmed: what Docker says of it, and its init
/// process pinned, with the namespaces every caller of it must share.
pub struct Confirmed {
    pub info: Arc<ContainerInfo>,
    /// Which configured runtime confirmed it (an index into the cache's).
    client: usize,
    /// `State.Pid`, in the broker's pid namespace.
    pub pid: i32,
    pidfd: OwnedFd,
    /// `readlink /proc/<pid>/ns/pid` and `ns/mnt`, e.g. "pid:[4026531836]".
    pub pid_ns: String,
    pub mnt_ns: String,
}

impl std::fmt::Debug for Confirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmed").field("name", &self.info.name).field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Confirmed {
    /// Whether the pinned init has exited (then the container is stale).
    pub fn exited(&self) -> bool {
        crate::sys::pidfd_exited(&self.pidfd)
    }
}

/// What the cache says of an id, without asking anyone.
#[derive(Debug)]
pub enum Cached {
    /// Running, init pinned and alive.
    Known(Arc<Confirmed>),
    /// Recently found not to be a running container Docker knows (or
    /// Docker did not answer): no container facts.
    Absent,
    /// Never asked, or the answer expired: ask (see [`DockerCache::pending`]).
    Miss,
}

/// One container as handed to a successor (see [`DockerCache::export`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub id: String,
    pub pid: i32,
    pub pid_ns: String,
    pub mnt_ns: String,
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub user: String,
    /// Whether `labels` are the container's own, the image's taken out
    /// (an older predecessor's are not: such a container is asked about
    /// again rather than taken).
    #[serde(default)]
    pub own_labels: bool,
    /// The socket of the runtime that confirmed it (none from a
    /// predecessor that knew only Docker: the first Docker runtime).
    #[serde(default)]
    pub runtime_socket: Option<PathBuf>,
}

#[derive(Default)]
struct Inner {
    known: HashMap<String, Arc<Confirmed>>,
    /// id → until when it is believed absent.
    absent: HashMap<String, Instant>,
    /// id → dropped (waking every waiter) when its inspect ends.
    inflight: HashMap<String, tokio::sync::watch::Sender<()>>,
    /// image id → the labels its config carries.
    images: HashMap<String, Arc<BTreeMap<String, String>>>,
}

/// A future a caller may wait on (see [`DockerCache::pending`]).
pub type Wait = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One configured runtime: its kind, its socket (only ever the
/// configured one) and a lazy client on it.
struct Client {
    kind: Runtime,
    socket: PathBuf,
    api: Docker,
}

pub struct DockerCache {
    clients: Vec<Client>,
    inner: Mutex<Inner>,
    rt: tokio::runtime::Handle,
    proc_root: PathBuf,
    /// Bumped by every `create`/`start`/`restart` event: an inspect that
    /// began before one does not store a negative answer.
    starts: AtomicU64,
    /// Inspects sent (for the log and tests).
    inspects: AtomicU64,
    warn: super::Throttle,
    /// Containers that died or were removed (by their events), for the
    /// leases of `crate::lease`.
    gone: tokio::sync::broadcast::Sender<String>,
}

impl std::fmt::Debug for DockerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerCache").finish_non_exhaustive()
    }
}

pub(crate) fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// Why an init process could not be pinned and checked.
#[derive(Debug, thiserror::Error)]
enum PinError {
    #[error("cannot pin pid {0}: {1}")]
    Pidfd(i32, std::io::Error),
    #[error("cannot read /proc/{0}: {1}")]
    Proc(i32, std::io::Error),
    #[error("its init (pid {0}) is not in the container's cgroup")]
    Cgroup(i32),
    #[error("its init (pid {0}) exited while being checked")]
    Gone(i32),
    #[error("its init (pid {0}) is in other namespaces than recorded")]
    Namespaces(i32),
}

/// Why an image's labels are not known.
#[derive(Debug, thiserror::Error)]
enum ImageError {
    /// Docker no longer has it (a running container's image was removed):
    /// the container's labels cannot be told from the image's, ever.
    #[error("Docker has no such image")]
    Gone,
    #[error("docker image inspect failed: {0}")]
    Failed(bollard::errors::Error),
    #[error("docker image inspect timed out")]
    TimedOut,
}

/// The labels of a container its starter set: `labels` (Docker's merge of
/// the image's and the starter's) less every pair equal to one of
/// `image`'s. A pair the starter set to the image's very value is dropped
/// too: Docker keeps no trace of who set it.
pub fn own_labels(labels: BTreeMap<String, String>, image: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().filter(|(k, v)| image.get(k) != Some(v)).collect()
}

impl DockerCache {
    /// Connect lazily to the Engine API on `socket`; nothing is sent yet.
    pub fn connect(socket: &Path, rt: tokio::runtime::Handle) -> Result<Arc<Self>, bollard::errors::Error> {
        Self::connect_all(&[(Runtime::Docker, socket.to_owned())], rt)
    }

    /// Connect lazily to each runtime's API on its socket, asked in this
    /// order; nothing is sent yet.
    pub fn connect_all(
        runtimes: &[(Runtime, PathBuf)],
        rt: tokio::runtime::Handle,
    ) -> Result<Arc<Self>, bollard::errors::Error> {
        let mut clients = Vec::with_capacity(runtimes.len());
        for (kind, socket) in runtimes {
            let api = Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)?;
            clients.push(Client { kind: *kind, socket: socket.clone(), api });
        }
        Ok(Arc::new(DockerCache {
            clients,
            inner: Mutex::default(),
            rt,
            proc_root: PathBuf::from("/proc"),
            starts: AtomicU64::new(0),
            inspects: AtomicU64::new(0),
            warn: super::Throttle::default(),
            gone: tokio::sync::broadcast::Sender::new(1024),
        }))
    }

    /// A cache reading `proc_root` instead of `/proc`, on a Docker socket
    /// that does not answer (tests).
    #[cfg(test)]
    pub(crate) fn for_tests(proc_root: &Path, rt: tokio::runtime::Handle) -> Arc<Self> {
        let socket = proc_root.join("docker.sock"); // not a socket: calls fail at once
        std::fs::write(&socket, b"").expect("a dead socket");
        let api = Docker::connect_with_unix(&socket.to_string_lossy(), 1, bollard::API_DEFAULT_VERSION)
            .expect("a lazy client");
        Arc::new(DockerCache {
            clients: vec![Client { kind: Runtime::Docker, socket, api }],
            inner: Mutex::default(),
            rt,
            proc_root: proc_root.to_owned(),
            starts: AtomicU64::new(0),
            inspects: AtomicU64::new(0),
            warn: super::Throttle::default(),
            gone: tokio::sync::broadcast::Sender::new(1024),
        })
    }

    /// The runtime Docker calls run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Inspects sent so far.
    pub fn inspects(&self) -> u64 {
        self.inspects.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached_locked(inner: &mut Inner, id: &str) -> Cached {
        if let Some(c) = inner.known.get(id) {
            if !c.exited() {
                return Cached::Known(c.clone());
            }
            inner.known.remove(id);
        }
        if let Some(until) = inner.absent.get(id) {
            if *until > Instant::now() {
                return Cached::Absent;
            }
            inner.absent.remove(id);
        }
        Cached::Miss
    }

    /// What is known of `id` now. Never blocks; evicts a container whose
    /// pinned init has exited.
    pub fn cached(&self, id: &str) -> Cached {
        Self::cached_locked(&mut self.lock(), id)
    }

    /// `None` when [`Self::cached`] has an answer for `id`; otherwise a
    /// future that ends once it has one, or after [`WAIT_FOR`] in all: it
    /// joins the inspect of `id` in flight or starts one, and asks again
    /// (a little later) while Docker's answer settles nothing (a container
    /// still being created, an inspect that timed out). Also `None` when
    /// too many inspects are in flight (the caller is then refused).
    /// Cheap and non-blocking: the inspects run on the runtime.
    pub fn pending(self: &Arc<Self>, id: &str) -> Option<Wait> {
        let mut rx = self.ask(id)?;
        let (me, id) = (self.clone(), id.to_owned());
        Some(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + WAIT_FOR;
            loop {
                // Nothing is ever sent: this ends when the sender is dropped.
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    return;
                }
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + RETRY_AFTER)).await;
                match me.ask(&id) {
                    Some(next) if tokio::time::Instant::now() < deadline => rx = next,
                    _ => return,
                }
            }
        }))
    }

    /// Join the inspect of `id` in flight, or start one; `None` when the
    /// cache has an answer, or too many inspects are in flight.
    fn ask(self: &Arc<Self>, id: &str) -> Option<tokio::sync::watch::Receiver<()>> {
        let mut inner = self.lock();
        if !matches!(Self::cached_locked(&mut inner, id), Cached::Miss) {
            return None;
        }
        if let Some(tx) = inner.inflight.get(id) {
            return Some(tx.subscribe());
        }
        if inner.inflight.len() >= INFLIGHT_MAX {
            if let Some(held) = self.warn.allow() {
                tracing::warn!(held_back = held, "too many Docker inspects in flight; a caller is refused");
            }
            return None;
        }
        let (tx, rx) = tokio::sync::watch::channel(());
        inner.inflight.insert(id.to_owned(), tx);
        let me = self.clone();
        let id = id.to_owned();
        self.rt.spawn(async move {
            let _done = Inflight { cache: me.clone(), id: id.clone() };
            me.resolve(&id).await;
        });
        Some(rx)
    }

    /// Start asking about `id` unless known or under way; nobody waits.
    pub fn ask_now(self: &Arc<Self>, id: &str) {
        drop(self.ask(id));
    }

    fn absent(&self, id: &str, ttl: Duration, starts_before: u64) {
        if self.starts.load(Ordering::SeqCst) != starts_before {
            return; // it was (re)started meanwhile: the answer is stale
        }
        let mut inner = self.lock();
        if inner.absent.len() >= ABSENT_MAX {
            let now = Instant::now();
            inner.absent.retain(|_, until| *until > now);
            if inner.absent.len() >= ABSENT_MAX {
                let oldest = inner.absent.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    inner.absent.remove(&k);
                }
            }
        }
        inner.absent.insert(id.to_owned(), Instant::now() + ttl);
    }

    /// Inspect `id`, asking each runtime in turn until one knows it;
    /// remember it confirmed, or absent for a while.
    async fn resolve(&self, id: &str) {
        let starts = self.starts.load(Ordering::SeqCst);
        let (mut unreachable, mut timed_out, mut found) = (false, false, None);
        for (n, client) in self.clients.iter().enumerate() {
            self.inspects.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(container = %short(id), "asking {} about a container", client.kind.title());
            match tokio::time::timeout(INSPECT_TIMEOUT, client.api.inspect_container(id, None)).await {
                // A name or prefix that happens to look like an id is not it.
                Ok(Ok(c)) if c.id.as_deref() == Some(id) => {
                    found = Some((n, c));
                    break;
                }
                Ok(Ok(_)) | Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => {}
                Ok(Err(e)) => {
                    if let Some(held) = self.warn.allow() {
                        tracing::warn!(container = %short(id), runtime = %client.kind, socket = %client.socket.display(), error = %e, held_back = held, "container inspect failed");
                    }
                    unreachable = true;
                }
                Err(_) => {
                    if let Some(held) = self.warn.allow() {
                        tracing::warn!(container = %short(id), runtime = %client.kind, held_back = held, "container inspect timed out");
                    }
                    timed_out = true;
                }
            }
        }
        let Some((n, c)) = found else {
            // A timeout is not remembered: a runtime answers a container
            // being started only once the start is done, and that start
            // may itself be waiting on us (runc touching a volume mount).
            if timed_out {
                return;
            }
            if unreachable {
                return self.absent(id, UNREACHABLE_TTL, starts);
            }
            if let Some(held) = self.warn.allow() {
                tracing::warn!(container = %short(id), held_back = held, "a caller claims a container no runtime knows");
            }
            return self.absent(id, UNKNOWN_TTL, starts);
        };
        let kind = self.clients[n].kind;
        let state = c.state.unwrap_or_default();
        let pid = state.pid.and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        if state.running != Some(true) || pid <= 0 {
            tracing::debug!(container = %short(id), status = ?state.status, "not running: cannot be confirmed yet");
            // One being created is about to start: ask again next time.
            // One that stopped is not believed running for a while.
            let created = matches!(state.status, None | Some(bollard::models::ContainerStateStatusEnum::CREATED));
            if !created {
                self.absent(id, NOT_RUNNING_TTL, starts);
            }
            return;
        }
        let config = c.config.unwrap_or_default();
        let merged: BTreeMap<String, String> = config.labels.unwrap_or_default().into_iter().collect();
        let labels = if merged.is_empty() {
            merged
        } else {
            match self.image_labels(n, c.image.as_deref().unwrap_or_default()).await {
                Ok(image) => own_labels(merged, &image),
                Err(ImageError::Gone) => {
                    if let Some(held) = self.warn.allow() {
                        tracing::warn!(container = %short(id), held_back = held, "its image is gone: its labels are not believed");
                    }
                    BTreeMap::new()
                }
                Err(e) => {
                    if let Some(held) = self.warn.allow() {
                        tracing::warn!(container = %short(id), error = %e, held_back = held, "cannot tell its labels from its image's");
                    }
                    // Not confirmed (denied) until the image answers; a
                    // timeout is not remembered, like the container's.
                    if !matches!(e, ImageError::TimedOut) {
                        self.absent(id, UNREACHABLE_TTL, starts);
                    }
                    return;
                }
            }
        };
        let info = ContainerInfo {
            name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            image: config.image.unwrap_or_default(),
            labels,
            user: config.user.unwrap_or_default(),
            runtime: kind,
        };
        match self.pin(id, pid, None) {
            Ok((pidfd, pid_ns, mnt_ns)) => {
                tracing::debug!(container = %short(id), pid, runtime = %kind, "container confirmed");
                let confirmed = Confirmed { info: Arc::new(info), client: n, pid, pidfd, pid_ns, mnt_ns };
                self.lock().known.insert(id.to_owned(), Arc::new(confirmed));
            }
            Err(e) => {
                if let Some(held) = self.warn.allow() {
                    tracing::warn!(container = %short(id), error = %e, held_back = held, "cannot confirm a container");
                }
                self.absent(id, NOT_RUNNING_TTL, starts);
            }
        }
    }

    /// The labels image `image` (an id, `sha256:…`) carries: remembered,
    /// or one inspect bounded by [`INSPECT_TIMEOUT`].
    async fn image_labels(&self, client: usize, image: &str) -> Result<Arc<BTreeMap<String, String>>, ImageError> {
        if image.is_empty() {
            return Err(ImageError::Gone);
        }
        // Image ids are per runtime: one runtime's says nothing of another's.
        let key = format!("{client}/{image}");
        if let Some(l) = self.lock().images.get(&key) {
            return Ok(l.clone());
        }
        let api = &self.clients[client].api;
        let labels = match tokio::time::timeout(INSPECT_TIMEOUT, api.inspect_image(image)).await {
            Ok(Ok(i)) => {
                let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
                Arc::new(labels.into_iter().collect::<BTreeMap<_, _>>())
            }
            Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => {
                return Err(ImageError::Gone);
            }
            Ok(Err(e)) => return Err(ImageError::Failed(e)),
            Err(_) => return Err(ImageError::TimedOut),
        };
        let mut inner = self.lock();
        if inner.images.len() >= IMAGES_MAX {
            inner.images.clear();
        }
        inner.images.insert(key, labels.clone());
        Ok(labels)
    }

    /// Pin `pid` (the init of `id`), check it resolves to `id` from its
    /// own cgroup file, read its namespaces (equal to `expect`, if given),
    /// and check the pin again: the facts are that process's.
    fn pin(&self, id: &str, pid: i32, expect: Option<(&str, &str)>) -> Result<(OwnedFd, String, String), PinError> {
        let pidfd = crate::sys::pidfd_open(pid).map_err(|e| PinError::Pidfd(pid, e))?;
        let dir = self.proc_root.join(pid.to_string());
        let proc_err = |e| PinError::Proc(pid, e);
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).map_err(proc_err)?;
        let claimed = super::cgroup::container_id(&cgroup).ok().flatten();
        if claimed.as_deref() != Some(id) {
            return Err(PinError::Cgroup(pid));
        }
        let ns = |n: &str| -> Result<String, PinError> {
            let l = std::fs::read_link(dir.join("ns").join(n)).map_err(proc_err)?;
            Ok(l.to_string_lossy().into_owned())
        };
        let (pid_ns, mnt_ns) = (ns("pid")?, ns("mnt")?);
        if let Some((p, m)) = expect {
            if (p, m) != (pid_ns.as_str(), mnt_ns.as_str()) {
                return Err(PinError::Namespaces(pid));
            }
        }
        match crate::sys::pidfd_pid(&pidfd) {
            Ok(Some(p)) if p == pid => Ok((pidfd, pid_ns, mnt_ns)),
            _ => Err(PinError::Gone(pid)),
        }
    }

    /// Before serving: ask about every running container (one list, then
    /// the inspects, a few at a time), so the common case never misses.
    /// Bounded in time; a Docker that does not answer is logged.
    pub async fn prime(self: &Arc<Self>) {
        let started = Instant::now();
        let mut ids: Vec<String> = Vec::new();
        for client in &self.clients {
            let opts = bollard::query_parameters::ListContainersOptions::default(); // running ones
            match tokio::time::timeout(INSPECT_TIMEOUT, client.api.list_containers(Some(opts))).await {
                Ok(Ok(list)) => ids.extend(list.into_iter().filter_map(|c| c.id)),
                Ok(Err(e)) => {
                    tracing::warn!(runtime = %client.kind, socket = %client.socket.display(), error = %e, "cannot list the running containers")
                }
                Err(_) => tracing::warn!(runtime = %client.kind, "listing the running containers timed out"),
            }
        }
        let total = ids.len();
        let work = async {
            let mut ids = ids.into_iter();
            loop {
                let mut batch = Vec::with_capacity(PRIME_CONCURRENCY);
                while batch.len() < PRIME_CONCURRENCY {
                    let Some(id) = ids.next() else { break };
                    if let Some(w) = self.pending(&id) {
                        batch.push(w);
                    }
                }
                if batch.is_empty() && ids.len() == 0 {
                    break;
                }
                for w in batch {
                    w.await;
                }
            }
        };
        if tokio::time::timeout(PRIME_TIMEOUT, work).await.is_err() {
            tracing::warn!("asking Docker about the running containers took too long; the rest are asked on first use");
        }
        let known = self.lock().known.len();
        tracing::info!(
            running = total,
            confirmed = known,
            ms = started.elapsed().as_millis() as u64,
            "containers known"
        );
    }

    /// The confirmed containers, for a successor.
    pub fn export(&self) -> Vec<Exported> {
        let inner = self.lock();
        inner
            .known
            .iter()
            .filter(|(_, c)| !c.exited())
            .map(|(id, c)| Exported {
                id: id.clone(),
                pid: c.pid,
                pid_ns: c.pid_ns.clone(),
                mnt_ns: c.mnt_ns.clone(),
                name: c.info.name.clone(),
                image: c.info.image.clone(),
                labels: c.info.labels.clone(),
                user: c.info.user.clone(),
                own_labels: true,
                runtime_socket: Some(self.clients[c.client].socket.clone()),
            })
            .collect()
    }

    /// Take a predecessor's containers: each init is pinned again and must
    /// still resolve to its id and sit in the same namespaces; anything
    /// that cannot be checked is dropped (and asked about on first use).
    pub fn import(&self, containers: Vec<Exported>) -> usize {
        let mut taken = 0;
        for e in containers.into_iter().take(IMPORT_MAX) {
            if !super::cgroup::is_container_id(&e.id) || e.pid <= 0 {
                continue;
            }
            if !e.own_labels && !e.labels.is_empty() {
                // An older predecessor's labels may hold the image's.
                tracing::debug!(container = %short(&e.id), "labels not sorted from the image's: asked about again");
                continue;
            }
            // The runtime it came from, by its socket; a predecessor that
            // named none knew only Docker. One no longer configured: asked
            // about again.
            let client = match &e.runtime_socket {
                Some(s) => self.clients.iter().position(|c| c.socket == *s),
                None => self.clients.iter().position(|c| c.kind == Runtime::Docker),
            };
            let Some(client) = client else {
                tracing::debug!(container = %short(&e.id), "its runtime is not configured: asked about again");
                continue;
            };
            match self.pin(&e.id, e.pid, Some((&e.pid_ns, &e.mnt_ns))) {
                Ok((pidfd, pid_ns, mnt_ns)) => {
                    let info = ContainerInfo {
                        name: e.name,
                        image: e.image,
                        labels: e.labels,
                        user: e.user,
                        runtime: self.clients[client].kind,
                    };
                    let c = Confirmed { info: Arc::new(info), client, pid: e.pid, pidfd, pid_ns, mnt_ns };
                    self.lock().known.insert(e.id, Arc::new(c));
                    taken += 1;
                }
                Err(err) => tracing::debug!(container = %short(&e.id), error = %err, "not taken from the predecessor"),
            }
        }
        taken
    }

    /// The container being started with `volume`: the one container that
    /// mounts it and is not running yet. None if Docker does not say, or
    /// more than one could be meant. (Docker lists it, but cannot inspect
    /// it until the start is under way.)
    pub async fn starting_container(&self, volume: &str) -> Option<String> {
        // Docker's plugin socket is Docker's: ask the (first) Docker runtime.
        let client = self.clients.iter().find(|c| c.kind == Runtime::Docker)?;
        let filters = HashMap::from([("volume".to_owned(), vec![volume.to_owned()])]);
        let opts = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = match tokio::time::timeout(INSPECT_TIMEOUT, client.api.list_containers(Some(opts))).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(%volume, error = %e, "cannot list the containers that mount a volume");
                return None;
            }
            Err(_) => {
                tracing::warn!(%volume, "listing the containers that mount a volume timed out");
                return None;
            }
        };
        let running = bollard::models::ContainerSummaryStateEnum::RUNNING;
        let mut starting = list.into_iter().filter(|c| c.state != Some(running));
        match (starting.next(), starting.next()) {
            (Some(only), None) => only.id,
            _ => {
                tracing::info!(%volume, "cannot tell which container mounts the volume; files keep the grant's owner");
                None
            }
        }
    }

    /// Send `signal` (e.g. "SIGHUP") to a running container, through the
    /// runtime that confirmed it (or each, until one knows it).
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), String> {
        let known = self.lock().known.get(id).map(|c| c.client);
        let order: Vec<&Client> = match known {
            Some(n) => vec![&self.clients[n]],
            None => self.clients.iter().collect(),
        };
        let mut last = Err("no runtime is configured".to_owned());
        for client in order {
            let opts = bollard::query_parameters::KillContainerOptions { signal: signal.to_owned() };
            last = match tokio::time::timeout(INSPECT_TIMEOUT, client.api.kill_container(id, Some(opts))).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            };
        }
        last
    }

    /// Ids of containers that die or are removed, from now on (a
    /// receiver that lags is told so: sweep instead).
    pub fn gone(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.gone.subscribe()
    }

    /// Whether Docker says the container runs: None if it cannot tell
    /// (dockerd unreachable or slow); Some(false) if it is stopped or
    /// unknown (removed).
    pub async fn running(&self, id: &str) -> Option<bool> {
        // Asked of every configured runtime: unknown to all of them is gone.
        let mut unknown = 0;
        for client in &self.clients {
            match tokio::time::timeout(INSPECT_TIMEOUT, client.api.inspect_container(id, None)).await {
                Ok(Ok(c)) => return Some(c.state.and_then(|s| s.running).unwrap_or(false)),
                Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => unknown += 1,
                _ => {}
            }
        }
        (unknown == self.clients.len()).then_some(false)
    }

    /// One container event.
    fn on_event(self: &Arc<Self>, action: &str, id: &str) {
        // "exec_start: sh" and the like carry a suffix.
        let action = action.split(':').next().unwrap_or(action);
        match action {
            // Podman says `remove` (and `died`, `cleanup`) where Docker says `destroy`.
            "destroy" | "die" | "died" | "stop" | "remove" | "cleanup" => {
                self.lock().known.remove(id);
                if matches!(action, "die" | "destroy") {
                    let _ = self.gone.send(id.to_owned());
                }
            }
            "rename" | "update" => {
                self.lock().known.remove(id);
                self.ask_now(id);
            }
            "create" | "start" | "restart" => {
                self.starts.fetch_add(1, Ordering::SeqCst);
                self.lock().absent.remove(id);
                if action != "create" {
                    self.ask_now(id);
                }
            }
            _ => {}
        }
    }

    /// Keep the cache honest from each runtime's events stream,
    /// reconnecting forever.
    pub async fn watch(self: Arc<Self>) {
        let mut tasks = Vec::with_capacity(self.clients.len());
        for n in 0..self.clients.len() {
            tasks.push(tokio::spawn(self.clone().watch_one(n)));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// One runtime's events stream, forever.
    async fn watch_one(self: Arc<Self>, client: usize) {
        let kind = self.clients[client].kind;
        let mut backoff = Duration::from_millis(200);
        // After a lost stream, reconnect asking for the events since it was
        // lost: dockerd replays what it has, so none is missed across a
        // broker-side hiccup, and a restarted dockerd replays its own.
        let mut since: Option<u64> = None;
        loop {
            let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
            let opts = bollard::query_parameters::EventsOptions {
                filters: Some(filters),
                since: since.map(|t| t.to_string()),
                ..Default::default()
            };
            let mut events = self.clients[client].api.events(Some(opts));
            if since.is_some() {
                // The cache was cleared: learn the running containers again.
                let me = self.clone();
                tokio::spawn(async move { me.prime().await });
            }
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) => {
                        if since.take().is_some() {
                            tracing::info!("{kind} events stream back");
                        }
                        backoff = Duration::from_millis(200);
                        let action = ev.action.unwrap_or_default();
                        let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
                        self.on_event(&action, &id);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "{kind} events stream ended");
                        break;
                    }
                }
            }
            if since.is_none() {
                tracing::warn!("{kind} events stream lost; reconnecting");
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                since = Some(now.as_secs().saturating_sub(1));
            }
            // Whatever the replay cannot cover (a dockerd restart loses its
            // event log) is forgotten: the next open asks Docker again.
            {
                let mut inner = self.lock();
                inner.known.clear();
                inner.absent.clear();
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Ends an inspect's in-flight entry (waking its waiters), however the
/// inspect ends.
struct Inflight {
    cache: Arc<DockerCache>,
    id: String,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.cache.lock().inflight.remove(&self.id);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ID: &str = "3f1c0a6b2d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeef";

    /// A /proc tree: `pid` in container [`ID`] with the given namespaces.
    pub(crate) fn proc_entry(root: &Path, pid: i32, cgroup: &str, pid_ns: &str, mnt_ns: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        std::fs::write(dir.join("status"), "Name:\tx\nGroups:\t10 20\n").unwrap();
        std::os::unix::fs::symlink(pid_ns, dir.join("ns/pid")).unwrap();
        std::os::unix::fs::symlink(mnt_ns, dir.join("ns/mnt")).unwrap();
    }

    pub(crate) fn exported(pid: i32, pid_ns: &str, mnt_ns: &str) -> Exported {
        Exported {
            id: ID.into(),
            pid,
            pid_ns: pid_ns.into(),
            mnt_ns: mnt_ns.into(),
            name: "web".into(),
            image: "busybox".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            user: String::new(),
            own_labels: true,
            runtime_socket: None,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn an_imported_container_is_pinned_and_checked_again() {
        let (rt, tmp) = (runtime(), tempfile::tempdir().unwrap());
        // Our own pid stands in for the container's init: it can be pinned.
        proc_entry(tmp.path(), me(), &format!("0::/docker/{ID}\n"), "pid:[1]", "mnt:[2]");
        let d = DockerCache::for_tests(tmp.path(), rt.handle().clone());
        // Other namespaces than recorded, a dead pid, a bad id: dropped.
        let mut bad_id = exported(me(), "pid:[1]", "mnt:[2]");
        bad_id.id = "docker".into();
        let handed = vec![exported(me(), "pid:[1]", "mnt:[9]"), exported(i32::MAX, "pid:[1]", "mnt:[2]"), bad_id];
        assert_eq!(d.import(handed), 0);
        assert!(matches!(d.cached(ID), Cached::Miss));
        assert_eq!(d.import(vec![exported(me(), "pid:[1]", "mnt:[2]")]), 1);
        let Cached::Known(c) = d.cached(ID) else { panic!("not known") };
        assert_eq!(
            (c.pid, c.pid_ns.as_str(), c.mnt_ns.as_str(), c.info.name.as_str()),
            (me(), "pid:[1]", "mnt:[2]", "web")
        );
        let out = d.export();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].id.as_str(), out[0].labels.get("app").map(String::as_str)), (ID, Some("web")));
        // Its init resolving to another container is not taken.
        let other = tempfile::tempdir().unwrap();
        proc_entry(other.path(), me(), &format!("0::/docker/{}\n", "a".repeat(64)), "pid:[1]", "mnt:[2]");
        let d2 = DockerCache::for_tests(other.path(), rt.handle().clone());
        assert_eq!(d2.import(d.export()), 0);
        // An exported list survives JSON, and an old predecessor's state
        // (no labels, no user) still reads.
        let json = serde_json::to_string(&out).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Exported>>(&json).unwrap().len(), 1);
        let old = r#"[{"id":"x","pid":1,"pid_ns":"p","mnt_ns":"m","name":"n","image":"i"}]"#;
        assert!(serde_json::from_str::<Vec<Exported>>(old).is_ok());
        // An older predecessor's labels may hold the image's: not taken
        // (asked about again); without labels, it is.
        let d3 = DockerCache::for_tests(tmp.path(), rt.handle().clone());
        let mut unsorted = exported(me(), "pid:[1]", "mnt:[2]");
        unsorted.own_labels = false;
        assert_eq!(d3.import(vec![unsorted.clone()]), 0);
        unsorted.labels.clear();
        assert_eq!(d3.import(vec![unsorted]), 1);
    }

    #[test]
    fn only_the_labels_the_starter_set_count() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let image = l(&[("role", "db"), ("maintainer", "x"), ("tier", "back")]);
        // Docker's merge: the image's, then the starter's on top.
        let merged = l(&[
            ("role", "db"),                         // the image's (or set to the same value: dropped)
            ("maintainer", "x"),                    // the image's
            ("tier", "front"),                      // the image's, changed by the starter
            ("com.docker.compose.project", "shop"), // set at run time
        ]);
        assert_eq!(own_labels(merged, &image), l(&[("tier", "front"), ("com.docker.compose.project", "shop")]));
        assert_eq!(own_labels(l(&[("role", "db")]), &BTreeMap::new()), l(&[("role", "db")]));
    }

    #[test]
    fn a_container_whose_init_exited_is_evicted_on_sight() {
        let (rt, tmp) = (runtime(), tempfile::tempdir().unwrap());
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        proc_entry(tmp.path(), pid, &format!("0::/docker/{ID}\n"), "pid:[1]", "mnt:[2]");
        let d = DockerCache::for_tests(tmp.path(), rt.handle().clone());
        assert_eq!(d.import(vec![exported(pid, "pid:[1]", "mnt:[2]")]), 1);
        assert!(matches!(d.cached(ID), Cached::Known(_)));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(d.cached(ID), Cached::Miss));
        assert!(d.export().is_empty());
    }

    #[test]
    fn the_negative_cache_is_bounded_and_cleared_by_a_start() {
        let (rt, tmp) = (runtime(), tempfile::tempdir().unwrap());
        let d = DockerCache::for_tests(tmp.path(), rt.handle().clone());
        for n in 0..ABSENT_MAX + 100 {
            d.absent(&format!("{n:064x}"), UNKNOWN_TTL, 0);
        }
        assert_eq!(d.lock().absent.len(), ABSENT_MAX);
        d.absent(ID, UNKNOWN_TTL, 0);
        assert!(matches!(d.cached(ID), Cached::Absent));
        assert!(d.pending(ID).is_none(), "a negative answer is not asked again");
        d.on_event("start", ID);
        assert!(matches!(d.cached(ID), Cached::Miss));
        // An answer from before the start is not believed.
        d.absent(ID, UNKNOWN_TTL, 0);
        assert!(matches!(d.cached(ID), Cached::Miss));
        // Expired answers are forgotten.
        d.absent("b", Duration::ZERO, 1);
        assert!(matches!(d.cached("b"), Cached::Miss));
    }

    #[test]
    fn inspects_are_deduplicated_bounded_and_waited_for() {
        let (rt, tmp) = (runtime(), tempfile::tempdir().unwrap());
        let d = DockerCache::for_tests(tmp.path(), rt.handle().clone());
        // The current-thread runtime runs nothing until blocked on.
        let first = d.pending(ID).expect("a miss is asked about");
        let second = d.pending(ID).expect("joins the inspect in flight");
        assert_eq!(d.lock().inflight.len(), 1);
        for n in 1..INFLIGHT_MAX {
            drop(d.pending(&format!("{n:064x}")));
        }
        assert_eq!(d.lock().inflight.len(), INFLIGHT_MAX);
        assert!(d.pending(&format!("{:064x}", INFLIGHT_MAX + 1)).is_none(), "over the bound: refused");
        // Docker does not answer here: the waits end, the answer is negative.
        let started = Instant::now();
        rt.block_on(async {
            first.await;
            second.await;
        });
        assert!(started.elapsed() < WAIT_FOR + Duration::from_millis(500));
        rt.block_on(async {
            while !d.lock().inflight.is_empty() {
                tokio::task::yield_now().await;
            }
        });
        assert!(matches!(d.cached(ID), Cached::Absent));
        assert_eq!(d.inspects(), INFLIGHT_MAX as u64);
    }
}

/// How long a `grant --restart` waits for a container to run again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `grant --exec` command may run before it is reported as
/// not finished (it is left running).
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an action on a container did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum ActionFailure {
    /// No runtime knows the container (removed), or it is not running.
    Gone,
    /// Anything else (the runtime's answer, a timeout).
    Failed(String),
}

impl std::fmt::Display for ActionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionFailure::Gone => f.write_str("the container is gone or not running"),
            ActionFailure::Failed(why) => f.write_str(why),
        }
    }
}

fn action_failure(e: bollard::errors::Error) -> ActionFailure {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404 | 409, .. } => ActionFailure::Gone,
        e => ActionFailure::Failed(e.to_string()),
    }
}

impl DockerCache {
    /// The runtimes to ask about `id`: the one that confirmed it, else
    /// each in turn.
    fn clients_for(&self, id: &str) -> Vec<&Client> {
        match self.lock().known.get(id).map(|c| c.client) {
            Some(n) => vec![&self.clients[n]],
            None => self.clients.iter().collect(),
        }
    }

    /// When the container last started, and whether it runs.
    async fn started_at(client: &Client, id: &str) -> Result<(Option<String>, bool), ActionFailure> {
        match tokio::time::timeout(INSPECT_TIMEOUT, client.api.inspect_container(id, None)).await {
            Ok(Ok(c)) => {
                let state = c.state.unwrap_or_default();
                Ok((state.started_at, state.running.unwrap_or(false)))
            }
            Ok(Err(e)) => Err(action_failure(e)),
            Err(_) => Err(ActionFailure::Failed("the runtime did not answer in time".into())),
        }
    }

    /// Restart a running container (`grant --restart`) and wait until it
    /// runs again, started anew; returns how long that took. A container
    /// that is not running is left alone ([`ActionFailure::Gone`]).
    pub async fn restart(&self, id: &str) -> Result<Duration, ActionFailure> {
        let t0 = Instant::now();
        let mut last = ActionFailure::Failed("no runtime is configured".into());
        for client in self.clients_for(id) {
            let before = match Self::started_at(client, id).await {
                Ok((_, false)) => return Err(ActionFailure::Gone),
                Ok((at, true)) => at,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let opts = bollard::query_parameters::RestartContainerOptions { t: Some(10), signal: None };
            match tokio::time::timeout(RESTART_TIMEOUT, client.api.restart_container(id, Some(opts))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(action_failure(e)),
                Err(_) => return Err(ActionFailure::Failed("the restart did not finish in time".into())),
            }
            loop {
                match Self::started_at(client, id).await {
                    Ok((at, true)) if at != before => return Ok(t0.elapsed()),
                    Err(ActionFailure::Gone) => return Err(ActionFailure::Gone),
                    _ if t0.elapsed() > RESTART_TIMEOUT => {
                        return Err(ActionFailure::Failed("not running again in time".into()));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Err(last)
    }

    /// Run `argv` in a running container through the runtime's exec API
    /// (`grant --exec`), no shell on the host, its output discarded (it
    /// may hold secrets); returns its exit code once it ends.
    pub async fn exec(&self, id: &str, argv: &[String]) -> Result<i64, ActionFailure> {
        let t0 = Instant::now();
        let mut last = ActionFailure::Failed("no runtime is configured".into());
        for client in self.clients_for(id) {
            let config = bollard::models::ExecConfig {
                cmd: Some(argv.to_vec()),
                attach_stdin: Some(false),
                attach_stdout: Some(false),
                attach_stderr: Some(false),
                ..Default::default()
            };
            let exec = match tokio::time::timeout(INSPECT_TIMEOUT, client.api.create_exec(id, config)).await {
                Ok(Ok(e)) => e.id,
                Ok(Err(e)) => {
                    last = action_failure(e);
                    continue;
                }
                Err(_) => {
                    last = ActionFailure::Failed("the runtime did not answer in time".into());
                    continue;
                }
            };
            let detached = bollard::exec::StartExecOptions { detach: true, ..Default::default() };
            match tokio::time::timeout(INSPECT_TIMEOUT, client.api.start_exec(&exec, Some(detached))).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(action_failure(e)),
                Err(_) => return Err(ActionFailure::Failed("the runtime did not answer in time".into())),
            }
            loop {
                match tokio::time::timeout(INSPECT_TIMEOUT, client.api.inspect_exec(&exec)).await {
                    Ok(Ok(r)) if r.running != Some(true) => {
                        return r.exit_code.ok_or_else(|| ActionFailure::Failed("no exit code".into()));
                    }
                    Ok(Err(e)) => return Err(action_failure(e)),
                    _ if t0.elapsed() > EXEC_TIMEOUT => {
                        return Err(ActionFailure::Failed(format!(
                            "still running after {}s (left running)",
                            EXEC_TIMEOUT.as_secs()
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Err(last)
    }
}
