//! Who is calling.
//!
//! Three steps, kept apart: the kernel tells us the peer of a connection
//! (uid, gid, pid at connect time, and a pidfd pinning that process —
//! [`Peer`]); the [`Attestor`] turns the pinned process into facts (its
//! container, whether it is a host process, its groups — [`Identity`]);
//! and policy decides what those facts may do, admin or not included
//! ([`crate::policy::admin`]). Attestation re-checks the pidfd after
//! reading `/proc`, so a process that exited and had its pid reused is
//! never attested as the newcomer.
//!
//! A container is never taken from a name. The cgroup file only *claims*
//! one ([`cgroup::Claim`]); a claim under a delegated subtree is ignored;
//! otherwise the caller is container C only if Docker confirmed C as
//! running and the caller shares the pid and mount namespaces of C's
//! init (`State.Pid`, pinned — see [`docker::Confirmed`]). A claim Docker
//! has not answered yet is refused ([`IdentityError::Unconfirmed`]):
//! attestation never blocks on Docker; [`Attestor::pending`] says what to
//! wait for first.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod docker;
pub mod runtime;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Subject;
use crate::policy::ContainerInfo;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the calling process (pid {0}) has exited")]
    Gone(i32),
    #[error("no pidfd could pin pid {0}, so it cannot be told from a recycled pid")]
    Unpinned(i32),
    #[error("caller pid is 0: it is outside the broker's pid namespace")]
    NoPid,
    #[error("cannot read /proc for pid {pid}: {source}")]
    Proc { pid: i32, source: std::io::Error },
    #[error("cannot attest pid {pid}: {source}")]
    Cgroup { pid: i32, source: cgroup::CgroupError },
    #[error("pid {pid} claims container {container:.12}, which Docker has not confirmed (yet)")]
    Unconfirmed { pid: i32, container: String },
    #[error("pid {pid} claims container {container:.12} but is not in its pid and mount namespaces")]
    NotInContainer { pid: i32, container: String },
}

/// At most one log line a second; counts the ones it holds back.
#[derive(Default)]
pub(crate) struct Throttle {
    last: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// `Some(lines held back since the last one)` if a line may be written now.
    pub(crate) fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let last = self.last.load(Relaxed);
        if last != now && self.last.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            return Some(self.held.swap(0, Relaxed));
        }
        self.held.fetch_add(1, Relaxed);
        None
    }
}

/// The process at the other end of a connection, as the kernel reported it.
#[derive(Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Pins the process; `None` only where the kernel offers no pidfd.
    pub pidfd: Option<Arc<OwnedFd>>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("pid", &self.pid)
            .field("pinned", &self.pidfd.is_some())
            .finish()
    }
}

/// What the broker knows of a caller.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// What Docker says of the container (audited as its name only).
    #[serde(rename = "container_name", serialize_with = "name_only", skip_serializing_if = "Option::is_none")]
    pub docker: Option<Arc<ContainerInfo>>,
    /// In the broker's pid and mount namespaces and container (none, for
    /// a broker on the host).
    pub host: bool,
    /// Its uid and gid are a host user's, which `unix:` selectors name:
    /// in no container (none claimed from a cgroup that is not delegated,
    /// or the broker's own), and either in the broker's pid namespace or
    /// in a user namespace other than the broker's (whose ids the kernel
    /// maps to those its owner holds). Root in a container, or in a pid
    /// namespace of the broker's user namespace (a container by another
    /// runtime, `unshare -p`), can take any uid: not a host user. See
    /// [`crate::policy::Workload::matches`].
    #[serde(skip)]
    pub host_user: bool,
    /// In a user namespace other than the broker's: the uid owning the
    /// outermost of its namespaces below the broker's (whoever made it;
    /// a user with subordinate ids runs as thousands of host uids there).
    /// Its denials are limited as that one caller (see
    /// [`crate::limits::caller_key`]). None in the broker's user namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userns_owner: Option<u32>,
    /// Decided by policy from the facts ([`crate::policy::admin`]), never
    /// by attestation, which leaves it false.
    pub admin: bool,
    /// A remote admin client: its certificate subject and address, in
    /// place of a uid, gid and pid (left 0). Written as `remote`
    /// (`"<subject> from <address>"`), `subject` and `address`.
    #[serde(flatten, serialize_with = "remote_fields")]
    pub remote: Option<Remote>,
    /// A host process's supplementary groups (`/proc/<pid>/status`), for
    /// `[admin] gids`; empty for anyone else.
    #[serde(skip)]
    pub groups: Arc<[u32]>,
}

