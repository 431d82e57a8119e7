//! The per-user mode's side of the mount seam: every privileged step is asked of the root helper
//! over its socket. The helper derives all paths itself from the target and our identity, so
//! this only names the target and the mode.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use asd_protocol::client::{Backoff, Client, ClientError};
use asd_protocol::error::ServiceError;
use asd_protocol::Mode as WireMode;

use super::{MountError, Mounter};
use crate::state::{Mode, Owner, TargetState};

pub struct ViaHelper {
    socket: PathBuf,
    client: RefCell<Option<Client>>,
}

fn wire(mode: Mode) -> WireMode {
    match mode {
        Mode::Copy => WireMode::Copy,
        Mode::Overlay => WireMode::Overlay,
    }
}

impl ViaHelper {
    pub fn new() -> ViaHelper {
        ViaHelper {
            socket: asd_protocol::socket_path(),
            client: RefCell::new(None),
        }
    }

    /// Run one call, connecting on first use.
    ///
    /// - The helper went away (it exits when idle and is started again by its socket), or
    ///   closed our silent connection to make room for others: reconnect and send the call
    ///   again, a few times. A call the helper did not answer because it closed the connection
    ///   first was not done: it reads a call only whole, and closes only between calls.
    /// - The helper is at capacity (a login storm), for everyone or for this user: it did
    ///   nothing; wait, longer each time, and try again, for up to [`Backoff::BUDGET`].
    /// - The call took longer than the helper's request time (a storm keeps the kernel's mount
    ///   table busy), or than our wait for the reply: the helper may still be doing it. Only a
    ///   step that may be done twice ([`Again::Safe`]) is asked again; the helper runs a
    ///   user's calls one after another, so the second waits for the first to end.
    fn call<T>(&self, f: impl Fn(&mut Client) -> Result<T, ClientError>) -> Result<T, MountError> {
        self.call_with(Again::Unsafe, f)
    }

