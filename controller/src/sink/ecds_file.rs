//! The ECDS file sink: Envoy watches a directory and reloads the filter's
//! `TypedExtensionConfig` from a file in it (see `envoy/ecds.yaml`).
//!
//! A push writes the whole file to a temporary name in the same directory, syncs it, and
//! renames it over the watched file, so Envoy never reads a half-written file. It then polls
//! each Envoy's admin counters `extension_config_discovery.http_filter.<name>.update_success`
//! and `update_rejected` until one of them moves past its value from before the write, and
//! checks that the version in force (`version_text`) is the one written.
//!
//! Envoy counts a write whose resource equals the last one it received as a success without
//! evaluating it, even when that last one was rejected; so every write carries a fresh
//! `revision` in the filter configuration (push version and write time), and a retried push is
//! judged afresh.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_filter::config::FilterConfig;

use super::{Receipt, Sink, SinkError};
use crate::source::admin::{regex_escape, Admin};

/// How Envoy loads the filter's code; rendered into every pushed configuration (both ECDS
/// sinks). Exactly one of `filename` and `remote`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmCode {
    /// Path of `sluice_filter.wasm` as Envoy sees it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filename: String,
    /// Fetched over HTTP by each Envoy, checked against its sha256 (proxies that do not share
    /// the controller's file system: sidecars, gateways, other hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteCode>,
    #[serde(default = "default_name")]
    pub vm_id: String,
    #[serde(default = "default_name")]
    pub root_id: String,
    #[serde(default = "default_runtime")]
    pub runtime: String,
}

/// A `.wasm` served over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCode {
    /// `http://` or `https://` URL of the module.
    pub uri: String,
    /// The Envoy cluster that reaches `uri`'s host (Envoy fetches through a cluster).
    pub cluster: String,
    /// Hex SHA-256 of the module; Envoy refuses a module that does not match.
    pub sha256: String,
    /// Fetch timeout, whole seconds; default 10.
    #[serde(default = "default_fetch_secs")]
    pub timeout_secs: u64,
}

fn default_fetch_secs() -> u64 {
    10
}

impl WasmCode {
    /// What is wrong with this code source, each as (field under `wasm`, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (&self.remote, self.filename.is_empty()) {
            (None, true) => out.push((
                "filename",
                "give filename (a path on the proxy) or remote {uri, cluster, sha256}".into(),
            )),
            (Some(_), false) => out.push(("remote", "give filename or remote, not both".into())),
            _ => {}
        }
        if let Some(r) = &self.remote {
            if !(r.uri.starts_with("http://") || r.uri.starts_with("https://")) {
                out.push(("remote.uri", format!("{:?} is not an http(s) URL", r.uri)));
            }
            if r.cluster.is_empty() {
                out.push((
                    "remote.cluster",
                    "must name the Envoy cluster that reaches uri".into(),
                ));
            }
            if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push((
                    "remote.sha256",
                    "must be 64 hex digits (sha256sum of the module)".into(),
                ));
            }
            if r.timeout_secs == 0 {
                out.push(("remote.timeoutSecs", "must be at least 1".into()));
            }
        }
        out
    }

    /// The `vm_config.code` (an `AsyncDataSource`) in Envoy's JSON form.
    pub fn source_json(&self) -> serde_json::Value {
        match &self.remote {
            Some(r) => serde_json::json!({"remote": {
                "http_uri": {"uri": r.uri, "cluster": r.cluster, "timeout": format!("{}s", r.timeout_secs)},
                "sha256": r.sha256,
            }}),
            None => serde_json::json!({"local": {"filename": self.filename}}),
        }
    }
}

fn default_name() -> String {
    "sluice".to_string()
}

fn default_runtime() -> String {
    "envoy.wasm.runtime.v8".to_string()
}

/// An ECDS file watched by one or more Envoys.
#[derive(Debug, Clone)]
pub struct EcdsFile {
    pub path: PathBuf,
    /// The `TypedExtensionConfig` name (the filter name in the listener's `config_discovery`).
    pub resource: String,
    pub code: WasmCode,
    /// Admin endpoints of the Envoys that watch `path`.
    pub proxies: Vec<Admin>,
    pub confirm_within: Duration,
}

/// The file's content: a discovery response holding one `TypedExtensionConfig`.
pub fn render(
    resource: &str,
    code: &WasmCode,
    config: &FilterConfig,
    version: u64,
) -> Result<String, SinkError> {
    let plugin = serde_json::to_string(config).map_err(|e| SinkError::Render(e.to_string()))?;
    let doc = serde_json::json!({
        "version_info": version.to_string(),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": resource,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": resource,
                    "root_id": code.root_id,
                    "vm_config": {
                        "vm_id": code.vm_id,
                        "runtime": code.runtime,
                        "code": code.source_json(),
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": plugin,
                    },
                },
            },
        }],
    });
    serde_json::to_string_pretty(&doc).map_err(|e| SinkError::Render(e.to_string()))
}

