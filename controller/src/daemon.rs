//! The daemon: one task per rollout that reads counters, asks the judge, steps the state
//! machine, persists, and carries out the effects (push, notify, audit).
//!
//! Side effects sit behind small traits or enums with one real implementation each (source,
//! sink, judge, clock); shutdown is a future passed in, and time comes from a [`Clock`] so the
//! loop runs under `tokio::time::pause()` in tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::notify::{Notice, Notifier};
use crate::rollout::{self, Command, Effect, EventKind, Input, Judgement, Phase, State};
use crate::sink::ecds_file::EcdsFile;
use crate::sink::ecds_grpc::{EcdsGrpc, Servers};
use crate::sink::istio::IstioWasmPlugin;
use crate::sink::{Sink, SinkError};
use crate::source::envoy_admin::{AdminHub, EnvoyAdmin};
use crate::source::prometheus::Prometheus;
use crate::source::{Accumulator, OriginScrape, Reading, Source, SourceError};
use crate::spec::{Checked, SinkSpec, SourceSpec};
use crate::store::Store;
use sluice_filter::metrics;

/// The runtime the daemon runs on: one thread for every rollout (file writes that wait for
/// the disk go to blocking threads, see [`crate::durable::off_thread`]).
///
/// The work is waiting on sockets: a tick of 10 rollouts over 1000 Envoys is ~0.1 s of CPU
/// every 10 s. On one thread no task is handed between threads: about a fifth less CPU per
/// tick than tokio's multi-threaded scheduler (docs/benchmarks.md, "Controller cost").
///
/// It also keeps memory freed at the end of a tick for the next one ([`keep_freed_memory`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    keep_freed_memory();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h; the Rust binding
/// leaves it unnamed). The test `the_allocator_option_is_the_purge_delay` checks the number.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc (the binaries' allocator) keeps freed memory before returning it to the
/// system.
///
/// A tick allocates the same ~30 MiB every time (answers' values, one read per Envoy) and frees
/// it at the end. With mimalloc's default of 1 s, those pages would go back to the system
/// between ticks and each tick would fault in fresh zeroed ones: about a quarter of a tick's
/// CPU, in the kernel (docs/benchmarks.md, "Controller cost"). Kept for a minute, they are
/// reused at every interval up to a minute; memory a shrinking workload no longer needs still
/// goes back.
const FREED_MEMORY_KEPT_MS: std::os::raw::c_long = 60_000;

fn keep_freed_memory() {
    // SAFETY: sets one integer option; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, FREED_MEMORY_KEPT_MS) };
}

/// Wall-clock time in Unix seconds.
pub trait Clock: Send + Sync {
    fn now(&self) -> f64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// A clock reading (Unix seconds) as a [`SystemTime`]; a reading before 1970 or not finite
/// is the epoch itself.
fn system_time(unix: f64) -> SystemTime {
    UNIX_EPOCH + Duration::try_from_secs_f64(unix.max(0.0)).unwrap_or_default()
}

/// Tokio's clock from a fixed origin: follows `tokio::time::pause()` and `advance()`.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    epoch: f64,
}

