//! `sluice-demo`: the one-command demo rollout, and each of its parts alone.
//!
//! - `sluice-demo run --scenario good`: Envoy + model servers + users + recorder + the
//!   controller (see [`run_rollout`]), live progress, then the report and summary;
//! - `sluice-demo stack --weight 25`: the same without a controller, at a fixed weight;
//! - `sluice-demo models`: the three model servers on their ports;
//! - `sluice-demo users`: the synthetic users against a running Envoy;
//! - `sluice-demo report`: re-renders a report from a recorded run.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice_controller::assess::Assessor;
use sluice_controller::cli::{self, RunOptions};
use sluice_controller::duration::parse_duration;
use sluice_demo::models::{ModelServer, Role};
use sluice_demo::recorder::{Recorder, RecorderConfig, RoutingProbe, Series};

// The controller runs in this process, with the allocator `sluice` uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
        #[arg(long, value_parser = parse_duration)]
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
        #[arg(long, value_parser = parse_duration, default_value = "20s")]
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
    #[arg(long, value_parser = parse_duration, default_value = "240s")]
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
    /// Wait this long after the trigger before injecting the fault (e.g. past a stage's
    /// warm-up, so the stage holds healthy evidence first, as the rollback benchmark does).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    fault_delay: Duration,
    /// Move every port by this much (to run beside another Envoy).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Every port explicitly: listener,admin,stable,canary,shadow,controller (overrides
    /// --port-offset).
    #[arg(long, value_parser = Ports::parse)]
    ports: Option<Ports>,
    /// Canary weights of the ramp, percent, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = Schedule::default().stages)]
    stages: Vec<f64>,
    /// Bake time per stage (after its warm-up).
    #[arg(long, value_parser = parse_duration, default_value = "12s")]
    bake: Duration,
    /// Data ignored after each weight change.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    warmup: Duration,
    /// How often the controller evaluates.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    interval: Duration,
    /// Keep the users and the recorder running this long after the rollout ends, so the
    /// report shows where traffic went afterwards.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    tail: Duration,
    /// The error spike's share of the canary's answers that are 500 once the fault is on
    /// (default: the scenario's).
    #[arg(long)]
    error_rate: Option<f64>,
    /// Run without the filter's breaker: only the controller takes a bad canary out.
    #[arg(long)]
    no_breaker: bool,
    /// The breaker's `min_requests`: fewest canary requests in the window before it can trip.
    #[arg(long, default_value_t = stack::DEMO_BREAKER_MIN_REQUESTS)]
    breaker_min_requests: u64,
    /// The breaker's `max_error_rate`.
    #[arg(long, default_value_t = stack::DEMO_BREAKER_MAX_ERROR_RATE)]
    breaker_max_error_rate: f64,
    /// End the run once a halt (sample-ratio mismatch) has lasted this long: a halt waits for
    /// a human, so nothing else happens after it.
    #[arg(long, value_parser = parse_duration, default_value = "6s")]
    halt_grace: Duration,
}

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Exit status of `sluice-demo run` when the rollout did not end as its scenario expects.
const EXIT_UNEXPECTED: u8 = 3;

fn run_cli() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ok = std::process::ExitCode::SUCCESS;
    rt.block_on(async move {
        match cli.command {
            Cmd::Run(args) => Ok(match run_demo(args, Mode::Rollout).await? {
                Some(false) => std::process::ExitCode::from(EXIT_UNEXPECTED),
                _ => ok,
            }),
            Cmd::Stack { common, weight } => {
                run_demo(common, Mode::Fixed { weight }).await.map(|_| ok)
            }
            Cmd::Models {
                scenario,
                seed,
                port_offset,
                fault_after,
            } => models_only(scenario, seed, port_offset, fault_after)
                .await
                .map(|_| ok),
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
                Ok(ok)
            }
            Cmd::Report { out } => rerender(&out).map(|_| ok),
        }
    })
}

