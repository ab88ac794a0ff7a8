//! The data-plane breaker in the host: counting, sharing and acting on trips.
//!
//! Each worker counts, per experiment with a `breaker`, its finished requests and hard
//! failures per variant into a local [`rule::Window`] (no host call: a vector update). Every
//! [`PERIOD`] the root context's tick merges those counts into the process-wide state in
//! proxy-wasm shared data (one key per plugin and experiment) with compare-and-swap: read the
//! bytes and their CAS number, let [`rule::tick`] add the local counts and judge every
//! treatment, write back only if nobody wrote in between, else read again. A trip goes into
//! the same write, so exactly one worker's successful write carries it: that worker counts
//! it and logs it. Every worker's tick reads the stored state, even with nothing of its own to
//! add, and takes the trips made by the others; from then on its streams send the tripped
//! treatment's units to the control.
//!
//! Timing: the failure that trips is merged at its worker's next tick (≤ [`PERIOD`]), the
//! trip is made in that tick and holds on that worker at once; every other worker takes it at
//! its own next tick (≤ [`PERIOD`] later). Measured in `tests/tests/breaker.rs`.
//!
//! The stored state is tagged with the experiment and the configuration's
//! [`rule::Epoch`]: state of another epoch is replaced, so a new revision starts with no
//! counts and no trips (and a worker still on the old configuration leaves a newer state
//! alone).

use std::cell::{Cell, RefCell};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, Status};

use super::{log, now_millis, Active};
use crate::breaker as rule;
use crate::config::Plan;

/// How often each worker merges its counts and reads the others' trips.
pub const PERIOD: Duration = Duration::from_millis(100);
/// A tick's breaker work is skipped if the previous one was this recent: the shadow's faster
/// tick shares the root context's timer.
const MIN_GAP_MS: u64 = 90;
/// Compare-and-swap attempts per tick; after that the counts wait for the next tick.
const CAS_ATTEMPTS: usize = 16;

/// The breakers of one plan in one worker.
pub struct Breakers {
    /// Parallel to the plan's experiments.
    experiments: Vec<Option<Breaker>>,
    epoch: rule::Epoch,
    last_tick_ms: Cell<u64>,
    /// The configuration was replaced: its root context no longer touches shared state.
    retired: Cell<bool>,
}

struct Breaker {
    key: String,
    /// Counts not yet merged into the shared state.
    local: RefCell<rule::Window>,
    /// Variants held out of traffic, as this worker last read them (a bit per variant).
    tripped: Cell<u32>,
}

impl Breakers {
    pub fn new(plan: &Plan, plugin: &str) -> Breakers {
        let experiments = plan
            .experiments
            .iter()
            .map(|e| {
                let params = e.breaker.as_ref()?;
                Some(Breaker {
                    key: format!("sluice.breaker/{plugin}/{}", e.name),
                    local: RefCell::new(rule::Window::new(params, e.variants.len())),
                    tripped: Cell::new(0),
                })
            })
            .collect();
        Breakers {
            experiments,
            epoch: plan.breaker_epoch(),
            last_tick_ms: Cell::new(0),
            retired: Cell::new(false),
        }
    }

    /// Whether any experiment has a breaker (and so the tick must run).
    pub fn any(&self) -> bool {
        self.experiments.iter().any(Option::is_some)
    }

    /// Whether experiment `i` has a breaker.
    pub fn counts(&self, i: usize) -> bool {
        matches!(self.experiments.get(i), Some(Some(_)))
    }

    /// Whether the breaker holds `variant` of experiment `i` out of traffic.
    pub fn tripped(&self, i: usize, variant: usize) -> bool {
        match self.experiments.get(i) {
            Some(Some(b)) => b.tripped.get() & bit(variant) != 0,
            _ => false,
        }
    }

    /// Counts one finished request of experiment `i` served by `variant`.
    pub fn record(
        &self,
        i: usize,
        variant: usize,
        now_ms: u64,
        failure: Option<rule::FailureKind>,
    ) {
        if let Some(Some(b)) = self.experiments.get(i) {
            if let Ok(mut w) = b.local.try_borrow_mut() {
                w.record(now_ms, variant, failure);
            }
        }
    }

    /// The configuration was replaced: stop sharing.
    pub fn retire(&self) {
        self.retired.set(true);
    }
}

fn bit(variant: usize) -> u32 {
    u32::try_from(variant)
        .ok()
        .and_then(|v| 1u32.checked_shl(v))
        .unwrap_or(0)
}

/// The tick period the root context needs when the shadow does not run it faster.
pub fn idle_period(active: &Active) -> Duration {
    if active.breakers.any() && !active.breakers.retired.get() {
        PERIOD
    } else {
        Duration::ZERO
    }
}

