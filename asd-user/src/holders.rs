//! Which processes hold a directory or a mount (issue 8, item 6).
//!
//! At sync, a program that already uses a target (a file open in it, its working or root
//! directory there, a file of it mapped) would go on writing to the disk underneath the cover,
//! and unsync would later write the RAM copy over that. At unsync, a copy of the cover in another
//! mount namespace (a sandbox, a service's private namespace, an `unshare -m` shell) outlives
//! ours, and whatever is written there goes into the RAM copy that unsync then deletes.
//!
//! Everything is read from /proc, for the processes asd may read: as a user, the user's own; as
//! root, all of them. Files are compared as places inside their filesystem (the device of their
//! mount, and the mount's root joined with the rest of the path), so a target reached through a
//! bind mount elsewhere, or from another mount namespace, is recognised too.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mountfd::LastLink;

use crate::mountinfo::{self, MountEntry};

/// How long `asd sync` waits for programs to stop using a target before refusing it;
/// `ASD_SYNC_BUSY_WAIT` (seconds) overrides it.
pub const SYNC_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(200);
/// How many programs a message names; the rest are counted.
const NAMED: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum HoldersError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not found in this mount namespace's mount table", path.display())]
    NoMount { path: PathBuf },
    #[error(
        "in use by {}: programs that have it open would go on writing to the disk underneath \
         the RAM copy, and unsync would write the RAM copy over that; close them and run \
         `asd sync` again",
        names(.holders)
    )]
    InUse { holders: Vec<Holder> },
    #[error(
        "still reachable from another mount namespace (a sandbox such as flatpak or bwrap, a \
         service started with PrivateTmp= or ProtectHome=, an `unshare -m` shell) by {}: what \
         they write there would be lost with the RAM copy. The data has been written back and \
         stays in RAM; close them (or leave the sandbox) and run `asd unsync` again",
        names(.holders)
    )]
    Elsewhere { holders: Vec<Holder> },
    #[error("{source} (in use by {})", names(.holders))]
    Busy {
        holders: Vec<Holder>,
        #[source]
        source: crate::mount::MountError,
    },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> HoldersError + 'a {
    move |source| HoldersError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A process that holds a directory or a copy of a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// What ties it there (for the debug log): "working directory", "open file /p/x", ...
    pub how: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)
    }
}

/// "a (pid 1), b (pid 2) and 3 more".
pub fn names(holders: &[Holder]) -> String {
    let mut s = holders
        .iter()
        .take(NAMED)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if holders.len() > NAMED {
        s.push_str(&format!(" and {} more", holders.len() - NAMED));
    }
    s
}

/// The wait before refusing a busy target at sync: `ASD_SYNC_BUSY_WAIT` seconds, else
/// [`SYNC_WAIT`].
pub fn sync_wait() -> Duration {
    std::env::var("ASD_SYNC_BUSY_WAIT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(SYNC_WAIT, Duration::from_secs)
}

/// Waits up to `wait` for every process to stop using `dir`; then refuses with their names.
pub fn wait_until_unused(dir: &Path, wait: Duration) -> Result<(), HoldersError> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        let holders = open_in(dir)?;
        if holders.is_empty() {
            return Ok(());
        }
        for h in &holders {
            tracing::debug!("{}: {h} holds it: {}", dir.display(), h.how);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HoldersError::InUse { holders });
        }
        if !said {
            tracing::info!(
                "{}: in use by {}; waiting up to {} s for them to finish",
                dir.display(),
                names(&holders),
                wait.as_secs()
            );
            said = true;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// Refuses when a copy of the mount on `target` in another mount namespace would stay after
/// ours is unmounted, naming the processes in those namespaces.
pub fn refuse_copies_elsewhere(target: &Path) -> Result<(), HoldersError> {
    let holders = copies_elsewhere(target)?;
    if holders.is_empty() {
        return Ok(());
    }
    for h in &holders {
        tracing::debug!("{}: {h}: {}", target.display(), h.how);
    }
    Err(HoldersError::Elsewhere { holders })
}

fn our_table() -> Result<Vec<MountEntry>, HoldersError> {
    mountinfo::read_at(Path::new("/proc/self"))
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))
}

/// Where `path` (seen through the mount `m`) lies inside m's filesystem.
fn in_fs(m: &MountEntry, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(&m.mount_point).ok()?;
    Some(if rel.as_os_str().is_empty() {
        m.root.clone()
    } else {
        m.root.join(rel)
    })
}

/// The mount `path` lies on, in our table.
fn mount_of<'a>(path: &Path, ours: &'a [MountEntry]) -> Result<&'a MountEntry, HoldersError> {
    let id = mountfd::mount_id_of_path(path, LastLink::NoFollow)
        .map_err(|e| io_err("statx", path)(e.into()))?;
    ours.iter()
        .find(|m| m.id == id)
        .ok_or_else(|| HoldersError::NoMount {
            path: path.to_path_buf(),
        })
}

