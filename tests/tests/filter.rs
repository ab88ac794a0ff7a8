//! The Sluice filter in a real Envoy: split, stickiness, spoofing, overrides, counters,
//! invalid configuration, and weight changes through the ECDS file.
//!
//! Expected assignments are computed with the filter crate's own config and assignment code
//! (natively), so these tests also prove that the controller side and the wasm filter agree on
//! who is in which variant.

use sluice_filter::metrics;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_filter::config::{FilterConfig, Plan};
use sluice_filter::request::variant_of_key;
use sluice_tests::client::count_by_header;
use sluice_tests::{
    repo_root, validate, wait_until, Envoy, EnvoyConfig, HttpClient, Load, Reply, Request, Samples,
    Upstream,
};

const LISTENER: u16 = 10000;
const STABLE: u16 = 10001;
const CANARY: u16 = 10002;
const SHADOW: u16 = 10003;
const FIXTURE: &str = "tests/envoy/upstreams.yaml";

/// The fixture with `config` as the filter configuration and our upstreams behind it.
pub async fn start_fixture(
    config: &Value,
    stable: &Upstream,
    canary_port: u16,
    shadow_port: u16,
) -> anyhow::Result<Envoy> {
    Ok(EnvoyConfig::new(FIXTURE)
        .port_to(STABLE, stable.port())
        .port_to(CANARY, canary_port)
        .port_to(SHADOW, shadow_port)
        .replace(
            &sluice_tests::inline_filter_config(FIXTURE)?,
            &config.to_string(),
        )
        .start()
        .await?)
}

/// The filter configuration embedded in a shipped Envoy YAML (`value: |` block).
fn embedded_config(yaml: &str) -> anyhow::Result<FilterConfig> {
    let text = std::fs::read_to_string(repo_root().join(yaml))?;
    let start = text
        .find("value: |")
        .ok_or_else(|| anyhow::anyhow!("{yaml}: no `value: |` block"))?;
    let block: String = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("- name:"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(serde_json::from_str(&block)?)
}

fn plan_of(config: &FilterConfig) -> anyhow::Result<Plan> {
    Plan::from_config(config).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Whether `observed` successes out of `n` are within 4.5 standard deviations of weight `p`.
/// The hash is deterministic, so this never flakes; the bound says what "the split is right"
/// means for a given sample size.
fn within_binomial(observed: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - mean).abs() <= 4.5 * sd.max(1.0)
}

fn sluice(samples: &Samples, name: &str, experiment: &str, variant: &str) -> f64 {
    samples.sum(name, &[("experiment", experiment), ("variant", variant)])
}

fn user_upstream_config(weight: f64, extra: Value) -> Value {
    let mut exp = json!({
        "name": "t",
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": weight}],
        "echo": {"header": "x-sluice-variant"},
    });
    if let (Some(e), Some(x)) = (exp.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            e.insert(k.clone(), v.clone());
        }
    }
    json!({"version": 1, "experiments": [exp]})
}

async fn named(name: &'static str) -> anyhow::Result<Upstream> {
    Ok(Upstream::start(name, move |_req: &Request| {
        Reply::json(json!({ "model": name })).header("x-upstream", name)
    })
    .await?)
}

#[test]
fn every_shipped_envoy_yaml_validates() -> anyhow::Result<()> {
    let mut checked = 0;
    for dir in ["envoy", "tests/envoy"] {
        for entry in std::fs::read_dir(repo_root().join(dir))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                let rel = path.strip_prefix(repo_root())?.to_path_buf();
                let text = std::fs::read_to_string(&path)?;
                // Configs that watch an ECDS directory are validated with a copy of it.
                let result = match text.find("watched_directory: { path: ") {
                    Some(i) => {
                        let dir = text[i + 27..].split(' ').next().unwrap_or_default();
                        EnvoyConfig::new(&rel).ecds(dir).validate()
                    }
                    None => validate(&rel),
                };
                result.map_err(|e| anyhow::anyhow!("{}: {e}", rel.display()))?;
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "found only {checked} YAML files");
    Ok(())
}

