//! `sluice-bench shadow`: what copying every request to a shadow costs, with the Sluice filter's
//! own shadowing against Envoy's native `request_mirror_policies`.
//!
//! Three measured Envoys (`--concurrency 1`, pinned to CPU 1) run the same Sluice filter config
//! (assignment 90/10, outcomes, prediction) and differ only in shadowing:
//!
//! - `off`: no shadow (`bench/envoy/shadow-off.yaml`);
//! - `native`: the routes mirror every request to the cluster `shadow`
//!   (`bench/envoy/shadow-native.yaml`); Envoy discards the shadow's answer;
//! - `sluice`: the filter's shadow at `sample_percent: 100`, comparing status, body and one JSON
//!   field (`bench/envoy/shadow-sluice.yaml`).
//!
//! Two parts, each with its own set of Envoys:
//!
//! - `cost`: primary and shadow answer at once. Per case and round: an open-loop run at a fixed
//!   rate (Envoy CPU per request from schedstat → requests per Envoy CPU-second; latency), then
//!   a closed-loop run with many connections sending back to back, which saturates the one
//!   Envoy worker (requests per second, and how busy Envoy's core was, to show whether Envoy was
//!   the bottleneck rather than the generator or the upstreams).
//! - `latency`: the primary answers after 2 ms and the shadow after 20 ms (fault filter on the
//!   upstream Envoys). Per case and round: an open-loop run at a fixed rate; the primary's p50 and
//!   p99 as the client sees them. One more case here, `off-loaded`: `off` while the driver sends
//!   the shadow upstream the load the shadowing cases give it. The shadow service shares a core
//!   with the client and the primary on a small machine, and this baseline holds that equal, so
//!   that only the measured Envoy's work for the copies differs.
//!
//! After each part the driver reads every measured Envoy's cluster stats and checks that the
//! shadowing cases really copied (nearly) every request, and that `off` copied none.

use sluice_filter::metrics;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use hyper::Method;
use sluice_tests::{Envoy, EnvoyConfig, HttpClient};

use super::{cpu_ns, median, open_loop, pin, LoadArgs};

#[derive(Parser)]
pub struct ShadowArgs {
    /// Measured rounds per part; each round runs every case once, the order rotating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Requests per second of the open-loop runs of the cost part, one run per rate.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    rates: Vec<u32>,
    /// Requests per second of the open-loop runs of the latency part.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// Seconds of measured open-loop load per case and round.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load before each measured run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds of closed-loop (saturating) load per case and round in the cost part; 0 skips it.
    #[arg(long, default_value_t = 5.0)]
    saturate: f64,
    /// Connections of the closed-loop runs, each sending its next request as soon as the
    /// previous one is answered.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Cases, from: off, off-loaded (off while the driver loads the shadow upstream directly at
    /// the same rate; latency part only), native, sluice, sluice-status (the shadow comparing
    /// statuses only), sluice-b (see `--wasm-b`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "off,off-loaded,native,sluice"
    )]
    cases: Vec<String>,
    /// Parts, from: cost, latency.
    #[arg(long, value_delimiter = ',', default_value = "cost,latency")]
    parts: Vec<String>,
    /// Another build of the Sluice filter (e.g. before a change): adds the case `sluice-b`,
    /// `sluice` with this wasm file.
    #[arg(long)]
    wasm_b: Option<std::path::PathBuf>,
}

/// A measured case: name, label, config file, an optional literal replacement in it, and
/// whether the driver itself sends the shadow upstream as many requests as the primary gets.
struct CaseSpec {
    name: &'static str,
    label: &'static str,
    file: &'static str,
    replace: Option<(&'static str, &'static str)>,
    side_load: bool,
}

/// The comparison block of `shadow-sluice.yaml`, replaced in the `sluice-status` case.
const COMPARE: &str = r#""compare": {
                                    "body": true,
                                    "fields": [{"name": "score", "pointer": "/score", "type": "number", "abs_tolerance": 0.01}]
                                  }"#;

