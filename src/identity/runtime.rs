//! The configured container runtimes (`[[runtime]]`), connected: which
//! ones the broker asks about containers, and on which sockets. A socket
//! is only ever the configured one — never derived from a caller's
//! cgroup or uid (SPIRE's rootless-Podman attestation trusted a socket
//! path a caller could steer, spiffe/spire#7293).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use super::docker::DockerCache;
use crate::config::RuntimeConfig;
use crate::policy::Runtime;

/// Why the runtimes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot use the {kind} socket {socket}: {source}")]
    Connect { kind: Runtime, socket: String, source: bollard::errors::Error },
    #[error(
        "refusing the {kind} socket {socket}: {why}; only a root-owned runtime is asked about containers \
         (rootless Podman is not attested: its containers match only unix: selectors)"
    )]
    NotRoots { kind: Runtime, socket: String, why: String },
}

/// Why a runtime socket (or the directory holding it) is not root's
/// alone, if it is not: a user who controls the socket answers for every
/// container it names. `None` when it is root's, or does not exist yet.
pub fn not_roots(socket: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(socket) {
        if m.uid() != 0 {
            return Some(format!("it belongs to uid {}", m.uid()));
        }
    }
    let dir = socket.parent()?;
    let m = std::fs::metadata(dir).ok()?;
    if m.uid() != 0 {
        return Some(format!("{} belongs to uid {}", dir.display(), m.uid()));
    }
    if m.mode() & 0o002 != 0 && m.mode() & 0o1000 == 0 {
        return Some(format!("anyone may replace it in {} (mode {:04o})", dir.display(), m.mode() & 0o7777));
    }
    None
}

/// The runtimes to ask, in order: every `[[runtime]]` table (a missing
/// socket is waited for: its events stream reconnects), or the implicit
/// Docker default if its socket exists. `None` when there is none: then
/// no container is ever confirmed, and `docker:`/`container:` selectors
/// never match.
pub fn connect(
    runtimes: &[RuntimeConfig],
    rt: tokio::runtime::Handle,
) -> Result<Option<Arc<DockerCache>>, RuntimeError> {
    let mut using: Vec<(Runtime, PathBuf)> = Vec::new();
    for r in runtimes {
        if let Some(why) = not_roots(&r.socket) {
            return Err(RuntimeError::NotRoots { kind: r.kind, socket: r.socket.display().to_string(), why });
        }
        if r.socket.exists() {
            tracing::info!(runtime = %r.kind, socket = %r.socket.display(), "asking this runtime about containers");
        } else if r.explicit {
            tracing::warn!(runtime = %r.kind, socket = %r.socket.display(), "the runtime's socket does not exist (yet): its containers are confirmed once it does");
        } else {
            tracing::info!(socket = %r.socket.display(), "no Docker socket: docker:* selectors never match");
            continue;
        }
        using.push((r.kind, r.socket.clone()));
    }
    if using.is_empty() {
        return Ok(None);
    }
    DockerCache::connect_all(&using, rt).map(Some).map_err(|source| {
        let (kind, socket) = using.first().map(|(k, s)| (*k, s.display().to_string())).unwrap_or_default();
        RuntimeError::Connect { kind, socket, source }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_runtime_socket_a_user_controls_is_refused() {
        if !nix_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("podman.sock");
        assert_eq!(not_roots(&sock), None, "not there yet, in root's directory");
        std::fs::write(&sock, b"").unwrap();
        assert_eq!(not_roots(&sock), None);
        std::os::unix::fs::chown(&sock, Some(65534), None).unwrap();
        assert!(not_roots(&sock).unwrap().contains("uid 65534"));
        std::fs::remove_file(&sock).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(not_roots(&sock).unwrap().contains("anyone may replace it"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(not_roots(&sock), None, "a sticky directory: only its owner replaces it");
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        assert!(not_roots(&sock).unwrap().contains("belongs to uid 65534"));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let cfg = RuntimeConfig { kind: Runtime::Podman, socket: sock, explicit: true };
        let e = connect(&[cfg], rt.handle().clone()).unwrap_err().to_string();
        assert!(e.contains("rootless Podman is not attested"), "{e}");
    }

    fn nix_root() -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }
}
