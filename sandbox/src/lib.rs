//! The sandbox in which cot runs a command: namespaces, mounts, `pivot_root`, uid maps and the
//! process launch. It knows nothing of the filesystem served at its root nor of traces; it is
//! the only code of cot that forks, mounts or execs.
//!
//! A [`Spec`] declares what to run. [`preflight()`] checks that the machine can build the sandbox
//! and says what to fix when it cannot. [`launch()`] clones the sandbox's init (pid 1 of new mount,
//! pid, uts, ipc, net (unless shared) and cgroup namespaces, inside a new user namespace in
//! rootless mode), which mounts a FUSE filesystem as the future root and hands its `/dev/fuse`
//! descriptor to the caller's `serve` callback; once it is served, the init completes the root
//! (`/proc`, `/dev`, `/sys`, `/tmp`, declared as data in [`plan`]), pivots into it and starts
//! the command. The returned [`Sandbox`] is waited on for the command's [`Outcome`]; every
//! failure is an [`Error`].
//!
//! All `unsafe` code lives in the private `sys` module. README.md describes the launch sequence
//! step by step and the threat model.

mod error;
mod exec;
mod init;
mod launch;
pub mod plan;
mod preflight;
mod protocol;
mod spec;
mod sys;

pub use error::Error;
pub use launch::{launch, Sandbox};
pub use plan::BUILD_SOCKET;
pub use preflight::preflight;
pub use spec::{Outcome, Spec};
