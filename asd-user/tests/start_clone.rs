//! The copy-on-write start clone (`copy::keep`): a skeleton at sync, filled by write-backs with
//! what they replace or delete of the start state; the crash-recovery snapshot reads it merged
//! with the tree. Checked against independent tools: the snapshot, extracted by GNU tar, must
//! equal a `cp -a` of the start tree per `rsync -an --itemize-changes` (data, modes, owners,
//! times, symlinks, fifos, hard links aside), after several write-backs of every kind of change.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use asd::copy::{self, CopyOptions};

mod common;
use common::{have, require_root, rsync_itemize, run_job_as, test_user};

fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `rsync -aXn --delete --itemize-changes a/ b/`: empty when the trees are equal.
fn tree_diff(a: &Path, b: &Path) -> String {
    rsync_itemize("-aXn", a, b)
}

fn birth_times_here(dir: &Path) -> bool {
    std::fs::metadata(dir).and_then(|m| m.created()).is_ok()
}

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    fn new() -> Site {
        // On disk (ext4 here), where birth times are recorded: /tmp may be tmpfs.
        let tmp = tempfile::Builder::new()
            .prefix("asd-start-clone-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let root = tmp.path().to_path_buf();
        Site { _tmp: tmp, root }
    }
    /// A site, if its filesystem records birth times (else the test says it is skipped).
    fn with_birth_times() -> Option<Site> {
        let s = Site::new();
        if !birth_times_here(&s.root) {
            eprintln!("SKIP: no birth times on {}", s.root.display());
            return None;
        }
        Some(s)
    }

    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn try_write_back(ram: &Path, disk: &Path, old: &Path) -> Result<copy::CopyStats, copy::CopyError> {
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..CopyOptions::default()
    };
    copy::write_back(ram, disk, &opts, None, Some(old), None)
}

fn write_back(ram: &Path, disk: &Path, old: &Path) -> copy::CopyStats {
    try_write_back(ram, disk, old).expect("write-back")
}

fn snapshot_matches_start(s: &Site, old: &Path, current: &Path, reference: &Path, round: &str) {
    let snap = s.p(&format!("snap-{round}.tar.zstd"));
    let file = std::fs::File::create(&snap).expect("create snapshot");
    asd::snapshot::write_start_state_to(old, Some(current), "t".as_ref(), file).expect("snapshot");
    let out = s.p(&format!("extracted-{round}"));
    std::fs::create_dir(&out).expect("mkdir");
    sh(&format!(
        "tar --zstd --xattrs --xattrs-include='*' -xpf '{}' -C '{}'",
        snap.display(),
        out.display()
    ));
    // Snapshots hold no xattrs (as asd 6.0's tar): everything else must match.
    let diff = rsync_itemize("-an", reference, &out.join("t"));
    assert!(
        diff.is_empty(),
        "{round}: the snapshot is not the start state:\n{diff}"
    );
}

