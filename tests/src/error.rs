//! The harness's error type. Messages are meant to be read in a failing test's output, so the
//! ones about a missing prerequisite say which command fixes it, and the ones about Envoy carry
//! the tail of its log.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the harness can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Envoy binary is not where we looked.
    #[error("envoy binary not found at {0}: run scripts/setup.sh (or set ENVOY_BIN)")]
    EnvoyMissing(PathBuf),

    /// A wasm module a config refers to has not been built.
    #[error("wasm module {path} is missing: build it with `{build}`")]
    WasmMissing { path: PathBuf, build: String },

    /// A binary of ours has not been built.
    #[error("{path} is missing: build it with `{build}`")]
    BinaryMissing { path: PathBuf, build: String },

    /// Envoy exited before it became ready (bad config, port taken, ...).
    #[error("envoy exited with {status} before becoming ready; log tail:\n{log_tail}")]
    EnvoyExited { status: String, log_tail: String },

    /// Envoy did not report LIVE on `/ready` in time.
    #[error("envoy not ready after {waited:?}; log tail:\n{log_tail}")]
    EnvoyNotReady { waited: Duration, log_tail: String },

    /// `envoy --mode validate` rejected a config.
    #[error("envoy rejected {path}:\n{output}")]
    Invalid { path: PathBuf, output: String },

    /// A config given to [`crate::EnvoyConfig`] could not be prepared.
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A polled condition did not hold before its deadline.
    #[error("timed out after {waited:?} waiting for {what}{}", last.as_deref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Timeout {
        what: String,
        waited: Duration,
        last: Option<String>,
    },

    /// An HTTP exchange failed below the HTTP level (connect, reset, timeout).
    #[error("http {method} {url}: {reason}")]
    Http {
        method: String,
        url: String,
        reason: String,
    },

    /// An admin endpoint answered with something we could not parse.
    #[error("cannot parse {what}: {reason}")]
    Parse { what: String, reason: String },

    /// A simulated xDS client could not connect or subscribe.
    #[error("xds {what}: {reason}")]
    Xds { what: String, reason: String },

    /// `sluice run` ended otherwise than expected, or is not running.
    #[error("sluice run: {0}")]
    Sluice(String),

    /// Filesystem or process trouble.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a context string to an I/O error.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