/// A directory as a place inside its filesystem.
struct Place {
    dev: (u32, u32),
    path: PathBuf,
}

impl Place {
    fn holds(&self, dev: (u32, u32), path: &Path) -> bool {
        dev == self.dev && path.starts_with(&self.path)
    }
}

/// The processes in /proc; asd itself (this process, and any running the same binary: a
/// preview or a worker of it) is left out.
fn others() -> Result<Vec<u32>, HoldersError> {
    let me = std::process::id();
    let exe = |dir: &str| {
        std::fs::metadata(format!("{dir}/exe"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let my_exe = exe("/proc/self");
    let dir = Path::new("/proc");
    let rd = std::fs::read_dir(dir).map_err(io_err("read", dir))?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && (my_exe.is_none() || exe(&format!("/proc/{pid}")) != my_exe))
        .collect())
}

/// The first line of the mount table of the process at `proc_dir` (without reading the rest).
fn first_mount(proc_dir: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(proc_dir.join("mountinfo")).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            return Some(buf);
        }
    }
    None
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .unwrap_or_else(|_| "?".into())
}

/// One process being examined; its own mount table is read only when needed.
struct Proc<'a> {
    dir: PathBuf,
    ours: &'a [MountEntry],
    our_ns: &'a Option<PathBuf>,
    theirs: Option<Vec<MountEntry>>,
}

impl Proc<'_> {
    fn theirs(&mut self) -> &[MountEntry] {
        let dir = &self.dir;
        self.theirs
            .get_or_insert_with(|| mountinfo::read_at(dir).unwrap_or_default())
    }

    /// The mount with this id: ours (it is in our namespace, and its paths read as ours do),
    /// else one of the process's namespace.
    fn mount(&mut self, id: u64) -> Option<MountEntry> {
        let find = |t: &[MountEntry]| t.iter().find(|m| m.id == id).cloned();
        find(self.ours).or_else(|| find(self.theirs()))
    }

    /// Whether the magic link (cwd, root, fd/N) points into `place`.
    fn link_in(&mut self, link: &Path, place: &Place) -> bool {
        let Ok(to) = std::fs::read_link(link) else {
            return false;
        };
        // socket:[N], pipe:[N], anon_inode:...: not files in a directory.
        if !to.has_root() {
            return false;
        }
        let Ok(id) = mountfd::mount_id_of_path(link, LastLink::Follow) else {
            return false;
        };
        // A deleted file reads "PATH (deleted)": its directory still counts, and the prefix
        // test is about directories, so the suffix can stay.
        self.mount(id)
            .and_then(|m| Some((m.dev, in_fs(&m, &to)?)))
            .is_some_and(|(dev, p)| place.holds(dev, &p))
    }

    /// A file of `place` mapped into the process (a program or library run from it).
    fn maps_in(&mut self, place: &Place) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.dir.join("maps")).ok()?;
        // maps has no mount ids: its paths read as from our root for a process of our mount
        // namespace, else as from the process's own.
        let same_ns = self.our_ns.is_some()
            && std::fs::read_link(self.dir.join("ns/mnt")).ok() == *self.our_ns;
        let mut seen = HashSet::new();
        for line in text.lines() {
            // address perms offset dev inode path (the path may hold spaces)
            let mut rest = line;
            let mut fields = [""; 5];
            for f in fields.iter_mut() {
                rest = rest.trim_start();
                let end = rest.find(' ').unwrap_or(rest.len());
                *f = &rest[..end];
                rest = &rest[end..];
            }
            let path = rest.trim_start();
            if fields[4] == "0" || !path.starts_with('/') || !seen.insert(path) {
                continue;
            }
            let Some(dev) = hex_dev(fields[3]) else {
                continue;
            };
            if dev != place.dev {
                continue;
            }
            let path = Path::new(path);
            let table: &[MountEntry] = if same_ns { self.ours } else { self.theirs() };
            let inside = table
                .iter()
                .filter(|m| m.dev == dev && path.starts_with(&m.mount_point))
                .max_by_key(|m| m.mount_point.as_os_str().len())
                .and_then(|m| in_fs(m, path))
                .is_some_and(|p| place.holds(dev, &p));
            if inside {
                return Some(path.to_path_buf());
            }
        }
        None
    }

    /// How the process uses `place`, if it does.
    fn holds(&mut self, place: &Place) -> Option<String> {
        for (link, how) in [("cwd", "working directory"), ("root", "root directory")] {
            if self.link_in(&self.dir.join(link), place) {
                return Some(how.into());
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.dir.join("fd")) {
            for e in rd.flatten() {
                let link = e.path();
                if self.link_in(&link, place) {
                    let to = std::fs::read_link(&link).unwrap_or_default();
                    return Some(format!("open file {}", to.display()));
                }
            }
        }
        self.maps_in(place)
            .map(|p| format!("mapped file {}", p.display()))
    }
}

