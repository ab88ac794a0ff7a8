//! Readers of the Prometheus exposition formats, as Envoy's `/stats/prometheus` writes them:
//! the text format (here) and the protobuf format ([`protobuf`]), which Envoy writes when asked
//! for it and which is a third of the size.
//!
//! Text format: only what the sources need: sample lines `name{label="value",...} value
//! [timestamp]`; `# HELP` / `# TYPE` comments and blank lines are skipped. Label values are
//! unescaped (`\\`, `\"`, `\n`). A malformed line is an error naming its line number, never
//! skipped: a source that silently dropped samples would look like "no traffic" to the judge.

use std::collections::BTreeMap;

use super::series::{self, Slot, Slots};

pub mod protobuf;

/// An exposition format a proxy can be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Protobuf,
}

impl Format {
    /// The `Accept` header asking for this format, the other one second (Envoy answers with
    /// the first type it can write, and versions without protobuf support write text).
    pub fn accept(self) -> &'static str {
        match self {
            Format::Protobuf => {
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,text/plain;version=0.0.4"
            }
            Format::Text => "text/plain;version=0.0.4",
        }
    }

    /// The format of an answer with this `Content-Type`.
    pub fn of_content_type(content_type: &str) -> Format {
        if content_type.starts_with("application/vnd.google.protobuf") {
            Format::Protobuf
        } else {
            Format::Text
        }
    }
}

/// Bounds on what one answer may make a reader hold or do (the source's `limits`; see
/// [`crate::source::Limits`]). Past one, reading stops with an error naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Longest text line (text format) and, in the protobuf format, largest metric family.
    pub line_bytes: usize,
    /// Largest answer.
    pub body_bytes: u64,
    /// Most `sluice_` samples in one answer, kept or not.
    pub series: usize,
}

impl Default for Caps {
    fn default() -> Caps {
        crate::source::Limits::default().caps()
    }
}

/// Gauges of the proxy's own, read along with the filter's series: they tell one Envoy
/// process from another (see [`crate::source::Identity`]).
pub const UPTIME: &str = "envoy_server_uptime";
pub const HOT_RESTART_EPOCH: &str = "envoy_server_hot_restart_epoch";

/// What a reader saw besides the samples it handed on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Samples handed on.
    pub kept: usize,
    /// `sluice_` samples without `experiment`/`variant` labels (see
    /// [`series::Admission::Unlabelled`]).
    pub unlabelled: usize,
    /// `sluice_` samples of other experiments or unknown variants, not kept.
    pub unknown: usize,
    /// [`UPTIME`], if the answer had it.
    pub uptime: Option<f64>,
    /// [`HOT_RESTART_EPOCH`], if the answer had it.
    pub hot_restart_epoch: Option<f64>,
    /// Bytes read.
    pub bytes: u64,
}

impl Tally {
    /// Counts a `sluice_` sample against `caps.series`.
    #[inline]
    fn series(&self, caps: &Caps) -> Result<(), Malformed> {
        if self.kept + self.unlabelled + self.unknown >= caps.series {
            return Err(Malformed::TooManySeries(caps.series));
        }
        Ok(())
    }

    /// Counts `n` more bytes against `caps.body_bytes`.
    #[inline]
    fn bytes(&mut self, n: usize, caps: &Caps) -> Result<(), ParseError> {
        self.bytes += n as u64;
        if self.bytes > caps.body_bytes {
            return Err(ParseError {
                at: "the answer".into(),
                reason: Malformed::BodyTooLong(caps.body_bytes),
            });
        }
        Ok(())
    }

    /// Notes an identity gauge `name` (see [`UPTIME`]); whether it was one.
    fn identity(&mut self, name: &[u8], value: f64) -> bool {
        let slot = if name == UPTIME.as_bytes() {
            &mut self.uptime
        } else if name == HOT_RESTART_EPOCH.as_bytes() {
            &mut self.hot_restart_epoch
        } else {
            return false;
        };
        if value.is_finite() {
            *slot = Some(value);
        }
        true
    }
}

