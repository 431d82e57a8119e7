//! Every attack on the helper, one test each: refused with a named error, nothing mounted,
//! created or deleted, and the helper still serving.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// alice with a prepared area, and bob.
struct World {
    h: Helper,
    vol: Scratch,
    alice: User,
    bob: User,
}

fn world() -> World {
    world_with(user("alice"))
}

/// alice with a home other users can enter: made by Debian's `useradd` without HOME_MODE
/// (0755). Only there can bob even name a directory of hers, which is what some attacks need;
/// with the default private homes he is stopped before the helper's own checks.
fn world_open_home() -> World {
    world_with(user_with_home_mode("alicedeb", 0o755))
}

fn world_with(alice: User) -> World {
    let bob = user("bob");
    let h = Helper::start();
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    h.ok(&bob, "PrepareArea", json!({"volatile": vol.path}));
    World { h, vol, alice, bob }
}

#[test]
fn bob_asks_for_alices_target() {
    if !root_or_skip("bob_asks_for_alices_target") {
        return;
    }
    let mut w = world_open_home();
    let scratch = Scratch::new(&w.alice, "victim");
    chmod(&scratch.path, 0o755);
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    let before = Untouched::take(&w.h, &[&scratch.path, &target]);
    for mode in ["copy", "overlay"] {
        w.h.err(
            &w.bob,
            "BindBackup",
            json!({"target": target, "mode": mode}),
            "NotOwner",
        );
    }
    // Behind a directory bob cannot enter, he cannot even name it.
    chmod(&scratch.path, 0o700);
    w.h.err(
        &w.bob,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
        "PermissionDenied",
    );
    // Once alice has mounted it, bob still cannot touch it.
    w.h.ok(
        &w.alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
    );
    let mounted = Untouched::take(&w.h, &[&scratch.path]);
    w.h.err(
        &w.bob,
        "Cover",
        json!({"target": target, "mode": "copy"}),
        "NotMounted",
    );
    w.h.err(
        &w.bob,
        "MountOverlay",
        json!({"target": target}),
        "NotMounted",
    );
    w.h.err(&w.bob, "Detach", json!({"target": target}), "NotMounted");
    mounted.check(&w.h);
    w.h.ok(&w.alice, "Detach", json!({"target": target}));
    before.check(&w.h);
    w.h.assert_serving();
}

#[test]
fn root_owned_and_system_directories() {
    if !root_or_skip("root_owned_and_system_directories") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "rootowned");
    let rootdir = scratch.path.join("rootdir");
    std::fs::create_dir(&rootdir).unwrap();
    let ext4 = dir_of(&w.alice, &scratch.path.join("vol-on-disk"));
    let before = Untouched::take(
        &w.h,
        &[
            &scratch.path,
            Path::new("/etc"),
            Path::new("/"),
            Path::new("/usr"),
        ],
    );
    for t in [
        "/etc",
        "/usr/share",
        "/root",
        "/var/tmp",
        "/proc/1",
        "/dev/shm",
        "/tmp",
    ] {
        for user in [&w.alice, &w.bob] {
            let r =
                w.h.call(user, "BindBackup", json!({"target": t, "mode": "copy"}));
            let e = r["error"].as_str().unwrap_or_default();
            // (/dev/shm also holds the callers' areas: refused as overlapping them.)
            assert!(
                e == "io.asd.Helper.NotOwner"
                    || e == "io.asd.Helper.PermissionDenied"
                    || (t == "/dev/shm" && e == "io.asd.Helper.Overlaps"),
                "{t}: {r}"
            );
        }
    }
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": rootdir, "mode": "copy"}),
        "NotOwner",
    );
    // /proc/self is a symlink; /proc/<pid> of her own process is hers but procfs.
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": "/proc/self", "mode": "copy"}),
        "SymlinkInPath",
    );
    let mut sleeper = as_user(&w.alice, "sleep")
        .arg("30")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let own = format!("/proc/{}", sleeper.id());
    // Until setpriv has switched to alice, /proc/PID is still root's.
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner(Path::new(&own)) != w.alice.uid {
        assert!(
            Instant::now() < deadline,
            "the sleeper did not become alice"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": own, "mode": "copy"}),
        "UnsupportedFilesystem",
    );
    assert_eq!(e["filesystem"], "proc");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": "/", "mode": "copy"}),
        "InvalidPath",
    );
    // A VOLATILE that is not tmpfs, or is someone else's.
    w.h.err(
        &w.alice,
        "PrepareArea",
        json!({"volatile": ext4}),
        "VolatileRejected",
    );
    let bobs = dir_of(&w.bob, &w.vol.path.join(unique("bobs")));
    w.h.err(
        &w.alice,
        "PrepareArea",
        json!({"volatile": bobs}),
        "VolatileRejected",
    );
    w.h.err(
        &w.alice,
        "PrepareArea",
        json!({"volatile": "/proc"}),
        "VolatileRejected",
    );
    assert!(listing(&bobs).is_empty());
    before.check(&w.h);
    w.h.assert_serving();
}

