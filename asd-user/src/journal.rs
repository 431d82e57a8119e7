//! Change journal of a volatile copy: which entries changed since the previous resync, so a
//! resync compares only those instead of lstat-ing the whole tree.
//!
//! [`ChangeJournal::start`] puts an inotify watch on every directory of the tree below a root
//! (the root included) and a background thread records what the events say into a
//! [`DirtyTree`]. [`ChangeJournal::take`] returns what changed since the previous `take` (or since
//! `start`) and starts a new period; call it just *before* a resync walk, so that changes made
//! during the walk are reported by the next `take`.
//!
//! # What is guaranteed
//!
//! When `take` returns [`Changes::Exact`], every change made to the tree between the previous
//! `take` (or `start`) and this one is covered by the returned tree: an entry whose data,
//! size, mode, owner, times or xattrs changed, or that was created, deleted or renamed, is
//! marked (see [`Node`] for what each mark asks the comparison to look at); a directory that
//! appeared in the tree (created or moved in) is marked [`Node::whole`], since it may have been
//! filled before its watch was added. The journal may report more than what changed (an entry
//! changed and changed back, a file written with the same bytes), never less, except for the
//! blind spots below. Changes count whichever path they were made through: inotify watches
//! inodes, so a change made through a bind mount of the tree (the target path asd mounts over)
//! is reported as well.
//!
//! `take` first reads, under the journal's lock, every event the kernel has queued: inotify
//! queues an event in the system call that makes the change, so every change whose system
//! call returned before `take` was called is accounted for — no sleeping or polling needed.
//!
//! When the journal cannot vouch for completeness, `take` returns [`Changes::InDoubt`] with the
//! reason, and the caller must compare the whole tree (by ctime, `CopyOptions::changed_since`):
//! the kernel's event queue overflowed (`fs.inotify.max_queued_events`), a watch could not be
//! added (`fs.inotify.max_user_watches`, a directory the user cannot read), more than `limit`
//! entries changed, a changed file has several hard links. The journal then starts afresh for
//! the next period (after an overflow or a failed watch it first re-walks the directories, to
//! watch every one again). It stays in doubt for good (see [`ChangeJournal::broken`]) when the
//! root itself was deleted, moved or unmounted, a file system inside the tree was unmounted,
//! reading events failed or the reader thread ended; start a new journal then.
//!
//! # What is not guaranteed (blind spots)
//!
//! - Changes made before `start`. Start the journal *before* the full sync that makes the
//!   destination equal to the source, then `take` before each resync (the first `take` after
//!   `start` reports what changed during that full sync, which is then compared again).
//! - Writes through a shared memory mapping (`mmap(MAP_SHARED)`): the kernel reports none (the
//!   same blind spot as ctime, which tmpfs stamps only at the first write fault of a page).
//! - A file with hard links outside the tree: a change made through the outside name is
//!   reported to the outside name's directory only. Links can only be made within one file
//!   system (asd's tmpfs), and the copy engine never makes any; a change through a name inside
//!   the tree to a file with several links sends the journal in doubt for that period.
//! - The journal tells *where* to look, not *what* changed: the comparison still decides.
//!
//! # Cost
//!
//! One watch per directory (kernel memory, about 1 KiB each, counted against
//! `fs.inotify.max_user_watches`), a path per directory here, and at most `limit` nodes in the
//! dirty tree; starting lists every directory once (no per-file stat). A directory moved within
//! the tree is listed again (only its directories are watched; it is compared whole anyway).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::mem::MaybeUninit;
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::fd::OwnedFd;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// Why a journal could not be started.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create an inotify instance: {0}")]
    Init(#[source] std::io::Error),
    #[error("cannot watch directory {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the journal's reader thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What [`ChangeJournal::take`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Changes {
    /// Everything that changed in the period is covered by this tree (it may be empty: nothing
    /// to compare).
    Exact(DirtyTree),
    /// The journal cannot vouch for this period (the reason, for logs): compare the whole tree.
    InDoubt(String),
}

/// One node of a [`DirtyTree`]: an entry of the tree, named by its path from the root.
///
/// Marks (several may be set; a node without marks only leads to marked descendants):
/// - [`entry`](Node::entry): this entry itself was created, deleted, renamed away or to, or its
///   data or metadata changed: compare it (for a directory: its own metadata, not its content).
/// - [`listing`](Node::listing): names were added to, removed from or renamed in this
///   directory: compare its whole listing (non-recursively), deleting what the source lacks.
/// - [`whole`](Node::whole): compare this whole subtree, as a full comparison would (implies
///   the other two; a whole node has no children).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(default, skip_serializing_if = "is_false")]
    entry: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    listing: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    whole: bool,
    /// With `listing`: every destination name the source lacks is deleted, not only the names
    /// marked below (a scan of ctimes, see `crate::copy`, knows a directory changed but not
    /// which names went).
    #[serde(default, skip_serializing_if = "is_false")]
    all_extras: bool,
    /// Keyed by name bytes; serialized as a map from hexadecimal names (names need not be UTF-8).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "hex_names"
    )]
    children: BTreeMap<Vec<u8>, Node>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Node {
    /// This entry itself is to be compared.
    pub fn entry(&self) -> bool {
        self.entry
    }

    /// This directory's listing is to be compared (non-recursively).
    pub fn listing(&self) -> bool {
        self.listing
    }

    /// This whole subtree is to be compared.
    pub fn whole(&self) -> bool {
        self.whole
    }

    /// Its listing is compared with every destination name the source lacks deleted, marked
    /// or not.
    pub fn all_extras(&self) -> bool {
        self.all_extras
    }

    /// Any of the three marks is set.
    pub fn is_dirty(&self) -> bool {
        self.entry || self.listing || self.whole
    }

    /// The child node of that name, if it or something below it is marked.
    pub fn child(&self, name: impl AsRef<OsStr>) -> Option<&Node> {
        self.children.get(name.as_ref().as_bytes())
    }

    /// The child nodes, sorted by name bytes.
    pub fn children(&self) -> impl Iterator<Item = (&OsStr, &Node)> + '_ {
        self.children
            .iter()
            .map(|(name, node)| (OsStr::from_bytes(name), node))
    }

    /// Whether this node has child nodes.
    pub fn has_children(&self) -> bool {
        !self.children.is_empty()
    }

    /// (nodes, marked nodes) in this node's subtree, this node excluded.
    fn count_below(&self) -> (usize, usize) {
        self.children.values().fold((0, 0), |(n, d), c| {
            let (cn, cd) = c.count_below();
            (n + 1 + cn, d + usize::from(c.is_dirty()) + cd)
        })
    }
}

