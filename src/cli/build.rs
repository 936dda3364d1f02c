//! `cot build`, `cot make`, `cot status`, `cot wait`, and the build's hidden helpers
//! (`cot __thunk`, `cot __sh`, `cot __make`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use super::run::SandboxArgs;
use crate::build::coordinator::{RealWorld, Settings};
use crate::build::engine::{self, Build, Mode, Options, Outcome, Resolved, State};
use crate::build::lint;
use crate::build::progress::{Progress, Verbosity};
use crate::build::report::{self, BuildReport, ThunkReport, ThunkState};
use crate::engine::env::{parse_rules, set_var, thunk_env};
use crate::engine::key::Paths;
use crate::engine::observe::CheckMode;
use crate::store::model::{StorePath, ThunkKey};

/// The build script `cot build` runs when given none.
pub const DEFAULT_SCRIPT: &str = "./Cotfile";

/// The project's settings file.
pub const CONFIG_FILE: &str = "cot.toml";

/// Where the last build's root is remembered, for `cot status`.
const LAST_BUILD: &str = "last-build";

/// Options shared by `cot build` and `cot make`.
#[derive(Debug, Args, Clone)]
pub struct BuildOptions {
    /// Run up to N thunks at once [default: the number of processors, or `jobs` in cot.toml]
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,

    /// Keep going after a thunk fails. A failed thunk's requester decides what follows (make
    /// stops unless -k, which `cot make` passes on; a script checks the status); replaying a
    /// thunk whose child now fails, cot first decides its other children with -k, else goes
    /// straight to running the requester again
    #[arg(short, long)]
    keep_going: bool,

    /// Print what would run and why; run nothing, change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,

    /// Run nothing; exit 0 when everything is up to date, 1 when something would run
    #[arg(short, long)]
    question: bool,

    /// Run thunks whose command (or make target) matches GLOB even if up to date; `-B` alone
    /// runs every thunk (`*` matches anything, spaces and slashes included)
    #[arg(short = 'B', long = "rebuild", value_name = "GLOB", num_args = 0..=1,
          default_missing_value = "*", require_equals = true)]
    rebuild: Vec<String>,

    /// Do not run thunks whose command (or make target) matches GLOB this time: reuse their
    /// last results as they are (repeatable)
    #[arg(long, value_name = "GLOB")]
    skip: Vec<String>,

    /// Accept the current inputs as up to date: record them without running what changed
    #[arg(short, long)]
    touch: bool,

    /// Change to DIR before doing anything (the project is found from there)
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    directory: Option<PathBuf>,

    /// Say why each thunk ran or was reused, on stderr
    #[arg(long)]
    explain: bool,

    /// Print every command that runs, with its time
    #[arg(short, long, conflicts_with = "quiet")]
    verbose: bool,

    /// Print only failures
    #[arg(long)]
    quiet: bool,

    /// Write a report of every thunk: FILE.json (timings, states, reasons), FILE.trace
    /// (Chrome trace-event format, for Perfetto) or FILE.html (the thunk tree with inputs and
    /// outputs)
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,

    /// Restore PATH from the content store when it is damaged or missing (never materialized,
    /// as in a fresh checkout sharing the stores), even if no thunk that runs needs it; a
    /// directory with everything under it, and the directories on the way (repeatable)
    #[arg(long, value_name = "PATH")]
    want: Vec<PathBuf>,

    /// Keep the outputs of thunks no longer requested (by default they are deleted)
    #[arg(long)]
    keep_stale: bool,

    /// After the build, report what its traces say is wrong with the build description:
    /// undeclared inputs and outputs, races, time travel, overwritten inputs (see `cot lint
    /// --help`); `--lint=error` also makes the build fail when anything is found
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1,
          default_missing_value = "warn", require_equals = true)]
    lint: Option<LintMode>,

    /// How --lint reports: text on stderr, or one JSON document on stdout
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LintFormat::Text)]
    lint_format: LintFormat,

    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LintMode {
    /// Report findings; the exit status is the build's
    Warn,
    /// Report findings and exit 1 when there are any
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LintFormat {
    Text,
    Json,
}

/// Run a build script as the root thunk; every `cot run` inside it is a thunk of the build
#[derive(Debug, Args)]
#[command(
    long_about = "Run a build script as the root thunk of a build.\n\n\
The script is any executable (default ./Cotfile). Inside it, and inside anything it runs, \
`cot run -- CMD` asks the build to run CMD as a child thunk and waits for it; `cot run --bg -- \
CMD` starts one without waiting and `cot wait` waits for all started ones. cot re-runs only \
what changed: a thunk whose recorded inputs still hold is not executed, its outputs are put back \
if needed and the child thunks it requested are decided the same way, in the order it requested \
them.\n\n\
Outputs that were deleted or changed by hand are restored when the build produces them for \
nobody else (its products) or when a thunk that runs needs them; otherwise they are reported as \
damaged. Outputs of thunks that are no longer requested are deleted at the end (--keep-stale \
keeps them).\n\n\
Defaults can be set in cot.toml at the project root: jobs, hide, writable, env, ignore, \
hermetic (true or false), allow, [lint] ignore, and [cache] dir, read_only, remote, \
remote_upload, remote_timeout (the caches shared with other checkouts: --cache, \
--cache-read-only, --remote, --remote-upload, --remote-timeout).\n\n\
With --hermetic (or `hermetic = true`) the script sees the whole project, and each child thunk \
only the project's directories and the files --allow names (see `cot run --help`).\n\n\
Exit status: 0 success; 1 a thunk failed (or, with -q, something would run); 2 usage error; \
125 cot itself failed; 130 interrupted.",
    after_help = "Examples:\n  cot build\n  cot build -j8 --report build.html ./ci/build.sh release\n  \
cot build -n --explain"
)]
pub struct BuildArgs {
    #[command(flatten)]
    options: BuildOptions,

