//! Unit tests of the copy engine: syncs in both modes against rsync's and our own view of
//! equality, incremental comparisons, errors, vanishing entries, and the tree utilities.

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use rustix::fs::{self as rfs, AtFlags, Timespec, Timestamps};

use crate::fsio::{is_temp_name, mode};

use super::helpers::open_root;
use super::tree::{walk, Visit};
use super::*;

fn durable() -> CopyOptions {
    CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    }
}

fn fast() -> CopyOptions {
    CopyOptions {
        delete: true,
        durable: false,
        ..Default::default()
    }
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

fn chmod(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

/// Sets atime and mtime (ns) without following symlinks.
fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rfs::utimensat(rfs::CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn mkfifo(p: &Path) {
    rfs::mkfifoat(rfs::CWD, p, mode(0o640)).unwrap();
}

fn user_xattrs_work(dir: &Path) -> bool {
    let p = dir.join(".xattr-probe");
    write(&p, b"");
    let ok = xattr::set(&p, "user.probe", b"1").is_ok();
    fs::remove_file(&p).unwrap();
    ok
}

/// A source tree with every kind of entry the engine handles.
fn make_tree(root: &Path) {
    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(&root.join("small"), b"hello\n");
    write(&root.join("empty"), b"");
    write(&root.join("big"), &big);
    write(&root.join("name with spaces"), b"spaces");
    write(&root.join("new\nline"), b"newline");
    write(&root.join(".hidden"), b"hidden");
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir(root.join("emptydir")).unwrap();
    write(&root.join("a/b/c/deep"), b"deep");
    write(&root.join("a/exec"), b"#!/bin/sh\n");
    chmod(&root.join("a/exec"), 0o751);
    write(&root.join("a/private"), b"secret");
    chmod(&root.join("a/private"), 0o600);
    std::os::unix::fs::symlink("small", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("outside")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("a/b/up")).unwrap();
    mkfifo(&root.join("fifo"));
    let long = "x".repeat(255);
    write(&root.join(&long), b"long name");
    // A sparse file: 8 MiB with data only at the end.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tail", (8 << 20) - 4).unwrap();
    drop(f);
    chmod(&root.join("a/b"), 0o750);
    if user_xattrs_work(root) {
        xattr::set(root.join("small"), "user.comment", b"kept").unwrap();
        xattr::set(root.join("a"), "user.dir", b"dirattr").unwrap();
    }
    set_mtime(&root.join("small"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("link"), 1_500_000_000, 987_654_321);
    set_mtime(&root.join("a/b/c"), 1_400_000_000, 5);
    set_mtime(&root.join("a/b"), 1_400_000_001, 6);
    set_mtime(&root.join("a"), 1_400_000_002, 7);
    set_mtime(root, 1_400_000_003, 8);
}

/// rsync's view of the difference (empty = equal). None when rsync is missing.
fn rsync_diff(src: &Path, dst: &Path) -> Option<String> {
    let _spawn = crate::spawning();
    let out = Command::new("rsync")
        .arg("-aXn")
        .arg("--delete")
        .arg("--itemize-changes")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => panic!("rsync failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            eprintln!("rsync not installed: skipping the rsync comparison");
            None
        }
    }
}

/// Our own comparison: names, types, contents, modes, owners, mtimes (ns), symlink
/// targets, wanted xattrs.
fn tree_diff(a: &Path, b: &Path, out: &mut Vec<String>) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = match fs::symlink_metadata(b) {
        Ok(m) => m,
        Err(_) => {
            out.push(format!("missing {}", b.display()));
            return;
        }
    };
    let what = |s: &str| format!("{s} differs: {}", b.display());
    if ma.file_type() != mb.file_type() {
        out.push(what("type"));
        return;
    }
    if ma.uid() != mb.uid() || ma.gid() != mb.gid() {
        out.push(what("owner"));
    }
    if !ma.file_type().is_symlink() && ma.mode() != mb.mode() {
        out.push(what("mode"));
    }
    if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
        out.push(what("mtime"));
    }
    if ma.is_file() || ma.is_dir() {
        let xa: Vec<_> = xattr::list(a)
            .unwrap()
            .map(|n| (n.clone(), xattr::get(a, &n).unwrap()))
            .collect();
        let xb: Vec<_> = xattr::list(b)
            .unwrap()
            .map(|n| (n.clone(), xattr::get(b, &n).unwrap()))
            .collect();
        if xa != xb {
            out.push(what("xattrs"));
        }
    }
    if ma.is_file() && fs::read(a).unwrap() != fs::read(b).unwrap() {
        out.push(what("content"));
    }
    if ma.file_type().is_symlink() && fs::read_link(a).unwrap() != fs::read_link(b).unwrap() {
        out.push(what("symlink target"));
    }
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        if na != nb {
            out.push(format!(
                "entries differ in {}: {na:?} vs {nb:?}",
                b.display()
            ));
        }
        for n in na.iter().filter(|n| nb.contains(n)) {
            tree_diff(&a.join(n), &b.join(n), out);
        }
    }
}