/// How the controller's run ended.
#[derive(Debug)]
enum RolloutEnd {
    /// Every rollout reached a final phase (or the controller was interrupted by a signal).
    Finished(Vec<sluice_controller::daemon::Status>),
    /// The rollout halted and stayed halted for the grace period: it waits for a human.
    Halted,
    /// `limit` passed first.
    TimedOut,
}

/// Runs the controller on the demo's rollout spec (`run.rollout_spec()`, state in
/// `run.state_dir`, HTTP endpoint on `run.ports.controller` so the recorder can read
/// `/status`) until the rollout is promoted or rolled back, it halts for `halt_grace`, or
/// `limit` passes.
///
/// The controller runs in-process exactly as `sluice run --exit-when-done` does
/// (`sluice_controller::cli::run` with the judge of `spec.guardrails`), on a runtime of its
/// own in its own thread: stopping it early (a halt, the time limit) drops that runtime, which
/// cancels every task of the controller, its HTTP endpoint included, before the report is
/// written. Ctrl-c reaches it too (it installs its own handler) and ends the run gracefully.
async fn run_rollout(
    run: &RunDir,
    limit: Duration,
    halt_grace: Duration,
    latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
) -> anyhow::Result<RolloutEnd> {
    let opts = RunOptions {
        files: vec![run.rollout_spec()],
        state_dir: run.state_dir.clone(),
        listen: ([127, 0, 0, 1], run.ports.controller).into(),
        exit_when_done: true,
        // The demo prints its own lines (decisions as they happen, traffic every 5 s).
        progress: false,
        // Operator token generated into the state directory, as `sluice run` does by default.
        token: cli::TokenSource::StateDir,
        allowed_hosts: Vec::new(),
        serve_wasm: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let runtime =
        sluice_controller::daemon::runtime().context("starting the controller's runtime")?;
    std::thread::Builder::new()
        .name("controller".into())
        .spawn(move || {
            let result = runtime.block_on(async move {
                tokio::select! {
                    r = cli::run(opts, |c| Ok(Assessor::from_spec(c))) => Some(r),
                    _ = stop_rx => None,
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
            let _ = done_tx.send(result);
        })
        .context("starting the controller's thread")?;
    let end = tokio::select! {
        r = &mut done_rx => return match r {
            Ok(Some(Ok(finals))) => Ok(RolloutEnd::Finished(finals)),
            Ok(Some(Err(e))) => Err(e.context("the controller failed")),
            Ok(None) | Err(_) => Err(anyhow::anyhow!("the controller stopped unexpectedly")),
        },
        _ = tokio::time::sleep(limit) => RolloutEnd::TimedOut,
        () = halt_sustained(latest, halt_grace) => RolloutEnd::Halted,
    };
    let _ = stop_tx.send(());
    let _ = done_rx.await;
    Ok(end)
}

/// Resolves once the controller's last judgement has been a halt for `grace`.
async fn halt_sustained(
    mut latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
    grace: Duration,
) {
    let mut since: Option<f64> = None;
    loop {
        if latest.changed().await.is_err() {
            return std::future::pending().await;
        }
        let point = latest.borrow_and_update().clone();
        let Some(p) = point else { continue };
        let halted = p
            .rollout
            .as_ref()
            .is_some_and(|r| r.judgement.as_deref() == Some("halt"));
        since = if halted { since.or(Some(p.at)) } else { None };
        if since.is_some_and(|s| p.at - s >= grace.as_secs_f64()) {
            return;
        }
    }
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
    // The plan is only read for its assignment; the beacon needs some secret to validate.
    let config = serde_json::json!({"version": 1, "secret": "srm-plan-only-0123456789", "experiments": [exp]});
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
    error_rate: Option<f64>,
) -> anyhow::Result<Vec<ModelServer>> {
    let mut out = Vec::new();
    for (role, port) in [
        (Role::Stable, ports.stable),
        (Role::Canary, ports.canary),
        (Role::Shadow, ports.shadow),
    ] {
        let behaviour = if faulty_from_start {
            scenario.faulty_with(role, error_rate)
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
    let models = start_models(scenario, seed, &ports, false, None).await?;
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

/// The whole demo (or the stack without a controller). Returns whether the run ended as the
/// scenario expects (`None` without a controller).
async fn run_demo(args: RunArgs, mode: Mode) -> anyhow::Result<Option<bool>> {
    let repo = stack::repo_root();
    let envoy_bin = stack::envoy_bin(&repo)?;
    let wasm = stack::filter_wasm(&repo)?;
    let ports = args
        .ports
        .unwrap_or_else(|| Ports::default().offset(args.port_offset));
    ports.check_free()?;
    let weight = match mode {
        Mode::Rollout => 0.0,
        Mode::Fixed { weight } => weight,
    };
    let run = stack::prepare(&repo, &args.out, &wasm, ports, weight)?;
    let schedule = Schedule {
        stages: args.stages.clone(),
        bake: args.bake,
        warmup: args.warmup,
        interval: args.interval,
        shadow: args.shadow.then(|| Duration::from_secs(15)),
        breaker: (!args.no_breaker)
            .then(|| stack::breaker_json(args.breaker_min_requests, args.breaker_max_error_rate)),
    };
    let breaker = schedule.breaker.is_some();
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
        scenario.expected_with(breaker),
        run.root.display()
    );
    if let Some(b) = &schedule.breaker {
        println!("breaker in the filter: {b}");
    }
    if mode == Mode::Rollout {
        println!(
            "ramp {} %, each stage: warm-up {:?} + bake {:?}; evaluated every {:?}; {} req/s from {} users",
            schedule
                .stages
                .iter()
                .map(|w| format!("{w}"))
                .collect::<Vec<_>>()
                .join(" → "),
            schedule.warmup,
            schedule.bake,
            schedule.interval,
            args.rate,
            args.users
        );
    }
    let models = start_models(
        scenario,
        args.seed,
        &ports,
        trigger == Some(FaultTrigger::FromStart),
        args.error_rate,
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
    let probe = RoutingProbe::start(
        &ports.admin_url(),
        stack::TREATMENT,
        Duration::from_millis(50),
    );
    let load = LoadHandle::default();
    let users_task = tokio::spawn(users::run(
        LoadConfig {
            base_url: ports.listener_url(),
            users: args.users,
            rate: args.rate,
            duration: args.duration_limit + args.tail + Duration::from_secs(5),
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
        FaultPlan {
            scenario,
            error_rate: args.error_rate,
            breaker,
            trigger,
            fixed_weight: weight,
            delay: args.fault_delay,
        },
        recorder.latest(),
        models,
        load.clone(),
        done_rx.clone(),
    ));
    let progress = tokio::spawn(print_progress(recorder.latest(), done_rx));

    let outcome = match mode {
        Mode::Rollout => {
            match run_rollout(
                &run,
                args.duration_limit,
                args.halt_grace,
                recorder.latest(),
            )
            .await
            {
                Ok(RolloutEnd::Finished(finals)) => {
                    if finals.iter().any(|s| !s.state.phase.is_final()) {
                        println!("controller interrupted before the rollout ended");
                    }
                    let status = serde_json::to_value(&finals).unwrap_or_default();
                    if let Some(r) = sluice_demo::recorder::rollout_of(&status, stack::EXPERIMENT) {
                        recorder.set_final_rollout(r);
                    }
                    Ok(())
                }
                Ok(RolloutEnd::Halted) => {
                    println!(
                        "halted for {:?}: the rollout waits for a human; ending the run",
                        args.halt_grace
                    );
                    Ok(())
                }
                Ok(RolloutEnd::TimedOut) => {
                    println!(
                        "time limit ({:?}) reached before the rollout ended",
                        args.duration_limit
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Mode::Fixed { .. } => {
            tokio::select! {
                _ = tokio::time::sleep(args.duration_limit) => {}
                _ = tokio::signal::ctrl_c() => println!("interrupted: writing the report"),
            }
            Ok(())
        }
    };
    if outcome.is_ok() && !args.tail.is_zero() {
        // Where the traffic goes after the decision, for the report's plots.
        tokio::time::sleep(args.tail).await;
    }

    load.stop();
    let _ = done_tx.send(true);
    let tallies = users_task.await.ok().and_then(Result::ok);
    let (fault_at, models) = injector.await.unwrap_or_default();
    if let Some(at) = fault_at {
        recorder.mark_fault(at);
    }
    let _ = progress.await;
    let routing = probe.finish().await;
    let canary_last_arrival = models
        .iter()
        .find(|m| m.role() == Role::Canary)
        .and_then(ModelServer::last_request_at);
    drop(models);
    recorder.set_routing(Some(routing), canary_last_arrival);
    let mut series = recorder.finish().await;
    series.breaker = schedule.breaker.clone();
    drop(envoy);
    let written = finish(&run, series, tallies, scenario, mode == Mode::Rollout)?;
    println!("\n{}", report::summary_text(&written.summary));
    println!(
        "report: {}\nsummary: {}",
        written.html.display(),
        written.json.display()
    );
    outcome?;
    Ok(match mode {
        Mode::Rollout => written.summary.as_expected,
        Mode::Fixed { .. } => None,
    })
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Waits for the trigger, switches the canary (and shadow) to the faulty behaviour or turns
/// the SRM fault on, and keeps the SRM plan in step with the weight. Returns when the fault
/// started, if it did, and the model servers (still serving) once the run is over.
/// What to inject and when.
struct FaultPlan {
    scenario: Scenario,
    /// The error spike's share of 500s, if not the scenario's.
    error_rate: Option<f64>,
    /// The experiment has the filter's breaker.
    breaker: bool,
    trigger: Option<FaultTrigger>,
    /// The weight in force without a controller.
    fixed_weight: f64,
    /// Wait after the trigger.
    delay: Duration,
}

async fn inject_fault(
    plan: FaultPlan,
    mut latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
    models: Vec<ModelServer>,
    load: LoadHandle,
    mut done: watch::Receiver<bool>,
) -> (Option<f64>, Vec<ModelServer>) {
    let FaultPlan {
        scenario,
        error_rate,
        breaker,
        trigger,
        fixed_weight,
        delay,
    } = plan;
    let mut fault_at = None;
    let mut srm_weight = None;
    if trigger == Some(FaultTrigger::FromStart) {
        fault_at = Some(now());
    }
    let Some(trigger) = trigger else {
        let _ = done.wait_for(|d| *d).await;
        return (None, models);
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
                if !delay.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = done.wait_for(|d| *d) => break,
                    }
                }
                for m in &models {
                    m.set_behaviour(scenario.faulty_with(m.role(), error_rate));
                }
                fault_at = Some(now());
                println!(
                    "{:>6.1}s  FAULT INJECTED: {} ({})",
                    point.t + delay.as_secs_f64(),
                    scenario.name(),
                    scenario.expected_with(breaker)
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
    (fault_at, models)
}

/// A line whenever the rollout's phase, weight or hold changes, and a compact traffic line
/// every five seconds, from the recorder's newest point.
async fn print_progress(
    mut latest: watch::Receiver<Option<sluice_demo::recorder::Point>>,
    mut done: watch::Receiver<bool>,
) {
    let mut last_printed = -5.0;
    let mut previous: Option<sluice_demo::recorder::Point> = None;
    let mut last_state: Option<String> = None;
    let mut previous_trips: Option<BTreeMap<String, f64>> = None;
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = done.wait_for(|d| *d) => return,
        }
        let Some(point) = latest.borrow_and_update().clone() else {
            continue;
        };
        if let Some(line) = breaker_line(&point, previous_trips.as_ref()) {
            println!("{:>6.1}s  ⚡ {line}", point.t);
        }
        if let Some(v) = &point.variants {
            previous_trips = Some(
                v.iter()
                    .map(|(name, p)| (name.clone(), p.breaker_trips.values().sum::<f64>()))
                    .collect(),
            );
        }
        if let Some(r) = &point.rollout {
            let state = rollout_state_line(r);
            if last_state.as_ref() != Some(&state) {
                println!("{:>6.1}s  ▶ {state}", point.t);
                last_state = Some(state);
            }
        }
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
                "  weight {:.0}%  judge: {}",
                r.weight,
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
                let clicks = v.outcomes.get("click").copied().unwrap_or(0.0)
                    - b.outcomes.get("click").copied().unwrap_or(0.0);
                line.push_str(&format!(
                    "  | {name}: {:.0} req/s, 5xx {:.1}%, clicks {:.1}%",
                    n / dt,
                    if n > 0.0 { 100.0 * errors / n } else { 0.0 },
                    if n > 0.0 { 100.0 * clicks / n } else { 0.0 },
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

/// A line when Envoy's counters show a new trip of the filter's breaker since the previous
/// point: which variant, on which failures. The filter acts on its own within a second; the
/// controller's rollback (a `▶` line) follows at its next evaluation.
fn breaker_line(
    point: &sluice_demo::recorder::Point,
    previous: Option<&BTreeMap<String, f64>>,
) -> Option<String> {
    let previous = previous?;
    let mut out = Vec::new();
    for (name, v) in point.variants.as_ref()? {
        let trips: f64 = v.breaker_trips.values().sum();
        if trips > previous.get(name).copied().unwrap_or(0.0) {
            let reason = v
                .breaker_trips
                .iter()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(r, _)| r.as_str())
                .unwrap_or("?");
            out.push(format!(
                "BREAKER TRIPPED in the data plane: {name} ({reason}) — the filter sends its users to the control"
            ));
        }
    }
    (!out.is_empty()).then(|| out.join("; "))
}

/// The rollout's state in words: phase, stage, weights, and why it holds or ended.
fn rollout_state_line(r: &sluice_demo::recorder::RolloutPoint) -> String {
    let mut line = match (r.phase.as_str(), r.stage) {
        ("canary", Some(i)) => format!("stage {}: canary at {:.0} %", i + 1, r.weight),
        ("promoted", _) => format!("PROMOTED: canary at {:.0} %", r.weight),
        ("rolled_back", _) => format!("ROLLED BACK: canary at {:.0} %", r.weight),
        (phase, _) => format!("{phase}: canary at {:.0} %", r.weight),
    };
    if (r.target_weight - r.weight).abs() > 1e-9 {
        line.push_str(&format!(" (pushing {:.0} %)", r.target_weight));
    }
    if let Some(reason) = &r.rolled_back_reason {
        line.push_str(&format!(" — {reason}"));
    } else if let Some(h) = &r.held {
        line.push_str(&format!(" — HELD: {h}"));
    }
    line
}

/// Saves the recordings and writes the report.
fn finish(
    run: &RunDir,
    series: Series,
    tallies: Option<Tallies>,
    scenario: Scenario,
    with_controller: bool,
) -> anyhow::Result<report::Written> {
    let breaker = series.breaker.is_some();
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
            expected: Some(scenario.expected_with(breaker).into()),
            // Without a controller nothing decides, so there is nothing to check.
            expectation: with_controller.then(|| scenario.expectation_with(breaker)),
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
    let scenario = series
        .scenario
        .as_deref()
        .and_then(|s| <Scenario as clap::ValueEnum>::from_str(s, false).ok());
    // A run with a controller left its status in the series.
    let with_controller = series.points.iter().any(|p| p.rollout.is_some());
    let breaker = series.breaker.is_some();
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
            expected: scenario.map(|s| s.expected_with(breaker).to_string()),
            expectation: scenario
                .filter(|_| with_controller)
                .map(|s| s.expectation_with(breaker)),
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