/// The shipped example as a user runs it: split, stickiness, spoofing, echo, missing keys,
/// event beacons, all checked user by user against the filter crate's assignment.
#[tokio::test]
async fn demo_splits_sticks_ignores_spoofing_and_attributes_events() -> anyhow::Result<()> {
    let config = embedded_config("envoy/demo.yaml")?;
    let plan = plan_of(&config)?;
    let exp = &plan.experiments[0];
    let envoy = EnvoyConfig::new("envoy/demo.yaml").start().await?;
    let url = envoy.url(LISTENER, "/predict");

    // 10,000 distinct users, every one claiming to be in the canary.
    let n = 10_000;
    let responses = Load::new(&url)
        .requests(n)
        .header("x-sluice-variant", "canary")
        .run()
        .await?;
    let mut canary = 0;
    for r in &responses {
        let want = &exp.variants[variant_of_key(exp, r.user.as_bytes())];
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-sluice-variant"),
            Some(want.as_str()),
            "echo for {}",
            r.user
        );
        assert_eq!(
            r.json()?["model"],
            want.as_str(),
            "served model for {}",
            r.user
        );
        canary += usize::from(want == "canary");
    }
    assert!(
        within_binomial(canary, n, 0.10),
        "{canary} of {n} in a 10 % canary"
    );

    // The same users again, twice: nobody moves.
    for _ in 0..2 {
        let again = Load::new(&url).requests(2000).run().await?;
        for (r, first) in again.iter().zip(&responses) {
            assert_eq!(
                r.header("x-sluice-variant"),
                first.header("x-sluice-variant")
            );
        }
    }

    // No user key: the control, counted as such.
    let keyless = Load::new(&url)
        .requests(100)
        .user_header(None)
        .run()
        .await?;
    assert!(keyless
        .iter()
        .all(|r| r.header("x-sluice-variant") == Some("stable")));

    // Event beacons: each carries back the exposure token of the user's answer and is
    // attributed to the variant that served it (the key as a query parameter here).
    let client = HttpClient::new();
    let mut clicks: BTreeMap<String, f64> = BTreeMap::new();
    let beacon_users = 300;
    for i in 0..beacon_users {
        let user = format!("user-{i}");
        let exposed = client
            .get(&envoy.url(LISTENER, &format!("/predict?user={user}")))
            .await?;
        let token = exposed
            .header("x-sluice-exposure")
            .ok_or_else(|| anyhow::anyhow!("no exposure token for {user}"))?
            .to_string();
        let path = format!("/sluice/event?name=click&user={user}");
        let r = client
            .send(
                hyper::Method::POST,
                &envoy.url(LISTENER, &path),
                &[("x-sluice-exposure", token.as_str())],
                Vec::<u8>::new(),
            )
            .await?;
        assert_eq!(r.status, 204, "beacon for {user}: {}", r.text());
        *clicks
            .entry(exp.variants[variant_of_key(exp, user.as_bytes())].clone())
            .or_default() += 1.0;
    }
    let bad = [
        ("POST", "/sluice/event?name=bogus&user=u", 400),
        ("POST", "/sluice/event?user=u", 400),
        ("POST", "/sluice/event?name=click", 400),
        ("POST", "/sluice/event?name=click&user=u", 403),
        ("GET", "/sluice/event?name=click&user=u", 405),
        ("PUT", "/sluice/event?name=click&user=u", 405),
    ];
    for (method, path, status) in bad {
        let m = hyper::Method::from_bytes(method.as_bytes())?;
        let r = client
            .send(m, &envoy.url(LISTENER, path), &[], Vec::<u8>::new())
            .await?;
        assert_eq!(r.status, status, "{method} {path}");
    }

    let total_requests = n + 2 * 2000 + 100 + beacon_users;
    let stats = envoy.admin().prometheus().await?;
    let requests = stats.by_label(metrics::REQUESTS, "variant", &[("experiment", "demo")]);
    assert_eq!(requests.values().sum::<f64>(), total_requests as f64);
    let canary_requests = canary as f64
        + responses[..2000]
            .iter()
            .filter(|r| r.header("x-sluice-variant") == Some("canary"))
            .count() as f64
            * 2.0
        + clicks.get("canary").copied().unwrap_or(0.0);
    assert_eq!(requests.get("canary").copied(), Some(canary_requests));
    assert_eq!(
        sluice(&stats, metrics::MISSING_KEY, "demo", "stable"),
        100.0
    );
    assert_eq!(sluice(&stats, metrics::MISSING_KEY, "demo", "canary"), 0.0);
    for (variant, want) in &clicks {
        let got = stats.sum(
            metrics::OUTCOMES,
            &[
                ("experiment", "demo"),
                ("variant", variant),
                ("outcome", "click"),
            ],
        );
        assert_eq!(got, *want, "clicks for {variant}");
    }
    assert_eq!(
        stats.sum(metrics::EVENTS_REJECTED, &[("experiment", "demo")]),
        bad.len() as f64
    );
    assert_eq!(stats.sum(metrics::ERRORS, &[]), 0.0);
    Ok(())
}

const SECRET: &str = "beacon-test-secret-0123456789abcdef";

