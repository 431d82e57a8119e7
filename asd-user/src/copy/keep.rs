//! The start state kept while write-backs change the disk (copy mode with backups on).
//!
//! A crash must leave the state the target had when asd started (DESIGN.md §3, `-old`), for the
//! crash-recovery snapshot. asd 6.0 keeps it as a hard-linked clone of the whole tree, which costs
//! a link per file at sync and an unlink per file at unsync, however little changed. Here the
//! clone starts as a list of the start directories (see [`super::start_clone`]) and is filled
//! in copy-on-write: before a durable write-back replaces
//! or deletes an entry that was there at the start, it copies that entry into the same place in
//! the clone (making the directories it needs there, with the start's metadata from
//! [`super::start_dirs`]). A copy, not a link: write-backs go into the backup mount, and link(2) and
//! rename(2) do not cross mounts. copy_file_range shares the blocks where the filesystem can
//! (btrfs, xfs); ext4 copies the bytes: the cost follows what changed, once per start entry.
//!
//! Order (see `durable.rs`): every copy is made under a temporary name before phase 2; its
//! syncfs makes them durable (the clone's filesystem is synced too where it is another one);
//! [`Keeper::commit`] renames them to their names and syncs again; only then is any start
//! entry replaced or deleted. So each start entry that could be kept is whole in the tree, or
//! in the clone, or both, at every instant.
//!
//! Best effort: a start entry that cannot be kept (no space left, a clone made unwritable, a
//! device node the owner may not make) is replaced or deleted all the same, with a warning that
//! names it. The user's newest data goes to disk first; the start state is a safety net for a
//! crash, and holding the data back in RAM to protect it would trade the one for the other.
//!
//! "There at the start": a directory listed in [`super::start_dirs`]; another entry if it is born
//! (statx) by the start, the clone root's birth, in a listed directory. The sync waits for the
//! inode clock to pass the start before it returns, so whatever is written after is born
//! later; should an entry of the tree be born later already (the clock was set back before the
//! sync), the start clone is a full one instead. Should the clock be set back during the
//! session, entries written then look born by the start: their first replacement is kept too
//! (the snapshot may then show a newer version of such a file, never lose one). The start state
//! is then: the clone's entries, plus the tree's entries born by the start that the
//! clone lacks (see `crate::snapshot`). A full hard-linked clone (asd 6.0's, or one made where
//! the filesystem records no birth times) holds every start entry already: nothing is copied.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, RenameFlags, Timestamps};
use rustix::io::Errno;
use tracing::warn;

use crate::copy::Timestamp;
use crate::fsio::{
    btime_at, fstat, inode_clock_now, keep_crash_point, list_dir, lstat_at, mode, remove_entry,
    Meta, DIR_FLAGS, FILE_FLAGS,
};

use super::engine::Engine;
use super::file::{FileCopier, CREATE_FLAGS};
use super::helpers::{join_rel, open_root};
use super::policy::Policy;
use super::pool::COPY_THREADS;
use super::start_dirs::{self, StartDirs};
use super::{cerr, CopyError, TEMP_PREFIX};

/// The start clone of one write-back's destination.
pub(crate) struct Keeper {
    path: PathBuf,
    start: Timestamp,
    /// The clone's filesystem.
    dev: u64,
    /// The start directories' metadata (see [`super::start_dirs`]), read when first needed;
    /// empty for a clone without a list (a full one).
    start_dirs: Option<StartDirs>,
    root: OwnedFd,
    /// Directories of the clone looked at so far, by their path relative to its root.
    dirs: HashMap<Vec<u8>, KeptDir>,
    /// How many of them hold an open descriptor.
    open: usize,
    /// Copies made under a temporary name: (directory, temporary name, name).
    pending: Vec<(Vec<u8>, CString, CString)>,
    policy: Arc<Policy>,
    /// Regular files to copy, by [`Keeper::copy_files`].
    files_to_copy: Vec<FileToCopy>,
    /// Files that could not be kept.
    failed: Vec<CopyError>,
    buf: Vec<u8>,
    /// Temporary names: unique to this write-back (a daemon runs many in one process).
    tmp_stem: String,
    seq: u64,
    /// Start entries copied into the clone by this write-back.
    pub(super) kept: u64,
}

