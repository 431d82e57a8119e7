//! Runtime state: where it lives, the lock that serialises asd commands, and the record of what
//! is synced (so resync/unsync work from the config snapshot taken at start, DESIGN.md §4).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::paths::TargetPaths;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const CONFIG_COPY: &str = "asd.conf";
/// Bumped when the state file's shape changes incompatibly.
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the runtime directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no runtime directory: XDG_RUNTIME_DIR is not set (log in through a session manager or set ASD_RUNTIME_DIR)")]
    NoRuntimeDir,
    #[error("cannot read the state file {path}: {reason}; if no asd is running, remove it and run `asd sync`, which recovers")]
    Corrupt { path: PathBuf, reason: String },
    #[error("another asd command is still running after {waited:?} (lock {path}, {holder}); try again when it has finished")]
    Busy {
        path: PathBuf,
        waited: Duration,
        holder: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a target is kept in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Copy,
    Overlay,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Overlay => "overlay",
        }
    }
}

/// How far a target got. Recovery trusts the volatile copy only once it reached `Synced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Mounts and copies are being set up; the volatile copy may be incomplete.
    Syncing,
    /// The volatile copy (or overlay) is complete and covers the target.
    Synced,
    /// Unsync wrote everything back and took the cover down: the target shows the disk again,
    /// and programs may write there. The volatile copy must never be written back over it.
    Uncovered,
}

/// Who owns a target: the identity every data operation on it runs as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    /// Supplementary groups, as `initgroups` would set them.
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetState {
    pub paths: TargetPaths,
    pub owner: Owner,
    pub mode: Mode,
    pub stage: Stage,
    /// Copy mode: the disk equalled the RAM copy at this time (taken before the last sync's cover
    /// or the last resync's walk), so a resync only compares what changed since.
    #[serde(default)]
    pub clean_since: Option<crate::copy::Timestamp>,
    /// Copy mode: when (seconds since the epoch) the disk was last compared with the RAM copy
    /// entry by entry (the initial copy counts). An incremental write-back cannot see changes
    /// made to the disk side behind asd's back, so a resync compares everything again once this
    /// is [`FULL_COMPARE_EVERY`] old.
    #[serde(default)]
    pub full_compare_at: Option<u64>,
    /// The boot-time clock when `clean_since` was taken: a wall clock set back since then
    /// makes `clean_since` useless (see [`crate::clock`]); without it, it is not trusted.
    #[serde(default)]
    pub clean_clock: Option<crate::clock::ClockMark>,
    /// The last write-back of this target by a resync: when it finished and how long it took
    /// (for `asd preview`). Absent in state files of older versions, and before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_back: Option<WriteBack>,
}

/// One finished write-back of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteBack {
    /// Seconds since the epoch when it finished (durably).
    pub at: u64,
    /// How long it took, in milliseconds.
    pub ms: u64,
}

/// How often a resync compares the whole tree instead of what changed since the last one.
pub const FULL_COMPARE_EVERY: u64 = 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub version: u32,
    pub pid: u32,
    /// Seconds since the epoch.
    pub started: u64,
    pub last_resync: Option<u64>,
    /// How long the last resync (of every target) took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_ms: Option<u64>,
    pub config_file: PathBuf,
    /// The configuration as it was at `sync`; edits to the file apply after a restart.
    pub config: Config,
    pub targets: Vec<TargetState>,
}

impl State {
    pub fn new(config_file: &Path, config: &Config) -> State {
        State {
            version: STATE_VERSION,
            pid: std::process::id(),
            started: now_secs(),
            last_resync: None,
            last_resync_ms: None,
            config_file: config_file.to_path_buf(),
            config: config.clone(),
            targets: Vec::new(),
        }
    }

    pub fn target(&self, target: &Path) -> Option<&TargetState> {
        self.targets.iter().find(|t| t.paths.target == target)
    }

    /// Insert or replace the record for `t.paths.target`.
    pub fn upsert(&mut self, t: TargetState) {
        match self
            .targets
            .iter_mut()
            .find(|x| x.paths.target == t.paths.target)
        {
            Some(slot) => *slot = t,
            None => self.targets.push(t),
        }
    }

    pub fn set_stage(&mut self, target: &Path, stage: Stage) {
        if let Some(t) = self.targets.iter_mut().find(|t| t.paths.target == target) {
            t.stage = stage;
        }
    }

