//! The copy threads of a sync into RAM (issue 9, item 1), run as a real unprivileged user the
//! way asd's workers run: every file arrives with its data, owner, mode, xattrs and times, and
//! directories that are read-only in the source still get all their files (their mode is set
//! only after the threads finished writing into them; root would never notice, a user does).

mod common;
use common::*;

/// The test user's ids and a private namespace to work in, as root (else the test is skipped).
fn as_a_user() -> Option<(u32, u32, Ns)> {
    if !require_root() {
        return None;
    }
    assert!(
        have("rsync") && have("python3") && have("setpriv"),
        "rsync, python3 and util-linux are needed: run the README test command"
    );
    let (uid, gid) = test_user("asdtest1");
    Some((uid, gid, Ns::new()))
}

#[test]
fn copy_threads_fill_read_only_directories_as_a_user() {
    let Some((uid, gid, ns)) = as_a_user() else {
        return;
    };
    let src = ns.data().join("src");
    let dst = ns.vol().join("dst");
    // More files than the threads' queue holds, spread over directories, some read-only.
    ns.sh_ok(&format!(
        r#"set -e
        python3 - '{s}' <<'PY'
import os, sys
root = sys.argv[1]
for d in range(30):
    base = os.path.join(root, f"d{{d}}", "sub")
    os.makedirs(base)
    for i in range(60):
        with open(os.path.join(base if i % 2 else os.path.dirname(base), f"f{{i}}"), "wb") as f:
            f.write(os.urandom((i * 977) % 20000))
ro = os.path.join(root, "ro", "inner")
os.makedirs(ro)
for i in range(300):
    with open(os.path.join(root, "ro", f"r{{i}}"), "wb") as f:
        f.write(b"r" * i)
    with open(os.path.join(ro, f"i{{i}}"), "wb") as f:
        f.write(b"i" * i)
PY
        cd '{s}'
        setfattr -n user.tag -v kept ro/r7
        chmod 0400 ro/r1 d3/f2; chmod 0500 ro/inner; chmod 0555 ro; chmod 0700 d5
        chown -R {uid}:{gid} '{s}'
        mkdir '{d}'; chown {uid}:{gid} '{d}'
        # Distinct nanosecond times on everything, directories last (bottom-up).
        python3 - '{s}' <<'PY'
import os, sys
n = 0
for d, dirs, files in os.walk(sys.argv[1], topdown=False):
    for e in files + dirs + ([] if d != sys.argv[1] else ["."]):
        n += 1
        t = 1_500_000_000 * 10**9 + n * 1_000_003_007
        os.utime(os.path.join(d, e), ns=(t, t), follow_symlinks=False)
PY"#,
        s = src.display(),
        d = dst.display()
    ));
    let job = serde_json::json!({"Copy": {
        "src": src, "dst": dst, "delete": true, "durable": false
    }});
    let text = run_job_as(ns.cmd("setpriv"), uid, gid, &job);
    assert!(
        text.contains("\"files_copied\":2400,"),
        "every file copied: {text}"
    );
    assert_eq!(
        ns.tree_diff(&src, &dst),
        "",
        "RAM copy equals the source (data, owner, mode, xattrs, times)"
    );
}

/// A durable write-back, as the user, of many changed files in directories that are read-only
/// (the target's own modes): the walk opens them up to write the temporaries, phase 3 renames
/// those many at once (`copy::renames`), phase 5 restores the modes; the result equals the
/// source, modes included.
#[test]
fn many_renames_at_once_in_read_only_directories_as_a_user() {
    let Some((uid, gid, ns)) = as_a_user() else {
        return;
    };
    let ram = ns.vol().join("ram");
    let disk = ns.data().join("disk");
    ns.sh_ok(&format!(
        r#"set -e
        mkdir -p '{r}/ro/deep' '{r}/rw'
        for i in $(seq 1 120); do echo "start $i" > '{r}/ro/f'$i; echo "start $i" > '{r}/rw/g'$i; done
        for i in $(seq 1 40); do echo "start $i" > '{r}/ro/deep/h'$i; done
        chmod 0555 '{r}/ro/deep' '{r}/ro'
        chown -R {uid}:{gid} '{r}'
        mkdir '{d}'; chown {uid}:{gid} '{d}'"#,
        r = ram.display(),
        d = disk.display()
    ));
    let job = serde_json::json!({"Copy": {
        "src": ram, "dst": disk, "delete": true, "durable": true
    }});
    run_job_as(ns.cmd("setpriv"), uid, gid, &job);
    assert_eq!(ns.tree_diff(&ram, &disk), "", "the first write-back");
    // Every file changed (root writes through the read-only directories): 280 renames.
    ns.sh_ok(&format!(
        "set -e; cd '{r}'; for f in ro/f* rw/g* ro/deep/h*; do echo changed >> $f; done",
        r = ram.display()
    ));
    let text = run_job_as(ns.cmd("setpriv"), uid, gid, &job);
    assert!(
        text.contains("\"files_copied\":280,"),
        "every changed file written back: {text}"
    );
    assert_eq!(
        ns.tree_diff(&ram, &disk),
        "",
        "the disk equals the RAM copy (data, owner, modes, times)"
    );
}
