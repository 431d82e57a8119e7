//! Whether the wall clock was set back since a moment: a write-back that compares by ctime
//! (inode times come from the wall clock) would miss entries changed after such a step whose
//! ctime lands before its cutoff. A step back is seen as the wall clock having advanced less
//! than the boot-time clock, which no one can set; the two drift apart only by NTP's slewing
//! (at most 500 ppm), which never makes the wall clock go back.

use crate::copy::{Timestamp, CTIME_MARGIN_MS};

/// The boot-time clock at a moment, to hold next to a wall-clock time taken then.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockMark {
    /// `/proc/sys/kernel/random/boot_id`: the boot-time clock restarts with every boot.
    pub boot_id: String,
    /// `CLOCK_BOOTTIME` in nanoseconds.
    pub boottime_ns: u64,
}

impl ClockMark {
    /// Now; None if the clock cannot be read (then callers assume the worst).
    pub fn now() -> Option<ClockMark> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(ClockMark {
            boot_id: boot_id.trim().to_string(),
            boottime_ns: boottime_ns()?,
        })
    }

    /// Whether the wall clock may have been set back since `then` (the wall-clock time taken
    /// with this mark): another boot, or less wall-clock than boot-time progress beyond what
    /// slewing and the ctime margin explain.
    pub fn stepped_back_since(&self, then: Timestamp) -> bool {
        let (Some(now), Some(boot_now)) = (ClockMark::now(), boottime_ns()) else {
            return true;
        };
        if now.boot_id != self.boot_id || boot_now < self.boottime_ns {
            return true;
        }
        let boot_elapsed = i128::from(boot_now - self.boottime_ns);
        let wall_now = Timestamp::now();
        let wall_elapsed = (i128::from(wall_now.sec) - i128::from(then.sec)) * 1_000_000_000
            + (i128::from(wall_now.nsec) - i128::from(then.nsec));
        let slack = i128::from(CTIME_MARGIN_MS) * 1_000_000 + boot_elapsed / 2000;
        wall_elapsed < boot_elapsed - slack
    }
}

fn boottime_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, which we own and which lives on our stack.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nsec = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_step_without_one() {
        let then = Timestamp::now();
        let mark = ClockMark::now().expect("clock");
        assert!(!mark.stepped_back_since(then));
    }

    #[test]
    fn a_step_back_is_seen() {
        let then = Timestamp::now();
        let mut mark = ClockMark::now().expect("clock");
        // As if an hour of boot time had passed while the wall clock stood still: it was set
        // back by an hour.
        mark.boottime_ns = mark.boottime_ns.saturating_sub(3_600_000_000_000);
        assert!(mark.stepped_back_since(then));
    }

    #[test]
    fn another_boot_is_a_step() {
        let then = Timestamp::now();
        let mut mark = ClockMark::now().expect("clock");
        mark.boot_id = "another boot".into();
        assert!(mark.stepped_back_since(then));
    }
}