    /// The build script and its arguments [default: ./Cotfile]
    #[arg(trailing_var_arg = true, value_name = "SCRIPT")]
    script: Vec<OsString>,
}

/// Run GNU make with every recipe line as a thunk of a build
#[derive(Debug, clap::Parser)]
#[command(
    name = "cot make",
    long_about = "Run GNU make as the root thunk of a build, every recipe line as a child thunk \
(make's SHELL is cot, recipes run with /bin/sh).\n\n\
make is asked to request every recipe (-B, after it has remade its makefiles exactly as plain \
make would), and cot's traces decide which actually run: an incremental build is right even when \
the Makefile's prerequisites are incomplete. cot's options come first; everything from the first \
argument cot does not know on goes to make (`cot make -j4 all CFLAGS=-O2`). -j, -k and -C apply \
to both cot and make.\n\n\
With --hermetic (or `hermetic = true` in cot.toml) make sees the whole project, and each recipe \
line only the project's directories, its target, its prerequisites and what --allow names: a \
recipe that reads a file it did not declare fails, and cot names the file. A recipe line that \
runs $(MAKE) sees the whole project; its own recipes are hermetic again.",
    after_help = "Examples:\n  cot make\n  cot make -j8 all\n  cot make --report make.html -C src check"
)]
pub struct MakeArgs {
    #[command(flatten)]
    options: BuildOptions,

    /// Arguments for make: targets, variables, make's own options
    #[arg(value_name = "MAKE ARGS")]
    make_args: Vec<OsString>,
}

/// cot's options that take a value, as `cot make` must know them to tell where make's
/// arguments begin.
const VALUE_OPTIONS: [&str; 20] = [
    "--remote",
    "--remote-timeout",
    "-j",
    "--lint",
    "--lint-format",
    "-C",
    "--jobs",
    "--skip",
    "--directory",
    "--report",
    "--want",
    "--env",
    "--writable",
    "--hide",
    "--allow",
    "--system-root",
    "--check",
    "--store",
    "--cache",
    "--rebuild",
];

/// cot's options without a value.
const FLAG_OPTIONS: [&str; 27] = [
    "--lint",
    "--cache-read-only",
    "--remote-upload",
    "-k",
    "-n",
    "-q",
    "-B",
    "-t",
    "-v",
    "-h",
    "--keep-going",
    "--dry-run",
    "--question",
    "--touch",
    "--explain",
    "--verbose",
    "--quiet",
    "--keep-stale",
    "--inherit-env",
    "--hermetic",
    "--net",
    "--rootless",
    "--no-passthrough",
    "--help",
    "-kn",
    "-nk",
    "--rebuild",
];