/// Regular files queued at most, each holding two descriptors.
const MAX_QUEUED: usize = 64;
/// Clone directories kept open at most (besides the root): a write-back stays well below the
/// usual limit of 1024 descriptors (the engine's own directories included), however many
/// directories a deleted start subtree has.
const MAX_OPEN_DIRS: usize = 128;

/// A regular file to keep: `name` of `src` to `tmp` in `kept` (the clone's directory `rel`).
struct FileToCopy {
    rel: Vec<u8>,
    src: OwnedFd,
    name: CString,
    kept: OwnedFd,
    tmp: CString,
}

/// Whether a file was copied (false: it is gone), or the operation that failed.
type CopyResult = Result<bool, (&'static str, Errno)>;

/// Copies one file to keep. Ok(false): it is gone, or no longer a regular file.
fn copy_file(copier: &mut FileCopier, job: &FileToCopy) -> CopyResult {
    let from = match rfs::openat(&job.src, &job.name, FILE_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) | Err(Errno::LOOP) => return Ok(false),
        Err(e) => return Err(("open", e)),
    };
    let m = fstat(from.as_fd()).map_err(|e| ("stat", e))?;
    if m.kind != FileType::RegularFile {
        return Ok(false);
    }
    let out =
        rfs::openat(&job.kept, &job.tmp, CREATE_FLAGS, mode(0o600)).map_err(|e| ("create", e))?;
    copier
        .write(&from, &out, &m)
        .map_err(|(op, _, e)| (op, e))?;
    Ok(true)
}

struct KeptDir {
    /// Open while used; closed beyond [`MAX_OPEN_DIRS`], reopened by path when needed again.
    fd: Option<OwnedFd>,
    /// Its times at the start, set again at the end if entries were added.
    times: Timestamps,
    touched: bool,
}

/// `rel` split into its parent and last component.
fn split_rel(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[][..], rel),
    }
}

fn child_rel(rel: &[u8], name: &CStr) -> Vec<u8> {
    let mut sub = rel.to_vec();
    if !sub.is_empty() {
        sub.push(b'/');
    }
    sub.extend_from_slice(name.to_bytes());
    sub
}

