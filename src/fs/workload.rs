//! The filesystem of one workload's mount.
//!
//! The root directory holds one regular file per granted secret. Every
//! (name, version, mode, owner) gets its own inode number, so an inode's
//! content never changes: the kernel may keep its pages cached
//! (`KEEP_CACHE`), a rotation only has to invalidate the directory entry,
//! and a file opened before a rotation keeps reading the version it
//! opened. Callbacks never wait on the network: they read the in-memory
//! view that [`super::MountTable`] swaps in.
//!
//! Every open is checked: the calling task (blocked in the syscall) is
//! attested and must match the mount's workload; otherwise `EACCES` and a
//! `deny` audit line. A granted open writes a `read` audit line; if that
//! line cannot be written the open fails (`EIO`) — no unaudited reads.
//!
//! A container's mount of a Docker volume shows its files as owned by the
//! container's configured user, which is learned from the container's own
//! `/etc/passwd` ([`WorkloadFs::learn_owner`]) while a request of that
//! container waits, parked, off the FUSE workers ([`super::pool`]). Until
//! then, entries and attributes are given with a zero TTL so the kernel
//! asks again. The passwd is opened without blocking and without following
//! a final symlink, and only a regular file is read, up to 64 KiB.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{FsOptions, OpenOptions, stat64};
use fuse_backend_rs::api::filesystem::{Context, DirEntry, Entry, FileSystem, ZeroCopyWriter};

use super::access::{FileMode, Ids, check_task};
use crate::audit::{AuditLog, Event, EventKind};
use crate::backend::vault::{Freshness, Health};
use crate::identity::{Attestor, Identity};
use crate::policy::{Decision, Workload, decide};
use crate::secret::SecretBytes;

pub const ROOT: u64 = 1;
/// Entries and attributes are cached this long; every change is also
/// invalidated explicitly, so this only bounds a missed invalidation.
const TTL: Duration = Duration::from_secs(10);

/// One file as shown: immutable once made. Handed to a successor broker
/// as is, except the value and its health, which never leave the process:
/// the successor loads them from its own store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub ino: u64,
    pub name: String,
    pub secret: String,
    pub version: u64,
    pub mtime_ms: i64,
    pub mode: u32,
    /// The grant's owner; None: the mount's default owner.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// None while a remote backend has not delivered the value.
    #[serde(skip)]
    pub value: Option<Arc<SecretBytes>>,
    /// For a remote value: whether its backend answers.
    #[serde(skip)]
    pub health: Option<Arc<Health>>,
    /// Signal for this file's readers when it rotates.
    pub notify: Option<String>,
    /// Restart or exec in this file's readers when it changes.
    #[serde(default)]
    pub on_change: crate::actions::OnChange,
    /// `keyhole_reads_total` for this workload and secret, looked up once
    /// when the node is made, so an open only adds to it.
    #[serde(skip)]
    pub reads: crate::metrics::Counter,
    /// A template's file: the inputs its render read, or why it failed
    /// (then `value` is None). Never leaves the process either.
    #[serde(skip)]
    pub template: Option<Arc<crate::template::Rendering>>,
}

impl Node {
    fn len(&self) -> usize {
        self.value.as_ref().map_or(0, |v| v.len())
    }
}

impl Node {
    /// Whether `other` shows the same bytes the same way (reuse the inode).
    pub fn same_as(&self, secret: &str, version: u64, mode: u32, uid: Option<u32>, gid: Option<u32>) -> bool {
        self.secret == secret && self.version == version && self.mode == mode && self.uid == uid && self.gid == gid
    }
}

/// What a successor broker needs to serve a live mount on: the inode
/// numbers and open handles the kernel knows, and what was learned.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    pub mounted_unix_ns: u128,
    pub next_fh: u64,
    pub owner: Option<(Option<u32>, Option<u32>)>,
    pub nodes: Vec<Node>,
    /// Open file handles, with the node each one reads (maybe retired).
    pub handles: Vec<(u64, Node)>,
    pub readers: HashMap<String, std::collections::BTreeSet<String>>,
    /// Open handles of leased files: whose leases they read (no value:
    /// the successor reads them again from its store, see [`crate::lease`]).
    #[serde(default)]
    pub leased: Vec<(u64, LeasedHandle)>,
}

