//! The proxy-wasm shim: the only module that talks to the host.
//!
//! It calls `proxy_wasm::hostcalls` directly rather than the SDK's context traits' helpers,
//! because those unwrap host errors and decode header values as UTF-8 with a panic on
//! failure; here every host error is a [`HostFault`] that serves the control and is counted.
//!
//! Per request it makes few host calls: the key header(s), the clock, the routing header and
//! a counter on the way in; on the way out the response's headers (all in one call when an
//! outcome or prediction header is configured, else `:status` alone), the clock, and the
//! metrics that [`crate::decision::response::count_response`] decides; with a breaker, `response.flags`
//! only at the end of a stream that did not end with an answer its headers already classify
//! (see `host/breaker.rs`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

mod beacon;
mod breaker;
mod shadow;

use crate::assignment::Rng;
use crate::beacon::UserLimit;
use crate::config::{BeaconLimit, Experiment, Plan, Unit};
use crate::decision::response as decide;
use crate::decision::MetricUpdate;
use crate::header_map;
use crate::mac::{self, Key};
use crate::metrics::{Catalog, Kind};
use crate::request::{self, Assignment, HostFault, RequestView};
use crate::response;
use crate::shadow as shadow_logic;
use beacon::{beacon, echo, exposure_token, send_token};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, active: None })
    });
}}

fn log(level: LogLevel, message: &str) {
    // Logging is best effort: if even the log call fails there is nowhere to report it.
    let _ = hostcalls::log(level, message);
}

fn fault<T>(r: Result<T, proxy_wasm::types::Status>) -> Result<T, HostFault> {
    r.map_err(|_| HostFault)
}

/// A configured plugin: the plan, its metric ids, and per-worker state.
struct Active {
    plan: Plan,
    catalog: Catalog,
    /// Host metric ids, parallel to `catalog.specs`.
    ids: Vec<u32>,
    /// `(experiment, path)` of every event beacon, checked before assignment.
    beacon_paths: Vec<(usize, String)>,
    /// Every experiment's routing header: never copied to a shadow.
    routing_headers: Vec<String>,
    rng: Cell<Rng>,
    shadow: shadow::Table,
    /// Signs and checks exposure tokens; present whenever a beacon is configured.
    exposure_key: Option<Key>,
    /// Hashes user keys into the per-user event limit tables.
    table_key: Option<Key>,
    /// Per experiment with a beacon: events per user key in this worker.
    limits: Vec<Option<SharedLimit>>,
    breakers: breaker::Breakers,
    /// Metric updates decided and not yet applied (a buffer reused by every response).
    pending: RefCell<Vec<MetricUpdate>>,
}

