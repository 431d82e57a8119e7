//! Crash recovery (issue 2 item 5, DESIGN.md §7): bring a target that asd left in any state back
//! to a plain directory on disk holding the newest data that can be trusted, with a snapshot of
//! the start state kept aside.
//!
//! What can be trusted: a volatile copy that was complete (state said `Synced`, or it still
//! covers the target) holds the newest data and is written back first. Anything else in RAM is
//! discarded: the directory on disk already holds the last completed resync, file by file
//! either old or new, because every write there went to a temporary name and was renamed.

use std::path::Path;

use crate::config::Config;
use crate::mount::{MountError, Mounter};
use crate::mountinfo;
use crate::nsops;
use crate::owner::{self, Job, Output};
use crate::paths::{self, TargetPaths};
use crate::snapshot;
use crate::state::{Mode, Stage, TargetState};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Owner(#[from] owner::OwnerError),
    #[error(transparent)]
    Ns(#[from] nsops::NsError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("{path}: {reason}")]
    Unexpected {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// What recovery found and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Recovery {
    /// Anything of a previous run was found (otherwise nothing was touched).
    pub ungraceful: bool,
    /// The volatile copy was complete and was written back to disk.
    pub wrote_back_from_ram: bool,
    pub snapshot: Option<std::path::PathBuf>,
    pub temp_files_removed: u64,
}

/// Where a target stands right now, read from the mount table and the filesystem.
pub struct Found {
    pub covered: bool,
    /// Something is mounted on the backup path.
    pub backup_mounted: bool,
    /// ... and it is the bind of the target's own directory that asd made: only then may a
    /// write-back go there.
    pub backup_is_ours: bool,
    pub overlay_mounted: bool,
}

pub fn inspect(p: &TargetPaths) -> Found {
    let table = mountinfo::read().unwrap_or_default();
    let volatile_dev = dev_of(&p.volatile);
    let covered = mountinfo::mounts_at(&table, &p.target)
        .last()
        .is_some_and(|m| {
            Some(m.dev) == volatile_dev || matches!(m.fs_type.as_str(), "tmpfs" | "overlay")
        });
    Found {
        covered,
        backup_mounted: mountinfo::is_mount_point(&table, &p.backup),
        backup_is_ours: backup_is_ours(&table, p),
        overlay_mounted: mountinfo::mounts_at(&table, &p.volatile)
            .last()
            .is_some_and(|m| m.fs_type == "overlay"),
    }
}

/// The topmost mount on the backup path shows the target's own directory: the same file system
/// as the target's parent, at the target's place in it (mountinfo's root; st_dev would not do,
/// on btrfs it names the subvolume). Anything else there (unmounted by a helper restart and
/// replaced, mounted over by someone else) is no place to write the user's data to.
fn backup_is_ours(table: &[mountinfo::MountEntry], p: &TargetPaths) -> bool {
    let Some(top) = mountinfo::mounts_at(table, &p.backup).last().copied() else {
        return false;
    };
    let Some(holder) = mountinfo::containing(table, p.parent()) else {
        return false;
    };
    let Ok(rel) = p.target.strip_prefix(&holder.mount_point) else {
        return false;
    };
    top.dev == holder.dev && top.root == holder.root.join(rel)
}

fn dev_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((
        nix::sys::stat::major(m.dev()) as u32,
        nix::sys::stat::minor(m.dev()) as u32,
    ))
}

/// Is this target fully synced and in RAM right now?
pub fn is_live(t: &TargetState) -> bool {
    if t.stage != Stage::Synced {
        return false;
    }
    let f = inspect(&t.paths);
    f.covered && f.backup_is_ours && (t.mode == Mode::Copy || f.overlay_mounted)
}

/// Recover `t`. `stage` is what the runtime state recorded, `None` when there was no state (a
/// reboot): then only what is on disk tells.
pub fn recover(
    m: &dyn Mounter,
    t: &TargetState,
    stage: Option<Stage>,
    cfg: &Config,
) -> Result<Recovery, RecoverError> {
    let p = &t.paths;
    let found = inspect(p);
    let volatile_exists = nsops::exists(&p.volatile);
    let leftovers = found.covered
        || found.backup_mounted
        || found.overlay_mounted
        || nsops::exists(&p.backup)
        || nsops::exists(&p.old)
        || nsops::exists(&p.old_partial)
        || volatile_exists
        || (t.mode == Mode::Overlay && (nsops::exists(&p.upper) || nsops::exists(&p.changes)))
        || stage.is_some();
    let mut rec = Recovery::default();
    if !leftovers {
        // Only what a cleanup cut short had renamed aside to delete may be left: its data is
        // on disk already, so no recovery (and no snapshot) is needed, only the deletion.
        let trash = [&p.volatile, &p.upper, &p.old, &p.old_partial, &p.changes]
            .iter()
            .any(|d| nsops::exists(&paths::trash(d)));
        if trash {
            tracing::info!(
                "{}: removing what an interrupted cleanup left",
                p.target.display()
            );
            cleanup(t)?;
        }
        return Ok(rec);
    }
    rec.ungraceful = true;
    tracing::warn!(
        "{}: asd did not stop cleanly last time; recovering",
        p.target.display()
    );

    let trusted = match t.mode {
        Mode::Copy => volatile_exists && (stage == Some(Stage::Synced) || found.covered),
        Mode::Overlay => nsops::exists(&p.upper) && (stage == Some(Stage::Synced) || found.covered),
    };

    // A stray, non-empty directory on the backup path (no mount) stops the recovery at its end
    // anyway: say so before anything is done, so a start that keeps failing on it does not take
    // a snapshot each time and rotate older ones out of BACKUP_LIMIT.
    if !found.backup_mounted {
        check_backup_dir_gone(p)?;
    }

    // The snapshot keeps the start state (or, without one, the disk as found) before anything
    // on disk changes.
    // The start state is the start clone's entries with the disk's start entries it lacks
    // (see `copy::keep`): the disk is read through the backup mount while the target is covered,
    // else through the target; with the target covered and no backup mount, after the uncover.
    let mut snapshot_after_uncover = false;
    if cfg.use_backups {
        let (src, current) = if nsops::exists(&p.old) {
            let current = if found.backup_mounted && found.backup_is_ours {
                &p.backup
            } else {
                &p.target
            };
            (&p.old, Some(current.as_path()))
        } else {
            (&p.target, None)
        };
        if let Some(kept) = snapshot_of_start_clone(p) {
            // An earlier attempt that then failed took it: nothing changed the clone since, so
            // the same state is kept once, and repeated attempts do not rotate older snapshots
            // out.
            tracing::info!(
                "{}: keeping the snapshot an earlier recovery attempt took: {}",
                p.target.display(),
                kept.display()
            );
            rec.snapshot = Some(kept);
        } else if nsops::exists(&p.old) && found.covered && !found.backup_is_ours {
            snapshot_after_uncover = true;
        } else if !found.covered || nsops::exists(&p.old) {
            rec.snapshot = Some(take_snapshot(t, src, current)?);
            snapshot::enforce_limit(p.parent(), &p.snapshot_prefix(), cfg.backup_limit)?;
        }
    }

    if trusted && t.mode == Mode::Overlay {
        // Persist the upper layer first, while it is still reachable through its own path.
        owner::run(
            &t.owner,
            &Job::Persist {
                upper: p.upper.clone(),
                changes: p.changes_state(),
            },
            None,
        )?;
    }
    if found.covered {
        m.uncover(t)?;
    }
    if snapshot_after_uncover {
        rec.snapshot = Some(take_snapshot(t, &p.old, Some(&p.target))?);
        snapshot::enforce_limit(p.parent(), &p.snapshot_prefix(), cfg.backup_limit)?;
    }
    if trusted && t.mode == Mode::Copy {
        // The target path shows the original directory again: write the RAM copy into it.
        owner::run(
            &t.owner,
            &Job::Copy {
                src: p.volatile.clone(),
                dst: p.target.clone(),
                delete: true,
                durable: true,
                since: None,
                marks: None,
                // The snapshot holds the start state by now; should a later attempt not find
                // it and take another, the clone still has what this write-back replaces.
                start_clone: nsops::exists(&p.old).then(|| p.old.clone()),
                dir_ids: None,
            },
            None,
        )?;
        rec.wrote_back_from_ram = true;
    }
    m.release(t)?;
    check_backup_dir_gone(p)?;
    rec.temp_files_removed = match owner::run(
        &t.owner,
        &Job::RemoveTempFiles {
            root: p.target.clone(),
        },
        None,
    )? {
        Output::Count(n) => n,
        _ => 0,
    };
    if t.mode == Mode::Overlay && nsops::exists(&p.changes_state()) {
        owner::run(
            &t.owner,
            &Job::Apply {
                changes: p.changes_state(),
                dst: p.target.clone(),
            },
            None,
        )?;
        rec.wrote_back_from_ram = trusted;
    }
    cleanup(t)?;
    Ok(rec)
}

/// After a release, the backup path must be gone, or an empty directory that could not be
/// removed (a per-user target whose parent the user cannot write: the helper accepts an empty
/// one of the caller's at the next sync). Anything else there is not asd's to guess about.
fn check_backup_dir_gone(p: &TargetPaths) -> Result<(), RecoverError> {
    let unexpected = |reason: String| RecoverError::Unexpected {
        path: p.backup.clone(),
        reason,
    };
    let meta = match std::fs::symlink_metadata(&p.backup) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unexpected(format!("cannot be examined: {e}"))),
    };
    let table = mountinfo::read().unwrap_or_default();
    if mountinfo::is_mount_point(&table, &p.backup) {
        return Err(unexpected(format!(
            "is still mounted after recovery; unmount it (`umount {}`) and run asd again",
            p.backup.display()
        )));
    }
    let empty = meta.is_dir()
        && std::fs::read_dir(&p.backup).is_ok_and(|mut entries| entries.next().is_none());
    if empty {
        return Ok(());
    }
    Err(unexpected(format!(
        "is left over from an earlier run and is not an empty directory: asd will not guess \
         what it holds. {} holds the data; move the leftover away (`mv {} {}.saved`) and run \
         asd again",
        p.target.display(),
        p.backup.display(),
        p.backup.display()
    )))
}

