//! The lake's Arrow types for Postgres columns, and the per-column builders that fill them.
//!
//! Data flow: [`super::text`] / [`super::binary`] turn column bytes into exact [`Value`]s; the
//! batcher (`crate::batch::rows`) appends each value to the [`ColumnBuilder`] of its column, and
//! the finished arrays become a change-log record batch written to Delta Lake.
//!
//! Delta Lake has no unsigned integers, no time of day, no interval, no fixed-size binary, and
//! its decimals need `0 ≤ scale ≤ precision ≤ 38`, so the mapping below ([`lake_type`]) keeps to
//! the types Delta can hold and stores everything else as exact text:
//!
//! | `PgType`                                   | lake (Arrow) type                             | stand-ins (reported as specials)        |
//! |--------------------------------------------|-----------------------------------------------|-----------------------------------------|
//! | `Bool`                                     | Boolean                                       |                                         |
//! | `Int2` / `Int4` / `Int8`                   | Int16 / Int32 / Int64                         |                                         |
//! | `Oid`                                      | Int64                                         |                                         |
//! | `Float4` / `Float8`                        | Float32 / Float64 (NaN, ±Inf stored as is)    |                                         |
//! | `Numeric(p,s)`, 1 ≤ p ≤ 38, 0 ≤ s ≤ p      | Decimal128(p, s)                              | NaN → null, `NaN`; ±Infinity → null, `infinity` / `-infinity` |
//! | any other `Numeric`                        | Utf8 (exact text, `NaN`, `Infinity`, `-Infinity`) |                                     |
//! | `Text`, `Enum`, `Unknown`, `Json`, `Jsonb` | Utf8                                          |                                         |
//! | `Bytea`                                    | Binary                                        |                                         |
//! | `Uuid`                                     | Utf8 (lowercase `8-4-4-4-12`)                 |                                         |
//! | `Date`                                     | Date32                                        | ±infinity → 9999-12-31 / 0001-01-01 with `infinity` / `-infinity`; outside years 1–9999 clamped with `original=<value>` |
//! | `Timestamp`                                | Timestamp(µs)                                 | ±infinity → 9999-12-31T23:59:59.999999 / 0001-01-01T00:00:00 with `infinity` / `-infinity`; outside years 1–9999 clamped with `original=<value>` |
//! | `TimestampTz`                              | Timestamp(µs, "UTC")                          | as `Timestamp`                          |
//! | `Time`, `TimeTz`, `Interval`               | Utf8 ([`calendar`] text forms)                |                                         |
//! | `Array(T)`                                 | List(Field "element": lake type of T, nullable) | more than one dimension → flattened row-major, `dims=2x3`; a lower bound other than 1 → `lower=0` (`lower=0,1`: one per dimension); element stand-ins → `[n]=<marker>`, `n` counting the flattened elements from 1 |
//!
//! Values the lake type cannot hold are never silently changed: they get the documented stand-in
//! and [`ColumnBuilder::append`] reports a marker for the row's `_special` column. A [`Value`]
//! variant that does not belong to the column's type, or a numeric whose digits do not fit the
//! decimal, is an [`ArrowValueError`]; [`ColumnBuilder::check`] finds those errors without
//! appending, so a whole row can be checked before any of its columns is touched.

use std::sync::Arc;

use deltalake::arrow::array::builder::NullBufferBuilder;
use deltalake::arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray,
    StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::buffer::{OffsetBuffer, ScalarBuffer};
use deltalake::arrow::datatypes::{DataType, Field, FieldRef, TimeUnit};

use super::{calendar, ArrayValue, Infinite, Numeric, PgType, Value};

/// The time zone of `timestamptz` columns and of `_commit_ts`.
pub const UTC: &str = "UTC";
/// The name of a list's element field, as Delta Lake writes it.
pub const LIST_ELEMENT: &str = "element";

/// Marker for a Decimal128 null standing in for `NaN`.
pub const SPECIAL_NAN: &str = "NaN";
/// Marker for a `+infinity` stand-in (date/timestamp maximum, or a decimal null).
pub const SPECIAL_INFINITY: &str = "infinity";
/// Prefix of the marker for a date or timestamp outside Delta's range (years 1 to 9999),
/// followed by the exact original value: `d=original=0044-03-15 BC`.
pub const SPECIAL_ORIGINAL: &str = "original=";
/// Delta's date range, 0001-01-01 ..= 9999-12-31, as days since 1970-01-01. Values outside it
/// (and ±infinity) are stored clamped to it and flagged in `_special`: readers such as Spark
/// reject or mangle dates outside it, and delta-rs's statistics code panics on them.
pub const DATE_MIN: i32 = -719_162;
pub const DATE_MAX: i32 = 2_932_896;
/// The same range for timestamps, in µs since 1970-01-01 00:00:00.
pub const TIMESTAMP_MIN: i64 = DATE_MIN as i64 * 86_400_000_000;
pub const TIMESTAMP_MAX: i64 = (DATE_MAX as i64 + 1) * 86_400_000_000 - 1;
/// Marker for a `-infinity` stand-in (date/timestamp minimum, or a decimal null).
pub const SPECIAL_NEG_INFINITY: &str = "-infinity";

/// A value that cannot be stored in its column. Never includes the value itself (row data).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ArrowValueError {
    #[error("a {value} value cannot be stored in a {column} column")]
    TypeMismatch { column: String, value: &'static str },
    #[error("numeric value does not fit a {column} column: {reason}")]
    Decimal {
        column: String,
        reason: &'static str,
    },
    #[error(
        "malformed {column} array: its dimensions hold {expected} elements but it has {actual}"
    )]
    ArrayShape {
        column: String,
        expected: u64,
        actual: usize,
    },
    #[error("{column} column holds more list elements than Arrow offsets allow; flush sooner")]
    ListTooLong { column: String },
}

/// The lake (Arrow) type of a Postgres type; see the module doc for the table.
pub fn lake_type(ty: &PgType) -> DataType {
    match ty {
        PgType::Bool => DataType::Boolean,
        PgType::Int2 => DataType::Int16,
        PgType::Int4 => DataType::Int32,
        PgType::Int8 | PgType::Oid => DataType::Int64,
        PgType::Float4 => DataType::Float32,
        PgType::Float8 => DataType::Float64,
        PgType::Numeric { precision_scale } => match decimal_params(*precision_scale) {
            Some((p, s)) => DataType::Decimal128(p, s),
            None => DataType::Utf8,
        },
        PgType::Text
        | PgType::Enum { .. }
        | PgType::Unknown { .. }
        | PgType::Json
        | PgType::Jsonb
        | PgType::Uuid
        | PgType::Time
        | PgType::TimeTz
        | PgType::Interval => DataType::Utf8,
        PgType::Bytea => DataType::Binary,
        PgType::Date => DataType::Date32,
        PgType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        PgType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        PgType::Array(element) => DataType::List(list_element_field(element)),
    }
}

/// The element field of a list column holding `element` values: named `element`, nullable.
pub fn list_element_field(element: &PgType) -> FieldRef {
    Arc::new(Field::new(LIST_ELEMENT, lake_type(element), true))
}

/// True when two lake types are the same for schema-evolution purposes: equal ignoring
/// nullability and the names of list element fields, with time zones `UTC` and `+00:00` equal.
/// Struct fields must agree in name and order.
pub fn same_lake_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::Timestamp(ua, za), DataType::Timestamp(ub, zb)) => {
            ua == ub
                && match (za, zb) {
                    (None, None) => true,
                    (Some(x), Some(y)) => canonical_tz(x) == canonical_tz(y),
                    _ => false,
                }
        }
        (DataType::List(x), DataType::List(y))
        | (DataType::LargeList(x), DataType::LargeList(y)) => {
            same_lake_type(x.data_type(), y.data_type())
        }
        (DataType::FixedSizeList(x, nx), DataType::FixedSizeList(y, ny)) => {
            nx == ny && same_lake_type(x.data_type(), y.data_type())
        }
        (DataType::Struct(xs), DataType::Struct(ys)) => {
            xs.len() == ys.len()
                && xs.iter().zip(ys.iter()).all(|(x, y)| {
                    x.name() == y.name() && same_lake_type(x.data_type(), y.data_type())
                })
        }
        _ => a == b,
    }
}

fn canonical_tz(tz: &str) -> &str {
    if tz == "+00:00" {
        UTC
    } else {
        tz
    }
}

/// `numeric(p,s)` parameters Decimal128 can hold: 1 ≤ p ≤ 38 and 0 ≤ s ≤ p.
fn decimal_params(precision_scale: Option<(u16, i16)>) -> Option<(u8, i8)> {
    let (p, s) = precision_scale?;
    let p = u8::try_from(p).ok().filter(|p| (1..=38).contains(p))?;
    let s = i8::try_from(s)
        .ok()
        .filter(|s| *s >= 0 && s.unsigned_abs() <= p)?;
    Some((p, s))
}

