//! The kernel side of the mounts: mounting a FUSE connection at a
//! mount's path (on top of a predecessor's, see the module doc of
//! [`super`]), detaching, and reading `/proc/*/mountinfo` (mount points,
//! peer groups, whether a container holds a copy of a mount).

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::pool::Conn;
use super::workload::{self, WorkloadFs};
use super::{MAX_READ, Mount, MountKey, MountTable, Shape};

/// Mount points listed in `/proc/self/mountinfo` (field 5, unescaped).
pub(crate) fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mountinfo(p))).collect())
}

/// The peer group of the topmost mount at `path` (`shared:N`).
pub(crate) fn peer_group(mountinfo: &str, path: &Path) -> Option<String> {
    topmost_groups(mountinfo).remove(&*path.to_string_lossy()).flatten()
}

/// The peer group (`shared:N`) of the topmost mount at each mount point,
/// in one pass: the last line of a path is its topmost mount.
fn topmost_groups(mountinfo: &str) -> HashMap<String, Option<String>> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let path = unescape_mountinfo(l.split(' ').nth(4)?);
            Some((path, l.split(' ').find_map(|f| f.strip_prefix("shared:")).map(str::to_owned)))
        })
        .collect()
}

/// Which mounts some process, in any mount namespace, holds a slave copy
/// of — a container that bound it (rslave) — read once for all the mounts
/// a stop looks at: the broker's own mountinfo once, and each other mount
/// namespace's once, however many processes share it. (Asked per mount,
/// this read every process's whole mountinfo for every mount: 100 ms a
/// mount with 1,000 mounts, so a stop took minutes.)
struct Holders {
    /// The peer group of the topmost mount at each path.
    groups: HashMap<String, Option<String>>,
    /// The peer groups held as `master:N` by a process that counts.
    held: std::collections::HashSet<String>,
    /// `/proc` could not be listed: every mount counts as held (kept).
    unknown: bool,
}

impl Holders {
    fn read() -> Holders {
        let groups = std::fs::read_to_string("/proc/self/mountinfo").map(|m| topmost_groups(&m)).unwrap_or_default();
        let mut holders = Holders { groups, held: Default::default(), unknown: false };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            holders.unknown = true;
            return holders;
        };
        // A container runtime setting up some other container briefly
        // holds a copy of every host mount (before its pivot_root): that
        // is no holder.
        let runtime = |pid: &Path| {
            std::fs::read_to_string(pid.join("comm")).is_ok_and(|c| c.starts_with("runc") || c.starts_with("crun"))
        };
        // Only a holder root answers for counts: one in the broker's user
        // namespace (containers without userns-remap), or in a user
        // namespace root made (userns-remap). Any user can `unshare -U -r
        // -m` and hold a copy of every mount; that must not leave them all
        // dead at a stop.
        let own_user_ns = std::fs::read_link("/proc/self/ns/user").ok();
        let trusted = |pid: &Path| {
            let ns = pid.join("ns/user");
            match std::fs::read_link(&ns) {
                Ok(link) if Some(&link) == own_user_ns.as_ref() => true,
                Ok(_) => std::fs::File::open(&ns).and_then(|f| crate::sys::userns_owner(&f)).is_ok_and(|uid| uid == 0),
                Err(_) => false,
            }
        };
        let mut namespaces = std::collections::HashSet::new();
        for e in procs.filter_map(Result::ok) {
            let pid = e.path();
            if !e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                continue;
            }
            if runtime(&pid) || !trusted(&pid) {
                continue;
            }
            // The same mount namespace, the same slave copies.
            if std::fs::read_link(pid.join("ns/mnt")).is_ok_and(|ns| !namespaces.insert(ns)) {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(pid.join("mountinfo")) else { continue };
            let tags = info.lines().flat_map(|l| l.split(' ')).filter_map(|f| f.strip_prefix("master:"));
            holders.held.extend(tags.map(str::to_owned));
        }
        holders
    }

    /// Whether a process that counts holds a copy of the mount at `path`.
    fn hold(&self, path: &Path) -> bool {
        if self.unknown {
            return true;
        }
        let group = self.groups.get(&*path.to_string_lossy()).and_then(Option::as_ref);
        group.is_some_and(|g| self.held.contains(g))
    }
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

/// Make `run_dir` a shared mount point, so mounts made later propagate
/// into containers that bound it rslave, make its `workloads` and
/// `volumes` dirs, and return the mounts a previous broker left in them.
pub(super) fn prepare_run_dir(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let points = mount_points().context("cannot read /proc/self/mountinfo")?;
    if !points.iter().any(|p| p == run_dir) {
        crate::sys::bind_onto_itself(run_dir)
            .with_context(|| format!("cannot make {} a mount point (bind it onto itself)", run_dir.display()))?;
    }
    crate::sys::make_rshared(run_dir).with_context(|| format!("cannot make {} a shared mount", run_dir.display()))?;
    let dirs = [run_dir.join("workloads"), run_dir.join("volumes")];
    for dir in &dirs {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let mut leftovers: Vec<PathBuf> =
        points.into_iter().filter(|p| p.parent().is_some_and(|d| dirs.iter().any(|x| x == d))).collect();
    leftovers.dedup();
    Ok(leftovers)
}

impl MountTable {
    pub(super) fn mount(&self, key: &MountKey, shape: Shape) -> anyhow::Result<Mount> {
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
    pub(super) fn stop(&self, m: Mount) {
        self.pool.remove(&m.conn);
    }

    /// Detach every mount stacked at `path`; the directory stays (apps
    /// may be configured to bind it).
    pub(super) fn detach_all(path: &Path) {
        for _ in 0..256 {
            if crate::sys::umount_detach(path).is_err() {
                break; // EINVAL: nothing mounted there any more
            }
        }
    }

    /// A mount that is no longer wanted: detach it and remove its directory.
    pub(super) fn unmount(&self, key: &MountKey, m: Mount) {
        self.stop(m);
        let path = self.path_of(key);
        Self::detach_all(&path);
        let _ = std::fs::remove_dir(&path);
        tracing::info!(path = %path.display(), "unmounted");
    }

    /// Stop serving (clean shutdown). A mount that some container holds
    /// stays, so the next broker can mount over it and reach that
    /// container; one that nobody holds is detached.
    pub fn shutdown(&self) {
        if let Err(e) = self.pool.stop() {
            // Handed over: the mounts are the successor's. Or stopped already.
            tracing::warn!(error = %e, "not stopping the mounts");
            return;
        }
        let mut mounts = self.mounts.lock().expect("mounts lock");
        let holders = Holders::read();
        for (key, m) in std::mem::take(&mut *mounts).by_key {
            self.stop(m);
            let path = self.path_of(&key);
            if holders.hold(&path) {
                tracing::info!(path = %path.display(), "stopped serving; containers hold the mount, so it stays for the next broker");
            } else {
                Self::detach_all(&path);
                tracing::info!(path = %path.display(), "unmounted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
