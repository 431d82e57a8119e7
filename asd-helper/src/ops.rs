//! The methods of `io.asd.Helper`: validation (DESIGN.md §6 rules 1–6) and the mount steps.
//!
//! Every path is resolved on a worker thread that carries the caller's file system identity
//! (see [`FsCreds::run`]): lookups refuse symlinks in any component (openat2
//! `RESOLVE_NO_SYMLINKS`), permission checks are the caller's, and what the helper creates for
//! the caller is the caller's. Mounts are then made through the opened descriptors
//! (`open_tree`/`fsmount` + `move_mount`), so a path swapped after the check cannot redirect
//! them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use asd_protocol::method::to_parameters;
use asd_protocol::{
    AreaReply, BackupReply, CoverReply, DetachReply, FreezeReply, Info, Method, Mode, MountEntry,
    MountList, OverlayReply, ServiceError,
};
use rustix::fs::{Access, AtFlags, Mode as FsMode};
use rustix::io::Errno;
use serde_json::{Map, Value};

use crate::beside;
use crate::paths::{self, display, AreaPaths};
use crate::peer::Peer;
use crate::polkit;
use crate::records::{AreaRecord, DirId, MountRecord, Store, UserRecord};
use crate::sys::{self, FsCreds, MountId};
use mountfd::{MountAt, Overlay, SysError, UnmountError};

type Reply = Result<Map<String, Value>, ServiceError>;

const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Targets one uid may have mounted at once (DESIGN.md §6 rule 5: bounded).
pub const MAX_TARGETS_PER_UID: usize = 128;

/// File systems the helper never mounts from or over. tmpfs and overlay: a target there is in
/// RAM already, or inside another asd target (whose cover a mount inside it would keep busy).
const REFUSED_FS: &[(u64, &str)] = &[
    (0x0102_1994, "tmpfs"),
    (0x794c_7630, "overlay"),
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x1cd1, "devpts"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0xcafe_4a11, "bpf"),
    (0x6573_5546, "fuse"),
    (0x6e73_6673, "nsfs"),
    (0x6165_676c, "pstore"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x1980_0202, "mqueue"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x0187, "autofs"),
    (0x9584_58f6, "hugetlbfs"),
];

/// Shared state of the helper.
pub struct Ctx {
    pub store: Store,
    locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
}

fn errno(e: Errno) -> i32 {
    e.raw_os_error()
}

pub(crate) fn sys_err(op: &str, path: &Path, e: Errno) -> ServiceError {
    ServiceError::system(format!("{op} {}", display(path)), errno(e))
}

/// Maps a failed lookup of `path` onto the named error.
pub(crate) fn lookup_err(path: &Path, e: Errno) -> ServiceError {
    let path_s = display(path);
    match e {
        Errno::LOOP => ServiceError::SymlinkInPath { path: path_s },
        Errno::NOENT => ServiceError::NotFound { path: path_s },
        Errno::NOTDIR => ServiceError::NotADirectory { path: path_s },
        Errno::ACCESS | Errno::PERM => ServiceError::PermissionDenied { path: path_s },
        Errno::XDEV => ServiceError::MountsBelow {
            path: path_s.clone(),
            mountpoint: path_s,
        },
        Errno::NAMETOOLONG => ServiceError::InvalidPath {
            path: path_s,
            reason: "too long".into(),
        },
        e => sys_err("open", path, e),
    }
}

fn io_err(op: &str, e: std::io::Error) -> ServiceError {
    ServiceError::system(op, e.raw_os_error().unwrap_or(libc::EIO))
}

fn check_fs(fd: &OwnedFd, path: &Path) -> Result<(), ServiceError> {
    let magic = sys::fs_magic(fd).map_err(|e| sys_err("statfs", path, e))?;
    match REFUSED_FS.iter().find(|(m, _)| *m == magic) {
        Some((_, name)) => Err(ServiceError::UnsupportedFilesystem {
            path: display(path),
            filesystem: (*name).to_string(),
        }),
        None => Ok(()),
    }
}

/// A target, resolved and checked as the caller.
struct Resolved {
    parent: OwnedFd,
    fd: OwnedFd,
    stat: rustix::fs::Stat,
}

/// The target's parent and the target itself, opened (`O_PATH`) with the calling thread's
/// identity and without following a symlink anywhere, and the target's stat.
pub(crate) fn open_with_parent(
    target: &Path,
) -> Result<(OwnedFd, OwnedFd, rustix::fs::Stat), ServiceError> {
    let (Some(parent_path), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(ServiceError::InvalidPath {
            path: display(target),
            reason: "no parent".into(),
        });
    };
    let parent = mountfd::open_dir(parent_path).map_err(|e| lookup_err(target, e))?;
    let fd = mountfd::open_child_dir(&parent, name).map_err(|e| lookup_err(target, e))?;
    let stat = sys::fstat(&fd).map_err(|e| sys_err("stat", target, e))?;
    Ok((parent, fd, stat))
}

