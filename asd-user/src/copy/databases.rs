//! The copy engine's side of database-aware write-backs (issue 12). In each directory a
//! write-back walks, [`Engine::take_databases`] finds the SQLite databases among the entries it
//! is to compare (a regular file to be copied that starts with the SQLite header, or the main
//! file of a `-wal`, `-journal` or `-shm` name) and takes them and their companions out of the
//! ordinary walk. [`Engine::sync_database`] compares each database as a whole and writes one
//! consistent copy of it ([`super::sqlite::snapshot`]) as a single file, without companions in
//! the destination: there they are removed, durably, before the copy is renamed in (copy mode),
//! or whiteouts that hide the original's (an overlay's upper layer).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode};
use rustix::io::Errno;
use tracing::debug;

use crate::fsio::{fstat, lstat_at, mode, read_xattrs, remove_entry, wanted_xattr, Meta, XRef};

use super::engine::{DirCtx, Engine};
use super::file::CREATE_FLAGS;
use super::probe::{quick_equal, DstProbe, Probe};
use super::sqlite::{self, Dest, Source, Taken, COMPANIONS};
use super::{cerr, CopyError};

/// A database of the directory being walked, compared and written as a whole.
pub(super) struct Unit {
    name: CString,
    /// Every member the walk probed was found unchanged since the cutoff.
    unchanged: bool,
}

