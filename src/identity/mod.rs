//! Who is calling.
//!
//! Three steps, kept apart: the kernel tells us the peer of a connection
//! (uid, gid, pid at connect time, and a pidfd pinning that process —
//! [`Peer`]); the [`Attestor`] turns the pinned process into facts (its
//! container, whether it is a host process — [`Identity`]); and policy
//! decides what those facts may do. Attestation re-checks the pidfd after
//! reading `/proc`, so a process that exited and had its pid reused is
//! never attested as the newcomer.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod docker;

use std::collections::HashMap;
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::AdminPolicy;
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
    pub admin: bool,
    /// A remote admin client: its certificate subject and address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

fn name_only<S: serde::Serializer>(d: &Option<Arc<ContainerInfo>>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_ref().map_or("", |d| d.name.as_str()))
}

impl Identity {
    pub fn selectors(&self) -> Vec<String> {
        let mut s = vec![format!("unix:uid:{}", self.uid), format!("unix:gid:{}", self.gid)];
        if let Some(id) = &self.container_id {
            s.push(format!("docker:id:{id}"));
        }
        if let Some(d) = &self.docker {
            s.push(format!("docker:name:{}", d.name));
            s.push(format!("docker:image:{}", d.image));
            s.extend(d.labels.iter().map(|(k, v)| format!("docker:label:{k}={v}")));
        }
        s
    }
}

/// Turns peers into identities by reading `/proc` under `proc_root`, and
/// asking Docker about containers.
#[derive(Debug)]
pub struct Attestor {
    proc_root: PathBuf,
    admin: AdminPolicy,
    own_pid_ns: Option<PathBuf>,
    own_mnt_ns: Option<PathBuf>,
    /// The container the broker itself runs in (a compose sidecar), if any.
    own_container: Option<String>,
    docker: Option<Arc<docker::DockerCache>>,
    /// FUSE callers seen lately (see [`Attestor::attest_task`]).
    tasks: Mutex<HashMap<i32, Known>>,
}

