//! Login storm (issue 11 item 6): on a shared machine hundreds of users start asd at the same
//! moment, all through one helper. Every one of them must be served (the helper queues what it
//! cannot serve at once; managers turned away retry with backoff), the helper's memory stays
//! bounded, and one user holding and opening many connections starves nobody.
//!
//! Real users (asdstorm0001.., made by tests/run.sh or here), each with a target in their own
//! 0700 home; one real helper in a private mount namespace; real `asd sync` and `asd unsync` as
//! each user, all released at once by a gate (a lock they wait on). `ASD_STORM_USERS` sets how
//! many: 300 by default (the helper before it turned away 60 of them), 1000 for the whole
//! goal (2 and 5 minutes to sync and unsync on 2 busy CPUs, most of it in the kernel's mount
//! table: see the figures printed).

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The storm tests share users and the machine's two CPUs: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const HOG: &str = "asdstormhog";
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;

fn storm_users(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("asdstorm{i:04}")).collect()
}

fn users_wanted() -> usize {
    std::env::var("ASD_STORM_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// The users, created if tests/run.sh has not (one `useradd` each: about 0.1 s here).
fn ensure_users(names: &[String]) -> Vec<(String, u32, u32)> {
    let lookup = |n: &str| nix::unistd::User::from_name(n).ok().flatten();
    let missing = names.iter().filter(|n| lookup(n).is_none()).count();
    if missing > 0 {
        eprintln!("storm: creating {missing} users with useradd (tests/run.sh does this up front)");
    }
    names
        .iter()
        .map(|n| {
            if lookup(n).is_none() {
                test_user(n);
            }
            let u = lookup(n).unwrap_or_else(|| panic!("cannot create user {n}"));
            let mode = std::fs::metadata(&u.dir)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            assert_eq!(mode, 0o700, "{} is not a private home", u.dir.display());
            (n.clone(), u.uid.as_raw(), u.gid.as_raw())
        })
        .collect()
}

/// The helper as root in `ns`, on its own socket, with `args` (limits).
struct StormHelper {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl StormHelper {
    fn start(ns: &Ns, args: &[&str]) -> StormHelper {
        let socket = ns.root.join("helper.sock");
        let log = ns.root.join("helper.log");
        let log_file = std::fs::File::create(&log).expect("helper log");
        // Its records on a tmpfs, as in /run on a real system: a thousand managers writing to
        // the disk at once make every fsync there slow.
        let state = ns.root.join("helper-state");
        ns.sh_ok(&format!(
            "mkdir -m 0700 '{s}' && mount -t tmpfs -o mode=0700 asdstorm-state '{s}'",
            s = state.display()
        ));
        let mut cmd = ns.cmd(common::world::helper_bin().to_str().expect("utf-8 path"));
        cmd.arg("--socket")
            .arg(&socket)
            .args(args)
            .env("ASD_HELPER_STATE_DIR", &state)
            // No system bus: the helper's rule without polkit (targets in the caller's home).
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/nonexistent/asd-test-no-bus",
            )
            .stderr(log_file);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("ASD_HELPER_") && k != "ASD_HELPER_STATE_DIR" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("start asd-helper");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "asd-helper exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the helper did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        StormHelper { child, socket, log }
    }

    /// Peak resident memory of the helper (nsenter execs it: the child's pid is the helper's).
    fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        assert!(
            status.contains("asd-helper"),
            "pid {} is not the helper",
            self.child.id()
        );
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StormHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every user's target `~/<name>` (one small file), runtime dir and config.
struct Storm<'a> {
    ns: &'a Ns,
    users: Vec<(String, u32, u32)>,
    name: String,
    socket: PathBuf,
    gate: PathBuf,
}

impl<'a> Storm<'a> {
    fn new(ns: &'a Ns, users: Vec<(String, u32, u32)>, name: &str, socket: &Path) -> Storm<'a> {
        for d in ["xdg", "conf", "out"] {
            std::fs::create_dir(ns.root.join(d)).expect("mkdir");
        }
        std::fs::set_permissions(ns.root.join("conf"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let chown = |p: &Path, uid: u32, gid: u32| {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("chown");
        };
        for (user, uid, gid) in &users {
            let home = PathBuf::from(format!("/home/{user}"));
            let target = home.join(name);
            // What an earlier, interrupted run may have left (nothing is mounted out here).
            let _ = std::fs::remove_dir_all(&target);
            for e in std::fs::read_dir(&home).expect("home").flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{name}-backup_asd"))
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            std::fs::create_dir_all(target.join("sub")).expect("mkdir");
            std::fs::write(target.join("sub/f"), format!("hello {user}\n")).expect("write");
            for p in [&target, &target.join("sub"), &target.join("sub/f")] {
                chown(p, *uid, *gid);
            }
            let run = ns.root.join("xdg").join(user);
            std::fs::create_dir(&run).expect("mkdir");
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
            chown(&run, *uid, *gid);
            let conf = ns.root.join("conf").join(format!("{user}.conf"));
            std::fs::write(
                &conf,
                format!("WHATTOSYNC=(~/{name})\nVOLATILE='{}'\n", ns.vol().display()),
            )
            .expect("conf");
            chown(&conf, *uid, *gid);
        }
        let gate = ns.root.join("gate");
        std::fs::write(&gate, "").expect("gate");
        std::fs::set_permissions(&gate, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Storm {
            ns,
            users,
            name: name.to_string(),
            socket: socket.to_path_buf(),
            gate,
        }
    }

    /// `asd <verb>` as every user at once; returns the seconds from the gate's opening until
    /// the last one ended, and the users whose asd failed (with its output).
    fn run(&self, verb: &str) -> (f64, Vec<(String, String)>) {
        // The gate: held exclusively here, each user's asd waits for a shared lock on it.
        let gate = std::fs::File::open(&self.gate).expect("gate");
        rustix::fs::flock(&gate, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        let mut children = Vec::with_capacity(self.users.len());
        for (user, _, _) in &self.users {
            let out = self.ns.root.join("out").join(format!("{user}.{verb}"));
            let out = std::fs::File::create(out).expect("output file");
            // Waits at the gate as the user, then becomes the user's asd: no process of the
            // gate's stays around while they run.
            let mut c = self.ns.cmd("setpriv");
            c.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
                .args(["sh", "-c", r#"flock -s "$0" true && exec "$@""#])
                .arg(&self.gate)
                .args(["env", "-i"])
                .arg(format!("HOME=/home/{user}"))
                .arg(format!(
                    "XDG_RUNTIME_DIR={}",
                    self.ns.root.join("xdg").join(user).display()
                ))
                .arg(format!("ASD_HELPER_SOCKET={}", self.socket.display()))
                .arg(format!(
                    "ASDCONF={}",
                    self.ns
                        .root
                        .join("conf")
                        .join(format!("{user}.conf"))
                        .display()
                ))
                .args(["PATH=/usr/bin:/bin", "NO_COLOR=1", "ASD_LOG=warn"])
                .arg(ASD)
                .arg(verb)
                .stdout(out.try_clone().expect("dup"))
                .stderr(out);
            children.push((user.clone(), c.spawn().expect("spawn asd")));
        }
        // Every one of them waits at the gate (or is about to): open it.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        drop(gate);
        let mut failed = Vec::new();
        for (user, mut child) in children {
            let st = child.wait().expect("wait");
            if !st.success() {
                let out = self.ns.root.join("out").join(format!("{user}.{verb}"));
                failed.push((user, std::fs::read_to_string(out).unwrap_or_default()));
            }
        }
        (t.elapsed().as_secs_f64(), failed)
    }

    /// Users whose asd was turned away, or answered too late, at least once and asked again
    /// (it logs that at warn).
    fn retried(&self, verb: &str) -> usize {
        self.users
            .iter()
            .filter(|(u, _, _)| {
                std::fs::read_to_string(self.ns.root.join("out").join(format!("{u}.{verb}")))
                    .is_ok_and(|t| t.contains("trying again") || t.contains("asking again"))
            })
            .count()
    }

    fn targets_covered(&self) -> usize {
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.ns.pid)).expect("mountinfo");
        let points: std::collections::HashSet<&str> =
            info.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        self.users
            .iter()
            .filter(|(u, _, _)| points.contains(format!("/home/{u}/{}", self.name).as_str()))
            .count()
    }

    /// Mounts left in the users' homes.
    fn mounts_left(&self) -> Vec<String> {
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.ns.pid)).expect("mountinfo");
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with("/home/asdstorm"))
            .map(str::to_string)
            .collect()
    }

    fn data_intact(&self) {
        for (user, _, _) in &self.users {
            let f = PathBuf::from(format!("/home/{user}/{}/sub/f", self.name));
            assert_eq!(
                std::fs::read_to_string(&f).unwrap_or_default(),
                format!("hello {user}\n"),
                "{}",
                f.display()
            );
        }
    }

    fn clean(&self) {
        for (user, _, _) in &self.users {
            let _ = std::fs::remove_dir_all(format!("/home/{user}/{}", self.name));
        }
    }
}

/// A user who opens connections in a tight loop: `busy` of them call ListMounts back to back,
/// `silent` ones connect and say nothing (and reconnect when closed), all retrying at once
/// when refused. Prints its counts when its stdin closes.
const HOG_SRC: &str = r#"
import json, socket, sys, threading, time
path, busy, silent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CALL = b'{"method":"io.asd.Helper.ListMounts","parameters":{}}\0'
counts = {"served": 0, "per_uid_refusals": 0, "other_errors": 0, "closed": 0}
lock = threading.Lock()
stop = threading.Event()
def count(k):
    with lock:
        counts[k] += 1
def reply(s):
    buf = b""
    while not buf.endswith(b"\0"):
        chunk = s.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return buf
def busy_loop():
    s = None
    while not stop.is_set():
        try:
            if s is None:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
            s.sendall(CALL)
            r = reply(s)
        except OSError:
            r = None
        if r is None:
            count("closed")
        elif b"io.asd.Helper.TooManyConnections" in r:
            count("per_uid_refusals")
        elif b'"error"' in r:
            count("other_errors")
        else:
            count("served")
            continue
        if s is not None:
            s.close()
        s = None
        time.sleep(0.01)
def silent_loop():
    while not stop.is_set():
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            r = reply(s)  # an error, or the helper closing it
            if r is not None and b"io.asd.Helper.TooManyConnections" in r:
                count("per_uid_refusals")
            else:
                count("closed")
            s.close()
        except OSError:
            count("closed")
        time.sleep(0.01)
threads = [threading.Thread(target=busy_loop, daemon=True) for _ in range(busy)]
threads += [threading.Thread(target=silent_loop, daemon=True) for _ in range(silent)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.read()
stop.set()
with lock:
    print(json.dumps(counts), flush=True)
"#;

struct Hog {
    child: Child,
}

impl Hog {
    fn start(socket: &Path, busy: usize, silent: usize) -> Hog {
        test_user(HOG);
        let mut child = Command::new("setpriv")
            .args(["--reuid", HOG, "--regid", HOG, "--init-groups", "--"])
            .args(["/usr/bin/python3", "-c", HOG_SRC])
            .arg(socket)
            .arg(busy.to_string())
            .arg(silent.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("hog");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("hog started");
        assert_eq!(line.trim(), "started");
        Hog { child }
    }

    /// Stops it; its counts.
    fn stop(mut self) -> serde_json::Value {
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.flush();
        }
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("hog counts");
        let _ = self.child.wait();
        serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("hog said {line:?}"))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The helper's decisions for the storm's users (not the greedy one's): the refusals and
/// errors by method and name, and the longest run of each method (logged from 1 s on).
fn helper_summary(log: &str) -> String {
    let hog = nix::unistd::User::from_name(HOG)
        .ok()
        .flatten()
        .map(|u| format!("uid={} ", u.uid))
        .unwrap_or_default();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut slowest: std::collections::BTreeMap<String, f64> = Default::default();
    for l in log.lines().filter(|l| hog.is_empty() || !l.contains(&hog)) {
        let Some(method) = l.split(" method=").nth(1).and_then(|r| r.split(' ').next()) else {
            continue;
        };
        let Some(result) = l.split(" result=").nth(1) else {
            continue;
        };
        let name = result.split([' ', '(']).next().unwrap_or("");
        if name != "ok" {
            *errors
                .entry(format!(
                    "{method} {}",
                    name.trim_start_matches("io.asd.Helper.")
                ))
                .or_default() += 1;
        }
        if let Some(secs) = result
            .rsplit(" after ")
            .next()
            .filter(|_| result.contains(" after "))
            .and_then(|t| t.trim_end_matches(" s").parse::<f64>().ok())
        {
            let e = slowest.entry(method.to_string()).or_default();
            *e = e.max(secs);
        }
    }
    let errors: Vec<String> = errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    let slowest: Vec<String> = slowest
        .iter()
        .map(|(k, s)| format!("{k} {s:.1} s"))
        .collect();
    format!(
        "refused or failed: {}; slowest runs: {}",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        },
        if slowest.is_empty() {
            "all under 1 s".into()
        } else {
            slowest.join(", ")
        }
    )
}

/// Fails the test naming how many failed, with each distinct failure once (the last line of
/// its output) and how often, and the helper's last lines (but the greedy user's).
fn report_failures(what: &str, failed: &[(String, String)], helper: &StormHelper) {
    if failed.is_empty() {
        return;
    }
    let mut kinds: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    for (user, out) in failed {
        // The line that says why (asd's summary line says only how many failed).
        let why = out
            .lines()
            .find(|l| l.contains("ERROR"))
            .or_else(|| out.lines().find(|l| l.contains("helper")))
            .or_else(|| out.lines().last())
            .unwrap_or("(no output)")
            .replace(user, "USER");
        kinds.entry(why).or_insert((0, user.clone())).0 += 1;
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(msg, (n, first))| format!("{n} times (first {first}): {msg}"))
        .collect();
    let hog = nix::unistd::User::from_name(HOG)
        .ok()
        .flatten()
        .map(|u| format!("uid={} ", u.uid))
        .unwrap_or_default();
    let log = helper.log_text();
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| hog.is_empty() || !l.contains(&hog))
        .rev()
        .take(30)
        .collect();
    panic!(
        "{what}: {} of the users failed:\n{}\n--- the helper: {}\n--- its last log lines:\n{}",
        failed.len(),
        kinds.join("\n"),
        helper_summary(&log),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The storm with the helper's shipped limits (256 served at once, 16 per user), while a
/// greedy user holds and opens far more connections than its 16.
#[test]
fn login_storm_every_user_is_served() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let n = users_wanted();
    let users = ensure_users(&storm_users(n));
    let ns = Ns::new();
    let helper = StormHelper::start(&ns, &[]);
    let storm = Storm::new(&ns, users, "storm-a", &helper.socket);
    let hog = Hog::start(&helper.socket, 24, 24);

    let (sync_s, failed) = storm.run("sync");
    eprintln!(
        "storm: {n} users synced in {sync_s:.1} s; helper peak RSS so far {:.1} MiB",
        helper.peak_rss_kib() as f64 / 1024.0
    );
    report_failures("asd sync", &failed, &helper);
    assert_eq!(storm.targets_covered(), n, "every target is in RAM");
    let (unsync_s, failed) = storm.run("unsync");
    report_failures("asd unsync", &failed, &helper);
    let counts = hog.stop();
    assert_eq!(storm.mounts_left(), Vec::<String>::new());
    storm.data_intact();

    let rss = helper.peak_rss_kib();
    let log = helper.log_text();
    eprintln!(
        "storm: {n} users: all synced in {sync_s:.1} s ({} retried), all unsynced in {unsync_s:.1} s \
         ({} retried); helper peak RSS {:.1} MiB; the greedy user: {counts}; the helper was at \
         capacity {} times; {}",
        storm.retried("sync"),
        storm.retried("unsync"),
        rss as f64 / 1024.0,
        log.matches("at capacity:").count(),
        helper_summary(&log)
    );
    assert!(
        rss < PEAK_RSS_LIMIT_KIB,
        "helper peak RSS {rss} KiB >= {PEAK_RSS_LIMIT_KIB} KiB"
    );
    // The greedy user was held to its own limit, and still got served within it.
    assert!(
        counts["per_uid_refusals"].as_u64().unwrap_or(0) > 0,
        "{counts}"
    );
    assert!(counts["served"].as_u64().unwrap_or(0) > 0, "{counts}");
    assert!(
        log.contains("too many connections from this user: the helper allows 16 per user"),
        "the refusal names the per-user limit"
    );
    storm.clean();
}

/// A helper with tiny limits (4 served at once, 8 waiting, each for 1 s): most of a storm is
/// turned away with AtCapacity, which names the helper's limit for everyone, and every manager
/// retries with backoff until it is served.
#[test]
fn storm_on_a_tiny_helper_retries_until_served() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let n = users_wanted().min(100);
    let users = ensure_users(&storm_users(n));
    let ns = Ns::new();
    let helper = StormHelper::start(
        &ns,
        &[
            "--max-connections",
            "4",
            "--max-queued",
            "8",
            "--queue-timeout",
            "1",
        ],
    );
    let storm = Storm::new(&ns, users, "storm-b", &helper.socket);
    let (sync_s, failed) = storm.run("sync");
    report_failures("asd sync", &failed, &helper);
    assert_eq!(storm.targets_covered(), n);
    let (unsync_s, failed) = storm.run("unsync");
    report_failures("asd unsync", &failed, &helper);
    assert_eq!(storm.mounts_left(), Vec::<String>::new());
    storm.data_intact();
    let retried = storm.retried("sync") + storm.retried("unsync");
    eprintln!(
        "tiny helper: {n} users synced in {sync_s:.1} s and unsynced in {unsync_s:.1} s; \
         {retried} managers were turned away and retried"
    );
    assert!(
        retried > 0,
        "nobody was turned away: the test tests nothing"
    );
    let log = helper.log_text();
    assert!(
        log.contains(
            "the helper is at capacity for all users: 4 connections served at once and 8 waiting"
        ),
        "the refusal names the helper's limit for everyone"
    );
    storm.clean();
}
