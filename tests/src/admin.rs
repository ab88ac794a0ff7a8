//! Envoy's admin endpoints: `/ready`, `/stats` and `/stats/prometheus`, fetched and parsed.
//!
//! Counters are live in both formats; histograms only change at Envoy's stats flush
//! (`stats_flush_interval`), so poll them with [`crate::wait_for`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hyper::Method;

use crate::client::HttpClient;
use crate::error::{Error, Result};

/// Client for one Envoy's admin listener.
#[derive(Clone)]
pub struct Admin {
    base: String,
    client: HttpClient,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            client: HttpClient::new(),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET <path>` and the body, failing on a non-2xx status.
    pub async fn get(&self, path: &str) -> Result<String> {
        self.call(Method::GET, path).await
    }

    /// `POST <path>` (admin mutations such as `/reset_counters`).
    pub async fn post(&self, path: &str) -> Result<String> {
        self.call(Method::POST, path).await
    }

    async fn call(&self, method: Method, path: &str) -> Result<String> {
        let url = format!("{}{}", self.base, path);
        let response = self.client.send(method.clone(), &url, &[], "").await?;
        if !(200..300).contains(&response.status) {
            return Err(Error::Http {
                method: method.to_string(),
                url,
                reason: format!("status {}: {}", response.status, response.text().trim()),
            });
        }
        Ok(response.text())
    }

    /// True once `/ready` answers `LIVE` (all listeners and initial config in place).
    pub async fn ready(&self) -> bool {
        matches!(self.get("/ready").await, Ok(body) if body.trim() == "LIVE")
    }

    /// `/stats/prometheus`, parsed.
    pub async fn prometheus(&self) -> Result<Samples> {
        Samples::parse(&self.get("/stats/prometheus").await?)
    }

    /// Plain `/stats`: counters and gauges by their Envoy names (tags not extracted, e.g.
    /// `wasmcustom.sluice_requests_total.experiment=.=demo;.;variant=.=canary;.;`).
    pub async fn stats(&self) -> Result<Stats> {
        Ok(Stats::parse(&self.get("/stats").await?))
    }

    /// One counter or gauge from plain `/stats`, `None` if Envoy has no such stat (yet).
    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.stats().await?.get(name))
    }
}

/// One line of Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// True if every `(label, value)` pair in `filter` is present on this sample.
    pub fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter
            .iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// All samples of one `/stats/prometheus` scrape.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses the text format (comments skipped, label values unescaped, timestamps ignored)
    /// with the controller's reader, so the tests read Envoy's answers as the controller does.
    pub fn parse(text: &str) -> Result<Samples> {
        let samples =
            sluice_controller::source::exposition::parse(text, "").map_err(|e| Error::Parse {
                what: format!("prometheus exposition, {}", e.at),
                reason: e.reason.to_string(),
            })?;
        Ok(Samples(
            samples
                .into_iter()
                .map(|s| Sample {
                    name: s.name,
                    labels: s.labels,
                    value: s.value,
                })
                .collect(),
        ))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.0.iter()
    }

    /// Samples named `name` carrying all labels in `filter`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0
            .iter()
            .filter(move |s| s.name == name && s.matches(filter))
    }

    /// Sum over [`Samples::find`]; 0 when nothing matches (an unset counter is zero).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.find(name, filter).map(|s| s.value).sum()
    }

    /// The value of the single sample matching, `None` if there is none or more than one.
    pub fn get(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, filter);
        match (it.next(), it.next()) {
            (Some(s), None) => Some(s.value),
            _ => None,
        }
    }

    /// Values of `label` across samples of `name` matching `filter`, summed per label value
    /// (e.g. requests per variant).
    pub fn by_label(
        &self,
        name: &str,
        label: &str,
        filter: &[(&str, &str)],
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.find(name, filter) {
            if let Some(v) = s.labels.get(label) {
                *out.entry(v.clone()).or_insert(0.0) += s.value;
            }
        }
        out
    }

    /// The histogram `base` (from `base_bucket`, `base_count`, `base_sum`), summed over the
    /// label sets matching `filter`. `None` if no bucket matches.
    pub fn histogram(&self, base: &str, filter: &[(&str, &str)]) -> Option<Histogram> {
        let bucket_name = format!("{base}_bucket");
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.find(&bucket_name, filter) {
            let le = match s.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().ok()?,
                None => continue,
            };
            // Keyed by the bits of a non-negative float, which sort like the floats themselves.
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
        }
        if buckets.is_empty() {
            return None;
        }
        Some(Histogram {
            buckets: buckets.into_values().collect(),
            count: self.sum(&format!("{base}_count"), filter),
            sum: self.sum(&format!("{base}_sum"), filter),
        })
    }
}

/// A Prometheus histogram: cumulative counts per upper bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le`, ending with `+Inf`.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

impl Histogram {
    /// Cumulative count of observations `<= le` for the smallest bucket bound `>= le`.
    pub fn count_le(&self, le: f64) -> f64 {
        self.buckets
            .iter()
            .find(|(b, _)| *b >= le)
            .map(|(_, c)| *c)
            .unwrap_or(self.count)
    }

