//! Comparing and fixing metadata in place: xattrs, owners, modes and times of files, of nodes
//! that cannot be opened (symlinks, fifos, devices), and of directories. What the destination
//! can store is learnt in [`super::policy`].

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, Mode};
use rustix::io::Errno;

use crate::fsio::{
    fstat, lstat_at, mode, read_xattrs, wanted_xattr, Meta, XRef, Xattrs, FILE_FLAGS,
};

use super::engine::{DirCtx, Engine};
use super::{cerr, CopyError};

impl Engine<'_> {
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
        let (uid, gid) = self.policy.ids.change(sm, dm);
        let xattrs_same = self.policy.xattrs_equal(sx, dx);
        if uid.is_none() && gid.is_none() && sm.perm == dm.perm && xattrs_same {
            self.stats.unchanged += 1;
            return Ok(true);
        }
        // A read-only file cannot get new user xattrs, even from its owner: rewrite it (a new
        // file gets its xattrs before its mode).
        // With a start clone, the inode may be the start's (see `super::keep`): a new one is
        // written and the old one kept.
        if dm.nlink > 1
            || self.keeper.is_some()
            || (!xattrs_same && dm.perm & 0o200 == 0 && !self.policy.ids.privileged)
        {
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
            self.policy
                .apply_xattrs(XRef::Fd(fd.as_fd()), sx, dx)
                .map_err(|e| cerr("setxattr", path(self), e))?;
        }
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(&fd, uid, gid);
            self.policy
                .chown_result(r)
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

    /// Whether [`Engine::fix_node_meta`] would leave the node as it is.
    pub(super) fn node_meta_same(&self, sm: &Meta, dm: &Meta, symlink: bool) -> bool {
        let (uid, gid) = self.policy.ids.change(sm, dm);
        uid.is_none() && gid.is_none() && (symlink || sm.perm == dm.perm) && sm.mtime == dm.mtime
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
        let (uid, gid) = self.policy.ids.change(sm, dm);
        if uid.is_some() || gid.is_some() {
            let r = rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
            self.policy
                .chown_result(r)
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
        if !self.policy.xattrs_equal(sx, &dx) {
            // Writing user xattrs needs write permission, even for the owner.
            if dm.perm & 0o200 == 0 {
                rfs::fchmod(dst, mode(dm.perm | 0o200))?;
            }
            if self.policy.apply_xattrs(XRef::Fd(dst), sx, &dx)? {
                changed = true;
            }
        }
        let (uid, gid) = self.policy.ids.change(sm, &dm);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(dst, uid, gid);
            self.policy.chown_result(r)?;
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
