//! Overlay mode's data path (DESIGN.md §7): persisting the upper layer's changes beside the target
//! and applying them to the original directory. In progress.

use std::path::{Path, PathBuf};

use crate::copy::CopyStats;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay mode is not available in this build yet; set USE_OVERLAYFS=no")]
    Unsupported,
}

/// Persist the changes recorded in `upper` into `changes` on disk.
pub fn persist(_upper: &Path, _changes: &Path) -> Result<CopyStats, OverlayError> {
    Err(OverlayError::Unsupported)
}

/// Apply persisted changes (or an upper layer) onto `dst`.
pub fn apply(_changes: &Path, _dst: &Path) -> Result<CopyStats, OverlayError> {
    Err(OverlayError::Unsupported)
}