/// A remote client that came through mutual TLS: what its certificate
/// says and where it connected from. Who it may be is policy's call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Its certificate's subject, or why none could be read.
    pub subject: Result<Subject, String>,
    /// Its address, if the transport told us.
    pub address: Option<std::net::SocketAddr>,
}

impl Remote {
    /// The subject as configured and audited (`CN=alice,O=Example`), or
    /// why there is none.
    pub fn subject_shown(&self) -> String {
        match &self.subject {
            Ok(s) => s.iter().cloned().collect::<Vec<_>>().join(","),
            Err(e) => e.clone(),
        }
    }
}

impl fmt::Display for Remote {
    /// `<subject> from <address>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            Some(a) => write!(f, "{} from {a}", self.subject_shown()),
            None => write!(f, "{} from an unknown address", self.subject_shown()),
        }
    }
}

/// A remote caller's fields in its audited identity: `remote` as ever,
/// and (since 0.2) `subject` and `address` apart.
fn remote_fields<S: serde::Serializer>(r: &Option<Remote>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let Some(r) = r else { return s.serialize_map(Some(0))?.end() };
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("remote", &r.to_string())?;
    if r.subject.is_ok() {
        m.serialize_entry("subject", &r.subject_shown())?;
    }
    if let Some(a) = r.address {
        m.serialize_entry("address", &a.to_string())?;
    }
    m.end()
}

fn name_only<S: serde::Serializer>(d: &Option<Arc<ContainerInfo>>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_ref().map_or("", |d| d.name.as_str()))
}

impl Identity {
    /// A caller the kernel named but attestation could not describe (it
    /// exited, its `/proc` was unreadable, its container unconfirmed):
    /// the ids as the kernel reported them, and no other fact. Such a
    /// caller is refused; this is what its refusal is audited as.
    pub fn unattested(uid: u32, gid: u32, pid: i32) -> Identity {
        Identity { uid, gid, pid, ..Identity::default() }
    }

    /// A remote client that came through mutual TLS. It has no uid, gid
    /// or pid (they read 0); what it is, is its certificate's subject.
    pub fn remote(subject: Result<Subject, String>, address: Option<std::net::SocketAddr>) -> Identity {
        Identity { remote: Some(Remote { subject, address }), ..Identity::default() }
    }

    pub fn selectors(&self) -> Vec<String> {
        let mut s = vec![format!("unix:uid:{}", self.uid), format!("unix:gid:{}", self.gid)];
        // Set only once a runtime confirmed the container (see `describe`):
        // a cgroup name alone never yields `container:id`.
        s.extend(crate::policy::container_selectors(self.container_id.as_deref(), self.docker.as_deref()));
        s
    }
}

/// Turns peers into identities by reading `/proc` under `proc_root`, and
/// asking Docker about containers.
#[derive(Debug)]
pub struct Attestor {
    proc_root: PathBuf,
    own_pid_ns: Option<PathBuf>,
    own_mnt_ns: Option<PathBuf>,
    own_user_ns: Option<PathBuf>,
    /// The container the broker itself runs in (a compose sidecar), if any.
    own_container: Option<String>,
    docker: Option<Arc<docker::DockerCache>>,
    /// FUSE callers seen lately (see [`Attestor::attest_task`]).
    tasks: Mutex<Tasks>,
    /// Where the broker sees the cgroup hierarchies (delegation checks).
    cgroups: cgroup::CgroupMounts,
    warn: Throttle,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Throttle")
    }
}

/// What a task cannot change about itself while it lives (its container,
/// its namespaces), pinned by a pidfd so a recycled tid never inherits it.
/// uid and gid are not kept: every FUSE request carries them afresh.
struct Known {
    pidfd: OwnedFd,
    container_id: Option<String>,
    docker: Option<Arc<ContainerInfo>>,
    host: bool,
    host_user: bool,
    userns_owner: Option<u32>,
    groups: Arc<[u32]>,
    at: Instant,
}

impl fmt::Debug for Known {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Known").field("container_id", &self.container_id).field("host", &self.host).finish()
    }
}

/// How long a FUSE caller's facts are reused. Bounds how long a task that
/// root moves to another cgroup keeps its old container.
const KNOWN_FOR: Duration = Duration::from_secs(1);
/// Most FUSE callers remembered at once. Each holds a pidfd, so this stays
/// far below the file descriptors the broker keeps in reserve (256 and two
/// per mount, see `api::peer::Budget`): a burst of short-lived openers
/// (every thread is a task of its own) must never use them up.
pub const KNOWN_MAX: usize = 128;

