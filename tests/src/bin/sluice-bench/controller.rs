//! `sluice-bench controller`: what one controller tick costs with many Envoys and rollouts.
//!
//! 1. **A real exposition.** A real Envoy (`bench/envoy/proxy-sluice.yaml` behind
//!    `bench/envoy/upstream.yaml`) runs the Sluice filter with one experiment per rollout, takes
//!    traffic, and its `/stats/prometheus?filter=sluice_` — exactly what the controller's Envoy
//!    admin source asks for — becomes the template every simulated endpoint serves.
//! 2. **Simulated Envoys** (`serve-stats`, a child process): one HTTP server on one loopback
//!    port stands for N Envoy admin endpoints, told apart by a path prefix
//!    (`http://127.0.0.1:P/e17` is endpoint 17; the controller appends
//!    `/stats/prometheus?...` to it). It serves the template with every value scaled by a factor
//!    that grows with time (so counters rise between ticks, as under traffic) and differs a
//!    little between endpoints. Bodies are rebuilt once a second, so serving is cheap.
//! 3. **The controller** (`controller-run`, another child process, so its CPU time and peak RSS
//!    are its own): R rollouts, each a real daemon `Task` as `sluice run` builds it — the real
//!    Envoy admin source over all N endpoints (one admin client per endpoint, scraped
//!    concurrently), the accumulator, the real judge (`Assessor`, every guardrail on), the state
//!    machine, the state file and audit log on disk — except the sink, which confirms every push
//!    at once (a push happens once per stage, not per tick). After a warm-up it measures its own
//!    CPU time (schedstat of all its threads) over a number of ticks, counts the evaluations in
//!    the audit logs, and reports CPU per tick (all R rollouts evaluated once), peak RSS
//!    (`VmHWM`) and the wall time of the scrapes.
//!
//! The parent prints the results as Markdown.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use sluice_controller::daemon::{AnySource, SystemClock, Task};
use sluice_controller::judge::assess::Assessor;
use sluice_controller::notify::Notifier;
use sluice_controller::sink::{Receipt, Sink, SinkError};
use sluice_controller::source::{OriginScrape, Source, SourceError};
use sluice_controller::spec::Rollout;
use sluice_controller::store::Store;
use sluice_filter::config::FilterConfig;
use sluice_tests::{EnvoyConfig, Load};

use super::cpu_ns;

#[derive(Parser)]
pub struct ControllerArgs {
    /// Simulated Envoy admin endpoints; every rollout scrapes all of them.
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Rollouts run by the one controller; every endpoint carries all their experiments.
    #[arg(long, default_value_t = 10)]
    rollouts: usize,
    /// Seconds between evaluations (the rollouts' `schedule.interval`).
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// Ticks before measuring (the first one also pushes stage 1).
    #[arg(long, default_value_t = 3)]
    warmup_ticks: u32,
    /// Measured ticks.
    #[arg(long, default_value_t = 15)]
    ticks: u32,
    /// Requests sent through the real Envoy to fill the template's counters and histograms.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
}

#[derive(Parser)]
pub struct ServeArgs {
    /// Exposition template (from the real Envoy).
    #[arg(long)]
    template: PathBuf,
    /// Distinct endpoint classes (endpoint i serves class i mod this), each scaled differently.
    #[arg(long, default_value_t = 8)]
    classes: usize,
}

#[derive(Parser)]
pub struct RunArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    endpoints: usize,
    #[arg(long)]
    rollouts: usize,
    #[arg(long)]
    interval: f64,
    #[arg(long)]
    warmup_ticks: u32,
    #[arg(long)]
    ticks: u32,
    #[arg(long)]
    state_dir: PathBuf,
}

/// Rollout `i`'s name, also its experiment's.
fn rollout_name(i: usize) -> String {
    format!("r{i}")
}

/// The filter experiment of rollout `i` at stage 1 (1 % canary).
fn experiment_json(i: usize) -> serde_json::Value {
    serde_json::json!({
        "name": rollout_name(i),
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 1}],
        "outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},
        "prediction": {"header": "x-model-score", "scale": 1000}
    })
}

