//! Overlay mode end to end (issue 3): the original directory is the overlay's lower layer and is
//! never written while mounted; resync persists the upper layer beside the target; unsync and
//! crash recovery apply it. Real overlay mounts in private namespaces, as root.

mod common;
use common::*;
use std::path::Path;

/// inode, size, mtime and ctime of every entry: what "untouched" means for the lower layer.
fn listing(ns: &Ns, dir: &Path) -> String {
    ns.sh_ok(&format!(
        "cd '{}' && find . -printf '%i %s %T@ %C@ %p\\n' | sort -k5",
        dir.display()
    ))
}

struct Case {
    ns: Ns,
    target: std::path::PathBuf,
    expected: std::path::PathBuf,
    p: asd::paths::TargetPaths,
}

fn start() -> Case {
    let ns = Ns::new();
    let target = ns.data().join("t");
    let expected = ns.data().join("expected");
    make_tree(&ns, &target);
    make_tree(&ns, &expected);
    stamp(&ns, &target);
    stamp(&ns, &expected);
    ns.write_conf(&[&target], "USE_OVERLAYFS=yes");
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    Case {
        ns,
        target,
        expected,
        p,
    }
}

fn change_both(c: &Case) {
    mutate(&c.ns, &c.target);
    mutate(&c.ns, &c.expected);
    stamp(&c.ns, &c.target);
    stamp(&c.ns, &c.expected);
}

/// Synced in overlay mode, changed through the target (and the expected tree), resynced: the
/// change set on disk holds every kind of change.
fn resynced_with_changes() -> Case {
    let c = start();
    c.ns.asd_ok(&["sync"]);
    change_both(&c);
    c.ns.asd_ok(&["resync"]);
    c
}

#[test]
fn overlay_resync_unsync_and_lower_untouched() {
    if !require_root() {
        return;
    }
    let c = start();
    let before = listing(&c.ns, &c.target);
    let out = c.ns.asd_ok(&["sync"]);
    assert!(out.contains("sync successful"), "{out}");
    assert_eq!(c.ns.statfs_type(&c.target), "overlayfs");
    assert_eq!(
        c.ns.tree_diff(&c.target, &c.expected),
        "",
        "the merged view shows the tree"
    );

    change_both(&c);
    c.ns.asd_ok(&["resync"]);
    // Persisted beside the target, not into the lower layer.
    assert!(
        c.ns.inside(&c.p.changes).is_dir(),
        "changes persisted at {}",
        c.p.changes.display()
    );
    assert_eq!(c.ns.tree_diff(&c.target, &c.expected), "");
    c.ns.sh_ok(&format!(
        "echo more > '{}/more.txt' && echo more > '{}/more.txt'",
        c.target.display(),
        c.expected.display()
    ));
    stamp(&c.ns, &c.target);
    stamp(&c.ns, &c.expected);
    c.ns.asd_ok(&["resync"]);
    c.ns.asd_ok(&["resync"]);
    assert_eq!(
        listing(&c.ns, &c.p.backup),
        before,
        "the lower layer changed while mounted"
    );

    let pv = c.ns.asd_ok(&["preview"]);
    assert!(pv.contains("overlayfs size:"), "{pv}");

    c.ns.asd_ok(&["unsync"]);
    assert!(c.ns.our_mounts().is_empty(), "{:?}", c.ns.our_mounts());
    assert_eq!(
        c.ns.tree_diff(&c.target, &c.expected),
        "",
        "unsync applied every change"
    );
    for left in [&c.p.backup, &c.p.changes, &c.p.user_area, &c.p.old] {
        assert!(
            !c.ns.inside(left).exists(),
            "{} left behind",
            left.display()
        );
    }
}

