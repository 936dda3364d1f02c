//! Changing the files of packages: installing one (a new one, a new version, or the same one
//! again), and removing one. Each change is planned first, reading the disk and the database
//! without writing anything, so that conflicts stop it before a single file is written. Then
//! it is journaled and applied so that an interruption at any instant (SIGKILL, power loss)
//! leaves the package whole or absent:
//!
//! 1. The [`Journal`] is written (`<db>/journal/<name>`, see `db.rs`): the directories to
//!    make, each file and symlink with the temporary name it is staged under, beside its
//!    destination (`.cot-pkg-<nonce>-<i>`), the files and directories to remove afterwards,
//!    and the package records to write.
//! 2. Staging: the missing directories are made, every file is restored from the content
//!    store (verified) and every symlink made under its temporary name, and their
//!    directories are fsynced. Nothing a program looks for has changed yet.
//! 3. The commit point: the journal is rewritten with `committed` set.
//! 4. Every staged name is renamed over its destination (atomic per file), then the files of
//!    an older version that the new one lacks are removed (only when they are as installed),
//!    then the directories it made that are left empty, then the records are written and the
//!    journal removed.
//!
//! [`recover`] settles a journal left by a killed cot: one not yet committed is rolled back
//! (staged files and made directories removed, so nothing of the change is left and the older
//! version, if any, is untouched), a committed one is finished (every step is idempotent: a
//! staged name that is gone was renamed already). Every `cot` command does that first. A
//! removal (`cot uninstall`) is committed from the start: interrupted, it is finished.
//!
//! Running the same install again after a rollback is a substitution: the installer's trace
//! and the package's contents were recorded before step 1.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::db::{self, Db, JOURNAL_MAGIC};
use super::{io_error, status, Entry, Error, Package, Status, TakenOver};
use crate::store::model::OutputState;

/// Slows every step of an apply down by this many milliseconds: for tests that kill cot at
/// random points of a change, which otherwise lasts a few milliseconds.
pub const STEP_DELAY_ENV: &str = "COT_PKG_STEP_DELAY_MS";

/// Prefix of the temporary names files are staged under.
const STAGED_PREFIX: &str = ".cot-pkg-";

/// A change of the files of packages, as written before it is applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    /// The package changed (the journal's file name).
    pub package: String,
    /// What the change is, for messages: "install of bzip2 1.0.8".
    pub what: String,
    /// Past the commit point: finish, never roll back.
    pub committed: bool,
    /// Directories to make (real paths, parents first) and their modes.
    pub mkdirs: Vec<(Vec<u8>, u32)>,
    /// Files and symlinks to stage, then put in place.
    pub place: Vec<Staged>,
    /// Real files to remove once everything is in place.
    pub remove: Vec<Removal>,
    /// Real directories to remove when empty, deepest first.
    pub rmdirs: Vec<Vec<u8>>,
    /// Records to write (the package's own, and those of packages it took paths from).
    pub records: Vec<Package>,
    /// Records to remove.
    pub drop_records: Vec<String>,
}

/// One file or symlink: staged under `staged`, beside `real`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Staged {
    pub staged: Vec<u8>,
    pub real: Vec<u8>,
    pub state: OutputState,
}

/// A real file to remove: only while it holds `expect` (as installed), or whatever it holds
/// (`None`: `--force`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Removal {
    pub real: Vec<u8>,
    pub expect: Option<OutputState>,
}

/// Why a path stops an install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub path: PathBuf,
    pub why: String,
    /// `--force` takes it over (a file or symlink of another package or of none); a
    /// directory or a non-directory on the way is never replaced.
    pub forceable: bool,
}

/// A planned install: the journal to apply, or the conflicts that stop it.
#[derive(Debug)]
pub struct InstallPlan {
    pub journal: Journal,
    pub conflicts: Vec<Conflict>,
    /// Files of the older version that the new one lacks and that changed since they were
    /// installed: left in place.
    pub kept: Vec<(PathBuf, String)>,
    /// Files of this package already installed that no longer are as installed (put back).
    pub repaired: Vec<(PathBuf, String)>,
    /// Paths taken over with `--force`.
    pub taken_over: Vec<TakenOver>,
}

