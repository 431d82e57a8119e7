//! The mount table (`mountinfo`, proc(5)): which mounts exist, and what lies on or beneath a
//! path.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The classic mount id (`statx` `STATX_MNT_ID` gives the same number).
    pub id: u64,
    pub parent: u64,
    /// `major:minor` of the mounted filesystem.
    pub dev: (u32, u32),
    /// The directory inside the filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// The per-mount options, comma-separated (`rw,nosuid,nodev,relatime`).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Propagation: the peer group this mount shares with (`shared:N`), and the one it
    /// receives from as a slave (`master:N`).
    pub shared: Option<u32>,
    pub master: Option<u32>,
}

impl MountEntry {
    /// Whether the per-mount option `name` (`nosuid`, `ro`, ...) is set.
    pub fn has_option(&self, name: &str) -> bool {
        self.options.split(',').any(|o| o == name)
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` (three octal digits); anything
/// else that looks like an escape but is not one (`\400` and above) is kept as it is.
fn unescape(field: &str) -> OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
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
    let options = parts.next()?.to_string();
    // Optional fields up to the "-" separator.
    let (mut shared, mut master) = (None, None);
    loop {
        let p = parts.next()?;
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
        options,
        fs_type,
        source,
        shared,
        master,
    })
}

/// The entries of mountinfo text; lines that are not mountinfo lines are left out.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mount table of the namespace of the process whose /proc directory is `proc_dir`, as seen
/// from its root.
pub fn read_at(proc_dir: &Path) -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string(proc_dir.join("mountinfo"))?))
}

/// The mount table of the calling thread's mount namespace: the one its paths and mount ids
/// are in (`/proc/self` would be the main thread's, which a thread that entered a namespace of
/// its own does not share).
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    read_at(Path::new("/proc/thread-self"))
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
    use crate::testns;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn parses_escapes_and_optional_fields() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 36 0:50 / /tmp rw shared:2 - tmpfs tmpfs rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/mnt/a b"));
        assert_eq!(m[0].root, Path::new("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].options, "rw,noatime");
        assert!(m[0].has_option("noatime") && !m[0].has_option("noat"));
        assert_eq!(m[1].dev, (0, 50));
        assert!(is_mount_point(&m, Path::new("/tmp")));
        assert_eq!(mounts_below(&m, Path::new("/mnt")).len(), 1);
        assert_eq!(containing(&m, Path::new("/tmp/x")).map(|e| e.id), Some(40));
    }

    #[test]
    fn parses_propagation_fields() {
        let t = "92 90 254:0 / / rw,relatime shared:24 - ext4 /dev/vda rw\n\
                 140 92 0:43 /asd-root/d/t /d/t rw,nosuid shared:46 master:3 - tmpfs v rw\n\
                 141 115 0:43 /a\\040b /x rw - tmpfs v rw\n\
                 142 92 0:44 / /y rw shared:7 propagate_from:2 unbindable - tmpfs v rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 4);
        assert_eq!((m[0].shared, m[0].master), (Some(24), None));
        assert_eq!((m[1].shared, m[1].master), (Some(46), Some(3)));
        assert_eq!((m[2].shared, m[2].master), (None, None));
        assert_eq!(m[2].root, Path::new("/a b"));
        assert_eq!((m[3].shared, m[3].fs_type.as_str()), (Some(7), "tmpfs"));
    }

    #[test]
    fn tricky_lines() {
        let t = concat!(
            // Newline, tab and backslash in a mount point; an escape at the very end.
            "50 1 0:60 / /m/a\\012b\\011c\\134d\\040 rw - tmpfs none rw\n",
            // Ids beyond 32 bits never occur in mountinfo, but big ones do.
            "2147483647 50 0:61 / /big rw - tmpfs none rw\n",
            // An empty source (`mount -t tmpfs '' DIR`) leaves two spaces.
            "51 1 0:62 / /empty-src rw - tmpfs  rw\n",
            // Not escapes: out of octal range, too short, non-octal digits.
            "52 1 0:63 / /x\\400\\12\\089 rw - tmpfs none rw\n",
            // Broken lines: no separator, too few fields, a dev without a colon.
            "53 1 0:64 / /nosep rw tmpfs none rw\n",
            "54 1 0:65 /\n",
            "55 1 065 / /nodev rw - tmpfs none rw\n",
            "\n",
        );
        let m = parse(t);
        assert_eq!(m.len(), 4, "{m:#?}");
        assert_eq!(m[0].mount_point.as_os_str().as_bytes(), b"/m/a\nb\tc\\d ");
        assert_eq!(m[1].id, 2_147_483_647);
        assert_eq!(m[1].parent, 50);
        assert_eq!((m[2].fs_type.as_str(), m[2].source.as_str()), ("tmpfs", ""));
        assert_eq!(m[3].mount_point.as_os_str().as_bytes(), b"/x\\400\\12\\089");
    }

    #[test]
    fn a_real_mount_with_a_tricky_name_is_read_back() {
        // A directory name with every character mountinfo escapes, mounted on, then found in
        // this thread's own table by the id statx gives for it.
        testns::run(|dir| {
            let tricky = dir.join("a b\tc\nd\\e\\040f");
            std::fs::create_dir(&tricky).expect("mkdir");
            testns::mount_tmpfs(&tricky, "mountfd-test");
            let fd = crate::open_dir(&tricky).expect("open");
            let (id, root) = crate::mount_of(&fd).expect("mount_of");
            assert!(root);
            let table = read().expect("mountinfo");
            let entry = table.iter().find(|m| m.id == id.id).expect("listed");
            assert_eq!(entry.mount_point, tricky);
            assert_eq!(entry.fs_type, "tmpfs");
            assert_eq!(entry.source, "mountfd-test");
            assert_eq!(mounts_at(&table, &tricky).len(), 1);
            assert_eq!(
                containing(&table, &tricky.join("x")).map(|m| m.id),
                Some(id.id)
            );
            assert_eq!(mounts_below(&table, dir).len(), 1);
            let by_path = crate::mount_id_of_path(&tricky, crate::LastLink::NoFollow);
            assert_eq!(by_path, Ok(id.id));
        });
    }
}
