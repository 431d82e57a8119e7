//! Generated tampering with `state.json` (issue 11 item 1). In per-user mode the state lives in a
//! directory its user can write; whatever is in it, loading it either fails with
//! `StateError::Corrupt` naming the file to remove, or gives targets that are exactly what the
//! state's own config derives (`TargetPaths::new`), so the manager never writes outside them and
//! never asks the helper for a target the config does not name.
//!
//! Budget: `ASD_PROPTEST_CASES` cases per property (default 256).

use std::path::{Path, PathBuf};
use std::time::Duration;

use asd::config::Config;
use asd::paths::TargetPaths;
use asd::state::{Mode, Owner, Runtime, Stage, State, StateError, TargetState};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;

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

fn plain_path() -> impl Strategy<Value = PathBuf> {
    proptest::collection::vec("\\.?[a-z0-9_-]{1,8}", 1..5)
        .prop_map(|c| PathBuf::from(format!("/{}", c.join("/"))))
}

/// A state asd could have written.
fn valid_state() -> impl Strategy<Value = State> {
    (
        proptest::collection::vec(plain_path(), 1..5),
        plain_path(),
        any::<bool>(),
        "[a-z_][a-z0-9_-]{0,12}",
        1u32..70_000,
        proptest::collection::vec(any::<bool>(), 5),
    )
        .prop_map(|(mut targets, volatile, overlay, name, uid, recorded)| {
            targets.sort();
            targets.dedup();
            let config = Config {
                whattosync: targets.clone(),
                volatile: volatile.clone(),
                use_overlayfs: overlay,
                ..Config::default()
            };
            let mut st = State::new(Path::new("/home/u/.config/asd/asd.conf"), &config);
            for (t, rec) in targets.iter().zip(recorded) {
                if !rec {
                    continue;
                }
                st.upsert(TargetState {
                    paths: TargetPaths::new(t, &name, &volatile).unwrap(),
                    owner: Owner {
                        uid,
                        gid: uid,
                        name: name.clone(),
                        groups: vec![uid],
                    },
                    mode: if overlay { Mode::Overlay } else { Mode::Copy },
                    stage: Stage::Synced,
                    clean_since: None,
                    full_compare_at: Some(1),
                    clean_clock: None,
                    write_back: None,
                });
            }
            st
        })
}

/// Values an attacker would put in a path field.
fn hostile_path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/etc".to_string()),
        Just("/".to_string()),
        Just(String::new()),
        Just("relative/dir".to_string()),
        Just("/home/u/../../etc".to_string()),
        Just("/home/u/./x".to_string()),
        Just("/home//u".to_string()),
        Just("/home/u/".to_string()),
        Just("/home/u\u{0}/x".to_string()),
        Just("/tmp/asd-u/../../etc".to_string()),
        "(/|\\.\\.|\\.|[a-z]{1,4}){0,8}",
        any::<String>(),
    ]
}

const PATH_FIELDS: &[&str] = &[
    "target",
    "backup",
    "old",
    "old_partial",
    "user_area",
    "volatile",
    "upper",
    "work",
    "changes",
];

