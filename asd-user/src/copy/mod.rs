//! The copy engine (DESIGN.md §7): makes a destination tree equal to a source tree.
//!
//! [`sync_tree`] is a native `rsync -aX --delete`: it never follows symlinks (every lookup is an
//! `lstat`/`O_NOFOLLOW` relative to an opened directory descriptor), skips files whose type, size
//! and mtime (ns) match, and writes changed files to a temporary name ([`TEMP_PREFIX`]) that is
//! renamed over the final name, so a reader — or a crash — sees either the old or the new file.
//!
//! # Durability ordering (`CopyOptions::durable`, used when the destination is on disk)
//!
//! 1. Walk both trees. Every new or changed non-directory is written completely (data, owner,
//!    mode, xattrs, then times) under a temporary name in its destination directory. A directory
//!    that is new (or replaces a non-directory) is built completely under a temporary name and
//!    renamed as a whole later, so its content needs no per-file renames. Nothing visible under a
//!    final name changes in this phase except metadata fixed in place (never on an inode with
//!    `st_nlink > 1`, which may be shared with a hard-linked start-state clone, nor with a
//!    copy-on-write one, see [`keep`]). With a start clone, what phases 3 and 4 will replace or
//!    delete of the start state is copied into it here, and made durable under its name
//!    between phases 2 and 3.
//! 2. `syncfs` the destination: every temporary file is durable before any of them is renamed,
//!    so no rename can ever be persisted ahead of its data (a torn file). One `syncfs` instead of
//!    an `fsync` per file: it flushes the same data with one journal commit instead of thousands,
//!    and since Linux 5.8 it reports writeback errors of the whole filesystem (the descriptor we
//!    call it on was opened before any of our writes, so no error can be missed).
//! 3. Rename the temporaries over their final names (`RENAME_EXCHANGE` where a directory and a
//!    non-directory swap places, so the name never disappears; plain renames many at once, see
//!    the `renames` module).
//! 4. If anything is to be deleted: `syncfs` again, so the new copies of moved files are durable
//!    before their old names go away; then delete the destination entries the source lacks.
//! 5. Fix directory metadata bottom-up (after their children changed, since every rename or
//!    unlink bumps the directory's mtime), then a final `syncfs`.
//!
//! A crash at any point leaves every destination file at its old or its new version; leftovers
//! are temporary names only, removed by [`remove_temp_files`]. Without `durable` (copying into
//! tmpfs) the same code runs without syncs, and new entries are created directly under their
//! final names.
//!
//! # Incremental and full comparisons
//!
//! With [`CopyOptions::changed_since`] only source entries changed since the previous sync
//! (by their ctime) are compared, and destination directories are opened and listed only where
//! the source changed: an unchanged subtree costs no destination I/O. A full comparison instead
//! lstats every destination entry, which with a cold cache waits on the disk; prefetch
//! threads keep several of those reads in flight ahead of the walk. An incremental one first
//! scans the source's ctimes with several threads ([`scan`]) and walks only what that marked,
//! as for a change journal's marks, while scout threads look the marked entries'
//! destination counterparts up ahead of the walk. A directory moved since the last write-back
//! is compared whole: a record of where each directory was ([`dirids`]) tells it apart. A
//! comparison by ctime that cannot scan compares everything.
//!
//! Errors on single entries do not stop the walk (one unreadable file must not keep every other
//! file from being written back): they are logged, and the first one is returned at the end.
//! Entries whose source could not be read are never deleted from the destination.

mod clone;
mod databases;
mod dirids;
mod durable;
mod engine;
mod file;
mod helpers;
mod keep;
mod metadata;
mod policy;
mod pool;
mod prefetch;
mod probe;
mod renames;
mod scan;
mod scout;
pub(crate) mod sqlite;
pub mod start_dirs;
mod tree;
mod walk;
mod write;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod manual;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::journal::DirtyTree;
use engine::Engine;

pub use clone::{hardlink_clone, start_clone};
pub use dirids::{forget as forget_dir_ids, DirIdsFile};
pub use tree::{find_hardlinked_files, remove_temp_files, tree_size};

