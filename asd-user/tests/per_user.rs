//! Per-user mode end to end: unprivileged asd managers of two real users ask a real asd-helper
//! (started in the test's mount namespace on its own socket) for their mounts (issue 4).

mod common;
use common::world::World;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[test]
fn alice_syncs_her_home_dir_through_the_helper() {
    let Some(w) = World::new() else { return };
    let (uid, target, conf) = w.user_setup("asdalice", "work-a");
    let out = w.asd_as_ok("asdalice", &conf, &["sync"]);
    assert!(out.contains("sync successful"), "{out}");
    assert_eq!(w.ns.statfs_type(&target), "tmpfs");
    let p = asd::paths::TargetPaths::new(&target, "asdalice", &w.ns.vol()).expect("paths");
    let listing = w.ns.sh_ok(&format!(
        "find '{}' -printf '%U %p\\n'",
        p.user_area.display()
    ));
    assert!(
        listing.lines().all(|l| l.starts_with(&format!("{uid} "))),
        "{listing}"
    );
    let area = std::fs::metadata(w.ns.inside(&p.user_area)).expect("area");
    assert_eq!(area.permissions().mode() & 0o777, 0o700);
    let pv = w.asd_as_ok("asdalice", &conf, &["preview"]);
    assert!(
        pv.contains("in RAM: yes") && pv.contains("the asd helper answers"),
        "{pv}"
    );

    w.ns.sh_ok(&format!(
        "su asdalice -s /bin/sh -c 'echo mine > {}/new'",
        target.display()
    ));
    w.asd_as_ok("asdalice", &conf, &["resync"]);
    let m = std::fs::metadata(w.ns.inside(&p.backup.join("new"))).expect("written back");
    assert_eq!(m.uid(), uid);
    let out = w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert!(
        !out.contains("read-only"),
        "the cover was not frozen: {out}"
    );
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
    // The last write-back ran behind a read-only cover, made so by the helper.
    let log = std::fs::read_to_string(&w.log).expect("helper log");
    assert!(
        log.contains(&format!(
            "uid={uid} method=Freeze target={:?} result=ok",
            target.to_str().expect("utf-8")
        )),
        "{log}"
    );
    let mounted_home: Vec<String> =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", w.ns.pid))
            .expect("mountinfo")
            .lines()
            .filter(|l| l.contains("/home/asdalice"))
            .map(str::to_string)
            .collect();
    assert!(mounted_home.is_empty(), "left mounted: {mounted_home:?}");
    assert_eq!(
        std::fs::read_to_string(target.join("new")).expect("on disk"),
        "mine\n"
    );
    assert!(!p.backup.exists() && !p.old.exists());
}

#[test]
fn alice_and_bob_at_once_and_apart() {
    let Some(w) = World::new() else { return };
    let (_, ta, ca) = w.user_setup("asdalice", "work-b");
    let (_, tb, cb) = w.user_setup("asdbob", "work-b");
    std::thread::scope(|s| {
        let a = s.spawn(|| w.asd_as_ok("asdalice", &ca, &["sync"]));
        let b = s.spawn(|| w.asd_as_ok("asdbob", &cb, &["sync"]));
        a.join().expect("alice");
        b.join().expect("bob");
    });
    assert_eq!(w.ns.statfs_type(&ta), "tmpfs");
    assert_eq!(w.ns.statfs_type(&tb), "tmpfs");
    // bob cannot look into alice's RAM area.
    let area_a = w.ns.vol().join("asd-asdalice");
    let peek = w.ns.sh(&format!(
        "su asdbob -s /bin/sh -c 'ls {}'",
        area_a.display()
    ));
    assert!(!peek.status.success(), "bob could read alice's area");
    w.asd_as_ok("asdbob", &cb, &["unsync"]);
    // bob (stopped) asking for alice's target is refused, and nothing of hers changes.
    let evil = w.ns.root.join("bob-evil.conf");
    std::fs::write(
        &evil,
        format!(
            "WHATTOSYNC=('{}')\nVOLATILE='{}'\n",
            ta.display(),
            w.ns.vol().display()
        ),
    )
    .expect("conf");
    w.ns.sh_ok(&format!("chown asdbob: '{}'", evil.display()));
    let out = w.asd_as("asdbob", &evil, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // alice's home is private (0700): bob's asd cannot even reach her target.
    assert!(
        !out.status.success() && err.contains("cannot be reached by you"),
        "{err}"
    );
    assert_eq!(
        w.ns.statfs_type(&ta),
        "tmpfs",
        "alice's target is still hers, in RAM"
    );
    w.asd_as_ok("asdalice", &ca, &["unsync"]);
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(ta.join("sub/f")).expect("alice data"),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(tb.join("sub/f")).expect("bob data"),
        "hello\n"
    );
}

