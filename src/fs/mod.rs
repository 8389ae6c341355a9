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

pub mod access;
pub mod pool;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use fuse_backend_rs::transport::FuseDevWriter;

use crate::backend::VersionMeta;
use crate::backend::vault::Health;
use crate::policy::{Grant, Target, Workload, files_for};
use crate::secret::SecretBytes;
use pool::{Conn, Pool};
use workload::{FsShared, Node, ROOT, Swapped, View, WorkloadFs};

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

/// A rotation that some containers asked to hear about (`grant --notify`,
/// `--restart`, `--exec`).
pub struct Notice {
    pub fs: Arc<WorkloadFs>,
    pub secret: String,
    pub version: u64,
    pub signal: Option<String>,
    pub on_change: crate::actions::OnChange,
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

/// One sync's view of a [`Catalog`]: what a target covers and each value
/// are read once however many mounts show them, and the mounts share the
/// loaded value — with the mounts made by earlier changes too, through
/// [`Values`].
struct Memo<'a, C> {
    cat: &'a C,
    values: Option<&'a Values>,
    covered: std::cell::RefCell<BTreeMap<Target, Vec<(String, VersionMeta)>>>,
    current: std::cell::RefCell<BTreeMap<String, Option<VersionMeta>>>,
    loaded: std::cell::RefCell<HashMap<String, Vec<(u64, Loaded)>>>,
}

impl<'a, C: Catalog> Memo<'a, C> {
    fn new(cat: &'a C) -> Self {
        Memo { cat, values: None, covered: Default::default(), current: Default::default(), loaded: Default::default() }
    }

    /// A memo that shares values with the mounts through `values`.
    fn sharing(cat: &'a C, values: &'a Values) -> Self {
        Memo { values: Some(values), ..Self::new(cat) }
    }

    /// The version of `path` that `target` covers now, if it covers it
    /// (as [`Catalog::covered`] would list it, without copying the list).
    fn version_in(&self, target: &Target, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        let find = |c: &[(String, VersionMeta)]| c.iter().find(|(s, _)| s == path).map(|(_, m)| m.clone());
        if let Some(c) = self.covered.borrow().get(target) {
            return Ok(find(c));
        }
        let c = self.cat.covered(target)?;
        let found = find(&c);
        self.covered.borrow_mut().insert(target.clone(), c);
        Ok(found)
    }
}

impl<C: Catalog> Catalog for Memo<'_, C> {
    fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
        self.cat.workloads()
    }

    fn grants(&self, workload: &str) -> anyhow::Result<Vec<Grant>> {
        self.cat.grants(workload)
    }

    fn covered(&self, target: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>> {
        if let Some(c) = self.covered.borrow().get(target) {
            return Ok(c.clone());
        }
        let c = self.cat.covered(target)?;
        self.covered.borrow_mut().insert(target.clone(), c.clone());
        Ok(c)
    }

    fn current(&self, path: &str) -> anyhow::Result<Option<VersionMeta>> {
        if let Some(c) = self.current.borrow().get(path) {
            return Ok(c.clone());
        }
        let c = self.cat.current(path)?;
        self.current.borrow_mut().insert(path.to_owned(), c.clone());
        Ok(c)
    }

    fn workload(&self, name: &str) -> anyhow::Result<Option<Workload>> {
        self.cat.workload(name)
    }

    fn load(&self, path: &str, meta: &VersionMeta) -> anyhow::Result<Loaded> {
        let hit = self.loaded.borrow().get(path).and_then(|v| v.iter().find(|(n, _)| *n == meta.version).cloned());
        if let Some((_, l)) = hit {
            return Ok(l);
        }
        // A template's render carries its inputs (for the audit): not shared.
        let templated = path.starts_with(crate::secret::TEMPLATE_PREFIX);
        let shared = self.values.filter(|_| !templated).and_then(|v| v.get(path, meta));
        let l = match shared {
            Some(value) => Loaded { value: Some(value), health: None, template: None },
            None => {
                let l = self.cat.load(path, meta)?;
                if let (Some(v), Some(value), None, false) = (self.values, &l.value, &l.health, templated) {
                    v.put(path, meta, value);
                }
                l
            }
        };
        self.loaded.borrow_mut().entry(path.to_owned()).or_default().push((meta.version, l.clone()));
        Ok(l)
    }

    fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>> {
        self.cat.volume_mounts()
    }
}

/// The local store's values the mounts show, by path: one copy of each
/// (a value is a locked page, and freeing one a syscall), however many
/// mounts show it and however many changes made them. Weak: a value
/// goes when no node holds it. A path's entry is dropped whenever the
/// secret changes, so a version number a secret reuses after `rm` is
/// read anew. (A Vault backend's cache shares its values itself.)
#[derive(Default)]
struct Values(Mutex<HashMap<String, SharedValue>>);

/// A shown value: its version, when it was made, and the value itself
/// while some node holds it.
type SharedValue = (u64, i64, std::sync::Weak<SecretBytes>);

