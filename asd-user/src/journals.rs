//! The daemon's change journals: one per target in copy mode, and the rule for when a
//! write-back may look only at what a journal marked instead of comparing by ctime.
//!
//! A journal's marks may replace the ctime comparison of a write-back only if the journal has
//! been running, without a gap, since before the previous successful write-back of that target
//! began: that write-back made the disk equal to RAM for everything changed up to its start,
//! and the journal's period (from the `take` just before that write-back to the `take` just
//! before this one) holds every change after. So:
//!
//! - a journal just started is not *ready*: the write-back after its start compares by ctime
//!   (from the state's `clean_since`, which no journal is needed for), and only its success
//!   makes the journal ready;
//! - every write-back takes the journal's period first, whether it uses it or not, so periods
//!   always begin just before a write-back;
//! - a failed write-back unreadies the journal (the period it took is gone with it), and so does
//!   a period the journal is in doubt about;
//! - a journal that is broken for good (its root deleted or unmounted, see
//!   [`crate::journal`]) is dropped and a new one started.
//!
//! Only the long-running daemon keeps journals; a one-off `asd resync` compares by ctime.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use crate::journal::{ChangeJournal, Changes, DirtyTree};
use crate::state::{Mode, TargetState};

/// Marks per journal period beyond which a comparison by ctime is about as cheap (and the job
/// sent to a worker process stays small).
const LIMIT: usize = 20_000;

struct Watched {
    journal: ChangeJournal,
    ready: bool,
}

#[derive(Default)]
pub struct Journals {
    by_target: RefCell<HashMap<PathBuf, Watched>>,
}

impl Journals {
    pub fn new() -> Journals {
        Journals::default()
    }

    /// Called just before a write-back of `t` begins reading. Returns the marks of the period
    /// that just ended if the write-back may look only at them (see the module doc); starts a
    /// journal for `t` if it has none.
    pub fn before_write_back(&self, t: &TargetState) -> Option<DirtyTree> {
        if t.mode != Mode::Copy {
            return None;
        }
        let mut map = self.by_target.borrow_mut();
        let target = &t.paths.target;
        if let Some(why) = map.get(target).and_then(|w| w.journal.broken()) {
            tracing::debug!("{}: change journal stopped ({why})", target.display());
            map.remove(target);
        }
        let Some(w) = map.get_mut(target) else {
            match ChangeJournal::start(&t.paths.volatile, LIMIT) {
                Ok(journal) => {
                    map.insert(
                        target.clone(),
                        Watched {
                            journal,
                            ready: false,
                        },
                    );
                }
                Err(e) => tracing::debug!(
                    "{}: no change journal ({e}); write-backs compare by ctime",
                    target.display()
                ),
            }
            return None;
        };
        let changes = w.journal.take();
        // Ready again only once this write-back succeeded.
        let ready = std::mem::replace(&mut w.ready, false);
        match changes {
            Changes::Exact(tree) if ready => Some(tree),
            Changes::Exact(_) => None,
            Changes::InDoubt(why) => {
                tracing::debug!(
                    "{}: change journal in doubt ({why}); comparing by ctime",
                    target.display()
                );
                None
            }
        }
    }

    /// Called when the write-back that followed [`Journals::before_write_back`] ended.
    pub fn after_write_back(&self, t: &TargetState, ok: bool) {
        if let Some(w) = self.by_target.borrow_mut().get_mut(&t.paths.target) {
            w.ready = ok;
        }
    }

    /// Every journal stops following events (see [`ChangeJournal::stop_reading`]).
    pub fn stop_reading(&self) {
        for w in self.by_target.borrow_mut().values_mut() {
            w.journal.stop_reading();
        }
    }

    /// The target left RAM: its journal goes, returned to be dropped where the caller likes
    /// (closing it removes one watch per directory, which takes a while in a big tree).
    pub fn forget(&self, t: &TargetState) -> Option<ChangeJournal> {
        self.by_target
            .borrow_mut()
            .remove(&t.paths.target)
            .map(|w| w.journal)
    }
}
