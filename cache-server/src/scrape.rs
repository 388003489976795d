//! The HTTP endpoint Prometheus scrapes (`serve --metrics ADDR`): `GET` or
//! `HEAD /metrics`, one request per connection, on the daemon's runtime.
//!
//! A small HTTP/1.x responder rather than a web framework: it answers one
//! path and nothing else (docs/decisions.md). Whatever a peer sends, the
//! damage stays with its connection: the request head is bounded
//! ([`MAX_REQUEST_BYTES`], else 431), the whole exchange has a deadline
//! ([`EXCHANGE_TIMEOUT`], then the connection is dropped), at most
//! [`MAX_CONNECTIONS`] are served at once (others are closed at once), every
//! connection is closed after its response, and nothing it sends reaches the
//! cache.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use prometheus_client::registry::Registry as Exposition;

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a connection may take, from accept to the end of the response.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; a scraper needs one.
pub const MAX_CONNECTIONS: usize = 16;

/// Most bytes read and dropped after a response, so that a peer that sent
/// more than its head still gets the response before the close.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// The path metrics are served at.
pub const PATH: &str = "/metrics";

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
    pub max_request_bytes: usize,
    pub timeout: Duration,
    pub max_connections: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { max_request_bytes: MAX_REQUEST_BYTES, timeout: EXCHANGE_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

/// Serves `exposition` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>, bounds: Bounds) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many metrics connections; closing this one");
                    continue;
                };
                let exposition = exposition.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if tokio::time::timeout(bounds.timeout, exchange(stream, &exposition, bounds)).await.is_err() {
                        tracing::debug!(%peer, "metrics request not done within {:?}; closing", bounds.timeout);
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request head, answers it, closes.
async fn exchange(mut stream: TcpStream, exposition: &Exposition, bounds: Bounds) {
    let response = match read_head(&mut stream, bounds.max_request_bytes).await {
        Ok(Some(head)) => respond(&head, exposition),
        Ok(None) => Response::error(431, "Request Header Fields Too Large", "request head too large"),
        Err(_) => return,
    };
    if stream.write_all(&response.bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Closing with unread input would reset the connection, and the peer
    // could lose the response: read what it still sends (a body, the rest of
    // an oversized head) until it closes too, within bounds.
    let mut drained = 0;
    let mut chunk = [0u8; 4096];
    while drained < MAX_DRAIN_BYTES {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// The request head, up to its blank line; `None` when it is longer than
/// `max` bytes. An error when the peer closes or fails before the end.
async fn read_head(stream: &mut TcpStream, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Look for the end only where this chunk can complete it.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end(&head[from..]) {
            let end = from + end;
            if end > max {
                return Ok(None);
            }
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > max {
            return Ok(None);
        }
    }
}

/// Where the head in `buf` ends (after `\r\n\r\n`, or `\n\n` from a lax peer).
fn find_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// A response, sent whole and followed by the connection's close.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// HEAD: the headers of the body, without it.
    pub head_only: bool,
}

impl Response {
    fn error(status: u16, reason: &'static str, message: &str) -> Response {
        Response {
            status,
            reason,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".to_string())],
            body: format!("{message}\n").into_bytes(),
            head_only: false,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", self.body.len()));
        let mut out = out.into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The answer to one request head (request line and headers).
pub fn respond(head: &[u8], exposition: &Exposition) -> Response {
    let Some(line) = head.split(|b| *b == b'\n').next().and_then(|l| std::str::from_utf8(l).ok()) else {
        return Response::error(400, "Bad Request", "malformed request line");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error(400, "Bad Request", "malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::error(505, "HTTP Version Not Supported", "only HTTP/1.x is served");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != PATH {
        return Response::error(404, "Not Found", &format!("not found: metrics are at {PATH}"));
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Response::error(405, "Method Not Allowed", &format!("{PATH} answers GET and HEAD"));
        r.headers.push(("Allow", "GET, HEAD".to_string()));
        return r;
    }
    match crate::metrics::encode(exposition) {
        Ok(text) => Response {
            status: 200,
            reason: "OK",
            headers: vec![("Content-Type", crate::metrics::CONTENT_TYPE.to_string())],
            body: text.into_bytes(),
            head_only: method == "HEAD",
        },
        Err(_) => Response::error(500, "Internal Server Error", "cannot encode the metrics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn exposition() -> Exposition {
        let mut r = Exposition::default();
        let c: Counter = Counter::default();
        c.inc();
        r.register("mora_test", "A test counter", c);
        r
    }

    fn status_of(head: &str) -> u16 {
        respond(head.as_bytes(), &exposition()).status
    }

    #[test]
    fn get_and_head_of_the_metrics_path_are_answered() {
        let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &exposition());
        assert_eq!(r.status, 200);
        assert_eq!(r.headers, vec![("Content-Type", "text/plain; version=0.0.4; charset=utf-8".to_string())]);
        let text = String::from_utf8(r.body.clone()).unwrap();
        assert!(text.contains("# TYPE mora_test_total counter\nmora_test_total 1\n"), "{text}");
        let wire = String::from_utf8(r.bytes()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"), "{wire}");
        assert!(wire.contains(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", r.body.len())), "{wire}");
        assert!(wire.ends_with(&text));
        // A query string is ignored; HEAD has the headers and no body.
        assert_eq!(status_of("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), 200);
        let head = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &exposition());
        assert_eq!(head.status, 200);
        assert!(String::from_utf8(head.bytes()).unwrap().ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn another_path_is_404_and_another_method_405() {
        assert_eq!(status_of("GET / HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status_of("GET /metrics/x HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status_of("POST / HTTP/1.1\r\n\r\n"), 404);
        let r = respond(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &exposition());
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "GET, HEAD".to_string())));
        assert_eq!(status_of("DELETE /metrics HTTP/1.1\r\n\r\n"), 405);
    }

    #[test]
    fn a_malformed_request_is_400_or_505() {
        assert_eq!(status_of("\r\n\r\n"), 400);
        assert_eq!(status_of("GET\r\n\r\n"), 400);
        assert_eq!(status_of("GET /metrics\r\n\r\n"), 400);
        assert_eq!(status_of("GET  /metrics HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of("GET /metrics HTTP/1.1 x\r\n\r\n"), 400);
        assert_eq!(status_of("GET /metrics HTTP/2\r\n\r\n"), 505);
        assert_eq!(respond(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", &exposition()).status, 400);
    }

    #[test]
    fn the_end_of_a_head_is_found_in_both_line_endings() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
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
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
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
    async fn connections_beyond_the_bound_are_closed_unanswered() {
        let addr = server(Bounds { max_connections: 1, ..Bounds::default() }).await;
        // Connections are accepted in order: the silent one takes the only
        // slot, the next is closed at once.
        let silent = TcpStream::connect(addr).await.unwrap();
        let extra = exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(extra.is_empty(), "{extra}");
        // Once it goes, its slot is free again (when its task has seen the close).
        drop(silent);
        let mut ok = String::new();
        for _ in 0..500 {
            ok = exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
            if !ok.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
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
