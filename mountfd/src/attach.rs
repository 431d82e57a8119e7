//! Mounts made through descriptors: a bind of one opened directory onto another, an overlay of
//! opened layers, and the attributes of one mount.
//!
//! Every mount is built detached (`open_tree(OPEN_TREE_CLONE)` or `fsmount`), made private,
//! `nosuid` and `nodev` while nobody can see it, and only then attached with `move_mount` onto
//! the target's descriptor: nothing is ever mounted by path, so a path swapped after the caller
//! checked it cannot redirect the mount. Made private before it is attached, a bind is no peer
//! of the mount it was cloned from, so a mount later made on one does not show on the other.
//! (Attached below a shared mount, the kernel makes it shared again, in a peer group of its
//! own, and copies it to that mount's peers.) Binds clone one mount, never the mounts beneath
//! it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::error::SysError;

/// `MS_PRIVATE`, as `mount_attr.propagation` takes it.
const MS_PRIVATE: u64 = libc::MS_PRIVATE;

/// `struct mount_attr` of mount_setattr(2) (`MOUNT_ATTR_SIZE_VER0`, 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, attr)`: changes the one mount `fd` is the root of (not
/// recursive). Not wrapped by rustix 1.x.
fn mount_setattr(fd: impl AsFd, attr: &MountAttr) -> Result<(), Errno> {
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from `attr`, a live value laid
    // out as the kernel's `struct mount_attr`; the path is a valid NUL-terminated empty string
    // used with AT_EMPTY_PATH, and the descriptor is borrowed for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

fn nosuid_nodev() -> MountAttrFlags {
    MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV
}

/// Sets `nosuid`, `nodev` and private propagation on the one mount `fd` is the root of.
pub fn make_private_nosuid_nodev(fd: impl AsFd) -> Result<(), Errno> {
    mount_setattr(
        fd,
        &MountAttr {
            attr_set: u64::from(nosuid_nodev().bits()),
            attr_clr: 0,
            propagation: MS_PRIVATE,
            userns_fd: 0,
        },
    )
}

/// Makes the one mount `fd` is the root of read-only, or writable again. Making it read-only
/// fails with `EBUSY` while files are open for writing on it.
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

/// Attaches the detached mount `mnt` on the directory `target` (both descriptors).
fn attach(mnt: &OwnedFd, target: impl AsFd) -> Result<(), SysError> {
    rustix::mount::move_mount(
        mnt,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(SysError::of("move_mount"))
}

/// Binds the directory `source` onto the directory `target`: a clone of the single mount at
/// `source` (not recursive), made private, `nosuid` and `nodev`, attached on `target`. Returns
/// a descriptor of the new mount (its root), for its id; close it before unmounting.
pub fn bind_fd(source: impl AsFd, target: impl AsFd) -> Result<OwnedFd, SysError> {
    let tree = rustix::mount::open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(SysError::of("open_tree"))?;
    make_private_nosuid_nodev(&tree).map_err(SysError::of("mount_setattr"))?;
    attach(&tree, target)?;
    Ok(tree)
}

/// The layers of an overlay, as opened directories.
#[derive(Clone, Copy)]
pub struct Overlay<'a> {
    pub lower: BorrowedFd<'a>,
    pub upper: BorrowedFd<'a>,
    pub work: BorrowedFd<'a>,
}

/// Mounts an overlay of `layers` on `target`; see [`mount_overlay_with`].
pub fn mount_overlay(layers: Overlay<'_>, target: impl AsFd) -> Result<OwnedFd, SysError> {
    mount_overlay_with(layers, target, |create| create())
}

/// Creates an overlay (`lowerdir+`, `upperdir` and `workdir` given as descriptors, `userxattr`,
/// source `asd`), `nosuid`, `nodev` and private, and attaches it on `target`. Returns a
/// descriptor of the new mount.
///
/// overlayfs keeps the credentials of the call that creates it (`fsconfig(FSCONFIG_CMD_CREATE)`)
/// as its mounter credentials, which it uses for every later access to the layers.
/// `around_create` runs that one call (`create`): a caller that must hold a capability just
/// there raises it around `create()` and lowers it after.
///
/// `userxattr` keeps the overlay's own marks (opaque directories) in `user.overlay.*`, which
/// the layers' owner can read, rather than in root-only `trusted.*`.
pub fn mount_overlay_with(
    layers: Overlay<'_>,
    target: impl AsFd,
    around_create: impl FnOnce(&dyn Fn() -> Result<(), SysError>) -> Result<(), SysError>,
) -> Result<OwnedFd, SysError> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(SysError::of("fsopen overlay"))?;
    rustix::mount::fsconfig_set_string(&fs, "source", "asd")
        .map_err(SysError::of("fsconfig source"))?;
    rustix::mount::fsconfig_set_fd(&fs, "lowerdir+", layers.lower)
        .map_err(SysError::of("fsconfig lowerdir+"))?;
    rustix::mount::fsconfig_set_fd(&fs, "upperdir", layers.upper)
        .map_err(SysError::of("fsconfig upperdir"))?;
    rustix::mount::fsconfig_set_fd(&fs, "workdir", layers.work)
        .map_err(SysError::of("fsconfig workdir"))?;
    rustix::mount::fsconfig_set_flag(&fs, "userxattr")
        .map_err(SysError::of("fsconfig userxattr"))?;
    around_create(&|| {
        rustix::mount::fsconfig_create(&fs).map_err(SysError::of("fsconfig create"))
    })?;
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, nosuid_nodev())
        .map_err(SysError::of("fsmount"))?;
    make_private_nosuid_nodev(&mnt).map_err(SysError::of("mount_setattr"))?;
    attach(&mnt, target)?;
    Ok(mnt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testns;
    use crate::{mount_of, mountinfo, open_dir};
    use std::path::Path;

    fn mkdirs(dir: &Path, names: &[&str]) {
        for n in names {
            std::fs::create_dir_all(dir.join(n)).expect("mkdir");
        }
    }

    #[test]
    fn a_bind_through_descriptors_lands_on_the_opened_directory() {
        testns::run(|dir| {
            mkdirs(dir, &["src/sub", "dst", "decoy"]);
            std::fs::write(dir.join("src/file"), b"from src").expect("write");
            // A mount beneath the source must not come along (the bind is not recursive).
            testns::mount_tmpfs(&dir.join("src/sub"), "below");
            std::fs::write(dir.join("src/sub/hidden"), b"x").expect("write");
            let src = open_dir(&dir.join("src")).expect("open");
            let dst = open_dir(&dir.join("dst")).expect("open");
            // The target path is swapped for another directory after it was opened: the mount
            // still lands on the directory that was opened.
            std::fs::rename(dir.join("dst"), dir.join("dst.moved")).expect("rename");
            std::fs::rename(dir.join("decoy"), dir.join("dst")).expect("rename");
            let tree = bind_fd(&src, &dst).expect("bind");
            let (id, root) = mount_of(&tree).expect("mount_of");
            assert!(root);
            drop((src, dst, tree));

            let read = |p: &str| std::fs::read(dir.join(p)).ok();
            assert_eq!(read("dst.moved/file").as_deref(), Some(&b"from src"[..]));
            assert_eq!(
                read("dst/file"),
                None,
                "the swapped-in directory stays untouched"
            );
            assert_eq!(read("dst.moved/sub/hidden"), None, "not recursive");
            let table = mountinfo::read().expect("mountinfo");
            let m = table.iter().find(|m| m.id == id.id).expect("listed");
            assert_eq!(m.mount_point, dir.join("dst.moved"));
            assert!(m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");
            assert_eq!((m.shared, m.master), (None, None), "private: {m:?}");
        });
    }

    #[test]
    fn a_bind_on_a_shared_tree_leaves_its_origins_peer_group() {
        // On a system booted with systemd `/` is shared. A bind of a directory there must not
        // be a peer of its origin: a mount later made on the origin (the cover on the target)
        // must not show on the bind (the backup), nor one made on the bind on the origin.
        testns::run(|dir| {
            mkdirs(dir, &["src/a", "src/b", "dst"]);
            testns::make_shared(dir);
            let src = open_dir(&dir.join("src")).expect("open");
            let dst = open_dir(&dir.join("dst")).expect("open");
            let tree = bind_fd(&src, &dst).expect("bind");
            let (id, _) = mount_of(&tree).expect("mount_of");
            drop((src, dst, tree));
            testns::mount_tmpfs(&dir.join("src/a"), "on-origin");
            testns::mount_tmpfs(&dir.join("dst/b"), "on-bind");
            let table = mountinfo::read().expect("mountinfo");
            let m = table.iter().find(|m| m.id == id.id).expect("listed");
            let origin = mountinfo::containing(&table, &dir.join("src")).expect("origin");
            assert!(origin.shared.is_some(), "{origin:?}");
            assert_ne!(m.shared, origin.shared, "{m:?}");
            assert_ne!(m.master, origin.shared, "{m:?}");
            assert!(!mountinfo::is_mount_point(&table, &dir.join("dst/a")));
            assert!(!mountinfo::is_mount_point(&table, &dir.join("src/b")));
        });
    }

    #[test]
    fn read_only_is_set_and_cleared_on_the_one_mount() {
        testns::run(|dir| {
            mkdirs(dir, &["src", "dst"]);
            let src = open_dir(&dir.join("src")).expect("open");
            let dst = open_dir(&dir.join("dst")).expect("open");
            let tree = bind_fd(&src, &dst).expect("bind");
            set_read_only(&tree, true).expect("ro");
            let err = std::fs::write(dir.join("dst/f"), b"x").expect_err("read-only");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS));
            // The source mount is another mount: still writable.
            std::fs::write(dir.join("src/f"), b"x").expect("source stays writable");
            // A file open for writing makes it busy.
            set_read_only(&tree, false).expect("rw");
            let open = std::fs::File::create(dir.join("dst/g")).expect("create");
            assert_eq!(set_read_only(&tree, true), Err(Errno::BUSY));
            drop(open);
            // Through a descriptor of the mount's root opened later by path (O_PATH), as a
            // caller that finds its mount again does.
            drop(tree);
            let root = open_dir(&dir.join("dst")).expect("open");
            set_read_only(&root, true).expect("ro");
            let err = std::fs::write(dir.join("dst/h"), b"x").expect_err("read-only");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS));
            set_read_only(&root, false).expect("rw");
            std::fs::write(dir.join("dst/h"), b"x").expect("writable again");
        });
    }

    #[test]
    fn an_overlay_of_opened_layers_is_mounted_on_the_opened_target() {
        testns::run(|dir| {
            mkdirs(dir, &["lower", "upper", "work", "merged"]);
            std::fs::write(dir.join("lower/old"), b"lower").expect("write");
            let fd = |n: &str| open_dir(&dir.join(n)).expect("open");
            let (lower, upper, work, merged) = (fd("lower"), fd("upper"), fd("work"), fd("merged"));
            let mut created = false;
            let mnt = mount_overlay_with(
                Overlay {
                    lower: lower.as_fd(),
                    upper: upper.as_fd(),
                    work: work.as_fd(),
                },
                &merged,
                |create| {
                    created = true;
                    create()
                },
            )
            .expect("overlay");
            assert!(created);
            let (id, _) = mount_of(&mnt).expect("mount_of");
            drop((lower, upper, work, merged, mnt));
            std::fs::write(dir.join("merged/new"), b"upper").expect("write");
            assert_eq!(
                std::fs::read(dir.join("merged/old")).ok().as_deref(),
                Some(&b"lower"[..])
            );
            assert_eq!(
                std::fs::read(dir.join("upper/new")).ok().as_deref(),
                Some(&b"upper"[..])
            );
            assert!(!dir.join("lower/new").exists());
            let table = mountinfo::read().expect("mountinfo");
            let m = table.iter().find(|m| m.id == id.id).expect("listed");
            assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("overlay", "asd"));
            assert_eq!(m.mount_point, dir.join("merged"));
            assert!(m.has_option("nosuid") && m.has_option("nodev"), "{m:?}");
        });
    }

    #[test]
    fn an_overlay_whose_creation_is_refused_is_not_mounted() {
        testns::run(|dir| {
            mkdirs(dir, &["lower", "upper", "work", "merged"]);
            let fd = |n: &str| open_dir(&dir.join(n)).expect("open");
            let (lower, upper, work, merged) = (fd("lower"), fd("upper"), fd("work"), fd("merged"));
            let refused = SysError {
                op: "raise a capability",
                errno: Errno::PERM,
            };
            let r = mount_overlay_with(
                Overlay {
                    lower: lower.as_fd(),
                    upper: upper.as_fd(),
                    work: work.as_fd(),
                },
                &merged,
                |_| Err(refused),
            );
            assert_eq!(r.err(), Some(refused));
            let table = mountinfo::read().expect("mountinfo");
            assert!(!mountinfo::is_mount_point(&table, &dir.join("merged")));
        });
    }
}
