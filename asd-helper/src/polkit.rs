//! Authorization through polkit on the system bus (DESIGN.md §6 rule 4).
//!
//! The caller is a `unix-process` subject: the pid from SO_PEERCRED, its start time, and the uid
//! from SO_PEERCRED. polkit compares the start time with /proc, and the helper checks through a
//! pidfd (SO_PEERPIDFD) that the connecting process is still alive after polkit answered, so the
//! pid cannot have been reused by another process during the check. (polkit 124+ also accepts the
//! pidfd itself; Debian 12 ships polkit 122, which does not, so the pid form is used.)
//!
//! Without a system bus or polkitd, targets inside the caller's home are allowed and all others
//! refused, and the log says that polkit was not reachable.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use asd_protocol::ServiceError;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use crate::peer::{self, Peer};

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

async fn ask(peer: &Peer, action: &'static str, target: &Path) -> Result<bool, Failure> {
    let pid = peer
        .pid
        .ok_or_else(|| Failure::Refused("the caller's pid is unknown".into()))?;
    let start =
        peer::start_time(pid).map_err(|e| Failure::Refused(format!("caller process: {e}")))?;
    if peer.pidfd.is_some() && !peer.alive() {
        return Err(Failure::Refused("the caller process has exited".into()));
    }
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| Failure::Unreachable(format!("system bus: {e}")))?;
    let proxy = AuthorityProxy::new(&conn)
        .await
        .map_err(|e| Failure::Unreachable(format!("polkit proxy: {e}")))?;
    let subject = Subject::new_for_pid(pid, Some(start), Some(peer.uid))
        .map_err(|e| Failure::Refused(format!("polkit subject: {e}")))?;
    let target = target.to_string_lossy();
    let user = peer.user.clone().unwrap_or_default();
    let mut details = HashMap::new();
    details.insert("target", target.as_ref());
    details.insert("user", user.as_str());
    let result = proxy
        .check_authorization(
            &subject,
            action,
            &details,
            CheckAuthorizationFlags::empty(),
            "",
        )
        .await;
    match result {
        Ok(r) => {
            if peer.pidfd.is_some() && !peer.alive() {
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