/// Forged beacons are refused and counted by reason; a beacon with the token of a real
/// exposure counts once per event, up to the per-user limit.
#[tokio::test]
async fn forged_beacons_are_refused_and_counted_by_reason() -> anyhow::Result<()> {
    let stable = named("stable").await?;
    let canary = named("canary").await?;
    let mut config = user_upstream_config(
        50.0,
        json!({
            "outcomes": {"names": ["click", "purchase"]},
            "beacon": {"path": "/sluice/event", "max_age_seconds": 600, "token_cookie": "sluice_exposure",
                       "limit": {"events_per_user": 3, "window_seconds": 3600}},
        }),
    );
    config["secret"] = json!(SECRET);
    let plan =
        Plan::from_json(config.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exp = &plan.experiments[0];
    let envoy = start_fixture(&config, &stable, canary.port(), SHADOW).await?;
    let client = HttpClient::new();
    let user_in = |variant: usize, skip: usize| -> String {
        (0..)
            .map(|i| format!("user-{i}"))
            .filter(|u| variant_of_key(exp, u.as_bytes()) == variant)
            .nth(skip)
            .unwrap_or_default()
    };
    let expose = |user: String| {
        let (client, url) = (client.clone(), envoy.url(LISTENER, "/predict"));
        async move {
            let r = client
                .send(
                    hyper::Method::GET,
                    &url,
                    &[("x-user-id", user.as_str())],
                    Vec::<u8>::new(),
                )
                .await?;
            let token = r.header("x-sluice-exposure").map(str::to_string);
            let cookie = r.header("set-cookie").map(str::to_string);
            anyhow::Ok((r, token.unwrap_or_default(), cookie.unwrap_or_default()))
        }
    };
    let beacon =
        |method: &'static str, query: &'static str, headers: Vec<(&'static str, String)>| {
            let (client, url) = (
                client.clone(),
                envoy.url(LISTENER, &format!("/sluice/event?{query}")),
            );
            async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let r = client
                    .send(
                        hyper::Method::from_bytes(method.as_bytes())?,
                        &url,
                        &h,
                        Vec::<u8>::new(),
                    )
                    .await?;
                anyhow::Ok(r.status)
            }
        };

    let alice = user_in(1, 0);
    let (r, token, cookie) = expose(alice.clone()).await?;
    assert_eq!(r.header("x-sluice-variant"), Some("canary"));
    assert!(token.starts_with("1.t.canary."), "token {token:?}");
    assert!(
        cookie.starts_with(&format!(
            "sluice_exposure={token}; Path=/sluice/event; Max-Age=600; HttpOnly; SameSite=Strict"
        )),
        "cookie {cookie:?}"
    );
    let bob = user_in(1, 1);
    let (_, bob_token, _) = expose(bob.clone()).await?;
    let carol = user_in(0, 0);
    let (_, carol_token, _) = expose(carol.clone()).await?;
    assert!(carol_token.starts_with("1.t.stable."), "{carol_token}");

    let key =
        sluice_filter::mac::Key::derive(SECRET.as_bytes(), sluice_filter::mac::PURPOSE_EXPOSURE);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let issue = |exp: &str, user: &str, variant: &str, at: u64| {
        sluice_filter::beacon::issue(&key, exp, user.as_bytes(), variant, at)
    };
    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped)?;
    let user = |u: &str| ("x-user-id", u.to_string());
    let tok = |t: &str| ("x-sluice-exposure", t.to_string());

    let refused = [
        ("no token", "POST", vec![user(&alice)], 403, "no_token"),
        (
            "bad MAC",
            "POST",
            vec![user(&alice), tok(&flipped)],
            403,
            "bad_mac",
        ),
        (
            "another user's token",
            "POST",
            vec![user(&alice), tok(&bob_token)],
            403,
            "bad_mac",
        ),
        (
            "the variant edited",
            "POST",
            vec![
                user(&carol),
                tok(&carol_token.replacen(".stable.", ".canary.", 1)),
            ],
            403,
            "bad_mac",
        ),
        (
            "another experiment's token",
            "POST",
            vec![user(&alice), tok(&issue("other", &alice, "canary", now))],
            403,
            "no_token",
        ),
        (
            "the experiment edited",
            "POST",
            vec![
                user(&alice),
                tok(&issue("other", &alice, "canary", now).replacen(".other.", ".t.", 1)),
            ],
            403,
            "bad_mac",
        ),
        (
            "another secret",
            "POST",
            vec![
                user(&alice),
                tok(&sluice_filter::beacon::issue(
                    &sluice_filter::mac::Key::derive(b"some-other-secret-0123456789", "exposure"),
                    "t",
                    alice.as_bytes(),
                    "canary",
                    now,
                )),
            ],
            403,
            "bad_mac",
        ),
        (
            "expired",
            "POST",
            vec![user(&alice), tok(&issue("t", &alice, "canary", now - 601))],
            403,
            "expired",
        ),
        (
            "not a token",
            "POST",
            vec![user(&alice), tok("garbage")],
            403,
            "malformed",
        ),
        (
            "a variant the user is not in",
            "POST",
            vec![user(&carol), tok(&issue("t", &carol, "canary", now))],
            409,
            "reassigned",
        ),
        (
            "GET when POST only",
            "GET",
            vec![user(&alice), tok(&token)],
            405,
            "method",
        ),
    ];
    for (what, method, headers, status, _) in &refused {
        let got = beacon(method, "name=purchase", headers.clone()).await?;
        assert_eq!(got, *status, "{what}");
    }

    // The real token counts, by header, by query parameter and by cookie, up to the limit.
    assert_eq!(
        beacon("POST", "name=click", vec![user(&alice), tok(&token)]).await?,
        204
    );
    let by_query: &'static str = Box::leak(format!("name=click&exposure={token}").into_boxed_str());
    assert_eq!(beacon("POST", by_query, vec![user(&alice)]).await?, 204);
    assert_eq!(
        beacon(
            "POST",
            "name=purchase",
            vec![user(&alice), ("cookie", format!("sluice_exposure={token}"))]
        )
        .await?,
        204
    );
    assert_eq!(
        beacon("POST", "name=click", vec![user(&alice), tok(&token)]).await?,
        429,
        "over the limit"
    );
    // Another user has their own budget; a control user's events count for the control.
    assert_eq!(
        beacon("POST", "name=click", vec![user(&bob), tok(&bob_token)]).await?,
        204
    );
    assert_eq!(
        beacon("POST", "name=click", vec![user(&carol), tok(&carol_token)]).await?,
        204
    );

    // The flood that moved a canary's purchases per request from 1.9 % to 206 %: 2,000 forged
    // purchase beacons for 2,000 users, none of whom was exposed.
    let forged = format!("1.t.canary.{now}.{}", "0".repeat(32));
    let flood = Load::new(envoy.url(LISTENER, "/sluice/event?name=purchase"))
        .method(hyper::Method::POST)
        .requests(2000)
        .header("x-sluice-exposure", &forged)
        .run()
        .await?;
    assert!(
        flood.iter().all(|r| r.status == 403),
        "a forged beacon was accepted"
    );

    let stats = envoy.admin().prometheus().await?;
    let rejected = |reason: &str| {
        stats.sum(
            metrics::EVENTS_REJECTED,
            &[("experiment", "t"), ("reason", reason)],
        )
    };
    let mut want: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, _, _, _, reason) in &refused {
        *want.entry(reason).or_default() += 1.0;
    }
    *want.entry("over_limit").or_default() += 1.0;
    *want.entry("bad_mac").or_default() += 2000.0;
    for (reason, n) in &want {
        assert_eq!(rejected(reason), *n, "rejected for {reason}");
    }
    assert_eq!(
        stats.sum(metrics::EVENTS_REJECTED, &[("experiment", "t")]),
        want.values().sum::<f64>()
    );
    let outcome = |variant: &str, o: &str| {
        stats.sum(
            metrics::OUTCOMES,
            &[("experiment", "t"), ("variant", variant), ("outcome", o)],
        )
    };
    assert_eq!(outcome("canary", "click"), 3.0);
    assert_eq!(
        outcome("canary", "purchase"),
        1.0,
        "only the cookie's purchase"
    );
    assert_eq!(outcome("stable", "click"), 1.0);
    assert_eq!(outcome("stable", "purchase"), 0.0);
    assert_eq!(sluice(&stats, metrics::EVENTS, "t", "canary"), 4.0);
    assert_eq!(stats.sum(metrics::ERRORS, &[]), 0.0);
    Ok(())
}

