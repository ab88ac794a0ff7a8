//! The event-beacon part of the shim: exposure echo and tokens on the way out, and the
//! beacon endpoint that the filter answers itself. It reads through the host and applies
//! the effects that [`crate::beacon`] and [`crate::decision::beacon`] decide.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, LogLevel, MapType};
use std::time::UNIX_EPOCH;

use super::{log, now, Active, HostRequest};
use crate::beacon::{self as logic, Checker, Refusal};
use crate::config::Experiment;
use crate::decision::{self, HeaderOp};
use crate::request::{self, Assignment, HostFault, RequestView};

/// Writes response headers; false if any write failed.
fn write_headers<'a>(ops: impl IntoIterator<Item = Option<HeaderOp<'a>>>) -> bool {
    let mut ok = true;
    for op in ops.into_iter().flatten() {
        ok &= match op {
            HeaderOp::Set(name, value) => hostcalls::set_map_value_bytes(
                MapType::HttpResponseHeaders,
                name,
                Some(value.as_bytes()),
            ),
            HeaderOp::Add(name, value) => {
                hostcalls::add_map_value(MapType::HttpResponseHeaders, name, &value)
            }
        }
        .is_ok();
    }
    ok
}

/// Sets the exposure header and cookie, if configured.
pub(super) fn echo(active: &Active, i: usize, exp: &Experiment, variant: &str) {
    if !write_headers(decision::beacon::echo_headers(exp, variant)) {
        active.count_error(i);
    }
}

/// The exposure token of a request counted in an experiment with a beacon
/// ([`crate::beacon::exposure_token`]); a failed read of the user key is counted.
pub(super) fn exposure_token(
    active: &Active,
    i: usize,
    exp: &Experiment,
    view: &mut HostRequest,
    a: Assignment,
    now_secs: u64,
) -> Option<String> {
    match logic::exposure_token(exp, active.exposure_key.as_ref(), &a, view, now_secs) {
        Ok(token) => token,
        Err(HostFault) => {
            active.count_error(i);
            None
        }
    }
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
    if !write_headers(decision::beacon::token_headers(exp, token, set)) {
        active.count_error(i);
    }
}

/// Answers an event beacon itself: every experiment that listens on this path checks the
/// event and its exposure token ([`crate::beacon::check_event`]); the counters and the reply
/// follow from their verdicts ([`crate::decision::beacon::answer`]).
pub(super) fn beacon(active: &Active, view: &mut HostRequest, path: &[u8]) -> Action {
    let method = view.header(":method").ok().flatten().unwrap_or_default();
    let now_secs = now()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let p = request::path_only(path);
    let mut verdicts = Vec::new();
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
        let checker = Checker {
            exposure_key: active.exposure_key.as_ref(),
            table_key: active.table_key.as_ref(),
            limit: active.limits.get(*i).and_then(|l| l.as_deref()),
        };
        let verdict = match now_secs {
            Some(now) => logic::check_event(exp, checker, view, path, &method, now),
            None => Err(Refusal::Fault),
        };
        verdicts.push((em, verdict));
    }
    let answer = decision::beacon::answer(verdicts);
    active.apply(answer.updates);
    let reply = answer.reply;
    let sent = hostcalls::send_http_response(
        reply.status,
        reply.headers,
        reply.body.as_deref().map(str::as_bytes),
    );
    if sent.is_err() {
        log(LogLevel::Warn, "could not answer an event beacon");
        return Action::Continue;
    }
    Action::Pause
}
