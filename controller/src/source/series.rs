//! Series identities, interned once per process.
//!
//! Every distinct series (name and labels, origin labels dropped) gets a small number, a
//! [`SeriesId`], the first time any source sees it; after that sources and accumulators carry
//! numbers, not strings. Envoys running the same filter write the same series text
//! (`name{label="value",...}`), so the table stays as small as the set of series of the
//! experiments being read (a few hundred per experiment), however many Envoys report them.
//!
//! The table also remembers each series' experiment (its `experiment` label) as a number, so
//! one scrape of an Envoy can be split among the rollouts that read it without looking at
//! labels again.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

/// A series' number in this process.
pub type SeriesId = u32;

/// An experiment name's number in this process.
pub type ExperimentId = u32;

/// Series that carry no `experiment` label.
pub const NO_EXPERIMENT: ExperimentId = ExperimentId::MAX;

/// A number for the part of series text that several series of one exposition share (in
/// the protobuf format: a metric's family name and labels, which its buckets, sum and count
/// have in common); equal numbers mean equal bytes.
pub type GroupId = u32;

/// The group of series text that shares nothing with other series (the text format).
pub const NO_GROUP: GroupId = GroupId::MAX;

/// Most series texts this process interns, all origins and experiments together. Series are
/// kept for the life of the process (readings name them by id), so an endpoint that writes
/// ever new series must not make the table grow without end: past this many, a new series
/// is refused and the scrape that brought it fails. A rollout's experiment has a few hundred.
pub const MAX_INTERNED: usize = 100_000;

/// Most bytes of series text interned (see [`MAX_INTERNED`]): long label values must not
/// make a full table large.
pub const MAX_INTERNED_BYTES: usize = 32 << 20;

/// Whether a series read from an exposition is one a rollout reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Keep,
    /// A `sluice_` series without an `experiment` label: the proxy does not extract the
    /// filter's tags (its `stats_tags` are missing).
    Unlabelled,
    /// Another experiment's series, a variant the experiment does not have, or labels the
    /// filter does not write: counted, not kept.
    Unknown,
}

/// Decides which new series are kept; only called for series text never seen before.
pub type Admit<'a> = &'a (dyn Fn(&SeriesKey) -> Admission + Sync);

/// Keeps every series.
pub fn admit_all(_: &SeriesKey) -> Admission {
    Admission::Keep
}

/// Labels that identify where a series came from rather than what it counts; dropped when
/// series from different origins are summed.
const ORIGIN_LABELS: [&str; 4] = ["instance", "job", "pod", "envoy"];

/// One series' identity after origin labels are dropped: name and sorted labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl SeriesKey {
    /// The identity of a series named `name` with `labels` in any order; origin labels are
    /// dropped.
    pub fn new(name: String, labels: impl IntoIterator<Item = (String, String)>) -> SeriesKey {
        let mut labels: Vec<(String, String)> = labels
            .into_iter()
            .filter(|(k, _)| !ORIGIN_LABELS.contains(&k.as_str()))
            .collect();
        labels.sort();
        SeriesKey { name, labels }
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A series as one exposition wrote it, its id and experiment. `text` is what identifies the
/// series in that exposition's format: in the text format the bytes before the value, in the
/// protobuf format the family name and the metric's encoded labels (see
/// [`super::exposition::protobuf`]). Sources keep the slots of an endpoint's last scrape in order and
/// compare each new sample with the slot at the same position first, which is all the work an
/// unchanged sample needs. `group` numbers the first `group_len` bytes of `text` (see
/// [`GroupId`]): once one sample of a metric matched its slot, the metric's next samples only
/// compare the group number and what follows it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub text: Arc<[u8]>,
    pub id: SeriesId,
    pub experiment: ExperimentId,
    pub group: GroupId,
}

/// The slots of one origin's last answer, in order (see [`Slot`]), read through `Deref`.
///
/// Origins whose answers have the same series in the same order (a fleet of Envoys running
/// the same filters) share one table through [`SlotTables`]: reading a big fleet's answers
/// walks one table that stays in cache rather than one per origin. A reader that finds a
/// sample differing from its slot gets a table of its own ([`Slots::put`] copies a shared
/// table first).
#[derive(Debug, Clone, Default)]
pub struct Slots {
    table: Arc<Vec<Slot>>,
    /// Whether the table changed since it was last offered to [`SlotTables::share`].
    changed: bool,
}

