//! Test harness: each test gets its own private mount namespace (held open by a sleeping
//! process), a scratch directory on disk, and a tmpfs for VOLATILE that exists only inside the
//! namespace. Everything mounted disappears when the holder is killed, even if the test panics.
#![allow(dead_code)]

pub mod loopfs;
pub mod versioned;
pub mod world;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const ASD: &str = env!("CARGO_BIN_EXE_asd");

/// Tests that mount need root; without it they say so loudly and pass nothing off as tested.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("\n*** SKIPPED: this test mounts filesystems and must run as root ***\n");
    false
}

/// Tests that stop asd with a crash hook (`var`, an `ASD_TEST_*` variable) need an asd built
/// with the `test-hooks` feature; without it the variable is ignored, the crash never happens,
/// and the test would pass having tested nothing. So it fails, naming the fix. The variable's
/// name is in the binary exactly when the hook is (release builds must hold no `ASD_TEST_`).
pub fn require_test_hook(var: &str) {
    let found = Command::new("grep")
        .args(["-qaF", var, ASD])
        .status()
        .expect("grep");
    assert!(
        found.success(),
        "{ASD} has no {var} hook: it was built without the test-hooks feature; run \
         tests/run.sh, or cargo test --features asd-user/test-hooks"
    );
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub struct Ns {
    holder: Child,
    pub pid: u32,
    /// Scratch directory on disk (host path = namespace path).
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ns {
    /// A namespace with `root/data` (disk), `root/vol` (tmpfs, VOLATILE), `root/run` (runtime).
    pub fn new() -> Ns {
        Self::with_propagation(false)
    }

    /// `shared`: make the namespace's root a shared mount, as on a host booted with systemd.
    pub fn with_propagation(shared: bool) -> Ns {
        let dir = tempfile::Builder::new()
            .prefix("asd-test-")
            .tempdir_in("/var/tmp")
            .expect("scratch dir");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for d in ["data", "vol", "run"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        std::fs::set_permissions(root.join("vol"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        let holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sleep", "7200"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid = holder.id();
        // Wait until the holder runs in its own namespace: every command after this enters it,
        // and one that ran in the host's namespace would mount there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if theirs.is_some() && theirs != mine && exe.is_some_and(|e| e.ends_with("sleep")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "unshare did not enter a new mount namespace within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let ns = Ns {
            holder,
            pid,
            root,
            _dir: dir,
        };
        if shared {
            ns.sh_ok("mount --make-rshared /");
        }
        ns.sh_ok(&format!(
            "mount -t tmpfs -o mode=1777 asdtest-vol {}",
            ns.vol().display()
        ));
        ns
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn vol(&self) -> PathBuf {
        self.root.join("vol")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn conf(&self) -> PathBuf {
        self.root.join("asd.conf")
    }

    /// A path as seen inside the namespace.
    pub fn inside(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "--", program]);
        c.stdin(Stdio::null());
        c
    }

    pub fn sh(&self, script: &str) -> Output {
        self.cmd("bash")
            .args(["-c", script])
            .output()
            .expect("nsenter")
    }

    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Write the config file for `targets` (plus extra lines).
    pub fn write_conf(&self, targets: &[&Path], extra: &str) {
        let list: Vec<String> = targets
            .iter()
            .map(|t| format!("'{}'", t.display()))
            .collect();
        let text = format!(
            "WHATTOSYNC=({})\nVOLATILE=\"{}\"\n{extra}\n",
            list.join(" "),
            self.vol().display()
        );
        std::fs::write(self.conf(), text).expect("write conf");
    }

    pub fn asd_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(ASD);
        c.args(args)
            .env("ASDCONF", self.conf())
            .env("ASD_RUNTIME_DIR", self.run_dir())
            .env("NO_COLOR", "1");
        c
    }

    pub fn asd(&self, args: &[&str]) -> Output {
        self.asd_cmd(args).output().expect("run asd")
    }

    /// Run asd and insist it succeeds; returns stdout + stderr.
    pub fn asd_ok(&self, args: &[&str]) -> String {
        succeeded(&self.asd(args), &format!("asd {args:?}"))
    }

    /// Mount points inside the namespace under our scratch dir.
    pub fn our_mounts(&self) -> Vec<String> {
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid)).unwrap_or_default();
        let root = self.root.to_string_lossy().into_owned();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|mp| mp.starts_with(&root) && *mp != self.vol().to_string_lossy())
            .collect()
    }

    /// What a reboot does to mounts: everything asd mounted is gone, and so is the tmpfs.
    pub fn drop_all_mounts(&self) {
        let root = self.root.display();
        self.sh_ok(&format!(
            "for i in 1 2 3 4 5 6; do grep -F ' {root}' /proc/self/mountinfo | cut -d' ' -f5 | sort -r | while read -r m; do umount -l \"$(printf '%b' \"$m\")\" 2>/dev/null; done; done; \
             mount -t tmpfs -o mode=1777 asdtest-vol {}",
            self.vol().display()
        ));
    }

    /// Unmounts (lazily, deepest first) every mount whose mount point starts with one of
    /// `prefixes` (each ending in `/`), then mounts a fresh VOLATILE tmpfs: the mounts of a
    /// per-user target live in the user's home, outside the scratch dir.
    pub fn drop_mounts_under(&self, prefixes: &[String]) {
        let vol = self.vol();
        for _ in 0..6 {
            let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid))
                .unwrap_or_default();
            let mut points: Vec<String> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|m| m.replace("\\040", " "))
                .filter(|m| prefixes.iter().any(|p| m.starts_with(p.as_str())))
                .collect();
            if points.is_empty() {
                break;
            }
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = self.cmd("umount").args(["-l", &p]).output();
            }
        }
        self.sh_ok(&format!(
            "mountpoint -q '{v}' || mount -t tmpfs -o mode=1777 asdtest-vol '{v}'",
            v = vol.display()
        ));
    }

    /// `rsync -aXn --delete --itemize-changes a/ b/` inside the namespace: empty when equal.
    pub fn tree_diff(&self, a: &Path, b: &Path) -> String {
        itemize_with(self.cmd("rsync"), "-aXn", a, b)
    }

    pub fn statfs_type(&self, p: &Path) -> String {
        self.sh_ok(&format!("stat -f -c %T '{}'", p.display()))
            .trim()
            .to_string()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A finished command's stdout + stderr.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Insists that a finished command succeeded; returns its stdout + stderr.
pub fn succeeded(out: &Output, what: &str) -> String {
    let text = output_text(out);
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// The home mode a test user is made with, by the naming of tests/run.sh: `*ubu` and `*750`
/// Ubuntu's 0750, `*deb` and `*755` Debian `useradd`'s 0755, every other one private (0700).
pub fn home_mode_of(name: &str) -> u32 {
    if name.ends_with("ubu") || name.ends_with("750") {
        0o750
    } else if name.ends_with("deb") || name.ends_with("755") {
        0o755
    } else {
        0o700
    }
}

/// Runs `job` (an owner job, as JSON) through asd's worker entry as `uid:gid`, the way asd runs
/// the jobs of a target's owner; `setpriv` is the command that starts it (`Command::new`, or
/// [`Ns::cmd`] inside a namespace). Returns its stdout and stderr; panics with them if it failed.
pub fn run_job_as(mut setpriv: Command, uid: u32, gid: u32, job: &serde_json::Value) -> String {
    use std::io::Write;
    let mut child = setpriv
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_string(),
            ASD.to_string(),
            asd::owner::WORKER_ARG.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(job.to_string().as_bytes())
            .expect("job to the worker");
    }
    let out = child.wait_with_output().expect("worker");
    let text = output_text(&out);
    assert!(out.status.success(), "{job} as {uid} failed: {text}");
    text
}

/// `rsync <flags> --delete --itemize-changes a/ b/` (outside any namespace): empty when equal.
pub fn rsync_itemize(flags: &str, a: &Path, b: &Path) -> String {
    itemize_with(Command::new("rsync"), flags, a, b)
}

fn itemize_with(mut rsync: Command, flags: &str, a: &Path, b: &Path) -> String {
    let out = rsync
        .args([flags, "--delete", "--itemize-changes"])
        .arg(format!("{}/", a.display()))
        .arg(format!("{}/", b.display()))
        .output()
        .expect("rsync");
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Create `user` if missing, the way Fedora, Arch and Debian 12's `adduser` do: a private home
/// (0700) owned by the user. Returns (uid, gid). Serialised: parallel `useradd` calls race.
pub fn test_user(name: &str) -> (u32, u32) {
    test_user_with_home_mode(name, 0o700)
}

/// [`test_user`] with the home mode of another distribution (0750: Ubuntu; 0755: Debian's
/// `useradd` without HOME_MODE). The mode is `useradd`'s own `HOME_MODE`; a user made earlier by
/// another run keeps the mode it was made with, so each mode has users of its own.
pub fn test_user_with_home_mode(name: &str, home_mode: u32) -> (u32, u32) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("id")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let _ = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", "-K"])
            .arg(format!("HOME_MODE={home_mode:04o}"))
            .arg(name)
            .stderr(Stdio::null())
            .status();
    }
    let home = format!("/home/{name}");
    let mode = std::fs::metadata(&home)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0);
    assert_eq!(
        mode, home_mode,
        "{home} has mode {mode:o}, the test wants a user made with HOME_MODE {home_mode:o} \
         (userdel -r {name} and run again)"
    );
    let out = Command::new("id").args(["-u", name]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid");
    let out = Command::new("id").args(["-g", name]).output().expect("id");
    let gid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("gid");
    (uid, gid)
}

