//! Progress counters from a worker (a job run as the data's owner, see `owner`) to the parent
//! that draws the line: the parent hands the worker the write end of a pipe as descriptor
//! [`CHILD_FD`] and names it in [`ENV`]; the worker writes a line of counters every
//! [`EVERY`] until it exits, and the parent stores each line as its own counters.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Counts;

/// The descriptor number the worker finds the pipe on (3 is a snapshot job's output).
pub const CHILD_FD: RawFd = 4;
/// Set (to [`CHILD_FD`]) in the worker's environment when the parent reads progress.
pub const ENV: &str = "ASD_PROGRESS_FD";
const EVERY: Duration = Duration::from_millis(100);

/// The parent's end, before the worker is started.
pub struct Parent {
    read: OwnedFd,
    write: OwnedFd,
}

impl Parent {
    /// A pipe for the next worker, when progress is on (None otherwise, or if no pipe could be
    /// made: the job runs the same, without a progress line).
    pub fn new() -> Option<Parent> {
        if !super::enabled() {
            return None;
        }
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok()?;
        // Above the numbers the worker's descriptors are moved to (3, 4), so that moving one
        // never overwrites the other.
        let high = |fd: OwnedFd| rustix::io::fcntl_dupfd_cloexec(&fd, 10).ok();
        Some(Parent {
            read: high(read)?,
            write: high(write)?,
        })
    }

    /// The descriptor to move to [`CHILD_FD`] in the child (between fork and exec).
    pub fn child_end(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// After the worker started: drop our copy of its end (so that its exit is our end of
    /// file) and store what it reports until then. Dropping the result waits for that.
    pub fn listen(self) -> Listening {
        drop(self.write);
        let read = std::fs::File::from(self.read);
        let thread = std::thread::Builder::new()
            .name("asd-progress".into())
            .spawn(move || {
                for line in BufReader::new(read).lines() {
                    let Ok(line) = line else { break };
                    if let Some(c) = parse(&line) {
                        super::store(c);
                    }
                }
            })
            .ok();
        Listening(thread)
    }
}

/// The parent's reader; joined on drop (it ends when the worker exits).
pub struct Listening(Option<JoinHandle<()>>);

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

/// In the worker: if the parent passed a pipe, switch progress on and report on it until the
/// process exits (or the parent stops reading).
pub fn serve_parent() {
    if std::env::var(ENV).ok().as_deref() != Some(&CHILD_FD.to_string()) {
        return;
    }
    // SAFETY: the parent placed the pipe at CHILD_FD and said so in ENV; we take ownership once,
    // here, and nothing else in this process uses that number.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(CHILD_FD) };
    // Not inherited by anything this worker might start.
    let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
    super::switch_on();
    let mut out = std::fs::File::from(fd);
    let spawned = std::thread::Builder::new()
        .name("asd-progress".into())
        .spawn(move || loop {
            if out.write_all(format(super::counts()).as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(EVERY);
        });
    if spawned.is_err() {
        tracing::debug!("no progress thread in the worker");
    }
}

/// `files bytes total_files total_bytes`, a total that is not known as `-`.
fn format(c: Counts) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    format!(
        "{} {} {} {}\n",
        c.files,
        c.bytes,
        opt(c.total_files),
        opt(c.total_bytes)
    )
}

fn parse(line: &str) -> Option<Counts> {
    let opt = |s: &str| -> Option<Option<u64>> {
        match s {
            "-" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    match line.split(' ').collect::<Vec<_>>().as_slice() {
        [files, bytes, tf, tb] => Some(Counts {
            files: files.parse().ok()?,
            bytes: bytes.parse().ok()?,
            total_files: opt(tf)?,
            total_bytes: opt(tb)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for c in [
            Counts::default(),
            Counts {
                files: 12,
                bytes: 1 << 40,
                total_files: Some(20),
                total_bytes: None,
            },
            Counts {
                files: 12,
                bytes: 1 << 40,
                total_files: Some(20),
                total_bytes: Some(1 << 41),
            },
        ] {
            let line = format(c);
            assert_eq!(parse(line.trim_end()), Some(c));
        }
        assert_eq!(parse("1 2 3"), None);
        assert_eq!(parse("x 2 - -"), None);
        assert_eq!(parse("1 2 x -"), None);
    }
}
