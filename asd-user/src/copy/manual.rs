//! Manual measurements and experiments (not run by default):
//! `ASD_COPY_SRC=A ASD_COPY_DST=B [ASD_COPY_DURABLE=1] [ASD_COPY_SINCE=SEC[.NSEC]]
//! [ASD_COPY_SINCE_NOW_MINUS_SECS=N] cargo test -p asd-user --lib copy::manual -- --ignored
//! --nocapture`. `ASD_COPY_SINCE` is an absolute time (`date +%s.%N`) for
//! `CopyOptions::changed_since`; the other sets it relative to now.

use super::*;

fn since() -> Option<Timestamp> {
    if let Some(v) = std::env::var_os("ASD_COPY_SINCE") {
        let v = v.to_string_lossy().into_owned();
        let (sec, frac) = v.split_once('.').unwrap_or((&v, "0"));
        let nsec = format!("{frac:0<9}")[..9].parse().unwrap();
        return Some(Timestamp {
            sec: sec.parse().unwrap(),
            nsec,
        });
    }
    let secs: i64 = std::env::var("ASD_COPY_SINCE_NOW_MINUS_SECS")
        .ok()?
        .parse()
        .unwrap();
    let now = Timestamp::now();
    Some(Timestamp {
        sec: now.sec - secs,
        ..now
    })
}

#[test]
#[ignore]
fn run_sync_tree() {
    let (Some(src), Some(dst)) = (
        std::env::var_os("ASD_COPY_SRC"),
        std::env::var_os("ASD_COPY_DST"),
    ) else {
        eprintln!("set ASD_COPY_SRC and ASD_COPY_DST");
        return;
    };
    let opts = CopyOptions {
        delete: true,
        durable: std::env::var_os("ASD_COPY_DURABLE").is_some(),
        changed_since: since(),
    };
    let start = std::time::Instant::now();
    let st = sync_tree(Path::new(&src), Path::new(&dst), &opts);
    eprintln!("{opts:?}: {st:?} in {:?}", start.elapsed());
}
