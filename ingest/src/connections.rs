//! Serving one listener under hostile clients: a connection limit, a deadline for the first
//! request, an idle timeout, hyper's HTTP/1 header-read timeout and HTTP/2 keep-alive pings.
//!
//! Every listener of ingest (REST, OTLP/gRPC, OTLP/HTTP, operations) runs [`serve`]: an accept
//! loop over hyper-util's `auto` connection builder (HTTP/1.1 and HTTP/2 with prior knowledge,
//! "h2c"; gRPC: HTTP/2 only). What it does to a connection:
//!
//! * **Connection limit** — at most [`ListenerLimits::max_connections`] open at once; one accepted
//!   beyond it is closed at once (counted in `agentmeter_ingest_connections_refused_total`).
//!   Closing promptly rather than leaving it in the kernel's backlog tells the client to back off
//!   now instead of after its connect timeout.
//! * **First request** — a connection that has not delivered a complete request head within
//!   [`ListenerLimits::header_read_timeout`] of being accepted is dropped. This covers what
//!   hyper's own header timer does not: the protocol sniffing of the `auto` builder and the
//!   HTTP/2 preface and handshake, which a client can otherwise stretch one byte at a time.
//! * **Later requests (HTTP/1)** — hyper's `header_read_timeout` runs from the end of one
//!   response until the next request head is complete, so a keep-alive connection that sends
//!   nothing is closed after that time too.
//! * **Idle (HTTP/2)** — a connection with no request in progress for
//!   [`ListenerLimits::idle_timeout`] is shut down gracefully (GOAWAY); keep-alive pings drop a
//!   peer that stopped answering.
//! * **Shutdown** — every connection is shut down gracefully; [`serve`] returns when all are
//!   closed, so in-flight requests are answered first.
//!
//! The time one request may take is bounded by the service itself (`tower-http`'s timeout for
//! the axum routers, a timeout in the gRPC service), see `server.rs` and `otlp/grpc.rs`.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentmeter_runtime::shutdown::Shutdown;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::IngestConfig;
use crate::telemetry::{
    emit, ConnectionAccepted, ConnectionClosed, ConnectionEnded, ConnectionRefused,
};

type BoxError = Box<dyn StdError + Send + Sync>;

/// What a listener allows its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time from accept to the first complete request head, and (HTTP/1) from one response to
    /// the next request head.
    pub header_read_timeout: Duration,
    /// Time without a request in progress after which a connection is closed.
    pub idle_timeout: Duration,
    /// How long a connection being shut down may take to finish its requests before it is
    /// dropped.
    pub shutdown_grace: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection at most.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings.
    pub http2_keepalive_interval: Duration,
    /// How long an HTTP/2 keep-alive ping may go unanswered.
    pub http2_keepalive_timeout: Duration,
    /// Whether only HTTP/2 is spoken (gRPC).
    pub http2_only: bool,
}

impl ListenerLimits {
    /// The limits of `[ingest]` for an HTTP/1.1-and-h2c listener.
    pub fn from_config(config: &IngestConfig) -> ListenerLimits {
        ListenerLimits {
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            shutdown_grace: Duration::from_millis(
                config.request_timeout_ms + config.header_read_timeout_ms,
            ),
            max_connections: config.max_connections_per_listener,
            max_concurrent_streams: config.max_concurrent_streams_per_connection,
            http2_keepalive_interval: Duration::from_millis(config.http2_keepalive_interval_ms),
            http2_keepalive_timeout: Duration::from_millis(config.http2_keepalive_timeout_ms),
            http2_only: false,
        }
    }

    /// The same limits, speaking HTTP/2 only (the gRPC listener).
    pub fn http2_only(self) -> ListenerLimits {
        ListenerLimits {
            http2_only: true,
            ..self
        }
    }

    fn builder(&self) -> Builder<TokioExecutor> {
        let mut builder = Builder::new(TokioExecutor::new());
        if self.http2_only {
            builder = builder.http2_only();
        } else {
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(self.header_read_timeout)
                .keep_alive(true);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_concurrent_streams)
            .keep_alive_interval(self.http2_keepalive_interval)
            .keep_alive_timeout(self.http2_keepalive_timeout);
        builder
    }
}

