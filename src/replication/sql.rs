//! SQL text building: identifier and literal quoting, names of tables.
//!
//! Replication commands cannot take bind parameters, so every name that reaches SQL text goes
//! through these functions. Names with spaces, quotes, upper case or non-ASCII characters are
//! all legal in Postgres and must survive the round trip.

/// Quotes an identifier when Postgres would need it (like `quote_ident`): anything but lower-case
/// ASCII letters, digits and `_` not starting with a digit, and SQL keywords that would clash.
pub fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !is_reserved(name);
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Quotes a string literal (`'it''s'`); backslashes are literal with standard_conforming_strings.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

fn is_reserved(name: &str) -> bool {
    // The reserved words that are plausible table or column names; quoting more is harmless.
    const RESERVED: &[&str] = &[
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "current_date",
        "current_role",
        "current_time",
        "current_timestamp",
        "current_user",
        "default",
        "deferrable",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "fetch",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "having",
        "in",
        "initially",
        "intersect",
        "into",
        "lateral",
        "leading",
        "limit",
        "localtime",
        "localtimestamp",
        "not",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "placing",
        "primary",
        "references",
        "returning",
        "select",
        "session_user",
        "some",
        "symmetric",
        "table",
        "then",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "variadic",
        "when",
        "where",
        "window",
        "with",
    ];
    RESERVED.contains(&name)
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// `schema.table` quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Parses `schema.table` or `table` (schema `public`); either part may be double-quoted,
    /// in which case it is taken exactly (`"My Schema"."Orders.2024"`), otherwise lower-cased
    /// as Postgres does.
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts = split_qualified(s)?;
        match parts.as_slice() {
            [t] => Ok(TableName {
                schema: "public".into(),
                name: t.clone(),
            }),
            [s, t] => Ok(TableName {
                schema: s.clone(),
                name: t.clone(),
            }),
            _ => Err(format!(
                "{s:?} is not a table name: expected schema.table or table"
            )),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.quoted())
    }
}

/// Parses one identifier as Postgres does (quoted exactly, unquoted lower-cased).
pub fn parse_ident(s: &str) -> Result<String, String> {
    let parts = split_qualified(s)?;
    match parts.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!("{s:?} is not a single identifier")),
    }
}

fn split_qualified(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted identifier in {s:?}")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' {
                    return Err(format!("unexpected quote in {s:?}"));
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("empty identifier in {s:?}"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(_) => return Err(format!("unexpected text after identifier in {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("my table"), "\"my table\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1x"), "\"1x\"");
        assert_eq!(quote_ident("tëst"), "\"tëst\"");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("Public.Orders").unwrap(),
            TableName {
                schema: "public".into(),
                name: "orders".into()
            }
        );
        assert_eq!(
            TableName::parse("\"My Schema\".\"Or\"\"ders.x\"").unwrap(),
            TableName {
                schema: "My Schema".into(),
                name: "Or\"ders.x".into()
            }
        );
        assert_eq!(TableName::parse("t").unwrap().schema, "public");
        for bad in ["", "a.b.c", "\"open", "a..b", ".a"] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
        let t = TableName {
            schema: "Sch ema".into(),
            name: "tä\"b".into(),
        };
        assert_eq!(TableName::parse(&t.quoted()).unwrap(), t);
    }
}
