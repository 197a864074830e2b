//! Postgres types and values: the one place where a column's Postgres type is mapped to what
//! slotlake writes.
//!
//! Data flow: the pgoutput decoder hands over each column as raw bytes (text form by default,
//! binary form when the `binary` option is on) together with the column's type OID and typmod
//! from the Relation message. [`PgType::resolve`] turns OID + typmod into a [`PgType`] (builtin
//! types from the table below, user types — enums, domains, arrays of them — through the
//! catalog, see [`catalog`]). [`text::parse`] / [`binary::parse`] turn the bytes into a typed
//! [`Value`]. Values are exact: numerics keep every digit, floats keep NaN and ±Infinity,
//! timestamps keep ±infinity as distinct variants instead of clamping them.
//!
//! | Postgres                                   | `PgType`        | lake (Arrow) type                 |
//! |--------------------------------------------|-----------------|-----------------------------------|
//! | `bool`                                     | `Bool`          | Boolean                           |
//! | `int2` / `int4` / `int8`                   | `Int2/4/8`      | Int16 / Int32 / Int64             |
//! | `oid`, `xid`                               | `Oid`           | Int64                             |
//! | `float4` / `float8`                        | `Float4/8`      | Float32 / Float64 (NaN, ±Inf kept)|
//! | `numeric(p,s)`, 1 ≤ p ≤ 38, 0 ≤ s ≤ p      | `Numeric`       | Decimal128(p, s) (NaN: null, flagged) |
//! | other `numeric` (unconstrained, p > 38, s < 0 or s > p) | `Numeric` | Utf8 (exact text)      |
//! | `text`, `varchar`, `bpchar`, `name`, `"char"` | `Text`       | Utf8                              |
//! | `bytea`                                    | `Bytea`         | Binary                            |
//! | `uuid`                                     | `Uuid`          | Utf8 (lowercase 8-4-4-4-12)       |
//! | `date`                                     | `Date`          | Date32 (±infinity: i32::MAX/MIN)  |
//! | `timestamp`                                | `Timestamp`     | Timestamp(µs) (±infinity: i64::MAX/MIN) |
//! | `timestamptz`                              | `TimestampTz`   | Timestamp(µs, UTC) (same sentinels) |
//! | `time`                                     | `Time`          | Utf8 (`HH:MM:SS[.ffffff]`)        |
//! | `timetz`                                   | `TimeTz`        | Utf8 (`HH:MM:SS[.ffffff]±HH:MM`)  |
//! | `interval`                                 | `Interval`      | Utf8 (ISO 8601, `P1Y2M3DT4H`)     |
//! | `json`, `jsonb`                            | `Json`/`Jsonb`  | Utf8 (JSON text)                  |
//! | `T[]` (any dimension count)                | `Array(T)`      | List(T) (multi-dimensional arrays flattened row-major, dims flagged) |
//! | enum                                       | `Enum`          | Utf8 (label)                      |
//! | domain over T                              | T               | as T                              |
//! | anything else                              | `Unknown`       | Utf8 (Postgres text form)         |
//!
//! The lake types are Delta Lake's; [`arrow`] builds the columns and documents the stand-ins for
//! values a lake type cannot hold (they are flagged in the change log's `_special` column).

pub mod arrow;
pub mod binary;
pub mod calendar;
pub mod catalog;
pub mod json;
pub mod text;

use std::fmt;

/// What slotlake knows about a column's type: enough to parse its values and choose its lake type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    /// `oid`, `xid`, `cid`, `regclass` and friends: unsigned 32-bit.
    Oid,
    Float4,
    Float8,
    /// `numeric(precision, scale)` when the column has a typmod; `None` when unconstrained.
    Numeric {
        precision_scale: Option<(u16, i16)>,
    },
    /// text, varchar, bpchar, name, "char", citext-like builtins: UTF-8 text.
    Text,
    Bytea,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
    Time,
    TimeTz,
    Interval,
    Json,
    Jsonb,
    /// A user enum: values are its labels.
    Enum {
        oid: u32,
    },
    /// An array of the element type.
    Array(Box<PgType>),
    /// A type without a dedicated mapping: kept as its Postgres text form.
    Unknown {
        oid: u32,
    },
}

/// Builtin type OIDs (from `pg_type.dat`; stable across releases).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const REGPROC: u32 = 24;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const XID: u32 = 28;
    pub const CID: u32 = 29;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const REGCLASS: u32 = 2205;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    pub const BOOL_ARRAY: u32 = 1000;
    pub const BYTEA_ARRAY: u32 = 1001;
    pub const CHAR_ARRAY: u32 = 1002;
    pub const NAME_ARRAY: u32 = 1003;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const OID_ARRAY: u32 = 1028;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIME_ARRAY: u32 = 1183;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const INTERVAL_ARRAY: u32 = 1187;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const TIMETZ_ARRAY: u32 = 1270;
    pub const JSON_ARRAY: u32 = 199;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSONB_ARRAY: u32 = 3807;
}