/// Serves `service` on `listener` under `limits` until shutdown, then waits until every
/// connection has finished its requests. `name` labels the metrics (`rest`, `otlp_grpc`, ...).
pub async fn serve<S, B>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    limits: ListenerLimits,
    mut shutdown: Shutdown,
) -> anyhow::Result<()>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(limits.builder());
    let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.requested() => break,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: keep serving the open connections.
                tracing::warn!(listener = name, %error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
            emit(ConnectionRefused { listener: name });
            drop(stream);
            continue;
        };
        emit(ConnectionAccepted { listener: name });
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(ConnectionActivity::new());
        let service = ConnectionService {
            inner: TowerToHyperService::new(service.clone()),
            activity: activity.clone(),
        };
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            drive(name, connection, &activity, limits, shutdown).await;
            emit(ConnectionEnded { listener: name });
            drop(slot);
        });
    }
    drop(listener);
    // Every connection holds a slot until it is closed: all slots back means all are done.
    let all_slots = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = connection_slots.acquire_many(all_slots).await;
    Ok(())
}

/// Polls one connection to its end, enforcing the first-request deadline, the idle timeout and
/// graceful shutdown.
async fn drive<S, B>(
    name: &'static str,
    connection: hyper_util::server::conn::auto::Connection<
        '_,
        TokioIo<tokio::net::TcpStream>,
        ConnectionService<S>,
        TokioExecutor,
    >,
    activity: &ConnectionActivity,
    limits: ListenerLimits,
    mut shutdown: Shutdown,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    tokio::pin!(connection);
    let mut check_at = activity.opened + limits.header_read_timeout;
    // Once a graceful shutdown began: the time after which the connection is dropped.
    let mut closing_until: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(listener = name, %error, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.requested(), if closing_until.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_until = Some(Instant::now() + limits.shutdown_grace);
                check_at = Instant::now() + limits.shutdown_grace;
            }
            _ = tokio::time::sleep_until(check_at) => {
                if closing_until.is_some() {
                    count_closed(name, "shutdown_overdue");
                    return;
                }
                match activity.verdict(Instant::now(), limits) {
                    Verdict::FirstRequestOverdue => {
                        count_closed(name, "header_timeout");
                        return;
                    }
                    Verdict::Idle => {
                        count_closed(name, "idle");
                        connection.as_mut().graceful_shutdown();
                        let until = Instant::now() + limits.shutdown_grace;
                        closing_until = Some(until);
                        check_at = until;
                    }
                    Verdict::Busy { check_again_at } => check_at = check_again_at,
                }
            }
        }
    }
}

fn count_closed(name: &'static str, reason: &'static str) {
    emit(ConnectionClosed {
        listener: name,
        reason,
    });
}

/// What a connection did, for the watchdog in [`drive`].
#[derive(Debug)]
struct ConnectionActivity {
    opened: Instant,
    requests_started: AtomicU64,
    requests_in_progress: AtomicUsize,
    /// Milliseconds after `opened` when a request last started or finished.
    last_change_ms: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    FirstRequestOverdue,
    Idle,
    Busy { check_again_at: Instant },
}

impl ConnectionActivity {
    fn new() -> ConnectionActivity {
        ConnectionActivity {
            opened: Instant::now(),
            requests_started: AtomicU64::new(0),
            requests_in_progress: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change_ms.fetch_max(elapsed, Ordering::Relaxed);
    }

    fn request_started(self: &Arc<Self>) -> RequestInProgress {
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.requests_in_progress.fetch_add(1, Ordering::Relaxed);
        self.touch();
        RequestInProgress {
            activity: self.clone(),
        }
    }

    fn verdict(&self, now: Instant, limits: ListenerLimits) -> Verdict {
        if self.requests_started.load(Ordering::Relaxed) == 0 {
            let deadline = self.opened + limits.header_read_timeout;
            return if now >= deadline {
                Verdict::FirstRequestOverdue
            } else {
                Verdict::Busy {
                    check_again_at: deadline,
                }
            };
        }
        if self.requests_in_progress.load(Ordering::Relaxed) > 0 {
            return Verdict::Busy {
                check_again_at: now + limits.idle_timeout,
            };
        }
        let idle_since =
            self.opened + Duration::from_millis(self.last_change_ms.load(Ordering::Relaxed));
        let idle_until = idle_since + limits.idle_timeout;
        if now >= idle_until {
            Verdict::Idle
        } else {
            Verdict::Busy {
                check_again_at: idle_until,
            }
        }
    }
}

/// Marks a request as in progress until its response (head) is ready or it is dropped.
struct RequestInProgress {
    activity: Arc<ConnectionActivity>,
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity
            .requests_in_progress
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service of one connection: the listener's service, with its requests recorded in the
/// connection's [`ConnectionActivity`].
struct ConnectionService<S> {
    inner: TowerToHyperService<S>,
    activity: Arc<ConnectionActivity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnectionService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_progress = self.activity.request_started();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(in_progress);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ListenerLimits {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            max_connections: 4,
            max_concurrent_streams: 10,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_only: false,
        }
    }

