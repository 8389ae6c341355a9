//! Telling the kernel what a change did: the invalidation notices for
//! the entries a view swap changed, sent inline for a few
//! mounts and from a second thread for many ([`MountTable::invalidating`]),
//! and the rotations announced to containers that asked ([`Notice`]).

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use fuse_backend_rs::transport::FuseDevWriter;

use super::MountTable;
use super::pool::Conn;
use super::workload::{ROOT, Swapped, WorkloadFs};

/// A rotation that some containers asked to hear about (`grant --notify`).
pub struct Notice {
    pub fs: Arc<WorkloadFs>,
    pub secret: String,
    pub version: u64,
    pub signal: String,
}

/// Room for one notice to the kernel (an entry's name is at most 255 bytes).
const NOTICE_BUF: usize = 4096;

/// From this many mounts touched by one change on, the kernel is told
/// about them by a second thread (see [`MountTable::invalidating`]).
const PIPELINE_FROM: usize = 64;

impl MountTable {
    /// Tell the kernel what a view swap changed: forget the entries of
    /// names that lead elsewhere or nowhere and, if a name went, the
    /// directory's attributes and listing.
    fn invalidate(conn: &Conn, swapped: &Swapped, buf: &mut [u8]) {
        let fd = conn.dev().as_raw_fd();
        for name in &swapped.entries {
            let Ok(c) = CString::new(name.as_str()) else { continue };
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                // ENOENT just means the kernel had nothing cached.
                let _ = conn.server.notify_inval_entry(w, ROOT, &c);
            }
        }
        if swapped.gone {
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                let _ = conn.server.notify_inval_inode(w, ROOT, 0, 0);
            }
        }
    }

    /// Run `f`, which updates `mounts` mounts and hands each one's
    /// invalidations to the function it is given. From [`PIPELINE_FROM`]
    /// mounts on, a second thread tells the kernel while `f` goes on
    /// building the next views (each a syscall of a few µs: at 1,000
    /// mounts, most of a rotation's time); it is joined before this
    /// returns, so everything is told when the change returns. If that
    /// thread cannot be had, each is told inline.
    pub(super) fn invalidating<R>(mounts: usize, f: impl FnOnce(&mut dyn FnMut(&Arc<Conn>, Swapped)) -> R) -> R {
        let mut buf = [0; NOTICE_BUF];
        if mounts < PIPELINE_FROM {
            return f(&mut |conn, s| Self::invalidate(conn, &s, &mut buf));
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(Arc<Conn>, Swapped)>();
            // Dropped (and `rx` with it) if no thread can be had: each
            // send then fails and is told inline.
            let _ = std::thread::Builder::new().name("fuse-inval".into()).spawn_scoped(scope, move || {
                let mut buf = [0; NOTICE_BUF];
                for (conn, s) in rx {
                    Self::invalidate(&conn, &s, &mut buf);
                }
            });
            let r = f(&mut |conn, s| {
                if let Err(std::sync::mpsc::SendError((conn, s))) = tx.send((conn.clone(), s)) {
                    Self::invalidate(&conn, &s, &mut buf);
                }
            });
            drop(tx);
            r
        })
    }
}
