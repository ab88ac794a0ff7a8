//! The replicate-group counter in a real Envoy: `sluice_replicate_requests_total` carries its
//! `replicate` label through the shipped `stats_tags`, adds up to `sluice_requests_total`, and
//! puts every user in the group the controller's side of the code computes (the sample-ratio
//! test relies on groups being disjoint sets of users).

use std::collections::BTreeMap;

use serde_json::json;
use sluice_filter::assignment::{hash, replicate_of};
use sluice_filter::config::Plan;
use sluice_filter::metrics::{REPLICATES, REPLICATE_REQUESTS, REQUESTS};
use sluice_filter::request::variant_of_key;
use sluice_tests::{EnvoyConfig, Load, Reply, Request, Upstream};

const LISTENER: u16 = 10000;
const STABLE: u16 = 10001;
const CANARY: u16 = 10002;
const SHADOW: u16 = 10003;
const FIXTURE: &str = "tests/envoy/upstreams.yaml";

#[tokio::test(flavor = "multi_thread")]
async fn keyed_requests_are_counted_by_replicate_group() -> anyhow::Result<()> {
    let upstream = Upstream::start("any", |_req: &Request| Reply::json(json!({}))).await?;
    let config = json!({"version": 1, "experiments": [{
        "name": "t",
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 30}],
    }]});
    let envoy = EnvoyConfig::new(FIXTURE)
        .port_to(STABLE, upstream.port())
        .port_to(CANARY, upstream.port())
        .port_to(SHADOW, upstream.port())
        .replace(
            &sluice_tests::inline_filter_config(FIXTURE)?,
            &config.to_string(),
        )
        .start()
        .await?;
    let n = 3_000;
    let responses = Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .run()
        .await?;
    assert_eq!(responses.len(), n);
    // What each user should add, by the filter crate's own code run natively.
    let plan = Plan::from_json(config.to_string().as_bytes())?;
    let exp = &plan.experiments[0];
    let mut want: BTreeMap<(String, String), f64> = BTreeMap::new();
    for r in &responses {
        let variant = exp.variants[variant_of_key(exp, r.user.as_bytes())].clone();
        let group = replicate_of(hash(&exp.salt, r.user.as_bytes()), REPLICATES);
        *want.entry((variant, group.to_string())).or_default() += 1.0;
    }
    let stats = envoy.admin().prometheus().await?;
    for variant in ["stable", "canary"] {
        let l = [("experiment", "t"), ("variant", variant)];
        let groups: Vec<_> = stats.find(REPLICATE_REQUESTS, &l).collect();
        assert_eq!(groups.len(), REPLICATES, "{variant}: one series per group");
        assert_eq!(
            stats.sum(REPLICATE_REQUESTS, &l),
            stats.sum(REQUESTS, &l),
            "{variant}: the groups add up to the requests"
        );
        for s in groups {
            let group = s.labels.get("replicate").cloned().unwrap_or_default();
            let expected = want
                .get(&(variant.to_string(), group.clone()))
                .copied()
                .unwrap_or(0.0);
            assert_eq!(s.value, expected, "{variant} group {group}");
        }
    }
    Ok(())
}
