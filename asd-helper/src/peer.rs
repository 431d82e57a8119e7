//! Who is calling: everything comes from the socket (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD)
//! and the passwd database, never from the message.
//!
//! The calling process is pinned by a pidfd: the one the kernel took at `connect()`
//! (SO_PEERPIDFD, Linux 6.5), or, on older kernels, one opened with `pidfd_open` on the
//! SO_PEERCRED pid as soon as the connection is accepted. A pid can be reused by another process
//! once the caller has exited; a pidfd cannot. Everything read about the caller's process (its
//! pid, its start time) is read while the pidfd shows it alive, and [`Peer::alive`] tells later
//! whether it still is, so that a decision taken about a pid is known to be about the caller.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::sys::FsCreds;

/// `SO_PEERPIDFD` (Linux 6.5).
const SO_PEERPIDFD: libc::c_int = 77;

/// The caller of one connection.
#[derive(Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// From SO_PEERCRED: the process that called `connect()`.
    pub pid: Option<u32>,
    /// A pidfd of that process: from SO_PEERPIDFD, else opened on `pid` when the connection was
    /// accepted (see the module's documentation). `None` when neither worked (the process was
    /// already gone): then nothing is decided about its pid.
    pub pidfd: Option<OwnedFd>,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
    /// From the passwd database; `None` for a uid without an entry.
    pub user: Option<String>,
    pub home: Option<PathBuf>,
}

/// The calling process as polkit names it (a `unix-process` subject): read through its pidfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks since boot.
    pub start_time: u64,
}

/// Why the calling process cannot be named.
#[derive(Debug)]
pub enum ProcessError {
    /// There is no pidfd for it (it had exited before the connection was accepted, or the kernel
    /// gives none).
    NotPinned,
    /// It has exited: its pid may already belong to another process.
    Exited,
    /// Its pidfd names a process outside the helper's pid namespace, or one that is not the
    /// SO_PEERCRED pid.
    Mismatch(String),
    Unreadable(io::Error),
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::NotPinned => write!(f, "the caller process cannot be pinned (no pidfd)"),
            ProcessError::Exited => write!(f, "the caller process has exited"),
            ProcessError::Mismatch(why) => write!(f, "the caller process: {why}"),
            ProcessError::Unreadable(e) => write!(f, "the caller process: {e}"),
        }
    }
}

impl Peer {
    pub fn creds(&self) -> FsCreds {
        FsCreds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Reads the peer of a connected unix socket. Call it right after the connection is
    /// accepted: on a kernel without SO_PEERPIDFD, the pid is pinned here.
    pub fn of_socket(fd: RawFd, uid: u32, gid: u32, pid: Option<u32>) -> Peer {
        // The pidfd first: before the passwd lookup, which may take a while (NSS).
        let pidfd = peer_pidfd(fd).ok().or_else(|| pid.and_then(open_pidfd));
        let groups = peer_groups(fd).unwrap_or_else(|_| vec![gid]);
        let (user, home) = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => (Some(u.name), Some(u.dir)),
            _ => (None, None),
        };
        Peer {
            uid,
            gid,
            pid,
            pidfd,
            groups,
            user,
            home,
        }
    }

    /// Whether the connecting process has not exited, so its pid still names it. A zombie
    /// counts as exited (its pid is about to be freed). Without a pidfd: no.
    pub fn alive(&self) -> bool {
        self.pidfd.as_ref().is_some_and(pidfd_alive)
    }

    /// The calling process's pid (from its pidfd) and start time, read while the pidfd shows it
    /// alive: `/proc/PID` is opened, then the pidfd is checked, then `stat` is read through
    /// that directory, which stays the caller's even if the pid is reused afterwards.
    pub fn process(&self) -> Result<Process, ProcessError> {
        let pidfd = self.pidfd.as_ref().ok_or(ProcessError::NotPinned)?;
        let pid = pidfd_pid(pidfd)?;
        if self.pid.is_some_and(|p| p != pid) {
            return Err(ProcessError::Mismatch(format!(
                "its pidfd names pid {pid}, SO_PEERCRED pid {}",
                self.pid.unwrap_or_default()
            )));
        }
        let dir = match rustix::fs::open(
            format!("/proc/{pid}"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(d) => d,
            Err(Errno::NOENT | Errno::SRCH) => return Err(ProcessError::Exited),
            Err(e) => return Err(ProcessError::Unreadable(e.into())),
        };
        // The directory was opened for the pid the pidfd names; if that process is alive now,
        // the directory is its own (a reused pid would need it to have exited first).
        if !pidfd_alive(pidfd) {
            return Err(ProcessError::Exited);
        }
        let stat = read_at(&dir, "stat").map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) | Some(libc::ENOENT) => ProcessError::Exited,
            _ => ProcessError::Unreadable(e),
        })?;
        let start_time = parse_start_time(&stat).ok_or_else(|| {
            ProcessError::Unreadable(io::Error::other(format!("malformed /proc/{pid}/stat")))
        })?;
        Ok(Process { pid, start_time })
    }
}

