//! `cot install`: the installer runs as a memoized thunk whose writes under the prefix are
//! captured (`RunOptions::capture`) into the database's content store and trace store; its
//! captured outputs become the manifest, which [`super::apply`] puts in place.
//!
//! The thunk is keyed like any `cot run` (command, working directory, environment, what it may
//! see and write, the prefix among it), but its traces live in the package database's store
//! (`<db>/store`), not the project's: a project's `cot clean` never deletes installed files,
//! and an install is found again from any checkout at the same place. So installing the same
//! thing with unchanged inputs is a substitution: the trace is valid, the manifest's contents
//! are in the content store, and nothing runs — after an uninstall too. Where the files go
//! (`--dest`) is not part of the key: installing elsewhere substitutes as well.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::apply::{self, InstallPlan};
use super::{guess, Db, Entry, Error, Origin, Package};
use crate::engine::key::Paths;
use crate::engine::memo::{self, MemoOptions, MemoReport};
use crate::engine::observe::CheckMode;
use crate::engine::{RunOptions, Thunk};
use crate::store::model::OutputState;

/// What to install and how.
#[derive(Clone, Debug)]
pub struct Request {
    /// The installer; its writable directories include `prefix`.
    pub thunk: Thunk,
    /// The directory whose writes are captured, absolute and canonical (it need not exist).
    pub prefix: PathBuf,
    pub name: Option<String>,
    pub version: Option<String>,
    /// Put the files under this directory instead of at their own paths.
    pub dest: Option<PathBuf>,
    pub force: bool,
    pub check: CheckMode,
    pub no_cache: bool,
    pub no_passthrough: bool,
}

/// How an install ended.
#[derive(Debug)]
pub enum Outcome {
    /// The installer failed (its status), or was interrupted: nothing was installed.
    Failed { run: MemoReport },
    /// Paths stop the install: nothing was written.
    Conflicts {
        package: Box<Package>,
        plan: Box<InstallPlan>,
        run: MemoReport,
    },
    /// Installed (or already installed as it is: `plan.is_noop()`).
    Installed {
        package: Box<Package>,
        plan: Box<InstallPlan>,
        run: MemoReport,
        /// Real entries the installer deleted under the prefix, left in place.
        deleted: Vec<PathBuf>,
    },
}

/// Runs (or substitutes) the installer, records the package and puts its files in place.
pub fn install(db: &Db, request: &Request) -> Result<Outcome, Error> {
    let run_options = RunOptions {
        no_passthrough: request.no_passthrough,
        capture: vec![request.prefix.clone()],
        ..RunOptions::default()
    };
    let memo_options = MemoOptions {
        store: Some(db.store_dir()),
        cas: Some(db.cas_dir()),
        caches: Default::default(),
        check: request.check,
        no_cache: request.no_cache,
        cache_failures: false,
    };
    let run = memo::run(&request.thunk, &run_options, &memo_options)?;
    let Some((trace_id, trace)) = run.trace.clone().filter(|_| run.exit_code == 0) else {
        return Ok(Outcome::Failed { run });
    };
    let paths = Paths::new(&crate::engine::project::find_root(&request.thunk.cwd));
    let mut manifest = Vec::new();
    let mut deleted = Vec::new();
    for output in &trace.outputs {
        let view = paths.to_view(&output.path);
        if !view.starts_with(&request.prefix) {
            continue;
        }
        match &output.state {
            OutputState::Deleted => deleted.push(view),
            state => manifest.push(Entry {
                path: view.as_os_str().as_bytes().to_vec(),
                state: state.clone(),
            }),
        }
    }
    manifest.sort_by(|a, b| a.path().cmp(b.path()));
    if !manifest
        .iter()
        .any(|e| !matches!(e.state, OutputState::Dir { .. }))
    {
        return Err(Error::Path {
            path: request.prefix.clone(),
            message: "the installer put no file here: nothing to install (is this the \
                      prefix it installs into? see --prefix)"
                .into(),
        });
    }
    let cas = db.cas()?;
    let (guessed_name, guessed_version) = guess::guess(&request.thunk.cwd, &manifest, &cas);
    let name = match (&request.name, guessed_name) {
        (Some(name), _) => name.clone(),
        (None, Some((name, _))) => name,
        (None, None) => {
            return Err(Error::Path {
                path: request.thunk.cwd.clone(),
                message: "cannot tell the package's name: give it with --name".into(),
            })
        }
    };
    super::check_name(&name)?;
    let (version, version_from) = match (&request.version, guessed_version) {
        (Some(version), _) => (Some(version.clone()), "--version".to_string()),
        (None, Some((version, from))) => (Some(version), from),
        (None, None) => (
            None,
            "unknown: neither --version, PACKAGE_VERSION in config.log or Makefile, an \
             installed *.pc or *.dist-info, nor a directory named NAME-VERSION says"
                .to_string(),
        ),
    };
    let package = Package {
        name,
        version,
        version_from,
        prefix: request.prefix.as_os_str().as_bytes().to_vec(),
        dest: request
            .dest
            .as_ref()
            .map(|d| d.as_os_str().as_bytes().to_vec()),
        manifest,
        created_dirs: Vec::new(),
        taken_over: Vec::new(),
        origin: Origin {
            command: request
                .thunk
                .argv
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            cwd: request.thunk.cwd.as_os_str().as_bytes().to_vec(),
            key: run.key.clone(),
            trace_id,
            trace,
        },
        installed_ns: memo::now_ns(),
    };
    let (package, plan) = put_in_place(db, package, request.force)?;
    Ok(if plan.conflicts.is_empty() {
        Outcome::Installed {
            package: Box::new(package),
            plan: Box::new(plan),
            run,
            deleted,
        }
    } else {
        Outcome::Conflicts {
            package: Box::new(package),
            plan: Box::new(plan),
            run,
        }
    })
}

/// Plans and applies the install of `package` under the database's lock; nothing is written
/// when paths conflict (the plan lists them). An install that changes no file keeps the
/// record as it is, unless the record says something new (its origin). Returns the package
/// as recorded.
pub fn put_in_place(
    db: &Db,
    package: Package,
    force: bool,
) -> Result<(Package, InstallPlan), Error> {
    let _lock = db.lock()?;
    let plan = apply::plan_install(db, package, force)?;
    let package = plan.journal.records[0].clone();
    if !plan.conflicts.is_empty() {
        return Ok((package, plan));
    }
    if plan.is_noop() {
        let same = db.package(&package.name)?.is_some_and(|old| {
            Package {
                installed_ns: 0,
                ..old
            } == Package {
                installed_ns: 0,
                ..package.clone()
            }
        });
        if !same {
            db.write_package(&package)?;
        }
    } else {
        apply::apply(db, plan.journal.clone())?;
    }
    Ok((package, plan))
}
