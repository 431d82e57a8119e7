//! The commands: sync, resync, unsync, clean. Each takes the lock, works from the runtime state
//! (and its config snapshot once running), and leaves every target either fully synced or fully
//! back on disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::ClockMark;
use crate::config::{self, Config, Expand};
use crate::copy::CopyStats;
use crate::holders;
use crate::journals::Journals;
use crate::mount::{MountError, Mounter};
use crate::nsops;
use crate::owner::{self, Job, Output};
use crate::plan::{self, Planned};
use crate::pressure;
use crate::progress;
use crate::recover::{self, RecoverError};
use crate::snapshot;
use crate::state::{self, Mode, Runtime, Stage, State, TargetState};

/// How long a command waits for another one holding the lock (a resync of a big tree).
const LOCK_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{target}: {source}")]
    Target {
        target: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("asd is not running (no state in {0}); run `asd sync` first")]
    NotRunning(PathBuf),
    /// Some targets failed, others did not; `reasons` holds each failure's message (logged as it
    /// happened), for callers that show them elsewhere (the unit's status line).
    #[error("{} of {} targets failed; see the messages above", reasons.len(), total)]
    Partial { total: usize, reasons: Vec<String> },
}

fn target_err(target: &Path, e: impl std::error::Error + Send + Sync + 'static) -> EngineError {
    EngineError::Target {
        target: target.to_path_buf(),
        source: Box::new(e),
    }
}

/// A busy target's error names the programs using it, where asd can see them.
/// The cutoff of a write-back of `t` that compares only what changed since the last one, or
/// `None` for a comparison of the whole tree: when nothing vouches that disk and RAM were equal
/// at a known time (after a recovery, or state from an older asd), or when the last full
/// comparison is [`state::FULL_COMPARE_EVERY`] old. Why the shortcut misses no change made
/// through the target: see `CopyOptions::changed_since` (ctime is stamped by the kernel on every
/// write, truncate, chmod, chown, xattr change, link count change and rename, a directory's on
/// every entry added, removed or renamed; a clock set back makes the engine compare
/// everything). What it cannot see is a change made to the disk side behind the cover, which
/// the periodic full comparison repairs.
fn incremental_since(t: &TargetState) -> Option<crate::copy::Timestamp> {
    let full_at = t.full_compare_at?;
    let age = state::now_secs().checked_sub(full_at)?;
    if age >= state::FULL_COMPARE_EVERY {
        return None;
    }
    let since = t.clean_since?;
    // A wall clock set back since then would stamp later changes with older ctimes.
    if t.clean_clock
        .as_ref()
        .is_none_or(|c| c.stepped_back_since(since))
    {
        tracing::info!(
            "{}: the clock may have been set back since the last write-back: comparing everything",
            t.paths.target.display()
        );
        return None;
    }
    Some(since)
}

fn busy_named(target: &Path, e: MountError) -> EngineError {
    if matches!(e, MountError::Busy { .. }) {
        match holders::open_in(target) {
            Ok(holders) if !holders.is_empty() => {
                return target_err(target, holders::HoldersError::Busy { holders, source: e })
            }
            Ok(_) => {}
            Err(h) => tracing::debug!("{}: {h}", target.display()),
        }
    }
    target_err(target, e)
}

