//! Live SQLite databases, written back as one consistent state (issue 12).
//!
//! A database is its main file (starting with `SQLite format 3\0`) and up to three companions
//! beside it: `-wal` (the write-ahead log), `-journal` (the rollback journal) and `-shm` (the
//! WAL's index in shared memory, which SQLite rebuilds from the WAL and a copy never needs).
//! Copied file by file while the program commits, the main file and its log are read at
//! different moments, and the pair can belong to no moment at all: a checkpoint writes pages
//! into the main file after it was read and the WAL restarts before it is read, or a rollback
//! commit writes half of its pages while the main file is read. SQLite then finds a corrupt
//! database, or silently one that lacks commits.
//!
//! [`snapshot`] reads one consistent state and writes it as one self-contained file, without
//! companions, which the caller puts in place like any other file (and removes or whites out the
//! destination's companions before that, since an old log beside a new main file would be
//! replayed into it):
//!
//! 1. It copies the main file and its log (the WAL, or a rollback journal with content) raw,
//!    into temporary files beside the destination, and checks that what it read is what one
//!    moment left on disk (below). With a WAL, a read transaction held through SQLite, where the
//!    program lets one be taken, makes the check pass: a reader's mark keeps checkpoints from
//!    writing pages newer than its snapshot into the main file and the WAL from restarting,
//!    while the program goes on committing (WAL readers never block writers). Programs that
//!    hold an exclusive lock (Firefox and Chromium do) let no one read: then the check alone
//!    decides, and a failed one is tried again after a pause.
//! 2. What it copied is what a power cut at that moment would have left, which SQLite recovers
//!    from: it opens the temporary copy (alone, in exclusive locking mode, so no `-shm` is
//!    made), which replays the WAL or rolls back the journal, checkpoints into the main file
//!    and deletes the log.
//!
//! The checks that make a copy taken without any lock such a crash image:
//! - WAL: the WAL's 32-byte header (salts, checkpoint counter) is the same before the main file
//!   is read and after the WAL was: the WAL did not restart (a restart writes a new header
//!   before any frame of its own), so every frame a checkpoint copied into the main file
//!   meanwhile, maybe torn in our copy, is still in the WAL copy, and SQLite's recovery replays
//!   it over the page; a frame being appended while it is read fails its checksum and ends the
//!   log there. Without a WAL at both ends, the main file must not have changed.
//! - Rollback journal: the main file and the journal did not change (inode, size, mtime, ctime)
//!   from before the first byte was read to after the last: a state of one moment, which the
//!   journal (copied along if it has content) rolls back to the last commit. Before reading,
//!   the coarse clock that stamps inode times is let tick past their ctime, so that any write
//!   during the copy changes it. Under SQLite's SHARED lock, taken from the second attempt on,
//!   the main file cannot change and holds committed data only: the journal is not read then.
//!
//! After [`MAX_ATTEMPTS`] the previous version stays where it is and the write-back reports an
//! error, so it is retried (a torn copy is never written).
//!
//! What a lock costs the program: with a WAL nothing (its WAL grows while the lock is held); with
//! a rollback journal its commits wait until the main file is copied (bench/sqlite.sh measures
//! how long), which a program without a busy timeout would see as SQLITE_BUSY, as it would with
//! any other reader; that is why the lock is only the second attempt there.
//!
//! Care for the program's own files: the source is opened read-only and never with `immutable`
//! or `nolock` (which would read it torn); SQLite opens it only while its WAL exists (a
//! read-only connection to a WAL database without one would create an empty `-wal` and a `-shm`
//! beside it), or for a rollback journal's second attempt (which creates nothing); POSIX locks
//! belong to the process and closing any descriptor of a file drops them all, so the raw
//! descriptors of the source are closed only after the connection.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode};
use rustix::io::Errno;
use tracing::debug;

use crate::fsio::{
    copy_range, fstat, lstat_at, mode, read_xattrs, wanted_xattr, Meta, XRef, Xattrs, FILE_FLAGS,
};

use super::Timestamp;

/// The first 16 bytes of every SQLite database file.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// The database header: the magic, then the page size, and at 18 and 19 the file format's
/// write and read versions (2 for WAL mode).
const HEADER: usize = 100;
const WAL_HEADER: usize = 32;

