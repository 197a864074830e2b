//! Reading source tables: the published tables, their columns as change-log columns, and
//! their rows through a binary `COPY`, parsed by the same value parsers and Arrow builders as
//! streamed changes (so a snapshot row and a streamed row of one table have identical types).
//! Used by the initial snapshot and by `verify`.

use anyhow::Context;
use bytes::{Buf, BytesMut};
use deltalake::arrow::array::RecordBatch;

use crate::batch::rows::{lake_column_name, ChangeBatchBuilder, ColumnSpec, WireField};
use crate::pgoutput::{Relation, RelationColumn, ReplicaIdentity};
use crate::replication::sql::{quote_ident, quote_literal, TableName};
use crate::replication::{ConnInfo, PgConnection};
use crate::types::catalog::TypeCatalog;
use crate::types::PgType;

/// Rows per change-log batch read from a table.
pub const BATCH_ROWS: usize = 16 * 1024;

/// A published table's columns: change-log specs (lake names), types, and source names; and
/// the publication's row filter (PostgreSQL ≥ 15), which its rows are read through.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub name: TableName,
    pub specs: Vec<ColumnSpec>,
    pub types: Vec<PgType>,
    pub names: Vec<String>,
    pub row_filter: Option<String>,
}

pub async fn published_tables(
    sql: &mut PgConnection,
    publication: &str,
) -> anyhow::Result<Vec<TableName>> {
    let rows = sql
        .simple_query(&format!(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = {} ORDER BY 1, 2",
            quote_literal(publication)
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(TableName {
                schema: r.get("schemaname")?.to_string(),
                name: r.get("tablename")?.to_string(),
            })
        })
        .collect())
}

/// The table's columns as change-log columns (lake names, types, key flags): all of them, or
/// those named in `only` (a publication's column list) — generated columns only on PostgreSQL
/// ≥ 18, where `only` names them exactly when the publication publishes them
/// (`publish_generated_columns = stored`); older servers never send them, although
/// `pg_publication_tables` lists them.
async fn source_columns(
    sql: &mut PgConnection,
    catalog: &mut TypeCatalog,
    catalog_conn: &mut Option<PgConnection>,
    info: &ConnInfo,
    table: &TableName,
    only: Option<&[String]>,
) -> anyhow::Result<(Vec<ColumnSpec>, Vec<PgType>, Vec<String>)> {
    let generated_published = only.is_some() && sql.server_version_num() >= 180_000;
    let rows = sql
        .simple_query(&format!(
            "SELECT a.attname, a.atttypid::int8 AS oid, a.atttypmod, a.attgenerated <> '' AS generated,
                    (c.relreplident = 'f' OR EXISTS (
                        SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                          AND ((c.relreplident = 'd' AND i.indisprimary)
                            OR (c.relreplident = 'i' AND i.indisreplident))
                          AND a.attnum = ANY (i.indkey))) AS is_key
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            quote_literal(&table.quoted())
        ))
        .await?;
    let columns: Vec<RelationColumn> = rows
        .iter()
        .filter(|r| {
            let published = only.is_none_or(|only| {
                r.get("attname")
                    .is_some_and(|n| only.iter().any(|o| o == n))
            });
            let generated = r.get("generated") != Some("f");
            published && (!generated || generated_published)
        })
        .map(|r| RelationColumn {
            is_key: r.get("is_key") == Some("t"),
            name: r.get("attname").unwrap_or_default().to_string(),
            type_oid: r.get("oid").and_then(|v| v.parse().ok()).unwrap_or(0),
            type_modifier: r
                .get("atttypmod")
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1),
        })
        .collect();
    let relation = Relation {
        id: 0,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: ReplicaIdentity::Default,
        columns,
    };
    let types = catalog
        .resolve_relation(&relation, catalog_conn, info)
        .await?;
    let specs = relation
        .columns
        .iter()
        .zip(&types)
        .map(|(c, t)| ColumnSpec {
            name: lake_column_name(&c.name),
            ty: t.clone(),
            is_key: c.is_key,
        })
        .collect();
    let names = relation.columns.into_iter().map(|c| c.name).collect();
    Ok((specs, types, names))
}

