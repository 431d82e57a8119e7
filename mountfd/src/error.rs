//! The error of a failed system call.

use rustix::io::Errno;

/// A failed system call: which step (`"open_tree"`, `"fsconfig upperdir"`, ...) and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {errno}")]
pub struct SysError {
    pub op: &'static str,
    pub errno: Errno,
}

impl SysError {
    /// `map_err(SysError::of("open_tree"))`.
    pub fn of(op: &'static str) -> impl FnOnce(Errno) -> SysError {
        move |errno| SysError { op, errno }
    }
}