/// `fe:01` (maps prints the device in hex) as (major, minor).
fn hex_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((
        u32::from_str_radix(a, 16).ok()?,
        u32::from_str_radix(b, 16).ok()?,
    ))
}

/// The processes (of those asd may read) that have `dir`, or anything inside it, open: as a
/// file descriptor, working or root directory, or mapped file; through any path and from any
/// mount namespace.
pub fn open_in(dir: &Path) -> Result<Vec<Holder>, HoldersError> {
    let ours = our_table()?;
    let m = mount_of(dir, &ours)?;
    let place = Place {
        dev: m.dev,
        path: in_fs(m, dir).ok_or_else(|| HoldersError::NoMount {
            path: dir.to_path_buf(),
        })?,
    };
    let our_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut found = Vec::new();
    let mut unreadable = 0;
    for pid in others()? {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        // Reading where another process has files open takes ptrace access: a user's own
        // processes, or root with CAP_SYS_PTRACE.
        match std::fs::read_link(dir.join("cwd")) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unreadable += 1;
                continue;
            }
            // Gone, or a kernel thread: nothing open.
            Err(_) => continue,
        }
        let mut p = Proc {
            dir,
            ours: &ours,
            our_ns: &our_ns,
            theirs: None,
        };
        if let Some(how) = p.holds(&place) {
            found.push(Holder {
                pid,
                comm: comm(pid),
                how,
            });
        }
    }
    if unreadable > 0 {
        static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let root = rustix::process::geteuid().is_root();
        if root && !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // Info, not a warning: a unit may withhold CAP_SYS_PTRACE on purpose.
            tracing::info!(
                "{unreadable} processes could not be examined (asd runs without CAP_SYS_PTRACE?): \
                 programs of theirs that have a target open are not seen"
            );
        } else {
            tracing::debug!(
                "{}: {unreadable} processes could not be examined (not ours to read)",
                dir.display()
            );
        }
    }
    Ok(found)
}

/// A mount namespace other than ours, and the processes in it.
struct Space {
    table: Vec<MountEntry>,
    pids: Vec<u32>,
}

