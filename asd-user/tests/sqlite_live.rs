//! Live databases stay consistent on disk (issue 12), end to end: asd in copy and in overlay
//! mode with two programs committing without pause in a target (a WAL database and a
//! rollback-journal one, each written by its own process in the test's mount namespace), on an
//! ext4 loop image with background writeback off.
//!
//! After every `asd resync`, what is on disk (copy mode: the original directory; overlay mode:
//! the persisted change set applied to a copy of the original) must open, pass
//! `integrity_check`, hold one transaction's state and every transaction committed before the
//! resync began; every tenth resync a power cut (a copy of the image: only what was made durable)
//! must show the same. At the end `asd unsync` with the programs still running leaves the target
//! in RAM (they see no error); once they stop, unsync writes everything, and a last power-cut
//! image goes through crash recovery. The writers never see an error (no SQLITE_BUSY they did
//! not wait for, no read-only file system).
//!
//! `ASD_SQLITE_RESYNCS` sets the resyncs per test (default 30), `ASD_SQLITE_CUT_EVERY` how often
//! a power cut is checked (default every 10th); `ASD_TEST_PLAIN_DATABASES=1` shows what asd did
//! before (a file-by-file copy).

mod common;
mod sqlite_common;

use std::path::{Path, PathBuf};

use common::*;
use sqlite_common::*;

/// The writer processes run this test binary (see `sqlite_common::ProcWriter`).
#[test]
fn zz_writer_process() {
    writer_process_main();
}

const DBS: [Journal; 2] = [Journal::Wal, Journal::Rollback];

/// Restores the writeback sysctls even if the test fails.
struct Writeback(Vec<(String, String)>);