/// Describes `table` as `publication` publishes it: on PostgreSQL ≥ 15 only the columns of its
/// column list, and its row filter — what streamed changes carry, so that snapshot rows and
/// verify's reads match them. A table the publication does not list is described whole.
pub async fn describe(
    sql: &mut PgConnection,
    catalog: &mut TypeCatalog,
    catalog_conn: &mut Option<PgConnection>,
    info: &ConnInfo,
    table: &TableName,
    publication: &str,
) -> anyhow::Result<SourceTable> {
    let (columns, row_filter) = if sql.server_version_num() >= 150_000 {
        let condition = format!(
            "p.pubname = {} AND p.schemaname = {} AND p.tablename = {}",
            quote_literal(publication),
            quote_literal(&table.schema),
            quote_literal(&table.name)
        );
        // One row per published column, each with the row filter (one row, no column, for
        // a table without columns).
        let rows = sql
            .simple_query(&format!(
                "SELECT p.rowfilter, a.col FROM pg_publication_tables p
                   LEFT JOIN LATERAL unnest(p.attnames) AS a(col) ON true WHERE {condition}"
            ))
            .await?;
        let columns: Vec<String> = rows
            .iter()
            .filter_map(|r| r.get("col").map(str::to_string))
            .collect();
        let row_filter = rows
            .first()
            .and_then(|r| r.get("rowfilter"))
            .map(str::to_string);
        ((!columns.is_empty()).then_some(columns), row_filter)
    } else {
        (None, None)
    };
    let (specs, types, names) =
        source_columns(sql, catalog, catalog_conn, info, table, columns.as_deref()).await?;
    Ok(SourceTable {
        name: table.clone(),
        specs,
        types,
        names,
        row_filter,
    })
}

/// How snapshot rows (`_op` `R`) are stamped in the change log.
#[derive(Debug, Clone, Copy)]
pub struct RowStamp {
    pub lsn: i64,
    /// `_seq` of the first row; the next rows count up.
    pub first_seq: i64,
    pub commit_ts_micros: i64,
}

/// A table's rows (optionally restricted by `filter`, an SQL condition) in the connection's
/// current transaction, read with `COPY (SELECT …) TO STDOUT (FORMAT binary)` and parsed by
/// the binary parsers into the same Arrow columns as streamed changes. Columns of types
/// without a binary parser (no dedicated mapping: kept as their text form) are selected as
/// `::text` and parsed as text. The connection is busy until [`Self::next`] returned `None`;
/// after an error it is still inside the copy and must be dropped.
pub struct Cursor {
    table: TableName,
    builder: ChangeBatchBuilder,
    /// Per column: selected as `::text`, parsed from its text form.
    text_form: Vec<bool>,
    stamp: RowStamp,
    rows: u64,
    /// Copy-data bytes of the rows in the builder (values take about as much as Arrow data).
    batch_bytes: usize,
    /// Copy data not parsed yet (a row can span messages in principle).
    buf: BytesMut,
    header_seen: bool,
    trailer_seen: bool,
    /// The copy has ended and the session is ready again.
    ended: bool,
}