/// A reader of either format, fed an answer as it arrives.
pub enum AnyReader<'a> {
    Text(Reader<'a>),
    Protobuf(protobuf::Reader<'a>),
}

impl<'a> AnyReader<'a> {
    /// A reader keeping every series, within the default [`Caps`].
    pub fn new(format: Format, prefix: &'a str, slots: &'a mut Slots) -> AnyReader<'a> {
        AnyReader::with(format, prefix, slots, Caps::default(), &series::admit_all)
    }

    /// A reader keeping the new series `admit` keeps, within `caps`.
    pub fn with(
        format: Format,
        prefix: &'a str,
        slots: &'a mut Slots,
        caps: Caps,
        admit: series::Admit<'a>,
    ) -> AnyReader<'a> {
        match format {
            Format::Text => AnyReader::Text(Reader::with(prefix, slots, caps, admit)),
            Format::Protobuf => {
                AnyReader::Protobuf(protobuf::Reader::with(prefix, slots, caps, admit))
            }
        }
    }

    pub fn feed(
        &mut self,
        chunk: &[u8],
        each: &mut impl FnMut(&Slot, f64),
    ) -> Result<(), ParseError> {
        match self {
            AnyReader::Text(r) => r.feed(chunk, each),
            AnyReader::Protobuf(r) => r.feed(chunk, each),
        }
    }

    /// Reads what is left; what the answer held besides the samples handed on.
    pub fn finish(self, each: &mut impl FnMut(&Slot, f64)) -> Result<Tally, ParseError> {
        match self {
            AnyReader::Text(r) => r.finish(each),
            AnyReader::Protobuf(r) => r.finish(each),
        }
    }
}

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

    /// The identity of this sample's series (origin labels dropped).
    pub fn key(&self) -> series::SeriesKey {
        series::SeriesKey::new(
            self.name.clone(),
            self.labels.iter().map(|(k, v)| (k.clone(), v.clone())),
        )
    }
}

/// The slot of series text `text` (`name` or `name{labels}`, exactly as written before the
/// value). Text seen before is a hash lookup; new text is parsed (an error says what is
/// wrong with it) and interned.
pub fn slot(text: &str) -> Result<Slot, Malformed> {
    match admitted_slot(text, &series::admit_all)? {
        Ok(slot) => Ok(slot),
        Err(_) => Err(Malformed::NotAdmitted),
    }
}

/// [`slot`] for text that `admit` accepts; `Ok(Err(why))` when it does not (the text is
/// then not interned).
pub fn admitted_slot(
    text: &str,
    admit: series::Admit<'_>,
) -> Result<Result<Slot, series::Admission>, Malformed> {
    series::slot_of(text.as_bytes(), 0, admit, || {
        parse_series(text).map(|s| s.key())
    })
}

/// A malformed exposition: where (`line 3`, `metric family 2 (name)`) and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct ParseError {
    pub at: String,
    pub reason: Malformed,
}

