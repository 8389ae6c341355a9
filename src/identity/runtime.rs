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
