//! Write back before the machine sleeps (issue 10 item 2).
//!
//! The daemon holds a logind "delay" inhibitor for sleep (`Inhibit("sleep", "asd", ...,
//! "delay")` on the system bus): logind then announces a suspend or hibernation with the
//! signal `PrepareForSleep(true)` and waits, up to its `InhibitDelayMaxUSec`, until every such
//! inhibitor is released. On the signal this module asks the daemon's loop for a resync
//! ([`SleepWatch::take`]) and releases the inhibitor (closes its descriptor) once the
//! resync is durable, or when logind would stop waiting anyway. After the resume
//! (`PrepareForSleep(false)`) it takes a new inhibitor for the next time.
//!
//! No system bus, or no logind on it: said once in the log, and the daemon carries on without
//! (its regular write-backs and the one at stop are unchanged).
//!
//! The D-Bus side runs on a thread of its own with a small single-threaded runtime; the daemon
//! loop stays synchronous and is woken by SIGUSR2, which it waits for with its other signals.

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use zbus::message::Type as MsgType;
use zbus::{Connection, MatchRule, Message, MessageStream};

const LOGIND: &str = "org.freedesktop.login1";
const PATH: &str = "/org/freedesktop/login1";
const MANAGER: &str = "org.freedesktop.login1.Manager";
/// Why we delay sleep, as `systemd-inhibit --list` shows it.
const WHY: &str = "writing back RAM copies";
/// What logind waits for a delay inhibitor by default (InhibitDelayMaxSec=5), when its own
/// setting cannot be read.
const DEFAULT_DELAY_MAX: Duration = Duration::from_secs(5);
/// The signal that wakes the daemon loop.
pub const WAKE_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR2;

/// A request from the watch to the daemon loop.
pub enum Event {
    /// The machine is about to sleep: write back now, then say how it went on `done`.
    Sleep {
        done: tokio::sync::oneshot::Sender<bool>,
    },
}

/// The daemon loop's end of the watch.
pub struct SleepWatch {
    events: mpsc::Receiver<Event>,
}

impl SleepWatch {
    /// Starts the watch on a thread of its own. Call after the daemon blocked its signals, so
    /// that the thread inherits the mask and never takes a stop signal itself.
    pub fn start() -> SleepWatch {
        let (tx, events) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("asd-sleep".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::warn!("no write-back before sleep: {e}");
                        return;
                    }
                };
                rt.block_on(watch(tx));
            });
        if let Err(e) = spawned {
            tracing::warn!("no write-back before sleep: {e}");
        }
        SleepWatch { events }
    }

    /// The next request, if one is waiting (after the daemon was woken by [`WAKE_SIGNAL`]).
    pub fn take(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

/// Wakes the daemon loop (blocked in `sigtimedwait`) after an event was queued.
fn wake() {
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), WAKE_SIGNAL);
}

async fn watch(tx: mpsc::Sender<Event>) {
    let conn = match Connection::system().await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!("no system bus ({e}): no write-back before suspend or hibernation");
            return;
        }
    };
    // Subscribed before the inhibitor is taken: no announcement can be missed while we hold it.
    let mut signals = match subscribe(&conn).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(
                "cannot listen for logind's PrepareForSleep ({e}): no write-back before suspend"
            );
            return;
        }
    };
    let delay_max = delay_max(&conn).await;
    let mut lock = match inhibit(&conn).await {
        Ok(fd) => Some(fd),
        Err(e) if no_logind(&e) => {
            tracing::info!(
                "logind is not on the system bus: no write-back before suspend or hibernation"
            );
            return;
        }
        Err(e) => {
            // Still worth listening: the write-back starts when the sleep does, without
            // delaying it.
            tracing::info!("logind refused a sleep inhibitor ({e}); writing back when a suspend starts, without delaying it");
            None
        }
    };
    tracing::debug!(
        "holding a sleep delay inhibitor; logind waits up to {:?}",
        delay_max
    );
    loop {
        let msg = match next(&mut signals).await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!("system bus: {e}");
                continue;
            }
            None => {
                tracing::info!(
                    "the system bus connection closed: no write-back before suspend any more"
                );
                return;
            }
        };
        let Ok(going) = msg.body().deserialize::<bool>() else {
            continue;
        };
        if going {
            before_sleep(&tx, delay_max).await;
            // Released: logind may go on (closing the last copy of the descriptor is what
            // releases it).
            drop(lock.take());
        } else {
            tracing::info!("resumed from sleep");
            if lock.is_none() {
                lock = match inhibit(&conn).await {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        tracing::info!("could not take a new sleep inhibitor after resume ({e})");
                        None
                    }
                };
            }
        }
    }
}

/// Asks the daemon loop for a write-back and waits until it is durable, or for as long as
/// logind waits for us (then the machine sleeps anyway; the write-back goes on after resume).
async fn before_sleep(tx: &mpsc::Sender<Event>, delay_max: Duration) {
    tracing::info!("the system is going to sleep: writing back first");
    let (done, finished) = tokio::sync::oneshot::channel();
    if tx.send(Event::Sleep { done }).is_err() {
        return;
    }
    wake();
    match tokio::time::timeout(delay_max, finished).await {
        Ok(Ok(true)) => tracing::info!("written back; the system may sleep"),
        Ok(_) => tracing::warn!("the write-back before sleep failed (see above); the system sleeps with the last good copy on disk"),
        Err(_) => tracing::warn!(
            "the write-back before sleep takes longer than logind waits ({delay_max:?}); the system sleeps while it runs"
        ),
    }
}

async fn subscribe(conn: &Connection) -> zbus::Result<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(MsgType::Signal)
        .sender(LOGIND)
        .path(PATH)
        .interface(MANAGER)
        .member("PrepareForSleep")
        .build()?;
    MessageStream::for_match_rule(rule, conn, None).await
}

async fn next(s: &mut MessageStream) -> Option<zbus::Result<Message>> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *s), cx))
        .await
}

/// `Inhibit("sleep", "asd", WHY, "delay")`: the descriptor that holds the inhibitor.
async fn inhibit(conn: &Connection) -> zbus::Result<OwnedFd> {
    let reply = conn
        .call_method(
            Some(LOGIND),
            PATH,
            Some(MANAGER),
            "Inhibit",
            &("sleep", "asd", WHY, "delay"),
        )
        .await?;
    let fd: zbus::OwnedFd = reply.body().deserialize()?;
    Ok(fd.into())
}

/// logind's InhibitDelayMaxUSec: how long it waits for delay inhibitors.
async fn delay_max(conn: &Connection) -> Duration {
    let got = conn
        .call_method(
            Some(LOGIND),
            PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(MANAGER, "InhibitDelayMaxUSec"),
        )
        .await
        .and_then(|r| r.body().deserialize::<zbus::wire::OwnedVariant>())
        .ok()
        .and_then(|v| u64::try_from(v).ok());
    match got {
        Some(us) if us > 0 => Duration::from_micros(us),
        _ => DEFAULT_DELAY_MAX,
    }
}

/// The error of a call to a name nobody owns (and the bus cannot start).
fn no_logind(e: &zbus::Error) -> bool {
    use zbus::fdo::Error as F;
    matches!(e, zbus::Error::FDO(f) if matches!(**f, F::ServiceUnknown(_) | F::NameHasNoOwner(_)))
}
