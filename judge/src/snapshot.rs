//! Counter snapshots: what the judge reads, one per scrape.
//!
//! A [`Snapshot`] holds the cumulative counters of every variant of one experiment at one
//! time, the weights in force, and whether the source trusted its data. One snapshot per line,
//! as JSON, is the format `sluice judge` replays (field reference: `docs/statistics.md`).
//! The controller builds one from a source's reading (its `snapshot::from_reading`); this
//! crate knows no source.
//!
//! [`interval`] turns two consecutive snapshots into the counts of the time between them; it
//! survives counter resets (see [`ResetPolicy`]) and never yields negative traffic. A variant,
//! or a counter of one, missing from a snapshot or reading zero there is unknown, not reset:
//! the interval is incomplete ([`Interval::unknown`]), and the judge's ledger skips that
//! snapshot, so the next complete one spans both intervals for every variant alike. A reset is
//! a counter that went down to a value other than zero; in a snapshot with a reset, a variant
//! reading zero was reset too (a restarted proxy counts every variant from zero).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of one experiment at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// When the counters were read, in Unix seconds (fractions allowed).
    pub at: f64,
    pub experiment: String,
    /// The variant the others are compared with.
    pub control: String,
    /// The variant being judged; default: the only other variant in `variants`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Weights in force (variant → percent of users).
    pub weights: BTreeMap<String, f64>,
    /// Cumulative counters per variant.
    pub variants: BTreeMap<String, Counters>,
    #[serde(default)]
    pub health: Health,
    /// When the current stage started (Unix seconds), when known better than "the snapshot
    /// where the weights changed".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_started_at: Option<f64>,
}

/// Whether the source trusted what it read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Health {
    #[default]
    Ok,
    /// The newest data is older than the source allows.
    Stale { reason: String },
    /// The source could not read (part of) the data.
    Error { reason: String },
}

/// Cumulative counters of one variant. Every field defaults to zero or empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Counters {
    /// `sluice_requests_total`.
    pub requests: u64,
    /// `sluice_responses_total` by `class` (`1xx` … `5xx`).
    pub responses: BTreeMap<String, u64>,
    /// `sluice_local_replies_total` (also counted in `responses`).
    pub local_replies: u64,
    /// `sluice_upstream_resets_total` (also counted in `responses`, as Envoy's 5xx reply).
    pub upstream_resets: u64,
    /// `sluice_missing_key_total`.
    pub missing_key: u64,
    /// `sluice_latency_ms`.
    pub latency: Histogram,
    /// `sluice_outcomes_total` by `outcome`.
    pub outcomes: BTreeMap<String, u64>,
    /// Exposures, when the source counts them (denominator of per-exposure business metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposures: Option<u64>,
    /// `sluice_prediction` (value × scale).
    pub prediction: Histogram,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowCounters>,
    /// `sluice_replicate_requests_total` by `replicate` (index = label): the keyed requests of
    /// this variant split by an independent slice of the user-key hash, so each entry counts
    /// the requests of a disjoint random group of users (the sample-ratio test estimates the
    /// spread that per-user assignment gives from them). Empty when the filter does not
    /// export them (experiments not assigned per user).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicates: Vec<u64>,
    /// `sluice_breaker_trips_total` by `reason`: trips of this variant by the filter's breaker.
    /// The judge does not read them; the controller's daemon acts on a trip before asking it
    /// (its `daemon::breaker`). Kept so a replay shows when the data plane took the variant out.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub breaker_trips: BTreeMap<String, u64>,
}

/// A cumulative histogram as Prometheus exports it. The `+Inf` bucket is `count`; `buckets`
/// holds the finite bounds in increasing order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Histogram {
    pub buckets: Vec<Bucket>,
    pub sum: f64,
    pub count: u64,
}

/// Observations at most `le`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub le: f64,
    pub count: u64,
}

/// Shadow comparison counters of one variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowCounters {
    pub requests: u64,
    pub compared: u64,
    /// By `field` (`status`, `body`, or a configured field).
    pub agree: BTreeMap<String, u64>,
    pub disagree: BTreeMap<String, u64>,
    pub errors: u64,
    pub timeouts: u64,
    pub latency: Histogram,
    /// `sluice_shadow_delta` by `field`.
    pub deltas: BTreeMap<String, Histogram>,
}

/// A snapshot line that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("line {line}: {source}")]
    Invalid {
        line: usize,
        #[source]
        source: InvalidSnapshot,
    },
    #[error("no snapshots: the file is empty")]
    Empty,
}

