//! The clean step: consecutive snapshots become evidence. Counts between snapshots come from
//! [`crate::snapshot::interval`]; a stage starts when the weights change (or a snapshot says
//! when it started); intervals inside a stage's warm-up, or straddling a stage change or the
//! end of a warm-up, are dropped. Snapshots whose source was unhealthy are skipped: the next
//! healthy one spans them.

use std::collections::BTreeMap;

use crate::snapshot::{self, Counters, Health, ResetPolicy, Snapshot};

/// Summed counts of the intervals that count as evidence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    pub variants: BTreeMap<String, Counters>,
    pub intervals: u64,
    /// Seconds covered.
    pub seconds: f64,
}

impl Evidence {
    fn add(&mut self, iv: &snapshot::Interval) {
        for (name, c) in &iv.variants {
            self.variants.entry(name.clone()).or_default().add(c);
        }
        self.intervals += 1;
        self.seconds += iv.to - iv.from;
    }

    /// Counts of one variant (empty if it never appeared).
    pub fn of(&self, variant: &str) -> Counters {
        self.variants.get(variant).cloned().unwrap_or_default()
    }
}

/// What folding in one snapshot did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The first healthy snapshot: a baseline, nothing to count yet.
    Baseline,
    /// A new stage started at this snapshot.
    StageStarted,
    /// The interval fell in the warm-up (or straddled its end) and was dropped.
    WarmingUp { until: f64 },
    /// The interval was added to the evidence; `resets` lists variants whose counters went
    /// down.
    Counted { resets: Vec<String> },
    /// The snapshot was not trusted and skipped.
    Unhealthy { reason: String },
    /// The snapshot is not newer than the previous one.
    OutOfOrder,
}

/// Evidence so far: the whole rollout's (every stage's post-warm-up intervals) and the
/// current stage's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    last: Option<Snapshot>,
    pub weights: BTreeMap<String, f64>,
    pub stage_started_at: f64,
    pub rollout: Evidence,
    pub stage: Evidence,
    pub resets: u64,
}

fn same_weights(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    let keys = a.keys().chain(b.keys());
    keys.into_iter()
        .all(|k| (a.get(k).copied().unwrap_or(0.0) - b.get(k).copied().unwrap_or(0.0)).abs() < 1e-9)
}

impl Ledger {
    /// Folds in one snapshot.
    pub fn add(&mut self, snap: &Snapshot, warmup: f64, policy: ResetPolicy) -> Step {
        match &snap.health {
            Health::Ok => {}
            Health::Stale { reason } => {
                return Step::Unhealthy {
                    reason: format!("stale data: {reason}"),
                }
            }
            Health::Error { reason } => {
                return Step::Unhealthy {
                    reason: format!("source error: {reason}"),
                }
            }
        }
        let Some(last) = &self.last else {
            self.weights = snap.weights.clone();
            self.stage_started_at = snap.stage_started_at.unwrap_or(snap.at);
            self.last = Some(snap.clone());
            return Step::Baseline;
        };
        if snap.at <= last.at {
            return Step::OutOfOrder;
        }
        let iv = snapshot::interval(last, snap, policy);
        if !iv.unknown.is_empty() {
            // Missing or zeroed counters are unknown, not reset: the next complete snapshot
            // spans this one, for every variant alike.
            return Step::Unhealthy {
                reason: format!(
                    "incomplete snapshot: counters missing or zero for {}",
                    iv.unknown.join(", ")
                ),
            };
        }
        let explicit = snap
            .stage_started_at
            .filter(|&s| s > self.stage_started_at + 1e-9);
        let step = if !same_weights(&self.weights, &snap.weights) || explicit.is_some() {
            // The change happened somewhere inside this interval: it belongs to neither stage.
            self.weights = snap.weights.clone();
            self.stage_started_at = explicit.unwrap_or(snap.at);
            self.stage = Evidence::default();
            Step::StageStarted
        } else if iv.from < self.stage_started_at + warmup {
            Step::WarmingUp {
                until: self.stage_started_at + warmup,
            }
        } else {
            self.resets += iv.resets.len() as u64;
            // The rollout's evidence compares concurrent traffic only: without control traffic
            // (the treatment at 100 %) the canary's new data would be compared with a control
            // observed earlier, under other conditions. Such a stage keeps its own evidence for
            // the gates, which judge the canary alone.
            let control_idle = !self.weights.is_empty()
                && self.weights.get(&snap.control).copied().unwrap_or(0.0) <= 0.0;
            if !control_idle {
                self.rollout.add(&iv);
            }
            self.stage.add(&iv);
            Step::Counted { resets: iv.resets }
        };
        self.last = Some(snap.clone());
        step
    }
}

/// The pure form of the clean step: the ledger after folding in every snapshot.
pub fn clean(snapshots: &[Snapshot], warmup: f64, policy: ResetPolicy) -> Ledger {
    let mut ledger = Ledger::default();
    for s in snapshots {
        ledger.add(s, warmup, policy);
    }
    ledger
}
