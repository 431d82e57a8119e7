//! Drops every capability the helper does not need, before any thread is started (capabilities
//! are per thread; threads inherit them from the one that creates them).
//!
//! Under systemd the helper runs as its own system user `asd-helper`, not root, with exactly
//! these capabilities given as ambient ones (asd-helper.service); started by root (tests,
//! `--socket`), it drops the rest itself. Kept, and why:
//! - `CAP_SYS_ADMIN`: `open_tree`, `move_mount`, `fsopen`/`fsconfig`/`fsmount`, `mount_setattr`
//!   and `umount2` — the mounts themselves.
//! - `CAP_SETUID`, `CAP_SETGID`: `setfsuid`/`setfsgid`/`setgroups` on the worker thread of a
//!   request, so that paths are resolved, permissions checked, directories created and the
//!   overlay run with the caller's identity instead of the helper's.
//! - `CAP_DAC_OVERRIDE`, permitted but not effective: raised on one worker thread, with the
//!   caller's file system identity, for one call at a time: the `fsconfig(FSCONFIG_CMD_CREATE)`
//!   that creates an overlay (overlayfs needs it in its mounter credentials: its `work/work` dir
//!   is mode 0000), and the one `mkdir`/`open(O_CREAT)` that makes an entry of the caller's in a
//!   root-owned parent the caller may not write (a target outside home allowed by polkit), so
//!   that the entry is the caller's from the start ([`with_dac_override`]). The rest of the time
//!   the helper cannot see past file permissions.
//!
//! Not kept, notably: `CAP_CHOWN` (nothing is ever made as someone else and handed over; a
//! caller's entries are made with the caller's identity), `CAP_DAC_READ_SEARCH` (the helper looks
//! at the caller's files as the caller), `CAP_FOWNER`, `CAP_MKNOD`, `CAP_KILL`,
//! `CAP_SYS_PTRACE`, `CAP_NET_*`, `CAP_SETPCAP` (dropped last). The bounding, inheritable and
//! ambient sets are emptied likewise (the bounding set keeps the permitted ones), and
//! `no_new_privs` is set.

use anyhow::{bail, Context};
use caps::{CapSet, Capability, CapsHashSet};
use rustix::io::Errno;

/// The effective set the helper runs with.
pub fn keep() -> CapsHashSet {
    [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
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
        bail!(
            "asd-helper needs {missing} (it has {have:?}): run it as root, or as asd-helper.service \
             does, with CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_DAC_OVERRIDE as ambient capabilities"
        );
    }
    // Bounding set first: that needs CAP_SETPCAP, which goes with the rest below. A helper
    // started without it (as asd-helper.service starts it) must have been given no more.
    let bounding = caps::read(None, CapSet::Bounding).context("reading the bounding set")?;
    let extra: CapsHashSet = bounding.difference(&wanted).copied().collect();
    if !extra.is_empty() && !have.contains(&Capability::CAP_SETPCAP) {
        bail!("asd-helper cannot drop {extra:?} from its bounding set (no CAP_SETPCAP)");
    }
    for cap in extra {
        caps::drop(None, CapSet::Bounding, cap)
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

/// Runs `f` with `CAP_DAC_OVERRIDE` effective on this thread only, for one call that must get
/// past the permissions of a directory (see the module's documentation); lowered right after.
/// The helper aborts rather than go on with it raised.
pub fn with_dac_override<T>(f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
    caps::raise(None, CapSet::Effective, Capability::CAP_DAC_OVERRIDE).map_err(|_| Errno::PERM)?;
    let r = f();
    if caps::drop(None, CapSet::Effective, Capability::CAP_DAC_OVERRIDE).is_err() {
        tracing::error!("cannot lower CAP_DAC_OVERRIDE again; aborting");
        std::process::abort();
    }
    r
}
