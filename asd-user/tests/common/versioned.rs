//! Trees whose every file says which version of the test wrote it: a torn file (part old, part
//! new, or cut short) matches no version, so crash tests can tell "old or new, whole" from loss.

use super::Ns;
use std::path::Path;

/// Content of file `i` in version `v`: a recognisable pattern of a size that depends on both.
pub fn content(v: u32, i: usize) -> Vec<u8> {
    let size = 2048 + (i * 7919 + v as usize * 104_729) % 60_000;
    let pat = format!("v{v}-file{i}-");
    pat.bytes().cycle().take(size).collect()
}

fn name(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("f{i}")
    } else {
        format!("sub/f{i}")
    }
}

/// Writes version `v` of `files` files into `dir`, through the namespace's view (the target may
/// be covered by a mount there). Run as root: files a user's test owns are chowned after.
pub fn write_version(ns: &Ns, dir: &Path, v: u32, files: usize) {
    let base = ns.inside(dir);
    std::fs::create_dir_all(base.join("sub")).expect("mkdir");
    for i in 0..files {
        std::fs::write(base.join(name(i)), content(v, i)).expect("write");
    }
}

/// Which version each file holds (None: missing); panics on a torn or foreign file.
pub fn versions(root: &Path, candidates: &[u32], files: usize) -> Vec<Option<u32>> {
    (0..files)
        .map(|i| {
            let name = name(i);
            match std::fs::read(root.join(&name)) {
                Ok(data) => Some(
                    *candidates
                        .iter()
                        .find(|v| content(**v, i) == data)
                        .unwrap_or_else(|| {
                            panic!("{name} is torn: {} bytes match no version", data.len())
                        }),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => panic!("{name}: {e}"),
            }
        })
        .collect()
}
