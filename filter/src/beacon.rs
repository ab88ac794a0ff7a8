//! Event beacons, pure: the exposure token the filter issues on an exposed response, its
//! verification when a beacon carries it back, why a beacon is refused, and the bounded
//! per-user event limit.
//!
//! A beacon counts only with proof of exposure: a token
//! `1.<experiment>.<variant>.<issued unix seconds>.<tag>` where the tag is a MAC (see
//! [`crate::mac`]) over the experiment, the user key, the variant and the issue time, under a
//! key derived from the configuration's `secret`. Every field but the tag is in clear: the
//! client already knows its variant (the echo says so), and the filter needs no state to
//! check a token. The variant the event is attributed to is the token's, and it must still be
//! the user's variant now.

use std::cell::RefCell;

use crate::mac::{self, Key};
use crate::plan::{BeaconConfig, Experiment, Unit};
use crate::request::{self, Assignment, Basis, HostFault, RequestView};
use crate::response::{self, Outcome};

/// The token format's version, its first field.
pub const TOKEN_VERSION: &str = "1";

/// How far in the future an issue time may lie (clocks of two proxies differ a little).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Longest token looked at; anything longer is malformed without being parsed.
pub const MAX_TOKEN_LEN: usize = 256;

/// Why a beacon was not counted: the `reason` label of `sluice_events_rejected_total`, a
/// bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A method other than POST (or GET where `allow_get`).
    Method,
    /// No event name parameter.
    NoName,
    /// An event name not in `outcomes.names`.
    UnknownName,
    /// No user key in the beacon.
    NoKey,
    /// No exposure token for this experiment.
    NoToken,
    /// A token that does not parse.
    Malformed,
    /// A token whose tag does not match: forged, or issued for another user, variant,
    /// experiment or secret.
    BadMac,
    /// A token older than `max_age_seconds`, or issued in the future.
    Expired,
    /// A valid token whose variant is no longer the user's (the weights changed since).
    Reassigned,
    /// The user key's event budget in this window is spent.
    OverLimit,
}

impl Rejection {
    /// Every reason, in the order of the metric positions.
    pub const ALL: [Rejection; 10] = [
        Rejection::Method,
        Rejection::NoName,
        Rejection::UnknownName,
        Rejection::NoKey,
        Rejection::NoToken,
        Rejection::Malformed,
        Rejection::BadMac,
        Rejection::Expired,
        Rejection::Reassigned,
        Rejection::OverLimit,
    ];

    /// Position in [`Rejection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Method => "method",
            Rejection::NoName => "no_name",
            Rejection::UnknownName => "unknown_name",
            Rejection::NoKey => "no_key",
            Rejection::NoToken => "no_token",
            Rejection::Malformed => "malformed",
            Rejection::BadMac => "bad_mac",
            Rejection::Expired => "expired",
            Rejection::Reassigned => "reassigned",
            Rejection::OverLimit => "over_limit",
        }
    }

    /// The HTTP status of the reply.
    pub fn status(self) -> u32 {
        match self {
            Rejection::Method => 405,
            Rejection::NoName | Rejection::UnknownName | Rejection::NoKey => 400,
            Rejection::NoToken | Rejection::Malformed | Rejection::BadMac | Rejection::Expired => {
                403
            }
            Rejection::Reassigned => 409,
            Rejection::OverLimit => 429,
        }
    }

    /// The reply body's explanation.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::Method => "method not allowed: use POST",
            Rejection::NoName => "missing event name parameter",
            Rejection::UnknownName => "unknown event name",
            Rejection::NoKey => "no user key: the event cannot be attributed",
            Rejection::NoToken => "no exposure token for this experiment",
            Rejection::Malformed => "malformed exposure token",
            Rejection::BadMac => "exposure token not valid for this user",
            Rejection::Expired => "exposure token expired",
            Rejection::Reassigned => "the user's variant changed since the exposure",
            Rejection::OverLimit => "too many events for this user",
        }
    }
}

/// Whether a beacon may use this method.
pub fn method_allowed(config: &BeaconConfig, method: &[u8]) -> bool {
    method == b"POST" || (config.allow_get && method == b"GET")
}

/// The token for `user_key` exposed to `variant` at `now_secs`.
pub fn issue(key: &Key, experiment: &str, user_key: &[u8], variant: &str, now_secs: u64) -> String {
    let issued = now_secs.to_string();
    let tag = key.tag(&[
        experiment.as_bytes(),
        user_key,
        variant.as_bytes(),
        issued.as_bytes(),
    ]);
    format!(
        "{TOKEN_VERSION}.{experiment}.{variant}.{issued}.{}",
        mac::to_hex(&tag)
    )
}

/// A token's fields, not yet verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts<'a> {
    experiment: &'a [u8],
    variant: &'a [u8],
    issued: &'a [u8],
    tag: &'a [u8],
}