/// Two experiments on one beacon path: the answer carries one token per experiment, the
/// beacon carries both back (comma-separated), and each experiment counts the event for its
/// own variant.
#[tokio::test]
async fn one_beacon_counts_for_every_experiment_whose_token_it_carries() -> anyhow::Result<()> {
    let stable = named("stable").await?;
    let canary = named("canary").await?;
    let experiment = |name: &str, header: &str| {
        json!({
            "name": name,
            "header": header,
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
            "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 50}],
            "outcomes": {"names": ["click"]},
            "beacon": {"path": "/sluice/event"},
        })
    };
    let config = json!({
        "version": 1,
        "secret": SECRET,
        "experiments": [experiment("a", "x-sluice-variant"), experiment("b", "x-sluice-b")],
    });
    let plan =
        Plan::from_json(config.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let envoy = start_fixture(&config, &stable, canary.port(), SHADOW).await?;
    let client = HttpClient::new();
    let users = 40;
    let mut want: BTreeMap<(String, String), f64> = BTreeMap::new();
    for i in 0..users {
        let user = format!("user-{i}");
        let r = client
            .send(
                hyper::Method::GET,
                &envoy.url(LISTENER, "/predict"),
                &[("x-user-id", user.as_str())],
                Vec::<u8>::new(),
            )
            .await?;
        let tokens: Vec<&str> = r
            .headers
            .get_all("x-sluice-exposure")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(tokens.len(), 2, "{user}: {tokens:?}");
        let joined = tokens.join(", ");
        let b = client
            .send(
                hyper::Method::POST,
                &envoy.url(LISTENER, "/sluice/event?name=click"),
                &[
                    ("x-user-id", user.as_str()),
                    ("x-sluice-exposure", joined.as_str()),
                ],
                Vec::<u8>::new(),
            )
            .await?;
        assert_eq!(b.status, 204, "{user}");
        for e in &plan.experiments {
            let v = &e.variants[variant_of_key(e, user.as_bytes())];
            *want.entry((e.name.clone(), v.clone())).or_default() += 1.0;
        }
    }
    // Only experiment a's token: a counts, b refuses.
    let r = client
        .send(
            hyper::Method::GET,
            &envoy.url(LISTENER, "/predict"),
            &[("x-user-id", "solo")],
            Vec::<u8>::new(),
        )
        .await?;
    let only_a = r
        .headers
        .get_all("x-sluice-exposure")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|t| t.starts_with("1.a."))
        .unwrap_or_default()
        .to_string();
    let b = client
        .send(
            hyper::Method::POST,
            &envoy.url(LISTENER, "/sluice/event?name=click"),
            &[
                ("x-user-id", "solo"),
                ("x-sluice-exposure", only_a.as_str()),
            ],
            Vec::<u8>::new(),
        )
        .await?;
    assert_eq!(b.status, 204);
    let a = &plan.experiments[0];
    *want
        .entry(("a".into(), a.variants[variant_of_key(a, b"solo")].clone()))
        .or_default() += 1.0;

    let stats = envoy.admin().prometheus().await?;
    for ((e, v), n) in &want {
        assert_eq!(sluice(&stats, metrics::EVENTS, e, v), *n, "{e}/{v}");
    }
    assert_eq!(
        stats.sum(
            metrics::EVENTS_REJECTED,
            &[("experiment", "b"), ("reason", "no_token")]
        ),
        1.0
    );
    assert_eq!(
        stats.sum(metrics::EVENTS_REJECTED, &[("experiment", "a")]),
        0.0
    );
    Ok(())
}

