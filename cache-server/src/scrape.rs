//! The HTTP endpoint of `serve --metrics ADDR`, on the daemon's runtime:
//! `GET` or `HEAD` of [`PATH`] (the metrics, Prometheus' text format) and of
//! [`HEALTH_PATH`] (`200 ok` while the daemon serves, for probes).
//!
//! HTTP/1.x is hyper's, one connection per task (docs/decisions.md: a
//! hand-written responder with a fixed number of connection slots let 32
//! idle connections stop every scrape). Whatever a peer sends, the damage
//! stays with its connection:
//! - its request head must arrive within [`EXCHANGE_TIMEOUT`] of the accept
//!   (hyper's header-read timeout), and the whole exchange end within it;
//!   otherwise the connection is closed unanswered;
//! - the head is at most [`MAX_REQUEST_BYTES`], else `431`;
//! - one request per connection, closed after its response;
//! - an idle connection costs a descriptor, a task and a small buffer until
//!   its deadline, and never keeps another waiting: there is no fixed number
//!   of slots. Past [`Bounds::max_connections`] (half the open-file limit,
//!   so that the cache always has descriptors for its files and clients)
//!   the oldest connection is closed to make room, so the newest, a
//!   scraper's, is always served;
//! - nothing it sends reaches the cache, which a scrape only reads.
//!
//! The listener and every connection go when the [`serve`] task is dropped
//! (the daemon drops it first thing when it stops), so `/healthz` answers
//! exactly while the daemon serves.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use prometheus_client::registry::Registry as Exposition;

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a connection may take, from accept to the end of the response:
/// its request head must be in by then, and its answer sent.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The path metrics are served at.
pub const PATH: &str = "/metrics";

/// The path probes ask, as Kubernetes' own components answer it: `200` with
/// the body `ok` while the daemon serves.
pub const HEALTH_PATH: &str = "/healthz";

/// What [`PATH`] and [`HEALTH_PATH`] answer besides `405`.
const ALLOWED: &str = "GET, HEAD";

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct BindError {
    addr: String,
    reason: String,
}

/// Binds `addr` (`HOST:PORT`; port 0 takes a free one) for metrics: the
/// first of its addresses that binds.
pub fn bind(addr: &str) -> Result<std::net::TcpListener, BindError> {
    let fail = |reason: String| BindError { addr: addr.to_string(), reason };
    let candidates: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| fail(format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:9477)")))?
        .collect();
    let mut last = None;
    for a in candidates {
        match std::net::TcpListener::bind(a) {
            Ok(l) => {
                l.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
                return Ok(l);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.map_or_else(|| "it names no address".to_string(), |e| e.to_string())))
}

/// How a [`serve`] loop bounds its peers (the constants above, or smaller
/// ones in tests).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Largest request head; hyper answers a longer one `431`.
    pub max_request_bytes: usize,
    /// Deadline of a connection's head, and of its whole exchange.
    pub timeout: Duration,
    /// Connections held at once; a new one past it closes the oldest.
    pub max_connections: usize,
}

impl Default for Bounds {
    /// The constants above, and half of this process's open-file limit
    /// (at least 64) for connections.
    fn default() -> Self {
        use rustix::process::{getrlimit, Resource};
        let files = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let max_connections = (files / 2).clamp(64, 1 << 16) as usize;
        Bounds { max_request_bytes: MAX_REQUEST_BYTES, timeout: EXCHANGE_TIMEOUT, max_connections }
    }
}

/// Serves `exposition` on `listener` until the task is dropped, which drops
/// every connection with it.
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>, bounds: Bounds) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bounds.timeout)
        .max_header_size(bounds.max_request_bytes)
        .keep_alive(false)
        .title_case_headers(true);
    let http = Arc::new(http);
    let mut connections = JoinSet::new();
    // The connections not yet done, oldest first.
    let mut by_age: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    by_age.retain(|c| !c.is_finished());
                    if by_age.len() >= bounds.max_connections {
                        if let Some(oldest) = by_age.pop_front() {
                            tracing::debug!(%peer, "{} metrics connections open; closing the oldest", bounds.max_connections);
                            oldest.abort();
                        }
                    }
                    by_age.push_back(connections.spawn(exchange(stream, peer, http.clone(), exposition.clone(), bounds.timeout)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Finished connections are reaped as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one connection: one request, its answer, the close.
async fn exchange(stream: TcpStream, peer: SocketAddr, http: Arc<http1::Builder>, exposition: Arc<Exposition>, timeout: Duration) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(request.method(), request.uri().path(), &exposition);
        async move { Ok::<_, Infallible>(response) }
    });
    match tokio::time::timeout(timeout, http.serve_connection(TokioIo::new(stream), service)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection closed"),
        Err(_) => tracing::debug!(%peer, "metrics request not done within {timeout:?}; closing"),
    }
}

