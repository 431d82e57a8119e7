//! A stock varlink client (PyPI `varlink`, `python3 -m varlink.cli`) introspects the helper and
//! calls it: the independent oracle for the wire format and the IDL.

mod common;

use std::process::Command;

use common::*;

fn python() -> String {
    std::env::var("ASD_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ensure_varlink_module() {
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import varlink"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&python()) {
        return;
    }
    eprintln!("installing the varlink module from PyPI (pip install varlink)");
    let out = run(Command::new(python()).args(["-m", "pip", "install", "--quiet", "varlink"]));
    assert!(
        out.status.success() && has(&python()),
        "cannot install the PyPI varlink client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = run(Command::new(python())
        .args(["-m", "varlink.cli"])
        .args(args));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn python_varlink_client_introspects_and_calls() {
    if !root_or_skip("python_varlink_client_introspects_and_calls") {
        return;
    }
    ensure_varlink_module();
    let h = Helper::start();
    let addr = format!("unix:{}", h.sock.display());

    let (ok, out) = cli(&["info", &addr]);
    assert!(ok, "{out}");
    assert!(out.contains("Product: asd-helper"), "{out}");
    assert!(
        out.contains("io.asd.Helper") && out.contains("org.varlink.service"),
        "{out}"
    );

    // The client fetches and parses the IDL (its parser rejects a malformed one).
    let (ok, out) = cli(&["help", &format!("{addr}/io.asd.Helper")]);
    assert!(ok, "{out}");
    assert!(out.contains("interface io.asd.Helper"), "{out}");
    assert!(
        out.contains("method BindBackup(target: string, mode: Mode) -> (backup: string)"),
        "{out}"
    );

    let (ok, out) = cli(&["call", &format!("{addr}/org.varlink.service.GetInfo"), "{}"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(v["product"], "asd-helper");

    let (ok, out) = cli(&["call", &format!("{addr}/io.asd.Helper.ListMounts"), "{}"]);
    assert!(ok, "{out}");
    assert!(out.contains("\"mounts\""), "{out}");

    // An error reply, as the client shows it.
    let (_, out) = cli(&[
        "call",
        &format!("{addr}/io.asd.Helper.Detach"),
        r#"{"target": "/nowhere"}"#,
    ]);
    assert!(out.contains("io.asd.Helper.NotMounted"), "{out}");
}
