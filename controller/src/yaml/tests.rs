use super::*;

#[test]
fn a_byte_order_mark_is_dropped() {
    let value = to_value("\u{feff}a: 1\nb: [x]\n").unwrap_or_else(|e| unreachable!("{e}"));
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
fn syntax_errors_come_from_serde_yaml() {
    match to_value("a: [1, 2\nb: 3\n") {
        Err(YamlError::Syntax(m)) => assert!(m.contains("line"), "{m}"),
        other => unreachable!("{other:?}"),
    }
}

/// Deeply nested flow collections cost libyaml time quadratic in their depth: a 250 KB
/// document of them is refused at the depth bound, before serde_yaml reads it (the time is
/// measured in docs/benchmarks.md, not asserted here).
#[test]
fn deep_flow_nesting_is_refused() {
    let n = 250_000 / 4;
    let text = "{a: ".repeat(n) + &"}".repeat(n);
    assert!(matches!(to_value(&text), Err(YamlError::TooDeep { .. })));
}
