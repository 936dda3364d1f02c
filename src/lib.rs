//! cot: a build sandbox for Linux that records every file access exactly.
//!
//! A *thunk* is one command line run inside a sandbox whose root is cot's FUSE filesystem
//! ([`cot_fusefs`]) set up by [`cot_sandbox`]. The [`engine`] composes the two: it declares what
//! the thunk may see and write ([`engine::Thunk`]), runs it ([`engine::execute`]) and commits
//! its writes only when it succeeds. [`engine::memo`] makes runs memoized: traces in the
//! RocksDB [`store`] (served to every cot of a project by the [`server`]), file contents in the
//! blake3 content store [`cas`]; [`cache`] shares them beyond the project (a directory shared
//! by checkouts and users, a remote cache). [`trace`] writes the exact list of accesses as JSON
//! lines. [`pkg`] installs packages: an installer's writes captured as a manifest, recorded in a
//! per-machine package database and put in place whole or not at all. [`cli`] is the thin
//! command-line layer.

pub mod build;
pub mod cache;
pub mod cas;
pub mod cli;
pub mod engine;
pub mod pkg;
pub mod remote;
pub mod server;
pub mod store;
pub mod trace;
