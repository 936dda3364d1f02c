//! Caches beyond the project's own store: a directory shared by the checkouts and users of one
//! machine ([`dir::SharedDir`], `--cache DIR`) and a remote cache speaking the Bazel Remote
//! Execution API ([`crate::remote`], `--remote grpc://HOST:PORT`).
//!
//! They are a second level. The project's store (`.cot/store`, `.cot/cas`) is consulted first
//! and keeps the project's own records (its builds, its last use of each trace); a cache is
//! asked only for a thunk none of whose own traces holds, tier by tier ([`Caches::lookup`]).
//! What it returns is decided like any trace, against this checkout's files: a cache holds
//! *verifying* traces with their contents (the design notes' constructive traces), never a
//! verdict. A trace that holds is made the project's own before it is used
//! ([`Caches::fetch`]): every content it refers to is copied into the project's content store
//! and verified there, then the trace is recorded in the project's store, so the result is
//! restored, replayed and collected like one of its own. A thunk that runs is written to the
//! caches that take writes ([`Caches::export`]).
//!
//! A cache never makes cot fail, nor makes it use a wrong output: an unreadable directory, a
//! server that is down or slow, a corrupt or forged entry or content are each reported once
//! as a warning, and the thunk is decided without that tier (it runs, as if the cache were
//! empty). Keys name their roots ([`crate::engine::key::Names`]) and traces hold project paths
//! relative to its root, so a second checkout of a project, at another path or of another
//! user, finds the traces of the first ([`portable`] says which traces stay where they were
//! made).

pub mod dir;
pub mod portable;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use parking_lot::Mutex;

use crate::cas::Cas;
use crate::engine::key::Names;
use crate::remote::{self, Remote};
use crate::store::model::{Digest, ThunkId, ThunkKey, Trace};
use crate::store::{hex, thunk_id};

use dir::SharedDir;
use portable::Entry;

/// An error of a cache; none is fatal to cot (see the module documentation).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cas(#[from] crate::cas::Error),
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: format {found:?}; this cot reads format 1", path.display())]
    Version { path: PathBuf, found: String },
}

/// Where caches are and how they may be used (`--cache`, `--cache-read-only`, `--remote`,
/// `--remote-upload`, `--remote-timeout`, and cot.toml's `[cache]`).
#[derive(Clone, Debug, Default)]
pub struct CacheOptions {
    /// The shared cache directory.
    pub dir: Option<PathBuf>,
    /// Never write to the shared directory.
    pub read_only: bool,
    /// The remote cache (`grpc://HOST:PORT[/INSTANCE]`).
    pub remote: Option<String>,
    /// Write to the remote cache too (off by default: see [`crate::remote`], "Trust").
    pub remote_upload: bool,
    /// The deadline of one call to the remote cache (default [`remote::DEFAULT_TIMEOUT`]).
    pub remote_timeout: Option<Duration>,
}

impl CacheOptions {
    pub fn is_empty(&self) -> bool {
        self.dir.is_none() && self.remote.is_none()
    }
}

/// One level of the caches, in the order they are asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The shared directory.
    Dir,
    /// The remote cache.
    Remote,
}

/// A trace a cache holds for a thunk, in this checkout's form.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub trace: Trace,
    /// Where its contents are fetched from.
    source: Source,
}

impl Candidate {
    fn tier(&self) -> Tier {
        match self.source {
            Source::Dir { .. } => Tier::Dir,
            Source::Remote { .. } => Tier::Remote,
        }
    }
}

#[derive(Clone, Debug)]
enum Source {
    /// A trace file of the shared directory, by its digest.
    Dir { entry: Digest },
    /// The remote cache, with the REAPI blob of each content.
    Remote {
        blobs: HashMap<Digest, remote::Blob>,
    },
}

/// What one tier knows of a thunk.
#[derive(Clone, Debug)]
pub struct Found {
    pub key: ThunkKey,
    /// Its traces that may be used here, most recently used first.
    pub candidates: Vec<Candidate>,
}