#[test]
fn snapshot_of_a_start_clone_is_the_start_state_after_every_kind_of_change() {
    let Some(s) = Site::with_birth_times() else {
        return;
    };
    let t = s.p("t");
    // The start tree: nested directories, files of several sizes, modes, an xattr, a symlink,
    // a fifo, an empty directory, a hard-linked pair.
    sh(&format!(
        "cd '{r}'; mkdir -p t/a/b t/c/deep t/d/e t/empty t/keepdir
         for f in t/f1 t/f2 t/f3 t/a/x t/a/b/y t/c/deep/z t/d/e/w t/d/v t/keepdir/k t/ro; do
           head -c $((RANDOM % 9000 + 1)) /dev/urandom > $f; done
         echo file > t/e; echo sym > t/g
         chmod 0640 t/f2; chmod 0444 t/ro; chmod 0750 t/a/b
         setfattr -n user.colour -v blue t/f3
         ln -s f1 t/link; ln -s nowhere t/dangling; mkfifo t/pipe; ln t/f1 t/hard
         touch -d '2020-01-02 03:04:05' t/a/x t/a/b t/c
         cp -a t ref",
        r = s.root.display()
    ));
    let reference = s.p("ref");
    let old = s.p("old");
    std::fs::create_dir(&old).expect("mkdir old");
    copy::start_clone(&t, &old).expect("start clone");
    // Only the list of the start directories: nothing per directory or file.
    let names: Vec<_> = std::fs::read_dir(&old)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        [std::ffi::OsStr::new(".#asd-tmp.start-dirs")],
        "the start clone holds only its list of directories"
    );
    snapshot_matches_start(&s, &old, &t, &reference, "after sync");

    // The RAM copy, changed in every way; written back.
    let ram = s.p("ram");
    sh(&format!("cp -a '{}' '{}'", t.display(), ram.display()));
    sh(&format!(
        "cd '{}'; echo changed >> f1; rm f2; rm -r d; rm -r c; echo now-a-file > c
         rm e; mkdir e; echo in > e/new; rm g; ln -s f3 g; chmod 0600 f3
         setfattr -n user.colour -v red a/x; touch -h -d '2021-01-01' link
         rm pipe; echo new > brandnew; mkdir -p fresh/dir; echo n > fresh/dir/n
         touch -d '2022-02-02' a/b/y; chmod 0700 a/b; rm keepdir/k",
        ram.display()
    ));
    let st = write_back(&ram, &t, &old);
    assert!(st.deleted > 0, "deletions were written back: {st:?}");
    assert!(tree_diff(&ram, &t).is_empty(), "the write-back is complete");
    snapshot_matches_start(&s, &old, &t, &reference, "after one write-back");

    // More changes, to start entries already kept and to entries born since.
    sh(&format!(
        "cd '{}'; echo again >> f1; echo more >> brandnew; rm -r fresh; rm a/b/y; rm -r e
         echo back > e; rm c; mkdir c; echo 2 > c/two; rm hard; rm -r a; rm ro",
        ram.display()
    ));
    write_back(&ram, &t, &old);
    assert!(
        tree_diff(&ram, &t).is_empty(),
        "the second write-back is complete"
    );
    snapshot_matches_start(&s, &old, &t, &reference, "after two write-backs");

    // Nothing left to keep: a third write-back of no changes keeps the snapshot as it is.
    write_back(&ram, &t, &old);
    snapshot_matches_start(&s, &old, &t, &reference, "after three write-backs");
    // What was kept is only what changed (f1, f2, f3, the fifo, ...), not the whole tree.
    let kept = walkdir_count(&old, |m| !m.is_dir());
    assert!(kept > 0 && kept < 25, "kept {kept} entries");
}

