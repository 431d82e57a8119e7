//! The helper's normal path: a sync in copy mode and in overlay mode (also on a shared root),
//! a restarted helper that still knows its mounts, socket activation, capabilities, the log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn mount_line_has(line: &str, opt: &str) -> bool {
    line.split(' ')
        .nth(5)
        .is_some_and(|o| o.split(',').any(|x| x == opt))
}

#[test]
fn copy_mode_cycle() {
    if !root_or_skip("copy_mode_cycle") {
        return;
    }
    let alice = user("alice");
    let h = Helper::start();
    let vol = volatile();
    let scratch = Scratch::new(&alice, "copy");
    let target = dir_of(&alice, &scratch.path.join("data"));
    std::fs::write(target.join("f"), "disk").unwrap();
    chown(&target.join("f"), &alice);

    let area = h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let area_path = vol.path.join("asd-alice");
    assert_eq!(area["area"], area_path.to_str().unwrap());
    let md = std::fs::symlink_metadata(&area_path).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (md.uid(), md.permissions().mode() & 0o7777),
        (alice.uid, 0o700)
    );

    let r = h.ok(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
    );
    let backup = scratch.path.join(".data-backup_asd");
    assert_eq!(r["backup"], backup.to_str().unwrap());
    assert_eq!(owner(&backup), alice.uid);
    // The volatile copy is the caller's to fill.
    let vcopy = format!("{}{}", area_path.display(), target.display());
    let out = run(as_user(&alice, "sh").args([
        "-c",
        &format!(
            "mkdir -p {vcopy} && cp -a {}/. {vcopy}/ && echo ram > {vcopy}/f",
            backup.display()
        ),
    ]));
    assert!(out.status.success(), "{out:?}");
    let r = h.ok(&alice, "Cover", json!({"target": target, "mode": "copy"}));
    assert_eq!(r["volatile"], vcopy.as_str());

    // Inside the namespace: the target shows the volatile copy, the backup the disk.
    assert_eq!(
        std::fs::read_to_string(h.inside(&target).join("f")).unwrap(),
        "ram\n"
    );
    assert_eq!(
        std::fs::read_to_string(h.inside(&backup).join("f")).unwrap(),
        "disk"
    );
    let lines = h.mounts_under(&scratch.path);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(
            mount_line_has(l, "nosuid") && mount_line_has(l, "nodev"),
            "{l}"
        );
        // Private: no "shared:" or "master:" optional field.
        assert!(!l.contains("shared:") && !l.contains("master:"), "{l}");
    }
    let list = h.ok(&alice, "ListMounts", json!({}));
    assert_eq!(list["mounts"][0]["covered"], true);
    assert_eq!(list["mounts"][0]["mode"], "copy");

    let r = h.ok(&alice, "Detach", json!({"target": target}));
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 2);
    assert_eq!(r["removed"][0], backup.to_str().unwrap());
    assert!(h.mounts_under(&scratch.path).is_empty());
    assert!(!backup.exists());
    assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "disk");
    assert!(h.ok(&alice, "ListMounts", json!({}))["mounts"]
        .as_array()
        .unwrap()
        .is_empty());
    // The decision log: one line per call, with uid, method, target and result.
    let log = h.log_text();
    assert!(
        log.contains(&format!(
            "uid={} method=BindBackup target={:?} result=ok",
            alice.uid,
            target.to_str().unwrap()
        )),
        "{log}"
    );
}

