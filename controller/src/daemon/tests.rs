use super::*;
use crate::sink::Receipt;
use crate::spec::Rollout;
use sluice_filter::config::FilterConfig;
use std::sync::Mutex;

const SPEC: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {name: r}
spec:
  experiment:
    name: r
    unit: {type: user, keys: [{header: x-user-id}]}
    variants: [{name: stable, control: true}, {name: canary, weight: 0}]
  schedule: {stages: [1, 10, 100], bake: 20s, warmup: 5s, interval: 1s}
  sources: [{envoyAdmin: {endpoints: ["http://127.0.0.1:1"]}}]
  sinks: [{ecdsFile: {path: /nonexistent/x.yaml, wasm: {filename: x.wasm}, proxies: ["http://127.0.0.1:1"]}}]
"#;

#[derive(Clone, Default)]
struct FakeSource {
    down: Arc<Mutex<bool>>,
    /// How long each read takes.
    delay: Arc<Mutex<Duration>>,
    /// Requests counted so far (stable, canary); each read adds 100, split as `split` says.
    counts: Arc<Mutex<(f64, f64)>>,
    /// The canary share of new requests: the sink's served weight unless set.
    split: Arc<Mutex<Option<f64>>>,
    /// Keyless requests added to the control's at each read (counted in requests and in
    /// `sluice_missing_key_total`, as the filter counts them), and their total so far.
    keyless: Arc<Mutex<(f64, f64)>>,
    /// The proxies whose traffic is counted; their filter reports the version they serve
    /// (`sluice_config_revision`).
    proxies: Option<FakeSink>,
    /// More proxies, which report only a revision each (origin, version).
    strays: Arc<Mutex<Vec<(String, f64)>>>,
    /// The proxies' breaker for the canary, as the filter reports it.
    breaker: Arc<Mutex<FakeBreaker>>,
}

/// The filter's breaker series for the canary: the trip counter (reason `5xx`), and the gauge,
/// 1 while the proxies serve the version it tripped in (a new version clears it).
#[derive(Clone, Copy, Default)]
struct FakeBreaker {
    trips: f64,
    tripped_in: Option<u64>,
}

impl FakeSource {
    /// The proxies' breaker trips the canary in the version they serve now.
    fn trip(&self) {
        let version = self.proxies.as_ref().and_then(|p| p.serving()).map(|s| s.0);
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.trips += 1.0;
        b.tripped_in = version;
    }
}

impl Source for FakeSource {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let delay = self.delay.lock().map(|d| *d).unwrap_or_default();
        tokio::time::sleep(delay).await;
        if self.down.lock().map(|d| *d).unwrap_or(true) {
            return Err(SourceError::Unreachable {
                origin: "fake".into(),
                reason: "down".into(),
            });
        }
        let Some(proxies) = &self.proxies else {
            return Ok(Vec::new());
        };
        let share = self
            .split
            .lock()
            .ok()
            .and_then(|s| *s)
            .unwrap_or_else(|| proxies.serving().map_or(0.0, |(_, w)| w / 100.0));
        let keyless = {
            let mut k = self.keyless.lock().unwrap_or_else(|e| e.into_inner());
            k.1 += k.0;
            k.1
        };
        let (stable, canary) = {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            c.1 += (100.0 * share).round();
            c.0 += 100.0 - (100.0 * share).round();
            *c
        };
        let sample = |name: &str, variant: &str, value: f64| crate::source::Sample {
            name: name.into(),
            labels: [
                ("experiment".to_string(), experiment.to_string()),
                ("variant".to_string(), variant.to_string()),
            ]
            .into(),
            value,
        };
        let revision = |value: f64| crate::source::Sample {
            name: metrics::CONFIG_REVISION.into(),
            labels: [("experiment".to_string(), experiment.to_string())].into(),
            value,
        };
        let mut samples = vec![
            sample(metrics::REQUESTS, "stable", stable + keyless),
            sample(metrics::REQUESTS, "canary", canary),
            sample(metrics::MISSING_KEY, "stable", keyless),
        ];
        if let Some((version, _)) = proxies.serving() {
            samples.push(revision(version as f64));
            let b = self.breaker.lock().map(|b| *b).unwrap_or_default();
            let tripped = if b.tripped_in == Some(version) {
                1.0
            } else {
                0.0
            };
            samples.push(sample(metrics::BREAKER_TRIPPED, "canary", tripped));
            let mut trips = sample(metrics::BREAKER_TRIPS, "canary", b.trips);
            trips.labels.insert("reason".into(), "5xx".into());
            samples.push(trips);
        }
        let mut out = vec![OriginScrape::from_samples("fake", samples)];
        let strays = self.strays.lock().map(|s| s.clone()).unwrap_or_default();
        for (origin, v) in strays {
            out.push(OriginScrape::from_samples(&origin, vec![revision(v)]));
        }
        Ok(out)
    }
}

