//! The controller's side effects against a real Envoy: the admin source reads what the filter
//! counted (surviving an Envoy restart), and the ECDS file sink's pushes are confirmed — or
//! reported as rejected — by Envoy itself.

use std::time::{Duration, SystemTime};

use sluice_controller::admin::Admin;
use sluice_controller::sink::ecds_file::{EcdsFile, WasmCode};
use sluice_controller::sink::{Sink, SinkError};
use sluice_controller::source::envoy_admin::EnvoyAdmin;
use sluice_controller::source::exposition::{AnyReader, Format};
use sluice_controller::source::{series, Accumulator, Source};
use sluice_filter::config::FilterConfig;
use sluice_tests::{filter_wasm, EnvoyConfig, Load};

const LISTENER: u16 = 10000;
const ADMIN: u16 = 9901;

fn ecds_config() -> anyhow::Result<FilterConfig> {
    let text = std::fs::read_to_string(sluice_tests::repo_root().join("envoy/ecds/sluice.yaml"))?;
    let json = text
        .split("value: |")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no filter config in envoy/ecds/sluice.yaml"))?;
    Ok(serde_json::from_str(json)?)
}

/// Requests Envoy's ingress listener received (`http.ingress.downstream_rq_total`).
async fn envoy_requests(envoy: &sluice_tests::Envoy) -> anyhow::Result<u64> {
    envoy
        .admin()
        .stat("http.ingress.downstream_rq_total")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no http.ingress.downstream_rq_total"))
}

/// Envoy's answer to `/stats/prometheus` for experiment `demo` asked for in `format`: the
/// format it came in and its samples as (series, value), in order.
async fn exposition(admin: &Admin, format: Format) -> anyhow::Result<(Format, Vec<(String, f64)>)> {
    let resp = admin.sluice_exposition(&["demo"], format).await?;
    let answered = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map_or(Format::Text, Format::of_content_type);
    let body = resp.bytes().await?;
    let mut slots = series::Slots::default();
    let mut reader = AnyReader::new(answered, "sluice_", &mut slots);
    let mut samples = Vec::new();
    let mut each = |slot: &series::Slot, v: f64| {
        let key = series::key(slot.id).map(|k| format!("{k:?}"));
        samples.push((key.unwrap_or_default(), v));
    };
    reader.feed(&body, &mut each)?;
    reader.finish(&mut each)?;
    Ok((answered, samples))
}

