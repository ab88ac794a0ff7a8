//! Every metric the filter exports, named in one place, and the [`Catalog`] of concrete
//! metrics a plan needs (defined once at configure time, never per request).
//!
//! Envoy shows wasm metrics as `wasmcustom.<name>`. Labels are written into the name in
//! Istio's layout: the base name, a `.`, then `<label>=.=<value>;.;` per label
//! (`sluice_requests_total.experiment=.=ranker;.;variant=.=canary;.;`). The one tag regex Istio
//! generates per ProxyConfig `extraStatTags` entry, `(<label>=\.=(.*?);\.;)` ([`tag_regex`]),
//! turns each into a Prometheus label, and Envoy drops the `.` left at the end:
//! `sluice_requests_total{experiment="ranker",variant="canary"}` (checked against a real Envoy
//! in `tests/tests/istio_stats.rs`). Plain Envoy bootstraps use the same regexes in
//! `stats_tags`. The base name comes first because `histogram_bucket_settings` (and Istio's
//! `sidecar.istio.io/statsHistogramBuckets`) match the full name by prefix: with the labels
//! first (Istio's own metrics' order) every histogram would share one bucket list. Names and
//! label values are restricted by config validation to `[A-Za-z0-9_-]`, so they cannot break
//! this encoding.

use crate::plan::{Experiment, Plan, Unit};
use crate::shadow::{FieldKind, Shadow};

/// What every metric name below starts with (sources ask Envoy and Prometheus for it).
pub const PREFIX: &str = "sluice_";

