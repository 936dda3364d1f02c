//! Running GNU make for `cot make`.
//!
//! `cot make [MAKE ARGS]` runs GNU make as the root thunk of a build, and every recipe line as a
//! child thunk: make's `SHELL` is cot itself (`SHELL=<cot>`, `.SHELLFLAGS=__sh --target $@ -c`,
//! so a line runs as `<cot> __sh --target TARGET -c 'LINE'`) and a recursive `$(MAKE)` is this
//! same driver (`MAKE=<cot> __make`). See [`shell_overrides`].
//!
//! cot wants make to *request every recipe*, so that cot's own traces decide what actually
//! executes (an incremental build is then right even when the makefile's prerequisites are
//! incomplete): make runs with `-B`. But `-B` also forces the remaking of the makefiles
//! themselves (a `Makefile: Makefile.in` rule runs even when `Makefile` is newer), which in an
//! autotools tree reruns config.status, autoconf or automake where plain make would not. So
//! [`drive`] runs make twice:
//!
//! - Phase 0 remakes the makefiles with plain make's semantics: the caller's arguments without
//!   their goals and without `-B`, and a goal of ours, `.cot-makefiles`, whose recipe writes
//!   `$(MAKEFILE_LIST)` to a private file with `$(file ...)` and expands to nothing, so no
//!   shell runs for it:
//!
//!   ```text
//!   make -q -jN '--eval=.PHONY: .cot-makefiles' \
//!        '--eval=.cot-makefiles: ; +$(file >DIR/makefiles,$(MAKEFILE_LIST))' \
//!        ARGS-WITHOUT-GOALS SHELL=COT '.SHELLFLAGS=__sh --target $@ -c' 'MAKE=COT __make' \
//!        .cot-makefiles
//!   ```
//!
//!   make reads the makefiles, remakes the out-of-date ones exactly as plain make would
//!   (`-q` does not apply to remaking makefiles; make restarts itself when one changed), then
//!   "updates" the goal. `-q` keeps make from saying "Nothing to be done for '.cot-makefiles'"
//!   (it never prints that message under `-q`), the `+` makes the recipe expand under `-t` as
//!   well, and `.PHONY` keeps `-t` from creating the file. make prints "Entering directory"
//!   lazily, before its first output: a phase 0 that remakes nothing prints nothing at all,
//!   and one that does has its output framed by those lines, as it should.
//! - Phase 1 builds: `make -B -jN -o F... ARGS SHELL=... .SHELLFLAGS=... MAKE=...`, with one
//!   `-o F` per makefile F that phase 0 recorded, so that `-B` does not remake them.
//!
//! Between the two, inside a build, the driver lists make's rules to the build ([`list_rules`]):
//! a recipe that looks up a file another rule makes, before make has run that rule (a missing
//! prerequisite under `-j`), gets it made on demand by this same driver with that target.
//!
//! `-jN` comes from the `jobs` argument unless the caller's arguments have a `-j`. The
//! driver's overrides come last so that they win over the caller's.
//!
//! A driver started by a recursive `$(MAKE)` inherits the parent make's `MAKEFLAGS`, which
//! carries `B` and the jobserver's descriptors; both phases get it through
//! [`sanitize_makeflags`].

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The program run, searched in `PATH`.
const MAKE: &str = "make";

/// The goal of phase 0. A name starting with `.` is never make's default goal.
const RECORD_GOAL: &str = ".cot-makefiles";

/// The goal of the run that prints make's data base for [`list_rules`].
const RULES_GOAL: &str = ".cot-rules";

/// The variables through which make reads its flags from the environment.
const FLAG_VARIABLES: [&str; 2] = ["MAKEFLAGS", "GNUMAKEFLAGS"];

/// How an option of GNU make takes an argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Takes {
    Nothing,
    /// Attached (`-Cdir`, `--directory=dir`) or the next word.
    Required,
    /// Attached, or the next word when it reads as a number (`-j 4`; make's own rule).
    Number,
    /// Attached only (`-Otarget`, `--debug=b`).
    Attached,
}

/// An option of GNU make, by its short letter when it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Short(u8),
    Long(&'static str),
    /// Not an option of GNU make 4.3 or 4.4: make will complain itself.
    Unknown,
}

/// The short options of GNU make 4.3 (and 4.4, which adds none).
fn short_option(letter: u8) -> Option<Takes> {
    match letter {
        b'b' | b'B' | b'd' | b'e' | b'h' | b'i' | b'k' | b'L' | b'm' | b'n' | b'p' | b'q'
        | b'r' | b'R' | b's' | b'S' | b't' | b'v' | b'w' => Some(Takes::Nothing),
        b'C' | b'E' | b'f' | b'I' | b'o' | b'W' => Some(Takes::Required),
        b'j' | b'l' => Some(Takes::Number),
        b'O' => Some(Takes::Attached),
        _ => None,
    }
}

/// The long options of GNU make 4.3 and 4.4, with the short option each stands for.
const LONG_OPTIONS: &[(&str, Opt, Takes)] = &[
    ("always-make", Opt::Short(b'B'), Takes::Nothing),
    ("assume-new", Opt::Short(b'W'), Takes::Required),
    ("assume-old", Opt::Short(b'o'), Takes::Required),
    ("check-symlink-times", Opt::Short(b'L'), Takes::Nothing),
    ("debug", Opt::Long("debug"), Takes::Attached),
    ("directory", Opt::Short(b'C'), Takes::Required),
    ("dry-run", Opt::Short(b'n'), Takes::Nothing),
    ("environment-overrides", Opt::Short(b'e'), Takes::Nothing),
    ("eval", Opt::Short(b'E'), Takes::Required),
    ("file", Opt::Short(b'f'), Takes::Required),
    ("help", Opt::Short(b'h'), Takes::Nothing),
    ("ignore-errors", Opt::Short(b'i'), Takes::Nothing),
    ("include-dir", Opt::Short(b'I'), Takes::Required),
    ("jobs", Opt::Short(b'j'), Takes::Number),
    (
        "jobserver-auth",
        Opt::Long("jobserver-auth"),
        Takes::Required,
    ),
    ("jobserver-fds", Opt::Long("jobserver-fds"), Takes::Required),
    (
        "jobserver-style",
        Opt::Long("jobserver-style"),
        Takes::Required,
    ),
    ("just-print", Opt::Short(b'n'), Takes::Nothing),
    ("keep-going", Opt::Short(b'k'), Takes::Nothing),
    ("load-average", Opt::Short(b'l'), Takes::Number),
    ("makefile", Opt::Short(b'f'), Takes::Required),
    ("max-load", Opt::Short(b'l'), Takes::Number),
    ("new-file", Opt::Short(b'W'), Takes::Required),
    ("no-builtin-rules", Opt::Short(b'r'), Takes::Nothing),
    ("no-builtin-variables", Opt::Short(b'R'), Takes::Nothing),
    ("no-keep-going", Opt::Short(b'S'), Takes::Nothing),
    (
        "no-print-directory",
        Opt::Long("no-print-directory"),
        Takes::Nothing,
    ),
    ("no-silent", Opt::Long("no-silent"), Takes::Nothing),
    ("old-file", Opt::Short(b'o'), Takes::Required),
    ("output-sync", Opt::Short(b'O'), Takes::Attached),
    ("print-data-base", Opt::Short(b'p'), Takes::Nothing),
    ("print-directory", Opt::Short(b'w'), Takes::Nothing),
    ("question", Opt::Short(b'q'), Takes::Nothing),
    ("quiet", Opt::Short(b's'), Takes::Nothing),
    ("recon", Opt::Short(b'n'), Takes::Nothing),
    ("shuffle", Opt::Long("shuffle"), Takes::Attached),
    ("silent", Opt::Short(b's'), Takes::Nothing),
    ("stop", Opt::Short(b'S'), Takes::Nothing),
    ("sync-mutex", Opt::Long("sync-mutex"), Takes::Required),
    ("touch", Opt::Short(b't'), Takes::Nothing),
    ("trace", Opt::Long("trace"), Takes::Nothing),
    ("version", Opt::Short(b'v'), Takes::Nothing),
    (
        "warn-undefined-variables",
        Opt::Long("warn-undefined-variables"),
        Takes::Nothing,
    ),
    ("what-if", Opt::Short(b'W'), Takes::Required),
];

