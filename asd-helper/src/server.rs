//! The socket side: accepts connections, enforces the limits (message size, connections per uid,
//! capacity, idle and request time), parses calls and logs one line per decision.
//!
//! Capacity, for a login storm (hundreds of managers asking at the same moment):
//! - per uid: one uid holds at most `per_uid` connections, served or waiting; more are refused
//!   at once with `TooManyConnections`, so that one user cannot take the places of the others;
//! - served: at most `total` connections are served at once. More wait for a place, first come
//!   first served, with nothing read from them and nothing allocated for them but their socket
//!   and a small task. While any wait, a served connection silent for [`SILENT_UNDER_PRESSURE`]
//!   is closed to make room: a manager keeps its connection between the steps of a sync (and
//!   copies data in between), and reconnects when it finds it closed (a call it had not sent,
//!   or that was not read whole, was not done);
//! - waiting: at most `queue` connections wait, each for at most `queue_wait`; beyond that the
//!   connection is answered with `AtCapacity` (nothing was done) and its client retries later;
//! - running: at most `requests` requests run at once (each on a thread of its own, reading the
//!   mount table), one per uid at a time; a request waits for its turn, up to `queue_wait` for a
//!   place to run (else `AtCapacity`), and the request time counts from its start.
//!
//! Memory follows the same bounds: a served connection holds a read buffer and at most one
//! message of `max_message` bytes; a waiting one holds neither.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asd_protocol::frame::encode;
use asd_protocol::{Call, FrameDecoder, FrameError, Method, Reply, ServiceError};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::ops::Ctx;
use crate::peer::Peer;

/// How long a served connection may stay silent while other connections wait for a place.
/// Managers send the calls of one step back to back; between steps they copy data, which is
/// when their place is better used by someone else.
const SILENT_UNDER_PRESSURE: Duration = Duration::from_secs(1);

/// Refusals answered at the same time (each holds its socket for up to about a second, so that
/// the client reads the error rather than a reset); beyond that a refused connection is closed
/// without an answer, and a flood of connections cannot exhaust the helper's descriptors.
pub const MAX_REFUSING: usize = 512;

/// Size of a served connection's read buffer.
const READ_BUF: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message: usize,
    /// Connections per uid, served or waiting.
    pub per_uid: usize,
    /// Connections served at once, for all users.
    pub total: usize,
    /// Connections that may wait for a place, for all users.
    pub queue: usize,
    /// How long a connection may wait for a place, and a request for its turn to run.
    pub queue_wait: Duration,
    /// Requests run at once, for all users.
    pub requests: usize,
    pub idle: Duration,
    pub request: Duration,
}

impl Limits {
    fn at_capacity(&self) -> ServiceError {
        ServiceError::AtCapacity {
            limit: self.total as u64,
            queue: self.queue as u64,
        }
    }
}

/// When connections started to wait, and the most that waited since, for the log.
#[derive(Default)]
struct Congestion {
    since: Option<Instant>,
    peak: usize,
}

/// Counts of open connections (per uid and in all) and of requests being handled.
struct Activity {
    per_uid: Mutex<HashMap<u32, usize>>,
    /// Connections held, served or waiting.
    open: AtomicUsize,
    /// Places to be served.
    places: Arc<Semaphore>,
    /// Connections waiting for a place; silent served connections watch it.
    waiting: watch::Sender<usize>,
    congestion: Mutex<Congestion>,
    in_flight: AtomicUsize,
    /// Places to run a request: bounds the threads, memory and kernel work of requests at once.
    runs: Arc<Semaphore>,
    /// Each uid's requests run one after another (its record is one), and while one waits for
    /// its turn it holds no place to run: a user with many connections takes one at most.
    turns: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    refusing: AtomicUsize,
    refusals: Mutex<RefusalLog>,
    last: Mutex<Option<Instant>>,
}

