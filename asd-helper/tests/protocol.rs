//! The wire protocol against a running helper: malformed JSON, a missing NUL, an oversized
//! message, unknown methods, wrong parameter types, more/upgrade/oneway, introspection. Each
//! gets a well-formed varlink error (or a clean close), never a crash.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn connect(h: &Helper) -> UnixStream {
    let s = UnixStream::connect(&h.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send_raw(s: &mut UnixStream, bytes: &[u8]) -> Option<Value> {
    s.write_all(bytes).unwrap();
    read_reply(s)
}

fn error_name(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

#[test]
fn malformed_messages_get_errors_and_the_connection_goes_on() {
    if !root_or_skip("malformed_messages_get_errors_and_the_connection_goes_on") {
        return;
    }
    let mut h = Helper::start();
    let mut s = connect(&h);
    for bad in [
        &b"{\"method\":\0"[..],
        b"not json\0",
        b"[1,2,3]\0",
        b"\"io.asd.Helper.ListMounts\"\0",
        b"{}\0",
        b"{\"method\":42}\0",
        b"{\"method\":\"\"}\0",
        b"{\"method\":\"io.asd.Helper.ListMounts\",\"parameters\":[]}\0",
        b"{\"method\":\"io.asd.Helper.ListMounts\",\"oneway\":\"yes\"}\0",
        b"\xff\xfe\xfd\0",
        b"\0",
    ] {
        let r = send_raw(&mut s, bad).expect("an error reply");
        assert_eq!(
            error_name(&r),
            "io.asd.Helper.InvalidRequest",
            "{bad:?}: {r}"
        );
        assert!(r["parameters"]["reason"].is_string());
    }
    // Deeply nested JSON: an error, not a stack overflow.
    let mut deep = "[".repeat(50_000).into_bytes();
    deep.push(0);
    let r = send_raw(&mut s, &deep).unwrap();
    assert_eq!(error_name(&r), "io.asd.Helper.InvalidRequest");
    let r = raw_call(&mut s, &json!({"method": "org.varlink.service.GetInfo"}));
    assert!(r.get("error").is_none(), "{r}");
    h.assert_serving();
}

#[test]
fn unknown_methods_and_wrong_parameters() {
    if !root_or_skip("unknown_methods_and_wrong_parameters") {
        return;
    }
    let mut h = Helper::start();
    let mut s = connect(&h);
    let cases = [
        (
            json!({"method": "io.asd.Helper.Mount"}),
            "org.varlink.service.MethodNotFound",
            "method",
        ),
        (
            json!({"method": "org.varlink.service.Shutdown"}),
            "org.varlink.service.MethodNotFound",
            "method",
        ),
        (
            json!({"method": "com.example.Thing.Do"}),
            "org.varlink.service.InterfaceNotFound",
            "interface",
        ),
        (
            json!({"method": "NoInterface"}),
            "org.varlink.service.InterfaceNotFound",
            "interface",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": 1, "mode": "copy"}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x"}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": null}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": ["/x"], "mode": "copy"}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.Detach", "parameters": {"target": "/x", "backup": "/etc"}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.PrepareArea", "parameters": {"volatile": {"path": "/dev/shm"}}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.ListMounts", "parameters": {"uid": 0}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": ""}}),
            "io.asd.Helper.InvalidMode",
            "mode",
        ),
        (
            json!({"method": "io.asd.Helper.Cover", "parameters": {"target": "/x", "mode": "COPY"}}),
            "io.asd.Helper.InvalidMode",
            "mode",
        ),
        (
            json!({"method": "io.asd.Helper.BindBackup", "parameters": {"target": "/x", "mode": "bind"}}),
            "io.asd.Helper.InvalidMode",
            "mode",
        ),
        (
            json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "com.example"}}),
            "org.varlink.service.InterfaceNotFound",
            "interface",
        ),
    ];
    for (call, want, param) in cases {
        let r = raw_call(&mut s, &call);
        assert_eq!(error_name(&r), want, "{call}: {r}");
        assert!(r["parameters"][param].is_string(), "{call}: {r}");
    }
    h.assert_serving();
}

