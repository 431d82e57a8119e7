//! Overlay mode's data path against real overlay mounts (DESIGN.md §7, §8).
//!
//! A lower tree gets a set of changes through a real overlay (upper and work dirs on a tmpfs,
//! `userxattr`, as asd mounts it); `asd::overlay::persist` copies the upper layer to a `changes`
//! dir on disk, `asd::overlay::apply` applies that to the lower tree, and the result is compared
//! with `rsync -n --itemize-changes` (empty output = equal) against two independent oracles:
//! - a snapshot of the merged view, taken with `rsync -aX` just before unmounting: exact
//!   equality, times (ns), modes, owners and user xattrs included;
//! - a plain copy of the lower tree that got the same operations without any overlay: equal
//!   content, types, modes, owners, xattrs (times differ: the operations ran at other moments).
//!
//! Each test holds its own private mount namespace open with a sleeping process. Mounts happen
//! in there (`nsenter`); the tmpfs holding upper and work is reached from the test process
//! through `/proc/<holder>/root`, the path asd's own worker would be given. Keeping upper/work on
//! a tmpfs (rather than on disk, which overlayfs also allows) tests the real layout: whiteouts
//! and `user.overlay.*` xattrs as tmpfs stores them. Everything mounted vanishes when the holder
//! is killed, even if the test panics. Trees on disk live in a scratch dir under /var/tmp.
//!
//! Tests that mount need root (and `rsync`, `setfattr`); without them they print SKIPPED.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::rsync_itemize;

use asd::overlay::{apply, layers, persist, remove_temp_entries, OverlayError};

const TEMP_PREFIX: &str = asd::copy::TEMP_PREFIX;

// ---------------------------------------------------------------------------------------------
// Child mode: the test binary re-executed to run one operation in another process (as another
// user, or to be killed mid-way). Inert in a normal test run.

const CHILD_ENV: &str = "ASD_OVERLAY_TEST_CHILD";

#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let [op, a, b] = parts[..] else {
        panic!("bad {CHILD_ENV}: {spec:?}");
    };
    let res = match op {
        "persist" => persist(Path::new(a), Path::new(b)),
        "apply" => apply(Path::new(a), Path::new(b)),
        _ => panic!("unknown op {op}"),
    };
    match res {
        Ok(stats) => println!("CHILD-OK {stats:?}"),
        Err(e) => {
            eprintln!("CHILD-ERR {e}");
            std::process::exit(3);
        }
    }
}

/// The test binary running `op a b` in a child process.
fn child(op: &str, a: &Path, b: &Path) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut c = Command::new(exe);
    c.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{op}\n{}\n{}", a.display(), b.display()))
        .stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed:\n{text}");
    text
}

// ---------------------------------------------------------------------------------------------
// Harness.

fn skip_unless_root() -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = [
        "rsync", "setfattr", "getfattr", "unshare", "nsenter", "setpriv",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if root && tools {
        return false;
    }
    eprintln!(
        "\n*** SKIPPED: needs root and rsync, attr (setfattr), util-linux (unshare, nsenter, \
         setpriv) ***\n"
    );
    true
}

