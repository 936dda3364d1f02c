//! A package's name and version when the user does not give them: from what the build
//! says of itself, or from what it installed, or from the name of its directory.
//!
//! In order, the first that says wins:
//!
//! - autoconf's `PACKAGE_TARNAME` and `PACKAGE_VERSION`, in the working directory's
//!   `config.log` or `Makefile` (automake copies them there);
//! - a Python distribution's `NAME-VERSION.dist-info` (or `.egg-info`) directory among the
//!   installed entries;
//! - a pkg-config file (`*.pc`) among the installed files: its `Version:`;
//! - the working directory's name, `name-1.2.3`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::Entry;
use crate::cas::Cas;
use crate::store::model::OutputState;

/// A guessed value and where it was found.
pub type Found = Option<(String, String)>;

/// The name and version the build or its files say, each with its source.
pub fn guess(cwd: &Path, manifest: &[Entry], cas: &Cas) -> (Found, Found) {
    let mut name: Found = None;
    let mut version: Found = None;
    for file in ["config.log", "Makefile"] {
        let Ok(text) = std::fs::read(cwd.join(file)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        if name.is_none() {
            name = variable(&text, "PACKAGE_TARNAME")
                .map(|n| (n, format!("PACKAGE_TARNAME in {file}")));
        }
        if version.is_none() {
            version = variable(&text, "PACKAGE_VERSION")
                .map(|v| (v, format!("PACKAGE_VERSION in {file}")));
        }
    }
    for entry in manifest {
        let Some(file_name) = entry.path().file_name().and_then(OsStr::to_str) else {
            continue;
        };
        let is_dir = matches!(entry.state, OutputState::Dir { .. });
        let dist = file_name
            .strip_suffix(".dist-info")
            .or_else(|| file_name.strip_suffix(".egg-info"));
        if let (true, Some(dist)) = (is_dir, dist) {
            if let Some((n, v)) = dist.split_once('-') {
                let source = format!("{} installed", entry.path().display());
                if name.is_none() {
                    name = Some((n.replace('_', "-"), source.clone()));
                }
                if version.is_none() {
                    version = Some((v.to_string(), source));
                }
            }
        }
        if let (OutputState::File { digest, size, .. }, true) =
            (&entry.state, file_name.ends_with(".pc"))
        {
            if version.is_none() && *size < 64 * 1024 {
                if let Ok(text) = cas.read(digest) {
                    version = pc_field(&String::from_utf8_lossy(&text), "Version")
                        .map(|v| (v, format!("Version: in {}", entry.path().display())));
                }
            }
        }
    }
    if let Some(dir) = cwd.file_name().map(|n| n.as_bytes()) {
        let dir = String::from_utf8_lossy(dir);
        let (base, from_dir) = split_version(&dir);
        if name.is_none() && !base.is_empty() {
            name = Some((base.to_string(), format!("the directory name {dir}")));
        }
        if version.is_none() {
            version = from_dir.map(|v| (v.to_string(), format!("the directory name {dir}")));
        }
    }
    (name, version)
}

/// `NAME = value` (make) or `NAME='value'` (shell, config.log): the first one.
fn variable(text: &str, name: &str) -> Option<String> {
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix(name) else {
            continue;
        };
        let rest = rest.trim_start();
        let Some(value) = rest.strip_prefix('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '\'' || c == '"').trim();
        if !value.is_empty() && !value.contains(['$', ' ']) {
            return Some(value.to_string());
        }
    }
    None
}

/// `Field: value` of a pkg-config file.
fn pc_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?.trim();
        (!value.is_empty() && !value.contains('$')).then(|| value.to_string())
    })
}

/// `foo-1.2.3` → (`foo`, `1.2.3`): the version is the part after the last `-` followed by
/// a digit.
fn split_version(dir: &str) -> (&str, Option<&str>) {
    let split = dir
        .char_indices()
        .filter(|&(i, c)| c == '-' && dir[i + 1..].starts_with(|d: char| d.is_ascii_digit()))
        .map(|(i, _)| i)
        .next_back();
    match split {
        Some(i) if i > 0 => (&dir[..i], Some(&dir[i + 1..])),
        _ => (dir, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_the_build_and_the_directory() {
        assert_eq!(split_version("bzip2-1.0.8"), ("bzip2", Some("1.0.8")));
        assert_eq!(split_version("foo-bar-2.0"), ("foo-bar", Some("2.0")));
        assert_eq!(split_version("libffi"), ("libffi", None));
        assert_eq!(split_version("x-y"), ("x-y", None));
        let config_log = "ac_cv_env_CC_set=\nPACKAGE_NAME='libffi'\nPACKAGE_TARNAME='libffi'\n\
                          PACKAGE_VERSION='3.6.0'\n";
        assert_eq!(
            variable(config_log, "PACKAGE_VERSION").as_deref(),
            Some("3.6.0")
        );
        assert_eq!(
            variable(config_log, "PACKAGE_TARNAME").as_deref(),
            Some("libffi")
        );
        let makefile = "PACKAGE_VERSION = 3.6.0\nVERSION = $(PACKAGE_VERSION)\n";
        assert_eq!(
            variable(makefile, "PACKAGE_VERSION").as_deref(),
            Some("3.6.0")
        );
        assert_eq!(variable(makefile, "VERSION"), None);
        let pc = "prefix=/usr\nName: libffi\nVersion: 3.6.0\nLibs: -L${libdir} -lffi\n";
        assert_eq!(pc_field(pc, "Version").as_deref(), Some("3.6.0"));
        assert_eq!(pc_field(pc, "Libs"), None);
    }
}
