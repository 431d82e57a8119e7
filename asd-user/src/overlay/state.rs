//! The persisted state's directory (see the module documentation of [`crate::overlay`]): its
//! marker, the names of its layers and reading them.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode};
use rustix::io::Errno;

use crate::copy::Timestamp;
use crate::fsio::{is_temp_name, list_dir, lstat_at, DIR_FLAGS, FILE_FLAGS};

use super::{join, oerr, OverlayError};

/// The marker file of a state directory. A `changes` in the format before deltas is a copy of an
/// upper layer, whose top level could hold any name: the fixed content makes a mix-up with a
/// user's file of that name there as good as impossible.
pub(super) const MARKER: &CStr = c".asd-overlay-state";
pub(super) const MARKER_CONTENT: &[u8] = b"asd overlay state, format 2 (base and deltas)\n";

/// Deltas before a persist compacts the state into a new base: bounds the layers an apply goes
/// through and how long a change that ctime missed (clock set back) stays missed.
pub const MAX_DELTAS: usize = 32;
/// File data held in deltas before a persist compacts: a file rewritten at every resync has a
/// copy in every delta.
pub const MAX_DELTA_BYTES: u64 = 256 << 20;

const BASE_PREFIX: &str = "base.";
const DELTA_PREFIX: &str = "delta.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Base {
    pub(super) name: CString,
    pub(super) cutoff: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Delta {
    pub(super) name: CString,
    pub(super) seq: u64,
    pub(super) cutoff: Timestamp,
    pub(super) bytes: u64,
}

/// A state directory's layers, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct State {
    pub(super) base: Base,
    /// In order of `seq`.
    pub(super) deltas: Vec<Delta>,
}

pub(super) enum Layers {
    /// One upper layer: the format before deltas, or an upper layer itself.
    Single,
    State(State),
}

impl State {
    /// The layers' paths below `root` (the state directory), in the order they are applied.
    pub(super) fn layer_paths(&self, root: &Path) -> Vec<PathBuf> {
        std::iter::once(&self.base.name)
            .chain(self.deltas.iter().map(|d| &d.name))
            .map(|n| join(root, n))
            .collect()
    }

    /// The layers' names, the most recent first (the order of lookups).
    pub(super) fn names_top_first(&self) -> Vec<&CStr> {
        self.deltas
            .iter()
            .rev()
            .map(|d| d.name.as_c_str())
            .chain([self.base.name.as_c_str()])
            .collect()
    }

    /// The cutoff of the most recent layer: what the next delta is relative to.
    pub(super) fn last_cutoff(&self) -> Timestamp {
        self.deltas
            .last()
            .map(|d| d.cutoff)
            .unwrap_or(self.base.cutoff)
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.deltas.last().map(|d| d.seq + 1).unwrap_or(1)
    }

    pub(super) fn delta_bytes(&self) -> u64 {
        self.deltas.iter().map(|d| d.bytes).sum()
    }
}

pub(super) fn base_name(cutoff: Timestamp) -> CString {
    named(format!("{BASE_PREFIX}{}.{}", cutoff.sec, cutoff.nsec))
}

pub(super) fn delta_name(seq: u64, cutoff: Timestamp, bytes: u64) -> CString {
    named(format!(
        "{DELTA_PREFIX}{seq}.{}.{}.{bytes}",
        cutoff.sec, cutoff.nsec
    ))
}

fn named(s: String) -> CString {
    // Digits, dots and a NUL-free constant.
    CString::new(s).unwrap_or_default()
}

fn parse_time(sec: &str, nsec: &str) -> Option<Timestamp> {
    let t = Timestamp {
        sec: sec.parse().ok()?,
        nsec: nsec.parse().ok()?,
    };
    (0..1_000_000_000).contains(&t.nsec).then_some(t)
}

fn parse_base(name: &str) -> Option<Timestamp> {
    let rest = name.strip_prefix(BASE_PREFIX)?;
    let (sec, nsec) = rest.split_once('.')?;
    parse_time(sec, nsec)
}

fn parse_delta(name: &str) -> Option<(u64, Timestamp, u64)> {
    let rest = name.strip_prefix(DELTA_PREFIX)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [seq, sec, nsec, bytes] = parts[..] else {
        return None;
    };
    Some((
        seq.parse().ok()?,
        parse_time(sec, nsec)?,
        bytes.parse().ok()?,
    ))
}

/// The layer paths of `changes` in the order [`crate::overlay::apply`] applies them: the base
/// and the deltas of a state, or `changes` itself (the format before deltas, or an upper layer).
pub fn layers(changes: &Path) -> Result<Vec<PathBuf>, OverlayError> {
    Ok(match read_layers(changes)? {
        Layers::Single => vec![changes.to_path_buf()],
        Layers::State(s) => s.layer_paths(changes),
    })
}

pub(super) fn read_layers(changes: &Path) -> Result<Layers, OverlayError> {
    let dir = rfs::open(changes, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", changes.to_path_buf(), e))?;
    read_layers_at(dir.as_fd(), changes)
}

/// Reads the state directory open at `dir` (`path` for messages). Anything there that persist
/// does not leave is an error: a state is never applied in part or guessed at.
pub(super) fn read_layers_at(dir: BorrowedFd<'_>, path: &Path) -> Result<Layers, OverlayError> {
    if !has_marker(dir, path)? {
        return Ok(Layers::Single);
    }
    let bad = |reason: String| OverlayError::BadState {
        path: path.to_path_buf(),
        reason,
    };
    let names = list_dir(dir, &mut Vec::new()).map_err(|e| oerr("readdir", path.into(), e))?;
    let mut base: Option<Base> = None;
    let mut deltas = Vec::new();
    for name in names {
        // Leftovers of an interrupted persist were never part of the state.
        if name.as_c_str() == MARKER || is_temp_name(&name) {
            continue;
        }
        let text = name.to_string_lossy().into_owned();
        let is_dir = matches!(lstat_at(dir, &name), Ok(m) if m.kind == FileType::Directory);
        if let (Some(cutoff), true) = (parse_base(&text), is_dir) {
            if base.is_some() {
                return Err(bad(format!("two bases (one is {text})")));
            }
            base = Some(Base { name, cutoff });
        } else if let (Some((seq, cutoff, bytes)), true) = (parse_delta(&text), is_dir) {
            deltas.push(Delta {
                name,
                seq,
                cutoff,
                bytes,
            });
        } else {
            return Err(bad(format!("unexpected entry {text}")));
        }
    }
    let Some(base) = base else {
        return Err(bad("no base".into()));
    };
    deltas.sort_by_key(|d| d.seq);
    if deltas.windows(2).any(|w| w[0].seq == w[1].seq) {
        return Err(bad("two deltas with the same number".into()));
    }
    Ok(Layers::State(State { base, deltas }))
}

fn has_marker(dir: BorrowedFd<'_>, path: &Path) -> Result<bool, OverlayError> {
    match lstat_at(dir, MARKER) {
        Ok(m) if m.kind == FileType::RegularFile && m.size == MARKER_CONTENT.len() as u64 => {}
        Ok(_) | Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(oerr("lstat", join(path, MARKER), e)),
    }
    let fd = rfs::openat(dir, MARKER, FILE_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", join(path, MARKER), e))?;
    let mut buf = [0u8; 128];
    let n = rustix::io::read(&fd, &mut buf).map_err(|e| oerr("read", join(path, MARKER), e))?;
    Ok(buf.get(..n) == Some(MARKER_CONTENT))
}
