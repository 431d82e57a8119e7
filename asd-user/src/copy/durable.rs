//! Durable mode, phases 2 to 5 (see the module documentation): the deferred renames,
//! deletions and directory metadata the walk queued, and the `syncfs` calls between them.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, Mode};
use rustix::io::Errno;

use crate::fsio::{crash_point, is_temp_name, remove_entry, remove_tree, Meta, Xattrs, DIR_FLAGS};

use super::engine::Engine;
use super::helpers::join_rel;
use super::renames::{rename_batch, PlainRename, MIN_BATCH};
use super::{cerr, CopyError};

pub(super) struct RenameJob {
    pub(super) dir: usize,
    pub(super) from: CString,
    pub(super) to: CString,
    /// A directory and a non-directory trade places.
    pub(super) exchange: bool,
}

/// A destination directory with deferred operations.
pub(super) struct DeferredDir {
    pub(super) rel: Vec<u8>,
    pub(super) fd: Option<OwnedFd>,
}

pub(super) struct DirJob {
    pub(super) dir: usize,
    pub(super) meta: Meta,
    pub(super) xattrs: Xattrs,
    /// Made by this run: setting its metadata is not counted as an update.
    pub(super) created: bool,
}

/// Whether no two renames of `jobs` put something at the same name (an overlay's upper layer
/// can get two for one name): those keep their order, one at a time.
fn distinct(jobs: &[RenameJob]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(jobs.len());
    jobs.iter().all(|j| seen.insert((j.dir, j.to.as_c_str())))
}

/// Start entries that could not be kept (see `super::keep`): said, never fatal.
fn warn_not_kept(failed: Vec<CopyError>) {
    for e in failed {
        tracing::warn!(
            "{e}: its start version is not kept; a crash-recovery snapshot would lack it"
        );
    }
}