/// What is wrong with an exposition, a sample or a series in it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    #[error("over {0} bytes (limit `maxBodyBytes`)")]
    BodyTooLong(u64),
    #[error("over {0} bytes (limit `maxLineBytes`)")]
    LineTooLong(usize),
    #[error("over {0} series in one answer (limit `maxSeries`)")]
    TooManySeries(usize),
    #[error("not UTF-8: {0}")]
    LineNotUtf8(std::str::Utf8Error),
    #[error("not UTF-8: not an exposition")]
    NotUtf8,
    /// A line of another metric that is not a sample at all; `start` is its beginning.
    #[error("not a Prometheus sample ({why}): {start:?}")]
    NotSample { why: Box<Malformed>, start: String },
    #[error("no metric name")]
    NoMetricName,
    #[error("sample has no value")]
    NoValue,
    #[error("{0}: missing value")]
    MissingValue(String),
    #[error("{series}: invalid value {value:?}")]
    InvalidValue { series: String, value: String },
    #[error("{series}: value {value} is not a count")]
    SeriesNotCount { series: String, value: f64 },
    #[error("a sample's value {0} is not a count")]
    NotCount(f64),
    #[error("invalid metric name {0:?}")]
    InvalidName(String),
    #[error("unterminated label value")]
    UnterminatedLabelValue,
    #[error("expected `name=\"value\"` or `}}` in the label set")]
    ExpectedLabel,
    #[error("unterminated label set")]
    UnterminatedLabelSet,
    #[error("label {0:?}: value is not quoted")]
    Unquoted(String),
    #[error("label {0:?}: unterminated value")]
    UnterminatedValue(String),
    #[error("{name}: unexpected {rest:?} after the label set")]
    AfterLabels { name: String, rest: String },
    #[error("not admitted")]
    NotAdmitted,
    #[error(transparent)]
    Intern(#[from] series::InternError),
    /// Protobuf: a field or length prefix that cannot be decoded.
    #[error("{0}")]
    Wire(&'static str),
    #[error("metric type {0} is not read")]
    MetricType(u64),
    /// Protobuf: a name or label that should be text is not.
    #[error("{0} is not UTF-8")]
    FieldNotUtf8(&'static str),
    #[error("length {len} is over the limit of {most} bytes (`maxLineBytes`, at least {least})")]
    FamilyTooLong { len: u64, most: usize, least: usize },
    #[error("the answer ends inside it ({0} bytes of it arrived)")]
    EndsInside(usize),
}

impl From<&'static str> for Malformed {
    fn from(wire: &'static str) -> Malformed {
        Malformed::Wire(wire)
    }
}

/// Parses a whole exposition. Only samples whose name starts with `prefix` are kept (pass ""
/// for all), which keeps scrapes of a busy Envoy cheap.
pub fn parse(text: &str, prefix: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in sample_lines(text, prefix) {
        let at = |reason| ParseError {
            at: format!("line {}", i + 1),
            reason,
        };
        let end = series_end(line).map_err(at)?;
        let mut sample = parse_series(&line[..end]).map_err(at)?;
        sample.value = value_after(sample.name.as_bytes(), &line.as_bytes()[end..]).map_err(at)?;
        out.push(sample);
    }
    Ok(out)
}

/// Reads the samples of `text` whose name starts with `prefix`, handing each one's series
/// slot and value to `each`; see [`Reader`].
pub fn read(
    text: &str,
    prefix: &str,
    slots: &mut Slots,
    mut each: impl FnMut(&Slot, f64),
) -> Result<(), ParseError> {
    let mut reader = Reader::new(prefix, slots);
    reader.feed(text.as_bytes(), &mut each)?;
    reader.finish(&mut each).map(|_| ())
}

/// Reads an exposition as it arrives, in chunks cut anywhere, handing each sample's series
/// slot and value on, without allocating for series seen before.
///
/// `slots` is what the previous reading of the same origin left (start with an empty vector):
/// the slots of that exposition's samples in order. A proxy writes its series in the same
/// order every time, so a line is first compared with the slot at its position; only a line
/// that differs (a new series, or one that moved) is looked up in the process-wide table, and
/// only text never seen before is parsed. After [`Reader::finish`], `slots` describes this
/// exposition.
pub struct Reader<'a> {
    prefix: &'a [u8],
    slots: &'a mut Slots,
    caps: Caps,
    admit: series::Admit<'a>,
    tally: Tally,
    /// Samples read so far (the next slot position).
    n: usize,
    /// Lines read so far.
    line: usize,
    /// The start of a line cut by the end of the last chunk.
    carry: Vec<u8>,
}

