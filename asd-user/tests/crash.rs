//! Crash recovery (issue 2 item 5): kill -9 in the middle of sync, resync and unsync, drop the
//! mounts as a reboot would (with and without the runtime state), start again, and check that
//! nothing written back by a completed resync is lost and no file is torn. Also a simulated power
//! cut right after a resync reported success.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const FILES: usize = 4000;

fn write_version(ns: &Ns, dir: &Path, v: u32) {
    versioned::write_version(ns, dir, v, FILES);
}

fn versions(root: &Path, candidates: &[u32]) -> Vec<Option<u32>> {
    versioned::versions(root, candidates, FILES)
}

fn temp_files(ns: &Ns, dir: &Path) -> String {
    ns.sh_ok(&format!("find '{}' -name '.#asd-tmp.*'", dir.display()))
}

/// Start `asd <cmd>`, let it run for `after`, then kill -9 it (and its workers).
fn kill_during(ns: &Ns, cmd: &str, after: Duration) -> bool {
    let mut child = ns.asd_cmd(&[cmd]).spawn().expect("spawn asd");
    std::thread::sleep(after);
    let finished = child.try_wait().ok().flatten().is_some();
    let _ = child.kill();
    let _ = child.wait();
    finished
}

fn snapshots(ns: &Ns, p: &asd::paths::TargetPaths) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(ns.inside(p.parent()))
        .expect("readdir")
        .flatten()
        .map(|e| e.path())
        .filter(|x| {
            let n = x
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            n.starts_with(".t-backup_asd-crashrecovery-") && n.ends_with(".tar.zstd")
        })
        .collect();
    v.sort();
    v
}

/// Extract a snapshot with GNU tar and return where the target's tree landed.
fn extract(ns: &Ns, snap: &Path) -> PathBuf {
    let out = ns.root.join("extracted");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir(&out).expect("mkdir");
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(snap)
        .arg("-C")
        .arg(&out)
        .status()
        .expect("tar");
    assert!(st.success(), "GNU tar could not extract {}", snap.display());
    out.join("t")
}

struct Setup {
    ns: Ns,
    target: PathBuf,
    paths: asd::paths::TargetPaths,
    /// How long a full resync of every file took: kills are placed at fractions of it.
    resync_time: Duration,
    /// How many versioned files the target holds.
    files: usize,
}

/// v1 on disk, synced, v2 written and resynced; returns with v2 durable on disk.
fn setup() -> Setup {
    let ns = Ns::new();
    let target = ns.data().join("t");
    std::fs::create_dir(&target).expect("mkdir");
    write_version(&ns, &target, 1);
    ns.write_conf(&[&target], "");
    ns.asd_ok(&["sync"]);
    write_version(&ns, &target, 2);
    let start = std::time::Instant::now();
    ns.asd_ok(&["resync"]);
    let resync_time = start.elapsed();
    let paths = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    Setup {
        ns,
        target,
        paths,
        resync_time,
        files: FILES,
    }
}

fn reboot(s: &Setup, keep_state: bool) {
    s.ns.drop_all_mounts();
    assert!(
        s.ns.our_mounts().is_empty(),
        "mounts left: {:?}",
        s.ns.our_mounts()
    );
    if !keep_state {
        std::fs::remove_dir_all(s.ns.run_dir()).expect("forget runtime state");
    }
}

/// After recovery: target holds v2 or v3 per file, whole; a snapshot with the start state (v1).
fn check_recovered(s: &Setup, out: &str, allowed: &[u32]) {
    check_recovered_with_snapshot(s, out, allowed, 1)
}

