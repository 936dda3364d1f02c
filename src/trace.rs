//! The access log as JSON lines (`--trace-out FILE`).
//!
//! One access per line, in the order the thunk first made it:
//! `{"kind":"read","path":"/usr/include/stdio.h"}`, `{"kind":"rename","path":"/w/a.tmp","to":"/w/a"}`.
//!
//! Paths are byte strings on Linux and JSON strings are Unicode, so a path that is not valid
//! UTF-8 is written twice: `path` holds a readable rendering with U+FFFD for the invalid bytes,
//! and `path_b64` holds the exact bytes in standard base64 (RFC 4648, with padding). Readers must
//! prefer `path_b64` when present; it round-trips losslessly. The same holds for `to`/`to_b64`.
//! Valid UTF-8 paths never carry a `_b64` field, so the common case stays plain.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cot_fusefs::{Access, AccessKind};
use serde_json::{Map, Value};

/// Renders one access as a single JSON line (without the newline).
pub fn to_json_line(access: &Access) -> String {
    let mut object = Map::new();
    object.insert("kind".into(), Value::from(access.kind.as_str()));
    insert_path(&mut object, "path", access.path.as_os_str());
    if let Some(to) = &access.to {
        insert_path(&mut object, "to", to.as_os_str());
    }
    Value::Object(object).to_string()
}

fn insert_path(object: &mut Map<String, Value>, key: &str, path: &OsStr) {
    let bytes = path.as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            object.insert(key.into(), Value::from(text));
        }
        Err(_) => {
            object.insert(key.into(), Value::from(String::from_utf8_lossy(bytes)));
            object.insert(format!("{key}_b64"), Value::from(STANDARD.encode(bytes)));
        }
    }
}

/// Writes every access as JSON lines.
pub fn write_json_lines(out: &mut impl Write, accesses: &[Access]) -> io::Result<()> {
    for access in accesses {
        writeln!(out, "{}", to_json_line(access))?;
    }
    out.flush()
}

/// Error reading back a JSON-lines trace.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
}

/// Parses a JSON-lines trace back into accesses, decoding `_b64` fields exactly.
pub fn parse_json_lines(text: &str) -> Result<Vec<Access>, ParseError> {
    let mut accesses = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let invalid = |message: String| ParseError::Invalid {
            line: index + 1,
            message,
        };
        let value: Value = serde_json::from_str(raw).map_err(|e| invalid(e.to_string()))?;
        let kind_name = value
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing \"kind\"".into()))?;
        let kind = AccessKind::from_name(kind_name)
            .ok_or_else(|| invalid(format!("unknown kind {kind_name:?}")))?;
        let path = read_path(&value, "path")
            .map_err(invalid)?
            .ok_or_else(|| invalid("missing \"path\"".into()))?;
        let to = read_path(&value, "to").map_err(invalid)?;
        accesses.push(Access { kind, path, to });
    }
    Ok(accesses)
}

fn read_path(value: &Value, key: &str) -> Result<Option<PathBuf>, String> {
    if let Some(encoded) = value.get(format!("{key}_b64")).and_then(Value::as_str) {
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|e| format!("bad \"{key}_b64\": {e}"))?;
        return Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(bytes))));
    }
    Ok(value.get(key).and_then(Value::as_str).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(kind: AccessKind, path: &[u8], to: Option<&[u8]>) -> Access {
        let from_bytes = |bytes: &[u8]| PathBuf::from(OsStr::from_bytes(bytes));
        Access {
            kind,
            path: from_bytes(path),
            to: to.map(from_bytes),
        }
    }

    fn lines(accesses: &[Access]) -> Vec<String> {
        accesses.iter().map(to_json_line).collect()
    }

    #[test]
    fn utf8_paths_are_plain_strings() {
        let line = to_json_line(&access(AccessKind::Read, b"/usr/include/stdio.h", None));
        assert_eq!(line, r#"{"kind":"read","path":"/usr/include/stdio.h"}"#);
        let line = to_json_line(&access(AccessKind::Rename, b"/w/a.tmp", Some(b"/w/a")));
        assert_eq!(line, r#"{"kind":"rename","path":"/w/a.tmp","to":"/w/a"}"#);
    }

    #[test]
    fn non_utf8_paths_round_trip_through_base64() {
        let original = vec![
            access(AccessKind::Write, b"/w/caf\xe9 \n.txt", None),
            access(AccessKind::Rename, b"/w/\xff", Some(b"/w/ok")),
            access(AccessKind::Absent, b"/w/line\nbreak", None),
        ];
        let mut out = Vec::new();
        write_json_lines(&mut out, &original).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("path_b64"));
        assert_eq!(text.lines().count(), 3, "newlines in names stay escaped");
        let parsed = parse_json_lines(&text).unwrap();
        assert_eq!(lines(&parsed), lines(&original));
        for (parsed, original) in parsed.iter().zip(&original) {
            assert_eq!(parsed.path, original.path);
            assert_eq!(parsed.to, original.to);
        }
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = parse_json_lines(
            "{\"kind\":\"read\",\"path\":\"/a\"}\n{\"kind\":\"nope\",\"path\":\"/b\"}\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "line 2: unknown kind \"nope\"");
    }
}
