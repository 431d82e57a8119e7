//! asd-gen: writes the man page asd(1) and the shell completions of `asd` from its clap
//! definition (`asd::cli::command()`), so they never drift from the real command line.
//! Run by the Makefile at build time; not installed.
//!
//!   asd-gen man OUTDIR          asd.1 (and anything-sync-daemon.1, a `.so` link to it)
//!   asd-gen completions OUTDIR  bash/asd, bash/anything-sync-daemon, zsh/_asd,
//!                               zsh/_anything-sync-daemon, fish/asd.fish,
//!                               fish/anything-sync-daemon.fish

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};

/// The names the command is installed under (`anything-sync-daemon` is a symlink to `asd`).
const NAMES: [&str; 2] = ["asd", "anything-sync-daemon"];

fn usage() -> ExitCode {
    eprintln!("usage: asd-gen man OUTDIR | asd-gen completions OUTDIR");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [what, out] if what == "man" => man(Path::new(out)),
        [what, out] if what == "completions" => completions(Path::new(out)),
        _ => return usage(),
    };
    match result {
        Ok(written) => {
            for p in written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("asd-gen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A paragraph of plain text.
fn para(r: &mut Roff, text: &str) {
    r.control("PP", []).text([roman(text)]);
}

/// A tagged paragraph: `tag` in bold, then `text`.
fn item(r: &mut Roff, tag: &str, text: &str) {
    r.control("TP", []).text([bold(tag)]).text([roman(text)]);
}

fn section(r: &mut Roff, name: &str) {
    r.control("SH", [name]);
}

fn man(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    fs::create_dir_all(out)?;
    let cmd = asd::cli::command();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("1")
        .manual("User Commands")
        .source(format!("asd {}", env!("CARGO_PKG_VERSION")));
    let mut buf: Vec<u8> = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;

    let mut r = Roff::new();
    section(&mut r, "COMMANDS");
    for sub in cmd.get_subcommands() {
        let mut tag = sub.get_name().to_string();
        let aliases: Vec<&str> = sub.get_visible_aliases().collect();
        if !aliases.is_empty() {
            tag = format!("{tag} ({})", aliases.join(", "));
        }
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let mut text = format!("{about}.");
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                text.push_str(&format!(" Option --{long}: {help}."));
            }
        }
        item(&mut r, &format!("asd {tag}"), &text);
    }
    para(
        &mut r,
        "Every command reads the configuration file named under FILES. Commands serialise on a \
         lock in the runtime directory, so `asd resync` from a shell while the daemon runs waits \
         for the daemon's current step and then writes back.",
    );

    section(&mut r, "MODES");
    item(
        &mut r,
        "Per user",
        "An unprivileged user runs `systemctl --user enable --now asd`. The user manager starts \
         `asd daemon`, which reads ~/.config/asd/asd.conf, asks the root helper asd-helper(8) \
         (socket-activated through /run/asd/io.asd.Helper) for the bind and overlay mounts, and \
         does all reading, copying and snapshotting itself, as the user. Runtime state lives in \
         $XDG_RUNTIME_DIR/asd.",
    );
    item(
        &mut r,
        "System-wide",
        "root runs `systemctl enable --now asd` (or the commands directly). asd reads \
         /etc/asd.conf, mounts by itself, and copies each target in a child process that has \
         dropped to the target owner's uid and groups. Runtime state lives in /run/asd.",
    );

    section(&mut r, "DATABASES");
    para(
        &mut r,
        "Programs keep SQLite databases in the directories people sync (browser history and \
         cookies, mail indexes), written all the time. Copied file by file, a database and its \
         -wal or -journal would be read at different moments and could be corrupt on disk. A \
         write-back (resync, unsync, the overlay mode's change set, recovery) therefore writes \
         each SQLite database as one consistent state: it copies the database and its log, checks \
         that what it read is what one moment left on disk (holding a read transaction through \
         SQLite where the program allows one; WAL readers never block the program), lets SQLite \
         recover that copy into one file, and puts it in place after removing the old -wal and \
         -journal beside it. A database that keeps changing through 8 attempts (about a second) \
         keeps its last consistent copy on disk, and the write-back fails and is retried. \
         Rollback-journal databases are read without a lock first; the lock, when needed, makes \
         the program's commits wait for the copy of the database (its busy timeout covers that). \
         Other formats are copied file by file: LevelDB stores (Chromium's Local Storage and \
         IndexedDB) can be torn by a resync during a compaction, so close such programs before \
         `asd unsync`, which refuses while they have files open; see README.md.",
    );

    section(&mut r, "THE DAEMON");
    para(
        &mut r,
        "`asd daemon` syncs every target, tells systemd it is ready (sd_notify READY=1, with a \
         STATUS line naming the last write-back), writes back every RESYNC_INTERVAL (see \
         asd.conf(5); default 1h), and on SIGTERM or SIGINT writes back, unmounts and exits 0. \
         SIGUSR1 (`systemctl --user kill -s USR1 asd`) writes back at once. A daemon that is \
         killed leaves its targets in RAM; the next start writes them back or recovers them.",
    );
    para(
        &mut r,
        "Suspend and hibernate: the daemon (per user and system-wide) holds a logind delay \
         inhibitor for sleep on the system bus (`systemd-inhibit --list` shows it as asd, \
         \"writing back RAM copies\"). When a suspend or hibernation begins \
         (PrepareForSleep), it writes every target back and releases the inhibitor once the \
         write-back is durable, or when logind stops waiting (InhibitDelayMaxSec=, see \
         logind.conf(5)); after the resume it takes a new one. Without a system bus or \
         without logind it says so once and carries on without.",
    );
    para(
        &mut r,
        "RAM filling up: every few seconds the daemon looks at how full the file system of \
         the volatile area is and at the system's memory pressure (/proc/pressure/memory). \
         When the area is 80% full, or tasks waited for memory 10% of the last minute (PSI \
         some avg60), it logs a warning (once; once more if it cleared, below 75% or 5%, and \
         came back), adds it to the unit's status line and to `asd preview`, and writes back \
         at once and then at most every 5 minutes while it lasts, so that less is at risk. A \
         write into a target that fails because the area is full costs nothing already \
         written back; a target that does not fit into the area is refused at sync with an \
         error that says so, and left as it was.",
    );

    section(&mut r, "STATUS AND PROGRESS");
    para(
        &mut r,
        "`asd preview` (and `asd preview --json`) shows per target, besides asd 6.0's fields, \
         whether it is in RAM and how much it holds there, when its last resync finished and \
         how long it took; and for the whole: how full the volatile area is, the memory \
         pressure, whether the helper answers (per-user mode), and any warning above.",
    );
    para(
        &mut r,
        "`asd sync`, `asd resync` and `asd unsync` run at a terminal show a progress line on \
         standard error once they have run for about a second: the target, the step, files \
         done of the total, bytes written (of the total when copying into RAM), the rate and \
         the time, redrawn in place. Never when standard error is not a terminal, under \
         systemd (INVOCATION_ID or JOURNAL_STREAM set), or with --quiet.",
    );

    section(&mut r, "ENVIRONMENT");
    item(
        &mut r,
        "ASDCONF",
        "Use this configuration file instead of the default one.",
    );
    item(&mut r, "DEBUG=1", "Same as --verbose.");
    item(
        &mut r,
        "ASD_LOG",
        "A tracing filter for the log (for example `debug`), overriding the default.",
    );
    item(
        &mut r,
        "ASD_RUNTIME_DIR",
        "Keep the lock and state here instead of /run/asd or $XDG_RUNTIME_DIR/asd.",
    );
    item(
        &mut r,
        "ASD_HELPER_SOCKET",
        "Talk to asd-helper on this socket instead of /run/asd/io.asd.Helper.",
    );
    item(
        &mut r,
        "NO_COLOR",
        "Do not colour the output (the progress line included).",
    );
    item(
        &mut r,
        "DBUS_SYSTEM_BUS_ADDRESS",
        "Where the daemon finds the system bus (and logind on it) for the sleep inhibitor.",
    );

    section(&mut r, "FILES");
    item(
        &mut r,
        "/etc/asd.conf",
        "The system-wide configuration (root).",
    );
    item(
        &mut r,
        "${XDG_CONFIG_HOME:-~/.config}/asd/asd.conf",
        "A user's configuration.",
    );
    item(
        &mut r,
        "/run/asd, $XDG_RUNTIME_DIR/asd",
        "Runtime state: the lock, the snapshot of the configuration taken at sync, and what is in RAM.",
    );
    item(
        &mut r,
        "$VOLATILE/asd-USER/...",
        "The copies in RAM (mode 0700, owned by the user).",
    );
    item(
        &mut r,
        "/p/.name-backup_asd",
        "The original directory of a target /p/name, reachable while the target is in RAM.",
    );
    item(
        &mut r,
        "/p/.name-backup_asd-crashrecovery-YYYYMMDD_HHMMSS.tar.zstd",
        "A crash-recovery snapshot (a zstd-compressed tar; restore with `tar -xf`). \
         `asd clean` deletes them.",
    );

    section(&mut r, "EXIT STATUS");
    para(
        &mut r,
        "0 on success; non-zero with a message on standard error when a command fails.",
    );

    section(&mut r, "EXAMPLES");
    r.control("nf", [])
        .text([roman(
            "systemctl --user enable --now asd\n\
             $EDITOR ~/.config/asd/asd.conf    # WHATTOSYNC=(~/.cache/thumbnails)\n\
             systemctl --user restart asd\n\
             asd p\n",
        )])
        .control("fi", []);

    section(&mut r, "SEE ALSO");
    r.text([
        bold("asd.conf"),
        roman("(5), "),
        bold("asd-helper"),
        roman("(8), "),
        bold("systemctl"),
        roman("(1), "),
        bold("tmpfs"),
        roman("(5), "),
        italic("https://example.invalid/asd"),
    ]);
    buf.extend_from_slice(r.render().as_bytes());
    man.render_version_section(&mut buf)?;

    let page = out.join("asd.1");
    fs::File::create(&page)?.write_all(&buf)?;
    let alias = out.join("anything-sync-daemon.1");
    fs::write(&alias, ".so man1/asd.1\n")?;
    Ok(vec![page, alias])
}

fn completions(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (shell, dir) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = out.join(dir);
        fs::create_dir_all(&dir)?;
        for name in NAMES {
            let mut cmd = asd::cli::command().name(name);
            let path = clap_complete::generate_to(shell, &mut cmd, name, &dir)?;
            // bash-completion looks the file up by the command's name, without a suffix.
            let path = if shell == Shell::Bash {
                let plain = dir.join(name);
                fs::rename(&path, &plain)?;
                plain
            } else {
                path
            };
            written.push(path);
        }
    }
    Ok(written)
}
