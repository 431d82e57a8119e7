//! Live SQLite databases for the tests of issue 12: a writer that commits without pause (as a
//! browser writes its history), and a check that a copy of the database opens, passes
//! `PRAGMA integrity_check` and holds one transaction-consistent state that includes what was
//! committed before a given moment.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

/// Rows kept: every transaction inserts row `n` and deletes row `n - KEEP`.
pub const KEEP: u64 = 1500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Journal {
    /// `journal_mode=WAL`: the writer sets no busy timeout (WAL readers never block it).
    Wal,
    /// `journal_mode=DELETE`, the default: the writer waits up to 5 s for readers, as every
    /// program that shares a rollback-journal database must.
    Rollback,
}

impl Journal {
    pub fn name(self) -> &'static str {
        match self {
            Journal::Wal => "wal",
            Journal::Rollback => "rollback",
        }
    }

    pub fn file(self) -> String {
        format!("{}.sqlite", self.name())
    }
}

/// Creates the database at `path` (which must not exist) and fills it with KEEP rows, so that a
/// copy takes a while (a few MB).
pub fn create(path: &Path, journal: Journal) {
    let conn = Connection::open(path).expect("create the database");
    let mode = match journal {
        Journal::Wal => "WAL",
        Journal::Rollback => "DELETE",
    };
    let got: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(got.to_uppercase(), mode);
    conn.execute_batch(
        "CREATE TABLE meta(n INTEGER NOT NULL);
         INSERT INTO meta VALUES(0);
         CREATE TABLE items(id INTEGER PRIMARY KEY, tag INTEGER NOT NULL, payload BLOB NOT NULL);
         CREATE INDEX items_tag ON items(tag);",
    )
    .expect("schema");
    // Filled without fsyncs: only the result matters here.
    conn.execute_batch("PRAGMA synchronous=OFF")
        .expect("synchronous");
    let mut w = Txn::new(&conn);
    for _ in 0..KEEP {
        w.commit_one(&conn).expect("fill");
    }
    conn.close().map_err(|(_, e)| e).expect("close");
}

/// The transaction every writer runs: row `n` in, row `n - KEEP` out, `meta.n = n`.
struct Txn {
    n: u64,
    seed: u64,
}

impl Txn {
    fn new(conn: &Connection) -> Txn {
        let n: i64 = conn
            .query_row("SELECT n FROM meta", [], |r| r.get(0))
            .expect("meta");
        Txn {
            n: n as u64,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn commit_one(&mut self, conn: &Connection) -> rusqlite::Result<u64> {
        let n = self.n + 1;
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let size = 600 + self.seed % 3000;
        let tag = self.seed % 997;
        conn.execute_batch("BEGIN")?;
        let r = (|| {
            conn.execute(
                "INSERT INTO items(id, tag, payload) VALUES (?1, ?2, randomblob(?3))",
                params![n as i64, tag as i64, size as i64],
            )?;
            conn.execute(
                "DELETE FROM items WHERE id = ?1",
                params![n as i64 - KEEP as i64],
            )?;
            conn.execute("UPDATE meta SET n = ?1", params![n as i64])?;
            conn.execute_batch("COMMIT")
        })();
        if let Err(e) = r {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        self.n = n;
        Ok(n)
    }
}

/// What a copy of a database holds, if it is a sound one.
#[derive(Debug)]
pub struct Seen {
    /// The last transaction in it.
    pub n: u64,
}

/// Opens a database found in `dir` the way a program would after a restart: the main file
/// `name` and whatever logs lie beside it are copied to `scratch` (the copy under test is never
/// changed by the check), opened there, and checked: `integrity_check` is `ok`, and the rows are
/// exactly those of one transaction (`n - KEEP + 1 ..= n` and `meta.n = n`).
pub fn check(dir: &Path, name: &str, scratch: &Path) -> Result<Seen, String> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| e.to_string())?;
    for suffix in ["", "-wal", "-journal"] {
        let from = dir.join(format!("{name}{suffix}"));
        if from.exists() {
            std::fs::copy(&from, scratch.join(format!("{name}{suffix}")))
                .map_err(|e| format!("copy {}: {e}", from.display()))?;
        } else if suffix.is_empty() {
            return Err(format!("{} is missing", from.display()));
        }
    }
    let conn = Connection::open_with_flags(
        scratch.join(name),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("open: {e}"))?;
    let ic: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| format!("integrity_check: {e}"))?;
    if ic != ["ok"] {
        return Err(format!("integrity_check: {}", ic.join("; ")));
    }
    let n: i64 = conn
        .query_row("SELECT n FROM meta", [], |r| r.get(0))
        .map_err(|e| format!("meta: {e}"))?;
    let (count, min, max): (i64, Option<i64>, Option<i64>) = conn
        .query_row("SELECT count(*), min(id), max(id) FROM items", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| format!("items: {e}"))?;
    let n = n as u64;
    let want = (
        KEEP as i64,
        Some(n as i64 - KEEP as i64 + 1),
        Some(n as i64),
    );
    if (count, min, max) != want {
        return Err(format!(
            "not one transaction's state: meta.n = {n}, items: {count} rows, ids {min:?}..={max:?}"
        ));
    }
    Ok(Seen { n })
}