/// A small tree with the awkward cases: nested dirs, empty dir, symlinks, spaces and a newline in
/// names, a hidden file, a fifo, an xattr, odd modes.
pub fn make_tree(ns: &Ns, dir: &Path) {
    ns.sh_ok(&format!(
        r#"set -e; mkdir -p '{d}'; cd '{d}'
        mkdir -p a/b/c empty 'dir with space'
        echo one > a/one.txt; echo two > a/b/two.txt; head -c 200000 /dev/urandom > a/b/c/blob.bin
        echo hidden > .hidden; echo spaced > 'dir with space/file name.txt'
        printf 'x' > "$(printf 'new\nline')"
        ln -s a/one.txt link-to-one; ln -s /nonexistent dangling
        mkfifo fifo; chmod 0750 a/b; chmod 0600 a/one.txt
        setfattr -n user.color -v blue a/one.txt
        echo edit-me > edit.txt; echo delete-me > delete.txt; echo mode > mode.txt
        mkdir -p gone/deep; echo x > gone/deep/x"#,
        d = dir.display()
    ));
}

/// The same changes, applied to the synced target and to a plain copy.
pub fn mutate(ns: &Ns, dir: &Path) {
    ns.sh_ok(&format!(
        r#"set -e; cd '{d}'
        echo edited >> edit.txt; rm delete.txt; chmod 0704 mode.txt
        echo added > added.txt; mkdir -p newdir/sub; echo n > newdir/sub/n.txt; mkdir newempty
        ln -sf edit.txt link-to-one; rm -r gone
        setfattr -n user.new -v 42 edit.txt; setfattr -x user.color a/one.txt
        printf 'y' > "$(printf 'other\nnewline') with space"
        head -c 50000 /dev/urandom > a/b/c/blob.bin
        echo appended >> .hidden; : > 'dir with space/file name.txt'; mv mode.txt renamed.txt
        rm -r a/b; mkdir -p a/b/fresh; echo other > a/b/fresh/other; chmod 0711 a/b
        echo deep > a/b/fresh/.dot"#,
        d = dir.display()
    ));
}

/// Give every entry of both trees the same, distinct, nanosecond mtime, so that a lost or
/// rounded mtime shows up in the comparison.
pub fn stamp(ns: &Ns, dir: &Path) {
    ns.sh_ok(&format!(
        r#"cd '{d}' && find . -depth -print0 | while IFS= read -r -d '' f; do
             n=$(printf '%s' "$f" | cksum | cut -d' ' -f1)
             touch -h -d "@$((1500000000 + n % 100000000)).$((n % 1000000000))" "$f"
           done"#,
        d = dir.display()
    ));
}
