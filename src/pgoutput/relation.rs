//! The relation cache: what each table looked like when its rows were sent.
//!
//! Data flow: pgoutput sends a Relation message before the first change of a table in each
//! session, again after every schema change, and again in every streamed block. Tuples carry
//! only the relation OID, so the assembler keeps the latest definition here and interprets
//! each tuple with it. [`RelationCache::apply`] classifies every Relation message as new,
//! re-sent unchanged (the common case after reconnects and in streamed blocks — no work for the
//! sink) or changed (the sink must evolve the table's schema), and numbers each distinct
//! definition with a per-relation version. Definitions are shared as `Arc`s so that buffered
//! rows can keep the schema they were decoded with while a newer one arrives.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Relation, RelationId};
use crate::replication::sql::quote_ident;

/// A relation definition and its version: 1 for the first definition seen, +1 on each change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRelation {
    pub relation: Relation,
    pub version: u32,
}

impl CachedRelation {
    /// `schema.table`, quoted where needed; see [`Relation::qualified_name`].
    pub fn qualified_name(&self) -> String {
        self.relation.qualified_name()
    }
}

/// What a Relation message did to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    /// First definition of this relation (version 1).
    New,
    /// The same definition was sent again; the cache is unchanged.
    Unchanged,
    /// The definition differs from the cached one (namespace, name, replica identity, or any
    /// column's name, type, typmod or key flag); `current.version == previous.version + 1`.
    Changed {
        previous: Arc<CachedRelation>,
        current: Arc<CachedRelation>,
    },
}

/// The latest definition of every relation seen in this replication session.
#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<RelationId, Arc<CachedRelation>, foldhash::fast::RandomState>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a Relation message and says whether it is new, unchanged or a schema change.
    pub fn apply(&mut self, relation: Relation) -> SchemaChange {
        match self.relations.get_mut(&relation.id) {
            None => {
                self.relations.insert(
                    relation.id,
                    Arc::new(CachedRelation {
                        relation,
                        version: 1,
                    }),
                );
                SchemaChange::New
            }
            Some(cached) if cached.relation == relation => SchemaChange::Unchanged,
            Some(cached) => {
                let current = Arc::new(CachedRelation {
                    relation,
                    version: cached.version.saturating_add(1),
                });
                let previous = std::mem::replace(cached, Arc::clone(&current));
                SchemaChange::Changed { previous, current }
            }
        }
    }

    pub fn get(&self, id: RelationId) -> Option<&Arc<CachedRelation>> {
        self.relations.get(&id)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

impl Relation {
    /// `schema.table` with each part quoted only where an identifier needs it (see
    /// [`quote_ident`]). pgoutput sends an empty namespace for `pg_catalog`.
    pub fn qualified_name(&self) -> String {
        let namespace = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        };
        format!("{}.{}", quote_ident(namespace), quote_ident(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{RelationColumn, ReplicaIdentity};
    use proptest::prelude::*;

    fn relation(id: RelationId) -> Relation {
        Relation {
            id,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    is_key: false,
                    name: "note".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }
    }

    #[test]
    fn new_unchanged_changed_versions() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        assert_eq!(cache.apply(relation(1)), SchemaChange::New);
        assert_eq!(cache.get(1).map(|c| c.version), Some(1));
        assert_eq!(cache.apply(relation(1)), SchemaChange::Unchanged);
        assert_eq!(cache.get(1).map(|c| c.version), Some(1));

        let mut altered = relation(1);
        altered.columns.push(RelationColumn {
            is_key: false,
            name: "added".into(),
            type_oid: 20,
            type_modifier: -1,
        });
        match cache.apply(altered.clone()) {
            SchemaChange::Changed { previous, current } => {
                assert_eq!(previous.version, 1);
                assert_eq!(previous.relation, relation(1));
                assert_eq!(current.version, 2);
                assert_eq!(current.relation, altered);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(cache.get(1).map(|c| c.version), Some(2));
        assert_eq!(cache.apply(altered), SchemaChange::Unchanged);

        // Going back to the old definition is another change, not a return to version 1.
        assert!(matches!(
            cache.apply(relation(1)),
            SchemaChange::Changed { ref current, .. } if current.version == 3
        ));

        // Other relations are independent.
        assert_eq!(cache.apply(relation(2)), SchemaChange::New);
        assert_eq!(cache.get(2).map(|c| c.version), Some(1));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(3).is_none());
    }

    #[test]
    fn every_kind_of_difference_is_a_change() {
        let edits: Vec<fn(&mut Relation)> = vec![
            |r| r.namespace = "other".into(),
            |r| r.name = "renamed".into(),
            |r| r.replica_identity = ReplicaIdentity::Full,
            |r| {
                if let Some(c) = r.columns.first_mut() {
                    c.name = "key".into();
                }
            },
            |r| {
                if let Some(c) = r.columns.first_mut() {
                    c.type_oid = 20;
                }
            },
            |r| {
                if let Some(c) = r.columns.first_mut() {
                    c.type_modifier = 8;
                }
            },
            |r| {
                if let Some(c) = r.columns.first_mut() {
                    c.is_key = false;
                }
            },
            |r| {
                r.columns.pop();
            },
            |r| r.columns.reverse(),
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let mut cache = RelationCache::new();
            cache.apply(relation(1));
            let mut r = relation(1);
            edit(&mut r);
            assert!(
                matches!(cache.apply(r), SchemaChange::Changed { .. }),
                "edit {i}"
            );
        }
    }

    #[test]
    fn previous_definition_survives_for_holders() {
        let mut cache = RelationCache::new();
        cache.apply(relation(1));
        let held = cache.get(1).cloned();
        let mut renamed = relation(1);
        renamed.name = "orders_v2".into();
        cache.apply(renamed);
        assert_eq!(held.map(|c| c.relation.name.clone()), Some("orders".into()));
        assert_eq!(
            cache.get(1).map(|c| c.qualified_name()),
            Some("public.orders_v2".into())
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("_t1"), "_t1");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("order items"), "\"order items\"");
        assert_eq!(quote_ident("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote_ident("1abc"), "\"1abc\"");
        assert_eq!(quote_ident("café"), "\"café\"");
        assert_eq!(quote_ident("表"), "\"表\"");
        assert_eq!(quote_ident(""), "\"\"");
        assert_eq!(quote_ident("a-b"), "\"a-b\"");
        assert_eq!(quote_ident("a$b"), "\"a$b\"");

        let mut r = relation(1);
        r.namespace = "Sales".into();
        r.name = "line \"items\"".into();
        assert_eq!(r.qualified_name(), "\"Sales\".\"line \"\"items\"\"\"");
        r.namespace = String::new();
        r.name = "pg_class".into();
        assert_eq!(r.qualified_name(), "pg_catalog.pg_class");
    }

    /// Undoes `quote_ident`, as Postgres' identifier lexer would.
    fn unquote(s: &str) -> String {
        match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(inner) => inner.replace("\"\"", "\""),
            None => s.to_string(),
        }
    }

    proptest! {
        #[test]
        fn quote_ident_round_trips(ident in "\\PC{0,12}") {
            let quoted = quote_ident(&ident);
            prop_assert_eq!(unquote(&quoted), ident.clone());
            let lower_ascii = !ident.is_empty()
                && !ident.starts_with(|c: char| c.is_ascii_digit())
                && ident.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            // Anything else must be quoted (reserved words are quoted too).
            if !lower_ascii {
                prop_assert!(quoted.starts_with('"'));
            }
        }
    }
}