/// The ECDS example's file with `config` as the filter configuration.
fn ecds_with(config: &Value) -> anyhow::Result<String> {
    let original = std::fs::read_to_string(repo_root().join("envoy/ecds/sluice.yaml"))?;
    let head = original
        .split_once("value: |\n")
        .map(|(h, _)| h)
        .ok_or_else(|| anyhow::anyhow!("envoy/ecds/sluice.yaml: no `value: |` block"))?;
    Ok(format!("{head}value: |\n            {config}\n"))
}

/// A push (every stage change of a rollout pushes) does not refill users' event budgets.
#[tokio::test]
async fn the_per_user_limit_survives_a_config_push() -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("envoy/ecds.yaml")
        .ecds("envoy/ecds")
        .start()
        .await?;
    let success = "extension_config_discovery.http_filter.sluice.update_success";
    let admin = envoy.admin();
    let push = |revision: &str, weight: f64| -> anyhow::Result<()> {
        let mut config = user_upstream_config(
            weight,
            json!({
                "name": "demo",
                "outcomes": {"names": ["click"]},
                "beacon": {"path": "/sluice/event", "limit": {"events_per_user": 2}},
            }),
        );
        config["secret"] = json!(SECRET);
        config["revision"] = json!(revision);
        envoy.write_ecds("sluice.yaml", &ecds_with(&config)?)?;
        Ok(())
    };
    let pushed = |n: u64| async move {
        wait_until(Duration::from_secs(5), "the push is taken", || async {
            admin.stat(success).await.ok().flatten().unwrap_or(0) >= n
        })
        .await
    };
    let ok0 = admin.stat(success).await?.unwrap_or(0);
    push("a", 10.0)?;
    pushed(ok0 + 1).await?;

    let client = HttpClient::new();
    let exposed = client
        .send(
            hyper::Method::GET,
            &envoy.url(LISTENER, "/"),
            &[("x-user-id", "alice")],
            Vec::<u8>::new(),
        )
        .await?;
    let token = exposed
        .header("x-sluice-exposure")
        .ok_or_else(|| anyhow::anyhow!("no exposure token"))?
        .to_string();
    let click = || async {
        let r = client
            .send(
                hyper::Method::POST,
                &envoy.url(LISTENER, "/sluice/event?name=click"),
                &[
                    ("x-user-id", "alice"),
                    ("x-sluice-exposure", token.as_str()),
                ],
                Vec::<u8>::new(),
            )
            .await?;
        anyhow::Ok(r.status)
    };
    assert_eq!(click().await?, 204);
    // A push that changes nothing but the revision, then one that changes a weight.
    push("b", 10.0)?;
    pushed(ok0 + 2).await?;
    assert_eq!(click().await?, 204);
    push("c", 11.0)?;
    pushed(ok0 + 3).await?;
    assert_eq!(click().await?, 429, "the budget was refilled by a push");
    Ok(())
}

#[tokio::test]
async fn split_matches_the_weight_at_several_weights() -> anyhow::Result<()> {
    let (stable, canary) = (named("stable").await?, named("canary").await?);
    let n = 10_000;
    for weight in [1.0, 25.0, 50.0] {
        let config = user_upstream_config(weight, json!({}));
        let envoy = start_fixture(&config, &stable, canary.port(), canary.port()).await?;
        let before = canary.count();
        let responses = Load::new(envoy.url(LISTENER, "/"))
            .requests(n)
            .run()
            .await?;
        let served = (canary.count() - before) as usize;
        let echoed = count_by_header(&responses, "x-sluice-variant");
        assert_eq!(echoed.get("canary").copied().unwrap_or(0), served);
        assert!(
            within_binomial(served, n, weight / 100.0),
            "{served} of {n} users in a {weight} % canary"
        );
        // And user by user, as the shared assignment code says.
        let plan = plan_of(&serde_json::from_value(config)?)?;
        let exp = &plan.experiments[0];
        for r in &responses {
            let want = &exp.variants[variant_of_key(exp, r.user.as_bytes())];
            assert_eq!(r.header("x-sluice-variant"), Some(want.as_str()));
        }
    }
    Ok(())
}