/// How an entry changed (internal: what [`DirtyTree::mark`] records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Entry,
    Listing,
    /// A listing whose extra destination names are all deleted.
    ListingAll,
    Whole,
    /// The entry was deleted or renamed away: compare the entry (it is gone, or something new
    /// took its place, which is marked by its own event); what was marked below it is moot.
    Gone,
}

/// The dirty tree was full (more than the journal's limit of nodes).
#[derive(Debug)]
struct Full;

/// Which entries of a tree are to be compared: a trie keyed by name bytes, rooted at the tree's
/// root (see [`Node`] for the marks). Serialized as its root [`Node`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Node", into = "Node")]
pub struct DirtyTree {
    root: Node,
    /// Nodes below the root.
    nodes: usize,
    /// Marked nodes, the root included.
    dirty: usize,
}

impl From<Node> for DirtyTree {
    fn from(root: Node) -> Self {
        let (nodes, dirty) = root.count_below();
        let dirty = dirty + usize::from(root.is_dirty());
        DirtyTree { root, nodes, dirty }
    }
}

impl From<DirtyTree> for Node {
    fn from(tree: DirtyTree) -> Self {
        tree.root
    }
}

impl DirtyTree {
    /// An empty tree: nothing to compare.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node of the root directory.
    pub fn root(&self) -> &Node {
        &self.root
    }

    /// Number of marked entries (the root included).
    pub fn len(&self) -> usize {
        self.dirty
    }

    /// Nothing is marked.
    pub fn is_empty(&self) -> bool {
        self.dirty == 0
    }

    /// Number of nodes below the root, marked or not (what the journal's limit bounds).
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// The node at `rel` (a path relative to the root; empty for the root).
    pub fn get(&self, rel: &Path) -> Option<&Node> {
        names(rel).try_fold(&self.root, |node, name| node.children.get(name))
    }

    /// Calls `f` with the path (relative to the root, empty for the root) and the node of every
    /// node, parents before children, children sorted by name bytes.
    pub fn walk(&self, mut f: impl FnMut(&Path, &Node)) {
        fn go(path: &mut PathBuf, node: &Node, f: &mut dyn FnMut(&Path, &Node)) {
            f(path, node);
            for (name, child) in &node.children {
                path.push(OsStr::from_bytes(name));
                go(path, child, f);
                path.pop();
            }
        }
        go(&mut PathBuf::new(), &self.root, &mut f);
    }

    /// Marks the entry at `rel` (relative to the root) to be compared.
    pub fn mark_entry(&mut self, rel: &Path) {
        let _ = self.mark(rel, Mark::Entry, usize::MAX);
    }

    /// Marks the listing of the directory at `rel` to be compared.
    pub fn mark_listing(&mut self, rel: &Path) {
        let _ = self.mark(rel, Mark::Listing, usize::MAX);
    }

    /// Marks the listing of the directory at `rel` to be compared, every destination name the
    /// source lacks deleted.
    pub fn mark_listing_all(&mut self, rel: &Path) {
        let _ = self.mark(rel, Mark::ListingAll, usize::MAX);
    }

    /// Marks the whole subtree at `rel` to be compared (drops the marks below it).
    pub fn mark_whole(&mut self, rel: &Path) {
        let _ = self.mark(rel, Mark::Whole, usize::MAX);
    }

    /// Records a mark, keeping at most `limit` nodes below the root. Returns whether the mark
    /// is new (not already set, nor implied by a whole ancestor).
    fn mark(&mut self, rel: &Path, how: Mark, limit: usize) -> Result<bool, Full> {
        let names: Vec<&[u8]> = names(rel).collect();
        // Is it implied by a whole ancestor (or itself)? How many nodes are missing?
        let mut node = &self.root;
        let mut depth = 0;
        for name in &names {
            if node.whole {
                return Ok(false);
            }
            match node.children.get(*name) {
                Some(child) => {
                    node = child;
                    depth += 1;
                }
                None => break,
            }
        }
        if depth == names.len() && node.whole {
            return Ok(false);
        }
        let missing = names.len() - depth;
        if self.nodes + missing > limit {
            return Err(Full);
        }
        let mut node = &mut self.root;
        for name in &names {
            node = node.children.entry(name.to_vec()).or_default();
        }
        self.nodes += missing;
        let was_dirty = node.is_dirty();
        let new = match how {
            Mark::Entry => !std::mem::replace(&mut node.entry, true),
            Mark::Listing => !std::mem::replace(&mut node.listing, true),
            Mark::ListingAll => {
                let listing = !std::mem::replace(&mut node.listing, true);
                !std::mem::replace(&mut node.all_extras, true) || listing
            }
            Mark::Whole | Mark::Gone => {
                let (below, dirty_below) = node.count_below();
                node.children.clear();
                self.nodes -= below;
                self.dirty -= dirty_below;
                if how == Mark::Whole {
                    // Canonical: a whole node has no other mark.
                    node.entry = false;
                    node.listing = false;
                    node.all_extras = false;
                    node.whole = true;
                    true
                } else {
                    node.listing = false;
                    node.all_extras = false;
                    !std::mem::replace(&mut node.entry, true)
                }
            }
        };
        if !was_dirty && node.is_dirty() {
            self.dirty += 1;
        }
        Ok(new)
    }
}

