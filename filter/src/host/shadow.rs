//! Shadow calls in the host: per-worker bookkeeping of copies from capture to comparison.
//!
//! A copy's life: the stream captures headers (and body chunks as they pass, without holding
//! them back) → at the end of the request it is queued → the root context's tick sends it
//! with `dispatch_http_call`. The tick runs only while there is something to send: the first
//! queued copy starts it, a tick that finds nothing queued stops it, because an idle timer is
//! not free — every tick wakes the worker and enters the VM (docs/benchmarks.md, "What
//! shadowing costs"). Sending from the root context is deliberate: Envoy cancels a
//! context's outstanding calls when that context ends, and a stream context ends as soon as
//! the client has its answer, which must never wait for the shadow. The root context lives
//! as long as the plugin, so the shadow's answer always comes back, to the root. The
//! primary's status and body (captured as they stream past) and the shadow's answer meet in
//! a per-worker table; whichever arrives second triggers the comparison.

use std::cell::Cell;
use std::time::Duration;

use fnv::FnvHashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

use super::{log, now_millis, Active};
use crate::metrics::{SKIP_BODY_LIMIT, SKIP_DISPATCH_FAILED, SKIP_IN_FLIGHT, SKIP_NO_PRIMARY};
use crate::shadow::{self, Answer, FieldResult, LogBudget};

/// How often the root context sends queued copies. Also the most a copy waits to be sent.
pub const TICK: Duration = Duration::from_millis(5);

/// A copy being captured by its stream.
pub struct Capture {
    pub id: u64,
    pub experiment: usize,
    pub variant: usize,
    pub headers: Vec<(String, String)>,
    pub body: Answer,
}

/// A copy's headers and body, ready to send.
type Request = (Vec<(String, String)>, Vec<u8>);

/// A copy from queueing to comparison (kept under its id in [`Entries`]).
struct Entry {
    experiment: usize,
    variant: usize,
    request_id: String,
    /// Set once queued for sending; taken when sent.
    request: Option<Request>,
    token: Option<u32>,
    sent_at_ms: u64,
    primary: Option<Answer>,
    primary_gone: bool,
    shadow: Option<Answer>,
}

/// Every outstanding copy, reachable by its id and (once sent) by its call's token, so that
/// each step of a copy costs the same however many are outstanding.
#[derive(Default)]
struct Entries {
    by_id: FnvHashMap<u64, Entry>,
    /// Ids of sent copies by token.
    by_token: FnvHashMap<u32, u64>,
    /// Ids of copies waiting to be sent, oldest first.
    queued: Vec<u64>,
}

impl Entries {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.by_id.remove(&id)?;
        if let Some(token) = e.token {
            self.by_token.remove(&token);
        }
        Some(e)
    }
}

/// Per-worker shadow state, shared by the root context and the streams.
#[derive(Default)]
pub struct Table {
    entries: Cell<Entries>,
    next_id: Cell<u64>,
    /// Outstanding copies per experiment (queued or sent).
    in_flight: Cell<Vec<u32>>,
    log_budget: Cell<LogBudget>,
    /// Whether the root context's tick is running (set by the first queued copy, cleared by a
    /// tick with nothing to send).
    ticking: Cell<bool>,
}

impl Table {
    fn with<R>(&self, f: impl FnOnce(&mut Entries) -> R) -> R {
        let mut entries = self.entries.take();
        let r = f(&mut entries);
        self.entries.set(entries);
        r
    }

    fn adjust_in_flight(&self, experiment: usize, up: bool) {
        let mut v = self.in_flight.take();
        if v.len() <= experiment {
            v.resize(experiment + 1, 0);
        }
        v[experiment] = if up {
            v[experiment].saturating_add(1)
        } else {
            v[experiment].saturating_sub(1)
        };
        self.in_flight.set(v);
    }

    fn in_flight(&self, experiment: usize) -> u32 {
        let v = self.in_flight.take();
        let n = v.get(experiment).copied().unwrap_or(0);
        self.in_flight.set(v);
        n
    }
}

fn skip(active: &Active, experiment: usize, variant: usize, reason: usize) {
    if let Some(m) = shadow_metrics(active, experiment, variant) {
        if let Some(&pos) = m.skipped.get(reason) {
            active.increment(pos);
        }
    }
}

