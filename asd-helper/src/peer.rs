//! Who is calling: everything comes from the socket (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD)
//! and the passwd database, never from the message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::sys::FsCreds;

/// `SO_PEERPIDFD` (Linux 6.5).
const SO_PEERPIDFD: libc::c_int = 77;

/// The caller of one connection.
#[derive(Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<u32>,
    /// A pidfd of the connecting process, when the kernel provides it.
    pub pidfd: Option<OwnedFd>,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
    /// From the passwd database; `None` for a uid without an entry.
    pub user: Option<String>,
    pub home: Option<PathBuf>,
}

impl Peer {
    pub fn creds(&self) -> FsCreds {
        FsCreds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Reads the peer of a connected unix socket.
    pub fn of_socket(fd: RawFd, uid: u32, gid: u32, pid: Option<u32>) -> Peer {
        let groups = peer_groups(fd).unwrap_or_else(|_| vec![gid]);
        let pidfd = peer_pidfd(fd).ok();
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

    /// Whether the connecting process still exists (so its pid has not been reused).
    pub fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                // SAFETY: pidfd_send_signal with signal 0 only checks the process; the fd is
                // a valid pidfd borrowed for the call, the siginfo pointer may be NULL.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        0,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                // EPERM: it exists but belongs to someone else (the helper has no CAP_KILL).
                r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            }
            None => false,
        }
    }
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

/// The start time of a process (field 22 of /proc/PID/stat, in clock ticks since boot), as
/// polkit expects it in a `unix-process` subject.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces and ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    // After ')' come fields 3, 4, ...: field 22 is the 20th of them.
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other("malformed stat"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_start_time() {
        let t = super::start_time(std::process::id()).unwrap();
        assert!(t > 0);
    }
}
