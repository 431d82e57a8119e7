//! Write-backs that compare only what changed since the last one (issue 9, item 2): resync and
//! unsync must still miss no change made through the target, and a full comparison still runs
//! once a day (it repairs what was changed on the disk side behind asd's back).
//!
//! The changes are random (Python's `random` with a seed printed by the test; replay with
//! `ASD_INCR_SEED=<seed>`), in rounds with a resync between some of them, so that changes land
//! right after a resync's cutoff, inside renamed directories, over renamed files, and so on.

mod common;
use common::*;

/// Waits past the engine's ctime margin, so that a write-back that looked only at what changed
/// in the last `CTIME_MARGIN_MS` would miss the changes made before.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(
        3 * asd::copy::CTIME_MARGIN_MS as u64,
    ));
}

/// Random changes to the tree at `dir`, `count` of them, from `seed`, then [`settle`].
fn random_changes(ns: &Ns, dir: &std::path::Path, seed: u64, count: u32) {
    ns.sh_ok(&format!(
        r#"python3 - '{d}' {seed} {count} <<'PY'
import os, random, shutil, sys
root, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
def entries(kind):
    out = []
    for d, dirs, files in os.walk(root):
        if kind == "dir":
            out += [os.path.join(d, x) for x in dirs if not os.path.islink(os.path.join(d, x))]
        else:
            out += [os.path.join(d, x) for x in files if os.path.isfile(os.path.join(d, x)) and not os.path.islink(os.path.join(d, x))]
    return sorted(out)
def some_dir():
    return rng.choice([root] + entries("dir"))
def name():
    return rng.choice(["n", "x", "file", "dir", ".h", "sp ace", "new\nline"]) + str(rng.randrange(1000))
for i in range(count):
    op = rng.randrange(14)
    files, dirs = entries("file"), entries("dir")
    f = rng.choice(files) if files else None
    try:
        if op == 0 or f is None:
            with open(os.path.join(some_dir(), name()), "wb") as o: o.write(os.urandom(rng.randrange(0, 70000)))
        elif op == 1:
            with open(f, "ab") as o: o.write(b"appended")
        elif op == 2:
            size = os.path.getsize(f)
            with open(f, "r+b") as o: o.write(os.urandom(min(size, 64)))
        elif op == 3:
            os.truncate(f, rng.randrange(0, 10))
        elif op == 4:
            os.chmod(f, rng.choice([0o600, 0o640, 0o604, 0o700, 0o444]))
        elif op == 5:
            os.rename(f, os.path.join(os.path.dirname(f), name()))
        elif op == 6:
            os.rename(f, os.path.join(some_dir(), name()))
        elif op == 7 and len(files) > 1:
            os.rename(f, rng.choice([g for g in files if g != f]))
        elif op == 8:
            os.unlink(f)
        elif op == 9:
            os.makedirs(os.path.join(some_dir(), name(), name()))
        elif op == 10 and dirs:
            d = rng.choice(dirs)
            target = os.path.join(some_dir(), name())
            if not target.startswith(d + "/"):
                os.rename(d, target)
        elif op == 11 and dirs:
            shutil.rmtree(rng.choice(dirs))
        elif op == 12:
            os.symlink(rng.choice(["a/one.txt", "/nowhere", "../x"]), os.path.join(some_dir(), name()))
        elif op == 13:
            t = rng.randrange(1_000_000_000, 1_700_000_000)
            os.utime(f, ns=(t * 10**9 + 7, t * 10**9 + rng.randrange(10**9)))
        if op == 4 and f is not None and rng.random() < 0.5:
            os.setxattr(f, "user.k" + str(rng.randrange(3)), os.urandom(8))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, OSError):
        pass
PY"#,
        d = dir.display()
    ));
    settle();
}