/// An open handle of a leased file: the caller whose leases it reads,
/// and the host user's leases it holds (see `Leases::hold`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LeasedHandle {
    pub holder: crate::lease::Holder,
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Default)]
pub struct View {
    pub by_name: BTreeMap<String, Arc<Node>>,
    pub by_ino: HashMap<u64, Arc<Node>>,
    /// The versions this view's rotations replaced: an open that looked
    /// the name up just before the swap still opens what it found.
    /// Revoked files are not here.
    rotated_out: HashMap<u64, Arc<Node>>,
}

impl View {
    pub fn new(nodes: impl IntoIterator<Item = Arc<Node>>) -> View {
        let mut v = View::default();
        for n in nodes {
            v.by_ino.insert(n.ino, n.clone());
            v.by_name.insert(n.name.clone(), n);
        }
        v
    }
}

/// What the kernel must be told after a view swap.
#[derive(Debug, Default)]
pub struct Swapped {
    /// Names whose entry now leads to another inode.
    pub entries: Vec<String>,
    /// Names that lead nowhere now (the directory's listing changed).
    pub removed: Vec<String>,
}

impl Swapped {
    /// Nothing to tell the kernel.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.removed.is_empty()
    }
}

/// What every mount shares: who is calling, and where to write it down.
pub struct FsShared {
    pub attestor: Arc<Attestor>,
    pub audit: Arc<AuditLog>,
    /// Audit allowed opens too (`[audit] reads`); denials always are.
    pub audit_reads: bool,
    /// `[admin]`: a caller's audit lines say whether it is an admin.
    pub admin: crate::config::AdminPolicy,
    /// Where parked FUSE requests wait (see [`super::pool`]).
    pub rt: tokio::runtime::Handle,
    /// Per-container leases: what a `dynamic:`/`cert:` file shows to
    /// each caller (see [`crate::lease`]).
    pub leases: Arc<crate::lease::Leases>,
    /// The containers that read each file, kept in the store (for
    /// `grant --restart` and `--exec`, see [`crate::actions`]).
    pub readers: Arc<crate::actions::Readers>,
}

pub struct WorkloadFs {
    pub workload: Workload,
    owner: Owner,
    /// Secret → the containers that opened it here (for --notify).
    readers: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    view: RwLock<Arc<View>>,
    handles: Mutex<HashMap<u64, Arc<Node>>>,
    /// The handles of `handles` that read a caller's own leases.
    leased: Mutex<HashMap<u64, LeasedHandle>>,
    next_fh: AtomicU64,
    shared: Arc<FsShared>,
    /// The directory's times: when the mount was made.
    mounted: std::time::SystemTime,
    /// Each caller's own inode of each leased file (see [`super::leased`]).
    leased_inos: super::leased::LeasedInodes,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Who owns files whose grant names no owner.
#[derive(Debug, Default)]
pub struct Owner {
    /// Fixed by the mount (a volume's uid=/gid= options).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A volume mount's container: its configured user is learned from
    /// the first request that container makes (Docker cannot tell while
    /// the container is still being started).
    pub container: Option<String>,
    learned: std::sync::OnceLock<(Option<u32>, Option<u32>)>,
}

impl Owner {
    pub fn new(uid: Option<u32>, gid: Option<u32>, container: Option<String>) -> Self {
        Owner { uid, gid, container, learned: std::sync::OnceLock::new() }
    }

    /// A volume mount's container whose user is not learned yet.
    fn unknown(&self) -> bool {
        self.container.is_some() && self.learned.get().is_none()
    }

    fn resolve(&self) -> (u32, u32) {
        let (lu, lg) = self.learned.get().copied().unwrap_or_default();
        (self.uid.or(lu).unwrap_or(0), self.gid.or(lg).unwrap_or(0))
    }
}

/// A container's `User` ("1000", "1000:50", "app", "app:staff") as
/// (uid, gid), the way runc resolves it: names through the container's own
/// `/etc/passwd` and `/etc/group` under `root`, and a user without a group
/// takes its primary group from passwd. What cannot be resolved is None.
pub fn container_user(root: &std::path::Path, user: &str) -> (Option<u32>, Option<u32>) {
    let (u, g) = user.split_once(':').map_or((user, None), |(u, g)| (u, Some(g)));
    if u.is_empty() {
        return (None, None);
    }
    let passwd = read_db(root, "etc/passwd");
    // name:x:uid:gid:...; a numeric user matches by uid.
    let numeric = u.parse::<u32>().ok();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && if numeric.is_some() { f[2] == u } else { f[0] == u });
    let uid = numeric.or_else(|| entry.as_ref().and_then(|f| f[2].parse().ok()));
    let gid = match g {
        Some(g) => g.parse().ok().or_else(|| {
            let groups = read_db(root, "etc/group");
            let f = groups.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 3 && f[0] == g);
            f.and_then(|f| f[2].parse().ok())
        }),
        None => entry.and_then(|f| f[3].parse().ok()),
    };
    (uid, gid)
}

