//! The API server's connections: what `serve` accepts and hands to the
//! router, with the one thing axum's own listener lacks, a bound on how long
//! a write to the client may make no progress.
//!
//! A live-update stream writes for as long as it is open. When its client
//! stops reading (hung, suspended, a proxy that stopped draining), the TCP
//! window fills, the writes block, and without a bound the response, its
//! connection and its place under the stream limits are held for ever.
//! Every connection here carries a [`WriteWatch`]; a stream engages it
//! ([`WriteWatch::engage`]) with `VM_STREAM_WRITE_TIMEOUT_MS`, and from then
//! on a write to that connection (an event or a heartbeat, whatever is
//! waiting to go out) that makes no progress for that long fails: the
//! connection closes, the response and its subscription are dropped, and
//! the stream counts as `stalled` ([`WriteWatch::stalled`]). Other responses
//! are not bounded (yet): their connections never engage the watch.
//!
//! Progress is measured at the socket, not at the body: a write counts as
//! progress when the kernel takes any of it. A client whose kernel still
//! acknowledges data (its receive buffer not yet full) is indistinguishable
//! there from an idle one; its stream ends once the buffers are full, which
//! events do in moments and heartbeats alone only after hours.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::ConnectInfo;
use axum::middleware::AddExtension;
use axum::serve::{IncomingStream, Serve};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tower::Layer;

/// One connection's write deadline, shared between the connection and the
/// requests it carries (a request extension). Off until engaged.
#[derive(Clone, Default)]
pub struct WriteWatch(Arc<WatchState>);

#[derive(Default)]
struct WatchState {
    /// 0: off.
    timeout_ms: AtomicU64,
    stalled: AtomicBool,
}

impl WriteWatch {
    /// From now on, a write to this connection that makes no progress for
    /// `timeout` fails and closes it. Stays engaged for the connection's
    /// life: the end of a stream still has to reach the client.
    pub fn engage(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.0.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the connection was closed because a write made no progress.
    pub fn stalled(&self) -> bool {
        self.0.stalled.load(Ordering::Relaxed)
    }

    fn timeout(&self) -> Option<Duration> {
        match self.0.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// An accepted connection: the socket, and the deadline of a write that
/// waits for the client.
pub struct Conn {
    io: TcpStream,
    watch: WriteWatch,
    /// Armed when a write first finds the socket full; cleared by progress.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    /// Passes a write's result through, arming the deadline when it must
    /// wait and failing it once the deadline has passed. Only bytes taken
    /// (`wrote`: a write, not a flush) count as progress.
    fn watched<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        wrote: bool,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            if wrote {
                self.deadline = None;
            }
            return polled;
        }
        let Some(timeout) = self.watch.timeout() else {
            return Poll::Pending;
        };
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.watch.0.stalled.store(true, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took nothing within the stream write timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watched(cx, polled, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watched(cx, polled, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watched(cx, polled, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watched(cx, polled, false)
    }
}

/// The API's listener: TCP connections, each with its [`WriteWatch`].
pub struct Listener(TcpListener);

impl Listener {
    /// Accepts on `listener` (already bound: a taken port fails before
    /// anything else starts).
    pub fn new(listener: TcpListener) -> Self {
        Self(listener)
    }
}

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let conn = Conn {
            io,
            watch: WriteWatch::default(),
            deadline: None,
        };
        (conn, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// The router as one connection sees it: with the peer's address (as
/// axum's `into_make_service_with_connect_info` gives it) and the
/// connection's [`WriteWatch`] in every request's extensions.
pub type ConnService = AddExtension<AddExtension<Router, ConnectInfo<SocketAddr>>, WriteWatch>;

/// Makes a [`ConnService`] for each accepted connection.
#[derive(Clone)]
pub struct MakeService(Router);

impl<'a> tower::Service<IncomingStream<'a, Listener>> for MakeService {
    type Response = ConnService;
    type Error = Infallible;
    type Future = std::future::Ready<Result<ConnService, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: IncomingStream<'a, Listener>) -> Self::Future {
        let peer = Extension(ConnectInfo(*incoming.remote_addr())).layer(self.0.clone());
        std::future::ready(Ok(Extension(incoming.io().watch.clone()).layer(peer)))
    }
}

/// Serves `router` on `listener`, with the peer address and the write watch
/// in each request: what `vm-webapp serve` runs (add the graceful shutdown).
pub fn serve(listener: TcpListener, router: Router) -> Serve<Listener, MakeService, ConnService> {
    axum::serve(Listener::new(listener), MakeService(router))
}
