//! A delta: the upper layer's changes since the previous persist, as an upper layer relative to
//! the state's stack (see the module documentation of [`crate::overlay`] for why it is right and
//! what happens on a crash).
//!
//! The walk `lstat`s every entry of the upper layer; only entries whose ctime is at or after the
//! cutoff are read, and the state is looked at only for directories whose ctime is that recent
//! (their listing is compared) and for the directories above a changed entry (checked to be
//! directories of the state's stack, as they must be). Anything that does not fit is a doubt:
//! the caller does a full rebuild instead.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, RenameFlags, XattrFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::copy::{sqlite, CopyStats, Timestamp, CTIME_MARGIN_MS};
use crate::fsio::{
    chmod_nofollow, copy_data, crash_point, fstat, is_temp_name, is_user_xattr, list_dir, lstat_at,
    mode, read_xattrs, remove_tree, wanted_xattr, Ids, Meta, XRef, Xattrs, DIR_FLAGS, FILE_FLAGS,
};

use super::state::{delta_name, State};
use super::{
    check_whiteouts, is_opaque, join, oerr, xattr_value, OverlayError, NEW_FILE_FLAGS, OVL_OPAQUE,
    OVL_WHITEOUT,
};

/// Where the delta is built and put.
pub(super) struct Ctx<'a> {
    pub(super) upper: &'a Path,
    /// The state directory's path (messages only) and descriptor.
    pub(super) changes: &'a Path,
    pub(super) state_dir: BorrowedFd<'a>,
    /// Its parent, where the delta is built under `temp_name`.
    pub(super) parent: BorrowedFd<'a>,
    pub(super) parent_path: &'a Path,
    pub(super) temp_name: &'a CStr,
    /// The overlay's merged directory while it is mounted: databases are read there, where
    /// the program works (see [`crate::copy::sqlite`]).
    pub(super) view: Option<BorrowedFd<'a>>,
}

pub(super) enum Built {
    /// The delta is in the state (or nothing changed and nothing was written).
    Done(CopyStats),
    /// Something a delta cannot express with certainty: do a full rebuild.
    Doubt(&'static str),
}

/// Builds the delta of `upper` against `state` (whose layers are in `ctx.state_dir`) and adds
/// it to the state with cutoff `now`.
pub(super) fn build(ctx: &Ctx<'_>, state: &State, now: Timestamp) -> Result<Built, OverlayError> {
    let tmp = join(ctx.parent_path, ctx.temp_name);
    let uroot = rfs::open(ctx.upper, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", ctx.upper.to_path_buf(), e))?;
    let um = fstat(uroot.as_fd()).map_err(|e| oerr("stat", ctx.upper.to_path_buf(), e))?;
    let mut layer_roots = Vec::new();
    for name in state.names_top_first() {
        let fd = rfs::openat(ctx.state_dir, name, DIR_FLAGS, Mode::empty())
            .map_err(|e| oerr("open", join(ctx.changes, name), e))?;
        layer_roots.push(fd);
    }
    rfs::mkdirat(ctx.parent, ctx.temp_name, mode(0o700))
        .map_err(|e| oerr("mkdir", tmp.clone(), e))?;
    let built = rfs::openat(ctx.parent, ctx.temp_name, DIR_FLAGS, Mode::empty())
        .map_err(|e| oerr("open", tmp.clone(), e))
        .and_then(|out| {
            check_whiteouts(out.as_fd(), &tmp)?;
            let view = match ctx.view.map(|v| v.try_clone_to_owned()) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => return Err(oerr("dup", ctx.upper.to_path_buf(), e)),
                None => None,
            };
            let mut w = Walker {
                upper: ctx.upper,
                changes: ctx.changes,
                delta: tmp.clone(),
                view,
                cutoff: minus_ms(state.last_cutoff(), CTIME_MARGIN_MS),
                layer_roots,
                frames: Vec::new(),
                outs: Vec::new(),
                doubt: None,
                c: Copier {
                    stats: CopyStats::default(),
                    written: 0,
                    ids: Ids::current(),
                    no_cfr: false,
                    databuf: Vec::new(),
                    crash: Crash::new(),
                },
                dirbuf: Vec::new(),
            };
            let outcome = w.run(uroot, um, out)?;
            Ok((outcome, w.c.stats, w.c.written, w.c.crash))
        });
    let remove_tmp = || {
        if let Err(e) = remove_tree(ctx.parent, ctx.temp_name, &mut Vec::new()) {
            warn!("{}", oerr("remove", tmp.clone(), e));
        }
    };
    let (out, stats, crash) = match built {
        Err(e) => {
            remove_tmp();
            return Err(e);
        }
        Ok((Outcome::Doubt(why), _, _, _)) => {
            remove_tmp();
            return Ok(Built::Doubt(why));
        }
        Ok((Outcome::Unchanged, stats, _, _)) => {
            // Nothing to add; the cutoff stays, which is right: nothing changed since it.
            remove_tmp();
            return Ok(Built::Done(stats));
        }
        Ok((Outcome::Changed(out), stats, written, crash)) => {
            debug!(entries = written, "delta built");
            (out, stats, crash)
        }
    };
    let name = delta_name(state.next_seq(), now, stats.bytes_copied);
    let committed = commit(ctx, out, &tmp, &name, crash);
    if committed.is_err() {
        // Not renamed (an error after the rename is one of the fsyncs: the delta stays in the
        // state, where it is complete and correct).
        if rfs::statat(ctx.parent, ctx.temp_name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            remove_tmp();
        }
    }
    committed.map(|()| Built::Done(stats))
}

/// Makes the delta durable, then renames it into the state (the atomic step) and makes the
/// rename durable.
fn commit(
    ctx: &Ctx<'_>,
    out: OwnedFd,
    tmp: &Path,
    name: &CStr,
    mut crash: Crash,
) -> Result<(), OverlayError> {
    crash.step();
    rfs::syncfs(&out).map_err(|e| oerr("syncfs", tmp.to_path_buf(), e))?;
    drop(out);
    crash.step();
    rfs::renameat_with(
        ctx.parent,
        ctx.temp_name,
        ctx.state_dir,
        name,
        RenameFlags::NOREPLACE,
    )
    .map_err(|e| oerr("rename", join(ctx.changes, name), e))?;
    crash.step();
    rfs::fsync(ctx.state_dir).map_err(|e| oerr("fsync", ctx.changes.to_path_buf(), e))?;
    rfs::fsync(ctx.parent).map_err(|e| oerr("fsync", ctx.parent_path.to_path_buf(), e))
}

/// Test hook ([`crash_point`]): `ASD_TEST_CRASH_AFTER_RENAMES=N` aborts a delta's persist at step
/// N: each entry written into the delta is a step (the delta's counterpart of the copy engine's
/// renames), then come its syncfs, its rename into the state, and right after that rename.
struct Crash {
    at: Option<usize>,
    done: usize,
}

impl Crash {
    fn new() -> Crash {
        Crash {
            at: crash_point(),
            done: 0,
        }
    }

