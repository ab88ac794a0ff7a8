//! The Prometheus source: the filter's series as Prometheus scraped them from every Envoy,
//! read through the HTTP API (`/api/v1/query`).
//!
//! The raw per-instance series are fetched (not `sum(...)`), with each instance's
//! `envoy_server_uptime` and `envoy_server_hot_restart_epoch` (see [`super::Identity`]), so
//! that a restart of one Envoy is told as such and handled like any other restart. Data older
//! than `max_age` (by the samples' own scrape timestamps) is stale: the rollout holds. An
//! answer over the `limits`, a value that is not a finite number, and a variant the
//! experiment does not have are handled as for the Envoy admin source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sluice_filter::metrics;

use super::{series, Identity, Limits, OriginScrape, Sample, Source, SourceError};

/// What Prometheus holds of one instance's identity: uptime, hot-restart epoch, and the
/// uptime sample's own time (Unix seconds).
type Told = (Option<f64>, Option<f64>, Option<f64>);

/// A Prometheus server holding the filter's series.
#[derive(Debug, Clone)]
pub struct Prometheus {
    base: String,
    http: reqwest::Client,
    max_age: Duration,
    limits: Limits,
    variants: Option<Arc<[String]>>,
}

#[derive(Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    /// `[unix seconds, "value"]`.
    value: (f64, String),
}

impl Prometheus {
    pub fn new(base: &str, timeout: Duration, max_age: Duration) -> Prometheus {
        Prometheus {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
            max_age,
            limits: Limits::default(),
            variants: None,
        }
    }

    /// This source within `limits`.
    pub fn limits(mut self, limits: Limits) -> Prometheus {
        self.limits = limits;
        self
    }

    /// This source keeping only the series of `variants`.
    pub fn variants(mut self, variants: &[String]) -> Prometheus {
        self.variants = Some(variants.into());
        self
    }