pub(crate) const WAL: &[u8] = b"-wal";
pub(crate) const JOURNAL: &[u8] = b"-journal";
pub(crate) const SHM: &[u8] = b"-shm";
/// The companions of a database file, by suffix.
pub(crate) const COMPANIONS: [&[u8]; 3] = [WAL, JOURNAL, SHM];

/// Attempts at one consistent copy (the pauses between them add up to about a second).
pub(crate) const MAX_ATTEMPTS: u32 = 8;
/// How long SQLite waits for a lock: a WAL read lock is refused only briefly (recovery) or for
/// good (exclusive locking mode); a rollback journal's SHARED lock waits for one commit.
const WAL_LOCK_WAIT: Duration = Duration::from_millis(50);
const ROLLBACK_LOCK_WAIT: Duration = Duration::from_millis(500);

/// Test hook: `ASD_TEST_PLAIN_DATABASES=1` copies databases file by file as before issue 12, so
/// the tests can show what that does. Only in builds with the `test-hooks` feature.
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) fn enabled() -> bool {
    std::env::var_os("ASD_TEST_PLAIN_DATABASES").is_none_or(|v| v.is_empty() || v == "0")
}

#[cfg(not(any(test, feature = "test-hooks")))]
#[inline(always)]
pub(crate) fn enabled() -> bool {
    true
}

/// `name` + `suffix`.
pub(crate) fn companion(name: &CStr, suffix: &[u8]) -> CString {
    let mut v = name.to_bytes().to_vec();
    v.extend_from_slice(suffix);
    // Both parts come from C strings: no NUL inside.
    CString::new(v).unwrap_or_default()
}

/// The database a companion name belongs to: `x` for `x-wal`, `x-journal` and `x-shm`.
pub(crate) fn base_of(name: &CStr) -> Option<CString> {
    let b = name.to_bytes();
    COMPANIONS.iter().find_map(|s| {
        let base = b.strip_suffix(*s)?;
        (!base.is_empty()).then(|| CString::new(base).unwrap_or_default())
    })
}

/// Whether `name` is a companion of `base`.
pub(crate) fn is_companion_of(name: &CStr, base: &CStr) -> bool {
    name.to_bytes()
        .strip_prefix(base.to_bytes())
        .is_some_and(|rest| COMPANIONS.contains(&rest))
}

/// Opens a regular file of `dir` for reading; None when it is gone or not a regular file.
fn open_regular(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Option<(OwnedFd, Meta)>> {
    let fd = match rfs::openat(dir, name, FILE_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::NXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = fstat(fd.as_fd())?;
    Ok((m.kind == FileType::RegularFile).then_some((fd, m)))
}

fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> rustix::io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The database header of an open file, if it has one.
fn header(fd: BorrowedFd<'_>) -> rustix::io::Result<Option<[u8; HEADER]>> {
    let mut h = [0u8; HEADER];
    if !pread_exact(fd, &mut h, 0)? || !h.starts_with(MAGIC) {
        return Ok(None);
    }
    Ok(Some(h))
}

/// Whether the open file `fd` is a SQLite database.
pub(crate) fn is_database_fd(fd: BorrowedFd<'_>) -> bool {
    matches!(header(fd), Ok(Some(_)))
}

/// Whether `name` in `dir` is a regular file holding a SQLite database. Errors count as no.
pub(crate) fn is_database(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    match open_regular(dir, name) {
        Ok(Some((fd, _))) => is_database_fd(fd.as_fd()),
        _ => false,
    }
}

/// What a destination copy of a database is compared with: the newest mtime of the main file
/// and its log (what [`snapshot`] gives the copy), and the main file's size when there is no
/// log with content (merging the log changes the size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) mtime: (i64, i64),
    pub(crate) size: Option<u64>,
}

/// The [`Stamp`] of database `name` in `dir` (with `db`, its lstat).
pub(crate) fn stamp(dir: BorrowedFd<'_>, name: &CStr, db: &Meta) -> Stamp {
    let mut s = Stamp {
        mtime: db.mtime,
        size: Some(db.size),
    };
    for suffix in [WAL, JOURNAL] {
        if let Ok(m) = lstat_at(dir, &companion(name, suffix)) {
            if m.kind == FileType::RegularFile && m.size > 0 {
                s.mtime = s.mtime.max(m.mtime);
                s.size = None;
            }
        }
    }
    s
}

/// Whether `dst`, the destination's copy, holds the database `stamp` describes.
pub(crate) fn matches(stamp: &Stamp, dst: &Meta) -> bool {
    dst.kind == FileType::RegularFile
        && dst.mtime == stamp.mtime
        && stamp.size.is_none_or(|s| s == dst.size)
}

/// Whether `m` is a whiteout (a character device 0:0).
pub(crate) fn is_whiteout(m: &Meta) -> bool {
    m.kind == FileType::CharacterDevice && m.rdev == 0
}

/// Where the database is read.
pub(crate) struct Source<'a> {
    /// The directory as the program sees it: the RAM copy, or in overlay mode the merged
    /// directory (its locks and its view are the program's; the upper layer's file is another
    /// inode to the kernel's locks).
    pub(crate) dir: BorrowedFd<'a>,
    pub(crate) name: &'a CStr,
    /// For messages.
    pub(crate) path: PathBuf,
    /// Whether to take a lock through SQLite (false where the program cannot be running).
    pub(crate) lock: bool,
}

