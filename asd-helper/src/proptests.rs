//! Generated hostile input for every method's parameters (issue 11 item 1): paths with `..`,
//! `//`, `.`, trailing `/`, NUL, relative, very long; names beside a target; whole calls fed
//! through the dispatcher for a caller who owns nothing. No panic, no hang, every refusal a named
//! error, and nothing recorded or created for the caller.
//!
//! Budget: `ASD_PROPTEST_CASES` cases per property (default 256).

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use asd_protocol::{Call, EntryKind, Method, Mode, ServiceError};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use crate::beside;
use crate::ops::Ctx;
use crate::paths::{self, AreaPaths, MAX_PATH};
use crate::peer::Peer;
use crate::records::Store;
use crate::sys::FsCreds;

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

/// A uid that owns nothing on this machine, so that no check passes and nothing is made.
const NOBODY: u32 = 3_999_917;

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9_-]{1,12}",
        2 => Just(String::new()),
        2 => Just(".".to_string()),
        2 => Just("..".to_string()),
        1 => Just("...".to_string()),
        1 => Just(".hidden".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("\0".to_string()),
        1 => Just("é\u{202e}\n".to_string()),
        1 => (200usize..400).prop_map(|n| "x".repeat(n)),
    ]
}

/// Paths as a hostile caller writes them.
fn hostile_path() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (any::<bool>(), proptest::collection::vec(component(), 0..14), any::<bool>())
            .prop_map(|(abs, comps, trailing)| {
                let mut s = String::new();
                if abs {
                    s.push('/');
                }
                s.push_str(&comps.join("/"));
                if trailing {
                    s.push('/');
                }
                s
            }),
        1 => (MAX_PATH - 3..MAX_PATH + 3).prop_map(|n| format!("/{}", "a".repeat(n - 1))),
        1 => any::<String>(),
    ]
}