    fn call_with<T>(
        &self,
        again: Again,
        f: impl Fn(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, MountError> {
        const RECONNECTS: u32 = 3;
        let mut reconnects = 0;
        let mut backoff = Backoff::default();
        loop {
            let mut slot = self.client.borrow_mut();
            if slot.is_none() {
                *slot = Some(Client::connect(&self.socket).map_err(|e| self.explain(e))?);
            }
            let Some(client) = slot.as_mut() else {
                continue;
            };
            match f(client) {
                Ok(v) => {
                    if backoff.tries() > 0 {
                        tracing::info!(
                            "the asd helper served us after {} tries in {:.1} s",
                            backoff.tries() + 1,
                            backoff.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(v);
                }
                Err(ClientError::Service(e)) if e.is_capacity() => {
                    // The helper closes a connection it turned away.
                    *slot = None;
                    drop(slot);
                    let Some(wait) = backoff.next_delay() else {
                        return Err(MountError::Helper(format!(
                            "{e}; gave up after {} tries in {:.0} s",
                            backoff.tries() + 1,
                            backoff.elapsed().as_secs_f64()
                        )));
                    };
                    if backoff.tries() == 1 {
                        tracing::warn!("{e}; trying again in {} ms", wait.as_millis());
                    } else {
                        tracing::info!(
                            "still turned away ({} tries): {e}; trying again in {} ms",
                            backoff.tries(),
                            wait.as_millis()
                        );
                    }
                    std::thread::sleep(wait);
                }
                Err(e) if again == Again::Safe && slow(&e) => {
                    // A reply that timed out leaves the connection out of step: a new one.
                    if matches!(e, ClientError::Io(_)) {
                        *slot = None;
                    }
                    drop(slot);
                    let Some(wait) = backoff.next_delay() else {
                        return Err(self.explain(e));
                    };
                    tracing::warn!(
                        "the asd helper is slow ({e}); asking again in {} ms (this step may be repeated)",
                        wait.as_millis()
                    );
                    std::thread::sleep(wait);
                }
                Err(ClientError::Io(e)) if reconnects < RECONNECTS && !timed_out(&e) => {
                    tracing::debug!("helper connection lost ({e}); reconnecting");
                    reconnects += 1;
                    *slot = None;
                    drop(slot);
                    // At once the first time (a connection closed while we were silent); after
                    // a pause if it happens again (a helper turning connections away unanswered).
                    if reconnects > 1 {
                        if let Some(wait) = backoff.next_delay() {
                            std::thread::sleep(wait);
                        }
                    }
                }
                Err(ClientError::Io(e)) if !timed_out(&e) => {
                    return Err(MountError::Helper(format!(
                        "the asd helper at {} keeps closing the connection ({e}); see `journalctl -u asd-helper`",
                        self.socket.display()
                    )));
                }
                Err(e) => return Err(self.explain(e)),
            }
        }
    }

    /// Turn a helper failure into a message that names the reason and the fix.
    fn explain(&self, e: ClientError) -> MountError {
        match e {
            ClientError::Connect { path, source } => MountError::Helper(format!(
                "cannot reach the asd helper at {} ({source}). Unprivileged asd needs it for mounting: \
                 ask an administrator to run `systemctl enable --now asd-helper.socket`",
                path.display()
            )),
            ClientError::Service(ServiceError::NotAuthorized { action, target, reason }) => MountError::Helper(format!(
                "polkit did not allow {action} for {target} ({reason}). Targets inside your home need \
                 io.asd.helper.sync-home; others need io.asd.helper.sync-elsewhere, which an administrator \
                 can grant with a polkit rule (see 50-asd-helper.rules.example in asd's documentation directory, /usr/share/doc/asd or /usr/local/share/doc/asd)"
            )),
            ClientError::Service(ServiceError::SystemError { operation, errno }) if errno == libc::EBUSY => {
                MountError::Busy {
                    path: PathBuf::from(operation),
                }
            }
            other => MountError::Helper(other.to_string()),
        }
    }

    /// Detach everything recorded for `target`; nothing recorded is fine (already detached).
    fn detach(&self, target: &Path) -> Result<(), MountError> {
        let reply = self.call_with(Again::Safe, |c| match c.detach(target) {
            Ok(r) => Ok(Some(r)),
            Err(ClientError::Service(ServiceError::NotMounted { .. })) => Ok(None),
            Err(e) => Err(e),
        })?;
        tracing::debug!("helper detach of {}: {reply:?}", target.display());
        Ok(())
    }
}

/// Whether a call may be sent again after a reply that did not come in time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Again {
    /// Doing it twice is doing it once: preparing the area, freezing or thawing the cover,
    /// detaching (the second finds nothing mounted).
    Safe,
    /// A second mount would fail (already mounted) or do more than asked.
    Unsafe,
}

/// The helper did not answer in time: its request timed out, or our wait for the reply did.
fn slow(e: &ClientError) -> bool {
    match e {
        ClientError::Service(ServiceError::Timeout { .. }) => true,
        ClientError::Io(e) => timed_out(e),
        _ => false,
    }
}

/// A reply that did not come in time: the helper may still be doing the call.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

impl Default for ViaHelper {
    fn default() -> Self {
        Self::new()
    }
}

impl Mounter for ViaHelper {
    fn prepare_area(&self, volatile: &Path, area: &Path, _owner: &Owner) -> Result<(), MountError> {
        let got = self.call_with(Again::Safe, |c| c.prepare_area(volatile))?;
        if got != area {
            return Err(MountError::Helper(format!(
                "the helper prepared {} but asd expected {}; are the helper and asd the same version?",
                got.display(),
                area.display()
            )));
        }
        Ok(())
    }

    fn bind_backup(&self, t: &TargetState) -> Result<(), MountError> {
        self.call(|c| c.bind_backup(&t.paths.target, wire(t.mode)))
            .map(|_| ())
    }

    fn mount_overlay(&self, t: &TargetState) -> Result<(), MountError> {
        self.call(|c| c.mount_overlay(&t.paths.target)).map(|_| ())
    }

    fn cover(&self, t: &TargetState) -> Result<(), MountError> {
        self.call(|c| c.cover(&t.paths.target, wire(t.mode)))
            .map(|_| ())
    }

    fn freeze(&self, t: &TargetState) -> Result<bool, MountError> {
        let frozen = self.call_with(Again::Safe, |c| c.freeze(&t.paths.target, true))?;
        if !frozen {
            tracing::warn!(
                "{}: could not make it read-only for the final write-back; files are open for writing",
                t.paths.target.display()
            );
        }
        Ok(frozen)
    }

    fn thaw(&self, t: &TargetState) -> Result<(), MountError> {
        self.call_with(Again::Safe, |c| c.freeze(&t.paths.target, false))
            .map(|_| ())
    }

    /// The helper takes a target apart in one step (cover, overlay, backup).
    fn uncover(&self, t: &TargetState) -> Result<(), MountError> {
        self.detach(&t.paths.target)
    }

    fn release(&self, t: &TargetState) -> Result<(), MountError> {
        self.detach(&t.paths.target)?;
        // The helper removes the backup dir it made, but only while it has a record of it: after
        // a reboot (its records in /run are gone) the empty dir stays. Removing it is only ever
        // an rmdir: it fails, harmlessly, on a dir with anything inside or mounted on it.
        let backup = &t.paths.backup;
        match std::fs::remove_dir(backup) {
            Ok(()) => tracing::debug!("removed the empty {}", backup.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::debug!("left {} in place: {e}", backup.display()),
        }
        Ok(())
    }
}