    fn step(&mut self) {
        if self.at == Some(self.done) {
            std::process::abort();
        }
        self.done += 1;
    }
}

fn minus_ms(t: Timestamp, ms: i64) -> Timestamp {
    const NS: i64 = 1_000_000_000;
    let total = t.nsec - ms * 1_000_000;
    Timestamp {
        sec: t.sec + total.div_euclid(NS),
        nsec: total.rem_euclid(NS),
    }
}

enum Outcome {
    Changed(OwnedFd),
    Unchanged,
    Doubt(&'static str),
}

/// The state's stack at one directory: its directories there, the most recent first.
struct Chain {
    dirs: Vec<OwnedFd>,
    /// The lower layer (the original) does not show through here: a layer's directory on this
    /// path (or above it) is opaque, or replaced a non-directory below it.
    hides: bool,
}

/// What the state's stack has under a name.
enum Found {
    Absent,
    Whiteout,
    NonDir,
    Dir(Chain),
}

/// An upper-layer directory on the walk's current path.
struct Frame {
    fd: OwnedFd,
    /// Its name in its parent (empty for the root).
    name: CString,
    meta: Meta,
    /// Its counterpart in the delta, once made (index into `Walker::outs`).
    out: Option<usize>,
    /// Whether it hides the lower layer (it or a directory above it is opaque); found lazily.
    u_hides: Option<bool>,
    /// The state's stack here, found lazily; `Some(None)`: the state has no directory here.
    chain: Option<Option<Chain>>,
}

/// A directory made in the delta whose metadata is set at the end, bottom-up.
struct OutDir {
    fd: OwnedFd,
    meta: Meta,
    xattrs: Xattrs,
}

struct Walker<'a> {
    upper: &'a Path,
    changes: &'a Path,
    /// Where the delta is built (messages only).
    delta: PathBuf,
    /// The merged directory's root (see [`Ctx::view`]).
    view: Option<OwnedFd>,
    cutoff: Timestamp,
    /// The state's layers, the most recent first.
    layer_roots: Vec<OwnedFd>,
    frames: Vec<Frame>,
    outs: Vec<OutDir>,
    doubt: Option<&'static str>,
    c: Copier,
    /// Scratch space for directory listings.
    dirbuf: Vec<u8>,
}

impl Walker<'_> {
    fn run(&mut self, uroot: OwnedFd, um: Meta, out: OwnedFd) -> Result<Outcome, OverlayError> {
        let root_changed = um.ctime >= self.cutoff;
        let xattrs = dir_xattrs(uroot.as_fd()).map_err(|e| self.uerr("listxattr", None, e))?;
        self.outs.push(OutDir {
            fd: out,
            meta: um,
            xattrs,
        });
        self.frames.push(Frame {
            fd: uroot,
            name: CString::default(),
            meta: um,
            out: Some(0),
            u_hides: None,
            chain: None,
        });
        self.visit(root_changed)?;
        if let Some(why) = self.doubt {
            return Ok(Outcome::Doubt(why));
        }
        if self.c.written == 0 && !root_changed {
            return Ok(Outcome::Unchanged);
        }
        // Bottom-up: a directory made later is below one made earlier, and its entries (made
        // during the walk) changed the mtime of its parent.
        let outs = std::mem::take(&mut self.outs);
        for o in outs.iter().rev() {
            self.c
                .set_meta(o.fd.as_fd(), &o.meta, &o.xattrs)
                .map_err(|(op, e)| oerr(op, self.changes.to_path_buf(), e))?;
        }
        let root = outs.into_iter().next().map(|o| o.fd);
        root.map(Outcome::Changed).ok_or_else(|| {
            oerr(
                "persist",
                self.changes.to_path_buf(),
                std::io::Error::other("delta root lost"),
            )
        })
    }