#[test]
fn symlinks_as_target_or_in_a_parent() {
    if !root_or_skip("symlinks_as_target_or_in_a_parent") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "links");
    let real = dir_of(&w.alice, &scratch.path.join("real"));
    let inner = dir_of(&w.alice, &real.join("t"));
    let link = scratch.path.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(w.alice.uid), Some(w.alice.gid)).unwrap();
    let tlink = scratch.path.join("tlink");
    std::os::unix::fs::symlink(&inner, &tlink).unwrap();
    std::os::unix::fs::lchown(&tlink, Some(w.alice.uid), Some(w.alice.gid)).unwrap();
    // A link to a directory outside her control.
    let etc = scratch.path.join("etc");
    std::os::unix::fs::symlink("/etc", &etc).unwrap();
    let vlink = scratch.path.join("vlink");
    std::os::unix::fs::symlink(&w.vol.path, &vlink).unwrap();
    let before = Untouched::take(&w.h, &[&scratch.path, &real, Path::new("/etc")]);
    for (target, mode) in [
        (tlink.clone(), "copy"),
        (link.join("t"), "copy"),
        (link.join("t"), "overlay"),
        (etc.join("ssh"), "copy"),
        (etc.clone(), "copy"),
    ] {
        w.h.err(
            &w.alice,
            "BindBackup",
            json!({"target": target, "mode": mode}),
            "SymlinkInPath",
        );
    }
    // VOLATILE through a symlink.
    w.h.err(
        &w.alice,
        "PrepareArea",
        json!({"volatile": vlink}),
        "SymlinkInPath",
    );
    before.check(&w.h);
    // Detach or Cover through a symlink finds nothing of hers.
    w.h.err(
        &w.alice,
        "Detach",
        json!({"target": link.join("t")}),
        "NotMounted",
    );
    w.h.assert_serving();
}

/// bob owns a directory inside alice's target while it is in RAM (alice made room for him): a
/// mount of his there would keep her cover busy, so her unsync could never finish. Targets on
/// tmpfs or overlay (in RAM already, or inside another target) are refused.
#[test]
fn a_target_inside_another_users_cover_is_refused() {
    if !root_or_skip("a_target_inside_another_users_cover_is_refused") {
        return;
    }
    let mut w = world_open_home();
    let scratch = Scratch::new(&w.alice, "host");
    chmod(&scratch.path, 0o755);
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    chmod(&target, 0o755);
    let t = target.to_str().unwrap();
    w.h.ok(&w.alice, "BindBackup", json!({"target": t, "mode": "copy"}));
    let vcopy = format!("{}/asd-{}{t}", w.vol.path.display(), w.alice.name);
    let out =
        w.h.sh_as(&w.alice, &format!("mkdir -p {vcopy} && chmod 0755 {vcopy}"));
    assert!(out.status.success(), "{out:?}");
    w.h.ok(&w.alice, "Cover", json!({"target": t, "mode": "copy"}));
    let inner = h_dir_in_namespace(&w.h, &target.join("bobs"), &w.bob);
    for mode in ["copy", "overlay"] {
        let r = w.h.err(
            &w.bob,
            "BindBackup",
            json!({"target": inner, "mode": mode}),
            "UnsupportedFilesystem",
        );
        assert_eq!(r["filesystem"], "tmpfs", "{r:?}");
    }
    let r = w.h.ok(&w.alice, "Detach", json!({"target": t}));
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 2, "{r:?}");
    w.h.assert_serving();
}