/// As [`check_recovered`], with the version the snapshot must hold throughout: the start state
/// (1) while the `-old` clone exists, else the disk as found.
fn check_recovered_with_snapshot(s: &Setup, out: &str, allowed: &[u32], snapshot_version: u32) {
    assert!(
        out.contains("recovered"),
        "sync should report the recovery:\n{out}"
    );
    assert_eq!(
        s.ns.statfs_type(&s.target),
        "tmpfs",
        "back in RAM after recovery"
    );
    let vs = versioned::versions(&s.ns.inside(&s.paths.backup), allowed, s.files);
    let count = |v| vs.iter().filter(|x| **x == Some(v)).count();
    eprintln!(
        "after recovery: {} files v2, {} files v3, {} missing",
        count(2),
        count(3),
        vs.iter().filter(|x| x.is_none()).count()
    );
    assert!(
        vs.iter().all(|v| v.is_some()),
        "a file written back by a completed resync is missing"
    );
    assert_eq!(
        temp_files(&s.ns, &s.paths.backup),
        "",
        "temporary files left in the target"
    );
    let snaps = snapshots(&s.ns, &s.paths);
    assert_eq!(
        snaps.len(),
        1,
        "one crash-recovery snapshot expected: {snaps:?}"
    );
    let restored = extract(&s.ns, &snaps[0]);
    let vs = versioned::versions(&restored, &[snapshot_version], s.files);
    assert!(
        vs.iter().all(|v| *v == Some(snapshot_version)),
        "the snapshot holds version {snapshot_version} throughout"
    );
    s.ns.asd_ok(&["unsync"]);
    assert!(s.ns.our_mounts().is_empty());
    versioned::versions(&s.ns.inside(&s.target), allowed, s.files);
}

/// Kill a resync at `fraction` of the time a full one takes, so that runs land in different
/// phases (temporary files written, renames under way, deletions); the checks hold for all.
fn crash_in_resync(keep_state: bool, fraction: f64) {
    if !require_root() {
        return;
    }
    let s = setup();
    write_version(&s.ns, &s.target, 3);
    let after = s.resync_time.mul_f64(fraction);
    let finished = kill_during(&s.ns, "resync", after);
    eprintln!(
        "resync killed after {after:?} (a full one took {:?}); it had {}finished",
        s.resync_time,
        if finished { "" } else { "not " }
    );
    reboot(&s, keep_state);
    let out = s.ns.asd_ok(&["sync"]);
    check_recovered(&s, &out, &[2, 3]);
}

#[test]
fn kill_during_resync_then_reboot_with_state() {
    crash_in_resync(true, 0.5);
}

#[test]
fn kill_late_in_resync_then_reboot_with_state() {
    crash_in_resync(true, 0.85);
}

#[test]
fn kill_during_resync_then_reboot_without_state() {
    crash_in_resync(false, 0.7);
}

/// Deterministic: the resync dies (abort, like kill -9) after putting 1500 of 4000 files in
/// place, so the disk holds a mix; every file must still be whole, and none lost.
#[test]
fn crash_in_the_middle_of_renames() {
    if !require_root() {
        return;
    }
    require_test_hook("ASD_TEST_CRASH_AFTER_RENAMES");
    let s = setup();
    write_version(&s.ns, &s.target, 3);
    let out =
        s.ns.asd_cmd(&["resync"])
            .env("ASD_TEST_CRASH_AFTER_RENAMES", "1500")
            .output()
            .expect("asd");
    assert!(
        !out.status.success(),
        "the injected crash must stop the resync"
    );
    let mixed = versions(&s.ns.inside(&s.paths.backup), &[2, 3]);
    let v3 = mixed.iter().filter(|v| **v == Some(3)).count();
    assert_eq!(v3, 1500, "exactly the renamed files are new on disk");
    reboot(&s, true);
    let out = s.ns.asd_ok(&["sync"]);
    check_recovered(&s, &out, &[2, 3]);
}

#[test]
fn kill_during_unsync_then_reboot() {
    if !require_root() {
        return;
    }
    let s = setup();
    write_version(&s.ns, &s.target, 3);
    // Half of what a resync of the same change took: inside the write-back.
    let after = s.resync_time.mul_f64(0.5);
    if kill_during(&s.ns, "unsync", after) {
        // A machine fast enough to finish first: then it must have finished cleanly.
        eprintln!("NOTE: unsync finished within {after:?}; checking its result instead");
        assert!(s.ns.our_mounts().is_empty());
        assert!(versions(&s.target, &[3]).iter().all(|v| *v == Some(3)));
        return;
    }
    // Killed in the write-back, the start clone is there to be snapshotted; killed in the
    // cleanup after it (which renames the clone aside first), the write-back was complete and
    // the snapshot is of the disk, all version 3.
    let clone_there = s.ns.inside(&s.paths.old).exists();
    eprintln!("unsync killed after {after:?}; start clone still there: {clone_there}");
    reboot(&s, true);
    let out = s.ns.asd_ok(&["sync"]);
    check_recovered_with_snapshot(&s, &out, &[2, 3], if clone_there { 1 } else { 3 });
}