    /// The upper-layer path of the current directory (for messages), with `name`.
    fn upath(&self, name: Option<&CStr>) -> PathBuf {
        let mut p = self.upper.to_path_buf();
        for f in self.frames.iter().skip(1) {
            p.push(OsStr::from_bytes(f.name.to_bytes()));
        }
        if let Some(n) = name {
            p.push(OsStr::from_bytes(n.to_bytes()));
        }
        p
    }

    fn uerr(&self, op: &'static str, name: Option<&CStr>, e: Errno) -> OverlayError {
        oerr(op, self.upath(name), e)
    }

    /// Walks the current directory (the last frame). `changed`: its ctime is recent, so its
    /// listing is compared with the state's.
    fn visit(&mut self, changed: bool) -> Result<(), OverlayError> {
        let d = self.frames.len() - 1;
        let mut names = match list_dir(self.frames[d].fd.as_fd(), &mut self.dirbuf) {
            Ok(n) => n,
            Err(e) => return Err(self.uerr("readdir", None, e)),
        };
        names.retain(|n| !is_temp_name(n));
        names.sort();
        if changed {
            self.whiteout_missing(d, &names)?;
        }
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            match lstat_at(self.frames[d].fd.as_fd(), &name) {
                Ok(m) => entries.push((name, m)),
                Err(Errno::NOENT) => self.c.stats.vanished += 1,
                Err(e) => return Err(self.uerr("lstat", Some(&name), e)),
            }
        }
        // Databases (main file and companions) are compared and written as a whole.
        let databases = self.databases(d, &entries);
        for (name, m) in &entries {
            if self.doubt.is_some() {
                return Ok(());
            }
            if databases
                .iter()
                .any(|b| b == name || sqlite::is_companion_of(name, b))
            {
                continue;
            }
            let recent = m.ctime >= self.cutoff;
            if m.kind == FileType::Directory {
                self.dir_entry(d, name, m, recent)?;
            } else if recent {
                let Some(out) = self.ensure_out(d)? else {
                    return Ok(());
                };
                let src = self.upath(Some(name));
                self.c.copy_node(
                    self.frames[d].fd.as_fd(),
                    name,
                    m,
                    self.outs[out].fd.as_fd(),
                    &src,
                )?;
            } else {
                self.c.stats.unchanged += 1;
            }
        }
        for base in &databases {
            if self.doubt.is_some() {
                return Ok(());
            }
            self.database(d, base, &entries)?;
        }
        Ok(())
    }

    /// The SQLite databases among `entries` of directory `d`: the main file of a companion
    /// name, or a regular file changed since the cutoff (it may get a journal any moment), that
    /// holds a database. Their companions that are directories stay ordinary entries.
    fn databases(&self, d: usize, entries: &[(CString, Meta)]) -> Vec<CString> {
        if !sqlite::enabled() {
            return Vec::new();
        }
        let dir = self.frames[d].fd.as_fd();
        let regular = |name: &CStr| {
            entries
                .binary_search_by(|(n, _)| n.as_c_str().cmp(name))
                .is_ok_and(|i| entries[i].1.kind == FileType::RegularFile)
        };
        let mut bases: Vec<CString> = entries
            .iter()
            .filter_map(|(n, m)| match sqlite::base_of(n) {
                Some(b) if m.kind != FileType::Directory => Some(b),
                None if m.kind == FileType::RegularFile && m.ctime >= self.cutoff => {
                    Some(n.clone())
                }
                _ => None,
            })
            .collect();
        bases.sort();
        bases.dedup();
        bases.retain(|b| regular(b) && sqlite::is_database(dir, b));
        bases
    }

    /// Database `base` of directory `d`: if it or a companion changed since the cutoff, one
    /// consistent copy of it (see [`crate::copy::sqlite`]) goes into the delta, with whiteouts
    /// for its companions, which hide any the original has (an old log beside the new copy
    /// would be replayed into it).
    fn database(
        &mut self,
        d: usize,
        base: &CStr,
        entries: &[(CString, Meta)],
    ) -> Result<(), OverlayError> {
        let members: Vec<&(CString, Meta)> = entries
            .iter()
            .filter(|(n, m)| {
                n.as_c_str() == base
                    || (sqlite::is_companion_of(n, base) && m.kind != FileType::Directory)
            })
            .collect();
        if members.iter().all(|(_, m)| m.ctime < self.cutoff) {
            self.c.stats.unchanged += 1;
            return Ok(());
        }
        let Some(out) = self.ensure_out(d)? else {
            return Ok(());
        };
        let src = self.upath(Some(base));
        let view = self.view_dir(d);
        let sdir = view
            .as_ref()
            .map_or(self.frames[d].fd.as_fd(), |v| v.as_fd());
        let odir = self.outs[out].fd.as_fd();
        let out_dir = self.delta_path();
        let file = rfs::openat(odir, base, NEW_FILE_FLAGS, mode(0o600))
            .map_err(|e| oerr("create (in the delta)", src.clone(), e))?;
        let taken = sqlite::snapshot(
            &sqlite::Source {
                dir: sdir,
                name: base,
                path: src.clone(),
                lock: true,
            },
            &sqlite::Dest {
                dir: odir,
                tmp: base,
                out: file.as_fd(),
                path: &out_dir,
            },
        );
        let unlink = || {
            let _ = rfs::unlinkat(odir, base, AtFlags::empty());
        };
        let s = match taken {
            Ok(sqlite::Taken::Copy(s)) => s,
            Ok(sqlite::Taken::NotDatabase) => {
                drop(file);
                unlink();
                let upper = self.frames[d].fd.as_fd();
                for (n, m) in members {
                    if m.ctime >= self.cutoff {
                        let p = self.upath(Some(n));
                        self.c.copy_node(upper, n, m, odir, &p)?;
                    }
                }
                return Ok(());
            }
            Ok(sqlite::Taken::Vanished) => {
                drop(file);
                unlink();
                self.c.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => {
                drop(file);
                unlink();
                return Err(oerr("copy", src, std::io::Error::other(e.to_string())));
            }
        };
        if let Err((op, e)) = self.c.set_meta(file.as_fd(), &s.meta, &s.xattrs) {
            drop(file);
            unlink();
            return Err(oerr(op, src, e));
        }
        drop(file);
        let held = s
            .hold
            .map_or(0, |h| u64::try_from(h.as_micros()).unwrap_or(u64::MAX));
        let st = &mut self.c.stats;
        st.files_copied += 1;
        st.bytes_copied += s.bytes;
        st.databases += 1;
        st.db_lock_us = st.db_lock_us.max(held);
        debug!(
            path = ?src,
            bytes = s.bytes,
            attempts = s.attempts,
            wal = s.wal,
            lock_held_us = s.hold.map(|h| h.as_micros()),
            "database copied as one consistent state"
        );
        self.c.wrote();
        for suffix in sqlite::COMPANIONS {
            let c = sqlite::companion(base, suffix);
            match rfs::mknodat(odir, &c, FileType::CharacterDevice, Mode::empty(), 0) {
                Ok(()) => {
                    self.c.stats.deleted += 1;
                    self.c.wrote();
                }
                // whiteout_missing made it already.
                Err(Errno::EXIST) if lstat_at(odir, &c).is_ok_and(|m| sqlite::is_whiteout(&m)) => {}
                Err(Errno::PERM) => {
                    return Err(OverlayError::NoWhiteouts {
                        path: self.upath(Some(&c)),
                    })
                }
                Err(e) => return Err(oerr("mknod", self.upath(Some(&c)), e)),
            }
        }
        Ok(())
    }

    /// Directory `d` as the merged directory shows it, if the overlay is mounted.
    fn view_dir(&self, d: usize) -> Option<OwnedFd> {
        let mut cur = self.view.as_ref()?.try_clone().ok()?;
        for f in self.frames.iter().take(d + 1).skip(1) {
            match rfs::openat(&cur, &f.name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => cur = fd,
                Err(e) => {
                    debug!(path = ?self.upath(None), "not seen through the overlay ({e}): read from the upper layer");
                    return None;
                }
            }
        }
        Some(cur)
    }

    /// The delta's directory for the current directory (messages only).
    fn delta_path(&self) -> PathBuf {
        let mut p = self.delta.clone();
        for f in self.frames.iter().skip(1) {
            p.push(OsStr::from_bytes(f.name.to_bytes()));
        }
        p
    }

    fn dir_entry(
        &mut self,
        d: usize,
        name: &CStr,
        m: &Meta,
        recent: bool,
    ) -> Result<(), OverlayError> {
        let fd = match rfs::openat(self.frames[d].fd.as_fd(), name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                self.c.stats.vanished += 1;
                return Ok(());
            }
            Err(e) => return Err(self.uerr("open", Some(name), e)),
        };
        let mut frame = Frame {
            fd,
            name: name.to_owned(),
            meta: *m,
            out: None,
            u_hides: None,
            chain: None,
        };
        if recent {
            let xattrs = read_xattrs(XRef::Fd(frame.fd.as_fd()), wanted_xattr)
                .map_err(|e| self.uerr("listxattr", Some(name), e))?;
            let u_hides = is_opaque(&xattrs) || self.u_hides(d)?;
            self.ensure_chain(d)?;
            let found = match self.frames[d].chain.as_ref().and_then(|c| c.as_ref()) {
                Some(parent) => lookup(parent, name, self.changes)?,
                None => {
                    self.doubt = Some("a changed directory lies below no directory of the state");
                    return Ok(());
                }
            };
            match found {
                Found::Dir(chain) if chain.hides == u_hides => {
                    // Merged in the delta: its own metadata and what changed in it.
                    frame.u_hides = Some(u_hides);
                    frame.chain = Some(Some(chain));
                }
                Found::Dir(chain) if !u_hides && chain.hides => {
                    self.doubt = Some("a directory shows the lower layer where the state hides it");
                    return Ok(());
                }
                // New, replacing a non-directory, or newly hiding the lower layer: whole.
                _ => {
                    let Some(out) = self.ensure_out(d)? else {
                        return Ok(());
                    };
                    let src = self.upath(Some(name));
                    return self.c.copy_tree(
                        frame.fd.as_fd(),
                        m,
                        &xattrs,
                        self.outs[out].fd.as_fd(),
                        name,
                        &src,
                    );
                }
            }
        }
        self.frames.push(frame);
        let r = self.visit(recent);
        self.frames.pop();
        r
    }

    /// Whiteouts in the delta for the names the state shows in directory `d` that the upper
    /// layer's directory (`names`, sorted) no longer has.
    fn whiteout_missing(&mut self, d: usize, names: &[CString]) -> Result<(), OverlayError> {
        let Some(out) = self.ensure_out(d)? else {
            return Ok(());
        };
        self.ensure_chain(d)?;
        let Some(chain) = self.frames[d].chain.as_ref().and_then(|c| c.as_ref()) else {
            self.doubt = Some("a changed directory is not one of the state");
            return Ok(());
        };
        let mut seen: HashSet<CString> = HashSet::new();
        let mut buf = Vec::new();
        for dir in &chain.dirs {
            let listed = list_dir(dir.as_fd(), &mut buf)
                .map_err(|e| oerr("readdir", self.changes.into(), e))?;
            for n in listed {
                if is_temp_name(&n) || names.binary_search(&n).is_ok() || !seen.insert(n.clone()) {
                    continue;
                }
                // The most recent layer that has the name decides what the state shows.
                let m = match lstat_at(dir.as_fd(), &n) {
                    Ok(m) => m,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(oerr("lstat", self.changes.into(), e)),
                };
                if is_whiteout_at(dir.as_fd(), &n, &m, self.changes)? {
                    continue;
                }
                let path = join(&self.upath(None), &n);
                match rfs::mknodat(
                    self.outs[out].fd.as_fd(),
                    &n,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    0,
                ) {
                    Ok(()) => {}
                    Err(Errno::PERM) => return Err(OverlayError::NoWhiteouts { path }),
                    Err(e) => return Err(oerr("mknod", path, e)),
                }
                self.c.stats.deleted += 1;
                self.c.wrote();
            }
        }
        Ok(())
    }

    /// Whether directory `d` of the upper layer hides the lower layer.
    fn u_hides(&mut self, d: usize) -> Result<bool, OverlayError> {
        if let Some(h) = self.frames[d].u_hides {
            return Ok(h);
        }
        let own = read_xattrs(XRef::Fd(self.frames[d].fd.as_fd()), |n| n == OVL_OPAQUE)
            .map_err(|e| self.uerr("listxattr", None, e))?;
        let h = is_opaque(&own) || (d > 0 && self.u_hides(d - 1)?);
        self.frames[d].u_hides = Some(h);
        Ok(h)
    }

    /// Finds the state's stack at directory `d` (stored in its frame).
    fn ensure_chain(&mut self, d: usize) -> Result<(), OverlayError> {
        if self.frames[d].chain.is_some() {
            return Ok(());
        }
        let chain = if d == 0 {
            Some(root_chain(&self.layer_roots, self.changes)?)
        } else {
            self.ensure_chain(d - 1)?;
            match self.frames[d - 1].chain.as_ref().and_then(|c| c.as_ref()) {
                Some(parent) => match lookup(parent, &self.frames[d].name, self.changes)? {
                    Found::Dir(c) => Some(c),
                    _ => None,
                },
                None => None,
            }
        };
        self.frames[d].chain = Some(chain);
        Ok(())
    }

    /// The delta's directory for directory `d`, made (with those above it) on first use. A
    /// directory made here is merged when applied, so the state must have a directory there
    /// that hides the lower layer exactly when the upper layer's does; otherwise that is a doubt
    /// (`None`).
    fn ensure_out(&mut self, d: usize) -> Result<Option<usize>, OverlayError> {
        if let Some(i) = self.frames[d].out {
            return Ok(Some(i));
        }
        let Some(parent) = (if d == 0 {
            None
        } else {
            self.ensure_out(d - 1)?
        }) else {
            return Ok(None);
        };
        let u_hides = self.u_hides(d)?;
        self.ensure_chain(d)?;
        match self.frames[d].chain.as_ref().and_then(|c| c.as_ref()) {
            Some(c) if c.hides == u_hides => {}
            _ => {
                self.doubt = Some("an unchanged directory differs from the state's");
                return Ok(None);
            }
        }
        let name = self.frames[d].name.clone();
        let path = self.upath(None);
        let pfd = self.outs[parent].fd.as_fd();
        rfs::mkdirat(pfd, &name, mode(0o700)).map_err(|e| oerr("mkdir", path.clone(), e))?;
        let fd = rfs::openat(pfd, &name, DIR_FLAGS, Mode::empty())
            .map_err(|e| oerr("open", path.clone(), e))?;
        let xattrs =
            dir_xattrs(self.frames[d].fd.as_fd()).map_err(|e| oerr("listxattr", path, e))?;
        self.outs.push(OutDir {
            fd,
            meta: self.frames[d].meta,
            xattrs,
        });
        let i = self.outs.len() - 1;
        self.frames[d].out = Some(i);
        self.c.stats.dirs_created += 1;
        self.c.wrote();
        Ok(Some(i))
    }
}

