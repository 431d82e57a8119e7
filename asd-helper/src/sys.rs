//! Thin wrappers over the system calls the helper uses: path resolution that refuses symlinks,
//! mount-id lookups, the new mount API, and per-thread file system credentials.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Mode as FsMode, OFlags, ResolveFlags, Stat, StatxAttributes, StatxFlags,
};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a 64-bit mount id that is never reused.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const MS_PRIVATE: u64 = 1 << 18;

/// The identity of a mount: the classic id (as in /proc/self/mountinfo; may be reused after an
/// unmount) and the unique 64-bit id (never reused while the system runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountId {
    pub id: u64,
    pub unique: u64,
}

/// Opens a directory as an `O_PATH` descriptor, refusing symlinks in every component
/// (`RESOLVE_NO_SYMLINKS`, which covers the last one too) and magic links.
pub fn open_dir(dirfd: impl AsFd, path: &Path, extra: ResolveFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dirfd,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | extra,
    )
}

/// Opens one entry of `dir` (a single name) as `O_PATH`, without following a symlink: a symlink
/// gives `ELOOP`, anything but a directory `ENOTDIR`.
pub fn open_child_dir(dir: impl AsFd, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    if name.as_bytes().contains(&b'/') || name == "." || name == ".." || name.is_empty() {
        return Err(Errno::INVAL);
    }
    open_dir(dir, Path::new(name), ResolveFlags::BENEATH)
}

/// Opens a directory for reading (to list or chmod it), refusing symlinks.
pub fn open_dir_read(dir: impl AsFd, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        Path::new(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        FsMode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH,
    )
}

pub fn at_fdcwd() -> BorrowedFd<'static> {
    rustix::fs::CWD
}

pub fn fstat(fd: impl AsFd) -> Result<Stat, Errno> {
    rustix::fs::fstat(fd)
}

pub fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// The file system magic (`statfs.f_type`).
pub fn fs_magic(fd: impl AsFd) -> Result<u64, Errno> {
    // f_type is a signed type on some targets; the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    Ok((rustix::fs::fstatfs(fd)?.f_type as u64) & 0xffff_ffff)
}

/// The mount an open descriptor is on, and whether the descriptor is that mount's root.
pub fn mount_of(fd: impl AsFd) -> Result<(MountId, bool), Errno> {
    let fd = fd.as_fd();
    let legacy = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    let unique = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
    )?;
    let unique_id = if unique.stx_mask & STATX_MNT_ID_UNIQUE != 0 {
        unique.stx_mnt_id
    } else {
        // Older kernel: fall back to the classic id (reusable, but still checked with the path).
        legacy.stx_mnt_id
    };
    let root = legacy
        .stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        && legacy.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    Ok((
        MountId {
            id: legacy.stx_mnt_id,
            unique: unique_id,
        },
        root,
    ))
}