impl EcdsFile {
    /// Envoy's ECDS stat `leaf` for this sink's resource.
    fn stat(&self, leaf: &str) -> String {
        format!(
            "extension_config_discovery.http_filter.{}.{leaf}",
            self.resource
        )
    }

    async fn counters(&self, proxy: &Admin) -> Result<(u64, u64), SinkError> {
        let (ok, rejected) = (self.stat("update_success"), self.stat("update_rejected"));
        let filter = format!(
            "^extension_config_discovery\\.http_filter\\.{}\\.update_(success|rejected)$",
            regex_escape(&self.resource)
        );
        let stats = proxy.stats(&filter).await?;
        Ok((
            stats.get(&ok).copied().unwrap_or(0),
            stats.get(&rejected).copied().unwrap_or(0),
        ))
    }
}

/// `<version>@<write time in Unix milliseconds>`: unique per write, also across restarts.
pub(crate) fn revision(version: u64) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{version}@{ms}")
}

impl Sink for EcdsFile {
    async fn push(&self, config: &FilterConfig, version: u64) -> Result<Receipt, SinkError> {
        let started = Instant::now();
        let mut config = config.clone();
        config.revision = Some(revision(version));
        let config = &config;
        let content = render(&self.resource, &self.code, config, version)?;
        // The filter cannot see Envoy's clusters, so a shadow cluster is checked here, before
        // the push, on every proxy that will load the config.
        let shadow_clusters: Vec<(usize, &str)> = config
            .experiments
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.shadow.as_ref()?.cluster.as_str())))
            .collect();
        let mut before = Vec::with_capacity(self.proxies.len());
        for p in &self.proxies {
            if !shadow_clusters.is_empty() {
                let known = p.clusters().await?;
                if let Some((i, c)) = shadow_clusters.iter().find(|(_, c)| !known.contains(*c)) {
                    return Err(SinkError::UnknownCluster {
                        proxy: p.base().to_string(),
                        field: format!("experiments[{i}].shadow.cluster"),
                        cluster: c.to_string(),
                    });
                }
            }
            before.push(self.counters(p).await?);
        }
        let (path, bytes) = (self.path.clone(), content.into_bytes());
        crate::durable::off_thread(move || crate::durable::write_atomically(&path, &bytes))
            .await
            .map_err(|source| SinkError::Write {
                path: self.path.display().to_string(),
                source,
            })?;
        for (p, (ok0, rejected0)) in self.proxies.iter().zip(before) {
            let want = version.to_string();
            loop {
                let (ok, rejected) = self.counters(p).await?;
                if rejected > rejected0 {
                    return Err(SinkError::Rejected {
                        proxy: p.base().to_string(),
                        version,
                    });
                }
                // A success counts only with the version just written in force.
                let in_force = if ok > ok0 {
                    p.text_readout(&self.stat("version_text")).await?
                } else {
                    None
                };
                if in_force.as_deref() == Some(want.as_str()) {
                    break;
                }
                if started.elapsed() > self.confirm_within {
                    return Err(SinkError::Unconfirmed {
                        proxy: p.base().to_string(),
                        version,
                        waited: started.elapsed(),
                        in_force: in_force.unwrap_or_else(|| "unchanged".into()),
                    });
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(Receipt {
            confirmed_after: started.elapsed(),
        })
    }

    async fn in_force(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        self.check(config, version).await
    }
}

/// What an ECDS file holds, as far as the controller checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileContent {
    pub version: String,
    pub resource: String,
    /// The filter configuration, its `revision` removed.
    pub config: FilterConfig,
}

/// Why a file is not one [`render`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Yaml(#[from] crate::yaml::YamlError),
    #[error("no version_info")]
    NoVersion,
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("configuration.value: {0}")]
    Config(String),
}

/// Reads back a file [`render`] wrote (or a YAML one of the same shape); `Err` says why it is
/// not one.
pub fn parse(text: &str) -> Result<FileContent, FileError> {
    let doc = crate::yaml::to_value(text)?;
    let version = match &doc["version_info"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err(FileError::NoVersion),
    };
    let resource = &doc["resources"][0];
    let name = resource["name"]
        .as_str()
        .ok_or(FileError::Missing("resources[0].name"))?
        .to_string();
    let value = resource["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .ok_or(FileError::Missing(
            "resources[0].typed_config.config.configuration.value",
        ))?;
    let mut config: FilterConfig =
        serde_json::from_str(value).map_err(|e| FileError::Config(e.to_string()))?;
    config.revision = None;
    Ok(FileContent {
        version,
        resource: name,
        config,
    })
}

