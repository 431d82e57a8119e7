//! The mount step (DESIGN.md §2): one seam, `Mounter`, with the in-process implementation used
//! when the manager is root. The per-user mode implements the same trait by asking the helper.
//!
//! Even as root every path is opened without following symlinks and mounted through the opened
//! descriptors: a target owned by a user sits in a directory that user may rename things in, and a
//! swap between check and mount must not make root mount somewhere else.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use mountfd::{MountAt, Overlay, SysError, UnmountError};
use rustix::fs::Mode as FsMode;

use crate::mountinfo;
use crate::state::{Mode, Owner, TargetState};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path} is busy: a process still has files open in it. The data has been written back and stays in RAM; close those programs (see `fuser -vm {path}`) and run `asd unsync` again")]
    Busy { path: PathBuf },
    #[error("the kernel has no overlay filesystem (not in /proc/filesystems and `modprobe overlay` failed); set USE_OVERLAYFS=no")]
    NoOverlay,
    #[error("the helper: {0}")]
    Helper(String),
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(rustix::io::Errno) -> MountError + 'a {
    move |e| MountError::Sys {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A failed step of a mount through descriptors, named with the path it was about.
fn mount_step(path: &Path) -> impl FnOnce(SysError) -> MountError + '_ {
    move |e| sys(e.op, path)(e.errno)
}

/// The privileged steps of syncing a target. Everything else runs unprivileged.
pub trait Mounter {
    /// Create `$VOLATILE/asd-<user>` (0700, the owner's), refusing anything unexpected there.
    fn prepare_area(&self, volatile: &Path, area: &Path, owner: &Owner) -> Result<(), MountError>;
    /// Create the backup directory and bind the original target onto it.
    fn bind_backup(&self, t: &TargetState) -> Result<(), MountError>;
    /// Overlay mode: mount the overlay (lower: backup, upper/work in the user's area) on the
    /// volatile path.
    fn mount_overlay(&self, t: &TargetState) -> Result<(), MountError>;
    /// Bind the volatile copy (or merged overlay view) over the target.
    fn cover(&self, t: &TargetState) -> Result<(), MountError>;
    /// Make the cover read-only for the final write-back at unsync, so nothing written in the
    /// meantime can be lost or overwritten. Best effort: `Ok(false)` when not possible (files
    /// open for writing, or a mounter that cannot do it).
    fn freeze(&self, _t: &TargetState) -> Result<bool, MountError> {
        Ok(false)
    }
    /// Make a frozen cover writable again (the final write-back failed; the target stays in
    /// RAM and must keep working).
    fn thaw(&self, _t: &TargetState) -> Result<(), MountError> {
        Ok(())
    }
    /// Remove the cover from the target; never lazily: a busy target stays covered.
    fn uncover(&self, t: &TargetState) -> Result<(), MountError>;
    /// Unmount the overlay and the backup bind, and remove the (empty) backup directory.
    fn release(&self, t: &TargetState) -> Result<(), MountError>;
}

/// Mounts done by this process (the manager runs as root).
pub struct InProcess;

/// Open a directory as an O_PATH descriptor; any symlink in any component is refused (ELOOP).
pub fn open_dir(path: &Path) -> Result<OwnedFd, MountError> {
    mountfd::open_dir(path).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            MountError::Refused {
                path: path.to_path_buf(),
                reason: "a symlink is in the path; asd mounts only real directories".into(),
            }
        } else {
            sys("open", path)(e)
        }
    })
}

fn fstat(fd: &OwnedFd, path: &Path) -> Result<rustix::fs::Stat, MountError> {
    rustix::fs::fstat(fd).map_err(sys("stat", path))
}

/// Bind the directory open as `src` onto the directory open as `dst`: a private, non-recursive
/// clone, attached through descriptors.
fn bind_fd(
    src: &OwnedFd,
    dst: &OwnedFd,
    src_path: &Path,
    dst_path: &Path,
) -> Result<(), MountError> {
    match mountfd::bind_fd(src, dst) {
        Ok(_tree) => Ok(()),
        Err(e) if e.op == "move_mount" => Err(mount_step(dst_path)(e)),
        Err(e) => Err(mount_step(src_path)(e)),
    }
}

