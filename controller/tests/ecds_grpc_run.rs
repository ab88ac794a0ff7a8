//! `sluice run` with ecdsGrpc sinks: rollouts naming one `listen` share its server, a resource
//! is one rollout's only, and an address that cannot be bound stops the daemon with an error
//! naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn spec(name: &str, listen: &str, resource: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {{name: {name}}}
spec:
  experiment:
    name: {name}
    unit: {{type: user, keys: [{{header: x-user-id}}]}}
    variants: [{{name: stable, control: true}}, {{name: canary, weight: 0}}]
  schedule: {{stages: [1, 100], bake: 1m, warmup: 1s, interval: 1s}}
  sources: [{{envoyAdmin: {{endpoints: ["http://127.0.0.1:9"]}}}}]
  sinks:
    - ecdsGrpc: {{listen: "{listen}", resource: {resource}, wasm: {{filename: /x.wasm}}, confirmWithin: 1s}}
"#
    )
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("sluice-grpc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn state(&self) -> String {
        self.0.join("state").to_string_lossy().into_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn run(dir: &Dir, files: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args([
        "run",
        "--state-dir",
        &dir.state(),
        "--listen",
        "127.0.0.1:0",
        "--exit-when-done",
    ]);
    for f in files {
        cmd.arg("-f").arg(f);
    }
    cmd.env("SLUICE_LOG", "error")
        .output()
        .expect("cannot run sluice")
}

#[test]
fn a_listen_address_that_cannot_be_bound_is_an_error_naming_it() {
    let dir = Dir::new("taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let f = dir.file("a.yaml", &spec("a", &addr.to_string(), "sluice"));
    let out = run(&dir, &[&f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr} for the ecdsGrpc server"))
            && err.contains("spec.sinks[0]"),
        "{err}"
    );
}

#[test]
fn two_rollouts_cannot_share_a_resource_on_one_server() {
    let dir = Dir::new("same-resource");
    let listen = format!("127.0.0.1:{}", free_port());
    let a = dir.file("a.yaml", &spec("a", &listen, "sluice"));
    let b = dir.file("b.yaml", &spec("b", &listen, "sluice"));
    let out = run(&dir, &[&a, &b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("resource \"sluice\" on the ecdsGrpc server {listen} is already the sink of rollout \"a\"")),
        "{err}"
    );
}

#[tokio::test]
async fn rollouts_naming_one_listen_share_its_server() {
    let dir = Dir::new("shared");
    let listen = format!("127.0.0.1:{}", free_port());
    let api = format!("127.0.0.1:{}", free_port());
    let a = dir.file("a.yaml", &spec("a", &listen, "filter-a"));
    let b = dir.file("b.yaml", &spec("b", &listen, "filter-b"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--state-dir", &dir.state(), "--listen", &api, "-f"])
        .arg(&a)
        .arg("-f")
        .arg(&b)
        .env("SLUICE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = serde_json::Value::Null;
    let shared = loop {
        if let Ok(r) = reqwest::get(format!("http://{api}/status")).await {
            seen = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
            let sinks: Vec<(String, String, Option<u64>)> = seen
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["proxies"].as_array().cloned().unwrap_or_default())
                .map(|p| {
                    (
                        p["listen"].as_str().unwrap_or_default().to_string(),
                        p["resource"].as_str().unwrap_or_default().to_string(),
                        p["serving"].as_u64(),
                    )
                })
                .collect();
            // Both rollouts pushed their first weight to the one server (unconfirmed: no proxy).
            if sinks.len() == 2 && sinks.iter().all(|s| s.2.is_some()) {
                break sinks;
            }
        }
        if Instant::now() > deadline {
            break Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        shared
            .iter()
            .map(|s| (s.0.as_str(), s.1.as_str()))
            .collect::<Vec<_>>(),
        [(listen.as_str(), "filter-a"), (listen.as_str(), "filter-b")],
        "{seen}"
    );
}
