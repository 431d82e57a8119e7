//! Copy threads. The walk hands every new regular file of a destination that needs no
//! durability ordering (copying into RAM at sync) to a pool of threads and goes on: on a cold
//! disk many reads in flight finish far sooner than the same reads one after another (the disk
//! and the block layer reorder and merge them), and tmpfs is written on every CPU.
//!
//! What keeps every guarantee of the serial path:
//! - a job creates its file under its final name in a directory the walk made or checked, and
//!   writes data, xattrs, owner, mode and times exactly as the walk would ([`FileCopier`]);
//! - a directory with jobs gets its metadata only after every job finished (the walk defers
//!   it), since creating a file changes the directory's mtime and a read-only mode would stop
//!   the job;
//! - every job reports back: a copy, a vanished source, or an error naming the path. A thread
//!   that dies (a bug) is detected at [`Pool::finish`], and the copy fails rather than
//!   leaving a file out silently;
//! - bounded: a fixed number of threads and a bounded queue, so a tree of any size holds at
//!   most [`QUEUE`] jobs (and their directories' descriptors) in memory.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::debug;

use super::file::{Copied, FileCopier};
use super::policy::Policy;
use super::{cerr, CopyError};

/// Copy threads. Reads from a cold disk: measured with bench/copy-mode.sh, more reads in
/// flight help up to about this many; tmpfs writes are CPU-bound and take what CPUs there are.
pub(super) const COPY_THREADS: usize = 16;
/// Jobs waiting for a thread. Each holds its directory pair (two descriptors) alive, so this
/// also bounds the descriptors held (well under the usual limit of 1024).
const QUEUE: usize = 128;

/// A source directory and its destination counterpart, shared by the jobs in it.
pub(super) struct JobDir {
    pub(super) src: OwnedFd,
    pub(super) dst: OwnedFd,
    pub(super) src_path: PathBuf,
    pub(super) dst_path: PathBuf,
}

struct Job {
    dir: Arc<JobDir>,
    name: CString,
}

/// What a job came to.
pub(super) type Done = Result<Copied, CopyError>;

pub(super) struct Pool {
    tx: Option<SyncSender<Job>>,
    rx: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    /// Jobs submitted and not yet reported.
    pending: usize,
}

impl Pool {
    /// Starts the threads; None if not even one could be started (the walk then copies alone).
    pub(super) fn start(policy: &Arc<Policy>, threads: usize) -> Option<Pool> {
        let (tx, jobs) = mpsc::sync_channel::<Job>(QUEUE);
        let (done_tx, rx) = mpsc::channel::<Done>();
        let jobs = Arc::new(Mutex::new(jobs));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let jobs = Arc::clone(&jobs);
            let done = done_tx.clone();
            let copier = FileCopier::new(Arc::clone(policy));
            let spawned = std::thread::Builder::new()
                .name(format!("asd-copy-{i}"))
                .spawn(move || work(&jobs, &done, copier));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    debug!("could not start copy thread {i}: {e}");
                    break;
                }
            }
        }
        if handles.is_empty() {
            return None;
        }
        Some(Pool {
            tx: Some(tx),
            rx,
            threads: handles,
            pending: 0,
        })
    }

    /// Queues a copy of `name` from `dir.src` to `dir.dst` (waits while the queue is full).
    /// Returns the name back if no thread is left to take it.
    pub(super) fn submit(&mut self, dir: &Arc<JobDir>, name: CString) -> Result<(), CString> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(name);
        };
        let job = Job {
            dir: Arc::clone(dir),
            name,
        };
        match tx.send(job) {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(mpsc::SendError(job)) => {
                self.tx = None;
                Err(job.name)
            }
        }
    }

    /// Reports of the jobs finished so far, without waiting.
    pub(super) fn finished(&mut self) -> Vec<Done> {
        let mut out = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            self.pending = self.pending.saturating_sub(1);
            out.push(d);
        }
        out
    }

    /// Waits for every job and every thread. Reports of the remaining jobs, plus an error if a
    /// thread died and jobs went unreported.
    pub(super) fn finish(mut self, root: &std::path::Path) -> Vec<Done> {
        drop(self.tx.take());
        let mut out = Vec::new();
        // Ends when every thread has exited (each holds a sender).
        while let Ok(d) = self.rx.recv() {
            self.pending = self.pending.saturating_sub(1);
            out.push(d);
        }
        let died = self
            .threads
            .drain(..)
            .map(|h| h.join())
            .filter(|r| r.is_err())
            .count();
        if died > 0 || self.pending > 0 {
            out.push(Err(cerr(
                "copy",
                root.to_path_buf(),
                std::io::Error::other(format!(
                    "{died} copy thread(s) failed; {} file(s) were not copied",
                    self.pending
                )),
            )));
        }
        out
    }
}

fn work(jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>, mut copier: FileCopier) {
    loop {
        // The lock is held only to take a job, never while copying.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let d = &job.dir;
        let r = copier.copy_new(
            d.src.as_fd(),
            d.dst.as_fd(),
            &job.name,
            &d.src_path,
            &d.dst_path,
        );
        if done.send(r).is_err() {
            return;
        }
    }
}