/// Rules 1, 2 and 6 for a target: a directory owned by the caller, reached without any symlink,
/// on an ordinary file system, with nothing mounted on or beneath it.
fn resolve_target(creds: &FsCreds, target: &Path) -> Result<Resolved, ServiceError> {
    let (parent, fd, stat) = open_with_parent(target)?;
    if !sys::is_dir(&stat) {
        return Err(ServiceError::NotADirectory {
            path: display(target),
        });
    }
    if stat.st_uid != creds.uid {
        return Err(ServiceError::NotOwner {
            path: display(target),
        });
    }
    let (_, is_root) = mountfd::mount_of(&fd).map_err(|e| sys_err("statx", target, e))?;
    if is_root {
        return Err(ServiceError::MountsBelow {
            path: display(target),
            mountpoint: display(target),
        });
    }
    let mounts = mountfd::mountinfo::read().map_err(|e| io_err("read mountinfo", e))?;
    if let Some(m) = mounts.iter().find(|m| m.mount_point.starts_with(target)) {
        return Err(ServiceError::MountsBelow {
            path: display(target),
            mountpoint: display(&m.mount_point),
        });
    }
    check_fs(&fd, target)?;
    Ok(Resolved { parent, fd, stat })
}

/// The caller can list and enter `fd` (R_OK|X_OK with the caller's identity).
fn check_readable(fd: &OwnedFd, path: &Path) -> Result<(), ServiceError> {
    match rustix::fs::accessat(fd, ".", Access::READ_OK | Access::EXEC_OK, AtFlags::EACCESS) {
        Ok(()) => Ok(()),
        Err(Errno::ACCESS) | Err(Errno::PERM) => Err(ServiceError::LowerNotReadable {
            path: display(path),
        }),
        Err(e) => Err(sys_err("access", path, e)),
    }
}

fn is_zram(dev: u64) -> bool {
    let (maj, min) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    std::fs::read_link(format!("/sys/dev/block/{maj}:{min}"))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("zram"))
        })
        .unwrap_or(false)
}

fn prepare_area(creds: &FsCreds, user: &str, volatile: &Path) -> Result<AreaRecord, ServiceError> {
    let rejected = |reason: String| ServiceError::VolatileRejected {
        path: display(volatile),
        reason,
    };
    let vol = mountfd::open_dir(volatile).map_err(|e| lookup_err(volatile, e))?;
    let st = sys::fstat(&vol).map_err(|e| sys_err("stat", volatile, e))?;
    let magic = sys::fs_magic(&vol).map_err(|e| sys_err("statfs", volatile, e))?;
    #[allow(clippy::unnecessary_cast)]
    if magic != TMPFS_MAGIC && !is_zram(st.st_dev as u64) {
        return Err(rejected(format!(
            "not on tmpfs or zram (file system magic {magic:#x})"
        )));
    }
    let sticky_public = st.st_uid == 0 && st.st_mode & 0o1000 != 0 && st.st_mode & 0o002 != 0;
    if !sticky_public && st.st_uid != creds.uid {
        return Err(rejected(
            "must be root-owned, world-writable and sticky (like /dev/shm), or yours".into(),
        ));
    }
    let name = paths::area_name(user);
    let area_path = paths::area_of(volatile, user);
    match rustix::fs::mkdirat(&vol, name.as_str(), FsMode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(lookup_err(&area_path, e)),
    }
    let not_owned = |reason: &str| ServiceError::AreaNotOwned {
        path: display(&area_path),
        reason: reason.to_string(),
    };
    let area = match mountfd::open_child_dir(&vol, OsStr::new(&name)) {
        Ok(fd) => fd,
        Err(Errno::LOOP) => return Err(not_owned("is a symlink")),
        Err(Errno::NOTDIR) => return Err(not_owned("is not a directory")),
        Err(e) => return Err(lookup_err(&area_path, e)),
    };
    let st = sys::fstat(&area).map_err(|e| sys_err("stat", &area_path, e))?;
    if st.st_uid != creds.uid {
        return Err(not_owned(&format!(
            "exists and is owned by uid {}, not by the caller",
            st.st_uid
        )));
    }
    Ok(AreaRecord {
        volatile: volatile.to_path_buf(),
        path: area_path,
        dir: DirId::of(&st),
    })
}

fn open_area(creds: &FsCreds, area: &AreaRecord) -> Result<OwnedFd, ServiceError> {
    let vol = mountfd::open_dir(&area.volatile).map_err(|e| match e {
        Errno::NOENT => ServiceError::AreaNotPrepared {},
        e => lookup_err(&area.volatile, e),
    })?;
    let name = area.path.file_name().unwrap_or_default();
    let changed = |reason: &str| ServiceError::AreaNotOwned {
        path: display(&area.path),
        reason: reason.to_string(),
    };
    let fd = match mountfd::open_child_dir(&vol, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(ServiceError::AreaNotPrepared {}),
        Err(Errno::LOOP) => return Err(changed("is a symlink")),
        Err(e) => return Err(lookup_err(&area.path, e)),
    };
    let st = sys::fstat(&fd).map_err(|e| sys_err("stat", &area.path, e))?;
    if st.st_uid != creds.uid {
        return Err(changed("not owned by the caller"));
    }
    if DirId::of(&st) != area.dir {
        return Err(changed(
            "replaced since PrepareArea; call PrepareArea again",
        ));
    }
    Ok(fd)
}