#[test]
fn more_upgrade_and_oneway() {
    if !root_or_skip("more_upgrade_and_oneway") {
        return;
    }
    let mut h = Helper::start();
    let mut s = connect(&h);
    let r = raw_call(
        &mut s,
        &json!({"method": "io.asd.Helper.ListMounts", "more": true}),
    );
    assert_eq!(error_name(&r), "io.asd.Helper.NotSupported");
    assert_eq!(r["parameters"]["flag"], "more");
    let r = raw_call(
        &mut s,
        &json!({"method": "io.asd.Helper.ListMounts", "upgrade": true}),
    );
    assert_eq!(error_name(&r), "io.asd.Helper.NotSupported");
    assert_eq!(r["parameters"]["flag"], "upgrade");
    // oneway: no reply at all, even for an error; the next reply is the next call's.
    let mut bytes = Vec::new();
    for c in [
        json!({"method": "io.asd.Helper.ListMounts", "oneway": true}),
        json!({"method": "io.asd.Helper.Nope", "oneway": true}),
        json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "org.varlink.service"}}),
    ] {
        bytes.extend(serde_json::to_vec(&c).unwrap());
        bytes.push(0);
    }
    let r = send_raw(&mut s, &bytes).unwrap();
    assert_eq!(
        r["parameters"]["description"],
        asd_protocol::SERVICE_IDL,
        "{r}"
    );
    h.assert_serving();
}

#[test]
fn oversized_and_unterminated_messages() {
    if !root_or_skip("oversized_and_unterminated_messages") {
        return;
    }
    let h = Helper::start();
    // Over 64 KiB without a NUL: an error, then the helper closes the connection.
    let mut s = connect(&h);
    let big = format!(
        "{{\"method\":\"io.asd.Helper.ListMounts\",\"x\":\"{}\"",
        "a".repeat(70 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    let r = read_reply(&mut s).expect("an error before the close");
    assert_eq!(error_name(&r), "io.asd.Helper.MessageTooLarge");
    assert_eq!(r["parameters"]["limit"], 65536);
    assert!(read_reply(&mut s).is_none(), "closed after it");
    // Just over the limit, with a NUL.
    let mut s = connect(&h);
    let mut msg = serde_json::to_vec(
        &json!({"method": "io.asd.Helper.ListMounts", "parameters": {"x": "a".repeat(65536)}}),
    )
    .unwrap();
    msg.push(0);
    let _ = s.write_all(&msg);
    let r = read_reply(&mut s).expect("an error");
    assert_eq!(error_name(&r), "io.asd.Helper.MessageTooLarge");
    // A message without its NUL, then end of stream: a clean close, no reply.
    let mut s = connect(&h);
    s.write_all(br#"{"method":"org.varlink.service.GetInfo"}"#)
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(read_reply(&mut s).is_none());
    // A limit set by the admin is honoured.
    drop(h);
    let mut h = Helper::start_with(HelperOpts {
        args: vec!["--max-message".into(), "100".into()],
        ..HelperOpts::default()
    });
    let mut s = connect(&h);
    let r = raw_call(
        &mut s,
        &json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "x".repeat(200)}}),
    );
    assert_eq!(error_name(&r), "io.asd.Helper.MessageTooLarge");
    assert_eq!(r["parameters"]["limit"], 100);
    h.assert_serving();
}

#[test]
fn introspection() {
    if !root_or_skip("introspection") {
        return;
    }
    let h = Helper::start();
    let mut s = connect(&h);
    let r = raw_call(&mut s, &json!({"method": "org.varlink.service.GetInfo"}));
    assert_eq!(
        r["parameters"]["interfaces"],
        json!(["org.varlink.service", "io.asd.Helper"])
    );
    assert_eq!(r["parameters"]["product"], "asd-helper");
    let r = raw_call(
        &mut s,
        &json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.asd.Helper"}}),
    );
    assert_eq!(r["parameters"]["description"], asd_protocol::HELPER_IDL);
}