/// The remembered FUSE callers, and the order they were remembered in, so
/// expired ones are dropped on every insert at the cost of the ones
/// dropped: the map never holds a task older than [`KNOWN_FOR`] past the
/// next insert, nor more than [`KNOWN_MAX`].
#[derive(Debug, Default)]
struct Tasks {
    by_tid: HashMap<i32, Known>,
    /// (tid, when remembered), oldest first; an entry whose time is not
    /// its tid's in `by_tid` any more is stale and skipped.
    order: VecDeque<(i32, Instant)>,
}

impl Tasks {
    fn get(&self, tid: i32) -> Option<&Known> {
        self.by_tid.get(&tid)
    }

    fn remove(&mut self, tid: i32) {
        self.by_tid.remove(&tid);
    }

    fn insert(&mut self, tid: i32, known: Known) {
        let now = known.at;
        while let Some(&(old, at)) = self.order.front() {
            if self.order.len() < KNOWN_MAX && now.duration_since(at) < KNOWN_FOR {
                break;
            }
            self.order.pop_front();
            if self.by_tid.get(&old).is_some_and(|k| k.at == at) {
                self.by_tid.remove(&old);
            }
        }
        self.order.push_back((tid, now));
        self.by_tid.insert(tid, known);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_tid.len()
    }
}

impl Attestor {
    pub fn new(proc_root: impl Into<PathBuf>, docker: Option<Arc<docker::DockerCache>>) -> Self {
        let proc_root = proc_root.into();
        let own = |ns: &str| std::fs::read_link(proc_root.join("self/ns").join(ns)).ok();
        let own_container = std::fs::read_to_string(proc_root.join("self/cgroup"))
            .ok()
            .and_then(|c| cgroup::container_id(&c).ok().flatten());
        Self {
            own_pid_ns: own("pid"),
            own_mnt_ns: own("mnt"),
            own_user_ns: own("user"),
            own_container,
            cgroups: cgroup::CgroupMounts::of_self(&proc_root),
            proc_root,
            docker,
            tasks: Mutex::new(Tasks::default()),
            warn: Throttle::default(),
        }
    }

    /// Check delegation against `mounts` instead of the broker's own
    /// cgroup mounts (a configured cgroup root; tests).
    pub fn with_cgroup_mounts(mut self, mounts: cgroup::CgroupMounts) -> Self {
        self.cgroups = mounts;
        self
    }

    /// A socket peer: read `/proc`, then prove with the pidfd that the
    /// process read about is still the peer. May wait (up to
    /// [`docker::WAIT_FOR`]) for Docker to describe the peer's container:
    /// call it from a thread that may block, never from an async task.
    pub fn attest(&self, peer: &Peer) -> Result<Identity, IdentityError> {
        if peer.pid <= 0 {
            return Err(IdentityError::NoPid);
        }
        self.check_alive(peer)?;
        self.wait_pending(peer.pid);
        let (id, _) = self.describe(peer.pid, peer.uid, peer.gid)?;
        // Everything was read from /proc/<pid>; it describes the peer only
        // if the pinned process is still the one with that pid.
        self.check_alive(peer)?;
        Ok(id)
    }

    /// The caller of a FUSE request: the task is blocked in the syscall
    /// for as long as the request is being served, so `/proc/<tid>` is
    /// stable without a pin. `tid` 0 means outside our pid namespace.
    ///
    /// A task's container and namespaces are remembered for [`KNOWN_FOR`]
    /// under a pidfd of the task: a warm open then costs a lookup and one
    /// poll instead of four `/proc` reads.
    ///
    /// Never blocks on the runtime: a container Docker has not answered
    /// for yet is refused ([`IdentityError::Unconfirmed`]) and its inspect
    /// started; wait for [`Attestor::pending`] first to avoid that.
    pub fn attest_task(&self, tid: i32, uid: u32, gid: u32) -> Result<Identity, IdentityError> {
        if tid <= 0 {
            return Err(IdentityError::NoPid);
        }
        {
            let mut tasks = self.tasks.lock().expect("tasks lock");
            if let Some(k) = tasks.get(tid) {
                if k.at.elapsed() < KNOWN_FOR && !crate::sys::pidfd_exited(&k.pidfd) {
                    return Ok(Identity {
                        uid,
                        gid,
                        pid: tid,
                        container_id: k.container_id.clone(),
                        docker: k.docker.clone(),
                        host: k.host,
                        host_user: k.host_user,
                        userns_owner: k.userns_owner,
                        admin: false,
                        remote: None,
                        groups: k.groups.clone(),
                    });
                }
                tasks.remove(tid);
            }
        }
        // Pin first, read /proc, then check the pin: the facts are the task's.
        let pidfd = crate::sys::pidfd_open_task(tid).ok();
        let (id, settled) = self.describe(tid, uid, gid)?;
        // A container Docker cannot describe yet is asked about again.
        if let Some(pidfd) = pidfd.filter(|p| settled && !crate::sys::pidfd_exited(p)) {
            let mut tasks = self.tasks.lock().expect("tasks lock");
            let known = Known {
                pidfd,
                container_id: id.container_id.clone(),
                docker: id.docker.clone(),
                host: id.host,
                host_user: id.host_user,
                userns_owner: id.userns_owner,
                groups: id.groups.clone(),
                at: Instant::now(),
            };
            tasks.insert(tid, known);
        }
        Ok(id)
    }

