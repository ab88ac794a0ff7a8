//! The filter's metrics under an Istio sidecar's stats configuration, with a real Envoy.
//!
//! Istio's bootstrap sets `use_all_default_tags: false`, keeps only the stats its
//! `stats_matcher` includes, and extracts an extra tag only for each ProxyConfig
//! `extraStatTags` entry, always with the regex `(<tag>=\.=(.*?);\.;)`. The Envoy here gets
//! exactly the `stats_config` Istio renders for `extraStatTags` = the filter's labels (and the
//! `sidecar.istio.io/statsHistogramBuckets` annotation for the latency histogram), and a filter
//! configuration whose numbers are all floats, as a WasmPlugin's `pluginConfig` arrives after
//! its trip through `google.protobuf.Struct`. Every Sluice series must come out with a clean
//! Prometheus name and its labels, and the controller's sources must read them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use sluice_controller::source::envoy_admin::EnvoyAdmin;
use sluice_controller::source::prometheus::Prometheus as PromSource;
use sluice_controller::source::{Accumulator, Source};
use sluice_filter::metrics::{self, LABELS};
use sluice_tests::{EnvoyConfig, Load, Reply, Request, Upstream};

const LISTENER: u16 = 10000;
const STABLE: u16 = 10001;
const CANARY: u16 = 10002;
const SHADOW: u16 = 10003;
const ADMIN: u16 = 9901;
const FIXTURE: &str = "tests/envoy/upstreams.yaml";

/// Istio's sidecar `stats_config` (`tools/packaging/common/envoy_bootstrap.json` with the
/// defaults of `pkg/bootstrap/config.go`) for a ProxyConfig `extraStatTags` list and a
/// `statsHistogramBuckets` annotation, as the JSON Envoy reads.
fn istio_stats_config(extra_stat_tags: &[&str], histogram_buckets: &[(&str, &[f64])]) -> Value {
    let mut tags = vec![
        json!({"tag_name": "cluster_name",
               "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"}),
        json!({"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"}),
        json!({"regex": r"_rq(_(\d{3}))$", "tag_name": "response_code"}),
        json!({"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"}),
        json!({"tag_name": "http_conn_manager_listener_prefix",
               "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"}),
        json!({"tag_name": "http_conn_manager_prefix",
               "regex": r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"}),
        json!({"tag_name": "listener_address",
               "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"}),
        json!({"tag_name": "mongo_prefix",
               "regex": r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"}),
    ];
    for tag in extra_stat_tags {
        tags.push(json!({"regex": format!(r"({tag}=\.=(.*?);\.;)"), "tag_name": tag}));
    }
    tags.extend([
        json!({"regex": r"(cache\.(.+?)\.)", "tag_name": "cache"}),
        json!({"regex": r"(component\.(.+?)\.)", "tag_name": "component"}),
        json!({"regex": r"(tag\.(.+?);\.)", "tag_name": "tag"}),
        json!({"regex": r"(wasm_filter\.(.+?)\.)", "tag_name": "wasm_filter"}),
        json!({"tag_name": "authz_enforce_result", "regex": r"rbac(\.(allowed|denied))"}),
        json!({"tag_name": "authz_dry_run_action", "regex": r"(\.istio_dry_run_(allow|deny)_)"}),
        json!({"tag_name": "authz_dry_run_result", "regex": r"(\.shadow_(allowed|denied))"}),
    ]);
    // The inclusion list: "reporter=", the required prefixes, the rbac suffixes, the
    // per-route regex, then "component" and "istio".
    let mut patterns = vec![json!({"prefix": "reporter="})];
    for prefix in [
        "cluster_manager",
        "listener_manager",
        "server",
        "cluster.xds-grpc",
        "wasm",
    ] {
        patterns.push(json!({ "prefix": prefix }));
    }
    for suffix in [
        "rbac.allowed",
        "rbac.denied",
        "shadow_allowed",
        "shadow_denied",
    ] {
        patterns.push(json!({ "suffix": suffix }));
    }
    patterns.push(json!({"safe_regex": {"regex": r"vhost\..*\.route\..*"}}));
    patterns.push(json!({"prefix": "component"}));
    patterns.push(json!({"prefix": "istio"}));
    let mut buckets: Vec<Value> = histogram_buckets
        .iter()
        .map(|(prefix, b)| json!({"match": {"prefix": prefix}, "buckets": b}))
        .collect();
    // Istio sorts the annotation's entries by prefix.
    buckets.sort_by_key(|b| b["match"]["prefix"].to_string());
    json!({
        "use_all_default_tags": false,
        "stats_tags": tags,
        "histogram_bucket_settings": buckets,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    })
}

/// `value` with every number a float, as after `google.protobuf.Struct` (whose only number
/// is a double) rendered back to JSON.
fn through_struct(value: Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(a) => Value::Array(a.into_iter().map(through_struct).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k, through_struct(v))).collect())
        }
        other => other,
    }
}

