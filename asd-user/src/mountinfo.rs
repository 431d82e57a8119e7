//! Reading /proc/self/mountinfo: which mounts exist, and what lies beneath a path.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the mounted filesystem.
    pub dev: (u32, u32),
    /// The directory inside the filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Propagation: the peer group this mount shares with (`shared:N`), and the one it
    /// receives from as a slave (`master:N`).
    pub shared: Option<u32>,
    pub master: Option<u32>,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut parts = line.split(' ');
    let id = parts.next()?.parse().ok()?;
    let parent = parts.next()?.parse().ok()?;
    let (maj, min) = parts.next()?.split_once(':')?;
    let dev = (maj.parse().ok()?, min.parse().ok()?);
    let root = PathBuf::from(unescape(parts.next()?));
    let mount_point = PathBuf::from(unescape(parts.next()?));
    // Mount options, then optional fields up to the "-" separator.
    let (mut shared, mut master) = (None, None);
    for p in parts.by_ref().skip(1) {
        if p == "-" {
            break;
        }
        if let Some(v) = p.strip_prefix("shared:") {
            shared = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("master:") {
            master = v.parse().ok();
        }
    }
    let fs_type = parts.next()?.to_string();
    let source = unescape(parts.next()?).to_string_lossy().into_owned();
    Some(MountEntry {
        id,
        parent,
        dev,
        root,
        mount_point,
        fs_type,
        source,
        shared,
        master,
    })
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mount table of the namespace of the process whose /proc directory is `proc_dir`, as seen
/// from its root.
pub fn read_at(proc_dir: &Path) -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string(proc_dir.join("mountinfo"))?))
}

/// The current mount table of this process's mount namespace.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Mounts stacked exactly on `path`, bottom first.
pub fn mounts_at<'a>(table: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    table.iter().filter(|m| m.mount_point == path).collect()
}

pub fn is_mount_point(table: &[MountEntry], path: &Path) -> bool {
    table.iter().any(|m| m.mount_point == path)
}

/// Mounts strictly below `path` (a FUSE mount inside a target, for instance).
pub fn mounts_below<'a>(table: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    table
        .iter()
        .filter(|m| m.mount_point != path && m.mount_point.starts_with(path))
        .collect()
}

/// The mount whose filesystem holds `path` (the last, longest mount point that is a prefix).
pub fn containing<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| (m.mount_point.as_os_str().len(), m.id))
        .map(|m| {
            // With several mounts on the same point the topmost one is visible: the one whose
            // parent is another mount on that same point, i.e. the latest in the table.
            table
                .iter()
                .rev()
                .find(|x| x.mount_point == m.mount_point)
                .unwrap_or(m)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_escapes_and_optional_fields() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 36 0:50 / /tmp rw shared:2 - tmpfs tmpfs rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/mnt/a b"));
        assert_eq!(m[0].root, Path::new("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].dev, (0, 50));
        assert!(is_mount_point(&m, Path::new("/tmp")));
        assert_eq!(mounts_below(&m, Path::new("/mnt")).len(), 1);
        assert_eq!(containing(&m, Path::new("/tmp/x")).map(|e| e.id), Some(40));
    }

    #[test]
    fn parses_propagation_fields() {
        let t = "92 90 254:0 / / rw,relatime shared:24 - ext4 /dev/vda rw\n\
                 140 92 0:43 /asd-root/d/t /d/t rw,nosuid shared:46 master:3 - tmpfs v rw\n\
                 141 115 0:43 /a\\040b /x rw - tmpfs v rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].shared, m[0].master), (Some(24), None));
        assert_eq!((m[1].shared, m[1].master), (Some(46), Some(3)));
        assert_eq!((m[2].shared, m[2].master), (None, None));
        assert_eq!(m[2].root, Path::new("/a b"));
    }
}