    /// Something worth waiting for before attesting `tid`: the inspect of
    /// the container it claims (started now, or already in flight), ending
    /// within [`docker::WAIT_FOR`]. `None` when [`Self::attest_task`] can
    /// answer at once. Cheap and non-blocking: reads `/proc/<tid>/cgroup`
    /// (and stats the claimed cgroup's directories), and spawns the
    /// inspect on the Docker cache's runtime.
    pub fn pending(&self, tid: i32) -> Option<docker::Wait> {
        let d = self.docker.as_ref()?;
        if tid <= 0 {
            return None;
        }
        if let Some(k) = self.tasks.lock().expect("tasks lock").get(tid) {
            if k.at.elapsed() < KNOWN_FOR {
                return None;
            }
        }
        let file = std::fs::read_to_string(self.proc_root.join(tid.to_string()).join("cgroup")).ok()?;
        let claim = cgroup::claim(&file).ok()??;
        if claim.delegated(&self.cgroups, cgroup::dir_facts).is_some() {
            return None;
        }
        d.pending(&claim.id)
    }

    /// Wait (bounded) for [`Self::pending`] on this thread. For callers on
    /// threads that may block (the socket path; and, TEMPORARILY, the FUSE
    /// request threads until the worker pool parks opens instead).
    pub fn wait_pending(&self, tid: i32) {
        if let (Some(d), Some(wait)) = (&self.docker, self.pending(tid)) {
            d.runtime().block_on(wait);
        }
    }

    /// The container a cgroup file claims, unless it was claimed under a
    /// delegated subtree (then it is worthless, and ignored).
    fn claim(&self, pid: i32, cgroup_file: &str) -> Result<Option<String>, IdentityError> {
        let claim = cgroup::claim(cgroup_file).map_err(|source| IdentityError::Cgroup { pid, source })?;
        let Some(claim) = claim else { return Ok(None) };
        if let Some(why) = claim.delegated(&self.cgroups, cgroup::dir_facts) {
            if let Some(held) = self.warn.allow() {
                tracing::warn!(
                    pid,
                    container = %docker::short(&claim.id),
                    reason = %why,
                    held_back = held,
                    "a container claimed from a delegated cgroup is ignored"
                );
            }
            return Ok(None);
        }
        Ok(Some(claim.id))
    }

    /// The identity, and whether it may be remembered (false while Docker
    /// has no answer).
    fn describe(&self, pid: i32, uid: u32, gid: u32) -> Result<(Identity, bool), IdentityError> {
        let dir = self.proc_root.join(pid.to_string());
        let proc_err = |source| IdentityError::Proc { pid, source };
        let cgroup_file = std::fs::read_to_string(dir.join("cgroup")).map_err(proc_err)?;
        let claimed = self.claim(pid, &cgroup_file)?;
        let ns = |ns: &str| -> Result<PathBuf, IdentityError> {
            std::fs::read_link(dir.join("ns").join(ns)).map_err(proc_err)
        };
        let (pid_ns, mnt_ns) = (ns("pid")?, ns("mnt")?);
        // "Host" is where the broker is: its pid and mount namespaces, and
        // its container (none, or the sidecar's own for `docker exec`).
        let in_own_container = claimed == self.own_container;
        let host =
            in_own_container && self.own_pid_ns.as_ref() == Some(&pid_ns) && self.own_mnt_ns.as_ref() == Some(&mnt_ns);
        // A host user: not in a container; and in the broker's pid
        // namespace (a mount namespace of its own changes nothing, e.g.
        // `unshare -m` or a service's PrivateTmp), or in a user namespace
        // of its own, where the kernel maps its ids and it cannot pick
        // them. In a pid namespace of the broker's user namespace, root
        // (a container of a runtime we do not know) picks any uid.
        let other_user_ns = ns("user").is_ok_and(|u| self.own_user_ns.as_ref().is_some_and(|own| *own != u));
        let host_user = in_own_container && (host || self.own_pid_ns.as_ref() == Some(&pid_ns) || other_user_ns);
        // Only off the common path: a user namespace not the broker's.
        let userns_owner = if other_user_ns { outermost_userns_owner(&dir.join("ns").join("user")) } else { None };
        // The container only once Docker confirmed it running and the
        // caller shares its init's namespaces; `docker:*` never matches
        // without Docker.
        let (container_id, docker, settled) = match (claimed, &self.docker) {
            (None, _) | (Some(_), None) => (None, None, true),
            (Some(c), Some(d)) => match d.cached(&c) {
                docker::Cached::Known(k) => {
                    if Path::new(&k.pid_ns) != pid_ns || Path::new(&k.mnt_ns) != mnt_ns {
                        return Err(IdentityError::NotInContainer { pid, container: c });
                    }
                    (Some(c), Some(k.info.clone()), true)
                }
                docker::Cached::Absent => (None, None, false),
                docker::Cached::Miss => {
                    tracing::debug!(pid, container = %docker::short(&c), "not confirmed yet");
                    d.ask_now(&c); // the next attempt may know
                    if !host {
                        return Err(IdentityError::Unconfirmed { pid, container: c });
                    }
                    (None, None, false)
                }
            },
        };
        // Only a host process's groups are a host user's, for policy.
        let groups = if host { supplementary_groups(&dir).map_err(proc_err)?.into() } else { Arc::default() };
        let id = Identity {
            uid,
            gid,
            pid,
            container_id,
            docker,
            host,
            host_user,
            userns_owner,
            admin: false,
            remote: None,
            groups,
        };
        Ok((id, settled))
    }

