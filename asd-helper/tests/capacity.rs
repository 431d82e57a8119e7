//! The helper at capacity (issue 11 item 6): connections beyond those it serves at once wait
//! for a place instead of being refused, silent connections make room for them, and what is
//! refused says which limit it hit: the user's own or the helper's for everyone. (The storm of
//! a thousand real managers is asd-user/tests/storm.rs.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn helper_with(args: &[&str]) -> Helper {
    Helper::start_with(HelperOpts {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..HelperOpts::default()
    })
}

/// Waits until the helper's log holds `text` (a decision it logged).
fn wait_for_log(h: &Helper, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the helper never logged {text:?}:\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the helper closed `s` within `within` (EOF or reset), without a reply.
fn closed_within(mut s: &UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("the helper sent something unasked"),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A connection that keeps its place without ever finishing a call: a byte of a message every
/// 300 ms (never silent for the second after which a silent one makes room).
struct Trickle {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trickle {
    fn start(h: &Helper) -> Trickle {
        let mut s = UnixStream::connect(&h.sock).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let msg = br#"{"method":"io.asd.Helper.ListMounts","parameters":{"pad":""#;
            let mut i = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let byte = if i < msg.len() { msg[i] } else { b'x' };
                if s.write_all(&[byte]).is_err() {
                    return;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Trickle {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two silent connections hold both places; a user's call waits for one instead of being
/// refused, silent ones are closed to make room (only then: with nobody waiting they stay),
/// and the call is served within about a second.
#[test]
fn silent_connections_make_room_for_a_waiting_call() {
    if !root_or_skip("silent_connections_make_room_for_a_waiting_call") {
        return;
    }
    let alice = user("alice");
    let h = helper_with(&["--max-connections", "2", "--queue-timeout", "20"]);
    // The probes with which the fixture saw the helper listen held places too: while one is
    // still being looked up, a silent connection would wait and make the other make room
    // (this failed CI under load). A call served after them makes sure they are gone.
    h.ok(&alice, "ListMounts", json!({}));
    let silent: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&h.sock).unwrap())
        .collect();
    // Nobody waits: silent connections keep their places (the idle limit is 60 s).
    for s in &silent {
        assert!(!closed_within(s, Duration::from_millis(1500)));
    }
    let t = Instant::now();
    let l = h.ok(&alice, "ListMounts", json!({}));
    let waited = t.elapsed();
    assert!(l["mounts"].as_array().is_some_and(Vec::is_empty), "{l:?}");
    assert!(
        waited < Duration::from_secs(8),
        "alice waited {waited:?}: the silent connections did not make room"
    );
    // At least one made room (the other may have stayed: alice needed one place).
    let closed = silent
        .iter()
        .filter(|s| closed_within(s, Duration::from_secs(3)))
        .count();
    assert!(
        closed >= 1,
        "no silent connection made room while alice waited"
    );
    let log = h.log_text();
    assert!(
        log.contains("at capacity: 2 connections served at once"),
        "{log}"
    );
    assert!(log.contains("no connection waits any more"), "{log}");
}

/// One place, busy; two may wait. A third waiting connection of the same uid is over that
/// uid's limit (TooManyConnections, naming the per-user limit); another user's is over the
/// helper's (AtCapacity, naming the limit for everyone); the waiting ones are answered
/// AtCapacity after the queue timeout, having done nothing; once the place is free, calls are
/// served again.
#[test]
fn refusals_name_the_limit_that_was_hit() {
    if !root_or_skip("refusals_name_the_limit_that_was_hit") {
        return;
    }
    let (alice, bob) = (user("alice"), user("bob"));
    let h = helper_with(&[
        "--max-connections",
        "1",
        "--max-queued",
        "2",
        "--queue-timeout",
        "3",
        "--max-connections-per-uid",
        "2",
    ]);
    // The probes with which the fixture saw the helper listen were root's connections too:
    // a call served (after them, first come first served) makes sure they are gone.
    h.ok(&bob, "ListMounts", json!({}));
    let busy = Trickle::start(&h);
    // Root's busy connection has the place; root's second one waits.
    std::thread::sleep(Duration::from_millis(200));
    let mut waiting = UnixStream::connect(&h.sock).unwrap();
    waiting
        .write_all(b"{\"method\":\"io.asd.Helper.ListMounts\"}\0")
        .unwrap();
    wait_for_log(&h, "at capacity: 1 connections served at once");
    // alice waits too (in another thread: her call returns when she is answered).
    let t = Instant::now();
    let alice_call = std::thread::scope(|sc| {
        let a = sc.spawn(|| h.call(&alice, "ListMounts", json!({})));
        // Give her time to be queued.
        std::thread::sleep(Duration::from_millis(500));
        // root is at its own limit of 2 (busy + waiting): per-user.
        let mut third = UnixStream::connect(&h.sock).unwrap();
        let r = raw_call(&mut third, &json!({"method": "io.asd.Helper.ListMounts"}));
        assert_eq!(r["error"], "io.asd.Helper.TooManyConnections", "{r}");
        assert_eq!(r["parameters"]["limit"], 2, "{r}");
        // bob has no connection at all, but the helper is full: for everyone.
        let p = h.err(&bob, "ListMounts", json!({}), "AtCapacity");
        assert_eq!(p["limit"], 1, "{p:?}");
        assert_eq!(p["queue"], 2, "{p:?}");
        a.join().unwrap()
    });
    // The waiting ones got AtCapacity after the queue timeout.
    assert_eq!(
        alice_call["error"], "io.asd.Helper.AtCapacity",
        "{alice_call}"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "alice was answered after {:?}, before the queue timeout",
        t.elapsed()
    );
    let r = read_reply(&mut waiting).expect("an answer");
    assert_eq!(r["error"], "io.asd.Helper.AtCapacity", "{r}");
    // The messages say which limit, in words an admin can act on.
    let log = h.log_text();
    assert!(
        log.contains("too many connections from this user: the helper allows 2 per user (its --max-connections-per-uid)"),
        "{log}"
    );
    assert!(
        log.contains("the helper is at capacity for all users: 1 connections served at once and 2 waiting (its --max-connections and --max-queued)"),
        "{log}"
    );
    // The place comes free: served again.
    drop(busy);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: Value = h.call(&bob, "ListMounts", json!({}));
        if r.get("error").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