/// Requests assigned to a variant (QA overrides excluded).
pub const REQUESTS: &str = "sluice_requests_total";
/// Keyed requests of a per-user experiment by replicate group; label `replicate` = `0`..`31`
/// ([`REPLICATES`] groups, from hash bits the bucket does not use: see
/// `assignment::replicate_of`). Each group is a disjoint random set of users, so the spread
/// of a variant's share across groups measures how much per-user assignment makes request
/// counts vary; the controller's sample-ratio test needs it.
pub const REPLICATE_REQUESTS: &str = "sluice_replicate_requests_total";
/// Replicate groups of [`REPLICATE_REQUESTS`].
pub const REPLICATES: usize = 32;
/// Responses by status class; label `class` = `1xx`..`5xx`.
pub const RESPONSES: &str = "sluice_responses_total";
/// Responses Envoy generated itself (no route, upstream unreachable, reset, timeout, ...).
pub const LOCAL_REPLIES: &str = "sluice_local_replies_total";
/// Requests whose upstream reset or failed before answering.
pub const UPSTREAM_RESETS: &str = "sluice_upstream_resets_total";
/// Histogram: milliseconds from request headers to response headers.
pub const LATENCY: &str = "sluice_latency_ms";
/// Business outcomes (response header or beacon); label `outcome`.
pub const OUTCOMES: &str = "sluice_outcomes_total";
/// Outcome values not in the configured list, per experiment.
pub const OUTCOMES_UNKNOWN: &str = "sluice_outcomes_unknown_total";
/// Histogram: prediction values, `(value + offset) * scale`.
pub const PREDICTION: &str = "sluice_prediction";
/// Prediction headers that were not a finite number, or fell below zero after the offset.
pub const PREDICTION_INVALID: &str = "sluice_prediction_invalid_total";
/// Requests of a `user` experiment that carried no key (counted in the variant they got).
pub const MISSING_KEY: &str = "sluice_missing_key_total";
/// Requests routed by a valid QA override (not counted in [`REQUESTS`]).
pub const OVERRIDES: &str = "sluice_overrides_total";
/// Override attempts refused (bad token or unknown variant), per experiment.
pub const OVERRIDES_DENIED: &str = "sluice_overrides_denied_total";
/// Beacon events that were accepted (204), per variant.
pub const EVENTS: &str = "sluice_events_total";
/// Beacon requests refused, per experiment; label `reason` (see [`crate::beacon::Rejection`]).
pub const EVENTS_REJECTED: &str = "sluice_events_rejected_total";
/// Internal errors (a host call failed); the request was served the control, per experiment.
pub const ERRORS: &str = "sluice_errors_total";
/// Shadow copies taken (requests sampled for shadowing). Each ends in exactly one of
/// [`SHADOW_COMPARED`], [`SHADOW_SKIPPED`], [`SHADOW_TIMEOUTS`] or [`SHADOW_ERRORS`], so once
/// none is in flight `requests = compared + skipped + timeouts + errors`.
pub const SHADOW_REQUESTS: &str = "sluice_shadow_requests_total";
/// Shadow copies not sent, or sent but not compared; label `reason` (see
/// [`SHADOW_SKIP_REASONS`]).
pub const SHADOW_SKIPPED: &str = "sluice_shadow_skipped_total";
/// Shadowed requests whose two answers were compared.
pub const SHADOW_COMPARED: &str = "sluice_shadow_compared_total";
/// Comparisons that agreed / disagreed; label `field`: `status`, `body` or a configured field.
pub const SHADOW_AGREE: &str = "sluice_shadow_agree_total";
pub const SHADOW_DISAGREE: &str = "sluice_shadow_disagree_total";
/// A configured field that one of the answers lacked (or a body that was not JSON); label `field`.
pub const SHADOW_MISSING: &str = "sluice_shadow_missing_total";
/// Shadow calls that failed without an answer to compare (reset, connection failure without
/// a reply, an answer over Envoy's buffer limit); never compared.
pub const SHADOW_ERRORS: &str = "sluice_shadow_errors_total";
/// Compared shadow answers whose status was 5xx (a part of [`SHADOW_COMPARED`]).
pub const SHADOW_5XX: &str = "sluice_shadow_5xx_total";
/// Shadow calls that hit the timeout.
pub const SHADOW_TIMEOUTS: &str = "sluice_shadow_timeouts_total";
/// Gauge: bytes held for shadow copies — by the filter (headers, request bodies, answer
/// bodies) and, for calls still out, the expected size of the answer Envoy buffers — summed
/// over Envoy's workers; each worker keeps its own share under `max_bytes_in_flight`.
pub const SHADOW_BYTES_IN_FLIGHT: &str = "sluice_shadow_bytes_in_flight";
/// Histogram: shadow call latency in milliseconds.
pub const SHADOW_LATENCY: &str = "sluice_shadow_latency_ms";
/// Histogram: `round(|shadow - primary| * scale)` per numeric field; labels `field`, `sign`.
pub const SHADOW_DELTA: &str = "sluice_shadow_delta";
/// Gauge per experiment: the push version of the configuration the filter runs (the number
/// before `@` in the config's `revision`; 0 for a config without one, such as a bootstrap's
/// default). Any sink's push can be confirmed from the data plane with it.
pub const CONFIG_REVISION: &str = "sluice_config_revision";
/// Gauge per experiment and treatment (labels `experiment`, `variant`): 1 while the data-plane
/// breaker holds the treatment out of traffic, else 0. Cleared by a new config revision.
pub const BREAKER_TRIPPED: &str = "sluice_breaker_tripped";
/// Counter per experiment, treatment and reason (labels `experiment`, `variant`, `reason`):
/// the breaker's trips. A counter, so a trip stays visible after a new revision clears it.
pub const BREAKER_TRIPS: &str = "sluice_breaker_trips_total";
/// Values of [`BREAKER_TRIPS`]' `reason` label: the kind of hard failure most frequent in the
/// window when the breaker tripped, in the order of [`BreakerMetrics::trips`] (by
/// [`crate::breaker::FailureKind::index`]).
pub const BREAKER_REASONS: [&str; crate::breaker::KINDS] = crate::breaker::REASONS;

/// Why a shadow copy was skipped, in the order of [`ShadowMetrics::skipped`] (by
/// [`crate::shadow::Skip::index`]).
pub const SHADOW_SKIP_REASONS: [&str; 5] = crate::shadow::SKIP_REASONS;

/// Status classes in [`RESPONSES`], indexed by `status / 100 - 1`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counter or histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One concrete metric to define in the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
}

