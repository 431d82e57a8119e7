//! Authorization through polkit on the system bus (DESIGN.md §6 rule 4).
//!
//! The caller is a `unix-process` subject that names the process which connected, in a way a
//! reused pid cannot fake:
//! - `pidfd`: a pidfd of that process (SO_PEERPIDFD; see [`crate::peer`]). polkit 124 and later
//!   read the process from it, so the answer is about the caller and nothing else.
//! - `pid`, `start-time`: what polkit before 124 (Debian 12 ships 122) reads instead; it ignores
//!   the `pidfd` key. Both are read through the pidfd while it shows the caller alive, and the
//!   helper checks again through the pidfd after polkit answered: if the caller was still alive
//!   then, its pid named it for the whole check and cannot have been reused.
//! - `uid`: from SO_PEERCRED (polkit 124 refuses a pidfd without it).
//!
//! zbus_polkit's `Subject` sends either a pidfd and uid (which polkit before 124 refuses: it
//! needs `pid`) or pid, start time and uid (no pidfd), not both, so the subject is built here
//! and sent through its `AuthorityProxy`.
//!
//! Without a system bus or polkitd, targets inside the caller's home are allowed and all others
//! refused, and the log says that polkit was not reachable.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use std::os::fd::AsFd;

use asd_protocol::ServiceError;
use zbus::{Fd, SerializeDict, Type};
use zbus_polkit::policykit1::{AuthorityProxy, AuthorizationResult, CheckAuthorizationFlags};

use crate::peer::{Peer, Process, ProcessError};

pub const ACTION_HOME: &str = "io.asd.helper.sync-home";
pub const ACTION_ELSEWHERE: &str = "io.asd.helper.sync-elsewhere";

/// How long one polkit round trip may take (connection included).
const POLKIT_TIMEOUT: Duration = Duration::from_secs(8);

/// How an allowed request was allowed, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Polkit(&'static str),
    /// polkit could not be asked; the target is inside the caller's home.
    HomeWithoutPolkit(String),
}

enum Failure {
    /// No bus, no polkitd: the fallback applies.
    Unreachable(String),
    /// polkit answered with an error, or the caller vanished: refuse.
    Refused(String),
}

fn unreachable(e: &zbus::Error) -> bool {
    use zbus::fdo::Error as F;
    match e {
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => true,
        zbus::Error::FDO(f) => matches!(
            **f,
            F::ServiceUnknown(_)
                | F::NameHasNoOwner(_)
                | F::NoReply(_)
                | F::NoServer(_)
                | F::Timeout(_)
                | F::TimedOut(_)
                | F::Disconnected(_)
                | F::IOError(_)
                | F::BadAddress(_)
                | F::FileNotFound(_)
                | F::SpawnExecFailed(_)
                | F::SpawnForkFailed(_)
                | F::SpawnChildExited(_)
                | F::SpawnChildSignaled(_)
                | F::SpawnFailed(_)
                | F::SpawnFailedToSetup(_)
                | F::SpawnConfigInvalid(_)
                | F::SpawnServiceNotValid(_)
                | F::SpawnServiceNotFound(_)
                | F::SpawnPermissionsInvalid(_)
                | F::SpawnFileInvalid(_)
                | F::SpawnNoMemory(_)
        ),
        _ => false,
    }
}

/// The details of a `unix-process` subject, as polkit reads them (types included: `uid` is an
/// `i32`, `pidfd` a handle into the message's descriptors).
#[derive(Debug, SerializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct UnixProcess<'a> {
    pub pidfd: Fd<'a>,
    pub pid: u32,
    #[zbus(rename = "start-time")]
    pub start_time: u64,
    pub uid: i32,
}

/// The subject for the caller's process.
pub fn subject<'a>(
    process: Process,
    pidfd: &'a impl AsFd,
    uid: u32,
) -> (&'static str, UnixProcess<'a>) {
    (
        "unix-process",
        UnixProcess {
            pidfd: Fd::from(pidfd.as_fd()),
            pid: process.pid,
            start_time: process.start_time,
            // polkit reads uids as signed; a uid above i32::MAX is sent as it is on the wire.
            uid: uid as i32,
        },
    )
}

async fn ask(peer: &Peer, action: &'static str, target: &Path) -> Result<bool, Failure> {
    let process = peer
        .process()
        .map_err(|e| Failure::Refused(e.to_string()))?;
    let pidfd = peer
        .pidfd
        .as_ref()
        .ok_or_else(|| Failure::Refused(ProcessError::NotPinned.to_string()))?;
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| Failure::Unreachable(format!("system bus: {e}")))?;
    let proxy = AuthorityProxy::new(&conn)
        .await
        .map_err(|e| Failure::Unreachable(format!("polkit proxy: {e}")))?;
    let target = target.to_string_lossy();
    let user = peer.user.clone().unwrap_or_default();
    let mut details = HashMap::new();
    details.insert("target", target.as_ref());
    details.insert("user", user.as_str());
    let body = (
        subject(process, pidfd, peer.uid),
        action,
        &details,
        CheckAuthorizationFlags::empty(),
        "",
    );
    let result: zbus::Result<AuthorizationResult> =
        proxy.inner().call("CheckAuthorization", &body).await;
    match result {
        Ok(r) => {
            // polkit before 124 looked the caller up by pid: that was the caller only if it
            // has not exited since (a pid is freed, and can be reused, only after that).
            if !peer.alive() {
                return Err(Failure::Refused(
                    "the caller process exited during the check".into(),
                ));
            }
            if r.is_authorized {
                Ok(true)
            } else if r.is_challenge {
                Err(Failure::Refused(
                    "polkit requires authentication (auth_admin); no interactive authentication here"
                        .into(),
                ))
            } else {
                Ok(false)
            }
        }
        Err(e) if unreachable(&e) => Err(Failure::Unreachable(format!("polkit: {e}"))),
        Err(e) => Err(Failure::Refused(format!("polkit error: {e}"))),
    }
}

/// Asks whether `peer` may mount over `target`.
pub async fn authorize(peer: &Peer, target: &Path) -> Result<Grant, ServiceError> {
    let home = peer
        .home
        .as_deref()
        .is_some_and(|h| crate::paths::inside_home(target, h));
    let action = if home { ACTION_HOME } else { ACTION_ELSEWHERE };
    let refuse = |reason: String| ServiceError::NotAuthorized {
        action: action.to_string(),
        target: target.to_string_lossy().into_owned(),
        reason,
    };
    let outcome = match tokio::time::timeout(POLKIT_TIMEOUT, ask(peer, action, target)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Unreachable("polkit did not answer in time".into())),
    };
    match outcome {
        Ok(true) => Ok(Grant::Polkit(action)),
        Ok(false) => Err(refuse("denied by polkit".into())),
        Err(Failure::Refused(why)) => Err(refuse(why)),
        Err(Failure::Unreachable(why)) => {
            tracing::warn!(uid = peer.uid, action, "polkit not reachable ({why})");
            if home {
                Ok(Grant::HomeWithoutPolkit(why))
            } else {
                Err(refuse(format!(
                    "polkit not reachable ({why}); without it only targets inside the caller's home are allowed"
                )))
            }
        }
    }
}
