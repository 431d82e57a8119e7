//! Refusals, ownership, preview, clean, snapshots limits, the config snapshot and the lock
//! (issue 2 items 2, 3, 5, 6), with real mounts in private namespaces.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn fails_with(ns: &Ns, needle: &str) {
    let out = ns.asd(&["sync"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "sync must refuse:\n{text}");
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
    assert!(
        ns.our_mounts().is_empty(),
        "a refused sync mounted something: {:?}",
        ns.our_mounts()
    );
    let leftovers: Vec<_> = std::fs::read_dir(ns.data())
        .expect("readdir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backup_asd"))
        .collect();
    assert!(leftovers.is_empty(), "a refused sync created {leftovers:?}");
}

#[test]
fn refuses_volatile_on_disk() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    std::fs::write(
        ns.conf(),
        format!(
            "WHATTOSYNC=('{}')\nVOLATILE='{}'\n",
            t.display(),
            ns.data().display()
        ),
    )
    .expect("conf");
    fails_with(&ns, "is not on tmpfs or zram");
}

#[test]
fn refuses_nested_targets() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let outer = ns.data().join("outer");
    let inner = outer.join("inner");
    std::fs::create_dir_all(&inner).expect("mkdir");
    ns.write_conf(&[&outer, &inner], "");
    fails_with(&ns, "nested");
}

#[test]
fn refuses_symlinked_target_and_symlink_in_path() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let real = ns.data().join("real");
    std::fs::create_dir_all(real.join("sub")).expect("mkdir");
    let link = ns.data().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    ns.write_conf(&[&link], "");
    fails_with(&ns, "is a symlink");
    ns.write_conf(&[&link.join("sub")], "");
    fails_with(&ns, "symlink in its path");
}

#[test]
fn refuses_hardlinks_unless_disabled() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    std::fs::write(t.join("a"), "x").expect("write");
    std::fs::hard_link(t.join("a"), t.join("b")).expect("link");
    ns.write_conf(&[&t], "");
    fails_with(&ns, "hard-linked files");
    ns.write_conf(&[&t], "ENABLE_HARDLINK_SAFETY_CHECK=0");
    ns.asd_ok(&["sync"]);
    ns.asd_ok(&["unsync"]);
}

#[test]
fn refuses_missing_target_and_bad_config() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    ns.write_conf(&[&ns.data().join("missing")], "");
    fails_with(&ns, "does not exist");
    std::fs::write(ns.conf(), "WHATTOSYNC=('/x')\nrm -rf /\n").expect("conf");
    fails_with(&ns, "line 2");
}

/// A target owned by a user: every file of the RAM copy is theirs and their area is 0700.
#[test]
fn copies_as_the_owner() {
    if !require_root() {
        return;
    }
    let (uid, gid) = test_user("asdtest1");
    let ns = Ns::new();
    let t = ns.data().join("t");
    ns.sh_ok(&format!(
        "mkdir -p '{t}/a/b' && echo x > '{t}/a/b/f' && echo y > '{t}/g' && ln -s g '{t}/l' && chown -R asdtest1: '{t}'",
        t = t.display()
    ));
    ns.write_conf(&[&t], "");
    ns.asd_ok(&["sync"]);
    let p = asd::paths::TargetPaths::new(&t, "asdtest1", &ns.vol()).expect("paths");
    let area = std::fs::symlink_metadata(ns.inside(&p.user_area)).expect("area");
    assert_eq!(area.uid(), uid);
    assert_eq!(
        area.permissions().mode() & 0o7777,
        0o700,
        "the user's area is private"
    );
    let listing = ns.sh_ok(&format!(
        "find '{}' -printf '%U:%G %p\\n'",
        p.user_area.display()
    ));
    for line in listing.lines() {
        assert!(
            line.starts_with(&format!("{uid}:{gid} ")),
            "not the owner's: {line}"
        );
    }
    // Writes as the user land in RAM and are written back as theirs.
    ns.sh_ok(&format!(
        "su asdtest1 -s /bin/sh -c 'echo new > {}/new'",
        t.display()
    ));
    ns.asd_ok(&["resync"]);
    let m = std::fs::symlink_metadata(ns.inside(&p.backup.join("new"))).expect("written back");
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty());
    assert_eq!(
        std::fs::read_to_string(t.join("new")).expect("new"),
        "new\n"
    );
}