/// Where the copy is written: `out`, just created as `tmp` in `dir` (and made empty again
/// before each attempt). Logs are copied beside it under `tmp` + suffix, and removed again.
pub(crate) struct Dest<'a> {
    pub(crate) dir: BorrowedFd<'a>,
    pub(crate) tmp: &'a CStr,
    pub(crate) out: BorrowedFd<'a>,
    /// For messages: the directory.
    pub(crate) path: &'a Path,
}

pub(crate) enum Taken {
    Copy(Snapshot),
    /// Not (or no longer) a database: copy it as a plain file.
    NotDatabase,
    /// Gone from the source.
    Vanished,
}

/// A consistent copy, written into [`Dest::out`] (data only).
pub(crate) struct Snapshot {
    /// The main file's metadata when it was read, its mtime the newest of the main file and the
    /// log: what the caller gives the copy, and what [`stamp`] finds next time if nothing
    /// changed.
    pub(crate) meta: Meta,
    /// The main file's xattrs (see [`wanted_xattr`]).
    pub(crate) xattrs: Xattrs,
    /// Bytes read from the source (main file and log).
    pub(crate) bytes: u64,
    /// How long a lock was held on the source; None if none was.
    pub(crate) hold: Option<Duration>,
    pub(crate) attempts: u32,
    pub(crate) wal: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: SQLite could not {op} the copy of the database: {source}")]
    Sqlite {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{path}: the database kept changing ({why}) through {attempts} attempts to copy one \
         consistent state of it; its last consistent copy stays on disk, and the next \
         write-back tries again"
    )]
    Unsettled {
        path: PathBuf,
        attempts: u32,
        why: &'static str,
    },
}

fn ioerr(op: &'static str, path: &Path, e: impl Into<std::io::Error>) -> DbError {
    DbError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn join(dir: &Path, name: &CStr) -> PathBuf {
    dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

/// `/proc/self/fd/N/name`: a path that reaches `name` through the opened directory, for SQLite,
/// which opens files by path (it resolves the link to the directory's path as we see it).
fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> PathBuf {
    join(
        &PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())),
        name,
    )
}

/// Reads one consistent state of database `src.name` into `dst.out` (see the module
/// documentation).
pub(crate) fn snapshot(src: &Source<'_>, dst: &Dest<'_>) -> Result<Taken, DbError> {
    let mut lock_ok = src.lock;
    let mut why = "";
    let mut attempt = 0;
    let mut tries = 0;
    while tries < MAX_ATTEMPTS {
        attempt += 1;
        let once = take_once(src, dst, tries, &mut lock_ok);
        remove_logs(dst);
        match once? {
            Once::Taken(mut s) => {
                s.attempts = attempt;
                return Ok(Taken::Copy(s));
            }
            Once::NotDatabase => return Ok(Taken::NotDatabase),
            Once::Vanished => return Ok(Taken::Vanished),
            // Try again at once without the lock; not counted.
            Once::NoLock => {}
            Once::Changed(w, locked) => {
                why = w;
                tries += 1;
                // A rollback journal's next attempt takes the lock (if it can be had): at once.
                // Otherwise wait for a pause in the program's writes (browsers write in bursts),
                // or at least a while.
                let lock_next = lock_ok && !locked;
                if tries < MAX_ATTEMPTS && !lock_next && !wait_quiet(src.dir, src.name) {
                    std::thread::sleep(Duration::from_millis(5 << tries.min(6)));
                }
            }
        }
    }
    Err(DbError::Unsettled {
        path: src.path.clone(),
        attempts: tries,
        why,
    })
}