/// Parses canonical numeric text (`-12.500`) into its Decimal128 representation at `scale`:
/// the fraction is padded with zeros; more fraction digits than `scale`, or more significant
/// digits than `precision`, are errors (never rounded).
fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, &'static str> {
    const TOO_MANY_DIGITS: &str = "more digits than the precision allows";
    /// Digits accumulate in a u64 while they cannot overflow it (below 10^17, one more digit
    /// stays below 10^18): i128 arithmetic only for numbers that need it.
    const SMALL_LIMIT: u64 = 100_000_000_000_000_000;
    let bytes = text.as_bytes();
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, bytes),
    };
    let scale = u32::from(scale.unsigned_abs());
    let mut small: u64 = 0;
    let mut wide: Option<i128> = None;
    let mut any_digit = false;
    let mut fraction_digits: u32 = 0;
    let mut in_fraction = false;
    for &b in digits {
        match b {
            b'0'..=b'9' => {
                if in_fraction {
                    fraction_digits += 1;
                    if fraction_digits > scale {
                        return Err("more fraction digits than the scale");
                    }
                }
                any_digit = true;
                let d = u64::from(b - b'0');
                match wide {
                    None if small < SMALL_LIMIT => small = small * 10 + d,
                    _ => {
                        let w = wide.unwrap_or(i128::from(small));
                        wide = Some(
                            w.checked_mul(10)
                                .and_then(|v| v.checked_add(i128::from(d)))
                                .ok_or(TOO_MANY_DIGITS)?,
                        );
                    }
                }
            }
            b'.' if !in_fraction => in_fraction = true,
            _ => return Err("not plain decimal digits"),
        }
    }
    if !any_digit {
        return Err("no digits");
    }
    let value = wide.unwrap_or(i128::from(small));
    let value = pow10(scale - fraction_digits)
        .and_then(|f| value.checked_mul(f))
        .ok_or(TOO_MANY_DIGITS)?;
    let limit = pow10(u32::from(precision)).ok_or(TOO_MANY_DIGITS)?;
    if value >= limit {
        return Err(TOO_MANY_DIGITS);
    }
    Ok(if negative { -value } else { value })
}

/// 10^n as an i128, `None` past 10^38.
fn pow10(n: u32) -> Option<i128> {
    const POW10: [i128; 39] = {
        let mut t = [1i128; 39];
        let mut i = 1;
        while i < 39 {
            t[i] = t[i - 1] * 10;
            i += 1;
        }
        t
    };
    POW10.get(n as usize).copied()
}

/// The name of a value's variant, for error messages (never the value itself).
fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Int2(_) => "int2",
        Value::Int4(_) => "int4",
        Value::Int8(_) => "int8",
        Value::Oid(_) => "oid",
        Value::Float4(_) => "float4",
        Value::Float8(_) => "float8",
        Value::Numeric(_) => "numeric",
        Value::Text(_) => "text",
        Value::Bytea(_) => "bytea",
        Value::Uuid(_) => "uuid",
        Value::Date(_) => "date",
        Value::Timestamp(_) => "timestamp",
        Value::TimestampTz(_) => "timestamptz",
        Value::Time(_) => "time",
        Value::TimeTz { .. } => "timetz",
        Value::Interval { .. } => "interval",
        Value::Json(_) => "json",
        Value::Enum(_) => "enum",
        Value::Array(_) => "array",
        Value::Unknown(_) => "unknown",
    }
}

/// Whether `v` is the variant the parsers produce for a column of type `ty` (null always is).
fn accepts(ty: &PgType, v: &Value) -> bool {
    matches!(
        (ty, v),
        (_, Value::Null)
            | (PgType::Bool, Value::Bool(_))
            | (PgType::Int2, Value::Int2(_))
            | (PgType::Int4, Value::Int4(_))
            | (PgType::Int8, Value::Int8(_))
            | (PgType::Oid, Value::Oid(_))
            | (PgType::Float4, Value::Float4(_))
            | (PgType::Float8, Value::Float8(_))
            | (PgType::Numeric { .. }, Value::Numeric(_))
            | (PgType::Text, Value::Text(_))
            | (PgType::Bytea, Value::Bytea(_))
            | (PgType::Uuid, Value::Uuid(_))
            | (PgType::Date, Value::Date(_))
            | (PgType::Timestamp, Value::Timestamp(_))
            | (PgType::TimestampTz, Value::TimestampTz(_))
            | (PgType::Time, Value::Time(_))
            | (PgType::TimeTz, Value::TimeTz { .. })
            | (PgType::Interval, Value::Interval { .. })
            | (PgType::Json | PgType::Jsonb, Value::Json(_))
            | (PgType::Enum { .. }, Value::Enum(_))
            | (PgType::Array(_), Value::Array(_))
            | (PgType::Unknown { .. }, Value::Unknown(_))
    )
}

fn mismatch(ty: &PgType, v: &Value) -> ArrowValueError {
    ArrowValueError::TypeMismatch {
        column: ty.name(),
        value: value_kind(v),
    }
}

fn validity_bytes(len: usize) -> usize {
    len.div_ceil(8)
}

/// Builds one lake column from values of one Postgres type.
pub struct ColumnBuilder {
    ty: PgType,
    kind: Kind,
}

enum Kind {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal {
        builder: Decimal128Builder,
        precision: u8,
        scale: i8,
    },
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    List(Box<ListColumn>),
}

/// A list column: offsets and validity here, the flattened elements in a child builder.
struct ListColumn {
    field: FieldRef,
    /// Always starts with 0; one more entry than rows.
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
    elements: ColumnBuilder,
}

impl ColumnBuilder {
    /// An empty builder for a column of type `ty`, producing arrays of [`lake_type`]`(ty)`.
    pub fn new(ty: &PgType) -> Self {
        Self::with_capacity(ty, 1024, 1024)
    }