/// A private mount namespace held by a sleeping process, a scratch dir on disk (`home`: where
/// the target and its `changes` live) and a tmpfs at `vol` inside the namespace.
struct Ns {
    holder: Child,
    pid: u32,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ns {
    fn new() -> Ns {
        let dir = tempfile::Builder::new()
            .prefix("asd-ovl-test-")
            .tempdir_in("/var/tmp")
            .expect("scratch dir");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for d in ["home", "vol", "oracle"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        let holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid = holder.id();
        let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
        for _ in 0..500 {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if theirs.is_some() && theirs != mine && exe.is_some_and(|e| e.ends_with("sleep")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ns = Ns {
            holder,
            pid,
            root,
            _dir: dir,
        };
        ns.sh("mount -t tmpfs -o mode=0755 asd-ovl-test \"$VOL\"");
        ns
    }

    fn home(&self) -> PathBuf {
        self.root.join("home")
    }
    fn vol(&self) -> PathBuf {
        self.root.join("vol")
    }
    fn lower(&self) -> PathBuf {
        self.home().join("t")
    }
    fn expected(&self) -> PathBuf {
        self.root.join("oracle/expected")
    }
    fn snapshot(&self) -> PathBuf {
        self.root.join("oracle/merged")
    }
    fn changes(&self) -> PathBuf {
        self.home().join(".t-backup_asd-changes")
    }
    fn upper(&self) -> PathBuf {
        self.vol().join("t-rw")
    }

    /// A path inside the namespace as the test process reaches it.
    fn inside(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(p.strip_prefix("/").unwrap_or(p))
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "--", program]);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a bash script (with [`PRELUDE`]) inside the namespace; panics on failure.
    fn sh(&self, script: &str) -> String {
        let mut c = self.cmd("bash");
        c.args(["-c", &format!("{PRELUDE}\n{script}")])
            .env("HOME_DIR", self.home())
            .env("VOL", self.vol())
            .env("L", self.lower())
            .env("E", self.expected())
            .env("S", self.snapshot())
            .env("U", self.upper())
            .env("W", self.vol().join(".work"))
            .env("M", self.vol().join("t"));
        run_ok(c)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Shell functions shared by the tests. `make_lower DIR` builds the original tree; `ops1 R`,
/// `ops2 R` and `bulk_ops R` change a tree (the merged view or the plain expected copy) the same
/// way; `as_owner CMD...` runs a command as the owner of $HOME_DIR.
const PRELUDE: &str = r#"
set -euo pipefail
as_owner() {
    local o; o=$(stat -c %u "$HOME_DIR")
    if [ "$o" = 0 ]; then "$@"; else setpriv --reuid="$o" --regid="$o" --clear-groups "$@"; fi
}
stamp_all() {  # distinct, nanosecond mtimes, so that misplaced metadata shows
    local i=0
    find "$1" -mindepth 1 -depth -print0 | while IFS= read -r -d '' p; do
        i=$((i + 1)); touch -h -d "@$((1500000000 + i * 977)).$((i * 7919 % 1000000000))" "$p"
    done
    touch -h -d '@1400000000.123456789' "$1"
}
make_lower() {
    local L=$1
    mkdir -p "$L"/dir/sub/deep "$L"/gone/inner "$L"/keep "$L"/.hidden_dir "$L"/replace_me/x \
        "$L"/emptydir/x "$L"/moveme/in "$L"/tree_del/a/b/c "$L"/bulk "$L"/metaonly
    echo hello > "$L"/a.txt
    head -c 200000 /dev/urandom > "$L"/big.bin
    echo mod > "$L"/modify.txt
    echo app > "$L"/append.txt
    head -c 5000 /dev/urandom > "$L"/trunc.bin
    echo del > "$L"/delete.txt
    echo h > "$L"/.hidden
    echo r > "$L"/rename_src.txt
    echo sp > "$L/with space.txt"
    echo u > "$L/ünï.txt"
    echo deep > "$L"/dir/sub/deep/f
    echo s > "$L"/dir/sub/s.txt
    echo g > "$L"/gone/inner/g
    echo g2 > "$L"/gone/g2
    echo keepme > "$L"/keep/k
    echo other > "$L"/keep/other
    echo hd > "$L"/.hidden_dir/f
    echo r1 > "$L"/replace_me/x/r1
    echo ft > "$L"/file_to_dir
    echo mv > "$L"/moveme/in/m
    echo td > "$L"/tree_del/a/b/c/f
    echo mo > "$L"/metaonly/f
    for i in $(seq 1 40); do echo "bulk $i" > "$L/bulk/f$i"; done
    ln -s a.txt "$L"/link_a
    ln -s ../../a.txt "$L"/dir/sub/up_link
    ln -s /nonexistent "$L"/dangling
    mkfifo "$L"/fifo
    setfattr -n user.color -v blue "$L"/a.txt
    setfattr -n user.tag -v t "$L"/dir
    setfattr -n user.rm -v x "$L"/modify.txt
    setfattr -n user.keep -v k "$L"/keep/k
    chmod 0640 "$L"/modify.txt
    chmod 0750 "$L"/dir/sub
    chmod 0600 "$L"/.hidden
    chmod 0555 "$L"/metaonly
    stamp_all "$L"
}
ops1() {
    local R=$1
    echo new > "$R"/new.txt
    echo changed > "$R"/modify.txt
    echo more >> "$R"/append.txt
    truncate -s 100 "$R"/trunc.bin
    rm "$R"/delete.txt
    rm -r "$R"/gone; mkdir "$R"/gone; echo fresh > "$R"/gone/fresh
    mv "$R"/rename_src.txt "$R"/dir/renamed.txt
    ln -s new.txt "$R"/new_link
    ln -sfn dir "$R"/link_a
    chmod 0604 "$R"/a.txt
    setfattr -n user.new -v 1 "$R"/keep/k
    setfattr -x user.rm "$R"/modify.txt
    setfattr -n user.tag -v t2 "$R"/dir
    echo h2 > "$R"/.hidden2
    echo changed > "$R"/.hidden
    rm -r "$R"/replace_me; echo nowfile > "$R"/replace_me
    rm "$R"/file_to_dir; mkdir "$R"/file_to_dir; echo in > "$R"/file_to_dir/in
    rm "$R"/dir/sub/s.txt; echo s2 > "$R"/dir/sub/s.txt; rm "$R"/dir/sub/s.txt
    mkdir -p "$R"/newdir/a/b; echo nd > "$R"/newdir/a/b/f
    touch "$R"/newdir/a/tmp; rm "$R"/newdir/a/tmp
    rm -r "$R"/emptydir; mkdir "$R"/emptydir
    chmod 0700 "$R"/dir/sub/deep
    mv "$R"/keep/k "$R"/keep/k2
    rm "$R"/fifo; mkfifo "$R"/fifo2
    echo x > "$R"/dir/sub/deep/f
    mkdir "$R"/.hidden_dir/n
    mv "$R"/moveme "$R"/moved
    echo sp2 >> "$R/with space.txt"
    rm "$R/ünï.txt"
    rm "$R"/dangling
    rm -r "$R"/tree_del
    chmod 0711 "$R"/keep
    touch -d '@1600000000.5' "$R"/a.txt
    chmod 0755 "$R"/metaonly
    echo mo2 > "$R"/metaonly/f
    chmod 0555 "$R"/metaonly
}
ops2() {
    local R=$1
    rm "$R"/new.txt "$R"/new_link
    rm -r "$R"/newdir/a
    echo again > "$R"/gone/again
    rm "$R"/gone/fresh
    rm -r "$R"/dir/sub
    mkdir "$R"/dir/sub; echo other > "$R"/dir/sub/other
    echo third > "$R"/modify.txt
    rm "$R"/replace_me; mkdir "$R"/replace_me
    rm -r "$R"/file_to_dir; echo back > "$R"/file_to_dir
    setfattr -x user.new "$R"/keep/k2
    echo h3 > "$R"/.hidden_dir/n/h3
    rm "$R"/a.txt
}
bulk_ops() {
    local R=$1 i
    mkdir "$R"/many
    for i in $(seq 1 800); do echo "many $i" > "$R/many/n$i"; done
    for i in $(seq 1 40); do echo "bulk changed $i" > "$R/bulk/f$i"; done
    rm -r "$R"/dir; mkdir "$R"/dir
    for i in $(seq 1 300); do head -c 3000 /dev/zero > "$R/dir/z$i"; done
    rm "$R"/big.bin
}
mount_ovl() {
    mkdir -p "$U" "$W" "$M"
    # As asd's helper does: the overlay's root takes the upper dir's mode and owner.
    chmod --reference="$L" "$U"; chown --reference="$L" "$U" "$W"
    mount -t overlay overlay -o "lowerdir=$L,upperdir=$U,workdir=$W,userxattr" "$M"
}
"#;

/// (inode, size, mtime, ctime, mode, nlink) of every entry below and including `root`.
type Listing = BTreeMap<PathBuf, (u64, u64, i64, i64, i64, i64, u32, u64)>;

fn listing(root: &Path) -> Listing {
    let mut out = Listing::new();
    for p in walk(root).into_iter().chain([PathBuf::new()]) {
        let m = std::fs::symlink_metadata(root.join(&p)).expect("lstat");
        out.insert(
            p,
            (
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.mode(),
                m.nlink(),
            ),
        );
    }
    out
}

/// Relative paths of everything below `root` (not following symlinks).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd {
            let e = e.expect("readdir");
            let r = rel.join(e.file_name());
            if e.file_type().expect("file type").is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Exact equality: types, content, times (ns), modes, owners, user xattrs.
fn assert_same(a: &Path, b: &Path) {
    let d = rsync_itemize("-aXn", a, b);
    assert!(
        d.is_empty(),
        "{} and {} differ:\n{d}",
        a.display(),
        b.display()
    );
}

/// Equality but for times (the plain copy got its changes at other moments).
fn assert_same_but_times(a: &Path, b: &Path) {
    let d = rsync_itemize("-rlpgoDXcn", a, b);
    assert!(
        d.is_empty(),
        "{} and {} differ:\n{d}",
        a.display(),
        b.display()
    );
}

/// Nothing of overlayfs reached the original: no whiteouts, no `user.overlay.*` xattrs, no
/// temporary leftovers.
fn assert_clean(root: &Path) {
    for rel in walk(root).into_iter().chain([PathBuf::new()]) {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        assert!(
            !m.file_type().is_char_device(),
            "whiteout in {}",
            p.display()
        );
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        assert!(
            !name.starts_with(TEMP_PREFIX.as_bytes()),
            "leftover {}",
            p.display()
        );
        if m.file_type().is_symlink() {
            continue;
        }
        for x in xattr::list(&p).expect("listxattr") {
            assert!(
                !x.as_bytes().starts_with(b"user.overlay."),
                "{} carries {x:?}",
                p.display()
            );
        }
    }
}

/// The persisted state's only layer, its base, after a first persist: a copy of the upper layer.
fn only_base(c: &Path) -> PathBuf {
    let l = layers(c).expect("layers");
    assert_eq!(l.len(), 1, "a first persist makes a base only: {l:?}");
    l[0].clone()
}

fn is_whiteout(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device())
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The whole path: changes through the overlay, persist, apply; twice idempotent; the lower
/// untouched until apply.
#[test]
fn persist_then_apply_gives_the_merged_view() {
    if skip_unless_root() {
        return;
    }
    let ns = Ns::new();
    ns.sh("make_lower \"$L\"; cp -a \"$L\" \"$E\"");
    let before = listing(&ns.lower());
    ns.sh("mount_ovl; ops1 \"$M\"; ops1 \"$E\"; rsync -aX \"$M\"/ \"$S\"/; umount \"$M\"");

    let upper = ns.inside(&ns.upper());
    let stats = persist(&upper, &ns.changes()).expect("persist");
    assert!(stats.files_copied > 0, "{stats:?}");
    assert_eq!(
        listing(&ns.lower()),
        before,
        "persist touched the lower tree"
    );
    // The state's base mirrors the upper layer exactly, overlayfs' xattrs and whiteouts
    // included.
    let c = only_base(&ns.changes());
    assert_same(&upper, &c);
    assert!(std::fs::symlink_metadata(c.join("delete.txt"))
        .expect("whiteout")
        .file_type()
        .is_char_device());
    assert_eq!(
        xattr::get(c.join("gone"), "user.overlay.opaque").expect("getxattr"),
        Some(b"y".to_vec())
    );
    assert!(!c.join("bulk").exists(), "persist copied an unchanged dir");

    let stats = apply(&ns.changes(), &ns.lower()).expect("apply");
    eprintln!("apply: {stats:?}");
    assert_same(&ns.lower(), &ns.snapshot());
    assert_same_but_times(&ns.lower(), &ns.expected());
    assert_clean(&ns.lower());

    // Idempotent: applying again changes nothing visible.
    apply(&ns.changes(), &ns.lower()).expect("apply again");
    assert_same(&ns.lower(), &ns.snapshot());
    assert_clean(&ns.lower());
    // An upper layer can be applied directly, too.
    apply(&upper, &ns.lower()).expect("apply the upper");
    assert_same(&ns.lower(), &ns.snapshot());
}

/// A second persist after more changes: entries that left the upper layer leave `changes`
/// (a file created and deleted again, a directory replaced twice, ...).
#[test]
fn second_persist_follows_the_upper_layer() {
    if skip_unless_root() {
        return;
    }
    let ns = Ns::new();
    ns.sh("make_lower \"$L\"; cp -a \"$L\" \"$E\"");
    let before = listing(&ns.lower());
    let upper = ns.inside(&ns.upper());

    ns.sh("mount_ovl; ops1 \"$M\"; ops1 \"$E\"");
    // Persist while mounted, as the resync does.
    persist(&upper, &ns.changes()).expect("persist 1");
    assert_same(&upper, &only_base(&ns.changes()));
    ns.sh("ops2 \"$M\"; ops2 \"$E\"; rsync -aX \"$M\"/ \"$S\"/; umount \"$M\"");
    let stats = persist(&upper, &ns.changes()).expect("persist 2");
    assert!(stats.deleted > 0, "{stats:?}");
    // The second persist adds a delta of what changed since the first, with whiteouts for the
    // entries that left the upper layer; the state's view is checked by the apply below.
    let l = layers(&ns.changes()).expect("layers");
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(is_whiteout(&l[1].join("new.txt")));
    assert!(is_whiteout(&l[1].join("newdir/a")));
    assert_eq!(
        listing(&ns.lower()),
        before,
        "persist touched the lower tree"
    );

    apply(&ns.changes(), &ns.lower()).expect("apply");
    assert_same(&ns.lower(), &ns.snapshot());
    assert_same_but_times(&ns.lower(), &ns.expected());
    assert_clean(&ns.lower());
}

/// The owner (uid 65534) makes the tree and changes it through the overlay, as asd's user.
fn unprivileged_scenario() -> Ns {
    let ns = Ns::new();
    ns.sh(
        "chown 65534:65534 \"$HOME_DIR\"; as_owner bash -c \"$(declare -f make_lower stamp_all); \
         make_lower '$L'\"; cp -a \"$L\" \"$E\"",
    );
    ns.sh(
        "mount_ovl; as_owner bash -euo pipefail -c \"$(declare -f ops1); ops1 '$M'; ops1 '$E'\"; \
         rsync -aX \"$M\"/ \"$S\"/; umount \"$M\"",
    );
    ns
}

/// `c` run by uid 65534 inside the test's mount namespace.
fn as_nobody(ns: &Ns, c: Command) -> Command {
    let mut s = ns.cmd("setpriv");
    s.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(c.get_program())
        .args(c.get_args())
        .envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    s
}

/// The unprivileged owner runs everything but the mount: changes through the overlay, persist
/// (inside the namespace, where the tmpfs is) and apply, as uid 65534. The changes include
/// read-only files and directories, which overlayfs gives `user.overlay.origin` xattrs when it
/// copies them up.
#[test]
fn unprivileged_owner_persists_and_applies() {
    if skip_unless_root() {
        return;
    }
    let ns = unprivileged_scenario();
    let before = listing(&ns.lower());
    let out = run_ok(as_nobody(&ns, child("persist", &ns.upper(), &ns.changes())));
    assert!(out.contains("CHILD-OK"), "{out}");
    assert_eq!(
        listing(&ns.lower()),
        before,
        "persist touched the lower tree"
    );
    let c = ns.changes();
    assert_eq!(std::fs::metadata(&c).expect("changes").uid(), 65534);
    let base = only_base(&c);
    assert!(is_whiteout(&base.join("delete.txt")));
    // The upper's whiteouts belong to root (overlayfs makes them with the mounter's
    // credentials); the copies are the owner's, otherwise the same.
    let d = rsync_itemize("-rlptDXcn", &ns.inside(&ns.upper()), &base);
    assert!(d.is_empty(), "upper and changes differ:\n{d}");

    // A second round: persist now adds a delta (whiteouts too, as the owner).
    ns.sh(
        "mount_ovl; as_owner bash -euo pipefail -c \"$(declare -f ops2); ops2 '$M'; ops2 '$E'\"; \
         rm -r \"$S\"; rsync -aX \"$M\"/ \"$S\"/; umount \"$M\"",
    );
    let out = run_ok(as_nobody(&ns, child("persist", &ns.upper(), &ns.changes())));
    assert!(out.contains("CHILD-OK"), "{out}");
    let l = layers(&c).expect("layers");
    assert_eq!(l.len(), 2, "{l:?}");
    assert_eq!(std::fs::metadata(&l[1]).expect("delta").uid(), 65534);
    assert!(is_whiteout(&l[1].join("new.txt")));
    assert_eq!(
        listing(&ns.lower()),
        before,
        "persist touched the lower tree"
    );

    let out = run_ok(as_nobody(&ns, child("apply", &ns.changes(), &ns.lower())));
    assert!(out.contains("CHILD-OK"), "{out}");
    assert_same(&ns.lower(), &ns.snapshot());
    assert_same_but_times(&ns.lower(), &ns.expected());
    assert_clean(&ns.lower());
}

/// Apply alone as the unprivileged owner (the changes persisted by root, then given to the
/// owner): read-only directories and files, xattrs on them, all without privileges.
#[test]
fn unprivileged_owner_applies() {
    if skip_unless_root() {
        return;
    }
    let ns = unprivileged_scenario();
    persist(&ns.inside(&ns.upper()), &ns.changes()).expect("persist");
    let chown = Command::new("chown")
        .args(["-hR", "65534:65534"])
        .arg(ns.changes())
        .status()
        .expect("chown");
    assert!(chown.success());
    let out = run_ok(as_nobody(&ns, child("apply", &ns.changes(), &ns.lower())));
    assert!(out.contains("CHILD-OK"), "{out}");
    assert_same(&ns.lower(), &ns.snapshot());
    assert_same_but_times(&ns.lower(), &ns.expected());
    assert_clean(&ns.lower());
    // Again, now that the destination has the read-only entries.
    run_ok(as_nobody(&ns, child("apply", &ns.changes(), &ns.lower())));
    assert_same(&ns.lower(), &ns.snapshot());
}

/// Relative path -> content of every regular file below `root`.
fn contents(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(root)
        .into_iter()
        .filter(|p| {
            std::fs::symlink_metadata(root.join(p))
                .expect("lstat")
                .is_file()
        })
        .map(|p| {
            let data = std::fs::read(root.join(&p)).expect("read");
            (p, data)
        })
        .collect()
}

fn under_temp(p: &Path) -> bool {
    p.components()
        .any(|c| c.as_os_str().as_bytes().starts_with(TEMP_PREFIX.as_bytes()))
}

/// `rm -rf dst; cp -a src dst`.
fn restore(src: &Path, dst: &Path) {
    if dst.exists() {
        std::fs::remove_dir_all(dst).expect("rm -rf");
    }
    let ok = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .expect("cp");
    assert!(ok.success());
}

/// Runs `c` to completion and returns how long it took.
fn time_child(c: Command) -> Duration {
    let t = std::time::Instant::now();
    run_ok(c);
    t.elapsed()
}

/// Where a crash test stops a child: a SIGKILL after a delay (hits the long first phase, writing
/// temporaries), or an abort after that many renames and deletions (the test hook shared with
/// the copy engine: hits the short phases that put things in place).
#[derive(Debug, Clone, Copy)]
enum Crash {
    After(Duration),
    AfterRenames(usize),
}

/// The crash points for a child that takes `full` when left alone.
fn crash_points(full: Duration) -> Vec<Crash> {
    let mut v: Vec<Crash> = (0..4u32).map(|k| Crash::After(full * k / 4)).collect();
    v.extend(
        [0, 2, 10, 30, 55, 65, 80, 200]
            .into_iter()
            .map(Crash::AfterRenames),
    );
    v
}

/// Runs `c` until `crash`; returns whether it was stopped before finishing.
fn crash_child(mut c: Command, crash: Crash) -> bool {
    c.stdout(Stdio::null()).stderr(Stdio::null());
    if let Crash::AfterRenames(n) = crash {
        c.env("ASD_TEST_CRASH_AFTER_RENAMES", n.to_string());
    }
    let mut proc = c.spawn().expect("spawn");
    if let Crash::After(delay) = crash {
        std::thread::sleep(delay);
        let _ = proc.kill();
    }
    let status = proc.wait().expect("wait");
    // Every apply and persist has a first step, so the hook aborts it there; a child that did
    // not abort has no hook (built without the test-hooks feature), and every AfterRenames
    // point would then test nothing.
    if let Crash::AfterRenames(0) = crash {
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGABRT),
            "the crash hook did not abort the child ({status}): built without the test-hooks \
             feature? run tests/run.sh, or cargo test --features asd-user/test-hooks"
        );
    }
    !status.success()
}

/// Checks a tree hit by a crash against the version before (`old`) and after (`new`): every
/// file is at one of them, and no name both have is missing. Returns how many of the files that
/// differ between the versions are new, and the number of temporary leftovers.
fn check_old_or_new(
    root: &Path,
    old: &BTreeMap<PathBuf, Vec<u8>>,
    new: &BTreeMap<PathBuf, Vec<u8>>,
    both: &[PathBuf],
    when: &str,
) -> (usize, usize) {
    let (mut new_count, mut temps) = (0, 0);
    for (p, data) in contents(root) {
        if under_temp(&p) {
            temps += 1;
            continue;
        }
        let (is_old, is_new) = (old.get(&p) == Some(&data), new.get(&p) == Some(&data));
        assert!(
            is_old || is_new,
            "{when}: {} is neither old nor new",
            p.display()
        );
        if is_new && !is_old {
            new_count += 1;
        }
    }
    for p in both {
        assert!(
            std::fs::symlink_metadata(root.join(p)).is_ok(),
            "{when}: {} is missing",
            p.display()
        );
    }
    (new_count, temps)
}

fn names_in_both(a: &Path, b: &Path) -> Vec<PathBuf> {
    let in_a: std::collections::BTreeSet<PathBuf> = walk(a).into_iter().collect();
    walk(b).into_iter().filter(|p| in_a.contains(p)).collect()
}

/// Crashes at many points of an apply (see [`crash_points`]), each time from the original tree: every file is at its old or its new version, no name that both versions have
/// is ever missing, and removing the leftovers and applying again gives the right tree.
#[test]
fn apply_killed_midway_then_applied_again() {
    if skip_unless_root() {
        return;
    }
    let ns = Ns::new();
    ns.sh(
        "make_lower \"$L\"; mount_ovl; ops1 \"$M\"; bulk_ops \"$M\"; rsync -aX \"$M\"/ \"$S\"/; \
         umount \"$M\"",
    );
    persist(&ns.inside(&ns.upper()), &ns.changes()).expect("persist");
    let (l, pristine) = (ns.lower(), ns.home().join("t0"));
    restore(&l, &pristine);
    let old = contents(&l);
    let new = contents(&ns.snapshot());
    let changed = new.iter().filter(|(p, d)| old.get(*p) != Some(*d)).count();
    let both = names_in_both(&l, &ns.snapshot());

    let full = time_child(child("apply", &ns.changes(), &l));
    assert_same(&l, &ns.snapshot());
    eprintln!("a whole apply took {full:?} ({changed} files change)");
    let mut midway = 0;
    for crash in crash_points(full) {
        restore(&pristine, &l);
        let killed = crash_child(child("apply", &ns.changes(), &l), crash);
        let when = format!("after a crash {crash:?}");
        let (n, temps) = check_old_or_new(&l, &old, &new, &both, &when);
        eprintln!("{when}: killed={killed}, {n}/{changed} files new, {temps} temporary files");
        if killed && (temps > 0 || (n > 0 && n < changed)) {
            midway += 1;
        }
        remove_temp_entries(&l).expect("remove leftovers");
        apply(&ns.changes(), &l).expect("apply after the kill");
        assert_same(&l, &ns.snapshot());
        assert_clean(&l);
    }
    assert!(
        midway >= 5,
        "only {midway} crashes hit an apply midway; the test proves little"
    );
}

/// Crashes at many points of a persist (each time from the previous persisted state): the
/// state always gives the whole previous view or the whole new one when applied, never a mix (a
/// mix can delete data: a whiteout without the file it was renamed to), and the next persist
/// removes what the crash left. Twice: a persist that adds a delta to a state, and a full
/// rebuild (from a `changes` in the format before deltas, a copy of the upper layer).
#[test]
fn persist_killed_midway_leaves_the_old_or_the_new_state() {
    if skip_unless_root() {
        return;
    }
    let ns = Ns::new();
    let upper = ns.inside(&ns.upper());
    let (c, c0, legacy) = (
        ns.changes(),
        ns.home().join("c0"),
        ns.home().join("c0-legacy"),
    );
    let leftovers_at = [
        ns.home()
            .join(format!("{TEMP_PREFIX}.t-backup_asd-changes")),
        ns.home()
            .join(format!("{TEMP_PREFIX}.t-backup_asd-changes.delta")),
    ];
    ns.sh("make_lower \"$L\"; mount_ovl; ops1 \"$M\"; rsync -aX \"$M\"/ \"$S\"/; umount \"$M\"");
    persist(&upper, &c).expect("persist 1");
    restore(&c, &c0);
    restore(&upper, &legacy);
    // The view before: what apply makes of the original with the first state.
    let view = |state: &Path, name: &str| {
        let at = ns.root.join(name);
        restore(&ns.lower(), &at);
        apply(state, &at).expect("apply");
        at
    };
    let old = view(&c0, "view-old");
    assert_same(&old, &ns.snapshot());
    ns.sh(
        "rm -r \"$S\"; mount_ovl; ops2 \"$M\"; bulk_ops \"$M\"; rsync -aX \"$M\"/ \"$S\"/; \
         umount \"$M\"",
    );
    for (start, what, least) in [(&c0, "delta", 2), (&legacy, "full rebuild", 5)] {
        restore(start, &c);
        let full = time_child(child("persist", &upper, &c));
        assert_eq!(
            layers(&c).expect("layers").len(),
            if what == "delta" { 2 } else { 1 }
        );
        assert_same(&view(&c, "view-new"), &ns.snapshot());
        eprintln!("{what}: a whole persist took {full:?}");
        let (mut old_states, mut new_states, mut leftovers) = (0, 0, 0);
        let mut points = crash_points(full);
        points.push(Crash::AfterRenames(1));
        for crash in points {
            restore(start, &c);
            let killed = crash_child(child("persist", &upper, &c), crash);
            let got = view(&c, "view-got");
            let is_old = rsync_itemize("-aXn", &old, &got).is_empty();
            let is_new = rsync_itemize("-aXn", &ns.snapshot(), &got).is_empty();
            let left = leftovers_at.iter().any(|p| p.exists());
            eprintln!(
                "{what}: after a crash {crash:?}: killed={killed} old={is_old} new={is_new} \
                 leftover={left}"
            );
            assert!(
                is_old || is_new,
                "{what}: after a crash {crash:?}, the state gives a mix of two views"
            );
            assert!(
                killed || is_new,
                "{what}: a persist that finished left the old state"
            );
            old_states += usize::from(killed && is_old);
            new_states += usize::from(killed && is_new);
            leftovers += usize::from(left);
        }
        assert!(
            old_states >= least && leftovers >= least,
            "{what}: only {old_states} crashes hit a persist midway; the test proves little"
        );
        // The state a crash left is completed by the next persist, which also removes the
        // leftover.
        persist(&upper, &c).expect("persist after a crash");
        assert_same(&view(&c, "view-new"), &ns.snapshot());
        assert!(
            leftovers_at.iter().all(|p| !p.exists()),
            "{what}: leftover of the crash not removed"
        );
        eprintln!("{what}: {old_states} crashes left the old state, {new_states} the new one");
    }
    apply(&c, &ns.lower()).expect("apply");
    assert_same(&ns.lower(), &ns.snapshot());
}

/// Background writeback off for a power-cut simulation; restored on drop, even on failure.
struct Writeback(Vec<(&'static str, String)>);

impl Writeback {
    const KEYS: [(&'static str, &'static str, &'static str); 2] = [
        ("/proc/sys/vm/dirty_writeback_centisecs", "0", "500"),
        ("/proc/sys/vm/dirty_expire_centisecs", "360000", "3000"),
    ];

    fn off() -> Writeback {
        let mut saved = Vec::new();
        for (path, off, default) in Self::KEYS {
            let now = std::fs::read_to_string(path).expect("sysctl");
            // Another test may have switched writeback off at the same moment: never "restore"
            // its off value, which would leave writeback off for good.
            let restore = if now.trim() == off {
                default.to_string()
            } else {
                now.trim().to_string()
            };
            saved.push((path, restore));
            std::fs::write(path, off).expect("sysctl");
        }
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

/// A power cut right after persist returned, and another right after apply returned: copy the
/// disk image (an ext4 on a loop device holding the target and `changes`) while it is mounted
/// with background writeback off, so the copy holds only what was made durable; repair it with
/// e2fsck and compare.
#[test]
fn power_cut_after_persist_and_after_apply_loses_nothing() {
    if skip_unless_root() {
        return;
    }
    let ns = Ns::new();
    let (img, cut1, cut2) = (
        ns.root.join("disk.img"),
        ns.root.join("cut1.img"),
        ns.root.join("cut2.img"),
    );
    // The loop filesystem is mounted over `home`, inside the namespace only.
    ns.sh(&format!(
        "truncate -s 256M '{i}' && mkfs.ext4 -q -F '{i}' && mount -o loop '{i}' \"$HOME_DIR\" && \
         make_lower \"$L\" && mount_ovl && ops1 \"$M\" && rsync -aX \"$M\"/ \"$S\"/ && sync",
        i = img.display()
    ));
    let (upper, c, l) = (
        ns.inside(&ns.upper()),
        ns.inside(&ns.changes()),
        ns.inside(&ns.lower()),
    );
    let cut = |to: &Path| {
        let ok = Command::new("cp")
            .arg("--sparse=always")
            .arg(&img)
            .arg(to)
            .status()
            .expect("cp");
        assert!(ok.success());
    };
    {
        let _wb = Writeback::off();
        // Persisted while mounted, as resyncs do: a base, then a delta with more changes.
        persist(&upper, &c).expect("persist");
        ns.sh("ops2 \"$M\" && rm -r \"$S\" && rsync -aX \"$M\"/ \"$S\"/");
        persist(&upper, &c).expect("persist a delta");
        assert_eq!(layers(&c).expect("layers").len(), 2);
        cut(&cut1);
        ns.sh("umount \"$M\"");
        apply(&c, &l).expect("apply");
        cut(&cut2);
    }
    for (i, image) in [&cut1, &cut2].into_iter().enumerate() {
        let fsck = Command::new("e2fsck")
            .arg("-fy")
            .arg(image)
            .output()
            .expect("e2fsck");
        assert!(
            fsck.status.code().unwrap_or(8) < 4,
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let at = ns.root.join(format!("after-cut{}", i + 1));
        std::fs::create_dir(&at).expect("mkdir");
        ns.sh(&format!(
            "mount -o loop,ro '{}' '{}'",
            image.display(),
            at.display()
        ));
    }
    // The first cut: the state it holds, applied to a copy of the original it holds, gives
    // the merged view. Compared inside the namespace: rsync cannot use a /proc/PID/root path as
    // its destination, not even for a dry run.
    let after1 = ns.root.join("after-cut1/.t-backup_asd-changes");
    let view1 = ns.root.join("after-cut1-view");
    ns.sh(&format!(
        "cp -a '{}' '{}'",
        ns.root.join("after-cut1/t").display(),
        view1.display()
    ));
    apply(&ns.inside(&after1), &view1).expect("apply the state after the cut");
    let after2 = ns.root.join("after-cut2/t");
    let d = ns.sh(&format!(
        "rsync -aXn --delete --itemize-changes '{}'/ \"$S\"/; \
         rsync -aXn --delete --itemize-changes '{}'/ \"$S\"/",
        view1.display(),
        after2.display()
    ));
    assert!(d.is_empty(), "lost in a power cut:\n{d}");
}

// -- hand-made change sets (no mount needed) --------------------------------------------------

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("asd-ovl-unit-")
        .tempdir_in("/var/tmp")
        .expect("scratch")
}

fn write(p: &Path, data: &str) {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(p, data).expect("write");
}

fn user_xattrs_work(dir: &Path) -> bool {
    let probe = dir.join("xattr-probe");
    write(&probe, "");
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    std::fs::remove_file(&probe).expect("rm");
    ok
}

/// The xattr forms: `user.overlay.whiteout` files (in an opaque="x" dir and elsewhere), an
/// opaque="y" dir replacing a dir, and dirs and files trading places.
#[test]
fn xattr_whiteouts_opaque_dirs_and_type_changes() {
    let t = scratch();
    if !user_xattrs_work(t.path()) {
        eprintln!("SKIPPED: no user xattrs on /var/tmp");
        return;
    }
    let (l, c) = (t.path().join("l"), t.path().join("c"));
    for f in [
        "d/a",
        "d/b",
        "d/c",
        "top",
        "r/old1",
        "r/sub/old2",
        "f2d",
        "d2f/x/y",
    ] {
        write(&l.join(f), f);
    }
    xattr::set(l.join("d"), "user.mine", b"1").expect("setxattr");
    // changes: d merged ("x": holds xattr whiteouts), d/a deleted, d/n new; top deleted;
    // r replaced (opaque); f2d now a dir; d2f now a file.
    write(&c.join("d/a"), "");
    write(&c.join("d/n"), "new");
    write(&c.join("top"), "");
    write(&c.join("r/new1"), "n1");
    write(&c.join("f2d/inner"), "i");
    write(&c.join("d2f"), "now a file");
    xattr::set(c.join("d"), "user.overlay.opaque", b"x").expect("setxattr");
    xattr::set(c.join("d"), "user.mine", b"2").expect("setxattr");
    xattr::set(c.join("d/a"), "user.overlay.whiteout", b"").expect("setxattr");
    xattr::set(c.join("top"), "user.overlay.whiteout", b"").expect("setxattr");
    xattr::set(c.join("r"), "user.overlay.opaque", b"y").expect("setxattr");
    xattr::set(c.join("d/n"), "user.overlay.origin", b"\0\0").expect("setxattr");
    // A leftover of an interrupted persist is not part of the changes.
    write(&c.join(format!("{TEMP_PREFIX}1.2")), "partial");

    let stats = apply(&c, &l).expect("apply");
    eprintln!("{stats:?}");
    let names = |p: &Path| -> Vec<String> {
        walk(p)
            .iter()
            .map(|x| x.to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&l),
        [
            "d",
            "d/b",
            "d/c",
            "d/n",
            "d2f",
            "f2d",
            "f2d/inner",
            "r",
            "r/new1"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(l.join("d2f")).expect("read"),
        "now a file"
    );
    assert_eq!(
        xattr::get(l.join("d"), "user.mine").expect("get"),
        Some(b"2".to_vec())
    );
    assert_clean(&l);
    // Idempotent.
    apply(&c, &l).expect("apply again");
    assert_eq!(names(&l).len(), 9);
    assert_clean(&l);
}

/// A metacopy entry (data left in the lower layer) is refused, not applied as an empty file.
#[test]
fn metacopy_entries_are_refused() {
    let t = scratch();
    if !user_xattrs_work(t.path()) {
        eprintln!("SKIPPED: no user xattrs on /var/tmp");
        return;
    }
    let (l, c) = (t.path().join("l"), t.path().join("c"));
    write(&l.join("f"), "precious");
    write(&c.join("f"), "");
    write(&c.join("g"), "fine");
    xattr::set(c.join("f"), "user.overlay.metacopy", b"").expect("setxattr");
    let err = apply(&c, &l).expect_err("metacopy must be refused");
    assert!(err.to_string().contains("metacopy"), "{err}");
    assert!(
        err.to_string().contains(&c.join("f").display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(l.join("f")).expect("read"),
        "precious"
    );
    // The rest was applied.
    assert_eq!(std::fs::read_to_string(l.join("g")).expect("read"), "fine");
}

/// Symlinks are never followed: not as `changes`, not as the destination, not inside.
#[test]
fn symlinks_are_not_followed() {
    let t = scratch();
    let (l, c, elsewhere) = (t.path().join("l"), t.path().join("c"), t.path().join("x"));
    write(&elsewhere.join("victim"), "keep");
    write(&l.join("f"), "old");
    std::os::unix::fs::symlink(&elsewhere, l.join("link_dir")).expect("symlink");
    write(&c.join("link_dir/victim"), "overwritten?");
    write(&c.join("f"), "new");

    // A destination below a symlink: replaced by a real dir, the symlink's target untouched.
    apply(&c, &l).expect("apply");
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("victim")).expect("read"),
        "keep"
    );
    assert!(std::fs::symlink_metadata(l.join("link_dir"))
        .expect("lstat")
        .is_dir());

    let link = t.path().join("link_to_l");
    std::os::unix::fs::symlink(&l, &link).expect("symlink");
    match apply(&c, &link) {
        Err(OverlayError::Io { op: "open", .. }) => {}
        other => panic!("apply through a symlink: {other:?}"),
    }
    let clink = t.path().join("link_to_c");
    std::os::unix::fs::symlink(&elsewhere, &clink).expect("symlink");
    assert!(persist(&c, &clink).is_err(), "persist into a symlink");
    assert!(!elsewhere.join("f").exists());
}

#[test]
fn leftover_temp_entries_are_removed() {
    let t = scratch();
    let l = t.path().join("l");
    write(&l.join("keep/file"), "k");
    write(&l.join(format!("keep/{TEMP_PREFIX}9.o1")), "partial");
    write(
        &l.join(format!("{TEMP_PREFIX}9.o2/deep/x")),
        "dir built halfway",
    );
    assert_eq!(remove_temp_entries(&l).expect("remove"), 2);
    assert_eq!(
        walk(&l),
        [PathBuf::from("keep"), PathBuf::from("keep/file")]
    );
}
