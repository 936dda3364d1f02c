//! The progress display of a build, like ninja's.
//!
//! On a terminal, one status line `[finished/total] command` is rewritten in place (`\r`, the
//! text, `\x1b[K` to erase what a longer previous line left) and every other line is printed
//! above it: erase the status line, print, draw it again. It shows the most recently started
//! command that is still running. Elsewhere (a log, a pipe) nothing is ever rewritten: one plain
//! line per thunk that ran, when it finishes, and no control characters at all.
//!
//! [`Progress`] is shared by every thread of a build. All its state and its writer sit behind
//! one mutex and every call writes its text with a single `write_all`, so lines from different
//! threads never interleave with each other or with the status line.
//!
//! Write errors are ignored: a closed stderr must not fail or stop a build.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Moves to the start of the line; what follows overwrites the status line.
const START_OF_LINE: &str = "\r";
/// Erases from the cursor to the end of the line.
const ERASE_LINE: &str = "\x1b[K";
const RED_BOLD: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// The width used when the terminal's is unknown.
const DEFAULT_WIDTH: usize = 80;

/// Reused thunks can be decided thousands a second; redrawing the status line for each would
/// cost more than the decisions. Started and finished thunks always redraw.
const REUSED_REDRAW_INTERVAL: Duration = Duration::from_millis(50);

/// How much the build says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// Only failures.
    Quiet,
    /// The status line on a terminal; one line per thunk that ran elsewhere.
    Normal,
    /// As Normal, plus every thunk that ran as a line with its duration, on a terminal too.
    Verbose,
}

/// The progress display; see the module documentation.
pub struct Progress {
    verbosity: Verbosity,
    tty: bool,
    color: bool,
    /// Columns of the terminal: the status line never reaches past them, or it would wrap and
    /// `\r` would no longer bring the cursor back to its start.
    width: usize,
    state: Mutex<State>,
}

struct State {
    out: Box<dyn Write + Send>,
    total: usize,
    finished: usize,
    /// Commands that started and have not finished, oldest first.
    running: Vec<String>,
    /// What the status line shows when nothing runs: the last command that did.
    last: String,
    /// Whether a status line is on screen, so output must erase it first.
    status_shown: bool,
    last_draw: Option<Instant>,
}

impl Progress {
    /// A display on stderr. `tty`: whether stderr is a terminal; `color`: false when
    /// `NO_COLOR` is set (non-empty) or not a terminal.
    pub fn new(verbosity: Verbosity, tty: bool, color: bool) -> Progress {
        Progress::with_writer(
            Box::new(io::stderr()),
            verbosity,
            tty,
            color,
            terminal_width(),
        )
    }

    /// A display on stderr, as a terminal only when stderr is one and `TERM` is not `dumb`
    /// (which cannot erase a line), coloured unless `NO_COLOR` is set to anything
    /// (<https://no-color.org>).
    pub fn from_env(verbosity: Verbosity) -> Progress {
        let tty =
            io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Progress::new(verbosity, tty, tty && !no_color)
    }

    /// A display on any writer, `width` columns wide when `tty`; for tests, and for callers
    /// that know the width better.
    pub fn with_writer(
        out: Box<dyn Write + Send>,
        verbosity: Verbosity,
        tty: bool,
        color: bool,
        width: usize,
    ) -> Progress {
        Progress {
            verbosity,
            tty,
            color,
            width: width.max(1),
            state: Mutex::new(State {
                out,
                total: 0,
                finished: 0,
                running: Vec::new(),
                last: String::new(),
                status_shown: false,
                last_draw: None,
            }),
        }
    }

    /// More thunks became known.
    pub fn add_total(&self, n: usize) {
        let mut state = self.state.lock();
        state.total += n;
        if state.status_shown {
            self.redraw(&mut state, String::new());
        }
    }

    /// A thunk starts executing.
    pub fn started(&self, command: &str) {
        let mut state = self.state.lock();
        state.running.push(printable(command));
        self.redraw(&mut state, String::new());
    }

