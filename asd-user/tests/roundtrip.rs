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

/// A program still writing in the target at unsync: the cover cannot go read-only or away, so
/// unsync writes everything back, leaves the target in RAM and says why; once the program is
/// gone, unsync finishes, and what it wrote last is on disk.
#[test]
fn unsync_of_a_busy_target_keeps_it_in_ram_and_loses_nothing() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = ns.data().join("t");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("log"), "start\n").expect("write");
    ns.write_conf(&[&target], "");
    ns.asd_ok(&["sync"]);
    // A writer holding the file open, inside the namespace, until told to finish.
    let go = ns.root.join("go");
    // (timeout: never outlives a failed test)
    let mut writer = ns
        .cmd("timeout")
        .args(["120", "sh", "-c"])
        .arg(format!(
            "exec 3>>'{t}/log'; echo held >&3; while [ ! -e '{go}' ]; do sleep 0.05; done; echo last >&3",
            t = target.display(),
            go = go.display()
        ))
        .spawn()
        .expect("writer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(ns.inside(&target.join("log")))
        .unwrap_or_default()
        .contains("held")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ns.asd(&["unsync"]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "unsync of a busy target must fail");
    assert!(text.contains("busy"), "{text}");
    assert_eq!(ns.statfs_type(&target), "tmpfs", "still in RAM");
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    assert_eq!(
        std::fs::read_to_string(ns.inside(&p.backup.join("log"))).expect("backup"),
        "start\nheld\n",
        "written back before giving up"
    );
    std::fs::write(&go, "").expect("go");
    assert!(writer.wait().expect("writer").success());
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(target.join("log")).expect("on disk"),
        "start\nheld\nlast\n"
    );
}

/// A program only sitting in the target (its working directory, nothing open for writing):
/// the cover goes read-only for the last pass but cannot be taken down; unsync fails, and the
/// target, still in RAM, is writable again for its programs.
#[test]
fn a_failed_unsync_leaves_the_target_writable() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = ns.data().join("t");
    std::fs::create_dir(&target).expect("mkdir");
    ns.write_conf(&[&target], "");
    ns.asd_ok(&["sync"]);
    let sitter = Sitter::in_dir(&ns, &target);
    let out = ns.asd(&["unsync"]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "unsync of a busy target must fail");
    assert!(text.contains("busy"), "{text}");
    assert_eq!(ns.statfs_type(&target), "tmpfs", "still in RAM");
    let w = ns.sh(&format!("echo x > '{}/after'", target.display()));
    assert!(w.status.success(), "left read-only: {w:?}");
    drop(sitter);
    unsync_once_free(&ns);
    assert_eq!(
        std::fs::read_to_string(target.join("after")).expect("on disk"),
        "x\n"
    );
}

/// Unsync took the cover down but could not finish (the backup bind is busy): from then on the
/// target shows the disk and programs write there. The next unsync must not write the RAM copy
/// over what they wrote (the state says the cover is down).
#[test]
fn writes_after_the_cover_went_down_survive_a_failed_unsync() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = ns.data().join("t");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("f"), "disk\n").expect("write");
    ns.write_conf(&[&target], "");
    ns.asd_ok(&["sync"]);
    ns.sh_ok(&format!("echo ram > '{}/f'", target.display()));
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    // A program sitting in the backup bind keeps it busy.
    let sitter = Sitter::in_dir(&ns, &p.backup);
    let out = ns.asd(&["unsync"]);
    assert!(
        !out.status.success(),
        "the busy backup stops unsync: {out:?}"
    );
    assert_ne!(ns.statfs_type(&target), "tmpfs", "the cover went down");
    // Programs now write to the disk through the target.
    ns.sh_ok(&format!(
        "echo later > '{t}/f' && echo new > '{t}/after'",
        t = target.display()
    ));
    drop(sitter);
    unsync_once_free(&ns);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(
        std::fs::read_to_string(target.join("f")).expect("f"),
        "later\n",
        "the RAM copy was written over a later write"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("after")).expect("after"),
        "new\n",
        "a file written after the cover went down was deleted"
    );
}

/// A program whose working directory is `dir` (inside the namespace), nothing else: it keeps the
/// mount there busy until dropped.
struct Sitter(std::process::Child);

impl Sitter {
    fn in_dir(ns: &Ns, dir: &std::path::Path) -> Sitter {
        // (timeout: never outlives a failed test)
        let child = ns
            .cmd("timeout")
            .args(["120", "sh", "-c"])
            .arg(format!("cd '{}' && sleep 100", dir.display()))
            .spawn()
            .expect("sitter");
        let sitter = Sitter(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // timeout forks sh: look for its child with `dir` as its working directory.
            let cwds = ns.sh_ok(&format!(
                "for p in $(pgrep -P {}); do readlink /proc/$p/cwd; done",
                sitter.0.id()
            ));
            if cwds.lines().any(|l| Some(l) == dir.to_str()) {
                return sitter;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sitter did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Sitter {
    fn drop(&mut self) {
        // TERM to timeout: it passes the signal on to its child.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `asd unsync` until it succeeds (the last program may take a moment to let go), within 20 s.
fn unsync_once_free(ns: &Ns) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = ns.asd(&["unsync"]);
        if out.status.success() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{out:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