/// What a task cannot change about itself while it lives (its container,
/// its namespaces), pinned by a pidfd so a recycled tid never inherits it.
/// uid and gid are not kept: every FUSE request carries them afresh.
struct Known {
    pidfd: OwnedFd,
    container_id: Option<String>,
    docker: Option<Arc<ContainerInfo>>,
    host: bool,
    groups: Vec<u32>,
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
/// Most FUSE callers remembered at once.
const KNOWN_MAX: usize = 4096;

impl Attestor {
    pub fn new(proc_root: impl Into<PathBuf>, admin: AdminPolicy, docker: Option<Arc<docker::DockerCache>>) -> Self {
        let proc_root = proc_root.into();
        let own = |ns: &str| std::fs::read_link(proc_root.join("self/ns").join(ns)).ok();
        let own_container = std::fs::read_to_string(proc_root.join("self/cgroup"))
            .ok()
            .and_then(|c| cgroup::container_id(&c).ok().flatten());
        Self {
            own_pid_ns: own("pid"),
            own_mnt_ns: own("mnt"),
            own_container,
            proc_root,
            admin,
            docker,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// A socket peer: read `/proc`, then prove with the pidfd that the
    /// process read about is still the peer. Blocks (Docker lookups).
    pub fn attest(&self, peer: &Peer) -> Result<Identity, IdentityError> {
        if peer.pid <= 0 {
            return Err(IdentityError::NoPid);
        }
        self.check_alive(peer)?;
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
    pub fn attest_task(&self, tid: i32, uid: u32, gid: u32) -> Result<Identity, IdentityError> {
        if tid <= 0 {
            return Err(IdentityError::NoPid);
        }
        {
            let mut tasks = self.tasks.lock().expect("tasks lock");
            if let Some(k) = tasks.get(&tid) {
                if k.at.elapsed() < KNOWN_FOR && !crate::sys::pidfd_exited(&k.pidfd) {
                    return Ok(Identity {
                        uid,
                        gid,
                        pid: tid,
                        container_id: k.container_id.clone(),
                        docker: k.docker.clone(),
                        host: k.host,
                        admin: k.host && self.admin.allows(uid, gid, &k.groups),
                        remote: None,
                    });
                }
                tasks.remove(&tid);
            }
        }
        // Pin first, read /proc, then check the pin: the facts are the task's.
        let pidfd = crate::sys::pidfd_open_task(tid).ok();
        let (id, groups) = self.describe(tid, uid, gid)?;
        // A container Docker cannot describe yet is asked about again.
        let settled = id.container_id.is_none() || id.docker.is_some() || self.docker.is_none();
        if let Some(pidfd) = pidfd.filter(|p| settled && !crate::sys::pidfd_exited(p)) {
            let mut tasks = self.tasks.lock().expect("tasks lock");
            if tasks.len() >= KNOWN_MAX {
                tasks.retain(|_, k| k.at.elapsed() < KNOWN_FOR);
                if tasks.len() >= KNOWN_MAX {
                    tasks.clear();
                }
            }
            let known = Known {
                pidfd,
                container_id: id.container_id.clone(),
                docker: id.docker.clone(),
                host: id.host,
                groups,
                at: Instant::now(),
            };
            tasks.insert(tid, known);
        }
        Ok(id)
    }

    /// The identity, and the supplementary groups it was judged by.
    fn describe(&self, pid: i32, uid: u32, gid: u32) -> Result<(Identity, Vec<u32>), IdentityError> {
        let dir = self.proc_root.join(pid.to_string());
        let proc_err = |source| IdentityError::Proc { pid, source };
        let cgroup_file = std::fs::read_to_string(dir.join("cgroup")).map_err(proc_err)?;
        let container_id =
            cgroup::container_id(&cgroup_file).map_err(|source| IdentityError::Cgroup { pid, source })?;
        let same_ns = |ns: &str, own: &Option<PathBuf>| -> Result<bool, IdentityError> {
            let theirs = std::fs::read_link(dir.join("ns").join(ns)).map_err(proc_err)?;
            Ok(own.as_ref() == Some(&theirs))
        };
        // "Host" is where the broker is: its pid and mount namespaces, and
        // its container (none, or the sidecar's own for `docker exec`).
        let host = container_id == self.own_container
            && same_ns("pid", &self.own_pid_ns)?
            && same_ns("mnt", &self.own_mnt_ns)?;
        let groups = if host { supplementary_groups(&dir).map_err(proc_err)? } else { Vec::new() };
        let admin = host && self.admin.allows(uid, gid, &groups);
        let docker = match (&container_id, &self.docker) {
            (Some(c), Some(d)) => d.lookup_blocking(c),
            _ => None,
        };
        Ok((Identity { uid, gid, pid, container_id, docker, host, admin, remote: None }, groups))
    }

    // STUB: replaced by the identity branch
    /// Whether a FUSE request of
    /// task `tid` must wait for something (its container's inspect) before
    /// it is answered: a future that completes when it may go on.
    pub fn pending(
        &self,
        tid: i32,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>> {
        let _ = tid;
        None
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
        let a = Attestor::new("/proc", AdminPolicy::default(), None);
        let fd = crate::sys::pidfd_open(std::process::id() as i32).ok().map(Arc::new);
        let id = a.attest(&me(fd)).unwrap();
        assert!(id.host);
        assert_eq!(id.container_id, None);
        assert!(id.selectors().contains(&"unix:uid:0".to_owned()));
    }

    #[test]
    fn pid_zero_is_refused() {
        let a = Attestor::new("/proc", AdminPolicy::default(), None);
        let p = Peer { pid: 0, ..me(None) };
        assert!(matches!(a.attest(&p), Err(IdentityError::NoPid)));
    }

    #[test]
    fn an_exited_process_is_not_attested() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let fd = Arc::new(crate::sys::pidfd_open(pid).unwrap());
        child.wait().unwrap();
        let a = Attestor::new("/proc", AdminPolicy::default(), None);
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
        let a = Attestor::new("/proc", AdminPolicy { uids: vec![1000], ..AdminPolicy::default() }, None);
        let t = std::thread::scope(|s| {
            s.spawn(|| {
                let t = tid();
                let first = a.attest_task(t, 0, 0).unwrap();
                assert!(a.tasks.lock().unwrap().contains_key(&t), "a live task is remembered");
                // Served from memory: same facts, this request's uid and gid.
                let again = a.attest_task(t, 1000, 1000).unwrap();
                assert_eq!((again.host, again.container_id), (first.host, first.container_id));
                assert_eq!((again.uid, again.gid, again.admin), (1000, 1000, true));
                assert!(!a.attest_task(t, 1001, 1001).unwrap().admin);
                t
            })
            .join()
            .unwrap()
        });
        // The thread is gone: its pidfd says so, and /proc has no such task.
        assert!(a.attest_task(t, 0, 0).is_err(), "an exited task was attested from memory");
        assert!(!a.tasks.lock().unwrap().contains_key(&t));
    }
}
