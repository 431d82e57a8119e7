//! `asd preview`: what asd will do or is doing, per target (the fields of asd 6.0's example), as
//! text or JSON. Reads sizes as each target's owner; changes nothing.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::owner::{self, Job, Output};
use crate::paths::TargetPaths;
use crate::plan;
use crate::pressure::{self, AreaUse, Psi};
use crate::recover;
use crate::show;
use crate::snapshot;
use crate::state::{Mode, State};

#[derive(Debug, serde::Serialize)]
pub struct Snapshot {
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct TargetView {
    pub owner: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
    pub target: PathBuf,
    pub sync_target: PathBuf,
    pub tmpfs_target: PathBuf,
    pub mode: Mode,
    /// Apparent size of the data (the RAM copy while synced).
    pub dir_size: Option<u64>,
    /// Overlay mode: size of the changed files held in RAM.
    pub overlay_size: Option<u64>,
    pub in_ram: bool,
    /// What the target holds in RAM while in RAM: the copy (copy mode) or the changed files
    /// (overlay mode).
    pub ram_bytes: Option<u64>,
    /// When its last write-back by a resync finished (seconds since the epoch) and how long
    /// it took (milliseconds); none before the first.
    pub last_resync: Option<u64>,
    pub last_resync_ms: Option<u64>,
    pub recovery_snapshots: Vec<Snapshot>,
    pub problem: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct WarningView {
    /// `volatile_full` or `memory_pressure`.
    pub kind: String,
    pub message: String,
}

#[derive(Debug, serde::Serialize)]
pub struct Preview {
    pub config_file: PathBuf,
    pub running: bool,
    pub started: Option<u64>,
    pub last_resync: Option<u64>,
    /// How long the last resync of all targets took.
    pub last_resync_ms: Option<u64>,
    pub volatile: PathBuf,
    pub volatile_fs: Option<String>,
    /// How full the file system of the volatile area is.
    pub volatile_use: Option<AreaUse>,
    /// The system's memory pressure (None without PSI).
    pub memory_pressure: Option<Psi>,
    /// What puts the data in RAM at risk now (see `pressure`).
    pub warnings: Vec<WarningView>,
    pub resync_interval_secs: u64,
    /// `systemctl [--user] is-active asd`: None when systemd cannot be asked.
    pub service: Option<String>,
    /// Per-user mode: whether the helper's socket answers.
    pub helper_reachable: Option<bool>,
    pub targets: Vec<TargetView>,
}

/// What systemd says about asd.service (the user's or the system's), if it can be asked.
fn service_state() -> Option<String> {
    let mut cmd = std::process::Command::new("systemctl");
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("--user");
    }
    let out = cmd
        .args(["is-active", "asd.service"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let word = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!word.is_empty()).then_some(word)
}

fn helper_reachable() -> Option<bool> {
    if nix::unistd::geteuid().is_root() {
        return None;
    }
    Some(asd_protocol::client::Client::connect(asd_protocol::socket_path()).is_ok())
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

fn size_as(owner: &crate::state::Owner, path: &Path) -> Option<u64> {
    match owner::run(
        owner,
        &Job::TreeSize {
            path: path.to_path_buf(),
        },
        None,
    ) {
        Ok(Output::Bytes(b)) => Some(b),
        _ => None,
    }
}

pub fn build(config_file: &Path, cfg: &Config, state: Option<&State>) -> Preview {
    let cfg = state.map(|s| &s.config).unwrap_or(cfg);
    let mut targets = Vec::new();
    for target in &cfg.whattosync {
        let recorded = state.and_then(|s| s.target(target));
        let (paths, owner, mode, problem) = match recorded {
            Some(t) => (t.paths.clone(), t.owner.clone(), t.mode, None),
            None => {
                use std::os::unix::fs::MetadataExt;
                let meta = std::fs::symlink_metadata(target);
                let (uid, gid) = meta.as_ref().map(|m| (m.uid(), m.gid())).unwrap_or((0, 0));
                let owner = plan::owner_of(uid, gid);
                let problem = meta.err().map(|e| format!("cannot be examined: {e}"));
                let Some(paths) = TargetPaths::new(target, &owner.name, &cfg.volatile) else {
                    continue;
                };
                let mode = if cfg.use_overlayfs {
                    Mode::Overlay
                } else {
                    Mode::Copy
                };
                (paths, owner, mode, problem)
            }
        };
        let in_ram = recorded.is_some_and(recover::is_live);
        let dir_size = size_as(
            &owner,
            if in_ram {
                &paths.volatile
            } else {
                &paths.target
            },
        );
        let overlay_size = (mode == Mode::Overlay && in_ram)
            .then(|| size_as(&owner, &paths.upper))
            .flatten();
        let ram_bytes = match mode {
            _ if !in_ram => None,
            Mode::Copy => dir_size,
            Mode::Overlay => overlay_size,
        };
        let write_back = recorded.and_then(|t| t.write_back);
        let recovery_snapshots = snapshot::list(paths.parent(), &paths.snapshot_prefix())
            .unwrap_or_default()
            .into_iter()
            .map(|(path, bytes)| Snapshot { path, bytes })
            .collect();
        targets.push(TargetView {
            group: group_name(owner.gid),
            gid: owner.gid,
            owner: owner.name.clone(),
            uid: owner.uid,
            sync_target: paths.backup.clone(),
            tmpfs_target: paths.volatile.clone(),
            target: paths.target.clone(),
            mode,
            dir_size,
            overlay_size,
            in_ram,
            ram_bytes,
            last_resync: write_back.map(|w| w.at),
            last_resync_ms: write_back.map(|w| w.ms),
            recovery_snapshots,
            problem,
        });
    }
    // The area as the targets use it: their owner's directory in it, else VOLATILE itself.
    let area = targets
        .iter()
        .find(|t| t.in_ram)
        .and_then(|t| state?.target(&t.target))
        .map(|t| t.paths.user_area.clone())
        .unwrap_or_else(|| cfg.volatile.clone());
    let volatile_use = pressure::area_use(&area);
    let memory_pressure = pressure::memory_pressure();
    let mut watch = pressure::Watch::default();
    watch.step(volatile_use.clone(), memory_pressure);
    let warnings = watch
        .active()
        .iter()
        .map(|w| WarningView {
            kind: match w {
                pressure::Warning::VolatileFull(_) => "volatile_full",
                pressure::Warning::MemoryPressure(_) => "memory_pressure",
            }
            .to_string(),
            message: w.to_string(),
        })
        .collect();
    Preview {
        config_file: state
            .map(|s| s.config_file.clone())
            .unwrap_or_else(|| config_file.to_path_buf()),
        running: state.is_some_and(|s| !s.targets.is_empty()),
        started: state.map(|s| s.started),
        last_resync: state.and_then(|s| s.last_resync),
        last_resync_ms: state.and_then(|s| s.last_resync_ms),
        volatile: cfg.volatile.clone(),
        volatile_fs: plan::volatile_kind(&cfg.volatile).ok().map(str::to_string),
        volatile_use,
        memory_pressure,
        warnings,
        resync_interval_secs: cfg.resync_interval.as_secs(),
        service: service_state(),
        helper_reachable: helper_reachable(),
        targets,
    }
}

pub use crate::show::human;

/// The text form, one block per target, with asd 6.0's field names.
pub fn render(p: &Preview, style: &crate::style::Style) -> String {
    let mut out = String::new();
    let b = |s: &str| style.bold(s);
    if p.running {
        out.push_str(&format!(
            "{}\n",
            style.green("asd is running: targets are in RAM.")
        ));
    } else {
        out.push_str("asd is not running.\n");
    }
    out.push_str(&format!(
        "asd will manage the following per {} settings:\n",
        p.config_file.display()
    ));
    if let Some(svc) = &p.service {
        out.push_str(&format!("systemd service asd.service is {svc}.\n"));
    }
    if let Some(h) = p.helper_reachable {
        out.push_str(if h {
            "the asd helper answers on its socket.\n"
        } else {
            "the asd helper is NOT reachable: ask an administrator to run `systemctl enable --now asd-helper.socket`.\n"
        });
    }
    let used = p
        .volatile_use
        .as_ref()
        .map(|u| {
            format!(
                ", {} of {} used ({:.0}%)",
                human(u.used),
                human(u.size),
                u.percent
            )
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "volatile: {} ({}){used}\n",
        p.volatile.display(),
        p.volatile_fs
            .as_deref()
            .unwrap_or("NOT tmpfs/zram: sync will refuse"),
    ));
    if let Some(m) = &p.memory_pressure {
        out.push_str(&format!(
            "memory pressure: {:.1}% of the last minute (PSI some avg60)\n",
            m.avg60
        ));
    }
    out.push_str(&format!("resync interval: {}s", p.resync_interval_secs));
    if p.running {
        match (p.last_resync, p.last_resync_ms) {
            (Some(at), Some(ms)) => out.push_str(&format!(
                ", last resync {} (took {})",
                show::date_time(at),
                show::seconds(ms)
            )),
            (Some(at), None) => out.push_str(&format!(", last resync {}", show::date_time(at))),
            _ => out.push_str(", no resync yet"),
        }
    }
    out.push('\n');
    for w in &p.warnings {
        out.push_str(&format!("{} {}\n", style.red("WARNING:"), w.message));
    }
    for t in &p.targets {
        out.push('\n');
        out.push_str(&format!("{} {}/{}\n", b("owner/group id:"), t.owner, t.gid));
        out.push_str(&format!(
            "{} {}\n",
            b("target to manage:"),
            t.target.display()
        ));
        out.push_str(&format!(
            "{} {}\n",
            b("sync target:"),
            t.sync_target.display()
        ));
        out.push_str(&format!(
            "{} {}\n",
            b("tmpfs target:"),
            t.tmpfs_target.display()
        ));
        out.push_str(&format!(
            "{} {}\n",
            b("dir size:"),
            t.dir_size.map(human).unwrap_or_else(|| "unknown".into())
        ));
        if t.mode == Mode::Overlay {
            out.push_str(&format!(
                "{} {}\n",
                b("overlayfs size:"),
                t.overlay_size.map(human).unwrap_or_else(|| "-".into())
            ));
        }
        let in_ram = match (t.in_ram, t.ram_bytes) {
            (true, Some(n)) => format!("yes ({} in RAM)", human(n)),
            (true, None) => "yes".to_string(),
            (false, _) => "no".to_string(),
        };
        out.push_str(&format!("{} {in_ram}\n", b("in RAM:")));
        if t.in_ram {
            let last = match (t.last_resync, t.last_resync_ms) {
                (Some(at), Some(ms)) => {
                    format!("{} (took {})", show::date_time(at), show::seconds(ms))
                }
                (Some(at), None) => show::date_time(at),
                _ => "not yet (written back at the next resync)".to_string(),
            };
            out.push_str(&format!("{} {last}\n", b("last resync:")));
        }
        if t.recovery_snapshots.is_empty() {
            out.push_str(&format!("{} none\n", b("recovery dirs:")));
        } else {
            out.push_str(&format!(
                "{} {} <- delete with the c option\n",
                b("recovery dirs:"),
                t.recovery_snapshots.len()
            ));
            for s in &t.recovery_snapshots {
                out.push_str(&format!(
                    "{} {} ({})\n",
                    b("dir path/size:"),
                    s.path.display(),
                    human(s.bytes)
                ));
            }
        }
        if let Some(pr) = &t.problem {
            out.push_str(&format!("{} {}\n", style.red("problem:"), pr));
        }
    }
    out
}