/// Refused connections are logged once per uid and second, with a count of the ones not
/// logged: a client refused in a loop must not flood the journal (one decision, one line, but
/// not ten thousand of the same).
#[derive(Default)]
struct RefusalLog {
    /// uid -> (when its last refusal was logged, refusals since not logged)
    by_uid: HashMap<u32, (Option<Instant>, u64)>,
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
/// Uids remembered for the refusal log; forgotten all at once beyond that (bounded memory).
const REFUSAL_LOG_UIDS: usize = 4096;

impl Activity {
    fn new(limits: &Limits) -> Activity {
        Activity {
            per_uid: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            places: Arc::new(Semaphore::new(limits.total)),
            waiting: watch::channel(0).0,
            congestion: Mutex::new(Congestion::default()),
            in_flight: AtomicUsize::new(0),
            runs: Arc::new(Semaphore::new(limits.requests)),
            turns: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
            refusals: Mutex::new(RefusalLog::default()),
            last: Mutex::new(None),
        }
    }

    fn touch(&self) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(Instant::now());
        }
    }

    fn idle_for(&self) -> Duration {
        match self.last.lock() {
            Ok(l) => l.map(|t| t.elapsed()).unwrap_or_default(),
            Err(_) => Duration::ZERO,
        }
    }

    /// Logs a refused connection (rate-limited per uid, see [`RefusalLog`]).
    fn log_refusal(&self, uid: u32, e: &ServiceError) {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if r.by_uid.len() >= REFUSAL_LOG_UIDS && !r.by_uid.contains_key(&uid) {
            r.by_uid.clear();
        }
        let now = Instant::now();
        let entry = r.by_uid.entry(uid).or_insert((None, 0));
        if entry
            .0
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            entry.1 += 1;
            return;
        }
        let unlogged = std::mem::take(&mut entry.1);
        entry.0 = Some(now);
        drop(r);
        let name = e.name();
        if unlogged == 0 {
            tracing::info!("uid={uid} method=connect target=\"-\" result={name} ({e})");
        } else {
            tracing::info!(
                "uid={uid} method=connect target=\"-\" result={name} ({e}); {unlogged} more refused since the last such line"
            );
        }
    }

    /// The turn of one request of `uid`: after the uid's earlier requests (one that timed out
    /// may still be running), within `queue_wait` (else `Timeout`: it did not even start), then
    /// a place to run among everyone's, within `queue_wait` (else `AtCapacity`). Either way
    /// nothing was done, and the client hears so well before its own patience ends.
    async fn turn(&self, uid: u32, limits: &Limits) -> Result<Turn, ServiceError> {
        let mine = {
            let mut t = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            t.entry(uid).or_default().clone()
        };
        let Ok(after_mine) = tokio::time::timeout(limits.queue_wait, mine.lock_owned()).await
        else {
            return Err(ServiceError::Timeout {
                seconds: limits.queue_wait.as_secs(),
            });
        };
        match tokio::time::timeout(limits.queue_wait, self.runs.clone().acquire_owned()).await {
            Ok(Ok(run)) => Ok(Turn {
                _uid: after_mine,
                _run: run,
            }),
            _ => Err(limits.at_capacity()),
        }
    }

    /// A place to be served: at once if one is free, else after the connections that came
    /// earlier, within `queue_wait`.
    async fn place(&self, limits: &Limits) -> Result<OwnedSemaphorePermit, ServiceError> {
        if let Ok(p) = self.places.clone().try_acquire_owned() {
            return Ok(p);
        }
        let _waiting = Waiting::enter(self, limits);
        match tokio::time::timeout(limits.queue_wait, self.places.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(limits.at_capacity()),
        }
    }
}

/// A request's turn to run (see [`Activity::turn`]), held until it has finished.
struct Turn {
    _uid: tokio::sync::OwnedMutexGuard<()>,
    _run: OwnedSemaphorePermit,
}

/// One connection waiting for a place, counted until dropped.
struct Waiting<'a>(&'a Activity);

