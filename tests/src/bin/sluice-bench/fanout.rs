//! `sluice-bench fanout`: how long a push takes from the controller's decision until every proxy
//! has ACKed it, and what each connected proxy costs the controller in memory.
//!
//! The controller side runs in this process: the same sink code `sluice run` uses (the
//! `ecdsGrpc` sink on its server, or the `ecdsFile` sink), with the controller's allocator. A
//! push is timed from the call of `Sink::push` — the moment the daemon has decided and rendered
//! a new weight — until it returns confirmed: for `ecdsGrpc`, when every connected proxy has
//! ACKed the version and at least all N are connected; for `ecdsFile`, when the Envoy's admin
//! shows the new version in force. Weights alternate between two values, so every push changes
//! what Envoy routes; pushes are spaced by `--gap-ms` and the first `--warmup` are not counted.
//!
//! Cases:
//! - `file1`: the ECDS file sink on one real Envoy (`envoy/ecds.yaml`), the baseline;
//! - `envoy1`, `envoy3`: `ecdsGrpc` with 1 and 3 real Envoys (`envoy/fleet/envoy.yaml`, each
//!   its own node id); `envoy1` then restarts its Envoy `--restarts` times and times how long
//!   it serves the default config: from admin `/ready` saying LIVE until the controller's
//!   config is in force (the shipped bootstrap serves without waiting for the controller);
//! - `sim`: `ecdsGrpc` with `--clients` simulated Envoys (`xds-clients`, a child process holding
//!   one stream per client, each on its own connection, ACKing like Envoy; see
//!   `sluice_tests::xds`). This process's resident memory is read before they connect and once
//!   all of them hold the first config: the difference divided by the clients is the
//!   controller's memory per connected proxy. At the end the child reports how many pushes its
//!   clients ACKed, which must be all of them.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sluice_controller::sink::ecds_file::{EcdsFile, WasmCode};
use sluice_controller::sink::ecds_grpc::{EcdsGrpc, Servers};
use sluice_controller::sink::Sink;
use sluice_controller::source::admin::Admin;
use sluice_filter::config::FilterConfig;
use sluice_tests::xds::{accept_decodable, channel, Identity, XdsClient};
use sluice_tests::{filter_wasm, free_port, Envoy, EnvoyConfig};
use tokio::sync::watch;

#[derive(Parser)]
pub struct FanoutArgs {
    /// Cases to run, from: file1, envoy1, envoy3, sim.
    #[arg(long, value_delimiter = ',', default_value = "file1,envoy1,envoy3,sim")]
    cases: Vec<String>,
    /// Simulated proxies of the `sim` case.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Measured pushes per case.
    #[arg(long, default_value_t = 100)]
    pushes: usize,
    /// Pushes before the measured ones (first config load, connections).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Pause between pushes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// `envoy1`: restarts of the Envoy, each timed from LIVE until the config is in force.
    #[arg(long, default_value_t = 10)]
    restarts: usize,
}

#[derive(Parser)]
pub struct ClientsArgs {
    /// The ECDS server, host:port.
    #[arg(long)]
    connect: String,
    /// Number of simulated proxies.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// The resource they subscribe to.
    #[arg(long, default_value = "sluice")]
    resource: String,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
}

/// One case's result.
struct Row {
    case: String,
    proxies: usize,
    latencies_ms: Vec<f64>,
    per_proxy_kib: Option<f64>,
    note: String,
}

pub fn run(args: FanoutArgs) -> Result<()> {
    // The daemon's runtime (one thread, mimalloc's options), as `sluice run` has it.
    let runtime =
        sluice_controller::daemon::runtime().context("building the daemon's tokio runtime")?;
    runtime.block_on(async {
        let mut rows = Vec::new();
        for case in &args.cases {
            eprintln!("[fanout] case {case}");
            let row = match case.as_str() {
                "file1" => file_case(&args).await?,
                "envoy1" => envoy_case(&args, 1).await?,
                "envoy3" => envoy_case(&args, 3).await?,
                "sim" => sim_case(&args).await?,
                other => bail!("unknown case {other:?} (file1, envoy1, envoy3, sim)"),
            };
            eprintln!(
                "[fanout] {}: p50 {:.2} ms, p99 {:.2} ms",
                row.case,
                quantile(&row.latencies_ms, 0.5),
                quantile(&row.latencies_ms, 0.99)
            );
            rows.push(row);
        }
        print_table(&args, &rows);
        Ok(())
    })
}

fn print_table(args: &FanoutArgs, rows: &[Row]) {
    println!(
        "\n{} measured pushes per case after {} unmeasured, {} ms apart; decision (`Sink::push` called) → confirmed\n",
        args.pushes, args.warmup, args.gap_ms
    );
    println!("| case | proxies | p50 ms | p99 ms | max ms | controller memory per proxy | notes |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let max = r.latencies_ms.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.case,
            r.proxies,
            quantile(&r.latencies_ms, 0.5),
            quantile(&r.latencies_ms, 0.99),
            max,
            r.per_proxy_kib
                .map_or("–".to_string(), |k| format!("{k:.1} KiB")),
            r.note
        );
    }
}

