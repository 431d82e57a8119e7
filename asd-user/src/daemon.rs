//! `asd daemon`, what the systemd units run: sync, tell systemd we are ready, write back every
//! interval, and on SIGTERM (or SIGINT) unsync and exit 0. A killed daemon leaves its mounts in
//! place; the next start finds them live and carries on (or recovers what is broken).
//!
//! Besides the interval, it writes back when the machine is about to sleep (see `sleep`), and
//! early when RAM fills up (see `pressure`): it looks at the volatile area and the memory
//! pressure every [`WATCH_EVERY`], warns once when either crosses its threshold, and writes
//! back at once and then at most every [`EARLY_EVERY`] while the warning lasts, so less is at
//! risk if writes into RAM start failing or the machine runs out of memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineError};
use crate::pressure;
use crate::show;
use crate::sleep::{self, SleepWatch};

/// How often the volatile area and the memory pressure are looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);
/// While RAM is filling up, write back at most this often (besides the interval).
pub const EARLY_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("signal setup: {0}")]
    Signals(std::io::Error),
}

fn notify(state: &[sd_notify::NotifyState]) {
    // Not under systemd (no NOTIFY_SOCKET) is fine: nothing to tell.
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Block the stop signals (and the ones that wake the loop) so they are taken synchronously by
/// `wait_signal`. Threads started afterwards inherit the mask.
fn block_signals() -> Result<nix::sys::signal::SigSet, DaemonError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        sleep::WAKE_SIGNAL,
    ] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| DaemonError::Signals(e.into()))?;
    Ok(set)
}

/// Wait up to `timeout` for one of `set`; `None` on timeout.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    loop {
        // SAFETY: `set` is a valid sigset_t owned by the caller and `ts` a valid timespec; a null
        // siginfo pointer is allowed.
        let rc = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
        if rc > 0 {
            return Some(rc);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => return None,
        }
    }
}

/// What the status line says, kept between updates.
struct Status {
    count: usize,
    interval: Duration,
    last: String,
    problem: Option<String>,
    warnings: Vec<pressure::Warning>,
}

impl Status {
    fn line(&self) -> String {
        let mut s = format!(
            "{} target(s) in RAM, last resync {}, every {}s",
            self.count,
            self.last,
            self.interval.as_secs()
        );
        if let Some(p) = &self.problem {
            s = format!("{s}; {p}");
        }
        for w in &self.warnings {
            s = format!("{s}; WARNING: {w}");
        }
        s.replace('\n', "; ")
    }

    fn tell(&self) {
        notify(&[sd_notify::NotifyState::Status(&self.line())]);
    }
}

/// Why a write-back runs, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Interval,
    Asked,
    Sleep,
    Early,
}

pub fn run(engine: &Engine) -> Result<(), DaemonError> {
    let set = block_signals()?;
    let mut problem = None;
    let report = match engine.sync() {
        Err(EngineError::Plan(crate::plan::PlanError::NoTargets(file))) => {
            return idle_without_targets(&set, &file);
        }
        // Some targets failed but others are in RAM: keep serving those (their write-backs
        // matter more than the exit status); the failure is logged and shown in the status.
        Err(e @ EngineError::Partial { .. }) if has_live_targets(engine) => {
            tracing::error!("{e}; carrying on with the targets that are in RAM");
            problem = Some(failed_status("NOT in RAM", &e));
            crate::engine::Report::default()
        }
        Err(e) => {
            // The unit's status line is where `systemctl status` users look first (a user's
            // own journal may not even be readable to them): say why it did not start.
            notify(&[sd_notify::NotifyState::Status(&failed_status(
                "not started",
                &e,
            ))]);
            return Err(e.into());
        }
        Ok(report) => report,
    };
    let state = engine.runtime.load().ok().flatten();
    let interval = state
        .as_ref()
        .map(|s| s.config.resync_interval)
        .unwrap_or(Duration::from_secs(3600));
    // The area as the targets use it: their owner's directory in VOLATILE.
    let area: Option<PathBuf> = state.as_ref().map(|s| {
        s.targets
            .first()
            .map(|t| t.paths.user_area.clone())
            .unwrap_or_else(|| s.config.volatile.clone())
    });
    if report.already_running {
        tracing::info!(
            "targets were already in RAM (a previous daemon was stopped uncleanly); carrying on"
        );
    }
    let mut status = Status {
        count: state.as_ref().map(|s| s.targets.len()).unwrap_or(0),
        interval,
        last: "never".into(),
        problem,
        warnings: Vec::new(),
    };
    let mut watch = pressure::Watch::default();
    if let Some(a) = &area {
        note_changes(&mut watch, a, &mut status);
    }
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status.line()),
    ]);
    tracing::info!("{}", status.line());
    // After the signals are blocked (its thread inherits the mask) and the sync is done.
    let sleeping = SleepWatch::start();
    let mut next = Instant::now() + interval;
    let mut last_early: Option<Instant> = None;
    loop {
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(WATCH_EVERY);
        let why = match wait_signal(&set, wait) {
            None => {
                let mut changed = false;
                if let Some(a) = &area {
                    changed = note_changes(&mut watch, a, &mut status);
                }
                if Instant::now() >= next {
                    Some(Why::Interval)
                } else if !status.warnings.is_empty()
                    && last_early.is_none_or(|t| t.elapsed() >= EARLY_EVERY)
                {
                    last_early = Some(Instant::now());
                    Some(Why::Early)
                } else {
                    if changed {
                        status.tell();
                    }
                    None
                }
            }
            Some(libc::SIGUSR1) => Some(Why::Asked),
            Some(s) if s == sleep::WAKE_SIGNAL as i32 => {
                // Every request queued (a signal may stand for several); one write-back
                // answers them all.
                let mut waiting = Vec::new();
                while let Some(sleep::Event::Sleep { done }) = sleeping.take() {
                    waiting.push(done);
                }
                if !waiting.is_empty() {
                    let ok = write_back(engine, Why::Sleep, &mut status);
                    next = Instant::now() + interval;
                    for done in waiting {
                        let _ = done.send(ok);
                    }
                }
                None
            }
            Some(libc::SIGHUP) => {
                tracing::info!("SIGHUP: config edits apply after a restart (systemctl restart); writing back now");
                Some(Why::Asked)
            }
            Some(_) => break,
        };
        if let Some(why) = why {
            if why == Why::Early {
                let what: Vec<String> = status.warnings.iter().map(|w| w.to_string()).collect();
                tracing::info!("writing back early: {}", what.join("; "));
            }
            write_back(engine, why, &mut status);
            next = Instant::now() + interval;
        }
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("writing back to disk"),
    ]);
    if let Err(e) = engine.unsync() {
        notify(&[sd_notify::NotifyState::Status(&failed_status(
            "stop failed",
            &e,
        ))]);
        return Err(e.into());
    }
    Ok(())
}