fn assert_same(src: &Path, dst: &Path) {
    let mut diffs = Vec::new();
    tree_diff(src, dst, &mut diffs);
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    if let Some(d) = rsync_diff(src, dst) {
        assert!(d.is_empty(), "rsync sees differences:\n{d}");
    }
}

fn no_temps(root: &Path) {
    let mut found = Vec::new();
    let fd = open_root(root).unwrap();
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut |_, p, n, _| {
            if is_temp_name(n) {
                found.push(p.to_path_buf());
            }
            Ok(Visit::Descend)
        },
    )
    .unwrap();
    assert!(found.is_empty(), "temporary leftovers: {found:?}");
}

#[test]
fn initial_copy_both_modes() {
    for opts in [fast(), durable()] {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        make_tree(&src);
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert!(st.files_copied >= 10, "{st:?}");
        assert_eq!(st.symlinks_copied, 4);
        assert_eq!(st.dirs_created, 4);
        assert_same(&src, &dst);
        no_temps(&dst);
        let sparse = fs::metadata(dst.join("sparse")).unwrap();
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "holes kept: {} blocks",
            sparse.blocks()
        );
        // Second run: nothing to do.
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(
            (
                st.files_copied,
                st.symlinks_copied,
                st.dirs_created,
                st.deleted
            ),
            (0, 0, 0, 0),
            "{st:?}"
        );
        assert!(st.unchanged >= 15, "{st:?}");
        assert_same(&src, &dst);
    }
}

#[test]
fn disk_to_tmpfs_and_back() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm: skipped");
        return;
    }
    let disk = tempfile::tempdir().unwrap();
    let ram = tempfile::tempdir_in(shm).unwrap();
    make_tree(disk.path());
    sync_tree(disk.path(), ram.path(), &fast()).unwrap();
    assert_same(disk.path(), ram.path());
    write(&ram.path().join("a/b/c/deep"), &vec![1u8; 300_000]);
    fs::remove_file(ram.path().join("big")).unwrap();
    let st = sync_tree(ram.path(), disk.path(), &durable()).unwrap();
    assert_eq!((st.files_copied, st.deleted), (1, 1), "{st:?}");
    assert_same(ram.path(), disk.path());
}

fn changes(opts: CopyOptions) {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    make_tree(&src);
    sync_tree(&src, &dst, &opts).unwrap();

    // Same size, new content and mtime.
    write(&src.join("small"), b"HELLO\n");
    // New size.
    write(&src.join("a/b/c/deep"), b"deeper and deeper");
    // Same content and size, only the mtime differs: copied (quick check can't know).
    set_mtime(&src.join("empty"), 1_000, 1);
    // Mode only.
    chmod(&src.join("a/exec"), 0o700);
    chmod(&src.join("a/b"), 0o755);
    // Deletions, including a whole subtree.
    fs::remove_file(src.join("name with spaces")).unwrap();
    fs::create_dir_all(dst.join("extra/deeper")).unwrap();
    write(&dst.join("extra/deeper/f"), b"x");
    write(&dst.join("extra-file"), b"x");
    // Type changes: file -> dir, dir -> file, symlink -> dir, dir -> symlink.
    fs::remove_file(src.join(".hidden")).unwrap();
    fs::create_dir(src.join(".hidden")).unwrap();
    write(&src.join(".hidden/inside"), b"now a dir");
    fs::remove_dir_all(src.join("emptydir")).unwrap();
    write(&src.join("emptydir"), b"now a file");
    fs::remove_file(src.join("link")).unwrap();
    fs::create_dir(src.join("link")).unwrap();
    fs::remove_dir_all(src.join("a/b/c")).unwrap();
    std::os::unix::fs::symlink("elsewhere", src.join("a/b/c")).unwrap();
    // New entries.
    write(&src.join("a/new file"), b"new");
    fs::create_dir_all(src.join("n1/n2")).unwrap();
    write(&src.join("n1/n2/f"), b"nested new");
    // A symlink retargeted, a fifo replaced by a file.
    fs::remove_file(src.join("dangling")).unwrap();
    std::os::unix::fs::symlink("small", src.join("dangling")).unwrap();
    fs::remove_file(src.join("fifo")).unwrap();
    write(&src.join("fifo"), b"not a fifo");
    if user_xattrs_work(&src) {
        xattr::set(src.join("small"), "user.comment", b"changed").unwrap();
        xattr::set(src.join("big"), "user.added", b"1").unwrap();
        xattr::remove(src.join("a"), "user.dir").unwrap();
    }

    let st = sync_tree(&src, &dst, &opts).unwrap();
    assert_eq!(
        st.deleted, 5,
        "name with spaces, extra/, extra/deeper/, f, extra-file: {st:?}"
    );
    assert_same(&src, &dst);
    no_temps(&dst);

    // Without delete, extras stay.
    write(&dst.join("keep-me"), b"x");
    let st = sync_tree(
        &src,
        &dst,
        &CopyOptions {
            delete: false,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(st.deleted, 0);
    assert!(dst.join("keep-me").exists());
}

#[test]
fn changes_durable() {
    changes(durable());
}

#[test]
fn changes_fast() {
    changes(fast());
}

#[test]
fn shared_inode_is_rewritten_not_modified() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, clone) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("clone"),
    );
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    write(&src.join("f"), b"same data");
    write(&src.join("g"), b"old data");
    chmod(&src.join("f"), 0o644);
    sync_tree(&src, &dst, &durable()).unwrap();
    hardlink_clone(&dst, &clone).unwrap();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&dst.join("f")), ino(&clone.join("f")));
    let mtime_g = fs::metadata(clone.join("g")).unwrap().mtime();

    // Metadata change only on f, data change on g.
    chmod(&src.join("f"), 0o600);
    let mut g = fs::OpenOptions::new()
        .append(true)
        .open(src.join("g"))
        .unwrap();
    g.write_all(b" more").unwrap();
    drop(g);
    let st = sync_tree(&src, &dst, &durable()).unwrap();
    assert_eq!(st.files_copied, 2, "{st:?}");
    assert_same(&src, &dst);
    assert_ne!(ino(&dst.join("f")), ino(&clone.join("f")));
    let cf = fs::metadata(clone.join("f")).unwrap();
    assert_eq!(cf.mode() & 0o777, 0o644, "the clone keeps its metadata");
    assert_eq!(cf.nlink(), 1);
    assert_eq!(fs::read(clone.join("g")).unwrap(), b"old data");
    assert_eq!(fs::metadata(clone.join("g")).unwrap().mtime(), mtime_g);

    // With a single link, metadata is fixed in place.
    let before = ino(&dst.join("f"));
    chmod(&src.join("f"), 0o640);
    let st = sync_tree(&src, &dst, &durable()).unwrap();
    assert_eq!((st.files_copied, st.metadata_updated), (0, 1), "{st:?}");
    assert_eq!(ino(&dst.join("f")), before);
    assert_same(&src, &dst);
}

