//! The data-plane breaker, pure: no host calls.
//!
//! Parts:
//! - [`classify`]: which hard failure, if any, a finished response was, from what the host
//!   reads (`:status`, `response.code_details`, `response.flags`);
//! - [`Window`]: per-variant request and failure counts (by [`FailureKind`]) in time buckets
//!   over a sliding window; one per worker for what it saw since its last flush, one merged
//!   process-wide in proxy-wasm shared data;
//! - [`State`] and its byte encoding: the merged window plus the trips, tagged with the
//!   experiment and the configuration's [`Epoch`] so that state from another experiment or
//!   an older push is ignored;
//! - [`judge`]: the trip rule for one treatment against the control (see
//!   `docs/statistics.md`, "The breaker"), with the exact binomial tail in [`binomial`];
//! - [`tick`]: one worker's periodic step: merge its counts into the stored state, evaluate
//!   the rule, and return the bytes to write back (compare-and-swap) and the trips.
//!
//! A trip holds until the epoch changes (a new push from the controller).

pub mod binomial;
mod encode;

/// Kinds of hard failure, in the order of [`REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// A 5xx answer from the upstream (or an Envoy reply not covered by the kinds below).
    Status5xx,
    /// The upstream reset the stream, refused or dropped the connection, or broke protocol.
    Reset,
    /// Envoy answered for the variant itself: no healthy host, overflow, no cluster or route.
    LocalReply,
    /// The upstream did not answer in time (route or per-try timeout, max stream duration).
    Timeout,
}

/// Number of failure kinds.
pub const KINDS: usize = 4;

/// The `reason` label of `sluice_breaker_trips_total`, by [`FailureKind::index`].
pub const REASONS: [&str; KINDS] = ["5xx", "reset", "local_reply", "timeout"];

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [FailureKind; KINDS] = [
        FailureKind::Status5xx,
        FailureKind::Reset,
        FailureKind::LocalReply,
        FailureKind::Timeout,
    ];

    /// Position in [`REASONS`] and in [`Counts::failures`].
    pub fn index(self) -> usize {
        match self {
            FailureKind::Status5xx => 0,
            FailureKind::Reset => 1,
            FailureKind::LocalReply => 2,
            FailureKind::Timeout => 3,
        }
    }

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        REASONS[self.index()]
    }

    fn from_index(i: usize) -> Option<FailureKind> {
        FailureKind::ALL.get(i).copied()
    }
}

/// Envoy's response flags (`response.flags`: bit `i` is core flag number `i` in Envoy's
/// `StreamInfo::CoreResponseFlag`), those [`classify`] looks at.
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1;
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    pub const LOCAL_RESET: u64 = 1 << 3;
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4;
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7;
    pub const NO_ROUTE_FOUND: u64 = 1 << 8;
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14;
    pub const STREAM_IDLE_TIMEOUT: u64 = 1 << 16;
    pub const INVALID_ENVOY_REQUEST_HEADERS: u64 = 1 << 17;
    pub const DOWNSTREAM_PROTOCOL_ERROR: u64 = 1 << 18;
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23;
    pub const NO_CLUSTER_FOUND: u64 = 1 << 24;
    pub const OVERLOAD_MANAGER: u64 = 1 << 25;
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28;

    /// The client, not the variant, ended or spoiled the exchange: not the variant's failure.
    pub const DOWNSTREAM: u64 = DOWNSTREAM_CONNECTION_TERMINATION
        | DOWNSTREAM_REMOTE_RESET
        | DOWNSTREAM_PROTOCOL_ERROR
        | INVALID_ENVOY_REQUEST_HEADERS;
    /// The whole proxy is shedding load: every variant alike, not the variant's failure.
    pub const PROXY: u64 = OVERLOAD_MANAGER;
    pub const TIMEOUT: u64 = UPSTREAM_REQUEST_TIMEOUT | UPSTREAM_MAX_STREAM_DURATION_REACHED;
    pub const RESET: u64 = LOCAL_RESET
        | UPSTREAM_REMOTE_RESET
        | UPSTREAM_CONNECTION_FAILURE
        | UPSTREAM_CONNECTION_TERMINATION
        | UPSTREAM_PROTOCOL_ERROR;
    pub const LOCAL_REPLY: u64 =
        NO_HEALTHY_UPSTREAM | UPSTREAM_OVERFLOW | NO_ROUTE_FOUND | NO_CLUSTER_FOUND;
}

