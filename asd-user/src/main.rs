//! The `asd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use asd::cli::{Cli, Command};
use asd::config::{self, Expand};
use asd::engine::Engine;
use asd::mount::via_helper::ViaHelper;
use asd::mount::{InProcess, Mounter};
use asd::state::Runtime;
use asd::style::Style;

fn init_logging(verbose: bool, quiet: bool) {
    let debug = verbose || std::env::var("DEBUG").is_ok_and(|v| v == "1");
    let default = if debug {
        "debug"
    } else if quiet {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Clears the progress line (if one is shown) before each log line.
        .with_writer(asd::progress::term::log_writer)
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

/// Root mounts by itself; everyone else asks the helper.
fn mounter() -> Box<dyn Mounter> {
    if is_root() {
        Box::new(InProcess)
    } else {
        Box::new(ViaHelper::new())
    }
}

/// First run of a user without a config: write the commented template and say where.
fn ensure_user_config(path: &std::path::Path) -> Result<bool> {
    if is_root() || std::env::var_os("ASDCONF").is_some() || path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, config::default_template().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

fn run(cli: Cli) -> Result<()> {
    let (config_file, expand) = config_location()?;
    if ensure_user_config(&config_file)? {
        println!(
            "asd: wrote a commented config template to {}; add the directories to keep in RAM to WHATTOSYNC there, then run this again",
            config_file.display()
        );
        // The daemon stays up (idle, with nothing to sync) so that enabling the unit succeeds.
        if !matches!(cli.command, Command::Daemon) {
            return Ok(());
        }
    }
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
                journals: None,
            };
            engine.clean()?;
            return Ok(());
        }
        _ => {}
    }
    let m = mounter();
    let engine = Engine {
        runtime,
        mounter: m.as_ref(),
        config_file,
        expand,
        // Only the long-running daemon keeps change journals (see `journals`).
        journals: matches!(cli.command, Command::Daemon).then(asd::journals::Journals::new),
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

/// The soft limit on open descriptors up to the hard one: the copy threads hold a few hundred
/// at most (see `copy::pool`), close to the usual soft limit of 1024 on a deep tree, and the
/// hard limit is there to be used (systemd sets 524288).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

fn main() -> ExitCode {
    raise_fd_limit();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == asd::owner::WORKER_ARG)
    {
        init_logging(false, false);
        return ExitCode::from(asd::owner::worker_main() as u8);
    }
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    // A person at a terminal sees how a long sync, resync or unsync goes (never the daemon:
    // systemd runs it, and its stderr is the journal).
    let copies = matches!(
        cli.command,
        Command::Sync | Command::Resync | Command::Unsync
    );
    if copies && asd::progress::term::wanted(cli.quiet) {
        asd::progress::term::start();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let style = Style::detect();
            eprintln!("{} {e:#}", style.red("asd:"));
            ExitCode::FAILURE
        }
    }
}
