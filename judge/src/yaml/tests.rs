use super::*;

#[test]
fn a_byte_order_mark_is_dropped() {
    let value = to_value("\u{feff}a: 1\nb: [x]\n").unwrap();
    assert_eq!(value, serde_json::json!({"a": 1, "b": ["x"]}));
}

#[test]
fn an_empty_document_is_refused() {
    for text in ["", "\u{feff}", "\n  \n", "# only a comment\n", "---\n"] {
        assert_eq!(to_value(text), Err(YamlError::Empty), "{text:?}");
    }
    // An explicit null is a value, not an empty file.
    assert_eq!(to_value("null"), Ok(serde_json::Value::Null));
}

#[test]
fn nesting_is_bounded_in_flow_and_block_style() {
    let ok = "{a: ".repeat(MAX_DEPTH) + "1" + &"}".repeat(MAX_DEPTH);
    assert!(to_value(&ok).is_ok());
    let deep = "{a: ".repeat(MAX_DEPTH + 1) + "1" + &"}".repeat(MAX_DEPTH + 1);
    assert_eq!(to_value(&deep), Err(YamlError::TooDeep { line: 1 }));
    let mut block = String::new();
    for i in 0..=MAX_DEPTH {
        block.push_str(&format!("{}k:\n", " ".repeat(i)));
    }
    block.push_str(&format!("{}v: 1\n", " ".repeat(MAX_DEPTH + 1)));
    assert!(matches!(to_value(&block), Err(YamlError::TooDeep { .. })));
}

#[test]
fn syntax_errors_name_the_line() {
    match to_value("a: [1, 2\nb: 3\n") {
        Err(YamlError::Syntax(m)) => assert!(m.contains("line"), "{m}"),
        other => unreachable!("{other:?}"),
    }
}

/// A 250 KB document of nested flow collections is refused at the depth bound, while the scan
/// is still shallow (the time is measured in docs/benchmarks.md, not asserted here).
#[test]
fn deep_flow_nesting_is_refused() {
    let n = 250_000 / 4;
    let text = "{a: ".repeat(n) + &"}".repeat(n);
    assert!(matches!(to_value(&text), Err(YamlError::TooDeep { .. })));
}

/// YAML 1.2 scalars, as specs have always been read: `yes`/`on`/`0755`/`1_000` stay text,
/// `true`/numbers/`~` are typed, and a key given twice is an error, not a silent overwrite.
#[test]
fn scalars_are_read_as_yaml_1_2_and_duplicate_keys_are_refused() {
    let value =
        to_value("a: yes\nb: on\nc: 0755\nd: 1_000\ne: true\nf: 1.5\ng: ~\nh: 12\n").unwrap();
    assert_eq!(
        value,
        serde_json::json!({"a": "yes", "b": "on", "c": "0755", "d": "1_000", "e": true,
            "f": 1.5, "g": null, "h": 12})
    );
    assert!(matches!(
        to_value("a: 1\nb: 2\na: 3\n"),
        Err(YamlError::Syntax(_))
    ));
}
