//! The rollout state machine, pure: given the persisted state, the time and one input (a
//! judgement, a push result, an operator command, a tick), it returns the next state and the
//! effects to carry out (push a weight, notify, audit). The daemon persists the state before
//! carrying out the effects, so a crash at any point replays safely.
//!
//! ```text
//! pending ─► shadow ─► stage 0 ─► stage 1 ─► … ─► promoted
//!    │          │         │  ▲ held (no data, SRM, push failed) / paused (operator)
//!    └──────────┴─────────┴──► rolled back (judge fails, or abort)
//! ```
//!
//! Safety rules, each enforced here rather than in the daemon:
//! - a weight is raised only on a judgement that is *fresh*: taken after the current stage's
//!   warm-up, at most two intervals old, and saying the evidence suffices and passes;
//! - a raise that was decided but not confirmed before a restart is not replayed: after a
//!   restart the proxies are brought back to the last confirmed weight (pushed again as a new
//!   version) and the stage's warm-up and bake start over once they confirm it;
//! - what the proxies serve is checked at every evaluation; when it is not the state's weight,
//!   the state's weight is pushed again and the rollout holds until that is confirmed;
//! - a rollback is pushed at once and re-pushed until confirmed, even after a restart.

use serde::{Deserialize, Serialize};

use crate::spec::Stage;

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Not started: weight 0.
    Pending,
    /// Copies go to the shadow; users are untouched.
    Shadow,
    /// Stage `index` of the schedule.
    Canary { index: usize },
    /// The treatment serves 100 % (or the last stage) for good.
    Promoted,
    /// Back to 0 % for good; `reason` says why.
    RolledBack { reason: String },
}

impl Phase {
    pub fn is_final(&self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack { .. })
    }
}

/// What the judge concluded from the data of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Judgement {
    /// Evidence suffices and every guardrail passes: the stage may end once baked.
    Pass,
    /// No breach, but not enough evidence yet to pass.
    Continue,
    /// Data missing, stale or insufficient in a way that must not be read as healthy.
    Hold { reason: String },
    /// Sample-ratio mismatch or similar: the data cannot be trusted; stop and page someone.
    Halt { reason: String },
    /// A guardrail breach: roll back.
    Fail { reason: String },
}

/// A push the rollout is waiting on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingPush {
    pub version: u64,
    pub weight: f64,
    /// When the decision to push was taken (for decision-to-confirmation latency).
    pub decided_at: f64,
}

/// The persisted state of one rollout. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub phase: Phase,
    /// The weight the proxies confirmed last.
    pub weight: f64,
    /// A push sent but not yet confirmed.
    pub pending: Option<PendingPush>,
    /// Last version number used for a push.
    pub version: u64,
    /// When the current phase or stage started (weight confirmed).
    pub since: f64,
    /// Operator pause.
    pub paused: bool,
    /// Why the rollout is holding, if it is.
    pub hold: Option<String>,
    /// The controller restarted in this stage: evidence from before does not count.
    pub restarted_at: Option<f64>,
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    /// Skip the rest of the current stage's bake (still needs a passing judgement).
    Promote,
    /// Roll back now.
    Abort,
}

/// One input to the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Time passes (bake timers, shadow duration).
    Tick,
    /// A judgement from data whose newest sample is from `data_at`.
    Judged {
        judgement: Judgement,
        data_at: f64,
    },
    PushConfirmed {
        version: u64,
    },
    PushFailed {
        version: u64,
        error: String,
    },
    Command(Command),
    /// The controller process (re)started with this persisted state.
    Restarted,
    /// What the proxies serve is not what the state says (`reason` says how it differs):
    /// another writer changed the pushed file, a proxy runs another version, or the observed
    /// split is far from the confirmed weight.
    Drifted {
        reason: String,
    },
}

/// Something the daemon must do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Push the treatment at `weight` (with shadowing on or off) as `version`.
    Push {
        version: u64,
        weight: f64,
        shadow: bool,
    },
    /// A notable transition, for notifications and the audit log.
    Event { kind: EventKind, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    StageChanged,
    Held,
    Resumed,
    Paused,
    Promoted,
    RolledBack,
    PushFailed,
    /// The proxies were found serving something other than the state; it is pushed again.
    Diverged,
    /// An operator ended the current stage's bake (`promote`).
    BakeEnded,
}