/// The rule of DESIGN.md §6, written independently of `paths::normalized`.
fn spec_normalized(p: &str) -> bool {
    let Some(rest) = p.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && p.len() <= MAX_PATH
        && !p.contains('\0')
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn assert_stays_inside(inner: &Path, outer: &Path) {
    assert!(inner.starts_with(outer), "{inner:?} not in {outer:?}");
    assert!(
        inner
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{inner:?}"
    );
}

proptest! {
    #![proptest_config(config())]

    /// Rule 1: exactly the absolute, normalized paths pass, and they pass unchanged; everything
    /// else is `InvalidPath` naming what was sent.
    #[test]
    fn normalized_accepts_exactly_the_normalized(p in hostile_path()) {
        match paths::normalized(&p) {
            Ok(path) => {
                prop_assert!(spec_normalized(&p), "{:?} accepted", p);
                prop_assert_eq!(path.to_str(), Some(p.as_str()));
                // Path parsing changes nothing either: one normal component per segment.
                let comps: Vec<Component> = path.components().collect();
                prop_assert_eq!(comps.len(), p.split('/').count());
                prop_assert_eq!(comps[0], Component::RootDir);
                prop_assert!(comps[1..].iter().all(|c| matches!(c, Component::Normal(_))));
            }
            Err(ServiceError::InvalidPath { path, reason }) => {
                prop_assert!(!spec_normalized(&p), "{:?} refused: {}", p, reason);
                prop_assert_eq!(path, p);
            }
            Err(e) => prop_assert!(false, "unnamed refusal {e:?}"),
        }
    }

    /// Everything the helper derives from an accepted target stays where it belongs: the backup
    /// beside the target in its parent, the volatile copy, upper and work inside the caller's
    /// area, none of them `..`.
    #[test]
    fn derived_paths_stay_in_place(p in hostile_path(), user in "[a-z_][a-z0-9_-]{0,30}") {
        let Ok(target) = paths::normalized(&p) else { return Ok(()) };
        let backup = paths::backup_of(&target).unwrap();
        prop_assert_eq!(backup.parent(), target.parent());
        let name = paths::backup_name(&target).unwrap();
        prop_assert_eq!(Some(name.as_os_str()), backup.file_name());
        let n = name.to_str().unwrap();
        prop_assert!(n.starts_with('.') && n.ends_with("-backup_asd") && !n.contains('/'));
        prop_assert!(backup != target && !backup.starts_with(&target));
        let area = paths::area_of(Path::new("/dev/shm"), &user);
        prop_assert_eq!(area.parent(), Some(Path::new("/dev/shm")));
        let a = AreaPaths::new(&target);
        for rel in [&a.volatile, &a.upper, &a.work] {
            let joined = AreaPaths::join(&area, rel);
            assert_stays_inside(&joined, &area);
            prop_assert!(joined != area);
        }
        prop_assert_eq!(AreaPaths::join(&area, &a.volatile), paths::area_of(Path::new("/dev/shm"), &user).join(&p[1..]));
    }

    /// Home membership is by whole components (`/home/alicex` is not inside `/home/alice`).
    #[test]
    fn inside_home_is_by_components(
        t in hostile_path(),
        other in hostile_path(),
        cut in any::<usize>(),
        how in 0u8..4,
    ) {
        // Homes that are prefixes of the target, by components or only by characters.
        let segs: Vec<&str> = t.split('/').collect();
        let prefix = segs[..1 + cut % segs.len().max(1)].join("/");
        let h = match how {
            0 => other,
            1 => prefix,
            2 => format!("{prefix}x"),
            _ => {
                let mut p = prefix;
                p.pop();
                p
            }
        };
        let (Ok(t), Ok(h)) = (paths::normalized(&t), paths::normalized(&h)) else {
            return Ok(());
        };
        let segs = |p: &Path| -> Vec<String> {
            p.to_str().unwrap()[1..].split('/').map(str::to_string).collect()
        };
        let (ts, hs) = (segs(&t), segs(&h));
        let want = ts.len() > hs.len() && ts[..hs.len()] == hs[..];
        prop_assert_eq!(paths::inside_home(&t, &h), want);
    }

    /// Names beside a target: whatever is accepted is a plain name in the target's parent that
    /// starts with the target's backup name and is not the backup itself.
    #[test]
    fn beside_names_never_leave_the_parent(
        p in hostile_path(),
        name in prop_oneof![
            2 => "[-._a-z0-9/\\x00]{0,60}",
            3 => (
                prop_oneof![Just("-old"), Just("-old.partial"), Just("-changes"), Just("-crashrecovery-"), Just("")],
                "[0-9_./a-z\\x00-]{0,30}",
                prop_oneof![Just(""), Just(".tar.zstd"), Just(".tar.zstd.partial"), Just(".asd-trash")],
            ).prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        ],
        base_from_target in any::<bool>(),
    ) {
        let target = PathBuf::from(&p);
        let name = match (base_from_target, paths::backup_name(&target)) {
            (true, Some(b)) => format!("{}{name}", b.to_string_lossy()),
            _ => name,
        };
        if beside::is_asd_name(&target, &name) {
            let base = paths::backup_name(&target).unwrap();
            let base = base.to_str().unwrap();
            prop_assert!(name.starts_with(base) && name != base);
            prop_assert!(!name.contains('/') && !name.contains('\0'));
            prop_assert!(name != "." && name != "..");
            let joined = target.with_file_name(&name);
            prop_assert_eq!(joined.parent(), target.parent());
            prop_assert_eq!(joined.file_name().and_then(|n| n.to_str()), Some(name.as_str()));
        }
    }

    /// The names asd itself makes are accepted (stamps with an optional `_N` suffix).
    #[test]
    fn beside_names_asd_makes_are_accepted(
        target in "/[a-z]{1,8}/\\.?[a-z]{1,8}",
        stamp in "[0-9]{8}_[0-9]{6}(_[0-9]{1,6})?",
        partial in any::<bool>(),
    ) {
        let t = Path::new(&target);
        let base = paths::backup_name(t).unwrap().into_string().unwrap();
        let snap = format!("{base}-crashrecovery-{stamp}.tar.zstd{}", if partial { ".partial" } else { "" });
        prop_assert!(beside::is_asd_name(t, &snap));
        for s in ["-old", "-old.partial", "-changes"] {
            let (plain, trash) = (format!("{base}{s}"), format!("{base}{s}.asd-trash"));
            prop_assert!(beside::is_asd_name(t, &plain), "{}", plain);
            prop_assert!(beside::is_asd_name(t, &trash), "{}", trash);
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn nobody() -> Peer {
    Peer {
        uid: NOBODY,
        gid: NOBODY,
        pid: None,
        pidfd: None,
        groups: vec![NOBODY],
        user: Some("asd-proptest-nobody".into()),
        home: None,
    }
}

fn any_method() -> impl Strategy<Value = Method> {
    let s = hostile_path;
    let mode = || prop_oneof![Just(Mode::Copy), Just(Mode::Overlay)];
    let kind = prop_oneof![Just(EntryKind::Dir), Just(EntryKind::File)];
    prop_oneof![
        Just(Method::GetInfo),
        Just(Method::ListMounts),
        prop_oneof![
            Just("io.asd.Helper".to_string()),
            Just("org.varlink.service".to_string()),
            s()
        ]
        .prop_map(|interface| Method::GetInterfaceDescription { interface }),
        s().prop_map(|volatile| Method::PrepareArea { volatile }),
        (s(), mode()).prop_map(|(target, mode)| Method::BindBackup { target, mode }),
        s().prop_map(|target| Method::MountOverlay { target }),
        (s(), mode()).prop_map(|(target, mode)| Method::Cover { target, mode }),
        s().prop_map(|target| Method::Detach { target }),
        (s(), any::<bool>()).prop_map(|(target, frozen)| Method::Freeze { target, frozen }),
        (s(), s(), kind).prop_map(|(target, name, kind)| Method::MakeBeside { target, name, kind }),
        (s(), s(), s()).prop_map(|(target, from, to)| Method::RenameBeside { target, from, to }),
        (s(), s()).prop_map(|(target, name)| Method::RemoveBeside { target, name }),
    ]
}

/// Calls that would reach the system outside this test's control with a valid path (polkit over
/// D-Bus, or a tmpfs such as /tmp): those are checked up to that point instead.
fn reaches_outside(m: &Method) -> bool {
    match m {
        Method::PrepareArea { volatile } => paths::normalized(volatile).is_ok(),
        Method::MakeBeside { target, .. }
        | Method::RenameBeside { target, .. }
        | Method::RemoveBeside { target, .. } => paths::normalized(target).is_ok(),
        _ => false,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Whole calls, as decoded from the wire, through the dispatcher for a caller who owns
    /// nothing: a reply within a few seconds; refusals are named errors (`InvalidPath` naming the
    /// path for a path that is not normalized); nothing is recorded for the caller.
    #[test]
    fn dispatcher_refuses_hostile_calls_with_named_errors(m in any_method()) {
        if !rustix::process::geteuid().is_root() {
            // The worker threads switch file system identity (setfsuid): root only.
            return Ok(());
        }
        // Over the wire and back, as the server sees it.
        let call = Call::parse(&serde_json::to_vec(&m.to_call().to_json()).unwrap()).unwrap();
        let m = Method::from_call(&call).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let ctx = Ctx::new(store.clone());
        let peer = nobody();
        if reaches_outside(&m) {
            // The same checks, minus polkit: the beside operations as the caller.
            let creds = FsCreds { uid: NOBODY, gid: NOBODY, groups: vec![NOBODY] };
            let m2 = m.clone();
            let r = runtime().block_on(async move {
                let work = creds.run(move |c| match m2 {
                    Method::MakeBeside { target, name, kind } => {
                        beside::make(c, &paths::normalized(&target)?, &name, kind)
                    }
                    Method::RenameBeside { target, from, to } => {
                        beside::rename(c, &paths::normalized(&target)?, &from, &to)
                    }
                    Method::RemoveBeside { target, name } => {
                        beside::remove(c, &paths::normalized(&target)?, &name)
                    }
                    _ => Ok(()),
                });
                tokio::time::timeout(Duration::from_secs(10), work).await
            });
            let r = r.expect("no hang").expect("worker thread");
            if let Method::RemoveBeside { target, name } = &m {
                // Removing what is not there is done already; nothing of NOBODY's exists.
                if beside::is_asd_name(Path::new(target), name) && r.is_ok() {
                    return Ok(());
                }
            }
            if !matches!(m, Method::PrepareArea { .. }) {
                let e = r.expect_err("refused");
                prop_assert!(!e.name().is_empty(), "{e:?}");
            }
            return Ok(());
        }
        let m2 = m.clone();
        let reply = runtime().block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), ctx.handle(&peer, m2)).await
        });
        let reply = reply.expect("the dispatcher answers within 10 s");
        match (&m, reply) {
            (Method::GetInfo | Method::ListMounts, r) => prop_assert!(r.is_ok()),
            (Method::GetInterfaceDescription { interface }, r) => {
                prop_assert_eq!(r.is_ok(), asd_protocol::interface_description(interface).is_some());
            }
            (_, Ok(p)) => prop_assert!(false, "{m:?} succeeded for a caller who owns nothing: {p:?}"),
            (_, Err(e)) => {
                let name = e.name();
                prop_assert!(name.starts_with("io.asd.Helper.") || name.starts_with("org.varlink.service."), "{e:?}");
                if let Some(subject) = m.subject() {
                    if paths::normalized(subject).is_err() {
                        prop_assert_eq!(e, ServiceError::InvalidPath {
                            path: subject.to_string(),
                            reason: match paths::normalized(subject) {
                                Err(ServiceError::InvalidPath { reason, .. }) => reason,
                                _ => unreachable!(),
                            },
                        });
                    }
                }
            }
        }
        let rec = store.load(NOBODY).unwrap();
        prop_assert!(rec.area.is_none() && rec.mounts.is_empty(), "{rec:?}");
    }
}
