//! `/proc/<pid>/cgroup` → container id.
//!
//! The cgroup file is written by the kernel, so it is what we trust;
//! `mountinfo` is under the workload's control and never consulted. Forms
//! recognised, per path segment:
//!
//! | runtime | segment |
//! |---|---|
//! | docker, cgroup v1 / cgroupfs driver | `/docker/<id>` |
//! | docker, systemd driver | `docker-<id>.scope` |
//! | containerd (CRI) | `cri-containerd-<id>.scope`, `/kubepods/.../<id>` |
//! | CRI-O | `crio-<id>.scope` |
//! | podman, systemd manager | `libpod-<id>.scope` (`libpod-conmon-*` is the host-side monitor) |
//! | podman, cgroupfs manager (no systemd) | `/libpod_parent/libpod-<id>` (its conmon: `/libpod_parent/conmon`) |
//!
//! `<id>` is 64 lowercase hex digits. Two different ids in one file — in
//! one line or across lines — is ambiguous and fails closed.
//!
//! An id found here is only a *claim*: anyone with a writable cgroup
//! subtree can name a directory `docker-<id>.scope` and move into it. So
//! [`Claim::delegated`] refuses claims made under a delegated subtree (a
//! `user@<uid>.service` segment anywhere in the file, or a directory on
//! the claiming path that root does not own, stat'ed under the broker's
//! own cgroup mounts, [`CgroupMounts`]), and the attestor then proves the
//! rest against the runtime (see `identity::docker`).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupError {
    #[error("cgroup file names two containers ({0:.12} and {1:.12})")]
    Conflict(String, String),
    #[error("cgroup line {0} is malformed")]
    Malformed(usize),
}

const PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

pub fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn segment_id(seg: &str) -> Option<&str> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    let s = PREFIXES.iter().find_map(|p| s.strip_prefix(p)).unwrap_or(s);
    is_container_id(s).then_some(s)
}

/// The container the cgroup file places its process in, if any.
pub fn container_id(cgroup_file: &str) -> Result<Option<String>, CgroupError> {
    Ok(claim(cgroup_file)?.map(|c| c.id))
}

/// A container id that a cgroup file names, and where it names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: String,
    /// `(controllers, path)` of every line whose path names the id
    /// (controllers empty on the cgroup v2 line).
    pub lines: Vec<(String, String)>,
    /// Some line of the file runs through a systemd-delegated subtree
    /// (`user@<uid>.service`), whether or not it names the id.
    pub under_user_service: bool,
}

/// A path segment systemd hands to a user (`user@1000.service`).
fn is_user_service(seg: &str) -> bool {
    seg.strip_prefix("user@").and_then(|s| s.strip_suffix(".service")).is_some()
}

/// The container id the cgroup file claims, with the lines that claim it.
pub fn claim(cgroup_file: &str) -> Result<Option<Claim>, CgroupError> {
    let mut found: Option<Claim> = None;
    let mut under_user_service = false;
    for (n, line) in cgroup_file.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        // hierarchy-id:controllers:path — the path may itself contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CgroupError::Malformed(n + 1));
        };
        under_user_service |= path.split('/').any(is_user_service);
        let mut named = false;
        for id in path.split('/').filter_map(segment_id) {
            match &found {
                Some(prev) if prev.id != id => {
                    return Err(CgroupError::Conflict(prev.id.clone(), id.to_owned()));
                }
                Some(_) => {}
                None => found = Some(Claim { id: id.to_owned(), lines: Vec::new(), under_user_service: false }),
            }
            named = true;
        }
        if let (true, Some(c)) = (named, found.as_mut()) {
            c.lines.push((controllers.to_owned(), path.to_owned()));
        }
    }
    Ok(found.map(|c| Claim { under_user_service, ..c }))
}

/// Why a claim is refused without asking the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegated {
    /// A `user@<uid>.service` segment: systemd delegated the subtree.
    UserService,
    /// A directory on the claiming path belongs to a user, not root.
    Owner { dir: PathBuf, uid: u32 },
    /// A directory on the claiming path is root's but group- or
    /// other-writable: anyone may make cgroups in it.
    Writable { dir: PathBuf, mode: u32 },
    /// A directory's `cgroup.procs` belongs to a user, who may move
    /// processes into it (systemd's `Delegate=` hands over these files).
    ProcsOwner { dir: PathBuf, uid: u32 },
}

impl std::fmt::Display for Delegated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delegated::UserService => write!(f, "it is under a user@.service subtree"),
            Delegated::Owner { dir, uid } => write!(f, "{} belongs to uid {uid}", dir.display()),
            Delegated::Writable { dir, mode } => write!(f, "{} is writable by others (mode {mode:04o})", dir.display()),
            Delegated::ProcsOwner { dir, uid } => write!(f, "{}/cgroup.procs belongs to uid {uid}", dir.display()),
        }
    }
}