/// Whether the entries of a directory (opened for reading) are only `.` and `..`.
pub fn dir_is_empty(fd: OwnedFd) -> Result<bool, Errno> {
    let dir = rustix::fs::Dir::new(fd)?;
    for entry in dir {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, attr)`: changes the one mount `fd` refers to (not
/// recursive).
fn mount_setattr(fd: impl AsFd, attr: &MountAttr) -> Result<(), Errno> {
    let empty = c"";
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from `attr`, a live, properly
    // laid out `struct mount_attr` (MOUNT_ATTR_SIZE_VER0 = 32 bytes); `empty` is a valid C string
    // and the descriptor is borrowed for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_fd().as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

/// Sets nosuid,nodev and private propagation on the one mount `fd` refers to.
pub fn make_private_nosuid_nodev(fd: impl AsFd) -> Result<(), Errno> {
    mount_setattr(
        fd,
        &MountAttr {
            attr_set: u64::from(
                (MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV).bits(),
            ),
            attr_clr: 0,
            propagation: MS_PRIVATE,
            userns_fd: 0,
        },
    )
}

/// Makes the one mount `fd` refers to read-only, or writable again. Making it read-only fails
/// with `EBUSY` while files are open for writing on it.
pub fn set_read_only(fd: impl AsFd, read_only: bool) -> Result<(), Errno> {
    let rdonly = u64::from(MountAttrFlags::MOUNT_ATTR_RDONLY.bits());
    let (attr_set, attr_clr) = if read_only { (rdonly, 0) } else { (0, rdonly) };
    mount_setattr(
        fd,
        &MountAttr {
            attr_set,
            attr_clr,
            propagation: 0,
            userns_fd: 0,
        },
    )
}

/// Clones the single mount at `source` (not recursive), makes the clone private, nosuid and
/// nodev, and attaches it on `target`. Returns the new mount's descriptor.
pub fn bind_fd(source: impl AsFd, target: impl AsFd) -> Result<OwnedFd, (&'static str, Errno)> {
    let tree = rustix::mount::open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| ("open_tree", e))?;
    make_private_nosuid_nodev(&tree).map_err(|e| ("mount_setattr", e))?;
    rustix::mount::move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| ("move_mount", e))?;
    Ok(tree)
}

/// Creates an overlay (lower, upper and work given as descriptors, `userxattr`), nosuid and nodev,
/// and attaches it on `target`. The overlay keeps the credentials of the thread that calls this
/// as its mounter credentials: call it with the caller's file system identity.
pub fn mount_overlay(
    lower: impl AsFd,
    upper: impl AsFd,
    work: impl AsFd,
    target: impl AsFd,
) -> Result<OwnedFd, (&'static str, Errno)> {
    let fs =
        rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| ("fsopen", e))?;
    rustix::mount::fsconfig_set_string(&fs, "source", "asd").map_err(|e| ("fsconfig source", e))?;
    rustix::mount::fsconfig_set_fd(&fs, "lowerdir+", lower)
        .map_err(|e| ("fsconfig lowerdir+", e))?;
    rustix::mount::fsconfig_set_fd(&fs, "upperdir", upper).map_err(|e| ("fsconfig upperdir", e))?;
    rustix::mount::fsconfig_set_fd(&fs, "workdir", work).map_err(|e| ("fsconfig workdir", e))?;
    rustix::mount::fsconfig_set_flag(&fs, "userxattr").map_err(|e| ("fsconfig userxattr", e))?;
    // overlayfs keeps the credentials of this call as its mounter credentials, and needs
    // CAP_DAC_OVERRIDE in them for its work dir (it makes `work/work` mode 0000): raise it for
    // this call only, on this thread only.
    caps::raise(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_DAC_OVERRIDE,
    )
    .map_err(|_| ("raise CAP_DAC_OVERRIDE", Errno::PERM))?;
    let created = rustix::mount::fsconfig_create(&fs);
    if caps::drop(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_DAC_OVERRIDE,
    )
    .is_err()
    {
        tracing::error!("cannot lower CAP_DAC_OVERRIDE again; aborting");
        std::process::abort();
    }
    created.map_err(|e| ("fsconfig create", e))?;
    let mnt = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| ("fsmount", e))?;
    make_private_nosuid_nodev(&mnt).map_err(|e| ("mount_setattr", e))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| ("move_mount", e))?;
    Ok(mnt)
}

/// Unmounts the mount whose root `fd` is (lazily: the descriptor itself keeps a reference, so a
/// plain umount would be "busy"). Resolving `/proc/self/fd/N` lands on exactly that mount.
pub fn detach_fd(fd: OwnedFd) -> Result<(), Errno> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let r = rustix::mount::unmount(path.as_str(), UnmountFlags::DETACH);
    drop(fd);
    r
}

/// Unmounts the mount `mid` at `path`, not lazily: `EBUSY` while anything uses it. Addressed
/// through a descriptor of the parent (no symlinks on the way) as `/proc/self/fd/P/name`, after
/// checking that what is there is that mount, so a rename of an ancestor cannot redirect it (a
/// mount point itself cannot be renamed); no descriptor of the mount itself is held, as that
/// alone would make it busy.
pub fn unmount_unless_busy(path: &Path, mid: MountId) -> Result<(), Errno> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Errno::INVAL);
    };
    let pfd = open_dir(at_fdcwd(), parent, ResolveFlags::empty())?;
    let here = open_child_dir(&pfd, name)?;
    match mount_of(&here)? {
        (m, true) if m.unique == mid.unique => {}
        _ => return Err(Errno::STALE),
    }
    drop(here);
    let mut via = std::ffi::OsString::from(format!("/proc/self/fd/{}/", pfd.as_raw_fd()));
    via.push(name);
    rustix::mount::unmount(Path::new(&via), UnmountFlags::NOFOLLOW)?;
    // Check and unmount are two steps: if something was mounted over it in between, that went
    // instead, and ours is still there. Then it is not reported gone.
    match open_child_dir(&pfd, name).and_then(|fd| mount_of(&fd)) {
        Ok((m, true)) if m.unique == mid.unique => Err(Errno::STALE),
        _ => Ok(()),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u64,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.parse().ok()?;
            let mount_point = unescape(fields.nth(3)?);
            // Skip optional fields up to the "-" separator, then the fs type.
            let mut rest = fields.skip_while(|f| *f != "-");
            rest.next()?;
            let fs_type = rest.next()?.to_string();
            Some(MountInfo {
                id,
                mount_point,
                fs_type,
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace.
pub fn mountinfo() -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The caller's file system identity, applied to one thread.
#[derive(Debug, Clone)]
pub struct FsCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn set_fs_ids(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    let groups: Vec<rustix::process::Gid> = groups
        .iter()
        .map(|&g| rustix::process::Gid::from_raw(g))
        .collect();
    // Per-thread setgroups (a raw syscall; glibc's setgroups would change every thread).
    rustix::thread::set_thread_groups(&groups)?;
    // SAFETY: setfsgid/setfsuid take plain integers and only change this thread's credentials
    // (glibc does not broadcast them to other threads). They return the previous id.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    // They report no error: read the ids back (an invalid id changes nothing and returns the
    // current one).
    // SAFETY: as above; u32::MAX (-1) is never a valid id, so these calls only query.
    let (now_uid, now_gid) = unsafe {
        (
            libc::setfsuid(u32::MAX) as u32,
            libc::setfsgid(u32::MAX) as u32,
        )
    };
    if now_uid != uid || now_gid != gid {
        return Err(io::Error::other(format!(
            "could not switch file system ids to {uid}:{gid} (now {now_uid}:{now_gid})"
        )));
    }
    // Switching the fs uid back to 0 raises every fs capability of the permitted set into the
    // effective one; CAP_DAC_OVERRIDE is only ever wanted while an overlay is created.
    if uid == 0 {
        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_DAC_OVERRIDE,
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

impl FsCreds {
    /// Runs `f` on a new thread whose file system uid, gid and groups are the caller's: every
    /// path lookup, permission check and file it creates is the caller's. The thread keeps its
    /// other capabilities (CAP_SYS_ADMIN for mounts). The thread ends with `f`, so the borrowed
    /// identity never leaks into a thread that serves someone else.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FsCreds) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = io::Result<T>> {
        let creds = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("asd-uid-{}", creds.uid))
            .spawn(move || {
                let result = set_fs_ids(creds.uid, creds.gid, &creds.groups).map(|()| f(&creds));
                let _ = tx.send(result);
            });
        async move {
            spawned?;
            rx.await
                .map_err(|_| io::Error::other("worker thread ended without a result"))?
        }
    }

    /// Runs `f` with root's file system identity on this (worker) thread, then switches back to
    /// the caller's. Used only for the few steps the caller cannot do in a directory they do
    /// not own (creating or removing the backup dir next to a target outside their home).
    pub fn as_root<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        set_fs_ids(0, 0, &[])?;
        let out = f();
        if let Err(e) = set_fs_ids(self.uid, self.gid, &self.groups) {
            // Never continue with root's identity in a caller's thread.
            tracing::error!("cannot switch back to uid {}: {e}; aborting", self.uid);
            std::process::abort();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_identity_stays_on_its_thread() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! skipped borrowed_identity_stays_on_its_thread: needs root");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let creds = FsCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let (on_worker, root_inside) = rt
            .block_on(creds.run(|c| {
                // SAFETY: u32::MAX only queries the current fs ids.
                let now = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
                // SAFETY: as above.
                let root = c.as_root(|| unsafe { libc::setfsuid(u32::MAX) }).unwrap();
                // SAFETY: as above.
                let back = unsafe { libc::setfsuid(u32::MAX) };
                (now, (root, back))
            }))
            .unwrap();
        assert_eq!(on_worker, (65534, 65534));
        assert_eq!(root_inside, (0, 65534));
        // This thread never changed.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setfsuid(u32::MAX) }, 0);
    }

    #[test]
    fn parses_mountinfo_lines() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    99 22 0:50 / /home/a/with\\040space rw shared:5 master:1 - tmpfs tmpfs rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, 22);
        assert_eq!(m[0].fs_type, "proc");
        assert_eq!(m[1].mount_point, Path::new("/home/a/with space"));
        assert_eq!(m[1].fs_type, "tmpfs");
    }
}
