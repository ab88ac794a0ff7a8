//! The controller's side effects against a real Envoy: the admin source reads what the filter
//! counted (surviving an Envoy restart, told by Envoy's uptime), refuses what is not data (an
//! answer that is no exposition, an Envoy without the filter's stats_tags, two Envoys taking
//! turns behind one address), and the ECDS file sink's pushes are confirmed — or reported as
//! rejected — by Envoy itself. The daemon stays small and responsive against hostile metrics
//! endpoints.

use sluice_filter::metrics;
use std::time::{Duration, SystemTime};

use sluice_controller::sink::ecds_file::{EcdsFile, WasmCode};
use sluice_controller::sink::{Sink, SinkError};
use sluice_controller::source::admin::Admin;
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
    let r = acc.add(SystemTime::now(), &source.scrape("demo").await?)?;
    assert_eq!(r.unidentified, 0, "Envoy tells its uptime");
    assert_eq!(r.sum(metrics::REQUESTS, &[]), seen as f64);
    assert!(r.sum(metrics::REQUESTS, &[("variant", "canary")]) > 0.0);
    assert_eq!(r.sum(metrics::RESPONSES, &[("class", "2xx")]), seen as f64);
    assert!(source
        .scrape("other")
        .await?
        .iter()
        .all(|o| o.values.is_empty() && o.identity.is_some()));

    // The source asks for the protobuf format; Envoy's text format holds the same samples
    // (and the `+Inf` buckets, which repeat `_count`). Histograms change at the stats flush
    // (every second here), so the two are read once a flush has taken in every request (the
    // latency histogram counts them all), with no traffic in between.
    sluice_tests::wait_for(
        Duration::from_secs(30),
        "a stats flush holding every request's latency",
        || async {
            let latency = envoy
                .admin()
                .prometheus()
                .await?
                .histogram(metrics::LATENCY, &[("experiment", "demo")])
                .map_or(0.0, |h| h.count);
            Ok::<_, sluice_tests::Error>((latency == seen as f64).then_some(()))
        },
    )
    .await?;
    let admin = Admin::new(
        &format!("http://{}", envoy.addr(ADMIN)),
        Duration::from_secs(2),
    );
    // A counter never incremented is listed too: Envoy reads any `usedonly` parameter, even
    // `usedonly=false`, as "only the used ones", and a missing stat is not a zero.
    let unused = admin.stats("^server\\.envoy_bug_failures$").await?;
    assert_eq!(
        unused.get("server.envoy_bug_failures"),
        Some(&0),
        "{unused:?}"
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
    let r = acc.add(SystemTime::now(), &source.scrape("demo").await?)?;
    assert_eq!(r.sum(metrics::REQUESTS, &[]), (seen + seen_after) as f64);
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
            remote: None,
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
                Ok(s) => Accumulator::default()
                    .add(SystemTime::now(), &s)
                    .is_ok_and(|r| r.sum(metrics::REQUESTS, &[]) == 300.0),
                Err(_) => false,
            }
        },
    )
    .await?;
    let s = source.scrape("demo").await?;
    assert!(s.iter().all(|o| o.identity.is_some()), "{s:?}");
    let r = acc.add(SystemTime::now(), &s)?;
    assert_eq!(r.sum(metrics::RESPONSES, &[("class", "2xx")]), 300.0);
    // Envoy goes away: within a few seconds the data is stale, never "zero traffic".
    drop(envoy);
    sluice_tests::wait_until(Duration::from_secs(30), "stale data reported", || async {
        source.scrape("demo").await.is_err()
    })
    .await?;
    Ok(())
}

/// A 200 answer that is not an exposition (here: the model's JSON, from the listener port
/// given by mistake), and an Envoy without the filter's stats_tags, are errors that say what
/// is wrong, never "no traffic".
#[tokio::test]
async fn answers_that_are_not_data_are_errors_with_a_hint() -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("envoy/demo.yaml").start().await?;
    let listener = EnvoyAdmin::new(
        &[format!("http://{}", envoy.addr(LISTENER))],
        Duration::from_secs(2),
        None,
    );
    let err = listener.scrape("demo").await.err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("not a Prometheus exposition")),
        "{err:?}"
    );

    let untagged = EnvoyConfig::new("envoy/demo.yaml")
        .replace(
            r"(experiment=\.=(.*?);\.;)",
            r"(no_experiment=\.=(.*?);\.;)",
        )
        .replace(r"(variant=\.=(.*?);\.;)", r"(no_variant=\.=(.*?);\.;)")
        .start()
        .await?;
    Load::new(untagged.url(LISTENER, "/"))
        .requests(20)
        .run()
        .await?;
    let source = EnvoyAdmin::new(
        &[format!("http://{}", untagged.addr(ADMIN))],
        Duration::from_secs(2),
        None,
    );
    let err = source.scrape("demo").await.err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e
            .contains("sluice series found without experiment/variant labels: add the stats_tags")),
        "{err:?}"
    );
    drop(envoy);
    Ok(())
}