#[test]
fn vanished_source_entries_are_skipped() {
    for opts in [fast(), durable()] {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        for n in ["a", "b", "c"] {
            write(&src.join(n), n.as_bytes());
        }
        fs::create_dir(src.join("d")).unwrap();
        sync_tree(&src, &dst, &opts).unwrap();
        write(&src.join("b"), b"changed b");
        let mut hook = |p: &Path| {
            if p.ends_with("b") {
                fs::remove_file(p).unwrap();
            }
            if p.ends_with("d") {
                fs::remove_dir(p).unwrap();
            }
        };
        let st = sync_tree_with_hook(&src, &dst, &opts, &mut hook).unwrap();
        assert_eq!(st.vanished, 2, "{st:?}");
        assert_eq!(st.deleted, 0, "{st:?}");
        assert_eq!(fs::read(dst.join("b")).unwrap(), b"b", "kept this run");
        assert!(dst.join("d").is_dir());
        // The next run deletes them.
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(st.deleted, 2);
        assert_same(&src, &dst);
    }
}

#[test]
fn big_directory_probed_on_two_threads() {
    for opts in [fast(), durable()] {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::create_dir(&dst).unwrap();
        for i in 0..300 {
            write(&src.join(format!("f{i}")), format!("file {i}").as_bytes());
            write(&src.join(format!("sub/g{i}")), b"g");
        }
        sync_tree(&src, &dst, &opts).unwrap();
        assert_same(&src, &dst);
        let xattrs = user_xattrs_work(&src);
        for i in (0..300).step_by(7) {
            write(
                &src.join(format!("f{i}")),
                format!("changed {i}").as_bytes(),
            );
            chmod(&src.join(format!("sub/g{i}")), 0o600);
            if xattrs {
                xattr::set(src.join(format!("f{}", i + 1)), "user.n", b"1").unwrap();
            }
            fs::remove_file(src.join(format!("f{}", i + 2))).unwrap();
        }
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(st.files_copied, 43, "{st:?}");
        assert_eq!(st.deleted, 43, "{st:?}");
        assert_same(&src, &dst);
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(st.unchanged, 300 + 300 - 43, "{st:?}");
    }
}

