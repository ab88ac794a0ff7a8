//! A client for Envoy's admin endpoint: the counters a source reads and a sink confirms with.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::source::exposition::{self, Sample};

/// Failure talking to one Envoy admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {source}")]
    Parse {
        url: String,
        #[source]
        source: exposition::ParseError,
    },
    #[error("{url}: line {line:?} is not `name: value`")]
    Stats { url: String, line: String },
}

/// One Envoy's admin endpoint, e.g. `http://127.0.0.1:9901`.
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: &str, timeout: Duration) -> Admin {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Admin {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get(&self, path_and_query: &str) -> Result<String, AdminError> {
        let url = format!("{}{path_and_query}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| AdminError::Http {
                url: url.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(AdminError::Status {
                url,
                status: resp.status().as_u16(),
            });
        }
        resp.text()
            .await
            .map_err(|source| AdminError::Http { url, source })
    }

    /// Sluice's samples of `experiment` from `/stats/prometheus`.
    pub async fn prometheus(&self, experiment: &str) -> Result<Vec<Sample>, AdminError> {
        // `filter` is matched against the stat's name before tag extraction
        // (`wasmcustom.sluice_requests_total.experiment.=.<name>;.variant.=.<v>;`), so Envoy
        // itself leaves out other experiments' series: a proxy serving many experiments answers
        // each rollout with its own share only.
        let filter = format!(
            "sluice_[a-z_]+\\.experiment\\.=\\.{};",
            regex_escape(experiment)
        );
        let text = self
            .get(&format!("/stats/prometheus?filter={}", encode(&filter)))
            .await?;
        exposition::parse(&text, "sluice_").map_err(|source| AdminError::Parse {
            url: format!("{}/stats/prometheus", self.base),
            source,
        })
    }

    /// Names of the clusters this Envoy knows (`/clusters`).
    pub async fn clusters(&self) -> Result<std::collections::BTreeSet<String>, AdminError> {
        let text = self.get("/clusters").await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once("::").map(|(name, _)| name.to_string()))
            .collect())
    }

    /// Plain `/stats` counters and gauges matching the regex `filter`, by name.
    pub async fn stats(&self, filter: &str) -> Result<BTreeMap<String, u64>, AdminError> {
        let text = self
            .get(&format!("/stats?usedonly=false&filter={}", encode(filter)))
            .await?;
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Some((name, value)) = line.rsplit_once(": ") else {
                return Err(AdminError::Stats {
                    url: format!("{}/stats", self.base),
                    line: line.to_string(),
                });
            };
            // Histograms print summaries, not integers; callers only ask for counters.
            if let Ok(v) = value.trim().parse::<u64>() {
                out.insert(name.trim().to_string(), v);
            }
        }
        Ok(out)
    }
}

impl Admin {
    /// A text readout (e.g. `extension_config_discovery.http_filter.<name>.version_text`),
    /// unquoted; `None` if Envoy has no such stat.
    pub async fn text_readout(&self, name: &str) -> Result<Option<String>, AdminError> {
        let filter = format!("^{}$", regex_escape(name));
        let text = self
            .get(&format!("/stats?usedonly=false&filter={}", encode(&filter)))
            .await?;
        Ok(text.lines().find_map(|line| {
            let (n, v) = line.rsplit_once(": ")?;
            (n.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        }))
    }
}

/// `s` with the characters special in Envoy's (RE2) regular expressions escaped.
pub(crate) fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// Percent-encodes a query or form value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