/// Resolves a long option name as `getopt_long` does: an exact name, or an abbreviation that
/// names one option (aliases of one option count once).
fn long_option(name: &[u8]) -> (Opt, Takes) {
    if let Some(&(_, opt, takes)) = LONG_OPTIONS.iter().find(|(n, ..)| n.as_bytes() == name) {
        return (opt, takes);
    }
    let mut matches = LONG_OPTIONS
        .iter()
        .filter(|(n, ..)| !name.is_empty() && n.as_bytes().starts_with(name));
    match matches.next() {
        Some(&(_, opt, takes)) if matches.all(|&(_, other, _)| other == opt) => (opt, takes),
        _ => (Opt::Unknown, Takes::Nothing),
    }
}

/// Whether `word` is taken as the argument of `-j`/`-l` given without one (make's rule: all
/// digits for `-j`; starting with a digit or `.` for `-l`).
fn reads_as_number(opt: Opt, word: &[u8]) -> bool {
    match opt {
        Opt::Short(b'j') => word.iter().all(u8::is_ascii_digit),
        _ => word
            .first()
            .is_some_and(|&b| b.is_ascii_digit() || b == b'.'),
    }
}

/// What one word (or an option and its separate argument) of a make command line is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// One or more options (a cluster `-kj4` holds several), each with its argument.
    Options(Vec<(Opt, Option<OsString>)>),
    /// `--`: every later word is a goal or a variable assignment.
    EndOfOptions,
    /// `NAME=VALUE` (or `:=`, `+=`, `?=`, `!=`...).
    Assignment,
    Goal,
}

/// The words of one [`Kind`], as given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    words: Vec<OsString>,
    kind: Kind,
}

/// Parses make's command line as its `getopt_long` does: options anywhere (GNU permutation)
/// until `--`; the separate argument of an option is taken whatever it looks like.
fn parse(args: &[OsString]) -> Vec<Parsed> {
    let mut parsed = Vec::new();
    let mut options_ended = false;
    let mut rest = args.iter().peekable();
    while let Some(arg) = rest.next() {
        let bytes = arg.as_bytes();
        let mut words = vec![arg.clone()];
        let kind = if options_ended || bytes == b"-" || !bytes.starts_with(b"-") {
            if bytes.contains(&b'=') {
                Kind::Assignment
            } else {
                Kind::Goal
            }
        } else if bytes == b"--" {
            options_ended = true;
            Kind::EndOfOptions
        } else if let Some(long) = bytes.strip_prefix(b"--") {
            let (name, attached) = match long.iter().position(|&b| b == b'=') {
                Some(at) => (&long[..at], Some(&long[at + 1..])),
                None => (long, None),
            };
            let (opt, takes) = long_option(name);
            let value = match (attached, takes) {
                (Some(value), _) => Some(OsStr::from_bytes(value).to_os_string()),
                (None, Takes::Required) => rest.next().cloned(),
                (None, Takes::Number) => rest
                    .next_if(|next| reads_as_number(opt, next.as_bytes()))
                    .cloned(),
                (None, _) => None,
            };
            if attached.is_none() && value.is_some() {
                words.extend(value.clone());
            }
            Kind::Options(vec![(opt, value)])
        } else {
            let mut options = Vec::new();
            let letters = &bytes[1..];
            for (at, &letter) in letters.iter().enumerate() {
                let attached = &letters[at + 1..];
                let attached =
                    (!attached.is_empty()).then(|| OsStr::from_bytes(attached).to_os_string());
                let opt = Opt::Short(letter);
                let value = match short_option(letter) {
                    None => {
                        options.push((Opt::Unknown, None));
                        continue;
                    }
                    Some(Takes::Nothing) => {
                        options.push((opt, None));
                        continue;
                    }
                    Some(Takes::Required) => attached.or_else(|| {
                        let next = rest.next().cloned();
                        words.extend(next.clone());
                        next
                    }),
                    Some(Takes::Number) => attached.or_else(|| {
                        let next = rest
                            .next_if(|next| reads_as_number(opt, next.as_bytes()))
                            .cloned();
                        words.extend(next.clone());
                        next
                    }),
                    Some(Takes::Attached) => attached,
                };
                options.push((opt, value));
                break;
            }
            Kind::Options(options)
        };
        parsed.push(Parsed { words, kind });
    }
    parsed
}

/// Splits make arguments into (options and variable assignments, goals).
///
/// Options keep their arguments (`-C dir`, `-j 4`, `--eval STRING`) and their order; `--` stays
/// with the options. A goal is a word that is neither an option, nor an option's argument,
/// nor contains `=`.
pub fn split_goals(args: &[OsString]) -> (Vec<OsString>, Vec<OsString>) {
    let mut options = Vec::new();
    let mut goals = Vec::new();
    for Parsed { words, kind } in parse(args) {
        match kind {
            Kind::Goal => goals.extend(words),
            _ => options.extend(words),
        }
    }
    (options, goals)
}

/// The arguments that make cot the shell and the recursive make of a make run.
///
/// `SHELL=<cot>`, `.SHELLFLAGS=__sh --target $@ -c` (make splits it into words and expands
/// `$@` for each target, so a recipe line runs as `<cot> __sh --target TARGET --prereqs ... --end -c LINE`; a
/// `$(shell ...)` call, which has no target, runs as `<cot> __sh --target -c COMMAND`) and
/// `MAKE=<cot> __make`. A `$` in cot's path is doubled, as make expands these values.
pub fn shell_overrides(cot_exe: &Path) -> Vec<OsString> {
    let mut cot = Vec::new();
    for &byte in cot_exe.as_os_str().as_bytes() {
        if byte == b'$' {
            cot.push(b'$');
        }
        cot.push(byte);
    }
    let assign = |name: &str, value: &[u8], suffix: &str| {
        let mut word = format!("{name}=").into_bytes();
        word.extend_from_slice(value);
        word.extend_from_slice(suffix.as_bytes());
        OsString::from_vec(word)
    };
    vec![
        assign("SHELL", &cot, ""),
        ".SHELLFLAGS=__sh --target $@ --prereqs $^ --order-only $| --end -c".into(),
        assign("MAKE", &cot, " __make"),
    ]
}