impl Claim {
    /// Whether the claim was made under a delegated subtree, which makes it
    /// worthless: the user who holds the subtree names its directories.
    /// `facts` gives what a stat says of a directory ([`dir_facts`]),
    /// `None` when it cannot be seen from here (another cgroup namespace, a container's view): the
    /// namespace check against the runtime then decides alone.
    pub fn delegated(&self, mounts: &CgroupMounts, facts: impl Fn(&Path) -> Option<DirFacts>) -> Option<Delegated> {
        if self.under_user_service {
            return Some(Delegated::UserService);
        }
        for (controllers, path) in &self.lines {
            let Some((top, rel)) = mounts.locate(controllers, path) else { continue };
            let mut dir = top;
            for seg in rel.split('/').filter(|s| !s.is_empty()) {
                dir.push(seg);
                let Some(f) = facts(&dir) else { continue };
                if f.uid != 0 {
                    return Some(Delegated::Owner { dir, uid: f.uid });
                }
                if f.mode & 0o022 != 0 {
                    return Some(Delegated::Writable { dir, mode: f.mode & 0o7777 });
                }
                if let Some(uid) = f.procs_uid.filter(|u| *u != 0) {
                    return Some(Delegated::ProcsOwner { dir, uid });
                }
            }
        }
        None
    }
}

/// What decides whether a cgroup directory is root's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirFacts {
    pub uid: u32,
    /// The directory's mode bits.
    pub mode: u32,
    /// The owner of its `cgroup.procs`, if it can be stat'ed.
    pub procs_uid: Option<u32>,
}

/// The owner and mode of a directory and the owner of its
/// `cgroup.procs`, if the directory can be stat'ed.
pub fn dir_facts(dir: &Path) -> Option<DirFacts> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).ok()?;
    let procs_uid = std::fs::symlink_metadata(dir.join("cgroup.procs")).ok().map(|p| p.uid());
    Some(DirFacts { uid: m.uid(), mode: m.mode(), procs_uid })
}

/// One cgroup hierarchy mounted in the broker's view.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// Empty for cgroup v2; else the v1 controllers (and `name=...`).
    controllers: Vec<String>,
    /// The cgroup path mounted (mountinfo's root field), e.g. "/".
    root: String,
    at: PathBuf,
}