/// Splits `cot make` arguments: cot's options first, everything from the first argument cot
/// does not know (or after `--`) goes to make.
pub fn split_make_args(args: &[OsString]) -> (Vec<OsString>, Vec<OsString>) {
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if arg == "--" {
            return (args[..i].to_vec(), args[i + 1..].to_vec());
        }
        let name = arg.split('=').next().unwrap_or("");
        let short_with_value = ["-j", "-C"]
            .iter()
            .any(|o| arg.starts_with(o) && arg.len() > 2);
        if FLAG_OPTIONS.contains(&arg.as_ref())
            || short_with_value
            || arg.contains('=') && VALUE_OPTIONS.contains(&name)
        {
            i += 1;
        } else if VALUE_OPTIONS.contains(&arg.as_ref()) {
            i += 2;
        } else {
            break;
        }
    }
    let i = i.min(args.len());
    (args[..i].to_vec(), args[i..].to_vec())
}

/// `cot make ARGS`, parsed by hand: clap cannot stop at the first argument it does not know.
pub fn make_main(args: Vec<OsString>) -> Result<u8> {
    use clap::Parser;
    let (ours, theirs) = split_make_args(&args);
    let mut argv: Vec<OsString> = vec!["cot make".into()];
    argv.extend(ours);
    let mut parsed = match MakeArgs::try_parse_from(argv) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    parsed.make_args.extend(theirs);
    make(parsed)
}

/// Show the state of every thunk of the last build, without running anything
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Change to DIR first
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    directory: Option<PathBuf>,

    /// List every thunk, clean ones too
    #[arg(short, long)]
    all: bool,
}

/// Report what the last build's traces say is wrong with its description, without building
#[derive(Debug, Args)]
#[command(
    long_about = "Report what the last build's traces say is wrong with the build description \
(its Cotfile, or its Makefile under `cot make`), without building. `cot build --lint` and `cot \
make --lint` do the same after building.\n\n\
Findings, each naming the thunk (its command and, under make, its target), the path and the other \
thunk involved:\n\
- undeclared input: a thunk read a file another thunk of the build writes, and nothing orders it \
after that writer (under make: a recipe read a project file its target does not depend on, \
directly or through other rules);\n\
- undeclared output: a recipe wrote a file other than its target (or what lies under a target \
that is a directory);\n\
- race: two thunks that nothing orders both write a path, or one writes what the other reads;\n\
- time travel: a thunk read a file that a step ordered after it (or itself) writes: as an \
earlier build left it, or made first on demand;\n\
- input overwritten: a thunk wrote a source file of the build.\n\n\
Ordered means guaranteed by the build: a child whose result its parent had before requesting \
another; under make, a target among another's prerequisites ($^ and $|, transitively, and what \
the dependency files make includes list). A rule whose recipe makes no file of its name (phony) \
runs every time: its reads need not be declared. Reads are reads of contents, links and failed \
lookups. Paths outside the project that say nothing about the build are \
ignored: /proc, /sys, /dev, /run, /tmp, /var/tmp, /var/cache, the loader cache, locales, \
/etc/{localtime,resolv.conf,nsswitch.conf,hosts,passwd,group}, __pycache__; add globs in \
cot.toml: `[lint]` `ignore = [\"gen/*.log\"]` (relative globs are relative to the project root; \
the top-level `ignore` list counts too).\n\n\
Exit status: 0; with --error, 1 when anything is found; 125 when cot failed.",
    after_help = "Examples:\n  cot make --lint\n  cot lint --format json\n  cot build --lint=error"
)]
pub struct LintArgs {
    /// Change to DIR first
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    directory: Option<PathBuf>,

    /// Text on stderr, or one JSON document on stdout
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LintFormat::Text)]
    format: LintFormat,

    /// Exit 1 when anything is found
    #[arg(long)]
    error: bool,
}

