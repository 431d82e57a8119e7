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
//! The record is kept in RAM next to the RAM copy (see `TargetPaths::dir_ids`), written anew by
//! a write-back that succeeded, and removed before every other one starts, so it is never older
//! than the last write-back. It is tagged with the time that write-back is counted clean from
//! (the next one's `changed_since`): a record with another tag is not used. A record is left
//! out where the scan was in doubt of where something is (a name gone while it looked, a
//! directory replaced before its turn) or the write-back found a source entry gone: a directory
//! that moved away and back meanwhile may have been missed, and is compared whole next time.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::Timestamp;

/// The file's first bytes: the format, so that another one is not misread.
const MAGIC: &[u8; 8] = b"asdDIRS1";
/// Records larger than this are not read (64 M directories).
const MAX_IDS: u64 = 64 << 20;

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

/// The record at `path` if it is tagged `tag`; None if there is none, it has another tag, or it
/// cannot be read whole.
pub(super) fn load(path: &Path, tag: Timestamp) -> Option<HashSet<u64>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .ok()?;
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
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
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

/// Removes the record at `path`, if any: the next write-back by ctime trusts no identity.
pub(super) fn forget(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
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
        forget(&path).unwrap();
        forget(&path).unwrap();
        assert_eq!(load(&path, tag), None);
    }

    #[test]
    fn fingerprints_tell_places_apart() {
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(2, 1, b"b"));
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(3, 1, b"a"));
        assert_ne!(fingerprint(2, 1, b"a"), fingerprint(2, 4, b"a"));
        assert_eq!(fingerprint(2, 1, b"a"), fingerprint(2, 1, b"a"));
    }
}
