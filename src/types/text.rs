//! Parsing Postgres' text output form of a datum into a [`Value`].
//!
//! Data flow: pgoutput sends each column of a tuple as the bytes of the type's output function
//! (`typoutput`) unless the `binary` option is on. The decoder hands those bytes and the column's
//! [`PgType`] to [`parse`], which returns the same [`Value`] that [`super::binary::parse`] returns
//! for the binary form of the same datum.
//!
//! The text depends on session settings, which slotlake pins on every connection:
//! `DateStyle=ISO, MDY`, `IntervalStyle=iso_8601`, `TimeZone=UTC`, `extra_float_digits=3`,
//! `bytea_output=hex`, `client_encoding=UTF8`. The parsers accept exactly those output forms,
//! plus a few alternative spellings Postgres itself accepts as input where that costs nothing
//! (escape-format bytea, hyphen-free UUIDs, time zone offsets other than `+00`).
//!
//! This runs once per column value, so it works on the bytes directly: no intermediate
//! `String`s, and array elements are only copied when they contain backslash escapes. Errors
//! say why a value was rejected but never include the value (it is row data).

use super::calendar::{
    self, MICROS_PER_DAY, MICROS_PER_HOUR, MICROS_PER_MINUTE, MICROS_PER_SECOND, MIN_DATE_DAYS,
    MIN_TIMESTAMP_MICROS,
};
use super::{ArrayDim, ArrayValue, Infinite, Numeric, PgType, Value, ValueError};

/// Parses the text form of one non-null datum of type `ty`.
pub fn parse(ty: &PgType, raw: &[u8]) -> Result<Value, ValueError> {
    let value = match ty {
        PgType::Bool => parse_bool(raw).map(Value::Bool),
        PgType::Int2 => {
            parse_int(raw, i16::MIN.into(), i16::MAX.into()).map(|v| Value::Int2(v as i16))
        }
        PgType::Int4 => {
            parse_int(raw, i32::MIN.into(), i32::MAX.into()).map(|v| Value::Int4(v as i32))
        }
        PgType::Int8 => parse_int(raw, i64::MIN, i64::MAX).map(Value::Int8),
        // oidin accepts negative input and wraps it, like strtoul.
        PgType::Oid => {
            parse_int(raw, i32::MIN.into(), u32::MAX.into()).map(|v| Value::Oid(v as u32))
        }
        PgType::Float4 => parse_float::<f32>(raw).map(Value::Float4),
        PgType::Float8 => parse_float::<f64>(raw).map(Value::Float8),
        PgType::Numeric { .. } => parse_numeric(raw).map(Value::Numeric),
        PgType::Text => utf8(raw).map(Value::Text),
        PgType::Enum { .. } => utf8(raw).map(Value::Enum),
        PgType::Unknown { .. } => utf8(raw).map(Value::Unknown),
        PgType::Json | PgType::Jsonb => utf8(raw).map(Value::Json),
        PgType::Bytea => parse_bytea(raw).map(Value::Bytea),
        PgType::Uuid => parse_uuid(raw).map(Value::Uuid),
        PgType::Date => parse_date(raw).map(Value::Date),
        PgType::Timestamp => parse_timestamp(raw, false).map(Value::Timestamp),
        PgType::TimestampTz => parse_timestamp(raw, true).map(Value::TimestampTz),
        PgType::Time => parse_time(raw).map(Value::Time),
        PgType::TimeTz => parse_timetz(raw).map(|(micros, offset_seconds)| Value::TimeTz {
            micros,
            offset_seconds,
        }),
        PgType::Interval => parse_interval(raw).map(|(months, days, micros)| Value::Interval {
            months,
            days,
            micros,
        }),
        PgType::Array(elem) => return parse_array(ty, elem, raw),
    };
    value.map_err(|fail| fail.into_error(ty))
}

/// Scalars parsed without a [`Value`], for [`super::arrow::ColumnBuilder::append_text_direct`]:
/// `None` wherever [`parse`] fails or gives a value the direct path leaves to the typed one.
pub(crate) mod direct {
    use super::{Float, Infinite};

    pub(crate) fn bool(raw: &[u8]) -> Option<bool> {
        super::parse_bool(raw).ok()
    }

    pub(crate) fn int(raw: &[u8], min: i64, max: i64) -> Option<i64> {
        super::parse_int(raw, min, max).ok()
    }

    pub(crate) fn float<F: Float>(raw: &[u8]) -> Option<F> {
        super::parse_float(raw).ok()
    }

    /// A finite numeric's text (`-?digits(.digits)?`), as [`super::parse_numeric`] accepts it.
    pub(crate) fn finite_numeric(raw: &[u8]) -> Option<&str> {
        super::finite_numeric_shape(raw).ok()?;
        std::str::from_utf8(raw).ok()
    }

    pub(crate) fn date(raw: &[u8]) -> Option<i32> {
        match super::parse_date(raw).ok()? {
            Infinite::Finite(d) => Some(d),
            _ => None,
        }
    }

    pub(crate) fn timestamp(raw: &[u8], with_tz: bool) -> Option<i64> {
        match super::parse_timestamp(raw, with_tz).ok()? {
            Infinite::Finite(t) => Some(t),
            _ => None,
        }
    }
}

/// Why a scalar was rejected, before the type name is attached.
#[derive(Debug, PartialEq)]
enum Fail {
    Invalid(&'static str),
    OutOfRange(&'static str),
}

impl Fail {
    fn into_error(self, ty: &PgType) -> ValueError {
        match self {
            Fail::Invalid(reason) => ValueError::Invalid {
                form: "text",
                type_name: ty.name(),
                reason: reason.to_owned(),
            },
            Fail::OutOfRange(reason) => ValueError::OutOfRange {
                type_name: ty.name(),
                reason: reason.to_owned(),
            },
        }
    }
}

type Parsed<T> = Result<T, Fail>;

fn parse_bool(raw: &[u8]) -> Parsed<bool> {
    match raw {
        b"t" => Ok(true),
        b"f" => Ok(false),
        _ => {
            const TRUE: [&[u8]; 4] = [b"true", b"yes", b"on", b"1"];
            const FALSE: [&[u8]; 4] = [b"false", b"no", b"off", b"0"];
            if TRUE.iter().any(|w| raw.eq_ignore_ascii_case(w)) {
                Ok(true)
            } else if FALSE.iter().any(|w| raw.eq_ignore_ascii_case(w)) {
                Ok(false)
            } else {
                Err(Fail::Invalid("expected t or f"))
            }
        }
    }
}

/// An optionally signed decimal integer within `min..=max`.
fn parse_int(raw: &[u8], min: i64, max: i64) -> Parsed<i64> {
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, raw),
    };
    if digits.is_empty() {
        return Err(Fail::Invalid("no digits"));
    }
    let mut acc: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return Err(Fail::Invalid("not a decimal integer"));
        }
        let d = i64::from(c - b'0');
        // Accumulate toward the sign so i64::MIN parses.
        acc = acc
            .checked_mul(10)
            .and_then(|a| {
                if negative {
                    a.checked_sub(d)
                } else {
                    a.checked_add(d)
                }
            })
            .ok_or(Fail::OutOfRange("integer overflow"))?;
    }
    if acc < min || acc > max {
        return Err(Fail::OutOfRange("integer out of range for type"));
    }
    Ok(acc)
}

pub(crate) trait Float: std::str::FromStr + Copy {
    const NAN: Self;
    const INFINITY: Self;
    const NEG_INFINITY: Self;
    fn is_infinite(self) -> bool;
}

impl Float for f32 {
    const NAN: Self = f32::NAN;
    const INFINITY: Self = f32::INFINITY;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn is_infinite(self) -> bool {
        f32::is_infinite(self)
    }
}

impl Float for f64 {
    const NAN: Self = f64::NAN;
    const INFINITY: Self = f64::INFINITY;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn is_infinite(self) -> bool {
        f64::is_infinite(self)
    }
}

/// Postgres prints the shortest decimal that round-trips (`1e-07`, `1.5e+20`), `NaN`,
/// `Infinity` and `-Infinity`; Rust's float parsing is correctly rounded, so it gives the exact
/// bits back. Finite input that overflows is out of range, as in Postgres.
fn parse_float<F: Float>(raw: &[u8]) -> Parsed<F> {
    let text = std::str::from_utf8(raw).map_err(|_| Fail::Invalid("not a number"))?;
    let unsigned = text.trim_start_matches(['+', '-']);
    if unsigned.eq_ignore_ascii_case("nan") && unsigned.len() == text.len() {
        return Ok(F::NAN);
    }
    if unsigned.eq_ignore_ascii_case("infinity") || unsigned.eq_ignore_ascii_case("inf") {
        return match text.len() - unsigned.len() {
            0 => Ok(F::INFINITY),
            1 if text.starts_with('+') => Ok(F::INFINITY),
            1 => Ok(F::NEG_INFINITY),
            _ => Err(Fail::Invalid("not a number")),
        };
    }
    let value: F = text.parse().map_err(|_| Fail::Invalid("not a number"))?;
    if value.is_infinite() {
        return Err(Fail::OutOfRange("value overflows the type"));
    }
    Ok(value)
}