/// Tells cot, run as make's `SHELL`, which shell to be when it is called as one.
pub const SHELL_ENV: &str = "COT_BUILD_SHELL";

/// The shell recipe lines and `$(SHELL)` run with.
pub const RECIPE_SHELL: &str = "/bin/sh";

/// One word of a `MAKEFLAGS` value: its bytes as written, and as make reads them.
struct FlagWord<'a> {
    raw: &'a [u8],
    start: usize,
    text: Vec<u8>,
}

/// Splits `MAKEFLAGS` as make does: on blanks (space and tab, not newline), a backslash making
/// the next byte part of the word.
fn flag_words(value: &[u8]) -> Vec<FlagWord<'_>> {
    let mut words = Vec::new();
    let mut at = 0;
    while at < value.len() {
        if matches!(value[at], b' ' | b'\t') {
            at += 1;
            continue;
        }
        let start = at;
        let mut text = Vec::new();
        while at < value.len() && !matches!(value[at], b' ' | b'\t') {
            if value[at] == b'\\' && at + 1 < value.len() {
                at += 1;
            }
            text.push(value[at]);
            at += 1;
        }
        words.push(FlagWord {
            raw: &value[start..at],
            start,
            text,
        });
    }
    words
}

/// Whether an `--eval` string is one of phase 0's own.
fn is_our_eval(text: &[u8]) -> bool {
    let goal = RECORD_GOAL.as_bytes();
    text.strip_prefix(b".PHONY:")
        .map(|rest| rest.trim_ascii_start())
        .is_some_and(|rest| rest == goal)
        || text
            .strip_prefix(goal)
            .is_some_and(|rest| rest.starts_with(b":"))
}

/// A short-option cluster of `MAKEFLAGS` (`-Bk`, `-j2`, or make's leading `Bk` without the
/// dash) without `B`; `None` when nothing is left. `takes_next` is set when its last option
/// takes the next word as argument.
fn without_always_make(letters: &[u8], takes_next: &mut bool) -> Option<Vec<u8>> {
    let mut kept = Vec::new();
    for (at, &letter) in letters.iter().enumerate() {
        match short_option(letter) {
            Some(Takes::Nothing) if letter == b'B' => {}
            Some(Takes::Nothing) | None => kept.push(letter),
            Some(takes) => {
                // The rest of the word is this option's argument, kept as written.
                kept.extend_from_slice(&letters[at..]);
                *takes_next = takes == Takes::Required && at + 1 == letters.len();
                break;
            }
        }
    }
    (!kept.is_empty()).then_some(kept)
}

/// `MAKEFLAGS` as a nested make must see it inside a build: without `B` (`--always-make`),
/// without the jobserver (`--jobserver-auth=R,W` or `fifo:PATH`, `--jobserver-fds=R,W`: the
/// sandbox closes inherited descriptors) and without phase 0's own `--eval`s; everything else
/// as written, the variable definitions after ` -- ` untouched.
///
/// make 4.3 writes `MAKEFLAGS` as: the single-letter flags run together without a dash
/// (`Bks`, or nothing, in which case the value starts with a space), then the other options
/// each as one word (`-I/tmp/a\ b -j2 -l3 -Otarget --trace --eval=x\ :=\ 1
/// --jobserver-auth=3,4`; an argument is attached, blanks and backslashes in it escaped with a
/// backslash), then ` -- ` and the command line's variable definitions (`FOO=a\ b`, `$`
/// doubled). `-C`, `-f`, `-o` and `-W` are never in it. A `MAKEFLAGS` written by hand
/// (`-B -k`, `--always-make`) is read by make too, and sanitized the same way.
pub fn sanitize_makeflags(value: &OsStr) -> OsString {
    let value = value.as_bytes();
    let words = flag_words(value);
    let mut first = Vec::new();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut variables: &[u8] = &[];
    let mut index = 0;
    while index < words.len() {
        let word = &words[index];
        index += 1;
        let text = word.text.as_slice();
        if text == b"--" {
            variables = &value[word.start..];
            break;
        }
        let mut takes_next = false;
        if index == 1 && !text.starts_with(b"-") && !text.contains(&b'=') {
            // make's leading cluster of single-letter flags.
            first = without_always_make(word.raw, &mut takes_next).unwrap_or_default();
        } else if let Some(long) = text.strip_prefix(b"--") {
            let (name, attached) = match long.iter().position(|&b| b == b'=') {
                Some(at) => (&long[..at], Some(&long[at + 1..])),
                None => (long, None),
            };
            let (opt, takes) = long_option(name);
            let separate = attached.is_none() && takes == Takes::Required;
            let argument = attached.or_else(|| {
                separate
                    .then(|| words.get(index).map(|w| w.text.as_slice()))
                    .flatten()
            });
            let dropped = match opt {
                Opt::Short(b'B') => true,
                Opt::Long("jobserver-auth" | "jobserver-fds") => true,
                Opt::Short(b'E') => argument.is_some_and(is_our_eval),
                _ => false,
            };
            if dropped {
                index += usize::from(separate);
                continue;
            }
            kept.push(word.raw.to_vec());
            takes_next = separate;
        } else if let Some(letters) = word.raw.strip_prefix(b"-") {
            if let Some(cluster) = without_always_make(letters, &mut takes_next) {
                kept.push([b"-".as_slice(), &cluster].concat());
            }
        } else {
            kept.push(word.raw.to_vec());
        }
        if takes_next {
            if let Some(argument) = words.get(index) {
                kept.push(argument.raw.to_vec());
                index += 1;
            }
        }
    }
    let mut out = first;
    for word in kept {
        out.push(b' ');
        out.extend_from_slice(&word);
    }
    if !variables.is_empty() {
        out.push(b' ');
        out.extend_from_slice(variables);
    }
    OsString::from_vec(out)
}

/// The exit status a shell would report.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs make with `args`, the sanitized flags of the environment, and the standard streams
/// of this process.
fn run_make(args: &[OsString]) -> io::Result<i32> {
    let mut command = Command::new(MAKE);
    command.args(args);
    for name in FLAG_VARIABLES {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, sanitize_makeflags(&value));
        }
    }
    // Set by make for its own restart only; an inherited one would make phase 0 believe it
    // restarted.
    command.env_remove("MAKE_RESTARTS");
    // `$(SHELL)` in a recipe is cot: invoked as a shell (`$(SHELL) ./libtool ...`,
    // `$(SHELL) -c ...`), cot runs this one (see `crate::cli::shell_call`).
    command.env(SHELL_ENV, RECIPE_SHELL);
    let status = command
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {MAKE}: {e}")))?;
    Ok(exit_code(status))
}