impl Keeper {
    /// The clone at `path`, or None where there is nothing to keep: its filesystem records no
    /// birth times, so it was made as a full clone.
    pub(super) fn open(path: &Path, policy: Arc<Policy>) -> Result<Option<Keeper>, CopyError> {
        let root = open_root(path)?;
        let Some(start) = btime_at(root.as_fd(), c"").map_err(|e| cerr("statx", path.into(), e))?
        else {
            return Ok(None);
        };
        if inode_clock_now() < start {
            warn!(
                clone = ?path,
                "the clock is behind the start clone's birth (set back?): files written now look \
                 like start files, and a crash-recovery snapshot may show their newer versions"
            );
        }
        let rm = fstat(root.as_fd()).map_err(|e| cerr("stat", path.into(), e))?;
        let mut dirs = HashMap::new();
        dirs.insert(
            Vec::new(),
            KeptDir {
                fd: None,
                times: rm.times(),
                touched: false,
            },
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(Some(Keeper {
            path: path.to_path_buf(),
            start,
            dev: rm.dev,
            start_dirs: None,
            root,
            dirs,
            open: 0,
            pending: Vec::new(),
            policy,
            files_to_copy: Vec::new(),
            failed: Vec::new(),
            buf: Vec::new(),
            tmp_stem: format!("{TEMP_PREFIX}keep.{}.{nanos}", std::process::id()),
            seq: 0,
            kept: 0,
        }))
    }

    /// The clone's root directory.
    pub(super) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn at(&self, rel: &[u8], name: Option<&CStr>) -> PathBuf {
        join_rel(&self.path, rel, name)
    }

    fn start_dirs(&mut self) -> Result<&StartDirs, CopyError> {
        if self.start_dirs.is_none() {
            // A damaged list (said once): start directories are then told by birth time.
            let list = start_dirs::read(self.root.as_fd()).unwrap_or_else(|e| {
                let list = self
                    .path
                    .join(OsStr::from_bytes(start_dirs::NAME.to_bytes()));
                warn!(
                    "{}: {e}; telling start directories by birth time",
                    list.display()
                );
                StartDirs::new()
            });
            self.start_dirs = Some(list);
        }
        Ok(self.start_dirs.get_or_insert_with(StartDirs::new))
    }

    /// Born by the start (None: it is gone). An entry without a birth time counts as such.
    fn born_by_start(&self, dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Option<bool>> {
        match btime_at(dir, name) {
            Ok(b) => Ok(Some(b.is_none_or(|b| b <= self.start))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The clone's directory `rel` if it has one.
    fn dir(&mut self, rel: &[u8]) -> Result<Option<BorrowedFd<'_>>, CopyError> {
        if rel.is_empty() {
            return Ok(Some(self.root.as_fd()));
        }
        if self.dirs.get(rel).is_none_or(|d| d.fd.is_none()) {
            let fd = match Engine::open_rel(self.root.as_fd(), rel) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Ok(None),
                Err(e) => return Err(cerr("open", self.at(rel, None), e)),
            };
            self.remember(rel, fd, None)?;
        }
        Ok(self
            .dirs
            .get(rel)
            .and_then(|d| d.fd.as_ref())
            .map(|fd| fd.as_fd()))
    }

    /// Records the clone's directory `rel`, open as `fd`, with `times` to set at the end (or
    /// its own, the first time it is seen); closes the others first beyond [`MAX_OPEN_DIRS`].
    fn remember(
        &mut self,
        rel: &[u8],
        fd: OwnedFd,
        times: Option<Timestamps>,
    ) -> Result<(), CopyError> {
        if self.open >= MAX_OPEN_DIRS {
            for d in self.dirs.values_mut() {
                d.fd = None;
            }
            self.open = 0;
        }
        let times = match (times, self.dirs.get(rel)) {
            (Some(t), _) => t,
            (None, Some(d)) => d.times.clone(),
            (None, None) => fstat(fd.as_fd())
                .map_err(|e| cerr("stat", self.at(rel, None), e))?
                .times(),
        };
        let touched = self.dirs.get(rel).is_some_and(|d| d.touched);
        self.dirs.insert(
            rel.to_vec(),
            KeptDir {
                fd: Some(fd),
                times,
                touched,
            },
        );
        self.open += 1;
        Ok(())
    }

    fn touch(&mut self, rel: &[u8]) {
        if let Some(d) = self.dirs.get_mut(rel) {
            d.touched = true;
        }
    }

    /// The clone's directory `rel`, made where missing (and its parents), like the start
    /// directory (or the tree's directory `like`). Ok(false): the clone has a non-directory on
    /// the way (a start file where the tree has a directory now), so nothing below is the
    /// start's.
    fn ensure_dir(&mut self, rel: &[u8], like: BorrowedFd<'_>) -> Result<bool, CopyError> {
        if self.dir(rel)?.is_some() {
            return Ok(true);
        }
        if rel.is_empty() {
            return Err(cerr("open", self.path.clone(), Errno::NOENT));
        }
        let (parent_rel, _) = split_rel(rel);
        if self.dir(parent_rel)?.is_none() {
            let up = rfs::openat(like, c"..", DIR_FLAGS, Mode::empty())
                .map_err(|e| cerr("open", self.at(parent_rel, None), e))?;
            if !self.ensure_dir(parent_rel, up.as_fd())? {
                return Ok(false);
            }
        }
        self.make_dir(rel, like)
    }

    /// Makes the clone's directory `rel` (whose parent it has). Always writable by the owner
    /// (the snapshot takes a listed directory's mode from the list); owner and times are the
    /// start directory's, or `like`'s.
    fn make_dir(&mut self, rel: &[u8], like: BorrowedFd<'_>) -> Result<bool, CopyError> {
        let (parent_rel, name) = split_rel(rel);
        let name =
            CString::new(name).map_err(|_| cerr("mkdir", self.at(rel, None), Errno::INVAL))?;
        let mut m = fstat(like).map_err(|e| cerr("stat", self.at(rel, None), e))?;
        let listed = match self.start_dirs()?.get(rel) {
            Some(d) => {
                (m.uid, m.gid, m.atime, m.mtime) = (d.uid, d.gid, d.atime, d.mtime);
                true
            }
            None => false,
        };
        let Some(parent) = self.dir(parent_rel)? else {
            return Err(cerr("mkdir", self.at(rel, None), Errno::NOENT));
        };
        match rfs::mkdirat(parent, &name, mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(cerr("mkdir", self.at(rel, None), e)),
        }
        let made = match rfs::openat(parent, &name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Ok(false),
            Err(e) => return Err(cerr("open", self.at(rel, None), e)),
        };
        self.touch(parent_rel);
        let now = fstat(made.as_fd()).map_err(|e| cerr("stat", self.at(rel, None), e))?;
        let (uid, gid) = self.policy.ids.change(&m, &now);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(&made, uid, gid);
            self.policy
                .chown_result(r)
                .map_err(|e| cerr("chown", self.at(rel, None), e))?;
        }
        // Unlisted (a full clone's): its mode, writable for what is kept in it.
        let perm = if listed { 0o700 } else { m.perm | 0o700 };
        rfs::fchmod(&made, mode(perm)).map_err(|e| cerr("chmod", self.at(rel, None), e))?;
        self.remember(rel, made, Some(m.times()))?;
        // Its times are the start directory's, set at the end.
        self.touch(rel);
        Ok(true)
    }

    /// Before the entry `name` of the destination directory `dir` (at `rel`) is replaced or
    /// deleted: whatever of it was there at the start and the clone lacks is copied there,
    /// under temporary names until [`Keeper::commit`] (regular files by [`Keeper::copy_files`]).
    /// A directory is kept entry by entry.
    pub(super) fn keep(
        &mut self,
        rel: &[u8],
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<(), CopyError> {
        let sm = match lstat_at(dir, name) {
            Ok(m) => m,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(cerr("lstat", self.at(rel, Some(name)), e)),
        };
        let listed = !self.start_dirs()?.is_empty();
        if sm.kind == FileType::Directory {
            let sub_rel = child_rel(rel, name);
            let started = if listed {
                self.start_dirs()?.contains_key(&sub_rel)
            } else {
                self.born_by_start(dir, name)
                    .map_err(|e| cerr("statx", self.at(rel, Some(name)), e))?
                    .unwrap_or(false)
            };
            // A directory born since holds no start entries, unless the clone has one of that
            // name (the start's, replaced by a file and back).
            if !started && self.dir(&sub_rel)?.is_none() {
                return Ok(());
            }
            let sub = match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Ok(()),
                Err(e) => return Err(cerr("open", self.at(rel, Some(name)), e)),
            };
            if !self.ensure_dir(&sub_rel, sub.as_fd())? {
                return Ok(());
            }
            let mut buf = std::mem::take(&mut self.buf);
            let names = list_dir(sub.as_fd(), &mut buf);
            self.buf = buf;
            let names = names.map_err(|e| cerr("readdir", self.at(&sub_rel, None), e))?;
            for child in names {
                // One child that cannot be kept does not stop its siblings.
                if let Err(e) = self.keep(&sub_rel, sub.as_fd(), &child) {
                    self.failed.push(e);
                }
            }
            return Ok(());
        }
        let started = self
            .born_by_start(dir, name)
            .map_err(|e| cerr("statx", self.at(rel, Some(name)), e))?
            .unwrap_or(false);
        // In a directory that was not there at the start, nothing was (the clock was set back).
        if !started || (listed && !self.start_dirs()?.contains_key(rel)) {
            return Ok(());
        }
        if !self.ensure_dir(rel, dir)? {
            return Ok(());
        }
        let kept = match self.dir(rel)? {
            Some(fd) => fd
                .try_clone_to_owned()
                .map_err(|e| cerr("dup", self.at(rel, None), e))?,
            None => return Ok(()),
        };
        match lstat_at(kept.as_fd(), name) {
            // Kept already (by an earlier write-back, or a full clone).
            Ok(_) => return Ok(()),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(cerr("lstat", self.at(rel, Some(name)), e)),
        }
        self.seq += 1;
        let tmp = CString::new(format!("{}.{}", self.tmp_stem, self.seq))
            .map_err(|_| cerr("keep", self.at(rel, Some(name)), Errno::INVAL))?;
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| cerr("dup", self.at(rel, None), e))
        };
        if sm.kind == FileType::RegularFile {
            let src = dup(dir)?;
            self.files_to_copy.push(FileToCopy {
                rel: rel.to_vec(),
                src,
                name: name.to_owned(),
                kept,
                tmp,
            });
            if self.files_to_copy.len() >= MAX_QUEUED {
                self.copy_files();
            }
            return Ok(());
        }
        match self.copy_node(dir, name, &sm, kept.as_fd(), &tmp) {
            Ok(true) => {
                self.pending.push((rel.to_vec(), tmp, name.to_owned()));
                Ok(())
            }
            // Gone meanwhile: nothing to keep.
            Ok(false) => Ok(()),
            // The owner may not make device nodes: the RAM copy has none either (see
            // `write.rs`), and the node on disk goes with a warning.
            Err(("mknod", Errno::PERM))
                if matches!(sm.kind, FileType::CharacterDevice | FileType::BlockDevice) =>
            {
                warn!(path = ?self.at(rel, Some(name)), "device node not kept: not permitted");
                Ok(())
            }
            Err((op, e)) => {
                let _ = rfs::unlinkat(kept.as_fd(), &tmp, AtFlags::empty());
                Err(cerr(op, self.at(rel, Some(name)), e))
            }
        }
    }

