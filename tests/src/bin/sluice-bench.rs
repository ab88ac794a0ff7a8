//! `sluice-bench`: the filter benchmark driver and its open-loop load generator.
//!
//! - `sluice-bench filter`: starts the benchmark upstream (`bench/envoy/upstream.yaml`) and one
//!   measured Envoy per case — (a) `proxy-none.yaml`, (b) `proxy-noop.yaml`, (c)
//!   `proxy-sluice.yaml`, (d) `proxy-lua.yaml` (the same assignment in a Lua filter), (e)
//!   `proxy-weighted.yaml` (Envoy's own `weighted_clusters` 90/10) — each with
//!   `--concurrency 1`; then, for several rounds, drives each case in turn (rotating the order)
//!   at a fixed request rate and records Envoy's CPU per request (schedstat, and utime+stime
//!   from `/proc/<pid>/stat`) and latency percentiles. Prints the medians and their ratios to
//!   case (a) as a Markdown table.
//! - `sluice-bench instructions`: instructions per request of each case, Envoy under valgrind's
//!   callgrind, with where they ran (see [`instructions`]).
//! - `sluice-bench load`: the load generator alone, against any URL.
//! - `sluice-bench shadow`: the cost of shadowing every request, Sluice's shadow against Envoy's
//!   native mirroring, and the primary's latency with a slow shadow (see [`shadow`]).
//! - `sluice-bench controller`: the controller's CPU per tick and peak RSS with many simulated
//!   Envoy admin endpoints and rollouts (see [`controller`]).
//! - `sluice-bench fanout`: push fan-out, decision → every proxy ACKed, for the ECDS file sink
//!   and the ecdsGrpc sink with real and simulated Envoys (see [`fanout`]).
//! - `sluice-bench decode`: decoding one Prometheus protobuf answer, the controller's
//!   hand-written reader against a prost baseline (see [`decode`]).
//! - `sluice-bench burst`: one request from each of N distinct users (closed loop, bounded
//!   concurrency) and the split of the answers by a response header — what `scripts/demo.sh`
//!   shows.
//!
//! The generator is open loop: request `i` is sent at `start + i/rate` whatever happened to the
//! previous ones (it never waits for a response before sending the next), so a slow Envoy cannot
//! slow the offered load down and hide its own stalls. Latency runs from the actual send to the
//! whole response; the generator's lag behind schedule is reported beside it. Every request
//! carries a distinct user id, because the Sluice filter's work depends on the key it hashes.
//!
//! On a machine with two or more cores the measured Envoys are pinned to CPU 1, and the upstream
//! Envoy and this process to CPU 0, so the generator never competes with what it measures.

use sluice_filter::metrics;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hyper::Method;
use sluice_tests::{noop_filter_wasm, Envoy, EnvoyConfig, HttpClient};

// The modes beyond the filter benchmark live beside this file (a binary's root resolves plain
// `mod` paths in src/bin/ itself, where Cargo would take every file for a binary of its own).
// The controller runs here as in `sluice`, with its allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "sluice-bench/controller.rs"]
mod controller;
#[path = "sluice-bench/decode.rs"]
mod decode;
#[path = "sluice-bench/fanout.rs"]
mod fanout;
#[path = "sluice-bench/instructions.rs"]
mod instructions;
#[path = "sluice-bench/promproto.rs"]
mod promproto;
#[path = "sluice-bench/shadow.rs"]
mod shadow;

#[derive(Parser)]
#[command(about = "Sluice filter benchmark and open-loop load generator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare Envoy CPU/request and latency: no filter, no-op wasm filter, Sluice filter, the
    /// same assignment in Lua, Envoy's weighted_clusters.
    Filter(FilterArgs),
    /// Send requests at a fixed rate to one URL and print latency percentiles.
    Load(LoadArgs),
    /// One request per distinct user; print how the answers split by a response header.
    Burst(BurstArgs),
    /// Shadow every request: Sluice's shadow against Envoy's native mirroring (CPU, saturation
    /// throughput) and the primary's latency with a 10x slower shadow.
    Shadow(shadow::ShadowArgs),
    /// Instructions per request of each filter case, counted by valgrind's callgrind in the
    /// measured Envoy (repeatable where CPU seconds are not), with where they ran.
    Instructions(instructions::InstructionsArgs),
    /// Controller cost: CPU per tick and peak RSS with many simulated Envoys and rollouts.
    Controller(controller::ControllerArgs),
    /// Push fan-out: decision → every proxy ACKed, for the ECDS file sink on one Envoy and the
    /// ecdsGrpc sink with 1 and 3 real Envoys and many simulated ones; controller memory per
    /// connected proxy.
    Fanout(fanout::FanoutArgs),
    /// Decoding one Prometheus protobuf answer: the controller's hand-written reader against a
    /// prost baseline, in alternating rounds.
    Decode(decode::DecodeArgs),
    /// (internal) The simulated xDS proxies of `fanout`.
    #[command(hide = true)]
    XdsClients(fanout::ClientsArgs),
    /// (internal) The simulated Envoy admin endpoints of `controller`.
    #[command(hide = true)]
    ServeStats(controller::ServeArgs),
    /// (internal) The controller side of `controller`, in its own process.
    #[command(hide = true)]
    ControllerRun(controller::RunArgs),
}