/// A private directory for phase 0's record, at a path make can take in a `$(file ...)`
/// (`/tmp` when `TMPDIR` has characters make would read specially).
fn scratch_dir() -> io::Result<tempfile::TempDir> {
    let plain = |path: &Path| {
        path.as_os_str()
            .as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
    };
    let base = std::env::temp_dir();
    let base = if plain(&base) {
        base
    } else {
        PathBuf::from("/tmp")
    };
    let dir = tempfile::Builder::new()
        .prefix("cot-make-")
        .tempdir_in(&base)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create a private directory in {}: {e}",
                    base.display()
                ),
            )
        })?;
    if !plain(dir.path()) {
        return Err(io::Error::other(format!(
            "the private directory {} has a name make cannot take",
            dir.path().display()
        )));
    }
    Ok(dir)
}

/// `-f -` (the makefile on standard input) can be read only once: the driver reads it into
/// `dir` and both phases read that file. Returns whether it did.
fn makefile_from_stdin(parsed: &mut [Parsed], dir: &Path) -> io::Result<bool> {
    let reads_stdin = |kind: &Kind| {
        matches!(kind, Kind::Options(options)
        if options.iter().any(|(opt, value)| {
            *opt == Opt::Short(b'f') && value.as_deref() == Some(OsStr::new("-"))
        }))
    };
    if !parsed.iter().any(|p| reads_stdin(&p.kind)) {
        return Ok(false);
    }
    let copy = dir.join("stdin.mk");
    let mut file = std::fs::File::create(&copy)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", copy.display())))?;
    io::copy(&mut io::stdin().lock(), &mut file).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot copy the makefile from standard input: {e}"),
        )
    })?;
    for p in parsed.iter_mut().filter(|p| reads_stdin(&p.kind)) {
        if let Kind::Options(options) = &mut p.kind {
            for (opt, value) in options.iter_mut() {
                if *opt == Opt::Short(b'f') && value.as_deref() == Some(OsStr::new("-")) {
                    *value = Some(copy.clone().into_os_string());
                }
            }
            p.words = unparse(options);
        }
    }
    Ok(true)
}

/// Options written back as separate words (`-k`, `-j4`, `-C`, `dir`).
fn unparse(options: &[(Opt, Option<OsString>)]) -> Vec<OsString> {
    let mut words = Vec::new();
    for (opt, value) in options {
        let Opt::Short(letter) = opt else {
            continue;
        };
        let mut word = vec![b'-', *letter];
        match (short_option(*letter), value) {
            (Some(Takes::Required), Some(value)) => {
                words.push(OsString::from_vec(word));
                words.push(value.clone());
                continue;
            }
            (_, Some(value)) => word.extend_from_slice(value.as_bytes()),
            (_, None) => {}
        }
        words.push(OsString::from_vec(word));
    }
    words
}

/// The caller's arguments for phase 0: no goals, no `-B` (which would remake every makefile)
/// and no `-p` (the data base is printed once, by phase 1).
fn phase0_arguments(parsed: &[Parsed]) -> Vec<OsString> {
    let dropped = |opt: &Opt| matches!(opt, Opt::Short(b'B' | b'p'));
    let mut args = Vec::new();
    for Parsed { words, kind } in parsed {
        match kind {
            Kind::Goal => {}
            Kind::Options(options) if options.iter().any(|(opt, _)| dropped(opt)) => {
                let kept: Vec<_> = options
                    .iter()
                    .filter(|(opt, _)| !dropped(opt))
                    .cloned()
                    .collect();
                args.extend(unparse(&kept));
            }
            _ => args.extend(words.iter().cloned()),
        }
    }
    args
}

fn has_option(parsed: &[Parsed], wanted: impl Fn(&Opt) -> bool) -> bool {
    parsed.iter().any(|p| match &p.kind {
        Kind::Options(options) => options.iter().any(|(opt, _)| wanted(opt)),
        _ => false,
    })
}

/// The makefiles phase 0 recorded, once each, in the order make read them.
fn recorded_makefiles(record: &Path) -> io::Result<Vec<OsString>> {
    let text = std::fs::read(record).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "make did not record the makefiles it read in {}: {e}",
                record.display()
            ),
        )
    })?;
    let mut seen = HashSet::new();
    Ok(text
        .split(|b| b.is_ascii_whitespace())
        .filter(|name| !name.is_empty() && seen.insert(name.to_vec()))
        .map(|name| OsStr::from_bytes(name).to_os_string())
        .collect())
}

/// The file targets of explicit rules with a recipe in make's data base (`make -p`): in its
/// "Files" section, the entries that are targets, not phony, and have a recipe. Special and
/// suffix targets (a name starting with `.`) are left out, and so are files that only a
/// pattern rule makes (their entries have no recipe until make looked for one).
pub fn rule_targets(data_base: &[u8]) -> Vec<Vec<u8>> {
    let mut targets = Vec::new();
    let Some(start) = data_base
        .split(|&b| b == b'\n')
        .position(|line| line == b"# Files")
    else {
        return targets;
    };
    let section = data_base
        .split(|&b| b == b'\n')
        .skip(start + 1)
        .take_while(|line| !line.starts_with(b"# files hash-table stats"));
    // One entry: its name (None: not a target), and what its comment lines say.
    let mut name: Option<Vec<u8>> = None;
    let mut not_a_target = false;
    let (mut phony, mut recipe) = (false, false);
    let mut finish = |name: &mut Option<Vec<u8>>, phony: bool, recipe: bool| {
        if let Some(name) = name.take() {
            if recipe && !phony && !name.starts_with(b".") && !name.contains(&b'%') {
                targets.push(name);
            }
        }
    };
    for line in section {
        if line.is_empty() {
            finish(&mut name, phony, recipe);
            (not_a_target, phony, recipe) = (false, false, false);
        } else if line == b"# Not a target:" {
            not_a_target = true;
        } else if line.starts_with(b"#  Phony target") {
            phony = true;
        } else if line.starts_with(b"#  recipe to execute") {
            recipe = true;
        } else if line.starts_with(b"#") || line.starts_with(b"\t") {
        } else if name.is_none() && !not_a_target {
            // `TARGET: PREREQUISITES` (or `::`), the name as is: its end is the first colon
            // followed by a blank, a colon or nothing (a name may hold a colon, `a\:b` in
            // the makefile).
            let end = (0..line.len()).find(|&at| {
                line[at] == b':' && matches!(line.get(at + 1), None | Some(b' ' | b'\t' | b':'))
            });
            if let Some(end) = end.filter(|&end| end > 0) {
                name = Some(line[..end].to_vec());
            }
        }
    }
    finish(&mut name, phony, recipe);
    targets
}

/// Tells the build that this thunk runs a make, and `targets`: the rules for which this
/// driver, with the caller's arguments (not their goals) and the target added, makes the file
/// on demand (see [`crate::build::engine::Requests::rules`]).
fn tell_rules(
    parsed: &[Parsed],
    cot_exe: &Path,
    targets: Vec<(OsString, PathBuf)>,
) -> io::Result<()> {
    let mut argv: Vec<OsString> = vec![cot_exe.into(), "__make".into()];
    argv.extend(
        parsed
            .iter()
            .filter(|p| p.kind != Kind::Goal)
            .flat_map(|p| p.words.iter().cloned()),
    );
    let cwd = std::env::current_dir()?;
    super::client::rules(argv, super::client::request_env(), cwd, targets)
        .map_err(|e| io::Error::other(format!("{e:#}")))
}

