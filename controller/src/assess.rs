//! The judge behind the daemon's [`Assess`] trait: each [`Reading`] becomes a [`Snapshot`]
//! (weights from the context, stage start from its evidence time) and each [`Evaluation`] a
//! rollout [`Judgement`], with the evaluation as the audit detail.

use std::collections::BTreeMap;

use crate::daemon::{Assess, Assessment, Context};
use crate::judge::config::GuardrailConfig;
use crate::judge::{Decision, Evaluation, Judge};
use crate::rollout::Judgement;
use crate::snapshot::{self, Snapshot};
use crate::source::Reading;
use crate::spec::Checked;

/// A [`Judge`] fed by the daemon.
#[derive(Debug, Clone)]
pub struct Assessor {
    judge: Judge,
}

impl Assessor {
    /// The judge of a rollout spec: `spec.guardrails` (checked when the spec was), with the
    /// schedule's warm-up.
    pub fn from_spec(checked: &Checked) -> Assessor {
        let spec = &checked.rollout.spec;
        let mut config = spec.guardrails.clone();
        config.warmup = spec.schedule.warmup.as_secs_f64();
        Assessor::new(config)
    }

    pub fn new(config: GuardrailConfig) -> Assessor {
        Assessor {
            judge: Judge::new(config),
        }
    }

    /// The snapshot a reading stands for in context `ctx`.
    pub fn snapshot(&self, reading: &Reading, ctx: &Context) -> Snapshot {
        let weights = BTreeMap::from([
            (ctx.control.clone(), (100.0 - ctx.weight).max(0.0)),
            (ctx.treatment.clone(), ctx.weight),
        ]);
        let mut snap = snapshot::from_reading(
            reading,
            &ctx.experiment,
            &ctx.control,
            &ctx.treatment,
            weights,
            ctx.now,
        );
        // The state machine knows when this stage's evidence starts (after a confirmed push,
        // or after a controller restart); the ledger adds its warm-up to the stage start.
        snap.stage_started_at = Some(ctx.evidence_from - self.judge.config().warmup);
        snap
    }
}

/// The rollout's reading of a decision.
pub fn judgement(e: &Evaluation) -> Judgement {
    match e.decision {
        Decision::Promote => Judgement::Pass,
        Decision::Continue => Judgement::Continue,
        Decision::Hold => Judgement::Hold {
            reason: e.reason.clone(),
        },
        Decision::Halt => Judgement::Halt {
            reason: e.reason.clone(),
        },
        Decision::RollBack => Judgement::Fail {
            reason: e.reason.clone(),
        },
    }
}

impl Assess for Assessor {
    fn assess(&mut self, reading: &Reading, ctx: &Context) -> Assessment {
        let snap = self.snapshot(reading, ctx);
        let evaluation = self.judge.observe(&snap);
        Assessment {
            judgement: judgement(&evaluation),
            detail: serde_json::to_value(&evaluation).unwrap_or(serde_json::Value::Null),
        }
    }
}
