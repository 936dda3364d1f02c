//! FUSE node ids, one per view path.
//!
//! A node stands for a name in the view, not for a backing inode: the same real file seen
//! through two view paths is two nodes, and a copy-up does not change the node. An attached
//! node keeps its id for the life of the mount (also after the kernel forgets it), so the
//! `st_ino` the thunk sees for a path is stable. Unlinking, removing or renaming over a path
//! detaches its node, and so does an invalidation (`Handle::invalidate`) finding the path
//! gone, or replaced while the thunk has it open; a detached node lives until the kernel
//! forgets it and its id is never reused.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::access::AccessKind;

pub(crate) const ROOT: u64 = 1;

pub(crate) struct Node {
    pub(crate) path: Arc<Path>,
    pub(crate) attached: bool,
    lookups: u64,
    /// Access kinds already recorded for `path` (a fast path in front of the log's set).
    recorded: AtomicU16,
}

impl Node {
    /// Marks `kind` as recorded; true the first time.
    pub(crate) fn first(&self, kind: AccessKind) -> bool {
        self.recorded.fetch_or(kind.bit(), Ordering::Relaxed) & kind.bit() == 0
    }
}

pub(crate) struct Nodes {
    by_id: HashMap<u64, Node>,
    by_path: HashMap<Arc<Path>, u64>,
    next: u64,
}

impl Nodes {
    pub(crate) fn new() -> Nodes {
        let root: Arc<Path> = Arc::from(Path::new("/"));
        let mut nodes = Nodes {
            by_id: HashMap::new(),
            by_path: HashMap::new(),
            next: ROOT + 1,
        };
        nodes.by_path.insert(root.clone(), ROOT);
        nodes.by_id.insert(
            ROOT,
            Node {
                path: root,
                attached: true,
                lookups: 1,
                recorded: AtomicU16::new(0),
            },
        );
        nodes
    }

    pub(crate) fn get(&self, id: u64) -> Option<&Node> {
        self.by_id.get(&id)
    }

    pub(crate) fn id_of(&self, path: &Path) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// The id of the attached node for `path`, created if needed.
    pub(crate) fn id_for(&mut self, path: &Path) -> u64 {
        if let Some(id) = self.by_path.get(path) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        let path: Arc<Path> = Arc::from(path);
        self.by_path.insert(path.clone(), id);
        self.by_id.insert(
            id,
            Node {
                path,
                attached: true,
                lookups: 0,
                recorded: AtomicU16::new(0),
            },
        );
        id
    }

    /// `id_for`, counting one kernel lookup.
    pub(crate) fn lookup(&mut self, path: &Path) -> u64 {
        let id = self.id_for(path);
        if let Some(node) = self.by_id.get_mut(&id) {
            node.lookups += 1;
        }
        id
    }

    pub(crate) fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let remove = match self.by_id.get_mut(&id) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0 && !node.attached
            }
            None => false,
        };
        if remove {
            self.by_id.remove(&id);
        }
    }

    /// The path no longer names this node: later lookups of it get a new id.
    pub(crate) fn detach(&mut self, path: &Path) {
        if let Some(id) = self.by_path.remove(path) {
            let remove = match self.by_id.get_mut(&id) {
                Some(node) => {
                    node.attached = false;
                    node.lookups == 0
                }
                None => false,
            };
            if remove {
                self.by_id.remove(&id);
            }
        }
    }

    /// Detaches every node strictly below one of `paths` (paths that no longer hold anything,
    /// e.g. a directory another process deleted or replaced by a file).
    pub(crate) fn detach_below(&mut self, paths: &HashSet<PathBuf>) {
        let below: Vec<Arc<Path>> = self
            .by_path
            .keys()
            .filter(|p| p.ancestors().skip(1).any(|a| paths.contains(a)))
            .cloned()
            .collect();
        for path in below {
            self.detach(&path);
        }
    }

    /// Moves the node at `from` (and, for a directory, every node below it) to `to`, detaching
    /// whatever was at `to`. Moved nodes forget what was recorded for their old paths.
    pub(crate) fn rename(&mut self, from: &Path, to: &Path, is_dir: bool) {
        self.detach(to);
        let moved: Vec<(Arc<Path>, u64)> = if is_dir {
            self.by_path
                .iter()
                .filter(|(p, _)| p.starts_with(from))
                .map(|(p, id)| (p.clone(), *id))
                .collect()
        } else {
            self.by_path
                .get_key_value(from)
                .map(|(p, id)| (p.clone(), *id))
                .into_iter()
                .collect()
        };
        for (old, _) in &moved {
            self.by_path.remove(old);
        }
        for (old, id) in moved {
            let new: PathBuf = match old.strip_prefix(from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.to_path_buf(),
            };
            let new: Arc<Path> = Arc::from(new);
            self.by_path.insert(new.clone(), id);
            if let Some(node) = self.by_id.get_mut(&id) {
                node.path = new;
                node.recorded = AtomicU16::new(0);
            }
        }
    }
}
