//! Running data work as the owner of the data (DESIGN.md §1): when the manager is root and a
//! target belongs to someone else, each job runs in a child process of this same binary that has
//! dropped to the owner's uid, gid and groups. Root keeps only the mount step.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::copy::{self, CopyOptions, CopyStats, Timestamp};
use crate::state::Owner;

/// Argument that turns the `asd` binary into a worker (not a user command).
pub const WORKER_ARG: &str = "__worker";
/// The descriptor a job's output file (a snapshot) is passed on.
const JOB_FD: i32 = 3;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Job {
    /// `mkdir -p` with `mode` for the last component (inside the owner's area).
    MakeDirs {
        path: PathBuf,
        mode: u32,
    },
    Copy {
        src: PathBuf,
        dst: PathBuf,
        delete: bool,
        durable: bool,
        /// The destination equalled the source at this time: only entries changed since then
        /// are compared (see `CopyOptions::changed_since`). `None`: full comparison.
        #[serde(default)]
        since: Option<Timestamp>,
        /// A change journal's marks since the destination equalled the source: only they are
        /// looked at (see `copy::sync_tree_journaled`); `since` is then ignored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        marks: Option<crate::journal::DirtyTree>,
        /// The target's start clone (`-old`): what the write-back replaces or deletes of the
        /// start state is kept there first (see `copy::write_back`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_clone: Option<PathBuf>,
        /// Where the directories' identities are recorded between write-backs (see
        /// `copy::write_back`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dir_ids: Option<copy::DirIdsFile>,
    },
    /// Record where the directories of the RAM copy `root` are, in `file`; returns the time
    /// the next write-back compares changes from (see `copy::record_dir_ids`).
    RecordDirIds {
        root: PathBuf,
        file: PathBuf,
    },
    /// Give `dst` (a directory) the mode, times and user xattrs of `src`: the overlay's upper
    /// root decides what the merged root looks like.
    MatchDirMeta {
        src: PathBuf,
        dst: PathBuf,
    },
    /// The start-state clone of `src` in the existing empty directory `dst` (see
    /// `copy::start_clone`).
    Clone {
        src: PathBuf,
        dst: PathBuf,
    },
    /// Write a tar.zstd of `src` (members under `top`) to the passed descriptor; with `current`,
    /// `src` is a start clone and the archive the start state it keeps of `current` (see
    /// `snapshot::write_start_state_to`).
    Snapshot {
        src: PathBuf,
        top: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current: Option<PathBuf>,
    },
    /// Remove everything inside `path`, keeping `path` itself (its parent may not be the owner's).
    Empty {
        path: PathBuf,
    },
    /// Remove `path` and everything in it (only used where the owner may remove `path`).
    Remove {
        path: PathBuf,
    },
    /// Discard a RAM tree: first rename it to `<path>.asd-trash` (atomic), then remove that. A
    /// crash midway never leaves a half-deleted tree under a name recovery would trust.
    Discard {
        path: PathBuf,
        /// The record of the tree's directories (see `copy::write_back`), removed first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record: Option<PathBuf>,
    },
    /// Remove `path` and the empty directories inside it; anything non-empty stays.
    Prune {
        path: PathBuf,
    },
    RemoveTempFiles {
        root: PathBuf,
    },
    TreeSize {
        path: PathBuf,
    },
    /// Files of `root` with hard links other than those into `asd_clones` (asd's start clone).
    FindHardlinks {
        root: PathBuf,
        asd_clones: Vec<PathBuf>,
    },
    /// Overlay mode: persist the upper layer's changes (see `overlay`).
    Persist {
        upper: PathBuf,
        changes: PathBuf,
    },
    /// Overlay mode: apply persisted changes (or an upper layer) onto a directory.
    Apply {
        changes: PathBuf,
        dst: PathBuf,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Output {
    Done,
    Stats(CopyStats),
    Bytes(u64),
    Count(u64),
    Paths(Vec<PathBuf>),
    Time(Timestamp),
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("{0}")]
    Job(String),
    #[error("could not start a worker as {user}: {source}")]
    Spawn {
        user: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker running as {user} failed: {reason}")]
    Worker { user: String, reason: String },
}

/// Run `job` as `owner`: in this process when we already are that user, otherwise in a worker
/// child that has dropped to the owner's identity. `fd` is handed to the job (snapshots).
pub fn run(owner: &Owner, job: &Job, fd: Option<OwnedFd>) -> Result<Output, OwnerError> {
    if nix::unistd::geteuid().as_raw() == owner.uid {
        return execute(job, fd).map_err(OwnerError::Job);
    }
    run_in_worker(owner, job, fd)
}

fn run_in_worker(owner: &Owner, job: &Job, fd: Option<OwnedFd>) -> Result<Output, OwnerError> {
    let spawn_err = |source| OwnerError::Spawn {
        user: owner.name.clone(),
        source,
    };
    let input = serde_json::to_vec(job).map_err(|e| spawn_err(std::io::Error::other(e)))?;
    let exe = std::env::current_exe().map_err(spawn_err)?;
    let mut cmd = Command::new(exe);
    cmd.arg(WORKER_ARG)
        .current_dir("/")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The copy engine's crash hook runs in the worker, so its variable must reach it; it is
    // passed only in builds that have the hook (the `test-hooks` feature).
    let passed: &[&str] = &[
        "RUST_LOG",
        "DEBUG",
        "ASD_LOG",
        "NO_COLOR",
        #[cfg(any(test, feature = "test-hooks"))]
        "ASD_TEST_CRASH_AFTER_RENAMES",
    ];
    for key in passed {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    let uid = owner.uid;
    let gid = owner.gid;
    let groups: Vec<libc::gid_t> = owner.groups.clone();
    let raw_fd = fd.as_ref().map(|f| f.as_raw_fd());
    // Progress counters come back on a pipe of their own, when someone shows them.
    let relay = matches!(job, Job::Copy { .. })
        .then(crate::progress::relay::Parent::new)
        .flatten();
    let relay_fd = relay.as_ref().map(|r| r.child_end());
    if relay_fd.is_some() {
        let fd_no = crate::progress::relay::CHILD_FD.to_string();
        cmd.env(crate::progress::relay::ENV, fd_no);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (dup2, prctl, setgroups, setgid, setuid, getppid) on values computed before the fork; it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(src) = raw_fd {
                if libc::dup2(src, JOB_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The relay's descriptor is above both numbers (see `progress::relay`).
            if let Some(src) = relay_fd {
                if libc::dup2(src, crate::progress::relay::CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid: changing credentials resets the parent-death signal. The worker must
            // not outlive a manager that was killed (the next command would run beside it).
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Refuse to go on if root could be regained.
            if libc::setuid(0) == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(fd);
    let _relay = relay.map(|r| r.listen());
    let worker_err = |reason: String| OwnerError::Worker {
        user: owner.name.clone(),
        reason,
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&input)
            .map_err(|e| worker_err(format!("sending the job: {e}")))?;
    }
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_end(&mut out)
            .map_err(|e| worker_err(format!("reading its answer: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| worker_err(format!("waiting: {e}")))?;
    let reply: Result<Output, String> = serde_json::from_slice(&out)
        .map_err(|_| worker_err(format!("it exited with {status} without an answer")))?;
    reply.map_err(OwnerError::Job)
}

/// Entry point of the worker process: one job from stdin, its result as JSON on stdout.
pub fn worker_main() -> i32 {
    crate::progress::relay::serve_parent();
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("asd worker: reading the job: {e}");
        return 2;
    }
    let job: Job = match serde_json::from_slice(&input) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("asd worker: bad job: {e}");
            return 2;
        }
    };
    // SAFETY: JOB_FD was placed by our parent only for jobs that take a descriptor; we take
    // ownership once, here, and nothing else in this process uses that number.
    let fd = matches!(job, Job::Snapshot { .. })
        .then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(JOB_FD) });
    let result = execute(&job, fd);
    let code = i32::from(result.is_err());
    match serde_json::to_vec(&result) {
        Ok(bytes) => {
            let mut out = std::io::stdout().lock();
            if out.write_all(&bytes).and_then(|_| out.flush()).is_err() {
                return 2;
            }
        }
        Err(_) => return 2,
    }
    code
}

fn execute(job: &Job, fd: Option<OwnedFd>) -> Result<Output, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    match job {
        Job::MakeDirs { path, mode } => {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|x| format!("mkdir {}: {x}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                .map_err(|x| format!("chmod {}: {x}", path.display()))?;
            Ok(Output::Done)
        }
        Job::Copy {
            src,
            dst,
            delete,
            durable,
            since,
            marks,
            start_clone,
            dir_ids,
        } => {
            let opts = CopyOptions {
                delete: *delete,
                durable: *durable,
                changed_since: *since,
            };
            // Into RAM (not durable) every byte is written: the bytes have a total too.
            let _counting = crate::progress::begin_copy(src, !*durable);
            copy::write_back(
                src,
                dst,
                &opts,
                marks.as_ref(),
                start_clone.as_deref(),
                dir_ids.as_ref(),
            )
            .map(Output::Stats)
            .map_err(|x| e(&x))
        }
        Job::RecordDirIds { root, file } => copy::record_dir_ids(root, file)
            .map(Output::Time)
            .map_err(|x| e(&x)),
        Job::MatchDirMeta { src, dst } => match_dir_meta(src, dst).map(|_| Output::Done),
        Job::Clone { src, dst } => copy::start_clone(src, dst)
            .map(Output::Stats)
            .map_err(|x| e(&x)),
        Job::Snapshot { src, top, current } => {
            let fd = fd.ok_or("no output descriptor for the snapshot")?;
            let file = std::fs::File::from(fd);
            crate::snapshot::write_start_state_to(src, current.as_deref(), top.as_os_str(), file)
                .map(Output::Bytes)
                .map_err(|x| e(&x))
        }
        Job::Empty { path } => crate::remove::empty(path)
            .map(|_| Output::Done)
            .map_err(|x| e(&x)),
        Job::Remove { path } => remove_tree(path).map(|_| Output::Done),
        Job::Discard { path, record } => {
            // Best effort: a record left over is never trusted by another RAM copy (its root
            // is another directory), and the copy must go all the same.
            if let Some(r) = record {
                if let Err(x) = copy::forget_dir_ids(r) {
                    tracing::warn!("remove {}: {x}", r.display());
                }
            }
            discard(path).map(|_| Output::Done)
        }
        Job::Prune { path } => {
            prune(path);
            Ok(Output::Done)
        }
        Job::RemoveTempFiles { root } => copy::remove_temp_files(root)
            .map(Output::Count)
            .map_err(|x| e(&x)),
        Job::TreeSize { path } => copy::tree_size(path).map(Output::Bytes).map_err(|x| e(&x)),
        Job::FindHardlinks { root, asd_clones } => {
            copy::find_hardlinked_files(root, asd_clones, 10)
                .map(Output::Paths)
                .map_err(|x| e(&x))
        }
        Job::Persist { upper, changes } => crate::overlay::persist(upper, changes)
            .map(Output::Stats)
            .map_err(|x| e(&x)),
        Job::Apply { changes, dst } => crate::overlay::apply(changes, dst)
            .map(Output::Stats)
            .map_err(|x| e(&x)),
    }
}

/// Remove the contents of `path` without following symlinks (remove_dir_all does not follow them).
fn discard(path: &std::path::Path) -> Result<(), String> {
    let trash = crate::paths::trash(path);
    remove_tree(&trash)?;
    match std::fs::rename(path, &trash) {
        Ok(()) => {}
        Err(x) if x.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(x) => return Err(format!("rename {} aside: {x}", path.display())),
    }
    remove_tree(&trash)
}

fn prune(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                prune(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn match_dir_meta(src: &std::path::Path, dst: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(src).map_err(|e| format!("stat {}: {e}", src.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", dst.display()))?;
    if let Ok(names) = xattr::list(src) {
        for name in names.filter(|n| n.to_string_lossy().starts_with("user.")) {
            if let Ok(Some(v)) = xattr::get(src, &name) {
                let _ = xattr::set(dst, &name, &v);
            }
        }
    }
    let ts = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
    nix::sys::stat::utimensat(
        None,
        dst,
        &ts(m.atime(), m.atime_nsec()),
        &ts(m.mtime(), m.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| format!("set times of {}: {e}", dst.display()))
}

/// Remove a tree we own, with many unlinks in flight ([`crate::remove`]). Directories without
/// permissions (overlayfs leaves its `work/work` at mode 0000) are opened up first, without
/// following symlinks.
fn remove_tree(path: &std::path::Path) -> Result<(), String> {
    crate::remove::tree(path)
        .map(|_| ())
        .map_err(|x| x.to_string())
}
