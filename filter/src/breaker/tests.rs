use super::*;

pub(crate) fn params() -> Params {
    Params {
        window_ms: 10_000,
        min_requests: 50,
        max_error_rate: 0.05,
        max_ratio_to_control: 3.0,
        significance: 1e-4,
    }
}

#[test]
fn classify_basics() {
    let f = |status, details: &'static [u8], flags| {
        classify(&Facts {
            status,
            code_details: details,
            flags,
        })
    };
    assert_eq!(f(Some(200), b"via_upstream", 0), None);
    assert_eq!(
        f(Some(503), b"via_upstream", 0),
        Some(FailureKind::Status5xx)
    );
}