/// A crash-recovery snapshot of the start clone `-old` that already exists: one named and written
/// after the clone last changed at its root (its change time) can only
/// have been taken of it, by an earlier recovery attempt, as recovery snapshots the clone
/// whenever it exists (a snapshot copied in from elsewhere keeps its older name). The target
/// itself is no such source: between attempts its programs may write to it.
fn snapshot_of_start_clone(p: &TargetPaths) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let clone = std::fs::symlink_metadata(&p.old)
        .ok()
        .filter(|m| m.is_dir())?;
    let made = (clone.ctime(), clone.ctime_nsec());
    let made_stamp = snapshot::timestamp_at(clone.ctime());
    let prefix = p.snapshot_prefix();
    std::fs::read_dir(p.parent())
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let Some(rest) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
                return false;
            };
            rest.ends_with(paths::SNAPSHOT_EXT.as_bytes())
                && rest.get(..made_stamp.len()) >= Some(made_stamp.as_bytes())
        })
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_file())?;
            let written = (m.mtime(), m.mtime_nsec());
            // Strictly later: with coarse timestamps a snapshot of the previous clone can share
            // the new clone's second; it is then not reused (one snapshot too many at worst).
            (written > made).then(|| (written, e.path()))
        })
        .max()
        .map(|(_, path)| path)
}