#[derive(Debug, Clone)]
enum Tamper {
    /// A path of one target.
    TargetPath(usize, usize, String),
    /// A path field copied from another target.
    SwapPaths(usize, usize),
    OwnerName(usize, String),
    OwnerUid(usize, u32),
    Mode(usize),
    Volatile(String),
    Whattosync(usize, String),
    DropWhattosync(usize),
    Overlay,
    DuplicateTarget(usize),
    /// A target with consistent paths that the config does not name.
    ExtraTarget(String),
    Interval(u64),
    Version(u32),
    /// Raw bytes of the file: flip, insert, truncate.
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    let i = any::<usize>;
    prop_oneof![
        4 => (i(), i(), hostile_path()).prop_map(|(a, b, p)| Tamper::TargetPath(a, b, p)),
        1 => (i(), i()).prop_map(|(a, b)| Tamper::SwapPaths(a, b)),
        2 => (i(), prop_oneof![Just("..".to_string()), Just("a/../../x".to_string()), Just(String::new()), Just("x\u{0}".to_string()), "[a-z./]{0,10}"])
            .prop_map(|(a, n)| Tamper::OwnerName(a, n)),
        1 => (i(), any::<u32>()).prop_map(|(a, u)| Tamper::OwnerUid(a, u)),
        1 => i().prop_map(Tamper::Mode),
        2 => hostile_path().prop_map(Tamper::Volatile),
        2 => (i(), hostile_path()).prop_map(|(a, p)| Tamper::Whattosync(a, p)),
        1 => i().prop_map(Tamper::DropWhattosync),
        1 => Just(Tamper::Overlay),
        1 => i().prop_map(Tamper::DuplicateTarget),
        1 => prop_oneof![Just("/etc".to_string()), Just("/root/.ssh".to_string()), "/[a-z]{1,6}"].prop_map(Tamper::ExtraTarget),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()].prop_map(Tamper::Interval),
        1 => any::<u32>().prop_map(Tamper::Version),
        2 => (i(), any::<u8>()).prop_map(|(a, b)| Tamper::Flip(a, b)),
        2 => (i(), prop_oneof![
            Just(b"\0".to_vec()), Just(b"\xff".to_vec()), Just(b"[[[[".to_vec()),
            Just(b"1e999".to_vec()), Just(b",\"x\":1".to_vec()), Just(b"\"".to_vec()),
        ]).prop_map(|(a, b)| Tamper::Insert(a, b)),
        1 => i().prop_map(Tamper::Truncate),
    ]
}

fn targets_mut(v: &mut Value) -> &mut Vec<Value> {
    v["targets"].as_array_mut().unwrap()
}

fn apply(state: &State, tampers: &[Tamper]) -> Vec<u8> {
    let mut v = serde_json::to_value(state).unwrap();
    let mut bytes_edits = Vec::new();
    for t in tampers {
        let n = v["targets"].as_array().map_or(0, Vec::len);
        let w = v["config"]["whattosync"].as_array().map_or(0, Vec::len);
        match t {
            Tamper::TargetPath(a, f, p) if n > 0 => {
                targets_mut(&mut v)[a % n]["paths"][PATH_FIELDS[f % PATH_FIELDS.len()]] =
                    Value::String(p.clone())
            }
            Tamper::SwapPaths(a, b) if n > 1 => {
                let from = targets_mut(&mut v)[b % n]["paths"].clone();
                targets_mut(&mut v)[a % n]["paths"] = from;
            }
            Tamper::OwnerName(a, name) if n > 0 => {
                targets_mut(&mut v)[a % n]["owner"]["name"] = Value::String(name.clone())
            }
            Tamper::OwnerUid(a, uid) if n > 0 => {
                targets_mut(&mut v)[a % n]["owner"]["uid"] = Value::from(*uid)
            }
            Tamper::Mode(a) if n > 0 => {
                let m = &mut targets_mut(&mut v)[a % n]["mode"];
                *m = Value::String(if m == "copy" { "overlay" } else { "copy" }.into());
            }
            Tamper::Volatile(p) => v["config"]["volatile"] = Value::String(p.clone()),
            Tamper::Whattosync(a, p) if w > 0 => {
                v["config"]["whattosync"][a % w] = Value::String(p.clone())
            }
            Tamper::DropWhattosync(a) if w > 0 => {
                v["config"]["whattosync"]
                    .as_array_mut()
                    .unwrap()
                    .remove(a % w);
            }
            Tamper::Overlay => {
                let o = v["config"]["use_overlayfs"].as_bool().unwrap_or(false);
                v["config"]["use_overlayfs"] = Value::Bool(!o);
            }
            Tamper::DuplicateTarget(a) if n > 0 => {
                let dup = targets_mut(&mut v)[a % n].clone();
                targets_mut(&mut v).push(dup);
            }
            Tamper::ExtraTarget(p) => {
                let volatile = PathBuf::from(v["config"]["volatile"].as_str().unwrap_or("/tmp"));
                if let Some(paths) = TargetPaths::new(Path::new(p), "u", &volatile) {
                    let mode = if v["config"]["use_overlayfs"] == true {
                        "overlay"
                    } else {
                        "copy"
                    };
                    let uid = v["targets"][0]["owner"]["uid"].clone();
                    targets_mut(&mut v).push(serde_json::json!({
                        "paths": paths,
                        "owner": {"uid": uid, "gid": 0, "name": "u", "groups": []},
                        "mode": mode,
                        "stage": "synced",
                    }));
                }
            }
            Tamper::Interval(s) => v["config"]["resync_interval"]["secs"] = Value::from(*s),
            Tamper::Version(x) => v["version"] = Value::from(*x),
            Tamper::Flip(..) | Tamper::Insert(..) | Tamper::Truncate(_) => {
                bytes_edits.push(t.clone())
            }
            _ => {}
        }
    }
    let mut bytes = serde_json::to_vec_pretty(&v).unwrap();
    for e in bytes_edits {
        let len = bytes.len();
        match e {
            Tamper::Flip(a, b) if len > 0 => bytes[a % len] = b,
            Tamper::Insert(a, ins) => {
                let p = a % (len + 1);
                bytes.splice(p..p, ins);
            }
            Tamper::Truncate(a) => bytes.truncate(a % (len + 1)),
            _ => {}
        }
    }
    bytes
}

