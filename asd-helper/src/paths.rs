//! Paths the helper derives itself from a target and the caller (DESIGN.md §3). The same names
//! as `asd-user/src/paths.rs`, re-derived here because the helper must not depend on the
//! manager: backup `/p/.name-backup_asd`, area `$VOLATILE/asd-<user>`, volatile copy
//! `area/p/name`, overlay upper `area/p/name-rw`, work `area/.work/p/name`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use asd_protocol::ServiceError;

/// Longest path accepted (PATH_MAX less the NUL).
pub const MAX_PATH: usize = 4095;

/// Checks that `p` is absolute and normalized: starts with `/`, is not `/`, has no empty, `.` or
/// `..` component, no trailing `/`, no NUL, and is not too long.
pub fn normalized(p: &str) -> Result<PathBuf, ServiceError> {
    let bad = |reason: &str| {
        Err(ServiceError::InvalidPath {
            path: p.to_string(),
            reason: reason.to_string(),
        })
    };
    if p.is_empty() {
        return bad("empty");
    }
    if !p.starts_with('/') {
        return bad("not absolute");
    }
    if p == "/" {
        return bad("the root directory");
    }
    if p.len() > MAX_PATH {
        return bad("too long");
    }
    if p.contains('\0') {
        return bad("contains a NUL byte");
    }
    if p.ends_with('/') {
        return bad("trailing slash");
    }
    for comp in p[1..].split('/') {
        match comp {
            "" => return bad("empty component (//)"),
            "." | ".." => return bad("contains . or .."),
            _ => {}
        }
    }
    Ok(PathBuf::from(p))
}

/// `name` → `.name`, `.name` stays `.name`.
fn dotted(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 1);
    if !bytes.starts_with(b".") {
        out.push(b'.');
    }
    out.extend_from_slice(bytes);
    OsString::from_vec(out)
}

/// The backup's file name in the target's parent: `name` → `.name-backup_asd`.
pub fn backup_name(target: &Path) -> Option<OsString> {
    let mut n = dotted(target.file_name()?);
    n.push("-backup_asd");
    Some(n)
}

/// `/p/name` → `/p/.name-backup_asd`.
pub fn backup_of(target: &Path) -> Option<PathBuf> {
    Some(target.parent()?.join(backup_name(target)?))
}

/// The target's path components below `/` (for nesting inside the area).
pub fn components(target: &Path) -> Vec<OsString> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect()
}

/// `$VOLATILE/asd-<user>`.
pub fn area_of(volatile: &Path, user: &str) -> PathBuf {
    volatile.join(area_name(user))
}

pub fn area_name(user: &str) -> String {
    format!("asd-{user}")
}

/// Relative paths inside the area: the volatile dir (`p/name`), the upper (`p/name-rw`) and the
/// work dir (`.work/p/name`).
pub struct AreaPaths {
    pub volatile: Vec<OsString>,
    pub upper: Vec<OsString>,
    pub work: Vec<OsString>,
}

impl AreaPaths {
    pub fn new(target: &Path) -> AreaPaths {
        let volatile = components(target);
        let mut upper = volatile.clone();
        if let Some(last) = upper.last_mut() {
            last.push("-rw");
        }
        let mut work = vec![OsString::from(".work")];
        work.extend(volatile.iter().cloned());
        AreaPaths {
            volatile,
            upper,
            work,
        }
    }

    pub fn join(area: &Path, rel: &[OsString]) -> PathBuf {
        let mut p = area.to_path_buf();
        for c in rel {
            p.push(c);
        }
        p
    }
}

/// Whether `inner` is `outer` or below it.
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// Whether `target` lies strictly inside `home`.
pub fn inside_home(target: &Path, home: &Path) -> bool {
    home.is_absolute() && home != Path::new("/") && target != home && target.starts_with(home)
}

pub fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_paths_only() {
        assert!(normalized("/home/a/x").is_ok());
        assert!(normalized("/home/a/.x").is_ok());
        for bad in [
            "", "x", "./x", "/", "/a/", "/a//b", "/a/./b", "/a/../b", "/a/..", "/..", "/a\0b",
        ] {
            assert!(
                matches!(normalized(bad), Err(ServiceError::InvalidPath { .. })),
                "{bad:?}"
            );
        }
        assert!(normalized(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn derives_the_same_names_as_asd() {
        let t = Path::new("/foo/bar");
        assert_eq!(backup_of(t).unwrap(), Path::new("/foo/.bar-backup_asd"));
        assert_eq!(
            backup_of(Path::new("/foo/.cache")).unwrap(),
            Path::new("/foo/.cache-backup_asd")
        );
        let area = area_of(Path::new("/tmp"), "alice");
        assert_eq!(area, Path::new("/tmp/asd-alice"));
        let a = AreaPaths::new(t);
        assert_eq!(
            AreaPaths::join(&area, &a.volatile),
            Path::new("/tmp/asd-alice/foo/bar")
        );
        assert_eq!(
            AreaPaths::join(&area, &a.upper),
            Path::new("/tmp/asd-alice/foo/bar-rw")
        );
        assert_eq!(
            AreaPaths::join(&area, &a.work),
            Path::new("/tmp/asd-alice/.work/foo/bar")
        );
    }

    #[test]
    fn home_membership() {
        let home = Path::new("/home/alice");
        assert!(inside_home(Path::new("/home/alice/x"), home));
        assert!(!inside_home(Path::new("/home/alice"), home));
        assert!(!inside_home(Path::new("/home/alicex/y"), home));
        assert!(!inside_home(Path::new("/srv/alice"), home));
        assert!(!inside_home(Path::new("/x"), Path::new("/")));
    }
}