/// The most of a container's passwd or group file that is read.
const MAX_DB: usize = 64 << 10;

/// A small text file of the container's, read within its root; "" if it is
/// absent, not a regular file, or larger than [`MAX_DB`] (a cut file could
/// read as another). Nothing else is ever opened: a FIFO or a device node
/// there is seen through an `O_PATH` fd and left alone (see
/// [`crate::sys::open_regular_in_root`]).
fn read_db(root: &std::path::Path, rel: &str) -> String {
    match crate::sys::open_regular_in_root(root, rel, MAX_DB as u64) {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        _ => String::new(),
    }
}

fn file_attr(n: &Node, owner: (u32, u32), leased: bool) -> stat64 {
    let mut st = crate::sys::zeroed_stat();
    // A leased file's content differs by caller: its size bounds them all
    // (reads are direct, so a reader stops at the real end).
    let len = if leased { crate::lease::LEASED_SIZE } else { n.len() };
    st.st_ino = n.ino;
    st.st_mode = libc::S_IFREG | n.mode;
    st.st_nlink = 1;
    st.st_uid = n.uid.unwrap_or(owner.0);
    st.st_gid = n.gid.unwrap_or(owner.1);
    st.st_size = len as i64;
    st.st_blksize = 4096;
    st.st_blocks = (len as i64 + 511) / 512;
    st.st_mtime = n.mtime_ms.div_euclid(1000);
    st.st_mtime_nsec = n.mtime_ms.rem_euclid(1000) * 1_000_000;
    st.st_ctime = st.st_mtime;
    st.st_ctime_nsec = st.st_mtime_nsec;
    st.st_atime = st.st_mtime;
    st.st_atime_nsec = st.st_mtime_nsec;
    st
}

impl WorkloadFs {
    pub fn new(workload: Workload, owner: Owner, shared: Arc<FsShared>) -> Self {
        WorkloadFs {
            workload,
            owner,
            readers: Mutex::default(),
            view: RwLock::new(Arc::new(View::default())),
            handles: Mutex::default(),
            leased: Mutex::default(),
            next_fh: AtomicU64::new(1),
            shared,
            mounted: std::time::SystemTime::now(),
            leased_inos: Default::default(),
        }
    }

    /// This mount's state, for a successor broker (see [`FsState`]).
    pub fn export(&self) -> FsState {
        let at = self.mounted.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let handles = self.handles.lock().expect("handles lock");
        FsState {
            mounted_unix_ns: at.as_nanos(),
            next_fh: self.next_fh.load(Ordering::Relaxed),
            owner: self.owner.learned.get().copied(),
            nodes: self.view().by_name.values().map(|n| Node::clone(n)).collect(),
            handles: handles.iter().map(|(fh, n)| (*fh, Node::clone(n))).collect(),
            readers: self.readers.lock().expect("readers lock").clone(),
            leased: self.leased.lock().expect("leased lock").iter().map(|(fh, h)| (*fh, h.clone())).collect(),
        }
    }

    /// Take up a predecessor's state: its view (with values loaded by the
    /// caller), open handles, owner and readers, so requests about inodes
    /// and handles the kernel already knows are answered as before.
    pub fn restore(&mut self, st: FsState, view: View, handles: HashMap<u64, Arc<Node>>) {
        self.mounted = std::time::UNIX_EPOCH + Duration::from_nanos(st.mounted_unix_ns as u64);
        self.next_fh = AtomicU64::new(st.next_fh);
        if let Some(o) = st.owner {
            let _ = self.owner.learned.set(o);
        }
        *self.view.get_mut().expect("view lock") = Arc::new(view);
        *self.handles.get_mut().expect("handles lock") = handles;
        for (secret, containers) in &st.readers {
            containers.iter().for_each(|c| self.shared.readers.add(&self.workload.name, secret, c));
        }
        *self.readers.get_mut().expect("readers lock") = st.readers;
        self.adopt_leased(st.leased);
    }