/// After configuration: the gauges of this plan's treatments start at 0 (a new epoch clears
/// every trip; a trip still held under this epoch is set again at the first tick) and the
/// tick starts.
pub fn start(active: &Active) -> Result<(), String> {
    if !active.breakers.any() {
        return Ok(());
    }
    for em in &active.catalog.experiments {
        for vm in &em.variants {
            if let Some(b) = &vm.breaker {
                active.record(b.tripped, 0);
            }
        }
    }
    hostcalls::set_tick_period(PERIOD).map_err(|s| format!("starting the breaker's timer: {s:?}"))
}

/// Root tick: merges this worker's counts, judges, records and takes trips.
pub fn tick(active: &Active) {
    let breakers = &active.breakers;
    if !breakers.any() || breakers.retired.get() {
        return;
    }
    let Some(now) = now_millis() else {
        return;
    };
    if now.saturating_sub(breakers.last_tick_ms.get()) < MIN_GAP_MS {
        return;
    }
    breakers.last_tick_ms.set(now);
    for (i, b) in breakers.experiments.iter().enumerate() {
        if let Some(b) = b {
            one(active, i, b, now);
        }
    }
}

/// One experiment's tick.
fn one(active: &Active, i: usize, b: &Breaker, now: u64) {
    let Some(exp) = active.plan.experiments.get(i) else {
        return;
    };
    let Some(params) = &exp.breaker else {
        return;
    };
    let scope = rule::Scope {
        experiment: &exp.name,
        epoch: active.breakers.epoch,
        params,
        variants: exp.variants.len(),
        control: exp.control,
    };
    let Ok(mut local) = b.local.try_borrow_mut() else {
        return;
    };
    let mut outcome = None;
    for _ in 0..CAS_ATTEMPTS {
        let (stored, cas) = match hostcalls::get_shared_data(&b.key) {
            Ok(r) => r,
            Err(s) => {
                log(
                    LogLevel::Warn,
                    &format!("breaker: cannot read shared data: {s:?}"),
                );
                return;
            }
        };
        let step = rule::tick(stored.as_deref(), &local, &scope, now);
        let Some(bytes) = &step.write else {
            outcome = Some(step);
            break;
        };
        // A key never written has no CAS number; two workers creating it at once can lose
        // one tick's counts of one of them, once per key.
        match hostcalls::set_shared_data(&b.key, Some(bytes), cas) {
            Ok(()) => {
                local.clear();
                outcome = Some(step);
                break;
            }
            Err(Status::CasMismatch) => continue,
            Err(s) => {
                log(
                    LogLevel::Warn,
                    &format!("breaker: cannot write shared data: {s:?}"),
                );
                return;
            }
        }
    }
    // Without an outcome every attempt lost the race: the counts stay for the next tick.
    let Some(step) = outcome else {
        return;
    };
    for t in &step.new_trips {
        announce(active, i, t);
    }
    let mut mask = 0;
    for (v, &tripped) in step.tripped.iter().enumerate() {
        if tripped && v != exp.control {
            mask |= bit(v);
        }
    }
    let before = b.tripped.replace(mask);
    if before != mask {
        // Set by every worker that sees the change: the one stat Envoy keeps per name takes
        // the same value from each.
        if let Some(em) = active.catalog.experiments.get(i) {
            for (v, vm) in em.variants.iter().enumerate() {
                if let Some(m) = &vm.breaker {
                    if (before ^ mask) & bit(v) != 0 {
                        active.record(m.tripped, u64::from(mask & bit(v) != 0));
                    }
                }
            }
        }
    }
}

/// Counts and logs a trip this worker made.
fn announce(active: &Active, i: usize, t: &rule::Trip) {
    let Some(exp) = active.plan.experiments.get(i) else {
        return;
    };
    let vm = active
        .catalog
        .experiments
        .get(i)
        .and_then(|em| em.variants.get(t.variant))
        .and_then(|vm| vm.breaker.as_ref());
    if let Some(&pos) = vm.and_then(|m| m.trips.get(t.reason.index())) {
        active.increment(pos);
    }
    let name = |v: usize| exp.variants.get(v).map_or("?", String::as_str);
    log(
        LogLevel::Warn,
        &format!(
            "breaker tripped: experiment {} variant {} ({}): treatment {}/{} failed ({:.2} %), \
             control {} {}/{} failed ({:.2} %), ceiling {:.2} %, p-value {:.3e}; its units go to \
             the control until a new revision (revision {})",
            exp.name,
            name(t.variant),
            t.reason.label(),
            t.treatment.failed(),
            t.treatment.requests,
            100.0 * t.treatment.rate(),
            name(exp.control),
            t.control.failed(),
            t.control.requests,
            100.0 * t.control.rate(),
            100.0 * t.ceiling,
            t.p_value,
            active.plan.revision.as_deref().unwrap_or("none"),
        ),
    );
}
