//! RAM filling up (issue 10 item 3), on a real, small tmpfs as VOLATILE:
//! - the daemon warns (once, and once more after it cleared and came back) when the area is
//!   80% full, says so in its STATUS= line (read from a real NOTIFY_SOCKET) and in
//!   `asd preview` (text and JSON), and writes back early;
//! - filling the target until the writer gets ENOSPC costs nothing already written back: the
//!   backup keeps the last good data, and unsync brings back everything that was in RAM;
//! - a target that does not fit is refused with an error that says the area is full, and
//!   leaves the original untouched.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs of `size` at `root/name` inside the namespace, usable by everyone (like /tmp).
fn small_tmpfs(ns: &Ns, name: &str, size: &str) -> PathBuf {
    let dir = ns.root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    ns.sh_ok(&format!(
        "mount -t tmpfs -o size={size},mode=1777 asdtest-small '{}'",
        dir.display()
    ));
    dir
}

fn conf_with_volatile(ns: &Ns, targets: &[&Path], volatile: &Path) {
    ns.write_conf(targets, "RESYNC_INTERVAL=1h");
    let text = std::fs::read_to_string(ns.conf()).unwrap();
    let text = text.replace(
        &format!("VOLATILE=\"{}\"", ns.vol().display()),
        &format!("VOLATILE=\"{}\"", volatile.display()),
    );
    std::fs::write(ns.conf(), text).unwrap();
}

struct Daemon {
    child: Child,
    log: PathBuf,
    notify: UnixDatagram,
    statuses: Vec<String>,
}

impl Daemon {
    fn start(ns: &Ns) -> Daemon {
        let log = ns.root.join("daemon.log");
        let sock = ns.root.join("notify.sock");
        let notify = UnixDatagram::bind(&sock).unwrap();
        notify.set_nonblocking(true).unwrap();
        let child = ns
            .asd_cmd(&["daemon"])
            .env("NOTIFY_SOCKET", &sock)
            .env("ASD_LOG", "info")
            // No system bus here: the sleep watch says so and stays out of the way.
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("asd daemon");
        Daemon {
            child,
            log,
            notify,
            statuses: Vec::new(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The STATUS= lines received so far.
    fn statuses(&mut self) -> &[String] {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = self.notify.recv(&mut buf) {
            for l in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some(s) = l.strip_prefix("STATUS=") {
                    self.statuses.push(s.to_string());
                }
            }
        }
        &self.statuses
    }

    fn wait_for(&mut self, what: &str, ok: &mut dyn FnMut(&mut Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}\ndaemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), s);
    }

    fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let st = self.child.wait().unwrap();
        let log = self.log();
        assert!(st.success(), "the daemon stops cleanly:\n{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fills the target with `name` until the writer gets ENOSPC; returns dd's message.
fn fill_until_enospc(ns: &Ns, t: &Path, name: &str) -> String {
    let out = ns.sh(&format!(
        "dd if=/dev/urandom of='{}' bs=64k 2>&1",
        t.join(name).display()
    ));
    let text = output_text(&out);
    assert!(!out.status.success(), "the tmpfs filled up: {text}");
    assert!(text.contains("No space left on device"), "{text}");
    text
}

#[test]
fn warns_writes_back_early_and_loses_nothing_when_ram_fills_up() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let small = small_tmpfs(&ns, "small", "8m");
    let t = ns.data().join("t");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("start.txt"), b"at start\n").unwrap();
    conf_with_volatile(&ns, &[&t], &small);
    let mut d = Daemon::start(&ns);
    d.wait_for("the daemon syncs", &mut |_| ns.statfs_type(&t) == "tmpfs");
    let backup = ns.data().join(".t-backup_asd");

    // Last good data, written back.
    let good: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(ns.inside(&t.join("good.bin")), &good).unwrap();
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    d.wait_for("the resync", &mut |_| {
        std::fs::read(ns.inside(&backup.join("good.bin"))).is_ok_and(|b| b == good)
    });

