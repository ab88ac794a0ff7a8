//! Notifications: a generic JSON webhook, or Slack-compatible `{"text": ...}`, on stage
//! changes, holds, rollbacks and promotion. Delivery is best effort with a short timeout: a
//! dead webhook must never slow a rollback down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::rollout::EventKind;
use crate::spec::{NotificationSpec, WebhookFormat};

/// What is sent for one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub rollout: String,
    pub kind: EventKind,
    pub message: String,
    /// Unix seconds.
    pub at: f64,
    /// Confirmed treatment weight when the event happened.
    pub weight: f64,
    /// For a rollback: what caused it (`breaker`: the filter's breaker took the treatment out
    /// of traffic; `judge`: a guardrail failed; `operator`: an abort).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'static str>,
}

impl Notice {
    pub fn text(&self) -> String {
        format!(
            "sluice rollout {}: {} (treatment at {} %)",
            self.rollout, self.message, self.weight
        )
    }
}

/// How long a webhook may take; also the bound on [`Notifier::flush`].
const TIMEOUT: Duration = Duration::from_secs(3);

/// One webhook and the client that reaches it.
#[derive(Debug, Clone)]
struct Hook {
    url: String,
    format: WebhookFormat,
    /// The client (https:// URLs are verified against the system's roots plus the hook's
    /// `caFile`), or why none could be built: then every delivery is logged as failed.
    http: Result<reqwest::Client, Arc<ClientError>>,
}

/// Why a webhook has no client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    CaFile(#[from] crate::spec::CaFileError),
    #[error("{0}")]
    Build(#[from] reqwest::Error),
}

impl Hook {
    fn client(w: &crate::spec::WebhookSpec) -> Result<reqwest::Client, ClientError> {
        let extra = w.ca_certificates()?;
        Ok(reqwest::Client::builder()
            .timeout(TIMEOUT)
            .tls_certs_merge(extra)
            .build()?)
    }
}

/// The configured webhooks.
#[derive(Debug, Clone)]
pub struct Notifier {
    hooks: Vec<Hook>,
    /// Deliveries still under way.
    in_flight: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Notifier {
    pub fn new(specs: &[NotificationSpec]) -> Notifier {
        Notifier {
            hooks: specs
                .iter()
                .map(|NotificationSpec::Webhook(w)| Hook {
                    url: w.url.clone(),
                    format: w.format,
                    http: Hook::client(w).map_err(Arc::new),
                })
                .collect(),
            in_flight: Arc::default(),
        }
    }

    /// Waits (at most [`TIMEOUT`]) for deliveries under way, e.g. before the process exits.
    pub async fn flush(&self) {
        let pending = match self.in_flight.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        let _ = tokio::time::timeout(TIMEOUT, async {
            for h in pending {
                let _ = h.await;
            }
        })
        .await;
    }

    /// Sends `notice` to every hook in the background; failures are logged.
    pub fn send(&self, notice: Notice) {
        for Hook { url, format, http } in self.hooks.clone() {
            let http = match http {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%url, error = %e, "webhook has no usable client (caFile?)");
                    continue;
                }
            };
            let body = match format {
                WebhookFormat::Json => serde_json::to_string(&notice),
                WebhookFormat::Slack => {
                    serde_json::to_string(&serde_json::json!({"text": notice.text()}))
                }
            };
            let Ok(body) = body else {
                continue;
            };
            let delivery = tokio::spawn(async move {
                let sent = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        tracing::warn!(%url, status = %r.status(), "webhook refused a notification")
                    }
                    // `{:#}`-like: reqwest's own message hides the cause (refused, TLS, ...).
                    Err(e) => {
                        let mut why = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            why.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        tracing::warn!(%url, error = %why, "webhook unreachable")
                    }
                }
            });
            if let Ok(mut v) = self.in_flight.lock() {
                v.retain(|h| !h.is_finished());
                v.push(delivery);
            }
        }
    }
}

#[cfg(test)]
mod tests;
