//! The demo's scenarios: what the canary (or the client) does wrong, when the fault starts, and
//! which decision the rollout must end in.

use serde::{Deserialize, Serialize};

use crate::models::{Behaviour, Role};
use crate::report::Expectation;

/// The error spike's share of the canary's answers that are 500, once the fault is on: a hard
/// fault both the filter's breaker and the controller's judge see within seconds at the 10 %
/// stage (≈ 30 canary requests per second).
pub const ERROR_SPIKE_RATE: f64 = 0.2;

/// A scenario, chosen with `--scenario`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The canary is as good as stable (slightly better): promoted to 100 %.
    Good,
    /// The canary starts answering 20 % of requests with 500 (`--error-rate` sets another share).
    ErrorSpike,
    /// The canary becomes three times slower.
    Latency,
    /// The canary's answers get less relevant: users click half as often.
    ConversionDrop,
    /// The canary's scores shift upwards (prediction drift), conversion unchanged.
    Drift,
    /// The canary is fine, but a buggy client drops the user id on 40 % of the requests of
    /// canary users, so they land on the control and the split stops matching the weights.
    Srm,
}

/// When the fault of a bad scenario starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "when", rename_all = "snake_case")]
pub enum FaultTrigger {
    /// From the first request: the canary is bad all along.
    FromStart,
    /// Once the treatment's confirmed weight reaches this percent: the rollout has already
    /// passed earlier stages, so the demo shows a regression caught mid-ramp.
    AtWeight { percent: f64 },
    /// This many seconds after the load starts (for runs without a controller).
    AfterSecs { secs: f64 },
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Good => "good",
            Scenario::ErrorSpike => "error-spike",
            Scenario::Latency => "latency",
            Scenario::ConversionDrop => "conversion-drop",
            Scenario::Drift => "drift",
            Scenario::Srm => "srm",
        }
    }

    /// The outcome a correct controller reaches, in words.
    pub fn expected(self) -> &'static str {
        match self {
            Scenario::Good => "promoted to 100 %",
            Scenario::ErrorSpike => "rolled back: canary error rate above stable's",
            Scenario::Latency => "rolled back: canary latency (p50 or p99) above stable's",
            Scenario::ConversionDrop => "rolled back: canary conversion below stable's",
            Scenario::Drift => "rolled back: canary prediction distribution drifted",
            Scenario::Srm => "halted: observed split does not match the weights (SRM)",
        }
    }

    /// The outcome a correct controller reaches when the experiment has the filter's breaker:
    /// the error spike's hard failures trip it in the data plane before the judge's verdict.
    pub fn expected_with(self, breaker: bool) -> &'static str {
        match self {
            Scenario::ErrorSpike if breaker => {
                "rolled back by the data plane: the filter's breaker takes the canary out first (cause breaker)"
            }
            _ => self.expected(),
        }
    }

    /// [`Scenario::expectation`] when the experiment has the filter's breaker.
    pub fn expectation_with(self, breaker: bool) -> Expectation {
        match self {
            Scenario::ErrorSpike if breaker => Expectation {
                phase: "rolled_back".into(),
                weight: Some(0.0),
                reason_mentions: vec!["breaker".into()],
            },
            _ => self.expectation(),
        }
    }

    /// The end state, checkable: final phase, weight, and the guardrails the reason must name.
    pub fn expectation(self) -> Expectation {
        let rolled_back = |mentions: &[&str]| Expectation {
            phase: "rolled_back".into(),
            weight: Some(0.0),
            reason_mentions: mentions.iter().map(|m| m.to_string()).collect(),
        };
        match self {
            Scenario::Good => Expectation {
                phase: "promoted".into(),
                weight: Some(100.0),
                reason_mentions: Vec::new(),
            },
            Scenario::ErrorSpike => rolled_back(&["error_rate", "error_ceiling"]),
            Scenario::Latency => rolled_back(&["latency_p"]),
            Scenario::ConversionDrop => rolled_back(&["click_per_request"]),
            Scenario::Drift => rolled_back(&["prediction_drift"]),
            // A halt holds the stage (the rollout stays in `canary`) until someone looks.
            Scenario::Srm => Expectation {
                phase: "canary".into(),
                weight: None,
                reason_mentions: vec!["sample-ratio mismatch".into()],
            },
        }
    }

    /// Every scenario, in the order the demo lists them.
    pub fn all() -> [Scenario; 6] {
        [
            Scenario::Good,
            Scenario::ErrorSpike,
            Scenario::Latency,
            Scenario::ConversionDrop,
            Scenario::Drift,
            Scenario::Srm,
        ]
    }

    /// True if the controller should end with the canary at 100 %.
    pub fn should_promote(self) -> bool {
        self == Scenario::Good
    }

    /// Behaviour of `role` before the fault (the canary starts healthy unless the trigger is
    /// [`FaultTrigger::FromStart`]).
    pub fn initial(self, role: Role) -> Behaviour {
        match role {
            Role::Stable => Behaviour::healthy(),
            // The candidate model: a little different from stable, a little better.
            Role::Canary | Role::Shadow => Behaviour {
                score_shift: 0.05,
                score_noise: 0.15,
                quality: 0.125,
                latency_median_ms: 24.0,
                ..Behaviour::healthy()
            },
        }
    }

    /// [`Scenario::faulty`], with the error spike's share of 500s set to `error_rate` if given.
    pub fn faulty_with(self, role: Role, error_rate: Option<f64>) -> Behaviour {
        let b = self.faulty(role);
        match error_rate {
            Some(r) if self == Scenario::ErrorSpike && role != Role::Stable => {
                Behaviour { error_rate: r, ..b }
            }
            _ => b,
        }
    }

    /// Behaviour of `role` once the fault is on.
    pub fn faulty(self, role: Role) -> Behaviour {
        let base = self.initial(role);
        if role == Role::Stable {
            return base;
        }
        match self {
            Scenario::Good | Scenario::Srm => base,
            Scenario::ErrorSpike => Behaviour {
                error_rate: ERROR_SPIKE_RATE,
                ..base
            },
            Scenario::Latency => Behaviour {
                latency_factor: 3.0,
                ..base
            },
            Scenario::ConversionDrop => Behaviour {
                quality: 0.06,
                ..base
            },
            Scenario::Drift => Behaviour {
                score_shift: 1.5,
                ..base
            },
        }
    }

    /// Share of canary users' requests sent without a user id once the fault is on.
    pub fn srm_drop_share(self) -> f64 {
        if self == Scenario::Srm {
            0.4
        } else {
            0.0
        }
    }

    /// The default moment the fault starts; `None` for the good scenario. At 10 % the
    /// canary gets enough traffic (≈ 30 req/s at the default rate) for a clear verdict within a
    /// few evaluation intervals, after the rollout has visibly passed 1 % and 5 %.
    pub fn default_trigger(self) -> Option<FaultTrigger> {
        match self {
            Scenario::Good => None,
            _ => Some(FaultTrigger::AtWeight { percent: 10.0 }),
        }
    }
}