impl PgType {
    /// The mapping table for builtin types. `typmod` is the column's `atttypmod` (-1 when none);
    /// for arrays it applies to the element. Returns `None` for OIDs that are not builtin
    /// scalars or arrays of them; those go through [`catalog`].
    pub fn from_builtin(type_oid: u32, typmod: i32) -> Option<PgType> {
        use oid::*;
        let scalar = |o: u32| -> Option<PgType> {
            Some(match o {
                BOOL => PgType::Bool,
                INT2 => PgType::Int2,
                INT4 => PgType::Int4,
                INT8 => PgType::Int8,
                OID | XID | CID | REGCLASS | REGPROC => PgType::Oid,
                FLOAT4 => PgType::Float4,
                FLOAT8 => PgType::Float8,
                NUMERIC => PgType::Numeric {
                    precision_scale: numeric_typmod(typmod),
                },
                TEXT | VARCHAR | BPCHAR | NAME | CHAR => PgType::Text,
                BYTEA => PgType::Bytea,
                UUID => PgType::Uuid,
                DATE => PgType::Date,
                TIMESTAMP => PgType::Timestamp,
                TIMESTAMPTZ => PgType::TimestampTz,
                TIME => PgType::Time,
                TIMETZ => PgType::TimeTz,
                INTERVAL => PgType::Interval,
                JSON => PgType::Json,
                JSONB => PgType::Jsonb,
                _ => return None,
            })
        };
        let element = match type_oid {
            BOOL_ARRAY => Some(BOOL),
            BYTEA_ARRAY => Some(BYTEA),
            CHAR_ARRAY => Some(CHAR),
            NAME_ARRAY => Some(NAME),
            INT2_ARRAY => Some(INT2),
            INT4_ARRAY => Some(INT4),
            TEXT_ARRAY => Some(TEXT),
            BPCHAR_ARRAY => Some(BPCHAR),
            VARCHAR_ARRAY => Some(VARCHAR),
            INT8_ARRAY => Some(INT8),
            FLOAT4_ARRAY => Some(FLOAT4),
            FLOAT8_ARRAY => Some(FLOAT8),
            OID_ARRAY => Some(OID),
            TIMESTAMP_ARRAY => Some(TIMESTAMP),
            DATE_ARRAY => Some(DATE),
            TIME_ARRAY => Some(TIME),
            TIMESTAMPTZ_ARRAY => Some(TIMESTAMPTZ),
            INTERVAL_ARRAY => Some(INTERVAL),
            NUMERIC_ARRAY => Some(NUMERIC),
            TIMETZ_ARRAY => Some(TIMETZ),
            JSON_ARRAY => Some(JSON),
            UUID_ARRAY => Some(UUID),
            JSONB_ARRAY => Some(JSONB),
            _ => None,
        };
        match element {
            Some(e) => scalar(e).map(|t| PgType::Array(Box::new(t))),
            None => scalar(type_oid),
        }
    }

    /// A short name for messages and JSON output (`int4`, `numeric(10,2)`, `text[]`).
    pub fn name(&self) -> String {
        match self {
            PgType::Bool => "bool".into(),
            PgType::Int2 => "int2".into(),
            PgType::Int4 => "int4".into(),
            PgType::Int8 => "int8".into(),
            PgType::Oid => "oid".into(),
            PgType::Float4 => "float4".into(),
            PgType::Float8 => "float8".into(),
            PgType::Numeric {
                precision_scale: Some((p, s)),
            } => format!("numeric({p},{s})"),
            PgType::Numeric {
                precision_scale: None,
            } => "numeric".into(),
            PgType::Text => "text".into(),
            PgType::Bytea => "bytea".into(),
            PgType::Uuid => "uuid".into(),
            PgType::Date => "date".into(),
            PgType::Timestamp => "timestamp".into(),
            PgType::TimestampTz => "timestamptz".into(),
            PgType::Time => "time".into(),
            PgType::TimeTz => "timetz".into(),
            PgType::Interval => "interval".into(),
            PgType::Json => "json".into(),
            PgType::Jsonb => "jsonb".into(),
            PgType::Enum { oid } => format!("enum({oid})"),
            PgType::Array(e) => format!("{}[]", e.name()),
            PgType::Unknown { oid } => format!("unknown({oid})"),
        }
    }
}

