//! The scrapes' HTTP/1.1 connection to one Envoy admin endpoint, kept alive from tick to tick
//! and driven by the task that reads its answers.
//!
//! A scrape is one request per Envoy and tick, so per-request overhead is a large share of a
//! big fleet's tick. On hyper's connection API a request costs about half the CPU it costs
//! through reqwest's pooled client (no pool lookup, no redirect, retry and timeout layers:
//! docs/benchmarks.md, "Controller cost"); other admin calls keep using [`crate::admin`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where an admin endpoint's base URL points.
#[derive(Debug)]
pub struct Target {
    /// `host:port`: what is connected to and sent as `Host`.
    authority: String,
    /// The base URL's path, put before every request's path (`""` for most Envoys).
    prefix: String,
}

impl Target {
    /// The target of `base` (`http://host:port[/prefix]`), or what is wrong with it.
    pub fn parse(base: &str) -> Result<Target, String> {
        let uri: hyper::Uri = base.parse().map_err(|e| format!("not a URL ({e})"))?;
        if uri.scheme_str() != Some("http") {
            return Err("only http:// admin endpoints can be read".into());
        }
        let authority = uri.authority().ok_or("the URL has no host")?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(Target {
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// hyper's side of one connection: polling it reads the socket and writes requests.
type Connection = hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

/// A kept-alive connection, opened when first needed and again after it broke.
///
/// The connection is driven by the task that reads its answer, not by a task of its own: a
/// chunk read from the socket is parsed in the same poll, while it is still in the CPU's
/// cache, instead of waiting in a channel while the runtime reads other Envoys' sockets.
#[derive(Debug, Default)]
pub struct Conn {
    tx: Option<SendRequest<Empty<Bytes>>>,
    /// `None` once hyper has closed it (or before the first request).
    connection: Option<Pin<Box<Connection>>>,
}

impl Conn {
    /// Sends `GET <prefix><path_and_query>` asking for `accept`; the caller reads the body.
    /// A kept-alive connection the Envoy closed meanwhile is replaced once.
    pub async fn get(
        &mut self,
        target: &Target,
        path_and_query: &str,
        accept: &'static str,
        connect_within: Duration,
    ) -> Result<hyper::Response<Incoming>, String> {
        loop {
            let reused = match &self.tx {
                Some(tx) if !tx.is_closed() && self.connection.is_some() => true,
                _ => {
                    let (tx, connection) = connect(target, connect_within).await?;
                    self.tx = Some(tx);
                    self.connection = Some(Box::pin(connection));
                    false
                }
            };
            let Some(tx) = self.tx.as_mut() else {
                return Err("no connection".into());
            };
            let request = hyper::Request::get(format!("{}{path_and_query}", target.prefix))
                .header(hyper::header::HOST, &target.authority)
                .header(hyper::header::ACCEPT, accept)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let send = async {
                match tx.ready().await {
                    Ok(()) => tx.send_request(request).await,
                    Err(e) => Err(e),
                }
            };
            let sent = drive(&mut self.connection, send).await;
            match sent {
                Ok(response) => return Ok(response),
                Err(e) => {
                    self.tx = None;
                    if !reused {
                        return Err(e.to_string());
                    }
                }
            }
        }
    }

    /// Forgets the connection (after a failed or abandoned answer: what is left on it is
    /// unknown).
    pub fn drop_connection(&mut self) {
        self.tx = None;
        self.connection = None;
    }

    /// The next frame of `body` (an answer on this connection), reading the socket as needed.
    pub async fn frame(&mut self, body: &mut Incoming) -> Option<Result<Frame<Bytes>, String>> {
        let frame = drive(&mut self.connection, body.frame()).await;
        frame.map(|f| f.map_err(|e| e.to_string()))
    }
}

/// Polls `work` until it is done, polling the connection (if still open) first each time, so
/// that what it reads is handed to `work` at once.
async fn drive<T>(
    connection: &mut Option<Pin<Box<Connection>>>,
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Some(c) = connection.as_mut() {
            // Done: closed by either side or failed; `work` then sees the end of its answer.
            if c.as_mut().poll(cx).is_ready() {
                *connection = None;
            }
        }
        work.as_mut().poll(cx)
    })
    .await
}

/// Bytes read from the socket at a time. hyper's adaptive buffer grows to hundreds of KiB on
/// a large answer and, while a chunk of it is still being read, takes a fresh one; a fixed
/// 16 KiB, reused once its chunks are read, costs less CPU and memory over a big fleet
/// (docs/benchmarks.md, "Controller cost").
const READ_BUFFER: usize = 16 << 10;

async fn connect(
    target: &Target,
    within: Duration,
) -> Result<(SendRequest<Empty<Bytes>>, Connection), String> {
    let stream = tokio::time::timeout(within, TcpStream::connect(&target.authority))
        .await
        .map_err(|_| format!("no connection within {within:?}"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    hyper::client::conn::http1::Builder::new()
        .read_buf_exact_size(Some(READ_BUFFER))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
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
            Target::parse("https://envoy:9901").err().as_deref(),
            Some("only http:// admin endpoints can be read")
        );
        assert!(Target::parse("not a url").is_err());
    }

    /// An endpoint that closes the connection after every answer, answering with the
    /// request's path.
    async fn closing_endpoint() -> String {
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("no loopback listener");
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
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
            let resp = conn
                .get(&target, &query, "text/plain", Duration::from_secs(5))
                .await;
            let mut body = match resp {
                Ok(r) => r.into_body(),
                Err(e) => panic!("request {i}: {e}"),
            };
            let mut got = Vec::new();
            while let Some(frame) = conn.frame(&mut body).await {
                match frame.map(Frame::into_data) {
                    Ok(Ok(data)) => got.extend_from_slice(&data),
                    Ok(Err(_)) => {}
                    Err(e) => panic!("request {i}: {e}"),
                }
            }
            assert_eq!(got, format!("/e3{query}").as_bytes());
        }
        let gone = Target::parse("http://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
        let err = Conn::default()
            .get(&gone, "/", "text/plain", Duration::from_secs(5))
            .await;
        assert!(
            matches!(&err, Err(e) if e.starts_with("cannot connect")),
            "{err:?}"
        );
    }
}
