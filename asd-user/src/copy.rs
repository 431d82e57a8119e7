//! The copy engine (DESIGN.md §7): makes a destination tree equal to a source tree.
//!
//! [`sync_tree`] is a native `rsync -aX --delete`: it never follows symlinks (every lookup is an
//! `lstat`/`O_NOFOLLOW` relative to an opened directory descriptor), skips files whose type, size
//! and mtime (ns) match, and writes changed files to a temporary name ([`TEMP_PREFIX`]) that is
//! renamed over the final name, so a reader — or a crash — sees either the old or the new file.
//!
//! # Durability ordering (`CopyOptions::durable`, used when the destination is on disk)
//!
//! 1. Walk both trees. Every new or changed non-directory is written completely (data, owner,
//!    mode, xattrs, then times) under a temporary name in its destination directory. A directory
//!    that is new (or replaces a non-directory) is built completely under a temporary name and
//!    renamed as a whole later, so its content needs no per-file renames. Nothing visible under a
//!    final name changes in this phase except metadata fixed in place (never on an inode with
//!    `st_nlink > 1`, which is shared with the hard-linked start-state clone).
//! 2. `syncfs` the destination: every temporary file is durable before any of them is renamed,
//!    so no rename can ever be persisted ahead of its data (a torn file). One `syncfs` instead of
//!    an `fsync` per file: it flushes the same data with one journal commit instead of thousands,
//!    and since Linux 5.8 it reports writeback errors of the whole filesystem (the descriptor we
//!    call it on was opened before any of our writes, so no error can be missed).
//! 3. Rename the temporaries over their final names (`RENAME_EXCHANGE` where a directory and a
//!    non-directory swap places, so the name never disappears).
//! 4. If anything is to be deleted: `syncfs` again, so the new copies of moved files are durable
//!    before their old names go away; then delete the destination entries the source lacks.
//! 5. Fix directory metadata bottom-up (after their children changed, since every rename or
//!    unlink bumps the directory's mtime), then a final `syncfs`.
//!
//! A crash at any point leaves every destination file at its old or its new version; leftovers
//! are temporary names only, removed by [`remove_temp_files`]. Without `durable` (copying into
//! tmpfs) the same code runs without syncs, and new entries are created directly under their
//! final names.
//!
//! # Incremental and full comparisons
//!
//! With [`CopyOptions::changed_since`] only source entries changed since the previous sync
//! (by their ctime) are compared, and destination directories are opened and listed only where
//! the source changed: an unchanged subtree costs no destination I/O. A full comparison instead
//! lstats every destination entry, which with a cold cache waits on the disk; prefetch
//! threads keep several of those reads in flight ahead of the walk. An incremental one has a
//! scout thread find the changed entries in the source ahead of the walk, and threads look
//! their destination counterparts up meanwhile.
//!
//! Errors on single entries do not stop the walk (one unreadable file must not keep every other
//! file from being written back): they are logged, and the first one is returned at the end.
//! Entries whose source could not be read are never deleted from the destination.

use std::cell::{Cell, OnceCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags, XattrFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::fsio::{
    copy_data, crash_point, fstat, is_temp_name, is_user_xattr, list_dir, lstat_at, mode,
    read_xattrs, remove_entry, remove_tree, wanted_xattr, x_remove, x_set, Ids, Meta, XRef, Xattrs,
    DIR_FLAGS, FILE_FLAGS, MAX_KEPT_DIRS,
};

/// Prefix of temporary files the engine creates; crash recovery removes leftovers with this prefix.
pub const TEMP_PREFIX: &str = ".#asd-tmp.";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOptions {
    /// Remove entries of the destination that the source does not have (after all copies).
    pub delete: bool,
    /// Make the result durable before returning (fsync/syncfs); needed when the destination is disk.
    pub durable: bool,
    /// Incremental mode: the caller guarantees that at this time the destination was equal to
    /// the source (take it with [`Timestamp::now`] before the previous complete sync started
    /// reading the source). Then only what changed in the source since then is compared:
    ///
    /// - a source entry whose ctime is older is unchanged: its destination counterpart is not
    ///   looked at at all (no lstat);
    /// - a source directory whose ctime is older had no entries added, removed or renamed, so
    ///   its destination counterpart is not listed and nothing is deleted in it; its
    ///   subdirectories are still walked (on the source side) for changes deeper down;
    /// - destination directories are opened only where something is to be compared or written,
    ///   so an unchanged subtree costs no destination I/O at all.
    ///
    /// ctime is set by the kernel alone, from the wall clock (on write, truncate, chmod, chown,
    /// xattr changes, rename and link count changes; a directory's also on entry additions,
    /// removals and renames), so no change made through the source is missed, with these
    /// exceptions: the clock was set back between this time and now (detected only if it is
    /// still earlier now: the option is then ignored, a full comparison); and writes through a
    /// shared mmap that stamp no time (tmpfs stamps only the first write fault on each page of
    /// a mapping), which the size+mtime quick check cannot see either. [`CTIME_MARGIN_MS`] is
    /// subtracted to absorb the coarse clock the kernel stamps inodes with.
    ///
    /// The trade-off: a change made to the *destination* behind the engine's back, under a name
    /// whose source did not change, is not seen (nor repaired). asd therefore uses a full
    /// comparison (`None`) at unsync and for the first resync after a start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<Timestamp>,
}

/// A wall-clock time (`CLOCK_REALTIME`, the clock inode times are taken from): seconds and
/// nanoseconds since the Unix epoch, `nsec` in `0..1_000_000_000`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: i64,
}