    /// [`Self::new`] with room for `rows` values (of `bytes` in all, for text and bytes) before
    /// its buffers grow.
    pub fn with_capacity(ty: &PgType, rows: usize, bytes: usize) -> Self {
        // The builder follows the one mapping, `lake_type`, rather than deciding it again.
        let kind = match (lake_type(ty), ty) {
            (DataType::Boolean, _) => Kind::Bool(BooleanBuilder::with_capacity(rows)),
            (DataType::Int16, _) => Kind::Int16(Int16Builder::with_capacity(rows)),
            (DataType::Int32, _) => Kind::Int32(Int32Builder::with_capacity(rows)),
            (DataType::Int64, _) => Kind::Int64(Int64Builder::with_capacity(rows)),
            (DataType::Float32, _) => Kind::Float32(Float32Builder::with_capacity(rows)),
            (DataType::Float64, _) => Kind::Float64(Float64Builder::with_capacity(rows)),
            (DataType::Decimal128(precision, scale), _) => Kind::Decimal {
                // `decimal_params` only admits what `with_precision_and_scale` accepts; the
                // fallback sets the same type without the (redundant) validation.
                builder: Decimal128Builder::with_capacity(rows)
                    .with_precision_and_scale(precision, scale)
                    .unwrap_or_else(|_| {
                        Decimal128Builder::with_capacity(rows)
                            .with_data_type(DataType::Decimal128(precision, scale))
                    }),
                precision,
                scale,
            },
            (DataType::Binary, _) => Kind::Binary(BinaryBuilder::with_capacity(rows, bytes)),
            (DataType::Date32, _) => Kind::Date32(Date32Builder::with_capacity(rows)),
            (DataType::Timestamp(_, tz), _) => Kind::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone_opt(tz),
            ),
            (DataType::List(field), PgType::Array(element)) => Kind::List(Box::new(ListColumn {
                field,
                offsets: vec![0],
                nulls: NullBufferBuilder::new(0),
                elements: ColumnBuilder::new(element),
            })),
            // Utf8, and nothing else: `lake_type` produces no other type.
            _ => Kind::Utf8(StringBuilder::with_capacity(rows, bytes)),
        };
        ColumnBuilder {
            ty: ty.clone(),
            kind,
        }
    }

    /// The Postgres type of the column.
    pub fn pg_type(&self) -> &PgType {
        &self.ty
    }

    /// Whether `v` can be appended: the right variant for the column's type, numerics that fit
    /// the decimal, well-formed arrays. Appends nothing.
    pub fn check(&self, v: &Value) -> Result<(), ArrowValueError> {
        match (&self.kind, v) {
            (_, Value::Null) => Ok(()),
            (
                Kind::Decimal {
                    precision, scale, ..
                },
                Value::Numeric(Numeric::Finite(text)),
            ) => parse_decimal(text, *precision, *scale)
                .map(drop)
                .map_err(|reason| ArrowValueError::Decimal {
                    column: self.ty.name(),
                    reason,
                }),
            (Kind::List(list), Value::Array(array)) => list.check(&self.ty, array),
            _ if accepts(&self.ty, v) => Ok(()),
            _ => Err(mismatch(&self.ty, v)),
        }
    }

    /// Appends a value of the column's type. Markers for values stored as stand-ins (`NaN`,
    /// `infinity`, `dims=2x2`, …; see the module doc) are pushed onto `specials`. On error
    /// nothing is appended.
    pub fn append(&mut self, v: &Value, specials: &mut Vec<String>) -> Result<(), ArrowValueError> {
        self.check(v)?;
        self.append_checked(v, specials)
    }

    /// [`Self::append`] for a value [`Self::check`] has accepted (skips the repeated checks).
    pub(crate) fn append_checked(
        &mut self,
        v: &Value,
        specials: &mut Vec<String>,
    ) -> Result<(), ArrowValueError> {
        let ty = &self.ty;
        if !accepts(ty, v) {
            return Err(mismatch(ty, v));
        }
        match (&mut self.kind, v) {
            (kind, Value::Null) => kind.append_null(),
            (Kind::Bool(b), Value::Bool(x)) => b.append_value(*x),
            (Kind::Int16(b), Value::Int2(x)) => b.append_value(*x),
            (Kind::Int32(b), Value::Int4(x)) => b.append_value(*x),
            (Kind::Int64(b), Value::Int8(x)) => b.append_value(*x),
            (Kind::Int64(b), Value::Oid(x)) => b.append_value(i64::from(*x)),
            (Kind::Float32(b), Value::Float4(x)) => b.append_value(*x),
            (Kind::Float64(b), Value::Float8(x)) => b.append_value(*x),
            (
                Kind::Decimal {
                    builder,
                    precision,
                    scale,
                },
                Value::Numeric(n),
            ) => match n {
                Numeric::Finite(text) => {
                    let d = parse_decimal(text, *precision, *scale).map_err(|reason| {
                        ArrowValueError::Decimal {
                            column: ty.name(),
                            reason,
                        }
                    })?;
                    builder.append_value(d);
                }
                Numeric::NaN => {
                    builder.append_null();
                    specials.push(SPECIAL_NAN.to_owned());
                }
                Numeric::PosInfinity => {
                    builder.append_null();
                    specials.push(SPECIAL_INFINITY.to_owned());
                }
                Numeric::NegInfinity => {
                    builder.append_null();
                    specials.push(SPECIAL_NEG_INFINITY.to_owned());
                }
            },
            (Kind::Utf8(b), v) => append_text(b, v),
            (Kind::Binary(b), Value::Bytea(x)) => b.append_value(x),
            (Kind::Date32(b), Value::Date(d)) => b.append_value(clamp_to_lake(
                *d,
                DATE_MIN..=DATE_MAX,
                calendar::format_date,
                specials,
            )),
            (Kind::Timestamp(b), Value::Timestamp(t) | Value::TimestampTz(t)) => {
                let tz = matches!(v, Value::TimestampTz(_));
                b.append_value(clamp_to_lake(
                    *t,
                    TIMESTAMP_MIN..=TIMESTAMP_MAX,
                    |t| calendar::format_timestamp(t, tz),
                    specials,
                ))
            }
            (Kind::List(list), Value::Array(array)) => list.append(ty, array, specials)?,
            (_, v) => return Err(mismatch(ty, v)),
        }
        Ok(())
    }

    /// Appends a value from its text wire form (`typoutput`: pgoutput's text columns, COPY of
    /// types read as text) straight into the column when its type has a direct path and the
    /// value needs no stand-in. Returns false, having appended nothing, otherwise (other
    /// types, `NaN` and infinite numerics, infinite or out-of-range dates and timestamps,
    /// malformed text): the caller then takes the typed way, [`text::parse`] and
    /// [`Self::append`], which also gives the error. Both ways give the same column; a property
    /// test holds them to it.
    ///
    /// [`text::parse`]: super::text::parse
    pub fn append_text_direct(&mut self, raw: &[u8]) -> bool {
        use super::text::direct;
        match (&mut self.kind, &self.ty) {
            (Kind::Bool(b), PgType::Bool) => match direct::bool(raw) {
                Some(x) => b.append_value(x),
                None => return false,
            },
            (Kind::Int16(b), PgType::Int2) => {
                match direct::int(raw, i16::MIN.into(), i16::MAX.into()) {
                    Some(x) => b.append_value(x as i16),
                    None => return false,
                }
            }
            (Kind::Int32(b), PgType::Int4) => {
                match direct::int(raw, i32::MIN.into(), i32::MAX.into()) {
                    Some(x) => b.append_value(x as i32),
                    None => return false,
                }
            }
            (Kind::Int64(b), PgType::Int8) => match direct::int(raw, i64::MIN, i64::MAX) {
                Some(x) => b.append_value(x),
                None => return false,
            },
            // oidin wraps negative input, like strtoul.
            (Kind::Int64(b), PgType::Oid) => {
                match direct::int(raw, i32::MIN.into(), u32::MAX.into()) {
                    Some(x) => b.append_value(i64::from(x as u32)),
                    None => return false,
                }
            }
            (Kind::Float32(b), PgType::Float4) => match direct::float::<f32>(raw) {
                Some(x) => b.append_value(x),
                None => return false,
            },
            (Kind::Float64(b), PgType::Float8) => match direct::float::<f64>(raw) {
                Some(x) => b.append_value(x),
                None => return false,
            },
            (
                Kind::Decimal {
                    builder,
                    precision,
                    scale,
                },
                PgType::Numeric { .. },
            ) => match direct::finite_numeric(raw)
                .and_then(|text| parse_decimal(text, *precision, *scale).ok())
            {
                Some(d) => builder.append_value(d),
                None => return false,
            },
            (
                Kind::Utf8(b),
                PgType::Text
                | PgType::Enum { .. }
                | PgType::Unknown { .. }
                | PgType::Json
                | PgType::Jsonb,
            ) => match std::str::from_utf8(raw) {
                Ok(text) => b.append_value(text),
                Err(_) => return false,
            },
            (Kind::Date32(b), PgType::Date) => match direct::date(raw) {
                Some(d) if (DATE_MIN..=DATE_MAX).contains(&d) => b.append_value(d),
                _ => return false,
            },
            (Kind::Timestamp(b), PgType::Timestamp | PgType::TimestampTz) => {
                let tz = matches!(self.ty, PgType::TimestampTz);
                match direct::timestamp(raw, tz) {
                    Some(t) if (TIMESTAMP_MIN..=TIMESTAMP_MAX).contains(&t) => b.append_value(t),
                    _ => return false,
                }
            }
            _ => return false,
        }
        true
    }

    /// Appends a value from its binary wire form (`typsend`: binary COPY, binary pgoutput)
    /// straight into the column when its type has a direct path and the value needs no
    /// stand-in. Returns false, having appended nothing, otherwise (other types, `NaN`,
    /// infinities, out-of-range dates, malformed bytes): the caller then takes the typed way,
    /// [`binary::parse`] and [`Self::append`], which also gives the error. Both ways give the
    /// same column; a property test holds them to it.
    ///
    /// [`binary::parse`]: super::binary::parse
    pub fn append_binary_direct(&mut self, raw: &[u8]) -> bool {
        use super::binary::{numeric_scaled, UNIX_TO_PG_EPOCH_DAYS, UNIX_TO_PG_EPOCH_MICROS};
        fn be<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
            raw.try_into().ok()
        }
        fn utf8(raw: &[u8]) -> Option<&str> {
            std::str::from_utf8(raw).ok()
        }
        match (&mut self.kind, &self.ty) {
            (Kind::Bool(b), PgType::Bool) => match raw {
                [0] => b.append_value(false),
                [1] => b.append_value(true),
                _ => return false,
            },
            (Kind::Int16(b), PgType::Int2) => match be(raw) {
                Some(x) => b.append_value(i16::from_be_bytes(x)),
                None => return false,
            },
            (Kind::Int32(b), PgType::Int4) => match be(raw) {
                Some(x) => b.append_value(i32::from_be_bytes(x)),
                None => return false,
            },
            (Kind::Int64(b), PgType::Int8) => match be(raw) {
                Some(x) => b.append_value(i64::from_be_bytes(x)),
                None => return false,
            },
            (Kind::Int64(b), PgType::Oid) => match be(raw) {
                Some(x) => b.append_value(i64::from(u32::from_be_bytes(x))),
                None => return false,
            },
            (Kind::Float32(b), PgType::Float4) => match be(raw) {
                Some(x) => b.append_value(f32::from_be_bytes(x)),
                None => return false,
            },
            (Kind::Float64(b), PgType::Float8) => match be(raw) {
                Some(x) => b.append_value(f64::from_be_bytes(x)),
                None => return false,
            },
            (
                Kind::Decimal {
                    builder,
                    precision,
                    scale,
                },
                PgType::Numeric { .. },
            ) => match numeric_scaled(raw, *precision, *scale) {
                Some(d) => builder.append_value(d),
                None => return false,
            },
            // A one-byte `"char"` that is NUL or not ASCII prints differently: the typed way.
            (Kind::Utf8(_), PgType::Text) if raw.len() == 1 && (raw[0] == 0 || raw[0] >= 0x80) => {
                return false
            }
            (Kind::Utf8(b), PgType::Text | PgType::Enum { .. } | PgType::Json) => match utf8(raw) {
                Some(text) => b.append_value(text),
                None => return false,
            },
            (Kind::Utf8(b), PgType::Jsonb) => match raw.split_first() {
                Some((1, json)) => match utf8(json) {
                    Some(text) => b.append_value(text),
                    None => return false,
                },
                _ => return false,
            },
            (Kind::Utf8(b), PgType::Uuid) => match be(raw) {
                Some(x) => b.append_value(format_uuid(&x).as_str()),
                None => return false,
            },
            (Kind::Binary(b), PgType::Bytea) => b.append_value(raw),
            (Kind::Date32(b), PgType::Date) => {
                let Some(days) = be(raw).map(i32::from_be_bytes) else {
                    return false;
                };
                // `infinity` (i32::MAX) overflows, `-infinity` lands below the range.
                match days.checked_add(UNIX_TO_PG_EPOCH_DAYS) {
                    Some(d) if (DATE_MIN..=DATE_MAX).contains(&d) => b.append_value(d),
                    _ => return false,
                }
            }
            (Kind::Timestamp(b), PgType::Timestamp | PgType::TimestampTz) => {
                let Some(micros) = be(raw).map(i64::from_be_bytes) else {
                    return false;
                };
                // `infinity` (i64::MAX) overflows, `-infinity` lands below the range.
                match micros.checked_add(UNIX_TO_PG_EPOCH_MICROS) {
                    Some(t) if (TIMESTAMP_MIN..=TIMESTAMP_MAX).contains(&t) => b.append_value(t),
                    _ => return false,
                }
            }
            _ => return false,
        }
        true
    }

    /// Appends a null.
    pub fn append_null(&mut self) {
        self.kind.append_null();
    }

    /// Appends `n` nulls.
    pub fn append_nulls(&mut self, n: usize) {
        self.kind.append_nulls(n);
    }

    /// Rows appended since the last [`Self::finish`].
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Bool(b) => b.len(),
            Kind::Int16(b) => b.len(),
            Kind::Int32(b) => b.len(),
            Kind::Int64(b) => b.len(),
            Kind::Float32(b) => b.len(),
            Kind::Float64(b) => b.len(),
            Kind::Decimal { builder, .. } => builder.len(),
            Kind::Utf8(b) => b.len(),
            Kind::Binary(b) => b.len(),
            Kind::Date32(b) => b.len(),
            Kind::Timestamp(b) => b.len(),
            Kind::List(list) => list.offsets.len().saturating_sub(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated bytes held by the appended data (values, offsets, validity; not spare
    /// capacity). Constant time per column (per nesting level for lists).
    pub fn memory_bytes(&self) -> usize {
        fn fixed(len: usize, width: usize) -> usize {
            len * width + validity_bytes(len)
        }
        match &self.kind {
            Kind::Bool(b) => 2 * validity_bytes(b.len()),
            Kind::Int16(b) => fixed(b.len(), 2),
            Kind::Int32(b) => fixed(b.len(), 4),
            Kind::Int64(b) => fixed(b.len(), 8),
            Kind::Float32(b) => fixed(b.len(), 4),
            Kind::Float64(b) => fixed(b.len(), 8),
            Kind::Decimal { builder, .. } => fixed(builder.len(), 16),
            Kind::Date32(b) => fixed(b.len(), 4),
            Kind::Timestamp(b) => fixed(b.len(), 8),
            Kind::Utf8(b) => {
                b.values_slice().len() + 4 * b.offsets_slice().len() + validity_bytes(b.len())
            }
            Kind::Binary(b) => {
                b.values_slice().len() + 4 * b.offsets_slice().len() + validity_bytes(b.len())
            }
            Kind::List(list) => {
                4 * list.offsets.len()
                    + validity_bytes(list.offsets.len().saturating_sub(1))
                    + list.elements.memory_bytes()
            }
        }
    }

    /// The array of everything appended so far; the builder starts empty again.
    pub fn finish(&mut self) -> ArrayRef {
        match &mut self.kind {
            Kind::Bool(b) => Arc::new(b.finish()),
            Kind::Int16(b) => Arc::new(b.finish()),
            Kind::Int32(b) => Arc::new(b.finish()),
            Kind::Int64(b) => Arc::new(b.finish()),
            Kind::Float32(b) => Arc::new(b.finish()),
            Kind::Float64(b) => Arc::new(b.finish()),
            Kind::Decimal { builder, .. } => Arc::new(builder.finish()),
            Kind::Utf8(b) => Arc::new(b.finish()),
            Kind::Binary(b) => Arc::new(b.finish()),
            Kind::Date32(b) => Arc::new(b.finish()),
            Kind::Timestamp(b) => Arc::new(b.finish()),
            Kind::List(list) => Arc::new(list.finish()),
        }
    }
}

impl Kind {
    fn append_null(&mut self) {
        self.append_nulls(1);
    }

    fn append_nulls(&mut self, n: usize) {
        match self {
            Kind::Bool(b) => b.append_nulls(n),
            Kind::Int16(b) => b.append_nulls(n),
            Kind::Int32(b) => b.append_nulls(n),
            Kind::Int64(b) => b.append_nulls(n),
            Kind::Float32(b) => b.append_nulls(n),
            Kind::Float64(b) => b.append_nulls(n),
            Kind::Decimal { builder, .. } => builder.append_nulls(n),
            Kind::Utf8(b) => b.append_nulls(n),
            Kind::Binary(b) => b.append_nulls(n),
            Kind::Date32(b) => b.append_nulls(n),
            Kind::Timestamp(b) => b.append_nulls(n),
            Kind::List(list) => {
                let last = list.offsets.last().copied().unwrap_or(0);
                list.offsets.extend(std::iter::repeat_n(last, n));
                list.nulls.append_n_nulls(n);
            }
        }
    }
}

/// Appends a value of a Utf8 column in its text form. `v` has passed [`accepts`].
fn append_text(b: &mut StringBuilder, v: &Value) {
    match v {
        Value::Text(s) | Value::Enum(s) | Value::Unknown(s) | Value::Json(s) => b.append_value(s),
        Value::Numeric(Numeric::Finite(s)) => b.append_value(s),
        Value::Numeric(Numeric::NaN) => b.append_value("NaN"),
        Value::Numeric(Numeric::PosInfinity) => b.append_value("Infinity"),
        Value::Numeric(Numeric::NegInfinity) => b.append_value("-Infinity"),
        Value::Uuid(bytes) => b.append_value(format_uuid(bytes).as_str()),
        Value::Time(micros) => b.append_value(calendar::format_time(*micros)),
        Value::TimeTz {
            micros,
            offset_seconds,
        } => b.append_value(calendar::format_timetz(*micros, *offset_seconds)),
        Value::Interval {
            months,
            days,
            micros,
        } => b.append_value(calendar::format_interval(*months, *days, *micros)),
        _ => b.append_null(),
    }
}

/// A UUID's canonical text, on the stack.
struct UuidText([u8; 36]);

impl UuidText {
    fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn format_uuid(bytes: &[u8; 16]) -> UuidText {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut pos = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            pos += 1; // keep the dash
        }
        out[pos] = HEX[usize::from(byte >> 4)];
        out[pos + 1] = HEX[usize::from(byte & 0x0f)];
        pos += 2;
    }
    UuidText(out)
}

