//! Prometheus' protobuf exposition (`io.prometheus.client.MetricFamily`, length-delimited), as
//! the simulated Envoys write it: messages declared with prost (field numbers of Prometheus'
//! `metrics.proto`), filled from a text exposition. Like Envoy 1.40, histograms carry their
//! finite buckets, `sample_sum` and `sample_count`, without an `+Inf` bucket; fields are
//! `optional` (proto2), so zeros are written as Envoy writes them.
//!
//! The same messages are the prost baseline of `sluice-bench decode` (see [`super::decode`]),
//! which builds its answers with them and decodes them back.

use std::collections::HashMap;

use anyhow::{Context, Result};
use prost::Message;
use sluice_controller::source::exposition;

/// One metric family: a name, its type, and its metrics.
#[derive(Clone, PartialEq, Message)]
pub struct MetricFamily {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Never written here (Envoy writes none); declared so that the prost baseline decodes
    /// every field a `MetricFamily` may carry.
    #[prost(string, optional, tag = "2")]
    pub help: Option<String>,
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
    #[prost(message, repeated, tag = "4")]
    pub metric: Vec<Metric>,
}

/// One metric of a family: its labels and one value of the family's type.
#[derive(Clone, PartialEq, Message)]
pub struct Metric {
    #[prost(message, repeated, tag = "1")]
    pub label: Vec<LabelPair>,
    #[prost(message, optional, tag = "2")]
    pub gauge: Option<Value>,
    #[prost(message, optional, tag = "3")]
    pub counter: Option<Value>,
    /// Never written here (untyped samples are written as gauges); declared so that the prost
    /// baseline reads an untyped value as a reader of any exposition must.
    #[prost(message, optional, tag = "5")]
    pub untyped: Option<Value>,
    #[prost(message, optional, tag = "7")]
    pub histogram: Option<Histogram>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LabelPair {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// `Counter`, `Gauge` and `Untyped` alike.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(double, optional, tag = "1")]
    pub value: Option<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    #[prost(uint64, optional, tag = "1")]
    pub sample_count: Option<u64>,
    #[prost(double, optional, tag = "2")]
    pub sample_sum: Option<f64>,
    #[prost(message, repeated, tag = "3")]
    pub bucket: Vec<Bucket>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Bucket {
    #[prost(uint64, optional, tag = "1")]
    pub cumulative_count: Option<u64>,
    #[prost(double, optional, tag = "2")]
    pub upper_bound: Option<f64>,
}

/// `MetricType` values (`MetricFamily::type`).
pub const COUNTER: i32 = 0;
pub const GAUGE: i32 = 1;
pub const HISTOGRAM: i32 = 4;

/// An exposition held as messages, to write many times with different values.
pub struct Template {
    families: Vec<MetricFamily>,
}

impl Template {
    /// Encoded with every count times `factor` (rounded: counters, bucket counts and
    /// `sample_count` stay integers) and sums and gauges times `factor`; with `only`, just the
    /// metrics whose `experiment` label is one of those named (as Envoy answers a `filter`).
    pub fn render(&self, factor: f64, only: Option<&[String]>) -> Vec<u8> {
        let count = |v: Option<u64>| v.map(|n| (n as f64 * factor).round() as u64);
        let mut out = Vec::new();
        for f in &self.families {
            let mut f = f.clone();
            f.metric.retain(|m| {
                only.is_none_or(|names| {
                    m.label.iter().any(|l| {
                        l.name.as_deref() == Some("experiment")
                            && names.iter().any(|n| Some(n.as_str()) == l.value.as_deref())
                    })
                })
            });
            if f.metric.is_empty() {
                continue;
            }
            for m in &mut f.metric {
                if let Some(c) = &mut m.counter {
                    c.value = c.value.map(|v| (v * factor).round());
                }
                if let Some(g) = &mut m.gauge {
                    g.value = g.value.map(|v| v * factor);
                }
                if let Some(h) = &mut m.histogram {
                    h.sample_count = count(h.sample_count);
                    h.sample_sum = h.sample_sum.map(|v| v * factor);
                    for b in &mut h.bucket {
                        b.cumulative_count = count(b.cumulative_count);
                    }
                }
            }
            // Encoding into a Vec cannot run out of room.
            let _ = f.encode_length_delimited(&mut out);
        }
        out
    }

    /// The protobuf form of text exposition `text` (families in order of first appearance,
    /// types from its `# TYPE` lines; untyped samples are written as gauges).
    pub fn from_text(text: &str) -> Result<Template> {
        let types: HashMap<&str, i32> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
                let name = w.next()?;
                let kind = match w.next()? {
                    "counter" => COUNTER,
                    "histogram" => HISTOGRAM,
                    _ => GAUGE,
                };
                Some((name, kind))
            })
            .collect();
        let samples = exposition::parse(text, "").context("the text exposition")?;
        let mut families: Vec<MetricFamily> = Vec::new();
        let mut family_at: HashMap<String, usize> = HashMap::new();
        let mut metric_at: HashMap<(usize, Vec<(String, String)>), usize> = HashMap::new();
        for s in samples {
            let (name, part) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = s.name.strip_suffix(suffix)?;
                    (types.get(base) == Some(&HISTOGRAM)).then_some((base, *suffix))
                })
                .unwrap_or((s.name.as_str(), ""));
            let kind = types.get(name).copied().unwrap_or(GAUGE);
            let f = *family_at.entry(name.to_string()).or_insert_with(|| {
                families.push(MetricFamily {
                    name: name.to_string(),
                    help: None,
                    r#type: Some(kind),
                    metric: Vec::new(),
                });
                families.len() - 1
            });
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| !(part == "_bucket" && *k == "le"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let family = &mut families[f];
            let m = *metric_at.entry((f, labels.clone())).or_insert_with(|| {
                family.metric.push(Metric {
                    label: labels
                        .into_iter()
                        .map(|(name, value)| LabelPair {
                            name: Some(name),
                            value: Some(value),
                        })
                        .collect(),
                    ..Default::default()
                });
                family.metric.len() - 1
            });
            let metric = &mut family.metric[m];
            match (kind, part) {
                (COUNTER, _) => {
                    metric.counter = Some(Value {
                        value: Some(s.value),
                    })
                }
                (HISTOGRAM, _) => {
                    let h = metric.histogram.get_or_insert_with(Default::default);
                    match part {
                        "_sum" => h.sample_sum = Some(s.value),
                        "_count" => h.sample_count = Some(s.value as u64),
                        _ => {
                            let le: f64 = s.label("le").unwrap_or("").parse().unwrap_or(f64::NAN);
                            if le.is_finite() {
                                h.bucket.push(Bucket {
                                    cumulative_count: Some(s.value as u64),
                                    upper_bound: Some(le),
                                });
                            }
                        }
                    }
                }
                _ => {
                    metric.gauge = Some(Value {
                        value: Some(s.value),
                    })
                }
            }
        }
        Ok(Template { families })
    }
}

