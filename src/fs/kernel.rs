//! The kernel side of the mounts: mounting a FUSE connection at a
//! mount's path (on top of a predecessor's, see the module doc of
//! [`super`]), detaching, and reading `/proc/*/mountinfo` (mount points,
//! peer groups, whether a container holds a copy of a mount).

use std::collections::BTreeMap;
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
