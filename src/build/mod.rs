//! Builds: a build script (or GNU make) runs as the root thunk, and every `cot run` inside it
//! is a child thunk that cot decides, replays or executes.
//!
//! - [`engine`]: the rebuild logic (which thunks run, which are reused), over a `World`;
//! - [`coordinator`]: the real world (stores, file system, one worker process per thunk);
//! - [`worker`]: `cot __thunk`, the process that runs one thunk and relays its requests;
//! - [`client`]: `cot run`, `cot wait` and `cot __sh` inside a thunk;
//! - [`protocol`]: the messages between them;
//! - [`make`]: running GNU make for `cot make`; [`report`], [`progress`]: what the user sees.

pub mod client;
pub mod coordinator;
pub mod engine;
pub mod lint;
pub mod make;
pub mod progress;
pub mod protocol;
pub mod report;
pub mod worker;

#[cfg(test)]
mod tests;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiles `--rebuild`/`--skip` patterns, matched against a thunk's command line (and its
/// make target): `*` matches anything, including `/` and spaces.
pub fn globs(patterns: &[String]) -> anyhow::Result<GlobSet> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(false)
            .build()
            .map_err(|e| anyhow::anyhow!("pattern {pattern:?} is invalid: {e}"))?;
        set.add(glob);
    }
    set.build()
        .map_err(|e| anyhow::anyhow!("patterns {patterns:?} are invalid: {e}"))
}
