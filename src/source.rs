//! Reading source tables: the published tables, their columns as change-log columns, and
//! their rows through a cursor, parsed by the same text parsers and Arrow builders as streamed
//! changes (so a snapshot row and a streamed row of one table have identical types). Used by
//! the initial snapshot and by `verify`.

use deltalake::arrow::array::RecordBatch;

use crate::batch::rows::{lake_column_name, ChangeBatchBuilder, ColumnSpec};
use crate::pgoutput::{Relation, RelationColumn, ReplicaIdentity};
use crate::replication::sql::{quote_ident, quote_literal, TableName};
use crate::replication::{ConnInfo, PgConnection};
use crate::types::catalog::TypeCatalog;
use crate::types::{ColumnValue, PgType, Value};

/// Rows fetched from a cursor at a time (one change-log batch).
pub const FETCH_ROWS: usize = 10_000;

/// A published table's columns: change-log specs (lake names), types, and source names.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub name: TableName,
    pub specs: Vec<ColumnSpec>,
    pub types: Vec<PgType>,
    pub names: Vec<String>,
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

/// The table's published columns as change-log columns (lake names, types, key flags).
pub async fn source_columns(
    sql: &mut PgConnection,
    catalog: &mut TypeCatalog,
    catalog_conn: &mut Option<PgConnection>,
    info: &ConnInfo,
    table: &TableName,
) -> anyhow::Result<(Vec<ColumnSpec>, Vec<PgType>, Vec<String>)> {
    let rows = sql
        .simple_query(&format!(
            "SELECT a.attname, a.atttypid::int8 AS oid, a.atttypmod,
                    (c.relreplident = 'f' OR EXISTS (
                        SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                          AND ((c.relreplident = 'd' AND i.indisprimary)
                            OR (c.relreplident = 'i' AND i.indisreplident))
                          AND a.attnum = ANY (i.indkey))) AS is_key
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
              ORDER BY a.attnum",
            quote_literal(&table.quoted())
        ))
        .await?;
    let columns: Vec<RelationColumn> = rows
        .iter()
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

/// Describes `table` (see [`source_columns`]).
pub async fn describe(
    sql: &mut PgConnection,
    catalog: &mut TypeCatalog,
    catalog_conn: &mut Option<PgConnection>,
    info: &ConnInfo,
    table: &TableName,
) -> anyhow::Result<SourceTable> {
    let (specs, types, names) = source_columns(sql, catalog, catalog_conn, info, table).await?;
    Ok(SourceTable {
        name: table.clone(),
        specs,
        types,
        names,
    })
}

/// How snapshot rows are stamped in the change log.
#[derive(Debug, Clone, Copy)]
pub struct RowStamp {
    pub op: &'static str,
    pub lsn: i64,
    /// `_seq` of the first row; the next rows count up.
    pub first_seq: i64,
    pub commit_ts_micros: i64,
}

/// A cursor over one table's rows (optionally restricted by `filter`, an SQL condition) in the
/// connection's current transaction.
pub struct Cursor {
    name: String,
    builder: ChangeBatchBuilder,
    types: Vec<PgType>,
    stamp: RowStamp,
    rows: u64,
}

impl Cursor {
    pub async fn open(
        conn: &mut PgConnection,
        name: &str,
        table: &SourceTable,
        filter: Option<&str>,
        stamp: RowStamp,
    ) -> anyhow::Result<Cursor> {
        let select = table
            .names
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        conn.simple_query(&format!(
            "DECLARE {} NO SCROLL CURSOR FOR SELECT {select} FROM {}{filter}",
            quote_ident(name),
            table.name.quoted()
        ))
        .await?;
        Ok(Cursor {
            name: name.to_string(),
            builder: ChangeBatchBuilder::new(table.specs.clone()),
            types: table.types.clone(),
            stamp,
            rows: 0,
        })
    }

    /// The next batch of rows, `None` at the end (the cursor is then closed).
    pub async fn next(&mut self, conn: &mut PgConnection) -> anyhow::Result<Option<RecordBatch>> {
        let rows = conn
            .simple_query(&format!(
                "FETCH FORWARD {FETCH_ROWS} FROM {}",
                quote_ident(&self.name)
            ))
            .await?;
        if rows.is_empty() {
            conn.simple_query(&format!("CLOSE {}", quote_ident(&self.name)))
                .await?;
            return Ok(None);
        }
        let mut values: Vec<ColumnValue> = Vec::with_capacity(self.types.len());
        for r in &rows {
            values.clear();
            for (i, ty) in self.types.iter().enumerate() {
                let v = match r.values().get(i).and_then(|v| v.as_deref()) {
                    None => Value::Null,
                    Some(text) => crate::types::text::parse(ty, text.as_bytes())?,
                };
                values.push(ColumnValue::Value(v));
            }
            let seq = self.stamp.first_seq + self.rows as i64;
            self.builder.append(
                self.stamp.op,
                self.stamp.lsn,
                seq,
                0,
                self.stamp.commit_ts_micros,
                &values,
                None,
            )?;
            self.rows += 1;
        }
        Ok(Some(self.builder.finish()?))
    }
}
