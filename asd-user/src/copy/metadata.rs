//! Comparing and fixing metadata in place: xattrs (what the destination can store), owners,
//! modes and times of files, of nodes that cannot be opened (symlinks, fifos, devices), and of
//! directories.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, Mode};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::fsio::{
    fstat, is_user_xattr, lstat_at, mode, read_xattrs, wanted_xattr, x_remove, x_set, Meta, XRef,
    Xattrs, FILE_FLAGS,
};

use super::engine::{DirCtx, Engine};
use super::{cerr, CopyError};

impl Engine<'_> {
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
    pub(super) fn apply_xattrs(
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

    pub(super) fn chown_result(&mut self, r: rustix::io::Result<()>) -> rustix::io::Result<()> {
        match r {
            Err(Errno::PERM) => {
                self.chown_denied += 1;
                Ok(())
            }
            other => other,
        }
    }

    /// Same data per the quick check: compares metadata and fixes it in place. Returns false
    /// when it differs on an inode with other links (the file must be rewritten instead).
    pub(super) fn fix_file_meta(
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

    /// Owner, mode (not for symlinks) and times of a node that cannot be opened (symlink, fifo,
    /// device), by name.
    pub(super) fn set_node_meta(
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

    pub(super) fn fix_node_meta(
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

    pub(super) fn apply_dir_meta(
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
}
