//! Directories opened without following symlinks.
//!
//! A root process that works in directories a user may write must never be sent elsewhere by a
//! symlink or a rename between its check and its use: it resolves a path once, with `openat2`
//! and `RESOLVE_NO_SYMLINKS` (a symlink in any component, the last one included, gives `ELOOP`)
//! and `RESOLVE_NO_MAGICLINKS`, and from then on works through the descriptor. One entry of an
//! opened directory is opened with `RESOLVE_BENEATH` too, and only a plain name is accepted.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

const NO_LINKS: ResolveFlags = ResolveFlags::NO_SYMLINKS.union(ResolveFlags::NO_MAGICLINKS);

fn open_directory(
    dir: impl AsFd,
    path: &Path,
    access: OFlags,
    resolve: ResolveFlags,
) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        path,
        // No O_NOFOLLOW: with O_PATH it would open a symlink in the last component itself (then
        // refused as ENOTDIR); RESOLVE_NO_SYMLINKS refuses it as what it is, ELOOP.
        access | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        NO_LINKS | resolve,
    )
}

/// `name` as one entry of a directory: not empty, no `/`, not `.` or `..`.
fn entry_name(name: &OsStr) -> Result<&Path, Errno> {
    if name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == ".." {
        return Err(Errno::INVAL);
    }
    Ok(Path::new(name))
}

/// Opens the directory `path` (absolute, or relative to the working directory) as an `O_PATH`
/// descriptor, refusing a symlink in any component (`ELOOP`) and anything but a directory
/// (`ENOTDIR`).
pub fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    open_directory(rustix::fs::CWD, path, OFlags::PATH, ResolveFlags::empty())
}

/// [`open_dir`], opened for reading (to list it, or to change its owner or mode).
pub fn open_dir_to_read(path: &Path) -> Result<OwnedFd, Errno> {
    open_directory(rustix::fs::CWD, path, OFlags::RDONLY, ResolveFlags::empty())
}

/// Opens the entry `name` of the directory `dir` as an `O_PATH` descriptor: a symlink gives
/// `ELOOP`, anything but a directory `ENOTDIR`, a name that is not a single entry `EINVAL`.
pub fn open_child_dir(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    open_directory(dir, entry_name(name)?, OFlags::PATH, ResolveFlags::BENEATH)
}

/// [`open_child_dir`], opened for reading (to list it, or to change its owner or mode).
pub fn open_child_dir_to_read(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    open_directory(
        dir,
        entry_name(name)?,
        OFlags::RDONLY,
        ResolveFlags::BENEATH,
    )
}

/// Whether the directory `dir` (any descriptor of it, `O_PATH` too) has no entries but `.` and
/// `..`. It is listed through a descriptor of its own, so the caller's offset is left alone.
pub fn dir_is_empty(dir: impl AsFd) -> Result<bool, Errno> {
    let listing = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut entries = rustix::fs::Dir::new(listing)?;
    while let Some(entry) = entries.read() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("mountfd-open-")
            .tempdir()
            .expect("tempdir")
    }

    #[test]
    fn a_symlink_in_any_component_is_refused() {
        let t = scratch();
        std::fs::create_dir_all(t.path().join("real/inner")).expect("mkdir");
        symlink(t.path().join("real"), t.path().join("link")).expect("symlink");
        symlink(t.path().join("real/inner"), t.path().join("real/last")).expect("symlink");

        assert!(open_dir(&t.path().join("real/inner")).is_ok());
        assert_eq!(
            open_dir(&t.path().join("link/inner")).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(
            open_dir(&t.path().join("real/last")).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(
            open_dir_to_read(&t.path().join("link/inner")).err(),
            Some(Errno::LOOP)
        );
        let real = open_dir(&t.path().join("real")).expect("open");
        assert_eq!(
            open_child_dir(&real, OsStr::new("last")).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(
            open_child_dir_to_read(&real, OsStr::new("last")).err(),
            Some(Errno::LOOP)
        );
        assert!(open_child_dir(&real, OsStr::new("inner")).is_ok());
    }

    #[test]
    fn a_symlink_swapped_in_after_a_check_is_refused() {
        // What a user racing root would do: the path was a directory when looked at, and is a
        // symlink to somewhere else when opened.
        let t = scratch();
        let dir = t.path().join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::create_dir(t.path().join("elsewhere")).expect("mkdir");
        assert!(open_dir(&dir).is_ok());
        std::fs::rename(&dir, t.path().join("d.old")).expect("rename");
        symlink(t.path().join("elsewhere"), &dir).expect("symlink");
        assert_eq!(open_dir(&dir).err(), Some(Errno::LOOP));
    }

    #[test]
    fn only_a_single_entry_name_is_a_child() {
        let t = scratch();
        std::fs::create_dir_all(t.path().join("a/b")).expect("mkdir");
        std::fs::write(t.path().join("a/file"), b"x").expect("write");
        let a = open_dir(&t.path().join("a")).expect("open");
        for bad in ["", ".", "..", "b/", "b/..", "/etc"] {
            assert_eq!(
                open_child_dir(&a, OsStr::new(bad)).err(),
                Some(Errno::INVAL),
                "{bad:?}"
            );
            assert_eq!(
                open_child_dir_to_read(&a, OsStr::new(bad)).err(),
                Some(Errno::INVAL),
                "{bad:?}"
            );
        }
        assert_eq!(
            open_child_dir(&a, OsStr::new("file")).err(),
            Some(Errno::NOTDIR)
        );
        assert_eq!(
            open_child_dir(&a, OsStr::new("missing")).err(),
            Some(Errno::NOENT)
        );
        assert_eq!(
            open_dir(&t.path().join("a/file")).err(),
            Some(Errno::NOTDIR)
        );
    }

    #[test]
    fn emptiness_is_read_through_any_descriptor() {
        let t = scratch();
        std::fs::create_dir_all(t.path().join("empty")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("full/.hidden")).expect("mkdir");
        let empty = open_dir(&t.path().join("empty")).expect("open");
        let full = open_dir(&t.path().join("full")).expect("open");
        assert_eq!(dir_is_empty(&empty), Ok(true));
        assert_eq!(dir_is_empty(&full), Ok(false));
        let full_rd = open_dir_to_read(&t.path().join("full")).expect("open");
        assert_eq!(dir_is_empty(&full_rd), Ok(false));
        // Asked twice through the same descriptor: its own offset is not consumed.
        assert_eq!(dir_is_empty(&full_rd), Ok(false));
    }
}
