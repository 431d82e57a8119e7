//! Shared fixtures of the helper's integration tests: real users, a helper running as root in a
//! private mount namespace, clients running as those users.
//!
//! The helper runs in a mount namespace held by a separate `unshare -m` process (so that a
//! helper can be restarted while its mounts stay); everything mounted there disappears when the
//! holder is killed, so a failing test never leaves mounts behind.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

pub const HELPER: &str = env!("CARGO_BIN_EXE_asd-helper");
pub const CALL: &str = env!("CARGO_BIN_EXE_asd-helper-call");
pub const PYTHON: &str = "/usr/bin/python3";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or test process) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Whether the tests can run; prints a loud notice when they cannot.
pub fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "!!!!!!!! SKIPPED {test}: the asd-helper integration tests must run as root !!!!!!!!"
    );
    false
}

/// The child is killed if the test (the thread that started it) dies first, so a crashed test
/// leaves no helper and no namespace behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The user `name`, created if missing (tests/run.sh creates them up front) the way Fedora, Arch
/// and Debian 12's `adduser` make users: a private home, 0700.
pub fn user(name: &str) -> User {
    user_with_home_mode(name, 0o700)
}

/// [`user`] with another distribution's home mode (0750: Ubuntu), given to `useradd` as
/// `HOME_MODE`. A user keeps the mode it was made with: each mode has users of its own.
pub fn user_with_home_mode(name: &str, home_mode: u32) -> User {
    // Tests of this binary run in parallel: one useradd at a time, or a second one could fail
    // on the passwd lock or give the user a second uid.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lookup = || nix::unistd::User::from_name(name).ok().flatten();
    if lookup().is_none() {
        let _ = Command::new("useradd")
            .args(["-m", "-K"])
            .arg(format!("HOME_MODE={home_mode:04o}"))
            .arg(name)
            .output();
    }
    let u = lookup().unwrap_or_else(|| panic!("cannot create user {name}"));
    let mode = std::fs::metadata(&u.dir)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0);
    assert_eq!(
        mode,
        home_mode,
        "{} has mode {mode:o}, the test wants a user made with HOME_MODE {home_mode:o}",
        u.dir.display()
    );
    User {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    }
}

/// A command run as `user` (real and effective ids and groups).
pub fn as_user(user: &User, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &user.name,
        "--regid",
        &user.name,
        "--init-groups",
        "--",
        program,
    ]);
    c
}

