//! Hitless restart and upgrade: a running broker hands its live FUSE
//! connections, its listening sockets and the state behind them to a
//! successor (`keyhole serve --takeover`, or SIGHUP, which starts one),
//! so no container ever sees a broken mount and no client a refused
//! connection.
//!
//! Over `<run-dir>/takeover.sock` (0600, the broker's uid only):
//!
//! 1. the running broker offers its state version;
//! 2. the successor accepts, or refuses (and exits with an error while the
//!    running broker carries on as if nothing happened);
//! 3. the running broker stops serving (gRPC and plugin calls finish, FUSE
//!    request threads stop; new requests wait in the kernel's queues),
//!    seals its audit log and sends the [`Handover`], then the `/dev/fuse`
//!    and listening-socket descriptors (SCM_RIGHTS);
//! 4. the successor acknowledges and the running broker exits at once,
//!    releasing the store; without an acknowledgement it serves again;
//! 5. the successor waits for that exit, opens the store, continues the
//!    audit chain from the handed head, and serves the same connections.
//!
//! Frames are a big-endian u32 length and a JSON [`Msg`]; descriptors
//! follow the state in batches of up to 200, each on one byte of data.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use rustix::net::{
    self, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use crate::fs::MountState;

/// The shape of [`Handover`]. A successor takes over only from a broker
/// that hands over exactly the version it reads.
pub const STATE_VERSION: u32 = 1;

/// How long either side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The listening sockets a broker serves, in the order their descriptors
/// travel after the mounts'.
#[derive(Debug)]
pub struct Listeners {
    pub admin: UnixListener,
    pub workload: UnixListener,
    pub plugin: Option<UnixListener>,
}

/// Everything a successor needs besides the descriptors.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    pub broker_version: String,
    pub next_ino: u64,
    /// The audit chain's head: (lines, hex HMAC of the last line).
    pub audit_seq: u64,
    pub audit_mac: String,
    pub mounts: Vec<MountState>,
    pub plugin: bool,
    /// The confirmed containers (an older broker hands none; an older
    /// successor ignores them).
    #[serde(default)]
    pub containers: Vec<crate::identity::docker::Exported>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Msg {
    Offer {
        state_version: u32,
        broker_version: String,
    },
    Accept,
    Refuse {
        reason: String,
    },
    State(Box<Handover>),
    /// The running broker could not hand over after all; it serves on.
    Failed {
        reason: String,
    },
    Ack,
}

fn send(sock: &mut UnixStream, msg: &Msg) -> anyhow::Result<()> {
    let body = serde_json::to_vec(msg)?;
    sock.write_all(&(body.len() as u32).to_be_bytes())?;
    sock.write_all(&body)?;
    Ok(())
}

fn recv(sock: &mut UnixStream) -> anyhow::Result<Msg> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len).context("the other broker hung up")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 256 << 20 {
        bail!("takeover message of {len} bytes is too large");
    }
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MESSAGE: usize = 200;

fn send_all_fds(sock: &UnixStream, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(batch.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(batch)) {
            bail!("cannot fit {} descriptors in one message", batch.len());
        }
        let sent = net::sendmsg(sock, &[IoSlice::new(b"F")], &mut control, SendFlags::NOSIGNAL)
            .context("cannot pass descriptors")?;
        if sent != 1 {
            bail!("cannot pass descriptors: the message was cut short");
        }
    }
    Ok(())
}

fn recv_all_fds(sock: &UnixStream, n: usize) -> anyhow::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(n);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    while fds.len() < n {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let got = net::recvmsg(sock, &mut [IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .context("cannot receive descriptors")?;
        if got.bytes == 0 {
            bail!("the other broker hung up after {} of {n} descriptors", fds.len());
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            bail!("descriptors were cut off in transit");
        }
        let before = fds.len();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(batch) = msg {
                fds.extend(batch);
            }
        }
        if fds.len() == before {
            bail!("a descriptor message arrived empty");
        }
    }
    if fds.len() != n {
        bail!("expected {n} descriptors, received {}", fds.len());
    }
    Ok(fds)
}

struct Peer {
    pid: i32,
    uid: u32,
}

fn peer(sock: &UnixStream) -> anyhow::Result<Peer> {
    let cred = net::sockopt::socket_peercred(sock).context("cannot identify the other broker")?;
    Ok(Peer { pid: cred.pid.as_raw_nonzero().get(), uid: cred.uid.as_raw() })
}

/// The running broker's side, on one accepted connection.
pub struct Outgoing {
    sock: UnixStream,
    pub peer_pid: i32,
}

