//! Keeping what a thunk says: its stdout and stderr go through pipes that cot copies on to its
//! own (the caller's) stdout and stderr while it keeps a copy in a file, for replay on a hit.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The write ends of the two pipes, to hand to the sandbox, and the files the copies go to.
pub struct Capture {
    stdout: (io::PipeReader, io::PipeWriter, PathBuf),
    stderr: (io::PipeReader, io::PipeWriter, PathBuf),
}

/// The copying threads, running while the thunk does.
pub struct Copying {
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Capture {
    /// Pipes for a thunk whose output is kept in `stdout_file` and `stderr_file`.
    pub fn new(stdout_file: &Path, stderr_file: &Path) -> io::Result<Capture> {
        let (out_r, out_w) = io::pipe()?;
        let (err_r, err_w) = io::pipe()?;
        Ok(Capture {
            stdout: (out_r, out_w, stdout_file.to_path_buf()),
            stderr: (err_r, err_w, stderr_file.to_path_buf()),
        })
    }

    /// The descriptors the command writes to (close-on-exec in cot; the sandbox gives them
    /// the numbers 1 and 2 in the command).
    pub fn fds(&self) -> (RawFd, RawFd) {
        (self.stdout.1.as_raw_fd(), self.stderr.1.as_raw_fd())
    }

    /// Starts copying, once the command holds its own copies of the write ends (after the
    /// sandbox was launched): ours are closed here so the copies end when the command's do.
    /// `show`: also copy to cot's own stdout and stderr.
    pub fn start(self, show: bool) -> io::Result<Copying> {
        let Capture { stdout, stderr } = self;
        let (out_r, out_w, out_file) = stdout;
        let (err_r, err_w, err_file) = stderr;
        drop(out_w);
        drop(err_w);
        let out_file = File::create(&out_file)?;
        let err_file = File::create(&err_file)?;
        let threads = vec![
            std::thread::spawn(move || copy(out_r, out_file, show.then(io::stdout))),
            std::thread::spawn(move || copy(err_r, err_file, show.then(io::stderr))),
        ];
        Ok(Copying { threads })
    }
}

impl Copying {
    /// Waits until the command and everything it left behind closed the pipes.
    pub fn finish(self) -> io::Result<()> {
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| io::Error::other("output copying thread panicked"))??;
        }
        Ok(())
    }
}

/// Copies everything from `from` into `keep`, and on to `show` as long as it accepts it (a
/// caller piping cot into `head` must not stop the thunk, nor the keeping).
fn copy(mut from: io::PipeReader, mut keep: File, show: Option<impl Write>) -> io::Result<()> {
    let mut show = show;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        keep.write_all(&buffer[..n])?;
        if let Some(out) = show.as_mut() {
            if out
                .write_all(&buffer[..n])
                .and_then(|()| out.flush())
                .is_err()
            {
                show = None;
            }
        }
    }
    keep.flush()
}
