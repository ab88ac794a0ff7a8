//! The Envoy admin source: `/stats/prometheus` of every listed Envoy, scraped concurrently
//! over one kept-alive connection per Envoy ([`conn`]), in Prometheus' protobuf format (Envoy
//! 1.40 writes it when asked; an Envoy answering in text is read as well).
//!
//! Rollouts of one controller often read the same Envoys. They share an [`AdminHub`]: one
//! request per Envoy and tick asks for every experiment read there lately (Envoy filters by
//! stat name), the answer is parsed once and split by experiment, and a rollout asking within
//! the sharing window of an earlier request gets its part of that answer instead of a new
//! request. Rollout ticks fall on multiples of their interval (see the daemon), so rollouts
//! with the same interval ask at the same moments.
//!
//! A steady tick allocates little however large the fleet: an answer is read into the value
//! buffers of the endpoint's last answer once no rollout holds them, and against a slot table
//! (see [`series::Slots`]) shared by every endpoint that writes the same series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sluice_filter::metrics;
use tokio::sync::watch;
use tokio::time::Instant;

use super::exposition::{self, Format};
use super::series::{self, Admission, ExperimentId, SeriesId, SeriesKey, Slot, SlotTables, Slots};
use super::{Identity, Limits, OriginScrape, Source, SourceError};
use crate::source::admin::{encode, experiments_filter};

mod conn;

/// Longest a scrape is shared: a rollout is never handed data older than this.
const SHARE_AT_MOST: Duration = Duration::from_secs(1);

/// The Envoy admin endpoints one controller reads, shared by its rollouts.
#[derive(Debug, Default)]
pub struct AdminHub {
    endpoints: Mutex<HashMap<Arc<str>, Arc<Endpoint>>>,
    /// Sweeps in flight, by endpoint list: a rollout reading the same list as a sweep in
    /// progress waits for it as a whole, then takes its parts (see [`EnvoyAdmin::scrape`]).
    sweeps: Mutex<HashMap<Arc<str>, watch::Receiver<bool>>>,
    /// The endpoints' slot tables, shared among endpoints that write the same series.
    slot_tables: Mutex<SlotTables>,
    /// Id lists of answers' parts lately, by experiment, shared among endpoints that write
    /// the same series in the same order (see [`OriginScrape::ids`]).
    id_lists: Mutex<HashMap<ExperimentId, Vec<Arc<[SeriesId]>>>>,
}

/// Different id lists kept per experiment for sharing (Envoys of a few kinds).
const ID_LISTS_KEPT: usize = 4;

#[derive(Debug)]
struct Endpoint {
    base: Arc<str>,
    /// Where `base` points, or why it cannot be read.
    target: Result<conn::Target, conn::ConnError>,
    state: tokio::sync::Mutex<EndpointState>,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Experiments read here lately, by name.
    wanted: Vec<Wanted>,
    /// The experiments the last request asked for, and its path and query.
    asked: (Vec<ExperimentId>, String),
    last: Option<Fetched>,
    conn: conn::Conn,
    /// Series slots of the last answer, in order (see [`exposition::Reader`]).
    slots: Slots,
    /// Where a read writes each part's ids, before they are shared.
    ids: Vec<Vec<SeriesId>>,
}

/// An experiment read at an endpoint lately, and until when it is asked for.
#[derive(Debug)]
struct Wanted {
    id: ExperimentId,
    name: Arc<str>,
    /// The experiment's variants, when the rollout said (others are not kept).
    variants: Option<Arc<[String]>>,
    until: Instant,
}

/// A histogram's bucket label, the one label of the filter's series that Envoy adds itself.
/// The others are [`sluice_filter::metrics::LABELS`]: Envoy makes labels only from the
/// bootstrap's `stats_tags`, so a series with any other label is not one the filter wrote; it is
/// counted, not kept.
const BUCKET_LABEL: &str = "le";