#[test]
fn errors_name_path_and_operation() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing");
    let e = sync_tree(t.path(), &missing, &fast()).unwrap_err();
    let CopyError::Io { op, path, .. } = &e;
    assert_eq!((*op, path.as_path()), ("open", missing.as_path()));
    assert!(e.to_string().contains("missing"));
    // A symlink as root is refused, not followed.
    std::os::unix::fs::symlink(t.path(), t.path().join("l")).unwrap();
    let dst = tempfile::tempdir().unwrap();
    assert!(sync_tree(&t.path().join("l"), dst.path(), &fast()).is_err());
    // Same directory, or one inside the other.
    assert!(sync_tree(dst.path(), dst.path(), &fast()).is_err());
    fs::create_dir_all(dst.path().join("in/side")).unwrap();
    write(&dst.path().join("in/side/f"), b"x");
    assert!(sync_tree(&dst.path().join("in/side"), dst.path(), &durable()).is_err());
    assert!(dst.path().join("in/side/f").exists());
    sync_tree(dst.path(), &dst.path().join("in/side"), &fast()).unwrap();
    assert!(dst.path().join("in/side/in").is_dir());
    assert!(
        !dst.path().join("in/side/in/side").exists(),
        "not copied into itself"
    );
}

#[test]
fn leftover_temps_removed() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("d/e")).unwrap();
    write(&r.join(format!("{TEMP_PREFIX}1.1")), b"x");
    write(&r.join(format!("d/e/{TEMP_PREFIX}1.2")), b"x");
    fs::create_dir_all(r.join(format!("d/{TEMP_PREFIX}1.3/sub"))).unwrap();
    write(&r.join(format!("d/{TEMP_PREFIX}1.3/sub/f")), b"x");
    std::os::unix::fs::symlink("x", r.join(format!("{TEMP_PREFIX}1.4"))).unwrap();
    write(&r.join("d/e/keep"), b"x");
    write(&r.join("d/.#asd-tm"), b"x");
    assert_eq!(remove_temp_files(r).unwrap(), 4);
    no_temps(r);
    assert!(r.join("d/e/keep").exists());
    assert!(r.join("d/.#asd-tm").exists());
    assert_eq!(remove_temp_files(r).unwrap(), 0);
}

#[test]
fn clone_links_files_and_copies_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("clone"));
    fs::create_dir(&src).unwrap();
    make_tree(&src);
    let st = hardlink_clone(&src, &dst).unwrap();
    assert_eq!(st.symlinks_copied, 4);
    assert_same(&src, &dst);
    let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(ino(&src.join("a/b/c/deep")), ino(&dst.join("a/b/c/deep")));
    assert_ne!(ino(&src.join("link")), ino(&dst.join("link")));
    assert_ne!(ino(&src.join("fifo")), ino(&dst.join("fifo")));
    let mut links = find_hardlinked_files(&src, &[], 100).unwrap();
    links.sort();
    assert_eq!(links.len(), 11, "{links:?}");
    assert!(links.contains(&src.join("a/b/c/deep")));
    assert_eq!(find_hardlinked_files(&src, &[], 3).unwrap().len(), 3);
    // Not into a non-empty directory.
    assert!(hardlink_clone(&src, &src.join("a")).is_err());
    // Into itself: the clone is not cloned.
    let inner = src.join("a/b/clone");
    hardlink_clone(&src.join("a"), &inner).unwrap();
    assert!(inner.join("b/c/deep").exists());
    assert!(!inner.join("b/clone").exists());
    fs::remove_dir_all(&inner).unwrap();
    // An existing empty directory is fine.
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    hardlink_clone(&src.join("a"), &empty).unwrap();
    assert_same(&src.join("a"), &empty);
}

/// A tree synced in full, with `since` taken before the sync (as asd does), and the clock
/// moved on a little so that later changes get later ctimes even from the kernel's coarse
/// clock (the tests use no [`CTIME_MARGIN_MS`] to avoid waiting for it).
fn synced_pair(opts: &CopyOptions) -> (tempfile::TempDir, PathBuf, PathBuf, Timestamp) {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    make_tree(&src);
    fs::create_dir_all(src.join("u1/u2/u3")).unwrap();
    for d in ["u1", "u1/u2", "u1/u2/u3"] {
        for j in 0..3 {
            write(
                &src.join(format!("{d}/f{j}")),
                format!("{d} {j}").as_bytes(),
            );
        }
    }
    // Big enough for the helper thread.
    for d in ["many", "many2"] {
        fs::create_dir(src.join(d)).unwrap();
        for i in 0..100 {
            write(
                &src.join(format!("{d}/m{i}")),
                format!("{d} {i}").as_bytes(),
            );
        }
    }
    set_mtime(&src, 1_400_000_003, 8);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let since = Timestamp::now();
    sync_tree(&src, &dst, opts).unwrap();
    assert_same(&src, &dst);
    std::thread::sleep(std::time::Duration::from_millis(30));
    (t, src, dst, since)
}

fn since(opts: &CopyOptions, t: Timestamp) -> CopyOptions {
    CopyOptions {
        changed_since: Some(t),
        ..*opts
    }
}

