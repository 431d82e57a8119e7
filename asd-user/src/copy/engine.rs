//! The sync engine's state ([`Engine`]) and the directory pair it walks ([`DirCtx`]): setting
//! up and running a sync, and the small helpers every part of the engine uses (errors, paths,
//! temporary names, opening destination directories on first use, deferring work).

use std::cell::{Cell, OnceCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, Mode};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::fsio::{fstat, lstat_at, mode, Meta, DIR_FLAGS, MAX_KEPT_DIRS};

use crate::journal::{DirtyTree, Node};

use super::durable::{DeferredDir, DirJob, RenameJob};
use super::file::{Copied, FileCopier};
use super::helpers::{is_below, join_rel, open_root};
use super::policy::Policy;
use super::pool::{Done, JobDir, Pool, COPY_THREADS};
use super::prefetch::{Prefetch, PREFETCH_THREADS};
use super::probe::{Helper, XReader};
use super::scout::Scout;
use super::{cerr, CopyError, CopyOptions, CopyStats, Timestamp, CTIME_MARGIN_MS, TEMP_PREFIX};

// ---------------------------------------------------------------------------------------------
// The sync engine.

/// A pair of directories being synced. Shared (`&DirCtx`) down the walk, so that a directory
/// can open its destination counterpart through its parents on first use.
pub(super) struct DirCtx<'f> {
    pub(super) src: BorrowedFd<'f>,
    /// The destination directory, opened up front or (below an unchanged directory, see
    /// `CopyOptions::changed_since`) only when something in it is to be compared or written.
    pub(super) dst: &'f OnceCell<OwnedFd>,
    /// For opening `dst` on first use: the parent and the name in it (None for the root).
    parent: Option<(&'f DirCtx<'f>, &'f CStr)>,
    /// The destination directory was created (empty) by this run: nothing to list or compare,
    /// entries are created directly under their final names and nothing is deferred (in durable
    /// mode the directory itself is still under a temporary name, renamed as a whole later).
    pub(super) fresh: bool,
    /// The source directory changed since the cutoff (always true without one): its listing is
    /// compared with the destination's, extra entries deleted, its metadata checked. Otherwise
    /// it holds the same names as the destination and only changed entries are looked at.
    pub(super) changed: bool,
    /// Index in `Engine::dirs` once an operation in this directory has been deferred.
    pub(super) idx: Cell<Option<usize>>,
    /// We added owner write permission to the destination directory.
    pub(super) made_writable: Cell<bool>,
    /// Something was created in or removed from the destination directory, which bumps its
    /// mtime: its metadata must be set again even if it did not change in the source.
    pub(super) touched: Cell<bool>,
    /// The pair as the copy threads see it, once a file here was handed to them (None: the
    /// walk copies the files here itself).
    pub(super) job_dir: OnceCell<Option<Arc<JobDir>>>,
    /// Files here were handed to the copy threads: the metadata waits until they finished.
    pub(super) pooled: Cell<bool>,
    /// A journaled run: the journal's node of this directory. Only the names it marks are
    /// looked at. None: everything is (no journal, or a subtree the journal marked whole).
    pub(super) node: Option<&'f Node>,
    /// The destination directory, or one above it, is being built under a temporary name:
    /// its path changes when that is renamed into place.
    pub(super) under_temp_name: bool,
    /// The source directory's inode, where the walk checks a record of directories (see
    /// `Engine::dir_ids`); 0 otherwise.
    pub(super) src_ino: u64,
}

impl<'f> DirCtx<'f> {
    pub(super) fn new(
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
            job_dir: OnceCell::new(),
            pooled: Cell::new(false),
            node: None,
            under_temp_name: false,
            src_ino: 0,
        }
    }

    /// Whether the destination directory's metadata must be compared and set after the walk.
    pub(super) fn needs_meta(&self) -> bool {
        self.changed || self.fresh || self.touched.get() || self.made_writable.get()
    }
}

