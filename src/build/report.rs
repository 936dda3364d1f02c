//! Build reports (`--report FILE`): what every thunk of a build did, and why.
//!
//! `--report FILE` writes what a build did, one [`ThunkReport`] per thunk in request order, in
//! the format named by FILE's extension:
//!
//! - `.json`: the [`BuildReport`] itself, pretty-printed; the other two are views of it.
//! - `.trace`: the Chrome trace-event format (JSON object form), for Perfetto or
//!   `chrome://tracing`. Every thunk that ran is a complete (`"X"`) event on a lane (`tid`) of
//!   its own for as long as it ran; reused thunks are instant events on lane 0. Times are in
//!   microseconds since the build started, as the format requires.
//! - `.html`: one self-contained page, readable without JavaScript and without a network: the
//!   thunk tree as nested `<details>`, each thunk with its state, command, timing, reason,
//!   inputs and outputs, and the report JSON embedded for anyone who wants to script it.
//!
//! The report is written once, at the end of the build; [`check_path`] runs before the build so
//! that a misspelt `--report` does not cost a whole build.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What happened to a thunk in this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThunkState {
    New,
    Dirty,
    Clean,
    Damaged,
    Stale,
    Skipped,
    Failed,
}

impl ThunkState {
    /// Every state, in the order the HTML summary counts them.
    pub const ALL: [ThunkState; 7] = [
        ThunkState::New,
        ThunkState::Dirty,
        ThunkState::Clean,
        ThunkState::Damaged,
        ThunkState::Stale,
        ThunkState::Skipped,
        ThunkState::Failed,
    ];

    /// The name used in every format, the same as the serde name.
    pub fn as_str(self) -> &'static str {
        match self {
            ThunkState::New => "new",
            ThunkState::Dirty => "dirty",
            ThunkState::Clean => "clean",
            ThunkState::Damaged => "damaged",
            ThunkState::Stale => "stale",
            ThunkState::Skipped => "skipped",
            ThunkState::Failed => "failed",
        }
    }
}

/// One thunk of the build: what it is, what cot decided and why, and what it touched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThunkReport {
    /// The thunk id in hex.
    pub id: String,
    /// Hex id of the thunk that requested this one; `None` for the root.
    pub parent: Option<String>,
    /// The command line, shell-quoted for display.
    pub command: String,
    /// The make target, under `cot make`.
    pub target: Option<String>,
    pub cwd: String,
    pub state: ThunkState,
    /// Why it ran or why not, e.g. "src/a.c changed (content)", "cached: 120 inputs unchanged".
    pub reason: String,
    /// Executed in this build, as opposed to reused.
    pub ran: bool,
    pub exit_code: Option<i32>,
    /// Milliseconds since the build started.
    pub start_ms: f64,
    /// 0 for a reused thunk, or the time the decision took.
    pub duration_ms: f64,
    /// Paths read, project-relative when under the project.
    pub inputs: Vec<String>,
    /// Paths written, project-relative when under the project.
    pub outputs: Vec<String>,
}

/// A whole build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildReport {
    /// The cot command line, e.g. "cot make -j2".
    pub command: String,
    pub project: String,
    pub started_unix_ms: u64,
    pub duration_ms: f64,
    pub jobs: usize,
    pub exit_code: i32,
    /// In request order; parents before their children.
    pub thunks: Vec<ThunkReport>,
}

/// Why a report cannot be written; every variant names the report's path.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The extension names no format.
    #[error("--report FILE must end in .json, .trace or .html: {}", path.display())]
    Extension { path: PathBuf },

    /// The report's directory does not exist, found before the build rather than after it.
    #[error("cannot write report {}: directory {} does not exist", path.display(), dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },

    /// Writing the file failed.
    #[error("cannot write report {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// A report format, chosen by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Trace,
    Html,
}

impl Format {
    /// The format named by `path`'s extension, in any letter case.
    pub fn from_path(path: &Path) -> Result<Format, ReportError> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        [
            ("json", Format::Json),
            ("trace", Format::Trace),
            ("html", Format::Html),
        ]
        .into_iter()
        .find(|(name, _)| extension.eq_ignore_ascii_case(name))
        .map(|(_, format)| format)
        .ok_or_else(|| ReportError::Extension {
            path: path.to_path_buf(),
        })
    }
}

