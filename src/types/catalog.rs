//! Resolving type OIDs that are not builtin: enums, domains, arrays of them.
//!
//! pgoutput's Relation message gives each column's type OID and typmod; for user-defined types
//! it also sends a Type message with only the type's schema and name. What slotlake needs — is
//! it an enum, a domain over which base type, an array of what — comes from `pg_type`, read
//! over an ordinary SQL session and cached for the life of the process (type OIDs never change
//! meaning while they exist).

use std::collections::HashMap;

use super::PgType;
use crate::pgoutput::Relation;
use crate::replication::{ClientError, ConnInfo, PgConnection, SessionKind};

/// Domains over domains over arrays...: deeper than this is a cycle or a pathology.
const MAX_DEPTH: usize = 16;

/// Where type definitions are looked up.
#[allow(async_fn_in_trait)]
pub trait TypeSource {
    /// `(typtype, typbasetype, typelem, typcategory, typtypmod)` of a type, `None` if it does
    /// not exist.
    async fn pg_type(&mut self, oid: u32) -> Result<Option<TypeRow>, ClientError>;
}

/// The fields of `pg_type` the resolver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRow {
    pub typtype: char,
    pub typbasetype: u32,
    pub typelem: u32,
    pub typcategory: char,
    pub typtypmod: i32,
}

impl TypeSource for PgConnection {
    async fn pg_type(&mut self, oid: u32) -> Result<Option<TypeRow>, ClientError> {
        let rows = self
            .simple_query(&format!(
                "SELECT typtype::text, typbasetype::oid::int8::text AS base, typelem::oid::int8::text AS elem, \
                 typcategory::text, typtypmod::text FROM pg_catalog.pg_type WHERE oid = {oid}"
            ))
            .await?;
        Ok(rows.first().map(|r| TypeRow {
            typtype: r
                .get("typtype")
                .and_then(|s| s.chars().next())
                .unwrap_or('b'),
            typbasetype: r.get("base").and_then(|s| s.parse().ok()).unwrap_or(0),
            typelem: r.get("elem").and_then(|s| s.parse().ok()).unwrap_or(0),
            typcategory: r
                .get("typcategory")
                .and_then(|s| s.chars().next())
                .unwrap_or('U'),
            typtypmod: r
                .get("typtypmod")
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1),
        }))
    }
}

/// A cache of resolved column types, keyed by (type OID, typmod).
#[derive(Debug, Default)]
pub struct TypeCatalog {
    cache: HashMap<(u32, i32), PgType>,
}

impl TypeCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// The builtin mapping when it applies, without any lookup.
    pub fn builtin(oid: u32, typmod: i32) -> Option<PgType> {
        PgType::from_builtin(oid, typmod)
    }

    /// Resolves a column type, consulting `source` for types that are not builtin.
    pub async fn resolve<S: TypeSource>(
        &mut self,
        source: &mut S,
        oid: u32,
        typmod: i32,
    ) -> Result<PgType, ClientError> {
        if let Some(t) = PgType::from_builtin(oid, typmod) {
            return Ok(t);
        }
        if let Some(t) = self.cache.get(&(oid, typmod)) {
            return Ok(t.clone());
        }
        let mut chain = Vec::new();
        let resolved = self
            .resolve_inner(source, oid, typmod, 0, &mut chain)
            .await?;
        self.cache.insert((oid, typmod), resolved.clone());
        Ok(resolved)
    }

    /// The types of every column of `relation`. Builtin types need no lookup; the first other
    /// type opens `conn`, an ordinary SQL session to `source`, which is kept for later lookups
    /// (the replication session is busy streaming).
    pub async fn resolve_relation(
        &mut self,
        relation: &Relation,
        conn: &mut Option<PgConnection>,
        source: &ConnInfo,
    ) -> Result<Vec<PgType>, ClientError> {
        let mut types = Vec::with_capacity(relation.columns.len());
        for c in &relation.columns {
            if let Some(t) = PgType::from_builtin(c.type_oid, c.type_modifier) {
                types.push(t);
                continue;
            }
            let session = match conn {
                Some(session) => session,
                None => conn.insert(PgConnection::connect(source, SessionKind::Sql).await?),
            };
            types.push(self.resolve(session, c.type_oid, c.type_modifier).await?);
        }
        Ok(types)
    }

    async fn resolve_inner<S: TypeSource>(
        &mut self,
        source: &mut S,
        oid: u32,
        typmod: i32,
        depth: usize,
        chain: &mut Vec<u32>,
    ) -> Result<PgType, ClientError> {
        // Iterative over domains; arrays recurse once per level, bounded by MAX_DEPTH.
        let (mut oid, mut typmod) = (oid, typmod);
        let mut array_levels = 0usize;
        for _ in depth..MAX_DEPTH {
            if let Some(t) = PgType::from_builtin(oid, typmod) {
                return Ok(wrap_arrays(t, array_levels));
            }
            chain.push(oid);
            let Some(row) = source.pg_type(oid).await? else {
                return Ok(wrap_arrays(PgType::Unknown { oid }, array_levels));
            };
            match row.typtype {
                'e' => return Ok(wrap_arrays(PgType::Enum { oid }, array_levels)),
                'd' if row.typbasetype != 0 => {
                    // A domain's own typmod (e.g. numeric(10,2)) applies when the column has none.
                    if typmod < 0 {
                        typmod = row.typtypmod;
                    }
                    oid = row.typbasetype;
                }
                _ if row.typcategory == 'A' && row.typelem != 0 => {
                    array_levels += 1;
                    oid = row.typelem;
                }
                _ => return Ok(wrap_arrays(PgType::Unknown { oid }, array_levels)),
            }
        }
        // Too deep: fall back to the text form of the outermost type, which is always correct.
        Ok(PgType::Unknown {
            oid: chain.first().copied().unwrap_or(oid),
        })
    }
}