/// `NaN`, `Infinity`, `-Infinity`, or `-?digits(.digits)?` kept verbatim (it is already
/// `numeric_out`'s canonical text).
fn parse_numeric(raw: &[u8]) -> Parsed<Numeric> {
    match raw {
        b"NaN" => return Ok(Numeric::NaN),
        b"Infinity" => return Ok(Numeric::PosInfinity),
        b"-Infinity" => return Ok(Numeric::NegInfinity),
        _ => {}
    }
    finite_numeric_shape(raw)?;
    // Only ASCII digits, '-' and '.' remain: this cannot fail.
    let text = std::str::from_utf8(raw).map_err(|_| Fail::Invalid("not UTF-8"))?;
    Ok(Numeric::Finite(text.to_owned()))
}

/// That `raw` is a finite numeric's text: `-?digits(.digits)?`.
fn finite_numeric_shape(raw: &[u8]) -> Parsed<()> {
    let unsigned = raw.strip_prefix(b"-").unwrap_or(raw);
    let (int, frac) = match unsigned.iter().position(|&c| c == b'.') {
        Some(dot) => (
            unsigned.get(..dot).unwrap_or_default(),
            unsigned.get(dot + 1..),
        ),
        None => (unsigned, None),
    };
    let all_digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(Fail::Invalid("expected -digits[.digits], NaN or ±Infinity"));
    }
    Ok(())
}

