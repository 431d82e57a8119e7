//! The `asd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use asd::config::{self, Expand};
use asd::engine::Engine;
use asd::mount::{InProcess, Mounter};
use asd::state::Runtime;
use asd::style::Style;

#[derive(Parser)]
#[command(
    name = "asd",
    version,
    about = "anything-sync-daemon: keep directories in RAM, write them back safely",
    long_about = "Moves the directories named in WHATTOSYNC into tmpfs behind bind mounts at the same \
                  path, writes them back to disk on resync and at unsync, and recovers after crashes.\n\n\
                  Config: $ASDCONF, else /etc/asd.conf for root, else ${XDG_CONFIG_HOME:-~/.config}/asd/asd.conf."
)]
struct Cli {
    /// Show debug detail (also DEBUG=1).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn init_logging(verbose: bool) {
    let debug = verbose || std::env::var("DEBUG").is_ok_and(|v| v == "1");
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .without_time()
        .init();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `$ASDCONF`, else the system or the per-user file.
fn config_location() -> Result<(PathBuf, Expand)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(p) = std::env::var_os("ASDCONF").filter(|p| !p.is_empty()) {
        let expand = if is_root() {
            Expand::default()
        } else {
            Expand { home }
        };
        return Ok((PathBuf::from(p), expand));
    }
    if is_root() {
        return Ok((PathBuf::from("/etc/asd.conf"), Expand::default()));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => home.clone().context("HOME is not set")?.join(".config"),
    };
    Ok((base.join("asd/asd.conf"), Expand { home }))
}

fn mounter() -> Result<Box<dyn Mounter>> {
    if is_root() {
        Ok(Box::new(InProcess))
    } else {
        anyhow::bail!(
            "asd needs root for mounting; the per-user mode through asd-helper is not available in this build. Run asd as root with /etc/asd.conf"
        )
    }
}

fn run(cli: Cli) -> Result<()> {
    let (config_file, expand) = config_location()?;
    let runtime = Runtime::locate(is_root())?;
    let style = Style::detect();
    match cli.command {
        Command::Preview { json } => {
            let state = runtime.load()?;
            let cfg = match &state {
                Some(s) => s.config.clone(),
                None => config::load(&config_file, &expand)?.0,
            };
            let p = asd::preview::build(&config_file, &cfg, state.as_ref());
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", asd::preview::render(&p, &style));
            }
            return Ok(());
        }
        Command::Clean => {
            let m = InProcess;
            let engine = Engine {
                runtime,
                mounter: &m,
                config_file,
                expand,
            };
            engine.clean()?;
            return Ok(());
        }
        _ => {}
    }
    let m = mounter()?;
    let engine = Engine {
        runtime,
        mounter: m.as_ref(),
        config_file,
        expand,
    };
    match cli.command {
        Command::Sync => {
            let r = engine.sync()?;
            for (t, rec) in &r.recovered {
                if let Some(s) = &rec.snapshot {
                    println!(
                        "recovered {} after an unclean stop; snapshot: {}",
                        t.display(),
                        s.display()
                    );
                }
            }
            if r.already_running && r.synced.is_empty() {
                println!("asd is already running; targets are in RAM (see `asd preview`)");
            } else {
                println!(
                    "{}",
                    style.green(&format!(
                        "sync successful: {} target(s) in RAM",
                        r.synced.len()
                    ))
                );
            }
        }
        Command::Resync => {
            let r = engine.resync()?;
            let files: u64 = r.stats.iter().map(|(_, s)| s.files_copied).sum();
            let deleted: u64 = r.stats.iter().map(|(_, s)| s.deleted).sum();
            println!(
                "resync successful: {} target(s) on disk ({files} file(s) written, {deleted} removed)",
                r.stats.len()
            );
        }
        Command::Unsync => {
            let r = engine.unsync()?;
            if r.unsynced.is_empty() {
                println!("asd is not running; nothing to write back");
            } else {
                println!(
                    "{}",
                    style.green(&format!(
                        "unsync successful: {} target(s) back on disk",
                        r.unsynced.len()
                    ))
                );
            }
        }
        Command::Daemon => asd::daemon::run(&engine)?,
        Command::Preview { .. } | Command::Clean => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == asd::owner::WORKER_ARG)
    {
        init_logging(false);
        return ExitCode::from(asd::owner::worker_main() as u8);
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let style = Style::detect();
            eprintln!("{} {e:#}", style.red("asd:"));
            ExitCode::FAILURE
        }
    }
}
