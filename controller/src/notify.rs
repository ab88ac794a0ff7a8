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

/// The configured webhooks.
#[derive(Debug, Clone)]
pub struct Notifier {
    hooks: Vec<(String, WebhookFormat)>,
    http: reqwest::Client,
    /// Deliveries still under way.
    in_flight: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Notifier {
    pub fn new(specs: &[NotificationSpec]) -> Notifier {
        Notifier {
            hooks: specs
                .iter()
                .map(|NotificationSpec::Webhook(w)| (w.url.clone(), w.format))
                .collect(),
            http: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .build()
                .unwrap_or_default(),
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
        for (url, format) in self.hooks.clone() {
            let body = match format {
                WebhookFormat::Json => serde_json::to_string(&notice),
                WebhookFormat::Slack => {
                    serde_json::to_string(&serde_json::json!({"text": notice.text()}))
                }
            };
            let Ok(body) = body else {
                continue;
            };
            let http = self.http.clone();
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
                    Err(e) => tracing::warn!(%url, error = %e, "webhook unreachable"),
                }
            });
            if let Ok(mut v) = self.in_flight.lock() {
                v.retain(|h| !h.is_finished());
                v.push(delivery);
            }
        }
    }
}
