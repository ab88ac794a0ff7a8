//! `sluice-bench controller`: what one controller tick costs with many Envoys and rollouts.
//!
//! 1. **A real exposition.** A real Envoy (`bench/envoy/proxy-sluice.yaml` behind
//!    `bench/envoy/upstream.yaml`) runs the Sluice filter with one experiment per rollout, takes
//!    traffic from users of whom exactly 1 % are canary, and its
//!    `/stats/prometheus?filter=sluice_` — exactly what the controller's Envoy admin source asks
//!    for — becomes the template every simulated endpoint serves (with one histogram shape for
//!    both variants, so that every rollout keeps passing and being judged: [`healthy_canary`]).
//! 2. **Simulated Envoys** (`serve-stats`, a child process): one HTTP server on one loopback
//!    port stands for N Envoy admin endpoints, told apart by a path prefix
//!    (`http://127.0.0.1:P/e17` is endpoint 17; the controller appends
//!    `/stats/prometheus?...` to it). It serves the template with every value scaled by a factor
//!    that grows with time (so counters rise between ticks, as under traffic) and differs a
//!    little between endpoints. Like Envoy 1.40 it answers in Prometheus' protobuf format
//!    when that is the first type the request accepts (the controller's source asks so), in
//!    text otherwise or with `--text-only` (Envoy versions without it). Bodies are rebuilt
//!    once a second, so serving is cheap.
//! 3. **The controller** (`controller-run`, another child process, so its CPU time and peak RSS
//!    are its own): R rollouts, each a real daemon `Task` as `sluice run` builds it — the real
//!    Envoy admin source over all N endpoints (through one `AdminHub`, so rollouts ticking
//!    together share one request per endpoint), the accumulator, the real judge (`Assessor`, every guardrail on), the state
//!    machine, the state file and audit log on disk — except the sink, which confirms every push
//!    at once (a push happens once per stage, not per tick). After a warm-up it measures its own
//!    CPU time (schedstat of all its threads) over a number of ticks, counts the evaluations in
//!    the audit logs, and reports CPU per tick (all R rollouts evaluated once), peak RSS
//!    (`VmHWM`) and the wall time of the scrapes.
//!
//! The parent prints the results as Markdown.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use sluice_controller::assess::Assessor;
use sluice_controller::daemon::{AnySource, SystemClock, Task};
use sluice_controller::notify::Notifier;
use sluice_controller::sink::{Receipt, Sink, SinkError};
use sluice_controller::source::envoy_admin::AdminHub;
use sluice_controller::source::exposition::Format;
use sluice_controller::source::{OriginScrape, Source, SourceError};
use sluice_controller::spec::Rollout;
use sluice_controller::store::Store;
use sluice_filter::config::{FilterConfig, Plan};
use sluice_filter::request::variant_of_key;
use sluice_tests::{EnvoyConfig, Load};

use super::{cpu_ns, promproto};

#[derive(Parser)]
pub struct ControllerArgs {
    /// Simulated Envoy admin endpoints; every rollout scrapes all of them.
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Rollouts run by the one controller; every endpoint carries all their experiments.
    #[arg(long, default_value_t = 10)]
    rollouts: usize,
    /// Experiments in every endpoint's exposition (default and minimum: one per rollout); more
    /// shows what other filters' metrics on the same Envoys cost each scrape.
    #[arg(long)]
    body_experiments: Option<usize>,
    /// Seconds between evaluations (the rollouts' `schedule.interval`; 10 s is its default).
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Ticks before measuring (the first one also pushes stage 1).
    #[arg(long, default_value_t = 2)]
    warmup_ticks: u32,
    /// Measured ticks.
    #[arg(long, default_value_t = 6)]
    ticks: u32,
    /// Requests sent through the real Envoy to fill the template's counters and histograms.
    #[arg(long, default_value_t = 10000)]
    requests: usize,
    /// The simulated Envoys answer in the text format only, as Envoy versions without the
    /// protobuf exposition do (by default they answer in the format asked for, as Envoy 1.40).
    #[arg(long)]
    text_only: bool,
}