/// Open `path` as a directory owned by `owner`, or refuse.
fn open_owned_dir(path: &Path, owner: &Owner) -> Result<OwnedFd, MountError> {
    let fd = open_dir(path)?;
    let st = fstat(&fd, path)?;
    if st.st_uid != owner.uid {
        return Err(MountError::Refused {
            path: path.to_path_buf(),
            reason: format!(
                "owned by uid {}, expected {} ({})",
                st.st_uid, owner.uid, owner.name
            ),
        });
    }
    Ok(fd)
}

fn split_parent(path: &Path) -> Result<(&Path, &OsStr), MountError> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(MountError::Refused {
            path: path.to_path_buf(),
            reason: "has no parent directory".into(),
        }),
    }
}

/// mkdir `name` in the directory `parent_fd` unless it exists; returns whether it was created.
fn mkdir_at(parent_fd: &OwnedFd, name: &OsStr, mode: u32, path: &Path) -> Result<bool, MountError> {
    match rustix::fs::mkdirat(parent_fd, name, FsMode::from_raw_mode(mode)) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(e) => Err(sys("mkdir", path)(e)),
    }
}

/// Open `name` inside `parent_fd` as a directory (for reading), never through a symlink.
fn open_child_dir(parent_fd: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd, MountError> {
    mountfd::open_child_dir_to_read(parent_fd, name).map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => MountError::Refused {
            path: path.to_path_buf(),
            reason: "exists and is not a directory".into(),
        },
        e => sys("open", path)(e),
    })
}

fn is_empty_dir(fd: &OwnedFd, path: &Path) -> Result<bool, MountError> {
    mountfd::dir_is_empty(fd).map_err(sys("readdir", path))
}

/// Which device a mount on `path` must have to be ours: the volatile copy's filesystem.
fn dev_of(path: &Path) -> Option<(u32, u32)> {
    let fd = open_dir(path).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    Some((rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)))
}

/// Unmount the top mount on `path` if `accept` says it is ours; `Ok(false)` if nothing to do.
///
/// Never lazily (a busy target stays covered: lazily detached, files still open on it would be
/// written into a copy that is then thrown away). [`MountAt`] holds the parent open (no
/// symlinks on the way), finds the mount there by the id of what is at `parent/name`, and
/// unmounts it through the parent's descriptor, so a rename of an ancestor (which a user may
/// own) after the check cannot redirect it.
fn unmount_if(
    path: &Path,
    accept: impl Fn(&mountinfo::MountEntry) -> bool,
) -> Result<bool, MountError> {
    let refused = |reason: &str| MountError::Refused {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if path.parent().is_none() || path.file_name().is_none() {
        return Err(refused("not a path asd mounts on"));
    }
    let found = match MountAt::find(path) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(false),
        Err(e) if e.errno == rustix::io::Errno::LOOP => {
            return Err(refused(
                "a symlink is in the path; asd mounts only real directories",
            ))
        }
        Err(e) => return Err(mount_step(path)(e)),
    };
    let Some(top) = found.entry().filter(|m| m.mount_point == path) else {
        return Err(refused(
            "what is found at this path is not the mount listed there (a parent was moved?); \
             leaving it alone",
        ));
    };
    if !accept(top) {
        return Err(refused(&format!(
            "the mount there ({} from {}) is not one asd made; leaving it alone",
            top.fs_type, top.source
        )));
    }
    match found.unmount() {
        Ok(()) => Ok(true),
        Err(UnmountError::Busy) => Err(MountError::Busy {
            path: path.to_path_buf(),
        }),
        Err(UnmountError::StillMounted) => Err(refused(
            "something was mounted over it meanwhile and was unmounted instead; run asd again",
        )),
        Err(UnmountError::Sys(e)) => Err(mount_step(path)(e)),
    }
}

/// Is an overlay filesystem available? Loads the module if needed.
pub fn overlay_supported() -> bool {
    let has = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().last() == Some("overlay"))
            })
            .unwrap_or(false)
    };
    if has() {
        return true;
    }
    let _ = std::process::Command::new("modprobe")
        .arg("overlay")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    has()
}

