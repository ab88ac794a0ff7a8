//! Steady background traffic from many users while a rollout runs: batches of concurrent GETs,
//! each user named in `x-user-id`, until stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::client::HttpClient;

/// Requests in flight at once (one batch), by default.
const BATCH: usize = 20;
/// Distinct users cycled through (`u-0` … `u-3999`), by default.
const USERS: u64 = 4000;
/// Pause between batches: keeps the rate steady without saturating a shared 2-core machine.
const PAUSE: Duration = Duration::from_millis(20);

/// Background traffic; [`Traffic::stop`] ends it (dropping it stops it too, without waiting).
pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Batches of 20 requests to `url` from users `u-0` … `u-3999` in turn.
    pub fn start(url: impl Into<String>) -> Traffic {
        Traffic::spread(vec![url.into()], BATCH, USERS)
    }

    /// Batches of `batch` requests spread over `urls` in turn, from `users` distinct users.
    pub fn spread(urls: Vec<String>, batch: usize, users: u64) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            if urls.is_empty() {
                return;
            }
            let client = HttpClient::new();
            let mut i: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..batch {
                    let url = urls[(i % urls.len() as u64) as usize].clone();
                    let (client, user) = (client.clone(), format!("u-{}", i % users.max(1)));
                    let count = count.clone();
                    i += 1;
                    set.spawn(async move {
                        let sent = client
                            .send(
                                hyper::Method::GET,
                                &url,
                                &[("x-user-id", &user)],
                                Vec::<u8>::new(),
                            )
                            .await;
                        if sent.is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                while set.join_next().await.is_some() {}
                tokio::time::sleep(PAUSE).await;
            }
        });
        Traffic {
            stop,
            answered,
            task: Some(task),
        }
    }

    /// Requests answered so far (any status): for waiting on an amount of traffic rather than
    /// an amount of time.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops sending and waits for the requests in flight.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
