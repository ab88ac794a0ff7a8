//! Response side, pure: status classes, outcome and prediction parsing, Envoy's response
//! code details, and the exposure cookie.

use crate::breaker::{self, Facts};
use crate::plan::{EchoConfig, OutcomesConfig, PredictionConfig};

/// Index into [`crate::metrics::STATUS_CLASSES`] for a `:status` value.
pub fn status_class(status: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(status)
        .ok()?
        .trim()
        .parse::<u16>()
        .ok()?;
    match s {
        100..=599 => Some(usize::from(s / 100 - 1)),
        _ => None,
    }
}

/// One entry of an outcome header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Index into the configured outcome names.
    Known(usize),
    Unknown,
}

/// Parses an outcome header value: comma-separated names, blanks ignored.
pub fn outcomes<'a>(
    config: &'a OutcomesConfig,
    value: &'a [u8],
) -> impl Iterator<Item = Outcome> + 'a {
    value
        .split(|&b| b == b',')
        .map(|v| v.trim_ascii())
        .filter(|v| !v.is_empty())
        .map(|v| outcome(config, v))
}

/// Looks up one outcome (or beacon event) name.
pub fn outcome(config: &OutcomesConfig, name: &[u8]) -> Outcome {
    config
        .names
        .iter()
        .position(|n| n.as_bytes() == name)
        .map_or(Outcome::Unknown, Outcome::Known)
}

/// The integer recorded for a prediction header, or `None` if it is not a finite number or
/// is negative after the offset (Envoy histograms hold unsigned integers).
pub fn prediction(config: &PredictionConfig, value: &[u8]) -> Option<u64> {
    let v: f64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    let scaled = (v + config.offset) * config.scale;
    if !scaled.is_finite() || scaled < 0.0 || scaled >= u64::MAX as f64 {
        return None;
    }
    Some(scaled.round() as u64)
}

/// Envoy's `response.code_details` for a response that came from the upstream.
const VIA_UPSTREAM: &str = "via_upstream";

/// Whether Envoy generated this response itself rather than relaying the upstream's.
pub fn is_local_reply(code_details: &[u8]) -> bool {
    !code_details.is_empty() && code_details != VIA_UPSTREAM.as_bytes()
}

/// Whether the upstream reset or failed before answering.
pub fn is_upstream_reset(code_details: &[u8]) -> bool {
    code_details.starts_with(b"upstream_reset")
}

/// Whether the breaker must read `response.flags` at the end of a stream to classify it, given
/// what the response headers said (`None` if none passed) and whether the response passed
/// this filter to its end (`ended`).
///
/// The flags that make a failure (timeouts, resets, no healthy upstream, overflow, no route or
/// cluster) are set when Envoy gives up on the upstream; it then either answers itself, with a
/// status and details that [`breaker::classify`] already places the same way without flags, or,
/// if the answer had started, resets the stream, so that the response never ends. The flags that
/// clear a failure (the client gone, overload) matter only for an answer that looks like one.
/// So flags are read only for a stream without response headers, one that did not end, or
/// one whose headers alone say failure: [`breaker::classify`] of the result is the same as
/// with the flags always read.
pub fn flags_needed(answer: Option<&Facts<'_>>, ended: bool) -> bool {
    match answer {
        None => true,
        Some(f) => !ended || breaker::classify(&Facts { flags: 0, ..*f }).is_some(),
    }
}

/// The `Set-Cookie` value for the exposure echo.
pub fn echo_cookie(echo: &EchoConfig, variant: &str) -> Option<String> {
    let name = echo.cookie.as_ref()?;
    let mut c = format!("{name}={variant}; Path=/; SameSite=Lax");
    if let Some(age) = echo.cookie_max_age_seconds {
        c.push_str(&format!("; Max-Age={age}"));
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn outcomes_config() -> OutcomesConfig {
        OutcomesConfig {
            header: Some("x-sluice-outcome".into()),
            names: vec!["click".into(), "purchase".into()],
        }
    }

    #[test]
    fn classes() {
        assert_eq!(status_class(b"200"), Some(1));
        assert_eq!(status_class(b"503"), Some(4));
        assert_eq!(status_class(b"101"), Some(0));
        assert_eq!(status_class(b"99"), None);
        assert_eq!(status_class(b"abc"), None);
    }

    #[test]
    fn outcome_lists() {
        let c = outcomes_config();
        let got: Vec<_> = outcomes(&c, b" click, ,purchase,bogus").collect();
        assert_eq!(
            got,
            vec![Outcome::Known(0), Outcome::Known(1), Outcome::Unknown]
        );
    }

    #[test]
    fn predictions_are_scaled_and_checked() {
        let mut p = PredictionConfig {
            header: "x-model-score".into(),
            scale: 1000.0,
            offset: 0.0,
        };
        assert_eq!(prediction(&p, b"0.7346"), Some(735));
        assert_eq!(prediction(&p, b"-0.1"), None);
        assert_eq!(prediction(&p, b"NaN"), None);
        assert_eq!(prediction(&p, b"inf"), None);
        assert_eq!(prediction(&p, b"x"), None);
        p.offset = 1.0;
        assert_eq!(prediction(&p, b"-0.1"), Some(900));
    }

    #[test]
    fn code_details() {
        assert!(!is_local_reply(b"via_upstream"));
        assert!(is_local_reply(b"route_not_found"));
        assert!(is_upstream_reset(
            b"upstream_reset_before_response_started{remote_reset}"
        ));
        assert!(!is_upstream_reset(b"upstream_response_timeout"));
    }

    #[test]
    fn flags_are_read_only_where_they_can_change_the_class() {
        let ok = Facts {
            status: Some(200),
            code_details: b"",
            flags: 0,
        };
        // A complete answer that is no failure by its headers: no flags needed.
        assert!(!flags_needed(Some(&ok), true));
        let not_found = Facts {
            status: Some(404),
            code_details: b"via_upstream",
            flags: 0,
        };
        assert!(!flags_needed(Some(&not_found), true));
        // The body was cut (a reset after a 2xx started), or no headers ever passed.
        assert!(flags_needed(Some(&ok), false));
        assert!(flags_needed(None, true));
        // Headers that say failure: the flags may clear it (the client went away first).
        let failed = Facts {
            status: Some(503),
            code_details: b"via_upstream",
            flags: 0,
        };
        assert!(flags_needed(Some(&failed), true));
        let no_route = Facts {
            status: Some(404),
            code_details: b"route_not_found",
            flags: 0,
        };
        assert!(flags_needed(Some(&no_route), true));
    }

    #[test]
    fn cookie() {
        let e = EchoConfig {
            header: None,
            cookie: Some("sluice_exp".into()),
            cookie_max_age_seconds: Some(60),
        };
        assert_eq!(
            echo_cookie(&e, "canary").as_deref(),
            Some("sluice_exp=canary; Path=/; SameSite=Lax; Max-Age=60")
        );
    }
}
