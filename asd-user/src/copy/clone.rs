//! [`hardlink_clone`]: a `cp -al` of a tree (directories recreated, regular files hard-linked),
//! and [`start_clone`], asd's start-state clone: the directories only, filled in as write-backs
//! change the start state (see [`super::keep`]), or a full `cp -al` where that cannot be.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, XattrFlags};
use rustix::io::Errno;
use tracing::warn;

use crate::fsio::{
    btime_at, fstat, inode_clock_now, is_user_xattr, list_dir, lstat_at, mode, read_xattrs,
    wanted_xattr, Ids, Meta, XRef, DIR_FLAGS,
};

use super::helpers::{join_rel, list_dir_typed, open_root, push_rel};
use super::prefetch::Prefetch;
use super::start_dirs;
use super::{cerr, CopyError, CopyStats};

/// Like `cp -al`: recreates the directories of `src` (with their metadata) at `dst` and
/// hard-links every regular file; symlinks, fifos (and device nodes, where permitted) are
/// copied, sockets skipped. `dst` must not exist (it is created) or be an empty directory, on
/// the same filesystem as `src`. The result is made durable (syncfs) before returning, so the
/// caller can rename it into its final place.
pub fn hardlink_clone(src: &Path, dst: &Path) -> Result<CopyStats, CopyError> {
    clone_tree(src, dst)
}

/// The start-state clone of `src` in the existing empty directory `dst` (same filesystem):
/// only the list of `src`'s directories and their metadata ([`super::start_dirs`]), the root's
/// included; write-backs fill it in (see [`super::keep`]). `dst`'s birth is the start:
/// this waits for the inode clock to pass it, so that whatever is written after it returns is
/// born later. A full hard-linked clone instead where that cannot tell the start entries: the
/// filesystem records no birth times, the clock does not move on, or an entry of `src` is born
/// after `dst` (the clock was set back). Durable when it returns.
pub fn start_clone(src: &Path, dst: &Path) -> Result<CopyStats, CopyError> {
    let dfd = open_root(dst)?;
    let Some(born) = btime_at(dfd.as_fd(), c"").map_err(|e| cerr("statx", dst.to_path_buf(), e))?
    else {
        return clone_tree(src, dst);
    };
    // The coarse clock ticks every few milliseconds; a second means it is not moving forward.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while inode_clock_now() <= born {
        if std::time::Instant::now() > deadline {
            warn!(
                ?dst,
                "the clock does not pass the start clone's birth: cloning every file"
            );
            return clone_tree(src, dst);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let sfd = open_root(src)?;
    let sm = fstat(sfd.as_fd()).map_err(|e| cerr("stat", src.to_path_buf(), e))?;
    let dm = fstat(dfd.as_fd()).map_err(|e| cerr("stat", dst.to_path_buf(), e))?;
    let mut scan = Scan {
        start: born,
        skip: (dm.dev, dm.ino),
        list: Vec::new(),
        rel: Vec::new(),
        buf: Vec::new(),
        root: src,
        stats: CopyStats::default(),
    };
    start_dirs::push(&mut scan.list, b"", &start_dirs::DirMeta::of(&sm));
    // The walk waits on one cold metadata read after another: keep several in flight ahead.
    let scanned = Prefetch::around(sfd.as_fd(), || scan.dir(sfd.as_fd()))?;
    if !scanned || scan.list.len() as u64 > start_dirs::MAX_SIZE {
        warn!(
            ?src,
            "entries born after the start clone (the clock was set back?), or too many \
             directories to list: cloning every file"
        );
        return clone_tree(src, dst);
    }
    start_dirs::write(dfd.as_fd(), &scan.list).map_err(|e| {
        cerr(
            "write",
            dst.join(OsStr::from_bytes(start_dirs::NAME.to_bytes())),
            e,
        )
    })?;
    // The root keeps the mode it was made with (the owner's, writable): the snapshot takes the
    // start's from the list, and a read-only one would keep nothing.
    rfs::syncfs(&dfd).map_err(|e| cerr("syncfs", dst.to_path_buf(), e))?;
    Ok(scan.stats)
}

/// The walk of [`start_clone`]: every directory's metadata into `list`; stops (Ok(false)) at
/// the first entry born after `start`.
struct Scan<'a> {
    start: crate::copy::Timestamp,
    /// The clone itself, should it lie inside the source.
    skip: (u64, u64),
    list: Vec<u8>,
    rel: Vec<u8>,
    buf: Vec<u8>,
    root: &'a Path,
    stats: CopyStats,
}

impl Scan<'_> {
    fn path(&self, name: Option<&CStr>) -> PathBuf {
        join_rel(self.root, &self.rel, name)
    }

    fn dir(&mut self, s: BorrowedFd<'_>) -> Result<bool, CopyError> {
        let names =
            list_dir_typed(s, &mut self.buf).map_err(|e| cerr("readdir", self.path(None), e))?;
        for (name, kind) in names {
            match btime_at(s, &name) {
                Ok(Some(b)) if b > self.start => return Ok(false),
                Ok(_) => {}
                Err(Errno::NOENT) => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(e) => return Err(cerr("statx", self.path(Some(&name)), e)),
            }
            if kind != FileType::Directory && kind != FileType::Unknown {
                continue;
            }
            let sub = match rfs::openat(s, &name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                // Not a directory (an unknown type), or gone.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => continue,
                Err(e) => return Err(cerr("open", self.path(Some(&name)), e)),
            };
            let m = fstat(sub.as_fd()).map_err(|e| cerr("stat", self.path(Some(&name)), e))?;
            if (m.dev, m.ino) == self.skip {
                continue;
            }
            let len = push_rel(&mut self.rel, &name);
            start_dirs::push(&mut self.list, &self.rel, &start_dirs::DirMeta::of(&m));
            self.stats.dirs_created += 1;
            let r = self.dir(sub.as_fd());
            self.rel.truncate(len);
            if !r? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// [`hardlink_clone`].
fn clone_tree(src: &Path, dst: &Path) -> Result<CopyStats, CopyError> {
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
    // The walk waits on one cold metadata read after another: keep several in flight ahead.
    let cloned = Prefetch::around(sfd.as_fd(), || c.clone_dir(sfd.as_fd(), dfd.as_fd()));
    cloned?;
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