impl Writeback {
    fn off() -> Writeback {
        let saved = ["dirty_writeback_centisecs", "dirty_expire_centisecs"]
            .iter()
            .map(|k| {
                let path = format!("/proc/sys/vm/{k}");
                let v = std::fs::read_to_string(&path).expect("sysctl");
                (path, v.trim().to_string())
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Copy,
    Overlay,
}

struct Case {
    ns: Ns,
    mode: Mode,
    img: PathBuf,
    /// Where the image is mounted (in the namespace), the target's parent.
    mnt: PathBuf,
    target: PathBuf,
    p: asd::paths::TargetPaths,
    /// Host-side scratch space for checks.
    scratch: PathBuf,
    /// Control files of the writer processes (writable by the owner).
    ipc: PathBuf,
    owner: Option<String>,
}

impl Case {
    fn new(mode: Mode, owner: Option<&str>) -> Case {
        let ns = Ns::new();
        let img = ns.root.join("disk.img");
        let mnt = ns.root.join("disk");
        std::fs::create_dir(&mnt).expect("mkdir");
        ns.sh_ok(&format!(
            "truncate -s 1G '{i}' && mkfs.ext4 -q -F '{i}' && mount -o loop '{i}' '{m}'",
            i = img.display(),
            m = mnt.display()
        ));
        let target = mnt.join("t");
        let scratch = ns.root.join("scratch");
        let ipc = ns.root.join("ipc");
        for d in [&scratch, &ipc] {
            std::fs::create_dir(d).expect("mkdir");
        }
        ns.sh_ok(&format!("chmod 0777 '{}'", ipc.display()));
        // The databases as programs left them: made here, copied into the target.
        std::fs::create_dir(ns.inside(&target)).expect("mkdir target");
        let made = scratch.join("made");
        std::fs::create_dir(&made).expect("mkdir");
        for j in DBS {
            create(&made.join(j.file()), j);
            std::fs::copy(made.join(j.file()), ns.inside(&target.join(j.file())))
                .expect("copy the database into the target");
        }
        std::fs::write(ns.inside(&target.join("notes.txt")), "plain file\n").expect("write");
        if let Some(u) = owner {
            ns.sh_ok(&format!("chown -R {u}: '{}'", target.display()));
        }
        ns.sh_ok(&format!("sync -f '{}'", mnt.display()));
        let extra = match mode {
            Mode::Copy => "",
            Mode::Overlay => "USE_OVERLAYFS=yes",
        };
        ns.write_conf(&[&target], extra);
        let p = asd::paths::TargetPaths::new(&target, "root", &ns.vol()).expect("paths");
        Case {
            ns,
            mode,
            img,
            mnt,
            target,
            p,
            scratch,
            ipc,
            owner: owner.map(str::to_string),
        }
    }

    fn start_writers(&self) -> Vec<ProcWriter> {
        DBS.iter()
            .map(|&j| {
                let cmd = match &self.owner {
                    None => self.ns.cmd("env"),
                    Some(u) => {
                        let mut c = self.ns.cmd("setpriv");
                        c.args(["--reuid", u, "--regid", u, "--init-groups"]);
                        c
                    }
                };
                ProcWriter::start(cmd, &self.target.join(j.file()), j, &self.ipc)
            })
            .collect()
    }

    /// The directory holding the databases as they are on disk: on the mounted image (`cut`
    /// None) or on a power-cut copy of it mounted at `cut`. Copy mode: the original directory
    /// itself; overlay mode: a copy of it with the persisted change set applied.
    fn on_disk(&self, cut: Option<&Path>, tag: &str) -> PathBuf {
        let on_image = |p: &Path| match cut {
            None => p.to_path_buf(),
            Some(root) => root.join(p.strip_prefix(&self.mnt).expect("on the image")),
        };
        // While synced the original is at the backup path (the target shows the RAM copy).
        let original = match cut {
            None => self.p.backup.clone(),
            Some(root) => root.join("t"),
        };
        match self.mode {
            Mode::Copy => self.ns.inside(&original),
            Mode::Overlay => {
                let copy = self
                    .scratch
                    .join(format!("applied-{}", tag.replace(' ', "-")));
                let _ = std::fs::remove_dir_all(&copy);
                self.ns.sh_ok(&format!(
                    "cp -a '{}' '{}'",
                    original.display(),
                    copy.display()
                ));
                let changes = on_image(&self.p.changes_state());
                asd::overlay::apply(&self.ns.inside(&changes), &copy).expect("apply the changes");
                copy
            }
        }
    }

    /// Checks every database on the disk below `root` against what was committed before.
    fn check_all(&self, cut: Option<&Path>, tag: &str, before: &[u64], tally: &mut Tally) {
        let dir = self.on_disk(cut, tag);
        self.check_dir(&dir, tag, before, tally);
    }

    fn check_dir(&self, dir: &Path, tag: &str, before: &[u64], tally: &mut Tally) {
        for (j, b) in DBS.iter().zip(before) {
            let scratch = self.scratch.join(format!("check-{}", j.name()));
            tally.record(
                &format!("{tag}, {} database", j.name()),
                *b,
                check(dir, &j.file(), &scratch),
            );
        }
    }

    /// A power cut now: a copy of the image holds what was made durable; after `e2fsck`, the
    /// databases there are checked.
    fn power_cut(&self, tag: &str, before: &[u64], tally: &mut Tally) {
        let cut = self.ns.root.join("cut.img");
        let at = self.ns.root.join("cut");
        self.cut_image(&cut);
        let _ = std::fs::create_dir(&at);
        self.ns.sh_ok(&format!(
            "mount -o loop,ro '{}' '{}'",
            cut.display(),
            at.display()
        ));
        self.check_all(Some(&at), tag, before, tally);
        self.ns.sh_ok(&format!("umount '{}'", at.display()));
        let _ = std::fs::remove_file(&cut);
    }

    /// Copies the image as a power cut leaves it, and repairs the copy as the next boot does.
    fn cut_image(&self, cut: &Path) {
        self.ns.sh_ok(&format!(
            "cp --sparse=always '{}' '{}'",
            self.img.display(),
            cut.display()
        ));
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fy")
            .arg(cut)
            .output()
            .expect("e2fsck");
        assert!(
            fsck.status.code().unwrap_or(8) < 4,
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }

    /// The writer's errors so far, for the assertion message.
    fn writer_errors(writers: &[ProcWriter]) -> Vec<String> {
        writers
            .iter()
            .filter_map(|w| {
                w.error()
                    .map(|e| format!("{} writer: {e}", w.journal.name()))
            })
            .collect()
    }
}

fn cut_every() -> u32 {
    std::env::var("ASD_SQLITE_CUT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(10)
}

fn live(mode: Mode, owner: Option<&str>, default_rounds: u32) {
    if !require_root() {
        return;
    }
    // The writeback sysctls are global: one test at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = std::time::Instant::now();
    let verbose = std::env::var_os("ASD_SQLITE_VERBOSE").is_some();
    let phase = |what: &str| {
        if verbose {
            eprintln!("{:.1} s: {what}", t0.elapsed().as_secs_f64());
        }
    };
    if let Some(u) = owner {
        test_user(u);
    }
    let c = Case::new(mode, owner);
    let _wb = Writeback::off();
    phase("set up");
    c.ns.asd_ok(&["sync"]);
    phase("synced");
    let writers = c.start_writers();
    phase("writers started");
    let mut tally = Tally::default();
    let mut cuts = Tally::default();
    let rounds = rounds(default_rounds);
    let every = cut_every();
    let mut longest = 0u64;
    for i in 1..=rounds {
        phase(&format!("resync {i}"));
        let before: Vec<u64> = writers.iter().map(ProcWriter::committed).collect();
        // DEBUG=1 (not -v) reaches the worker that copies a user's data too.
        let out =
            c.ns.asd_cmd(&["resync"])
                .env("DEBUG", "1")
                .output()
                .expect("asd");
        let text = output_text(&out);
        if !out.status.success() {
            tally.tried += 1;
            tally.corrupt.push(format!("resync {i} failed: {text}"));
            continue;
        }
        longest = longest.max(longest_hold(&text));
        phase("resynced");
        c.check_all(None, &format!("resync {i}"), &before, &mut tally);
        phase("checked");
        if i.is_multiple_of(every) {
            c.power_cut(&format!("power cut after resync {i}"), &before, &mut cuts);
        }
        let errors = Case::writer_errors(&writers);
        assert!(errors.is_empty(), "{errors:?}");
    }
    eprintln!("longest lock held on a database: {longest} µs");
    // A last resync, and the disk as a power cut right after it leaves it, for crash recovery
    // below.
    let before_final: Vec<u64> = writers.iter().map(ProcWriter::committed).collect();
    c.ns.asd_ok(&["resync"]);
    phase("final resync done");
    let final_cut = c.ns.root.join("final.img");
    c.cut_image(&final_cut);
    phase("final image cut");
    // Unsync while the programs write: the target stays in RAM, they see nothing.
    let out = c.ns.asd(&["unsync"]);
    assert!(!out.status.success(), "unsync of a target in use must fail");
    assert!(output_text(&out).contains("busy"), "{}", output_text(&out));
    let mut last = Vec::new();
    for w in writers {
        let name = w.journal.name();
        last.push(
            w.stop()
                .unwrap_or_else(|e| panic!("the {name} writer met an error: {e}")),
        );
    }
    phase("writers stopped");
    c.ns.asd_ok(&["unsync"]);
    let mounts: Vec<String> =
        c.ns.our_mounts()
            .into_iter()
            .filter(|m| Path::new(m) != c.mnt)
            .collect();
    assert!(mounts.is_empty(), "{mounts:?}");
    let mut end = Tally::default();
    c.check_dir(&c.ns.inside(&c.target), "after unsync", &last, &mut end);
    // Nothing of the databases' logs or of asd's copies is left beside them.
    let left: Vec<String> = std::fs::read_dir(c.ns.inside(&c.target))
        .expect("readdir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-wal") || n.contains("-journal") || n.starts_with(".#asd"))
        .collect();
    assert!(left.is_empty(), "left in the target: {left:?}");
    phase("unsynced and checked");
    // The reboot after the power cut: asd recovers the target from what the last resync left.
    c.ns.sh_ok(&format!("umount '{}'", c.mnt.display()));
    c.ns.drop_all_mounts();
    c.ns.sh_ok(&format!(
        "mount -o loop '{}' '{}'",
        final_cut.display(),
        c.mnt.display()
    ));
    phase("the cut image mounted");
    let out = c.ns.asd_ok(&["sync"]);
    assert!(out.contains("recovered"), "{out}");
    c.ns.asd_ok(&["unsync"]);
    let mut recovered = Tally::default();
    c.check_dir(
        &c.ns.inside(&c.target),
        "after recovery",
        &before_final,
        &mut recovered,
    );
    c.ns.sh_ok(&format!("umount '{}'", c.mnt.display()));
    tally.assert_clean(&format!("{mode:?} mode, resyncs"));
    cuts.assert_clean(&format!("{mode:?} mode, power cuts"));
    end.assert_clean(&format!("{mode:?} mode, unsync"));
    recovered.assert_clean(&format!("{mode:?} mode, recovery"));
}

/// The longest lock hold `asd -v resync` logged for a database, in µs.
fn longest_hold(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("consistent state"))
        .filter_map(|l| {
            let v = l.split("lock_held_us=").nth(1)?;
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn copy_mode_keeps_live_databases_consistent() {
    live(Mode::Copy, None, 30);
}

#[test]
fn overlay_mode_keeps_live_databases_consistent() {
    live(Mode::Overlay, None, 30);
}

/// The same where the data belongs to a user (root's asd copies it in a worker that has become
/// that user, and the programs run as the user): fewer resyncs.
#[test]
fn copy_mode_keeps_a_users_live_databases_consistent() {
    live(Mode::Copy, Some("asdtest1"), 10);
}