/// Which new series of an answer are kept: those of an experiment asked for, of one of its
/// variants (or of the experiment as a whole), with the filter's labels only.
fn admission(wanted: &[Wanted], key: &SeriesKey) -> Admission {
    let Some(experiment) = key.label("experiment") else {
        return Admission::Unlabelled;
    };
    let Some(w) = wanted.iter().find(|w| &*w.name == experiment) else {
        return Admission::Unknown;
    };
    let known_variant = match (key.label("variant"), &w.variants) {
        (Some(v), Some(vs)) => vs.iter().any(|k| k == v),
        _ => true,
    };
    if known_variant
        && key
            .labels
            .iter()
            .all(|(k, _)| k == BUCKET_LABEL || sluice_filter::metrics::LABELS.contains(&k.as_str()))
    {
        Admission::Keep
    } else {
        Admission::Unknown
    }
}

/// The request for the series of `experiments` (sorted) and the proxy's identity gauges.
fn query(experiments: &[&str]) -> String {
    // `filter` is matched against the stat's name before tag extraction
    // (`wasmcustom.sluice_requests_total.experiment=.=<name>;.;variant=.=<v>;.;`), so Envoy
    // itself leaves out other experiments' series: a proxy serving many experiments answers
    // with the asked-for share only. `server.uptime` and `server.hot_restart_epoch` tell
    // one Envoy process from another (see [`Identity`]).
    let filter = format!(
        "{}|^server\\.(uptime|hot_restart_epoch)$",
        experiments_filter(experiments)
    );
    format!("/stats/prometheus?filter={}", encode(&filter))
}

/// One answer's values, by experiment.
type Parts = Vec<(ExperimentId, Values)>;

/// One origin's values of one experiment, and their series.
#[derive(Debug, Clone, Default)]
struct Values {
    ids: Arc<[SeriesId]>,
    values: Arc<Vec<f64>>,
    identity: Option<Identity>,
    unknown: usize,
}

/// A part being read: its experiment, ids and values.
type Buffer = (ExperimentId, Vec<SeriesId>, Vec<f64>);

impl EndpointState {
    /// Notes that `experiment` is read here; its part of the last answer if that is fresh
    /// enough and has it.
    fn shared(
        &mut self,
        experiment: &str,
        id: ExperimentId,
        reader: &Reader,
        now: Instant,
    ) -> Option<Result<Values, ReadError>> {
        let until = now + reader.keep;
        match self.wanted.iter_mut().find(|w| w.id == id) {
            Some(w) => {
                w.until = w.until.max(until);
                // Rollouts of one experiment that name other variants: keep all of them (the
                // first comparison settles the common case, the rollout that added it).
                match (&w.variants, &reader.variants) {
                    (None, _) => {}
                    (Some(a), Some(b)) if Arc::ptr_eq(a, b) || b.iter().all(|v| a.contains(v)) => {}
                    (Some(a), Some(b)) => {
                        let mut all: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
                        all.sort();
                        all.dedup();
                        w.variants = Some(all.into());
                    }
                    (Some(_), None) => w.variants = None,
                }
            }
            None => {
                let at = self.wanted.partition_point(|w| &*w.name < experiment);
                let name = Arc::from(experiment);
                let variants = reader.variants.clone();
                self.wanted.insert(
                    at,
                    Wanted {
                        id,
                        name,
                        variants,
                        until,
                    },
                );
            }
        }
        let last = self.last.as_ref()?;
        (now.duration_since(last.started) <= reader.share_within && last.covers.contains(&id))
            .then(|| last.part(id))
    }
}

/// Why an endpoint gave no values: `answered` if it did answer, with something that is not
/// a usable exposition (rather than not at all).
#[derive(Debug, Clone)]
struct ReadError {
    answered: bool,
    reason: String,
}

impl ReadError {
    fn unreachable(reason: String) -> ReadError {
        ReadError {
            answered: false,
            reason,
        }
    }

    fn invalid(reason: String) -> ReadError {
        ReadError {
            answered: true,
            reason,
        }
    }
}

/// One request's outcome: values by experiment, or why there are none.
#[derive(Debug)]
struct Fetched {
    started: Instant,
    covers: Vec<ExperimentId>,
    result: Result<Parts, ReadError>,
}