#[test]
fn unreachable_helper_is_explained() {
    let Some(w) = World::new() else { return };
    let (_, _target, conf) = w.user_setup("asdalice", "work-c");
    let mut c = w.ns.cmd("setpriv");
    c.args([
        "--reuid",
        "asdalice",
        "--regid",
        "asdalice",
        "--init-groups",
        "--",
        "env",
        "-i",
    ])
    .arg("HOME=/home/asdalice")
    .arg(format!(
        "XDG_RUNTIME_DIR={}",
        w.ns.root.join("xdg-asdalice").display()
    ))
    .arg(format!(
        "ASD_HELPER_SOCKET={}",
        w.ns.root.join("nothing-here.sock").display()
    ))
    .arg(format!("ASDCONF={}", conf.display()))
    .arg(ASD)
    .arg("sync");
    let out = c.output().expect("asd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("systemctl enable --now asd-helper.socket"),
        "{err}"
    );
    assert!(w.ns.our_mounts().is_empty());
}

#[test]
fn alice_in_overlay_mode_through_the_helper() {
    let Some(w) = World::new() else { return };
    let (uid, target, conf) = w.user_setup("asdalice", "work-o");
    let text = std::fs::read_to_string(&conf).expect("conf") + "USE_OVERLAYFS=yes\n";
    std::fs::write(&conf, text).expect("conf");
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    assert_eq!(w.ns.statfs_type(&target), "overlayfs");
    w.ns.sh_ok(&format!(
        "su asdalice -s /bin/sh -c 'echo o > {t}/new && rm {t}/sub/f && mkdir {t}/d'",
        t = target.display()
    ));
    w.asd_as_ok("asdalice", &conf, &["resync"]);
    let p = asd::paths::TargetPaths::new(&target, "asdalice", &w.ns.vol()).expect("paths");
    let upper = w.ns.sh_ok(&format!(
        "find '{}' -printf '%U\\n' | sort -u",
        p.upper.display()
    ));
    assert_eq!(upper.trim(), uid.to_string(), "the upper layer is alice's");
    w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(target.join("new")).expect("new"),
        "o\n"
    );
    assert!(!target.join("sub/f").exists() && target.join("d").is_dir());
    assert!(!w.ns.inside(&p.user_area).exists(), "area left behind");
}

/// A program of alice's still writing in her target at unsync: the helper does not take the
/// cover down under it (lazily, its later writes would be lost with the RAM copy), so unsync
/// writes everything back, leaves the target in RAM and says why; once the program is gone,
/// unsync finishes and its last write is on disk.
#[test]
fn busy_target_stays_in_ram_until_its_writer_is_gone() {
    let Some(w) = World::new() else { return };
    let (_, target, conf) = w.user_setup("asdalice", "work-busy");
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    let go = w.ns.root.join("go-busy");
    let log = target.join("sub/f");
    let mut writer = w
        .ns
        .cmd("setpriv")
        .args([
            "--reuid",
            "asdalice",
            "--regid",
            "asdalice",
            "--init-groups",
            "--",
            "timeout",
            "120",
            "sh",
            "-c",
        ])
        .arg(format!(
            "exec 3>>'{log}'; echo held >&3; while [ ! -e '{go}' ]; do sleep 0.05; done; echo last >&3",
            log = log.display(),
            go = go.display()
        ))
        .spawn()
        .expect("writer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(w.ns.inside(&log))
        .unwrap_or_default()
        .contains("held")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = w.asd_as("asdalice", &conf, &["unsync"]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "unsync of a busy target must fail");
    assert!(text.contains("busy"), "{text}");
    assert_eq!(w.ns.statfs_type(&target), "tmpfs", "still in RAM");
    std::fs::write(&go, "").expect("go");
    assert!(writer.wait().expect("writer").success());
    w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(&log).expect("on disk"),
        "hello\nheld\nlast\n"
    );
}

