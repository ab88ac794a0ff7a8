//! Reader of the Prometheus protobuf exposition format, as Envoy's `/stats/prometheus` writes
//! it when asked for `application/vnd.google.protobuf` (Envoy 1.40 does; older versions
//! answer in text). The same samples take about a third of the text format's bytes, because a
//! histogram's labels are written once rather than once per bucket.
//!
//! An answer is a stream of `io.prometheus.client.MetricFamily` messages, each preceded by its
//! length as a varint. The fields read (numbers from Prometheus' `metrics.proto`):
//!
//! | message | fields |
//! |---|---|
//! | `MetricFamily` | `name` 1, `type` 3 (counter 0, gauge 1, summary 2, untyped 3, histogram 4), `metric` 4 |
//! | `Metric` | `label` 1 (`LabelPair`: `name` 1, `value` 2), `gauge` 2, `counter` 3, `summary` 4, `untyped` 5 (each with `value` 1), `histogram` 7 |
//! | `Histogram` | `sample_count` 1 (or `sample_count_float` 4), `sample_sum` 2, `bucket` 3 (`cumulative_count` 1 or `cumulative_count_float` 4, `upper_bound` 2) |
//! | `Summary` | `sample_count` 1, `sample_sum` 2, `quantile` 3 (`quantile` 1, `value` 2) |
//!
//! Everything else (help, unit, timestamps, exemplars, native-histogram buckets) is skipped.
//! Each metric becomes the samples the text format would have, with the same series names and
//! labels: one sample for a counter, gauge or untyped metric; `_bucket` (label `le`) for each
//! finite bound, `_sum` and `_count` for a histogram (the `+Inf` bucket only repeats
//! `_count`, and is left out); the quantiles (label `quantile`), `_sum` and `_count` for a
//! summary. A malformed message is an error naming its family, never skipped.

use super::{Caps, Malformed, ParseError, Tally};
use crate::source::series::{self, Admission, GroupId, SeriesKey, Slot, Slots, NO_GROUP};

/// Largest metric family read: a bound on what one answer can make the reader hold.
const MAX_FAMILY: usize = 64 << 20;

/// A metric family holds every series of one metric, so it may be far longer than a text
/// line: `maxLineBytes` bounds it, but never below this.
const MIN_FAMILY_CAP: usize = 4 << 20;

/// Reads a protobuf exposition as it arrives, in chunks cut anywhere, like the text format's
/// [`super::Reader`]: each sample is first compared with the slot the same position had in
/// the last answer (its family name and encoded labels), and only a sample never seen before
/// is decoded into a series identity.
pub struct Reader<'a> {
    prefix: &'a [u8],
    slots: &'a mut Slots,
    caps: Caps,
    admit: series::Admit<'a>,
    tally: Tally,
    /// Samples read so far (the next slot position).
    n: usize,
    /// Metric families read so far.
    families: usize,
    /// The start of a family cut by the end of the last chunk.
    carry: Vec<u8>,
    /// The slot text of the sample being read: see [`Reader::metric`].
    key: Vec<u8>,
    /// The group of the metric being read (its family name and labels), once one of its
    /// samples matched a slot.
    group: Option<GroupId>,
}

/// How a metric's value fields become samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Counter, gauge or untyped: one sample.
    Single,
    Histogram,
    Summary,
}