/// Subtracted from [`CopyOptions::changed_since`], in milliseconds: the source's inode times
/// (tmpfs, or a filesystem on zram, both with nanosecond times) come from the kernel's coarse
/// clock, which lags the clock the caller reads by at most one tick (≤ 10 ms at HZ=100). 100 ms
/// covers that tenfold. Kept small on purpose: a sync's own copies are made just before
/// `changed_since` is taken, and everything newer than the cutoff is compared again.
pub const CTIME_MARGIN_MS: i64 = 100;

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(std::time::SystemTime::now())
    }

    /// `nsec` brought into `0..1_000_000_000` (a deserialized value may be denormal), so that
    /// the derived ordering is the ordering of times.
    fn normalized(self) -> Timestamp {
        const NS: i64 = 1_000_000_000;
        Timestamp {
            sec: self.sec.saturating_add(self.nsec.div_euclid(NS)),
            nsec: self.nsec.rem_euclid(NS),
        }
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Timestamp {
        let signed = |d: std::time::Duration| {
            (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_nanos()),
            )
        };
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => {
                let (sec, nsec) = signed(d);
                Timestamp { sec, nsec }
            }
            // Before 1970: negate, then normalize the nanoseconds.
            Err(e) => {
                let (sec, nsec) = signed(e.duration());
                Timestamp {
                    sec: -sec,
                    nsec: -nsec,
                }
                .normalized()
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStats {
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub metadata_updated: u64,
    pub dirs_created: u64,
    pub symlinks_copied: u64,
    pub deleted: u64,
    /// Entries that disappeared from the source during the walk (not an error).
    pub vanished: u64,
    /// Entries found unchanged: examined, or (with `changed_since`) by their ctime alone.
    /// Directories are not counted.
    pub unchanged: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn cerr(op: &'static str, path: PathBuf, e: impl Into<std::io::Error>) -> CopyError {
    CopyError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Make `dst` (an existing directory) equal to `src`.
pub fn sync_tree(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopyStats, CopyError> {
    Engine::new(src, dst, opts, None).run()
}

/// [`sync_tree`] with a hook called with the source path of every entry just before it is
/// examined; tests use it to make entries vanish mid-walk.
#[cfg(test)]
fn sync_tree_with_hook(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    hook: &mut dyn FnMut(&Path),
) -> Result<CopyStats, CopyError> {
    Engine::new(src, dst, opts, Some(hook)).run()
}

/// [`sync_tree`] with a ctime margin of `margin` milliseconds instead of [`CTIME_MARGIN_MS`].
#[cfg(test)]
fn sync_tree_with_margin(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    margin: i64,
) -> Result<CopyStats, CopyError> {
    let mut engine = Engine::new(src, dst, opts, None);
    engine.margin = margin;
    engine.run()
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by every walker in this file (the fd-relative primitives it shares with
// the overlay path are in [`crate::fsio`]).

fn join_rel(root: &Path, rel: &[u8], name: Option<&CStr>) -> PathBuf {
    let mut p = root.to_path_buf();
    if !rel.is_empty() {
        p.push(OsStr::from_bytes(rel));
    }
    if let Some(n) = name {
        p.push(OsStr::from_bytes(n.to_bytes()));
    }
    p
}

fn push_rel(rel: &mut Vec<u8>, name: &CStr) -> usize {
    let len = rel.len();
    if !rel.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name.to_bytes());
    len
}

fn open_root(path: &Path) -> Result<OwnedFd, CopyError> {
    rfs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| cerr("open", path.to_path_buf(), e))
}

/// [`list_dir`] with each entry's type as the directory itself records it (`d_type`), which
/// costs no inode read; [`FileType::Unknown`] where the filesystem does not record it.
fn list_dir_typed(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<HashMap<CString, FileType>> {
    if buf.capacity() < 64 * 1024 {
        buf.reserve(64 * 1024);
    }
    let mut names = HashMap::new();
    let mut iter = RawDir::new(fd, buf.spare_capacity_mut());
    while let Some(entry) = iter.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.insert(name.to_owned(), entry.file_type());
        }
    }
    Ok(names)
}

/// Whether directory `dir` lies below the directory identified by `(dev, ino)`, found by
/// walking up through `..`.
fn is_below(dir: BorrowedFd<'_>, ancestor: (u64, u64)) -> bool {
    let Ok(mut prev) = fstat(dir) else {
        return false;
    };
    let Ok(mut cur) = rfs::openat(dir, c"..", DIR_FLAGS, Mode::empty()) else {
        return false;
    };
    for _ in 0..4096 {
        let Ok(m) = fstat(cur.as_fd()) else {
            return false;
        };
        if (m.dev, m.ino) == ancestor {
            return true;
        }
        if (m.dev, m.ino) == (prev.dev, prev.ino) {
            // "/" is its own parent.
            return false;
        }
        prev = m;
        match rfs::openat(&cur, c"..", DIR_FLAGS, Mode::empty()) {
            Ok(fd) => cur = fd,
            Err(_) => return false,
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Extended attributes: user.* and POSIX ACLs (reading and writing them: [`crate::fsio`]).

/// `listxattrat(dir, name, AT_SYMLINK_NOFOLLOW, buf)` (Linux 6.13; rustix and libc do not wrap
/// it yet): lists xattrs relative to a directory descriptor, without a path through /proc.
fn listxattrat(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
    // The same number on every architecture (the unified syscall table, since Linux 5.1).
    const SYS_LISTXATTRAT: libc::c_long = 465;
    // SAFETY: the arguments are a valid directory descriptor, a NUL-terminated name, and a
    // writable buffer with its exact length; the kernel writes at most buf.len() bytes.
    let r = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if r < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(Errno::from_raw_os_error(errno));
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Probing entries: the read-only part of comparing two directories, which can run on a helper
// thread.

/// Reads the wanted xattrs of directory entries by name. One per thread.
struct XReader {
    proc_fd: bool,
    /// The kernel has listxattrat (Linux 6.13).
    xattrat: bool,
    pbuf: Vec<u8>,
}

impl XReader {
    fn new() -> XReader {
        XReader {
            proc_fd: Path::new("/proc/self/fd").is_dir(),
            xattrat: true,
            pbuf: Vec::new(),
        }
    }

    /// `/proc/self/fd/N/name`: a path that resolves through the already opened directory, so
    /// path-only calls (l*xattr) stay as safe as the *at() calls. None without /proc.
    fn proc_path(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Option<CString> {
        if !self.proc_fd {
            return None;
        }
        self.pbuf.clear();
        self.pbuf.extend_from_slice(b"/proc/self/fd/");
        self.pbuf
            .extend_from_slice(dir.as_raw_fd().to_string().as_bytes());
        self.pbuf.push(b'/');
        self.pbuf.extend_from_slice(name.to_bytes());
        CString::new(self.pbuf.as_slice()).ok()
    }

    /// The wanted xattrs of entry `name` in `dir` (a regular file or directory).
    fn entry_xattrs(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Xattrs> {
        // Most files have no xattrs at all: find that out with one fd-relative call.
        if self.xattrat {
            let mut small = [0u8; 256];
            match listxattrat(dir, name, &mut small) {
                Ok(n) if !small[..n].split(|b| *b == 0).any(wanted_xattr) => {
                    return Ok(Vec::new());
                }
                Ok(_) | Err(Errno::RANGE) => {}
                // EPERM: a seccomp allow list (systemd's SystemCallFilter=, container
                // runtimes) that predates listxattrat refuses it; fall back like ENOSYS.
                Err(Errno::NOSYS) | Err(Errno::PERM) => self.xattrat = false,
                Err(Errno::NOTSUP) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        match self.proc_path(dir, name) {
            Some(p) => read_xattrs(XRef::Path(&p), wanted_xattr),
            None => {
                let fd = rfs::openat(dir, name, FILE_FLAGS, Mode::empty())?;
                read_xattrs(XRef::Fd(fd.as_fd()), wanted_xattr)
            }
        }
    }
}

/// Source and destination xattrs, or the error and whether it was on the source.
type XattrPair = Result<(Xattrs, Xattrs), (bool, Errno)>;

/// What the destination directory's listing says about a source name.
#[derive(Debug, Clone, Copy)]
enum InDst {
    /// The listing does not have it.
    No,
    /// The listing has it, with this `d_type`.
    Listed(FileType),
    /// The listing was not read: the source directory did not change since the cutoff, so the
    /// destination holds the same names.
    Assumed,
}

/// What the walk learned about a name's destination counterpart.
enum DstProbe {
    /// No such name in the destination (or no lstat needed since the source is gone).
    Absent,
    /// Unchanged in the source since the cutoff: the destination is equal, not looked at.
    Unchanged,
    /// Must be compared, but the destination directory is not open yet.
    Pending,
    Stat(rustix::io::Result<Meta>),
}

/// What the walk needs to know about one name before deciding what to do with it.
struct Probe {
    name: CString,
    src: rustix::io::Result<Meta>,
    dst: DstProbe,
    /// For regular files that pass the quick check.
    xattrs: Option<XattrPair>,
}

/// The quick check: same type, size and mtime (ns) means the same data.
fn quick_equal(sm: &Meta, dm: &Meta) -> bool {
    sm.kind == FileType::RegularFile
        && dm.kind == FileType::RegularFile
        && sm.size == dm.size
        && sm.mtime == dm.mtime
}

/// lstat of a source entry and, unless it is unchanged since `cutoff`, of its destination
/// counterpart in `dst` (None: not opened yet).
fn probe(
    xr: &mut XReader,
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    name: CString,
    in_dst: InDst,
    cutoff: Option<Timestamp>,
) -> Probe {
    let s = lstat_at(src, &name);
    let d = match (&s, in_dst) {
        (Err(_), _) | (_, InDst::No) => DstProbe::Absent,
        (Ok(sm), hint) => {
            let old = cutoff.is_some_and(|c| sm.ctime < c);
            match (hint, dst) {
                // An unchanged entry under a name that has the same type in the destination:
                // the d_type check catches what a ctime cannot (a name now meaning another,
                // older inode, should a filesystem not stamp renamed inodes).
                (InDst::Listed(t), _) if old && t == sm.kind => DstProbe::Unchanged,
                (InDst::Assumed, _) if old => DstProbe::Unchanged,
                (_, Some(dst)) => DstProbe::Stat(lstat_at(dst, &name)),
                (_, None) => DstProbe::Pending,
            }
        }
    };
    let xattrs = match (&s, &d, dst) {
        (Ok(sm), DstProbe::Stat(Ok(dm)), Some(dst)) if quick_equal(sm, dm) => Some(
            xr.entry_xattrs(src, &name)
                .map_err(|e| (true, e))
                .and_then(|sx| {
                    xr.entry_xattrs(dst, &name)
                        .map(|dx| (sx, dx))
                        .map_err(|e| (false, e))
                }),
        ),
        _ => None,
    };
    Probe {
        name,
        src: s,
        dst: d,
        xattrs,
    }
}

/// Half of a directory's names, with its own descriptors, for the helper thread.
struct ProbeJob {
    src: OwnedFd,
    dst: Option<OwnedFd>,
    names: Vec<(CString, InDst)>,
    cutoff: Option<Timestamp>,
}

struct Helper {
    tx: mpsc::Sender<ProbeJob>,
    rx: mpsc::Receiver<Vec<Probe>>,
    handle: std::thread::JoinHandle<()>,
}

impl Helper {
    fn spawn() -> Option<Helper> {
        let (tx, jobs) = mpsc::channel::<ProbeJob>();
        let (results, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("asd-copy-probe".into())
            .spawn(move || {
                let mut xr = XReader::new();
                for job in jobs {
                    let out: Vec<Probe> = job
                        .names
                        .into_iter()
                        .map(|(n, in_dst)| {
                            let dst = job.dst.as_ref().map(|fd| fd.as_fd());
                            probe(&mut xr, job.src.as_fd(), dst, n, in_dst, job.cutoff)
                        })
                        .collect();
                    if results.send(out).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Helper { tx, rx, handle })
    }

    fn finish(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

// ---------------------------------------------------------------------------------------------
// Warming the destination's metadata ahead of a full comparison.

/// Threads that read the metadata of the destination tree (directory listings and inodes)
/// ahead of the walk of a full comparison. With a cold cache that walk waits on one disk read
/// after another; these keep several reads in flight, so that the walk mostly finds the cache
/// warm. They only read, and stop as soon as the walk is done.
struct Prefetch {
    shared: std::sync::Arc<PrefetchShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct PrefetchShared {
    root: OwnedFd,
    queue: std::sync::Mutex<PrefetchQueue>,
    wake: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

struct PrefetchQueue {
    /// Directories still to read, relative to the root.
    dirs: Vec<Vec<u8>>,
    /// Directories being read.
    busy: usize,
}

impl Prefetch {
    fn start(root: BorrowedFd<'_>, threads: usize) -> Option<Prefetch> {
        let shared = std::sync::Arc::new(PrefetchShared {
            root: root.try_clone_to_owned().ok()?,
            queue: std::sync::Mutex::new(PrefetchQueue {
                dirs: vec![Vec::new()],
                busy: 0,
            }),
            wake: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let threads = (0..threads)
            .filter_map(|_| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name("asd-copy-prefetch".into())
                    .spawn(move || prefetch_worker(&sh))
                    .ok()
            })
            .collect();
        Some(Prefetch { shared, threads })
    }

    fn stop(self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// More reads in flight than threads of the walk; beyond 2-4 a virtio disk gained nothing in
/// measurements (20k files: 215 ms cold without, 165 ms with 2 to 8 threads).
const PREFETCH_THREADS: usize = 4;
/// A directory whose opening and listing takes longer than this (plus per entry) was read
/// from disk: far more than a cached listing takes, far less than a disk read.
const PREFETCH_COLD_DIR: std::time::Duration = std::time::Duration::from_micros(40);
const PREFETCH_COLD_ENTRY: std::time::Duration = std::time::Duration::from_nanos(500);

fn prefetch_worker(sh: &PrefetchShared) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = Vec::new();
    loop {
        let rel = {
            let Ok(mut q) = sh.queue.lock() else {
                return;
            };
            loop {
                if sh.stop.load(Relaxed) {
                    return;
                }
                if let Some(rel) = q.dirs.pop() {
                    q.busy += 1;
                    break rel;
                }
                if q.busy == 0 {
                    // Everything read.
                    sh.wake.notify_all();
                    return;
                }
                q = match sh.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let mut found = Vec::new();
        // Errors do not matter here: the walk meets them again and reports them.
        let started = std::time::Instant::now();
        if let Ok(dir) = Engine::open_rel(sh.root.as_fd(), &rel) {
            let names = list_dir_typed(dir.as_fd(), &mut buf).unwrap_or_default();
            // A directory that had to be read from disk probably has its inodes there too;
            // one that came from the cache probably has them cached as well, and statting them
            // would only take CPU from the walk.
            let entries = u32::try_from(names.len()).unwrap_or(u32::MAX);
            let cold = started.elapsed() > PREFETCH_COLD_DIR + PREFETCH_COLD_ENTRY * entries;
            for (name, kind) in names {
                if sh.stop.load(Relaxed) {
                    break;
                }
                let is_dir = match kind {
                    FileType::Unknown => {
                        lstat_at(dir.as_fd(), &name).is_ok_and(|m| m.kind == FileType::Directory)
                    }
                    k => {
                        if cold {
                            let _ = lstat_at(dir.as_fd(), &name);
                        }
                        k == FileType::Directory
                    }
                };
                if is_dir {
                    let mut child = rel.clone();
                    push_rel(&mut child, &name);
                    found.push(child);
                }
            }
        }
        let Ok(mut q) = sh.queue.lock() else {
            return;
        };
        q.busy -= 1;
        // Popped in listing order, the order the walk takes, so that it stays ahead.
        q.dirs.extend(found.into_iter().rev());
        sh.wake.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// Warming the destination's metadata ahead of an incremental comparison.

/// Ahead of an incremental comparison: a scout thread walks the source (tmpfs: cheap) with the
/// same cutoff as the walk and queues the destination lookups the walk will make (the
/// directories of changed entries, the entries themselves, the listings of changed
/// directories); worker threads make them, many at once. With a cold cache the walk would wait
/// on these reads one after another; this way it mostly finds them cached. They only read,
/// decide nothing, and stop as soon as the walk is done.
struct Scout {
    shared: std::sync::Arc<ScoutShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct ScoutShared {
    /// Only opened through (`Engine::open_rel`), never read: it may share the walk's offset.
    dst: OwnedFd,
    queue: std::sync::Mutex<ScoutQueue>,
    wake: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

type ScoutJob = (Vec<u8>, Vec<CString>, Option<HashSet<CString>>);

#[derive(Default)]
struct ScoutQueue {
    /// In the order the walk needs them: destination directories (relative to the root), the
    /// names in each to lstat, and for one to be listed the source's names (the others in the
    /// listing are to be deleted: lstat them too).
    jobs: std::collections::VecDeque<ScoutJob>,
    /// The scout has finished walking the source.
    walked: bool,
}

/// Lookups in flight: they wait on the disk, not on the CPU. 4, 8 and 16 measured alike
/// (20k files all within the cutoff, cold: 0.40 s without, 0.24-0.27 s with).
const SCOUT_WORKERS: usize = 8;

impl Scout {
    fn start(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, cutoff: Timestamp) -> Option<Scout> {
        // Its own open file description: a duplicate would share the walk's directory offset.
        let src = rfs::openat(src, c".", DIR_FLAGS, Mode::empty()).ok()?;
        let shared = std::sync::Arc::new(ScoutShared {
            dst: dst.try_clone_to_owned().ok()?,
            queue: std::sync::Mutex::new(ScoutQueue::default()),
            wake: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let mut threads = Vec::with_capacity(SCOUT_WORKERS + 1);
        let sh = shared.clone();
        let scout = std::thread::Builder::new()
            .name("asd-copy-scout".into())
            .spawn(move || {
                let changed = fstat(src.as_fd()).is_ok_and(|m| m.ctime >= cutoff);
                scout_dir(
                    &sh,
                    src.as_fd(),
                    &mut Vec::new(),
                    changed,
                    cutoff,
                    &mut Vec::new(),
                );
                if let Ok(mut q) = sh.queue.lock() {
                    q.walked = true;
                }
                sh.wake.notify_all();
            })
            .ok()?;
        threads.push(scout);
        for _ in 0..SCOUT_WORKERS {
            let sh = shared.clone();
            if let Ok(t) = std::thread::Builder::new()
                .name("asd-copy-prefetch".into())
                .spawn(move || scout_worker(&sh))
            {
                threads.push(t);
            }
        }
        Some(Scout { shared, threads })
    }

    fn stop(self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl ScoutShared {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, job: ScoutJob) {
        if let Ok(mut q) = self.queue.lock() {
            q.jobs.push_back(job);
        }
        self.wake.notify_one();
    }
}

/// Queues the destination lookups for source directory `dir` (`changed` since the cutoff: the
/// walk lists its destination) and its changed entries, then does the same below.
fn scout_dir(
    sh: &ScoutShared,
    dir: BorrowedFd<'_>,
    rel: &mut Vec<u8>,
    changed: bool,
    cutoff: Timestamp,
    buf: &mut Vec<u8>,
) {
    let Ok(names) = list_dir(dir, buf) else {
        return;
    };
    let mut lookups = Vec::new();
    let mut subdirs = Vec::new();
    let listed = changed.then(|| names.iter().cloned().collect::<HashSet<CString>>());
    for name in names {
        if sh.stopped() {
            return;
        }
        let Ok(m) = lstat_at(dir, &name) else {
            continue;
        };
        let new = m.ctime >= cutoff;
        if m.kind == FileType::Directory {
            subdirs.push((name.clone(), new));
        }
        if new {
            lookups.push(name);
        }
    }
    if listed.is_some() || !lookups.is_empty() {
        sh.push((rel.clone(), lookups, listed));
    }
    // Subdirectories after the entries, as the walk takes them.
    for (name, new) in subdirs {
        if sh.stopped() {
            return;
        }
        let len = push_rel(rel, &name);
        if let Ok(sub) = rfs::openat(dir, &name, DIR_FLAGS, Mode::empty()) {
            scout_dir(sh, sub.as_fd(), rel, new, cutoff, buf);
        }
        rel.truncate(len);
    }
}

fn scout_worker(sh: &ScoutShared) {
    let mut buf = Vec::new();
    loop {
        let (rel, mut names, listed) = {
            let Ok(mut q) = sh.queue.lock() else {
                return;
            };
            loop {
                if sh.stopped() {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.walked {
                    return;
                }
                q = match sh.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        // Errors do not matter here: the walk meets them again and reports them.
        let Ok(dir) = Engine::open_rel(sh.dst.as_fd(), &rel) else {
            continue;
        };
        if let Some(src) = listed {
            let extra = list_dir(dir.as_fd(), &mut buf).unwrap_or_default();
            names.extend(extra.into_iter().filter(|n| !src.contains(n)));
        }
        for name in names {
            if sh.stopped() {
                return;
            }
            let _ = lstat_at(dir.as_fd(), &name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sync engine.

/// A pair of directories being synced. Shared (`&DirCtx`) down the walk, so that a directory
/// can open its destination counterpart through its parents on first use.
struct DirCtx<'f> {
    src: BorrowedFd<'f>,
    /// The destination directory, opened up front or (below an unchanged directory, see
    /// `CopyOptions::changed_since`) only when something in it is to be compared or written.
    dst: &'f OnceCell<OwnedFd>,
    /// For opening `dst` on first use: the parent and the name in it (None for the root).
    parent: Option<(&'f DirCtx<'f>, &'f CStr)>,
    /// The destination directory was created (empty) by this run: nothing to list or compare,
    /// entries are created directly under their final names and nothing is deferred (in durable
    /// mode the directory itself is still under a temporary name, renamed as a whole later).
    fresh: bool,
    /// The source directory changed since the cutoff (always true without one): its listing is
    /// compared with the destination's, extra entries deleted, its metadata checked. Otherwise
    /// it holds the same names as the destination and only changed entries are looked at.
    changed: bool,
    /// Index in `Engine::dirs` once an operation in this directory has been deferred.
    idx: Cell<Option<usize>>,
    /// We added owner write permission to the destination directory.
    made_writable: Cell<bool>,
    /// Something was created in or removed from the destination directory, which bumps its
    /// mtime: its metadata must be set again even if it did not change in the source.
    touched: Cell<bool>,
}

impl<'f> DirCtx<'f> {
    fn new(
        src: BorrowedFd<'f>,
        dst: &'f OnceCell<OwnedFd>,
        parent: Option<(&'f DirCtx<'f>, &'f CStr)>,
        fresh: bool,
        changed: bool,
    ) -> DirCtx<'f> {
        DirCtx {
            src,
            dst,
            parent,
            fresh,
            changed,
            idx: Cell::new(None),
            made_writable: Cell::new(false),
            touched: Cell::new(false),
        }
    }

    /// Whether the destination directory's metadata must be compared and set after the walk.
    fn needs_meta(&self) -> bool {
        self.changed || self.fresh || self.touched.get() || self.made_writable.get()
    }
}

struct RenameJob {
    dir: usize,
    from: CString,
    to: CString,
    /// A directory and a non-directory trade places.
    exchange: bool,
}

/// A destination directory with deferred operations.
struct DeferredDir {
    rel: Vec<u8>,
    fd: Option<OwnedFd>,
}

struct DirJob {
    dir: usize,
    meta: Meta,
    xattrs: Xattrs,
}

struct Engine<'a> {
    opts: &'a CopyOptions,
    src_root: &'a Path,
    dst_root: &'a Path,
    /// Path of the current directory relative to the source / destination root (they differ
    /// below a directory being built under a temporary name).
    src_rel: Vec<u8>,
    dst_rel: Vec<u8>,
    stats: CopyStats,
    first_error: Option<CopyError>,
    errors: u64,
    ids: Ids,
    pid: u32,
    seq: u64,
    dst_root_id: (u64, u64),
    /// Deferred work (durable mode): directories by relative path, then what to do in them.
    dirs: Vec<DeferredDir>,
    renames: Vec<RenameJob>,
    deletions: Vec<(usize, CString)>,
    dir_jobs: Vec<DirJob>,
    /// One descriptor per destination filesystem, for syncfs.
    sync_fds: Vec<(u64, OwnedFd)>,
    chown_denied: u64,
    user_xattrs_unsupported: bool,
    /// The destination does not take POSIX ACLs: ignore them in comparisons.
    acls_unsupported: bool,
    xr: XReader,
    /// Whether to probe big directories on two threads, and the helper thread doing it.
    parallel: bool,
    helper: Option<Helper>,
    /// Source/destination device pairs where copy_file_range does not work.
    no_cfr: HashSet<(u64, u64)>,
    dirbuf: Vec<u8>,
    databuf: Vec<u8>,
    hook: Option<&'a mut dyn FnMut(&Path)>,
    /// `CopyOptions::changed_since` minus the margin, unless ignored: source entries with an
    /// older ctime are unchanged.
    cutoff: Option<Timestamp>,
    /// [`CTIME_MARGIN_MS`]; tests set 0 so as not to wait for it.
    margin: i64,
}

impl<'a> Engine<'a> {
    fn new(
        src: &'a Path,
        dst: &'a Path,
        opts: &'a CopyOptions,
        hook: Option<&'a mut dyn FnMut(&Path)>,
    ) -> Engine<'a> {
        Engine {
            opts,
            src_root: src,
            dst_root: dst,
            src_rel: Vec::new(),
            dst_rel: Vec::new(),
            stats: CopyStats::default(),
            first_error: None,
            errors: 0,
            ids: Ids::current(),
            pid: std::process::id(),
            seq: 0,
            dst_root_id: (0, 0),
            dirs: Vec::new(),
            renames: Vec::new(),
            deletions: Vec::new(),
            dir_jobs: Vec::new(),
            sync_fds: Vec::new(),
            chown_denied: 0,
            user_xattrs_unsupported: false,
            acls_unsupported: false,
            xr: XReader::new(),
            parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            helper: None,
            no_cfr: HashSet::new(),
            dirbuf: Vec::new(),
            databuf: Vec::new(),
            hook,
            cutoff: None,
            margin: CTIME_MARGIN_MS,
        }
    }

    fn run(mut self) -> Result<CopyStats, CopyError> {
        let src = open_root(self.src_root)?;
        let dst = open_root(self.dst_root)?;
        let sm = fstat(src.as_fd()).map_err(|e| cerr("stat", self.src_root.to_path_buf(), e))?;
        let dm = fstat(dst.as_fd()).map_err(|e| cerr("stat", self.dst_root.to_path_buf(), e))?;
        if (sm.dev, sm.ino) == (dm.dev, dm.ino) {
            return Err(cerr(
                "sync",
                self.dst_root.to_path_buf(),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "source and destination are the same directory",
                ),
            ));
        }
        self.dst_root_id = (dm.dev, dm.ino);
        // With `delete`, a source inside the destination would be deleted as an extra entry.
        if is_below(src.as_fd(), self.dst_root_id) {
            return Err(cerr(
                "sync",
                self.src_root.to_path_buf(),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the source is inside the destination",
                ),
            ));
        }
        if self.opts.durable {
            self.note_device(dm.dev, dst.as_fd());
        }
        self.cutoff = self.opts.changed_since.and_then(|since| {
            let since = since.normalized();
            let now = Timestamp::now();
            if now < since {
                debug!(
                    ?since,
                    ?now,
                    "the clock is earlier than the last sync: comparing everything"
                );
                return None;
            }
            let ns = i128::from(since.sec) * 1_000_000_000 + i128::from(since.nsec)
                - i128::from(self.margin) * 1_000_000;
            Some(Timestamp {
                sec: ns.div_euclid(1_000_000_000) as i64,
                nsec: ns.rem_euclid(1_000_000_000) as i64,
            })
        });
        // Only for a full comparison: an incremental one looks at few destination entries.
        let prefetch = if self.cutoff.is_none() && self.parallel {
            Prefetch::start(dst.as_fd(), PREFETCH_THREADS)
        } else {
            None
        };
        // An incremental one looks up few destination entries, but each one cold.
        let scout = match self.cutoff {
            Some(c) if self.hook.is_none() => Scout::start(src.as_fd(), dst.as_fd(), c),
            _ => None,
        };
        let dst = OnceCell::from(dst);
        let root = DirCtx::new(src.as_fd(), &dst, None, false, self.changed(&sm));
        self.sync_dir(&root);
        if let Some(p) = prefetch {
            p.stop();
        }
        if let Some(s) = scout {
            s.stop();
        }
        if root.needs_meta() {
            self.finish_dir(&root, &sm);
        }
        if let Some(h) = self.helper.take() {
            h.finish();
        }
        if let (true, Some(dst)) = (self.opts.durable, dst.get()) {
            self.durable_phases(dst.as_fd())?;
        }
        if self.chown_denied > 0 {
            debug!(
                count = self.chown_denied,
                "changing the owner was not permitted for some entries"
            );
        }
        match self.first_error.take() {
            Some(e) => {
                if self.errors > 1 {
                    warn!(errors = self.errors, "copy finished with errors");
                }
                Err(e)
            }
            None => Ok(self.stats),
        }
    }

    /// Whether a source entry changed since the cutoff (always, without one).
    fn changed(&self, sm: &Meta) -> bool {
        match self.cutoff {
            Some(c) => sm.ctime >= c,
            None => true,
        }
    }

    /// The destination directory of `d`, opened (through its parents, never following a
    /// symlink) if this is its first use.
    fn dst_dir<'f>(&mut self, d: &DirCtx<'f>) -> Result<BorrowedFd<'f>, CopyError> {
        if let Some(fd) = d.dst.get() {
            return Ok(fd.as_fd());
        }
        let Some((parent, name)) = d.parent else {
            // The root is opened before the walk; this cannot happen.
            return Err(cerr("open", self.dst_path(None), Errno::BADF));
        };
        let pfd = self.dst_dir(parent)?;
        let fd = match rfs::openat(pfd, name, DIR_FLAGS, Mode::empty()) {
            Err(Errno::ACCESS) => {
                // Our own directory without read/search permission: open it up; its mode is
                // restored with its metadata.
                d.made_writable.set(true);
                lstat_at(pfd, name)
                    .and_then(|m| rfs::chmodat(pfd, name, mode(m.perm | 0o700), AtFlags::empty()))
                    .and_then(|()| rfs::openat(pfd, name, DIR_FLAGS, Mode::empty()))
            }
            other => other,
        };
        // The error names the directory being synced, possibly below the one that failed.
        let fd = fd.map_err(|e| cerr("open", self.dst_path(None), e))?;
        if self.opts.durable {
            match fstat(fd.as_fd()) {
                Ok(m) => self.note_device(m.dev, fd.as_fd()),
                Err(e) => return Err(cerr("stat", self.dst_path(None), e)),
            }
        }
        Ok(d.dst.get_or_init(|| fd).as_fd())
    }

    fn fail(&mut self, e: CopyError) {
        warn!("{e}");
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn src_path(&self, name: Option<&CStr>) -> PathBuf {
        join_rel(self.src_root, &self.src_rel, name)
    }

    fn dst_path(&self, name: Option<&CStr>) -> PathBuf {
        join_rel(self.dst_root, &self.dst_rel, name)
    }

    fn temp_name(&mut self) -> CString {
        self.seq += 1;
        let s = format!("{TEMP_PREFIX}{}.{}", self.pid, self.seq);
        // The name is built from digits and a NUL-free constant.
        CString::new(s).unwrap_or_else(|_| c".#asd-tmp.x".to_owned())
    }

    fn note_device(&mut self, dev: u64, fd: BorrowedFd<'_>) {
        if self.sync_fds.iter().any(|(d, _)| *d == dev) {
            return;
        }
        match fd.try_clone_to_owned() {
            Ok(owned) => self.sync_fds.push((dev, owned)),
            Err(e) => self.fail(cerr("dup", self.dst_path(None), e)),
        }
    }

    fn dir_idx(&mut self, d: &DirCtx<'_>) -> usize {
        d.touched.set(true);
        match d.idx.get() {
            Some(i) => i,
            None => {
                // Keep the descriptor for phases 3-5 while there are not too many of them.
                let fd = if self.dirs.len() < MAX_KEPT_DIRS {
                    d.dst.get().and_then(|fd| fd.try_clone().ok())
                } else {
                    None
                };
                self.dirs.push(DeferredDir {
                    rel: self.dst_rel.clone(),
                    fd,
                });
                let i = self.dirs.len() - 1;
                d.idx.set(Some(i));
                i
            }
        }
    }

    /// Whether an xattr can be copied to the destination at all (as far as we have seen).
    fn settable(&self, name: &CStr) -> bool {
        if is_user_xattr(name) {
            !self.user_xattrs_unsupported
        } else {
            !self.acls_unsupported
        }
    }

    fn xattrs_equal(&self, a: &Xattrs, b: &Xattrs) -> bool {
        if !self.user_xattrs_unsupported && !self.acls_unsupported {
            return a == b;
        }
        // What cannot be stored does not count as a difference (else every run would retry,
        // and rewrite every shared inode).
        let f = |x: &&(CString, Vec<u8>)| self.settable(&x.0);
        a.iter().filter(f).eq(b.iter().filter(f))
    }

    /// Makes the wanted xattrs of `target` equal to `want`. Returns whether anything changed.
    fn apply_xattrs(
        &mut self,
        target: XRef<'_>,
        want: &Xattrs,
        have: &Xattrs,
    ) -> rustix::io::Result<bool> {
        let mut changed = false;
        for (name, value) in want {
            if have.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            if !self.settable(name) {
                continue;
            }
            match x_set(target, name, value) {
                Ok(()) => changed = true,
                Err(Errno::NOTSUP) if is_user_xattr(name) => {
                    // tmpfs before Linux 6.6 has no user xattrs: the data matters more.
                    warn!(
                        "the destination filesystem does not support user extended attributes; \
                         they are not copied"
                    );
                    self.user_xattrs_unsupported = true;
                }
                Err(Errno::NOTSUP) if !is_user_xattr(name) => {
                    debug!("the destination filesystem does not support POSIX ACLs");
                    self.acls_unsupported = true;
                }
                Err(Errno::PERM) | Err(Errno::INVAL) if !is_user_xattr(name) => {
                    debug!(?name, "could not set extended attribute");
                }
                Err(e) => return Err(e),
            }
        }
        for (name, _) in have {
            if want.iter().any(|(n, _)| n == name) {
                continue;
            }
            match x_remove(target, name) {
                Ok(()) => changed = true,
                Err(Errno::NODATA) => {}
                Err(Errno::NOTSUP) | Err(Errno::PERM) if !is_user_xattr(name) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(changed)
    }

    fn chown_result(&mut self, r: rustix::io::Result<()>) -> rustix::io::Result<()> {
        match r {
            Err(Errno::PERM) => {
                self.chown_denied += 1;
                Ok(())
            }
            other => other,
        }
    }

    /// Creates an entry in `dst` (the destination directory of `d`) with `make`, under `name`
    /// or (None) a fresh temporary name. Retries on a clashing temporary name, and once after
    /// making the directory writable.
    fn create_entry<T>(
        &mut self,
        d: &DirCtx<'_>,
        dst: BorrowedFd<'_>,
        name: Option<&CStr>,
        mut make: impl FnMut(BorrowedFd<'_>, &CStr) -> rustix::io::Result<T>,
    ) -> rustix::io::Result<(CString, T)> {
        // Even a failed attempt may have changed the directory's mtime.
        d.touched.set(true);
        let mut clashes = 0;
        loop {
            let n = match name {
                Some(n) => n.to_owned(),
                None => self.temp_name(),
            };
            match make(dst, &n) {
                Ok(t) => return Ok((n, t)),
                Err(Errno::EXIST) if name.is_none() && clashes < 1000 => clashes += 1,
                Err(Errno::ACCESS) if !d.made_writable.get() => {
                    let m = fstat(dst)?;
                    rfs::fchmod(dst, mode(m.perm | 0o700))?;
                    d.made_writable.set(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Puts the temporary entry `tmp` in place as `name`: deferred to phase 3 in durable mode
    /// (unless the directory is fresh), now otherwise.
    fn commit(&mut self, d: &DirCtx<'_>, tmp: CString, name: &CStr, exchange: bool) {
        if self.opts.durable && !d.fresh {
            let dir = self.dir_idx(d);
            self.renames.push(RenameJob {
                dir,
                from: tmp,
                to: name.to_owned(),
                exchange,
            });
            return;
        }
        let dst = match self.dst_dir(d) {
            Ok(fd) => fd,
            Err(e) => return self.fail(e),
        };
        match self.rename_into_place(dst, &tmp, name, exchange) {
            Ok(Some(old)) => {
                if let Err(e) = remove_entry(dst, &old, &mut self.dirbuf) {
                    self.fail(cerr("remove", self.dst_path(Some(&old)), e));
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.fail(cerr("rename", self.dst_path(Some(name)), e));
                let _ = remove_tree(dst, &tmp, &mut self.dirbuf);
            }
        }
    }

    /// Renames `tmp` over `name`. With `exchange` (a directory and a non-directory trade
    /// places) the old entry ends up under a temporary name, returned for deletion.
    fn rename_into_place(
        &mut self,
        dir: BorrowedFd<'_>,
        tmp: &CStr,
        name: &CStr,
        exchange: bool,
    ) -> rustix::io::Result<Option<CString>> {
        let res = self.rename_once(dir, tmp, name, exchange);
        match res {
            Err(Errno::ACCESS) => {
                // A destination directory without write permission (we own it; its mode is
                // restored with the directory's metadata afterwards).
                let m = fstat(dir)?;
                rfs::fchmod(dir, mode(m.perm | 0o700))?;
                self.rename_once(dir, tmp, name, exchange)
            }
            other => other,
        }
    }

    fn rename_once(
        &mut self,
        dir: BorrowedFd<'_>,
        tmp: &CStr,
        name: &CStr,
        exchange: bool,
    ) -> rustix::io::Result<Option<CString>> {
        if !exchange {
            rfs::renameat(dir, tmp, dir, name)?;
            return Ok(None);
        }
        match rfs::renameat_with(dir, tmp, dir, name, RenameFlags::EXCHANGE) {
            Ok(()) => Ok(Some(tmp.to_owned())),
            // The old entry is gone already: a plain rename does it.
            Err(Errno::NOENT) => rfs::renameat(dir, tmp, dir, name).map(|()| None),
            Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {
                // No RENAME_EXCHANGE on this filesystem: move the old entry aside first. The
                // name is missing for the moment between the two renames.
                let old = self.temp_name();
                rfs::renameat(dir, name, dir, &old)?;
                if let Err(e) = rfs::renameat(dir, tmp, dir, name) {
                    let _ = rfs::renameat(dir, &old, dir, name);
                    return Err(e);
                }
                Ok(Some(old))
            }
            Err(e) => Err(e),
        }
    }

    // -- the walk ---------------------------------------------------------------------------

    fn sync_dir(&mut self, d: &DirCtx<'_>) {
        let names = match list_dir(d.src, &mut self.dirbuf) {
            Ok(n) => n,
            Err(e) => {
                let e = cerr("readdir", self.src_path(None), e);
                self.fail(e);
                return;
            }
        };
        // The destination's names, where they can differ from the source's: in a changed
        // directory. In an unchanged one they are the same, so the listing is not read.
        let mut listing: Option<HashMap<CString, FileType>> = if d.fresh {
            Some(HashMap::new())
        } else if d.changed {
            let listed = self.dst_dir(d).and_then(|dst| {
                list_dir_typed(dst, &mut self.dirbuf)
                    .map_err(|e| cerr("readdir", self.dst_path(None), e))
            });
            match listed {
                Ok(n) => Some(n),
                Err(e) => return self.fail(e),
            }
        } else {
            None
        };
        // Whatever happens to a source name below, its destination counterpart is not "extra".
        let entries: Vec<(CString, InDst)> = names
            .into_iter()
            .map(|n| {
                let in_dst = match listing.as_mut() {
                    Some(l) => l.remove(n.as_c_str()).map_or(InDst::No, InDst::Listed),
                    None => InDst::Assumed,
                };
                (n, in_dst)
            })
            .collect();
        let mut probes = self.probe_all(d, entries);
        // Changed entries of a directory whose destination is not open yet: open it now (they
        // are few, and the directory itself is probably still cached from the first pass).
        let pending: Vec<(CString, InDst)> = probes
            .iter()
            .filter(|p| matches!(p.dst, DstProbe::Pending))
            .map(|p| (p.name.clone(), InDst::Assumed))
            .collect();
        if !pending.is_empty() {
            probes.retain(|p| !matches!(p.dst, DstProbe::Pending));
            match self.dst_dir(d) {
                Ok(_) => probes.extend(self.probe_all(d, pending)),
                // Their subdirectories can still be walked.
                Err(e) => self.fail(e),
            }
        }
        let mut subdirs = Vec::new();
        for p in probes {
            let name = p.name;
            let sm = match p.src {
                Ok(m) => m,
                Err(Errno::NOENT) => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(e) => {
                    self.fail(cerr("lstat", self.src_path(Some(&name)), e));
                    continue;
                }
            };
            let dm = match p.dst {
                DstProbe::Unchanged if sm.kind == FileType::Directory => {
                    subdirs.push((name, sm, None, true));
                    continue;
                }
                DstProbe::Unchanged => {
                    self.stats.unchanged += 1;
                    continue;
                }
                // Not reached: pending names were probed again above.
                DstProbe::Pending => continue,
                DstProbe::Absent | DstProbe::Stat(Err(Errno::NOENT)) => None,
                DstProbe::Stat(Ok(m)) => Some(m),
                DstProbe::Stat(Err(e)) => {
                    self.fail(cerr("lstat", self.dst_path(Some(&name)), e));
                    continue;
                }
            };
            match sm.kind {
                FileType::Directory => subdirs.push((name, sm, dm, false)),
                FileType::RegularFile => self.sync_file(d, &name, &sm, dm.as_ref(), p.xattrs),
                FileType::Symlink => self.sync_symlink(d, &name, &sm, dm.as_ref()),
                FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                    self.sync_special(d, &name, &sm, dm.as_ref())
                }
                _ => debug!(path = ?self.src_path(Some(&name)), "skipping socket"),
            }
        }
        for (name, sm, dm, unchanged) in subdirs {
            self.sync_subdir(d, &name, &sm, dm.as_ref(), unchanged);
        }
        let extra = listing.unwrap_or_default();
        if self.opts.delete && !extra.is_empty() {
            // Sorted, so that runs are reproducible.
            let mut extra: Vec<CString> = extra.into_keys().collect();
            extra.sort();
            for name in extra {
                if self.opts.durable && !d.fresh {
                    let dir = self.dir_idx(d);
                    self.deletions.push((dir, name));
                    continue;
                }
                d.touched.set(true);
                let removed = self.dst_dir(d).and_then(|dst| {
                    remove_entry(dst, &name, &mut self.dirbuf)
                        .map_err(|e| cerr("remove", self.dst_path(Some(&name)), e))
                });
                match removed {
                    Ok(n) => self.stats.deleted += n,
                    Err(e) => self.fail(e),
                }
            }
        }
    }

    /// lstat (and for files that pass the quick check, xattrs) of every entry; big directories
    /// are split with the helper thread, since this is where an unchanged tree spends its time.
    fn probe_all(&mut self, d: &DirCtx<'_>, mut entries: Vec<(CString, InDst)>) -> Vec<Probe> {
        const PARALLEL_MIN: usize = 64;
        if !self.parallel || self.hook.is_some() || d.fresh || entries.len() < PARALLEL_MIN {
            return self.probe_local(d, entries);
        }
        if self.helper.is_none() {
            self.helper = Helper::spawn();
        }
        let dst = match d.dst.get().map(|fd| fd.try_clone()) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(_)) => return self.probe_local(d, entries),
            None => None,
        };
        let (Some(h), Ok(src)) = (self.helper.as_ref(), d.src.try_clone_to_owned()) else {
            return self.probe_local(d, entries);
        };
        let tail = entries.split_off(entries.len() / 2);
        let spare = tail.clone();
        let job = ProbeJob {
            src,
            dst,
            names: tail,
            cutoff: self.cutoff,
        };
        if h.tx.send(job).is_err() {
            self.parallel = false;
            entries.extend(spare);
            return self.probe_local(d, entries);
        }
        let mut out = self.probe_local(d, entries);
        match self.helper.as_ref().map(|h| h.rx.recv()) {
            Some(Ok(rest)) => out.extend(rest),
            _ => {
                // The helper died (a bug); carry on alone.
                self.parallel = false;
                self.helper = None;
                out.extend(self.probe_local(d, spare));
            }
        }
        out
    }

    fn probe_local(&mut self, d: &DirCtx<'_>, entries: Vec<(CString, InDst)>) -> Vec<Probe> {
        let mut out = Vec::with_capacity(entries.len());
        let dst = d.dst.get().map(|fd| fd.as_fd());
        for (name, in_dst) in entries {
            if self.hook.is_some() {
                let p = self.src_path(Some(&name));
                if let Some(h) = self.hook.as_mut() {
                    h(&p);
                }
            }
            out.push(probe(&mut self.xr, d.src, dst, name, in_dst, self.cutoff));
        }
        out
    }

    fn sync_file(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
        xattrs: Option<XattrPair>,
    ) {
        if let (Some(dm), Some(x)) = (dm.filter(|dm| quick_equal(sm, dm)), xattrs) {
            let (sx, dx) = match x {
                Ok(pair) => pair,
                Err((on_src, e)) => {
                    let p = if on_src {
                        self.src_path(Some(name))
                    } else {
                        self.dst_path(Some(name))
                    };
                    self.fail(cerr("listxattr", p, e));
                    return;
                }
            };
            match self.fix_file_meta(d, name, sm, dm, &sx, &dx) {
                Ok(true) => return,
                // Shared inode whose metadata differs: rewrite below.
                Ok(false) => {}
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
        if let Err(e) = self.copy_file(d, name, dm) {
            self.fail(e);
        }
    }

    /// Same data per the quick check: compares metadata and fixes it in place. Returns false
    /// when it differs on an inode with other links (the file must be rewritten instead).
    fn fix_file_meta(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: &Meta,
        sx: &Xattrs,
        dx: &Xattrs,
    ) -> Result<bool, CopyError> {
        let (uid, gid) = self.ids.change(sm, dm);
        let xattrs_same = self.xattrs_equal(sx, dx);
        if uid.is_none() && gid.is_none() && sm.perm == dm.perm && xattrs_same {
            self.stats.unchanged += 1;
            return Ok(true);
        }
        // A read-only file cannot get new user xattrs, even from its owner: rewrite it (a new
        // file gets its xattrs before its mode).
        if dm.nlink > 1 || (!xattrs_same && dm.perm & 0o200 == 0 && !self.ids.privileged) {
            return Ok(false);
        }
        let path = |s: &Self| s.dst_path(Some(name));
        let dst = self.dst_dir(d)?;
        let fd = match rfs::openat(dst, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            // The file vanished or changed type; a rewrite settles it.
            // Vanished, changed type, or unreadable to us: a rewrite settles it.
            Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::ACCESS) => return Ok(false),
            Err(e) => return Err(cerr("open", path(self), e)),
        };
        // Xattrs before the mode: writing user xattrs needs write permission.
        if !xattrs_same {
            self.apply_xattrs(XRef::Fd(fd.as_fd()), sx, dx)
                .map_err(|e| cerr("setxattr", path(self), e))?;
        }
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(&fd, uid, gid);
            self.chown_result(r)
                .map_err(|e| cerr("chown", path(self), e))?;
        }
        // After chown, which may clear set-id bits.
        if sm.perm != dm.perm || uid.is_some() || gid.is_some() {
            rfs::fchmod(&fd, mode(sm.perm)).map_err(|e| cerr("chmod", path(self), e))?;
        }
        self.stats.metadata_updated += 1;
        Ok(true)
    }

    fn copy_file(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        dm: Option<&Meta>,
    ) -> Result<(), CopyError> {
        let src = match rfs::openat(d.src, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            // Gone, or replaced by a symlink since the lstat: the next run handles it.
            Err(Errno::NOENT) | Err(Errno::LOOP) => {
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(cerr("open", self.src_path(Some(name)), e)),
        };
        let sm = fstat(src.as_fd()).map_err(|e| cerr("stat", self.src_path(Some(name)), e))?;
        if sm.kind != FileType::RegularFile {
            self.stats.vanished += 1;
            return Ok(());
        }
        let dst = self.dst_dir(d)?;
        let direct = dm.is_none() && (d.fresh || !self.opts.durable);
        let created = self.create_entry(d, dst, direct.then_some(name), |dir, n| {
            rfs::openat(
                dir,
                n,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode(0o600),
            )
        });
        let (tmp, out) = match created {
            Ok(x) => x,
            Err(e) => return Err(cerr("create", self.dst_path(Some(name)), e)),
        };
        let written = self.write_file(&src, &out, &sm);
        drop(out);
        match written {
            Ok(n) => {
                self.stats.files_copied += 1;
                self.stats.bytes_copied += n;
            }
            Err((op, path_is_src, e)) => {
                let _ = rfs::unlinkat(dst, &tmp, AtFlags::empty());
                let p = if path_is_src {
                    self.src_path(Some(name))
                } else {
                    self.dst_path(Some(name))
                };
                return Err(cerr(op, p, e));
            }
        }
        if !direct {
            let exchange = dm.is_some_and(|m| m.kind == FileType::Directory);
            self.commit(d, tmp, name, exchange);
        }
        Ok(())
    }

    /// Data, owner, mode, xattrs, then times (last: everything before may touch them).
    /// Errors say which operation failed and whether on the source.
    fn write_file(
        &mut self,
        src: &OwnedFd,
        out: &OwnedFd,
        sm: &Meta,
    ) -> Result<u64, (&'static str, bool, Errno)> {
        let om = fstat(out.as_fd()).map_err(|e| ("stat", false, e))?;
        let pair = (sm.dev, om.dev);
        let mut cfr = !self.no_cfr.contains(&pair);
        let n = copy_data(src.as_fd(), out.as_fd(), sm, &mut cfr, &mut self.databuf)
            .map_err(|(op, e)| (op, op == "read" || op == "seek", e))?;
        if !cfr {
            self.no_cfr.insert(pair);
        }
        let sx =
            read_xattrs(XRef::Fd(src.as_fd()), wanted_xattr).map_err(|e| ("listxattr", true, e))?;
        // A new file can inherit a default ACL from its directory.
        let dx = read_xattrs(XRef::Fd(out.as_fd()), wanted_xattr)
            .map_err(|e| ("listxattr", false, e))?;
        if sx != dx {
            self.apply_xattrs(XRef::Fd(out.as_fd()), &sx, &dx)
                .map_err(|e| ("setxattr", false, e))?;
        }
        let (uid, gid) = self.ids.change(sm, &om);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(out, uid, gid);
            self.chown_result(r).map_err(|e| ("chown", false, e))?;
        }
        if sm.perm != om.perm || uid.is_some() || gid.is_some() {
            rfs::fchmod(out, mode(sm.perm)).map_err(|e| ("chmod", false, e))?;
        }
        rfs::futimens(out, &sm.times()).map_err(|e| ("utimens", false, e))?;
        Ok(n)
    }

    fn sync_symlink(&mut self, d: &DirCtx<'_>, name: &CStr, sm: &Meta, dm: Option<&Meta>) {
        if let Err(e) = self.sync_symlink_inner(d, name, sm, dm) {
            self.fail(e);
        }
    }

    fn sync_symlink_inner(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
    ) -> Result<(), CopyError> {
        let target = match rfs::readlinkat(d.src, name, Vec::new()) {
            Ok(t) => t,
            // Gone or no longer a symlink.
            Err(Errno::NOENT) | Err(Errno::INVAL) => {
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(cerr("readlink", self.src_path(Some(name)), e)),
        };
        let dst = self.dst_dir(d)?;
        if let Some(dm) = dm.filter(|m| m.kind == FileType::Symlink) {
            let same = match rfs::readlinkat(dst, name, Vec::new()) {
                Ok(t) => t == target,
                Err(_) => false,
            };
            if same {
                // Symlinks are never shared with the clone (it copies them), so fix in place.
                return self.fix_node_meta(dst, name, sm, dm, true);
            }
        }
        let direct = dm.is_none() && (d.fresh || !self.opts.durable);
        let (tmp, ()) = self
            .create_entry(d, dst, direct.then_some(name), |dir, n| {
                rfs::symlinkat(target.as_c_str(), dir, n)
            })
            .map_err(|e| cerr("symlink", self.dst_path(Some(name)), e))?;
        let finish = self.set_node_meta(dst, &tmp, sm, true);
        if let Err(e) = finish {
            let _ = rfs::unlinkat(dst, &tmp, AtFlags::empty());
            return Err(e);
        }
        self.stats.symlinks_copied += 1;
        if !direct {
            let exchange = dm.is_some_and(|m| m.kind == FileType::Directory);
            self.commit(d, tmp, name, exchange);
        }
        Ok(())
    }

    fn sync_special(&mut self, d: &DirCtx<'_>, name: &CStr, sm: &Meta, dm: Option<&Meta>) {
        if let Err(e) = self.sync_special_inner(d, name, sm, dm) {
            self.fail(e);
        }
    }

    fn sync_special_inner(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
    ) -> Result<(), CopyError> {
        let is_dev = sm.kind != FileType::Fifo;
        let dst = self.dst_dir(d)?;
        if let Some(dm) = dm.filter(|m| m.kind == sm.kind && (!is_dev || m.rdev == sm.rdev)) {
            return self.fix_node_meta(dst, name, sm, dm, false);
        }
        let direct = dm.is_none() && (d.fresh || !self.opts.durable);
        let made = self.create_entry(d, dst, direct.then_some(name), |dir, n| {
            rfs::mknodat(dir, n, sm.kind, mode(sm.perm & 0o777), sm.rdev)
        });
        let tmp = match made {
            Ok((tmp, ())) => tmp,
            Err(Errno::PERM) if is_dev => {
                warn!(path = ?self.src_path(Some(name)), "skipping device node: not permitted");
                return Ok(());
            }
            Err(e) => return Err(cerr("mknod", self.dst_path(Some(name)), e)),
        };
        if let Err(e) = self.set_node_meta(dst, &tmp, sm, false) {
            let _ = rfs::unlinkat(dst, &tmp, AtFlags::empty());
            return Err(e);
        }
        self.stats.files_copied += 1;
        if !direct {
            let exchange = dm.is_some_and(|m| m.kind == FileType::Directory);
            self.commit(d, tmp, name, exchange);
        }
        Ok(())
    }

    /// Owner, mode (not for symlinks) and times of a node that cannot be opened (symlink, fifo,
    /// device), by name.
    fn set_node_meta(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        symlink: bool,
    ) -> Result<(), CopyError> {
        let now = lstat_at(dir, name).map_err(|e| cerr("lstat", self.dst_path(Some(name)), e))?;
        self.fix_node_meta_inner(dir, name, sm, &now, symlink, true)
            .map(|_| ())
    }

    fn fix_node_meta(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        dm: &Meta,
        symlink: bool,
    ) -> Result<(), CopyError> {
        if self.fix_node_meta_inner(dir, name, sm, dm, symlink, false)? {
            self.stats.metadata_updated += 1;
        } else {
            self.stats.unchanged += 1;
        }
        Ok(())
    }

    fn fix_node_meta_inner(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        dm: &Meta,
        symlink: bool,
        set_atime: bool,
    ) -> Result<bool, CopyError> {
        let mut changed = false;
        let (uid, gid) = self.ids.change(sm, dm);
        if uid.is_some() || gid.is_some() {
            let r = rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
            self.chown_result(r)
                .map_err(|e| cerr("chown", self.dst_path(Some(name)), e))?;
            changed = true;
        }
        // Symlink permissions are meaningless on Linux; chmod would follow them.
        if !symlink && (sm.perm != dm.perm || uid.is_some() || gid.is_some()) {
            rfs::chmodat(dir, name, mode(sm.perm), AtFlags::empty())
                .map_err(|e| cerr("chmod", self.dst_path(Some(name)), e))?;
            changed = true;
        }
        if set_atime || sm.mtime != dm.mtime {
            rfs::utimensat(dir, name, &sm.times(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| cerr("utimens", self.dst_path(Some(name)), e))?;
            changed = true;
        }
        Ok(changed)
    }

    /// `dm`: the destination's lstat; `unchanged`: the source directory did not change since
    /// the cutoff, so the destination has it (not looked at).
    fn sync_subdir(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
        unchanged: bool,
    ) {
        if (sm.dev, sm.ino) == self.dst_root_id {
            warn!(path = ?self.src_path(Some(name)), "not copying the destination into itself");
            return;
        }
        let src = match rfs::openat(d.src, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                self.stats.vanished += 1;
                return;
            }
            Err(e) => {
                self.fail(cerr("open", self.src_path(Some(name)), e));
                return;
            }
        };
        let src_len = push_rel(&mut self.src_rel, name);
        match dm {
            _ if unchanged => {
                // Opened on first use, through `d`, if anything below needs it.
                let dst = OnceCell::new();
                self.sync_child_dir(d, name, &src, sm, &dst, false);
            }
            Some(dm) if dm.kind == FileType::Directory => {
                self.sync_existing_dir(d, name, &src, sm, dm)
            }
            other => self.sync_new_dir(d, name, &src, sm, other),
        }
        self.src_rel.truncate(src_len);
    }

    /// Walks the pair (`src`, `dst`: the destination directory `name` in `d`, or not opened
    /// yet), then sets the destination's metadata where needed.
    fn sync_child_dir(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        src: &OwnedFd,
        sm: &Meta,
        dst: &OnceCell<OwnedFd>,
        made_writable: bool,
    ) {
        let dst_len = push_rel(&mut self.dst_rel, name);
        let cd = DirCtx::new(src.as_fd(), dst, Some((d, name)), false, self.changed(sm));
        cd.made_writable.set(made_writable);
        self.sync_dir(&cd);
        if cd.needs_meta() {
            self.finish_dir(&cd, sm);
        }
        self.dst_rel.truncate(dst_len);
    }

    fn sync_existing_dir(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        src: &OwnedFd,
        sm: &Meta,
        dm: &Meta,
    ) {
        let pdst = match self.dst_dir(d) {
            Ok(fd) => fd,
            Err(e) => return self.fail(e),
        };
        let mut made_writable = false;
        let dst = match rfs::openat(pdst, name, DIR_FLAGS, Mode::empty()) {
            Err(Errno::ACCESS) => {
                // Our own directory without read/search permission: open it up; its mode is
                // restored with its metadata.
                made_writable = true;
                rfs::chmodat(pdst, name, mode(dm.perm | 0o700), AtFlags::empty())
                    .and_then(|()| rfs::openat(pdst, name, DIR_FLAGS, Mode::empty()))
            }
            other => other,
        };
        let dst = match dst {
            Ok(fd) => fd,
            Err(e) => {
                self.fail(cerr("open", self.dst_path(Some(name)), e));
                return;
            }
        };
        if self.opts.durable {
            self.note_device(dm.dev, dst.as_fd());
        }
        let dst = OnceCell::from(dst);
        self.sync_child_dir(d, name, src, sm, &dst, made_writable);
    }

    fn sync_new_dir(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        src: &OwnedFd,
        sm: &Meta,
        dm: Option<&Meta>,
    ) {
        let pdst = match self.dst_dir(d) {
            Ok(fd) => fd,
            Err(e) => return self.fail(e),
        };
        // Durable: build the whole directory under a temporary name and rename it into place
        // later, so no half-filled directory ever appears under its final name.
        let direct = dm.is_none() && (d.fresh || !self.opts.durable);
        let made = self.create_entry(d, pdst, direct.then_some(name), |dir, n| {
            rfs::mkdirat(dir, n, mode(0o700))
        });
        let (dname, ()) = match made {
            Ok(x) => x,
            Err(e) => {
                self.fail(cerr("mkdir", self.dst_path(Some(name)), e));
                return;
            }
        };
        let dst = match rfs::openat(pdst, &dname, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                self.fail(cerr("open", self.dst_path(Some(&dname)), e));
                let _ = rfs::unlinkat(pdst, &dname, AtFlags::REMOVEDIR);
                return;
            }
        };
        self.stats.dirs_created += 1;
        let dst_len = push_rel(&mut self.dst_rel, &dname);
        let dst = OnceCell::from(dst);
        let cd = DirCtx::new(src.as_fd(), &dst, Some((d, &dname)), true, true);
        self.sync_dir(&cd);
        self.finish_dir(&cd, sm);
        self.dst_rel.truncate(dst_len);
        drop(dst);
        if !direct {
            let exchange = dm.is_some();
            self.commit(d, dname, name, exchange);
        }
    }

    /// Directory metadata after its children: now, or in phase 5 if renames or deletions in it
    /// are still pending (they would bump its mtime).
    fn finish_dir(&mut self, cd: &DirCtx<'_>, sm: &Meta) {
        let sx = match read_xattrs(XRef::Fd(cd.src), wanted_xattr) {
            Ok(x) => x,
            Err(e) => {
                self.fail(cerr("listxattr", self.src_path(None), e));
                return;
            }
        };
        match cd.idx.get() {
            Some(dir) if self.opts.durable => self.dir_jobs.push(DirJob {
                dir,
                meta: *sm,
                xattrs: sx,
            }),
            _ => {
                let applied = self.dst_dir(cd).and_then(|dst| {
                    self.apply_dir_meta(dst, sm, &sx)
                        .map_err(|e| cerr("set metadata", self.dst_path(None), e))
                });
                match applied {
                    // A directory created by this run is not an update.
                    Ok(true) if !cd.fresh => self.stats.metadata_updated += 1,
                    Ok(_) => {}
                    Err(e) => self.fail(e),
                }
            }
        }
    }

    fn apply_dir_meta(
        &mut self,
        dst: BorrowedFd<'_>,
        sm: &Meta,
        sx: &Xattrs,
    ) -> rustix::io::Result<bool> {
        let dm = fstat(dst)?;
        let mut changed = false;
        let dx = read_xattrs(XRef::Fd(dst), wanted_xattr)?;
        if !self.xattrs_equal(sx, &dx) {
            // Writing user xattrs needs write permission, even for the owner.
            if dm.perm & 0o200 == 0 {
                rfs::fchmod(dst, mode(dm.perm | 0o200))?;
            }
            if self.apply_xattrs(XRef::Fd(dst), sx, &dx)? {
                changed = true;
            }
        }
        let (uid, gid) = self.ids.change(sm, &dm);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(dst, uid, gid);
            self.chown_result(r)?;
            changed = true;
        }
        if sm.perm != dm.perm || uid.is_some() || gid.is_some() || dm.perm & 0o200 == 0 {
            rfs::fchmod(dst, mode(sm.perm))?;
            changed = true;
        }
        if sm.mtime != dm.mtime {
            rfs::futimens(dst, &sm.times())?;
            changed = true;
        }
        Ok(changed)
    }

    // -- durable mode: phases 2 to 5 ------------------------------------------------------------

    fn syncfs_all(&mut self) -> Result<(), CopyError> {
        for (_, fd) in &self.sync_fds {
            rfs::syncfs(fd).map_err(|e| cerr("syncfs", self.dst_root.to_path_buf(), e))?;
        }
        Ok(())
    }

    /// Opens the destination directory `rel` (relative to `root`) one component at a time,
    /// never following a symlink.
    fn open_rel(root: BorrowedFd<'_>, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
        let mut cur = rfs::openat(root, c".", DIR_FLAGS, Mode::empty())?;
        for comp in rel.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            cur = rfs::openat(&cur, comp, DIR_FLAGS, Mode::empty())?;
        }
        Ok(cur)
    }

    /// The descriptor of deferred directory `i`: kept from the walk, or reopened by path.
    fn deferred_dir<'d>(
        &mut self,
        root: BorrowedFd<'_>,
        dirs: &'d mut [DeferredDir],
        i: usize,
    ) -> Option<BorrowedFd<'d>> {
        let dir = dirs.get_mut(i)?;
        if dir.fd.is_none() {
            match Self::open_rel(root, &dir.rel) {
                Ok(fd) => dir.fd = Some(fd),
                Err(e) => {
                    let e = cerr("open", join_rel(self.dst_root, &dir.rel, None), e);
                    self.fail(e);
                    return None;
                }
            }
        }
        dir.fd.as_ref().map(|fd| fd.as_fd())
    }

    fn durable_phases(&mut self, root: BorrowedFd<'_>) -> Result<(), CopyError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        let path = |dirs: &[DeferredDir], i: usize, name: Option<&CStr>| {
            let rel = dirs.get(i).map(|d| d.rel.as_slice()).unwrap_or_default();
            join_rel(self.dst_root, rel, name)
        };
        let renames = std::mem::take(&mut self.renames);
        // Phase 2: all temporary data durable before any rename.
        if !renames.is_empty() {
            if let Err(e) = self.syncfs_all() {
                // Nothing may be renamed now: remove the temporaries instead.
                for job in &renames {
                    if let Some(dir) = self.deferred_dir(root, &mut dirs, job.dir) {
                        let _ = remove_tree(dir, &job.from, &mut self.dirbuf);
                    }
                }
                return Err(e);
            }
        }
        // Phase 3: renames.
        let crash_at = crash_point();
        for (n, job) in renames.iter().enumerate() {
            if crash_at == Some(n) {
                // Fault injection for the crash tests: die like kill -9, mid-rename.
                std::process::abort();
            }
            let Some(dir) = self.deferred_dir(root, &mut dirs, job.dir) else {
                continue;
            };
            match self.rename_into_place(dir, &job.from, &job.to, job.exchange) {
                Ok(Some(old)) => self.deletions.push((job.dir, old)),
                Ok(None) => {}
                Err(e) => {
                    let _ = remove_tree(dir, &job.from, &mut self.dirbuf);
                    let p = path(&dirs, job.dir, Some(&job.to));
                    self.fail(cerr("rename", p, e));
                }
            }
        }
        // Phase 4: deletions, after the renames are durable (a file moved to another directory
        // must exist at its new place before its old place goes).
        let deletions = std::mem::take(&mut self.deletions);
        if !deletions.is_empty() {
            self.syncfs_all()?;
        }
        for (i, name) in &deletions {
            let Some(dir) = self.deferred_dir(root, &mut dirs, *i) else {
                continue;
            };
            match remove_entry(dir, name, &mut self.dirbuf) {
                // Old versions moved aside by an exchange are not counted as deletions.
                Ok(n) if !is_temp_name(name) => self.stats.deleted += n,
                Ok(_) => {}
                Err(e) => {
                    let p = path(&dirs, *i, Some(name));
                    self.fail(cerr("remove", p, e));
                }
            }
        }
        // Phase 5: directory metadata, bottom-up (jobs were queued in post-order).
        let jobs = std::mem::take(&mut self.dir_jobs);
        for job in &jobs {
            let Some(dir) = self.deferred_dir(root, &mut dirs, job.dir) else {
                continue;
            };
            match self.apply_dir_meta(dir, &job.meta, &job.xattrs) {
                Ok(true) => self.stats.metadata_updated += 1,
                Ok(false) => {}
                Err(e) => {
                    let p = path(&dirs, job.dir, None);
                    self.fail(cerr("set metadata", p, e));
                }
            }
        }
        drop(dirs);
        self.syncfs_all()
    }
}

// ---------------------------------------------------------------------------------------------
// Tree utilities.

/// Called by [`walk`] with the parent directory, the entry's path, name and lstat.
type Visitor<'v> = dyn FnMut(BorrowedFd<'_>, &Path, &CStr, &Meta) -> Result<Visit, CopyError> + 'v;

enum Visit {
    Descend,
    Skip,
    Stop,
}

/// Walks the tree below `dir` (whose path is `path`) without following symlinks, calling
/// `visit` with the parent directory, the entry's path, name and lstat. Entries that vanish
/// during the walk are skipped. Returns false when `visit` asked to stop.
fn walk(
    dir: BorrowedFd<'_>,
    path: &mut PathBuf,
    buf: &mut Vec<u8>,
    visit: &mut Visitor<'_>,
) -> Result<bool, CopyError> {
    let names = list_dir(dir, buf).map_err(|e| cerr("readdir", path.clone(), e))?;
    for name in names {
        path.push(OsStr::from_bytes(name.to_bytes()));
        let res = walk_entry(dir, path, &name, buf, visit);
        path.pop();
        if !res? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn walk_entry(
    dir: BorrowedFd<'_>,
    path: &mut PathBuf,
    name: &CStr,
    buf: &mut Vec<u8>,
    visit: &mut Visitor<'_>,
) -> Result<bool, CopyError> {
    let m = match lstat_at(dir, name) {
        Ok(m) => m,
        Err(Errno::NOENT) => return Ok(true),
        Err(e) => return Err(cerr("lstat", path.clone(), e)),
    };
    match visit(dir, path, name, &m)? {
        Visit::Stop => Ok(false),
        Visit::Skip => Ok(true),
        Visit::Descend if m.kind != FileType::Directory => Ok(true),
        Visit::Descend => {
            let sub = match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Ok(true),
                Err(e) => return Err(cerr("open", path.clone(), e)),
            };
            walk(sub.as_fd(), path, buf, visit)
        }
    }
}

/// Removes leftovers of interrupted copies below `root`: every entry whose name starts with
/// [`TEMP_PREFIX`]. Besides regular files these are symlinks, fifos and whole directories that
/// were being built under a temporary name (all of them copies of data the source still has).
/// Returns the number of entries removed (a leftover directory counts once).
pub fn remove_temp_files(root: &Path) -> Result<u64, CopyError> {
    let fd = open_root(root)?;
    let mut count = 0;
    let mut inner_buf = Vec::new();
    let mut visit = |dir: BorrowedFd<'_>, path: &Path, name: &CStr, m: &Meta| {
        if !is_temp_name(name) {
            return Ok(Visit::Descend);
        }
        match remove_tree(dir, name, &mut inner_buf) {
            Ok(n) => {
                debug!(?path, kind = ?m.kind, "removed temporary leftover");
                count += u64::from(n > 0);
                Ok(Visit::Skip)
            }
            Err(e) => Err(cerr("remove", path.to_path_buf(), e)),
        }
    };
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut visit,
    )?;
    Ok(count)
}

/// Regular files below `root` with more than one hard link, at most `limit` of them.
pub fn find_hardlinked_files(
    root: &Path,
    asd_clones: &[PathBuf],
    limit: usize,
) -> Result<Vec<PathBuf>, CopyError> {
    let fd = open_root(root)?;
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    // Links into asd's own start clone (whole, half-built, or half-deleted after a crash) are
    // not the user's hard links: subtract them, so a crash during sync or unsync never turns
    // into a refusal at the next start.
    let mut in_clones: HashMap<(u64, u64), u64> = HashMap::new();
    for clone in asd_clones {
        let cfd = match open_root(clone) {
            Ok(fd) => fd,
            Err(CopyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        };
        let mut count = |_: BorrowedFd<'_>, _: &Path, _: &CStr, m: &Meta| {
            if m.kind == FileType::RegularFile && m.nlink > 1 {
                *in_clones.entry((m.dev, m.ino)).or_default() += 1;
            }
            Ok(Visit::Descend)
        };
        walk(
            cfd.as_fd(),
            &mut clone.to_path_buf(),
            &mut Vec::new(),
            &mut count,
        )?;
    }
    let mut visit = |_: BorrowedFd<'_>, path: &Path, _: &CStr, m: &Meta| {
        let foreign = m
            .nlink
            .saturating_sub(in_clones.get(&(m.dev, m.ino)).copied().unwrap_or(0));
        if m.kind == FileType::RegularFile && foreign > 1 {
            found.push(path.to_path_buf());
            if found.len() >= limit {
                return Ok(Visit::Stop);
            }
        }
        Ok(Visit::Descend)
    };
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut visit,
    )?;
    Ok(found)
}

/// Apparent size of a tree in bytes, like `du -sb`: the sum of `st_size` of every entry,
/// directories and symlinks included, root included, each hard-linked inode counted once.
/// (Not disk usage: sparse files count their full size, small files no block rounding.)
pub fn tree_size(root: &Path) -> Result<u64, CopyError> {
    let fd = open_root(root)?;
    let rm = fstat(fd.as_fd()).map_err(|e| cerr("stat", root.to_path_buf(), e))?;
    let mut total = rm.size;
    let mut seen = HashSet::new();
    let mut visit = |_: BorrowedFd<'_>, _: &Path, _: &CStr, m: &Meta| {
        if m.kind == FileType::Directory || m.nlink <= 1 || seen.insert((m.dev, m.ino)) {
            total += m.size;
        }
        Ok(Visit::Descend)
    };
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut visit,
    )?;
    Ok(total)
}

/// Like `cp -al`: recreates the directories of `src` (with their metadata) at `dst` and
/// hard-links every regular file; symlinks, fifos (and device nodes, where permitted) are
/// copied, sockets skipped. `dst` must not exist (it is created) or be an empty directory, on
/// the same filesystem as `src`. The result is made durable (syncfs) before returning, so the
/// caller can rename it into its final place.
pub fn hardlink_clone(src: &Path, dst: &Path) -> Result<CopyStats, CopyError> {
    let sfd = open_root(src)?;
    let sm = fstat(sfd.as_fd()).map_err(|e| cerr("stat", src.to_path_buf(), e))?;
    let dfd = match rfs::open(dst, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => {
            let mut buf = Vec::new();
            let names =
                list_dir(fd.as_fd(), &mut buf).map_err(|e| cerr("readdir", dst.into(), e))?;
            if !names.is_empty() {
                return Err(cerr(
                    "clone",
                    dst.to_path_buf(),
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "destination exists and is not empty",
                    ),
                ));
            }
            fd
        }
        Err(Errno::NOENT) => {
            rfs::mkdir(dst, mode(0o700)).map_err(|e| cerr("mkdir", dst.to_path_buf(), e))?;
            open_root(dst)?
        }
        Err(e) => return Err(cerr("open", dst.to_path_buf(), e)),
    };
    let dm = fstat(dfd.as_fd()).map_err(|e| cerr("stat", dst.to_path_buf(), e))?;
    let mut c = Cloner {
        skip: (dm.dev, dm.ino),
        ids: Ids::current(),
        stats: CopyStats::default(),
        buf: Vec::new(),
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
    };
    c.clone_dir(sfd.as_fd(), dfd.as_fd())?;
    c.dir_meta(sfd.as_fd(), dfd.as_fd(), &sm)?;
    rfs::syncfs(&dfd).map_err(|e| cerr("syncfs", dst.to_path_buf(), e))?;
    Ok(c.stats)
}

struct Cloner {
    /// The clone itself, should it lie inside the source.
    skip: (u64, u64),
    ids: Ids,
    stats: CopyStats,
    buf: Vec<u8>,
    /// Current source and destination directory paths (for error messages).
    src: PathBuf,
    dst: PathBuf,
}

impl Cloner {
    fn err(&self, op: &'static str, name: &CStr, e: Errno) -> CopyError {
        cerr(op, self.dst.join(OsStr::from_bytes(name.to_bytes())), e)
    }

    fn clone_dir(&mut self, s: BorrowedFd<'_>, d: BorrowedFd<'_>) -> Result<(), CopyError> {
        let names = list_dir(s, &mut self.buf).map_err(|e| cerr("readdir", self.src.clone(), e))?;
        for name in names {
            let m = match lstat_at(s, &name) {
                Ok(m) => m,
                Err(Errno::NOENT) => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(e) => {
                    return Err(cerr(
                        "lstat",
                        self.src.join(OsStr::from_bytes(name.to_bytes())),
                        e,
                    ))
                }
            };
            match m.kind {
                FileType::RegularFile => match rfs::linkat(s, &name, d, &name, AtFlags::empty()) {
                    Ok(()) => self.stats.files_copied += 1,
                    Err(Errno::NOENT) => self.stats.vanished += 1,
                    Err(e) => return Err(self.err("link", &name, e)),
                },
                FileType::Directory if (m.dev, m.ino) == self.skip => {}
                FileType::Directory => {
                    let sub = match rfs::openat(s, &name, DIR_FLAGS, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                            self.stats.vanished += 1;
                            continue;
                        }
                        Err(e) => {
                            return Err(cerr(
                                "open",
                                self.src.join(OsStr::from_bytes(name.to_bytes())),
                                e,
                            ))
                        }
                    };
                    rfs::mkdirat(d, &name, mode(0o700)).map_err(|e| self.err("mkdir", &name, e))?;
                    let dsub = rfs::openat(d, &name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| self.err("open", &name, e))?;
                    self.stats.dirs_created += 1;
                    let os = OsStr::from_bytes(name.to_bytes());
                    self.src.push(os);
                    self.dst.push(os);
                    let res = self
                        .clone_dir(sub.as_fd(), dsub.as_fd())
                        .and_then(|()| self.dir_meta(sub.as_fd(), dsub.as_fd(), &m));
                    self.src.pop();
                    self.dst.pop();
                    res?;
                }
                FileType::Symlink => {
                    let target = match rfs::readlinkat(s, &name, Vec::new()) {
                        Ok(t) => t,
                        Err(Errno::NOENT) | Err(Errno::INVAL) => {
                            self.stats.vanished += 1;
                            continue;
                        }
                        Err(e) => return Err(self.err("readlink", &name, e)),
                    };
                    rfs::symlinkat(target.as_c_str(), d, &name)
                        .map_err(|e| self.err("symlink", &name, e))?;
                    self.node_meta(d, &name, &m)?;
                    self.stats.symlinks_copied += 1;
                }
                FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                    match rfs::mknodat(d, &name, m.kind, mode(m.perm & 0o777), m.rdev) {
                        Ok(()) => {
                            self.node_meta(d, &name, &m)?;
                            self.stats.files_copied += 1;
                        }
                        Err(Errno::PERM) if m.kind != FileType::Fifo => {
                            warn!(path = ?self.src.join(OsStr::from_bytes(name.to_bytes())),
                                  "skipping device node: not permitted");
                        }
                        Err(e) => return Err(self.err("mknod", &name, e)),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn node_meta(&mut self, d: BorrowedFd<'_>, name: &CStr, m: &Meta) -> Result<(), CopyError> {
        let now = lstat_at(d, name).map_err(|e| self.err("lstat", name, e))?;
        let (uid, gid) = self.ids.change(m, &now);
        if uid.is_some() || gid.is_some() {
            match rfs::chownat(d, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::PERM) => {}
                Err(e) => return Err(self.err("chown", name, e)),
            }
        }
        if m.kind != FileType::Symlink && (m.perm != now.perm || uid.is_some() || gid.is_some()) {
            rfs::chmodat(d, name, mode(m.perm), AtFlags::empty())
                .map_err(|e| self.err("chmod", name, e))?;
        }
        rfs::utimensat(d, name, &m.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("utimens", name, e))
    }

    fn dir_meta(
        &mut self,
        s: BorrowedFd<'_>,
        d: BorrowedFd<'_>,
        m: &Meta,
    ) -> Result<(), CopyError> {
        let e = |op, e: Errno, p: &Path| cerr(op, p.to_path_buf(), e);
        let now = fstat(d).map_err(|x| e("stat", x, &self.dst))?;
        let (uid, gid) = self.ids.change(m, &now);
        if uid.is_some() || gid.is_some() {
            match rfs::fchown(d, uid, gid) {
                Ok(()) | Err(Errno::PERM) => {}
                Err(x) => return Err(e("chown", x, &self.dst)),
            }
        }
        let sx =
            read_xattrs(XRef::Fd(s), wanted_xattr).map_err(|x| e("listxattr", x, &self.src))?;
        for (name, value) in &sx {
            match rfs::fsetxattr(d, name, value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOTSUP) | Err(Errno::PERM) if !is_user_xattr(name) => {}
                Err(x) => return Err(e("setxattr", x, &self.dst)),
            }
        }
        rfs::fchmod(d, mode(m.perm)).map_err(|x| e("chmod", x, &self.dst))?;
        rfs::futimens(d, &m.times()).map_err(|x| e("utimens", x, &self.dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Timespec, Timestamps};
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

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
        for opts in [fast(), durable()] {
            let (_t, src, dst, t0) = synced_pair(&opts);
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

            let st = sync_tree_with_margin(&src, &dst, &since(&opts, t0), 0).unwrap();
            assert_same(&src, &dst);
            no_temps(&dst);
            assert!(st.unchanged > 150, "{st:?}");
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
        for opts in [fast(), durable()] {
            let (_t, src, dst, t0) = synced_pair(&opts);
            // Behind the engine's back, under names whose source did not change: in unchanged
            // directories, and in one that changes (the root).
            write(&dst.join("a/private"), b"tampered");
            write(&dst.join("a/extra"), b"not deleted: a did not change");
            write(&dst.join("name with spaces"), b"tampered too");
            fs::rename(dst.join("u1/u2/u3"), dst.join("u1/u2/u3-moved")).unwrap();
            // Source changes: a new name in the root, a changed file in unchanged a/.
            write(&src.join("newfile"), b"new");
            write(&src.join("a/exec"), b"#!/bin/sh\nexit 0\n");

            let st = sync_tree_with_margin(&src, &dst, &since(&opts, t0), 0).unwrap();
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
        match Command::new("du").arg("-sb").arg(t.path()).output() {
            Ok(o) if o.status.success() => {
                let s = String::from_utf8_lossy(&o.stdout);
                let du: u64 = s.split_whitespace().next().unwrap().parse().unwrap();
                assert_eq!(ours, du);
            }
            _ => eprintln!("du not available"),
        }
    }
}

/// Manual measurements and experiments (not run by default):
/// `ASD_COPY_SRC=A ASD_COPY_DST=B [ASD_COPY_DURABLE=1] [ASD_COPY_SINCE=SEC[.NSEC]]
/// [ASD_COPY_SINCE_NOW_MINUS_SECS=N] cargo test -p asd-user --lib copy::manual -- --ignored
/// --nocapture`. `ASD_COPY_SINCE` is an absolute time (`date +%s.%N`) for
/// `CopyOptions::changed_since`; the other sets it relative to now.
#[cfg(test)]
mod manual {
    use super::*;

    fn since() -> Option<Timestamp> {
        if let Some(v) = std::env::var_os("ASD_COPY_SINCE") {
            let v = v.to_string_lossy().into_owned();
            let (sec, frac) = v.split_once('.').unwrap_or((&v, "0"));
            let nsec = format!("{frac:0<9}")[..9].parse().unwrap();
            return Some(Timestamp {
                sec: sec.parse().unwrap(),
                nsec,
            });
        }
        let secs: i64 = std::env::var("ASD_COPY_SINCE_NOW_MINUS_SECS")
            .ok()?
            .parse()
            .unwrap();
        let now = Timestamp::now();
        Some(Timestamp {
            sec: now.sec - secs,
            ..now
        })
    }

    #[test]
    #[ignore]
    fn run_sync_tree() {
        let (Some(src), Some(dst)) = (
            std::env::var_os("ASD_COPY_SRC"),
            std::env::var_os("ASD_COPY_DST"),
        ) else {
            eprintln!("set ASD_COPY_SRC and ASD_COPY_DST");
            return;
        };
        let opts = CopyOptions {
            delete: true,
            durable: std::env::var_os("ASD_COPY_DURABLE").is_some(),
            changed_since: since(),
        };
        let start = std::time::Instant::now();
        let st = sync_tree(Path::new(&src), Path::new(&dst), &opts);
        eprintln!("{opts:?}: {st:?} in {:?}", start.elapsed());
    }
}