/// Why a snapshot is refused: structural problems the judge cannot work around, each naming
/// the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidSnapshot {
    #[error("`at` must be a finite number of Unix seconds")]
    At,
    #[error("control {0:?} is not among the variants")]
    UnknownControl(String),
    #[error("`canary` is required when there are several treatments")]
    CanaryRequired,
    #[error("canary {0:?} is not among the variants")]
    UnknownCanary(String),
    #[error("weights.{variant}: {weight} is not a percentage")]
    NotAPercentage { variant: String, weight: f64 },
    #[error("weights add up to {0}, not 100")]
    WeightsTotal(f64),
    #[error("variants.{0}.replicates: at most {MAX_REPLICATES} replicate groups")]
    TooManyReplicates(String),
    #[error("variants.{variant}.{field}: more than {MAX_COUNT}, beyond any real counter")]
    CountTooLarge { variant: String, field: String },
    #[error("variants.{variant}.{histogram}: {source}")]
    Histogram {
        variant: String,
        /// `latency` or `prediction`.
        histogram: &'static str,
        #[source]
        source: InvalidHistogram,
    },
}

/// Why a histogram is refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InvalidHistogram {
    #[error("bucket bounds must increase ({le} after {previous})")]
    BoundsNotIncreasing { previous: f64, le: f64 },
    #[error("bucket counts must be cumulative (le {le})")]
    NotCumulative { le: f64 },
    #[error("bucket bounds must be finite (the +Inf bucket is `count`)")]
    InfiniteBound,
    #[error("a bucket holds more than `count`")]
    OverCount,
}

/// The largest count a snapshot may hold: 2^53, the largest integer a float holds exactly (the
/// judge computes in floats). No real counter gets near it; a larger one is corrupt data, and
/// sums are clamped to it so that counter arithmetic can never overflow.
pub const MAX_COUNT: u64 = 1 << 53;

/// `a + b`, clamped to [`MAX_COUNT`].
fn add_count(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(MAX_COUNT)
}

impl Snapshot {
    /// The judged variant: `canary`, or else the only variant besides the control.
    pub fn canary_name(&self) -> Option<&str> {
        if let Some(c) = &self.canary {
            return Some(c);
        }
        let mut others = self
            .variants
            .keys()
            .chain(self.weights.keys())
            .filter(|v| **v != self.control);
        let first = others.next()?;
        others.all(|v| v == first).then_some(first.as_str())
    }

