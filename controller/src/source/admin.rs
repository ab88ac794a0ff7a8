//! A client for Envoy's admin endpoint: the counters a source reads and a sink confirms with.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_filter::metrics;

use crate::source::exposition::{self, Format};

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
    timeout: Duration,
}

impl Admin {
    pub fn new(base: &str, timeout: Duration) -> Admin {
        Admin::sharing(base, timeout, &reqwest::Client::new())
    }

    /// An endpoint whose requests go through `http` (its connection pools), as when one
    /// process talks to many Envoys.
    pub fn sharing(base: &str, timeout: Duration, http: &reqwest::Client) -> Admin {
        Admin {
            base: base.trim_end_matches('/').to_string(),
            http: http.clone(),
            timeout,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET` with the status checked; the body is the caller's to read.
    async fn send(
        &self,
        path_and_query: &str,
        accept: &str,
    ) -> Result<reqwest::Response, AdminError> {
        let url = format!("{}{path_and_query}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, accept)
            .timeout(self.timeout)
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
        Ok(resp)
    }

    async fn get(&self, path_and_query: &str) -> Result<String, AdminError> {
        let resp = self.send(path_and_query, "*/*").await?;
        let url = resp.url().to_string();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| AdminError::Http { url, source })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sluice's series of `experiments` from `/stats/prometheus`, asked for in `format`; the
    /// caller reads the body (as it arrives: one Envoy's answer can be large) in the format
    /// its `Content-Type` names, since an Envoy may answer in another one.
    pub async fn sluice_exposition(
        &self,
        experiments: &[&str],
        format: Format,
    ) -> Result<reqwest::Response, AdminError> {
        self.exposition(&Admin::exposition_query(experiments), format)
            .await
    }

    /// The path and query that ask for Sluice's series of `experiments` (the same for every
    /// Envoy: a source keeps it while the experiments stay the same).
    pub fn exposition_query(experiments: &[&str]) -> String {
        // `filter` is matched against the stat's name before tag extraction
        // (`wasmcustom.sluice_requests_total.experiment=.=<name>;.;variant=.=<v>;.;`), so Envoy
        // itself leaves out other experiments' series: a proxy serving many experiments
        // answers with the asked-for share only.
        format!(
            "/stats/prometheus?filter={}",
            encode(&experiments_filter(experiments))
        )
    }

    /// [`Admin::sluice_exposition`] with the query made by [`Admin::exposition_query`].
    pub async fn exposition(
        &self,
        query: &str,
        format: Format,
    ) -> Result<reqwest::Response, AdminError> {
        self.send(query, format.accept()).await
    }

    /// The URL `sluice_exposition` reads, for messages.
    pub fn exposition_url(&self) -> String {
        format!("{}/stats/prometheus", self.base)
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
            .get(&format!("/stats?filter={}", encode(filter)))
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
            .get(&format!("/stats?filter={}", encode(&filter)))
            .await?;
        Ok(text.lines().find_map(|line| {
            let (n, v) = line.rsplit_once(": ")?;
            (n.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        }))
    }
}

/// `s` with the characters special in Envoy's (RE2) regular expressions escaped.
/// The regex of admin `filter=` that keeps the filter's stats of `experiments` (names
/// before tag extraction: [`metrics::name`]'s layout).
pub(crate) fn experiments_filter(experiments: &[&str]) -> String {
    let names: Vec<String> = experiments.iter().map(|e| regex_escape(e)).collect();
    format!(
        "{}[a-z_]+\\.{}({}){}",
        regex_escape(metrics::PREFIX),
        regex_escape(&format!("experiment{}", metrics::TAG_SEPARATOR)),
        names.join("|"),
        regex_escape(metrics::TAG_END)
    )
}

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

/// Everything but the unreserved characters of RFC 3986 (letters, digits, `-_.~`).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query or form value.
pub(crate) fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_keep_only_unreserved_characters() {
        assert_eq!(encode("aZ09-_.~"), "aZ09-_.~");
        assert_eq!(
            encode("sluice_requests_total\\.experiment=(a|b); é/+"),
            "sluice_requests_total%5C.experiment%3D%28a%7Cb%29%3B%20%C3%A9%2F%2B"
        );
        assert_eq!(encode(""), "");
    }
}
