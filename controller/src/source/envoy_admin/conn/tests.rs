use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

#[test]
fn base_urls_are_read_or_refused_with_a_reason() {
    let t = Target::parse("http://127.0.0.1:9901").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (t.authority.as_str(), t.prefix.as_str()),
        ("127.0.0.1:9901", "")
    );
    let t = Target::parse("http://envoy/e17/").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (t.authority.as_str(), t.prefix.as_str()),
        ("envoy:80", "/e17")
    );
    assert_eq!(
        Target::parse("https://envoy:9901")
            .err()
            .map(|e| e.to_string())
            .as_deref(),
        Some("only http:// admin endpoints can be read")
    );
    assert!(Target::parse("not a url").is_err());
}

/// `body` in chunks of `sizes` (cycled), with an extension on the first size line and a
/// trailer.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    for (k, &n) in sizes.iter().cycle().enumerate() {
        if rest.is_empty() {
            break;
        }
        let n = n.min(rest.len());
        let ext = if k == 0 { ";name=value" } else { "" };
        out.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
    out
}

/// Decodes `input` fed in the given pieces; the body and the bytes left after it.
fn decode_in(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize), String> {
    let mut state = Chunked::START;
    let mut body = Vec::new();
    let mut left = 0;
    for piece in pieces {
        let used = state
            .decode(piece, &mut |d: &[u8]| {
                body.extend_from_slice(d);
                Ok::<(), std::convert::Infallible>(())
            })
            .map_err(|e| e.to_string())?;
        left += piece.len() - used;
    }
    if state != Chunked::Done {
        return Err(format!("not done: {state:?}"));
    }
    Ok((body, left))
}

#[test]
fn a_chunked_body_is_decoded_wherever_the_reads_cut_it() {
    let body: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut wire = chunked(&body, &[1, 300, 17, 1024]);
    wire.extend_from_slice(b"NEXT");
    for cut in 0..wire.len() {
        let (a, b) = wire.split_at(cut);
        assert_eq!(
            decode_in(&[a, b]),
            Ok((body.clone(), 4)),
            "cut at byte {cut}"
        );
    }
    let bytes: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(decode_in(&bytes), Ok((body, 4)));
    // Upper- and lower-case sizes, no trailer.
    assert_eq!(
        decode_in(&[b"a\r\n0123456789\r\nB\r\nabcdefghijk\r\n0\r\n\r\n"]),
        Ok((b"0123456789abcdefghijk".to_vec(), 0))
    );
}

#[test]
fn a_malformed_chunked_body_is_an_error_naming_what_is_wrong() {
    for (wire, says) in [
        (&b"g\r\n"[..], "bad chunk size byte 0x67"),
        (b"\r\n", "bad chunk size byte 0x0d"),
        (b"3\rx", "expected the end of a chunk size line"),
        (b"3\r\nabcX", "expected the end of a chunk, got byte 0x58"),
        (b"1000000000000000\r\n", "over 15 hex digits"),
        (b"0\r\nx: 1\rX", "expected the end of a trailer line"),
    ] {
        let err = decode_in(&[wire]).err().unwrap_or_default();
        assert!(err.contains(says), "{wire:?}: {err}");
    }
}

/// A loopback endpoint that answers each request with the next of `answers` (each written
/// in the given pieces, a moment apart), closing the connection after an answer marked so.
/// Counts the connections it accepted.
struct Scripted {
    base: String,
    accepted: Arc<AtomicUsize>,
    /// Connections the server has closed (dropped its end of).
    closed: Arc<AtomicUsize>,
}

type Answer = (Vec<Vec<u8>>, bool);

/// A listener on a free loopback port, and its address.
async fn listener() -> (tokio::net::TcpListener, String) {
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
        panic!("no loopback listener");
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    (listener, addr)
}

