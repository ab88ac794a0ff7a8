//! Synthetic model servers: stable, canary and shadow, each an HTTP/1 server on loopback.
//!
//! `GET` or `POST /predict` answers `{"model", "score", "label", "relevance"}` with the header
//! `x-model-score`. What a server does is its [`Behaviour`] (error rate, latency distribution,
//! score shift, quality), switchable at runtime so a canary can turn bad mid-rollout.
//!
//! Two kinds of randomness, both derived from the seed and never from the wall clock:
//! - the *score* is a function of the request's input (user id, path, body), shared by all
//!   roles, plus the role's own noise and shift: the same request gets a similar score from the
//!   stable model and its shadow, which is what makes shadow agreement meaningful;
//! - *faults and latency* are drawn per request from (seed, role, request number).
//!
//! `relevance` stands in for how good the answer is for the user; the synthetic users click
//! with that probability, so a model's `quality` (mean relevance) is its conversion rate.
//! The model never sets `x-sluice-outcome`: outcomes come from the users' beacons.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::rng::{hash_bytes, Draws};

/// Largest request body read; inference inputs in the demo are tiny.
const MAX_BODY: usize = 64 * 1024;

/// Where a server sits in the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Stable,
    Canary,
    Shadow,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Canary => "canary",
            Role::Shadow => "shadow",
        }
    }

    /// The demo's fixed port for this role (see `envoy/demo-rollout.yaml`).
    pub fn default_port(self) -> u16 {
        match self {
            Role::Stable => 10001,
            Role::Canary => 10002,
            Role::Shadow => 10003,
        }
    }
}

/// How a model server behaves. Times in milliseconds; probabilities in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    /// Share of requests answered `500`.
    pub error_rate: f64,
    /// Median latency (log-normal).
    pub latency_median_ms: f64,
    /// Shape of the log-normal: 0.35 gives p99 ≈ 2.3 × the median.
    pub latency_sigma: f64,
    /// Multiplies every latency (a slow canary is `3.0`).
    pub latency_factor: f64,
    /// Added to the score's logit: prediction drift.
    pub score_shift: f64,
    /// Standard deviation of this model's own logit noise: how far it disagrees with others.
    pub score_noise: f64,
    /// Mean relevance of the answers, i.e. the click-through rate users show.
    pub quality: f64,
}

impl Behaviour {
    /// A healthy production model.
    pub fn healthy() -> Behaviour {
        Behaviour {
            error_rate: 0.002,
            latency_median_ms: 25.0,
            latency_sigma: 0.35,
            latency_factor: 1.0,
            score_shift: 0.0,
            score_noise: 0.0,
            quality: 0.12,
        }
    }

    /// The answer to request number `n` with input `input`, for `role`, under `seed`. Pure.
    pub fn answer(&self, seed: u64, role: Role, n: u64, input: &[u8]) -> Answer {
        let role_stream = hash_bytes(role.name().as_bytes());
        let mut per_request = Draws::new(seed, role_stream, n);
        let failed = per_request.chance(self.error_rate);
        let z = per_request.normal();
        let ms = self.latency_median_ms * self.latency_factor * (self.latency_sigma * z).exp();
        let latency = Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 30.0));

        // Shared by every role: what the input "is".
        let input_stream = hash_bytes(input);
        let latent = Draws::new(seed, input_stream, 0).normal();
        // This role's view of it.
        let own = Draws::new(seed, input_stream ^ role_stream, 1).normal();
        let logit = -0.4 + 1.2 * latent + self.score_shift + self.score_noise * own;
        let score = 1.0 / (1.0 + (-logit).exp());
        // Round so the header and the JSON say exactly the same number.
        let score = (score * 10_000.0).round() / 10_000.0;
        let spread = per_request.uniform() + 0.5; // mean 1
        let relevance = (self.quality * spread).clamp(0.0, 1.0);
        Answer {
            status: if failed { 500 } else { 200 },
            latency,
            score,
            label: if score >= 0.5 { "positive" } else { "negative" },
            relevance: (relevance * 10_000.0).round() / 10_000.0,
        }
    }
}

/// One answer, before it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub latency: Duration,
    pub score: f64,
    pub label: &'static str,
    pub relevance: f64,
}

/// Failure to start a model server.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {name}: cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Shared {
    name: String,
    role: Role,
    seed: u64,
    behaviour: RwLock<Behaviour>,
    next: AtomicU64,
    errors: AtomicU64,
    /// Unix time of the last `/predict` request's arrival, in microseconds (0: none yet).
    last_at_micros: AtomicU64,
}