impl ListColumn {
    /// The element count the dimensions promise, which must be the element count.
    fn check_shape(ty: &PgType, array: &ArrayValue) -> Result<(), ArrowValueError> {
        let expected = array
            .dims
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(u64::from(d.len)));
        let expected = if array.dims.is_empty() {
            Some(0)
        } else {
            expected
        };
        match expected {
            Some(n) if usize::try_from(n).ok() == Some(array.elements.len()) => Ok(()),
            _ => Err(ArrowValueError::ArrayShape {
                column: ty.name(),
                expected: expected.unwrap_or(u64::MAX),
                actual: array.elements.len(),
            }),
        }
    }

    /// The offset after appending `array`, if it fits `i32`.
    fn end_offset(&self, ty: &PgType, array: &ArrayValue) -> Result<i32, ArrowValueError> {
        self.elements
            .len()
            .checked_add(array.elements.len())
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| ArrowValueError::ListTooLong { column: ty.name() })
    }

    fn check(&self, ty: &PgType, array: &ArrayValue) -> Result<(), ArrowValueError> {
        Self::check_shape(ty, array)?;
        self.end_offset(ty, array)?;
        array
            .elements
            .iter()
            .try_for_each(|e| self.elements.check(e))
    }

    fn append(
        &mut self,
        ty: &PgType,
        array: &ArrayValue,
        specials: &mut Vec<String>,
    ) -> Result<(), ArrowValueError> {
        Self::check_shape(ty, array)?;
        let end = self.end_offset(ty, array)?;
        if array.dims.len() > 1 {
            let mut marker = String::from("dims=");
            for (i, d) in array.dims.iter().enumerate() {
                if i > 0 {
                    marker.push('x');
                }
                marker.push_str(&d.len.to_string());
            }
            specials.push(marker);
        }
        if array.dims.iter().any(|d| d.lower_bound != 1) {
            let mut marker = String::from("lower=");
            for (i, d) in array.dims.iter().enumerate() {
                if i > 0 {
                    marker.push(',');
                }
                marker.push_str(&d.lower_bound.to_string());
            }
            specials.push(marker);
        }
        for (i, element) in array.elements.iter().enumerate() {
            let before = specials.len();
            self.elements.append_checked(element, specials)?;
            if let Some(added) = specials.get_mut(before..) {
                for marker in added {
                    marker.insert_str(0, &format!("[{}]=", i + 1));
                }
            }
        }
        self.offsets.push(end);
        self.nulls.append_non_null();
        Ok(())
    }

    fn finish(&mut self) -> ListArray {
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        let values = self.elements.finish();
        let nulls = self.nulls.finish();
        // Offsets start at 0, never decrease and end at `values.len()`, and there is one
        // validity bit per row: the invariants `ListArray::new` asserts.
        ListArray::new(
            self.field.clone(),
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            values,
            nulls,
        )
    }
}

