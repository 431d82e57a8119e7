//! The varlink message envelopes: a call and a reply, as they are on the wire.

use serde_json::{Map, Value};
use thiserror::Error;

/// Why a frame is not a call. The helper answers with `io.asd.Helper.InvalidRequest`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("the message is not a JSON object")]
    NotObject,
    #[error("the call has no method name (a non-empty string)")]
    NoMethod,
    #[error("the field {0:?} has the wrong type")]
    BadField(&'static str),
}

/// A method call: `{"method": "iface.Name", "parameters": {...}, "oneway"|"more"|"upgrade": bool}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Call {
    pub method: String,
    pub parameters: Map<String, Value>,
    pub oneway: bool,
    pub more: bool,
    pub upgrade: bool,
}

fn flag(obj: &Map<String, Value>, key: &'static str) -> Result<bool, RequestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RequestError::BadField(key)),
    }
}

impl Call {
    pub fn new(method: impl Into<String>, parameters: Map<String, Value>) -> Call {
        Call {
            method: method.into(),
            parameters,
            ..Call::default()
        }
    }

    /// Parses one frame. Unknown top-level keys are ignored (the varlink spec adds keys over time).
    pub fn parse(frame: &[u8]) -> Result<Call, RequestError> {
        let value: Value =
            serde_json::from_slice(frame).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(RequestError::NotObject);
        };
        let method = match obj.get("method") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            _ => return Err(RequestError::NoMethod),
        };
        let parameters = match obj.get("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(RequestError::BadField("parameters")),
        };
        Ok(Call {
            method,
            parameters,
            oneway: flag(&obj, "oneway")?,
            more: flag(&obj, "more")?,
            upgrade: flag(&obj, "upgrade")?,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("method".into(), Value::String(self.method.clone()));
        if !self.parameters.is_empty() {
            obj.insert("parameters".into(), Value::Object(self.parameters.clone()));
        }
        for (key, set) in [
            ("oneway", self.oneway),
            ("more", self.more),
            ("upgrade", self.upgrade),
        ] {
            if set {
                obj.insert(key.into(), Value::Bool(true));
            }
        }
        Value::Object(obj)
    }
}

/// A reply: `{"parameters": {...}}`, or `{"error": "iface.Name", "parameters": {...}}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    pub parameters: Map<String, Value>,
    pub error: Option<String>,
    pub continues: bool,
}

impl Reply {
    pub fn ok(parameters: Map<String, Value>) -> Reply {
        Reply {
            parameters,
            ..Reply::default()
        }
    }

    /// Parses one frame as a reply.
    pub fn parse(frame: &[u8]) -> Result<Reply, RequestError> {
        let value: Value =
            serde_json::from_slice(frame).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(RequestError::NotObject);
        };
        let parameters = match obj.get("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(RequestError::BadField("parameters")),
        };
        let error = match obj.get("error") {
            None | Some(Value::Null) => None,
            Some(Value::String(e)) => Some(e.clone()),
            Some(_) => return Err(RequestError::BadField("error")),
        };
        Ok(Reply {
            parameters,
            error,
            continues: flag(&obj, "continues")?,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        if let Some(e) = &self.error {
            obj.insert("error".into(), Value::String(e.clone()));
        }
        obj.insert("parameters".into(), Value::Object(self.parameters.clone()));
        if self.continues {
            obj.insert("continues".into(), Value::Bool(true));
        }
        Value::Object(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls() {
        let c = Call::parse(br#"{"method":"io.asd.Helper.ListMounts"}"#).unwrap();
        assert_eq!(c.method, "io.asd.Helper.ListMounts");
        assert!(c.parameters.is_empty() && !c.oneway && !c.more && !c.upgrade);
        let c =
            Call::parse(br#"{"method":"a.B","parameters":{"x":1},"oneway":true,"new":0}"#).unwrap();
        assert!(c.oneway);
        assert_eq!(c.parameters["x"], 1);
        assert_eq!(
            Call::parse(&c.to_json().to_string().into_bytes()).unwrap(),
            c
        );
    }

    #[test]
    fn rejects_bad_calls() {
        assert!(matches!(Call::parse(b"{"), Err(RequestError::NotJson(_))));
        assert!(matches!(
            Call::parse(b"\xff\xfe"),
            Err(RequestError::NotJson(_))
        ));
        assert_eq!(Call::parse(b"[1]"), Err(RequestError::NotObject));
        assert_eq!(Call::parse(b"{}"), Err(RequestError::NoMethod));
        assert_eq!(Call::parse(br#"{"method":7}"#), Err(RequestError::NoMethod));
        assert_eq!(
            Call::parse(br#"{"method":"a.B","parameters":[]}"#),
            Err(RequestError::BadField("parameters"))
        );
        assert_eq!(
            Call::parse(br#"{"method":"a.B","more":"yes"}"#),
            Err(RequestError::BadField("more"))
        );
        // Deep nesting is an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            Call::parse(deep.as_bytes()),
            Err(RequestError::NotJson(_))
        ));
    }

    #[test]
    fn replies_round_trip() {
        let mut p = Map::new();
        p.insert("path".into(), Value::String("/x".into()));
        let r = Reply {
            parameters: p,
            error: Some("io.asd.Helper.NotOwner".into()),
            continues: false,
        };
        assert_eq!(
            Reply::parse(&r.to_json().to_string().into_bytes()).unwrap(),
            r
        );
    }
}
