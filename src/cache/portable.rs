//! Traces as a cache shared beyond one checkout keeps them ([`Entry`]), and when one may be used.
//!
//! A trace recorded in one checkout holds project paths relative to its root already; what it
//! spells out of other named roots (the caller's home: `~/.local/bin/cc` looked for along
//! `PATH`) is named in the shared form, as keys name them (see [`Names`]), and expanded with
//! the roots of whoever reads it. Two kinds of trace would still be wrong elsewhere, since
//! nothing the thunk did with them was traced as a path: one whose outputs *contain* the
//! absolute path of a root (gcc's `-g` writes the working directory into the object, configure
//! writes `abs_srcdir` into its Makefile, a symlink may point into the checkout), and one whose
//! recorded output mentions it. Such a trace is *pinned* to its roots: it is used only where
//! those roots are the same directories (the same checkout path, the same home).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::cas::Cas;
use crate::engine::key::Names;
use crate::store::model::{Digest, Input, Output, OutputState, StorePath, Trace};

/// One trace of a thunk in a shared cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The roots (letter, absolute path) that the trace's outputs spell out: it is of use only
    /// where each has that same path.
    pub pinned: Vec<(u8, Vec<u8>)>,
    /// The trace, its paths outside the project named.
    pub trace: Trace,
}

impl Entry {
    /// The shared form of a trace recorded here, pinned to the roots its outputs spell out
    /// (their contents are read from `cas`).
    pub fn new(trace: &Trace, names: &Names, cas: &Cas) -> Entry {
        Entry {
            pinned: pinned_roots(trace, names, cas),
            trace: map_paths(trace.clone(), |bytes| names.name(bytes)),
        }
    }

    /// The trace as this checkout uses it, or `None` when it is pinned to roots that are
    /// elsewhere here.
    pub fn local(self, names: &Names) -> Option<Trace> {
        let usable = self
            .pinned
            .iter()
            .all(|(letter, path)| names.root(*letter) == Some(path.as_slice()));
        usable.then(|| map_paths(self.trace, |bytes| names.expand(bytes)))
    }
}

/// Refuses a trace from a cache unless it writes only inside the project: every output a
/// project path of plain components below the root (no `.`, `..`, empty component or NUL),
/// none beneath another output that is a symlink. Whoever wrote the cache chose these paths;
/// restoring anything else could write, or delete, anywhere the reader may.
pub fn confined(trace: &Trace) -> Result<(), String> {
    let mut links: Vec<&[u8]> = Vec::new();
    for output in &trace.outputs {
        if let (StorePath::Project(rel), OutputState::Symlink { .. }) =
            (&output.path, &output.state)
        {
            links.push(rel);
        }
    }
    for output in &trace.outputs {
        let rel = match &output.path {
            StorePath::Project(rel) => rel,
            StorePath::Absolute(path) => {
                let path = String::from_utf8_lossy(path);
                return Err(format!("writes outside the project ({path})"));
            }
        };
        let plain = !rel.is_empty()
            && !rel.contains(&0)
            && rel
                .split(|b| *b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b"..");
        let shown = String::from_utf8_lossy(rel);
        if !plain {
            return Err(format!(
                "names an output {shown:?} that is not a path in the project"
            ));
        }
        if let Some(link) = links
            .iter()
            .find(|link| rel.len() > link.len() && rel.starts_with(link) && rel[link.len()] == b'/')
        {
            let link = String::from_utf8_lossy(link);
            return Err(format!("writes {shown} through its own symlink {link}"));
        }
    }
    Ok(())
}

/// Every content digest a trace refers to: its files, its stdout and stderr.
pub fn blobs(trace: &Trace) -> Vec<Digest> {
    let mut digests = vec![trace.stdout, trace.stderr];
    for output in &trace.outputs {
        if let OutputState::File { digest, .. } = &output.state {
            digests.push(*digest);
        }
    }
    digests.sort();
    digests.dedup();
    digests
}

