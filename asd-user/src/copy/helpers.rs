//! Small path and directory helpers shared by every walker of the copy engine (the engine
//! itself, the prefetch and scout threads, the tree utilities and the cloner).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, RawDir};

use crate::fsio::{fstat, DIR_FLAGS};

use super::{cerr, CopyError};

// ---------------------------------------------------------------------------------------------
// Small helpers shared by every walker in this module (the fd-relative primitives it shares with
// the overlay path are in [`crate::fsio`]).

pub(super) fn join_rel(root: &Path, rel: &[u8], name: Option<&CStr>) -> PathBuf {
    let mut p = root.to_path_buf();
    if !rel.is_empty() {
        p.push(OsStr::from_bytes(rel));
    }
    if let Some(n) = name {
        p.push(OsStr::from_bytes(n.to_bytes()));
    }
    p
}

pub(super) fn push_rel(rel: &mut Vec<u8>, name: &CStr) -> usize {
    let len = rel.len();
    if !rel.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name.to_bytes());
    len
}

pub(super) fn open_root(path: &Path) -> Result<OwnedFd, CopyError> {
    rfs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| cerr("open", path.to_path_buf(), e))
}

/// [`list_dir`](crate::fsio::list_dir) with each entry's type as the directory itself records
/// it (`d_type`), which costs no inode read; [`FileType::Unknown`] where the filesystem does
/// not record it.
pub(super) fn list_dir_typed(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<HashMap<CString, FileType>> {
    if buf.capacity() < 64 * 1024 {
        buf.reserve(64 * 1024);
    }
    let mut names = HashMap::new();
    let mut iter = RawDir::new(fd, buf.spare_capacity_mut());
    while let Some(entry) = iter.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.insert(name.to_owned(), entry.file_type());
        }
    }
    Ok(names)
}

/// Whether directory `dir` lies below the directory identified by `(dev, ino)`, found by
/// walking up through `..`.
pub(super) fn is_below(dir: BorrowedFd<'_>, ancestor: (u64, u64)) -> bool {
    let Ok(mut prev) = fstat(dir) else {
        return false;
    };
    let Ok(mut cur) = rfs::openat(dir, c"..", DIR_FLAGS, Mode::empty()) else {
        return false;
    };
    for _ in 0..4096 {
        let Ok(m) = fstat(cur.as_fd()) else {
            return false;
        };
        if (m.dev, m.ino) == ancestor {
            return true;
        }
        if (m.dev, m.ino) == (prev.dev, prev.ino) {
            // "/" is its own parent.
            return false;
        }
        prev = m;
        match rfs::openat(&cur, c"..", DIR_FLAGS, Mode::empty()) {
            Ok(fd) => cur = fd,
            Err(_) => return false,
        }
    }
    false
}