/// The names of a relative path's components (`.` and the like are skipped).
fn names(rel: &Path) -> impl Iterator<Item = &[u8]> {
    rel.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.as_bytes()),
        _ => None,
    })
}

/// Names serialized as lowercase hexadecimal map keys.
mod hex_names {
    use std::collections::BTreeMap;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Node;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<Vec<u8>, Node>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(name, node)| (hex(name), node)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Vec<u8>, Node>, D::Error> {
        BTreeMap::<String, Node>::deserialize(d)?
            .into_iter()
            .map(|(name, node)| match unhex(&name) {
                Some(bytes) => Ok((bytes, node)),
                None => Err(D::Error::custom(format!("bad hexadecimal name {name:?}"))),
            })
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        s
    }

    fn unhex(s: &str) -> Option<Vec<u8>> {
        let digit = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        let s = s.as_bytes();
        if !s.len().is_multiple_of(2) {
            return None;
        }
        s.chunks(2)
            .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
            .collect()
    }
}

/// What every directory is watched for.
fn watch_flags() -> WatchFlags {
    WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::ONLYDIR
        | WatchFlags::EXCL_UNLINK
}

/// One inotify event, decoded (a separate type so tests can feed synthetic ones).
#[derive(Debug, Clone, Copy)]
struct RawEvent<'a> {
    wd: i32,
    mask: ReadFlags,
    cookie: u32,
    name: Option<&'a [u8]>,
}

/// A directory renamed away (`IN_MOVED_FROM`), waiting for its `IN_MOVED_TO`.
#[derive(Debug)]
struct PendingMove {
    from: PathBuf,
    /// The watches below it then, with their paths.
    watches: Vec<(PathBuf, i32)>,
}

/// The journal's state (behind the mutex).
struct Core {
    fd: Arc<OwnedFd>,
    root: PathBuf,
    root_wd: i32,
    limit: usize,
    /// Watch descriptor → directory path relative to the root ("" for the root).
    paths: HashMap<i32, PathBuf>,
    /// The reverse map, ordered so that a subtree is a range.
    wds: BTreeMap<PathBuf, i32>,
    /// Directories renamed away in this period, by rename cookie.
    moves: HashMap<u32, PendingMove>,
    dirty: DirtyTree,
    /// Non-directories whose link count was checked in this period (see `check_links`).
    checked: HashSet<PathBuf>,
    /// Why this period is in doubt (recording stops until the next `take`).
    doubt: Option<String>,
    /// The watches may be incomplete: walk the tree again at the next `take`.
    rescan: bool,
    /// Why the journal is in doubt for good.
    broken: Option<String>,
}

impl Core {
    fn new(fd: Arc<OwnedFd>, root: PathBuf, limit: usize) -> Self {
        Core {
            fd,
            root,
            root_wd: -1,
            limit,
            paths: HashMap::new(),
            wds: BTreeMap::new(),
            moves: HashMap::new(),
            dirty: DirtyTree::new(),
            checked: HashSet::new(),
            doubt: None,
            rescan: false,
            broken: None,
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        // Never join "": "root/" would follow a symlink at the root.
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// This period is in doubt.
    fn doubt(&mut self, why: String) {
        if self.doubt.is_none() {
            tracing::debug!(root = %self.root.display(), "change journal in doubt: {why}");
            self.doubt = Some(why);
            self.dirty = DirtyTree::new();
        }
    }

    /// This period is in doubt and the watches may be incomplete.
    fn lost(&mut self, why: String) {
        self.rescan = true;
        self.doubt(why);
    }

    /// In doubt for good.
    fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            tracing::debug!(root = %self.root.display(), "change journal in doubt for good: {why}");
            self.broken = Some(why);
            self.dirty = DirtyTree::new();
        }
    }

    /// Records a mark; returns whether it is new.
    fn mark(&mut self, rel: &Path, how: Mark) -> bool {
        if self.doubt.is_some() || self.broken.is_some() {
            return false;
        }
        match self.dirty.mark(rel, how, self.limit) {
            Ok(new) => new,
            Err(Full) => {
                self.doubt(format!("more than {} changed entries", self.limit));
                false
            }
        }
    }

    fn set_watch(&mut self, wd: i32, rel: PathBuf) {
        if let Some(old) = self.paths.get(&wd) {
            if *old != rel && self.wds.get(old) == Some(&wd) {
                self.wds.remove(old);
            }
        }
        if let Some(&other) = self.wds.get(&rel) {
            if other != wd {
                // A stale mapping: that directory is no longer here.
                self.paths.remove(&other);
            }
        }
        self.paths.insert(wd, rel.clone());
        self.wds.insert(rel, wd);
    }

    fn forget_wd(&mut self, wd: i32) {
        if let Some(path) = self.paths.remove(&wd) {
            if self.wds.get(&path) == Some(&wd) {
                self.wds.remove(&path);
            }
        }
    }

    /// The watches at and below `rel`.
    fn watches_below(&self, rel: &Path) -> Vec<(PathBuf, i32)> {
        self.wds
            .range::<Path, _>((Bound::Included(rel), Bound::Unbounded))
            .take_while(|(path, _)| path.starts_with(rel))
            .map(|(path, &wd)| (path.clone(), wd))
            .collect()
    }

