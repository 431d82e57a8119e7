//! Suspend and hibernate (issue 10 item 2): the daemon holds a logind delay inhibitor, writes
//! back on `PrepareForSleep(true)` and releases the inhibitor only once that is done; after
//! `PrepareForSleep(false)` it takes a new one. Without logind or without a system bus it
//! says so and carries on.
//!
//! A container cannot suspend, so logind is played by a stand-in on a private dbus-daemon (a
//! real one, with a system-bus-like policy file) that the daemon finds through
//! DBUS_SYSTEM_BUS_ADDRESS: it owns org.freedesktop.login1, answers `Inhibit` with the write end
//! of a real pipe (so it sees the descriptor closed as end of file on the read end, exactly as
//! logind does), answers `InhibitDelayMaxUSec`, and emits the real `PrepareForSleep` signal.

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use zbus::message::Type as MsgType;

const LOGIND_PATH: &str = "/org/freedesktop/login1";
const MANAGER: &str = "org.freedesktop.login1.Manager";

/// A dbus-daemon of our own, on a socket in `dir`; killed on drop.
struct Bus {
    child: Child,
    socket: PathBuf,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let socket = dir.join("system_bus_socket");
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            // It says that it could not raise its descriptor limit, which does not matter here.
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "dbus-daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Bus { child, socket }
    }

    fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stand-in logind: the read ends of the inhibitors it handed out, in order.
struct Logind {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    inhibitors: Arc<Mutex<Vec<(String, OwnedFd)>>>,
}

async fn next(s: &mut zbus::MessageStream) -> Option<zbus::Result<zbus::Message>> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *s), cx))
        .await
}

impl Logind {
    fn start(bus: &Bus) -> Logind {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let conn = rt
            .block_on(async {
                zbus::connection::Builder::address(bus.address().as_str())
                    .name("org.freedesktop.login1")
                    .build()
                    .await
            })
            .expect("connect the stand-in logind");
        let inhibitors = Arc::new(Mutex::new(Vec::new()));
        let (c, held) = (conn.clone(), Arc::clone(&inhibitors));
        rt.spawn(async move {
            let mut calls = zbus::MessageStream::from(&c);
            while let Some(Ok(msg)) = next(&mut calls).await {
                let h = msg.header();
                if h.message_type() != MsgType::MethodCall {
                    continue;
                }
                match h.member().map(|m| m.as_str()) {
                    Some("Inhibit") => {
                        let (what, who, _why, mode): (String, String, String, String) =
                            msg.body().deserialize().unwrap();
                        let (read, write) = rustix::pipe::pipe().unwrap();
                        held.lock()
                            .unwrap()
                            .push((format!("{what}/{who}/{mode}"), read));
                        c.reply(&h, &zbus::OwnedFd::from(write)).await.unwrap();
                    }
                    Some("Get") => {
                        // InhibitDelayMaxUSec: generous, the test measures when we are released.
                        let v = zbus::wire::Variant::from(60_000_000u64);
                        c.reply(&h, &v).await.unwrap();
                    }
                    _ => {}
                }
            }
        });
        Logind {
            rt,
            conn,
            inhibitors,
        }
    }

    fn prepare_for_sleep(&self, going: bool) {
        self.rt
            .block_on(self.conn.emit_signal(
                None::<&str>,
                LOGIND_PATH,
                MANAGER,
                "PrepareForSleep",
                &going,
            ))
            .expect("emit PrepareForSleep");
    }

    fn count(&self) -> usize {
        self.inhibitors.lock().unwrap().len()
    }

    /// Waits until `n` inhibitors were taken; returns what the n-th asked for.
    fn wait_for_inhibitor(&self, n: usize, log: &Path) -> String {
        wait_until(
            || self.count() >= n,
            Duration::from_secs(300),
            &format!("inhibitor #{n} taken"),
            log,
        );
        self.inhibitors.lock().unwrap()[n - 1].0.clone()
    }

    /// A reader that reports when the n-th inhibitor's descriptor is closed everywhere.
    fn released(&self, n: usize) -> mpsc::Receiver<Instant> {
        let fd = self.inhibitors.lock().unwrap()[n - 1]
            .1
            .try_clone()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(fd);
            let mut buf = [0u8; 16];
            while f.read(&mut buf).is_ok_and(|n| n > 0) {}
            let _ = tx.send(Instant::now());
        });
        rx
    }
}