impl InstallPlan {
    /// Whether the install changes no file (the package is installed as it is).
    pub fn is_noop(&self) -> bool {
        self.journal.mkdirs.is_empty()
            && self.journal.place.is_empty()
            && self.journal.remove.is_empty()
            && self.journal.rmdirs.is_empty()
    }
}

fn bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

fn path_of(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// A name no other change uses: the staged files of a rolled-back change never collide with
/// those of the next.
fn nonce() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{}-{now}", std::process::id());
    crate::cas::hex(&crate::cas::hash_bytes(seed.as_bytes()))[..12].to_string()
}

/// Plans installing `new` (its `created_dirs` and `taken_over` are filled in here): where
/// each entry goes, which directories to make, what an installed version of the same name
/// leaves behind, and the conflicts. Reads only.
pub fn plan_install(db: &Db, mut new: Package, force: bool) -> Result<InstallPlan, Error> {
    let packages = db.packages()?;
    let old = packages.iter().find(|p| p.name == new.name);
    let mut owners: HashMap<PathBuf, &str> = HashMap::new();
    for package in packages.iter().filter(|p| p.name != new.name) {
        for entry in package.files() {
            owners.insert(package.real(entry), &package.name);
        }
    }
    let old_files: HashMap<PathBuf, &Entry> = old
        .map(|p| p.files().map(|e| (p.real(e), e)).collect())
        .unwrap_or_default();
    let dir_modes: HashMap<PathBuf, u32> = new
        .manifest
        .iter()
        .filter_map(|e| match e.state {
            OutputState::Dir { mode } => Some((new.real(e), mode)),
            _ => None,
        })
        .collect();

    let nonce = nonce();
    let mut mkdirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut blocked: BTreeSet<PathBuf> = BTreeSet::new();
    let mut conflicts = Vec::new();
    let mut place = Vec::new();
    let mut repaired = Vec::new();
    let mut taken_over = Vec::new();
    let mut taken_from: BTreeMap<&str, HashSet<PathBuf>> = BTreeMap::new();
    let mut reals: HashSet<PathBuf> = HashSet::new();
    for entry in &new.manifest {
        let real = new.real(entry);
        reals.insert(real.clone());
        // The way to it: directories, made where missing.
        for ancestor in real.ancestors().skip(1) {
            if mkdirs.contains(ancestor) {
                continue;
            }
            match fs::symlink_metadata(ancestor) {
                Err(_) => {
                    mkdirs.insert(ancestor.to_path_buf());
                }
                // A symlink to a directory (lib -> lib64) leads there, as it did for the
                // installer.
                Ok(_) if ancestor.is_dir() => break,
                Ok(_) => {
                    if blocked.insert(ancestor.to_path_buf()) {
                        conflicts.push(Conflict {
                            path: ancestor.to_path_buf(),
                            why: "is not a directory, and the package has files under it".into(),
                            forceable: false,
                        });
                    }
                    break;
                }
            }
        }
        let found = fs::symlink_metadata(&real).ok();
        match &entry.state {
            OutputState::Dir { .. } => match found {
                None => {
                    mkdirs.insert(real);
                }
                Some(_) if real.is_dir() => {}
                Some(_) => conflicts.push(Conflict {
                    path: real,
                    why: "is not a directory, and the package has a directory there".into(),
                    forceable: false,
                }),
            },
            OutputState::Deleted => {}
            state => {
                let Some(meta) = found else {
                    place.push((real, state.clone()));
                    continue;
                };
                if meta.is_dir() {
                    conflicts.push(Conflict {
                        path: real,
                        why: "is a directory, and the package has a file there".into(),
                        forceable: false,
                    });
                    continue;
                }
                let now = status(&real, state)?;
                let owner = owners.get(&real).copied();
                if let (None, Some(installed)) = (owner, old_files.get(&real)) {
                    if now != Status::Intact {
                        // Not as the installed version left it either: changed since.
                        if status(&real, &installed.state)? != Status::Intact {
                            repaired.push((real.clone(), now.describe(entry)));
                        }
                        place.push((real, state.clone()));
                    }
                    continue;
                }
                // Another package's, or nobody's: a conflict --force takes over.
                let why = match owner {
                    Some(owner) => format!("belongs to package {owner}"),
                    None if now == Status::Intact => {
                        "exists and belongs to no package (with the same content)".into()
                    }
                    None => "exists and belongs to no package".into(),
                };
                conflicts.push(Conflict {
                    path: real.clone(),
                    why,
                    forceable: true,
                });
                taken_over.push(TakenOver {
                    path: bytes(&real),
                    from: owner.map(str::to_string),
                });
                if let Some(owner) = owner {
                    taken_from.entry(owner).or_default().insert(real.clone());
                }
                place.push((real, state.clone()));
            }
        }
    }
    if force {
        conflicts.retain(|c| !c.forceable);
    } else {
        taken_over.clear();
    }

    // What an installed version of the same name leaves behind.
    let mut remove = Vec::new();
    let mut kept = Vec::new();
    let mut rmdirs = Vec::new();
    let mut created: Vec<PathBuf> = mkdirs.iter().cloned().collect();
    if let Some(old) = old {
        for entry in old.files() {
            let real = old.real(entry);
            if reals.contains(&real) {
                continue;
            }
            match status(&real, &entry.state)? {
                Status::Intact => remove.push(Removal {
                    real: bytes(&real),
                    expect: Some(entry.state.clone()),
                }),
                Status::Missing => {}
                other => kept.push((real, other.describe(entry))),
            }
        }
        for dir in &old.created_dirs {
            let dir = path_of(dir);
            if reals.iter().any(|r| r.starts_with(dir)) {
                created.push(dir.to_path_buf());
            } else {
                rmdirs.push(bytes(dir));
            }
        }
    }
    rmdirs.sort_by_key(|d| std::cmp::Reverse(path_of(d).components().count()));
    created.sort();
    created.dedup();

    new.created_dirs = created.iter().map(|d| bytes(d)).collect();
    if let Some(old) = old {
        // Takeovers are remembered across versions.
        let mut all = old.taken_over.clone();
        all.extend(taken_over.iter().cloned());
        all.retain(|t| reals.contains(path_of(&t.path)));
        all.dedup_by(|a, b| a.path == b.path);
        new.taken_over = all;
    } else {
        new.taken_over = taken_over.clone();
    }
    let mut records = vec![];
    for (owner, paths) in &taken_from {
        if let Some(package) = packages.iter().find(|p| p.name == *owner) {
            let mut package = package.clone();
            let before = package.manifest.len();
            let dest = package.dest.clone();
            package.manifest.retain(|e| {
                matches!(e.state, OutputState::Dir { .. })
                    || !paths.contains(&super::real_path(dest.as_deref(), &e.path))
            });
            if package.manifest.len() != before {
                records.push(package);
            }
        }
    }
    if !force {
        records.clear();
    }
    let what = format!("install of {}", new.title());
    records.insert(0, new.clone());
    let journal = Journal {
        package: new.name.clone(),
        what,
        committed: false,
        mkdirs: mkdirs
            .iter()
            .map(|d| (bytes(d), dir_modes.get(d).copied().unwrap_or(0o755)))
            .collect(),
        place: place
            .into_iter()
            .enumerate()
            .map(|(i, (real, state))| {
                let staged = real
                    .with_file_name(format!("{STAGED_PREFIX}{nonce}-{i}"))
                    .into_os_string()
                    .into_vec();
                Staged {
                    staged,
                    real: bytes(&real),
                    state,
                }
            })
            .collect(),
        remove,
        rmdirs,
        records,
        drop_records: Vec::new(),
    };
    Ok(InstallPlan {
        journal,
        conflicts,
        kept,
        repaired,
        taken_over,
    })
}

