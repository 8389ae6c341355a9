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

/// A rotation that some containers asked to hear about (`grant --notify`,
/// `--restart`, `--exec`).
pub struct Notice {
    pub fs: Arc<WorkloadFs>,
    pub secret: String,
    pub version: u64,
    pub signal: Option<String>,
    pub on_change: crate::actions::OnChange,
}

/// Room for one notice to the kernel (an entry's name is at most 255 bytes).
const NOTICE_BUF: usize = 4096;

/// From this many mounts touched by one change on, the kernel is told
/// about them by a second thread (see [`MountTable::invalidating`]).
const PIPELINE_FROM: usize = 64;

/// `FUSE_NOTIFY_INVAL_ENTRY` (`enum fuse_notify_code`), and its
/// `FUSE_EXPIRE_ONLY` flag (protocol 7.38, Linux 6.2).
const NOTIFY_INVAL_ENTRY: i32 = 3;
const FUSE_EXPIRE_ONLY: u32 = 1;
/// `sizeof(struct fuse_out_header)` + `sizeof(struct fuse_notify_inval_entry_out)`.
const EXPIRE_HEAD: usize = 16 + 16;

/// Why an entry was not expired.
enum Expire {
    /// The kernel holds no such entry: nothing to do.
    NotCached,
    /// Not understood (a kernel before 6.2 would not know the flag), or
    /// not written: drop the entry instead.
    Refused,
}

/// Expire the kernel's entry `parent`/`name` (`FUSE_EXPIRE_ONLY`) rather
/// than drop it: the next lookup of the name asks us again and, finding
/// a new inode, drops the entry then. A rotation thus costs the kernel a
/// hash lookup per mount while the admin call waits, not the drop of the
/// entry and the eviction of the old inode (and its `FORGET`), which
/// follow at the next open instead. fuse-backend-rs writes this notice
/// without the flag, so it is written here: one `write` of
/// `fuse_out_header`, `fuse_notify_inval_entry_out` and the name.
fn expire_entry(dev: &std::fs::File, parent: u64, name: &str, buf: &mut [u8]) -> Result<(), Expire> {
    use std::io::Write as _;
    let msg = expire_message(parent, name, buf).ok_or(Expire::Refused)?;
    match (&*dev).write(msg) {
        Ok(n) if n == msg.len() => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(Expire::NotCached),
        _ => Err(Expire::Refused),
    }
}

/// The notice [`expire_entry`] writes, in `buf`; None if `name` cannot
/// be one (a NUL in it, or longer than `buf` holds).
fn expire_message<'b>(parent: u64, name: &str, buf: &'b mut [u8]) -> Option<&'b [u8]> {
    let len = EXPIRE_HEAD + name.len() + 1;
    if name.contains('\0') || len > buf.len() {
        return None;
    }
    let namelen = u32::try_from(name.len()).ok()?;
    let total = u32::try_from(len).ok()?;
    let msg = &mut buf[..len];
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg[4..8].copy_from_slice(&NOTIFY_INVAL_ENTRY.to_ne_bytes());
    msg[8..16].copy_from_slice(&0u64.to_ne_bytes());
    msg[16..24].copy_from_slice(&parent.to_ne_bytes());
    msg[24..28].copy_from_slice(&namelen.to_ne_bytes());
    msg[28..32].copy_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
    msg[EXPIRE_HEAD..len - 1].copy_from_slice(name.as_bytes());
    msg[len - 1] = 0;
    Some(msg)
}

impl MountTable {
    /// Tell the kernel what a view swap changed: expire the entries of
    /// names that lead to a new inode (see [`expire_entry`]), forget those
    /// of names that lead nowhere and, if a name went, the directory's
    /// attributes and listing.
    fn invalidate(conn: &Conn, swapped: &Swapped, buf: &mut [u8]) {
        let fd = conn.dev().as_raw_fd();
        for name in &swapped.entries {
            match expire_entry(conn.dev(), ROOT, name, buf) {
                // ENOENT: the kernel had nothing cached.
                Ok(()) | Err(Expire::NotCached) => continue,
                Err(Expire::Refused) => {}
            }
            let Ok(c) = CString::new(name.as_str()) else { continue };
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                let _ = conn.server.notify_inval_entry(w, ROOT, &c);
            }
        }
        for name in &swapped.removed {
            let Ok(c) = CString::new(name.as_str()) else { continue };
            if let Ok(w) = FuseDevWriter::<()>::new(fd, buf) {
                // ENOENT just means the kernel had nothing cached.
                let _ = conn.server.notify_inval_entry(w, ROOT, &c);
            }
        }
        if !swapped.removed.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expire_notice_is_the_kernels_inval_entry_with_the_expire_only_flag() {
        let mut buf = [0xffu8; NOTICE_BUF];
        let msg = expire_message(ROOT, "db-pass", &mut buf).unwrap();
        let u32_at = |at: usize| u32::from_ne_bytes(msg[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().unwrap());
        assert_eq!(msg.len(), 16 + 16 + 7 + 1);
        assert_eq!(u32_at(0) as usize, msg.len(), "fuse_out_header.len");
        assert_eq!(u32_at(4), 3, "fuse_out_header.error: FUSE_NOTIFY_INVAL_ENTRY");
        assert_eq!(u64_at(8), 0, "fuse_out_header.unique: 0 for a notice");
        assert_eq!((u64_at(16), u32_at(24), u32_at(28)), (ROOT, 7, 1), "parent, namelen, FUSE_EXPIRE_ONLY");
        assert_eq!(&msg[32..], b"db-pass\0");
        // Never a name the kernel would read differently.
        assert!(expire_message(ROOT, "a\0b", &mut buf).is_none());
        assert!(expire_message(ROOT, &"x".repeat(NOTICE_BUF), &mut buf).is_none());
    }
}