/// Status classes, latency, outcomes and predictions in `/stats/prometheus` match what the
/// clients saw, per variant.
#[tokio::test]
async fn counters_match_the_traffic() -> anyhow::Result<()> {
    fn behaviour(name: &'static str, delay_ms: u64) -> impl Fn(&Request) -> Reply + Send + Sync {
        move |req: &Request| {
            let i: u64 = req
                .user()
                .and_then(|u| u.strip_prefix("user-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let status = match i % 20 {
                1 => 503,
                2 => 404,
                3 => 302,
                _ => 200,
            };
            let mut outcomes = Vec::new();
            if i.is_multiple_of(5) {
                outcomes.push("click");
            }
            if i.is_multiple_of(7) {
                outcomes.push("purchase");
            }
            if i.is_multiple_of(11) {
                outcomes.push("bogus");
            }
            let mut reply = Reply::json(json!({ "model": name }))
                .with_status(status)
                .delay(Duration::from_millis(delay_ms))
                .header("x-model-score", &format!("{}", (i % 100) as f64 / 100.0));
            if !outcomes.is_empty() {
                reply = reply.header("x-sluice-outcome", &outcomes.join(","));
            }
            reply
        }
    }
    let stable = Upstream::start("stable", behaviour("stable", 0)).await?;
    let canary = Upstream::start("canary", behaviour("canary", 25)).await?;
    let config = user_upstream_config(
        30.0,
        json!({
            "outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},
            "prediction": {"header": "x-model-score", "scale": 1000},
        }),
    );
    let envoy = start_fixture(&config, &stable, canary.port(), canary.port()).await?;
    let n = 4000;
    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .requests(n)
        .run()
        .await?;

    #[derive(Default, Debug)]
    struct Seen {
        requests: f64,
        classes: BTreeMap<String, f64>,
        click: f64,
        purchase: f64,
        unknown: f64,
        score_sum: f64,
    }
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for r in &responses {
        let variant = r.header("x-sluice-variant").unwrap_or("?").to_string();
        let s = seen.entry(variant).or_default();
        s.requests += 1.0;
        *s.classes
            .entry(format!("{}xx", r.status / 100))
            .or_default() += 1.0;
        let outcome = r.header("x-sluice-outcome").unwrap_or("");
        s.click += f64::from(u8::from(outcome.contains("click")));
        s.purchase += f64::from(u8::from(outcome.contains("purchase")));
        s.unknown += f64::from(u8::from(outcome.contains("bogus")));
        s.score_sum += r
            .header("x-model-score")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    assert_eq!(seen.len(), 2, "both variants served: {:?}", seen.keys());

    // Histograms arrive at the next stats flush (1 s in the fixture).
    let admin = envoy.admin();
    wait_until(
        Duration::from_secs(10),
        "latency histograms flushed",
        || async {
            let stats = admin.prometheus().await.unwrap_or_default();
            ["stable", "canary"].iter().all(|v| {
                stats
                    .histogram(metrics::LATENCY, &[("experiment", "t"), ("variant", v)])
                    .is_some_and(|h| h.count == seen[*v].requests)
            })
        },
    )
    .await?;
    let stats = admin.prometheus().await?;
    let mut unknown_total = 0.0;
    for (variant, s) in &seen {
        let l = [("experiment", "t"), ("variant", variant.as_str())];
        assert_eq!(stats.sum(metrics::REQUESTS, &l), s.requests, "{variant}");
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let got = stats.sum(metrics::RESPONSES, &[l[0], l[1], ("class", class)]);
            assert_eq!(
                got,
                s.classes.get(class).copied().unwrap_or(0.0),
                "{variant} {class}"
            );
        }
        for (outcome, want) in [("click", s.click), ("purchase", s.purchase)] {
            let got = stats.sum(metrics::OUTCOMES, &[l[0], l[1], ("outcome", outcome)]);
            assert_eq!(got, want, "{variant} {outcome}");
        }
        unknown_total += s.unknown;
        let prediction = stats
            .histogram(metrics::PREDICTION, &l)
            .ok_or_else(|| anyhow::anyhow!("no prediction histogram for {variant}"))?;
        assert_eq!(prediction.count, s.requests);
        // Envoy's histogram sums are approximate (log-linear bins): a few percent.
        let want_sum = s.score_sum * 1000.0;
        assert!(
            (prediction.sum - want_sum).abs() <= 0.05 * want_sum,
            "{variant}: prediction sum {} vs {want_sum}",
            prediction.sum
        );
        assert_eq!(stats.sum(metrics::LOCAL_REPLIES, &l), 0.0);
    }
    assert_eq!(
        stats.sum(metrics::OUTCOMES_UNKNOWN, &[("experiment", "t")]),
        unknown_total
    );
    let latency = |v: &str| {
        stats
            .histogram(metrics::LATENCY, &[("experiment", "t"), ("variant", v)])
            .and_then(|h| h.quantile(0.5))
            .unwrap_or(f64::NAN)
    };
    assert!(
        latency("canary") >= 20.0,
        "canary p50 {} ms (it sleeps 25 ms)",
        latency("canary")
    );
    // Relative to the canary's, not a fixed bound: a loaded machine slows both variants alike,
    // and the 25 ms the canary sleeps is what the histogram must tell apart.
    assert!(
        latency("stable") < latency("canary") - 10.0,
        "stable p50 {} ms against the canary's {} ms",
        latency("stable"),
        latency("canary")
    );
    Ok(())
}

/// An unreachable canary: Envoy answers 503 itself; the filter counts local replies and resets.
#[tokio::test]
async fn envoy_local_replies_and_upstream_resets_are_counted() -> anyhow::Result<()> {
    let stable = named("stable").await?;
    let closed = sluice_tests::free_port()?; // nothing listens here
    let config = user_upstream_config(50.0, json!({}));
    let envoy = start_fixture(&config, &stable, closed, closed).await?;
    let responses = Load::new(envoy.url(LISTENER, "/"))
        .requests(400)
        .run()
        .await?;
    let failed: Vec<_> = responses
        .iter()
        .filter(|r| r.header("x-sluice-variant") == Some("canary"))
        .collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|r| r.status == 503));
    let stats = envoy.admin().prometheus().await?;
    let n = failed.len() as f64;
    assert_eq!(sluice(&stats, metrics::LOCAL_REPLIES, "t", "canary"), n);
    assert_eq!(sluice(&stats, metrics::UPSTREAM_RESETS, "t", "canary"), n);
    assert_eq!(sluice(&stats, metrics::LOCAL_REPLIES, "t", "stable"), 0.0);
    assert_eq!(
        stats.sum(
            metrics::RESPONSES,
            &[("experiment", "t"), ("variant", "canary"), ("class", "5xx")]
        ),
        n
    );
    Ok(())
}

