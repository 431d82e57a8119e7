//! Crash-recovery snapshots (DESIGN.md §3): zstd-compressed tar archives beside the target,
//! `/p/.name-backup_asd-crashrecovery-YYYYMMDD_HHMMSS.tar.zstd`, that GNU `tar -xf` extracts in
//! `/p` to recreate `name`. Written natively (tar + zstd crates): no external programs.
//!
//! asd before 6.0 kept snapshots as plain directories with the same prefix; [`list`],
//! [`enforce_limit`] and [`remove_all`] handle those too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use tracing::debug;

use crate::copy;
use crate::paths::{TargetPaths, SNAPSHOT_EXT};

/// zstd level: 3 is zstd's default, fast (hundreds of MB/s) with a good ratio.
const ZSTD_LEVEL: i32 = 3;
/// Suffix of a snapshot while it is being written (does not match [`list`]).
const PARTIAL_SUFFIX: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid top-level name {0:?} for a snapshot")]
    BadName(std::ffi::OsString),
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
}

fn ioe<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SnapshotError + 'p {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a zstd-compressed tar of `src_dir` to `out`, its members named `top_name/...`.
/// Keeps mode, owner (numeric), mtime (seconds, as tar does), symlinks (not followed), empty
/// directories, hard links within the tree, fifos and device nodes; sockets are skipped. The
/// archive is written to a temporary name beside `out`, fsync'd, renamed, and the directory
/// fsync'd, so `out` is either absent or complete. Returns the compressed size in bytes.
pub fn create(src_dir: &Path, top_name: &OsStr, out: &Path) -> Result<u64, SnapshotError> {
    let mut comps = Path::new(top_name).components();
    if !matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return Err(SnapshotError::BadName(top_name.to_os_string()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = out.as_os_str().to_os_string();
    tmp.push(PARTIAL_SUFFIX);
    let tmp = PathBuf::from(tmp);
    // A leftover from an interrupted run would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        // The snapshot holds the user's data: readable by them only.
        .mode(0o600)
        .open(&tmp)
        .map_err(ioe("create", &tmp))?;
    match write_archive(file, src_dir, None, Path::new(top_name), &tmp) {
        Ok(size) => {
            fs::rename(&tmp, out).map_err(ioe("rename", out))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(ioe("fsync", parent))?;
            debug!(?out, size, "snapshot written");
            Ok(size)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes the same archive as `create` into `file`, an already created, empty file (the manager
/// creates it where the owner may not, and the owner writes it through the descriptor). fsync'd;
/// the caller renames it into place. Returns the compressed size in bytes.
pub fn write_to(src_dir: &Path, top_name: &OsStr, file: File) -> Result<u64, SnapshotError> {
    write_start_state_to(src_dir, None, top_name, file)
}

/// [`write_to`] of the start state a start clone `clone` keeps (see `copy::keep`): its entries
/// born by the start (the clone's birth), and those of `current` (the tree the clone was made
/// of, as it is now) born by the start that the clone lacks; directories with the clone's
/// metadata where it has them. Without `current`, or where the filesystem records no birth
/// times (the clone is then a full one), the clone alone.
pub fn write_start_state_to(
    clone: &Path,
    current: Option<&Path>,
    top_name: &OsStr,
    file: File,
) -> Result<u64, SnapshotError> {
    let src_dir = clone;
    let mut comps = Path::new(top_name).components();
    if !matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return Err(SnapshotError::BadName(top_name.to_os_string()));
    }
    write_archive(
        file,
        src_dir,
        current,
        Path::new(top_name),
        Path::new("(snapshot descriptor)"),
    )
}

fn write_archive(
    file: File,
    src: &Path,
    current: Option<&Path>,
    top: &Path,
    tmp: &Path,
) -> Result<u64, SnapshotError> {
    let enc = zstd::Encoder::new(file, ZSTD_LEVEL).map_err(ioe("zstd", tmp))?;
    let mut builder = tar::Builder::new(enc);
    builder.follow_symlinks(false);
    let mut links = HashMap::new();
    let root = fs::symlink_metadata(src).map_err(ioe("lstat", src))?;
    if !root.is_dir() {
        return Err(SnapshotError::Io {
            op: "snapshot",
            path: src.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    match (current, root.created()) {
        (Some(cur), Ok(start)) => {
            let cur = fs::symlink_metadata(cur)
                .is_ok_and(|m| m.is_dir())
                .then_some(cur);
            // A damaged list: the clone's own directories' metadata, said.
            let dirs = File::open(src)
                .and_then(|d| copy::start_dirs::read(std::os::fd::AsFd::as_fd(&d)))
                .unwrap_or_else(|e| {
                    tracing::warn!("{}: start directory list: {e}", src.display());
                    copy::start_dirs::StartDirs::new()
                });
            let mut m = Merge {
                b: &mut builder,
                start,
                links: &mut links,
                dirs,
                top,
            };
            m.dir(Some(src), cur, top, &root)?;
        }
        _ => append_tree(&mut builder, src, top, &root, &mut links)?,
    }
    let enc = builder.into_inner().map_err(ioe("write", tmp))?;
    let file = enc.finish().map_err(ioe("write", tmp))?;
    file.sync_all().map_err(ioe("fsync", tmp))?;
    Ok(file.metadata().map_err(ioe("stat", tmp))?.len())
}

type Builder = tar::Builder<zstd::Encoder<'static, File>>;

fn header(meta: &fs::Metadata) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_size(0);
    h
}

/// Appends `path` (already lstat'ed as `meta`) as `name`, and below it for a directory.
/// Entries that vanish meanwhile are skipped.
fn append_tree(
    b: &mut Builder,
    path: &Path,
    name: &Path,
    meta: &fs::Metadata,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), SnapshotError> {
    let ft = meta.file_type();
    let w = |e| SnapshotError::Io {
        op: "write",
        path: path.to_path_buf(),
        source: e,
    };
    let mut h = header(meta);
    if ft.is_dir() {
        b.append_data(&mut h, name, io::empty()).map_err(w)?;
        let mut children = Vec::new();
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ioe("readdir", path)(e)),
        };
        for entry in rd {
            children.push(entry.map_err(ioe("readdir", path))?.file_name());
        }
        // Sorted: reproducible archives.
        children.sort();
        for child in children {
            let cpath = path.join(&child);
            let m = match fs::symlink_metadata(&cpath) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ioe("lstat", &cpath)(e)),
            };
            append_tree(b, &cpath, &name.join(&child), &m, links)?;
        }
    } else if ft.is_file() {
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                return b.append_link(&mut h, name, first).map_err(w);
            }
            links.insert((meta.dev(), meta.ino()), name.to_path_buf());
        }
        let file = match fs::OpenOptions::new()
            .read(true)
            // Never follow a symlink swapped in, never block on a fifo swapped in.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ioe("open", path)(e)),
        };
        h.set_size(meta.len());
        let data = ExactReader {
            inner: file.take(meta.len()),
            left: meta.len(),
        };
        b.append_data(&mut h, name, data).map_err(w)?;
    } else if ft.is_symlink() {
        let target = match fs::read_link(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ioe("readlink", path)(e)),
        };
        b.append_link(&mut h, name, target).map_err(w)?;
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        if !ft.is_fifo() {
            let dev = meta.rdev();
            h.set_device_major(libc::major(dev)).map_err(w)?;
            h.set_device_minor(libc::minor(dev)).map_err(w)?;
        }
        b.append_data(&mut h, name, io::empty()).map_err(w)?;
    } else {
        debug!(?path, "socket not included in the snapshot");
    }
    Ok(())
}