    /// A thunk that ran has ended; it counts as finished whether it succeeded or not (its
    /// failure is printed by [`Progress::failed`]).
    pub fn finished(&self, command: &str, ok: bool, duration: Duration) {
        let mut state = self.state.lock();
        let command = printable(command);
        if let Some(at) = state.running.iter().rposition(|c| *c == command) {
            state.running.remove(at);
        }
        state.finished += 1;
        let line = match self.verbosity {
            Verbosity::Quiet => None,
            Verbosity::Normal if self.tty => None,
            Verbosity::Normal => Some(format!("{} {command}", counter(&state))),
            Verbosity::Verbose => {
                let failed = if ok { "" } else { ", failed" };
                Some(format!(
                    "{} {command} ({}{failed})",
                    counter(&state),
                    duration_text(duration)
                ))
            }
        };
        state.last = command;
        let above = line.map(|line| line + "\n").unwrap_or_default();
        self.redraw(&mut state, above);
    }

    /// A thunk was decided clean and reused; it counts as finished, silently.
    pub fn reused(&self) {
        let mut state = self.state.lock();
        state.finished += 1;
        let due = state
            .last_draw
            .is_none_or(|at| at.elapsed() >= REUSED_REDRAW_INTERVAL);
        if state.status_shown && due {
            self.redraw(&mut state, String::new());
        }
    }

    /// A line of output (thunk output, messages), above the status line. Printed at every
    /// verbosity: the caller decides what is worth saying.
    pub fn println(&self, line: &str) {
        let mut state = self.state.lock();
        self.redraw(&mut state, format!("{line}\n"));
    }

    /// A thunk failed: `FAILED: command (exit code N)`, red when coloured, then its captured
    /// output. Printed at every verbosity. Without colour, escape sequences in the output (a
    /// compiler's colours) are removed, as ninja does, so that a log stays plain text.
    pub fn failed(&self, command: &str, exit_code: i32, output: &[u8]) {
        let mut state = self.state.lock();
        let command = printable(command);
        let mut text = if self.color {
            format!("{RED_BOLD}FAILED:{RESET} {command} (exit code {exit_code})\n")
        } else {
            format!("FAILED: {command} (exit code {exit_code})\n")
        };
        let output = if self.color {
            String::from_utf8_lossy(output).into_owned()
        } else {
            String::from_utf8_lossy(&strip_escapes(output)).into_owned()
        };
        text.push_str(&output);
        if !output.is_empty() && !output.ends_with('\n') {
            text.push('\n');
        }
        self.redraw(&mut state, text);
    }

    /// The build is over: erase the status line.
    pub fn done(&self) {
        let mut state = self.state.lock();
        if state.status_shown {
            state.status_shown = false;
            let _ = write_all(&mut state.out, &format!("{START_OF_LINE}{ERASE_LINE}"));
        }
    }

    /// Prints `above` (whole lines, possibly none), then the status line when on a terminal
    /// and not quiet, in one write.
    fn redraw(&self, state: &mut State, above: String) {
        let status = self.tty && self.verbosity != Verbosity::Quiet;
        if above.is_empty() && !status {
            return;
        }
        let mut text = String::new();
        if state.status_shown {
            text.push_str(START_OF_LINE);
            text.push_str(ERASE_LINE);
        }
        text.push_str(&above);
        if status {
            // The counter is never elided; the command gets what room is left.
            let command = state.running.last().unwrap_or(&state.last);
            let counter = format!("{} ", counter(state));
            let room = self.width.saturating_sub(counter.chars().count());
            text.push_str(START_OF_LINE);
            text.push_str(&elide_middle(&counter, self.width));
            text.push_str(&elide_middle(command, room));
            text.push_str(ERASE_LINE);
            state.last_draw = Some(Instant::now());
        }
        state.status_shown = status;
        let _ = write_all(&mut state.out, &text);
    }
}

/// `[finished/total]`; the total is at least what finished, should thunks become known late.
fn counter(state: &State) -> String {
    format!("[{}/{}]", state.finished, state.total.max(state.finished))
}