#[tokio::test]
async fn override_needs_the_token_and_stays_out_of_the_counts() -> anyhow::Result<()> {
    let (stable, canary) = (named("stable").await?, named("canary").await?);
    let token = "qa-token-0123456789";
    let config = user_upstream_config(
        0.0,
        json!({"override": {"token": token},
               "echo": {"header": "x-sluice-variant", "cookie": "sluice_t", "cookie_max_age_seconds": 600}}),
    );
    let envoy = start_fixture(&config, &stable, canary.port(), canary.port()).await?;
    let url = envoy.url(LISTENER, "/");
    let with = |t: &str| {
        Load::new(&url)
            .requests(50)
            .header("x-sluice-override", "canary")
            .header("x-sluice-override-token", t)
    };
    let granted = with(token).run().await?;
    assert!(granted
        .iter()
        .all(|r| r.json().ok().map(|j| j["model"] == "canary") == Some(true)));
    // The exposure echo reports what served the request, in the header and the cookie.
    assert!(granted
        .iter()
        .all(|r| r.header("x-sluice-variant") == Some("canary")
            && r.header("set-cookie")
                == Some("sluice_t=canary; Path=/; SameSite=Lax; Max-Age=600")));
    let denied = with("wrong-token-000000000").run().await?;
    assert!(denied
        .iter()
        .all(|r| r.json().ok().map(|j| j["model"] == "stable") == Some(true)));
    let stats = envoy.admin().prometheus().await?;
    assert_eq!(sluice(&stats, metrics::OVERRIDES, "t", "canary"), 50.0);
    assert_eq!(sluice(&stats, metrics::REQUESTS, "t", "canary"), 0.0);
    assert_eq!(sluice(&stats, metrics::REQUESTS, "t", "stable"), 50.0);
    assert_eq!(
        stats.sum(metrics::OVERRIDES_DENIED, &[("experiment", "t")]),
        50.0
    );
    Ok(())
}

/// Without a secret no shadow marker can be trusted: a client's `x-sluice-shadow` never
/// reaches the upstream, and its requests are routed and counted like any other.
#[tokio::test]
async fn a_client_marker_is_stripped_without_a_secret() -> anyhow::Result<()> {
    let (stable, canary) = (named("stable").await?, named("canary").await?);
    let config = user_upstream_config(0.0, json!({}));
    let envoy = start_fixture(&config, &stable, canary.port(), canary.port()).await?;
    let url = envoy.url(LISTENER, "/");
    let answered = Load::new(&url)
        .requests(20)
        .header("x-sluice-shadow", "1")
        .run()
        .await?;
    assert!(answered.iter().all(|r| r.status == 200));
    let seen = stable.requests();
    assert_eq!(seen.len(), 20);
    assert!(
        seen.iter().all(|r| r.header("x-sluice-shadow").is_none()),
        "a client's marker reached the upstream"
    );
    let stats = envoy.admin().prometheus().await?;
    assert_eq!(sluice(&stats, metrics::REQUESTS, "t", "stable"), 20.0);
    Ok(())
}