impl<'a> Reader<'a> {
    /// A reader keeping every series, within the default [`Caps`].
    pub fn new(prefix: &'a str, slots: &'a mut Slots) -> Reader<'a> {
        Reader::with(prefix, slots, Caps::default(), &series::admit_all)
    }

    /// A reader keeping the new series `admit` keeps, within `caps`.
    pub fn with(
        prefix: &'a str,
        slots: &'a mut Slots,
        caps: Caps,
        admit: series::Admit<'a>,
    ) -> Reader<'a> {
        Reader {
            prefix: prefix.as_bytes(),
            slots,
            caps,
            admit,
            tally: Tally::default(),
            n: 0,
            line: 0,
            carry: Vec::new(),
        }
    }

    /// Reads the next chunk.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        each: &mut impl FnMut(&Slot, f64),
    ) -> Result<(), ParseError> {
        self.tally.bytes(chunk.len(), &self.caps)?;
        if !self.carry.is_empty() {
            let Some(end) = memchr::memchr(b'\n', chunk) else {
                self.carry.extend_from_slice(chunk);
                return self.check_carry();
            };
            let mut line = std::mem::take(&mut self.carry);
            line.extend_from_slice(&chunk[..end]);
            self.line(&line, each)?;
            line.clear();
            self.carry = line;
            chunk = &chunk[end + 1..];
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', chunk) {
            self.line(&chunk[start..end], each)?;
            start = end + 1;
        }
        self.carry.extend_from_slice(&chunk[start..]);
        self.check_carry()
    }

    /// A line cut by a chunk's end may not grow past the cap either.
    fn check_carry(&self) -> Result<(), ParseError> {
        if self.carry.len() > self.caps.line_bytes {
            return Err(self.too_long(self.line + 1));
        }
        Ok(())
    }

    fn too_long(&self, line: usize) -> ParseError {
        ParseError {
            at: format!("line {line}"),
            reason: Malformed::LineTooLong(self.caps.line_bytes),
        }
    }

    /// Reads what is left (a last line without a newline); what the answer held besides the
    /// samples handed on.
    pub fn finish(mut self, each: &mut impl FnMut(&Slot, f64)) -> Result<Tally, ParseError> {
        let line = std::mem::take(&mut self.carry);
        self.line(&line, each)?;
        self.slots.truncate(self.n);
        Ok(self.tally)
    }

    fn line(&mut self, raw: &[u8], each: &mut impl FnMut(&Slot, f64)) -> Result<(), ParseError> {
        self.line += 1;
        if raw.len() > self.caps.line_bytes {
            return Err(self.too_long(self.line));
        }
        let line = raw.trim_ascii();
        if line.is_empty() || line[0] == b'#' {
            return Ok(());
        }
        let number = self.line;
        let at = |reason| ParseError {
            at: format!("line {number}"),
            reason,
        };
        if !line.starts_with(self.prefix) {
            return self.other_line(line).map_err(at);
        }
        self.tally.series(&self.caps).map_err(at)?;
        let known = self.slots.get(self.n).is_some_and(|s| {
            let t = &*s.text;
            line.len() > t.len() && line[t.len()].is_ascii_whitespace() && line.starts_with(t)
        });
        if !known {
            let line = std::str::from_utf8(line).map_err(|e| at(Malformed::LineNotUtf8(e)))?;
            let end = series_end(line).map_err(at)?;
            match admitted_slot(&line[..end], self.admit).map_err(at)? {
                Ok(slot) => self.slots.put(self.n, slot),
                Err(why) => {
                    // Not kept: still a sample, so its value must be one.
                    value_after(&line.as_bytes()[..end], &line.as_bytes()[end..]).map_err(at)?;
                    match why {
                        series::Admission::Unlabelled => self.tally.unlabelled += 1,
                        _ => self.tally.unknown += 1,
                    }
                    return Ok(());
                }
            }
        }
        let slot = &self.slots[self.n];
        let value = value_after(&slot.text, &line[slot.text.len()..]).map_err(at)?;
        if !value.is_finite() {
            return Err(at(Malformed::SeriesNotCount {
                series: String::from_utf8_lossy(&slot.text).into_owned(),
                value,
            }));
        }
        each(slot, value);
        self.tally.kept += 1;
        self.n += 1;
        Ok(())
    }

    /// A line of another metric than the prefix's: an identity gauge is noted, anything else
    /// skipped, but only if it is a sample at all (an HTML page or other text answered with
    /// status 200 must not read as an exposition without series).
    fn other_line(&mut self, line: &[u8]) -> Result<(), Malformed> {
        let text = std::str::from_utf8(line).map_err(|_| Malformed::NotUtf8)?;
        let not_sample = |e: Malformed| Malformed::NotSample {
            why: Box::new(e),
            start: text.chars().take(40).collect(),
        };
        let end = series_end(text).map_err(not_sample)?;
        let name_end = text.find('{').unwrap_or(end).min(end);
        let name = &text[..name_end];
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        {
            return Err(not_sample(Malformed::NoMetricName));
        }
        let value = value_after(name.as_bytes(), &line[end..]).map_err(not_sample)?;
        self.tally.identity(name.as_bytes(), value);
        Ok(())
    }
}

/// Sample lines (numbered from 0, trimmed) whose name starts with `prefix`; `# HELP` / `# TYPE`
/// and blank lines are skipped.
fn sample_lines<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = (usize, &'a str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, raw)| (i, raw.trim()))
        .filter(move |(_, l)| !l.is_empty() && !l.starts_with('#') && l.starts_with(prefix))
}