/// Decodes a numeric typmod into (precision, scale); `None` for -1 (unconstrained).
pub fn numeric_typmod(typmod: i32) -> Option<(u16, i16)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4; // VARHDRSZ
    let precision = ((t >> 16) & 0xffff) as u16;
    // Scale is an 11-bit signed field since PG 15 (negative scales allowed).
    let raw_scale = t & 0x7ff;
    let scale = if raw_scale & 0x400 != 0 {
        (raw_scale | !0x7ff) as i16
    } else {
        raw_scale as i16
    };
    Some((precision, scale))
}

/// Positive or negative infinity, or a finite value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Infinite<T> {
    NegInfinity,
    Finite(T),
    PosInfinity,
}

/// An exact `numeric`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Numeric {
    /// Canonical decimal text exactly as Postgres' `numeric_out` prints it: optional `-`,
    /// digits, and when the display scale is > 0 a `.` followed by exactly that many digits
    /// (trailing zeros kept, e.g. `-12.500`). Never exponent notation.
    Finite(String),
    NaN,
    PosInfinity,
    NegInfinity,
}

/// One dimension of an array: its length and lower bound (1 unless set explicitly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArrayDim {
    pub len: u32,
    pub lower_bound: i32,
}

/// A Postgres array: dimensions and the elements in row-major order. An empty array has no
/// dimensions and no elements.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayValue {
    pub dims: Vec<ArrayDim>,
    pub elements: Vec<Value>,
}

/// A typed, exact column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Oid(u32),
    Float4(f32),
    Float8(f64),
    Numeric(Numeric),
    Text(String),
    Bytea(Vec<u8>),
    Uuid([u8; 16]),
    /// Days since 1970-01-01 (proleptic Gregorian; year 0 = 1 BC).
    Date(Infinite<i32>),
    /// Microseconds since 1970-01-01 00:00:00 (no time zone).
    Timestamp(Infinite<i64>),
    /// Microseconds since 1970-01-01 00:00:00 UTC.
    TimestampTz(Infinite<i64>),
    /// Microseconds since midnight (0 ..= 86_400_000_000; Postgres allows 24:00:00).
    Time(i64),
    /// Microseconds since midnight and the UTC offset in seconds, east positive
    /// (`12:00:00+02` is offset +7200).
    TimeTz {
        micros: i64,
        offset_seconds: i32,
    },
    Interval {
        months: i32,
        days: i32,
        micros: i64,
    },
    /// JSON text as Postgres printed it (json keeps the input text; jsonb is normalised).
    Json(String),
    Enum(String),
    Array(ArrayValue),
    /// Text form of a type without a dedicated mapping.
    Unknown(String),
}

/// A value that could not be parsed as its column type. The raw bytes are never included: they
/// are row data and must not reach logs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("invalid {form} {type_name} value: {reason}")]
    Invalid {
        form: &'static str,
        type_name: String,
        reason: String,
    },
    #[error("{type_name} value out of the supported range: {reason}")]
    OutOfRange { type_name: String, reason: String },
    #[error("binary form of {type_name} is not supported; use text mode (omit --binary)")]
    BinaryUnsupported { type_name: String },
}

impl fmt::Display for PgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmod_decodes_precision_and_scale() {
        // numeric(10,2): ((10 << 16) | 2) + 4
        assert_eq!(numeric_typmod(((10 << 16) | 2) + 4), Some((10, 2)));
        assert_eq!(numeric_typmod(-1), None);
        // numeric(5,-3), allowed since PG 15
        assert_eq!(
            numeric_typmod(((5 << 16) | (-3i32 & 0x7ff)) + 4),
            Some((5, -3))
        );
    }

    #[test]
    fn builtin_arrays_map_to_element_type() {
        assert_eq!(
            PgType::from_builtin(oid::INT4_ARRAY, -1),
            Some(PgType::Array(Box::new(PgType::Int4)))
        );
        assert_eq!(
            PgType::from_builtin(oid::NUMERIC_ARRAY, ((12 << 16) | 3) + 4),
            Some(PgType::Array(Box::new(PgType::Numeric {
                precision_scale: Some((12, 3))
            })))
        );
        assert_eq!(PgType::from_builtin(600, -1), None); // point
    }
}

/// A column of a received tuple, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValue {
    Value(Value),
    /// A TOASTed value that did not change and was not sent (`u`).
    UnchangedToast,
}

/// Parses one tuple column as `ty`, in whichever form the server sent it.
pub fn decode_column(
    ty: &PgType,
    column: &crate::pgoutput::TupleColumn,
) -> Result<ColumnValue, ValueError> {
    use crate::pgoutput::TupleColumn;
    Ok(match column {
        TupleColumn::Null => ColumnValue::Value(Value::Null),
        TupleColumn::UnchangedToast => ColumnValue::UnchangedToast,
        TupleColumn::Text(raw) => ColumnValue::Value(text::parse(ty, raw)?),
        TupleColumn::Binary(raw) => ColumnValue::Value(binary::parse(ty, raw)?),
    })
}
