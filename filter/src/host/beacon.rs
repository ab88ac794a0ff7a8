//! The event-beacon part of the shim: exposure echo and tokens on the way out, and the
//! beacon endpoint that the filter answers itself.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, LogLevel, MapType};
use std::time::UNIX_EPOCH;

use super::{log, now, Active, HostRequest};
use crate::beacon::{self as beacon_logic, Rejection};
use crate::config::{Experiment, Unit};
use crate::request::{self, Assignment, HostFault, RequestView};
use crate::response;

/// Sets the exposure header and cookie, if configured.
pub(super) fn echo(active: &Active, i: usize, exp: &Experiment, variant: &str) {
    let Some(e) = &exp.echo else {
        return;
    };
    let mut ok = true;
    if let Some(h) = &e.header {
        ok &= hostcalls::set_map_value_bytes(
            MapType::HttpResponseHeaders,
            h,
            Some(variant.as_bytes()),
        )
        .is_ok();
    }
    if let Some(cookie) = response::echo_cookie(e, variant) {
        ok &= hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie).is_ok();
    }
    if !ok {
        active.count_error(i);
    }
}

/// The exposure token of a request counted in an experiment with a beacon: only a user whose
/// key chose the variant is exposed (not a QA override, not a keyless request).
pub(super) fn exposure_token(
    active: &Active,
    i: usize,
    exp: &Experiment,
    view: &mut HostRequest,
    a: Assignment,
    now_secs: u64,
) -> Option<String> {
    let (Some(_), Some(key), Unit::User { keys, .. }) =
        (&exp.beacon, &active.exposure_key, &exp.unit)
    else {
        return None;
    };
    if a.basis != request::Basis::Key || now_secs == 0 {
        return None;
    }
    let user = match request::user_key(keys, view) {
        Ok(Some(u)) => u,
        Ok(None) => return None,
        Err(HostFault) => {
            active.count_error(i);
            return None;
        }
    };
    let variant = exp.variants.get(a.variant)?;
    Some(beacon_logic::issue(
        key, &exp.name, &user, variant, now_secs,
    ))
}

/// Sends an exposure token in the response header (several experiments' tokens as several
/// values) and, if configured, the token cookie.
pub(super) fn send_token<'a>(
    active: &Active,
    i: usize,
    exp: &'a Experiment,
    token: &str,
    set: &mut Vec<&'a str>,
) {
    let Some(b) = &exp.beacon else {
        return;
    };
    let header = b.token_header.as_str();
    // The first token replaces whatever the upstream sent under that name.
    let mut ok = if set.contains(&header) {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, header, token).is_ok()
    } else {
        set.push(header);
        hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, header, Some(token.as_bytes()))
            .is_ok()
    };
    if let Some(cookie) = beacon_logic::token_cookie(b, token) {
        ok &= hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie).is_ok();
    }
    if !ok {
        active.count_error(i);
    }
}

/// Why one experiment did not count a beacon.
enum Refusal {
    Rejected(Rejection),
    /// A host call failed (counted in `sluice_errors_total`).
    Fault,
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        Refusal::Rejected(r)
    }
}