/// The processes (of those asd may read) in other mount namespaces that hold a copy of the
/// mount on `target` which unmounting ours would leave in place.
///
/// A copy shows the same filesystem and the same directory of it or one below (copy mode: the
/// tmpfs directory bound on the target; overlay mode: the overlay, any directory). Unmounting
/// ours also takes down the copies that receive mount propagation from our mount's parent at
/// the same place (the copies systemd's services, or `unshare --propagation slave|unchanged`
/// on a shared root, get), unless something is mounted inside them; every other copy stays
/// (a namespace made private, a copy bound elsewhere).
pub fn copies_elsewhere(target: &Path) -> Result<Vec<Holder>, HoldersError> {
    let ours = our_table()?;
    let cover = mount_of(target, &ours)?.clone();
    let shows = |m: &MountEntry| m.dev == cover.dev && m.root.starts_with(&cover.root);
    // Our own mounts of it: the cover, and in overlay mode the overlay on the volatile path.
    let mine: Vec<&MountEntry> = ours.iter().filter(|m| shows(m)).collect();
    let our_ids: HashSet<u64> = ours.iter().map(|m| m.id).collect();
    let our_ns = std::fs::read_link("/proc/self/ns/mnt").ok();

    let mut spaces: Vec<Space> = Vec::new();
    let mut by_ns: HashMap<OsString, usize> = HashMap::new();
    let our_first = first_mount(Path::new("/proc/self"));
    // Namespaces found to be ours (by a process whose namespace link we could not read).
    let mut same_as_ours: HashSet<OsString> = HashSet::new();
    for pid in others()? {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let ns = std::fs::read_link(dir.join("ns/mnt"))
            .ok()
            .map(PathBuf::into_os_string);
        if ns.is_some() && ns == our_ns.clone().map(PathBuf::into_os_string) {
            continue;
        }
        // Another user's process: its namespace link is not ours to read, its mount table is.
        // The table's first line stands for its namespace: it is the namespace's root mount,
        // and no two namespaces share a mount (nor, while both live, a mount id). At a login
        // storm a thousand users' processes share a few namespaces: one full read of a table
        // per namespace, not per process (per process, 1,000 managers each reading 1,000
        // tables of 2,000 mounts kept two CPUs busy for 25 minutes).
        let key = match ns {
            Some(n) => n,
            None => {
                let Some(first) = first_mount(&dir) else {
                    continue;
                };
                if our_first.as_ref() == Some(&first) {
                    continue;
                }
                let mut key = OsString::from("first mount ");
                key.push(std::ffi::OsStr::from_bytes(&first));
                key
            }
        };
        if same_as_ours.contains(&key) {
            continue;
        }
        if let Some(&i) = by_ns.get(&key) {
            spaces[i].pids.push(pid);
            continue;
        }
        let Ok(table) = mountinfo::read_at(&dir) else {
            continue;
        };
        if table.is_empty() {
            // Gone meanwhile: nothing learnt about its namespace.
            continue;
        }
        // Mount ids belong to one namespace: any of ours in it means it is ours.
        if table.iter().any(|m| our_ids.contains(&m.id)) {
            same_as_ours.insert(key);
            continue;
        }
        by_ns.insert(key, spaces.len());
        if table.iter().any(&shows) {
            spaces.push(Space {
                table,
                pids: vec![pid],
            });
        } else {
            // Nothing of ours there; remembered so its other processes are skipped.
            spaces.push(Space {
                table: Vec::new(),
                pids: Vec::new(),
            });
        }
    }

    // MountEntry propagation: the peer groups of slaves, by the group they receive from.
    let mut slave_groups: HashMap<u32, Vec<u32>> = HashMap::new();
    for m in ours
        .iter()
        .chain(spaces.iter().flat_map(|s| s.table.iter()))
    {
        if let (Some(shared), Some(master)) = (m.shared, m.master) {
            slave_groups.entry(master).or_default().push(shared);
        }
    }
    let receivers = |group: u32| {
        let mut seen = HashSet::from([group]);
        let mut todo = vec![group];
        while let Some(g) = todo.pop() {
            for s in slave_groups.get(&g).into_iter().flatten() {
                if seen.insert(*s) {
                    todo.push(*s);
                }
            }
        }
        seen
    };
    // Does unmounting `o` (ours) take the copy `k` (in `table`) down with it?
    let goes_with = |k: &MountEntry, table: &[MountEntry], o: &MountEntry| {
        let Some(p) = ours.iter().find(|m| m.id == o.parent) else {
            return false;
        };
        let Some(group) = p.shared else {
            return false;
        };
        let Some(kp) = table.iter().find(|m| m.id == k.parent) else {
            return false;
        };
        let groups = receivers(group);
        let receives = kp.shared.is_some_and(|g| groups.contains(&g))
            || kp.master.is_some_and(|g| groups.contains(&g));
        let same_place = kp.dev == p.dev
            && in_fs(kp, &k.mount_point).is_some()
            && in_fs(kp, &k.mount_point) == in_fs(p, &o.mount_point);
        // A mount inside the copy (not one stacked on all of it) keeps it in place.
        let bare = !table
            .iter()
            .any(|c| c.parent == k.id && c.mount_point != k.mount_point);
        receives && same_place && bare
    };

    let mut found = Vec::new();
    for s in &spaces {
        let stays: Vec<&MountEntry> = s
            .table
            .iter()
            .filter(|k| shows(k) && !mine.iter().any(|o| goes_with(k, &s.table, o)))
            .collect();
        let Some(first) = stays.first() else {
            continue;
        };
        for &pid in &s.pids {
            found.push(Holder {
                pid,
                comm: comm(pid),
                how: format!(
                    "its mount namespace has a copy of the mount on {} at {}",
                    target.display(),
                    first.mount_point.display()
                ),
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_inside_the_filesystem() {
        let m = mountinfo::parse("168 148 254:0 /var/tmp /mnt rw - ext4 /dev/vda rw\n");
        let e = &m[0];
        assert_eq!(
            in_fs(e, Path::new("/mnt/t/f")),
            Some(PathBuf::from("/var/tmp/t/f"))
        );
        assert_eq!(in_fs(e, Path::new("/mnt")), Some(PathBuf::from("/var/tmp")));
        assert_eq!(in_fs(e, Path::new("/other")), None);
        let place = Place {
            dev: (254, 0),
            path: PathBuf::from("/var/tmp/t"),
        };
        assert!(place.holds((254, 0), Path::new("/var/tmp/t/f (deleted)")));
        assert!(place.holds((254, 0), Path::new("/var/tmp/t")));
        assert!(!place.holds((254, 0), Path::new("/var/tmp/tt/f")));
        assert!(!place.holds((254, 0), Path::new("/var/tmp/t (deleted)")));
        assert!(!place.holds((254, 1), Path::new("/var/tmp/t/f")));
        assert_eq!(hex_dev("fe:01"), Some((254, 1)));
    }

    #[test]
    fn names_are_counted_past_the_limit() {
        let h: Vec<Holder> = (1..=10)
            .map(|pid| Holder {
                pid,
                comm: "sh".into(),
                how: String::new(),
            })
            .collect();
        assert_eq!(names(&h[..2]), "sh (pid 1), sh (pid 2)");
        assert!(names(&h).ends_with("sh (pid 8) and 2 more"));
    }
}
