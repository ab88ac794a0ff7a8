//! The beacon shim's decisions: which counters a beacon updates and which reply it gets, and
//! which headers carry the exposure echo and token on a response.

use super::{HeaderOp, LocalReply, MetricUpdate};
use crate::beacon::{self as logic, Refusal};
use crate::metrics::ExperimentMetrics;
use crate::plan::Experiment;
use crate::response;

/// What the shim does for one beacon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeaconAnswer {
    pub updates: Vec<MetricUpdate>,
    pub reply: LocalReply,
}

/// One experiment's verdict on a beacon ([`crate::beacon::check_event`]), with its metrics.
pub type Verdict<'a> = (&'a ExperimentMetrics, Result<(usize, usize), Refusal>);

/// The beacon's effects, from the verdicts of every experiment listening on its path: each
/// accepted event counts its outcome and the event for its variant, each rejection its
/// reason, each fault an error. The reply is 204 if any experiment counted the event, else
/// the status and message of the first rejection, else 500.
pub fn answer<'a>(verdicts: impl IntoIterator<Item = Verdict<'a>>) -> BeaconAnswer {
    let mut updates = Vec::new();
    let mut accepted = false;
    let mut refused = None;
    for (em, verdict) in verdicts {
        match verdict {
            Ok((variant, outcome)) => {
                let Some(vm) = em.variants.get(variant) else {
                    continue;
                };
                if let Some(&pos) = vm.outcomes.get(outcome) {
                    updates.push(MetricUpdate::Increment(pos));
                }
                if let Some(pos) = vm.events {
                    updates.push(MetricUpdate::Increment(pos));
                }
                accepted = true;
            }
            Err(Refusal::Rejected(r)) => {
                if let Some(&pos) = em.events_rejected.as_ref().and_then(|v| v.get(r.index())) {
                    updates.push(MetricUpdate::Increment(pos));
                }
                refused.get_or_insert(r);
            }
            Err(Refusal::Fault) => updates.push(MetricUpdate::Increment(em.errors)),
        }
    }
    let reply = match (accepted, refused) {
        (true, _) => LocalReply {
            status: 204,
            headers: Vec::new(),
            body: None,
        },
        (false, Some(r)) => LocalReply {
            status: r.status(),
            headers: vec![("content-type", "text/plain")],
            body: Some(format!("sluice: {}\n", r.message())),
        },
        (false, None) => LocalReply {
            status: 500,
            headers: vec![("content-type", "text/plain")],
            body: Some("sluice: internal error\n".to_string()),
        },
    };
    BeaconAnswer { updates, reply }
}

/// The exposure echo of `exp` on a response: the variant in the echo header and the echo
/// cookie, each if configured.
pub fn echo_headers<'a>(exp: &'a Experiment, variant: &str) -> [Option<HeaderOp<'a>>; 2] {
    let Some(e) = &exp.echo else {
        return [None, None];
    };
    [
        e.header
            .as_deref()
            .map(|h| HeaderOp::Set(h, variant.to_string())),
        response::echo_cookie(e, variant).map(|c| HeaderOp::Add("set-cookie", c)),
    ]
}

/// The exposure token of `exp` on a response: in the token header (the first token under a
/// header name replaces what the upstream sent, later experiments' tokens are added as more
/// values; `set` holds the names already written) and, if configured, the token cookie.
pub fn token_headers<'a>(
    exp: &'a Experiment,
    token: &str,
    set: &mut Vec<&'a str>,
) -> [Option<HeaderOp<'a>>; 2] {
    let Some(b) = &exp.beacon else {
        return [None, None];
    };
    let header = b.token_header.as_str();
    let value = if set.contains(&header) {
        HeaderOp::Add(header, token.to_string())
    } else {
        set.push(header);
        HeaderOp::Set(header, token.to_string())
    };
    [
        Some(value),
        logic::token_cookie(b, token).map(|c| HeaderOp::Add("set-cookie", c)),
    ]
}
