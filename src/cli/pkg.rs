//! `cot install`, `cot uninstall` and `cot pkg`: installed packages.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::run::SandboxArgs;
use crate::engine::env::{parse_rules, thunk_env};
use crate::engine::Thunk;
use crate::pkg::apply::{self, Conflict, InstallPlan};
use crate::pkg::install::{self, Outcome, Request};
use crate::pkg::{archive, status, Db, Package, Status};
use crate::store::model::OutputState;

/// Exit status when an install or removal stopped without changing anything (conflicts,
/// files changed since install) or when `cot pkg verify` found changes.
const EXIT_REFUSED: u8 = 1;

/// Where the package database is.
#[derive(Debug, Args, Clone)]
pub struct DbArgs {
    /// The package database [default: $COT_PKG_DB, else /var/lib/cot as root, else
    /// ~/.local/share/cot]
    #[arg(long, value_name = "DIR", global = true)]
    db: Option<PathBuf>,
}

impl DbArgs {
    /// Opens the database and settles what a killed cot left under way.
    fn open(&self) -> Result<Db> {
        let dir = self.db.clone().unwrap_or_else(Db::default_dir);
        let db = Db::open(&dir)
            .with_context(|| format!("cannot open the package database {}", dir.display()))?;
        for line in db.recover()? {
            eprintln!("cot: {line}");
        }
        Ok(db)
    }
}

/// Run an installer in the sandbox and install what it puts under the prefix as a package
#[derive(Debug, Args)]
#[command(
    long_about = "Run an installer in the sandbox and install what it puts under the prefix as \
a package.\n\n\
The installer (make install, ./configure --prefix=/usr/local && make && make install, pip \
install --prefix ...) runs like `cot run`, with the prefix writable too, but what it writes \
under the prefix does not reach the real file system while it runs: it is kept in the run's \
layer. When it succeeds, cot records a package: its name and version, its manifest (every \
file, directory and symlink with digest, mode and size, the contents in the package \
database's content store) and the trace of the run. Writes in the project (the build) are \
committed as `cot run` does; anywhere else they fail.\n\n\
Then the files are put in place: at their own paths, or under --dest (like DESTDIR). \
Conflicts stop the install before anything is written: a file or symlink that belongs to \
another package, or that exists and belongs to none (--force takes it over, and the package \
records that). The files are staged beside their destinations and renamed into place once all \
are staged, under a journal: an install interrupted at any point is rolled back or finished \
by the next cot command, so the package is installed whole or not at all.\n\n\
The installer's run is memoized like `cot run`'s, in the package database (keyed by command, \
working directory, environment and prefix): installing the same thing again with unchanged \
inputs is a substitution from the content store, nothing is built or run, also after an \
uninstall, and also into another --dest.\n\n\
The name is --name, else autoconf's PACKAGE_TARNAME (config.log, Makefile), an installed \
*.dist-info, or the directory name (foo-1.2.3); the version likewise from --version, \
PACKAGE_VERSION, an installed *.pc or *.dist-info, or the directory name; cot says when it \
cannot tell.\n\n\
Exit status: 0 when installed (or already installed); 1 when conflicts stopped it; the \
installer's own status when it failed (nothing is installed); 125 when cot itself failed.",
    after_help = "Examples:\n  \
cot install -- make install PREFIX=/usr/local\n  \
cot install --prefix /opt/foo -- sh -c './configure --prefix=/opt/foo && make && make install'\n  \
cot install --prefix /usr/local --dest /srv/image -- make install\n  \
cot install --name requests --prefix /usr/local -- pip install --prefix /usr/local requests"
)]
pub struct InstallArgs {
    /// The package's name [default: guessed, see above]
    #[arg(long)]
    name: Option<String>,

    /// The package's version [default: guessed, see above]
    #[arg(long)]
    version: Option<String>,

    /// The directory the installer installs into, whose writes make the package [default:
    /// the command's --prefix=DIR or PREFIX=DIR, else /usr/local]
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,