/// The start state of a start clone and its tree (see [`write_start_state_to`]).
struct Merge<'a> {
    b: &'a mut Builder,
    /// The clone's birth.
    start: std::time::SystemTime,
    links: &'a mut HashMap<(u64, u64), PathBuf>,
    /// The start directories' metadata, where the clone has a list of them.
    dirs: copy::start_dirs::StartDirs,
    /// The members' top directory (the tree's root).
    top: &'a Path,
}

impl Merge<'_> {
    /// The header of directory `name`: its start metadata where listed, else `meta`'s.
    fn dir_header(&self, name: &Path, meta: &fs::Metadata) -> tar::Header {
        let rel = name.strip_prefix(self.top).unwrap_or(name);
        let Some(d) = self.dirs.get(rel.as_os_str().as_bytes()) else {
            return header(meta);
        };
        let mut h = header(meta);
        h.set_mode(d.perm);
        h.set_uid(u64::from(d.uid));
        h.set_gid(u64::from(d.gid));
        h.set_mtime(u64::try_from(d.mtime.0).unwrap_or(0));
        h
    }

    /// There at the start (an entry without a birth time counts as such).
    fn at_start(&self, m: &fs::Metadata) -> bool {
        m.created().map_or(true, |t| t <= self.start)
    }

    /// Appends directory `name` with metadata `meta`, and below it the start entries of
    /// `kept` (a directory of the clone made by asd, whose entries take precedence) and of
    /// `cur` (a start directory of the tree).
    fn dir(
        &mut self,
        kept: Option<&Path>,
        cur: Option<&Path>,
        name: &Path,
        meta: &fs::Metadata,
    ) -> Result<(), SnapshotError> {
        let mut h = self.dir_header(name, meta);
        self.b
            .append_data(&mut h, name, io::empty())
            .map_err(ioe("write", name))?;
        let mut children = Vec::new();
        let mut cur = cur;
        for dir in [kept, cur].into_iter().flatten() {
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // A directory of the tree made unreadable since (say, `chmod 000` to keep a
                // program out): the snapshot goes on without what it holds.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied && Some(dir) == cur => {
                    tracing::warn!(
                        "{}: unreadable, its start entries are not in the snapshot",
                        dir.display()
                    );
                    cur = None;
                    continue;
                }
                Err(e) => return Err(ioe("readdir", dir)(e)),
            };
            for entry in rd {
                children.push(entry.map_err(ioe("readdir", dir))?.file_name());
            }
        }
        // Sorted: reproducible archives.
        children.sort();
        children.dedup();
        let lstat = |dir: Option<&Path>, child: &OsStr| -> Result<_, SnapshotError> {
            let Some(dir) = dir else { return Ok(None) };
            let p = dir.join(child);
            match fs::symlink_metadata(&p) {
                Ok(m) => Ok(Some((p, m))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                // In a tree directory that cannot be searched (see above).
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(None),
                Err(e) => Err(ioe("lstat", &p)(e)),
            }
        };
        for child in children {
            let cname = name.join(&child);
            // The clone's entries are the start's (a copy's birth says nothing). Temporaries
            // are no one's: the clone's leftovers, and in the tree an old version an exchange
            // moved aside (a start entry, kept in the clone before it was moved).
            if child.as_bytes().starts_with(copy::TEMP_PREFIX.as_bytes()) {
                continue;
            }
            let k = lstat(kept, &child)?;
            let c = lstat(cur, &child)?;
            match (k, c) {
                // A start directory: the clone's metadata, the start entries of both.
                (Some((kp, km)), c) if km.is_dir() => {
                    let cdir = c
                        .as_ref()
                        .filter(|(_, m)| m.is_dir())
                        .map(|(p, _)| p.as_path());
                    self.dir(Some(&kp), cdir, &cname, &km)?;
                }
                (Some((kp, km)), _) => append_tree(self.b, &kp, &cname, &km, self.links)?,
                (None, Some((cp, cm))) if self.at_start(&cm) => {
                    if cm.is_dir() {
                        self.dir(None, Some(&cp), &cname, &cm)?;
                    } else {
                        append_tree(self.b, &cp, &cname, &cm, self.links)?;
                    }
                }
                (None, _) => {}
            }
        }
        Ok(())
    }
}