fn overlay_cycle(propagation: &'static str) {
    let alice = user("alice");
    let h = Helper::start_with(HelperOpts {
        propagation,
        ..HelperOpts::default()
    });
    let vol = volatile();
    let scratch = Scratch::new(&alice, "overlay");
    let target = dir_of(&alice, &scratch.path.join(".cache"));
    chmod(&target, 0o750);
    let sub = dir_of(&alice, &target.join("sub"));
    for (p, c) in [(target.join("a"), "a"), (sub.join("b"), "b")] {
        std::fs::write(&p, c).unwrap();
        chown(&p, &alice);
    }
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let r = h.ok(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "overlay"}),
    );
    let backup = scratch.path.join(".cache-backup_asd");
    assert_eq!(r["backup"], backup.to_str().unwrap());
    let ov = h.ok(&alice, "MountOverlay", json!({"target": target}));
    let area = vol.path.join("asd-alice");
    let rel = target.strip_prefix("/").unwrap();
    assert_eq!(ov["volatile"], area.join(rel).to_str().unwrap());
    assert_eq!(ov["upper"], format!("{}-rw", area.join(rel).display()));
    assert_eq!(ov["work"], area.join(".work").join(rel).to_str().unwrap());
    h.ok(
        &alice,
        "Cover",
        json!({"target": target, "mode": "overlay"}),
    );

    // Writes through the target land in the upper layer, as alice's files.
    let out = h.sh_as(
        &alice,
        &format!(
            "cd {} && echo new > c && rm a && rm -r sub && mkdir sub && stat -c %a .",
            target.display()
        ),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "750",
        "overlay root keeps the target's mode"
    );
    let upper = Path::new(ov["upper"].as_str().unwrap()).to_path_buf();
    assert_eq!(owner(&upper.join("c")), alice.uid);
    assert_eq!(
        owner(&upper.join("a")),
        alice.uid,
        "whiteout belongs to the caller"
    );
    assert!(xattr_names(&upper.join("sub")).contains(&"user.overlay.opaque".to_string()));
    // The original (lower) is untouched, and the cover did not propagate onto the backup.
    assert_eq!(listing(&h.inside(&backup)), vec!["a", "sub"]);
    assert_eq!(listing(&h.inside(&backup).join("sub")), vec!["b"]);
    for l in h
        .mounts_under(&scratch.path)
        .iter()
        .chain(h.mounts_under(&area).iter())
    {
        assert!(
            mount_line_has(l, "nosuid") && mount_line_has(l, "nodev"),
            "{l}"
        );
    }
    assert_eq!(h.mounts_under(&scratch.path).len(), 2, "{}", h.mountinfo());
    let r = h.ok(&alice, "Detach", json!({"target": target}));
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 3);
    assert!(h.mounts_under(&scratch.path).is_empty());
    assert!(h.mounts_under(&vol.path).is_empty());
    assert_eq!(listing(&target), vec!["a", "sub"]);
    assert!(!backup.exists());
    // Everything in the area is alice's: she can clean it up herself.
    let out = run(as_user(&alice, "sh").args([
        "-c",
        &format!(
            "chmod -R u+rwx {0} && rm -rf {0}/.work {0}/{1}",
            area.display(),
            rel.components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
        ),
    ]));
    assert!(out.status.success(), "{out:?}");
}

fn xattr_names(p: &Path) -> Vec<String> {
    xattr_list(p)
}