    /// A predecessor's open handles of leased files: each reads its
    /// caller's content again, from the leases this broker loaded from
    /// its store (a handle whose lease is gone reads EIO), and a host
    /// user's handle holds its leases again.
    fn adopt_leased(&mut self, leased: Vec<(u64, LeasedHandle)>) {
        let handles = self.handles.get_mut().expect("handles lock");
        for (fh, h) in leased {
            let Some(node) = handles.get(&fh).cloned() else { continue };
            match self.shared.leases.body_for_node(&node.secret, node.version, &h.holder) {
                Ok(body) => {
                    handles.insert(fh, Arc::new(Node { value: Some(body), ..Node::clone(&node) }));
                }
                Err(why) => {
                    tracing::warn!(secret = %node.secret, why, "an open leased file cannot be read after the takeover");
                    handles.insert(fh, Arc::new(Node { value: None, ..Node::clone(&node) }));
                }
            }
            let keys = self.shared.leases.hold(&node.secret, node.version, &h.holder);
            self.leased.get_mut().expect("leased lock").insert(fh, LeasedHandle { holder: h.holder, keys });
        }
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().expect("view lock").clone()
    }

    /// Swap in a new view; returns what the kernel must be told.
    ///
    /// A rotated file gets a fresh inode from `fresh_ino` (`make_view` may
    /// have given the new version the old one's number): a file opened
    /// before a rotation keeps reading the version it opened, and a reader
    /// that trusts the kernel's cached size (sendfile, splice: busybox
    /// `cat`, nginx) can never get new bytes at the old length. Keeping
    /// the inode was tried for speed (one `inval_inode` instead of an
    /// entry drop) and broke exactly that.
    pub fn replace(&self, mut new: View, fresh_ino: &AtomicU64) -> Swapped {
        let mut guard = self.view.write().expect("view lock");
        let old = guard.clone();
        let mut out = Swapped::default();
        for (name, n) in &old.by_name {
            let Some(m) = new.by_name.get(name).cloned() else {
                out.removed.push(name.clone());
                continue;
            };
            if Arc::ptr_eq(&m, n) {
                continue;
            }
            if m.ino == n.ino {
                // A new version never keeps the old one's inode: a reader
                // that trusts the kernel's cached size (sendfile, splice)
                // would get the new bytes cut to the old length.
                let ino = fresh_ino.fetch_add(1, Ordering::Relaxed);
                let moved = Arc::new(Node { ino, ..Node::clone(&m) });
                new.by_ino.remove(&n.ino);
                new.by_ino.insert(moved.ino, moved.clone());
                new.by_name.insert(name.clone(), moved);
            }
            if m.secret == n.secret {
                new.rotated_out.insert(n.ino, n.clone());
            }
            out.entries.push(name.clone());
        }
        *guard = Arc::new(new);
        out
    }

    fn root_attr(&self) -> stat64 {
        let mut st = crate::sys::zeroed_stat();
        st.st_ino = ROOT;
        st.st_mode = libc::S_IFDIR | 0o555;
        st.st_nlink = 2;
        st.st_blksize = 4096;
        let t = self.mounted.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (st.st_mtime, st.st_mtime_nsec) = (t.as_secs() as i64, i64::from(t.subsec_nanos()));
        (st.st_ctime, st.st_ctime_nsec) = (st.st_mtime, st.st_mtime_nsec);
        (st.st_atime, st.st_atime_nsec) = (st.st_mtime, st.st_mtime_nsec);
        st
    }

    /// A volume mount whose owner (its container's user) is not learned
    /// yet: its attributes are not final (see [`WorkloadFs::learn_owner`]).
    pub fn owner_unknown(&self) -> bool {
        self.owner.unknown()
    }

    /// On a volume mount whose owner is still unknown: if task `tid` is
    /// its container's, learn the container's configured user from the
    /// container's own passwd. Blocking (attestation, a file read): called
    /// off the FUSE workers, while `tid` waits in its parked request, so
    /// its `/proc` entry is its own. True if the owner was learned now.
    pub fn learn_owner(&self, tid: i32, uid: u32, gid: u32) -> bool {
        let Some(want) = &self.owner.container else { return false };
        if self.owner.learned.get().is_some() {
            return false;
        }
        // Off the workers: wait, bounded, for Docker to describe the
        // caller's container (runc touches the mount before it can).
        self.shared.attestor.wait_pending(tid);
        let Ok(id) = self.shared.attestor.attest_task(tid, uid, gid) else { return false };
        // Docker describes the container only once its start is under way
        // (runc touches the mount before that): until then, ask again.
        match (id.container_id.as_deref(), &id.docker) {
            (Some(c), Some(d)) if c == want => {
                let root = std::path::PathBuf::from(format!("/proc/{tid}/root"));
                self.owner.learned.set(container_user(&root, &d.user)).is_ok()
            }
            _ => false,
        }
    }