/// The fixture with its `stats_config` replaced by `stats_config` (JSON is YAML).
fn with_stats_config(stats_config: &Value) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(sluice_tests::repo_root().join(FIXTURE))?;
    let start = text
        .find("stats_config:\n")
        .ok_or_else(|| anyhow::anyhow!("{FIXTURE} has no stats_config"))?;
    let end = text
        .find("static_resources:\n")
        .ok_or_else(|| anyhow::anyhow!("{FIXTURE} has no static_resources"))?;
    Ok((
        text[start..end].to_string(),
        format!("stats_config: {stats_config}\n"),
    ))
}

const LATENCY_BUCKETS: [f64; 4] = [0.25, 2.5, 25.0, 250.0];

/// A configuration that defines a metric with every label, with push version 5.
fn filter_config() -> Value {
    json!({
        "version": 1,
        "revision": "5@1795450000000",
        "secret": "0123456789abcdef-istio-stats",
        "experiments": [{
            "name": "ist",
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
            "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 30}],
            "outcomes": {"header": "x-sluice-outcome", "names": ["click", "buy"]},
            "beacon": {"path": "/sluice/event", "limit": {"events_per_user": 5, "users": 64}},
            "prediction": {"header": "x-model-score"},
            "shadow": {
                "cluster": "shadow", "sample_percent": 100, "timeout_ms": 2000,
                "max_in_flight": 256,
                "compare": {"fields": [{"name": "score", "pointer": "/score", "type": "number"}]}
            }
        }]
    })
}

/// One line of the text exposition: name, labels, value.
fn parse_line(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut out = BTreeMap::new();
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"")?;
        out.insert(k.to_string(), v.trim_end_matches('"').to_string());
    }
    Some((name.to_string(), out, value))
}

