//! [`apply`]: writes a persisted state (or an upper layer) into the original directory; the order
//! of operations and why a crash at any point is harmless are in the module documentation of
//! [`crate::overlay`].

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, RenameFlags, XattrFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::copy::{sqlite, CopyStats};
use crate::fsio::{
    chmod_nofollow, copy_data, crash_point, fstat, is_temp_name, is_user_xattr, list_dir, lstat_at,
    mode, open_dir_at, read_xattrs, remove_entry, remove_tree, wanted_xattr, Ids, Meta, XRef,
    Xattrs, DIR_FLAGS, FILE_FLAGS, MAX_KEPT_DIRS,
};

use super::state::{self, Layers};
use super::{
    add_stats, is_opaque, join_opt, oerr, temp_name, xattr_value, OverlayError, NEW_FILE_FLAGS,
    OVL_METACOPY, OVL_PREFIX, OVL_REDIRECT, OVL_WHITEOUT,
};

/// The xattrs apply writes to the original: those the copy engine copies ([`wanted_xattr`]: user
/// ones and POSIX ACLs) but never `user.overlay.*`. Deliberately narrower than what is read from
/// `changes` ([`wanted_xattr`], overlayfs' markers included): overlayfs' own bookkeeping, and
/// the user's own `user.overlay.*` xattrs, would on the original be overlayfs metadata the next
/// time it is mounted as a lower layer.
fn applied_xattr(name: &[u8]) -> bool {
    wanted_xattr(name) && !name.starts_with(OVL_PREFIX)
}

