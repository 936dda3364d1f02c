//! Looking into the store: which thunks are known (`cot show`), who made a file (`cot query`),
//! dropping what is no longer used (`cot gc`) and deleting recorded outputs (`cot clean`).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cas::Cas;
use crate::server::Client;
use crate::store::model::{OutputState, ThunkId, ThunkInfo, Trace, TraceId};

use super::key::Paths;
use super::memo::{store_dirs, MemoOptions};
use super::Error;

/// The project and its stores, as found from the working directory.
pub struct Project {
    pub paths: Paths,
    pub client: Client,
    pub cas_dir: PathBuf,
    /// A shared cache was named (`--cache DIR`): gc leaves it alone.
    pub shared_cache: Option<PathBuf>,
}

impl Project {
    pub fn open(cwd: &Path, options: &MemoOptions) -> Result<Project, Error> {
        let root = super::project::find_root(cwd);
        let (store, cas_dir) = store_dirs(&root, options);
        Ok(Project {
            paths: Paths::new(&root),
            client: Client::connect(&store)?,
            cas_dir,
            shared_cache: options.caches.dir.clone(),
        })
    }

    /// Every known thunk, most recently used first.
    pub fn thunks(&mut self) -> Result<Vec<(ThunkId, ThunkInfo)>, Error> {
        let mut thunks = self.client.thunks()?;
        thunks.sort_by_key(|(_, info)| std::cmp::Reverse(info.last_used_ns));
        Ok(thunks)
    }

    /// One thunk, by a prefix of its id, with its traces (most recently used first).
    pub fn thunk(&mut self, prefix: &str) -> Result<Recorded, Error> {
        let id = self.client.find_thunk(prefix.to_string())?;
        let info = self.client.thunk(id)?.ok_or_else(|| Error::Path {
            path: PathBuf::from(prefix),
            message: "the thunk vanished from the store".into(),
        })?;
        let traces = self.client.traces(id)?;
        Ok((id, info, traces))
    }

    /// The thunk that last wrote `path`, with its most recent trace.
    pub fn query(&mut self, path: &Path) -> Result<Option<(ThunkId, ThunkInfo, Trace)>, Error> {
        let stored = self.paths.to_store(path);
        let Some(id) = self.client.writer(stored)? else {
            return Ok(None);
        };
        let Some(info) = self.client.thunk(id)? else {
            return Ok(None);
        };
        let trace = self.client.traces(id)?.into_iter().next().map(|(_, t)| t);
        Ok(trace.map(|trace| (id, info, trace)))
    }

    /// Drops thunks unused since `before_ns`, then content objects no kept trace refers to.
    /// A shared cache is left alone: this project's store cannot tell what the other
    /// checkouts still need.
    pub fn gc(&mut self, before_ns: i64) -> Result<GcReport, Error> {
        let (thunks, traces, file_states) = self.client.gc(before_ns)?;
        let keep = self.client.referenced_digests()?;
        let cas = Cas::open(&self.cas_dir)?.gc(&keep)?;
        Ok(GcReport {
            thunks,
            traces,
            file_states,
            objects: cas.objects,
            bytes: cas.bytes,
            shared_cache_kept: self.shared_cache.clone(),
        })
    }

    /// Deletes the files and symlinks every kept trace recorded as output, then the
    /// directories they made that are left empty. Returns the paths removed.
    pub fn clean(&mut self) -> Result<Vec<PathBuf>, Error> {
        let mut files = HashSet::new();
        let mut dirs = HashSet::new();
        for (id, _) in self.client.thunks()? {
            for (_, trace) in self.client.traces(id)? {
                for output in trace.outputs {
                    let view = self.paths.to_view(&output.path);
                    match output.state {
                        OutputState::File { .. } | OutputState::Symlink { .. } => {
                            files.insert(view);
                        }
                        OutputState::Dir { .. } => {
                            dirs.insert(view);
                        }
                        OutputState::Deleted => {}
                    }
                }
            }
        }
        let mut removed = Vec::new();
        for file in files {
            if fs::symlink_metadata(&file).is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(&file).map_err(|e| Error::Path {
                    path: file.clone(),
                    message: format!("cannot remove: {e}"),
                })?;
                removed.push(file);
            }
        }
        // Deepest first, and only when empty: a directory may hold files of other origins.
        let mut dirs: Vec<PathBuf> = dirs.into_iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            if fs::remove_dir(&dir).is_ok() {
                removed.push(dir);
            }
        }
        removed.sort();
        Ok(removed)
    }
}

/// A thunk with its traces, most recently used first.
pub type Recorded = (ThunkId, ThunkInfo, Vec<(TraceId, Trace)>);

/// What `cot gc` freed.
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub thunks: usize,
    pub traces: usize,
    pub file_states: usize,
    pub objects: usize,
    pub bytes: u64,
    /// The shared cache named (`--cache`), which was not collected.
    pub shared_cache_kept: Option<PathBuf>,
}
