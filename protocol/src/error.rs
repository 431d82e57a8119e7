//! The errors a call can get, with their varlink names. Every `io.asd.Helper.*` name here is
//! declared in `io.asd.Helper.varlink` (a unit test checks it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// An error reply. Serialized as `{"error": NAME, "parameters": {...}}`, the varlink error form.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "error", content = "parameters")]
pub enum ServiceError {
    // --- org.varlink.service ---
    #[serde(rename = "org.varlink.service.InterfaceNotFound")]
    #[error("interface not found: {interface}")]
    InterfaceNotFound { interface: String },
    #[serde(rename = "org.varlink.service.MethodNotFound")]
    #[error("method not found: {method}")]
    MethodNotFound { method: String },
    #[serde(rename = "org.varlink.service.MethodNotImplemented")]
    #[error("method not implemented: {method}")]
    MethodNotImplemented { method: String },
    #[serde(rename = "org.varlink.service.InvalidParameter")]
    #[error("invalid parameter: {parameter}")]
    InvalidParameter { parameter: String },
    #[serde(rename = "org.varlink.service.PermissionDenied")]
    #[error("permission denied")]
    VarlinkPermissionDenied {},

    // --- io.asd.Helper ---
    #[serde(rename = "io.asd.Helper.InvalidRequest")]
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[serde(rename = "io.asd.Helper.MessageTooLarge")]
    #[error("message larger than {limit} bytes")]
    MessageTooLarge { limit: u64 },
    #[serde(rename = "io.asd.Helper.NotSupported")]
    #[error("calls with {flag:?} set are not supported")]
    NotSupported { flag: String },
    #[serde(rename = "io.asd.Helper.TooManyConnections")]
    #[error("too many connections from this user: the helper allows {limit} per user (its --max-connections-per-uid); retry when some are closed")]
    TooManyConnections { limit: u64 },
    #[serde(rename = "io.asd.Helper.AtCapacity")]
    #[error("the helper is at capacity for all users: {limit} connections served at once and {queue} waiting (its --max-connections and --max-queued); nothing was done, retry later")]
    AtCapacity { limit: u64, queue: u64 },
    #[serde(rename = "io.asd.Helper.Timeout")]
    #[error("the request did not finish within {seconds} s")]
    Timeout { seconds: u64 },
    #[serde(rename = "io.asd.Helper.InvalidMode")]
    #[error("invalid mode {mode:?} (expected \"copy\" or \"overlay\")")]
    InvalidMode { mode: String },
    #[serde(rename = "io.asd.Helper.InvalidPath")]
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[serde(rename = "io.asd.Helper.SymlinkInPath")]
    #[error("{path}: a component is a symlink")]
    SymlinkInPath { path: String },
    #[serde(rename = "io.asd.Helper.NotFound")]
    #[error("{path}: not found")]
    NotFound { path: String },
    #[serde(rename = "io.asd.Helper.NotADirectory")]
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    #[serde(rename = "io.asd.Helper.PermissionDenied")]
    #[error("{path}: permission denied")]
    PermissionDenied { path: String },
    #[serde(rename = "io.asd.Helper.NotOwner")]
    #[error("{path}: not owned by the caller")]
    NotOwner { path: String },
    #[serde(rename = "io.asd.Helper.UnsupportedFilesystem")]
    #[error("{path}: unsupported file system {filesystem}")]
    UnsupportedFilesystem { path: String, filesystem: String },
    #[serde(rename = "io.asd.Helper.MountsBelow")]
    #[error("{path}: {mountpoint} is a mount point on or beneath it")]
    MountsBelow { path: String, mountpoint: String },
    #[serde(rename = "io.asd.Helper.VolatileRejected")]
    #[error("VOLATILE {path}: {reason}")]
    VolatileRejected { path: String, reason: String },
    #[serde(rename = "io.asd.Helper.AreaNotOwned")]
    #[error("{path}: {reason}")]
    AreaNotOwned { path: String, reason: String },
    #[serde(rename = "io.asd.Helper.AreaNotPrepared")]
    #[error("the volatile area is not prepared (call PrepareArea first)")]
    AreaNotPrepared {},
    #[serde(rename = "io.asd.Helper.LowerNotReadable")]
    #[error("{path}: the caller cannot read it, so it cannot be an overlay lower layer")]
    LowerNotReadable { path: String },
    #[serde(rename = "io.asd.Helper.NotAuthorized")]
    #[error("not authorized for {action} on {target}: {reason}")]
    NotAuthorized {
        action: String,
        target: String,
        reason: String,
    },
    #[serde(rename = "io.asd.Helper.AlreadyMounted")]
    #[error("{target} is already mounted")]
    AlreadyMounted { target: String },
    #[serde(rename = "io.asd.Helper.Overlaps")]
    #[error("{target} overlaps {other}")]
    Overlaps { target: String, other: String },
    #[serde(rename = "io.asd.Helper.TooManyTargets")]
    #[error("too many targets mounted for this user (limit {limit})")]
    TooManyTargets { limit: u64 },
    #[serde(rename = "io.asd.Helper.NotMounted")]
    #[error("nothing is mounted for {target} for this caller")]
    NotMounted { target: String },
    #[serde(rename = "io.asd.Helper.WrongState")]
    #[error("{target}: {reason}")]
    WrongState { target: String, reason: String },
    #[serde(rename = "io.asd.Helper.BackupInUse")]
    #[error("backup {path}: {reason}")]
    BackupInUse { path: String, reason: String },
    #[serde(rename = "io.asd.Helper.SystemError")]
    #[error("{operation} failed (errno {errno})")]
    SystemError { operation: String, errno: i32 },