use std::os::unix::ffi::OsStringExt;

/// A planned removal of a package.
#[derive(Debug)]
pub struct RemovePlan {
    pub journal: Journal,
    /// Files changed since they were installed, left in place (without `--force`).
    pub kept: Vec<(PathBuf, String)>,
    /// Files removed.
    pub files: usize,
}

/// Plans removing `package`: its files that are as installed (all of them with `force`), then
/// the directories it made that are left empty. A directory it made that holds entries of
/// other packages passes to the first of them (by name), which removes it when it goes in
/// turn. Reads only; `packages` are all the installed ones.
pub fn plan_remove(
    packages: &[Package],
    package: &Package,
    force: bool,
) -> Result<RemovePlan, Error> {
    let mut remove = Vec::new();
    let mut kept = Vec::new();
    for entry in package.files() {
        let real = package.real(entry);
        match status(&real, &entry.state)? {
            Status::Missing => {}
            Status::Intact => remove.push(Removal {
                real: bytes(&real),
                expect: Some(entry.state.clone()),
            }),
            _ if force => remove.push(Removal {
                real: bytes(&real),
                expect: None,
            }),
            other => kept.push((real, other.describe(entry))),
        }
    }
    let mut rmdirs = Vec::new();
    let mut heirs: BTreeMap<String, Package> = BTreeMap::new();
    for dir in &package.created_dirs {
        let dir_path = path_of(dir);
        let heir = packages
            .iter()
            .filter(|p| p.name != package.name)
            .find(|p| {
                p.manifest.iter().any(|e| {
                    let real = p.real(e);
                    real != dir_path && real.starts_with(dir_path)
                })
            });
        match heir {
            Some(heir) => {
                let heir = heirs
                    .entry(heir.name.clone())
                    .or_insert_with(|| heir.clone());
                if !heir.created_dirs.contains(dir) {
                    heir.created_dirs.push(dir.clone());
                    heir.created_dirs.sort();
                }
            }
            None => rmdirs.push(dir.clone()),
        }
    }
    rmdirs.sort_by_key(|d| std::cmp::Reverse(path_of(d).components().count()));
    let files = remove.len();
    Ok(RemovePlan {
        journal: Journal {
            package: package.name.clone(),
            what: format!("removal of {}", package.title()),
            committed: true,
            mkdirs: Vec::new(),
            place: Vec::new(),
            remove,
            rmdirs,
            records: heirs.into_values().collect(),
            drop_records: vec![package.name.clone()],
        },
        kept,
        files,
    })
}

