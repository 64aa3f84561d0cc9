//! The cap on open connections (`INGEST_MAX_CONNECTIONS`).
//!
//! An open HTTP connection costs ingest about 50 KB whatever its client does with it (hyper's
//! buffers and the connection's task; measured: 3,000 idle connections +98 MB, +171 MB once
//! each has sent a request), so their number must be bounded like the requests in flight
//! are. A connection over the cap is still accepted, because an unanswered connect tells a PBX
//! nothing, but its API requests are answered `503 overloaded` with `Retry-After` and
//! `Connection: close` (see `routes::shed_over_limit`): it lives for one short answer.
//! A connection that sends nothing for [`IDLE_TIMEOUT`] (one over the cap: for
//! [`OVER_CAP_IDLE_TIMEOUT`]) is closed, so that idle or silent connections cannot keep their
//! slots, or their memory, for ever (`axum::serve` gives hyper no timers of its own).
//! Written here because axum's `Listener` trait is the hook for it and the crates that limit
//! load (tower's) count requests, not connections.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::connect_info::Connected,
    serve::{IncomingStream, Listener},
};
use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// A connection that sends nothing for this long is closed (a PBX's kept-alive connection
/// between calls, or a client that went away without closing).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection over the cap must send its request within this long.
pub const OVER_CAP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max_connections)),
        }
    }
}

impl Listener for CappedListener {
    type Io = Admitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = Listener::accept(&mut self.inner).await;
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics::counter!("switchboard_ingest_connections_over_cap_total").increment(1);
        }
        let idle = if slot.is_some() {
            IDLE_TIMEOUT
        } else {
            OVER_CAP_IDLE_TIMEOUT
        };
        let admitted = Admitted {
            stream,
            slot,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        };
        (admitted, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection, holding its slot (if it got one) for as long as it is open, and
/// closed once it has sent nothing for its idle timeout.
pub struct Admitted {
    stream: TcpStream,
    slot: Option<OwnedSemaphorePermit>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

/// Whether a request's connection is over the cap (`ConnectInfo<Admission>`).
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub over_cap: bool,
}

impl Connected<IncomingStream<'_, CappedListener>> for Admission {
    fn connect_info(stream: IncomingStream<'_, CappedListener>) -> Self {
        Admission {
            over_cap: stream.io().slot.is_none(),
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection sent nothing for its idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
