//! `sluice judge` on recorded snapshot files: a good rollout is promoted (through a counter
//! reset and a stale scrape), a bad one rolled back; config errors name their field.

use std::path::PathBuf;
use std::process::Command;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn judge(config: &str, snapshots: &str, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("judge")
        .arg("-c")
        .arg(data(config))
        .arg("-s")
        .arg(data(snapshots));
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("cannot run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn evaluations(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn decisions(evals: &[serde_json::Value]) -> Vec<String> {
    evals
        .iter()
        .map(|e| e["decision"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_good_rollout_is_promoted_through_a_reset_and_a_stale_scrape() {
    let (ok, stdout, stderr) = judge("guardrails.yaml", "good.jsonl", true);
    assert!(ok, "{stderr}");
    let evals = evaluations(&stdout);
    assert_eq!(evals.len(), 60);
    let d = decisions(&evals);
    assert!(!d.contains(&"roll_back".to_string()), "{d:?}");
    assert_eq!(d.last().map(String::as_str), Some("promote"));
    // The stale snapshot holds; the reset is reported and survived.
    assert!(evals
        .iter()
        .any(|e| e["decision"] == "hold" && e["reason"].as_str().unwrap_or("").contains("stale")));
    assert!(evals.iter().any(
        |e| e["verdicts"].as_array().is_some_and(|v| v
            .iter()
            .any(|v| v["reason"].as_str().unwrap_or("").contains("counter reset")))
    ));
    // Both stages reach a promotion.
    let promoted_at: Vec<f64> = evals
        .iter()
        .filter(|e| e["decision"] == "promote")
        .filter_map(|e| e["weights"]["canary"].as_f64())
        .collect();
    assert!(promoted_at.contains(&10.0) && promoted_at.contains(&50.0));
}

#[test]
fn a_bad_rollout_is_rolled_back_on_the_error_rate() {
    let (ok, stdout, stderr) = judge("guardrails.yaml", "bad.jsonl", true);
    assert!(ok, "{stderr}");
    let evals = evaluations(&stdout);
    let first = evals
        .iter()
        .find(|e| e["decision"] == "roll_back")
        .expect("never rolled back");
    assert!(first["reason"]
        .as_str()
        .unwrap_or("")
        .contains("error_rate"));
    assert_eq!(first["weights"]["canary"].as_f64(), Some(10.0));
    assert!(!decisions(&evals).contains(&"promote".to_string()));
}

#[test]
fn the_table_and_a_rollout_spec_work_too() {
    let (ok, stdout, stderr) = judge("rollout.yaml", "bad.jsonl", false);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("RollBack"), "{stdout}");
    assert!(stdout.contains("error_rate*"));
    assert!(
        !stdout.contains("latency_p99"),
        "latency is disabled in rollout.yaml"
    );
}

#[test]
fn a_bad_config_is_refused_with_its_field_path() {
    let dir = std::env::temp_dir().join(format!("sluice-judge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "spec:\n  guardrails:\n    errorRate: {ceiling: 3}\n").ok();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["judge", "-c"])
        .arg(&bad)
        .arg("-s")
        .arg(data("good.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.guardrails.errorRate.ceiling"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
