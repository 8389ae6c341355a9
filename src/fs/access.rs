//! The file-mode check of a mount's files, made by the broker (the mounts
//! have no `default_permissions`, so the kernel asks the broker about
//! every open and `access`, and every refusal is audited).
//!
//! The rule is the kernel's (`generic_permission` for reading a regular
//! file): the caller is the file's owner if its fsuid is the file's uid,
//! else of its group if its fsgid or one of its supplementary groups is
//! the file's gid, else other; the bits of that one class decide. If they
//! refuse, `CAP_DAC_OVERRIDE` or `CAP_DAC_READ_SEARCH` in the caller's
//! effective set still allows reading — but a capability held in a user
//! namespace other than the broker's counts only if the file's uid and
//! gid are both mapped in that namespace (`capable_wrt_inode_uidgid`).
//!
//! `access(2)` (without `AT_EACCESS`) checks with the real ids, and the
//! kernel drops the effective capabilities of a caller whose real uid is
//! not root in its user namespace (unless `SECBIT_NO_SETUID_FIXUP`,
//! which the broker cannot see: it fails closed). So for an access
//! request made with the real ids, only that root's capabilities count.
//!
//! A FUSE request carries only the fsuid and fsgid; the groups and
//! capabilities are read from `/proc/<tid>/status` of the calling task
//! (blocked in its syscall while we answer), and only when the mode bits
//! with the fsuid and fsgid alone do not already decide.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::Path;

const CAP_DAC_OVERRIDE: u64 = 1 << 1;
const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
/// More than any real status file; a bigger one is refused.
const STATUS_MAX: u64 = 64 * 1024;

/// A file as the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (0o7777 at most are looked at).
    pub mode: u32,
}

/// One line of a `uid_map` or `gid_map`: `inside outside count`, with
/// `outside` in the broker's user namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

fn mapped(map: &[IdRange], id: u32) -> bool {
    map.iter().any(|r| id >= r.outside && u64::from(id) < u64::from(r.outside) + u64::from(r.count))
}

/// Where the caller's capabilities hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserNs {
    /// The broker's own user namespace: over every file.
    Broker,
    /// Another: over files whose uid and gid it maps.
    Other { uid_map: Vec<IdRange>, gid_map: Vec<IdRange> },
}

/// The calling task's credentials, as far as reading a file goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The effective capability set (`CapEff`).
    pub cap_eff: u64,
    pub userns: UserNs,
}

/// Whether the class bits alone grant reading to `uid`/`gid`, whatever
/// the caller's supplementary groups: then its status need not be read.
pub fn granted_by_ids(f: FileMode, uid: u32, gid: u32) -> bool {
    let (owner, group, other) = (f.mode & 0o400 != 0, f.mode & 0o040 != 0, f.mode & 0o004 != 0);
    if uid == f.uid {
        owner
    } else if gid == f.gid {
        group
    } else {
        // Group or other, as the groups say: both must grant.
        group && other
    }
}

/// Whether `c` may read `f`; the refusal says why, in words for the
/// audit log.
pub fn may_read(f: FileMode, c: &Creds) -> Result<(), String> {
    let bits = if c.uid == f.uid {
        f.mode >> 6
    } else if c.gid == f.gid || c.groups.contains(&f.gid) {
        f.mode >> 3
    } else {
        f.mode
    };
    if bits & 0o4 != 0 {
        return Ok(());
    }
    let caps = c.cap_eff & (CAP_DAC_OVERRIDE | CAP_DAC_READ_SEARCH) != 0;
    let caps_hold = match &c.userns {
        UserNs::Broker => true,
        UserNs::Other { uid_map, gid_map } => mapped(uid_map, f.uid) && mapped(gid_map, f.gid),
    };
    if caps && caps_hold {
        return Ok(());
    }
    let mut why = format!("mode {:04o} owner {}:{} does not let uid {} read", f.mode & 0o7777, f.uid, f.gid, c.uid);
    if caps {
        why.push_str(
            " (its capabilities do not extend to this file: its owner is not mapped in the caller's user namespace)",
        );
    }
    Err(why)
}

/// Which of the task's ids the kernel put in the request: the fs ids for
/// an open; for `access(2)` the real ids, or the fs ids (`AT_EACCESS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    Fs,
    RealOrFs,
}

