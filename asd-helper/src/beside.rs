//! `MakeBeside`, `RenameBeside`, `RemoveBeside`: the entries asd keeps next to a target (start
//! clone, overlay change set, crash-recovery snapshots), made, renamed and removed for a caller
//! who may not write the target's parent (`/srv/alice` under a root-owned `/srv`, allowed by
//! polkit). Only asd's own names for that one target, only in a parent that root owns and nobody
//! else may write, only entries of the caller's; everything made is the caller's. The parent is
//! reached as the caller (no symlinks), so the helper reaches nothing the caller could not; only
//! the one rename or remove in it runs with root's file system identity, and the one create with
//! the caller's and `CAP_DAC_OVERRIDE` (so that what is made is the caller's from the start).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use asd_protocol::{EntryKind, ServiceError};
use rustix::fs::{AtFlags, Mode as FsMode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::ops::{lookup_err, open_with_parent, sys_err};
use crate::paths::{self, display};
use crate::sys::{self, FsCreds};

const SNAPSHOT_INFIX: &str = "-crashrecovery-";
const SNAPSHOT_EXT: &str = ".tar.zstd";

/// Whether `name` is one of asd's entries beside `target`: `.NAME-backup_asd` followed by
/// `-old`, `-old.partial` or `-changes` (each also with `.asd-trash`, what a cleanup renames
/// aside), or `-crashrecovery-YYYYMMDD_HHMMSS[_N].tar.zstd[.partial]`. Never the backup dir
/// itself (the helper's mount point) and never anything with a `/` or a NUL.
pub fn is_asd_name(target: &Path, name: &str) -> bool {
    let Some(base) = paths::backup_name(target) else {
        return false;
    };
    let Some(rest) = name.strip_prefix(&*base.to_string_lossy()) else {
        return false;
    };
    if name.contains(['/', '\0']) || base.to_str().is_none() {
        return false;
    }
    let plain = rest.strip_suffix(".asd-trash").unwrap_or(rest);
    if matches!(plain, "-old" | "-old.partial" | "-changes") {
        return true;
    }
    let Some(snap) = rest.strip_prefix(SNAPSHOT_INFIX) else {
        return false;
    };
    let snap = snap.strip_suffix(".partial").unwrap_or(snap);
    let Some(stamp) = snap.strip_suffix(SNAPSHOT_EXT) else {
        return false;
    };
    let b = stamp.as_bytes();
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    b.len() >= 15
        && digits(&b[..8])
        && b[8] == b'_'
        && digits(&b[9..15])
        && (b.len() == 15 || (b[15] == b'_' && b.len() <= 22 && digits(&b[16..])))
}

/// The target's parent, opened as the caller without following symlinks, after checking that
/// the target is a directory of the caller's (it may be covered: only names in the parent are
/// touched) and that the parent is root's and writable by nobody else (elsewhere the caller
/// either can do this alone, or others could swap entries under the helper).
fn open_parent(creds: &FsCreds, target: &Path) -> Result<OwnedFd, ServiceError> {
    let (parent, _, st) = open_with_parent(target)?;
    let parent_path = target.parent().unwrap_or(Path::new("/"));
    if !sys::is_dir(&st) {
        return Err(ServiceError::NotADirectory {
            path: display(target),
        });
    }
    if st.st_uid != creds.uid {
        return Err(ServiceError::NotOwner {
            path: display(target),
        });
    }
    let pst = sys::fstat(&parent).map_err(|e| sys_err("stat", parent_path, e))?;
    if pst.st_uid != 0 || pst.st_mode & 0o022 != 0 {
        return Err(ServiceError::PermissionDenied {
            path: display(parent_path),
        });
    }
    refuse_shared_names(creds, &parent, target)?;
    Ok(parent)
}

/// `X` and `.X` have the same names beside them (a leading dot is not doubled, as in asd 6.0):
/// when the other spelling exists and is not the caller's, those names are someone else's too,
/// and the helper makes, binds or removes none of them for the caller.
pub fn refuse_shared_names(
    creds: &FsCreds,
    parent: &OwnedFd,
    target: &Path,
) -> Result<(), ServiceError> {
    let Some(name) = target.file_name().and_then(OsStr::to_str) else {
        return Ok(());
    };
    let other = match name.strip_prefix('.') {
        Some(plain) => plain.to_string(),
        None => format!(".{name}"),
    };
    if other.is_empty() || other == "." || other == ".." {
        return Ok(());
    }
    match rustix::fs::statat(parent, other.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_uid != creds.uid => Err(ServiceError::BackupInUse {
            path: display(&target.with_file_name(&other)),
            reason: format!(
                "shares asd's names with {} (a leading dot is not doubled) and is not yours",
                display(target)
            ),
        }),
        _ => Ok(()),
    }
}

fn checked_name<'a>(target: &Path, name: &'a str) -> Result<&'a OsStr, ServiceError> {
    if is_asd_name(target, name) {
        Ok(OsStr::new(name))
    } else {
        Err(ServiceError::InvalidPath {
            path: name.to_string(),
            reason: "not one of asd's names beside this target".into(),
        })
    }
}

/// An entry of the parent, not followed if a symlink, that belongs to the caller.
fn callers_entry(
    creds: &FsCreds,
    parent: &OwnedFd,
    name: &OsStr,
    path: &Path,
) -> Result<rustix::fs::Stat, ServiceError> {
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| lookup_err(path, e))?;
    if st.st_uid != creds.uid {
        return Err(ServiceError::NotOwner {
            path: display(path),
        });
    }
    Ok(st)
}

fn root<T>(creds: &FsCreds, f: impl FnOnce() -> Result<T, Errno>) -> Result<T, (Errno, bool)> {
    match creds.as_root(f) {
        Ok(r) => r.map_err(|e| (e, false)),
        Err(_) => Err((Errno::PERM, true)),
    }
}

