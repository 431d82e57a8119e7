//! A real asd-helper in a test's mount namespace, on its own socket, and per-user asd managers
//! of real users talking to it (the per-user mode's test world).

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

pub fn helper_bin() -> PathBuf {
    Path::new(ASD).with_file_name("asd-helper")
}

pub struct World {
    pub ns: Ns,
    pub helper: Child,
    pub socket: PathBuf,
    /// The helper's decision log (stderr).
    pub log: PathBuf,
    /// The helper's records (what it mounted for whom): /run/asd on a real system.
    pub state: PathBuf,
}

/// Starts the helper in `ns` on `socket` and waits until it listens.
fn start_helper(ns: &Ns, socket: &Path, state: &Path, log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("helper log");
    let _ = std::fs::remove_file(socket);
    let mut helper = ns
        .cmd(helper_bin().to_str().expect("utf-8 path"))
        .arg("--socket")
        .arg(socket)
        .env("ASD_HELPER_STATE_DIR", state)
        // No system bus here: the helper's rule without polkit (targets in the caller's
        // home only) applies, whatever a polkitd on the host would say.
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/asd-test-no-bus",
        )
        .stderr(log_file)
        .spawn()
        .expect("start asd-helper");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = helper.try_wait() {
            panic!(
                "asd-helper exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the helper did not listen on {} within 30 s",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    helper
}

impl World {
    pub fn new() -> Option<World> {
        if !require_root() {
            return None;
        }
        assert!(
            helper_bin().exists(),
            "{} is missing: run `cargo build --workspace` (the README test command does)",
            helper_bin().display()
        );
        let ns = Ns::new();
        let socket = ns.root.join("helper.sock");
        let state = ns.root.join("helper-state");
        let log = ns.root.join("helper.log");
        let helper = start_helper(&ns, &socket, &state, &log);
        Some(World {
            ns,
            helper,
            socket,
            log,
            state,
        })
    }

    /// What a power cut and a reboot do in per-user mode: every process of asd and the helper
    /// dies, every mount in the homes of `users` and under the scratch dir is gone with the RAM
    /// area, the helper's records in /run are gone, and so is each user's runtime dir (a tmpfs
    /// in /run/user) unless `keep_runtime` (a crash of the manager alone, no reboot). Then the
    /// helper is started again, as its socket would.
    pub fn power_cut(&mut self, users: &[&str], keep_runtime: bool) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
        let mut prefixes: Vec<String> = users.iter().map(|u| format!("/home/{u}/")).collect();
        prefixes.push(format!("{}/", self.ns.root.display()));
        self.ns.drop_mounts_under(&prefixes);
        let _ = std::fs::remove_dir_all(&self.state);
        if !keep_runtime {
            for u in users {
                let run = self.ns.root.join(format!("xdg-{u}"));
                let _ = std::fs::remove_dir_all(run.join("asd"));
            }
        }
        self.helper = start_helper(&self.ns, &self.socket, &self.state, &self.log);
    }

    /// A fresh target `~/<name>` of `user` with a few files, and the user's config for it.
    pub fn user_setup(&self, user: &str, name: &str) -> (u32, PathBuf, PathBuf) {
        let (uid, _) = test_user_with_home_mode(user, home_mode_of(user));
        let home = PathBuf::from(format!("/home/{user}"));
        let target = home.join(name);
        let run = self.ns.root.join(format!("xdg-{user}"));
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let conf = self.ns.root.join(format!("{user}.conf"));
        std::fs::write(
            &conf,
            format!(
                "WHATTOSYNC=(~/{name})\nVOLATILE='{}'\n",
                self.ns.vol().display()
            ),
        )
        .expect("conf");
        self.ns.sh_ok(&format!(
            "rm -rf '{t}' '{h}/.{name}-backup_asd'* && mkdir -p '{t}/sub' && echo hello > '{t}/sub/f' && \
             chown -R {user}: '{t}' '{run}' '{conf}'",
            t = target.display(),
            h = home.display(),
            run = run.display(),
            conf = conf.display()
        ));
        (uid, target, conf)
    }

    pub fn asd_as(&self, user: &str, conf: &Path, args: &[&str]) -> Output {
        self.asd_cmd_as(user, conf, args)
            .output()
            .expect("run asd as user")
    }

    /// `program` in the namespace as `user`, with the user's groups (setpriv execs it: the
    /// child's pid is the program's).
    pub fn cmd_as(&self, user: &str, program: &str) -> Command {
        let mut c: Command = self.ns.cmd("setpriv");
        c.args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
            program,
        ]);
        c
    }

    /// `asd ARGS` as `user` (setpriv execs env, which execs asd: the child's pid is asd's).
    pub fn asd_cmd_as(&self, user: &str, conf: &Path, args: &[&str]) -> Command {
        let mut c = self.cmd_as(user, "env");
        c.arg("-i")
            .arg(format!("HOME=/home/{user}"))
            .arg(format!(
                "XDG_RUNTIME_DIR={}",
                self.ns.root.join(format!("xdg-{user}")).display()
            ))
            .arg(format!("ASD_HELPER_SOCKET={}", self.socket.display()))
            .arg(format!("ASDCONF={}", conf.display()))
            .arg("PATH=/usr/bin:/bin")
            .arg("NO_COLOR=1")
            .arg(ASD)
            .args(args);
        c
    }

    pub fn asd_as_ok(&self, user: &str, conf: &Path, args: &[&str]) -> String {
        succeeded(
            &self.asd_as(user, conf, args),
            &format!("asd {args:?} as {user}"),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}