/// The value token after series text `name`: `value [timestamp]`.
fn value_after(name: &[u8], rest: &[u8]) -> Result<f64, Malformed> {
    let rest = rest.trim_ascii_start();
    // Counters are integers: read them in the same pass that finds the token's end (exact up
    // to 15 digits, below 2^53), and leave anything else to the general parser.
    let mut n = 0u64;
    let mut i = 0;
    while i < rest.len() && i < 16 && rest[i].is_ascii_digit() {
        n = n * 10 + u64::from(rest[i] - b'0');
        i += 1;
    }
    if i > 0 && i <= 15 && rest.get(i).is_none_or(u8::is_ascii_whitespace) {
        return Ok(n as f64);
    }
    let end = rest
        .iter()
        .position(u8::is_ascii_whitespace)
        .unwrap_or(rest.len());
    let token = &rest[..end];
    let name = String::from_utf8_lossy(name);
    if token.is_empty() {
        return Err(Malformed::MissingValue(name.into_owned()));
    }
    let v = String::from_utf8_lossy(token);
    parse_value(&v).ok_or_else(|| Malformed::InvalidValue {
        series: name.into_owned(),
        value: v.into_owned(),
    })
}

/// Where a line's series text (`name` or `name{labels}`) ends. Label values are quoted
/// strings and may hold `}` or spaces.
fn series_end(line: &str) -> Result<usize, Malformed> {
    let b = line.as_bytes();
    let name_end = b
        .iter()
        .position(|&c| c == b'{' || c.is_ascii_whitespace())
        .ok_or(Malformed::NoValue)?;
    if b[name_end] != b'{' {
        return Ok(name_end);
    }
    let mut quoted = false;
    let mut i = name_end + 1;
    while i < b.len() {
        match (quoted, b[i]) {
            (true, b'\\') => i += 1,
            (_, b'"') => quoted = !quoted,
            (false, b'}') => return Ok(i + 1),
            _ => {}
        }
        i += 1;
    }
    Err(if quoted {
        Malformed::UnterminatedLabelValue
    } else {
        Malformed::ExpectedLabel
    })
}

