//! `cot show`, `cot query`, `cot gc`, `cot clean`: looking into and tidying the store.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::engine::inspect::Project;
use crate::engine::memo::MemoOptions;
use crate::engine::observe::CheckMode;
use crate::store::hex;
use crate::store::model::{
    Input, Observed, Output, OutputState, StorePath, SyncEvent, ThunkInfo, Trace,
};

/// Where the stores are (shared by the inspecting subcommands).
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The trace store directory [default: <project>/.cot/store]
    #[arg(long, value_name = "DIR", env = "COT_STORE")]
    store: Option<PathBuf>,
    /// A cache shared with other checkouts (`cot gc` leaves it alone)
    #[arg(long, value_name = "DIR", env = "COT_CACHE")]
    cache: Option<PathBuf>,
}

impl StoreArgs {
    fn open(self) -> Result<Project> {
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        let options = MemoOptions {
            store: self.store,
            cas: None,
            caches: crate::cache::CacheOptions {
                dir: self.cache,
                ..Default::default()
            },
            check: CheckMode::default(),
            no_cache: false,
            cache_failures: false,
        };
        Ok(Project::open(&cwd, &options)?)
    }
}

/// List the known thunks, or print one in full
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A thunk id or a unique prefix of one (see the list)
    thunk: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// Say which thunk last wrote a file: its command line, working directory and inputs
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The file
    path: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// Drop traces unused for a while and content objects nothing refers to (a cache shared with
/// other checkouts, --cache, is left alone)
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Drop thunks not used for this long: a number with s, m, h or d (e.g. 30d, 12h, 0s)
    #[arg(long, value_name = "AGE", default_value = "30d", value_parser = parse_age)]
    older_than: Duration,
    #[command(flatten)]
    store: StoreArgs,
}

