//! Shadow calls in the host: per-worker bookkeeping of copies from capture to comparison.
//! The table of copies, the bytes they hold and every decision about them (what a chunk
//! joins, what the send queue sends or gives up, when a copy's fate is known, when a replaced
//! configuration is done) are pure, in [`crate::shadow::table`]; their counters come from
//! [`crate::decision::shadow`]. This shim reads from the host, calls them and applies what
//! they return.
//!
//! A copy's life: the stream captures headers (and body chunks as they pass, without holding
//! them back) → at the end of the request it is queued → the root context's tick sends it
//! with `dispatch_http_call`. The fast tick runs only while there is something to send: the
//! first queued copy starts it, a tick that finds nothing queued stops it (back to the
//! breaker's slower period if the plan has a breaker, else off), because an idle timer is not
//! free — every tick wakes the worker and enters the VM (docs/benchmarks.md, "What shadowing
//! costs"). Sending from the root context is deliberate: Envoy cancels a
//! context's outstanding calls when that context ends, and a stream context ends as soon as
//! the client has its answer, which must never wait for the shadow. The root context lives
//! as long as the plugin, so the shadow's answer always comes back, to the root. The
//! primary's status and body (captured as they stream past) and the shadow's answer meet in
//! a per-worker table; whichever arrives second triggers the comparison.
//!
//! Accounting: a copy is counted in `sluice_shadow_requests_total` when it is taken (the
//! request was sampled) and ends in exactly one of compared, skipped (with a reason),
//! timeouts or errors ([`shadow::Fate`]).
//!
//! A config push replaces the plugin: Envoy creates a new root context for the new config and,
//! once the old config's last stream is gone, asks the old root context whether it is done.
//! Its copies may still be waiting for the shadow; if the root said yes, Envoy would delete it
//! and cancel their calls, and they would end in no counter at all. So the old root says "not
//! yet" ([`close`]) and reports done to the host when its last copy has ended: copies in
//! flight at a config change are compared under the config they started with.
//!
//! Memory: every byte a copy holds in the VM (its headers and request body until sent, the
//! primary's body, the shadow's body) and, while its call is out, the expected size of the
//! answer Envoy buffers for it (Envoy reads a call's whole answer before the filter sees it)
//! is taken from one per-worker [`shadow::Budget`] ([`Worker`]) shared by every plugin and
//! config generation in the VM, capped by `max_bytes_in_flight`. A copy that would go over is
//! skipped (`bytes_in_flight`). Bodies are read from the host only when the comparison needs them and
//! only when they fit `max_body_bytes`; a body over it is not read at all.
//!
//! Loops: a request whose [`SHADOW_HEADER`] verifies ([`arrival`]) is a copy made by a Sluice
//! filter with the same secret; it is routed but neither counted nor copied ([`route_copy`]).

use std::cell::{Cell, OnceCell};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

use super::{log, now_millis, Active, HostRequest};
use crate::decision;
use crate::header_map;
use crate::mac::{self, Key};
use crate::request::{self, RequestView};
use crate::shadow::table::{self, Ledger, Outcome};
use crate::shadow::{self, Answer, Budget, Fate, Sampling, Skip, SHADOW_HEADER};

/// How often the root context sends queued copies. Also the most a copy waits to be sent.
pub const TICK: Duration = Duration::from_millis(5);

thread_local! {
    /// Bytes held by copies in this worker's VM, across plugins and config generations, so
    /// that a push cannot double what the cap allows.
    static HELD: Cell<Budget> = const { Cell::new(Budget { held: 0 }) };
    /// Host id of the `sluice_shadow_bytes_in_flight` gauge (any config's: they name one stat).
    static GAUGE: Cell<Option<u32>> = const { Cell::new(None) };
}