#[test]
fn changed_since_finds_every_change() {
    for (opts, scan) in [(fast(), true), (durable(), true), (durable(), false)] {
        let (_t, src, dst, t0) = synced_pair(&opts);
        let ids = scan::dir_ids(&src).unwrap();
        // Data, in a directory that is itself unchanged, deep below unchanged ones.
        write(&src.join("small"), b"HELLO\n");
        write(&src.join("u1/u2/f1"), b"new size and data");
        // Metadata only: mode, xattrs, mtime.
        chmod(&src.join("u1/u2/u3/f0"), 0o600);
        chmod(&src.join("a/b"), 0o700);
        set_mtime(&src.join("a/exec"), 1_000, 2);
        if user_xattrs_work(&src) {
            xattr::set(src.join("u1/f0"), "user.new", b"1").unwrap();
            xattr::remove(src.join("small"), "user.comment").unwrap();
        }
        // Deletion, renames within and across directories.
        fs::remove_file(src.join("u1/u2/f2")).unwrap();
        fs::rename(src.join("u1/u2/u3/f1"), src.join("u1/u2/u3/f1-renamed")).unwrap();
        fs::rename(src.join("many/m5"), src.join("u1/m5")).unwrap();
        fs::rename(src.join("u1/u2/u3"), src.join("many/u3")).unwrap();
        // A new subtree below unchanged directories (only its parent changes).
        fs::create_dir_all(src.join("a/b/c/n1/n2")).unwrap();
        write(&src.join("a/b/c/n1/n2/f"), b"nested new");
        // Type changes and a retargeted symlink.
        fs::remove_dir(src.join("emptydir")).unwrap();
        write(&src.join("emptydir"), b"now a file");
        fs::remove_file(src.join("link")).unwrap();
        std::os::unix::fs::symlink("big", src.join("link")).unwrap();
        // A big unchanged directory with a few changed entries.
        write(&src.join("many2/m7"), b"changed m7");
        chmod(&src.join("many2/m8"), 0o640);
        // Names deleted within the clock tick the scan starts in are left to the next
        // write-back (see `scan`): this one is to find every change.
        std::thread::sleep(std::time::Duration::from_millis(30));

        let st = sync_tree_with_margin(&src, &dst, &since(&opts, t0), 0, scan, Some(&ids)).unwrap();
        assert_same(&src, &dst);
        no_temps(&dst);
        // The walk by ctime looks at every entry and finds most unchanged; after a scan it
        // looks only at what the scan marked, all of it changed.
        match scan {
            true => assert_eq!(st.unchanged, 0, "{st:?}"),
            false => assert!(st.unchanged > 150, "{st:?}"),
        }
        // A full comparison finds nothing left to do.
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(
            (
                st.files_copied,
                st.symlinks_copied,
                st.dirs_created,
                st.deleted,
                st.metadata_updated
            ),
            (0, 0, 0, 0, 0),
            "{st:?}"
        );
    }
}

#[test]
fn changed_since_does_not_look_at_unchanged_entries() {
    for (opts, scan) in [(fast(), true), (durable(), true), (durable(), false)] {
        let (_t, src, dst, t0) = synced_pair(&opts);
        let ids = scan::dir_ids(&src).unwrap();
        // Behind the engine's back, under names whose source did not change: in unchanged
        // directories, and in one that changes (the root).
        write(&dst.join("a/private"), b"tampered");
        write(&dst.join("a/extra"), b"not deleted: a did not change");
        write(&dst.join("name with spaces"), b"tampered too");
        fs::rename(dst.join("u1/u2/u3"), dst.join("u1/u2/u3-moved")).unwrap();
        // Source changes: a new name in the root, a changed file in unchanged a/.
        write(&src.join("newfile"), b"new");
        write(&src.join("a/exec"), b"#!/bin/sh\nexit 0\n");

        let st = sync_tree_with_margin(&src, &dst, &since(&opts, t0), 0, scan, Some(&ids)).unwrap();
        assert_eq!(st.files_copied, 2, "{st:?}");
        assert_eq!(fs::read(dst.join("newfile")).unwrap(), b"new");
        assert_eq!(
            fs::read(dst.join("a/exec")).unwrap(),
            b"#!/bin/sh\nexit 0\n"
        );
        assert_eq!(fs::read(dst.join("a/private")).unwrap(), b"tampered");
        assert_eq!(
            fs::read(dst.join("name with spaces")).unwrap(),
            b"tampered too"
        );
        assert!(dst.join("a/extra").exists());
        // u1/u2/u3 was never even opened in the destination.
        assert!(!dst.join("u1/u2/u3").exists());
        // The full comparison repairs all of it.
        let st = sync_tree(&src, &dst, &opts).unwrap();
        assert_eq!(
            st.deleted,
            1 + 4,
            "a/extra, u3-moved/ and its 3 files: {st:?}"
        );
        assert_same(&src, &dst);
    }
}

