//! What every connection of the broker's listeners shares, whatever it
//! runs on (a Unix socket, TCP, TLS): the deadline wrapper [`Watched`]
//! and the count of calls under way ([`Activity`], [`CallGuard`],
//! [`Counted`]).
//!
//! [`Watched`] keeps what was seen on the wire (when the connection was
//! accepted, how much it has read and when it last did, since when a write
//! waits on the peer) and closes the connection (`TimedOut`) whenever it
//! waits on its peer past a deadline. The deadlines themselves, and
//! whatever else a connection holds (its places in the limits, its peer's
//! credentials), belong to its [`Watch`]: [`crate::api::peer`] for the
//! Unix sockets, [`crate::api::listen`] for remote admin and metrics.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Watched`] connection has seen on the wire.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub accepted: Instant,
    /// Bytes read so far (saturating).
    pub read: usize,
    /// When bytes last arrived (`accepted` until they do).
    pub last_read: Instant,
    /// Since when a write has been waiting for the peer to read.
    pub write_blocked: Option<Instant>,
}

/// A connection's own deadlines and state, for [`Watched`].
pub trait Watch {
    /// Why the connection must close now, or when to look again.
    fn deadline(&self, seen: &Seen, now: Instant) -> Result<Instant, &'static str>;

    /// Whether it was pushed out (closed before a read and whenever it
    /// waits; nothing logged); `cx` is woken when it is.
    fn pushed_out(&self, _cx: &mut Context<'_>) -> bool {
        false
    }

    /// The first bytes arrived.
    fn first_read(&mut self) {}

    /// Log the closing of the connection past a deadline.
    fn closing(&self, why: &'static str);
}

/// A connection closed past its [`Watch`]'s deadlines.
pub struct Watched<S, W> {
    inner: S,
    pub watch: W,
    seen: Seen,
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// Why a pushed-out connection closes.
const PUSHED_OUT: &str = "pushed out by a newer connection";

impl<S, W: Watch> Watched<S, W> {
    /// `inner`, accepted now; first woken after `first_wait`.
    pub fn new(inner: S, watch: W, first_wait: std::time::Duration) -> Self {
        let now = Instant::now();
        Watched {
            inner,
            watch,
            seen: Seen { accepted: now, read: 0, last_read: now, write_blocked: None },
            timer: Box::pin(tokio::time::sleep(first_wait)),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Called whenever the connection waits on its peer: close it past a
    /// deadline or when pushed out, else be woken at the next deadline.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.watch.pushed_out(cx) {
            return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, PUSHED_OUT));
        }
        loop {
            match self.watch.deadline(&self.seen, Instant::now()) {
                Err(why) => {
                    self.watch.closing(why);
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Ok(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    if self.timer.deadline() != at {
                        self.timer.as_mut().reset(at);
                    }
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn wrote<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.seen.write_blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                self.seen.write_blocked.get_or_insert_with(Instant::now);
                self.poll_deadline(cx).map(Err)
            }
        }
    }
}

impl<S: AsyncRead + Unpin, W: Watch + Unpin> AsyncRead for Watched<S, W> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.watch.pushed_out(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, PUSHED_OUT)));
        }
        let before = buf.filled().len();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            let n = buf.filled().len() - before;
            if n > 0 {
                this.seen.last_read = Instant::now();
                if this.seen.read == 0 {
                    this.watch.first_read();
                }
                this.seen.read = this.seen.read.saturating_add(n);
            }
            return Poll::Ready(r);
        }
        this.poll_deadline(cx).map(Err)
    }
}

impl<S: AsyncWrite + Unpin, W: Watch + Unpin> AsyncWrite for Watched<S, W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Calls under way on a connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    calls: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity { calls: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) })
    }

    /// One call begins; it ends when the guard drops (with the response
    /// body, for a streamed answer such as `audit --follow`: see
    /// [`Counted`]).
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// When the connection became idle, if it is.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().expect("activity lock"))
    }
}

/// A call under way (see [`Activity::begin`]).
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().expect("activity lock");
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// A response body that keeps its call counted until it is done with.
pub struct Counted<R> {
    body: R,
    _guard: Option<CallGuard>,
}

impl<R> Counted<R> {
    pub fn new(body: R, guard: Option<CallGuard>) -> Self {
        Counted { body, _guard: guard }
    }
}

impl<R: http_body::Body + Unpin> http_body::Body for Counted<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_counts_a_call_until_it_drops() {
        let a = Activity::new();
        assert!(a.idle_since().is_some());
        let g = a.begin();
        let h = a.begin();
        assert!(a.idle_since().is_none());
        drop(g);
        assert!(a.idle_since().is_none());
        let before = Instant::now();
        drop(h);
        assert!(a.idle_since().unwrap() >= before);
    }
}
