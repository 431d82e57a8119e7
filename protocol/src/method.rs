//! Typed calls and replies of `io.asd.Helper` and `org.varlink.service`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ServiceError;
use crate::message::Call;
use crate::{HELPER_INTERFACE, SERVICE_INTERFACE};

/// How a target is kept in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Copy,
    Overlay,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Overlay => "overlay",
        }
    }

    /// `copy` or `overlay`, exactly; anything else (empty included) is `InvalidMode`.
    pub fn parse(s: &str) -> Result<Mode, ServiceError> {
        match s {
            "copy" => Ok(Mode::Copy),
            "overlay" => Ok(Mode::Overlay),
            other => Err(ServiceError::InvalidMode {
                mode: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every method the helper answers. Paths are strings: the protocol is JSON, so a path must be
/// valid UTF-8 (the client refuses others before sending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    GetInfo,
    GetInterfaceDescription {
        interface: String,
    },
    PrepareArea {
        volatile: String,
    },
    BindBackup {
        target: String,
        mode: Mode,
    },
    MountOverlay {
        target: String,
    },
    Cover {
        target: String,
        mode: Mode,
    },
    Detach {
        target: String,
    },
    Freeze {
        target: String,
        frozen: bool,
    },
    /// Entries asd keeps beside a target whose parent only root may write (see the IDL).
    MakeBeside {
        target: String,
        name: String,
        kind: EntryKind,
    },
    RenameBeside {
        target: String,
        from: String,
        to: String,
    },
    RemoveBeside {
        target: String,
        name: String,
    },
    ListMounts,
}

/// What `MakeBeside` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Dir => "dir",
            EntryKind::File => "file",
        }
    }

    /// `dir` or `file`, exactly.
    pub fn parse(s: &str) -> Result<EntryKind, ServiceError> {
        match s {
            "dir" => Ok(EntryKind::Dir),
            "file" => Ok(EntryKind::File),
            _ => Err(ServiceError::InvalidParameter {
                parameter: "kind".into(),
            }),
        }
    }
}

