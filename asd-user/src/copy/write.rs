//! Writing entries: regular files (copied under a temporary name), symlinks and special files,
//! and putting temporary entries in place (renamed now, or deferred to phase 3).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, RenameFlags};
use rustix::io::Errno;
use tracing::warn;

use crate::fsio::{fstat, mode, remove_entry, remove_tree, Meta, FILE_FLAGS};

use super::durable::RenameJob;
use super::engine::{DirCtx, Engine};
use super::file::CREATE_FLAGS;
use super::probe::{quick_equal, XattrPair};
use super::{cerr, CopyError};

impl Engine<'_> {
    /// Creates an entry in `dst` (the destination directory of `d`) with `make`, under `name`
    /// or (None) a fresh temporary name. Retries on a clashing temporary name, and once after
    /// making the directory writable.
    pub(super) fn create_entry<T>(
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
    pub(super) fn commit(&mut self, d: &DirCtx<'_>, tmp: CString, name: &CStr, exchange: bool) {
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
    pub(super) fn rename_into_place(
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

    pub(super) fn sync_file(
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

    fn copy_file(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        dm: Option<&Meta>,
    ) -> Result<(), CopyError> {
        // New under its final name, into RAM: the copy threads can take it.
        if dm.is_none() && !self.opts.durable && self.hand_to_pool(d, name) {
            return Ok(());
        }
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
            rfs::openat(dir, n, CREATE_FLAGS, mode(0o600))
        });
        let (tmp, out) = match created {
            Ok(x) => x,
            Err(e) => return Err(cerr("create", self.dst_path(Some(name)), e)),
        };
        let written = self.file.write(&src, &out, &sm);
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

    pub(super) fn sync_symlink(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
    ) {
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
            // Fixed in place, unless the symlink may be a start entry (see `super::keep`):
            // a new one is made and the old one kept.
            if same && (self.keeper.is_none() || self.node_meta_same(sm, dm, true)) {
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

    pub(super) fn sync_special(
        &mut self,
        d: &DirCtx<'_>,
        name: &CStr,
        sm: &Meta,
        dm: Option<&Meta>,
    ) {
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
            // As for symlinks.
            if self.keeper.is_none() || self.node_meta_same(sm, dm, false) {
                return self.fix_node_meta(dst, name, sm, dm, false);
            }
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
}