/// Checks the extension before the build starts, so a bad `--report` fails fast; also that the
/// directory exists, which is the other mistake that would only show after the build.
pub fn check_path(path: &Path) -> Result<(), ReportError> {
    Format::from_path(path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(ReportError::NoDirectory {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
            })
        }
        _ => Ok(()),
    }
}

/// Writes the report in the format named by `path`'s extension: `.json`, `.trace` (Chrome
/// trace-event format) or `.html`.
pub fn write(report: &BuildReport, path: &Path) -> Result<(), ReportError> {
    let text = render(report, Format::from_path(path)?);
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The report as the text of a file in `format`.
pub fn render(report: &BuildReport, format: Format) -> String {
    match format {
        Format::Json => {
            let mut text = serde_json::to_string_pretty(report)
                .expect("a BuildReport has only string keys and plain values");
            text.push('\n');
            text
        }
        Format::Trace => {
            let mut text = trace_events(report).to_string();
            text.push('\n');
            text
        }
        Format::Html => {
            let mut html = String::new();
            write_html(&mut html, report).expect("writing to a String cannot fail");
            html
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chrome trace-event format

/// Microseconds per millisecond: the report keeps milliseconds, trace events want µs.
const US_PER_MS: f64 = 1000.0;

/// The lane (`tid`) of reused thunks; thunks that ran use lanes 1 and up.
const REUSED_LANE: usize = 0;

/// The trace as the JSON object form of the trace-event format.
fn trace_events(report: &BuildReport) -> Value {
    let lanes = assign_lanes(report);
    let mut events = vec![json!({
        "ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": "cot build"},
    })];
    let lane_count = lanes.iter().flatten().max().copied().unwrap_or(0);
    for lane in 1..=lane_count {
        events.push(json!({
            "ph": "M", "pid": 1, "tid": lane, "name": "thread_name",
            "args": {"name": format!("lane {lane}")},
        }));
        events.push(json!({
            "ph": "M", "pid": 1, "tid": lane, "name": "thread_sort_index", "args": {"sort_index": lane},
        }));
    }
    if report.thunks.iter().any(|t| !t.ran) {
        events.push(json!({
            "ph": "M", "pid": 1, "tid": REUSED_LANE, "name": "thread_name",
            "args": {"name": "reused (not run)"},
        }));
        // Sorts the reused lane below the lanes that did work.
        events.push(json!({
            "ph": "M", "pid": 1, "tid": REUSED_LANE, "name": "thread_sort_index",
            "args": {"sort_index": lane_count + 1},
        }));
    }
    for (thunk, lane) in report.thunks.iter().zip(&lanes) {
        let name = thunk.target.as_deref().unwrap_or(&thunk.command);
        let args = json!({
            "id": thunk.id,
            "parent": thunk.parent,
            "reason": thunk.reason,
            "exit_code": thunk.exit_code,
            "command": thunk.command,
            "cwd": thunk.cwd,
        });
        let ts = thunk.start_ms * US_PER_MS;
        events.push(match lane {
            Some(lane) => json!({
                "ph": "X", "pid": 1, "tid": lane, "name": name, "cat": thunk.state.as_str(),
                "ts": ts, "dur": thunk.duration_ms.max(0.0) * US_PER_MS, "args": args,
            }),
            None => json!({
                "ph": "i", "s": "t", "pid": 1, "tid": REUSED_LANE, "name": name,
                "cat": thunk.state.as_str(), "ts": ts, "args": args,
            }),
        });
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "command": report.command,
            "project": report.project,
            "started_unix_ms": report.started_unix_ms,
            "jobs": report.jobs,
            "exit_code": report.exit_code,
        },
    })
}

/// The lane of each thunk that ran (`None` for reused ones), such that thunks overlapping in
/// time never share a lane. Greedy by start time, always taking the lowest free lane: for
/// intervals that uses the fewest lanes possible, and it is deterministic.
fn assign_lanes(report: &BuildReport) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..report.thunks.len())
        .filter(|&i| report.thunks[i].ran)
        .collect();
    order.sort_by(|&a, &b| {
        let (a_start, b_start) = (report.thunks[a].start_ms, report.thunks[b].start_ms);
        a_start.total_cmp(&b_start).then(a.cmp(&b))
    });
    let mut lanes = vec![None; report.thunks.len()];
    // The time each lane is busy until, lane 1 first.
    let mut busy_until: Vec<f64> = Vec::new();
    for index in order {
        let thunk = &report.thunks[index];
        let end = thunk.start_ms + thunk.duration_ms.max(0.0);
        let lane = match busy_until.iter().position(|&until| until <= thunk.start_ms) {
            Some(free) => free,
            None => {
                busy_until.push(end);
                busy_until.len() - 1
            }
        };
        busy_until[lane] = end;
        lanes[index] = Some(lane + 1);
    }
    lanes
}