impl Active {
    fn configure(plan: Plan, seed: u64, plugin: &str) -> Result<Active, String> {
        let catalog = Catalog::for_plan(&plan);
        let mut ids = Vec::with_capacity(catalog.specs.len());
        for spec in &catalog.specs {
            let kind = match spec.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let id = hostcalls::define_metric(kind, &spec.name)
                .map_err(|s| format!("defining metric {}: {s:?}", spec.name))?;
            ids.push(id);
        }
        let beacon_paths = plan
            .experiments
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.beacon.as_ref().map(|b| (i, b.path.clone())))
            .collect();
        let routing_headers = plan.experiments.iter().map(|e| e.header.clone()).collect();
        let exposure_key = plan.secret.as_ref().map(|s| s.key(mac::PURPOSE_EXPOSURE));
        let table_key = plan.secret.as_ref().map(|s| s.key(mac::PURPOSE_USER_TABLE));
        let limits = shared_limits(&plan, table_key.as_ref());
        // Every worker sets the same value into the one stat Envoy keeps per name.
        let version = plan.push_version();
        for m in &catalog.experiments {
            if let Some(&id) = ids.get(m.config_revision) {
                hostcalls::record_metric(id, version)
                    .map_err(|s| format!("setting {}: {s:?}", crate::metrics::CONFIG_REVISION))?;
            }
        }
        let breakers = breaker::Breakers::new(&plan, plugin);
        Ok(Active {
            breakers,
            plan,
            catalog,
            ids,
            beacon_paths,
            routing_headers,
            rng: Cell::new(Rng::new(seed)),
            shadow: shadow::Table::default(),
            exposure_key,
            table_key,
            limits,
            pending: RefCell::new(Vec::with_capacity(16)),
        })
    }

    fn increment(&self, position: usize) {
        if let Some(&id) = self.ids.get(position) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn record(&self, position: usize, value: u64) {
        if let Some(&id) = self.ids.get(position) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Applies metric updates (a failed update is not retried: counters are best effort).
    fn apply(&self, updates: impl IntoIterator<Item = MetricUpdate>) {
        for u in updates {
            match u {
                MetricUpdate::Increment(pos) => self.increment(pos),
                MetricUpdate::Record(pos, value) => self.record(pos, value),
            }
        }
    }

    /// Decides metric updates into the worker's reusable buffer (no allocation once it has
    /// grown) and applies them: the per-response path.
    fn apply_decided(&self, decide: impl FnOnce(&mut Vec<MetricUpdate>)) {
        let Ok(mut out) = self.pending.try_borrow_mut() else {
            return;
        };
        out.clear();
        decide(&mut out);
        self.apply(out.iter().copied());
    }

    fn count_error(&self, experiment: usize) {
        if let Some(m) = self.catalog.experiments.get(experiment) {
            self.increment(m.errors);
        }
    }
}

/// A per-user event table, shared by every plan of this worker that has the same experiment,
/// limit and secret.
type SharedLimit = Rc<RefCell<UserLimit>>;

/// A table kept across configurations.
struct Kept {
    experiment: String,
    limit: BeaconLimit,
    key: Key,
    table: SharedLimit,
}

thread_local! {
    /// Each configuration change creates a new root context (a rollout pushes at every
    /// stage); the per-user tables live here, in the worker's VM, so that a push does not
    /// refill every user's budget.
    static KEPT: RefCell<Vec<Kept>> = const { RefCell::new(Vec::new()) };
}

/// The plan's per-user tables: the kept ones where experiment, limit and secret are
/// unchanged, new ones otherwise. Tables no live plan uses are forgotten, so the memory stays
/// bounded by the live plans' limits.
fn shared_limits(plan: &Plan, key: Option<&Key>) -> Vec<Option<SharedLimit>> {
    let fresh = |b: &BeaconLimit| {
        Rc::new(RefCell::new(UserLimit::new(
            b.users,
            b.events_per_user,
            b.window_seconds,
        )))
    };
    KEPT.with(|kept| {
        let (Some(key), Ok(mut kept)) = (key, kept.try_borrow_mut()) else {
            return plan
                .experiments
                .iter()
                .map(|e| e.beacon.as_ref().map(|b| fresh(&b.limit)))
                .collect();
        };
        let tables: Vec<Option<SharedLimit>> = plan
            .experiments
            .iter()
            .map(|e| {
                let b = e.beacon.as_ref()?;
                let found = kept
                    .iter()
                    .find(|k| k.experiment == e.name && k.limit == b.limit && &k.key == key);
                Some(match found {
                    Some(k) => k.table.clone(),
                    None => {
                        let table = fresh(&b.limit);
                        kept.push(Kept {
                            experiment: e.name.clone(),
                            limit: b.limit.clone(),
                            key: key.clone(),
                            table: table.clone(),
                        });
                        table
                    }
                })
            })
            .collect();
        kept.retain(|k| Rc::strong_count(&k.table) > 1);
        tables
    })
}

struct Root {
    context_id: u32,
    active: Option<Rc<Active>>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if let Some(active) = &self.active {
            shadow::on_response(active, token, headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(a) = &self.active {
            a.breakers.retire();
        }
        // A replaced config's root waits for its shadow copies (host/shadow.rs).
        self.active.as_ref().is_none_or(|a| shadow::close(a))
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => {
                log(
                    LogLevel::Error,
                    "rejected config: plugin configuration is empty",
                );
                return false;
            }
            Err(s) => {
                log(
                    LogLevel::Error,
                    &format!("cannot read plugin configuration: {s:?}"),
                );
                return false;
            }
        };
        let plan = match Plan::from_json(&bytes) {
            Ok(plan) => plan,
            Err(e) => {
                log(LogLevel::Error, &format!("rejected config: {e}"));
                return false;
            }
        };
        let seed = now_nanos().unwrap_or(0) ^ (u64::from(self.context_id) << 32);
        // Names the breakers' shared state: plugins sharing a VM keep theirs apart.
        let plugin = hostcalls::get_property(vec!["plugin_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        match Active::configure(plan, seed, &plugin).and_then(|a| breaker::start(&a).map(|()| a)) {
            Ok(active) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "configured {} experiment(s), {} metrics{}",
                        active.plan.experiments.len(),
                        active.ids.len(),
                        active
                            .plan
                            .revision
                            .as_ref()
                            .map(|r| format!(", revision {r}"))
                            .unwrap_or_default()
                    ),
                );
                self.active = Some(Rc::new(active));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("rejected config: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK aborts on None, so an unconfigured plugin still gets a (pass-through) stream.
        Some(Box::new(Stream {
            active: self.active.clone(),
            applied: Vec::new(),
            start: None,
            captures: Vec::new(),
            queued: Vec::new(),
            primary: None,
            answer: None,
            ended: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        match &self.active {
            Some(active) => {
                if shadow::ticking(active) {
                    shadow::send_queued(active);
                }
                breaker::tick(active);
            }
            None => shadow::stop_tick(None),
        }
    }
}

fn now() -> Result<SystemTime, HostFault> {
    fault(hostcalls::get_current_time())
}

fn now_millis() -> Option<u64> {
    millis(now().ok()?)
}

fn millis(t: SystemTime) -> Option<u64> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn now_nanos() -> Option<u64> {
    let d = now().ok()?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_nanos()).ok()
}

/// Request headers read through the host, each fetched at most once.
#[derive(Default)]
struct HostRequest {
    cache: Vec<(String, Option<Vec<u8>>)>,
}

impl RequestView for HostRequest {
    fn header(&mut self, name: &str) -> Result<Option<Vec<u8>>, HostFault> {
        if let Some((_, v)) = self.cache.iter().find(|(n, _)| n == name) {
            return Ok(v.clone());
        }
        let v = fault(hostcalls::get_map_value_bytes(
            MapType::HttpRequestHeaders,
            name,
        ))?;
        self.cache.push((name.to_string(), v.clone()));
        Ok(v)
    }
}

/// The response headers as read for counting.
enum ResponseHeaders {
    /// Nothing read (no counted experiment, or the host call failed).
    None,
    /// Only `:status`, by its own call.
    Status(Option<Vec<u8>>),
    /// Every header, serialised by the host in one call (see [`header_map`]).
    Pairs(Vec<u8>),
}

impl ResponseHeaders {
    fn get(&self, name: &str) -> Option<&[u8]> {
        match self {
            ResponseHeaders::None => None,
            ResponseHeaders::Status(s) => s.as_deref().filter(|_| name == ":status"),
            ResponseHeaders::Pairs(map) => header_map::find_pair(map, name.as_bytes()),
        }
    }
}

/// The one host call the SDK offers only with a decoding that allocates every name and value
/// (and panics on an unexpected status): here the serialised map is kept as one buffer and
/// read in place.
mod raw {
    use proxy_wasm::types::{MapType, Status};

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
    }

    /// All pairs of a header map, serialised (see [`crate::header_map`]).
    pub fn header_map(map_type: MapType) -> Result<Vec<u8>, Status> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer and a size; the pointer comes from the module's
        // own `proxy_on_memory_allocate` (the SDK's, a `Vec<u8>` of exactly `size` bytes
        // given up), so the buffer is ours to own and free, as the SDK's own decoding does.
        match unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) } {
            Status::Ok if data.is_null() => Ok(Vec::new()),
            // SAFETY: see above; `size` bytes, all written by the host.
            Status::Ok => Ok(unsafe { Vec::from_raw_parts(data, size, size) }),
            s => Err(s),
        }
    }
}

