//! Unmounting: a lazy detach of a mount held open, and a non-lazy unmount of the mount found at
//! a path, checked to be that mount before and after.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::error::SysError;
use crate::mount_id::{mount_of, MountId};
use crate::mountinfo::{self, MountEntry};
use crate::open::{open_child_dir, open_dir};

/// Unmounts the mount whose root `fd` is, lazily (`MNT_DETACH`): the descriptor itself keeps a
/// reference, so a plain unmount would be "busy". Resolving `/proc/self/fd/N` lands on exactly
/// that mount, wherever it was moved. Files still open on it keep working on a mount nobody can
/// reach any more: use it only for a mount nothing of value was written through.
pub fn detach_fd(fd: OwnedFd) -> Result<(), Errno> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let r = rustix::mount::unmount(path.as_str(), UnmountFlags::DETACH);
    drop(fd);
    r
}

#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A process has files open on it, or its working directory in it.
    #[error("busy")]
    Busy,
    /// It is still there after the unmount: something was mounted over it between the check and
    /// the unmount, and that went instead.
    #[error("still mounted: another mount over it went instead")]
    StillMounted,
}

/// The mount found at a path, ready to be unmounted: the parent directory is held open (reached
/// without symlinks), and the mount is checked to be the one found here again when it goes. No
/// descriptor of the mount itself is held, as that alone would keep it busy.
#[derive(Debug)]
pub struct MountAt {
    parent: OwnedFd,
    name: OsString,
    id: MountId,
    entry: Option<MountEntry>,
}

