//! Programs that hold a target (issue 8, item 6), with real processes and real mount
//! namespaces: one that has the target open when asd is asked to cover it, and one in another
//! mount namespace holding a copy of the cover when asd is asked to take it down. Whatever asd
//! decides, nothing either of them writes is lost.

mod common;
use common::world::World;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A program of the test, killed (with its namespace, if it made one) when the test ends.
struct Prog(Child);

impl Prog {
    fn spawn(mut c: Command) -> Prog {
        Prog(c.stdin(Stdio::null()).spawn().expect("spawn"))
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    /// Waits for it to exit, and insists it succeeded.
    fn finish(mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "{what} did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` until it holds (generous deadline: machines under load are slow, never wrong).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Shell text: wait (at most about 5 minutes) for the file `go` to exist.
fn until(go: &Path) -> String {
    format!(
        "i=0; while [ ! -e '{}' ] && [ $i -lt 6000 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    )
}

/// A writer: opens `file` for appending BEFORE asd is run, writes "before", and writes
/// "after" through the same descriptor once `go` exists.
fn writer_script(file: &Path, go: &Path) -> String {
    format!(
        "exec 3>>'{f}'; echo before >&3; {u}; echo after >&3",
        f = file.display(),
        u = until(go)
    )
}

/// `data/t` holding `f` ("orig\n") and an empty `sub/`, configured (with `extra` lines) as the
/// one target.
fn target_with_f(ns: &Ns, extra: &str) -> std::path::PathBuf {
    let target = ns.data().join("t");
    ns.sh_ok(&format!(
        "mkdir -p '{t}/sub' && echo orig > '{t}/f'",
        t = target.display()
    ));
    ns.write_conf(&[&target], extra);
    target
}

/// Starts `shell` (a `sh` command of the test's) as a writer of `file` (see [`writer_script`])
/// and waits until it holds the file open.
fn start_writer(mut shell: Command, file: &Path, go: &Path) -> Prog {
    shell.arg("-c").arg(writer_script(file, go));
    let writer = Prog::spawn(shell);
    wait_for("the writer", || read(file).contains("before"));
    writer
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Names in `dir` (as the namespace sees it) that start with `prefix`.
fn entries(ns: &Ns, dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ns.inside(dir))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Root mode: a program with a file of the target open before sync. asd waits, then refuses
/// and names it, having touched nothing; what the program writes afterwards is on disk, and
/// once it is gone the target syncs and unsyncs with all of it.
#[test]
fn sync_refuses_a_target_a_program_has_open() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = target_with_f(&ns, "");
    let go = ns.root.join("go");
    let file = target.join("f");
    let writer = start_writer(ns.cmd("sh"), &file, &go);

    // Default wait (a few seconds), then the refusal.
    let out = ns.asd(&["sync"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "sync must refuse: {said}");
    assert!(
        said.contains(&format!("{}: in use by", target.display()))
            && said.contains(&format!("sh (pid {})", writer.pid()))
            && said.contains("run `asd sync` again"),
        "{said}"
    );
    // Nothing was done: no mounts, nothing beside the target, no RAM area, no state.
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(entries(&ns, &ns.data(), ""), ["t"]);
    assert!(entries(&ns, &ns.vol(), "").is_empty());
    assert!(ns.asd_ok(&["unsync"]).contains("not running"));

    std::fs::write(&go, "").expect("go");
    writer.finish("the writer");
    assert_eq!(read(&file), "orig\nbefore\nafter\n");

    // The program is gone: the target syncs, and everything written stays.
    ns.asd_ok(&["sync"]);
    assert_eq!(ns.statfs_type(&target), "tmpfs");
    ns.sh_ok(&format!("echo ram >> '{}'", file.display()));
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(read(&file), "orig\nbefore\nafter\nram\n");
}

/// The advice holds while other targets are in RAM: once the program is gone, `asd sync` puts
/// the refused target in RAM too (not "already running").
#[test]
fn refused_target_syncs_later_beside_running_ones() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let held = ns.data().join("held");
    let free = ns.data().join("free");
    ns.sh_ok(&format!(
        "mkdir -p '{h}' '{f}' && echo orig > '{h}/f'",
        h = held.display(),
        f = free.display()
    ));
    ns.write_conf(&[&held, &free], "");
    let go = ns.root.join("go");
    let file = held.join("f");
    let writer = start_writer(ns.cmd("sh"), &file, &go);
    let out = ns
        .asd_cmd(&["sync"])
        .env("ASD_SYNC_BUSY_WAIT", "0")
        .output()
        .expect("asd");
    assert!(!out.status.success(), "{}", output_text(&out));
    assert_eq!(ns.statfs_type(&free), "tmpfs");
    assert_ne!(ns.statfs_type(&held), "tmpfs");
    std::fs::write(&go, "").expect("go");
    writer.finish("the writer");
    let out = ns.asd_ok(&["sync"]);
    assert!(out.contains("sync successful: 1 target"), "{out}");
    assert_eq!(ns.statfs_type(&held), "tmpfs");
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(read(&file), "orig\nbefore\nafter\n");
}

/// Root mode, the waiting half: a program that lets go while asd waits does not stop the sync,
/// and what it wrote before letting go is in the RAM copy and back on disk after unsync.
#[test]
fn sync_waits_for_a_program_that_lets_go() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = target_with_f(&ns, "");
    let go = ns.root.join("go");
    let file = target.join("f");
    let writer = start_writer(ns.cmd("sh"), &file, &go);

    // A long wait, so that the test never depends on how fast the machine is.
    let mut asd = ns
        .asd_cmd(&["sync"])
        .env("ASD_SYNC_BUSY_WAIT", "600")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("asd sync");
    let stderr = asd.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("asd did not say it waits: {seen:?}"));
        let waiting = line.contains("waiting up to") && line.contains(&writer.pid().to_string());
        seen.push(line);
        if waiting {
            break;
        }
    }
    std::fs::write(&go, "").expect("go");
    writer.finish("the writer");
    let status = asd.wait().expect("asd");
    reader.join().expect("reader");
    seen.extend(rx.try_iter());
    assert!(status.success(), "sync after the wait failed: {seen:?}");
    assert_eq!(ns.statfs_type(&target), "tmpfs");
    assert_eq!(
        read(&ns.inside(&file)),
        "orig\nbefore\nafter\n",
        "the RAM copy has what was written before the cover"
    );
    ns.asd_ok(&["unsync"]);
    assert_eq!(read(&file), "orig\nbefore\nafter\n");
}

/// Every way of holding a target is found, whatever path it was reached by: a working
/// directory, a file open through a bind mount of the parent elsewhere, a file open from another
/// mount namespace, a deleted file still open, and a program run from the target (mapped only).
#[test]
fn holders_are_found_by_every_path() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = ns.data().join("t");
    let alias = ns.root.join("alias");
    ns.sh_ok(&format!(
        "mkdir -p '{t}/sub' '{a}' && echo orig > '{t}/f' && cp /bin/sleep '{t}/prog' && \
         mount --bind '{d}' '{a}'",
        t = target.display(),
        a = alias.display(),
        d = ns.data().display()
    ));
    ns.write_conf(&[&target], "");
    let t = target.display();
    let a = alias.display();
    let spawn = |script: String| {
        let mut c = ns.cmd("sh");
        c.args(["-c", &script]);
        Prog::spawn(c)
    };
    let cwd = spawn(format!("cd '{t}/sub' && exec sleep 300"));
    let alias_fd = spawn(format!("cd / && exec 3<'{a}/t/f' && exec sleep 300"));
    let other_ns = Prog::spawn({
        let mut c = ns.cmd("unshare");
        c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("cd / && exec 4<'{t}/f' && exec sleep 300"));
        c
    });
    let deleted = spawn(format!(
        "cd / && exec 5>'{t}/gone' && rm '{t}/gone' && exec sleep 300"
    ));
    let mapped = spawn(format!("cd / && exec '{t}/prog' 300"));
    let all = [&cwd, &alias_fd, &other_ns, &deleted, &mapped];
    // Each has become what it runs (`exec`) once its command name says so.
    wait_for("the holders", || {
        all.iter().all(|p| {
            let comm = read(Path::new(&format!("/proc/{}/comm", p.pid())));
            comm.trim() == "sleep" || comm.trim() == "prog"
        }) && !ns.inside(&target.join("gone")).exists()
    });

    let out = ns
        .asd_cmd(&["sync"])
        .env("ASD_SYNC_BUSY_WAIT", "0")
        .output()
        .expect("asd");
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    for p in all {
        assert!(
            said.contains(&format!("(pid {})", p.pid())),
            "pid {} not named: {said}",
            p.pid()
        );
    }
    assert!(
        said.contains(&format!("prog (pid {})", mapped.pid())),
        "{said}"
    );
    assert_eq!(ns.our_mounts(), [alias.display().to_string()]);

    drop((cwd, alias_fd, other_ns, deleted, mapped));
    ns.asd_ok(&["sync"]);
    ns.asd_ok(&["unsync"]);
    assert_eq!(read(&target.join("f")), "orig\n");
}

