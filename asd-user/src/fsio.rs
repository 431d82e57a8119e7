//! Fd-relative file-system primitives shared by the copy engine ([`crate::copy`]) and the
//! overlay path ([`crate::overlay`]): `stat` in fixed-width types, directory listing, deleting
//! trees without following symlinks, extended attributes, owner changes and file data.
//!
//! Every lookup is relative to an opened directory descriptor and never follows a symlink.
//! Where the two callers deliberately differ, the difference is a parameter here (the name
//! filter of [`read_xattrs`]).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, RawDir, Timespec, Timestamps, Uid,
    XattrFlags,
};
use rustix::io::Errno;

use crate::copy::{Timestamp, TEMP_PREFIX};

pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// Opening a "regular file" that was swapped for a fifo must not block, hence NONBLOCK.
pub(crate) const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY)
    .union(OFlags::NONBLOCK);
const PATH_FLAGS: OFlags = OFlags::PATH.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Directory descriptors kept open between a walk and its deferred phases (well below the usual
/// limit of 1024 open files; beyond it they are reopened by path).
pub(crate) const MAX_KEPT_DIRS: usize = 256;

/// The parts of `struct stat` the walkers use, in fixed-width types.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) kind: FileType,
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    pub(crate) blocks: u64,
    pub(crate) nlink: u64,
    pub(crate) rdev: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) atime: (i64, i64),
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: Timestamp,
}

impl Meta {
    // The field types of `struct stat` differ between architectures; the casts are identities on
    // some of them.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    pub(crate) fn from_stat(st: &rfs::Stat) -> Meta {
        Meta {
            kind: FileType::from_raw_mode(st.st_mode as u32),
            perm: st.st_mode as u32 & 0o7777,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            nlink: st.st_nlink as u64,
            rdev: st.st_rdev as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            atime: (st.st_atime as i64, st.st_atime_nsec as i64),
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: Timestamp {
                sec: st.st_ctime as i64,
                nsec: st.st_ctime_nsec as i64,
            },
        }
    }

    pub(crate) fn times(&self) -> Timestamps {
        Timestamps {
            last_access: Timespec {
                tv_sec: self.atime.0,
                tv_nsec: self.atime.1,
            },
            last_modification: Timespec {
                tv_sec: self.mtime.0,
                tv_nsec: self.mtime.1,
            },
        }
    }
}

pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Meta> {
    rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|st| Meta::from_stat(&st))
}

/// The birth time of `name` in `dir` (never following a symlink), or None where the filesystem
/// records none (statx leaves `STATX_BTIME` out of its mask). ext4 (256-byte inodes), xfs and
/// btrfs record it. An empty `name` is `dir` itself.
pub(crate) fn btime_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Option<Timestamp>> {
    let st = rfs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::EMPTY_PATH,
        rfs::StatxFlags::TYPE | rfs::StatxFlags::BTIME,
    )?;
    Ok(
        (st.stx_mask & rfs::StatxFlags::BTIME.bits() != 0).then_some(Timestamp {
            sec: st.stx_btime.tv_sec,
            nsec: i64::from(st.stx_btime.tv_nsec),
        }),
    )
}