/// Inside a build: wait for the thunks started with `cot run --bg`
#[derive(Debug, Args)]
pub struct WaitArgs {}

/// Settings from cot.toml.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    jobs: Option<usize>,
    #[serde(default)]
    hide: Vec<String>,
    #[serde(default)]
    writable: Vec<PathBuf>,
    /// Variables passed to the root thunk (NAME or NAME=VALUE).
    #[serde(default)]
    env: Vec<String>,
    /// Input paths (globs) whose changes never make a thunk run.
    #[serde(default)]
    ignore: Vec<String>,
    /// `--hermetic` for every build of the project.
    #[serde(default)]
    hermetic: bool,
    /// Globs of the project's files every hermetic thunk sees (`--allow`).
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    lint: LintConfig,
    #[serde(default)]
    cache: CacheConfig,
}

/// `[cache]` in cot.toml: the caches beyond the project's store (`--cache`,
/// `--cache-read-only`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The shared cache directory (relative to the project root, or absolute).
    pub dir: Option<PathBuf>,
    /// Never write to it.
    #[serde(default)]
    pub read_only: bool,
    /// The remote cache, `grpc://HOST:PORT[/INSTANCE]`.
    pub remote: Option<String>,
    /// Write to the remote cache too.
    #[serde(default)]
    pub remote_upload: bool,
    /// The deadline of one call to the remote cache, in seconds.
    pub remote_timeout: Option<f64>,
}

/// cot.toml's `[cache]` of the project at `root` (empty when there is no cot.toml).
pub fn cache_config(root: &Path) -> Result<CacheConfig> {
    Ok(load_config(root)?.cache)
}

/// `[lint]` in cot.toml.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LintConfig {
    /// Paths (globs) the lint never reports, besides its defaults.
    #[serde(default)]
    ignore: Vec<String>,
}

