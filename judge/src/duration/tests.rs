use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn documented_forms_are_read() {
    for (text, want) in [
        ("500ms", ms(500)),
        ("30s", ms(30_000)),
        ("10m", ms(600_000)),
        ("2h", ms(7_200_000)),
        ("1.5m", ms(90_000)),
        ("0.25s", ms(250)),
        ("1h 30m", ms(5_400_000)),
        ("1h30m", ms(5_400_000)),
        ("7", ms(7_000)),
        ("0.5", ms(500)),
        (" 3s ", ms(3_000)),
        ("0", ms(0)),
        ("0s", ms(0)),
    ] {
        assert_eq!(parse_duration(text), Ok(want), "{text:?}");
    }
}

#[test]
fn other_units_and_malformed_text_are_refused_with_the_text_named() {
    for (text, unit) in [
        ("1d", "d"),
        ("2w", "w"),
        ("3M", "M"),
        ("1e5", "e"),
        ("5 min", "min"),
    ] {
        assert_eq!(
            parse_duration(text),
            Err(DurationError::UnknownUnit {
                unit: unit.into(),
                shown: format!("{text:?}")
            }),
        );
    }
    for text in ["", "-1s", "s", "1..5s", "1.s", "+3s", "3s!"] {
        let got = parse_duration(text);
        assert!(
            matches!(got, Err(DurationError::Malformed { .. })),
            "{text:?}: {got:?}"
        );
    }
    assert_eq!(
        parse_duration("1d").map_err(|e| e.to_string()),
        Err("unknown unit \"d\" in \"1d\" (use ms, s, m or h)".to_string())
    );
    assert_eq!(
        parse_duration("-1s").map_err(|e| e.to_string()),
        Err("\"-1s\" is not a duration like 30s, 10m, 500ms".to_string())
    );
}

#[test]
fn the_cap_holds_for_text_numbers_and_overflow() {
    assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
    for text in ["8761h", "31536001", "99999999999999999999h", "1e300"] {
        let got = parse_duration(text);
        assert!(
            matches!(
                got,
                Err(DurationError::TooLong { .. } | DurationError::UnknownUnit { .. })
            ),
            "{text:?}: {got:?}"
        );
    }
    assert_eq!(
        parse_duration("8761h").map_err(|e| e.to_string()),
        Err("\"8761h\" is longer than the longest duration accepted (8760h)".to_string())
    );
    assert!(matches!(
        seconds(f64::NAN, "NaN"),
        Err(DurationError::Invalid { .. })
    ));
    assert!(matches!(
        seconds(-0.5, "-0.5"),
        Err(DurationError::Invalid { .. })
    ));
}

#[test]
fn formatting_reads_back() {
    for d in ["250ms", "3s", "10m", "2h", "90s", "1500ms"] {
        assert_eq!(parse_duration(d).map(format_duration).as_deref(), Ok(d));
    }
    for millis in [0, 1, 999, 1000, 59_999, 60_000, 3_600_000, 5_400_000] {
        assert_eq!(parse_duration(&format_duration(ms(millis))), Ok(ms(millis)));
    }
}