fn xattr_list(p: &Path) -> Vec<String> {
    let out = run(std::process::Command::new(PYTHON).args([
        "-c",
        "import os,sys; print('\\n'.join(os.listxattr(sys.argv[1], follow_symlinks=False)))",
        p.to_str().unwrap(),
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn overlay_mode_cycle() {
    if !root_or_skip("overlay_mode_cycle") {
        return;
    }
    overlay_cycle("private");
}

#[test]
fn overlay_mode_cycle_on_a_shared_root() {
    if !root_or_skip("overlay_mode_cycle_on_a_shared_root") {
        return;
    }
    overlay_cycle("shared");
}

#[test]
fn copy_mode_on_a_shared_root_does_not_propagate_onto_the_backup() {
    if !root_or_skip("copy_mode_on_a_shared_root") {
        return;
    }
    let alice = user("alice");
    let h = Helper::start_with(HelperOpts {
        propagation: "shared",
        ..HelperOpts::default()
    });
    let vol = volatile();
    let scratch = Scratch::new(&alice, "shared");
    let target = dir_of(&alice, &scratch.path.join("t"));
    std::fs::write(target.join("disk"), "").unwrap();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
    );
    let vcopy = vol
        .path
        .join("asd-alice")
        .join(target.strip_prefix("/").unwrap());
    let out = run(as_user(&alice, "sh").args([
        "-c",
        &format!("mkdir -p {0} && touch {0}/ram", vcopy.display()),
    ]));
    assert!(out.status.success());
    h.ok(&alice, "Cover", json!({"target": target, "mode": "copy"}));
    assert_eq!(listing(&h.inside(&target)), vec!["ram"]);
    assert_eq!(
        listing(&h.inside(&scratch.path.join(".t-backup_asd"))),
        vec!["disk"]
    );
    assert_eq!(h.mounts_under(&scratch.path).len(), 2, "{}", h.mountinfo());
    h.ok(&alice, "Detach", json!({"target": target}));
    assert!(h.mounts_under(&scratch.path).is_empty());
}

#[test]
fn a_restarted_helper_still_knows_what_it_mounted() {
    if !root_or_skip("a_restarted_helper_still_knows_what_it_mounted") {
        return;
    }
    let alice = user("alice");
    let mut h = Helper::start();
    let vol = volatile();
    let scratch = Scratch::new(&alice, "restart");
    let target = dir_of(&alice, &scratch.path.join("t"));
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "overlay"}),
    );
    h.ok(&alice, "MountOverlay", json!({"target": target}));
    h.restart();
    let list = h.ok(&alice, "ListMounts", json!({}));
    assert_eq!(list["mounts"][0]["target"], target.to_str().unwrap());
    assert_eq!(list["mounts"][0]["overlay_mounted"], true);
    // The records are root-only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&h.state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    h.ok(
        &alice,
        "Cover",
        json!({"target": target, "mode": "overlay"}),
    );
    h.restart();
    let r = h.ok(&alice, "Detach", json!({"target": target}));
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 3);
    assert!(h.mounts_under(&scratch.path).is_empty());
    assert!(h.mounts_under(&vol.path).is_empty());
}

#[test]
fn freeze_makes_the_cover_read_only_for_its_owner_only() {
    if !root_or_skip("freeze_makes_the_cover_read_only_for_its_owner_only") {
        return;
    }
    let alice = user("alice");
    let bob = user("bob");
    let h = Helper::start();
    let vol = volatile();
    let scratch = Scratch::new(&alice, "freeze");
    let target = dir_of(&alice, &scratch.path.join("data"));
    let t = target.to_str().unwrap();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(&bob, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(&alice, "BindBackup", json!({"target": t, "mode": "copy"}));
    let vcopy = format!("{}/asd-alice{t}", vol.path.display());
    let out = h.sh_as(&alice, &format!("mkdir -p {vcopy}"));
    assert!(out.status.success(), "{out:?}");
    // Nothing to freeze before the cover; bob has no such target; a string is not a bool.
    h.err(
        &alice,
        "Freeze",
        json!({"target": t, "frozen": true}),
        "WrongState",
    );
    h.ok(&alice, "Cover", json!({"target": t, "mode": "copy"}));
    h.err(
        &bob,
        "Freeze",
        json!({"target": t, "frozen": true}),
        "NotMounted",
    );
    h.err(
        &alice,
        "Freeze",
        json!({"target": t, "frozen": "yes"}),
        "org.varlink.service.InvalidParameter",
    );
    let write = |name: &str| h.sh_as(&alice, &format!("echo x > {t}/{name}"));
    assert!(write("before").status.success());

    let r = h.ok(&alice, "Freeze", json!({"target": t, "frozen": true}));
    assert_eq!(r["frozen"], true);
    let out = write("during");
    assert!(!out.status.success(), "a write went through a frozen cover");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
    let cover = h
        .mounts_under(&scratch.path)
        .into_iter()
        .find(|l| l.split(' ').nth(4) == Some(t))
        .expect("the cover is mounted");
    assert!(mount_line_has(&cover, "ro"), "{cover}");
    // The volatile copy itself, and the backup, stay as they were.
    assert!(h
        .sh_as(&alice, &format!("echo x > {vcopy}/direct"))
        .status
        .success());

    let r = h.ok(&alice, "Freeze", json!({"target": t, "frozen": false}));
    assert_eq!(r["frozen"], false);
    assert!(write("after").status.success());

    // A file open for writing on the cover: it stays writable, and says so.
    let held = std::fs::OpenOptions::new()
        .append(true)
        .open(h.inside(&target).join("after"))
        .unwrap();
    let r = h.ok(&alice, "Freeze", json!({"target": t, "frozen": true}));
    assert_eq!(r["frozen"], false);
    assert!(write("still").status.success());
    drop(held);

    // A cover in use is not taken down (lazily, a program's later writes would go to a copy
    // that is then thrown away): Detach fails with EBUSY and changes nothing.
    let held = std::fs::OpenOptions::new()
        .append(true)
        .open(h.inside(&target).join("after"))
        .unwrap();
    let r = h.call(&alice, "Detach", json!({"target": t}));
    assert_eq!(r["error"], "io.asd.Helper.SystemError", "{r}");
    assert_eq!(r["parameters"]["errno"], libc::EBUSY, "{r}");
    assert_eq!(h.mounts_under(&scratch.path).len(), 2);
    assert_eq!(
        h.ok(&alice, "ListMounts", json!({}))["mounts"][0]["covered"],
        true
    );
    drop(held);

    // A frozen cover comes down like any other.
    assert_eq!(
        h.ok(&alice, "Freeze", json!({"target": t, "frozen": true}))["frozen"],
        true
    );
    let r = h.ok(&alice, "Detach", json!({"target": t}));
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 2);
    assert!(h.mounts_under(&scratch.path).is_empty());
    let log = h.log_text();
    assert!(
        log.contains(&format!(
            "uid={} method=Freeze target={t:?} result=ok",
            alice.uid
        )),
        "{log}"
    );
}