fn load_config(root: &Path) -> Result<Config> {
    let path = root.join(CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn build(args: BuildArgs) -> Result<u8> {
    let mut script = args.script;
    if script.is_empty() {
        script.push(DEFAULT_SCRIPT.into());
    }
    let program = PathBuf::from(&script[0]);
    let dir = args.options.directory.clone().unwrap_or_else(|| ".".into());
    if program.components().count() > 1 && !dir.join(&program).exists() {
        bail!(
            "no build script {} in {} (write one, e.g. `#!/bin/sh` then `cot run -- cc -c a.c`, \
             or name another)",
            program.display(),
            dir.display()
        );
    }
    start(args.options, script, "cot build")
}

pub fn make(args: MakeArgs) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find cot's own executable")?;
    let mut argv: Vec<OsString> = vec![exe.into_os_string(), "__make".into()];
    if args.options.keep_going {
        argv.push("-k".into());
    }
    // cot says what runs; make would echo every recipe it requests, most of them reused.
    if !args.options.verbose {
        argv.push("-s".into());
    }
    argv.extend(args.make_args);
    start(args.options, argv, "cot make")
}

/// Runs a build whose root thunk runs `argv`.
fn start(options: BuildOptions, argv: Vec<OsString>, name: &str) -> Result<u8> {
    if crate::build::client::inside_build() {
        bail!("{name} cannot run inside a thunk of a build; use `cot run -- CMD` there");
    }
    if let Some(dir) = &options.directory {
        std::env::set_current_dir(dir)
            .with_context(|| format!("cannot change to directory {}", dir.display()))?;
    }
    if let Some(path) = &options.report {
        report::check_path(path)?;
    }
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let project_root = crate::engine::project::find_root(&cwd);
    let config = load_config(&project_root)?;
    let jobs = options
        .jobs
        .or(config.jobs)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut env_args = options.sandbox.env.clone();
    env_args.extend(config.env.iter().map(OsString::from));
    let rules = parse_rules(&env_args)?;
    let hermetic = options.sandbox.hermetic || config.hermetic;
    options.sandbox.check_hermetic(hermetic)?;
    let mut allow = config.allow.clone();
    allow.extend(options.sandbox.allow.clone());
    let mut hide = config.hide.clone();
    hide.extend(options.sandbox.hide.clone());
    let mut writable: Vec<PathBuf> = config
        .writable
        .iter()
        .map(|w| project_root.join(w))
        .collect();
    writable.extend(options.sandbox.writable.clone());
    let rootless = options.sandbox.rootless || !nix::unistd::geteuid().is_root();
    let memo_options = crate::engine::memo::MemoOptions {
        store: options.sandbox.store.clone(),
        cas: None,
        caches: options.sandbox.cache_options(&project_root)?,
        check: options.sandbox.check,
        no_cache: false,
        cache_failures: false,
    };
    // Layers of runs that died are settled before anything is decided from the files.
    crate::engine::project::recover_dead_layers(&project_root);
    let (store, cas) = crate::engine::memo::store_dirs(&project_root, &memo_options);
    let settings = Settings {
        project_root: project_root.clone(),
        system_root: options.sandbox.system_root.clone(),
        writable,
        hide,
        rootless,
        store,
        cas,
        caches: memo_options.caches.clone(),
        check: options.sandbox.check,
        no_passthrough: options.sandbox.no_passthrough,
        jobs,
        ignore: crate::build::globs(&config.ignore)?,
        make_shell: name == "cot make",
        hermetic,
        allow,
        net: options.sandbox.net,
    };
    let verbosity = if options.quiet || options.question {
        Verbosity::Quiet
    } else if options.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let world = Arc::new(RealWorld::new(settings, Progress::from_env(verbosity))?);
    // A build's environment is every thunk's (children inherit it, and it is part of their
    // names): TERM, which changes with the terminal, is left out unless asked for (--env TERM).
    let caller = std::env::vars_os().filter(|(name, _)| {
        name != "TERM"
            || options.sandbox.inherit_env
            || options.sandbox.env.iter().any(|e| e == "TERM")
    });
    let mut env = thunk_env(caller, &rules, options.sandbox.inherit_env);
    if hermetic {
        set_var(&mut env, "HOME", crate::engine::hermetic::HOME);
    }
    let key = world.root_key(argv, env, cwd.clone());
    remember(&project_root, &key);

    let mode = if options.dry_run || options.question {
        Mode::DryRun
    } else if options.touch {
        Mode::Touch
    } else {
        Mode::Build
    };
    let paths = Paths::new(&project_root);
    let engine_options = Options {
        jobs,
        keep_going: options.keep_going,
        mode,
        rebuild: if options.rebuild.is_empty() {
            None
        } else {
            Some(crate::build::globs(&options.rebuild)?)
        },
        skip: if options.skip.is_empty() {
            None
        } else {
            Some(crate::build::globs(&options.skip)?)
        },
        keep_stale: options.keep_stale,
        want: options
            .want
            .iter()
            .map(|w| paths.to_store(&cwd.join(w)))
            .collect(),
        detail: options.report.is_some() || options.explain,
    };
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let started = Instant::now();
    let signals = block_signals()?;
    {
        let world = world.clone();
        std::thread::spawn(move || {
            while let Ok(signal) = signals.wait() {
                world.interrupt(signal);
            }
        });
    }
    let build = Build::new(world.clone(), engine_options);
    let outcome = build.run(key.clone());
    // What ran is in the caches before the build ends, whatever its outcome.
    world.finish_exports();
    let outcome = outcome?;
    world.progress().done();

    if options.dry_run || options.explain {
        if let Some(path) = &outcome.first_change {
            eprintln!(
                "cot: deciding every thunk: {} changed since the last build",
                paths.to_view(path).display()
            );
        }
        print_decisions(&outcome, options.dry_run, options.explain);
    }
    if !options.question {
        summarize(&outcome, &paths);
    }
    let mut lint_failed = false;
    if let Some(mode) = options.lint {
        if options.dry_run || options.question {
            eprintln!("cot: lint: nothing built, nothing linted (`cot lint` reads the last build)");
        } else {
            let found = report_lint(&world, &key, &project_root, options.lint_format)?;
            lint_failed = mode == LintMode::Error && found > 0;
        }
    }
    if let Some(path) = &options.report {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let report = build_report(
            &outcome,
            command,
            &project_root,
            started_unix_ms,
            started.elapsed(),
            jobs,
        );
        report::write(&report, path)?;
    }
    Ok(if options.question {
        u8::from(outcome.would_run)
    } else if outcome.interrupted {
        130
    } else if outcome
        .thunks
        .iter()
        .any(|t| t.reason.starts_with("cot failed"))
    {
        crate::cli::EXIT_COT_FAILED
    } else if outcome.exit_code != 0 || lint_failed {
        1
    } else {
        0
    })
}

/// Blocks the termination signals in every thread (the threads started later inherit the
/// mask) so that one thread can receive them and end the build cleanly.
fn block_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().context("cannot block signals")?;
    Ok(set)
}