impl Fetched {
    fn part(&self, experiment: ExperimentId) -> Result<Values, ReadError> {
        match &self.result {
            Ok(parts) => Ok(parts
                .iter()
                .find(|(e, _)| *e == experiment)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Empty buffers for the next answer's parts, one per experiment of `covers`: this
    /// answer's own buffers where no rollout holds them any more (rollouts drop their parts
    /// once counted, so in a steady state a tick allocates none), sized as this answer's
    /// part otherwise.
    fn into_buffers(self, covers: &[ExperimentId], ids: &mut Vec<Vec<SeriesId>>) -> Vec<Buffer> {
        let mut old = self.result.unwrap_or_default();
        covers
            .iter()
            .map(|&e| {
                let buffer = match old.iter().position(|(o, _)| *o == e) {
                    Some(i) => match Arc::try_unwrap(old.swap_remove(i).1.values) {
                        Ok(mut values) => {
                            values.clear();
                            values
                        }
                        Err(held) => Vec::with_capacity(held.len()),
                    },
                    None => Vec::new(),
                };
                let mut part_ids = ids.pop().unwrap_or_default();
                part_ids.clear();
                (e, part_ids, buffer)
            })
            .collect()
    }
}

/// How a rollout reads through the hub.
#[derive(Debug, Clone)]
struct Reader {
    timeout: Duration,
    limits: Limits,
    /// The experiment's variants (others are counted, not kept); `None`: any.
    variants: Option<Arc<[String]>>,
    /// An answer whose request started at most this long ago is reused.
    share_within: Duration,
    /// How long the experiment stays in the requests after this read.
    keep: Duration,
}

impl AdminHub {
    pub fn new() -> Arc<AdminHub> {
        Arc::new(AdminHub::default())
    }

    fn endpoint(&self, base: &Arc<str>) -> Arc<Endpoint> {
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(base.clone())
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    base: base.clone(),
                    target: conn::Target::parse(base),
                    state: tokio::sync::Mutex::new(EndpointState::default()),
                })
            })
            .clone()
    }

    /// The parts of an answer read into `parts`, each with an id list shared with other
    /// endpoints' answers where equal; the emptied id buffers go back to `spare`.
    fn share_ids(
        &self,
        parts: Vec<Buffer>,
        spare: &mut Vec<Vec<SeriesId>>,
        identity: Option<Identity>,
        unknown: usize,
    ) -> Parts {
        let mut lists = self.id_lists.lock().unwrap_or_else(|p| p.into_inner());
        parts
            .into_iter()
            .map(|(e, mut ids, values)| {
                let kept = lists.entry(e).or_default();
                let shared = match kept.iter().position(|l| **l == *ids) {
                    Some(i) => kept[i].clone(),
                    None => {
                        if kept.len() == ID_LISTS_KEPT {
                            kept.remove(0);
                        }
                        kept.push(Arc::from(ids.as_slice()));
                        kept[kept.len() - 1].clone()
                    }
                };
                ids.clear();
                spare.push(ids);
                let values = Arc::new(values);
                (
                    e,
                    Values {
                        ids: shared,
                        values,
                        identity,
                        unknown,
                    },
                )
            })
            .collect()
    }

    /// `experiment`'s series (`id` is its number) at `endpoint`, from a fresh enough shared
    /// answer or a new request.
    async fn read(
        &self,
        endpoint: &Endpoint,
        experiment: &str,
        id: ExperimentId,
        reader: &Reader,
    ) -> Result<Values, ReadError> {
        // Readers of one endpoint queue here: the first one's request serves those behind it.
        let mut guard = endpoint.state.lock().await;
        let state = &mut *guard;
        let now = Instant::now();
        if let Some(part) = state.shared(experiment, id, reader, now) {
            return part;
        }
        state.wanted.retain(|w| w.until >= now);
        let covers: Vec<ExperimentId> = state.wanted.iter().map(|w| w.id).collect();
        if state.asked.0 != covers {
            let names: Vec<&str> = state.wanted.iter().map(|w| &*w.name).collect();
            state.asked = (covers.clone(), query(&names));
        }
        let mut parts = match state.last.take() {
            Some(last) => last.into_buffers(&covers, &mut state.ids),
            None => covers
                .iter()
                .map(|&e| (e, Vec::new(), Vec::new()))
                .collect(),
        };
        let asked_at = SystemTime::now();
        let read = match &endpoint.target {
            Ok(target) => {
                let wanted = &state.wanted;
                let admit = |key: &SeriesKey| admission(wanted, key);
                let answer = read_answer(
                    &mut state.conn,
                    target,
                    &state.asked.1,
                    &mut state.slots,
                    &mut parts,
                    (reader.timeout, reader.limits.caps()),
                    &admit,
                );
                match tokio::time::timeout(reader.timeout, answer).await {
                    Ok(read) => read,
                    Err(_) => Err(ReadError::unreachable(format!(
                        "no answer within {:?}",
                        reader.timeout
                    ))),
                }
            }
            Err(e) => Err(ReadError::unreachable(e.to_string())),
        };
        self.slot_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .share(&mut state.slots);
        let result = match read {
            Ok(tally) => {
                let identity = tally.uptime.map(|uptime| Identity {
                    uptime,
                    hot_restart_epoch: tally.hot_restart_epoch.unwrap_or(0.0),
                    at: asked_at,
                });
                Ok(self.share_ids(parts, &mut state.ids, identity, tally.unknown))
            }
            Err(e) => {
                state.conn.drop_connection();
                Err(ReadError {
                    reason: format!("{}/stats/prometheus: {}", endpoint.base, e.reason),
                    ..e
                })
            }
        };
        let fetched = Fetched {
            started: now,
            covers,
            result,
        };
        let part = fetched.part(id);
        state.last = Some(fetched);
        part
    }
}