    /// Put the files under DIR instead of at their own paths (like DESTDIR: the prefix
    /// /usr/local goes to DIR/usr/local)
    #[arg(long, value_name = "DIR")]
    dest: Option<PathBuf>,

    /// Take over conflicting files and symlinks (of another package, or of none); recorded
    #[arg(long)]
    force: bool,

    /// Always run the installer (its trace is still recorded)
    #[arg(long)]
    no_cache: bool,

    /// Say why the installer ran or why not, on stderr
    #[arg(long)]
    explain: bool,

    #[command(flatten)]
    db: DbArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,

    /// The installer and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Remove an installed package
#[derive(Debug, Args)]
#[command(
    long_about = "Remove an installed package: exactly its files and symlinks, then the \
directories its install made that are left empty. Files changed since the install are kept \
and listed (and the package stays installed) unless --force. Journaled like an install: an \
interrupted removal is finished by the next cot command.\n\n\
Exit status: 0 when removed; 1 when files changed since the install stopped it; 125 when cot \
itself failed."
)]
pub struct UninstallArgs {
    /// The package
    name: String,

    /// Also remove files changed since the install
    #[arg(long)]
    force: bool,

    #[command(flatten)]
    db: DbArgs,
}

/// Inspect, verify and move installed packages
#[derive(Debug, Args)]
pub struct PkgArgs {
    #[command(subcommand)]
    command: PkgCommand,

    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Subcommand)]