    pub fn remove(&mut self, target: &Path) {
        self.targets.retain(|t| t.paths.target != target);
    }

    /// Whether the state is one asd could have written. A per-user state file lives in a
    /// directory its user can write, so it is checked before use: every recorded target must be
    /// named by the state's own config snapshot, in that snapshot's mode, with exactly the paths
    /// asd derives from it ([`TargetPaths::new`]) and, for a manager that is not root, owned by
    /// the user running it. Otherwise an edited file could steer the manager's writes (and its
    /// calls to the helper) to paths the config does not name. `euid` is the manager's.
    pub fn check(&self, euid: u32) -> Result<(), String> {
        let c = &self.config;
        plain_absolute(&c.volatile, true).map_err(|e| format!("VOLATILE {e}"))?;
        for w in &c.whattosync {
            plain_absolute(w, true).map_err(|e| format!("WHATTOSYNC {e}"))?;
        }
        if c.resync_interval < Duration::from_secs(1)
            || c.resync_interval > crate::config::MAX_RESYNC_INTERVAL
        {
            return Err(format!(
                "RESYNC_INTERVAL of {}s is out of range",
                c.resync_interval.as_secs()
            ));
        }
        let mode = if c.use_overlayfs {
            Mode::Overlay
        } else {
            Mode::Copy
        };
        for (i, t) in self.targets.iter().enumerate() {
            let target = &t.paths.target;
            let shown = target.display();
            plain_absolute(target, false).map_err(|e| format!("target {e}"))?;
            if !c.whattosync.contains(target) {
                return Err(format!("target {shown} is not in its WHATTOSYNC"));
            }
            if self.targets[..i].iter().any(|o| o.paths.target == *target) {
                return Err(format!("target {shown} is recorded twice"));
            }
            let name = &t.owner.name;
            if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
                return Err(format!(
                    "target {shown}: owner name {name:?} is not a user name"
                ));
            }
            if euid != 0 && t.owner.uid != euid {
                return Err(format!(
                    "target {shown} is recorded for uid {}, not for this user (uid {euid})",
                    t.owner.uid
                ));
            }
            if t.mode != mode {
                return Err(format!(
                    "target {shown} is recorded in {} mode, its config says {}",
                    t.mode.as_str(),
                    mode.as_str()
                ));
            }
            if TargetPaths::new(target, name, &c.volatile).as_ref() != Some(&t.paths) {
                return Err(format!(
                    "the paths recorded for target {shown} are not the ones asd derives from it"
                ));
            }
        }
        Ok(())
    }
}

/// `p` is absolute with no empty, `.` or `..` component, no trailing `/` and no NUL (what the
/// config parser produces); `/` itself only if `root_ok`.
fn plain_absolute(p: &Path, root_ok: bool) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let b = p.as_os_str().as_bytes();
    let bad = |why: &str| Err(format!("{:?} {why}", p));
    if b == b"/" {
        return if root_ok { Ok(()) } else { bad("is /") };
    }
    if !b.starts_with(b"/") {
        return bad("is not absolute");
    }
    if b.contains(&0) {
        return bad("contains a NUL byte");
    }
    if b[1..]
        .split(|c| *c == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return bad("is not normalized");
    }
    Ok(())
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The runtime directory of one manager (per user, or the system one).
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
    /// Mode for creating `dir`. The system one, /run/asd, also holds the helper's socket, which
    /// every user must reach, so it is 0755 (its files are 0600); a user's is 0700.
    dir_mode: u32,
}

/// Held for the duration of one command; released on drop (or when the process dies).
pub struct Lock {
    _flock: Flock<File>,
}

