//! The few calls into the kernel that have no safe wrapper in our
//! dependencies. Every `unsafe` block of the crate lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Make this process undumpable (no core dumps, no ptrace by non-root, no
/// `/proc/<pid>/mem` for others) and cap core files at 0 bytes.
pub fn harden_process() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes plain integers and changes
    // only this process's dumpable flag; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `zero` is a valid rlimit that outlives the call; the kernel
    // only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the file-creation mask; returns the previous one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory of ours.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and returns one.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// Lock `len` bytes at `ptr` in RAM and keep them out of core dumps.
/// Returns whether the lock was granted (it may exceed RLIMIT_MEMLOCK).
///
/// # Safety
/// `ptr..ptr+len` must be a live allocation owned by the caller, starting
/// on a page boundary, that no other object shares a page with: munlock
/// is not reference counted.
pub unsafe fn lock_pages(ptr: *mut u8, len: usize) -> bool {
    // SAFETY: the caller guarantees the range is its own whole pages;
    // madvise and mlock change only paging attributes of that range.
    unsafe {
        libc::madvise(ptr.cast(), len, libc::MADV_DONTDUMP);
        libc::mlock(ptr.cast(), len) == 0
    }
}

/// Undo [`lock_pages`], whether or not the lock took: the pages dump
/// again, so the kernel can merge their mapping back with its neighbours.
/// (Left split, every secret ever held would cost a mapping until the
/// process ran out of them: found by fuzzing.)
///
/// # Safety
/// Same range as was passed to [`lock_pages`].
pub unsafe fn unlock_pages(ptr: *mut u8, len: usize) {
    // SAFETY: see lock_pages; unlocking a range we own is always sound.
    unsafe {
        libc::munlock(ptr.cast(), len);
        libc::madvise(ptr.cast(), len, libc::MADV_DODUMP);
    }
}

/// A pidfd for the process at the other end of a connected Unix socket,
/// taken by the kernel at connect time (`SO_PEERPIDFD`, Linux 6.5+).
pub fn peer_pidfd(sock: RawFd) -> io::Result<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of the sizes given; the
    // kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(sock, libc::SOL_SOCKET, SO_PEERPIDFD, (&raw mut fd).cast(), &mut len) };
    if r != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether this kernel gives a pidfd for a socket's peer (`SO_PEERPIDFD`,
/// Linux 6.5+), tried on a socket pair of our own.
pub fn probe_peer_pidfd() -> io::Result<()> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    peer_pidfd(a.as_raw_fd()).map(drop)
}

fn pidfd_open_flags(pid: i32, flags: libc::c_long) -> io::Result<OwnedFd> {
    // SAFETY: a raw syscall with two integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_open(pid)`: the fallback where `SO_PEERPIDFD` is missing.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    pidfd_open_flags(pid, 0)
}

/// A pidfd for one task (thread) `tid`: `PIDFD_THREAD` (Linux 6.9+), or a
/// plain pidfd where `tid` leads its thread group (older kernels).
pub fn pidfd_open_task(tid: i32) -> io::Result<OwnedFd> {
    const PIDFD_THREAD: libc::c_long = libc::O_EXCL as libc::c_long;
    pidfd_open_flags(tid, PIDFD_THREAD).or_else(|_| pidfd_open_flags(tid, 0))
}

/// Wait up to `timeout` for the process behind `pidfd` to exit (its
/// pidfd polls readable); true if it has.
pub fn pidfd_wait_exit(pidfd: &OwnedFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec::try_from(timeout).map_err(io::Error::other)?;
    Ok(rustix::event::poll(&mut fds, Some(&timeout))? != 0)
}

/// Whether the task behind `pidfd` has exited; an error counts as exited.
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    pidfd_wait_exit(pidfd, std::time::Duration::ZERO).unwrap_or(true)
}

/// The pid a pidfd refers to now, from `/proc/self/fdinfo`: `None` once
/// that process has exited (the kernel reports -1), so a recycled pid
/// number can never be confused with the process the pidfd pins.
pub fn pidfd_pid(pidfd: &OwnedFd) -> io::Result<Option<i32>> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| io::Error::other("fdinfo of a pidfd has no Pid line"))?;
    Ok((pid > 0).then_some(pid))
}