fn shadow_metrics(
    active: &Active,
    experiment: usize,
    variant: usize,
) -> Option<&crate::metrics::ShadowMetrics> {
    active
        .catalog
        .experiments
        .get(experiment)?
        .variants
        .get(variant)?
        .shadow
        .as_ref()
}

/// Starts capturing a copy if this request is sampled and the cap allows; `None` otherwise.
/// `routing_headers` are removed from the copy.
pub fn start(
    active: &Active,
    experiment: usize,
    variant: usize,
    method: &[u8],
    user_bucket: Option<u32>,
    routing_headers: &[&str],
) -> Option<Capture> {
    let exp = active.plan.experiments.get(experiment)?;
    let cfg = exp.shadow.as_ref()?;
    if !cfg.eligible(method, variant) {
        return None;
    }
    let bucket = match (cfg.sample_by, user_bucket) {
        (shadow::SampleBy::User, Some(b)) => b,
        (shadow::SampleBy::User, None) => return None,
        (shadow::SampleBy::Request, _) => {
            let mut rng = active.rng.get();
            let b = rng.bucket();
            active.rng.set(rng);
            b
        }
    };
    if !shadow::sampled(cfg.sample, bucket) {
        return None;
    }
    if active.shadow.in_flight(experiment) >= cfg.max_in_flight {
        skip(active, experiment, variant, SKIP_IN_FLIGHT);
        return None;
    }
    let original: Vec<(String, Vec<u8>)> =
        match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h.into_iter().collect(),
            Err(_) => {
                active.count_error(experiment);
                return None;
            }
        };
    let id = active.shadow.next_id.get().wrapping_add(1);
    active.shadow.next_id.set(id);
    // Counted from capture so that the cap also bounds memory held by captures.
    active.shadow.adjust_in_flight(experiment, true);
    Some(Capture {
        id,
        experiment,
        variant,
        headers: shadow::copy_headers(cfg, &original, routing_headers),
        body: Answer::default(),
    })
}

/// Adds a request body chunk; returns false (and counts) if the copy is over the limit.
pub fn push_body(active: &Active, c: &mut Capture, chunk: &[u8]) -> bool {
    let limit = active
        .plan
        .experiments
        .get(c.experiment)
        .and_then(|e| e.shadow.as_ref())
        .map_or(0, |s| s.max_body_bytes);
    c.body.push_body(chunk, limit);
    if c.body.truncated {
        skip(active, c.experiment, c.variant, SKIP_BODY_LIMIT);
        active.shadow.adjust_in_flight(c.experiment, false);
        return false;
    }
    true
}

/// Drops a capture that will never be sent (its stream ended early).
pub fn abandon(active: &Active, c: &Capture) {
    active.shadow.adjust_in_flight(c.experiment, false);
}

/// Queues a complete copy for the next tick, starting the tick if it is not running.
pub fn enqueue(active: &Active, c: Capture) {
    let request_id = c
        .headers
        .iter()
        .find(|(k, _)| k == "x-request-id")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    active.shadow.with(|entries| {
        entries.queued.push(c.id);
        entries.by_id.insert(
            c.id,
            Entry {
                experiment: c.experiment,
                variant: c.variant,
                request_id,
                request: Some((c.headers, c.body.body)),
                token: None,
                sent_at_ms: 0,
                primary: None,
                primary_gone: false,
                shadow: None,
            },
        );
    });
    if active.shadow.ticking.get() {
        return;
    }
    // From a stream context this sets the tick of the stream's root context.
    if hostcalls::set_tick_period(TICK).is_ok() {
        active.shadow.ticking.set(true);
    } else {
        log(
            LogLevel::Warn,
            "cannot start the shadow timer; copy dropped",
        );
        if let Some(e) = remove(active, c.id) {
            skip(active, e.experiment, e.variant, SKIP_DISPATCH_FAILED);
        }
    }
}

/// Stops the root context's tick (also when no plan is active any more).
pub fn stop_tick(table: Option<&Table>) {
    if hostcalls::set_tick_period(Duration::ZERO).is_ok() {
        if let Some(t) = table {
            t.ticking.set(false);
        }
    }
}

