//! Hitless restart and upgrade: a running broker hands its live FUSE
//! connections, its listening sockets and the state behind them to a
//! successor (`keyhole serve --takeover`, or SIGHUP, which starts one),
//! so no container ever sees a broken mount and no client a refused
//! connection.
//!
//! Over `<run-dir>/takeover.sock` (0600, the broker's uid only):
//!
//! 0. each side checks the other ([`check_peer`]): a process of this
//!    broker's uid in this broker's own pid and mount namespaces, pinned
//!    by a pidfd while its namespaces are read (not its executable path:
//!    after an upgrade the old binary reads `(deleted)`, and versioned
//!    install paths differ). Root elsewhere (a container with the run dir
//!    bound in) is refused before a byte is sent, and audited;
//! 1. the running broker offers its state version (the handshake up to
//!    the successor's answer runs off the broker's main loop, within
//!    [`HANDSHAKE_TIMEOUT`], so a peer that says nothing blocks nobody);
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

/// How long the running broker waits for a peer's answer to its offer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The other broker, as [`check_peer`] found it.
struct Peer {
    pid: i32,
    /// Pins the process checked: its pid cannot be reused while held.
    pidfd: OwnedFd,
}

/// Why a peer may not take part in a handover (names no secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Audits refused takeover peers: a burst of [`RefusalLog::BURST`]
/// `takeover_refused` lines, then one a second at most, the next line
/// counting those not written one by one.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// (lines written in this burst, when the burst began, not written)
    state: std::sync::Mutex<(u32, Option<std::time::Instant>, u64)>,
}

impl RefusalLog {
    const BURST: u32 = 10;

    pub fn refused(&self, audit: &crate::audit::AuditLog, why: &str) {
        let mut st = self.state.lock().expect("refusal lock");
        let now = std::time::Instant::now();
        // One line's credit back per second since the burst began.
        if let Some(t) = st.1 {
            let back = now.duration_since(t).as_secs().min(u64::from(Self::BURST)) as u32;
            if back > 0 {
                st.0 = st.0.saturating_sub(back);
                st.1 = Some(now);
            }
        }
        if st.0 >= Self::BURST {
            st.2 += 1;
            return;
        }
        let reason = match st.2 {
            0 => why.to_owned(),
            n => format!("{why} ({n} more refused before, not audited one by one)"),
        };
        st.0 += 1;
        st.1 = st.1.or(Some(now));
        st.2 = 0;
        drop(st);
        let event = crate::audit::Event {
            reason: Some(&reason),
            ..crate::audit::Event::new(crate::audit::EventKind::TakeoverRefused)
        };
        let _ = audit.record(&event);
    }
}

/// The (device, inode) of one of `/proc/<pid>/ns/*`.
fn ns_id(pid: &str, ns: &str) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(format!("/proc/{pid}/ns/{ns}"))?;
    Ok((md.dev(), md.ino()))
}

/// The peer of `sock` must be a process of our (effective) uid in our own
/// pid and mount namespaces. Its pidfd (`SO_PEERPIDFD`, taken by the
/// kernel at connect or listen time) pins it: its pid is read from the
/// pidfd, its namespaces from `/proc/<pid>/ns`, and the pidfd is checked
/// again afterwards, so a pid reused in between is never mistaken for it.
fn check_peer(sock: &UnixStream) -> Result<Peer, Refusal> {
    let refuse = |why: String| Refusal(why);
    let pidfd =
        crate::sys::peer_pidfd(sock.as_raw_fd()).map_err(|e| refuse(format!("cannot pin the peer process: {e}")))?;
    let pinned = || crate::sys::pidfd_pid(&pidfd).ok().flatten();
    let Some(pid) = pinned() else {
        return Err(refuse("the peer is in another pid namespace (not visible from this one) or has exited".into()));
    };
    let cred = net::sockopt::socket_peercred(sock).map_err(|e| refuse(format!("cannot identify the peer: {e}")))?;
    let (uid, me) = (cred.uid.as_raw(), rustix::process::geteuid().as_raw());
    if uid != me {
        return Err(refuse(format!("the peer (pid {pid}) runs as uid {uid}, not the broker's uid {me}")));
    }
    for ns in ["pid", "mnt"] {
        let theirs = ns_id(&pid.to_string(), ns)
            .map_err(|e| refuse(format!("cannot read the {ns} namespace of the peer (pid {pid}): {e}")))?;
        let ours = ns_id("self", ns).map_err(|e| refuse(format!("cannot read our own {ns} namespace: {e}")))?;
        if theirs != ours {
            let what = if ns == "pid" { "pid" } else { "mount" };
            return Err(refuse(format!("the peer (pid {pid}, uid {uid}) is in another {what} namespace")));
        }
    }
    if pinned() != Some(pid) {
        return Err(refuse(format!("the peer (pid {pid}) exited while it was checked")));
    }
    Ok(Peer { pid, pidfd })
}

/// The running broker's side, on one accepted connection.
pub struct Outgoing {
    sock: UnixStream,
    pub peer_pid: i32,
}

/// What came of offering our state to a peer.
pub enum Offered {
    /// The peer is a legitimate successor and accepted.
    Accepted(Outgoing),
    /// The successor cannot read our state version (it says why).
    Declined(String),
    /// The peer may not take over at all; nothing was sent to it.
    Refused(Refusal),
}

impl Outgoing {
    /// Check the caller ([`check_peer`]) and offer our state version,
    /// waiting at most [`HANDSHAKE_TIMEOUT`] for its answer. Blocking.
    pub fn offer(sock: UnixStream) -> anyhow::Result<Offered> {
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let peer = match check_peer(&sock) {
            Ok(p) => p,
            Err(r) => return Ok(Offered::Refused(r)),
        };
        let mut out = Outgoing { sock, peer_pid: peer.pid };
        let offer = Msg::Offer { state_version: STATE_VERSION, broker_version: env!("CARGO_PKG_VERSION").to_owned() };
        send(&mut out.sock, &offer)?;
        let answer = recv(&mut out.sock)?;
        // Invariant: the pidfd pinned the peer while it was checked; from
        // here the connection itself is the peer (SO_PEERCRED is fixed).
        drop(peer.pidfd);
        match answer {
            Msg::Accept => {
                out.sock.set_read_timeout(Some(STEP_TIMEOUT))?;
                out.sock.set_write_timeout(Some(STEP_TIMEOUT))?;
                Ok(Offered::Accepted(out))
            }
            Msg::Refuse { reason } => {
                tracing::warn!(pid = out.peer_pid, reason = %reason, "a successor refused to take over; still serving");
                Ok(Offered::Declined(reason))
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
    // The listening socket's credentials: the broker that bound it.
    let Peer { pid, pidfd } = check_peer(&sock).map_err(|r| {
        anyhow::anyhow!(
            "refusing to take over from the process serving {}: {r}; only a broker of this uid in this pid and \
             mount namespace may hand over",
            socket.display()
        )
    })?;
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
            pid
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
        bail!("the previous broker (pid {pid}) acknowledged the takeover but did not exit");
    }
    Ok(Received {
        state: Handover { mounts: Vec::new(), ..state },
        mounts,
        listeners: Listeners { admin, workload, plugin },
        predecessor_pid: pid,
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