fn wait_until(ok: impl Fn() -> bool, limit: Duration, what: &str, log: &Path) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\ndaemon log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `asd daemon` in the test's namespace, its log in a file; SIGTERM (and a wait) on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &Ns, bus_address: &str) -> Daemon {
        let log = ns.root.join("daemon.log");
        let child = ns
            .asd_cmd(&["daemon"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
            .env("ASD_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("asd daemon");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
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

fn synced(ns: &Ns, t: &Path, d: &Daemon) {
    wait_until(
        || ns.statfs_type(t) == "tmpfs",
        Duration::from_secs(300),
        "the daemon syncs",
        &d.log,
    );
}

fn read_in_ns(ns: &Ns, p: &Path) -> Option<Vec<u8>> {
    std::fs::read(ns.inside(p)).ok()
}

#[test]
fn writes_back_before_sleep_and_holds_sleep_until_done() {
    if !require_root() {
        return;
    }
    assert!(
        have("dbus-daemon"),
        "dbus-daemon is needed (package dbus-daemon)"
    );
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("old.txt"), b"old\n").unwrap();
    ns.write_conf(&[&t], "RESYNC_INTERVAL=1h");
    let bus = Bus::start(&ns.root);
    let logind = Logind::start(&bus);
    let daemon = Daemon::start(&ns, &bus.address());
    synced(&ns, &t, &daemon);
    let what = logind.wait_for_inhibitor(1, &daemon.log);
    assert_eq!(what, "sleep/asd/delay", "a delay inhibitor for sleep");
    let backup = ns.data().join(".t-backup_asd");

    for round in 1..=2 {
        // Written into RAM just before the machine sleeps: not on disk yet.
        let name = format!("before-sleep-{round}.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + round) as u8).collect();
        std::fs::write(ns.inside(&t.join(&name)), &data).unwrap();
        assert_eq!(
            read_in_ns(&ns, &backup.join(&name)),
            None,
            "not written back yet"
        );
        let released = logind.released(round as usize);
        let asked = Instant::now();
        logind.prepare_for_sleep(true);
        let at = released
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("inhibitor #{round} never released:\n{}", daemon.log()));
        // The moment logind would let the machine sleep, the data is in the backup.
        assert_eq!(
            read_in_ns(&ns, &backup.join(&name)).as_deref(),
            Some(&data[..]),
            "round {round}: written back when the inhibitor is released ({:?} after the signal)\n{}",
            at - asked,
            daemon.log()
        );
        // Resume: a new inhibitor for the next time.
        logind.prepare_for_sleep(false);
        logind.wait_for_inhibitor(round as usize + 1, &daemon.log);
    }
    let log = daemon.stop();
    assert!(
        log.contains("going to sleep: writing back first") && log.contains("resumed from sleep"),
        "{log}"
    );
    // Everything back on disk, nothing left mounted.
    assert_eq!(ns.statfs_type(&t), ns.statfs_type(&ns.data()));
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
}

#[test]
fn carries_on_without_logind_or_without_a_system_bus() {
    if !require_root() {
        return;
    }
    assert!(
        have("dbus-daemon"),
        "dbus-daemon is needed (package dbus-daemon)"
    );
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("a"), b"a\n").unwrap();
    ns.write_conf(&[&t], "RESYNC_INTERVAL=1h");
    let bus = Bus::start(&ns.root);
    let nowhere = format!("unix:path={}", ns.root.join("no-such-bus").display());
    for (address, says) in [
        (bus.address(), "logind is not on the system bus"),
        (nowhere, "no system bus"),
    ] {
        let daemon = Daemon::start(&ns, &address);
        synced(&ns, &t, &daemon);
        wait_until(
            || daemon.log().contains(says),
            Duration::from_secs(30),
            says,
            &daemon.log,
        );
        // It still writes back when asked.
        std::fs::write(ns.inside(&t.join("b")), b"b\n").unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.child.id() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        );
        let backup = ns.data().join(".t-backup_asd");
        wait_until(
            || read_in_ns(&ns, &backup.join("b")).is_some(),
            Duration::from_secs(30),
            "a resync on SIGUSR1",
            &daemon.log,
        );
        let log = daemon.stop();
        assert_eq!(log.matches(says).count(), 1, "said once: {log}");
        assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
        assert_eq!(std::fs::read(t.join("b")).unwrap(), b"b\n");
        std::fs::remove_file(t.join("b")).unwrap();
    }
}