/// Root tick: sends every queued copy; stops the tick if there was none.
pub fn send_queued(active: &Active) {
    let mut failed = Vec::new();
    let mut queued = 0;
    let now = now_millis().unwrap_or(0);
    active.shadow.with(|entries| {
        let mut ids = std::mem::take(&mut entries.queued);
        for &id in &ids {
            let Some(e) = entries.by_id.get_mut(&id) else {
                continue;
            };
            let Some((headers, body)) = e.request.take() else {
                continue;
            };
            queued += 1;
            let Some(cfg) = active
                .plan
                .experiments
                .get(e.experiment)
                .and_then(|x| x.shadow.as_ref())
            else {
                failed.push(id);
                continue;
            };
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let sent = hostcalls::dispatch_http_call(
                &cfg.cluster,
                h,
                (!body.is_empty()).then_some(body.as_slice()),
                vec![],
                Duration::from_millis(cfg.timeout_ms),
            );
            match sent {
                Ok(token) => {
                    e.token = Some(token);
                    e.sent_at_ms = now;
                    entries.by_token.insert(token, id);
                    if let Some(m) = shadow_metrics(active, e.experiment, e.variant) {
                        active.increment(m.requests);
                    }
                }
                Err(status) => {
                    log(
                        LogLevel::Warn,
                        &format!(
                            "shadow call to cluster {:?} failed: {status:?} (is the cluster defined?)",
                            cfg.cluster
                        ),
                    );
                    failed.push(id);
                }
            }
        }
        // Keeps the allocation; nothing is queued while copies are being sent.
        ids.clear();
        entries.queued = ids;
    });
    for id in failed {
        if let Some(e) = remove(active, id) {
            skip(active, e.experiment, e.variant, SKIP_DISPATCH_FAILED);
        }
    }
    // Stopping one tick late, not as soon as the queue is empty, keeps the timer running
    // under steady traffic instead of re-arming it for every copy.
    if queued == 0 {
        stop_tick(Some(&active.shadow));
    }
}

fn remove(active: &Active, id: u64) -> Option<Entry> {
    let e = active.shadow.with(|entries| entries.remove(id))?;
    active.shadow.adjust_in_flight(e.experiment, false);
    Some(e)
}

/// Root callback: the shadow answered, failed or timed out.
pub fn on_response(active: &Active, token: u32, headers: usize, body_size: usize) {
    let now = now_millis().unwrap_or(0);
    let finished = active.shadow.with(|entries| {
        let id = *entries.by_token.get(&token)?;
        let e = entries.by_id.get_mut(&id)?;
        let cfg = active.plan.experiments.get(e.experiment)?.shadow.as_ref()?;
        let m = shadow_metrics(active, e.experiment, e.variant)?;
        let elapsed = now.saturating_sub(e.sent_at_ms);
        let status = if headers == 0 {
            0
        } else {
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
                .unwrap_or(0)
        };
        // Envoy answers a timed-out call with its own 504 (or no headers at all); the clock
        // tells a timeout from a shadow that really answered 504. The margin is wide because
        // Envoy arms the timer from its event loop's cached time, which can lag the clock read
        // here by a few milliseconds under load. A timeout is not an answer, so it is counted
        // but not compared.
        if (status == 0 || status == 504) && elapsed * 10 >= cfg.timeout_ms * 9 {
            active.increment(m.timeouts);
            e.primary_gone = true;
            e.shadow = Some(Answer::default());
            return Some(id);
        }
        if status == 0 {
            active.increment(m.errors);
            e.primary_gone = true;
            e.shadow = Some(Answer::default());
            return Some(id);
        }
        active.record(m.latency, elapsed);
        // Failed connections and resets arrive as Envoy's own 503: an error, and (as the
        // status a user would have got) a status disagreement.
        if (500..600).contains(&status) {
            active.increment(m.errors);
        }
        let mut answer = Answer {
            status,
            ..Answer::default()
        };
        if cfg.needs_body() && body_size > 0 {
            match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
                Ok(Some(b)) => answer.push_body(&b, cfg.max_body_bytes),
                Ok(None) => {}
                Err(_) => answer.truncated = true,
            }
        }
        e.shadow = Some(answer);
        Some(id)
    });
    if let Some(id) = finished {
        settle(active, id);
    }
}