/// Yields exactly `left` bytes: a file that shrank while being archived is padded with zeros
/// (a short member would corrupt every member after it); one that grew is cut.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let mut n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            buf[..max].fill(0);
            n = max;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Sort key of a snapshot name after the prefix: the stamp, then the `_N` bump (so `_10`
/// sorts after `_9`, and any bump after the plain stamp).
fn sort_key(rest: &[u8]) -> (Vec<u8>, u64) {
    let rest = rest.strip_suffix(SNAPSHOT_EXT.as_bytes()).unwrap_or(rest);
    const STAMP_LEN: usize = "YYYYMMDD_HHMMSS".len();
    if rest.len() > STAMP_LEN + 1 && rest[STAMP_LEN] == b'_' {
        let bump = &rest[STAMP_LEN + 1..];
        if bump.iter().all(u8::is_ascii_digit) {
            if let Ok(n) = std::str::from_utf8(bump).unwrap_or("").parse::<u64>() {
                return (rest[..STAMP_LEN].to_vec(), n);
            }
        }
    }
    (rest.to_vec(), 0)
}

/// The snapshots in `parent` whose name starts with `prefix`: `*.tar.zstd` files (compressed
/// size) and old-style directories (apparent size of their tree), newest first.
pub fn list(parent: &Path, prefix: &OsStr) -> Result<Vec<(PathBuf, u64)>, SnapshotError> {
    let rd = match fs::read_dir(parent) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ioe("readdir", parent)(e)),
    };
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(ioe("readdir", parent))?;
        let name = entry.file_name();
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let path = entry.path();
        // file_type() does not follow symlinks.
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ioe("lstat", &path)(e)),
        };
        let size = if ft.is_file() && rest.ends_with(SNAPSHOT_EXT.as_bytes()) {
            match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ioe("lstat", &path)(e)),
            }
        } else if ft.is_dir() {
            copy::tree_size(&path)?
        } else {
            continue;
        };
        found.push((sort_key(rest), path, size));
    }
    found.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(found.into_iter().map(|(_, p, s)| (p, s)).collect())
}