#[derive(Clone, Default)]
struct FakeSink {
    pushed: Arc<Mutex<Vec<f64>>>,
    reject: Arc<Mutex<bool>>,
    /// Pushes reach the proxies but are never confirmed (their admin does not answer).
    unconfirmed: Arc<Mutex<bool>>,
    /// What the proxies serve: (version, treatment weight).
    served: Arc<Mutex<Option<(u64, f64)>>>,
}

fn treatment_weight(config: &FilterConfig) -> f64 {
    config.experiments[0].variants[1].weight.unwrap_or(-1.0)
}

impl Sink for FakeSink {
    async fn push(&self, config: &FilterConfig, version: u64) -> Result<Receipt, SinkError> {
        if self.reject.lock().map(|r| *r).unwrap_or(true) {
            return Err(SinkError::Rejected {
                proxy: "fake".into(),
                version,
            });
        }
        let w = treatment_weight(config);
        if let Ok(mut p) = self.pushed.lock() {
            p.push(w);
        }
        self.serve(version, w);
        if self.unconfirmed.lock().map(|u| *u).unwrap_or(false) {
            // The proxies load it, the confirmation never comes.
            std::future::pending::<()>().await;
        }
        Ok(Receipt {
            confirmed_after: Duration::ZERO,
        })
    }

    async fn in_force(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        let want = (version, treatment_weight(config));
        Ok(match self.serving() {
            Some(s) if s == want => None,
            other => Some(format!("serving {other:?}, not {want:?}")),
        })
    }
}

impl FakeSink {
    fn pushed(&self) -> Vec<f64> {
        self.pushed.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn serving(&self) -> Option<(u64, f64)> {
        self.served.lock().ok().and_then(|s| *s)
    }

    /// The proxies now serve `weight` as `version`, whoever wrote it.
    fn serve(&self, version: u64, weight: f64) {
        if let Ok(mut s) = self.served.lock() {
            *s = Some((version, weight));
        }
    }
}

/// Passes, except that it fails at and after weight `fail_at`; keeps each reading's time.
struct FakeJudge {
    fail_at: Option<f64>,
    readings_at: Arc<Mutex<Vec<Option<std::time::SystemTime>>>>,
}

impl Assess for FakeJudge {
    fn assess(&mut self, reading: &Reading, ctx: &Context) -> Assessment {
        if let Ok(mut at) = self.readings_at.lock() {
            at.push(reading.at);
        }
        let judgement = match self.fail_at {
            Some(w) if ctx.weight >= w => Judgement::Fail {
                reason: "error rate".into(),
            },
            _ => Judgement::Pass,
        };
        Assessment {
            judgement,
            detail: serde_json::Value::Null,
        }
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-daemon-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn task(
    dir: &std::path::Path,
    source: FakeSource,
    sink: FakeSink,
    fail_at: Option<f64>,
) -> Task<FakeSource, FakeSink, FakeJudge, TokioClock> {
    task_at(
        dir,
        source,
        sink,
        fail_at,
        TokioClock::starting_at(1_000_000.0),
    )
}

fn task_at(
    dir: &std::path::Path,
    source: FakeSource,
    sink: FakeSink,
    fail_at: Option<f64>,
    clock: TokioClock,
) -> Task<FakeSource, FakeSink, FakeJudge, TokioClock> {
    let checked = Rollout::parse(SPEC).unwrap();
    Task {
        store: Store::new(dir, "r").unwrap(),
        checked,
        source,
        sinks: vec![sink],
        judge: FakeJudge {
            fail_at,
            readings_at: Arc::default(),
        },
        notifier: Notifier::new(&[]),
        clock,
    }
}

async fn run_to_end(t: Task<FakeSource, FakeSink, FakeJudge, TokioClock>) -> State {
    let (_h, join) = t.spawn(std::future::pending(), true).unwrap();
    match join.await {
        Ok(Ok(s)) => s,
        other => unreachable!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_good_canary_is_promoted_through_the_schedule() {
    let dir = temp_dir("good");
    let sink = FakeSink::default();
    let source = FakeSource::default();
    let start = tokio::time::Instant::now();
    let end = run_to_end(task(&dir, source, sink.clone(), None)).await;
    assert_eq!(end.phase, Phase::Promoted);
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 100.0]);
    // Three stages of warm-up 5 s + bake 20 s, evaluated every second.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(75) && took <= Duration::from_secs(80),
        "{took:?}"
    );
    let audit = std::fs::read_to_string(dir.join("r.audit.jsonl")).unwrap_or_default();
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"evaluation\""))
            .count()
            >= 70
    );
    assert!(audit.contains("\"promoted\""));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon's time is its clock's: a reading is stamped with the injected clock, not the