/// The guardrails of every rollout: all of them on, as in the demo rollout.
const GUARDRAILS: &str = r#"{"alpha": 0.01, "minRequests": 60, "consecutive": 2, "promotion": "noBreach",
  "srm": {"alpha": 0.001},
  "errorRate": {"ceiling": 0.02, "margin": {"absolute": 0.01, "relative": 0.5}},
  "latency": {"quantiles": [{"quantile": 0.5, "margin": {"relative": 0.2}},
                            {"quantile": 0.99, "sloMs": 400, "margin": {"absolute": 0.005, "relative": 0.5}}]},
  "business": [{"outcome": "click", "margin": {"relative": 0.2}}],
  "drift": {"critical": true, "maxKs": 0.1, "maxMeanShift": 0.25, "minCount": 60}}"#;

fn rollout_spec(i: usize, endpoints: &[String], interval: f64) -> String {
    let mut exp = experiment_json(i);
    exp["variants"][1]["weight"] = serde_json::json!(0);
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: {name}}}\nspec:\n  \
         experiment: {exp}\n  treatment: canary\n  \
         schedule: {{stages: [1, 5, 10, 25, 50, 100], bake: 1h, warmup: 1s, interval: {interval}}}\n  \
         guardrails: {GUARDRAILS}\n  \
         sources: [{{envoyAdmin: {{endpoints: {eps}, timeout: 10s}}}}]\n  \
         sinks: [{{ecdsFile: {{path: /nonexistent/{name}.yaml, wasm: {{filename: x.wasm}}, proxies: [\"http://127.0.0.1:1\"]}}}}]\n",
        name = rollout_name(i),
        exp = exp,
        eps = serde_json::to_string(endpoints).unwrap_or_default(),
        GUARDRAILS = GUARDRAILS.replace('\n', " "),
    )
}

/// The results `controller-run` prints as one JSON line.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct RunReport {
    ticks: f64,
    cpu_ms_per_tick: f64,
    cpu_ms_per_evaluation: f64,
    wall_secs: f64,
    peak_rss_mib: f64,
    rss_mib: f64,
    threads: usize,
    scrape_ms_p50: f64,
    scrape_ms_max: f64,
    scrape_errors: u64,
    phases: Vec<String>,
    judgements: Vec<String>,
    observed_requests: Vec<String>,
}

pub async fn run(args: ControllerArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-controller-")
        .tempdir()?;
    let (template, full_bytes) = capture_template(&args).await?;
    let template_path = dir.path().join("template.prom");
    std::fs::write(&template_path, &template)?;
    let samples = template
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    eprintln!(
        "[controller] template: {} bytes, {samples} samples ({} experiments); Envoy's unfiltered /stats/prometheus was {full_bytes} bytes",
        template.len(),
        args.rollouts
    );

    let exe = std::env::current_exe()?;
    let mut server = Command::new(&exe)
        .arg("serve-stats")
        .arg("--template")
        .arg(&template_path)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the simulated endpoints")?;
    let port = read_port(&mut server)?;
    eprintln!(
        "[controller] {} simulated endpoints on 127.0.0.1:{port} (pid {})",
        args.endpoints,
        server.id()
    );
    let server_cpu0 = cpu_ns(server.id())?;
    let started = Instant::now();
    let output = Command::new(&exe)
        .arg("controller-run")
        .args(["--port", &port.to_string()])
        .args(["--endpoints", &args.endpoints.to_string()])
        .args(["--rollouts", &args.rollouts.to_string()])
        .args(["--interval", &args.interval.to_string()])
        .args(["--warmup-ticks", &args.warmup_ticks.to_string()])
        .args(["--ticks", &args.ticks.to_string()])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the controller")?;
    let server_cpu = (cpu_ns(server.id())? - server_cpu0) as f64 / 1e9;
    let wall = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    if !output.status.success() {
        bail!("controller-run failed: {}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let report: RunReport = serde_json::from_str(
        text.lines()
            .last()
            .context("controller-run printed nothing")?,
    )?;
    print_report(&args, &report, template.len(), samples, full_bytes, server_cpu / wall);
    Ok(())
}

fn read_port(server: &mut std::process::Child) -> Result<u16> {
    let stdout = server.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    line.trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("serve-stats said {line:?}"))
}

/// Runs a real Envoy with the Sluice filter carrying one experiment per rollout, sends traffic
/// (and a beacon per ten requests) and returns its `/stats/prometheus?filter=sluice_` and the
/// size of its unfiltered `/stats/prometheus`.
async fn capture_template(args: &ControllerArgs) -> Result<(String, usize)> {
    let upstream = EnvoyConfig::new("bench/envoy/upstream.yaml").start().await?;
    let yaml = "bench/envoy/proxy-sluice.yaml";
    let text = std::fs::read_to_string(sluice_tests::repo_root().join(yaml))?;
    let block = embedded_block(&text).with_context(|| format!("{yaml}: no `value: |` block"))?;
    let indent = " ".repeat(block.len() - block.trim_start().len());
    let experiments: Vec<serde_json::Value> = (0..args.rollouts).map(experiment_json).collect();
    let config = serde_json::json!({"version": 1, "experiments": experiments});
    let envoy = EnvoyConfig::new(yaml)
        .port_to(18000, upstream.port(18000))
        .replace(&block, &format!("{indent}{config}"))
        .start()
        .await?;
    Load::new(envoy.url(10000, "/predict"))
        .requests(args.requests)
        .concurrency(16)
        .run()
        .await?;
    // Histograms reach the admin output at the stats flush (1 s in this config).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let admin = envoy.admin();
    let filtered = admin.get("/stats/prometheus?filter=sluice_").await?;
    let full = admin.get("/stats/prometheus").await?;
    if !filtered.contains(&format!("experiment=\"{}\"", rollout_name(args.rollouts - 1))) {
        bail!(
            "the Envoy exposition lacks the experiments:\n{}",
            envoy.log_tail(20)
        );
    }
    Ok((filtered, full.len()))
}

/// The lines of the first `value: |` block scalar, joined (the embedded filter config).
fn embedded_block(yaml: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "value: |");
    let head = lines.next()?;
    let indent = head.len() - head.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| !l.trim().is_empty() && l.len() - l.trim_start().len() > indent)
        .collect();
    (!block.is_empty()).then(|| block.join("\n"))
}

fn print_report(
    args: &ControllerArgs,
    r: &RunReport,
    template_bytes: usize,
    samples: usize,
    full_bytes: usize,
    server_cores: f64,
) {
    println!(
        "\nsluice-bench controller: {} endpoints x {} rollouts, interval {} s, {} measured ticks after {} warm-up ticks\n",
        args.endpoints, args.rollouts, args.interval, args.ticks, args.warmup_ticks
    );
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| body per endpoint (`/stats/prometheus?filter=sluice_`) | {:.1} KiB, {samples} samples |",
        template_bytes as f64 / 1024.0
    );
    println!(
        "| the same Envoy's unfiltered `/stats/prometheus` | {:.1} KiB |",
        full_bytes as f64 / 1024.0
    );
    println!(
        "| scrapes per tick | {} ({:.1} MiB) |",
        args.endpoints * args.rollouts,
        (args.endpoints * args.rollouts * template_bytes) as f64 / 1048576.0
    );
    println!("| ticks measured (evaluations / rollouts) | {:.1} |", r.ticks);
    println!("| **controller CPU per tick** | **{:.0} ms** |", r.cpu_ms_per_tick);
    println!(
        "| CPU per evaluation (one rollout, all endpoints) | {:.1} ms |",
        r.cpu_ms_per_evaluation
    );
    println!(
        "| controller CPU use | {:.2} cores |",
        r.cpu_ms_per_tick / 1000.0 / args.interval
    );
    println!("| **peak RSS** (VmHWM) | **{:.0} MiB** |", r.peak_rss_mib);
    println!("| RSS at the end | {:.0} MiB |", r.rss_mib);
    println!("| controller threads | {} |", r.threads);
    println!(
        "| scrape wall time (one rollout, all endpoints): median, max | {:.0} ms, {:.0} ms |",
        r.scrape_ms_p50, r.scrape_ms_max
    );
    println!("| scrape errors | {} |", r.scrape_errors);
    println!(
        "| simulated endpoints' CPU use (other process) | {server_cores:.2} cores |"
    );
    println!(
        "\nRollouts at the end: phases {:?}; last judgements {:?}; requests seen {:?}",
        r.phases, r.judgements, r.observed_requests
    );
}

