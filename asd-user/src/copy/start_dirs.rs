//! The start clone's list of the tree's directories as they were at the start (mode, owner,
//! times), one file in the clone instead of one directory per directory: making and deleting
//! a directory skeleton costs two disk reads or writes per directory, on trees of thousands.
//! The clone makes a directory only when it keeps something in it (see [`super::keep`]); the
//! crash-recovery snapshot takes every start directory's metadata from here (see
//! `crate::snapshot`).
//!
//! Format: the magic line, then per directory its path relative to the tree (length-prefixed
//! bytes), mode, uid, gid, atime and mtime (seconds, nanoseconds); little-endian integers.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::Errno;

use crate::fsio::{mode, Meta};

/// Its name in the clone: a temporary name, which nothing takes for a start entry.
pub const NAME: &CStr = c".#asd-tmp.start-dirs";
const MAGIC: &[u8] = b"asd start dirs 1\n";
/// A list larger than this is not asd's: a start clone that would need one is a full clone
/// (two million directories with paths of 80 bytes).
pub(crate) const MAX_SIZE: u64 = 256 << 20;

/// A start directory's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMeta {
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

impl DirMeta {
    pub(crate) fn of(m: &Meta) -> DirMeta {
        DirMeta {
            perm: m.perm,
            uid: m.uid,
            gid: m.gid,
            atime: m.atime,
            mtime: m.mtime,
        }
    }
}

/// Start directories by their path relative to the tree.
pub type StartDirs = HashMap<Vec<u8>, DirMeta>;

/// Appends one directory to a list being built.
pub(crate) fn push(out: &mut Vec<u8>, rel: &[u8], m: &DirMeta) {
    if out.is_empty() {
        out.extend_from_slice(MAGIC);
    }
    // A path is at most PATH_MAX (4096) bytes.
    out.extend_from_slice(&u32::try_from(rel.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(rel);
    for v in [m.perm, m.uid, m.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [m.atime.0, m.atime.1, m.mtime.0, m.mtime.1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Writes the list into the clone directory `dir` (made durable by the clone's syncfs).
pub(crate) fn write(dir: BorrowedFd<'_>, list: &[u8]) -> rustix::io::Result<()> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(dir, NAME, flags, mode(0o600))?;
    let mut done = 0;
    while done < list.len() {
        match rustix::io::write(&fd, &list[done..]) {
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The list in the clone directory `dir`; empty where there is none (a clone with every
/// directory, made by asd 6.0 or where the filesystem records no birth times).
pub fn read(dir: BorrowedFd<'_>) -> std::io::Result<StartDirs> {
    let fd = match rfs::openat(
        dir.as_fd(),
        NAME,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(StartDirs::new()),
        Err(e) => return Err(e.into()),
    };
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_SIZE)
        .read_to_end(&mut buf)?;
    parse(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the start clone's list of directories is damaged",
        )
    })
}

fn parse(buf: &[u8]) -> Option<StartDirs> {
    let mut rest = buf.strip_prefix(MAGIC)?;
    let mut out = StartDirs::new();
    let take = |n: usize, rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        *rest = b;
        Some(a.to_vec())
    };
    let u32_of = |v: Vec<u8>| v.try_into().ok().map(u32::from_le_bytes);
    let i64_of = |v: Vec<u8>| v.try_into().ok().map(i64::from_le_bytes);
    while !rest.is_empty() {
        let len = u32_of(take(4, &mut rest)?)? as usize;
        let rel = take(len, &mut rest)?;
        let perm = u32_of(take(4, &mut rest)?)?;
        let uid = u32_of(take(4, &mut rest)?)?;
        let gid = u32_of(take(4, &mut rest)?)?;
        let mut t = [0i64; 4];
        for v in &mut t {
            *v = i64_of(take(8, &mut rest)?)?;
        }
        out.insert(
            rel,
            DirMeta {
                perm,
                uid,
                gid,
                atime: (t[0], t[1]),
                mtime: (t[2], t[3]),
            },
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_reads_back_as_written_and_damage_is_refused() {
        let m = |n: i64| DirMeta {
            perm: 0o750,
            uid: 1000,
            gid: 100,
            atime: (n, 1),
            mtime: (-n, 999_999_999),
        };
        let mut out = Vec::new();
        push(&mut out, b"", &m(1));
        push(&mut out, b"a/b\xff", &m(2));
        let list = parse(&out).expect("parse");
        assert_eq!(list.len(), 2);
        assert_eq!(list[&b"a/b\xff"[..]], m(2));
        assert!(parse(&out[..out.len() - 1]).is_none(), "cut short");
        assert!(parse(b"something else").is_none(), "not ours");
    }
}
