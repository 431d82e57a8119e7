//! The socket side: accepts connections, enforces the limits (message size, connections per uid,
//! idle and request time), parses calls and logs one line per decision.

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

use crate::ops::Ctx;
use crate::peer::Peer;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message: usize,
    pub per_uid: usize,
    pub total: usize,
    pub idle: Duration,
    pub request: Duration,
}

/// Counts of open connections (per uid and in all) and of requests being handled.
#[derive(Default)]
struct Activity {
    per_uid: Mutex<HashMap<u32, usize>>,
    total: AtomicUsize,
    in_flight: AtomicUsize,
    last: Mutex<Option<Instant>>,
}

impl Activity {
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
}

/// One open connection, counted for its uid until dropped.
struct ConnSlot {
    activity: Arc<Activity>,
    uid: u32,
}

impl ConnSlot {
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
        if activity.total.load(Ordering::SeqCst) >= limits.total {
            return Err(ServiceError::TooManyConnections {
                limit: limits.total as u64,
            });
        }
        *n += 1;
        activity.total.fetch_add(1, Ordering::SeqCst);
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
            }
        }
        self.activity.total.fetch_sub(1, Ordering::SeqCst);
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
    // Everything that comes from the client is escaped: one decision, one line.
    let target = target.unwrap_or("-");
    let method = method.escape_debug();
    match result {
        Ok(_) => tracing::info!("uid={uid} method={method} target={target:?} result=ok"),
        Err(e) => tracing::info!(
            "uid={uid} method={method} target={target:?} result={} ({})",
            e.name().escape_debug(),
            e.to_string().escape_debug()
        ),
    }
}

async fn connection(
    mut stream: UnixStream,
    cred: tokio::net::unix::UCred,
    ctx: Arc<Ctx>,
    limits: Limits,
    activity: Arc<Activity>,
    _slot: ConnSlot,
) {
    let uid = cred.uid();
    // The passwd lookup may block (NSS): not on the runtime's threads.
    let fd = stream.as_raw_fd();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let gid = cred.gid();
    let peer = match tokio::task::spawn_blocking(move || Peer::of_socket(fd, uid, gid, pid)).await {
        Ok(p) => Arc::new(p),
        Err(_) => return,
    };
    let mut decoder = FrameDecoder::new(limits.max_message);
    let mut buf = vec![0u8; 16 * 1024];
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
            match tokio::time::timeout(limits.idle, stream.read(&mut buf)).await {
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
                let (ctx, peer2, guard) = (ctx.clone(), peer.clone(), InFlight::new(&activity));
                let name = method.short_name();
                let subject = method.subject().map(str::to_string);
                // The request runs in its own task: a client that goes away, or a timeout, does
                // not interrupt a mount half-way; the outcome is recorded either way.
                let task = tokio::spawn(async move {
                    let r = ctx.handle(&peer2, method).await;
                    log(peer2.uid, name, subject.as_deref(), &r);
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
async fn refuse(mut stream: UnixStream, e: ServiceError) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let _ = send(&mut stream, &error_reply(&e), Duration::from_secs(1)).await;
    let _ = stream.shutdown().await;
}

/// Serves until SIGTERM/SIGINT, or until idle for `exit_idle` (socket activation).
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    limits: Limits,
    exit_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let activity = Arc::new(Activity::default());
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
                        log(uid, "connect", None, &Err(e.clone()));
                        tokio::spawn(refuse(stream, e));
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(limit) = exit_idle {
                    let busy = activity.total.load(Ordering::SeqCst) + activity.in_flight.load(Ordering::SeqCst);
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