// ---- serve-stats -------------------------------------------------------------------------

enum Line {
    Text(String),
    Sample {
        head: String,
        value: f64,
        integer: bool,
    },
}

fn parse_template(text: &str) -> Vec<Line> {
    text.lines()
        .map(|l| {
            if l.starts_with('#') || l.trim().is_empty() {
                return Line::Text(l.to_string());
            }
            match l.rsplit_once(' ') {
                Some((head, v)) => match v.parse::<f64>() {
                    Ok(value) => Line::Sample {
                        head: head.to_string(),
                        value,
                        integer: !v.contains(['.', 'e', 'E']),
                    },
                    Err(_) => Line::Text(l.to_string()),
                },
                None => Line::Text(l.to_string()),
            }
        })
        .collect()
}

/// The template with every value times `factor` (counters and buckets stay integers, so
/// cumulative buckets stay ordered).
fn render(lines: &[Line], factor: f64) -> Bytes {
    use std::fmt::Write;
    let mut out = String::new();
    for l in lines {
        match l {
            Line::Text(t) => out.push_str(t),
            Line::Sample {
                head,
                value,
                integer,
            } => {
                let v = value * factor;
                if *integer {
                    let _ = write!(out, "{head} {}", v.round() as u64);
                } else {
                    let _ = write!(out, "{head} {v:.3}");
                }
            }
        }
        out.push('\n');
    }
    Bytes::from(out)
}