fn gauge_add(delta: i64) {
    if let Some(id) = GAUGE.with(Cell::get) {
        if delta != 0 {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }
}

/// The worker's budget of shadow bytes, mirrored in the `sluice_shadow_bytes_in_flight` gauge.
pub struct Worker;

impl Ledger for Worker {
    fn take(n: usize, cap: usize) -> bool {
        let ok = HELD.with(|h| {
            let mut b = h.get();
            let ok = b.take(n, cap);
            h.set(b);
            ok
        });
        if ok {
            gauge_add(i64::try_from(n).unwrap_or(i64::MAX));
        }
        ok
    }

    fn give_back(n: usize) {
        HELD.with(|h| {
            let mut b = h.get();
            b.give_back(n);
            h.set(b);
        });
        gauge_add(-i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// A copy being captured by its stream.
pub type Capture = table::Capture<Worker>;
/// The primary's answer as it streams past, for the copies of one request.
pub type PrimaryCapture = table::PrimaryCapture<Worker>;

/// Per-plugin shadow state, shared by the root context and the streams.
#[derive(Default)]
pub struct Table {
    copies: Cell<table::Table<Worker>>,
    /// The key of copy markers, from the plan's secret (derived on first use).
    key: OnceCell<Option<Key>>,
}

impl Table {
    fn with<R>(&self, f: impl FnOnce(&mut table::Table<Worker>) -> R) -> R {
        let mut copies = self.copies.take();
        let r = f(&mut copies);
        self.copies.set(copies);
        r
    }
}

fn skip(active: &Active, experiment: usize, variant: usize, reason: Skip) {
    if let Some(m) = shadow_metrics(active, experiment, variant) {
        active.apply(decision::shadow::skipped(m, reason));
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

fn config(active: &Active, experiment: usize) -> Option<&shadow::Shadow> {
    active.plan.experiments.get(experiment)?.shadow.as_ref()
}

fn key(active: &Active) -> Option<&Key> {
    active
        .shadow
        .key
        .get_or_init(|| {
            active
                .plan
                .secret
                .as_ref()
                .map(|s| s.key(mac::PURPOSE_SHADOW))
        })
        .as_ref()
}

/// Stream: a request arrived. Returns true if it is a copy made by a Sluice filter with the
/// same secret (its marker verifies), which keeps its marker for the shadow service. Any other
/// [`SHADOW_HEADER`] is removed, so that no client can make the primary or the shadow believe
/// a request is a copy.
pub fn arrival(active: &Active, view: &mut HostRequest, now_ms: Option<u64>) -> bool {
    let Ok(Some(value)) = view.header(SHADOW_HEADER) else {
        return false;
    };
    let trusted = match (key(active), now_ms) {
        (Some(key), Some(now)) => {
            let method = view.header(":method").ok().flatten().unwrap_or_default();
            let path = view.path().ok().flatten().unwrap_or_default();
            shadow::check_marker(key, &value, now, &method, &path)
        }
        _ => false,
    };
    if !trusted {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, SHADOW_HEADER);
    }
    trusted
}

/// Stream: routes a trusted copy like any request (the routing header set as the experiments
/// decide, a client's removed) but counts nothing and copies nothing: it is a request for the
/// shadow service, not a user's.
pub fn route_copy(active: &Active, view: &mut HostRequest, now_secs: u64) {
    for exp in &active.plan.experiments {
        let mut rng = active.rng.get();
        let decided = match request::applies(exp, view) {
            Ok(true) => request::assign(exp, view, now_secs, &mut rng).ok(),
            _ => None,
        };
        active.rng.set(rng);
        let value = decided.and_then(|a| exp.variants.get(a.variant));
        let _ = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            &exp.header,
            value.map(String::as_bytes),
        );
    }
    strip_tokens(active);
}

/// Stream: removes every experiment's override token header once the variants are decided, so
/// that the token reaches neither the primary nor a copy.
pub fn strip_tokens(active: &Active) {
    for (i, exp) in active.plan.experiments.iter().enumerate() {
        if let Some(o) = &exp.qa_override {
            if hostcalls::remove_map_value(MapType::HttpRequestHeaders, &o.token_header).is_err() {
                active.count_error(i);
            }
        }
    }
}

/// Starts capturing a copy if this request is sampled and the caps allow; `None` otherwise.
/// `routing_headers` are not copied, nor any override token header. `request` holds the
/// request's serialised headers once read (here, if not yet, when the copy is taken).
pub fn start(
    active: &Active,
    experiment: usize,
    variant: usize,
    method: &[u8],
    user_bucket: Option<u32>,
    routing_headers: &[&str],
    request: &mut Option<Vec<u8>>,
) -> Option<Capture> {
    let cfg = config(active, experiment)?;
    let draw = || {
        let mut rng = active.rng.get();
        let b = rng.bucket();
        active.rng.set(rng);
        b
    };
    let in_flight = active.shadow.with(|t| t.in_flight(experiment));
    let sampling = shadow::sample(cfg, variant, method, user_bucket, draw, in_flight);
    if sampling == Sampling::NotSampled {
        return None;
    }
    if let Some(&id) = active
        .catalog
        .shadow_bytes_in_flight
        .and_then(|p| active.ids.get(p))
    {
        GAUGE.with(|g| g.set(Some(id)));
    }
    // Taken: from here on the copy ends in exactly one fate.
    if let Some(m) = shadow_metrics(active, experiment, variant) {
        active.apply(decision::shadow::sampled(m, sampling));
    }
    if sampling != Sampling::Taken {
        return None;
    }
    if request.is_none() {
        match super::raw::header_map(MapType::HttpRequestHeaders) {
            Ok(map) => *request = Some(map),
            Err(_) => {
                active.count_error(experiment);
                skip(active, experiment, variant, Skip::DispatchFailed);
                return None;
            }
        }
    }
    let original = request.as_deref().unwrap_or_default();
    let Some(key) = key(active) else {
        // A plan with a shadow always has a secret; without one no copy could be marked.
        skip(active, experiment, variant, Skip::DispatchFailed);
        return None;
    };
    let path = header_map::find_pair(original, b":path").unwrap_or_default();
    let nonce = {
        let mut rng = active.rng.get();
        let n = rng.next_u64();
        active.rng.set(rng);
        n
    };
    let marker = shadow::marker(key, now_millis().unwrap_or(0), nonce, method, path);
    let headers =
        decision::shadow::copy_headers(&active.plan, cfg, original, routing_headers, &marker);
    let started = active
        .shadow
        .with(|t| t.start_copy(experiment, variant, headers, cfg.max_bytes_in_flight));
    match started {
        Ok(c) => Some(c),
        Err(reason) => {
            skip(active, experiment, variant, reason);
            None
        }
    }
}

/// A request body chunk of `size` bytes passed: each capture that can hold it gets it (read
/// from the host once, and only if some capture wants it); the others are skipped.
pub fn request_body(active: &Active, captures: &mut Vec<Capture>, size: usize) {
    if size == 0 {
        return;
    }
    captures.retain_mut(
        |c| match c.admit_chunk(size, config(active, c.experiment)) {
            Ok(()) => true,
            Err(reason) => {
                give_up(active, c, reason);
                false
            }
        },
    );
    if captures.is_empty() {
        return;
    }
    match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size) {
        Ok(Some(chunk)) => {
            for c in captures.iter_mut() {
                c.push_chunk(&chunk);
            }
        }
        Ok(None) => {}
        Err(_) => {
            for c in captures.drain(..) {
                active.count_error(c.experiment);
                give_up(active, &c, Skip::DispatchFailed);
            }
        }
    }
}

fn give_up(active: &Active, c: &Capture, reason: Skip) {
    skip(active, c.experiment, c.variant, reason);
    active.shadow.with(|t| t.give_up(c.experiment));
}

/// Drops a capture that will never be sent (its stream ended before the request did).
pub fn abandon(active: &Active, c: &Capture) {
    give_up(active, c, Skip::NoPrimary);
}

/// Queues a complete copy for the next tick, starting the tick if it is not running.
pub fn enqueue(active: &Active, c: Capture) {
    let id = c.id;
    if !active.shadow.with(|t| t.enqueue(c)) {
        return;
    }
    // From a stream context this sets the tick of the stream's root context.
    if hostcalls::set_tick_period(TICK).is_ok() {
        active.shadow.with(|t| t.set_ticking(true));
    } else {
        log(
            LogLevel::Warn,
            "cannot start the shadow timer; copy dropped",
        );
        end(active, id, Fate::Skipped(Skip::DispatchFailed));
    }
}

/// Stops the shadow's tick (also when no plan is active any more): the timer goes back to
/// the breaker's period if the plan has a breaker, else it stops.
pub fn stop_tick(active: Option<&Active>) {
    let period = active.map_or(Duration::ZERO, super::breaker::idle_period);
    if hostcalls::set_tick_period(period).is_ok() {
        if let Some(a) = active {
            a.shadow.with(|t| t.set_ticking(false));
        }
    }
}

/// Whether the shadow's tick is running (copies queued or sent recently).
pub fn ticking(active: &Active) -> bool {
    active.shadow.with(|t| t.ticking())
}

/// Root tick: sends every queued copy; stops the tick if there was none.
pub fn send_queued(active: &Active) {
    let now = now_millis().unwrap_or(0);
    let mut pass = active.shadow.with(table::Table::begin_sending);
    while let Some(out) = active
        .shadow
        .with(|t| t.next_to_send(&mut pass, |i| config(active, i)))
    {
        let cfg = out.cfg;
        let h: Vec<(&str, &str)> = out
            .request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = &out.request.body;
        let sent = hostcalls::dispatch_http_call(
            &cfg.cluster,
            h,
            (!body.is_empty()).then_some(body.as_slice()),
            vec![],
            Duration::from_millis(cfg.timeout_ms),
        );
        if let Err(status) = &sent {
            log(
                LogLevel::Warn,
                &format!(
                    "shadow call to cluster {:?} failed: {status:?} (is the cluster defined?)",
                    cfg.cluster
                ),
            );
        }
        // The request is dropped (its bytes given back) once sent: Envoy has its own copy.
        drop(out.request);
        active
            .shadow
            .with(|t| t.sent(&mut pass, out.id, sent.ok(), now));
    }
    let sent = active.shadow.with(|t| t.end_sending(pass));
    for (id, fate) in sent.ends {
        end(active, id, fate);
    }
    if sent.stop_tick {
        stop_tick(Some(active));
    }
    finish_if_closing(active);
}

/// Root callback: the shadow answered, failed or timed out.
pub fn on_response(active: &Active, token: u32, headers: usize, body_size: usize) {
    let now = now_millis().unwrap_or(0);
    let status = || {
        if headers == 0 {
            return 0;
        }
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0)
    };
    let body =
        || hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).map_err(|_| ());
    let returned = active
        .shadow
        .with(|t| t.call_returned(token, now, body_size, |i| config(active, i), status, body));
    if let Some(r) = returned {
        if let Some((experiment, variant, elapsed)) = r.answered {
            if let Some(m) = shadow_metrics(active, experiment, variant) {
                active.apply([decision::shadow::answered(m, elapsed)]);
            }
        }
        settle(active, r.id);
    }
    finish_if_closing(active);
}

/// Stream callback: the primary's response headers are in. `content_length` lets a body that
/// is known to be over the limit go unread from its first chunk.
pub fn primary_start(
    active: &Active,
    experiments: impl Iterator<Item = usize>,
    status: u16,
    content_length: Option<usize>,
) -> PrimaryCapture {
    PrimaryCapture::new(
        experiments.filter_map(|i| config(active, i)),
        status,
        content_length,
    )
}

/// Stream callback: a chunk of `size` bytes of the primary's body passed.
pub fn primary_body(p: &mut PrimaryCapture, size: usize) {
    if !p.admit_chunk(size) {
        return;
    }
    match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size) {
        Ok(Some(chunk)) => p.push_chunk(&chunk),
        Ok(None) => {}
        Err(_) => p.chunk_unreadable(),
    }
}

