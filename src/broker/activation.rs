//! systemd socket activation: the admin, workload and plugin sockets
//! taken from `LISTEN_FDS`/`LISTEN_FDNAMES` (names from each socket's
//! `FileDescriptorName=`: `admin`, `workload`, `plugin`), when
//! `LISTEN_PID` is this process. systemd keeps the sockets open while the
//! broker restarts, so connections wait in the backlog instead of
//! failing: above all, dockerd never finds a dead socket in
//! `/run/docker/plugins` (it stalls every volume create on one). See
//! `examples/keyhole.socket`.
#![forbid(unsafe_code)]

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// More than keyhole ever asks for.
const MAX_FDS: i32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of sockets (1-{MAX_FDS})")]
    Count(String),
    #[error("LISTEN_FDNAMES={0:?} does not name each passed socket admin, workload or plugin (FileDescriptorName=)")]
    Names(String),
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

/// The sockets systemd passed this process, if any (and only once).
pub fn take() -> Result<Activated, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else { return Ok(Activated::default()) };
    // Meant for another process (a parent that did not clear them).
    if pid.trim() != std::process::id().to_string() || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Activated::default());
    }
    let n: i32 = fds.trim().parse().ok().filter(|n| (1..=MAX_FDS).contains(n)).ok_or(ActivationError::Count(fds))?;
    let names_var = var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names_var.split(':').collect();
    if names.len() != n as usize {
        return Err(ActivationError::Names(names_var));
    }
    let mut a = Activated::default();
    for (i, name) in names.iter().enumerate() {
        let fd = FIRST_FD + i as i32;
        let slot = match *name {
            "admin" => &mut a.admin,
            "workload" => &mut a.workload,
            "plugin" => &mut a.plugin,
            _ => return Err(ActivationError::Names(names_var.clone())),
        };
        if slot.is_some() {
            return Err(ActivationError::Names(names_var.clone()));
        }
        let sock_err = |source| ActivationError::Socket { name: (*name).to_owned(), fd, source };
        let owned = crate::sys::take_inherited_socket(fd).map_err(sock_err)?;
        let l = UnixListener::from(owned);
        let at = l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
        tracing::info!(socket = name, fd, path = at.as_deref().unwrap_or("?"), "listening on a socket systemd holds");
        *slot = Some(l);
    }
    Ok(a)
}