#[tokio::test(flavor = "multi_thread")]
async fn istio_sidecar_stats_config_yields_labelled_series_the_controller_reads(
) -> anyhow::Result<()> {
    let reply = |req: &Request| {
        let canary = req.variant() == Some("canary");
        let score = if canary { 0.7 } else { 0.4 };
        Reply::json(json!({ "score": score }))
            .score(score)
            .outcome(if canary { "buy" } else { "click" })
    };
    let upstream = Upstream::start("model", reply).await?;
    let shadow = Upstream::start("shadow", |_req: &Request| {
        Reply::json(json!({"score": 0.5}))
    })
    .await?;
    let stats_config = istio_stats_config(
        &LABELS,
        &[("wasmcustom.sluice_latency_ms", &LATENCY_BUCKETS)],
    );
    let (old_stats, new_stats) = with_stats_config(&stats_config)?;
    let config = through_struct(filter_config());
    assert!(config.to_string().contains(r#""weight":30.0"#), "{config}");
    let envoy = EnvoyConfig::new(FIXTURE)
        .port_to(STABLE, upstream.port())
        .port_to(CANARY, upstream.port())
        .port_to(SHADOW, shadow.port())
        .replace(&old_stats, &new_stats)
        .replace(
            &sluice_tests::inline_filter_config(FIXTURE)?,
            &config.to_string(),
        )
        .start()
        .await?;
    let n = 400;
    Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .run()
        .await?;
    // A beacon without an exposure token: refused, counted by reason.
    sluice_tests::HttpClient::new()
        .send(
            hyper::Method::POST,
            &envoy.url(LISTENER, "/sluice/event?name=click"),
            &[("x-user-id", "u1")],
            bytes::Bytes::new(),
        )
        .await?;
    let admin = envoy.admin();
    sluice_tests::wait_until(
        Duration::from_secs(30),
        "every shadow copy compared and the latency histogram flushed",
        || async {
            admin.prometheus().await.is_ok_and(|s| {
                s.sum(metrics::SHADOW_COMPARED, &[]) == n as f64
                    && s.histogram(metrics::LATENCY, &[])
                        .is_some_and(|h| h.count == n as f64)
            })
        },
    )
    .await?;

    // Every Sluice stat Envoy holds comes out as a clean name with its labels.
    let raw = admin.get("/stats?filter=sluice_").await?;
    let full_names: BTreeSet<&str> = raw
        .lines()
        .filter_map(|l| l.rsplit_once(": ").map(|(n, _)| n))
        .filter(|n| n.starts_with("wasmcustom."))
        .collect();
    assert!(full_names.len() > 50, "{raw}");
    let text = admin.get("/stats/prometheus").await?;
    let sluice: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("sluice_"))
        .map(|l| parse_line(l).ok_or_else(|| anyhow::anyhow!("unparsed line {l}")))
        .collect::<anyhow::Result<_>>()?;
    let mut labels_seen = BTreeSet::new();
    let mut names_seen = BTreeSet::new();
    for (name, labels, _) in &sluice {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| {
                [
                    metrics::LATENCY,
                    metrics::PREDICTION,
                    metrics::SHADOW_LATENCY,
                    metrics::SHADOW_DELTA,
                ]
                .contains(b)
            })
            .unwrap_or(name);
        assert!(
            base.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !base.ends_with('_'),
            "unclean name {name}"
        );
        names_seen.insert(base.to_string());
        for k in labels.keys() {
            assert!(
                LABELS.contains(&k.as_str()) || k == "le",
                "{name}: label {k}"
            );
            labels_seen.insert(k.clone());
        }
        if base != metrics::SHADOW_BYTES_IN_FLIGHT {
            assert_eq!(
                labels.get("experiment").map(String::as_str),
                Some("ist"),
                "{name}"
            );
        }
    }
    for label in LABELS {
        assert!(labels_seen.contains(label), "no series labelled {label}");
    }
    // One Prometheus series per counter and gauge stat: nothing merged, nothing lost.
    let histograms = [
        metrics::LATENCY,
        metrics::PREDICTION,
        metrics::SHADOW_LATENCY,
        metrics::SHADOW_DELTA,
    ];
    let series = sluice
        .iter()
        .filter(|(name, _, _)| {
            !histograms.iter().any(|h| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| *name == format!("{h}{s}"))
            })
        })
        .count();
    let stats = full_names
        .iter()
        .filter(|n| {
            !histograms
                .iter()
                .any(|h| n.starts_with(&format!("wasmcustom.{h}.")))
        })
        .count();
    assert_eq!(series, stats);
    for base in [
        metrics::REQUESTS,
        metrics::CONFIG_REVISION,
        metrics::OUTCOMES,
        metrics::EVENTS_REJECTED,
    ] {
        assert!(names_seen.contains(base), "no {base}");
    }

    // The gauge: the push version of the configuration the filter runs.
    let samples = admin.prometheus().await?;
    assert_eq!(
        samples.get(metrics::CONFIG_REVISION, &[("experiment", "ist")]),
        Some(5.0)
    );
    // `sidecar.istio.io/statsHistogramBuckets` matches the full name by prefix: the latency
    // histogram has the annotation's buckets, the others Envoy's defaults.
    let latency = samples
        .histogram(metrics::LATENCY, &[("variant", "stable")])
        .ok_or_else(|| anyhow::anyhow!("no latency histogram"))?;
    let bounds: Vec<f64> = latency
        .buckets
        .iter()
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
        .collect();
    assert_eq!(bounds, LATENCY_BUCKETS, "{latency:?}");
    let prediction = samples
        .histogram(metrics::PREDICTION, &[("variant", "stable")])
        .ok_or_else(|| anyhow::anyhow!("no prediction histogram"))?;
    assert_ne!(prediction.buckets.len(), LATENCY_BUCKETS.len());

    // The controller's admin source reads them.
    let source = EnvoyAdmin::new(
        &[format!("http://{}", envoy.addr(ADMIN))],
        Duration::from_secs(5),
        None,
    );
    let r = Accumulator::default().add(SystemTime::now(), &source.scrape("ist").await?)?;
    let stable = r.sum(metrics::REQUESTS, &[("variant", "stable")]);
    let canary = r.sum(metrics::REQUESTS, &[("variant", "canary")]);
    assert_eq!(stable + canary, n as f64);
    assert!(canary > 0.0 && stable > canary, "{stable} {canary}");
    assert_eq!(
        r.sum(
            metrics::OUTCOMES,
            &[("variant", "canary"), ("outcome", "buy")]
        ),
        canary
    );
    assert_eq!(
        r.sum(
            metrics::OUTCOMES,
            &[("variant", "stable"), ("outcome", "click")]
        ),
        stable
    );
    assert_eq!(r.sum(metrics::REPLICATE_REQUESTS, &[]), n as f64);
    assert_eq!(r.sum(metrics::RESPONSES, &[("class", "2xx")]), n as f64);
    assert_eq!(r.sum(metrics::EVENTS_REJECTED, &[]), 1.0);
    assert_eq!(
        r.sum(metrics::SHADOW_DISAGREE, &[("field", "score")]),
        n as f64
    );

    // And so does the Prometheus source, through a real Prometheus scraping this Envoy.
    let prom = sluice_tests::Prometheus::start(&[envoy.addr(ADMIN)]).await?;
    let prom_source = PromSource::new(&prom.url(), Duration::from_secs(5), Duration::from_secs(30));
    sluice_tests::wait_until(
        Duration::from_secs(60),
        "prometheus has scraped the requests",
        || async {
            match prom_source.scrape("ist").await {
                Ok(s) => Accumulator::default()
                    .add(SystemTime::now(), &s)
                    .is_ok_and(|r| r.sum(metrics::REQUESTS, &[]) == n as f64),
                Err(_) => false,
            }
        },
    )
    .await?;
    let r = Accumulator::default().add(SystemTime::now(), &prom_source.scrape("ist").await?)?;
    assert_eq!(r.sum(metrics::REQUESTS, &[("variant", "canary")]), canary);
    assert_eq!(
        r.sum(
            metrics::OUTCOMES,
            &[("variant", "stable"), ("outcome", "click")]
        ),
        stable
    );
    Ok(())
}