/// Makes our cover on the target read-only or writable again. `Ok(false)` when it is not our
/// cover, or (making it read-only) while files are open for writing on it.
fn set_cover_read_only(t: &TargetState, read_only: bool) -> Result<bool, MountError> {
    let p = &t.paths;
    let want = dev_of(&p.volatile);
    let table = mountinfo::read().map_err(|source| MountError::Sys {
        op: "read mountinfo",
        path: p.target.clone(),
        source,
    })?;
    let Some(top) = mountinfo::mounts_at(&table, &p.target)
        .last()
        .copied()
        .filter(|m| want.is_some_and(|w| m.dev == w))
    else {
        return Ok(false);
    };
    // The mount found at the path (no symlinks on the way) must be that one, and the
    // descriptor its root: a parent renamed meanwhile cannot point this at another mount.
    let root = open_dir(&p.target)?;
    let (id, is_root) = mountfd::mount_of(&root).map_err(sys("statx", &p.target))?;
    if !is_root || id.id != top.id {
        return Ok(false);
    }
    match mountfd::set_read_only(&root, read_only) {
        Ok(()) => Ok(true),
        Err(e) if read_only => {
            tracing::warn!(
                "{}: could not make it read-only for the final write-back ({e}); files are open for writing",
                p.target.display()
            );
            Ok(false)
        }
        Err(e) => Err(sys("mount_setattr", &p.target)(e)),
    }
}

impl Mounter for InProcess {
    fn prepare_area(&self, volatile: &Path, area: &Path, owner: &Owner) -> Result<(), MountError> {
        let vol_fd = open_dir(volatile)?;
        let (_, name) = split_parent(area)?;
        let created = mkdir_at(&vol_fd, name, 0o700, area)?;
        let fd = open_child_dir(&vol_fd, name, area)?;
        let st = fstat(&fd, area)?;
        if created {
            rustix::fs::fchown(&fd, Some(uid(owner.uid)), Some(gid(owner.gid)))
                .map_err(sys("chown", area))?;
        } else if st.st_uid != owner.uid {
            return Err(MountError::Refused {
                path: area.to_path_buf(),
                reason: format!(
                    "exists but belongs to uid {}, not {}; remove it or choose another VOLATILE",
                    st.st_uid, owner.name
                ),
            });
        }
        rustix::fs::fchmod(&fd, FsMode::from_raw_mode(0o700)).map_err(sys("chmod", area))?;
        Ok(())
    }

    fn bind_backup(&self, t: &TargetState) -> Result<(), MountError> {
        let p = &t.paths;
        let target_fd = open_owned_dir(&p.target, &t.owner)?;
        let table = mountinfo::read().map_err(|source| MountError::Sys {
            op: "read mountinfo",
            path: p.target.clone(),
            source,
        })?;
        if mountinfo::is_mount_point(&table, &p.backup) {
            return Err(MountError::Refused {
                path: p.backup.clone(),
                reason: "something is already mounted there".into(),
            });
        }
        let below = mountinfo::mounts_below(&table, &p.target);
        if let Some(m) = below.first() {
            return Err(MountError::Refused {
                path: p.target.clone(),
                reason: format!(
                    "has another mount inside it ({}); asd does not sync directories with mounts beneath them",
                    m.mount_point.display()
                ),
            });
        }
        let st = fstat(&target_fd, &p.target)?;
        let (parent, name) = split_parent(&p.backup)?;
        let parent_fd = open_dir(parent)?;
        let created = mkdir_at(&parent_fd, name, st.st_mode & 0o7777, &p.backup)?;
        let backup_fd = open_child_dir(&parent_fd, name, &p.backup)?;
        if created {
            // Give away only the empty directory we just made, not one swapped in meanwhile.
            let st = fstat(&backup_fd, &p.backup)?;
            if st.st_uid != 0 || !is_empty_dir(&backup_fd, &p.backup)? {
                return Err(MountError::Refused {
                    path: p.backup.clone(),
                    reason: "was replaced while asd created it; try again".into(),
                });
            }
            rustix::fs::fchown(&backup_fd, Some(uid(t.owner.uid)), Some(gid(t.owner.gid)))
                .map_err(sys("chown", &p.backup))?;
        } else if !is_empty_dir(&backup_fd, &p.backup)? {
            return Err(MountError::Refused {
                path: p.backup.clone(),
                reason: "exists and is not empty; asd will not mount over files it did not make. Move it away and try again".into(),
            });
        }
        bind_fd(&target_fd, &backup_fd, &p.target, &p.backup)
    }