/// A running model server; stops when dropped.
pub struct ModelServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ModelServer {
    /// Listens on `addr` (port 0 for any) and serves until dropped.
    pub async fn start(
        role: Role,
        addr: SocketAddr,
        behaviour: Behaviour,
        seed: u64,
    ) -> Result<ModelServer, ModelError> {
        let name = role.name().to_string();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ModelError::Bind {
                name: name.clone(),
                addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ModelError::Bind {
            name: name.clone(),
            addr,
            source,
        })?;
        let shared = Arc::new(Shared {
            name,
            role,
            seed,
            behaviour: RwLock::new(behaviour),
            next: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_at_micros: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept(listener, shared.clone()));
        Ok(ModelServer { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// Replaces the behaviour; requests already sleeping finish with the old one.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        match self.shared.behaviour.write() {
            Ok(mut b) => *b = behaviour,
            // A poisoned lock only means a handler panicked mid-read; the value is still whole.
            Err(poisoned) => *poisoned.into_inner() = behaviour,
        }
    }

    pub fn behaviour(&self) -> Behaviour {
        read(&self.shared.behaviour)
    }

    /// Requests answered (or being answered) so far.
    pub fn served(&self) -> u64 {
        self.shared.next.load(Ordering::Relaxed)
    }

    /// Unix seconds when the last `/predict` request arrived, if any did: on the canary, the
    /// moment Envoy last routed a user to it, as the upstream sees it.
    pub fn last_request_at(&self) -> Option<f64> {
        let micros = self.shared.last_at_micros.load(Ordering::Relaxed);
        (micros > 0).then(|| micros as f64 / 1e6)
    }

    /// `500`s sent so far.
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

fn read(lock: &RwLock<Behaviour>) -> Behaviour {
    match lock.read() {
        Ok(b) => b.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow for the whole run.
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path != "/predict" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET && req.method() != Method::POST {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"));
    }
    let arrived = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    shared.last_at_micros.fetch_max(arrived, Ordering::Relaxed);
    let mut input = Vec::new();
    if let Some(user) = req.headers().get("x-user-id") {
        input.extend_from_slice(user.as_bytes());
    }
    input.push(0xFF);
    if let Some(pq) = req.uri().path_and_query() {
        input.extend_from_slice(pq.as_str().as_bytes());
    }
    input.push(0xFF);
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => input.extend_from_slice(&body.to_bytes()),
        Err(_) => return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n")),
    }

    let n = shared.next.fetch_add(1, Ordering::Relaxed);
    let behaviour = read(&shared.behaviour);
    let answer = behaviour.answer(shared.seed, shared.role, n, &input);
    tokio::time::sleep(answer.latency).await;
    if answer.status >= 500 {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        return Ok(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"error\":\"model failed\"}\n",
        ));
    }
    let body = serde_json::json!({
        "model": shared.name,
        "score": answer.score,
        "label": answer.label,
        "relevance": answer.relevance,
    });
    let mut resp = hyper::Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&answer.score.to_string()) {
        headers.insert("x-model-score", v);
    }
    Ok(resp)
}

fn plain(status: StatusCode, text: &'static str) -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[((xs.len() - 1) as f64 * q).round() as usize]
    }

    #[test]
    fn answers_are_deterministic_and_follow_the_behaviour() {
        let b = Behaviour {
            error_rate: 0.05,
            latency_factor: 2.0,
            ..Behaviour::healthy()
        };
        let n = 40_000u64;
        let answers: Vec<Answer> = (0..n)
            .map(|i| b.answer(42, Role::Canary, i, format!("u-{}", i % 977).as_bytes()))
            .collect();
        let again = b.answer(42, Role::Canary, 17, b"u-17");
        assert_eq!(answers[17], again);
        assert_ne!(answers[17], b.answer(43, Role::Canary, 17, b"u-17"));

        let errors = answers.iter().filter(|a| a.status == 500).count() as f64 / n as f64;
        assert!((errors - 0.05).abs() < 0.005, "error rate {errors}");
        let ms: Vec<f64> = answers
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1000.0)
            .collect();
        let median = quantile(ms.clone(), 0.5);
        assert!((median - 50.0).abs() < 2.0, "median {median}");
        // Log-normal p99 = median · exp(2.326 σ).
        let p99 = quantile(ms, 0.99);
        let want = 50.0 * (2.326f64 * 0.35).exp();
        assert!((p99 - want).abs() / want < 0.06, "p99 {p99} want {want}");
        let quality = answers.iter().map(|a| a.relevance).sum::<f64>() / n as f64;
        assert!((quality - 0.12).abs() < 0.003, "quality {quality}");
    }

    #[test]
    fn scores_depend_on_the_input_and_drift_moves_them() {
        let stable = Behaviour::healthy();
        let drifted = Behaviour {
            score_shift: 1.5,
            ..Behaviour::healthy()
        };
        // Same input, different request numbers and roles: same score without noise.
        let a = stable.answer(1, Role::Stable, 0, b"u-1/predict?item=3");
        let b = stable.answer(1, Role::Shadow, 99, b"u-1/predict?item=3");
        assert_eq!(a.score, b.score);
        let mean = |beh: &Behaviour| {
            (0..5000u64)
                .map(|i| beh.answer(1, Role::Canary, i, &i.to_le_bytes()).score)
                .sum::<f64>()
                / 5000.0
        };
        let (m0, m1) = (mean(&stable), mean(&drifted));
        assert!(m0 > 0.35 && m0 < 0.5, "stable mean {m0}");
        assert!(m1 - m0 > 0.2, "drift {m0} → {m1}");
    }
}