#[tokio::test]
async fn admin_source_reads_the_counts_and_survives_a_restart() -> anyhow::Result<()> {
    let config = EnvoyConfig::new("envoy/demo.yaml");
    let envoy = config.clone().start().await?;
    let source = EnvoyAdmin::new(
        &[format!("http://{}", envoy.addr(ADMIN))],
        Duration::from_secs(2),
        None,
    );
    Load::new(envoy.url(LISTENER, "/"))
        .requests(500)
        .run()
        .await?;
    // What Envoy itself saw on the ingress listener is the reference: a client connection
    // race can, rarely, deliver a request twice.
    let seen = envoy_requests(&envoy).await?;
    assert!((500..=502).contains(&seen), "{seen}");
    let mut acc = Accumulator::default();
    let r = acc.add(SystemTime::now(), &source.scrape("demo").await?);
    assert_eq!(r.sum("sluice_requests_total", &[]), seen as f64);
    assert!(r.sum("sluice_requests_total", &[("variant", "canary")]) > 0.0);
    assert_eq!(
        r.sum("sluice_responses_total", &[("class", "2xx")]),
        seen as f64
    );
    assert!(source
        .scrape("other")
        .await?
        .iter()
        .all(|o| o.values.is_empty()));

    // The source asks for the protobuf format; Envoy's text format holds the same samples
    // (and the `+Inf` buckets, which repeat `_count`). Histograms change at the stats flush
    // (every second here), so the two are read after one with no traffic in between.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let admin = Admin::new(
        &format!("http://{}", envoy.addr(ADMIN)),
        Duration::from_secs(2),
    );
    let (pb_format, mut pb) = exposition(&admin, Format::Protobuf).await?;
    let (text_format, mut text) = exposition(&admin, Format::Text).await?;
    assert_eq!((pb_format, text_format), (Format::Protobuf, Format::Text));
    text.retain(|(k, _)| !k.contains(r#"("le", "+Inf")"#));
    pb.sort_by(|a, b| a.0.cmp(&b.0));
    text.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(pb.len() > 50 && pb.iter().any(|(k, _)| k.contains("_bucket")));
    assert_eq!(pb, text);

    // The same Envoy restarted (same ports): its counters start again, ours do not.
    let ports: Vec<(u16, u16)> = [LISTENER, ADMIN, 10001, 10002]
        .iter()
        .map(|&p| (p, envoy.port(p)))
        .collect();
    drop(envoy);
    let err = source.scrape("demo").await.err().map(|e| e.to_string());
    assert!(
        err.is_some_and(|e| e.contains("unreachable")),
        "a dead Envoy is an error, not zero traffic"
    );
    let mut again = config;
    for (from, to) in ports {
        again = again.port_to(from, to);
    }
    let envoy = again.start().await?;
    Load::new(envoy.url(LISTENER, "/"))
        .requests(100)
        .run()
        .await?;
    let seen_after = envoy_requests(&envoy).await?;
    let r = acc.add(SystemTime::now(), &source.scrape("demo").await?);
    assert_eq!(
        r.sum("sluice_requests_total", &[]),
        (seen + seen_after) as f64
    );
    assert_eq!(r.restarts, 1);
    Ok(())
}

#[tokio::test]
async fn ecds_sink_pushes_are_confirmed_or_reported_rejected() -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("envoy/ecds.yaml")
        .ecds("envoy/ecds")
        .start()
        .await?;
    let ecds = envoy.ecds_file("sluice.yaml")?;
    let sink = EcdsFile {
        path: ecds,
        resource: "sluice".into(),
        code: WasmCode {
            filename: filter_wasm()?.display().to_string(),
            vm_id: "sluice".into(),
            root_id: "sluice".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
        },
        proxies: vec![Admin::new(
            &format!("http://{}", envoy.addr(ADMIN)),
            Duration::from_secs(2),
        )],
        confirm_within: Duration::from_secs(5),
    };
    let base = ecds_config()?;
    let at_50 = base
        .with_weights("demo", &[("canary".into(), 50.0)])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let receipt = sink.push(&at_50, 2).await?;
    eprintln!("push confirmed after {:?}", receipt.confirmed_after);
    assert!(receipt.confirmed_after < Duration::from_secs(2));
    let responses = Load::new(envoy.url(LISTENER, "/"))
        .requests(1000)
        .run()
        .await?;
    let canary = responses
        .iter()
        .filter(|r| r.header("x-sluice-variant") == Some("canary"))
        .count();
    assert!((400..600).contains(&canary), "{canary} of 1000 at 50 %");

    // A config the filter refuses: the push is an error, and 50 % keeps serving.
    let mut bad = at_50.clone();
    bad.experiments[0].variants[1].weight = Some(150.0);
    match sink.push(&bad, 3).await {
        Err(SinkError::Rejected { version: 3, .. }) => {}
        other => anyhow::bail!("expected a rejection, got {other:?}"),
    }
    // Retrying the same push is judged afresh: Envoy takes a resource identical to the last
    // one it received as already applied, rejected or not, which each write's fresh revision
    // prevents.
    match sink.push(&bad, 3).await {
        Err(SinkError::Rejected { version: 3, .. }) => {}
        other => anyhow::bail!("expected the retry to be rejected too, got {other:?}"),
    }
    let again = Load::new(envoy.url(LISTENER, "/"))
        .requests(1000)
        .run()
        .await?;
    for (a, b) in responses.iter().zip(&again) {
        assert_eq!(a.header("x-sluice-variant"), b.header("x-sluice-variant"));
    }
    Ok(())
}

/// The Prometheus source reads the same counts through a real Prometheus scraping Envoy, and
/// reports stale data once Envoy is gone.
#[tokio::test]
async fn prometheus_source_reads_envoy_counts_and_detects_staleness() -> anyhow::Result<()> {
    use sluice_controller::source::prometheus::Prometheus as PromSource;
    let envoy = EnvoyConfig::new("envoy/demo.yaml").start().await?;
    let prom = sluice_tests::Prometheus::start(&[envoy.addr(ADMIN)]).await?;
    Load::new(envoy.url(LISTENER, "/"))
        .requests(300)
        .run()
        .await?;
    let source = PromSource::new(&prom.url(), Duration::from_secs(2), Duration::from_secs(5));
    let mut acc = Accumulator::default();
    sluice_tests::wait_until(
        Duration::from_secs(30),
        "prometheus has scraped the 300 requests",
        || async {
            match source.scrape("demo").await {
                Ok(s) => {
                    Accumulator::default()
                        .add(SystemTime::now(), &s)
                        .sum("sluice_requests_total", &[])
                        == 300.0
                }
                Err(_) => false,
            }
        },
    )
    .await?;
    let r = acc.add(SystemTime::now(), &source.scrape("demo").await?);
    assert_eq!(r.sum("sluice_responses_total", &[("class", "2xx")]), 300.0);
    // Envoy goes away: within a few seconds the data is stale, never "zero traffic".
    drop(envoy);
    sluice_tests::wait_until(Duration::from_secs(30), "stale data reported", || async {
        source.scrape("demo").await.is_err()
    })
    .await?;
    Ok(())
}
