use std::cell::Cell;

use super::*;
use crate::shadow::{Budget, SampleBy};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

thread_local! {
    static HELD: Cell<Budget> = const { Cell::new(Budget { held: 0 }) };
}

/// This thread's budget (each test starts it empty).
struct Local;

impl Ledger for Local {
    fn take(n: usize, cap: usize) -> bool {
        HELD.with(|h| {
            let mut b = h.get();
            let ok = b.take(n, cap);
            h.set(b);
            ok
        })
    }

    fn give_back(n: usize) {
        HELD.with(|h| {
            let mut b = h.get();
            b.give_back(n);
            h.set(b);
        });
    }
}

fn held() -> usize {
    HELD.with(|h| h.get().held)
}

fn fresh() -> Table<Local> {
    HELD.with(|h| h.set(Budget::default()));
    Table::default()
}

const CAP: usize = 1000;

fn cfg() -> Shadow {
    Shadow {
        cluster: "shadow".to_string(),
        authority: None,
        sample: 10_000,
        sample_by: SampleBy::Request,
        variants: vec![true, true],
        timeout_ms: 1000,
        max_body_bytes: 100,
        max_in_flight: 10,
        max_bytes_in_flight: CAP,
        methods: Vec::new(),
        compare_body: true,
        fields: Vec::new(),
        log_per_minute: 2,
        salt: String::new(),
    }
}

fn headers(request_id: &str) -> Vec<(String, String)> {
    vec![
        (":path".to_string(), "/".to_string()),
        ("x-request-id".to_string(), request_id.to_string()),
    ]
}

/// Captures and queues a copy holding `bytes` of headers; returns its id.
fn queued(t: &mut Table<Local>, experiment: usize, bytes: usize) -> u64 {
    let held = Reservation::take(bytes, CAP).unwrap_or_default();
    let c = t.capture(experiment, 1, headers("r-1"), held);
    let id = c.id;
    t.enqueue(c);
    id
}

/// Sends everything queued; `accept` says whether the host takes each call (token = id).
fn send_all(t: &mut Table<Local>, c: &Shadow, accept: bool) -> (Vec<u64>, Sent) {
    let mut pass = t.begin_sending();
    let mut out = Vec::new();
    while let Some(o) = t.next_to_send(&mut pass, |_| Some(c)) {
        out.push(o.id);
        drop(o.request);
        let token = accept.then(|| u32::try_from(o.id).unwrap_or(0));
        t.sent(&mut pass, o.id, token, 100);
    }
    (out, t.end_sending(pass))
}

fn answer(t: &mut Table<Local>, c: &Shadow, id: u64, status: u16, body: &[u8]) -> Option<Returned> {
    let token = u32::try_from(id).unwrap_or(0);
    let body = body.to_vec();
    t.call_returned(
        token,
        150,
        body.len(),
        |_| Some(c),
        || status,
        || Ok(Some(body)),
    )
}

#[test]
fn a_reservation_gives_its_bytes_back_when_dropped() {
    let _t = fresh();
    let mut r = Reservation::<Local>::take(600, CAP).unwrap_or_default();
    assert_eq!((r.bytes(), held()), (600, 600));
    assert!(Reservation::<Local>::take(401, CAP).is_none());
    assert!(!r.grow(401, CAP));
    assert!(r.grow(400, CAP));
    assert_eq!((r.bytes(), held()), (1000, 1000));
    drop(r);
    assert_eq!(held(), 0);
}

#[test]
fn a_capture_counts_in_flight_until_given_up() {
    let mut t = fresh();
    let a = t.capture(1, 0, Vec::new(), Reservation::default());
    let b = t.capture(1, 0, Vec::new(), Reservation::default());
    assert_ne!(a.id, b.id);
    assert_eq!((t.in_flight(0), t.in_flight(1)), (0, 2));
    t.give_up(1);
    assert_eq!(t.in_flight(1), 1);
    t.give_up(0);
    assert_eq!(t.in_flight(0), 0);
}

