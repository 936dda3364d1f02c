//! The command as `execve` takes it, and the `execvpe(3)` search of `PATH` done with the
//! sandbox's environment rather than the caller's.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

use crate::{Error, Spec};

/// glibc's `execvpe` searches this when the environment has no `PATH`.
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// Everything `execve` needs, converted before cloning so that the processes of the sandbox
/// only read it.
#[derive(Debug)]
pub(crate) struct Program {
    pub(crate) argv: Vec<CString>,
    pub(crate) env: Vec<CString>,
    /// The paths to try, in order.
    pub(crate) candidates: Vec<CString>,
}

impl Program {
    /// Requires a validated spec (no NUL bytes).
    pub(crate) fn new(spec: &Spec) -> Result<Program, Error> {
        let c_string =
            |bytes: Vec<u8>| CString::new(bytes).map_err(|e| Error::InvalidSpec(format!("{e}")));
        let argv = spec
            .argv
            .iter()
            .map(|arg| c_string(arg.as_bytes().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        let env = spec
            .env
            .iter()
            .map(|(name, value)| {
                let mut pair = name.as_bytes().to_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                c_string(pair)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_os_str());
        let program = spec.argv.first().map(|a| a.as_os_str()).unwrap_or_default();
        let candidates = candidates(program, path)
            .into_iter()
            .map(c_string)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Program {
            argv,
            env,
            candidates,
        })
    }

    /// Tries every candidate as `execvpe` does and returns only on failure, with the program to
    /// blame and the error: the first candidate refused with `EACCES` when there was one,
    /// otherwise the first error that stops the search, otherwise `ENOENT`.
    pub(crate) fn exec(&self) -> (Vec<u8>, Errno) {
        let mut refused: Option<&CString> = None;
        let mut last = (self.argv.first(), Errno::ENOENT);
        for candidate in &self.candidates {
            let Err(errno) = nix::unistd::execve(candidate, &self.argv, &self.env);
            match errno {
                Errno::EACCES => {
                    refused.get_or_insert(candidate);
                }
                Errno::ENOENT
                | Errno::ENOTDIR
                | Errno::ESTALE
                | Errno::ENODEV
                | Errno::ETIMEDOUT => {
                    last = (self.argv.first(), errno);
                }
                other => return (candidate.as_bytes().to_vec(), other),
            }
        }
        match refused {
            Some(program) => (program.as_bytes().to_vec(), Errno::EACCES),
            None => (
                last.0.map(|p| p.as_bytes().to_vec()).unwrap_or_default(),
                last.1,
            ),
        }
    }
}

/// The paths `execvpe` would try for `program` given `PATH`: the program itself when it
/// contains a `/`, else `dir/program` for each directory, an empty one meaning the working
/// directory.
pub(crate) fn candidates(program: &OsStr, path: Option<&OsStr>) -> Vec<Vec<u8>> {
    let program = program.as_bytes();
    if program.contains(&b'/') {
        return vec![program.to_vec()];
    }
    let path = path.map_or(DEFAULT_PATH, OsStrExt::as_bytes);
    path.split(|&b| b == b':')
        .map(|dir| {
            let mut candidate = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.to_vec()
            };
            if !candidate.ends_with(b"/") {
                candidate.push(b'/');
            }
            candidate.extend_from_slice(program);
            candidate
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(candidates: Vec<Vec<u8>>) -> Vec<String> {
        candidates
            .into_iter()
            .map(|c| String::from_utf8(c).unwrap_or_default())
            .collect()
    }

    #[test]
    fn path_is_searched_in_order_with_empty_meaning_cwd() {
        let path = OsStr::new("/usr/bin::/bin/");
        assert_eq!(
            strings(candidates(OsStr::new("cc"), Some(path))),
            ["/usr/bin/cc", "./cc", "/bin/cc"]
        );
    }

    #[test]
    fn a_program_with_a_slash_is_not_searched() {
        let path = OsStr::new("/usr/bin");
        assert_eq!(
            strings(candidates(OsStr::new("./build.sh"), Some(path))),
            ["./build.sh"]
        );
        assert_eq!(
            strings(candidates(OsStr::new("/bin/sh"), None)),
            ["/bin/sh"]
        );
    }

    #[test]
    fn a_missing_path_falls_back_to_the_glibc_default() {
        assert_eq!(
            strings(candidates(OsStr::new("sh"), None)),
            ["/bin/sh", "/usr/bin/sh"]
        );
    }
}
