//! One regular file's content and metadata, written into a file just created: what the walk
//! does for the files it copies itself, and what each copy thread does for the files handed to
//! it (see [`super::pool`]).

use std::collections::HashSet;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::fsio::{
    copy_data, fstat, mode, read_xattrs, wanted_xattr, Meta, XRef, Xattrs, FILE_FLAGS,
};

use super::policy::Policy;
use super::{cerr, CopyError};

/// Flags of a file created for a copy: never through a symlink, never an existing file.
pub(super) const CREATE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What became of a file given to [`FileCopier::copy_new`].
pub(super) enum Copied {
    /// Written completely; the number of data bytes.
    Bytes(u64),
    /// Gone from the source, or no longer a regular file: the next run handles it.
    Vanished,
}

pub(super) struct FileCopier {
    policy: Arc<Policy>,
    /// Source/destination device pairs where copy_file_range does not work.
    no_cfr: HashSet<(u64, u64)>,
    buf: Vec<u8>,
}

impl FileCopier {
    pub(super) fn new(policy: Arc<Policy>) -> FileCopier {
        FileCopier {
            policy,
            no_cfr: HashSet::new(),
            buf: Vec::new(),
        }
    }

    /// Data, xattrs, owner, mode, then times (last: everything before may touch them).
    /// Errors say which operation failed and whether on the source.
    pub(super) fn write(
        &mut self,
        src: &OwnedFd,
        out: &OwnedFd,
        sm: &Meta,
    ) -> Result<u64, (&'static str, bool, Errno)> {
        let om = fstat(out.as_fd()).map_err(|e| ("stat", false, e))?;
        let pair = (sm.dev, om.dev);
        let mut cfr = !self.no_cfr.contains(&pair);
        let n = copy_data(src.as_fd(), out.as_fd(), sm, &mut cfr, &mut self.buf)
            .map_err(|(op, e)| (op, op == "read" || op == "seek", e))?;
        if !cfr {
            self.no_cfr.insert(pair);
        }
        let sx =
            read_xattrs(XRef::Fd(src.as_fd()), wanted_xattr).map_err(|e| ("listxattr", true, e))?;
        self.set_meta(out, sm, &om, &sx)?;
        Ok(n)
    }

    /// The metadata of `out`, a file just written whose stat is `om`: the source's xattrs
    /// `sx`, then owner, mode, then times (last: everything before may touch them).
    pub(super) fn set_meta(
        &mut self,
        out: &OwnedFd,
        sm: &Meta,
        om: &Meta,
        sx: &Xattrs,
    ) -> Result<(), (&'static str, bool, Errno)> {
        // A new file can inherit a default ACL from its directory.
        let dx = read_xattrs(XRef::Fd(out.as_fd()), wanted_xattr)
            .map_err(|e| ("listxattr", false, e))?;
        if *sx != dx {
            self.policy
                .apply_xattrs(XRef::Fd(out.as_fd()), sx, &dx)
                .map_err(|e| ("setxattr", false, e))?;
        }
        let (uid, gid) = self.policy.ids.change(sm, om);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(out, uid, gid);
            self.policy
                .chown_result(r)
                .map_err(|e| ("chown", false, e))?;
        }
        if sm.perm != om.perm || uid.is_some() || gid.is_some() {
            rfs::fchmod(out, mode(sm.perm)).map_err(|e| ("chmod", false, e))?;
        }
        rfs::futimens(out, &sm.times()).map_err(|e| ("utimens", false, e))
    }

    /// Copies the regular file `name` of `src` to a new file of that name in `dst` (which must
    /// not have it). On failure nothing is left under the name. `src_path`/`dst_path` name the
    /// directories in errors.
    pub(super) fn copy_new(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
        src_path: &Path,
        dst_path: &Path,
    ) -> Result<Copied, CopyError> {
        let in_src = || src_path.join(OsStr::from_bytes(name.to_bytes()));
        let in_dst = || dst_path.join(OsStr::from_bytes(name.to_bytes()));
        let from = match rfs::openat(src, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            // Gone, or replaced by a symlink since it was listed.
            Err(Errno::NOENT) | Err(Errno::LOOP) => return Ok(Copied::Vanished),
            Err(e) => return Err(cerr("open", in_src(), e)),
        };
        let sm = fstat(from.as_fd()).map_err(|e| cerr("stat", in_src(), e))?;
        if sm.kind != FileType::RegularFile {
            return Ok(Copied::Vanished);
        }
        let out = rfs::openat(dst, name, CREATE_FLAGS, mode(0o600))
            .map_err(|e| cerr("create", in_dst(), e))?;
        let written = self.write(&from, &out, &sm);
        drop(out);
        match written {
            Ok(n) => Ok(Copied::Bytes(n)),
            Err((op, on_src, e)) => {
                let _ = rfs::unlinkat(dst, name, AtFlags::empty());
                Err(cerr(op, if on_src { in_src() } else { in_dst() }, e))
            }
        }
    }
}