pub(super) struct Engine<'a> {
    pub(super) opts: &'a CopyOptions,
    src_root: &'a Path,
    pub(super) dst_root: &'a Path,
    /// Path of the current directory relative to the source / destination root (they differ
    /// below a directory being built under a temporary name).
    pub(super) src_rel: Vec<u8>,
    pub(super) dst_rel: Vec<u8>,
    pub(super) stats: CopyStats,
    first_error: Option<CopyError>,
    errors: u64,
    /// What the destination accepts; shared with the copy threads.
    pub(super) policy: Arc<Policy>,
    pid: u32,
    seq: u64,
    pub(super) dst_root_id: (u64, u64),
    /// Deferred work (durable mode): directories by relative path, then what to do in them.
    pub(super) dirs: Vec<DeferredDir>,
    pub(super) renames: Vec<RenameJob>,
    pub(super) deletions: Vec<(usize, CString)>,
    pub(super) dir_jobs: Vec<DirJob>,
    /// One descriptor per destination filesystem, for syncfs.
    pub(super) sync_fds: Vec<(u64, OwnedFd)>,
    pub(super) xr: XReader,
    /// Whether to probe big directories on two threads, and the helper thread doing it.
    pub(super) parallel: bool,
    pub(super) helper: Option<Helper>,
    /// Writes the regular files the walk copies itself.
    pub(super) file: FileCopier,
    /// The copy threads, started on the first file they can take (see [`super::pool`]).
    pub(super) pool: Option<Pool>,
    /// No copy threads for this run (a test hook, durable mode, or they could not start).
    pool_off: bool,
    pub(super) dirbuf: Vec<u8>,
    pub(super) hook: Option<&'a mut dyn FnMut(&Path)>,
    /// Only what this journal marked is compared (see [`super::sync_tree_journaled`]).
    pub(super) journal: Option<&'a DirtyTree>,
    /// With marks from a scan (see [`super::scan`]): the names the scan saw in each directory
    /// whose listing it marked.
    pub(super) scanned: Option<&'a HashMap<Vec<u8>, HashSet<CString>>>,
    /// The record of directories this run is to leave (see `super::dirids`): every source
    /// directory the walk opens is checked to be where it says.
    pub(super) dir_ids: Option<&'a HashSet<u64>>,
    /// `CopyOptions::changed_since` minus the margin, unless ignored: source entries with an
    /// older ctime are unchanged.
    pub(super) cutoff: Option<Timestamp>,
    /// [`CTIME_MARGIN_MS`]; tests set 0 so as not to wait for it.
    pub(super) margin: i64,
    /// Write-backs copy each SQLite database as one consistent state (see [`super::sqlite`]).
    pub(super) databases: Option<Databases>,
    /// Durable mode: destination entries removed after the temporary files are durable and
    /// before any rename (an old log beside a database renamed into place would be replayed
    /// into it).
    pub(super) early_deletions: Vec<(usize, CString)>,
    /// Durable mode into a backup with a start clone: what the write-back replaces or deletes
    /// of the start state is kept there first (see [`super::keep`]).
    pub(super) keeper: Option<super::keep::Keeper>,
    /// Warms the destination (and the start clone) ahead of an incremental comparison; stopped
    /// after the walk, or once the keeper is done with the clone.
    pub(super) scout: Option<Scout>,
}

/// How a write-back treats the SQLite databases it meets (see [`super::databases`]).
pub(super) struct Databases {
    /// The source as the program sees it, if not the source itself: overlay mode's merged
    /// directory (the upper layer's files are other inodes to the kernel's locks).
    pub(super) view: Option<OwnedFd>,
    /// The destination is an upper layer: a database's companions there are whiteouts (hiding
    /// the lower layer's) rather than absent.
    pub(super) layer: bool,
}

/// The ctime from which source entries count as changed since `since` (the time a write-back
/// began): `margin` milliseconds earlier, for the coarse clock inodes are stamped with. None
/// if the clock is earlier than `since` now (set back): then everything is compared.
pub(super) fn cutoff(since: Timestamp, margin: i64) -> Option<Timestamp> {
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
        - i128::from(margin) * 1_000_000;
    Some(Timestamp {
        sec: ns.div_euclid(1_000_000_000) as i64,
        nsec: ns.rem_euclid(1_000_000_000) as i64,
    })
}

