//! The walk of a directory pair: lists and probes both sides, hands each entry to the code
//! that syncs it, deletes extra destination entries, and descends into subdirectories
//! (existing ones, or new ones built from scratch), setting directory metadata afterwards.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::fsio::{
    fstat, list_dir, mode, read_xattrs, remove_entry, wanted_xattr, Meta, XRef, DIR_FLAGS,
};

use super::cerr;
use super::durable::DirJob;
use super::engine::{DirCtx, Engine};
use super::helpers::{list_dir_typed, push_rel};
use super::probe::{DstProbe, InDst};

/// A source directory opened by the walk, and its inode (0 where no record of directories is
/// checked, see [`Engine::src_identity`]).
pub(super) struct SrcDir {
    fd: OwnedFd,
    ino: u64,
}

impl AsFd for SrcDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Engine<'_> {
    // -- the walk ---------------------------------------------------------------------------

    /// The inode of `src`, the source directory `name` in `d` just opened; counted in
    /// `moved_meanwhile` if the record of directories this write-back is to leave (the scan's,
    /// see `super::dirids`) does not have it there: it moved between the scan and the walk,
    /// so the record does not say what was written where.
    fn src_identity(&mut self, d: &DirCtx<'_>, name: &CStr, src: &OwnedFd) -> u64 {
        let Some(ids) = self.dir_ids else {
            return 0;
        };
        let ino = fstat(src.as_fd()).map_or(0, |m| m.ino);
        if !ids.contains(&super::dirids::fingerprint(ino, d.src_ino, name.to_bytes())) {
            self.stats.moved_meanwhile += 1;
        }
        ino
    }

    pub(super) fn sync_dir(&mut self, d: &DirCtx<'_>) {
        // A journaled run in a directory whose listing did not change: the journal's names are
        // all there is to look at, and the directory is not even listed.
        let marked = d.node.filter(|_| !d.changed).map(|n| {
            n.children()
                .filter_map(|(name, _)| CString::new(name.as_bytes()).ok())
                .collect::<Vec<_>>()
        });
        let listed = match marked {
            Some(names) => Ok(names),
            None => list_dir(d.src, &mut self.dirbuf),
        };
        let names = match listed {
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
        // Journaled: entries the journal did not mark did not change (their destination
        // counterparts were taken out of `listing` above, so they are not extra either), with
        // one exception: a name the destination lacks is compared all the same. It can only be
        // one that arrived after the journal's period ended (a rename into this directory
        // while this write-back runs, reported next period), and its old name may be deleted
        // below: the new place must exist before the old one goes.
        let marked = |name: &CStr| {
            d.node
                .is_none_or(|n| n.child(OsStr::from_bytes(name.to_bytes())).is_some())
        };
        let entries: Vec<(CString, InDst)> = entries
            .into_iter()
            .filter(|(name, in_dst)| marked(name) || matches!(in_dst, InDst::No))
            .collect();
        // Likewise only the extra destination names the journal marked (deleted or renamed
        // away in its period) are deleted: one that left the source after the period ended is
        // deleted by the next write-back, after its new place was written (by this one if it
        // arrived in time, by the next otherwise). Marks from a scan of ctimes (see
        // `super::scan`) name no deleted entries: there an extra name goes if the scan did not
        // see it either (one it saw left meanwhile, and goes with the next write-back).
        if let Some(l) = listing.as_mut() {
            match d.node.filter(|n| n.all_extras()) {
                Some(_) => {
                    let seen = self.scanned.and_then(|s| s.get(&self.src_rel));
                    l.retain(|name, _| seen.is_some_and(|s| !s.contains(name)));
                }
                None => l.retain(|name, _| marked(name)),
            }
        }
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
        // Databases are compared and written as a whole, apart from the other entries.
        let databases = self.take_databases(d, &mut probes, listing.as_mut());
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
        for unit in databases {
            self.sync_database(d, unit);
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
        let src = SrcDir {
            ino: self.src_identity(d, name, &src),
            fd: src,
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
        src: &SrcDir,
        sm: &Meta,
        dst: &OnceCell<OwnedFd>,
        made_writable: bool,
    ) {
        let dst_len = push_rel(&mut self.dst_rel, name);
        let node = d
            .node
            .and_then(|n| n.child(OsStr::from_bytes(name.to_bytes())));
        let changed = self.dir_changed(node, sm);
        let mut cd = DirCtx::new(src.as_fd(), dst, Some((d, name)), false, changed);
        cd.src_ino = src.ino;
        cd.node = node.filter(|n| !n.whole());
        cd.under_temp_name = d.under_temp_name;
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
        src: &SrcDir,
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
        src: &SrcDir,
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
        let mut cd = DirCtx::new(src.as_fd(), &dst, Some((d, &dname)), true, true);
        cd.src_ino = src.ino;
        cd.under_temp_name = d.under_temp_name || !direct;
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
    pub(super) fn finish_dir(&mut self, cd: &DirCtx<'_>, sm: &Meta) {
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
                created: false,
            }),
            // Copy threads may still be creating files in it: after they finished.
            _ if cd.pooled.get() => {
                let dir = self.dir_idx(cd);
                self.dir_jobs.push(DirJob {
                    dir,
                    meta: *sm,
                    xattrs: sx,
                    created: cd.fresh,
                })
            }
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
}