/// The xattrs of a directory the delta merges: never its opaque marker, which would drop what
/// the state's stack has in it.
fn dir_xattrs(fd: BorrowedFd<'_>) -> rustix::io::Result<Xattrs> {
    let mut x = read_xattrs(XRef::Fd(fd), wanted_xattr)?;
    x.retain(|(n, _)| n.to_bytes() != OVL_OPAQUE);
    Ok(x)
}

/// The state's stack at its root: every layer's root down to the first opaque one.
fn root_chain(roots: &[OwnedFd], changes: &Path) -> Result<Chain, OverlayError> {
    let mut dirs = Vec::new();
    let mut hides = false;
    for r in roots {
        dirs.push(
            r.try_clone()
                .map_err(|e| oerr("dup", changes.to_path_buf(), e))?,
        );
        if opaque_dir(r.as_fd(), changes)? {
            hides = true;
            break;
        }
    }
    Ok(Chain { dirs, hides })
}

fn opaque_dir(fd: BorrowedFd<'_>, changes: &Path) -> Result<bool, OverlayError> {
    let x = read_xattrs(XRef::Fd(fd), |n| n == OVL_OPAQUE)
        .map_err(|e| oerr("listxattr", changes.to_path_buf(), e))?;
    Ok(is_opaque(&x))
}

