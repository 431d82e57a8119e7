//! Tree utilities outside a sync: a generic no-follow walk, and on top of it removal of
//! temporary leftovers, finding hard-linked files and measuring a tree's size.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode};
use rustix::io::Errno;
use tracing::debug;

use crate::fsio::{fstat, is_temp_name, list_dir, lstat_at, remove_tree, Meta, DIR_FLAGS};

use super::helpers::open_root;
use super::prefetch::Prefetch;
use super::{cerr, CopyError};

// ---------------------------------------------------------------------------------------------
// Tree utilities.

/// Called by [`walk`] with the parent directory, the entry's path, name and lstat.
type Visitor<'v> = dyn FnMut(BorrowedFd<'_>, &Path, &CStr, &Meta) -> Result<Visit, CopyError> + 'v;

pub(super) enum Visit {
    Descend,
    Skip,
    Stop,
}

/// Walks the tree below `dir` (whose path is `path`) without following symlinks, calling
/// `visit` with the parent directory, the entry's path, name and lstat. Entries that vanish
/// during the walk are skipped. Returns false when `visit` asked to stop.
pub(super) fn walk(
    dir: BorrowedFd<'_>,
    path: &mut PathBuf,
    buf: &mut Vec<u8>,
    visit: &mut Visitor<'_>,
) -> Result<bool, CopyError> {
    let names = list_dir(dir, buf).map_err(|e| cerr("readdir", path.clone(), e))?;
    for name in names {
        path.push(OsStr::from_bytes(name.to_bytes()));
        let res = walk_entry(dir, path, &name, buf, visit);
        path.pop();
        if !res? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn walk_entry(
    dir: BorrowedFd<'_>,
    path: &mut PathBuf,
    name: &CStr,
    buf: &mut Vec<u8>,
    visit: &mut Visitor<'_>,
) -> Result<bool, CopyError> {
    let m = match lstat_at(dir, name) {
        Ok(m) => m,
        Err(Errno::NOENT) => return Ok(true),
        Err(e) => return Err(cerr("lstat", path.clone(), e)),
    };
    match visit(dir, path, name, &m)? {
        Visit::Stop => Ok(false),
        Visit::Skip => Ok(true),
        Visit::Descend if m.kind != FileType::Directory => Ok(true),
        Visit::Descend => {
            let sub = match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Ok(true),
                Err(e) => return Err(cerr("open", path.clone(), e)),
            };
            walk(sub.as_fd(), path, buf, visit)
        }
    }
}

/// Removes leftovers of interrupted copies below `root`: every entry whose name starts with
/// [`TEMP_PREFIX`](super::TEMP_PREFIX). Besides regular files these are symlinks, fifos and
/// whole directories that were being built under a temporary name (all of them copies of data
/// the source still has). Returns the number of entries removed (a leftover directory counts
/// once).
pub fn remove_temp_files(root: &Path) -> Result<u64, CopyError> {
    let fd = open_root(root)?;
    let mut count = 0;
    let mut inner_buf = Vec::new();
    let mut visit = |dir: BorrowedFd<'_>, path: &Path, name: &CStr, m: &Meta| {
        if !is_temp_name(name) {
            return Ok(Visit::Descend);
        }
        match remove_tree(dir, name, &mut inner_buf) {
            Ok(n) => {
                debug!(?path, kind = ?m.kind, "removed temporary leftover");
                count += u64::from(n > 0);
                Ok(Visit::Skip)
            }
            Err(e) => Err(cerr("remove", path.to_path_buf(), e)),
        }
    };
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut visit,
    )?;
    Ok(count)
}

/// Regular files below `root` with more than one hard link, at most `limit` of them.
pub fn find_hardlinked_files(
    root: &Path,
    asd_clones: &[PathBuf],
    limit: usize,
) -> Result<Vec<PathBuf>, CopyError> {
    let fd = open_root(root)?;
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    // Links into asd's own start clone (whole, half-built, or half-deleted after a crash) are
    // not the user's hard links: subtract them, so a crash during sync or unsync never turns
    // into a refusal at the next start.
    let mut in_clones: HashMap<(u64, u64), u64> = HashMap::new();
    for clone in asd_clones {
        let cfd = match open_root(clone) {
            Ok(fd) => fd,
            Err(CopyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        };
        let mut count = |_: BorrowedFd<'_>, _: &Path, _: &CStr, m: &Meta| {
            if m.kind == FileType::RegularFile && m.nlink > 1 {
                *in_clones.entry((m.dev, m.ino)).or_default() += 1;
            }
            Ok(Visit::Descend)
        };
        walk(
            cfd.as_fd(),
            &mut clone.to_path_buf(),
            &mut Vec::new(),
            &mut count,
        )?;
    }
    let mut visit = |_: BorrowedFd<'_>, path: &Path, _: &CStr, m: &Meta| {
        let foreign = m
            .nlink
            .saturating_sub(in_clones.get(&(m.dev, m.ino)).copied().unwrap_or(0));
        if m.kind == FileType::RegularFile && foreign > 1 {
            found.push(path.to_path_buf());
            if found.len() >= limit {
                return Ok(Visit::Stop);
            }
        }
        Ok(Visit::Descend)
    };
    // The walk waits on one cold metadata read after another: keep several in flight ahead.
    let walked = Prefetch::around(fd.as_fd(), || {
        walk(
            fd.as_fd(),
            &mut root.to_path_buf(),
            &mut Vec::new(),
            &mut visit,
        )
    });
    walked?;
    Ok(found)
}

/// Apparent size of a tree in bytes, like `du -sb`: the sum of `st_size` of every entry,
/// directories and symlinks included, root included, each hard-linked inode counted once.
/// (Not disk usage: sparse files count their full size, small files no block rounding.)
pub fn tree_size(root: &Path) -> Result<u64, CopyError> {
    let fd = open_root(root)?;
    let rm = fstat(fd.as_fd()).map_err(|e| cerr("stat", root.to_path_buf(), e))?;
    let mut total = rm.size;
    let mut seen = HashSet::new();
    let mut visit = |_: BorrowedFd<'_>, _: &Path, _: &CStr, m: &Meta| {
        if m.kind == FileType::Directory || m.nlink <= 1 || seen.insert((m.dev, m.ino)) {
            total += m.size;
        }
        Ok(Visit::Descend)
    };
    walk(
        fd.as_fd(),
        &mut root.to_path_buf(),
        &mut Vec::new(),
        &mut visit,
    )?;
    Ok(total)
}