/// The `response.flags` property as the host returns it (a little-endian u64); 0 when it is
/// missing or malformed.
pub fn flags_from_property(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes)
}

/// What the host knows about a finished response of a request assigned to a variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The `:status` sent downstream, if any was.
    pub status: Option<u16>,
    /// `response.code_details` (empty if unavailable): `via_upstream` for the upstream's own
    /// answer, anything else for a reply Envoy made itself.
    pub code_details: &'a [u8],
    /// `response.flags` (see [`flags_from_property`]); complete only in `on_log`.
    pub flags: u64,
}

/// `response.code_details` of an answer relayed from the upstream.
const VIA_UPSTREAM: &[u8] = b"via_upstream";

/// Code details that mean the upstream ran out of time.
const TIMEOUT_DETAILS: [&[u8]; 4] = [
    b"response_timeout",
    b"upstream_per_try_timeout",
    b"upstream_per_try_idle_timeout",
    b"upstream_max_stream_duration_reached",
];

/// Code details that mean the upstream's stream or connection failed.
const RESET_DETAILS: &[u8] = b"upstream_reset";

/// Code details of Envoy's own answers for the variant's cluster.
const LOCAL_REPLY_DETAILS: [&[u8]; 4] = [
    b"no_healthy_upstream",
    b"cluster_not_found",
    b"maintenance_mode",
    b"route_not_found",
];

/// The hard failure a response was, or `None` for an answer that counts as a success.
///
/// The client's own doing (it went away, sent a broken request) and proxy-wide overload are
/// never the variant's failure. Otherwise, in this order: a timeout; a reset or failed
/// connection (also after a 2xx started: the body was cut); Envoy's own reply for the
/// variant (no healthy host, overflow, no cluster or route; or any reply Envoy made with a
/// 5xx or with no status at all); a 5xx from the upstream. 4xx answers are the request's
/// fault, not the variant's, and do not count (an Envoy 408 or 429 included).
pub fn classify(f: &Facts<'_>) -> Option<FailureKind> {
    if f.flags & (flags::DOWNSTREAM | flags::PROXY) != 0 {
        return None;
    }
    let details = f.code_details;
    let is_5xx = matches!(f.status, Some(500..=599));
    let local = !details.is_empty() && details != VIA_UPSTREAM;
    let idle = f.flags & flags::STREAM_IDLE_TIMEOUT != 0 || details == b"stream_idle_timeout";
    if f.flags & flags::TIMEOUT != 0
        || TIMEOUT_DETAILS.iter().any(|d| details.starts_with(d))
        // The idle timeout answers 408 when the client is the slow side, 504 when the upstream is.
        || (idle && f.status == Some(504))
    {
        return Some(FailureKind::Timeout);
    }
    if f.flags & flags::RESET != 0 || details.starts_with(RESET_DETAILS) {
        return Some(FailureKind::Reset);
    }
    if f.flags & flags::LOCAL_REPLY != 0
        || LOCAL_REPLY_DETAILS.iter().any(|d| details.starts_with(d))
        || (local && (is_5xx || f.status.is_none()) && !idle)
    {
        return Some(FailureKind::LocalReply);
    }
    is_5xx.then_some(FailureKind::Status5xx)
}

/// Checked breaker parameters of one experiment (`experiments[].breaker`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Length of the sliding window, in milliseconds.
    pub window_ms: u64,
    /// Fewest requests a treatment needs in the counts a trip is judged on.
    pub min_requests: u64,
    /// Absolute ceiling on a treatment's failure rate, in (0, 1).
    pub max_error_rate: f64,
    /// Ceiling relative to the control's failure rate, ≥ 1.
    pub max_ratio_to_control: f64,
    /// α of one evaluation of one treatment (all of the window's suffixes together).
    pub significance: f64,
}

/// Time buckets per window. A trip is judged on every suffix of the window (the last bucket,
/// the last two, …, all of them), so a failure burst is not diluted by the healthy traffic
/// before it; more buckets would mean more tests and a smaller α each.
pub const BUCKETS: usize = 10;

impl Params {
    /// Width of one time bucket in milliseconds (at least 1).
    pub fn bucket_ms(&self) -> u64 {
        (self.window_ms / BUCKETS as u64).max(1)
    }
}

/// Requests and failures (by kind) of one variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    /// By [`FailureKind::index`].
    pub failures: [u64; KINDS],
}