/// Stream callback: the primary's answer is complete; `ids` are its copies.
pub fn primary_done(active: &Active, ids: &mut Vec<u64>, p: PrimaryCapture) {
    let shared = p.done();
    for id in ids.drain(..) {
        if active.shadow.with(|t| t.primary_done(id, &shared)) {
            settle(active, id);
        }
    }
}

/// Stream callback: the primary ended without a complete answer.
pub fn primary_gone(active: &Active, id: u64) {
    active.shadow.with(|t| t.primary_gone(id));
    settle(active, id);
}

/// Ends a copy once its fate is known ([`table::Table::settled`]).
fn settle(active: &Active, id: u64) {
    if let Some(fate) = active.shadow.with(|t| t.settled(id)) {
        end(active, id, fate);
    }
}

/// Removes a copy and counts its one fate (comparing it if that is its fate).
fn end(active: &Active, id: u64, fate: Fate) {
    let Some(e) = active.shadow.with(|t| t.remove(id)) else {
        return;
    };
    let Some(m) = shadow_metrics(active, e.experiment, e.variant) else {
        return;
    };
    match e.outcome(fate) {
        Outcome::Compare { primary, copy } => record(active, &e, primary, copy),
        Outcome::Count(fate) => active.apply(decision::shadow::ended(m, fate)),
    }
    drop(e);
    finish_if_closing(active);
}