fn cpath(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn mount_raw(
    src: &str,
    target: &std::path::Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = std::ffi::CString::new(src)?;
    let target = cpath(target)?;
    let fstype = fstype.map(std::ffi::CString::new).transpose()?;
    let data = data.map(std::ffi::CString::new).transpose()?;
    let opt = |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it; the kernel only reads them.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), opt(&fstype), flags, opt(&data).cast()) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Mount a FUSE filesystem served on `fd` at `target`: read-only, nosuid,
/// nodev, noexec, open to all users. No `default_permissions`: the broker
/// checks every open itself, the file's mode too (`fs::access`), so that
/// every refusal reaches it and is audited.
pub fn fuse_mount(target: &std::path::Path, fd: RawFd, max_read: usize) -> io::Result<()> {
    let data = format!("fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={max_read}");
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    mount_raw("keyhole", target, Some("fuse.keyhole"), flags, Some(&data))
}

/// Detach a mount (lazy unmount): it goes at once for new lookups.
pub fn umount_detach(target: &std::path::Path) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Make `dir` a mount point of its own (bind it onto itself).
pub fn bind_onto_itself(dir: &std::path::Path) -> io::Result<()> {
    let src = dir.to_str().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    mount_raw(src, dir, None, libc::MS_BIND, None)
}

/// Make the mount at `dir` and everything below it shared, so mounts made
/// there later propagate to the bind mounts containers took with rslave.
pub fn make_rshared(dir: &std::path::Path) -> io::Result<()> {
    mount_raw("none", dir, None, libc::MS_SHARED | libc::MS_REC, None)
}

/// Set O_NONBLOCK on a file descriptor.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a valid fd we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An all-zero `stat64`, to fill in field by field.
pub fn zeroed_stat() -> libc::stat64 {
    // SAFETY: stat64 is a C struct of integers (and private padding); the
    // all-zero bit pattern is a valid value of every field.
    unsafe { std::mem::zeroed() }
}

/// This process's `RLIMIT_NOFILE`: (soft, hard).
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid rlimit that outlives the call; the kernel
    // only writes it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one (systemd and most shells
/// start services at a soft 1024). Returns the limits now in force.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let r = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: `r` is a valid rlimit that outlives the call; the kernel
        // only reads it. Raising the soft limit up to the hard one needs
        // no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nofile()
}

/// The system allocator, with every block zeroed as it is freed (and the
/// old block of a `realloc` zeroed once copied). Whatever a buffer held —
/// a value in an h2 frame, a protobuf message, a reply — is gone from
/// the heap once the buffer is dropped, wherever in our dependencies it
/// was. The broker's binary installs it as its global allocator.
pub struct ZeroOnFree;