#[derive(Parser)]
struct BurstArgs {
    /// Target URL.
    #[arg(long, default_value = "http://127.0.0.1:10000/predict")]
    url: String,
    /// Distinct users (one request each).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Header carrying the user id.
    #[arg(long, default_value = "x-user-id")]
    user_header: String,
    /// Prefix of the user ids (`<prefix>0`, `<prefix>1`, ...).
    #[arg(long, default_value = "user-")]
    user_prefix: String,
    /// Response header to split the answers by.
    #[arg(long, default_value = "x-sluice-variant")]
    split_by: String,
    /// Top-level field of the JSON answer naming who answered (e.g. `model`), shown beside the
    /// header to check that each variant reached its own upstream.
    #[arg(long)]
    body_field: Option<String>,
}

#[derive(Parser, Clone)]
struct LoadArgs {
    /// Target URL.
    #[arg(long, default_value = "http://127.0.0.1:10000/predict")]
    url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Header carrying the user id.
    #[arg(long, default_value = "x-user-id")]
    user_header: String,
}

#[derive(Parser)]
struct FilterArgs {
    /// Measured rounds; each round runs every case once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Requests per second, below the saturation of one Envoy worker.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of measured load per case and round.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load before each measured run (connections, JIT, caches).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Cases to run, from: none, noop, sluice, breaker (Sluice with a data-plane breaker), lua,
    /// weighted.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,noop,sluice,lua,weighted"
    )]
    cases: Vec<String>,
}

fn main() -> Result<()> {
    // One thread is plenty for a few thousand requests per second on loopback, and keeps the
    // generator's own CPU use on the core it is pinned to.
    let current_thread = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the tokio runtime")
    };
    match Cli::parse().command {
        Cmd::Load(args) => current_thread()?.block_on(async {
            let client = HttpClient::new().with_timeout(Duration::from_secs(5));
            let run = open_loop(&client, &args, "load").await?;
            println!("{}", run.summary());
            Ok(())
        }),
        Cmd::Filter(args) => current_thread()?.block_on(filter_bench(args)),
        Cmd::Burst(args) => current_thread()?.block_on(burst(args)),
        Cmd::Shadow(args) => current_thread()?.block_on(shadow::run(args)),
        Cmd::Controller(args) => current_thread()?.block_on(controller::run(args)),
        Cmd::Instructions(args) => current_thread()?.block_on(instructions::run(args)),
        // No runtime: it only decodes in memory.
        Cmd::Decode(args) => decode::run(args),
        // These build their own (multi-threaded) runtimes.
        Cmd::Fanout(args) => fanout::run(args),
        Cmd::XdsClients(args) => fanout::clients(args),
        Cmd::ServeStats(args) => controller::serve(args),
        Cmd::ControllerRun(args) => controller::controller_run(args),
    }
}

async fn burst(args: BurstArgs) -> Result<()> {
    let prefix = args.user_prefix.clone();
    let started = std::time::Instant::now();
    let responses = sluice_tests::Load::new(&args.url)
        .requests(args.users)
        .concurrency(args.concurrency)
        .user_header(Some(&args.user_header))
        .users(move |i| format!("{prefix}{i}"))
        .run()
        .await?;
    let elapsed = started.elapsed();
    let split = sluice_tests::client::count_by(&responses, |r| {
        let header = r.header(&args.split_by).unwrap_or("<none>").to_string();
        match &args.body_field {
            None => header,
            Some(field) => {
                let body = r.json().ok().and_then(|v| v.get(field).cloned());
                let body = body.map_or("<none>".into(), |v| {
                    v.as_str().map_or(v.to_string(), str::to_string)
                });
                format!("{header:<10} → {field}={body}")
            }
        }
    });
    let statuses = sluice_tests::client::count_by(&responses, |r| r.status.to_string());
    println!(
        "{} requests from {} distinct users in {:.2}s; status codes {statuses:?}",
        responses.len(),
        args.users,
        elapsed.as_secs_f64()
    );
    match &args.body_field {
        None => println!("split by response header {}:", args.split_by),
        Some(f) => println!(
            "split by response header {} (→ answer's {f}):",
            args.split_by
        ),
    }
    for (value, n) in &split {
        println!(
            "  {value:<24} {n:>6}  {:5.1} %",
            100.0 * *n as f64 / responses.len().max(1) as f64
        );
    }
    Ok(())
}

