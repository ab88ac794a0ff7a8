//! Polling with deadlines: Envoy applies config and flushes histograms asynchronously, so tests
//! wait for the state they expect instead of sleeping a guessed amount.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often conditions are re-checked. Short enough not to slow tests down, long enough not to
/// load the admin listener of the Envoy under test.
const POLL: Duration = Duration::from_millis(50);

/// Waits until `condition` returns true, checking at least once, for at most `timeout`.
/// `what` names the condition in the timeout error.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.into(),
                waited: start.elapsed(),
                last: None,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `probe` yields `Ok(Some(value))` and returns the value. `Ok(None)` and errors
/// mean "not yet"; the last error or the last `Debug` of what was seen goes into the timeout
/// error, which is usually what explains a failure.
///
/// ```no_run
/// # async fn f(admin: sluice_tests::Admin) -> sluice_tests::Result<()> {
/// use std::time::Duration;
/// let canary = sluice_tests::wait_for(Duration::from_secs(5), "canary requests", || async {
///     let n = admin.prometheus().await?.sum("sluice_requests_total", &[("variant", "canary")]);
///     Ok::<_, sluice_tests::Error>((n >= 100.0).then_some(n))
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn wait_for<T, E, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
    E: Debug,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(format!("{e:?}")),
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.into(),
                waited: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