/// `trace` with `map` applied to every absolute path it holds.
fn map_paths(mut trace: Trace, map: impl Fn(&[u8]) -> Vec<u8>) -> Trace {
    let path = |path: &mut StorePath| {
        if let StorePath::Absolute(bytes) = path {
            *bytes = map(bytes);
        }
    };
    let input = |input: &mut Input| path(&mut input.path);
    trace.inputs.iter_mut().for_each(input);
    trace.internal.iter_mut().for_each(input);
    trace
        .outputs
        .iter_mut()
        .for_each(|output: &mut Output| path(&mut output.path));
    trace
}

/// The roots whose absolute path appears in what the trace left: file contents, symlink
/// targets, stdout and stderr. A content that cannot be read counts as spelling out every
/// root (the trace stays where it was made).
fn pinned_roots(trace: &Trace, names: &Names, cas: &Cas) -> Vec<(u8, Vec<u8>)> {
    let roots: Vec<(u8, &[u8])> = names.roots().collect();
    let mut found = vec![false; roots.len()];
    let scan = |digest: &Digest, found: &mut [bool]| match cas.open_object(digest) {
        Ok(file) => scan_reader(file, &roots, found),
        Err(_) => found.iter_mut().for_each(|f| *f = true),
    };
    for output in &trace.outputs {
        match &output.state {
            OutputState::File { digest, .. } => scan(digest, &mut found),
            OutputState::Symlink { target } => scan_bytes(target, &roots, &mut found),
            OutputState::Dir { .. } | OutputState::Deleted => {}
        }
    }
    scan(&trace.stdout, &mut found);
    scan(&trace.stderr, &mut found);
    roots
        .iter()
        .zip(found)
        .filter(|(_, found)| *found)
        .map(|((letter, path), _)| (*letter, path.to_vec()))
        .collect()
}

/// Scans a stream in blocks that overlap by the longest root and one byte, so that a match
/// and the byte after it are always seen whole.
fn scan_reader(mut reader: impl Read, roots: &[(u8, &[u8])], found: &mut [bool]) {
    let overlap = roots.iter().map(|(_, p)| p.len()).max().unwrap_or(0) + 1;
    let mut buffer: Vec<u8> = Vec::with_capacity(256 * 1024 + overlap);
    let mut block = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                found.iter_mut().for_each(|f| *f = true);
                return;
            }
        };
        buffer.extend_from_slice(&block[..n]);
        scan_bytes(&buffer, roots, found);
        let keep = buffer.len().saturating_sub(overlap);
        buffer.drain(..keep);
    }
    scan_bytes(&buffer, roots, found);
}