/// One resync, logged and shown in the status line; true when it succeeded (durably).
fn write_back(engine: &Engine, why: Why, status: &mut Status) -> bool {
    let began = Instant::now();
    let ok = match engine.resync() {
        Ok(_) => {
            let took = began.elapsed().as_secs_f64();
            // In the journal and the status line: how long write-backs take is what tells a
            // user whether the interval suits them.
            tracing::info!("resync done in {took:.3} s");
            status.last = format!("{} ({took:.2} s)", show::clock(show::now_secs()));
            true
        }
        Err(e) if why == Why::Interval => {
            tracing::error!("resync failed: {e}; will try again at the next interval");
            false
        }
        Err(e) => {
            tracing::error!("resync failed: {e}");
            false
        }
    };
    status.tell();
    ok
}

/// Looks at the volatile area and the memory pressure; logs what appeared (a warning, once)
/// and what cleared. Returns whether anything changed.
fn note_changes(watch: &mut pressure::Watch, area: &std::path::Path, status: &mut Status) -> bool {
    let change = watch.check(area);
    for w in &change.appeared {
        tracing::warn!("{w}");
    }
    for c in &change.cleared {
        tracing::info!("{c}: back to normal");
    }
    status.warnings = watch.active();
    change.any()
}

/// A one-line status (systemd reads STATUS= up to the end of the line) naming what went wrong:
/// the error, or for a partial failure ("see the messages above") each target's own message.
fn failed_status(what: &str, e: &EngineError) -> String {
    let msg = match e {
        EngineError::Partial { reasons, .. } if !reasons.is_empty() => {
            format!("{what}: {}", reasons.join("; "))
        }
        _ => format!("{what}: {e}"),
    }
    .replace('\n', "; ");
    match msg.char_indices().nth(1000) {
        Some((i, _)) => format!("{}...", &msg[..i]),
        None => msg,
    }
}

/// Nothing configured: stay up and say so (a freshly enabled unit must not fail), until stopped.
fn idle_without_targets(
    set: &nix::sys::signal::SigSet,
    file: &std::path::Path,
) -> Result<(), DaemonError> {
    let msg = format!(
        "no targets: add directories to WHATTOSYNC in {} and restart asd",
        file.display()
    );
    tracing::warn!("{msg}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&msg),
    ]);
    loop {
        match wait_signal(set, Duration::from_secs(3600)) {
            Some(libc::SIGTERM) | Some(libc::SIGINT) => return Ok(()),
            _ => continue,
        }
    }
}

fn has_live_targets(engine: &Engine) -> bool {
    engine
        .runtime
        .load()
        .ok()
        .flatten()
        .is_some_and(|s| s.targets.iter().any(crate::recover::is_live))
}