impl Engine<'_> {
    /// Takes the databases (their main files and companions) out of `probes`, and their
    /// companions out of the destination's `listing` (the extra names to delete), which
    /// [`Engine::sync_database`] takes care of.
    pub(super) fn take_databases(
        &mut self,
        d: &DirCtx<'_>,
        probes: &mut Vec<Probe>,
        mut listing: Option<&mut HashMap<CString, FileType>>,
    ) -> Vec<Unit> {
        if self.databases.is_none() {
            return Vec::new();
        }
        let regular = |p: &Probe| matches!(&p.src, Ok(m) if m.kind == FileType::RegularFile);
        // Candidates: the main file of every companion, and every regular file to be copied
        // (a database without companions may get a journal the moment after its listing).
        let mut bases: Vec<CString> = Vec::new();
        for p in probes.iter().filter(|p| regular(p)) {
            if let Some(b) = sqlite::base_of(&p.name) {
                bases.push(b);
            } else if to_copy(p) {
                bases.push(p.name.clone());
            }
        }
        bases.sort();
        bases.dedup();
        let mut units = Vec::new();
        for base in bases {
            let main_regular = match probes.iter().find(|p| p.name == base) {
                Some(p) => regular(p),
                None => matches!(lstat_at(d.src, &base), Ok(m) if m.kind == FileType::RegularFile),
            };
            if !main_regular || !sqlite::is_database(d.src, &base) {
                continue;
            }
            let mut unchanged = true;
            probes.retain(|p| {
                let member =
                    p.name == base || (regular(p) && sqlite::is_companion_of(&p.name, &base));
                if member && !matches!(p.dst, DstProbe::Unchanged) {
                    unchanged = false;
                }
                !member
            });
            if let Some(l) = listing.as_deref_mut() {
                for s in COMPANIONS {
                    l.remove(&sqlite::companion(&base, s));
                }
            }
            units.push(Unit {
                name: base,
                unchanged,
            });
        }
        units
    }

    pub(super) fn sync_database(&mut self, d: &DirCtx<'_>, u: Unit) {
        if u.unchanged {
            self.stats.unchanged += 1;
            return;
        }
        if let Err(e) = self.sync_database_inner(d, &u.name) {
            self.fail(e);
        }
    }

    fn sync_database_inner(&mut self, d: &DirCtx<'_>, name: &CStr) -> Result<(), CopyError> {
        let sm = match lstat_at(d.src, name) {
            Ok(m) if m.kind == FileType::RegularFile => m,
            Ok(_) | Err(Errno::NOENT) => {
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(cerr("lstat", self.src_path(Some(name)), e)),
        };
        let dst = self.dst_dir(d)?;
        let dm = match lstat_at(dst, name) {
            Ok(m) => Some(m),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(cerr("lstat", self.dst_path(Some(name)), e)),
        };
        if let Some(dm) = &dm {
            if self.database_unchanged(d, dst, name, &sm, dm) {
                self.stats.unchanged += 1;
                return Ok(());
            }
        }
        let (tmp, out) = self
            .create_entry(d, dst, None, |dir, n| {
                rfs::openat(dir, n, CREATE_FLAGS, mode(0o600))
            })
            .map_err(|e| cerr("create", self.dst_path(Some(name)), e))?;
        // Overlay mode reads through the merged directory, where the program works.
        let view = self
            .databases
            .as_ref()
            .and_then(|db| db.view.as_ref())
            .and_then(|root| match Engine::open_rel(root.as_fd(), &self.src_rel) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    debug!(path = ?self.src_path(None), "not seen through the overlay ({e}): read from the upper layer");
                    None
                }
            });
        let dst_dir = self.dst_path(None);
        let taken = sqlite::snapshot(
            &Source {
                dir: view.as_ref().map_or(d.src, |v| v.as_fd()),
                name,
                path: self.src_path(Some(name)),
                lock: true,
            },
            &Dest {
                dir: dst,
                tmp: &tmp,
                out: out.as_fd(),
                path: &dst_dir,
            },
        );
        let unlink_tmp = || {
            let _ = rfs::unlinkat(dst, &tmp, AtFlags::empty());
        };
        let s = match taken {
            Ok(Taken::Copy(s)) => s,
            Ok(Taken::NotDatabase) => {
                // Changed its mind since the walk looked: a plain file (and its neighbours).
                drop(out);
                unlink_tmp();
                self.sync_file(d, name, &sm, dm.as_ref(), None);
                for s in COMPANIONS {
                    let c = sqlite::companion(name, s);
                    let cm = lstat_at(d.src, &c).ok();
                    if let Some(cm) = cm.filter(|m| m.kind == FileType::RegularFile) {
                        let cdm = lstat_at(dst, &c).ok();
                        self.sync_file(d, &c, &cm, cdm.as_ref(), None);
                    }
                }
                return Ok(());
            }
            Ok(Taken::Vanished) => {
                drop(out);
                unlink_tmp();
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => {
                drop(out);
                unlink_tmp();
                return Err(cerr(
                    "copy",
                    self.src_path(Some(name)),
                    std::io::Error::other(e.to_string()),
                ));
            }
        };
        let written = fstat(out.as_fd())
            .map_err(|e| ("stat", false, e))
            .and_then(|om| self.file.set_meta(&out, &s.meta, &om, &s.xattrs));
        drop(out);
        if let Err((op, on_src, e)) = written {
            unlink_tmp();
            let p = if on_src {
                self.src_path(Some(name))
            } else {
                self.dst_path(Some(name))
            };
            return Err(cerr(op, p, e));
        }
        self.stats.files_copied += 1;
        self.stats.bytes_copied += s.bytes;
        self.stats.databases += 1;
        let held = s
            .hold
            .map_or(0, |h| u64::try_from(h.as_micros()).unwrap_or(u64::MAX));
        self.stats.db_lock_us = self.stats.db_lock_us.max(held);
        debug!(
            path = ?self.src_path(Some(name)),
            bytes = s.bytes,
            attempts = s.attempts,
            wal = s.wal,
            lock_held_us = s.hold.map(|h| h.as_micros()),
            "database copied as one consistent state"
        );
        self.replace_companions(d, dst, name)?;
        let exchange = dm.is_some_and(|m| m.kind == FileType::Directory);
        self.commit(d, tmp, name, exchange);
        Ok(())
    }

    /// The destination's companions of `name`, before the new copy is renamed in: removed
    /// (after the temporary files are durable and before any rename), or in an upper layer
    /// whiteouts.
    fn replace_companions(
        &mut self,
        d: &DirCtx<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<(), CopyError> {
        let layer = self.databases.as_ref().is_some_and(|db| db.layer);
        for s in COMPANIONS {
            let c = sqlite::companion(name, s);
            if layer {
                self.put_whiteout(d, dst, &c)?;
            } else if d.fresh {
                // Made by this run: nothing there.
            } else if self.opts.durable {
                let i = self.dir_idx(d);
                self.early_deletions.push((i, c));
            } else {
                d.touched.set(true);
                remove_entry(dst, &c, &mut self.dirbuf)
                    .map_err(|e| cerr("remove", self.dst_path(Some(&c)), e))?;
            }
        }
        Ok(())
    }

    /// A whiteout (character device 0:0) named `name` in the destination directory of `d`.
    fn put_whiteout(
        &mut self,
        d: &DirCtx<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<(), CopyError> {
        let now = match lstat_at(dst, name) {
            Ok(m) if sqlite::is_whiteout(&m) => return Ok(()),
            Ok(m) => Some(m),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(cerr("lstat", self.dst_path(Some(name)), e)),
        };
        let direct = now.is_none() && d.fresh;
        let (tmp, ()) = self
            .create_entry(d, dst, direct.then_some(name), |dir, n| {
                rfs::mknodat(dir, n, FileType::CharacterDevice, Mode::empty(), 0)
            })
            .map_err(|e| cerr("mknod (a whiteout)", self.dst_path(Some(name)), e))?;
        self.stats.deleted += 1;
        if !direct {
            let exchange = now.is_some_and(|m| m.kind == FileType::Directory);
            self.commit(d, tmp, name, exchange);
        }
        Ok(())
    }

    /// Whether the destination's `dm` already holds the database `name` as the source has it
    /// now (see [`sqlite::stamp`]), with the same metadata and the companions as a copy has
    /// them (none; whiteouts in an upper layer).
    fn database_unchanged(
        &mut self,
        d: &DirCtx<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        dm: &Meta,
    ) -> bool {
        let stamp = sqlite::stamp(d.src, name, sm);
        if !sqlite::matches(&stamp, dm)
            || sm.perm != dm.perm
            || !matches!(self.policy.ids.change(sm, dm), (None, None))
        {
            return false;
        }
        let layer = self.databases.as_ref().is_some_and(|db| db.layer);
        let companions_right =
            COMPANIONS
                .iter()
                .all(|s| match lstat_at(dst, &sqlite::companion(name, s)) {
                    Err(Errno::NOENT) => !layer,
                    Ok(m) => layer && sqlite::is_whiteout(&m),
                    Err(_) => false,
                });
        if !companions_right {
            return false;
        }
        let xattrs = |dir: BorrowedFd<'_>| {
            rfs::openat(dir, name, crate::fsio::FILE_FLAGS, Mode::empty())
                .and_then(|fd| read_xattrs(XRef::Fd(fd.as_fd()), wanted_xattr))
        };
        match (xattrs(d.src), xattrs(dst)) {
            (Ok(a), Ok(b)) => self.policy.xattrs_equal(&a, &b),
            _ => false,
        }
    }
}

/// Whether the walk would copy this regular file (not unchanged by its ctime, not equal by the
/// quick check).
fn to_copy(p: &Probe) -> bool {
    match (&p.src, &p.dst) {
        (_, DstProbe::Unchanged) => false,
        (Ok(sm), DstProbe::Stat(Ok(dm))) => !quick_equal(sm, dm),
        (_, DstProbe::Stat(Err(e))) => *e == Errno::NOENT,
        _ => true,
    }
}
