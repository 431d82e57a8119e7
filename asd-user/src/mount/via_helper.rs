//! The per-user mode's side of the mount seam: every privileged step is asked of the root helper
//! over its socket. The helper derives all paths itself from the target and our identity, so
//! this only names the target and the mode.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use asd_protocol::client::{Client, ClientError};
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

    /// Run one call, connecting on first use and reconnecting once if the helper went away (it
    /// exits when idle and is started again by its socket).
    fn call<T>(&self, f: impl Fn(&mut Client) -> Result<T, ClientError>) -> Result<T, MountError> {
        for attempt in 0..2 {
            let mut slot = self.client.borrow_mut();
            if slot.is_none() {
                *slot = Some(Client::connect(&self.socket).map_err(|e| self.explain(e))?);
            }
            let Some(client) = slot.as_mut() else {
                continue;
            };
            match f(client) {
                Ok(v) => return Ok(v),
                Err(ClientError::Io(e)) if attempt == 0 => {
                    tracing::debug!("helper connection lost ({e}); reconnecting");
                    *slot = None;
                }
                Err(e) => return Err(self.explain(e)),
            }
        }
        Err(MountError::Helper(format!(
            "the asd helper at {} keeps closing the connection; see `journalctl -u asd-helper`",
            self.socket.display()
        )))
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
        let reply = self.call(|c| match c.detach(target) {
            Ok(r) => Ok(Some(r)),
            Err(ClientError::Service(ServiceError::NotMounted { .. })) => Ok(None),
            Err(e) => Err(e),
        })?;
        tracing::debug!("helper detach of {}: {reply:?}", target.display());
        Ok(())
    }
}

impl Default for ViaHelper {
    fn default() -> Self {
        Self::new()
    }
}

impl Mounter for ViaHelper {
    fn prepare_area(&self, volatile: &Path, area: &Path, _owner: &Owner) -> Result<(), MountError> {
        let got = self.call(|c| c.prepare_area(volatile))?;
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
        let frozen = self.call(|c| c.freeze(&t.paths.target, true))?;
        if !frozen {
            tracing::warn!(
                "{}: could not make it read-only for the final write-back; files are open for writing",
                t.paths.target.display()
            );
        }
        Ok(frozen)
    }

    fn thaw(&self, t: &TargetState) -> Result<(), MountError> {
        self.call(|c| c.freeze(&t.paths.target, false)).map(|_| ())
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