/// What one open-loop run observed.
struct Run {
    sent: usize,
    ok: usize,
    failed: usize,
    elapsed: Duration,
    /// Worst delay between a request's due time and its actual send: the generator's own lag.
    max_lag: Duration,
    /// Latencies (send → whole response) of the 2xx responses, microseconds, sorted.
    latencies_us: Vec<u64>,
}

impl Run {
    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.latencies_us.len() as f64).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        self.latencies_us[rank - 1] as f64 / 1000.0
    }

    fn summary(&self) -> String {
        format!(
            "sent {} ok {} failed {} in {:.2}s ({:.0} req/s): p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms; generator lag max {:.1} ms",
            self.sent,
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.percentile_ms(0.5),
            self.percentile_ms(0.9),
            self.percentile_ms(0.99),
            self.percentile_ms(1.0),
            self.max_lag.as_secs_f64() * 1000.0,
        )
    }
}

/// Requests in flight beyond which the target is clearly saturated; further requests are counted
/// as failed instead of piling up.
const MAX_IN_FLIGHT: usize = 2000;

async fn open_loop(client: &HttpClient, args: &LoadArgs, tag: &str) -> Result<Run> {
    let total = (args.rate as f64 * args.duration).round() as usize;
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut latencies_us = Vec::with_capacity(total);
    let mut failed = 0;
    let mut max_lag_us = 0;
    let mut record = |joined: Result<Option<(u64, u64)>, tokio::task::JoinError>,
                      failed: &mut usize| match joined {
        Ok(Some((us, lag))) => {
            latencies_us.push(us);
            max_lag_us = max_lag_us.max(lag);
        }
        _ => *failed += 1,
    };
    let start = tokio::time::Instant::now() + Duration::from_millis(5);
    for i in 0..total {
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            failed += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let client = client.clone();
        let url = args.url.clone();
        let header = args.user_header.clone();
        let user = format!("{tag}-user-{i}");
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            // Latency is taken from the actual send, not from `due`: tokio's timer wakes up to a
            // millisecond late, a lag that would blur the differences between filters. The lag
            // is tracked separately so a generator that falls behind is noticed.
            let sent = tokio::time::Instant::now();
            let lag = sent.saturating_duration_since(due);
            let result = client
                .send(Method::GET, &url, &[(header.as_str(), user.as_str())], "")
                .await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let latency = sent.elapsed();
            match result {
                Ok(r) if (200..300).contains(&r.status) => {
                    Some((latency.as_micros() as u64, lag.as_micros() as u64))
                }
                _ => None,
            }
        });
        // Reap as we go so the set stays small.
        while let Some(joined) = tasks.try_join_next() {
            record(joined, &mut failed);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        record(joined, &mut failed);
    }
    let elapsed = start.elapsed();
    latencies_us.sort_unstable();
    Ok(Run {
        max_lag: Duration::from_micros(max_lag_us),
        sent: total,
        ok: latencies_us.len(),
        failed,
        elapsed,
        latencies_us,
    })
}

/// Total CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is parenthesised and may contain spaces: split after its ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/pid/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// CPU time of all threads of a process so far, in nanoseconds, from the scheduler's own
/// accounting (`/proc/<pid>/task/*/schedstat`, first field). Unlike utime+stime, which the kernel
/// samples at each clock tick (10 ms), this is exact; over a few thousand ticks the sampling error
/// of utime+stime is several per cent, as large as the effects we look for.
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may exit between listing and reading; it then contributes nothing.
        if let Ok(text) = std::fs::read_to_string(&path) {
            let ns: u64 = text
                .split_whitespace()
                .next()
                .context("empty schedstat")?
                .parse()
                .with_context(|| format!("parsing {}", path.display()))?;
            total += ns;
        }
    }
    Ok(total)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Pins every thread of `pid` to `cpu` (best effort: without taskset, or on one core, nothing).