/// The last build of the project around DIR (or the working directory): the project root,
/// the root thunk's key and a world to look at it through.
fn open_last_build(dir: Option<&Path>) -> Result<(PathBuf, ThunkKey, Arc<RealWorld>)> {
    if let Some(dir) = dir {
        std::env::set_current_dir(dir)
            .with_context(|| format!("cannot change to directory {}", dir.display()))?;
    }
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let project_root = crate::engine::project::find_root(&cwd);
    let last = project_root
        .join(crate::engine::project::STATE_DIR)
        .join(LAST_BUILD);
    let bytes = std::fs::read(&last).map_err(|_| {
        anyhow::anyhow!(
            "no build recorded in {} ({} is missing): run `cot build` or `cot make` first",
            project_root.display(),
            last.display()
        )
    })?;
    let key: ThunkKey = postcard::from_bytes(&bytes)
        .with_context(|| format!("{} is not a build record", last.display()))?;
    let config = load_config(&project_root)?;
    let memo_options = crate::engine::memo::MemoOptions {
        store: None,
        cas: None,
        caches: Default::default(),
        check: CheckMode::MtimeThenDigest,
        no_cache: false,
        cache_failures: false,
    };
    let (store, cas) = crate::engine::memo::store_dirs(&project_root, &memo_options);
    let settings = Settings {
        project_root: project_root.clone(),
        system_root: PathBuf::from(std::ffi::OsStr::new(
            std::str::from_utf8(&key.system_root).unwrap_or("/"),
        )),
        writable: Vec::new(),
        hide: config.hide.clone(),
        rootless: !nix::unistd::geteuid().is_root(),
        store,
        cas,
        caches: Default::default(),
        check: CheckMode::MtimeThenDigest,
        no_passthrough: false,
        jobs: 1,
        ignore: crate::build::globs(&config.ignore)?,
        make_shell: false,
        // As the last build was: its root's key says whether it was hermetic.
        hermetic: crate::engine::key::isolation(&key.options, &Paths::new(&project_root))
            .0
            .is_some(),
        allow: config.allow.clone(),
        net: false,
    };
    let world = Arc::new(RealWorld::new(
        settings,
        Progress::from_env(Verbosity::Quiet),
    )?);
    Ok((project_root, key, world))
}

/// `cot lint`: the last build's findings.
pub fn lint(args: LintArgs) -> Result<u8> {
    let (project_root, key, world) = open_last_build(args.directory.as_deref())?;
    let count = report_lint(&world, &key, &project_root, args.format)?;
    Ok(u8::from(args.error && count > 0))
}

/// Lints the recorded build of `root` and prints its findings; returns how many there are.
fn report_lint(
    world: &Arc<RealWorld>,
    root: &ThunkKey,
    project_root: &Path,
    format: LintFormat,
) -> Result<usize> {
    let config = load_config(project_root)?;
    let paths = Paths::new(project_root);
    let inputs = crate::build::globs(&config.ignore)?;
    let ignore = lint::Ignore::new(&config.lint.ignore, Some((inputs, paths.clone())))?;
    let thunks = lint::load(world, &engine::root_id(root))?;
    let produced = |digest: &crate::store::model::Digest| world.cas().contains(digest);
    let findings = lint::lint(
        &thunks,
        &lint::LintContext {
            paths: &paths,
            ignore: &ignore,
            produced: &produced,
            content: &|digest| world.cas().read(digest).ok(),
        },
    );
    match format {
        LintFormat::Text => eprint!("{}", lint::render_text(&findings)),
        LintFormat::Json => print!("{}", lint::render_json(&findings)),
    }
    Ok(findings.len())
}

