//! asd: keeps directories in RAM behind bind mounts and writes them back safely.
//! One module per step of the data path (DESIGN.md §2).

pub mod cli;
pub mod clock;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod engine;
pub(crate) mod fsio;
pub mod holders;
pub mod journal;
pub mod journals;
pub mod mount;
pub mod mountinfo;
pub mod nsops;
pub mod overlay;
pub mod owner;
pub mod paths;
pub mod plan;
pub mod pressure;
pub mod preview;
pub mod progress;
pub mod recover;
pub mod remove;
pub mod show;
pub mod sleep;
pub mod snapshot;
pub mod state;
pub mod style;
pub(crate) mod treequeue;

/// Lib tests only. A child process holds a copy of every descriptor its parent had open at the
/// fork until its exec closes them: a file another test thread was writing at that instant is
/// closed then, a late close event in that test's change journal. Tests that start processes
/// hold this for reading ([`spawning`]), the journal's tests for writing ([`no_spawns`]).
#[cfg(test)]
static SPAWNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[cfg(test)]
pub(crate) fn spawning() -> std::sync::RwLockReadGuard<'static, ()> {
    SPAWNS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) fn no_spawns() -> std::sync::RwLockWriteGuard<'static, ()> {
    SPAWNS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