/// The caches of one cot process.
pub struct Caches {
    dir: Option<SharedDir>,
    remote: Option<Remote>,
    upload: bool,
    names: Names,
    /// Warnings given already, so each is given once.
    warned: Mutex<HashSet<String>>,
    /// Warnings not yet shown (see [`Caches::take_warnings`]).
    pending: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("dir", &self.dir)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Caches {
    /// No caches.
    pub fn none() -> Caches {
        Caches {
            dir: None,
            remote: None,
            upload: false,
            names: Names::default(),
            warned: Mutex::new(HashSet::new()),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Opens the caches `options` names, for a checkout whose roots are `names`. A cache that
    /// cannot be opened is left out, with a warning.
    pub fn open(options: &CacheOptions, names: &Names) -> Caches {
        let mut caches = Caches {
            names: names.clone(),
            ..Caches::none()
        };
        if let Some(root) = &options.dir {
            match SharedDir::open(root, options.read_only) {
                Ok(dir) => caches.dir = Some(dir),
                Err(e) => caches.warn_once(format!(
                    "cannot use the shared cache {}: {e}; building without it",
                    root.display()
                )),
            }
        }
        if let Some(url) = &options.remote {
            let timeout = options.remote_timeout.unwrap_or(remote::DEFAULT_TIMEOUT);
            match Remote::new(url, timeout) {
                Ok(remote) => {
                    caches.remote = Some(remote);
                    caches.upload = options.remote_upload;
                }
                Err(e) => caches.warn_once(format!(
                    "cannot use the remote cache: {e}; building without it"
                )),
            }
        }
        caches
    }

    /// `options` without the caches this process could not open and the remote cache it gave
    /// up, so that opening them again (to write what ran) neither waits nor warns again.
    pub fn without_failed(&self, options: &CacheOptions) -> CacheOptions {
        let remote_up = self.remote.as_ref().is_some_and(|r| r.down().is_none());
        CacheOptions {
            dir: options.dir.clone().filter(|_| self.dir.is_some()),
            remote: options.remote.clone().filter(|_| remote_up),
            ..options.clone()
        }
    }

    /// The tiers to ask, in order.
    pub fn tiers(&self) -> Vec<Tier> {
        let mut tiers = Vec::new();
        if self.dir.is_some() {
            tiers.push(Tier::Dir);
        }
        if self.remote.is_some() {
            tiers.push(Tier::Remote);
        }
        tiers
    }

    /// Whether there is any cache at all.
    pub fn is_empty(&self) -> bool {
        self.tiers().is_empty()
    }

    /// How a tier is named in messages.
    pub fn describe(&self, tier: Tier) -> String {
        match tier {
            Tier::Dir => match &self.dir {
                Some(dir) => format!("the shared cache {}", dir.root().display()),
                None => "the shared cache".into(),
            },
            Tier::Remote => match &self.remote {
                Some(remote) => format!("the remote cache {}", remote.url()),
                None => "the remote cache".into(),
            },
        }
    }

    /// What `tier` knows of thunk `id`: its key and the traces that may be used here. `None`
    /// when it knows nothing usable (or failed: then with a warning).
    pub fn lookup(&self, id: &ThunkId, tier: Tier) -> Option<Found> {
        match tier {
            Tier::Dir => {
                let dir = self.dir.as_ref()?;
                let known = match dir.known(id) {
                    Ok(known) => known?,
                    Err(e) => {
                        self.warn_once(format!("{}: {e}; skipped", self.describe(tier)));
                        return None;
                    }
                };
                if known.corrupt > 0 {
                    self.warn_once(format!(
                        "{}: {} trace(s) of thunk {} failed verification; skipped",
                        self.describe(tier),
                        known.corrupt,
                        &hex(id)[..12]
                    ));
                }
                let candidates = known
                    .entries
                    .into_iter()
                    .filter_map(|(entry, found)| {
                        Some(Candidate {
                            trace: self.confined(tier, id, found.local(&self.names)?)?,
                            source: Source::Dir { entry },
                        })
                    })
                    .collect();
                Some(Found {
                    key: known.key,
                    candidates,
                })
            }
            Tier::Remote => {
                let remote = self.remote.as_ref()?;
                match remote.lookup(id) {
                    Ok(found) => {
                        let found = found?;
                        let trace = found.entry.local(&self.names);
                        let trace = trace.and_then(|trace| self.confined(tier, id, trace));
                        let candidate = trace.map(|trace| Candidate {
                            trace,
                            source: Source::Remote { blobs: found.blobs },
                        });
                        Some(Found {
                            key: found.key,
                            candidates: candidate.into_iter().collect(),
                        })
                    }
                    Err(e) => {
                        self.remote_failed(remote, &e, id);
                        None
                    }
                }
            }
        }
    }

    /// The trace, if it writes only inside the project ([`portable::confined`]); otherwise a
    /// warning naming it, and nothing.
    fn confined(&self, tier: Tier, id: &ThunkId, trace: Trace) -> Option<Trace> {
        match portable::confined(&trace) {
            Ok(()) => Some(trace),
            Err(why) => {
                self.warn_once(format!(
                    "{}: a trace of thunk {} {why}; refused",
                    self.describe(tier),
                    &hex(id)[..12]
                ));
                None
            }
        }
    }

    /// Warns of a failed call to the remote cache: once for a server given up, once per
    /// thunk for anything else.
    fn remote_failed(&self, remote: &Remote, error: &remote::Error, id: &ThunkId) {
        match remote.down() {
            Some(why) => self.warn_once(format!(
                "the remote cache {} is unreachable ({why}); building without it",
                remote.url()
            )),
            None => self.warn_once(format!(
                "the remote cache {} (thunk {}): {error}",
                remote.url(),
                &hex(id)[..12]
            )),
        }
    }

    /// Makes a candidate usable: every content its trace refers to, copied into `cas` and
    /// verified there. An error says what failed (and is also warned about).
    pub fn fetch(&self, id: &ThunkId, candidate: &Candidate, cas: &Cas) -> Result<(), String> {
        let digests = portable::blobs(&candidate.trace);
        let result = match &candidate.source {
            Source::Dir { entry } => {
                let dir = self.dir.as_ref().ok_or("no shared cache")?;
                let fetched = dir.fetch(&digests, cas);
                if fetched.is_ok() {
                    dir.touch(id, entry);
                }
                fetched.map_err(|e| format!("{}: {e}", self.describe(Tier::Dir)))
            }
            Source::Remote { blobs } => {
                let remote = self.remote.as_ref().ok_or("no remote cache")?;
                let wanted: Option<Vec<(Digest, remote::Blob)>> = digests
                    .iter()
                    .map(|d| blobs.get(d).map(|blob| (*d, blob.clone())))
                    .collect();
                let wanted = wanted.ok_or_else(|| {
                    format!("{}: a content has no blob", self.describe(Tier::Remote))
                })?;
                remote.fetch(&wanted, cas).map_err(|e| {
                    self.remote_failed(remote, &e, id);
                    format!("{}: {e}", self.describe(Tier::Remote))
                })
            }
        };
        // Whatever a tier said, the trace is used only with every content in the project's
        // store (a server may answer a batch with one blob twice and another not at all).
        let result = result.and_then(|()| match digests.iter().find(|d| !cas.contains(d)) {
            None => Ok(()),
            Some(missing) => Err(format!(
                "{}: content {} did not arrive",
                self.describe(candidate.tier()),
                &hex(missing)[..12]
            )),
        });
        if let Err(message) = &result {
            self.warn_once(format!("{message}; running the thunk instead"));
        }
        result
    }

    /// Copies the contents among `digests` that the project's store `cas` lacks from the
    /// shared directory, when it has them (each verified). Best effort: what cannot be had is
    /// left missing.
    pub fn fill(&self, digests: &[Digest], cas: &Cas) {
        let Some(dir) = &self.dir else {
            return;
        };
        for digest in digests.iter().filter(|d| !cas.contains(d)) {
            if dir.cas().contains(digest) {
                let _ = dir.fetch(&[*digest], cas);
            }
        }
    }

    /// Writes a trace the project just recorded to every cache that takes writes. Failures
    /// are warnings.
    pub fn export(&self, key: &ThunkKey, trace: &Trace, cas: &Cas) {
        let dir = self.dir.as_ref().filter(|d| d.writable());
        let remote = self
            .remote
            .as_ref()
            .filter(|r| self.upload && r.down().is_none());
        // A trace that wrote outside the project would be refused by every reader.
        if (dir.is_none() && remote.is_none()) || portable::confined(trace).is_err() {
            return;
        }
        let entry = Entry::new(trace, &self.names, cas);
        let id = thunk_id(key);
        if let Some(dir) = dir {
            if let Err(e) = dir.put(key, &entry, &portable::blobs(trace), cas) {
                self.warn_once(format!(
                    "cannot write to {} (thunk {}): {e}",
                    self.describe(Tier::Dir),
                    &hex(&id)[..12]
                ));
            }
        }
        if let Some(remote) = remote {
            if let Err(e) = remote.upload(key, &entry, trace, cas) {
                self.remote_failed(remote, &e, &id);
            }
        }
    }

    /// The warnings not shown yet, for the caller to show (on stderr, or above a build's
    /// progress line).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Queues a warning unless it was given already.
    fn warn_once(&self, message: String) {
        if self.warned.lock().insert(message.clone()) {
            self.pending.lock().push(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::{Output, OutputState, StorePath};

    /// A trace whose outputs are `outputs` (files with the content "x", or symlinks).
    fn trace(cas: &Cas, outputs: &[(StorePath, bool)], ran_at_ns: i64) -> Trace {
        let x = cas.put_bytes(b"x").unwrap();
        let state = |link: bool| match link {
            true => OutputState::Symlink {
                target: b"/home".to_vec(),
            },
            false => OutputState::File {
                digest: x,
                mode: 0o644,
                size: 1,
            },
        };
        Trace {
            outputs: outputs
                .iter()
                .map(|(path, link)| Output {
                    path: path.clone(),
                    state: state(*link),
                })
                .collect(),
            stdout: x,
            stderr: x,
            exit_code: 0,
            duration_ns: 0,
            ran_at_ns,
            inputs: Vec::new(),
            children: Vec::new(),
            events: Vec::new(),
            internal: Vec::new(),
        }
    }

    /// Traces a writer of the shared cache forged to write outside the project are refused
    /// with a warning naming them; the one that stays inside is a candidate.
    #[test]
    fn a_trace_writing_outside_the_project_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cas = Cas::open(&tmp.path().join("cas")).unwrap();
        let dir = SharedDir::open(&tmp.path().join("shared"), false).unwrap();
        let project = |p: &str| StorePath::Project(p.as_bytes().to_vec());
        let key = ThunkKey::of_command(&["make"]);
        let forged: Vec<Vec<(StorePath, bool)>> = vec![
            vec![(project("../escape"), false)],
            vec![(project("a/./b"), false)],
            vec![(project(""), false)],
            vec![(StorePath::Absolute(b"/etc/cron.d/x".to_vec()), false)],
            vec![(project("link"), true), (project("link/.profile"), false)],
            vec![(project("ok/file"), false), (project("okay"), true)],
        ];
        for (n, outputs) in forged.iter().enumerate() {
            let trace = trace(&cas, outputs, n as i64);
            let entry = portable::Entry {
                pinned: Vec::new(),
                trace: trace.clone(),
            };
            dir.put(&key, &entry, &portable::blobs(&trace), &cas)
                .unwrap();
        }
        let options = CacheOptions {
            dir: Some(tmp.path().join("shared")),
            ..CacheOptions::default()
        };
        let caches = Caches::open(&options, &Names::new(tmp.path(), None));
        let found = caches.lookup(&thunk_id(&key), Tier::Dir).unwrap();
        assert_eq!(found.candidates.len(), 1);
        assert_eq!(
            found.candidates[0].trace.outputs[0].path,
            project("ok/file")
        );
        let warnings = caches.take_warnings().join("\n");
        for why in [
            "\"../escape\" that is not a path in the project",
            "\"a/./b\" that is not a path in the project",
            "\"\" that is not a path in the project",
            "writes outside the project (/etc/cron.d/x)",
            "writes link/.profile through its own symlink link",
        ] {
            assert!(warnings.contains(why), "{why}:\n{warnings}");
        }
    }
}
