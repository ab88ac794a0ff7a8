//! The shadow's bookkeeping, pure: the per-plugin table of copies from capture to comparison,
//! the bytes each copy holds against the worker's budget, and every decision the host shim
//! makes about them — whether a body chunk is kept, what the send queue sends, skips or gives
//! up, when a copy's fate is known, when a replaced configuration is done. The shim
//! (`host/shadow.rs`) reads from the host, calls these and applies what they return.
//!
//! Bytes are held through a [`Ledger`]: the shim's keeps one budget per worker (shared by every
//! plugin and configuration generation in the VM) and mirrors it in a gauge; tests keep their
//! own.

use std::marker::PhantomData;
use std::rc::Rc;

use fnv::FnvHashMap;

use super::{decayed_max, fate, Answer, Fate, LogBudget, PrimaryNeeds, Reply, Shadow, Skip};

/// Where reserved bytes are counted. Static so that a [`Reservation`] can give its bytes back
/// when dropped without holding a reference.
pub trait Ledger {
    /// Takes `n` bytes if the total stays at or under `cap`; false (and nothing taken) if not.
    fn take(n: usize, cap: usize) -> bool;
    /// Gives back `n` bytes taken earlier.
    fn give_back(n: usize);
}

/// Bytes taken from the ledger, given back when dropped (so no path that forgets a copy can
/// leak budget).
pub struct Reservation<L: Ledger>(usize, PhantomData<L>);

impl<L: Ledger> Default for Reservation<L> {
    fn default() -> Self {
        Reservation(0, PhantomData)
    }
}

impl<L: Ledger> Reservation<L> {
    /// Takes `n` more bytes under `cap`; false (and nothing taken) if they do not fit.
    pub fn grow(&mut self, n: usize, cap: usize) -> bool {
        let ok = L::take(n, cap);
        if ok {
            self.0 += n;
        }
        ok
    }

    /// A new reservation of `n` bytes under `cap`, if they fit.
    pub fn take(n: usize, cap: usize) -> Option<Self> {
        let mut r = Self::default();
        r.grow(n, cap).then_some(r)
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.0
    }
}

impl<L: Ledger> Drop for Reservation<L> {
    fn drop(&mut self) {
        L::give_back(self.0);
    }
}

/// A copy being captured by its stream.
pub struct Capture<L: Ledger> {
    pub id: u64,
    pub experiment: usize,
    pub variant: usize,
    headers: Vec<(String, String)>,
    body: Answer,
    held: Reservation<L>,
}

impl<L: Ledger> Capture<L> {
    /// Whether a request body chunk of `size` bytes can join this copy under `cfg` (the
    /// copy's experiment's shadow, `None` if it has none any more); if so its bytes are held
    /// from now on. `Err` says why the copy is given up.
    pub fn admit_chunk(&mut self, size: usize, cfg: Option<&Shadow>) -> Result<(), Skip> {
        let cfg = cfg.ok_or(Skip::DispatchFailed)?;
        if !self.body.room_for(size, cfg.max_body_bytes) {
            return Err(Skip::BodyLimit);
        }
        if !self.held.grow(size, cfg.max_bytes_in_flight) {
            return Err(Skip::BytesInFlight);
        }
        Ok(())
    }

    /// Appends a chunk admitted by [`Capture::admit_chunk`].
    pub fn push_chunk(&mut self, chunk: &[u8]) {
        self.body.body.extend_from_slice(chunk);
    }
}

/// A copy's headers and body, ready to send, with the bytes they hold.
pub struct Request<L: Ledger> {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    _held: Reservation<L>,
}

/// The primary's answer once complete, shared by the copies of one request.
pub struct Primary<L: Ledger> {
    answer: Answer,
    /// Holding its body would have gone over the bytes cap: its copies are skipped.
    over_budget: bool,
    _held: Reservation<L>,
}

/// The primary's answer as it streams past, for the copies of one request.
pub struct PrimaryCapture<L: Ledger> {
    answer: Answer,
    limit: usize,
    cap: usize,
    needs_body: bool,
    over_budget: bool,
    held: Reservation<L>,
}