/// Walks `rel` below the area, one component at a time, never following a symlink or entering a
/// mount point; each component must be a directory owned by the caller. With `create`, missing
/// components are created (0700, by the caller's identity). With `last_may_be_mount`, the last
/// component may be a mount root (the overlay's merged dir).
fn open_beneath(
    creds: &FsCreds,
    area_fd: &OwnedFd,
    area_path: &Path,
    rel: &[std::ffi::OsString],
    create: bool,
    last_may_be_mount: bool,
) -> Result<OwnedFd, ServiceError> {
    let mut cur = area_fd.try_clone().map_err(|e| io_err("dup", e))?;
    let mut path = area_path.to_path_buf();
    for (i, comp) in rel.iter().enumerate() {
        path.push(comp);
        let last = i + 1 == rel.len();
        if create {
            match rustix::fs::mkdirat(&cur, comp.as_os_str(), FsMode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(lookup_err(&path, e)),
            }
        }
        let not_owned = |reason: &str| ServiceError::AreaNotOwned {
            path: display(&path),
            reason: reason.to_string(),
        };
        let next = match mountfd::open_child_dir(&cur, comp) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => return Err(not_owned("is a symlink")),
            Err(Errno::NOTDIR) => return Err(not_owned("is not a directory")),
            Err(e) => return Err(lookup_err(&path, e)),
        };
        let st = sys::fstat(&next).map_err(|e| sys_err("stat", &path, e))?;
        if st.st_uid != creds.uid {
            return Err(not_owned("not owned by the caller"));
        }
        let (_, is_root) = mountfd::mount_of(&next).map_err(|e| sys_err("statx", &path, e))?;
        if is_root && !(last && last_may_be_mount) {
            return Err(not_owned("is a mount point"));
        }
        cur = next;
    }
    Ok(cur)
}

/// The recorded mount at `path`, opened, if it is still there (`Ok(None)`: it is gone), and
/// where it was found (`path`, or where it moved to with a renamed parent).
fn find_mount(path: &Path, mid: MountId) -> Result<Option<(OwnedFd, PathBuf)>, ServiceError> {
    if let Ok(fd) = mountfd::open_dir(path) {
        if let Ok((m, true)) = mountfd::mount_of(&fd) {
            if m.unique == mid.unique {
                return Ok(Some((fd, path.to_path_buf())));
            }
        }
    }
    // Not at its path (a parent was renamed?): look it up by id.
    let mounts = mountfd::mountinfo::read().map_err(|e| io_err("read mountinfo", e))?;
    let Some(info) = mounts.iter().find(|m| m.id == mid.id) else {
        return Ok(None);
    };
    let fd = mountfd::open_dir(&info.mount_point).map_err(|e| ServiceError::WrongState {
        target: display(path),
        reason: format!(
            "the mount moved to {} and cannot be reached ({e})",
            display(&info.mount_point)
        ),
    })?;
    match mountfd::mount_of(&fd) {
        Ok((m, true)) if m.unique == mid.unique => Ok(Some((fd, info.mount_point.clone()))),
        // The classic id was reused by another mount: ours is gone.
        Ok((m, _)) if m.id == mid.id => Ok(None),
        Ok(_) => Err(ServiceError::WrongState {
            target: display(path),
            reason: format!(
                "something else is mounted on top of it at {}; unmount that first",
                display(&info.mount_point)
            ),
        }),
        Err(e) => Err(sys_err("statx", path, e)),
    }
}

/// The id of a mount just attached; if it cannot be read, the mount is taken down again (an
/// unrecorded mount must not stay behind).
fn attached_id(tree: OwnedFd, path: &Path) -> Result<MountId, ServiceError> {
    match mountfd::mount_of(&tree) {
        Ok((mid, _)) => Ok(mid),
        Err(e) => {
            let _ = mountfd::detach_fd(tree);
            Err(sys_err("statx", path, e))
        }
    }
}

fn mount_err(path: &Path) -> impl Fn(SysError) -> ServiceError + '_ {
    move |e| sys_err(e.op, path, e.errno)
}

/// Unmounts the recorded mount `mid` at `path`, not lazily: `EBUSY` while anything uses it,
/// `ESTALE` when what is there is not that mount (or, after the unmount, still is: something
/// mounted over it meanwhile went instead).
fn unmount_unless_busy(path: &Path, mid: MountId) -> Result<(), Errno> {
    let found = MountAt::find(path).map_err(|e| e.errno)?;
    match found {
        Some(m) if m.id().unique == mid.unique => m.unmount().map_err(|e| match e {
            UnmountError::Sys(e) => e.errno,
            UnmountError::Busy => Errno::BUSY,
            UnmountError::StillMounted => Errno::STALE,
        }),
        _ => Err(Errno::STALE),
    }
}