/// The failed targets of one command: each logged when it happens, and kept for the error.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, message: String) {
        tracing::error!("{message}");
        self.0.push(message);
    }

    fn any(&self) -> bool {
        !self.0.is_empty()
    }

    fn count(&self) -> usize {
        self.0.len()
    }

    fn into_error(self, total: usize) -> EngineError {
        EngineError::Partial {
            total,
            reasons: self.0,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where to find things, and how to mount.
pub struct Engine<'a> {
    pub runtime: Runtime,
    pub mounter: &'a dyn Mounter,
    pub config_file: PathBuf,
    pub expand: Expand,
    /// The daemon's change journals (None for one-off commands, which compare by ctime).
    pub journals: Option<Journals>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub already_running: bool,
    pub synced: Vec<PathBuf>,
    pub recovered: Vec<(PathBuf, recover::Recovery)>,
    pub stats: Vec<(PathBuf, CopyStats)>,
    pub unsynced: Vec<PathBuf>,
}

impl Engine<'_> {
    fn load_config(&self) -> Result<(Config, Vec<u8>), EngineError> {
        let text =
            std::fs::read(&self.config_file).map_err(|source| config::ConfigError::Read {
                path: self.config_file.clone(),
                source,
            })?;
        let (cfg, warnings) = config::parse(
            &String::from_utf8_lossy(&text),
            &self.config_file,
            &self.expand,
        )?;
        for w in warnings {
            tracing::warn!(
                "{}: line {}: {}",
                self.config_file.display(),
                w.line,
                w.message
            );
        }
        Ok((cfg, text))
    }

    /// `asd sync`: recover what a crash left, then put every target in RAM.
    pub fn sync(&self) -> Result<Report, EngineError> {
        let _lock = self.runtime.lock(LOCK_WAIT)?;
        let mut report = Report::default();
        let previous = self.runtime.load()?;
        let (mut cfg, mut state) = match previous {
            Some(prev) => {
                // A configured target that is not recorded was refused last time (programs had
                // it open, say): then this sync tries it again instead of "already running".
                let all_recorded = prev
                    .config
                    .whattosync
                    .iter()
                    .all(|w| prev.targets.iter().any(|t| t.paths.target == *w));
                if !prev.targets.is_empty()
                    && all_recorded
                    && prev.targets.iter().all(recover::is_live)
                {
                    // An unsync killed between freezing a cover and taking it down left it
                    // read-only: the target is in RAM, so it must be writable.
                    for t in &prev.targets {
                        self.thaw_quietly(t);
                    }
                    report.already_running = true;
                    return Ok(report);
                }
                (prev.config.clone(), prev)
            }
            None => {
                let (cfg, text) = self.load_config()?;
                self.runtime.save_config_copy(&text)?;
                let st = State::new(&self.config_file, &cfg);
                (cfg, st)
            }
        };

        // Targets the state knows but that are not intact: recover them from what was recorded.
        // One that cannot be recovered stays recorded (and is retried next time); the others go
        // on, so live targets keep being served.
        let mut failed = Failures::default();
        let had_state = !state.targets.is_empty();
        for t in state.targets.clone() {
            if recover::is_live(&t) {
                self.thaw_quietly(&t);
                continue;
            }
            match recover::recover(self.mounter, &t, Some(t.stage), &state.config) {
                Ok(rec) => {
                    report.recovered.push((t.paths.target.clone(), rec));
                    state.remove(&t.paths.target);
                    self.runtime.save(&state)?;
                }
                Err(e) => failed.add(format!(
                    "{}: recovery failed: {e}",
                    t.paths.target.display()
                )),
            }
        }
        if had_state && state.targets.is_empty() {
            // Everything of the previous run is back on disk: this is a fresh start, so the
            // config file (perhaps edited meanwhile) applies again.
            let (fresh, text) = self.load_config()?;
            self.runtime.save_config_copy(&text)?;
            state = State::new(&self.config_file, &fresh);
            cfg = fresh;
        }

        let live: Vec<PathBuf> = state
            .targets
            .iter()
            .map(|t| t.paths.target.clone())
            .collect();
        let mut todo_cfg = cfg.clone();
        todo_cfg.whattosync.retain(|t| !live.contains(t));
        if todo_cfg.whattosync.is_empty() && !live.is_empty() {
            report.already_running = !failed.any();
            if failed.any() {
                return Err(failed.into_error(live.len()));
            }
            return Ok(report);
        }
        let planned = plan::build(&todo_cfg, &self.config_file, false)?;
        self.runtime.save(&state)?;

        for p in &planned {
            let t = TargetState {
                paths: p.paths.clone(),
                owner: p.owner.clone(),
                mode: p.mode,
                stage: Stage::Syncing,
                clean_since: None,
                full_compare_at: None,
                clean_clock: None,
                write_back: None,
            };
            // Leftovers on disk without any state: a reboot after a crash.
            match recover::recover(self.mounter, &t, None, &cfg) {
                Ok(rec) if rec.ungraceful => report.recovered.push((t.paths.target.clone(), rec)),
                Ok(_) => {}
                Err(e) => {
                    failed.add(format!(
                        "{}: recovery failed: {e}",
                        t.paths.target.display()
                    ));
                    continue;
                }
            }
            match self.sync_one(p, &cfg, &mut state) {
                Ok(()) => report.synced.push(p.paths.target.clone()),
                Err(e) => failed.add(e.to_string()),
            }
        }
        if state.targets.is_empty() {
            self.runtime.clear()?;
        }
        if failed.any() {
            return Err(failed.into_error(planned.len()));
        }
        Ok(report)
    }

    /// Makes a live target's cover writable again if asd froze it; failures only logged.
    fn thaw_quietly(&self, t: &TargetState) {
        if let Err(e) = self.mounter.thaw(t) {
            tracing::warn!("{}: {e}", t.paths.target.display());
        }
    }

    fn sync_one(&self, p: &Planned, cfg: &Config, state: &mut State) -> Result<(), EngineError> {
        // Programs already using the target would go on writing to the disk under the cover,
        // and unsync would write the RAM copy over that. Wait a little, then refuse: a program
        // that only passes through (an indexer, a thumbnailer, a shell's `ls`) is gone in a
        // moment, while one that keeps the target open (an editor, a browser profile) will not
        // close because asd waits, and asd never stops the user's programs. Before any step,
        // so a refusal leaves everything as it was.
        holders::wait_until_unused(&p.paths.target, holders::sync_wait())
            .map_err(|e| target_err(&p.paths.target, e))?;
        let _progress = progress::task("sync", &p.paths.target);
        let mut t = TargetState {
            paths: p.paths.clone(),
            owner: p.owner.clone(),
            mode: p.mode,
            stage: Stage::Syncing,
            clean_since: None,
            full_compare_at: None,
            clean_clock: None,
            write_back: None,
        };
        state.upsert(t.clone());
        self.runtime.save(state)?;
        let copied_at = match self.mount_and_copy(&t, cfg) {
            Ok(at) => at,
            Err(e) => {
                // Out of room in RAM: say so plainly, not only as the copy's ENOSPC.
                let e = match e {
                    EngineError::Target { target, source } => {
                        match pressure::explain_full(&source.to_string(), &cfg.volatile) {
                            Some(why) => EngineError::Target {
                                target,
                                source: format!("{source}; {why}").into(),
                            },
                            None => EngineError::Target { target, source },
                        }
                    }
                    other => other,
                };
                // The error itself is reported once, by the caller.
                tracing::info!(
                    "{}: sync failed; undoing what was done",
                    t.paths.target.display()
                );
                // Undo: the original directory was never written, so dropping what we built loses
                // nothing.
                if let Err(u) = self.undo(&t) {
                    tracing::error!(
                        "{}: could not undo everything: {u}; `asd sync` will recover it",
                        t.paths.target.display()
                    );
                    return Err(e);
                }
                state.remove(&t.paths.target);
                self.runtime.save(state)?;
                return Err(e);
            }
        };
        t.stage = Stage::Synced;
        t.full_compare_at = copied_at.as_ref().map(|_| state::now_secs());
        (t.clean_since, t.clean_clock) = match copied_at {
            Some((at, clock)) => (Some(at), clock),
            None => (None, None),
        };
        state.upsert(t.clone());
        self.runtime.save(state)?;
        tracing::info!(
            "{} is now in RAM ({})",
            t.paths.target.display(),
            t.paths.volatile.display()
        );
        Ok(())
    }

    /// Returns (copy mode) a time at which the RAM copy equalled the disk: taken after the copy and
    /// before the cover, so every later change has a newer ctime; and the boot-time clock then.
    fn mount_and_copy(
        &self,
        t: &TargetState,
        cfg: &Config,
    ) -> Result<Option<(crate::copy::Timestamp, Option<ClockMark>)>, EngineError> {
        let p = &t.paths;
        let te = |e: MountError| target_err(&p.target, e);
        let oe = |e: owner::OwnerError| target_err(&p.target, e);
        self.mounter
            .prepare_area(&cfg.volatile, &p.user_area, &t.owner)
            .map_err(te)?;
        let mode_bits = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::symlink_metadata(&p.target)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o700)
        };
        let mut dirs = vec![p.volatile.clone()];
        if t.mode == Mode::Overlay {
            dirs.push(p.upper.clone());
            dirs.push(p.work.clone());
        }
        for d in dirs {
            owner::run(
                &t.owner,
                &Job::MakeDirs {
                    path: d,
                    mode: mode_bits,
                },
                None,
            )
            .map_err(oe)?;
        }
        self.mounter.bind_backup(t).map_err(te)?;
        // Overlay mode needs no start clone: the original is the lower layer and is never
        // written while mounted, so it *is* the start state (and cloning would touch its ctimes).
        if cfg.use_backups && t.mode == Mode::Copy {
            progress::phase("start clone");
            nsops::mkdir_owned(&p.old_partial, &t.owner).map_err(|e| target_err(&p.target, e))?;
            owner::run(
                &t.owner,
                // From the target path, not the backup: link(2) does not cross mounts, and the
                // target is not covered yet.
                &Job::Clone {
                    src: p.target.clone(),
                    dst: p.old_partial.clone(),
                },
                None,
            )
            .map_err(oe)?;
            nsops::rename(&p.old_partial, &p.old).map_err(|e| target_err(&p.target, e))?;
        }
        progress::phase("copying into RAM");
        let mut recorded_at = None;
        match t.mode {
            Mode::Copy => {
                owner::run(
                    &t.owner,
                    &Job::Copy {
                        src: p.backup.clone(),
                        dst: p.volatile.clone(),
                        delete: true,
                        durable: false,
                        since: None,
                        marks: None,
                        start_clone: None,
                        dir_ids: None,
                    },
                    None,
                )
                .map_err(oe)?;
                recorded_at = self.record_dir_ids(t);
            }
            Mode::Overlay => {
                if !nsops::exists(&p.changes) {
                    nsops::mkdir_owned(&p.changes, &t.owner)
                        .map_err(|e| target_err(&p.target, e))?;
                }
                // Whatever is there gets applied to the original at unsync: only the owner's own.
                if let Ok(m) = std::fs::symlink_metadata(&p.changes) {
                    use std::os::unix::fs::MetadataExt;
                    if !m.is_dir() || m.uid() != t.owner.uid {
                        return Err(target_err(
                            &p.target,
                            nsops::NsError {
                                op: "use",
                                path: p.changes.clone(),
                                source: std::io::Error::other(format!(
                                    "is not a directory of {}'s; move it away and run asd again",
                                    t.owner.name
                                )),
                            },
                        ));
                    }
                }
                owner::run(
                    &t.owner,
                    &Job::MatchDirMeta {
                        src: p.target.clone(),
                        dst: p.upper.clone(),
                    },
                    None,
                )
                .map_err(oe)?;
                self.mounter.mount_overlay(t).map_err(te)?
            }
        }
        let copied_at = (t.mode == Mode::Copy).then(|| {
            let at = recorded_at.unwrap_or_else(crate::copy::Timestamp::now);
            (at, ClockMark::now())
        });
        // Once more, without waiting: a program that started using the target meanwhile
        // would write underneath the cover (the caller undoes everything on this error).
        holders::wait_until_unused(&p.target, Duration::ZERO)
            .map_err(|e| target_err(&p.target, e))?;
        self.mounter.cover(t).map_err(te)?;
        Ok(copied_at)
    }

    /// Records where the directories of `t`'s RAM copy are, just filled (see
    /// `copy::record_dir_ids`); returns the time its first write-back compares changes from.
    /// None if that failed: then the first write-back compares every changed directory whole.
    fn record_dir_ids(&self, t: &TargetState) -> Option<crate::copy::Timestamp> {
        let job = Job::RecordDirIds {
            root: t.paths.volatile.clone(),
            file: t.paths.dir_ids(),
        };
        match owner::run(&t.owner, &job, None) {
            Ok(Output::Time(at)) => Some(at),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("{}: {e}", t.paths.target.display());
                None
            }
        }
    }

    /// Take apart a half-built sync of `t` whose original was never written.
    fn undo(&self, t: &TargetState) -> Result<(), RecoverError> {
        let f = recover::inspect(&t.paths);
        if f.covered {
            self.mounter.uncover(t)?;
        }
        self.mounter.release(t)?;
        recover::cleanup(t)
    }

    /// Write one live target back to disk; durable when it returns. `dst` is the original
    /// directory: its backup mount while covered, the target path itself once uncovered.
    /// `since`: compare only what changed after that time; `None` compares everything (which
    /// also repairs any change made to the disk side behind our back).
    ///
    /// A daemon with a ready change journal for `t` looks only at what it marked, unless
    /// `since` is `None` (see [`crate::journals`]).
    ///
    /// `clean_at`: the time the write-back is counted clean from if it succeeds (the next
    /// one's `since`), taken before it began.
    fn write_back(
        &self,
        t: &TargetState,
        dst: &Path,
        since: Option<crate::copy::Timestamp>,
        clean_at: crate::copy::Timestamp,
    ) -> Result<CopyStats, EngineError> {
        self.write_back_journaled(self.journals.as_ref(), t, dst, since, clean_at)
    }

    /// [`Engine::write_back`] with the change journals in `journals`.
    fn write_back_journaled(
        &self,
        journals: Option<&Journals>,
        t: &TargetState,
        dst: &Path,
        since: Option<crate::copy::Timestamp>,
        clean_at: crate::copy::Timestamp,
    ) -> Result<CopyStats, EngineError> {
        let marks = journals
            .and_then(|j| j.before_write_back(t))
            .filter(|_| since.is_some());
        if let Some(m) = &marks {
            tracing::debug!(
                "{}: writing back what the change journal marked ({} entries)",
                t.paths.target.display(),
                m.len()
            );
        }
        let result = self.write_back_with(t, dst, since, marks, clean_at);
        if let Some(j) = journals {
            j.after_write_back(t, result.is_ok());
        }
        result
    }

    fn write_back_with(
        &self,
        t: &TargetState,
        dst: &Path,
        since: Option<crate::copy::Timestamp>,
        marks: Option<crate::journal::DirtyTree>,
        clean_at: crate::copy::Timestamp,
    ) -> Result<CopyStats, EngineError> {
        let p = &t.paths;
        let job = match t.mode {
            Mode::Copy => Job::Copy {
                src: p.volatile.clone(),
                dst: dst.to_path_buf(),
                delete: true,
                durable: true,
                since,
                marks,
                // What the write-back changes of the start state is kept there first.
                start_clone: nsops::exists(&p.old).then(|| p.old.clone()),
                dir_ids: Some(crate::copy::DirIdsFile {
                    path: p.dir_ids(),
                    clean_at,
                }),
            },
            Mode::Overlay => Job::Persist {
                upper: p.upper.clone(),
                changes: p.changes_state(),
            },
        };
        match owner::run(&t.owner, &job, None).map_err(|e| target_err(&p.target, e))? {
            Output::Stats(s) => Ok(s),
            _ => Ok(CopyStats::default()),
        }
    }

    /// `asd resync`: write every target back to disk.
    pub fn resync(&self) -> Result<Report, EngineError> {
        let _lock = self.runtime.lock(LOCK_WAIT)?;
        let resync_began = std::time::Instant::now();
        let mut state = self
            .runtime
            .load()?
            .ok_or_else(|| EngineError::NotRunning(self.runtime.dir().to_path_buf()))?;
        let mut report = Report::default();
        let mut failed = Failures::default();
        for t in state.targets.iter_mut() {
            if !recover::is_live(t) {
                failed.add(format!(
                    "{}: not in RAM any more (its mounts are gone or incomplete, or not the ones asd made); run `asd sync` to recover it",
                    t.paths.target.display()
                ));
                continue;
            }
            let _progress = progress::task("resync", &t.paths.target);
            let began = std::time::Instant::now();
            // Taken before the walk: whatever changes during it is newer and is seen next time.
            let started = crate::copy::Timestamp::now();
            let clock = ClockMark::now();
            let since = incremental_since(t);
            match self.write_back(t, &t.paths.backup, since, started) {
                Ok(s) => {
                    t.clean_since = Some(started);
                    t.clean_clock = clock;
                    if since.is_none() {
                        t.full_compare_at = Some(state::now_secs());
                    }
                    t.write_back = Some(state::WriteBack {
                        at: state::now_secs(),
                        ms: millis(began.elapsed()),
                    });
                    report.stats.push((t.paths.target.clone(), s))
                }
                Err(e) => failed.add(e.to_string()),
            }
        }
        state.last_resync = Some(state::now_secs());
        state.last_resync_ms = Some(millis(resync_began.elapsed()));
        self.runtime.save(&state)?;
        if failed.any() {
            return Err(failed.into_error(state.targets.len()));
        }
        Ok(report)
    }

    /// `asd unsync`: write back, unmount, and remove everything asd made. Works from the state's
    /// config snapshot, so a target removed from the file meanwhile is still written back.
    pub fn unsync(&self) -> Result<Report, EngineError> {
        let _lock = self.runtime.lock(LOCK_WAIT)?;
        let mut report = Report::default();
        let Some(mut state) = self.runtime.load()? else {
            return Ok(report);
        };
        let mut areas: Vec<(PathBuf, state::Owner)> = Vec::new();
        for t in &state.targets {
            if !areas.iter().any(|(a, _)| *a == t.paths.user_area) {
                areas.push((t.paths.user_area.clone(), t.owner.clone()));
            }
        }
        let mut failed = Failures::default();
        for t in state.targets.clone() {
            let result = if recover::is_live(&t) {
                self.unsync_live(&t, &mut state)
            } else {
                recover::recover(self.mounter, &t, Some(t.stage), &state.config)
                    .map(|rec| report.recovered.push((t.paths.target.clone(), rec)))
                    .map_err(|e| target_err(&t.paths.target, e))
            };
            match result {
                Ok(()) => {
                    state.remove(&t.paths.target);
                    self.runtime.save(&state)?;
                    report.unsynced.push(t.paths.target.clone());
                }
                Err(e) => failed.add(e.to_string()),
            }
        }
        if failed.any() {
            let total = report.unsynced.len() + failed.count();
            return Err(failed.into_error(total));
        }
        self.runtime.clear()?;
        // A user's area may hold other targets elsewhere in it: prune only empty directories,
        // as the owner.
        for (area, owner) in areas {
            let _ = owner::run(&owner, &Job::Prune { path: area }, None);
        }
        Ok(report)
    }

    fn unsync_live(&self, t: &TargetState, state: &mut State) -> Result<(), EngineError> {
        let p = &t.paths;
        let te = |e: MountError| target_err(&p.target, e);
        // A write-back of what changed since the last one (the whole tree when in doubt, see
        // `incremental_since`); then the cover goes read-only and a quick pass catches what was
        // written meanwhile; then the cover goes. Nothing is written back after the target shows
        // the disk again, so nothing written there can be overwritten.
        // Without the daemon's journals, one started here still spares the last pass a walk of
        // the whole tree: it journals from before the first pass (see `journals`).
        let local = self.journals.is_none().then(Journals::new);
        let journals = self.journals.as_ref().or(local.as_ref());
        let started = crate::copy::Timestamp::now();
        let began = std::time::Instant::now();
        let _progress = progress::task("unsync", &p.target);
        progress::phase("writing back");
        self.write_back_journaled(journals, t, &p.backup, incremental_since(t), started)?;
        // Read-only for the last pass is a safeguard, not a requirement (an older helper may not
        // know how): without it the last pass runs all the same.
        // A failed freeze may still have taken effect (e.g. the helper froze but could not
        // record it): then thaw too if the cover stays.
        let (frozen, maybe_frozen) = match self.mounter.freeze(t) {
            Ok(f) => (f, f),
            Err(e) => {
                tracing::warn!(
                    "{}: could not make it read-only for the final write-back ({e})",
                    p.target.display()
                );
                (false, true)
            }
        };
        // A copy of the cover in another mount namespace would outlive ours, and what is
        // written there would go into the RAM copy deleted below: such a target stays in RAM.
        progress::phase("last write-back");
        let last = self
            // Not frozen, programs may write until the cover goes: compare by ctime (a scan,
            // see `copy::write_back`), which sees what was written up to the moment the scan
            // reaches it, not only up to the journal's last period. What changes after that
            // (a name deleted from a directory already scanned, or changed during the scan, see
            // `copy::scan`) stays as it was on disk: without a frozen cover no pass is last.
            .write_back_journaled(
                journals.filter(|_| frozen),
                t,
                &p.backup,
                Some(started),
                crate::copy::Timestamp::now(),
            )
            .and_then(|_| {
                holders::refuse_copies_elsewhere(&p.target).map_err(|e| target_err(&p.target, e))
            })
            .and_then(|_| {
                self.mounter
                    .uncover(t)
                    .map_err(|e| busy_named(&p.target, e))
            });
        let covered = last.is_err() && recover::inspect(&t.paths).covered;
        if last.is_ok() || !covered {
            // From here on programs may write to the disk through the target: a later
            // recovery must not write the RAM copy over that.
            state.set_stage(&p.target, Stage::Uncovered);
            self.runtime.save(state)?;
        }
        if let Err(e) = last {
            // The target stays in RAM (a failed write-back, or programs still using it): it
            // must stay writable for them.
            if covered && maybe_frozen {
                if let Err(thaw) = self.mounter.thaw(t) {
                    tracing::error!(
                        "{}: the cover stays read-only ({thaw}); `asd unsync` again once the cause is fixed",
                        p.target.display()
                    );
                }
            }
            return Err(e);
        }
        if !frozen {
            tracing::debug!(
                "{}: the cover stayed writable during the final write-back",
                p.target.display()
            );
        }
        if t.mode == Mode::Overlay {
            // The overlay must be gone before its upper layer is applied to the lower.
            self.mounter.release(t).map_err(te)?;
            owner::run(
                &t.owner,
                &Job::Apply {
                    changes: p.changes_state(),
                    dst: p.target.clone(),
                },
                None,
            )
            .map_err(|e| target_err(&p.target, e))?;
        } else {
            self.mounter.release(t).map_err(te)?;
        }
        // The target's journals are done. They stop following events now, before the
        // deletion; closing one removes a watch per directory (about 15 ms for 1,300 here), on a
        // thread of its own, beside the deletion.
        let mut forgotten = self.journals.as_ref().and_then(|j| j.forget(t));
        if let Some(j) = forgotten.as_mut() {
            j.stop_reading();
        }
        if let Some(j) = &local {
            j.stop_reading();
        }
        let closing = std::thread::Builder::new()
            .name("asd-journal-close".into())
            .spawn(move || drop((local, forgotten)));
        let on_disk = began.elapsed().as_secs_f64();
        progress::phase("deleting the RAM copy");
        let cleaned = recover::cleanup(t);
        if let Ok(closing) = closing {
            let _ = closing.join();
        }
        cleaned.map_err(|e| target_err(&p.target, e))?;
        // Apart, since they differ in kind: the first grows with what changed, the second with
        // the size of the tree (deleting the RAM copy and the start clone).
        tracing::info!(
            "{} is back on disk (written back and unmounted in {on_disk:.3} s, RAM copy and start clone deleted in {:.3} s)",
            p.target.display(),
            began.elapsed().as_secs_f64() - on_disk
        );
        Ok(())
    }

    /// `asd clean`: delete every crash-recovery snapshot of the configured targets.
    pub fn clean(&self) -> Result<Vec<PathBuf>, EngineError> {
        let cfg = match self.runtime.load()? {
            Some(st) => st.config,
            None => self.load_config()?.0,
        };
        let mut removed = Vec::new();
        for target in &cfg.whattosync {
            let Some(paths) = crate::paths::TargetPaths::new(target, "-", &cfg.volatile) else {
                continue;
            };
            let gone = snapshot::remove_all(paths.parent(), &paths.snapshot_prefix())
                .map_err(|e| target_err(target, e))?;
            if gone.is_empty() {
                println!("no crash-recovery snapshots for {}", target.display());
            } else {
                println!(
                    "deleting {} crash-recovery snapshot(s) of {}:",
                    gone.len(),
                    target.display()
                );
                for g in &gone {
                    println!("  {}", g.display());
                }
            }
            removed.extend(gone);
        }
        Ok(removed)
    }
}