/// Positions in [`Catalog::specs`] for one variant's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantMetrics {
    pub requests: usize,
    /// [`REPLICATE_REQUESTS`] by group; empty unless the experiment assigns users.
    pub replicates: Vec<usize>,
    pub responses: [usize; 5],
    pub local_replies: usize,
    pub upstream_resets: usize,
    pub latency: usize,
    pub missing_key: usize,
    pub overrides: usize,
    /// Parallel to the experiment's outcome names.
    pub outcomes: Vec<usize>,
    pub events: Option<usize>,
    pub prediction: Option<usize>,
    pub shadow: Option<ShadowMetrics>,
    /// For a treatment (not the control) of an experiment with a breaker.
    pub breaker: Option<BreakerMetrics>,
}

/// Positions of one treatment's breaker metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerMetrics {
    /// [`BREAKER_TRIPPED`].
    pub tripped: usize,
    /// [`BREAKER_TRIPS`], parallel to [`BREAKER_REASONS`].
    pub trips: [usize; crate::breaker::KINDS],
}

/// Positions of one variant's shadow metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowMetrics {
    pub requests: usize,
    pub skipped: [usize; 5],
    pub compared: usize,
    /// Index 0: status, 1: body, then the configured fields.
    pub agree: Vec<usize>,
    pub disagree: Vec<usize>,
    /// Parallel to the configured fields.
    pub missing: Vec<usize>,
    pub errors: usize,
    pub five_xx: usize,
    pub timeouts: usize,
    pub latency: usize,
    /// Parallel to the configured fields: `[positive, negative]` delta histograms, for
    /// numeric fields only.
    pub deltas: Vec<Option<[usize; 2]>>,
}

/// Positions in [`Catalog::specs`] for one experiment's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExperimentMetrics {
    /// [`CONFIG_REVISION`]: set once when the plan is configured.
    pub config_revision: usize,
    pub errors: usize,
    pub overrides_denied: usize,
    pub outcomes_unknown: Option<usize>,
    /// Parallel to [`crate::beacon::Rejection::ALL`].
    pub events_rejected: Option<Vec<usize>>,
    pub prediction_invalid: Option<usize>,
    /// Parallel to the experiment's variants.
    pub variants: Vec<VariantMetrics>,
}

/// All metrics of a plan: the host defines `specs` in order and keeps the ids in a parallel
/// vector; the positions in `experiments` index into both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub specs: Vec<Spec>,
    pub experiments: Vec<ExperimentMetrics>,
    /// [`SHADOW_BYTES_IN_FLIGHT`], if any experiment shadows.
    pub shadow_bytes_in_flight: Option<usize>,
}

/// Every label a metric name carries. An Envoy bootstrap needs one `stats_tags` entry per
/// label (see `envoy/ecds.yaml`), and the controller keeps only series with these labels.
pub const LABELS: [&str; 8] = [
    "experiment",
    "variant",
    "class",
    "outcome",
    "field",
    "sign",
    "reason",
    "replicate",
];

/// `base` with `labels` encoded for Envoy's tag extraction: `base`, and if there are labels a
/// `.` and `<label>=.=<value>;.;` each.
pub fn name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut s = String::from(base);
    if !labels.is_empty() {
        s.push('.');
    }
    for (k, v) in labels {
        s.push_str(k);
        s.push_str(TAG_SEPARATOR);
        s.push_str(v);
        s.push_str(TAG_END);
    }
    s
}

/// Between a label and its value in a metric name (Istio's layout).
pub const TAG_SEPARATOR: &str = "=.=";
/// After a label's value in a metric name.
pub const TAG_END: &str = ";.;";

/// The `stats_tags` regex that extracts `label` from the filter's metric names: exactly the
/// one Istio generates for an `extraStatTags` entry, so one layout serves both.
pub fn tag_regex(label: &str) -> String {
    format!("({label}=\\.=(.*?);\\.;)")
}