/// Deletes all but the newest `keep` snapshots; returns the deleted paths.
pub fn enforce_limit(
    parent: &Path,
    prefix: &OsStr,
    keep: usize,
) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut deleted = Vec::new();
    for (path, _) in list(parent, prefix)?.into_iter().skip(keep) {
        let res = match fs::symlink_metadata(&path) {
            // An old-style snapshot directory is deleted only by its owner: root must not walk
            // and delete a tree someone else could have put under that name. std's
            // remove_dir_all does not follow symlinks.
            Ok(m) if m.is_dir() => {
                use std::os::unix::fs::MetadataExt;
                if m.uid() != nix::unistd::geteuid().as_raw() {
                    tracing::warn!(
                        "{} belongs to uid {}: not deleted; remove it as that user",
                        path.display(),
                        m.uid()
                    );
                    continue;
                }
                fs::remove_dir_all(&path)
            }
            // Through nsops: in a parent only root may write, the helper removes it.
            Ok(_) => crate::nsops::unlink(&path).map_err(|e| e.source),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => deleted.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe("remove", &path)(e)),
        }
    }
    Ok(deleted)
}

/// Deletes every snapshot (`asd clean`); returns the deleted paths.
pub fn remove_all(parent: &Path, prefix: &OsStr) -> Result<Vec<PathBuf>, SnapshotError> {
    enforce_limit(parent, prefix, 0)
}

/// The local time as `YYYYMMDD_HHMMSS`, as asd names its snapshots.
pub fn timestamp_now() -> String {
    // SAFETY: time(NULL) only returns the current time.
    timestamp_at(unsafe { libc::time(std::ptr::null_mut()) })
}

