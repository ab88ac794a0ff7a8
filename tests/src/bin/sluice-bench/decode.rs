//! `sluice-bench decode`: what decoding one Prometheus protobuf answer costs the controller's
//! hand-written reader (`source::exposition::protobuf::Reader`) against a `prost` baseline, in
//! one process and one run, in alternating rounds. Run by `scripts/bench-decode.sh`; results and
//! reading in docs/benchmarks.md, "Decoding the protobuf exposition".
//!
//! The answer is what an Envoy with the Sluice filter writes for `--experiments` experiments
//! of two variants each (request, response-class, outcome, replicate-group counters; the
//! latency and prediction histograms with Envoy's default and the filter's buckets), with
//! the same shape as the answers the controller benchmark serves, written with the messages of
//! [`super::promproto`] that the simulated Envoys of that benchmark write. The contestants:
//!
//! - `reader, steady`: the controller's reader with the slots of the proxy's last answer, as
//!   every scrape after a proxy's first is read (each sample is compared with its slot; only
//!   its value is decoded);
//! - `reader, first answer`: the same reader with empty slots, as for a proxy's first answer
//!   (each sample's slot text is built and looked up in the process's series table; the
//!   series were interned by the first round, as a fleet's other proxies would have);
//! - `prost decode`: `MetricFamily::decode_length_delimited` over the answer into prost's
//!   owned messages, and nothing else: a lower bound for any reader built on prost;
//! - `prost + series keys`: that, then each sample's series key built from its name and
//!   labels (what a prost-based reader must at least do to hand samples on, before any
//!   interning).
//!
//! It runs with `sluice-bench`'s allocator, mimalloc, as the controller does (`sluice`).

use std::hint::black_box;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use prost::Message;
use sluice_controller::source::exposition::protobuf::Reader;
use sluice_controller::source::series::{SeriesKey, Slots};

use super::promproto::{
    Bucket, Histogram, LabelPair, Metric, MetricFamily, Value, COUNTER, HISTOGRAM,
};

/// Arguments of `sluice-bench decode`.
#[derive(Parser)]
pub struct DecodeArgs {
    /// Experiments (of two variants each) in the answer.
    #[arg(long, default_value_t = 10)]
    experiments: usize,
    /// Measured rounds; each round times every decoder once, in alternating order.
    #[arg(long, default_value_t = 31)]
    rounds: usize,
    /// Answers decoded per decoder and round.
    #[arg(long, default_value_t = 100)]
    iterations: usize,
}

/// Envoy's default histogram bounds (ms), which the latency histogram uses.
const LATENCY_BOUNDS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The labels of `variant` of `experiment`, then `extra`.
fn labels(experiment: &str, variant: &str, extra: &[(&str, String)]) -> Vec<LabelPair> {
    let mut v = vec![
        LabelPair {
            name: Some("experiment".into()),
            value: Some(experiment.into()),
        },
        LabelPair {
            name: Some("variant".into()),
            value: Some(variant.into()),
        },
    ];
    v.extend(extra.iter().map(|(k, val)| LabelPair {
        name: Some((*k).into()),
        value: Some(val.clone()),
    }));
    v
}

/// A counter metric.
fn counter(labels: Vec<LabelPair>, value: f64) -> Metric {
    Metric {
        label: labels,
        counter: Some(Value { value: Some(value) }),
        ..Metric::default()
    }
}

/// A histogram metric of `n` samples over finite `bounds` (no `+Inf` bucket, as Envoy writes
/// it), its buckets filled in a pattern that `seed` shifts.
fn histogram(labels: Vec<LabelPair>, bounds: &[f64], n: u64, seed: u64) -> Metric {
    let mut cumulative = 0;
    let bucket = bounds
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            cumulative += (n / bounds.len() as u64) * ((i as u64 + seed) % 3);
            Bucket {
                cumulative_count: Some(cumulative.min(n)),
                upper_bound: Some(b),
            }
        })
        .collect();
    Metric {
        label: labels,
        histogram: Some(Histogram {
            sample_count: Some(n),
            sample_sum: Some(n as f64 * 41.5),
            bucket,
        }),
        ..Metric::default()
    }
}

/// The answer for `experiments` experiments, every count scaled by `scale`.
fn answer(experiments: usize, scale: u64) -> Vec<u8> {
    let variants = ["control", "canary"];
    let prediction_bounds: Vec<f64> = (1..=20).map(|i| f64::from(i) * 0.05).collect();
    let mut families: Vec<(&str, i32, Vec<Metric>)> = vec![
        ("sluice_requests_total", COUNTER, vec![]),
        ("sluice_replicate_requests_total", COUNTER, vec![]),
        ("sluice_responses_total", COUNTER, vec![]),
        ("sluice_outcomes_total", COUNTER, vec![]),
        ("sluice_latency_ms", HISTOGRAM, vec![]),
        ("sluice_prediction", HISTOGRAM, vec![]),
    ];
    for e in 0..experiments {
        let exp = format!("r{e}");
        for (v, variant) in variants.iter().enumerate() {
            let n = scale * if v == 0 { 9900 } else { 100 };
            families[0]
                .2
                .push(counter(labels(&exp, variant, &[]), n as f64));
            for g in 0..8 {
                let extra = [("replicate", g.to_string())];
                families[1]
                    .2
                    .push(counter(labels(&exp, variant, &extra), (n / 8) as f64));
            }
            for class in ["2xx", "5xx"] {
                let extra = [("class", class.to_string())];
                let k = if class == "2xx" { n - n / 100 } else { n / 100 };
                families[2]
                    .2
                    .push(counter(labels(&exp, variant, &extra), k as f64));
            }
            let extra = [("outcome", "click".to_string())];
            families[3]
                .2
                .push(counter(labels(&exp, variant, &extra), (n / 20) as f64));
            families[4].2.push(histogram(
                labels(&exp, variant, &[]),
                &LATENCY_BOUNDS,
                n,
                e as u64,
            ));
            families[5].2.push(histogram(
                labels(&exp, variant, &[]),
                &prediction_bounds,
                n,
                v as u64,
            ));
        }
    }
    let mut out = Vec::new();
    for (name, kind, metric) in families {
        let f = MetricFamily {
            name: name.into(),
            help: None,
            r#type: Some(kind),
            metric,
        };
        // Encoding into a Vec cannot run out of room.
        let _ = f.encode_length_delimited(&mut out);
    }
    out
}