/// Per-user mode: alice's program has a file of her target open; her asd refuses, naming it,
/// without asking the helper for anything; what the program writes is on disk.
#[test]
fn per_user_sync_refuses_a_target_her_program_has_open() {
    let Some(w) = World::new() else { return };
    let (_, target, conf) = w.user_setup("asdalice", "work-hold");
    let go = w.ns.root.join("go");
    let file = target.join("sub/f");
    let writer = start_writer(w.cmd_as("asdalice", "sh"), &file, &go);
    let out = w.asd_as("asdalice", &conf, &["sync"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("sh (pid {})", writer.pid())) && said.contains("asd sync` again"),
        "{said}"
    );
    let home = target.parent().expect("home");
    assert!(
        entries(&w.ns, home, ".work-hold-backup_asd").is_empty(),
        "left beside the target"
    );
    assert!(!w
        .ns
        .inside(&w.ns.vol().join("asd-asdalice/home/asdalice/work-hold"))
        .exists());
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", w.ns.pid)).expect("info");
    assert!(!info.contains(&format!(" {} ", target.display())), "{info}");

    std::fs::write(&go, "").expect("go");
    writer.finish("the writer");
    assert_eq!(read(&file), "hello\nbefore\nafter\n");
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert_eq!(read(&file), "hello\nbefore\nafter\n");
}

