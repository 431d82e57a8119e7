//! Deleting asd's own big trees (the RAM copy, the start clone, the overlay's leftovers) with
//! many unlinks in flight.
//!
//! Unsync ends by deleting the RAM copy and the start clone. On disk, unlinking an entry of the
//! start clone reads its inode (to drop its link count), and after hours of a session those
//! inodes are rarely cached: one unlink after another waits on one disk read after another,
//! which made the deletion cost three times the write-back itself. Threads that each empty a
//! different directory keep many of those reads in flight, as the copy threads do for reads at
//! sync (a 20,000-file clone, cold: 0.33 s with one `rm -rf`, 0.19 s with 16 in parallel).
//!
//! Two phases, so that no directory is removed while a thread may still be emptying it:
//! 1. threads take directories from a shared queue, unlink every non-directory in them and
//!    queue the subdirectories they find;
//! 2. once every thread is idle, only directories are left, and one walk removes them
//!    (deepest first, [`fsio::remove_tree`]), from the cache.
//!
//! Never follows a symlink: directories are opened with `O_NOFOLLOW` relative to their
//! parent's descriptor, and a symlink is unlinked like any file. Bounded: a fixed number of
//! threads and at most [`MAX_QUEUED`] directories (descriptors) waiting; beyond that a thread
//! deletes a subdirectory itself, depth first.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::fsio::{self, fstat, list_dir, open_dir_at, remove_tree};
use crate::treequeue::TreeQueue;

/// Threads deleting on a disk. On a cold disk more unlinks in flight finish sooner (each reads
/// an inode); beyond this a 20,000-file clone gained nothing here (4: 0.29 s, 16: 0.27 s,
/// 64: 0.25 s, `rm -rf`: 0.53 s), since what is left is the file system's own CPU work.
const DISK_THREADS: usize = 16;
/// Directories (each an open descriptor) waiting for a thread.
const MAX_QUEUED: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[error("remove {}: {source}", path.display())]
pub struct RemoveError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path, e: Errno) -> RemoveError {
    RemoveError {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Removes everything inside the directory `path`, keeping `path` itself. A missing `path` is
/// nothing to do; a `path` that is not a directory (a symlink put there included) is refused.
/// Returns the number of entries removed.
pub fn empty(path: &Path) -> Result<u64, RemoveError> {
    let dir = match rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(0),
        Err(e @ (Errno::NOTDIR | Errno::LOOP)) => return Err(err(path, e)),
        Err(e) => return Err(err(path, e)),
    };
    let mut removed = unlink_files(dir, path)?;
    // Phase 2: only directories are left.
    let dir = rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(path, e))?;
    let mut buf = Vec::new();
    for name in list_dir(dir.as_fd(), &mut buf).map_err(|e| err(path, e))? {
        removed += remove_tree(dir.as_fd(), &name, &mut buf).map_err(|e| err(path, e))?;
    }
    Ok(removed)
}

/// Removes `path` and everything in it (not following a symlink at `path`: a symlink there is
/// removed itself). A missing `path` is nothing to do.
pub fn tree(path: &Path) -> Result<u64, RemoveError> {
    match rfs::unlink(path) {
        Ok(()) => return Ok(1),
        Err(Errno::NOENT) => return Ok(0),
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(err(path, e)),
    }
    let removed = empty(path)?;
    match rfs::rmdir(path) {
        Ok(()) | Err(Errno::NOENT) => Ok(removed + 1),
        Err(e) => Err(err(path, e)),
    }
}

/// tmpfs unlinks wait on nothing but the CPU: more threads than CPUs only contend (and the
/// start clone on disk is usually deleted at the same time).
fn threads_for(dir: BorrowedFd<'_>) -> usize {
    let in_ram = rfs::fstatfs(dir).is_ok_and(|s| s.f_type == TMPFS_MAGIC);
    if in_ram {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(DISK_THREADS))
    } else {
        DISK_THREADS
    }
}

const TMPFS_MAGIC: rustix::fs::FsWord = 0x0102_1994;

struct Shared {
    queue: TreeQueue<OwnedFd>,
    /// Entries removed, and the first error (which stops the others).
    result: Mutex<(u64, Option<Errno>)>,
}

/// Phase 1: every non-directory below `root` unlinked, by up to [`DISK_THREADS`] threads.
fn unlink_files(root: OwnedFd, path: &Path) -> Result<u64, RemoveError> {
    let threads = threads_for(root.as_fd());
    let shared = Shared {
        queue: TreeQueue::new(vec![root]),
        result: Mutex::new((0, None)),
    };
    std::thread::scope(|s| {
        let mut started = 0;
        for i in 0..threads {
            let sh = &shared;
            let spawned = std::thread::Builder::new()
                .name(format!("asd-remove-{i}"))
                .spawn_scoped(s, move || worker(sh));
            if spawned.is_ok() {
                started += 1;
            }
        }
        // Not even one thread: this one does the work.
        if started == 0 {
            worker(&shared);
        }
    });
    let (removed, failed) = shared
        .result
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match failed {
        Some(e) => Err(err(path, e)),
        None => Ok(removed),
    }
}

