//! What the `sluice` binary does with bad input files (rollout specs, guardrail files, snapshot
//! lines, filter configs): a clean error naming the field, printed once, and exit status 1 —
//! never a panic (exit 101 in a debug build, 134 in release), never a silent 0.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SPEC: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {name: ranker}
spec:
  experiment:
    name: ranker
    unit: {type: user, keys: [{header: x-user-id}]}
    variants: [{name: stable, control: true}, {name: canary, weight: 0}]
  schedule:
    stages: [1, {weight: 10, bake: 30s}, 100]
    bake: 2m
    warmup: 10s
    interval: 1s
  sources: [{envoyAdmin: {endpoints: ["http://127.0.0.1:9"]}}]
  sinks:
    - ecdsFile:
        path: /nonexistent/ecds/sluice.yaml
        wasm: {filename: /nonexistent/sluice_filter.wasm}
        proxies: ["http://127.0.0.1:9"]
"#;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("sluice-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn sluice(args: &[&str], files: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args).args(files).env("SLUICE_LOG", "error");
    cmd.output().expect("cannot run sluice")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status 1 with `want` in the error output, printed once.
fn refused(out: &Output, want: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches(want).count(),
        1,
        "want {want:?} once in:\n{err}"
    );
}

#[test]
fn huge_durations_are_refused_by_validate_render_and_run() {
    let dir = Dir::new("durations");
    let state = dir.0.join("state");
    let state = state.to_string_lossy().into_owned();
    for (from, to, want) in [
        (
            "bake: 2m",
            "bake: 1e300",
            "spec.schedule.bake: 1e300 is longer than the longest duration",
        ),
        (
            "bake: 2m",
            "bake: \"100000000000000000000s\"",
            "spec.schedule.bake: \"100000000000000000000s\" is longer",
        ),
        (
            "warmup: 10s",
            "warmup: 1e30",
            "spec.schedule.warmup: 1e30 is longer",
        ),
        (
            r#"endpoints: ["http://127.0.0.1:9"]"#,
            r#"endpoints: ["http://127.0.0.1:9"], timeout: 1e300"#,
            "spec.sources[0].envoyAdmin.timeout: 1e300 is longer",
        ),
        (
            "interval: 1s",
            "interval: 0.000001ms",
            "spec.schedule.interval: 1ns is outside 100ms to 1h",
        ),
    ] {
        let spec = dir.file("rollout.yaml", SPEC.replace(from, to));
        refused(&sluice(&["validate", "-f"], &[&spec]), want);
        refused(&sluice(&["render", "--stage", "1", "-f"], &[&spec]), want);
        refused(
            &sluice(
                &[
                    "run",
                    "--state-dir",
                    &state,
                    "--listen",
                    "127.0.0.1:0",
                    "--exit-when-done",
                    "-f",
                ],
                &[&spec],
            ),
            want,
        );
    }
}

#[test]
fn type_errors_name_the_field_path_not_a_position() {
    let dir = Dir::new("types");
    let spec = dir.file(
        "rollout.yaml",
        SPEC.replace("{name: canary, weight: 0}", "{name: canary, weight: \"x\"}"),
    );
    let out = sluice(&["validate", "-f"], &[&spec]);
    refused(
        &out,
        "spec.experiment.variants[1].weight: expected a number, found string \"x\"",
    );
    assert!(!stderr(&out).contains("column"), "{}", stderr(&out));
    // A filter configuration for `sluice check`, rendered from the spec, with one type error.
    let good = dir.file("rollout.yaml", SPEC);
    let rendered = sluice(&["render", "--stage", "2", "-f"], &[&good]);
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    let config =
        String::from_utf8_lossy(&rendered.stdout).replace("\"weight\": 10.0", "\"weight\": \"x\"");
    let config = dir.file("filter.json", config);
    let out = sluice(&["check", "-f"], &[&config]);
    refused(
        &out,
        "experiments[0].variants[1].weight: expected a number, found string \"x\"",
    );
    assert!(!stderr(&out).contains("column"), "{}", stderr(&out));
}