/// Read the credentials of task `tid` under `proc` (`/proc`), checking
/// that its ids are still the request's `uid`/`gid` (a task that died and
/// whose number was reused is refused).
pub fn read_creds(proc: &Path, tid: i32, uid: u32, gid: u32, ids: Ids) -> Result<Creds, String> {
    let task = proc.join(tid.to_string());
    let status = read_small(&task.join("status")).map_err(|e| format!("cannot read the caller's status: {e}"))?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim);
    let ids_of = |name: &str| -> Result<(u32, u32), String> {
        let v: Vec<u32> = field(name).unwrap_or_default().split_whitespace().filter_map(|v| v.parse().ok()).collect();
        match v[..] {
            [real, _, _, fs] => Ok((real, fs)),
            _ => Err(format!("the caller's status has no {name} line")),
        }
    };
    let ((ruid, fsuid), (rgid, fsgid)) = (ids_of("Uid")?, ids_of("Gid")?);
    let same = (fsuid, fsgid) == (uid, gid) || (ids == Ids::RealOrFs && (ruid, rgid) == (uid, gid));
    if !same {
        return Err("the calling task is gone (its ids are no longer the request's)".into());
    }
    let groups = field("Groups")
        .unwrap_or_default()
        .split_whitespace()
        .map(|g| g.parse::<u32>().map_err(|_| "the caller's status has a bad Groups line".to_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    let cap_eff = field("CapEff")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or("the caller's status has no CapEff line")?;
    // Only capabilities that could grant need their namespace known.
    let userns =
        if cap_eff & (CAP_DAC_OVERRIDE | CAP_DAC_READ_SEARCH) == 0 { UserNs::Broker } else { user_ns(proc, &task) };
    // access(2) with the real ids (the request's are the real ones, not
    // only the fs ones): the kernel cleared CapEff unless the real uid is
    // root in the caller's user namespace.
    let real_ids = ids == Ids::RealOrFs && (ruid, rgid) == (uid, gid);
    let cap_eff = if real_ids && !is_ns_root(uid, &userns) { 0 } else { cap_eff };
    Ok(Creds { uid, gid, groups, cap_eff, userns })
}

/// Whether host uid `uid` is root in the user namespace `ns`.
fn is_ns_root(uid: u32, ns: &UserNs) -> bool {
    match ns {
        UserNs::Broker => uid == 0,
        UserNs::Other { uid_map, .. } => uid_map.iter().any(|r| r.inside == 0 && r.outside == uid),
    }
}

/// The task's user namespace: the broker's, or another with its maps.
/// What cannot be read maps nothing (its capabilities do not count).
fn user_ns(proc: &Path, task: &Path) -> UserNs {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &Path| std::fs::metadata(p.join("ns/user")).map(|m| (m.dev(), m.ino()));
    match (ns(&proc.join("self")), ns(task)) {
        (Ok(mine), Ok(theirs)) if mine == theirs => UserNs::Broker,
        _ => UserNs::Other { uid_map: read_map(&task.join("uid_map")), gid_map: read_map(&task.join("gid_map")) },
    }
}

fn read_map(path: &Path) -> Vec<IdRange> {
    let text = read_small(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some(IdRange { inside: f.next()??, outside: f.next()??, count: f.next()?? })
        })
        .collect()
}

fn read_small(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?.take(STATUS_MAX).read_to_string(&mut text)?;
    Ok(text)
}

/// The broker's check of one read: by the ids alone when they decide,
/// else with the task's groups and capabilities from `proc`.
pub fn check_read(proc: &Path, f: FileMode, tid: i32, uid: u32, gid: u32, ids: Ids) -> Result<(), String> {
    if granted_by_ids(f, uid, gid) {
        return Ok(());
    }
    may_read(f, &read_creds(proc, tid, uid, gid, ids)?)
}