// SAFETY: every method forwards to `System` with the caller's own layout;
// the only addition is zeroing `layout.size()` bytes of a block the caller
// owns and gives up, before `System` takes it back.
unsafe impl std::alloc::GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (non-zero size).
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller owns `layout.size()` bytes at `ptr` (the
        // GlobalAlloc contract) and gives them up here. The volatile
        // writes are not elided although the block is freed right after.
        unsafe {
            zero_volatile(ptr, layout.size());
            std::alloc::System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // Never let `System.realloc` move a block: it would free the old
        // one unzeroed. Shrinking zeroes the tail it gives up and stays in
        // place only through a fresh block, too.
        // SAFETY: `new_size` is non-zero and, rounded to `layout.align()`,
        // does not overflow (the realloc contract), so the new layout is
        // valid; the copy is within both blocks; the old block is ours to
        // free.
        unsafe {
            let new_layout = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
            let new = std::alloc::System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// Zero `len` bytes at `ptr` so the compiler cannot drop the writes.
///
/// # Safety
/// `ptr..ptr+len` must be writable memory owned by the caller.
unsafe fn zero_volatile(ptr: *mut u8, len: usize) {
    // SAFETY: the caller owns the range. `black_box` makes the compiler
    // assume the zeroed memory is read afterwards, so the writes survive
    // dead-store elimination before `free` (a volatile write per byte
    // would be needlessly slow).
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    std::hint::black_box(ptr);
}

/// `openat2(dir, rel, flags)` resolving as if `dir` were `/` and never
/// through a magic link (`/proc/<pid>/fd/*` and the like).
fn openat2_in_root(dir: &OwnedFd, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let rel = std::ffi::CString::new(rel).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is a C struct of integers; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid dir fd, a NUL-terminated path and an open_how that
    // outlive the call, with its exact size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Read the regular file `rel` inside the directory tree at `root` (e.g. a
/// container's `/proc/<pid>/root`), at most `max` bytes, without ever
/// opening anything else for reading.
///
/// The path is resolved as if `root` were `/` (`RESOLVE_IN_ROOT`, no magic
/// links) to an `O_PATH|O_NOFOLLOW` fd, which opens nothing: a FIFO, a
/// socket, a device node (root in a container can `mknod` a `/dev/kmsg` or
/// `/dev/watchdog` as its `/etc/passwd`: opened by the broker, outside the
/// container's device cgroup, it would block or act), a symlink as the last
/// component, or a directory yields `Ok(None)`. Only a regular file is then
/// opened for reading, through that same fd (`/proc/self/fd/<n>`: the very
/// inode, which cannot turn into another between the two), non-blocking,
/// and checked again. `Ok(None)` also when it is absent; an error when it
/// cannot be resolved otherwise or holds more than `max` bytes
/// (`FileTooLarge`: a cut file would be read as another one).
pub fn open_regular_in_root(root: &std::path::Path, rel: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let dir: OwnedFd =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY).open(root)?.into();
    let path = match openat2_in_root(&dir, rel, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let seen = path.metadata()?; // fstat of the O_PATH fd: opens nothing
    if !seen.file_type().is_file() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", path.as_raw_fd()))?;
    let opened = file.metadata()?;
    if !opened.file_type().is_file() || (opened.dev(), opened.ino()) != (seen.dev(), seen.ino()) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, format!("{rel}: more than {max} bytes")));
    }
    Ok(Some(bytes))
}

/// The uid that owns a user namespace (`ioctl(NS_GET_OWNER_UID)` on an
/// open `/proc/<pid>/ns/user`), as this process's user namespace sees it:
/// whoever created it (0 for namespaces root made, such as Docker's with
/// userns-remap; the user's own uid for `unshare -U`).
pub fn userns_owner(ns: &std::fs::File) -> io::Result<u32> {
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704; // _IO(0xb7, 0x4)
    let mut uid: libc::uid_t = 0;
    // SAFETY: the ioctl writes one uid_t into `uid`, which is valid for
    // that write and outlives the call; `ns` is an open fd.
    let r = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_OWNER_UID as _, &raw mut uid) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uid)
}

