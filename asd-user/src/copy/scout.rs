//! The scout thread and its workers, which warm the destination's metadata ahead of an
//! incremental comparison: the scout walks the source with the walk's cutoff (or, for a
//! journaled one, reads the journal's marks) and queues the destination lookups the walk will
//! make; the workers make them, many at once, and the same lookups in the start clone, which
//! the keeper makes next (see `super::keep`). They only read.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, FileType, Mode};

use crate::fsio::{fstat, list_dir, lstat_at, DIR_FLAGS};
use crate::journal::{DirtyTree, Node};

use super::engine::Engine;
use super::helpers::push_rel;
use super::Timestamp;

// ---------------------------------------------------------------------------------------------
// Warming the destination's metadata ahead of an incremental comparison.

/// Ahead of an incremental comparison: a scout thread walks the source (tmpfs: cheap) with the
/// same cutoff as the walk and queues the destination lookups the walk will make (the
/// directories of changed entries, the entries themselves, the listings of changed
/// directories); worker threads make them, many at once. With a cold cache the walk would wait
/// on these reads one after another; this way it mostly finds them cached. They only read,
/// decide nothing, and stop as soon as the walk is done.
pub(super) struct Scout {
    shared: std::sync::Arc<ScoutShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct ScoutShared {
    /// Only opened through (`Engine::open_rel`), never read: it may share the walk's offset.
    dst: OwnedFd,
    /// The source, likewise, for [`Listing::ExtrasOfSource`].
    src: Option<OwnedFd>,
    /// The start clone, whose directories of the same entries the keeper looks in next (see
    /// `super::keep`).
    clone: Option<OwnedFd>,
    queue: std::sync::Mutex<ScoutQueue>,
    wake: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

type ScoutJob = (Vec<u8>, Vec<CString>, Listing);

/// What a job does with its destination directory's listing.
enum Listing {
    /// Not read: the walk does not list it.
    No,
    /// Read, to warm it: the walk lists it, and what it deletes there is marked by the journal
    /// (and so among the names to lstat).
    Warm,
    /// Read, and every name the source lacks (given here) lstat-ed: the walk deletes them.
    Extras(HashSet<CString>),
    /// The same, the source's names read from the source's directory (marks from a scan name
    /// no deleted entries, see `super::scan`).
    ExtrasOfSource,
}

#[derive(Default)]
struct ScoutQueue {
    /// In the order the walk needs them: destination directories (relative to the root), the
    /// names in each to lstat, and for one to be listed the source's names (the others in the
    /// listing are to be deleted: lstat them too).
    jobs: std::collections::VecDeque<ScoutJob>,
    /// The scout has finished walking the source.
    walked: bool,
}

/// Lookups in flight: they wait on the disk, not on the CPU. 4, 8 and 16 measured alike
/// (20k files all within the cutoff, cold: 0.40 s without, 0.24-0.27 s with).
const SCOUT_WORKERS: usize = 8;

impl Scout {
    pub(super) fn start(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        clone: Option<BorrowedFd<'_>>,
        cutoff: Timestamp,
    ) -> Option<Scout> {
        // Its own open file description: a duplicate would share the walk's directory offset.
        let src = rfs::openat(src, c".", DIR_FLAGS, Mode::empty()).ok()?;
        let shared = ScoutShared::new(dst, clone, None)?;
        let mut threads = Vec::with_capacity(SCOUT_WORKERS + 1);
        let sh = shared.clone();
        let scout = std::thread::Builder::new()
            .name("asd-copy-scout".into())
            .spawn(move || {
                let changed = fstat(src.as_fd()).is_ok_and(|m| m.ctime >= cutoff);
                scout_dir(
                    &sh,
                    src.as_fd(),
                    &mut Vec::new(),
                    changed,
                    cutoff,
                    &mut Vec::new(),
                );
                if let Ok(mut q) = sh.queue.lock() {
                    q.walked = true;
                }
                sh.wake.notify_all();
            })
            .ok()?;
        threads.push(scout);
        Some(Scout::with_workers(shared, threads, SCOUT_WORKERS))
    }

    /// Ahead of a journaled comparison (or one marked by a scan): the lookups of what the
    /// journal marked, known from the start, so there is no scout walking the source.
    pub(super) fn start_marked(
        marks: &DirtyTree,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        clone: Option<BorrowedFd<'_>>,
    ) -> Option<Scout> {
        let shared = ScoutShared::new(dst, clone, Some(src))?;
        let mut jobs = std::collections::VecDeque::new();
        queue_marked(&mut jobs, marks.root(), &mut Vec::new());
        let workers = SCOUT_WORKERS.min(jobs.len());
        if let Ok(mut q) = shared.queue.lock() {
            q.jobs = jobs;
            q.walked = true;
        }
        Some(Scout::with_workers(shared, Vec::new(), workers))
    }

    fn with_workers(
        shared: std::sync::Arc<ScoutShared>,
        mut threads: Vec<std::thread::JoinHandle<()>>,
        workers: usize,
    ) -> Scout {
        for _ in 0..workers {
            let sh = shared.clone();
            if let Ok(t) = std::thread::Builder::new()
                .name("asd-copy-prefetch".into())
                .spawn(move || scout_worker(&sh))
            {
                threads.push(t);
            }
        }
        Scout { shared, threads }
    }

    /// Stops the threads (a lookup in flight finishes first) and waits for them.
    pub(super) fn stop(self) {
        drop(self);
    }
}

/// Also on the way out of a failed or panicking write-back: no thread outlives it holding
/// descriptors of the destination or the clone.
impl Drop for Scout {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl ScoutShared {
    fn new(
        dst: BorrowedFd<'_>,
        clone: Option<BorrowedFd<'_>>,
        src: Option<BorrowedFd<'_>>,
    ) -> Option<std::sync::Arc<ScoutShared>> {
        Some(std::sync::Arc::new(ScoutShared {
            dst: dst.try_clone_to_owned().ok()?,
            src: src.and_then(|s| s.try_clone_to_owned().ok()),
            clone: clone.and_then(|c| c.try_clone_to_owned().ok()),
            queue: std::sync::Mutex::new(ScoutQueue::default()),
            wake: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, job: ScoutJob) {
        if let Ok(mut q) = self.queue.lock() {
            q.jobs.push_back(job);
        }
        self.wake.notify_one();
    }
}

/// Queues the destination lookups for source directory `dir` (`changed` since the cutoff: the
/// walk lists its destination) and its changed entries, then does the same below.
fn scout_dir(
    sh: &ScoutShared,
    dir: BorrowedFd<'_>,
    rel: &mut Vec<u8>,
    changed: bool,
    cutoff: Timestamp,
    buf: &mut Vec<u8>,
) {
    let Ok(names) = list_dir(dir, buf) else {
        return;
    };
    let mut lookups = Vec::new();
    let mut subdirs = Vec::new();
    let listed = match changed {
        true => Listing::Extras(names.iter().cloned().collect()),
        false => Listing::No,
    };
    for name in names {
        if sh.stopped() {
            return;
        }
        let Ok(m) = lstat_at(dir, &name) else {
            continue;
        };
        let new = m.ctime >= cutoff;
        if m.kind == FileType::Directory {
            subdirs.push((name.clone(), new));
        }
        if new {
            lookups.push(name);
        }
    }
    if !matches!(listed, Listing::No) || !lookups.is_empty() {
        sh.push((rel.clone(), lookups, listed));
    }
    // Subdirectories after the entries, as the walk takes them.
    for (name, new) in subdirs {
        if sh.stopped() {
            return;
        }
        let len = push_rel(rel, &name);
        if let Ok(sub) = rfs::openat(dir, &name, DIR_FLAGS, Mode::empty()) {
            scout_dir(sh, sub.as_fd(), rel, new, cutoff, buf);
        }
        rel.truncate(len);
    }
}

/// Queues, for every directory of the journal's tree with marked entries, the lookups of those
/// entries (and the destination's listing where the journal marked the source's). A subtree
/// marked whole is compared in full and left to the walk.
fn queue_marked(jobs: &mut std::collections::VecDeque<ScoutJob>, node: &Node, rel: &mut Vec<u8>) {
    if node.whole() || !(node.has_children() || node.listing()) {
        return;
    }
    let names: Vec<CString> = node
        .children()
        .filter_map(|(name, _)| CString::new(name.as_bytes()).ok())
        .collect();
    let listed = match (node.listing(), node.all_extras()) {
        (true, true) => Listing::ExtrasOfSource,
        (true, false) => Listing::Warm,
        (false, _) => Listing::No,
    };
    jobs.push_back((rel.clone(), names, listed));
    for (name, child) in node.children() {
        let len = push_rel(rel, &CString::new(name.as_bytes()).unwrap_or_default());
        queue_marked(jobs, child, rel);
        rel.truncate(len);
    }
}

fn scout_worker(sh: &ScoutShared) {
    let mut buf = Vec::new();
    loop {
        let (rel, mut names, listed) = {
            let Ok(mut q) = sh.queue.lock() else {
                return;
            };
            loop {
                if sh.stopped() {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.walked {
                    return;
                }
                q = match sh.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        // Errors do not matter here: the walk meets them again and reports them.
        let Ok(dir) = Engine::open_rel(sh.dst.as_fd(), &rel) else {
            continue;
        };
        match listed {
            Listing::No => {}
            Listing::Warm => {
                let _ = list_dir(dir.as_fd(), &mut buf);
            }
            Listing::Extras(src) => {
                let extra = list_dir(dir.as_fd(), &mut buf).unwrap_or_default();
                names.extend(extra.into_iter().filter(|n| !src.contains(n)));
            }
            Listing::ExtrasOfSource => {
                let src: HashSet<CString> = sh
                    .src
                    .as_ref()
                    .and_then(|s| Engine::open_rel(s.as_fd(), &rel).ok())
                    .and_then(|d| list_dir(d.as_fd(), &mut buf).ok())
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let extra = list_dir(dir.as_fd(), &mut buf).unwrap_or_default();
                names.extend(extra.into_iter().filter(|n| !src.contains(n)));
            }
        }
        for name in &names {
            if sh.stopped() {
                return;
            }
            let _ = lstat_at(dir.as_fd(), name);
        }
        // The keeper then looks for the same names in the clone (most are not there).
        if let Some(clone) = &sh.clone {
            if let Ok(kept) = Engine::open_rel(clone.as_fd(), &rel) {
                for name in &names {
                    if sh.stopped() {
                        return;
                    }
                    let _ = lstat_at(kept.as_fd(), name);
                }
            }
        }
    }
}