    async fn query(&self, q: &str) -> Result<Vec<Series>, SourceError> {
        let url = format!("{}/api/v1/query", self.base);
        let fail = |reason: String| SourceError::Unreachable {
            origin: self.base.clone(),
            reason,
        };
        let mut resp = self
            .http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("query={}", crate::source::admin::encode(q)))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let cap = self.limits.max_body_bytes;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if (body.len() + chunk.len()) as u64 > cap {
                return Err(SourceError::Invalid {
                    origin: self.base.clone(),
                    reason: format!(
                        "query {q:?}: the answer is over {cap} bytes (limit `maxBodyBytes`)"
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let parsed: Response = serde_json::from_slice(&body).map_err(|e| SourceError::Invalid {
            origin: self.base.clone(),
            reason: format!("HTTP {status}: not a Prometheus API answer: {e}"),
        })?;
        if parsed.status != "success" {
            return Err(SourceError::Invalid {
                origin: self.base.clone(),
                reason: format!(
                    "query {q:?} failed: {}",
                    parsed.error.unwrap_or_else(|| "no reason given".into())
                ),
            });
        }
        let data = parsed.data.ok_or_else(|| SourceError::Invalid {
            origin: self.base.clone(),
            reason: "answer without data".into(),
        })?;
        if data.result_type != "vector" {
            return Err(SourceError::Invalid {
                origin: self.base.clone(),
                reason: format!("expected a vector, got {}", data.result_type),
            });
        }
        if data.result.len() > self.limits.max_series {
            return Err(SourceError::Invalid {
                origin: self.base.clone(),
                reason: format!(
                    "query {q:?}: over {} series (limit `maxSeries`)",
                    self.limits.max_series
                ),
            });
        }
        Ok(data.result)
    }
}

impl Source for Prometheus {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let selector = format!(
            "{{__name__=~\"{}.+\",experiment=\"{}\"}}",
            metrics::PREFIX,
            experiment.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let series = self.query(&selector).await?;
        if series.is_empty() {
            return Err(SourceError::Invalid {
                origin: self.base.clone(),
                reason: format!(
                    "no series for experiment {experiment:?} (is Prometheus scraping the Envoys, and do they have the stats_tags from envoy/ecds.yaml?)"
                ),
            });
        }
        // When was each instance last scraped? `timestamp()` gives the sample's own time.
        let stamps = self
            .query(&format!(
                "timestamp(sluice_requests_total{{experiment=\"{experiment}\"}})"
            ))
            .await?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        for s in &stamps {
            let scraped: f64 = s.value.1.parse().unwrap_or(0.0);
            // A timestamp far in the past (or -Inf) would not fit a Duration: as good as never.
            let age =
                Duration::try_from_secs_f64((now - scraped).max(0.0)).unwrap_or(Duration::MAX);
            if age > self.max_age {
                return Err(SourceError::Stale {
                    origin: s
                        .metric
                        .get("instance")
                        .cloned()
                        .unwrap_or_else(|| self.base.clone()),
                    age,
                    allowed: self.max_age,
                });
            }
        }
        // Which process each instance is: its uptime, epoch, and when it was scraped.
        let mut identities: BTreeMap<String, Told> = BTreeMap::new();
        let origin_of = |metric: &BTreeMap<String, String>| {
            format!(
                "{}/{}",
                metric.get("job").map_or("", String::as_str),
                metric.get("instance").map_or("", String::as_str)
            )
        };
        for s in self
            .query(&format!(
                "{{__name__=~\"{}|{}\"}}",
                super::exposition::UPTIME,
                super::exposition::HOT_RESTART_EPOCH
            ))
            .await?
        {
            let value: f64 = s.value.1.parse().unwrap_or(f64::NAN);
            let entry = identities.entry(origin_of(&s.metric)).or_default();
            match s.metric.get("__name__").map(String::as_str) {
                Some(super::exposition::UPTIME) => entry.0 = Some(value),
                _ => entry.1 = Some(value),
            }
        }
        for s in self
            .query(&format!("timestamp({})", super::exposition::UPTIME))
            .await?
        {
            identities.entry(origin_of(&s.metric)).or_default().2 = s.value.1.parse().ok();
        }
        let mut by_origin: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
        let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
        for s in series {
            let Some(name) = s.metric.get("__name__").cloned() else {
                continue;
            };
            let origin = origin_of(&s.metric);
            let value: f64 = match s.value.1.parse::<f64>() {
                Ok(v) if v.is_finite() => v,
                _ => {
                    return Err(SourceError::Invalid {
                        origin: self.base.clone(),
                        reason: format!("{name} of {origin}: value {:?} is not a count", s.value.1),
                    })
                }
            };
            let keeps = match (s.metric.get("variant"), &self.variants) {
                (Some(v), Some(vs)) => vs.iter().any(|w| w == v),
                _ => true,
            };
            if !keeps {
                *unknown.entry(origin).or_default() += 1;
                continue;
            }
            let labels = s
                .metric
                .into_iter()
                .filter(|(k, _)| k != "__name__")
                .collect();
            by_origin.entry(origin).or_default().push(Sample {
                name,
                labels,
                value,
            });
        }
        let mut out = Vec::with_capacity(by_origin.len());
        for (origin, samples) in by_origin {
            let ids = samples
                .iter()
                .map(|s| series::try_intern(s.key()))
                .collect::<Result<Arc<[_]>, _>>()
                .map_err(|e| SourceError::Invalid {
                    origin: self.base.clone(),
                    reason: e.to_string(),
                })?;
            let identity = match identities.get(&origin) {
                Some((Some(uptime), epoch, Some(at)))
                    if uptime.is_finite() && (0.0..1e11).contains(at) =>
                {
                    Some(Identity {
                        uptime: *uptime,
                        hot_restart_epoch: epoch.filter(|e| e.is_finite()).unwrap_or(0.0),
                        at: UNIX_EPOCH + Duration::from_secs_f64(*at),
                    })
                }
                _ => None,
            };
            out.push(OriginScrape {
                unknown: unknown.get(&origin).copied().unwrap_or(0),
                origin: Arc::from(origin.as_str()),
                ids,
                values: Arc::new(samples.iter().map(|s| s.value).collect()),
                identity,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// A stand-in Prometheus API answering the source's queries: the experiment's series
    /// (with `value` as the canary's requests), the identity gauges and their times.
    async fn prometheus(value: &'static str) -> String {
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("no loopback listener");
        };
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let query = String::from_utf8_lossy(&body).replace("%5F", "_");
                            let now = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .unwrap_or_default()
                                .as_secs_f64();
                            let instance = r#""job":"envoy","instance":"e1:9901""#;
                            let result = if query.contains("timestamp") {
                                format!(
                                    r#"[{{"metric":{{{instance}}},"value":[{now},"{now}"]}},{{"metric":{{"job":"envoy","instance":"e1:9901","experiment":"p","variant":"canary"}},"value":[{now},"{now}"]}}]"#
                                )
                            } else if query.contains("envoy_server") {
                                format!(
                                    r#"[{{"metric":{{"__name__":"envoy_server_uptime",{instance}}},"value":[{now},"120"]}},{{"metric":{{"__name__":"envoy_server_hot_restart_epoch",{instance}}},"value":[{now},"0"]}}]"#
                                )
                            } else {
                                format!(
                                    r#"[{{"metric":{{"__name__":"sluice_requests_total","experiment":"p","variant":"canary",{instance}}},"value":[{now},"{value}"]}},{{"metric":{{"__name__":"sluice_requests_total","experiment":"p","variant":"other",{instance}}},"value":[{now},"3"]}},{{"metric":{{"__name__":"sluice_missing_key_total","experiment":"p",{instance}}},"value":[{now},"1"]}}]"#
                                )
                            };
                            let text = format!(
                                r#"{{"status":"success","data":{{"resultType":"vector","result":{result}}}}}"#
                            );
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn instances_tell_their_identity_and_unknown_variants_are_counted() {
        let url = prometheus("40").await;
        let source = Prometheus::new(&url, Duration::from_secs(2), Duration::from_secs(30))
            .variants(&["stable".into(), "canary".into()]);
        let scrape = source.scrape("p").await.unwrap_or_default();
        let [origin] = scrape.as_slice() else {
            panic!("one instance expected: {scrape:?}");
        };
        assert_eq!(&*origin.origin, "envoy/e1:9901");
        assert_eq!(
            origin.values.len(),
            2,
            "the canary and the experiment-wide series"
        );
        assert_eq!(origin.unknown, 1, "variant `other` is counted, not kept");
        assert_eq!(origin.identity.map(|i| i.uptime), Some(120.0));
    }

    #[tokio::test]
    async fn values_that_are_not_counts_are_errors() {
        for bad in ["NaN", "+Inf", "-Inf"] {
            let url = prometheus(bad).await;
            let source = Prometheus::new(&url, Duration::from_secs(2), Duration::from_secs(30));
            let err = source.scrape("p").await.err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("is not a count")),
                "{bad}: {err:?}"
            );
        }
        let url = prometheus("5").await;
        let small = Limits {
            max_series: 100,
            max_body_bytes: 64 << 10,
            ..Limits::default()
        };
        let source =
            Prometheus::new(&url, Duration::from_secs(2), Duration::from_secs(30)).limits(small);
        assert!(source.scrape("p").await.is_ok());
    }
}
