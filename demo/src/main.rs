//! `sluice-demo`: the one-command demo rollout, and each of its parts alone.
//!
//! - `sluice-demo run --scenario good`: Envoy + model servers + users + recorder + the
//!   controller (see [`run_rollout`]), live progress, then the report and summary;
//! - `sluice-demo stack --weight 25`: the same without a controller, at a fixed weight;
//! - `sluice-demo models`: the three model servers on their ports;
//! - `sluice-demo users`: the synthetic users against a running Envoy;
//! - `sluice-demo report`: re-renders a report from a recorded run.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use sluice_controller::spec::parse_duration;
use sluice_demo::models::{ModelServer, Role};
use sluice_demo::recorder::{Recorder, RecorderConfig, Series};
use sluice_demo::report::{self, ReportInput};
use sluice_demo::scenario::{FaultTrigger, Scenario};
use sluice_demo::stack::{self, EnvoyProcess, Ports, RunDir, Schedule};
use sluice_demo::users::{self, LoadConfig, LoadHandle, Srm, Tallies};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(name = "sluice-demo", about = "Sluice's demo rollout and its parts")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The whole demo: a rollout driven by the controller.
    Run(RunArgs),
    /// Envoy, models, users and recorder at a fixed weight, without a controller.
    Stack {
        #[command(flatten)]
        common: RunArgs,
        /// The canary's fixed weight (percent).
        #[arg(long, default_value_t = 25.0)]
        weight: f64,
    },
    /// Only the model servers (stable, canary, shadow) until ctrl-c.
    Models {
        #[arg(long, value_enum, default_value_t = Scenario::Good)]
        scenario: Scenario,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// Switch the canary to its faulty behaviour after this long (e.g. `30s`).
        #[arg(long, value_parser = duration_arg)]
        fault_after: Option<Duration>,
    },
    /// Only the synthetic users, against a running Envoy; prints what they saw as JSON.
    Users {
        #[arg(long, default_value = "http://127.0.0.1:10000")]
        target: String,
        #[arg(long, default_value_t = 300.0)]
        rate: f64,
        #[arg(long, default_value_t = 5000)]
        users: u64,
        #[arg(long, value_parser = duration_arg, default_value = "20s")]
        duration: Duration,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Drop `x-user-id` on this share of canary users' requests (SRM), assuming this
        /// canary weight.
        #[arg(long)]
        srm_drop: Option<f64>,
        #[arg(long, default_value_t = 25.0)]
        srm_weight: f64,
    },
    /// Re-renders `report.html` and `summary.json` from a run directory's recordings.
    Report {
        /// The run directory (holds series.json, users.json, state/).
        #[arg(long, default_value = ".work/demo")]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = Scenario::Good)]
    scenario: Scenario,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The run directory: Envoy's config copy, the controller's state, the report.
    #[arg(long, default_value = ".work/demo")]
    out: PathBuf,
    /// Stop everything after this long, whatever the rollout's state.
    #[arg(long, value_parser = duration_arg, default_value = "240s")]
    duration_limit: Duration,
    /// Requests per second from the synthetic users.
    #[arg(long, default_value_t = 300.0)]
    rate: f64,
    #[arg(long, default_value_t = 5000)]
    users: u64,
    /// Start with a shadow stage (copies of stable's traffic to the shadow model).
    #[arg(long)]
    shadow: bool,
    /// Inject the fault from the first request instead of mid-ramp.
    #[arg(long)]
    fault_from_start: bool,
    /// Inject the fault once the canary's confirmed weight reaches this percent.
    #[arg(long)]
    fault_at_weight: Option<f64>,
    /// Move every port by this much (to run beside another Envoy).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Run(args) => run_demo(args, Mode::Rollout).await,
            Cmd::Stack { common, weight } => run_demo(common, Mode::Fixed { weight }).await,
            Cmd::Models {
                scenario,
                seed,
                port_offset,
                fault_after,
            } => models_only(scenario, seed, port_offset, fault_after).await,
            Cmd::Users {
                target,
                rate,
                users,
                duration,
                seed,
                srm_drop,
                srm_weight,
            } => {
                let handle = LoadHandle::default();
                if let Some(share) = srm_drop {
                    handle.set_srm(Some(srm_at(srm_weight, share)?));
                }
                let config = LoadConfig {
                    base_url: target,
                    rate,
                    users,
                    duration,
                    seed,
                    ..LoadConfig::default()
                };
                let stop = handle.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    stop.stop();
                });
                let tallies = users::run(config, handle).await?;
                println!("{}", serde_json::to_string_pretty(&tallies)?);
                Ok(())
            }
            Cmd::Report { out } => rerender(&out),
        }
    })
}