/// Write a crash-recovery snapshot of `src` as the owner; the file is created by the manager
/// (the parent directory may be root's) and written by the owner through the passed descriptor.
pub fn take_snapshot(
    t: &TargetState,
    src: &Path,
    current: Option<&Path>,
) -> Result<std::path::PathBuf, RecoverError> {
    let p = &t.paths;
    let final_path = snapshot::unique_snapshot_path(p);
    let mut tmp = final_path.as_os_str().to_os_string();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    nsops::unlink(&tmp)?;
    let file = nsops::create_owned_file(&tmp, &t.owner)?;
    let keep = file.try_clone().map_err(|source| nsops::NsError {
        op: "dup",
        path: tmp.clone(),
        source,
    })?;
    let job = Job::Snapshot {
        src: src.to_path_buf(),
        top: p.name().into(),
        current: current.map(Path::to_path_buf),
    };
    if let Err(e) = owner::run(&t.owner, &job, Some(file.into())) {
        let _ = nsops::unlink(&tmp);
        return Err(e.into());
    }
    keep.sync_all().map_err(|source| nsops::NsError {
        op: "fsync",
        path: tmp.clone(),
        source,
    })?;
    nsops::rename(&tmp, &final_path)?;
    tracing::info!(
        "{}: snapshot of the last good state kept in {}",
        p.target.display(),
        final_path.display()
    );
    Ok(final_path)
}