/// One experiment's decision for the current request.
struct Applied {
    experiment: usize,
    assignment: Assignment,
    /// The exposure token sent back with the response, for experiments with a beacon.
    token: Option<String>,
}

impl Applied {
    fn served(&self) -> decide::Served {
        decide::Served {
            experiment: self.experiment,
            variant: self.assignment.variant,
            counted: self.assignment.counted(),
        }
    }
}

struct Stream {
    active: Option<Rc<Active>>,
    applied: Vec<Applied>,
    start: Option<SystemTime>,
    /// Shadow copies still reading the request body.
    captures: Vec<shadow::Capture>,
    /// Ids of copies queued or sent, waiting for the primary's answer.
    queued: Vec<u64>,
    /// The primary's answer as captured so far, for the queued copies.
    primary: Option<shadow::PrimaryCapture>,
    /// What the response headers said, for the breaker (`None` until they pass).
    answer: Option<Answer>,
    /// The response passed this filter to its end (headers, body or trailers with end of
    /// stream).
    ended: bool,
}

/// The response headers' status and, for a non-2xx answer, Envoy's code details.
struct Answer {
    status: Option<u16>,
    details: Option<Vec<u8>>,
    /// When the headers passed (ms since the epoch), if the clock could be read.
    at_ms: Option<u64>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        let mut view = HostRequest::default();
        if !active.beacon_paths.is_empty() {
            if let Ok(Some(path)) = view.path() {
                let p = request::path_only(&path).to_vec();
                if active.beacon_paths.iter().any(|(_, b)| b.as_bytes() == p) {
                    return beacon(&active, &mut view, &path);
                }
            }
        }
        let now = now();
        self.start = now.ok();
        let now_secs = now
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let now_ms = now
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        if shadow::arrival(&active, &mut view, now_ms) {
            // A Sluice filter's shadow copy: forwarded, but not counted and not copied again.
            shadow::route_copy(&active, &mut view, now_secs);
            return Action::Continue;
        }
        for (i, exp) in active.plan.experiments.iter().enumerate() {
            let mut rng = active.rng.get();
            let decided = match request::applies(exp, &mut view) {
                Ok(true) => request::assign(exp, &mut view, now_secs, &mut rng).map(Some),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            };
            active.rng.set(rng);
            match decided {
                Ok(Some(mut a)) => {
                    if a.counted() && active.breakers.tripped(i, a.variant) {
                        // The breaker holds this treatment out: its units get the control.
                        a.variant = exp.control;
                    }
                    let token = exposure_token(&active, i, exp, &mut view, a, now_secs);
                    self.route(&active, i, exp, a, token, &mut view);
                }
                Ok(None) => {
                    // Not in this experiment, but a client still must not pick a variant.
                    if fault(hostcalls::remove_map_value(
                        MapType::HttpRequestHeaders,
                        &exp.header,
                    ))
                    .is_err()
                    {
                        active.count_error(i);
                    }
                }
                Err(HostFault) => {
                    active.count_error(i);
                    let control = Assignment {
                        variant: exp.control,
                        basis: request::Basis::Key,
                        override_denied: false,
                    };
                    self.route(&active, i, exp, control, None, &mut view);
                }
            }
        }
        shadow::strip_tokens(&active);
        self.start_shadows(&active, &mut view, end_of_stream);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        if self.captures.is_empty() {
            return Action::Continue;
        }
        // The chunk is copied as it passes; the primary request is never held back.
        shadow::request_body(&active, &mut self.captures, body_size);
        if end_of_stream {
            self.queue_captures(&active);
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        if let Some(active) = self.active.clone() {
            self.queue_captures(&active);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.ended |= end_of_stream;
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        let Some(primary) = &mut self.primary else {
            return Action::Continue;
        };
        shadow::primary_body(primary, body_size);
        if end_of_stream {
            self.finish_primary(&active);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.ended = true;
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(active) = self.active.clone() else {
            return;
        };
        self.count_for_breakers(&active);
        for c in self.captures.drain(..) {
            shadow::abandon(&active, &c);
        }
        for id in self.queued.drain(..) {
            shadow::primary_gone(&active, id);
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.ended = end_of_stream;
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        if self.applied.is_empty() {
            return Action::Continue;
        }
        // Token headers already set by this filter on this response: later tokens are added.
        let mut token_headers: Vec<&str> = Vec::new();
        for applied in &self.applied {
            let i = applied.experiment;
            let (Some(exp), Some(em)) = (
                active.plan.experiments.get(i),
                active.catalog.experiments.get(i),
            ) else {
                continue;
            };
            // A variant without metrics is counted as an error by `decide::count_response`.
            if em.variants.get(applied.assignment.variant).is_none() {
                continue;
            }
            let variant_name = exp
                .variants
                .get(applied.assignment.variant)
                .map_or("", String::as_str);
            echo(&active, i, exp, variant_name);
            if let Some(t) = &applied.token {
                send_token(&active, i, exp, t, &mut token_headers);
            }
        }
        let headers = self.read_response(&active);
        if !self.queued.is_empty() {
            self.start_primary(&active, &headers, end_of_stream);
        }
        self.count_response(&active, &headers);
        Action::Continue
    }
}

impl Stream {
    /// Reads the response headers this stream needs, in one host call for all of them when
    /// more than `:status` is wanted: by counting (an outcome or prediction header,
    /// [`decide::reads_more_than_status`]) or by the shadow copies waiting for the primary's
    /// answer (`:status` and `content-length`); `:status` alone for counting otherwise.
    fn read_response(&self, active: &Active) -> ResponseHeaders {
        let served = || self.applied.iter().map(Applied::served);
        let counted = served().any(|s| s.counted);
        if !self.queued.is_empty()
            || (counted && decide::reads_more_than_status(&active.plan, served()))
        {
            match raw::header_map(MapType::HttpResponseHeaders) {
                Ok(map) => ResponseHeaders::Pairs(map),
                Err(_) => ResponseHeaders::None,
            }
        } else if counted {
            ResponseHeaders::Status(
                hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
                    .ok()
                    .flatten(),
            )
        } else {
            ResponseHeaders::None
        }
    }

    /// Applies the metric updates [`decide::count_response`] decides for the response
    /// `headers` (Envoy's code details read too for a non-2xx answer), and keeps the status
    /// and details for the breaker.
    fn count_response(&mut self, active: &Active, headers: &ResponseHeaders) {
        let served = || self.applied.iter().map(Applied::served);
        let counted = served().any(|s| s.counted);
        let status = headers.get(":status").filter(|_| counted);
        let details = if counted && decide::details_needed(status) {
            hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
        } else {
            None
        };
        let end = if counted { now().ok() } else { None };
        let elapsed_ms = match (self.start, end) {
            (Some(start), Some(end)) => Some(
                u64::try_from(
                    end.duration_since(start)
                        .unwrap_or(Duration::ZERO)
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
            ),
            _ => None,
        };
        let answer = decide::Answer {
            status,
            details: details.as_deref(),
            elapsed_ms,
        };
        let header = |name: &str| headers.get(name);
        active.apply_decided(|out| {
            decide::count_response(
                &active.plan,
                &active.catalog,
                served(),
                &answer,
                header,
                out,
            )
        });
        if counted {
            self.answer = Some(Answer {
                status: status.and_then(|s| std::str::from_utf8(s).ok()?.trim().parse().ok()),
                details,
                at_ms: end.and_then(millis),
            });
        }
    }

    /// At the end of the stream: counts the request, failed or not, in the breaker of every
    /// experiment that has one and assigned it. The flags (resets, timeouts, the client gone)
    /// are complete only now, and read only where they can change the class
    /// ([`response::flags_needed`]): a stream that ended with an answer that is no failure by
    /// its headers costs no host call here and is counted at the time its headers passed. A
    /// request that never had response headers reads its status and details here too.
    fn count_for_breakers(&mut self, active: &Active) {
        let breakers = &active.breakers;
        if !self
            .applied
            .iter()
            .any(|a| a.assignment.counted() && breakers.counts(a.experiment))
        {
            return;
        }
        let property = |path: &[&str]| hostcalls::get_property(path.to_vec()).ok().flatten();
        let headers_passed = self.answer.is_some();
        let answer = self.answer.take().unwrap_or_else(|| Answer {
            status: property(&["response", "code"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .and_then(|b| u16::try_from(u64::from_le_bytes(b)).ok())
                .filter(|&s| s != 0),
            details: property(&["response", "code_details"]),
            at_ms: None,
        });
        let mut facts = crate::breaker::Facts {
            status: answer.status,
            code_details: answer.details.as_deref().unwrap_or_default(),
            flags: 0,
        };
        let needed = response::flags_needed(headers_passed.then_some(&facts), self.ended);
        if needed {
            facts.flags = property(&["response", "flags"])
                .map_or(0, |b| crate::breaker::flags_from_property(&b));
        }
        let failure = crate::breaker::classify(&facts);
        let at = match answer.at_ms {
            Some(t) if !needed => Some(t),
            _ => now_millis(),
        };
        let Some(now) = at else {
            return;
        };
        for a in &self.applied {
            if a.assignment.counted() {
                breakers.record(a.experiment, a.assignment.variant, now, failure);
            }
        }
    }

    /// Starts shadow captures for the experiments that shadow this request. The request's
    /// headers are read whole at most once: when the first copy is taken, or up front (and
    /// `:method` taken from them) when an experiment copies every eligible request
    /// ([`shadow_logic::Shadow::copies_all`]).
    fn start_shadows(&mut self, active: &Active, view: &mut HostRequest, end_of_stream: bool) {
        let routing: Vec<&str> = active.routing_headers.iter().map(String::as_str).collect();
        let mut request: Option<Vec<u8>> = None;
        for a in &self.applied {
            let Some(exp) = active.plan.experiments.get(a.experiment) else {
                continue;
            };
            let Some(cfg) = &exp.shadow else {
                continue;
            };
            if !a.assignment.counted() {
                continue;
            }
            if request.is_none() && cfg.copies_all(a.assignment.variant) {
                request = raw::header_map(MapType::HttpRequestHeaders).ok();
            }
            let method = match &request {
                Some(map) => header_map::find_pair(map, b":method").map(<[u8]>::to_vec),
                None => view.header(":method").ok().flatten(),
            }
            .unwrap_or_default();
            let user_bucket = match (&exp.unit, cfg.sample_by) {
                (Unit::User { keys, .. }, shadow_logic::SampleBy::User) => {
                    request::user_key(keys, view)
                        .ok()
                        .flatten()
                        .map(|k| crate::assignment::bucket(&cfg.salt, &k))
                }
                _ => None,
            };
            if let Some(c) = shadow::start(
                active,
                a.experiment,
                a.assignment.variant,
                &method,
                user_bucket,
                &routing,
                &mut request,
            ) {
                self.captures.push(c);
            }
        }
        if end_of_stream {
            self.queue_captures(active);
        }
    }

    fn queue_captures(&mut self, active: &Active) {
        for c in self.captures.drain(..) {
            self.queued.push(c.id);
            shadow::enqueue(active, c);
        }
    }

    /// Begins capturing the primary's answer for the queued copies.
    fn start_primary(&mut self, active: &Active, headers: &ResponseHeaders, end_of_stream: bool) {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|s| std::str::from_utf8(s).ok()?.trim().parse::<usize>().ok())
        };
        let status = number(":status")
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0);
        let experiments = self.applied.iter().map(|a| a.experiment);
        self.primary = Some(shadow::primary_start(
            active,
            experiments,
            status,
            number("content-length"),
        ));
        if end_of_stream {
            self.finish_primary(active);
        }
    }

    fn finish_primary(&mut self, active: &Active) {
        if let Some(primary) = self.primary.take() {
            shadow::primary_done(active, &mut self.queued, primary);
        }
    }

    /// Sets the routing header (replacing any client value) and counts the request.
    fn route(
        &mut self,
        active: &Active,
        i: usize,
        exp: &Experiment,
        a: Assignment,
        token: Option<String>,
        view: &mut HostRequest,
    ) {
        let Some(em) = active.catalog.experiments.get(i) else {
            return;
        };
        if a.override_denied {
            active.increment(em.overrides_denied);
        }
        let mut a = a;
        let mut token = token;
        let name = exp.variants.get(a.variant).map_or("", String::as_str);
        let set = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            &exp.header,
            Some(name.as_bytes()),
        );
        if set.is_err() {
            active.count_error(i);
            // Fail toward the control; if even that fails the route falls through to its default.
            let control = exp.variants.get(exp.control).map_or("", String::as_str);
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                &exp.header,
                Some(control.as_bytes()),
            );
            a.variant = exp.control;
            // The token named the variant that could not be set; no exposure, no token.
            token = None;
        }
        let Some(vm) = em.variants.get(a.variant) else {
            active.count_error(i);
            return;
        };
        if a.counted() {
            active.increment(vm.requests);
            // Keyed requests also by replicate group (the key was read, and is cached, already).
            if let (request::Basis::Key, Unit::User { keys, .. }) = (a.basis, &exp.unit) {
                if let Ok(Some(key)) = request::user_key(keys, view) {
                    let h = crate::assignment::hash(&exp.salt, &key);
                    let group = crate::assignment::replicate_of(h, vm.replicates.len());
                    if let Some(&r) = vm.replicates.get(group) {
                        active.increment(r);
                    }
                }
            }
            if a.basis == request::Basis::MissingKey {
                active.increment(vm.missing_key);
            }
        } else {
            active.increment(vm.overrides);
        }
        self.applied.push(Applied {
            experiment: i,
            assignment: a,
            token,
        });
    }
}