fn utf8(raw: &[u8]) -> Parsed<String> {
    match std::str::from_utf8(raw) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(Fail::Invalid("invalid UTF-8")),
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `\x` + hex digit pairs (whitespace between pairs allowed, as `byteain` does), or the
/// escape format: literal bytes, `\\` and `\ooo` octal.
fn parse_bytea(raw: &[u8]) -> Parsed<Vec<u8>> {
    if let Some(hex) = raw.strip_prefix(b"\\x") {
        let mut out = Vec::with_capacity(hex.len() / 2);
        let mut rest = hex;
        loop {
            match rest {
                [] => return Ok(out),
                [c, tail @ ..] if is_array_space(*c) => rest = tail,
                [hi, lo, tail @ ..] => {
                    match (hex_value(*hi), hex_value(*lo)) {
                        (Some(h), Some(l)) => out.push(h << 4 | l),
                        _ => return Err(Fail::Invalid("invalid hexadecimal digit")),
                    }
                    rest = tail;
                }
                [_] => return Err(Fail::Invalid("odd number of hexadecimal digits")),
            }
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    loop {
        match rest {
            [] => return Ok(out),
            [b'\\', b'\\', tail @ ..] => {
                out.push(b'\\');
                rest = tail;
            }
            [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', tail @ ..] => {
                out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
                rest = tail;
            }
            [b'\\', ..] => return Err(Fail::Invalid("invalid escape sequence")),
            [c, tail @ ..] => {
                out.push(*c);
                rest = tail;
            }
        }
    }
}

/// 32 hex digits, optionally in braces, with an optional hyphen after any group of four
/// (which covers the canonical 8-4-4-4-12 form), as `uuid_in` accepts.
fn parse_uuid(raw: &[u8]) -> Parsed<[u8; 16]> {
    let body = match raw {
        [b'{', inner @ .., b'}'] => inner,
        _ => raw,
    };
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    let mut after_hyphen = false;
    for &c in body {
        if c == b'-' {
            if nibbles == 0 || !nibbles.is_multiple_of(4) || after_hyphen || nibbles == 32 {
                return Err(Fail::Invalid("misplaced hyphen"));
            }
            after_hyphen = true;
            continue;
        }
        let v = hex_value(c).ok_or(Fail::Invalid("invalid hexadecimal digit"))?;
        let byte = out
            .get_mut(nibbles / 2)
            .ok_or(Fail::Invalid("more than 32 hexadecimal digits"))?;
        *byte |= if nibbles.is_multiple_of(2) { v << 4 } else { v };
        nibbles += 1;
        after_hyphen = false;
    }
    if nibbles != 32 {
        return Err(Fail::Invalid("expected 32 hexadecimal digits"));
    }
    Ok(out)
}

/// A read position in a date/time literal.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(raw: &'a [u8]) -> Self {
        Cursor { rest: raw }
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        match self.rest {
            [first, tail @ ..] if *first == c => {
                self.rest = tail;
                true
            }
            _ => false,
        }
    }

    fn eat_str(&mut self, s: &[u8]) -> bool {
        match self.rest.strip_prefix(s) {
            Some(tail) => {
                self.rest = tail;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, c: u8, why: &'static str) -> Parsed<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(Fail::Invalid(why))
        }
    }

    /// An unsigned decimal of `min..=max` digits.
    fn number(&mut self, min: usize, max: usize, what: &'static str) -> Parsed<i64> {
        let len = self.rest.iter().take_while(|c| c.is_ascii_digit()).count();
        if len < min || len > max {
            return Err(Fail::Invalid(what));
        }
        let (digits, tail) = self.rest.split_at(len);
        self.rest = tail;
        // max <= 18 digits, so this cannot overflow.
        Ok(digits
            .iter()
            .fold(0i64, |acc, &c| acc * 10 + i64::from(c - b'0')))
    }

    /// `.digits` if present, as µs (rounded at the 7th digit); 0 when absent.
    fn fraction(&mut self) -> Parsed<i64> {
        if !self.eat(b'.') {
            return Ok(0);
        }
        let len = self.rest.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return Err(Fail::Invalid("missing digits after decimal point"));
        }
        let (digits, tail) = self.rest.split_at(len);
        self.rest = tail;
        let mut micros = 0i64;
        for i in 0..6 {
            let d = digits.get(i).map_or(0, |c| i64::from(c - b'0'));
            micros = micros * 10 + d;
        }
        if digits.get(6).is_some_and(|&c| c >= b'5') {
            micros += 1;
        }
        Ok(micros)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// `±infinity` spellings shared by date and timestamp input.
fn infinity(raw: &[u8]) -> Option<Infinite<()>> {
    if raw.eq_ignore_ascii_case(b"infinity") || raw.eq_ignore_ascii_case(b"+infinity") {
        Some(Infinite::PosInfinity)
    } else if raw.eq_ignore_ascii_case(b"-infinity") {
        Some(Infinite::NegInfinity)
    } else {
        None
    }
}

/// The `Y+-MM-DD` fields of a date, before the era is known.
struct DateFields {
    year: i64,
    month: u32,
    day: u32,
}

fn date_fields(cur: &mut Cursor<'_>) -> Parsed<DateFields> {
    let year = cur.number(1, 9, "expected a year")?;
    cur.expect(b'-', "expected '-' after the year")?;
    let month = cur.number(1, 2, "expected a two-digit month")?;
    cur.expect(b'-', "expected '-' after the month")?;
    let day = cur.number(1, 2, "expected a two-digit day")?;
    Ok(DateFields {
        year,
        month: month as u32,
        day: day as u32,
    })
}

/// Days since 1970 of validated date fields; `bc` turns year N BC into astronomical 1 - N.
fn date_days(fields: &DateFields, bc: bool) -> Parsed<i64> {
    if fields.year == 0 {
        return Err(Fail::OutOfRange("year zero does not exist"));
    }
    let year = if bc { 1 - fields.year } else { fields.year };
    if !(1..=12).contains(&fields.month) {
        return Err(Fail::OutOfRange("month out of range"));
    }
    if fields.day == 0 || fields.day > calendar::days_in_month(year, fields.month) {
        return Err(Fail::OutOfRange("day out of range for the month"));
    }
    Ok(calendar::days_from_civil(year, fields.month, fields.day))
}

/// ` BC` at the end of a date or timestamp.
fn era_suffix(cur: &mut Cursor<'_>) -> Parsed<bool> {
    let bc = cur.eat_str(b" BC");
    if !cur.is_empty() {
        return Err(Fail::Invalid("unexpected characters after the value"));
    }
    Ok(bc)
}

fn parse_date(raw: &[u8]) -> Parsed<Infinite<i32>> {
    match infinity(raw) {
        Some(Infinite::PosInfinity) => return Ok(Infinite::PosInfinity),
        Some(_) => return Ok(Infinite::NegInfinity),
        None => {}
    }
    let mut cur = Cursor::new(raw);
    let fields = date_fields(&mut cur)?;
    let bc = era_suffix(&mut cur)?;
    let days = date_days(&fields, bc)?;
    if days < i64::from(MIN_DATE_DAYS) || days > i64::from(calendar::MAX_DATE_DAYS) {
        return Err(Fail::OutOfRange("date out of range"));
    }
    Ok(Infinite::Finite(days as i32))
}

/// `HH:MM[:SS[.ffffff]]` as µs since midnight; up to 24:00:00 (and a leap second 60, which
/// Postgres folds into the next minute).
fn time_of_day(cur: &mut Cursor<'_>) -> Parsed<i64> {
    let hour = cur.number(1, 2, "expected an hour")?;
    cur.expect(b':', "expected ':' after the hour")?;
    let minute = cur.number(2, 2, "expected two-digit minutes")?;
    let (second, fraction) = if cur.eat(b':') {
        let second = cur.number(2, 2, "expected two-digit seconds")?;
        (second, cur.fraction()?)
    } else {
        (0, 0)
    };
    time_micros([hour, minute, second], fraction)
}

/// µs since midnight of validated `[hour, minute, second]` and a fraction in µs.
fn time_micros([hour, minute, second]: [i64; 3], fraction: i64) -> Parsed<i64> {
    if hour > 24 || minute > 59 || second > 60 {
        return Err(Fail::OutOfRange("time field out of range"));
    }
    let micros =
        hour * MICROS_PER_HOUR + minute * MICROS_PER_MINUTE + second * MICROS_PER_SECOND + fraction;
    if micros > MICROS_PER_DAY {
        return Err(Fail::OutOfRange("time of day after 24:00:00"));
    }
    Ok(micros)
}

/// `±HH[:MM[:SS]]` as seconds east of UTC.
fn utc_offset(cur: &mut Cursor<'_>) -> Parsed<i32> {
    let sign = if cur.eat(b'+') {
        1
    } else if cur.eat(b'-') {
        -1
    } else {
        return Err(Fail::Invalid("expected a UTC offset"));
    };
    let hours = cur.number(1, 2, "expected offset hours")?;
    let mut minutes = 0;
    let mut seconds = 0;
    if cur.eat(b':') {
        minutes = cur.number(2, 2, "expected two-digit offset minutes")?;
        if cur.eat(b':') {
            seconds = cur.number(2, 2, "expected two-digit offset seconds")?;
        }
    }
    // Postgres limits displacements to 15:59:59.
    if hours > 15 || minutes > 59 || seconds > 59 {
        return Err(Fail::OutOfRange("UTC offset out of range"));
    }
    Ok(sign * (hours * 3600 + minutes * 60 + seconds) as i32)
}

/// The fields of `YYYY-MM-DD HH:MM:SS` (or `…T…`) at the start of a timestamp — how Postgres
/// prints every timestamp of the years 1000–9999 — read at fixed offsets: the general
/// cursor's digit runs cost three times as much, and a timestamp is in most rows. `None` for
/// any other shape, which the cursor then reads (to the same result: both accept this shape
/// alike, see the `iso_fields_read_timestamps_as_the_cursor_does` proptest).
fn iso_fields(raw: &[u8]) -> Option<(DateFields, [i64; 3])> {
    let head = raw.get(..19)?;
    // A seventh digit run would be part of the seconds to the cursor (and rejected).
    if raw.get(19).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let seps = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| head[i] != c) || !matches!(head[10], b' ' | b'T') {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        head[from..to].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let fields = DateFields {
        year: num(0, 4)?,
        month: num(5, 7)? as u32,
        day: num(8, 10)? as u32,
    };
    Some((fields, [num(11, 13)?, num(14, 16)?, num(17, 19)?]))
}

fn parse_timestamp(raw: &[u8], with_tz: bool) -> Parsed<Infinite<i64>> {
    parse_timestamp_with(raw, with_tz, true)
}

/// [`parse_timestamp`]; `fixed`: try [`iso_fields`] first.
fn parse_timestamp_with(raw: &[u8], with_tz: bool, fixed: bool) -> Parsed<Infinite<i64>> {
    match infinity(raw) {
        Some(Infinite::PosInfinity) => return Ok(Infinite::PosInfinity),
        Some(_) => return Ok(Infinite::NegInfinity),
        None => {}
    }
    let (mut cur, fields, time) = match iso_fields(raw).filter(|_| fixed) {
        Some((fields, hms)) => {
            let mut cur = Cursor::new(&raw[19..]);
            let time = time_micros(hms, cur.fraction()?)?;
            (cur, fields, time)
        }
        None => {
            let mut cur = Cursor::new(raw);
            let fields = date_fields(&mut cur)?;
            if !(cur.eat(b' ') || cur.eat(b'T')) {
                return Err(Fail::Invalid("expected a time after the date"));
            }
            let time = time_of_day(&mut cur)?;
            (cur, fields, time)
        }
    };
    let offset = match cur.peek() {
        Some(b'+' | b'-') if with_tz => utc_offset(&mut cur)?,
        Some(b'+' | b'-') => return Err(Fail::Invalid("unexpected UTC offset")),
        _ => 0,
    };
    let bc = era_suffix(&mut cur)?;
    let days = date_days(&fields, bc)?;
    const OVERFLOW: Fail = Fail::OutOfRange("timestamp out of range");
    let micros = days
        .checked_mul(MICROS_PER_DAY)
        .and_then(|m| m.checked_add(time))
        .and_then(|m| m.checked_sub(i64::from(offset) * MICROS_PER_SECOND))
        .ok_or(OVERFLOW)?;
    if micros < MIN_TIMESTAMP_MICROS {
        return Err(OVERFLOW);
    }
    Ok(Infinite::Finite(micros))
}

fn parse_time(raw: &[u8]) -> Parsed<i64> {
    let mut cur = Cursor::new(raw);
    let micros = time_of_day(&mut cur)?;
    if !cur.is_empty() {
        return Err(Fail::Invalid("unexpected characters after the time"));
    }
    Ok(micros)
}

fn parse_timetz(raw: &[u8]) -> Parsed<(i64, i32)> {
    let mut cur = Cursor::new(raw);
    let micros = time_of_day(&mut cur)?;
    let offset = utc_offset(&mut cur)?;
    if !cur.is_empty() {
        return Err(Fail::Invalid("unexpected characters after the offset"));
    }
    Ok((micros, offset))
}

/// ISO 8601 interval `P[nY][nM][nW][nD][T[nH][nM][n[.f]S]]`, each number with its own sign,
/// fractions only on seconds (Postgres never prints others). Postgres 17's `infinity` and
/// `-infinity` become all fields at their maximum / minimum, as in the binary form.
fn parse_interval(raw: &[u8]) -> Parsed<(i32, i32, i64)> {
    match infinity(raw) {
        Some(Infinite::PosInfinity) => return Ok((i32::MAX, i32::MAX, i64::MAX)),
        Some(_) => return Ok((i32::MIN, i32::MIN, i64::MIN)),
        None => {}
    }
    const OVERFLOW: Fail = Fail::OutOfRange("interval field overflows");
    let mut cur = Cursor::new(raw);
    cur.expect(b'P', "expected ISO 8601 interval starting with 'P'")?;
    let (mut months, mut days, mut micros) = (0i32, 0i32, 0i64);
    let mut in_time = false;
    // Units must come in order; `rank` is the position of the last one seen.
    let mut rank = 0u8;
    let mut any = false;
    loop {
        if cur.is_empty() {
            break;
        }
        if !in_time && cur.eat(b'T') {
            in_time = true;
            if cur.is_empty() {
                return Err(Fail::Invalid("missing time fields after 'T'"));
            }
            continue;
        }
        let negative = cur.eat(b'-');
        if !negative {
            cur.eat(b'+');
        }
        let whole = cur.number(1, 18, "expected a number")?;
        let fraction = cur.fraction()?;
        let whole = if negative { -whole } else { whole };
        let fraction = if negative { -fraction } else { fraction };
        let (unit_rank, unit) = match (in_time, cur.peek()) {
            (false, Some(b'Y')) => (1, b'Y'),
            (false, Some(b'M')) => (2, b'M'),
            (false, Some(b'W')) => (3, b'W'),
            (false, Some(b'D')) => (4, b'D'),
            (true, Some(b'H')) => (5, b'H'),
            (true, Some(b'M')) => (6, b'm'),
            (true, Some(b'S')) => (7, b'S'),
            _ => return Err(Fail::Invalid("expected an interval unit")),
        };
        cur.rest = cur.rest.get(1..).unwrap_or_default();
        if unit_rank <= rank {
            return Err(Fail::Invalid("interval units out of order or repeated"));
        }
        rank = unit_rank;
        any = true;
        if fraction != 0 && unit != b'S' {
            return Err(Fail::Invalid(
                "fractional values are only supported for seconds",
            ));
        }
        let small = |v: i64| i32::try_from(v).map_err(|_| OVERFLOW);
        match unit {
            b'Y' => {
                let m = small(whole)?.checked_mul(12).ok_or(OVERFLOW)?;
                months = months.checked_add(m).ok_or(OVERFLOW)?;
            }
            b'M' => months = months.checked_add(small(whole)?).ok_or(OVERFLOW)?,
            b'W' => {
                let d = small(whole)?.checked_mul(7).ok_or(OVERFLOW)?;
                days = days.checked_add(d).ok_or(OVERFLOW)?;
            }
            b'D' => days = days.checked_add(small(whole)?).ok_or(OVERFLOW)?,
            _ => {
                let scale = match unit {
                    b'H' => MICROS_PER_HOUR,
                    b'm' => MICROS_PER_MINUTE,
                    _ => MICROS_PER_SECOND,
                };
                let part = whole
                    .checked_mul(scale)
                    .and_then(|p| p.checked_add(fraction))
                    .ok_or(OVERFLOW)?;
                micros = micros.checked_add(part).ok_or(OVERFLOW)?;
            }
        }
    }
    if !any {
        return Err(Fail::Invalid("interval without fields"));
    }
    Ok((months, days, micros))
}

/// Whitespace as `array_in` sees it.
fn is_array_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Postgres' MAXDIM: arrays have at most 6 dimensions. It also bounds the nesting we track.
const MAX_DIMS: usize = 6;

/// Where the array scanner is between tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// Just after `{`: an element, a nested `{`, or `}`.
    ElementOrClose,
    /// Just after `,`: an element or a nested `{`.
    Element,
    /// Just after an element or a nested `}`: `,` or `}`.
    Delimiter,
}

/// One scanned element: NULL, a span of the input, or the unescaped bytes left in the scratch
/// buffer.
enum Scanned {
    Null,
    Span(usize, usize),
    Scratch,
}

/// A Postgres array literal: optional `[lb:ub]...=` bounds, then nested braces with elements
/// separated by `,`. Elements may be double-quoted; backslash escapes the next byte inside and
/// outside quotes; an unquoted `NULL` (any case) is a null element. Nesting must be regular.
/// Scanning is iterative, so hostile nesting cannot exhaust the stack.
fn parse_array(ty: &PgType, elem: &PgType, raw: &[u8]) -> Result<Value, ValueError> {
    let fail = |reason: &'static str| Fail::Invalid(reason).into_error(ty);
    let skip_space = |mut pos: usize| {
        while raw.get(pos).copied().is_some_and(is_array_space) {
            pos += 1;
        }
        pos
    };

    // Explicit bounds: [lb:ub] or [ub] per dimension, then '='.
    let mut explicit = [ArrayDim {
        len: 0,
        lower_bound: 1,
    }; MAX_DIMS];
    let mut explicit_count = 0usize;
    let mut pos = skip_space(0);
    while raw.get(pos) == Some(&b'[') {
        if explicit_count == MAX_DIMS {
            return Err(fail("more than 6 dimensions"));
        }
        let bound = |pos: &mut usize| -> Result<i64, ValueError> {
            *pos = skip_space(*pos);
            let start = *pos;
            if matches!(raw.get(*pos), Some(b'+' | b'-')) {
                *pos += 1;
            }
            while raw.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            let text = raw.get(start..*pos).unwrap_or_default();
            let value =
                parse_int(text, i32::MIN.into(), i32::MAX.into()).map_err(|f| f.into_error(ty))?;
            *pos = skip_space(*pos);
            Ok(value)
        };
        pos += 1;
        let first = bound(&mut pos)?;
        let (lower, upper) = if raw.get(pos) == Some(&b':') {
            pos += 1;
            (first, bound(&mut pos)?)
        } else {
            (1, first)
        };
        if raw.get(pos) != Some(&b']') {
            return Err(fail("expected ']' in array bounds"));
        }
        pos += 1;
        if upper < lower {
            return Err(fail("upper bound below lower bound"));
        }
        let len = u32::try_from(upper - lower + 1).map_err(|_| fail("dimension too long"))?;
        if let Some(slot) = explicit.get_mut(explicit_count) {
            *slot = ArrayDim {
                len,
                lower_bound: lower as i32,
            };
        }
        explicit_count += 1;
    }
    if explicit_count > 0 {
        pos = skip_space(pos);
        if raw.get(pos) != Some(&b'=') {
            return Err(fail("expected '=' after array bounds"));
        }
        pos = skip_space(pos + 1);
    }
    if raw.get(pos) != Some(&b'{') {
        return Err(fail("array literal must start with '{'"));
    }
    pos += 1;

    // Per nesting level: items seen in the open sub-array, and the length all sub-arrays at
    // that level must share.
    let mut counts = [0u32; MAX_DIMS];
    let mut lens: [Option<u32>; MAX_DIMS] = [None; MAX_DIMS];
    let mut depth = 1usize;
    let mut ndim: Option<usize> = None;
    let mut empty_inner = false;
    let mut state = ArrayState::ElementOrClose;
    let mut elements = Vec::new();
    let mut scratch = Vec::new();

    loop {
        pos = skip_space(pos);
        let Some(&c) = raw.get(pos) else {
            return Err(fail("unterminated array literal"));
        };
        match (state, c) {
            (ArrayState::ElementOrClose | ArrayState::Element, b'{') => {
                if depth == MAX_DIMS {
                    return Err(fail("more than 6 dimensions"));
                }
                if ndim.is_some_and(|n| depth >= n) {
                    return Err(fail("inconsistent nesting of sub-arrays"));
                }
                depth += 1;
                if let Some(count) = counts.get_mut(depth - 1) {
                    *count = 0;
                }
                pos += 1;
                state = ArrayState::ElementOrClose;
            }
            (ArrayState::ElementOrClose | ArrayState::Delimiter, b'}') => {
                let level = depth - 1;
                let n = counts.get(level).copied().unwrap_or_default();
                if n == 0 {
                    empty_inner |= depth > 1;
                } else if let Some(len) = lens.get_mut(level) {
                    match *len {
                        None => *len = Some(n),
                        Some(l) if l != n => {
                            return Err(fail("sub-arrays must have matching dimensions"))
                        }
                        Some(_) => {}
                    }
                }
                pos += 1;
                depth -= 1;
                if depth == 0 {
                    break;
                }
                if let Some(count) = counts.get_mut(depth - 1) {
                    *count = count.checked_add(1).ok_or_else(|| fail("array too long"))?;
                }
                state = ArrayState::Delimiter;
            }
            (ArrayState::Delimiter, b',') => {
                pos += 1;
                state = ArrayState::Element;
            }
            (ArrayState::Delimiter, _) => return Err(fail("expected ',' or '}'")),
            (_, b',' | b'}') => return Err(fail("missing array element")),
            _ => {
                match ndim {
                    None => ndim = Some(depth),
                    Some(n) if n != depth => {
                        return Err(fail("inconsistent nesting of sub-arrays"))
                    }
                    Some(_) => {}
                }
                let scanned = if c == b'"' {
                    scan_quoted(raw, &mut pos, &mut scratch)
                } else {
                    scan_unquoted(raw, &mut pos, &mut scratch)
                }
                .map_err(|f| f.into_error(ty))?;
                let value = match scanned {
                    Scanned::Null => Value::Null,
                    Scanned::Span(start, end) => {
                        parse(elem, raw.get(start..end).unwrap_or_default())?
                    }
                    Scanned::Scratch => parse(elem, &scratch)?,
                };
                elements.push(value);
                if let Some(count) = counts.get_mut(depth - 1) {
                    *count = count.checked_add(1).ok_or_else(|| fail("array too long"))?;
                }
                state = ArrayState::Delimiter;
            }
        }
    }
    if skip_space(pos) != raw.len() {
        return Err(fail("unexpected characters after the array"));
    }

    if elements.is_empty() {
        if explicit_count > 0 {
            return Err(fail("array bounds given for an empty array"));
        }
        return Ok(Value::Array(ArrayValue {
            dims: Vec::new(),
            elements,
        }));
    }
    if empty_inner {
        return Err(fail("sub-arrays must have matching dimensions"));
    }
    let ndim = ndim.unwrap_or(1);
    if explicit_count > 0 && explicit_count != ndim {
        return Err(fail("array bounds do not match the nesting"));
    }
    let mut dims = Vec::with_capacity(ndim);
    for level in 0..ndim {
        let len = lens.get(level).copied().flatten().unwrap_or_default();
        let lower_bound = if explicit_count > 0 {
            let given = explicit.get(level).copied().unwrap_or(ArrayDim {
                len: 0,
                lower_bound: 1,
            });
            if given.len != len {
                return Err(fail("array bounds do not match the contents"));
            }
            given.lower_bound
        } else {
            1
        };
        dims.push(ArrayDim { len, lower_bound });
    }
    Ok(Value::Array(ArrayValue { dims, elements }))
}

/// A double-quoted element starting at `raw[*pos] == '"'`; leaves `*pos` after the closing quote.
fn scan_quoted(raw: &[u8], pos: &mut usize, scratch: &mut Vec<u8>) -> Parsed<Scanned> {
    let start = *pos + 1;
    let mut i = start;
    let mut escaped = false;
    loop {
        match raw.get(i) {
            None => return Err(Fail::Invalid("unterminated quoted array element")),
            Some(b'"') => break,
            Some(b'\\') => {
                if !escaped {
                    scratch.clear();
                    scratch.extend_from_slice(raw.get(start..i).unwrap_or_default());
                    escaped = true;
                }
                let next = raw
                    .get(i + 1)
                    .ok_or(Fail::Invalid("unterminated quoted array element"))?;
                scratch.push(*next);
                i += 2;
            }
            Some(&c) => {
                if escaped {
                    scratch.push(c);
                }
                i += 1;
            }
        }
    }
    *pos = i + 1;
    Ok(if escaped {
        Scanned::Scratch
    } else {
        Scanned::Span(start, i)
    })
}

/// An unquoted element starting at `*pos` (not whitespace, not a delimiter); leaves `*pos` at
/// the `,` or `}` that ends it. Trailing unescaped whitespace is not part of the element.
fn scan_unquoted(raw: &[u8], pos: &mut usize, scratch: &mut Vec<u8>) -> Parsed<Scanned> {
    let start = *pos;
    let mut i = start;
    let mut escaped = false;
    // End of the element without trailing whitespace: an index into `raw` until the first
    // escape, then a length of `scratch`.
    let mut keep = start;
    loop {
        match raw.get(i) {
            None => return Err(Fail::Invalid("unterminated array literal")),
            Some(b',' | b'}') => break,
            Some(b'{' | b'"') => {
                return Err(Fail::Invalid("unexpected character in array element"))
            }
            Some(b'\\') => {
                if !escaped {
                    scratch.clear();
                    scratch.extend_from_slice(raw.get(start..i).unwrap_or_default());
                    escaped = true;
                }
                let next = raw
                    .get(i + 1)
                    .ok_or(Fail::Invalid("unterminated array literal"))?;
                scratch.push(*next);
                keep = scratch.len();
                i += 2;
            }
            Some(&c) => {
                if escaped {
                    scratch.push(c);
                    if !is_array_space(c) {
                        keep = scratch.len();
                    }
                } else if !is_array_space(c) {
                    keep = i + 1;
                }
                i += 1;
            }
        }
    }
    *pos = i;
    if escaped {
        scratch.truncate(keep);
        return Ok(Scanned::Scratch);
    }
    let span = raw.get(start..keep).unwrap_or_default();
    if span.eq_ignore_ascii_case(b"NULL") {
        return Ok(Scanned::Null);
    }
    Ok(Scanned::Span(start, keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::calendar::{
        days_from_civil, format_date, format_interval, format_time, format_timestamp,
        MAX_DATE_DAYS, UNIX_EPOCH_PG_MICROS,
    };
    use proptest::prelude::*;

    fn ok(ty: &PgType, s: &str) -> Value {
        match parse(ty, s.as_bytes()) {
            Ok(v) => v,
            Err(e) => panic!("{ty} {s:?}: {e}"),
        }
    }

    fn invalid(ty: &PgType, s: &str) {
        let got = parse(ty, s.as_bytes());
        assert!(
            matches!(got, Err(ValueError::Invalid { form: "text", .. })),
            "{ty} {s:?}: {got:?}"
        );
    }

    fn out_of_range(ty: &PgType, s: &str) {
        let got = parse(ty, s.as_bytes());
        assert!(
            matches!(got, Err(ValueError::OutOfRange { .. })),
            "{ty} {s:?}: {got:?}"
        );
    }

    fn int4_array(dims: &[(u32, i32)], elements: Vec<Value>) -> Value {
        Value::Array(ArrayValue {
            dims: dims
                .iter()
                .map(|&(len, lower_bound)| ArrayDim { len, lower_bound })
                .collect(),
            elements,
        })
    }

    const EPOCH: i64 = UNIX_EPOCH_PG_MICROS;
    /// 0001-01-01 BC, the last BC day; proptests draw half their dates up to it, since BC is
    /// a sliver of the full range.
    const BC_END_DAYS: i32 = -719_163;
    const BC_END_MICROS: i64 = (BC_END_DAYS as i64 + 1) * MICROS_PER_DAY - 1;
    const H: i64 = MICROS_PER_HOUR;
    const M: i64 = MICROS_PER_MINUTE;
    const S: i64 = MICROS_PER_SECOND;

    #[test]
    fn bools() {
        assert_eq!(ok(&PgType::Bool, "t"), Value::Bool(true));
        assert_eq!(ok(&PgType::Bool, "f"), Value::Bool(false));
        assert_eq!(ok(&PgType::Bool, "TRUE"), Value::Bool(true));
        invalid(&PgType::Bool, "");
        invalid(&PgType::Bool, "x");
        invalid(&PgType::Bool, "tt");
    }

    #[test]
    fn integers_with_range_checks() {
        assert_eq!(ok(&PgType::Int2, "32767"), Value::Int2(i16::MAX));
        assert_eq!(ok(&PgType::Int2, "-32768"), Value::Int2(i16::MIN));
        out_of_range(&PgType::Int2, "32768");
        assert_eq!(ok(&PgType::Int4, "-2147483648"), Value::Int4(i32::MIN));
        out_of_range(&PgType::Int4, "2147483648");
        assert_eq!(
            ok(&PgType::Int8, "-9223372036854775808"),
            Value::Int8(i64::MIN)
        );
        assert_eq!(
            ok(&PgType::Int8, "9223372036854775807"),
            Value::Int8(i64::MAX)
        );
        out_of_range(&PgType::Int8, "9223372036854775808");
        out_of_range(&PgType::Int8, "99999999999999999999999999");
        assert_eq!(ok(&PgType::Oid, "4294967295"), Value::Oid(u32::MAX));
        assert_eq!(ok(&PgType::Oid, "-1"), Value::Oid(u32::MAX));
        out_of_range(&PgType::Oid, "4294967296");
        for bad in ["", "-", "+", "1.0", "12a", " 1", "1e3", "0x10"] {
            invalid(&PgType::Int4, bad);
        }
    }

    #[test]
    fn floats_round_trip_exactly() {
        let f8 = |s| match ok(&PgType::Float8, s) {
            Value::Float8(f) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(f8("1e-07"), 1e-7);
        assert_eq!(f8("0.1"), 0.1);
        assert_eq!(f8("1e+100"), 1e100);
        assert_eq!(f8("1.7976931348623157e+308"), f64::MAX);
        assert_eq!(f8("5e-324"), f64::from_bits(1));
        assert_eq!(f8("-0").to_bits(), (-0.0f64).to_bits());
        assert!(f8("NaN").is_nan());
        assert_eq!(f8("Infinity"), f64::INFINITY);
        assert_eq!(f8("-Infinity"), f64::NEG_INFINITY);
        out_of_range(&PgType::Float8, "1e400");
        for bad in ["", "abc", "1,5", "--1", "-NaN-", "1e"] {
            invalid(&PgType::Float8, bad);
        }
        let f4 = |s| match ok(&PgType::Float4, s) {
            Value::Float4(f) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(f4("1.1"), 1.1f32);
        assert_eq!(f4("3.4028235e+38"), f32::MAX);
        assert_eq!(f4("1e-45"), f32::from_bits(1));
        assert_eq!(f4("-Infinity"), f32::NEG_INFINITY);
        out_of_range(&PgType::Float4, "3.5e+38");
    }

    #[test]
    fn numerics_keep_their_text() {
        let ty = PgType::Numeric {
            precision_scale: None,
        };
        let fin = |s: &str| Value::Numeric(Numeric::Finite(s.to_owned()));
        assert_eq!(ok(&ty, "-0.000100"), fin("-0.000100"));
        assert_eq!(ok(&ty, "0"), fin("0"));
        assert_eq!(
            ok(&ty, "12345678901234567890.12345678901234567890"),
            fin("12345678901234567890.12345678901234567890")
        );
        let long = format!("-{}.{}", "9".repeat(1200), "0".repeat(1001));
        assert_eq!(ok(&ty, &long), fin(&long));
        assert_eq!(ok(&ty, "NaN"), Value::Numeric(Numeric::NaN));
        assert_eq!(ok(&ty, "Infinity"), Value::Numeric(Numeric::PosInfinity));
        assert_eq!(ok(&ty, "-Infinity"), Value::Numeric(Numeric::NegInfinity));
        for bad in [
            "", "-", ".5", "5.", "1e5", "+1", "1.2.3", " 1", "1 ", "--1", "nan",
        ] {
            invalid(&ty, bad);
        }
    }

    #[test]
    fn text_like_types_are_utf8() {
        assert_eq!(ok(&PgType::Text, "héllo"), Value::Text("héllo".into()));
        assert_eq!(ok(&PgType::Text, ""), Value::Text(String::new()));
        assert_eq!(
            ok(&PgType::Enum { oid: 1 }, "happy"),
            Value::Enum("happy".into())
        );
        assert_eq!(
            ok(&PgType::Unknown { oid: 600 }, "(1,2)"),
            Value::Unknown("(1,2)".into())
        );
        assert_eq!(
            ok(&PgType::Jsonb, r#"{"a": 1.50}"#),
            Value::Json(r#"{"a": 1.50}"#.into())
        );
        assert_eq!(ok(&PgType::Json, "[1 ,2]"), Value::Json("[1 ,2]".into()));
        let err = parse(&PgType::Text, b"secret\xff").err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("invalid text text value: invalid UTF-8".to_owned())
        );
    }

    #[test]
    fn bytea_hex_and_escape_formats() {
        let b = |s| ok(&PgType::Bytea, s);
        assert_eq!(b("\\x0aff"), Value::Bytea(vec![0x0a, 0xff]));
        assert_eq!(b("\\x0AfF"), Value::Bytea(vec![0x0a, 0xff]));
        assert_eq!(b("\\x"), Value::Bytea(vec![]));
        assert_eq!(b("\\x0a ff\n00"), Value::Bytea(vec![0x0a, 0xff, 0]));
        assert_eq!(b("abc\\000\\\\"), Value::Bytea(b"abc\0\\".to_vec()));
        assert_eq!(b("\\101\\377x"), Value::Bytea(b"A\xffx".to_vec()));
        assert_eq!(b(""), Value::Bytea(vec![]));
        for bad in [
            "\\x0", "\\xzz", "\\x0g", "\\", "a\\b", "\\400", "\\08", "\\12",
        ] {
            invalid(&PgType::Bytea, bad);
        }
    }

    #[test]
    fn uuids() {
        let expected = Value::Uuid([
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ]);
        for good in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(ok(&PgType::Uuid, good), expected, "{good}");
        }
        for bad in [
            "",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            invalid(&PgType::Uuid, bad);
        }
    }

    #[test]
    fn bc_end_is_the_last_day_of_1_bc() {
        assert_eq!(i64::from(BC_END_DAYS), days_from_civil(0, 12, 31));
        assert_eq!(format_date(Infinite::Finite(BC_END_DAYS)), "0001-12-31 BC");
    }

    #[test]
    fn dates() {
        let date = |d: i64| Value::Date(Infinite::Finite(d as i32));
        assert_eq!(ok(&PgType::Date, "1970-01-01"), date(0));
        assert_eq!(ok(&PgType::Date, "2000-01-01"), date(10957));
        assert_eq!(ok(&PgType::Date, "2000-02-29"), date(10957 + 59));
        assert_eq!(
            ok(&PgType::Date, "0044-03-15 BC"),
            date(days_from_civil(-43, 3, 15))
        );
        assert_eq!(
            ok(&PgType::Date, "0001-12-31 BC"),
            date(days_from_civil(0, 12, 31))
        );
        assert_eq!(
            ok(&PgType::Date, "10000-01-01"),
            date(days_from_civil(10_000, 1, 1))
        );
        assert_eq!(
            ok(&PgType::Date, "4714-11-24 BC"),
            date(MIN_DATE_DAYS.into())
        );
        assert_eq!(
            ok(&PgType::Date, "5874897-12-31"),
            date(MAX_DATE_DAYS.into())
        );
        assert_eq!(
            ok(&PgType::Date, "infinity"),
            Value::Date(Infinite::PosInfinity)
        );
        assert_eq!(
            ok(&PgType::Date, "-infinity"),
            Value::Date(Infinite::NegInfinity)
        );
        for oor in [
            "4714-11-23 BC",
            "5874898-01-01",
            "2000-13-01",
            "2000-00-01",
            "2001-02-29",
            "2000-04-31",
            "2000-01-00",
            "0000-01-01",
            "999999999-01-01",
        ] {
            out_of_range(&PgType::Date, oor);
        }
        for bad in [
            "",
            "2000-01",
            "2000/01/01",
            "2000-01-01 AD",
            "2000-01-01 BC ",
            "2000-001-01",
            "1234567890-01-01",
            "-2000-01-01",
            "2000-01-01 00:00:00",
        ] {
            invalid(&PgType::Date, bad);
        }
    }

    #[test]
    fn timestamps() {
        let ts = |m: i64| Value::Timestamp(Infinite::Finite(m));
        let ty = PgType::Timestamp;
        assert_eq!(ok(&ty, "2000-01-01 00:00:00"), ts(EPOCH));
        assert_eq!(ok(&ty, "1970-01-01 00:00:00"), ts(0));
        assert_eq!(ok(&ty, "1999-12-31 23:59:59.999999"), ts(EPOCH - 1));
        assert_eq!(ok(&ty, "2000-01-01 00:00:00.5"), ts(EPOCH + S / 2));
        assert_eq!(ok(&ty, "2000-01-01T00:00:00.5"), ts(EPOCH + S / 2));
        assert_eq!(ok(&ty, "2000-01-01 00:00:00.0000005"), ts(EPOCH + 1));
        assert_eq!(ok(&ty, "2000-01-01 24:00:00"), ts(EPOCH + MICROS_PER_DAY));
        assert_eq!(
            ok(&ty, "0044-03-15 12:00:00 BC"),
            ts(days_from_civil(-43, 3, 15) * MICROS_PER_DAY + 12 * H)
        );
        assert_eq!(ok(&ty, "4714-11-24 00:00:00 BC"), ts(MIN_TIMESTAMP_MICROS));
        assert_eq!(ok(&ty, "294247-01-10 04:00:54.775807"), ts(i64::MAX));
        // Valid in Postgres, but past i64 µs since 1970.
        out_of_range(&ty, "294247-01-10 04:00:54.775808");
        out_of_range(&ty, "294276-12-31 23:59:59.999999");
        out_of_range(&ty, "4714-11-23 23:59:59.999999 BC");
        out_of_range(&ty, "2000-01-01 25:00:00");
        out_of_range(&ty, "2000-01-01 24:00:01");
        out_of_range(&ty, "2000-01-01 12:60:00");
        out_of_range(&ty, "2000-02-30 00:00:00");
        assert_eq!(ok(&ty, "infinity"), Value::Timestamp(Infinite::PosInfinity));
        assert_eq!(
            ok(&ty, "-infinity"),
            Value::Timestamp(Infinite::NegInfinity)
        );
        for bad in [
            "",
            "2000-01-01",
            "2000-01-01 00:00:00+00",
            "2000-01-01 00:00:00.",
            "2000-01-01 0:0:00",
            "2000-01-01 00:00:0",
            "2000-01-01  00:00:00",
            "2000-01-01 00:00:00 bc",
        ] {
            invalid(&ty, bad);
        }
    }

    #[test]
    fn timestamptz_converts_offsets_to_utc() {
        let ts = |m: i64| Value::TimestampTz(Infinite::Finite(m));
        let ty = PgType::TimestampTz;
        assert_eq!(ok(&ty, "2000-01-01 00:00:00+00"), ts(EPOCH));
        assert_eq!(ok(&ty, "2000-01-01 00:00:00"), ts(EPOCH));
        assert_eq!(ok(&ty, "2000-01-01 00:00:00-08"), ts(EPOCH + 8 * H));
        assert_eq!(ok(&ty, "2000-01-01 05:30:00+05:30"), ts(EPOCH));
        assert_eq!(
            ok(&ty, "2000-01-01 00:00:00.25+05:17:32"),
            ts(EPOCH - (5 * H + 17 * M + 32 * S) + S / 4)
        );
        assert_eq!(
            ok(&ty, "0044-03-15 12:00:00+00 BC"),
            ts(days_from_civil(-43, 3, 15) * MICROS_PER_DAY + 12 * H)
        );
        assert_eq!(
            ok(&ty, "-infinity"),
            Value::TimestampTz(Infinite::NegInfinity)
        );
        out_of_range(&ty, "2000-01-01 00:00:00+16");
        out_of_range(&ty, "2000-01-01 00:00:00+01:60");
        out_of_range(&ty, "294247-01-10 04:00:54.775807-00:00:01");
        out_of_range(&ty, "4714-11-24 00:00:00+01 BC");
        for bad in [
            "2000-01-01 00:00:00+",
            "2000-01-01 00:00:00+5:3",
            "2000-01-01 00:00:00+05:30:",
            "2000-01-01 00:00:00 +00",
            "2000-01-01 00:00:00+00 UTC",
        ] {
            invalid(&ty, bad);
        }
    }

    #[test]
    fn times() {
        assert_eq!(ok(&PgType::Time, "00:00:00"), Value::Time(0));
        assert_eq!(ok(&PgType::Time, "24:00:00"), Value::Time(MICROS_PER_DAY));
        assert_eq!(
            ok(&PgType::Time, "13:05:07.00001"),
            Value::Time(13 * H + 5 * M + 7 * S + 10)
        );
        assert_eq!(ok(&PgType::Time, "1:02"), Value::Time(H + 2 * M));
        out_of_range(&PgType::Time, "24:00:00.000001");
        out_of_range(&PgType::Time, "12:60:00");
        out_of_range(&PgType::Time, "12:00:61");
        invalid(&PgType::Time, "12:00:00+01");
        invalid(&PgType::Time, "12");
        invalid(&PgType::Time, "");
        let tz = |micros, offset_seconds| Value::TimeTz {
            micros,
            offset_seconds,
        };
        assert_eq!(ok(&PgType::TimeTz, "12:00:00+02"), tz(12 * H, 7200));
        assert_eq!(ok(&PgType::TimeTz, "00:00:00-08"), tz(0, -28_800));
        assert_eq!(
            ok(&PgType::TimeTz, "23:59:59.999999+05:30"),
            tz(MICROS_PER_DAY - 1, 19_800)
        );
        assert_eq!(
            ok(&PgType::TimeTz, "12:00:00-05:17:32"),
            tz(12 * H, -19_052)
        );
        assert_eq!(ok(&PgType::TimeTz, "24:00:00+00"), tz(MICROS_PER_DAY, 0));
        invalid(&PgType::TimeTz, "12:00:00");
        invalid(&PgType::TimeTz, "12:00:00+02 ");
        out_of_range(&PgType::TimeTz, "12:00:00+16");
    }

    #[test]
    fn iso_8601_intervals() {
        let iv = |months, days, micros| Value::Interval {
            months,
            days,
            micros,
        };
        let ty = PgType::Interval;
        assert_eq!(ok(&ty, "PT0S"), iv(0, 0, 0));
        assert_eq!(
            ok(&ty, "P1Y2M3DT4H5M6.789S"),
            iv(14, 3, 4 * H + 5 * M + 6 * S + 789_000)
        );
        assert_eq!(
            ok(&ty, "P-1Y-2M3DT-4H-5M-6.5S"),
            iv(-14, 3, -(4 * H + 5 * M + 6 * S + 500_000))
        );
        assert_eq!(ok(&ty, "P1W"), iv(0, 7, 0));
        assert_eq!(ok(&ty, "P2W-3D"), iv(0, 11, 0));
        assert_eq!(ok(&ty, "PT-0.5S"), iv(0, 0, -500_000));
        assert_eq!(ok(&ty, "PT+1M"), iv(0, 0, M));
        assert_eq!(ok(&ty, "P1M"), iv(1, 0, 0));
        assert_eq!(ok(&ty, "PT-2562047788H-54.775808S"), iv(0, 0, i64::MIN));
        assert_eq!(ok(&ty, "P178956970Y7M"), iv(i32::MAX, 0, 0));
        assert_eq!(ok(&ty, "P-178956970Y-8M"), iv(i32::MIN, 0, 0));
        assert_eq!(ok(&ty, "infinity"), iv(i32::MAX, i32::MAX, i64::MAX));
        assert_eq!(ok(&ty, "-infinity"), iv(i32::MIN, i32::MIN, i64::MIN));
        out_of_range(&ty, "P178956971Y");
        out_of_range(&ty, "P178956970Y8M");
        out_of_range(&ty, "PT2562047789H");
        out_of_range(&ty, "P2147483648D");
        for bad in [
            "", "P", "PT", "1 day", "P1H", "PT1D", "P1M1Y", "P1D1D", "P1.5Y", "PT1.5H", "P1",
            "PTS", "P1YT", "P-Y", "@ 1 day",
        ] {
            invalid(&ty, bad);
        }
    }

    #[test]
    fn arrays() {
        let int4s = PgType::Array(Box::new(PgType::Int4));
        let i = Value::Int4;
        assert_eq!(
            ok(&int4s, "{1,2,NULL}"),
            int4_array(&[(3, 1)], vec![i(1), i(2), Value::Null])
        );
        assert_eq!(
            ok(&int4s, " { 1 ,\t2 , null } "),
            int4_array(&[(3, 1)], vec![i(1), i(2), Value::Null])
        );
        assert_eq!(
            ok(&int4s, "{{1,2},{3,4}}"),
            int4_array(&[(2, 1), (2, 1)], vec![i(1), i(2), i(3), i(4)])
        );
        assert_eq!(
            ok(&int4s, "{{{1},{2},{3}}}"),
            int4_array(&[(1, 1), (3, 1), (1, 1)], vec![i(1), i(2), i(3)])
        );
        assert_eq!(ok(&int4s, "{}"), int4_array(&[], vec![]));
        assert_eq!(ok(&int4s, "{{}}"), int4_array(&[], vec![]));
        assert_eq!(
            ok(&int4s, "[0:1]={1,2}"),
            int4_array(&[(2, 0)], vec![i(1), i(2)])
        );
        assert_eq!(
            ok(&int4s, "[2:3][-1:0]={{1,2},{3,4}}"),
            int4_array(&[(2, 2), (2, -1)], vec![i(1), i(2), i(3), i(4)])
        );
        assert_eq!(
            ok(&int4s, "[2]={\"1\",2}"),
            int4_array(&[(2, 1)], vec![i(1), i(2)])
        );

        let texts = PgType::Array(Box::new(PgType::Text));
        let t = |s: &str| Value::Text(s.to_owned());
        assert_eq!(
            ok(
                &texts,
                r#"{"a,b","c\"d","NULL",NULL,nUlL," x ","",a b,e\,f\ ,"\\"}"#
            ),
            int4_array(
                &[(10, 1)],
                vec![
                    t("a,b"),
                    t("c\"d"),
                    t("NULL"),
                    Value::Null,
                    Value::Null,
                    t(" x "),
                    t(""),
                    t("a b"),
                    t("e,f "),
                    t("\\"),
                ]
            )
        );

        let byteas = PgType::Array(Box::new(PgType::Bytea));
        assert_eq!(
            ok(&byteas, r#"{"\\x0aff","\\x",NULL}"#),
            int4_array(
                &[(3, 1)],
                vec![
                    Value::Bytea(vec![10, 255]),
                    Value::Bytea(vec![]),
                    Value::Null
                ]
            )
        );
        let stamps = PgType::Array(Box::new(PgType::TimestampTz));
        assert_eq!(
            ok(&stamps, r#"{"2000-01-01 00:00:00+00",-infinity}"#),
            int4_array(
                &[(2, 1)],
                vec![
                    Value::TimestampTz(Infinite::Finite(EPOCH)),
                    Value::TimestampTz(Infinite::NegInfinity)
                ]
            )
        );

        for bad in [
            "",
            "1,2",
            "{1,2",
            "{1,,2}",
            "{,1}",
            "{1,}",
            "{{1,2},{3}}",
            "{{1},2}",
            "{1,{2}}",
            "{{1},{}}",
            "{{},1}",
            "{1}x",
            "{1}}",
            "{1 2}",
            "{\"1\"2}",
            "{1\"2\"}",
            "{\"1}",
            "{1\\",
            "[1:3]={1,2}",
            "[1:2][1:1]={1,2}",
            "[2:1]={1}",
            "[1:2]{1,2}",
            "[1:2={1,2}",
            "[1:0]={}",
            "{{{{{{{1}}}}}}}",
        ] {
            invalid(&int4s, bad);
        }
        let deep = format!("{}{}", "{".repeat(100_000), "}".repeat(100_000));
        invalid(&int4s, &deep);
        // Element errors name the element type.
        assert!(matches!(
            parse(&int4s, b"{1,x}"),
            Err(ValueError::Invalid { type_name, .. }) if type_name == "int4"
        ));
        assert!(matches!(
            parse(&int4s, b"{1,99999999999}"),
            Err(ValueError::OutOfRange { .. })
        ));
    }

    #[test]
    fn errors_never_echo_the_value() {
        let secret = "s3cr3t-value";
        let types = [
            PgType::Bool,
            PgType::Int4,
            PgType::Float8,
            PgType::Numeric {
                precision_scale: None,
            },
            PgType::Bytea,
            PgType::Uuid,
            PgType::Date,
            PgType::Timestamp,
            PgType::TimestampTz,
            PgType::Time,
            PgType::TimeTz,
            PgType::Interval,
            PgType::Array(Box::new(PgType::Int4)),
        ];
        let mut errors = 0;
        for ty in &types {
            for raw in [
                secret.to_owned(),
                format!("\\{secret}"),
                format!("{{{secret}}}"),
                format!("2000-01-01 {secret}"),
            ] {
                if let Err(e) = parse(ty, raw.as_bytes()) {
                    let message = e.to_string();
                    assert!(!message.contains("s3cr3t"), "{ty}: {message}");
                    errors += 1;
                }
            }
        }
        // Only escape-format bytea accepts some of these.
        assert!(errors >= types.len() * 4 - 3, "{errors}");
    }

    // ---- Postgres text formatters (test-only) for round-trip properties ----

    /// timestamp[tz] as Postgres prints it with DateStyle=ISO: `YYYY-MM-DD HH:MM:SS[.f][±zz][ BC]`.
    fn pg_timestamp(local_micros: i64, offset: Option<i32>) -> String {
        let iso = format_timestamp(Infinite::Finite(local_micros), false);
        let (body, bc) = match iso.strip_suffix(" BC") {
            Some(body) => (body.to_owned(), " BC"),
            None => (iso.clone(), ""),
        };
        let mut out = body.replacen('T', " ", 1);
        if let Some(offset) = offset {
            out.push_str(&pg_offset(offset));
        }
        out.push_str(bc);
        out
    }

    /// A UTC offset as Postgres' EncodeTimezone prints it: `+HH`, `+HH:MM` or `+HH:MM:SS`.
    fn pg_offset(east_seconds: i32) -> String {
        let sign = if east_seconds < 0 { '-' } else { '+' };
        let abs = east_seconds.unsigned_abs();
        let (h, m, s) = (abs / 3600, abs / 60 % 60, abs % 60);
        match (m, s) {
            (0, 0) => format!("{sign}{h:02}"),
            (_, 0) => format!("{sign}{h:02}:{m:02}"),
            _ => format!("{sign}{h:02}:{m:02}:{s:02}"),
        }
    }

    /// An array element as array_out quotes it.
    fn pg_array_element(s: &str) -> String {
        let needs_quotes = s.is_empty()
            || s.eq_ignore_ascii_case("NULL")
            || s.bytes()
                .any(|c| matches!(c, b'"' | b'\\' | b'{' | b'}' | b',') || is_array_space(c));
        if !needs_quotes {
            return s.to_owned();
        }
        let mut out = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    fn pg_array(elements: &[Option<String>]) -> String {
        let parts: Vec<String> = elements
            .iter()
            .map(|e| e.as_deref().map_or("NULL".to_owned(), pg_array_element))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// bytea_output=escape: printable ASCII except `\` literally, `\\`, others as `\ooo`.
    fn pg_bytea_escape(bytes: &[u8]) -> String {
        let mut out = String::new();
        for &b in bytes {
            match b {
                b'\\' => out.push_str("\\\\"),
                0x20..=0x7e => out.push(b as char),
                _ => out.push_str(&format!("\\{b:03o}")),
            }
        }
        out
    }

    fn all_types() -> Vec<PgType> {
        let scalars = vec![
            PgType::Bool,
            PgType::Int2,
            PgType::Int4,
            PgType::Int8,
            PgType::Oid,
            PgType::Float4,
            PgType::Float8,
            PgType::Numeric {
                precision_scale: Some((10, 2)),
            },
            PgType::Text,
            PgType::Bytea,
            PgType::Uuid,
            PgType::Date,
            PgType::Timestamp,
            PgType::TimestampTz,
            PgType::Time,
            PgType::TimeTz,
            PgType::Interval,
            PgType::Json,
            PgType::Jsonb,
            PgType::Enum { oid: 1 },
            PgType::Unknown { oid: 2 },
        ];
        let arrays: Vec<PgType> = scalars
            .iter()
            .map(|t| PgType::Array(Box::new(t.clone())))
            .collect();
        scalars.into_iter().chain(arrays).collect()
    }

    proptest! {
        #[test]
        fn dates_round_trip(days in prop_oneof![MIN_DATE_DAYS..=BC_END_DAYS, MIN_DATE_DAYS..=MAX_DATE_DAYS]) {
            let text = format_date(Infinite::Finite(days));
            prop_assert_eq!(ok(&PgType::Date, &text), Value::Date(Infinite::Finite(days)));
        }

        /// The fixed-offset reading of `YYYY-MM-DD HH:MM:SS` gives what the cursor gives, for
        /// text of that shape (valid or not: any digits, either separator, fractions,
        /// offsets, eras) and for near misses.
        #[test]
        fn iso_fields_read_timestamps_as_the_cursor_does(
            (year, month, day, hour, minute, second) in (0..=9999u32, 0..=13u32, 0..=32u32, 0..=25u32, 0..=60u32, 0..=61u32),
            sep in prop_oneof![Just(' '), Just('T')],
            tail in "(\\.[0-9]{0,8})?([+-][0-9]{1,2}(:[0-9]{2})?)?( BC)?",
            // A near miss: one character of the text replaced.
            miss in proptest::option::of((prop_oneof![0..30usize, Just(19), Just(10)], prop_oneof![Just('0'), Just('9'), Just(' '), Just(':'), Just('-'), Just('x')])),
            with_tz in any::<bool>(),
        ) {
            let mut raw: Vec<u8> = format!(
                "{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{second:02}{tail}"
            )
            .into_bytes();
            if let Some((at, c)) = miss {
                if let Some(b) = raw.get_mut(at) {
                    *b = c as u8;
                }
            }
            prop_assert_eq!(
                parse_timestamp_with(&raw, with_tz, true),
                parse_timestamp_with(&raw, with_tz, false)
            );
        }

        #[test]
        fn timestamps_round_trip(micros in prop_oneof![MIN_TIMESTAMP_MICROS..=BC_END_MICROS, MIN_TIMESTAMP_MICROS..=i64::MAX]) {
            let text = pg_timestamp(micros, None);
            prop_assert_eq!(
                ok(&PgType::Timestamp, &text),
                Value::Timestamp(Infinite::Finite(micros))
            );
        }

        #[test]
        fn timestamptz_round_trips_with_any_offset(
            utc in prop_oneof![MIN_TIMESTAMP_MICROS..=BC_END_MICROS, MIN_TIMESTAMP_MICROS..=i64::MAX],
            offset in -57_599i32..=57_599,
        ) {
            let Some(local) = utc.checked_add(i64::from(offset) * S) else {
                return Ok(());
            };
            prop_assume!(local >= MIN_TIMESTAMP_MICROS);
            let text = pg_timestamp(local, Some(offset));
            prop_assert_eq!(
                ok(&PgType::TimestampTz, &text),
                Value::TimestampTz(Infinite::Finite(utc))
            );
        }

        #[test]
        fn times_round_trip(micros in 0..=MICROS_PER_DAY, offset in -57_599i32..=57_599) {
            let text = format_time(micros);
            prop_assert_eq!(ok(&PgType::Time, &text), Value::Time(micros));
            let text = format!("{text}{}", pg_offset(offset));
            prop_assert_eq!(
                ok(&PgType::TimeTz, &text),
                Value::TimeTz { micros, offset_seconds: offset }
            );
        }

        #[test]
        fn intervals_round_trip(months: i32, days: i32, micros: i64) {
            let text = format_interval(months, days, micros);
            prop_assert_eq!(
                ok(&PgType::Interval, &text),
                Value::Interval { months, days, micros }
            );
        }

        #[test]
        fn numerics_round_trip(text in "-?[0-9]{1,60}(\\.[0-9]{1,60})?") {
            let ty = PgType::Numeric { precision_scale: None };
            prop_assert_eq!(ok(&ty, &text), Value::Numeric(Numeric::Finite(text.clone())));
        }

        #[test]
        fn floats_round_trip(bits: u64, bits32: u32) {
            let f = f64::from_bits(bits);
            for text in [format!("{f}"), format!("{f:e}"), format!("{f:?}")] {
                let text = match text.as_str() {
                    "NaN" => "NaN".to_owned(),
                    "inf" => "Infinity".to_owned(),
                    "-inf" => "-Infinity".to_owned(),
                    _ => text,
                };
                match ok(&PgType::Float8, &text) {
                    Value::Float8(g) => prop_assert!(g.to_bits() == bits || (f.is_nan() && g.is_nan())),
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            let f = f32::from_bits(bits32);
            let text = match format!("{f:e}").as_str() {
                "NaN" => "NaN".to_owned(),
                "inf" => "Infinity".to_owned(),
                "-inf" => "-Infinity".to_owned(),
                t => t.to_owned(),
            };
            match ok(&PgType::Float4, &text) {
                Value::Float4(g) => prop_assert!(g.to_bits() == bits32 || (f.is_nan() && g.is_nan())),
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn int_arrays_round_trip(elements in proptest::collection::vec(proptest::option::of(any::<i32>()), 0..20)) {
            let text = pg_array(&elements.iter().map(|e| e.map(|i| i.to_string())).collect::<Vec<_>>());
            let expected = if elements.is_empty() {
                int4_array(&[], vec![])
            } else {
                int4_array(
                    &[(elements.len() as u32, 1)],
                    elements.iter().map(|e| e.map_or(Value::Null, Value::Int4)).collect(),
                )
            };
            prop_assert_eq!(ok(&PgType::Array(Box::new(PgType::Int4)), &text), expected);
        }

        #[test]
        fn two_dimensional_arrays_round_trip(rows in 1usize..5, cols in 1usize..5, seed: Vec<Option<i64>>) {
            let cell = |r: usize, c: usize| seed.get(r * cols + c).copied().flatten();
            let text = format!(
                "{{{}}}",
                (0..rows)
                    .map(|r| pg_array(&(0..cols).map(|c| cell(r, c).map(|v| v.to_string())).collect::<Vec<_>>()))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let elements = (0..rows)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .map(|(r, c)| cell(r, c).map_or(Value::Null, Value::Int8))
                .collect();
            prop_assert_eq!(
                ok(&PgType::Array(Box::new(PgType::Int8)), &text),
                int4_array(&[(rows as u32, 1), (cols as u32, 1)], elements)
            );
        }

        #[test]
        fn text_arrays_round_trip(elements in proptest::collection::vec(
            proptest::option::of(prop_oneof![
                "[a-zA-Z ,{}\"\\\\\t\n]{0,8}",
                Just("NULL".to_owned()),
                Just("null".to_owned()),
                any::<String>(),
            ]),
            1..10,
        )) {
            let text = pg_array(&elements);
            let expected = int4_array(
                &[(elements.len() as u32, 1)],
                elements.iter().map(|e| e.clone().map_or(Value::Null, Value::Text)).collect(),
            );
            prop_assert_eq!(ok(&PgType::Array(Box::new(PgType::Text)), &text), expected);
        }

        #[test]
        fn bytea_round_trips(bytes: Vec<u8>) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            prop_assert_eq!(ok(&PgType::Bytea, &format!("\\x{hex}")), Value::Bytea(bytes.clone()));
            prop_assert_eq!(
                ok(&PgType::Bytea, &format!("\\x{}", hex.to_uppercase())),
                Value::Bytea(bytes.clone())
            );
            prop_assert_eq!(ok(&PgType::Bytea, &pg_bytea_escape(&bytes)), Value::Bytea(bytes.clone()));
        }

        #[test]
        fn uuids_round_trip(bytes: [u8; 16]) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let canonical = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]
            );
            prop_assert_eq!(ok(&PgType::Uuid, &canonical), Value::Uuid(bytes));
            prop_assert_eq!(ok(&PgType::Uuid, &hex.to_uppercase()), Value::Uuid(bytes));
        }

        #[test]
        fn parse_never_panics(raw: Vec<u8>) {
            for ty in all_types() {
                let _ = parse(&ty, &raw);
            }
        }

        #[test]
        fn parse_never_panics_on_near_misses(raw in "[-+0-9:. TPYMWDHSBCx{}\\[\\]=\",\\\\NUL]{0,40}") {
            for ty in all_types() {
                let _ = parse(&ty, raw.as_bytes());
            }
        }
    }
}
