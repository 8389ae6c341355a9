//! The FUSE mounts: one per workload under `<run-dir>/workloads/<name>`,
//! and one per container mount of a Docker volume under
//! `<run-dir>/volumes/<mount-id>`.
//!
//! [`MountTable::sync`] makes the mounts and their contents match the
//! store: it mounts new workloads, unmounts removed ones, swaps in each
//! mount's new view, and invalidates the kernel's entries for every file
//! that changed or went. A change touches only the mounts it affects:
//! [`MountTable::secret_changed`] finds the mounts that show a secret in
//! an index of every mount's grants (exact paths and prefixes), and
//! [`MountTable::workload_changed`] redoes one workload's mounts after a
//! change of its policy. Each runs before the admin call returns, so a
//! rotate, grant or revoke is visible on the next open.
//!
//! # Surviving restarts
//!
//! Docker binds the topmost mount at a path: a container started while a
//! workload is mounted holds a bind of *that FUSE mount*, a slave of its
//! peer group — not of the run dir. Unmounting it would orphan the
//! container's copy for good. So a broker never unmounts a live workload's
//! mount: on shutdown it leaves it (dead: `ENOTCONN` until it is back),
//! and on start it mounts the new session *on top of* the old one. A mount
//! made on a mount's root propagates to that mount's slaves, so every
//! running container sees the new session at once. Only the mounts of
//! removed workloads are detached.
//!
//! Requests of every mount are served by one fixed pool of workers
//! ([`pool`]); a mount only adds its connection to the pool.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the types ([`Catalog`], [`MountKey`], [`MountTable`]) and the entry points of a change |
//! | `kernel.rs` | mounting and detaching, `/proc/*/mountinfo` |
//! | `index.rs` | which mounts show what (by exact path, prefix and workload) |
//! | `view.rs` | building and patching what a mount shows, bringing mounts up to date |
//! | `notices.rs` | invalidation notices to the kernel, rotation notices to containers |
//! | `handover.rs` | quiescing, the state handed to a successor, adopting a predecessor's mounts |
//! | `pool.rs` | the FUSE workers that serve every mount |
//! | `workload.rs` | one mount's filesystem (a view, its nodes, the requests) |
//! | `access.rs` | who may open what |
//! | `leased.rs` | each caller's own inode of a leased file (never another's cached pages) |

pub mod access;
mod handover;
mod index;
mod kernel;
pub mod leased;
pub mod lifecycle;
mod notices;
pub mod pool;
mod view;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::backend::VersionMeta;
use crate::backend::vault::Health;
use crate::policy::{Grant, Target, Workload};
use crate::secret::SecretBytes;
use index::Mounts;
use pool::{Conn, Pool};
use view::{Memo, Values};
use workload::{FsShared, ROOT, WorkloadFs};

pub use handover::MountState;
pub(crate) use kernel::{mount_points, peer_group};
pub use notices::Notice;

/// Where the mounts learn what to show. Implemented by the broker, which
/// routes each path to the local store or a backend's cache. No method
/// may wait on the network.
pub trait Catalog {
    fn workloads(&self) -> anyhow::Result<Vec<Workload>>;
    fn grants(&self, workload: &str) -> anyhow::Result<Vec<Grant>>;
    /// The secrets `target` covers now, with their current version. A
    /// granted secret whose value is not here yet has version 0.
    fn covered(&self, target: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>>;
    /// The value of `path` at `meta.version`.
    fn load(&self, path: &str, meta: &VersionMeta) -> anyhow::Result<Loaded>;
    /// The current version of the secret at `path`, if there is one (as
    /// a prefix grant would find it: a Vault secret not fetched is none).
    fn current(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        let target = Target::Exact(crate::secret::SecretPath::parse(path)?);
        Ok(self.covered(&target)?.into_iter().find(|(s, m)| s == path && m.version != 0).map(|(_, m)| m))
    }
    /// One workload, if it exists.
    fn workload(&self, name: &str) -> anyhow::Result<Option<Workload>> {
        Ok(self.workloads()?.into_iter().find(|w| w.name == name))
    }
    /// The Docker volume mounts that should exist (see `docker::plugin`).
    fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>>;
}

/// A container's mount of a keyhole Docker volume: its own FUSE mount,
/// showing the workload's grants, files owned by `uid`/`gid` unless the
/// grant says otherwise, and `mode` (if set) on every file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeMount {
    /// Docker's opaque mount id.
    pub id: String,
    pub volume: String,
    pub workload: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    /// The container being started when Docker asked for this mount, if
    /// Docker could tell: its user owns the files (see `workload::Owner`).
    pub container: Option<String>,
}