    /// Quantile `q` in `[0, 1]`, interpolated linearly inside the bucket as Prometheus's
    /// `histogram_quantile` does. `None` for an empty histogram.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        use sluice_controller::judge::guardrail::{histogram_quantile, BucketQuantile};
        let total = self.buckets.last().map(|(_, c)| *c)?;
        match histogram_quantile(self.buckets.iter().copied(), total, q)? {
            BucketQuantile::Within(x) | BucketQuantile::Beyond(x) => Some(x),
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// Counters and gauges of plain `/stats` by name. Histogram summaries (`P0(...) P25(...)`) are
/// left out: use [`Samples::histogram`] for those.
#[derive(Debug, Clone, Default)]
pub struct Stats(pub BTreeMap<String, u64>);

impl Stats {
    pub fn parse(text: &str) -> Stats {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            // Names may contain ':'-free tag separators like `=.=` and `;.;`, never ": ".
            if let Some((name, value)) = line.rsplit_once(": ") {
                if let Ok(v) = value.trim().parse::<u64>() {
                    map.insert(name.to_string(), v);
                }
            }
        }
        Stats(map)
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// Sum of all stats whose name starts with `prefix`.
    pub fn sum_prefix(&self, prefix: &str) -> u64 {
        self.0
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_filter::metrics;

    const TEXT: &str = r#"# TYPE envoy_cluster_upstream_rq counter
envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="stable"} 7
envoy_cluster_upstream_rq{envoy_response_code="503",envoy_cluster_name="stable"} 1
sluice_requests_total{experiment="demo",variant="canary"} 3
weird{a="x\"y\\z",b="n\nl"} 1.5 1700000000
lat_bucket{variant="a",le="1"} 2
lat_bucket{variant="a",le="5"} 6
lat_bucket{variant="a",le="+Inf"} 8
lat_bucket{variant="b",le="1"} 0
lat_bucket{variant="b",le="5"} 2
lat_bucket{variant="b",le="+Inf"} 2
lat_sum{variant="a"} 30
lat_count{variant="a"} 8
lat_sum{variant="b"} 6
lat_count{variant="b"} 2
server_live 1
"#;

    #[test]
    fn parses_labels_values_and_escapes() {
        let s = Samples::parse(TEXT).unwrap();
        assert_eq!(
            s.sum(
                "envoy_cluster_upstream_rq",
                &[("envoy_cluster_name", "stable")]
            ),
            8.0
        );
        assert_eq!(
            s.get(
                "envoy_cluster_upstream_rq",
                &[("envoy_response_code", "503")]
            ),
            Some(1.0)
        );
        assert_eq!(
            s.get(metrics::REQUESTS, &[("variant", "canary")]),
            Some(3.0)
        );
        assert_eq!(s.get("server_live", &[]), Some(1.0));
        let w = s.find("weird", &[]).next().unwrap();
        assert_eq!(w.labels["a"], "x\"y\\z");
        assert_eq!(w.labels["b"], "n\nl");
        assert_eq!(w.value, 1.5);
        assert_eq!(s.sum("absent", &[]), 0.0);
    }

    #[test]
    fn histograms_sum_across_label_sets() {
        let s = Samples::parse(TEXT).unwrap();
        let a = s.histogram("lat", &[("variant", "a")]).unwrap();
        assert_eq!(
            a.buckets,
            vec![(1.0, 2.0), (5.0, 6.0), (f64::INFINITY, 8.0)]
        );
        assert_eq!(a.count, 8.0);
        assert_eq!(a.mean(), Some(30.0 / 8.0));
        assert_eq!(a.count_le(5.0), 6.0);
        // rank 4 of 8 lies halfway through the (1, 5] bucket.
        assert_eq!(a.quantile(0.5), Some(3.0));
        let all = s.histogram("lat", &[]).unwrap();
        assert_eq!(
            all.buckets,
            vec![(1.0, 2.0), (5.0, 8.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!(all.count, 10.0);
        assert!(s.histogram("nope", &[]).is_none());
    }

    #[test]
    fn plain_stats_keep_integers_only() {
        let st = Stats::parse(
            "cluster.a.upstream_rq_total: 5\n\
             wasmcustom.sluice_requests_total.experiment=.=demo;.;variant=.=canary;.;: 3\n\
             cluster.a.upstream_rq_time: P0(nan,1) P25(nan,2)\n\
             cluster.b.upstream_rq_total: 2\n",
        );
        assert_eq!(st.get("cluster.a.upstream_rq_total"), Some(5));
        assert_eq!(
            st.get("wasmcustom.sluice_requests_total.experiment=.=demo;.;variant=.=canary;.;"),
            Some(3)
        );
        assert_eq!(st.get("cluster.a.upstream_rq_time"), None);
        assert_eq!(st.sum_prefix("cluster."), 7);
    }
}
