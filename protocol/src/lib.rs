//! Wire protocol between the asd manager and the root helper (see DESIGN.md §6).
//!
//! Varlink style: each message is one JSON object followed by a NUL byte; calls are
//! `{"method": "io.asd.Helper.Name", "parameters": {...}}`, replies `{"parameters": {...}}` or
//! `{"error": "io.asd.Helper.ErrorName", "parameters": {...}}`. The interface description
//! (IDL) is `io.asd.Helper.varlink`, served by `org.varlink.service.GetInterfaceDescription`.
//!
//! Why the framing is hand-written instead of built on `zlink` (which DESIGN.md names): zlink
//! 0.8 fits the wire format, but not the helper's needs. Its read buffer limit is a hard-coded
//! 100 MiB (we must refuse anything over 64 KiB, configurable); its `Server` handles the calls of
//! all connections one at a time in one task, so one slow request (a polkit round trip, a mount on
//! a slow file system) would stall every other user, and it has no idle timeout, request timeout
//! or per-uid connection limit to plug in; and it is async only, while the manager needs a
//! small blocking client. The framing is a hundred lines (`frame`), shared by the blocking
//! client here and the helper's tokio server.
//!
//! No policy and no mounts live here.

pub mod client;
pub mod error;
pub mod frame;
pub mod message;
pub mod method;

use std::path::PathBuf;

pub use error::ServiceError;
pub use frame::{FrameDecoder, FrameError, DEFAULT_MAX_MESSAGE};
pub use message::{Call, Reply, RequestError};
pub use method::{
    AreaReply, BackupReply, CoverReply, DetachReply, EntryKind, FreezeReply, Info, Method, Mode,
    MountEntry, MountList, OverlayReply,
};

/// The helper's interface name.
pub const HELPER_INTERFACE: &str = "io.asd.Helper";
/// The varlink service interface every varlink service implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";
/// The interface description of `io.asd.Helper`.
pub const HELPER_IDL: &str = include_str!("io.asd.Helper.varlink");
/// The interface description of `org.varlink.service`.
pub const SERVICE_IDL: &str = include_str!("org.varlink.service.varlink");

/// Default socket of the helper.
pub const DEFAULT_SOCKET: &str = "/run/asd/io.asd.Helper";
/// Environment variable overriding the socket path (for clients and for the helper's tests).
pub const SOCKET_ENV: &str = "ASD_HELPER_SOCKET";

/// `$ASD_HELPER_SOCKET` if set and not empty, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// The IDL of an interface this service implements.
pub fn interface_description(interface: &str) -> Option<&'static str> {
    match interface {
        HELPER_INTERFACE => Some(HELPER_IDL),
        SERVICE_INTERFACE => Some(SERVICE_IDL),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idl_names_its_interface() {
        assert!(super::HELPER_IDL.contains("\ninterface io.asd.Helper\n"));
        assert!(super::SERVICE_IDL.contains("\ninterface org.varlink.service\n"));
    }
}
