//! The command-line interface definition, shared by the `asd` binary and the generators of its
//! man page and shell completions.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "asd",
    version,
    about = "anything-sync-daemon: keep directories in RAM, write them back safely",
    long_about = "Moves the directories named in WHATTOSYNC into tmpfs behind bind mounts at the same \
                  path, writes them back to disk on resync and at unsync, and recovers after crashes.\n\n\
                  Config: $ASDCONF, else /etc/asd.conf for root, else ${XDG_CONFIG_HOME:-~/.config}/asd/asd.conf."
)]
pub struct Cli {
    /// Show debug detail (also DEBUG=1).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// No progress line, and only warnings and errors in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Put every target in RAM (recovering first if a crash left anything behind).
    Sync,
    /// Write every target back to disk, durably.
    Resync,
    /// Write back, unmount, and remove everything asd made.
    Unsync,
    /// Show what asd will do or is doing.
    #[command(visible_aliases = ["p", "P", "parse", "Parse", "Preview", "debug"])]
    Preview {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete all crash-recovery snapshots of the configured targets.
    #[command(visible_aliases = ["c", "C", "Clean"])]
    Clean,
    /// What the systemd units run: sync, resync every RESYNC_INTERVAL, unsync on SIGTERM.
    Daemon,
}

/// The clap command, for generators (man page, completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
