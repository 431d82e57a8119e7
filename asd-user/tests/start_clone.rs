//! The copy-on-write start clone (`copy::keep`): a skeleton at sync, filled by write-backs with
//! what they replace or delete of the start state; the crash-recovery snapshot reads it merged
//! with the tree. Checked against independent tools: the snapshot, extracted by GNU tar, must
//! equal a `cp -a` of the start tree per `rsync -an --itemize-changes` (data, modes, owners,
//! times, symlinks, fifos, hard links aside), after several write-backs of every kind of change.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use asd::copy::{self, CopyOptions};

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
    rsync_diff("-aXn", a, b)
}

/// As [`tree_diff`] with other rsync flags.
fn rsync_diff(flags: &str, a: &Path, b: &Path) -> String {
    let out = Command::new("rsync")
        .args([flags, "--delete", "--itemize-changes"])
        .arg(format!("{}/", a.display()))
        .arg(format!("{}/", b.display()))
        .output()
        .expect("rsync");
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn write_back(ram: &Path, disk: &Path, old: &Path) -> copy::CopyStats {
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..CopyOptions::default()
    };
    copy::write_back(ram, disk, &opts, None, Some(old)).expect("write-back")
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
    let diff = rsync_diff("-an", reference, &out.join("t"));
    assert!(
        diff.is_empty(),
        "{round}: the snapshot is not the start state:\n{diff}"
    );
}

#[test]
fn snapshot_of_a_start_clone_is_the_start_state_after_every_kind_of_change() {
    let s = Site::new();
    if !birth_times_here(&s.root) {
        eprintln!("SKIP: no birth times on {}", s.root.display());
        return;
    }
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

/// A start entry that cannot be kept (the clone cannot be written: a fault) is neither
/// replaced nor deleted: the write-back fails and the start version stays on disk.
#[test]
fn a_start_entry_that_cannot_be_kept_is_left_in_place() {
    let s = Site::new();
    if !birth_times_here(&s.root) {
        eprintln!("SKIP: no birth times on {}", s.root.display());
        return;
    }
    let t = s.p("t");
    sh(&format!(
        "cd '{r}'; mkdir -p t/sub; echo start > t/sub/f; echo start > t/sub/g; cp -a t ref",
        r = s.root.display()
    ));
    let old = s.p("old");
    std::fs::create_dir(&old).expect("mkdir old");
    copy::start_clone(&t, &old).expect("start clone");
    // The clone is made unwritable, for root too (immutable): nothing can be kept.
    let sub = old.clone();
    let root = rustix::process::geteuid().is_root();
    if root {
        sh(&format!("chattr +i '{}'", sub.display()));
    } else {
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    }
    let ram = s.p("ram");
    sh(&format!(
        "cp -a '{t}' '{ram}'; echo new > '{ram}/sub/f'; rm '{ram}/sub/g'",
        t = t.display(),
        ram = ram.display()
    ));
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..CopyOptions::default()
    };
    let res = copy::write_back(&ram, &t, &opts, None, Some(&old));
    if root {
        sh(&format!("chattr -i '{}'", sub.display()));
    } else {
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    assert!(
        res.is_err(),
        "the write-back reports what it could not keep"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("sub/f")).expect("f"),
        "start\n",
        "not replaced"
    );
    assert!(t.join("sub/g").exists(), "not deleted");
    // Once the clone can take them, the next write-back keeps and writes them.
    write_back(&ram, &t, &old);
    assert!(tree_diff(&ram, &t).is_empty(), "written back on the retry");
    snapshot_matches_start(&s, &old, &t, &s.p("ref"), "after the retry");
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