fn write_all(out: &mut Box<dyn Write + Send>, text: &str) -> io::Result<()> {
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The command on one line: a control character (a newline in a quoted argument, an escape)
/// would break the status line or put escapes into a log, so each becomes a space.
fn printable(command: &str) -> String {
    command
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `text` in at most `width` characters, the middle replaced by `...` when too long: the start
/// names the program and the end usually the file it makes. Counts characters, not display
/// columns; a line of wide characters can still wrap.
fn elide_middle(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        return text.to_string();
    }
    const DOTS: &str = "...";
    if width <= DOTS.len() {
        return text.chars().take(width).collect();
    }
    let keep = width - DOTS.len();
    let head = keep / 2;
    let tail = keep - head;
    let mut elided: String = text.chars().take(head).collect();
    elided.push_str(DOTS);
    elided.extend(text.chars().skip(count - tail));
    elided
}

/// Removes ANSI CSI sequences (`ESC [ ... final`) and lone escapes.
fn strip_escapes(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(bytes.len());
    let mut rest = bytes.iter().copied();
    while let Some(byte) = rest.next() {
        if byte != 0x1b {
            plain.push(byte);
            continue;
        }
        let mut lookahead = rest.clone();
        if lookahead.next() == Some(b'[') {
            rest = lookahead;
            // Parameter and intermediate bytes up to the final byte, 0x40..=0x7e.
            for next in rest.by_ref() {
                if (0x40..=0x7e).contains(&next) {
                    break;
                }
            }
        }
    }
    plain
}

/// The terminal width from `COLUMNS`, else 80.
///
/// Asking the terminal itself (`rustix::termios::tcgetwinsize` on stderr) needs rustix's
/// `termios` feature, which this crate does not enable; shells set `COLUMNS` without always
/// exporting it, so 80 is the usual answer until it does.
fn terminal_width() -> usize {
    if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stderr()) {
        if size.ws_col > 0 {
            return usize::from(size.ws_col);
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|columns| columns.trim().parse::<usize>().ok())
        .filter(|&columns| columns > 0)
        .unwrap_or(DEFAULT_WIDTH)
}

/// "850 ms", "12.3 s".
fn duration_text(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A writer whose bytes the test can read after the display is done with them.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().clone()).unwrap()
        }
    }

    fn progress(
        verbosity: Verbosity,
        tty: bool,
        color: bool,
        width: usize,
    ) -> (Progress, Captured) {
        let captured = Captured::default();
        let progress =
            Progress::with_writer(Box::new(captured.clone()), verbosity, tty, color, width);
        (progress, captured)
    }

    /// Three thunks: `cc a.c` runs, one is reused, `cc b.c` fails, with some output between.
    fn build(progress: &Progress) {
        progress.add_total(2);
        progress.started("cc -c a.c");
        progress.println("a.c: warning: unused");
        progress.add_total(1);
        progress.finished("cc -c a.c", true, Duration::from_millis(1500));
        progress.reused();
        progress.started("cc -c b.c");
        progress.finished("cc -c b.c", false, Duration::from_millis(20));
        progress.failed("cc -c b.c", 1, b"b.c:1: \x1b[31merror\x1b[0m: nope");
        progress.done();
    }

    #[test]
    fn not_a_terminal_prints_plain_lines_per_thunk_that_ran() {
        let (p, out) = progress(Verbosity::Normal, false, false, 80);
        build(&p);
        assert_eq!(
            out.text(),
            "a.c: warning: unused\n\
             [1/3] cc -c a.c\n\
             [3/3] cc -c b.c\n\
             FAILED: cc -c b.c (exit code 1)\n\
             b.c:1: error: nope\n"
        );
    }

    #[test]
    fn verbose_adds_durations() {
        let (p, out) = progress(Verbosity::Verbose, false, false, 80);
        build(&p);
        let text = out.text();
        assert!(text.contains("[1/3] cc -c a.c (1.5 s)\n"), "{text}");
        assert!(text.contains("[3/3] cc -c b.c (20 ms, failed)\n"), "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'));
    }

    #[test]
    fn quiet_prints_only_failures_and_messages() {
        let (p, out) = progress(Verbosity::Quiet, true, false, 80);
        build(&p);
        assert_eq!(
            out.text(),
            "a.c: warning: unused\nFAILED: cc -c b.c (exit code 1)\nb.c:1: error: nope\n"
        );
    }

    #[test]
    fn terminal_rewrites_one_status_line_and_prints_above_it() {
        let (p, out) = progress(Verbosity::Normal, true, false, 80);
        build(&p);
        let text = out.text();
        assert!(text.starts_with("\r[0/2] cc -c a.c\x1b[K"), "{text:?}");
        assert!(
            text.contains("\r\x1b[Ka.c: warning: unused\n\r[0/2] cc -c a.c\x1b[K"),
            "output goes above a redrawn status line: {text:?}"
        );
        assert!(text.contains("\r[3/3] cc -c b.c\x1b[K"), "{text:?}");
        assert!(!text.contains("\x1b[1;31m"), "no colour unless asked");
        assert!(
            text.ends_with("\r\x1b[K"),
            "done erases the status line: {text:?}"
        );
        // No line is printed for a thunk that ran: the status line says it.
        assert!(!text.contains("cc -c a.c\n"));
    }

    #[test]
    fn terminal_status_shows_the_latest_running_command() {
        let (p, out) = progress(Verbosity::Normal, true, false, 80);
        p.add_total(2);
        p.started("first");
        p.started("second");
        p.finished("second", true, Duration::ZERO);
        let text = out.text();
        assert!(text.ends_with("\r[1/2] first\x1b[K"), "{text:?}");
    }

    #[test]
    fn terminal_status_is_elided_to_the_width() {
        let (p, out) = progress(Verbosity::Normal, true, false, 20);
        p.add_total(1);
        p.started("gcc -O2 -c very/long/path/to/source.c -o out.o");
        let text = out.text();
        let status = text
            .strip_prefix('\r')
            .and_then(|t| t.strip_suffix("\x1b[K"))
            .unwrap();
        assert_eq!(status, "[0/1] gcc -... out.o");
        assert_eq!(status.chars().count(), 20);
    }

    #[test]
    fn colour_only_when_enabled() {
        let (p, out) = progress(Verbosity::Normal, true, true, 80);
        p.failed("false", 1, b"\x1b[31mred\x1b[0m");
        let text = out.text();
        assert!(
            text.contains("\x1b[1;31mFAILED:\x1b[0m false (exit code 1)\n"),
            "{text:?}"
        );
        assert!(
            text.contains("\x1b[31mred\x1b[0m\n"),
            "coloured output kept: {text:?}"
        );

        let (p, out) = progress(Verbosity::Normal, true, false, 80);
        p.failed("false", 1, b"\x1b[31mred\x1b[0m");
        let text = out.text();
        assert!(
            text.contains("FAILED: false (exit code 1)\nred\n"),
            "{text:?}"
        );
        assert!(!text.contains("\x1b[31m") && !text.contains("\x1b[0m"));
    }

    #[test]
    fn newlines_in_a_command_do_not_break_lines() {
        let (p, out) = progress(Verbosity::Normal, false, false, 80);
        p.add_total(1);
        p.started("sh -c 'a\nb'");
        p.finished("sh -c 'a\nb'", true, Duration::ZERO);
        assert_eq!(out.text(), "[1/1] sh -c 'a b'\n");
    }

    #[test]
    fn threads_share_one_display_without_interleaving() {
        let (p, out) = progress(Verbosity::Normal, false, false, 80);
        let p = Arc::new(p);
        p.add_total(400);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let command = format!("job {t} {i}");
                        p.started(&command);
                        p.finished(&command, true, Duration::ZERO);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 400);
        for (n, line) in lines.iter().enumerate() {
            assert!(line.starts_with(&format!("[{}/400] job ", n + 1)), "{line}");
        }
    }

    #[test]
    fn progress_is_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Progress>();
    }

    #[test]
    fn escapes_are_stripped_exactly() {
        assert_eq!(strip_escapes(b"a\x1b[1;31mb\x1b[0mc\x1b[Kd"), b"abcd");
        assert_eq!(strip_escapes(b"lone \x1b escape"), b"lone  escape");
        assert_eq!(elide_middle("abcdef", 6), "abcdef");
        assert_eq!(elide_middle("abcdefg", 6), "a...fg");
        assert_eq!(elide_middle("abcdefg", 2), "ab");
    }
}