/// The reader over `body` in 16 KiB chunks (the scrape client's read buffer): samples read.
fn read(body: &[u8], slots: &mut Slots) -> Result<usize> {
    let mut reader = Reader::new("sluice_", slots);
    let mut n = 0usize;
    let mut each = |_: &_, v: f64| {
        black_box(v);
        n += 1;
    };
    for chunk in body.chunks(16 << 10) {
        reader.feed(chunk, &mut each).context("the reader")?;
    }
    reader.finish(&mut each).context("the reader")?;
    Ok(n)
}

/// `body`'s metric families decoded by prost into its owned messages.
fn prost_decode(mut body: &[u8]) -> Result<Vec<MetricFamily>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        out.push(MetricFamily::decode_length_delimited(&mut body).context("prost")?);
    }
    Ok(out)
}

/// Each sample's series key, as the reader's samples name them: the finite buckets (label
/// `le`), `_sum` and `_count` for a histogram, one sample otherwise: samples keyed.
fn prost_keys(body: &[u8]) -> Result<usize> {
    let mut n = 0;
    for f in prost_decode(body)? {
        let name = f.name;
        for m in f.metric {
            let labels: Vec<(String, String)> = m
                .label
                .into_iter()
                .map(|l| (l.name.unwrap_or_default(), l.value.unwrap_or_default()))
                .collect();
            let mut key = |suffix: &str, extra: Option<(String, String)>, v: f64| {
                let all = labels.iter().cloned().chain(extra);
                black_box((SeriesKey::new(format!("{name}{suffix}"), all), v));
                n += 1;
            };
            if let Some(h) = m.histogram {
                for b in h.bucket {
                    let le = b.upper_bound.unwrap_or(f64::INFINITY).to_string();
                    key(
                        "_bucket",
                        Some(("le".into(), le)),
                        b.cumulative_count.unwrap_or(0) as f64,
                    );
                }
                key("_sum", None, h.sample_sum.unwrap_or(0.0));
                key("_count", None, h.sample_count.unwrap_or(0) as f64);
            } else {
                let v = m.counter.or(m.gauge).or(m.untyped);
                key("", None, v.and_then(|s| s.value).unwrap_or(0.0));
            }
        }
    }
    Ok(n)
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints the answer's size and the table.
pub fn run(args: DecodeArgs) -> Result<()> {
    let experiments = args.experiments;
    let rounds = args.rounds.max(1);
    let iterations = args.iterations.max(1);
    // Two answers with different values, as successive scrapes of one proxy are.
    let bodies = [answer(experiments, 20), answer(experiments, 21)];
    let mut warm = Slots::default();
    let samples = read(&bodies[0], &mut warm)?;
    let prost_samples = prost_keys(&bodies[0])?;
    ensure!(
        samples == prost_samples,
        "the contestants read different samples: the reader {samples}, prost {prost_samples}"
    );
    println!(
        "answer: {} bytes, {} metric families, {samples} samples ({experiments} experiments)",
        bodies[0].len(),
        prost_decode(&bodies[0])?.len()
    );
    let names = [
        "reader, steady",
        "reader, first answer",
        "prost decode",
        "prost + series keys",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        // Alternate the order in which the contestants run from round to round.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..names.len()).collect()
        } else {
            (0..names.len()).rev().collect()
        };
        for c in order {
            let start = Instant::now();
            for i in 0..iterations {
                let body = &bodies[i % 2];
                match c {
                    0 => {
                        black_box(read(body, &mut warm)?);
                    }
                    1 => {
                        black_box(read(body, &mut Slots::default())?);
                    }
                    2 => {
                        black_box(prost_decode(body)?);
                    }
                    _ => {
                        black_box(prost_keys(body)?);
                    }
                }
            }
            times[c].push(start.elapsed().as_secs_f64() * 1e6 / iterations as f64);
        }
    }
    // Ratios are taken round by round (each contestant against the steady reader of the same
    // round), so a machine whose speed drifts during the run moves both sides.
    println!(
        "| decoder | µs per answer, median of {rounds} rounds (min–max) | × the steady reader, median of the rounds' ratios (min–max) |"
    );
    println!("|---|---:|---:|");
    for (name, t) in names.iter().zip(&times) {
        let ratios: Vec<f64> = t.iter().zip(&times[0]).map(|(a, b)| a / b).collect();
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            (lo, hi)
        };
        let (lo, hi) = range(t);
        let (rlo, rhi) = range(&ratios);
        println!(
            "| {name} | {:.1} ({lo:.1}–{hi:.1}) | {:.2}× ({rlo:.2}–{rhi:.2}) |",
            median(t.clone()),
            median(ratios),
        );
    }
    Ok(())
}
