//! asd-helper.service stays confined (issue 11 item 4): `systemd-analyze security` scores the
//! unit file, with @LIBEXECDIR@ filled in as `make install` does, at 3.0 or less. The e2e test
//! (tests/e2e/run.sh) scores the installed unit in the container the same way and reads the
//! capabilities of the running helper; tests/polkit.rs runs the helper as the unit does.

use std::path::Path;
use std::process::Command;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../systemd/system/asd-helper.service"
);
const SOCKET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../systemd/system/asd-helper.socket"
);

/// The highest exposure allowed, in tenths (systemd-analyze prints 3.0 for 30).
const MAX_EXPOSURE: u32 = 30;

/// The unit as `make install PREFIX=/usr` installs it, in a directory of its own (with its
/// socket, which it requires).
fn installed_unit(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        text.contains("@LIBEXECDIR@"),
        "the unit's ExecStart= changed"
    );
    let unit = dir.join("asd-helper.service");
    std::fs::write(&unit, text.replace("@LIBEXECDIR@", "/usr/libexec")).unwrap();
    std::fs::copy(SOCKET, dir.join("asd-helper.socket")).unwrap();
    unit
}

#[test]
fn helper_unit_exposure_is_at_most_3_0() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed_unit(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE}"))
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze: {e} (it is in Debian's systemd package; tests/run.sh installs it)"
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // "→ Overall exposure level for asd-helper.service: 3.0 OK 🙂"
    let score = overall
        .rsplit_once(": ")
        .and_then(|(_, s)| s.split_whitespace().next())
        .unwrap_or_default();
    let (whole, tenths) = score.split_once('.').unwrap_or((score, "0"));
    let tenths: u32 = whole.parse::<u32>().unwrap() * 10 + tenths.parse::<u32>().unwrap();
    let worse: Vec<&str> = text.lines().filter(|l| l.starts_with('✗')).collect();
    assert!(
        tenths <= MAX_EXPOSURE && out.status.success(),
        "asd-helper.service scores {score} (at most {}.{} allowed); what is exposed:\n{}",
        MAX_EXPOSURE / 10,
        MAX_EXPOSURE % 10,
        worse.join("\n")
    );
    // It runs as its own user, not root, and gets its capabilities as ambient ones only.
    assert!(
        text.lines()
            .any(|l| l.starts_with('✓') && l.contains("User=/DynamicUser=")),
        "{text}"
    );
}

/// The check can fail: the same unit, run as root with CAP_CHOWN (as it was), scores above 3.0.
#[test]
fn the_exposure_check_fails_for_a_looser_unit() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed_unit(dir.path());
    let looser: String = std::fs::read_to_string(&unit)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("User=") && !l.starts_with("Group="))
        .map(|l| {
            if l.starts_with("CapabilityBoundingSet=") {
                format!("{l} CAP_CHOWN\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&unit, looser).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE}"))
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