impl<L: Ledger> PrimaryCapture<L> {
    /// The primary's response headers are in: `configs` are the shadows of its copies.
    /// `content_length` lets a body known to be over the limit go unread from its first chunk.
    pub fn new<'a>(
        configs: impl IntoIterator<Item = &'a Shadow>,
        status: u16,
        content_length: Option<usize>,
    ) -> Self {
        let PrimaryNeeds {
            limit,
            cap,
            needs_body,
        } = PrimaryNeeds::of(configs);
        let mut answer = Answer {
            status,
            ..Answer::default()
        };
        if let Some(n) = content_length.filter(|_| needs_body) {
            answer.room_for(n, limit);
        }
        PrimaryCapture {
            answer,
            limit,
            cap,
            needs_body,
            over_budget: false,
            held: Reservation::default(),
        }
    }

    /// Whether to read a chunk of `size` bytes of the primary's body; if so its bytes are
    /// held. A chunk that would go over the bytes cap drops the body and marks the primary
    /// over budget (its copies are skipped).
    pub fn admit_chunk(&mut self, size: usize) -> bool {
        if !self.needs_body
            || size == 0
            || self.over_budget
            || !self.answer.room_for(size, self.limit)
        {
            return false;
        }
        if !self.held.grow(size, self.cap) {
            self.over_budget = true;
            self.answer.body = Vec::new();
            self.held = Reservation::default();
            return false;
        }
        true
    }

    /// Appends a chunk admitted by [`PrimaryCapture::admit_chunk`].
    pub fn push_chunk(&mut self, chunk: &[u8]) {
        self.answer.body.extend_from_slice(chunk);
    }

    /// An admitted chunk could not be read: the body cannot be compared.
    pub fn chunk_unreadable(&mut self) {
        self.answer.truncated = true;
        self.answer.body = Vec::new();
    }

    /// The answer is complete, to be shared by its copies.
    pub fn done(self) -> Rc<Primary<L>> {
        Rc::new(Primary {
            answer: self.answer,
            over_budget: self.over_budget,
            _held: self.held,
        })
    }
}

/// A copy from queueing to comparison (kept under its id in the [`Table`]).
pub struct Entry<L: Ledger> {
    pub experiment: usize,
    pub variant: usize,
    pub request_id: String,
    /// Set once queued for sending; taken (and its bytes given back) when sent.
    request: Option<Request<L>>,
    token: Option<u32>,
    sent_at_ms: u64,
    primary: Option<Rc<Primary<L>>>,
    primary_gone: bool,
    shadow: Option<Reply>,
    /// Why the copy was given up after it was sent, if it was.
    dropped: Option<Skip>,
    shadow_held: Reservation<L>,
}

/// What a copy's end counts.
#[derive(Debug, PartialEq)]
pub enum Outcome<'a> {
    /// Compare the primary's answer with the shadow's.
    Compare {
        primary: &'a Answer,
        copy: &'a Answer,
    },
    /// Count this fate (never [`Fate::Compared`]).
    Count(Fate),
}

impl<L: Ledger> Entry<L> {
    /// What ending with `fate` counts. A copy is compared only with both answers in; a
    /// [`Fate::Compared`] without them (which [`fate`] never gives) still ends in one fate.
    pub fn outcome(&self, fate: Fate) -> Outcome<'_> {
        match (fate, &self.primary, &self.shadow) {
            (Fate::Compared, Some(primary), Some(Reply::Answer(copy))) => Outcome::Compare {
                primary: &primary.answer,
                copy,
            },
            (Fate::Compared, _, _) => Outcome::Count(Fate::Skipped(Skip::NoPrimary)),
            (fate, _, _) => Outcome::Count(fate),
        }
    }
}

/// One copy the send queue hands to the host.
pub struct Outgoing<'a, L: Ledger> {
    pub id: u64,
    pub cfg: &'a Shadow,
    pub request: Request<L>,
}

/// A pass over the send queue ([`Table::begin_sending`] … [`Table::end_sending`]).
#[derive(Debug, Default)]
pub struct Sending {
    ids: Vec<u64>,
    next: usize,
    queued: usize,
    failed: Vec<u64>,
    over_budget: Vec<u64>,
}

/// What a pass over the send queue leaves to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Sent {
    /// Copies given up, with their fate, in order.
    pub ends: Vec<(u64, Fate)>,
    /// Nothing was queued: the fast tick can stop.
    pub stop_tick: bool,
}