/// A shell in a mount namespace of its own (`unshare -m` in the test's private namespace) holds
/// a copy of the cover and writes through it: unsync refuses that target naming the shell, the
/// target stays in RAM and writable, and once the shell is gone unsync writes all of it back.
fn copy_elsewhere_blocks_unsync(extra: &str, fs_type: &str) {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = target_with_f(&ns, extra);
    ns.asd_ok(&["sync"]);
    let go = ns.root.join("go");
    let sb = target.join("from-sandbox");
    let sandbox = Prog::spawn({
        let mut c = ns.cmd("unshare");
        c.args(["-m", "--propagation", "unchanged", "--", "sh", "-c"])
            .arg(format!(
                "cd / && echo sandbox > '{sb}' && {u} && echo late >> '{sb}'",
                sb = sb.display(),
                u = until(&go)
            ));
        c
    });
    wait_for("the sandbox", || read(&ns.inside(&sb)) == "sandbox\n");

    let out = ns.asd(&["unsync"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "unsync must refuse: {said}");
    assert!(
        said.contains("another mount namespace")
            && said.contains(&format!("sh (pid {})", sandbox.pid()))
            && said.contains("run `asd unsync` again"),
        "{said}"
    );
    assert_eq!(ns.statfs_type(&target), fs_type, "still in RAM");
    ns.sh_ok(&format!("echo mine > '{}/mine'", target.display()));

    std::fs::write(&go, "").expect("go");
    sandbox.finish("the sandbox");
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
    assert_eq!(read(&sb), "sandbox\nlate\n");
    assert_eq!(read(&target.join("mine")), "mine\n");
    assert_eq!(read(&target.join("f")), "orig\n");
}

#[test]
fn copy_elsewhere_blocks_unsync_copy_mode() {
    copy_elsewhere_blocks_unsync("", "tmpfs");
}

#[test]
fn copy_elsewhere_blocks_unsync_overlay_mode() {
    copy_elsewhere_blocks_unsync("USE_OVERLAYFS=yes", "overlayfs");
}

/// On a shared root (a host booted with systemd), the copies that mount propagation gives other
/// namespaces (a service's slave namespace made before sync, an `unshare --propagation
/// unchanged` one made after) go away with the cover: unsync does not refuse them, and what
/// those namespaces write afterwards lands on the disk.
#[test]
fn propagated_copies_go_with_the_cover() {
    if !require_root() {
        return;
    }
    let ns = Ns::with_propagation(true);
    let target = target_with_f(&ns, "");
    let go = ns.root.join("go");
    let in_ns = |propagation: &str, name: &str| {
        let mut c = ns.cmd("unshare");
        c.args(["-m", "--propagation", propagation, "--", "sh", "-c"])
            .arg(format!(
                "cd / && {u} && echo late > '{t}/{name}'",
                u = until(&go),
                t = target.display()
            ));
        Prog::spawn(c)
    };
    let service = in_ns("slave", "service");
    wait_for("the service namespace", || {
        read(Path::new(&format!("/proc/{}/comm", service.pid()))).trim() == "sh"
            && std::fs::read_link(format!("/proc/{}/ns/mnt", service.pid())).ok()
                != std::fs::read_link(format!("/proc/{}/ns/mnt", ns.pid)).ok()
    });
    ns.asd_ok(&["sync"]);
    let peer = in_ns("unchanged", "peer");
    let cover_in = |pid: u32| {
        read(Path::new(&format!("/proc/{pid}/mountinfo")))
            .lines()
            .any(|l| l.split(' ').nth(4) == target.to_str())
    };
    wait_for("the copies", || {
        cover_in(service.pid()) && cover_in(peer.pid())
    });

    let out = ns.asd_ok(&["unsync"]);
    assert!(out.contains("unsync successful"), "{out}");
    assert!(!cover_in(service.pid()) && !cover_in(peer.pid()));
    std::fs::write(&go, "").expect("go");
    service.finish("the service");
    peer.finish("the peer");
    assert_eq!(read(&target.join("service")), "late\n");
    assert_eq!(read(&target.join("peer")), "late\n");
}

/// Per-user mode: alice's shell in a namespace of its own holds a copy of her cover.
#[test]
fn per_user_copy_elsewhere_blocks_unsync() {
    let Some(w) = World::new() else { return };
    let (_, target, conf) = w.user_setup("asdalice", "work-copy");
    w.asd_as_ok("asdalice", &conf, &["sync"]);
    let go = w.ns.root.join("go");
    let sb = target.join("from-sandbox");
    let sandbox = Prog::spawn({
        let mut c = w.ns.cmd("unshare");
        c.args([
            "-m",
            "--propagation",
            "unchanged",
            "--",
            "setpriv",
            "--reuid",
            "asdalice",
            "--regid",
            "asdalice",
            "--init-groups",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "cd / && echo sandbox > '{sb}' && {u} && echo late >> '{sb}'",
            sb = sb.display(),
            u = until(&go)
        ));
        c
    });
    wait_for("the sandbox", || read(&w.ns.inside(&sb)) == "sandbox\n");
    let out = w.asd_as("asdalice", &conf, &["unsync"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("another mount namespace")
            && said.contains(&format!("sh (pid {})", sandbox.pid())),
        "{said}"
    );
    assert_eq!(w.ns.statfs_type(&target), "tmpfs", "still in RAM");
    w.ns.sh_ok(&format!(
        "su asdalice -s /bin/sh -c 'echo mine > {}/mine'",
        target.display()
    ));
    std::fs::write(&go, "").expect("go");
    sandbox.finish("the sandbox");
    w.asd_as_ok("asdalice", &conf, &["unsync"]);
    assert_eq!(read(&sb), "sandbox\nlate\n");
    assert_eq!(read(&target.join("mine")), "mine\n");
    assert_eq!(read(&target.join("sub/f")), "hello\n");
}

/// A program working in the target at unsync (the kernel's busy): the message names it.
#[test]
fn busy_unsync_names_the_program() {
    if !require_root() {
        return;
    }
    let ns = Ns::new();
    let target = target_with_f(&ns, "");
    ns.asd_ok(&["sync"]);
    let sitter = Prog::spawn({
        let mut c = ns.cmd("sh");
        c.args([
            "-c",
            &format!("cd '{}' && exec sleep 300", target.display()),
        ]);
        c
    });
    wait_for("the sitter", || {
        std::fs::read_link(format!("/proc/{}/cwd", sitter.pid())).ok() == Some(target.clone())
            && read(Path::new(&format!("/proc/{}/comm", sitter.pid()))).trim() == "sleep"
    });
    let out = ns.asd(&["unsync"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("busy") && said.contains(&format!("sleep (pid {})", sitter.pid())),
        "{said}"
    );
    assert_eq!(ns.statfs_type(&target), "tmpfs");
    drop(sitter);
    ns.asd_ok(&["unsync"]);
    assert!(ns.our_mounts().is_empty(), "{:?}", ns.our_mounts());
}