/// A config the filter rejects keeps Envoy from loading it, with the field named in the log.
#[test]
fn invalid_static_config_is_rejected_naming_the_field() -> anyhow::Result<()> {
    let bad = user_upstream_config(150.0, json!({}));
    let result = EnvoyConfig::new(FIXTURE)
        .replace(
            &sluice_tests::inline_filter_config(FIXTURE)?,
            &bad.to_string(),
        )
        .validate();
    let err = match result {
        Ok(()) => anyhow::bail!("Envoy accepted a 150 % weight"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("experiments[0].variants[1].weight: 150 is not a percentage"),
        "{err}"
    );
    Ok(())
}

/// ECDS: new weights apply within 2 s without a restart, move users only from control into
/// the canary, and a rejected config leaves the last good one serving.
#[tokio::test]
async fn ecds_weight_changes_are_fast_monotone_and_safe() -> anyhow::Result<()> {
    let envoy = EnvoyConfig::new("envoy/ecds.yaml")
        .ecds("envoy/ecds")
        .start()
        .await?;
    let url = envoy.url(LISTENER, "/");
    let n = 3000;
    let variants = |rs: &[sluice_tests::Response]| -> Vec<String> {
        rs.iter()
            .map(|r| r.header("x-sluice-variant").unwrap_or("?").to_string())
            .collect()
    };
    let before = variants(&Load::new(&url).requests(n).run().await?);
    let canary_before = before.iter().filter(|v| *v == "canary").count();
    assert!(
        within_binomial(canary_before, n, 0.01),
        "{canary_before} at 1 %"
    );

    let original = std::fs::read_to_string(repo_root().join("envoy/ecds/sluice.yaml"))?;
    let raised = original.replace(r#""weight": 1}"#, r#""weight": 25}"#);
    assert_ne!(raised, original, "the ECDS file's canary weight is 1");
    let success = "extension_config_discovery.http_filter.sluice.update_success";
    let rejected = "extension_config_discovery.http_filter.sluice.update_rejected";
    let ok0 = envoy.admin().stat(success).await?.unwrap_or(0);

    let pushed = Instant::now();
    envoy.write_ecds("sluice.yaml", &raised)?;
    // Applied = a user who moves shows up in the canary.
    let mover = (0..n)
        .find(|&i| before[i] == "stable" && variant_after_weight(25.0, i))
        .ok_or_else(|| anyhow::anyhow!("no user moves at 25 %"))?;
    let client = HttpClient::new();
    let mover_id = format!("user-{mover}");
    wait_until(Duration::from_secs(2), "the new weight serves", || async {
        client
            .send(
                hyper::Method::GET,
                &url,
                &[("x-user-id", mover_id.as_str())],
                Vec::<u8>::new(),
            )
            .await
            .ok()
            .and_then(|r| r.header("x-sluice-variant").map(|v| v == "canary"))
            .unwrap_or(false)
    })
    .await?;
    let took = pushed.elapsed();
    eprintln!("ECDS push applied after {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    assert_eq!(envoy.admin().stat(success).await?.unwrap_or(0), ok0 + 1);

    let after = variants(&Load::new(&url).requests(n).run().await?);
    let mut moved = 0;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            !(b == "canary" && a != "canary"),
            "user-{i} left the canary"
        );
        moved += usize::from(b == "stable" && a == "canary");
    }
    assert!(
        within_binomial(moved, n, 0.24),
        "{moved} moved from 1 % to 25 %"
    );

    // An invalid config is rejected and the 25 % config keeps serving.
    let r0 = envoy.admin().stat(rejected).await?.unwrap_or(0);
    envoy.write_ecds(
        "sluice.yaml",
        &original.replace(r#""weight": 1}"#, r#""weight": 150}"#),
    )?;
    let admin = envoy.admin();
    wait_until(
        Duration::from_secs(5),
        "the invalid config is rejected",
        || async { admin.stat(rejected).await.ok().flatten().unwrap_or(0) > r0 },
    )
    .await?;
    let still = variants(&Load::new(&url).requests(n).run().await?);
    assert_eq!(still, after, "assignments changed after a rejected push");
    assert!(envoy
        .log()
        .contains("experiments[0].variants[1].weight: 150 is not a percentage"));

    // A config that would hurt traffic (the routing header overwriting the user key, so the
    // upstream would get `x-user-id: stable`) is rejected the same way.
    let r1 = envoy.admin().stat(rejected).await?.unwrap_or(0);
    let hurtful = raised.replace(
        r#""echo": {"header": "x-sluice-variant"}"#,
        r#""header": "x-user-id", "echo": {"header": "x-sluice-variant"}"#,
    );
    assert_ne!(hurtful, raised);
    envoy.write_ecds("sluice.yaml", &hurtful)?;
    wait_until(
        Duration::from_secs(5),
        "the hurtful config is rejected",
        || async { admin.stat(rejected).await.ok().flatten().unwrap_or(0) > r1 },
    )
    .await?;
    let still = variants(&Load::new(&url).requests(n).run().await?);
    assert_eq!(still, after, "assignments changed after a rejected push");
    assert!(envoy.log().contains(
        "experiments[0].header: routing header \"x-user-id\" is a header this experiment reads"
    ));
    // Counters survived the reloads.
    let stats = envoy.admin().prometheus().await?;
    let total: f64 = stats
        .by_label(metrics::REQUESTS, "variant", &[("experiment", "demo")])
        .values()
        .sum();
    assert!(
        total >= (3 * n) as f64,
        "requests counted across reloads: {total}"
    );
    Ok(())
}

/// Whether `user-{i}` is in the canary of the ECDS example at `weight`.
fn variant_after_weight(weight: f64, i: usize) -> bool {
    let text =
        std::fs::read_to_string(repo_root().join("envoy/ecds/sluice.yaml")).unwrap_or_default();
    let json: String = text
        .split("value: |")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let Ok(config) = serde_json::from_str::<FilterConfig>(&json) else {
        return false;
    };
    let Ok(raised) = config.with_weights("demo", &[("canary".into(), weight)]) else {
        return false;
    };
    let Ok(plan) = Plan::from_config(&raised) else {
        return false;
    };
    let exp = &plan.experiments[0];
    exp.variants[variant_of_key(exp, format!("user-{i}").as_bytes())] == "canary"
}