#[test]
fn kill_during_sync_then_reboot() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = ns.data().join("t");
    std::fs::create_dir(&target).expect("mkdir");
    write_version(&ns, &target, 1);
    ns.write_conf(&[&target], "");
    kill_during(&ns, "sync", Duration::from_millis(100));
    ns.drop_all_mounts();
    let out = ns.asd_ok(&["sync"]);
    assert!(out.contains("sync successful"), "{out}");
    let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
    assert!(versions(&ns.inside(&p.backup), &[1])
        .iter()
        .all(|v| *v == Some(1)));
    assert!(versions(&ns.inside(&target), &[1])
        .iter()
        .all(|v| *v == Some(1)));
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty());
    assert!(versions(&target, &[1]).iter().all(|v| *v == Some(1)));
    assert_eq!(temp_files(&ns, &target), "");
}

/// A recovery that keeps failing (here: a stray file in the backup dir) is retried at every
/// start; it takes its snapshot once, so repeated starts do not rotate older snapshots out under
/// BACKUP_LIMIT. With the runtime state kept (a restart loop) and without it (after a reboot).
#[test]
fn failing_recovery_takes_one_snapshot_however_often_retried() {
    if !require_root() {
        return;
    }
    // With the start clone and without it (each failed attempt took a snapshot of the disk as
    // found then, rotating older ones out).
    for (keep_state, clone) in [(true, true), (false, true), (false, false)] {
        let ns = Ns::new();
        let target = ns.data().join("t");
        std::fs::create_dir(&target).expect("mkdir");
        write_version(&ns, &target, 1);
        ns.write_conf(&[&target], "BACKUP_LIMIT=2");
        ns.asd_ok(&["sync"]);
        let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
        let older = p.snapshot("20200101_000000");
        std::fs::write(&older, "an older crash's snapshot").expect("plant");
        ns.drop_all_mounts();
        if !keep_state {
            std::fs::remove_dir_all(ns.run_dir()).expect("forget runtime state");
        }
        std::fs::write(p.backup.join("stray"), "x").expect("stray file");
        if !clone {
            std::fs::remove_dir_all(&p.old).expect("remove the start clone");
        }
        for attempt in 0..3 {
            let out = ns.asd_cmd(&["sync"]).output().expect("asd");
            let text = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "attempt {attempt} should fail");
            assert!(text.contains("not an empty directory"), "{text}");
        }
        let snaps = |ns: &Ns| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(ns.data())
                .expect("readdir")
                .flatten()
                .map(|e| e.path())
                .filter(|x| x.to_string_lossy().contains("-crashrecovery-"))
                .collect();
            v.sort();
            v
        };
        // A recovery that cannot finish says so before it changes anything: no snapshot yet.
        assert_eq!(
            snaps(&ns),
            vec![older.clone()],
            "failed attempts took snapshots (keep_state {keep_state}, clone {clone})"
        );
        std::fs::remove_file(p.backup.join("stray")).expect("fix");
        let out = ns.asd_ok(&["sync"]);
        assert!(out.contains("recovered"), "{out}");
        let after = snaps(&ns);
        assert_eq!(
            after.len(),
            2,
            "the older snapshot and one new one: {after:?}"
        );
        assert_eq!(after[0], older);
        let restored = extract(&ns, &after[1]);
        assert!(versions(&restored, &[1]).iter().all(|v| *v == Some(1)));
        ns.asd_ok(&["unsync"]);
        assert!(versions(&target, &[1]).iter().all(|v| *v == Some(1)));
    }
}

/// A killed daemon without a reboot: the mounts and the RAM copy survive; the next start adopts
/// them and the next resync writes everything, including what was written after the kill.
#[test]
fn kill_without_reboot_keeps_ram_copy() {
    if !require_root() {
        return;
    }
    let s = setup();
    write_version(&s.ns, &s.target, 3);
    kill_during(&s.ns, "resync", Duration::from_millis(150));
    let out = s.ns.asd_ok(&["sync"]);
    assert!(out.contains("already running"), "{out}");
    s.ns.asd_ok(&["resync"]);
    let vs = versions(&s.ns.inside(&s.paths.backup), &[3]);
    assert!(
        vs.iter().all(|v| *v == Some(3)),
        "everything in RAM reached the disk"
    );
    s.ns.asd_ok(&["unsync"]);
    assert!(versions(&s.target, &[3]).iter().all(|v| *v == Some(3)));
    assert!(
        snapshots(&s.ns, &s.paths).is_empty(),
        "no crash, no snapshot"
    );
}