#[test]
fn errors_are_printed_once() {
    let dir = Dir::new("once");
    let line = std::fs::read_to_string(data("good.jsonl"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default()
        .replace("\"requests\":", "\"reqs\":");
    let snaps = dir.file("snaps.jsonl", format!("{line}\n"));
    let out = sluice(
        &["judge", "-c"],
        &[&data("guardrails.yaml"), Path::new("-s"), &snaps],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("unknown field `reqs`").count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: {}: line 1: variants.", snaps.display())),
        "{err}"
    );
    // Also for an error with an underlying cause (a missing file).
    let missing = dir.0.join("missing.jsonl");
    let out = sluice(
        &["judge", "-c"],
        &[&data("guardrails.yaml"), Path::new("-s"), &missing],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn a_byte_order_mark_is_read_in_every_input() {
    let dir = Dir::new("bom");
    let bom = |text: &[u8]| [b"\xef\xbb\xbf".as_slice(), text].concat();
    let spec = dir.file("rollout.yaml", bom(SPEC.as_bytes()));
    let out = sluice(&["validate", "-f"], &[&spec]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plain = sluice(
        &["judge", "--json", "-c"],
        &[
            &data("guardrails.yaml"),
            Path::new("-s"),
            &data("good.jsonl"),
        ],
    );
    assert!(plain.status.success(), "{}", stderr(&plain));
    let config = dir.file(
        "guardrails.yaml",
        bom(&std::fs::read(data("guardrails.yaml")).unwrap_or_default()),
    );
    let snaps = dir.file(
        "snaps.jsonl",
        bom(&std::fs::read(data("good.jsonl")).unwrap_or_default()),
    );
    let with_bom = sluice(
        &["judge", "--json", "-c"],
        &[&config, Path::new("-s"), &snaps],
    );
    assert!(with_bom.status.success(), "{}", stderr(&with_bom));
    assert_eq!(with_bom.stdout, plain.stdout);
}

#[test]
fn an_empty_file_is_an_error_not_a_silent_success() {
    let dir = Dir::new("empty");
    let empty = dir.file("a.yaml", "");
    let blank = dir.file("b.yaml", "\n# nothing here\n\n");
    for f in [&empty, &blank] {
        refused(&sluice(&["validate", "-f"], &[f]), "the document is empty");
        refused(
            &sluice(
                &["judge", "-c"],
                &[&data("guardrails.yaml"), Path::new("-s"), f],
            ),
            "no snapshots: the file is empty",
        );
        refused(
            &sluice(&["judge", "-c"], &[f, Path::new("-s"), &data("good.jsonl")]),
            "the document is empty",
        );
    }
    refused(
        &sluice(&["check", "-f"], &[&empty]),
        "the document is empty",
    );
}

/// The good fixture with one edit on every line.
fn fixture_with(dir: &Dir, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(data("good.jsonl")).unwrap_or_default();
    assert!(text.contains(from), "{from}");
    dir.file("snaps.jsonl", text.replace(from, to))
}

#[test]
fn a_canary_that_is_not_a_variant_is_an_error_like_a_missing_control() {
    let dir = Dir::new("canary");
    let snaps = fixture_with(&dir, "\"canary\":\"canary\"", "\"canary\":\"canry\"");
    refused(
        &sluice(
            &["judge", "-c"],
            &[&data("guardrails.yaml"), Path::new("-s"), &snaps],
        ),
        "canary \"canry\" is not among the variants",
    );
    let snaps = fixture_with(&dir, "\"control\":\"control\"", "\"control\":\"contrl\"");
    refused(
        &sluice(
            &["judge", "-c"],
            &[&data("guardrails.yaml"), Path::new("-s"), &snaps],
        ),
        "control \"contrl\" is not among the variants",
    );
}

#[test]
fn weights_must_add_up_to_100() {
    let dir = Dir::new("weights");
    let snaps = fixture_with(
        &dir,
        "\"weights\":{\"control\":90,\"canary\":10}",
        "\"weights\":{\"control\":90,\"canary\":90}",
    );
    refused(
        &sluice(
            &["judge", "-c"],
            &[&data("guardrails.yaml"), Path::new("-s"), &snaps],
        ),
        "weights add up to 180, not 100",
    );
}

#[test]
fn counters_near_u64_max_are_refused_without_overflow() {
    let dir = Dir::new("overflow");
    let max = u64::MAX;
    let snap = |at: u64, requests: u64, class: u64| {
        format!(
            r#"{{"at":{at},"experiment":"e","control":"control","canary":"canary","weights":{{"control":50,"canary":50}},"variants":{{"control":{{"requests":{requests},"responses":{{"2xx":{class},"5xx":{class}}}}},"canary":{{"requests":{requests},"responses":{{"2xx":{class},"5xx":{class}}}}}}}}}"#
        )
    };
    // Counted from 0 to u64::MAX (a debug build panicked adding the response classes; a
    // release build wrapped around).
    let text = [
        snap(0, 0, 0),
        snap(10, max, max),
        snap(20, 5, 5),
        snap(30, max, max),
    ]
    .join("\n");
    let snaps = dir.file("snaps.jsonl", text);
    let config = dir.file("guardrails.yaml", "{warmup: 0, minRequests: 1}\n");
    refused(
        &sluice(&["judge", "-c"], &[&config, Path::new("-s"), &snaps]),
        "line 2: variants.canary.requests: more than 9007199254740992, beyond any real counter",
    );
}

/// Sums of intervals (the judge's per-stage evidence) are clamped, never wrapped or panicking,
/// whatever counts reach them.
#[test]
fn counter_sums_are_clamped_at_the_largest_count() {
    use sluice_controller::snapshot::{Counters, MAX_COUNT};
    let big = Counters {
        requests: u64::MAX,
        responses: [("2xx".to_string(), u64::MAX), ("5xx".to_string(), u64::MAX)].into(),
        outcomes: [("click".to_string(), u64::MAX)].into(),
        exposures: Some(u64::MAX),
        ..Counters::default()
    };
    let mut sum = Counters::default();
    sum.add(&big);
    sum.add(&big);
    assert_eq!(sum.requests, MAX_COUNT);
    assert_eq!(sum.responses_total(), MAX_COUNT);
    assert_eq!(sum.outcomes["click"], MAX_COUNT);
    assert_eq!(sum.exposures, Some(MAX_COUNT));
    assert_eq!(big.responses_total(), MAX_COUNT);
}

/// A Prometheus answering `timestamp()` with a time that does not fit a duration from now
/// (`-Inf`, `-1e300`): stale data, not a panic in the daemon.
#[tokio::test]
async fn a_prometheus_timestamp_from_the_far_past_is_stale_not_a_panic() {
    use sluice_controller::source::{prometheus::Prometheus, Source, SourceError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    for stamp in ["-Inf", "-1e300"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let server = tokio::spawn(async move {
            // Two queries: the series, then their timestamps.
            for _ in 0..2 {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The whole request: headers, then the form body its content-length announces.
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let timestamps = String::from_utf8_lossy(&request).contains("timestamp");
                let value = if timestamps { stamp } else { "5" };
                let body = format!(
                    r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"__name__":"sluice_requests_total","experiment":"e","variant":"canary","instance":"i"}},"value":[1700000000,"{value}"]}}]}}}}"#
                );
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        let source = Prometheus::new(
            &url,
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(30),
        );
        match source.scrape("e").await {
            Err(SourceError::Stale { .. }) => {}
            Err(other) => unreachable!("{stamp}: {other}"),
            Ok(_) => unreachable!("{stamp}: data scraped at {stamp} was taken as fresh"),
        }
        server.abort();
    }
}

/// `sluice plan --interval` (seconds) has the bounds of a spec's `schedule.interval`.
#[test]
fn plan_refuses_an_interval_a_spec_would_refuse() {
    for interval in ["1e300", "0", "NaN", "0.01"] {
        let out = sluice(
            &[
                "plan",
                "--baseline-rate",
                "0.01",
                "--mde",
                "0.1",
                "--rps",
                "100",
                "--interval",
                interval,
            ],
            &[],
        );
        refused(&out, "--interval: must be 0.1 to 3600 seconds");
    }
    let out = sluice(
        &[
            "plan",
            "--baseline-rate",
            "0.01",
            "--mde",
            "0.1",
            "--rps",
            "100",
            "--interval",
            "10",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}