/// Makes the applied xattrs ([`applied_xattr`]) of `fd` equal to the applied ones of `want`;
/// with `additive`, xattrs `want` lacks are kept.
fn sync_xattrs(fd: BorrowedFd<'_>, want: &Xattrs, additive: bool) -> rustix::io::Result<()> {
    let have = read_xattrs(XRef::Fd(fd), applied_xattr)?;
    for (name, value) in want.iter().filter(|(n, _)| applied_xattr(n.to_bytes())) {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        match rfs::fsetxattr(fd, name, value, XattrFlags::empty()) {
            Ok(()) => {}
            // ACLs where the filesystem has none, or that we may not set: the data matters more.
            Err(Errno::NOTSUP) | Err(Errno::PERM) | Err(Errno::INVAL) if !is_user_xattr(name) => {
                debug!(?name, "could not set extended attribute");
            }
            Err(e) => return Err(e),
        }
    }
    if additive {
        return Ok(());
    }
    for (name, _) in &have {
        if want.iter().any(|(n, _)| n == name) {
            continue;
        }
        match rfs::fremovexattr(fd, name) {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(Errno::NOTSUP) | Err(Errno::PERM) if !is_user_xattr(name) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Applies persisted changes (a state written by [`crate::overlay::persist`], a `changes`
/// directory in the format before deltas, or an upper layer) onto `dst`, the original
/// directory, with the overlay unmounted. A state's layers are applied in order, base first.
/// Idempotent; durable before it returns. See the module documentation for the order of
/// operations. Errors on single entries do not stop the others in their layer; the first one is
/// returned at the end of that layer, and later layers are not applied.
pub fn apply(changes: &Path, dst: &Path) -> Result<CopyStats, OverlayError> {
    let layers = match state::read_layers(changes)? {
        Layers::Single => vec![changes.to_path_buf()],
        Layers::State(s) => s.layer_paths(changes),
    };
    // One count of renames and deletions over all layers, so that the crash test hook can stop
    // any step of the whole apply.
    let mut crash = CrashHook {
        at: crash_point(),
        done: 0,
    };
    let mut total = CopyStats::default();
    for layer in &layers {
        // A layer that did not apply completely stops the apply (the error is returned, the
        // state kept for another attempt): later layers were made relative to its whole result.
        let stats = apply_layer(layer, dst, &mut crash)?;
        add_stats(&mut total, &stats);
    }
    Ok(total)
}

/// The test hook's position ([`crash_point`]), shared by the layers of one apply.
struct CrashHook {
    at: Option<usize>,
    done: usize,
}

impl CrashHook {
    fn check(&mut self) {
        if self.at == Some(self.done) {
            std::process::abort();
        }
        self.done += 1;
    }
}

/// Applies one upper layer onto `dst`.
fn apply_layer(
    changes: &Path,
    dst: &Path,
    crash: &mut CrashHook,
) -> Result<CopyStats, OverlayError> {
    let c = rfs::open(changes, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", changes.to_path_buf(), e))?;
    let d =
        rfs::open(dst, DIR_FLAGS, Mode::empty()).map_err(|e| oerr("open", dst.to_path_buf(), e))?;
    let cm = fstat(c.as_fd()).map_err(|e| oerr("stat", changes.to_path_buf(), e))?;
    let dm = fstat(d.as_fd()).map_err(|e| oerr("stat", dst.to_path_buf(), e))?;
    if (cm.dev, cm.ino) == (dm.dev, dm.ino) {
        return Err(oerr(
            "apply",
            dst.to_path_buf(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the changes and the destination are the same directory",
            ),
        ));
    }
    let mut a = Applier {
        changes_root: changes,
        dst_root: dst,
        src_rel: PathBuf::new(),
        dst_rel: PathBuf::new(),
        stats: CopyStats::default(),
        first_error: None,
        errors: 0,
        ids: Ids::current(),
        seq: 0,
        dirs: Vec::new(),
        renames: Vec::new(),
        deletions: Vec::new(),
        early_deletions: Vec::new(),
        dir_jobs: Vec::new(),
        sync_fds: Vec::new(),
        chown_denied: 0,
        no_cfr: false,
        dirbuf: Vec::new(),
        databuf: Vec::new(),
    };
    a.note_device(dm.dev, d.as_fd());
    a.walk_root(c.as_fd(), d.as_fd(), &cm);
    a.finish(d.as_fd(), crash)
}

/// A visible (merged) destination directory that later phases work in.
struct Slot {
    /// Path relative to the destination root.
    rel: PathBuf,
    fd: Option<OwnedFd>,
}

struct Rename {
    slot: usize,
    from: CString,
    to: CString,
}

/// Metadata to set on a merged directory in phase 5. Not shared with the copy engine's
/// `DirJob`: that one indexes its own table of directories and has no `additive` root case.
struct DirJob {
    slot: usize,
    meta: Meta,
    xattrs: Xattrs,
    /// The root: xattrs are only added, never removed (see `walk_root`).
    additive: bool,
}

/// A pair of directories being walked.
struct Ctx<'f> {
    c: BorrowedFd<'f>,
    d: BorrowedFd<'f>,
    /// The slot of a visible destination directory (entries go to temporary names first);
    /// None for one this run is building under a temporary name (entries go straight in).
    slot: Option<usize>,
    made_writable: bool,
}

struct Applier<'a> {
    changes_root: &'a Path,
    dst_root: &'a Path,
    /// Current directory relative to `changes` / to the destination (they differ below a
    /// directory built under a temporary name).
    src_rel: PathBuf,
    dst_rel: PathBuf,
    stats: CopyStats,
    first_error: Option<OverlayError>,
    errors: u64,
    ids: Ids,
    seq: u64,
    dirs: Vec<Slot>,
    renames: Vec<Rename>,
    deletions: Vec<(usize, CString)>,
    /// Logs of databases this layer replaces: deleted before the renames (see `whiteout`).
    early_deletions: Vec<(usize, CString)>,
    dir_jobs: Vec<DirJob>,
    /// One descriptor per destination filesystem, for syncfs.
    sync_fds: Vec<(u64, OwnedFd)>,
    chown_denied: u64,
    /// copy_file_range failed once: use pread/pwrite.
    no_cfr: bool,
    dirbuf: Vec<u8>,
    databuf: Vec<u8>,
}

impl Applier<'_> {
    fn fail(&mut self, e: OverlayError) {
        warn!("{e}");
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn src_path(&self, name: Option<&CStr>) -> PathBuf {
        join_opt(self.changes_root.join(&self.src_rel), name)
    }

    fn dst_path(&self, name: Option<&CStr>) -> PathBuf {
        join_opt(self.dst_root.join(&self.dst_rel), name)
    }

    fn note_device(&mut self, dev: u64, fd: BorrowedFd<'_>) {
        if self.sync_fds.iter().any(|(d, _)| *d == dev) {
            return;
        }
        match fd.try_clone_to_owned() {
            Ok(owned) => self.sync_fds.push((dev, owned)),
            Err(e) => self.fail(oerr("dup", self.dst_path(None), e)),
        }
    }

    fn add_slot(&mut self, fd: BorrowedFd<'_>) -> usize {
        let fd = if self.dirs.len() < MAX_KEPT_DIRS {
            fd.try_clone_to_owned().ok()
        } else {
            None
        };
        self.dirs.push(Slot {
            rel: self.dst_rel.clone(),
            fd,
        });
        self.dirs.len() - 1
    }

    fn chown_result(&mut self, r: rustix::io::Result<()>) -> rustix::io::Result<()> {
        match r {
            Err(Errno::PERM) => {
                self.chown_denied += 1;
                Ok(())
            }
            other => other,
        }
    }

    // -- phase 1: the walk ----------------------------------------------------------------

    fn walk_root(&mut self, c: BorrowedFd<'_>, d: BorrowedFd<'_>, cm: &Meta) {
        let xattrs = match read_xattrs(XRef::Fd(c), wanted_xattr) {
            Ok(x) => x,
            Err(e) => {
                self.fail(oerr("listxattr", self.src_path(None), e));
                return;
            }
        };
        let slot = self.add_slot(d);
        // The root cannot be replaced by a rename: an opaque root (which overlayfs does not
        // make) is applied in place, removing what `changes` does not have.
        let existing = if is_opaque(&xattrs) {
            match list_dir(d, &mut self.dirbuf) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.fail(oerr("readdir", self.dst_path(None), e));
                    return;
                }
            }
        } else {
            None
        };
        let mut ctx = Ctx {
            c,
            d,
            slot: Some(slot),
            made_writable: false,
        };
        let Some(names) = self.walk_dir(&mut ctx) else {
            return;
        };
        for name in existing.into_iter().flatten() {
            if names.binary_search(&name).is_err() {
                self.deletions.push((slot, name));
            }
        }
        // The upper layer's root is not a copy-up of the original's: asd created it (with the
        // original's mode and owner), so it lacks the original's xattrs. Add and change xattrs,
        // never remove them, so the original's stay.
        self.dir_jobs.push(DirJob {
            slot,
            meta: *cm,
            xattrs,
            additive: true,
        });
    }

    /// Applies the entries of `ctx.c`. Returns the sorted names of `ctx.c` (None when it could
    /// not be read).
    fn walk_dir(&mut self, ctx: &mut Ctx<'_>) -> Option<Vec<CString>> {
        let mut names = match list_dir(ctx.c, &mut self.dirbuf) {
            Ok(n) => n,
            Err(e) => {
                self.fail(oerr("readdir", self.src_path(None), e));
                return None;
            }
        };
        names.sort();
        for name in &names {
            if is_temp_name(name) {
                // A leftover of an interrupted persist: not part of the persisted state.
                debug!(path = ?self.src_path(Some(name)), "ignoring temporary leftover");
                continue;
            }
            self.walk_entry(ctx, name);
        }
        Some(names)
    }

    fn walk_entry(&mut self, ctx: &mut Ctx<'_>, name: &CStr) {
        let m = match lstat_at(ctx.c, name) {
            Ok(m) => m,
            Err(Errno::NOENT) => {
                self.stats.vanished += 1;
                return;
            }
            Err(e) => {
                self.fail(oerr("lstat", self.src_path(Some(name)), e));
                return;
            }
        };
        let res = match m.kind {
            FileType::CharacterDevice if m.rdev == 0 => {
                self.whiteout(ctx, name);
                Ok(())
            }
            FileType::Directory => {
                self.dir_entry(ctx, name, &m);
                Ok(())
            }
            FileType::RegularFile => self.file_entry(ctx, name),
            FileType::Symlink => self.symlink_entry(ctx, name, &m),
            FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                self.special_entry(ctx, name, &m)
            }
            _ => {
                debug!(path = ?self.src_path(Some(name)), "skipping socket");
                Ok(())
            }
        };
        if let Err(e) = res {
            self.fail(e);
        }
    }

    /// The lower entry `name` was deleted: delete it from the destination (phase 4). Inside a
    /// directory being built there is nothing to delete.
    fn whiteout(&mut self, ctx: &Ctx<'_>, name: &CStr) {
        if let Some(slot) = ctx.slot {
            // The log of a database this layer writes anew (see `copy::sqlite`) goes before the
            // new copy is renamed in: an old log beside it would be replayed into it.
            let log_of_new_db = sqlite::enabled()
                && sqlite::base_of(name).is_some_and(|b| sqlite::is_database(ctx.c, &b));
            if log_of_new_db {
                self.early_deletions.push((slot, name.to_owned()));
            } else {
                self.deletions.push((slot, name.to_owned()));
            }
        }
    }

    /// Creates an entry in `ctx.d` with `make`: under `name` inside a directory being built,
    /// else under a fresh temporary name. Retries on a clashing temporary name, and once after
    /// making the (visible, so restored in phase 5) directory writable.
    fn create<T>(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &CStr,
        mut make: impl FnMut(BorrowedFd<'_>, &CStr) -> rustix::io::Result<T>,
    ) -> rustix::io::Result<(CString, T)> {
        let mut clashes = 0;
        loop {
            let n = match ctx.slot {
                None => name.to_owned(),
                Some(_) => temp_name(&mut self.seq),
            };
            match make(ctx.d, &n) {
                Ok(t) => return Ok((n, t)),
                Err(Errno::EXIST) if ctx.slot.is_some() && clashes < 1000 => clashes += 1,
                Err(Errno::ACCESS) if !ctx.made_writable => {
                    let m = fstat(ctx.d)?;
                    rfs::fchmod(ctx.d, mode(m.perm | 0o700))?;
                    ctx.made_writable = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues the rename of a finished temporary entry over `name` (phase 3).
    fn commit(&mut self, ctx: &Ctx<'_>, tmp: CString, name: &CStr) {
        if let Some(slot) = ctx.slot {
            self.renames.push(Rename {
                slot,
                from: tmp,
                to: name.to_owned(),
            });
        }
    }

    fn file_entry(&mut self, ctx: &mut Ctx<'_>, name: &CStr) -> Result<(), OverlayError> {
        let src = match rfs::openat(ctx.c, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::LOOP) => {
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(oerr("open", self.src_path(Some(name)), e)),
        };
        let sm = fstat(src.as_fd()).map_err(|e| oerr("stat", self.src_path(Some(name)), e))?;
        if sm.kind != FileType::RegularFile {
            self.stats.vanished += 1;
            return Ok(());
        }
        let xattrs = read_xattrs(XRef::Fd(src.as_fd()), wanted_xattr)
            .map_err(|e| oerr("listxattr", self.src_path(Some(name)), e))?;
        if sm.size == 0 && xattr_value(&xattrs, OVL_WHITEOUT).is_some() {
            self.whiteout(ctx, name);
            return Ok(());
        }
        if xattr_value(&xattrs, OVL_METACOPY).is_some() {
            // Only metadata was copied up; the data is in a lower layer, which asd's mounts
            // (userxattr, which turns metacopy off) never produce. Writing it would truncate
            // the original.
            return Err(oerr(
                "apply",
                self.src_path(Some(name)),
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "metacopy entry (its data is in the lower layer); not applied",
                ),
            ));
        }
        let (tmp, out) = self
            .create(ctx, name, |dir, n| {
                rfs::openat(dir, n, NEW_FILE_FLAGS, mode(0o600))
            })
            .map_err(|e| oerr("create", self.dst_path(Some(name)), e))?;
        let written = self.write_file(&src, &out, &sm, &xattrs);
        drop(out);
        match written {
            Ok(n) => {
                self.stats.files_copied += 1;
                self.stats.bytes_copied += n;
                self.commit(ctx, tmp, name);
                Ok(())
            }
            Err((op, on_src, e)) => {
                let _ = rfs::unlinkat(ctx.d, &tmp, AtFlags::empty());
                let p = if on_src {
                    self.src_path(Some(name))
                } else {
                    self.dst_path(Some(name))
                };
                Err(oerr(op, p, e))
            }
        }
    }

    /// Data, then metadata ([`Applier::set_meta_fd`]).
    fn write_file(
        &mut self,
        src: &OwnedFd,
        out: &OwnedFd,
        sm: &Meta,
        xattrs: &Xattrs,
    ) -> Result<u64, (&'static str, bool, Errno)> {
        let mut cfr = !self.no_cfr;
        let n = copy_data(src.as_fd(), out.as_fd(), sm, &mut cfr, &mut self.databuf)
            .map_err(|(op, e)| (op, op == "read" || op == "seek", e))?;
        self.no_cfr = !cfr;
        self.set_meta_fd(out.as_fd(), sm, xattrs, false)?;
        Ok(n)
    }

    /// Wanted xattrs, owner, mode, then times (last: everything before may change them) of an
    /// open file or directory.
    fn set_meta_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        sm: &Meta,
        xattrs: &Xattrs,
        additive: bool,
    ) -> Result<(), (&'static str, bool, Errno)> {
        let now = fstat(fd).map_err(|e| ("stat", false, e))?;
        // Xattrs before the mode: writing user xattrs needs write permission even for the
        // owner, which a read-only file or directory no longer gives once chmodded.
        match sync_xattrs(fd, xattrs, additive) {
            Err(Errno::ACCESS) if now.perm & 0o200 == 0 => {
                rfs::fchmod(fd, mode(now.perm | 0o200)).map_err(|e| ("chmod", false, e))?;
                sync_xattrs(fd, xattrs, additive)
            }
            other => other,
        }
        .map_err(|e| ("setxattr", false, e))?;
        let (uid, gid) = self.ids.change(sm, &now);
        if uid.is_some() || gid.is_some() {
            let r = rfs::fchown(fd, uid, gid);
            self.chown_result(r).map_err(|e| ("chown", false, e))?;
        }
        // After chown, which may clear set-id bits; always, since the umask shaped new entries.
        rfs::fchmod(fd, mode(sm.perm)).map_err(|e| ("chmod", false, e))?;
        rfs::futimens(fd, &sm.times()).map_err(|e| ("utimens", false, e))
    }

    /// Owner, mode (not for symlinks: meaningless, and chmod would follow them) and times of a
    /// node that cannot be opened, by name.
    fn set_node_meta(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        sm: &Meta,
    ) -> Result<(), OverlayError> {
        let path = |s: &Self| s.dst_path(Some(name));
        let now = lstat_at(dir, name).map_err(|e| oerr("lstat", path(self), e))?;
        let (uid, gid) = self.ids.change(sm, &now);
        if uid.is_some() || gid.is_some() {
            let r = rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
            self.chown_result(r)
                .map_err(|e| oerr("chown", path(self), e))?;
        }
        if sm.kind != FileType::Symlink {
            chmod_nofollow(dir, name, |_| sm.perm).map_err(|e| oerr("chmod", path(self), e))?;
        }
        rfs::utimensat(dir, name, &sm.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| oerr("utimens", path(self), e))
    }

    fn symlink_entry(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &CStr,
        sm: &Meta,
    ) -> Result<(), OverlayError> {
        let target = match rfs::readlinkat(ctx.c, name, Vec::new()) {
            Ok(t) => t,
            Err(Errno::NOENT) | Err(Errno::INVAL) => {
                self.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(oerr("readlink", self.src_path(Some(name)), e)),
        };
        let (tmp, ()) = self
            .create(ctx, name, |dir, n| {
                rfs::symlinkat(target.as_c_str(), dir, n)
            })
            .map_err(|e| oerr("symlink", self.dst_path(Some(name)), e))?;
        if let Err(e) = self.set_node_meta(ctx.d, &tmp, sm) {
            let _ = rfs::unlinkat(ctx.d, &tmp, AtFlags::empty());
            return Err(e);
        }
        self.stats.symlinks_copied += 1;
        self.commit(ctx, tmp, name);
        Ok(())
    }

    /// Fifos, and device nodes other than whiteouts (only root may make those).
    fn special_entry(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &CStr,
        sm: &Meta,
    ) -> Result<(), OverlayError> {
        let made = self.create(ctx, name, |dir, n| {
            rfs::mknodat(dir, n, sm.kind, mode(sm.perm & 0o777), sm.rdev)
        });
        let tmp = match made {
            Ok((tmp, ())) => tmp,
            Err(Errno::PERM) if sm.kind != FileType::Fifo => {
                warn!(path = ?self.src_path(Some(name)), "skipping device node: not permitted");
                return Ok(());
            }
            Err(e) => return Err(oerr("mknod", self.dst_path(Some(name)), e)),
        };
        if let Err(e) = self.set_node_meta(ctx.d, &tmp, sm) {
            let _ = rfs::unlinkat(ctx.d, &tmp, AtFlags::empty());
            return Err(e);
        }
        self.stats.files_copied += 1;
        self.commit(ctx, tmp, name);
        Ok(())
    }

    fn dir_entry(&mut self, ctx: &mut Ctx<'_>, name: &CStr, sm: &Meta) {
        let src = match rfs::openat(ctx.c, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                self.stats.vanished += 1;
                return;
            }
            Err(e) => {
                self.fail(oerr("open", self.src_path(Some(name)), e));
                return;
            }
        };
        let xattrs = match read_xattrs(XRef::Fd(src.as_fd()), wanted_xattr) {
            Ok(x) => x,
            Err(e) => {
                self.fail(oerr("listxattr", self.src_path(Some(name)), e));
                return;
            }
        };
        if xattr_value(&xattrs, OVL_REDIRECT).is_some() {
            // With userxattr the kernel neither creates nor follows redirects, so the merged
            // view showed this directory merged with the lower one of the same name: so do we.
            debug!(path = ?self.src_path(Some(name)), "ignoring a redirect");
        }
        self.src_rel.push(OsStr::from_bytes(name.to_bytes()));
        let merge = match ctx.slot {
            Some(_) if !is_opaque(&xattrs) => match lstat_at(ctx.d, name) {
                Ok(dm) => dm.kind == FileType::Directory,
                Err(Errno::NOENT) => false,
                Err(e) => {
                    self.fail(oerr("lstat", self.dst_path(Some(name)), e));
                    self.src_rel.pop();
                    return;
                }
            },
            _ => false,
        };
        if merge {
            self.merge_dir(ctx, name, src.as_fd(), sm, xattrs);
        } else {
            self.build_dir(ctx, name, src.as_fd(), sm, &xattrs);
        }
        self.src_rel.pop();
    }

    /// A plain directory present on both sides: apply its entries inside the existing one, its
    /// metadata in phase 5.
    fn merge_dir(
        &mut self,
        ctx: &Ctx<'_>,
        name: &CStr,
        src: BorrowedFd<'_>,
        sm: &Meta,
        xattrs: Xattrs,
    ) {
        let dst = match open_dir_at(ctx.d, name) {
            Ok(fd) => fd,
            Err(e) => {
                self.fail(oerr("open", self.dst_path(Some(name)), e));
                return;
            }
        };
        match fstat(dst.as_fd()) {
            Ok(m) => self.note_device(m.dev, dst.as_fd()),
            Err(e) => {
                self.fail(oerr("stat", self.dst_path(Some(name)), e));
                return;
            }
        }
        self.dst_rel.push(OsStr::from_bytes(name.to_bytes()));
        let slot = self.add_slot(dst.as_fd());
        let mut sub = Ctx {
            c: src,
            d: dst.as_fd(),
            slot: Some(slot),
            made_writable: false,
        };
        self.walk_dir(&mut sub);
        // Queued after its children's: phase 5 runs bottom-up.
        self.dir_jobs.push(DirJob {
            slot,
            meta: *sm,
            xattrs,
            additive: false,
        });
        self.dst_rel.pop();
    }

    /// A directory that is new, opaque, or replaces a non-directory: build it completely under a
    /// temporary name, to be renamed over `name` in phase 3.
    fn build_dir(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &CStr,
        src: BorrowedFd<'_>,
        sm: &Meta,
        xattrs: &Xattrs,
    ) {
        let errors_before = self.errors;
        let (dname, ()) = match self.create(ctx, name, |dir, n| rfs::mkdirat(dir, n, mode(0o700))) {
            Ok(x) => x,
            Err(e) => {
                self.fail(oerr("mkdir", self.dst_path(Some(name)), e));
                return;
            }
        };
        let dst = match rfs::openat(ctx.d, &dname, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                self.fail(oerr("open", self.dst_path(Some(&dname)), e));
                let _ = rfs::unlinkat(ctx.d, &dname, AtFlags::REMOVEDIR);
                return;
            }
        };
        self.stats.dirs_created += 1;
        self.dst_rel.push(OsStr::from_bytes(dname.to_bytes()));
        let mut sub = Ctx {
            c: src,
            d: dst.as_fd(),
            slot: None,
            made_writable: false,
        };
        self.walk_dir(&mut sub);
        if let Err((op, _, e)) = self.set_meta_fd(dst.as_fd(), sm, xattrs, false) {
            self.fail(oerr(op, self.dst_path(None), e));
        }
        self.dst_rel.pop();
        drop(dst);
        let Some(slot) = ctx.slot else {
            return;
        };
        // Incomplete (an entry failed; the error is returned and `changes` is kept): it may
        // still go where nothing was, but must not replace what is there.
        if self.errors > errors_before && !matches!(lstat_at(ctx.d, name), Err(Errno::NOENT)) {
            warn!(
                path = ?self.dst_path(Some(name)),
                "not replacing a directory: its new version is incomplete"
            );
            if let Err(e) = remove_tree(ctx.d, &dname, &mut self.dirbuf) {
                self.fail(oerr("remove", self.dst_path(Some(&dname)), e));
            }
            return;
        }
        self.renames.push(Rename {
            slot,
            from: dname,
            to: name.to_owned(),
        });
    }

    // -- phases 2 to 5 --------------------------------------------------------------------

    fn syncfs_all(&self) -> Result<(), OverlayError> {
        for (_, fd) in &self.sync_fds {
            rfs::syncfs(fd).map_err(|e| oerr("syncfs", self.dst_root.to_path_buf(), e))?;
        }
        Ok(())
    }

    fn finish(
        mut self,
        root: BorrowedFd<'_>,
        crash: &mut CrashHook,
    ) -> Result<CopyStats, OverlayError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        let dst_root = self.dst_root;
        let path = |dirs: &[Slot], i: usize, name: Option<&CStr>| {
            let rel = dirs
                .get(i)
                .map(|s| s.rel.as_path())
                .unwrap_or(Path::new(""));
            join_opt(dst_root.join(rel), name)
        };
        // Phase 2: the new content is durable before any of it is renamed into place, so no
        // rename can reach the disk ahead of its data.
        let renames = std::mem::take(&mut self.renames);
        if !renames.is_empty() {
            if let Err(e) = self.syncfs_all() {
                for r in &renames {
                    if let Ok(dir) = slot_fd(root, &mut dirs, r.slot) {
                        let _ = remove_tree(dir, &r.from, &mut self.dirbuf);
                    }
                }
                return Err(e);
            }
        }
        // Between phases 2 and 3: the logs of databases about to be replaced, durably gone
        // before their new copies are renamed in.
        let early = std::mem::take(&mut self.early_deletions);
        let mut removed = 0;
        for (i, name) in &early {
            crash.check();
            let dir = match slot_fd(root, &mut dirs, *i) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(oerr("open", path(&dirs, *i, None), e));
                    continue;
                }
            };
            match remove_entry(dir, name, &mut self.dirbuf) {
                Ok(n) => removed += n,
                Err(e) => self.fail(oerr("remove", path(&dirs, *i, Some(name)), e)),
            }
        }
        if removed > 0 {
            self.stats.deleted += removed;
            self.syncfs_all()?;
        }
        // Phase 3: renames.
        for r in &renames {
            crash.check();
            let dir = match slot_fd(root, &mut dirs, r.slot) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(oerr("open", path(&dirs, r.slot, None), e));
                    continue;
                }
            };
            match put_in_place(dir, &r.from, &r.to, &mut self.seq) {
                Ok(Some(old)) => self.deletions.push((r.slot, old)),
                Ok(None) => {}
                Err(e) => {
                    let _ = remove_tree(dir, &r.from, &mut self.dirbuf);
                    self.fail(oerr("rename", path(&dirs, r.slot, Some(&r.to)), e));
                }
            }
        }
        // Phase 4: deletions, once the renames are durable (content moved to another name must
        // be at its new place before its old place goes).
        let deletions = std::mem::take(&mut self.deletions);
        if !deletions.is_empty() {
            self.syncfs_all()?;
        }
        for (i, name) in &deletions {
            crash.check();
            let dir = match slot_fd(root, &mut dirs, *i) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(oerr("open", path(&dirs, *i, None), e));
                    continue;
                }
            };
            match remove_entry(dir, name, &mut self.dirbuf) {
                // Old versions moved aside by an exchange are not counted as deletions.
                Ok(n) if !is_temp_name(name) => self.stats.deleted += n,
                Ok(_) => {}
                Err(e) => self.fail(oerr("remove", path(&dirs, *i, Some(name)), e)),
            }
        }
        // Phase 5: merged directories' metadata, bottom-up (queued in post-order).
        let jobs = std::mem::take(&mut self.dir_jobs);
        for job in &jobs {
            let dir = match slot_fd(root, &mut dirs, job.slot) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(oerr("open", path(&dirs, job.slot, None), e));
                    continue;
                }
            };
            match self.set_meta_fd(dir, &job.meta, &job.xattrs, job.additive) {
                Ok(()) => self.stats.metadata_updated += 1,
                Err((op, _, e)) => self.fail(oerr(op, path(&dirs, job.slot, None), e)),
            }
        }
        drop(dirs);
        self.syncfs_all()?;
        if self.chown_denied > 0 {
            debug!(
                count = self.chown_denied,
                "changing the owner was not permitted for some entries"
            );
        }
        match self.first_error.take() {
            Some(e) => {
                if self.errors > 1 {
                    warn!(
                        errors = self.errors,
                        "applying the overlay changes finished with errors"
                    );
                }
                Err(e)
            }
            None => {
                debug!(changes = ?self.changes_root, dst = ?self.dst_root, stats = ?self.stats,
                       "applied the overlay changes");
                Ok(self.stats)
            }
        }
    }
}

