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
    dbus_pid: Option<i32>,
    polkitd: Option<std::process::Child>,
    installed_policy: bool,
    files: Vec<PathBuf>,
}

impl Services {
    fn up() -> Services {
        let mut s = Services::default();
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
