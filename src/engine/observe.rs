//! What a thunk observes of the file system, and whether a recorded observation still holds.
//!
//! An [`Observer`] computes, for an input path and kind, the [`Observed`] value a thunk would
//! see now (through the [`Binds`] from view paths to real paths), and checks recorded inputs
//! against it. Content digests come from a file-state cache ([`FileStates`]) whenever the
//! file's stat tuple is unchanged, so a no-op check never hashes an unchanged file; every hash
//! actually computed is counted.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cot_fusefs::HideRule;
use parking_lot::Mutex;

use crate::store::model::{
    Digest, FileKind, FileState, Input, InputKind, Observed, OutputState, StatTuple,
};

use super::key::{Binds, Paths};

/// How to tell whether a file's content changed (`--check`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum CheckMode {
    /// A file changed when its stat tuple (inode, size, mtime, ctime, mode) changed.
    Mtime,
    /// A file changed when its content digest changed; every file read is hashed.
    Digest,
    /// An unchanged stat tuple means unchanged; otherwise compare digests (cached per stat
    /// tuple), so touching a file or switching branches back and forth does not rerun.
    #[default]
    MtimeThenDigest,
}

/// The file-state cache: a real file's digest, valid while its stat tuple is unchanged.
pub trait FileStates {
    fn get(&self, real: &Path) -> Option<FileState>;
}

/// A [`FileStates`] that knows nothing, for tests and `--check digest`.
pub struct NoFileStates;

impl FileStates for NoFileStates {
    fn get(&self, _real: &Path) -> Option<FileState> {
        None
    }
}

/// What changed about one input, for `--explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The view path.
    pub path: PathBuf,
    pub what: &'static str,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.path.display(), self.what)
    }
}

/// Observes the file system as a thunk's view shows it.
pub struct Observer<'a> {
    pub paths: &'a Paths,
    pub binds: &'a Binds,
    pub check: CheckMode,
    pub files: &'a dyn FileStates,
    /// Paths the view hides (`--hide`), left out of listings.
    pub hidden: &'a HideRule,
    /// cot's own state directory, never seen by a thunk.
    pub internal: PathBuf,
    hashes: AtomicU64,
    learned: Mutex<Vec<(Vec<u8>, FileState)>>,
    /// `lstat` results of this observer's life: one decision checks a path's `stat` and
    /// `read` inputs against one look at it.
    seen: Mutex<std::collections::HashMap<PathBuf, fs::Metadata>>,
    /// `lstat` results shared by every observer of a build, for paths no thunk can write.
    stable: Option<&'a StatCache>,
}

/// `lstat` results shared by the observers of one build, for paths that no thunk of the build
/// can change (outside the project and the writable directories): a build's thousand
/// compiles look at the same system headers once.
#[derive(Debug, Default)]
pub struct StatCache {
    /// `None`: absent (most of a compile's lookups are of headers that are not there).
    map: Mutex<std::collections::HashMap<PathBuf, Option<fs::Metadata>>>,
    /// Real paths under which nothing is cached.
    volatile: Vec<PathBuf>,
}

impl StatCache {
    /// A cache that never keeps paths under `volatile` (real paths).
    pub fn new(volatile: Vec<PathBuf>) -> StatCache {
        StatCache {
            map: Mutex::new(std::collections::HashMap::new()),
            volatile,
        }
    }

    fn keeps(&self, real: &Path) -> bool {
        !self.volatile.iter().any(|v| real.starts_with(v))
    }
}

/// The stat tuple of a file's metadata.
pub fn stat_tuple(meta: &fs::Metadata) -> StatTuple {
    StatTuple {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        mode: meta.mode(),
    }
}

pub fn file_kind(meta: &fs::Metadata) -> FileKind {
    let kind = meta.file_type();
    if kind.is_file() {
        FileKind::File
    } else if kind.is_dir() {
        FileKind::Dir
    } else if kind.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    }
}