/// Reads the parameters of one call, strictly: every expected key with the right type, and no
/// other key.
struct Params<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Params<'a> {
    fn string(&self, key: &str) -> Result<String, ServiceError> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ServiceError::InvalidParameter {
                parameter: key.to_string(),
            }),
        }
    }

    fn boolean(&self, key: &str) -> Result<bool, ServiceError> {
        match self.map.get(key) {
            Some(Value::Bool(b)) => Ok(*b),
            _ => Err(ServiceError::InvalidParameter {
                parameter: key.to_string(),
            }),
        }
    }

    fn mode(&self, key: &str) -> Result<Mode, ServiceError> {
        Mode::parse(&self.string(key)?)
    }

    fn only(&self, keys: &[&str]) -> Result<(), ServiceError> {
        match self.map.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(extra) => Err(ServiceError::InvalidParameter {
                parameter: extra.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl Method {
    /// The method's short name (`BindBackup`).
    pub fn short_name(&self) -> &'static str {
        match self {
            Method::GetInfo => "GetInfo",
            Method::GetInterfaceDescription { .. } => "GetInterfaceDescription",
            Method::PrepareArea { .. } => "PrepareArea",
            Method::BindBackup { .. } => "BindBackup",
            Method::MountOverlay { .. } => "MountOverlay",
            Method::Cover { .. } => "Cover",
            Method::Detach { .. } => "Detach",
            Method::Freeze { .. } => "Freeze",
            Method::MakeBeside { .. } => "MakeBeside",
            Method::RenameBeside { .. } => "RenameBeside",
            Method::RemoveBeside { .. } => "RemoveBeside",
            Method::ListMounts => "ListMounts",
        }
    }

    /// The fully qualified name (`io.asd.Helper.BindBackup`).
    pub fn full_name(&self) -> String {
        let iface = match self {
            Method::GetInfo | Method::GetInterfaceDescription { .. } => SERVICE_INTERFACE,
            _ => HELPER_INTERFACE,
        };
        format!("{iface}.{}", self.short_name())
    }

    /// The path the call is about, for logs.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Method::PrepareArea { volatile } => Some(volatile),
            Method::BindBackup { target, .. }
            | Method::MountOverlay { target }
            | Method::Cover { target, .. }
            | Method::Detach { target }
            | Method::Freeze { target, .. }
            | Method::MakeBeside { target, .. }
            | Method::RenameBeside { target, .. }
            | Method::RemoveBeside { target, .. } => Some(target),
            Method::GetInterfaceDescription { interface } => Some(interface),
            Method::GetInfo | Method::ListMounts => None,
        }
    }

    pub fn parameters(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: &str| {
            m.insert(k.to_string(), Value::String(v.to_string()));
        };
        match self {
            Method::GetInfo | Method::ListMounts => {}
            Method::GetInterfaceDescription { interface } => put("interface", interface),
            Method::PrepareArea { volatile } => put("volatile", volatile),
            Method::BindBackup { target, mode } | Method::Cover { target, mode } => {
                put("target", target);
                put("mode", mode.as_str());
            }
            Method::MountOverlay { target } | Method::Detach { target } => put("target", target),
            Method::Freeze { target, frozen } => {
                put("target", target);
                m.insert("frozen".to_string(), Value::Bool(*frozen));
            }
            Method::MakeBeside { target, name, kind } => {
                put("target", target);
                put("name", name);
                put("kind", kind.as_str());
            }
            Method::RenameBeside { target, from, to } => {
                put("target", target);
                put("from", from);
                put("to", to);
            }
            Method::RemoveBeside { target, name } => {
                put("target", target);
                put("name", name);
            }
        }
        m
    }

    pub fn to_call(&self) -> Call {
        Call::new(self.full_name(), self.parameters())
    }

    /// Maps a call onto a method: `MethodNotFound` for an unknown name, `InterfaceNotFound` for an
    /// unknown interface, `InvalidParameter` for a missing, extra or mistyped parameter,
    /// `InvalidMode` for a mode other than `copy`/`overlay`.
    pub fn from_call(call: &Call) -> Result<Method, ServiceError> {
        let p = Params {
            map: &call.parameters,
        };
        let Some((iface, name)) = call.method.rsplit_once('.') else {
            return Err(ServiceError::InterfaceNotFound {
                interface: call.method.clone(),
            });
        };
        let method = match (iface, name) {
            (SERVICE_INTERFACE, "GetInfo") => {
                p.only(&[])?;
                Method::GetInfo
            }
            (SERVICE_INTERFACE, "GetInterfaceDescription") => {
                p.only(&["interface"])?;
                Method::GetInterfaceDescription {
                    interface: p.string("interface")?,
                }
            }
            (HELPER_INTERFACE, "PrepareArea") => {
                p.only(&["volatile"])?;
                Method::PrepareArea {
                    volatile: p.string("volatile")?,
                }
            }
            (HELPER_INTERFACE, "BindBackup") => {
                p.only(&["target", "mode"])?;
                Method::BindBackup {
                    target: p.string("target")?,
                    mode: p.mode("mode")?,
                }
            }
            (HELPER_INTERFACE, "MountOverlay") => {
                p.only(&["target"])?;
                Method::MountOverlay {
                    target: p.string("target")?,
                }
            }
            (HELPER_INTERFACE, "Cover") => {
                p.only(&["target", "mode"])?;
                Method::Cover {
                    target: p.string("target")?,
                    mode: p.mode("mode")?,
                }
            }
            (HELPER_INTERFACE, "Detach") => {
                p.only(&["target"])?;
                Method::Detach {
                    target: p.string("target")?,
                }
            }
            (HELPER_INTERFACE, "Freeze") => {
                p.only(&["target", "frozen"])?;
                Method::Freeze {
                    target: p.string("target")?,
                    frozen: p.boolean("frozen")?,
                }
            }
            (HELPER_INTERFACE, "MakeBeside") => {
                p.only(&["target", "name", "kind"])?;
                Method::MakeBeside {
                    target: p.string("target")?,
                    name: p.string("name")?,
                    kind: EntryKind::parse(&p.string("kind")?)?,
                }
            }
            (HELPER_INTERFACE, "RenameBeside") => {
                p.only(&["target", "from", "to"])?;
                Method::RenameBeside {
                    target: p.string("target")?,
                    from: p.string("from")?,
                    to: p.string("to")?,
                }
            }
            (HELPER_INTERFACE, "RemoveBeside") => {
                p.only(&["target", "name"])?;
                Method::RemoveBeside {
                    target: p.string("target")?,
                    name: p.string("name")?,
                }
            }
            (HELPER_INTERFACE, "ListMounts") => {
                p.only(&[])?;
                Method::ListMounts
            }
            (SERVICE_INTERFACE | HELPER_INTERFACE, _) => {
                return Err(ServiceError::MethodNotFound {
                    method: call.method.clone(),
                })
            }
            _ => {
                return Err(ServiceError::InterfaceNotFound {
                    interface: iface.to_string(),
                })
            }
        };
        Ok(method)
    }
}

/// Reply of `org.varlink.service.GetInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub vendor: String,
    pub product: String,
    pub version: String,
    pub url: String,
    pub interfaces: Vec<String>,
}

/// Reply of `GetInterfaceDescription`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDescription {
    pub description: String,
}

/// Reply of `PrepareArea`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaReply {
    pub area: String,
}

/// Reply of `BindBackup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReply {
    pub backup: String,
}

/// Reply of `MountOverlay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayReply {
    pub volatile: String,
    pub upper: String,
    pub work: String,
}