fn seed() -> u64 {
    let seed = std::env::var("ASD_INCR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261204);
    eprintln!("incremental: seed {seed} (replay with ASD_INCR_SEED={seed})");
    seed
}

/// A target made by `make_tree`, configured (with `extra` config lines), the place for the
/// copy of what it shows, and the seed of the random changes. None when not root.
struct World {
    ns: Ns,
    target: std::path::PathBuf,
    expected: std::path::PathBuf,
    seed: u64,
}

impl World {
    fn new(extra: &str) -> Option<World> {
        if !require_root() {
            return None;
        }
        assert!(
            have("rsync") && have("setfattr") && have("python3"),
            "rsync, attr and python3 are needed: run the README test command"
        );
        let ns = Ns::new();
        let target = ns.data().join("t");
        let expected = ns.data().join("expected");
        make_tree(&ns, &target);
        ns.write_conf(&[&target], extra);
        Some(World {
            ns,
            target,
            expected,
            seed: seed(),
        })
    }
}

/// What the target shows now, copied to `expected` (to compare the disk with after a stop).
fn copy_of_target(ns: &Ns, target: &std::path::Path, expected: &std::path::Path) {
    ns.sh_ok(&format!(
        "rsync -aX '{}/' '{}/'",
        target.display(),
        expected.display()
    ));
}

/// Rounds of random changes with resyncs between them, then unsync: the disk holds exactly
/// what the target showed just before the unsync. The RAM copy is compared with the disk after
/// every resync too.
#[test]
fn incremental_write_backs_miss_no_change() {
    let Some(World {
        ns,
        target,
        expected,
        seed,
    }) = World::new("")
    else {
        return;
    };
    ns.asd_ok(&["sync"]);
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    for round in 0..8u64 {
        random_changes(&ns, &target, seed.wrapping_add(round), 40);
        // Some rounds end without a resync: their changes pile up for the next write-back.
        if round % 3 != 2 {
            ns.asd_ok(&["resync"]);
            assert_eq!(
                ns.tree_diff(&p.volatile, &p.backup),
                "",
                "round {round} (seed {seed}): after resync the disk equals RAM"
            );
        }
    }
    random_changes(&ns, &target, seed.wrapping_add(100), 40);
    copy_of_target(&ns, &target, &expected);
    ns.asd_ok(&["unsync"]);
    assert_eq!(
        ns.our_mounts(),
        Vec::<String>::new(),
        "nothing left mounted"
    );
    assert_eq!(
        ns.tree_diff(&target, &expected),
        "",
        "seed {seed}: the disk holds what the target showed before unsync"
    );
}

/// A change made on the disk side behind the cover is not seen by an incremental resync, and
/// is repaired by the full comparison that runs once its predecessor is a day old.
#[test]
fn a_full_comparison_runs_once_a_day() {
    if !require_root() {
        return;
    }
    assert!(
        have("rsync"),
        "rsync is needed: run the README test command"
    );
    let ns = Ns::new();
    let target = ns.data().join("t");
    make_tree(&ns, &target);
    ns.write_conf(&[&target], "");
    ns.asd_ok(&["sync"]);
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    // The sync's own copies are within `CTIME_MARGIN_MS` of its cutoff, so the first resync
    // compares them again; after it, entries are older than the cutoff, as an hour later.
    std::thread::sleep(std::time::Duration::from_millis(
        3 * asd::copy::CTIME_MARGIN_MS as u64,
    ));
    ns.asd_ok(&["resync"]);
    // Behind the cover: through asd's own backup mount, which nothing but asd should write.
    ns.sh_ok(&format!(
        "echo behind > '{b}/behind.txt'; echo changed-behind > '{b}/a/one.txt'",
        b = p.backup.display()
    ));
    ns.sh_ok(&format!("echo through >> '{}/edit.txt'", target.display()));
    ns.asd_ok(&["resync"]);
    let backup = ns.inside(&p.backup);
    assert!(
        std::fs::read_to_string(backup.join("edit.txt"))
            .expect("edit.txt")
            .ends_with("through\n"),
        "the change made through the target is written back"
    );
    assert!(
        backup.join("behind.txt").exists(),
        "an incremental resync looks only at what changed in RAM"
    );

    // The last full comparison 25 hours ago: the next resync compares everything.
    let state_file = ns.run_dir().join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state")).expect("json");
    let day_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 25 * 3600;
    for t in state["targets"].as_array_mut().expect("targets") {
        assert!(
            t["full_compare_at"].is_u64(),
            "sync records its full comparison: {t}"
        );
        t["full_compare_at"] = serde_json::json!(day_ago);
    }
    std::fs::write(&state_file, state.to_string()).expect("write state");
    ns.asd_ok(&["resync"]);
    assert_eq!(
        ns.tree_diff(&p.volatile, &p.backup),
        "",
        "the full comparison makes the disk equal to RAM again"
    );
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state")).expect("json");
    for t in after["targets"].as_array().expect("targets") {
        assert!(
            t["full_compare_at"].as_u64().expect("recorded") > day_ago + 3600,
            "the full comparison is recorded: {t}"
        );
    }

    // The wall clock set back an hour since the last write-back (as if an hour of boot time
    // had passed with the wall clock standing still): ctimes cannot be trusted, so the next
    // resync compares everything too.
    std::thread::sleep(std::time::Duration::from_millis(
        3 * asd::copy::CTIME_MARGIN_MS as u64,
    ));
    ns.sh_ok(&format!(
        "echo behind > '{}/behind2.txt'",
        p.backup.display()
    ));
    ns.asd_ok(&["resync"]);
    assert!(
        backup.join("behind2.txt").exists(),
        "an incremental resync again once the full comparison is recorded"
    );
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state")).expect("json");
    for t in state["targets"].as_array_mut().expect("targets") {
        let boot = t["clean_clock"]["boottime_ns"]
            .as_u64()
            .unwrap_or_else(|| panic!("resync records the boot-time clock: {t}"));
        t["clean_clock"]["boottime_ns"] = serde_json::json!(boot.saturating_sub(3_600_000_000_000));
    }
    std::fs::write(&state_file, state.to_string()).expect("write state");
    ns.asd_ok(&["resync"]);
    assert_eq!(
        ns.tree_diff(&p.volatile, &p.backup),
        "",
        "after a clock step back the resync compares everything"
    );
    ns.asd_ok(&["unsync"]);
}

/// The daemon keeps a change journal of each target in copy mode; its resyncs (here asked for
/// with SIGUSR1) then look only at what the journal marked. Rounds of random changes: after
/// each resync the disk equals RAM, and after the stop (SIGTERM) the disk holds what the target
/// showed.
#[test]
fn the_daemons_journaled_resyncs_miss_no_change() {
    let Some(World {
        ns,
        target,
        expected,
        seed,
    }) = World::new("RESYNC_INTERVAL=1h")
    else {
        return;
    };
    let log = ns.root.join("daemon.log");
    let mut daemon = KillOnDrop(
        ns.asd_cmd(&["daemon"])
            .env("ASD_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("daemon"),
    );
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    let wait_for = |what: &dyn Fn() -> bool, msg: &str| {
        for _ in 0..300 {
            if what() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("timed out waiting: {msg}\n{text}");
    };
    wait_for(
        &|| ns.run_dir().join("state.json").exists() && ns.statfs_type(&target) == "tmpfs",
        "the daemon syncs",
    );
    let journaled = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("what the change journal marked")
            .count()
    };
    for round in 0..6u64 {
        random_changes(&ns, &target, seed.wrapping_add(1000 + round), 30);
        let before = journaled();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.0.id() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("SIGUSR1");
        // Compared while the resync may still run: a file vanishing under rsync is no answer.
        let equal = || {
            ns.cmd("rsync")
                .args(["-aXn", "--delete", "--itemize-changes"])
                .arg(format!("{}/", p.volatile.display()))
                .arg(format!("{}/", p.backup.display()))
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
        };
        wait_for(
            &equal,
            &format!("round {round} (seed {seed}): the resync makes the disk equal to RAM"),
        );
        // The first resync after the start compares by ctime and readies the journal.
        if round >= 1 {
            wait_for(
                &|| journaled() > before,
                &format!("round {round}: the resync used the change journal"),
            );
        }
    }
    random_changes(&ns, &target, seed.wrapping_add(2000), 30);
    copy_of_target(&ns, &target, &expected);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = daemon.0.wait().expect("daemon");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the daemon stops cleanly: {text}");
    assert_eq!(
        ns.our_mounts(),
        Vec::<String>::new(),
        "nothing left mounted"
    );
    assert_eq!(
        ns.tree_diff(&target, &expected),
        "",
        "seed {seed}: the disk holds what the target showed before the stop"
    );
}

/// A daemon that does not outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Two directories swapped by renames keep their files' ctimes and names: by ctime alone none
/// of their files changed. A one-off resync and unsync must still write each file under its
/// new name (the sync and every write-back record where each directory is, see
/// `copy::write_back`). The files differ in size, so that rsync's quick check sees it too.
#[test]
fn swapped_directories_are_written_back_under_their_new_names() {
    let Some(World {
        ns,
        target,
        expected,
        ..
    }) = World::new("")
    else {
        return;
    };
    ns.sh_ok(&format!(
        "cd '{}'; mkdir -p sa/deep sb/deep; for i in 1 2 3; do
           echo a$i > sa/f$i; echo bb$i > sb/f$i; echo A$i > sa/deep/g$i; echo BBB$i > sb/deep/g$i; done",
        target.display()
    ));
    ns.asd_ok(&["sync"]);
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    assert!(
        ns.sh(&format!("test -f '{}'", p.dir_ids().display()))
            .status
            .success(),
        "the sync recorded where each directory is"
    );
    settle();
    ns.sh_ok(&format!(
        "cd '{}'; mv sa tmp; mv sb sa; mv tmp sb",
        target.display()
    ));
    ns.asd_ok(&["resync"]);
    assert_eq!(
        ns.tree_diff(&p.volatile, &p.backup),
        "",
        "after resync the disk equals RAM"
    );
    assert_eq!(
        ns.sh_ok(&format!("cat '{}/sa/f1'", p.backup.display()))
            .trim(),
        "bb1"
    );
    // Deeper down, swapped again, and written back by the unsync.
    settle();
    ns.sh_ok(&format!(
        "cd '{}'; mv sa/deep tmp; mv sb/deep sa/deep; mv tmp sb/deep",
        target.display()
    ));
    copy_of_target(&ns, &target, &expected);
    ns.asd_ok(&["unsync"]);
    assert_eq!(
        ns.tree_diff(&target, &expected),
        "",
        "the disk holds what the target showed before unsync"
    );
    assert!(
        !ns.sh(&format!("test -e '{}'", p.dir_ids().display()))
            .status
            .success(),
        "the record went with the RAM copy"
    );
}
