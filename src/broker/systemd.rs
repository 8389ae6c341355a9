//! The systemd notification protocol (`Type=notify`), just the parts the
//! broker uses: READY=1, MAINPID= across a takeover, and BARRIER=1 so the
//! outgoing broker exits only once systemd follows its successor.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{self, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};

/// `$NOTIFY_SOCKET`, if systemd set one ('@' starts an abstract name).
fn socket() -> Option<SocketAddrUnix> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name).ok(),
        None => SocketAddrUnix::new(bytes).ok(),
    }
}

fn send(addr: &SocketAddrUnix, state: &str, control: &mut SendAncillaryBuffer<'_, '_, '_>) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    net::sendmsg_addr(&sock, addr, &[IoSlice::new(state.as_bytes())], control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Tell systemd `state` (e.g. "READY=1"); nothing happens outside systemd.
pub fn notify(state: &str) {
    let Some(addr) = socket() else { return };
    if let Err(e) = send(&addr, state, &mut SendAncillaryBuffer::default()) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Wait (up to `timeout`) until systemd has processed every notification
/// sent before: it closes the pipe end passed with BARRIER=1.
pub fn barrier(timeout: Duration) {
    let Some(addr) = socket() else { return };
    let wait = || -> std::io::Result<()> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let fds = [write.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        send(&addr, "BARRIER=1", &mut control)?;
        drop(write);
        let mut poll = [PollFd::new(&read, PollFlags::HUP)];
        let timeout = Timespec::try_from(timeout).map_err(std::io::Error::other)?;
        if rustix::event::poll(&mut poll, Some(&timeout))? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        Ok(())
    };
    if let Err(e) = wait() {
        tracing::warn!(error = %e, "systemd did not confirm our notifications");
    }
}