async fn scripted(answers: Vec<Answer>) -> Scripted {
    let (listener, addr) = listener().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let closed = Arc::new(AtomicUsize::new(0));
    let (count, gone) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let answers = answers.clone();
            let gone = gone.clone();
            tokio::spawn(async move {
                // Counted once the stream is dropped (locals drop in reverse order), whichever
                // way the script ends.
                struct Closed(Arc<AtomicUsize>);
                impl Drop for Closed {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let _closed = Closed(gone);
                let mut stream = stream;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    got.clear();
                    let next = answers.lock().ok().and_then(|mut a| a.pop_front());
                    let Some((pieces, close)) = next else { return };
                    for piece in pieces {
                        if stream.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    Scripted {
        base: format!("http://{addr}/e3"),
        accepted,
        closed,
    }
}

async fn fetch(conn: &mut Conn, base: &str) -> Result<(Head, Vec<u8>), String> {
    let target = Target::parse(base).map_err(|e| e.to_string())?;
    let head = conn
        .get(&target, "/stats", "text/plain", Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    conn.read_body(&mut |d: &[u8]| {
        body.extend_from_slice(d);
        Ok::<(), std::convert::Infallible>(())
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok((head, body))
}

fn one(bytes: &[u8]) -> Vec<Vec<u8>> {
    vec![bytes.to_vec()]
}

#[tokio::test]
async fn answers_by_length_chunked_and_until_close_are_read_and_the_connection_reused() {
    let text = b"sluice_rq{variant=\"canary\"} 7\n".repeat(1000);
    let wire = chunked(&text, &[4096, 333]);
    let mut chunked_answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    chunked_answer.extend_from_slice(&wire);
    // The same answer with its head cut in two and its body in many pieces.
    let (a, b) = chunked_answer.split_at(20);
    let mut pieces = vec![a.to_vec(), b[..40].to_vec()];
    pieces.extend(b[40..].chunks(5000).map(<[u8]>::to_vec));
    let s = scripted(vec![
        (
            one(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: a/b\r\n\r\nhello"),
            false,
        ),
        (one(&chunked_answer), false),
        (pieces, false),
        (
            one(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
            false,
        ),
        (
            one(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 4\r\n\r\nbusy"),
            false,
        ),
        (one(b"HTTP/1.1 200 OK\r\n\r\nuntil the close"), true),
    ])
    .await;
    let mut conn = Conn::default();
    let got = fetch(&mut conn, &s.base).await;
    let head = Head {
        status: 200,
        content_type: Some("a/b".into()),
    };
    assert_eq!(got, Ok((head, b"hello".to_vec())));
    for _ in 0..2 {
        let got = fetch(&mut conn, &s.base).await;
        let head = Head {
            status: 200,
            content_type: Some("text/plain".into()),
        };
        assert_eq!(got, Ok((head, text.clone())));
    }
    let got = fetch(&mut conn, &s.base).await.map(|(h, b)| (h.status, b));
    assert_eq!(got, Ok((204, Vec::new())));
    let got = fetch(&mut conn, &s.base).await.map(|(h, b)| (h.status, b));
    assert_eq!(got, Ok((503, b"busy".to_vec())));
    assert_eq!(
        s.accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    let got = fetch(&mut conn, &s.base).await.map(|(h, b)| (h.status, b));
    assert_eq!(got, Ok((200, b"until the close".to_vec())));
    assert!(
        conn.stream.is_none(),
        "an answer read to the close ends the connection"
    );
}

#[tokio::test]
async fn a_connection_is_not_reused_after_an_unread_or_overlong_answer() {
    let answer = one(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let s = scripted(vec![
        // Two answers for one request: the second must not be taken for the next request's.
        (
            one(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"),
            false,
        ),
        (answer.clone(), false),
        (answer.clone(), false),
        (answer.clone(), false),
    ])
    .await;
    let mut conn = Conn::default();
    assert_eq!(
        fetch(&mut conn, &s.base).await.map(|r| r.1),
        Ok(b"ok".to_vec())
    );
    assert_eq!(
        fetch(&mut conn, &s.base).await.map(|r| r.1),
        Ok(b"ok".to_vec())
    );
    assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    // A head read but its body left unread: the next request goes on a new connection.
    let target = Target::parse(&s.base).unwrap_or_else(|e| panic!("{e}"));
    let head = conn
        .get(&target, "/", "text/plain", Duration::from_secs(5))
        .await;
    assert!(head.is_ok(), "{head:?}");
    assert_eq!(
        fetch(&mut conn, &s.base).await.map(|r| r.1),
        Ok(b"ok".to_vec())
    );
    assert_eq!(s.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn broken_answers_are_errors_naming_what_is_wrong() {
    let long_head = format!(
        "HTTP/1.1 200 OK\r\nx-long: {}\r\n\r\n",
        "a".repeat(READ_BUFFER)
    );
    let many_headers = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x: 1\r\n".repeat(40));
    for (answer, says) in [
        (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not an HTTP/1.1 answer"),
        (
            long_head.as_bytes(),
            "the answer's head is over 16384 bytes",
        ),
        (many_headers.as_bytes(), "over 32 header lines"),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            "Content-Length \"x\" is not a length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
            "the connection closed inside the answer",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "bad chunk size byte",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-",
            "closed inside the answer's head",
        ),
        (b"", "the connection closed before any answer"),
    ] {
        let s = scripted(vec![(one(answer), true)]).await;
        let err = fetch(&mut Conn::default(), &s.base).await.err();
        assert!(
            err.as_deref().is_some_and(|e| e.contains(says)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        );
    }
    let gone = Target::parse("http://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
    let err = Conn::default()
        .get(&gone, "/", "text/plain", Duration::from_secs(5))
        .await;
    assert!(
        matches!(&err, Err(e) if e.to_string().starts_with("cannot connect")),
        "{err:?}"
    );
}

/// An endpoint that closes the connection after every answer, answering with the
/// request's path (hyper's server, as a second, independent implementation).
async fn closing_endpoint() -> String {
    use bytes::Bytes;
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<_>| {
                    let path = req.uri().to_string();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::from(path)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/e3")
}

#[tokio::test]
async fn a_connection_the_endpoint_closed_is_opened_again() {
    let base = closing_endpoint().await;
    let target = Target::parse(&base).unwrap_or_else(|e| panic!("{e}"));
    let mut conn = Conn::default();
    for i in 0..3 {
        let query = format!("/stats/prometheus?n={i}");
        let head = conn
            .get(&target, &query, "text/plain", Duration::from_secs(5))
            .await;
        assert!(
            matches!(&head, Ok(h) if h.status == 200),
            "request {i}: {head:?}"
        );
        let mut got = Vec::new();
        let read = conn
            .read_body(&mut |d: &[u8]| {
                got.extend_from_slice(d);
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .map_err(|e| e.to_string());
        assert_eq!(read, Ok(()), "request {i}");
        assert_eq!(got, format!("/e3{query}").as_bytes());
    }
}

#[tokio::test]
async fn a_kept_alive_connection_closed_while_idle_is_replaced_once() {
    let answer = one(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    // The endpoint answers and then closes without saying so: the client still holds the
    // connection as kept alive, and its next request finds it closed.
    let s = scripted(vec![(answer.clone(), true), (answer, true)]).await;
    let mut conn = Conn::default();
    assert_eq!(
        fetch(&mut conn, &s.base).await.map(|r| r.1),
        Ok(b"ok".to_vec())
    );
    assert!(conn.stream.is_some());
    // Wait for the server to have closed its end (it does so right after the answer).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.closed.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never closed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        fetch(&mut conn, &s.base).await.map(|r| r.1),
        Ok(b"ok".to_vec())
    );
    assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
}
