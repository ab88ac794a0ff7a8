//! Checks shared by every section of the configuration: the error that names a field path,
//! names safe inside metric names, percentages in bucket steps, and whole numbers that may
//! arrive written as floats ([`whole`]). Below every module that validates a section (the
//! plan's sections, the shadow's), so that none of them depends on another.

use crate::assignment::BUCKETS;

pub mod whole;

/// For `skip_serializing_if`: a `false` flag is left out of the written configuration.
pub fn is_false(b: &bool) -> bool {
    !*b
}

/// Longest experiment, variant or outcome name: they become parts of metric names.
const MAX_NAME_LEN: usize = 64;

/// Why a configuration was rejected. `field` is a path such as `experiments[0].variants[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// A [`ConfigError::Invalid`] for `field`.
pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Names end up inside Envoy stat names, where `.` and `;` delimit tags.
pub fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(invalid(
            field,
            format!("{name:?} contains {c:?}; only ASCII letters, digits, '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

/// Converts a percentage to buckets, requiring a multiple of 0.01 %.
pub fn percent_to_buckets(field: &str, percent: f64) -> Result<u32, ConfigError> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(invalid(
            field,
            format!("{percent} is not a percentage between 0 and 100"),
        ));
    }
    let scaled = percent * f64::from(BUCKETS) / 100.0;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return Err(invalid(
            field,
            format!("{percent} is finer than the 0.01 % resolution"),
        ));
    }
    // In range by the check above, so the cast is exact.
    Ok(rounded as u32)
}
