//! The embedded store's disk format: a write-ahead log of records and a snapshot file.
//!
//! - `wal`: records `len: u32 | crc32: u32 | payload`, little endian, one per write, in
//!   revision order. A record cut short by a crash (or failing its checksum) ends the log:
//!   it was never acknowledged, so it is dropped and the file truncated there.
//! - `snapshot`: every live key at one revision, written to a temporary file, synced and
//!   renamed into place; the log is then emptied. Log records at or before the snapshot's
//!   revision (a crash between the rename and the truncation) are skipped on replay.
//!
//! Encoding and decoding are pure; [`Wal`] is the file adapter.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mvcc::{KeyValue, Revision, Write};

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const SNAPSHOT_MAGIC: &[u8; 8] = b"CSTSNAP1";

/// A logged write with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub revision: Revision,
    pub write: Write,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends one framed record to `out`.
pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    let (op, key, value): (u8, &str, &[u8]) = match &rec.write {
        Write::Put { key, value } => (OP_PUT, key, value),
        Write::Delete { key } => (OP_DELETE, key, &[]),
    };
    payload.push(op);
    put_u64(&mut payload, rec.revision);
    put_u32(&mut payload, key.len() as u32);
    payload.extend_from_slice(key.as_bytes());
    payload.extend_from_slice(value);
    put_u32(out, payload.len() as u32);
    put_u32(out, crc32fast::hash(&payload));
    out.extend_from_slice(&payload);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn decode_payload(p: &[u8]) -> Option<Record> {
    let mut r = Reader { buf: p, pos: 0 };
    let op = r.take(1)?[0];
    let revision = r.u64()?;
    let klen = r.u32()? as usize;
    let key = std::str::from_utf8(r.take(klen)?).ok()?.to_string();
    let value = &p[r.pos..];
    let write = match op {
        OP_PUT => Write::Put {
            key,
            value: Arc::from(value),
        },
        OP_DELETE => Write::Delete { key },
        _ => return None,
    };
    Some(Record { revision, write })
}

/// Decodes records from the start of `buf`; returns them and the length of the valid
/// prefix (anything after it is a torn or corrupt tail).
pub fn decode_all(buf: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut r = Reader { buf, pos: 0 };
    loop {
        let start = r.pos;
        let (Some(len), Some(crc)) = (r.u32(), r.u32()) else {
            return (out, start);
        };
        let Some(payload) = r.take(len as usize) else {
            return (out, start);
        };
        if crc32fast::hash(payload) != crc {
            return (out, start);
        }
        match decode_payload(payload) {
            Some(rec) => out.push(rec),
            None => return (out, start),
        }
    }
}

/// Encodes a snapshot: the revision and every live key with its revisions.
pub fn encode_snapshot<'a>(revision: Revision, kvs: impl Iterator<Item = &'a KeyValue>) -> Vec<u8> {
    let mut body = Vec::new();
    put_u64(&mut body, revision);
    for kv in kvs {
        put_u64(&mut body, kv.create_revision);
        put_u64(&mut body, kv.mod_revision);
        put_u32(&mut body, kv.key.len() as u32);
        body.extend_from_slice(kv.key.as_bytes());
        put_u32(&mut body, kv.value.len() as u32);
        body.extend_from_slice(&kv.value);
    }
    let mut out = SNAPSHOT_MAGIC.to_vec();
    put_u32(&mut out, crc32fast::hash(&body));
    out.extend_from_slice(&body);
    out
}

pub fn decode_snapshot(buf: &[u8]) -> Result<(Revision, Vec<KeyValue>), String> {
    if buf.len() < 12 || &buf[..8] != SNAPSHOT_MAGIC {
        return Err("not a capstan snapshot".into());
    }
    let crc = u32::from_le_bytes(buf[8..12].try_into().map_err(|_| "short snapshot")?);
    let body = &buf[12..];
    if crc32fast::hash(body) != crc {
        return Err("snapshot checksum mismatch".into());
    }
    let mut r = Reader { buf: body, pos: 0 };
    let revision = r.u64().ok_or("short snapshot")?;
    let mut kvs = Vec::new();
    while r.pos < body.len() {
        let bad = || "truncated snapshot entry".to_string();
        let create_revision = r.u64().ok_or_else(bad)?;
        let mod_revision = r.u64().ok_or_else(bad)?;
        let klen = r.u32().ok_or_else(bad)? as usize;
        let key = std::str::from_utf8(r.take(klen).ok_or_else(bad)?)
            .map_err(|_| "snapshot key is not UTF-8")?
            .to_string();
        let vlen = r.u32().ok_or_else(bad)? as usize;
        let value = Arc::from(r.take(vlen).ok_or_else(bad)?);
        kvs.push(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
        });
    }
    Ok((revision, kvs))
}