// ---------------------------------------------------------------------------------------------
// HTML

/// Styles for the page; one colour per state, the same in the summary and the tree.
const CSS: &str = r#"
:root { font-family: system-ui, sans-serif; font-size: 14px; color: #222; background: #fff; }
body { margin: 1.5em; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
code, .path { font-family: ui-monospace, monospace; }
.summary { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; margin-bottom: 1em; }
.summary p { margin: .3em 0; }
.badge { display: inline-block; min-width: 4.5em; text-align: center; border-radius: 3px;
  padding: 0 .4em; color: #fff; font-size: .85em; font-weight: 600; }
.s-new { background: #1f6feb; } .s-dirty { background: #d97706; } .s-clean { background: #15803d; }
.s-damaged { background: #7c3aed; } .s-stale { background: #a16207; }
.s-skipped { background: #6b7280; } .s-failed { background: #dc2626; }
.exit-ok { color: #15803d; font-weight: 600; } .exit-bad { color: #dc2626; font-weight: 600; }
details.thunk { margin: .15em 0 .15em 0; }
details.thunk > summary { cursor: pointer; padding: .1em 0; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
details.thunk > summary:hover { background: #f3f4f6; }
.body { margin-left: 1.2em; padding-left: .8em; border-left: 2px solid #e5e7eb; }
.meta { color: #555; margin: .2em 0; }
.meta span { margin-right: 1.2em; }
.reason { color: #555; }
.time { color: #555; display: inline-block; min-width: 5em; text-align: right; }
.bar { display: inline-block; width: 120px; height: .7em; background: #f3f4f6; vertical-align: middle;
  position: relative; }
.bar i { position: absolute; top: 0; bottom: 0; background: #9ca3af; min-width: 1px; }
details.files > summary { cursor: pointer; color: #555; }
details.files ul { margin: .2em 0; padding-left: 1.5em; }
.hide { display: none; }
#filter { width: 30em; padding: .3em; margin-bottom: .6em; }
"#;

/// Shows the filter box (hidden when JavaScript is off, where it could not work) and filters
/// the tree: a thunk stays visible when its own line matches or a descendant's does, and the
/// way to every match is opened.
const SCRIPT: &str = r#"
(function () {
  var box = document.getElementById('filter');
  box.hidden = false;
  box.addEventListener('input', function () {
    var q = box.value.trim().toLowerCase();
    var all = document.querySelectorAll('details.thunk');
    all.forEach(function (d) { d.classList.toggle('hide', q !== ''); });
    if (q === '') return;
    all.forEach(function (d) {
      if (d.querySelector(':scope > summary').textContent.toLowerCase().indexOf(q) < 0) return;
      for (var e = d; e; e = e.parentElement && e.parentElement.closest('details.thunk')) {
        e.classList.remove('hide');
        if (e !== d) e.open = true;
      }
    });
  });
})();
"#;

/// The whole page. Nothing is loaded from anywhere: the CSP forbids it, so a report stays
/// readable offline and cannot leak anything when opened.
fn write_html(out: &mut String, report: &BuildReport) -> fmt::Result {
    let tree = Tree::new(report);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n",
    );
    writeln!(
        out,
        "<title>cot report: {}</title>",
        escape(&report.command)
    )?;
    writeln!(out, "<style>{CSS}</style>\n</head>\n<body>")?;
    write_summary(out, report)?;
    out.push_str(
        "<input id=\"filter\" type=\"search\" placeholder=\"filter: command, target, state, reason\" \
         hidden>\n<div class=\"tree\">\n",
    );
    write_tree(out, report, &tree)?;
    out.push_str("</div>\n<script type=\"application/json\" id=\"report-data\">");
    out.push_str(&script_safe_json(report));
    writeln!(
        out,
        "</script>\n<script>{SCRIPT}</script>\n</body>\n</html>"
    )
}

fn write_summary(out: &mut String, report: &BuildReport) -> fmt::Result {
    let ran = report.thunks.iter().filter(|t| t.ran).count();
    out.push_str("<div class=\"summary\">\n");
    writeln!(out, "<h1><code>{}</code></h1>", escape(&report.command))?;
    writeln!(
        out,
        "<p>project <code>{}</code> · started {} · {} jobs</p>",
        escape(&report.project),
        utc_time(report.started_unix_ms),
        report.jobs
    )?;
    let exit_class = if report.exit_code == 0 {
        "exit-ok"
    } else {
        "exit-bad"
    };
    writeln!(
        out,
        "<p>{} thunks, {ran} ran · total time {} · exit code <span class=\"{exit_class}\">{}</span></p>",
        report.thunks.len(),
        duration_text(report.duration_ms),
        report.exit_code
    )?;
    out.push_str("<p class=\"counts\">");
    for state in ThunkState::ALL {
        let count = report.thunks.iter().filter(|t| t.state == state).count();
        if count > 0 {
            let name = state.as_str();
            write!(
                out,
                "<span class=\"count\"><span class=\"badge s-{name}\">{name}</span> {count}</span> "
            )?;
        }
    }
    out.push_str("</p>\n</div>\n");
    Ok(())
}

/// The thunks as a tree: children in request order under the thunk that requested them.
struct Tree {
    /// The children of each thunk, by index.
    children: Vec<Vec<usize>>,
    /// Thunks with no parent, or whose parent is not in the report (so that none is lost).
    roots: Vec<usize>,
    /// Thunks drawn open: the roots and everything on the way to a failed thunk.
    open: Vec<bool>,
    /// The end of the last thunk or of the build, whichever is later: the timing bars' scale.
    span_ms: f64,
}

impl Tree {
    fn new(report: &BuildReport) -> Tree {
        let thunks = &report.thunks;
        let mut index_of = HashMap::new();
        for (index, thunk) in thunks.iter().enumerate() {
            index_of.entry(thunk.id.as_str()).or_insert(index);
        }
        let parent_of: Vec<Option<usize>> = thunks
            .iter()
            .enumerate()
            .map(|(index, thunk)| {
                let parent = *index_of.get(thunk.parent.as_deref()?)?;
                (parent != index).then_some(parent)
            })
            .collect();
        let mut children = vec![Vec::new(); thunks.len()];
        let mut roots = Vec::new();
        for (index, parent) in parent_of.iter().enumerate() {
            match parent {
                Some(parent) => children[*parent].push(index),
                None => roots.push(index),
            }
        }
        let mut open = vec![false; thunks.len()];
        for &root in &roots {
            open[root] = true;
        }
        for (index, thunk) in thunks.iter().enumerate() {
            if thunk.state != ThunkState::Failed {
                continue;
            }
            // Bounded by the number of thunks, in case the parent links form a cycle.
            let mut current = parent_of[index];
            for _ in 0..thunks.len() {
                let Some(parent) = current else { break };
                open[parent] = true;
                current = parent_of[parent];
            }
        }
        let span_ms = thunks
            .iter()
            .map(|t| t.start_ms + t.duration_ms)
            .fold(report.duration_ms, f64::max);
        Tree {
            children,
            roots,
            open,
            span_ms,
        }
    }
}

/// Writes the tree without recursion, so a deep chain of nested builds cannot overflow the
/// stack. Thunks in a parent cycle (unreachable from any root) are drawn as roots of their own,
/// each once.
fn write_tree(out: &mut String, report: &BuildReport, tree: &Tree) -> fmt::Result {
    enum Step {
        Open(usize),
        Close,
    }
    let mut drawn = vec![false; report.thunks.len()];
    let starts = tree.roots.iter().copied().chain(0..report.thunks.len());
    for start in starts {
        if drawn[start] {
            continue;
        }
        let mut stack = vec![Step::Open(start)];
        while let Some(step) = stack.pop() {
            match step {
                Step::Close => out.push_str("</div>\n</div>\n</details>\n"),
                Step::Open(index) => {
                    if std::mem::replace(&mut drawn[index], true) {
                        continue;
                    }
                    write_thunk_open(out, &report.thunks[index], tree, index)?;
                    stack.push(Step::Close);
                    stack.extend(tree.children[index].iter().rev().map(|&c| Step::Open(c)));
                }
            }
        }
    }
    Ok(())
}

/// One thunk's `<details>`, up to where its children go; `write_tree` closes it.
fn write_thunk_open(
    out: &mut String,
    thunk: &ThunkReport,
    tree: &Tree,
    index: usize,
) -> fmt::Result {
    let state = thunk.state.as_str();
    let open = if tree.open[index] { " open" } else { "" };
    writeln!(
        out,
        "<details class=\"thunk\" id=\"thunk-{}\" data-state=\"{state}\"{open}>",
        escape(&thunk.id)
    )?;
    write!(
        out,
        "<summary><span class=\"badge s-{state}\">{state}</span> "
    )?;
    let span = if tree.span_ms > 0.0 {
        tree.span_ms
    } else {
        1.0
    };
    let left = (thunk.start_ms / span * 100.0).clamp(0.0, 100.0);
    let width = (thunk.duration_ms / span * 100.0).clamp(0.0, 100.0 - left);
    write!(
        out,
        "<span class=\"bar\" title=\"+{} for {}\"><i style=\"left:{left:.2}%;width:{width:.2}%\"></i></span> ",
        duration_text(thunk.start_ms),
        duration_text(thunk.duration_ms)
    )?;
    let time = if thunk.ran {
        duration_text(thunk.duration_ms)
    } else {
        "reused".to_string()
    };
    write!(out, "<span class=\"time\">{time}</span> ")?;
    if let Some(target) = &thunk.target {
        write!(out, "<b class=\"target\">{}</b> ", escape(target))?;
    }
    writeln!(
        out,
        "<code class=\"cmd\">{}</code> <span class=\"reason\">— {}</span></summary>",
        escape(&thunk.command),
        escape(&thunk.reason)
    )?;
    out.push_str("<div class=\"body\">\n<div class=\"meta\">");
    write!(out, "<span>id <code>{}</code></span>", escape(&thunk.id))?;
    write!(out, "<span>cwd <code>{}</code></span>", escape(&thunk.cwd))?;
    write!(
        out,
        "<span>started +{}</span>",
        duration_text(thunk.start_ms)
    )?;
    if let Some(code) = thunk.exit_code {
        let class = if code == 0 { "exit-ok" } else { "exit-bad" };
        write!(
            out,
            "<span>exit code <span class=\"{class}\">{code}</span></span>"
        )?;
    }
    out.push_str("</div>\n");
    write_paths(out, "input", &thunk.inputs)?;
    write_paths(out, "output", &thunk.outputs)?;
    out.push_str("<div class=\"children\">\n");
    Ok(())
}

fn write_paths(out: &mut String, kind: &str, paths: &[String]) -> fmt::Result {
    if paths.is_empty() {
        return Ok(());
    }
    let plural = if paths.len() == 1 { "" } else { "s" };
    writeln!(
        out,
        "<details class=\"files {kind}s\"><summary>{} {kind}{plural}</summary><ul>",
        paths.len()
    )?;
    for path in paths {
        writeln!(out, "<li class=\"path\">{}</li>", escape(path))?;
    }
    out.push_str("</ul></details>\n");
    Ok(())
}

/// Escapes text for HTML content and for quoted attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The report JSON, safe inside `<script>`: no `<` at all, rather than only `</`, because
/// `<!--` followed by `<script` puts the HTML parser in a state where the closing `</script>`
/// no longer ends the element. `<` only occurs inside JSON strings, where `\u003c` means the
/// same, so the text still parses to the same report.
fn script_safe_json(report: &BuildReport) -> String {
    serde_json::to_string(report)
        .expect("a BuildReport has only string keys and plain values")
        .replace('<', "\\u003c")
}

/// "850 ms", "12.3 s", "4m 05s": precise for short thunks, readable for long builds.
fn duration_text(ms: f64) -> String {
    if !ms.is_finite() {
        return "?".to_string();
    }
    let ms = ms.max(0.0);
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let seconds = (ms / 1000.0).round() as u64;
        format!("{}m {:02}s", seconds / 60, seconds % 60)
    }
}

/// A Unix time as "2024-05-01 12:34:56 UTC", without a date library for one line of the page.
fn utc_time(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let (days, time) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thunk(
        id: &str,
        parent: Option<&str>,
        command: &str,
        start_ms: f64,
        duration_ms: f64,
    ) -> ThunkReport {
        ThunkReport {
            id: id.into(),
            parent: parent.map(Into::into),
            command: command.into(),
            target: None,
            cwd: "/w".into(),
            state: ThunkState::New,
            reason: "never built".into(),
            ran: true,
            exit_code: Some(0),
            start_ms,
            duration_ms,
            inputs: vec![],
            outputs: vec![],
        }
    }

    /// The root make, two compiles overlapping in time (one failed, one with a nested
    /// assembler run), a reused thunk, and a command full of HTML.
    fn sample() -> BuildReport {
        let root = ThunkReport {
            target: Some("all".into()),
            inputs: vec!["Makefile".into()],
            ..thunk("aa00", None, "make -j2", 0.0, 1000.0)
        };
        let compile = ThunkReport {
            target: Some("a.o".into()),
            state: ThunkState::Dirty,
            reason: "src/a.c changed (content)".into(),
            inputs: vec!["src/a.c".into(), "/usr/include/stdio.h".into()],
            outputs: vec!["a.o".into()],
            ..thunk("bb01", Some("aa00"), "cc -c src/a.c -o a.o", 100.0, 300.0)
        };
        let assemble = ThunkReport {
            outputs: vec!["a.o".into()],
            ..thunk("cc02", Some("bb01"), "as -o a.o /tmp/a.s", 200.0, 100.0)
        };
        let failed = ThunkReport {
            state: ThunkState::Failed,
            exit_code: Some(1),
            reason: "never built".into(),
            ..thunk(
                "dd03",
                Some("aa00"),
                "sh -c 'echo \"<script>alert(1)</script>\" && test 1 < 0'",
                150.0,
                350.0,
            )
        };
        let reused = ThunkReport {
            state: ThunkState::Clean,
            reason: "cached: 120 inputs unchanged".into(),
            ran: false,
            exit_code: None,
            outputs: vec!["b.o".into()],
            ..thunk("ee04", Some("aa00"), "cc -c src/b.c -o b.o", 120.0, 0.0)
        };
        BuildReport {
            command: "cot make -j2".into(),
            project: "/w".into(),
            started_unix_ms: 1_714_566_896_000,
            duration_ms: 1010.0,
            jobs: 2,
            exit_code: 2,
            thunks: vec![root, compile, assemble, failed, reused],
        }
    }

    fn write_to_dir(report: &BuildReport, name: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        check_path(&path).unwrap();
        write(report, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        (dir, text)
    }

    #[test]
    fn json_round_trips() {
        let report = sample();
        let (_dir, text) = write_to_dir(&report, "r.json");
        let parsed: BuildReport = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, report);
        assert!(
            text.contains("\"state\": \"failed\""),
            "states are lowercase"
        );
    }

    #[test]
    fn trace_has_one_complete_event_per_thunk_that_ran_on_non_overlapping_lanes() {
        let report = sample();
        let (_dir, text) = write_to_dir(&report, "r.trace");
        let trace: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(trace["displayTimeUnit"], "ms");
        let events = trace["traceEvents"].as_array().unwrap();
        let complete: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(
            complete.len(),
            report.thunks.iter().filter(|t| t.ran).count()
        );

        for thunk in report.thunks.iter().filter(|t| t.ran) {
            let event = complete
                .iter()
                .find(|e| e["args"]["id"] == thunk.id.as_str())
                .unwrap();
            assert_eq!(event["ts"].as_f64().unwrap(), thunk.start_ms * 1000.0);
            assert_eq!(event["dur"].as_f64().unwrap(), thunk.duration_ms * 1000.0);
            assert_eq!(event["pid"], 1);
            assert_eq!(event["cat"], thunk.state.as_str());
            assert_eq!(event["args"]["reason"], thunk.reason.as_str());
            assert_eq!(event["args"]["exit_code"], json!(thunk.exit_code));
            assert_eq!(event["args"]["parent"], json!(thunk.parent));
            let name = thunk.target.as_ref().unwrap_or(&thunk.command);
            assert_eq!(event["name"], name.as_str());
        }

        let mut by_lane: HashMap<u64, Vec<(f64, f64)>> = HashMap::new();
        for event in &complete {
            let ts = event["ts"].as_f64().unwrap();
            let end = ts + event["dur"].as_f64().unwrap();
            by_lane
                .entry(event["tid"].as_u64().unwrap())
                .or_default()
                .push((ts, end));
        }
        for spans in by_lane.values_mut() {
            spans.sort_by(|a, b| a.0.total_cmp(&b.0));
            for pair in spans.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "overlap on one lane: {pair:?}");
            }
        }
        // make, cc and the failed sh all overlap at 250 ms; as fits after nothing else there.
        assert_eq!(by_lane.len(), 4);

        let reused: Vec<&Value> = events.iter().filter(|e| e["ph"] == "i").collect();
        assert_eq!(reused.len(), 1);
        assert_eq!(reused[0]["args"]["id"], "ee04");
        let process = events
            .iter()
            .find(|e| e["ph"] == "M" && e["name"] == "process_name")
            .unwrap();
        assert_eq!(process["args"]["name"], "cot build");
        for lane in by_lane.keys() {
            assert!(events.iter().any(|e| e["ph"] == "M"
                && e["name"] == "thread_name"
                && e["tid"].as_u64() == Some(*lane)));
        }
    }

    #[test]
    fn lanes_are_reused_once_free_and_never_shared_while_busy() {
        let report = BuildReport {
            thunks: vec![
                thunk("1", None, "a", 0.0, 10.0),
                thunk("2", None, "b", 5.0, 10.0),
                thunk("3", None, "c", 10.0, 10.0),
                thunk("4", None, "d", 15.0, 1.0),
                ThunkReport {
                    ran: false,
                    ..thunk("5", None, "e", 1.0, 0.0)
                },
            ],
            ..sample()
        };
        assert_eq!(
            assign_lanes(&report),
            vec![Some(1), Some(2), Some(1), Some(2), None]
        );
    }

    /// Finds the `</details>` that closes the `<details` starting at `open`.
    fn details_end(html: &str, open: usize) -> usize {
        let mut depth = 0;
        let mut at = open;
        loop {
            let next_open = html[at..].find("<details").map(|i| i + at);
            let next_close = html[at..].find("</details>").map(|i| i + at).unwrap();
            match next_open {
                Some(o) if o < next_close => {
                    depth += 1;
                    at = o + 1;
                }
                _ => {
                    depth -= 1;
                    if depth == 0 {
                        return next_close;
                    }
                    at = next_close + 1;
                }
            }
        }
    }

    #[test]
    fn html_is_one_escaped_self_contained_file_with_the_tree_nested() {
        let report = sample();
        let (dir, html) = write_to_dir(&report, "r.html");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        for thunk in &report.thunks {
            assert!(html.contains(&escape(&thunk.command)), "{}", thunk.command);
        }
        assert!(html.contains(
            "echo &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot; &amp;&amp; test 1 &lt; 0"
        ));
        assert!(!html.contains("<script>alert"));
        assert_eq!(
            html.matches("<script").count(),
            2,
            "the data and the filter"
        );
        assert_eq!(html.matches("</script>").count(), 2);
        for external in ["http:", "https:", "<link", " src=", "@import", "url("] {
            assert!(!html.contains(external), "{external}");
        }

        let position = |id: &str| {
            html.find(&format!("<details class=\"thunk\" id=\"thunk-{id}\""))
                .unwrap()
        };
        let root = position("aa00");
        let root_end = details_end(&html, root);
        let compile = position("bb01");
        let compile_end = details_end(&html, compile);
        for child in ["bb01", "dd03", "ee04"] {
            let at = position(child);
            assert!(root < at && at < root_end, "{child} is inside the root");
        }
        let assemble = position("cc02");
        assert!(compile < assemble && assemble < compile_end);
        assert!(!(compile..compile_end).contains(&position("dd03")));

        assert!(html.contains("<span class=\"badge s-failed\">failed</span> 1"));
        assert!(html.contains("<span class=\"badge s-clean\">clean</span> 1"));
        assert!(html.contains("exit code <span class=\"exit-bad\">2</span>"));
        assert!(html.contains("2024-05-01 12:34:56 UTC"));
        assert!(html.contains("2 inputs</summary>"));
        assert!(html.contains("<li class=\"path\">/usr/include/stdio.h</li>"));
    }

    #[test]
    fn html_embeds_the_report_json() {
        let report = sample();
        let html = render(&report, Format::Html);
        let start_tag = "<script type=\"application/json\" id=\"report-data\">";
        let start = html.find(start_tag).unwrap() + start_tag.len();
        let end = start + html[start..].find("</script>").unwrap();
        let embedded = &html[start..end];
        assert!(!embedded.contains('<'));
        let parsed: BuildReport = serde_json::from_str(embedded).unwrap();
        assert_eq!(parsed, report);
    }

    #[test]
    fn html_comment_opener_in_a_command_cannot_swallow_the_page() {
        let mut report = sample();
        report.thunks[1].command = "echo '<!--<script>'".into();
        let html = render(&report, Format::Html);
        let data = html.find("id=\"report-data\">").unwrap();
        let data_end = data + html[data..].find("</script>").unwrap();
        assert!(!html[data..data_end].contains("<!--"));
    }

    #[test]
    fn parent_cycles_and_missing_parents_still_draw_every_thunk_once() {
        let report = BuildReport {
            thunks: vec![
                thunk("1", Some("2"), "one", 0.0, 1.0),
                thunk("2", Some("1"), "two", 0.0, 1.0),
                thunk("3", Some("gone"), "three", 0.0, 1.0),
            ],
            ..sample()
        };
        let html = render(&report, Format::Html);
        for id in ["1", "2", "3"] {
            assert_eq!(html.matches(&format!("id=\"thunk-{id}\"")).count(), 1);
        }
        assert_eq!(html.matches("<details class=\"thunk\"").count(), 3);
        assert_eq!(
            html.matches("<details").count(),
            html.matches("</details>").count()
        );
    }

    #[test]
    fn wrong_extension_names_the_path() {
        let err = check_path(Path::new("/x/r.txt")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--report FILE must end in .json, .trace or .html: /x/r.txt"
        );
        let err = write(&sample(), Path::new("/x/report")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--report FILE must end in .json, .trace or .html: /x/report"
        );
        assert_eq!(
            Format::from_path(Path::new("r.HTML")).unwrap(),
            Format::Html
        );
        check_path(Path::new("r.json")).unwrap();
    }

    #[test]
    fn missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/r.html");
        let err = check_path(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot write report {}: directory {} does not exist",
                path.display(),
                path.parent().unwrap().display()
            )
        );
        let err = write(&sample(), &path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot write report {}: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn durations_and_dates_read_well() {
        assert_eq!(duration_text(3.4), "3.4 ms");
        assert_eq!(duration_text(850.0), "850 ms");
        assert_eq!(duration_text(12_345.0), "12.35 s");
        assert_eq!(duration_text(245_000.0), "4m 05s");
        assert_eq!(duration_text(f64::NAN), "?");
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
