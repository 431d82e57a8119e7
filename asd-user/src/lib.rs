//! asd: keeps directories in RAM behind bind mounts and writes them back safely.
//! One module per step of the data path (DESIGN.md §2).

pub mod config;
pub mod copy;
pub mod mount;
pub mod mountinfo;
pub mod paths;
pub mod state;