    /// Any other error name (a newer helper, or another service).
    #[serde(skip)]
    #[error("{name}: {parameters}")]
    Other { name: String, parameters: Value },
}

impl ServiceError {
    /// The full varlink error name.
    pub fn name(&self) -> String {
        match self {
            ServiceError::Other { name, .. } => name.clone(),
            _ => match serde_json::to_value(self) {
                Ok(Value::Object(obj)) => match obj.get("error") {
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            },
        }
    }

    /// The error's parameters object.
    pub fn parameters(&self) -> Map<String, Value> {
        match self {
            ServiceError::Other {
                parameters: Value::Object(p),
                ..
            } => p.clone(),
            ServiceError::Other { .. } => Map::new(),
            _ => match serde_json::to_value(self) {
                Ok(Value::Object(mut obj)) => match obj.remove("parameters") {
                    Some(Value::Object(p)) => p,
                    _ => Map::new(),
                },
                _ => Map::new(),
            },
        }
    }

    /// Builds the error from a reply's name and parameters; unknown names (or parameters that do
    /// not fit) give [`ServiceError::Other`].
    pub fn from_wire(name: &str, parameters: Map<String, Value>) -> ServiceError {
        let mut obj = Map::new();
        obj.insert("error".into(), Value::String(name.to_string()));
        obj.insert("parameters".into(), Value::Object(parameters.clone()));
        serde_json::from_value(Value::Object(obj)).unwrap_or(ServiceError::Other {
            name: name.to_string(),
            parameters: Value::Object(parameters),
        })
    }

    /// Whether the helper turned the connection away for lack of room (this user's connections,
    /// or everyone's) before doing anything: the same call may be tried again later.
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            ServiceError::TooManyConnections { .. } | ServiceError::AtCapacity { .. }
        )
    }

    /// A `SystemError` for a failed operation.
    pub fn system(operation: impl Into<String>, errno: i32) -> ServiceError {
        ServiceError::SystemError {
            operation: operation.into(),
            errno,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<ServiceError> {
        let s = || "x".to_string();
        vec![
            ServiceError::InterfaceNotFound { interface: s() },
            ServiceError::MethodNotFound { method: s() },
            ServiceError::MethodNotImplemented { method: s() },
            ServiceError::InvalidParameter { parameter: s() },
            ServiceError::VarlinkPermissionDenied {},
            ServiceError::InvalidRequest { reason: s() },
            ServiceError::MessageTooLarge { limit: 1 },
            ServiceError::NotSupported { flag: s() },
            ServiceError::TooManyConnections { limit: 1 },
            ServiceError::AtCapacity { limit: 1, queue: 2 },
            ServiceError::Timeout { seconds: 1 },
            ServiceError::InvalidMode { mode: s() },
            ServiceError::InvalidPath {
                path: s(),
                reason: s(),
            },
            ServiceError::SymlinkInPath { path: s() },
            ServiceError::NotFound { path: s() },
            ServiceError::NotADirectory { path: s() },
            ServiceError::PermissionDenied { path: s() },
            ServiceError::NotOwner { path: s() },
            ServiceError::UnsupportedFilesystem {
                path: s(),
                filesystem: s(),
            },
            ServiceError::MountsBelow {
                path: s(),
                mountpoint: s(),
            },
            ServiceError::VolatileRejected {
                path: s(),
                reason: s(),
            },
            ServiceError::AreaNotOwned {
                path: s(),
                reason: s(),
            },
            ServiceError::AreaNotPrepared {},
            ServiceError::LowerNotReadable { path: s() },
            ServiceError::NotAuthorized {
                action: s(),
                target: s(),
                reason: s(),
            },
            ServiceError::AlreadyMounted { target: s() },
            ServiceError::Overlaps {
                target: s(),
                other: s(),
            },
            ServiceError::TooManyTargets { limit: 1 },
            ServiceError::NotMounted { target: s() },
            ServiceError::WrongState {
                target: s(),
                reason: s(),
            },
            ServiceError::BackupInUse {
                path: s(),
                reason: s(),
            },
            ServiceError::SystemError {
                operation: s(),
                errno: 5,
            },
        ]
    }

    #[test]
    fn every_error_round_trips_and_is_declared() {
        let idl = crate::HELPER_IDL;
        let service_idl = crate::SERVICE_IDL;
        for e in samples() {
            let name = e.name();
            let back = ServiceError::from_wire(&name, e.parameters());
            assert_eq!(back, e, "{name}");
            let (iface, short) = name.rsplit_once('.').unwrap();
            let decl = format!("error {short} (");
            let text = if iface == "io.asd.Helper" {
                idl
            } else {
                service_idl
            };
            assert!(text.contains(&decl), "{name} is not declared in the IDL");
            // Declared parameters match the serialized ones.
            let line = text.lines().find(|l| l.starts_with(&decl)).unwrap();
            for key in e.parameters().keys() {
                assert!(
                    line.contains(&format!("{key}: ")),
                    "{name} lacks {key} in IDL"
                );
            }
        }
    }

    #[test]
    fn unknown_errors_are_kept() {
        let mut p = Map::new();
        p.insert("a".into(), Value::from(1));
        let e = ServiceError::from_wire("com.example.Boom", p.clone());
        assert_eq!(e.name(), "com.example.Boom");
        assert_eq!(e.parameters(), p);
        // Known name with parameters of the wrong shape: kept as Other, not a panic.
        let e = ServiceError::from_wire("io.asd.Helper.NotOwner", p);
        assert!(matches!(e, ServiceError::Other { .. }));
    }
}