#[test]
fn preview_text_and_json() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    std::fs::write(t.join("f"), vec![b'x'; 3000]).expect("write");
    ns.write_conf(&[&t], "");
    for alias in ["preview", "p", "P", "parse", "Parse", "Preview", "debug"] {
        let out = ns.asd_ok(&[alias]);
        assert!(out.contains("asd is not running"), "{alias}: {out}");
    }
    ns.asd_ok(&["sync"]);
    let text = ns.asd_ok(&["p"]);
    for field in [
        "owner/group id: root/0",
        &format!("target to manage: {}", t.display()),
        &format!("sync target: {}", ns.data().join(".t-backup_asd").display()),
        &format!(
            "tmpfs target: {}/asd-root{}",
            ns.vol().display(),
            t.display()
        ),
        "dir size: ",
        "recovery dirs: none",
        "asd is running",
    ] {
        assert!(text.contains(field), "missing {field:?} in:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ns.asd_ok(&["preview", "--json"])).expect("json");
    assert_eq!(json["running"], true);
    // Apparent size like `du -sb`: the file plus the directory entries themselves.
    let size = json["targets"][0]["dir_size"].as_u64().expect("dir_size");
    assert!((3000..20_000).contains(&size), "dir_size {size}");
    assert_eq!(json["targets"][0]["in_ram"], true);
    assert_eq!(json["targets"][0]["owner"], "root");
    ns.asd_ok(&["unsync"]);
}

/// Crashes leave snapshots; BACKUP_LIMIT keeps the newest; clean deletes them and says which;
/// USE_BACKUPS=no makes none.
#[test]
fn snapshots_limit_and_clean() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    std::fs::write(t.join("f"), "data").expect("write");
    ns.write_conf(&[&t], "BACKUP_LIMIT=2");
    for _ in 0..4 {
        ns.asd_ok(&["sync"]);
        ns.drop_all_mounts();
        std::fs::remove_dir_all(ns.run_dir()).expect("rm state");
    }
    ns.asd_ok(&["sync"]);
    let snaps = |ns: &Ns| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(ns.data())
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("crashrecovery"))
            .collect();
        v.sort();
        v
    };
    let kept = snaps(&ns);
    assert_eq!(kept.len(), 2, "BACKUP_LIMIT=2 keeps two: {kept:?}");
    let preview = ns.asd_ok(&["preview"]);
    assert!(preview.contains("recovery dirs: 2"), "{preview}");
    ns.asd_ok(&["unsync"]);
    let out = ns.asd_ok(&["clean"]);
    for k in &kept {
        assert!(out.contains(k.as_str()), "clean must name {k}: {out}");
    }
    assert!(snaps(&ns).is_empty());
    assert_eq!(std::fs::read_to_string(t.join("f")).expect("f"), "data");

    ns.write_conf(&[&t], "USE_BACKUPS=no");
    ns.asd_ok(&["sync"]);
    assert!(
        !ns.inside(&ns.data().join(".t-backup_asd-old")).exists(),
        "no start clone without backups"
    );
    ns.drop_all_mounts();
    ns.asd_ok(&["sync"]);
    assert!(snaps(&ns).is_empty(), "USE_BACKUPS=no makes no snapshots");
    ns.asd_ok(&["unsync"]);
}

/// While running, asd works from its config snapshot: a target removed from the file is still
/// written back at unsync.
#[test]
fn unsync_uses_the_config_snapshot() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let a = ns.data().join("a");
    let b = ns.data().join("b");
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::create_dir(&b).expect("mkdir");
    ns.write_conf(&[&a, &b], "");
    ns.asd_ok(&["sync"]);
    std::fs::write(ns.inside(&b.join("late")), "late").expect("write");
    ns.write_conf(&[&a], "");
    ns.asd_ok(&["unsync"]);
    assert_eq!(
        std::fs::read_to_string(b.join("late")).expect("written back"),
        "late"
    );
    assert!(ns.our_mounts().is_empty());
}

/// Two commands at once: the second waits for the lock instead of interleaving.
#[test]
fn concurrent_commands_are_serialised() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    for i in 0..2000 {
        std::fs::write(t.join(format!("f{i}")), vec![b'a'; 20_000]).expect("write");
    }
    ns.write_conf(&[&t], "");
    ns.asd_ok(&["sync"]);
    for i in 0..2000 {
        std::fs::write(ns.inside(&t.join(format!("f{i}"))), vec![b'b'; 20_000]).expect("write");
    }
    let children: Vec<_> = (0..3)
        .map(|_| ns.asd_cmd(&["resync"]).output_async())
        .collect();
    let mut unsync = ns.asd_cmd(&["unsync"]).spawn().expect("spawn");
    for c in children {
        let out = c.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        // A resync that got the lock after the unsync finds asd stopped, and says so.
        assert!(
            out.status.success() || err.contains("asd is not running"),
            "{err}"
        );
    }
    assert!(unsync.wait().expect("wait").success());
    assert!(ns.our_mounts().is_empty());
    for i in (0..2000).step_by(97) {
        assert_eq!(
            std::fs::read(t.join(format!("f{i}"))).expect("f"),
            vec![b'b'; 20_000]
        );
    }
}

trait Spawn {
    fn output_async(&mut self) -> std::process::Child;
}

impl Spawn for std::process::Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    }
}

/// `asd daemon`: syncs, writes back every RESYNC_INTERVAL, answers `asd resync` from another
/// shell, and on SIGTERM unsyncs and exits 0.
#[test]
fn daemon_resyncs_on_interval_and_unsyncs_on_sigterm() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("t");
    std::fs::create_dir(&t).expect("mkdir");
    ns.write_conf(&[&t], "RESYNC_INTERVAL=1s");
    let mut daemon = ns.asd_cmd(&["daemon"]).spawn().expect("daemon");
    let backup = ns.data().join(".t-backup_asd");
    let wait_for = |what: &dyn Fn() -> bool, msg: &str| {
        for _ in 0..100 {
            if what() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("timed out waiting: {msg}");
    };
    wait_for(&|| ns.statfs_type(&t) == "tmpfs", "the daemon syncs");
    std::fs::write(ns.inside(&t.join("a")), "a").expect("write");
    wait_for(
        &|| ns.inside(&backup.join("a")).exists(),
        "the interval resync writes it back",
    );
    let out = ns.asd_ok(&["resync"]);
    assert!(out.contains("resync successful"), "{out}");
    std::fs::write(ns.inside(&t.join("b")), "b").expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let st = daemon.wait().expect("wait");
    assert!(st.success(), "SIGTERM ends the daemon with 0: {st:?}");
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(t.join("b")).expect("b on disk"),
        "b"
    );
}