    fn check_alive(&self, peer: &Peer) -> Result<(), IdentityError> {
        let Some(fd) = &peer.pidfd else { return Err(IdentityError::Unpinned(peer.pid)) };
        match crate::sys::pidfd_pid(fd) {
            Ok(Some(p)) if p == peer.pid => Ok(()),
            Ok(_) => Err(IdentityError::Gone(peer.pid)),
            Err(source) => Err(IdentityError::Proc { pid: peer.pid, source }),
        }
    }
}

/// Most user namespaces nested (the kernel's limit is 32).
const USERNS_DEPTH: usize = 33;

/// The owner of the outermost user namespace below the broker's on the
/// way from `ns` (a task's `ns/user`) up: the user who made it, however
/// many namespaces it nested inside. None if `ns` is the broker's own or
/// not below it (or cannot be read).
fn outermost_userns_owner(ns: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/user").ok()?;
    let own = (own.dev(), own.ino());
    let id = |f: &std::fs::File| f.metadata().ok().map(|m| (m.dev(), m.ino()));
    let mut cur = std::fs::File::open(ns).ok()?;
    if id(&cur)? == own {
        return None;
    }
    for _ in 0..USERNS_DEPTH {
        let parent = crate::sys::userns_parent(&cur).ok()?;
        if id(&parent)? == own {
            return crate::sys::userns_owner(&cur).ok();
        }
        cur = parent;
    }
    None
}