/// A date or timestamp in the range the lake type holds (years 1–9999): values outside it are
/// clamped to the nearest end, with `original=<value>` in `_special`; ±infinity become the ends,
/// marked `infinity` / `-infinity`.
fn clamp_to_lake<T: Copy + Ord>(
    value: Infinite<T>,
    range: std::ops::RangeInclusive<T>,
    format: impl Fn(Infinite<T>) -> String,
    specials: &mut Vec<String>,
) -> T {
    match value {
        Infinite::Finite(v) if range.contains(&v) => v,
        Infinite::Finite(v) => {
            specials.push(format!("{SPECIAL_ORIGINAL}{}", format(value)));
            v.clamp(*range.start(), *range.end())
        }
        Infinite::PosInfinity => {
            specials.push(SPECIAL_INFINITY.to_owned());
            *range.end()
        }
        Infinite::NegInfinity => {
            specials.push(SPECIAL_NEG_INFINITY.to_owned());
            *range.start()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ArrayDim;
    use deltalake::arrow::array::{
        Array, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
        Int16Array, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use deltalake::arrow::datatypes::Fields;
    use proptest::prelude::*;

    fn numeric(p: u16, s: i16) -> PgType {
        PgType::Numeric {
            precision_scale: Some((p, s)),
        }
    }

    fn fin(s: &str) -> Value {
        Value::Numeric(Numeric::Finite(s.to_owned()))
    }

    /// Appends all values (no specials expected unless returned) and finishes.
    fn build(ty: &PgType, values: &[Value]) -> (ArrayRef, Vec<String>) {
        let mut b = ColumnBuilder::new(ty);
        let mut specials = Vec::new();
        for v in values {
            b.append(v, &mut specials).unwrap();
        }
        assert_eq!(b.len(), values.len());
        let array = b.finish();
        assert_eq!(b.len(), 0, "finish resets");
        assert_eq!(array.data_type(), &lake_type(ty));
        (array, specials)
    }

    fn downcast<T: 'static>(a: &ArrayRef) -> &T {
        a.as_any().downcast_ref::<T>().unwrap()
    }

    #[test]
    fn lake_types_follow_the_table() {
        use DataType as D;
        let cases = [
            (PgType::Bool, D::Boolean),
            (PgType::Int2, D::Int16),
            (PgType::Int4, D::Int32),
            (PgType::Int8, D::Int64),
            (PgType::Oid, D::Int64),
            (PgType::Float4, D::Float32),
            (PgType::Float8, D::Float64),
            (numeric(10, 2), D::Decimal128(10, 2)),
            (numeric(38, 38), D::Decimal128(38, 38)),
            (numeric(1, 0), D::Decimal128(1, 0)),
            (numeric(39, 2), D::Utf8),
            (numeric(5, -3), D::Utf8),
            (numeric(2, 5), D::Utf8),
            (
                PgType::Numeric {
                    precision_scale: None,
                },
                D::Utf8,
            ),
            (PgType::Text, D::Utf8),
            (PgType::Enum { oid: 1 }, D::Utf8),
            (PgType::Unknown { oid: 600 }, D::Utf8),
            (PgType::Json, D::Utf8),
            (PgType::Jsonb, D::Utf8),
            (PgType::Uuid, D::Utf8),
            (PgType::Bytea, D::Binary),
            (PgType::Date, D::Date32),
            (PgType::Timestamp, D::Timestamp(TimeUnit::Microsecond, None)),
            (
                PgType::TimestampTz,
                D::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ),
            (PgType::Time, D::Utf8),
            (PgType::TimeTz, D::Utf8),
            (PgType::Interval, D::Utf8),
            (
                PgType::Array(Box::new(PgType::Int4)),
                D::List(Arc::new(Field::new("element", D::Int32, true))),
            ),
        ];
        for (ty, expected) in cases {
            assert_eq!(lake_type(&ty), expected, "{ty}");
            // Every builder produces its lake type, even when empty.
            assert_eq!(ColumnBuilder::new(&ty).finish().data_type(), &expected);
        }
    }

    #[test]
    fn scalars_round_trip() {
        let (a, s) = build(
            &PgType::Bool,
            &[Value::Bool(true), Value::Null, Value::Bool(false)],
        );
        let a = downcast::<BooleanArray>(&a);
        assert!(a.value(0) && a.is_null(1) && !a.value(2));
        assert!(s.is_empty());

        let (a, _) = build(&PgType::Int2, &[Value::Int2(i16::MIN), Value::Int2(7)]);
        assert_eq!(&downcast::<Int16Array>(&a).values()[..], &[i16::MIN, 7]);
        let (a, _) = build(&PgType::Int4, &[Value::Int4(i32::MAX)]);
        assert_eq!(downcast::<Int32Array>(&a).value(0), i32::MAX);
        let (a, _) = build(&PgType::Int8, &[Value::Int8(i64::MIN)]);
        assert_eq!(downcast::<Int64Array>(&a).value(0), i64::MIN);
        let (a, _) = build(&PgType::Oid, &[Value::Oid(u32::MAX)]);
        assert_eq!(downcast::<Int64Array>(&a).value(0), 4_294_967_295);

        let (a, s) = build(
            &PgType::Float4,
            &[Value::Float4(f32::NAN), Value::Float4(f32::NEG_INFINITY)],
        );
        let a = downcast::<Float32Array>(&a);
        assert!(a.value(0).is_nan() && a.value(1) == f32::NEG_INFINITY);
        assert!(s.is_empty(), "floats hold NaN and infinities as is");
        let (a, _) = build(&PgType::Float8, &[Value::Float8(f64::INFINITY)]);
        assert_eq!(downcast::<Float64Array>(&a).value(0), f64::INFINITY);

        let (a, _) = build(&PgType::Bytea, &[Value::Bytea(vec![0, 0xff]), Value::Null]);
        let a = downcast::<BinaryArray>(&a);
        assert_eq!(a.value(0), &[0, 0xff]);
        assert!(a.is_null(1));
    }

    #[test]
    fn text_like_types_become_utf8() {
        let cases: Vec<(PgType, Value, &str)> = vec![
            (PgType::Text, Value::Text("héllo".into()), "héllo"),
            (
                PgType::Enum { oid: 9 },
                Value::Enum("happy".into()),
                "happy",
            ),
            (
                PgType::Unknown { oid: 600 },
                Value::Unknown("(1,2)".into()),
                "(1,2)",
            ),
            (
                PgType::Json,
                Value::Json(r#"{"a": 1.50}"#.into()),
                r#"{"a": 1.50}"#,
            ),
            (
                PgType::Jsonb,
                Value::Json(r#"{"a": 1}"#.into()),
                r#"{"a": 1}"#,
            ),
            (
                PgType::Uuid,
                Value::Uuid([
                    0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd,
                    0x38, 0x0a, 0x11,
                ]),
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
            (
                PgType::Time,
                Value::Time(13 * 3_600_000_000 + 5),
                "13:00:00.000005",
            ),
            (
                PgType::TimeTz,
                Value::TimeTz {
                    micros: 12 * 3_600_000_000,
                    offset_seconds: 7200,
                },
                "12:00:00+02:00",
            ),
            (
                PgType::Interval,
                Value::Interval {
                    months: 14,
                    days: 3,
                    micros: 4 * 3_600_000_000,
                },
                "P1Y2M3DT4H",
            ),
            (
                PgType::Numeric {
                    precision_scale: None,
                },
                fin("-12.500"),
                "-12.500",
            ),
            (numeric(40, 2), Value::Numeric(Numeric::NaN), "NaN"),
            (
                PgType::Numeric {
                    precision_scale: None,
                },
                Value::Numeric(Numeric::PosInfinity),
                "Infinity",
            ),
            (
                PgType::Numeric {
                    precision_scale: None,
                },
                Value::Numeric(Numeric::NegInfinity),
                "-Infinity",
            ),
        ];
        for (ty, v, expected) in cases {
            let (a, s) = build(&ty, &[v, Value::Null]);
            let a = downcast::<StringArray>(&a);
            assert_eq!(a.value(0), expected, "{ty}");
            assert!(a.is_null(1));
            assert!(s.is_empty(), "{ty}: text holds every value exactly");
        }
    }

    #[test]
    fn decimals_are_exact() {
        let max = "9999999999999999999999999999.9999999999";
        let (a, s) = build(
            &numeric(38, 10),
            &[
                fin(max),
                fin(&format!("-{max}")),
                fin("0.0000000001"),
                fin("0"),
            ],
        );
        let a = downcast::<Decimal128Array>(&a);
        assert_eq!((a.precision(), a.scale()), (38, 10));
        assert_eq!(a.value(0), 10i128.pow(38) - 1);
        assert_eq!(a.value(1), -(10i128.pow(38) - 1));
        assert_eq!(a.value(2), 1);
        assert_eq!(a.value(3), 0);
        assert_eq!(a.value_as_string(0), max);
        assert!(s.is_empty());

        let (a, _) = build(
            &numeric(5, 3),
            &[
                fin("0.5"),
                fin("-12.500"),
                fin("12"),
                fin("+1.25"),
                fin(".5"),
            ],
        );
        assert_eq!(
            &downcast::<Decimal128Array>(&a).values()[..],
            &[500, -12_500, 12_000, 1_250, 500]
        );

        let (a, _) = build(&numeric(38, 0), &[fin(&"9".repeat(38))]);
        assert_eq!(downcast::<Decimal128Array>(&a).value(0), 10i128.pow(38) - 1);
    }

    #[test]
    fn decimals_that_do_not_fit_are_errors_not_rounded() {
        let ten_pow_28 = format!("1{}", "0".repeat(28));
        let forty_nines = "9".repeat(40);
        let cases = [
            (
                numeric(5, 3),
                "0.1234",
                "more fraction digits than the scale",
            ),
            (
                numeric(5, 3),
                "123.4",
                "more digits than the precision allows",
            ),
            (
                numeric(38, 10),
                ten_pow_28.as_str(),
                "more digits than the precision allows",
            ),
            (
                numeric(38, 0),
                forty_nines.as_str(),
                "more digits than the precision allows",
            ),
            (numeric(5, 3), "", "no digits"),
            (numeric(5, 3), "-", "no digits"),
            (numeric(5, 3), "1e3", "not plain decimal digits"),
            (numeric(5, 3), "1.2.3", "not plain decimal digits"),
            (numeric(5, 3), "--1", "not plain decimal digits"),
        ];
        for (ty, text, reason) in cases {
            let mut b = ColumnBuilder::new(&ty);
            let err = b.append(&fin(text), &mut Vec::new()).unwrap_err();
            assert_eq!(
                err,
                ArrowValueError::Decimal {
                    column: ty.name(),
                    reason
                },
                "{text:?}"
            );
            assert_eq!(b.len(), 0, "nothing appended on error");
            assert!(!err.to_string().contains(text) || text.is_empty());
        }
    }

    #[test]
    fn decimal_nan_and_infinities_are_null_with_specials() {
        let (a, s) = build(
            &numeric(10, 2),
            &[
                Value::Numeric(Numeric::NaN),
                fin("1.00"),
                Value::Numeric(Numeric::PosInfinity),
                Value::Numeric(Numeric::NegInfinity),
            ],
        );
        let a = downcast::<Decimal128Array>(&a);
        assert!(a.is_null(0) && a.is_valid(1) && a.is_null(2) && a.is_null(3));
        assert_eq!(s, ["NaN", "infinity", "-infinity"]);
    }

    #[test]
    fn infinite_dates_and_timestamps_use_sentinels_with_specials() {
        let (a, s) = build(
            &PgType::Date,
            &[
                Value::Date(Infinite::PosInfinity),
                Value::Date(Infinite::Finite(-1)),
                Value::Date(Infinite::NegInfinity),
            ],
        );
        assert_eq!(
            &downcast::<Date32Array>(&a).values()[..],
            &[DATE_MAX, -1, DATE_MIN]
        );
        assert_eq!(s, ["infinity", "-infinity"]);
        let (a, s) = build(
            &PgType::Date,
            &[Value::Date(Infinite::Finite(DATE_MIN - 1))],
        );
        assert_eq!(downcast::<Date32Array>(&a).value(0), DATE_MIN);
        assert_eq!(s, ["original=0001-12-31 BC"]);

        for ty in [PgType::Timestamp, PgType::TimestampTz] {
            let wrap = |t| match ty {
                PgType::Timestamp => Value::Timestamp(t),
                _ => Value::TimestampTz(t),
            };
            let (a, s) = build(
                &ty,
                &[
                    wrap(Infinite::NegInfinity),
                    wrap(Infinite::Finite(1_700_000_000_000_001)),
                    wrap(Infinite::PosInfinity),
                    Value::Null,
                ],
            );
            let a = downcast::<TimestampMicrosecondArray>(&a);
            assert_eq!(
                &a.values()[..3],
                &[TIMESTAMP_MIN, 1_700_000_000_000_001, TIMESTAMP_MAX]
            );
            assert!(a.is_null(3));
            assert_eq!(s, ["-infinity", "infinity"]);
        }
    }

    fn array(dims: &[(u32, i32)], elements: Vec<Value>) -> Value {
        Value::Array(ArrayValue {
            dims: dims
                .iter()
                .map(|&(len, lower_bound)| ArrayDim { len, lower_bound })
                .collect(),
            elements,
        })
    }

    #[test]
    fn arrays_become_lists() {
        let ty = PgType::Array(Box::new(PgType::Int4));
        let (a, s) = build(
            &ty,
            &[
                array(&[(3, 1)], vec![Value::Int4(1), Value::Null, Value::Int4(3)]),
                array(&[], vec![]),
                Value::Null,
                array(&[(2, 1), (2, 1)], (1..=4).map(Value::Int4).collect()),
            ],
        );
        let a = downcast::<ListArray>(&a);
        assert_eq!(a.value_offsets(), &[0, 3, 3, 3, 7]);
        assert!(a.is_valid(1) && a.is_null(2) && a.is_valid(3));
        let values = a.values();
        let values = downcast::<Int32Array>(values);
        assert_eq!(values.len(), 7);
        assert!(values.is_null(1));
        assert_eq!(values.value(6), 4);
        assert_eq!(s, ["dims=2x2"]);
    }

    #[test]
    fn array_specials_name_dims_lower_bounds_and_elements() {
        let ty = PgType::Array(Box::new(PgType::Date));
        let mut b = ColumnBuilder::new(&ty);
        let mut s = Vec::new();
        b.append(&array(&[(2, 0)], vec![Value::Null, Value::Null]), &mut s)
            .unwrap();
        assert_eq!(s, ["lower=0"]);
        s.clear();
        b.append(
            &array(
                &[(1, 0), (3, 1)],
                vec![
                    Value::Date(Infinite::Finite(0)),
                    Value::Date(Infinite::NegInfinity),
                    Value::Date(Infinite::PosInfinity),
                ],
            ),
            &mut s,
        )
        .unwrap();
        assert_eq!(
            s,
            ["dims=1x3", "lower=0,1", "[2]=-infinity", "[3]=infinity"]
        );

        let ty = PgType::Array(Box::new(numeric(4, 1)));
        let mut b = ColumnBuilder::new(&ty);
        s.clear();
        b.append(
            &array(&[(2, 1)], vec![fin("1.5"), Value::Numeric(Numeric::NaN)]),
            &mut s,
        )
        .unwrap();
        assert_eq!(s, ["[2]=NaN"]);
        let a = b.finish();
        let a = downcast::<ListArray>(&a);
        let values = a.values();
        let d = downcast::<Decimal128Array>(values);
        assert_eq!((d.precision(), d.scale()), (4, 1));
        assert_eq!(d.value(0), 15);
        assert!(d.is_null(1));
    }

    #[test]
    fn wrong_variants_are_errors_naming_types_only() {
        let mut b = ColumnBuilder::new(&PgType::Int4);
        let err = b
            .append(&Value::Text("secret".into()), &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            err,
            ArrowValueError::TypeMismatch {
                column: "int4".into(),
                value: "text"
            }
        );
        assert!(!err.to_string().contains("secret"));
        assert_eq!(b.len(), 0);

        // Jsonb takes Json values; Text does not take enum labels.
        assert!(ColumnBuilder::new(&PgType::Jsonb)
            .check(&Value::Json("1".into()))
            .is_ok());
        assert!(ColumnBuilder::new(&PgType::Text)
            .check(&Value::Enum("a".into()))
            .is_err());
        assert!(ColumnBuilder::new(&PgType::Timestamp)
            .check(&Value::TimestampTz(Infinite::Finite(0)))
            .is_err());
    }

    #[test]
    fn bad_arrays_append_nothing() {
        let ty = PgType::Array(Box::new(numeric(3, 0)));
        let mut b = ColumnBuilder::new(&ty);
        let mut s = Vec::new();
        // A bad element after a good one: the whole array is rejected up front.
        let err = b
            .append(&array(&[(2, 1)], vec![fin("1"), fin("1000")]), &mut s)
            .unwrap_err();
        assert!(matches!(err, ArrowValueError::Decimal { .. }));
        let err = b
            .append(&array(&[(2, 1)], vec![fin("1"), Value::Int4(1)]), &mut s)
            .unwrap_err();
        assert_eq!(
            err,
            ArrowValueError::TypeMismatch {
                column: "numeric(3,0)".into(),
                value: "int4"
            }
        );
        let err = b
            .append(&array(&[(2, 1), (2, 1)], vec![fin("1")]), &mut s)
            .unwrap_err();
        assert_eq!(
            err,
            ArrowValueError::ArrayShape {
                column: "numeric(3,0)[]".into(),
                expected: 4,
                actual: 1
            }
        );
        assert!(b.append(&array(&[], vec![fin("1")]), &mut s).is_err());
        assert_eq!(b.len(), 0);
        assert!(s.is_empty());
        let a = b.finish();
        assert_eq!(downcast::<ListArray>(&a).values().len(), 0);
    }

    #[test]
    fn memory_grows_with_data_and_resets() {
        let mut b = ColumnBuilder::new(&PgType::Text);
        assert!(b.memory_bytes() <= 4);
        b.append(&Value::Text("x".repeat(1000)), &mut Vec::new())
            .unwrap();
        assert!(b.memory_bytes() >= 1000);
        b.finish();
        assert!(b.memory_bytes() < 1000);

        let mut b = ColumnBuilder::new(&PgType::Array(Box::new(PgType::Int8)));
        b.append(
            &array(&[(100, 1)], (0..100).map(Value::Int8).collect()),
            &mut Vec::new(),
        )
        .unwrap();
        assert!(b.memory_bytes() >= 800);
    }

    #[test]
    fn same_lake_type_ignores_nullability_element_names_and_utc_spelling() {
        let list = |name: &str, nullable: bool| {
            DataType::List(Arc::new(Field::new(name, DataType::Int32, nullable)))
        };
        assert!(same_lake_type(&list("element", true), &list("item", false)));
        assert!(!same_lake_type(
            &list("element", true),
            &DataType::List(Arc::new(Field::new("element", DataType::Int64, true)))
        ));
        let ts = |tz: Option<&str>| DataType::Timestamp(TimeUnit::Microsecond, tz.map(Into::into));
        assert!(same_lake_type(&ts(Some("UTC")), &ts(Some("+00:00"))));
        assert!(!same_lake_type(&ts(Some("UTC")), &ts(None)));
        assert!(!same_lake_type(&ts(Some("UTC")), &ts(Some("+01:00"))));
        assert!(!same_lake_type(
            &ts(None),
            &DataType::Timestamp(TimeUnit::Nanosecond, None)
        ));
        assert!(same_lake_type(
            &DataType::Decimal128(10, 2),
            &DataType::Decimal128(10, 2)
        ));
        assert!(!same_lake_type(
            &DataType::Decimal128(10, 2),
            &DataType::Decimal128(10, 3)
        ));
        let st = |name: &str, nullable: bool| {
            DataType::Struct(Fields::from(vec![Field::new(
                name,
                list("a", true),
                nullable,
            )]))
        };
        assert!(same_lake_type(&st("x", true), &st("x", false)));
        assert!(!same_lake_type(&st("x", true), &st("y", true)));
    }

    proptest! {
        #[test]
        fn decimal_text_round_trips(v in -(10i128.pow(18) - 1)..10i128.pow(18), scale in 0i8..=18) {
            let (p, s) = (18u8, scale);
            let text = Decimal128Array::from(vec![v])
                .with_precision_and_scale(p, s)
                .unwrap()
                .value_as_string(0);
            prop_assert_eq!(parse_decimal(&text, p, s), Ok(v));
        }

        #[test]
        fn wide_decimal_text_round_trips(
            v in -(10i128.pow(38) - 1)..10i128.pow(38),
            scale in 0i8..=38,
        ) {
            let text = Decimal128Array::from(vec![v])
                .with_precision_and_scale(38, scale)
                .unwrap()
                .value_as_string(0);
            prop_assert_eq!(parse_decimal(&text, 38, scale), Ok(v));
            // One precision less does not fit when the value needs all 38 digits.
            let fits37 = v.unsigned_abs() < 10u128.pow(37);
            prop_assert_eq!(parse_decimal(&text, 37, scale).is_ok(), fits37);
        }

        #[test]
        fn decimal_parse_never_panics(text in "[-+0-9.]{0,45}", p in 1u8..=38, s in 0i8..=38) {
            let _ = parse_decimal(&text, p, s);
        }

        #[test]
        fn uuids_print_like_postgres(bytes in any::<[u8; 16]>()) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let expected = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]
            );
            let text = format_uuid(&bytes);
            prop_assert_eq!(text.as_str(), expected.as_str());
        }
    }

    /// Wire bytes for `ty` that are often well formed: the types with a direct path get
    /// values near their edges (infinities, the Date32/timestamp range, one-byte `"char"`,
    /// numerics of any shape), the rest arbitrary bytes.
    fn wire_value() -> impl Strategy<Value = (PgType, Vec<u8>)> {
        let numeric = (
            0i16..7,
            -8i16..8,
            prop_oneof![8 => Just(0x0000u16), 4 => Just(0x4000), 1 => Just(0xC000), 1 => Just(0xD000), 1 => Just(0x1234)],
            prop_oneof![0u16..12, Just(0x4001)],
            proptest::collection::vec(prop_oneof![10 => 0u16..10_000, 1 => Just(10_000u16)], 7),
            1u16..=38,
            prop_oneof![0i16..=12, -2i16..0],
        )
            .prop_map(|(n, weight, sign, dscale, digits, p, s)| {
                let mut raw = Vec::new();
                for word in [n as u16, weight as u16, sign, dscale] {
                    raw.extend(word.to_be_bytes());
                }
                for d in &digits[..n as usize] {
                    raw.extend(d.to_be_bytes());
                }
                let s = s.min(p as i16);
                (PgType::Numeric { precision_scale: Some((p, s)) }, raw)
            });
        let micros = prop_oneof![
            any::<i64>(),
            Just(i64::MAX),
            Just(i64::MIN),
            (TIMESTAMP_MIN - 946_684_800_000_000 - 2)..(TIMESTAMP_MIN - 946_684_800_000_000 + 2),
            (TIMESTAMP_MAX - 946_684_800_000_000 - 2)..(TIMESTAMP_MAX - 946_684_800_000_000 + 2),
            -1_000_000_000_000_000i64..1_000_000_000_000_000,
        ];
        let days = prop_oneof![
            any::<i32>(),
            Just(i32::MAX),
            Just(i32::MIN),
            (DATE_MIN - 10_957 - 2)..(DATE_MIN - 10_957 + 2),
            (DATE_MAX - 10_957 - 2)..(DATE_MAX - 10_957 + 2),
        ];
        let bytes = proptest::collection::vec(any::<u8>(), 0..20);
        let text = prop_oneof![
            bytes.clone(),
            "[a-zé{}\\[\\]\"0-9 ]{0,12}".prop_map(String::into_bytes),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        let fixed = |ty: PgType, n: usize| {
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), n),
                1 => proptest::collection::vec(any::<u8>(), 0..n + 2),
            ]
            .prop_map(move |raw| (ty.clone(), raw))
        };
        prop_oneof![
            numeric,
            micros
                .clone()
                .prop_map(|m| (PgType::Timestamp, m.to_be_bytes().to_vec())),
            micros.prop_map(|m| (PgType::TimestampTz, m.to_be_bytes().to_vec())),
            days.prop_map(|d| (PgType::Date, d.to_be_bytes().to_vec())),
            text.clone().prop_map(|t| (PgType::Text, t)),
            text.clone().prop_map(|t| (PgType::Enum { oid: 1 }, t)),
            text.clone().prop_map(|t| (PgType::Json, t)),
            (prop_oneof![Just(1u8), any::<u8>()], text).prop_map(|(v, t)| {
                let mut raw = vec![v];
                raw.extend(t);
                (PgType::Jsonb, raw)
            }),
            bytes.clone().prop_map(|b| (PgType::Bytea, b)),
            proptest::collection::vec(0u8..3, 0..3).prop_map(|b| (PgType::Bool, b)),
            fixed(PgType::Int2, 2),
            fixed(PgType::Int4, 4),
            fixed(PgType::Int8, 8),
            fixed(PgType::Oid, 4),
            fixed(PgType::Float4, 4),
            fixed(PgType::Float8, 8),
            fixed(PgType::Uuid, 16),
            fixed(PgType::Interval, 16),
            bytes.prop_map(|b| (
                PgType::Numeric {
                    precision_scale: None
                },
                b
            )),
        ]
    }

    /// A value appended by a direct path (`direct`) or, when it declines, the typed way
    /// (`parse`, then [`ColumnBuilder::append`]) gives the column the typed way alone gives:
    /// the same success, stand-ins and data, and no stand-in when the direct path took it.
    fn direct_matches_typed(
        ty: &PgType,
        raw: &[u8],
        direct_path: fn(&mut ColumnBuilder, &[u8]) -> bool,
        parse: fn(&PgType, &[u8]) -> Result<Value, crate::types::ValueError>,
    ) -> Result<(), TestCaseError> {
        let typed = |b: &mut ColumnBuilder, specials: &mut Vec<String>| match parse(ty, raw) {
            Ok(v) => b.append(&v, specials).is_ok(),
            Err(_) => false,
        };
        let (mut direct, mut reference) = (ColumnBuilder::new(ty), ColumnBuilder::new(ty));
        let (mut direct_specials, mut reference_specials) = (Vec::new(), Vec::new());
        let took = direct_path(&mut direct, raw);
        let ok = took || typed(&mut direct, &mut direct_specials);
        prop_assert_eq!(
            ok,
            typed(&mut reference, &mut reference_specials),
            "{} {:?}",
            ty,
            raw
        );
        if took {
            prop_assert!(direct_specials.is_empty());
        }
        prop_assert_eq!(&direct_specials, &reference_specials);
        prop_assert_eq!(
            direct.finish().to_data(),
            reference.finish().to_data(),
            "{} {:?}",
            ty,
            raw
        );
        Ok(())
    }

    /// Text wire forms (`typoutput`) for `ty`, often well formed: values near the lake's
    /// edges, `NaN` and infinities, other accepted spellings, and arbitrary bytes.
    fn text_wire_value() -> impl Strategy<Value = (PgType, Vec<u8>)> {
        let junk = proptest::collection::vec(any::<u8>(), 0..12);
        let int = prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<i16>().prop_map(|v| format!("+{v}")),
            (i64::from(i32::MIN) - 2..i64::from(u32::MAX) + 2).prop_map(|v| v.to_string()),
            "[-+]?[0-9]{0,21}",
        ]
        .prop_map(String::into_bytes);
        let float = prop_oneof![
            any::<f64>().prop_map(|v| v.to_string()),
            any::<f32>().prop_map(|v| format!("{v:e}")),
            Just("NaN".to_string()),
            Just("Infinity".to_string()),
            Just("-Infinity".to_string()),
            Just("-inf".to_string()),
            Just("1e400".to_string()),
            "[-+0-9.eE]{0,8}",
        ]
        .prop_map(String::into_bytes);
        let numeric = (
            prop_oneof![
                6 => "-?[0-9]{1,20}(\\.[0-9]{1,20})?",
                1 => Just("NaN".to_string()),
                1 => Just("Infinity".to_string()),
                1 => Just("-Infinity".to_string()),
                2 => "[-+0-9.]{0,8}",
            ],
            1u16..=38,
            0i16..=12,
        )
            .prop_map(|(text, p, s)| {
                let ty = PgType::Numeric {
                    precision_scale: Some((p, s.min(p as i16))),
                };
                (ty, text.into_bytes())
            });
        let micros = prop_oneof![
            -1_000_000_000_000_000i64..1_000_000_000_000_000,
            (TIMESTAMP_MIN - 2)..(TIMESTAMP_MIN + 2),
            (TIMESTAMP_MAX - 2)..(TIMESTAMP_MAX + 2),
            -400_000_000_000_000_000i64..-100_000_000_000_000_000,
        ];
        let timestamp = |tz: bool| {
            prop_oneof![
                8 => micros.clone().prop_map(move |m| calendar::format_timestamp(Infinite::Finite(m), tz).into_bytes()),
                1 => Just(b"infinity".to_vec()),
                1 => Just(b"-infinity".to_vec()),
                1 => "[0-9: .+-]{0,24}".prop_map(String::into_bytes),
            ]
        };
        let date = prop_oneof![
            8 => prop_oneof![
                -3_000_000i32..3_000_000,
                (DATE_MIN - 2)..(DATE_MIN + 2),
                (DATE_MAX - 2)..(DATE_MAX + 2),
            ]
            .prop_map(|d| calendar::format_date(Infinite::Finite(d)).into_bytes()),
            1 => Just(b"infinity".to_vec()),
            1 => "[0-9 -BC]{0,14}".prop_map(String::into_bytes),
        ];
        let text = prop_oneof![
            junk.clone(),
            "[a-zé{}\\[\\]\"0-9 ]{0,12}".prop_map(String::into_bytes),
        ];
        let bool_text = prop_oneof![
            Just(b"t".to_vec()),
            Just(b"f".to_vec()),
            Just(b"true".to_vec()),
            Just(b"no".to_vec()),
            junk.clone(),
        ];
        prop_oneof![
            bool_text.prop_map(|b| (PgType::Bool, b)),
            int.clone().prop_map(|b| (PgType::Int2, b)),
            int.clone().prop_map(|b| (PgType::Int4, b)),
            int.clone().prop_map(|b| (PgType::Int8, b)),
            int.prop_map(|b| (PgType::Oid, b)),
            float.clone().prop_map(|b| (PgType::Float4, b)),
            float.prop_map(|b| (PgType::Float8, b)),
            numeric.clone(),
            numeric.prop_map(|(_, b)| (
                PgType::Numeric {
                    precision_scale: None
                },
                b
            )),
            text.clone().prop_map(|b| (PgType::Text, b)),
            text.clone().prop_map(|b| (PgType::Enum { oid: 1 }, b)),
            text.clone().prop_map(|b| (PgType::Json, b)),
            text.prop_map(|b| (PgType::Jsonb, b)),
            date.prop_map(|b| (PgType::Date, b)),
            timestamp(false).prop_map(|b| (PgType::Timestamp, b)),
            timestamp(true).prop_map(|b| (PgType::TimestampTz, b)),
            junk.prop_map(|b| (PgType::Uuid, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// The direct path from text gives the column the typed way gives, and leaves to it
        /// every value it does not take exactly (stand-ins and errors included).
        #[test]
        fn text_direct_appends_what_the_typed_way_appends(
            values in proptest::collection::vec(text_wire_value(), 1..4),
        ) {
            for (ty, raw) in values {
                direct_matches_typed(&ty, &raw, ColumnBuilder::append_text_direct, super::super::text::parse)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// The direct path from wire bytes gives the column the typed way gives, and leaves to
        /// it every value it does not take exactly (stand-ins and errors included).
        #[test]
        fn binary_direct_appends_what_the_typed_way_appends(
            values in proptest::collection::vec(wire_value(), 1..4),
        ) {
            for (ty, raw) in values {
                direct_matches_typed(&ty, &raw, ColumnBuilder::append_binary_direct, super::super::binary::parse)?;
            }
        }
    }
}
