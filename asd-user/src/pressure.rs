//! RAM filling up (issue 10 item 3): how full the volatile area is (statvfs of the tmpfs
//! holding `$VOLATILE/asd-<user>`) and how much the system waits for memory (pressure stall
//! information, `/proc/pressure/memory`).
//!
//! The daemon keeps a [`Watch`]: a warning appears when the area is [`FULL_PERCENT`] full or
//! memory pressure is sustained (`some avg60` at least [`PSI_PERCENT`]: tasks waited for
//! memory that share of the last minute), and clears only well below (hysteresis), so a value
//! that hovers at the threshold does not flood the log. `asd preview` shows the same warnings
//! from one reading ([`warnings_now`]).

use std::fmt;
use std::path::{Path, PathBuf};

/// A warning when the volatile area is at least this full...
pub const FULL_PERCENT: f64 = 80.0;
/// ...cleared when it is below this again.
pub const FULL_CLEAR_PERCENT: f64 = 75.0;
/// A warning when `some avg60` of memory pressure is at least this...
pub const PSI_PERCENT: f64 = 10.0;
/// ...cleared when it is below this again.
pub const PSI_CLEAR_PERCENT: f64 = 5.0;
const PSI_FILE: &str = "/proc/pressure/memory";

/// How much of the file system holding the volatile area is used.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AreaUse {
    pub path: PathBuf,
    pub size: u64,
    pub used: u64,
    /// Available to asd's user (what a write can still get).
    pub available: u64,
    pub percent: f64,
}

/// statvfs of `path`; None when it cannot be read or the file system has no size (a tmpfs
/// mounted with size=0 is unlimited).
pub fn area_use(path: &Path) -> Option<AreaUse> {
    let s = rustix::fs::statvfs(path).ok()?;
    let unit = if s.f_frsize > 0 {
        s.f_frsize
    } else {
        s.f_bsize
    };
    let size = s.f_blocks.checked_mul(unit)?;
    if size == 0 {
        return None;
    }
    let used = s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit);
    Some(AreaUse {
        path: path.to_path_buf(),
        size,
        used,
        available: s.f_bavail.saturating_mul(unit),
        percent: used as f64 * 100.0 / size as f64,
    })
}

/// The `some` line of memory pressure: shares (percent) of time in which at least one task
/// waited for memory, averaged over 10 s, 60 s and 300 s.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Psi {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
}

/// None without PSI (a kernel without CONFIG_PSI, or booted with psi=0).
pub fn memory_pressure() -> Option<Psi> {
    parse_psi(&std::fs::read_to_string(PSI_FILE).ok()?)
}

pub fn parse_psi(text: &str) -> Option<Psi> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let field = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Psi {
        avg10: field("avg10")?,
        avg60: field("avg60")?,
        avg300: field("avg300")?,
    })
}

/// Something that puts what is in RAM at risk.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Warning {
    /// The volatile area is nearly full: writes into the targets will soon fail.
    VolatileFull(AreaUse),
    /// The system has been short of memory for a while (tmpfs pages may go to swap, or the
    /// OOM killer may come).
    MemoryPressure(Psi),
}

impl Warning {
    /// A stable short name (for "cleared" messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Warning::VolatileFull(_) => "volatile area",
            Warning::MemoryPressure(_) => "memory pressure",
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::VolatileFull(a) => write!(
                f,
                "the volatile area {} is {:.0}% full ({} of {}): writes into the targets fail when it is full",
                a.path.display(),
                a.percent,
                crate::show::human(a.used),
                crate::show::human(a.size)
            ),
            Warning::MemoryPressure(p) => write!(
                f,
                "memory is short: tasks waited for memory {:.1}% of the last minute (PSI some avg60)",
                p.avg60
            ),
        }
    }
}

/// The warnings of one reading, without hysteresis (for `asd preview`).
pub fn warnings_now(volatile: &Path) -> Vec<Warning> {
    let mut w = Watch::default();
    w.step(area_use(volatile), memory_pressure());
    w.active()
}

/// The daemon's view over time: which warnings are on.
#[derive(Debug, Default)]
pub struct Watch {
    full: Option<AreaUse>,
    pressure: Option<Psi>,
}

/// What changed with one reading.
#[derive(Debug, Default, PartialEq)]
pub struct Change {
    pub appeared: Vec<Warning>,
    pub cleared: Vec<&'static str>,
}

impl Change {
    pub fn any(&self) -> bool {
        !self.appeared.is_empty() || !self.cleared.is_empty()
    }
}

impl Watch {
    /// Reads the area and the pressure now.
    pub fn check(&mut self, volatile: &Path) -> Change {
        self.step(area_use(volatile), memory_pressure())
    }

