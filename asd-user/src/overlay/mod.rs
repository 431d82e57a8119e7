//! Overlay mode's data path (DESIGN.md §7): persisting the upper layer's changes beside the target
//! and applying them to the original directory.
//!
//! # Upper layers
//!
//! An upper layer (the overlay's own, and every layer of a persisted state) has this format:
//!
//! - regular files, symlinks and fifos: new or modified entries (whole files: overlayfs copies a
//!   file up completely before its first change), with mode, owner (where permitted), times (ns)
//!   and user xattrs;
//! - directories: created or copied up; `user.overlay.opaque = "y"` marks one that replaced the
//!   lower directory of that name (deleted and created again), whose lower content is gone;
//!   `"x"` marks a merged directory that contains xattr whiteouts;
//! - whiteouts: a character device 0:0 (what the kernel creates), or a zero-size regular file
//!   carrying `user.overlay.whiteout`: the lower entry of that name was deleted;
//! - other `user.overlay.*` xattrs (origin, impure, uuid, ...) are overlayfs bookkeeping, kept as
//!   they are, never written to the original;
//! - names starting with [`TEMP_PREFIX`] are ignored.
//!
//! The user's own xattrs named `user.overlay.*` (stored escaped by overlayfs, as
//! `user.overlay.overlay.*`) are not written back either: to the original they would be
//! overlayfs metadata the next time it is mounted as a lower layer.
//!
//! # The persisted state (`changes`, see [`state`])
//!
//! `changes` (`/p/.name-backup_asd-changes/current`) is a small directory:
//!
//! - `.asd-overlay-state`: a marker file (fixed content) saying the directory is a state;
//! - `base.<sec>.<nsec>`: an upper layer, a copy of the overlay's whole upper layer as it was
//!   when the base was made; the name holds the cutoff time taken before that copy read it;
//! - `delta.<seq>.<sec>.<nsec>.<bytes>` (seq 1, 2, ...): upper layers, each made relative to
//!   the base and the deltas before it, with the cutoff time of its persist and the bytes of
//!   file data it holds.
//!
//! Its content is the stack base, delta 1, delta 2, ... (the later one above, as overlayfs
//! stacks lower layers): [`apply`] applies the base, then each delta in order. A `changes`
//! without the marker is the format before deltas (one upper layer) and is applied as it is,
//! so a state left on disk by an older asd is still recovered after an upgrade.
//!
//! # Persist ([`persist`])
//!
//! The entries of an upper layer depend on each other: `mv a b` gives a new `b` and a whiteout
//! `a`; `mv d/x y; rm -r d; mkdir d` gives a new `y` and an opaque `d`. A persisted state where
//! the whiteout or the opaque marker made it but the new entry did not would delete data when
//! applied, so "every entry old or new" is not enough: each persist adds its changes to the
//! state as one atomic step, a rename. Two ways, both starting by removing what an interrupted
//! persist left (`<parent>/<TEMP_PREFIX><name>` and `<parent>/<TEMP_PREFIX><name>.delta`):
//!
//! **A delta** (usual, [`delta`]): its cost follows what changed since the previous persist.
//!
//! 1. Take the new cutoff (now). Build the delta under `<parent>/<TEMP_PREFIX><name>.delta`:
//!    walk the upper layer; every entry whose ctime is at or after the previous cutoff (minus
//!    [`crate::copy::CTIME_MARGIN_MS`]) changed since the previous persist read it and is
//!    copied; directories whose ctime is that recent had names added or removed, so their
//!    listing is compared with the state's (base and deltas merged, looked up only there) and
//!    a whiteout is written for every name the state shows there and the upper layer no longer
//!    has. Older entries are not looked at beyond their `lstat`. Nothing of the state changes.
//! 2. `syncfs`: the whole delta is durable.
//! 3. Rename it to `changes/delta.<seq>...` (`RENAME_NOREPLACE`), then fsync `changes` and the
//!    parent.
//!
//! A crash before the rename of step 3 reaches the disk leaves the previous state (plus a
//! leftover under a temporary name, which [`apply`] ignores and the next persist removes); after
//! it, the new one, whose delta is complete since it was durable before the rename. The cutoff
//! is part of the delta's name, so a delta never exists without its cutoff nor a cutoff without
//! its delta. If nothing changed, nothing is written (the cutoff stays, which is right: nothing
//! changed since it).
//!
//! Why the stack gives the upper layer's view. Call A the state's stack and U the upper layer.
//! Every entry of U whose ctime is older than the previous cutoff (minus the margin) was read by
//! the previous persist in its current version (or by the one before, by induction), so A has it;
//! every other one is in the new delta D, read after the new cutoff was taken (a change made
//! meanwhile is newer than the new cutoff and read again next time). ctime is set by the kernel
//! on every change to an entry (data, metadata, xattrs such as the opaque marker, renames, link
//! count) and to a directory's listing; overlayfs' copy-up makes a new upper inode. A name that
//! left U was listed in a directory whose listing changed, where D gets a whiteout for it. (A
//! name leaves an upper layer only when the lower has no such name or the directory hides the
//! lower: overlayfs never removes a whiteout to show a lower entry again; so a whiteout gives the
//! same view.) Directories: a changed directory of U that is a directory in A too is merged in D
//! (a plain directory: its own metadata and its changed entries; apply merges it); otherwise
//! (new, replacing a non-directory, or newly opaque while A's still shows the lower one) it is
//! copied whole, opaque marker included, and apply builds it from D alone. A directory D merges
//! is never marked opaque there (that would drop what A has in it). One case cannot be said
//! from the upper layer alone (a directory of U that shows the lower where A's hides it, which
//! overlayfs does not produce); persist then does a full rebuild instead, as it does when the
//! state is in any other doubt.
//!
//! **A full rebuild** ([`persist`] itself): when there is no state yet, the state is in the
//! format before deltas or cannot be read, the clock is earlier than the last cutoff (ctimes
//! cannot be compared), there are [`state::MAX_DELTAS`] deltas or they hold more than
//! [`state::MAX_DELTA_BYTES`] of data, or the delta walk found a doubt. It compacts the state
//! into a new base, so old deltas never apply on top of a newer base:
//!
//! 1. Take the new cutoff. Build a new state under `<parent>/<TEMP_PREFIX><name>`: the marker,
//!    and `base.<cutoff>` made as a [`crate::copy::hardlink_clone`] of the current base (links,
//!    no data copied) brought up to date with the upper layer by [`crate::copy::sync_tree`]
//!    (`delete`, `durable`). The copy engine walks only the upper layer and the clone (never the
//!    lower), copies whiteouts (it `mknod`s the 0:0 character device, which an unprivileged user
//!    may do since Linux 5.8) and every `user.*` xattr, `user.overlay.*` included, never writes
//!    into an inode with other links (it writes a new file and renames it), and syncs before it
//!    returns. So the current state is never modified. (The engine skips device nodes it may
//!    not create, which for a whiteout would silently drop a deletion: persist first checks
//!    that this user may create whiteouts there.)
//! 2. `RENAME_EXCHANGE` the new state with `changes`, atomically, and fsync the parent.
//! 3. Remove the previous state, now under the temporary name.
//!
//! A crash before step 2 leaves the previous state, after it the new one. Its cost grows with
//! the number of entries in the upper layer (one link per file, plus the data of what changed).
//!
//! What ctime cannot see: a clock set back by less than the time since the last cutoff (changes
//! then get ctimes older than the cutoff); writes through a shared mmap that stamp no time (which
//! the size+mtime quick check of a full rebuild cannot see either). The first is repaired by the
//! next full rebuild, at most [`state::MAX_DELTAS`] persists later.
//!
//! # Apply ([`apply`])
//!
//! Applies each layer of `changes` to the original directory in order, never reading more of the
//! original than the names that the layer mentions. Phases per layer, like the copy engine's
//! durable mode:
//!
//! 1. Walk the layer. Every file, symlink or fifo is written completely (data, user xattrs,
//!    owner, mode, then times) under a temporary name in its destination directory. A directory
//!    that is new, replaces a non-directory or is opaque is built completely under a temporary name
//!    (its content directly under final names inside it). A plain directory present in both is
//!    merged: the walk descends into it. Whiteouts are noted. Nothing under a final name changes.
//! 2. `syncfs`: all new content is durable before any of it is renamed into place.
//! 3. Rename the temporaries over their final names (atomic; `RENAME_EXCHANGE` where a directory
//!    is involved, so the name never disappears; the old entry ends up under a temporary name).
//! 4. `syncfs`, then delete what whiteouts name and the old entries moved aside in step 3.
//! 5. Set the metadata of merged directories bottom-up (after renames and deletions in them,
//!    which change their mtime), then `syncfs` before returning.
//!
//! Applying a layer makes the destination the overlay view of that layer over the destination
//! as it is, so applying the stack layer by layer gives the view of the whole stack. `changes`
//! is only read, so a crash loses nothing of it. After a crash every name of the original holds
//! its original version or the version of one of the layers, and leftovers carry temporary names
//! ([`remove_temp_entries`] removes them, files and directories). Applying the whole stack again
//! after a crash gives the right result: every name that differs from the original is mentioned
//! (itself or by a directory above it that a layer replaces) by some layer, and the last such
//! layer writes it again (no quick check, so no torn file can pass for a good one); whiteouts of
//! already deleted names do nothing, opaque directories are rebuilt from scratch.
//!
//! The original's root directory keeps xattrs that `changes` lacks: the upper layer's root is
//! made by asd (with the original's mode and owner), not copied up, so it never had them.

