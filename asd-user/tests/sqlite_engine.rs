//! Live SQLite databases through the copy engine alone (issue 12), without mounts: a writer
//! commits without pause to a database in a tmpfs directory while the engine writes that
//! directory back to disk again and again; after every write-back the copy on disk must open,
//! pass `integrity_check` and hold every transaction committed before the write-back began.
//! `ASD_TEST_PLAIN_DATABASES=1` shows what a file-by-file copy gives instead.

mod sqlite_common;

use std::path::Path;
use std::process::Command;

use asd::copy::{sync_tree, CopyOptions};
use sqlite_common::*;

/// The writer processes run this test binary (see `sqlite_common::ProcWriter`: a writer in
/// another process, as programs are; POSIX locks are per process).
#[test]
fn zz_writer_process() {
    writer_process_main();
}

/// A writer process on `db`, its control files in `ipc`.
fn writer(db: &Path, journal: Journal, ipc: &Path, exclusive: bool) -> ProcWriter {
    ProcWriter::start_with(Command::new("env"), db, journal, ipc, exclusive)
}

fn tmpfs_dir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    assert!(base.is_dir(), "/dev/shm (a tmpfs) is needed");
    tempfile::Builder::new()
        .prefix("asd-sqlite-src-")
        .tempdir_in(base)
        .expect("tmpfs dir")
}

fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("asd-sqlite-dst-")
        .tempdir_in("/var/tmp")
        .expect("disk dir")
}

fn write_backs_while_writing(journal: Journal) {
    let src = tmpfs_dir();
    let dst = disk_dir();
    let scratch = disk_dir();
    let name = journal.file();
    create(&src.path().join(&name), journal);
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    };
    sync_tree(src.path(), dst.path(), &opts).expect("first write-back");
    let ipc = disk_dir();
    let writer = writer(&src.path().join(&name), journal, ipc.path(), false);
    let mut tally = Tally::default();
    let mut held = 0;
    for i in 0..rounds(30) {
        let before = writer.committed();
        let stats = sync_tree(src.path(), dst.path(), &opts);
        let stats = match stats {
            Ok(s) => s,
            Err(e) => {
                tally.corrupt.push(format!("write-back {i} failed: {e}"));
                continue;
            }
        };
        held = held.max(stats.db_lock_us);
        if std::env::var_os("ASD_SQLITE_VERBOSE").is_some() {
            eprintln!(
                "write-back {i}: {} bytes, lock {} µs",
                stats.bytes_copied, stats.db_lock_us
            );
        }
        tally.record(
            &format!("write-back {i}"),
            before,
            check(dst.path(), &name, scratch.path()),
        );
        assert_eq!(writer.error(), None, "the writer failed");
    }
    let last = writer.stop().expect("the writer saw no error");
    sync_tree(src.path(), dst.path(), &opts).expect("last write-back");
    let seen = check(dst.path(), &name, scratch.path()).expect("the last copy is sound");
    assert_eq!(seen.n, last, "the last write-back has every commit");
    eprintln!("longest lock held: {held} µs");
    tally.assert_clean(&format!("engine, {}", journal.name()));
}

#[test]
fn wal_database_written_back_while_writing() {
    write_backs_while_writing(Journal::Wal);
}

#[test]
fn rollback_database_written_back_while_writing() {
    write_backs_while_writing(Journal::Rollback);
}