/// Keeps the root thunk's key, for `cot status`.
fn remember(project_root: &Path, key: &ThunkKey) {
    let dir = project_root.join(crate::engine::project::STATE_DIR);
    if std::fs::create_dir_all(&dir).is_ok() {
        if let Ok(bytes) = postcard::to_stdvec(key) {
            let _ = std::fs::write(dir.join(LAST_BUILD), bytes);
        }
    }
}

fn print_decisions(outcome: &Outcome, dry_run: bool, explain: bool) {
    for thunk in &outcome.thunks {
        let ran = thunk.ran || thunk.reason.starts_with("would run");
        if (dry_run && !ran && !explain) || thunk.state == State::Stale && !explain {
            continue;
        }
        eprintln!("cot: {}: {}", describe(thunk), thunk.reason);
    }
}

fn describe(thunk: &Resolved) -> String {
    let command = engine::command_of(&thunk.key);
    match engine::target_of(&thunk.key) {
        Some(target) => format!("{target} ({command})"),
        None => command,
    }
}

fn summarize(outcome: &Outcome, paths: &Paths) {
    let show = |p: &StorePath| paths.to_view(p).display().to_string();
    for path in &outcome.damaged {
        eprintln!(
            "cot: damaged: {} is not as the build left it; left alone (nothing that ran needed it; \
             --want restores it)",
            show(path)
        );
    }
    let ran = outcome.thunks.iter().filter(|t| t.ran).count();
    let failed = outcome
        .thunks
        .iter()
        .filter(|t| t.state == State::Failed)
        .count();
    if outcome.unchanged {
        eprintln!("cot: nothing to do: no input changed since the last build");
    } else if ran == 0 && failed == 0 && !outcome.would_run {
        eprintln!(
            "cot: nothing to do: {} thunks up to date",
            outcome
                .thunks
                .iter()
                .filter(|t| t.state != State::Stale)
                .count()
        );
    }
    if !outcome.restored.is_empty() {
        eprintln!(
            "cot: restored {} outputs from the content store",
            outcome.restored.len()
        );
    }
    if !outcome.removed.is_empty() {
        eprintln!(
            "cot: deleted {} outputs of stale thunks",
            outcome.removed.len()
        );
    }
    if outcome.interrupted {
        eprintln!("cot: interrupted; what was running was stopped and nothing of it committed");
    } else if failed > 0 {
        eprintln!("cot: {failed} thunks failed");
    }
}

fn state_of(state: State) -> ThunkState {
    match state {
        State::New => ThunkState::New,
        State::Dirty => ThunkState::Dirty,
        State::Clean => ThunkState::Clean,
        State::Damaged => ThunkState::Damaged,
        State::Stale => ThunkState::Stale,
        State::Skipped => ThunkState::Skipped,
        State::Failed => ThunkState::Failed,
    }
}