    /// Whether inode `ino` shows a lease source (an open of it may have to
    /// wait for the caller's lease).
    pub fn is_leased(&self, ino: u64) -> bool {
        self.node(ino).is_some_and(|n| self.leased(&n))
    }

    /// Whether a node shows each caller its own content, read at open and
    /// served with direct I/O: a lease source (`dynamic:`/`cert:`), or a
    /// template that reads one (see [`crate::template::leased`]).
    fn leased(&self, n: &Node) -> bool {
        self.shared.leases.is_leased_node(&n.secret, n.version)
    }

    /// For an open of a leased file by task `tid`: None if the caller
    /// needs nothing issued (it has a live lease, or is no member of this
    /// mount's workload: the open refuses it); otherwise a future that
    /// ends when its lease is issued or failed. Attests the caller (quick
    /// once Docker described its container); never waits itself.
    pub fn lease_wait(&self, ino: u64, tid: i32, uid: u32, gid: u32) -> Option<crate::identity::docker::Wait> {
        let node = self.node(ino).filter(|n| self.leased(n))?;
        let id = self.shared.attestor.attest_task(tid, uid, gid).ok()?;
        if decide(&id, &self.workload) != Decision::Allow {
            return None;
        }
        let holder = crate::lease::Holder::of(&id, &self.workload.name);
        self.shared.leases.wait_for(&node.secret, node.version, &holder)
    }