/// Runs the controller on the demo's rollout spec (`run.rollout_spec()`, state in
/// `run.state_dir`, HTTP endpoint on `run.ports.controller` so the recorder can read
/// `/status`) until the rollout is promoted or rolled back, or `limit` passes. Returns the
/// final status of the rollout.
///
/// The controller wiring is pending: the lead fills this in once the judge lands, e.g. with
/// `sluice_controller::cli::run(RunOptions { files: vec![run.rollout_spec()], state_dir:
/// run.state_dir.clone(), listen: ([127, 0, 0, 1], run.ports.controller).into(),
/// exit_when_done: true, progress: true }, |checked| <judge for checked>)` inside a timeout.
async fn run_rollout(
    run: &RunDir,
    limit: Duration,
) -> anyhow::Result<Vec<sluice_controller::daemon::Status>> {
    let _ = limit;
    bail!(
        "controller wiring pending: run_rollout (demo/src/main.rs) does not start the controller yet; \
         the rollout spec is ready at {}. Use `sluice-demo stack` to run everything else.",
        run.rollout_spec().display()
    )
}

/// With or without a controller.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Rollout,
    /// No controller; the canary stays at `weight`.
    Fixed {
        weight: f64,
    },
}

fn srm_at(weight: f64, share: f64) -> anyhow::Result<Srm> {
    let mut exp = stack::experiment_json(false);
    exp["variants"][1]["weight"] = serde_json::json!(weight);
    let config = serde_json::json!({"version": 1, "experiments": [exp]});
    let plan = sluice_filter::config::Plan::from_json(config.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("experiment at weight {weight}: {e}"))?;
    let experiment = plan
        .experiments
        .into_iter()
        .next()
        .context("the demo's experiment is missing")?;
    let treatment = experiment
        .variant_index(stack::TREATMENT)
        .context("no canary variant")?;
    Ok(Srm {
        experiment,
        treatment,
        drop_share: share,
    })
}