    #[test]
    fn a_connection_without_a_first_request_is_overdue_after_the_header_timeout() {
        let activity = Arc::new(ConnectionActivity::new());
        let opened = activity.opened;
        assert_eq!(
            activity.verdict(opened + Duration::from_millis(1999), limits()),
            Verdict::Busy {
                check_again_at: opened + Duration::from_secs(2)
            }
        );
        assert_eq!(
            activity.verdict(opened + Duration::from_secs(2), limits()),
            Verdict::FirstRequestOverdue
        );
    }

    #[test]
    fn a_connection_is_idle_only_without_a_request_in_progress() {
        let activity = Arc::new(ConnectionActivity::new());
        let opened = activity.opened;
        let request = activity.request_started();
        assert!(matches!(
            activity.verdict(opened + Duration::from_secs(600), limits()),
            Verdict::Busy { .. }
        ));
        drop(request);
        // As if the request had finished 4 s after the connection opened.
        activity.last_change_ms.store(4000, Ordering::Relaxed);
        assert_eq!(
            activity.verdict(opened + Duration::from_secs(13), limits()),
            Verdict::Busy {
                check_again_at: opened + Duration::from_secs(14)
            }
        );
        assert_eq!(
            activity.verdict(opened + Duration::from_secs(14), limits()),
            Verdict::Idle
        );
        // A request once started means the first-request deadline no longer applies.
        assert_ne!(
            activity.verdict(opened + Duration::from_secs(3), limits()),
            Verdict::FirstRequestOverdue
        );
    }

    /// Serves a router answering `ok` under `limits`; the server runs while the trigger lives.
    async fn start(
        limits: ListenerLimits,
    ) -> (
        std::net::SocketAddr,
        agentmeter_runtime::shutdown::ShutdownTrigger,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve("test", listener, router, limits, shutdown));
        (address, trigger)
    }

    /// Reads until the peer closes (Ok) or `within` passes (Err); what was read is returned.
    async fn read_until_closed(
        stream: &mut tokio::net::TcpStream,
        within: Duration,
    ) -> Result<Vec<u8>, Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        let deadline = Instant::now() + within;
        loop {
            let mut buffer = [0u8; 1024];
            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(received),
                Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
                Err(_) => return Err(received),
            }
        }
    }

    /// Writes `bytes` one per 300 ms until the peer closes; returns when it did.
    async fn trickle(stream: &mut tokio::net::TcpStream, bytes: &[u8]) -> Duration {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        for byte in bytes.iter().cycle().take(100) {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(300), stream.peek(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        started.elapsed()
    }

    #[tokio::test]
    async fn a_slow_http1_header_is_cut_at_the_header_timeout() {
        let (address, _server) = start(limits()).await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let took = trickle(
            &mut stream,
            b"GET / HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaa",
        )
        .await;
        assert!(took < Duration::from_secs(6), "still open after {took:?}");
        assert!(
            took >= Duration::from_millis(1500),
            "closed early, after {took:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_http2_preface_is_cut_at_the_header_timeout() {
        let (address, _server) = start(limits()).await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let took = trickle(&mut stream, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert!(took < Duration::from_secs(6), "still open after {took:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        use tokio::io::AsyncWriteExt;
        let (address, _server) = start(limits()).await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        // The answer, then nothing: the connection must be closed by the server (hyper's
        // header timer runs while it waits for the next request head).
        let received = read_until_closed(&mut stream, Duration::from_secs(6))
            .await
            .expect("connection still open 6 s after its only request");
        assert!(received.starts_with(b"HTTP/1.1 200"), "{received:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once_and_the_rest_are_served() {
        use tokio::io::AsyncWriteExt;
        let (address, _server) = start(ListenerLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        let _first = tokio::net::TcpStream::connect(address).await.unwrap();
        let _second = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
        let _ = third
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await;
        let received = read_until_closed(&mut third, Duration::from_secs(3))
            .await
            .expect("the connection beyond the limit was not closed");
        assert!(received.is_empty(), "{received:?}");
        drop(_first);
        // A slot is free again once the first connection is gone.
        let mut answered = false;
        for _ in 0..50 {
            let mut next = tokio::net::TcpStream::connect(address).await.unwrap();
            let _ = next
                .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
                .await;
            let received = read_until_closed(&mut next, Duration::from_secs(3))
                .await
                .unwrap_or_default();
            if received.starts_with(b"HTTP/1.1 200") {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            answered,
            "no connection was served after a slot became free"
        );
    }

    #[tokio::test]
    async fn http2_with_prior_knowledge_is_accepted_on_an_http_listener() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (address, _server) = start(limits()).await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let mut frame_header = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut frame_header))
            .await
            .expect("no answer to the HTTP/2 preface")
            .unwrap();
        assert_eq!(frame_header[3], 0x4, "the first frame must be SETTINGS");
    }
}