impl Catalog {
    fn add_shadow(&mut self, s: &Shadow, experiment: &str, variant: &str) -> ShadowMetrics {
        let l = [("experiment", experiment), ("variant", variant)];
        let with = |k: &'static str, v: &'static str| [l[0], l[1], (k, v)];
        let mut field_names: Vec<&str> = vec!["status", "body"];
        field_names.extend(s.fields.iter().map(|f| f.name.as_str()));
        let by_field = |c: &mut Catalog, base: &str, names: &[&str]| -> Vec<usize> {
            names
                .iter()
                .map(|f| c.add(base, Kind::Counter, &[l[0], l[1], ("field", f)]))
                .collect()
        };
        ShadowMetrics {
            requests: self.add(SHADOW_REQUESTS, Kind::Counter, &l),
            skipped: SHADOW_SKIP_REASONS
                .map(|r| self.add(SHADOW_SKIPPED, Kind::Counter, &with("reason", r))),
            compared: self.add(SHADOW_COMPARED, Kind::Counter, &l),
            agree: by_field(self, SHADOW_AGREE, &field_names),
            disagree: by_field(self, SHADOW_DISAGREE, &field_names),
            missing: by_field(self, SHADOW_MISSING, &field_names[2..]),
            errors: self.add(SHADOW_ERRORS, Kind::Counter, &l),
            five_xx: self.add(SHADOW_5XX, Kind::Counter, &l),
            timeouts: self.add(SHADOW_TIMEOUTS, Kind::Counter, &l),
            latency: self.add(SHADOW_LATENCY, Kind::Histogram, &l),
            deltas: s
                .fields
                .iter()
                .map(|f| {
                    (f.kind == FieldKind::Number).then(|| {
                        [("pos"), ("neg")].map(|sign| {
                            self.add(
                                SHADOW_DELTA,
                                Kind::Histogram,
                                &[l[0], l[1], ("field", f.name.as_str()), ("sign", sign)],
                            )
                        })
                    })
                })
                .collect(),
        }
    }

    pub fn for_plan(plan: &Plan) -> Catalog {
        let mut c = Catalog {
            specs: Vec::new(),
            experiments: Vec::new(),
            shadow_bytes_in_flight: None,
        };
        for e in &plan.experiments {
            let m = c.add_experiment(e);
            c.experiments.push(m);
        }
        if plan.experiments.iter().any(|e| e.shadow.is_some()) {
            c.shadow_bytes_in_flight = Some(c.add(SHADOW_BYTES_IN_FLIGHT, Kind::Gauge, &[]));
        }
        c
    }

    fn add(&mut self, base: &str, kind: Kind, labels: &[(&str, &str)]) -> usize {
        self.specs.push(Spec {
            name: name(base, labels),
            kind,
        });
        self.specs.len() - 1
    }