impl TokioClock {
    pub fn starting_at(epoch: f64) -> TokioClock {
        TokioClock {
            origin: tokio::time::Instant::now(),
            epoch,
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> f64 {
        self.epoch + self.origin.elapsed().as_secs_f64()
    }
}

/// The configured source.
#[derive(Debug, Clone)]
pub enum AnySource {
    EnvoyAdmin(EnvoyAdmin),
    Prometheus(Prometheus),
}

impl AnySource {
    /// The source of `spec` for a rollout evaluated every `interval`; Envoy admin sources
    /// share their requests through `hub` (one per controller).
    pub fn from_spec(spec: &SourceSpec, hub: &Arc<AdminHub>, interval: Duration) -> AnySource {
        match spec {
            SourceSpec::EnvoyAdmin(a) => AnySource::EnvoyAdmin(
                EnvoyAdmin::shared(hub, &a.endpoints, a.timeout, a.min_healthy, interval)
                    .limits(a.limits),
            ),
            SourceSpec::Prometheus(p) => AnySource::Prometheus(
                Prometheus::new(&p.url, p.timeout, p.max_age).limits(p.limits),
            ),
        }
    }
}

impl AnySource {
    /// This source keeping only the series of `variants` (the experiment's).
    pub fn variants(self, variants: &[String]) -> AnySource {
        match self {
            AnySource::EnvoyAdmin(s) => AnySource::EnvoyAdmin(s.variants(variants)),
            AnySource::Prometheus(s) => AnySource::Prometheus(s.variants(variants)),
        }
    }
}

impl Source for AnySource {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        match self {
            AnySource::EnvoyAdmin(s) => s.scrape(experiment).await,
            AnySource::Prometheus(s) => s.scrape(experiment).await,
        }
    }
}

/// The configured sink.
#[derive(Debug, Clone)]
pub enum AnySink {
    EcdsFile(EcdsFile),
    IstioWasmPlugin(IstioWasmPlugin<AnySource>),
    EcdsGrpc(EcdsGrpc),
}

impl AnySink {
    /// The sink `spec` of `rollout` describes; an ecdsGrpc sink joins (or starts) the server
    /// on its `listen` address in `servers`, and fails when that address cannot be bound or
    /// its tls block is unusable or differs from the other rollouts' on that address.
    pub async fn from_spec(
        spec: &SinkSpec,
        servers: &Servers,
        rollout: &str,
    ) -> Result<AnySink, std::io::Error> {
        Ok(match spec {
            SinkSpec::EcdsGrpc(g) => {
                let listen: std::net::SocketAddr = g.listen.parse().map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("listen {:?}: {e}", g.listen),
                    )
                })?;
                AnySink::EcdsGrpc(EcdsGrpc {
                    hub: servers.join(listen, g.tls.as_ref(), rollout).await?,
                    listen,
                    resource: g.resource.clone(),
                    code: g.wasm.clone(),
                    min_proxies: g.min_proxies,
                    confirm_within: g.confirm_within,
                    tls: g.tls.is_some(),
                })
            }
            SinkSpec::EcdsFile(f) => AnySink::EcdsFile(EcdsFile {
                path: f.path.clone().into(),
                resource: f.resource.clone(),
                code: f.wasm.clone(),
                proxies: f
                    .proxies
                    .iter()
                    .map(|p| crate::source::admin::Admin::new(p, Duration::from_secs(2)))
                    .collect(),
                confirm_within: f.confirm_within,
            }),
            SinkSpec::IstioWasmPlugin(w) => AnySink::IstioWasmPlugin(IstioWasmPlugin {
                target: crate::sink::istio::Target {
                    kind: w.kind,
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                },
                kube: crate::sink::istio::Kube::new(w.context.clone()),
                source: None,
                min_proxies: w.min_proxies,
                confirm_within: w.confirm_within,
                max_conflicts: w.max_conflicts,
                poll: crate::sink::istio::POLL,
            }),
        })
    }

    /// This sink, confirming from `source` where it confirms from the data plane.
    pub fn reading(self, source: &AnySource) -> AnySink {
        match self {
            AnySink::IstioWasmPlugin(s) => AnySink::IstioWasmPlugin(IstioWasmPlugin {
                source: Some(source.clone()),
                ..s
            }),
            other => other,
        }
    }
}

impl Sink for AnySink {
    async fn push(
        &self,
        config: &sluice_filter::config::FilterConfig,
        version: u64,
    ) -> Result<crate::sink::Receipt, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.push(config, version).await,
            AnySink::IstioWasmPlugin(s) => s.push(config, version).await,
            AnySink::EcdsGrpc(s) => s.push(config, version).await,
        }
    }

    async fn in_force(
        &self,
        config: &sluice_filter::config::FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.in_force(config, version).await,
            AnySink::IstioWasmPlugin(s) => s.in_force(config, version).await,
            AnySink::EcdsGrpc(s) => s.in_force(config, version).await,
        }
    }
}

/// `metric` of `experiment` per variant.
fn per_variant(reading: &Reading, metric: &str, experiment: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, v) in &reading.series {
        if k.name == metric && k.label("experiment") == Some(experiment) {
            if let Some(variant) = k.label("variant") {
                *out.entry(variant.to_string()).or_insert(0) += *v as u64;
            }
        }
    }
    out
}

/// Requests of `experiment` per variant (`sluice_requests_total`).
fn observed_requests(reading: &Reading, experiment: &str) -> BTreeMap<String, u64> {
    per_variant(reading, metrics::REQUESTS, experiment)
}

/// Requests that carried a user key, per variant: the ones the weights split. Keyless requests
/// go where `unit.missing` sends them (the control by default), whatever the weights.
fn keyed_requests(reading: &Reading, experiment: &str) -> BTreeMap<String, u64> {
    let keyless = per_variant(reading, metrics::MISSING_KEY, experiment);
    let mut out = observed_requests(reading, experiment);
    for (variant, n) in &mut out {
        *n = n.saturating_sub(keyless.get(variant).copied().unwrap_or(0));
    }
    out
}

/// What the judge needs to know besides the counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub experiment: String,
    pub control: String,
    pub treatment: String,
    /// Treatment weight in force (percent).
    pub weight: f64,
    /// Data before this time (Unix seconds) belongs to an earlier stage or warm-up.
    pub evidence_from: f64,
    pub now: f64,
}