/// Parses series text, `name` or `name{label="value",...}`, into a sample with value 0.
pub fn parse_series(text: &str) -> Result<Sample, Malformed> {
    let name_end = text.find('{').unwrap_or(text.len());
    let name = &text[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(Malformed::InvalidName(name.to_string()));
    }
    let mut labels = BTreeMap::new();
    if name_end < text.len() {
        let (parsed, rest) = parse_labels(&text[name_end + 1..])?;
        if !rest.trim().is_empty() {
            return Err(Malformed::AfterLabels {
                name: name.to_string(),
                rest: rest.to_string(),
            });
        }
        labels = parsed;
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: 0.0,
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
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), Malformed> {
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
            return Err(Malformed::UnterminatedLabelSet);
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
            return Err(Malformed::ExpectedLabel);
        }
        let key = s[start..key_end].trim().to_string();
        if !matches!(chars.next(), Some((_, '"'))) {
            return Err(Malformed::Unquoted(key));
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
            return Err(Malformed::UnterminatedValue(key));
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
            ("a{x=\"1", "line 1: unterminated label value"),
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

    /// (name, variant label, value) of every sample `read` hands over.
    fn read_all(text: &str, slots: &mut Slots) -> Result<Vec<(String, String, f64)>, ParseError> {
        let mut out = Vec::new();
        read(text, "", slots, |slot, v| {
            let key = series::key(slot.id);
            let name = key.as_ref().map_or(String::new(), |k| k.name.clone());
            let variant = key.and_then(|k| k.label("variant").map(str::to_string));
            out.push((name, variant.unwrap_or_default(), v));
        })?;
        Ok(out)
    }

    #[test]
    fn read_agrees_with_parse_and_follows_changes() {
        let mut slots = Slots::default();
        let first = read_all(ENVOY, &mut slots);
        let parsed: Vec<_> = parse(ENVOY, "")
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.label("variant").unwrap_or("").to_string(),
                    s.value,
                )
            })
            .collect();
        assert_eq!(first.as_ref().ok(), Some(&parsed));
        assert_eq!(slots.len(), 7);
        // Chunks cut anywhere read the same.
        for cut in 0..ENVOY.len() {
            let (mut got, mut fresh) = (Vec::new(), Slots::default());
            let mut reader = Reader::new("", &mut fresh);
            let mut each = |slot: &Slot, v: f64| got.push((slot.id, v));
            let (head, tail) = ENVOY.as_bytes().split_at(cut);
            let done = reader
                .feed(head, &mut each)
                .and_then(|()| reader.feed(tail, &mut each))
                .and_then(|()| reader.finish(&mut each));
            assert!(done.is_ok(), "cut at {cut}: {done:?}");
            let want: Vec<_> = slots
                .iter()
                .map(|s| s.id)
                .zip(parsed.iter().map(|p| p.2))
                .collect();
            assert_eq!(got, want, "cut at {cut}");
        }
        let again = ENVOY.replace("} 17", "} 18");
        let second = read_all(&again, &mut slots).unwrap_or_default();
        assert_eq!(
            second[1],
            ("sluice_requests_total".into(), "stable".into(), 18.0)
        );
        // A series added in front moves every line: each is still named right.
        let moved = format!("read_test_new{{variant=\"v\"}} 1\n{again}");
        let third = read_all(&moved, &mut slots).unwrap_or_default();
        assert_eq!(third.len(), 8);
        assert_eq!(third[0], ("read_test_new".into(), "v".into(), 1.0));
        assert_eq!(
            third[2],
            ("sluice_requests_total".into(), "stable".into(), 18.0)
        );
        // Fewer lines: the slots shrink with them; timestamps and `}` or spaces in values.
        let odd = "read_test_odd{variant=\"} x\"} 4 1700000000000\nread_test_odd 5\n";
        let fourth = read_all(odd, &mut slots).unwrap_or_default();
        assert_eq!(
            fourth,
            [
                ("read_test_odd".into(), "} x".into(), 4.0),
                ("read_test_odd".into(), String::new(), 5.0)
            ]
        );
        assert_eq!(slots.len(), 2);
        let bad = read_all(
            "read_test_odd 5\nread_test_odd{variant=\"v} 1\n",
            &mut slots,
        );
        assert_eq!(
            bad.map_err(|e| e.to_string()),
            Err("line 2: unterminated label value".into())
        );
    }

    #[test]
    fn origins_writing_the_same_series_share_one_slot_table() {
        let mut tables = series::SlotTables::default();
        let (mut a, mut b) = (Slots::default(), Slots::default());
        let mut read_into = |text: &str, slots: &mut Slots| {
            let values = read_all(text, slots).map(|v| v.iter().map(|s| s.2).collect::<Vec<_>>());
            tables.share(slots);
            values.unwrap_or_default()
        };
        let again = ENVOY.replace("} 17", "} 18");
        read_into(ENVOY, &mut a);
        read_into(&again, &mut b);
        assert!(a.shares(&b), "same series, other values: one table");
        assert_eq!(a.len(), 7);

        // One origin's series move: it reads them right into a table of its own, and the
        // other origin's table is as it was.
        let moved = format!("read_test_share{{variant=\"v\"}} 1\n{again}");
        let values = read_into(&moved, &mut b);
        assert_eq!((values.len(), values[0], values[2]), (8, 1.0, 18.0));
        assert!(!a.shares(&b));
        assert_eq!((a.len(), b.len()), (7, 8));
        let values = read_into(ENVOY, &mut a);
        assert_eq!((values.len(), values[1]), (7, 17.0));

        // Back to the same series: shared again.
        read_into(&again, &mut b);
        assert!(a.shares(&b));
    }

    #[test]
    fn the_proxys_identity_gauges_are_noted_and_other_text_is_refused() {
        let text = "# TYPE envoy_server_uptime gauge\nenvoy_server_uptime{} 12\nenvoy_server_hot_restart_epoch 1\nsluice_requests_total{experiment=\"id\",variant=\"a\"} 3\n";
        let mut slots = Slots::default();
        let mut reader = Reader::new("sluice_", &mut slots);
        let mut seen = Vec::new();
        let mut each = |_: &Slot, v: f64| seen.push(v);
        let fed = reader.feed(text.as_bytes(), &mut each);
        let tally = fed.and_then(|()| reader.finish(&mut each));
        let Ok(tally) = tally else {
            panic!("{tally:?}");
        };
        assert_eq!(
            (tally.uptime, tally.hot_restart_epoch),
            (Some(12.0), Some(1.0))
        );
        assert_eq!((tally.kept, seen), (1, vec![3.0]));
        for bad in ["<!DOCTYPE html>", "hello world", "{\"status\":\"ok\"}"] {
            let mut slots = Slots::default();
            let got = read(bad, "sluice_", &mut slots, |_, _| {}).map_err(|e| e.to_string());
            assert!(
                matches!(&got, Err(e) if e.contains("not a Prometheus sample")),
                "{bad}: {got:?}"
            );
        }
    }
}