mod apply;
mod delta;
mod persist;
mod state;

#[cfg(test)]
mod tests;

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::copy::{self, CopyError, CopyStats, TEMP_PREFIX};
use crate::fsio::Xattrs;

pub use apply::apply;
pub use persist::persist;
pub use state::layers;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(
        "{path}: this user may not create whiteouts (character device 0:0, allowed since Linux \
         5.8; a device policy or seccomp filter may forbid it), so deletions made in the overlay \
         cannot be persisted; set USE_OVERLAYFS=no"
    )]
    NoWhiteouts { path: PathBuf },
    /// A persisted state that is not as persist leaves them: never applied in part.
    #[error("{path}: not a valid overlay state: {reason}")]
    BadState { path: PathBuf, reason: String },
    /// Kept for callers matching on it; no longer returned.
    #[error("overlay mode is not available in this build yet; set USE_OVERLAYFS=no")]
    Unsupported,
}

fn oerr(op: &'static str, path: PathBuf, e: impl Into<std::io::Error>) -> OverlayError {
    OverlayError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Removes leftovers of an interrupted [`apply`] (or copy) below `root`: every file or directory
/// whose name starts with [`TEMP_PREFIX`]. They are either new content not yet renamed into
/// place (still in `changes`, so apply again afterwards) or old content moved aside to be
/// deleted. Returns the number of entries removed (a directory counts once).
pub fn remove_temp_entries(root: &Path) -> Result<u64, OverlayError> {
    Ok(copy::remove_temp_files(root)?)
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by persist and apply.

const NEW_FILE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

const OVL_PREFIX: &[u8] = b"user.overlay.";
const OVL_OPAQUE: &[u8] = b"user.overlay.opaque";
const OVL_WHITEOUT: &[u8] = b"user.overlay.whiteout";
const OVL_METACOPY: &[u8] = b"user.overlay.metacopy";
const OVL_REDIRECT: &[u8] = b"user.overlay.redirect";

fn join(base: &Path, name: &CStr) -> PathBuf {
    base.join(OsStr::from_bytes(name.to_bytes()))
}

fn join_opt(base: PathBuf, name: Option<&CStr>) -> PathBuf {
    match name {
        Some(n) => join(&base, n),
        None => base,
    }
}

fn temp_name(seq: &mut u64) -> CString {
    *seq += 1;
    let s = format!("{TEMP_PREFIX}{}.o{}", std::process::id(), seq);
    // Digits and a NUL-free constant.
    CString::new(s).unwrap_or_else(|_| c".#asd-tmp.o".to_owned())
}

fn xattr_value<'x>(xs: &'x Xattrs, name: &[u8]) -> Option<&'x [u8]> {
    xs.iter()
        .find(|(n, _)| n.to_bytes() == name)
        .map(|(_, v)| v.as_slice())
}