    // A writer fills the area until it gets ENOSPC.
    fill_until_enospc(&ns, &t, "fill.bin");
    let filled = std::fs::read(ns.inside(&t.join("fill.bin"))).unwrap();
    d.wait_for("the warning", &mut |d| {
        d.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("% full ("))
    });
    // It writes back early (the interval is an hour): the partial file is on disk too, and
    // the last good data is untouched.
    d.wait_for("the early write-back", &mut |_| {
        std::fs::read(ns.inside(&backup.join("fill.bin"))).is_ok_and(|b| b == filled)
    });
    assert!(d.log().contains("writing back early"), "{}", d.log());
    assert_eq!(
        std::fs::read(ns.inside(&backup.join("good.bin"))).unwrap(),
        good
    );
    d.wait_for("the status line", &mut |d| {
        d.statuses()
            .iter()
            .any(|s| s.contains("WARNING: the volatile area") && s.contains("% full"))
    });

    // preview, text and JSON.
    let text = ns.asd_ok(&["preview"]);
    assert!(
        text.contains("WARNING: the volatile area") && text.contains("% full"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&ns.asd(&["preview", "--json"]).stdout).unwrap();
    assert_eq!(json["warnings"][0]["kind"], "volatile_full", "{json:#}");
    assert!(
        json["volatile_use"]["percent"].as_f64().unwrap() >= 80.0,
        "{json:#}"
    );

    // A resync with the area full works, and a write that fails now costs nothing on disk.
    let out = ns.sh(&format!("echo more >> '{}'", t.join("fill.bin").display()));
    assert!(!out.status.success(), "still full");
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    d.wait_for("another resync", &mut |d| {
        d.log().matches("resync done").count() >= 3
    });
    assert!(!d.log().contains("resync failed"), "{}", d.log());

    // Cleared, then back: warned once more, not once per check.
    std::fs::remove_file(ns.inside(&t.join("fill.bin"))).unwrap();
    d.wait_for("cleared", &mut |d| {
        d.log().contains("volatile area: back to normal")
    });
    fill_until_enospc(&ns, &t, "fill2.bin");
    d.wait_for("warned again", &mut |d| {
        d.log().matches("% full (").count() >= 2
    });
    std::thread::sleep(Duration::from_secs(12));
    let log = d.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("% full ("))
        .count();
    assert_eq!(warnings, 2, "one warning per crossing:\n{log}");
    let filled2 = std::fs::read(ns.inside(&t.join("fill2.bin"))).unwrap();

    // Stop: everything that was in RAM is back on disk.
    let log = d.stop();
    assert_eq!(std::fs::read(t.join("good.bin")).unwrap(), good, "{log}");
    assert_eq!(std::fs::read(t.join("start.txt")).unwrap(), b"at start\n");
    assert_eq!(std::fs::read(t.join("fill2.bin")).unwrap(), filled2);
    assert!(!t.join("fill.bin").exists());
    assert!(ns
        .our_mounts()
        .iter()
        .all(|m| *m == small.display().to_string()));
}

#[test]
fn a_target_that_does_not_fit_is_refused_clearly_and_left_alone() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let small = small_tmpfs(&ns, "small", "2m");
    let t = ns.data().join("big");
    make_tree(&ns, &t);
    let blob: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(t.join("blob.bin"), &blob).unwrap();
    let copy = ns.root.join("copy");
    ns.sh_ok(&format!("cp -a '{}' '{}'", t.display(), copy.display()));
    conf_with_volatile(&ns, &[&t], &small);
    let out = ns.asd(&["sync"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("No space left on device") && text.contains("is full"),
        "the error says the volatile area is full:\n{text}"
    );
    assert!(text.contains(&small.display().to_string()), "{text}");
    assert_eq!(ns.tree_diff(&copy, &t), "", "the original is untouched");
    assert!(
        ns.our_mounts()
            .iter()
            .all(|m| *m == small.display().to_string()),
        "{:?}",
        ns.our_mounts()
    );
    let beside: Vec<String> = std::fs::read_dir(ns.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backup_asd"))
        .collect();
    assert!(
        beside.is_empty(),
        "nothing left beside the target: {beside:?}"
    );
    // The RAM area holds nothing of it any more.
    let used = ns.sh_ok(&format!("du -sb '{}' | cut -f1", small.display()));
    assert!(used.trim().parse::<u64>().unwrap() < 100_000, "{used}");
}