    /// A directory was renamed within the tree: its watch and those below it stay (the kernel
    /// watches inodes), under new paths.
    fn rewrite(&mut self, from: &Path, to: &Path, moved: Vec<(PathBuf, i32)>) {
        for (_, wd) in self.watches_below(to) {
            self.forget_wd(wd);
        }
        for (path, wd) in moved {
            // Only if nothing re-pointed it since the IN_MOVED_FROM.
            if self.paths.get(&wd) != Some(&path) {
                continue;
            }
            let Ok(rest) = path.strip_prefix(from) else {
                continue;
            };
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.set_watch(wd, new);
        }
    }

    /// Watches the directory at `rel` and every directory below it, each before listing it, so
    /// that nothing created meanwhile is missed (it is either listed, or reported by the new
    /// watch). Entries that vanish or turn out not to be directories meanwhile are skipped:
    /// their parent's watch reports that.
    fn watch_tree(&mut self, rel: &Path) -> Result<(), JournalError> {
        let mut stack = vec![rel.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let abs = self.abs(&dir);
            let gone = |e: Errno| matches!(e, Errno::NOENT | Errno::NOTDIR | Errno::LOOP);
            match inotify::add_watch(&*self.fd, &abs, watch_flags()) {
                Ok(wd) => self.set_watch(wd, dir.clone()),
                Err(e) if gone(e) && !dir.as_os_str().is_empty() => continue,
                Err(e) => {
                    return Err(JournalError::Watch {
                        path: abs,
                        source: e.into(),
                    })
                }
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let listing = match rustix::fs::openat(CWD, &abs, flags, Mode::empty()) {
                Ok(fd) => rustix::fs::Dir::new(fd),
                Err(e) => Err(e),
            };
            let entries = match listing {
                Ok(entries) => entries,
                Err(e) if gone(e) && !dir.as_os_str().is_empty() => continue,
                Err(e) => {
                    return Err(JournalError::List {
                        path: abs,
                        source: e.into(),
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|e| JournalError::List {
                    path: abs.clone(),
                    source: e.into(),
                })?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let name = OsStr::from_bytes(name);
                let is_dir = match entry.file_type() {
                    FileType::Directory => true,
                    FileType::Unknown => {
                        rustix::fs::statat(CWD, abs.join(name), AtFlags::SYMLINK_NOFOLLOW)
                            .is_ok_and(|st| {
                                FileType::from_raw_mode(st.st_mode) == FileType::Directory
                            })
                    }
                    _ => false,
                };
                if is_dir {
                    stack.push(dir.join(name));
                }
            }
        }
        Ok(())
    }

    /// Watches a directory that appeared in the tree.
    fn watch_new(&mut self, rel: &Path) {
        if let Err(e) = self.watch_tree(rel) {
            self.lost(e.to_string());
        }
    }

    /// A non-directory's data or metadata changed, or it appeared under a new name: with
    /// several links, its other names changed too (a link made with `link()` reports only the
    /// new name), and they are not reported. Checked once per name and period, at every kind of
    /// change, since the links may have been made after the first one. A name already gone when
    /// its event is read cannot be checked (its other links, if any, were made in RAM, where
    /// asd never makes any and the start refuses trees holding them).
    fn check_links(&mut self, rel: &Path) {
        if self.doubt.is_some() || self.broken.is_some() || self.checked.contains(rel) {
            return;
        }
        if self.checked.len() >= self.limit {
            self.doubt(format!("more than {} changed files", self.limit));
            return;
        }
        self.checked.insert(rel.to_path_buf());
        if let Ok(st) = rustix::fs::statat(CWD, self.abs(rel), AtFlags::SYMLINK_NOFOLLOW) {
            let links = st.st_nlink;
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory && links > 1 {
                self.doubt(format!(
                    "{} changed and has {links} hard links",
                    rel.display()
                ));
            }
        }
    }

    /// Records one event.
    fn process(&mut self, ev: &RawEvent<'_>) {
        let m = ev.mask;
        if m.contains(ReadFlags::QUEUE_OVERFLOW) {
            self.lost("the inotify event queue overflowed (fs.inotify.max_queued_events)".into());
            return;
        }
        if m.contains(ReadFlags::UNMOUNT) {
            self.fail("a file system in the tree was unmounted".into());
            return;
        }
        // Unknown: a watch already forgotten (its directory was deleted or moved away).
        let Some(dir) = self.paths.get(&ev.wd).cloned() else {
            return;
        };
        if m.contains(ReadFlags::IGNORED) {
            if ev.wd == self.root_wd {
                self.fail("the root's watch was removed (root deleted)".into());
            } else {
                self.forget_wd(ev.wd);
            }
            return;
        }
        let Some(name) = ev.name else {
            // About the watched directory itself.
            if m.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) {
                if ev.wd == self.root_wd {
                    self.fail("the root was deleted or moved".into());
                }
                // Otherwise the parent's watch reports it.
                return;
            }
            if m.intersects(ReadFlags::ATTRIB | ReadFlags::MODIFY | ReadFlags::CLOSE_WRITE) {
                self.mark(&dir, Mark::Entry);
            }
            return;
        };
        let path = dir.join(OsStr::from_bytes(name));
        let is_dir = m.contains(ReadFlags::ISDIR);
        if m.contains(ReadFlags::CREATE) {
            self.mark(&dir, Mark::Listing);
            if is_dir {
                self.mark(&path, Mark::Whole);
                self.watch_new(&path);
            } else {
                self.mark(&path, Mark::Entry);
                self.check_links(&path);
            }
        }
        if m.contains(ReadFlags::DELETE) {
            self.mark(&dir, Mark::Listing);
            self.mark(&path, Mark::Gone);
        }
        if m.contains(ReadFlags::MOVED_FROM) {
            self.mark(&dir, Mark::Listing);
            self.mark(&path, Mark::Gone);
            if is_dir {
                if self.moves.len() >= self.limit.max(1) {
                    self.lost("too many directories renamed".into());
                } else {
                    let watches = self.watches_below(&path);
                    let pending = PendingMove {
                        from: path.clone(),
                        watches,
                    };
                    self.moves.insert(ev.cookie, pending);
                }
            }
        }
        if m.contains(ReadFlags::MOVED_TO) {
            self.mark(&dir, Mark::Listing);
            if is_dir {
                if let Some(mv) = self.moves.remove(&ev.cookie) {
                    self.rewrite(&mv.from, &path, mv.watches);
                }
                self.mark(&path, Mark::Whole);
                // Also watches what the renamed directory's paths did not cover (directories
                // created in it whose own creation was processed after it moved on).
                self.watch_new(&path);
            } else {
                self.mark(&path, Mark::Entry);
                self.check_links(&path);
            }
        }
        if m.intersects(ReadFlags::MODIFY | ReadFlags::ATTRIB | ReadFlags::CLOSE_WRITE) {
            self.mark(&path, Mark::Entry);
            if !is_dir {
                self.check_links(&path);
            }
        }
    }

    /// Directories renamed away with no rename into the tree: they left the tree, so their
    /// watches go (unless a walk found them in the tree again meanwhile).
    fn settle_moves(&mut self) {
        for (_, mv) in std::mem::take(&mut self.moves) {
            for (path, wd) in mv.watches {
                if self.paths.get(&wd) == Some(&path) {
                    self.forget_wd(wd);
                    let _ = inotify::remove_watch(&*self.fd, wd);
                }
            }
        }
    }

    /// Watches every directory again (after events were lost or a watch failed): existing
    /// watches are found again under their current paths, the others are removed.
    fn rescan(&mut self) {
        self.rescan = false;
        self.moves.clear();
        let old = std::mem::take(&mut self.paths);
        self.wds.clear();
        if let Err(e) = self.watch_tree(Path::new("")) {
            self.lost(e.to_string());
        }
        for &wd in old.keys() {
            if !self.paths.contains_key(&wd) {
                let _ = inotify::remove_watch(&*self.fd, wd);
            }
        }
        match self.wds.get(Path::new("")) {
            Some(&wd) if wd == self.root_wd => {}
            _ => self.fail("the root is no longer the watched directory".into()),
        }
    }
}

/// What the mutex guards: the journal's state and the read buffer.
struct State {
    buf: Vec<MaybeUninit<u8>>,
    core: Core,
}

impl State {
    /// Reads and records every queued event. Returns false if reading failed.
    fn drain(&mut self) -> bool {
        let fd = Arc::clone(&self.core.fd);
        let mut reader = inotify::Reader::new(&*fd, &mut self.buf);
        loop {
            match reader.next() {
                Ok(ev) => {
                    let raw = RawEvent {
                        wd: ev.wd(),
                        mask: ev.events(),
                        cookie: ev.cookie(),
                        name: ev.file_name().map(CStr::to_bytes),
                    };
                    self.core.process(&raw);
                }
                Err(Errno::AGAIN) => return true,
                Err(Errno::INTR) => {}
                Err(e) => {
                    self.core
                        .fail(format!("reading inotify events failed: {e}"));
                    return false;
                }
            }
        }
    }
}

/// Records changes of a directory tree; see the module documentation.
pub struct ChangeJournal {
    state: Arc<Mutex<State>>,
    /// Written to stop the reader thread.
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ChangeJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeJournal").finish_non_exhaustive()
    }
}

impl ChangeJournal {
    /// Watches every directory of the tree at `root` (a directory, not a symlink) and starts
    /// recording; a period with more than `limit` changed entries (dirty-tree nodes) is in
    /// doubt. Fails if a directory cannot be watched or listed (e.g. too few
    /// `fs.inotify.max_user_watches`).
    pub fn start(root: &Path, limit: usize) -> Result<ChangeJournal, JournalError> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| JournalError::Init(e.into()))?;
        let fd = Arc::new(fd);
        let mut core = Core::new(Arc::clone(&fd), root.to_path_buf(), limit);
        core.watch_tree(Path::new(""))?;
        core.root_wd = match core.wds.get(Path::new("")) {
            Some(&wd) => wd,
            None => {
                return Err(JournalError::Watch {
                    path: root.to_path_buf(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            }
        };
        let stop = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| JournalError::Thread(e.into()))?;
        let stop = Arc::new(stop);
        let state = Arc::new(Mutex::new(State {
            buf: vec![MaybeUninit::uninit(); 64 * 1024],
            core,
        }));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("asd-journal".into())
                .spawn(move || read_events(&state, &fd, &stop))
                .map_err(JournalError::Thread)?
        };
        Ok(ChangeJournal {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// What changed since the previous `take` (or `start`); starts a new period. Every change
    /// whose system call returned before this call is included.
    pub fn take(&self) -> Changes {
        let Ok(mut state) = self.state.lock() else {
            return Changes::InDoubt("the journal's reader thread panicked".into());
        };
        state.drain();
        let core = &mut state.core;
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            core.fail("the journal's reader thread ended".into());
        }
        if let Some(why) = &core.broken {
            return Changes::InDoubt(why.clone());
        }
        core.settle_moves();
        let changes = match core.doubt.take() {
            Some(why) => Changes::InDoubt(why),
            None => Changes::Exact(std::mem::take(&mut core.dirty)),
        };
        core.dirty = DirtyTree::new();
        core.checked.clear();
        if core.rescan {
            core.rescan();
        }
        changes
    }

    /// Why the journal is in doubt for good, if it is (then start a new one).
    pub fn broken(&self) -> Option<String> {
        match self.state.lock() {
            Ok(state) => state.core.broken.clone(),
            Err(_) => Some("the journal's reader thread panicked".into()),
        }
    }

    /// Number of directories watched.
    pub fn watched_dirs(&self) -> usize {
        self.state.lock().map_or(0, |state| state.core.paths.len())
    }
}

impl ChangeJournal {
    /// Stops following events (the reader thread ends); the watches stay until the journal is
    /// dropped, which removes them, one per directory.
    pub fn stop_reading(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        match rustix::io::write(&*self.stop, &1u64.to_ne_bytes()) {
            Ok(_) => {
                let _ = thread.join();
            }
            // Cannot happen (the counter is far from overflowing); never join a thread that
            // was not told to stop.
            Err(e) => tracing::debug!("cannot stop the change journal's thread: {e}"),
        }
    }
}

impl Drop for ChangeJournal {
    fn drop(&mut self) {
        self.stop_reading();
    }
}

/// The reader thread: records events as they come, until `stop` is written.
fn read_events(state: &Mutex<State>, fd: &OwnedFd, stop: &OwnedFd) {
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => {
                if let Ok(mut state) = state.lock() {
                    state
                        .core
                        .fail(format!("polling for inotify events failed: {e}"));
                }
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if !fds[0].revents().is_empty() {
            let Ok(mut state) = state.lock() else {
                return;
            };
            if !state.drain() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A tree: a/f, b/, d/f, d/sub/g.
    fn tree() -> tempfile::TempDir {
        let td = tempfile::tempdir().unwrap();
        let r = td.path();
        fs::create_dir_all(r.join("a")).unwrap();
        fs::create_dir_all(r.join("b")).unwrap();
        fs::create_dir_all(r.join("d/sub")).unwrap();
        fs::write(r.join("a/f"), "a").unwrap();
        fs::write(r.join("d/f"), "hello").unwrap();
        fs::write(r.join("d/sub/g"), "g").unwrap();
        td
    }

    /// The marked nodes as "path FLAGS" ("." for the root; E entry, L listing, W whole).
    fn show(tree: &DirtyTree) -> Vec<String> {
        let mut out = Vec::new();
        tree.walk(|path, node| {
            if node.is_dirty() {
                let p = if path.as_os_str().is_empty() {
                    ".".to_string()
                } else {
                    path.display().to_string()
                };
                let mut flags = String::new();
                for (set, c) in [(node.entry, 'E'), (node.listing, 'L'), (node.whole, 'W')] {
                    if set {
                        flags.push(c);
                    }
                }
                out.push(format!("{p} {flags}"));
            }
        });
        out
    }

    fn exact(changes: Changes) -> Vec<String> {
        match changes {
            Changes::Exact(tree) => {
                assert_eq!(tree.len(), show(&tree).len());
                show(&tree)
            }
            Changes::InDoubt(why) => panic!("in doubt: {why}"),
        }
    }

    /// Starts a journal on a fresh tree, applies `change`, checks the result and that a second
    /// take is empty.
    fn check(change: impl FnOnce(&Path), expected: &[&str]) -> (tempfile::TempDir, ChangeJournal) {
        let td = tree();
        let j = ChangeJournal::start(td.path(), 1000).unwrap();
        change(td.path());
        assert_eq!(exact(j.take()), expected);
        assert_eq!(exact(j.take()), Vec::<String>::new());
        (td, j)
    }

    #[test]
    fn journal_nothing_changed() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let j = ChangeJournal::start(td.path(), 1000).unwrap();
        assert_eq!(j.watched_dirs(), 5);
        // Reading is no change.
        fs::read(td.path().join("d/f")).unwrap();
        fs::read_dir(td.path().join("d")).unwrap().for_each(drop);
        assert_eq!(exact(j.take()), Vec::<String>::new());
    }

    #[test]
    fn journal_write_append_truncate() {
        let _quiet = crate::no_spawns();
        check(|r| fs::write(r.join("d/f"), "new").unwrap(), &["d/f E"]);
        check(
            |r| {
                use std::io::Write;
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(r.join("d/sub/g"))
                    .unwrap();
                f.write_all(b"more").unwrap();
            },
            &["d/sub/g E"],
        );
        check(
            |r| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(r.join("a/f"))
                    .unwrap();
                f.set_len(0).unwrap();
            },
            &["a/f E"],
        );
    }

    #[test]
    fn journal_chmod_and_xattr() {
        let _quiet = crate::no_spawns();
        check(
            |r| fs::set_permissions(r.join("d/f"), fs::Permissions::from_mode(0o600)).unwrap(),
            &["d/f E"],
        );
        // A directory's own metadata: reported by its watch and its parent's.
        check(
            |r| fs::set_permissions(r.join("d/sub"), fs::Permissions::from_mode(0o700)).unwrap(),
            &["d/sub E"],
        );
        let td = tree();
        let j = ChangeJournal::start(td.path(), 1000).unwrap();
        match xattr::set(td.path().join("d/f"), "user.x", b"1") {
            Ok(()) => assert_eq!(exact(j.take()), ["d/f E"]),
            Err(e) => eprintln!("user xattrs not supported here ({e}): skipped"),
        }
    }

    #[test]
    fn journal_create_delete_rename_files() {
        let _quiet = crate::no_spawns();
        check(
            |r| fs::write(r.join("d/new"), "x").unwrap(),
            &["d L", "d/new E"],
        );
        check(
            |r| fs::remove_file(r.join("d/f")).unwrap(),
            &["d L", "d/f E"],
        );
        check(
            |r| fs::rename(r.join("d/f"), r.join("d/h")).unwrap(),
            &["d L", "d/f E", "d/h E"],
        );
        check(
            |r| fs::rename(r.join("a/f"), r.join("b/f")).unwrap(),
            &["a L", "a/f E", "b L", "b/f E"],
        );
        // Over an existing name.
        check(
            |r| fs::rename(r.join("a/f"), r.join("d/f")).unwrap(),
            &["a L", "a/f E", "d L", "d/f E"],
        );
    }

    #[test]
    fn journal_symlinks_are_entries_never_followed() {
        let _quiet = crate::no_spawns();
        let (td, j) = check(
            |r| {
                symlink("f", r.join("d/link")).unwrap();
                symlink("../a", r.join("d/dirlink")).unwrap();
            },
            &["d L", "d/dirlink E", "d/link E"],
        );
        assert_eq!(j.watched_dirs(), 5);
        // Through the symlink: reported under the real name.
        fs::write(td.path().join("d/dirlink/f"), "via link").unwrap();
        assert_eq!(exact(j.take()), ["a/f E"]);
    }

    #[test]
    fn journal_new_nested_directories() {
        let _quiet = crate::no_spawns();
        let (td, j) = check(
            |r| {
                fs::create_dir_all(r.join("n/b/c")).unwrap();
                fs::write(r.join("n/b/c/f"), "x").unwrap();
            },
            &[". L", "n W"],
        );
        assert_eq!(j.watched_dirs(), 8);
        fs::write(td.path().join("n/b/c/f"), "y").unwrap();
        fs::create_dir(td.path().join("n/b/c/e")).unwrap();
        assert_eq!(exact(j.take()), ["n/b/c L", "n/b/c/e W", "n/b/c/f E"]);
    }

    #[test]
    fn journal_renamed_directory() {
        let _quiet = crate::no_spawns();
        let (td, j) = check(
            |r| {
                fs::rename(r.join("d"), r.join("e")).unwrap();
                fs::write(r.join("e/f"), "changed").unwrap();
            },
            &[". L", "d E", "e W"],
        );
        // The watches of e and e/sub moved with them.
        let r = td.path();
        fs::write(r.join("e/f"), "again").unwrap();
        fs::write(r.join("e/sub/g"), "again").unwrap();
        assert_eq!(exact(j.take()), ["e/f E", "e/sub/g E"]);
        // Into another directory, then a new name in the old place.
        fs::rename(r.join("e"), r.join("a/e")).unwrap();
        fs::create_dir(r.join("e")).unwrap();
        fs::write(r.join("a/e/sub/g"), "moved").unwrap();
        assert_eq!(exact(j.take()), [". L", "a L", "a/e W", "e W"]);
        fs::write(r.join("a/e/sub/g"), "x").unwrap();
        fs::write(r.join("e/new"), "x").unwrap();
        assert_eq!(exact(j.take()), ["a/e/sub/g E", "e L", "e/new E"]);
        assert_eq!(j.watched_dirs(), 6);
    }

    #[test]
    fn journal_directory_moved_out_and_in() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let root = td.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::rename(td.path().join("d"), root.join("d")).unwrap();
        let j = ChangeJournal::start(&root, 1000).unwrap();
        assert_eq!(j.watched_dirs(), 3);
        fs::rename(root.join("d"), td.path().join("out")).unwrap();
        assert_eq!(exact(j.take()), [". L", "d E"]);
        assert_eq!(j.watched_dirs(), 1);
        // Changes outside the tree are not reported.
        fs::write(td.path().join("out/sub/g"), "x").unwrap();
        assert_eq!(exact(j.take()), Vec::<String>::new());
        fs::rename(td.path().join("out"), root.join("in")).unwrap();
        assert_eq!(exact(j.take()), [". L", "in W"]);
        assert_eq!(j.watched_dirs(), 3);
        fs::write(root.join("in/sub/g"), "y").unwrap();
        assert_eq!(exact(j.take()), ["in/sub/g E"]);
    }

    #[test]
    fn journal_deleted_directory_tree() {
        let _quiet = crate::no_spawns();
        let (td, j) = check(
            |r| fs::remove_dir_all(r.join("d")).unwrap(),
            &[". L", "d E"],
        );
        assert_eq!(j.watched_dirs(), 3);
        fs::create_dir(td.path().join("d")).unwrap();
        fs::write(td.path().join("d/f"), "x").unwrap();
        assert_eq!(exact(j.take()), [". L", "d W"]);
    }

    #[test]
    fn journal_hard_links_are_in_doubt() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let j = ChangeJournal::start(td.path(), 1000).unwrap();
        // A new link: the other name's directory hears nothing of it.
        fs::hard_link(td.path().join("d/f"), td.path().join("a/l")).unwrap();
        assert!(matches!(j.take(), Changes::InDoubt(why) if why.contains("hard links")));
        fs::write(td.path().join("d/f"), "both").unwrap();
        assert!(matches!(j.take(), Changes::InDoubt(why) if why.contains("hard links")));
        // Linked and then written through the new name in one period (the write's mark is not
        // new: the link's creation made it).
        fs::remove_file(td.path().join("a/l")).unwrap();
        assert_eq!(exact(j.take()), ["a L", "a/l E"]);
        fs::write(td.path().join("b/x"), "x").unwrap();
        assert_eq!(exact(j.take()), ["b L", "b/x E"]);
        fs::hard_link(td.path().join("b/x"), td.path().join("a/y")).unwrap();
        fs::write(td.path().join("a/y"), "through the link").unwrap();
        assert!(matches!(j.take(), Changes::InDoubt(why) if why.contains("hard links")));
        assert_eq!(exact(j.take()), Vec::<String>::new());
    }

