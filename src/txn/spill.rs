//! Spill files: the held changes of a streamed transaction, on local disk.
//!
//! A streamed (proto 2) transaction can be far larger than memory, and its commit LSN — part of
//! every change's identity — is unknown until Stream Commit, so its changes cannot go to the
//! lake yet. The assembler keeps them in memory up to a limit, then appends them here, one file
//! per top-level transaction, and reads them back in order at Stream Commit. The file is
//! anonymous (unlinked at creation): it disappears with the process, even after `kill -9`, and
//! a restart receives the transaction again from the slot.
//!
//! Record layout (all integers big-endian), each record prefixed by its length (u32):
//!
//! ```text
//! change:  0u8 subxid:u32 relation:u32 version:u32 op:u8 new:tuple? old:(kind:u8 tuple)?
//! message: 1u8 subxid:u32 lsn:u64 prefix:bytes content:bytes
//! tuple:   present:u8 [ncols:u16 (kind:u8 [bytes])*]   kinds n, u, t, b as in pgoutput
//! bytes:   len:u32 data
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use super::{Change, ChangeOp, Held, TxnError};
use crate::lsn::Lsn;
use crate::pgoutput::relation::CachedRelation;
use crate::pgoutput::{LogicalMessage, OldTuple, TupleColumn, TupleData, Xid};

/// Relations referenced by spilled changes, by (id, version).
pub(super) type Relations = HashMap<(u32, u32), Arc<CachedRelation>>;

fn io_error(action: &'static str) -> impl FnOnce(std::io::Error) -> TxnError {
    move |e| TxnError::Spill {
        action,
        message: e.to_string(),
    }
}

/// The spill file of one streamed transaction, being written.
pub(super) struct SpillWriter {
    file: BufWriter<File>,
    scratch: Vec<u8>,
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) relations: Relations,
}

impl SpillWriter {
    pub(super) fn create(dir: &Path) -> Result<SpillWriter, TxnError> {
        let file = tempfile::tempfile_in(dir).map_err(io_error("create"))?;
        Ok(SpillWriter {
            file: BufWriter::with_capacity(1 << 20, file),
            scratch: Vec::new(),
            records: 0,
            bytes: 0,
            relations: HashMap::new(),
        })
    }

    pub(super) fn append(&mut self, held: &Held) -> Result<(), TxnError> {
        self.scratch.clear();
        encode(held, &mut self.scratch);
        if let Held::Change { change, .. } = held {
            let r = &change.relation;
            self.relations
                .entry((r.relation.id, r.version))
                .or_insert_with(|| r.clone());
        }
        let len = u32::try_from(self.scratch.len()).map_err(|_| TxnError::Spill {
            action: "write",
            message: "a change larger than 4 GiB".into(),
        })?;
        self.file
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.file.write_all(&self.scratch))
            .map_err(io_error("write"))?;
        self.records += 1;
        self.bytes += 4 + u64::from(len);
        Ok(())
    }

    /// Finishes writing and returns a reader positioned at the first record.
    pub(super) fn into_reader(self) -> Result<SpillReader, TxnError> {
        let mut file = self.file.into_inner().map_err(|e| TxnError::Spill {
            action: "flush",
            message: e.error().to_string(),
        })?;
        file.seek(SeekFrom::Start(0)).map_err(io_error("rewind"))?;
        Ok(SpillReader {
            file: BufReader::with_capacity(1 << 20, file),
            remaining: self.records,
            buf: Vec::new(),
            relations: self.relations,
        })
    }
}

/// The spill file of a committed streamed transaction, being read back in order.
pub(super) struct SpillReader {
    file: BufReader<File>,
    remaining: u64,
    buf: Vec<u8>,
    relations: Relations,
}

impl SpillReader {
    /// The next record, or `None` after the last one.
    pub(super) fn next(&mut self) -> Result<Option<Held>, TxnError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len).map_err(io_error("read"))?;
        self.buf.resize(u32::from_be_bytes(len) as usize, 0);
        self.file
            .read_exact(&mut self.buf)
            .map_err(io_error("read"))?;
        self.remaining -= 1;
        decode(&self.buf, &self.relations).map(Some)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn put_tuple(out: &mut Vec<u8>, t: &TupleData) {
    out.put_u16(t.columns.len() as u16);
    for c in &t.columns {
        match c {
            TupleColumn::Null => out.put_u8(b'n'),
            TupleColumn::UnchangedToast => out.put_u8(b'u'),
            TupleColumn::Text(b) => {
                out.put_u8(b't');
                put_bytes(out, b);
            }
            TupleColumn::Binary(b) => {
                out.put_u8(b'b');
                put_bytes(out, b);
            }
        }
    }
}

