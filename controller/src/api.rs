//! The daemon's HTTP endpoint (loopback by default):
//!
//! | route | |
//! |---|---|
//! | `GET /healthz` | `ok` while the daemon runs |
//! | `GET /status` | JSON array: every rollout's [`Status`] |
//! | `GET /metrics` | Prometheus text: stage, weight, holds, verdicts, scrape and push errors, push latency |
//! | `POST /rollouts/<name>/pause`, `resume`, `promote`, `abort` | operator commands: 200 once applied and persisted, 202 if still queued after 30 s |
//! | `GET /wasm/sluice_filter.wasm`, `….sha256` | the filter module and its digest, with `--serve-wasm` ([`crate::wasm_module`]) |
//!
//! Who may act: every operator command needs `Authorization: Bearer <token>` (see
//! [`crate::cli::daemon_token`]). A request whose `Host` is not an address or `localhost` (or
//! a name given with `--allow-host`), or whose `Origin` is not the daemon itself, is refused
//! whatever its route: a web page the operator visits can neither act through the operator's
//! browser nor read the status through a rebound DNS name.
//!
//! What it holds: at most [`MAX_CONNECTIONS`] connections at a time (more are closed at once),
//! each with [`HEADER_READ_TIMEOUT`] to send a request's head (idle keep-alive connections
//! included) and [`CONNECTION_MAX`] in all, so idle or slow clients cannot use up the process's
//! file descriptors, which the rollouts need for their state and audit files.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::daemon::{Ordered, Registry, Status};
use crate::rollout::{Command, Judgement, Phase, State};
use crate::wasm_module::WasmModule;

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a connection has to send a request's head, from when the server starts waiting for it
/// (also between requests on a kept-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may stay open in all (longer than [`COMMAND_WAIT`]).
pub const CONNECTION_MAX: Duration = Duration::from_secs(120);

/// Who may use the endpoint.
#[derive(Debug, Clone)]
pub struct Access {
    /// The bearer token operator commands need.
    pub token: String,
    /// Host names accepted in `Host` besides addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
}

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    access: Access,
    module: Option<Arc<WasmModule>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let access = Arc::new(access);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: retrying at once would spin.
                tracing::warn!(error = %e, "accepting a connection to the endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("{MAX_CONNECTIONS} connections open: closing a new one");
            continue;
        };
        let (registry, access, module) = (registry.clone(), access.clone(), module.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (registry, access, module) = (registry.clone(), access.clone(), module.clone());
                async move {
                    Ok::<_, Infallible>(route(req, &registry, &access, module.as_deref()).await)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_MAX, conn).await;
            drop(slot);
        });
    }
}

/// Whether `host` (a `Host` or `Origin` authority, port included or not) names this daemon:
/// an IP address, `localhost`, or an allowed name.
fn known_host(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Why a request is refused before it is routed, if it is.
fn refused<B>(req: &Request<B>, access: &Access) -> Option<Response<Full<Bytes>>> {
    let header = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
    };
    let host = header(hyper::header::HOST);
    if let Some(host) = host {
        if !known_host(host, &access.allowed_hosts) {
            return Some(reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                format!("host {host:?} is not this daemon (start it with --allow-host NAME to accept a name)\n"),
            ));
        }
    }
    if let Some(origin) = header(hyper::header::ORIGIN) {
        let same = host.is_some_and(|h| origin == format!("http://{h}"));
        if !same {
            return Some(reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                format!("requests from web pages ({origin}) are refused\n"),
            ));
        }
    }
    if req.method() == Method::POST {
        let given = header(hyper::header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|t| same_token(t, &access.token)) {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "operator commands need `Authorization: Bearer <token>`: `sluice pause|resume|promote|abort` read it from the state directory's api-token file, --token-file or SLUICE_TOKEN\n".into(),
            );
            if let Ok(v) = "Bearer".parse() {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
            }
            return Some(r);
        }
    }
    None
}

