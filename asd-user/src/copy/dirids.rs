//! Which directory of the RAM copy is where, as of the last write-back, so that one compared by
//! ctime can tell a directory that moved from one that only had names added or removed.
//!
//! Why: a rename stamps the ctime of the directory moved, not of what is inside it. Swap two
//! directories `a` and `b` (or move an old `b` over `a`): both show as changed, their files do
//! not, and the same names exist on disk under both. By ctime alone, `a/x` on disk would keep
//! the old `a`'s file while the RAM copy's `a/x` is the old `b`'s. A change journal sees such a
//! move and marks the directory whole; a comparison by ctime needs to know that `a` is not the
//! directory that was at `a` before.
//!
//! So every write-back by ctime records each directory's identity at its place: a fingerprint
//! of (its inode, its parent's inode, its name) in the RAM copy (tmpfs numbers inodes without
//! reuse while mounted). The next one compares a changed directory whose fingerprint is not in
//! that record in full, subtree and all. Without a record it could trust (none, another
//! write-back's, or the root's identity unknown), it does so for every changed directory.
//!
//! The record is kept in RAM, in the user's area (see `TargetPaths::dir_ids`), made unusable
//! before every write-back starts and written anew by one that succeeded, so it is never older
//! than the last write-back. It is tagged with the time that write-back is counted clean from
//! (the next one's `changed_since`): a record with another tag is not used. A record is left
//! out where the scan was in doubt of where something is (a name gone while it looked, a
//! directory replaced before its turn) or the write-back found a source entry gone: a directory
//! that moved away and back meanwhile may have been missed, and is compared whole next time.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::Timestamp;

/// The file's first bytes: the format, so that another one is not misread.
const MAGIC: &[u8; 8] = b"asdDIRS1";
/// Records larger than this are not read (4 M directories; no RAM copy has that many).
const MAX_IDS: u64 = 4 << 20;

/// Where a write-back finds and leaves the record, and the time the write-back is counted clean
/// from if it succeeds (the tag of the record it leaves).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirIdsFile {
    pub path: std::path::PathBuf,
    pub clean_at: Timestamp,
}

/// The fingerprint of the directory with inode `ino` under the name `name` in the directory
/// with inode `parent` (the root: parent 0, no name). FNV-1a: stable across builds, since the
/// record outlives the process that wrote it.
pub(super) fn fingerprint(ino: u64, parent: u64, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ino
        .to_le_bytes()
        .iter()
        .chain(parent.to_le_bytes().iter())
        .chain(name.iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether `m` can be a record of ours: a regular file of this process's user, with one name
/// (whatever else is there, a FIFO that would block the open, a file of someone else's or one
/// linked elsewhere, is not).
fn ours(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    m.file_type().is_file() && m.uid() == rustix::process::geteuid().as_raw() && m.nlink() == 1
}

/// Opens `path` as a record may be opened: never through a symlink, never waiting (a FIFO).
fn open(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use rustix::fs::OFlags;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(path)
}

/// The record at `path` if it is tagged `tag`; None if there is none, it has another tag, it
/// cannot be read whole, or it is not [`ours`].
pub(super) fn load(path: &Path, tag: Timestamp) -> Option<HashSet<u64>> {
    let mut f = open(path, false).ok()?;
    if !ours(&f.metadata().ok()?) {
        return None;
    }
    let mut head = [0u8; 32];
    f.read_exact(&mut head).ok()?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&head[i * 8..i * 8 + 8]);
        w
    };
    if &word(0) != MAGIC {
        return None;
    }
    let stored = Timestamp {
        sec: i64::from_le_bytes(word(1)),
        nsec: i64::from_le_bytes(word(2)),
    };
    let count = u64::from_le_bytes(word(3));
    if stored != tag || count > MAX_IDS {
        return None;
    }
    let mut body = Vec::new();
    f.take(count * 8 + 1).read_to_end(&mut body).ok()?;
    if body.len() as u64 != count * 8 {
        return None;
    }
    Some(
        body.chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect(),
    )
}