async fn start_models(
    scenario: Scenario,
    seed: u64,
    ports: &Ports,
    faulty_from_start: bool,
) -> anyhow::Result<Vec<ModelServer>> {
    let mut out = Vec::new();
    for (role, port) in [
        (Role::Stable, ports.stable),
        (Role::Canary, ports.canary),
        (Role::Shadow, ports.shadow),
    ] {
        let behaviour = if faulty_from_start {
            scenario.faulty(role)
        } else {
            scenario.initial(role)
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        out.push(ModelServer::start(role, addr, behaviour, seed).await?);
    }
    Ok(out)
}

async fn models_only(
    scenario: Scenario,
    seed: u64,
    port_offset: u16,
    fault_after: Option<Duration>,
) -> anyhow::Result<()> {
    let ports = Ports::default().offset(port_offset);
    let models = start_models(scenario, seed, &ports, false).await?;
    for m in &models {
        println!(
            "{:<6} http://{}/predict  {:?}",
            m.role().name(),
            m.addr(),
            m.behaviour()
        );
    }
    if let Some(after) = fault_after {
        tokio::select! {
            _ = tokio::time::sleep(after) => {
                for m in &models {
                    m.set_behaviour(scenario.faulty(m.role()));
                }
                println!("fault injected ({}): canary now {:?}", scenario.name(), models[1].behaviour());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    for m in &models {
        println!(
            "{:<6} served {} ({} errors)",
            m.role().name(),
            m.served(),
            m.errors()
        );
    }
    Ok(())
}

/// The whole demo (or the stack without a controller).
async fn run_demo(args: RunArgs, mode: Mode) -> anyhow::Result<()> {
    let repo = stack::repo_root();
    let envoy_bin = stack::envoy_bin(&repo)?;
    let wasm = stack::filter_wasm(&repo)?;
    let ports = Ports::default().offset(args.port_offset);
    ports.check_free()?;
    let weight = match mode {
        Mode::Rollout => 0.0,
        Mode::Fixed { weight } => weight,
    };
    let run = stack::prepare(&repo, &args.out, &wasm, ports, weight)?;
    let schedule = Schedule {
        shadow: args.shadow.then(|| Duration::from_secs(15)),
        ..Schedule::default()
    };
    std::fs::write(run.rollout_spec(), stack::rollout_spec(&run, &schedule))
        .with_context(|| format!("writing {}", run.rollout_spec().display()))?;

    let scenario = args.scenario;
    let trigger = if args.fault_from_start {
        Some(FaultTrigger::FromStart)
    } else if let Some(percent) = args.fault_at_weight {
        Some(FaultTrigger::AtWeight { percent })
    } else {
        match (mode, scenario.default_trigger()) {
            // Without a controller nothing reports a weight: use a third of the run.
            (Mode::Fixed { .. }, Some(_)) => Some(FaultTrigger::AfterSecs {
                secs: args.duration_limit.as_secs_f64() / 3.0,
            }),
            (_, t) => t,
        }
    };
    println!(
        "sluice demo: scenario {} (expected: {}), run directory {}",
        scenario.name(),
        scenario.expected(),
        run.root.display()
    );
    let models = start_models(
        scenario,
        args.seed,
        &ports,
        trigger == Some(FaultTrigger::FromStart),
    )
    .await?;
    let envoy = EnvoyProcess::start(&envoy_bin, &run, Duration::from_secs(60)).await?;
    println!(
        "envoy ready: listener {}, admin {} (log {})",
        ports.listener_url(),
        ports.admin_url(),
        run.envoy_log.display()
    );
    let recorder = Recorder::start(RecorderConfig {
        admin_url: ports.admin_url(),
        status_url: (mode == Mode::Rollout).then(|| ports.controller_url()),
        experiment: stack::EXPERIMENT.into(),
        control: stack::CONTROL.into(),
        treatment: stack::TREATMENT.into(),
        scenario: Some(scenario.name().into()),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(800),
    });
    let load = LoadHandle::default();
    let users_task = tokio::spawn(users::run(
        LoadConfig {
            base_url: ports.listener_url(),
            users: args.users,
            rate: args.rate,
            duration: args.duration_limit + Duration::from_secs(5),
            seed: args.seed,
            ..LoadConfig::default()
        },
        load.clone(),
    ));
    if trigger == Some(FaultTrigger::FromStart) {
        recorder.mark_fault(now());
    }
    let (done_tx, done_rx) = watch::channel(false);
    let injector = tokio::spawn(inject_fault(
        scenario,
        trigger,
        weight,
        recorder.latest(),
        models,
        load.clone(),
        done_rx.clone(),
    ));
    let progress = tokio::spawn(print_progress(recorder.latest(), done_rx));

    let outcome = match mode {
        Mode::Rollout => run_rollout(&run, args.duration_limit).await.map(|_| ()),
        Mode::Fixed { .. } => {
            tokio::select! {
                _ = tokio::time::sleep(args.duration_limit) => {}
                _ = tokio::signal::ctrl_c() => println!("interrupted: writing the report"),
            }
            Ok(())
        }
    };

    load.stop();
    let _ = done_tx.send(true);
    let tallies = users_task.await.ok().and_then(Result::ok);
    let fault_at = injector.await.ok().flatten();
    if let Some(at) = fault_at {
        recorder.mark_fault(at);
    }
    let _ = progress.await;
    let series = recorder.finish().await;
    drop(envoy);
    let written = finish(&run, series, tallies, scenario)?;
    println!("\n{}", report::summary_text(&written.summary));
    println!(
        "report: {}\nsummary: {}",
        written.html.display(),
        written.json.display()
    );
    outcome
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Waits for the trigger, switches the canary (and shadow) to the faulty behaviour or turns
/// the SRM fault on, and keeps the SRM plan in step with the weight. Returns when the fault
/// started, if it did.
async fn inject_fault(
    scenario: Scenario,
    trigger: Option<FaultTrigger>,
    fixed_weight: f64,
    mut latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
    models: Vec<ModelServer>,
    load: LoadHandle,
    mut done: watch::Receiver<bool>,
) -> Option<f64> {
    let mut fault_at = None;
    let mut srm_weight = None;
    if trigger == Some(FaultTrigger::FromStart) {
        fault_at = Some(now());
    }
    let Some(trigger) = trigger else {
        let _ = done.wait_for(|d| *d).await;
        return None;
    };
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { break },
            _ = done.wait_for(|d| *d) => break,
        }
        let point = latest.borrow_and_update().clone();
        let Some(point) = point else { continue };
        let weight = point.rollout.as_ref().map_or(fixed_weight, |r| r.weight);
        if fault_at.is_none() {
            let fire = match trigger {
                FaultTrigger::FromStart => true,
                FaultTrigger::AtWeight { percent } => weight >= percent,
                FaultTrigger::AfterSecs { secs } => point.t >= secs,
            };
            if fire {
                for m in &models {
                    m.set_behaviour(scenario.faulty(m.role()));
                }
                fault_at = Some(now());
                println!(
                    "{:>6.1}s  FAULT INJECTED: {} ({})",
                    point.t,
                    scenario.name(),
                    scenario.expected()
                );
            }
        }
        let share = scenario.srm_drop_share();
        if fault_at.is_some() && share > 0.0 && srm_weight != Some(weight) {
            match srm_at(weight, share) {
                Ok(srm) => load.set_srm(Some(srm)),
                Err(e) => eprintln!("srm: {e}"),
            }
            srm_weight = Some(weight);
        }
    }
    // Keep the servers alive until the run is over.
    drop(models);
    fault_at
}

/// A compact line every five seconds from the recorder's newest point.
async fn print_progress(
    mut latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
    mut done: watch::Receiver<bool>,
) {
    let mut last_printed = -5.0;
    let mut previous: Option<sluice_demo::recorder::Point> = None;
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = done.wait_for(|d| *d) => return,
        }
        let Some(point) = latest.borrow_and_update().clone() else {
            continue;
        };
        if point.t - last_printed < 5.0 {
            continue;
        }
        if previous.is_none() && point.rollout.is_none() {
            // Nothing to say yet: rates need two points.
            previous = Some(point);
            continue;
        }
        let mut line = format!("{:>6.1}s", point.t);
        if let Some(r) = &point.rollout {
            line.push_str(&format!(
                "  {} weight {:.1}% → {:.1}%  judge {}",
                r.phase,
                r.weight,
                r.target_weight,
                r.judgement.as_deref().unwrap_or("-")
            ));
        }
        if let (Some(now), Some(before)) = (
            &point.variants,
            previous.as_ref().and_then(|p| p.variants.as_ref()),
        ) {
            let dt = (point.t - previous.as_ref().map_or(0.0, |p| p.t)).max(0.1);
            for (name, v) in now {
                let b = before.get(name).cloned().unwrap_or_default();
                let n = v.requests - b.requests;
                let errors = v.server_errors() - b.server_errors();
                line.push_str(&format!(
                    "  {name}: {:.0} req/s, 5xx {:.1}%",
                    n / dt,
                    if n > 0.0 { 100.0 * errors / n } else { 0.0 }
                ));
            }
        } else if point.variants.is_none() {
            line.push_str("  envoy: no answer");
        }
        println!("{line}");
        last_printed = point.t;
        previous = Some(point);
    }
}

/// Saves the recordings and writes the report.
fn finish(
    run: &RunDir,
    series: Series,
    tallies: Option<Tallies>,
    scenario: Scenario,
) -> anyhow::Result<report::Written> {
    let save = |name: &str, value: &dyn erased::Json| -> anyhow::Result<()> {
        let path = run.root.join(name);
        std::fs::write(&path, value.to_json()?)
            .with_context(|| format!("writing {}", path.display()))
    };
    save("series.json", &series)?;
    if let Some(t) = &tallies {
        save("users.json", t)?;
    }
    let audit = report::read_audit(&run.audit_log())?;
    Ok(report::write(
        &run.root,
        &ReportInput {
            series,
            audit,
            users: tallies,
            expected: Some(scenario.expected().into()),
        },
    )?)
}

/// `sluice-demo report`: the same report from the files a run left behind.
fn rerender(out: &Path) -> anyhow::Result<()> {
    let read = |name: &str| -> anyhow::Result<String> {
        let path = out.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let series: Series = serde_json::from_str(&read("series.json")?)?;
    let users: Option<Tallies> = read("users.json")
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let expected = series
        .scenario
        .as_deref()
        .and_then(|s| <Scenario as clap::ValueEnum>::from_str(s, false).ok())
        .map(|s| s.expected().to_string());
    let audit = report::read_audit(
        &out.join("state")
            .join(format!("{}.audit.jsonl", series.experiment)),
    )?;
    let written = report::write(
        out,
        &ReportInput {
            series,
            audit,
            users,
            expected,
        },
    )?;
    println!("{}", report::summary_text(&written.summary));
    println!("report: {}", written.html.display());
    Ok(())
}

/// Serialising two different types through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec_pretty(self)
        }
    }
}
