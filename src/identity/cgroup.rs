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
//! | podman | `libpod-<id>.scope` (`libpod-conmon-*` is the host-side monitor) |
//!
//! `<id>` is 64 lowercase hex digits. Two different ids in one file — in
//! one line or across lines — is ambiguous and fails closed.
#![forbid(unsafe_code)]

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupError {
    #[error("cgroup file names two containers ({0:.12} and {1:.12})")]
    Conflict(String, String),
    #[error("cgroup line {0} is malformed")]
    Malformed(usize),
}

const PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn segment_id(seg: &str) -> Option<&str> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    let s = PREFIXES.iter().find_map(|p| s.strip_prefix(p)).unwrap_or(s);
    is_container_id(s).then_some(s)
}

/// The container the cgroup file places its process in, if any.
pub fn container_id(cgroup_file: &str) -> Result<Option<String>, CgroupError> {
    let mut found: Option<&str> = None;
    for (n, line) in cgroup_file.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        // hierarchy-id:controllers:path — the path may itself contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CgroupError::Malformed(n + 1));
        };
        for id in path.split('/').filter_map(segment_id) {
            match found {
                Some(prev) if prev != id => {
                    return Err(CgroupError::Conflict(prev.to_owned(), id.to_owned()));
                }
                _ => found = Some(id),
            }
        }
    }
    Ok(found.map(str::to_owned))
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
        for case in ["docker-v1", "docker-v2-systemd", "docker-v2-cgroupfs", "containerd", "crio", "podman"] {
            assert_eq!(container_id(&fixture(case)).unwrap().as_deref(), Some(ID), "{case}");
        }
    }

    #[test]
    fn host_processes_have_no_container() {
        for case in ["host-v1", "host-v2", "podman-conmon"] {
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
}
