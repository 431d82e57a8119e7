//! `asd daemon`, what the systemd units run: sync, tell systemd we are ready, write back every
//! interval, and on SIGTERM (or SIGINT) unsync and exit 0. A killed daemon leaves its mounts in
//! place; the next start finds them live and carries on (or recovers what is broken).

use std::time::{Duration, SystemTime};

use crate::engine::{Engine, EngineError};

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

fn clock(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes only into the zeroed `tm` we own; `secs` lives on our stack.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if ok {
        format!("{:02}:{:02}", tm.tm_hour, tm.tm_min)
    } else {
        "?".into()
    }
}

/// Block the stop signals so they are taken synchronously by `wait_signal`.
fn block_signals() -> Result<nix::sys::signal::SigSet, DaemonError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
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
    let interval = engine
        .runtime
        .load()
        .ok()
        .flatten()
        .map(|s| s.config.resync_interval)
        .unwrap_or(Duration::from_secs(3600));
    let count = engine
        .runtime
        .load()
        .ok()
        .flatten()
        .map(|s| s.targets.len())
        .unwrap_or(0);
    if report.already_running {
        tracing::info!(
            "targets were already in RAM (a previous daemon was stopped uncleanly); carrying on"
        );
    }
    let mut last = String::from("never");
    let status = |last: &str| {
        let mut s = format!(
            "{count} target(s) in RAM, last resync {last}, every {}s",
            interval.as_secs()
        );
        if let Some(p) = &problem {
            s = format!("{s}; {p}");
        }
        s
    };
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status(&last)),
    ]);
    tracing::info!("{}", status(&last));
    loop {
        match wait_signal(&set, interval) {
            None | Some(libc::SIGUSR1) => {
                let began = std::time::Instant::now();
                match engine.resync() {
                    Ok(_) => {
                        let took = began.elapsed().as_secs_f64();
                        // In the journal and the status line: how long write-backs take is
                        // what tells a user whether the interval suits them.
                        tracing::info!("resync done in {took:.3} s");
                        last = format!("{} ({took:.2} s)", clock(SystemTime::now()));
                    }
                    Err(e) => {
                        tracing::error!("resync failed: {e}; will try again at the next interval")
                    }
                }
                notify(&[sd_notify::NotifyState::Status(&status(&last))]);
            }
            Some(libc::SIGHUP) => {
                tracing::info!("SIGHUP: config edits apply after a restart (systemctl restart); writing back now");
                if let Err(e) = engine.resync() {
                    tracing::error!("resync failed: {e}");
                }
            }
            Some(_) => break,
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
