//! The status view (issue 10 item 6): `asd preview` and `asd preview --json` show per target
//! the last resync's time and duration (kept in the runtime state), the bytes held in RAM,
//! how full the volatile area is, whether the helper answers (per-user mode), and warnings.

mod common;

use std::path::Path;

use common::world::World;
use common::*;

fn preview_json(w: &World, user: &str, conf: &Path, socket: Option<&Path>) -> serde_json::Value {
    let out = match socket {
        None => w.asd_as(user, conf, &["preview", "--json"]),
        Some(s) => {
            // The same command with the helper's socket somewhere nothing listens.
            let mut c = w.cmd_as(user, "env");
            c.arg("-i")
                .arg(format!("HOME=/home/{user}"))
                .arg(format!(
                    "XDG_RUNTIME_DIR={}",
                    w.ns.root.join(format!("xdg-{user}")).display()
                ))
                .arg(format!("ASD_HELPER_SOCKET={}", s.display()))
                .arg(format!("ASDCONF={}", conf.display()))
                .arg(ASD)
                .args(["preview", "--json"]);
            c.output().expect("asd preview")
        }
    };
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("preview JSON")
}

#[test]
fn preview_shows_resync_times_ram_use_area_and_helper() {
    let Some(w) = World::new() else { return };
    let user = "asdalice";
    let (_, target, conf) = w.user_setup(user, "status-view");
    // Not running yet: nothing in RAM, no resync.
    let j = preview_json(&w, user, &conf, None);
    assert_eq!(j["running"], false, "{j:#}");
    assert_eq!(j["targets"][0]["in_ram"], false);
    assert!(j["targets"][0]["last_resync"].is_null());

    w.asd_as_ok(user, &conf, &["sync"]);
    w.ns.sh_ok(&format!(
        "head -c 300000 /dev/zero | su {user} -s /bin/sh -c 'cat > {}/blob'",
        target.display()
    ));
    let j = preview_json(&w, user, &conf, None);
    let t = &j["targets"][0];
    assert_eq!(t["in_ram"], true, "{j:#}");
    assert!(t["last_resync"].is_null(), "no resync yet: {j:#}");
    assert!(
        t["ram_bytes"].as_u64().unwrap() >= 300_000,
        "the RAM copy holds the blob: {j:#}"
    );
    assert_eq!(j["helper_reachable"], true, "{j:#}");
    let area = &j["volatile_use"];
    assert!(area["size"].as_u64().unwrap() > 0, "{j:#}");
    assert!(area["used"].as_u64().unwrap() >= 300_000, "{j:#}");
    assert!(area["percent"].as_f64().is_some(), "{j:#}");
    assert_eq!(j["warnings"], serde_json::json!([]), "{j:#}");

    let before = asd::show::now_secs();
    w.asd_as_ok(user, &conf, &["resync"]);
    let after = asd::show::now_secs();
    let j = preview_json(&w, user, &conf, None);
    let t = &j["targets"][0];
    let at = t["last_resync"].as_u64().expect("last resync time");
    assert!((before..=after).contains(&at), "{at} in {before}..={after}");
    assert!(t["last_resync_ms"].as_u64().is_some(), "{j:#}");
    assert!(j["last_resync_ms"].as_u64().is_some(), "{j:#}");
    assert!(
        j["last_resync"].as_u64().is_some_and(|all| all >= at),
        "{j:#}"
    );

    // The text keeps asd 6.0's layout and adds the new lines.
    let text = w.asd_as_ok(user, &conf, &["preview"]);
    for expected in [
        "owner/group id:",
        "target to manage:",
        "sync target:",
        "tmpfs target:",
        "dir size:",
        "in RAM: yes (",
        "last resync: ",
        "(took ",
        "recovery dirs:",
        "the asd helper answers",
        " used (",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    // The helper gone: said so.
    let nowhere = w.ns.root.join("no-helper.sock");
    let j = preview_json(&w, user, &conf, Some(&nowhere));
    assert_eq!(j["helper_reachable"], false, "{j:#}");

    w.asd_as_ok(user, &conf, &["unsync"]);
    assert!(w.ns.our_mounts().is_empty(), "{:?}", w.ns.our_mounts());
}

#[test]
fn overlay_targets_show_the_changes_held_in_ram() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let t = ns.data().join("ov");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("big"), vec![7u8; 2_000_000]).unwrap();
    ns.write_conf(&[&t], "USE_OVERLAYFS=yes");
    ns.asd_ok(&["sync"]);
    std::fs::write(ns.inside(&t.join("changed")), vec![1u8; 100_000]).unwrap();
    ns.asd_ok(&["resync"]);
    let out = ns.asd(&["preview", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = &j["targets"][0];
    let ram = v["ram_bytes"].as_u64().unwrap();
    assert!(
        (100_000..2_000_000).contains(&ram),
        "only the changes are in RAM: {j:#}"
    );
    assert!(v["dir_size"].as_u64().unwrap() >= 2_100_000, "{j:#}");
    assert!(v["last_resync"].as_u64().is_some(), "{j:#}");
    // Root's preview does not ask for a helper.
    assert!(j["helper_reachable"].is_null(), "{j:#}");
    let text = ns.asd_ok(&["preview"]);
    assert!(
        text.contains("overlayfs size:") && text.contains("(took "),
        "{text}"
    );
    ns.asd_ok(&["unsync"]);
}