fn is_absent(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

impl<'a> Observer<'a> {
    pub fn new(
        paths: &'a Paths,
        binds: &'a Binds,
        check: CheckMode,
        files: &'a dyn FileStates,
        hidden: &'a HideRule,
    ) -> Observer<'a> {
        Observer {
            paths,
            binds,
            check,
            files,
            hidden,
            internal: paths.project_root().join(super::project::STATE_DIR),
            hashes: AtomicU64::new(0),
            learned: Mutex::new(Vec::new()),
            seen: Mutex::new(std::collections::HashMap::new()),
            stable: None,
        }
    }

    /// Shares `cache` with the other observers of a build.
    pub fn with_stat_cache(mut self, cache: &'a StatCache) -> Observer<'a> {
        self.stable = Some(cache);
        self
    }

    fn lstat(&self, real: &Path) -> io::Result<fs::Metadata> {
        if let Some(meta) = self.seen.lock().get(real) {
            return Ok(meta.clone());
        }
        let stable = self.stable.filter(|cache| cache.keeps(real));
        if let Some(known) = stable.and_then(|cache| cache.map.lock().get(real).cloned()) {
            return known.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT));
        }
        let meta = match fs::symlink_metadata(real) {
            Ok(meta) => meta,
            Err(e) => {
                if let Some(cache) = stable.filter(|_| is_absent(&e)) {
                    cache.map.lock().insert(real.to_path_buf(), None);
                }
                return Err(e);
            }
        };
        self.seen.lock().insert(real.to_path_buf(), meta.clone());
        if let Some(cache) = stable {
            cache
                .map
                .lock()
                .insert(real.to_path_buf(), Some(meta.clone()));
        }
        Ok(meta)
    }

    /// How many files were hashed so far.
    pub fn hashes(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    /// Digests computed on the way, to be remembered in the file-state cache.
    pub fn take_learned(&self) -> Vec<(Vec<u8>, FileState)> {
        std::mem::take(&mut self.learned.lock())
    }

    /// The content digest of a regular file with stat tuple `stat`, from the cache when the
    /// tuple matches (unless `--check digest`), else by hashing it.
    pub fn digest(&self, real: &Path, stat: &StatTuple) -> io::Result<Digest> {
        if self.check != CheckMode::Digest {
            if let Some(state) = self.files.get(real) {
                if state.stat == *stat {
                    return Ok(state.digest);
                }
            }
        }
        let digest = crate::cas::hash_file(real)
            .map_err(|e| io::Error::other(e.to_string()))?
            .0;
        self.hashes.fetch_add(1, Ordering::Relaxed);
        self.learned.lock().push((
            real.as_os_str().as_bytes().to_vec(),
            FileState {
                stat: *stat,
                digest,
            },
        ));
        Ok(digest)
    }

    /// What a thunk would observe now of `view`, for an access of `kind`. `exclude` names
    /// entries left out of a listing (the thunk's own outputs in that directory).
    pub fn observe(
        &self,
        kind: InputKind,
        view: &Path,
        exclude: &HashSet<OsString>,
    ) -> io::Result<Observed> {
        let real = self.binds.real(view);
        let meta = match self.lstat(&real) {
            Ok(meta) => meta,
            Err(e) if is_absent(&e) => return Ok(Observed::Absent),
            Err(e) => return Err(e),
        };
        let kind_now = file_kind(&meta);
        match (kind, kind_now) {
            (InputKind::Read, FileKind::File) => {
                let stat = stat_tuple(&meta);
                Ok(Observed::Content {
                    digest: self.digest(&real, &stat)?,
                    stat,
                })
            }
            (InputKind::Readdir, FileKind::Dir) => Ok(Observed::Listing {
                digest: self.listing(view, &real, exclude)?,
            }),
            (InputKind::Readlink, FileKind::Symlink) => Ok(Observed::Link {
                target: fs::read_link(&real)?.as_os_str().as_bytes().to_vec(),
            }),
            _ => self.meta(&real, &meta),
        }
    }

    fn meta(&self, real: &Path, meta: &fs::Metadata) -> io::Result<Observed> {
        let kind = file_kind(meta);
        // A directory's size and mtime change with every entry made below it; its entries
        // are covered by listings, so only its type and mode count.
        let (size, mtime_ns) = match kind {
            FileKind::Dir => (0, 0),
            _ => (
                meta.size(),
                meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ),
        };
        let link = match kind {
            FileKind::Symlink => Some(fs::read_link(real)?.as_os_str().as_bytes().to_vec()),
            _ => None,
        };
        Ok(Observed::Meta {
            kind,
            mode: meta.mode(),
            size,
            mtime_ns,
            link,
        })
    }

    /// The digest of a directory's sorted entry names and types, as the view lists them.
    fn listing(&self, view: &Path, real: &Path, exclude: &HashSet<OsString>) -> io::Result<Digest> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(real)? {
            let entry = entry?;
            let name = entry.file_name();
            if exclude.contains(&name) {
                continue;
            }
            let child = view.join(&name);
            if child == self.internal || self.hidden.is_hidden(&child) {
                continue;
            }
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => b'd',
                Ok(t) if t.is_file() => b'f',
                Ok(t) if t.is_symlink() => b'l',
                _ => b'o',
            };
            entries.push((name, kind));
        }
        entries.sort();
        let mut hasher = blake3::Hasher::new();
        for (name, kind) in &entries {
            hasher.update(name.as_bytes());
            hasher.update(&[0, *kind]);
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// Whether the real file system holds an output as a thunk left it (digest from the
    /// file-state cache when the stat tuple is unchanged).
    pub fn output_holds(&self, view: &Path, state: &OutputState) -> io::Result<bool> {
        let real = self.binds.real(view);
        let meta = match fs::symlink_metadata(&real) {
            Ok(meta) => meta,
            Err(e) if is_absent(&e) => return Ok(matches!(state, OutputState::Deleted)),
            Err(e) => return Err(e),
        };
        Ok(match state {
            OutputState::File { digest, mode, size } => {
                meta.file_type().is_file()
                    && meta.size() == *size
                    && meta.mode() & 0o7777 == *mode & 0o7777
                    && self.digest(&real, &stat_tuple(&meta))? == *digest
            }
            OutputState::Symlink { target } => {
                meta.file_type().is_symlink()
                    && fs::read_link(&real)?.as_os_str().as_bytes() == target.as_slice()
            }
            OutputState::Dir { .. } => meta.file_type().is_dir(),
            OutputState::Deleted => false,
        })
    }

    /// Whether a recorded input still holds: `None` when it does, else what changed.
    /// `left`: for a path the thunk itself writes, the state it left there, which counts as
    /// unchanged too (a compiler probes for its output before creating it; the next run finds
    /// the output it made).
    pub fn check(
        &self,
        input: &Input,
        exclude: &HashSet<OsString>,
        left: Option<&OutputState>,
    ) -> Option<Change> {
        let view = self.paths.to_view(&input.path);
        let change = |what| {
            Some(Change {
                path: view.clone(),
                what,
            })
        };
        // The quick path for content: an unchanged stat tuple needs no digest at all.
        if let Observed::Content { stat, .. } = &input.observed {
            if self.check != CheckMode::Digest {
                let real = self.binds.real(&view);
                if let Ok(meta) = self.lstat(&real) {
                    if meta.file_type().is_file() && stat_tuple(&meta) == *stat {
                        return None;
                    }
                    if self.check == CheckMode::Mtime {
                        return change("changed (mtime)");
                    }
                }
            }
        }
        let now = match self.observe(input.kind, &view, exclude) {
            Ok(now) => now,
            Err(_) => return change("cannot be read"),
        };
        if self.same(&input.observed, &now) {
            return None;
        }
        if let Some(left) = left {
            if self.output_holds(&view, left).unwrap_or(false) {
                return None;
            }
        }
        change(describe(&input.observed, &now))
    }
}

