//! The queue the parallel tree walks share (deleting a tree, warming a disk's metadata, scanning
//! the RAM copy for changes): threads each take a directory, queue the subdirectories they find
//! in it, and stop once no directory is queued and none is being worked on (one that is may
//! still queue more).

use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) struct TreeQueue<J> {
    state: Mutex<State<J>>,
    wake: Condvar,
}

struct State<J> {
    jobs: Vec<J>,
    /// Jobs taken and not yet done.
    busy: usize,
    stopped: bool,
}

impl<J> TreeQueue<J> {
    pub(crate) fn new(first: Vec<J>) -> TreeQueue<J> {
        TreeQueue {
            state: Mutex::new(State {
                jobs: first,
                busy: 0,
                stopped: false,
            }),
            wake: Condvar::new(),
        }
    }

    /// The state, also after a thread panicked holding it (it is left consistent: no code
    /// here panics while holding it).
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next job (the last queued: depth first), waiting while others may still queue
    /// some; None once every job is done, or the queue stopped. Each job taken is ended by
    /// [`TreeQueue::done`].
    pub(crate) fn take(&self) -> Option<J> {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return None;
            }
            if let Some(job) = s.jobs.pop() {
                s.busy += 1;
                return Some(job);
            }
            if s.busy == 0 {
                self.wake.notify_all();
                return None;
            }
            s = self
                .wake
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Ends a job taken, queueing the jobs found in it (taken last first).
    pub(crate) fn done(&self, found: impl IntoIterator<Item = J>) {
        let mut s = self.lock();
        // Never below zero, even if called once too often (a bug): no panic under the lock.
        debug_assert!(s.busy > 0, "done() without take()");
        s.busy = s.busy.saturating_sub(1);
        s.jobs.extend(found);
        self.wake.notify_all();
    }

    /// No more jobs are handed out; threads waiting for one get None.
    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Jobs queued and not taken yet.
    pub(crate) fn queued(&self) -> usize {
        self.lock().jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary tree of depth 10 walked by four threads: every node once, and every thread
    /// returns.
    #[test]
    fn every_job_is_taken_once_and_every_thread_ends() {
        let q = TreeQueue::new(vec![(0u32, 1u32)]);
        let seen = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    while let Some((depth, id)) = q.take() {
                        seen.lock().unwrap().push(id);
                        let found =
                            (depth < 10).then(|| [(depth + 1, 2 * id), (depth + 1, 2 * id + 1)]);
                        q.done(found.into_iter().flatten());
                    }
                });
            }
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort_unstable();
        assert_eq!(seen, (1..2048).collect::<Vec<_>>());
    }

    #[test]
    fn a_stopped_queue_hands_out_nothing() {
        let q = TreeQueue::new(vec![1, 2, 3]);
        assert_eq!(q.take(), Some(3));
        q.stop();
        assert_eq!(q.take(), None);
        q.done([]);
        assert_eq!(q.queued(), 2);
    }
}