/// The descriptor of slot `i`: kept from the walk, or reopened one component at a time from the
/// root, never following a symlink.
fn slot_fd<'d>(
    root: BorrowedFd<'_>,
    dirs: &'d mut [Slot],
    i: usize,
) -> rustix::io::Result<BorrowedFd<'d>> {
    let slot = dirs.get_mut(i).ok_or(Errno::INVAL)?;
    if slot.fd.is_none() {
        let mut cur = rfs::openat(root, c".", DIR_FLAGS, Mode::empty())?;
        for comp in slot.rel.components() {
            cur = rfs::openat(&cur, comp.as_os_str(), DIR_FLAGS, Mode::empty())?;
        }
        slot.fd = Some(cur);
    }
    slot.fd.as_ref().map(|fd| fd.as_fd()).ok_or(Errno::INVAL)
}

/// Renames `from` over `to` in `dir`, atomically. Where a directory is involved (a plain rename
/// cannot replace a non-empty directory, nor a directory a file) the two are exchanged and the
/// old entry, now under a temporary name, is returned for deletion.
fn put_in_place(
    dir: BorrowedFd<'_>,
    from: &CStr,
    to: &CStr,
    seq: &mut u64,
) -> rustix::io::Result<Option<CString>> {
    let res = put_in_place_once(dir, from, to, seq);
    match res {
        Err(Errno::ACCESS) => {
            // Our directory without write permission; its mode is restored in phase 5.
            let m = fstat(dir)?;
            rfs::fchmod(dir, mode(m.perm | 0o700))?;
            put_in_place_once(dir, from, to, seq)
        }
        other => other,
    }
}

fn put_in_place_once(
    dir: BorrowedFd<'_>,
    from: &CStr,
    to: &CStr,
    seq: &mut u64,
) -> rustix::io::Result<Option<CString>> {
    match rfs::renameat(dir, from, dir, to) {
        Ok(()) => return Ok(None),
        Err(Errno::ISDIR) | Err(Errno::NOTDIR) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    match rfs::renameat_with(dir, from, dir, to, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(Some(from.to_owned())),
        // The old entry went away meanwhile.
        Err(Errno::NOENT) => rfs::renameat(dir, from, dir, to).map(|()| None),
        Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {
            // No RENAME_EXCHANGE on this filesystem: move the old entry aside first. The name
            // is missing between the two renames; a crash there leaves both versions under
            // temporary names (and the new one is still in `changes`).
            let old = temp_name(seq);
            rfs::renameat(dir, to, dir, &old)?;
            if let Err(e) = rfs::renameat(dir, from, dir, to) {
                let _ = rfs::renameat(dir, &old, dir, to);
                return Err(e);
            }
            Ok(Some(old))
        }
        Err(e) => Err(e),
    }
}
