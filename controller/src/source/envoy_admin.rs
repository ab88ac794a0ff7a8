//! The Envoy admin source: `/stats/prometheus` of every listed Envoy, scraped concurrently.

use std::time::Duration;

use super::{OriginScrape, Source, SourceError};
use crate::admin::Admin;

/// Scrapes a fixed list of Envoy admin endpoints.
#[derive(Debug, Clone)]
pub struct EnvoyAdmin {
    proxies: Vec<Admin>,
    /// Fewest endpoints that must answer for the data to count (default: all of them).
    min_healthy: usize,
}

impl EnvoyAdmin {
    pub fn new(endpoints: &[String], timeout: Duration, min_healthy: Option<usize>) -> EnvoyAdmin {
        let proxies: Vec<Admin> = endpoints.iter().map(|e| Admin::new(e, timeout)).collect();
        let min_healthy = min_healthy
            .unwrap_or(proxies.len())
            .clamp(1, proxies.len().max(1));
        EnvoyAdmin {
            proxies,
            min_healthy,
        }
    }
}

impl Source for EnvoyAdmin {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, proxy) in self.proxies.iter().cloned().enumerate() {
            let experiment = experiment.to_string();
            tasks.spawn(async move { (i, proxy.prometheus(&experiment).await) });
        }
        let mut answered = Vec::new();
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(samples))) => answered.push((i, samples)),
                Ok((i, Err(e))) => failures.push((i, e.to_string())),
                Err(e) => failures.push((usize::MAX, e.to_string())),
            }
        }
        if answered.len() < self.min_healthy {
            if let ([(i, reason)], 1) = (failures.as_slice(), self.proxies.len()) {
                return Err(SourceError::Unreachable {
                    origin: self.proxies[*i].base().to_string(),
                    reason: reason.clone(),
                });
            }
            return Err(SourceError::TooFewOrigins {
                healthy: answered.len(),
                total: self.proxies.len(),
                needed: self.min_healthy,
            });
        }
        answered.sort_by_key(|(i, _)| *i);
        Ok(answered
            .into_iter()
            .map(|(i, samples)| OriginScrape {
                origin: self.proxies[i].base().to_string(),
                samples: samples
                    .into_iter()
                    .filter(|s| s.label("experiment") == Some(experiment))
                    .collect(),
            })
            .collect())
    }
}
