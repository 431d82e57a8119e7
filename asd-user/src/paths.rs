//! Names asd gives to everything it creates for a target (DESIGN.md §3), compatible with asd 6.0 so
//! users can switch and keep their snapshots.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Suffix of the bind mount of the original directory.
pub const BACKUP_SUFFIX: &str = "-backup_asd";
/// Suffix (after the backup name) of the hard-linked clone of the start state.
pub const OLD_SUFFIX: &str = "-old";
/// Suffix (after the backup name) of crash-recovery snapshots, followed by `-YYYYMMDD_HHMMSS.tar.zstd`.
pub const CRASH_SUFFIX: &str = "-crashrecovery-";
pub const SNAPSHOT_EXT: &str = ".tar.zstd";

/// Every path asd derives from one target. All are absolute.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetPaths {
    /// The directory the user named, e.g. `/p/name`.
    pub target: PathBuf,
    /// `/p/.name-backup_asd`: bind mount of the original directory while synced.
    pub backup: PathBuf,
    /// `/p/.name-backup_asd-old`: hard-linked clone of the start state.
    pub old: PathBuf,
    /// `/p/.name-backup_asd-old.partial`: the clone while it is being built (renamed when complete).
    pub old_partial: PathBuf,
    /// `$VOLATILE/asd-<user>`: the user's 0700 area.
    pub user_area: PathBuf,
    /// `$VOLATILE/asd-<user>/p/name`: the volatile copy (copy mode) or merged view (overlay mode).
    pub volatile: PathBuf,
    /// `$VOLATILE/asd-<user>/p/name-rw`: overlay upper dir.
    pub upper: PathBuf,
    /// `$VOLATILE/asd-<user>/.work/p/name`: overlay work dir (kept inside the user's 0700 area).
    pub work: PathBuf,
    /// `/p/.name-backup_asd-changes`: overlay mode's persisted upper-layer changes on disk.
    pub changes: PathBuf,
}

/// `name` → `.name`, `.name` stays `.name` (a leading dot is not doubled).
fn dotted(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 1);
    if !bytes.starts_with(b".") {
        out.push(b'.');
    }
    out.extend_from_slice(bytes);
    OsString::from_vec(out)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The name a directory is renamed to before it is deleted (`X` → `X.asd-trash`): a deletion
/// cut short never leaves part of a tree under a name that recovery would use.
pub fn trash(path: &Path) -> PathBuf {
    with_suffix(path, ".asd-trash")
}

/// Joins an absolute path below `base` (`/tmp/asd-u` + `/p/name` → `/tmp/asd-u/p/name`).
pub fn nest(base: &Path, absolute: &Path) -> PathBuf {
    let rel = absolute.strip_prefix("/").unwrap_or(absolute);
    base.join(rel)
}

/// The backup path of a target: `/p/name` → `/p/.name-backup_asd`. `None` for `/`.
pub fn backup_of(target: &Path) -> Option<PathBuf> {
    let name = target.file_name()?;
    let parent = target.parent()?;
    let mut file = dotted(name);
    file.push(BACKUP_SUFFIX);
    Some(parent.join(file))
}

impl TargetPaths {
    /// Derive every path for `target` (absolute, normalized, not `/`), owned by `user`, with the
    /// volatile root `volatile`.
    pub fn new(target: &Path, user: &str, volatile: &Path) -> Option<TargetPaths> {
        let backup = backup_of(target)?;
        let user_area = volatile.join(format!("asd-{user}"));
        let volatile_copy = nest(&user_area, target);
        Some(TargetPaths {
            target: target.to_path_buf(),
            old: with_suffix(&backup, OLD_SUFFIX),
            old_partial: with_suffix(&backup, "-old.partial"),
            changes: with_suffix(&backup, "-changes"),
            upper: with_suffix(&volatile_copy, "-rw"),
            work: nest(&user_area.join(".work"), target),
            volatile: volatile_copy,
            user_area,
            backup,
        })
    }

    /// The path of a crash-recovery snapshot taken at `stamp` (`YYYYMMDD_HHMMSS`).
    pub fn snapshot(&self, stamp: &str) -> PathBuf {
        with_suffix(
            &self.backup,
            &format!("{CRASH_SUFFIX}{stamp}{SNAPSHOT_EXT}"),
        )
    }

    /// File-name prefix shared by this target's snapshots (in the target's parent directory).
    pub fn snapshot_prefix(&self) -> OsString {
        let mut s = self.backup.file_name().unwrap_or_default().to_os_string();
        s.push(CRASH_SUFFIX);
        s
    }

    /// Overlay mode: the persisted change set inside the `changes` directory. The directory is
    /// made by the manager (root may be the only one allowed to write the parent); the owner
    /// switches `current` and its next version inside it.
    pub fn changes_state(&self) -> PathBuf {
        self.changes.join("current")
    }

    /// Copy mode: where the RAM copy's directories are, recorded by each write-back for the
    /// next (see `copy::write_back`): `$VOLATILE/asd-<user>/.dirids/p/name`, in RAM like the
    /// copy, and removed with it.
    pub fn dir_ids(&self) -> PathBuf {
        nest(&self.user_area.join(".dirids"), &self.target)
    }

    /// The target's parent directory.
    pub fn parent(&self) -> &Path {
        self.target.parent().unwrap_or(Path::new("/"))
    }

    /// The target's last component: the top-level name inside snapshots, so that `tar -xf` in the
    /// parent directory recreates the target.
    pub fn name(&self) -> &OsStr {
        self.target.file_name().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_asd_6() {
        let p = TargetPaths::new(Path::new("/foo/bar"), "alice", Path::new("/tmp")).unwrap();
        assert_eq!(p.backup, Path::new("/foo/.bar-backup_asd"));
        assert_eq!(p.old, Path::new("/foo/.bar-backup_asd-old"));
        assert_eq!(p.volatile, Path::new("/tmp/asd-alice/foo/bar"));
        assert_eq!(p.upper, Path::new("/tmp/asd-alice/foo/bar-rw"));
        assert_eq!(
            p.snapshot("20141221_070112"),
            Path::new("/foo/.bar-backup_asd-crashrecovery-20141221_070112.tar.zstd")
        );
        let hidden =
            TargetPaths::new(Path::new("/foo/.cache"), "root", Path::new("/dev/shm")).unwrap();
        assert_eq!(hidden.backup, Path::new("/foo/.cache-backup_asd"));
        assert_eq!(hidden.volatile, Path::new("/dev/shm/asd-root/foo/.cache"));
        assert!(TargetPaths::new(Path::new("/"), "root", Path::new("/tmp")).is_none());
    }
}
