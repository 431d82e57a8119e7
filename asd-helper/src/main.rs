//! asd-helper: the small root helper that performs mounts for unprivileged asd managers
//! (DESIGN.md §6). It listens on a unix socket passed by systemd (`asd-helper.socket`) or named
//! with `--socket`, checks who asks (SO_PEERCRED) and what they own, asks polkit, mounts through
//! opened descriptors, and records what it mounted for whom.

mod beside;
mod caps;
mod ops;
mod paths;
mod peer;
mod polkit;
#[cfg(test)]
mod proptests;
mod records;
mod server;
mod sys;

use std::io::IsTerminal;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

/// The root helper of asd: performs bind and overlay mounts for unprivileged asd managers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Listen on this socket path (created with mode 0666) instead of the socket passed by
    /// systemd. Without either, $ASD_HELPER_SOCKET or /run/asd/io.asd.Helper.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the records of what was mounted for whom are kept (root-only).
    #[arg(long, env = "ASD_HELPER_STATE_DIR", default_value = "/run/asd/helper")]
    state_dir: PathBuf,
    /// Largest message accepted, in bytes.
    #[arg(long, env = "ASD_HELPER_MAX_MESSAGE", default_value_t = asd_protocol::DEFAULT_MAX_MESSAGE)]
    max_message: usize,
    /// Open connections allowed per uid, served or waiting; more are refused
    /// (TooManyConnections).
    #[arg(long, env = "ASD_HELPER_MAX_CONNECTIONS_PER_UID", default_value_t = 16)]
    max_connections_per_uid: usize,
    /// Connections served at once, for all users; more wait for a place.
    #[arg(long, env = "ASD_HELPER_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: usize,
    /// Connections that may wait for a place, for all users; more are refused (AtCapacity).
    #[arg(long, env = "ASD_HELPER_MAX_QUEUED", default_value_t = 4096)]
    max_queued: usize,
    /// Seconds a connection may wait for a place, and a request for its turn to run, before
    /// it is refused (AtCapacity).
    #[arg(long, env = "ASD_HELPER_QUEUE_TIMEOUT", default_value_t = 20)]
    queue_timeout: u64,
    /// Requests run at once, for all users (one per user at a time).
    #[arg(long, env = "ASD_HELPER_MAX_REQUESTS", default_value_t = 16)]
    max_requests: usize,
    /// Seconds a connection may stay silent before it is closed.
    #[arg(long, env = "ASD_HELPER_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds one request may take.
    #[arg(long, env = "ASD_HELPER_REQUEST_TIMEOUT", default_value_t = 10)]
    request_timeout: u64,
    /// Exit after this many idle seconds (default: 60 when socket-activated, never otherwise).
    #[arg(long, env = "ASD_HELPER_EXIT_IDLE")]
    exit_idle: Option<u64>,
}

const SD_LISTEN_FDS_START: RawFd = 3;

/// Descriptors a running request may hold at once: the target, its parent, the backup, the
/// volatile dir, a mount's descriptor, the caller's pidfd and the connection to the system bus.
const FDS_PER_REQUEST: u64 = 8;
/// Descriptors for everything else: the listener, the records, the log, refusals in progress.
const FDS_RESERVED: u64 = 128 + server::MAX_REFUSING as u64;

/// Raises the soft limit on open descriptors to the hard one (systemd starts services with
/// 1024, far fewer than a login storm's connections need) and fits the waiting connections into
/// what there is, so that a storm finds the helper at its documented limits, not at EMFILE.
fn fit_descriptors(limits: &mut server::Limits) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum) {
        if cur < max {
            lim.current = Some(max);
            match setrlimit(Resource::Nofile, lim) {
                Ok(()) => tracing::debug!("open files: raised the soft limit from {cur} to {max}"),
                Err(e) => {
                    tracing::debug!("open files: cannot raise the soft limit {cur}: {e}");
                    lim.current = Some(cur);
                }
            }
        }
    }
    let Some(have) = lim.current else {
        return; // unlimited
    };
    // A socket each, and what the requests running at once hold.
    let served = (limits.total as u64)
        .saturating_add((limits.requests as u64).saturating_mul(FDS_PER_REQUEST));
    let room = have.saturating_sub(served.saturating_add(FDS_RESERVED));
    if (limits.queue as u64) > room {
        let queue = usize::try_from(room).unwrap_or(usize::MAX);
        tracing::warn!(
            "open files limited to {have}: {} connections served at once need about {}, so only {queue} \
             (not {}) may wait for a place; raise LimitNOFILE= of asd-helper.service or lower --max-connections",
            limits.total,
            served.saturating_add(FDS_RESERVED),
            limits.queue
        );
        limits.queue = queue;
    }
}