/// The walk of what `scanned` marked (as `sync_tree` does after its scan), with no margin.
fn walk_scanned(src: &Path, dst: &Path, opts: &CopyOptions, scanned: &scan::Scanned) -> CopyStats {
    let mut engine = Engine::new(src, dst, opts, None);
    engine.margin = 0;
    engine.journal = Some(&scanned.marks);
    engine.scanned = Some(&scanned.listed);
    engine.dir_ids = scanned.ids.as_ref();
    engine.run().unwrap()
}

/// A name of a changed directory that the scan saw and the walk no longer finds left during
/// the write-back, maybe for a directory the walk does not visit: it stays on disk until the
/// next write-back, which writes its new place first. A name gone before the scan goes.
///
/// The same during the scan: a name renamed out of a changed directory not listed yet into one
/// listed already (its parent, which is unchanged at the scan and not walked) is in neither
/// listing. The changed directory keeps no names, so nothing is deleted there (the name gone
/// before the scan goes with the next write-back too).
#[test]
fn a_name_that_leaves_during_the_write_back_is_deleted_by_the_next_one() {
    for during_scan in [false, true] {
        let opts = durable();
        let (_t, src, dst, t0) = synced_pair(&opts);
        let ids = scan::dir_ids(&src).unwrap();
        let old = fs::read(dst.join("u1/u2/f1")).unwrap();
        fs::remove_file(src.join("u1/u2/f2")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let t1 = Timestamp::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let cutoff = engine::cutoff(t0, 0).unwrap();
        let new_place = if during_scan {
            "u1/moved"
        } else {
            "many2/moved"
        };
        let mv = |rel: &[u8]| {
            if during_scan && rel == b"u1/u2" {
                fs::rename(src.join("u1/u2/f1"), src.join(new_place)).unwrap();
            }
        };
        let scanned = scan::scan(&src, cutoff, Some(&ids), Some(&mv)).unwrap();
        if !during_scan {
            // After the scan, before the walk: into a directory unchanged at the scan.
            fs::rename(src.join("u1/u2/f1"), src.join(new_place)).unwrap();
        }
        walk_scanned(&src, &dst, &since(&opts, t0), &scanned);
        assert_eq!(
            dst.join("u1/u2/f2").exists(),
            during_scan,
            "gone before the scan: deleted unless its directory changed during the scan"
        );
        assert_eq!(
            fs::read(dst.join("u1/u2/f1")).unwrap(),
            old,
            "kept until its new place is written"
        );
        assert!(!dst.join(new_place).exists(), "not visited");
        let st = sync_tree_with_margin(&src, &dst, &since(&opts, t1), 0, true, None).unwrap();
        assert_same(&src, &dst);
        let deleted = if during_scan { 2 } else { 1 };
        assert_eq!((st.files_copied, st.deleted), (1, deleted), "{st:?}");
    }
}

#[test]
fn changed_since_in_the_future_compares_everything() {
    let (_t, src, dst, _) = synced_pair(&fast());
    write(&dst.join("a/private"), b"tampered");
    let future = Timestamp {
        sec: Timestamp::now().sec + 3600,
        nsec: 0,
    };
    let st = sync_tree(&src, &dst, &since(&fast(), future)).unwrap();
    assert_eq!(st.files_copied, 1, "{st:?}");
    assert_same(&src, &dst);
}

#[test]
fn timestamps_and_options() {
    let t = Timestamp { sec: 5, nsec: -1 }.normalized();
    assert_eq!(
        t,
        Timestamp {
            sec: 4,
            nsec: 999_999_999
        }
    );
    let before = std::time::UNIX_EPOCH - std::time::Duration::from_millis(1500);
    assert_eq!(
        Timestamp::from(before),
        Timestamp {
            sec: -2,
            nsec: 500_000_000
        }
    );
    assert!(Timestamp { sec: 1, nsec: 0 } > Timestamp { sec: 0, nsec: 999 });
    // The field is optional in JSON, so older jobs still parse.
    let o: CopyOptions = serde_json::from_str(r#"{"delete":true,"durable":false}"#).unwrap();
    assert_eq!(o, fast());
    let o = since(&durable(), t);
    let json = serde_json::to_string(&o).unwrap();
    assert_eq!(serde_json::from_str::<CopyOptions>(&json).unwrap(), o);
}

#[test]
fn tree_size_matches_du() {
    let t = tempfile::tempdir().unwrap();
    make_tree(t.path());
    fs::hard_link(t.path().join("big"), t.path().join("big2")).unwrap();
    let ours = tree_size(t.path()).unwrap();
    let _spawn = crate::spawning();
    match Command::new("du").arg("-sb").arg(t.path()).output() {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            let du: u64 = s.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(ours, du);
        }
        _ => eprintln!("du not available"),
    }
}

/// A journaled sync (`sync_tree_journaled`) writes back every kind of change the journal saw,
/// and looks nowhere else: a change made to the destination in a directory the journal did not
/// mark stays as it is (which a full comparison would repair).
#[test]
fn journaled_sync_writes_what_the_journal_marked_and_nothing_else() {
    use crate::journal::{ChangeJournal, Changes};
    let (_t, src, dst, _) = synced_pair(&durable());
    let journal = ChangeJournal::start(&src, 10_000).unwrap();
    for round in 0..3 {
        match round {
            0 => {
                write(&src.join("small"), b"HELLO\n");
                write(&src.join("a/b/c/deep"), b"deeper and deeper");
                chmod(&src.join("a/exec"), 0o700);
                fs::remove_file(src.join("name with spaces")).unwrap();
                fs::create_dir_all(src.join("n1/n2")).unwrap();
                write(&src.join("n1/n2/f"), b"nested new");
            }
            1 => {
                fs::rename(src.join("n1"), src.join("a/moved")).unwrap();
                write(&src.join("a/moved/n2/g"), b"in the moved dir");
                fs::remove_dir_all(src.join("emptydir")).unwrap();
                write(&src.join("emptydir"), b"now a file");
                set_mtime(&src.join("empty"), 1_000, 1);
            }
            _ => {
                fs::remove_file(src.join("link")).unwrap();
                std::os::unix::fs::symlink("elsewhere", src.join("link")).unwrap();
                fs::rename(src.join("a/private"), src.join("a/b/private")).unwrap();
                chmod(&src.join("a/b"), 0o700);
            }
        }
        // Behind the engine's back, in a directory the journal has no reason to mark.
        write(&dst.join("a/b/c/behind"), b"not ours");
        let Changes::Exact(marked) = journal.take() else {
            panic!("the journal is in doubt");
        };
        let stats = sync_tree_journaled(&src, &dst, &durable(), &marked).unwrap();
        assert!(
            stats.unchanged < 5,
            "round {round}: unmarked entries are not even looked at: {stats:?}"
        );
        if round == 0 {
            assert!(
                dst.join("a/b/c/behind").exists(),
                "round 0: a/b/c is marked only for its changed file, not listed"
            );
        }
        // Undo what we did behind its back, the directory's mtime included.
        fs::remove_file(dst.join("a/b/c/behind")).ok();
        let m = fs::symlink_metadata(src.join("a/b/c")).unwrap();
        set_mtime(&dst.join("a/b/c"), m.mtime(), m.mtime_nsec());
        assert_same(&src, &dst);
        no_temps(&dst);
    }
}

/// A rename made after the journal's period ended (while the write-back runs) is reported in
/// the next period; meanwhile the old name is not deleted before the new one is written.
#[test]
fn journaled_sync_never_deletes_an_old_name_before_the_new_one_exists() {
    use crate::journal::{ChangeJournal, Changes};
    let (_t, src, dst, _) = synced_pair(&durable());
    let journal = ChangeJournal::start(&src, 10_000).unwrap();
    // In the period: something new in `a`, so `a`'s listing is marked.
    write(&src.join("a/new"), b"new");
    let Changes::Exact(marked) = journal.take() else {
        panic!("the journal is in doubt");
    };
    // After the period ended, before the walk: a file and a directory renamed in `a`.
    fs::rename(src.join("a/private"), src.join("a/renamed")).unwrap();
    fs::rename(src.join("a/b"), src.join("a/b2")).unwrap();
    sync_tree_journaled(&src, &dst, &durable(), &marked).unwrap();
    assert_eq!(
        fs::read(dst.join("a/renamed")).unwrap(),
        b"secret",
        "new name written"
    );
    assert!(
        dst.join("a/b2/c/deep").exists(),
        "renamed directory written whole"
    );
    assert!(
        dst.join("a/private").exists(),
        "old name kept until the next period"
    );
    assert!(
        dst.join("a/b/c/deep").exists(),
        "old directory kept until the next period"
    );
    let Changes::Exact(next) = journal.take() else {
        panic!("the journal is in doubt");
    };
    sync_tree_journaled(&src, &dst, &durable(), &next).unwrap();
    assert_same(&src, &dst);
    no_temps(&dst);
}

/// Two directories swapped by renames (and one moved over another): their files keep their
/// ctimes and names, so by ctime alone nothing in them changed. The record of where each
/// directory was (see `dirids`) tells them apart: compared whole, their files are right on
/// disk. Without a record every changed directory is compared whole.
#[test]
fn directories_swapped_by_renames_are_compared_whole() {
    for with_record in [true, false] {
        let opts = durable();
        let (t, src, dst, t0) = synced_pair(&opts);
        let file = t.path().join("ids");
        dirids::save(&file, t0, &scan::dir_ids(&src).unwrap()).unwrap();
        fs::rename(src.join("many"), src.join("tmp")).unwrap();
        fs::rename(src.join("many2"), src.join("many")).unwrap();
        fs::rename(src.join("tmp"), src.join("many2")).unwrap();
        fs::rename(src.join("u1/u2/u3"), src.join("u3-old")).unwrap();
        fs::rename(src.join("u1/u2"), src.join("u1/u3")).unwrap();
        if !with_record {
            dirids::forget(&file).unwrap();
        }
        // Older than the scan's start by more than a clock tick (else the old names would be
        // left to the next write-back, see `scan`).
        std::thread::sleep(std::time::Duration::from_millis(30));
        let clean_at = Timestamp::now();
        let ids = DirIdsFile {
            path: file.clone(),
            clean_at,
        };
        let st = write_back(&src, &dst, &since(&opts, t0), None, None, Some(&ids)).unwrap();
        assert_same(&src, &dst);
        assert_eq!(
            fs::read(dst.join("many/m5")).unwrap(),
            b"many2 5",
            "with record: {with_record}"
        );
        // 200 files swapped, u1/u3's 3 and u3-old's 3 new on disk.
        assert_eq!(st.files_copied, 206, "{st:?}");
        // A record for the next write-back, tagged with the time it counts from.
        let next = dirids::load(&file, clean_at).expect("a record");
        assert!(next.len() >= 8, "{}", next.len());
        // With it, nothing more moved: nothing compared whole.
        let st = write_back(
            &src,
            &dst,
            &since(&opts, clean_at),
            None,
            None,
            Some(&DirIdsFile {
                path: file.clone(),
                clean_at: Timestamp::now(),
            }),
        )
        .unwrap();
        assert_eq!((st.files_copied, st.unchanged), (0, 0), "{st:?}");
    }
}

/// Directories swapped between the scan and the walk: the walk writes what it finds at each
/// place, which is not what the scan's record says is there. Had the record been left, a swap
/// back before the next write-back would make both directories look unmoved, with the other's
/// files on disk. The walk counts them (`moved_meanwhile`), and `write_back` then leaves no
/// record.
#[test]
fn directories_swapped_between_the_scan_and_the_walk_leave_no_record() {
    for swapped in [false, true] {
        let opts = durable();
        let (_t, src, dst, t0) = synced_pair(&opts);
        let ids = scan::dir_ids(&src).unwrap();
        write(&src.join("many/m5"), b"many 5 changed");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let scanned =
            scan::changed_since(&src, engine::cutoff(t0, 0).unwrap(), Some(&ids)).unwrap();
        let swap = || {
            fs::rename(src.join("many"), src.join("tmp")).unwrap();
            fs::rename(src.join("many2"), src.join("many")).unwrap();
            fs::rename(src.join("tmp"), src.join("many2")).unwrap();
        };
        if swapped {
            swap();
        }
        let st = walk_scanned(&src, &dst, &since(&opts, t0), &scanned);
        assert_eq!(st.vanished, 0, "{st:?}");
        assert_eq!(st.moved_meanwhile, u64::from(swapped), "{st:?}");
    }
}

/// The same end to end through `write_back`: the swap between its scan and its walk leaves no
/// record, so the next write-back, after the directories are swapped back, compares the
/// changed ones whole and each file ends up under its own name on disk. A write-back with new
/// nested directories, and nothing moved, does leave one.
#[test]
fn a_swap_between_the_scan_and_the_walk_is_put_right_by_the_next_write_back() {
    let opts = durable();
    let (t, src, dst, t0) = synced_pair(&opts);
    let file = t.path().join("ids");
    let record = |clean_at| DirIdsFile {
        path: file.clone(),
        clean_at,
    };
    dirids::save(&file, t0, &scan::dir_ids(&src).unwrap()).unwrap();
    fs::create_dir_all(src.join("new/a/b")).unwrap();
    write(&src.join("new/a/b/f"), b"deep new");
    std::thread::sleep(std::time::Duration::from_millis(30));
    let t1 = Timestamp::now();
    write_back(&src, &dst, &since(&opts, t0), None, None, Some(&record(t1))).unwrap();
    assert!(dirids::load(&file, t1).is_some(), "nothing moved: a record");

    // Older than the next cutoff (the margin is in force here).
    write(&src.join("many/m5"), b"many 5 changed");
    std::thread::sleep(std::time::Duration::from_millis(2 * CTIME_MARGIN_MS as u64));
    let swap = || {
        fs::rename(src.join("many"), src.join("tmp")).unwrap();
        fs::rename(src.join("many2"), src.join("many")).unwrap();
        fs::rename(src.join("tmp"), src.join("many2")).unwrap();
    };
    let t2 = Timestamp::now();
    let st = write_back_hooked(
        &src,
        &dst,
        &since(&opts, t1),
        None,
        None,
        Some(&record(t2)),
        &swap,
    )
    .unwrap();
    assert!(st.moved_meanwhile > 0, "{st:?}");
    assert!(dirids::load(&file, t2).is_none(), "no record");
    swap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let t3 = Timestamp::now();
    write_back(&src, &dst, &since(&opts, t2), None, None, Some(&record(t3))).unwrap();
    assert_same(&src, &dst);
    assert_eq!(fs::read(dst.join("many/m5")).unwrap(), b"many 5 changed");
}