/// Creates the backup dir in the target's parent, owned by the caller with the target's mode.
/// Returns an `O_PATH` descriptor of it and its identity.
fn create_backup(
    creds: &FsCreds,
    parent: &OwnedFd,
    name: &OsStr,
    backup: &Path,
    target_stat: &rustix::fs::Stat,
) -> Result<(OwnedFd, DirId), ServiceError> {
    let mode = FsMode::from_raw_mode(target_stat.st_mode & 0o3777);
    let mkdir = || rustix::fs::mkdirat(parent, name, FsMode::from_raw_mode(0o700));
    let make = |override_dac: bool| -> Result<DirId, ServiceError> {
        let made = if override_dac {
            crate::caps::with_dac_override(mkdir)
        } else {
            mkdir()
        };
        made.map_err(|e| match e {
            Errno::EXIST => ServiceError::BackupInUse {
                path: display(backup),
                reason: "appeared while it was being created".into(),
            },
            e => lookup_err(backup, e),
        })?;
        let fd =
            mountfd::open_child_dir_to_read(parent, name).map_err(|e| lookup_err(backup, e))?;
        rustix::fs::fchmod(&fd, mode).map_err(|e| sys_err("chmod", backup, e))?;
        // Best effort: the target's group, if the caller may set it.
        let _ = rustix::fs::fchown(
            &fd,
            None,
            Some(rustix::fs::Gid::from_raw(target_stat.st_gid)),
        );
        let st = sys::fstat(&fd).map_err(|e| sys_err("stat", backup, e))?;
        Ok(DirId::of(&st))
    };
    let id = match make(false) {
        Ok(id) => id,
        // The caller may not write the parent (a target outside home, authorized by polkit).
        // Where root could (a parent of root's with its write bit), the helper makes it with
        // the caller's identity, past the parent's permissions (CAP_DAC_OVERRIDE for that one
        // mkdir), so that it is the caller's from the start.
        Err(ServiceError::PermissionDenied { .. })
            if sys::fstat(parent).is_ok_and(|p| p.st_uid == 0 && p.st_mode & 0o200 != 0) =>
        {
            make(true)?
        }
        Err(e) => return Err(e),
    };
    let fd = mountfd::open_child_dir(parent, name).map_err(|e| lookup_err(backup, e))?;
    let st = sys::fstat(&fd).map_err(|e| sys_err("stat", backup, e))?;
    if DirId::of(&st) != id || st.st_uid != creds.uid {
        return Err(ServiceError::BackupInUse {
            path: display(backup),
            reason: "replaced while it was being created".into(),
        });
    }
    Ok((fd, id))
}

/// Checks an existing backup path: an empty, non-mounted directory owned by the caller.
fn check_existing_backup(
    creds: &FsCreds,
    parent: &OwnedFd,
    name: &OsStr,
    backup: &Path,
) -> Result<Option<OwnedFd>, ServiceError> {
    let in_use = |reason: &str| ServiceError::BackupInUse {
        path: display(backup),
        reason: reason.to_string(),
    };
    let fd = match mountfd::open_child_dir(parent, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => return Err(in_use("is a symlink")),
        Err(Errno::NOTDIR) => return Err(in_use("is not a directory")),
        Err(e) => return Err(lookup_err(backup, e)),
    };
    let st = sys::fstat(&fd).map_err(|e| sys_err("stat", backup, e))?;
    if st.st_uid != creds.uid {
        return Err(in_use("exists and is not owned by the caller"));
    }
    let (_, is_root) = mountfd::mount_of(&fd).map_err(|e| sys_err("statx", backup, e))?;
    if is_root {
        return Err(in_use("is a mount point"));
    }
    if !mountfd::dir_is_empty(&fd).map_err(|e| sys_err("read", backup, e))? {
        return Err(in_use(
            "exists and is not empty (recover or remove it first)",
        ));
    }
    Ok(Some(fd))
}

struct BackupPlan {
    resolved: Resolved,
    existing: Option<OwnedFd>,
}

/// Opens the recorded backup mount of a target (the overlay's lower layer).
fn open_backup(rec: &MountRecord) -> Result<OwnedFd, ServiceError> {
    let mid = rec.backup_mount.ok_or_else(|| ServiceError::WrongState {
        target: display(&rec.target),
        reason: "the backup is not mounted".into(),
    })?;
    let fd = mountfd::open_dir(&rec.backup).map_err(|e| lookup_err(&rec.backup, e))?;
    match mountfd::mount_of(&fd) {
        Ok((m, true)) if m.unique == mid.unique => Ok(fd),
        Ok(_) => Err(ServiceError::WrongState {
            target: display(&rec.target),
            reason: format!(
                "{} is not the backup mount the helper made",
                display(&rec.backup)
            ),
        }),
        Err(e) => Err(sys_err("statx", &rec.backup, e)),
    }
}

/// What Detach did, step by step (kept even when a later step fails).
#[derive(Default)]
struct DetachOutcome {
    cover_gone: bool,
    overlay_gone: bool,
    backup_gone: bool,
    backup_dir_gone: bool,
    unmounted: Vec<String>,
    removed: Vec<String>,
    error: Option<ServiceError>,
}

fn detach(creds: &FsCreds, rec: &MountRecord) -> DetachOutcome {
    detach_with(creds, rec, false)
}

