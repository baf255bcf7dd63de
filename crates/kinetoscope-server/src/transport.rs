//! HTTP/1.1 over TCP, with every client held to time limits: a connection sending nothing useful is
//! closed, so slow or unfinished requests cannot pile up until the server runs out of file descriptors,
//! and a shutdown ends in bounded time however many connections are open.
//!
//! - Headers: a request's headers must be complete within `header_timeout` of its first byte (a new
//!   connection's, of connecting), else the connection is closed. hyper's own `header_read_timeout` is
//!   not used: it starts as soon as a kept-alive connection waits for its next request, so it would also
//!   be the idle timeout.
//! - Body: the whole body must arrive within `body_timeout` of the headers, else the request is answered
//!   408 `request_timeout` and the connection closed. A deadline for the whole body, not for a pause
//!   between bytes: a client trickling a byte now and then would otherwise hold a connection forever.
//! - Idle: a kept-alive connection with no request in flight is closed after `idle_timeout`.
//! - Cap: at most `max_connections` are served at once. Further connections are not accepted but wait
//!   in the kernel's backlog, and are served in order as others close, which the timeouts above
//!   guarantee for connections that send nothing; so a flood of slow connections delays clients by
//!   about `header_timeout` instead of refusing them, and cannot exhaust file descriptors.
//! - Shutdown: no more connections are accepted, idle ones are closed, requests in flight get up to
//!   `drain_timeout` to finish, then every connection still open is closed.
//!
//! Once a request's body is in, nothing here limits how long the handler or the response takes: event
//! streams last as long as their job, and a download as long as the client takes to read it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, Instant};
use tower_service::Service;

use crate::config::ConnectionLimits;
use crate::error::ApiError;

/// Where the server is in its life, as each connection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Serving,
    /// Finish the request in flight, then close.
    Draining,
    /// Close now.
    Closing,
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains and closes every connection
/// (see the module's description); returns once none is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    // `acquire_many` below takes a u32; no machine has that many descriptors anyway.
    let capacity = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(capacity as usize));
    let (phase, _) = watch::channel(Phase::Serving);
    let mut http = http1::Builder::new();
    // Our own header timeout applies instead (see the module's description).
    http.header_read_timeout(None);
    let limits = Arc::new(limits);
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        // Without TCP_NODELAY a small download waits on the client's delayed ACK (~40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let connection = Connection { limits: limits.clone(), activity: Arc::default(), router: router.clone() };
        tokio::spawn(connection.serve(http.clone(), stream, phase.subscribe(), slot));
    }
    // Closing the listener refuses new connections at once instead of leaving them in the backlog.
    drop(listener);
    phase.send_replace(Phase::Draining);
    let all_closed = || slots.acquire_many(capacity);
    if tokio::time::timeout(limits.drain_timeout, all_closed()).await.is_err() {
        tracing::info!(
            open = capacity as usize - slots.available_permits(),
            "closing the connections still open after the drain timeout"
        );
        phase.send_replace(Phase::Closing);
        // Each connection returns as soon as it sees `Closing`.
        let _ = all_closed().await;
    }
}

/// The next connection, once fewer than the cap are open; until then, connections wait in the backlog.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> (TcpStream, OwnedSemaphorePermit) {
    let slot = slots.clone().acquire_owned().await.expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return (stream, slot),
            // The client gave up before it was accepted: nothing wrong here.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => {}
            // Out of file descriptors (or memory): retrying at once would spin; connections closing
            // in the meantime make room.
            Err(e) => {
                tracing::warn!("cannot accept a connection: {e}");
                sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Connection {
    limits: Arc<ConnectionLimits>,
    activity: Arc<Activity>,
    router: Router,
}

impl Connection {
    /// Serves one connection until the client closes it, a timeout closes it, or the server stops.
    /// Returning drops the connection, which closes the socket whatever state the request is in.
    async fn serve(
        self,
        http: http1::Builder,
        stream: TcpStream,
        mut phase: watch::Receiver<Phase>,
        _slot: OwnedSemaphorePermit,
    ) {
        let io = TokioIo::new(Watched { stream, activity: self.activity.clone() });
        let (activity, limits) = (self.activity.clone(), self.limits.clone());
        // Boxed: polling without shutdown (below) wants a movable future.
        let service = hyper::service::service_fn(move |request| Box::pin(self.handle(request)));
        let mut connection = http.serve_connection(io, service);
        loop {
            tokio::select! {
                // Without shutdown: the socket comes back when hyper is done with it, for a lingering close.
                ended = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                    match ended {
                        Ok(()) => linger(connection.into_parts().io.into_inner().stream, &mut phase).await,
                        Err(e) => tracing::debug!("connection ended: {e}"),
                    }
                    return;
                }
                () = activity.expired(&limits) => {
                    tracing::debug!("closing a connection that was idle or sent an incomplete request for too long");
                    return;
                }
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow_and_update() == Phase::Closing {
                        return;
                    }
                    // hyper closes an idle connection now, and a busy one once its response is sent.
                    Pin::new(&mut connection).graceful_shutdown();
                }
            }
        }
    }

    /// Passes a request to the routes, unless its body doesn't arrive within the body timeout.
    fn handle(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static {
        let in_flight = self.activity.begin();
        let timeout = self.limits.body_timeout;
        let deadline = Instant::now() + timeout;
        let empty = request.body().is_end_stream();
        let progress = Arc::new(BodyProgress { done: AtomicBool::new(empty), ended: AtomicBool::new(empty) });
        let request = request.map(|body| Deadlined { body, progress: progress.clone() });
        let mut router = self.router.clone();
        async move {
            let mut response = tokio::select! {
                response = router.call(request) => response.unwrap_or_else(|never| match never {}),
                () = body_overdue(deadline, &progress.done) => body_timed_out(timeout),
            };
            // A body answered before its end (a 413, a refusal before reading) leaves bytes that hyper won't
            // read, so it closes the connection after this response; saying so keeps a client from sending
            // its next request on a connection it thinks is alive, which would fail as an incomplete message.
            if !progress.ended.load(Ordering::Acquire) {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| Tracked { body, _in_flight: in_flight }))
        }
    }
}

