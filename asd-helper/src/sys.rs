//! The helper's own system calls: per-thread file system credentials (the caller's identity on
//! the worker thread of a request), the one capability raised for an overlay's creation, and a
//! few stat helpers. Path resolution without symlinks, mount ids and the mounts themselves are
//! in the `mountfd` crate, shared with the manager.

use std::io;
use std::os::fd::AsFd;

use rustix::fs::{FileType, Stat};
use rustix::io::Errno;

pub use mountfd::MountId;

pub fn fstat(fd: impl AsFd) -> Result<Stat, Errno> {
    rustix::fs::fstat(fd)
}

pub fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// The file system magic (`statfs.f_type`).
pub fn fs_magic(fd: impl AsFd) -> Result<u64, Errno> {
    // f_type is a signed type on some targets; the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    Ok((rustix::fs::fstatfs(fd)?.f_type as u64) & 0xffff_ffff)
}

/// Runs `create` (the `fsconfig` call that creates an overlay) with `CAP_DAC_OVERRIDE` raised
/// on this thread only: overlayfs keeps that call's credentials as its mounter credentials and
/// needs the capability in them for its work dir (it makes `work/work` mode 0000). Lowered
/// right after; if it cannot be, the helper aborts rather than go on with it.
pub fn with_dac_override(
    create: &dyn Fn() -> Result<(), mountfd::SysError>,
) -> Result<(), mountfd::SysError> {
    caps::raise(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_DAC_OVERRIDE,
    )
    .map_err(|_| mountfd::SysError {
        op: "raise CAP_DAC_OVERRIDE",
        errno: Errno::PERM,
    })?;
    let created = create();
    if caps::drop(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_DAC_OVERRIDE,
    )
    .is_err()
    {
        tracing::error!("cannot lower CAP_DAC_OVERRIDE again; aborting");
        std::process::abort();
    }
    created
}

/// The caller's file system identity, applied to one thread.
#[derive(Debug, Clone)]
pub struct FsCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn set_fs_ids(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    let groups: Vec<rustix::process::Gid> = groups
        .iter()
        .map(|&g| rustix::process::Gid::from_raw(g))
        .collect();
    // Per-thread setgroups (a raw syscall; glibc's setgroups would change every thread).
    rustix::thread::set_thread_groups(&groups)?;
    // SAFETY: setfsgid/setfsuid take plain integers and only change this thread's credentials
    // (glibc does not broadcast them to other threads). They return the previous id.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    // They report no error: read the ids back (an invalid id changes nothing and returns the
    // current one).
    // SAFETY: as above; u32::MAX (-1) is never a valid id, so these calls only query.
    let (now_uid, now_gid) = unsafe {
        (
            libc::setfsuid(u32::MAX) as u32,
            libc::setfsgid(u32::MAX) as u32,
        )
    };
    if now_uid != uid || now_gid != gid {
        return Err(io::Error::other(format!(
            "could not switch file system ids to {uid}:{gid} (now {now_uid}:{now_gid})"
        )));
    }
    // Switching the fs uid back to 0 raises every fs capability of the permitted set into the
    // effective one; CAP_DAC_OVERRIDE is only ever wanted while an overlay is created.
    if uid == 0 {
        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_DAC_OVERRIDE,
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

impl FsCreds {
    /// Runs `f` on a new thread whose file system uid, gid and groups are the caller's: every
    /// path lookup, permission check and file it creates is the caller's. The thread keeps its
    /// other capabilities (CAP_SYS_ADMIN for mounts). The thread ends with `f`, so the borrowed
    /// identity never leaks into a thread that serves someone else.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FsCreds) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = io::Result<T>> {
        let creds = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("asd-uid-{}", creds.uid))
            .spawn(move || {
                let result = set_fs_ids(creds.uid, creds.gid, &creds.groups).map(|()| f(&creds));
                let _ = tx.send(result);
            });
        async move {
            spawned?;
            rx.await
                .map_err(|_| io::Error::other("worker thread ended without a result"))?
        }
    }

    /// Runs `f` with root's file system identity on this (worker) thread, then switches back to
    /// the caller's. Used only for the few steps the caller cannot do in a directory they do
    /// not own (creating or removing the backup dir next to a target outside their home).
    pub fn as_root<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        set_fs_ids(0, 0, &[])?;
        let out = f();
        if let Err(e) = set_fs_ids(self.uid, self.gid, &self.groups) {
            // Never continue with root's identity in a caller's thread.
            tracing::error!("cannot switch back to uid {}: {e}; aborting", self.uid);
            std::process::abort();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_identity_stays_on_its_thread() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! skipped borrowed_identity_stays_on_its_thread: needs root");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let creds = FsCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let (on_worker, root_inside) = rt
            .block_on(creds.run(|c| {
                // SAFETY: u32::MAX only queries the current fs ids.
                let now = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
                // SAFETY: as above.
                let root = c.as_root(|| unsafe { libc::setfsuid(u32::MAX) }).unwrap();
                // SAFETY: as above.
                let back = unsafe { libc::setfsuid(u32::MAX) };
                (now, (root, back))
            }))
            .unwrap();
        assert_eq!(on_worker, (65534, 65534));
        assert_eq!(root_inside, (0, 65534));
        // This thread never changed.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setfsuid(u32::MAX) }, 0);
    }
}