/// Writes the record `ids` tagged `tag` to `path` (under a temporary name, renamed over it: a
/// reader sees the old record or the new one). Not synced: it lives in RAM, as the copy it
/// describes does.
pub(super) fn save(path: &Path, tag: Timestamp, ids: &HashSet<u64>) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let tmp = temp_of(path);
    let mut out = Vec::with_capacity(32 + ids.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&tag.sec.to_le_bytes());
    out.extend_from_slice(&tag.nsec.to_le_bytes());
    out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&out)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Makes the record at `path`, if any, unusable, before a write-back: its first bytes are
/// overwritten in place. Not removed: that would free RAM in a full area for a program to take
/// midway, and the record written at the end would not fit (it is written beside the old one
/// and renamed over it). Something else than a regular file there is not a record anyway.
///
/// An error only if a record `load` would read stays as it was (then the write-back must not
/// run: if it failed, the next one would trust the record).
pub(super) fn invalidate(path: &Path) -> std::io::Result<()> {
    use rustix::io::Errno;
    use std::os::unix::fs::FileExt;
    let f = match open(path, true) {
        Ok(f) => f,
        // Nothing there, or not a record (a directory, a FIFO without a reader, a symlink, a
        // path through a file): `load` reads none either.
        Err(e) => {
            let none = [
                Errno::NOENT,
                Errno::NOTDIR,
                Errno::ISDIR,
                Errno::NXIO,
                Errno::LOOP,
            ]
            .iter()
            .any(|n| e.raw_os_error() == Some(n.raw_os_error()));
            if none {
                return Ok(());
            }
            // Not writable (its mode changed): removed instead, if the directory allows.
            return std::fs::remove_file(path).map_err(|_| e);
        }
    };
    if !ours(&f.metadata()?) {
        return Ok(());
    }
    f.write_all_at(&[0u8; 8], 0)
}

/// Removes the record at `path`, if any, and a temporary one left by a crash (the RAM copy it
/// describes is discarded).
pub fn forget(path: &Path) -> std::io::Result<()> {
    for p in [temp_of(path), path.to_path_buf()] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The name a record is written under before it is renamed into place: a prefix no record's
/// name (a target's) has.
fn temp_of(path: &Path) -> std::path::PathBuf {
    let mut name = std::ffi::OsString::from(super::TEMP_PREFIX);
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_back_only_with_its_tag() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("ids");
        let tag = Timestamp { sec: 5, nsec: 7 };
        let ids: HashSet<u64> = [fingerprint(1, 0, b""), fingerprint(2, 1, b"a")].into();
        save(&path, tag, &ids).unwrap();
        assert_eq!(load(&path, tag), Some(ids.clone()));
        assert_eq!(load(&path, Timestamp { sec: 5, nsec: 8 }), None);
        // Cut short: not used.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        assert_eq!(load(&path, tag), None);
        save(&path, tag, &ids).unwrap();
        invalidate(&path).unwrap();
        assert_eq!(load(&path, tag), None);
        forget(&path).unwrap();
        forget(&path).unwrap();
        invalidate(&path).unwrap();
        assert_eq!(load(&path, tag), None);
    }

    /// A FIFO there (the user's own area) neither blocks nor counts as a record.
    #[test]
    fn only_a_regular_file_is_read() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("ids");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(load(&path, Timestamp::default()), None);
        invalidate(&path).unwrap();
        forget(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(load(&path, Timestamp::default()), None);
        invalidate(&path).unwrap();
    }

    #[test]
    fn fingerprints_tell_places_apart() {
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(2, 1, b"b"));
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(3, 1, b"a"));
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(2, 4, b"a"));
        assert_eq!(fingerprint(2, 1, b"a"), fingerprint(2, 1, b"a"));
    }
}