/// A start entry that cannot be kept (the clone cannot be written: a fault) does not hold the
/// user's data back: the write-back completes and says what it could not keep (a warning).
#[test]
fn a_start_entry_that_cannot_be_kept_does_not_hold_back_the_write_back() {
    let Some(s) = Site::with_birth_times() else {
        return;
    };
    let t = s.p("t");
    sh(&format!(
        "cd '{r}'; mkdir -p t/sub; echo start > t/sub/f; echo start > t/sub/g; cp -a t ref",
        r = s.root.display()
    ));
    let old = s.p("old");
    std::fs::create_dir(&old).expect("mkdir old");
    copy::start_clone(&t, &old).expect("start clone");
    // The clone is made unwritable, for root too (immutable): nothing can be kept.
    let root = rustix::process::geteuid().is_root();
    if root {
        sh(&format!("chattr +i '{}'", old.display()));
    } else {
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    }
    let ram = s.p("ram");
    sh(&format!(
        "cp -a '{t}' '{ram}'; echo new > '{ram}/sub/f'; rm '{ram}/sub/g'",
        t = t.display(),
        ram = ram.display()
    ));
    let res = try_write_back(&ram, &t, &old);
    if root {
        sh(&format!("chattr -i '{}'", old.display()));
    } else {
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    res.expect("the write-back completes");
    assert!(tree_diff(&ram, &t).is_empty(), "the user's data is on disk");
    assert_eq!(
        walkdir_count(&old, |_| true),
        1,
        "nothing was kept: only the list"
    );
}

/// As the owner, the way asd's workers run (a real user, through `asd`'s worker entry): a
/// read-only target root and read-only directories, whose files are changed and deleted, are
/// written back and their start state kept. Root would never notice a mode in its way.
#[test]
fn read_only_start_directories_as_their_owner() {
    if !require_root() || !have("setpriv") || !have("rsync") {
        return;
    }
    let (uid, gid) = test_user("asdkeep");
    // In the user's private home, on disk, made as the user's.
    let site = tempfile::Builder::new()
        .prefix("start-clone-")
        .tempdir_in("/home/asdkeep")
        .expect("tempdir");
    let r = site.path();
    if !birth_times_here(r) {
        eprintln!("SKIP: no birth times on {}", r.display());
        return;
    }
    sh(&format!(
        "cd '{r}'; mkdir -p t/ro/deep t/w old
         echo a > t/ro/a; echo b > t/ro/b; echo c > t/ro/deep/c; echo x > t/w/x
         chmod 0555 t/ro/deep t/ro; chown -R {uid}:{gid} t old; chmod 0555 t
         cp -a t ref; cp -a t ram
         chmod u+w ram ram/ro ram/ro/deep; echo changed >> ram/ro/a; rm ram/ro/b ram/ro/deep/c
         echo changed >> ram/w/x; chmod 0555 ram/ro/deep ram/ro ram",
        r = r.display()
    ));
    let as_user = |job: serde_json::Value| run_job_as(Command::new("setpriv"), uid, gid, &job);
    let (t, old, ram) = (r.join("t"), r.join("old"), r.join("ram"));
    as_user(serde_json::json!({"Clone": {"src": t, "dst": old}}));
    let text = as_user(serde_json::json!({"Copy": {
        "src": ram, "dst": t, "delete": true, "durable": true, "start_clone": old
    }}));
    assert!(!text.contains("not kept"), "everything was kept: {text}");
    assert!(tree_diff(&ram, &t).is_empty(), "written back");
    let snap = r.join("snap.tar.zstd");
    let file = std::fs::File::create(&snap).expect("create snapshot");
    asd::snapshot::write_start_state_to(&old, Some(&t), "t".as_ref(), file).expect("snapshot");
    let out = r.join("extracted");
    std::fs::create_dir(&out).expect("mkdir");
    sh(&format!(
        "tar --zstd -xpf '{}' -C '{}'",
        snap.display(),
        out.display()
    ));
    let diff = rsync_itemize("-an", &r.join("ref"), &out.join("t"));
    assert!(
        diff.is_empty(),
        "the snapshot is not the start state:\n{diff}"
    );
    // tempfile's cleanup cannot enter read-only directories.
    sh(&format!("chmod -R u+w '{}'", r.display()));
}

fn walkdir_count(dir: &Path, pick: fn(&std::fs::Metadata) -> bool) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir").flatten() {
            let m = e.path().symlink_metadata().expect("lstat");
            if m.is_dir() {
                stack.push(e.path());
            }
            if pick(&m) {
                n += 1;
            }
        }
    }
    n
}

/// A deleted start subtree with more directories than the keeper keeps open at once (it closes
/// and reopens them by path): every start file is kept, the snapshot is the start state.
#[test]
fn a_deleted_start_subtree_of_many_directories_is_kept_whole() {
    let Some(s) = Site::with_birth_times() else {
        return;
    };
    let t = s.p("t");
    sh(&format!(
        "cd '{r}'; mkdir -p t/keep
         for i in $(seq 1 300); do mkdir -p t/big/d$i/sub; echo $i > t/big/d$i/f; echo $i > t/big/d$i/sub/g; done
         echo k > t/keep/k; cp -a t ref",
        r = s.root.display()
    ));
    let old = s.p("old");
    std::fs::create_dir(&old).expect("mkdir old");
    copy::start_clone(&t, &old).expect("start clone");
    let ram = s.p("ram");
    sh(&format!(
        "cp -a '{t}' '{ram}'; rm -r '{ram}/big'",
        t = t.display(),
        ram = ram.display()
    ));
    let st = write_back(&ram, &t, &old);
    assert!(st.deleted > 0, "the subtree was deleted: {st:?}");
    assert!(tree_diff(&ram, &t).is_empty(), "written back");
    assert_eq!(
        walkdir_count(&old, |m| m.is_file()),
        601,
        "600 files kept, and the list"
    );
    snapshot_matches_start(&s, &old, &t, &s.p("ref"), "after deleting the subtree");
}