    #[test]
    fn journal_limit() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let j = ChangeJournal::start(td.path(), 4).unwrap();
        for i in 0..5 {
            fs::write(td.path().join(format!("b/{i}")), "x").unwrap();
        }
        assert!(matches!(j.take(), Changes::InDoubt(why) if why.contains("more than 4")));
        assert_eq!(exact(j.take()), Vec::<String>::new());
        fs::write(td.path().join("b/0"), "y").unwrap();
        assert_eq!(exact(j.take()), ["b/0 E"]);
    }

    #[test]
    fn journal_queue_overflow() {
        let _quiet = crate::no_spawns();
        let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(16384);
        if max > 200_000 {
            eprintln!("max_queued_events is {max}: skipped");
            return;
        }
        let td = tree();
        let r = td.path();
        let j = ChangeJournal::start(r, 1000).unwrap();
        {
            // Keep the reader thread from reading meanwhile.
            let _guard = j.state.lock().unwrap();
            for i in 0..max + 10 {
                let name = if i % 2 == 0 { "d/f" } else { "a/f" };
                let mode = 0o600 | (i as u32 & 0o44);
                fs::set_permissions(r.join(name), fs::Permissions::from_mode(mode)).unwrap();
            }
            // Lost: its watch would have been added in reaction to an event.
            fs::create_dir(r.join("lost")).unwrap();
        }
        assert!(matches!(j.take(), Changes::InDoubt(why) if why.contains("overflow")));
        // The re-walk at that take watches "lost".
        assert_eq!(j.watched_dirs(), 6);
        fs::write(r.join("lost/f"), "x").unwrap();
        assert_eq!(exact(j.take()), ["lost L", "lost/f E"]);
    }

    #[test]
    fn journal_synthetic_overflow() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let j = ChangeJournal::start(td.path(), 1000).unwrap();
        fs::write(td.path().join("d/f"), "x").unwrap();
        j.state.lock().unwrap().core.process(&RawEvent {
            wd: -1,
            mask: ReadFlags::QUEUE_OVERFLOW,
            cookie: 0,
            name: None,
        });
        assert!(matches!(j.take(), Changes::InDoubt(_)));
        assert_eq!(j.broken(), None);
        fs::write(td.path().join("d/sub/g"), "x").unwrap();
        assert_eq!(exact(j.take()), ["d/sub/g E"]);
    }

    #[test]
    fn journal_root_deleted_is_in_doubt_for_good() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let root = td.path().join("d");
        let j = ChangeJournal::start(&root, 1000).unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert!(matches!(j.take(), Changes::InDoubt(_)));
        fs::create_dir(&root).unwrap();
        assert!(matches!(j.take(), Changes::InDoubt(_)));
        assert!(j.broken().is_some());
    }

    #[test]
    fn journal_start_errors() {
        let _quiet = crate::no_spawns();
        let td = tree();
        let err = ChangeJournal::start(&td.path().join("missing"), 10).unwrap_err();
        assert!(matches!(err, JournalError::Watch { .. }), "{err}");
        symlink("d", td.path().join("link")).unwrap();
        let err = ChangeJournal::start(&td.path().join("link"), 10).unwrap_err();
        assert!(matches!(err, JournalError::Watch { .. }), "{err}");
    }

    /// Timing on a large tree (run with `TMPDIR=/dev/shm cargo test --release journal_scale --
    /// --ignored --nocapture`): start, then a take after 10 changes.
    #[test]
    #[ignore]
    fn journal_scale() {
        let _quiet = crate::no_spawns();
        let td = tempfile::tempdir().unwrap();
        for d in 0..2000 {
            let dir = td.path().join(format!("{}/{d}", d % 20));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                fs::write(dir.join(f.to_string()), "").unwrap();
            }
        }
        let t = std::time::Instant::now();
        let j = ChangeJournal::start(td.path(), 100_000).unwrap();
        eprintln!("start: {:?}, {} directories", t.elapsed(), j.watched_dirs());
        for i in 0..10 {
            let d = i * 7;
            fs::write(td.path().join(format!("{}/{d}/{i}", d % 20)), "x").unwrap();
        }
        let t = std::time::Instant::now();
        let changes = exact(j.take());
        eprintln!("take: {:?}, {} marked", t.elapsed(), changes.len());
        assert_eq!(changes.len(), 10);
    }

    #[test]
    fn dirty_tree_marks_and_serde() {
        let _quiet = crate::no_spawns();
        let mut t = DirtyTree::new();
        t.mark_entry(Path::new("a/\u{e9}"));
        t.mark_listing(Path::new("a"));
        let odd = Path::new(OsStr::from_bytes(b"b/\xff\x00x"));
        t.mark_entry(odd);
        t.mark_entry(Path::new("w/x/y"));
        assert_eq!(t.len(), 4);
        assert_eq!(t.node_count(), 7);
        t.mark_whole(Path::new("w"));
        t.mark_entry(Path::new("w/z"));
        assert_eq!(show(&t), ["a L", "a/\u{e9} E", "b/\u{fffd}\0x E", "w W"]);
        assert_eq!(t.node_count(), 5);
        assert!(t.root().child("a").is_some_and(Node::listing));
        assert!(t.get(odd).is_some_and(Node::entry));
        let names: Vec<_> = t.root().children().map(|(n, _)| n.to_owned()).collect();
        assert_eq!(names, ["a", "b", "w"]);
        let json = serde_json::to_string(&t).unwrap();
        let back: DirtyTree = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        let changes = Changes::Exact(t);
        let back: Changes =
            serde_json::from_str(&serde_json::to_string(&changes).unwrap()).unwrap();
        assert_eq!(back, changes);
        // Limit: the tree never grows past it.
        let mut t = DirtyTree::new();
        assert!(t.mark(Path::new("a/b"), Mark::Entry, 2).is_ok());
        assert!(t.mark(Path::new("c"), Mark::Entry, 2).is_err());
        assert_eq!(t.node_count(), 2);
    }
}
