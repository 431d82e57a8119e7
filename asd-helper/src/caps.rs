//! Drops every capability the helper does not need, before any thread is started (capabilities
//! are per thread; threads inherit them from the one that creates them).
//!
//! Kept, and why:
//! - `CAP_SYS_ADMIN`: `open_tree`, `move_mount`, `fsopen`/`fsconfig`/`fsmount`, `mount_setattr`
//!   and `umount2` — the mounts themselves.
//! - `CAP_SETUID`, `CAP_SETGID`: `setfsuid`/`setfsgid`/`setgroups` on the worker thread of a
//!   request, so that paths are resolved, permissions checked, directories created and the
//!   overlay run with the caller's identity instead of root's.
//! - `CAP_CHOWN`: handing the caller the backup dir the helper creates as root next to a target
//!   whose parent the caller cannot write (a target outside home, allowed by polkit).
//! - `CAP_DAC_OVERRIDE`, permitted but not effective: overlayfs needs it in its mounter
//!   credentials (its `work/work` dir is mode 0000). It is raised on one worker thread for the
//!   one `fsconfig(FSCONFIG_CMD_CREATE)` call that creates an overlay, and lowered right after;
//!   the rest of the time the helper cannot see past file permissions.
//!
//! Not kept, notably: `CAP_DAC_READ_SEARCH` (the helper looks at the caller's files as the
//! caller), `CAP_FOWNER`, `CAP_MKNOD`, `CAP_KILL`, `CAP_SYS_PTRACE`, `CAP_NET_*`, `CAP_SETPCAP`
//! (dropped last). The bounding, inheritable and ambient sets are emptied likewise (the bounding
//! set keeps the permitted ones), and `no_new_privs` is set.

use anyhow::{bail, Context};
use caps::{CapSet, Capability, CapsHashSet};

/// The effective set the helper runs with.
pub fn keep() -> CapsHashSet {
    [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_CHOWN,
    ]
    .into_iter()
    .collect()
}

/// The permitted set: the effective one plus what is raised only for a moment.
pub fn permitted() -> CapsHashSet {
    let mut p = keep();
    p.insert(Capability::CAP_DAC_OVERRIDE);
    p
}

pub fn drop_all_but_needed() -> anyhow::Result<()> {
    let keep = keep();
    let wanted = permitted();
    let have = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if let Some(missing) = wanted.iter().find(|c| !have.contains(c)) {
        bail!("asd-helper must run as root with {missing} (it has {have:?})");
    }
    // Bounding set first: that needs CAP_SETPCAP, which goes with the rest below.
    let bounding = caps::read(None, CapSet::Bounding).context("reading the bounding set")?;
    for cap in bounding.difference(&wanted) {
        caps::drop(None, CapSet::Bounding, *cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).context("clearing inheritable")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &wanted).context("setting permitted capabilities")?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!(
            "prctl(PR_SET_NO_NEW_PRIVS): {}",
            std::io::Error::last_os_error()
        );
    }
    let now = caps::read(None, CapSet::Effective)?;
    if now != keep {
        bail!("capabilities not dropped as expected: {now:?}");
    }
    Ok(())
}