/// A crash after a resync: the original is exactly the start state, the snapshot keeps it, and
/// recovery applies the last persisted changes.
#[test]
fn overlay_crash_recovery_applies_persisted_changes() {
    if !require_root() {
        return;
    }
    let c = start();
    let start_state = c.ns.data().join("start");
    c.ns.sh_ok(&format!(
        "cp -a '{}' '{}'",
        c.target.display(),
        start_state.display()
    ));
    c.ns.asd_ok(&["sync"]);
    change_both(&c);
    c.ns.asd_ok(&["resync"]);
    // Written after the last resync: lost in the crash, as it must be.
    c.ns.sh_ok(&format!("echo late > '{}/late.txt'", c.target.display()));
    c.ns.drop_all_mounts();
    std::fs::remove_dir_all(c.ns.run_dir()).expect("reboot forgets the runtime state");
    let out = c.ns.asd_ok(&["sync"]);
    assert!(out.contains("recovered"), "{out}");
    c.ns.asd_ok(&["unsync"]);
    assert_eq!(
        c.ns.tree_diff(&c.target, &c.expected),
        "",
        "the last resync's data is all there"
    );
    let snap: Vec<_> = std::fs::read_dir(c.ns.data())
        .expect("readdir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("crashrecovery"))
        .collect();
    assert_eq!(snap.len(), 1, "{snap:?}");
    let x = c.ns.root.join("x");
    std::fs::create_dir(&x).expect("mkdir");
    c.ns.sh_ok(&format!(
        "tar -xf '{}' -C '{}'",
        snap[0].display(),
        x.display()
    ));
    // tar keeps whole seconds, so compare content, modes and links, not times.
    let diff = c.ns.sh_ok(&format!(
        "rsync -rlpcDn --delete --itemize-changes '{}/t/' '{}/'",
        x.display(),
        start_state.display()
    ));
    assert_eq!(diff, "", "the snapshot holds the start state");
}

/// A kill while unsync deletes the change set it has just applied: the set is renamed aside
/// first, so a half-deleted one (here: its files gone, its opaque directories and whiteouts
/// left) is never applied by the next start, which would empty the recreated directory `a/b`
/// in the target; it is removed instead.
#[test]
fn overlay_kill_during_cleanup_never_applies_a_half_deleted_change_set() {
    if !require_root() {
        return;
    }
    let c = resynced_with_changes();
    let saved = c.ns.root.join("changes-saved");
    c.ns.sh_ok(&format!(
        "cp -a --preserve=all '{}' '{}'",
        c.p.changes.display(),
        saved.display()
    ));
    c.ns.asd_ok(&["unsync"]);
    assert_eq!(c.ns.tree_diff(&c.target, &c.expected), "");
    // What a kill during the deletion leaves, and no runtime state (a reboot).
    let trash = asd::paths::trash(&c.p.changes);
    c.ns.sh_ok(&format!(
        "mv '{}' '{}' && find '{}' -type f -delete && getfattr -R -d -m - '{}' | grep -q opaque",
        saved.display(),
        trash.display(),
        trash.display(),
        trash.display()
    ));
    let _ = std::fs::remove_dir_all(c.ns.run_dir());
    c.ns.asd_ok(&["sync"]);
    assert!(
        !trash.exists(),
        "the half-deleted change set was left behind"
    );
    c.ns.asd_ok(&["unsync"]);
    assert_eq!(
        c.ns.tree_diff(&c.target, &c.expected),
        "",
        "a half-deleted change set was applied"
    );
}

/// The real cleanup, cut short: unsync dies (abort, as a kill -9) right after renaming the
/// applied change set aside; the next start (after a reboot) does not apply it again and
/// removes it, and the target holds the last data.
#[test]
fn overlay_kill_in_cleanup_after_the_change_set_was_renamed_aside() {
    if !require_root() {
        return;
    }
    require_test_hook("ASD_TEST_CRASH_IN_CLEANUP");
    let c = resynced_with_changes();
    let out =
        c.ns.asd_cmd(&["unsync"])
            .env("ASD_TEST_CRASH_IN_CLEANUP", "1")
            .output()
            .expect("asd");
    assert!(!out.status.success(), "the injected crash must stop unsync");
    let trash = asd::paths::trash(&c.p.changes);
    assert!(!c.p.changes.exists(), "the change set kept its name");
    assert!(trash.join("current").exists(), "renamed aside whole");
    assert_eq!(c.ns.tree_diff(&c.target, &c.expected), "", "applied first");
    c.ns.drop_all_mounts();
    std::fs::remove_dir_all(c.ns.run_dir()).expect("reboot forgets the runtime state");
    let out = c.ns.asd_ok(&["sync"]);
    assert!(!trash.exists(), "the rest was not removed");
    assert!(
        !out.contains("recovered"),
        "only a deletion was left to do: {out}"
    );
    c.ns.asd_ok(&["unsync"]);
    assert_eq!(c.ns.tree_diff(&c.target, &c.expected), "");
}

/// A kill in the middle of a resync with many changes: nothing of the last completed resync is
/// lost, and every file is whole.
#[test]
fn overlay_kill_during_resync() {
    if !require_root() {
        return;
    }
    require_test_hook("ASD_TEST_CRASH_AFTER_RENAMES");
    let c = start();
    c.ns.asd_ok(&["sync"]);
    let t = c.target.display().to_string();
    c.ns.sh_ok(&format!(
        "mkdir -p '{t}/many' && for i in $(seq 1 3000); do printf 'v1-%0500d' $i > '{t}/many/f'$i; done"
    ));
    c.ns.asd_ok(&["resync"]);
    c.ns.sh_ok(&format!(
        "for i in $(seq 1 3000); do printf 'v2-%0900d' $i > '{t}/many/f'$i; done"
    ));
    let out =
        c.ns.asd_cmd(&["resync"])
            .env("ASD_TEST_CRASH_AFTER_RENAMES", "1000")
            .output()
            .expect("asd");
    assert!(!out.status.success(), "the injected crash stops the resync");
    c.ns.drop_all_mounts();
    c.ns.asd_ok(&["sync"]);
    c.ns.asd_ok(&["unsync"]);
    let (mut v1, mut v2) = (0, 0);
    for i in 1..=3000 {
        let data = std::fs::read_to_string(c.target.join(format!("many/f{i}"))).expect("file kept");
        if data == format!("v1-{i:0500}") {
            v1 += 1;
        } else if data == format!("v2-{i:0900}") {
            v2 += 1;
        } else {
            panic!("many/f{i} is torn ({} bytes)", data.len());
        }
    }
    eprintln!("after the crash: {v1} files from the last completed resync, {v2} newer");
    // Persist switches the whole change set at once: never a mix of two resyncs.
    assert!(
        v1 == 3000 || v2 == 3000,
        "a mix of two resyncs: {v1} old, {v2} new"
    );
}

/// Root mode, overlay, a target owned by a user in a root-owned parent: the change set is made
/// by root for the owner, persisted and applied as the owner, and everything is cleaned up
/// (overlayfs leaves a root-owned, mode 0000 `work/work` behind for root to remove).
#[test]
fn overlay_user_owned_target_in_root_owned_parent() {
    if !require_root() {
        return;
    }
    let (uid, _) = test_user("asdtest1");
    let ns = Ns::new();
    let t = ns.data().join("t");
    ns.sh_ok(&format!(
        "mkdir -p '{t}/d' && echo a > '{t}/d/a' && chown -R asdtest1: '{t}'",
        t = t.display()
    ));
    ns.write_conf(&[&t], "USE_OVERLAYFS=yes");
    ns.asd_ok(&["sync"]);
    ns.sh_ok(&format!(
        "su asdtest1 -s /bin/sh -c 'echo b > {t}/d/b && rm {t}/d/a'",
        t = t.display()
    ));
    ns.asd_ok(&["resync"]);
    let p = asd::paths::TargetPaths::new(&t, "asdtest1", &ns.vol()).expect("paths");
    let owners = ns.sh_ok(&format!(
        "find '{}' -printf '%U\\n' | sort -u",
        p.changes.display()
    ));
    assert_eq!(
        owners.trim(),
        uid.to_string(),
        "the change set is the owner's"
    );
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty());
    assert_eq!(std::fs::read_to_string(t.join("d/b")).expect("b"), "b\n");
    assert!(!t.join("d/a").exists());
    for left in [&p.changes, &p.backup, &p.user_area] {
        assert!(!ns.inside(left).exists(), "{} left behind", left.display());
    }
}