/// Where the broker sees each cgroup hierarchy, from its own
/// `/proc/self/mountinfo` (the broker's, never a workload's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    mounts: Vec<CgroupMount>,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let d = |k: usize| u32::from(b[i + k] - b'0');
            out.push(u8::try_from(d(1) * 64 + d(2) * 8 + d(3)).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl CgroupMounts {
    /// From the text of a mountinfo file.
    pub fn parse(mountinfo: &str) -> CgroupMounts {
        let mut mounts = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (Some(root), Some(at), Some(fstype)) = (f.get(3), f.get(4), r.first()) else { continue };
            let controllers = match *fstype {
                "cgroup2" => Vec::new(),
                "cgroup" => r
                    .get(2)
                    .map(|o| {
                        o.split(',')
                            .filter(|o| !matches!(*o, "rw" | "ro" | "xattr" | "noprefix" | "clone_children"))
                            .filter(|o| !o.starts_with("release_agent="))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => continue,
            };
            mounts.push(CgroupMount { controllers, root: unescape(root), at: PathBuf::from(unescape(at)) });
        }
        CgroupMounts { mounts }
    }

    /// The broker's own view (`<proc_root>/self/mountinfo`); empty if unreadable.
    pub fn of_self(proc_root: &Path) -> CgroupMounts {
        std::fs::read_to_string(proc_root.join("self/mountinfo")).map(|m| Self::parse(&m)).unwrap_or_default()
    }

    /// A fixed layout, for tests and a configured cgroup root: cgroup v2
    /// at `v2`, and each v1 controller list at its directory.
    pub fn fixed(v2: Option<&Path>, v1: &[(&str, &Path)]) -> CgroupMounts {
        let mut mounts: Vec<CgroupMount> = v2
            .map(|at| CgroupMount { controllers: Vec::new(), root: "/".into(), at: at.to_owned() })
            .into_iter()
            .collect();
        for (c, at) in v1 {
            let controllers = c.split(',').map(str::to_owned).collect();
            mounts.push(CgroupMount { controllers, root: "/".into(), at: at.to_path_buf() });
        }
        CgroupMounts { mounts }
    }

    /// The mount holding the hierarchy of a cgroup line, and `path`
    /// relative to it; `None` when this view does not show that path.
    fn locate(&self, controllers: &str, path: &str) -> Option<(PathBuf, String)> {
        let want: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        let m = self.mounts.iter().find(|m| {
            if want.is_empty() {
                m.controllers.is_empty()
            } else {
                !m.controllers.is_empty() && want.iter().all(|w| m.controllers.iter().any(|c| c == w))
            }
        })?;
        let root = m.root.trim_end_matches('/');
        let rel = path.strip_prefix(root)?;
        if !(rel.is_empty() || rel.starts_with('/')) || rel.split('/').any(|s| s == "..") {
            return None;
        }
        Some((m.at.clone(), rel.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ID: &str = "3f1c0a6b2d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeef";

    fn fixture(case: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/proc").join(case).join("cgroup");
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn every_runtime_form_yields_the_id() {
        for case in
            ["docker-v1", "docker-v2-systemd", "docker-v2-cgroupfs", "containerd", "crio", "podman", "podman-cgroupfs"]
        {
            assert_eq!(container_id(&fixture(case)).unwrap().as_deref(), Some(ID), "{case}");
        }
    }

    #[test]
    fn host_processes_have_no_container() {
        for case in ["host-v1", "host-v2", "podman-conmon", "podman-cgroupfs-conmon"] {
            assert_eq!(container_id(&fixture(case)).unwrap(), None, "{case}");
        }
    }

    #[test]
    fn conflicting_ids_fail_closed() {
        assert!(matches!(container_id(&fixture("conflict")), Err(CgroupError::Conflict(..))));
        let nested = format!("0::/docker/{ID}/docker/{}\n", "a".repeat(64));
        assert!(matches!(container_id(&nested), Err(CgroupError::Conflict(..))));
    }

    #[test]
    fn near_misses_are_not_ids() {
        for line in [
            format!("0::/docker/{}\n", &ID[..63]),
            format!("0::/docker/{}\n", ID.to_uppercase()),
            format!("0::/docker/{ID}x\n"),
            "0::/user.slice/user-1000.slice/session-2.scope\n".to_owned(),
        ] {
            assert_eq!(container_id(&line).unwrap(), None, "{line}");
        }
        assert_eq!(container_id("garbage\n"), Err(CgroupError::Malformed(1)));
    }

    fn mountinfo(case: &str) -> CgroupMounts {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/proc").join(case).join("mountinfo");
        CgroupMounts::parse(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }

    /// Directories owned by someone other than root, as a stat would say.
    fn owners(not_root: &'static [(&'static str, u32)]) -> impl Fn(&Path) -> Option<DirFacts> {
        move |p| Some(root_dir(not_root.iter().find(|(d, _)| Path::new(d) == p).map_or(0, |(_, u)| *u)))
    }

    /// A directory owned by `uid`, mode 0755, its cgroup.procs root's.
    fn root_dir(uid: u32) -> DirFacts {
        DirFacts { uid, mode: 0o40755, procs_uid: Some(0) }
    }

    #[test]
    fn a_root_directory_others_may_write_or_whose_procs_a_user_owns_is_delegated() {
        let m = mountinfo("hybrid");
        let c = claim(&fixture("delegated-v2")).unwrap().unwrap();
        let top = Path::new("/sys/fs/cgroup/unified/khattest");
        for mode in [0o40775, 0o40757, 0o40777] {
            let f = move |p: &Path| Some(if p == top { DirFacts { mode, ..root_dir(0) } } else { root_dir(0) });
            assert_eq!(c.delegated(&m, f), Some(Delegated::Writable { dir: top.into(), mode: mode & 0o7777 }));
        }
        let f = |p: &Path| Some(if p == top { DirFacts { procs_uid: Some(1000), ..root_dir(0) } } else { root_dir(0) });
        assert_eq!(c.delegated(&m, f), Some(Delegated::ProcsOwner { dir: top.into(), uid: 1000 }));
        // Root's, 0755, cgroup.procs root's or unseen: not delegated.
        assert_eq!(c.delegated(&m, |_| Some(DirFacts { procs_uid: None, ..root_dir(0) })), None);
        assert_eq!(c.delegated(&m, |_| Some(DirFacts { mode: 0o40555, ..root_dir(0) })), None);
        assert!(Delegated::Writable { dir: top.into(), mode: 0o777 }.to_string().contains("writable by others"));
    }

    #[test]
    fn the_claiming_lines_are_kept() {
        let c = claim(&fixture("docker-v1")).unwrap().unwrap();
        assert_eq!(c.id, ID);
        assert_eq!(c.lines.len(), 5, "{:?}", c.lines);
        assert_eq!(c.lines[2], ("cpu,cpuacct".to_owned(), format!("/docker/{ID}")));
        assert!(!c.under_user_service);
        assert_eq!(claim(&fixture("host-v1")).unwrap(), None);
    }

    #[test]
    fn a_claim_in_a_directory_a_user_owns_is_delegated() {
        let m = mountinfo("hybrid");
        let c = claim(&fixture("delegated-v2")).unwrap().unwrap();
        let owned = owners(&[("/sys/fs/cgroup/unified/khattest", 65534)]);
        assert_eq!(
            c.delegated(&m, owned),
            Some(Delegated::Owner { dir: "/sys/fs/cgroup/unified/khattest".into(), uid: 65534 })
        );
        // The leaf alone, made by the user inside a root-owned parent.
        let leaf = "/sys/fs/cgroup/unified/khattest/docker-3f1c0a6b2d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeef.scope";
        let owned_leaf = move |p: &Path| Some(root_dir(if p == Path::new(leaf) { 1000 } else { 0 }));
        assert!(matches!(c.delegated(&m, owned_leaf), Some(Delegated::Owner { uid: 1000, .. })));
        // All root's: not delegated (the namespace check decides).
        assert_eq!(c.delegated(&m, owners(&[])), None);

        let v1 = claim(&fixture("delegated-v1")).unwrap().unwrap();
        assert_eq!(v1.lines, [("pids".to_owned(), format!("/khattest/docker/{ID}"))]);
        let owned = owners(&[("/sys/fs/cgroup/pids/khattest/docker", 65534)]);
        assert!(matches!(v1.delegated(&m, owned), Some(Delegated::Owner { uid: 65534, .. })));
        // Another hierarchy's directories do not count for this claim.
        assert_eq!(v1.delegated(&m, owners(&[("/sys/fs/cgroup/unified/khattest", 65534)])), None);
    }

    #[test]
    fn a_claim_under_a_user_service_is_delegated_whatever_the_owners() {
        let m = mountinfo("hybrid");
        for case in ["podman", "podman-conmon"] {
            let text = format!("{}1:name=systemd:/docker/{ID}\n", fixture(case));
            let c = claim(&text).unwrap().unwrap();
            assert!(c.under_user_service, "{case}");
            assert_eq!(c.delegated(&m, owners(&[])), Some(Delegated::UserService), "{case}");
        }
        // Docker's own containers are never under one.
        for case in ["docker-v1", "docker-v2-systemd", "docker-v2-cgroupfs", "containerd", "crio"] {
            let c = claim(&fixture(case)).unwrap().unwrap();
            assert_eq!(c.delegated(&m, owners(&[])), None, "{case}");
        }
        assert!(!is_user_service("user-1000.slice") && !is_user_service("user@.slice"));
    }

    #[test]
    fn mountinfo_gives_each_hierarchy_its_directory() {
        let m = mountinfo("hybrid");
        let at = |c: &str, p: &str| m.locate(c, p).map(|(top, rel)| format!("{}{rel}", top.display()));
        assert_eq!(at("", "/a/b").as_deref(), Some("/sys/fs/cgroup/unified/a/b"));
        assert_eq!(at("pids", "/docker/x").as_deref(), Some("/sys/fs/cgroup/pids/docker/x"));
        assert_eq!(at("cpu,cpuacct", "/x").as_deref(), Some("/sys/fs/cgroup/cpu,cpuacct/x"));
        assert_eq!(at("name=systemd", "/x").as_deref(), Some("/sys/fs/cgroup/systemd/x"));
        assert_eq!(at("blkio", "/x"), None, "not mounted here");
        assert_eq!(at("", "/a/../../etc"), None);
        // A container's view: only its own subtree is mounted.
        let side = mountinfo("sidecar");
        let mine = "/docker/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(side.locate("pids", &format!("{mine}/sub")).map(|(_, r)| r).as_deref(), Some("/sub"));
        assert_eq!(side.locate("pids", &format!("/docker/{ID}")), None);
        assert_eq!(side.locate("pids", &format!("{mine}x")), None);
        assert_eq!(side.locate("memory", "/x").map(|(t, _)| t), Some(PathBuf::from("/sys/fs/cgroup/my mem")));
        assert_eq!(CgroupMounts::parse("garbage\n\n1 2 3"), CgroupMounts::default());
    }

    #[test]
    fn an_unseen_directory_leaves_the_decision_to_the_namespaces() {
        let c = claim(&fixture("delegated-v2")).unwrap().unwrap();
        assert_eq!(c.delegated(&mountinfo("hybrid"), |_| None), None);
        assert_eq!(c.delegated(&CgroupMounts::default(), |_| Some(root_dir(65534))), None);
        let fixed = CgroupMounts::fixed(Some(Path::new("/cg")), &[("pids", Path::new("/cg1/pids"))]);
        assert!(c.delegated(&fixed, |p| Some(root_dir(if p == Path::new("/cg/khattest") { 7 } else { 0 }))).is_some());
    }
}