/// The listening socket passed by systemd, if any (LISTEN_PID must be us, LISTEN_FDS ≥ 1).
fn systemd_socket() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = fds.trim().parse().context("LISTEN_FDS")?;
    // Do not pass them on to anything we might start.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if n < 1 {
        return Ok(None);
    }
    if n > 1 {
        tracing::warn!("systemd passed {n} sockets; using the first");
    }
    let fd = SD_LISTEN_FDS_START;
    let check = |opt: libc::c_int| -> anyhow::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for the kernel to write; fd 3 is ours by the
        // socket-activation protocol.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            bail!("fd 3 from systemd: {}", std::io::Error::last_os_error());
        }
        Ok(v)
    };
    if check(libc::SO_DOMAIN)? != libc::AF_UNIX
        || check(libc::SO_TYPE)? != libc::SOCK_STREAM
        || check(libc::SO_ACCEPTCONN)? != 1
    {
        bail!("fd 3 from systemd is not a listening unix stream socket");
    }
    // SAFETY: fd 3 is a listening unix stream socket handed to this process (checked above);
    // nothing else in the process owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own, integer arguments only.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(listener))
}

fn bind_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            // Reachable by every user (the umask is 077 by now).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        } else {
            bail!("{} exists and is not a socket", path.display());
        }
    }
    // Created world-connectable (0666) by bind itself, so no client ever finds it with the
    // helper's umask mode 0700 (and fails with EACCES). Still one thread: the umask is ours.
    let helper_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o111));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(helper_umask);
    let l = bound.with_context(|| format!("binding {}", path.display()))?;
    Ok(l)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ASD_HELPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Root, or the asd-helper user with its capabilities (asd-helper.service): checked, with a
    // message saying which, by caps::drop_all_but_needed below.
    // Everything the helper creates for a caller gets exactly the mode it asks for.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));

    // Before any thread exists, and before the socket accepts a first connection: drop every
    // capability we do not need (binding the socket and the records need none of them).
    caps::drop_all_but_needed()?;

    let (listener, activated) = match (&args.socket, systemd_socket()?) {
        (Some(path), _) => (bind_socket(path)?, false),
        (None, Some(l)) => (l, true),
        (None, None) => (bind_socket(&asd_protocol::socket_path())?, false),
    };
    listener.set_nonblocking(true)?;
    let store = records::Store::open(&args.state_dir)
        .with_context(|| format!("state dir {}", args.state_dir.display()))?;

    tracing::info!(
        "asd-helper {} serving (effective capabilities: {:?}; permitted adds CAP_DAC_OVERRIDE, raised only to create an overlay)",
        env!("CARGO_PKG_VERSION"),
        caps::keep()
    );

    let mut limits = server::Limits {
        max_message: args.max_message,
        per_uid: args.max_connections_per_uid.max(1),
        total: args.max_connections.max(1),
        queue: args.max_queued,
        queue_wait: Duration::from_secs(args.queue_timeout.max(1)),
        requests: args.max_requests.max(1),
        idle: Duration::from_secs(args.idle_timeout.max(1)),
        request: Duration::from_secs(args.request_timeout.max(1)),
    };
    fit_descriptors(&mut limits);
    let exit_idle = match (args.exit_idle, activated) {
        (Some(0), _) => None,
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, true) => Some(Duration::from_secs(60)),
        (None, false) => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let ctx = Arc::new(ops::Ctx::new(store));
        server::serve(listener, ctx, limits, exit_idle).await
    })
}
