//! The progress line on stderr: one line, redrawn in place (carriage return, then spaces over
//! what is left of the previous one, so no terminal escapes are needed), shown only to a person
//! at a terminal and only once a command has run for about a second. Log lines go through
//! [`log_writer`], which clears the line first so the two never mix; the next redraw brings
//! it back under them.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{counts, current_task, Counts};
use crate::show::human;

/// How long a command runs before its progress is shown.
const SHOW_AFTER: Duration = Duration::from_secs(1);
const REDRAW: Duration = Duration::from_millis(200);
/// The rate is of the bytes written over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// Visible width of the line on screen now (0: nothing drawn). Held while anything is written
/// to stderr, so that the line and log lines never interleave.
static DRAWN: Mutex<usize> = Mutex::new(0);

/// Whether a command in this process should show progress: stderr is a terminal, not under
/// systemd (its journal is no terminal, and INVOCATION_ID or JOURNAL_STREAM say it runs
/// there), and not `--quiet`.
pub fn wanted(quiet: bool) -> bool {
    let systemd = ["INVOCATION_ID", "JOURNAL_STREAM"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    !quiet && !systemd && std::io::stderr().is_terminal()
}

/// Switches progress on and starts redrawing the line (for the rest of the process).
pub fn start() {
    super::switch_on();
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let started = Instant::now();
    let spawned = std::thread::Builder::new()
        .name("asd-progress-line".into())
        .spawn(move || {
            let mut rate = Rate::default();
            loop {
                std::thread::sleep(REDRAW);
                if started.elapsed() < SHOW_AFTER {
                    continue;
                }
                let Some(task) = current_task() else {
                    rate = Rate::default();
                    continue;
                };
                let c = counts();
                let per_sec = rate.update(c.bytes, Instant::now());
                let line = render(
                    &task.label,
                    task.phase.as_deref(),
                    c,
                    per_sec,
                    task.began.elapsed(),
                );
                draw(&line, colour.then_some(task.label.len()));
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("no progress line: {e}");
    }
}

/// Bytes per second over the last [`RATE_WINDOW`].
#[derive(Default)]
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn update(&mut self, bytes: u64, now: Instant) -> Option<f64> {
        // Fewer bytes than before: a new phase began.
        if self.samples.back().is_some_and(|(_, b)| *b > bytes) {
            self.samples.clear();
        }
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, b0) = *self.samples.front()?;
        let dt = now.duration_since(t0).as_secs_f64();
        (dt >= 0.5).then(|| (bytes - b0) as f64 / dt)
    }
}

/// `sync /x: copying into RAM: 1,234/5,000 files, 12M/40M, 8.1M/s, 3 s`
pub fn render(
    label: &str,
    phase: Option<&str>,
    c: Counts,
    per_sec: Option<f64>,
    elapsed: Duration,
) -> String {
    let mut s = label.to_string();
    if let Some(p) = phase {
        s.push_str(": ");
        s.push_str(p);
    }
    let mut parts = Vec::new();
    let started = c.files > 0 || c.bytes > 0;
    match c.total_files {
        Some(tf) => parts.push(format!(
            "{}/{} files",
            grouped(c.files.min(tf)),
            grouped(tf)
        )),
        None if started => parts.push(format!("{} files", grouped(c.files))),
        None => {}
    }
    match c.total_bytes {
        Some(tb) => parts.push(format!("{}/{}", human(c.bytes), human(tb.max(c.bytes)))),
        None if started || c.total_files.is_some() => {
            parts.push(format!("{} written", human(c.bytes)))
        }
        None => {}
    }
    if let Some(r) = per_sec.filter(|_| c.bytes > 0) {
        parts.push(format!("{}/s", human(r as u64)));
    }
    parts.push(format!("{} s", elapsed.as_secs()));
    s.push_str(": ");
    s.push_str(&parts.join(", "));
    s
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn width() -> usize {
    rustix::termios::tcgetwinsize(std::io::stderr())
        .ok()
        .map(|w| usize::from(w.ws_col))
        .filter(|w| *w > 0)
        .unwrap_or(80)
}

/// Draws `line` over the previous one; `bold`: the length of the label to embolden.
fn draw(line: &str, bold: Option<usize>) {
    // One column short of the width: a line that fills it would wrap on some terminals, and a
    // wrapped line cannot be redrawn with a carriage return.
    let fit: String = line.chars().take(width().saturating_sub(1)).collect();
    let visible = fit.chars().count();
    let shown = match bold {
        Some(n) if n <= fit.len() && fit.is_char_boundary(n) => {
            format!("\x1b[1m{}\x1b[0m{}", &fit[..n], &fit[n..])
        }
        _ => fit,
    };
    let Ok(mut drawn) = DRAWN.lock() else { return };
    let pad = drawn.saturating_sub(visible);
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r{shown}{:pad$}", "");
    let _ = err.flush();
    *drawn = visible;
}

/// Clears the line, if one is shown (a task ended).
pub fn clear() {
    if let Ok(mut drawn) = DRAWN.lock() {
        erase(&mut drawn);
    }
}

fn erase(drawn: &mut usize) {
    if *drawn > 0 {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{:w$}\r", "", w = *drawn);
        let _ = err.flush();
        *drawn = 0;
    }
}

/// The writer for log lines: clears the progress line before each write.
pub fn log_writer() -> LogWriter {
    LogWriter
}

pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match DRAWN.lock() {
            Ok(mut drawn) => {
                erase(&mut drawn);
                std::io::stderr().write(buf)
            }
            Err(_) => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match DRAWN.lock() {
            Ok(mut drawn) => {
                erase(&mut drawn);
                std::io::stderr().write_all(buf)
            }
            Err(_) => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_totals_rate_and_time() {
        let c = Counts {
            files: 1234,
            bytes: 12 * 1024 * 1024,
            total_files: Some(5000),
            total_bytes: Some(40 * 1024 * 1024),
        };
        assert_eq!(
            render(
                "sync /x",
                Some("copying into RAM"),
                c,
                Some(8.5 * 1048576.0),
                Duration::from_secs(3)
            ),
            "sync /x: copying into RAM: 1,234/5,000 files, 12M/40M, 8.5M/s, 3 s"
        );
        let back = Counts {
            total_bytes: None,
            ..c
        };
        assert_eq!(
            render("resync /x", None, back, None, Duration::from_secs(1)),
            "resync /x: 1,234/5,000 files, 12M written, 1 s"
        );
        let none = Counts::default();
        assert_eq!(
            render(
                "unsync /x",
                Some("deleting the RAM copy"),
                none,
                None,
                Duration::from_secs(2)
            ),
            "unsync /x: deleting the RAM copy: 2 s"
        );
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1234567), "1,234,567");
    }

    #[test]
    fn rate_is_over_the_window_and_restarts_with_a_new_phase() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        assert_eq!(r.update(0, t0), None);
        let got = r.update(1000, t0 + Duration::from_secs(1)).unwrap();
        assert!((got - 1000.0).abs() < 1e-6);
        assert_eq!(r.update(10, t0 + Duration::from_millis(1100)), None);
    }
}