/// The judge's answer for one evaluation, with details for the audit log and `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub judgement: Judgement,
    pub detail: serde_json::Value,
}

/// Turns readings into judgements. The judge keeps its own sequential state between calls.
pub trait Assess: Send {
    fn assess(&mut self, reading: &Reading, ctx: &Context) -> Assessment;
}

/// Everything one rollout task needs.
pub struct Task<S: Source, K: Sink, A: Assess, C: Clock> {
    pub checked: Checked,
    pub source: S,
    pub sinks: Vec<K>,
    pub judge: A,
    pub store: Store,
    pub notifier: Notifier,
    pub clock: C,
}

/// The live view of one rollout, for `/status`, `/metrics` and the terminal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub name: String,
    pub state: State,
    pub stages: Vec<f64>,
    pub target_weight: f64,
    pub bake_left_secs: Option<f64>,
    pub last_judgement: Option<Judgement>,
    /// Shared with the published copies: a status is cloned into the watch channel at every
    /// evaluation, and the detail and events are its bulk.
    pub last_detail: Arc<serde_json::Value>,
    pub last_evaluated_at: Option<f64>,
    pub scrape_errors: u64,
    pub push_errors: u64,
    /// Requests per variant the proxies counted since this daemon started, summed over
    /// proxies and across their restarts (the judge's evidence is a subset: after warm-ups).
    pub observed_requests: BTreeMap<String, u64>,
    /// Proxy restarts seen since this daemon started: a new process behind an endpoint, told by
    /// its uptime (counters going down only where a proxy gives no uptime).
    pub proxy_restarts: u64,
    /// Seconds from decision to confirmation of the last push.
    pub last_push_latency_secs: Option<f64>,
    /// Proxies by the configuration version they report running (`sluice_config_revision`),
    /// at the last evaluation; see [`crosscheck`].
    pub proxies_by_revision: BTreeMap<u64, usize>,
    pub events: Arc<Vec<EventRecord>>,
    /// Why this rollout stopped running (its state could not be loaded, or a file could not
    /// be written); `None` while it runs or after it ended normally.
    pub error: Option<String>,
    /// Per ecdsGrpc sink, the proxies connected to its server for this rollout's resource;
    /// filled in when `/status` is asked ([`Handle::status_now`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<crate::sink::ecds_grpc::SinkProxies>,
    /// The trip of the treatment by the filter's breaker, once the controller saw one (the
    /// rollout was then rolled back by the data plane; see [`breaker`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<breaker::Trip>,
}

/// A notable event, as kept in the status and written to the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub at: f64,
    pub kind: EventKind,
    pub message: String,
    pub weight: f64,
    /// For a rollback: what caused it (`breaker`, `judge`, `operator`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'static str>,
}

/// Most recent events kept in the status.
const EVENTS_KEPT: usize = 50;

/// Handle to a running rollout.
#[derive(Debug, Clone)]
pub struct Handle {
    pub name: String,
    commands: mpsc::Sender<Order>,
    pub status: watch::Receiver<Status>,
    /// The rollout's ecdsGrpc sinks, whose proxies `/status` lists.
    pub ecds_grpc: Vec<EcdsGrpc>,
}

impl Handle {
    /// The published status with the ecdsGrpc sinks' proxies as they are now.
    pub fn status_now(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.proxies = self.ecds_grpc.iter().map(EcdsGrpc::proxies).collect();
        s
    }
}

/// An operator command and where to report once it is applied.
#[derive(Debug)]
struct Order {
    command: Command,
    applied: oneshot::Sender<State>,
}

/// What became of an operator command.
#[derive(Debug)]
pub enum Ordered {
    /// Applied and persisted; the state after it.
    Applied(State),
    /// Queued, but the rollout was still busy with a step when the wait ended; it is applied
    /// right after that step.
    Queued,
    /// The rollout is no longer running.
    Gone,
}

impl Handle {
    /// Gives the rollout an operator command and waits up to `wait` for it to be applied and
    /// persisted. Commands are applied between steps, so the wait is at most one evaluation.
    pub async fn order(&self, command: Command, wait: Duration) -> Ordered {
        let (applied, done) = oneshot::channel();
        if self
            .commands
            .send(Order { command, applied })
            .await
            .is_err()
        {
            return Ordered::Gone;
        }
        match tokio::time::timeout(wait, done).await {
            Ok(Ok(state)) => Ordered::Applied(state),
            Ok(Err(_)) => Ordered::Gone,
            Err(_) => Ordered::Queued,
        }
    }
}

fn plan_of(checked: &Checked) -> rollout::Plan {
    let s = &checked.rollout.spec;
    rollout::Plan {
        stages: checked.stages.clone(),
        shadow_secs: s.shadow.as_ref().map(|x| x.duration.as_secs_f64()),
        warmup_secs: s.schedule.warmup.as_secs_f64(),
        interval_secs: s.schedule.interval.as_secs_f64(),
    }
}