/// What the stack `chain` shows under `name`: the most recent layer that has the name decides;
/// a directory there merges with the directories below it down to an opaque one, a whiteout or
/// a non-directory (as overlayfs stacks layers, and as apply applies them one after another).
fn lookup(chain: &Chain, name: &CStr, changes: &Path) -> Result<Found, OverlayError> {
    let mut dirs = Vec::new();
    let mut hides = chain.hides;
    for dir in &chain.dirs {
        let m = match lstat_at(dir.as_fd(), name) {
            Ok(m) => m,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(oerr("lstat", join(changes, name), e)),
        };
        let ends = if m.kind == FileType::Directory {
            false
        } else if is_whiteout_at(dir.as_fd(), name, &m, changes)? {
            if dirs.is_empty() {
                return Ok(Found::Whiteout);
            }
            true
        } else {
            if dirs.is_empty() {
                return Ok(Found::NonDir);
            }
            true
        };
        if ends {
            hides = true;
            break;
        }
        let fd = rfs::openat(dir.as_fd(), name, DIR_FLAGS, Mode::empty())
            .map_err(|e| oerr("open", join(changes, name), e))?;
        let opaque = opaque_dir(fd.as_fd(), changes)?;
        dirs.push(fd);
        if opaque {
            hides = true;
            break;
        }
    }
    if dirs.is_empty() {
        return Ok(Found::Absent);
    }
    Ok(Found::Dir(Chain { dirs, hides }))
}