/// The schedule as the machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stages: Vec<Stage>,
    /// Shadow stage length in seconds, if any.
    pub shadow_secs: Option<f64>,
    pub warmup_secs: f64,
    pub interval_secs: f64,
}

impl State {
    pub fn new(name: &str, now: f64) -> State {
        State {
            name: name.to_string(),
            phase: Phase::Pending,
            weight: 0.0,
            pending: None,
            version: 0,
            since: now,
            paused: false,
            hold: None,
            restarted_at: None,
        }
    }

    /// The weight the current phase serves once its push is confirmed.
    pub fn target_weight(&self, plan: &Plan) -> f64 {
        match &self.phase {
            Phase::Pending | Phase::Shadow | Phase::RolledBack { .. } => 0.0,
            Phase::Canary { index } => plan.stages.get(*index).map_or(0.0, |s| s.weight),
            Phase::Promoted => plan.stages.last().map_or(0.0, |s| s.weight),
        }
    }

    /// Seconds left in the current stage's bake, if in a stage.
    pub fn bake_left(&self, plan: &Plan, now: f64) -> Option<f64> {
        let total = match &self.phase {
            Phase::Canary { index } => plan.stages.get(*index)?.bake.as_secs_f64(),
            Phase::Shadow => plan.shadow_secs?,
            _ => return None,
        };
        let start = self.evidence_from(plan);
        Some((start + total - now).max(0.0))
    }

    /// Data before this time says nothing about the current stage: the stage's start (or
    /// this process's, if later) plus the warm-up.
    pub fn evidence_from(&self, plan: &Plan) -> f64 {
        self.restarted_at.map_or(self.since, |r| r.max(self.since)) + plan.warmup_secs
    }
}

/// A persisted state that cannot be this rollout's: `field` names the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidState {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: String) -> Result<(), InvalidState> {
    Err(InvalidState {
        field: field.to_string(),
        reason,
    })
}

fn check_weight(field: &str, w: f64) -> Result<(), InvalidState> {
    if !(w.is_finite() && (0.0..=100.0).contains(&w)) {
        return invalid(field, format!("{w} is not a weight (0 to 100 %)"));
    }
    Ok(())
}

