//! Which mount a descriptor or path is on.

use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
use rustix::io::Errno;

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a 64-bit mount id that is never reused while the system
/// runs (not named by rustix 1.x).
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// The identity of a mount: the classic id (as in mountinfo; may be reused after an unmount)
/// and the unique 64-bit id (never reused; on a kernel without it, the classic id again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MountId {
    pub id: u64,
    pub unique: u64,
}

/// The mount an open descriptor is on, and whether the descriptor is that mount's root.
pub fn mount_of(fd: impl AsFd) -> Result<(MountId, bool), Errno> {
    let fd = fd.as_fd();
    let classic = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    let unique = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
    )?;
    let unique_id = if unique.stx_mask & STATX_MNT_ID_UNIQUE != 0 {
        unique.stx_mnt_id
    } else {
        // Older kernel: the classic id (reusable, so callers check the path with it).
        classic.stx_mnt_id
    };
    let root = classic
        .stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        && classic.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    Ok((
        MountId {
            id: classic.stx_mnt_id,
            unique: unique_id,
        },
        root,
    ))
}

/// Whether a symlink in the last component of a path is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastLink {
    /// Through it: for `/proc/PID/cwd`, `/proc/PID/fd/N` and the like, whose target is meant.
    Follow,
    /// The link itself.
    NoFollow,
}

/// The classic id (as in mountinfo) of the mount `path` lies on.
pub fn mount_id_of_path(path: &Path, last: LastLink) -> Result<u64, Errno> {
    let flags = match last {
        LastLink::Follow => AtFlags::empty(),
        LastLink::NoFollow => AtFlags::SYMLINK_NOFOLLOW,
    };
    Ok(rustix::fs::statx(rustix::fs::CWD, path, flags, StatxFlags::MNT_ID)?.stx_mnt_id)
}