impl Counts {
    /// All failures, every kind.
    pub fn failed(&self) -> u64 {
        self.failures.iter().fold(0, |a, &b| a.saturating_add(b))
    }

    /// Failures per request; 0 without requests.
    pub fn rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failed() as f64 / self.requests as f64
        }
    }

    /// The kind with the most failures (the first in [`REASONS`] order on a tie); `None`
    /// without failures.
    pub fn top_kind(&self) -> Option<FailureKind> {
        let mut best: Option<(usize, u64)> = None;
        for (i, &n) in self.failures.iter().enumerate() {
            if n > 0 && best.is_none_or(|(_, m)| n > m) {
                best = Some((i, n));
            }
        }
        best.and_then(|(i, _)| FailureKind::from_index(i))
    }

    fn add(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        for (a, b) in self.failures.iter_mut().zip(&other.failures) {
            *a = a.saturating_add(*b);
        }
    }
}

/// One time bucket: its number (`time_ms / bucket_ms`) and the counts per variant.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    id: u64,
    counts: Vec<Counts>,
}

/// Per-variant counts in [`BUCKETS`] time buckets: a ring indexed by bucket number, so
/// recording and merging never move data and old buckets are overwritten in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    bucket_ms: u64,
    variants: usize,
    slots: Vec<Slot>,
}

impl Window {
    /// An empty window for `variants` variants.
    pub fn new(params: &Params, variants: usize) -> Window {
        Window::with_bucket(params.bucket_ms(), variants)
    }

    fn with_bucket(bucket_ms: u64, variants: usize) -> Window {
        Window {
            bucket_ms: bucket_ms.max(1),
            variants,
            slots: vec![
                Slot {
                    id: 0,
                    counts: vec![Counts::default(); variants],
                };
                BUCKETS
            ],
        }
    }

    /// Number of variants counted.
    pub fn variants(&self) -> usize {
        self.variants
    }

    /// Counts one finished request of `variant` at `now_ms` (Unix ms), failed or not. Out of
    /// range variants and requests older than the window are ignored.
    pub fn record(&mut self, now_ms: u64, variant: usize, failure: Option<FailureKind>) {
        let mut c = Counts {
            requests: 1,
            ..Counts::default()
        };
        if let Some(k) = failure {
            c.failures[k.index()] = 1;
        }
        self.add(now_ms, variant, &c);
    }

    /// Counts many requests of `variant` at once (simulations, tests).
    pub fn add(&mut self, now_ms: u64, variant: usize, counts: &Counts) {
        self.add_counts(now_ms / self.bucket_ms, variant, counts);
    }

    fn add_counts(&mut self, id: u64, variant: usize, c: &Counts) {
        if variant >= self.variants {
            return;
        }
        let ring = BUCKETS as u64;
        let Some(slot) = self.slots.get_mut((id % ring) as usize) else {
            return;
        };
        if slot.id < id {
            slot.id = id;
            slot.counts.iter_mut().for_each(|c| *c = Counts::default());
        } else if slot.id > id {
            // The ring moved on: this bucket is a whole window old.
            return;
        }
        if let Some(v) = slot.counts.get_mut(variant) {
            v.add(c);
        }
    }

    /// Whether nothing was recorded since creation or the last [`Window::clear`].
    pub fn is_empty(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.counts.iter().all(|c| c.requests == 0 && c.failed() == 0))
    }

    /// Forgets every count (after a worker's counts were merged into the shared state).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.id = 0;
            s.counts.iter_mut().for_each(|c| *c = Counts::default());
        }
    }

    /// Adds another window's counts (same bucket width and variants; otherwise nothing).
    pub fn merge(&mut self, other: &Window) {
        if other.bucket_ms != self.bucket_ms || other.variants != self.variants {
            return;
        }
        for s in &other.slots {
            for (v, c) in s.counts.iter().enumerate() {
                if c.requests > 0 || c.failed() > 0 {
                    self.add_counts(s.id, v, c);
                }
            }
        }
    }

    /// Counts per variant over the last `buckets` buckets up to the one holding `now_ms`
    /// (that one partly elapsed). Buckets stamped later than `now_ms` are included: they come
    /// from a worker whose clock read was a moment later.
    pub fn suffix(&self, now_ms: u64, buckets: usize) -> Vec<Counts> {
        let now = now_ms / self.bucket_ms;
        let oldest = now.saturating_sub(buckets.saturating_sub(1) as u64);
        let mut out = vec![Counts::default(); self.variants];
        for s in self.slots.iter().filter(|s| s.id >= oldest) {
            for (o, c) in out.iter_mut().zip(&s.counts) {
                o.add(c);
            }
        }
        out
    }

    /// Counts per variant over the whole window ending at `now_ms`.
    pub fn totals(&self, now_ms: u64) -> Vec<Counts> {
        self.suffix(now_ms, BUCKETS)
    }
}