    fn mount_overlay(&self, t: &TargetState) -> Result<(), MountError> {
        if !overlay_supported() {
            return Err(MountError::NoOverlay);
        }
        let p = &t.paths;
        let lower = open_owned_dir(&p.backup, &t.owner)?;
        // The lower layer must be the bind of the target made a moment ago, not something the
        // owner mounted on the backup path since (a FUSE lower copied up by root is the
        // CVE-2023-0386 class): the same directory has the same device and inode.
        let target_fd = open_owned_dir(&p.target, &t.owner)?;
        let (a, b) = (fstat(&lower, &p.backup)?, fstat(&target_fd, &p.target)?);
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(MountError::Refused {
                path: p.backup.clone(),
                reason:
                    "is no longer the bind of the target asd made; something else was mounted there"
                        .into(),
            });
        }
        let upper = open_owned_dir(&p.upper, &t.owner)?;
        let work = open_owned_dir(&p.work, &t.owner)?;
        let merged = open_owned_dir(&p.volatile, &t.owner)?;
        let layers = Overlay {
            lower: lower.as_fd(),
            upper: upper.as_fd(),
            work: work.as_fd(),
        };
        match mountfd::mount_overlay(layers, &merged) {
            Ok(_mnt) => Ok(()),
            Err(e) => {
                let about = match e.op {
                    "fsconfig lowerdir+" => &p.backup,
                    "fsconfig upperdir" => &p.upper,
                    "fsconfig workdir" => &p.work,
                    _ => &p.volatile,
                };
                Err(mount_step(about)(e))
            }
        }
    }

    fn cover(&self, t: &TargetState) -> Result<(), MountError> {
        let p = &t.paths;
        let src = open_owned_dir(&p.volatile, &t.owner)?;
        let target = open_owned_dir(&p.target, &t.owner)?;
        bind_fd(&src, &target, &p.volatile, &p.target)
    }

    fn freeze(&self, t: &TargetState) -> Result<bool, MountError> {
        set_cover_read_only(t, true)
    }

    fn thaw(&self, t: &TargetState) -> Result<(), MountError> {
        set_cover_read_only(t, false).map(|_| ())
    }

    fn uncover(&self, t: &TargetState) -> Result<(), MountError> {
        let p = &t.paths;
        let want = dev_of(&p.volatile);
        unmount_if(&p.target, |m| {
            Some(m.dev) == want || want.is_none() && is_volatile_fs(m)
        })?;
        Ok(())
    }

    fn release(&self, t: &TargetState) -> Result<(), MountError> {
        let p = &t.paths;
        if t.mode == Mode::Overlay {
            unmount_if(&p.volatile, |m| m.fs_type == "overlay")?;
        }
        // The backup is a bind of the target directory: once uncovered, the target's own mount
        // tells which filesystem and which directory of it (mountinfo's root) that bind shows.
        // (st_dev is no use here: on btrfs it names the subvolume, not the mount.)
        let expected = mountinfo::read().ok().and_then(|table| {
            let holder = mountinfo::containing(&table, &p.target)?;
            let rel = p.target.strip_prefix(&holder.mount_point).ok()?;
            Some((holder.dev, holder.root.join(rel)))
        });
        unmount_if(&p.backup, |m| {
            expected
                .as_ref()
                .is_some_and(|(dev, root)| m.dev == *dev && m.root == *root)
        })?;
        match std::fs::remove_dir(&p.backup) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                tracing::warn!("left {} in place: {e}", p.backup.display());
                Ok(())
            }
        }
    }
}

fn is_volatile_fs(m: &mountinfo::MountEntry) -> bool {
    matches!(m.fs_type.as_str(), "tmpfs" | "overlay")
        || m.source.as_bytes().starts_with(b"/dev/zram")
}

fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}

fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}

pub mod via_helper;