impl std::ops::Deref for Slots {
    type Target = [Slot];

    fn deref(&self) -> &[Slot] {
        &self.table
    }
}

impl Slots {
    /// Makes `slot` the `n`th (there are at least `n`).
    pub fn put(&mut self, n: usize, slot: Slot) {
        self.changed = true;
        let table = Arc::make_mut(&mut self.table);
        match table.get_mut(n) {
            Some(s) => *s = slot,
            None => table.push(slot),
        }
    }

    /// Keeps the first `n` slots.
    pub fn truncate(&mut self, n: usize) {
        if self.table.len() > n {
            self.changed = true;
            Arc::make_mut(&mut self.table).truncate(n);
        }
    }

    /// Whether `self` and `other` are one shared table.
    pub fn shares(&self, other: &Slots) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }
}

/// The slot tables origins use, by content, so that origins with equal tables share one.
#[derive(Debug, Default)]
pub struct SlotTables {
    by_print: HashMap<u64, Vec<Arc<Vec<Slot>>>>,
}

impl SlotTables {
    /// After a read changed `slots`: a table in use with the same slots replaces it, or it
    /// becomes a table others can share. Tables no origin uses any more are forgotten.
    pub fn share(&mut self, slots: &mut Slots) {
        if !std::mem::take(&mut slots.changed) {
            return;
        }
        self.by_print.retain(|_, tables| {
            tables.retain(|t| Arc::strong_count(t) > 1);
            !tables.is_empty()
        });
        let print = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for s in slots.table.iter() {
                (s.id, s.group).hash(&mut h);
            }
            slots.table.len().hash(&mut h);
            h.finish()
        };
        let same = |a: &Slot, b: &Slot| {
            a.id == b.id
                && a.group == b.group
                && a.experiment == b.experiment
                && (Arc::ptr_eq(&a.text, &b.text) || a.text == b.text)
        };
        let tables = self.by_print.entry(print).or_default();
        match tables.iter().find(|t| {
            t.len() == slots.table.len()
                && t.iter().zip(slots.table.iter()).all(|(a, b)| same(a, b))
        }) {
            Some(t) => slots.table = t.clone(),
            None => tables.push(slots.table.clone()),
        }
    }
}

#[derive(Default)]
struct Table {
    keys: Vec<Arc<SeriesKey>>,
    experiment_of: Vec<ExperimentId>,
    by_key: HashMap<Arc<SeriesKey>, SeriesId>,
    by_text: HashMap<Arc<[u8]>, Slot>,
    groups: HashMap<Box<[u8]>, GroupId>,
    experiments: HashMap<Arc<str>, ExperimentId>,
    /// Bytes of series text in `by_text`.
    bytes: usize,
}

static TABLE: LazyLock<RwLock<Table>> = LazyLock::new(|| RwLock::new(Table::default()));

fn read() -> std::sync::RwLockReadGuard<'static, Table> {
    TABLE.read().unwrap_or_else(|p| p.into_inner())
}

fn write() -> std::sync::RwLockWriteGuard<'static, Table> {
    TABLE.write().unwrap_or_else(|p| p.into_inner())
}

impl Table {
    fn experiment(&mut self, name: &str) -> ExperimentId {
        if let Some(&e) = self.experiments.get(name) {
            return e;
        }
        let e = ExperimentId::try_from(self.experiments.len()).unwrap_or(NO_EXPERIMENT - 1);
        self.experiments.insert(Arc::from(name), e);
        e
    }

    fn key(&mut self, key: SeriesKey) -> SeriesId {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        let experiment = key
            .label("experiment")
            .map_or(NO_EXPERIMENT, |e| self.experiment(e));
        let id = SeriesId::try_from(self.keys.len()).unwrap_or(SeriesId::MAX);
        let key = Arc::new(key);
        self.keys.push(key.clone());
        self.experiment_of.push(experiment);
        self.by_key.insert(key, id);
        id
    }

