//! systemd socket activation: the admin, workload and plugin sockets
//! taken from `LISTEN_FDS`, when `LISTEN_PID` is this process. Each is
//! told by its name in `LISTEN_FDNAMES` (`FileDescriptorName=admin`,
//! `workload` or `plugin`) or else by the path it is bound to (the
//! configured one; a socket unit's sockets share one name). systemd keeps the sockets open while the
//! broker restarts, so connections wait in the backlog instead of
//! failing: above all, dockerd never finds a dead socket in
//! `/run/docker/plugins` (it stalls every volume create on one). See
//! `examples/keyhole.socket`.
#![forbid(unsafe_code)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// More than keyhole ever asks for.
const MAX_FDS: i32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of sockets (1-{MAX_FDS})")]
    Count(String),
    #[error(
        "socket {0} from systemd is none of the configured admin, workload and plugin sockets \
         (name it admin, workload or plugin with FileDescriptorName=, or listen on the configured path)"
    )]
    Unknown(String),
    #[error("systemd passed two {0} sockets")]
    Twice(&'static str),
    #[error("socket {name} (fd {fd}) from systemd: {source}")]
    Socket { name: String, fd: i32, source: std::io::Error },
}

/// The sockets systemd passed, by name; `None` where it passed none.
#[derive(Debug, Default)]
pub struct Activated {
    pub admin: Option<UnixListener>,
    pub workload: Option<UnixListener>,
    pub plugin: Option<UnixListener>,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The configured paths of the sockets systemd may hold.
pub struct Paths<'a> {
    pub admin: &'a Path,
    pub workload: &'a Path,
    pub plugin: Option<&'a Path>,
}

/// The sockets systemd passed this process, if any (and only once).
pub fn take(paths: Paths<'_>) -> Result<Activated, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else { return Ok(Activated::default()) };
    // Meant for another process (a parent that did not clear them).
    if pid.trim() != std::process::id().to_string() || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Activated::default());
    }
    let n: i32 = fds.trim().parse().ok().filter(|n| (1..=MAX_FDS).contains(n)).ok_or(ActivationError::Count(fds))?;
    let names_var = var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names_var.split(':').collect();
    let mut a = Activated::default();
    for i in 0..n {
        let fd = FIRST_FD + i;
        let name = names.get(i as usize).copied().unwrap_or_default();
        let sock_err = |source| ActivationError::Socket { name: name.to_owned(), fd, source };
        let l = UnixListener::from(crate::sys::take_inherited_socket(fd).map_err(sock_err)?);
        let at: Option<PathBuf> = l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
        let is = |p: &Path| at.as_deref() == Some(p);
        let which = match name {
            "admin" | "workload" | "plugin" => name,
            _ if is(paths.admin) => "admin",
            _ if is(paths.workload) => "workload",
            _ if paths.plugin.is_some_and(is) => "plugin",
            _ => return Err(ActivationError::Unknown(at.map_or(format!("fd {fd}"), |p| p.display().to_string()))),
        };
        let (slot, which) = match which {
            "admin" => (&mut a.admin, "admin"),
            "workload" => (&mut a.workload, "workload"),
            _ => (&mut a.plugin, "plugin"),
        };
        if slot.is_some() {
            return Err(ActivationError::Twice(which));
        }
        let path = at.as_ref().map_or("?".into(), |p| p.display().to_string());
        tracing::info!(socket = which, fd, %path, "listening on a socket systemd holds");
        *slot = Some(l);
    }
    Ok(a)
}