impl Observer<'_> {
    /// Whether two observations are the same for validity. Content compares by digest only
    /// (the stat tuple is a shortcut, not part of what the thunk saw). An mtime, though
    /// recorded, counts only under `--check mtime`: with digests, touching a file, or a
    /// checkout that makes a file or a symlink again as it was, must not rerun what looked at
    /// it.
    fn same(&self, recorded: &Observed, now: &Observed) -> bool {
        match (recorded, now) {
            (Observed::Content { digest: a, .. }, Observed::Content { digest: b, .. }) => a == b,
            (
                Observed::Meta {
                    kind: kind_a,
                    mode: mode_a,
                    size: size_a,
                    link: link_a,
                    ..
                },
                Observed::Meta {
                    kind: kind_b,
                    mode: mode_b,
                    size: size_b,
                    link: link_b,
                    ..
                },
            ) if self.check != CheckMode::Mtime => {
                kind_a == kind_b && mode_a == mode_b && size_a == size_b && link_a == link_b
            }
            _ => recorded == now,
        }
    }
}

fn describe(recorded: &Observed, now: &Observed) -> &'static str {
    match (recorded, now) {
        (Observed::Absent, _) => "now exists",
        (_, Observed::Absent) => "was removed",
        (Observed::Content { .. }, Observed::Content { .. }) => "changed (content)",
        (Observed::Listing { .. }, Observed::Listing { .. }) => "changed (directory listing)",
        (Observed::Link { .. }, Observed::Link { .. }) => "changed (link target)",
        (
            Observed::Meta {
                kind: a, link: la, ..
            },
            Observed::Meta {
                kind: b, link: lb, ..
            },
        ) if a == b => {
            if la != lb {
                "changed (link target)"
            } else {
                "changed (metadata)"
            }
        }
        _ => "changed (type)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::StorePath;

    struct Fixture {
        dir: tempfile::TempDir,
        paths: Paths,
        binds: Binds,
        hidden: HideRule,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        Fixture {
            paths,
            binds: Binds::new(vec![("/".into(), "/".into())]),
            hidden: HideRule::new(&[], &[], &[]).expect("no globs"),
            dir,
        }
    }

    impl Fixture {
        fn observer(&self, check: CheckMode) -> Observer<'_> {
            Observer::new(&self.paths, &self.binds, check, &NoFileStates, &self.hidden)
        }
        fn input(&self, kind: InputKind, rel: &str, check: CheckMode) -> Input {
            let path = StorePath::Project(rel.as_bytes().to_vec());
            let view = self.paths.to_view(&path);
            let observed = self
                .observer(check)
                .observe(kind, &view, &HashSet::new())
                .unwrap();
            Input {
                path,
                kind,
                observed,
            }
        }
        fn write(&self, rel: &str, content: &str) {
            fs::write(self.dir.path().join(rel), content).unwrap();
        }
        fn check(&self, input: &Input, check: CheckMode) -> Option<&'static str> {
            self.observer(check)
                .check(input, &HashSet::new(), None)
                .map(|c| c.what)
        }
    }

    #[test]
    fn content_changes_are_found_and_touches_are_not() {
        let f = fixture();
        f.write("a", "one");
        let input = f.input(InputKind::Read, "a", CheckMode::MtimeThenDigest);
        assert_eq!(f.check(&input, CheckMode::MtimeThenDigest), None);
        // Rewritten with the same content: new mtime, same digest.
        std::thread::sleep(std::time::Duration::from_millis(10));
        f.write("a", "one");
        assert_eq!(f.check(&input, CheckMode::MtimeThenDigest), None);
        assert_eq!(f.check(&input, CheckMode::Mtime), Some("changed (mtime)"));
        f.write("a", "two");
        assert_eq!(
            f.check(&input, CheckMode::MtimeThenDigest),
            Some("changed (content)")
        );
        assert_eq!(
            f.check(&input, CheckMode::Digest),
            Some("changed (content)")
        );
        fs::remove_file(f.dir.path().join("a")).unwrap();
        assert_eq!(
            f.check(&input, CheckMode::MtimeThenDigest),
            Some("was removed")
        );
    }

    #[test]
    fn a_touched_file_that_was_only_stat_ed_is_unchanged_unless_checking_mtimes() {
        let f = fixture();
        f.write("a", "one");
        let input = f.input(InputKind::Stat, "a", CheckMode::MtimeThenDigest);
        std::thread::sleep(std::time::Duration::from_millis(10));
        f.write("a", "two");
        assert_eq!(f.check(&input, CheckMode::MtimeThenDigest), None);
        assert_eq!(
            f.check(&input, CheckMode::Mtime),
            Some("changed (metadata)")
        );
        f.write("a", "three");
        assert_eq!(
            f.check(&input, CheckMode::MtimeThenDigest),
            Some("changed (metadata)")
        );
    }

    #[test]
    fn unchanged_files_are_not_hashed() {
        let f = fixture();
        f.write("a", "one");
        let input = f.input(InputKind::Read, "a", CheckMode::MtimeThenDigest);
        let observer = f.observer(CheckMode::MtimeThenDigest);
        assert_eq!(observer.check(&input, &HashSet::new(), None), None);
        assert_eq!(observer.hashes(), 0);
        let digest_mode = f.observer(CheckMode::Digest);
        assert_eq!(digest_mode.check(&input, &HashSet::new(), None), None);
        assert_eq!(digest_mode.hashes(), 1);
    }

    #[test]
    fn absent_listing_and_links() {
        let f = fixture();
        let absent = f.input(InputKind::Absent, "gen.h", CheckMode::default());
        assert_eq!(absent.observed, Observed::Absent);
        fs::create_dir(f.dir.path().join("d")).unwrap();
        f.write("d/x", "x");
        let listing = f.input(InputKind::Readdir, "d", CheckMode::default());
        std::os::unix::fs::symlink("d/x", f.dir.path().join("l")).unwrap();
        let link = f.input(InputKind::Readlink, "l", CheckMode::default());
        let stat = f.input(InputKind::Stat, "d", CheckMode::default());

        f.write("gen.h", "");
        assert_eq!(f.check(&absent, CheckMode::default()), Some("now exists"));
        // Writing into a directory changes its mtime, not what a `stat` input recorded.
        f.write("d/y", "y");
        assert_eq!(f.check(&stat, CheckMode::default()), None);
        assert_eq!(
            f.check(&listing, CheckMode::default()),
            Some("changed (directory listing)")
        );
        fs::remove_file(f.dir.path().join("l")).unwrap();
        std::os::unix::fs::symlink("d/y", f.dir.path().join("l")).unwrap();
        assert_eq!(
            f.check(&link, CheckMode::default()),
            Some("changed (link target)")
        );
    }

    #[test]
    fn own_outputs_are_left_out_of_listings_and_count_as_unchanged() {
        let f = fixture();
        fs::create_dir(f.dir.path().join("d")).unwrap();
        f.write("d/src.c", "");
        let exclude: HashSet<OsString> = [OsString::from("out.o")].into();
        let observer = f.observer(CheckMode::default());
        let view = f.dir.path().join("d");
        let before = observer
            .observe(InputKind::Readdir, &view, &exclude)
            .unwrap();
        f.write("d/out.o", "");
        assert_eq!(
            observer
                .observe(InputKind::Readdir, &view, &exclude)
                .unwrap(),
            before
        );
        // An absent probe of the thunk's own output: valid while the output is as left.
        let input = Input {
            path: StorePath::Project(b"d/out.o".to_vec()),
            kind: InputKind::Absent,
            observed: Observed::Absent,
        };
        let left = OutputState::File {
            digest: crate::cas::hash_bytes(b""),
            mode: 0o644,
            size: 0,
        };
        let out = f.dir.path().join("d/out.o");
        fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert_eq!(observer.check(&input, &exclude, Some(&left)), None);
        assert!(observer.check(&input, &exclude, None).is_some());
        f.write("d/out.o", "edited by hand");
        assert!(observer.check(&input, &exclude, Some(&left)).is_some());
    }
}
