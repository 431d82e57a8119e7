//! Live SQLite databases through the copy engine alone (issue 12), without mounts: a writer
//! commits without pause to a database in a tmpfs directory while the engine writes that
//! directory back to disk again and again; after every write-back the copy on disk must open,
//! pass `integrity_check` and hold every transaction committed before the write-back began.
//! `ASD_TEST_PLAIN_DATABASES=1` shows what a file-by-file copy gives instead.

mod sqlite_common;

use std::path::Path;

use asd::copy::{sync_tree, CopyOptions};
use sqlite_common::*;

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
    let writer = Writer::start(&src.path().join(&name), journal);
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
        assert!(!writer.failed(), "the writer stopped");
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
