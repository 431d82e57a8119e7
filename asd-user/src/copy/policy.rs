//! What the destination accepts, learnt during one copy and shared by the walk and the copy
//! threads: which owner changes we may make, whether it stores user xattrs and POSIX ACLs,
//! and how many owner changes were refused. The flags only ever go from "supported" to
//! "unsupported", so threads that see a change late merely try once more and learn it too.

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::io::Errno;
use tracing::{debug, warn};

use crate::fsio::{is_user_xattr, x_remove, x_set, Ids, XRef, Xattrs};

pub(super) struct Policy {
    pub(super) ids: Ids,
    user_xattrs_unsupported: AtomicBool,
    /// The destination does not take POSIX ACLs: ignore them in comparisons.
    acls_unsupported: AtomicBool,
    chown_denied: AtomicU64,
}

impl Policy {
    pub(super) fn new() -> Policy {
        Policy {
            ids: Ids::current(),
            user_xattrs_unsupported: AtomicBool::new(false),
            acls_unsupported: AtomicBool::new(false),
            chown_denied: AtomicU64::new(0),
        }
    }

    /// Owner changes refused with EPERM so far (not an error for a non-root copy).
    pub(super) fn chown_denied(&self) -> u64 {
        self.chown_denied.load(Ordering::Relaxed)
    }

    fn user_xattrs_unsupported(&self) -> bool {
        self.user_xattrs_unsupported.load(Ordering::Relaxed)
    }

    fn acls_unsupported(&self) -> bool {
        self.acls_unsupported.load(Ordering::Relaxed)
    }

    /// Whether an xattr can be copied to the destination at all (as far as we have seen).
    fn settable(&self, name: &CStr) -> bool {
        if is_user_xattr(name) {
            !self.user_xattrs_unsupported()
        } else {
            !self.acls_unsupported()
        }
    }

    pub(super) fn xattrs_equal(&self, a: &Xattrs, b: &Xattrs) -> bool {
        if !self.user_xattrs_unsupported() && !self.acls_unsupported() {
            return a == b;
        }
        // What cannot be stored does not count as a difference (else every run would retry,
        // and rewrite every shared inode).
        let f = |x: &&(CString, Vec<u8>)| self.settable(&x.0);
        a.iter().filter(f).eq(b.iter().filter(f))
    }

    /// Makes the wanted xattrs of `target` equal to `want`. Returns whether anything changed.
    pub(super) fn apply_xattrs(
        &self,
        target: XRef<'_>,
        want: &Xattrs,
        have: &Xattrs,
    ) -> rustix::io::Result<bool> {
        let mut changed = false;
        for (name, value) in want {
            if have.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            if !self.settable(name) {
                continue;
            }
            match x_set(target, name, value) {
                Ok(()) => changed = true,
                Err(Errno::NOTSUP) if is_user_xattr(name) => {
                    // tmpfs before Linux 6.6 has no user xattrs: the data matters more.
                    if !self.user_xattrs_unsupported.swap(true, Ordering::Relaxed) {
                        warn!(
                            "the destination filesystem does not support user extended \
                             attributes; they are not copied"
                        );
                    }
                }
                Err(Errno::NOTSUP) if !is_user_xattr(name) => {
                    if !self.acls_unsupported.swap(true, Ordering::Relaxed) {
                        debug!("the destination filesystem does not support POSIX ACLs");
                    }
                }
                Err(Errno::PERM) | Err(Errno::INVAL) if !is_user_xattr(name) => {
                    debug!(?name, "could not set extended attribute");
                }
                Err(e) => return Err(e),
            }
        }
        for (name, _) in have {
            if want.iter().any(|(n, _)| n == name) {
                continue;
            }
            match x_remove(target, name) {
                Ok(()) => changed = true,
                Err(Errno::NODATA) => {}
                Err(Errno::NOTSUP) | Err(Errno::PERM) if !is_user_xattr(name) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(changed)
    }

    /// A refused owner change is counted, not an error: a user copying files it does not own
    /// cannot give them their owner, and the data matters more.
    pub(super) fn chown_result(&self, r: rustix::io::Result<()>) -> rustix::io::Result<()> {
        match r {
            Err(Errno::PERM) => {
                self.chown_denied.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }
}