/// Compares tokens in time independent of where they differ.
fn same_token(given: &str, token: &str) -> bool {
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Binds the endpoint's address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

async fn route<B>(
    req: Request<B>,
    registry: &Registry,
    access: &Access,
    module: Option<&WasmModule>,
) -> Response<Full<Bytes>> {
    if let Some(refusal) = refused(&req, access) {
        return refusal;
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, ["status"]) => {
            let all: Vec<Status> = registry.values().map(|h| h.status_now()).collect();
            let body = serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into());
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, ["metrics"]) => {
            let all: Vec<Status> = registry.values().map(|h| h.status_now()).collect();
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics(&all))
        }
        (&Method::GET, ["wasm", file]) => match module {
            Some(m) => crate::wasm_module::reply(m, file).unwrap_or_else(not_found),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no filter module is served (start the daemon with --serve-wasm FILE)\n".into(),
            ),
        },
        (&Method::POST, ["rollouts", name, action]) => {
            let command = match *action {
                "pause" => Command::Pause,
                "resume" => Command::Resume,
                "promote" => Command::Promote,
                "abort" => Command::Abort,
                other => {
                    return reply(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        format!("unknown action {other:?}: use pause, resume, promote or abort\n"),
                    );
                }
            };
            let Some(handle) = registry.get(*name) else {
                return reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no rollout named {name:?}\n"),
                );
            };
            match handle.order(command, COMMAND_WAIT).await {
                Ordered::Applied(state) => reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("{action}: applied; {}\n", summary(&state)),
                ),
                Ordered::Queued => reply(
                    StatusCode::ACCEPTED,
                    "text/plain",
                    format!(
                        "{action}: queued; applied when the current evaluation ends (check `sluice status`)\n"
                    ),
                ),
                Ordered::Gone => reply(
                    StatusCode::CONFLICT,
                    "text/plain",
                    format!("rollout {name:?} is no longer running\n"),
                ),
            }
        }
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// How long an operator command waits for the rollout to apply it: commands are taken between
/// steps, and a step is one evaluation (its reads are bounded by the source timeouts).
const COMMAND_WAIT: Duration = Duration::from_secs(30);

/// One line on where a rollout stands, for the reply to an operator command.
fn summary(state: &State) -> String {
    let mut line = format!("{} at {:.2}%", phase_name(&state.phase), state.weight);
    if let Phase::Canary { index } = state.phase {
        let _ = write!(line, " (stage {})", index + 1);
    }
    if let Phase::RolledBack { reason } = &state.phase {
        let _ = write!(line, ": {reason}");
    }
    if let Some(p) = &state.pending {
        let _ = write!(line, ", pushing {:.2}%", p.weight);
    }
    if state.paused {
        line.push_str(", paused");
    }
    if let Some(h) = &state.hold {
        let _ = write!(line, ", held: {h}");
    }
    line
}

fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::Shadow => "shadow",
        Phase::Canary { .. } => "canary",
        Phase::Promoted => "promoted",
        Phase::RolledBack { .. } => "rolled_back",
    }
}

fn judgement_name(j: &Judgement) -> &'static str {
    match j {
        Judgement::Pass => "pass",
        Judgement::Continue => "continue",
        Judgement::Hold { .. } => "hold",
        Judgement::Halt { .. } => "halt",
        Judgement::Fail { .. } => "fail",
    }
}

/// A rollout's ecdsGrpc sinks with their metric labels.
fn ecds_sinks(s: &Status) -> impl Iterator<Item = (String, &crate::sink::ecds_grpc::SinkProxies)> {
    s.proxies.iter().map(move |p| {
        let labels = format!(
            "rollout=\"{}\",resource=\"{}\",listen=\"{}\"",
            s.name, p.resource, p.listen
        );
        (labels, p)
    })
}