/// Which mount: a workload's, or a container's mount of a volume.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum MountKey {
    Workload(String),
    Volume(String),
}

/// How one mount shows its files.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Shape {
    workload: Workload,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    volume: Option<String>,
    container: Option<String>,
}

/// A value for a node; `value` is None while a remote backend has not
/// delivered it, and `health` tells how fresh a remote value is.
#[derive(Clone)]
pub struct Loaded {
    pub value: Option<Arc<SecretBytes>>,
    pub health: Option<Arc<Health>>,
    /// For a template's file: the render's inputs, or why it failed.
    pub template: Option<Arc<crate::template::Rendering>>,
}

/// Largest read the kernel may ask for (values are at most 16 MiB, but a
/// page-sized read is the common case).
const MAX_READ: usize = 128 * 1024;

struct Mount {
    shape: Shape,
    fs: Arc<WorkloadFs>,
    /// The kernel connection (its /dev/fuse fd) and the server answering it.
    conn: Arc<Conn>,
    /// Whether the pool serves it (an adopted mount waits for its first
    /// sync).
    served: bool,
    /// The workload's grants as the view was last built (in the index).
    grants: Vec<Grant>,
    /// Every secret those grants covered then, with its version.
    secrets: BTreeMap<String, VersionMeta>,
}

/// One mount's row in `keyhole mounts`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MountInfo {
    pub workload: String,
    /// For a container's mount of a Docker volume: the volume.
    pub volume: Option<String>,
    pub path: PathBuf,
    pub files: Vec<String>,
}

pub struct MountTable {
    run_dir: PathBuf,
    /// Mount points under `dir` that a previous broker left behind.
    leftovers: Mutex<Vec<PathBuf>>,
    shared: Arc<FsShared>,
    /// The workers that serve every mount.
    pool: Arc<Pool>,
    mounts: Mutex<Mounts>,
    next_ino: AtomicU64,
    /// The values the mounts show, shared across changes.
    values: Values,
    /// Serializes syncs and the lifecycle's moves: each one sees the
    /// store after the previous, and no change is half applied when the
    /// mounts stop taking changes (see [`lifecycle`]).
    sync_lock: Mutex<()>,
}

impl std::fmt::Debug for MountTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountTable").field("run_dir", &self.run_dir).finish_non_exhaustive()
    }
}

impl MountTable {
    /// Prepare `<run_dir>/workloads` and `<run_dir>/volumes` (see
    /// [`kernel::prepare_run_dir`]) and start the workers.
    pub fn new(run_dir: &Path, shared: Arc<FsShared>) -> anyhow::Result<Self> {
        let leftovers = kernel::prepare_run_dir(run_dir)?;
        let pool = Pool::start(shared.clone(), pool::default_size())?;
        Ok(MountTable {
            run_dir: run_dir.to_owned(),
            leftovers: Mutex::new(leftovers),
            shared,
            pool,
            mounts: Mutex::default(),
            next_ino: AtomicU64::new(ROOT + 1),
            values: Values::default(),
            sync_lock: Mutex::default(),
        })
    }

    pub fn path_of(&self, key: &MountKey) -> PathBuf {
        match key {
            MountKey::Workload(name) => self.run_dir.join("workloads").join(name),
            MountKey::Volume(id) => self.run_dir.join("volumes").join(id),
        }
    }

