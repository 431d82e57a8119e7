//! Probing entries: the read-only part of comparing a directory pair (lstat of both sides,
//! the quick check, and xattrs of files that pass it). Kept apart from the code that acts on
//! the results because it can run on a helper thread, which big directories are split with.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;

use rustix::fs::{self as rfs, FileType, Mode};
use rustix::io::Errno;

use crate::fsio::{lstat_at, read_xattrs, wanted_xattr, Meta, XRef, Xattrs, FILE_FLAGS};

use super::engine::{DirCtx, Engine};
use super::Timestamp;

// ---------------------------------------------------------------------------------------------
// Extended attributes: user.* and POSIX ACLs (reading and writing them: [`crate::fsio`]).

/// `listxattrat(dir, name, AT_SYMLINK_NOFOLLOW, buf)` (Linux 6.13; rustix and libc do not wrap
/// it yet): lists xattrs relative to a directory descriptor, without a path through /proc.
fn listxattrat(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
    // The same number on every architecture (the unified syscall table, since Linux 5.1).
    const SYS_LISTXATTRAT: libc::c_long = 465;
    // SAFETY: the arguments are a valid directory descriptor, a NUL-terminated name, and a
    // writable buffer with its exact length; the kernel writes at most buf.len() bytes.
    let r = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if r < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(Errno::from_raw_os_error(errno));
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Probing entries: the read-only part of comparing two directories, which can run on a helper
// thread.

/// Reads the wanted xattrs of directory entries by name. One per thread.
pub(super) struct XReader {
    proc_fd: bool,
    /// The kernel has listxattrat (Linux 6.13).
    xattrat: bool,
    pbuf: Vec<u8>,
}

impl XReader {
    pub(super) fn new() -> XReader {
        XReader {
            proc_fd: Path::new("/proc/self/fd").is_dir(),
            xattrat: true,
            pbuf: Vec::new(),
        }
    }

    /// `/proc/self/fd/N/name`: a path that resolves through the already opened directory, so
    /// path-only calls (l*xattr) stay as safe as the *at() calls. None without /proc.
    fn proc_path(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Option<CString> {
        if !self.proc_fd {
            return None;
        }
        self.pbuf.clear();
        self.pbuf.extend_from_slice(b"/proc/self/fd/");
        self.pbuf
            .extend_from_slice(dir.as_raw_fd().to_string().as_bytes());
        self.pbuf.push(b'/');
        self.pbuf.extend_from_slice(name.to_bytes());
        CString::new(self.pbuf.as_slice()).ok()
    }

    /// The wanted xattrs of entry `name` in `dir` (a regular file or directory).
    fn entry_xattrs(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Xattrs> {
        // Most files have no xattrs at all: find that out with one fd-relative call.
        if self.xattrat {
            let mut small = [0u8; 256];
            match listxattrat(dir, name, &mut small) {
                Ok(n) if !small[..n].split(|b| *b == 0).any(wanted_xattr) => {
                    return Ok(Vec::new());
                }
                Ok(_) | Err(Errno::RANGE) => {}
                // EPERM: a seccomp allow list (systemd's SystemCallFilter=, container
                // runtimes) that predates listxattrat refuses it; fall back like ENOSYS.
                Err(Errno::NOSYS) | Err(Errno::PERM) => self.xattrat = false,
                Err(Errno::NOTSUP) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        match self.proc_path(dir, name) {
            Some(p) => read_xattrs(XRef::Path(&p), wanted_xattr),
            None => {
                let fd = rfs::openat(dir, name, FILE_FLAGS, Mode::empty())?;
                read_xattrs(XRef::Fd(fd.as_fd()), wanted_xattr)
            }
        }
    }
}

/// Source and destination xattrs, or the error and whether it was on the source.
pub(super) type XattrPair = Result<(Xattrs, Xattrs), (bool, Errno)>;

/// What the destination directory's listing says about a source name.
#[derive(Debug, Clone, Copy)]
pub(super) enum InDst {
    /// The listing does not have it.
    No,
    /// The listing has it, with this `d_type`.
    Listed(FileType),
    /// The listing was not read: the source directory did not change since the cutoff, so the
    /// destination holds the same names.
    Assumed,
}

/// What the walk learned about a name's destination counterpart.
pub(super) enum DstProbe {
    /// No such name in the destination (or no lstat needed since the source is gone).
    Absent,
    /// Unchanged in the source since the cutoff: the destination is equal, not looked at.
    Unchanged,
    /// Must be compared, but the destination directory is not open yet.
    Pending,
    Stat(rustix::io::Result<Meta>),
}

/// What the walk needs to know about one name before deciding what to do with it.
pub(super) struct Probe {
    pub(super) name: CString,
    pub(super) src: rustix::io::Result<Meta>,
    pub(super) dst: DstProbe,
    /// For regular files that pass the quick check.
    pub(super) xattrs: Option<XattrPair>,
}

/// The quick check: same type, size and mtime (ns) means the same data.
pub(super) fn quick_equal(sm: &Meta, dm: &Meta) -> bool {
    sm.kind == FileType::RegularFile
        && dm.kind == FileType::RegularFile
        && sm.size == dm.size
        && sm.mtime == dm.mtime
}

/// lstat of a source entry and, unless it is unchanged since `cutoff`, of its destination
/// counterpart in `dst` (None: not opened yet).
fn probe(
    xr: &mut XReader,
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    name: CString,
    in_dst: InDst,
    cutoff: Option<Timestamp>,
) -> Probe {
    let s = lstat_at(src, &name);
    let d = match (&s, in_dst) {
        (Err(_), _) | (_, InDst::No) => DstProbe::Absent,
        (Ok(sm), hint) => {
            let old = cutoff.is_some_and(|c| sm.ctime < c);
            match (hint, dst) {
                // An unchanged entry under a name that has the same type in the destination:
                // the d_type check catches what a ctime cannot (a name now meaning another,
                // older inode, should a filesystem not stamp renamed inodes).
                (InDst::Listed(t), _) if old && t == sm.kind => DstProbe::Unchanged,
                (InDst::Assumed, _) if old => DstProbe::Unchanged,
                (_, Some(dst)) => DstProbe::Stat(lstat_at(dst, &name)),
                (_, None) => DstProbe::Pending,
            }
        }
    };
    let xattrs = match (&s, &d, dst) {
        (Ok(sm), DstProbe::Stat(Ok(dm)), Some(dst)) if quick_equal(sm, dm) => Some(
            xr.entry_xattrs(src, &name)
                .map_err(|e| (true, e))
                .and_then(|sx| {
                    xr.entry_xattrs(dst, &name)
                        .map(|dx| (sx, dx))
                        .map_err(|e| (false, e))
                }),
        ),
        _ => None,
    };
    Probe {
        name,
        src: s,
        dst: d,
        xattrs,
    }
}

/// Half of a directory's names, with its own descriptors, for the helper thread.
struct ProbeJob {
    src: OwnedFd,
    dst: Option<OwnedFd>,
    names: Vec<(CString, InDst)>,
    cutoff: Option<Timestamp>,
}

pub(super) struct Helper {
    tx: mpsc::Sender<ProbeJob>,
    rx: mpsc::Receiver<Vec<Probe>>,
    handle: std::thread::JoinHandle<()>,
}

impl Helper {
    fn spawn() -> Option<Helper> {
        let (tx, jobs) = mpsc::channel::<ProbeJob>();
        let (results, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("asd-copy-probe".into())
            .spawn(move || {
                let mut xr = XReader::new();
                for job in jobs {
                    let out: Vec<Probe> = job
                        .names
                        .into_iter()
                        .map(|(n, in_dst)| {
                            let dst = job.dst.as_ref().map(|fd| fd.as_fd());
                            probe(&mut xr, job.src.as_fd(), dst, n, in_dst, job.cutoff)
                        })
                        .collect();
                    if results.send(out).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Helper { tx, rx, handle })
    }

    pub(super) fn finish(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

impl Engine<'_> {
    /// lstat (and for files that pass the quick check, xattrs) of every entry; big directories
    /// are split with the helper thread, since this is where an unchanged tree spends its time.
    pub(super) fn probe_all(
        &mut self,
        d: &DirCtx<'_>,
        mut entries: Vec<(CString, InDst)>,
    ) -> Vec<Probe> {
        const PARALLEL_MIN: usize = 64;
        if !self.parallel || self.hook.is_some() || d.fresh || entries.len() < PARALLEL_MIN {
            return self.probe_local(d, entries);
        }
        if self.helper.is_none() {
            self.helper = Helper::spawn();
        }
        let dst = match d.dst.get().map(|fd| fd.try_clone()) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(_)) => return self.probe_local(d, entries),
            None => None,
        };
        let (Some(h), Ok(src)) = (self.helper.as_ref(), d.src.try_clone_to_owned()) else {
            return self.probe_local(d, entries);
        };
        let tail = entries.split_off(entries.len() / 2);
        let spare = tail.clone();
        let job = ProbeJob {
            src,
            dst,
            names: tail,
            cutoff: self.cutoff,
        };
        if h.tx.send(job).is_err() {
            self.parallel = false;
            entries.extend(spare);
            return self.probe_local(d, entries);
        }
        let mut out = self.probe_local(d, entries);
        match self.helper.as_ref().map(|h| h.rx.recv()) {
            Some(Ok(rest)) => out.extend(rest),
            _ => {
                // The helper died (a bug); carry on alone.
                self.parallel = false;
                self.helper = None;
                out.extend(self.probe_local(d, spare));
            }
        }
        out
    }

    fn probe_local(&mut self, d: &DirCtx<'_>, entries: Vec<(CString, InDst)>) -> Vec<Probe> {
        let mut out = Vec::with_capacity(entries.len());
        let dst = d.dst.get().map(|fd| fd.as_fd());
        for (name, in_dst) in entries {
            if self.hook.is_some() {
                let p = self.src_path(Some(&name));
                if let Some(h) = self.hook.as_mut() {
                    h(&p);
                }
            }
            out.push(probe(&mut self.xr, d.src, dst, name, in_dst, self.cutoff));
        }
        out
    }
}