pub fn chown(path: &Path, user: &User) {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A fresh directory (with parents) owned by `user`.
pub fn dir_of(user: &User, path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chown(path, user);
    path.to_path_buf()
}

/// A scratch directory in `user`'s home, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(user: &User, name: &str) -> Scratch {
        let path = user.home.join(unique(name));
        dir_of(user, &path);
        Scratch { path }
    }

    pub fn at(path: PathBuf) -> Scratch {
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("chmod")
            .args(["-R", "u+rwx"])
            .arg(&self.path)
            .output();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A VOLATILE like /dev/shm: a root-owned, sticky, world-writable dir on tmpfs.
pub fn volatile() -> Scratch {
    let path = PathBuf::from("/dev/shm").join(unique("asd-test-vol"));
    std::fs::create_dir(&path).unwrap();
    chmod(&path, 0o1777);
    Scratch { path }
}

/// Entries of a directory, sorted (to see that nothing was created or deleted).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

pub struct HelperOpts {
    pub propagation: &'static str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Default for HelperOpts {
    fn default() -> HelperOpts {
        HelperOpts {
            propagation: "private",
            args: vec![],
            // No polkitd for most tests: the documented fallback applies (home yes, others no).
            env: vec![(
                "DBUS_SYSTEM_BUS_ADDRESS".into(),
                "unix:path=/nonexistent/asd-test-no-bus".into(),
            )],
        }
    }
}

/// A helper as root in its own mount namespace, listening on a socket in a fresh temp dir.
pub struct Helper {
    holder: Child,
    helper: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub call: PathBuf,
    opts: HelperOpts,
}

impl Helper {
    pub fn start() -> Helper {
        Helper::start_with(HelperOpts::default())
    }

    pub fn start_with(opts: HelperOpts) -> Helper {
        let dir = std::env::temp_dir().join(unique("asd-helper-test"));
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        // The users run their own copy of the client, from a place they can reach.
        let call = dir.join("asd-helper-call");
        std::fs::copy(CALL, &call).unwrap();
        chmod(&call, 0o755);
        let mut holder = Command::new("unshare");
        holder
            // Always private first: a namespace made shared by unshare keeps its mounts in the
            // host's peer groups, so the test's mounts would show up on the host.
            .args(["-m", "--propagation", "private", "sleep", "100000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut holder);
        let holder = holder.spawn().expect("unshare");
        let mut h = Helper {
            holder,
            helper: None,
            sock: dir.join("sock"),
            state: dir.join("state"),
            log: dir.join("helper.log"),
            call,
            dir,
            opts,
        };
        // Wait until the holder has entered its namespace.
        let me = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", h.holder.id()))
            .ok()
            .as_ref()
            == Some(&me)
            || std::fs::read_link(format!("/proc/{}/ns/mnt", h.holder.id())).is_err()
        {
            assert!(Instant::now() < deadline, "unshare did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.opts.propagation == "shared" {
            // Shared as on a host booted with systemd, in peer groups of its own.
            let out = run(Command::new("nsenter")
                .arg("-t")
                .arg(h.holder.id().to_string())
                .args(["-m", "--", "mount", "--make-rshared", "/"]));
            assert!(out.status.success(), "{out:?}");
        }
        h.spawn_helper();
        h
    }

    pub fn ns_pid(&self) -> u32 {
        self.holder.id()
    }

    fn spawn_helper(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--", HELPER, "--socket"])
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Limits and paths from the environment the tests run in must not change what they test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ASD_HELPER_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        self.helper = Some(cmd.spawn().expect("start asd-helper"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let world = std::fs::symlink_metadata(&self.sock)
                .is_ok_and(|m| m.permissions().mode() & 0o777 == 0o666);
            if world && UnixStream::connect(&self.sock).is_ok() {
                break;
            }
            if let Some(Some(st)) = self.helper.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("asd-helper exited: {st}\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "asd-helper did not start\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the helper (its mounts stay in the namespace) and starts a new one.
    pub fn restart(&mut self) {
        self.stop_helper();
        self.spawn_helper();
    }

    fn stop_helper(&mut self) {
        if let Some(mut c) = self.helper.take() {
            // nsenter execs the helper: the child's pid is the helper's.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn helper_pid(&self) -> u32 {
        self.helper.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the helper process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.helper.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.holder.id())).unwrap()
    }

    /// Mount points (field 5 of mountinfo) in the helper's namespace.
    pub fn mount_points(&self) -> Vec<String> {
        self.mountinfo()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|s| s.replace("\\040", " ")))
            .collect()
    }

    /// The mountinfo lines whose mount point is `path` or below it.
    pub fn mounts_under(&self, path: &Path) -> Vec<String> {
        let p = path.to_string_lossy().to_string();
        self.mountinfo()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m == p || m.starts_with(&format!("{p}/")))
            })
            .map(str::to_string)
            .collect()
    }

    /// `path` as seen inside the helper's namespace.
    pub fn inside(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder.id()))
            .join(path.strip_prefix("/").unwrap_or(path))
    }

    /// A shell command run as `user` inside the helper's mount namespace.
    pub fn sh_as(&self, user: &User, script: &str) -> Output {
        run(Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args([
                "-m", "--", "setpriv", "--reuid", &user.name, "--regid", &user.name,
            ])
            .args(["--init-groups", "--", "sh", "-c", script]))
    }

    /// Calls `method` (short name or full) as `user`; returns the whole reply object.
    pub fn call(&self, user: &User, method: &str, params: Value) -> Value {
        let out = run(as_user(user, self.call.to_str().unwrap())
            .arg("--socket")
            .arg(&self.sock)
            .arg(method)
            .arg(params.to_string()));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!(
                "{method} as {}: no reply (status {}): {text}\n{}",
                user.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Calls and expects success; returns the reply's parameters.
    pub fn ok(&self, user: &User, method: &str, params: Value) -> Map<String, Value> {
        let r = self.call(user, method, params.clone());
        assert!(
            r.get("error").is_none(),
            "{method} {params} as {} failed: {r}\n{}",
            user.name,
            self.log_text()
        );
        match r.get("parameters") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        }
    }

    /// Calls and expects the error `name` (short names are in io.asd.Helper); returns its
    /// parameters.
    pub fn err(&self, user: &User, method: &str, params: Value, name: &str) -> Map<String, Value> {
        let r = self.call(user, method, params.clone());
        let want = if name.contains('.') {
            name.to_string()
        } else {
            format!("io.asd.Helper.{name}")
        };
        assert_eq!(
            r.get("error").and_then(Value::as_str),
            Some(want.as_str()),
            "{method} {params} as {}: expected {want}, got {r}",
            user.name
        );
        match r.get("parameters") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        }
    }

    /// The helper answers, promptly.
    pub fn assert_serving(&mut self) {
        assert!(self.running(), "the helper died\n{}", self.log_text());
        let t = Instant::now();
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reply = raw_call(&mut s, &json!({"method": "org.varlink.service.GetInfo"}));
        assert!(reply.get("error").is_none(), "{reply}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop_helper();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one call on a raw stream and reads one reply.
pub fn raw_call(s: &mut UnixStream, call: &Value) -> Value {
    let mut bytes = serde_json::to_vec(call).unwrap();
    bytes.push(0);
    s.write_all(&bytes).unwrap();
    read_reply(s).expect("a reply")
}

/// Reads one NUL-terminated reply; `None` if the stream closes first.
pub fn read_reply(s: &mut UnixStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) if byte[0] == 0 => break,
            Ok(_) => buf.push(byte[0]),
            // The helper closed while our bytes were still unread: closed all the same.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a reply: {e}"),
        }
    }
    Some(serde_json::from_slice(&buf).expect("reply is JSON"))
}