/// A directory owned by `user` at `path` as seen inside the helper's namespace.
fn h_dir_in_namespace(h: &Helper, path: &Path, user: &User) -> String {
    let inside = h.inside(path);
    std::fs::create_dir(&inside).unwrap();
    chown(&inside, user);
    path.to_str().unwrap().to_string()
}

#[test]
fn relative_paths_and_dot_dot() {
    if !root_or_skip("relative_paths_and_dot_dot") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "rel");
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    let t = target.to_str().unwrap();
    let home = w.alice.home.to_str().unwrap();
    let before = Untouched::take(&w.h, &[&scratch.path, &w.alice.home]);
    let bad = [
        "t".to_string(),
        format!(".{t}"),
        t.trim_start_matches('/').to_string(),
        format!(
            "{home}/../alice/{}",
            target.strip_prefix(&w.alice.home).unwrap().display()
        ),
        format!("{t}/.."),
        format!("{t}/../t"),
        format!("{}/./t", scratch.path.display()),
        format!("{t}/"),
        format!("/{t}"),
        format!("{}//t", scratch.path.display()),
        String::new(),
        "/".into(),
        format!("{t}\u{0}x"),
    ];
    for b in &bad {
        for (m, p) in [
            ("BindBackup", json!({"target": b, "mode": "copy"})),
            ("MountOverlay", json!({"target": b})),
            ("Cover", json!({"target": b, "mode": "copy"})),
            ("Detach", json!({"target": b})),
            ("PrepareArea", json!({"volatile": b})),
        ] {
            w.h.err(&w.alice, m, p, "InvalidPath");
        }
    }
    before.check(&w.h);
    w.h.assert_serving();
}

#[test]
fn volatile_area_pre_created_by_another_user() {
    if !root_or_skip("volatile_area_pre_created_by_another_user") {
        return;
    }
    let alice = user("alice");
    let bob = user("bob");
    let mut h = Helper::start();
    // bob squats alice's area name.
    let vol = volatile();
    let squat = dir_of(&bob, &vol.path.join("asd-alice"));
    std::fs::write(squat.join("bait"), "").unwrap();
    let before = Untouched::take(&h, &[&vol.path, &squat]);
    let e = h.err(
        &alice,
        "PrepareArea",
        json!({"volatile": vol.path}),
        "AreaNotOwned",
    );
    assert!(
        e["reason"].as_str().unwrap().contains(&bob.uid.to_string()),
        "{e:?}"
    );
    before.check(&h);
    assert_eq!(owner(&squat), bob.uid);
    // ... or plants a symlink there, pointing into alice's home.
    let vol2 = volatile();
    let scratch = Scratch::new(&alice, "lure");
    std::os::unix::fs::symlink(&scratch.path, vol2.path.join("asd-alice")).unwrap();
    std::os::unix::fs::lchown(vol2.path.join("asd-alice"), Some(bob.uid), Some(bob.gid)).unwrap();
    let before = Untouched::take(&h, &[&vol2.path, &scratch.path]);
    let e = h.err(
        &alice,
        "PrepareArea",
        json!({"volatile": vol2.path}),
        "AreaNotOwned",
    );
    assert_eq!(e["reason"], "is a symlink");
    before.check(&h);
    // ... or a plain file.
    let vol3 = volatile();
    std::fs::write(vol3.path.join("asd-alice"), "").unwrap();
    h.err(
        &alice,
        "PrepareArea",
        json!({"volatile": vol3.path}),
        "AreaNotOwned",
    );
    // Without an area, nothing can be mounted.
    let target = dir_of(&alice, &scratch.path.join("t"));
    h.err(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
        "AreaNotPrepared",
    );
    h.assert_serving();
}

