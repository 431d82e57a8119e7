//! The mount system calls of asd, in one place: both the root helper (`asd-helper`) and the
//! manager running as root (`asd`) mount through this crate, so the security-critical code that
//! resolves paths and mounts exists once.
//!
//! - [`open`]: directories opened without following a symlink in any component
//!   (`openat2` with `RESOLVE_NO_SYMLINKS`), whole paths or one entry of an opened directory;
//! - [`mount_id`]: which mount a descriptor or path is on (`statx` `STATX_MNT_ID`, and the
//!   never-reused `STATX_MNT_ID_UNIQUE` where the kernel has it) and whether it is that mount's
//!   root;
//! - [`mountinfo`]: `/proc/thread-self/mountinfo` parsed (escapes, optional fields) and queried;
//! - [`attach`]: binds and overlays made through descriptors (`open_tree`, `fsopen`/`fsconfig`/
//!   `fsmount`, `mount_setattr`, `move_mount`), private, `nosuid` and `nodev`, never recursive;
//! - [`unmount`]: lazy detach of a mount held open, and a non-lazy unmount of a mount found at
//!   a path that checks it is still the same mount before and after.
//!
//! It knows nothing of asd's protocol, paths or policy: who may mount what is decided by the
//! callers.

pub mod attach;
mod error;
pub mod mount_id;
pub mod mountinfo;
pub mod open;
pub mod unmount;

#[cfg(test)]
mod testns;

pub use attach::{
    bind_fd, make_private_nosuid_nodev, mount_overlay, mount_overlay_with, set_read_only, Overlay,
};
pub use error::SysError;
pub use mount_id::{mount_id_of_path, mount_of, LastLink, MountId};
pub use mountinfo::MountEntry;
pub use open::{dir_is_empty, open_child_dir, open_child_dir_to_read, open_dir, open_dir_to_read};
pub use unmount::{detach_fd, MountAt, UnmountError};

pub use rustix::io::Errno;