/// The answer to `method` on `path` (the request target without its query).
/// hyper leaves out the body of an answer to `HEAD`, and keeps its length.
pub fn respond(method: &Method, path: &str, exposition: &Exposition) -> Response<Full<Bytes>> {
    let read_only = *method == Method::GET || *method == Method::HEAD;
    match path {
        PATH if !read_only => not_allowed(PATH),
        PATH => match crate::metrics::encode(exposition) {
            Ok(text) => text_response(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics"),
        },
        HEALTH_PATH if !read_only => not_allowed(HEALTH_PATH),
        HEALTH_PATH => text_response(StatusCode::OK, PLAIN_TEXT, "ok".to_string()),
        _ => error(StatusCode::NOT_FOUND, &format!("not found: metrics are at {PATH}")),
    }
}

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

fn text_response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    text_response(status, PLAIN_TEXT, format!("{message}\n"))
}

fn not_allowed(path: &str) -> Response<Full<Bytes>> {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, &format!("{path} answers GET and HEAD"));
    r.headers_mut().insert(ALLOW, HeaderValue::from_static(ALLOWED));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn exposition() -> Exposition {
        let mut r = Exposition::default();
        let c: Counter = Counter::default();
        c.inc();
        r.register("mora_test", "A test counter", c);
        r
    }

    fn status_of(method: Method, path: &str) -> u16 {
        respond(&method, path, &exposition()).status().as_u16()
    }

    async fn body_of(r: Response<Full<Bytes>>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn get_and_head_of_the_metrics_path_are_answered() {
        let r = respond(&Method::GET, "/metrics", &exposition());
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
        let text = body_of(r).await;
        assert!(text.contains("# TYPE mora_test_total counter\nmora_test_total 1\n"), "{text}");
        // On the wire: the headers, the length, the close, the text.
        let addr = server(Bounds::default()).await;
        let wire = exchange_with(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"), "{wire}");
        assert!(wire.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{wire}");
        assert!(wire.contains(&format!("Content-Length: {}\r\n", text.len())), "{wire}");
        assert!(wire.contains("Connection: close\r\n"), "{wire}");
        assert!(wire.ends_with(&format!("\r\n\r\n{text}")), "{wire}");
        // A query string is ignored (an HTTP/1.0 request is answered in
        // HTTP/1.0, as hyper does); HEAD has the headers and no body.
        let query = exchange_with(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.0 200 OK\r\n") && query.ends_with(&text), "{query}");
        let head = exchange_with(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Length: {}\r\n", text.len())), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[tokio::test]
    async fn the_health_path_says_ok_to_get_and_head() {
        let r = respond(&Method::GET, "/healthz", &exposition());
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(body_of(r).await, "ok");
        assert_eq!(status_of(Method::HEAD, "/healthz"), 200);
        let r = respond(&Method::POST, "/healthz", &exposition());
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let addr = server(Bounds::default()).await;
        let wire = exchange_with(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n") && wire.ends_with("\r\n\r\nok"), "{wire}");
    }

    #[test]
    fn another_path_is_404_and_another_method_405() {
        assert_eq!(status_of(Method::GET, "/"), 404);
        assert_eq!(status_of(Method::GET, "/metrics/x"), 404);
        assert_eq!(status_of(Method::POST, "/"), 404);
        let r = respond(&Method::POST, "/metrics", &exposition());
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        assert_eq!(status_of(Method::DELETE, "/metrics"), 405);
    }

    #[tokio::test]
    async fn a_malformed_request_is_400_and_the_server_keeps_serving() {
        let addr = server(Bounds::default()).await;
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            let reply = exchange_with(addr, bad).await;
            assert!(reply.starts_with("HTTP/1.1 400 "), "{}: {reply}", String::from_utf8_lossy(bad));
        }
        let ok = exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    }

    /// A server on a free port, with `bounds`.
    async fn server(bounds: Bounds) -> SocketAddr {
        let listener = TcpListener::from_std(bind("127.0.0.1:0").unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(exposition()), bounds));
        addr
    }

    /// Sends `request`, then reads until the server closes.
    async fn exchange_with(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer and close before it has read everything.
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).to_string()
    }

    #[tokio::test]
    async fn over_tcp_each_request_gets_its_answer_and_a_close() {
        let addr = server(Bounds::default()).await;
        let ok = exchange_with(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("mora_test_total 1"), "{ok}");
        let missing = exchange_with(addr, b"GET /nothing HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
        let post = exchange_with(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
        // Split across writes, with bare newlines.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        s.flush().await.unwrap();
        s.write_all(b"rics HTTP/1.0\n\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
    }

    #[tokio::test]
    async fn an_oversized_request_is_431_and_the_server_keeps_serving() {
        let addr = server(Bounds::default()).await;
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while huge.len() <= MAX_REQUEST_BYTES {
            huge.extend_from_slice(b"X-Filler: 0123456789abcdef0123456789abcdef\r\n");
        }
        huge.extend_from_slice(b"\r\n");
        let reply = exchange_with(addr, &huge).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        // A head that never ends is cut at the bound too.
        let endless = vec![b'a'; 4 * MAX_REQUEST_BYTES];
        let reply = exchange_with(addr, &endless).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        let ok = exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_at_its_deadline_unanswered() {
        let addr = server(Bounds { timeout: Duration::from_millis(100), ..Bounds::default() }).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = silent.read_to_end(&mut out).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        let ok = exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    }

    #[tokio::test]
    async fn idle_connections_never_keep_a_scrape_waiting() {
        let addr = server(Bounds::default()).await;
        // Four times the 16 slots of the responder this replaced, silent or
        // halfway through a head; none is answered or closed before its
        // deadline, and a scrape is answered meanwhile.
        let mut idle = Vec::new();
        for i in 0..64 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost:").await.unwrap();
            }
            idle.push(s);
        }
        let ok = tokio::time::timeout(Duration::from_secs(5), exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n"))
            .await
            .expect("a scrape answered while others idle");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("mora_test_total 1"), "{ok}");
        let mut byte = [0u8; 1];
        for s in &mut idle {
            assert!(s.try_read(&mut byte).is_err(), "an idle connection got an answer or a close before its deadline");
        }
    }

    #[tokio::test]
    async fn past_the_bound_the_oldest_connection_is_closed_for_the_newest() {
        let addr = server(Bounds { max_connections: 4, ..Bounds::default() }).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The fifth, a scrape, is served; the first idle one made room.
        let ok = tokio::time::timeout(Duration::from_secs(5), exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n"))
            .await
            .expect("the newest connection is served");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle[0].read_to_end(&mut out)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {out:?}");
        let mut byte = [0u8; 1];
        for s in &mut idle[1..] {
            assert!(s.try_read(&mut byte).is_err(), "a younger idle connection was closed");
        }
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_connections() {
        let listener = TcpListener::from_std(bind("127.0.0.1:0").unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(exposition()), Bounds::default()));
        let mut idle = TcpStream::connect(addr).await.unwrap();
        // Served: the connection has its task.
        let ok = exchange_with(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(ok.ends_with("ok"), "{ok}");
        task.abort();
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut out)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {out:?}");
        assert!(TcpStream::connect(addr).await.is_err(), "the port outlived the server");
    }

    #[test]
    fn a_bad_address_is_one_line_naming_it() {
        let e = bind("not an address").unwrap_err().to_string();
        assert!(e.starts_with("cannot serve metrics on not an address: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let taken = bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot serve metrics on {addr}: ")) && e.contains("in use"), "{e}");
    }
}
