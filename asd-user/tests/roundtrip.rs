//! Copy mode end to end, as root, with real mounts in a private mount namespace (issue 2).

mod common;
use common::*;

fn roundtrip(shared: bool) {
    if !require_root() {
        return;
    }
    assert!(
        have("rsync") && have("setfattr"),
        "rsync and attr are needed: run the README test command"
    );
    let ns = Ns::with_propagation(shared);
    let target = ns.data().join("t");
    let expected = ns.data().join("expected");
    make_tree(&ns, &target);
    make_tree(&ns, &expected);
    stamp(&ns, &target);
    stamp(&ns, &expected);
    ns.write_conf(&[&target], "");

    let out = ns.asd_ok(&["sync"]);
    assert!(out.contains("sync successful"), "{out}");
    assert_eq!(ns.statfs_type(&target), "tmpfs", "writes must land in RAM");
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    assert_ne!(ns.statfs_type(&p.backup), "tmpfs", "the backup is the disk");
    assert_eq!(
        ns.tree_diff(&target, &expected),
        "",
        "the RAM copy shows the same tree"
    );

    // A second sync says so and succeeds.
    let again = ns.asd_ok(&["sync"]);
    assert!(again.contains("already running"), "{again}");

    mutate(&ns, &target);
    mutate(&ns, &expected);
    stamp(&ns, &target);
    stamp(&ns, &expected);
    // Nothing reached the disk yet.
    assert!(!ns.inside(&p.backup.join("added.txt")).exists());

    let out = ns.asd_ok(&["resync"]);
    assert!(out.contains("resync successful"), "{out}");
    assert_eq!(
        ns.tree_diff(&p.volatile, &p.backup),
        "",
        "after resync the disk equals RAM"
    );
    assert!(
        ns.inside(&p.old.join("delete.txt")).exists(),
        "the start clone keeps the start state"
    );
    assert_eq!(
        std::fs::read_to_string(ns.inside(&p.old.join("edit.txt"))).expect("old edit"),
        "edit-me\n",
        "the start clone is not changed by resync"
    );

    let out = ns.asd_ok(&["unsync"]);
    assert!(out.contains("unsync successful"), "{out}");
    assert_eq!(
        ns.our_mounts(),
        Vec::<String>::new(),
        "nothing left mounted"
    );
    assert_eq!(
        ns.tree_diff(&target, &expected),
        "",
        "the disk holds the final tree"
    );
    for leftover in [&p.backup, &p.old, &p.old_partial, &p.user_area] {
        assert!(
            !ns.inside(leftover).exists(),
            "{} left behind",
            leftover.display()
        );
    }
    assert!(!ns.run_dir().join("state.json").exists());
    let again = ns.asd_ok(&["unsync"]);
    assert!(again.contains("not running"), "{again}");
}

#[test]
fn roundtrip_private_root() {
    roundtrip(false);
}

#[test]
fn roundtrip_shared_root() {
    roundtrip(true);
}
