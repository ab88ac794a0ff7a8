//! The daemon's HTTP endpoint (loopback by default):
//!
//! | route | |
//! |---|---|
//! | `GET /healthz` | `ok` while the daemon runs |
//! | `GET /status` | JSON array: every rollout's [`Status`] |
//! | `GET /metrics` | Prometheus text: stage, weight, holds, verdicts, scrape and push errors, push latency |
//! | `POST /rollouts/<name>/pause`, `resume`, `promote`, `abort` | operator commands: 200 once applied and persisted, 202 if still queued after 30 s |

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::daemon::{Ordered, Registry, Status};
use crate::rollout::{Command, Judgement, Phase, State};

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(route(req, &registry).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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

async fn route<B>(req: Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, ["status"]) => {
            let all: Vec<Status> = registry
                .values()
                .map(|h| h.status.borrow().clone())
                .collect();
            let body = serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into());
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, ["metrics"]) => {
            let all: Vec<Status> = registry
                .values()
                .map(|h| h.status.borrow().clone())
                .collect();
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics(&all))
        }
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
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
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
        "Proxy restarts (counters going down) seen since the daemon started.",
        all.iter()
            .map(|s| (r(s), s.proxy_restarts as f64))
            .collect(),
    );
    family(
        "sluice_rollout_push_errors_total",
        "counter",
        "Pushes that failed or were rejected.",
        all.iter().map(|s| (r(s), s.push_errors as f64)).collect(),
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
