//! JSON rendering of [`Value`]s for `slotlake tail`.
//!
//! Data flow: `tail` decodes changes like the replication pipeline does, then prints each row as
//! one JSON line with [`to_json`] per column instead of writing to the lake. The output is for
//! people and scripts reading a stream, so it favours exactness over convenience: anything JSON
//! numbers cannot carry losslessly is a string.
//!
//! | Value                         | JSON                                                        |
//! |-------------------------------|-------------------------------------------------------------|
//! | `Null`                        | `null`                                                      |
//! | `Bool`                        | `true` / `false`                                            |
//! | `Int2/4/8`, `Oid`             | number                                                      |
//! | `Float4/8`, finite            | number (float4 via its shortest decimal, so 1.1f32 is `1.1`) |
//! | `Float4/8`, NaN / ±infinity   | `"NaN"`, `"Infinity"`, `"-Infinity"`                        |
//! | `Numeric`                     | string: the exact digits, or `"NaN"`, `"Infinity"`, `"-Infinity"` |
//! | `Text`, `Enum`, `Unknown`     | string                                                      |
//! | `Json`                        | string holding the JSON text (not re-parsed, so numbers keep their precision) |
//! | `Bytea`                       | string `\x` + lowercase hex                                 |
//! | `Uuid`                        | string, lowercase 8-4-4-4-12                                |
//! | `Date`                        | string `YYYY-MM-DD[ BC]`, `"infinity"`, `"-infinity"`        |
//! | `Timestamp` / `TimestampTz`   | string `YYYY-MM-DDTHH:MM:SS[.ffffff][Z][ BC]` (`Z` for tz)  |
//! | `Time` / `TimeTz`             | string `HH:MM:SS[.ffffff]` / with `±HH:MM[:SS]`             |
//! | `Interval`                    | string, Postgres' ISO 8601 form (`P1Y2M3DT4H5M6.5S`)         |
//! | `Array`                       | nested arrays following `dims`, row-major; `[]` when empty  |
//!
//! Arrays lose their lower bounds (a `[0:1]={1,2}` array prints as `[1,2]`). An array whose
//! dims do not multiply out to its element count (which no parser produces) prints flat.

use std::fmt::Write as _;

use serde_json::{Number, Value as Json};

use super::calendar;
use super::{ArrayValue, Numeric, Value};

/// The JSON form of one column value, as documented on the module.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int2(i) => Json::from(*i),
        Value::Int4(i) => Json::from(*i),
        Value::Int8(i) => Json::from(*i),
        Value::Oid(i) => Json::from(*i),
        Value::Float4(f) => {
            if f.is_finite() {
                // Display prints the shortest decimal that round-trips as f32.
                float(f.to_string().parse::<f64>().unwrap_or(f64::from(*f)))
            } else {
                float(f64::from(*f))
            }
        }
        Value::Float8(f) => float(*f),
        Value::Numeric(n) => Json::String(match n {
            Numeric::Finite(digits) => digits.clone(),
            Numeric::NaN => "NaN".to_owned(),
            Numeric::PosInfinity => "Infinity".to_owned(),
            Numeric::NegInfinity => "-Infinity".to_owned(),
        }),
        Value::Text(s) | Value::Enum(s) | Value::Unknown(s) | Value::Json(s) => {
            Json::String(s.clone())
        }
        Value::Bytea(bytes) => {
            let mut out = String::with_capacity(2 + bytes.len() * 2);
            out.push_str("\\x");
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
            Json::String(out)
        }
        Value::Uuid(bytes) => {
            let mut out = String::with_capacity(36);
            for (i, b) in bytes.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    out.push('-');
                }
                let _ = write!(out, "{b:02x}");
            }
            Json::String(out)
        }
        Value::Date(d) => Json::String(calendar::format_date(*d)),
        Value::Timestamp(ts) => Json::String(calendar::format_timestamp(*ts, false)),
        Value::TimestampTz(ts) => Json::String(calendar::format_timestamp(*ts, true)),
        Value::Time(micros) => Json::String(calendar::format_time(*micros)),
        Value::TimeTz {
            micros,
            offset_seconds,
        } => Json::String(calendar::format_timetz(*micros, *offset_seconds)),
        Value::Interval {
            months,
            days,
            micros,
        } => Json::String(calendar::format_interval(*months, *days, *micros)),
        Value::Array(array) => array_to_json(array),
    }
}

/// A finite float as a number; NaN and infinities as the strings Postgres prints for them.
fn float(f: f64) -> Json {
    match Number::from_f64(f) {
        Some(n) => Json::Number(n),
        None if f.is_nan() => Json::String("NaN".to_owned()),
        None if f > 0.0 => Json::String("Infinity".to_owned()),
        None => Json::String("-Infinity".to_owned()),
    }
}

fn array_to_json(array: &ArrayValue) -> Json {
    let lens: Vec<usize> = array.dims.iter().map(|d| d.len as usize).collect();
    let total = lens
        .iter()
        .try_fold(1usize, |acc, &len| acc.checked_mul(len));
    if array.dims.is_empty() || total != Some(array.elements.len()) {
        return Json::Array(array.elements.iter().map(to_json).collect());
    }
    nest(&lens, &array.elements)
}

