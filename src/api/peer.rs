//! Unix-socket connections that carry their peer's kernel identity.
//!
//! At accept time we take `SO_PEERCRED` (uid, gid, pid as of connect) and
//! a pidfd for that process (`SO_PEERPIDFD`, or `pidfd_open` on older
//! kernels), and attach them to every request on the connection.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::identity::Peer;

pub struct PeerStream {
    inner: UnixStream,
    peer: Peer,
}

impl PeerStream {
    fn new(inner: UnixStream) -> io::Result<Self> {
        let cred = inner.peer_cred()?;
        let pid = cred.pid().unwrap_or(0);
        let pidfd =
            crate::sys::peer_pidfd(inner.as_raw_fd()).or_else(|_| crate::sys::pidfd_open(pid)).ok().map(Arc::new);
        Ok(Self { inner, peer: Peer { uid: cred.uid(), gid: cred.gid(), pid, pidfd } })
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
pub fn incoming(listener: UnixListener) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
            };
            let stream = accepted.and_then(|(s, _)| PeerStream::new(s));
            match stream {
                Ok(s) => {
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