/// [`detach`]; `lazy_cover` only for a rollback of a cover just made and never recorded (nothing
/// of the caller's was written through it yet, and it must not stay behind).
fn detach_with(creds: &FsCreds, rec: &MountRecord, lazy_cover: bool) -> DetachOutcome {
    let mut out = DetachOutcome::default();
    let layers: [(Option<MountId>, &Path); 3] = [
        (rec.cover_mount, &rec.target),
        (rec.overlay_mount, &rec.volatile),
        (rec.backup_mount, &rec.backup),
    ];
    for (i, (mid, path)) in layers.into_iter().enumerate() {
        let gone = match mid {
            None => true,
            Some(mid) => match find_mount(path, mid) {
                Ok(None) => true,
                Ok(Some((fd, at))) => {
                    // The cover is taken down only when nothing uses it: lazily detached, files
                    // still open for writing on it would be written into a copy the manager
                    // then throws away. The overlay and the backup below it may go lazily.
                    //
                    // Both run with the caller's file system identity, as the lookups before
                    // them: umount2 needs CAP_SYS_ADMIN (kept on this thread), not root's uid,
                    // and a root lookup without CAP_DAC_READ_SEARCH could not even enter a
                    // private (0700/0750) home. The helper reaches nothing the caller cannot.
                    let unmounted = if i == 0 && !lazy_cover {
                        drop(fd);
                        unmount_unless_busy(&at, mid)
                    } else {
                        mountfd::detach_fd(fd)
                    };
                    match unmounted {
                        Ok(()) => {
                            out.unmounted.push(display(path));
                            true
                        }
                        Err(e) => {
                            out.error = Some(sys_err("umount", path, e));
                            false
                        }
                    }
                }
                Err(e) => {
                    out.error = Some(e);
                    false
                }
            },
        };
        if !gone {
            return out;
        }
        match i {
            0 => out.cover_gone = true,
            1 => out.overlay_gone = true,
            _ => out.backup_gone = true,
        }
    }
    // Remove the backup dir the helper created, if it is still that dir and empty.
    let Some(created) = rec.backup_created else {
        out.backup_dir_gone = true;
        return out;
    };
    let (Some(parent_path), Some(name)) = (rec.backup.parent(), rec.backup.file_name()) else {
        out.backup_dir_gone = true;
        return out;
    };
    let Ok(parent) = mountfd::open_dir(parent_path) else {
        out.backup_dir_gone = true;
        return out;
    };
    let same = mountfd::open_child_dir(&parent, name)
        .ok()
        .and_then(|fd| sys::fstat(&fd).ok())
        .is_some_and(|st| DirId::of(&st) == created && st.st_uid == creds.uid);
    if same {
        // Root only where the caller may not write the parent at all (EACCES); never to get
        // past a sticky directory's EPERM, which protects someone else's entry.
        let rmdir = || rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR);
        let r = match rmdir() {
            Err(Errno::ACCESS) => creds.as_root(rmdir).unwrap_or(Err(Errno::PERM)),
            r => r,
        };
        if r.is_ok() {
            out.removed.push(display(&rec.backup));
        }
    }
    out.backup_dir_gone = true;
    out
}

/// A copy of `m` with only the given layer (for a rollback).
fn only_layer(m: &MountRecord, cover: Option<MountId>, overlay: Option<MountId>) -> MountRecord {
    MountRecord {
        cover_mount: cover,
        overlay_mount: overlay,
        backup_mount: None,
        backup_created: None,
        ..m.clone()
    }
}

/// Takes down a mount that could not be recorded.
async fn rollback(creds: &FsCreds, m: MountRecord) {
    let target = m.target.clone();
    match creds.run(move |c| detach_with(c, &m, true)).await {
        Ok(out) if out.error.is_none() => {}
        _ => tracing::error!(target = %target.display(), "could not roll back an unrecorded mount"),
    }
}

fn entry(rec: &MountRecord) -> MountEntry {
    MountEntry {
        target: display(&rec.target),
        mode: rec.mode,
        backup: display(&rec.backup),
        volatile: display(&rec.volatile),
        upper: rec.upper.as_deref().map(display),
        work: rec.work.as_deref().map(display),
        backup_mounted: rec.backup_mount.is_some(),
        overlay_mounted: rec.overlay_mount.is_some(),
        covered: rec.cover_mount.is_some(),
    }
}

/// Refuses a target that is, contains or lies inside another recorded target or the area.
fn check_overlaps(rec: &UserRecord, target: &Path) -> Result<(), ServiceError> {
    for m in &rec.mounts {
        if m.target == target {
            return Err(ServiceError::AlreadyMounted {
                target: display(target),
            });
        }
        if paths::is_within(target, &m.target)
            || paths::is_within(&m.target, target)
            || paths::is_within(target, &m.volatile)
        {
            return Err(ServiceError::Overlaps {
                target: display(target),
                other: display(&m.target),
            });
        }
    }
    if let Some(area) = &rec.area {
        if paths::is_within(target, &area.path) || paths::is_within(&area.path, target) {
            return Err(ServiceError::Overlaps {
                target: display(target),
                other: display(&area.path),
            });
        }
    }
    Ok(())
}

impl Ctx {
    pub fn new(store: Store) -> Ctx {
        Ctx {
            store,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, uid: u32) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        locks.entry(uid).or_default().clone()
    }

    fn load(&self, uid: u32) -> Result<UserRecord, ServiceError> {
        self.store.load(uid).map_err(|e| io_err("read record", e))
    }

    fn save(&self, rec: &UserRecord) -> Result<(), ServiceError> {
        self.store.save(rec).map_err(|e| io_err("write record", e))
    }