#[test]
fn a_copy_starts_only_if_its_headers_fit_the_budget() {
    let mut t = fresh();
    let big = t.start_copy(0, 1, headers("r-1"), CAP);
    let size = ":path/x-request-idr-1".len();
    assert_eq!(big.as_ref().map(|c| (c.experiment, c.variant)), Ok((0, 1)));
    assert_eq!((held(), t.in_flight(0)), (size, 1));
    let over = t.start_copy(0, 1, headers("r-2"), 2 * size - 1);
    assert_eq!(over.err(), Some(Skip::BytesInFlight));
    assert_eq!((held(), t.in_flight(0)), (size, 1));
    drop(big);
    assert_eq!(held(), 0);
}

#[test]
fn a_request_chunk_joins_a_capture_only_within_its_limits() {
    let mut t = fresh();
    let c = cfg();
    let mut capture = t.capture(0, 0, Vec::new(), Reservation::default());
    assert_eq!(capture.admit_chunk(10, None), Err(Skip::DispatchFailed));
    assert_eq!(capture.admit_chunk(60, Some(&c)), Ok(()));
    capture.push_chunk(&[7; 60]);
    assert_eq!(held(), 60);
    assert_eq!(capture.admit_chunk(41, Some(&c)), Err(Skip::BodyLimit));

    let mut other = t.capture(0, 0, Vec::new(), Reservation::default());
    let small = Shadow {
        max_bytes_in_flight: 100,
        ..cfg()
    };
    assert_eq!(
        other.admit_chunk(50, Some(&small)),
        Err(Skip::BytesInFlight)
    );
    drop((capture, other));
    assert_eq!(held(), 0);
}

#[test]
fn the_first_queued_copy_starts_the_tick() {
    let mut t = fresh();
    let first = t.capture(0, 0, headers("r-7"), Reservation::default());
    assert!(t.enqueue(first));
    t.set_ticking(true);
    let second = t.capture(0, 0, Vec::new(), Reservation::default());
    assert!(!t.enqueue(second));
    assert!(t.ticking());
    assert_eq!(t.remove(1).map(|e| e.request_id), Some("r-7".to_string()));
    assert_eq!(t.remove(2).map(|e| e.request_id), Some(String::new()));
    assert_eq!(t.in_flight(0), 0);
}

#[test]
fn a_pass_sends_each_queued_copy_once_and_frees_its_request() {
    let mut t = fresh();
    let c = cfg();
    let id = queued(&mut t, 0, 200);
    assert_eq!(held(), 200);
    let (out, sent) = send_all(&mut t, &c, true);
    assert_eq!(out, vec![id]);
    assert_eq!(
        sent,
        Sent {
            ends: Vec::new(),
            stop_tick: false
        }
    );
    // The request's bytes went back once handed over; nothing is expected back yet.
    assert_eq!(held(), 0);
    let (out, sent) = send_all(&mut t, &c, true);
    assert!(out.is_empty());
    assert!(sent.stop_tick);
    assert_eq!(t.in_flight(0), 1);
}

#[test]
fn a_pass_gives_up_failed_calls_then_copies_over_the_budget() {
    let mut t = fresh();
    let c = cfg();
    // The first copy's expected answer leaves no room for the second's.
    t.observe_answer(0, CAP - 20);
    let a = queued(&mut t, 0, 10);
    let b = queued(&mut t, 0, 10);
    let (out, sent) = send_all(&mut t, &c, false);
    assert_eq!(out, vec![a]);
    assert_eq!(
        sent.ends,
        vec![
            (a, Fate::Skipped(Skip::DispatchFailed)),
            (b, Fate::Skipped(Skip::BytesInFlight)),
        ]
    );
    assert!(!sent.stop_tick);
}

