//! The demo's parts over real sockets on loopback: a model server under many requests, the
//! synthetic users against a stand-in for Envoy+filter that assigns with the filter's own code,
//! and a report rendered from a small synthetic series.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_demo::models::{Behaviour, ModelServer, Role};
use sluice_demo::recorder::{Histogram, Point, RolloutPoint, Series, VariantPoint};
use sluice_demo::report::{self, AuditRecord, ReportInput};
use sluice_demo::users::{self, LoadConfig, LoadHandle, Srm};
use sluice_filter::config::{Experiment, Plan};
use sluice_filter::request::variant_of_key;

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn experiment(canary_weight: f64) -> Experiment {
    let json = serde_json::json!({
        "version": 1,
        "experiments": [{
            "name": "demo",
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
            "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": canary_weight}]
        }]
    });
    match Plan::from_json(json.to_string().as_bytes()) {
        Ok(mut p) => p.experiments.remove(0),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_model_server_answers_with_its_behaviour_and_switches_at_runtime() -> anyhow::Result<()> {
    let behaviour = Behaviour {
        error_rate: 0.1,
        latency_median_ms: 5.0,
        ..Behaviour::healthy()
    };
    let server = ModelServer::start(Role::Canary, loopback(), behaviour, 9).await?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url = format!("http://{}/predict?item=1", server.addr());

    // Bounded concurrency: the latency measured should be the server's, not a queue's.
    let limit = Arc::new(tokio::sync::Semaphore::new(25));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (client, url, limit) = (client.clone(), url.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let req = hyper::Request::post(url)
                .header("x-user-id", format!("u-{i}"))
                .body(Full::new(Bytes::from_static(b"{\"features\":[1,2]}")))?;
            let started = std::time::Instant::now();
            let resp = client.request(req).await?;
            let status = resp.status().as_u16();
            let score = resp
                .headers()
                .get("x-model-score")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, score, body, started.elapsed()))
        });
    }
    let mut errors: u64 = 0;
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (status, score, body, latency) = r??;
        latencies.push(latency);
        if status == 500 {
            errors += 1;
            continue;
        }
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(json["model"], "canary");
        assert_eq!(
            score.as_deref().and_then(|s| s.parse::<f64>().ok()),
            json["score"].as_f64(),
            "header and body agree"
        );
        assert!(json["label"].is_string());
    }
    assert!((60..=140).contains(&errors), "errors {errors}/1000");
    latencies.sort();
    let median = latencies[500];
    // The server sleeps ≈ 5 ms at the median; loopback and scheduling add a little.
    assert!(
        median >= Duration::from_millis(4) && median < Duration::from_millis(100),
        "median {median:?}"
    );
    assert_eq!(server.served(), 1000);
    assert_eq!(server.errors(), errors);

    server.set_behaviour(Behaviour {
        error_rate: 1.0,
        ..Behaviour::healthy()
    });
    let resp = client
        .request(hyper::Request::get(&url).body(Full::new(Bytes::new()))?)
        .await?;
    assert_eq!(resp.status(), 500);
    let resp = client
        .request(
            hyper::Request::get(format!("http://{}/other", server.addr()))
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

/// What the stand-in proxy saw.
#[derive(Default)]
struct Seen {
    /// Requests with a user id, by the variant the id hashes to.
    with_id: BTreeMap<String, u64>,
    without_id: u64,
    clicks: BTreeMap<String, u64>,
    purchases: u64,
}

/// A stand-in for Envoy + the Sluice filter: assigns with the filter's code, echoes the variant,
/// answers like a model whose relevance depends on the variant, and takes beacons with 204.
async fn fake_proxy(
    exp: Experiment,
    relevance: [f64; 2],
) -> anyhow::Result<(SocketAddr, Arc<Mutex<Seen>>)> {
    let listener = tokio::net::TcpListener::bind(loopback()).await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = (Arc::new(exp), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (exp, seen) = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (exp, seen) = (exp.clone(), seen.clone());
                    async move {
                        let user = req
                            .headers()
                            .get("x-user-id")
                            .map(|v| v.as_bytes().to_vec());
                        let variant = user
                            .as_deref()
                            .map_or(exp.control, |u| variant_of_key(&exp, u));
                        let name = exp.variants[variant].clone();
                        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                        let mut resp = if req.uri().path() == "/sluice/event" {
                            let query = req.uri().query().unwrap_or("");
                            if query.contains("name=click") {
                                *seen.clicks.entry(name.clone()).or_default() += 1;
                            } else if query.contains("name=purchase") {
                                seen.purchases += 1;
                            }
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::NO_CONTENT;
                            r
                        } else {
                            match &user {
                                Some(_) => *seen.with_id.entry(name.clone()).or_default() += 1,
                                None => seen.without_id += 1,
                            }
                            let body = serde_json::json!({"model": name, "score": 0.5, "relevance": relevance[variant]});
                            let mut r =
                                hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                            r.headers_mut().insert(
                                "x-model-score",
                                hyper::header::HeaderValue::from_static("0.5"),
                            );
                            r
                        };
                        if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
                            resp.headers_mut().insert("x-sluice-variant", v);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, seen))
}

fn load(addr: SocketAddr, requests: u64) -> LoadConfig {
    LoadConfig {
        base_url: format!("http://{addr}"),
        users: 2000,
        rate: 1000.0,
        max_in_flight: 4096,
        duration: Duration::from_secs(20),
        max_requests: requests,
        seed: 5,
        ..LoadConfig::default()
    }
}

#[tokio::test]
async fn beacons_follow_the_served_models_quality() -> anyhow::Result<()> {
    let exp = experiment(50.0);
    let (addr, seen) = fake_proxy(exp, [0.2, 0.05]).await?;
    let tallies = users::run(load(addr, 3000), LoadHandle::default()).await?;
    assert_eq!(tallies.sent + tallies.skipped, 3000);
    let sent = tallies.sent;
    assert_eq!(tallies.ids_dropped, 0);
    let stable = &tallies.variants["stable"];
    let canary = &tallies.variants["canary"];
    assert_eq!(stable.requests + canary.requests, sent);
    // Click rate ≈ relevance; ≈ 1500 requests each: a standard error below 0.011.
    assert!(
        (stable.click_rate() - 0.2).abs() < 0.03,
        "{}",
        stable.click_rate()
    );
    assert!(
        (canary.click_rate() - 0.05).abs() < 0.02,
        "{}",
        canary.click_rate()
    );
    let purchases = (stable.purchases + canary.purchases) as f64;
    let clicks = (stable.clicks + canary.clicks) as f64;
    assert!(
        (purchases / clicks - 0.25).abs() < 0.06,
        "{purchases}/{clicks}"
    );
    // Every beacon arrived and carried the id of a user in the variant it clicked in.
    {
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(s.clicks.get("stable").copied().unwrap_or(0), stable.clicks);
        assert_eq!(s.clicks.get("canary").copied().unwrap_or(0), canary.clicks);
        assert_eq!(s.purchases, stable.purchases + canary.purchases);
    }
    assert_eq!(stable.beacons_failed + canary.beacons_failed, 0);
    // Deterministic: the same seed gives the same choices.
    let again = users::run(load(addr, 3000), LoadHandle::default()).await?;
    if again.skipped == 0 && tallies.skipped == 0 {
        assert_eq!(again.variants["canary"].clicks, canary.clicks);
        assert_eq!(again.variants["stable"].requests, stable.requests);
    }
    Ok(())
}

#[tokio::test]
async fn srm_fault_drops_only_canary_users_ids_and_skews_the_split() -> anyhow::Result<()> {
    let exp = experiment(30.0);
    let (addr, seen) = fake_proxy(exp.clone(), [0.1, 0.1]).await?;
    let handle = LoadHandle::default();
    handle.set_srm(Some(Srm {
        experiment: exp.clone(),
        treatment: 1,
        drop_share: 0.5,
    }));
    let tallies = users::run(load(addr, 3000), handle).await?;
    let s = seen.lock().unwrap_or_else(|p| p.into_inner());
    // No request with an id was a canary user's dropped one, and every dropped request
    // arrived without an id.
    assert_eq!(s.without_id, tallies.ids_dropped);
    let canary_with_id = s.with_id.get("canary").copied().unwrap_or(0) as f64;
    let dropped = tallies.ids_dropped as f64;
    let share = dropped / (dropped + canary_with_id);
    assert!(
        (share - 0.5).abs() < 0.05,
        "dropped share of canary users' requests {share}"
    );
    // The split the proxy saw: ≈ 30 % × 0.5 = 15 % canary instead of 30 %.
    let observed = tallies.variants["canary"].requests as f64 / tallies.sent as f64;
    assert!(
        (observed - 0.15).abs() < 0.03,
        "observed canary share {observed}"
    );
    Ok(())
}

fn hist(le: &[f64], cumulative: &[f64]) -> Histogram {
    Histogram {
        le: le.to_vec(),
        cumulative: cumulative.to_vec(),
        sum: 0.0,
        count: cumulative.last().copied().unwrap_or(0.0),
    }
}

/// Ten seconds of a rollout at 10 % whose canary starts failing at t = 4 and is rolled back.
fn synthetic_series() -> Series {
    let lat = [10.0, 50.0, 100.0, f64::INFINITY];
    let pred = [250.0, 500.0, 750.0, 1000.0, f64::INFINITY];
    let points = (0..=30)
        .map(|t| {
            let tf = f64::from(t);
            let canary_errors = if t > 4 { (tf - 4.0) * 3.0 } else { 0.0 };
            let variant = |requests: f64, errors: f64, clicks: f64, shift: f64| VariantPoint {
                requests,
                responses: BTreeMap::from([
                    ("2xx".to_string(), requests - errors),
                    ("5xx".to_string(), errors),
                ]),
                outcomes: BTreeMap::from([("click".to_string(), clicks)]),
                latency_ms: hist(&lat, &[requests * 0.6, requests * 0.98, requests, requests]),
                prediction: hist(
                    &pred,
                    &[
                        requests * (0.2 - shift),
                        requests * (0.6 - shift),
                        requests * 0.9,
                        requests,
                        requests,
                    ],
                ),
                ..VariantPoint::default()
            };
            Point {
                t: tf,
                at: 1000.0 + tf,
                variants: Some(BTreeMap::from([
                    (
                        "stable".to_string(),
                        variant(270.0 * tf, 0.5 * tf, 32.0 * tf, 0.0),
                    ),
                    (
                        "canary".to_string(),
                        variant(30.0 * tf, canary_errors, 3.5 * tf, 0.15),
                    ),
                ])),
                ecds_updates: Some(2.0),
                ecds_rejected: Some(0.0),
                rollout: Some(RolloutPoint {
                    phase: if t < 20 { "canary" } else { "rolled_back" }.into(),
                    stage: Some(2),
                    weight: if t < 20 { 10.0 } else { 0.0 },
                    target_weight: if t < 18 { 10.0 } else { 0.0 },
                    judgement: Some(if t < 18 { "pass" } else { "fail" }.into()),
                    rolled_back_reason: (t >= 20).then(|| "5xx rate 9.1 % vs 0.2 %".into()),
                    ..RolloutPoint::default()
                }),
            }
        })
        .collect();
    Series {
        experiment: "demo".into(),
        control: "stable".into(),
        treatment: "canary".into(),
        scenario: Some("error-spike".into()),
        started_at: 1000.0,
        fault_injected_at: Some(1004.0),
        points,
        ..Series::default()
    }
}

#[test]
fn report_renders_plots_decisions_and_summary() -> anyhow::Result<()> {
    let audit_text = r#"{"at":1000.5,"rollout":"demo","record":"decision","kind":"started","message":"rollout started","weight":0.0}
{"at":1001.0,"rollout":"demo","record":"evaluation","judgement":{"kind":"pass"}}
{"at":1001.2,"rollout":"demo","record":"push","version":3,"weight":10.0,"shadow":false,"decision_to_confirmation_secs":0.7}
{"at":1018.0,"rollout":"demo","record":"decision","kind":"rolled_back","message":"canary 5xx rate 9.1 % > stable 0.2 % <critical>","weight":10.0}
{"at":1019.5,"rollout":"demo","record":"push","version":4,"weight":0.0,"shadow":false,"decision_to_confirmation_secs":1.5}
"#;
    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join("demo.audit.jsonl");
    std::fs::write(&audit_path, audit_text)?;
    let audit: Vec<AuditRecord> = report::read_audit(&audit_path)?;
    assert_eq!(audit.len(), 4);
    let input = ReportInput {
        series: synthetic_series(),
        audit,
        users: None,
        expected: Some("rolled back".into()),
        expectation: None,
    };
    let written = report::write(dir.path(), &input)?;
    let html = std::fs::read_to_string(&written.html)?;

    assert!(html.starts_with("<!DOCTYPE html>"));
    // Self-contained: no scripts, no external references.
    assert!(!html.contains("<script"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    // Weight, errors, p99, conversion and prediction plots.
    assert_eq!(html.matches("<svg").count(), 5, "{html}");
    assert_eq!(html.matches("</svg>").count(), 5);
    for title in [
        "Treatment weight",
        "5xx error rate",
        "p99 latency",
        "Wilson interval",
        "Prediction distribution",
    ] {
        assert!(html.contains(title), "missing plot {title}");
    }
    assert!(html.contains("<path d=\"M"), "lines are drawn");
    assert!(html.contains("class=\"band\""), "confidence band drawn");
    assert!(html.contains("class=\"bar\""), "prediction bars drawn");
    assert!(html.contains("class=\"marker\""), "decision markers drawn");
    // Decisions with their reasons, escaped.
    assert!(html.contains("rolled_back"));
    assert!(html.contains("canary 5xx rate 9.1 % &gt; stable 0.2 % &lt;critical&gt;"));
    assert!(html.contains("confirmed 1.50 s after the decision"));
    assert!(html.contains("From fault injection to Envoy confirming weight 0: <b>15.5 s</b>"));

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&written.json)?)?;
    assert_eq!(summary["final_phase"], "rolled_back");
    assert_eq!(summary["final_reason"], "5xx rate 9.1 % vs 0.2 %");
    assert_eq!(summary["time_to_rollback_secs"], 15.5);
    assert_eq!(summary["time_to_rollback_decision_secs"], 14.0);
    assert_eq!(summary["decisions"].as_array().map(Vec::len), Some(4));
    let canary = &summary["variants"]["canary"];
    assert_eq!(canary["requests"], 900.0);
    assert!((canary["error_rate"].as_f64().unwrap_or(0.0) - 78.0 / 900.0).abs() < 1e-9);
    let text = report::summary_text(&written.summary);
    assert!(text.contains("rolled_back"), "{text}");
    assert!(text.contains("15.5 s"), "{text}");
    Ok(())
}
