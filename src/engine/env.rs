//! Which environment variables a thunk sees.
//!
//! By default only a small allow-list passes through from the caller (`PATH`, `HOME`, `LANG`,
//! `LC_*`, `TERM`, `TZ`), so that a thunk's behaviour does not silently depend on the rest of the
//! caller's environment. `--env NAME` passes one more, `--env NAME=VALUE` sets one, and
//! `--inherit-env` passes everything. Under `--hermetic` there is no `--inherit-env`, and `HOME`
//! is the thunk's own empty directory (see [`super::hermetic::HOME`]).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// Names passed through by default; `LC_` is a prefix.
pub const DEFAULT_ALLOW: [&str; 5] = ["PATH", "HOME", "LANG", "TERM", "TZ"];

/// One `--env` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvRule {
    /// `--env NAME`: pass NAME through from the caller, if set.
    Pass(OsString),
    /// `--env NAME=VALUE`: set NAME to VALUE.
    Set(OsString, OsString),
}

impl EnvRule {
    /// Parses `NAME` or `NAME=VALUE`; an empty name or a name containing NUL is rejected.
    pub fn parse(arg: &OsStr) -> Result<EnvRule, String> {
        let bytes = arg.as_bytes();
        let (name, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(eq) => (&bytes[..eq], Some(&bytes[eq + 1..])),
            None => (bytes, None),
        };
        if name.is_empty() {
            return Err(format!(
                "invalid --env {:?}: the variable name is empty",
                arg.to_string_lossy()
            ));
        }
        if bytes.contains(&0) {
            return Err(format!(
                "invalid --env {:?}: contains a NUL byte",
                arg.to_string_lossy()
            ));
        }
        let name = OsStr::from_bytes(name).to_owned();
        Ok(match value {
            Some(value) => EnvRule::Set(name, OsStr::from_bytes(value).to_owned()),
            None => EnvRule::Pass(name),
        })
    }
}

/// Parses every `--env` argument; the first bad one is the error.
pub fn parse_rules(args: &[OsString]) -> anyhow::Result<Vec<EnvRule>> {
    args.iter()
        .map(|arg| EnvRule::parse(arg))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)
}

fn allowed_by_default(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    bytes.starts_with(b"LC_")
        || DEFAULT_ALLOW
            .iter()
            .any(|allowed| allowed.as_bytes() == bytes)
}

/// Computes the thunk's environment from the caller's, sorted by name so that the same inputs
/// always give the same environment (it is part of a thunk's identity).
pub fn thunk_env(
    caller: impl IntoIterator<Item = (OsString, OsString)>,
    rules: &[EnvRule],
    inherit_all: bool,
) -> Vec<(OsString, OsString)> {
    let caller: Vec<(OsString, OsString)> = caller.into_iter().collect();
    let mut env: std::collections::BTreeMap<OsString, OsString> = caller
        .iter()
        .filter(|(name, _)| inherit_all || allowed_by_default(name))
        .cloned()
        .collect();
    for rule in rules {
        match rule {
            EnvRule::Pass(name) => {
                if let Some((_, value)) = caller.iter().find(|(caller_name, _)| caller_name == name)
                {
                    env.insert(name.clone(), value.clone());
                }
            }
            EnvRule::Set(name, value) => {
                env.insert(name.clone(), value.clone());
            }
        }
    }
    env.into_iter().collect()
}

/// Sets `name` to `value` in an environment sorted by name (as [`thunk_env`] makes it).
pub fn set_var(env: &mut Vec<(OsString, OsString)>, name: &str, value: &str) {
    let name = OsStr::new(name);
    match env.binary_search_by(|(n, _)| n.as_os_str().cmp(name)) {
        Ok(i) => env[i].1 = value.into(),
        Err(i) => env.insert(i, (name.into(), value.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Vec<(OsString, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/u"),
            ("LC_ALL", "C"),
            ("SECRET", "x"),
            ("CC", "gcc"),
            ("LANGUAGE", "fr"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    fn names(env: &[(OsString, OsString)]) -> Vec<String> {
        env.iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect()
    }

    #[test]
    fn default_allow_list_only() {
        let env = thunk_env(caller(), &[], false);
        assert_eq!(names(&env), ["HOME=/home/u", "LC_ALL=C", "PATH=/usr/bin"]);
    }

    #[test]
    fn env_rules_pass_and_set() {
        let rules = [
            EnvRule::parse(OsStr::new("CC")).unwrap(),
            EnvRule::parse(OsStr::new("MISSING")).unwrap(),
            EnvRule::parse(OsStr::new("X=a=b")).unwrap(),
            EnvRule::parse(OsStr::new("PATH=/bin")).unwrap(),
        ];
        let env = thunk_env(caller(), &rules, false);
        assert_eq!(
            names(&env),
            ["CC=gcc", "HOME=/home/u", "LC_ALL=C", "PATH=/bin", "X=a=b"]
        );
    }

    #[test]
    fn set_var_keeps_the_order() {
        let mut env = thunk_env(caller(), &[], false);
        set_var(&mut env, "HOME", "/tmp/h");
        set_var(&mut env, "A", "1");
        assert_eq!(
            names(&env),
            ["A=1", "HOME=/tmp/h", "LC_ALL=C", "PATH=/usr/bin"]
        );
    }

    #[test]
    fn inherit_all() {
        assert_eq!(thunk_env(caller(), &[], true).len(), caller().len());
    }

    #[test]
    fn bad_rules_are_rejected_with_the_argument() {
        let err = EnvRule::parse(OsStr::new("=x")).unwrap_err();
        assert!(err.contains("\"=x\""), "{err}");
    }
}
