//! Unix-socket connections that carry their peer's kernel identity.
//!
//! At accept time we take `SO_PEERCRED` (uid, gid, pid as of connect) and
//! a pidfd for that process (`SO_PEERPIDFD`, or `pidfd_open` on older
//! kernels), and attach them to every request on the connection.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::audit::AuditLog;
use crate::config::Limits;
use crate::identity::{Identity, Peer};
use crate::limits::Refusals;

pub struct PeerStream {
    inner: UnixStream,
    peer: Peer,
    /// Counts this connection against the limits while it is open.
    _admitted: Admitted,
}

/// The connection limits of one socket: in all, and per caller (uid and
/// cgroup, read at accept). A connection over either is closed at once,
/// and audited (at most a line a second per caller).
pub struct Gate {
    name: String,
    max: usize,
    max_per_caller: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
    audit: Arc<AuditLog>,
    refusals: Refusals,
}

impl Gate {
    pub fn new(name: impl Into<String>, limits: &Limits, audit: Arc<AuditLog>) -> Arc<Gate> {
        Arc::new(Gate {
            name: name.into(),
            max: limits.max_connections,
            max_per_caller: limits.max_connections_per_caller,
            open: Mutex::default(),
            audit,
            refusals: Refusals::default(),
        })
    }

    fn admit(self: &Arc<Self>, peer: &Peer) -> Option<Admitted> {
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", peer.pid)).unwrap_or_default();
        let key = format!("uid {} {}", peer.uid, cgroup.lines().next().unwrap_or("?"));
        let refused = {
            let mut open = self.open.lock().expect("gate lock");
            let (total, per) = &mut *open;
            let mine = per.get(&key).copied().unwrap_or(0);
            if *total >= self.max {
                Some(format!("max_connections ({}) reached on {}", self.max, self.name))
            } else if mine >= self.max_per_caller {
                Some(format!("max_connections_per_caller ({}) reached on {}", self.max_per_caller, self.name))
            } else {
                *total += 1;
                per.insert(key.clone(), mine + 1);
                None
            }
        };
        match refused {
            None => Some(Admitted { gate: self.clone(), key }),
            Some(limit) => {
                let who = Identity { uid: peer.uid, gid: peer.gid, pid: peer.pid, ..Identity::default() };
                self.refusals.refused(&self.audit, &key, &limit, Some(&who));
                None
            }
        }
    }
}

struct Admitted {
    gate: Arc<Gate>,
    key: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().expect("gate lock");
        let (total, per) = &mut *open;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.key);
            }
        }
    }
}

impl PeerStream {
    /// The stream, if the gate admits its peer.
    fn new(inner: UnixStream, gate: &Arc<Gate>) -> io::Result<Option<Self>> {
        let cred = inner.peer_cred()?;
        let pid = cred.pid().unwrap_or(0);
        let pidfd =
            crate::sys::peer_pidfd(inner.as_raw_fd()).or_else(|_| crate::sys::pidfd_open(pid)).ok().map(Arc::new);
        let peer = Peer { uid: cred.uid(), gid: cred.gid(), pid, pidfd };
        Ok(gate.admit(&peer).map(|admitted| Self { inner, peer, _admitted: admitted }))
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accept connections for tonic. Accept errors (such as running out of
/// file descriptors) are logged and retried after a pause; they never end
/// the server.
pub fn incoming(listener: UnixListener, gate: Arc<Gate>) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
            };
            let stream = accepted.and_then(|(s, _)| PeerStream::new(s, &gate));
            match stream {
                // Over a limit: closed as it drops.
                Ok(None) => {}
                Ok(Some(s)) => {
                    if tx.send(Ok(s)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