/// Stream callback: the primary's answer is complete.
pub fn primary_done(active: &Active, id: u64, answer: Answer) {
    let found = active.shadow.with(|entries| {
        entries
            .by_id
            .get_mut(&id)
            .map(|e| e.primary = Some(answer))
            .is_some()
    });
    if found {
        settle(active, id);
    }
}

/// Stream callback: the primary ended without a complete answer.
pub fn primary_gone(active: &Active, id: u64) {
    active.shadow.with(|entries| {
        if let Some(e) = entries.by_id.get_mut(&id) {
            if e.primary.is_none() {
                e.primary_gone = true;
            }
        }
    });
    settle(active, id);
}

/// Compares and forgets an entry once both sides are in (or one is known never to come).
fn settle(active: &Active, id: u64) {
    let ready = active.shadow.with(|entries| {
        entries
            .by_id
            .get(&id)
            .is_some_and(|e| e.shadow.is_some() && (e.primary.is_some() || e.primary_gone))
    });
    if !ready {
        return;
    }
    let Some(e) = remove(active, id) else {
        return;
    };
    let (Some(primary), Some(copy)) = (&e.primary, &e.shadow) else {
        if e.shadow.as_ref().is_some_and(|s| s.status != 0) {
            skip(active, e.experiment, e.variant, SKIP_NO_PRIMARY);
        }
        return;
    };
    if copy.status == 0 {
        return;
    }
    record(active, &e, primary, copy);
}

fn record(active: &Active, e: &Entry, primary: &Answer, copy: &Answer) {
    let (Some(exp), Some(m)) = (
        active.plan.experiments.get(e.experiment),
        shadow_metrics(active, e.experiment, e.variant),
    ) else {
        return;
    };
    let Some(cfg) = &exp.shadow else {
        return;
    };
    let c = shadow::compare(cfg, primary, copy);
    active.increment(m.compared);
    let verdict = |i: usize, agree: bool| {
        let list = if agree { &m.agree } else { &m.disagree };
        if let Some(&pos) = list.get(i) {
            active.increment(pos);
        }
    };
    let variant = exp.variants.get(e.variant).map_or("", String::as_str);
    let mut lines = Vec::new();
    verdict(0, c.status_agree);
    if !c.status_agree {
        lines.push((
            "status".to_string(),
            primary.status.to_string(),
            copy.status.to_string(),
        ));
    }
    if let Some(agree) = c.body_agree {
        verdict(1, agree);
        if !agree {
            lines.push((
                "body".to_string(),
                "(hash)".to_string(),
                "(hash)".to_string(),
            ));
        }
    }
    for (k, (field, result)) in cfg.fields.iter().zip(&c.fields).enumerate() {
        let delta = match result {
            FieldResult::Agree { delta } => {
                verdict(k + 2, true);
                *delta
            }
            FieldResult::Disagree {
                delta,
                primary,
                shadow,
            } => {
                verdict(k + 2, false);
                lines.push((field.name.clone(), primary.clone(), shadow.clone()));
                *delta
            }
            FieldResult::Missing => {
                if let Some(&pos) = m.missing.get(k) {
                    active.increment(pos);
                }
                None
            }
        };
        if let (Some(d), Some(Some(hist))) = (delta, m.deltas.get(k)) {
            if let Some((negative, v)) = shadow::scaled_delta(field, d) {
                active.record(hist[usize::from(negative)], v);
            }
        }
    }
    if lines.is_empty() || cfg.log_per_minute == 0 {
        return;
    }
    let now_secs = now_millis().unwrap_or(0) / 1000;
    for (field, p, s) in lines {
        let mut budget = active.shadow.log_budget.get();
        let allowed = budget.take(now_secs, cfg.log_per_minute);
        active.shadow.log_budget.set(budget);
        if !allowed {
            break;
        }
        log(
            LogLevel::Info,
            &shadow::disagreement_line(&exp.name, variant, &e.request_id, &field, &p, &s),
        );
    }
}