fn wrap_arrays(mut t: PgType, levels: usize) -> PgType {
    // Postgres arrays of arrays are one multi-dimensional array: a domain over an array used as
    // an array element is flattened the same way.
    if levels > 0 && !matches!(t, PgType::Array(_)) {
        t = PgType::Array(Box::new(t));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(HashMap<u32, TypeRow>, usize);
    impl TypeSource for Fake {
        async fn pg_type(&mut self, oid: u32) -> Result<Option<TypeRow>, ClientError> {
            self.1 += 1;
            Ok(self.0.get(&oid).cloned())
        }
    }
    fn row(typtype: char, base: u32, elem: u32, cat: char, typmod: i32) -> TypeRow {
        TypeRow {
            typtype,
            typbasetype: base,
            typelem: elem,
            typcategory: cat,
            typtypmod: typmod,
        }
    }

    #[tokio::test]
    async fn resolves_enums_domains_and_arrays() {
        let numeric_10_2 = ((10 << 16) | 2) + 4;
        let mut src = Fake(
            [
                (90001, row('e', 0, 0, 'E', -1)),              // mood
                (90002, row('b', 0, 90001, 'A', -1)),          // mood[]
                (90003, row('d', 1700, 0, 'N', numeric_10_2)), // money2 AS numeric(10,2)
                (90004, row('d', 90003, 0, 'N', -1)),          // domain over domain
                (90005, row('b', 0, 90004, 'A', -1)),          // array of that
                (90006, row('c', 0, 0, 'C', -1)),              // composite
                (90007, row('d', 1007, 0, 'A', -1)),           // domain over int4[]
            ]
            .into_iter()
            .collect(),
            0,
        );
        let mut cat = TypeCatalog::new();
        assert_eq!(
            cat.resolve(&mut src, 90001, -1).await.unwrap(),
            PgType::Enum { oid: 90001 }
        );
        assert_eq!(
            cat.resolve(&mut src, 90002, -1).await.unwrap(),
            PgType::Array(Box::new(PgType::Enum { oid: 90001 }))
        );
        let n = PgType::Numeric {
            precision_scale: Some((10, 2)),
        };
        assert_eq!(cat.resolve(&mut src, 90004, -1).await.unwrap(), n);
        assert_eq!(
            cat.resolve(&mut src, 90005, -1).await.unwrap(),
            PgType::Array(Box::new(n))
        );
        assert_eq!(
            cat.resolve(&mut src, 90006, -1).await.unwrap(),
            PgType::Unknown { oid: 90006 }
        );
        assert_eq!(
            cat.resolve(&mut src, 90007, -1).await.unwrap(),
            PgType::Array(Box::new(PgType::Int4))
        );
        assert_eq!(
            cat.resolve(&mut src, 12345, -1).await.unwrap(),
            PgType::Unknown { oid: 12345 }
        );
        let lookups = src.1;
        cat.resolve(&mut src, 90005, -1).await.unwrap();
        assert_eq!(src.1, lookups, "second resolve is served from the cache");
        assert_eq!(cat.resolve(&mut src, 23, -1).await.unwrap(), PgType::Int4);
    }

    #[tokio::test]
    async fn cycles_terminate() {
        let mut src = Fake(
            [(1, row('d', 2, 0, 'N', -1)), (2, row('d', 1, 0, 'N', -1))]
                .into_iter()
                .collect(),
            0,
        );
        assert_eq!(
            TypeCatalog::new().resolve(&mut src, 1, -1).await.unwrap(),
            PgType::Unknown { oid: 1 }
        );
    }
}