/// The files of one data directory.
pub struct Wal {
    dir: PathBuf,
    file: File,
    /// Bytes in the log file.
    pub len: u64,
}

/// What a data directory held at start-up.
pub struct Recovered {
    pub snapshot: Option<(Revision, Vec<KeyValue>)>,
    pub records: Vec<Record>,
    /// Bytes of torn tail dropped from the log.
    pub dropped: u64,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Wal {
    /// Opens (creating) the data directory, reads what it holds and truncates a torn tail.
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Recovered)> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let snapshot = match std::fs::read(dir.join("snapshot")) {
            Ok(buf) => Some(decode_snapshot(&buf).map_err(std::io::Error::other)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let path = dir.join("wal");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (records, valid) = decode_all(&buf);
        let dropped = (buf.len() - valid) as u64;
        if dropped > 0 {
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                file,
                len: valid as u64,
            },
            Recovered {
                snapshot,
                records,
                dropped,
            },
        ))
    }

    /// Appends records and makes them durable.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Replaces log and snapshot by a snapshot of `kvs` at `revision`.
    pub fn snapshot<'a>(
        &mut self,
        revision: Revision,
        kvs: impl Iterator<Item = &'a KeyValue>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.dir.join("snapshot.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&encode_snapshot(revision, kvs))?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("snapshot"))?;
        sync_dir(&self.dir)?;
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(revision: u64, key: &str, value: Option<&str>) -> Record {
        Record {
            revision,
            write: match value {
                Some(v) => Write::Put {
                    key: key.into(),
                    value: Arc::from(v.as_bytes()),
                },
                None => Write::Delete { key: key.into() },
            },
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let recs = vec![
            rec(1, "/a", Some("x")),
            rec(2, "/b", Some("")),
            rec(3, "/a", None),
        ];
        let mut buf = Vec::new();
        for r in &recs {
            encode(r, &mut buf);
        }
        let (got, valid) = decode_all(&buf);
        assert_eq!(got, recs);
        assert_eq!(valid, buf.len());
        // Every cut inside the last record drops exactly that record.
        let mut two = Vec::new();
        encode(&recs[0], &mut two);
        encode(&recs[1], &mut two);
        for cut in two.len()..buf.len() {
            let (got, valid) = decode_all(&buf[..cut]);
            assert_eq!(got, recs[..2].to_vec(), "cut at {cut}");
            assert_eq!(valid, two.len());
        }
        // A flipped bit fails the checksum.
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_all(&bad).0.len(), 2);
    }

    #[test]
    fn snapshot_round_trip_and_corruption_is_an_error() {
        let kvs = vec![KeyValue {
            key: "/a".into(),
            value: Arc::from(&b"v"[..]),
            create_revision: 2,
            mod_revision: 5,
        }];
        let buf = encode_snapshot(7, kvs.iter());
        assert_eq!(decode_snapshot(&buf).unwrap(), (7, kvs));
        let mut bad = buf.clone();
        bad[20] ^= 1;
        assert!(decode_snapshot(&bad).is_err());
        assert!(decode_snapshot(b"nope").is_err());
    }

    #[test]
    fn the_log_survives_reopening_and_snapshots() {
        let dir = std::env::temp_dir().join(format!("capstan-wal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut wal, rec0) = Wal::open(&dir).unwrap();
        assert!(rec0.records.is_empty() && rec0.snapshot.is_none());
        let mut buf = Vec::new();
        encode(&rec(1, "/a", Some("x")), &mut buf);
        wal.append(&buf).unwrap();
        // A torn write after it.
        wal.append(&[9, 0, 0, 0, 1]).unwrap();
        drop(wal);
        let (mut wal, got) = Wal::open(&dir).unwrap();
        assert_eq!(got.records, vec![rec(1, "/a", Some("x"))]);
        assert_eq!(got.dropped, 5);
        let kv = KeyValue {
            key: "/a".into(),
            value: Arc::from(&b"x"[..]),
            create_revision: 1,
            mod_revision: 1,
        };
        wal.snapshot(1, std::iter::once(&kv)).unwrap();
        drop(wal);
        let (_, got) = Wal::open(&dir).unwrap();
        assert!(got.records.is_empty());
        assert_eq!(got.snapshot.unwrap().0, 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the data directory is root-only");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