/// Whatever sits on the backup path once it is no longer the bind asd made (here: the bind
/// was detached and a tmpfs mounted there instead, as a stray mount or a confused admin might),
/// asd never writes the user's data into it: resync refuses, and the next unsync brings the
/// RAM copy back to the target's own directory, then names the foreign mount in one line.
#[test]
fn nothing_is_written_into_a_backup_path_that_is_not_asds_mount() {
    let Some(w) = World::new() else { return };
    let (_, target, conf) = w.user_setup("asdalice", "work-foreign");
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    let p = asd::paths::TargetPaths::new(&target, "asdalice", &w.ns.vol()).expect("paths");
    w.ns.sh_ok(&format!(
        "su asdalice -s /bin/sh -c 'echo in-ram > {}/new'",
        target.display()
    ));
    w.ns.sh_ok(&format!(
        "umount -l '{b}' && mount -t tmpfs -o mode=0777 foreign '{b}'",
        b = p.backup.display()
    ));
    let out = w.asd_as("asdalice", &conf, &["resync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resync into a foreign mount: {err}");
    assert!(
        !w.ns.inside(&p.backup.join("new")).exists(),
        "written into the foreign mount"
    );
    let out = w.asd_as("asdalice", &conf, &["unsync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("still mounted") && err.contains(&*p.backup.to_string_lossy()),
        "{err}"
    );
    assert!(
        !w.ns.inside(&p.backup.join("new")).exists(),
        "written into the foreign mount"
    );
    assert_eq!(
        std::fs::read_to_string(w.ns.inside(&target.join("new"))).expect("back on disk"),
        "in-ram\n"
    );
    // Once the admin takes the stray mount away, asd finishes by itself.
    w.ns.sh_ok(&format!("umount '{}'", p.backup.display()));
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert_eq!(
        std::fs::read_to_string(target.join("new")).expect("on disk"),
        "in-ram\n"
    );
    assert!(!p.backup.exists(), "the backup dir is left");
}

/// Ubuntu's homes are 0750: group members may list them, others not. Copy and overlay mode
/// work there too, and nothing is left beside the target.
#[test]
fn ubuntu_home_0750_in_both_modes() {
    let Some(w) = World::new() else { return };
    for (name, extra) in [
        ("work-ubu-copy", ""),
        ("work-ubu-overlay", "USE_OVERLAYFS=yes\n"),
    ] {
        let (_, target, conf) = w.user_setup("asdubu", name);
        let home = std::fs::metadata("/home/asdubu").expect("home");
        assert_eq!(home.permissions().mode() & 0o777, 0o750);
        let text = std::fs::read_to_string(&conf).expect("conf") + extra;
        std::fs::write(&conf, text).expect("conf");
        w.asd_as_ok("asdubu", &conf, &["sync"]);
        w.ns.sh_ok(&format!(
            "su asdubu -s /bin/sh -c 'echo 1 > {t}/a && rm {t}/sub/f'",
            t = target.display()
        ));
        w.asd_as_ok("asdubu", &conf, &["resync"]);
        w.ns.sh_ok(&format!(
            "su asdubu -s /bin/sh -c 'echo 2 > {t}/b'",
            t = target.display()
        ));
        w.asd_as_ok("asdubu", &conf, &["unsync"]);
        assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
        assert_eq!(std::fs::read_to_string(target.join("a")).expect("a"), "1\n");
        assert_eq!(std::fs::read_to_string(target.join("b")).expect("b"), "2\n");
        assert!(!target.join("sub/f").exists());
        let left: Vec<String> = std::fs::read_dir("/home/asdubu")
            .expect("home")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!(".{name}-backup_asd")))
            .collect();
        assert!(left.is_empty(), "left beside the target: {left:?}");
    }
}