/// Progress of a long apply on a terminal.
struct Progress {
    total: usize,
    done: usize,
    shown: bool,
    enabled: bool,
    delay: Option<Duration>,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            shown: false,
            enabled: total >= 200 && std::io::stderr().is_terminal(),
            delay: std::env::var(STEP_DELAY_ENV)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
        if self.enabled && (self.done.is_multiple_of(100) || self.done == self.total) {
            eprint!("\rcot: {what} {}/{}", self.done, self.total);
            self.shown = true;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// Applies a planned change (see the module documentation): journal, staging, commit point,
/// placing, removals, records. On an error the journal stays: the next `cot` command settles
/// it ([`recover`]).
pub fn apply(db: &Db, mut journal: Journal) -> Result<(), Error> {
    let path = db.journal_path(&journal.package);
    if journal.committed {
        db.write_atomic(&path, &db::encode(JOURNAL_MAGIC, &journal))?;
        return finish(db, &journal);
    }
    db.write_atomic(&path, &db::encode(JOURNAL_MAGIC, &journal))?;
    stage(db, &journal)?;
    journal.committed = true;
    db.write_atomic(&path, &db::encode(JOURNAL_MAGIC, &journal))?;
    finish(db, &journal)
}

/// For tests: a change applied up to its commit point, as a cot killed right after it
/// leaves it.
#[cfg(test)]
pub(crate) fn stage_and_commit(db: &Db, mut journal: Journal) -> Result<(), Error> {
    let path = db.journal_path(&journal.package);
    db.write_atomic(&path, &db::encode(JOURNAL_MAGIC, &journal))?;
    stage(db, &journal)?;
    journal.committed = true;
    db.write_atomic(&path, &db::encode(JOURNAL_MAGIC, &journal))
}

/// Step 2: the directories, and every file and symlink under its staged name.
fn stage(db: &Db, journal: &Journal) -> Result<(), Error> {
    let cas = db.cas()?;
    let mut progress = Progress::new(journal.mkdirs.len() + journal.place.len());
    let mut dirs: BTreeSet<&Path> = BTreeSet::new();
    for (dir, mode) in &journal.mkdirs {
        let dir = path_of(dir);
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(io_error(dir)(e)),
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode)).map_err(io_error(dir))?;
        if let Some(parent) = dir.parent() {
            dirs.insert(parent);
        }
        progress.step("staging");
    }
    for staged in &journal.place {
        let to = path_of(&staged.staged);
        match &staged.state {
            OutputState::File { digest, mode, .. } => cas.restore(digest, to, *mode)?,
            OutputState::Symlink { target } => {
                remove_if_present(to)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), to).map_err(io_error(to))?;
            }
            OutputState::Dir { .. } | OutputState::Deleted => {}
        }
        if let Some(parent) = to.parent() {
            dirs.insert(parent);
        }
        progress.step("staging");
    }
    for dir in dirs {
        db::sync_dir(dir)?;
    }
    Ok(())
}