/// Inside a build, after phase 0: lists make's rules for the files missing now to the build
/// ([`tell_rules`]), so that each can be made on demand for a recipe of this make. (A file
/// that exists is read as it is until a build records who makes it: asking make for it would
/// run a make for every file a recipe reads that has a rule, catch-all rules included, when
/// make would leave nearly all of them alone.) make prints its data base (`-p`) and runs
/// nothing: `-q`, a goal of ours with an empty recipe, the makefiles marked old, and
/// `$(shell ...)` run by `/bin/sh` rather than requested as thunks. What make says on its
/// standard error (warnings printed by phase 1 anyway) is dropped.
fn list_rules(parsed: &[Parsed], makefiles: &[OsString], cot_exe: &Path) -> io::Result<()> {
    let mut args: Vec<OsString> = vec!["-p".into(), "-q".into()];
    for makefile in makefiles {
        args.push("-o".into());
        args.push(makefile.clone());
    }
    args.push(format!("--eval=.PHONY: {RULES_GOAL}").into());
    args.push(format!("--eval={RULES_GOAL}: ; @:").into());
    args.extend(phase0_arguments(parsed));
    args.push(format!("SHELL={RECIPE_SHELL}").into());
    args.push(".SHELLFLAGS=-c".into());
    args.push(RULES_GOAL.into());
    let mut command = Command::new(MAKE);
    command.args(&args);
    for name in FLAG_VARIABLES {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, sanitize_makeflags(&value));
        }
    }
    command.env_remove("MAKE_RESTARTS");
    let output = command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {MAKE}: {e}")))?;
    // make's own directory: the working directory, changed by each `-C`.
    let mut dir = std::env::current_dir()?;
    for p in parsed {
        if let Kind::Options(options) = &p.kind {
            for (opt, value) in options {
                if let (Opt::Short(b'C'), Some(value)) = (opt, value) {
                    dir = dir.join(value);
                }
            }
        }
    }
    let makefiles: HashSet<&[u8]> = makefiles.iter().map(|m| m.as_bytes()).collect();
    let targets: Vec<(OsString, PathBuf)> = rule_targets(&output.stdout)
        .into_iter()
        .filter(|name| !makefiles.contains(name.as_slice()))
        .map(|name| {
            let name = OsString::from_vec(name);
            let path: PathBuf = dir
                .join(&name)
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .collect();
            (name, path)
        })
        .filter(|(_, path)| std::fs::symlink_metadata(path).is_err())
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    tell_rules(parsed, cot_exe, targets)
}