/// The daemon's own metrics in Prometheus text format.
pub fn metrics(all: &[Status]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let r = |s: &Status| format!("rollout=\"{}\"", s.name);
    family(
        "sluice_rollout_weight_percent",
        "gauge",
        "Treatment weight confirmed by the proxies.",
        all.iter().map(|s| (r(s), s.state.weight)).collect(),
    );
    family(
        "sluice_rollout_target_weight_percent",
        "gauge",
        "Treatment weight of the current phase.",
        all.iter().map(|s| (r(s), s.target_weight)).collect(),
    );
    family(
        "sluice_rollout_stage",
        "gauge",
        "Index of the current stage (-1 before the first, stage count when promoted).",
        all.iter()
            .map(|s| {
                let v = match s.state.phase {
                    Phase::Canary { index } => index as f64,
                    Phase::Promoted => s.stages.len() as f64,
                    _ => -1.0,
                };
                (r(s), v)
            })
            .collect(),
    );
    family(
        "sluice_rollout_phase",
        "gauge",
        "1 for the rollout's current phase.",
        all.iter()
            .map(|s| {
                (
                    format!("{},phase=\"{}\"", r(s), phase_name(&s.state.phase)),
                    1.0,
                )
            })
            .collect(),
    );
    family(
        "sluice_rollout_held",
        "gauge",
        "1 while the rollout holds (no data, SRM, failed push).",
        all.iter()
            .map(|s| (r(s), f64::from(u8::from(s.state.hold.is_some()))))
            .collect(),
    );
    family(
        "sluice_rollout_paused",
        "gauge",
        "1 while an operator has paused the rollout.",
        all.iter()
            .map(|s| (r(s), f64::from(u8::from(s.state.paused))))
            .collect(),
    );
    family(
        "sluice_rollout_judgement",
        "gauge",
        "1 for the last evaluation's judgement.",
        all.iter()
            .filter_map(|s| {
                let j = s.last_judgement.as_ref()?;
                Some((format!("{},judgement=\"{}\"", r(s), judgement_name(j)), 1.0))
            })
            .collect(),
    );
    family(
        "sluice_rollout_scrape_errors_total",
        "counter",
        "Evaluations without usable data.",
        all.iter().map(|s| (r(s), s.scrape_errors as f64)).collect(),
    );
    family(
        "sluice_rollout_observed_requests_total",
        "counter",
        "Requests per variant the proxies counted since the daemon started.",
        all.iter()
            .flat_map(|s| {
                s.observed_requests
                    .iter()
                    .map(move |(v, n)| (format!("{},variant=\"{v}\"", r(s)), *n as f64))
            })
            .collect(),
    );
    family(
        "sluice_rollout_proxy_restarts_total",
        "counter",
        "Proxy restarts (a new process behind an endpoint, told by its uptime) seen since the daemon started.",
        all.iter()
            .map(|s| (r(s), s.proxy_restarts as f64))
            .collect(),
    );
    family(
        "sluice_rollout_breaker_tripped",
        "gauge",
        "1 once the filter's breaker took the rollout's treatment out of traffic (the rollout was rolled back by the data plane).",
        all.iter()
            .map(|s| (r(s), f64::from(u8::from(s.breaker.is_some()))))
            .collect(),
    );
    family(
        "sluice_rollout_push_errors_total",
        "counter",
        "Pushes that failed or were rejected.",
        all.iter().map(|s| (r(s), s.push_errors as f64)).collect(),
    );
    family(
        "sluice_rollout_stopped",
        "gauge",
        "1 if the rollout stopped on an error (see /status `error`).",
        all.iter()
            .map(|s| (r(s), f64::from(u8::from(s.error.is_some()))))
            .collect(),
    );
    family(
        "sluice_rollout_ecds_proxies",
        "gauge",
        "ecdsGrpc sinks: streams of connected proxies subscribed to the rollout's resource.",
        all.iter()
            .flat_map(|s| ecds_sinks(s).map(|(l, p)| (l, p.proxies.len() as f64)))
            .collect(),
    );
    family(
        "sluice_rollout_ecds_proxies_current",
        "gauge",
        "ecdsGrpc sinks: of those, the ones that ACKed the version the server serves.",
        all.iter()
            .flat_map(|s| {
                ecds_sinks(s).map(|(l, p)| {
                    let current = p
                        .proxies
                        .iter()
                        .filter(|x| {
                            p.serving.is_some() && x.acked.get(&p.resource) == p.serving.as_ref()
                        })
                        .count();
                    (l, current as f64)
                })
            })
            .collect(),
    );
    family(
        "sluice_rollout_push_latency_seconds",
        "gauge",
        "Decision to proxy confirmation, last push.",
        all.iter()
            .filter_map(|s| Some((r(s), s.last_push_latency_secs?)))
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            token: "t0k3n-0123456789abcdef".into(),
            allowed_hosts: vec!["sluice.internal".into()],
        }
    }

    fn post(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/rollouts/r/pause");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn status_of(req: &Request<()>) -> Option<StatusCode> {
        refused(req, &access()).map(|r| r.status())
    }

    #[test]
    fn commands_need_the_token() {
        let host = ("host", "127.0.0.1:9400");
        assert_eq!(status_of(&post(&[host])), Some(StatusCode::UNAUTHORIZED));
        let wrong = ("authorization", "Bearer t0k3n-0123456789abcdeX");
        assert_eq!(
            status_of(&post(&[host, wrong])),
            Some(StatusCode::UNAUTHORIZED)
        );
        let right = ("authorization", "Bearer t0k3n-0123456789abcdef");
        assert_eq!(status_of(&post(&[host, right])), None);
        // Reads need none.
        let get = Request::builder()
            .uri("/status")
            .header("host", "localhost:9400")
            .body(())
            .unwrap();
        assert_eq!(status_of(&get), None);
    }

    #[test]
    fn foreign_origins_and_hosts_are_refused() {
        let right = ("authorization", "Bearer t0k3n-0123456789abcdef");
        for (host, origin, ok) in [
            ("127.0.0.1:9400", Some("http://evil.example"), false),
            ("127.0.0.1:9400", Some("null"), false),
            ("127.0.0.1:9400", Some("http://127.0.0.1:9400"), true),
            ("evil.example:9400", None, false),
            ("[::1]:9400", None, true),
            ("localhost", None, true),
            ("sluice.internal:9400", None, true),
            ("10.1.2.3:9400", None, true),
        ] {
            let mut h = vec![("host", host), right];
            if let Some(o) = origin {
                h.push(("origin", o));
            }
            let got = status_of(&post(&h));
            assert_eq!(got.is_none(), ok, "{host} {origin:?}: {got:?}");
            if !ok {
                assert_eq!(got, Some(StatusCode::FORBIDDEN));
            }
        }
    }
}