/// The nearest-rank quantile.
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The fleet example's experiment with the canary at `weight` %.
fn config(weight: f64) -> Result<FilterConfig> {
    let json = serde_json::json!({
        "version": 1,
        "experiments": [{
            "name": "fleet",
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
            "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": weight}],
            "echo": {"header": "x-sluice-variant"},
        }]
    });
    Ok(serde_json::from_value(json)?)
}

fn code() -> Result<WasmCode> {
    Ok(WasmCode {
        filename: filter_wasm()?.display().to_string(),
        remote: None,
        vm_id: "sluice".into(),
        root_id: "sluice".into(),
        runtime: "envoy.wasm.runtime.v8".into(),
    })
}

/// Pushes `warmup + pushes` times, alternating the weight; returns the measured latencies.
async fn pushes(sink: &impl Sink, args: &FanoutArgs, first_version: u64) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(args.pushes);
    for i in 0..args.warmup + args.pushes {
        let version = first_version + i as u64;
        let weight = if i % 2 == 0 { 10.0 } else { 20.0 };
        let config = config(weight)?;
        let started = Instant::now();
        sink.push(&config, version)
            .await
            .with_context(|| format!("push {version}"))?;
        let took = started.elapsed();
        if i >= args.warmup {
            out.push(took.as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    Ok(out)
}

async fn file_case(args: &FanoutArgs) -> Result<Row> {
    let envoy = EnvoyConfig::new("envoy/ecds.yaml")
        .ecds("envoy/ecds")
        .start()
        .await?;
    let sink = EcdsFile {
        path: envoy.ecds_file("sluice.yaml")?,
        resource: "sluice".into(),
        code: code()?,
        proxies: vec![Admin::new(
            &format!("http://{}", envoy.addr(9901)),
            Duration::from_secs(2),
        )],
        confirm_within: Duration::from_secs(10),
    };
    let latencies = pushes(&sink, args, 2).await?;
    Ok(Row {
        case: "ecdsFile, 1 Envoy".into(),
        proxies: 1,
        latencies_ms: latencies,
        per_proxy_kib: None,
        note: "confirmed from admin `/stats` (polled)".into(),
    })
}

/// A fresh ecdsGrpc server on a free port and a sink on it expecting `min` proxies.
async fn grpc_sink(
    stop: watch::Receiver<bool>,
    min: usize,
) -> Result<(Arc<Servers>, EcdsGrpc, SocketAddr)> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let servers = Arc::new(Servers::new(stop, Default::default()));
    let hub = servers
        .hub(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let sink = EcdsGrpc {
        hub,
        listen,
        resource: "sluice".into(),
        code: code()?,
        min_proxies: min,
        confirm_within: Duration::from_secs(10),
        tls: false,
    };
    Ok((servers, sink, listen))
}

/// Waits until `n` proxies are connected and subscribed to the sink's resource.
async fn connected(sink: &EcdsGrpc, n: usize, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let subscribed = sink
            .hub
            .proxies()
            .iter()
            .filter(|p| p.subscribed.contains(&sink.resource))
            .count();
        if subscribed >= n {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("{subscribed} of {n} proxies subscribed after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn envoy_case(args: &FanoutArgs, n: usize) -> Result<Row> {
    let (stop_tx, stop) = watch::channel(false);
    let (_servers, sink, listen) = grpc_sink(stop, n).await?;
    let mut envoys: Vec<Envoy> = Vec::new();
    for i in 0..n {
        envoys.push(
            EnvoyConfig::new("envoy/fleet/envoy.yaml")
                .port_to(18000, listen.port())
                .node(&format!("bench-{i}"), "bench")
                .start()
                .await?,
        );
    }
    connected(&sink, n, Duration::from_secs(30)).await?;
    let latencies = pushes(&sink, args, 1).await?;
    let mut note = "ACK = Envoy applied the config".to_string();
    if n == 1 {
        // How long a restarted Envoy serves the default config: from admin `/ready` saying LIVE
        // until the controller's config is in force.
        let mut gaps = Vec::new();
        for _ in 0..args.restarts {
            envoys[0].restart().await?;
            let live = Instant::now();
            loop {
                let stats = envoys[0].admin().stats().await?;
                if stats
                    .get("extension_config_discovery.http_filter.sluice.update_success")
                    .unwrap_or(0)
                    >= 1
                {
                    break;
                }
                if live.elapsed() > Duration::from_secs(30) {
                    bail!("the restarted Envoy got no config within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            gaps.push(live.elapsed().as_secs_f64() * 1e3);
        }
        if !gaps.is_empty() {
            note = format!(
                "{note}; after a restart, LIVE → config in force: p50 {:.0} ms, max {:.0} ms ({} restarts)",
                quantile(&gaps, 0.5),
                gaps.iter().copied().fold(0.0, f64::max),
                gaps.len()
            );
        }
    }
    let _ = stop_tx.send(true);
    drop(envoys);
    Ok(Row {
        case: format!("ecdsGrpc, {n} Envoy{}", if n == 1 { "" } else { "s" }),
        proxies: n,
        latencies_ms: latencies,
        per_proxy_kib: None,
        note,
    })
}

/// Resident memory of this process, KiB.
fn rss_kib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/self/status")
}

async fn sim_case(args: &FanoutArgs) -> Result<Row> {
    let n = args.clients;
    let (stop_tx, stop) = watch::channel(false);
    let (_servers, sink, listen) = grpc_sink(stop, n).await?;
    // One resource in place before anyone connects: what is measured next is per proxy.
    let anyone = EcdsGrpc {
        min_proxies: 0,
        ..sink.clone()
    };
    if let Err(e) = anyone.push(&config(0.0)?, 1).await {
        eprintln!("[fanout] first push, before any proxy: {e}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib()?;

    let mut child = Command::new(std::env::current_exe()?)
        .arg("xds-clients")
        .args(["--connect", &listen.to_string()])
        .args(["--clients", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting xds-clients")?;
    connected(&sink, n, Duration::from_secs(120)).await?;
    // Everyone has the first config once the hub says so for version 1.
    let start = Instant::now();
    while sink
        .hub
        .proxies()
        .iter()
        .filter(|p| p.acked.get(&sink.resource) == Some(&1))
        .count()
        < n
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("not every simulated proxy ACKed the first config");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib()?;
    let latencies = pushes(&sink, args, 2).await?;
    let after_pushes = rss_kib()?;

    // Closing its stdin asks the child for its summary.
    drop(child.stdin.take());
    let mut summary = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            if line.starts_with("acked ") {
                summary = line;
            }
        }
    }
    let status = child.wait()?;
    let _ = stop_tx.send(true);
    if !status.success() {
        bail!("xds-clients failed: {status}");
    }
    // Every client must have ACKed the last push itself, not only the server say so.
    let last = (2 + args.warmup + args.pushes - 1).to_string();
    let field = |name: &str| {
        let mut words = summary.split_whitespace();
        words
            .position(|w| w == name)
            .and_then(|i| summary.split_whitespace().nth(i + 1))
            .unwrap_or("")
            .to_string()
    };
    if field("lowest") != last || field("nacked") != "0" || field("ended") != "0" {
        bail!("the simulated proxies did not all ACK version {last}: {summary}");
    }
    Ok(Row {
        case: format!("ecdsGrpc, {n} simulated"),
        proxies: n,
        latencies_ms: latencies,
        per_proxy_kib: Some((after - before) / n as f64),
        note: format!(
            "RSS {:.1} → {:.1} MiB connected → {:.1} MiB after the pushes; {summary}",
            before / 1024.0,
            after / 1024.0,
            after_pushes / 1024.0
        ),
    })
}

/// The `xds-clients` child: N simulated proxies until stdin closes, then a summary line
/// `acked <responses ACKed> nacked <n> ended <streams ended> lowest <lowest version a client
/// ACKed last>` on stdout.
pub fn clients(args: ClientsArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async {
        let mut clients = Vec::with_capacity(args.clients);
        let mut pending = tokio::task::JoinSet::new();
        let mut next = 0;
        while clients.len() < args.clients {
            while pending.len() < args.parallel && next < args.clients {
                let (addr, resource) = (args.connect.clone(), args.resource.clone());
                let id = format!("sim-{next}");
                pending.spawn(async move {
                    let ch = channel(&addr).await?;
                    Ok::<_, sluice_tests::Error>(XdsClient::on_channel(
                        ch,
                        Identity::new(id),
                        &resource,
                        accept_decodable(),
                    ))
                });
                next += 1;
            }
            match pending.join_next().await {
                Some(joined) => clients.push(joined??),
                None => break,
            }
        }
        eprintln!("[xds-clients] {} connected", clients.len());
        // Wait for stdin to close (the parent is done).
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await?;
        let (mut acked, mut nacked, mut ended) = (0, 0, 0);
        let mut lowest: Option<u64> = None;
        for c in &clients {
            let s = c.state();
            acked += s.received.len() - s.nacks.len();
            nacked += s.nacks.len();
            ended += usize::from(s.ended.is_some());
            let last = s
                .acked
                .and_then(|(v, _)| v.parse::<u64>().ok())
                .unwrap_or(0);
            lowest = Some(lowest.map_or(last, |l| l.min(last)));
        }
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "acked {acked} nacked {nacked} ended {ended} lowest {}",
            lowest.unwrap_or(0)
        )?;
        Ok(())
    })
}