/// `elements` (row-major, exactly the product of `lens` long) as nested arrays.
fn nest(lens: &[usize], elements: &[Value]) -> Json {
    match lens {
        [] | [_] => Json::Array(elements.iter().map(to_json).collect()),
        [_, inner @ ..] => {
            let stride: usize = inner.iter().product();
            if stride == 0 {
                return Json::Array(Vec::new());
            }
            Json::Array(
                elements
                    .chunks(stride)
                    .map(|chunk| nest(inner, chunk))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ArrayDim, Infinite};
    use serde_json::json;

    fn array(dims: &[u32], elements: Vec<Value>) -> Value {
        Value::Array(ArrayValue {
            dims: dims
                .iter()
                .map(|&len| ArrayDim {
                    len,
                    lower_bound: 1,
                })
                .collect(),
            elements,
        })
    }

    #[test]
    fn scalars() {
        assert_eq!(to_json(&Value::Null), Json::Null);
        assert_eq!(to_json(&Value::Bool(true)), json!(true));
        assert_eq!(to_json(&Value::Int2(-3)), json!(-3));
        assert_eq!(to_json(&Value::Int4(i32::MIN)), json!(i32::MIN));
        assert_eq!(to_json(&Value::Int8(i64::MAX)), json!(i64::MAX));
        assert_eq!(to_json(&Value::Oid(u32::MAX)), json!(4_294_967_295u64));
        assert_eq!(to_json(&Value::Text("a\"b".into())), json!("a\"b"));
        assert_eq!(to_json(&Value::Enum("happy".into())), json!("happy"));
        assert_eq!(to_json(&Value::Unknown("(1,2)".into())), json!("(1,2)"));
    }

    #[test]
    fn floats_are_numbers_unless_special() {
        assert_eq!(to_json(&Value::Float4(1.1)), json!(1.1));
        assert_eq!(to_json(&Value::Float4(1e-7)).to_string(), "1e-7");
        assert_eq!(to_json(&Value::Float8(0.1)), json!(0.1));
        assert_eq!(to_json(&Value::Float8(-0.0)).to_string(), "-0.0");
        assert_eq!(to_json(&Value::Float4(f32::NAN)), json!("NaN"));
        assert_eq!(to_json(&Value::Float8(f64::INFINITY)), json!("Infinity"));
        assert_eq!(
            to_json(&Value::Float4(f32::NEG_INFINITY)),
            json!("-Infinity")
        );
    }

    #[test]
    fn exact_types_are_strings() {
        assert_eq!(
            to_json(&Value::Numeric(Numeric::Finite("-0.000100".into()))),
            json!("-0.000100")
        );
        assert_eq!(to_json(&Value::Numeric(Numeric::NaN)), json!("NaN"));
        assert_eq!(
            to_json(&Value::Numeric(Numeric::NegInfinity)),
            json!("-Infinity")
        );
        let text = r#"{"a": 12345678901234567890.123}"#;
        assert_eq!(to_json(&Value::Json(text.into())), json!(text));
        assert_eq!(
            to_json(&Value::Bytea(vec![0x0a, 0xff, 0])),
            json!("\\x0aff00")
        );
        assert_eq!(to_json(&Value::Bytea(vec![])), json!("\\x"));
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(
            to_json(&Value::Uuid(uuid)),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
    }

    #[test]
    fn date_time_values_use_calendar_forms() {
        assert_eq!(
            to_json(&Value::Date(Infinite::Finite(10957))),
            json!("2000-01-01")
        );
        assert_eq!(
            to_json(&Value::Date(Infinite::NegInfinity)),
            json!("-infinity")
        );
        assert_eq!(
            to_json(&Value::Timestamp(Infinite::Finite(1_500_000))),
            json!("1970-01-01T00:00:01.5")
        );
        assert_eq!(
            to_json(&Value::TimestampTz(Infinite::Finite(0))),
            json!("1970-01-01T00:00:00Z")
        );
        assert_eq!(
            to_json(&Value::TimestampTz(Infinite::PosInfinity)),
            json!("infinity")
        );
        assert_eq!(to_json(&Value::Time(3_600_000_000)), json!("01:00:00"));
        assert_eq!(
            to_json(&Value::TimeTz {
                micros: 0,
                offset_seconds: -3600
            }),
            json!("00:00:00-01:00")
        );
        assert_eq!(
            to_json(&Value::Interval {
                months: 14,
                days: 3,
                micros: 4_000_000
            }),
            json!("P1Y2M3DT4S")
        );
    }

    #[test]
    fn arrays_nest_by_dims() {
        assert_eq!(to_json(&array(&[], vec![])), json!([]));
        assert_eq!(
            to_json(&array(
                &[3],
                vec![Value::Int4(1), Value::Null, Value::Int4(3)]
            )),
            json!([1, null, 3])
        );
        let six = (1..=6).map(Value::Int4).collect();
        assert_eq!(to_json(&array(&[2, 3], six)), json!([[1, 2, 3], [4, 5, 6]]));
        let six = (1..=6).map(Value::Int4).collect();
        assert_eq!(
            to_json(&array(&[3, 1, 2], six)),
            json!([[[1, 2]], [[3, 4]], [[5, 6]]])
        );
        // Inconsistent dims (not produced by the parsers) print flat rather than panic.
        let three = (1..=3).map(Value::Int4).collect();
        assert_eq!(to_json(&array(&[2, 2], three)), json!([1, 2, 3]));
    }
}