/// What loading `bytes` as a state may give: `Corrupt` naming the file, or targets that are
/// exactly what the state's config derives.
fn check_load(bytes: &[u8], euid: u32) -> Result<Option<State>, String> {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::at(dir.path().to_path_buf());
    std::fs::write(rt.state_path(), bytes).unwrap();
    match rt.load() {
        Ok(None) => Err("a state file that exists loaded as none".into()),
        Err(e @ StateError::Corrupt { .. }) => {
            let msg = e.to_string();
            let StateError::Corrupt { path, .. } = &e else {
                unreachable!()
            };
            if *path != rt.state_path() || !msg.contains(&*rt.state_path().to_string_lossy()) {
                return Err(format!("the error does not name the file: {msg}"));
            }
            if !msg.contains("remove it") {
                return Err(format!("the error does not say what to do: {msg}"));
            }
            Ok(None)
        }
        Err(e) => Err(format!("unexpected error kind: {e:?}")),
        Ok(Some(st)) => {
            let c = &st.config;
            for t in &st.targets {
                let p = &t.paths;
                if !c.whattosync.contains(&p.target) {
                    return Err(format!("{:?} is not in WHATTOSYNC", p.target));
                }
                if TargetPaths::new(&p.target, &t.owner.name, &c.volatile).as_ref() != Some(p) {
                    return Err(format!("{p:?} is not what the config derives"));
                }
                // What that means for where the manager writes: beside the target, and inside
                // the user's area under VOLATILE.
                for beside in [&p.backup, &p.old, &p.old_partial, &p.changes] {
                    if beside.parent() != p.target.parent() {
                        return Err(format!("{beside:?} is not beside {:?}", p.target));
                    }
                }
                if p.user_area.parent() != Some(c.volatile.as_path()) {
                    return Err(format!("{:?} is not in {:?}", p.user_area, c.volatile));
                }
                for inside in [&p.volatile, &p.upper, &p.work] {
                    if !inside.starts_with(&p.user_area)
                        || inside.components().any(|c| {
                            matches!(
                                c,
                                std::path::Component::ParentDir | std::path::Component::CurDir
                            )
                        })
                    {
                        return Err(format!("{inside:?} is not inside {:?}", p.user_area));
                    }
                }
                if euid != 0 && t.owner.uid != euid {
                    return Err(format!("owned by {} for euid {euid}", t.owner.uid));
                }
            }
            if st.targets.iter().any(|t| {
                !matches!(
                    (t.mode, c.use_overlayfs),
                    (Mode::Copy, false) | (Mode::Overlay, true)
                )
            }) {
                return Err("a target's mode differs from its config".into());
            }
            if c.resync_interval < Duration::from_secs(1)
                || c.resync_interval > asd::config::MAX_RESYNC_INTERVAL
            {
                return Err(format!("interval {:?}", c.resync_interval));
            }
            Ok(Some(st))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// What asd writes, it reads back unchanged (the check refuses no real state).
    #[test]
    fn valid_states_load(st in valid_state()) {
        let bytes = serde_json::to_vec_pretty(&st).unwrap();
        let got = check_load(&bytes, 0).map_err(TestCaseError::fail)?;
        prop_assert_eq!(got, Some(st.clone()));
        let uid = st.targets.first().map_or(1000, |t| t.owner.uid);
        prop_assert_eq!(st.check(uid), Ok(()));
    }

    /// Tampered states: refused with `Corrupt` naming the file, or harmless.
    #[test]
    fn tampered_states_are_refused_or_harmless(
        st in valid_state(),
        tampers in proptest::collection::vec(tamper(), 1..5),
    ) {
        let bytes = apply(&st, &tampers);
        check_load(&bytes, 0).map_err(TestCaseError::fail)?;
        // As a user's manager: also never a target of another uid.
        if let Ok(parsed) = serde_json::from_slice::<State>(&bytes) {
            let uid = st.targets.first().map_or(1000, |t| t.owner.uid);
            if parsed.check(uid).is_ok() {
                for t in &parsed.targets {
                    prop_assert_eq!(t.owner.uid, uid);
                }
            }
        }
    }

    /// Random bytes: `Corrupt`, never a panic.
    #[test]
    fn random_bytes_are_corrupt(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_load(&bytes, 0).map_err(TestCaseError::fail)?;
    }
}

/// The tampering the check was added for: a target's backup moved elsewhere, an owner name that
/// climbs out of VOLATILE, a target the config does not name. Each is `Corrupt`.
#[test]
fn tampered_state_regressions() {
    let volatile = PathBuf::from("/tmp");
    let config = Config {
        whattosync: vec![PathBuf::from("/home/u/x")],
        volatile: volatile.clone(),
        ..Config::default()
    };
    let mut st = State::new(Path::new("/home/u/.config/asd/asd.conf"), &config);
    let good = TargetState {
        paths: TargetPaths::new(Path::new("/home/u/x"), "u", &volatile).unwrap(),
        owner: Owner {
            uid: 1000,
            gid: 1000,
            name: "u".into(),
            groups: vec![1000],
        },
        mode: Mode::Copy,
        stage: Stage::Synced,
        clean_since: None,
        full_compare_at: None,
        clean_clock: None,
        write_back: None,
    };
    st.upsert(good.clone());
    assert_eq!(st.check(1000), Ok(()));
    assert!(st.check(1001).is_err());

    let mut moved = st.clone();
    moved.targets[0].paths.backup = PathBuf::from("/etc");
    let mut climbing = st.clone();
    climbing.targets[0].owner.name = "../../home/u/important".into();
    climbing.targets[0].paths =
        TargetPaths::new(Path::new("/home/u/x"), "../../home/u/important", &volatile).unwrap();
    let mut unnamed = st.clone();
    unnamed.targets[0].paths = TargetPaths::new(Path::new("/etc/ssh"), "u", &volatile).unwrap();
    let mut interval = st.clone();
    interval.config.resync_interval = Duration::from_secs(u64::MAX);
    for (what, bad) in [
        ("moved backup", moved),
        ("climbing owner name", climbing),
        ("unnamed target", unnamed),
        ("huge interval", interval),
    ] {
        assert!(bad.check(0).is_err(), "{what}");
        let bytes = serde_json::to_vec(&bad).unwrap();
        assert_eq!(check_load(&bytes, 0), Ok(None), "{what}");
    }
}