/// `secs` (since the epoch) as local `YYYYMMDD_HHMMSS`.
pub fn timestamp_at(secs: libc::time_t) -> String {
    let now = secs;
    // SAFETY: an all-zero `struct tm` is a valid value (integers and a nullable pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant
    // and writes only into `tm`.
    let ok = !unsafe { libc::localtime_r(&now, &mut tm) }.is_null();
    if !ok {
        // Cannot happen for a real time; the fallback keeps the format.
        return "19700101_000000".to_string();
    }
    format!(
        "{:04}{:02}{:02}_{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// A snapshot path for now that does not exist yet: the plain stamp, else the stamp with
/// `_2`, `_3`, ... (still matched by [`list`], and sorted after the plain stamp).
pub fn unique_snapshot_path(paths: &TargetPaths) -> PathBuf {
    let stamp = timestamp_now();
    let free =
        |p: &Path| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound);
    let first = paths.snapshot(&stamp);
    if free(&first) {
        return first;
    }
    let mut n = 2u64;
    loop {
        let p = paths.snapshot(&format!("{stamp}_{n}"));
        if free(&p) {
            return p;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn write(p: &Path, data: &[u8]) {
        fs::write(p, data).unwrap();
    }

    fn make_tree(root: &Path) {
        fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
        fs::create_dir(root.join("empty")).unwrap();
        write(&root.join("file"), b"content\n");
        write(&root.join("name with spaces"), b"spaces");
        write(&root.join("nested/deeper/deepest/f"), &vec![7u8; 100_000]);
        write(&root.join("nested/exec"), b"#!/bin/sh\n");
        fs::set_permissions(root.join("nested/exec"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(
            root.join("nested/deeper"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let long = "l".repeat(200);
        write(&root.join(&long), b"long name");
        std::os::unix::fs::symlink("file", root.join("link")).unwrap();
        std::os::unix::fs::symlink(
            format!("/nowhere/{}", "t".repeat(150)),
            root.join("longlink"),
        )
        .unwrap();
        fs::hard_link(root.join("file"), root.join("nested/hardlink")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
    }

    /// Names, types, contents, modes, owners, mtimes (seconds) and symlink targets.
    fn tree_diff(a: &Path, b: &Path, out: &mut Vec<String>) {
        let (ma, mb) = match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
            (Ok(x), Ok(y)) => (x, y),
            _ => {
                out.push(format!("missing {}", b.display()));
                return;
            }
        };
        let d = |w: &str| format!("{w} differs: {}", b.display());
        if ma.file_type() != mb.file_type() {
            out.push(d("type"));
            return;
        }
        if (ma.mode(), ma.uid(), ma.gid()) != (mb.mode(), mb.uid(), mb.gid()) {
            out.push(d("mode/owner"));
        }
        if !ma.file_type().is_symlink() && ma.mtime() != mb.mtime() {
            out.push(d("mtime"));
        }
        if ma.is_file() && fs::read(a).unwrap() != fs::read(b).unwrap() {
            out.push(d("content"));
        }
        if ma.file_type().is_symlink() && fs::read_link(a).unwrap() != fs::read_link(b).unwrap() {
            out.push(d("target"));
        }
        if ma.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (na, nb) = (names(a), names(b));
            if na != nb {
                out.push(format!(
                    "entries differ in {}: {na:?} vs {nb:?}",
                    b.display()
                ));
            }
            for n in na.iter().filter(|n| nb.contains(n)) {
                tree_diff(&a.join(n), &b.join(n), out);
            }
        }
    }

    fn have(prog: &str) -> bool {
        let _spawn = crate::spawning();
        Command::new(prog)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn gnu_tar_extracts_what_we_write() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("target");
        fs::create_dir(&src).unwrap();
        make_tree(&src);
        let out = t
            .path()
            .join(".target-backup_asd-crashrecovery-20240101_120000.tar.zstd");
        let size = create(&src, OsStr::new("target"), &out).unwrap();
        assert_eq!(size, fs::metadata(&out).unwrap().len());
        assert!(size > 0 && size < 100_000, "compressed: {size}");
        assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
        assert!(!t
            .path()
            .join(format!("{}{PARTIAL_SUFFIX}", out.display()))
            .exists());
        if !have("tar") || !have("zstd") {
            eprintln!("GNU tar or zstd missing: extraction not checked");
            return;
        }
        // Both the explicit and the autodetecting form.
        for args in [&["--zstd", "-xf"][..], &["-xf"][..]] {
            let x = t.path().join(format!("x{}", args.len()));
            fs::create_dir(&x).unwrap();
            let st = {
                let _spawn = crate::spawning();
                Command::new("tar")
                    .args(args)
                    .arg(&out)
                    .current_dir(&x)
                    .status()
                    .unwrap()
            };
            assert!(st.success());
            let mut diffs = Vec::new();
            tree_diff(&src, &x.join("target"), &mut diffs);
            assert!(diffs.is_empty(), "{}", diffs.join("\n"));
            let ino = |p: &Path| fs::metadata(p).unwrap().ino();
            assert_eq!(
                ino(&x.join("target/file")),
                ino(&x.join("target/nested/hardlink"))
            );
            let rsync = {
                let _spawn = crate::spawning();
                Command::new("rsync")
                    .args(["-aXn", "--delete", "--itemize-changes", "--modify-window=1"])
                    .arg(format!("{}/", src.display()))
                    .arg(format!("{}/", x.join("target").display()))
                    .output()
            };
            match rsync {
                Ok(o) => {
                    assert!(o.status.success());
                    let d = String::from_utf8_lossy(&o.stdout);
                    assert!(d.is_empty(), "rsync sees differences:\n{d}");
                }
                Err(_) => eprintln!("rsync not installed: skipping the rsync comparison"),
            }
        }
    }

    #[test]
    fn bad_input_is_an_error_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("x.tar.zstd");
        assert!(matches!(
            create(t.path(), OsStr::new("a/b"), &out),
            Err(SnapshotError::BadName(_))
        ));
        assert!(create(t.path(), OsStr::new(".."), &out).is_err());
        let e = create(&t.path().join("missing"), OsStr::new("m"), &out).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!out.exists());
        assert_eq!(
            fs::read_dir(t.path()).unwrap().count(),
            0,
            "no partial file left"
        );
    }

    #[test]
    fn list_limit_and_remove() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        let prefix = OsStr::new(".x-backup_asd-crashrecovery-");
        let names = [
            "20240101_120000.tar.zstd",
            "20240101_120000_2.tar.zstd",
            "20240101_120000_10.tar.zstd",
            "20231231_235959.tar.zstd",
            "20250101_000000.tar.zstd",
        ];
        for n in names {
            write(
                &p.join(format!(".x-backup_asd-crashrecovery-{n}")),
                n.as_bytes(),
            );
        }
        // Old-style directory snapshot.
        let old = p.join(".x-backup_asd-crashrecovery-20141105_124948");
        fs::create_dir(&old).unwrap();
        write(&old.join("f"), b"12345");
        // Not snapshots.
        write(
            &p.join(".x-backup_asd-crashrecovery-20260101_000000.tar.zstd.partial"),
            b"",
        );
        write(
            &p.join(".y-backup_asd-crashrecovery-20260101_000000.tar.zstd"),
            b"",
        );
        write(&p.join(".x-backup_asd-crashrecovery-notes.txt"), b"");
        std::os::unix::fs::symlink(
            "/",
            p.join(".x-backup_asd-crashrecovery-20990101_000000.tar.zstd"),
        )
        .unwrap();

        let got = list(p, prefix).unwrap();
        let short: Vec<String> = got
            .iter()
            .map(|(path, _)| {
                let n = path.file_name().unwrap().to_string_lossy().into_owned();
                n.trim_start_matches(".x-backup_asd-crashrecovery-")
                    .to_string()
            })
            .collect();
        assert_eq!(
            short,
            [
                "20250101_000000.tar.zstd",
                "20240101_120000_10.tar.zstd",
                "20240101_120000_2.tar.zstd",
                "20240101_120000.tar.zstd",
                "20231231_235959.tar.zstd",
                "20141105_124948",
            ]
        );
        assert_eq!(got[0].1, 24);
        let dir_size = got[5].1;
        assert!(dir_size >= 5, "{dir_size}");

        let deleted = enforce_limit(p, prefix, 2).unwrap();
        assert_eq!(deleted.len(), 4);
        assert!(!old.exists());
        assert_eq!(list(p, prefix).unwrap().len(), 2);
        assert_eq!(enforce_limit(p, prefix, 5).unwrap().len(), 0);
        assert_eq!(remove_all(p, prefix).unwrap().len(), 2);
        assert!(list(p, prefix).unwrap().is_empty());
        // The rest is untouched.
        assert_eq!(fs::read_dir(p).unwrap().count(), 4);
        assert!(list(&p.join("nope"), prefix).unwrap().is_empty());
    }

    #[test]
    fn timestamps_and_unique_paths() {
        let s = timestamp_now();
        assert_eq!(s.len(), 15, "{s}");
        assert!(s.bytes().enumerate().all(|(i, c)| if i == 8 {
            c == b'_'
        } else {
            c.is_ascii_digit()
        }));
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        let paths = TargetPaths::new(&target, "u", Path::new("/tmp")).unwrap();
        let prefix = paths.snapshot_prefix();
        let first = unique_snapshot_path(&paths);
        write(&first, b"1");
        let second = unique_snapshot_path(&paths);
        assert_ne!(first, second);
        write(&second, b"2");
        let third = unique_snapshot_path(&paths);
        write(&third, b"3");
        let got: Vec<PathBuf> = list(t.path(), &prefix)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(got, [third, second, first], "newest first");
    }
}