#[test]
fn overlay_whose_lower_the_caller_cannot_read() {
    if !root_or_skip("overlay_whose_lower_the_caller_cannot_read") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "unreadable");
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    std::fs::write(target.join("secret"), "x").unwrap();
    chmod(&target, 0o311);
    let before = Untouched::take(&w.h, &[&scratch.path, &w.vol.path.join("asd-alice")]);
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": target, "mode": "overlay"}),
        "LowerNotReadable",
    );
    before.check(&w.h);
    // Readable at BindBackup, unreadable by the time of MountOverlay.
    chmod(&target, 0o755);
    w.h.ok(
        &w.alice,
        "BindBackup",
        json!({"target": target, "mode": "overlay"}),
    );
    chmod(&target, 0o311);
    let mounted = Untouched::take(&w.h, &[]);
    w.h.err(
        &w.alice,
        "MountOverlay",
        json!({"target": target}),
        "LowerNotReadable",
    );
    mounted.check(&w.h);
    w.h.ok(&w.alice, "Detach", json!({"target": target}));
    before.check(&w.h);
    w.h.assert_serving();
}

#[test]
fn detaching_a_mount_the_caller_did_not_make() {
    if !root_or_skip("detaching_a_mount_the_caller_did_not_make") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "detach");
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    w.h.ok(
        &w.alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
    );
    let backup = scratch.path.join(".t-backup_asd");
    // A mount root made it, in the namespace: not the helper's.
    let other = dir_of(&w.alice, &scratch.path.join("other"));
    let owned_by_alice = format!("uid={},gid={}", w.alice.uid, w.alice.gid);
    run_ok(
        Command::new("nsenter")
            .arg("-t")
            .arg(w.h.ns_pid().to_string())
            .args([
                "-m",
                "--",
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &owned_by_alice,
                "none",
            ])
            .arg(&other),
    );
    let before = Untouched::take(&w.h, &[&scratch.path]);
    for (who, t) in [
        (&w.bob, target.to_str().unwrap().to_string()),
        (&w.bob, backup.to_str().unwrap().to_string()),
        (&w.alice, backup.to_str().unwrap().to_string()),
        (&w.alice, other.to_str().unwrap().to_string()),
        (&w.alice, "/proc".into()),
        (&w.bob, "/dev/shm".into()),
        (
            &w.alice,
            w.vol.path.join("asd-alice").to_str().unwrap().to_string(),
        ),
    ] {
        w.h.err(who, "Detach", json!({"target": t}), "NotMounted");
    }
    before.check(&w.h);
    // A target with a mount beneath it (or on it) is refused.
    let t2 = dir_of(&w.alice, &scratch.path.join("t2"));
    let sub = dir_of(&w.alice, &t2.join("fuse-like"));
    run_ok(
        Command::new("nsenter")
            .arg("-t")
            .arg(w.h.ns_pid().to_string())
            .args(["-m", "--", "mount", "-t", "tmpfs", "none"])
            .arg(&sub),
    );
    let e = w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": t2, "mode": "overlay"}),
        "MountsBelow",
    );
    assert_eq!(e["mountpoint"], sub.to_str().unwrap());
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": other, "mode": "copy"}),
        "MountsBelow",
    );
    w.h.ok(&w.alice, "Detach", json!({"target": target}));
    assert_eq!(w.h.mounts_under(&scratch.path).len(), 2); // root's two tmpfs mounts only
    w.h.assert_serving();
}