    fn group(&mut self, shared: &[u8]) -> GroupId {
        if let Some(&g) = self.groups.get(shared) {
            return g;
        }
        let g = GroupId::try_from(self.groups.len()).unwrap_or(NO_GROUP - 1);
        self.groups.insert(shared.into(), g);
        g
    }
}

/// The id of `key`, given one if new.
pub fn intern(key: SeriesKey) -> SeriesId {
    if let Some(&id) = read().by_key.get(&key) {
        return id;
    }
    write().key(key)
}

/// Why a new series was not interned: the process-wide table is full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InternError {
    #[error("over {MAX_INTERNED} distinct series read since the controller started: the source writes ever new series")]
    Series,
    #[error("over {MAX_INTERNED} distinct series (or {} MiB of series text) read since the controller started: the endpoint writes ever new series", MAX_INTERNED_BYTES >> 20)]
    Text,
}

/// [`intern`], refusing a new series once the table holds [`MAX_INTERNED`].
pub fn try_intern(key: SeriesKey) -> Result<SeriesId, InternError> {
    if let Some(&id) = read().by_key.get(&key) {
        return Ok(id);
    }
    let mut table = write();
    if table.keys.len() >= MAX_INTERNED {
        return Err(InternError::Series);
    }
    Ok(table.key(key))
}

/// The slot of a series written as `text` in some exposition format, whose first
/// `group_len` bytes it shares with other series (0: none); `key` says which series that is,
/// and is only called for text never seen before, which is interned only if `admit` keeps
/// it (`Ok(Err(why))` otherwise) and the table has room; an error of `key` is handed back.
pub fn slot_of<E: From<InternError>>(
    text: &[u8],
    group_len: usize,
    admit: Admit<'_>,
    key: impl FnOnce() -> Result<SeriesKey, E>,
) -> Result<Result<Slot, Admission>, E> {
    if let Some(s) = read().by_text.get(text) {
        return Ok(Ok(s.clone()));
    }
    let key = key()?;
    match admit(&key) {
        Admission::Keep => {}
        other => return Ok(Err(other)),
    }
    let mut table = write();
    if table.by_text.len() >= MAX_INTERNED || table.bytes + text.len() > MAX_INTERNED_BYTES {
        return Err(InternError::Text.into());
    }
    table.bytes += text.len();
    let id = table.key(key);
    let group = match text.get(..group_len) {
        Some(shared) if group_len > 0 => table.group(shared),
        _ => NO_GROUP,
    };
    let slot = Slot {
        text: Arc::from(text),
        id,
        experiment: table.experiment_of[id as usize],
        group,
    };
    table.by_text.insert(slot.text.clone(), slot.clone());
    Ok(Ok(slot))
}

/// Distinct series texts interned so far (see [`MAX_INTERNED`]).
pub fn interned() -> usize {
    read().by_text.len()
}

/// The number of experiment `name`.
pub fn experiment(name: &str) -> ExperimentId {
    if let Some(&e) = read().experiments.get(name) {
        return e;
    }
    write().experiment(name)
}

/// The identity of series `id` (`None` for an id this process never gave out).
pub fn key(id: SeriesId) -> Option<Arc<SeriesKey>> {
    read().keys.get(id as usize).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::exposition::slot;

    #[test]
    fn the_same_series_written_differently_is_one_id() {
        let a = slot(r#"series_test_a{experiment="st",variant="x",instance="i1"}"#);
        let b = slot(r#"series_test_a{variant="x",instance="i2",experiment="st"}"#);
        let (Ok(a), Ok(b)) = (a, b) else {
            panic!("valid series text rejected");
        };
        assert_eq!(a.id, b.id, "origin labels and label order do not matter");
        assert_eq!(a.experiment, experiment("st"));
        let other = slot(r#"series_test_a{experiment="st",variant="y"}"#).map(|s| s.id);
        assert!(matches!(other, Ok(id) if id != a.id));
        let k = key(a.id).map(|k| (k.name.clone(), k.labels.len()));
        assert_eq!(k, Some(("series_test_a".to_string(), 2)));
        assert_eq!(
            slot("series_test_b").map(|s| s.experiment).ok(),
            Some(NO_EXPERIMENT)
        );
        assert!(slot(r#"bad{x=1}"#).is_err());
    }
}