/// Reply of `Cover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoverReply {
    pub volatile: String,
}

/// Reply of `Detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachReply {
    pub unmounted: Vec<String>,
    pub removed: Vec<String>,
}

/// Reply of `Freeze`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeReply {
    pub frozen: bool,
}

/// One target mounted for the caller (the IDL's `Mount`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEntry {
    pub target: String,
    pub mode: Mode,
    pub backup: String,
    pub volatile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<String>,
    pub backup_mounted: bool,
    pub overlay_mounted: bool,
    pub covered: bool,
}

/// Reply of `ListMounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountList {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    pub mounts: Vec<MountEntry>,
}

/// Serializes a reply struct into a parameters object.
pub fn to_parameters<T: Serialize>(reply: &T) -> Map<String, Value> {
    match serde_json::to_value(reply) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(v: Value) -> Call {
        Call::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn typed_calls_round_trip() {
        let all = [
            Method::GetInfo,
            Method::GetInterfaceDescription {
                interface: "io.asd.Helper".into(),
            },
            Method::PrepareArea {
                volatile: "/dev/shm".into(),
            },
            Method::BindBackup {
                target: "/home/a/x".into(),
                mode: Mode::Overlay,
            },
            Method::MountOverlay {
                target: "/home/a/x".into(),
            },
            Method::Cover {
                target: "/home/a/x".into(),
                mode: Mode::Copy,
            },
            Method::Detach {
                target: "/home/a/x".into(),
            },
            Method::Freeze {
                target: "/home/a/x".into(),
                frozen: true,
            },
            Method::Freeze {
                target: "/home/a/x".into(),
                frozen: false,
            },
            Method::MakeBeside {
                target: "/srv/a".into(),
                name: ".a-backup_asd-old.partial".into(),
                kind: EntryKind::Dir,
            },
            Method::MakeBeside {
                target: "/srv/a".into(),
                name: ".a-backup_asd-crashrecovery-20261204_050000.tar.zstd.partial".into(),
                kind: EntryKind::File,
            },
            Method::RenameBeside {
                target: "/srv/a".into(),
                from: ".a-backup_asd-old.partial".into(),
                to: ".a-backup_asd-old".into(),
            },
            Method::RemoveBeside {
                target: "/srv/a".into(),
                name: ".a-backup_asd-old.asd-trash".into(),
            },
            Method::ListMounts,
        ];
        for m in all {
            assert_eq!(Method::from_call(&m.to_call()).unwrap(), m);
        }
    }

    #[test]
    fn bad_calls_get_named_errors() {
        let e = |v| Method::from_call(&call(v)).unwrap_err();
        assert_eq!(
            e(json!({"method": "io.asd.Helper.Mount"})),
            ServiceError::MethodNotFound {
                method: "io.asd.Helper.Mount".into()
            }
        );
        assert_eq!(
            e(json!({"method": "com.example.X"})),
            ServiceError::InterfaceNotFound {
                interface: "com.example".into()
            }
        );
        assert_eq!(
            e(json!({"method": "nodot"})),
            ServiceError::InterfaceNotFound {
                interface: "nodot".into()
            }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": 5, "mode": "copy"}})
            ),
            ServiceError::InvalidParameter {
                parameter: "target".into()
            }
        );
        assert_eq!(
            e(json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x"}})),
            ServiceError::InvalidParameter {
                parameter: "mode".into()
            }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": ""}})
            ),
            ServiceError::InvalidMode { mode: "".into() }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": "Copy"}})
            ),
            ServiceError::InvalidMode {
                mode: "Copy".into()
            }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": ["copy"]}})
            ),
            ServiceError::InvalidParameter {
                parameter: "mode".into()
            }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.Detach", "parameters": {"target": "/x", "backup": "/etc"}})
            ),
            ServiceError::InvalidParameter {
                parameter: "backup".into()
            }
        );
        assert_eq!(
            e(
                json!({"method": "io.asd.Helper.Freeze", "parameters": {"target": "/x", "frozen": "yes"}})
            ),
            ServiceError::InvalidParameter {
                parameter: "frozen".into()
            }
        );
        assert_eq!(
            e(json!({"method": "io.asd.Helper.Freeze", "parameters": {"target": "/x"}})),
            ServiceError::InvalidParameter {
                parameter: "frozen".into()
            }
        );
    }

    #[test]
    fn every_method_is_declared_in_the_idl() {
        for name in [
            "PrepareArea",
            "BindBackup",
            "MountOverlay",
            "Cover",
            "Detach",
            "Freeze",
            "MakeBeside",
            "RenameBeside",
            "RemoveBeside",
            "ListMounts",
        ] {
            assert!(crate::HELPER_IDL.contains(&format!("\nmethod {name}(")));
        }
    }
}