fn read_at(dir: &OwnedFd, name: &str) -> io::Result<String> {
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s)?;
    Ok(s)
}

/// Whether the process behind a pidfd has not exited: a pidfd polls readable once it has.
pub fn pidfd_alive(pidfd: &impl AsFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&now)) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(Errno::INTR) => continue,
            // Not a pidfd, or no longer pollable: nothing is known to be alive.
            Err(_) => return false,
        }
    }
}

/// The pid a pidfd names, in the helper's pid namespace (the `Pid:` line of its fdinfo; -1 once
/// the process has exited, 0 outside the namespace).
fn pidfd_pid(pidfd: &OwnedFd) -> Result<u32, ProcessError> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(ProcessError::Unreadable)?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ProcessError::Mismatch("its pidfd has no Pid in fdinfo".into()))?;
    match pid {
        -1 => Err(ProcessError::Exited),
        0 => Err(ProcessError::Mismatch(
            "it is in another pid namespace".into(),
        )),
        p => {
            u32::try_from(p).map_err(|_| ProcessError::Mismatch(format!("its pidfd names pid {p}")))
        }
    }
}

/// A pidfd for `pid`, for kernels without SO_PEERPIDFD: taken right after the connection is
/// accepted, it names whatever process has that pid then — the caller, unless the caller exited
/// and its pid was reused between its `connect()` and the helper's `accept()`.
fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 1024];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes and outlives the call; the kernel writes at
    // most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    Ok(groups)
}

fn peer_pidfd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` is a valid c_int for the kernel to write into, `len` its size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// Field 22 of a `/proc/PID/stat` (start time, clock ticks since boot). The command name
/// (field 2) is in parentheses and may contain spaces and ')': fields are counted after the last
/// ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After ')' come fields 3, 4, ...: field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_of(pidfd: Option<OwnedFd>, pid: Option<u32>) -> Peer {
        Peer {
            uid: 0,
            gid: 0,
            pid,
            pidfd,
            groups: vec![],
            user: None,
            home: None,
        }
    }

    fn start_time_of(pid: u32) -> u64 {
        parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()).unwrap()
    }

    #[test]
    fn parses_field_22_after_a_command_name_with_parentheses() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("42 (x"), None);
        assert_eq!(parse_start_time("42 (x) S 1"), None);
    }

    #[test]
    fn names_a_live_process_by_its_pidfd() {
        let me = std::process::id();
        let peer = peer_of(open_pidfd(me), Some(me));
        assert!(peer.alive());
        let p = peer.process().unwrap();
        assert_eq!(p.pid, me);
        assert_eq!(p.start_time, start_time_of(me));
    }

    #[test]
    fn refuses_a_pidfd_that_is_not_the_peercred_pid() {
        let me = std::process::id();
        let peer = peer_of(open_pidfd(me), Some(me + 1));
        assert!(matches!(peer.process(), Err(ProcessError::Mismatch(_))));
    }

    #[test]
    fn an_exited_process_is_not_alive_and_is_not_named() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let peer = peer_of(open_pidfd(pid), Some(pid));
        assert!(peer.alive());
        assert_eq!(peer.process().unwrap().pid, pid);
        child.kill().unwrap();
        // Killed, not yet reaped (a zombie): exited already.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while peer.alive() {
            assert!(std::time::Instant::now() < deadline, "still alive");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(matches!(peer.process(), Err(ProcessError::Exited)));
        child.wait().unwrap();
        assert!(!peer.alive());
        assert!(matches!(peer.process(), Err(ProcessError::Exited)));
        assert!(matches!(
            peer_of(None, Some(pid)).process(),
            Err(ProcessError::NotPinned)
        ));
    }
}