    /// One reading (None: not available, which clears nothing and raises nothing).
    pub fn step(&mut self, area: Option<AreaUse>, psi: Option<Psi>) -> Change {
        let mut c = Change::default();
        if let Some(a) = area {
            let on = self.full.is_some();
            if !on && a.percent >= FULL_PERCENT {
                c.appeared.push(Warning::VolatileFull(a.clone()));
                self.full = Some(a);
            } else if on && a.percent < FULL_CLEAR_PERCENT {
                c.cleared.push("volatile area");
                self.full = None;
            } else if on {
                self.full = Some(a);
            }
        }
        if let Some(p) = psi {
            let on = self.pressure.is_some();
            if !on && p.avg60 >= PSI_PERCENT {
                c.appeared.push(Warning::MemoryPressure(p));
                self.pressure = Some(p);
            } else if on && p.avg60 < PSI_CLEAR_PERCENT {
                c.cleared.push("memory pressure");
                self.pressure = None;
            } else if on {
                self.pressure = Some(p);
            }
        }
        c
    }

    /// The warnings that are on, with their latest readings.
    pub fn active(&self) -> Vec<Warning> {
        let mut v = Vec::new();
        if let Some(a) = &self.full {
            v.push(Warning::VolatileFull(a.clone()));
        }
        if let Some(p) = self.pressure {
            v.push(Warning::MemoryPressure(p));
        }
        v
    }
}

/// The message of an error caused by a full volatile area (ENOSPC while copying into RAM),
/// which names the area and what to do; None for any other error. The copy's errors arrive
/// as text from the worker, where the error number is spelled `(os error 28)`.
pub fn explain_full(message: &str, volatile: &Path) -> Option<String> {
    if !message.contains(&format!("(os error {})", libc::ENOSPC)) {
        return None;
    }
    let size = area_use(volatile)
        .map(|a| format!(" of {}", crate::show::human(a.size)))
        .unwrap_or_default();
    Some(format!(
        "the volatile area {}{size} is full: it cannot hold this target; make it bigger (the tmpfs's size= option) or keep less in RAM",
        volatile.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(percent: f64) -> AreaUse {
        AreaUse {
            path: "/tmp".into(),
            size: 1000,
            used: (percent * 10.0) as u64,
            available: 1000 - (percent * 10.0) as u64,
            percent,
        }
    }

    fn psi(avg60: f64) -> Psi {
        Psi {
            avg10: avg60,
            avg60,
            avg300: 0.0,
        }
    }

    #[test]
    fn parses_the_kernels_format() {
        let text = "some avg10=1.50 avg60=12.25 avg300=0.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(
            parse_psi(text),
            Some(Psi {
                avg10: 1.5,
                avg60: 12.25,
                avg300: 0.0
            })
        );
        assert_eq!(
            parse_psi("full avg10=0.00 avg60=0.00 avg300=0.00 total=0"),
            None
        );
        assert_eq!(parse_psi("some avg10=x avg60=1 avg300=1"), None);
        // This machine's own file, when it has one, is in that format.
        if let Ok(t) = std::fs::read_to_string(PSI_FILE) {
            assert!(parse_psi(&t).is_some(), "{t}");
        }
    }

    #[test]
    fn warns_once_clears_below_and_warns_again() {
        let mut w = Watch::default();
        assert!(!w.step(Some(area(50.0)), Some(psi(0.0))).any());
        let c = w.step(Some(area(85.0)), None);
        assert_eq!(c.appeared, vec![Warning::VolatileFull(area(85.0))]);
        // Still on, and not said again; no reading clears nothing.
        assert!(!w.step(Some(area(90.0)), None).any());
        assert!(!w.step(None, None).any());
        assert!(!w.step(Some(area(77.0)), None).any());
        assert_eq!(w.active(), vec![Warning::VolatileFull(area(77.0))]);
        assert_eq!(
            w.step(Some(area(70.0)), None).cleared,
            vec!["volatile area"]
        );
        assert!(w.active().is_empty());
        assert_eq!(w.step(Some(area(80.0)), None).appeared.len(), 1);
        // Pressure: sustained (avg60), with its own hysteresis.
        assert_eq!(w.step(None, Some(psi(12.0))).appeared.len(), 1);
        assert!(!w.step(None, Some(psi(6.0))).any());
        assert_eq!(
            w.step(None, Some(psi(1.0))).cleared,
            vec!["memory pressure"]
        );
    }

    #[test]
    fn names_a_full_area_only_for_enospc() {
        let msg = "write /vol/asd-u/x/big: No space left on device (os error 28)";
        let got = explain_full(msg, Path::new("/vol")).unwrap();
        assert!(got.contains("/vol") && got.contains("is full"), "{got}");
        assert_eq!(
            explain_full("permission denied (os error 13)", Path::new("/vol")),
            None
        );
    }
}
