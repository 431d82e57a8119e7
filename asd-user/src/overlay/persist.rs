//! [`persist`]: adds the upper layer's changes to the persisted state, as a delta or by a full
//! rebuild (see the module documentation of [`crate::overlay`] for both and their crash safety).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::copy::{self, CopyOptions, CopyStats, Timestamp, TEMP_PREFIX};
use crate::fsio::{lstat_at, mode, remove_tree, DIR_FLAGS};

use super::delta::{self, Built};
use super::state::{self, Layers, State, MARKER, MARKER_CONTENT, MAX_DELTAS, MAX_DELTA_BYTES};
use super::{check_whiteouts, join, oerr, OverlayError};

/// Persists the changes recorded in `upper` into the state `changes` on disk, durably and
/// atomically as a whole: after a crash at any point, `changes` is the complete previous or the
/// complete new state (see the module documentation). `changes` is created if missing; its
/// parent directory must be writable. Cost follows the entries of `upper` (one `lstat` each) and
/// what changed since the previous persist; every [`MAX_DELTAS`] persists (or when the state is
/// in doubt) the size of `upper`.
pub fn persist(upper: &Path, changes: &Path) -> Result<CopyStats, OverlayError> {
    let invalid = |what: &str| {
        oerr(
            "persist",
            changes.to_path_buf(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string()),
        )
    };
    let (Some(parent), Some(name)) = (changes.parent(), changes.file_name()) else {
        return Err(invalid("not a path to a directory"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let name = CString::new(name.as_bytes()).map_err(|_| invalid("NUL in the path"))?;
    let temp = |suffix: &[u8]| {
        CString::new([TEMP_PREFIX.as_bytes(), name.as_bytes(), suffix].concat())
            .map_err(|_| invalid("NUL in the path"))
    };
    let names = Names {
        name: name.clone(),
        next: temp(b"")?,
        delta: temp(b".delta")?,
    };
    let pfd = rfs::open(parent, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", parent.to_path_buf(), e))?;
    // What an interrupted persist left was never switched in: start afresh.
    for leftover in [&names.next, &names.delta] {
        remove_tree(pfd.as_fd(), leftover, &mut Vec::new())
            .map_err(|e| oerr("remove", join(parent, leftover), e))?;
    }
    let exists = match lstat_at(pfd.as_fd(), &name) {
        Ok(m) if m.kind == FileType::Directory => true,
        // Never follow a symlink planted at `changes`.
        Ok(_) => return Err(invalid("exists and is not a directory")),
        Err(Errno::NOENT) => false,
        Err(e) => return Err(oerr("lstat", changes.to_path_buf(), e)),
    };
    // Databases are read through the overlay while it is mounted (see `copy::sqlite`).
    let view = merged_view(upper, changes);
    let view_fd = view
        .as_deref()
        .and_then(|v| rfs::open(v, DIR_FLAGS, Mode::empty()).ok());
    // Taken before the upper layer is read: whatever changes after it is read again next time.
    let now = Timestamp::now();
    let mut clone_from = None;
    if exists {
        let dir = rfs::openat(pfd.as_fd(), &name, DIR_FLAGS, Mode::empty())
            .map_err(|e| oerr("open", changes.to_path_buf(), e))?;
        match state::read_layers_at(dir.as_fd(), changes) {
            Ok(Layers::State(s)) => {
                match why_full(&s, now) {
                    None => {
                        let ctx = delta::Ctx {
                            upper,
                            changes,
                            state_dir: dir.as_fd(),
                            parent: pfd.as_fd(),
                            parent_path: parent,
                            temp_name: &names.delta,
                            view: view_fd.as_ref().map(|v| v.as_fd()),
                        };
                        match delta::build(&ctx, &s, now)? {
                            Built::Done(stats) => {
                                debug!(?upper, ?changes, ?stats, "persisted a delta");
                                return Ok(stats);
                            }
                            Built::Doubt(why) => {
                                debug!(?changes, why, "full rebuild of the overlay state");
                            }
                        }
                    }
                    Some(why) => debug!(?changes, why, "full rebuild of the overlay state"),
                }
                clone_from =
                    Some(changes.join(std::ffi::OsStr::from_bytes(s.base.name.as_bytes())));
            }
            // The format before deltas: an upper layer, the new base's starting point.
            Ok(Layers::Single) => clone_from = Some(changes.to_path_buf()),
            // The upper layer is the whole truth: a full rebuild replaces what cannot be read.
            Err(e) => warn!("{e}; rebuilding it from the upper layer"),
        }
    }
    let from = Rebuild {
        exists,
        clone_from,
        view: view.as_deref(),
    };
    let stats = full_rebuild(upper, changes, pfd.as_fd(), &names, from, now)?;
    debug!(
        ?upper,
        ?changes,
        ?stats,
        "persisted the overlay's upper layer (full rebuild)"
    );
    Ok(stats)
}

/// The overlay's merged directory (the target) while it is mounted, where the program works:
/// `changes` is `<parent>/.<name>-backup_asd-changes/current` and `upper` ends in `/<name>-rw`
/// (see [`crate::paths::TargetPaths`]), so it is `<parent>/<name>`, if an overlay is mounted
/// there.
fn merged_view(upper: &Path, changes: &Path) -> Option<PathBuf> {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let parent = changes.parent()?.parent()?;
    let name = upper.file_name()?.as_bytes().strip_suffix(b"-rw")?;
    let target = parent.join(std::ffi::OsStr::from_bytes(name));
    let fs = rfs::statfs(&target).ok()?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let kind = fs.f_type as i64;
    (kind == OVERLAYFS_SUPER_MAGIC).then_some(target)
}

/// Where a full rebuild starts from.
struct Rebuild<'a> {
    /// `changes` exists (it is exchanged with the new state).
    exists: bool,
    /// The current base (or upper layer in the format before deltas) to clone.
    clone_from: Option<PathBuf>,
    /// See [`merged_view`].
    view: Option<&'a Path>,
}

struct Names {
    /// `changes`' name in its parent.
    name: CString,
    /// A new state being built by a full rebuild; the previous one after the exchange.
    next: CString,
    /// A delta being built.
    delta: CString,
}

/// Why the next persist of state `s` cannot be a delta, if it cannot.
pub(super) fn why_full(s: &State, now: Timestamp) -> Option<&'static str> {
    if s.deltas.len() >= MAX_DELTAS {
        Some("enough deltas")
    } else if s.delta_bytes() >= MAX_DELTA_BYTES {
        Some("the deltas hold much data")
    } else if now < s.last_cutoff() {
        // ctimes taken after the clock went back could be older than the cutoff.
        Some("the clock is earlier than the last persist")
    } else {
        None
    }
}

/// Builds a new state (marker and base) under `names.next` and exchanges it with `changes`.
fn full_rebuild(
    upper: &Path,
    changes: &Path,
    parent: BorrowedFd<'_>,
    names: &Names,
    from: Rebuild<'_>,
    now: Timestamp,
) -> Result<CopyStats, OverlayError> {
    let parent_path = changes.parent().unwrap_or(Path::new("."));
    let next = join(parent_path, &names.next);
    let built = build_state(upper, &next, from.clone_from.as_deref(), from.view, now);
    let switched = built.and_then(|stats| {
        switch_in(parent, &names.next, &names.name, from.exists, changes)?;
        Ok(stats)
    });
    let stats = match switched {
        Ok(stats) => stats,
        Err(e) => {
            // `changes` is untouched; what was built is not needed.
            let _ = remove_tree(parent, &names.next, &mut Vec::new());
            return Err(e);
        }
    };
    // The previous state, now under the temporary name. A failure here costs disk space until
    // the next persist removes it.
    if let Err(e) = remove_tree(parent, &names.next, &mut Vec::new()) {
        warn!("{}", oerr("remove", next, e));
    }
    Ok(stats)
}

/// The new state at `next`: the marker, and a base that is a hard-linked clone of `clone_from`
/// (cheap: links, no data) brought up to date with the upper layer by the copy engine, which
/// replaces a changed file with a new inode rather than writing into it, so the current state's
/// files are never modified. Durable when it returns (the engine's last step is a syncfs of this
/// filesystem, which covers the marker too).
fn build_state(
    upper: &Path,
    next: &Path,
    clone_from: Option<&Path>,
    view: Option<&Path>,
    now: Timestamp,
) -> Result<CopyStats, OverlayError> {
    rfs::mkdir(next, mode(0o700)).map_err(|e| oerr("mkdir", next.to_path_buf(), e))?;
    let dir = rfs::open(next, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", next.to_path_buf(), e))?;
    write_marker(dir.as_fd(), next)?;
    let base = join(next, &state::base_name(now));
    match clone_from {
        Some(src) => {
            copy::hardlink_clone(src, &base)?;
        }
        None => rfs::mkdir(&base, mode(0o700)).map_err(|e| oerr("mkdir", base.clone(), e))?,
    }
    check_whiteouts(dir.as_fd(), next)?;
    drop(dir);
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    };
    Ok(copy::sync_tree_layer(upper, &base, &opts, view)?)
}

fn write_marker(dir: BorrowedFd<'_>, path: &Path) -> Result<(), OverlayError> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let p = join(path, MARKER);
    let fd =
        rfs::openat(dir, MARKER, flags, mode(0o600)).map_err(|e| oerr("create", p.clone(), e))?;
    let n = rustix::io::write(&fd, MARKER_CONTENT).map_err(|e| oerr("write", p.clone(), e))?;
    if n != MARKER_CONTENT.len() {
        return Err(oerr(
            "write",
            p,
            std::io::Error::from(std::io::ErrorKind::WriteZero),
        ));
    }
    Ok(())
}

/// Puts the new state `next_name` in place as `name` in one atomic step (the current one, if
/// any, ends up under `next_name`), and makes the switch durable.
fn switch_in(
    parent: BorrowedFd<'_>,
    next_name: &CStr,
    name: &CStr,
    exists: bool,
    changes: &Path,
) -> Result<(), OverlayError> {
    let flags = if exists {
        RenameFlags::EXCHANGE
    } else {
        RenameFlags::NOREPLACE
    };
    match rfs::renameat_with(parent, next_name, parent, name, flags) {
        Ok(()) => {}
        // Two renames instead would leave a moment without `changes`: refuse instead. Every
        // local Linux filesystem has RENAME_EXCHANGE.
        Err(e @ (Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)) => {
            return Err(oerr(
                "exchange (RENAME_EXCHANGE, needed by overlay mode)",
                changes.to_path_buf(),
                e,
            ))
        }
        Err(e) => return Err(oerr("rename", changes.to_path_buf(), e)),
    }
    rfs::fsync(parent).map_err(|e| oerr("fsync", changes.to_path_buf(), e))
}