enum Once {
    Taken(Snapshot),
    NotDatabase,
    Vanished,
    /// The lock could not be taken (or not on this file): do without.
    NoLock,
    /// What was read may be torn (and whether a lock was held).
    Changed(&'static str, bool),
}

/// Removes the logs copied beside the destination (and a `-shm` SQLite may have made there).
fn remove_logs(dst: &Dest<'_>) {
    for s in COMPANIONS {
        let _ = rfs::unlinkat(dst.dir, companion(dst.tmp, s), AtFlags::empty());
    }
}

/// A read transaction on the database through SQLite, and when it began.
struct Lock {
    conn: Connection,
    since: Instant,
}

impl Lock {
    /// Ends the transaction and closes the connection; how long it was held.
    fn release(self) -> Duration {
        let held = self.since.elapsed();
        let _ = self.conn.execute_batch("COMMIT");
        let _ = self.conn.close();
        held
    }
}

/// Opens the database read-only and begins a read transaction (WAL: a read mark; rollback
/// journal: a SHARED lock). `Err` with the reason when it cannot be had, or is not on the file
/// `db` (the name was replaced meanwhile).
fn take_lock(src: &Source<'_>, wal: bool, db: &Meta) -> Result<Lock, String> {
    let path = proc_path(src.dir, src.name);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&path, flags).map_err(|e| e.to_string())?;
    let wait = if wal {
        WAL_LOCK_WAIT
    } else {
        ROLLBACK_LOCK_WAIT
    };
    conn.busy_timeout(wait).map_err(|e| e.to_string())?;
    conn.execute_batch("BEGIN").map_err(|e| e.to_string())?;
    let since = Instant::now();
    let read = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    });
    let lock = Lock { conn, since };
    if let Err(e) = read {
        let _ = lock.release();
        return Err(e.to_string());
    }
    match lstat_at(src.dir, src.name) {
        Ok(m) if m.ino == db.ino => Ok(lock),
        _ => {
            let _ = lock.release();
            Err("the name now holds another file".into())
        }
    }
}

/// How long the database and its logs must go unwritten before a copy without a lock is tried
/// again, and how long to wait for that at most.
const QUIET: Duration = Duration::from_millis(5);
const QUIET_WAIT: Duration = Duration::from_millis(300);

/// Waits until neither database `name` of `dir` nor its logs have been written for [`QUIET`]
/// (inotify on the directory), at most [`QUIET_WAIT`]: a program writing in bursts leaves gaps
/// a copy without a lock fits in. False if none came, or inotify could not be used.
fn wait_quiet(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let Ok(fd) = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) else {
        return false;
    };
    let watch = WatchFlags::MODIFY
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO;
    let dir_path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    if inotify::add_watch(&fd, dir_path.as_str(), watch).is_err() {
        return false;
    }
    let ours = |n: &CStr| n == name || is_companion_of(n, name);
    let deadline = Instant::now() + QUIET_WAIT;
    // A write may have come just before the watch: silence is counted from now.
    let mut last = Instant::now();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    loop {
        let now = Instant::now();
        let quiet_at = last + QUIET;
        if now >= quiet_at {
            return true;
        }
        if now >= deadline {
            return false;
        }
        let wait = quiet_at.min(deadline) - now;
        let ts = Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return false,
        }
        let mut reader = inotify::Reader::new(&fd, &mut buf);
        loop {
            match reader.next() {
                Ok(ev) => {
                    if ev.file_name().is_some_and(ours) {
                        last = Instant::now();
                    }
                }
                Err(Errno::INTR) => {}
                Err(_) => break,
            }
        }
    }
}

/// Unchanged: same inode, size, mtime and ctime.
fn frozen(a: &Meta, b: &Meta) -> bool {
    (a.ino, a.size, a.mtime, a.ctime) == (b.ino, b.size, b.mtime, b.ctime)
}

/// The first 32 bytes of a WAL; None if it is shorter.
fn wal_header(fd: BorrowedFd<'_>) -> rustix::io::Result<Option<[u8; WAL_HEADER]>> {
    let mut h = [0u8; WAL_HEADER];
    Ok(pread_exact(fd, &mut h, 0)?.then_some(h))
}

/// `CLOCK_REALTIME_COARSE`: the clock inode times are stamped from.
fn coarse_now() -> Timestamp {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r != 0 {
        return Timestamp::now();
    }
    Timestamp {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec,
    }
}