/// Races a parent (or the target) against a symlink with RENAME_EXCHANGE, while alice asks
/// for the target again and again. The helper must never mount or create anything at the
/// symlink's destination.
fn race(swap_parent: bool) {
    let mut w = world();
    let alice = w.alice.clone();
    let scratch = Scratch::new(&alice, "race");
    // The lure: a root-owned place with a directory alice owns inside (so that only following
    // the symlink could make the helper work there), and nothing she may create there.
    let lure = PathBuf::from("/srv").join(unique("asd-lure"));
    std::fs::create_dir_all(lure.join("p")).unwrap();
    let lure_t = dir_of(&alice, &lure.join("p/t"));
    let _lure_guard = Scratch::at(lure.clone());
    let real_p = dir_of(&alice, &scratch.path.join("p"));
    let target = dir_of(&alice, &real_p.join("t"));
    let (a, b) = if swap_parent {
        std::os::unix::fs::symlink(lure.join("p"), scratch.path.join("q")).unwrap();
        (scratch.path.join("p"), scratch.path.join("q"))
    } else {
        std::os::unix::fs::symlink(&lure_t, real_p.join("u")).unwrap();
        (real_p.join("t"), real_p.join("u"))
    };
    for l in [&a, &b] {
        std::os::unix::fs::lchown(l, Some(alice.uid), Some(alice.gid)).unwrap();
    }
    let lure_dirs: Vec<PathBuf> = vec![lure.clone(), lure.join("p"), lure_t.clone()];
    let lure_before: Vec<Vec<String>> = lure_dirs.iter().map(|d| listing(d)).collect();
    let lure_untouched = |h: &Helper| {
        for m in h.mount_points() {
            assert!(
                !m.starts_with(lure.to_str().unwrap()),
                "mounted at the lure: {m}"
            );
        }
        let now: Vec<Vec<String>> = lure_dirs.iter().map(|d| listing(d)).collect();
        assert_eq!(
            now, lure_before,
            "something was created or deleted at the lure"
        );
    };
    let swapper_src = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
stop = sys.argv[3]
end = time.time() + 120
n = 0
while time.time() < end and not os.path.exists(stop):
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit("renameat2: %d" % ctypes.get_errno())
    n += 1
# Leave the real directory in place.
if os.path.islink(sys.argv[1]):
    libc.renameat2(-100, a, -100, b, 2)
print(n)
"#;
    // The swapper runs until the attempts are done (a file it cannot miss says so).
    let stop = w.h.dir.join(format!("stop-{}", unique("race")));
    let swapper = as_user(&alice, PYTHON)
        .args([
            "-c",
            swapper_src,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            stop.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut ok, mut refused) = (0, 0);
    // At least 7 s and 25 attempts, however slow a loaded machine makes each one.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(7)
        || (ok + refused < 25 && start.elapsed() < Duration::from_secs(120))
    {
        let r = w.h.call(
            &alice,
            "BindBackup",
            json!({"target": target, "mode": "overlay"}),
        );
        match r.get("error").and_then(|e| e.as_str()) {
            None => {
                ok += 1;
                // Wherever it landed, it is inside alice's scratch dir.
                for l in w.h.mountinfo().lines() {
                    let mp = l.split(' ').nth(4).unwrap_or_default();
                    if mp.contains("-backup_asd") {
                        assert!(mp.starts_with(scratch.path.to_str().unwrap()), "{l}");
                    }
                }
                let r = w.h.call(&alice, "Detach", json!({"target": target}));
                let _ = r; // may fail while the path is swapped; cleaned up below
            }
            Some(e) => {
                assert!(
                    [
                        "io.asd.Helper.SymlinkInPath",
                        "io.asd.Helper.NotFound",
                        "io.asd.Helper.NotADirectory",
                        "io.asd.Helper.AlreadyMounted",
                        "io.asd.Helper.BackupInUse",
                        "io.asd.Helper.NotAuthorized",
                    ]
                    .contains(&e),
                    "unexpected refusal: {r}"
                );
                refused += 1;
            }
        }
        lure_untouched(&w.h);
    }
    std::fs::write(&stop, "").unwrap();
    let out = swapper.wait_with_output().unwrap();
    assert!(out.status.success(), "swapper failed");
    eprintln!(
        "race (swap {}): {ok} mounted, {refused} refused, {} swaps",
        if swap_parent { "parent" } else { "target" },
        String::from_utf8_lossy(&out.stdout).trim()
    );
    // Clean up whatever is still recorded, now that the paths are still.
    let list = w.h.ok(&alice, "ListMounts", json!({}));
    for m in list["mounts"].as_array().unwrap() {
        w.h.ok(&alice, "Detach", json!({"target": m["target"]}));
    }
    assert!(
        w.h.mounts_under(&scratch.path).is_empty(),
        "{}",
        w.h.mountinfo()
    );
    lure_untouched(&w.h);
    assert!(ok + refused >= 25, "too few attempts: {}", ok + refused);
    w.h.assert_serving();
    drop(w.vol);
}

#[test]
fn parent_swapped_for_a_symlink_between_check_and_mount() {
    if !root_or_skip("parent_swapped_for_a_symlink_between_check_and_mount") {
        return;
    }
    race(true);
}

#[test]
fn target_swapped_for_a_symlink_between_check_and_mount() {
    if !root_or_skip("target_swapped_for_a_symlink_between_check_and_mount") {
        return;
    }
    race(false);
}

#[test]
fn two_hundred_idle_connections_do_not_stall_another_user() {
    if !root_or_skip("two_hundred_idle_connections_do_not_stall_another_user") {
        return;
    }
    let mut w = world();
    let hog_src = r#"
import socket, sys, select, time
path = sys.argv[1]
socks = []
for i in range(200):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
# Connections over the limit get an error and are closed; the others stay silent.
pending, refused = set(socks), 0
deadline = time.time() + 30
while pending and time.time() < deadline:
    ready, _, _ = select.select(list(pending), [], [], 1.0)
    if not ready and refused >= 184:
        break  # a second with nothing new: the rest are held open
    for s in ready:
        if b"io.asd.Helper.TooManyConnections" in s.recv(65536):
            refused += 1
        pending.discard(s)
print(refused, flush=True)
sys.stdin.read()
"#;
    let mut hog = as_user(&w.alice, PYTHON)
        .args(["-c", hog_src, w.h.sock.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut rd = std::io::BufReader::new(hog.stdout.as_mut().unwrap());
        rd.read_line(&mut line).unwrap();
    }
    assert_eq!(
        line.trim(),
        "184",
        "all but 16 of alice's 200 connections are refused"
    );
    // bob is served promptly while alice's 16 are held open.
    for _ in 0..5 {
        let t = Instant::now();
        let l = w.h.ok(&w.bob, "ListMounts", json!({}));
        assert!(l["mounts"].as_array().unwrap().is_empty());
        // A call is two process starts plus the round trip: seconds only if bob waited.
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "bob waited {:?}",
            t.elapsed()
        );
    }
    // alice herself is at her limit.
    w.h.err(&w.alice, "ListMounts", json!({}), "TooManyConnections");
    drop(hog.stdin.take());
    let _ = hog.wait();
    // Her slots come back once she disconnects.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = w.h.call(&w.alice, "ListMounts", json!({}));
        if r.get("error").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.h.assert_serving();
}

#[test]
fn a_client_that_disconnects_mid_request() {
    if !root_or_skip("a_client_that_disconnects_mid_request") {
        return;
    }
    let mut w = world();
    let scratch = Scratch::new(&w.alice, "hangup");
    let target = dir_of(&w.alice, &scratch.path.join("t"));
    // Half a message, then gone; a whole request, then gone before the reply.
    let src = r#"
import socket, sys, json
path, target = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX); s.connect(path)
s.sendall(b'{"method":"io.asd.Helper.BindBackup","parame'); s.close()
s = socket.socket(socket.AF_UNIX); s.connect(path)
s.sendall(json.dumps({"method": "io.asd.Helper.BindBackup", "parameters": {"target": target, "mode": "copy"}}).encode() + b"\0")
s.close()
"#;
    let out = run(as_user(&w.alice, PYTHON).args([
        "-c",
        src,
        w.h.sock.to_str().unwrap(),
        target.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{out:?}");
    // The request either completed (and is recorded) or did not happen; never half.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let l = w.h.ok(&w.alice, "ListMounts", json!({}));
        let n = l["mounts"].as_array().unwrap().len();
        let mounted = w.h.mounts_under(&scratch.path).len();
        if n == mounted && (n == 1 || Instant::now() > deadline) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if listed == 1 {
        w.h.ok(&w.alice, "Detach", json!({"target": target}));
    }
    assert!(w.h.mounts_under(&scratch.path).is_empty());
    assert_eq!(listing(&scratch.path), vec!["t"]);
    w.h.assert_serving();
}

#[test]
fn a_silent_connection_is_closed_after_the_idle_time() {
    if !root_or_skip("a_silent_connection_is_closed_after_the_idle_time") {
        return;
    }
    let mut h = Helper::start_with(HelperOpts {
        args: vec!["--idle-timeout".into(), "1".into()],
        ..HelperOpts::default()
    });
    let mut s = std::os::unix::net::UnixStream::connect(&h.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    // Half a message and then silence: closed too.
    use std::io::Write;
    s.write_all(b"{\"method\":").unwrap();
    assert!(read_reply(&mut s).is_none());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    h.assert_serving();
}

#[test]
fn a_stalled_request_times_out_without_stalling_the_helper() {
    if !root_or_skip("a_stalled_request_times_out_without_stalling_the_helper") {
        return;
    }
    // A "system bus" that accepts connections and never answers: the polkit check hangs.
    let dir = std::env::temp_dir().join(unique("asd-mute-bus"));
    std::fs::create_dir(&dir).unwrap();
    let bus = dir.join("bus");
    let mute = Command::new(PYTHON)
        .args([
            "-c",
            "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(64)\nc=[]\nwhile True: c.append(s.accept())",
            bus.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _mute = KillOnDrop(mute);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bus.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let alice = user("alice");
    let bob = user("bob");
    let mut h = Helper::start_with(HelperOpts {
        args: vec!["--request-timeout".into(), "1".into()],
        env: vec![(
            "DBUS_SYSTEM_BUS_ADDRESS".into(),
            format!("unix:path={}", bus.display()),
        )],
        ..HelperOpts::default()
    });
    let vol = volatile();
    h.ok(&alice, "PrepareArea", json!({"volatile": vol.path}));
    let scratch = Scratch::new(&alice, "stall");
    let target = dir_of(&alice, &scratch.path.join("t"));
    let t = Instant::now();
    h.err(
        &alice,
        "BindBackup",
        json!({"target": target, "mode": "copy"}),
        "Timeout",
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // Others are served meanwhile.
    let t = Instant::now();
    h.ok(&bob, "ListMounts", json!({}));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The request finishes in the background (polkit unreachable: home allowed) and is recorded.
    // Until then alice's own calls wait behind it (and may time out too).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = h.call(&alice, "ListMounts", json!({}));
        if l["parameters"]["mounts"]
            .as_array()
            .is_some_and(|m| m.len() == 1)
        {
            break;
        }
        if let Some(e) = l.get("error") {
            assert_eq!(e, "io.asd.Helper.Timeout", "{l}");
        }
        assert!(Instant::now() < deadline, "never recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(h.mounts_under(&scratch.path).len(), 1);
    // Detach does not ask polkit.
    h.ok(&alice, "Detach", json!({"target": target}));
    assert!(h.mounts_under(&scratch.path).is_empty());
    h.assert_serving();
    let _ = std::fs::remove_dir_all(&dir);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// MakeBeside, RenameBeside, RemoveBeside: the helper makes, renames and removes entries in a
/// parent only root may write, but only asd's own names for that one target, only where the
/// caller cannot, and only the caller's entries; never for someone else's target.
#[test]
fn beside_entries_only_asds_names_and_only_the_callers() {
    if !root_or_skip("beside_entries_only_asds_names_and_only_the_callers") {
        return;
    }
    let mut w = world_open_home();
    let scratch = Scratch::new(&w.alice, "beside");
    let parent = scratch.path.join("rootp");
    std::fs::create_dir(&parent).unwrap();
    chmod(&parent, 0o755);
    let target = dir_of(&w.alice, &parent.join("t"));
    let t = target.to_str().unwrap();
    let call = |name: &str, kind: &str| json!({"target": t, "name": name, "kind": kind});
    // alice: asd's own entries, given to her.
    w.h.ok(
        &w.alice,
        "MakeBeside",
        call(".t-backup_asd-old.partial", "dir"),
    );
    let made = std::fs::symlink_metadata(parent.join(".t-backup_asd-old.partial")).unwrap();
    assert_eq!((made.uid(), made.mode() & 0o7777), (w.alice.uid, 0o700));
    w.h.ok(
        &w.alice,
        "RenameBeside",
        json!({"target": t, "from": ".t-backup_asd-old.partial", "to": ".t-backup_asd-old"}),
    );
    let snap = ".t-backup_asd-crashrecovery-20261204_050000.tar.zstd";
    w.h.ok(&w.alice, "MakeBeside", call(snap, "file"));
    assert_eq!(
        std::fs::symlink_metadata(parent.join(snap)).unwrap().uid(),
        w.alice.uid
    );
    // Never over an existing entry.
    let snap2 = ".t-backup_asd-crashrecovery-20261204_050000_2.tar.zstd";
    w.h.ok(&w.alice, "MakeBeside", call(snap2, "file"));
    w.h.err(
        &w.alice,
        "RenameBeside",
        json!({"target": t, "from": snap2, "to": snap}),
        "SystemError",
    );
    w.h.ok(
        &w.alice,
        "RemoveBeside",
        json!({"target": t, "name": snap2}),
    );
    w.h.err(&w.alice, "MakeBeside", call(snap, "file"), "BackupInUse");
    // Names that are not asd's for this target.
    for bad in [
        "../x",
        "passwd",
        ".t-backup_asd",
        ".u-backup_asd-old",
        ".t-backup_asd-old/x",
        ".t-backup_asd-crashrecovery-x.tar.zstd",
    ] {
        w.h.err(&w.alice, "MakeBeside", call(bad, "dir"), "InvalidPath");
        w.h.err(
            &w.alice,
            "RemoveBeside",
            json!({"target": t, "name": bad}),
            "InvalidPath",
        );
    }
    // bob, for alice's target: refused, nothing made.
    let before = Untouched::take(&w.h, &[&parent]);
    w.h.err(
        &w.bob,
        "MakeBeside",
        call(".t-backup_asd-changes", "dir"),
        "NotAuthorized",
    );
    w.h.err(
        &w.bob,
        "RemoveBeside",
        json!({"target": t, "name": ".t-backup_asd-old"}),
        "NotAuthorized",
    );
    before.check(&w.h);
    // An entry with asd's name that is not alice's (root put it there) is not hers to remove
    // or rename.
    let roots = parent.join(".t-backup_asd-changes");
    std::fs::write(&roots, "root's").unwrap();
    w.h.err(
        &w.alice,
        "RemoveBeside",
        json!({"target": t, "name": ".t-backup_asd-changes"}),
        "NotOwner",
    );
    w.h.err(
        &w.alice,
        "RenameBeside",
        json!({"target": t, "from": ".t-backup_asd-changes", "to": ".t-backup_asd-changes.asd-trash"}),
        "NotOwner",
    );
    assert_eq!(std::fs::read_to_string(&roots).unwrap(), "root's");
    // `.t` has the same names beside it as `t`: while it is bob's, alice gets none of them.
    let dotted = dir_of(&w.bob, &parent.join(".t"));
    w.h.err(
        &w.alice,
        "MakeBeside",
        call(".t-backup_asd-changes.asd-trash", "dir"),
        "BackupInUse",
    );
    w.h.err(
        &w.alice,
        "BindBackup",
        json!({"target": t, "mode": "copy"}),
        "BackupInUse",
    );
    std::fs::remove_dir(&dotted).unwrap();
    // A parent others may write (they could swap entries under the helper) is refused, and so
    // is a parent of alice's own (she does it herself).
    chmod(&parent, 0o777);
    w.h.err(
        &w.alice,
        "MakeBeside",
        call(".t-backup_asd-changes.asd-trash", "dir"),
        "PermissionDenied",
    );
    chmod(&parent, 0o755);
    let own = dir_of(&w.alice, &scratch.path.join("t2"));
    w.h.err(
        &w.alice,
        "MakeBeside",
        json!({"target": own, "name": ".t2-backup_asd-old", "kind": "dir"}),
        "PermissionDenied",
    );
    // alice removes what is hers; a directory only when empty.
    std::fs::write(parent.join(".t-backup_asd-old/inner"), "x").unwrap();
    chown(&parent.join(".t-backup_asd-old/inner"), &w.alice);
    w.h.err(
        &w.alice,
        "RemoveBeside",
        json!({"target": t, "name": ".t-backup_asd-old"}),
        "SystemError",
    );
    std::fs::remove_file(parent.join(".t-backup_asd-old/inner")).unwrap();
    for name in [".t-backup_asd-old", snap] {
        w.h.ok(&w.alice, "RemoveBeside", json!({"target": t, "name": name}));
    }
    let mut left = listing(&parent);
    left.sort();
    assert_eq!(
        left,
        vec![".t-backup_asd-changes".to_string(), "t".to_string()]
    );
    w.h.assert_serving();
}