    /// Structural problems the judge cannot work around.
    pub fn check(&self) -> Result<(), InvalidSnapshot> {
        if !self.at.is_finite() {
            return Err(InvalidSnapshot::At);
        }
        if !self.variants.contains_key(&self.control) && !self.weights.contains_key(&self.control) {
            return Err(InvalidSnapshot::UnknownControl(self.control.clone()));
        }
        if self.canary_name().is_none() {
            return Err(InvalidSnapshot::CanaryRequired);
        }
        // A misspelt canary would otherwise be judged on no data forever.
        if let Some(c) = &self.canary {
            if !self.variants.contains_key(c) && !self.weights.contains_key(c) {
                return Err(InvalidSnapshot::UnknownCanary(c.clone()));
            }
        }
        for (v, w) in &self.weights {
            if !(w.is_finite() && (0.0..=100.0).contains(w)) {
                return Err(InvalidSnapshot::NotAPercentage {
                    variant: v.clone(),
                    weight: *w,
                });
            }
        }
        let total: f64 = self.weights.values().sum();
        if !self.weights.is_empty() && (total - 100.0).abs() > 0.005 {
            return Err(InvalidSnapshot::WeightsTotal(total));
        }
        for (v, c) in &self.variants {
            if c.replicates.len() > MAX_REPLICATES {
                return Err(InvalidSnapshot::TooManyReplicates(v.clone()));
            }
            if let Some(field) = c.count_over(MAX_COUNT) {
                return Err(InvalidSnapshot::CountTooLarge {
                    variant: v.clone(),
                    field,
                });
            }
            for (histogram, h) in [("latency", &c.latency), ("prediction", &c.prediction)] {
                h.check().map_err(|source| InvalidSnapshot::Histogram {
                    variant: v.clone(),
                    histogram,
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// Most replicate groups a snapshot may carry (the filter exports 32).
pub const MAX_REPLICATES: usize = 256;

impl Histogram {
    /// Bounds increasing, counts cumulative and at most `count`.
    pub fn check(&self) -> Result<(), InvalidHistogram> {
        for w in self.buckets.windows(2) {
            if w[1].le <= w[0].le {
                return Err(InvalidHistogram::BoundsNotIncreasing {
                    previous: w[0].le,
                    le: w[1].le,
                });
            }
            if w[1].count < w[0].count {
                return Err(InvalidHistogram::NotCumulative { le: w[1].le });
            }
        }
        if self.buckets.iter().any(|b| !b.le.is_finite()) {
            return Err(InvalidHistogram::InfiniteBound);
        }
        if self.buckets.last().is_some_and(|b| b.count > self.count) {
            return Err(InvalidHistogram::OverCount);
        }
        Ok(())
    }

    /// Counts per bucket (not cumulative), the last entry being the `+Inf` bucket.
    pub fn per_bucket(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.buckets.len() + 1);
        let mut below = 0;
        for b in &self.buckets {
            out.push(b.count.saturating_sub(below));
            below = b.count.max(below);
        }
        out.push(self.count.saturating_sub(below));
        out
    }

    fn same_layout(&self, other: &Histogram) -> bool {
        self.buckets.len() == other.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| a.le == b.le)
    }

    /// `self - earlier`, or `None` if anything went down or the bounds changed.
    fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        if earlier.buckets.is_empty() && earlier.count == 0 {
            return Some(self.clone());
        }
        if !self.same_layout(earlier) || self.count < earlier.count || self.sum < earlier.sum {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (a, b) in self.buckets.iter().zip(&earlier.buckets) {
            buckets.push(Bucket {
                le: a.le,
                count: a.count.checked_sub(b.count)?,
            });
        }
        Some(Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        })
    }

    /// Adds counts; a histogram with other bounds replaces an empty one and is otherwise
    /// ignored (its bounds were reconfigured; mixing layouts would corrupt both).
    pub fn add(&mut self, other: &Histogram) {
        if other.count == 0 && other.buckets.iter().all(|b| b.count == 0) {
            return;
        }
        if self.count == 0 && self.buckets.iter().all(|b| b.count == 0) {
            *self = other.clone();
            return;
        }
        if !self.same_layout(other) {
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a.count = add_count(a.count, b.count);
        }
        self.sum += other.sum;
        self.count = add_count(self.count, other.count);
    }
}

fn map_since(
    now: &BTreeMap<String, u64>,
    earlier: &BTreeMap<String, u64>,
) -> Option<BTreeMap<String, u64>> {
    if earlier
        .iter()
        .any(|(k, v)| now.get(k).copied().unwrap_or(0) < *v)
    {
        return None;
    }
    Some(
        now.iter()
            .map(|(k, v)| (k.clone(), v - earlier.get(k).copied().unwrap_or(0)))
            .collect(),
    )
}

fn map_add(into: &mut BTreeMap<String, u64>, other: &BTreeMap<String, u64>) {
    for (k, v) in other {
        let c = into.entry(k.clone()).or_default();
        *c = add_count(*c, *v);
    }
}

impl ShadowCounters {
    fn since(&self, earlier: &ShadowCounters) -> Option<ShadowCounters> {
        let mut deltas = BTreeMap::new();
        for (k, h) in &self.deltas {
            let d = match earlier.deltas.get(k) {
                Some(e) => h.since(e)?,
                None => h.clone(),
            };
            deltas.insert(k.clone(), d);
        }
        if earlier.deltas.keys().any(|k| !self.deltas.contains_key(k)) {
            return None;
        }
        Some(ShadowCounters {
            requests: self.requests.checked_sub(earlier.requests)?,
            compared: self.compared.checked_sub(earlier.compared)?,
            agree: map_since(&self.agree, &earlier.agree)?,
            disagree: map_since(&self.disagree, &earlier.disagree)?,
            errors: self.errors.checked_sub(earlier.errors)?,
            timeouts: self.timeouts.checked_sub(earlier.timeouts)?,
            latency: self.latency.since(&earlier.latency)?,
            deltas,
        })
    }

    fn add(&mut self, other: &ShadowCounters) {
        self.requests = add_count(self.requests, other.requests);
        self.compared = add_count(self.compared, other.compared);
        map_add(&mut self.agree, &other.agree);
        map_add(&mut self.disagree, &other.disagree);
        self.errors = add_count(self.errors, other.errors);
        self.timeouts = add_count(self.timeouts, other.timeouts);
        self.latency.add(&other.latency);
        for (k, h) in &other.deltas {
            self.deltas.entry(k.clone()).or_default().add(h);
        }
    }
}

impl Counters {
    /// Responses of every class.
    pub fn responses_total(&self) -> u64 {
        self.responses.values().fold(0, |a, b| add_count(a, *b))
    }

    /// The path of the first counter above `limit`, if any.
    fn count_over(&self, limit: u64) -> Option<String> {
        let over = |n: u64| n > limit;
        let map = |name: &str, m: &BTreeMap<String, u64>| {
            m.iter()
                .find(|(_, n)| over(**n))
                .map(|(k, _)| format!("{name}.{k}"))
        };
        let hist = |name: &str, h: &Histogram| {
            (over(h.count) || h.buckets.iter().any(|b| over(b.count))).then(|| name.to_string())
        };
        let plain = [
            ("requests", self.requests),
            ("local_replies", self.local_replies),
            ("upstream_resets", self.upstream_resets),
            ("missing_key", self.missing_key),
            ("exposures", self.exposures.unwrap_or(0)),
        ];
        if let Some((name, _)) = plain.iter().find(|(_, n)| over(*n)) {
            return Some(name.to_string());
        }
        if let Some(g) = self.replicates.iter().position(|&n| over(n)) {
            return Some(format!("replicates[{g}]"));
        }
        let shadow = self.shadow.as_ref().and_then(|s| {
            [
                ("requests", s.requests),
                ("compared", s.compared),
                ("errors", s.errors),
                ("timeouts", s.timeouts),
            ]
            .iter()
            .find(|(_, n)| over(*n))
            .map(|(name, _)| name.to_string())
            .or_else(|| map("agree", &s.agree))
            .or_else(|| map("disagree", &s.disagree))
            .or_else(|| hist("latency", &s.latency))
            .or_else(|| {
                s.deltas
                    .iter()
                    .find_map(|(k, h)| hist(&format!("deltas.{k}"), h))
            })
            .map(|f| format!("shadow.{f}"))
        });
        map("responses", &self.responses)
            .or_else(|| map("outcomes", &self.outcomes))
            .or_else(|| hist("latency", &self.latency))
            .or_else(|| hist("prediction", &self.prediction))
            .or(shadow)
    }

    /// Responses of class `5xx`.
    pub fn errors(&self) -> u64 {
        self.responses.get("5xx").copied().unwrap_or(0)
    }

    /// `self - earlier`, or `None` if any counter went down (a restart).
    pub fn since(&self, earlier: &Counters) -> Option<Counters> {
        let shadow = match (&self.shadow, &earlier.shadow) {
            (Some(a), Some(b)) => Some(a.since(b)?),
            (Some(a), None) => Some(a.clone()),
            (None, Some(_)) => return None,
            (None, None) => None,
        };
        let exposures = match (self.exposures, earlier.exposures) {
            (Some(a), Some(b)) => Some(a.checked_sub(b)?),
            (a, None) => a,
            (None, Some(_)) => return None,
        };
        let replicates = if earlier.replicates.is_empty() {
            self.replicates.clone()
        } else if self.replicates.len() < earlier.replicates.len() {
            return None;
        } else {
            let mut out = self.replicates.clone();
            for (a, b) in out.iter_mut().zip(&earlier.replicates) {
                *a = a.checked_sub(*b)?;
            }
            out
        };
        Some(Counters {
            replicates,
            requests: self.requests.checked_sub(earlier.requests)?,
            responses: map_since(&self.responses, &earlier.responses)?,
            local_replies: self.local_replies.checked_sub(earlier.local_replies)?,
            upstream_resets: self.upstream_resets.checked_sub(earlier.upstream_resets)?,
            missing_key: self.missing_key.checked_sub(earlier.missing_key)?,
            latency: self.latency.since(&earlier.latency)?,
            outcomes: map_since(&self.outcomes, &earlier.outcomes)?,
            breaker_trips: map_since(&self.breaker_trips, &earlier.breaker_trips)?,
            exposures,
            prediction: self.prediction.since(&earlier.prediction)?,
            shadow,
        })
    }

    /// Adds another interval's counts (each sum clamped to [`MAX_COUNT`]).
    pub fn add(&mut self, other: &Counters) {
        if self.replicates.len() < other.replicates.len() {
            self.replicates.resize(other.replicates.len(), 0);
        }
        for (a, b) in self.replicates.iter_mut().zip(&other.replicates) {
            *a = add_count(*a, *b);
        }
        self.requests = add_count(self.requests, other.requests);
        map_add(&mut self.responses, &other.responses);
        self.local_replies = add_count(self.local_replies, other.local_replies);
        self.upstream_resets = add_count(self.upstream_resets, other.upstream_resets);
        self.missing_key = add_count(self.missing_key, other.missing_key);
        self.latency.add(&other.latency);
        map_add(&mut self.outcomes, &other.outcomes);
        map_add(&mut self.breaker_trips, &other.breaker_trips);
        if let Some(e) = other.exposures {
            let x = self.exposures.get_or_insert(0);
            *x = add_count(*x, e);
        }
        self.prediction.add(&other.prediction);
        if let Some(s) = &other.shadow {
            self.shadow.get_or_insert_with(Default::default).add(s);
        }
    }
}

/// What to do when a variant's counters go down between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResetPolicy {
    /// The later values are the counts since the restart: that variant's interval counts are
    /// its later values. Right for one Envoy; with summed Envoys it over-counts the ones that
    /// did not restart (prefer restart-proof sources, which never go down).
    #[default]
    SinceRestart,
    /// The interval is dropped for every variant and the later values become the baseline:
    /// loses one interval, never over-counts, and never skews the split between variants.
    Discard,
}

/// Counts between two consecutive snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    pub from: f64,
    pub to: f64,
    pub variants: BTreeMap<String, Counters>,
    /// Variants whose counters went down in this interval.
    pub resets: Vec<String>,
    /// Variants missing from the later snapshot, reading zero there, or with a counter
    /// missing or zero: this interval's counts are unknown (the snapshot is incomplete).
    pub unknown: Vec<String>,
}

impl Counters {
    /// `self` with every counter that is missing or zero taken from `earlier` (unknown this
    /// time, not reset), and whether any was.
    fn filled_from(&self, earlier: &Counters) -> (Counters, bool) {
        let mut c = self.clone();
        let mut f = false;
        fill(&mut c.requests, earlier.requests, &mut f);
        fill_map(&mut c.responses, &earlier.responses, &mut f);
        fill(&mut c.local_replies, earlier.local_replies, &mut f);
        fill(&mut c.upstream_resets, earlier.upstream_resets, &mut f);
        fill(&mut c.missing_key, earlier.missing_key, &mut f);
        c.latency.fill(&earlier.latency, &mut f);
        fill_map(&mut c.outcomes, &earlier.outcomes, &mut f);
        fill_map(&mut c.breaker_trips, &earlier.breaker_trips, &mut f);
        if let Some(e) = earlier.exposures.filter(|&e| e > 0) {
            fill(c.exposures.get_or_insert(0), e, &mut f);
        }
        c.prediction.fill(&earlier.prediction, &mut f);
        match (&mut c.shadow, &earlier.shadow) {
            (Some(s), Some(e)) => s.fill(e, &mut f),
            (None, Some(e)) if !e.is_zero() => {
                c.shadow = Some(e.clone());
                f = true;
            }
            _ => {}
        }
        (c, f)
    }
}

fn fill(v: &mut u64, earlier: u64, filled: &mut bool) {
    if *v == 0 && earlier > 0 {
        *v = earlier;
        *filled = true;
    }
}

fn fill_map(m: &mut BTreeMap<String, u64>, earlier: &BTreeMap<String, u64>, filled: &mut bool) {
    for (k, &e) in earlier.iter().filter(|(_, &e)| e > 0) {
        fill(m.entry(k.clone()).or_default(), e, filled);
    }
}

impl Histogram {
    fn is_zero(&self) -> bool {
        self.count == 0 && self.buckets.iter().all(|b| b.count == 0)
    }