/// Remove what asd created for `t` besides mounts: the RAM copy, overlay dirs, the start clone,
/// and (overlay) the persisted changes once applied. Each tree is emptied by its owner.
pub fn cleanup(t: &TargetState) -> Result<(), RecoverError> {
    let p = &t.paths;
    // The RAM copy (tmpfs: the CPU frees its pages) and the start clone (disk: its journal
    // records each unlink) are deleted at the same time, since neither waits on what the other
    // does: 200,000 files took 1.4 s each here, and 1.45 s both at once. Nothing relies on
    // their order: after an unsync neither is trusted by recovery (the state says the target
    // is uncovered), and each is renamed aside before any of it is deleted.
    let (ram, disk) = std::thread::scope(|s| {
        let ram = s.spawn(|| discard(t, &p.volatile, Some(&p.dir_ids())));
        let disk = [&p.old_partial, &p.old]
            .into_iter()
            .try_for_each(|dir| remove_aside(t, dir));
        (ram.join(), disk)
    });
    match ram {
        Ok(r) => r?,
        // A panic in the thread is a bug; the next start finds the leftovers and removes them.
        Err(_) => {
            return Err(RecoverError::Unexpected {
                path: p.volatile.clone(),
                reason: "deleting the RAM copy failed; the next start removes what is left".into(),
            })
        }
    }
    disk?;
    // The upper layer and the work directory before the change set: a change set without its
    // upper layer is what recovery applies, never the other way round.
    discard(t, &p.upper, None)?;
    if nsops::exists(&p.work) {
        // An overlay mounted by root leaves `work/work` root's and mode 0000: root removes that
        // empty directory (through descriptors, no symlinks followed), the owner the rest.
        nsops::remove_overlay_workdir(&p.work)?;
        owner::run(
            &t.owner,
            &Job::Remove {
                path: p.work.clone(),
            },
            None,
        )?;
    }
    remove_aside(t, &p.changes)
}

/// The RAM copy and the upper layer are renamed aside before being deleted (the job does it):
/// recovery trusts them by name, and must never find a half-deleted one there.
/// `record`: the record of the tree's directories (see `copy::write_back`), removed with it.
fn discard(t: &TargetState, dir: &Path, record: Option<&Path>) -> Result<(), RecoverError> {
    let record = record.filter(|r| nsops::exists(r));
    if nsops::exists(dir) || nsops::exists(&paths::trash(dir)) || record.is_some() {
        owner::run(
            &t.owner,
            &Job::Discard {
                path: dir.to_path_buf(),
                record: record.map(Path::to_path_buf),
            },
            None,
        )?;
    }
    Ok(())
}

/// The start clone and the overlay's change set are renamed aside too, here: a half-emptied
/// change set would be applied by the next recovery (an opaque directory without part of its
/// entries deletes them from the target), a half-emptied clone snapshotted as the start state.
fn remove_aside(t: &TargetState, dir: &Path) -> Result<(), RecoverError> {
    let p = &t.paths;
    let trash = paths::trash(dir);
    if nsops::exists(dir) {
        if nsops::exists(&trash) {
            remove_trash(t, &trash)?;
        }
        nsops::rename(dir, &trash)?;
        crash_for_tests(dir == p.changes);
    }
    if nsops::exists(&trash) {
        remove_trash(t, &trash)?;
    }
    Ok(())
}

/// Test hook: `ASD_TEST_CRASH_IN_CLEANUP=1` aborts (as a kill -9 would) right after the change
/// set was renamed aside, before any of it is deleted. Only with the `test-hooks` feature (see
/// `fsio::crash_point`): a shipped asd holds neither the hook nor its variable's name.
#[cfg(any(test, feature = "test-hooks"))]
fn crash_for_tests(at: bool) {
    if at && std::env::var_os("ASD_TEST_CRASH_IN_CLEANUP").is_some_and(|v| v == "1") {
        std::process::abort();
    }
}

#[cfg(not(any(test, feature = "test-hooks")))]
#[inline(always)]
fn crash_for_tests(_at: bool) {}

/// Deletes a directory renamed aside by [`cleanup`]: its contents as the owner, then the
/// directory itself in the parent (which may be root's).
fn remove_trash(t: &TargetState, trash: &Path) -> Result<(), RecoverError> {
    owner::run(
        &t.owner,
        &Job::Empty {
            path: trash.to_path_buf(),
        },
        None,
    )?;
    nsops::rmdir(trash)?;
    Ok(())
}