    /// The containers that read `secret` through this mount.
    pub fn readers_of(&self, secret: &str) -> Vec<String> {
        let r = self.readers.lock().expect("readers lock");
        r.get(secret).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Remember that the container of `id` (if any) read `secret`, for
    /// notices and actions: no allocation when it is known already.
    fn note_reader(&self, id: &Identity, secret: &str) {
        let Some(c) = &id.container_id else { return };
        {
            let mut readers = self.readers.lock().expect("readers lock");
            if !readers.get(secret).is_some_and(|s| s.contains(c)) {
                readers.entry(secret.to_owned()).or_default().insert(c.clone());
            }
        }
        self.shared.readers.add(&self.workload.name, secret, c);
    }

    /// Forget a reader (it is gone).
    pub fn forget_reader(&self, secret: &str, container: &str) {
        if let Some(s) = self.readers.lock().expect("readers lock").get_mut(secret) {
            s.remove(container);
        }
    }

    /// How long the kernel may keep an entry or attributes: not at all
    /// while the owner is not learned, so it asks again.
    fn ttl(&self) -> Duration {
        if self.owner.unknown() { Duration::ZERO } else { TTL }
    }

    fn attr(&self, n: &Node) -> stat64 {
        file_attr(n, self.owner.resolve(), self.leased(n))
    }

    /// The node of `ino`, cloned under the view's read lock (see
    /// [`WorkloadFs::replace`]: how a rotation knows it may keep an inode).
    fn node(&self, ino: u64) -> Option<Arc<Node>> {
        let ino = self.leased_inos.base_of(ino).unwrap_or(ino);
        let view = self.view.read().expect("view lock");
        view.by_ino.get(&ino).or_else(|| view.rotated_out.get(&ino)).cloned()
    }

    /// Attest the caller, check it against this mount's workload and then
    /// the file's mode ([`super::access`]: the kernel no longer does),
    /// auditing the outcome. Refusals go through the audit log's
    /// per-caller limiter ([`AuditLog::deny`]).
    fn check_open(
        &self,
        ctx: &Context,
        node: &Node,
        ino: u64,
    ) -> io::Result<Option<(Arc<SecretBytes>, crate::lease::Holder)>> {
        let workload = self.workload.name.as_str();
        let event = |name, caller, reason| Event {
            caller,
            workload: Some(workload),
            path: Some(node.secret.as_str()),
            version: Some(node.version),
            reason,
            ..Event::new(name)
        };
        let audit = |e: &Event<'_>| self.shared.audit.record(e).map_err(|_| errno(libc::EIO));
        // Allowed opens: a caller's first of each file version in full,
        // repeats summed up (bounded lines, no write on a warm open).
        let audit_read = |e: &Event<'_>| {
            let who = e.caller.map(crate::limits::caller_key).unwrap_or_default();
            self.shared.audit.read(&who, e).map_err(|_| errno(libc::EIO))
        };
        // Refusals are limited per caller in the audit log (summed up).
        let deny = |who: &Identity, reason: &str| {
            let e = Event {
                caller: Some(who),
                workload: Some(workload),
                path: Some(node.secret.as_str()),
                version: Some(node.version),
                reason: Some(reason),
                ..Event::new(EventKind::Deny)
            };
            self.shared.audit.deny(&crate::limits::caller_key(who), &e).map_err(|_| errno(libc::EIO))?;
            Err(errno(libc::EACCES))
        };
        // The workload first: a caller that is not the workload's is
        // refused as such, whatever the file's mode; a member then needs
        // the mode to let it read (the check the kernel made before).
        // Never waits: the pool parked this open until Docker answered.
        // Policy decides admin (for the audit line only, here).
        let attested = self.shared.attestor.attest_task(ctx.pid, ctx.uid, ctx.gid);
        match attested.map(|id| crate::policy::admin::decided(id, &self.shared.admin)) {
            Err(e) => deny(&Identity::unattested(ctx.uid, ctx.gid, ctx.pid), &e.to_string()),
            Ok(id) => match decide(&id, &self.workload) {
                Decision::Allow => {
                    let st = self.attr(node);
                    let file = FileMode { uid: st.st_uid, gid: st.st_gid, mode: node.mode };
                    if let Err(why) = check_task(file, ctx.pid, ctx.uid, ctx.gid, Ids::Fs) {
                        return deny(&id, &why);
                    }
                    if self.leased(node) {
                        // The caller's own lease (or a template rendered
                        // from its own leases): issued while this open was
                        // parked (see pool), or EIO.
                        let holder = crate::lease::Holder::of(&id, workload);
                        // Only through its own inode: another's pages are another's.
                        if !self.leased_inos.owned_by(ino, &holder.container) {
                            return deny(&id, "opened through another caller's entry of a leased file");
                        }
                        return match self.shared.leases.body_for_node(&node.secret, node.version, &holder) {
                            Ok(body) => {
                                crate::metrics::METRICS
                                    .reads
                                    .get_or_create(&crate::metrics::secret_labels(workload, &node.secret))
                                    .inc();
                                if self.shared.audit_reads {
                                    audit_read(&event(EventKind::Read, Some(&id), None))?;
                                }
                                self.note_reader(&id, &node.secret);
                                Ok(Some((body, holder)))
                            }
                            Err(why) => {
                                audit(&event(EventKind::LeaseError, Some(&id), Some(&why)))?;
                                Err(errno(libc::EIO))
                            }
                        };
                    }
                    let freshness = node.health.as_ref().map_or(Freshness::Fresh, |h| h.freshness());
                    let inputs = node.template.as_ref().map(|t| t.describe());
                    match (&node.value, freshness) {
                        (None, _) if node.template.as_ref().is_some_and(|t| t.error.is_some()) => {
                            let why = node.template.as_ref().and_then(|t| t.error.as_deref());
                            let e =
                                Event { inputs: inputs.as_deref(), ..event(EventKind::TemplateError, Some(&id), why) };
                            audit(&e)?;
                            Err(errno(libc::EIO))
                        }
                        (None, _) => {
                            let why = "not fetched from its backend yet (is it reachable?)";
                            audit(&event(EventKind::BackendError, Some(&id), Some(why)))?;
                            Err(errno(libc::EIO))
                        }
                        (Some(_), Freshness::Expired) => {
                            let why = "the backend has been failing for longer than max_stale";
                            audit(&event(EventKind::StaleExpired, Some(&id), Some(why)))?;
                            Err(errno(libc::EIO))
                        }
                        (Some(_), fresh) => {
                            node.reads.inc();
                            if fresh == Freshness::Stale {
                                audit_read(&event(EventKind::StaleServe, Some(&id), None))?;
                            } else if self.shared.audit_reads {
                                let e = Event { inputs: inputs.as_deref(), ..event(EventKind::Read, Some(&id), None) };
                                audit_read(&e)?;
                            }
                            self.note_reader(&id, &node.secret);
                            Ok(None)
                        }
                    }
                }
                Decision::WrongWorkload => deny(&id, "caller does not match the workload"),
            },
        }
    }
}