/// Metadata uid of a path (no symlink following).
pub fn owner(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().uid()
}

/// A snapshot of what an attack must not change: the namespace's mounts and the entries of
/// some directories.
pub struct Untouched {
    mounts: Vec<String>,
    dirs: Vec<(PathBuf, Vec<String>)>,
}

impl Untouched {
    pub fn take(h: &Helper, dirs: &[&Path]) -> Untouched {
        Untouched {
            mounts: h.mount_points(),
            dirs: dirs
                .iter()
                .map(|d| (d.to_path_buf(), listing_but_other_tests(d, dirs)))
                .collect(),
        }
    }

    pub fn check(&self, h: &Helper) {
        assert_eq!(h.mount_points(), self.mounts, "mounts changed");
        let mine: Vec<&Path> = self.dirs.iter().map(|(d, _)| d.as_path()).collect();
        for (d, before) in &self.dirs {
            assert_eq!(
                &listing_but_other_tests(d, &mine),
                before,
                "entries of {} changed",
                d.display()
            );
        }
    }
}

/// The entries of `dir` except the scratch directories that tests running in parallel in this
/// process make and remove there (names from [`unique`]): they share homes and /srv with the
/// attack under test, and their comings and goings are not its doing. Names made from the
/// test's own watched directories (`mine`: e.g. its scratch dir, and a backup dir the helper
/// would make for it) are always kept.
fn listing_but_other_tests(dir: &Path, mine: &[&Path]) -> Vec<String> {
    let tag = format!("-{}-", std::process::id());
    let own: Vec<String> = mine
        .iter()
        .filter_map(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.contains(&tag))
        .collect();
    listing(dir)
        .into_iter()
        .filter(|name| {
            if own
                .iter()
                .any(|o| name == o || name.starts_with(&format!(".{o}-")))
            {
                return true;
            }
            let Some((_, counter)) = name.split_once(&tag) else {
                return true;
            };
            // `NAME-PID-N` itself, or what a parallel test's own sync made of it
            // (`.NAME-PID-N-backup_asd`).
            let digits = counter.bytes().take_while(u8::is_ascii_digit).count();
            let rest = &counter[digits..];
            digits == 0 || !(rest.is_empty() || rest.starts_with('-'))
        })
        .collect()
}