/// The parent of a user namespace (`ioctl(NS_GET_PARENT)` on an open
/// `/proc/<pid>/ns/user`, or on a namespace this returned), as a new fd.
/// Fails with `EPERM` once the parent is outside this process's user
/// namespace (the initial one has none).
pub fn userns_parent(ns: &std::fs::File) -> io::Result<std::fs::File> {
    const NS_GET_PARENT: libc::c_ulong = 0xb702; // _IO(0xb7, 0x2)
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd (or
    // -1); `ns` is an open fd for the duration of the call.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_PARENT as _) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Take a listening socket this process inherited at `fd` (systemd's
/// socket activation, `LISTEN_FDS`): it must be an open socket; it is
/// marked close-on-exec. Call once per fd: the fd is owned from here on.
pub fn take_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    let mut st = zeroed_stat();
    // SAFETY: fstat64 only writes into `st`; an fd that is not open fails.
    if unsafe { libc::fstat64(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a socket")));
    }
    // SAFETY: F_SETFD on an open fd changes only its flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (fstat succeeded), was passed to this process
    // (LISTEN_PID is ours), and the caller takes each listed fd once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inotify watch for opens (an `O_PATH` fd is not one) of `paths`.
    struct Opens(OwnedFd);

    impl Opens {
        fn watch(paths: &[std::path::PathBuf]) -> Opens {
            // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            assert!(fd >= 0, "inotify: {}", io::Error::last_os_error());
            // SAFETY: a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            for p in paths {
                let c = cpath(p).unwrap();
                // SAFETY: a valid inotify fd and a NUL-terminated path that
                // outlives the call.
                assert!(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_OPEN) } >= 0);
            }
            Opens(fd)
        }

        /// Whether any watched file was opened since the watch began.
        fn any(&self) -> bool {
            let mut buf = [0u8; 4096];
            // SAFETY: `buf` is valid for writes of its length.
            unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 }
        }
    }

    fn mknod(path: &std::path::Path, kind: &str, dev: &[&str]) -> bool {
        std::process::Command::new("mknod").arg(path).arg(kind).args(dev).status().is_ok_and(|s| s.success())
    }

    #[test]
    fn only_a_regular_file_in_the_root_is_ever_opened() {
        let top = tempfile::tempdir().unwrap();
        let (root, outside) = (top.path().join("root"), top.path().join("outside"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("passwd"), b"host:x:0:0::/:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/passwd"), b"app:x:1001:1002::/:/bin/sh\n").unwrap();
        let read = |rel: &str| open_regular_in_root(&root, rel, 64);

        // A regular file: read. Absent: None.
        assert_eq!(read("etc/passwd").unwrap().unwrap(), b"app:x:1001:1002::/:/bin/sh\n");
        assert_eq!(read("/etc/passwd").unwrap().unwrap(), b"app:x:1001:1002::/:/bin/sh\n");
        assert!(read("etc/group").unwrap().is_none());
        // Larger than max: refused, not cut; exactly max: read.
        std::fs::write(root.join("etc/big"), vec![b'x'; 65]).unwrap();
        assert_eq!(read("etc/big").unwrap_err().kind(), io::ErrorKind::FileTooLarge);
        std::fs::write(root.join("etc/big"), vec![b'x'; 64]).unwrap();
        assert_eq!(read("etc/big").unwrap().unwrap().len(), 64);

        // A FIFO would block an open for reading: never opened.
        assert!(mknod(&root.join("etc/fifo"), "p", &[]));
        let started = std::time::Instant::now();
        assert!(read("etc/fifo").unwrap().is_none());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Device nodes (here /dev/null's and /dev/kmsg's numbers): never opened.
        if rustix::process::geteuid().is_root() {
            assert!(mknod(&root.join("dev/null"), "c", &["1", "3"]));
            assert!(mknod(&root.join("dev/kmsg"), "c", &["1", "11"]));
            assert!(read("dev/null").unwrap().is_none());
            assert!(read("dev/kmsg").unwrap().is_none());
        }
        // A directory: None.
        assert!(read("etc").unwrap().is_none());
        // None of them was opened (only looked at through an O_PATH fd).
        let mut specials = vec![root.join("etc/fifo")];
        if rustix::process::geteuid().is_root() {
            specials.extend([root.join("dev/null"), root.join("dev/kmsg")]);
        }
        let opens = Opens::watch(&specials);
        for rel in ["etc/fifo", "dev/null", "dev/kmsg"] {
            let _ = read(rel);
        }
        assert!(!opens.any(), "a special file was opened");
        let regular = Opens::watch(&[root.join("etc/passwd")]);
        assert!(read("etc/passwd").unwrap().is_some());
        assert!(regular.any(), "the watch sees an open");

        // Symlinks climbing out: the last component is never followed, and
        // `..` or an absolute target resolve inside the root.
        std::os::unix::fs::symlink("../../outside/passwd", root.join("etc/up")).unwrap();
        std::os::unix::fs::symlink(outside.join("passwd"), root.join("etc/abs")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", root.join("etc/magic")).unwrap();
        for link in ["etc/up", "etc/abs", "etc/magic"] {
            assert!(read(link).unwrap().is_none(), "{link}");
        }
        std::os::unix::fs::symlink("../..", root.join("top")).unwrap();
        std::os::unix::fs::symlink(top.path(), root.join("abstop")).unwrap();
        for path in ["top/outside/passwd", "abstop/outside/passwd", "../outside/passwd", "../../../outside/passwd"] {
            assert_eq!(read(path).unwrap(), None, "{path}: stays inside the root");
        }
        // A directory link inside the root still works.
        std::os::unix::fs::symlink("etc", root.join("etc2")).unwrap();
        assert_eq!(read("etc2/passwd").unwrap().unwrap(), b"app:x:1001:1002::/:/bin/sh\n");
        // Not a directory as root: an error.
        assert!(open_regular_in_root(&root.join("etc/passwd"), "x", 64).is_err());
    }
}
