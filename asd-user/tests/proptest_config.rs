//! Generated hostile asd.conf files (issue 11 item 1): random text, and the shipped template and
//! the fixtures' configs with random edits. The parser gives a config whose paths are absolute
//! and normalized, or `ConfigError::Invalid` naming the file and lines — never a panic or a hang.
//!
//! Budget: `ASD_PROPTEST_CASES` cases per property (default 256).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use asd::config::{parse, Config, ConfigError, Expand, MAX_RESYNC_INTERVAL};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn config() -> ProptestConfig {
    let cases = std::env::var("ASD_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The shipped examples (systemd/asd.conf, the template a first run writes) and every fixture's
/// asd.conf.
fn seeds() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![std::fs::read_to_string(root.join("../systemd/asd.conf")).unwrap()];
    let fixtures = root.join("tests/fixtures/config");
    let mut dirs: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for d in dirs {
        if let Ok(t) = std::fs::read_to_string(d.join("asd.conf")) {
            out.push(t);
        }
    }
    out.push(asd::config::default_template().to_string());
    out
}

fn plain(p: &Path, root_ok: bool) -> bool {
    let b = p.as_os_str().as_bytes();
    if b == b"/" {
        return root_ok;
    }
    b.starts_with(b"/")
        && !b.contains(&0)
        && b[1..]
            .split(|c| *c == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// The properties of one parse.
fn check(text: &str, home: Option<PathBuf>) -> Result<Option<Config>, TestCaseError> {
    let file = Path::new("/home/u/.config/asd/asd.conf");
    match parse(text, file, &Expand { home }) {
        Ok((cfg, warnings)) => {
            for w in &cfg.whattosync {
                prop_assert!(plain(w, true), "WHATTOSYNC entry {:?}", w);
            }
            let mut sorted = cfg.whattosync.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), cfg.whattosync.len(), "duplicates kept");
            prop_assert!(plain(&cfg.volatile, true), "VOLATILE {:?}", cfg.volatile);
            prop_assert!(
                cfg.resync_interval >= Duration::from_secs(1)
                    && cfg.resync_interval <= MAX_RESYNC_INTERVAL
            );
            let lines = text.lines().count().max(1);
            for w in warnings {
                prop_assert!(w.line >= 1 && w.line <= lines + 1, "{:?}", w);
            }
            Ok(Some(cfg))
        }
        Err(e @ ConfigError::Invalid { .. }) => {
            let msg = e.to_string();
            let ConfigError::Invalid { path, problems } = e else {
                unreachable!()
            };
            prop_assert_eq!(path, file);
            prop_assert!(msg.contains("/home/u/.config/asd/asd.conf"));
            prop_assert!(!problems.is_empty());
            let lines = text.split('\n').count();
            for (line, m) in &problems {
                prop_assert!(
                    *line >= 1 && *line <= lines,
                    "line {} of {}: {}",
                    line,
                    lines,
                    m
                );
                prop_assert!(!m.is_empty());
            }
            Ok(None)
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
    }
}

/// Fragments of shell (and of what is not shell) to splice into configs.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ \\t\\n]",
        Just("\n".to_string()),
        Just("#".to_string()),
        Just("=".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("\\\n".to_string()),
        Just("$HOME".to_string()),
        Just("${HOME}".to_string()),
        Just("$(".to_string()),
        Just("${".to_string()),
        Just("$'".to_string()),
        Just("$".to_string()),
        Just("~".to_string()),
        Just("~root".to_string()),
        Just("`".to_string()),
        Just(";".to_string()),
        Just("&&".to_string()),
        Just("|".to_string()),
        Just(">".to_string()),
        Just("*".to_string()),
        Just("{".to_string()),
        Just("\r".to_string()),
        Just("\0".to_string()),
        Just("/..".to_string()),
        Just("//".to_string()),
        Just("/./".to_string()),
        Just("WHATTOSYNC=(".to_string()),
        Just("VOLATILE=".to_string()),
        Just("RESYNC_INTERVAL=".to_string()),
        Just("BACKUP_LIMIT=99999999999999999999999".to_string()),
        Just("RESYNC_INTERVAL=18446744073709551615h".to_string()),
        Just("export ".to_string()),
        Just("+=".to_string()),
        Just("[0]=".to_string()),
        Just("é\u{202e}".to_string()),
        (1usize..2000).prop_map(|n| "(".repeat(n)),
        (1usize..2000).prop_map(|n| "\\".repeat(n)),
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Truncate(usize),
    DuplicateLine(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), token()).prop_map(|(i, t)| Edit::Insert(i, t)),
        2 => (any::<usize>(), 1usize..20).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => any::<usize>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let len = chars.len();
        match e {
            Edit::Insert(i, t) => {
                let p = i % (len + 1);
                chars.splice(p..p, t.chars());
            }
            Edit::Delete(i, n) => {
                let p = i % (len + 1);
                chars.drain(p..(p + n).min(len));
            }
            Edit::Truncate(i) => chars.truncate(i % (len + 1)),
            Edit::DuplicateLine(i) => {
                let s: String = chars.iter().collect();
                let lines: Vec<&str> = s.split('\n').collect();
                let k = i % lines.len();
                let mut out = lines.clone();
                out.insert(k, lines[k]);
                chars = out.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

/// A config value as bash reads it: single-quoted, with `'` written as `'\''`.
fn quote(bytes: &[u8]) -> String {
    let s = std::str::from_utf8(bytes).unwrap();
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn config_strategy() -> impl Strategy<Value = Config> {
    let path = proptest::collection::vec("[^/\\x00\\n]{1,10}", 1..5).prop_map(|c| {
        let p = format!("/{}", c.join("/"));
        p
    });
    (
        proptest::collection::vec(path.clone(), 0..5),
        path,
        any::<bool>(),
        any::<bool>(),
        0usize..1000,
        any::<bool>(),
        1u64..=MAX_RESYNC_INTERVAL.as_secs(),
    )
        .prop_filter_map(
            "components . and ..",
            |(mut targets, volatile, overlay, backups, limit, hardlinks, secs)| {
                let ok = |p: &String| p.split('/').skip(1).all(|c| c != "." && c != "..");
                if !targets.iter().all(ok) || !ok(&volatile) {
                    return None;
                }
                let mut seen = Vec::new();
                targets.retain(|t| {
                    let new = !seen.contains(t);
                    seen.push(t.clone());
                    new
                });
                Some(Config {
                    whattosync: targets.into_iter().map(PathBuf::from).collect(),
                    volatile: PathBuf::from(volatile),
                    use_overlayfs: overlay,
                    use_backups: backups,
                    backup_limit: limit,
                    hardlink_safety_check: hardlinks,
                    resync_interval: Duration::from_secs(secs),
                })
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Random text over the characters that matter to the parser.
    #[test]
    fn random_text(
        text in "([A-Z_]{1,12}|[=()'\"$~#\\\\ \\t\\n/.;&|*{}`<>-]|[a-z0-9]{1,6}|\\r|é){0,200}",
        home in proptest::option::of("/[a-z]{1,8}(/[a-z.]{1,4}){0,2}"),
    ) {
        check(&text, home.map(PathBuf::from))?;
    }

    /// Any string at all.
    #[test]
    fn any_text(text in any::<String>()) {
        check(&text, None)?;
        check(&text, Some(PathBuf::from("/home/u")))?;
    }

    /// The shipped example, the fixtures and the template, with random edits.
    #[test]
    fn mutated_real_configs(
        seed in any::<usize>(),
        edits in proptest::collection::vec(edit(), 1..8),
        per_user in any::<bool>(),
    ) {
        let seeds = seeds();
        let text = apply(&seeds[seed % seeds.len()], &edits);
        check(&text, per_user.then(|| PathBuf::from("/home/u")))?;
    }

    /// A config written out as bash would read it parses back to itself.
    #[test]
    fn written_configs_read_back(cfg in config_strategy(), quoted_scalars in any::<bool>()) {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let targets: Vec<String> = cfg
            .whattosync
            .iter()
            .map(|p| quote(p.as_os_str().as_bytes()))
            .collect();
        let scalar = |s: String| if quoted_scalars { format!("\"{s}\"") } else { s };
        let text = format!(
            "# generated\nWHATTOSYNC=(\n  {}\n)\nVOLATILE={}\nUSE_OVERLAYFS={}\nUSE_BACKUPS={}\nBACKUP_LIMIT={}\nENABLE_HARDLINK_SAFETY_CHECK={}\nRESYNC_INTERVAL={}\n",
            targets.join("\n  "),
            quote(cfg.volatile.as_os_str().as_bytes()),
            scalar(yes_no(cfg.use_overlayfs).into()),
            scalar(yes_no(cfg.use_backups).into()),
            scalar(cfg.backup_limit.to_string()),
            scalar(u8::from(cfg.hardlink_safety_check).to_string()),
            scalar(format!("{}s", cfg.resync_interval.as_secs())),
        );
        let got = check(&text, None)?;
        prop_assert_eq!(got, Some(cfg), "{}", text);
    }

    /// `~` and `$HOME` with a home that is not UTF-8: the bytes are kept as they are.
    #[test]
    fn non_utf8_home(
        home in proptest::collection::vec(prop_oneof![4 => 0x21u8..0x7f, 1 => 0x80u8..=0xff], 1..20),
        rest in "[a-z]{1,8}",
        form in 0u8..3,
    ) {
        let mut h = b"/".to_vec();
        h.extend(home.iter().map(|&b| if b == b'/' { b'_' } else { b }));
        let home = PathBuf::from(OsString::from_vec(h.clone()));
        let text = match form {
            0 => format!("WHATTOSYNC=(~/{rest})\n"),
            1 => format!("WHATTOSYNC=(\"$HOME/{rest}\")\n"),
            _ => format!("WHATTOSYNC=\"${{HOME}}/{rest}\"\n"),
        };
        let got = check(&text, Some(home.clone()))?;
        let component = &h[1..];
        if component == b".." {
            prop_assert_eq!(got, None);
        } else if component == b"." {
            prop_assert_eq!(got.map(|c| c.whattosync), Some(vec![Path::new("/").join(&rest)]));
        } else {
            prop_assert_eq!(got.map(|c| c.whattosync), Some(vec![home.join(&rest)]));
        }
    }
}