    fn add_experiment(&mut self, e: &Experiment) -> ExperimentMetrics {
        let exp = [("experiment", e.name.as_str())];
        let config_revision = self.add(CONFIG_REVISION, Kind::Gauge, &exp);
        let errors = self.add(ERRORS, Kind::Counter, &exp);
        let overrides_denied = self.add(OVERRIDES_DENIED, Kind::Counter, &exp);
        let outcome_names: &[String] = e.outcomes.as_ref().map_or(&[], |o| &o.names);
        let outcomes_unknown = e
            .outcomes
            .as_ref()
            .map(|_| self.add(OUTCOMES_UNKNOWN, Kind::Counter, &exp));
        let events_rejected = e.beacon.as_ref().map(|_| {
            crate::beacon::Rejection::ALL
                .iter()
                .map(|r| {
                    self.add(
                        EVENTS_REJECTED,
                        Kind::Counter,
                        &[exp[0], ("reason", r.label())],
                    )
                })
                .collect()
        });
        let prediction_invalid = e
            .prediction
            .as_ref()
            .map(|_| self.add(PREDICTION_INVALID, Kind::Counter, &exp));
        let mut variants = Vec::with_capacity(e.variants.len());
        for (index, v) in e.variants.iter().enumerate() {
            let l = [("experiment", e.name.as_str()), ("variant", v.as_str())];
            let class = |c: &'static str| {
                [
                    ("experiment", e.name.as_str()),
                    ("variant", v.as_str()),
                    ("class", c),
                ]
            };
            let responses = [
                self.add(RESPONSES, Kind::Counter, &class(STATUS_CLASSES[0])),
                self.add(RESPONSES, Kind::Counter, &class(STATUS_CLASSES[1])),
                self.add(RESPONSES, Kind::Counter, &class(STATUS_CLASSES[2])),
                self.add(RESPONSES, Kind::Counter, &class(STATUS_CLASSES[3])),
                self.add(RESPONSES, Kind::Counter, &class(STATUS_CLASSES[4])),
            ];
            let outcomes = outcome_names
                .iter()
                .map(|o| {
                    self.add(
                        OUTCOMES,
                        Kind::Counter,
                        &[
                            ("experiment", e.name.as_str()),
                            ("variant", v.as_str()),
                            ("outcome", o.as_str()),
                        ],
                    )
                })
                .collect();
            let replicates = match e.unit {
                Unit::User { .. } => (0..REPLICATES)
                    .map(|r| {
                        let r = r.to_string();
                        self.add(
                            REPLICATE_REQUESTS,
                            Kind::Counter,
                            &[l[0], l[1], ("replicate", r.as_str())],
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            };
            variants.push(VariantMetrics {
                requests: self.add(REQUESTS, Kind::Counter, &l),
                replicates,
                responses,
                local_replies: self.add(LOCAL_REPLIES, Kind::Counter, &l),
                upstream_resets: self.add(UPSTREAM_RESETS, Kind::Counter, &l),
                latency: self.add(LATENCY, Kind::Histogram, &l),
                missing_key: self.add(MISSING_KEY, Kind::Counter, &l),
                overrides: self.add(OVERRIDES, Kind::Counter, &l),
                outcomes,
                events: e
                    .beacon
                    .as_ref()
                    .map(|_| self.add(EVENTS, Kind::Counter, &l)),
                prediction: e
                    .prediction
                    .as_ref()
                    .map(|_| self.add(PREDICTION, Kind::Histogram, &l)),
                shadow: e.shadow.as_ref().map(|s| self.add_shadow(s, &e.name, v)),
                breaker: (e.breaker.is_some() && index != e.control).then(|| BreakerMetrics {
                    tripped: self.add(BREAKER_TRIPPED, Kind::Gauge, &l),
                    trips: BREAKER_REASONS.map(|r| {
                        self.add(BREAKER_TRIPS, Kind::Counter, &[l[0], l[1], ("reason", r)])
                    }),
                }),
            });
        }
        ExperimentMetrics {
            config_revision,
            errors,
            overrides_denied,
            outcomes_unknown,
            events_rejected,
            prediction_invalid,
            variants,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn user_experiments_count_requests_by_replicate_group() {
        let plan = |unit: &str| {
            let json = format!(
                r#"{{"version": 1, "experiments": [{{"name": "e", "unit": {unit},
                    "variants": [{{"name": "control"}}, {{"name": "canary", "weight": 5}}]}}]}}"#
            );
            Plan::from_json(json.as_bytes())
        };
        let user =
            plan(r#"{"type": "user", "keys": [{"header": "x-user-id"}]}"#).expect("valid config");
        let c = Catalog::for_plan(&user);
        for (v, name) in c.experiments[0].variants.iter().zip(["control", "canary"]) {
            assert_eq!(v.replicates.len(), REPLICATES);
            for (r, &i) in v.replicates.iter().enumerate() {
                assert_eq!(
                    c.specs[i].name,
                    format!(
                        "{REPLICATE_REQUESTS}.experiment=.=e;.;variant=.={name};.;replicate=.={r};.;"
                    )
                );
                assert_eq!(c.specs[i].kind, Kind::Counter);
            }
        }
        // Requests assigned one by one are independent already: no groups needed.
        let request = plan(r#"{"type": "request"}"#).expect("valid config");
        let c = Catalog::for_plan(&request);
        assert!(c.experiments[0]
            .variants
            .iter()
            .all(|v| v.replicates.is_empty()));
    }

    #[test]
    fn labels_are_encoded_for_stats_tags() {
        assert_eq!(
            name(REQUESTS, &[("experiment", "exp1"), ("variant", "canary")]),
            "sluice_requests_total.experiment=.=exp1;.;variant=.=canary;.;"
        );
        assert_eq!(name(SHADOW_BYTES_IN_FLIGHT, &[]), SHADOW_BYTES_IN_FLIGHT);
    }

    /// The labels of every metric a full configuration defines, as encoded in its name.
    fn labels_of(name: &str) -> Vec<&str> {
        name.split(TAG_END)
            .filter_map(|part| part.split_once(TAG_SEPARATOR).map(|(k, _)| k))
            .filter_map(|k| k.rsplit('.').next())
            .collect()
    }

    /// What Envoy does with a name given one `stats_tags` regex per label, in order: removes
    /// the first group of the first match and keeps the second as the label's value, then
    /// drops a `.` left at the end. Written without a regex engine for the one shape
    /// [`tag_regex`] has: `<label>=.=`, then the shortest value up to `;.;`.
    fn extract(name: &str, labels: &[&str]) -> (String, Vec<(String, String)>) {
        let mut rest = name.to_string();
        let mut found = Vec::new();
        for label in labels {
            let open = format!("{label}{TAG_SEPARATOR}");
            let Some(start) = rest.find(&open) else {
                continue;
            };
            let value_start = start + open.len();
            let Some(len) = rest[value_start..].find(TAG_END) else {
                continue;
            };
            found.push((
                label.to_string(),
                rest[value_start..value_start + len].to_string(),
            ));
            rest.replace_range(start..value_start + len + TAG_END.len(), "");
        }
        if let Some(stripped) = rest.strip_suffix('.') {
            rest = stripped.to_string();
        }
        (rest, found)
    }

    #[test]
    fn every_name_leaves_its_base_and_labels_after_istio_tag_extraction() {
        let example = crate::config::tests::readme_example();
        let plan = Plan::from_json(example.as_bytes())
            .expect("the README example is valid (config tests)");
        let catalog = Catalog::for_plan(&plan);
        let bases = [
            REQUESTS,
            REPLICATE_REQUESTS,
            RESPONSES,
            LOCAL_REPLIES,
            UPSTREAM_RESETS,
            LATENCY,
            OUTCOMES,
            OUTCOMES_UNKNOWN,
            PREDICTION,
            PREDICTION_INVALID,
            MISSING_KEY,
            OVERRIDES,
            OVERRIDES_DENIED,
            EVENTS,
            EVENTS_REJECTED,
            ERRORS,
            SHADOW_REQUESTS,
            SHADOW_SKIPPED,
            SHADOW_COMPARED,
            SHADOW_AGREE,
            SHADOW_DISAGREE,
            SHADOW_MISSING,
            SHADOW_ERRORS,
            SHADOW_5XX,
            SHADOW_TIMEOUTS,
            SHADOW_BYTES_IN_FLIGHT,
            SHADOW_LATENCY,
            SHADOW_DELTA,
            CONFIG_REVISION,
        ];
        for spec in &catalog.specs {
            let (left, labels) = extract(&spec.name, &LABELS);
            assert!(
                bases.contains(&left.as_str()),
                "{} leaves {left}",
                spec.name
            );
            // Extraction runs in LABELS order, the name in the catalog's: same set of labels.
            let mut labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            labels.sort_by_key(|(k, _)| spec.name.find(&format!("{k}{TAG_SEPARATOR}")));
            assert_eq!(name(&left, &labels), spec.name);
        }
    }

    /// Tag regexes are not anchored: `(t=\.=(.*?);\.;)` would also match the end of
    /// `experiment=.=`. Values cannot hold `=`, so only a label that ends another one can steal
    /// its value; none of the filter's own does.
    #[test]
    fn no_label_ends_another() {
        for a in LABELS {
            for b in LABELS {
                assert!(a == b || !b.ends_with(a), "{b} ends with {a}");
            }
        }
    }

    #[test]
    fn the_tag_regex_is_istios() {
        assert_eq!(tag_regex("variant"), r"(variant=\.=(.*?);\.;)");
    }

    #[test]
    fn every_experiment_has_a_revision_gauge() {
        let example = crate::config::tests::readme_example();
        let plan = Plan::from_json(example.as_bytes())
            .expect("the README example is valid (config tests)");
        let catalog = Catalog::for_plan(&plan);
        for (e, m) in plan.experiments.iter().zip(&catalog.experiments) {
            let spec = &catalog.specs[m.config_revision];
            assert_eq!(spec.kind, Kind::Gauge);
            assert_eq!(
                spec.name,
                format!("{CONFIG_REVISION}.experiment=.={};.;", e.name)
            );
        }
    }

    #[test]
    fn a_breaker_gives_each_treatment_a_gauge_and_a_counter_per_reason() {
        let plan = |breaker: &str| {
            let json = format!(
                r#"{{"version": 1, "experiments": [{{"name": "e", "unit": {{"type": "request"}},
                    "variants": [{{"name": "a", "weight": 50}}, {{"name": "b", "control": true}},
                                 {{"name": "c", "weight": 10}}]{breaker}}}]}}"#
            );
            Plan::from_json(json.as_bytes()).expect("valid config")
        };
        let without = Catalog::for_plan(&plan(""));
        assert!(without.experiments[0]
            .variants
            .iter()
            .all(|v| v.breaker.is_none()));
        assert!(!without
            .specs
            .iter()
            .any(|s| s.name.starts_with("sluice_breaker")));
        let with = Catalog::for_plan(&plan(r#", "breaker": {"min_requests": 20}"#));
        let variants = &with.experiments[0].variants;
        // The control (b) is never tripped: no breaker metrics for it.
        assert!(variants[1].breaker.is_none());
        for (v, name) in [(0, "a"), (2, "c")] {
            let Some(b) = &variants[v].breaker else {
                unreachable!("treatment {name} has breaker metrics")
            };
            let gauge = &with.specs[b.tripped];
            assert_eq!(gauge.kind, Kind::Gauge);
            assert_eq!(
                gauge.name,
                format!("{BREAKER_TRIPPED}.experiment=.=e;.;variant=.={name};.;")
            );
            for (pos, reason) in b.trips.iter().zip(BREAKER_REASONS) {
                let counter = &with.specs[*pos];
                assert_eq!(counter.kind, Kind::Counter);
                assert_eq!(
                    counter.name,
                    format!(
                        "{BREAKER_TRIPS}.experiment=.=e;.;variant=.={name};.;reason=.={reason};.;"
                    )
                );
            }
        }
    }

    #[test]
    fn every_label_is_listed_and_has_a_stats_tag_in_the_shipped_bootstraps() {
        let example = crate::config::tests::readme_example();
        let plan = Plan::from_json(example.as_bytes())
            .expect("the README example is valid (config tests)");
        let catalog = Catalog::for_plan(&plan);
        let mut used: Vec<&str> = catalog
            .specs
            .iter()
            .flat_map(|s| labels_of(&s.name))
            .collect();
        used.sort_unstable();
        used.dedup();
        for label in &used {
            assert!(LABELS.contains(label), "label {label} missing from LABELS");
        }
        for (path, bootstrap) in [
            ("envoy/ecds.yaml", include_str!("../../envoy/ecds.yaml")),
            ("envoy/demo.yaml", include_str!("../../envoy/demo.yaml")),
            (
                "envoy/demo-rollout.yaml",
                include_str!("../../envoy/demo-rollout.yaml"),
            ),
            ("README.md", include_str!("../../README.md")),
        ] {
            for label in LABELS {
                assert!(
                    bootstrap.contains(&format!("tag_name: {label}")),
                    "{path} has no stats_tag for {label}"
                );
                assert!(
                    bootstrap.contains(&format!("'{}'", tag_regex(label))),
                    "{path} has not the regex {} for {label}",
                    tag_regex(label)
                );
            }
        }
    }
}