fn is_opaque(xattrs: &Xattrs) -> bool {
    // "y": opaque. "x": merged, but holds xattr whiteouts (handled per entry).
    xattr_value(xattrs, OVL_OPAQUE) == Some(b"y")
}

fn add_stats(total: &mut CopyStats, s: &CopyStats) {
    total.files_copied += s.files_copied;
    total.bytes_copied += s.bytes_copied;
    total.metadata_updated += s.metadata_updated;
    total.dirs_created += s.dirs_created;
    total.symlinks_copied += s.symlinks_copied;
    total.deleted += s.deleted;
    total.vanished += s.vanished;
    total.unchanged += s.unchanged;
    total.databases += s.databases;
    total.db_lock_us = total.db_lock_us.max(s.db_lock_us);
}

/// Creates and removes a whiteout in `dir`: the copy engine skips device nodes it may not
/// create, which for a whiteout would silently drop a deletion.
fn check_whiteouts(dir: BorrowedFd<'_>, path: &Path) -> Result<(), OverlayError> {
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let name = temp_name(&mut 0);
    let made = rfs::mknodat(dir, &name, FileType::CharacterDevice, Mode::empty(), 0);
    match made {
        Ok(()) => {
            rfs::unlinkat(dir, &name, AtFlags::empty())
                .map_err(|e| oerr("remove", join(path, &name), e))?;
            Ok(())
        }
        Err(Errno::PERM) => Err(OverlayError::NoWhiteouts {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(oerr("mknod", join(path, &name), e)),
    }
}