#[cfg(test)]
mod tests {
    use sluice_controller::source::exposition::{AnyReader, Format};
    use sluice_controller::source::series::{self, Slot, Slots};

    use super::*;

    /// (series, value) of every sample a controller reader hands on.
    fn read(format: Format, body: &[u8]) -> Vec<(String, f64)> {
        let mut slots = Slots::default();
        let mut reader = AnyReader::new(format, "sluice_", &mut slots);
        let mut out = Vec::new();
        let mut each = |s: &Slot, v: f64| {
            let key = series::key(s.id).map(|k| format!("{k:?}"));
            out.push((key.unwrap_or_default(), v));
        };
        let done = reader.feed(body, &mut each);
        assert_eq!(done, Ok(()));
        assert_eq!(reader.finish(&mut each).map(|_| ()), Ok(()));
        out
    }

    #[test]
    fn the_controller_reads_prost_encoded_messages_as_the_text_they_came_from() {
        let text = r#"# TYPE sluice_requests_total counter
sluice_requests_total{experiment="pp",variant="canary"} 3
sluice_requests_total{experiment="pp",variant="stable"} 0
sluice_requests_total{experiment="other",variant="stable"} 5
# TYPE sluice_latency_ms histogram
sluice_latency_ms_bucket{experiment="pp",variant="canary",le="0.5"} 1
sluice_latency_ms_bucket{experiment="pp",variant="canary",le="2500"} 2
sluice_latency_ms_bucket{experiment="pp",variant="canary",le="+Inf"} 3
sluice_latency_ms_sum{experiment="pp",variant="canary"} 3.5
sluice_latency_ms_count{experiment="pp",variant="canary"} 3
"#;
        let template = Template::from_text(text).unwrap_or_else(|e| panic!("{e:#}"));
        let mut want = read(Format::Text, text.as_bytes());
        want.retain(|(k, _)| !k.contains("+Inf"));
        assert_eq!(read(Format::Protobuf, &template.render(1.0, None)), want);
        // Scaled and filtered as the simulated Envoys serve it.
        let only = ["pp".to_string()];
        let got = read(Format::Protobuf, &template.render(2.0, Some(&only)));
        let want: Vec<(String, f64)> = want
            .into_iter()
            .filter(|(k, _)| !k.contains("other"))
            .map(|(k, v)| (k, v * 2.0))
            .collect();
        assert_eq!(got, want);
    }
}