/// How long after a tick that started at `started` (Unix seconds) the next one starts: at the
/// first multiple of `period` since the epoch at least half a period later. Rollouts with the
/// same interval tick together, so their sources can share one scrape of each Envoy (see
/// [`crate::source::envoy_admin`]); a tick that overran skips to the next multiple.
fn after_tick(started: f64, period: Duration) -> Duration {
    let p = period.as_secs_f64();
    if !(p > 0.0 && started.is_finite()) {
        return period;
    }
    let next = ((started + p / 2.0) / p).floor() * p + p;
    Duration::from_secs_f64((next - started).max(0.0))
}

/// Why the configuration for a weight could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("render: {0}")]
pub struct RenderError(sluice_filter::config::ConfigError);

/// Why a rollout task stopped.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source} (fix or remove the file; the rollout does not run until then)")]
    InvalidState {
        path: String,
        #[source]
        source: rollout::InvalidState,
    },
}

impl Status {
    /// The status of a rollout in `state`, before its first evaluation.
    fn initial(
        name: &str,
        stages: Vec<f64>,
        state: State,
        plan: &rollout::Plan,
        now: f64,
    ) -> Status {
        Status {
            name: name.to_string(),
            target_weight: state.target_weight(plan),
            bake_left_secs: state.bake_left(plan, now),
            stages,
            state,
            last_judgement: None,
            last_detail: Arc::new(serde_json::Value::Null),
            last_evaluated_at: None,
            scrape_errors: 0,
            push_errors: 0,
            observed_requests: BTreeMap::new(),
            proxy_restarts: 0,
            last_push_latency_secs: None,
            proxies_by_revision: BTreeMap::new(),
            events: Arc::default(),
            error: None,
            proxies: Vec::new(),
            breaker: None,
        }
    }

    /// The status of a rollout that is not running because of `error`.
    pub fn stopped(name: &str, stages: Vec<f64>, error: String) -> Status {
        let idle = rollout::Plan {
            stages: Vec::new(),
            shadow_secs: None,
            warmup_secs: 0.0,
            interval_secs: 0.0,
        };
        Status {
            error: Some(error),
            ..Status::initial(name, stages, State::new(name, 0.0), &idle, 0.0)
        }
    }
}

impl Handle {
    /// A handle to a rollout that does not run (see [`Status::stopped`]): commands to it are
    /// answered [`Ordered::Gone`].
    pub fn stopped(status: Status) -> Handle {
        let (commands, _) = mpsc::channel(1);
        let (_, status_rx) = watch::channel(status.clone());
        Handle {
            name: status.name,
            commands,
            status: status_rx,
            ecds_grpc: Vec::new(),
        }
    }
}

impl<S, K, A, C> Task<S, K, A, C>
where
    S: Source + Send + Sync + 'static,
    K: Sink + Send + Sync + 'static,
    A: Assess + 'static,
    C: Clock + 'static,
{
    /// Starts the task; it runs until `shutdown` resolves (finishing the current step and
    /// persisting first) or, with `exit_when_final`, until the rollout ends.
    pub fn spawn(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        exit_when_final: bool,
    ) -> Result<(Handle, tokio::task::JoinHandle<Result<State, TaskError>>), TaskError> {
        let name = self.checked.name().to_string();
        let now = self.clock.now();
        let loaded = self.store.load()?;
        let plan = plan_of(&self.checked);
        if let Some(state) = &loaded {
            state
                .check(&plan, &name)
                .map_err(|source| TaskError::InvalidState {
                    path: self.store.state_path().display().to_string(),
                    source,
                })?;
        }
        let restarted = loaded.is_some();
        let state = loaded.unwrap_or_else(|| State::new(&name, now));
        let confirmed = (restarted && state.pending.is_none()).then_some(state.version);
        let stages = plan.stages.iter().map(|s| s.weight).collect();
        let status = Status::initial(&name, stages, state.clone(), &plan, now);
        let (status_tx, status_rx) = watch::channel(status.clone());
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let cross_grace = crosscheck::grace(&self.checked);
        let runner = Runner {
            task: self,
            plan,
            state,
            status,
            status_tx,
            accumulator: Accumulator::default(),
            split_base: None,
            keyed: BTreeMap::new(),
            split_repushed: None,
            split_hold: None,
            unverified: None,
            cross: crosscheck::CrossCheck::default(),
            cross_grace,
            breaker: breaker::Watch::default(),
            cause: None,
            confirmed,
        };
        let join = tokio::spawn(runner.run(cmd_rx, shutdown, restarted, exit_when_final));
        Ok((
            Handle {
                name,
                commands: cmd_tx,
                status: status_rx,
                ecds_grpc: Vec::new(),
            },
            join,
        ))
    }
}