impl Runtime {
    /// `ASD_RUNTIME_DIR` if set; `/run/asd` for root; `$XDG_RUNTIME_DIR/asd` for a user.
    pub fn locate(system: bool) -> Result<Runtime, StateError> {
        if let Some(dir) = std::env::var_os("ASD_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return Ok(Runtime {
                dir: dir.into(),
                dir_mode: 0o700,
            });
        }
        if system {
            return Ok(Runtime {
                dir: PathBuf::from("/run/asd"),
                dir_mode: 0o755,
            });
        }
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => Ok(Runtime {
                dir: PathBuf::from(d).join("asd"),
                dir_mode: 0o700,
            }),
            None => Err(StateError::NoRuntimeDir),
        }
    }

    pub fn at(dir: PathBuf) -> Runtime {
        Runtime {
            dir,
            dir_mode: 0o700,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(self.dir_mode)
            .create(&self.dir)
            .map_err(|source| StateError::Dir {
                path: self.dir.clone(),
                source,
            })
    }

    /// Take the command lock, waiting up to `wait` for another asd command to finish.
    pub fn lock(&self, wait: Duration) -> Result<Lock, StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(LOCK_FILE);
        let io = |op, source| StateError::Io {
            op,
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io("open", e))?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut flock) => {
                    // Who holds it, for the message another waiting command prints.
                    let who = format!("pid {}", std::process::id());
                    let _ = flock.set_len(0);
                    let _ = flock.rewind();
                    let _ = flock.write_all(who.as_bytes());
                    return Ok(Lock { _flock: flock });
                }
                Err((f, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                    file = f;
                    let mut holder = String::new();
                    let _ = (&file).rewind();
                    let _ = (&file).take(64).read_to_string(&mut holder);
                    if start.elapsed() >= wait {
                        return Err(StateError::Busy {
                            path,
                            waited: wait,
                            holder,
                        });
                    }
                    if !told {
                        tracing::info!(
                            "another asd command ({holder}) is running; waiting for it to finish"
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, errno)) => return Err(io("lock", errno.into())),
            }
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn config_copy_path(&self) -> PathBuf {
        self.dir.join(CONFIG_COPY)
    }

    pub fn load(&self) -> Result<Option<State>, StateError> {
        let path = self.state_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let state: State = serde_json::from_slice(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!("version {} (this asd knows {STATE_VERSION})", state.version),
            });
        }
        state
            .check(nix::unistd::geteuid().as_raw())
            .map_err(|reason| StateError::Corrupt {
                path,
                reason: format!("it was not written by asd: {reason}"),
            })?;
        Ok(Some(state))
    }

    /// Write the state atomically (temp + fsync + rename): a crash leaves the old or new state.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.ensure_dir()?;
        let data = serde_json::to_vec_pretty(state).map_err(|e| StateError::Io {
            op: "encode",
            path: self.state_path(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.state_path(), &data)
    }

    /// Keep a copy of the config file text next to the state, for people to look at.
    pub fn save_config_copy(&self, text: &[u8]) -> Result<(), StateError> {
        self.ensure_dir()?;
        write_atomic(&self.config_copy_path(), text)
    }

    /// Forget everything: called when the last target was unsynced.
    pub fn clear(&self) -> Result<(), StateError> {
        for path in [self.state_path(), self.config_copy_path()] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        op: "remove",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let io = |op, source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    f.write_all(data).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file written before the write-back timings existed still loads, and one with
    /// them keeps them.
    #[test]
    fn state_files_without_write_back_timings_load() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::at(dir.path().to_path_buf());
        let cfg = Config {
            whattosync: vec![PathBuf::from("/data/t")],
            volatile: PathBuf::from("/tmp"),
            ..Config::default()
        };
        let euid = nix::unistd::geteuid().as_raw();
        let mut st = State::new(Path::new("/etc/asd.conf"), &cfg);
        st.upsert(TargetState {
            paths: TargetPaths::new(Path::new("/data/t"), "u", Path::new("/tmp")).unwrap(),
            owner: Owner {
                uid: euid,
                gid: euid,
                name: "u".into(),
                groups: vec![],
            },
            mode: Mode::Copy,
            stage: Stage::Synced,
            clean_since: None,
            full_compare_at: None,
            clean_clock: None,
            write_back: Some(WriteBack { at: 5, ms: 840 }),
        });
        st.last_resync_ms = Some(900);
        rt.save(&st).unwrap();
        assert_eq!(rt.load().unwrap(), Some(st.clone()));
        // The same file as an older asd wrote it: no timings at all.
        let mut old: serde_json::Value =
            serde_json::from_slice(&fs::read(rt.state_path()).unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("last_resync_ms");
        old["targets"][0]
            .as_object_mut()
            .unwrap()
            .remove("write_back");
        fs::write(rt.state_path(), serde_json::to_vec(&old).unwrap()).unwrap();
        let loaded = rt.load().unwrap().unwrap();
        assert_eq!(loaded.last_resync_ms, None);
        assert_eq!(loaded.targets[0].write_back, None);
        assert_eq!(loaded.targets[0].paths, st.targets[0].paths);
    }
}