fn supplementary_groups(proc_dir: &std::path::Path) -> std::io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(proc_dir.join("status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(pidfd: Option<Arc<OwnedFd>>) -> Peer {
        Peer { uid: 0, gid: 0, pid: std::process::id() as i32, pidfd }
    }

    #[test]
    fn this_process_is_a_host_process() {
        let a = Attestor::new("/proc", None);
        let fd = crate::sys::pidfd_open(std::process::id() as i32).ok().map(Arc::new);
        let id = a.attest(&me(fd)).unwrap();
        assert!(id.host);
        assert_eq!(id.container_id, None);
        assert!(id.selectors().contains(&"unix:uid:0".to_owned()));
    }

    #[test]
    fn an_audited_remote_caller_shows_its_subject_and_address_and_a_local_one_does_not() {
        let subject = crate::config::parse_subject("CN=ops,O=Example");
        let id = Identity::remote(subject, Some("192.0.2.7:4431".parse().unwrap()));
        let json = serde_json::to_value(&id).unwrap();
        assert_eq!(json["remote"], "CN=ops,O=Example from 192.0.2.7:4431", "as before 0.2: {json}");
        assert_eq!(json["subject"], "CN=ops,O=Example");
        assert_eq!(json["address"], "192.0.2.7:4431");
        assert_eq!((json["uid"].as_u64(), json["admin"].as_bool()), (Some(0), Some(false)));
        let unread = serde_json::to_value(Identity::remote(Err("no client certificate".into()), None)).unwrap();
        assert_eq!(unread["remote"], "no client certificate from an unknown address");
        assert!(unread.get("subject").is_none() && unread.get("address").is_none(), "{unread}");
        let local = serde_json::to_string(&Identity::unattested(1000, 1000, 42)).unwrap();
        assert_eq!(local, r#"{"uid":1000,"gid":1000,"pid":42,"host":false,"admin":false}"#, "as ever");
        let remote = serde_json::to_string(&Identity::remote(Err("x".into()), None)).unwrap();
        assert_eq!(
            remote,
            r#"{"uid":0,"gid":0,"pid":0,"host":false,"admin":false,"remote":"x from an unknown address"}"#
        );
    }

    #[test]
    fn pid_zero_is_refused() {
        let a = Attestor::new("/proc", None);
        let p = Peer { pid: 0, ..me(None) };
        assert!(matches!(a.attest(&p), Err(IdentityError::NoPid)));
    }

    #[test]
    fn an_exited_process_is_not_attested() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let fd = Arc::new(crate::sys::pidfd_open(pid).unwrap());
        child.wait().unwrap();
        let a = Attestor::new("/proc", None);
        let p = Peer { uid: 0, gid: 0, pid, pidfd: Some(fd) };
        assert!(matches!(a.attest(&p), Err(IdentityError::Gone(_))));
    }

    /// This thread's tid, from /proc/thread-self -> "<pid>/task/<tid>".
    fn tid() -> i32 {
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn a_task_is_remembered_while_it_lives_and_forgotten_when_it_exits() {
        let a = Attestor::new("/proc", None);
        let t = std::thread::scope(|s| {
            s.spawn(|| {
                let t = tid();
                let first = a.attest_task(t, 0, 0).unwrap();
                assert!(a.tasks.lock().unwrap().get(t).is_some(), "a live task is remembered");
                // Served from memory: same facts, this request's uid and gid.
                let again = a.attest_task(t, 1000, 1000).unwrap();
                assert_eq!((again.host, &again.container_id), (first.host, &first.container_id));
                assert_eq!((again.uid, again.gid, again.admin), (1000, 1000, false), "policy decides admin");
                assert_eq!(again.groups, first.groups, "the facts policy decides by are remembered too");
                let cfg = crate::config::AdminPolicy { uids: vec![1000], ..Default::default() };
                assert!(crate::policy::admin::is_admin(&again, &cfg));
                assert!(!crate::policy::admin::is_admin(&a.attest_task(t, 1001, 1001).unwrap(), &cfg));
                t
            })
            .join()
            .unwrap()
        });
        // The thread is gone: its pidfd says so, and /proc has no such task.
        assert!(a.attest_task(t, 0, 0).is_err(), "an exited task was attested from memory");
        assert!(a.tasks.lock().unwrap().get(t).is_none());
    }

    /// A stand-in for a task's pidfd (any fd will do for the cache).
    fn some_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn known(at: Instant) -> Known {
        Known {
            pidfd: some_fd(),
            container_id: None,
            docker: None,
            host: true,
            host_user: true,
            userns_owner: None,
            groups: Arc::default(),
            at,
        }
    }

    #[test]
    fn the_task_cache_drops_expired_tasks_on_insert_and_never_holds_more_than_its_cap() {
        let mut t = Tasks::default();
        let start = Instant::now();
        // A burst: 5,000 distinct tasks within a moment hold at most KNOWN_MAX fds.
        for tid in 0..5000 {
            t.insert(tid, known(start));
            assert!(t.len() <= KNOWN_MAX && t.order.len() <= KNOWN_MAX);
        }
        assert_eq!(t.len(), KNOWN_MAX);
        assert!(t.get(4999).is_some() && t.get(0).is_none(), "the newest are kept");
        // One insert after KNOWN_FOR drops every expired one.
        t.insert(9999, known(start + KNOWN_FOR));
        assert_eq!(t.len(), 1);
        assert!(t.get(9999).is_some());
        // A task remembered again keeps its newer entry when the older expires.
        let mut t = Tasks::default();
        t.insert(1, known(start));
        t.insert(1, known(start + KNOWN_FOR / 2));
        t.insert(2, known(start + KNOWN_FOR + KNOWN_FOR / 4));
        assert!(t.get(1).is_some(), "the newer entry of task 1 was dropped with its stale one");
        assert_eq!(t.order.len(), 2);
    }

    /// A /proc tree under a temp dir: the broker (`self`) on the host in
    /// namespaces pid:[100] and mnt:[200]; container `ID` whose init (this
    /// test process, so it can be pinned) has pid:[300] and mnt:[400];
    /// container `PIDHOST` started with `--pid host` (init: a child
    /// process) with the host's pid:[100] and its own mnt:[500].
    struct Tree {
        dir: tempfile::TempDir,
        rt: tokio::runtime::Runtime,
        docker: Arc<docker::DockerCache>,
        init: std::process::Child,
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = self.init.kill();
            let _ = self.init.wait();
        }
    }

    const ID: &str = docker::tests::ID;
    const PIDHOST: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const UNKNOWN: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let root = dir.path();
            std::fs::create_dir_all(root.join("self/ns")).unwrap();
            std::fs::write(root.join("self/cgroup"), "0::/system.slice/keyhole.service\n").unwrap();
            std::os::unix::fs::symlink("pid:[100]", root.join("self/ns/pid")).unwrap();
            std::os::unix::fs::symlink("mnt:[200]", root.join("self/ns/mnt")).unwrap();
            std::os::unix::fs::symlink("user:[1]", root.join("self/ns/user")).unwrap();
            let me = std::process::id() as i32;
            docker::tests::proc_entry(root, me, &format!("0::/docker/{ID}\n"), "pid:[300]", "mnt:[400]");
            let init = std::process::Command::new("sleep").arg("60").spawn().unwrap();
            let init_pid = init.id() as i32;
            docker::tests::proc_entry(root, init_pid, &format!("0::/docker/{PIDHOST}\n"), "pid:[100]", "mnt:[500]");
            let docker = docker::DockerCache::for_tests(root, rt.handle().clone());
            let mut pidhost = docker::tests::exported(init_pid, "pid:[100]", "mnt:[500]");
            pidhost.id = PIDHOST.into();
            let handed = vec![docker::tests::exported(me, "pid:[300]", "mnt:[400]"), pidhost];
            assert_eq!(docker.import(handed), 2);
            Tree { dir, rt, docker, init }
        }

        /// A caller task `tid` in `cgroup`, in the given namespaces.
        fn task(&self, tid: i32, cgroup: &str, pid_ns: &str, mnt_ns: &str) -> i32 {
            docker::tests::proc_entry(self.dir.path(), tid, cgroup, pid_ns, mnt_ns);
            tid
        }

        fn attestor(&self, docker: bool) -> Attestor {
            let d = docker.then(|| self.docker.clone());
            Attestor::new(self.dir.path(), d).with_cgroup_mounts(cgroup::CgroupMounts::default())
        }
    }

    /// Fake tids, far above any real pid (so nothing pins them).
    const T: i32 = 1 << 30;

    #[test]
    fn a_container_is_its_claim_only_in_its_inits_namespaces() {
        let tree = Tree::new();
        let a = tree.attestor(true);
        // In the container (its init, or `docker exec`): the container.
        let t = tree.task(T, &format!("0::/docker/{ID}\n"), "pid:[300]", "mnt:[400]");
        let id = a.attest_task(t, 0, 0).unwrap();
        assert_eq!(id.container_id.as_deref(), Some(ID));
        assert_eq!(id.docker.as_ref().map(|d| d.name.as_str()), Some("web"));
        assert!(!id.host && !id.admin);
        assert!(id.selectors().contains(&format!("docker:id:{ID}")));
        assert!(a.pending(t).is_none(), "a known container needs no wait");
        // The same claim from any other namespaces is refused.
        for (n, (p, m)) in
            [("pid:[100]", "mnt:[200]"), ("pid:[300]", "mnt:[999]"), ("pid:[999]", "mnt:[400]")].iter().enumerate()
        {
            let t = tree.task(T + 1 + n as i32, &format!("0::/docker/{ID}\n"), p, m);
            assert!(matches!(a.attest_task(t, 0, 0), Err(IdentityError::NotInContainer { .. })), "{p} {m}");
        }
    }

    #[test]
    fn a_host_user_is_in_no_container_and_in_the_hosts_pid_ns_or_a_user_ns_of_its_own() {
        let tree = Tree::new();
        let a = tree.attestor(true);
        let host_cg = "0::/user.slice/user-1000.slice/session-1.scope\n";
        let user = |t: i32, ns: &str| {
            std::os::unix::fs::symlink(ns, tree.dir.path().join(t.to_string()).join("ns/user")).unwrap();
            t
        };
        let cases = [
            // (pid ns, mnt ns, user ns, host user?)
            ("pid:[100]", "mnt:[200]", "user:[1]", true),  // the host
            ("pid:[100]", "mnt:[999]", "user:[1]", true),  // `unshare -m`, PrivateTmp
            ("pid:[100]", "mnt:[999]", "user:[2]", true),  // `unshare -U -r -m`
            ("pid:[998]", "mnt:[999]", "user:[2]", true),  // `unshare -U -r -p -f`, flatpak
            ("pid:[998]", "mnt:[999]", "user:[1]", false), // root's `unshare -p`, another runtime
        ];
        for (n, (p, m, u, want)) in cases.into_iter().enumerate() {
            let t = user(tree.task(T + 50 + n as i32, host_cg, p, m), u);
            let id = a.attest_task(t, 0, 0).unwrap();
            assert_eq!(id.host_user, want, "{p} {m} {u}");
            assert_eq!(a.attest_task(t, 0, 0).unwrap().host_user, want, "remembered");
        }
        // A container, whatever its user namespace, is no host user.
        for (n, u) in ["user:[1]", "user:[3]"].into_iter().enumerate() {
            let t = user(tree.task(T + 60 + n as i32, &format!("0::/docker/{ID}\n"), "pid:[300]", "mnt:[400]"), u);
            let id = a.attest_task(t, 0, 0).unwrap();
            assert!(id.container_id.is_some() && !id.host_user, "{u}");
        }
    }

    #[test]
    fn a_pid_host_container_is_itself_and_not_the_host() {
        let tree = Tree::new();
        let a = tree.attestor(true);
        let t = tree.task(T + 10, &format!("0::/docker/{PIDHOST}\n"), "pid:[100]", "mnt:[500]");
        let id = a.attest_task(t, 0, 0).unwrap();
        assert_eq!(id.container_id.as_deref(), Some(PIDHOST));
        assert!(!id.host && !id.admin, "a --pid host container is not a host process");
        // A host process claiming it: the host's mount namespace gives it away.
        let t = tree.task(T + 11, &format!("0::/docker/{PIDHOST}\n"), "pid:[100]", "mnt:[200]");
        assert!(matches!(a.attest_task(t, 0, 0), Err(IdentityError::NotInContainer { .. })));
    }

    #[test]
    fn a_delegated_claim_is_ignored() {
        let tree = Tree::new();
        let a = tree.attestor(true);
        let cg = format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope\n");
        let t = tree.task(T + 20, &cg, "pid:[100]", "mnt:[200]");
        let id = a.attest_task(t, 0, 0).unwrap();
        assert_eq!(id.container_id, None);
        assert!(id.docker.is_none() && id.host, "a host process, as it is");
        assert!(a.pending(t).is_none(), "nobody asks Docker about a delegated claim");
        // Owned by a user, under a configured cgroup root.
        let fixed = cgroup::CgroupMounts::fixed(Some(tree.dir.path()), &[]);
        std::fs::create_dir_all(tree.dir.path().join(format!("mine/docker-{ID}.scope"))).unwrap();
        std::os::unix::fs::chown(tree.dir.path().join("mine"), Some(65534), None).unwrap();
        let a = tree.attestor(true).with_cgroup_mounts(fixed);
        let t = tree.task(T + 21, &format!("0::/mine/docker-{ID}.scope\n"), "pid:[300]", "mnt:[400]");
        let id = a.attest_task(t, 65534, 65534).unwrap();
        assert_eq!(id.container_id, None, "even in the container's namespaces, a delegated claim is not taken");
    }

    #[test]
    fn an_unconfirmed_claim_is_refused_at_once_and_worth_waiting_for() {
        let tree = Tree::new();
        let a = tree.attestor(true);
        let t = tree.task(T + 30, &format!("0::/docker/{UNKNOWN}\n"), "pid:[600]", "mnt:[700]");
        let started = Instant::now();
        assert!(matches!(a.attest_task(t, 0, 0), Err(IdentityError::Unconfirmed { .. })));
        assert!(started.elapsed() < Duration::from_millis(200), "attest_task waited");
        let wait = a.pending(t).expect("the inspect is worth waiting for");
        tree.rt.block_on(wait);
        // Docker did not answer: no container facts, and no docker:id.
        let id = a.attest_task(t, 0, 0).unwrap();
        assert_eq!(id.container_id, None);
        assert!(!id.host);
        assert!(!id.selectors().iter().any(|s| s.starts_with("docker:")));
        assert!(a.pending(t).is_none(), "the negative answer is cached");
    }

    #[test]
    fn without_docker_no_container_is_ever_claimed() {
        let tree = Tree::new();
        let a = tree.attestor(false);
        let t = tree.task(T + 40, &format!("0::/docker/{ID}\n"), "pid:[300]", "mnt:[400]");
        let id = a.attest_task(t, 0, 0).unwrap();
        assert_eq!(id.container_id, None);
        assert!(!id.host);
        assert!(!id.selectors().iter().any(|s| s.starts_with("docker:")));
        assert!(a.pending(t).is_none());
    }

    #[test]
    fn the_log_throttle_lets_one_line_a_second_through() {
        let t = Throttle::default();
        assert_eq!(t.allow(), Some(0));
        // (A second may tick over in between: then one more passes.)
        let passed = (0..100).filter_map(|_| t.allow()).collect::<Vec<_>>();
        assert!(passed.len() <= 1, "{passed:?}");
    }
}
