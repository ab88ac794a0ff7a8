//! The Prometheus source: the filter's series as Prometheus scraped them from every Envoy,
//! read through the HTTP API (`/api/v1/query`).
//!
//! The raw per-instance series are fetched (not `sum(...)`), so that a restart of one Envoy is
//! seen as that instance's counters going down and handled like any other restart. Data older
//! than `max_age` (by the samples' own scrape timestamps) is stale: the rollout holds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::{OriginScrape, Sample, Source, SourceError};

/// A Prometheus server holding the filter's series.
#[derive(Debug, Clone)]
pub struct Prometheus {
    base: String,
    http: reqwest::Client,
    max_age: Duration,
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
        }
    }

    async fn query(&self, q: &str) -> Result<Vec<Series>, SourceError> {
        let url = format!("{}/api/v1/query", self.base);
        let fail = |reason: String| SourceError::Unreachable {
            origin: self.base.clone(),
            reason,
        };
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("query={}", crate::admin::encode(q)))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| fail(e.to_string()))?;
        let parsed: Response = serde_json::from_str(&body).map_err(|e| SourceError::Invalid {
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
        Ok(data.result)
    }
}

impl Source for Prometheus {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let selector = format!(
            "{{__name__=~\"sluice_.+\",experiment=\"{}\"}}",
            experiment.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let series = self.query(&selector).await?;
        if series.is_empty() {
            return Err(SourceError::Invalid {
                origin: self.base.clone(),
                reason: format!(
                    "no series for experiment {experiment:?} (is Prometheus scraping the Envoys?)"
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
        let mut by_origin: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
        for s in series {
            let Some(name) = s.metric.get("__name__").cloned() else {
                continue;
            };
            let value: f64 = match s.value.1.as_str() {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| SourceError::Invalid {
                    origin: self.base.clone(),
                    reason: format!("{name}: value {v:?} is not a number"),
                })?,
            };
            let origin = format!(
                "{}/{}",
                s.metric.get("job").map_or("", String::as_str),
                s.metric.get("instance").map_or("", String::as_str)
            );
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
        Ok(by_origin
            .into_iter()
            .map(|(origin, samples)| OriginScrape::from_samples(&origin, samples))
            .collect())
    }
}