fn encode(held: &Held, out: &mut Vec<u8>) {
    match held {
        Held::Change { subxid, change } => {
            out.put_u8(0);
            out.put_u32(*subxid);
            out.put_u32(change.relation.relation.id);
            out.put_u32(change.relation.version);
            out.put_u8(match change.op {
                ChangeOp::Insert => b'I',
                ChangeOp::Update => b'U',
                ChangeOp::Delete => b'D',
                ChangeOp::Truncate => b'T',
            });
            match &change.new {
                None => out.put_u8(0),
                Some(t) => {
                    out.put_u8(1);
                    put_tuple(out, t);
                }
            }
            match &change.old {
                None => out.put_u8(0),
                Some(OldTuple::Key(t)) => {
                    out.put_u8(b'K');
                    put_tuple(out, t);
                }
                Some(OldTuple::Full(t)) => {
                    out.put_u8(b'O');
                    put_tuple(out, t);
                }
            }
        }
        Held::Message { subxid, message } => {
            out.put_u8(1);
            out.put_u32(*subxid);
            out.put_u64(message.lsn.0);
            put_bytes(out, message.prefix.as_bytes());
            put_bytes(out, &message.content);
        }
    }
}

/// A reader over one record that fails, instead of panicking, on a short record.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn need(&self, n: usize) -> Result<(), TxnError> {
        if self.0.remaining() < n {
            return Err(TxnError::SpillCorrupt("record ends early"));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, TxnError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, TxnError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, TxnError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, TxnError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, TxnError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        let b = Bytes::copy_from_slice(&self.0[..len]);
        self.0.advance(len);
        Ok(b)
    }
    fn tuple(&mut self) -> Result<TupleData, TxnError> {
        let n = self.u16()? as usize;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            columns.push(match self.u8()? {
                b'n' => TupleColumn::Null,
                b'u' => TupleColumn::UnchangedToast,
                b't' => TupleColumn::Text(self.bytes()?),
                b'b' => TupleColumn::Binary(self.bytes()?),
                _ => return Err(TxnError::SpillCorrupt("unknown column kind")),
            });
        }
        Ok(TupleData { columns })
    }
}

fn decode(record: &[u8], relations: &Relations) -> Result<Held, TxnError> {
    let mut c = Cursor(record);
    let held = match c.u8()? {
        0 => {
            let subxid = c.u32()?;
            let key = (c.u32()?, c.u32()?);
            let relation = relations
                .get(&key)
                .cloned()
                .ok_or(TxnError::SpillCorrupt("unknown relation version"))?;
            let op = match c.u8()? {
                b'I' => ChangeOp::Insert,
                b'U' => ChangeOp::Update,
                b'D' => ChangeOp::Delete,
                b'T' => ChangeOp::Truncate,
                _ => return Err(TxnError::SpillCorrupt("unknown operation")),
            };
            let new = match c.u8()? {
                0 => None,
                _ => Some(c.tuple()?),
            };
            let old = match c.u8()? {
                0 => None,
                b'K' => Some(OldTuple::Key(c.tuple()?)),
                b'O' => Some(OldTuple::Full(c.tuple()?)),
                _ => return Err(TxnError::SpillCorrupt("unknown old-tuple kind")),
            };
            Held::Change {
                subxid,
                change: Change {
                    relation,
                    op,
                    new,
                    old,
                },
            }
        }
        1 => {
            let subxid = c.u32()?;
            let lsn = Lsn(c.u64()?);
            let prefix = String::from_utf8(c.bytes()?.to_vec())
                .map_err(|_| TxnError::SpillCorrupt("message prefix is not UTF-8"))?;
            let content = c.bytes()?;
            Held::Message {
                subxid,
                message: LogicalMessage {
                    transactional: true,
                    lsn,
                    prefix,
                    content,
                },
            }
        }
        _ => return Err(TxnError::SpillCorrupt("unknown record kind")),
    };
    if c.0.has_remaining() {
        return Err(TxnError::SpillCorrupt("trailing bytes"));
    }
    Ok(held)
}

/// Bytes a held record occupies in memory (approximately): what counts against the limit.
pub(super) fn held_size(held: &Held) -> usize {
    fn tuple(t: &TupleData) -> usize {
        24 + t
            .columns
            .iter()
            .map(|c| match c {
                TupleColumn::Text(b) | TupleColumn::Binary(b) => 32 + b.len(),
                _ => 32,
            })
            .sum::<usize>()
    }
    match held {
        Held::Change { change, .. } => {
            64 + change.new.as_ref().map_or(0, tuple)
                + change.old.as_ref().map_or(0, |o| tuple(o.tuple()))
        }
        Held::Message { message, .. } => 64 + message.prefix.len() + message.content.len(),
    }
}

pub(super) fn subxid_of(held: &Held) -> Xid {
    match held {
        Held::Change { subxid, .. } | Held::Message { subxid, .. } => *subxid,
    }
}