fn parts(token: &[u8]) -> Option<Parts<'_>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut it = token.split(|&b| b == b'.');
    let version = it.next()?;
    let experiment = it.next()?;
    let variant = it.next()?;
    let issued = it.next()?;
    let tag = it.next()?;
    if version != TOKEN_VERSION.as_bytes() || it.next().is_some() {
        return None;
    }
    Some(Parts {
        experiment,
        variant,
        issued,
        tag,
    })
}

/// The experiment a token names, if it parses at all: how a beacon carrying several tokens
/// finds the one for each experiment.
pub fn token_experiment(token: &[u8]) -> Option<&[u8]> {
    parts(token).map(|p| p.experiment)
}

/// Candidate tokens in a header value or cookie: comma- or space-separated.
pub fn split_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',' || b == b' ')
        .filter(|t| !t.is_empty())
}

/// Checks a token for `experiment` and this user key at `now_secs`; on success, the index of
/// the variant it attributes the event to. The user's current variant must be the token's.
pub fn verify(
    key: &Key,
    exp: &Experiment,
    max_age_secs: u64,
    token: &[u8],
    user_key: &[u8],
    current_variant: usize,
    now_secs: u64,
) -> Result<usize, Rejection> {
    let p = parts(token).ok_or(Rejection::Malformed)?;
    if p.experiment != exp.name.as_bytes() {
        return Err(Rejection::NoToken);
    }
    // Canonical decimal only, so one exposure has exactly one valid spelling.
    let issued: u64 = std::str::from_utf8(p.issued)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20 && !(s.len() > 1 && s.starts_with('0')))
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(Rejection::Malformed)?;
    let tag = mac::from_hex(p.tag).ok_or(Rejection::Malformed)?;
    if !key.verify(&[p.experiment, user_key, p.variant, p.issued], &tag) {
        return Err(Rejection::BadMac);
    }
    if issued > now_secs.saturating_add(CLOCK_SKEW_SECS)
        || now_secs.saturating_sub(issued) > max_age_secs
    {
        return Err(Rejection::Expired);
    }
    let variant = std::str::from_utf8(p.variant)
        .ok()
        .and_then(|v| exp.variant_index(v))
        // A valid tag on a variant this config no longer has: the variant was removed.
        .ok_or(Rejection::Reassigned)?;
    if variant != current_variant {
        return Err(Rejection::Reassigned);
    }
    Ok(variant)
}

/// The `Set-Cookie` value carrying a token to the beacon: only to the beacon's path, not to
/// scripts (`HttpOnly`), never on cross-site requests (`SameSite=Strict`, so a foreign page
/// cannot make a browser send it), and no longer than the token is valid.
pub fn token_cookie(config: &BeaconConfig, token: &str) -> Option<String> {
    let name = config.token_cookie.as_ref()?;
    Some(format!(
        "{name}={token}; Path={}; Max-Age={}; HttpOnly; SameSite=Strict",
        config.path, config.max_age_seconds
    ))
}

/// Ways per set of the [`UserLimit`] table.
const WAYS: usize = 4;

/// One tracked user key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// Keyed hash of the user key; 0 marks a free slot.
    hash: u64,
    /// Window number (`now / window_seconds`) the count belongs to.
    window: u64,
    count: u32,
}

/// Events per user key per fixed time window, per worker, in a table of fixed size: a
/// 4-way set-associative cache indexed by a keyed hash of the user key (keyed, so a client
/// cannot pick keys that land in one set). Memory: 24 bytes per tracked user, allocated once
/// at configure time. When a set is full, the slot from the oldest window (else the one with
/// the fewest events) is reused: that user's count starts over, which is the price of the
/// bound. Only beacons with a valid token reach the table, so evicting costs real exposures.
#[derive(Debug, Clone)]
pub struct UserLimit {
    slots: Vec<Slot>,
    sets: usize,
    events: u32,
    window_secs: u64,
}

impl UserLimit {
    /// A table tracking about `users` keys (rounded up to a multiple of 4), allowing `events`
    /// per key per `window_secs`.
    pub fn new(users: usize, events: u32, window_secs: u64) -> UserLimit {
        let sets = users.div_ceil(WAYS).max(1);
        UserLimit {
            slots: vec![Slot::default(); sets * WAYS],
            sets,
            events,
            window_secs: window_secs.max(1),
        }
    }