/// Restores the writeback sysctls even if the test fails.
struct Writeback(Vec<(String, String)>);

impl Writeback {
    fn off() -> Writeback {
        let keys = ["vm.dirty_writeback_centisecs", "vm.dirty_expire_centisecs"];
        let saved = keys
            .iter()
            .map(|k| {
                let path = format!("/proc/sys/{}", k.replace('.', "/"));
                (
                    path.clone(),
                    std::fs::read_to_string(&path)
                        .expect("sysctl")
                        .trim()
                        .to_string(),
                )
            })
            .collect();
        std::fs::write("/proc/sys/vm/dirty_writeback_centisecs", "0").expect("sysctl");
        std::fs::write("/proc/sys/vm/dirty_expire_centisecs", "360000").expect("sysctl");
        Writeback(saved)
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        for (path, value) in &self.0 {
            let _ = std::fs::write(path, value);
        }
    }
}

/// Power cut right after a resync reported success: copy the disk image while it is still mounted
/// with background writeback off, so the copy holds only what was made durable.
#[test]
fn power_cut_after_resync_keeps_its_data() {
    power_cut("");
}

/// The same in overlay mode: the persisted change set must survive, and recovery applies it.
#[test]
fn power_cut_after_overlay_resync_keeps_its_data() {
    power_cut("USE_OVERLAYFS=yes");
}

fn power_cut(extra: &str) {
    if !require_root() {
        return;
    }
    // The writeback sysctls are global: one power cut at a time, or one test's restore would
    // switch writeback back on under the other.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Ns::new();
    let img = ns.root.join("disk.img");
    let mnt = ns.root.join("disk");
    std::fs::create_dir(&mnt).expect("mkdir");
    ns.sh_ok(&format!(
        "truncate -s 512M '{i}' && mkfs.ext4 -q -F '{i}' && mount -o loop '{i}' '{m}'",
        i = img.display(),
        m = mnt.display()
    ));
    let target = mnt.join("t");
    std::fs::create_dir(ns.inside(&target)).expect("mkdir");
    write_version(&ns, &target, 1);
    ns.sh_ok("sync");
    ns.write_conf(&[&target], extra);
    ns.asd_ok(&["sync"]);
    let cut = ns.root.join("cut.img");
    {
        let _wb = Writeback::off();
        write_version(&ns, &target, 2);
        ns.asd_ok(&["resync"]);
        // The power cut: whatever is not on the image now is lost.
        ns.sh_ok(&format!(
            "cp --sparse=always '{}' '{}'",
            img.display(),
            cut.display()
        ));
    }
    ns.asd_ok(&["unsync"]);
    ns.sh_ok(&format!("umount '{}'", mnt.display()));
    // The reboot: repair the image, mount it where it was, and let asd recover.
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(&cut)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.code().unwrap_or(8) < 4,
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    ns.drop_all_mounts();
    ns.sh_ok(&format!(
        "mount -o loop '{}' '{}'",
        cut.display(),
        mnt.display()
    ));
    let out = ns.asd_ok(&["sync"]);
    assert!(out.contains("recovered"), "{out}");
    ns.asd_ok(&["unsync"]);
    let vs = versions(&ns.inside(&target), &[2]);
    assert!(
        vs.iter().all(|v| *v == Some(2)),
        "every file of the resync survived the power cut"
    );
    ns.sh_ok(&format!("umount '{}'", mnt.display()));
}

/// Killed while cleaning up after the final write-back: the RAM copy was renamed aside and half
/// deleted. The next start must not take that half copy for the newest data (which would delete
/// the other half from disk).
#[test]
fn kill_during_cleanup_never_trusts_a_half_deleted_ram_copy() {
    if !require_root() {
        return;
    }
    let s = setup();
    // What unsync has done when killed mid-cleanup: written back, unmounted, RAM copy renamed
    // to its trash name and partly deleted; the state still says synced.
    s.ns.sh_ok(&format!(
        "umount '{t}' && umount '{b}' && mv '{v}' '{v}.asd-trash' && rm -rf '{v}.asd-trash/sub'",
        t = s.target.display(),
        b = s.paths.backup.display(),
        v = s.paths.volatile.display()
    ));
    let out = s.ns.asd_ok(&["sync"]);
    assert!(out.contains("recovered"), "{out}");
    let vs = versions(&s.ns.inside(&s.paths.backup), &[2]);
    assert!(
        vs.iter().all(|v| *v == Some(2)),
        "data of the completed write-back was deleted"
    );
    assert!(!s
        .ns
        .inside(&s.paths.volatile.with_extension("asd-trash"))
        .exists());
    s.ns.asd_ok(&["unsync"]);
    assert!(versions(&s.target, &[2]).iter().all(|v| *v == Some(2)));
}

