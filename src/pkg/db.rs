//! The package database: which packages are installed, what they hold, and the changes under
//! way.
//!
//! # Where it lives
//!
//! Per machine, since installs go to system prefixes, not to a project: `/var/lib/cot` for
//! root, else `$XDG_DATA_HOME/cot` (`~/.local/share/cot`); `--db DIR` or `COT_PKG_DB`
//! override it.
//!
//! # On-disk format, version 1
//!
//! ```text
//! <db>/VERSION              "1\n"; any other content is refused
//! <db>/lock                 flock(2)ed (exclusive) by every command that changes the database
//!                           or the files of its packages, and by the recovery of a journal
//! <db>/packages/<name>      one installed package: the line "cot-package 1\n", then
//!                           postcard(Package) (`super::Package`, fields in declared order)
//! <db>/journal/<name>       a change of the package's files under way (see `super::apply`):
//!                           "cot-pkg-journal 1\n", then postcard(Journal)
//! <db>/tmp/                 records and journals being written
//! <db>/store/               the trace store of the installers' thunks (a trace store like a
//!                           project's, served by its own store server)
//! <db>/cas/                 the content store of the packages' files and of the installers'
//!                           outputs and logs
//! ```
//!
//! A package name is also its file name (letters, digits, `._+-`, see
//! [`super::check_name`]).
//!
//! # Writes and crashes
//!
//! A record or journal is written whole to `tmp/`, fsynced, renamed into place and its
//! directory fsynced: after a crash at any instant each file is the old one or the new one,
//! never a part. A stray file in `tmp/` is garbage. A journal in `journal/` is a change to
//! finish or roll back, which [`Db::recover`] does before any command reads the database.
//! Ownership of a path is never stored apart from the manifests: two records cannot disagree.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{check_name, io_error, Error, Package};
use crate::cas::Cas;

/// The environment variable naming the database directory.
pub const DB_ENV: &str = "COT_PKG_DB";

const VERSION: &str = "1\n";
const RECORD_MAGIC: &[u8] = b"cot-package 1\n";
pub(crate) const JOURNAL_MAGIC: &[u8] = b"cot-pkg-journal 1\n";

/// The package database in one directory.
#[derive(Clone, Debug)]
pub struct Db {
    root: PathBuf,
}

/// The database's lock, held while it lives.
pub struct Lock {
    _file: Flock<File>,
}