    /// Handles one call for `peer`. Calls of one uid are serialized (their record is shared).
    pub async fn handle(&self, peer: &Peer, method: Method) -> Reply {
        match method {
            Method::GetInfo => Ok(to_parameters(&Info {
                vendor: "asd".into(),
                product: "asd-helper".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                url: "https://example.invalid/asd".into(),
                interfaces: vec![
                    asd_protocol::SERVICE_INTERFACE.into(),
                    asd_protocol::HELPER_INTERFACE.into(),
                ],
            })),
            Method::GetInterfaceDescription { interface } => {
                match asd_protocol::interface_description(&interface) {
                    Some(d) => {
                        let mut m = Map::new();
                        m.insert("description".into(), Value::String(d.to_string()));
                        Ok(m)
                    }
                    None => Err(ServiceError::InterfaceNotFound { interface }),
                }
            }
            other => {
                let user = peer
                    .user
                    .clone()
                    .ok_or_else(|| ServiceError::NotAuthorized {
                        action: String::new(),
                        target: other.subject().unwrap_or_default().to_string(),
                        reason: format!("uid {} has no passwd entry", peer.uid),
                    })?;
                if user.is_empty() || user.contains('/') || user == "." || user == ".." {
                    return Err(ServiceError::NotAuthorized {
                        action: String::new(),
                        target: String::new(),
                        reason: "unusable user name".into(),
                    });
                }
                let lock = self.lock_for(peer.uid);
                let _guard = lock.lock().await;
                let mut rec = self.load(peer.uid)?;
                rec.user = user.clone();
                self.dispatch(peer, &user, &mut rec, other).await
            }
        }
    }