/// Marks the roots that appear in `bytes` as whole paths: not followed by a byte of a file
/// name, and not the start of a longer root found at the same place (the home inside the
/// path of a project that lives in it).
fn scan_bytes(bytes: &[u8], roots: &[(u8, &[u8])], found: &mut [bool]) {
    for (index, (_, root)) in roots.iter().enumerate() {
        if found[index] {
            continue;
        }
        let whole = |at: usize, root: &[u8]| {
            bytes[at..].starts_with(root)
                && !bytes
                    .get(at + root.len())
                    .is_some_and(|&b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
        };
        for at in memchr::memmem::find_iter(bytes, root) {
            let longer = roots
                .iter()
                .any(|(_, other)| other.len() > root.len() && whole(at, other));
            if whole(at, root) && !longer {
                found[index] = true;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::{InputKind, Observed};
    use std::path::Path;

    fn trace(outputs: Vec<Output>, stdout: Digest, stderr: Digest) -> Trace {
        Trace {
            inputs: vec![
                Input {
                    path: StorePath::Absolute(b"/home/u/.local/bin/cc".to_vec()),
                    kind: InputKind::Absent,
                    observed: Observed::Absent,
                },
                Input {
                    path: StorePath::Project(b"a.c".to_vec()),
                    kind: InputKind::Absent,
                    observed: Observed::Absent,
                },
            ],
            outputs,
            stdout,
            stderr,
            exit_code: 0,
            duration_ns: 1,
            ran_at_ns: 2,
            children: Vec::new(),
            events: Vec::new(),
            internal: Vec::new(),
        }
    }

    fn file(cas: &Cas, path: &str, content: &[u8]) -> Output {
        Output {
            path: StorePath::Project(path.as_bytes().to_vec()),
            state: OutputState::File {
                digest: cas.put_bytes(content).unwrap(),
                mode: 0o644,
                size: content.len() as u64,
            },
        }
    }

    #[test]
    fn home_paths_are_named_and_expanded_with_the_readers_home() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let empty = cas.put_bytes(b"").unwrap();
        let here = Names::new(Path::new("/home/u/proj"), Some(Path::new("/home/u")));
        let recorded = trace(vec![file(&cas, "a.o", b"\x7fELF plain")], empty, empty);
        let entry = Entry::new(&recorded, &here, &cas);
        assert!(entry.pinned.is_empty());
        assert_eq!(
            entry.trace.inputs[0].path,
            StorePath::Absolute(b"\0H/.local/bin/cc".to_vec())
        );
        let there = Names::new(Path::new("/srv/proj"), Some(Path::new("/var/lib/ci")));
        let local = entry.clone().local(&there).unwrap();
        assert_eq!(
            local.inputs[0].path,
            StorePath::Absolute(b"/var/lib/ci/.local/bin/cc".to_vec())
        );
        assert_eq!(local.inputs[1], recorded.inputs[1]);
        assert_eq!(entry.local(&here).unwrap(), recorded);
    }

    #[test]
    fn outputs_that_spell_out_a_root_pin_the_trace_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let empty = cas.put_bytes(b"").unwrap();
        let here = Names::new(Path::new("/home/u/proj"), Some(Path::new("/home/u")));
        let elsewhere = Names::new(Path::new("/srv/proj"), Some(Path::new("/home/u")));
        // gcc -g: the working directory in the debug information, between NUL bytes.
        let debug = file(&cas, "a.o", b"\x7fELF\0GNU C\0/home/u/proj\0a.c\0");
        let entry = Entry::new(&trace(vec![debug], empty, empty), &here, &cas);
        assert_eq!(entry.pinned, vec![(b'P', b"/home/u/proj".to_vec())]);
        assert!(entry.clone().local(&elsewhere).is_none());
        assert!(entry.local(&here).is_some());
        // A symlink into the checkout, and output naming the home.
        let link = Output {
            path: StorePath::Project(b"l".to_vec()),
            state: OutputState::Symlink {
                target: b"/home/u/proj/x".to_vec(),
            },
        };
        let said = cas.put_bytes(b"installed in /home/u/bin\n").unwrap();
        let entry = Entry::new(&trace(vec![link], said, empty), &here, &cas);
        assert_eq!(
            entry.pinned,
            vec![
                (b'P', b"/home/u/proj".to_vec()),
                (b'H', b"/home/u".to_vec())
            ]
        );
        // Longer names are other directories: not the project, though in the home.
        let other = file(&cas, "b", b"/home/u/proj2 /home/user /home/u/project");
        let entry = Entry::new(&trace(vec![other], empty, empty), &here, &cas);
        assert_eq!(entry.pinned, vec![(b'H', b"/home/u".to_vec())]);
        let other = file(&cas, "b", b"/home/uv/proj /home/user");
        let entry = Entry::new(&trace(vec![other], empty, empty), &here, &cas);
        assert!(entry.pinned.is_empty(), "{:?}", entry.pinned);
    }

    #[test]
    fn a_root_across_a_block_boundary_is_found() {
        let roots: [(u8, &[u8]); 1] = [(b'P', b"/home/u/proj")];
        for offset in [0, 5, 256 * 1024 - 6, 256 * 1024 - 12, 256 * 1024 + 3] {
            let mut data = vec![b'x'; 600 * 1024];
            data[offset..offset + 12].copy_from_slice(b"/home/u/proj");
            data[offset + 12] = 0;
            let mut found = [false];
            scan_reader(&data[..], &roots, &mut found);
            assert!(found[0], "at {offset}");
        }
        let mut found = [false];
        scan_reader(&vec![b'x'; 600 * 1024][..], &roots, &mut found);
        assert!(!found[0]);
    }
}