/// A shadow call came back for a copy.
#[derive(Debug, PartialEq, Eq)]
pub struct Returned {
    pub id: u64,
    /// The shadow answered (not a timeout or failure): the copy's experiment, variant and the
    /// milliseconds since it was sent, for the latency histogram.
    pub answered: Option<(usize, usize, u64)>,
}

/// Every outstanding copy of one plugin, reachable by its id and (once sent) by its call's
/// token, so that each step of a copy costs the same however many are outstanding.
pub struct Table<L: Ledger> {
    by_id: FnvHashMap<u64, Entry<L>>,
    /// Ids of sent copies by token.
    by_token: FnvHashMap<u32, u64>,
    /// Ids of copies waiting to be sent, oldest first.
    queued: Vec<u64>,
    next_id: u64,
    /// Outstanding copies per experiment (captured, queued or sent).
    in_flight: Vec<u32>,
    log_budget: LogBudget,
    /// Whether the fast tick is running (set by the first queued copy, cleared by a tick
    /// with nothing to send).
    ticking: bool,
    /// Per experiment: the size Envoy is expected to buffer for a shadow answer (a maximum of
    /// recent answers' sizes that decays), reserved while a call is out.
    answer_estimate: Vec<usize>,
    /// The host asked the root context to finish (its config was replaced); it reports done
    /// when the last copy has ended.
    closing: bool,
}

impl<L: Ledger> Default for Table<L> {
    fn default() -> Self {
        Table {
            by_id: FnvHashMap::default(),
            by_token: FnvHashMap::default(),
            queued: Vec::new(),
            next_id: 0,
            in_flight: Vec::new(),
            log_budget: LogBudget::default(),
            ticking: false,
            answer_estimate: Vec::new(),
            closing: false,
        }
    }
}

fn slot<T: Default + Clone>(v: &mut Vec<T>, i: usize) -> &mut T {
    if v.len() <= i {
        v.resize(i + 1, T::default());
    }
    &mut v[i]
}

impl<L: Ledger> Table<L> {
    /// Copies of `experiment` outstanding now (captured, queued or sent).
    pub fn in_flight(&self, experiment: usize) -> u32 {
        self.in_flight.get(experiment).copied().unwrap_or(0)
    }

    /// The expected size of `experiment`'s next shadow answer.
    pub fn estimate(&self, experiment: usize) -> usize {
        self.answer_estimate.get(experiment).copied().unwrap_or(0)
    }

    /// Learns the size of an answer of `experiment`'s shadow.
    pub fn observe_answer(&mut self, experiment: usize, size: usize) {
        let e = slot(&mut self.answer_estimate, experiment);
        *e = decayed_max(*e, size);
    }

    /// No copy outstanding.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether the fast tick is running.
    pub fn ticking(&self) -> bool {
        self.ticking
    }

    /// The host started (true) or stopped (false) the fast tick.
    pub fn set_ticking(&mut self, on: bool) {
        self.ticking = on;
    }

    /// Starts a capture of `headers` (already holding `held`): the copy counts as in flight
    /// from here, so that the cap also bounds what captures hold.
    pub fn capture(
        &mut self,
        experiment: usize,
        variant: usize,
        headers: Vec<(String, String)>,
        held: Reservation<L>,
    ) -> Capture<L> {
        self.next_id = self.next_id.wrapping_add(1);
        let n = slot(&mut self.in_flight, experiment);
        *n = n.saturating_add(1);
        Capture {
            id: self.next_id,
            experiment,
            variant,
            headers,
            body: Answer::default(),
            held,
        }
    }

    /// Starts a copy of a request whose copied `headers` are ready: their bytes are held under
    /// `cap` (`max_bytes_in_flight`), or the copy is skipped.
    pub fn start_copy(
        &mut self,
        experiment: usize,
        variant: usize,
        headers: Vec<(String, String)>,
        cap: usize,
    ) -> Result<Capture<L>, Skip> {
        let size = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let held = Reservation::take(size, cap).ok_or(Skip::BytesInFlight)?;
        Ok(self.capture(experiment, variant, headers, held))
    }

    /// A capture of `experiment` ends before it was queued (its count goes; the caller counts
    /// its skip).
    pub fn give_up(&mut self, experiment: usize) {
        let n = slot(&mut self.in_flight, experiment);
        *n = n.saturating_sub(1);
    }