/// Whether `name` (with `m` its lstat) is a whiteout: a character device 0:0, or a zero-size
/// regular file carrying `user.overlay.whiteout` (as apply tells them).
fn is_whiteout_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    m: &Meta,
    changes: &Path,
) -> Result<bool, OverlayError> {
    match m.kind {
        FileType::CharacterDevice => Ok(m.rdev == 0),
        FileType::RegularFile if m.size == 0 => {
            let fd = match rfs::openat(dir, name, FILE_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) => return Err(oerr("open", join(changes, name), e)),
            };
            let x = read_xattrs(XRef::Fd(fd.as_fd()), |n| n == OVL_WHITEOUT)
                .map_err(|e| oerr("listxattr", join(changes, name), e))?;
            Ok(xattr_value(&x, OVL_WHITEOUT).is_some())
        }
        _ => Ok(false),
    }
}

/// Writes entries into the delta (a new directory nobody else writes: entries go straight to
/// their names, and the whole delta is made durable once before it is renamed into the state).
struct Copier {
    stats: CopyStats,
    /// Entries made in the delta.
    written: u64,
    ids: Ids,
    /// copy_file_range failed once: use pread/pwrite.
    no_cfr: bool,
    databuf: Vec<u8>,
    crash: Crash,
}

impl Copier {
    /// An entry was made in the delta.
    fn wrote(&mut self) {
        self.written += 1;
        self.crash.step();
    }