#[test]
fn an_answer_expected_over_the_cap_still_goes_out_alone() {
    let mut t = fresh();
    let c = cfg();
    t.observe_answer(0, 5 * CAP);
    assert_eq!(t.estimate(0), 5 * CAP);
    let a = queued(&mut t, 0, 0);
    let b = queued(&mut t, 0, 0);
    let (out, sent) = send_all(&mut t, &c, true);
    assert_eq!(out, vec![a]);
    assert_eq!(held(), CAP);
    assert_eq!(sent.ends, vec![(b, Fate::Skipped(Skip::BytesInFlight))]);
}

#[test]
fn a_copy_without_a_shadow_any_more_is_given_up() {
    let mut t = fresh();
    let id = queued(&mut t, 0, 10);
    let mut pass = t.begin_sending();
    assert!(t.next_to_send(&mut pass, |_| None).is_none());
    let sent = t.end_sending(pass);
    assert_eq!(sent.ends, vec![(id, Fate::Skipped(Skip::DispatchFailed))]);
    assert!(!sent.stop_tick);
}

#[test]
fn a_sent_copy_holds_its_expected_answer_until_it_returns() {
    let mut t = fresh();
    let c = cfg();
    t.observe_answer(0, 300);
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &c, true);
    assert_eq!(held(), 300);
    let r = answer(&mut t, &c, id, 200, b"{}");
    assert_eq!(
        r,
        Some(Returned {
            id,
            answered: Some((0, 1, 50)),
        })
    );
    // The estimate is released and the body read is held instead.
    assert_eq!(held(), 2);
    assert_eq!(t.estimate(0), 300 - 300 / 16);
    assert_eq!(answer(&mut t, &c, 99, 200, b""), None);
}

#[test]
fn an_answer_and_a_complete_primary_are_compared() {
    let mut t = fresh();
    let c = cfg();
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &c, true);
    answer(&mut t, &c, id, 200, b"ok");
    assert_eq!(t.settled(id), None, "waits for the primary");
    let mut p = PrimaryCapture::<Local>::new([&c], 200, None);
    assert!(p.admit_chunk(2));
    p.push_chunk(b"ok");
    assert!(t.primary_done(id, &p.done()));
    assert_eq!(t.settled(id), Some(Fate::Compared));
    let e = t.remove(id);
    let ok = Answer {
        status: 200,
        body: b"ok".to_vec(),
        truncated: false,
    };
    assert_eq!(
        e.as_ref().map(|e| e.outcome(Fate::Compared)),
        Some(Outcome::Compare {
            primary: &ok,
            copy: &ok,
        })
    );
    drop(e);
    assert!(t.is_empty());
    assert_eq!((t.in_flight(0), held()), (0, 0));
}

#[test]
fn a_timeout_or_failure_settles_without_the_primary() {
    let mut t = fresh();
    let c = cfg();
    let late = queued(&mut t, 0, 10);
    let failed = queued(&mut t, 0, 10);
    let unreadable = queued(&mut t, 0, 10);
    send_all(&mut t, &c, true);
    let token = |id: u64| u32::try_from(id).unwrap_or(0);
    // Sent at 100; 950 ms later is a timeout of a 1000 ms call.
    let r = t.call_returned(token(late), 1050, 0, |_| Some(&c), || 0, || Ok(None));
    assert_eq!(r.map(|r| r.answered), Some(None));
    assert_eq!(t.settled(late), Some(Fate::Timeout));
    answer(&mut t, &c, failed, 0, b"");
    assert_eq!(t.settled(failed), Some(Fate::Error));
    let r = t.call_returned(token(unreadable), 150, 5, |_| Some(&c), || 200, || Err(()));
    assert!(r.is_some_and(|r| r.answered.is_some()));
    assert_eq!(t.settled(unreadable), Some(Fate::Error));
}

