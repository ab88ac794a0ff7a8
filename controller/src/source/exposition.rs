//! Parser for the Prometheus text exposition format, as Envoy's `/stats/prometheus` writes it.
//!
//! Only what the sources need: sample lines `name{label="value",...} value [timestamp]`;
//! `# HELP` / `# TYPE` comments and blank lines are skipped. Label values are unescaped
//! (`\\`, `\"`, `\n`). A malformed line is an error naming its line number, never skipped:
//! a source that silently dropped samples would look like "no traffic" to the judge.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A malformed exposition line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Parses a whole exposition. Only samples whose name starts with `prefix` are kept (pass ""
/// for all), which keeps scrapes of a busy Envoy cheap.
pub fn parse(text: &str, prefix: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || !line.starts_with(prefix) {
            continue;
        }
        out.push(parse_line(line).map_err(|reason| ParseError {
            line: i + 1,
            reason,
        })?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| "sample has no value".to_string())?;
    let name = &line[..name_end];
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("{name}: missing value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: invalid value {value:?}"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices().peekable();
    loop {
        // Skip separators.
        while let Some((_, c)) = chars.peek() {
            if *c == ',' || c.is_whitespace() {
                chars.next();
            } else {
                break;
            }
        }
        let Some((start, c)) = chars.next() else {
            return Err("unterminated label set".into());
        };
        if c == '}' {
            return Ok((labels, &s[start + 1..]));
        }
        let mut key_end = start;
        let mut eq = false;
        for (i, c) in chars.by_ref() {
            if c == '=' {
                key_end = i;
                eq = true;
                break;
            }
        }
        if !eq {
            return Err("expected `name=\"value\"` or `}` in the label set".into());
        }
        let key = s[start..key_end].trim().to_string();
        if !matches!(chars.next(), Some((_, '"'))) {
            return Err(format!("label {key:?}: value is not quoted"));
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some((_, c)) = chars.next() {
            match c {
                '"' => {
                    closed = true;
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                other => value.push(other),
            }
        }
        if !closed {
            return Err(format!("label {key:?}: unterminated value"));
        }
        labels.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVOY: &str = r#"# TYPE sluice_requests_total counter
sluice_requests_total{experiment="demo",variant="canary"} 3
sluice_requests_total{experiment="demo",variant="stable"} 17

# TYPE sluice_latency_ms histogram
sluice_latency_ms_bucket{experiment="demo",variant="canary",le="0.5"} 0
sluice_latency_ms_bucket{experiment="demo",variant="canary",le="+Inf"} 3
sluice_latency_ms_sum{experiment="demo",variant="canary"} 3.1428571428571432377907513000537
envoy_cluster_upstream_rq{envoy_cluster_name="stable"} 9
odd{a="x\"y\\z\n",b=""} 1.5e3 1700000000000
"#;

    #[test]
    fn parses_envoy_output() {
        let all = parse(ENVOY, "").unwrap_or_default();
        assert_eq!(all.len(), 7);
        assert_eq!(all[0].name, "sluice_requests_total");
        assert_eq!(all[0].label("variant"), Some("canary"));
        assert_eq!(all[1].value, 17.0);
        assert_eq!(all[3].label("le"), Some("+Inf"));
        assert!((all[4].value - 3.142857).abs() < 1e-5);
        assert_eq!(all[6].label("a"), Some("x\"y\\z\n"));
        assert_eq!(all[6].label("b"), Some(""));
        assert_eq!(all[6].value, 1500.0);
    }

    #[test]
    fn prefix_filters() {
        let s = parse(ENVOY, "sluice_").unwrap_or_default();
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        for (text, want) in [
            ("a{x=\"1\" 3", "line 1: expected `name=\"value\"` or `}`"),
            ("a{x=\"1", "line 1: label \"x\": unterminated"),
            ("\nb{x=1} 3", "line 2: label \"x\": value is not quoted"),
            ("c 1 2\nc", "line 2: sample has no value"),
            ("d{} abc", "line 1: d: invalid value \"abc\""),
        ] {
            let got = parse(text, "").map(|_| ()).map_err(|e| e.to_string());
            assert!(
                matches!(&got, Err(e) if e.starts_with(want)),
                "{text:?}: {got:?}"
            );
        }
    }
}
