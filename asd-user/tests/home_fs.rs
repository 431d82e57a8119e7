//! The home file-system matrix (issue 8, item 3): the per-user flow through a real asd-helper
//! with the user's home on ext4, on a btrfs subvolume (Fedora, openSUSE) and on xfs (RHEL), each
//! with the home modes distributions give (0700, 0750, 0755), in copy and in overlay mode.
//!
//! Each case gets its own mount namespace, helper and loop image (see `common::loopfs`); the
//! three users (one per home mode) run their six cases one after the other, the users in
//! parallel, so no user is ever in two cases at once. One summary line gives the pass count.

mod common;
use common::loopfs::{HomeFs, LoopHome};
use common::world::World;
use common::*;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const USERS: [(&str, u32); 3] = [
    ("asdfs700", 0o700),
    ("asdfs750", 0o750),
    ("asdfs755", 0o755),
];

/// One lock per user: a case owns its user for its whole run (its asd runtime dir, its config),
/// should another test of this file ever use the same users.
static USER_LOCKS: [Mutex<()>; 3] = [Mutex::new(()), Mutex::new(()), Mutex::new(())];

#[derive(Clone, Copy)]
struct Case {
    fs: HomeFs,
    user: &'static str,
    mode: u32,
    overlay: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} home {:04o} {}",
            self.fs.name(),
            self.mode,
            if self.overlay { "overlay" } else { "copy" }
        )
    }
}

/// Runs `script` with bash inside the namespace as `user` (with the user's groups), as the user's
/// programs would write through the target.
fn as_user(w: &World, user: &str, script: &str) -> String {
    let out = w
        .cmd_as(user, "bash")
        .arg("-c")
        .arg(format!("set -e; {script}"))
        .output()
        .expect("setpriv");
    succeeded(&out, &format!("`{script}` as {user}"))
}

/// `asd ARGS` as the user; on failure the message carries the helper's log, which says why it
/// refused or failed a mount.
fn asd_step(w: &World, user: &str, conf: &Path, args: &[&str]) -> String {
    let out = w.asd_as(user, conf, args);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "asd {args:?} as {user} exited with {}:\n{text}\n--- helper log ---\n{}",
        out.status,
        std::fs::read_to_string(&w.log).unwrap_or_default()
    );
    text
}

/// Whether `p` (a path inside the namespace) is an overlayfs whiteout: a 0:0 character device,
/// or a zero-size file carrying `user.overlay.whiteout`.
fn is_whiteout(p: &Path) -> bool {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return false;
    };
    if m.file_type().is_char_device() {
        return m.rdev() == 0;
    }
    m.is_file()
        && m.len() == 0
        && xattr::get(p, "user.overlay.whiteout")
            .ok()
            .flatten()
            .is_some()
}