/// A loopback TCP proxy that sends each connection to the next of `upstreams` in turn, with
/// `Connection: close` added to the request so that every scrape is a new connection (as a
/// load balancer in front of several Envoys' admin ports would do).
async fn alternating_proxy(upstreams: Vec<std::net::SocketAddr>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstreams[next % upstreams.len()];
            next += 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                let mut request = head[..end + 2].to_vec();
                request.extend_from_slice(b"Connection: close\r\n\r\n");
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if server.write_all(&request).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut server, &mut client).await;
            });
        }
    });
    Ok(url)
}

/// Two real Envoys answering in turn behind one admin address: the source holds with
/// "endpoint alternates between proxies" and never reads more requests than one of them
/// counted (read as restarts, every switch would add the other Envoy's counts again).
#[tokio::test]
async fn two_envoys_alternating_behind_one_address_hold_and_inflate_nothing() -> anyhow::Result<()>
{
    let a = EnvoyConfig::new("envoy/demo.yaml").start().await?;
    Load::new(a.url(LISTENER, "/")).requests(300).run().await?;
    // The second Envoy starts well after the first, so that its uptime tells it apart.
    sluice_tests::wait_until(
        Duration::from_secs(30),
        "the first Envoy is up 4 s",
        || async {
            a.admin()
                .stat("server.uptime")
                .await
                .ok()
                .flatten()
                .unwrap_or(0)
                >= 4
        },
    )
    .await?;
    let b = EnvoyConfig::new("envoy/demo.yaml").start().await?;
    Load::new(b.url(LISTENER, "/")).requests(100).run().await?;
    sluice_tests::wait_until(
        Duration::from_secs(30),
        "the second Envoy is up 4 s",
        || async {
            b.admin()
                .stat("server.uptime")
                .await
                .ok()
                .flatten()
                .unwrap_or(0)
                >= 4
        },
    )
    .await?;
    let most = envoy_requests(&a).await?.max(envoy_requests(&b).await?) as f64;
    let url = alternating_proxy(vec![a.addr(ADMIN), b.addr(ADMIN)]).await?;
    let source = EnvoyAdmin::new(&[url], Duration::from_secs(2), None);
    let mut acc = Accumulator::default();
    let mut errors = Vec::new();
    for _ in 0..8 {
        match acc.add(SystemTime::now(), &source.scrape("demo").await?) {
            Ok(r) => {
                assert!(
                    errors.is_empty(),
                    "an answer was counted after the alternation was seen"
                );
                let total = r.sum(metrics::REQUESTS, &[]);
                assert!(
                    total <= most,
                    "{total} requests read, {most} counted by either Envoy"
                );
                assert_eq!(r.restarts, 0);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.len() >= 6, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("endpoint alternates between proxies")),
        "{errors:?}"
    );
    Ok(())
}

/// A hostile metrics endpoint: what it writes to each request.
#[derive(Clone, Copy)]
enum Hostile {
    /// One line that never ends.
    EndlessLine,
    /// 10^6 series of the experiment's variants.
    MillionSeries,
    /// 5000 series of variants never seen before, new ones at each request.
    NewSeriesEachScrape,
    /// A canary 5xx counter that is NaN.
    NotANumber,
}

async fn hostile_endpoint(kind: Hostile) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let n = scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\nconnection: close\r\n\r\n";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
                let line = |variant: &str, extra: &str| {
                    format!("sluice_requests_total{{experiment=\"hostile\",variant=\"{variant}\"{extra}}} 1\n")
                };
                match kind {
                    Hostile::EndlessLine => {
                        let chunk = vec![b'x'; 64 << 10];
                        let _ = stream
                            .write_all(b"sluice_requests_total{experiment=\"")
                            .await;
                        while stream.write_all(&chunk).await.is_ok() {}
                    }
                    Hostile::MillionSeries => {
                        let mut text = String::new();
                        for i in 0..1_000_000u64 {
                            text.push_str(&line("canary", &format!(",user=\"{n}-{i}\"")));
                            if text.len() > 64 << 10 {
                                if stream.write_all(text.as_bytes()).await.is_err() {
                                    return;
                                }
                                text.clear();
                            }
                        }
                        let _ = stream.write_all(text.as_bytes()).await;
                    }
                    Hostile::NewSeriesEachScrape => {
                        let text: String = (0..5000)
                            .map(|i| line(&format!("v{n}-{i}"), ""))
                            .chain([line("stable", ""), line("canary", "")])
                            .collect();
                        let _ = stream.write_all(text.as_bytes()).await;
                    }
                    Hostile::NotANumber => {
                        let text = format!(
                            "{}{}sluice_responses_total{{experiment=\"hostile\",variant=\"canary\",class=\"5xx\"}} NaN\n",
                            line("stable", ""),
                            line("canary", "")
                        );
                        let _ = stream.write_all(text.as_bytes()).await;
                    }
                }
            });
        }
    });
    Ok(url)
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `sluice run` against each kind of hostile metrics endpoint: every scrape fails naming the
/// cap, the rollout holds with that reason, resident memory stays under 200 MiB, `/status`
/// answers promptly, and SIGTERM ends the process within 2 s.
#[tokio::test]
async fn the_daemon_stays_small_and_responsive_against_hostile_metrics_endpoints(
) -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("tests/envoy/rollout.yaml")
        .ecds("tests/envoy/rollout")
        .start()
        .await?;
    let admin = format!("http://{}", envoy.addr(ADMIN));
    let wasm = filter_wasm()?.display().to_string();
    for (kind, reason) in [
        (Hostile::EndlessLine, "maxLineBytes"),
        (Hostile::MillionSeries, "maxSeries"),
        (Hostile::NewSeriesEachScrape, ""),
        (Hostile::NotANumber, "not a count"),
    ] {
        let endpoint = hostile_endpoint(kind).await?;
        let dir = tempfile::tempdir()?;
        let spec = serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "hostile"},
            "spec": {
                "experiment": {
                    "name": "hostile",
                    "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                    "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                },
                "schedule": {"stages": [10, 100], "bake": "60s", "warmup": "1s", "interval": "200ms"},
                "sources": [{"envoyAdmin": {"endpoints": [endpoint]}}],
                "sinks": [{"ecdsFile": {
                    "path": envoy.ecds_file("sluice.yaml")?.display().to_string(),
                    "wasm": {"filename": wasm},
                    "proxies": [admin],
                    "confirmWithin": "5s",
                }}],
            }
        });
        let path = dir.path().join("rollout.yaml");
        std::fs::write(&path, serde_json::to_string_pretty(&spec)?)?;
        let listen = sluice_tests::free_port()?;
        let log = dir.path().join("sluice.log");
        let mut child = std::process::Command::new(sluice_tests::sluice_bin()?)
            .args(["run", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{listen}"))
            .arg("-f")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("sluice.err"))?)
            .spawn()?;
        let pid = child.id();
        let status_url = format!("http://127.0.0.1:{listen}/status");
        let client = sluice_tests::HttpClient::new().with_timeout(Duration::from_secs(5));
        // Run for 15 s of scrapes every 200 ms, watching memory and /status.
        let started = std::time::Instant::now();
        let (mut peak, mut slowest, mut statuses) = (0u64, Duration::ZERO, 0);
        let mut last = serde_json::Value::Null;
        while started.elapsed() < Duration::from_secs(15) {
            peak = peak.max(rss(pid));
            let asked = std::time::Instant::now();
            if let Ok(r) = client.get(&status_url).await {
                slowest = slowest.max(asked.elapsed());
                statuses += 1;
                if let Ok(v) = r.json() {
                    last = v;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak = peak.max(rss(pid));
        let judgement = last[0]["last_judgement"].to_string();
        let scrape_errors = last[0]["scrape_errors"].as_u64().unwrap_or(0);
        // SIGTERM: the process exits promptly.
        let term = std::time::Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        let mut exited = None;
        while term.elapsed() < Duration::from_secs(10) {
            if let Some(status) = child.try_wait()? {
                exited = Some((status, term.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if exited.is_none() {
            let _ = child.kill();
        }
        eprintln!(
            "{reason:?}: peak RSS {} MiB, slowest /status {slowest:?} of {statuses}, {scrape_errors} scrape errors, exit {exited:?}, judgement {judgement}",
            peak >> 20
        );
        assert!(peak < 200 << 20, "{reason:?}: peak RSS {} MiB", peak >> 20);
        assert!(
            statuses > 50,
            "{reason:?}: /status answered {statuses} times"
        );
        assert!(
            slowest < Duration::from_secs(1),
            "{reason:?}: /status took {slowest:?}"
        );
        let (status, took) =
            exited.ok_or_else(|| anyhow::anyhow!("{reason:?}: SIGTERM ignored for 10 s"))?;
        assert!(
            took < Duration::from_secs(2),
            "{reason:?}: SIGTERM took {took:?}"
        );
        assert!(status.success(), "{reason:?}: exit {status}");
        if reason.is_empty() {
            // New variants each scrape are counted, not kept: nothing to hold on.
            assert!(!judgement.contains("no data"), "{judgement}");
        } else {
            assert!(
                scrape_errors > 10,
                "{reason:?}: {scrape_errors} scrape errors"
            );
            assert!(
                judgement.contains("hold") && judgement.contains(reason),
                "{reason:?}: {judgement}"
            );
        }
    }
    Ok(())
}