/// machine's (here a clock set in 1970).
#[tokio::test(start_paused = true)]
async fn readings_are_stamped_by_the_injected_clock() {
    let dir = temp_dir("clock");
    let epoch = 1_000_000.0;
    let t = task(&dir, FakeSource::default(), FakeSink::default(), None);
    let seen = t.judge.readings_at.clone();
    run_to_end(t).await;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(!seen.is_empty());
    let end = epoch + 100.0;
    for at in seen {
        let secs = at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        assert!(
            secs.is_some_and(|s| (epoch..end).contains(&s)),
            "reading at {secs:?}, clock from {epoch}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_bad_canary_is_rolled_back_within_an_interval() {
    let dir = temp_dir("bad");
    let sink = FakeSink::default();
    let end = run_to_end(task(&dir, FakeSource::default(), sink.clone(), Some(10.0))).await;
    assert!(
        matches!(end.phase, Phase::RolledBack { .. }),
        "{:?}",
        end.phase
    );
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 0.0]);
    assert_eq!(end.weight, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn no_data_holds_and_a_rejected_push_holds_without_raising() {
    let dir = temp_dir("hold");
    let sink = FakeSink::default();
    let source = FakeSource::default();
    *source.down.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let (h, _join) = task(&dir, source.clone(), sink.clone(), None)
        .spawn(std::future::pending(), true)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = h.status.borrow().clone();
    assert_eq!(sink.pushed(), vec![1.0], "raised without data");
    assert!(
        s.state
            .hold
            .as_deref()
            .is_some_and(|r| r.starts_with("no data")),
        "{:?}",
        s.state.hold
    );
    assert!(s.scrape_errors > 50);

    // Data returns, but the sink rejects: the rollout holds at 1 %.
    *sink.reject.lock().unwrap_or_else(|e| e.into_inner()) = true;
    *source.down.lock().unwrap_or_else(|e| e.into_inner()) = false;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let s = h.status.borrow().clone();
    assert_eq!(s.state.weight, 1.0);
    assert!(
        s.state
            .hold
            .as_deref()
            .is_some_and(|r| r.starts_with("push failed")),
        "{:?}",
        s.state.hold
    );
    assert!(s.push_errors > 0);
    // The sink recovers: the pending 10 % goes through.
    *sink.reject.lock().unwrap_or_else(|e| e.into_inner()) = false;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.status.borrow().state.weight, 10.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn an_operator_command_is_answered_once_applied_or_said_to_be_queued() {
    let dir = temp_dir("order");
    let source = FakeSource::default();
    let sink = FakeSink::default();
    let (h, join) = task(&dir, source.clone(), sink.clone(), None)
        .spawn(std::future::pending(), true)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reads now take 5 s; a command that arrives mid-read is applied once the step ends.
    *source.delay.lock().unwrap_or_else(|e| e.into_inner()) = Duration::from_secs(5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = tokio::time::Instant::now();
    match h.order(Command::Pause, Duration::from_secs(10)).await {
        Ordered::Applied(state) => assert!(state.paused, "{state:?}"),
        other => unreachable!("{other:?}"),
    }
    let waited = asked.elapsed();
    assert!(
        waited > Duration::from_secs(1) && waited <= Duration::from_secs(5),
        "answered after {waited:?}: not after the step in progress"
    );
    assert!(h.status.borrow().state.paused, "the status lags the answer");
    // A wait shorter than the step in progress: queued, then applied all the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(
        h.order(Command::Resume, Duration::from_millis(100)).await,
        Ordered::Queued
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!h.status.borrow().state.paused);
    // Once the rollout has ended, commands are refused.
    *source.delay.lock().unwrap_or_else(|e| e.into_inner()) = Duration::ZERO;
    assert!(matches!(
        h.order(Command::Abort, Duration::from_secs(10)).await,
        Ordered::Applied(_)
    ));
    let _ = join.await;
    assert!(matches!(
        h.order(Command::Pause, Duration::from_secs(10)).await,
        Ordered::Gone
    ));
    assert_eq!(sink.pushed(), vec![1.0, 0.0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn shutdown_persists_and_a_restart_resumes_without_raising() {
    let dir = temp_dir("restart");
    let sink = FakeSink::default();
    let clock = TokioClock::starting_at(1_000_000.0);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_h, join) = task_at(&dir, FakeSource::default(), sink.clone(), None, clock)
        .spawn(
            async move {
                let _ = stop_rx.await;
            },
            false,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await; // stage 2 (10 %) started at ~26 s
    let _ = stop_tx.send(());
    let saved = match join.await {
        Ok(Ok(s)) => s,
        other => unreachable!("{other:?}"),
    };
    assert_eq!(saved.weight, 10.0);
    // Restart: the state's weight is pushed again, and the stage's warm-up and bake start
    // over from its confirmation; the next raise comes only after both, on fresh evidence.
    let sink2 = FakeSink::default();
    let (h, _join) = task_at(&dir, FakeSource::default(), sink2.clone(), None, clock)
        .spawn(std::future::pending(), true)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        sink2.pushed(),
        vec![10.0],
        "raised {:?} right after restart",
        sink2.pushed()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sink2.pushed(), vec![10.0, 100.0]);
    assert_eq!(h.status.borrow().state.weight, 100.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_allocator_option_is_the_purge_delay() {
    // SAFETY: reads one integer option.
    let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    // mimalloc 3's default purge delay (1 s), unless this process was started with it set.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        assert_eq!(
            before, 1000,
            "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge_delay"
        );
    }
    keep_freed_memory();
    // SAFETY: as above.
    let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    assert_eq!(after, FREED_MEMORY_KEPT_MS);
}

#[test]
fn ticks_fall_on_multiples_of_the_interval() {
    let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    let ten = Duration::from_secs(10);
    assert_eq!(secs(after_tick(100.0, ten)), 10.0);
    assert_eq!(secs(after_tick(103.0, ten)), 7.0);
    // Less than half an interval to the next multiple: the one after.
    assert_eq!(secs(after_tick(106.0, ten)), 14.0);
    assert_eq!(secs(after_tick(1.25, Duration::from_millis(500))), 0.75);
}

fn audit_of(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("r.audit.jsonl")).unwrap_or_default()
}

fn set<T>(m: &Arc<Mutex<T>>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_a_raise_and_its_confirmation_converges_on_restart() {
    let dir = temp_dir("crash-raise");
    let clock = TokioClock::starting_at(1_000_000.0);
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    let (h, join) = task_at(&dir, source.clone(), sink.clone(), None, clock)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.status.borrow().state.weight, 1.0);
    // From now on the proxies load what is written but never confirm it.
    set(&sink.unconfirmed, true);
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The status is published once a step ends; this one never ends: read the state file.
    let store = Store::new(&dir, "r").unwrap();
    let before = store
        .load()
        .ok()
        .flatten()
        .unwrap_or_else(|| State::new("r", 0.0));
    assert_eq!(before.weight, 1.0);
    assert_eq!(before.pending.as_ref().map(|p| p.weight), Some(10.0));
    assert_eq!(
        sink.serving().map(|s| s.1),
        Some(10.0),
        "the raise reached the proxies"
    );
    join.abort(); // the process dies mid-push
    let _ = join.await;

    set(&sink.unconfirmed, false);
    let (h, _join) = task_at(&dir, source, sink.clone(), None, clock)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = h.status.borrow().clone();
    // The proxies serve the state's weight again, as the version the state confirmed.
    assert_eq!(s.state.weight, 1.0);
    assert_eq!(s.state.pending, None);
    assert_eq!(sink.serving(), Some((s.state.version, 1.0)));
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 1.0]);
    assert!(
        audit_of(&dir).contains("unconfirmed raise to 10 %"),
        "{}",
        audit_of(&dir)
    );
    // The stage starts over from the confirmation; the raise comes after warm-up and bake.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(sink.pushed().len(), 3);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 1.0, 10.0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn proxies_serving_another_configuration_get_the_state_pushed_again() {
    let dir = temp_dir("drift");
    let sink = FakeSink::default();
    let (h, _join) = task(&dir, FakeSource::default(), sink.clone(), None)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let version = h.status.borrow().state.version;
    // Someone else writes the watched file: the proxies serve 50 %.
    sink.serve(99, 50.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = h.status.borrow().clone();
    assert_eq!(sink.pushed(), vec![1.0, 1.0]);
    assert_eq!(sink.serving(), Some((s.state.version, 1.0)));
    assert!(s.state.version > version);
    let audit = audit_of(&dir);
    assert!(audit.contains("\"diverged\""), "{audit}");
    assert!(
        audit.contains("holding: proxies diverged: serving Some((99, 50.0))"),
        "{audit}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn an_observed_split_far_from_the_weight_holds_and_re_pushes() {
    let dir = temp_dir("split");
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    // Half the requests reach the canary whatever the configuration says.
    set(&source.split, Some(0.5));
    let (h, _join) = task(&dir, source.clone(), sink.clone(), None)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = h.status.borrow().clone();
    assert_eq!(s.state.weight, 1.0, "raised while the split was off");
    assert!(
        sink.pushed().iter().all(|w| *w == 1.0),
        "{:?}",
        sink.pushed()
    );
    // Pushed once more; when the split still differs after that push was confirmed, pushing
    // again cannot help: the rollout holds, and says why.
    assert_eq!(sink.pushed(), vec![1.0, 1.0]);
    let audit = audit_of(&dir);
    assert!(
        audit.contains("canary got 50.0 % of") && audit.contains("the state says 1 %"),
        "{audit}"
    );
    let hold = s.state.hold.clone().unwrap_or_default();
    assert!(
        hold.contains("although the proxies confirmed that configuration"),
        "{hold}"
    );
    // The split follows the configuration again: the rollout goes on.
    set(&source.split, None);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let s = h.status.borrow().clone();
    assert!(
        s.state.weight >= 10.0 && s.state.hold.is_none(),
        "{:?}",
        s.state
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_failing_task_stops_with_its_cause_and_a_consistent_state() {
    let dir = temp_dir("task-error");
    let sink = FakeSink::default();
    let (h, join) = task(&dir, FakeSource::default(), sink.clone(), None)
        .spawn(std::future::pending(), true)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let audit = dir.join("r.audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let _ = std::fs::create_dir(&audit);
    let error = match join.await {
        Ok(Err(e)) => e.to_string(),
        other => unreachable!("{other:?}"),
    };
    assert!(error.contains("r.audit.jsonl"), "{error}");
    assert!(error.to_lowercase().contains("directory"), "{error}");
    assert_eq!(h.status.borrow().error.as_deref(), Some(error.as_str()));
    // What was persisted still passes every check.
    let store = Store::new(&dir, "r").unwrap();
    let checked = Rollout::parse(SPEC).unwrap();
    let saved = store.load().ok().flatten();
    assert!(saved.is_some_and(|s| s.check(&plan_of(&checked), "r").is_ok()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_state_that_breaks_an_invariant_is_refused_with_the_field() {
    let dir = temp_dir("corrupt");
    for (edit, field) in [
        (r#""weight": 100.0"#, "weight"),
        (r#""weight": -50.0"#, "weight"),
        (r#""index": 98"#, "phase.index"),
    ] {
        let _ = std::fs::create_dir_all(&dir);
        let mut state = State::new("r", 1.0);
        state.phase = Phase::Canary { index: 0 };
        state.weight = 1.0;
        state.version = 1;
        let text = serde_json::to_string(&state)
            .unwrap_or_default()
            .replace(r#""weight":1.0"#, r#""weight": 1.0"#)
            .replace(r#""index":0"#, r#""index": 0"#);
        let text = text
            .replace(
                r#""weight": 1.0"#,
                if field == "weight" {
                    edit
                } else {
                    r#""weight": 1.0"#
                },
            )
            .replace(
                r#""index": 0"#,
                if field == "phase.index" {
                    edit
                } else {
                    r#""index": 0"#
                },
            );
        std::fs::write(dir.join("r.state.json"), &text).unwrap_or_default();
        let refused = task(&dir, FakeSource::default(), FakeSink::default(), None)
            .spawn(std::future::pending(), true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("r.state.json") && refused.contains(&format!(": {field}: ")),
            "{text}: {refused}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_split_check_catches_another_weight_not_a_subtle_imbalance() {
    let counts = |stable: u64, canary: u64| -> BTreeMap<String, u64> {
        [
            ("stable".to_string(), stable),
            ("canary".to_string(), canary),
        ]
        .into()
    };
    let base = counts(1000, 300);
    // The issue's case: 25 % configured, 52 % served.
    let found = split_of(&base, &counts(1000 + 576, 300 + 624), "canary", 25.0);
    assert_eq!(
        found,
        Split::Differs(
            "canary got 52.0 % of 1200 keyed requests since the confirmation, the state says 25 %"
                .into()
        )
    );
    // Too few requests yet.
    assert_eq!(
        split_of(&base, &counts(1090, 400), "canary", 25.0),
        Split::Unknown
    );
    // A 25 % canary losing 40 % of its users' ids: 15 %, the sample-ratio test's to judge.
    assert_eq!(
        split_of(&base, &counts(1000 + 8500, 300 + 1500), "canary", 25.0),
        Split::Matches
    );
    // Rolled back to 0 %, a fifth still reaching the canary.
    assert!(matches!(
        split_of(&base, &counts(1000 + 800, 300 + 200), "canary", 0.0),
        Split::Differs(_)
    ));
}

/// Keyless requests go to the control whatever the weights (`unit.missing: control`): at the
/// 100 % stage they are not a sign that the proxies serve another weight.
#[tokio::test(start_paused = true)]
async fn keyless_requests_at_the_control_are_not_a_diverged_split() {
    let dir = temp_dir("keyless");
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    // 60 keyless requests for every 100 keyed ones: 37.5 % of all requests reach the control
    // at 100 %, beyond the check's band if they were counted.
    set(&source.keyless, (60.0, 0.0));
    let end = tokio::time::timeout(
        Duration::from_secs(600),
        run_to_end(task(&dir, source, sink.clone(), None)),
    )
    .await
    .unwrap_or_else(|_| panic!("not promoted within 600 s: {}", audit_of(&dir)));
    assert_eq!(end.phase, Phase::Promoted);
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 100.0]);
    let audit = audit_of(&dir);
    assert!(!audit.contains("diverged"), "{audit}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_proxy_the_sink_does_not_reach_is_caught_by_its_revision_and_holds() {
    let dir = temp_dir("crosscheck");
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    let (h, _join) = task(&dir, source.clone(), sink.clone(), None)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.status.borrow().state.weight, 1.0);
    assert_eq!(
        h.status.borrow().proxies_by_revision,
        BTreeMap::from([(1, 1)])
    );
    // A proxy the sink does not push to serves its bootstrap's default (revision 0); the
    // sink keeps confirming its own proxies.
    set(&source.strays, vec![("pod-x".to_string(), 0.0)]);
    tokio::time::sleep(Duration::from_secs(40)).await;
    let s = h.status.borrow().clone();
    assert_eq!(
        s.state.weight, 1.0,
        "raised although a proxy runs another version"
    );
    assert_eq!(s.proxies_by_revision, BTreeMap::from([(0, 1), (1, 1)]));
    let hold = s.state.hold.clone().unwrap_or_default();
    assert_eq!(
        hold,
        "the data plane disagrees with the sinks' confirmation: 1 of 2 proxies reporting run another version than the confirmed 1: pod-x at 0"
    );
    let audit = audit_of(&dir);
    let records: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"record\":\"crosscheck\""))
        .collect();
    assert_eq!(
        records.len(),
        1,
        "one record per change of verdict: {records:?}"
    );
    assert!(
        records[0].contains("\"agrees\":false") && records[0].contains("\"pod-x\":0"),
        "{}",
        records[0]
    );
    // It takes the configuration: the hold ends and the rollout goes on.
    set(&source.strays, vec![("pod-x".to_string(), 1.0)]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = h.status.borrow().clone();
    assert_eq!(s.state.weight, 10.0);
    assert!(audit_of(&dir).contains("\"agrees\":true"));
    // The next push is cross-checked too: after the grace the straggler holds it again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let hold = h.status.borrow().state.hold.clone().unwrap_or_default();
    assert!(hold.ends_with("confirmed 2: pod-x at 1"), "{hold}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_trip_rolls_back_with_cause_breaker_and_never_raises() {
    let dir = temp_dir("breaker");
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    // Trips an earlier run of the experiment made, still in the proxies' counter.
    set(
        &source.breaker,
        FakeBreaker {
            trips: 2.0,
            tripped_in: None,
        },
    );
    let (h, _join) = task(&dir, source.clone(), sink.clone(), None)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(sink.pushed(), vec![1.0, 10.0], "old trips held the rollout");
    source.trip();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = h.status.borrow().clone();
    let Phase::RolledBack { reason } = &s.state.phase else {
        unreachable!("{:?}", s.state.phase)
    };
    assert!(reason.starts_with("breaker: "), "{reason}");
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 0.0]);
    let trip = s.breaker.as_ref().expect("no trip in the status");
    assert_eq!(trip.reason.as_deref(), Some("5xx"));
    assert_eq!(trip.trips.get("5xx"), Some(&1));
    assert_eq!(trip.tripped_on, vec!["fake".to_string()]);
    let rolled = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::RolledBack)
        .expect("no rollback event");
    assert_eq!(rolled.cause, Some("breaker"));
    let audit = audit_of(&dir);
    let decision = audit
        .lines()
        .find(|l| l.contains("\"rolled_back\"") && l.contains("\"decision\""))
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(decision.contains("\"cause\":\"breaker\""), "{decision}");
    assert!(decision.contains("\"tripped_on\":[\"fake\"]"), "{decision}");
    // The clearing push set the gauge back to 0; the counter stays. Nothing is raised again.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 0.0]);
    assert_eq!(h.status.borrow().state.weight, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_judge_failure_names_its_cause() {
    let dir = temp_dir("cause-judge");
    let end = run_to_end(task(
        &dir,
        FakeSource::default(),
        FakeSink::default(),
        Some(10.0),
    ))
    .await;
    assert!(matches!(end.phase, Phase::RolledBack { .. }));
    let audit = audit_of(&dir);
    assert!(audit.contains("\"cause\":\"judge\""), "{audit}");
    assert!(!audit.contains("\"cause\":\"breaker\""), "{audit}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_trip_made_while_no_controller_ran_rolls_back_before_the_restart_push() {
    let dir = temp_dir("breaker-restart");
    let clock = TokioClock::starting_at(1_000_000.0);
    let sink = FakeSink::default();
    let source = FakeSource {
        proxies: Some(sink.clone()),
        ..FakeSource::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_h, join) = task_at(&dir, source.clone(), sink.clone(), None, clock)
        .spawn(
            async move {
                let _ = stop_rx.await;
            },
            false,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let _ = stop_tx.send(());
    let saved = match join.await {
        Ok(Ok(s)) => s,
        other => unreachable!("{other:?}"),
    };
    assert_eq!(saved.weight, 10.0);
    // The filter trips while the controller is down: the first reading after the restart
    // already holds the trip, so only the gauge tells it.
    source.trip();
    let (h, _join) = task_at(&dir, source, sink.clone(), None, clock)
        .spawn(std::future::pending(), false)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = h.status.borrow().clone();
    assert!(
        matches!(&s.state.phase, Phase::RolledBack { reason } if reason.starts_with("breaker")),
        "{:?}",
        s.state.phase
    );
    // The weight was not pushed again first (that push would have cleared the gauge).
    assert_eq!(sink.pushed(), vec![1.0, 10.0, 0.0]);
    let _ = std::fs::remove_dir_all(&dir);
}
