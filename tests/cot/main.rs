//! Integration tests of the `cot` binary: real FUSE mounts, real namespaces, real processes.
//!
//! Every test that needs the sandbox calls `require_sandbox!()`, which skips loudly when the
//! machine cannot run it and fails instead under `COT_MUST_WORK=1`.

mod harness;

mod autotools;
mod build;
mod cache;
mod crash;
mod hermetic;
mod inspect;
mod isolation;
mod lifecycle;
mod lint;
mod memo;
mod memo_props;
mod ondemand;
mod pkg;
mod rootless;
mod tracing;
mod writes;
