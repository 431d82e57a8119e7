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