impl<'a> Engine<'a> {
    pub(super) fn new(
        src: &'a Path,
        dst: &'a Path,
        opts: &'a CopyOptions,
        hook: Option<&'a mut dyn FnMut(&Path)>,
    ) -> Engine<'a> {
        let policy = Arc::new(Policy::new());
        let pool_off = opts.durable || hook.is_some();
        Engine {
            opts,
            src_root: src,
            dst_root: dst,
            src_rel: Vec::new(),
            dst_rel: Vec::new(),
            stats: CopyStats::default(),
            first_error: None,
            errors: 0,
            policy: Arc::clone(&policy),
            pid: std::process::id(),
            seq: 0,
            dst_root_id: (0, 0),
            dirs: Vec::new(),
            renames: Vec::new(),
            deletions: Vec::new(),
            dir_jobs: Vec::new(),
            sync_fds: Vec::new(),
            xr: XReader::new(),
            parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            helper: None,
            file: FileCopier::new(policy.clone()),
            pool: None,
            pool_off,
            dirbuf: Vec::new(),
            hook,
            journal: None,
            scanned: None,
            dir_ids: None,
            cutoff: None,
            margin: CTIME_MARGIN_MS,
            // Only write-backs: the disk side is never live.
            databases: (opts.durable && super::sqlite::enabled()).then_some(Databases {
                view: None,
                layer: false,
            }),
            early_deletions: Vec::new(),
            keeper: None,
            scout: None,
        }
    }

    pub(super) fn run(mut self) -> Result<CopyStats, CopyError> {
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
        // With a journal its marks decide, and what they mark is compared in full.
        let since = self.opts.changed_since.filter(|_| self.journal.is_none());
        self.cutoff = since.and_then(|since| cutoff(since, self.margin));
        // Only for a full comparison: an incremental one looks at few destination entries.
        // Into RAM (not durable) the source is the disk side whose metadata is cold; the other
        // way round the destination is.
        // A journaled run looks at few entries: no prefetch of whole trees.
        let prefetch = match (
            self.cutoff,
            self.parallel && self.journal.is_none(),
            self.opts.durable,
        ) {
            (None, true, true) => Prefetch::start(dst.as_fd(), PREFETCH_THREADS),
            (None, true, false) => Prefetch::start(src.as_fd(), PREFETCH_THREADS),
            _ => None,
        };
        // An incremental one looks up few destination entries, but each one cold.
        // The keeper looks in the start clone's directories of the same entries next: warmed
        // too, and the scout stops only once it has (see `durable_phases`).
        let clone = self.keeper.as_ref().map(|k| k.root());
        let scout = match (self.cutoff, self.journal) {
            _ if self.hook.is_some() => None,
            (Some(c), _) => Scout::start(src.as_fd(), dst.as_fd(), clone, c),
            (None, Some(marks)) => Scout::start_marked(marks, src.as_fd(), dst.as_fd(), clone),
            (None, None) => None,
        };
        let dst = OnceCell::from(dst);
        let node = self.journal.map(|j| j.root());
        let changed = self.dir_changed(node, &sm);
        let mut root = DirCtx::new(src.as_fd(), &dst, None, false, changed);
        root.node = node.filter(|n| !n.whole());
        root.src_ino = sm.ino;
        // The root itself replaced since the scan: the record is of another tree.
        if self
            .dir_ids
            .is_some_and(|ids| !ids.contains(&super::dirids::fingerprint(sm.ino, 0, b"")))
        {
            self.stats.moved_meanwhile += 1;
        }
        self.sync_dir(&root);
        if let Some(p) = prefetch {
            p.stop();
        }
        match scout {
            Some(s) if self.keeper.is_some() => self.scout = Some(s),
            Some(s) => s.stop(),
            None => {}
        }
        if root.needs_meta() {
            self.finish_dir(&root, &sm);
        }
        if let Some(h) = self.helper.take() {
            h.finish();
        }
        if let Some(pool) = self.pool.take() {
            for done in pool.finish(self.src_root) {
                self.record(done);
            }
            // The metadata of the directories the threads wrote in, bottom-up.
            if let Some(root) = dst.get() {
                let mut dirs = std::mem::take(&mut self.dirs);
                self.apply_dir_jobs(root.as_fd(), &mut dirs);
            }
        }
        if let (true, Some(dst)) = (self.opts.durable, dst.get()) {
            self.durable_phases(dst.as_fd())?;
        }
        if let Some(s) = self.scout.take() {
            s.stop();
        }
        if self.policy.chown_denied() > 0 {
            debug!(
                count = self.policy.chown_denied(),
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

    /// Whether a directory's listing and metadata are to be compared: what its journal node
    /// says, or (no node, or one marked whole) whether it changed since the cutoff.
    pub(super) fn dir_changed(&self, node: Option<&Node>, sm: &Meta) -> bool {
        // Called once per directory walked: a good moment to publish progress.
        self.publish_progress();
        match node {
            Some(n) if !n.whole() => n.listing() || n.entry(),
            _ => self.changed(sm),
        }
    }

    /// Whether a source entry changed since the cutoff (always, without one).
    pub(super) fn changed(&self, sm: &Meta) -> bool {
        match self.cutoff {
            Some(c) => sm.ctime >= c,
            None => true,
        }
    }

    /// The destination directory of `d`, opened (through its parents, never following a
    /// symlink) if this is its first use.
    pub(super) fn dst_dir<'f>(&mut self, d: &DirCtx<'f>) -> Result<BorrowedFd<'f>, CopyError> {
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

    /// Hands the new file `name` of `d` to the copy threads, if they can take it (see
    /// [`super::pool`]); false when the walk is to copy it itself.
    pub(super) fn hand_to_pool(&mut self, d: &DirCtx<'_>, name: &CStr) -> bool {
        if self.pool_off {
            return false;
        }
        let Some(dir) = self.job_dir(d) else {
            return false;
        };
        if self.pool.is_none() {
            self.pool = Pool::start(&self.policy, COPY_THREADS);
        }
        let Some(pool) = self.pool.as_mut() else {
            self.pool_off = true;
            return false;
        };
        // Before the job: from now on the directory's metadata waits for the threads.
        d.touched.set(true);
        d.pooled.set(true);
        if pool.submit(&dir, name.to_owned()).is_err() {
            self.pool_off = true;
            return false;
        }
        for done in pool.finished() {
            self.record(done);
        }
        true
    }

    /// The directory pair of `d` for the copy threads: made on first use; None where a job
    /// could fail where the walk would not (our own destination directory without write
    /// permission, which the walk opens up first).
    fn job_dir(&mut self, d: &DirCtx<'_>) -> Option<Arc<JobDir>> {
        if let Some(made) = d.job_dir.get() {
            return made.clone();
        }
        let made = self.make_job_dir(d);
        d.job_dir.get_or_init(|| made).clone()
    }

    fn make_job_dir(&mut self, d: &DirCtx<'_>) -> Option<Arc<JobDir>> {
        // Its metadata would be set after the threads finished, reopened by a path that a
        // rename has changed by then: the walk copies the files there itself.
        if d.under_temp_name {
            return None;
        }
        let dst = self.dst_dir(d).ok()?;
        // Even a directory this run made: the umask or a default ACL may have left it without
        // owner write permission (the walk would open it up; a job would fail).
        if !self.policy.ids.privileged {
            let m = fstat(dst).ok()?;
            if m.uid != self.policy.ids.euid || m.perm & 0o300 != 0o300 {
                return None;
            }
        }
        Some(Arc::new(JobDir {
            src: d.src.try_clone_to_owned().ok()?,
            dst: dst.try_clone_to_owned().ok()?,
            src_path: self.src_path(None),
            dst_path: self.dst_path(None),
        }))
    }

    /// Entries done and bytes written so far, for a progress line (see [`crate::progress`];
    /// a no-op unless someone shows progress).
    fn publish_progress(&self) {
        let s = &self.stats;
        crate::progress::publish(
            s.files_copied + s.symlinks_copied + s.unchanged + s.metadata_updated + s.vanished,
            s.bytes_copied,
        );
    }

    /// Counts what a copy thread reported.
    fn record(&mut self, done: Done) {
        self.publish_progress();
        match done {
            Ok(Copied::Bytes(n)) => {
                self.stats.files_copied += 1;
                self.stats.bytes_copied += n;
            }
            Ok(Copied::Vanished) => self.stats.vanished += 1,
            Err(e) => self.fail(e),
        }
    }

    pub(super) fn fail(&mut self, e: CopyError) {
        warn!("{e}");
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    pub(super) fn src_path(&self, name: Option<&CStr>) -> PathBuf {
        join_rel(self.src_root, &self.src_rel, name)
    }

    pub(super) fn dst_path(&self, name: Option<&CStr>) -> PathBuf {
        join_rel(self.dst_root, &self.dst_rel, name)
    }

    pub(super) fn temp_name(&mut self) -> CString {
        // Called for every file a write-back writes (under a temporary name first).
        self.publish_progress();
        self.seq += 1;
        let s = format!("{TEMP_PREFIX}{}.{}", self.pid, self.seq);
        // The name is built from digits and a NUL-free constant.
        CString::new(s).unwrap_or_else(|_| c".#asd-tmp.x".to_owned())
    }

    pub(super) fn note_device(&mut self, dev: u64, fd: BorrowedFd<'_>) {
        if self.sync_fds.iter().any(|(d, _)| *d == dev) {
            return;
        }
        match fd.try_clone_to_owned() {
            Ok(owned) => self.sync_fds.push((dev, owned)),
            Err(e) => self.fail(cerr("dup", self.dst_path(None), e)),
        }
    }

    pub(super) fn dir_idx(&mut self, d: &DirCtx<'_>) -> usize {
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
}
