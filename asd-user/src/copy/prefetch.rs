//! Prefetch threads that warm a tree's metadata (the disk side) ahead of a walk, so that
//! the walk mostly finds listings and inodes cached instead of waiting on one disk read after
//! another. They only read.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::FileType;

use crate::fsio::lstat_at;
use crate::treequeue::TreeQueue;

use super::engine::Engine;
use super::helpers::{list_dir_typed, push_rel};

// ---------------------------------------------------------------------------------------------
// Warming the destination's metadata ahead of a full comparison.

/// Threads that read the metadata of the destination tree (directory listings and inodes)
/// ahead of the walk of a full comparison. With a cold cache that walk waits on one disk read
/// after another; these keep several reads in flight, so that the walk mostly finds the cache
/// warm. They only read, and stop as soon as the walk is done.
pub(super) struct Prefetch {
    shared: std::sync::Arc<PrefetchShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct PrefetchShared {
    root: OwnedFd,
    /// Directories still to read, relative to the root.
    queue: TreeQueue<Vec<u8>>,
    stop: std::sync::atomic::AtomicBool,
}

impl Prefetch {
    pub(super) fn start(root: BorrowedFd<'_>, threads: usize) -> Option<Prefetch> {
        let shared = std::sync::Arc::new(PrefetchShared {
            root: root.try_clone_to_owned().ok()?,
            queue: TreeQueue::new(vec![Vec::new()]),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let threads = (0..threads)
            .filter_map(|_| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name("asd-copy-prefetch".into())
                    .spawn(move || prefetch_worker(&sh))
                    .ok()
            })
            .collect();
        Some(Prefetch { shared, threads })
    }

    /// Runs `walk` (a walk of the tree at `root`) with prefetch threads reading ahead of it.
    pub(super) fn around<T>(root: BorrowedFd<'_>, walk: impl FnOnce() -> T) -> T {
        let prefetch = Prefetch::start(root, PREFETCH_THREADS);
        let out = walk();
        if let Some(p) = prefetch {
            p.stop();
        }
        out
    }

    pub(super) fn stop(self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.queue.stop();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// More reads in flight than threads of the walk; beyond 2-4 a virtio disk gained nothing in
/// measurements (20k files: 215 ms cold without, 165 ms with 2 to 8 threads).
pub(super) const PREFETCH_THREADS: usize = 4;
/// A directory whose opening and listing takes longer than this (plus per entry) was read
/// from disk: far more than a cached listing takes, far less than a disk read.
const PREFETCH_COLD_DIR: std::time::Duration = std::time::Duration::from_micros(40);
const PREFETCH_COLD_ENTRY: std::time::Duration = std::time::Duration::from_nanos(500);

fn prefetch_worker(sh: &PrefetchShared) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = Vec::new();
    while let Some(rel) = sh.queue.take() {
        let mut found = Vec::new();
        // Errors do not matter here: the walk meets them again and reports them.
        let started = std::time::Instant::now();
        if let Ok(dir) = Engine::open_rel(sh.root.as_fd(), &rel) {
            let names = list_dir_typed(dir.as_fd(), &mut buf).unwrap_or_default();
            // A directory that had to be read from disk probably has its inodes there too;
            // one that came from the cache probably has them cached as well, and statting them
            // would only take CPU from the walk.
            let entries = u32::try_from(names.len()).unwrap_or(u32::MAX);
            let cold = started.elapsed() > PREFETCH_COLD_DIR + PREFETCH_COLD_ENTRY * entries;
            for (name, kind) in names {
                if sh.stop.load(Relaxed) {
                    break;
                }
                let is_dir = match kind {
                    FileType::Unknown => {
                        lstat_at(dir.as_fd(), &name).is_ok_and(|m| m.kind == FileType::Directory)
                    }
                    k => {
                        if cold {
                            let _ = lstat_at(dir.as_fd(), &name);
                        }
                        k == FileType::Directory
                    }
                };
                if is_dir {
                    let mut child = rel.clone();
                    push_rel(&mut child, &name);
                    found.push(child);
                }
            }
        }
        // Taken in listing order, the order the walk takes, so that it stays ahead.
        sh.queue.done(found.into_iter().rev());
    }
}