/// Runs make for `cot make` (and for `$(MAKE)` inside a build): phase 0 then phase 1 as above.
///
/// Returns make's exit status: phase 1's, or phase 0's when that failed (then phase 1 does not
/// run). `--version` and `--help` run make once. Errors name what failed.
pub fn drive(args: &[OsString], cot_exe: &Path, jobs: usize) -> io::Result<i32> {
    if cot_exe
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| b.is_ascii_whitespace() || b"'\"\\".contains(b))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot run make with {} as its shell: make splits SHELL at blanks and quotes",
                cot_exe.display()
            ),
        ));
    }
    let overrides = shell_overrides(cot_exe);
    let mut parsed = parse(args);
    if has_option(&parsed, |opt| matches!(opt, Opt::Short(b'v' | b'h'))) {
        let once: Vec<OsString> = args.iter().chain(&overrides).cloned().collect();
        return run_make(&once);
    }
    let scratch = scratch_dir()?;
    let reads_stdin = makefile_from_stdin(&mut parsed, scratch.path())?;
    // The thunk runs a make: it never waits for a rule (make looks at its targets, missing
    // ones too, before it makes them).
    let listing = super::client::inside_build() && !reads_stdin;
    if listing {
        if let Err(e) = tell_rules(&parsed, cot_exe, Vec::new()) {
            eprintln!("cot: cannot tell the build that make runs: {e}");
        }
    }
    let jobs_flag = (!has_option(&parsed, |opt| *opt == Opt::Short(b'j')))
        .then(|| OsString::from(format!("-j{}", jobs.max(1))));

    let record = scratch.path().join("makefiles");
    let mut phase0: Vec<OsString> = vec!["-q".into()];
    phase0.extend(jobs_flag.clone());
    phase0.push(format!("--eval=.PHONY: {RECORD_GOAL}").into());
    let mut rule = format!("--eval={RECORD_GOAL}: ; +$(file >").into_bytes();
    rule.extend_from_slice(record.as_os_str().as_bytes());
    rule.extend_from_slice(b",$(MAKEFILE_LIST))");
    phase0.push(OsString::from_vec(rule));
    phase0.extend(phase0_arguments(&parsed));
    phase0.extend(overrides.iter().cloned());
    phase0.push(RECORD_GOAL.into());
    let status = run_make(&phase0)?;
    if status != 0 {
        return Ok(status);
    }

    let makefiles = recorded_makefiles(&record)?;
    // (A makefile read from standard input lives in the scratch directory, gone afterwards.)
    if listing {
        if let Err(e) = list_rules(&parsed, &makefiles, cot_exe) {
            eprintln!("cot: cannot list make's rules, no file is made on demand: {e}");
        }
    }
    let mut phase1: Vec<OsString> = vec!["-B".into()];
    phase1.extend(jobs_flag);
    for makefile in makefiles {
        phase1.push("-o".into());
        phase1.push(makefile);
    }
    phase1.extend(parsed.into_iter().flat_map(|p| p.words));
    phase1.extend(overrides);
    run_make(&phase1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn sanitized(value: &str) -> String {
        sanitize_makeflags(OsStr::new(value))
            .into_string()
            .expect("UTF-8 in, UTF-8 out")
    }

    /// A project in a temporary directory, with a fake cot: `__sh --target T -c LINE` appends
    /// T to `log` and runs `/bin/sh -c LINE`; `__make ARGS` runs [`drive`] in this test binary
    /// (through [`drive_entry`]), with the fake cot again.
    struct Project {
        dir: tempfile::TempDir,
        cot: PathBuf,
    }

    impl Project {
        fn new(files: &[(&str, &str)]) -> Project {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let cot = dir.path().join("fake-cot");
            let test_exe = std::env::current_exe().expect("the test binary");
            let script = format!(
                r#"#!/bin/sh
case "$1" in
__sh)
    shift
    target=
    if [ "$1" = --target ]; then
        if [ "$2" = --prereqs ]; then shift; else target=$2; shift 2; fi
    fi
    if [ "$1" = --prereqs ]; then
        while [ "$1" != --end ]; do shift; done
        shift
    fi
    [ "$1" = -c ] && shift
    [ -n "$target" ] && printf '%s\n' "$target" >> '{log}'
    exec /bin/sh -c "$1"
    ;;
__make)
    shift
    COT_MAKE_TEST_ARGS=$(printf '%s\n' "$@") COT_MAKE_TEST_COT="$0" \
        exec '{exe}' --exact build::make::tests::drive_entry -q --nocapture >&2
    ;;
esac
echo "fake cot: unexpected arguments $*" >&2
exit 99
"#,
                log = dir.path().join("log").display(),
                exe = test_exe.display(),
            );
            fs::write(&cot, script).expect("write the fake cot");
            fs::set_permissions(&cot, fs::Permissions::from_mode(0o755)).expect("chmod");
            let project = Project { dir, cot };
            for (name, text) in files {
                project.write(name, text);
            }
            project
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, text: &str) {
            let path = self.path(name);
            fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            fs::write(path, text).expect("write a project file");
        }

        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.path(name)).unwrap_or_default()
        }

        /// Sets the modification time of `name` to `ago` before now.
        fn age(&self, name: &str, ago: Duration) {
            let file = fs::File::options()
                .write(true)
                .open(self.path(name))
                .expect("open to set the time");
            file.set_modified(SystemTime::now() - ago)
                .expect("set the time");
        }

        /// The targets whose recipes ran since the last call, in order.
        fn take_log(&self) -> Vec<String> {
            let log = self.read("log");
            let _ = fs::remove_file(self.path("log"));
            log.lines().map(String::from).collect()
        }

        /// `drive` in this process, in the project's directory (`-C`).
        fn drive(&self, args: &[&str]) -> i32 {
            let mut all = os(&["-C"]);
            all.push(self.dir.path().into());
            all.extend(os(args));
            drive(&all, &self.cot, 2).expect("drive runs make")
        }

        /// `drive` in a process of its own, its standard output and error together.
        fn drive_output(&self, args: &[&str]) -> (i32, String) {
            let output = self.path("driver-output");
            let _ = fs::remove_file(&output);
            let status = Command::new(std::env::current_exe().expect("the test binary"))
                .args([
                    "--exact",
                    "build::make::tests::drive_entry",
                    "-q",
                    "--nocapture",
                ])
                .env("COT_MAKE_TEST_ARGS", args.join("\n"))
                .env("COT_MAKE_TEST_COT", &self.cot)
                .env("COT_MAKE_TEST_OUTPUT", &output)
                .current_dir(self.dir.path())
                .env_remove("MAKEFLAGS")
                .env_remove("MAKELEVEL")
                .stdout(std::process::Stdio::null())
                .status()
                .expect("run the test binary");
            (exit_code(status), self.read("driver-output"))
        }

        /// Plain make with the same shell, its standard output and error together.
        fn plain_make_output(&self, args: &[&str]) -> (i32, String) {
            let output = self.path("make-output");
            let file = fs::File::create(&output).expect("create the output file");
            let status = Command::new(MAKE)
                .args(args)
                .args(shell_overrides(&self.cot))
                .current_dir(self.dir.path())
                .env_remove("MAKEFLAGS")
                .env_remove("MAKELEVEL")
                .stdout(file.try_clone().expect("dup"))
                .stderr(file)
                .status()
                .expect("run make");
            (exit_code(status), self.read("make-output"))
        }
    }

    /// Not a test of its own: the entry point of a driver run in a process of its own, by the
    /// fake cot's `__make` and by [`Project::drive_output`]. Does nothing otherwise.
    #[test]
    fn drive_entry() {
        let (Some(args), Some(cot)) = (
            std::env::var_os("COT_MAKE_TEST_ARGS"),
            std::env::var_os("COT_MAKE_TEST_COT"),
        ) else {
            return;
        };
        if let Some(output) = std::env::var_os("COT_MAKE_TEST_OUTPUT") {
            let file = fs::File::options()
                .create(true)
                .append(true)
                .open(output)
                .expect("open the output file");
            for fd in [1, 2] {
                nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), fd)
                    .expect("redirect the output");
            }
        }
        let args: Vec<OsString> = args
            .as_bytes()
            .split(|&b| b == b'\n')
            .filter(|a| !a.is_empty())
            .map(|a| OsStr::from_bytes(a).to_os_string())
            .collect();
        let code = match drive(&args, Path::new(&cot), 2) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("drive: {e}");
                125
            }
        };
        std::process::exit(code);
    }

    #[test]
    fn sanitize_makeflags_drops_always_make_the_jobserver_and_our_evals() {
        // Each as GNU make 4.3 wrote it in a recipe's $MAKEFLAGS, then what a nested make
        // must see.
        let cases = [
            ("", ""),
            ("B", ""),
            ("k", "k"),
            ("Bk -j2 --jobserver-auth=3,4 -- FOO=bar", "k -j2 -- FOO=bar"),
            (" -j2 --jobserver-auth=3,4", " -j2"),
            ("Bw -j3 --jobserver-auth=3,4", "w -j3"),
            (
                "Bk -I/tmp -j2 -l3 -Otarget --jobserver-auth=3,4 -- FOO=a\\ b",
                "k -I/tmp -j2 -l3 -Otarget -- FOO=a\\ b",
            ),
            ("B --eval=x:=1", " --eval=x:=1"),
            (
                "B -I/tmp/a\\ b --eval=x\\ :=\\ 1\\ 2",
                " -I/tmp/a\\ b --eval=x\\ :=\\ 1\\ 2",
            ),
            (
                "eirR --trace --no-print-directory --warn-undefined-variables",
                "eirR --trace --no-print-directory --warn-undefined-variables",
            ),
            (
                "Bw -j2 --jobserver-auth=3,4 -- V=x\\ y W=a\\b Z=$$$$x",
                "w -j2 -- V=x\\ y W=a\\b Z=$$$$x",
            ),
            ("Bks -j -Onone", "ks -j -Onone"),
            (" -- X=1", " -- X=1"),
            // Variables are never touched, even one that looks like a flag.
            ("B -- B=1 --always-make=2", " -- B=1 --always-make=2"),
            // make 4.4's fifo jobserver, and the old name of the option.
            (
                " -j8 --jobserver-auth=fifo:/tmp/GMfifo1234",
                " -j8",
            ),
            ("Bk -j4 --jobserver-fds=5,6 -- X=1", "k -j4 -- X=1"),
            // Written by hand, which make reads too.
            ("-B", ""),
            ("-Bk -j4", " -k -j4"),
            ("--always-make -k", " -k"),
            ("--always -k", " -k"),
            ("-kB", " -k"),
            // An option's argument is not a flag to drop.
            ("-o -B", " -o -B"),
            ("-IB", " -IB"),
            ("--jobserver-auth 3,4 -k", " -k"),
            // Phase 0's evals, as make writes them during phase 0's makefile remaking.
            (
                " -j2 --jobserver-auth=3,4 --eval=.PHONY:\\ .cot-makefiles \
                 --eval=.cot-makefiles:\\ ;\\ +$$(file\\ >/tmp/cot-make-X/makefiles,$$(MAKEFILE_LIST)) \
                 -- SHELL=/bin/cot",
                " -j2 -- SHELL=/bin/cot",
            ),
        ];
        for (given, expected) in cases {
            assert_eq!(sanitized(given), expected, "sanitizing {given:?}");
        }
    }

    /// The flags of a real `make -B -k -j2 -I DIR --eval=... 'V=a b'`, sanitized and handed to
    /// a nested make through the environment: it keeps everything but `B` and the jobserver
    /// (it neither forces its targets nor complains about the jobserver).
    #[test]
    fn sanitized_makeflags_are_read_back_by_make_without_b_or_jobserver() {
        let project = Project::new(&[
            ("Makefile", "all:\n\t@printf '%s' \"$$MAKEFLAGS\" > flags\n"),
            (
                "nested.mk",
                "all: done\ndone:\n\t@echo remade >> done-log\n\
                 show:\n\t@printf '%s' \"$$MAKEFLAGS\" > nested-flags\n",
            ),
        ]);
        let include = project.path("inc");
        fs::create_dir(&include).expect("mkdir");
        let status = Command::new(MAKE)
            .args(["-B", "-k", "-j2", "--eval=x := 1 2", "-s"])
            .arg(format!("-I{}", include.display()))
            .arg("V=a b")
            .current_dir(project.dir.path())
            .env_remove("MAKEFLAGS")
            .status()
            .expect("run make");
        assert!(status.success());
        let flags = project.read("flags");
        assert!(
            flags.starts_with("Bks ") && flags.contains("--jobserver-auth="),
            "{flags:?}"
        );
        let clean = sanitized(&flags);
        assert_eq!(
            clean,
            format!(
                "ks -I{} -j2 --eval=x\\ :=\\ 1\\ 2 -- V=a\\ b",
                include.display()
            )
        );
        project.write("done", "");
        for _ in 0..2 {
            let output = Command::new(MAKE)
                .args(["-f", "nested.mk", "all", "show"])
                .current_dir(project.dir.path())
                .env("MAKEFLAGS", &clean)
                .output()
                .expect("run the nested make");
            assert!(output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!stderr.contains("jobserver"), "{stderr}");
        }
        assert_eq!(project.read("done-log"), "", "B reached the nested make");
        let nested = project.read("nested-flags");
        assert!(
            nested.starts_with("ks ") && nested.ends_with("-- V=a\\ b"),
            "{nested:?}"
        );
    }

    #[test]
    fn split_goals_separates_goals_from_options_and_their_arguments() {
        let args = os(&[
            "-C",
            "dir",
            "-f",
            "x.mk",
            "all",
            "-j",
            "4",
            "install",
            "V=1",
            "-kj3",
            "--file",
            "y.mk",
            "--eval=a: ; b",
            "-o",
            "old",
            "-l",
            "2.5",
            "-O",
            "check",
            "--directory=d",
            "-Idir",
            "--jobs",
            "x",
            "-E",
            "-B",
            "--fi",
            "z.mk",
            "-",
            "--",
            "-weird",
            "W=2",
        ]);
        let (options, goals) = split_goals(&args);
        assert_eq!(goals, os(&["all", "install", "check", "x", "-", "-weird"]));
        assert_eq!(
            options,
            os(&[
                "-C",
                "dir",
                "-f",
                "x.mk",
                "-j",
                "4",
                "V=1",
                "-kj3",
                "--file",
                "y.mk",
                "--eval=a: ; b",
                "-o",
                "old",
                "-l",
                "2.5",
                "-O",
                "--directory=d",
                "-Idir",
                "--jobs",
                "-E",
                "-B",
                "--fi",
                "z.mk",
                "--",
                "W=2",
            ])
        );
    }

    #[test]
    fn phase_0_drops_goals_always_make_and_the_data_base_only() {
        let parsed = parse(&os(&[
            "-Bkp",
            "all",
            "--always-make",
            "-pC",
            "dir",
            "--print-data-base",
            "-s",
            "V=1",
        ]));
        assert_eq!(
            phase0_arguments(&parsed),
            os(&["-k", "-C", "dir", "-s", "V=1"])
        );
    }

    #[test]
    fn shell_overrides_make_cot_the_shell_and_the_recursive_make() {
        assert_eq!(
            shell_overrides(Path::new("/opt/co$t/bin/cot")),
            os(&[
                "SHELL=/opt/co$$t/bin/cot",
                ".SHELLFLAGS=__sh --target $@ --prereqs $^ --order-only $| --end -c",
                "MAKE=/opt/co$$t/bin/cot __make",
            ])
        );
    }

    #[test]
    fn every_recipe_is_requested_again_when_everything_is_up_to_date() {
        let project = Project::new(&[("Makefile", "all: b\na:\n\t@touch a\nb: a\n\t@touch b\n")]);
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["a", "b"]);
        // Plain make would do nothing now.
        let (_, plain) = project.plain_make_output(&[]);
        assert_eq!(plain, "make: Nothing to be done for 'all'.\n");
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["a", "b"]);
    }

    const GENERATED_MAKEFILE: &str = "include settings.mk\n\
        all:\n\t@echo $(VERSION) > out\n\
        Makefile: Makefile.in\n\t@cp Makefile.in Makefile\n";

    #[test]
    fn a_makefile_is_regenerated_exactly_when_plain_make_would() {
        let project = Project::new(&[
            ("Makefile.in", GENERATED_MAKEFILE),
            ("Makefile", GENERATED_MAKEFILE),
            ("settings.mk", "VERSION = 1\n"),
        ]);
        for name in ["Makefile.in", "settings.mk"] {
            project.age(name, Duration::from_secs(3600));
        }
        // Makefile is newer than Makefile.in: plain make would not regenerate it.
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["all"]);
        assert_eq!(project.read("out"), "1\n");

        // Makefile.in is newer: regenerated once, make restarts and reads the new one.
        let newer = GENERATED_MAKEFILE.replace("include settings.mk", "VERSION = 2");
        project.write("Makefile.in", &newer);
        project.age("Makefile", Duration::from_secs(60));
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["Makefile", "all"]);
        assert_eq!(project.read("Makefile"), newer);
        assert_eq!(project.read("out"), "2\n");

        // Up to date again.
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["all"]);
    }

    #[test]
    fn included_generated_makefiles_behave_as_with_plain_make() {
        let project = Project::new(&[
            (
                "Makefile",
                "all:\n\t@echo $(VALUE) > out\n-include x.d\n\
                 x.d: x.in\n\t@sed 's/^/VALUE := /' x.in > x.d\n",
            ),
            ("x.in", "first\n"),
        ]);
        // x.d does not exist: made, then make restarts and reads it.
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["x.d", "all"]);
        assert_eq!(project.read("out"), "first\n");
        // Up to date: not remade, though -B forces every other target.
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["all"]);
        // Its prerequisite changed: remade once.
        project.write("x.in", "second\n");
        project.age("x.d", Duration::from_secs(60));
        assert_eq!(project.drive(&[]), 0);
        assert_eq!(project.take_log(), ["x.d", "all"]);
        assert_eq!(project.read("out"), "second\n");
    }

    #[test]
    fn goals_directory_file_and_variables_are_honoured() {
        let project = Project::new(&[
            (
                "sub/build.mk",
                "V = default\none:\n\t@echo one > one\ntwo: one\n\t@echo $(V) > two\n\
                 three:\n\t@echo three > three\n",
            ),
            ("Makefile", "all:\n\t@echo wrong makefile\n"),
        ]);
        let code = project.drive(&[
            "-C", "sub", "--file", "build.mk", "two", "V=hello", "three", "-j1",
        ]);
        assert_eq!(code, 0);
        assert_eq!(project.take_log(), ["one", "two", "three"]);
        assert_eq!(project.read("sub/two"), "hello\n");
        // The default goal when none is given.
        assert_eq!(project.drive(&["-Csub", "-fbuild.mk"]), 0);
        assert_eq!(project.take_log(), ["one"]);
    }

    #[test]
    fn a_failing_recipe_gives_makes_exit_status() {
        let project = Project::new(&[(
            "Makefile",
            "all: bad good\nbad:\n\t@exit 3\ngood:\n\t@touch good\n",
        )]);
        assert_eq!(project.drive(&["-j1"]), 2);
        assert_eq!(project.take_log(), ["bad"]);
        assert_eq!(project.drive(&["-k", "-j1"]), 2);
        assert_eq!(project.take_log(), ["bad", "good"]);
        assert_eq!(project.drive(&["good"]), 0);
    }

    #[test]
    fn a_makefile_that_cannot_be_read_stops_before_phase_1() {
        let project = Project::new(&[("Makefile", "all:\n\t@touch out\nifeq (\n")]);
        let (code, output) = project.drive_output(&[]);
        let (plain_code, plain) = project.plain_make_output(&[]);
        assert_eq!((code, output), (plain_code, plain));
        assert_eq!(code, 2);
        assert_eq!(project.take_log(), Vec::<String>::new());
    }

    /// What the caller sees is what plain make prints on a first build: phase 0 adds nothing,
    /// not even a second pair of "Entering directory" lines.
    #[test]
    fn phase_0_prints_nothing_plain_make_would_not() {
        let makefile = "all: a\n\t@echo all done\na:\n\techo making a > a\n";
        for args in [&[][..], &["-C", "sub"], &["-w", "all"], &["-s", "-k"]] {
            let files = [("Makefile", makefile), ("sub/Makefile", makefile)];
            let (plain_project, cot_project) = (Project::new(&files), Project::new(&files));
            let (plain_code, plain) = plain_project.plain_make_output(args);
            let (code, output) = cot_project.drive_output(args);
            let anonymous = |text: &str, project: &Project| {
                text.replace(&project.dir.path().display().to_string(), "DIR")
            };
            assert_eq!(
                (code, anonymous(&output, &cot_project)),
                (plain_code, anonymous(&plain, &plain_project)),
                "make {args:?}"
            );
        }
    }

    /// A makefile remade by phase 0 prints what plain make prints: the regeneration's recipe,
    /// then the build's, once each.
    #[test]
    fn a_makefile_remade_in_phase_0_prints_as_with_plain_make() {
        let makefile = "all:\n\techo building\nMakefile: Makefile.in\n\tcp Makefile.in Makefile\n";
        let files = [("Makefile", makefile), ("Makefile.in", makefile)];
        let (plain_project, cot_project) = (Project::new(&files), Project::new(&files));
        for project in [&plain_project, &cot_project] {
            project.age("Makefile", Duration::from_secs(60));
        }
        let plain = plain_project.plain_make_output(&[]);
        assert_eq!(
            plain,
            (
                0,
                "cp Makefile.in Makefile\necho building\nbuilding\n".into()
            )
        );
        assert_eq!(cot_project.drive_output(&[]), plain);
        assert_eq!(cot_project.take_log(), ["Makefile", "all"]);
    }

    /// The file targets with a recipe, from make's own data base: not phony ones, special
    /// targets, files only mentioned, or targets without a recipe.
    #[test]
    fn rule_targets_are_the_files_explicit_rules_make() {
        let project = Project::new(&[(
            "Makefile",
            "all: prog gen.h\n\
             prog: main.o\n\tcc -o prog main.o\n\
             gen.h: gen.sh\n\tsh gen.sh > gen.h\n\
             sub/x\\:y.txt:\n\ttouch 'sub/x:y.txt'\n\
             %.o: %.c\n\tcc -c $<\n\
             nothing: gen.h\n\
             .PHONY: clean\nclean:\n\trm -f prog\n",
        )]);
        let output = Command::new(MAKE)
            .args([
                "-p",
                "-q",
                "--eval=.PHONY: .cot-rules",
                "--eval=.cot-rules: ; @:",
            ])
            .arg(".cot-rules")
            .current_dir(project.dir.path())
            .env_remove("MAKEFLAGS")
            .output()
            .expect("run make");
        let mut targets: Vec<String> = rule_targets(&output.stdout)
            .into_iter()
            .map(|t| String::from_utf8(t).expect("UTF-8"))
            .collect();
        targets.sort();
        assert_eq!(targets, ["gen.h", "prog", "sub/x:y.txt"]);
    }

    #[test]
    fn version_and_help_run_make_once() {
        let project = Project::new(&[]);
        let (code, output) = project.drive_output(&["--version"]);
        assert_eq!(code, 0);
        assert_eq!(output.matches("GNU Make").count(), 1, "{output}");
    }

    /// `$(MAKE)` in a recipe runs the driver again, whose phase 0 runs without the `B` of its
    /// parent's flags: the sub-make's up-to-date makefile is not regenerated, every one of its
    /// recipes is requested, and no jobserver warning is printed.
    #[test]
    fn recursive_make_runs_the_driver_without_always_make_in_phase_0() {
        let sub = "all:\n\t@printf '%s' \"$$MAKEFLAGS\" > flags\n\
                   Makefile: Makefile.in\n\t@cp Makefile.in Makefile\n";
        let project = Project::new(&[
            ("Makefile", "all:\n\t+@$(MAKE) -C sub\n"),
            ("sub/Makefile.in", sub),
            ("sub/Makefile", sub),
        ]);
        project.age("sub/Makefile.in", Duration::from_secs(3600));
        let (code, output) = project.drive_output(&[]);
        assert_eq!(code, 0, "{output}");
        assert_eq!(project.take_log(), ["all", "all"]);
        assert!(!output.contains("jobserver"), "{output}");
        let flags = project.read("sub/flags");
        assert!(flags.starts_with('B'), "phase 1 forces: {flags:?}");
        assert!(
            flags.contains(&format!("SHELL={}", project.cot.display())),
            "{flags:?}"
        );
        assert!(
            output.contains("Entering directory") && output.matches("Entering").count() == 1,
            "{output}"
        );
    }

    #[test]
    fn a_makefile_on_standard_input_is_read_by_both_phases() {
        let project = Project::new(&[("input.mk", "all:\n\t@touch from-stdin\n")]);
        let status = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "build::make::tests::drive_entry",
                "-q",
                "--nocapture",
            ])
            .env("COT_MAKE_TEST_ARGS", "-f\n-")
            .env("COT_MAKE_TEST_COT", &project.cot)
            .env_remove("MAKEFLAGS")
            .current_dir(project.dir.path())
            .stdin(fs::File::open(project.path("input.mk")).expect("open the makefile"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run the test binary");
        assert!(status.success());
        assert_eq!(project.take_log(), ["all"]);
        assert!(project.path("from-stdin").exists());
    }
}
