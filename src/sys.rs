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

/// # Safety
/// Same range as was passed to [`lock_pages`].
pub unsafe fn unlock_pages(ptr: *mut u8, len: usize) {
    // SAFETY: see lock_pages; unlocking a range we own is always sound.
    unsafe {
        libc::munlock(ptr.cast(), len);
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

/// `pidfd_open(pid)`: the fallback where `SO_PEERPIDFD` is missing.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a raw syscall with two integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