/// The ECDS example's file with `config` as the filter configuration.
fn ecds_with(config: &Value) -> anyhow::Result<String> {
    let original =
        std::fs::read_to_string(sluice_tests::repo_root().join("envoy/ecds/sluice.yaml"))?;
    let head = original
        .split_once("value: |\n")
        .map(|(h, _)| h)
        .ok_or_else(|| anyhow::anyhow!("envoy/ecds/sluice.yaml: no `value: |` block"))?;
    Ok(format!("{head}value: |\n            {config}\n"))
}

/// `sluice_config_revision` on an Envoy with four workers: 0 for the shipped configuration
/// (no revision), then each accepted push's version; a rejected push leaves the version the
/// filter still runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_revision_gauge_follows_accepted_pushes_only() -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("envoy/ecds.yaml")
        .ecds("envoy/ecds")
        .concurrency(4)
        .start()
        .await?;
    let admin = envoy.admin();
    let gauge = || async {
        admin
            .prometheus()
            .await
            .ok()
            .and_then(|s| s.get(metrics::CONFIG_REVISION, &[("experiment", "demo")]))
    };
    assert_eq!(gauge().await, Some(0.0));
    let counter = |name: &'static str| async move {
        admin
            .stat(&format!(
                "extension_config_discovery.http_filter.sluice.{name}"
            ))
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let push = |revision: &str, weight: f64| -> anyhow::Result<()> {
        let config = through_struct(json!({
            "version": 1,
            "revision": revision,
            "experiments": [{
                "name": "demo",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": weight}],
            }]
        }));
        envoy.write_ecds("sluice.yaml", &ecds_with(&config)?)?;
        Ok(())
    };
    for (i, version) in [7u64, 8, 12].into_iter().enumerate() {
        let ok = counter("update_success").await;
        push(&format!("{version}@179545000000{i}"), 10.0 * (i + 1) as f64)?;
        sluice_tests::wait_until(Duration::from_secs(10), "the push is taken", || async {
            counter("update_success").await > ok
        })
        .await?;
        // Configured on every worker: requests on all of them see the new weight, and the
        // gauge (one stat, set by each) shows the version.
        Load::new(envoy.url(LISTENER, "/"))
            .requests(50)
            .run()
            .await?;
        assert_eq!(gauge().await, Some(version as f64), "after push {version}");
    }
    // Refused (weights over 100): Envoy keeps the version-12 filter, and so does the gauge.
    let rejected = counter("update_rejected").await;
    push("13@1795450000009", 150.0)?;
    sluice_tests::wait_until(Duration::from_secs(10), "the push is refused", || async {
        counter("update_rejected").await > rejected
    })
    .await?;
    Load::new(envoy.url(LISTENER, "/"))
        .requests(50)
        .run()
        .await?;
    assert_eq!(gauge().await, Some(12.0));
    Ok(())
}