    /// Counts one event of the user with keyed hash `hash`; `false` if over the limit.
    pub fn admit(&mut self, hash: u64, now_secs: u64) -> bool {
        let hash = hash.max(1);
        let window = now_secs / self.window_secs;
        let start = usize::try_from(hash % self.sets as u64).unwrap_or(0) * WAYS;
        let Some(set) = self.slots.get_mut(start..start + WAYS) else {
            return true;
        };
        let slot = match set.iter().position(|s| s.hash == hash) {
            Some(i) => &mut set[i],
            None => {
                let victim = (0..WAYS)
                    .min_by_key(|&i| (set[i].hash != 0, set[i].window, set[i].count))
                    .unwrap_or(0);
                set[victim] = Slot {
                    hash,
                    window,
                    count: 0,
                };
                &mut set[victim]
            }
        };
        if slot.window != window {
            slot.window = window;
            slot.count = 0;
        }
        if slot.count >= self.events {
            return false;
        }
        slot.count += 1;
        true
    }

    /// Bytes the table holds.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }
}

/// Why one experiment did not count a beacon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Refused for a reason the client is told (and that is counted by reason).
    Rejected(Rejection),
    /// A host call failed or the plan lacks what a beacon needs (counted in
    /// `sluice_errors_total`).
    Fault,
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        Refusal::Rejected(r)
    }
}

impl From<HostFault> for Refusal {
    fn from(_: HostFault) -> Self {
        Refusal::Fault
    }
}

/// What checking a beacon needs besides the request: the plan's keys and the experiment's
/// per-user event table (all present whenever the experiment has a beacon).
#[derive(Clone, Copy)]
pub struct Checker<'a> {
    pub exposure_key: Option<&'a Key>,
    pub table_key: Option<&'a Key>,
    pub limit: Option<&'a RefCell<UserLimit>>,
}

/// One experiment's verdict on a beacon at `path` (with its query) sent with `method`: the
/// variant and the outcome to count. The checks run in order, cheapest and least revealing
/// first: method, event name, user key, token, then the user's event budget (spent only by a
/// beacon that passed every other check).
pub fn check_event(
    exp: &Experiment,
    checker: Checker<'_>,
    view: &mut impl RequestView,
    path: &[u8],
    method: &[u8],
    now_secs: u64,
) -> Result<(usize, usize), Refusal> {
    let (Some(b), Some(o), Unit::User { keys, .. }) = (&exp.beacon, &exp.outcomes, &exp.unit)
    else {
        return Err(Refusal::Fault);
    };
    let (Some(exposure_key), Some(table_key)) = (checker.exposure_key, checker.table_key) else {
        return Err(Refusal::Fault);
    };
    if !method_allowed(b, method) {
        return Err(Rejection::Method.into());
    }
    let name = request::query_value(path, &b.param).ok_or(Rejection::NoName)?;
    let Outcome::Known(outcome) = response::outcome(o, &name) else {
        return Err(Rejection::UnknownName.into());
    };
    let user = request::user_key(keys, view)?.ok_or(Rejection::NoKey)?;
    let token = find_token(b, exp, view, path)?;
    let current = request::variant_of_key(exp, &user);
    let variant = verify(
        exposure_key,
        exp,
        b.max_age_seconds,
        &token,
        &user,
        current,
        now_secs,
    )?;
    let Some(limit) = checker.limit else {
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
pub fn find_token(
    b: &BeaconConfig,
    exp: &Experiment,
    view: &mut impl RequestView,
    path: &[u8],
) -> Result<Vec<u8>, Refusal> {
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    if let Some(h) = view.header(&b.token_header)? {
        candidates.extend(split_tokens(&h).map(<[u8]>::to_vec));
    }
    if let Some(q) = request::query_value(path, &b.token_param) {
        candidates.push(q);
    }
    if let Some(name) = &b.token_cookie {
        if let Some(c) = view.header("cookie")? {
            if let Some(v) = request::cookie_value(&c, name) {
                candidates.push(v.to_vec());
            }
        }
    }
    if let Some(t) = candidates
        .iter()
        .find(|t| token_experiment(t) == Some(exp.name.as_bytes()))
    {
        return Ok(t.clone());
    }
    if candidates.iter().any(|t| token_experiment(t).is_none()) {
        return Err(Rejection::Malformed.into());
    }
    Err(Rejection::NoToken.into())
}

/// The exposure token of a request assigned `a` in `exp`, if the experiment has a beacon:
/// only a user whose key chose the variant is exposed (not a QA override, not a keyless
/// request, not without a clock).
pub fn exposure_token(
    exp: &Experiment,
    key: Option<&Key>,
    a: &Assignment,
    view: &mut impl RequestView,
    now_secs: u64,
) -> Result<Option<String>, HostFault> {
    let (Some(_), Some(key), Unit::User { keys, .. }) = (&exp.beacon, key, &exp.unit) else {
        return Ok(None);
    };
    if a.basis != Basis::Key || now_secs == 0 {
        return Ok(None);
    }
    let Some(user) = request::user_key(keys, view)? else {
        return Ok(None);
    };
    Ok(exp
        .variants
        .get(a.variant)
        .map(|variant| issue(key, &exp.name, &user, variant, now_secs)))
}

#[cfg(test)]
mod tests;