    async fn dispatch(&self, peer: &Peer, user: &str, rec: &mut UserRecord, m: Method) -> Reply {
        let creds = peer.creds();
        let worker = |e: std::io::Error| io_err("worker thread", e);
        match m {
            Method::PrepareArea { volatile } => {
                let volatile = paths::normalized(&volatile)?;
                if let Some(old) = &rec.area {
                    if old.volatile != volatile && !rec.mounts.is_empty() {
                        return Err(ServiceError::WrongState {
                            target: display(&volatile),
                            reason: format!(
                                "mounts are recorded in the area under {}; detach them first",
                                display(&old.volatile)
                            ),
                        });
                    }
                }
                let u = user.to_string();
                let vol = volatile.clone();
                let area = creds
                    .run(move |c| prepare_area(c, &u, &vol))
                    .await
                    .map_err(worker)??;
                let reply = AreaReply {
                    area: display(&area.path),
                };
                rec.area = Some(area);
                self.save(rec)?;
                Ok(to_parameters(&reply))
            }
            Method::BindBackup { target, mode } => {
                let target = paths::normalized(&target)?;
                let area = rec.area.clone().ok_or(ServiceError::AreaNotPrepared {})?;
                check_overlaps(rec, &target)?;
                if rec.mounts.len() >= MAX_TARGETS_PER_UID {
                    return Err(ServiceError::TooManyTargets {
                        limit: MAX_TARGETS_PER_UID as u64,
                    });
                }
                let backup =
                    paths::backup_of(&target).ok_or_else(|| ServiceError::InvalidPath {
                        path: display(&target),
                        reason: "no parent".into(),
                    })?;
                let bname = paths::backup_name(&target).unwrap_or_default();
                // 1. Check, as the caller.
                let (t, b, n) = (target.clone(), backup.clone(), bname.clone());
                let plan = creds
                    .run(move |c| -> Result<BackupPlan, ServiceError> {
                        let resolved = resolve_target(c, &t)?;
                        if mode == Mode::Overlay {
                            check_readable(&resolved.fd, &t)?;
                        }
                        beside::refuse_shared_names(c, &resolved.parent, &t)?;
                        let existing = check_existing_backup(c, &resolved.parent, &n, &b)?;
                        Ok(BackupPlan { resolved, existing })
                    })
                    .await
                    .map_err(worker)??;
                // 2. Ask polkit.
                let grant = polkit::authorize(peer, &target).await?;
                tracing::debug!(uid = peer.uid, target = %target.display(), ?grant, "authorized");
                // 3. Mount through the descriptors opened in step 1.
                let (b, n) = (backup.clone(), bname.clone());
                let (mid, created, target_dir) = creds
                    .run(
                        move |c| -> Result<(MountId, Option<DirId>, DirId), ServiceError> {
                            let BackupPlan { resolved, existing } = plan;
                            let (backup_fd, created) = match existing {
                                // An empty dir of the caller's at asd's backup name is what the
                                // helper itself would make (one left by a reboot, say): it is
                                // removed at Detach like one made now, or it would stay behind
                                // where the caller may not remove it.
                                Some(fd) => {
                                    let id = sys::fstat(&fd)
                                        .map(|st| DirId::of(&st))
                                        .map_err(|e| sys_err("stat", &b, e))?;
                                    (fd, Some(id))
                                }
                                None => {
                                    let (fd, id) =
                                        create_backup(c, &resolved.parent, &n, &b, &resolved.stat)?;
                                    (fd, Some(id))
                                }
                            };
                            let tree =
                                mountfd::bind_fd(&resolved.fd, &backup_fd).map_err(mount_err(&b));
                            let tree = match tree {
                                Ok(t) => t,
                                Err(e) => {
                                    if created.is_some() {
                                        let _ = rustix::fs::unlinkat(
                                            &resolved.parent,
                                            &n,
                                            AtFlags::REMOVEDIR,
                                        );
                                    }
                                    return Err(e);
                                }
                            };
                            let mid = attached_id(tree, &b)?;
                            Ok((mid, created, DirId::of(&resolved.stat)))
                        },
                    )
                    .await
                    .map_err(worker)??;
                let a = AreaPaths::new(&target);
                let overlay = mode == Mode::Overlay;
                rec.mounts.push(MountRecord {
                    target: target.clone(),
                    mode,
                    target_dir,
                    backup: backup.clone(),
                    backup_created: created,
                    backup_mount: Some(mid),
                    volatile: AreaPaths::join(&area.path, &a.volatile),
                    upper: overlay.then(|| AreaPaths::join(&area.path, &a.upper)),
                    work: overlay.then(|| AreaPaths::join(&area.path, &a.work)),
                    overlay_mount: None,
                    cover_mount: None,
                    frozen: false,
                });
                if let Err(e) = self.save(rec) {
                    if let Some(m) = rec.mounts.pop() {
                        rollback(&creds, m).await;
                    }
                    return Err(e);
                }
                Ok(to_parameters(&BackupReply {
                    backup: display(&backup),
                }))
            }
            Method::MountOverlay { target } => {
                let target = paths::normalized(&target)?;
                let area = rec.area.clone().ok_or(ServiceError::AreaNotPrepared {})?;
                let m = rec
                    .find(&target)
                    .cloned()
                    .ok_or_else(|| ServiceError::NotMounted {
                        target: display(&target),
                    })?;
                let wrong = |reason: &str| ServiceError::WrongState {
                    target: display(&target),
                    reason: reason.to_string(),
                };
                if m.mode != Mode::Overlay {
                    return Err(wrong("recorded in copy mode"));
                }
                if m.overlay_mount.is_some() {
                    return Err(wrong("the overlay is already mounted"));
                }
                if m.cover_mount.is_some() {
                    return Err(wrong("already covered"));
                }
                let m2 = m.clone();
                let mid = creds
                    .run(move |c| -> Result<MountId, ServiceError> {
                        let lower = open_backup(&m2)?;
                        check_readable(&lower, &m2.backup)?;
                        let area_fd = open_area(c, &area)?;
                        let a = AreaPaths::new(&m2.target);
                        let upper_path = AreaPaths::join(&area.path, &a.upper);
                        let upper_is_new = !upper_path.exists();
                        let upper = open_beneath(c, &area_fd, &area.path, &a.upper, true, false)?;
                        if upper_is_new {
                            // The overlay's root takes the upper dir's mode: give it the target's.
                            let mode = sys::fstat(&lower)
                                .map_err(|e| sys_err("stat", &m2.backup, e))?
                                .st_mode
                                & 0o1777;
                            let (Some(parent), Some(name)) =
                                (a.upper.split_last().map(|(_, p)| p), a.upper.last())
                            else {
                                return Err(ServiceError::system("upper path", libc::EINVAL));
                            };
                            let parent =
                                open_beneath(c, &area_fd, &area.path, parent, false, false)?;
                            let rd = mountfd::open_child_dir_to_read(&parent, name)
                                .map_err(|e| lookup_err(&upper_path, e))?;
                            rustix::fs::fchmod(&rd, FsMode::from_raw_mode(mode))
                                .map_err(|e| sys_err("chmod", &upper_path, e))?;
                        }
                        let work = open_beneath(c, &area_fd, &area.path, &a.work, true, false)?;
                        let merged =
                            open_beneath(c, &area_fd, &area.path, &a.volatile, true, false)?;
                        let layers = Overlay {
                            lower: lower.as_fd(),
                            upper: upper.as_fd(),
                            work: work.as_fd(),
                        };
                        let mnt =
                            mountfd::mount_overlay_with(layers, &merged, sys::with_dac_override)
                                .map_err(mount_err(&m2.volatile))?;
                        attached_id(mnt, &m2.volatile)
                    })
                    .await
                    .map_err(worker)??;
                if let Some(r) = rec.find_mut(&target) {
                    r.overlay_mount = Some(mid);
                }
                if let Err(e) = self.save(rec) {
                    rollback(&creds, only_layer(&m, None, Some(mid))).await;
                    return Err(e);
                }
                Ok(to_parameters(&OverlayReply {
                    volatile: display(&m.volatile),
                    upper: m.upper.as_deref().map(display).unwrap_or_default(),
                    work: m.work.as_deref().map(display).unwrap_or_default(),
                }))
            }
            Method::Cover { target, mode } => {
                let target = paths::normalized(&target)?;
                let area = rec.area.clone().ok_or(ServiceError::AreaNotPrepared {})?;
                let m = rec
                    .find(&target)
                    .cloned()
                    .ok_or_else(|| ServiceError::NotMounted {
                        target: display(&target),
                    })?;
                let wrong = |reason: String| ServiceError::WrongState {
                    target: display(&target),
                    reason,
                };
                if m.mode != mode {
                    return Err(wrong(format!("recorded in {} mode", m.mode)));
                }
                if m.cover_mount.is_some() {
                    return Err(wrong("already covered".into()));
                }
                if m.backup_mount.is_none() {
                    return Err(wrong("the backup is not mounted".into()));
                }
                if mode == Mode::Overlay && m.overlay_mount.is_none() {
                    return Err(wrong(
                        "the overlay is not mounted (call MountOverlay)".into(),
                    ));
                }
                let m2 = m.clone();
                let mid = creds
                    .run(move |c| -> Result<MountId, ServiceError> {
                        let resolved = resolve_target(c, &m2.target)?;
                        if DirId::of(&resolved.stat) != m2.target_dir {
                            return Err(ServiceError::WrongState {
                                target: display(&m2.target),
                                reason: "the target was replaced since BindBackup".into(),
                            });
                        }
                        let area_fd = open_area(c, &area)?;
                        let a = AreaPaths::new(&m2.target);
                        let source = match m2.mode {
                            Mode::Copy => {
                                open_beneath(c, &area_fd, &area.path, &a.volatile, false, false)?
                            }
                            Mode::Overlay => {
                                let fd = open_beneath(
                                    c,
                                    &area_fd,
                                    &area.path,
                                    &a.volatile,
                                    false,
                                    true,
                                )?;
                                let ok = matches!(
                                    (mountfd::mount_of(&fd), m2.overlay_mount),
                                    (Ok((cur, true)), Some(want)) if cur.unique == want.unique
                                );
                                if !ok {
                                    return Err(ServiceError::WrongState {
                                        target: display(&m2.target),
                                        reason: "the overlay is not mounted where it was".into(),
                                    });
                                }
                                fd
                            }
                        };
                        let tree = mountfd::bind_fd(&source, &resolved.fd)
                            .map_err(mount_err(&m2.target))?;
                        attached_id(tree, &m2.target)
                    })
                    .await
                    .map_err(worker)??;
                if let Some(r) = rec.find_mut(&target) {
                    r.cover_mount = Some(mid);
                }
                if let Err(e) = self.save(rec) {
                    rollback(&creds, only_layer(&m, Some(mid), None)).await;
                    return Err(e);
                }
                Ok(to_parameters(&CoverReply {
                    volatile: display(&m.volatile),
                }))
            }
            Method::Detach { target } => {
                let target = paths::normalized(&target)?;
                let m = rec
                    .find(&target)
                    .cloned()
                    .ok_or_else(|| ServiceError::NotMounted {
                        target: display(&target),
                    })?;
                let out = creds.run(move |c| detach(c, &m)).await.map_err(worker)?;
                if let Some(r) = rec.find_mut(&target) {
                    if out.cover_gone {
                        r.cover_mount = None;
                    }
                    if out.overlay_gone {
                        r.overlay_mount = None;
                    }
                    if out.backup_gone {
                        r.backup_mount = None;
                    }
                }
                if out.backup_dir_gone {
                    rec.mounts.retain(|r| !(r.target == target && r.is_empty()));
                }
                self.save(rec)?;
                if let Some(e) = out.error {
                    return Err(e);
                }
                Ok(to_parameters(&DetachReply {
                    unmounted: out.unmounted,
                    removed: out.removed,
                }))
            }
            Method::Freeze { target, frozen } => {
                let target = paths::normalized(&target)?;
                let m = rec
                    .find(&target)
                    .cloned()
                    .ok_or_else(|| ServiceError::NotMounted {
                        target: display(&target),
                    })?;
                let Some(mid) = m.cover_mount else {
                    return Err(ServiceError::WrongState {
                        target: display(&target),
                        reason: "not covered".into(),
                    });
                };
                let now = creds
                    .run(move |c| -> Result<bool, ServiceError> {
                        let (fd, _) = find_mount(&m.target, mid)?.ok_or_else(|| {
                            ServiceError::WrongState {
                                target: display(&m.target),
                                reason: "the cover is gone".into(),
                            }
                        })?;
                        match c.as_root(|| mountfd::set_read_only(&fd, frozen)) {
                            Ok(Ok(())) => Ok(frozen),
                            // Files open for writing: it stays writable; the manager copes.
                            Ok(Err(Errno::BUSY)) if frozen => Ok(false),
                            Ok(Err(e)) => Err(sys_err("mount_setattr", &m.target, e)),
                            Err(e) => Err(io_err("switch identity", e)),
                        }
                    })
                    .await
                    .map_err(worker)??;
                if let Some(r) = rec.find_mut(&target) {
                    r.frozen = now;
                }
                self.save(rec)?;
                Ok(to_parameters(&FreezeReply { frozen: now }))
            }
            Method::MakeBeside { target, name, kind } => {
                let target = paths::normalized(&target)?;
                polkit::authorize(peer, &target).await?;
                creds
                    .run(move |c| beside::make(c, &target, &name, kind))
                    .await
                    .map_err(worker)??;
                Ok(Map::new())
            }
            Method::RenameBeside { target, from, to } => {
                let target = paths::normalized(&target)?;
                polkit::authorize(peer, &target).await?;
                creds
                    .run(move |c| beside::rename(c, &target, &from, &to))
                    .await
                    .map_err(worker)??;
                Ok(Map::new())
            }
            Method::RemoveBeside { target, name } => {
                let target = paths::normalized(&target)?;
                polkit::authorize(peer, &target).await?;
                creds
                    .run(move |c| beside::remove(c, &target, &name))
                    .await
                    .map_err(worker)??;
                Ok(Map::new())
            }
            Method::ListMounts => Ok(to_parameters(&MountList {
                area: rec.area.as_ref().map(|a| display(&a.path)),
                mounts: rec.mounts.iter().map(entry).collect(),
            })),
            Method::GetInfo | Method::GetInterfaceDescription { .. } => {
                Err(ServiceError::MethodNotImplemented {
                    method: m.full_name(),
                })
            }
        }
    }
}