#[test]
fn an_answer_whose_primary_ended_early_is_skipped() {
    let mut t = fresh();
    let c = cfg();
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &c, true);
    t.primary_gone(id);
    assert_eq!(t.settled(id), None, "waits for the shadow");
    answer(&mut t, &c, id, 200, b"ok");
    assert_eq!(t.settled(id), Some(Fate::Skipped(Skip::NoPrimary)));
    let e = t.remove(id);
    assert_eq!(
        e.as_ref().map(|e| e.outcome(Fate::Compared)),
        Some(Outcome::Count(Fate::Skipped(Skip::NoPrimary)))
    );
}

#[test]
fn bodies_over_the_budget_skip_the_copy() {
    let mut t = fresh();
    let small = Shadow {
        max_bytes_in_flight: 50,
        ..cfg()
    };
    // The shadow's body does not fit: it is not read, the copy is skipped.
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &small, true);
    let r = t.call_returned(
        u32::try_from(id).unwrap_or(0),
        150,
        60,
        |_| Some(&small),
        || 200,
        || unreachable!("a body over the budget is not read"),
    );
    assert!(r.is_some());
    let p = PrimaryCapture::<Local>::new([&small], 200, None);
    assert!(t.primary_done(id, &p.done()));
    assert_eq!(t.settled(id), Some(Fate::Skipped(Skip::BytesInFlight)));
    drop(t.remove(id));

    // The primary's body does not fit: every copy of the request is skipped.
    t = fresh();
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &small, true);
    answer(&mut t, &small, id, 200, b"");
    let mut p = PrimaryCapture::<Local>::new([&small], 200, None);
    assert!(p.admit_chunk(30));
    assert!(!p.admit_chunk(30));
    assert!(!p.admit_chunk(1), "nothing more is read");
    assert!(t.primary_done(id, &p.done()));
    assert_eq!(t.settled(id), Some(Fate::Skipped(Skip::BytesInFlight)));
    drop(t.remove(id));
    assert_eq!(held(), 0);
}

#[test]
fn the_primary_body_is_read_only_when_compared_and_within_its_limit() {
    let _t = fresh();
    let c = cfg();
    let by_status = Shadow {
        compare_body: false,
        ..cfg()
    };
    let mut p = PrimaryCapture::<Local>::new([&by_status], 200, None);
    assert!(!p.admit_chunk(10));
    let mut p = PrimaryCapture::<Local>::new([&c], 200, Some(101));
    assert!(!p.admit_chunk(10), "a content-length over the limit");
    let mut p = PrimaryCapture::<Local>::new([&c], 200, Some(100));
    assert!(!p.admit_chunk(0));
    assert!(p.admit_chunk(100));
    p.chunk_unreadable();
    assert!(!p.admit_chunk(1), "an unreadable body is not compared");
}

#[test]
fn a_replaced_config_is_done_when_its_last_copy_ends() {
    let mut t = fresh();
    assert!(t.close(), "nothing outstanding");
    assert!(!t.finish_if_closing(), "not asked again");
    let id = queued(&mut t, 0, 10);
    assert!(!t.close());
    assert!(!t.finish_if_closing());
    drop(t.remove(id));
    assert!(t.finish_if_closing());
    assert!(!t.finish_if_closing(), "told once");
}

#[test]
fn a_removed_copy_answers_no_token() {
    let mut t = fresh();
    let c = cfg();
    let id = queued(&mut t, 0, 10);
    send_all(&mut t, &c, true);
    assert!(t.remove(id).is_some());
    assert!(t.remove(id).is_none());
    assert_eq!(answer(&mut t, &c, id, 200, b""), None);
}

#[test]
fn disagreement_lines_are_limited_per_minute() {
    let mut t = fresh();
    assert_eq!(t.take_log_lines(60, 3, 2), 2);
    assert_eq!(t.take_log_lines(61, 3, 2), 1);
    assert_eq!(t.take_log_lines(119, 3, 5), 0);
    assert_eq!(t.take_log_lines(120, 3, 5), 3);
    assert_eq!(t.take_log_lines(180, 0, 5), 0);
}