/// The clock inode times are taken from (the kernel's coarse real-time clock), now.
pub(crate) fn inode_clock_now() -> Timestamp {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    Timestamp {
        sec: t.tv_sec,
        nsec: t.tv_nsec,
    }
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> rustix::io::Result<Meta> {
    rfs::fstat(fd).map(|st| Meta::from_stat(&st))
}

pub(crate) fn mode(perm: u32) -> Mode {
    Mode::from_raw_mode(perm)
}

/// Whether `name` is one of our temporary names ([`TEMP_PREFIX`]).
pub(crate) fn is_temp_name(name: &CStr) -> bool {
    name.to_bytes().starts_with(TEMP_PREFIX.as_bytes())
}

/// Reads all names of a directory (without `.` and `..`) before the caller changes anything in
/// it. `buf` is scratch space reused between directories.
pub(crate) fn list_dir(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> rustix::io::Result<Vec<CString>> {
    if buf.capacity() < 64 * 1024 {
        buf.reserve(64 * 1024);
    }
    let mut names = Vec::new();
    let mut iter = RawDir::new(fd, buf.spare_capacity_mut());
    while let Some(entry) = iter.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Opens directory `name` in `parent` (never a symlink). Our own directory without read or
/// search permission is opened up first (to its mode | 0o700, through [`chmod_nofollow`]); the
/// caller restores its mode afterwards.
pub(crate) fn open_dir_at(parent: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    match rfs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Err(Errno::ACCESS) => {
            chmod_nofollow(parent, name, |m| m.perm | 0o700)?;
            rfs::openat(parent, name, DIR_FLAGS, Mode::empty())
        }
        other => other,
    }
}

/// chmod of `name` in `dir` (not a symlink) to `perm(its lstat)`, without following a symlink
/// put there meanwhile: through an `O_PATH` descriptor (fchmod refuses those) and its /proc
/// magic link, which resolves to the very inode opened.
pub(crate) fn chmod_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    perm: impl FnOnce(&Meta) -> u32,
) -> rustix::io::Result<()> {
    let fd = rfs::openat(dir, name, PATH_FLAGS, Mode::empty())?;
    let m = fstat(fd.as_fd())?;
    if m.kind == FileType::Symlink {
        return Err(Errno::LOOP);
    }
    let perm = mode(perm(&m));
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match rfs::chmod(proc_path.as_str(), perm) {
        // No /proc (a chroot): by name, checked just above.
        Err(Errno::NOENT) if !Path::new("/proc/self/fd").exists() => {
            rfs::chmodat(dir, name, perm, AtFlags::empty())
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Deleting trees without following symlinks.

/// Removes `name` in `parent` and everything below it, without following symlinks. Our own
/// directories lacking owner read, write or search are opened up first (mode | 0o700, through
/// [`chmod_nofollow`], never following a symlink swapped in meanwhile). Returns the number of
/// entries removed.
pub(crate) fn remove_tree(
    parent: BorrowedFd<'_>,
    name: &CStr,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<u64> {
    match rfs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) => return Ok(1),
        Err(Errno::NOENT) => return Ok(0),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let dir = match open_dir_at(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    let needed = 0o700;
    let m = fstat(dir.as_fd())?;
    if m.perm & needed != needed {
        rfs::fchmod(&dir, mode(m.perm | 0o700))?;
    }
    let mut count = 0;
    for child in list_dir(dir.as_fd(), buf)? {
        count += remove_tree(dir.as_fd(), &child, buf)?;
    }
    drop(dir);
    match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(count + 1),
        Err(e) => Err(e),
    }
}

/// [`remove_tree`], making `parent` (ours) writable if needed; the caller restores its mode
/// with the directory's metadata.
pub(crate) fn remove_entry(
    parent: BorrowedFd<'_>,
    name: &CStr,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<u64> {
    match remove_tree(parent, name, buf) {
        Err(Errno::ACCESS) => {
            let m = fstat(parent)?;
            rfs::fchmod(parent, mode(m.perm | 0o700))?;
            remove_tree(parent, name, buf)
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Extended attributes: user.* and POSIX ACLs.

/// Extended attributes as (name, value) pairs, sorted by name.
pub(crate) type Xattrs = Vec<(CString, Vec<u8>)>;

/// The xattrs the copy engine copies: every `user.*` one and POSIX ACLs. (Overlay apply reads
/// these from `changes` too, overlayfs' `user.overlay.*` markers included, but writes fewer to
/// the original.)
pub(crate) fn wanted_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

pub(crate) fn is_user_xattr(name: &CStr) -> bool {
    name.to_bytes().starts_with(b"user.")
}

/// Where to read or write xattrs: an open descriptor, or a path.
#[derive(Clone, Copy)]
pub(crate) enum XRef<'a> {
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed (`l*xattr`).
    Path(&'a CStr),
}

pub(crate) fn x_list(x: XRef<'_>, buf: &mut [u8]) -> rustix::io::Result<usize> {
    match x {
        XRef::Fd(fd) => rfs::flistxattr(fd, buf),
        XRef::Path(p) => rfs::llistxattr(p, buf),
    }
}

pub(crate) fn x_get(x: XRef<'_>, name: &CStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
    match x {
        XRef::Fd(fd) => rfs::fgetxattr(fd, name, buf),
        XRef::Path(p) => rfs::lgetxattr(p, name, buf),
    }
}

pub(crate) fn x_set(x: XRef<'_>, name: &CStr, value: &[u8]) -> rustix::io::Result<()> {
    match x {
        XRef::Fd(fd) => rfs::fsetxattr(fd, name, value, XattrFlags::empty()),
        XRef::Path(p) => rfs::lsetxattr(p, name, value, XattrFlags::empty()),
    }
}

pub(crate) fn x_remove(x: XRef<'_>, name: &CStr) -> rustix::io::Result<()> {
    match x {
        XRef::Fd(fd) => rfs::fremovexattr(fd, name),
        XRef::Path(p) => rfs::lremovexattr(p, name),
    }
}

/// Calls `f` with a buffer big enough for its result (query, allocate, retry on a race).
pub(crate) fn with_sized_buf(
    mut f: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut small = [0u8; 512];
    match f(&mut small) {
        Ok(n) => return Ok(small[..n].to_vec()),
        Err(Errno::RANGE) => {}
        Err(e) => return Err(e),
    }
    for _ in 0..8 {
        let need = f(&mut [])?;
        let mut big = vec![0u8; need.max(1) * 2];
        match f(&mut big) {
            Ok(n) => {
                big.truncate(n);
                return Ok(big);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// The xattrs of an entry whose names pass `keep`, sorted by name. A filesystem without xattrs
/// has none.
pub(crate) fn read_xattrs(x: XRef<'_>, keep: fn(&[u8]) -> bool) -> rustix::io::Result<Xattrs> {
    let mut small = [0u8; 256];
    let names = match x_list(x, &mut small) {
        Ok(0) => return Ok(Vec::new()),
        Ok(n) => small[..n].to_vec(),
        Err(Errno::RANGE) => with_sized_buf(|b| x_list(x, b))?,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for raw in names.split(|b| *b == 0) {
        if raw.is_empty() || !keep(raw) {
            continue;
        }
        let Ok(name) = CString::new(raw) else {
            continue;
        };
        match with_sized_buf(|b| x_get(x, &name, b)) {
            Ok(v) => out.push((name, v)),
            // Removed between list and get.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Owners and file data.

/// Owner change to apply, if any, given who we are (a non-root user can only change the group,
/// to one of its own groups, of a file it owns).
pub(crate) struct Ids {
    pub(crate) euid: u32,
    pub(crate) privileged: bool,
    pub(crate) groups: Vec<u32>,
}

impl Ids {
    pub(crate) fn current() -> Ids {
        let euid = rustix::process::geteuid().as_raw();
        let mut groups: Vec<u32> = rustix::process::getgroups()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.push(rustix::process::getegid().as_raw());
        Ids {
            euid,
            privileged: euid == 0,
            groups,
        }
    }

    pub(crate) fn change(&self, want: &Meta, have: &Meta) -> (Option<Uid>, Option<Gid>) {
        let uid = (self.privileged && want.uid != have.uid).then(|| Uid::from_raw(want.uid));
        let gid = (want.gid != have.gid
            && (self.privileged || (have.uid == self.euid && self.groups.contains(&want.gid))))
        .then(|| Gid::from_raw(want.gid));
        (uid, gid)
    }
}

/// Copies bytes `[off, end)` from `src` to `dst` at the same offsets. Returns the bytes copied
/// (fewer if the source shrank). `cfr` is cleared when copy_file_range cannot work for this pair
/// of filesystems, so later files go straight to pread/pwrite.
pub(crate) fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    end: u64,
    cfr: &mut bool,
    buf: &mut Vec<u8>,
) -> Result<u64, (&'static str, Errno)> {
    let start = off;
    while off < end {
        let want = usize::try_from(end - off)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        if *cfr {
            let (mut oi, mut oo) = (off, off);
            match rfs::copy_file_range(src, Some(&mut oi), dst, Some(&mut oo), want) {
                Ok(0) => break,
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                Err(Errno::INTR) => continue,
                Err(Errno::XDEV)
                | Err(Errno::INVAL)
                | Err(Errno::NOSYS)
                | Err(Errno::OPNOTSUPP)
                | Err(Errno::PERM) => *cfr = false,
                Err(e) => return Err(("copy", e)),
            }
        }
        if buf.len() < 256 * 1024 {
            buf.resize(256 * 1024, 0);
        }
        let chunk = want.min(buf.len());
        let n = match rustix::io::pread(src, &mut buf[..chunk], off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(("read", e)),
        };
        let mut done = 0;
        while done < n {
            match rustix::io::pwrite(dst, &buf[done..n], off + done as u64) {
                Ok(w) => done += w,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(("write", e)),
            }
        }
        off += n as u64;
    }
    Ok(off - start)
}

/// Copies a whole file. Sparse files (fewer blocks than their size) keep their holes.
pub(crate) fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    m: &Meta,
    cfr: &mut bool,
    buf: &mut Vec<u8>,
) -> Result<u64, (&'static str, Errno)> {
    if m.size == 0 {
        return Ok(0);
    }
    if m.blocks.saturating_mul(512) >= m.size {
        return copy_range(src, dst, 0, m.size, cfr, buf);
    }
    let mut total = 0;
    let mut off = 0;
    while off < m.size {
        let data = match rfs::seek(src, rfs::SeekFrom::Data(off)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            // No SEEK_DATA support: copy the rest as data.
            Err(Errno::INVAL) => off,
            Err(e) => return Err(("seek", e)),
        };
        let hole = match rfs::seek(src, rfs::SeekFrom::Hole(data)) {
            Ok(h) => h.min(m.size),
            Err(_) => m.size,
        };
        if hole <= data {
            break;
        }
        total += copy_range(src, dst, data, hole, cfr, buf)?;
        off = hole;
    }
    rfs::ftruncate(dst, m.size).map_err(|e| ("truncate", e))?;
    Ok(total)
}

/// Test hook: `ASD_TEST_CRASH_AFTER_RENAMES=N` makes a durable copy (or an overlay apply) abort
/// like kill -9 after N of its renames (and, in apply, deletions), so the crash tests can stop
/// it exactly in the middle of putting things in place. Only in builds with the `test-hooks`
/// feature (which tests/run.sh enables) and in the crate's own unit tests: a shipped asd must
/// not be made to abort by its environment, nor carry the variable's name.
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) fn crash_point() -> Option<usize> {
    std::env::var("ASD_TEST_CRASH_AFTER_RENAMES")
        .ok()?
        .parse()
        .ok()
}

/// Test hook, as [`crash_point`]: `ASD_TEST_CRASH_IN_KEEP=N` aborts a write-back after N of
/// the renames that put kept start entries in place in the start clone (see `copy::keep`).
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) fn keep_crash_point() -> Option<usize> {
    std::env::var("ASD_TEST_CRASH_IN_KEEP").ok()?.parse().ok()
}

/// Without the test hooks there is never a crash point; the callers' checks fold away.
#[cfg(not(any(test, feature = "test-hooks")))]
#[inline(always)]
pub(crate) fn crash_point() -> Option<usize> {
    None
}

#[cfg(not(any(test, feature = "test-hooks")))]
pub(crate) fn keep_crash_point() -> Option<usize> {
    None
}
