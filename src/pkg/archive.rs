//! `cot pkg export` and `cot pkg import`: a package, the trace that produced it, and every
//! content object they name, in one file, to install on another machine.
//!
//! # Format, version 1
//!
//! A POSIX tar archive (the `tar` crate's ustar/GNU headers) holding, in this order:
//!
//! ```text
//! cot-package               the record: "cot-package 1\n" then postcard(Package), as in the
//!                           database (see `db.rs`)
//! objects/<64 hex>          one content object: the bytes whose blake3 digest this names;
//!                           every file of the manifest, and those of the trace (its outputs,
//!                           stdout and stderr) that the exporting store still held
//! ```
//!
//! Import trusts nothing: each object is hashed and refused unless it matches its name, and
//! the package is refused unless every file of its manifest came with it (or is already in
//! the content store). The trace is recorded in the database's trace store, so the same
//! `cot install` in a checkout at the same place on this machine is a substitution.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use super::db::{self, Db};
use super::{io_error, Error, Package};
use crate::cas::{hash_bytes, hex, Digest};
use crate::store::model::OutputState;

const RECORD: &str = "cot-package";
const RECORD_MAGIC: &[u8] = b"cot-package 1\n";

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub objects: usize,
    pub bytes: u64,
    /// Objects of the trace's own outputs no longer in the content store (left out).
    pub missing_trace_objects: usize,
}

/// Writes `package` and its objects to `file` (atomically: a temporary file renamed).
pub fn export(db: &Db, package: &Package, file: &Path) -> Result<Exported, Error> {
    let cas = db.cas()?;
    let mut needed: BTreeSet<Digest> = BTreeSet::new();
    for entry in &package.manifest {
        if let OutputState::File { digest, .. } = &entry.state {
            needed.insert(*digest);
        }
    }
    let mut optional: BTreeSet<Digest> = BTreeSet::new();
    let trace = &package.origin.trace;
    optional.insert(trace.stdout);
    optional.insert(trace.stderr);
    for output in &trace.outputs {
        if let OutputState::File { digest, .. } = &output.state {
            optional.insert(*digest);
        }
    }
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".cot-export-")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    let mut exported = Exported {
        objects: 0,
        bytes: 0,
        missing_trace_objects: 0,
    };
    {
        let mut builder = tar::Builder::new(BufWriter::new(tmp.as_file()));
        let record = db::encode(RECORD_MAGIC, package);
        append(&mut builder, RECORD, &record, file)?;
        for digest in needed.iter().chain(optional.difference(&needed)) {
            let data = match cas.read(digest) {
                Ok(data) => data,
                Err(_) if !needed.contains(digest) => {
                    exported.missing_trace_objects += 1;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Package {
                        name: package.name.clone(),
                        message: format!("cannot export a file of it: {e}"),
                    })
                }
            };
            append(
                &mut builder,
                &format!("objects/{}", hex(digest)),
                &data,
                file,
            )?;
            exported.objects += 1;
            exported.bytes += data.len() as u64;
        }
        builder
            .into_inner()
            .and_then(|mut w| w.flush())
            .map_err(io_error(file))?;
    }
    tmp.as_file().sync_all().map_err(io_error(file))?;
    tmp.persist(file).map_err(|e| io_error(file)(e.error))?;
    Ok(exported)
}

fn append(
    builder: &mut tar::Builder<impl Write>,
    name: &str,
    data: &[u8],
    file: &Path,
) -> Result<(), Error> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o444);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, name, data)
        .map_err(io_error(file))
}

/// What an import found in the archive.
#[derive(Debug)]
pub struct Imported {
    pub package: Package,
    pub objects: usize,
}

/// Reads a package archive into the database's content store and trace store, verifying
/// every object by its digest. Does not install it (see `install::put_in_place`).
pub fn import(db: &Db, file: &Path) -> Result<Imported, Error> {
    let bad = |message: String| Error::Archive {
        path: file.to_path_buf(),
        message,
    };
    let cas = db.cas()?;
    let reader = BufReader::new(File::open(file).map_err(io_error(file))?);
    let mut archive = tar::Archive::new(reader);
    let mut package: Option<Package> = None;
    let mut objects = 0;
    for entry in archive.entries().map_err(io_error(file))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        if name == RECORD {
            package = Some(db::decode(file, RECORD_MAGIC, &data)?);
        } else if let Some(hex_name) = name.strip_prefix("objects/") {
            let digest = hash_bytes(&data);
            if hex(&digest) != hex_name {
                return Err(bad(format!(
                    "{name} does not hold the content it is named for (its digest is {}): \
                     the archive is damaged; nothing of it was installed",
                    hex(&digest)
                )));
            }
            cas.put_bytes(&data)?;
            objects += 1;
        } else {
            return Err(bad(format!("unexpected entry {name}")));
        }
    }
    let package = package.ok_or_else(|| bad(format!("no {RECORD} record")))?;
    super::check_name(&package.name)?;
    for entry in &package.manifest {
        if let OutputState::File { digest, .. } = &entry.state {
            if !cas.contains(digest) {
                return Err(bad(format!(
                    "the content of {} ({}) is missing; nothing of it was installed",
                    entry.path().display(),
                    hex(digest)
                )));
            }
        }
    }
    let origin = &package.origin;
    let mut client = crate::server::Client::connect(&db.store_dir())?;
    client.record(origin.key.clone(), origin.trace.clone(), Vec::new())?;
    Ok(Imported { package, objects })
}