/// Signature opening a binary COPY stream.
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Bytes of rows after which a batch ends before [`BATCH_ROWS`] (wide rows: a table of
/// 1 MiB values gives batches of 32 rows).
const BATCH_BYTES: usize = 32 << 20;

impl Cursor {
    pub async fn open(
        conn: &mut PgConnection,
        table: &SourceTable,
        filter: Option<&str>,
        stamp: RowStamp,
    ) -> anyhow::Result<Cursor> {
        let text_form: Vec<bool> = table.types.iter().map(needs_text_form).collect();
        let select = table
            .names
            .iter()
            .zip(&text_form)
            .map(|(n, text)| {
                if *text {
                    format!("{}::text", quote_ident(n))
                } else {
                    quote_ident(n)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let conditions: Vec<String> = [table.row_filter.as_deref(), filter]
            .into_iter()
            .flatten()
            .map(|c| format!("({c})"))
            .collect();
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        conn.copy_out(&format!(
            "COPY (SELECT {select} FROM {}{filter}) TO STDOUT (FORMAT binary)",
            table.name.quoted()
        ))
        .await?;
        Ok(Cursor {
            table: table.name.clone(),
            builder: ChangeBatchBuilder::keeping_capacity(table.specs.clone()),
            text_form,
            stamp,
            rows: 0,
            batch_bytes: 0,
            buf: BytesMut::new(),
            header_seen: false,
            trailer_seen: false,
            ended: false,
        })
    }

    /// The next batch of rows, `None` at the end (the session is then ready for queries).
    pub async fn next(&mut self, conn: &mut PgConnection) -> anyhow::Result<Option<RecordBatch>> {
        loop {
            let full = !self.buf.is_empty() && self.parse_rows()?;
            if full || (self.ended && !self.builder.is_empty()) {
                self.batch_bytes = 0;
                return Ok(Some(self.builder.finish()?));
            }
            if self.ended {
                return Ok(None);
            }
            // Rows are parsed where they arrived, in the connection's buffer; only a row cut
            // across messages, or the rest of a message after a full batch, waits in `buf`.
            let mut failed = None;
            let mut full = false;
            let going = conn
                .copy_data_each(|data| match self.take(data) {
                    Ok(batch_full) => {
                        full = batch_full;
                        !batch_full
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                })
                .await?;
            if let Some(e) = failed {
                return Err(e);
            }
            if full {
                self.batch_bytes = 0;
                return Ok(Some(self.builder.finish()?));
            }
            if !going {
                self.ended = true;
                if !self.trailer_seen || !self.buf.is_empty() {
                    anyhow::bail!(
                        "COPY of {} ended without its trailer (truncated binary copy data)",
                        self.table
                    );
                }
            }
        }
    }

    /// Parses one CopyData payload; true when the batch is full. What is not parsed (a
    /// partial row, or rows past a full batch) is kept for later.
    fn take(&mut self, data: &[u8]) -> anyhow::Result<bool> {
        if !self.buf.is_empty() {
            self.buf.extend_from_slice(data);
            return self.parse_rows();
        }
        let (consumed, full) = self.parse_from(data)?;
        self.buf.extend_from_slice(&data[consumed..]);
        Ok(full)
    }

    /// Appends the complete rows in the buffer to the builder; true when the batch is full.
    fn parse_rows(&mut self) -> anyhow::Result<bool> {
        let data = std::mem::take(&mut self.buf);
        let parsed = self.parse_from(&data);
        self.buf = data;
        let (consumed, full) = parsed?;
        self.buf.advance(consumed);
        Ok(full)
    }

    fn parse_from(&mut self, data: &[u8]) -> anyhow::Result<(usize, bool)> {
        let bad = |what: &str| {
            anyhow::anyhow!("COPY of {}: malformed binary copy data: {what}", self.table)
        };
        let mut pos = 0;
        if !self.header_seen {
            if data.len() < 19 {
                return Ok((0, false));
            }
            if &data[..11] != COPY_SIGNATURE {
                return Err(bad("missing signature"));
            }
            // Bits 16–31 flag format changes a reader must not ignore (16: rows carry OIDs).
            let flags = be_u32(&data[11..15]);
            if flags & 0xffff_0000 != 0 {
                return Err(bad("unsupported header flags"));
            }
            let extension = be_u32(&data[15..19]) as usize;
            if data.len() < 19 + extension {
                return Ok((0, false));
            }
            pos = 19 + extension;
            self.header_seen = true;
        }
        let columns = self.text_form.len();
        loop {
            if self.trailer_seen {
                if pos < data.len() {
                    return Err(bad("data after the trailer"));
                }
                return Ok((pos, false));
            }
            if pos == data.len() {
                // The usual end: the server sends a row per message.
                return Ok((pos, false));
            }
            let Some(end) = row_end(&data[pos..], columns).map_err(|e| bad(&e))? else {
                return Ok((pos, false));
            };
            let row = &data[pos..pos + end];
            pos += end;
            if row == [0xff, 0xff] {
                self.trailer_seen = true;
                continue;
            }
            // `row_end` checked every length against the row.
            let fields = CopyFields {
                row,
                pos: 2,
                text_form: self.text_form.iter(),
            };
            let seq = self.stamp.first_seq + self.rows as i64;
            self.builder
                .append_read(self.stamp.lsn, seq, self.stamp.commit_ts_micros, fields)
                .with_context(|| format!("a row of {}", self.table))?;
            self.rows += 1;
            self.batch_bytes += end;
            if self.builder.len() >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES {
                return Ok((pos, true));
            }
        }
    }
}

/// The fields of one binary COPY row whose lengths [`row_end`] checked, in column order.
struct CopyFields<'a, 'b> {
    row: &'a [u8],
    pos: usize,
    text_form: std::slice::Iter<'b, bool>,
}

impl<'a> Iterator for CopyFields<'a, '_> {
    type Item = WireField<'a>;

    #[inline]
    fn next(&mut self) -> Option<WireField<'a>> {
        let text = *self.text_form.next()?;
        let len = be_u32(self.row.get(self.pos..self.pos + 4)?) as i32;
        self.pos += 4;
        let Ok(len) = usize::try_from(len) else {
            return Some(WireField::Null);
        };
        let raw = self.row.get(self.pos..self.pos + len)?;
        self.pos += len;
        Some(if text {
            WireField::Text(raw)
        } else {
            WireField::Binary(raw)
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.text_form.size_hint()
    }
}

impl ExactSizeIterator for CopyFields<'_, '_> {}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Length of the complete row (or the trailer, `-1` as its field count) at the start of
/// `data`, `None` when more data is needed; an error when the row cannot be one of `columns`
/// fields.
fn row_end(data: &[u8], columns: usize) -> Result<Option<usize>, String> {
    if data.len() < 2 {
        return Ok(None);
    }
    let count = i16::from_be_bytes([data[0], data[1]]);
    if count == -1 {
        return Ok(Some(2));
    }
    if count as usize != columns {
        return Err(format!("a row of {count} fields, expected {columns}"));
    }
    let mut p = 2;
    for _ in 0..columns {
        if data.len() < p + 4 {
            return Ok(None);
        }
        let len = be_u32(&data[p..p + 4]) as i32;
        p += 4;
        if len < -1 {
            return Err(format!("a field of length {len}"));
        }
        if len > 0 {
            p = p
                .checked_add(len as usize)
                .ok_or_else(|| format!("a field of length {len}"))?;
            if data.len() < p {
                return Ok(None);
            }
        }
    }
    Ok(Some(p))
}

/// Types the binary parser does not read (no dedicated mapping), anywhere in `ty`.
fn needs_text_form(ty: &PgType) -> bool {
    match ty {
        PgType::Unknown { .. } => true,
        PgType::Array(element) => needs_text_form(element),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_complete_only_with_every_field() {
        // Two fields: int4 7, null.
        let row = [0u8, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(row_end(&row, 2), Ok(Some(row.len())));
        for cut in 0..row.len() {
            assert_eq!(row_end(&row[..cut], 2), Ok(None), "cut at {cut}");
        }
        assert_eq!(row_end(&[0xff, 0xff], 2), Ok(Some(2)), "trailer");
        assert!(row_end(&row, 3).is_err(), "field count checked");
        let bad = [0u8, 1, 0xff, 0xff, 0xff, 0xfe];
        assert!(row_end(&bad, 1).is_err(), "negative length checked");
    }

    #[test]
    fn types_without_a_binary_parser_are_read_as_text() {
        assert!(needs_text_form(&PgType::Unknown { oid: 1 }));
        assert!(needs_text_form(&PgType::Array(Box::new(PgType::Unknown {
            oid: 1
        }))));
        assert!(!needs_text_form(&PgType::Array(Box::new(PgType::Int4))));
        assert!(!needs_text_form(&PgType::Text));
    }
}