#[test]
fn keeps_only_the_capabilities_it_needs() {
    if !root_or_skip("keeps_only_the_capabilities_it_needs") {
        return;
    }
    let h = Helper::start();
    // The socket accepts connections only after the drop; a served call shows it is serving.
    let alice = user("alice");
    h.ok(&alice, "ListMounts", json!({}));
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.helper_pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap()
    };
    // CAP_SETGID(6) CAP_SETUID(7) CAP_SYS_ADMIN(21); permitted adds DAC_OVERRIDE(1). No
    // CAP_CHOWN(0): what the helper makes for a caller is made as the caller.
    assert_eq!(field("CapEff:"), "00000000002000c0");
    assert_eq!(field("CapPrm:"), "00000000002000c2");
    assert_eq!(field("CapBnd:"), "00000000002000c2");
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
}

#[test]
fn socket_is_world_connectable_and_blocking_client_works() {
    if !root_or_skip("socket_is_world_connectable_and_blocking_client_works") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let h = Helper::start();
    assert_eq!(
        std::fs::metadata(&h.sock).unwrap().permissions().mode() & 0o777,
        0o666
    );
    // The protocol crate's blocking client, typed.
    let mut c = asd_protocol::client::Client::connect(&h.sock).unwrap();
    let info = c.get_info().unwrap();
    assert_eq!(
        info.interfaces,
        vec!["org.varlink.service", "io.asd.Helper"]
    );
    assert_eq!(
        c.get_interface_description("io.asd.Helper").unwrap(),
        asd_protocol::HELPER_IDL
    );
    let e = c.detach(Path::new("/nowhere")).unwrap_err();
    assert!(
        matches!(
            e.service(),
            Some(asd_protocol::ServiceError::NotMounted { .. })
        ),
        "{e}"
    );
    let e = c
        .call(asd_protocol::Method::BindBackup {
            target: "rel".into(),
            mode: asd_protocol::Mode::Copy,
        })
        .unwrap_err();
    assert!(
        matches!(
            e.service(),
            Some(asd_protocol::ServiceError::InvalidPath { .. })
        ),
        "{e}"
    );
    assert!(c.list_mounts().unwrap().mounts.is_empty());
}

#[test]
fn socket_activation_and_exit_when_idle() {
    if !root_or_skip("socket_activation_and_exit_when_idle") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("asd-helper-sa"));
    std::fs::create_dir(&dir).unwrap();
    let sock = dir.join("sock");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(format!(
            "--setenv=ASD_HELPER_STATE_DIR={}",
            dir.join("state").display()
        ))
        .args([HELPER, "--exit-idle", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut c = asd_protocol::client::Client::connect(&sock).unwrap();
    assert_eq!(c.get_info().unwrap().product, "asd-helper");
    drop(c);
    // With no connection left it exits after the idle period.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the socket-activated helper did not exit when idle"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