impl FileSystem for WorkloadFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _capable: FsOptions) -> io::Result<FsOptions> {
        Ok(FsOptions::empty())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if parent != ROOT {
            return Err(errno(libc::ENOENT));
        }
        let name = name.to_str().map_err(|_| errno(libc::ENOENT))?;
        let view = self.view();
        let node = view.by_name.get(name).ok_or_else(|| errno(libc::ENOENT))?;
        let ttl = self.ttl();
        if self.leased(node) {
            // The caller's own inode, asked for again at every path walk
            // (a stranger gets the shared one, which no open gets through).
            let holder = match self.shared.attestor.attest_task(ctx.pid, ctx.uid, ctx.gid) {
                Ok(id) if decide(&id, &self.workload) == Decision::Allow => {
                    Some(crate::lease::Holder::of(&id, &self.workload.name).container)
                }
                Ok(_) => None,
                Err(_) => Some(super::leased::claimed_holder(ctx.pid, ctx.uid)),
            };
            let Some(holder) = holder else {
                return Ok(Entry {
                    inode: node.ino,
                    generation: 0,
                    attr: self.attr(node),
                    attr_flags: 0,
                    attr_timeout: Duration::ZERO,
                    entry_timeout: Duration::ZERO,
                });
            };
            let ino = self.leased_inos.ino_for(node.ino, &holder);
            let mut attr = self.attr(node);
            attr.st_ino = ino;
            return Ok(Entry {
                inode: ino,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: Duration::ZERO,
                entry_timeout: Duration::ZERO,
            });
        }
        Ok(Entry {
            inode: node.ino,
            generation: 0,
            attr: self.attr(node),
            attr_flags: 0,
            attr_timeout: ttl,
            entry_timeout: ttl,
        })
    }

    fn getattr(&self, _ctx: &Context, ino: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)> {
        if ino == ROOT {
            return Ok((self.root_attr(), TTL));
        }
        // An open file keeps its attributes after a rotation retired it.
        let held = handle.and_then(|h| self.handles.lock().expect("handles lock").get(&h).cloned());
        let node = held.or_else(|| self.node(ino)).ok_or_else(|| errno(libc::ENOENT))?;
        if self.leased(&node) {
            let mut st = self.attr(&node);
            st.st_ino = ino;
            return Ok((st, Duration::ZERO));
        }
        Ok((self.attr(&node), self.ttl()))
    }

    fn open(
        &self,
        ctx: &Context,
        ino: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if ino == ROOT {
            return Err(errno(libc::EISDIR));
        }
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(errno(libc::EROFS));
        }
        let node = self.node(ino).ok_or_else(|| errno(libc::ENOENT))?;
        let started = std::time::Instant::now();
        let checked = self.check_open(ctx, &node, ino);
        crate::metrics::METRICS.open_seconds.observe(started.elapsed().as_secs_f64());
        let own = checked?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let (node, opts) = match own {
            // This caller's own content: this handle only, never cached.
            Some((body, holder)) => {
                let keys = self.shared.leases.hold(&node.secret, node.version, &holder);
                self.leased.lock().expect("leased lock").insert(fh, LeasedHandle { holder, keys });
                (Arc::new(Node { value: Some(body), ..Node::clone(&node) }), OpenOptions::DIRECT_IO)
            }
            // The kernel may keep a file's pages: an inode's content
            // never changes (a new version is a new inode, see `replace`).
            None => (node, OpenOptions::KEEP_CACHE),
        };
        self.handles.lock().expect("handles lock").insert(fh, node);
        Ok((Some(fh), opts, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _ctx: &Context,
        _ino: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let node =
            self.handles.lock().expect("handles lock").get(&handle).cloned().ok_or_else(|| errno(libc::EBADF))?;
        let value = node.value.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let bytes = value.expose();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        w.write_all(&bytes[start..end])?;
        Ok(end - start)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _ctx: &Context,
        _ino: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles.lock().expect("handles lock").remove(&handle);
        if let Some(h) = self.leased.lock().expect("leased lock").remove(&handle) {
            self.shared.leases.unhold(&h.keys);
        }
        Ok(())
    }

    fn opendir(&self, _ctx: &Context, ino: u64, _flags: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        if ino != ROOT {
            return Err(errno(libc::ENOTDIR));
        }
        Ok((None, OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if ino != ROOT {
            return Err(errno(libc::ENOTDIR));
        }
        let view = self.view();
        let dots = [(ROOT, libc::DT_DIR, "."), (ROOT, libc::DT_DIR, "..")];
        let files = view.by_name.values().map(|n| (n.ino, libc::DT_REG, n.name.as_str()));
        for (i, (ino, kind, name)) in dots.into_iter().chain(files).enumerate().skip(offset as usize) {
            let entry = DirEntry { ino, offset: i as u64 + 1, type_: u32::from(kind), name: name.as_bytes() };
            if add_entry(entry)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _ctx: &Context, _ino: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    /// `access(2)`: nothing is writable; the root directory may be read
    /// and searched by all; a file is not executable, and readable as its
    /// mode says (checked as for an open, and a refusal audited, without
    /// attesting the caller: the open that may follow is attested).
    fn access(&self, ctx: &Context, ino: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            return Err(errno(libc::EROFS));
        }
        if ino == ROOT {
            return Ok(());
        }
        let node = self.node(ino).ok_or_else(|| errno(libc::ENOENT))?;
        if mask & libc::X_OK as u32 != 0 && node.mode & 0o111 == 0 {
            return Err(errno(libc::EACCES));
        }
        if mask & libc::R_OK as u32 == 0 {
            return Ok(());
        }
        let st = self.attr(&node);
        let file = FileMode { uid: st.st_uid, gid: st.st_gid, mode: node.mode };
        let Err(why) = check_task(file, ctx.pid, ctx.uid, ctx.gid, Ids::RealOrFs) else {
            return Ok(());
        };
        let who = Identity::unattested(ctx.uid, ctx.gid, ctx.pid);
        let e = Event {
            method: Some("access"),
            caller: Some(&who),
            workload: Some(self.workload.name.as_str()),
            path: Some(node.secret.as_str()),
            version: Some(node.version),
            reason: Some(&why),
            ..Event::new(EventKind::Deny)
        };
        self.shared.audit.deny(&crate::limits::caller_key(&who), &e).map_err(|_| errno(libc::EIO))?;
        Err(errno(libc::EACCES))
    }
}

#[cfg(test)]
mod tests {
    use super::container_user;
    use std::path::Path;

    #[test]
    fn container_users_resolve_like_runc() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/rootfs"));
        assert_eq!(container_user(root, "1000"), (Some(1000), None));
        assert_eq!(container_user(root, "1000:50"), (Some(1000), Some(50)));
        assert_eq!(container_user(root, "1001"), (Some(1001), Some(1002)));
        assert_eq!(container_user(root, "app"), (Some(1001), Some(1002)));
        assert_eq!(container_user(root, "app:staff"), (Some(1001), Some(50)));
        assert_eq!(container_user(root, "app:nogroup"), (Some(1001), None));
        assert_eq!(container_user(root, "ghost"), (None, None));
        assert_eq!(container_user(root, "broken"), (None, None));
        assert_eq!(container_user(root, ""), (None, None));
    }

    #[test]
    fn a_fifo_passwd_is_no_passwd_and_does_not_block() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let made = std::process::Command::new("mkfifo").arg(root.path().join("etc/passwd")).status().unwrap();
        assert!(made.success());
        // A blocking open would wait here for a writer forever.
        assert_eq!(container_user(root.path(), "1000"), (Some(1000), None));
        assert_eq!(container_user(root.path(), "app"), (None, None));
    }

    #[test]
    fn a_passwd_over_the_limit_is_not_read_at_all() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let mut text = String::from("app:x:1001:1002::/:/bin/sh\n");
        while text.len() <= super::MAX_DB {
            text.push_str("filler:x:5:5::/:/bin/sh\n");
        }
        std::fs::write(root.path().join("etc/passwd"), &text).unwrap();
        // Cut anywhere, a line could read as another user: none is read.
        assert_eq!(container_user(root.path(), "app"), (None, None));
        assert_eq!(container_user(root.path(), "1001"), (Some(1001), None));
        text.truncate(super::MAX_DB);
        text.truncate(text.rfind('\n').unwrap() + 1);
        std::fs::write(root.path().join("etc/passwd"), &text).unwrap();
        assert_eq!(container_user(root.path(), "app"), (Some(1001), Some(1002)));
    }

    #[test]
    fn a_device_node_passwd_is_never_opened() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // /dev/kmsg's numbers: opened for reading it would block (and as
        // /dev/watchdog, act). Made only where mknod is allowed (root).
        let made = std::process::Command::new("mknod")
            .arg(root.path().join("etc/passwd"))
            .args(["c", "1", "11"])
            .status()
            .is_ok_and(|s| s.success());
        if made {
            assert_eq!(container_user(root.path(), "app"), (None, None));
        }
    }

    #[test]
    fn a_container_passwd_cannot_point_at_the_hosts() {
        // etc/passwd there is a symlink climbing to the host's /etc/passwd.
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/rootfs-escape"));
        assert_eq!(container_user(root, "root"), (None, None));
    }
}