const CASES: [CaseSpec; 6] = [
    CaseSpec {
        name: "off",
        label: "off (no shadow)",
        file: "bench/envoy/shadow-off.yaml",
        replace: None,
        side_load: false,
    },
    CaseSpec {
        name: "native",
        label: "native mirror 100 %",
        file: "bench/envoy/shadow-native.yaml",
        replace: None,
        side_load: false,
    },
    CaseSpec {
        name: "sluice",
        label: "Sluice shadow 100 %",
        file: "bench/envoy/shadow-sluice.yaml",
        replace: None,
        side_load: false,
    },
    // Latency part only: `off` while the driver sends the shadow upstream the same load the
    // shadowing cases make it answer. On a machine where the shadow service shares cores with
    // the client and the primary, this is the baseline that holds everything equal but the
    // measured Envoy's own work for the copies.
    CaseSpec {
        name: "off-loaded",
        label: "off, shadow loaded directly",
        file: "bench/envoy/shadow-off.yaml",
        replace: None,
        side_load: true,
    },
    // Not run by default: the same shadow comparing the status only, which spares reading both
    // bodies and parsing JSON; the difference to `sluice` is what the comparison costs.
    CaseSpec {
        name: "sluice-status",
        label: "Sluice shadow, status only",
        file: "bench/envoy/shadow-sluice.yaml",
        replace: Some((COMPARE, r#""compare": {"body": false}"#)),
        side_load: false,
    },
    // Added by `--wasm-b`.
    CaseSpec {
        name: "sluice-b",
        label: "Sluice shadow 100 %, build B",
        file: "bench/envoy/shadow-sluice.yaml",
        replace: None,
        side_load: false,
    },
];

/// Ports of `bench/envoy/shadow-upstream.yaml`: (primary, shadow) for each part.
const FAST: (u16, u16) = (18000, 18001);
const SLOW: (u16, u16) = (18002, 18003);

/// One open-loop run.
#[derive(Default, Clone)]
struct Open {
    cpu_us_per_req: f64,
    /// CPU of the other core's users (both upstream Envoys, this driver) per primary request.
    other_core_us_per_req: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// One round of one case.
#[derive(Default, Clone)]
struct Sample {
    /// One run per rate of the part.
    open: Vec<Open>,
    failed: usize,
    /// Closed loop: answered requests per second, Envoy's CPU use (cores), CPU per request,
    /// and the CPU use of the two upstream Envoys and of this process (the other core's load).
    sat_rps: f64,
    sat_cores: f64,
    sat_cpu_us_per_req: f64,
    sat_upstream_cores: f64,
    sat_driver_cores: f64,
}

struct Case {
    name: &'static str,
    label: &'static str,
    side_load: bool,
    envoy: Envoy,
    samples: Vec<Sample>,
}

pub async fn run(args: ShadowArgs) -> Result<()> {
    pin(std::process::id(), 0);
    let mut args = args;
    if args.wasm_b.is_some() && !args.cases.iter().any(|c| c == "sluice-b") {
        args.cases.push("sluice-b".into());
    }
    for name in &args.cases {
        if !CASES.iter().any(|c| c.name == name) {
            bail!(
                "unknown case {name:?} (off, off-loaded, native, sluice, sluice-status, sluice-b)"
            );
        }
        if name == "sluice-b" && args.wasm_b.is_none() {
            bail!("case sluice-b needs --wasm-b");
        }
    }
    // Two upstream Envoys from the same file: one answers the primaries, the other the copies,
    // as two services would; one process for both would queue each primary behind its copy.
    let mut upstreams = Vec::new();
    for role in ["primary", "shadow"] {
        let up = EnvoyConfig::new("bench/envoy/shadow-upstream.yaml")
            .start()
            .await?;
        pin(up.pid(), 0);
        eprintln!("[shadow] {role} upstream Envoy pid {}", up.pid());
        upstreams.push(up);
    }
    let upstreams = (&upstreams[0], &upstreams[1]);
    println!(
        "\nsluice-bench shadow: {} rounds per part; open-loop runs of {} s (after {} s warm-up), \
         closed-loop runs of {} s with {} connections; Envoy --concurrency 1; medians over rounds; \
         ratios: of the medians (median of per-round ratios).",
        args.rounds, args.duration, args.warmup, args.saturate, args.connections
    );
    for part in &args.parts {
        let (ports, rates, saturate) = match part.as_str() {
            "cost" => (FAST, args.rates.clone(), args.saturate),
            "latency" => (SLOW, vec![args.latency_rate], 0.0),
            other => bail!("unknown part {other:?} (cost, latency)"),
        };
        let mut cases = start_cases(&args, upstreams, ports, part == "latency").await?;
        let upstream_pids = [upstreams.0.pid(), upstreams.1.pid()];
        let shadow_url = upstreams.1.url(ports.1, "/predict");
        run_rounds(
            &args,
            part,
            &mut cases,
            &rates,
            saturate,
            upstream_pids,
            &shadow_url,
        )
        .await?;
        let copies = check_copies(&cases).await?;
        match part.as_str() {
            "cost" => print_cost(&cases, &copies, &rates, saturate > 0.0),
            _ => print_latency(&cases, &copies, rates[0]),
        }
    }
    Ok(())
}

async fn start_cases(
    args: &ShadowArgs,
    upstreams: (&Envoy, &Envoy),
    ports: (u16, u16),
    side_loads: bool,
) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for spec in &CASES {
        // A side load changes nothing the cost part measures (the measured Envoy's CPU).
        if !args.cases.iter().any(|c| c == spec.name) || (spec.side_load && !side_loads) {
            continue;
        }
        let mut config = EnvoyConfig::new(spec.file)
            .port_to(FAST.0, upstreams.0.port(ports.0))
            .port_to(FAST.1, upstreams.1.port(ports.1));
        if let Some((from, to)) = spec.replace {
            config = config.replace(from, to);
        }
        if spec.name == "sluice-b" {
            if let Some(wasm) = &args.wasm_b {
                config = config.wasm(wasm);
            }
        }
        let envoy = config.start().await?;
        let (name, label) = (spec.name, spec.label);
        pin(envoy.pid(), 1);
        eprintln!("[shadow] {label}: Envoy pid {}", envoy.pid());
        cases.push(Case {
            name,
            label,
            side_load: spec.side_load,
            envoy,
            samples: Vec::new(),
        });
    }
    Ok(cases)
}

async fn run_rounds(
    args: &ShadowArgs,
    part: &str,
    cases: &mut [Case],
    rates: &[u32],
    saturate: f64,
    upstream_pids: [u32; 2],
    shadow_url: &str,
) -> Result<()> {
    let client = HttpClient::new().with_timeout(Duration::from_secs(5));
    let n = cases.len();
    for round in 0..args.rounds {
        for k in 0..n {
            let case = &mut cases[(k + round) % n];
            let url = case.envoy.url(10000, "/predict");
            let pid = case.envoy.pid();
            let side = case.side_load.then_some(shadow_url);
            let mut s = Sample::default();
            for &rate in rates {
                let load = LoadArgs {
                    url: url.clone(),
                    rate,
                    duration: args.warmup,
                    user_header: "x-user-id".into(),
                };
                loaded(&client, &load, side, &format!("{part}-w{round}-{rate}")).await?;
                let pids = [pid, upstream_pids[0], upstream_pids[1], std::process::id()];
                let before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect::<Result<_>>()?;
                let (run, side_failed) = loaded(
                    &client,
                    &LoadArgs {
                        duration: args.duration,
                        ..load
                    },
                    side,
                    &format!("{part}-r{round}-{rate}"),
                )
                .await?;
                s.failed += side_failed;
                let us: Vec<f64> = pids
                    .iter()
                    .zip(&before)
                    .map(|(p, b)| Ok((cpu_ns(*p)? - b) as f64 / 1e3 / run.ok.max(1) as f64))
                    .collect::<Result<_>>()?;
                let o = Open {
                    cpu_us_per_req: us[0],
                    other_core_us_per_req: us[1] + us[2] + us[3],
                    p50_ms: run.percentile_ms(0.5),
                    p99_ms: run.percentile_ms(0.99),
                };
                eprintln!(
                    "[shadow] {part} round {} {:<28} {rate:>5} req/s: cpu {:6.1} us/req (other core {:5.1})  p50 {:.3} ms  p99 {:.3} ms  failed {}",
                    round + 1,
                    case.label,
                    o.cpu_us_per_req,
                    o.other_core_us_per_req,
                    o.p50_ms,
                    o.p99_ms,
                    run.failed
                );
                s.failed += run.failed;
                s.open.push(o);
            }
            if saturate > 0.0 {
                let pids = [pid, upstream_pids[0], upstream_pids[1], std::process::id()];
                let before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect::<Result<_>>()?;
                let sat = closed_loop(
                    &client,
                    &url,
                    args.connections,
                    saturate,
                    &format!("{part}-s{round}"),
                )
                .await;
                let used: Vec<f64> = pids
                    .iter()
                    .zip(&before)
                    .map(|(p, b)| Ok((cpu_ns(*p)? - b) as f64 / 1e9))
                    .collect::<Result<_>>()?;
                let wall = sat.elapsed.as_secs_f64();
                s.sat_rps = sat.ok as f64 / wall;
                s.sat_cores = used[0] / wall;
                s.sat_cpu_us_per_req = used[0] * 1e6 / sat.ok.max(1) as f64;
                s.sat_upstream_cores = (used[1] + used[2]) / wall;
                s.sat_driver_cores = used[3] / wall;
                s.failed += sat.failed;
                eprintln!(
                    "[shadow] {part} round {} {:<28} closed loop: {:.0} req/s, Envoy {:.2} cores ({:.1} us/req), upstreams {:.2}, driver {:.2}, failed {}",
                    round + 1,
                    case.label,
                    s.sat_rps,
                    s.sat_cores,
                    s.sat_cpu_us_per_req,
                    s.sat_upstream_cores,
                    s.sat_driver_cores,
                    sat.failed
                );
            }
            case.samples.push(s);
        }
    }
    Ok(())
}

/// An open-loop run of `load`; with `side`, the same load goes to that URL at the same time.
/// Returns the run against `load.url`, and how many of the side requests failed.
async fn loaded(
    client: &HttpClient,
    load: &LoadArgs,
    side: Option<&str>,
    tag: &str,
) -> Result<(super::Run, usize)> {
    let Some(url) = side else {
        return Ok((open_loop(client, load, tag).await?, 0));
    };
    let side_load = LoadArgs {
        url: url.to_string(),
        rate: load.rate,
        duration: load.duration,
        user_header: load.user_header.clone(),
    };
    let side_tag = format!("{tag}-side");
    let (run, side_run) = tokio::join!(
        open_loop(client, load, tag),
        open_loop(client, &side_load, &side_tag)
    );
    Ok((run?, side_run?.failed))
}

struct Closed {
    ok: usize,
    failed: usize,
    elapsed: Duration,
}

/// `connections` loops, each sending a request as soon as its previous one is answered, for
/// `seconds`. Every request carries a distinct user id.
async fn closed_loop(
    client: &HttpClient,
    url: &str,
    connections: usize,
    seconds: f64,
    tag: &str,
) -> Closed {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (client, url, stop, ok, failed) = (
            client.clone(),
            url.to_string(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        let tag = format!("{tag}-c{c}");
        tasks.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("{tag}-{i}");
                i += 1;
                let r = client
                    .send(Method::GET, &url, &[("x-user-id", user.as_str())], "")
                    .await;
                match r {
                    Ok(r) if (200..300).contains(&r.status) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    Closed {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

/// What each measured Envoy sent over the whole part: requests to the primary clusters, copies
/// to the shadow cluster, and for the Sluice case what the filter counted.
struct Copies {
    primary: f64,
    shadow: f64,
    note: String,
}

async fn check_copies(cases: &[Case]) -> Result<Vec<Copies>> {
    // Copies still in flight when the last run ended land within the shadow's timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut out = Vec::new();
    for case in cases {
        let prom = case.envoy.admin().prometheus().await?;
        let rq = |cluster: &str| {
            prom.sum(
                "envoy_cluster_upstream_rq_total",
                &[("envoy_cluster_name", cluster)],
            )
        };
        let primary = rq("stable") + rq("canary");
        let shadow = rq("shadow");
        let shadow_cx = prom.sum(
            "envoy_cluster_upstream_cx_total",
            &[("envoy_cluster_name", "shadow")],
        );
        let mut note = String::new();
        if case.name.starts_with("sluice") {
            let exp = [("experiment", "bench")];
            let sent = prom.sum(metrics::SHADOW_REQUESTS, &exp);
            let compared = prom.sum(metrics::SHADOW_COMPARED, &exp);
            let skipped = prom.by_label(metrics::SHADOW_SKIPPED, "reason", &exp);
            let agree = prom.by_label(metrics::SHADOW_AGREE, "field", &exp);
            note = format!(
                "filter: {sent} copies sent, {compared} compared, agreeing by field {agree:?}, skipped {skipped:?}"
            );
            if compared <= 0.0 {
                bail!(
                    "the Sluice filter compared no shadow answers\n{}",
                    case.envoy.log_tail(20)
                );
            }
        }
        let share = shadow / primary.max(1.0);
        eprintln!(
            "[shadow] {}: {primary} primary requests, {shadow} copies ({:.2} %) over {shadow_cx} connections {note}",
            case.label,
            share * 100.0
        );
        let expected_share = if case.name.starts_with("off") {
            0.0
        } else {
            1.0
        };
        if (share - expected_share).abs() > 0.01 {
            bail!(
                "{}: copied {:.2} % of the requests, expected {:.0} %",
                case.label,
                share * 100.0,
                expected_share * 100.0
            );
        }
        out.push(Copies {
            primary,
            shadow,
            note,
        });
    }
    Ok(out)
}

/// "ratio of medians (median of per-round ratios)" of `f` for `case` against `base`.
fn ratio(case: &Case, base: Option<&Case>, f: impl Fn(&Sample) -> f64) -> String {
    let Some(base) = base else {
        return "-".into();
    };
    let of_medians = median(case.samples.iter().map(&f).collect())
        / median(base.samples.iter().map(&f).collect());
    let paired = median(
        case.samples
            .iter()
            .zip(&base.samples)
            .map(|(c, b)| f(c) / f(b))
            .collect(),
    );
    format!("{of_medians:.2}x ({paired:.2}x)")
}

fn med(case: &Case, f: impl Fn(&Sample) -> f64) -> f64 {
    median(case.samples.iter().map(f).collect())
}

fn find<'a>(cases: &'a [Case], name: &str) -> Option<&'a Case> {
    cases.iter().find(|c| c.name == name)
}

/// Field `f` of the open-loop run at rate index `i` (NaN if missing).
fn at(i: usize, f: fn(&Open) -> f64) -> impl Fn(&Sample) -> f64 {
    move |s| s.open.get(i).map_or(f64::NAN, f)
}

fn cpu(o: &Open) -> f64 {
    o.cpu_us_per_req
}

fn per_cpu_second(o: &Open) -> f64 {
    1e6 / o.cpu_us_per_req
}

fn p50(o: &Open) -> f64 {
    o.p50_ms
}

fn p99(o: &Open) -> f64 {
    o.p99_ms
}

fn print_notes(cases: &[Case], copies: &[Copies]) {
    println!();
    for (c, k) in cases.iter().zip(copies) {
        println!(
            "- {}: {:.0} primary requests, {:.0} copies at the shadow cluster{}{}",
            c.label,
            k.primary,
            k.shadow,
            if k.note.is_empty() { "" } else { "; " },
            k.note
        );
    }
}

fn print_cost(cases: &[Case], copies: &[Copies], rates: &[u32], saturated: bool) {
    let off = find(cases, "off");
    let native = find(cases, "native");
    println!("\n### cost: primary and shadow answer at once\n");
    println!(
        "| case | rate req/s | CPU µs/request | CPU vs off | req per Envoy CPU-s | vs native | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, rate) in rates.iter().enumerate() {
        for c in cases {
            println!(
                "| {} | {rate} | {:.1} | {} | {:.0} | {} | {:.3} | {:.3} |",
                c.label,
                med(c, at(i, cpu)),
                ratio(c, off, at(i, cpu)),
                med(c, at(i, per_cpu_second)),
                ratio(c, native, at(i, per_cpu_second)),
                med(c, at(i, p50)),
                med(c, at(i, p99)),
            );
        }
    }
    if saturated {
        println!(
            "\nClosed loop: answered req/s, the measured Envoy's CPU use in cores (1.00 = its whole \
             core), its CPU per request, and the other core's users (the upstream Envoys, this \
             driver).\n"
        );
        println!(
            "| case | req/s | vs native | vs off | Envoy cores | CPU µs/request | upstream cores | driver cores |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for c in cases {
            println!(
                "| {} | {:.0} | {} | {} | {:.2} | {:.1} | {:.2} | {:.2} |",
                c.label,
                med(c, |s| s.sat_rps),
                ratio(c, native, |s| s.sat_rps),
                ratio(c, off, |s| s.sat_rps),
                med(c, |s| s.sat_cores),
                med(c, |s| s.sat_cpu_us_per_req),
                med(c, |s| s.sat_upstream_cores),
                med(c, |s| s.sat_driver_cores),
            );
        }
    }
    println!("\nPer round (CPU µs/request at each rate; closed-loop req/s):\n");
    for c in cases {
        let cells: Vec<String> = c
            .samples
            .iter()
            .map(|s| {
                let cpus: Vec<String> = s
                    .open
                    .iter()
                    .map(|o| format!("{:.1}", o.cpu_us_per_req))
                    .collect();
                format!("{}; {:.0}", cpus.join(", "), s.sat_rps)
            })
            .collect();
        println!("- {}: {}", c.label, cells.join(" · "));
    }
    print_notes(cases, copies);
    let failed: usize = cases
        .iter()
        .flat_map(|c| &c.samples)
        .map(|s| s.failed)
        .sum();
    println!("\nFailed requests over the part: {failed}");
}

fn print_latency(cases: &[Case], copies: &[Copies], rate: u32) {
    let off = find(cases, "off");
    let loaded = find(cases, "off-loaded");
    println!(
        "\n### latency: primary answers after 2 ms, shadow after 20 ms; {rate} req/s open loop\n"
    );
    println!(
        "Other core: the CPU of both upstream Envoys and of this driver (which sends the side \
         load of `off-loaded` too), per primary request.\n"
    );
    println!(
        "| case | p50 ms | p99 ms | p99 vs off | p99 vs off, shadow loaded directly | p50 vs off | CPU µs/request | other core µs/request | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        println!(
            "| {} | {:.3} | {:.3} | {} | {} | {} | {:.1} | {:.1} | {} |",
            c.label,
            med(c, at(0, p50)),
            med(c, at(0, p99)),
            ratio(c, off, at(0, p99)),
            ratio(c, loaded, at(0, p99)),
            ratio(c, off, at(0, p50)),
            med(c, at(0, cpu)),
            med(c, at(0, |o| o.other_core_us_per_req)),
            c.samples.iter().map(|s| s.failed).sum::<usize>(),
        );
    }
    println!("\nPer round (p50 ms; p99 ms):\n");
    for c in cases {
        let cells: Vec<String> = c
            .samples
            .iter()
            .map(|s| format!("{:.3}; {:.3}", at(0, p50)(s), at(0, p99)(s)))
            .collect();
        println!("- {}: {}", c.label, cells.join(" · "));
    }
    print_notes(cases, copies);
}