/// Tally of checks over many write-backs.
#[derive(Default, Debug)]
pub struct Tally {
    pub tried: u32,
    pub corrupt: Vec<String>,
    pub behind: Vec<String>,
}

impl Tally {
    /// Records the check of one write-back, begun when the writer had committed `before`.
    pub fn record(&mut self, what: &str, before: u64, seen: Result<Seen, String>) {
        self.tried += 1;
        match seen {
            Ok(s) if s.n >= before => {}
            Ok(s) => self.behind.push(format!(
                "{what}: holds transaction {} but {before} was committed before the write-back",
                s.n
            )),
            Err(e) => self.corrupt.push(format!("{what}: {e}")),
        }
    }

    pub fn summary(&self, label: &str) -> String {
        format!(
            "{label}: {} write-backs checked, {} corrupt, {} missing commits",
            self.tried,
            self.corrupt.len(),
            self.behind.len()
        )
    }

    pub fn assert_clean(&self, label: &str) {
        eprintln!("{}", self.summary(label));
        assert!(
            self.corrupt.is_empty() && self.behind.is_empty(),
            "{}:\n{}\n{}",
            self.summary(label),
            self.corrupt.join("\n"),
            self.behind.join("\n")
        );
    }
}

/// `ASD_SQLITE_RESYNCS` (default `default`): write-backs per test.
pub fn rounds(default: u32) -> u32 {
    std::env::var("ASD_SQLITE_RESYNCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// A writer in another process: the test binary itself, started in a test's mount namespace
// (and as the data's owner), where the program's paths are. A thread of the test could reach the
// namespace only through /proc/PID/root, which SQLite resolves to the host's paths.

/// The test a test binary must have for [`ProcWriter`]: `#[test] fn zz_writer_process() {
/// sqlite_common::writer_process_main() }`. Does nothing unless started as a writer.
pub const WRITER_TEST: &str = "zz_writer_process";

/// The writer process's body (see [`WRITER_TEST`]): commits to `ASD_SQLITE_WRITER_DB` until
/// the file `ASD_SQLITE_WRITER_STOP` exists, storing the last committed transaction in
/// `ASD_SQLITE_WRITER_COUNT` (8 bytes) and an error, if any, in `ASD_SQLITE_WRITER_ERR`.
pub fn writer_process_main() {
    use std::os::unix::fs::FileExt;
    let Some(db) = std::env::var_os("ASD_SQLITE_WRITER_DB") else {
        return;
    };
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_default());
    let (count, stop, err) = (
        var("ASD_SQLITE_WRITER_COUNT"),
        var("ASD_SQLITE_WRITER_STOP"),
        var("ASD_SQLITE_WRITER_ERR"),
    );
    let journal = match std::env::var("ASD_SQLITE_WRITER_JOURNAL").as_deref() {
        Ok("wal") => Journal::Wal,
        _ => Journal::Rollback,
    };
    // As Firefox and Chromium: nobody else may read, and commits come in bursts.
    let exclusive = std::env::var_os("ASD_SQLITE_WRITER_EXCLUSIVE").is_some_and(|v| !v.is_empty());
    let fail = |e: String| -> ! {
        let _ = std::fs::write(&err, e);
        std::process::exit(1);
    };
    let counter = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&count)
        .unwrap_or_else(|e| fail(format!("counter: {e}")));
    let conn = Connection::open_with_flags(
        PathBuf::from(db),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| fail(format!("open: {e}")));
    let busy = match journal {
        Journal::Wal => Duration::ZERO,
        Journal::Rollback => Duration::from_secs(5),
    };
    conn.busy_timeout(busy)
        .and_then(|()| conn.execute_batch("PRAGMA synchronous=NORMAL"))
        .unwrap_or_else(|e| fail(format!("setup: {e}")));
    if exclusive {
        conn.query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| {
            r.get::<_, String>(0)
        })
        .unwrap_or_else(|e| fail(format!("locking_mode: {e}")));
    }
    let mut txn = Txn::new(&conn);
    let store = |n: u64| {
        counter
            .write_all_at(&n.to_le_bytes(), 0)
            .unwrap_or_else(|e| fail(format!("counter: {e}")))
    };
    store(txn.n);
    let mut i = 0u64;
    loop {
        if i.is_multiple_of(16) && stop.exists() {
            break;
        }
        i += 1;
        match txn.commit_one(&conn) {
            Ok(n) => store(n),
            Err(e) => fail(format!("commit {}: {e}", txn.n + 1)),
        }
        if exclusive && txn.n.is_multiple_of(50) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Err((_, e)) = conn.close() {
        fail(format!("close: {e}"));
    }
    std::process::exit(0);
}