/// [`check_read`] of a live task in `/proc`, pinned with a pidfd while
/// its status is read: a task that exits meanwhile (its number could be
/// reused) is refused. Where no pidfd can be had for a thread (kernels
/// before 6.9), the ids in its status still have to be the request's.
pub fn check_task(f: FileMode, tid: i32, uid: u32, gid: u32, ids: Ids) -> Result<(), String> {
    if granted_by_ids(f, uid, gid) {
        return Ok(());
    }
    let pin = crate::sys::pidfd_open_task(tid).ok();
    let checked = check_read(Path::new("/proc"), f, tid, uid, gid, ids);
    if pin.as_ref().is_some_and(crate::sys::pidfd_exited) {
        return Err("the calling task exited while it was checked".into());
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(uid: u32, gid: u32, mode: u32) -> FileMode {
        FileMode { uid, gid, mode }
    }

    fn creds(uid: u32, gid: u32, groups: &[u32], cap_eff: u64) -> Creds {
        Creds { uid, gid, groups: groups.to_vec(), cap_eff, userns: UserNs::Broker }
    }

    #[test]
    fn the_owner_group_and_other_bits_decide_one_class_only() {
        let f = file(4242, 4300, 0o400);
        assert!(may_read(f, &creds(4242, 1, &[], 0)).is_ok());
        let e = may_read(f, &creds(4243, 4243, &[], 0)).unwrap_err();
        assert_eq!(e, "mode 0400 owner 4242:4300 does not let uid 4243 read");
        // The owner class decides for the owner, even if others may read.
        assert!(may_read(file(4242, 4300, 0o044), &creds(4242, 4300, &[], 0)).is_err());
        // Group by fsgid or by a supplementary group.
        let g = file(4242, 4300, 0o440);
        assert!(may_read(g, &creds(1000, 4300, &[], 0)).is_ok());
        assert!(may_read(g, &creds(1000, 1000, &[5, 4300], 0)).is_ok());
        assert!(may_read(g, &creds(1000, 1000, &[5], 0)).is_err());
        // A group member is held to the group bits, though others may read.
        let o = file(4242, 4300, 0o404);
        assert!(may_read(o, &creds(1000, 1000, &[4300], 0)).is_err());
        assert!(may_read(o, &creds(1000, 1000, &[], 0)).is_ok());
    }

    #[test]
    fn the_ids_alone_decide_only_when_groups_cannot_change_it() {
        assert!(granted_by_ids(file(1, 2, 0o400), 1, 9));
        assert!(!granted_by_ids(file(1, 2, 0o040), 1, 2), "the owner is held to the owner bits");
        assert!(granted_by_ids(file(1, 2, 0o040), 3, 2));
        assert!(granted_by_ids(file(1, 2, 0o444), 3, 4));
        assert!(!granted_by_ids(file(1, 2, 0o404), 3, 4), "a supplementary group 2 would refuse");
        assert!(!granted_by_ids(file(1, 2, 0o440), 3, 4), "a supplementary group 2 would grant");
        // Whenever the ids alone grant, so do the full credentials.
        for mode in 0..0o1000 {
            for (uid, gid) in [(1, 2), (1, 9), (3, 2), (3, 4)] {
                if granted_by_ids(file(1, 2, mode), uid, gid) {
                    for groups in [&[][..], &[2], &[7]] {
                        assert!(may_read(file(1, 2, mode), &creds(uid, gid, groups, 0)).is_ok(), "{mode:o}");
                    }
                }
            }
        }
    }

    #[test]
    fn dac_capabilities_read_anything_in_the_brokers_user_namespace() {
        let f = file(4242, 4242, 0o400);
        assert!(may_read(f, &creds(0, 0, &[], CAP_DAC_OVERRIDE)).is_ok());
        assert!(may_read(f, &creds(0, 0, &[], CAP_DAC_READ_SEARCH)).is_ok());
        // Docker's default set without both: refused (bits 0 and 3+).
        let e = may_read(f, &creds(0, 0, &[], 0xa800_04f9)).unwrap_err();
        assert_eq!(e, "mode 0400 owner 4242:4242 does not let uid 0 read");
        assert!(may_read(file(0, 0, 0o000), &creds(0, 0, &[], 0)).is_err(), "root without capabilities");
    }

    #[test]
    fn capabilities_in_another_user_namespace_need_the_owner_mapped() {
        let ns = |uid: (u32, u32, u32), gid: (u32, u32, u32)| UserNs::Other {
            uid_map: vec![IdRange { inside: uid.0, outside: uid.1, count: uid.2 }],
            gid_map: vec![IdRange { inside: gid.0, outside: gid.1, count: gid.2 }],
        };
        let root = |userns| Creds { userns, ..creds(100_000, 100_000, &[], CAP_DAC_OVERRIDE) };
        let f = file(4242, 4242, 0o400);
        assert!(may_read(f, &root(ns((0, 0, 65536), (0, 0, 65536)))).is_ok());
        let e = may_read(f, &root(ns((0, 100_000, 65536), (0, 100_000, 65536)))).unwrap_err();
        assert!(e.contains("not mapped in the caller's user namespace"), "{e}");
        // Both the uid and the gid must be mapped.
        assert!(may_read(f, &root(ns((0, 0, 65536), (0, 100_000, 65536)))).is_err());
        assert!(may_read(file(104_242, 104_242, 0o400), &root(ns((0, 100_000, 65536), (0, 100_000, 65536)))).is_ok());
        // The end of a range is not in it.
        assert!(may_read(file(65536, 0, 0o400), &root(ns((0, 0, 65536), (0, 0, 65536)))).is_err());
        assert!(may_read(f, &root(UserNs::Other { uid_map: vec![], gid_map: vec![] })).is_err());
    }

    /// A fake `/proc` with the broker's `self` and one task.
    fn fake_proc(status: &str, same_ns: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let (me, task) = (d.path().join("self"), d.path().join("77"));
        std::fs::create_dir_all(me.join("ns")).unwrap();
        std::fs::create_dir_all(task.join("ns")).unwrap();
        std::fs::write(me.join("ns/user"), "").unwrap();
        if same_ns {
            std::fs::hard_link(me.join("ns/user"), task.join("ns/user")).unwrap();
        } else {
            std::fs::write(task.join("ns/user"), "").unwrap();
        }
        std::fs::write(task.join("status"), status).unwrap();
        std::fs::write(task.join("uid_map"), "         0     100000      65536\n").unwrap();
        std::fs::write(task.join("gid_map"), "         0     100000      65536\n").unwrap();
        d
    }

    const STATUS: &str = "Name:\tcat\nUid:\t4243\t4243\t4243\t4243\nGid:\t4300\t4300\t4300\t4300\n\
                          Groups:\t4301 4302 \nCapInh:\t0000000000000000\nCapEff:\t00000000a80425fb\n";

    #[test]
    fn status_gives_groups_and_capabilities() {
        let d = fake_proc(STATUS, true);
        let c = read_creds(d.path(), 77, 4243, 4300, Ids::Fs).unwrap();
        assert_eq!((c.groups, c.cap_eff, c.userns), (vec![4301, 4302], 0xa804_25fb, UserNs::Broker));
        // A request whose ids are not the task's: refused.
        assert!(read_creds(d.path(), 77, 4242, 4300, Ids::Fs).unwrap_err().contains("gone"));
        assert!(read_creds(d.path(), 78, 4243, 4300, Ids::Fs).unwrap_err().contains("cannot read"));
        let empty = STATUS.replace("4301 4302 ", "").replace("00000000a80425fb", "0");
        let d = fake_proc(&empty, false);
        let c = read_creds(d.path(), 77, 4243, 4300, Ids::RealOrFs).unwrap();
        assert_eq!((c.groups.len(), c.userns), (0, UserNs::Broker), "no capability: its namespace is not read");
    }

    #[test]
    fn an_access_check_with_real_ids_counts_only_roots_capabilities() {
        // uid 4243 with CAP_DAC_OVERRIDE in CapEff (a file capability).
        let d = fake_proc(STATUS, true);
        let f = file(1, 1, 0o400);
        assert!(check_read(d.path(), f, 77, 4243, 4300, Ids::Fs).is_ok(), "an open: CapEff counts");
        let e = check_read(d.path(), f, 77, 4243, 4300, Ids::RealOrFs).unwrap_err();
        assert!(e.contains("does not let uid 4243 read"), "{e}");
        // Root keeps its capabilities for access(2).
        let root = STATUS.replace("4243", "0").replace("4300", "0");
        let d = fake_proc(&root, true);
        assert!(check_read(d.path(), f, 77, 0, 0, Ids::RealOrFs).is_ok());
        // faccessat(AT_EACCESS): the fs ids, not the real ones; CapEff counts.
        let eaccess = STATUS.replace("Uid:\t4243\t4243\t4243\t4243", "Uid:\t4243\t5000\t5000\t5000");
        let d = fake_proc(&eaccess, true);
        assert!(check_read(d.path(), f, 77, 5000, 4300, Ids::RealOrFs).is_ok());
        // In another user namespace: its root (host 100000) keeps them.
        let ns_root = STATUS.replace("4243", "100000");
        let d = fake_proc(&ns_root, false);
        let mapped = file(100_001, 100_001, 0o400);
        assert!(check_read(d.path(), mapped, 77, 100_000, 4300, Ids::RealOrFs).is_ok());
        let ns_user = STATUS.replace("4243", "100001");
        let d = fake_proc(&ns_user, false);
        assert!(check_read(d.path(), file(100_002, 100_002, 0o400), 77, 100_001, 4300, Ids::RealOrFs).is_err());
        assert!(check_read(d.path(), file(100_002, 100_002, 0o400), 77, 100_001, 4300, Ids::Fs).is_ok());
    }

    #[test]
    fn a_task_in_another_user_namespace_has_its_maps_read() {
        let d = fake_proc(STATUS, false);
        let c = read_creds(d.path(), 77, 4243, 4300, Ids::Fs).unwrap();
        let r = vec![IdRange { inside: 0, outside: 100_000, count: 65536 }];
        assert_eq!(c.userns, UserNs::Other { uid_map: r.clone(), gid_map: r });
        assert!(check_read(d.path(), file(4242, 4242, 0o400), 77, 4243, 4300, Ids::Fs).is_err());
        assert!(check_read(d.path(), file(100_001, 100_001, 0o400), 77, 4243, 4300, Ids::Fs).is_ok());
        // The ids alone grant: the status is not even read.
        assert!(check_read(d.path(), file(1, 2, 0o444), 99, 4243, 4300, Ids::Fs).is_ok());
        assert!(check_read(d.path(), file(1, 4301, 0o440), 77, 4243, 4300, Ids::Fs).is_ok(), "by Groups");
    }
}
