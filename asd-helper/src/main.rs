//! asd-helper: the small root helper that performs mounts for unprivileged asd managers.
//! Not implemented yet (see the helper issue); refuses to run rather than pretending.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("asd-helper is not implemented yet; run asd as root for the system-wide mode")
}
