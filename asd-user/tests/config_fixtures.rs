//! Table-driven config tests: every directory under tests/fixtures/config is one case, so a new
//! case is a new directory, never new code.
//!
//! A case holds `asd.conf` and either
//! - `expected.json`: the `Config` as serde_json, plus `"warnings": [[line, "substring"], ...]`
//!   (exactly these warnings, in any order) and optionally `"home": "/home/alice"` (a per-user
//!   config), or
//! - `error.txt`: lines `LINE: substring`, each of which must match a reported problem; no problem
//!   may be on any other line. A line `home: /path` parses as a per-user config; `#` lines are
//!   comments.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use asd::config::{parse, Config, ConfigError, Expand};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

fn check_expected(dir: &Path, text: &str, conf: &Path) -> Result<(), String> {
    let raw = fs::read_to_string(dir.join("expected.json")).map_err(|e| e.to_string())?;
    let mut json: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| format!("expected.json: {e}"))?;
    let obj = json
        .as_object_mut()
        .ok_or("expected.json is not an object")?;
    let home = match obj.remove("home") {
        None => None,
        Some(serde_json::Value::String(h)) => Some(PathBuf::from(h)),
        Some(other) => return Err(format!("expected.json: bad home {other}")),
    };
    let want_warnings: Vec<(usize, String)> = match obj.remove("warnings") {
        None => Vec::new(),
        Some(w) => serde_json::from_value(w).map_err(|e| format!("expected.json warnings: {e}"))?,
    };
    let want: Config =
        serde_json::from_value(json).map_err(|e| format!("expected.json config: {e}"))?;

    let (got, warnings) = parse(text, conf, &Expand { home }).map_err(|e| e.to_string())?;
    if got != want {
        return Err(format!("config differs\n got: {got:?}\nwant: {want:?}"));
    }
    let mut unmatched: Vec<_> = warnings.iter().collect();
    for (line, sub) in &want_warnings {
        match unmatched
            .iter()
            .position(|w| w.line == *line && w.message.contains(sub.as_str()))
        {
            Some(i) => {
                unmatched.remove(i);
            }
            None => return Err(format!("missing warning {line}: {sub:?}; got {warnings:?}")),
        }
    }
    if !unmatched.is_empty() {
        return Err(format!("unexpected warnings: {unmatched:?}"));
    }
    Ok(())
}

fn check_error(dir: &Path, text: &str, conf: &Path) -> Result<(), String> {
    let raw = fs::read_to_string(dir.join("error.txt")).map_err(|e| e.to_string())?;
    let mut home = None;
    let mut want: Vec<(usize, String)> = Vec::new();
    for l in raw.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if l.starts_with('#') {
            continue;
        }
        if let Some(h) = l.strip_prefix("home:") {
            home = Some(PathBuf::from(h.trim()));
            continue;
        }
        let (n, sub) = l
            .split_once(':')
            .ok_or_else(|| format!("error.txt: bad line {l:?}"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("error.txt: bad line number in {l:?}"))?;
        want.push((n, sub.trim().to_string()));
    }
    if want.is_empty() {
        return Err("error.txt lists no problems".into());
    }

    let err = match parse(text, conf, &Expand { home }) {
        Ok((c, w)) => return Err(format!("parsed without error: {c:?}, warnings {w:?}")),
        Err(e) => e,
    };
    let display = err.to_string();
    let problems = match err {
        ConfigError::Invalid { problems, .. } => problems,
        other => return Err(format!("wrong error kind: {other}")),
    };
    for (line, sub) in &want {
        if !problems
            .iter()
            .any(|(l, m)| l == line && m.contains(sub.as_str()))
        {
            return Err(format!("missing problem {line}: {sub:?}; got {problems:?}"));
        }
    }
    let want_lines: BTreeSet<usize> = want.iter().map(|(l, _)| *l).collect();
    let extra: Vec<_> = problems
        .iter()
        .filter(|(l, _)| !want_lines.contains(l))
        .collect();
    if !extra.is_empty() {
        return Err(format!("problems on unexpected lines: {extra:?}"));
    }
    // The message a user sees must name the file and every bad line.
    if !display.contains(&conf.display().to_string()) {
        return Err(format!("Display does not name the file: {display}"));
    }
    for line in &want_lines {
        if !display.contains(&format!("line {line}:")) {
            return Err(format!("Display does not name line {line}: {display}"));
        }
    }
    Ok(())
}

fn check_case(dir: &Path) -> Result<(), String> {
    let conf = dir.join("asd.conf");
    let text = fs::read_to_string(&conf).map_err(|e| format!("asd.conf: {e}"))?;
    let has_expected = dir.join("expected.json").exists();
    let has_error = dir.join("error.txt").exists();
    match (has_expected, has_error) {
        (true, false) => check_expected(dir, &text, &conf),
        (false, true) => check_error(dir, &text, &conf),
        (true, true) => Err("has both expected.json and error.txt".into()),
        (false, false) => Err("has neither expected.json nor error.txt".into()),
    }
}

#[test]
fn config_fixtures() {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .expect("fixtures directory")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures found");

    let failures: Vec<String> = dirs
        .iter()
        .filter_map(|d| {
            let name = d.file_name().unwrap_or_default().to_string_lossy();
            check_case(d).err().map(|e| format!("{name}: {e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
}