/// Waits (a tick at most) until the clock that stamps inode times is past `latest`, so that any
/// write from now on gives the file a newer ctime.
fn let_clock_pass(latest: Timestamp) {
    let deadline = Instant::now() + Duration::from_millis(100);
    while coarse_now() <= latest && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Copies all of `from` (as long as it is now) into `to`, a new file, from the start.
fn copy_all(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Result<u64, (&'static str, Errno)> {
    let len = fstat(from).map_err(|e| ("stat", e))?.size;
    let mut cfr = true;
    copy_range(from, to, 0, len, &mut cfr, &mut Vec::new())
}

fn take_once(
    src: &Source<'_>,
    dst: &Dest<'_>,
    tries: u32,
    lock_ok: &mut bool,
) -> Result<Once, DbError> {
    let spath = &src.path;
    let Some((db, m0)) = open_regular(src.dir, src.name).map_err(|e| ioerr("open", spath, e))?
    else {
        return Ok(Once::Vanished);
    };
    let Some(h) = header(db.as_fd()).map_err(|e| ioerr("read", spath, e))? else {
        return Ok(Once::NotDatabase);
    };
    let wal = h[18] == 2 || h[19] == 2;
    let log_name = companion(src.name, if wal { WAL } else { JOURNAL });
    let log_path = join(spath.parent().unwrap_or(Path::new("/")), &log_name);
    let log = open_regular(src.dir, &log_name).map_err(|e| ioerr("open", &log_path, e))?;
    // WAL: whenever the WAL exists (without one, no program has the database open, and a
    // read-only connection would create one). Rollback journal: from the second attempt on.
    let want_lock = *lock_ok && if wal { log.is_some() } else { tries > 0 };
    let lock = if want_lock {
        match take_lock(src, wal, &m0) {
            Ok(l) => Some(l),
            Err(reason) => {
                debug!(path = ?spath, %reason, "no lock on the database: copying without one");
                *lock_ok = false;
                return Ok(Once::NoLock);
            }
        }
    } else {
        None
    };
    let copied = copy_pair(src, dst, &db, log.as_ref(), wal, lock.is_some(), &log_name);
    // The connection first: closing one of our own descriptors of the file would drop its
    // locks (POSIX locks are per process).
    let hold = lock.map(Lock::release);
    drop(log);
    let (check, bytes, log_copied) = copied?;
    if let Err(why) = check.verdict {
        return Ok(Once::Changed(why, hold.is_some()));
    }
    if let Some(suffix) = log_copied {
        normalize(dst, suffix)?;
    }
    let xattrs = read_xattrs(XRef::Fd(db.as_fd()), wanted_xattr)
        .map_err(|e| ioerr("listxattr", spath, e))?;
    drop(db);
    Ok(Once::Taken(Snapshot {
        meta: check.meta,
        xattrs,
        bytes,
        hold,
        attempts: 0,
        wal,
    }))
}

/// What the checks found: the metadata for the copy, or why it may be torn.
struct Check {
    meta: Meta,
    verdict: Result<(), &'static str>,
}

/// Copies the main file into `dst.out` and the log beside it where needed, and checks the
/// result (see the module documentation). Returns the check, the bytes read and the suffix of
/// the log copied.
fn copy_pair(
    src: &Source<'_>,
    dst: &Dest<'_>,
    db: &OwnedFd,
    log: Option<&(OwnedFd, Meta)>,
    wal: bool,
    locked: bool,
    log_name: &CStr,
) -> Result<(Check, u64, Option<&'static [u8]>), DbError> {
    let spath = &src.path;
    let dpath = || join(dst.path, dst.tmp);
    let m1 = fstat(db.as_fd()).map_err(|e| ioerr("stat", spath, e))?;
    let l1 = match log {
        Some((fd, _)) => Some(fstat(fd.as_fd()).map_err(|e| ioerr("stat", spath, e))?),
        None => None,
    };
    let h1 = match (wal, log) {
        (true, Some((fd, _))) => wal_header(fd.as_fd()).map_err(|e| ioerr("read", spath, e))?,
        _ => None,
    };
    if !locked {
        let latest = l1.map_or(m1.ctime, |l| l.ctime.max(m1.ctime));
        let_clock_pass(latest);
    }
    rfs::ftruncate(dst.out, 0).map_err(|e| ioerr("truncate", &dpath(), e))?;
    let mut cfr = true;
    let mut bytes = copy_range(db.as_fd(), dst.out, 0, m1.size, &mut cfr, &mut Vec::new())
        .map_err(|(op, e)| ioerr(op, if op == "read" { spath } else { dst.path }, e))?;
    // The log: a WAL with a header; a rollback journal with content unless the lock keeps the main
    // file committed.
    let suffix = match (wal, l1) {
        (true, _) if h1.is_some() => Some(WAL),
        (false, Some(l)) if !locked && l.size > 0 => Some(JOURNAL),
        _ => None,
    };
    if let (Some(suffix), Some((fd, _))) = (suffix, log) {
        let name = companion(dst.tmp, suffix);
        let out = rfs::openat(dst.dir, &name, super::file::CREATE_FLAGS, mode(0o600))
            .map_err(|e| ioerr("create", &join(dst.path, &name), e))?;
        bytes += copy_all(fd.as_fd(), out.as_fd())
            .map_err(|(op, e)| ioerr(op, &join(dst.path, &name), e))?;
    }
    // After: the same files under the same names, and (see the module documentation) what
    // says nothing changed that matters.
    let m2 = fstat(db.as_fd()).map_err(|e| ioerr("stat", spath, e))?;
    let l2 = match log {
        Some((fd, _)) => Some(fstat(fd.as_fd()).map_err(|e| ioerr("stat", spath, e))?),
        None => None,
    };
    let h3 = match (wal, log) {
        (true, Some((fd, _))) => wal_header(fd.as_fd()).map_err(|e| ioerr("read", spath, e))?,
        _ => None,
    };
    let same_name = |name: &CStr, m: Option<&Meta>| match (lstat_at(src.dir, name), m) {
        (Ok(now), Some(m)) => now.ino == m.ino,
        (Err(Errno::NOENT), None) => true,
        _ => false,
    };
    // The log counts unless a rollback journal was left out under the lock (its journal
    // comes and goes with every commit then, and is not needed).
    let log_counts = wal || !locked;
    let names_kept =
        same_name(src.name, Some(&m1)) && (!log_counts || same_name(log_name, l1.as_ref()));
    let verdict = if !names_kept {
        Err("a file was replaced")
    } else if wal {
        match (h1, h3) {
            (Some(a), Some(b)) if a == b => Ok(()),
            (None, None) if frozen(&m1, &m2) => Ok(()),
            _ => Err("the WAL was restarted"),
        }
    } else if !frozen(&m1, &m2) {
        Err("a commit wrote to the database")
    } else if !locked && !l1.zip(l2).is_none_or(|(a, b)| frozen(&a, &b)) {
        Err("a commit wrote to the journal")
    } else {
        Ok(())
    };
    // The database as a whole was last changed when the newer of the two files was (as
    // `stamp` sees it: a log with content counts, copied or not).
    let mut meta = m1;
    if let Some(l) = l1.filter(|l| l.size > 0) {
        meta.mtime = meta.mtime.max(l.mtime);
    }
    Ok((Check { meta, verdict }, bytes, suffix))
}

/// Lets SQLite turn the copied main file and log into one file: it opens the copy (alone, in
/// exclusive locking mode: no `-shm`), which replays the WAL or rolls back a hot journal, then
/// checkpoints and, on close, deletes the log.
fn normalize(dst: &Dest<'_>, suffix: &'static [u8]) -> Result<(), DbError> {
    let path = join(dst.path, dst.tmp);
    let sq = |op: &'static str| {
        let path = path.clone();
        move |source| DbError::Sqlite { op, path, source }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(proc_path(dst.dir, dst.tmp), flags).map_err(sq("open"))?;
    conn.query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| {
        r.get::<_, String>(0)
    })
    .map_err(sq("lock"))?;
    if suffix == WAL {
        let (busy, log, done): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sq("checkpoint"))?;
        if busy != 0 || log != done {
            return Err(DbError::Sqlite {
                op: "checkpoint",
                path,
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    Some(format!("{done} of {log} frames checkpointed")),
                ),
            });
        }
    } else {
        // The first read rolls a hot journal back.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sq("roll back"))?;
    }
    conn.close().map_err(|(_, e)| e).map_err(sq("close"))?;
    for s in COMPANIONS {
        let name = companion(dst.tmp, s);
        match rfs::unlinkat(dst.dir, &name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(ioerr("remove", &join(dst.path, &name), e)),
        }
    }
    Ok(())
}