impl Outgoing {
    /// Check the caller (the broker's own uid only) and offer our state
    /// version. `Ok(None)`: the successor refused; carry on serving.
    pub fn offer(sock: UnixStream) -> anyhow::Result<Option<Outgoing>> {
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(STEP_TIMEOUT))?;
        sock.set_write_timeout(Some(STEP_TIMEOUT))?;
        let cred = peer(&sock)?;
        let me = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))?;
        if cred.uid != me {
            bail!("takeover asked by uid {} (pid {}), not the broker's uid {me}; refused", cred.uid, cred.pid);
        }
        let mut out = Outgoing { sock, peer_pid: cred.pid };
        let offer = Msg::Offer { state_version: STATE_VERSION, broker_version: env!("CARGO_PKG_VERSION").to_owned() };
        send(&mut out.sock, &offer)?;
        match recv(&mut out.sock)? {
            Msg::Accept => Ok(Some(out)),
            Msg::Refuse { reason } => {
                tracing::warn!(pid = out.peer_pid, reason = %reason, "a successor refused to take over; still serving");
                Ok(None)
            }
            other => bail!("unexpected takeover message {other:?}"),
        }
    }

    /// Send the state and descriptors; true once the successor has them.
    pub fn hand(mut self, state: Handover, fds: &[OwnedFd]) -> anyhow::Result<()> {
        send(&mut self.sock, &Msg::State(Box::new(state)))?;
        send_all_fds(&self.sock, &fds.iter().map(AsFd::as_fd).collect::<Vec<_>>())?;
        match recv(&mut self.sock)? {
            Msg::Ack => Ok(()),
            other => bail!("unexpected takeover message {other:?}"),
        }
    }

    /// Tell the successor we could not hand over after all.
    pub fn fail(mut self, reason: &str) {
        let _ = send(&mut self.sock, &Msg::Failed { reason: reason.to_owned() });
    }
}

/// What a successor received: the state, the mounts' `/dev/fuse` files
/// and the listening sockets, and a pidfd of the broker it replaces.
#[derive(Debug)]
pub struct Received {
    pub state: Handover,
    pub mounts: Vec<(MountState, File)>,
    pub listeners: Listeners,
    pub predecessor_pid: i32,
}

/// The state version this binary reads; tests may pretend otherwise.
fn readable_version() -> u32 {
    std::env::var("KEYHOLE_TEST_STATE_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(STATE_VERSION)
}

/// The successor's side: take everything over from the broker serving on
/// `socket`, and wait until it has exited.
pub fn take_over(socket: &Path) -> anyhow::Result<Received> {
    let mut sock = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {}: only the broker's own user may take it over", socket.display())
        }
        _ => anyhow::anyhow!(
            "no broker to take over from at {} (is one running on this run dir?): {e}",
            socket.display()
        ),
    })?;
    sock.set_read_timeout(Some(STEP_TIMEOUT))?;
    sock.set_write_timeout(Some(STEP_TIMEOUT))?;
    let cred = peer(&sock)?;
    let pidfd = crate::sys::peer_pidfd(sock.as_raw_fd()).or_else(|_| crate::sys::pidfd_open(cred.pid))?;
    let Msg::Offer { state_version, broker_version } = recv(&mut sock)? else {
        bail!("the running broker did not offer its state");
    };
    let mine = readable_version();
    if state_version != mine {
        let reason = format!("it hands over state version {state_version}; this keyhole reads version {mine}");
        send(&mut sock, &Msg::Refuse { reason: reason.clone() })?;
        bail!(
            "cannot take over from keyhole {broker_version} (pid {}): {reason}. It keeps serving; to switch \
             anyway, stop it and start this one (mounts that containers hold are served again on start)",
            cred.pid
        );
    }
    send(&mut sock, &Msg::Accept)?;
    let state = match recv(&mut sock)? {
        Msg::State(s) => *s,
        Msg::Failed { reason } => bail!("the running broker could not hand over: {reason}; it keeps serving"),
        other => bail!("unexpected takeover message {other:?}"),
    };
    let n = state.mounts.len() + 2 + usize::from(state.plugin);
    let mut fds = recv_all_fds(&sock, n)?.into_iter();
    let mut next = || File::from(fds.next().expect("counted above"));
    let mut mounts = Vec::with_capacity(state.mounts.len());
    let mut handed = state.mounts;
    for st in handed.drain(..) {
        mounts.push((st, next()));
    }
    let listener = |f: File| UnixListener::from(OwnedFd::from(f));
    let admin = listener(next());
    let workload = listener(next());
    let plugin = state.plugin.then(|| listener(next()));
    send(&mut sock, &Msg::Ack)?;
    if !crate::sys::pidfd_wait_exit(&pidfd, STEP_TIMEOUT)? {
        bail!("the previous broker (pid {}) acknowledged the takeover but did not exit", cred.pid);
    }
    Ok(Received {
        state: Handover { mounts: Vec::new(), ..state },
        mounts,
        listeners: Listeners { admin, workload, plugin },
        predecessor_pid: cred.pid,
    })
}

impl Listeners {
    /// Copies of the descriptors, in the order [`take_over`] expects them.
    pub fn fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut fds = vec![self.admin.as_fd().try_clone_to_owned()?, self.workload.as_fd().try_clone_to_owned()?];
        if let Some(p) = &self.plugin {
            fds.push(p.as_fd().try_clone_to_owned()?);
        }
        Ok(fds)
    }
}
