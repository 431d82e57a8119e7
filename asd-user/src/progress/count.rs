//! The totals for a progress line: a walk of the source beside the copy that counts its
//! non-directory entries and the bytes of its regular files. It never follows symlinks, skips
//! what it cannot read, and stops as soon as the copy is done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A counting walk in progress; dropping it stops the walk and waits for its thread.
pub struct Counting {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Counting {
    /// Counts `root` on a thread of its own and calls `done(files, bytes)` if it got to the
    /// end. None if no thread could be started (then there is no total, which is fine).
    pub fn start(root: &Path, done: impl FnOnce(u64, u64) + Send + 'static) -> Option<Counting> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let root = root.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("asd-count".into())
            .spawn(move || {
                if let Some((files, bytes)) = count(&root, &flag) {
                    done(files, bytes);
                }
            })
            .ok()?;
        Some(Counting {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Non-directory entries and regular files' bytes below `root`; None when stopped.
pub fn count(root: &Path, stop: &AtomicBool) -> Option<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if stop.load(Relaxed) {
                return None;
            }
            // DirEntry::metadata is an lstat: symlinks are counted, not followed.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                files += 1;
                if meta.is_file() {
                    bytes += meta.len();
                }
            }
        }
    }
    Some((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_and_bytes_without_following_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/one"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("a/b/two"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/usr", d.path().join("link")).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(count(d.path(), &stop), Some((3, 1024)));
        stop.store(true, Relaxed);
        assert_eq!(count(d.path(), &stop), None);
    }
}
