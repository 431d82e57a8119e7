//! polkit decides (DESIGN.md §6 rule 4), with a real dbus-daemon --system and a real polkitd:
//! home targets are allowed by default, others need auth_admin, a rules file can grant them.
//! Without polkit, home targets are allowed and others refused, and the log says why.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const POLICY_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../polkit/io.asd.helper.policy"
);
const EXAMPLE_RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../polkit/50-asd-helper.rules.example"
);
const POLICY_DST: &str = "/usr/share/polkit-1/actions/io.asd.helper.policy";
const BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

fn bus_up() -> bool {
    std::os::unix::net::UnixStream::connect(BUS_SOCKET).is_ok()
}

fn polkit_up() -> bool {
    let out = Command::new("dbus-send")
        .args([
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            "string:org.freedesktop.PolicyKit1",
        ])
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What this test started or installed, undone on drop (also when the test fails).
#[derive(Default)]
struct Services {
    /// Held while the services are in use: the tests that start the one system bus and polkitd
    /// (here and in other test processes) take turns.
    _turn: Option<std::fs::File>,
    dbus_pid: Option<i32>,
    polkitd: Option<std::process::Child>,
    installed_policy: bool,
    files: Vec<PathBuf>,
}

/// An exclusive lock on a file in /run/lock, released when the file is closed.
fn turn() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/asd-helper-polkit-tests.lock")
        .unwrap();
    // SAFETY: flock on a descriptor this function owns; integer arguments only.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

impl Services {
    fn up() -> Services {
        let mut s = Services::default();
        s._turn = Some(turn());
        if !bus_up() {
            std::fs::create_dir_all("/run/dbus").unwrap();
            let _ = std::fs::remove_file("/run/dbus/pid");
            let _ = std::fs::remove_file(BUS_SOCKET);
            let out =
                run_ok(Command::new("dbus-daemon").args(["--system", "--fork", "--print-pid"]));
            s.dbus_pid = out.trim().parse().ok();
            wait_for("the system bus", 10, bus_up);
        }
        let policy = std::fs::read(POLICY_SRC).unwrap();
        if std::fs::read(POLICY_DST).ok().as_deref() != Some(&policy[..]) {
            std::fs::write(POLICY_DST, &policy).unwrap();
            s.installed_policy = true;
        }
        if !polkit_up() {
            s.polkitd = Some(
                Command::new("/usr/lib/polkit-1/polkitd")
                    .arg("--no-debug")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("polkitd"),
            );
            wait_for("polkitd", 20, polkit_up);
        }
        wait_for("the asd actions in polkit", 20, || {
            Command::new("pkaction")
                .args(["--action-id", "io.asd.helper.sync-elsewhere"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        s
    }

    fn add_rules(&mut self, name: &str, text: &str) -> PathBuf {
        let p = PathBuf::from("/etc/polkit-1/rules.d").join(name);
        std::fs::write(&p, text).unwrap();
        self.files.push(p.clone());
        p
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if self.installed_policy {
            let _ = std::fs::remove_file(POLICY_DST);
        }
        if let Some(mut c) = self.polkitd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.dbus_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while Path::new(&format!("/proc/{pid}/cmdline")).exists()
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file("/run/dbus/pid");
            let _ = std::fs::remove_file(BUS_SOCKET);
        }
    }
}

/// A directory `/srv/.../name` owned by `owner`, removed on drop.
fn srv_dir(parent: &Path, owner: &User, name: &str) -> (Scratch, PathBuf) {
    std::fs::create_dir_all(parent).unwrap();
    let p = parent.join(unique(name));
    dir_of(owner, &p);
    (Scratch::at(p.clone()), p)
}

#[test]
fn polkit_decides_with_a_real_polkitd() {
    if !root_or_skip("polkit_decides_with_a_real_polkitd") {
        return;
    }
    let alice = user("alice");
    let bob = user("bob");
    let mut services = Services::up();
    let mut h = Helper::start_with(HelperOpts {
        env: vec![],
        ..HelperOpts::default()
    });
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(&bob, "PrepareArea", json!({"volatile": vol.path}));

    // Inside home: io.asd.helper.sync-home, yes by default.
    let home = Scratch::new(&alice, "pk-home");
    let t = dir_of(&alice, &home.path.join("t"));
    h.ok(&alice, "BindBackup", json!({"target": t, "mode": "copy"}));
    h.ok(&alice, "Detach", json!({"target": t}));

    // Her own dir outside home: io.asd.helper.sync-elsewhere, auth_admin by default.
    let srv = Path::new("/srv");
    let (_g, alice_srv) = srv_dir(srv, &alice, "alice");
    let before = Untouched::take(&h, &[srv, &alice_srv]);
    let e = h.err(
        &alice,
        "BindBackup",
        json!({"target": alice_srv, "mode": "copy"}),
        "NotAuthorized",
    );
    assert_eq!(e["action"], "io.asd.helper.sync-elsewhere");
    before.check(&h);

    // A rules file grants it to her, for that directory.
    services.add_rules(
        &format!("49-asd-helper-test-{}.rules", std::process::id()),
        &format!(
            r#"polkit.addRule(function(action, subject) {{
    if (action.id == "io.asd.helper.sync-elsewhere" && subject.user == "alice" &&
        action.lookup("target") == "{}" && action.lookup("user") == "alice") {{
        return polkit.Result.YES;
    }}
}});
"#,
            alice_srv.display()
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = h.call(
            &alice,
            "BindBackup",
            json!({"target": alice_srv, "mode": "overlay"}),
        );
        if r.get("error").is_none() {
            break;
        }
        assert_eq!(r["error"], "io.asd.Helper.NotAuthorized", "{r}");
        assert!(
            Instant::now() < deadline,
            "the rules file was not applied: {r}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The backup next to it is created by the helper in root's /srv, but is hers.
    let backup = srv.join(format!(
        ".{}-backup_asd",
        alice_srv.file_name().unwrap().to_string_lossy()
    ));
    assert_eq!(owner(&backup), alice.uid);
    h.ok(&alice, "MountOverlay", json!({"target": alice_srv}));
    h.ok(
        &alice,
        "Cover",
        json!({"target": alice_srv, "mode": "overlay"}),
    );
    // bob gets nothing from alice's rule.
    let (_gb, bob_srv) = srv_dir(srv, &bob, "bob");
    h.err(
        &bob,
        "BindBackup",
        json!({"target": bob_srv, "mode": "copy"}),
        "NotAuthorized",
    );
    let r = h.ok(&alice, "Detach", json!({"target": alice_srv}));
    assert_eq!(r["removed"][0], backup.to_str().unwrap());
    assert!(!backup.exists());
    assert!(h.mounts_under(srv).is_empty());

    // The shipped example rules: group asd-web may sync under /srv/http.
    let _ = Command::new("groupadd").arg("asd-web").output();
    run_ok(Command::new("usermod").args(["-aG", "asd-web", "bob"]));
    services.add_rules(
        &format!("48-asd-helper-example-{}.rules", std::process::id()),
        &std::fs::read_to_string(EXAMPLE_RULES).unwrap(),
    );
    let http = srv.join("http");
    let _http_guard = (!http.exists()).then(|| Scratch::at(http.clone()));
    let (_gw, bob_http) = srv_dir(&http, &bob, "site");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = h.call(
            &bob,
            "BindBackup",
            json!({"target": bob_http, "mode": "copy"}),
        );
        if r.get("error").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the example rules were not applied: {r}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    h.ok(&bob, "Detach", json!({"target": bob_http}));
    // alice is not in asd-web.
    let (_ga, alice_http) = srv_dir(&srv.join("http"), &alice, "site");
    h.err(
        &alice,
        "BindBackup",
        json!({"target": alice_http, "mode": "copy"}),
        "NotAuthorized",
    );
    assert!(h.mounts_under(srv).is_empty());
    // Every decision came from polkit itself.
    assert!(
        !h.log_text().contains("polkit not reachable"),
        "{}",
        h.log_text()
    );
    h.assert_serving();
}

#[test]
fn without_polkit_home_is_allowed_and_elsewhere_refused() {
    if !root_or_skip("without_polkit_home_is_allowed_and_elsewhere_refused") {
        return;
    }
    let alice = user("alice");
    // The default test helper points DBUS_SYSTEM_BUS_ADDRESS at nothing.
    let mut h = Helper::start();
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let home = Scratch::new(&alice, "nopk");
    let t = dir_of(&alice, &home.path.join("t"));
    h.ok(&alice, "BindBackup", json!({"target": t, "mode": "copy"}));
    h.ok(&alice, "Detach", json!({"target": t}));
    let srv = Path::new("/srv");
    let (_g, alice_srv) = srv_dir(srv, &alice, "alice-nopk");
    let before = Untouched::take(&h, &[srv]);
    let e = h.err(
        &alice,
        "BindBackup",
        json!({"target": alice_srv, "mode": "copy"}),
        "NotAuthorized",
    );
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("polkit not reachable"),
        "{e:?}"
    );
    before.check(&h);
    assert!(h.log_text().contains("polkit not reachable"));
    h.assert_serving();
}

// ---- the subject: the connecting process, not whoever has its pid ------------------------------

/// A client that keeps its connection and does what the test writes to its stdin, one line at a
/// time: `call METHOD JSON` (prints the reply), `fork` (the connecting process forks and exits;
/// the child keeps the connection and goes on reading), `exit`. Its first line is its pid and
/// start time (field 22 of /proc/PID/stat).
const CLIENT: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def out(line):
    os.write(1, (line + "\n").encode())
def line():
    b = b""
    while not b.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            os._exit(0)
        b += c
    return b.decode().split(maxsplit=2)
def call(method, params):
    s.sendall(json.dumps({"method": "io.asd.Helper." + method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        c = s.recv(65536)
        if not c:
            break
        buf += c
    return buf.rstrip(b"\0").decode()
me = os.getpid()
out("%d %s" % (me, open("/proc/%d/stat" % me).read().rsplit(")", 1)[1].split()[19]))
while True:
    c = line()
    if c[0] == "call":
        out(call(c[1], json.loads(c[2])))
    elif c[0] == "fork":
        if os.fork() != 0:
            os._exit(0)
    else:
        os._exit(0)
"#;

struct Client {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    pid: u32,
    start_time: u64,
}

impl Client {
    fn connect(user: &User, sock: &Path) -> Client {
        let mut cmd = as_user(user, PYTHON);
        cmd.arg("-c")
            .arg(CLIENT)
            .arg(sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        let first = lines.next().expect("the client's pid").unwrap();
        let (pid, start) = first.split_once(' ').unwrap();
        Client {
            child,
            stdin,
            lines,
            pid: pid.parse().unwrap(),
            start_time: start.parse().unwrap(),
        }
    }

    fn send(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.send(&format!("call {method} {params}"));
        let reply = self.lines.next().expect("a reply").unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|_| panic!("{method}: {reply}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.send("exit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dbus-monitor --system` watching polkit's CheckAuthorization calls (an independent view of
/// what the helper sends).
struct Monitor {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Monitor {
    fn start() -> Monitor {
        let mut child = Command::new("dbus-monitor")
            .args([
                "--system",
                "type='method_call',interface='org.freedesktop.PolicyKit1.Authority',member='CheckAuthorization'",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-monitor");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let m = Monitor { child, out };
        // It is listening once the bus has told it its name.
        wait_for("dbus-monitor", 10, || m.text().contains("NameLost"));
        m
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// The subjects of the CheckAuthorization calls seen so far: each a map from a detail's name
    /// to its type and value as dbus-monitor prints them (`uint32 1234`, `unix fd`, ...).
    fn subjects(&self) -> Vec<std::collections::BTreeMap<String, String>> {
        let text = self.text();
        let mut found = vec![];
        for call in text.split("method call ").skip(1) {
            if !call.contains("member=CheckAuthorization") || !call.contains("\"unix-process\"") {
                continue;
            }
            let lines: Vec<&str> = call.lines().collect();
            let mut details = std::collections::BTreeMap::new();
            for (i, l) in lines.iter().enumerate() {
                let l = l.trim();
                let Some(key) = l
                    .strip_prefix("string \"")
                    .and_then(|k| k.strip_suffix('"'))
                else {
                    continue;
                };
                if !["pid", "start-time", "uid", "pidfd"].contains(&key) {
                    continue;
                }
                // The value follows on the next line: `variant TYPE VALUE`; a descriptor is
                // `variant file descriptor` with its `inode: N` on the line after.
                let Some(v) = lines
                    .get(i + 1)
                    .and_then(|v| v.trim().strip_prefix("variant"))
                else {
                    continue;
                };
                let mut v = v.trim().to_string();
                if v == "file descriptor" {
                    if let Some(ino) = lines
                        .get(i + 2)
                        .and_then(|l| l.trim().strip_prefix("inode:"))
                    {
                        v = format!("file descriptor {}", ino.trim());
                    }
                }
                details.insert(key.to_string(), v);
            }
            found.push(details);
        }
        found
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process polkit is asked about is the connecting one: its pid and start time, its uid
/// (from SO_PEERCRED), and a pidfd of it, which polkit 124 and later read instead of the pid.
#[test]
fn polkit_is_asked_about_the_connecting_process() {
    if !root_or_skip("polkit_is_asked_about_the_connecting_process") {
        return;
    }
    let alice = user("alice");
    let _services = Services::up();
    let h = Helper::start_with(HelperOpts {
        env: vec![],
        ..HelperOpts::default()
    });
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let (_g, alice_srv) = srv_dir(Path::new("/srv"), &alice, "subject");
    let monitor = Monitor::start();
    let mut c = Client::connect(&alice, &h.sock);
    let r = c.call("BindBackup", json!({"target": alice_srv, "mode": "copy"}));
    assert_eq!(r["error"], "io.asd.Helper.NotAuthorized", "{r}");
    // polkitd decided (auth_admin: a challenge), about this process.
    let reason = r["parameters"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("requires authentication"), "{r}");
    wait_for("the CheckAuthorization call in dbus-monitor", 10, || {
        !monitor.subjects().is_empty()
    });
    let subjects = monitor.subjects();
    assert_eq!(subjects.len(), 1, "{}", monitor.text());
    let s = &subjects[0];
    assert_eq!(
        s.get("pid").map(String::as_str),
        Some(&*format!("uint32 {}", c.pid)),
        "{s:?}"
    );
    assert_eq!(
        s.get("start-time").map(String::as_str),
        Some(&*format!("uint64 {}", c.start_time)),
        "{s:?}"
    );
    assert_eq!(
        s.get("uid").map(String::as_str),
        Some(&*format!("int32 {}", alice.uid)),
        "{s:?}"
    );
    // The pidfd travels as a descriptor (D-Bus type 'h'), which is what polkit looks up; it is
    // a pidfd of the client: since Linux 6.9 (pidfs) every pidfd of one process has that
    // process's inode number (before, all pidfds share one anonymous inode).
    let pidfd = s
        .get("pidfd")
        .unwrap_or_else(|| panic!("no pidfd in {s:?}\n{}", monitor.text()));
    let own = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(c.pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let ino = rustix::fs::fstat(&own).unwrap().st_ino;
    assert_eq!(pidfd, &format!("file descriptor {ino}"), "{s:?}");
    assert!(h.mounts_under(Path::new("/srv")).is_empty());
}

/// Starts `sleep 60` with exactly the pid `pid` (clone3 with set_tid, which root may use).
/// `None` if that pid is taken (another process got it first: a reuse all the same).
fn spawn_with_pid(pid: u32) -> Option<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    // Everything the child needs is made before the clone: after it, only exec and _exit.
    let prog = std::ffi::CString::new("/bin/sleep").unwrap();
    let arg = std::ffi::CString::new("60").unwrap();
    let argv = [prog.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let tid = [pid as libc::pid_t];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed; the child
    // (r == 0) only calls execv with pointers made above and _exit, both async-signal-safe.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: see above.
        unsafe {
            libc::execv(prog.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    if r < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "clone3: {e}");
        return None;
    }
    Some(r as u32)
}

fn start_time_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// `pkcheck` (as root) on `pid`: whether polkit authorizes whoever has that pid now.
fn pkcheck(action: &str, pid: u32, start: u64, uid: u32) -> bool {
    Command::new("pkcheck")
        .args(["--action-id", action, "--process"])
        .arg(format!("{pid},{start},{uid}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A caller whose connecting process exits (its connection kept by a child) and whose pid is
/// then reused: a request on that connection is not authorized as the new process, even though
/// polkit would authorize the process that now has the pid (a rule that allows that pid).
#[test]
fn a_reused_pid_is_not_authorized_as_the_caller() {
    if !root_or_skip("a_reused_pid_is_not_authorized_as_the_caller") {
        return;
    }
    let alice = user("alice");
    let mut services = Services::up();
    let h = Helper::start_with(HelperOpts {
        env: vec![],
        ..HelperOpts::default()
    });
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let srv = Path::new("/srv");
    let (_g1, first) = srv_dir(srv, &alice, "reuse-a");
    let (_g2, second) = srv_dir(srv, &alice, "reuse-b");
    // Should the helper wrongly make a backup dir, it goes with the test.
    let _b: Vec<Scratch> = [&first, &second]
        .iter()
        .map(|t| {
            let name = t.file_name().unwrap().to_string_lossy();
            Scratch::at(srv.join(format!(".{name}-backup_asd")))
        })
        .collect();
    let mut c = Client::connect(&alice, &h.sock);
    let pid = c.pid;
    // polkit allows io.asd.helper.sync-elsewhere to whatever process has this pid.
    services.add_rules(
        &format!("47-asd-helper-test-pid-{}.rules", std::process::id()),
        &format!(
            r#"polkit.addRule(function(action, subject) {{
    if (action.id == "io.asd.helper.sync-elsewhere" && subject.pid == {pid}) {{
        return polkit.Result.YES;
    }}
}});
"#
        ),
    );
    wait_for("the rules file", 20, || {
        pkcheck("io.asd.helper.sync-elsewhere", pid, c.start_time, alice.uid)
    });

    // While the connecting process lives, its requests are allowed: the rule works.
    let r = c.call("BindBackup", json!({"target": first, "mode": "copy"}));
    assert!(r.get("error").is_none(), "{r}\n{}", h.log_text());
    let r = c.call("Detach", json!({"target": first}));
    assert!(r.get("error").is_none(), "{r}");

    // The connecting process forks and exits; its child keeps the connection. Once it is
    // reaped its pid is free, and is given to a new process, which polkit would allow.
    c.send("fork");
    let st = c.child.wait().unwrap();
    assert!(st.success(), "{st}");
    let reused = spawn_with_pid(pid);
    let _reaper = Reaper(reused);
    match reused {
        Some(p) => assert_eq!(p, pid),
        None => eprintln!("pid {pid} was taken by another process before the test's"),
    }
    let new_start = start_time_of(pid);
    if let Some(new_start) = new_start {
        assert_ne!(new_start, c.start_time);
        assert!(
            pkcheck("io.asd.helper.sync-elsewhere", pid, new_start, alice.uid),
            "polkit does not allow the new process with pid {pid}: the test proves nothing"
        );
    }

    // The child asks on the connection: refused, the caller has exited.
    let monitor = Monitor::start();
    let r = c.call("BindBackup", json!({"target": second, "mode": "copy"}));
    assert_eq!(
        r["error"],
        "io.asd.Helper.NotAuthorized",
        "{r}\n{}",
        h.log_text()
    );
    let reason = r["parameters"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("exited"), "{r}");
    assert!(h.mounts_under(srv).is_empty(), "{:?}", h.mounts_under(srv));
    // polkit was not asked about the new process.
    std::thread::sleep(Duration::from_millis(300));
    for s in monitor.subjects() {
        assert_ne!(
            s.get("pid").map(String::as_str),
            Some(&*format!("uint32 {pid}")),
            "polkit was asked about pid {pid} after the caller exited: {s:?}"
        );
    }
}

/// Kills and reaps the process the test started with a chosen pid.
struct Reaper(Option<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill and waitpid on the test's own child, integer arguments only.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
            }
        }
    }
}

// ---- as asd-helper.service runs it: its own user, the unit's ambient capabilities -------------

const SERVICE_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../systemd/system/asd-helper.service"
);
const SOCKET_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../systemd/system/asd-helper.socket"
);

/// The value of the (last) `KEY=` line of a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    std::fs::read_to_string(unit)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or_else(|| panic!("no {key}= in {unit}"))
        .to_string()
}

/// The capability bits (as in /proc/PID/status) of names like `CAP_SYS_ADMIN`.
fn cap_bits(names: &str) -> u64 {
    names
        .split_whitespace()
        .map(|n| {
            let c: caps_bits::Cap = n.parse().unwrap_or_else(|_| panic!("unknown {n}"));
            1u64 << c.0
        })
        .sum()
}

mod caps_bits {
    /// The capabilities asd-helper.service may name, with their numbers.
    pub struct Cap(pub u32);
    impl std::str::FromStr for Cap {
        type Err = ();
        fn from_str(s: &str) -> Result<Cap, ()> {
            Ok(Cap(match s {
                "CAP_CHOWN" => 0,
                "CAP_DAC_OVERRIDE" => 1,
                "CAP_DAC_READ_SEARCH" => 2,
                "CAP_FOWNER" => 3,
                "CAP_SETGID" => 6,
                "CAP_SETUID" => 7,
                "CAP_SETPCAP" => 8,
                "CAP_SYS_ADMIN" => 21,
                _ => return Err(()),
            }))
        }
    }
}

/// The `Name:\tvalue` lines of /proc/PID/status.
fn proc_status(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// A helper started the way asd-helper.service starts it: as the system user asd-helper
/// (created by the socket unit's own command), with the unit's ambient capabilities and
/// bounding set and no others, in a mount namespace of its own that goes with the test.
struct UnitHelper {
    holder: std::process::Child,
    helper: std::process::Child,
    dir: PathBuf,
    sock: PathBuf,
    call: PathBuf,
}

impl UnitHelper {
    fn start() -> UnitHelper {
        // The socket unit's ExecStartPre= (systemd-sysusers --inline "u asd-helper ..."),
        // as systemd would run it (without the outer quotes).
        let pre = unit_value(SOCKET_UNIT, "ExecStartPre");
        let (prog, inline) = pre
            .split_once(" --inline ")
            .expect("systemd-sysusers --inline");
        let inline = inline.trim_matches('"');
        run_ok(Command::new(prog).args(["--inline", inline]));
        let user = unit_value(SERVICE_UNIT, "User");
        assert_eq!(user, "asd-helper");
        let ambient = unit_value(SERVICE_UNIT, "AmbientCapabilities");
        assert_eq!(ambient, unit_value(SERVICE_UNIT, "CapabilityBoundingSet"));
        let setpriv_caps = ambient
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",");
        let dir = std::env::temp_dir().join(unique("asd-helper-unit"));
        std::fs::create_dir(&dir).unwrap();
        let helper_user = nix::unistd::User::from_name(&user).unwrap().unwrap();
        std::os::unix::fs::chown(
            &dir,
            Some(helper_user.uid.as_raw()),
            Some(helper_user.gid.as_raw()),
        )
        .unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let call = dir.join("asd-helper-call");
        std::fs::copy(CALL, &call).unwrap();
        let mut holder = Command::new("unshare");
        holder
            .args(["-m", "--propagation", "private", "sleep", "100000"])
            .stdin(Stdio::null());
        die_with_parent(&mut holder);
        let holder = holder.spawn().unwrap();
        let me = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        wait_for("unshare", 10, || {
            std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id())).is_ok_and(|ns| ns != me)
        });
        let sock = dir.join("sock");
        let log = std::fs::File::create(dir.join("helper.log")).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(holder.id().to_string())
            .args(["-m", "--", "setpriv"])
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps=-all,{setpriv_caps}"))
            .arg(format!("--ambient-caps=-all,{setpriv_caps}"))
            .arg(format!("--bounding-set=-all,{setpriv_caps}"))
            .arg("--")
            .arg(HELPER)
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ASD_HELPER_") {
                cmd.env_remove(k);
            }
        }
        die_with_parent(&mut cmd);
        let helper = cmd.spawn().unwrap();
        let mut h = UnitHelper {
            holder,
            helper,
            dir,
            sock,
            call,
        };
        wait_for("the helper's socket", 20, || {
            if let Ok(Some(st)) = h.helper.try_wait() {
                panic!("asd-helper exited: {st}\n{}", h.log());
            }
            std::os::unix::net::UnixStream::connect(&h.sock).is_ok()
        });
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("helper.log")).unwrap_or_default()
    }

    fn call(&self, user: &User, method: &str, params: serde_json::Value) -> serde_json::Value {
        let out = run(as_user(user, self.call.to_str().unwrap())
            .arg("--socket")
            .arg(&self.sock)
            .arg(method)
            .arg(params.to_string()));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim())
            .unwrap_or_else(|_| panic!("{method}: {text}\n{}", self.log()))
    }

    fn ok(&self, user: &User, method: &str, params: serde_json::Value) -> serde_json::Value {
        let r = self.call(user, method, params.clone());
        assert!(
            r.get("error").is_none(),
            "{method} {params}: {r}\n{}",
            self.log()
        );
        r["parameters"].clone()
    }

    fn mounts_under(&self, path: &Path) -> Vec<String> {
        let p = path.to_string_lossy().to_string();
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.holder.id()))
            .unwrap()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m == p || m.starts_with(&format!("{p}/")))
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for UnitHelper {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The helper as asd-helper.service runs it (not root: the asd-helper user with the unit's
/// capabilities) keeps only what it needs, is answered by polkit (the policy's owner annotation),
/// mounts copy and overlay targets, and makes the caller's entries in a root-owned parent
/// the caller may not write (as the caller, with CAP_DAC_OVERRIDE for the one create).
#[test]
fn the_helper_as_its_unit_runs_it() {
    if !root_or_skip("the_helper_as_its_unit_runs_it") {
        return;
    }
    let alice = user("alice");
    let mut services = Services::up();
    let h = UnitHelper::start();
    let helper_user = nix::unistd::User::from_name("asd-helper").unwrap().unwrap();
    let hu = helper_user.uid.as_raw();

    // What it runs with, read from the running process.
    let st = proc_status(h.helper.id());
    let all = cap_bits(&unit_value(SERVICE_UNIT, "CapabilityBoundingSet"));
    let effective = all & !cap_bits("CAP_DAC_OVERRIDE");
    let hex = |bits: u64| format!("{bits:016x}");
    assert_eq!(st["Uid"], format!("{hu}\t{hu}\t{hu}\t{hu}"), "{st:?}");
    assert_eq!(st["CapEff"], hex(effective), "{st:?}");
    assert_eq!(st["CapPrm"], hex(all), "{st:?}");
    assert_eq!(st["CapBnd"], hex(all), "{st:?}");
    assert_eq!(st["CapInh"], hex(0), "{st:?}");
    assert_eq!(st["CapAmb"], hex(0), "{st:?}");
    assert_eq!(st["NoNewPrivs"], "1", "{st:?}");
    assert_eq!(all & cap_bits("CAP_CHOWN CAP_SETPCAP CAP_FOWNER"), 0);

    let vol = volatile();
    let area = h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let area = PathBuf::from(area["area"].as_str().unwrap());
    assert_eq!(owner(&area), alice.uid);

    // In her home: copy, then overlay (overlayfs with the caller's credentials).
    let home = Scratch::new(&alice, "unit-home");
    let t = dir_of(&alice, &home.path.join("t"));
    h.ok(&alice, "BindBackup", json!({"target": t, "mode": "copy"}));
    // The RAM copy is the caller's to make.
    run_ok(
        as_user(&alice, "mkdir")
            .arg("-p")
            .arg(area.join(t.strip_prefix("/").unwrap())),
    );
    h.ok(&alice, "Cover", json!({"target": t, "mode": "copy"}));
    assert_eq!(
        h.mounts_under(&t).len(),
        1,
        "{:?}",
        h.mounts_under(&home.path)
    );
    h.ok(&alice, "Detach", json!({"target": t}));
    h.ok(
        &alice,
        "BindBackup",
        json!({"target": t, "mode": "overlay"}),
    );
    h.ok(&alice, "MountOverlay", json!({"target": t}));
    h.ok(&alice, "Cover", json!({"target": t, "mode": "overlay"}));
    h.ok(&alice, "Detach", json!({"target": t}));
    assert!(h.mounts_under(&home.path).is_empty());

    // Outside her home, in root's /srv, allowed by a rule: the backup dir and an entry beside
    // the target are hers from the start.
    let srv = Path::new("/srv");
    let (_g, alice_srv) = srv_dir(srv, &alice, "unit-srv");
    let name = alice_srv
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let backup = srv.join(format!(".{name}-backup_asd"));
    let old = format!(".{name}-backup_asd-old");
    let _b = (Scratch::at(backup.clone()), Scratch::at(srv.join(&old)));
    services.add_rules(
        &format!("46-asd-helper-test-unit-{}.rules", std::process::id()),
        &format!(
            r#"polkit.addRule(function(action, subject) {{
    if (action.id == "io.asd.helper.sync-elsewhere" && subject.user == "alice" &&
        action.lookup("target") == "{}") {{
        return polkit.Result.YES;
    }}
}});
"#,
            alice_srv.display()
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = h.call(
            &alice,
            "BindBackup",
            json!({"target": alice_srv, "mode": "copy"}),
        );
        if r.get("error").is_none() {
            break;
        }
        assert_eq!(
            r["error"],
            "io.asd.Helper.NotAuthorized",
            "{r}\n{}",
            h.log()
        );
        assert!(
            !r.to_string().contains("trusted callers"),
            "polkit does not answer the asd-helper user: {r}"
        );
        assert!(Instant::now() < deadline, "the rule was not applied: {r}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let md = std::fs::metadata(&backup).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&md),
            std::os::unix::fs::MetadataExt::gid(&md)
        ),
        (alice.uid, alice.gid)
    );
    h.ok(
        &alice,
        "MakeBeside",
        json!({"target": alice_srv, "name": old, "kind": "dir"}),
    );
    assert_eq!(owner(&srv.join(&old)), alice.uid);
    h.ok(
        &alice,
        "RemoveBeside",
        json!({"target": alice_srv, "name": old}),
    );
    assert!(!srv.join(&old).exists());
    let r = h.ok(&alice, "Detach", json!({"target": alice_srv}));
    assert_eq!(r["removed"][0], backup.to_str().unwrap());
    assert!(h.mounts_under(srv).is_empty());

    // Its records are its own, and no one else's to read.
    let state = h.dir.join("state");
    let md = std::fs::metadata(&state).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), hu);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o700
    );
    let log = h.log();
    assert!(!log.contains("polkit not reachable"), "{log}");
}