/// Answers an event beacon itself: for every experiment that listens on this path, checks
/// the event and its exposure token and counts it for the token's variant; then replies 204
/// if any experiment counted it, else the status of the first refusal.
pub(super) fn beacon(active: &Active, view: &mut HostRequest, path: &[u8]) -> Action {
    let method = view.header(":method").ok().flatten().unwrap_or_default();
    let now_secs = now()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let p = request::path_only(path);
    let mut accepted = false;
    let mut refused: Option<Rejection> = None;
    for (i, beacon_path) in &active.beacon_paths {
        if beacon_path.as_bytes() != p {
            continue;
        }
        let (Some(exp), Some(em)) = (
            active.plan.experiments.get(*i),
            active.catalog.experiments.get(*i),
        ) else {
            continue;
        };
        let result = match now_secs {
            Some(now) => one_beacon(active, *i, exp, view, path, &method, now),
            None => Err(Refusal::Fault),
        };
        match result {
            Ok((variant, outcome)) => {
                if let Some(vm) = em.variants.get(variant) {
                    if let Some(&pos) = vm.outcomes.get(outcome) {
                        active.increment(pos);
                    }
                    if let Some(pos) = vm.events {
                        active.increment(pos);
                    }
                    accepted = true;
                }
            }
            Err(Refusal::Rejected(r)) => {
                if let Some(&pos) = em.events_rejected.as_ref().and_then(|v| v.get(r.index())) {
                    active.increment(pos);
                }
                refused.get_or_insert(r);
            }
            Err(Refusal::Fault) => active.count_error(*i),
        }
    }
    let sent = match (accepted, refused) {
        (true, _) => hostcalls::send_http_response(204, vec![], None),
        (false, Some(r)) => hostcalls::send_http_response(
            r.status(),
            vec![("content-type", "text/plain")],
            Some(format!("sluice: {}\n", r.message()).as_bytes()),
        ),
        (false, None) => hostcalls::send_http_response(
            500,
            vec![("content-type", "text/plain")],
            Some(b"sluice: internal error\n"),
        ),
    };
    if sent.is_err() {
        log(LogLevel::Warn, "could not answer an event beacon");
        return Action::Continue;
    }
    Action::Pause
}

/// One experiment's verdict on a beacon: the variant and outcome to count.
fn one_beacon(
    active: &Active,
    i: usize,
    exp: &Experiment,
    view: &mut HostRequest,
    path: &[u8],
    method: &[u8],
    now_secs: u64,
) -> Result<(usize, usize), Refusal> {
    let (Some(b), Some(o), Unit::User { keys, .. }) = (&exp.beacon, &exp.outcomes, &exp.unit)
    else {
        return Err(Refusal::Fault);
    };
    let (Some(exposure_key), Some(table_key)) = (&active.exposure_key, &active.table_key) else {
        return Err(Refusal::Fault);
    };
    if !beacon_logic::method_allowed(b, method) {
        return Err(Rejection::Method.into());
    }
    let name = request::query_value(path, &b.param).ok_or(Rejection::NoName)?;
    let response::Outcome::Known(outcome) = response::outcome(o, &name) else {
        return Err(Rejection::UnknownName.into());
    };
    let user = request::user_key(keys, view)
        .map_err(|HostFault| Refusal::Fault)?
        .ok_or(Rejection::NoKey)?;
    let token = find_token(b, exp, view, path)?;
    let current = request::variant_of_key(exp, &user);
    let variant = beacon_logic::verify(
        exposure_key,
        exp,
        b.max_age_seconds,
        &token,
        &user,
        current,
        now_secs,
    )?;
    let Some(Some(limit)) = active.limits.get(i) else {
        return Err(Refusal::Fault);
    };
    let Ok(mut limit) = limit.try_borrow_mut() else {
        return Err(Refusal::Fault);
    };
    if !limit.admit(table_key.hash64(&user), now_secs) {
        return Err(Rejection::OverLimit.into());
    }
    Ok((variant, outcome))
}

/// The beacon's token for `exp`: from the token header (comma-separated values), the query
/// parameter or the token cookie, the first that names this experiment.
fn find_token(
    b: &crate::config::BeaconConfig,
    exp: &Experiment,
    view: &mut HostRequest,
    path: &[u8],
) -> Result<Vec<u8>, Refusal> {
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    if let Some(h) = view
        .header(&b.token_header)
        .map_err(|HostFault| Refusal::Fault)?
    {
        candidates.extend(beacon_logic::split_tokens(&h).map(<[u8]>::to_vec));
    }
    if let Some(q) = request::query_value(path, &b.token_param) {
        candidates.push(q);
    }
    if let Some(name) = &b.token_cookie {
        if let Some(c) = view.header("cookie").map_err(|HostFault| Refusal::Fault)? {
            if let Some(v) = request::cookie_value(&c, name) {
                candidates.push(v.to_vec());
            }
        }
    }
    if let Some(t) = candidates
        .iter()
        .find(|t| beacon_logic::token_experiment(t) == Some(exp.name.as_bytes()))
    {
        return Ok(t.clone());
    }
    if candidates
        .iter()
        .any(|t| beacon_logic::token_experiment(t).is_none())
    {
        return Err(Rejection::Malformed.into());
    }
    Err(Rejection::NoToken.into())
}