enum PkgCommand {
    /// List the installed packages: name, version, files, where, when
    List,
    /// List the files, directories and symlinks of a package, where they are
    Files { name: String },
    /// Say which package owns each PATH (a file or symlink it installed, or a directory it
    /// made or holds files in); exit status 1 when one has none
    Owner {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check that the files of a package (of every package without NAME) are as installed;
    /// lists those changed since, and exits with status 1 if any
    Verify { name: Option<String> },
    /// Write a package, the trace that produced it and its contents to FILE (a tar archive)
    Export { name: String, file: PathBuf },
    /// Install a package from a FILE written by `cot pkg export`, every content verified by
    /// its digest first; its trace goes to the database's store, so the same `cot install`
    /// at the same place here is a substitution
    Import {
        file: PathBuf,
        /// Put the files under DIR instead of at their own paths
        #[arg(long, value_name = "DIR")]
        dest: Option<PathBuf>,
        /// Take over conflicting files and symlinks (recorded)
        #[arg(long)]
        force: bool,
    },
}

/// The prefix a command installs into, when it says: `--prefix=DIR`, `--prefix DIR`,
/// `PREFIX=DIR` or `prefix=DIR`, also inside a `sh -c` script.
fn prefix_of(command: &[OsString]) -> Option<PathBuf> {
    let words: Vec<String> = command
        .iter()
        .flat_map(|arg| {
            arg.to_string_lossy()
                .split_whitespace()
                .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for (i, word) in words.iter().enumerate() {
        for key in ["--prefix=", "PREFIX=", "prefix="] {
            if let Some(dir) = word.strip_prefix(key) {
                if dir.starts_with('/') {
                    return Some(PathBuf::from(dir));
                }
            }
        }
        if word == "--prefix" {
            if let Some(dir) = words.get(i + 1).filter(|d| d.starts_with('/')) {
                return Some(PathBuf::from(dir));
            }
        }
    }
    None
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .with_context(|| format!("{}: cannot make it absolute", path.display()))
}

pub fn install(args: InstallArgs) -> Result<u8> {
    if crate::build::client::inside_build() {
        anyhow::bail!("cot install cannot run inside a build: run it on its own");
    }
    if args.sandbox.store.is_some()
        || args.sandbox.cache.is_some()
        || args.sandbox.cache_read_only
        || args.sandbox.remote.is_some()
        || args.sandbox.remote_upload
    {
        anyhow::bail!(
            "--store, --cache and --remote are not for cot install: installers keep their \
             traces and contents in the package database (--db)"
        );
    }
    args.sandbox.check_hermetic(args.sandbox.hermetic)?;
    let db = args.db.open()?;
    let prefix = match &args.prefix {
        Some(prefix) => prefix.clone(),
        None => prefix_of(&args.command).unwrap_or_else(|| PathBuf::from("/usr/local")),
    };
    let prefix = crate::engine::canonical_or_missing(&absolute(&prefix)?)?;
    if prefix == Path::new("/") {
        anyhow::bail!(
            "--prefix cannot be / itself: give the directory the installer installs into"
        );
    }
    if args.prefix.is_none() {
        eprintln!(
            "cot: installing what the command puts under {}",
            prefix.display()
        );
    }
    let dest = args.dest.as_deref().map(absolute).transpose()?;
    if let Some(name) = &args.name {
        crate::pkg::check_name(name)?;
    }
    let rules = parse_rules(&args.sandbox.env)?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let mut env = thunk_env(std::env::vars_os(), &rules, args.sandbox.inherit_env);
    let hermetic = args.sandbox.hermetic.then(|| {
        crate::engine::env::set_var(&mut env, "HOME", crate::engine::hermetic::HOME);
        crate::engine::hermetic::ProjectView::Only {
            paths: Vec::new(),
            allow: args.sandbox.allow.clone(),
        }
    });
    let mut writable = args.sandbox.writable.clone();
    writable.push(prefix.clone());
    let thunk = Thunk {
        argv: args.command,
        env,
        cwd,
        system_root: args.sandbox.system_root,
        writable,
        hide: args.sandbox.hide,
        rootless: args.sandbox.rootless || !nix::unistd::geteuid().is_root(),
        target: None,
        net: args.sandbox.net,
        hermetic,
    };
    let request = Request {
        thunk,
        prefix,
        name: args.name,
        version: args.version,
        dest,
        force: args.force,
        check: args.sandbox.check,
        no_cache: args.no_cache,
        no_passthrough: args.sandbox.no_passthrough,
    };
    let outcome = install::install(&db, &request)?;
    let run = match &outcome {
        Outcome::Failed { run }
        | Outcome::Conflicts { run, .. }
        | Outcome::Installed { run, .. } => run,
    };
    if let Some(message) = &run.message {
        eprintln!("cot: {message}");
    }
    if args.explain {
        eprintln!("cot: {}", run.explanation);
    }
    let how = if run.ran {
        format!("ran the installer in {:.1} s", run.duration.as_secs_f64())
    } else {
        "substituted from the content store: nothing ran".to_string()
    };
    match outcome {
        Outcome::Failed { run } => {
            eprintln!(
                "cot: the installer failed (exit status {}): nothing was installed",
                run.exit_code
            );
            Ok(u8::try_from(run.exit_code).unwrap_or(u8::MAX).max(1))
        }
        Outcome::Conflicts { package, plan, .. } => {
            print_conflicts(&package, &plan.conflicts, "install");
            Ok(EXIT_REFUSED)
        }
        Outcome::Installed {
            package,
            plan,
            deleted,
            ..
        } => {
            for path in deleted {
                eprintln!(
                    "cot: warning: the installer deleted {}; it is left in place",
                    path.display()
                );
            }
            if package.version.is_none() {
                eprintln!(
                    "cot: the version of {} is unknown (give --version)",
                    package.name
                );
            }
            report_install(&package, &plan, &how);
            Ok(0)
        }
    }
}

fn print_conflicts(package: &Package, conflicts: &[Conflict], what: &str) {
    eprintln!(
        "cot: cannot {what} {}: {} path{} conflict, nothing was written:",
        package.title(),
        conflicts.len(),
        if conflicts.len() == 1 { "" } else { "s" }
    );
    for conflict in conflicts {
        eprintln!("  {}: {}", conflict.path.display(), conflict.why);
    }
    if conflicts.iter().any(|c| c.forceable) {
        eprintln!(
            "cot: --force takes over the files and symlinks (the package records what it took)"
        );
    }
}

fn report_install(package: &Package, plan: &InstallPlan, how: &str) {
    let files = package.files().count();
    let bytes: u64 = package
        .manifest
        .iter()
        .map(|e| match e.state {
            OutputState::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let place = match &package.dest {
        Some(dest) => format!(
            "{} (under {})",
            crate::pkg::show(&package.prefix),
            crate::pkg::show(dest)
        ),
        None => crate::pkg::show(&package.prefix),
    };
    for (path, why) in &plan.repaired {
        eprintln!("cot: put back {} ({why})", path.display());
    }
    for taken in &plan.taken_over {
        match &taken.from {
            Some(from) => eprintln!(
                "cot: took over {} from package {from}",
                crate::pkg::show(&taken.path)
            ),
            None => eprintln!(
                "cot: took over {}, which belonged to no package",
                crate::pkg::show(&taken.path)
            ),
        }
    }
    for (path, why) in &plan.kept {
        eprintln!(
            "cot: kept {} of the version installed before ({why} since it was installed)",
            path.display()
        );
    }
    if plan.is_noop() {
        eprintln!(
            "cot: {} is installed in {place} as it is: nothing to do ({how})",
            package.title()
        );
    } else {
        eprintln!(
            "cot: installed {} in {place}: {files} files, {} directories made, {} ({how})",
            package.title(),
            plan.journal.mkdirs.len(),
            size(bytes)
        );
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 10 << 20 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 10 << 10 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

pub fn uninstall(args: UninstallArgs) -> Result<u8> {
    let db = args.db.open()?;
    let _lock = db.lock()?;
    let package = db.installed(&args.name)?;
    let plan = apply::plan_remove(&db.packages()?, &package, args.force)?;
    if !plan.kept.is_empty() {
        eprintln!(
            "cot: cannot remove {}: {} file{} changed since the install, nothing was removed:",
            package.title(),
            plan.kept.len(),
            if plan.kept.len() == 1 { "" } else { "s" }
        );
        for (path, why) in &plan.kept {
            eprintln!("  {}: {why}", path.display());
        }
        eprintln!("cot: --force removes them too");
        return Ok(EXIT_REFUSED);
    }
    let dirs = plan.journal.rmdirs.clone();
    let files = plan.files;
    apply::apply(&db, plan.journal)?;
    let removed_dirs = dirs
        .iter()
        .filter(|d| !Path::new(std::ffi::OsStr::from_bytes(d)).exists())
        .count();
    eprintln!(
        "cot: removed {}: {files} files, {removed_dirs} directories",
        package.title()
    );
    Ok(0)
}

pub fn pkg(args: PkgArgs) -> Result<u8> {
    let db = args.db.open()?;
    match args.command {
        PkgCommand::List => {
            let packages = db.packages()?;
            if packages.is_empty() {
                eprintln!("cot: no package is installed in {}", db.root().display());
            }
            for package in packages {
                let place = match &package.dest {
                    Some(dest) => format!(
                        "{} under {}",
                        crate::pkg::show(&package.prefix),
                        crate::pkg::show(dest)
                    ),
                    None => crate::pkg::show(&package.prefix),
                };
                println!(
                    "{}\t{}\t{} files\t{place}\t{}",
                    package.name,
                    package.version.as_deref().unwrap_or("(unknown)"),
                    package.files().count(),
                    when(package.installed_ns)
                );
            }
            Ok(0)
        }
        PkgCommand::Files { name } => {
            let package = db.installed(&name)?;
            for entry in &package.manifest {
                let real = package.real(entry);
                match &entry.state {
                    OutputState::Dir { .. } => println!("{}/", real.display()),
                    OutputState::Symlink { target } => {
                        println!("{} -> {}", real.display(), crate::pkg::show(target))
                    }
                    _ => println!("{}", real.display()),
                }
            }
            Ok(0)
        }
        PkgCommand::Owner { paths } => {
            let packages = db.packages()?;
            let mut none = false;
            for path in paths {
                let path = absolute(&path)?;
                let owners = owners(&packages, &path);
                if owners.is_empty() {
                    println!("{}: no package", path.display());
                    none = true;
                } else {
                    println!("{}: {}", path.display(), owners.join(", "));
                }
            }
            Ok(if none { EXIT_REFUSED } else { 0 })
        }
        PkgCommand::Verify { name } => {
            let packages = match name {
                Some(name) => vec![db.installed(&name)?],
                None => db.packages()?,
            };
            let mut changed = 0;
            for package in &packages {
                for entry in &package.manifest {
                    let real = package.real(entry);
                    let now = status(&real, &entry.state)?;
                    if now != Status::Intact {
                        println!(
                            "{}: {}: {}",
                            package.name,
                            real.display(),
                            now.describe(entry)
                        );
                        changed += 1;
                    }
                }
            }
            let files: usize = packages.iter().map(|p| p.manifest.len()).sum();
            eprintln!(
                "cot: {} package{}, {files} paths checked, {changed} changed since installed",
                packages.len(),
                if packages.len() == 1 { "" } else { "s" }
            );
            Ok(if changed > 0 { EXIT_REFUSED } else { 0 })
        }
        PkgCommand::Export { name, file } => {
            let package = db.installed(&name)?;
            let exported = archive::export(&db, &package, &file)?;
            eprintln!(
                "cot: exported {} to {}: {} objects, {}",
                package.title(),
                file.display(),
                exported.objects,
                size(exported.bytes)
            );
            if exported.missing_trace_objects > 0 {
                eprintln!(
                    "cot: {} outputs of its trace are no longer in the content store: \
                     installing it elsewhere works, running its installer there from the \
                     trace may not",
                    exported.missing_trace_objects
                );
            }
            Ok(0)
        }
        PkgCommand::Import { file, dest, force } => {
            let dest = dest.as_deref().map(absolute).transpose()?;
            let imported = archive::import(&db, &file)?;
            eprintln!(
                "cot: {} read from {}: {} objects verified",
                imported.package.title(),
                file.display(),
                imported.objects
            );
            let (package, plan) = install::put_in_place(
                &db,
                crate::pkg::Package {
                    dest: dest.map(|d| d.as_os_str().as_bytes().to_vec()),
                    created_dirs: Vec::new(),
                    taken_over: Vec::new(),
                    installed_ns: crate::engine::memo::now_ns(),
                    ..imported.package
                },
                force,
            )?;
            if !plan.conflicts.is_empty() {
                print_conflicts(&package, &plan.conflicts, "install");
                return Ok(EXIT_REFUSED);
            }
            report_install(&package, &plan, "imported");
            Ok(0)
        }
    }
}

/// The packages owning `path`: a file or symlink they hold, or a directory they made or have
/// entries in.
fn owners(packages: &[Package], path: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for package in packages {
        let owns = package.manifest.iter().any(|e| package.real(e) == path)
            || package
                .created_dirs
                .iter()
                .any(|d| Path::new(std::ffi::OsStr::from_bytes(d)) == path);
        if owns {
            found.push(package.title());
        }
    }
    found
}

/// A time in nanoseconds since the epoch, as UTC.
fn when(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_said_by_commands() {
        let words = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            prefix_of(&words(&["make", "install", "PREFIX=/opt/bz"])),
            Some(PathBuf::from("/opt/bz"))
        );
        assert_eq!(
            prefix_of(&words(&[
                "sh",
                "-c",
                "./configure --prefix=/usr/local/x && make && make install"
            ])),
            Some(PathBuf::from("/usr/local/x"))
        );
        assert_eq!(
            prefix_of(&words(&[
                "pip", "install", "--prefix", "/opt/py", "requests"
            ])),
            Some(PathBuf::from("/opt/py"))
        );
        assert_eq!(prefix_of(&words(&["make", "install"])), None);
        assert_eq!(prefix_of(&words(&["make", "PREFIX=relative"])), None);
    }

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(when(0), "1970-01-01 00:00 UTC");
        assert_eq!(when(1_700_000_000 * 1_000_000_000), "2023-11-14 22:13 UTC");
    }
}
