//! The copy engine (DESIGN.md §7): makes a destination tree equal to a source tree.
//!
//! INTERFACE CONTRACT (other modules rely on these names; implementation in progress).

use std::path::{Path, PathBuf};

/// Prefix of temporary files the engine creates; crash recovery removes leftovers with this prefix.
pub const TEMP_PREFIX: &str = ".#asd-tmp.";

#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Remove entries of the destination that the source does not have (after all copies).
    pub delete: bool,
    /// Make the result durable before returning (fsync/syncfs); needed when the destination is disk.
    pub durable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyStats {
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub metadata_updated: u64,
    pub dirs_created: u64,
    pub symlinks_copied: u64,
    pub deleted: u64,
    /// Entries that disappeared from the source during the walk (not an error).
    pub vanished: u64,
    /// Entries examined and found unchanged.
    pub unchanged: u64,
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

/// Make `dst` (an existing directory) equal to `src`.
pub fn sync_tree(_src: &Path, _dst: &Path, _opts: &CopyOptions) -> Result<CopyStats, CopyError> {
    todo!()
}