impl<'a> Waiting<'a> {
    fn enter(a: &'a Activity, limits: &Limits) -> Waiting<'a> {
        let mut now = 0;
        // Silent connections are woken only when the first one starts waiting (and the last
        // stops), not at every arrival of a storm.
        a.waiting.send_if_modified(|n| {
            *n += 1;
            now = *n;
            now == 1
        });
        let mut c = a.congestion.lock().unwrap_or_else(|p| p.into_inner());
        if c.since.is_none() {
            c.since = Some(Instant::now());
            c.peak = 0;
            tracing::info!(
                "at capacity: {} connections served at once; new ones wait for a place (up to {} for {:?})",
                limits.total,
                limits.queue,
                limits.queue_wait
            );
        }
        c.peak = c.peak.max(now);
        Waiting(a)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut now = 0;
        self.0.waiting.send_if_modified(|n| {
            *n = n.saturating_sub(1);
            now = *n;
            now == 0
        });
        if now == 0 {
            let mut c = self.0.congestion.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(since) = c.since.take() {
                tracing::info!(
                    "no connection waits any more, after {:.1} s with up to {} waiting",
                    since.elapsed().as_secs_f64(),
                    c.peak
                );
            }
        }
    }
}

/// Returns once others wait for a place and have waited [`SILENT_UNDER_PRESSURE`] since this
/// was called (the silence of the connection that awaits it).
async fn room_wanted(activity: &Activity) {
    let mut rx = activity.waiting.subscribe();
    let start = tokio::time::Instant::now();
    loop {
        if rx.wait_for(|n| *n > 0).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep_until(start + SILENT_UNDER_PRESSURE).await;
        if *rx.borrow_and_update() > 0 {
            return;
        }
    }
}

/// One open connection, counted for its uid until dropped.
struct ConnSlot {
    activity: Arc<Activity>,
    uid: u32,
}

impl ConnSlot {
    /// Counts a new connection of `uid`, or says which limit it is over: the uid's own, or the
    /// helper's for everyone (served and waiting).
    fn take(activity: &Arc<Activity>, uid: u32, limits: &Limits) -> Result<ConnSlot, ServiceError> {
        let mut map = match activity.per_uid.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let n = map.entry(uid).or_insert(0);
        if *n >= limits.per_uid {
            return Err(ServiceError::TooManyConnections {
                limit: limits.per_uid as u64,
            });
        }
        // Counted under the same lock as the per-uid counts: `open` only grows here.
        if activity.open.load(Ordering::SeqCst) >= limits.total.saturating_add(limits.queue) {
            // No entry stays behind for a uid refused with none open: the map holds only uids
            // with connections.
            if *n == 0 {
                map.remove(&uid);
            }
            return Err(limits.at_capacity());
        }
        *n += 1;
        activity.open.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        Ok(ConnSlot {
            activity: activity.clone(),
            uid,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut map = match self.activity.per_uid.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = map.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.uid);
                // Its last connection: nothing of the uid waits for a turn (a request still
                // running holds its own reference). Bounded memory for many uids.
                let mut turns = self
                    .activity
                    .turns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                turns.remove(&self.uid);
            }
        }
        self.activity.open.fetch_sub(1, Ordering::SeqCst);
        self.activity.touch();
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

fn error_reply(e: &ServiceError) -> Reply {
    Reply {
        parameters: e.parameters(),
        error: Some(e.name()),
        continues: false,
    }
}

async fn send(stream: &mut UnixStream, reply: &Reply, limit: Duration) -> bool {
    let bytes = encode(&reply.to_json());
    matches!(
        tokio::time::timeout(limit, stream.write_all(&bytes)).await,
        Ok(Ok(()))
    )
}

/// The one log line per decision.
fn log(
    uid: u32,
    method: &str,
    target: Option<&str>,
    result: &Result<Map<String, Value>, ServiceError>,
) {
    log_took(uid, method, target, result, None)
}

/// [`log`], with how long the request ran when that was long enough to be worth a note (a
/// slow kernel or polkit, under a storm).
fn log_took(
    uid: u32,
    method: &str,
    target: Option<&str>,
    result: &Result<Map<String, Value>, ServiceError>,
    took: Option<Duration>,
) {
    // Everything that comes from the client is escaped: one decision, one line.
    let target = target.unwrap_or("-");
    let method = method.escape_debug();
    let took = match took {
        Some(t) if t >= SLOW_REQUEST => format!(" after {:.1} s", t.as_secs_f64()),
        _ => String::new(),
    };
    match result {
        Ok(_) => tracing::info!("uid={uid} method={method} target={target:?} result=ok{took}"),
        Err(e) => tracing::info!(
            "uid={uid} method={method} target={target:?} result={} ({}){took}",
            e.name().escape_debug(),
            e.to_string().escape_debug()
        ),
    }
}

/// Requests that ran at least this long say so in their log line.
const SLOW_REQUEST: Duration = Duration::from_secs(1);

async fn connection(
    mut stream: UnixStream,
    cred: tokio::net::unix::UCred,
    ctx: Arc<Ctx>,
    limits: Limits,
    activity: Arc<Activity>,
    _slot: ConnSlot,
) {
    let uid = cred.uid();
    // Nothing is read, looked up or allocated for a connection before it has a place.
    let _place = match activity.place(&limits).await {
        Ok(p) => p,
        Err(e) => {
            activity.log_refusal(uid, &e);
            // Its call has long been written: answer at once (it is counted among the open
            // connections, unlike the refusals at accept).
            let _ = send(&mut stream, &error_reply(&e), Duration::from_secs(1)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    // The passwd lookup may block (NSS): not on the runtime's threads.
    let fd = stream.as_raw_fd();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let gid = cred.gid();
    let peer = match tokio::task::spawn_blocking(move || Peer::of_socket(fd, uid, gid, pid)).await {
        Ok(p) => Arc::new(p),
        Err(_) => return,
    };
    let mut decoder = FrameDecoder::new(limits.max_message);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        // Next complete frame, within the idle limit.
        let frame = loop {
            match decoder.next_frame() {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(FrameError::TooLarge { limit }) => {
                    let e = ServiceError::MessageTooLarge {
                        limit: limit as u64,
                    };
                    log(uid, "-", None, &Err(e.clone()));
                    send(&mut stream, &error_reply(&e), limits.request).await;
                    return;
                }
                Err(_) => return,
            }
            // Reading is cancel-safe: a read that loses to `room_wanted` took no bytes.
            let read = tokio::select! {
                r = tokio::time::timeout(limits.idle, stream.read(&mut buf)) => r,
                () = room_wanted(&activity) => {
                    // A message half sent and then a silent second is no client of ours
                    // either: real clients write a call in one go.
                    tracing::debug!(uid, "closing a silent connection: others wait for a place");
                    return;
                }
            };
            match read {
                Err(_) => {
                    tracing::debug!(uid, "closing a connection idle for {:?}", limits.idle);
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if decoder.has_partial() {
                        tracing::debug!(uid, "client closed the connection inside a message");
                    }
                    return;
                }
                Ok(Ok(n)) => decoder.feed(&buf[..n]),
            }
        };
        activity.touch();
        let call = match Call::parse(&frame) {
            Ok(c) => c,
            Err(e) => {
                let e = ServiceError::InvalidRequest {
                    reason: e.to_string(),
                };
                log(uid, "-", None, &Err(e.clone()));
                if !send(&mut stream, &error_reply(&e), limits.request).await {
                    return;
                }
                continue;
            }
        };
        let flag = if call.more {
            Some("more")
        } else if call.upgrade {
            Some("upgrade")
        } else {
            None
        };
        let parsed = match flag {
            Some(flag) => Err(ServiceError::NotSupported { flag: flag.into() }),
            None => Method::from_call(&call),
        };
        let result = match parsed {
            Err(e) => {
                let r = Err(e);
                log(
                    uid,
                    &call.method,
                    call.parameters.get("target").and_then(Value::as_str),
                    &r,
                );
                r
            }
            Ok(method) => {
                let guard = InFlight::new(&activity);
                let name = method.short_name();
                let subject = method.subject().map(str::to_string);
                match activity.turn(uid, &limits).await {
                    Err(e) => {
                        let r = Err(e);
                        log(uid, name, subject.as_deref(), &r);
                        r
                    }
                    Ok(turn) => {
                        let (ctx, peer2) = (ctx.clone(), peer.clone());
                        // The request runs in its own task: a client that goes away, or a
                        // timeout, does not interrupt a mount half-way; the outcome is recorded
                        // either way, and the turn is held until it is.
                        let task = tokio::spawn(async move {
                            let start = Instant::now();
                            let r = ctx.handle(&peer2, method).await;
                            let took = Some(start.elapsed());
                            log_took(peer2.uid, name, subject.as_deref(), &r, took);
                            drop(turn);
                            drop(guard);
                            r
                        });
                        match tokio::time::timeout(limits.request, task).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Err(ServiceError::system("internal error", libc::EIO)),
                            Err(_) => {
                                let e = ServiceError::Timeout {
                                    seconds: limits.request.as_secs(),
                                };
                                log(
                                    uid,
                                    name,
                                    call.parameters.get("target").and_then(Value::as_str),
                                    &Err(e.clone()),
                                );
                                Err(e)
                            }
                        }
                    }
                }
            }
        };
        if call.oneway {
            continue;
        }
        let reply = match result {
            Ok(p) => Reply::ok(p),
            Err(e) => error_reply(&e),
        };
        if !send(&mut stream, &reply, limits.request).await {
            return;
        }
    }
}

/// Answers a connection over the limits with the error, as the reply to its first call if it
/// sends one promptly (so that a client writing its call does not get EPIPE instead), and closes.
/// At most [`MAX_REFUSING`] at a time; beyond that the connection is just closed.
async fn refuse(mut stream: UnixStream, e: ServiceError, activity: &Activity) {
    let _refusing = match Refusing::enter(activity) {
        Some(r) => r,
        None => return,
    };
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let _ = send(&mut stream, &error_reply(&e), Duration::from_secs(1)).await;
    let _ = stream.shutdown().await;
}

/// One refusal being answered, counted until dropped.
struct Refusing<'a>(&'a Activity);

impl<'a> Refusing<'a> {
    fn enter(a: &'a Activity) -> Option<Refusing<'a>> {
        let before = a.refusing.fetch_add(1, Ordering::SeqCst);
        let r = Refusing(a);
        (before < MAX_REFUSING).then_some(r)
    }
}

impl Drop for Refusing<'_> {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves until SIGTERM/SIGINT, or until idle for `exit_idle` (socket activation).
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    limits: Limits,
    exit_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let activity = Arc::new(Activity::new(&limits));
    activity.touch();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let cred = match stream.peer_cred() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("peer credentials: {e}");
                        continue;
                    }
                };
                let uid = cred.uid();
                match ConnSlot::take(&activity, uid, &limits) {
                    Ok(slot) => {
                        tokio::spawn(connection(stream, cred, ctx.clone(), limits.clone(), activity.clone(), slot));
                    }
                    Err(e) => {
                        activity.log_refusal(uid, &e);
                        let activity = activity.clone();
                        tokio::spawn(async move { refuse(stream, e, &activity).await });
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(limit) = exit_idle {
                    let busy = activity.open.load(Ordering::SeqCst) + activity.in_flight.load(Ordering::SeqCst);
                    if busy == 0 && activity.idle_for() >= limit {
                        tracing::info!("idle for {:?}, exiting", limit);
                        break;
                    }
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM, exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT, exiting"); break; }
        }
    }
    // Let requests in progress finish (they are bounded by the request time).
    let deadline = Instant::now() + limits.request + Duration::from_secs(1);
    while activity.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