/// Entries of a directory with their inode, size, mtime and ctime.
fn listing(dir: &Path) -> Vec<(String, u64, u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .flatten()
        .map(|e| {
            let m = e.metadata().expect("stat");
            (
                e.file_name().to_string_lossy().into_owned(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Databases nobody has open are read without touching them: no `-wal`, `-shm` or `-journal`
/// appears beside them, and nothing there changes (a read-only SQLite connection to a WAL
/// database without its WAL would create both).
#[test]
fn quiet_databases_are_not_touched() {
    let src = tmpfs_dir();
    let dst = disk_dir();
    let scratch = disk_dir();
    for j in [Journal::Wal, Journal::Rollback] {
        create(&src.path().join(j.file()), j);
    }
    let before = listing(src.path());
    assert_eq!(before.len(), 2, "{before:?}");
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    };
    let stats = sync_tree(src.path(), dst.path(), &opts).expect("write-back");
    assert_eq!(stats.databases, 2, "{stats:?}");
    assert_eq!(listing(src.path()), before, "the source changed");
    for j in [Journal::Wal, Journal::Rollback] {
        check(dst.path(), &j.file(), scratch.path()).expect("a sound copy");
    }
    // Unchanged since: nothing to write.
    let again = sync_tree(src.path(), dst.path(), &opts).expect("write-back");
    assert_eq!((again.databases, again.files_copied), (0, 0), "{again:?}");
}

/// A database left by a program killed in the middle of a commit (a hot journal beside it, and
/// part of the commit already in the database): the copy on disk is the state before that
/// commit, as SQLite itself would recover it, and no journal is written beside it.
#[test]
fn a_hot_journal_is_rolled_back_in_the_copy() {
    let src = tmpfs_dir();
    let dst = disk_dir();
    let scratch = disk_dir();
    let work = tmpfs_dir();
    let name = Journal::Rollback.file();
    let live = work.path().join(&name);
    create(&live, Journal::Rollback);
    // A big transaction with a one-page cache spills pages into the database while it is
    // open: a copy of both files now is what a kill -9 leaves.
    let conn = rusqlite::Connection::open(&live).expect("open");
    conn.execute_batch(
        "PRAGMA cache_size=1; BEGIN; UPDATE items SET payload = zeroblob(3000); \
         UPDATE meta SET n = 999999;",
    )
    .expect("a transaction that spills");
    let journal = work.path().join(format!("{name}-journal"));
    assert!(
        std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0),
        "the journal is hot"
    );
    std::fs::copy(&live, src.path().join(&name)).expect("copy");
    std::fs::copy(&journal, src.path().join(format!("{name}-journal"))).expect("copy");
    conn.execute_batch("ROLLBACK").expect("rollback");
    drop(conn);
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    };
    sync_tree(src.path(), dst.path(), &opts).expect("write-back");
    assert!(!dst.path().join(format!("{name}-journal")).exists());
    let seen = check(dst.path(), &name, scratch.path()).expect("a sound copy");
    assert_eq!(seen.n, KEEP, "the interrupted commit is rolled back");
}

/// Programs that lock their databases exclusively (Firefox, Chromium), writing in bursts: asd
/// gets no lock and relies on its checks alone.
fn exclusive_writer(journal: Journal) {
    let src = tmpfs_dir();
    let dst = disk_dir();
    let scratch = disk_dir();
    let name = journal.file();
    create(&src.path().join(&name), journal);
    let opts = CopyOptions {
        delete: true,
        durable: true,
        ..Default::default()
    };
    let ipc = disk_dir();
    let writer = writer(&src.path().join(&name), journal, ipc.path(), true);
    let mut tally = Tally::default();
    for i in 0..rounds(30) {
        let before = writer.committed();
        match sync_tree(src.path(), dst.path(), &opts) {
            Ok(s) => assert_eq!(s.db_lock_us, 0, "a lock was had on an exclusive database"),
            Err(e) => {
                tally.corrupt.push(format!("write-back {i} failed: {e}"));
                continue;
            }
        }
        tally.record(
            &format!("write-back {i}"),
            before,
            check(dst.path(), &name, scratch.path()),
        );
    }
    writer.stop().expect("the writer saw no error");
    tally.assert_clean(&format!("exclusive {}", journal.name()));
}

#[test]
fn exclusive_wal_database_written_back_while_writing() {
    exclusive_writer(Journal::Wal);
}

#[test]
fn exclusive_rollback_database_written_back_while_writing() {
    exclusive_writer(Journal::Rollback);
}