impl Values {
    fn get(&self, path: &str, meta: &VersionMeta) -> Option<Arc<SecretBytes>> {
        let map = self.0.lock().expect("values lock");
        let (version, created, value) = map.get(path)?;
        (*version == meta.version && *created == meta.created_unix_ms).then(|| value.upgrade()).flatten()
    }

    fn put(&self, path: &str, meta: &VersionMeta, value: &Arc<SecretBytes>) {
        let entry = (meta.version, meta.created_unix_ms, Arc::downgrade(value));
        self.0.lock().expect("values lock").insert(path.to_owned(), entry);
    }

    /// Forget `paths` (they changed).
    fn forget(&self, paths: &[String]) {
        let mut map = self.0.lock().expect("values lock");
        for p in paths {
            map.remove(p.as_str());
        }
    }
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
/// Room for one notice to the kernel (an entry's name is at most 255 bytes).
const NOTICE_BUF: usize = 4096;
/// From this many mounts touched by one change on, the kernel is told
/// about them by a second thread (see [`MountTable::invalidating`]).
const PIPELINE_FROM: usize = 64;
/// How long a handover waits for parked requests to be answered (they
/// wait at most [`pool::PARK_FOR`], then take a blocking thread).
const PARKED_DRAIN: Duration = Duration::from_secs(5);

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

/// Which mounts show what: every mount's grants by exact path and by
/// prefix, and the mounts of each workload. Kept with the mounts, under
/// their lock, so a change finds the mounts it touches without looking
/// at the others.
#[derive(Default)]
struct Index {
    exact: HashMap<String, BTreeSet<MountKey>>,
    prefix: HashMap<String, BTreeSet<MountKey>>,
    workload: HashMap<String, BTreeSet<MountKey>>,
}

impl Index {
    fn grants(&mut self, key: &MountKey, grants: &[Grant], add: bool) {
        for g in grants {
            let (map, p) = match &g.target {
                Target::Exact(p) => (&mut self.exact, p),
                Target::Prefix(p) => (&mut self.prefix, p),
            };
            if add {
                map.entry(p.as_str().to_owned()).or_default().insert(key.clone());
            } else if let Some(keys) = map.get_mut(p.as_str()) {
                keys.remove(key);
                if keys.is_empty() {
                    map.remove(p.as_str());
                }
            }
        }
    }

    /// The mounts whose grants may cover `path`: those naming it, and
    /// those granting a prefix above it.
    fn showing(&self, path: &str, out: &mut BTreeSet<MountKey>) {
        out.extend(self.exact.get(path).into_iter().flatten().cloned());
        for (i, _) in path.match_indices('/') {
            out.extend(self.prefix.get(&path[..i]).into_iter().flatten().cloned());
        }
    }
}

/// The mounts and their index.
#[derive(Default)]
struct Mounts {
    by_key: BTreeMap<MountKey, Mount>,
    index: Index,
}

impl Mounts {
    /// A new mount: it shows nothing until its first update.
    fn insert(&mut self, key: MountKey, m: Mount) {
        debug_assert!(m.grants.is_empty(), "grants come with the first update");
        self.index.workload.entry(m.shape.workload.name.clone()).or_default().insert(key.clone());
        self.by_key.insert(key, m);
    }

    fn remove(&mut self, key: &MountKey) -> Option<Mount> {
        let m = self.by_key.remove(key)?;
        self.index.grants(key, &m.grants, false);
        let name = &m.shape.workload.name;
        if let Some(keys) = self.index.workload.get_mut(name) {
            keys.remove(key);
            if keys.is_empty() {
                self.index.workload.remove(name);
            }
        }
        Some(m)
    }

    /// Note the grants a mount's view is now built from.
    fn set_grants(&mut self, key: &MountKey, grants: Vec<Grant>) {
        let Some(m) = self.by_key.get_mut(key) else { return };
        self.index.grants(key, &m.grants, false);
        self.index.grants(key, &grants, true);
        m.grants = grants;
    }

    fn of_workload(&self, name: &str) -> BTreeSet<MountKey> {
        self.index.workload.get(name).cloned().unwrap_or_default()
    }
}

/// What a mount's update starts from.
enum Changed<'a> {
    /// Its workload's grants (or the mount) are new: read them again.
    Policy,
    /// Only these secrets' values (or existence) changed.
    Secrets(&'a [String]),
}

/// How a mount's view follows a change of secrets.
enum Patch {
    /// Nothing it shows changed.
    Unchanged,
    /// Only versions changed: the view with the new nodes.
    View(View),
    /// Build it from its grants.
    Rebuild,
}

/// Whether a notice failed because the kernel knows no such inode.
fn is_enoent(e: &fuse_backend_rs::Error) -> bool {
    use fuse_backend_rs::Error::{EncodeMessage, FailedToWrite, InvalidMessage};
    matches!(e, InvalidMessage(io) | EncodeMessage(io) | FailedToWrite(io) if io.raw_os_error() == Some(libc::ENOENT))
}

/// Whether `target` covers the secret at `path` (as `Target::file_for`
/// would find it, without making the name).
fn covers(target: &Target, path: &str) -> bool {
    match target {
        Target::Exact(p) => p.as_str() == path,
        Target::Prefix(p) => path.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/')),
    }
}

/// One live mount as handed to a successor broker; its `/dev/fuse`
/// descriptor travels beside it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountState {
    pub key: MountKey,
    pub fs: workload::FsState,
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
    /// Serializes syncs: each one sees the store after the previous.
    sync_lock: Mutex<()>,
    /// Set while the mounts are being handed to a successor: no changes.
    frozen: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MountTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountTable").field("run_dir", &self.run_dir).finish_non_exhaustive()
    }
}