/// Which configuration a state belongs to: a trip holds until this changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    /// The controller's push version (`Revision::version`); 0 if the revision is not in the
    /// controller's form.
    pub version: u64,
    /// With `version` 0: a digest of the free-form revision (0 without one), so that a
    /// hand-edited configuration with a new revision also clears trips.
    pub digest: u64,
}

impl Epoch {
    /// Whether state written under `stored` must be left alone by a worker still on `self`:
    /// both are controller push versions and the stored one is newer (this worker has not
    /// taken the new configuration yet).
    pub fn is_older_than(&self, stored: &Epoch) -> bool {
        self.version != 0 && stored.version != 0 && stored.version > self.version
    }
}

/// What tripped a treatment: the numbers of the suffix of the window it was judged on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trip {
    /// The treatment's variant index.
    pub variant: usize,
    /// The failure kind with most failures in the treatment's counts.
    pub reason: FailureKind,
    /// When it tripped (Unix ms).
    pub at_ms: u64,
    pub treatment: Counts,
    pub control: Counts,
    /// The failure rate the treatment was tested against:
    /// max(`max_error_rate`, `max_ratio_to_control` × the control's rate).
    pub ceiling: f64,
    /// One-sided exact binomial p-value of the treatment's failures against `ceiling`.
    pub p_value: f64,
}

/// The verdict on one treatment: a trip, or why not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Significantly above both ceilings in some suffix of the window.
    Trip(Trip),
    /// Not enough evidence (or not enough requests) in any suffix.
    Hold,
}

/// The trip rule for treatment `variant` at `now_ms` on a window's counts.
///
/// For each suffix of the window (last bucket, last two, …, all [`BUCKETS`]) with at least
/// `min_requests` treatment requests: let the ceiling be
/// c = max(`max_error_rate`, `max_ratio_to_control` × control failures / control requests)
/// (the absolute ceiling bounds it below when the control has no failures); the treatment
/// trips when its failure rate exceeds c and P(Bin(n, c) ≥ k) ≤ `significance` / BUCKETS
/// (Bonferroni over the suffixes). The control is judged on the same suffix, so an outage
/// that hits every variant alike raises its ceiling too. The most recent suffix that trips
/// is reported.
pub fn judge(
    params: &Params,
    window: &Window,
    variant: usize,
    control: usize,
    now_ms: u64,
) -> Verdict {
    if variant == control || variant >= window.variants() || control >= window.variants() {
        return Verdict::Hold;
    }
    let alpha = params.significance / BUCKETS as f64;
    let now = now_ms / window.bucket_ms;
    let (mut t, mut c) = (Counts::default(), Counts::default());
    let add = |t: &mut Counts, c: &mut Counts, s: &Slot| {
        if let (Some(st), Some(sc)) = (s.counts.get(variant), s.counts.get(control)) {
            t.add(st);
            c.add(sc);
        }
    };
    // The suffixes grow one bucket at a time, as `Window::suffix` counts them: buckets
    // stamped after `now` belong to all of them.
    for s in window.slots.iter().filter(|s| s.id > now) {
        add(&mut t, &mut c, s);
    }
    for age in 0..BUCKETS as u64 {
        let Some(id) = now.checked_sub(age) else {
            break;
        };
        if let Some(s) = window.slots.get((id % BUCKETS as u64) as usize) {
            if s.id == id {
                add(&mut t, &mut c, s);
            }
        }
        if let Some(trip) = test(params, alpha, &t, &c) {
            return Verdict::Trip(Trip {
                variant,
                at_ms: now_ms,
                ..trip
            });
        }
    }
    Verdict::Hold
}

