//! Tests that mount run on a thread of their own in a private mount namespace: everything they
//! mount is gone when the thread ends, even when the test fails, and nothing of it is seen by
//! the host or by other tests.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Runs `test` on a new thread in a private mount namespace, with a scratch directory that has
/// a tmpfs of its own mounted on it. Without root it says so loudly and runs nothing.
pub fn run(test: impl FnOnce(&Path) + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("!!! SKIPPED: this test mounts file systems and must run as root");
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("mountfd-test-")
        .tempdir()
        .expect("scratch dir");
    let dir = scratch.path().to_path_buf();
    let joined = std::thread::spawn(move || {
        // CLONE_NEWNS also unshares this thread's file system attributes: the rest of the test
        // process stays in the host's namespace.
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        mount_tmpfs(&dir, "mountfd-scratch");
        test(&dir);
    })
    .join();
    // The namespace, and every mount in it, ended with the thread: the directory is empty.
    drop(scratch);
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

/// Mounts a tmpfs named `source` on `path` (by path: this is the test's own setup).
pub fn mount_tmpfs(path: &Path, source: &str) {
    mount(
        Some(source),
        path,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount tmpfs");
}

/// Makes the mount at `path` shared, as `/` is on a system booted with systemd.
pub fn make_shared(path: &Path) {
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .expect("make shared");
}