/// A target outside the home is refused when polkit cannot be asked (no system bus here): one
/// line per target, naming the polkit rules example that is installed, and nothing is left.
#[test]
fn refusal_outside_home_is_said_once_and_names_the_rules_file() {
    let Some(w) = World::new() else { return };
    let (_, _, conf) = w.user_setup("asdalice", "work-out");
    let outside = w.ns.root.join("outside");
    w.ns.sh_ok(&format!(
        "mkdir -p '{o}' && chown asdalice: '{o}'",
        o = outside.display()
    ));
    std::fs::write(
        &conf,
        format!(
            "WHATTOSYNC=('{}')\nVOLATILE='{}'\n",
            outside.display(),
            w.ns.vol().display()
        ),
    )
    .expect("conf");
    let out = w.asd_as("asdalice", &conf, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("NotAuthorized") || l.contains("not allow") || l.contains("polkit"))
        .collect();
    assert_eq!(lines.len(), 1, "the refusal once per target: {err}");
    assert!(lines[0].contains("50-asd-helper.rules.example"), "{err}");
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
    let left: Vec<String> = std::fs::read_dir(&w.ns.root)
        .expect("scratch")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".outside-backup_asd"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A target whose parent only root may write (here a root-owned directory in alice's home; a
/// `/srv/alice` under a root-owned `/srv` is the same once polkit allows it): the start clone,
/// the change set and the crash-recovery snapshots beside it are made, renamed and removed for
/// her by the helper. Sync, resync, a power cut, recovery with a snapshot, unsync and `asd clean`
/// all work, in both modes, and nothing is left.
#[test]
fn parent_only_root_may_write() {
    let Some(mut w) = World::new() else { return };
    for (mode, extra) in [("copy", ""), ("overlay", "USE_OVERLAYFS=yes\n")] {
        let (_, _, conf) = w.user_setup("asdalice", &format!("work-rp-{mode}"));
        let parent = PathBuf::from(format!("/home/asdalice/rootparent-{mode}"));
        let _ = std::fs::remove_dir_all(&parent);
        let target = parent.join("t");
        w.ns.sh_ok(&format!(
            "mkdir -p '{t}' && chmod 0755 '{p}' && echo one > '{t}/one' && chown -R asdalice: '{t}'",
            p = parent.display(),
            t = target.display()
        ));
        std::fs::write(
            &conf,
            format!(
                "WHATTOSYNC=('{}')\nVOLATILE='{}'\n{extra}",
                target.display(),
                w.ns.vol().display()
            ),
        )
        .expect("conf");
        let denied = w.ns.sh(&format!(
            "su asdalice -s /bin/sh -c 'mkdir {}/x'",
            parent.display()
        ));
        assert!(
            !denied.status.success(),
            "the parent must not be hers to write"
        );
        w.asd_as_ok("asdalice", &conf, &["sync"]);
        w.ns.sh_ok(&format!(
            "su asdalice -s /bin/sh -c 'echo two > {}/two'",
            target.display()
        ));
        w.asd_as_ok("asdalice", &conf, &["resync"]);
        w.power_cut(&["asdalice"], false);
        let out = w.asd_as_ok("asdalice", &conf, &["sync"]);
        assert!(out.contains("recover"), "{out}");
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .expect("list")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let snapshots: Vec<String> = names(&parent)
            .into_iter()
            .filter(|n| n.ends_with(".tar.zstd"))
            .collect();
        assert_eq!(snapshots.len(), 1, "{:?}", names(&parent));
        let snap = std::fs::metadata(parent.join(&snapshots[0])).expect("snapshot");
        assert_eq!(snap.uid(), test_user("asdalice").0, "the snapshot is hers");
        w.asd_as_ok("asdalice", &conf, &["unsync"]);
        assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
        assert_eq!(
            std::fs::read_to_string(target.join("two")).expect("two"),
            "two\n"
        );
        let left: Vec<String> = names(&parent)
            .into_iter()
            .filter(|n| n != "t" && !n.ends_with(".tar.zstd"))
            .collect();
        assert!(left.is_empty(), "left beside the target: {left:?}");
        let out = w.asd_as_ok("asdalice", &conf, &["clean"]);
        assert_eq!(names(&parent), vec!["t".to_string()], "{out}");
        let _ = std::fs::remove_dir_all(&parent);
    }
}
