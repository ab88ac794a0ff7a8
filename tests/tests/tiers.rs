//! The split between the test tiers (README, "Test tiers"): `cargo test` at the root runs every
//! workspace crate but this one, and the demo's scenarios only with its `real-envoy` feature. A
//! crate added to `members` but not to `default-members` would silently leave the fast tier; a
//! real-Envoy test outside this crate would make the fast tier need Envoy.

use serde_json::Value;

fn metadata() -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(sluice_tests::repo_root())
        .output()
        .expect("cannot run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Package names of the workspace members listed under `key`, sorted.
fn names(meta: &Value, key: &str) -> Vec<String> {
    let ids: Vec<&str> = meta[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in cargo metadata"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut names: Vec<String> = meta["packages"]
        .as_array()
        .expect("no packages in cargo metadata")
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| ids.contains(&id)))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn the_fast_tier_is_every_crate_but_the_real_envoy_one() {
    let meta = metadata();
    let mut expected = names(&meta, "workspace_members");
    assert!(
        expected.contains(&"sluice-tests".to_string()),
        "{expected:?}"
    );
    expected.retain(|n| n != "sluice-tests");
    assert_eq!(names(&meta, "workspace_default_members"), expected);
}

#[test]
fn the_demo_scenarios_need_the_real_envoy_feature() {
    let meta = metadata();
    let demo = meta["packages"]
        .as_array()
        .expect("no packages in cargo metadata")
        .iter()
        .find(|p| p["name"] == "sluice-demo")
        .expect("no sluice-demo package");
    let scenarios = demo["targets"]
        .as_array()
        .expect("no targets")
        .iter()
        .find(|t| t["name"] == "scenarios")
        .expect("no scenarios test");
    assert_eq!(
        scenarios["required-features"],
        serde_json::json!(["real-envoy"])
    );
}