impl MountAt {
    /// The mount whose root is the directory `path` (the topmost, if several are stacked
    /// there); `Ok(None)` when `path` or its parent does not exist, or `path` is not a directory
    /// or not a mount point. A symlink on the way is refused (`ELOOP`).
    /// `path` is the path as mountinfo shows it (absolute and normalized), for
    /// [`MountAt::entry`].
    pub fn find(path: &Path) -> Result<Option<MountAt>, SysError> {
        let (Some(parent_path), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(SysError {
                op: "open",
                errno: Errno::INVAL,
            });
        };
        let parent = match open_dir(parent_path) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(errno) => return Err(SysError { op: "open", errno }),
        };
        let here = match open_child_dir(&parent, name) {
            Ok(fd) => fd,
            // Missing, or not a directory: no directory mount there.
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(errno) => return Err(SysError { op: "open", errno }),
        };
        let (id, root) = mount_of(&here).map_err(SysError::of("statx"))?;
        drop(here);
        if !root {
            return Ok(None);
        }
        let table = mountinfo::read().map_err(|e| SysError {
            op: "read mountinfo",
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        let entry = table.into_iter().find(|m| m.id == id.id);
        Ok(Some(MountAt {
            parent,
            name: name.to_os_string(),
            id,
            entry,
        }))
    }

    /// The mount found there.
    pub fn id(&self) -> MountId {
        self.id
    }

    /// Its line in mountinfo (`None` in the odd case that the table did not list it). Its
    /// `mount_point` differs from the path it was found at when that path does not name it the
    /// way mountinfo does (a parent renamed meanwhile, a path that is not normalized).
    pub fn entry(&self) -> Option<&MountEntry> {
        self.entry.as_ref()
    }

    /// Unmounts it, never lazily: [`UnmountError::Busy`] while anything uses it. Addressed as
    /// `/proc/self/fd/PARENT/name`, so a rename of an ancestor after the check cannot redirect
    /// it (a mount point itself cannot be renamed). Check and unmount are two steps: if
    /// something was mounted over it in between, that goes instead and this one stays, which is
    /// reported as [`UnmountError::StillMounted`].
    pub fn unmount(self) -> Result<(), UnmountError> {
        let mut via = OsString::from(format!("/proc/self/fd/{}/", self.parent.as_raw_fd()));
        via.push(&self.name);
        match rustix::mount::unmount(Path::new(&via), UnmountFlags::NOFOLLOW) {
            Ok(()) => {}
            Err(Errno::BUSY) => return Err(UnmountError::Busy),
            Err(errno) => {
                return Err(SysError {
                    op: "umount",
                    errno,
                }
                .into())
            }
        }
        if self.still_here() {
            return Err(UnmountError::StillMounted);
        }
        Ok(())
    }

    /// Whether the mount is still there after the unmount: visible at its place again, or
    /// listed in mountinfo as before (hidden under a mount made meanwhile).
    fn still_here(&self) -> bool {
        let visible = open_child_dir(&self.parent, OsStr::new(&self.name))
            .and_then(mount_of)
            .is_ok_and(|(m, root)| root && m.unique == self.id.unique);
        // The classic id alone could already name a new mount: it counts with the same
        // filesystem, directory and place only. An unreadable table proves nothing either way.
        let listed = self.entry.as_ref().is_some_and(|before| {
            mountinfo::read().is_ok_and(|t| {
                t.iter().any(|m| {
                    m.id == before.id
                        && m.dev == before.dev
                        && m.root == before.root
                        && m.mount_point == before.mount_point
                })
            })
        });
        visible || listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testns;
    use crate::{bind_fd, open_dir};

    #[test]
    fn nothing_there_is_none() {
        testns::run(|dir| {
            std::fs::create_dir(dir.join("plain")).expect("mkdir");
            std::fs::write(dir.join("file"), b"x").expect("write");
            assert!(MountAt::find(&dir.join("plain")).expect("find").is_none());
            assert!(MountAt::find(&dir.join("file")).expect("find").is_none());
            assert!(MountAt::find(&dir.join("missing")).expect("find").is_none());
            assert!(MountAt::find(&dir.join("missing/deeper"))
                .expect("find")
                .is_none());
        });
    }

    #[test]
    fn a_symlink_on_the_way_is_refused() {
        testns::run(|dir| {
            std::fs::create_dir_all(dir.join("real/m")).expect("mkdir");
            testns::mount_tmpfs(&dir.join("real/m"), "m");
            std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).expect("symlink");
            std::os::unix::fs::symlink(dir.join("real/m"), dir.join("last")).expect("symlink");
            for via in ["link/m", "last"] {
                let e = MountAt::find(&dir.join(via)).expect_err("refused");
                assert_eq!(e.errno, Errno::LOOP, "{via}");
            }
            let table = mountinfo::read().expect("mountinfo");
            assert!(mountinfo::is_mount_point(&table, &dir.join("real/m")));
        });
    }

    #[test]
    fn the_mount_found_is_unmounted_unless_busy() {
        testns::run(|dir| {
            std::fs::create_dir(dir.join("m")).expect("mkdir");
            testns::mount_tmpfs(&dir.join("m"), "m");
            let found = MountAt::find(&dir.join("m"))
                .expect("find")
                .expect("mounted");
            let entry = found.entry().expect("listed").clone();
            assert_eq!(entry.mount_point, dir.join("m"));
            assert_eq!(entry.source, "m");
            assert_eq!(found.id().id, entry.id);

            let open = std::fs::File::create(dir.join("m/f")).expect("create");
            let busy = MountAt::find(&dir.join("m"))
                .expect("find")
                .expect("mounted");
            assert!(matches!(busy.unmount(), Err(UnmountError::Busy)));
            drop(open);
            found.unmount().expect("unmount");
            let table = mountinfo::read().expect("mountinfo");
            assert!(!mountinfo::is_mount_point(&table, &dir.join("m")));
        });
    }

    #[test]
    fn a_mount_slipped_over_it_goes_instead_and_it_is_reported_still_mounted() {
        testns::run(|dir| {
            std::fs::create_dir(dir.join("m")).expect("mkdir");
            testns::mount_tmpfs(&dir.join("m"), "ours");
            let found = MountAt::find(&dir.join("m"))
                .expect("find")
                .expect("mounted");
            // Between the check and the unmount, something else is mounted on top.
            testns::mount_tmpfs(&dir.join("m"), "theirs");
            assert!(matches!(found.unmount(), Err(UnmountError::StillMounted)));
            let table = mountinfo::read().expect("mountinfo");
            let left: Vec<_> = mountinfo::mounts_at(&table, &dir.join("m"))
                .iter()
                .map(|m| m.source.clone())
                .collect();
            assert_eq!(left, ["ours"]);
        });
    }

    #[test]
    fn a_renamed_parent_cannot_redirect_the_unmount() {
        testns::run(|dir| {
            std::fs::create_dir_all(dir.join("p/m")).expect("mkdir");
            std::fs::create_dir_all(dir.join("q/m")).expect("mkdir");
            testns::mount_tmpfs(&dir.join("p/m"), "ours");
            testns::mount_tmpfs(&dir.join("q/m"), "other");
            let found = MountAt::find(&dir.join("p/m"))
                .expect("find")
                .expect("mounted");
            // The parent is swapped for another holding a different mount at the same name.
            std::fs::rename(dir.join("p"), dir.join("p.moved")).expect("rename");
            std::fs::rename(dir.join("q"), dir.join("p")).expect("rename");
            found.unmount().expect("unmount");
            let table = mountinfo::read().expect("mountinfo");
            assert!(!mountinfo::is_mount_point(&table, &dir.join("p.moved/m")));
            let at = mountinfo::mounts_at(&table, &dir.join("p/m"));
            assert_eq!(at.len(), 1);
            assert_eq!(at[0].source, "other");
        });
    }

    #[test]
    fn detach_takes_down_the_mount_held_open() {
        testns::run(|dir| {
            std::fs::create_dir_all(dir.join("src")).expect("mkdir");
            std::fs::create_dir_all(dir.join("dst")).expect("mkdir");
            let src = open_dir(&dir.join("src")).expect("open");
            let dst = open_dir(&dir.join("dst")).expect("open");
            let tree = bind_fd(&src, &dst).expect("bind");
            let (id, _) = mount_of(&tree).expect("mount_of");
            detach_fd(tree).expect("detach");
            let table = mountinfo::read().expect("mountinfo");
            assert!(!table.iter().any(|m| m.id == id.id));
        });
    }
}