    /// Make every mount match the store (at start, after a takeover, and
    /// for changes that may touch any mount). Returns the rotations to
    /// announce.
    pub fn sync(&self, cat: &impl Catalog) -> anyhow::Result<Vec<Notice>> {
        let mut notices = Vec::new();
        let _serial = self.sync_lock.lock().expect("sync lock");
        if !self.state().applies_changes() {
            return Ok(notices);
        }
        let cat = &Memo::sharing(cat, &self.values);
        let wanted = Self::wanted(cat)?;
        let mut mounts = self.mounts.lock().expect("mounts lock");
        // Leftovers that nothing wants any more have no one to serve them.
        let wanted_paths: BTreeSet<PathBuf> = wanted.keys().map(|k| self.path_of(k)).collect();
        let all: BTreeSet<MountKey> = mounts.by_key.keys().cloned().collect();
        let gone: BTreeSet<MountKey> = all.iter().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        // Unmount first: a leftover below a gone mount is detached too.
        self.reconcile(cat, &mut mounts, gone, BTreeMap::new(), &mut notices);
        self.leftovers.lock().expect("leftovers lock").retain(|p| {
            let keep = wanted_paths.contains(p);
            if !keep {
                tracing::info!(path = %p.display(), "detached a mount nothing serves any more");
                Self::detach_all(p);
                let _ = std::fs::remove_dir(p);
            }
            keep
        });
        self.reconcile(cat, &mut mounts, all, wanted, &mut notices);
        Ok(notices)
    }

    /// After a change of one workload's policy (the workload added or
    /// removed, a grant or revoke): its own mount and its volumes'
    /// mounts are made, remade or unmounted, and rebuilt; no other mount
    /// is looked at. Returns the rotations to announce.
    pub fn workload_changed(&self, cat: &impl Catalog, name: &str) -> anyhow::Result<Vec<Notice>> {
        let mut notices = Vec::new();
        let _serial = self.sync_lock.lock().expect("sync lock");
        if !self.state().applies_changes() {
            return Ok(notices);
        }
        let cat = &Memo::sharing(cat, &self.values);
        let workload = cat.workload(name)?;
        let mut wanted = BTreeMap::new();
        if let Some(w) = &workload {
            wanted.insert(MountKey::Workload(name.to_owned()), Self::workload_shape(w.clone()));
        }
        for v in cat.volume_mounts()?.into_iter().filter(|v| v.workload == name) {
            wanted.insert(MountKey::Volume(v.id.clone()), Self::volume_shape(v, workload.clone()));
        }
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let scope = mounts.of_workload(name);
        self.reconcile(cat, &mut mounts, scope, wanted, &mut notices);
        Ok(notices)
    }

    /// After a change of secrets' values (put, rotate, rm, a backend's
    /// news): only the mounts whose grants cover one of `paths` (by the
    /// index) are rebuilt, each read of the store made once for all of
    /// them. Returns the rotations to announce.
    pub fn secret_changed(&self, cat: &impl Catalog, paths: &[String]) -> anyhow::Result<Vec<Notice>> {
        let mut notices = Vec::new();
        let _serial = self.sync_lock.lock().expect("sync lock");
        if !self.state().applies_changes() || paths.is_empty() {
            return Ok(notices);
        }
        self.values.forget(paths);
        let cat = &Memo::sharing(cat, &self.values);
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let Mounts { by_key, index } = &mut *mounts;
        let touched = index.showing(paths);
        Self::invalidating(touched.len(), |inval| {
            for key in touched {
                let Some(m) = by_key.get_mut(key) else { continue };
                if let Err(e) = self.update_secrets(cat, key, m, paths, &mut notices, inval) {
                    tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot update mount");
                }
            }
        });
        Ok(notices)
    }

    /// How many mounts there are.
    pub fn count(&self) -> usize {
        self.mounts.lock().expect("mounts lock").by_key.len()
    }

    /// The workload a mount shows, if the mount exists.
    pub fn workload_of(&self, key: &MountKey) -> Option<String> {
        self.mounts.lock().expect("mounts lock").by_key.get(key).map(|m| m.shape.workload.name.clone())
    }

    pub fn list(&self) -> Vec<MountInfo> {
        let mounts = self.mounts.lock().expect("mounts lock");
        mounts
            .by_key
            .iter()
            .map(|(key, m)| MountInfo {
                workload: m.fs.workload.name.clone(),
                volume: m.shape.volume.clone(),
                path: self.path_of(key),
                files: m.fs.view().by_name.keys().cloned().collect(),
            })
            .collect()
    }
}
