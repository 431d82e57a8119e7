//! What the helper mounted for whom, kept under the state dir (default /run/asd/helper, private
//! to the helper) as one JSON file per uid, written to a temporary name and renamed into place.
//! A helper that exited when idle, or was restarted, reads them back; after a reboot they are
//! gone with the mounts (/run is a tmpfs).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use asd_protocol::Mode;
use serde::{Deserialize, Serialize};

use crate::sys::MountId;

/// Identity of a directory (to recognise the one the helper created or checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
}

impl DirId {
    pub fn of(st: &rustix::fs::Stat) -> DirId {
        #[allow(clippy::unnecessary_cast)]
        DirId {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaRecord {
    pub volatile: PathBuf,
    pub path: PathBuf,
    pub dir: DirId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub target: PathBuf,
    pub mode: Mode,
    pub target_dir: DirId,
    pub backup: PathBuf,
    /// Set when the helper created the backup dir (then Detach removes it if empty).
    pub backup_created: Option<DirId>,
    pub backup_mount: Option<MountId>,
    pub volatile: PathBuf,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub overlay_mount: Option<MountId>,
    pub cover_mount: Option<MountId>,
    /// The helper made the cover read-only (Freeze); covers are made writable, so
    /// Freeze(false) makes it writable again whatever this says (a freeze recorded by no one).
    #[serde(default)]
    pub frozen: bool,
}

impl MountRecord {
    pub fn is_empty(&self) -> bool {
        self.backup_mount.is_none() && self.overlay_mount.is_none() && self.cover_mount.is_none()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub uid: u32,
    pub user: String,
    pub area: Option<AreaRecord>,
    pub mounts: Vec<MountRecord>,
}

impl UserRecord {
    pub fn find(&self, target: &Path) -> Option<&MountRecord> {
        self.mounts.iter().find(|m| m.target == target)
    }

    pub fn find_mut(&mut self, target: &Path) -> Option<&mut MountRecord> {
        self.mounts.iter_mut().find(|m| m.target == target)
    }
}

/// The record files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating, 0700) the state dir. It must be a real directory owned by root.
    pub fn open(dir: &Path) -> io::Result<Store> {
        if let Some(parent) = dir.parent() {
            if !parent.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
                fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
            }
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let md = fs::symlink_metadata(dir)?;
        use std::os::unix::fs::MetadataExt;
        // Root's, or the helper's own user's (asd-helper.service makes it as its
        // RuntimeDirectory).
        let me = rustix::process::geteuid().as_raw();
        if !md.is_dir() || md.uid() != me {
            return Err(io::Error::other(format!(
                "state dir {} is not a directory owned by uid {me} (the helper's)",
                dir.display()
            )));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self, uid: u32) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// The record of `uid` (empty if none).
    pub fn load(&self, uid: u32) -> io::Result<UserRecord> {
        match fs::read(self.file(uid)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record of uid {uid}: {e}"),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UserRecord {
                uid,
                ..UserRecord::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// Writes the record of `uid` (temp + fsync + rename + fsync of the dir); removes the file
    /// when nothing is left in it.
    pub fn save(&self, rec: &UserRecord) -> io::Result<()> {
        let path = self.file(rec.uid);
        if rec.area.is_none() && rec.mounts.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.uid));
        let bytes = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_vanish_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let mut rec = store.load(1000).unwrap();
        assert!(rec.mounts.is_empty() && rec.area.is_none());
        rec.user = "alice".into();
        rec.mounts.push(MountRecord {
            target: "/home/alice/x".into(),
            mode: Mode::Copy,
            target_dir: DirId { dev: 1, ino: 2 },
            backup: "/home/alice/.x-backup_asd".into(),
            backup_created: Some(DirId { dev: 1, ino: 3 }),
            backup_mount: Some(MountId {
                id: 40,
                unique: 1 << 33,
            }),
            volatile: "/dev/shm/asd-alice/home/alice/x".into(),
            upper: None,
            work: None,
            overlay_mount: None,
            cover_mount: None,
            frozen: false,
        });
        store.save(&rec).unwrap();
        assert_eq!(store.load(1000).unwrap(), rec);
        rec.mounts.clear();
        store.save(&rec).unwrap();
        assert!(!dir.path().join("state/1000.json").exists());
    }
}