fn read(w: &World, p: &Path) -> String {
    std::fs::read_to_string(w.ns.inside(p))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn run_case(c: Case) {
    let Some(w) = World::new() else { return };
    let lh = LoopHome::mount(&w.ns, c.fs, c.user, c.mode);
    // The target and the user's config, made on the loop home (user_setup runs in the namespace).
    let (_uid, target, conf) = w.user_setup(c.user, "work");
    if c.overlay {
        let text = std::fs::read_to_string(&conf).expect("conf") + "USE_OVERLAYFS=yes\n";
        std::fs::write(&conf, text).expect("conf");
    }
    let t = target.display().to_string();
    as_user(
        &w,
        c.user,
        &format!(
            "cd '{t}'; echo keep > keep.txt; echo edit-me > edit.txt; echo delete-me > delete.txt; \
             mkdir -p olddir/deep; echo old > olddir/deep/x; ln -s keep.txt link; \
             setfattr -n user.color -v blue keep.txt"
        ),
    );
    let p = asd::paths::TargetPaths::new(&target, c.user, &w.ns.vol()).expect("paths");
    assert_eq!(
        w.ns.statfs_type(&target),
        c.fs.statfs_name(),
        "the target was not made on the loop home"
    );

    // sync
    asd_step(&w, c.user, &conf, &["sync"]);
    let want_type = if c.overlay { "overlayfs" } else { "tmpfs" };
    assert_eq!(
        w.ns.statfs_type(&target),
        want_type,
        "the target is not in RAM"
    );

    // Writes through the target: a new file, a modified file, a deleted file, a new dir.
    as_user(
        &w,
        c.user,
        &format!(
            "cd '{t}'; echo new > new.txt; echo edited >> edit.txt; rm delete.txt; \
             mkdir -p newdir/sub; echo n > newdir/sub/n.txt; setfattr -n user.k -v v new.txt"
        ),
    );
    asd_step(&w, c.user, &conf, &["resync"]);
    // The backup has it: in copy mode the original directory (bound at the backup path) equals
    // the RAM copy; in overlay mode the original is the lower layer, never written while
    // mounted, and the changes are persisted beside it.
    if c.overlay {
        // The first persist made the state's base, a copy of the upper layer.
        let state = p.changes_state();
        let layers = asd::overlay::layers(&w.ns.inside(&state)).expect("layers");
        assert_eq!(
            layers.len(),
            1,
            "a first persist makes a base only: {layers:?}"
        );
        let ch = &state.join(layers[0].file_name().expect("base name"));
        assert_eq!(
            read(&w, &ch.join("new.txt")),
            "new\n",
            "changes lack new.txt"
        );
        assert_eq!(read(&w, &ch.join("edit.txt")), "edit-me\nedited\n");
        assert_eq!(read(&w, &ch.join("newdir/sub/n.txt")), "n\n");
        assert!(
            is_whiteout(&w.ns.inside(&ch.join("delete.txt"))),
            "the deletion of delete.txt is not persisted in {}",
            ch.display()
        );
        assert_eq!(
            read(&w, &p.backup.join("delete.txt")),
            "delete-me\n",
            "the lower layer was written while mounted"
        );
    } else {
        let diff = w.ns.tree_diff(&target, &p.backup);
        assert!(diff.is_empty(), "the backup differs after resync:\n{diff}");
    }

    // More writes, then what the user sees is what must be on disk after unsync.
    as_user(
        &w,
        c.user,
        &format!(
            "cd '{t}'; echo more >> new.txt; echo new2 > new2.txt; rm -r olddir; \
             mkdir newdir2; rm keep.txt; echo replaced > keep.txt; ln -sfn new2.txt link"
        ),
    );
    let expect = w.ns.root.join("expect");
    w.ns.sh_ok(&format!("rsync -aX '{t}/' '{}/'", expect.display()));

    // unsync
    asd_step(&w, c.user, &conf, &["unsync"]);

    // The target is the directory on the home's file system again, nothing mounted in the home
    // but the home itself (the test's bind).
    assert_eq!(
        w.ns.statfs_type(&target),
        c.fs.statfs_name(),
        "the target is not back on {}",
        c.fs.name()
    );
    let home_mounts = lh.home_mounts(&w.ns);
    assert_eq!(
        home_mounts.len(),
        1,
        "left mounted in the home: {home_mounts:?}"
    );
    assert_eq!(home_mounts[0].1, lh.home.to_string_lossy());
    // The data, as the user last saw it, on disk: an independent tree comparison, then a
    // few names spelled out.
    let diff = w.ns.tree_diff(&expect, &target);
    assert!(diff.is_empty(), "the target on disk differs:\n{diff}");
    assert_eq!(read(&w, &target.join("new.txt")), "new\nmore\n");
    assert_eq!(read(&w, &target.join("new2.txt")), "new2\n");
    assert_eq!(read(&w, &target.join("edit.txt")), "edit-me\nedited\n");
    assert_eq!(read(&w, &target.join("keep.txt")), "replaced\n");
    assert_eq!(read(&w, &target.join("newdir/sub/n.txt")), "n\n");
    assert_eq!(read(&w, &target.join("sub/f")), "hello\n");
    assert!(!w.ns.inside(&target.join("delete.txt")).exists());
    assert!(!w.ns.inside(&target.join("olddir")).exists());
    assert!(w.ns.inside(&target.join("newdir2")).is_dir());
    let owners = w.ns.sh_ok(&format!("find '{t}' -printf '%u\\n' | sort -u"));
    assert_eq!(owners.trim(), c.user, "files of the target not the user's");
    // Nothing left beside the target.
    let beside: Vec<String> = std::fs::read_dir(w.ns.inside(&lh.home))
        .expect("list the home")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".work-backup_asd"))
        .collect();
    assert!(beside.is_empty(), "left beside the target: {beside:?}");
    // The home keeps the mode its distribution gave it.
    let home_mode = std::fs::metadata(w.ns.inside(&lh.home))
        .expect("home")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(home_mode, c.mode, "the home's mode changed");
    // The user's RAM area is gone or empty.
    let area = w.ns.inside(&p.user_area);
    if area.exists() {
        let left: Vec<_> = std::fs::read_dir(&area)
            .expect("list the RAM area")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left in the RAM area: {left:?}");
    }

    // Nothing of asd's mounted under the scratch dir (its RAM area included): only the test's
    // own mount of the image is there.
    let left: Vec<String> =
        w.ns.our_mounts()
            .into_iter()
            .filter(|m| Path::new(m) != lh.mnt)
            .collect();
    assert!(left.is_empty(), "left mounted: {left:?}");
    // Take the test's own mounts down: this fails if asd left anything mounted on the image.
    lh.unmount(&w.ns);
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

#[test]
fn home_fs_matrix() {
    if !require_root() {
        return;
    }
    for fs in HomeFs::ALL {
        fs.require_tools();
    }
    for (user, mode) in USERS {
        test_user_with_home_mode(user, mode);
    }
    let start = Instant::now();
    let results: Vec<(String, Result<Duration, String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = USERS
            .iter()
            .zip(USER_LOCKS.iter())
            .map(|(&(user, mode), lock)| {
                s.spawn(move || {
                    let _own = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let mut done = Vec::new();
                    for fs in HomeFs::ALL {
                        for overlay in [false, true] {
                            let c = Case {
                                fs,
                                user,
                                mode,
                                overlay,
                            };
                            let t0 = Instant::now();
                            let r = std::panic::catch_unwind(|| run_case(c))
                                .map(|()| t0.elapsed())
                                .map_err(|e| panic_text(&*e));
                            done.push((c.name(), r));
                        }
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().expect("a worker died outside a case"))
            .collect()
    });
    let passed = results.iter().filter(|r| r.1.is_ok()).count();
    let mut report = String::new();
    for (name, r) in &results {
        match r {
            Ok(d) => report += &format!("  ok    {name} ({:.1} s)\n", d.as_secs_f64()),
            Err(e) => report += &format!("  FAIL  {name}: {}\n", e.lines().next().unwrap_or("")),
        }
    }
    report += &format!(
        "home_fs matrix: {passed}/{} passed ({:.0} s)\n",
        results.len(),
        start.elapsed().as_secs_f64()
    );
    // Straight to stderr, past the test harness's capture: the summary is meant to be quoted.
    let _ = std::io::stderr().write_all(report.as_bytes());
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("{name}:\n{e}")))
        .collect();
    assert!(failures.is_empty(), "{report}\n{}", failures.join("\n\n"));
}