/// Mount points listed in `/proc/self/mountinfo` (field 5, unescaped).
pub(crate) fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mountinfo(p))).collect())
}

/// The peer group of the topmost mount at `path` (`shared:N`).
pub(crate) fn peer_group(mountinfo: &str, path: &Path) -> Option<String> {
    mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*path.to_string_lossy()))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("shared:")).map(str::to_owned))
}

/// Whether any process, in any mount namespace, holds a slave copy of the
/// mount at `path` — a container that bound it (rslave). A container
/// runtime setting up some other container briefly holds a copy of every
/// host mount (before its pivot_root): that is no holder.
fn held_by_others(path: &Path) -> bool {
    let Some(group) = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| peer_group(&m, path)) else {
        return false;
    };
    let tag = format!("master:{group}");
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    let runtime = |pid: &Path| {
        std::fs::read_to_string(pid.join("comm")).is_ok_and(|c| c.starts_with("runc") || c.starts_with("crun"))
    };
    // Only a holder root answers for counts: one in the broker's user
    // namespace (containers without userns-remap), or in a user namespace
    // root made (userns-remap). Any user can `unshare -U -r -m` and hold a
    // copy of every mount; that must not leave them all dead at a stop.
    let own_user_ns = std::fs::read_link("/proc/self/ns/user").ok();
    let trusted = |pid: &Path| {
        let ns = pid.join("ns/user");
        match std::fs::read_link(&ns) {
            Ok(link) if Some(&link) == own_user_ns.as_ref() => true,
            Ok(_) => std::fs::File::open(&ns).and_then(|f| crate::sys::userns_owner(&f)).is_ok_and(|uid| uid == 0),
            Err(_) => false,
        }
    };
    procs
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| !runtime(&e.path()) && trusted(&e.path()))
        .filter_map(|e| std::fs::read_to_string(e.path().join("mountinfo")).ok())
        .any(|m| m.lines().any(|l| l.split(' ').any(|f| f == tag)))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl MountTable {
    /// Prepare `<run_dir>/workloads`: make the run dir a shared mount, so
    /// mounts made later propagate into containers that bound it rslave,
    /// and note the mounts a previous broker left (see the module doc).
    pub fn new(run_dir: &Path, shared: Arc<FsShared>) -> anyhow::Result<Self> {
        let points = mount_points().context("cannot read /proc/self/mountinfo")?;
        if !points.iter().any(|p| p == run_dir) {
            crate::sys::bind_onto_itself(run_dir)
                .with_context(|| format!("cannot make {} a mount point (bind it onto itself)", run_dir.display()))?;
        }
        crate::sys::make_rshared(run_dir)
            .with_context(|| format!("cannot make {} a shared mount", run_dir.display()))?;
        let dirs = [run_dir.join("workloads"), run_dir.join("volumes")];
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let mut leftovers: Vec<PathBuf> =
            points.into_iter().filter(|p| p.parent().is_some_and(|d| dirs.iter().any(|x| x == d))).collect();
        leftovers.dedup();
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
            frozen: Default::default(),
        })
    }

    pub fn path_of(&self, key: &MountKey) -> PathBuf {
        match key {
            MountKey::Workload(name) => self.run_dir.join("workloads").join(name),
            MountKey::Volume(id) => self.run_dir.join("volumes").join(id),
        }
    }

    fn mount(&self, key: &MountKey, shape: Shape) -> anyhow::Result<Mount> {
        let path = self.path_of(key);
        let w = shape.workload.clone();
        let stacked = {
            let mut leftovers = self.leftovers.lock().expect("leftovers lock");
            let found = leftovers.iter().position(|p| *p == path);
            found.map(|i| leftovers.remove(i)).is_some()
        };
        if !stacked {
            // A leftover mount is dead (stat fails): only make a fresh dir.
            match std::fs::create_dir(&path) {
                Ok(()) => std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        }
        let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse").context("cannot open /dev/fuse")?;
        crate::sys::fuse_mount(&path, dev.as_raw_fd(), MAX_READ)
            .with_context(|| format!("cannot mount FUSE at {}", path.display()))?;
        // The workers never block in a read: another may have taken it.
        crate::sys::set_nonblocking(&dev)?;
        let owner = workload::Owner::new(shape.uid, shape.gid, shape.container.clone());
        let fs = Arc::new(WorkloadFs::new(w, owner, self.shared.clone()));
        let conn = Conn::new(dev, fs.clone());
        if let Err(e) = self.pool.add(&conn) {
            // Ours only: a mount below it may be a predecessor's that
            // containers hold.
            let _ = crate::sys::umount_detach(&path);
            return Err(e).with_context(|| format!("cannot serve {}", path.display()));
        }
        let m = Mount { shape, fs, conn, served: true, grants: Vec::new(), secrets: BTreeMap::new() };
        if stacked {
            tracing::info!(path = %path.display(), "mounted over the mount a previous broker left");
        } else {
            tracing::info!(path = %path.display(), "mounted");
        }
        Ok(m)
    }

    /// Stop serving a mount: the pool drops its connection, whose
    /// /dev/fuse fd closes once no parked request holds it. The mount
    /// point itself is left as it is.
    fn stop(&self, m: Mount) {
        self.pool.remove(&m.conn);
    }

    /// Detach every mount stacked at `path`; the directory stays (apps
    /// may be configured to bind it).
    fn detach_all(path: &Path) {
        for _ in 0..256 {
            if crate::sys::umount_detach(path).is_err() {
                break; // EINVAL: nothing mounted there any more
            }
        }
    }

    /// A mount that is no longer wanted: detach it and remove its directory.
    fn unmount(&self, key: &MountKey, m: Mount) {
        self.stop(m);
        let path = self.path_of(key);
        Self::detach_all(&path);
        let _ = std::fs::remove_dir(&path);
        tracing::info!(path = %path.display(), "unmounted");
    }

    /// Tell the kernel what a view swap changed: forget the entries of
    /// names that lead elsewhere or nowhere, the attributes and pages of
    /// inodes kept across a rotation, and, if a name went, the
    /// directory's attributes and listing.
    fn invalidate(conn: &Conn, swapped: &Swapped, buf: &mut [u8]) {
        let fd = conn.dev().as_raw_fd();
        for name in &swapped.entries {
            let Ok(c) = CString::new(name.as_str()) else { continue };
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                // ENOENT just means the kernel had nothing cached.
                let _ = conn.server.notify_inval_entry(w, ROOT, &c);
            }
        }
        for node in &swapped.inodes {
            let Ok(w) = FuseDevWriter::<()>::new(fd, buf) else { continue };
            // Offset 0, length 0: the attributes and every page. ENOENT:
            // the kernel holds nothing of it. Otherwise opens keep
            // bypassing the cache (never wrong, only slower).
            match conn.server.notify_inval_inode(w, node.ino, 0, 0) {
                Ok(_) => Swapped::settled(node),
                Err(e) if is_enoent(&e) => Swapped::settled(node),
                Err(e) => tracing::warn!(error = %e, "cannot tell the kernel a file changed"),
            }
        }
        if swapped.gone {
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                let _ = conn.server.notify_inval_inode(w, ROOT, 0, 0);
            }
        }
    }

    /// Run `f`, which updates `mounts` mounts and hands each one's
    /// invalidations to the function it is given. From [`PIPELINE_FROM`]
    /// mounts on, a second thread tells the kernel while `f` goes on
    /// building the next views (each a syscall of a few µs: at 1,000
    /// mounts, most of a rotation's time); it is joined before this
    /// returns, so everything is told when the change returns. If that
    /// thread cannot be had, each is told inline.
    fn invalidating<R>(mounts: usize, f: impl FnOnce(&mut dyn FnMut(&Arc<Conn>, Swapped)) -> R) -> R {
        let mut buf = [0; NOTICE_BUF];
        if mounts < PIPELINE_FROM {
            return f(&mut |conn, s| Self::invalidate(conn, &s, &mut buf));
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(Arc<Conn>, Swapped)>();
            // Dropped (and `rx` with it) if no thread can be had: each
            // send then fails and is told inline.
            let _ = std::thread::Builder::new().name("fuse-inval".into()).spawn_scoped(scope, move || {
                let mut buf = [0; NOTICE_BUF];
                for (conn, s) in rx {
                    Self::invalidate(&conn, &s, &mut buf);
                }
            });
            let r = f(&mut |conn, s| {
                if let Err(std::sync::mpsc::SendError((conn, s))) = tx.send((conn.clone(), s)) {
                    Self::invalidate(&conn, &s, &mut buf);
                }
            });
            drop(tx);
            r
        })
    }

    /// Every secret `grants` cover now, with its version.
    fn covered_all(cat: &impl Catalog, grants: &[Grant]) -> anyhow::Result<BTreeMap<String, VersionMeta>> {
        let mut secrets = BTreeMap::new();
        for g in grants {
            secrets.extend(cat.covered(&g.target)?);
        }
        Ok(secrets)
    }

    /// Bring what a mount knows of `paths` up to date: each is shown now
    /// if one of its grants covers it and it exists (an exact grant of a
    /// Vault secret not fetched yet shows it as version 0). Returns
    /// whether only versions changed — every path shown before is shown
    /// now and the other way round — so the view can be patched
    /// ([`MountTable::patch_view`]) instead of built again.
    fn recover<C: Catalog>(cat: &Memo<'_, C>, m: &mut Mount, paths: &[String]) -> anyhow::Result<bool> {
        let mut versions_only = true;
        for p in paths {
            let mut found = None;
            for g in m.grants.iter().filter(|g| covers(&g.target, p)) {
                let now = match &g.target {
                    Target::Exact(_) => cat.version_in(&g.target, p)?,
                    Target::Prefix(_) => cat.current(p)?,
                };
                found = now.or(found);
            }
            match (m.secrets.get_mut(p.as_str()), found) {
                (Some(was), Some(meta)) => *was = meta,
                (None, None) => {}
                (Some(_), None) => {
                    m.secrets.remove(p.as_str());
                    versions_only = false;
                }
                (None, Some(meta)) => {
                    m.secrets.insert(p.clone(), meta);
                    versions_only = false;
                }
            }
        }
        Ok(versions_only)
    }

    /// A mount's view after new versions of secrets it shows, when no
    /// file comes or goes (see [`MountTable::recover`]): each file of a
    /// changed secret gets a new node with the new value, the others are
    /// kept. A shown secret without a file (hidden by a clash, or its
    /// value failed to load before), or a value that cannot be loaded
    /// now, asks for the view to be built from scratch, which reports it.
    fn patch_view<C: Catalog>(cat: &Memo<'_, C>, m: &Mount, paths: &[String], notices: &mut Vec<Notice>) -> Patch {
        let old = m.fs.view();
        if paths.iter().any(|p| m.secrets.contains_key(p.as_str()) && !old.by_name.values().any(|n| n.secret == *p)) {
            return Patch::Rebuild;
        }
        let mut nodes = Vec::with_capacity(old.by_name.len());
        let mut changed = false;
        for n in old.by_name.values() {
            let meta = paths.iter().any(|p| *p == n.secret).then(|| m.secrets.get(&n.secret)).flatten();
            let Some(meta) = meta.filter(|meta| meta.version != n.version) else {
                nodes.push(n.clone());
                continue;
            };
            if renews_inode(&n.secret) {
                return Patch::Rebuild;
            }
            let Ok(loaded) = cat.load(&n.secret, meta) else { return Patch::Rebuild };
            if n.notify.is_some() || !n.on_change.is_empty() {
                let (fs, secret, signal, on_change) =
                    (m.fs.clone(), n.secret.clone(), n.notify.clone(), n.on_change.clone());
                notices.push(Notice { fs, secret, version: meta.version, signal, on_change });
            }
            nodes.push(Arc::new(Node {
                version: meta.version,
                mtime_ms: meta.created_unix_ms,
                value: loaded.value,
                health: loaded.health,
                template: loaded.template,
                unsettled: Default::default(),
                ..Node::clone(n)
            }));
            changed = true;
        }
        if changed { Patch::View(View::new(nodes)) } else { Patch::Unchanged }
    }

    /// Build one mount's view from its grants and the secrets they
    /// cover, reusing the nodes (and inode numbers, and loaded values) of
    /// files that did not change.
    fn make_view(&self, cat: &impl Catalog, m: &Mount, notices: &mut Vec<Notice>) -> View {
        let (fs, shape, secrets) = (&m.fs, &m.shape, &m.secrets);
        let names: Vec<String> = secrets.keys().cloned().collect();
        let (mut specs, clashes) = files_for(&m.grants, &names);
        if let Some(mode) = shape.mode {
            specs.iter_mut().for_each(|s| s.mode = mode);
        }
        for c in clashes {
            tracing::warn!(workload = %fs.workload.name, clash = %c, "two grants want one file name");
        }
        let old = fs.view();
        let mut nodes = Vec::with_capacity(specs.len());
        for spec in specs {
            let meta = &secrets[&spec.secret];
            let before = old.by_name.get(&spec.name);
            let reuse = before.filter(|n| n.same_as(&spec.secret, meta.version, spec.mode, spec.uid, spec.gid));
            if let Some(n) = reuse {
                nodes.push(n.clone());
                continue;
            }
            let rotated = before.is_some_and(|n| n.secret == spec.secret && n.version != meta.version);
            if rotated && (spec.notify.is_some() || !spec.on_change.is_empty()) {
                let (fs, secret, signal, on_change) =
                    (fs.clone(), spec.secret.clone(), spec.notify.clone(), spec.on_change.clone());
                notices.push(Notice { fs, secret, version: meta.version, signal, on_change });
            }
            let loaded = match cat.load(&spec.secret, meta) {
                Ok(l) => l,
                Err(e) => {
                    // A tampered record is reported, never served.
                    tracing::error!(secret = %spec.secret, error = %e, "not shown in the mount");
                    continue;
                }
            };
            let reads = match before.filter(|n| n.secret == spec.secret) {
                Some(n) => n.reads.clone(),
                None => crate::metrics::reads_of(&fs.workload.name, &spec.secret),
            };
            // A new version of the same file keeps its inode where it can
            // (see `WorkloadFs::replace`).
            let kept = before
                .filter(|n| n.secret == spec.secret && (n.mode, n.uid, n.gid) == (spec.mode, spec.uid, spec.gid))
                .filter(|n| !renews_inode(&n.secret))
                .map(|n| n.ino);
            nodes.push(Arc::new(Node {
                ino: kept.unwrap_or_else(|| self.next_ino.fetch_add(1, Ordering::Relaxed)),
                name: spec.name,
                secret: spec.secret,
                version: meta.version,
                mtime_ms: meta.created_unix_ms,
                mode: spec.mode,
                uid: spec.uid,
                gid: spec.gid,
                value: loaded.value,
                health: loaded.health,
                reads,
                notify: spec.notify,
                on_change: spec.on_change,
                template: loaded.template,
                unsettled: Default::default(),
            }));
        }
        View::new(nodes)
    }

    /// Bring one mount up to date: read what changed, swap in its new
    /// view, hand what the kernel must be told to `inval`, and serve the
    /// mount if it is adopted.
    fn update<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        mounts: &mut Mounts,
        key: &MountKey,
        what: &Changed<'_>,
        notices: &mut Vec<Notice>,
        inval: &mut dyn FnMut(&Arc<Conn>, Swapped),
    ) -> anyhow::Result<()> {
        let Some(m) = mounts.by_key.get_mut(key) else { return Ok(()) };
        let read = match what {
            Changed::Policy => {
                match cat.grants(&m.fs.workload.name).and_then(|g| Ok((Self::covered_all(cat, &g)?, g))) {
                    Ok((secrets, grants)) => {
                        m.secrets = secrets;
                        mounts.set_grants(key, grants);
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
            Changed::Secrets(paths) => Self::recover(cat, m, paths),
        };
        let m = mounts.by_key.get_mut(key).expect("present above");
        if let Ok(versions_only) = read {
            let patch = match what {
                Changed::Secrets(paths) if versions_only => Self::patch_view(cat, m, paths, notices),
                _ => Patch::Rebuild,
            };
            let view = match patch {
                Patch::Unchanged => None,
                Patch::View(v) => Some(v),
                Patch::Rebuild => Some(self.make_view(cat, m, notices)),
            };
            if let Some(view) = view {
                let swapped = m.fs.replace(view, &self.next_ino);
                if !swapped.is_empty() {
                    inval(&m.conn, swapped);
                }
            }
        }
        // A mount adopted from a predecessor is served once it is
        // current (or as current as it can be). First, any request the
        // predecessor read and never answered is queued again.
        if !m.served {
            m.conn.resend();
            match self.pool.add(&m.conn) {
                Ok(()) => m.served = true,
                Err(e) => tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot serve mount"),
            }
        }
        read.map(|_| ())
    }

    /// The shape of a workload's own mount.
    fn workload_shape(w: Workload) -> Shape {
        Shape { workload: w, uid: None, gid: None, mode: None, volume: None, container: None }
    }

    /// The shape of a container's mount of a volume (`workload`: the
    /// volume's workload, if it exists).
    fn volume_shape(v: VolumeMount, workload: Option<Workload>) -> Shape {
        // A volume whose workload is gone shows nothing and matches
        // nobody (a workload without selectors matches no caller).
        let workload = workload.unwrap_or(Workload { name: v.workload.clone(), selectors: vec![] });
        Shape { workload, uid: v.uid, gid: v.gid, mode: v.mode, volume: Some(v.volume), container: v.container }
    }

    /// The mounts the catalog asks for, and how each shows its files.
    fn wanted(cat: &impl Catalog) -> anyhow::Result<BTreeMap<MountKey, Shape>> {
        let workloads: HashMap<String, Workload> = cat.workloads()?.into_iter().map(|w| (w.name.clone(), w)).collect();
        let mut wanted = BTreeMap::new();
        for w in workloads.values() {
            wanted.insert(MountKey::Workload(w.name.clone()), Self::workload_shape(w.clone()));
        }
        for v in cat.volume_mounts()? {
            let w = workloads.get(&v.workload).cloned();
            wanted.insert(MountKey::Volume(v.id.clone()), Self::volume_shape(v, w));
        }
        Ok(wanted)
    }

    /// Make the mounts in `scope` match `wanted` (the wanted mounts are
    /// in scope too): unmount the unwanted or reshaped, mount the new,
    /// and rebuild each wanted mount's view from its grants. Errors for
    /// one mount are logged and do not stop the others.
    fn reconcile<C: Catalog>(
        &self,
        cat: &Memo<'_, C>,
        mounts: &mut Mounts,
        scope: BTreeSet<MountKey>,
        wanted: BTreeMap<MountKey, Shape>,
        notices: &mut Vec<Notice>,
    ) {
        let gone: Vec<MountKey> = scope
            .into_iter()
            .filter(|k| mounts.by_key.get(k).is_some_and(|m| wanted.get(k) != Some(&m.shape)))
            .collect();
        for key in gone {
            if let Some(m) = mounts.remove(&key) {
                self.unmount(&key, m);
            }
        }
        Self::invalidating(wanted.len(), |inval| {
            for (key, shape) in wanted {
                if !mounts.by_key.contains_key(&key) {
                    match self.mount(&key, shape) {
                        Ok(m) => mounts.insert(key.clone(), m),
                        Err(e) => {
                            tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot mount");
                            continue;
                        }
                    }
                }
                if let Err(e) = self.update(cat, mounts, &key, &Changed::Policy, notices, inval) {
                    tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot update mount");
                }
            }
        });
    }

    /// Make every mount match the store (at start, after a takeover, and
    /// for changes that may touch any mount). Returns the rotations to
    /// announce.
    pub fn sync(&self, cat: &impl Catalog) -> anyhow::Result<Vec<Notice>> {
        let mut notices = Vec::new();
        let _serial = self.sync_lock.lock().expect("sync lock");
        if self.frozen.load(Ordering::SeqCst) {
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
        if self.frozen.load(Ordering::SeqCst) {
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
        if self.frozen.load(Ordering::SeqCst) || paths.is_empty() {
            return Ok(notices);
        }
        self.values.forget(paths);
        let cat = &Memo::sharing(cat, &self.values);
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let mut touched = BTreeSet::new();
        for p in paths {
            mounts.index.showing(p, &mut touched);
        }
        Self::invalidating(touched.len(), |inval| {
            for key in touched {
                if let Err(e) = self.update(cat, &mut mounts, &key, &Changed::Secrets(paths), &mut notices, inval) {
                    tracing::error!(mount = ?key, error = format!("{e:#}"), "cannot update mount");
                }
            }
        });
        Ok(notices)
    }

    /// Stop taking FUSE requests and all changes, ahead of a handover:
    /// the request each worker holds is answered, then the parked ones
    /// (bounded). The mounts stay; new requests queue in the kernel.
    pub fn quiesce(&self) {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.frozen.store(true, Ordering::SeqCst);
        if !self.pool.pause(PARKED_DRAIN) {
            // The successor asks the kernel to send those again.
            tracing::warn!("handing over with FUSE requests unanswered");
        }
    }

    /// Serve again after a handover that did not happen.
    pub fn resume(&self) {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.pool.resume();
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// The state of every (quiesced) mount, each with its /dev/fuse fd,
    /// and the next inode number, for a successor broker.
    pub fn snapshot(&self) -> std::io::Result<(Vec<(MountState, OwnedFd)>, u64)> {
        let mounts = self.mounts.lock().expect("mounts lock");
        let mut handed = Vec::with_capacity(mounts.by_key.len());
        for (key, m) in mounts.by_key.iter() {
            handed.push((MountState { key: key.clone(), fs: m.fs.export() }, m.conn.dev().try_clone()?.into()));
        }
        Ok((handed, self.next_ino.load(Ordering::SeqCst)))
    }

    /// Take up the live mounts a predecessor handed over: each keeps its
    /// kernel connection, inode numbers and open handles, and is served
    /// from the next [`MountTable::sync`] on. A mount nothing wants any
    /// more is detached.
    pub fn adopt(&self, cat: &impl Catalog, handed: Vec<(MountState, File)>, next_ino: u64) -> anyhow::Result<()> {
        let wanted = Self::wanted(cat)?;
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let load = |n: Node, workload: &str| {
            let meta = VersionMeta { version: n.version, created_unix_ms: n.mtime_ms, size: 0 };
            let loaded = cat.load(&n.secret, &meta).unwrap_or(Loaded { value: None, health: None, template: None });
            let reads = crate::metrics::reads_of(workload, &n.secret);
            Arc::new(Node { value: loaded.value, health: loaded.health, reads, template: loaded.template, ..n })
        };
        for (st, dev) in handed {
            let path = self.path_of(&st.key);
            self.leftovers.lock().expect("leftovers lock").retain(|p| *p != path);
            let Some(shape) = wanted.get(&st.key).cloned() else {
                Self::detach_all(&path);
                let _ = std::fs::remove_dir(&path);
                continue;
            };
            // O_NONBLOCK travels with the descriptor; make sure.
            crate::sys::set_nonblocking(&dev)?;
            let owner = workload::Owner::new(shape.uid, shape.gid, shape.container.clone());
            let mut fs = WorkloadFs::new(shape.workload.clone(), owner, self.shared.clone());
            let workload = shape.workload.name.clone();
            let view = View::new(st.fs.nodes.iter().cloned().map(|n| load(n, &workload)));
            let handles = st
                .fs
                .handles
                .iter()
                .map(|(fh, n)| (*fh, view.by_ino.get(&n.ino).cloned().unwrap_or_else(|| load(n.clone(), &workload))))
                .collect();
            fs.restore(st.fs, view, handles);
            let fs = Arc::new(fs);
            let conn = Conn::new(dev, fs.clone());
            tracing::info!(path = %path.display(), "took over the live mount");
            let m = Mount { shape, fs, conn, served: false, grants: Vec::new(), secrets: BTreeMap::new() };
            mounts.insert(st.key, m);
        }
        self.next_ino.fetch_max(next_ino, Ordering::SeqCst);
        Ok(())
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

    /// Stop serving (clean shutdown). A mount that some container holds
    /// stays, so the next broker can mount over it and reach that
    /// container; one that nobody holds is detached.
    pub fn shutdown(&self) {
        self.pool.stop();
        let mut mounts = self.mounts.lock().expect("mounts lock");
        for (key, m) in std::mem::take(&mut *mounts).by_key {
            self.stop(m);
            let path = self.path_of(&key);
            if held_by_others(&path) {
                tracing::info!(path = %path.display(), "stopped serving; containers hold the mount, so it stays for the next broker");
            } else {
                Self::detach_all(&path);
                tracing::info!(path = %path.display(), "unmounted");
            }
        }
    }
}

/// Files whose every new version takes a new inode, as the templates and
/// dynamic-credentials docs promise: a template's render (its node carries
/// the inputs it read) and a leased file (each open reads the caller's own
/// content; a rolled lease is a new file).
fn renews_inode(secret: &str) -> bool {
    secret.starts_with(crate::secret::TEMPLATE_PREFIX) || crate::policy::leased(secret).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretPath;

    /// Counts what reaches the real catalog.
    #[derive(Default)]
    struct Counting {
        covered: std::cell::Cell<u32>,
        loaded: std::cell::Cell<u32>,
    }

    impl Catalog for Counting {
        fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
            Ok(Vec::new())
        }
        fn grants(&self, _: &str) -> anyhow::Result<Vec<Grant>> {
            Ok(Vec::new())
        }
        fn covered(&self, t: &Target) -> anyhow::Result<Vec<(String, VersionMeta)>> {
            self.covered.set(self.covered.get() + 1);
            let (Target::Exact(p) | Target::Prefix(p)) = t;
            Ok(vec![(p.as_str().to_owned(), VersionMeta { version: 1, created_unix_ms: 0, size: 1 })])
        }
        fn load(&self, _: &str, _: &VersionMeta) -> anyhow::Result<Loaded> {
            self.loaded.set(self.loaded.get() + 1);
            Ok(Loaded { value: Some(Arc::new(SecretBytes::copy_from(b"v"))), health: None, template: None })
        }
        fn volume_mounts(&self) -> anyhow::Result<Vec<VolumeMount>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn one_sync_reads_each_target_and_value_once_and_mounts_share_it() {
        let real = Counting::default();
        let memo = Memo::new(&real);
        let (a, b) = (Target::Exact(SecretPath::parse("a").unwrap()), Target::Exact(SecretPath::parse("b").unwrap()));
        let meta = |v| VersionMeta { version: v, created_unix_ms: 0, size: 1 };
        for _ in 0..1000 {
            memo.covered(&a).unwrap();
        }
        memo.covered(&b).unwrap();
        let first = memo.load("a", &meta(1)).unwrap();
        let again = memo.load("a", &meta(1)).unwrap();
        memo.load("a", &meta(2)).unwrap();
        assert_eq!((real.covered.get(), real.loaded.get()), (2, 2));
        assert!(Arc::ptr_eq(first.value.as_ref().unwrap(), again.value.as_ref().unwrap()));
    }

    fn grant(target: &str) -> Grant {
        Grant::new(target, "w", None, None, None, None).unwrap()
    }

    fn showing(ix: &Index, path: &str) -> Vec<MountKey> {
        let mut out = BTreeSet::new();
        ix.showing(path, &mut out);
        out.into_iter().collect()
    }

    #[test]
    fn the_index_finds_the_mounts_of_a_path_by_exact_grant_and_by_prefix() {
        let (a, b, c) = (MountKey::Workload("a".into()), MountKey::Workload("b".into()), MountKey::Volume("c".into()));
        let mut ix = Index::default();
        let (ga, gb, gc) = (vec![grant("db/*")], vec![grant("db/pass"), grant("web/*")], vec![grant("db/x/*")]);
        ix.grants(&a, &ga, true);
        ix.grants(&b, &gb, true);
        ix.grants(&c, &gc, true);
        assert_eq!(showing(&ix, "db/pass"), [a.clone(), b.clone()]);
        assert_eq!(showing(&ix, "db/user"), vec![a.clone()]);
        assert_eq!(showing(&ix, "db/x/y/z"), [a.clone(), c.clone()]);
        assert_eq!(showing(&ix, "web/tls/key"), vec![b.clone()]);
        // Whole segments only, and a prefix does not cover itself.
        assert!(showing(&ix, "dbx/pass").is_empty());
        assert!(showing(&ix, "db").is_empty());
        assert!(showing(&ix, "web").is_empty());
        // Grants that go leave the index; nothing empty stays behind.
        ix.grants(&b, &gb, false);
        assert_eq!(showing(&ix, "db/pass"), vec![a.clone()]);
        assert!(showing(&ix, "web/x").is_empty());
        ix.grants(&a, &ga, false);
        ix.grants(&c, &gc, false);
        assert!(ix.exact.is_empty() && ix.prefix.is_empty());
    }

    #[test]
    fn peer_groups_of_the_topmost_mount() {
        let info = "43 27 254:0 / /run/k rw shared:2 - ext4 /dev/vda rw\n\
                    44 43 0:39 / /run/k/workloads/w ro shared:3 - fuse.keyhole keyhole ro\n\
                    45 44 0:51 / /run/k/workloads/w ro shared:7 - fuse.keyhole keyhole ro\n";
        let w = std::path::Path::new("/run/k/workloads/w");
        assert_eq!(super::peer_group(info, w).as_deref(), Some("7"));
        assert_eq!(super::peer_group(info, std::path::Path::new("/nope")), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo(r"/run/a\040b\134c"), r"/run/a b\c");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
        assert_eq!(super::unescape_mountinfo(r"/odd\x"), r"/odd\x");
    }
}
