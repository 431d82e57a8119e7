//! Planning a sync: every check that must pass before anything is touched (DESIGN.md §4, issue 2
//! item 2), and the resolved identity and paths of each target.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::mountinfo;
use crate::paths::TargetPaths;
use crate::state::{Mode, Owner};

const TMPFS_MAGIC: i64 = 0x0102_1994;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("nothing to sync: WHATTOSYNC in {0} is empty; add the directories to keep in RAM")]
    NoTargets(PathBuf),
    #[error("VOLATILE={path} {reason}")]
    Volatile { path: PathBuf, reason: String },
    #[error("target {path}: {reason}")]
    Target { path: PathBuf, reason: String },
}

/// One target, ready to sync.
#[derive(Debug, Clone)]
pub struct Planned {
    pub paths: TargetPaths,
    pub owner: Owner,
    pub mode: Mode,
}

/// What kind of RAM filesystem VOLATILE is on.
pub fn volatile_kind(path: &Path) -> Result<&'static str, PlanError> {
    let err = |reason: String| PlanError::Volatile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| err(format!("cannot be used: {e}")))?;
    if !meta.is_dir() {
        return Err(err(
            "is not a directory (a symlink is not accepted either)".into()
        ));
    }
    let st = nix::sys::statfs::statfs(path).map_err(|e| err(format!("cannot be examined: {e}")))?;
    if st.filesystem_type().0 as i64 == TMPFS_MAGIC {
        return Ok("tmpfs");
    }
    // zram is a block device carrying an ordinary filesystem: recognise it by its source.
    let table = mountinfo::read().map_err(|e| err(format!("cannot read the mount table: {e}")))?;
    let dev = (
        nix::sys::stat::major(meta.dev()) as u32,
        nix::sys::stat::minor(meta.dev()) as u32,
    );
    if table
        .iter()
        .any(|m| m.dev == dev && m.source.starts_with("/dev/zram"))
    {
        return Ok("zram");
    }
    Err(err(format!(
        "is not on tmpfs or zram (it is on {}), so asd would not keep anything in RAM; set VOLATILE to a tmpfs such as /dev/shm or /run/user/UID",
        table
            .iter()
            .find(|m| m.dev == dev)
            .map(|m| m.fs_type.as_str())
            .unwrap_or("a disk filesystem")
    )))
}

/// Identity of a uid, with its groups as login would set them.
pub fn owner_of(uid: u32, fallback_gid: u32) -> Owner {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => {
            let groups = std::ffi::CString::new(user.name.clone())
                .ok()
                .and_then(|c| nix::unistd::getgrouplist(&c, user.gid).ok())
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|| vec![user.gid.as_raw()]);
            Owner {
                uid,
                gid: user.gid.as_raw(),
                name: user.name,
                groups,
            }
        }
        _ => Owner {
            uid,
            gid: fallback_gid,
            name: uid.to_string(),
            groups: vec![fallback_gid],
        },
    }
}

/// Check one target on its own: absolute, a real directory, not `/`.
fn check_target(path: &Path) -> Result<std::fs::Metadata, PlanError> {
    let err = |reason: &str| PlanError::Target {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if !path.is_absolute() || path.parent().is_none() {
        return Err(err("must be an absolute path below /"));
    }
    // asd's names add up to ~60 bytes to the target's (".name-backup_asd-crashrecovery-
    // YYYYMMDD_HHMMSS_N.tar.zstd.partial"); NAME_MAX is 255.
    if path.file_name().is_some_and(|n| n.len() > 190) {
        return Err(err(
            "has a name longer than 190 bytes; asd's backup names would not fit",
        ));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err(
                "does not exist; create it or remove it from WHATTOSYNC",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(err(
                "cannot be reached by you (permission denied on the way there); asd run as a user syncs only directories of that user's own",
            ))
        }
        Err(e) => return Err(err(&format!("cannot be examined: {e}"))),
    };
    if meta.file_type().is_symlink() {
        return Err(err("is a symlink; name the real directory instead"));
    }
    if !meta.is_dir() {
        return Err(err("is not a directory; asd syncs directories only"));
    }
    // A symlink higher up would make the bind mounts land somewhere else than the name says.
    let real = std::fs::canonicalize(path).map_err(|e| err(&format!("cannot be resolved: {e}")))?;
    if real != path {
        return Err(err(&format!(
            "has a symlink in its path (it resolves to {}); name the real directory",
            real.display()
        )));
    }
    Ok(meta)
}

/// Check the whole configuration; `running` skips the checks that only make sense before sync.
pub fn build(
    config: &Config,
    config_file: &Path,
    running: bool,
) -> Result<Vec<Planned>, PlanError> {
    if config.whattosync.is_empty() {
        return Err(PlanError::NoTargets(config_file.to_path_buf()));
    }
    volatile_kind(&config.volatile)?;
    let volatile = &config.volatile;
    let mut planned = Vec::new();
    for (i, target) in config.whattosync.iter().enumerate() {
        let meta = check_target(target)?;
        for other in &config.whattosync[..i] {
            if target.starts_with(other) || other.starts_with(target) {
                return Err(PlanError::Target {
                    path: target.clone(),
                    reason: format!(
                        "is nested with {}; targets must not contain each other",
                        other.display()
                    ),
                });
            }
        }
        if target.starts_with(volatile) || volatile.starts_with(target) {
            return Err(PlanError::Target {
                path: target.clone(),
                reason: format!(
                    "overlaps VOLATILE ({}); keep targets out of the RAM area",
                    volatile.display()
                ),
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && meta.uid() != me {
            return Err(PlanError::Target {
                path: target.clone(),
                reason: format!(
                    "belongs to uid {}, not to you; asd run as a user syncs only that user's own directories (root's system-wide mode can sync any)",
                    meta.uid()
                ),
            });
        }
        let owner = owner_of(meta.uid(), meta.gid());
        let paths =
            TargetPaths::new(target, &owner.name, volatile).ok_or_else(|| PlanError::Target {
                path: target.clone(),
                reason: "cannot derive its backup path".into(),
            })?;
        if !running && config.hardlink_safety_check && !paths.old.exists() {
            // The walk reads the owner's tree, so it runs as the owner.
            let job = crate::owner::Job::FindHardlinks {
                root: target.clone(),
                asd_clones: [&paths.old, &paths.old_partial]
                    .into_iter()
                    .flat_map(|d| [d.clone(), crate::paths::trash(d)])
                    .collect(),
            };
            let linked = match crate::owner::run(&owner, &job, None) {
                Ok(crate::owner::Output::Paths(p)) => p,
                Ok(_) => Vec::new(),
                Err(e) => {
                    return Err(PlanError::Target {
                        path: target.clone(),
                        reason: format!("hardlink check failed: {e}"),
                    })
                }
            };
            if !linked.is_empty() {
                let list: Vec<String> = linked
                    .iter()
                    .map(|p| format!("  {}", p.display()))
                    .collect();
                return Err(PlanError::Target {
                    path: target.clone(),
                    reason: format!(
                        "holds hard-linked files, which syncing would split into separate copies:\n{}\nset ENABLE_HARDLINK_SAFETY_CHECK=0 if that is fine",
                        list.join("\n")
                    ),
                });
            }
        }
        planned.push(Planned {
            paths,
            owner,
            mode: if config.use_overlayfs {
                Mode::Overlay
            } else {
                Mode::Copy
            },
        });
    }
    Ok(planned)
}