/// The test on one pair of counts at level `alpha`; `variant` and `at_ms` left 0.
pub fn test(params: &Params, alpha: f64, t: &Counts, c: &Counts) -> Option<Trip> {
    let (n, k) = (t.requests, t.failed().min(t.requests));
    if n < params.min_requests || n == 0 {
        return None;
    }
    let ceiling = params
        .max_error_rate
        .max(params.max_ratio_to_control * c.rate())
        .min(1.0);
    if (k as f64) <= ceiling * n as f64 {
        return None;
    }
    let p_value = binomial::upper_tail(n, k, ceiling);
    if p_value > alpha {
        return None;
    }
    Some(Trip {
        variant: 0,
        reason: t.top_kind()?,
        at_ms: 0,
        treatment: *t,
        control: *c,
        ceiling,
        p_value,
    })
}

/// An experiment's process-wide breaker state, as kept in shared data.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub experiment: String,
    pub epoch: Epoch,
    pub window: Window,
    /// By variant index: its trip, if it tripped under this epoch.
    pub trips: Vec<Option<Trip>>,
}

impl State {
    /// A fresh state: nothing counted, nothing tripped.
    pub fn new(scope: &Scope<'_>) -> State {
        State {
            experiment: scope.experiment.to_string(),
            epoch: scope.epoch,
            window: Window::new(scope.params, scope.variants),
            trips: vec![None; scope.variants],
        }
    }

    /// The byte form kept in shared data.
    pub fn encode(&self) -> Vec<u8> {
        encode::encode(self)
    }

    /// Reads stored bytes; `None` if they are malformed or belong to another experiment,
    /// epoch, variant count or bucket width (the state of another configuration).
    pub fn decode(bytes: &[u8], scope: &Scope<'_>) -> Option<State> {
        let s = encode::decode(bytes)?;
        (s.experiment == scope.experiment
            && s.epoch == scope.epoch
            && s.window.variants == scope.variants
            && s.window.bucket_ms == scope.params.bucket_ms())
        .then_some(s)
    }

    /// Tripped flags by variant index.
    pub fn tripped(&self) -> Vec<bool> {
        self.trips.iter().map(Option::is_some).collect()
    }
}

/// What one experiment's breaker is evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub experiment: &'a str,
    pub epoch: Epoch,
    pub params: &'a Params,
    /// Number of variants.
    pub variants: usize,
    /// Index of the control variant (never tripped).
    pub control: usize,
}

/// The outcome of one [`tick`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// Bytes to store with the compare-and-swap token the stored bytes were read with;
    /// `None`: nothing to write (no counts to add, no new trip, or the stored state belongs to
    /// a newer push this worker has not taken yet). After a successful write the worker
    /// clears its window; after a CAS mismatch it reads again and retries.
    pub write: Option<Vec<u8>>,
    /// Trips this tick made: count and log them only once the write succeeded (exactly one
    /// worker's write carries each trip).
    pub new_trips: Vec<Trip>,
    /// Every tripped treatment by variant index, trips by other workers included.
    pub tripped: Vec<bool>,
}

/// One worker's periodic step for one experiment: adds `local` (its counts since its last
/// successful write) to the stored state (`None`: nothing stored yet), judges every
/// treatment not yet tripped, and says what to write back.
pub fn tick(stored: Option<&[u8]>, local: &Window, scope: &Scope<'_>, now_ms: u64) -> Tick {
    let newer = stored
        .and_then(encode::decode)
        .filter(|s| s.experiment == scope.experiment && scope.epoch.is_older_than(&s.epoch));
    if newer.is_some() {
        return Tick {
            write: None,
            new_trips: Vec::new(),
            tripped: vec![false; scope.variants],
        };
    }
    let (mut state, replaced) = match stored.and_then(|b| State::decode(b, scope)) {
        Some(s) => (s, false),
        None => (State::new(scope), stored.is_some()),
    };
    state.window.merge(local);
    let mut new_trips = Vec::new();
    for v in 0..scope.variants {
        if v == scope.control || state.trips.get(v).is_some_and(Option::is_some) {
            continue;
        }
        if let Verdict::Trip(t) = judge(scope.params, &state.window, v, scope.control, now_ms) {
            if let Some(slot) = state.trips.get_mut(v) {
                *slot = Some(t);
            }
            new_trips.push(t);
        }
    }
    let changed = !local.is_empty() || !new_trips.is_empty() || replaced || stored.is_none();
    Tick {
        write: changed.then(|| state.encode()),
        tripped: state.tripped(),
        new_trips,
    }
}

#[cfg(test)]
mod tests;