/// Step 4: everything past the commit point. Idempotent.
fn finish(db: &Db, journal: &Journal) -> Result<(), Error> {
    let mut progress = Progress::new(journal.place.len() + journal.remove.len());
    let mut dirs: BTreeSet<&Path> = BTreeSet::new();
    for staged in &journal.place {
        let from = path_of(&staged.staged);
        let to = path_of(&staged.real);
        if fs::symlink_metadata(from).is_ok() {
            fs::rename(from, to).map_err(io_error(to))?;
        }
        if let Some(parent) = to.parent() {
            dirs.insert(parent);
        }
        progress.step("installing");
    }
    for removal in &journal.remove {
        let real = path_of(&removal.real);
        let remove = match &removal.expect {
            Some(state) => status(real, state)? == Status::Intact,
            None => fs::symlink_metadata(real).is_ok_and(|m| !m.is_dir()),
        };
        if remove {
            remove_if_present(real)?;
            if let Some(parent) = real.parent() {
                dirs.insert(parent);
            }
        }
        progress.step("removing");
    }
    for dir in &journal.rmdirs {
        let dir = path_of(dir);
        if fs::remove_dir(dir).is_ok() {
            if let Some(parent) = dir.parent() {
                dirs.insert(parent);
            }
        }
    }
    for dir in dirs {
        if dir.is_dir() {
            db::sync_dir(dir)?;
        }
    }
    for record in &journal.records {
        db.write_package(record)?;
    }
    for name in &journal.drop_records {
        db.remove_package(name)?;
    }
    db::remove_durably(&db.journal_path(&journal.package))
}

/// Undoes an install that had not reached its commit point: its staged files and the
/// directories it made go; what was installed before is untouched.
fn rollback(db: &Db, journal: &Journal) -> Result<(), Error> {
    let mut dirs: BTreeSet<&Path> = BTreeSet::new();
    for staged in &journal.place {
        let path = path_of(&staged.staged);
        remove_if_present(path)?;
        if let Some(parent) = path.parent() {
            dirs.insert(parent);
        }
    }
    // A restore cut short leaves its own temporary file beside the staged name.
    for dir in &dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(b".cot-restore-") {
                remove_if_present(&entry.path())?;
            }
        }
    }
    for (dir, _) in journal.mkdirs.iter().rev() {
        let _ = fs::remove_dir(path_of(dir));
    }
    for dir in dirs {
        if dir.is_dir() {
            db::sync_dir(dir)?;
        }
    }
    db::remove_durably(&db.journal_path(&journal.package))
}

/// Settles every journal left by a killed cot (hold the lock): rolls back a change that was
/// not committed, finishes one that was. Returns a line saying what it did for each.
pub fn recover(db: &Db) -> Result<Vec<String>, Error> {
    let tmp = db.root().join("tmp");
    if let Ok(entries) = fs::read_dir(&tmp) {
        // Only a holder of the lock writes there: with it held, these are strays.
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
    let mut lines = Vec::new();
    for name in db.journals()? {
        let path = db.journal_path(&name);
        let Some(journal) = db::read_record::<Journal>(&path, JOURNAL_MAGIC)? else {
            continue;
        };
        if journal.committed {
            finish(db, &journal)?;
            lines.push(format!("finished the interrupted {}", journal.what));
        } else {
            rollback(db, &journal)?;
            lines.push(format!(
                "rolled back the interrupted {}: none of its files were left, and what was \
                 installed before is as it was (installing it again takes its files from the \
                 content store)",
                journal.what
            ));
        }
    }
    Ok(lines)
}

fn remove_if_present(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}
