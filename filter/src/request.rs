//! Request side, pure: which experiments apply to a request, the user key, and the variant
//! it gets (including QA overrides and keyless requests). The host shim supplies header
//! values through [`RequestView`] and carries out the result.

use crate::assignment::{bucket, Rng};
use crate::mac::{constant_time_eq, nibble};
use crate::plan::{Experiment, KeySource, MissingKey, Unit};

/// A host call failed; the request is served the control and the error counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host call failed")]
pub struct HostFault;

/// Read access to the request being decided. Implementations cache what they fetch.
pub trait RequestView {
    /// First value of a (lower-case) request header.
    fn header(&mut self, name: &str) -> Result<Option<Vec<u8>>, HostFault>;
    /// The `:path` pseudo-header (path and query).
    fn path(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        self.header(":path")
    }
}

/// How a request came to its variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Hash of the user key.
    Key,
    /// A user experiment without a key, served per `missing`.
    MissingKey,
    /// Per-request random draw.
    Random,
    /// The switchback slot's variant.
    Slot,
    /// A QA override with a valid token: routed but kept out of the experiment's counts.
    Override,
}

/// The variant chosen for one experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub variant: usize,
    pub basis: Basis,
    /// An override was asked for but refused (bad token or unknown variant).
    pub override_denied: bool,
}

impl Assignment {
    /// Whether this request counts toward the experiment's metrics.
    pub fn counted(&self) -> bool {
        self.basis != Basis::Override
    }
}

/// Whether the experiment applies to a request with this path.
pub fn applies(exp: &Experiment, view: &mut impl RequestView) -> Result<bool, HostFault> {
    match &exp.path_prefix {
        None => Ok(true),
        Some(prefix) => {
            let path = view.path()?.unwrap_or_default();
            Ok(path_only(&path).starts_with(prefix.as_bytes()))
        }
    }
}

/// Picks the variant for one experiment. `now_secs` is wall-clock seconds (switchback slots).
pub fn assign(
    exp: &Experiment,
    view: &mut impl RequestView,
    now_secs: u64,
    rng: &mut Rng,
) -> Result<Assignment, HostFault> {
    let mut override_denied = false;
    if let Some(o) = &exp.qa_override {
        if let Some(wanted) = view.header(&o.header)? {
            let token = view.header(&o.token_header)?.unwrap_or_default();
            let variant = std::str::from_utf8(&wanted)
                .ok()
                .and_then(|w| exp.variant_index(w.trim()));
            match variant {
                Some(v) if constant_time_eq(&token, o.token.as_bytes()) => {
                    return Ok(Assignment {
                        variant: v,
                        basis: Basis::Override,
                        override_denied: false,
                    });
                }
                _ => override_denied = true,
            }
        }
    }
    let (variant, basis) = match &exp.unit {
        Unit::User { keys, missing } => match user_key(keys, view)? {
            Some(key) => (exp.layout.variant_for(bucket(&exp.salt, &key)), Basis::Key),
            None => match missing {
                MissingKey::Control => (exp.control, Basis::MissingKey),
                MissingKey::Random => (exp.layout.variant_for(rng.bucket()), Basis::MissingKey),
            },
        },
        Unit::Request => (exp.layout.variant_for(rng.bucket()), Basis::Random),
        Unit::Switchback { slot_seconds } => {
            let slot = now_secs / slot_seconds;
            let key = format!("slot:{slot}");
            (
                exp.layout.variant_for(bucket(&exp.salt, key.as_bytes())),
                Basis::Slot,
            )
        }
    };
    Ok(Assignment {
        variant,
        basis,
        override_denied,
    })
}

/// The variant a user key hashes to, ignoring overrides and units (used by the beacon).
pub fn variant_of_key(exp: &Experiment, key: &[u8]) -> usize {
    exp.layout.variant_for(bucket(&exp.salt, key))
}

/// The user key from the first source that has a non-empty value.
pub fn user_key(
    keys: &[KeySource],
    view: &mut impl RequestView,
) -> Result<Option<Vec<u8>>, HostFault> {
    for source in keys {
        let found = match source {
            KeySource::Header(h) => view.header(h)?.map(|v| trim(&v).to_vec()),
            KeySource::Cookie(name) => view
                .header("cookie")?
                .and_then(|c| cookie_value(&c, name).map(<[u8]>::to_vec)),
            KeySource::Query(name) => view.path()?.and_then(|p| query_value(&p, name)),
        };
        if let Some(k) = found.filter(|k| !k.is_empty()) {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

/// The path without its query string.
pub fn path_only(path: &[u8]) -> &[u8] {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => &path[..i],
        None => path,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// Value of cookie `name` in a `Cookie` header (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|&b| b == b'=')?;
        (trim(&pair[..eq]) == name.as_bytes()).then(|| {
            let v = trim(&pair[eq + 1..]);
            // A quoted cookie value keeps its content only.
            if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
                &v[1..v.len() - 1]
            } else {
                v
            }
        })
    })
}

/// Percent-decoded value of query parameter `name` in a request path.
pub fn query_value(path: &[u8], name: &str) -> Option<Vec<u8>> {
    let q = path.iter().position(|&b| b == b'?')?;
    let query = &path[q + 1..];
    let query = match query.iter().position(|&b| b == b'#') {
        Some(i) => &query[..i],
        None => query,
    };
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        (percent_decode(k) == name.as_bytes()).then(|| percent_decode(v))
    })
}

// Hand-written (15 lines) rather than the percent-encoding crate, to keep the wasm module small.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (nibble(s[i + 1]), nibble(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests;