/// A writer process (see [`writer_process_main`]).
pub struct ProcWriter {
    child: std::process::Child,
    count: PathBuf,
    stop: PathBuf,
    err: PathBuf,
    pub journal: Journal,
}

impl ProcWriter {
    /// Starts a writer on `db` (a path as `cmd`'s process sees it), with its control files in
    /// `ipc` (a directory it can write). `cmd` is the command that runs a program in the test's
    /// namespace (as the owner): the test binary is appended to it.
    pub fn start(
        cmd: std::process::Command,
        db: &Path,
        journal: Journal,
        ipc: &Path,
    ) -> ProcWriter {
        ProcWriter::start_with(cmd, db, journal, ipc, false)
    }

    /// [`ProcWriter::start`]; with `exclusive`, in `locking_mode=EXCLUSIVE` (nobody else can
    /// read the database, as with Firefox and Chromium), committing in bursts of 50 with 100 ms
    /// pauses (browsers pause for seconds).
    pub fn start_with(
        mut cmd: std::process::Command,
        db: &Path,
        journal: Journal,
        ipc: &Path,
        exclusive: bool,
    ) -> ProcWriter {
        let tag = journal.name();
        let count = ipc.join(format!("{tag}.count"));
        let stop = ipc.join(format!("{tag}.stop"));
        let err = ipc.join(format!("{tag}.err"));
        for f in [&count, &stop, &err] {
            let _ = std::fs::remove_file(f);
        }
        let exe = std::env::current_exe().expect("the test binary");
        let child = cmd
            .arg(exe)
            .args(["--exact", WRITER_TEST, "--nocapture", "--test-threads=1"])
            .env("ASD_SQLITE_WRITER_DB", db)
            .env("ASD_SQLITE_WRITER_JOURNAL", tag)
            .env("ASD_SQLITE_WRITER_COUNT", &count)
            .env("ASD_SQLITE_WRITER_STOP", &stop)
            .env("ASD_SQLITE_WRITER_ERR", &err)
            .env(
                "ASD_SQLITE_WRITER_EXCLUSIVE",
                if exclusive { "1" } else { "" },
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the writer");
        let w = ProcWriter {
            child,
            count,
            stop,
            err,
            journal,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while w.committed() == 0 {
            if let Some(e) = w.error() {
                panic!("the {tag} writer failed: {e}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the {tag} writer did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    /// The last transaction committed so far.
    pub fn committed(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        match std::fs::File::open(&self.count).and_then(|f| f.read_exact_at(&mut b, 0)) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    /// The error that stopped the writer, if it met one.
    pub fn error(&self) -> Option<String> {
        std::fs::read_to_string(&self.err).ok()
    }

    /// Stops the writer: its last transaction, or the error it met.
    pub fn stop(mut self) -> Result<u64, String> {
        let _ = std::fs::write(&self.stop, "");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return Err("the writer did not stop".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(e) = self.error() {
            return Err(e);
        }
        if !status.success() {
            return Err(format!("the writer exited with {status}"));
        }
        Ok(self.committed())
    }
}

impl Drop for ProcWriter {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, "");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