impl Engine<'_> {
    // -- durable mode: phases 2 to 5 ------------------------------------------------------------

    fn syncfs_all(&mut self) -> Result<(), CopyError> {
        for (_, fd) in &self.sync_fds {
            rfs::syncfs(fd).map_err(|e| cerr("syncfs", self.dst_root.to_path_buf(), e))?;
        }
        Ok(())
    }

    /// Opens the destination directory `rel` (relative to `root`) one component at a time,
    /// never following a symlink.
    pub(super) fn open_rel(root: BorrowedFd<'_>, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
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

    pub(super) fn durable_phases(&mut self, root: BorrowedFd<'_>) -> Result<(), CopyError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        let path = |dirs: &[DeferredDir], i: usize, name: Option<&CStr>| {
            let rel = dirs.get(i).map(|d| d.rel.as_slice()).unwrap_or_default();
            join_rel(self.dst_root, rel, name)
        };
        let renames = std::mem::take(&mut self.renames);
        let early = std::mem::take(&mut self.early_deletions);
        let mut deletions = std::mem::take(&mut self.deletions);
        // The start clone (see `super::keep`): a copy of every start entry about to be
        // replaced or deleted, durable under its name before any is. Best effort: one that
        // cannot be kept is replaced or deleted all the same, with a warning.
        let mut keeper = self.keeper.take();
        if let Some(k) = keeper.as_mut() {
            let doomed = renames.iter().map(|j| (j.dir, &j.to));
            let doomed = doomed.chain(early.iter().chain(&deletions).map(|(i, n)| (*i, n)));
            let doomed: Vec<(usize, &CString)> = doomed.collect();
            let mut failed = Vec::new();
            for (i, name) in doomed {
                let rel = dirs.get(i).map(|d| d.rel.clone()).unwrap_or_default();
                let Some(dir) = self.deferred_dir(root, &mut dirs, i) else {
                    continue;
                };
                if let Err(e) = k.keep(&rel, dir, name) {
                    failed.push(e);
                }
            }
            k.copy_files();
            failed.extend(k.take_failed());
            warn_not_kept(failed);
        }
        // The scout warmed what the keeper just looked at; nothing left for it to do.
        if let Some(s) = self.scout.take() {
            s.stop();
        }
        let keeping = keeper.as_ref().is_some_and(|k| k.has_pending());
        // Phase 2: all temporary data durable before any rename.
        if !renames.is_empty() || keeping {
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
        if let Some(k) = keeper.as_mut().filter(|_| keeping) {
            let synced: Vec<u64> = self.sync_fds.iter().map(|(dev, _)| *dev).collect();
            if let Err(e) = k.commit(&synced) {
                warn_not_kept(vec![e]);
            }
            warn_not_kept(k.take_failed());
        }
        // Done with the clone: its descriptors close before the renames and deletions.
        if let Some(k) = keeper.take().filter(|k| k.kept > 0) {
            tracing::debug!(kept = k.kept, "start entries kept in the start clone");
        }
        // Between phases 2 and 3: the destination's logs of databases about to be replaced
        // (see `super::databases`), durably gone before the new copies are renamed in.
        let mut removed = 0;
        for (i, name) in &early {
            let Some(dir) = self.deferred_dir(root, &mut dirs, *i) else {
                continue;
            };
            match remove_entry(dir, name, &mut self.dirbuf) {
                Ok(n) => removed += n,
                Err(e) => {
                    let p = path(&dirs, *i, Some(name));
                    self.fail(cerr("remove", p, e));
                }
            }
        }
        if removed > 0 {
            self.stats.deleted += removed;
            self.syncfs_all()?;
        }
        // Phase 3: renames. Runs of plain ones many at once (see `super::renames`), exchanges
        // one at a time, in order.
        let crash_at = crash_point();
        let mut n = 0;
        while n < renames.len() {
            let plain = renames[n..].iter().take_while(|j| !j.exchange).count();
            if plain >= MIN_BATCH && distinct(&renames[n..n + plain]) {
                self.rename_plain_batch(root, &mut dirs, &renames[n..n + plain], n, crash_at);
                n += plain;
                continue;
            }
            let job = &renames[n];
            if crash_at == Some(n) {
                // Fault injection for the crash tests: die like kill -9, mid-rename.
                std::process::abort();
            }
            n += 1;
            let Some(dir) = self.deferred_dir(root, &mut dirs, job.dir) else {
                continue;
            };
            match self.rename_into_place(dir, &job.from, &job.to, job.exchange) {
                Ok(Some(old)) => deletions.push((job.dir, old)),
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
        // Phase 5: directory metadata, bottom-up.
        self.apply_dir_jobs(root, &mut dirs);
        drop(dirs);
        self.syncfs_all()
    }

    /// Phase 3's plain renames of `batch` (the `first`th onwards), many at once: every
    /// directory opened first, then the renames; a failed one is reported and its temporary
    /// removed, as one at a time.
    fn rename_plain_batch(
        &mut self,
        root: BorrowedFd<'_>,
        dirs: &mut [DeferredDir],
        batch: &[RenameJob],
        first: usize,
        crash_at: Option<usize>,
    ) {
        // Fault injection for the crash tests: exactly the renames before the crash point are
        // done, then die like kill -9.
        let crash = crash_at
            .and_then(|c| c.checked_sub(first))
            .filter(|c| *c < batch.len());
        let batch = &batch[..crash.unwrap_or(batch.len())];
        for job in batch {
            // A directory that cannot be opened is reported here; its renames are skipped.
            let _ = self.deferred_dir(root, dirs, job.dir);
        }
        let (jobs, plain): (Vec<&RenameJob>, Vec<PlainRename<'_>>) = batch
            .iter()
            .filter_map(|job| {
                let dir = dirs.get(job.dir)?.fd.as_ref()?.as_fd();
                Some((
                    job,
                    PlainRename {
                        dir,
                        from: &job.from,
                        to: &job.to,
                    },
                ))
            })
            .unzip();
        let failed: Vec<(usize, CString, CString, Errno)> = rename_batch(&plain)
            .into_iter()
            .filter_map(|(i, e)| {
                let job = jobs.get(i)?;
                Some((job.dir, job.from.clone(), job.to.clone(), e))
            })
            .collect();
        drop(plain);
        for (i, from, to, e) in failed {
            if let Some(dir) = self.deferred_dir(root, dirs, i) {
                let _ = remove_tree(dir, &from, &mut self.dirbuf);
            }
            let rel = dirs.get(i).map(|d| d.rel.as_slice()).unwrap_or_default();
            self.fail(cerr("rename", join_rel(self.dst_root, rel, Some(&to)), e));
        }
        if crash.is_some() {
            std::process::abort();
        }
    }

    /// Sets the metadata of the directories in `dir_jobs`, in the order they were queued: the
    /// walk queues them in post-order, so children before parents (bottom-up).
    pub(super) fn apply_dir_jobs(&mut self, root: BorrowedFd<'_>, dirs: &mut [DeferredDir]) {
        let jobs = std::mem::take(&mut self.dir_jobs);
        for job in &jobs {
            let Some(dir) = self.deferred_dir(root, dirs, job.dir) else {
                continue;
            };
            match self.apply_dir_meta(dir, &job.meta, &job.xattrs) {
                Ok(true) if !job.created => self.stats.metadata_updated += 1,
                Ok(_) => {}
                Err(e) => {
                    let rel = dirs
                        .get(job.dir)
                        .map(|d| d.rel.as_slice())
                        .unwrap_or_default();
                    self.fail(cerr("set metadata", join_rel(self.dst_root, rel, None), e));
                }
            }
        }
    }
}