struct Bodies {
    lines: Vec<Line>,
    classes: usize,
    started: Instant,
    /// Per class: (second, body).
    cache: Mutex<Vec<(u64, Bytes)>>,
}

impl Bodies {
    fn body(&self, endpoint: usize) -> Bytes {
        let class = endpoint % self.classes;
        let second = self.started.elapsed().as_secs();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, b)) = cache.get(class) {
            if *s == second {
                return b.clone();
            }
        }
        // Counts grow as under steady traffic; endpoints differ by up to 35 %.
        let factor = (1.0 + class as f64 * 0.05) * (60.0 + second as f64) / 60.0;
        let body = render(&self.lines, factor);
        if cache.len() <= class {
            cache.resize(self.classes, (u64::MAX, Bytes::new()));
        }
        cache[class] = (second, body.clone());
        body
    }
}

/// `serve-stats`: the simulated endpoints (prints `port N`, serves until killed).
pub fn serve(args: ServeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.template)?;
    let bodies = Arc::new(Bodies {
        lines: parse_template(&text),
        classes: args.classes.max(1),
        started: Instant::now(),
        cache: Mutex::new(Vec::new()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        println!("port {}", listener.local_addr()?.port());
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let bodies = bodies.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&bodies, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn answer<B>(bodies: &Bodies, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    // `/e<i>/stats/prometheus`
    let endpoint = req
        .uri()
        .path()
        .strip_suffix("/stats/prometheus")
        .and_then(|p| p.strip_prefix("/e"))
        .and_then(|i| i.parse::<usize>().ok());
    match endpoint {
        Some(i) => {
            let mut r = hyper::Response::new(Full::new(bodies.body(i)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; charset=UTF-8"),
            );
            r
        }
        None => {
            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    }
}

// ---- controller-run ----------------------------------------------------------------------

/// A sink that confirms every push at once: pushes happen once per stage, not per tick, and
/// the ECDS file sink would need every simulated endpoint to confirm a version.
struct ConfirmingSink;

impl Sink for ConfirmingSink {
    async fn push(&self, _config: &FilterConfig, _version: u64) -> Result<Receipt, SinkError> {
        Ok(Receipt {
            confirmed_after: Duration::ZERO,
        })
    }
}

/// The real source, with the wall time of each scrape recorded.
struct Timed {
    inner: AnySource,
    walls: Arc<Mutex<Vec<Duration>>>,
}

impl Source for Timed {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let start = Instant::now();
        let r = self.inner.scrape(experiment).await;
        self.walls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(start.elapsed());
        r
    }
}

/// `controller-run`: the controller side, in its own process (prints one JSON line).
pub fn controller_run(args: RunArgs) -> Result<()> {
    // As `sluice run` does.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(drive(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn drive(args: RunArgs) -> Result<RunReport> {
    let endpoints: Vec<String> = (0..args.endpoints)
        .map(|i| format!("http://127.0.0.1:{}/e{i}", args.port))
        .collect();
    let walls = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    let mut joins = Vec::new();
    let mut audits = Vec::new();
    for i in 0..args.rollouts {
        let checked = Rollout::parse(&rollout_spec(i, &endpoints, args.interval))
            .map_err(|e| anyhow::anyhow!("rollout spec {i}: {}", e.problems.join("; ")))?;
        let store = Store::new(&args.state_dir, &rollout_name(i))?;
        audits.push(store.audit_path().to_path_buf());
        let task = Task {
            source: Timed {
                inner: AnySource::from_spec(&checked.rollout.spec.sources[0]),
                walls: walls.clone(),
            },
            sinks: vec![ConfirmingSink],
            judge: Assessor::from_spec(&checked)?,
            store,
            notifier: Notifier::new(&[]),
            clock: SystemClock,
            checked,
        };
        let mut stop = stop_rx.clone();
        let (handle, join) = task.spawn(
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
            false,
        )?;
        handles.push(handle);
        joins.push(join);
    }
    let interval = Duration::from_secs_f64(args.interval);
    tokio::time::sleep(interval * args.warmup_ticks + interval / 2).await;

    let pid = std::process::id();
    let evals0 = evaluations(&audits)?;
    let cpu0 = cpu_ns(pid)?;
    walls.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let t0 = Instant::now();
    tokio::time::sleep(interval * args.ticks).await;
    let cpu = (cpu_ns(pid)? - cpu0) as f64 / 1e6;
    let wall = t0.elapsed().as_secs_f64();
    let evals = (evaluations(&audits)? - evals0) as f64;
    let mut w: Vec<Duration> = walls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    w.sort();

    let statuses: Vec<_> = handles.iter().map(|h| h.status.borrow().clone()).collect();
    let _ = stop_tx.send(true);
    for j in joins {
        let _ = j.await;
    }
    if evals == 0.0 {
        bail!("no evaluation in the measured window");
    }
    let ticks = evals / args.rollouts as f64;
    let (peak, rss) = memory()?;
    Ok(RunReport {
        ticks,
        cpu_ms_per_tick: cpu / ticks,
        cpu_ms_per_evaluation: cpu / evals,
        wall_secs: wall,
        peak_rss_mib: peak,
        rss_mib: rss,
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))?.count(),
        scrape_ms_p50: w.get(w.len() / 2).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        scrape_ms_max: w.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        scrape_errors: statuses.iter().map(|s| s.scrape_errors).sum(),
        phases: statuses
            .iter()
            .map(|s| serde_json::to_value(&s.state.phase).map_or_else(|_| "?".into(), |v| v.to_string()))
            .collect(),
        judgements: statuses
            .iter()
            .map(|s| {
                s.last_judgement
                    .as_ref()
                    .and_then(|j| serde_json::to_value(j).ok())
                    .map_or_else(|| "-".into(), |v| v.to_string())
            })
            .collect(),
        observed_requests: statuses
            .iter()
            .take(1)
            .map(|s| format!("{}: {:?}", s.name, s.observed_requests))
            .collect(),
    })
}

/// Evaluation records in the audit logs so far.
fn evaluations(audits: &[PathBuf]) -> Result<usize> {
    let mut n = 0;
    for a in audits {
        n += count_evaluations(a)?;
    }
    Ok(n)
}

fn count_evaluations(path: &Path) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(text
        .lines()
        .filter(|l| l.contains("\"record\":\"evaluation\""))
        .count())
}

/// (peak RSS, current RSS) of this process in MiB, from `/proc/self/status`.
fn memory() -> Result<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = |key: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    };
    Ok((
        kib("VmHWM:").unwrap_or(f64::NAN) / 1024.0,
        kib("VmRSS:").unwrap_or(f64::NAN) / 1024.0,
    ))
}
