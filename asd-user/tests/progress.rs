//! Progress at a terminal (issue 10 item 4): a sync that runs longer than about a second shows
//! a progress line on stderr, redrawn in place, when stderr is a real terminal (a pty made by
//! `script`), and never when stderr is a pipe, under systemd (INVOCATION_ID / JOURNAL_STREAM)
//! or with --quiet. NO_COLOR keeps it free of escapes. The copy runs in a worker as the data's
//! owner (root here copies a user's target), so the counters cross the worker's pipe.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Files in the target: enough for a sync of a debug build to take a few seconds here.
const FILES: usize = 50_000;

fn make_big_target(t: &Path, uid: u32, gid: u32) {
    for d in 0..100 {
        let dir = t.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES / 100 {
            std::fs::write(dir.join(format!("f{f}")), b"some bytes\n").unwrap();
        }
    }
    let out = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}")])
        .arg(t)
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `asd ARGS` in the test's namespace with stdin, stdout and stderr on a pty (`script`);
/// `env`: extra variables. Returns everything the terminal showed.
fn at_a_terminal(ns: &Ns, args: &str, env: &str) -> String {
    let inner = format!(
        "nsenter -t {pid} -m -- env ASDCONF={conf} ASD_RUNTIME_DIR={run} {env} {asd} {args}",
        pid = ns.pid,
        conf = ns.conf().display(),
        run = ns.run_dir().display(),
        asd = ASD,
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env_remove("INVOCATION_ID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .output()
        .expect("script");
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "asd {args} at a terminal failed:\n{text}"
    );
    text
}

/// The progress lines in what a terminal showed: redrawn ones start with a carriage return
/// and name the operation and the target.
fn progress_lines(shown: &str, op: &str, target: &Path) -> Vec<String> {
    let needle = format!("{op} {}", target.display());
    shown
        .split('\r')
        .map(|l| l.replace("\x1b[1m", "").replace("\x1b[0m", ""))
        .filter(|l| l.starts_with(&needle))
        .collect()
}

#[test]
fn progress_at_a_terminal_only() {
    if !require_root() {
        return;
    }
    if !have("script") {
        panic!("`script` (util-linux/bsdutils) is needed for a real pty");
    }
    let (uid, gid) = test_user("asdtest1");
    let ns = Ns::new();
    let t = ns.data().join("big");
    make_big_target(&t, uid, gid);
    ns.write_conf(&[&t], "");

    // At a terminal: the line appears, is redrawn in place, counts files towards the total,
    // and is cleared before the result is printed.
    let shown = at_a_terminal(&ns, "sync", "");
    let lines = progress_lines(&shown, "sync", &t);
    assert!(
        lines.len() >= 2,
        "a sync of {FILES} files at a terminal shows a progress line, redrawn:\n{shown:?}"
    );
    let total = format!("/{FILES} files").replace("50000", "50,000");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("copying into RAM") && l.contains(&total)),
        "the line counts files of the total while copying into RAM:\n{lines:#?}"
    );
    assert!(
        shown.contains("\x1b[1m"),
        "the target is bold without NO_COLOR: {shown:?}"
    );
    let result = shown
        .find("sync successful")
        .expect("the result is printed");
    let last_line = shown[..result].rfind('\r').unwrap_or(0);
    assert!(
        !shown[last_line..result].contains(" files"),
        "the progress line is cleared before the result: {:?}",
        &shown[last_line..result]
    );
    ns.asd_ok(&["unsync"]);

    // stderr a pipe: never (whatever stdout is).
    let out = ns.asd_cmd(&["sync"]).output().expect("asd sync");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains('\r') && progress_lines(&err, "sync", &t).is_empty(),
        "no progress when stderr is a pipe:\n{err:?}"
    );
    ns.asd_ok(&["unsync"]);

    // Under systemd (its variables set), at a terminal all the same: never.
    for var in ["INVOCATION_ID=0123abcd", "JOURNAL_STREAM=8:12345"] {
        let shown = at_a_terminal(&ns, "sync", var);
        assert!(
            progress_lines(&shown, "sync", &t).is_empty(),
            "no progress with {var}:\n{shown:?}"
        );
        ns.asd_ok(&["unsync"]);
    }

    // --quiet: no progress, and no informational lines either.
    let shown = at_a_terminal(&ns, "--quiet sync", "");
    assert!(
        progress_lines(&shown, "sync", &t).is_empty() && !shown.contains("INFO"),
        "--quiet shows no progress and no info:\n{shown:?}"
    );
    assert!(shown.contains("sync successful"), "{shown:?}");

    // NO_COLOR: the line is there, without a single escape sequence; an unsync's own phases
    // are named in it.
    ns.asd_ok(&["unsync"]);
    let shown = at_a_terminal(&ns, "sync", "NO_COLOR=1");
    assert!(
        !progress_lines(&shown, "sync", &t).is_empty(),
        "progress with NO_COLOR too:\n{shown:?}"
    );
    assert!(
        !shown.contains('\x1b'),
        "no escapes with NO_COLOR: {shown:?}"
    );
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
}