/// Crashes in the first write-back after sync, the one that copies every start file into the
/// copy-on-write start clone before replacing it (see `copy::keep`), at random points: kill -9
/// at a random instant of a resync or an unsync, and aborts injected after a random number of
/// the renames that put kept copies in place, or of the renames that replace start files. After
/// each, with or without the runtime state, the snapshot recovery takes holds the start state
/// (v1) throughout, and nothing written back is lost. The points come from a fixed seed
/// (`ASD_CRASH_SEED` replays one, printed; `ASD_CRASH_RUNS` sets how many, default 12).
#[test]
fn random_crashes_while_the_start_state_is_kept() {
    if !require_root() {
        return;
    }
    require_test_hook("ASD_TEST_CRASH_IN_KEEP");
    let seed: u64 = std::env::var("ASD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_2026_1204);
    let runs: u64 = std::env::var("ASD_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("ASD_CRASH_SEED={seed} ASD_CRASH_RUNS={runs}");
    let mut state = seed;
    // splitmix64
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    // v1 at the start, synced; v2 written in RAM, not yet back.
    const KEPT_FILES: usize = 800;
    let fresh = || {
        let ns = Ns::new();
        let target = ns.data().join("t");
        std::fs::create_dir(&target).expect("mkdir");
        versioned::write_version(&ns, &target, 1, KEPT_FILES);
        ns.write_conf(&[&target], "");
        ns.asd_ok(&["sync"]);
        versioned::write_version(&ns, &target, 2, KEPT_FILES);
        let paths = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
        Setup {
            ns,
            target,
            paths,
            resync_time: Duration::ZERO,
            files: KEPT_FILES,
        }
    };
    // How long each command takes with this much to keep: kills land in [0, 1.3 x] of it.
    let span = |cmd: &str| {
        let s = fresh();
        let began = std::time::Instant::now();
        s.ns.asd_ok(&[cmd]);
        began.elapsed()
    };
    let spans = [("resync", span("resync")), ("unsync", span("unsync"))];
    for run in 0..runs {
        let keep_state = next() % 2 == 0;
        let s = fresh();
        let (what, finished) = match run % 4 {
            kind @ (0 | 1) => {
                let (cmd, took) = spans[kind as usize];
                let after = took.mul_f64(1.3 * (next() % 10_000) as f64 / 10_000.0);
                let finished = kill_during(&s.ns, cmd, after);
                (
                    format!("{cmd} killed after {after:?} of {took:?}"),
                    finished,
                )
            }
            kind => {
                let var = if kind == 2 {
                    "ASD_TEST_CRASH_IN_KEEP"
                } else {
                    "ASD_TEST_CRASH_AFTER_RENAMES"
                };
                let n = (next() % KEPT_FILES as u64).to_string();
                let out =
                    s.ns.asd_cmd(&["resync"])
                        .env(var, &n)
                        .output()
                        .expect("asd");
                assert!(!out.status.success(), "{var}={n} must stop the resync");
                (format!("resync aborted by {var}={n}"), false)
            }
        };
        // An unsync killed after it renamed the clone aside had written everything back: the
        // snapshot is then of the disk, all v2.
        let clone_there = s.ns.inside(&s.paths.old).exists();
        eprintln!(
            "run {run}: {what} (finished: {finished}, start clone there: {clone_there}, state \
             kept: {keep_state})"
        );
        reboot(&s, keep_state);
        if finished && what.starts_with("unsync") {
            let vs = versioned::versions(&s.ns.inside(&s.target), &[2], KEPT_FILES);
            assert!(
                vs.iter().all(|v| *v == Some(2)),
                "a finished unsync wrote v2 back"
            );
            continue;
        }
        let out = s.ns.asd_ok(&["sync"]);
        check_recovered_with_snapshot(&s, &out, &[1, 2], if clone_there { 1 } else { 2 });
    }
}