    /// An empty histogram takes `earlier`'s place: its counts if it had any (unknown this
    /// time), its bounds otherwise (nothing observed yet is no change of layout).
    fn fill(&mut self, earlier: &Histogram, filled: &mut bool) {
        if self.is_zero() && (!earlier.is_zero() || self.buckets.is_empty()) {
            *filled |= !earlier.is_zero();
            *self = earlier.clone();
        }
    }
}

impl ShadowCounters {
    fn is_zero(&self) -> bool {
        self.requests == 0
            && self.compared == 0
            && self.agree.values().all(|&v| v == 0)
            && self.disagree.values().all(|&v| v == 0)
            && self.errors == 0
            && self.timeouts == 0
            && self.latency.is_zero()
            && self.deltas.values().all(Histogram::is_zero)
    }

    fn fill(&mut self, earlier: &ShadowCounters, f: &mut bool) {
        fill(&mut self.requests, earlier.requests, f);
        fill(&mut self.compared, earlier.compared, f);
        fill_map(&mut self.agree, &earlier.agree, f);
        fill_map(&mut self.disagree, &earlier.disagree, f);
        fill(&mut self.errors, earlier.errors, f);
        fill(&mut self.timeouts, earlier.timeouts, f);
        self.latency.fill(&earlier.latency, f);
        for (k, h) in earlier.deltas.iter().filter(|(_, h)| !h.is_zero()) {
            self.deltas.entry(k.clone()).or_default().fill(h, f);
        }
    }
}

/// How one variant's counters moved between two snapshots.
enum Move {
    Counted(Box<Counters>),
    /// Missing, zero, or with a counter missing or zero, in the later snapshot.
    Unknown,
    /// A counter went down to a value other than zero: the process counting restarted.
    Reset,
}

fn movement(before: Option<&Counters>, now: Option<&Counters>) -> Move {
    let empty = Counters::default();
    let before = before.unwrap_or(&empty);
    let now = now.unwrap_or(&empty);
    let (filled, unknown) = now.filled_from(before);
    match filled.since(before) {
        None => Move::Reset,
        Some(_) if unknown => Move::Unknown,
        Some(d) => Move::Counted(Box::new(d)),
    }
}

/// The counts between `earlier` and `later`, surviving counter resets per `policy`. When
/// [`Interval::unknown`] is not empty the counts are incomplete and should not be used:
/// the next snapshot is to be compared with `earlier` instead.
pub fn interval(earlier: &Snapshot, later: &Snapshot, policy: ResetPolicy) -> Interval {
    let mut variants = BTreeMap::new();
    let mut resets = Vec::new();
    let mut unknown = Vec::new();
    let names: std::collections::BTreeSet<&String> = earlier
        .variants
        .keys()
        .chain(later.variants.keys())
        .collect();
    for name in names {
        match movement(earlier.variants.get(name), later.variants.get(name)) {
            Move::Counted(d) => {
                if later.variants.contains_key(name) {
                    variants.insert(name.clone(), *d);
                }
            }
            Move::Unknown => unknown.push(name.clone()),
            Move::Reset => resets.push(name.clone()),
        }
    }
    if !resets.is_empty() {
        // The proxy restarted: a variant reading zero, or missing a counter, was reset with
        // the rest; only one missing altogether stays unknown.
        let (absent, zeroed): (Vec<String>, Vec<String>) = unknown
            .into_iter()
            .partition(|name| !later.variants.contains_key(name));
        unknown = absent;
        resets.extend(zeroed);
        resets.sort();
        for name in &resets {
            variants.insert(
                name.clone(),
                later.variants.get(name).cloned().unwrap_or_default(),
            );
        }
        if policy == ResetPolicy::Discard {
            for c in variants.values_mut() {
                *c = Counters::default();
            }
        }
    }
    Interval {
        from: earlier.at,
        to: later.at,
        variants,
        resets,
        unknown,
    }
}

/// Reads the JSON-lines format: one [`Snapshot`] per non-blank line (lines starting with `#`
/// are comments).
pub fn read_lines(text: &str) -> Result<Vec<Snapshot>, SnapshotError> {
    let mut out = Vec::new();
    // Some editors start a file with a byte-order mark.
    let text = crate::yaml::strip_bom(text);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(line);
        let snap: Snapshot =
            serde_path_to_error::deserialize(&mut de).map_err(|e| SnapshotError::Line {
                line: i + 1,
                reason: line_error(&e),
            })?;
        snap.check().map_err(|source| SnapshotError::Invalid {
            line: i + 1,
            source,
        })?;
        out.push(snap);
    }
    if out.is_empty() {
        return Err(SnapshotError::Empty);
    }
    Ok(out)
}

/// A line's error by field path (`variants.canary.requests: invalid type ...`); the column
/// only for syntax errors, where there is no path (the line is already named).
fn line_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = e.inner();
    let message = inner.to_string();
    let position = format!(" at line {} column {}", inner.line(), inner.column());
    let message = message.strip_suffix(&position).unwrap_or(&message);
    let message = sluice_filter::config::plain_type_error(message);
    match e.path().to_string().as_str() {
        path if inner.is_data() && path != "." => format!("{path}: {message}"),
        // Not JSON at all: there is no field to name, the column is what helps.
        _ => format!("column {}: {message}", inner.column()),
    }
}

#[cfg(test)]
mod tests;