/// Which sample of a metric a slot is, the last byte of its slot text before any bound.
const SINGLE: u8 = b'v';
const BUCKET: u8 = b'b';
const QUANTILE: u8 = b'q';
const SUM: u8 = b's';
const COUNT: u8 = b'c';

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
            families: 0,
            carry: Vec::new(),
            key: Vec::new(),
            group: None,
        }
    }

    /// Reads the next chunk.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        each: &mut impl FnMut(&Slot, f64),
    ) -> Result<(), ParseError> {
        self.tally.bytes(chunk.len(), &self.caps)?;
        // First complete the family the last chunk cut.
        while !self.carry.is_empty() && !chunk.is_empty() {
            match self.frame(&self.carry)? {
                None => {
                    self.carry.push(chunk[0]);
                    chunk = &chunk[1..];
                }
                Some((head, len)) => {
                    let take = (head + len - self.carry.len()).min(chunk.len());
                    self.carry.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.carry.len() == head + len {
                        let family = std::mem::take(&mut self.carry);
                        self.family(&family[head..], each)?;
                        self.carry = family;
                        self.carry.clear();
                    }
                }
            }
        }
        while let Some((head, len)) = self.frame(chunk)? {
            if chunk.len() < head + len {
                break;
            }
            self.family(&chunk[head..head + len], each)?;
            chunk = &chunk[head + len..];
        }
        self.carry.extend_from_slice(chunk);
        Ok(())
    }

    /// Checks that the answer ended between families; what the answer held besides the
    /// samples handed on.
    pub fn finish(self, _each: &mut impl FnMut(&Slot, f64)) -> Result<Tally, ParseError> {
        if !self.carry.is_empty() {
            return Err(ParseError {
                at: format!("metric family {}", self.families + 1),
                reason: Malformed::EndsInside(self.carry.len()),
            });
        }
        self.slots.truncate(self.n);
        Ok(self.tally)
    }

    /// The length prefix at the start of `buf`: its own size and the family's, or `None` if
    /// it is not complete yet.
    fn frame(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, ParseError> {
        let at = || format!("metric family {}", self.families + 1);
        let most = MAX_FAMILY.min(self.caps.line_bytes.max(MIN_FAMILY_CAP));
        match varint(buf) {
            Ok(Some((len, head))) => match usize::try_from(len) {
                Ok(len) if len <= most => Ok(Some((head, len))),
                _ => Err(ParseError {
                    at: at(),
                    reason: Malformed::FamilyTooLong {
                        len,
                        most,
                        least: MIN_FAMILY_CAP,
                    },
                }),
            },
            Ok(None) => Ok(None),
            Err(reason) => Err(ParseError {
                at: at(),
                reason: Malformed::Wire(reason),
            }),
        }
    }

    fn family(&mut self, msg: &[u8], each: &mut impl FnMut(&Slot, f64)) -> Result<(), ParseError> {
        self.families += 1;
        let mut name: &[u8] = &[];
        let mut kind = 0;
        let head = Fields::new(msg).try_for_each(|f| {
            match f? {
                (1, Wire::Bytes(b), _) => name = b,
                (3, Wire::Varint(v), _) => kind = v,
                _ => {}
            }
            Ok(())
        });
        let number = self.families;
        let at = |reason| ParseError {
            at: format!("metric family {number} ({})", String::from_utf8_lossy(name)),
            reason,
        };
        head.map_err(|e: WireError| at(Malformed::Wire(e)))?;
        if !name.starts_with(self.prefix) {
            if kind == 1
                && (name == super::UPTIME.as_bytes() || name == super::HOT_RESTART_EPOCH.as_bytes())
            {
                // The proxy's own gauges: one metric, no labels.
                for field in Fields::new(msg) {
                    if let (4, Wire::Bytes(metric), _) = field.map_err(|e| at(e.into()))? {
                        for f in Fields::new(metric) {
                            if let (2, Wire::Bytes(gauge), _) = f.map_err(|e| at(e.into()))? {
                                for g in Fields::new(gauge) {
                                    if let (1, Wire::Fixed64(bits), _) =
                                        g.map_err(|e| at(e.into()))?
                                    {
                                        self.tally.identity(name, f64::from_bits(bits));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            return Ok(());
        }
        let kind = match kind {
            0 | 1 | 3 => Kind::Single,
            2 => Kind::Summary,
            4 => Kind::Histogram,
            other => return Err(at(Malformed::MetricType(other))),
        };
        for field in Fields::new(msg) {
            if let (4, Wire::Bytes(metric), _) = field.map_err(|e| at(e.into()))? {
                self.metric(name, kind, metric, each).map_err(at)?;
            }
        }
        Ok(())
    }

    /// Reads one metric of family `name`.
    ///
    /// A sample's slot text is `0, name, 0, the metric's label fields as encoded, 0, which
    /// sample (a byte), and for a bucket or quantile its bound (8 bytes)`: equal for the same
    /// series in every answer of a proxy, and never equal to text-format series text (which
    /// cannot start with a zero byte). The part up to which sample is the slot's group, shared
    /// by the metric's samples: it is compared once per metric, not once per bucket.
    fn metric(
        &mut self,
        name: &[u8],
        kind: Kind,
        msg: &[u8],
        each: &mut impl FnMut(&Slot, f64),
    ) -> Result<(), Malformed> {
        self.key.clear();
        self.key.push(0);
        self.key.extend_from_slice(name);
        self.key.push(0);
        let mut value: &[u8] = &[];
        for field in Fields::new(msg) {
            match field? {
                (1, Wire::Bytes(_), raw) => self.key.extend_from_slice(raw),
                (2 | 3 | 5, Wire::Bytes(b), _) if kind == Kind::Single => value = b,
                (4, Wire::Bytes(b), _) if kind == Kind::Summary => value = b,
                (7, Wire::Bytes(b), _) if kind == Kind::Histogram => value = b,
                _ => {}
            }
        }
        self.key.push(0);
        let base = self.key.len();
        self.group = None;
        match kind {
            Kind::Single => {
                let mut v = 0.0;
                for field in Fields::new(value) {
                    if let (1, Wire::Fixed64(bits), _) = field? {
                        v = f64::from_bits(bits);
                    }
                }
                self.sample(base, SINGLE, None, v, each)
            }
            Kind::Histogram | Kind::Summary => {
                let (mut count, mut sum) = (0.0, 0.0);
                for field in Fields::new(value) {
                    match field? {
                        (1, Wire::Varint(n), _) => count = n as f64,
                        (4, Wire::Fixed64(bits), _) if kind == Kind::Histogram => {
                            count = f64::from_bits(bits)
                        }
                        (2, Wire::Fixed64(bits), _) => sum = f64::from_bits(bits),
                        (3, Wire::Bytes(point), _) => {
                            let (bound, v) = point_of(kind, point)?;
                            let which = if kind == Kind::Histogram {
                                BUCKET
                            } else {
                                QUANTILE
                            };
                            if bound.is_finite() {
                                self.sample(base, which, Some(bound), v, each)?;
                            }
                        }
                        _ => {}
                    }
                }
                self.sample(base, SUM, None, sum, each)?;
                self.sample(base, COUNT, None, count, each)
            }
        }
    }

    /// Hands on one sample of the metric whose slot text up to `base` is in `self.key`.
    fn sample(
        &mut self,
        base: usize,
        which: u8,
        bound: Option<f64>,
        value: f64,
        each: &mut impl FnMut(&Slot, f64),
    ) -> Result<(), Malformed> {
        self.tally.series(&self.caps)?;
        let bound = bound.map(|b| b.to_bits().to_le_bytes());
        let known = match (self.slots.get(self.n), self.group) {
            // The same group is the same bytes up to `base`.
            (Some(s), Some(group)) => s.group == group && ends_with(&s.text, base, which, bound),
            (Some(s), None) => {
                let same = s.text.get(..base) == Some(&self.key[..base])
                    && ends_with(&s.text, base, which, bound);
                if same && s.group != NO_GROUP {
                    self.group = Some(s.group);
                }
                same
            }
            (None, _) => false,
        };
        if !known {
            self.key.truncate(base);
            self.key.push(which);
            if let Some(b) = bound {
                self.key.extend_from_slice(&b);
            }
            let admit = self.admit;
            let slot =
                match series::slot_of(&self.key, base, admit, || series_key(&self.key, base))? {
                    Ok(slot) => slot,
                    Err(Admission::Unlabelled) => {
                        self.tally.unlabelled += 1;
                        return Ok(());
                    }
                    Err(_) => {
                        self.tally.unknown += 1;
                        return Ok(());
                    }
                };
            if slot.group != NO_GROUP {
                self.group = Some(slot.group);
            }
            self.slots.put(self.n, slot);
        }
        if !value.is_finite() {
            return Err(Malformed::NotCount(value));
        }
        each(&self.slots[self.n], value);
        self.tally.kept += 1;
        self.n += 1;
        Ok(())
    }
}

/// Whether slot text `text` is `which` (and `bound`) after its first `base` bytes.
#[inline]
fn ends_with(text: &[u8], base: usize, which: u8, bound: Option<[u8; 8]>) -> bool {
    match bound {
        None => text.len() == base + 1 && text[base] == which,
        // The bound as one 8-byte load and compare, not a call to `memcmp`.
        Some(b) => {
            text.len() == base + 9
                && text[base] == which
                && <[u8; 8]>::try_from(&text[base + 1..])
                    .is_ok_and(|t| u64::from_ne_bytes(t) == u64::from_ne_bytes(b))
        }
    }
}

/// A bucket's (upper bound, cumulative count) or a quantile's (quantile, value).
#[inline(always)]
fn point_of(kind: Kind, msg: &[u8]) -> Result<(f64, f64), WireError> {
    // A bucket as Envoy writes it — `cumulative_count` (field 1, varint), then `upper_bound`
    // (field 2, double), nothing else — is read without walking its fields one by one;
    // anything else takes the general walk below, which reads the same values.
    if let (Kind::Histogram, [0x08, rest @ ..]) = (kind, msg) {
        if let Ok(Some((count, n))) = varint(rest) {
            if let [0x11, bits @ ..] = &rest[n..] {
                if let Ok(bits) = <[u8; 8]>::try_from(bits) {
                    let bound = f64::from_bits(u64::from_le_bytes(bits));
                    if !bound.is_nan() {
                        return Ok((bound, count as f64));
                    }
                }
            }
        }
    }
    let (mut bound, mut v) = (f64::NAN, 0.0);
    for field in Fields::new(msg) {
        match (kind, field?) {
            (Kind::Histogram, (1, Wire::Varint(n), _)) => v = n as f64,
            (Kind::Histogram, (4, Wire::Fixed64(bits), _)) => v = f64::from_bits(bits),
            (Kind::Histogram, (2, Wire::Fixed64(bits), _)) => bound = f64::from_bits(bits),
            (Kind::Summary, (1, Wire::Fixed64(bits), _)) => bound = f64::from_bits(bits),
            (Kind::Summary, (2, Wire::Fixed64(bits), _)) => v = f64::from_bits(bits),
            _ => {}
        }
    }
    if bound.is_nan() {
        return Err("a bucket or quantile without its bound");
    }
    Ok((bound, v))
}

/// The series a slot text (see [`Reader::metric`]) stands for; `base` is where the sample's
/// part starts.
fn series_key(key: &[u8], base: usize) -> Result<SeriesKey, Malformed> {
    let utf8 = |b: &[u8], what: &'static str| {
        String::from_utf8(b.to_vec()).map_err(|_| Malformed::FieldNotUtf8(what))
    };
    let name_end = key[1..]
        .iter()
        .position(|&b| b == 0)
        .map_or(base, |i| i + 1);
    let family = utf8(&key[1..name_end], "the family name")?;
    let mut labels = Vec::new();
    for field in Fields::new(&key[name_end + 1..base - 1]) {
        let (_, Wire::Bytes(pair), _) = field? else {
            continue;
        };
        let (mut k, mut v) = (&[][..], &[][..]);
        for f in Fields::new(pair) {
            match f? {
                (1, Wire::Bytes(b), _) => k = b,
                (2, Wire::Bytes(b), _) => v = b,
                _ => {}
            }
        }
        labels.push((utf8(k, "a label name")?, utf8(v, "a label value")?));
    }
    let bound = key
        .get(base + 1..base + 9)
        .and_then(|b| b.try_into().ok())
        .map(|b| f64::from_bits(u64::from_le_bytes(b)));
    let (suffix, extra) = match (key.get(base), bound) {
        (Some(&BUCKET), Some(b)) => ("_bucket", Some(("le", b))),
        (Some(&QUANTILE), Some(b)) => ("", Some(("quantile", b))),
        (Some(&SUM), _) => ("_sum", None),
        (Some(&COUNT), _) => ("_count", None),
        _ => ("", None),
    };
    if let Some((label, b)) = extra {
        labels.push((label.to_string(), b.to_string()));
    }
    Ok(SeriesKey::new(format!("{family}{suffix}"), labels))
}

/// One field's value as the wire carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire<'b> {
    Varint(u64),
    Fixed64(u64),
    Fixed32,
    Bytes(&'b [u8]),
}

/// What is wrong with a message's encoding.
type WireError = &'static str;

/// The fields of one message: (number, value, the field's encoded bytes).
struct Fields<'b> {
    buf: &'b [u8],
    pos: usize,
}

impl<'b> Fields<'b> {
    fn new(buf: &'b [u8]) -> Fields<'b> {
        Fields { buf, pos: 0 }
    }

    #[inline(always)]
    fn field(&mut self) -> Result<(u64, Wire<'b>), WireError> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.fixed()?)),
            5 => {
                self.fixed::<4>()?;
                Wire::Fixed32
            }
            2 => {
                let len = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
                let end = self
                    .pos
                    .checked_add(len)
                    .filter(|&e| e <= self.buf.len())
                    .ok_or("a field runs past the end of its message")?;
                let b = &self.buf[self.pos..end];
                self.pos = end;
                Wire::Bytes(b)
            }
            3 => return Err("wire type 3 is not read"),
            4 => return Err("wire type 4 is not read"),
            _ => return Err("wire type 6 or 7 does not exist"),
        };
        Ok((tag >> 3, value))
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, WireError> {
        // Tags and small lengths and counts take one byte.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        match varint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v)
            }
            None => Err("a varint runs past the end of its message"),
        }
    }

    #[inline]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let b = self
            .buf
            .get(self.pos..self.pos + N)
            .and_then(|b| b.try_into().ok())
            .ok_or("a fixed-size field runs past the end of its message")?;
        self.pos += N;
        Ok(b)
    }
}

impl<'b> Iterator for Fields<'b> {
    type Item = Result<(u64, Wire<'b>, &'b [u8]), WireError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let start = self.pos;
        let field = self.field();
        if field.is_err() {
            // Nothing after a malformed field can be trusted.
            self.pos = self.buf.len();
        }
        Some(field.map(|(n, v)| (n, v, &self.buf[start..self.pos])))
    }
}

/// The varint at the start of `buf` and its size, or `None` if `buf` ends inside it.
#[inline]
fn varint(buf: &[u8]) -> Result<Option<(u64, usize)>, WireError> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(Some((v, i + 1)));
        }
    }
    if buf.len() >= 10 {
        return Err("a varint longer than 10 bytes");
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A small encoder, enough to write the fixtures.
    fn put_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn put_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        put_varint(field << 3 | 2, out);
        put_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    fn put_double(field: u64, v: f64, out: &mut Vec<u8>) {
        put_varint(field << 3 | 1, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn put_uint(field: u64, v: u64, out: &mut Vec<u8>) {
        put_varint(field << 3, out);
        put_varint(v, out);
    }
    fn labels(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in pairs {
            let mut pair = Vec::new();
            put_bytes(1, k.as_bytes(), &mut pair);
            put_bytes(2, v.as_bytes(), &mut pair);
            put_bytes(1, &pair, &mut out);
        }
        out
    }
    fn family(name: &str, kind: u64, metrics: &[Vec<u8>], out: &mut Vec<u8>) {
        let mut f = Vec::new();
        put_bytes(1, name.as_bytes(), &mut f);
        put_uint(3, kind, &mut f);
        for m in metrics {
            put_bytes(4, m, &mut f);
        }
        put_varint(f.len() as u64, out);
        out.extend_from_slice(&f);
    }
    fn counter(pairs: &[(&str, &str)], v: f64) -> Vec<u8> {
        let mut m = labels(pairs);
        let mut c = Vec::new();
        put_double(1, v, &mut c);
        put_bytes(3, &c, &mut m);
        m
    }
    fn histogram(pairs: &[(&str, &str)], buckets: &[(f64, u64)], sum: f64, count: u64) -> Vec<u8> {
        let mut m = labels(pairs);
        let mut h = Vec::new();
        put_uint(1, count, &mut h);
        put_double(2, sum, &mut h);
        for (le, n) in buckets {
            let mut b = Vec::new();
            put_uint(1, *n, &mut b);
            put_double(2, *le, &mut b);
            put_bytes(3, &b, &mut h);
        }
        put_bytes(7, &h, &mut m);
        m
    }

    fn summary(pairs: &[(&str, &str)], quantiles: &[(f64, f64)], sum: f64, count: u64) -> Vec<u8> {
        let mut m = labels(pairs);
        let mut q = Vec::new();
        put_uint(1, count, &mut q);
        put_double(2, sum, &mut q);
        for (quantile, v) in quantiles {
            let mut b = Vec::new();
            put_double(1, *quantile, &mut b);
            put_double(2, *v, &mut b);
            put_bytes(3, &b, &mut q);
        }
        put_bytes(4, &q, &mut m);
        m
    }

    /// The same samples in both formats (the protobuf one with an `+Inf` bucket, which the
    /// text format also has and which is not handed on).
    fn fixture(canary: f64) -> (Vec<u8>, String) {
        let mut pb = Vec::new();
        let req = [("experiment", "pbt"), ("variant", "canary")];
        let stable = [("experiment", "pbt"), ("variant", "stable")];
        family(
            "sluice_pbt_requests_total",
            0,
            &[counter(&req, canary), counter(&stable, 17.0)],
            &mut pb,
        );
        family("envoy_other", 0, &[counter(&[], 9.0)], &mut pb);
        family(
            "sluice_pbt_latency_ms",
            4,
            &[histogram(
                &req,
                &[(0.5, 1), (10000.0, 2), (f64::INFINITY, 3)],
                3.25,
                3,
            )],
            &mut pb,
        );
        family(
            "sluice_pbt_rtt",
            2,
            &[summary(
                &[("experiment", "pbt")],
                &[(0.5, 1.5), (0.99, 7.0)],
                9.0,
                4,
            )],
            &mut pb,
        );
        let text = format!(
            r#"# TYPE sluice_pbt_requests_total counter
sluice_pbt_requests_total{{experiment="pbt",variant="canary"}} {canary}
sluice_pbt_requests_total{{experiment="pbt",variant="stable"}} 17
envoy_other 9
# TYPE sluice_pbt_latency_ms histogram
sluice_pbt_latency_ms_bucket{{experiment="pbt",variant="canary",le="0.5"}} 1
sluice_pbt_latency_ms_bucket{{experiment="pbt",variant="canary",le="10000"}} 2
sluice_pbt_latency_ms_sum{{experiment="pbt",variant="canary"}} 3.25
sluice_pbt_latency_ms_count{{experiment="pbt",variant="canary"}} 3
# TYPE sluice_pbt_rtt summary
sluice_pbt_rtt{{experiment="pbt",quantile="0.5"}} 1.5
sluice_pbt_rtt{{experiment="pbt",quantile="0.99"}} 7
sluice_pbt_rtt_sum{{experiment="pbt"}} 9
sluice_pbt_rtt_count{{experiment="pbt"}} 4
"#
        );
        (pb, text)
    }

    fn read_pb(pb: &[u8], cut: usize, slots: &mut Slots) -> Result<Vec<(u32, f64)>, ParseError> {
        let mut out = Vec::new();
        let mut reader = Reader::new("sluice_", slots);
        let mut each = |s: &Slot, v: f64| out.push((s.id, v));
        let (head, tail) = pb.split_at(cut);
        reader.feed(head, &mut each)?;
        reader.feed(tail, &mut each)?;
        reader.finish(&mut each)?;
        Ok(out)
    }

    #[test]
    fn reads_the_series_the_text_format_has() {
        let (pb, text) = fixture(3.0);
        let mut text_slots = Slots::default();
        let mut want = Vec::new();
        super::super::read(&text, "sluice_", &mut text_slots, |s, v| {
            want.push((s.id, v))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(want.len(), 10);
        let mut slots = Slots::default();
        assert_eq!(read_pb(&pb, 0, &mut slots), Ok(want.clone()));
        assert_eq!(slots.len(), 10);
        // Chunks cut anywhere read the same.
        for cut in 0..=pb.len() {
            let mut fresh = Slots::default();
            assert_eq!(read_pb(&pb, cut, &mut fresh), Ok(want.clone()), "cut {cut}");
        }
        // The next answer reuses the slots: same series, new value.
        let before: Vec<_> = slots.iter().map(|s| s.text.clone()).collect();
        let (pb2, _) = fixture(4.0);
        let got = read_pb(&pb2, pb2.len() / 2, &mut slots).unwrap_or_default();
        assert_eq!(got[0], (want[0].0, 4.0));
        assert!(slots
            .iter()
            .zip(&before)
            .all(|(s, b)| std::sync::Arc::ptr_eq(&s.text, b)));
        let key = series::key(want[2].0).map(|k| (k.name.clone(), k.labels.clone()));
        assert_eq!(
            key.map(|(n, l)| (n, l.last().cloned())),
            Some((
                "sluice_pbt_latency_ms_bucket".to_string(),
                Some(("variant".to_string(), "canary".to_string()))
            ))
        );
    }

    /// Each sample of `pb` read fresh (no earlier answer): the truth a reader with slots
    /// from another answer must agree with.
    fn fresh(pb: &[u8]) -> Vec<(u32, f64)> {
        read_pb(pb, 0, &mut Slots::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_answer_that_changed_is_read_as_it_is_not_as_the_last_one_was() {
        let hist = |variant, buckets: &[(f64, u64)]| {
            histogram(
                &[("experiment", "pbg"), ("variant", variant)],
                buckets,
                1.0,
                9,
            )
        };
        let answer = |metrics: &[Vec<u8>]| {
            let mut pb = Vec::new();
            family("sluice_pbg_latency_ms", 4, metrics, &mut pb);
            pb
        };
        let two = [(1.0, 1), (2.0, 2)];
        let three = [(1.0, 1), (2.0, 2), (4.0, 3)];
        let answers = [
            answer(&[hist("a", &two), hist("b", &two)]),
            // The other variant first: same buckets, other labels at every position.
            answer(&[hist("b", &two), hist("a", &two)]),
            // A bucket more in the first metric, so the second one starts a slot later.
            answer(&[hist("b", &three), hist("a", &two)]),
            // Same labels, a bound changed.
            answer(&[hist("b", &[(1.0, 1), (3.0, 2), (4.0, 3)]), hist("a", &two)]),
            answer(&[hist("a", &two)]),
            answer(&[hist("a", &two), hist("b", &two)]),
        ];
        let mut slots = Slots::default();
        for (i, pb) in answers.iter().enumerate() {
            let got = read_pb(pb, 0, &mut slots).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, fresh(pb), "answer {i}");
            assert_eq!(slots.len(), got.len());
        }
        let ids: std::collections::BTreeSet<u32> = answers
            .iter()
            .flat_map(|pb| fresh(pb))
            .map(|(id, _)| id)
            .collect();
        // a: 2 buckets, sum, count; b: 4 bounds, sum, count.
        assert_eq!(ids.len(), 4 + 6);
    }

    #[test]
    fn a_bucket_reads_the_same_whichever_way_it_is_encoded() {
        let bucket = |fields: &[(u64, Option<u64>, Option<f64>)]| {
            let mut b = Vec::new();
            for &(field, n, x) in fields {
                match (n, x) {
                    (Some(n), _) => put_uint(field, n, &mut b),
                    (_, Some(x)) => put_double(field, x, &mut b),
                    _ => {}
                }
            }
            b
        };
        let big = (1u64 << 40) + 3;
        for (fields, want) in [
            // As Envoy writes it (the short path), with one- and six-byte counts.
            (
                vec![(1, Some(7), None), (2, None, Some(2.5))],
                Ok((2.5, 7.0)),
            ),
            (
                vec![(1, Some(big), None), (2, None, Some(1e9))],
                Ok((1e9, big as f64)),
            ),
            // Other orders and forms (the general walk).
            (
                vec![(2, None, Some(2.5)), (1, Some(7), None)],
                Ok((2.5, 7.0)),
            ),
            (
                vec![(4, None, Some(7.5)), (2, None, Some(2.5))],
                Ok((2.5, 7.5)),
            ),
            (
                vec![(1, Some(7), None), (2, None, Some(2.5)), (9, Some(1), None)],
                Ok((2.5, 7.0)),
            ),
            (
                vec![(1, Some(7), None), (2, None, Some(f64::NAN))],
                Err("a bucket or quantile without its bound"),
            ),
            (
                vec![(1, Some(7), None)],
                Err("a bucket or quantile without its bound"),
            ),
        ] {
            let msg = bucket(&fields);
            assert_eq!(point_of(Kind::Histogram, &msg), want, "{fields:?}");
        }
        // A quantile is never taken for a bucket.
        let q = bucket(&[(1, Some(7), None), (2, None, Some(2.5))]);
        assert_eq!(
            point_of(Kind::Summary, &q),
            Err("a bucket or quantile without its bound")
        );
    }

    #[test]
    fn malformed_answers_are_errors_naming_the_family() {
        let (pb, _) = fixture(3.0);
        let mut slots = Slots::default();
        let cut = read_pb(&pb[..pb.len() - 1], 0, &mut slots).map_err(|e| e.to_string());
        assert_eq!(
            cut,
            Err(format!(
                "metric family 4: the answer ends inside it ({} bytes of it arrived)",
                pb.len() - 1 - last_family_start(&pb)
            ))
        );
        let mut bad = Vec::new();
        let mut f = Vec::new();
        put_bytes(1, b"sluice_pbt_bad", &mut f);
        put_uint(3, 0, &mut f);
        f.extend_from_slice(&[4 << 3 | 2, 50, 1]);
        put_varint(f.len() as u64, &mut bad);
        bad.extend_from_slice(&f);
        let got = read_pb(&bad, 0, &mut slots).map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err(
                "metric family 1 (sluice_pbt_bad): a field runs past the end of its message".into()
            )
        );
        let mut long = Vec::new();
        put_varint(1 << 40, &mut long);
        let got = read_pb(&long, 0, &mut slots).map_err(|e| e.to_string());
        assert!(
            matches!(&got, Err(e) if e.starts_with("metric family 1: length 1099511627776 is over")),
            "{got:?}"
        );
        let mut group = Vec::new();
        family("sluice_pbt_g", 0, &[vec![3 << 3 | 3]], &mut group);
        let got = read_pb(&group, 0, &mut slots).map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err("metric family 1 (sluice_pbt_g): wire type 3 is not read".into())
        );
    }

    fn last_family_start(pb: &[u8]) -> usize {
        let mut at = 0;
        let mut last = 0;
        while let Ok(Some((len, head))) = varint(&pb[at..]) {
            last = at;
            at += head + len as usize;
            if at >= pb.len() {
                break;
            }
        }
        last
    }
}