fn fsync_dir(creds: &FsCreds, parent: &OwnedFd, path: &Path) -> Result<(), ServiceError> {
    let synced = root(creds, || {
        let dir = rustix::fs::openat(
            parent,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FsMode::empty(),
        )?;
        rustix::fs::fsync(&dir)
    });
    synced.map_err(|(e, _)| sys_err("fsync", path, e))
}

pub fn make(
    creds: &FsCreds,
    target: &Path,
    name: &str,
    kind: EntryKind,
) -> Result<(), ServiceError> {
    let n = checked_name(target, name)?;
    let parent = open_parent(creds, target)?;
    let path = target.with_file_name(n);
    let gid = Some(rustix::fs::Gid::from_raw(creds.gid));
    // Made with the caller's identity, so it is the caller's from the start; only the one
    // create gets past the parent's permissions (root's, writable by nobody else: see
    // open_parent).
    let create = || match kind {
        EntryKind::Dir => {
            crate::caps::with_dac_override(|| {
                rustix::fs::mkdirat(&parent, n, FsMode::from_raw_mode(0o700))
            })?;
            rustix::fs::openat(
                &parent,
                n,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                FsMode::empty(),
            )
        }
        EntryKind::File => crate::caps::with_dac_override(|| {
            rustix::fs::openat(
                &parent,
                n,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                FsMode::from_raw_mode(0o600),
            )
        }),
    };
    let made = create().map_err(|e| (e, false)).and_then(|fd| {
        // The caller's own group, also under a set-group-id parent; then durable. Never leave
        // a half-made entry under asd's name.
        let handed = rustix::fs::fchown(&fd, None, gid).and_then(|()| rustix::fs::fsync(&fd));
        if handed.is_err() {
            let flags = match kind {
                EntryKind::Dir => AtFlags::REMOVEDIR,
                EntryKind::File => AtFlags::empty(),
            };
            let _ = root(creds, || rustix::fs::unlinkat(&parent, n, flags));
        }
        handed.map_err(|e| (e, false))
    });
    made.map_err(|(e, _)| match e {
        Errno::EXIST => ServiceError::BackupInUse {
            path: display(&path),
            reason: "exists already".into(),
        },
        e => sys_err("create", &path, e),
    })?;
    fsync_dir(creds, &parent, &path)
}

pub fn rename(creds: &FsCreds, target: &Path, from: &str, to: &str) -> Result<(), ServiceError> {
    let (f, t) = (checked_name(target, from)?, checked_name(target, to)?);
    let parent = open_parent(creds, target)?;
    let path = target.with_file_name(f);
    callers_entry(creds, &parent, f, &path)?;
    root(creds, || {
        rustix::fs::renameat_with(&parent, f, &parent, t, RenameFlags::NOREPLACE)
    })
    .map_err(|(e, _)| sys_err("rename", &path, e))?;
    fsync_dir(creds, &parent, &path)
}

pub fn remove(creds: &FsCreds, target: &Path, name: &str) -> Result<(), ServiceError> {
    let n = checked_name(target, name)?;
    let parent = open_parent(creds, target)?;
    let path = target.with_file_name(n);
    let st = match callers_entry(creds, &parent, n, &path) {
        Err(ServiceError::NotFound { .. }) => return Ok(()),
        r => r?,
    };
    // A directory only when empty (the kernel checks); a symlink or device never: asd makes
    // neither here.
    let flags = if sys::is_dir(&st) {
        AtFlags::REMOVEDIR
    } else if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile {
        AtFlags::empty()
    } else {
        return Err(ServiceError::InvalidPath {
            path: display(&path),
            reason: "neither a file nor a directory".into(),
        });
    };
    match root(creds, || rustix::fs::unlinkat(&parent, n, flags)) {
        Ok(()) | Err((Errno::NOENT, false)) => {}
        Err((e, _)) => return Err(sys_err("remove", &path, e)),
    }
    fsync_dir(creds, &parent, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asds_names_for_that_target() {
        let t = Path::new("/srv/web");
        for ok in [
            ".web-backup_asd-old",
            ".web-backup_asd-old.partial",
            ".web-backup_asd-old.asd-trash",
            ".web-backup_asd-old.partial.asd-trash",
            ".web-backup_asd-changes",
            ".web-backup_asd-changes.asd-trash",
            ".web-backup_asd-crashrecovery-20261204_051500.tar.zstd",
            ".web-backup_asd-crashrecovery-20261204_051500_3.tar.zstd",
            ".web-backup_asd-crashrecovery-20261204_051500.tar.zstd.partial",
        ] {
            assert!(is_asd_name(t, ok), "{ok}");
        }
        for bad in [
            ".web-backup_asd",
            ".web-backup_asd-old/../../etc",
            ".web-backup_asd-older",
            ".web-backup_asd-crashrecovery-2026_x.tar.zstd",
            ".web-backup_asd-crashrecovery-20261204_051500.tar.zstd.asd-trash",
            ".web-backup_asd-crashrecovery-20261204_051500_.tar.zstd",
            ".other-backup_asd-old",
            "web",
            "..",
            "",
            ".web-backup_asd-old\0",
        ] {
            assert!(!is_asd_name(t, bad), "{bad:?}");
        }
        assert!(is_asd_name(
            Path::new("/srv/.hidden"),
            ".hidden-backup_asd-old"
        ));
        // Found by the property tests: a target with a NUL (refused by `normalized` before any
        // call gets here) lent the NUL to the names beside it.
        assert!(!is_asd_name(Path::new("a\0b"), ".a\0b-backup_asd-old"));
        assert!(!is_asd_name(Path::new("/a\0b"), ".a\0b-backup_asd-old"));
    }
}