impl Db {
    /// The default directory: `COT_PKG_DB`, else `/var/lib/cot` for root, else
    /// `$XDG_DATA_HOME/cot` or `~/.local/share/cot`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os(DB_ENV).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/cot");
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(data).join("cot");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        PathBuf::from(home).join(".local/share/cot")
    }

    /// Opens the database in `dir`, creating it if needed.
    pub fn open(dir: &Path) -> Result<Db, Error> {
        let root = std::path::absolute(dir).map_err(io_error(dir))?;
        let db = Db { root };
        for sub in ["packages", "journal", "tmp"] {
            let path = db.root.join(sub);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let version = db.root.join("VERSION");
        match fs::read(&version) {
            Ok(found) if found == VERSION.as_bytes() => {}
            Ok(found) => {
                return Err(Error::Db {
                    path: db.root.clone(),
                    message: format!(
                        "format version {:?}; this cot reads version 1 only",
                        String::from_utf8_lossy(&found).trim_end()
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                db.write_atomic(&version, VERSION.as_bytes())?;
            }
            Err(e) => return Err(io_error(&version)(e)),
        }
        Ok(db)
    }

    /// Opens the database in `dir` when it exists, without creating anything.
    pub fn existing(dir: &Path) -> Option<Db> {
        dir.join("VERSION").is_file().then(|| Db {
            root: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The trace store of the installers.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn cas_dir(&self) -> PathBuf {
        self.root.join("cas")
    }

    pub fn cas(&self) -> Result<Cas, Error> {
        Ok(Cas::open(&self.cas_dir())?)
    }

    /// Takes the database's lock, waiting for another cot that holds it (saying so).
    pub fn lock(&self) -> Result<Lock, Error> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, _)) => {
                eprintln!(
                    "cot: waiting for another cot using the package database {}",
                    self.root.display()
                );
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, errno)| io_error(&path)(errno.into()))?
            }
        };
        Ok(Lock { _file: file })
    }

    /// Every installed package, by name.
    pub fn packages(&self) -> Result<Vec<Package>, Error> {
        let dir = self.root.join("packages");
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(io_error(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| check_name(name).is_ok())
            .collect();
        names.sort();
        let mut packages = Vec::with_capacity(names.len());
        for name in names {
            if let Some(package) = self.package(&name)? {
                packages.push(package);
            }
        }
        Ok(packages)
    }

    /// The package `name`, if installed.
    pub fn package(&self, name: &str) -> Result<Option<Package>, Error> {
        check_name(name)?;
        let path = self.root.join("packages").join(name);
        read_record(&path, RECORD_MAGIC)
    }

    /// The package `name`, which must be installed.
    pub fn installed(&self, name: &str) -> Result<Package, Error> {
        self.package(name)?.ok_or_else(|| Error::NotInstalled {
            name: name.to_string(),
        })
    }

    /// Writes a package's record, durably (hold the lock).
    pub(crate) fn write_package(&self, package: &Package) -> Result<(), Error> {
        check_name(&package.name)?;
        let path = self.root.join("packages").join(&package.name);
        self.write_atomic(&path, &encode(RECORD_MAGIC, package))
    }

    /// Removes a package's record, durably (hold the lock).
    pub(crate) fn remove_package(&self, name: &str) -> Result<(), Error> {
        check_name(name)?;
        let path = self.root.join("packages").join(name);
        remove_durably(&path)
    }

    pub(crate) fn journal_path(&self, name: &str) -> PathBuf {
        self.root.join("journal").join(name)
    }

    /// The names of the packages with a journal (a change under way or interrupted).
    pub(crate) fn journals(&self) -> Result<Vec<String>, Error> {
        let dir = self.root.join("journal");
        let mut names: Vec<String> = match fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| check_name(name).is_ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&dir)(e)),
        };
        names.sort();
        Ok(names)
    }

    /// Writes `data` to `path` through `tmp/`: fsynced, renamed, its directory fsynced.
    pub(crate) fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), Error> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix("write-")
            .tempfile_in(&tmp_dir)
            .map_err(io_error(&tmp_dir))?;
        tmp.write_all(data).map_err(io_error(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_error(tmp.path()))?;
        tmp.persist(path).map_err(|e| io_error(path)(e.error))?;
        sync_dir(path.parent().unwrap_or(Path::new("/")))
    }

    /// Finishes or rolls back every interrupted change (see [`super::apply::recover`]);
    /// returns a line for each. Cheap when there is none: one directory read.
    pub fn recover(&self) -> Result<Vec<String>, Error> {
        if self.journals()?.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        super::apply::recover(self)
    }
}

/// Settles the interrupted changes of the default database, if it exists, saying what was
/// done; for commands that do not otherwise touch it (cot's other commands). Errors are
/// reported, not fatal: they are the package database's, not the command's.
pub fn recover_default() {
    let Some(db) = Db::existing(&Db::default_dir()) else {
        return;
    };
    match db.journals() {
        Ok(journals) if journals.is_empty() => {}
        Ok(_) => match db.recover() {
            Ok(lines) => {
                for line in lines {
                    eprintln!("cot: {line}");
                }
            }
            Err(e) => eprintln!("cot: cannot settle an interrupted install: {e}"),
        },
        Err(e) => eprintln!("cot: {e}"),
    }
}

pub(crate) fn encode<T: Serialize>(magic: &[u8], value: &T) -> Vec<u8> {
    let mut data = magic.to_vec();
    data.extend(postcard::to_allocvec(value).expect("postcard encodes every record type"));
    data
}

pub(crate) fn decode<T: DeserializeOwned>(
    path: &Path,
    magic: &[u8],
    data: &[u8],
) -> Result<T, Error> {
    let corrupt = |message: String| Error::Db {
        path: path.to_path_buf(),
        message,
    };
    let Some(body) = data.strip_prefix(magic) else {
        return Err(corrupt(format!(
            "does not start with {:?}",
            String::from_utf8_lossy(magic).trim_end()
        )));
    };
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(corrupt(format!("{} bytes after the record", rest.len()))),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

pub(crate) fn read_record<T: DeserializeOwned>(
    path: &Path,
    magic: &[u8],
) -> Result<Option<T>, Error> {
    match fs::read(path) {
        Ok(data) => decode(path, magic, &data).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Removes a file (absent is fine) and fsyncs its directory.
pub(crate) fn remove_durably(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("/"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}