/// Prefix of temporary files the engine creates; crash recovery removes leftovers with this prefix.
pub const TEMP_PREFIX: &str = ".#asd-tmp.";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOptions {
    /// Remove entries of the destination that the source does not have (after all copies).
    pub delete: bool,
    /// Make the result durable before returning (fsync/syncfs); needed when the destination is disk.
    pub durable: bool,
    /// Incremental mode: the caller guarantees that at this time the destination was equal to
    /// the source (take it with [`Timestamp::now`] before the previous complete sync started
    /// reading the source). Then only what changed in the source since then is compared:
    ///
    /// - a source entry whose ctime is older is unchanged: its destination counterpart is not
    ///   looked at at all (no lstat);
    /// - a source directory whose ctime is older had no entries added, removed or renamed, so
    ///   its destination counterpart is not listed and nothing is deleted in it; its
    ///   subdirectories are still walked (on the source side) for changes deeper down;
    /// - destination directories are opened only where something is to be compared or written,
    ///   so an unchanged subtree costs no destination I/O at all.
    ///
    /// ctime is set by the kernel alone, from the wall clock (on write, truncate, chmod, chown,
    /// xattr changes, rename and link count changes; a directory's also on entry additions,
    /// removals and renames), so no change made through the source is missed, with these
    /// exceptions: the clock was set back between this time and now (detected only if it is
    /// still earlier now: the option is then ignored, a full comparison); and writes through a
    /// shared mmap that stamp no time (tmpfs stamps only the first write fault on each page of
    /// a mapping), which the size+mtime quick check cannot see either. [`CTIME_MARGIN_MS`] is
    /// subtracted to absorb the coarse clock the kernel stamps inodes with.
    ///
    /// The trade-off: a change made to the *destination* behind the engine's back, under a name
    /// whose source did not change, is not seen (nor repaired). asd therefore runs a full
    /// comparison (`None`) at least once a day, and whenever the last write-back's time is in
    /// doubt (see `incremental_since` in the engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<Timestamp>,
}

/// A wall-clock time (`CLOCK_REALTIME`, the clock inode times are taken from): seconds and
/// nanoseconds since the Unix epoch, `nsec` in `0..1_000_000_000`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: i64,
}

