//! Progress of the copy work, for a line at the terminal (issue 10 item 4).
//!
//! The copy engine publishes its counters here ([`publish`]); nobody pays for that unless a
//! reader switched progress on ([`ON`]): the terminal line of an interactive `asd sync`,
//! `resync` or `unsync` ([`term`]), or, in a worker that runs a job as the data's owner, the
//! relay that passes the counters to the parent through an inherited pipe ([`relay`]). The
//! totals come from a counting walk of the source beside the copy ([`count`]).
//!
//! The counters are approximate by design: what the engine reports per directory and per file
//! written, and a total of the source's non-directory entries. Good enough to see that a long
//! sync moves, how fast, and roughly how far along it is; never used for decisions.

pub mod count;
pub mod relay;
pub mod term;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Someone reads the counters: only then do [`publish`] and [`begin_copy`] do anything.
static ON: AtomicBool = AtomicBool::new(false);

/// Entries done and bytes written by the running copy; the source's totals once counted.
static FILES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// `u64::MAX`: not known (yet).
static TOTAL_FILES: AtomicU64 = AtomicU64::new(UNKNOWN);
static TOTAL_BYTES: AtomicU64 = AtomicU64::new(UNKNOWN);
const UNKNOWN: u64 = u64::MAX;

/// What the command is doing now: set by the engine ([`task`], [`phase`]).
static TASK: Mutex<Option<Task>> = Mutex::new(None);

#[derive(Debug, Clone)]
struct Task {
    /// "sync /home/u/x"
    label: String,
    /// "copying into RAM", "writing back", ...
    phase: Option<String>,
    /// When the current phase began (the rate and the elapsed time are of the phase).
    began: std::time::Instant,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub files: u64,
    pub bytes: u64,
    /// The source's non-directory entries, once the counting walk finished.
    pub total_files: Option<u64>,
    /// The source's bytes, when the copy writes all of them (into an empty RAM area); a
    /// write-back writes only what changed, so its bytes have no total.
    pub total_bytes: Option<u64>,
}

pub fn enabled() -> bool {
    ON.load(Relaxed)
}

pub(crate) fn switch_on() {
    ON.store(true, Relaxed);
}

/// Called by the copy engine with its running totals (entries done, bytes written).
pub fn publish(files: u64, bytes: u64) {
    if ON.load(Relaxed) {
        FILES.store(files, Relaxed);
        BYTES.store(bytes, Relaxed);
    }
}

pub fn counts() -> Counts {
    let known = |v: u64| (v != UNKNOWN).then_some(v);
    Counts {
        files: FILES.load(Relaxed),
        bytes: BYTES.load(Relaxed),
        total_files: known(TOTAL_FILES.load(Relaxed)),
        total_bytes: known(TOTAL_BYTES.load(Relaxed)),
    }
}

/// Overwrites the counters with what a worker reported (see [`relay`]).
fn store(c: Counts) {
    FILES.store(c.files, Relaxed);
    BYTES.store(c.bytes, Relaxed);
    TOTAL_FILES.store(c.total_files.unwrap_or(UNKNOWN), Relaxed);
    TOTAL_BYTES.store(c.total_bytes.unwrap_or(UNKNOWN), Relaxed);
}

fn reset() {
    store(Counts::default());
}

/// A copy of `src` starts (in this process): counters from zero, and the source counted
/// beside it; `whole`: it writes every byte of the source (a sync into RAM), so the bytes
/// have a total too. Dropping the guard stops the count.
pub fn begin_copy(src: &Path, whole: bool) -> Option<count::Counting> {
    if !ON.load(Relaxed) {
        return None;
    }
    reset();
    count::Counting::start(src, move |files, bytes| {
        TOTAL_FILES.store(files, Relaxed);
        if whole {
            TOTAL_BYTES.store(bytes, Relaxed);
        }
    })
}

/// The command works on one target now (`what`: "sync", "resync", "unsync"); until the guard
/// is dropped, the terminal line names it.
pub fn task(what: &str, target: &Path) -> TaskGuard {
    if ON.load(Relaxed) {
        reset();
        if let Ok(mut t) = TASK.lock() {
            *t = Some(Task {
                label: format!("{what} {}", target.display()),
                phase: None,
                began: std::time::Instant::now(),
            });
        }
    }
    TaskGuard(())
}

/// The step of the current task ("copying into RAM"); the counters start again from zero.
pub fn phase(name: &str) {
    if ON.load(Relaxed) {
        reset();
        if let Ok(mut t) = TASK.lock() {
            if let Some(t) = t.as_mut() {
                t.phase = Some(name.to_string());
                t.began = std::time::Instant::now();
            }
        }
    }
}

fn current_task() -> Option<Task> {
    TASK.lock().ok().and_then(|t| t.clone())
}

/// Ends the task: its line is cleared.
pub struct TaskGuard(());

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if ON.load(Relaxed) {
            if let Ok(mut t) = TASK.lock() {
                *t = None;
            }
            term::clear();
        }
    }
}