#[derive(Parser)]
pub struct ServeArgs {
    /// Exposition template (from the real Envoy).
    #[arg(long)]
    template: PathBuf,
    /// Distinct endpoint classes (endpoint i serves class i mod this), each scaled differently.
    #[arg(long, default_value_t = 8)]
    classes: usize,
    /// Answer in the text format whatever is asked for.
    #[arg(long)]
    text_only: bool,
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

/// The filter experiment of rollout `i` at stage 1 (1 % canary); each has its own routing
/// header, as experiments sharing a filter must.
fn experiment_json(i: usize) -> serde_json::Value {
    serde_json::json!({
        "name": rollout_name(i),
        "header": format!("x-sluice-{}", rollout_name(i)),
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
    /// CPU time over wall time in the measured window (cores).
    cpu_cores: f64,
    wall_secs: f64,
    peak_rss_mib: f64,
    rss_mib: f64,
    threads: usize,
    scrape_ms_p50: f64,
    scrape_ms_max: f64,
    scrape_errors: u64,
    /// Exposition requests the simulated endpoints answered per tick.
    requests_per_tick: f64,
    phases: Vec<String>,
    judgements: Vec<String>,
    observed_requests: Vec<String>,
}

pub async fn run(args: ControllerArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-controller-")
        .tempdir()?;
    let (template, envoy_sizes) = capture_template(&args).await?;
    let template_path = dir.path().join("template.prom");
    std::fs::write(&template_path, &template)?;
    let samples = template
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    eprintln!(
        "[controller] template: {} bytes, {samples} samples ({} experiments); Envoy's unfiltered /stats/prometheus was {} bytes",
        template.len(),
        args.body_experiments.unwrap_or(args.rollouts).max(args.rollouts),
        envoy_sizes.full
    );

    let exe = std::env::current_exe()?;
    let mut server = Command::new(&exe)
        .arg("serve-stats")
        .arg("--template")
        .arg(&template_path)
        .args(args.text_only.then_some("--text-only"))
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
    // What one scrape carries: the rollouts share one request per endpoint, asking for all
    // their experiments (not other experiments on the same Envoys).
    let asked: Vec<String> = (0..args.rollouts)
        .map(|i| format!("experiment=\"{}\"", rollout_name(i)))
        .collect();
    let scrape_bytes = if args.text_only {
        render(&parse_template(&template), 1.0, Some(&asked)).len()
    } else {
        let names: Vec<String> = (0..args.rollouts).map(rollout_name).collect();
        promproto::Template::from_text(&template)?
            .render(1.0, Some(&names))
            .len()
    };
    print_report(
        &args,
        &report,
        Sizes {
            template: template.len(),
            scrape: scrape_bytes,
            samples,
            envoy: envoy_sizes,
        },
        server_cpu / wall,
    );
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
/// sizes of its answers.
async fn capture_template(args: &ControllerArgs) -> Result<(String, EnvoySizes)> {
    let upstream = EnvoyConfig::new("bench/envoy/upstream.yaml")
        .start()
        .await?;
    let yaml = "bench/envoy/proxy-sluice.yaml";
    let text = std::fs::read_to_string(sluice_tests::repo_root().join(yaml))?;
    let block = embedded_block(&text).with_context(|| format!("{yaml}: no `value: |` block"))?;
    let indent = " ".repeat(block.len() - block.trim_start().len());
    let n = args
        .body_experiments
        .unwrap_or(args.rollouts)
        .max(args.rollouts);
    let experiments: Vec<serde_json::Value> = (0..n).map(experiment_json).collect();
    let config = serde_json::json!({"version": 1, "experiments": experiments});
    let envoy = EnvoyConfig::new(yaml)
        .port_to(18000, upstream.port(18000))
        .replace(&block, &format!("{indent}{config}"))
        .start()
        .await?;
    let users = exact_split_users(&config, args.requests)?;
    Load::new(envoy.url(10000, "/predict"))
        .requests(users.len())
        .concurrency(16)
        .users(move |i| users[i].clone())
        .run()
        .await?;
    // Histograms reach the admin output at the stats flush (1 s in this config).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let admin = envoy.admin();
    let filtered = admin.get("/stats/prometheus?filter=sluice_").await?;
    let full = admin.get("/stats/prometheus").await?;
    let url = envoy.url(9901, "/stats/prometheus?filter=sluice_");
    let client = sluice_tests::HttpClient::new();
    let get = |format: Format| {
        let (client, url) = (&client, &url);
        async move {
            let accept = [("accept", format.accept())];
            client
                .send(hyper::Method::GET, url, &accept, Bytes::new())
                .await
        }
    };
    let protobuf = get(Format::Protobuf).await?;
    if protobuf.header("content-type") != Some(PROTOBUF) {
        bail!(
            "Envoy did not answer in the protobuf format: {:?}",
            protobuf.header("content-type")
        );
    }
    // Envoy's own CPU per answer in each format: alternating batches of one-by-one requests.
    let mut cpu_us = [0.0; 2];
    for _ in 0..SCRAPE_ROUNDS {
        for (i, format) in [Format::Text, Format::Protobuf].into_iter().enumerate() {
            let before = cpu_ns(envoy.pid())?;
            for _ in 0..SCRAPES_PER_ROUND {
                get(format).await?;
            }
            cpu_us[i] += (cpu_ns(envoy.pid())? - before) as f64 / 1e3;
        }
    }
    let per_answer = (SCRAPE_ROUNDS * SCRAPES_PER_ROUND) as f64;
    let sizes = EnvoySizes {
        full: full.len(),
        protobuf: protobuf.body.len(),
        simulated_protobuf: promproto::Template::from_text(&filtered)?
            .render(1.0, None)
            .len(),
        text_cpu_us: cpu_us[0] / per_answer,
        protobuf_cpu_us: cpu_us[1] / per_answer,
    };
    if !filtered.contains(&format!("experiment=\"{}\"", rollout_name(n - 1))) {
        bail!(
            "the Envoy exposition lacks the experiments:\n{}",
            envoy.log_tail(20)
        );
    }
    Ok((healthy_canary(&filtered), sizes))
}

/// `n` user ids of which exactly 1 % are canary in every experiment of `config` (stage 1).
///
/// The template's counts are multiplied into the millions, where the judge's sample-ratio test
/// would flag the few-per-mille deviation any random set of users has from 1 %; real traffic
/// converges to the configured split, so the template must start from it.
fn exact_split_users(config: &serde_json::Value, n: usize) -> Result<Vec<String>> {
    let plan = Plan::from_json(config.to_string().as_bytes())?;
    let target = n / 100;
    let mut canary = vec![0usize; plan.experiments.len()];
    let mut chosen = Vec::with_capacity(n);
    let mut stable_only = Vec::new();
    for k in 0..n * 1000 {
        if chosen.len() + stable_only.len() >= n && canary.iter().all(|c| *c == target) {
            break;
        }
        let user = format!("user-{k}");
        let treated: Vec<usize> = plan
            .experiments
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.variants[variant_of_key(e, user.as_bytes())] != e.variants[e.control]
            })
            .map(|(i, _)| i)
            .collect();
        if treated.is_empty() {
            stable_only.push(user);
        } else if treated.iter().all(|i| canary[*i] < target) {
            for i in treated {
                canary[i] += 1;
            }
            chosen.push(user);
        }
    }
    if canary.iter().any(|c| *c != target) || chosen.len() > n {
        bail!("could not pick {n} users with exactly 1 % canary per experiment");
    }
    let fill = n - chosen.len();
    chosen.extend(stable_only.into_iter().take(fill));
    Ok(chosen)
}

/// The exposition with every control histogram (`_bucket`, `_sum`, `_count`) replaced by the
/// canary's, scaled to the control's request count (an exact integer factor, the split being
/// exact). A hundred measured canary requests differ from the control by chance; multiplied
/// into the millions, the judge rightly calls that a regression and rolls back, after which a
/// rollout is no longer evaluated. With one shape for both, every guardrail passes and each
/// rollout keeps being judged, tick after tick.
fn healthy_canary(text: &str) -> String {
    const CANARY: &str = "variant=\"canary\"";
    const STABLE: &str = "variant=\"stable\"";
    let value_of = |line: &str| -> Option<(String, f64)> {
        let (head, v) = line.rsplit_once(' ')?;
        Some((head.to_string(), v.parse().ok()?))
    };
    let experiment_of = |head: &str| -> Option<String> {
        Some(
            head.split("experiment=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_string(),
        )
    };
    let mut canary = std::collections::HashMap::new();
    let mut requests: std::collections::HashMap<(String, bool), f64> = Default::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, v)) = value_of(line) else {
            continue;
        };
        if head.starts_with("sluice_requests_total{") {
            if let Some(exp) = experiment_of(&head) {
                requests.insert((exp, head.contains(CANARY)), v);
            }
        }
        if head.contains(CANARY) {
            canary.insert(head, v);
        }
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let histogram = ["_bucket{", "_sum{", "_count{"]
            .iter()
            .any(|h| line.contains(h));
        let replaced = (histogram && line.contains(STABLE))
            .then(|| value_of(line))
            .flatten()
            .and_then(|(head, _)| {
                let treated = canary.get(&head.replace(STABLE, CANARY))?;
                let exp = experiment_of(&head)?;
                let ratio = requests.get(&(exp.clone(), false))? / requests.get(&(exp, true))?;
                let scaled = treated * ratio;
                Some(if head.contains("_sum{") {
                    format!("{head} {scaled:.3}")
                } else {
                    format!("{head} {}", scaled.round())
                })
            });
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
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

/// Sizes of the expositions, in bytes (and samples of the whole one).
struct Sizes {
    /// Every Sluice sample of an endpoint (`filter=sluice_`, text format).
    template: usize,
    /// What one scrape carries, in the format served.
    scrape: usize,
    samples: usize,
    envoy: EnvoySizes,
}

/// The real Envoy's answers: sizes in bytes, and what they cost it.
struct EnvoySizes {
    /// Unfiltered `/stats/prometheus` (text).
    full: usize,
    /// `/stats/prometheus?filter=sluice_` in the protobuf format.
    protobuf: usize,
    /// The simulated endpoints' protobuf form of the same samples.
    simulated_protobuf: usize,
    /// Envoy's CPU time per `/stats/prometheus?filter=sluice_` answer, in microseconds.
    text_cpu_us: f64,
    protobuf_cpu_us: f64,
}

/// Envoy's CPU per answer is measured over this many batches of each format, alternating.
const SCRAPE_ROUNDS: usize = 3;
const SCRAPES_PER_ROUND: usize = 100;

/// The `Content-Type` of Envoy's protobuf exposition.
const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

fn print_report(args: &ControllerArgs, r: &RunReport, size: Sizes, server_cores: f64) {
    println!(
        "\nsluice-bench controller: {} endpoints x {} rollouts ({} experiments per exposition), interval {} s, {} measured ticks after {} warm-up ticks\n",
        args.endpoints,
        args.rollouts,
        args.body_experiments.unwrap_or(args.rollouts).max(args.rollouts),
        args.interval,
        args.ticks,
        args.warmup_ticks
    );
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| Sluice's metrics per endpoint (`/stats/prometheus?filter=sluice_`) | {:.1} KiB, {} samples |",
        size.template as f64 / 1024.0,
        size.samples
    );
    println!(
        "| the same in the protobuf format: Envoy's answer / the simulated endpoints' | {:.1} KiB / {:.1} KiB |",
        size.envoy.protobuf as f64 / 1024.0,
        size.envoy.simulated_protobuf as f64 / 1024.0
    );
    println!(
        "| the Envoy's CPU per answer of `?filter=sluice_`: text / protobuf ({} requests each) | {:.0} µs / {:.0} µs |",
        SCRAPE_ROUNDS * SCRAPES_PER_ROUND,
        size.envoy.text_cpu_us,
        size.envoy.protobuf_cpu_us
    );
    println!(
        "| the same Envoy's unfiltered `/stats/prometheus` | {:.1} KiB |",
        size.envoy.full as f64 / 1024.0
    );
    println!(
        "| one scrape (the rollouts' experiments, Envoy-side `filter`; {}) | {:.1} KiB |",
        if args.text_only {
            "text format"
        } else {
            "protobuf format"
        },
        size.scrape as f64 / 1024.0
    );
    println!(
        "| scrapes per tick (answered by the endpoints) | {:.0} ({:.1} MiB) |",
        r.requests_per_tick,
        r.requests_per_tick * size.scrape as f64 / 1048576.0
    );
    println!(
        "| ticks measured (evaluations / rollouts) | {:.1} |",
        r.ticks
    );
    println!(
        "| **controller CPU per tick** | **{:.0} ms** |",
        r.cpu_ms_per_tick
    );
    println!(
        "| CPU per evaluation (one rollout, all endpoints) | {:.1} ms |",
        r.cpu_ms_per_evaluation
    );
    println!(
        "| controller CPU use while measured | {:.2} cores ({:.0} s) |",
        r.cpu_cores, r.wall_secs
    );
    println!("| **peak RSS** (VmHWM) | **{:.0} MiB** |", r.peak_rss_mib);
    println!("| RSS at the end | {:.0} MiB |", r.rss_mib);
    println!("| controller threads | {} |", r.threads);
    println!(
        "| scrape wall time (one rollout, all endpoints): median, max | {:.0} ms, {:.0} ms |",
        r.scrape_ms_p50, r.scrape_ms_max
    );
    println!("| scrape errors | {} |", r.scrape_errors);
    println!("| simulated endpoints' CPU use (other process) | {server_cores:.2} cores |");
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
fn render(lines: &[Line], factor: f64, only: Option<&[String]>) -> Bytes {
    use std::fmt::Write;
    let mut out = String::new();
    for l in lines {
        match l {
            Line::Text(t) => out.push_str(t),
            Line::Sample { head, .. }
                if only.is_some_and(|o| !o.iter().any(|l| head.contains(l))) =>
            {
                continue
            }
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
    /// The template as protobuf messages (`None` with `--text-only`).
    protobuf: Option<promproto::Template>,
    /// Exposition requests answered so far (`GET /requests`).
    served: std::sync::atomic::AtomicU64,
    classes: usize,
    started: Instant,
    cache: Mutex<HashMap<BodyKey, (u64, Bytes)>>,
}

/// A cached body: endpoint class, the experiments asked for and the format (protobuf or not);
/// the value is (second, body).
type BodyKey = (usize, Option<Vec<String>>, bool);

impl Bodies {
    /// The body endpoint `endpoint` serves now; with `experiments`, only their samples, as
    /// Envoy answers a `filter` naming them.
    fn body(&self, endpoint: usize, experiments: Option<Vec<String>>, protobuf: bool) -> Bytes {
        let class = endpoint % self.classes;
        let second = self.started.elapsed().as_secs();
        let key = (class, experiments, protobuf);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, b)) = cache.get(&key) {
            if *s == second {
                return b.clone();
            }
        }
        // Every second each endpoint counts the template's traffic 20–27 times more (so
        // increments between ticks are whole multiples of the template, with its proportions
        // exactly); endpoints differ by up to 35 %.
        let factor = ((20 + class as u64) * (1 + second)) as f64;
        let labels: Option<Vec<String>> = key
            .1
            .as_ref()
            .map(|es| es.iter().map(|e| format!("experiment=\"{e}\"")).collect());
        let body = match (&self.protobuf, protobuf) {
            (Some(t), true) => Bytes::from(t.render(factor, key.1.as_deref())),
            _ => render(&self.lines, factor, labels.as_deref()),
        };
        cache.insert(key, (second, body.clone()));
        body
    }
}

/// The experiments a `filter=` query parameter selects, if it has the form the controller's
/// admin source sends (`sluice_[a-z_]+\.experiment=\.=(<name>|<name>…);\.;`, percent-encoded).
fn filtered_experiments(query: &str) -> Option<Vec<String>> {
    let raw = query.split('&').find_map(|kv| kv.strip_prefix("filter="))?;
    let mut decoded = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&raw[i + 1..i + 3], 16) {
                decoded.push(b);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let filter = String::from_utf8(decoded).ok()?;
    let rest = filter.split_once("\\.experiment=\\.=(")?.1;
    let names = rest.split_once(");")?.0;
    Some(names.split('|').map(|n| n.replace('\\', "")).collect())
}

/// `serve-stats`: the simulated endpoints (prints `port N`, serves until killed).
pub fn serve(args: ServeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.template)?;
    let bodies = Arc::new(Bodies {
        lines: parse_template(&text),
        protobuf: if args.text_only {
            None
        } else {
            Some(promproto::Template::from_text(&text)?)
        },
        served: Default::default(),
        classes: args.classes.max(1),
        started: Instant::now(),
        cache: Mutex::new(HashMap::new()),
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
    if req.uri().path() == "/requests" {
        let n = bodies.served.load(std::sync::atomic::Ordering::Relaxed);
        return hyper::Response::new(Full::new(Bytes::from(n.to_string())));
    }
    match endpoint {
        Some(i) => {
            bodies
                .served
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let experiments = req.uri().query().and_then(filtered_experiments);
            // Like Envoy: the protobuf format if it is the first type the client accepts.
            let protobuf = bodies.protobuf.is_some()
                && req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.starts_with("application/vnd.google.protobuf"));
            let mut r = hyper::Response::new(Full::new(bodies.body(i, experiments, protobuf)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(if protobuf {
                    PROTOBUF
                } else {
                    "text/plain; charset=UTF-8"
                }),
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

    /// What it confirmed is in force: it has no proxies to ask.
    async fn in_force(
        &self,
        _config: &FilterConfig,
        _version: u64,
    ) -> Result<Option<String>, SinkError> {
        Ok(None)
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
    let runtime = sluice_controller::daemon::runtime()?;
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
    let hub = AdminHub::new();
    for i in 0..args.rollouts {
        let checked = Rollout::parse(&rollout_spec(i, &endpoints, args.interval))
            .map_err(|e| anyhow::anyhow!("rollout spec {i}: {}", e.problems.join("; ")))?;
        let store = Store::new(&args.state_dir, &rollout_name(i))?;
        audits.push(store.audit_path().to_path_buf());
        let task = Task {
            source: Timed {
                inner: AnySource::from_spec(
                    &checked.rollout.spec.sources[0],
                    &hub,
                    checked.rollout.spec.schedule.interval,
                ),
                walls: walls.clone(),
            },
            sinks: vec![ConfirmingSink],
            judge: Assessor::from_spec(&checked),
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
    let served = sluice_tests::Admin::new(([127, 0, 0, 1], args.port).into());
    let requests = || async {
        let n = served.get("/requests").await?;
        anyhow::Ok(n.trim().parse::<f64>()?)
    };
    let requests0 = requests().await?;
    let evals0 = evaluations(&audits)?;
    let cpu0 = cpu_ns(pid)?;
    walls.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let t0 = Instant::now();
    tokio::time::sleep(interval * args.ticks).await;
    let cpu = (cpu_ns(pid)? - cpu0) as f64 / 1e6;
    let wall = t0.elapsed().as_secs_f64();
    let evals = (evaluations(&audits)? - evals0) as f64;
    let requests = requests().await? - requests0;
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
        cpu_cores: cpu / 1e3 / wall,
        wall_secs: wall,
        peak_rss_mib: peak,
        rss_mib: rss,
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))?.count(),
        scrape_ms_p50: w
            .get(w.len() / 2)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        scrape_ms_max: w.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        scrape_errors: statuses.iter().map(|s| s.scrape_errors).sum(),
        requests_per_tick: requests / ticks,
        phases: statuses
            .iter()
            .map(|s| field_of(serde_json::to_value(&s.state.phase).ok(), "phase"))
            .collect(),
        judgements: statuses
            .iter()
            .map(|s| {
                let j = s.last_judgement.as_ref();
                field_of(j.and_then(|j| serde_json::to_value(j).ok()), "kind")
            })
            .collect(),
        observed_requests: statuses
            .iter()
            .take(1)
            .map(|s| format!("{}: {:?}", s.name, s.observed_requests))
            .collect(),
    })
}

/// `value[key]` as text (e.g. a phase's or judgement's name), else the whole value.
fn field_of(value: Option<serde_json::Value>, key: &str) -> String {
    match value {
        None => "-".into(),
        Some(v) => match (v.get(key).and_then(|k| k.as_str()), v.get("reason")) {
            (Some(k), Some(r)) => format!("{k}: {}", r.as_str().unwrap_or_default()),
            (Some(k), None) => k.to_string(),
            (None, _) => v.to_string(),
        },
    }
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

#[cfg(test)]
mod tests {
    use super::filtered_experiments;

    /// The simulated Envoys must understand the filter the admin source really sends, or they
    /// would serve every experiment and the benchmark would measure the wrong work.
    #[test]
    fn the_admin_sources_filter_is_understood() {
        let query = sluice_controller::source::admin::Admin::exposition_query(&["r0", "ranker-v2"]);
        let Some((_, query)) = query.split_once('?') else {
            unreachable!("{query} has a query string")
        };
        assert_eq!(
            filtered_experiments(query),
            Some(vec!["r0".to_string(), "ranker-v2".to_string()])
        );
    }
}
