//! Programmable upstream HTTP servers: stand-ins for model servers behind Envoy.
//!
//! Each [`Upstream`] listens on `127.0.0.1:<ephemeral>`, answers every request with the
//! [`Reply`] its behaviour closure returns for that [`Request`], and records what it received
//! (including the routing header `x-sluice-variant` Envoy forwarded). The behaviour can be swapped
//! while the server runs, e.g. to make the canary start failing half-way through a test.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{io, Result};

/// The routing header the filter sets and Envoy forwards upstream.
pub const VARIANT_HEADER: &str = "x-sluice-variant";
/// Header every default reply carries with the upstream's name, so clients can see who answered.
pub const UPSTREAM_HEADER: &str = "x-upstream";

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/predict?x=1`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received_at: Instant,
}

impl Request {
    /// A header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The routing header Envoy forwarded (`x-sluice-variant`).
    pub fn variant(&self) -> Option<&str> {
        self.header(VARIANT_HEADER)
    }

    /// The user id in `x-user-id`.
    pub fn user(&self) -> Option<&str> {
        self.header("x-user-id")
    }
}

/// What an upstream answers. Built with the constructors and chained setters:
/// `Reply::status(503).delay(Duration::from_millis(20))`,
/// `Reply::json(json!({"score": 0.7})).score(0.7).outcome("click")`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Default for Reply {
    fn default() -> Self {
        Self::ok()
    }
}

impl Reply {
    /// `200` with an empty body.
    pub fn ok() -> Self {
        Self {
            status: 200,
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// The given status with an empty body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::ok()
        }
    }

    /// `200` with a JSON body and `content-type: application/json`.
    pub fn json(value: serde_json::Value) -> Self {
        Self::ok()
            .header("content-type", "application/json")
            .body(value.to_string())
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits this long before answering (before the response headers).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Names a business outcome in `x-sluice-outcome`.
    pub fn outcome(self, name: &str) -> Self {
        self.header("x-sluice-outcome", name)
    }

    /// A model prediction in `x-model-score`.
    pub fn score(self, value: f64) -> Self {
        self.header("x-model-score", &value.to_string())
    }
}

type Behaviour = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

struct Shared {
    name: String,
    behaviour: RwLock<Behaviour>,
    requests: Mutex<Vec<Request>>,
    count: AtomicU64,
}

/// A running upstream server; stops (with all its connections) when dropped.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts a server answering each request with `behaviour(&request)`.
    pub async fn start(
        name: &str,
        behaviour: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Result<Upstream> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io(format!("upstream {name}: binding 127.0.0.1:0")))?;
        let addr = listener
            .local_addr()
            .map_err(io(format!("upstream {name}: local_addr")))?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            behaviour: RwLock::new(Arc::new(behaviour)),
            requests: Mutex::new(Vec::new()),
            count: AtomicU64::new(0),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Upstream { addr, shared, task })
    }

    /// Starts a server answering `200` with `{"upstream": name}` and header `x-upstream: name`.
    pub async fn named(name: &str) -> Result<Upstream> {
        let body = serde_json::json!({ "upstream": name });
        let owned = name.to_string();
        Self::start(name, move |_| {
            Reply::json(body.clone()).header(UPSTREAM_HEADER, &owned)
        })
        .await
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the behaviour for requests arriving from now on.
    pub fn set_behaviour(&self, behaviour: impl Fn(&Request) -> Reply + Send + Sync + 'static) {
        let mut guard = self
            .shared
            .behaviour
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(behaviour);
    }

    /// Requests received so far.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// A copy of every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.lock_requests().clone()
    }

    /// Forgets the recorded requests and resets the count.
    pub fn clear(&self) {
        self.lock_requests().clear();
        self.shared.count.store(0, Ordering::SeqCst);
    }

    fn lock_requests(&self) -> std::sync::MutexGuard<'_, Vec<Request>> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and the like: back off rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let received_at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Request {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers: parts.headers,
        body,
        received_at,
    };
    let behaviour = shared
        .behaviour
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let reply = behaviour(&request);
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(request);
    shared.count.fetch_add(1, Ordering::SeqCst);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = hyper::Response::new(Full::new(reply.body));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in &reply.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            response.headers_mut().append(k, v);
        }
    }
    Ok(response)
}