struct Runner<S: Source, K: Sink, A: Assess, C: Clock> {
    task: Task<S, K, A, C>,
    plan: rollout::Plan,
    state: State,
    status: Status,
    status_tx: watch::Sender<Status>,
    accumulator: Accumulator,
    /// Requests per variant counted when the evidence of the confirmed `version` began (after
    /// its warm-up): the observed split is measured from there.
    split_base: Option<(u64, BTreeMap<String, u64>)>,
    /// Keyed requests per variant at the last evaluation.
    keyed: BTreeMap<String, u64>,
    /// The version pushed again because the observed split differed from the state's weight.
    split_repushed: Option<u64>,
    /// The split still differs although that push was confirmed: pushing again cannot help,
    /// so the rollout holds until it matches.
    split_hold: Option<String>,
    /// Why the last check of what the proxies serve could not be made, if it could not.
    unverified: Option<String>,
    /// The data plane's revisions against the sinks' confirmation.
    cross: crosscheck::CrossCheck,
    /// Seconds after a confirmation a proxy may still report the version before.
    cross_grace: f64,
    /// New trips of the filter's breaker.
    breaker: breaker::Watch,
    /// The cause of a rollback the input being applied may make (see [`EventRecord::cause`]).
    cause: Option<&'static str>,
    /// The version the proxies confirmed last, when this process knows it (the state keeps
    /// only the last version pushed).
    confirmed: Option<u64>,
}

/// Requests (all variants) since the confirmation before the observed split is compared with
/// the confirmed weight.
const SPLIT_MIN_REQUESTS: u64 = 200;
/// How far (as a share of requests) the treatment's observed share may be from its weight
/// before the proxies are taken to serve something else, on top of 5 standard errors. Coarse
/// on purpose: the judge's sample-ratio test looks for subtle imbalance, this looks for a
/// proxy serving another weight (25 % configured, 50 % served). A client dropping user ids on
/// 40 % of a 25 % canary's requests moves the share by 10 points: that is the sample-ratio
/// test's to halt on, not a reason to push again.
const SPLIT_BAND: f64 = 0.15;

/// How the observed split compares with the state's weight.
#[derive(Debug, Clone, PartialEq)]
enum Split {
    /// Too few requests yet.
    Unknown,
    Matches,
    /// Grossly different; the reason names both numbers.
    Differs(String),
}

/// The share of `treatment` among the keyed requests counted since `base`, against `weight`
/// (percent).
fn split_of(
    base: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    treatment: &str,
    weight: f64,
) -> Split {
    let since = |v: &str| {
        now.get(v)
            .copied()
            .unwrap_or(0)
            .saturating_sub(base.get(v).copied().unwrap_or(0))
    };
    let total: u64 = now.keys().map(|v| since(v)).sum();
    if total < SPLIT_MIN_REQUESTS {
        return Split::Unknown;
    }
    let share = since(treatment) as f64 / total as f64;
    let p = (weight / 100.0).clamp(0.0, 1.0);
    let sigma = (p * (1.0 - p) / total as f64).sqrt();
    if (share - p).abs() > SPLIT_BAND + 5.0 * sigma {
        Split::Differs(format!(
            "{treatment} got {:.1} % of {total} keyed requests since the confirmation, the state says {weight} %",
            share * 100.0
        ))
    } else {
        Split::Matches
    }
}