/// Subtracted from [`CopyOptions::changed_since`], in milliseconds: the source's inode times
/// (tmpfs, or a filesystem on zram, both with nanosecond times) come from the kernel's coarse
/// clock, which lags the clock the caller reads by at most one tick (≤ 10 ms at HZ=100). 100 ms
/// covers that tenfold. Kept small on purpose: a sync's own copies are made just before
/// `changed_since` is taken, and everything newer than the cutoff is compared again.
pub const CTIME_MARGIN_MS: i64 = 100;

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(std::time::SystemTime::now())
    }

    /// `nsec` brought into `0..1_000_000_000` (a deserialized value may be denormal), so that
    /// the derived ordering is the ordering of times.
    fn normalized(self) -> Timestamp {
        const NS: i64 = 1_000_000_000;
        Timestamp {
            sec: self.sec.saturating_add(self.nsec.div_euclid(NS)),
            nsec: self.nsec.rem_euclid(NS),
        }
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Timestamp {
        let signed = |d: std::time::Duration| {
            (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_nanos()),
            )
        };
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => {
                let (sec, nsec) = signed(d);
                Timestamp { sec, nsec }
            }
            // Before 1970: negate, then normalize the nanoseconds.
            Err(e) => {
                let (sec, nsec) = signed(e.duration());
                Timestamp {
                    sec: -sec,
                    nsec: -nsec,
                }
                .normalized()
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStats {
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub metadata_updated: u64,
    pub dirs_created: u64,
    pub symlinks_copied: u64,
    pub deleted: u64,
    /// Entries that disappeared from the source during the walk (not an error).
    pub vanished: u64,
    /// Source directories the walk found elsewhere than its scan saw them (moved meanwhile):
    /// the write-back leaves no record of directories (see [`dirids`]).
    #[serde(default)]
    pub moved_meanwhile: u64,
    /// Entries found unchanged: examined, or (with `changed_since`) by their ctime alone.
    /// Directories are not counted.
    pub unchanged: u64,
    /// SQLite databases written as one consistent state each (also counted in `files_copied`).
    #[serde(default)]
    pub databases: u64,
    /// The longest a lock on a live database was held while it was copied, in microseconds.
    #[serde(default)]
    pub db_lock_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn cerr(op: &'static str, path: PathBuf, e: impl Into<std::io::Error>) -> CopyError {
    CopyError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Make `dst` (an existing directory) equal to `src`.
///
/// With `changed_since`, no directory's identity is known (see [`dirids`]): every changed
/// directory is compared whole.
pub fn sync_tree(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopyStats, CopyError> {
    let scanned = scan_changes(src, opts, None);
    let opts = &without_scan_full(opts, scanned.as_ref());
    let mut engine = Engine::new(src, dst, opts, None);
    engine.journal = scanned.as_ref().map(|s| &s.marks);
    engine.scanned = scanned.as_ref().map(|s| &s.listed);
    engine.run()
}

/// For a comparison by ctime ([`CopyOptions::changed_since`]): what changed, as marks for the
/// walk, found by a scan of the source with several threads (see [`scan`]). None where the
/// walk compares everything, or compares by ctime itself.
/// A comparison by ctime that could not scan (the root could not be opened, or a scan thread
/// panicked) compares everything: the walk's own comparison by ctime cannot tell a moved
/// directory (see [`dirids`]).
fn without_scan_full(opts: &CopyOptions, scanned: Option<&scan::Scanned>) -> CopyOptions {
    CopyOptions {
        changed_since: opts.changed_since.filter(|_| scanned.is_some()),
        ..*opts
    }
}

/// `known`: the directories' identities as of `changed_since` (see [`dirids`]).
fn scan_changes(
    src: &Path,
    opts: &CopyOptions,
    known: Option<&std::collections::HashSet<u64>>,
) -> Option<scan::Scanned> {
    let cutoff = engine::cutoff(opts.changed_since?, CTIME_MARGIN_MS)?;
    let scanned = scan::changed_since(src, cutoff, known)?;
    let marked = scanned.marks.len();
    tracing::debug!(marked, "changes since the last write-back, by ctime");
    Some(scanned)
}

/// [`sync_tree`] of a pair that was equal when `changes` (a change journal's period, see
/// [`crate::journal`]) began: only what the journal marked is looked at. Directories without a
/// mark are neither listed nor walked, entries without one neither probed nor compared; a
/// marked entry is compared in full (no ctime shortcut), a directory marked `listing` has its
/// listings compared, one marked `whole` its whole subtree. `opts.changed_since` is ignored.
pub fn sync_tree_journaled(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    changes: &DirtyTree,
) -> Result<CopyStats, CopyError> {
    let mut engine = Engine::new(src, dst, opts, None);
    engine.journal = Some(changes);
    engine.run()
}

/// A write-back into a backup: [`sync_tree`] (or [`sync_tree_journaled`] with `changes`), which
/// with `start_clone` (the target's `-old`, see [`keep`]) first keeps there every entry of the
/// start state it replaces or deletes. Durable mode only; the clone must be on the destination's
/// filesystem.
///
/// With `dir_ids`, a comparison by ctime knows which directories moved since the last
/// write-back from the record left there by that one, and this one leaves a record for the
/// next if it succeeds (see [`dirids`]).
pub fn write_back(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    changes: Option<&DirtyTree>,
    start_clone: Option<&Path>,
    dir_ids: Option<&DirIdsFile>,
) -> Result<CopyStats, CopyError> {
    write_back_hooked(src, dst, opts, changes, start_clone, dir_ids, &|| {})
}

/// [`write_back`], calling `after_scan` between the scan and the walk (tests change the tree
/// there).
fn write_back_hooked(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    changes: Option<&DirtyTree>,
    start_clone: Option<&Path>,
    dir_ids: Option<&DirIdsFile>,
    after_scan: &dyn Fn(),
) -> Result<CopyStats, CopyError> {
    let known = dir_ids
        .filter(|_| changes.is_none())
        .zip(opts.changed_since)
        .and_then(|(f, since)| dirids::load(&f.path, since));
    // Made unusable before anything is written: if this write-back fails, the record would
    // describe neither the last one nor this one (and the next would count changes from the
    // same time as this one, trusting it).
    if let Some(f) = dir_ids {
        dirids::invalidate(&f.path).map_err(|e| {
            cerr(
                "invalidate asd's record of directories (move it away)",
                f.path.clone(),
                e,
            )
        })?;
    }
    let scanned = changes
        .is_none()
        .then(|| scan_changes(src, opts, known.as_ref()))
        .flatten();
    after_scan();
    let opts = &match changes {
        Some(_) => *opts,
        None => without_scan_full(opts, scanned.as_ref()),
    };
    // A full comparison takes the record before it begins, as a scan does.
    let full_ids = (dir_ids.is_some() && changes.is_none() && opts.changed_since.is_none())
        .then(|| scan::dir_ids(src))
        .flatten();
    let ids = full_ids
        .as_ref()
        .or_else(|| scanned.as_ref().and_then(|s| s.ids.as_ref()))
        .filter(|_| dir_ids.is_some());
    let mut engine = Engine::new(src, dst, opts, None);
    engine.journal = changes.or(scanned.as_ref().map(|s| &s.marks));
    engine.scanned = scanned.as_ref().map(|s| &s.listed);
    engine.dir_ids = ids;
    if let (Some(clone), true) = (start_clone, opts.durable) {
        engine.keeper = keep::Keeper::open(clone, std::sync::Arc::clone(&engine.policy))?;
    }
    let stats = engine.run()?;
    // The record says where each directory was at the scan; it says what was written where
    // only if the walk found each directory it opened there too, and none gone (one that
    // moved away and back was not visited: what changed in it was not written). Otherwise the
    // next write-back trusts no identity and compares every changed directory whole.
    let settled = stats.vanished == 0 && stats.moved_meanwhile == 0;
    if let (Some(f), Some(ids), true) = (dir_ids, ids, settled) {
        if let Err(e) = dirids::save(&f.path, f.clean_at, ids) {
            tracing::warn!(
                "{}: {e} (the next write-back compares more)",
                f.path.display()
            );
        }
    }
    Ok(stats)
}

/// Records where every directory of the RAM copy at `root` is (see [`dirids`]), for the first
/// write-back after it was filled, and returns the time that write-back is to count changes
/// from: taken after the record, so that a directory moved after it was recorded has a ctime
/// that is not older.
pub fn record_dir_ids(root: &Path, file: &Path) -> Result<Timestamp, CopyError> {
    let ids = scan::dir_ids(root);
    let at = Timestamp::now();
    match ids {
        Some(ids) => {
            dirids::save(file, at, &ids).map_err(|e| cerr("write", file.to_path_buf(), e))?
        }
        None => dirids::forget(file).map_err(|e| cerr("remove", file.to_path_buf(), e))?,
    }
    Ok(at)
}

/// [`sync_tree`] into an overlay's upper layer (`dst`) from another one (`src`): the same,
/// except for SQLite databases, whose companions become whiteouts there (see
/// [`sqlite`]). `view` is the overlay's merged directory while it is mounted: databases are
/// read there, where the program works and its locks are.
pub fn sync_tree_layer(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    view: Option<&Path>,
) -> Result<CopyStats, CopyError> {
    let mut engine = Engine::new(src, dst, opts, None);
    if let Some(db) = engine.databases.as_mut() {
        db.layer = true;
        db.view = match view {
            Some(v) => Some(helpers::open_root(v)?),
            None => None,
        };
    }
    engine.run()
}

/// [`sync_tree`] with a hook called with the source path of every entry just before it is
/// examined; tests use it to make entries vanish mid-walk.
#[cfg(test)]
fn sync_tree_with_hook(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    hook: &mut dyn FnMut(&Path),
) -> Result<CopyStats, CopyError> {
    Engine::new(src, dst, opts, Some(hook)).run()
}

/// [`sync_tree`] with a ctime margin of `margin` milliseconds instead of [`CTIME_MARGIN_MS`];
/// with `scan`, the changes are found by a [`scan`] as `sync_tree` does (`known`: the
/// directories' identities, see [`dirids`]), without, by the walk itself (where a scan is not
/// possible).
#[cfg(test)]
fn sync_tree_with_margin(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    margin: i64,
    scan: bool,
    known: Option<&std::collections::HashSet<u64>>,
) -> Result<CopyStats, CopyError> {
    let scanned = opts
        .changed_since
        .filter(|_| scan)
        .and_then(|since| engine::cutoff(since, margin))
        .and_then(|cutoff| scan::changed_since(src, cutoff, known));
    assert_eq!(scanned.is_some(), scan && opts.changed_since.is_some());
    let mut engine = Engine::new(src, dst, opts, None);
    engine.margin = margin;
    engine.journal = scanned.as_ref().map(|s| &s.marks);
    engine.scanned = scanned.as_ref().map(|s| &s.listed);
    engine.run()
}
