//! Per-launch cost of a sandbox: `launch` + `wait` of `true` (with the read-only mirror of `/`
//! as root, served on two threads, and the session joined after each run) against spawning
//! `true` directly. Medians of `COT_BENCH_RUNS` runs (default 50).
//!
//! `cargo bench -p cot-sandbox --bench launch` as root measures both modes (rootless through a
//! user namespace mapping root to itself); as another user, rootless mode only.

#[path = "../tests/sandbox/passthrough.rs"]
mod passthrough;

use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cot_sandbox::{launch, Outcome, Spec};
use fuser::{Config, Session, SessionACL};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(mut samples: Vec<Duration>, p: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

fn sandboxed(spec: &Spec) -> Result<Duration, String> {
    let start = Instant::now();
    let mut session: Option<JoinHandle<std::io::Result<()>>> = None;
    let sandbox = launch(spec, |fd| {
        let mut config = Config::default();
        config.n_threads = Some(2);
        let served = Session::from_fd(passthrough::Passthrough::new(), fd, SessionACL::All, config)
            .map_err(|e| e.to_string())?;
        session = Some(std::thread::spawn(move || served.run()));
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    let launched = start.elapsed();
    let outcome = sandbox.wait().map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    if std::env::var_os("COT_BENCH_DEBUG").is_some() {
        eprintln!("launch {:?} wait {:?}", launched, elapsed - launched);
    }
    if outcome != Outcome::Exited(0) {
        return Err(format!("true ended with {outcome}"));
    }
    if let Some(thread) = session {
        let joining = Instant::now();
        thread
            .join()
            .map_err(|_| "the fuse session panicked".to_string())?
            .map_err(|e| e.to_string())?;
        if std::env::var_os("COT_BENCH_DEBUG").is_some() {
            eprintln!("join {:?}", joining.elapsed());
        }
    }
    Ok(elapsed)
}

fn report(name: &str, samples: Vec<Duration>) {
    println!(
        "{name:<28} median {:>8.2} ms   p90 {:>8.2} ms   ({} runs)",
        median(samples.clone()).as_secs_f64() * 1e3,
        percentile(samples.clone(), 90).as_secs_f64() * 1e3,
        samples.len()
    );
}

/// fuser allocates a 16 MiB request buffer per session thread. Once glibc has freed one such
/// mmapped block it raises its mmap threshold and serves the next ones from the heap, zeroing
/// them by hand (about 5 ms each), which a process launching many sandboxes pays on every
/// launch. A fixed threshold keeps them mmapped, as any caller launching many sandboxes should.
const FIXED_MMAP_THRESHOLD: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "131072");

fn main() {
    if std::env::var_os(FIXED_MMAP_THRESHOLD.0).is_none() {
        let error = std::os::unix::process::CommandExt::exec(
            Command::new("/proc/self/exe")
                .args(std::env::args_os().skip(1))
                .env(FIXED_MMAP_THRESHOLD.0, FIXED_MMAP_THRESHOLD.1),
        );
        eprintln!("re-executing with a fixed mmap threshold: {error}");
        std::process::exit(1);
    }
    // `cargo bench` passes `--bench`; nothing else is understood.
    let runs: usize = std::env::var("COT_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let native: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let status = Command::new("true").status();
            assert!(status.is_ok_and(|s| s.success()), "true failed natively");
            start.elapsed()
        })
        .collect();
    report("native true", native);
    let root = nix::unistd::geteuid().is_root();
    let modes: &[bool] = if root { &[false, true] } else { &[true] };
    for &user_namespace in modes {
        let spec = Spec {
            argv: vec!["true".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            user_namespace,
            fuse_fsname: "cot".into(),
            hostname: None,
            tmp_keep: Vec::new(),
            tmp_dirs: Vec::new(),
            host_network: false,
            stdout: None,
            stderr: None,
            socket: None,
        };
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            match sandboxed(&spec) {
                Ok(elapsed) => samples.push(elapsed),
                Err(e) => {
                    eprintln!("sandboxed true failed: {e}");
                    std::process::exit(1);
                }
            }
        }
        report(
            if user_namespace {
                "sandboxed true (userns)"
            } else {
                "sandboxed true (root)"
            },
            samples,
        );
    }
}