/// Sends `query` (see [`query`]) and reads the answer, as it arrives, into `parts` (one
/// entry per experiment asked for); what the answer held besides.
async fn read_answer(
    conn: &mut conn::Conn,
    target: &conn::Target,
    query: &str,
    slots: &mut Slots,
    parts: &mut [Buffer],
    (timeout, caps): (Duration, exposition::Caps),
    admit: series::Admit<'_>,
) -> Result<exposition::Tally, ReadError> {
    let head = conn
        .get(target, query, Format::Protobuf.accept(), timeout)
        .await
        .map_err(|e| ReadError::unreachable(e.to_string()))?;
    if !(200..300).contains(&head.status) {
        return Err(ReadError::invalid(format!("HTTP status {}", head.status)));
    }
    let format = match head.content_type.as_deref() {
        None => Format::Text,
        Some(t) => {
            let t = t.trim_start();
            let is = |prefix: &str| {
                t.as_bytes()
                    .get(..prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
            };
            if is("application/vnd.google.protobuf") {
                Format::Protobuf
            } else if is("text/plain") || is("application/openmetrics-text") {
                Format::Text
            } else {
                return Err(ReadError::invalid(format!(
                    "the answer is {t:?}, not a Prometheus exposition: is this an Envoy admin address?"
                )));
            }
        }
    };
    let mut reader = exposition::AnyReader::with(format, metrics::PREFIX, slots, caps, admit);
    let mut current = 0;
    let mut each = |slot: &Slot, value: f64| {
        if parts
            .get(current)
            .is_none_or(|(e, _, _)| *e != slot.experiment)
        {
            match parts.iter().position(|(e, _, _)| *e == slot.experiment) {
                Some(i) => current = i,
                // Not asked for (Envoy's filter let it through): not ours to count.
                None => return,
            }
        }
        let (_, ids, values) = &mut parts[current];
        ids.push(slot.id);
        values.push(value);
    };
    // A body that breaks off is a connection problem; one that cannot be read, an invalid
    // answer.
    conn.read_body(&mut |chunk: &[u8]| reader.feed(chunk, &mut each))
        .await
        .map_err(|e| match e {
            conn::BodyError::Data(e) => ReadError::invalid(e.to_string()),
            conn::BodyError::Conn(e) => ReadError::unreachable(e.to_string()),
        })?;
    let tally = reader
        .finish(&mut each)
        .map_err(|e| ReadError::invalid(e.to_string()))?;
    if tally.unlabelled > 0 {
        return Err(ReadError::invalid(format!(
            "{} sluice series found without experiment/variant labels: add the stats_tags from envoy/ecds.yaml to the Envoy bootstrap",
            tally.unlabelled
        )));
    }
    Ok(tally)
}

/// Scrapes a fixed list of Envoy admin endpoints.
#[derive(Debug, Clone)]
pub struct EnvoyAdmin {
    hub: Arc<AdminHub>,
    endpoints: Vec<Arc<Endpoint>>,
    /// The endpoint list, as one key.
    list: Arc<str>,
    reader: Reader,
    /// Fewest endpoints that must answer for the data to count (default: all of them).
    min_healthy: usize,
}

impl EnvoyAdmin {
    /// A source with its own connections that never reuses an answer.
    pub fn new(endpoints: &[String], timeout: Duration, min_healthy: Option<usize>) -> EnvoyAdmin {
        EnvoyAdmin::shared(
            &AdminHub::new(),
            endpoints,
            timeout,
            min_healthy,
            Duration::ZERO,
        )
    }

    /// A source reading through `hub`, for a rollout evaluated every `interval`: answers are
    /// shared with other rollouts for up to half an interval (at most a second).
    pub fn shared(
        hub: &Arc<AdminHub>,
        endpoints: &[String],
        timeout: Duration,
        min_healthy: Option<usize>,
        interval: Duration,
    ) -> EnvoyAdmin {
        let endpoints: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .map(|e| hub.endpoint(&Arc::from(e.trim_end_matches('/'))))
            .collect();
        let list = endpoints
            .iter()
            .map(|e| &*e.base)
            .collect::<Vec<_>>()
            .join("\n");
        let min_healthy = min_healthy
            .unwrap_or(endpoints.len())
            .clamp(1, endpoints.len().max(1));
        EnvoyAdmin {
            hub: hub.clone(),
            endpoints,
            list: Arc::from(list),
            reader: Reader {
                timeout,
                limits: Limits::default(),
                variants: None,
                share_within: (interval / 2).min(SHARE_AT_MOST),
                keep: interval * 3 + Duration::from_secs(10),
            },
            min_healthy,
        }
    }

    /// This source within `limits`.
    pub fn limits(mut self, limits: Limits) -> EnvoyAdmin {
        self.reader.limits = limits;
        self
    }

    /// This source keeping only the series of `variants` (the others are counted in
    /// [`OriginScrape::unknown`]).
    pub fn variants(mut self, variants: &[String]) -> EnvoyAdmin {
        self.reader.variants = Some(variants.into());
        self
    }
}

impl Source for EnvoyAdmin {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let id = series::experiment(experiment);
        // Rollouts tick together: if another one is sweeping the same endpoints, wait for
        // it once, instead of once per endpoint.
        let sweeping = {
            let mut sweeps = self.hub.sweeps.lock().unwrap_or_else(|p| p.into_inner());
            match sweeps.get(&self.list) {
                Some(done) if !*done.borrow() => Err(done.clone()),
                _ => {
                    let (tx, rx) = watch::channel(false);
                    sweeps.insert(self.list.clone(), rx);
                    Ok(tx)
                }
            }
        };
        let sweeping = match sweeping {
            Ok(tx) => Some(tx),
            Err(mut done) => {
                // Closed (the sweep was dropped) counts as done.
                let _ = done.wait_for(|d| *d).await;
                None
            }
        };
        // Fresh answers that have this experiment are taken as they are; the other
        // endpoints are asked, concurrently, in this task.
        let now = Instant::now();
        let mut results: Vec<Option<Result<Values, ReadError>>> = self
            .endpoints
            .iter()
            .map(|e| {
                let mut state = e.state.try_lock().ok()?;
                state.shared(experiment, id, &self.reader, now)
            })
            .collect();
        let missing: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].is_none())
            .collect();
        let reads = missing.iter().map(|&i| {
            self.hub
                .read(&self.endpoints[i], experiment, id, &self.reader)
        });
        for (i, r) in missing
            .iter()
            .zip(futures_util::future::join_all(reads).await)
        {
            results[*i] = Some(r);
        }
        if let Some(done) = sweeping {
            let _ = done.send(true);
        }
        let mut answered = Vec::with_capacity(self.endpoints.len());
        let mut failures = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Some(Ok(values)) => answered.push((i, values)),
                Some(Err(e)) => failures.push((i, e)),
                None => failures.push((i, ReadError::unreachable("not read".to_string()))),
            }
        }
        if answered.len() < self.min_healthy {
            if let ([(i, e)], 1) = (failures.as_slice(), self.endpoints.len()) {
                let origin = self.endpoints[*i].base.to_string();
                let reason = e.reason.clone();
                return Err(if e.answered {
                    SourceError::Invalid { origin, reason }
                } else {
                    SourceError::Unreachable { origin, reason }
                });
            }
            return Err(SourceError::TooFewOrigins {
                healthy: answered.len(),
                total: self.endpoints.len(),
                needed: self.min_healthy,
                first: failures
                    .first()
                    .map(|(_, e)| e.reason.clone())
                    .unwrap_or_default(),
            });
        }
        Ok(answered
            .into_iter()
            .map(|(i, part)| OriginScrape {
                origin: self.endpoints[i].base.clone(),
                ids: part.ids,
                values: part.values,
                identity: part.identity,
                unknown: part.unknown,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;

    /// A stand-in admin endpoint that answers each `filter=…(a|b);` with one requests counter
    /// per named experiment, valued with its own request number, and records the filters.
    async fn endpoint() -> (String, Arc<Mutex<Vec<Vec<String>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok();
        let Some(listener) = listener else {
            panic!("no loopback listener");
        };
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let query = req.uri().query().unwrap_or_default().replace("%7C", "|");
                        let names: Vec<String> = query
                            .split_once("%5C.experiment%3D%5C.%3D%28")
                            .and_then(|(_, rest)| rest.split_once("%29%3B"))
                            .map(|(names, _)| names.split('|').map(str::to_string).collect())
                            .unwrap_or_default();
                        let mut seen = log.lock().unwrap_or_else(|p| p.into_inner());
                        seen.push(names.clone());
                        let n = seen.len();
                        let body: String = names
                            .iter()
                            .map(|e| format!("sluice_requests_total{{experiment=\"{e}\",variant=\"canary\"}} {n}\n"))
                            .collect();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, seen)
    }

    /// (experiment of the only series, its value) of a one-origin scrape.
    fn only(scrape: Result<Vec<OriginScrape>, SourceError>) -> Option<(String, f64)> {
        let scrape = scrape.ok()?;
        let [origin] = scrape.as_slice() else {
            return None;
        };
        let ([id], [value]) = (&origin.ids[..], origin.values.as_slice()) else {
            return None;
        };
        Some((series::key(*id)?.label("experiment")?.to_string(), *value))
    }

    #[tokio::test]
    async fn rollouts_reading_one_envoy_share_its_scrape() {
        let (url, seen) = endpoint().await;
        let requests = || seen.lock().map(|s| s.clone()).unwrap_or_default();
        let hub = AdminHub::new();
        // Shared for up to half the interval: a second, the most there is, so that "within the
        // window" holds on a loaded machine too.
        let interval = Duration::from_secs(2);
        let window = interval / 2;
        let a = EnvoyAdmin::shared(
            &hub,
            std::slice::from_ref(&url),
            Duration::from_secs(2),
            None,
            interval,
        );
        let b = EnvoyAdmin::shared(
            &hub,
            std::slice::from_ref(&url),
            Duration::from_secs(2),
            None,
            interval,
        );

        // A new experiment is not in the last answer: it is asked for, with the others.
        assert_eq!(only(a.scrape("hub-a").await), Some(("hub-a".into(), 1.0)));
        assert_eq!(only(b.scrape("hub-b").await), Some(("hub-b".into(), 2.0)));
        assert_eq!(requests(), [vec!["hub-a"], vec!["hub-a", "hub-b"]]);
        // Within the window both are in the last answer.
        assert_eq!(only(a.scrape("hub-a").await), Some(("hub-a".into(), 2.0)));
        assert_eq!(requests().len(), 2);

        // Past the window (a sleep is at least as long as asked), two rollouts asking at once
        // make one request between them.
        tokio::time::sleep(window + Duration::from_millis(50)).await;
        let (ra, rb) = tokio::join!(a.scrape("hub-a"), b.scrape("hub-b"));
        assert_eq!(only(ra), Some(("hub-a".into(), 3.0)));
        assert_eq!(only(rb), Some(("hub-b".into(), 3.0)));
        assert_eq!(requests().len(), 3);

        // A source of its own never reuses an answer.
        let alone = EnvoyAdmin::new(&[url], Duration::from_secs(2), None);
        assert_eq!(
            only(alone.scrape("hub-a").await),
            Some(("hub-a".into(), 4.0))
        );
        assert_eq!(
            only(alone.scrape("hub-a").await),
            Some(("hub-a".into(), 5.0))
        );
        assert_eq!(requests()[4], ["hub-a"]);
    }

    #[tokio::test]
    async fn an_answer_reuses_the_buffers_of_the_last_one_unless_a_rollout_holds_them() {
        let (url, _) = endpoint().await;
        let source = EnvoyAdmin::new(&[url], Duration::from_secs(2), None);
        let values = |scrape: &[OriginScrape]| scrape.first().map(|o| o.values.clone());

        // Held: the next answer gets a buffer of its own and leaves the held one as it was.
        let first = source.scrape("reuse").await.ok().and_then(|s| values(&s));
        let second = source.scrape("reuse").await.ok().and_then(|s| values(&s));
        let (Some(first), Some(second)) = (first, second) else {
            panic!("no answers");
        };
        assert_eq!(first.first(), Some(&1.0));
        assert_eq!(second.first(), Some(&2.0));
        assert_ne!(first.as_ptr(), second.as_ptr());

        // Dropped once counted: the next answer is read into the same buffer.
        let at = second.as_ptr();
        drop(second);
        let third = source.scrape("reuse").await.ok().and_then(|s| values(&s));
        assert_eq!(third.as_ref().and_then(|v| v.first()).copied(), Some(3.0));
        assert_eq!(third.map(|v| v.as_ptr()), Some(at));
    }

    #[tokio::test]
    async fn endpoints_writing_the_same_series_share_one_id_list() {
        let (one, _) = endpoint().await;
        let (two, _) = endpoint().await;
        let source = EnvoyAdmin::new(&[one, two], Duration::from_secs(2), None);
        let scrape = source.scrape("ids").await.unwrap_or_default();
        let [a, b] = scrape.as_slice() else {
            panic!("two origins expected: {scrape:?}");
        };
        assert!(Arc::ptr_eq(&a.ids, &b.ids));
        assert_eq!(a.ids.len(), 1);
        // Another experiment's series are another list.
        let other = source.scrape("ids-other").await.unwrap_or_default();
        assert!(other
            .iter()
            .all(|o| o.ids.len() == 1 && o.ids[0] != a.ids[0]));
    }

    /// A stand-in endpoint that answers every request with status 200, `content_type`, and
    /// the bytes `body` writes (then closes the connection).
    async fn raw_endpoint<F, Fut>(content_type: &'static str, body: F) -> String
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("no loopback listener");
        };
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
                    );
                    if stream.write_all(reply.as_bytes()).await.is_ok() {
                        body(stream).await;
                    }
                });
            }
        });
        url
    }

    fn fixed(
        text: String,
    ) -> impl Fn(
        tokio::net::TcpStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
           + Send
           + Sync
           + 'static {
        let text: Arc<str> = Arc::from(text);
        move |mut stream| {
            let text = text.clone();
            Box::pin(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(text.as_bytes()).await;
            })
        }
    }

    async fn error_of(source: &EnvoyAdmin, experiment: &str) -> String {
        match source.scrape(experiment).await {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn source(url: String) -> EnvoyAdmin {
        EnvoyAdmin::new(&[url], Duration::from_secs(2), None)
    }

    #[tokio::test]
    async fn answers_that_are_not_expositions_are_errors_that_say_why() {
        let html = raw_endpoint("text/html", fixed("<html><body>hi</body></html>\n".into())).await;
        let e = error_of(&source(html), "bad-html").await;
        assert!(e.contains("not a Prometheus exposition"), "{e}");

        let garbage = raw_endpoint("text/plain", fixed("hello world\n<p>\n".into())).await;
        let e = error_of(&source(garbage), "bad-garbage").await;
        assert!(e.contains("not a Prometheus sample"), "{e}");

        let nan = raw_endpoint(
            "text/plain",
            fixed("sluice_requests_total{experiment=\"bad-nan\",variant=\"canary\"} NaN\n".into()),
        )
        .await;
        let e = error_of(&source(nan), "bad-nan").await;
        assert!(e.contains("not a count"), "{e}");
        let inf = raw_endpoint(
            "text/plain",
            fixed("sluice_responses_total{experiment=\"bad-inf\",variant=\"canary\",class=\"5xx\"} +Inf\n".into()),
        )
        .await;
        let e = error_of(&source(inf), "bad-inf").await;
        assert!(e.contains("not a count"), "{e}");

        // What Envoy writes without the filter's stats_tags.
        let untagged = raw_endpoint(
            "text/plain",
            fixed("sluice_requests_total_experiment___bad_tags__variant___canary_ 5\n".into()),
        )
        .await;
        let e = error_of(&source(untagged), "bad-tags").await;
        assert!(
            e.contains("without experiment/variant labels") && e.contains("stats_tags"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn caps_on_line_length_series_and_body_fail_the_scrape_naming_them() {
        let endless = raw_endpoint(
            "text/plain",
            |mut stream: tokio::net::TcpStream| async move {
                use tokio::io::AsyncWriteExt;
                let chunk = vec![b'a'; 64 << 10];
                let _ = stream
                    .write_all(b"sluice_requests_total{experiment=\"")
                    .await;
                while stream.write_all(&chunk).await.is_ok() {}
            },
        )
        .await;
        // The line cap ends the scrape: a reader that kept going would end at the 2 s timeout
        // with a timeout error instead.
        let e = error_of(&source(endless), "cap-line").await;
        assert!(e.contains("maxLineBytes"), "{e}");

        let many: String = (0..30_000)
            .map(|i| {
                format!("sluice_requests_total{{experiment=\"cap-series\",variant=\"v{i}\"}} 1\n")
            })
            .collect();
        let many = raw_endpoint("text/plain", fixed(many)).await;
        // Counted whether kept or not (here none is: no such variants).
        let stable = ["stable".to_string()];
        let e = error_of(&source(many.clone()).variants(&stable), "cap-series").await;
        assert!(e.contains("maxSeries"), "{e}");
        let small = Limits {
            max_body_bytes: 64 << 10,
            ..Limits::default()
        };
        let e = error_of(&source(many).variants(&stable).limits(small), "cap-series").await;
        assert!(e.contains("maxBodyBytes"), "{e}");
    }

    #[tokio::test]
    async fn only_the_experiments_own_variants_are_kept_and_the_others_counted() {
        let body: String = ["stable", "canary"]
            .iter()
            .map(|v| format!("sluice_requests_total{{experiment=\"own\",variant=\"{v}\"}} 7\n"))
            // Every label the filter writes is kept (the replicate groups of the split test).
            .chain(std::iter::once(
                "sluice_replicate_requests_total{experiment=\"own\",variant=\"canary\",replicate=\"3\"} 2\n"
                    .to_string(),
            ))
            .chain((0..5000).map(|i| {
                format!("sluice_requests_total{{experiment=\"own\",variant=\"new{i}\"}} 1\n")
            }))
            .collect();
        let url = raw_endpoint("text/plain", fixed(body)).await;
        let source = source(url).variants(&["stable".into(), "canary".into()]);
        let before = series::interned();
        let scrape = source.scrape("own").await.unwrap_or_default();
        let [origin] = scrape.as_slice() else {
            panic!("one origin expected: {scrape:?}");
        };
        assert_eq!((origin.values.len(), origin.unknown), (3, 5000));
        // Other tests intern series concurrently, but far fewer than the 5000 left out.
        assert!(series::interned() < before + 1000);
    }
}