    /// Queues a complete copy for sending. True if the fast tick is not running and must be
    /// started.
    pub fn enqueue(&mut self, c: Capture<L>) -> bool {
        let request_id = c
            .headers
            .iter()
            .find(|(k, _)| k == "x-request-id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.queued.push(c.id);
        self.by_id.insert(
            c.id,
            Entry {
                experiment: c.experiment,
                variant: c.variant,
                request_id,
                request: Some(Request {
                    headers: c.headers,
                    body: c.body.body,
                    _held: c.held,
                }),
                token: None,
                sent_at_ms: 0,
                primary: None,
                primary_gone: false,
                shadow: None,
                dropped: None,
                shadow_held: Reservation::default(),
            },
        );
        !self.ticking
    }

    /// Begins a pass over the copies queued now.
    pub fn begin_sending(&mut self) -> Sending {
        Sending {
            ids: std::mem::take(&mut self.queued),
            ..Sending::default()
        }
    }

    /// The next copy of the pass to hand to the host, or `None` when the pass is over.
    /// `cfg_of` gives an experiment's shadow. Before a copy goes out, the expected size of
    /// its answer is held (Envoy buffers the whole answer before the filter sees it): at most
    /// the whole cap, so that an answer larger than the cap can still go out alone and its
    /// successors learn a new size. A copy whose experiment has no shadow any more, or whose
    /// answer would not fit, is given up at the end of the pass.
    pub fn next_to_send<'a>(
        &mut self,
        pass: &mut Sending,
        cfg_of: impl Fn(usize) -> Option<&'a Shadow>,
    ) -> Option<Outgoing<'a, L>> {
        while let Some(&id) = pass.ids.get(pass.next) {
            pass.next += 1;
            let Some(e) = self.by_id.get_mut(&id) else {
                continue;
            };
            // Dropped once sent: Envoy has its own copy of the request by then.
            let Some(request) = e.request.take() else {
                continue;
            };
            pass.queued += 1;
            let Some(cfg) = cfg_of(e.experiment) else {
                pass.failed.push(id);
                continue;
            };
            let expected = self
                .answer_estimate
                .get(e.experiment)
                .copied()
                .unwrap_or(0)
                .min(cfg.max_bytes_in_flight);
            if !e.shadow_held.grow(expected, cfg.max_bytes_in_flight) {
                pass.over_budget.push(id);
                continue;
            }
            return Some(Outgoing { id, cfg, request });
        }
        None
    }

    /// The host took copy `id` of the pass: its call's `token` (sent at `now_ms`), or
    /// `None` if the call could not be made.
    pub fn sent(&mut self, pass: &mut Sending, id: u64, token: Option<u32>, now_ms: u64) {
        let Some(token) = token else {
            pass.failed.push(id);
            return;
        };
        if let Some(e) = self.by_id.get_mut(&id) {
            e.token = Some(token);
            e.sent_at_ms = now_ms;
            self.by_token.insert(token, id);
        }
    }

    /// Ends a pass: the copies it gave up (failed first, then over the budget) and whether
    /// the tick can stop. Stopping one tick late, not as soon as the queue is empty, keeps
    /// the timer running under steady traffic instead of re-arming it for every copy.
    pub fn end_sending(&mut self, pass: Sending) -> Sent {
        let Sending {
            mut ids,
            queued,
            failed,
            over_budget,
            ..
        } = pass;
        // Keeps the allocation; nothing is queued while copies are being sent.
        ids.clear();
        ids.append(&mut self.queued);
        self.queued = ids;
        let ends = failed
            .into_iter()
            .map(|id| (id, Fate::Skipped(Skip::DispatchFailed)))
            .chain(
                over_budget
                    .into_iter()
                    .map(|id| (id, Fate::Skipped(Skip::BytesInFlight))),
            )
            .collect();
        Sent {
            ends,
            stop_tick: queued == 0,
        }
    }

    /// The call with `token` came back at `now_ms` with a body of `body_size` bytes.
    /// `cfg_of` gives an experiment's shadow; `status` reads the answer's status (0 without
    /// headers), `body` reads its body; each is called only if needed. `None` if no copy
    /// waits for that token.
    pub fn call_returned<'a>(
        &mut self,
        token: u32,
        now_ms: u64,
        body_size: usize,
        cfg_of: impl Fn(usize) -> Option<&'a Shadow>,
        status: impl FnOnce() -> u16,
        body: impl FnOnce() -> Result<Option<Vec<u8>>, ()>,
    ) -> Option<Returned> {
        let id = *self.by_token.get(&token)?;
        let e = self.by_id.get_mut(&id)?;
        let mut returned = Returned { id, answered: None };
        let Some(cfg) = cfg_of(e.experiment) else {
            e.shadow = Some(Reply::Failed);
            return Some(returned);
        };
        let elapsed = now_ms.saturating_sub(e.sent_at_ms);
        let status = status();
        // Envoy frees its copy of the answer after this callback; what is read is held anew.
        e.shadow_held = Reservation::default();
        let estimate = slot(&mut self.answer_estimate, e.experiment);
        *estimate = decayed_max(*estimate, body_size);
        if let Some(failure) = super::classify(status, elapsed, cfg.timeout_ms) {
            e.shadow = Some(failure);
            return Some(returned);
        }
        returned.answered = Some((e.experiment, e.variant, elapsed));
        let mut answer = Answer {
            status,
            ..Answer::default()
        };
        // Read only what the comparison uses.
        if super::wants_body(cfg, &mut answer, body_size, e.dropped.is_some()) {
            if !e.shadow_held.grow(body_size, cfg.max_bytes_in_flight) {
                e.dropped = Some(Skip::BytesInFlight);
            } else {
                match body() {
                    Ok(Some(b)) => answer.body = b,
                    Ok(None) => {}
                    Err(()) => {
                        e.shadow = Some(Reply::Failed);
                        return Some(returned);
                    }
                }
            }
        }
        e.shadow = Some(Reply::Answer(answer));
        Some(returned)
    }

    /// The primary's answer is complete for copy `id`; false if the copy is gone.
    pub fn primary_done(&mut self, id: u64, primary: &Rc<Primary<L>>) -> bool {
        let Some(e) = self.by_id.get_mut(&id) else {
            return false;
        };
        if primary.over_budget {
            e.dropped = e.dropped.or(Some(Skip::BytesInFlight));
        }
        e.primary = Some(primary.clone());
        true
    }

    /// The primary of copy `id` ended without a complete answer.
    pub fn primary_gone(&mut self, id: u64) {
        if let Some(e) = self.by_id.get_mut(&id) {
            if e.primary.is_none() {
                e.primary_gone = true;
            }
        }
    }

    /// Copy `id`'s fate, once it is known: the shadow's reply is in and either the primary is
    /// done or the reply needs no primary (a timeout or failure).
    pub fn settled(&self, id: u64) -> Option<Fate> {
        let e = self.by_id.get(&id)?;
        let reply = e.shadow.as_ref()?;
        let failed = matches!(reply, Reply::Timeout | Reply::Failed);
        (failed || e.primary.is_some() || e.primary_gone)
            .then(|| fate(reply, e.primary.is_some(), e.dropped))
    }

    /// Removes copy `id` (no longer in flight); the caller counts its end
    /// ([`Entry::outcome`]) and then drops it, giving its bytes back.
    pub fn remove(&mut self, id: u64) -> Option<Entry<L>> {
        let e = self.by_id.remove(&id)?;
        if let Some(token) = e.token {
            self.by_token.remove(&token);
        }
        self.give_up(e.experiment);
        Some(e)
    }

    /// How many of `wanted` disagreement log lines the budget of the minute of `now_secs`
    /// allows (taking them).
    pub fn take_log_lines(&mut self, now_secs: u64, per_minute: u32, wanted: usize) -> usize {
        (0..wanted)
            .take_while(|_| self.log_budget.take(now_secs, per_minute))
            .count()
    }

    /// The host asks whether a replaced configuration is done: true if no copy is left;
    /// otherwise it will be when the last one ends ([`Table::finish_if_closing`]).
    pub fn close(&mut self) -> bool {
        if self.is_empty() {
            return true;
        }
        self.closing = true;
        false
    }

    /// True once, when closing and the last copy has ended: the host is to be told done.
    pub fn finish_if_closing(&mut self) -> bool {
        if !self.closing || !self.is_empty() {
            return false;
        }
        self.closing = false;
        true
    }
}

#[cfg(test)]
mod tests;