impl<S, K, A, C> Runner<S, K, A, C>
where
    S: Source + Send + Sync,
    K: Sink + Send + Sync,
    A: Assess,
    C: Clock,
{
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Order>,
        shutdown: impl Future<Output = ()> + Send,
        restarted: bool,
        exit_when_final: bool,
    ) -> Result<State, TaskError> {
        let result = self
            .run_steps(&mut commands, shutdown, restarted, exit_when_final)
            .await;
        if let Err(e) = &result {
            // Stopped for good: say why in the log and the status, so `/status` and the
            // progress line show it (the process exits non-zero once the other rollouts are
            // done).
            tracing::error!(rollout = %self.status.name, error = %e, "rollout stopped");
            self.status.error = Some(format!("{e}"));
            self.publish();
        }
        result
    }

    async fn run_steps(
        &mut self,
        commands: &mut mpsc::Receiver<Order>,
        shutdown: impl Future<Output = ()> + Send,
        restarted: bool,
        exit_when_final: bool,
    ) -> Result<State, TaskError> {
        tokio::pin!(shutdown);
        if restarted {
            // Before the restart's push clears it: a trip made while no controller ran.
            self.check_breaker_on_restart().await?;
            self.apply(Input::Restarted).await?;
        }
        let period = self.task.checked.rollout.spec.schedule.interval;
        // The first tick at once, the next ones on multiples of the interval.
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(order) = commands.recv() => {
                    self.apply(Input::Command(order.command)).await?;
                    let _ = order.applied.send(self.state.clone());
                    continue;
                }
                () = tokio::time::sleep_until(next) => {}
            }
            let started = self.task.clock.now();
            next = tokio::time::Instant::now() + after_tick(started, period);
            self.apply(Input::Tick).await?;
            self.retry_pending_push().await?;
            // A finished rollout run with `exit_when_final` only finishes its last push.
            if !(exit_when_final && self.state.phase.is_final()) {
                self.check_in_force().await?;
            }
            if !self.state.phase.is_final() && self.state.phase != Phase::Pending {
                self.evaluate().await?;
            }
            if exit_when_final && self.state.phase.is_final() && self.state.pending.is_none() {
                break;
            }
        }
        self.task.store.save(&self.state).await?;
        // The last notices (promoted, rolled back) must not die with the process.
        self.task.notifier.flush().await;
        Ok(self.state.clone())
    }

    /// The configuration pushed for `weight`, with the shadow section only in the shadow stage.
    fn config(
        &self,
        weight: f64,
        shadow: bool,
    ) -> Result<sluice_filter::config::FilterConfig, RenderError> {
        let mut c = self.task.checked.render(weight).map_err(RenderError)?;
        if !shadow {
            for e in &mut c.experiments {
                e.shadow = None;
            }
        }
        Ok(c)
    }

    /// Asks every sink whether the proxies still serve the confirmed configuration; if one
    /// says they do not, the machine pushes it again.
    async fn check_in_force(&mut self) -> Result<(), TaskError> {
        self.unverified = None;
        if self.state.pending.is_some() || self.state.phase == Phase::Pending {
            return Ok(());
        }
        let shadow = self.state.phase == Phase::Shadow;
        let config = match self.config(self.state.weight, shadow) {
            Ok(c) => c,
            Err(e) => {
                self.unverified = Some(e.to_string());
                return Ok(());
            }
        };
        for sink in &self.task.sinks {
            match sink.in_force(&config, self.state.version).await {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    tracing::warn!(rollout = %self.status.name, %reason, "proxies diverged from the state");
                    return self.apply(Input::Drifted { reason }).await;
                }
                Err(e) => {
                    tracing::warn!(rollout = %self.status.name, error = %e, "cannot check the configuration in force");
                    self.unverified = Some(e.to_string());
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Steps the machine, persists, then carries out the effects (pushes feed back in).
    async fn apply(&mut self, input: Input) -> Result<(), TaskError> {
        let cause = match &input {
            Input::Command(Command::Abort) => Some("operator"),
            Input::Judged {
                judgement: Judgement::Fail { .. },
                ..
            } => Some(self.cause.unwrap_or("judge")),
            _ => None,
        };
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let now = self.task.clock.now();
            let confirming = match &input {
                Input::PushConfirmed { version } => Some(*version),
                _ => None,
            };
            let effects = rollout::step(&mut self.state, &self.plan, input, now);
            if confirming.is_some() && self.state.pending.is_none() {
                self.confirmed = confirming;
            }
            // Persist before acting: a crash between the two replays the decision safely.
            self.task.store.save(&self.state).await?;
            for effect in effects {
                match effect {
                    Effect::Push {
                        version,
                        weight,
                        shadow,
                    } => queue.push(self.push(version, weight, shadow).await),
                    Effect::Event { kind, message } => {
                        let cause = cause.filter(|_| kind == EventKind::RolledBack);
                        self.event(kind, message, cause).await?
                    }
                }
            }
        }
        self.publish();
        Ok(())
    }

    async fn retry_pending_push(&mut self) -> Result<(), TaskError> {
        if let Some(p) = self.state.pending.clone() {
            let shadow = self.state.phase == Phase::Shadow;
            let result = self.push(p.version, p.weight, shadow).await;
            self.apply(result).await?;
        }
        Ok(())
    }

    /// Pushes to every sink; the result as a machine input.
    async fn push(&mut self, version: u64, weight: f64, shadow: bool) -> Input {
        let config = match self.config(weight, shadow) {
            Ok(c) => c,
            Err(e) => {
                return Input::PushFailed {
                    version,
                    error: e.to_string(),
                }
            }
        };
        let decided = self
            .state
            .pending
            .as_ref()
            .map_or(self.task.clock.now(), |p| p.decided_at);
        for sink in &self.task.sinks {
            if let Err(e) = sink.push(&config, version).await {
                self.status.push_errors += 1;
                tracing::warn!(rollout = %self.status.name, version, error = %e, "push failed");
                return Input::PushFailed {
                    version,
                    error: e.to_string(),
                };
            }
        }
        let latency = self.task.clock.now() - decided;
        self.status.last_push_latency_secs = Some(latency);
        tracing::info!(rollout = %self.status.name, version, weight, latency_secs = latency, "push confirmed");
        let _ = self
            .task
            .store
            .audit(&serde_json::json!({
                "at": self.task.clock.now(), "rollout": self.status.name, "record": "push",
                "version": version, "weight": weight, "shadow": shadow,
                "decision_to_confirmation_secs": latency,
            }))
            .await;
        Input::PushConfirmed { version }
    }

    async fn evaluate(&mut self) -> Result<(), TaskError> {
        let spec = &self.task.checked.rollout.spec;
        let experiment = spec.experiment.name.clone();
        let now = self.task.clock.now();
        let scraped = self.task.source.scrape(&experiment).await;
        let treatment = self.task.checked.treatment.clone();
        let tripped_on = match &scraped {
            Ok(s) => breaker::tripped_proxies(s, &experiment, &treatment, &self.versions()),
            Err(_) => Vec::new(),
        };
        let crossed = match &scraped {
            Ok(s) => self.cross_check(s, now).await?,
            Err(_) => None,
        };
        // An origin whose answers come from different proxies is an error too.
        let scraped = scraped.and_then(|s| self.accumulator.add(system_time(now), &s));
        let trips = match &scraped {
            Ok(reading) => self.breaker.new_trips(reading, &experiment, &treatment),
            Err(_) => BTreeMap::new(),
        };
        if let Some(trip) = breaker::Trip::of(&treatment, trips, tripped_on, now) {
            // The data plane already took the treatment out: whatever the judge would say,
            // the rollout goes back to 0 and never raises again.
            return self.tripped(trip).await;
        }
        let mut diverged = None;
        let (mut assessment, data_at) = match scraped {
            Ok(reading) => {
                self.status.observed_requests = observed_requests(&reading, &experiment);
                self.keyed = keyed_requests(&reading, &experiment);
                self.status.proxy_restarts = reading.restarts;
                diverged = self.check_split(now);
                let ctx = Context {
                    experiment,
                    control: control_of(&self.task.checked),
                    treatment: self.task.checked.treatment.clone(),
                    weight: self.state.weight,
                    evidence_from: self.state.evidence_from(&self.plan),
                    now,
                };
                (self.task.judge.assess(&reading, &ctx), now)
            }
            Err(e) => {
                self.status.scrape_errors += 1;
                let reason = format!("no data: {e}");
                (
                    Assessment {
                        judgement: Judgement::Hold { reason },
                        detail: serde_json::Value::Null,
                    },
                    now,
                )
            }
        };
        if let Some(reason) = &crossed {
            assessment.judgement = crosscheck::hold_on(assessment.judgement, reason);
        } else if let Some(reason) = &self.unverified {
            if !matches!(assessment.judgement, Judgement::Fail { .. }) {
                assessment.judgement = Judgement::Hold {
                    reason: format!("cannot check what the proxies serve: {reason}"),
                };
            }
        } else if let Some(reason) = &self.split_hold {
            if !matches!(assessment.judgement, Judgement::Fail { .. }) {
                assessment.judgement = Judgement::Hold {
                    reason: format!(
                        "observed split: {reason}, although the proxies confirmed that configuration: something besides the pushed weight routes these users (a proxy or route the sink does not reach, clients that lose their key); holding until the split matches"
                    ),
                };
            }
        }
        self.task
            .store
            .audit(&serde_json::json!({
                "at": now, "rollout": self.status.name, "record": "evaluation",
                "weight": self.state.weight, "phase": self.state.phase,
                "judgement": assessment.judgement, "detail": assessment.detail,
            }))
            .await?;
        self.status.last_judgement = Some(assessment.judgement.clone());
        self.status.last_detail = Arc::new(assessment.detail);
        self.status.last_evaluated_at = Some(now);
        if let Some(reason) = diverged {
            tracing::warn!(rollout = %self.status.name, %reason, "observed split diverged from the state");
            self.apply(Input::Drifted { reason }).await?;
            self.split_repushed = Some(self.state.version);
        }
        self.apply(Input::Judged {
            judgement: assessment.judgement,
            data_at,
        })
        .await
    }

    /// Compares the observed split of keyed requests since the confirmed weight's warm-up
    /// ended with that weight. The first gross difference is returned, to push the weight again;
    /// one that persists after that push was confirmed becomes a hold ([`Runner::split_hold`]),
    /// kept until the split matches.
    fn check_split(&mut self, now: f64) -> Option<String> {
        if self.state.pending.is_some() || now < self.state.since + self.plan.warmup_secs {
            return None;
        }
        let Some((version, base)) = self
            .split_base
            .as_ref()
            .filter(|(v, _)| *v == self.state.version)
        else {
            self.split_base = Some((self.state.version, self.keyed.clone()));
            return None;
        };
        let (version, split) = (
            *version,
            split_of(
                base,
                &self.keyed,
                &self.task.checked.treatment,
                self.state.weight,
            ),
        );
        match split {
            Split::Unknown => None,
            Split::Matches => {
                self.split_hold = None;
                self.split_repushed = None;
                None
            }
            Split::Differs(reason) if self.split_repushed == Some(version) => {
                // Measured after the confirmation of the push that should have fixed it: pushing
                // again would not help. The next window starts here, so the hold ends as soon as
                // fresh requests split as configured.
                self.split_hold = Some(reason);
                self.split_base = Some((version, self.keyed.clone()));
                None
            }
            Split::Differs(reason) => {
                self.split_base = None;
                Some(reason)
            }
        }
    }

    /// The push versions of this rollout a proxy may serve now: the last one pushed (confirmed
    /// or under way) and the last one confirmed.
    fn versions(&self) -> Vec<u64> {
        let mut v = vec![self.state.version];
        v.extend(self.confirmed.filter(|c| *c != self.state.version));
        v
    }

    /// Rolls back for a breaker trip the data plane made.
    async fn tripped(&mut self, trip: breaker::Trip) -> Result<(), TaskError> {
        tracing::warn!(rollout = %self.status.name, variant = %trip.variant, reason = ?trip.reason, trips = ?trip.trips, proxies = ?trip.tripped_on, "the filter's breaker tripped the treatment");
        let reason = trip.describe();
        self.status.breaker = Some(trip);
        self.cause = Some("breaker");
        let applied = self
            .apply(Input::Judged {
                judgement: Judgement::Fail { reason },
                data_at: self.task.clock.now(),
            })
            .await;
        self.cause = None;
        applied
    }

    /// After a restart: reads the proxies once for a trip of the versions the persisted state
    /// names (the counter cannot show it as new: its baseline is taken now).
    async fn check_breaker_on_restart(&mut self) -> Result<(), TaskError> {
        if self.state.phase.is_final() || self.state.phase == Phase::Pending {
            return Ok(());
        }
        let spec = &self.task.checked.rollout.spec;
        let experiment = spec.experiment.name.clone();
        let Ok(scrapes) = self.task.source.scrape(&experiment).await else {
            return Ok(());
        };
        let treatment = self.task.checked.treatment.clone();
        let tripped_on =
            breaker::tripped_proxies(&scrapes, &experiment, &treatment, &self.versions());
        let now = self.task.clock.now();
        match breaker::Trip::of(&treatment, BTreeMap::new(), tripped_on, now) {
            Some(trip) => self.tripped(trip).await,
            None => Ok(()),
        }
    }

    async fn event(
        &mut self,
        kind: EventKind,
        message: String,
        cause: Option<&'static str>,
    ) -> Result<(), TaskError> {
        let at = self.task.clock.now();
        let record = EventRecord {
            at,
            kind,
            message: message.clone(),
            weight: self.state.weight,
            cause,
        };
        let breaker = match cause {
            Some("breaker") => serde_json::to_value(&self.status.breaker).ok(),
            _ => None,
        };
        tracing::info!(rollout = %self.status.name, ?kind, %message, "rollout event");
        self.task
            .store
            .audit(&serde_json::json!({
                "at": at, "rollout": self.status.name, "record": "decision",
                "kind": kind, "message": message, "phase": self.state.phase,
                "weight": self.state.weight, "cause": cause, "breaker": breaker,
            }))
            .await?;
        self.task.notifier.send(Notice {
            rollout: self.status.name.clone(),
            kind,
            message,
            at,
            weight: self.state.weight,
            cause,
        });
        let events = Arc::make_mut(&mut self.status.events);
        events.push(record);
        if events.len() > EVENTS_KEPT {
            events.remove(0);
        }
        Ok(())
    }

    fn publish(&mut self) {
        let now = self.task.clock.now();
        self.status.state = self.state.clone();
        self.status.target_weight = self.state.target_weight(&self.plan);
        self.status.bake_left_secs = self.state.bake_left(&self.plan, now);
        let _ = self.status_tx.send(self.status.clone());
    }
}

fn control_of(checked: &Checked) -> String {
    let variants = &checked.rollout.spec.experiment.variants;
    variants
        .iter()
        .find(|v| v.control)
        .or_else(|| variants.first())
        .map(|v| v.name.clone())
        .unwrap_or_default()
}

/// Statuses of several rollouts by name, for the HTTP endpoint.
pub type Registry = Arc<BTreeMap<String, Handle>>;

pub mod breaker;
mod crosscheck;

#[cfg(test)]
mod tests;
