//! Durations as users write them in specs, guardrail files and flags: `500ms`, `30s`, `10m`,
//! `2h`, compounds such as `1h 30m`, or a bare number of seconds; at most [`MAX_DURATION`].
//!
//! The text is read by `humantime`; this module only narrows it to the units the docs promise
//! (ms, s, m, h: `1d` or `3M` would be easy to misread), caps the length, and renders a
//! duration back in the same form. Below the spec and the judge's configuration, which both
//! use it.

use std::time::Duration;

use serde::Deserializer;

/// The longest duration any field accepts (a year): far beyond any sensible bake or timeout,
/// and small enough that adding it to a clock reading can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The units a duration may be written in.
const UNITS: [&str; 4] = ["ms", "s", "m", "h"];

/// Why a duration was refused. `shown` is the value as written (quoted if it was text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{shown} is not a duration like 30s, 10m, 500ms")]
    Malformed { shown: String },
    #[error("unknown unit {unit:?} in {shown} (use ms, s, m or h)")]
    UnknownUnit { unit: String, shown: String },
    #[error("{shown} is not a valid duration")]
    Invalid { shown: String },
    #[error(
        "{shown} is longer than the longest duration accepted ({})",
        format_duration(MAX_DURATION)
    )]
    TooLong { shown: String },
}

/// A number of seconds as a [`Duration`], refused when negative, not finite or longer than
/// [`MAX_DURATION`] (`shown` is how the value was written, for the message).
pub fn seconds(secs: f64, shown: &str) -> Result<Duration, DurationError> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(DurationError::Invalid {
            shown: shown.to_string(),
        });
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(DurationError::TooLong {
            shown: shown.to_string(),
        }),
    }
}

/// Reads `500ms`, `30s`, `1.5m`, `2h`, `1h 30m` or a bare number of seconds (`7`, `0.25`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let shown = format!("{s:?}");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let n: f64 = s.parse().map_err(|_| DurationError::Malformed {
            shown: shown.clone(),
        })?;
        return seconds(n, &shown);
    }
    if let Some(unit) = s
        .split(|c: char| !c.is_alphabetic())
        .find(|w| !w.is_empty() && !UNITS.contains(w))
    {
        return Err(DurationError::UnknownUnit {
            unit: unit.to_string(),
            shown,
        });
    }
    match humantime::parse_duration(s) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        Ok(_) | Err(humantime::DurationError::NumberOverflow) => {
            Err(DurationError::TooLong { shown })
        }
        Err(_) => Err(DurationError::Malformed { shown }),
    }
}

/// Renders a duration the way [`parse_duration`] reads it, in the largest unit that divides
/// it (milliseconds at the finest).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A number as a message shows it: `1e300`, not three hundred digits.
fn number(v: f64) -> String {
    if v != 0.0 && !(1e-6..1e15).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// Reads a duration field: text such as `30s` or a number of seconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration like 30s, 10m, 500ms, or a number of seconds")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
            seconds(v, &number(v)).map_err(E::custom)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            // Exact for every value up to the cap; anything larger is refused by `seconds`.
            seconds(v as f64, &v.to_string()).map_err(E::custom)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            seconds(v as f64, &v.to_string()).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor)
}

/// `#[serde(with = ...)]` for a [`Duration`] field written as text.
pub mod as_text {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::deserialize(d)
    }
}

/// `#[serde(with = ...)]` for an optional [`Duration`] field written as text.
pub mod opt_as_text {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => as_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests;
