//! The benchmark configurations compare like with like: the Lua stand-in of benchmark (d)
//! (`bench/envoy/proxy-lua.yaml`) must assign every user to the variant the Sluice filter's own
//! assignment gives under the experiment of `bench/envoy/proxy-sluice.yaml`, and Envoy must
//! route on the header it sets. Needs `scripts/setup.sh` (Envoy).

use std::collections::BTreeMap;

use sluice_filter::config::Plan;
use sluice_filter::request::variant_of_key;
use sluice_tests::{repo_root, EnvoyConfig, Load, Upstream};

/// The Sluice filter's JSON config embedded in a bench YAML (the block under `value: |`).
fn embedded_filter_config(yaml: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(repo_root().join(yaml))?;
    let mut lines = text.lines().skip_while(|l| l.trim() != "value: |");
    let head = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("{yaml}: no `value: |` block"))?;
    let indent = head.len() - head.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    Ok(block.join("\n"))
}

#[tokio::test]
async fn lua_stand_in_assigns_users_like_the_sluice_filter() -> anyhow::Result<()> {
    let plan =
        Plan::from_json(embedded_filter_config("bench/envoy/proxy-sluice.yaml")?.as_bytes())?;
    let exp = &plan.experiments[0];
    let model = Upstream::named("model").await?;
    let envoy = EnvoyConfig::new("bench/envoy/proxy-lua.yaml")
        .port_to(18000, model.port())
        .start()
        .await?;
    let n = 3000;
    let responses = Load::new(envoy.url(10000, "/predict"))
        .requests(n)
        .concurrency(32)
        // A client-sent variant must be overwritten, as the Sluice filter does.
        .header("x-sluice-variant", "canary")
        .run()
        .await?;
    assert!(responses.iter().all(|r| r.status == 200));

    let mut expected_canary = 0;
    let mut mismatches = Vec::new();
    for req in model.requests() {
        let user = req.user().unwrap_or_default().to_string();
        let want = &exp.variants[variant_of_key(exp, user.as_bytes())];
        if want == "canary" {
            expected_canary += 1;
        }
        if req.variant() != Some(want.as_str()) {
            mismatches.push((user, req.variant().map(str::to_string), want.clone()));
        }
    }
    assert_eq!(model.count(), n as u64);
    assert!(
        mismatches.is_empty(),
        "{} of {n} users assigned differently (user, lua, sluice): {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    // About 10 %, and Envoy routed each request on the header the script set.
    assert!((200..400).contains(&expected_canary), "{expected_canary}");
    let prom = envoy.admin().prometheus().await?;
    let routed: BTreeMap<String, f64> =
        prom.by_label("envoy_cluster_upstream_rq_total", "envoy_cluster_name", &[]);
    assert_eq!(routed.get("canary").copied(), Some(expected_canary as f64));
    assert_eq!(
        routed.get("stable").copied(),
        Some((n - expected_canary) as f64)
    );
    Ok(())
}