/// Host callback: the plugin's config was replaced and its streams are gone. True if the
/// root context can go now; otherwise it stays until its last copy has ended.
pub fn close(active: &Active) -> bool {
    active.shadow.with(table::Table::close)
}

/// Reports the root context done once closing and without copies. Works from any context of
/// the plugin: the host finds the root by the plugin.
fn finish_if_closing(active: &Active) {
    if !active.shadow.with(table::Table::finish_if_closing) {
        return;
    }
    stop_tick(Some(active));
    if hostcalls::done().is_err() {
        log(
            LogLevel::Warn,
            "could not tell the host a replaced configuration is done",
        );
    }
}

/// Counts a compared copy ([`crate::decision::shadow::compared`]) and logs its disagreements
/// within the log budget.
fn record(active: &Active, e: &table::Entry<Worker>, primary: &Answer, copy: &Answer) {
    let (Some(exp), Some(m)) = (
        active.plan.experiments.get(e.experiment),
        shadow_metrics(active, e.experiment, e.variant),
    ) else {
        return;
    };
    let Some(cfg) = &exp.shadow else {
        return;
    };
    let compared = decision::shadow::compared(cfg, m, primary, copy);
    active.apply(compared.updates);
    if compared.disagreements.is_empty() || cfg.log_per_minute == 0 {
        return;
    }
    let variant = exp.variants.get(e.variant).map_or("", String::as_str);
    let now_secs = now_millis().unwrap_or(0) / 1000;
    let allowed = active
        .shadow
        .with(|t| t.take_log_lines(now_secs, cfg.log_per_minute, compared.disagreements.len()));
    for d in compared.disagreements.iter().take(allowed) {
        log(
            LogLevel::Info,
            &shadow::disagreement_line(
                &exp.name,
                variant,
                &e.request_id,
                &d.field,
                &d.primary,
                &d.shadow,
            ),
        );
    }
}