/// The two incremental write-backs, each with its scout warming the destination and the clone
/// while the walk runs: one from a change journal's marks (the daemon's), one by ctime (a
/// one-off `asd resync` or `asd unsync`). Both keep the start state of what they replace or
/// delete, and only that; each has enough renames (19-21) to do them many at once. The scout
/// only reads: what this checks of it is that keeping and renaming beside it lose nothing.
#[test]
fn incremental_write_backs_by_journal_and_by_ctime_keep_the_start_state() {
    let Some(s) = Site::with_birth_times() else {
        return;
    };
    let t = s.p("t");
    sh(&format!(
        "cd '{r}'; for i in $(seq 1 40); do mkdir -p t/d$i/e; for j in 1 2 3; do
           echo $i.$j > t/d$i/f$j; echo $i.$j > t/d$i/e/g$j; done; done
         cp -a t ref; cp -a t ram",
        r = s.root.display()
    ));
    let (old, ram) = (s.p("old"), s.p("ram"));
    std::fs::create_dir(&old).expect("mkdir old");
    copy::start_clone(&t, &old).expect("start clone");
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..CopyOptions::default()
    };

    // By the journal's marks: its period starts with the first take.
    let journal = asd::journal::ChangeJournal::start(&ram, 100_000).expect("journal");
    let _ = journal.take();
    sh(&format!(
        "cd '{}'; for i in 3 7 11 19 23 31 2 13 17 25; do echo changed >> d$i/f1; echo changed >> d$i/e/g2; done
         rm -r d5 d6/e; rm d9/f3; echo new > d12/new; mkdir d40/fresh; echo n > d40/fresh/n",
        ram.display()
    ));
    let asd::journal::Changes::Exact(marks) = journal.take() else {
        panic!("the journal is in doubt");
    };
    assert!(!marks.is_empty(), "the journal marked the changes");
    let st = copy::write_back(&ram, &t, &opts, Some(&marks), Some(&old), None).expect("write-back");
    assert!(st.deleted > 0, "deletions were written back: {st:?}");
    assert!(
        tree_diff(&ram, &t).is_empty(),
        "the journaled write-back is complete"
    );
    snapshot_matches_start(&s, &old, &t, &s.p("ref"), "after the journaled write-back");
    drop(journal);

    // By ctime since the journaled write-back: other start entries, and kept ones again. As
    // after a sync, where each directory is is recorded first, and the changes counted from then.
    let ids = s.p("ram.asd-dirs");
    let since = copy::record_dir_ids(&ram, &ids).expect("record the directories");
    sh(&format!(
        "cd '{}'; for i in 3 8 14 27 33 4 18 21 36; do echo again >> d$i/f1; echo again >> d$i/e/g3; done
         rm -r d15 d7; rm d12/new; echo back > d6/e",
        ram.display()
    ));
    // Names deleted within the clock tick a write-back's scan starts in are left to the next
    // one (see `copy::scan`): this one is to be complete.
    std::thread::sleep(std::time::Duration::from_millis(30));
    let by_ctime = CopyOptions {
        changed_since: Some(since),
        ..opts
    };
    let record = copy::DirIdsFile {
        path: ids.clone(),
        clean_at: copy::Timestamp::now(),
    };
    copy::write_back(&ram, &t, &by_ctime, None, Some(&old), Some(&record)).expect("write-back");
    assert!(
        std::fs::metadata(&ids).is_ok(),
        "a record left for the next write-back"
    );
    assert!(
        tree_diff(&ram, &t).is_empty(),
        "the write-back by ctime is complete"
    );
    snapshot_matches_start(&s, &old, &t, &s.p("ref"), "after the write-back by ctime");
    // Kept: what changed of the start state (20 files, then those of 18 not kept already) and
    // what was deleted of it (d5, d6/e, d9/f3, then d15 and the rest of d7), not the 240 files
    // of the tree.
    let kept = walkdir_count(&old, |m| m.is_file());
    assert!(kept > 30 && kept < 80, "kept {kept} files");
}