fn pin(pid: u32, cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// One measured run of one case.
struct Measurement {
    /// From schedstat (exact).
    cpu_us_per_req: f64,
    /// From utime+stime in `/proc/<pid>/stat` (tick-sampled), as a cross-check.
    stat_us_per_req: f64,
    p50_ms: f64,
    p99_ms: f64,
    achieved_rps: f64,
    failed: usize,
}

struct Case {
    name: &'static str,
    label: &'static str,
    envoy: Envoy,
    results: Vec<Measurement>,
}

async fn filter_bench(args: FilterArgs) -> Result<()> {
    let tck = clock_ticks_per_second();
    pin(std::process::id(), 0);

    let upstream = EnvoyConfig::new("bench/envoy/upstream.yaml")
        .start()
        .await?;
    pin(upstream.pid(), 0);
    let model_port = upstream.port(18000);
    eprintln!(
        "[bench] upstream Envoy (direct_response) on port {model_port}, pid {}",
        upstream.pid()
    );

    let mut cases = Vec::new();
    for name in &args.cases {
        let (name, label, file): (&'static str, _, _) = match name.as_str() {
            "none" => ("none", "(a) no filter", "bench/envoy/proxy-none.yaml"),
            "noop" => ("noop", "(b) no-op wasm", "bench/envoy/proxy-noop.yaml"),
            "sluice" => ("sluice", "(c) Sluice", "bench/envoy/proxy-sluice.yaml"),
            "breaker" => (
                "breaker",
                "(c') + breaker",
                "bench/envoy/proxy-breaker.yaml",
            ),
            "lua" => ("lua", "(d) Lua hash", "bench/envoy/proxy-lua.yaml"),
            "weighted" => (
                "weighted",
                "(e) weighted_clusters",
                "bench/envoy/proxy-weighted.yaml",
            ),
            other => bail!("unknown case {other:?} (none, noop, sluice, breaker, lua, weighted)"),
        };
        if name == "noop" {
            noop_filter_wasm()?;
        }
        let envoy = match EnvoyConfig::new(file)
            .port_to(18000, model_port)
            .start()
            .await
        {
            Ok(e) => e,
            Err(sluice_tests::Error::WasmMissing { path, build })
                if name == "sluice" || name == "breaker" =>
            {
                eprintln!(
                    "[bench] skipping (c): {} not built (`{build}`)",
                    path.display()
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        pin(envoy.pid(), 1);
        eprintln!(
            "[bench] {label}: Envoy pid {} on port {}",
            envoy.pid(),
            envoy.port(10000)
        );
        cases.push(Case {
            name,
            label,
            envoy,
            results: Vec::new(),
        });
    }
    if cases.is_empty() {
        bail!("no case to run");
    }

    let client = HttpClient::new().with_timeout(Duration::from_secs(5));
    for round in 0..args.rounds {
        // Rotate the order so no case always runs right after the same other one.
        let n = cases.len();
        for k in 0..n {
            let case = &mut cases[(k + round) % n];
            let url = case.envoy.url(10000, "/predict");
            let warm = LoadArgs {
                url: url.clone(),
                rate: args.rate,
                duration: args.warmup,
                user_header: "x-user-id".into(),
            };
            open_loop(&client, &warm, &format!("warm{round}")).await?;
            let pid = case.envoy.pid();
            let before = cpu_ticks(pid)?;
            let before_ns = cpu_ns(pid)?;
            let run = open_loop(
                &client,
                &LoadArgs {
                    duration: args.duration,
                    ..warm
                },
                &format!("r{round}"),
            )
            .await?;
            let ticks = cpu_ticks(pid)? - before;
            let ns = cpu_ns(pid)? - before_ns;
            let m = Measurement {
                cpu_us_per_req: ns as f64 / 1e3 / run.ok.max(1) as f64,
                stat_us_per_req: ticks as f64 / tck * 1e6 / run.ok.max(1) as f64,
                p50_ms: run.percentile_ms(0.5),
                p99_ms: run.percentile_ms(0.99),
                achieved_rps: run.sent as f64 / run.elapsed.as_secs_f64(),
                failed: run.failed,
            };
            eprintln!(
                "[bench] round {} {:<15} cpu {:6.1} us/req (stat {:6.1})  p50 {:.3} ms  p99 {:.3} ms  {:.0} req/s  failed {}",
                round + 1,
                case.label,
                m.cpu_us_per_req,
                m.stat_us_per_req,
                m.p50_ms,
                m.p99_ms,
                m.achieved_rps,
                m.failed
            );
            case.results.push(m);
        }
    }

    // Sanity: the Sluice case must really have split traffic, or (c) measured nothing; and every
    // splitting case must have sent about 10 % to the canary cluster.
    for case in &cases {
        let prom = case.envoy.admin().prometheus().await?;
        if case.name == "sluice" || case.name == "breaker" {
            let split = prom.by_label(metrics::REQUESTS, "variant", &[]);
            eprintln!("[bench] Sluice split over the whole run: {split:?}");
            if split.values().sum::<f64>() <= 0.0 {
                bail!(
                    "the Sluice filter counted no requests; is its config accepted?\n{}",
                    case.envoy.log_tail(20)
                );
            }
        }
        let routed = prom.by_label("envoy_cluster_upstream_rq_total", "envoy_cluster_name", &[]);
        let canary = routed.get("canary").copied().unwrap_or(0.0);
        let share = canary / routed.values().sum::<f64>().max(1.0);
        eprintln!(
            "[bench] {}: routed {routed:?} ({:.1} % canary)",
            case.label,
            share * 100.0
        );
        if case.name != "none" && case.name != "noop" && !(0.08..0.12).contains(&share) {
            bail!(
                "{}: {:.1} % canary, expected 10 %",
                case.label,
                share * 100.0
            );
        }
    }

    print_table(&cases, &args);
    drop(upstream);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_table(cases: &[Case], args: &FilterArgs) {
    let baseline = cases.iter().find(|c| c.name == "none");
    // Two views of "vs (a)": the ratio of the medians, and the median of per-round ratios. The
    // second pairs each run with the baseline run of the same round (minutes apart at most), so
    // slow drifts in what else the machine is doing cancel out.
    let ratios = |c: &Case, f: fn(&Measurement) -> f64| -> String {
        let Some(base) = baseline else {
            return "-".into();
        };
        let of_medians = median(c.results.iter().map(f).collect())
            / median(base.results.iter().map(f).collect());
        let paired = median(
            c.results
                .iter()
                .zip(&base.results)
                .map(|(m, b)| f(m) / f(b))
                .collect(),
        );
        format!("{of_medians:.2}x ({paired:.2}x)")
    };
    println!(
        "\n{} rounds x {} s at {} req/s per case, Envoy --concurrency 1; medians over rounds; \
         CPU from schedstat, utime+stime as a cross-check; \
         ratios: of the medians (median of per-round ratios).\n",
        args.rounds, args.duration, args.rate
    );
    println!(
        "| case | CPU µs/request | CPU vs (a) | utime+stime vs (a) | p50 ms | p99 ms | p99 vs (a) | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        println!(
            "| {} | {:.1} | {} | {} | {:.3} | {:.3} | {} | {} |",
            c.label,
            median(c.results.iter().map(|m| m.cpu_us_per_req).collect()),
            ratios(c, |m| m.cpu_us_per_req),
            ratios(c, |m| m.stat_us_per_req),
            median(c.results.iter().map(|m| m.p50_ms).collect()),
            median(c.results.iter().map(|m| m.p99_ms).collect()),
            ratios(c, |m| m.p99_ms),
            c.results.iter().map(|m| m.failed).sum::<usize>()
        );
    }
    // The breaker's own cost: (c') − (c) per round, as a fraction of (a) in the same round.
    let by_name = |n: &str| cases.iter().find(|c| c.name == n);
    if let (Some(base), Some(on), Some(off)) = (baseline, by_name("breaker"), by_name("sluice")) {
        let deltas: Vec<f64> = on
            .results
            .iter()
            .zip(&off.results)
            .map(|(a, b)| a.cpu_us_per_req - b.cpu_us_per_req)
            .collect();
        let fractions: Vec<f64> = deltas
            .iter()
            .zip(&base.results)
            .map(|(d, b)| d / b.cpu_us_per_req)
            .collect();
        println!(
            "\nBreaker bookkeeping, (c') − (c): {:.2} µs/request median over rounds, {:.3}x of (a) \
             (median of per-round fractions; per round: {})",
            median(deltas.clone()),
            median(fractions.clone()),
            fractions
                .iter()
                .map(|f| format!("{f:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("\nPer round (CPU µs/request; p99 ms):\n");
    for c in cases {
        let cells: Vec<String> = c
            .results
            .iter()
            .map(|m| format!("{:.1}; {:.3}", m.cpu_us_per_req, m.p99_ms))
            .collect();
        println!("- {}: {}", c.label, cells.join(" | "));
    }
}
