//! HTTP client side: single requests ([`HttpClient`]) and bursts from many distinct users
//! ([`Load`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// One answered request.
#[derive(Debug, Clone)]
pub struct Response {
    /// The user id sent (empty for requests sent without one).
    pub user: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Time from sending the request to having the whole body.
    pub latency: Duration,
}

impl Response {
    /// A response header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Parse {
            what: "response body as JSON".into(),
            reason: e.to_string(),
        })
    }
}

/// How many responses carried each value of a header (`"<none>"` for responses without it).
pub fn count_by_header(responses: &[Response], header: &str) -> BTreeMap<String, usize> {
    count_by(responses, |r| {
        r.header(header).unwrap_or("<none>").to_string()
    })
}

/// How many responses fall in each group named by `key` (e.g. status code, body field).
pub fn count_by(
    responses: &[Response],
    key: impl Fn(&Response) -> String,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in responses {
        *counts.entry(key(r)).or_insert(0) += 1;
    }
    counts
}

/// A pooled HTTP/1.1 client with a per-request timeout. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client with a 10 s per-request timeout.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        // Loopback latency is what we measure; Nagle would add delays of its own.
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            inner,
            timeout: Duration::from_secs(10),
        }
    }

    /// Changes the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response> {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response> {
        let fail = |reason: String| Error::Http {
            method: method.to_string(),
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| fail(format!("bad url: {e}")))?;
        let mut request = hyper::Request::builder().method(method.clone()).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body.into()))
            .map_err(|e| fail(format!("bad request: {e}")))?;
        let started = Instant::now();
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|e| {
                // The legacy client's Display is terse; the source chain says what happened.
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason.push_str(": ");
                    reason.push_str(&s.to_string());
                    source = s.source();
                }
                fail(reason)
            })?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| fail(format!("reading body: {e}")))?
                .to_bytes();
            Ok::<_, Error>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(format!("no complete response within {:?}", self.timeout)))??;
        Ok(Response {
            user: String::new(),
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            latency: started.elapsed(),
        })
    }
}

type UserFn = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// A burst of requests to one URL, one per user id, with bounded concurrency (closed loop).
///
/// ```no_run
/// # async fn f() -> sluice_tests::Result<()> {
/// let responses = sluice_tests::Load::new("http://127.0.0.1:10000/predict")
///     .requests(10_000)
///     .concurrency(32)
///     .run()
///     .await?;
/// let split = sluice_tests::client::count_by_header(&responses, "x-sluice-variant");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Load {
    url: String,
    requests: usize,
    concurrency: usize,
    method: Method,
    user_header: Option<String>,
    user: UserFn,
    headers: Vec<(String, String)>,
    body: Bytes,
    client: HttpClient,
}

impl Load {
    /// 1,000 `GET`s to `url` from users `user-0`, `user-1`, ... in header `x-user-id`,
    /// 32 at a time.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            requests: 1000,
            concurrency: 32,
            method: Method::GET,
            user_header: Some("x-user-id".into()),
            user: Arc::new(|i| format!("user-{i}")),
            headers: Vec::new(),
            body: Bytes::new(),
            client: HttpClient::new(),
        }
    }

    /// Number of requests (request `i` is sent as user `user(i)`).
    pub fn requests(mut self, n: usize) -> Self {
        self.requests = n;
        self
    }

    /// Most requests in flight at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Header carrying the user id; `None` sends no user id at all.
    pub fn user_header(mut self, name: Option<&str>) -> Self {
        self.user_header = name.map(str::to_string);
        self
    }

    /// User id of request `i` (default `user-{i}`); return the same id for several `i` to send
    /// repeated requests from one user.
    pub fn users(mut self, f: impl Fn(usize) -> String + Send + Sync + 'static) -> Self {
        self.user = Arc::new(f);
        self
    }

    /// An extra header sent with every request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn client(mut self, client: HttpClient) -> Self {
        self.client = client;
        self
    }

    /// Sends everything; responses come back in request order. Fails on the first request that
    /// got no HTTP response at all (an HTTP error status is a response, not a failure).
    pub async fn run(&self) -> Result<Vec<Response>> {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.requests {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| Error::Http {
                    method: self.method.to_string(),
                    url: self.url.clone(),
                    reason: e.to_string(),
                })?;
            let this = self.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let user = (this.user)(i);
                let mut headers: Vec<(&str, &str)> = this
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                if let Some(h) = &this.user_header {
                    headers.push((h.as_str(), user.as_str()));
                }
                let mut response = this
                    .client
                    .send(this.method.clone(), &this.url, &headers, this.body.clone())
                    .await?;
                response.user = user;
                Ok::<_, Error>((i, response))
            });
        }
        let mut out: Vec<Option<Response>> = vec![None; self.requests];
        while let Some(joined) = tasks.join_next().await {
            let (i, response) = joined.map_err(|e| Error::Http {
                method: self.method.to_string(),
                url: self.url.clone(),
                reason: format!("request task failed: {e}"),
            })??;
            out[i] = Some(response);
        }
        Ok(out.into_iter().flatten().collect())
    }
}