fn build_report(
    outcome: &Outcome,
    command: String,
    project_root: &Path,
    started_unix_ms: u64,
    duration: std::time::Duration,
    jobs: usize,
) -> BuildReport {
    let hex = |id: &[u8; 32]| crate::store::hex(id);
    let show = engine::display_path;
    BuildReport {
        command,
        project: project_root.display().to_string(),
        started_unix_ms,
        duration_ms: duration.as_secs_f64() * 1000.0,
        jobs,
        exit_code: outcome.exit_code,
        thunks: outcome
            .thunks
            .iter()
            .map(|t| ThunkReport {
                id: hex(&t.id),
                parent: t
                    .parent
                    .filter(|p| *p != engine::ROOT_PARENT)
                    .map(|p| hex(&p)),
                command: engine::command_of(&t.key),
                target: engine::target_of(&t.key),
                cwd: show(&t.key.cwd),
                state: state_of(t.state),
                reason: t.reason.clone(),
                ran: t.ran,
                exit_code: t.trace.as_ref().map(|_| t.exit_code),
                start_ms: t.started.as_secs_f64() * 1000.0,
                duration_ms: t.duration.as_secs_f64() * 1000.0,
                inputs: t
                    .trace
                    .as_ref()
                    .map(|tr| tr.inputs.iter().map(|i| show(&i.path)).collect())
                    .unwrap_or_default(),
                outputs: t
                    .trace
                    .as_ref()
                    .map(|tr| tr.outputs.iter().map(|o| show(&o.path)).collect())
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn status(args: StatusArgs) -> Result<u8> {
    let (project_root, key, world) = open_last_build(args.directory.as_deref())?;
    let build = Build::new(
        world,
        Options {
            mode: Mode::DryRun,
            detail: args.all,
            ..Options::default()
        },
    );
    let mut key = key;
    key.parent = None;
    let outcome = build.run(key)?;
    let paths = Paths::new(&project_root);
    if outcome.unchanged {
        println!("up to date: no input changed since the last build");
        for thunk in &outcome.thunks {
            println!("{:<8} {}", thunk.state.name(), describe(thunk));
        }
        for path in &outcome.damaged {
            println!("damaged  {}", paths.to_view(path).display());
        }
        return Ok(0);
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for thunk in &outcome.thunks {
        *counts.entry(thunk.state.name()).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!("{}", summary.join(", "));
    for thunk in &outcome.thunks {
        if thunk.state != State::Clean || args.all {
            println!(
                "{:<8} {}: {}",
                thunk.state.name(),
                describe(thunk),
                thunk.reason
            );
        }
    }
    for path in &outcome.damaged {
        println!("damaged  {}", paths.to_view(path).display());
    }
    Ok(0)
}

pub fn wait(_args: WaitArgs) -> Result<u8> {
    if !crate::build::client::inside_build() {
        bail!("cot wait works inside a thunk of a build (`cot build`), where `cot run --bg` started thunks");
    }
    crate::build::client::wait()
}

/// `cot __make ARGS`: the root thunk of `cot make`, and make's `$(MAKE)` inside it.
pub fn make_driver(args: Vec<OsString>) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find cot's own executable")?;
    let jobs = std::env::var(crate::build::coordinator::JOBS_ENV)
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let code = crate::build::make::drive(&args, &exe, jobs)?;
    Ok(u8::try_from(code).unwrap_or(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn make_args_start_after_cots_options_and_their_values() {
        let (ours, theirs) = split_make_args(&words(&[
            "--hermetic",
            "--allow",
            "*.h",
            "--net",
            "--allow=src/**",
            "-j4",
            "all",
            "--allow",
        ]));
        assert_eq!(
            ours,
            words(&[
                "--hermetic",
                "--allow",
                "*.h",
                "--net",
                "--allow=src/**",
                "-j4"
            ])
        );
        assert_eq!(theirs, words(&["all", "--allow"]));
    }

    #[test]
    fn cot_toml_names_the_caches() {
        let config: Config = toml::from_str(
            "jobs = 2\n[cache]\ndir = \"../cache\"\nread_only = true\n\
             remote = \"grpc://127.0.0.1:9092\"\nremote_upload = true\nremote_timeout = 2.5\n",
        )
        .unwrap();
        assert_eq!(config.cache.dir.as_deref(), Some(Path::new("../cache")));
        assert!(config.cache.read_only && config.cache.remote_upload);
        assert_eq!(
            config.cache.remote.as_deref(),
            Some("grpc://127.0.0.1:9092")
        );
        assert_eq!(config.cache.remote_timeout, Some(2.5));
        assert!(toml::from_str::<Config>("[cache]\nremote-upload = true\n").is_err());
    }

    #[test]
    fn every_option_of_cot_make_is_known_to_the_split() {
        use clap::CommandFactory;
        for arg in MakeArgs::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let long = format!("--{long}");
            let takes_value = arg.get_action().takes_values();
            let known = if takes_value {
                VALUE_OPTIONS.contains(&long.as_str())
            } else {
                FLAG_OPTIONS.contains(&long.as_str())
            };
            assert!(
                known,
                "{long} is missing from the options split_make_args knows"
            );
        }
    }
}
