//! The messages between the caller of `launch` and the sandbox's init, one per datagram of a
//! `SOCK_SEQPACKET` socket pair (so no framing is needed): a tag byte, then fixed-width
//! little-endian integers and length-prefixed byte strings.
//!
//! Order of a normal run: init → `RootMounted` (with the `/dev/fuse` descriptor attached as
//! `SCM_RIGHTS`); caller → `Go`; init → `Exited` or `Signaled`. `SetupFailed` may replace any
//! init message; `ExecFailed` is sent by the command's process just before it exits with 127.
//! The caller closing its end means "stop": the init exits when it reads end-of-file.

use std::path::PathBuf;

/// The longest message; paths are at most `PATH_MAX` (4096) bytes.
pub(crate) const MAX_MESSAGE: usize = 3 * 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// The FUSE root is mounted; its `/dev/fuse` descriptor rides along.
    RootMounted,
    /// The caller serves the root: finish the sandbox and start the command.
    Go,
    /// A setup step failed.
    SetupFailed {
        stage: String,
        path: Option<PathBuf>,
        errno: i32,
    },
    /// `execve` failed for `program` (the last candidate tried) with `errno`.
    ExecFailed { program: Vec<u8>, errno: i32 },
    /// The command exited with this status.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
}

const ROOT_MOUNTED: u8 = 1;
const GO: u8 = 2;
const SETUP_FAILED: u8 = 3;
const EXEC_FAILED: u8 = 4;
const EXITED: u8 = 5;
const SIGNALED: u8 = 6;

impl Message {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::RootMounted => out.push(ROOT_MOUNTED),
            Message::Go => out.push(GO),
            Message::SetupFailed { stage, path, errno } => {
                out.push(SETUP_FAILED);
                out.extend_from_slice(&errno.to_le_bytes());
                put_bytes(&mut out, stage.as_bytes());
                match path {
                    Some(path) => {
                        out.push(1);
                        put_bytes(
                            &mut out,
                            std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()),
                        );
                    }
                    None => out.push(0),
                }
            }
            Message::ExecFailed { program, errno } => {
                out.push(EXEC_FAILED);
                out.extend_from_slice(&errno.to_le_bytes());
                put_bytes(&mut out, program);
            }
            Message::Exited(code) => {
                out.push(EXITED);
                out.extend_from_slice(&code.to_le_bytes());
            }
            Message::Signaled(signal) => {
                out.push(SIGNALED);
                out.extend_from_slice(&signal.to_le_bytes());
            }
        }
        out
    }

    /// `None` for anything malformed: the init and the caller are the same binary, so this only
    /// guards against truncation.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Message> {
        let (&tag, mut rest) = bytes.split_first()?;
        let message = match tag {
            ROOT_MOUNTED => Message::RootMounted,
            GO => Message::Go,
            SETUP_FAILED => {
                let errno = take_i32(&mut rest)?;
                let stage = String::from_utf8(take_bytes(&mut rest)?.to_vec()).ok()?;
                let path = match take_u8(&mut rest)? {
                    0 => None,
                    _ => Some(PathBuf::from(
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(take_bytes(
                            &mut rest,
                        )?),
                    )),
                };
                Message::SetupFailed { stage, path, errno }
            }
            EXEC_FAILED => {
                let errno = take_i32(&mut rest)?;
                Message::ExecFailed {
                    program: take_bytes(&mut rest)?.to_vec(),
                    errno,
                }
            }
            EXITED => Message::Exited(take_i32(&mut rest)?),
            SIGNALED => Message::Signaled(take_i32(&mut rest)?),
            _ => return None,
        };
        rest.is_empty().then_some(message)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Paths and stage names are far below 4 GiB; truncating the length would only corrupt
    // the message, which `decode` then rejects.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_u8(rest: &mut &[u8]) -> Option<u8> {
    let (&byte, tail) = rest.split_first()?;
    *rest = tail;
    Some(byte)
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_le_bytes(*head))
}

fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*head)).ok()?;
    if tail.len() < len {
        return None;
    }
    let (bytes, tail) = tail.split_at(len);
    *rest = tail;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let messages = [
            Message::RootMounted,
            Message::Go,
            Message::SetupFailed {
                stage: "mount proc".into(),
                path: Some("/proc".into()),
                errno: 1,
            },
            Message::SetupFailed {
                stage: "pivot_root".into(),
                path: None,
                errno: 22,
            },
            Message::ExecFailed {
                program: b"/usr/bin/\xffx".to_vec(),
                errno: 13,
            },
            Message::Exited(-1),
            Message::Signaled(9),
        ];
        for message in messages {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
    }

    #[test]
    fn truncated_or_padded_messages_are_rejected() {
        let bytes = Message::ExecFailed {
            program: b"/bin/x".to_vec(),
            errno: 2,
        }
        .encode();
        for len in 0..bytes.len() {
            assert_eq!(
                Message::decode(&bytes[..len]),
                None,
                "prefix of {len} bytes"
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(Message::decode(&padded), None);
        assert_eq!(Message::decode(&[99]), None);
    }
}