impl State {
    /// Checks a loaded state against the rollout it is to drive: every invariant the machine
    /// keeps, so a hand-edited or corrupt file is refused instead of driving the proxies. The
    /// weights must be the schedule's: a state written under other stages is refused too.
    pub fn check(&self, plan: &Plan, name: &str) -> Result<(), InvalidState> {
        if self.name != name {
            return invalid(
                "name",
                format!("{:?} is not this rollout ({name:?})", self.name),
            );
        }
        check_weight("weight", self.weight)?;
        for (field, t) in [
            ("since", Some(self.since)),
            ("restarted_at", self.restarted_at),
        ] {
            if t.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
                return invalid(field, format!("{t:?} is not a time"));
            }
        }
        if let Some(p) = &self.pending {
            check_weight("pending.weight", p.weight)?;
            if p.version == 0 || p.version > self.version {
                return invalid(
                    "pending.version",
                    format!(
                        "{} is not a version pushed so far (1 to version = {})",
                        p.version, self.version
                    ),
                );
            }
            if !(p.decided_at.is_finite() && p.decided_at >= 0.0) {
                return invalid(
                    "pending.decided_at",
                    format!("{} is not a time", p.decided_at),
                );
            }
        }
        if let Some(h) = &self.hold {
            if h.is_empty() {
                return invalid("hold", "a hold needs a reason".into());
            }
        }
        let pending = self.pending.as_ref().map(|p| p.weight);
        let stage = |i: usize| plan.stages.get(i).map(|s| s.weight);
        let stages = || {
            plan.stages
                .iter()
                .map(|s| format!("{} %", s.weight))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.phase {
            Phase::Pending | Phase::Shadow => {
                let what = if self.phase == Phase::Pending {
                    "before the first stage"
                } else {
                    "in the shadow stage"
                };
                if self.weight != 0.0 {
                    return invalid("weight", format!("{} % {what}: must be 0", self.weight));
                }
                if pending.is_some_and(|w| w != 0.0) {
                    return invalid(
                        "pending.weight",
                        format!("{} % {what}: must be 0", pending.unwrap_or(0.0)),
                    );
                }
                if self.phase == Phase::Shadow && plan.shadow_secs.is_none() {
                    return invalid("phase", "shadow, but the spec has no shadow stage".into());
                }
            }
            Phase::Canary { index } => {
                let Some(want) = stage(*index) else {
                    return invalid(
                        "phase.index",
                        format!(
                            "stage {} does not exist: the schedule has {} stage(s) ({})",
                            index + 1,
                            plan.stages.len(),
                            stages()
                        ),
                    );
                };
                // Entering a stage pushes its weight; until confirmed, the weight is the one
                // before (the previous stage's, or 0 for the first).
                let before = index.checked_sub(1).and_then(stage).unwrap_or(0.0);
                let stage_no = index + 1;
                match pending {
                    None if self.weight != want => {
                        return invalid(
                            "weight",
                            format!(
                                "{} % at stage {stage_no}, whose weight is {want} % (stages: {})",
                                self.weight,
                                stages()
                            ),
                        );
                    }
                    Some(p) if p != want => {
                        return invalid(
                            "pending.weight",
                            format!(
                                "{p} % at stage {stage_no}, whose weight is {want} % (stages: {})",
                                stages()
                            ),
                        );
                    }
                    Some(_) if self.weight != want && self.weight != before => {
                        return invalid(
                            "weight",
                            format!(
                                "{} % while stage {stage_no} ({want} %) is being pushed: must be {before} % or {want} % (stages: {})",
                                self.weight,
                                stages()
                            ),
                        );
                    }
                    _ => {}
                }
            }
            Phase::Promoted => {
                let last = plan.stages.len().checked_sub(1);
                let want = last.and_then(stage).unwrap_or(0.0);
                let before = last
                    .and_then(|l| l.checked_sub(1))
                    .and_then(stage)
                    .unwrap_or(0.0);
                let ok = match pending {
                    None => self.weight == want,
                    Some(p) => p == want && (self.weight == want || self.weight == before),
                };
                if !ok {
                    return invalid(
                        if pending.is_some_and(|p| p != want) {
                            "pending.weight"
                        } else {
                            "weight"
                        },
                        format!(
                            "promoted at {} %{}, but the last stage is {want} %",
                            self.weight,
                            pending
                                .map(|p| format!(" (pushing {p} %)"))
                                .unwrap_or_default()
                        ),
                    );
                }
            }
            Phase::RolledBack { reason } => {
                if reason.is_empty() {
                    return invalid("phase.reason", "a rollback needs a reason".into());
                }
                match pending {
                    Some(p) if p != 0.0 => {
                        return invalid(
                            "pending.weight",
                            format!("{p} % after a rollback: only 0 % is pushed"),
                        );
                    }
                    None if self.weight != 0.0 => {
                        return invalid(
                            "weight",
                            format!("{} % after a confirmed rollback: must be 0", self.weight),
                        );
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Applies one input. Returns the effects, in order.
pub fn step(state: &mut State, plan: &Plan, input: Input, now: f64) -> Vec<Effect> {
    let mut fx = Vec::new();
    match input {
        Input::Restarted => {
            state.restarted_at = Some(now);
            match state.pending.take() {
                // Lowering (rollback) is always safe to repeat.
                Some(p) if p.weight <= state.weight || state.phase.is_final() => {
                    push(state, plan, p.weight, now, &mut fx);
                }
                // A raise decided before the crash is not replayed: the evidence behind it is
                // old. But it may have reached the proxies (the file was written, the
                // confirmation never came): go back to the stage the confirmed weight belongs
                // to and push that weight again, so proxies and state agree.
                Some(p) => {
                    rewind_to_confirmed(state, plan);
                    hold(
                        state,
                        &format!(
                            "restarted with an unconfirmed raise to {} %: pushing the confirmed {} % again; the stage starts over once the proxies confirm it",
                            p.weight, state.weight
                        ),
                        &mut fx,
                    );
                    push(state, plan, state.weight, now, &mut fx);
                }
                // Nothing was under way. Whatever the proxies serve now, push the state's
                // weight again: the proxies may have loaded something else while no controller
                // ran, and the stage's evidence starts from a confirmation this process saw.
                None if !state.phase.is_final() && state.phase != Phase::Pending => {
                    push(state, plan, state.weight, now, &mut fx);
                }
                None => {}
            }
        }
        Input::Drifted { reason } => {
            // A push under way will set the proxies right (or fail and hold) by itself.
            if state.pending.is_none() && state.phase != Phase::Pending {
                fx.push(Effect::Event {
                    kind: EventKind::Diverged,
                    message: format!(
                        "the proxies do not serve the state's {} %: {reason}; pushing {} % again",
                        state.weight, state.weight
                    ),
                });
                if !state.phase.is_final() {
                    hold(
                        state,
                        &format!("proxies diverged: {reason}; re-pushing {} %", state.weight),
                        &mut fx,
                    );
                }
                push(state, plan, state.weight, now, &mut fx);
            }
        }
        Input::Tick => {
            if state.phase == Phase::Pending && !state.paused {
                let next = if plan.shadow_secs.is_some() {
                    Phase::Shadow
                } else {
                    Phase::Canary { index: 0 }
                };
                enter(state, plan, next, now, &mut fx);
                fx.push(Effect::Event {
                    kind: EventKind::Started,
                    message: format!("rollout {} started", state.name),
                });
            }
        }
        Input::Judged { judgement, data_at } => {
            judged(state, plan, judgement, data_at, now, &mut fx);
        }
        Input::PushConfirmed { version } => {
            if let Some(p) = &state.pending {
                if p.version == version {
                    state.weight = p.weight;
                    state.since = now;
                    state.pending = None;
                    state.restarted_at = None;
                    if state.hold.as_deref().is_some_and(|h| h.starts_with("push")) {
                        state.hold = None;
                    }
                }
            }
        }
        Input::PushFailed { version, error } => {
            if state.pending.as_ref().is_some_and(|p| p.version == version) {
                fx.push(Effect::Event {
                    kind: EventKind::PushFailed,
                    message: format!("push of version {version} failed: {error}"),
                });
                hold(state, &format!("push failed: {error}"), &mut fx);
                // Keep it pending: the daemon retries the same target until it is confirmed,
                // and a rollback never waits on an operator.
            }
        }
        Input::Command(c) => command(state, plan, c, now, &mut fx),
    }
    fx
}

fn judged(
    state: &mut State,
    plan: &Plan,
    judgement: Judgement,
    data_at: f64,
    now: f64,
    fx: &mut Vec<Effect>,
) {
    if state.phase.is_final() || state.phase == Phase::Pending {
        return;
    }
    if let Judgement::Fail { reason } = &judgement {
        // Harm is acted on whatever the state: paused, held or mid-push.
        roll_back(state, plan, reason, now, fx);
        return;
    }
    if state.pending.is_some() {
        return;
    }
    let fresh = data_at >= state.evidence_from(plan) && now - data_at <= 2.0 * plan.interval_secs;
    match judgement {
        Judgement::Fail { .. } => {}
        Judgement::Halt { reason } => hold(state, &reason, fx),
        Judgement::Hold { reason } => hold(state, &reason, fx),
        Judgement::Continue => resume_from_hold(state, fx),
        Judgement::Pass => {
            resume_from_hold(state, fx);
            if !fresh || state.paused {
                return;
            }
            let baked = state.bake_left(plan, now).is_some_and(|left| left <= 0.0);
            if baked {
                advance(state, plan, now, fx);
            }
        }
    }
}

fn command(state: &mut State, plan: &Plan, c: Command, now: f64, fx: &mut Vec<Effect>) {
    match c {
        Command::Pause if !state.phase.is_final() => {
            state.paused = true;
            fx.push(Effect::Event {
                kind: EventKind::Paused,
                message: "paused by operator".into(),
            });
        }
        Command::Resume if state.paused => {
            state.paused = false;
            fx.push(Effect::Event {
                kind: EventKind::Resumed,
                message: "resumed by operator".into(),
            });
        }
        Command::Promote if !state.phase.is_final() => {
            // Ends the bake now; the next fresh passing judgement advances the stage.
            let total = match &state.phase {
                Phase::Canary { index } => plan.stages.get(*index).map(|s| s.bake.as_secs_f64()),
                Phase::Shadow => plan.shadow_secs,
                _ => None,
            };
            if let Some(total) = total {
                state.since = (now - total - plan.warmup_secs).min(state.since);
                fx.push(Effect::Event {
                    kind: EventKind::BakeEnded,
                    message: "bake ended by operator (promote): the next fresh passing evaluation advances".into(),
                });
            }
        }
        Command::Abort if !state.phase.is_final() => {
            roll_back(state, plan, "aborted by operator", now, fx);
        }
        _ => {}
    }
}

fn advance(state: &mut State, plan: &Plan, now: f64, fx: &mut Vec<Effect>) {
    let next = match &state.phase {
        Phase::Shadow => Phase::Canary { index: 0 },
        Phase::Canary { index } if index + 1 < plan.stages.len() => {
            Phase::Canary { index: index + 1 }
        }
        Phase::Canary { .. } => Phase::Promoted,
        _ => return,
    };
    let promoted = next == Phase::Promoted;
    enter(state, plan, next, now, fx);
    fx.push(if promoted {
        Effect::Event {
            kind: EventKind::Promoted,
            message: format!("promoted at {} %", state.target_weight(plan)),
        }
    } else {
        Effect::Event {
            kind: EventKind::StageChanged,
            message: format!("stage → {} %", state.target_weight(plan)),
        }
    });
}

fn enter(state: &mut State, plan: &Plan, phase: Phase, now: f64, fx: &mut Vec<Effect>) {
    state.phase = phase;
    state.since = now;
    state.restarted_at = None;
    let weight = state.target_weight(plan);
    if weight != state.weight || state.phase == Phase::Shadow {
        push(state, plan, weight, now, fx);
    }
}

fn roll_back(state: &mut State, plan: &Plan, reason: &str, now: f64, fx: &mut Vec<Effect>) {
    state.phase = Phase::RolledBack {
        reason: reason.to_string(),
    };
    state.hold = None;
    push(state, plan, 0.0, now, fx);
    fx.push(Effect::Event {
        kind: EventKind::RolledBack,
        message: format!("rolled back: {reason}"),
    });
}

fn push(state: &mut State, _plan: &Plan, weight: f64, now: f64, fx: &mut Vec<Effect>) {
    state.version += 1;
    state.pending = Some(PendingPush {
        version: state.version,
        weight,
        decided_at: now,
    });
    fx.push(Effect::Push {
        version: state.version,
        weight,
        shadow: state.phase == Phase::Shadow,
    });
}

/// Holds with `reason`. The status always shows the latest reason, but an event (and so a
/// notification) comes only when the hold starts or its cause — the reason up to the first
/// `:`, e.g. `no data` — changes: stale data getting a second older is not news.
fn hold(state: &mut State, reason: &str, fx: &mut Vec<Effect>) {
    let cause = |r: &str| r.split(':').next().unwrap_or_default().trim().to_string();
    let news = state.hold.as_deref().map(cause) != Some(cause(reason));
    state.hold = Some(reason.to_string());
    if news {
        fx.push(Effect::Event {
            kind: EventKind::Held,
            message: format!("holding: {reason}"),
        });
    }
}

fn resume_from_hold(state: &mut State, fx: &mut Vec<Effect>) {
    if state.hold.take().is_some() {
        fx.push(Effect::Event {
            kind: EventKind::Resumed,
            message: "data is good again".into(),
        });
    }
}

/// After a restart with an unconfirmed raise: the stage whose weight is the confirmed one.
fn rewind_to_confirmed(state: &mut State, plan: &Plan) {
    state.phase = if state.weight <= 0.0 {
        if plan.shadow_secs.is_some() {
            Phase::Shadow
        } else {
            Phase::Pending
        }
    } else {
        let index = plan
            .stages
            .iter()
            .rposition(|s| s.weight <= state.weight)
            .unwrap_or(0);
        Phase::Canary { index }
    };
}

#[cfg(test)]
mod tests;
