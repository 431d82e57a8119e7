//! Crashes at random points of sync and unsync, then a reboot (issue 8 item 5): boot and
//! shutdown are when sync and unsync run, so these are the likeliest crashes of all. Every kill
//! lands at a random offset within (a bit more than) the time the command takes, in root mode and
//! in per-user mode through a real helper, with the runtime state kept (a crash of asd alone, or
//! a restart loop) and wiped (a reboot: /run is gone). After each one the next `asd sync` must
//! recover by itself: exit 0, every file whole and either the version last written back or the
//! newer one, and after `asd unsync` nothing left beside the target but snapshots.
//!
//! `ASD_CRASH_SEED` replays a run (the seed is printed), `ASD_CRASH_RUNS` sets the kills per
//! case (default 5; 8 cases). A kill is placed in time, not at a numbered step, so a replay lands
//! near, not exactly at, the same point.

mod common;
use common::versioned::{versions, write_version};
use common::world::World;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const FILES: usize = 600;

/// splitmix64: small, good enough to spread kill points, and the same for a seed everywhere.
struct Rng(u64);

impl Rng {
    fn from_env(case: &str) -> Rng {
        let seed = std::env::var("ASD_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x00A5_D008_2026_1204_u64);
        eprintln!("{case}: ASD_CRASH_SEED={seed}");
        // Each case draws its own sequence from the one seed.
        let salt = case
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
        Rng(seed ^ salt)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A point in `[0, 1.3 × span]`: mostly inside the command, sometimes just after it ended.
    fn offset(&mut self, span: Duration) -> Duration {
        span.mul_f64(1.3 * (self.next() % 10_000) as f64 / 10_000.0)
    }
}

fn runs() -> usize {
    std::env::var("ASD_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// Where asd runs: as root on its own, or as a user through the helper.
enum Site {
    Root(Ns),
    User {
        w: World,
        user: &'static str,
        conf: PathBuf,
    },
}

impl Site {
    fn ns(&self) -> &Ns {
        match self {
            Site::Root(ns) => ns,
            Site::User { w, .. } => &w.ns,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        match self {
            Site::Root(ns) => ns.asd_cmd(args),
            Site::User { w, user, conf } => w.asd_cmd_as(user, conf, args),
        }
    }

    fn asd_ok(&self, args: &[&str]) -> String {
        succeeded(
            &self.cmd(args).output().expect("run asd"),
            &format!("asd {args:?}"),
        )
    }

    /// Writes version `v` of the tree into `dir` (as the target's owner).
    fn write(&self, dir: &Path, v: u32) {
        write_version(self.ns(), dir, v, FILES);
        if let Site::User { user, .. } = self {
            self.ns()
                .sh_ok(&format!("chown -R {user}: '{}'", dir.display()));
        }
    }

    /// Starts `asd cmd`, and kills it and its workers (its process group) with SIGKILL after
    /// `after`. Returns whether it had finished by then.
    fn kill_during(&self, cmd: &str, after: Duration) -> bool {
        use std::os::unix::process::CommandExt;
        let mut c = self.cmd(&[cmd]);
        c.process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().expect("spawn asd");
        std::thread::sleep(after);
        let finished = child.try_wait().ok().flatten().is_some();
        let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        finished
    }

    /// Power cut and reboot: mounts and RAM gone; the runtime state too unless `keep_state`.
    fn reboot(&mut self, keep_state: bool) {
        match self {
            Site::Root(ns) => {
                ns.drop_all_mounts();
                if !keep_state {
                    let _ = std::fs::remove_dir_all(ns.run_dir());
                }
            }
            Site::User { w, user, .. } => w.power_cut(&[user], keep_state),
        }
        assert!(
            self.mounts_of_target().is_empty(),
            "mounts left: {:?}",
            self.mounts_of_target()
        );
    }

    fn mounts_of_target(&self) -> Vec<String> {
        let ns = self.ns();
        let mut m = ns.our_mounts();
        if let Site::User { user, .. } = self {
            let info =
                std::fs::read_to_string(format!("/proc/{}/mountinfo", ns.pid)).unwrap_or_default();
            m.extend(
                info.lines()
                    .filter_map(|l| l.split(' ').nth(4))
                    .filter(|p| p.starts_with(&format!("/home/{user}/")))
                    .map(str::to_string),
            );
        }
        m
    }
}

/// A fresh site with target `name` holding version 1.
fn site(user_mode: bool, name: &str) -> Option<(Site, PathBuf, asd::paths::TargetPaths)> {
    if user_mode {
        let w = World::new()?;
        let user = "asdalice";
        let (_, target, conf) = w.user_setup(user, name);
        let site = Site::User { w, user, conf };
        site.ns()
            .sh_ok(&format!("rm -rf '{t}/sub/f'", t = target.display()));
        site.write(&target, 1);
        let p = asd::paths::TargetPaths::new(&target, user, &site.ns().vol()).expect("paths");
        Some((site, target, p))
    } else {
        if !require_root() {
            return None;
        }
        let ns = Ns::new();
        let target = ns.data().join(name);
        std::fs::create_dir(&target).expect("mkdir");
        ns.write_conf(&[&target], "");
        let site = Site::Root(ns);
        site.write(&target, 1);
        let p = asd::paths::TargetPaths::new(&target, "root", &site.ns().vol()).expect("paths");
        Some((site, target, p))
    }
}

/// What asd keeps beside the target other than snapshots: must be nothing once unsynced.
fn leftovers_beside(ns: &Ns, p: &asd::paths::TargetPaths) -> Vec<String> {
    let prefix = p
        .backup
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_dir(ns.inside(p.parent()))
        .expect("list the target's parent")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && !n.ends_with(".tar.zstd"))
        .collect()
}

/// Every file whole and one of `allowed`; none missing.
fn assert_whole(root: &Path, allowed: &[u32], what: &str) {
    let vs = versions(root, allowed, FILES);
    let missing = vs.iter().filter(|v| v.is_none()).count();
    assert_eq!(missing, 0, "{what}: {missing} files missing");
}

fn finish(site: &Site, p: &asd::paths::TargetPaths, target: &Path, allowed: &[u32]) {
    site.asd_ok(&["unsync"]);
    assert!(
        site.mounts_of_target().is_empty(),
        "left mounted: {:?}",
        site.mounts_of_target()
    );
    assert_whole(&site.ns().inside(target), allowed, "on disk after unsync");
    let left = leftovers_beside(site.ns(), p);
    assert!(left.is_empty(), "left beside the target: {left:?}");
}

fn case_name(command: &str, user_mode: bool, keep_state: bool) -> String {
    format!(
        "{command}-{}-{}",
        if user_mode { "user" } else { "root" },
        if keep_state { "keep" } else { "wipe" }
    )
}

/// Kills `asd sync` at random points; the next sync recovers, the data is version 1 throughout.
fn crash_in_sync(user_mode: bool, keep_state: bool) {
    let case = case_name("sync", user_mode, keep_state);
    let Some((mut site, target, p)) = site(user_mode, &format!("crash-{case}")) else {
        return;
    };
    let mut rng = Rng::from_env(&case);
    let start = Instant::now();
    site.asd_ok(&["sync"]);
    let span = start.elapsed();
    site.asd_ok(&["unsync"]);
    for run in 0..runs() {
        let after = rng.offset(span);
        let finished = site.kill_during("sync", after);
        eprintln!("{case} run {run}: killed after {after:?} of {span:?} (finished: {finished})");
        site.reboot(keep_state);
        let out = site.asd_ok(&["sync"]);
        assert!(out.contains("sync successful"), "{case} run {run}: {out}");
        assert_whole(&site.ns().inside(&p.backup), &[1], "the disk side");
        assert_whole(&site.ns().inside(&target), &[1], "the RAM copy");
        finish(&site, &p, &target, &[1]);
    }
}

/// Kills `asd unsync` at random points, after version `2k` was written back by a resync and
/// `2k+1` written in RAM; after the reboot, every file is one of those two, whole.
fn crash_in_unsync(user_mode: bool, keep_state: bool) {
    let case = case_name("unsync", user_mode, keep_state);
    let Some((mut site, target, p)) = site(user_mode, &format!("crash-{case}")) else {
        return;
    };
    let mut rng = Rng::from_env(&case);
    site.asd_ok(&["sync"]);
    site.write(&target, 2);
    let start = Instant::now();
    site.asd_ok(&["unsync"]);
    let span = start.elapsed();
    for run in 0..runs() as u32 {
        let (durable, fresh) = (2 * run + 2, 2 * run + 3);
        site.asd_ok(&["sync"]);
        site.write(&target, durable);
        site.asd_ok(&["resync"]);
        site.write(&target, fresh);
        let after = rng.offset(span);
        let finished = site.kill_during("unsync", after);
        eprintln!("{case} run {run}: killed after {after:?} of {span:?} (finished: {finished})");
        site.reboot(keep_state);
        let out = site.asd_ok(&["sync"]);
        assert!(out.contains("sync successful"), "{case} run {run}: {out}");
        assert_whole(
            &site.ns().inside(&p.backup),
            &[durable, fresh],
            "the disk side",
        );
        finish(&site, &p, &target, &[durable, fresh]);
    }
}

#[test]
fn random_kills_in_sync_root_state_kept() {
    crash_in_sync(false, true);
}

#[test]
fn random_kills_in_sync_root_state_wiped() {
    crash_in_sync(false, false);
}

#[test]
fn random_kills_in_sync_per_user_state_kept() {
    crash_in_sync(true, true);
}

#[test]
fn random_kills_in_sync_per_user_state_wiped() {
    crash_in_sync(true, false);
}

#[test]
fn random_kills_in_unsync_root_state_kept() {
    crash_in_unsync(false, true);
}

#[test]
fn random_kills_in_unsync_root_state_wiped() {
    crash_in_unsync(false, false);
}

#[test]
fn random_kills_in_unsync_per_user_state_kept() {
    crash_in_unsync(true, true);
}

#[test]
fn random_kills_in_unsync_per_user_state_wiped() {
    crash_in_unsync(true, false);
}

/// The two states a crash leaves the start clone in, made by hand (the random kills hit them
/// only now and then): half-built (`-old.partial`, killed while sync cloned) and half-deleted
/// (`-old.asd-trash`, killed while unsync cleaned up). Either holds hard links to the target's
/// files; they are asd's own, so the next start recovers instead of refusing the target with the
/// hard-link safety check. Both modes, state wiped (a reboot).
fn leftover_clone(user_mode: bool, which: &str) {
    let case = format!("clone-{which}-{}", if user_mode { "user" } else { "root" });
    let Some((mut site, target, p)) = site(user_mode, &format!("crash-{case}")) else {
        return;
    };
    site.asd_ok(&["sync"]);
    site.reboot(false);
    let clone = match which {
        "partial" => p.old_partial.clone(),
        _ => PathBuf::from(format!("{}.asd-trash", p.old.display())),
    };
    // What the crash left: the clone (renamed to what the crash interrupted), holding links to
    // half of the target's files. asd's clone holds only directories where the filesystem
    // records birth times (see copy::keep): the links are added as a full clone has them (asd
    // 6.0's, or asd's where there are no birth times).
    let ns = site.ns();
    ns.sh_ok(&format!(
        "set -e; mv '{old}' '{clone}'; cp -al '{target}/.' '{clone}/'; cd '{clone}'; \
         find . -type f -name 'f*[02468]' -delete",
        target = target.display(),
        old = p.old.display(),
        clone = clone.display()
    ));
    let links = ns.sh_ok(&format!(
        "find '{}' -type f -links +1 | wc -l",
        target.display()
    ));
    assert!(
        links.trim().parse::<usize>().unwrap_or(0) > 0,
        "the fixture must hold hard links"
    );
    let out = site.asd_ok(&["sync"]);
    assert!(out.contains("sync successful"), "{case}: {out}");
    assert_whole(&site.ns().inside(&target), &[1], "the RAM copy");
    finish(&site, &p, &target, &[1]);
    assert!(
        !site.ns().inside(&clone).exists(),
        "{case}: the leftover clone was not removed"
    );
}

#[test]
fn half_built_start_clone_root() {
    leftover_clone(false, "partial");
}

#[test]
fn half_deleted_start_clone_root() {
    leftover_clone(false, "trash");
}

#[test]
fn half_built_start_clone_per_user() {
    leftover_clone(true, "partial");
}

#[test]
fn half_deleted_start_clone_per_user() {
    leftover_clone(true, "trash");
}