/// Delete the outputs of every recorded thunk (and the directories they made, when empty)
#[derive(Debug, Args)]
pub struct CleanArgs {
    #[command(flatten)]
    store: StoreArgs,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 30d, 12h, 45m or 10s"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// Bytes as text, a key's named roots as `$PROJECT` and `$HOME`.
fn bytes_text(bytes: &[u8]) -> String {
    crate::engine::key::display_named(bytes)
}

fn store_path_text(path: &StorePath) -> String {
    match path {
        StorePath::Project(rel) if rel.is_empty() => "$PROJECT".into(),
        StorePath::Project(rel) => format!("$PROJECT/{}", bytes_text(rel)),
        StorePath::Absolute(abs) => bytes_text(abs),
    }
}

fn command_text(info: &ThunkInfo) -> String {
    info.key
        .argv
        .iter()
        .map(|a| bytes_text(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ago(ns: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let secs = (now - ns / 1_000_000_000).max(0);
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

fn observed_text(observed: &Observed) -> String {
    match observed {
        Observed::Absent => "absent".into(),
        Observed::Content { digest, stat } => {
            format!("content {} ({} bytes)", &hex(digest)[..16], stat.size)
        }
        Observed::Meta {
            kind, mode, size, ..
        } => format!("{kind:?} mode {mode:o} size {size}"),
        Observed::Listing { digest } => format!("listing {}", &hex(digest)[..16]),
        Observed::Link { target } => format!("-> {}", bytes_text(target)),
    }
}

fn output_text(state: &OutputState) -> String {
    match state {
        OutputState::File { digest, mode, size } => {
            format!("file {} mode {mode:o} ({size} bytes)", &hex(digest)[..16])
        }
        OutputState::Symlink { target } => format!("symlink -> {}", bytes_text(target)),
        OutputState::Dir { mode } => format!("directory mode {mode:o}"),
        OutputState::Deleted => "deleted".into(),
    }
}

fn input_json(input: &Input) -> Value {
    json!({"path": store_path_text(&input.path), "kind": format!("{:?}", input.kind).to_lowercase(), "observed": observed_text(&input.observed)})
}

fn output_json(output: &Output) -> Value {
    json!({"path": store_path_text(&output.path), "state": output_text(&output.state)})
}

fn trace_json(id: &[u8], trace: &Trace) -> Value {
    json!({
        "trace": hex(id),
        "ran_at_ns": trace.ran_at_ns,
        "duration_ms": trace.duration_ns as f64 / 1e6,
        "exit_code": trace.exit_code,
        "stdout": hex(&trace.stdout),
        "stderr": hex(&trace.stderr),
        "inputs": trace.inputs.iter().map(input_json).collect::<Vec<_>>(),
        "outputs": trace.outputs.iter().map(output_json).collect::<Vec<_>>(),
        "children": trace.children.iter().map(|c| json!({"thunk": hex(&c.id), "exit_code": c.exit_code})).collect::<Vec<_>>(),
        "events": trace.events.iter().map(|e| match e {
            SyncEvent::Start(i) => format!("start {i}"),
            SyncEvent::End(i) => format!("end {i}"),
        }).collect::<Vec<_>>(),
        "internal": trace.internal.iter().map(input_json).collect::<Vec<_>>(),
    })
}

fn thunk_json(id: &[u8], info: &ThunkInfo) -> Value {
    json!({
        "thunk": hex(id),
        "argv": info.key.argv.iter().map(|a| bytes_text(a)).collect::<Vec<_>>(),
        "cwd": store_path_text(&info.key.cwd),
        "env": info.key.env.iter().map(|(k, v)| format!("{}={}", bytes_text(k), bytes_text(v))).collect::<Vec<_>>(),
        "system_root": bytes_text(&info.key.system_root),
        "traces": info.traces.len(),
        "last_used_ns": info.last_used_ns,
    })
}

pub fn show(args: ShowArgs) -> Result<u8> {
    let mut project = args.store.open()?;
    match args.thunk {
        None => {
            let thunks = project.thunks()?;
            if args.json {
                let list: Vec<Value> = thunks
                    .iter()
                    .map(|(id, info)| thunk_json(id, info))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            for (id, info) in &thunks {
                println!(
                    "{}  {:>8}  {} trace{}  {}",
                    &hex(id)[..12],
                    ago(info.last_used_ns),
                    info.traces.len(),
                    if info.traces.len() == 1 { " " } else { "s" },
                    command_text(info)
                );
            }
            if thunks.is_empty() {
                eprintln!("cot: no thunks recorded in this project yet");
            }
        }
        Some(prefix) => {
            let (id, info, traces) = project.thunk(&prefix)?;
            if args.json {
                let mut value = thunk_json(&id, &info);
                value["trace_list"] = traces.iter().map(|(tid, t)| trace_json(tid, t)).collect();
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(0);
            }
            println!("thunk {}", hex(&id));
            println!("  command: {}", command_text(&info));
            println!("  cwd: {}", store_path_text(&info.key.cwd));
            for (name, value) in &info.key.env {
                println!("  env: {}={}", bytes_text(name), bytes_text(value));
            }
            println!("  system root: {}", bytes_text(&info.key.system_root));
            if let Some((parent, n)) = &info.key.parent {
                println!("  parent: {} (request {n} of its kind)", &hex(parent)[..12]);
            }
            if let Some(target) = &info.key.target {
                println!("  make target: {}", bytes_text(target));
            }
            for (tid, trace) in &traces {
                println!(
                    "trace {} ({}, {:.1} ms, exit status {})",
                    &hex(tid)[..12],
                    ago(trace.ran_at_ns),
                    trace.duration_ns as f64 / 1e6,
                    trace.exit_code
                );
                for input in &trace.inputs {
                    println!(
                        "  in  {:<8} {}  {}",
                        format!("{:?}", input.kind).to_lowercase(),
                        store_path_text(&input.path),
                        observed_text(&input.observed)
                    );
                }
                for output in &trace.outputs {
                    println!(
                        "  out {}  {}",
                        store_path_text(&output.path),
                        output_text(&output.state)
                    );
                }
                for input in &trace.internal {
                    println!(
                        "  saw {:<8} {}  (written by its children)",
                        format!("{:?}", input.kind).to_lowercase(),
                        store_path_text(&input.path)
                    );
                }
                // The synchronization operations, in order: `run` requests a child, `got` is
                // when its result reached the thunk.
                for event in &trace.events {
                    let (verb, index) = match event {
                        SyncEvent::Start(i) => ("run", *i),
                        SyncEvent::End(i) => ("got", *i),
                    };
                    if let Some(child) = trace.children.get(index as usize) {
                        println!(
                            "  {verb} child {}  (exit status {})",
                            &hex(&child.id)[..12],
                            child.exit_code
                        );
                    }
                }
            }
        }
    }
    Ok(0)
}

pub fn query(args: QueryArgs) -> Result<u8> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let path = cwd.join(&args.path);
    // The file itself may be gone (a deleted output): resolve its directory only.
    let path = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?
            .join(name),
        _ => path,
    };
    let mut project = args.store.open()?;
    let Some((id, info, trace)) = project.query(&path)? else {
        eprintln!("cot: no recorded thunk wrote {}", path.display());
        return Ok(1);
    };
    if args.json {
        let mut value = thunk_json(&id, &info);
        value["trace"] = trace_json(&[], &trace);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    println!("{} was made by thunk {}", path.display(), &hex(&id)[..12]);
    println!("  command: {}", command_text(&info));
    println!("  cwd: {}", store_path_text(&info.key.cwd));
    println!("  inputs:");
    for input in &trace.inputs {
        if matches!(input.observed, Observed::Content { .. }) {
            println!("    {}", store_path_text(&input.path));
        }
    }
    Ok(0)
}

pub fn gc(args: GcArgs) -> Result<u8> {
    let mut project = args.store.open()?;
    let before = SystemTime::now()
        .checked_sub(args.older_than)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let report = project.gc(before)?;
    println!(
        "freed {} thunks ({} traces), {} file states, {} content objects ({} bytes)",
        report.thunks, report.traces, report.file_states, report.objects, report.bytes
    );
    if let Some(dir) = &report.shared_cache_kept {
        eprintln!(
            "cot: the shared cache {} was left alone: other checkouts may need it",
            dir.display()
        );
    }
    Ok(0)
}

pub fn clean(args: CleanArgs) -> Result<u8> {
    let mut project = args.store.open()?;
    let removed = project.clean()?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    eprintln!("cot: removed {} outputs", removed.len());
    Ok(0)
}