/// How long a closing connection keeps reading what its client still sends.
const LINGER: Duration = Duration::from_secs(5);

/// Closes `stream` as web servers do ("lingering close"): the response is out, the write side is shut, and
/// what the client still sends is read and dropped until it closes too, for at most [`LINGER`], and not
/// once the server is stopping. Closing a socket with unread bytes sends a reset, which can reach the client
/// before it has read the response: a 413 answered before a large upload's end would be lost to a "broken
/// pipe" while the client still writes.
async fn linger(mut stream: TcpStream, phase: &mut watch::Receiver<Phase>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() || *phase.borrow_and_update() != Phase::Serving {
        return;
    }
    let mut sink = [0u8; 16 * 1024];
    let drained = async { while let Ok(1..) = stream.read(&mut sink).await {} };
    tokio::select! {
        _ = tokio::time::timeout(LINGER, drained) => {}
        _ = phase.changed() => {}
    }
}

/// Resolves at `deadline` if the handler is still waiting for the body then; never otherwise.
async fn body_overdue(deadline: Instant, done: &AtomicBool) {
    sleep_until(deadline).await;
    if done.load(Ordering::Acquire) {
        std::future::pending::<()>().await;
    }
}

fn body_timed_out(timeout: Duration) -> Response<Body> {
    let message = format!("the request body did not arrive within {} s", timeout.as_secs_f64());
    // The rest of the body may still come: the caller closes the connection, the only way to be rid of it.
    ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message).into_response()
}

/// What a connection is doing, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum State {
    /// This many requests are being handled or answered: no timeout here (the body's is per request).
    Busy(usize),
    /// Waiting, since then, for the next request, of which nothing has come yet.
    Idle(Instant),
    /// Reading a request's headers, since their first byte (or since connecting).
    Head(Instant),
}

struct Activity {
    state: Mutex<State>,
    /// Wakes the timeout when the state changes, which can bring its deadline forward.
    changed: Notify,
}

impl Default for Activity {
    fn default() -> Self {
        // A client that connects must send its headers within the header timeout.
        Activity { state: Mutex::new(State::Head(Instant::now())), changed: Notify::new() }
    }
}

impl Activity {
    fn update(&self, change: impl FnOnce(State) -> State) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = change(*state);
        self.changed.notify_one();
    }

    /// A request's headers are in: it is in flight until the returned guard (kept in its response's
    /// body) is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.update(|state| match state {
            State::Busy(n) => State::Busy(n + 1),
            State::Idle(_) | State::Head(_) => State::Busy(1),
        });
        InFlight(self.clone())
    }

    /// Bytes came from the client.
    fn received(&self) {
        let idle = matches!(*self.state.lock().unwrap_or_else(|p| p.into_inner()), State::Idle(_));
        if idle {
            self.update(|state| match state {
                State::Idle(_) => State::Head(Instant::now()),
                other => other,
            });
        }
    }

    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        match *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Busy(_) => None,
            State::Idle(since) => Some(since + limits.idle_timeout),
            State::Head(since) => Some(since + limits.header_timeout),
        }
    }

    /// Resolves once the connection has been idle, or its request's headers incomplete, for too long.
    async fn expired(&self, limits: &ConnectionLimits) {
        loop {
            match self.deadline(limits) {
                Some(deadline) if deadline <= Instant::now() => return,
                Some(deadline) => {
                    tokio::select! {
                        () = sleep_until(deadline) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|state| match state {
            State::Busy(n) if n > 1 => State::Busy(n - 1),
            _ => State::Idle(Instant::now()),
        });
    }
}

/// The socket, telling the connection's activity when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.received();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that records how far its handler read it.
struct Deadlined {
    body: Incoming,
    progress: Arc<BodyProgress>,
}

struct BodyProgress {
    /// The handler no longer waits on the body: it read its end or an error, or dropped it.
    done: AtomicBool,
    /// The body was read to its end, so the connection can carry the next request.
    ended: AtomicBool,
}

impl HttpBody for Deadlined {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => self.body.is_end_stream(),
            Some(Err(_)) => false,
        };
        if ended {
            self.progress.ended.store(true, Ordering::Release);
        }
        if ended || matches!(frame, Some(Err(_))) {
            self.progress.done.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Deadlined {
    fn drop(&mut self) {
        self.progress.done.store(true, Ordering::Release);
    }
}

/// A response body that keeps its request in flight until it is sent (or abandoned).
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