    /// A non-directory of the upper layer as it is (whiteouts included); `src` for messages.
    fn copy_node(
        &mut self,
        sdir: BorrowedFd<'_>,
        name: &CStr,
        m: &Meta,
        ddir: BorrowedFd<'_>,
        src: &Path,
    ) -> Result<(), OverlayError> {
        let err = |op, e: Errno| oerr(op, src.to_path_buf(), e);
        match m.kind {
            FileType::RegularFile => {
                let sfd = match rfs::openat(sdir, name, FILE_FLAGS, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) | Err(Errno::LOOP) => {
                        self.stats.vanished += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(err("open", e)),
                };
                let sm = fstat(sfd.as_fd()).map_err(|e| err("stat", e))?;
                if sm.kind != FileType::RegularFile {
                    // Replaced meanwhile: its directory changed too, so the next persist sees it.
                    self.stats.vanished += 1;
                    return Ok(());
                }
                let xattrs = read_xattrs(XRef::Fd(sfd.as_fd()), wanted_xattr)
                    .map_err(|e| err("listxattr", e))?;
                let out = rfs::openat(ddir, name, NEW_FILE_FLAGS, mode(0o600))
                    .map_err(|e| err("create (in the delta)", e))?;
                let mut cfr = !self.no_cfr;
                let n = copy_data(sfd.as_fd(), out.as_fd(), &sm, &mut cfr, &mut self.databuf)
                    .map_err(|(op, e)| err(op, e))?;
                self.no_cfr = !cfr;
                self.set_meta(out.as_fd(), &sm, &xattrs)
                    .map_err(|(op, e)| err(op, e))?;
                self.stats.files_copied += 1;
                self.stats.bytes_copied += n;
            }
            FileType::Symlink => {
                let target = match rfs::readlinkat(sdir, name, Vec::new()) {
                    Ok(t) => t,
                    Err(Errno::NOENT) | Err(Errno::INVAL) => {
                        self.stats.vanished += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(err("readlink", e)),
                };
                rfs::symlinkat(target.as_c_str(), ddir, name).map_err(|e| err("symlink", e))?;
                self.set_node_meta(ddir, name, m)
                    .map_err(|(op, e)| err(op, e))?;
                self.stats.symlinks_copied += 1;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                match rfs::mknodat(ddir, name, m.kind, mode(m.perm & 0o777), m.rdev) {
                    Ok(()) => {}
                    Err(Errno::PERM) if m.kind == FileType::CharacterDevice && m.rdev == 0 => {
                        return Err(OverlayError::NoWhiteouts {
                            path: src.to_path_buf(),
                        })
                    }
                    Err(Errno::PERM) if m.kind != FileType::Fifo => {
                        warn!(path = ?src, "skipping device node: not permitted");
                        return Ok(());
                    }
                    Err(e) => return Err(err("mknod", e)),
                }
                self.set_node_meta(ddir, name, m)
                    .map_err(|(op, e)| err(op, e))?;
                if m.kind == FileType::CharacterDevice && m.rdev == 0 {
                    self.stats.deleted += 1;
                } else {
                    self.stats.files_copied += 1;
                }
            }
            _ => {
                debug!(path = ?src, "skipping socket");
                return Ok(());
            }
        }
        self.wrote();
        Ok(())
    }

    /// A directory of the upper layer, whole, its markers included.
    fn copy_tree(
        &mut self,
        sfd: BorrowedFd<'_>,
        m: &Meta,
        xattrs: &Xattrs,
        ddir: BorrowedFd<'_>,
        name: &CStr,
        src: &Path,
    ) -> Result<(), OverlayError> {
        let err = |op, e: Errno| oerr(op, src.to_path_buf(), e);
        rfs::mkdirat(ddir, name, mode(0o700)).map_err(|e| err("mkdir (in the delta)", e))?;
        let dfd = rfs::openat(ddir, name, DIR_FLAGS, Mode::empty())
            .map_err(|e| err("open (in the delta)", e))?;
        self.stats.dirs_created += 1;
        self.wrote();
        let mut names = list_dir(sfd, &mut Vec::new()).map_err(|e| err("readdir", e))?;
        names.retain(|n| !is_temp_name(n));
        names.sort();
        for n in &names {
            let child = join(src, n);
            let cm = match lstat_at(sfd, n) {
                Ok(cm) => cm,
                Err(Errno::NOENT) => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(e) => return Err(oerr("lstat", child, e)),
            };
            if cm.kind != FileType::Directory {
                self.copy_node(sfd, n, &cm, dfd.as_fd(), &child)?;
                continue;
            }
            let cfd = match rfs::openat(sfd, n, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(e) => return Err(oerr("open", child, e)),
            };
            let cx = read_xattrs(XRef::Fd(cfd.as_fd()), wanted_xattr)
                .map_err(|e| oerr("listxattr", child.clone(), e))?;
            self.copy_tree(cfd.as_fd(), &cm, &cx, dfd.as_fd(), n, &child)?;
        }
        self.set_meta(dfd.as_fd(), m, xattrs)
            .map_err(|(op, e)| err(op, e))
    }

    /// Xattrs (before the mode: a read-only entry takes no user xattrs), owner, mode, then times
    /// of a new file or directory of the delta.
    fn set_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        m: &Meta,
        xattrs: &Xattrs,
    ) -> Result<(), (&'static str, Errno)> {
        for (name, value) in xattrs {
            match rfs::fsetxattr(fd, name, value, XattrFlags::empty()) {
                Ok(()) => {}
                // ACLs where the filesystem has none, or that we may not set.
                Err(Errno::NOTSUP) | Err(Errno::PERM) | Err(Errno::INVAL)
                    if !is_user_xattr(name) =>
                {
                    debug!(?name, "could not set extended attribute");
                }
                Err(e) => return Err(("setxattr", e)),
            }
        }
        let now = fstat(fd).map_err(|e| ("stat", e))?;
        let (uid, gid) = self.ids.change(m, &now);
        if uid.is_some() || gid.is_some() {
            match rfs::fchown(fd, uid, gid) {
                Ok(()) | Err(Errno::PERM) => {}
                Err(e) => return Err(("chown", e)),
            }
        }
        rfs::fchmod(fd, mode(m.perm)).map_err(|e| ("chmod", e))?;
        rfs::futimens(fd, &m.times()).map_err(|e| ("utimens", e))
    }

    /// Owner, mode (not for symlinks) and times of a node made by name.
    fn set_node_meta(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        m: &Meta,
    ) -> Result<(), (&'static str, Errno)> {
        let now = lstat_at(dir, name).map_err(|e| ("lstat", e))?;
        let (uid, gid) = self.ids.change(m, &now);
        if uid.is_some() || gid.is_some() {
            match rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::PERM) => {}
                Err(e) => return Err(("chown", e)),
            }
        }
        if m.kind != FileType::Symlink {
            chmod_nofollow(dir, name, |_| m.perm).map_err(|e| ("chmod", e))?;
        }
        rfs::utimensat(dir, name, &m.times(), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| ("utimens", e))
    }
}