    /// Copies the regular files queued by [`Keeper::keep`], many at a time: each reads a start
    /// version from a disk whose cache is likely cold. Failures wait in `failed`.
    pub(super) fn copy_files(&mut self) {
        let jobs = std::mem::take(&mut self.files_to_copy);
        if jobs.is_empty() {
            return;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = COPY_THREADS.min(jobs.len());
        let results: Vec<(usize, CopyResult)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (jobs, next) = (&jobs, &next);
                    let mut copier = FileCopier::new(Arc::clone(&self.policy));
                    s.spawn(move || {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(job) = jobs.get(i) else {
                                return out;
                            };
                            out.push((i, copy_file(&mut copier, job)));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                // A worker that panicked (a bug) leaves its files unreported: failed below.
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let mut done = vec![false; jobs.len()];
        for (i, r) in results {
            done[i] = true;
            let job = &jobs[i];
            match r {
                Ok(true) => self
                    .pending
                    .push((job.rel.clone(), job.tmp.clone(), job.name.clone())),
                Ok(false) => {}
                Err((op, e)) => {
                    let _ = rfs::unlinkat(&job.kept, &job.tmp, AtFlags::empty());
                    let err = cerr(op, self.at(&job.rel, Some(&job.name)), e);
                    self.failed.push(err);
                }
            }
        }
        for (job, _) in jobs.iter().zip(&done).filter(|(_, d)| !**d) {
            let _ = rfs::unlinkat(&job.kept, &job.tmp, AtFlags::empty());
            let err = cerr("copy", self.at(&job.rel, Some(&job.name)), Errno::IO);
            self.failed.push(err);
        }
    }

    /// What could not be kept, so far.
    pub(super) fn take_failed(&mut self) -> Vec<CopyError> {
        std::mem::take(&mut self.failed)
    }

    /// A copy of the symlink or node `name` of `dir` as `tmp` in `kept`, with its metadata.
    /// Ok(false): it is gone.
    fn copy_node(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        kept: BorrowedFd<'_>,
        tmp: &CStr,
    ) -> Result<bool, (&'static str, Errno)> {
        if sm.kind == FileType::Symlink {
            let target = match rfs::readlinkat(dir, name, Vec::new()) {
                Ok(t) => t,
                Err(Errno::NOENT) | Err(Errno::INVAL) => return Ok(false),
                Err(e) => return Err(("readlink", e)),
            };
            rfs::symlinkat(target.as_c_str(), kept, tmp).map_err(|e| ("symlink", e))?;
            self.node_meta(kept, tmp, sm, true)?;
        } else {
            rfs::mknodat(kept, tmp, sm.kind, mode(sm.perm & 0o777), sm.rdev)
                .map_err(|e| ("mknod", e))?;
            self.node_meta(kept, tmp, sm, false)?;
        }
        Ok(true)
    }

    fn node_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
        symlink: bool,
    ) -> Result<(), (&'static str, Errno)> {
        let now = lstat_at(dir, name).map_err(|e| ("lstat", e))?;
        let (uid, gid) = self.policy.ids.change(sm, &now);
        if uid.is_some() || gid.is_some() {
            let r = rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
            self.policy.chown_result(r).map_err(|e| ("chown", e))?;
        }
        if !symlink {
            rfs::chmodat(dir, name, mode(sm.perm), AtFlags::empty()).map_err(|e| ("chmod", e))?;
        }
        rfs::utimensat(dir, name, &sm.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ("utimens", e))
    }

    /// Whether copies wait for [`Keeper::commit`].
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.dirs.values().any(|d| d.touched)
    }

    /// After the copies are durable on the filesystems in `synced` (the caller's syncfs; the
    /// clone's is synced here if it is another): each under its name, the times of the clone's
    /// directories set back, and all of it durable. A copy that cannot be renamed is left under
    /// its temporary name (which the snapshot ignores) and reported.
    pub(super) fn commit(&mut self, synced: &[u64]) -> Result<(), CopyError> {
        if !synced.contains(&self.dev) {
            rfs::syncfs(&self.root).map_err(|e| cerr("syncfs", self.path.clone(), e))?;
        }
        let crash_at = keep_crash_point();
        for (n, (rel, tmp, name)) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            if crash_at == Some(n) {
                // Fault injection for the crash tests: die like kill -9, mid-commit.
                std::process::abort();
            }
            let kept = match self.dir(&rel) {
                Ok(Some(fd)) => fd.try_clone_to_owned(),
                Ok(None) => {
                    let err = cerr("open", join_rel(&self.path, &rel, None), Errno::NOENT);
                    self.failed.push(err);
                    continue;
                }
                Err(e) => {
                    self.failed.push(e);
                    continue;
                }
            };
            let kept = match kept {
                Ok(fd) => fd,
                Err(e) => {
                    self.failed
                        .push(cerr("dup", join_rel(&self.path, &rel, None), e));
                    continue;
                }
            };
            let kept = kept.as_fd();
            let mut r = rfs::renameat_with(kept, &tmp, kept, &name, RenameFlags::NOREPLACE);
            if r == Err(Errno::INVAL) {
                // A filesystem without RENAME_NOREPLACE: the name is checked first instead
                // (nothing else writes to the clone meanwhile).
                r = match lstat_at(kept, &name) {
                    Ok(_) => Err(Errno::EXIST),
                    Err(_) => rfs::renameat(kept, &tmp, kept, &name),
                };
            }
            let removed = match r {
                Ok(()) => None,
                // Kept by then under its name: the copy is not needed.
                Err(Errno::EXIST) => Some(remove_entry(kept, &tmp, &mut self.buf)),
                Err(e) => {
                    let err = cerr("rename", join_rel(&self.path, &rel, Some(&name)), e);
                    self.failed.push(err);
                    continue;
                }
            };
            if removed.is_none() {
                self.touch(&rel);
                self.kept += 1;
            }
        }
        let touched: Vec<(Vec<u8>, Timestamps)> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.touched)
            .map(|(rel, d)| (rel.clone(), d.times.clone()))
            .collect();
        for (rel, times) in touched {
            let set = match self.dir(&rel) {
                Ok(Some(fd)) => rfs::futimens(fd, &times),
                Ok(None) => Err(Errno::NOENT),
                Err(e) => {
                    self.failed.push(e);
                    continue;
                }
            };
            if let Err(e) = set {
                self.failed
                    .push(cerr("utimens", join_rel(&self.path, &rel, None), e));
            }
            if let Some(d) = self.dirs.get_mut(&rel) {
                d.touched = false;
            }
        }
        let root = self.root.as_fd();
        rfs::syncfs(root).map_err(|e| cerr("syncfs", self.path.clone(), e))
    }
}
