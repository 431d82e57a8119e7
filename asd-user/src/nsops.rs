//! Namespace operations in a target's parent directory (create, rename, remove entries by name),
//! done by the manager itself: they read no user data, and the parent may be writable only by
//! root (e.g. `/srv` for `/srv/http`). Everything is relative to an opened parent descriptor and
//! never follows a symlink. A per-user manager that may not write such a parent asks the root
//! helper (`MakeBeside`, `RenameBeside`, `RemoveBeside`), which does exactly these steps for
//! asd's own names beside a target of the caller's, after polkit allowed the target.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use asd_protocol::client::{Client, ClientError};
use asd_protocol::EntryKind;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::mount::open_dir;
use crate::state::Owner;

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct NsError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(rustix::io::Errno) -> NsError + 'a {
    move |e| NsError {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn parent_and_name(path: &Path) -> Result<(OwnedFd, &OsStr), NsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(NsError {
            op: "split",
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    let fd = open_dir(parent).map_err(|e| NsError {
        op: "open parent of",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok((fd, name))
}

/// Whether a failed step in a parent may be done by the helper instead: the manager is not root
/// and was not allowed to write there.
fn helper_may_help(e: Errno) -> bool {
    matches!(e, Errno::ACCESS | Errno::PERM) && !rustix::process::geteuid().is_root()
}

/// The target an entry of asd's belongs to: `.NAME-backup_asd...` beside `NAME` (or `.NAME`,
/// whose entries have the same names: a leading dot is not doubled).
fn target_of(entry: &Path) -> Option<PathBuf> {
    let name = entry.file_name()?.to_str()?;
    let at = name.rfind("-backup_asd")?;
    let dotted = &name[..at];
    let plain = dotted.strip_prefix('.')?;
    let parent = entry.parent()?;
    let candidates = [parent.join(plain), parent.join(dotted)];
    let found = candidates.iter().find(|c| c.is_dir()).cloned();
    Some(found.unwrap_or_else(|| parent.join(plain)))
}

/// Runs one step through the helper for `entry`; `e` is what the manager's own attempt got.
fn via_helper(
    entry: &Path,
    op: &'static str,
    e: Errno,
    step: impl FnOnce(&mut Client, &Path, &str) -> Result<(), ClientError>,
) -> Result<(), NsError> {
    let fail = |source: std::io::Error| NsError {
        op,
        path: entry.to_path_buf(),
        source,
    };
    let (Some(target), Some(name)) = (target_of(entry), entry.file_name().and_then(OsStr::to_str))
    else {
        return Err(fail(e.into()));
    };
    tracing::debug!(
        "{op} {}: not allowed to the manager ({e}); asking the helper",
        entry.display()
    );
    let socket = asd_protocol::socket_path();
    let mut client = Client::connect(&socket).map_err(|c| {
        fail(std::io::Error::other(format!(
            "{e}, and the asd helper that does this for a parent only root may write cannot be reached ({c})"
        )))
    })?;
    step(&mut client, &target, name)
        .map_err(|c| fail(std::io::Error::other(format!("the asd helper: {c}"))))
}

fn chown_fd(fd: &OwnedFd, owner: &Owner, path: &Path) -> Result<(), NsError> {
    if rustix::process::geteuid().as_raw() == owner.uid {
        return Ok(());
    }
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
    )
    .map_err(err("chown", path))
}

/// Create the directory `path` (0700, given to `owner`); it must not exist.
pub fn mkdir_owned(path: &Path, owner: &Owner) -> Result<(), NsError> {
    let (parent, name) = parent_and_name(path)?;
    match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(e) if helper_may_help(e) => via_helper(path, "mkdir", e, |c, t, n| {
            c.make_beside(t, n, EntryKind::Dir)
        })?,
        Err(e) => return Err(err("mkdir", path)(e)),
    }
    let fd = rustix::fs::openat(
        &parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open", path))?;
    // The name could have been swapped for another directory between mkdir and open: give
    // away only the empty directory we just made.
    let st = rustix::fs::fstat(&fd).map_err(err("stat", path))?;
    let empty = mountfd::dir_is_empty(&fd).unwrap_or(false);
    if st.st_uid != rustix::process::geteuid().as_raw() || !empty {
        return Err(NsError {
            op: "check new directory",
            path: path.to_path_buf(),
            source: std::io::Error::other("replaced while it was being created; try again"),
        });
    }
    chown_fd(&fd, owner, path)
}

/// Create the new file `path` (0600, given to `owner`) and return it open for writing.
pub fn create_owned_file(path: &Path, owner: &Owner) -> Result<File, NsError> {
    let (parent, name) = parent_and_name(path)?;
    let fd = match rustix::fs::openat(
        &parent,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(e) if helper_may_help(e) => {
            via_helper(path, "create", e, |c, t, n| {
                c.make_beside(t, n, EntryKind::File)
            })?;
            // The helper made it empty and ours: open it and check that it still is.
            let fd = rustix::fs::openat(
                &parent,
                name,
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(err("open", path))?;
            let st = rustix::fs::fstat(&fd).map_err(err("stat", path))?;
            let regular = rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::RegularFile;
            if !regular || st.st_uid != owner.uid || st.st_size != 0 || st.st_nlink != 1 {
                return Err(NsError {
                    op: "check new file",
                    path: path.to_path_buf(),
                    source: std::io::Error::other("replaced after it was created; try again"),
                });
            }
            fd
        }
        Err(e) => return Err(err("create", path)(e)),
    };
    chown_fd(&fd, owner, path)?;
    Ok(File::from(fd))
}

/// Rename within one directory, then make the rename durable.
pub fn rename(from: &Path, to: &Path) -> Result<(), NsError> {
    let (parent, from_name) = parent_and_name(from)?;
    let to_name = to.file_name().unwrap_or_default();
    match rustix::fs::renameat(&parent, from_name, &parent, to_name) {
        Ok(()) => sync_dir(&parent, from),
        // The helper's rename is durable when it answers.
        Err(e) if helper_may_help(e) => {
            let to_name = to_name.to_str().unwrap_or_default();
            via_helper(from, "rename", e, |c, t, n| c.rename_beside(t, n, to_name))
        }
        Err(e) => Err(err("rename", from)(e)),
    }
}

fn sync_dir(fd: &OwnedFd, path: &Path) -> Result<(), NsError> {
    let dir = rustix::fs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open", path))?;
    rustix::fs::fsync(&dir).map_err(err("fsync", path))
}

/// Remove an empty directory; a missing one is fine.
pub fn rmdir(path: &Path) -> Result<(), NsError> {
    let (parent, name) = parent_and_name(path)?;
    match rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) if helper_may_help(e) => {
            via_helper(path, "rmdir", e, |c, t, n| c.remove_beside(t, n))
        }
        Err(e) => Err(err("rmdir", path)(e)),
    }
}

/// Remove a file (never a directory, never through a symlink); a missing one is fine.
pub fn unlink(path: &Path) -> Result<(), NsError> {
    let (parent, name) = parent_and_name(path)?;
    match rustix::fs::unlinkat(&parent, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) if helper_may_help(e) => {
            via_helper(path, "remove", e, |c, t, n| c.remove_beside(t, n))
        }
        Err(e) => Err(err("remove", path)(e)),
    }
}

pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Remove overlayfs's own `work/work` directory (root's, mode 0000, holding root's temporary
/// whiteouts) when root mounted the overlay: the owner cannot. Only entries that root made in a
/// directory only root can write are touched, so nothing the owner placed there can be.
pub fn remove_overlay_workdir(work: &Path) -> Result<(), NsError> {
    // Only root's own overlays leave a root-owned work/work; a user's (made by the helper with
    // the user's credentials) is the user's, and the owner's removal opens it up itself.
    if rustix::process::geteuid().as_raw() != 0 {
        return Ok(());
    }
    let inner = work.join("work");
    let fd = match mountfd::open_dir_to_read(&inner) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(err("open", &inner)(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(err("stat", &inner))?;
    if st.st_uid != 0 {
        return Ok(());
    }
    let dup = rustix::io::dup(&fd).map_err(err("dup", &inner))?;
    let mut dir = rustix::fs::Dir::new(dup).map_err(err("opendir", &inner))?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(err("readdir", &inner))?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    for name in names {
        match rustix::fs::unlinkat(&fd, name.as_c_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::ISDIR) => {
                let _ = rustix::fs::unlinkat(&fd, name.as_c_str(), AtFlags::REMOVEDIR);
            }
            Err(e) => return Err(err("remove", &inner)(e)),
        }
    }
    drop(fd);
    rmdir(&inner)
}