impl EcdsFile {
    /// Compares the watched file with what was pushed as `version`, then each proxy's
    /// version in force with `version`.
    async fn check(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        let path = self.path.clone();
        let read = crate::durable::off_thread(move || std::fs::read_to_string(path)).await;
        let file = self.path.display();
        let text = match read {
            Ok(t) => t,
            Err(e) => return Ok(Some(format!("{file} cannot be read: {e}"))),
        };
        let mut want = config.clone();
        want.revision = None;
        match parse(&text) {
            Err(e) => return Ok(Some(format!("{file} is not a pushed configuration: {e}"))),
            Ok(c) if c.version != version.to_string() => {
                return Ok(Some(format!(
                    "{file} holds version {}, not the confirmed {version}",
                    c.version
                )))
            }
            Ok(c) if c.resource != self.resource => {
                return Ok(Some(format!(
                    "{file} holds resource {:?}, not {:?}",
                    c.resource, self.resource
                )))
            }
            Ok(c) if c.config != want => {
                return Ok(Some(format!(
                    "{file} holds version {version} with another configuration than the one pushed"
                )))
            }
            Ok(_) => {}
        }
        let stat = self.stat("version_text");
        let asked = self.proxies.iter().map(|p| p.text_readout(&stat));
        let answers = futures_util::future::join_all(asked).await;
        for (p, answer) in self.proxies.iter().zip(answers) {
            let in_force = answer?;
            if in_force.as_deref() != Some(version.to_string().as_str()) {
                return Ok(Some(format!(
                    "{} serves version {}, not the confirmed {version}",
                    p.base(),
                    in_force.as_deref().unwrap_or("none")
                )));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_push_says_what_is_missing() {
        let say = |text: &str| parse(text).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(say("a: 1\n"), Err("no version_info".into()));
        assert_eq!(
            say("version_info: 3\nresources: [{}]\n"),
            Err("resources[0].name missing".into())
        );
        assert_eq!(say(""), Err("the document is empty".into()));
        let bad = "version_info: '3'\nresources: [{name: x, typed_config: {config: {configuration: {value: 'nope'}}}}]\n";
        assert!(matches!(parse(bad), Err(FileError::Config(_))));
    }

    #[test]
    fn rendered_file_carries_the_config_as_a_string() {
        let config: FilterConfig = serde_json::from_str(
            r#"{"version": 1, "experiments": [{"name": "e", "unit": {"type": "request"},
                "variants": [{"name": "a"}, {"name": "b", "weight": 5}]}]}"#,
        )
        .unwrap();
        let code = WasmCode {
            filename: "/x/sluice_filter.wasm".into(),
            remote: None,
            vm_id: default_name(),
            root_id: default_name(),
            runtime: default_runtime(),
        };
        let text = render("sluice", &code, &config, 7).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(doc["version_info"], "7");
        let value = doc["resources"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap_or_default();
        let back: FilterConfig = serde_json::from_str(value).unwrap();
        assert_eq!(back, config);
    }

    #[tokio::test]
    async fn the_file_check_finds_another_version_or_configuration() {
        let config: FilterConfig = serde_json::from_str(
            r#"{"version": 1, "experiments": [{"name": "e", "unit": {"type": "request"},
                "variants": [{"name": "a"}, {"name": "b", "weight": 5}]}]}"#,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("sluice-ecds-check-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let code = WasmCode {
            filename: "/x/sluice_filter.wasm".into(),
            remote: None,
            vm_id: default_name(),
            root_id: default_name(),
            runtime: default_runtime(),
        };
        let sink = EcdsFile {
            path: dir.join("sluice.yaml"),
            resource: "sluice".into(),
            code: code.clone(),
            proxies: Vec::new(),
            confirm_within: Duration::from_secs(1),
        };
        let write = |c: &FilterConfig, version: u64| {
            let mut c = c.clone();
            c.revision = Some(revision(version));
            let text = render("sluice", &code, &c, version).unwrap_or_default();
            std::fs::write(dir.join("sluice.yaml"), text).unwrap_or_default();
        };
        write(&config, 7);
        assert_eq!(sink.check(&config, 7).await.ok(), Some(None));
        let found = sink
            .check(&config, 8)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        assert!(
            found.contains("holds version 7, not the confirmed 8"),
            "{found}"
        );
        let mut other = config.clone();
        other.experiments[0].variants[1].weight = Some(50.0);
        write(&other, 7);
        let found = sink
            .check(&config, 7)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        assert!(found.contains("another configuration"), "{found}");
        std::fs::write(dir.join("sluice.yaml"), "not: [a config").unwrap_or_default();
        let found = sink
            .check(&config, 7)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        assert!(found.contains("not a pushed configuration"), "{found}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn regex_escaping() {
        assert_eq!(regex_escape("a.b"), "a\\.b");
    }
}
