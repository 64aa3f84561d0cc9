//! The cap on open connections (`INGEST_MAX_CONNECTIONS`).
//!
//! An open HTTP connection costs ingest about 50 KB whatever its client does with it (hyper's
//! buffers and the connection's task; measured: 3,000 idle connections +98 MB, +171 MB once
//! each has sent a request), so their number must be bounded like the requests in flight
//! are. A connection over the cap is still accepted, because an unanswered connect tells a PBX
//! nothing, but its API requests are answered `503 overloaded` with `Retry-After` and
//! `Connection: close` (see `routes::shed_over_limit`): it lives for one short answer.
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
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

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
        (Admitted { stream, slot }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection, holding its slot (if it got one) for as long as it is open.
pub struct Admitted {
    stream: TcpStream,
    slot: Option<OwnedSemaphorePermit>,
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
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
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