fn worker(sh: &Shared) {
    let mut buf = Vec::new();
    while let Some(dir) = sh.queue.take() {
        let mut found = Vec::new();
        let result = empty_files(dir.as_fd(), &mut buf, &mut found, sh);
        let failed = {
            let mut r = sh
                .result
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match result {
                Ok(n) => r.0 += n,
                Err(e) => {
                    r.1.get_or_insert(e);
                }
            }
            r.1.is_some()
        };
        // Stopped first, so that no thread takes one more directory after an error.
        if failed {
            sh.queue.stop();
        }
        sh.queue.done(found);
    }
}

/// Unlinks the non-directories in `dir`; subdirectories go to `found` (or, with the queue full,
/// are deleted here whole).
fn empty_files(
    dir: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    found: &mut Vec<OwnedFd>,
    sh: &Shared,
) -> rustix::io::Result<u64> {
    // Our own directory without write or search permission is opened up first, as
    // `fsio::remove_tree` does (overlayfs leaves its work dir at mode 0000).
    let m = fstat(dir)?;
    if m.perm & 0o300 != 0o300 {
        rfs::fchmod(dir, fsio::mode(m.perm | 0o700))?;
    }
    let mut removed = 0;
    for name in list_dir(dir, buf)? {
        match rfs::unlinkat(dir, &name, AtFlags::empty()) {
            Ok(()) => removed += 1,
            Err(Errno::NOENT) => {}
            Err(Errno::ISDIR | Errno::PERM) => removed += subdir(dir, &name, buf, found, sh)?,
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

fn subdir(
    dir: BorrowedFd<'_>,
    name: &CStr,
    buf: &mut Vec<u8>,
    found: &mut Vec<OwnedFd>,
    sh: &Shared,
) -> rustix::io::Result<u64> {
    let queued = sh.queue.queued();
    if queued + found.len() >= MAX_QUEUED {
        return remove_tree(dir, name, buf);
    }
    match open_dir_at(dir, name) {
        Ok(fd) => found.push(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn tree_of(root: &Path, dirs: usize, files: usize) {
        for d in 0..dirs {
            let p = root.join(format!("d{}", d % 7)).join(format!("e{d}"));
            fs::create_dir_all(&p).unwrap();
            for f in 0..files {
                fs::write(p.join(format!("f{f}")), b"x").unwrap();
            }
        }
    }

    #[test]
    fn empties_a_tree_and_keeps_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        tree_of(&root, 40, 30);
        fs::write(root.join("top"), b"y").unwrap();
        // 40 leaf dirs + 7 middle dirs + 1200 files + 1 top file.
        assert_eq!(empty(&root).unwrap(), 40 + 7 + 1200 + 1);
        assert!(root.is_dir());
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn never_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        let root = t.path().join("r");
        fs::create_dir_all(root.join("a")).unwrap();
        symlink(&outside, root.join("a/link")).unwrap();
        symlink(&outside, t.path().join("rootlink")).unwrap();
        // A symlink at the root is refused, not followed.
        assert!(empty(&t.path().join("rootlink")).is_err());
        assert_eq!(tree(&root).unwrap(), 3);
        assert!(!root.exists());
        assert!(outside.join("keep").exists());
        // `tree` of a symlink removes the link only.
        assert_eq!(tree(&t.path().join("rootlink")).unwrap(), 1);
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn opens_up_our_own_locked_directories() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        tree_of(&root, 3, 2);
        let locked = root.join("d0/e0");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(root.join("d1"), fs::Permissions::from_mode(0o500)).unwrap();
        tree(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn a_missing_path_is_nothing_to_do() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(empty(&t.path().join("none")).unwrap(), 0);
        assert_eq!(tree(&t.path().join("none")).unwrap(), 0);
    }

    #[test]
    fn wide_trees_stay_within_the_queue_bound() {
        // More directories at one level than MAX_QUEUED: the rest are deleted in place.
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        for d in 0..(MAX_QUEUED + 50) {
            fs::create_dir_all(root.join(format!("w{d}/x"))).unwrap();
            fs::write(root.join(format!("w{d}/x/f")), b"z").unwrap();
        }
        let n = (MAX_QUEUED + 50) as u64 * 3;
        assert_eq!(empty(&root).unwrap(), n);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    }
}
