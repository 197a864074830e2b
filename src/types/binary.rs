//! Parsing of Postgres binary (`typsend`) value forms into [`Value`].
//!
//! Data flow: with the pgoutput `binary` option, tuple columns arrive as `b` values holding
//! each type's `typsend` output; [`parse`] turns those bytes plus the column's [`PgType`] into
//! the same [`Value`] that [`super::text::parse`] produces for the text form of the same datum,
//! so the rest of the pipeline never knows which form was on the wire. The binary form is
//! cheaper (no decimal parsing for numbers and timestamps), but it is still network data:
//! every length is checked exactly, nothing panics, and errors describe what was wrong without
//! echoing the bytes.
//!
//! `numeric` is the one type whose binary form must be re-printed: the base-10000 digits are
//! formatted exactly as `numeric_out` would (same digits, display scale, no negative zero).

use super::{ArrayDim, ArrayValue, Infinite, Numeric, PgType, Value, ValueError};

/// Days from 1970-01-01 to 2000-01-01 (the Postgres epoch).
pub(crate) const UNIX_TO_PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
pub(crate) const UNIX_TO_PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// `USECS_PER_DAY`: `time` allows 24:00:00.
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// `TZDISP_LIMIT`: time zone displacement limit of `timetz`, in seconds.
const TZ_LIMIT_SECONDS: i32 = 16 * 3600;
/// `MAXDIM`: most dimensions an array may have.
const MAX_ARRAY_DIMS: usize = 6;
/// `MaxArraySize`: most elements an array may have.
const MAX_ARRAY_ELEMENTS: u64 = 0x7FF_FFFF;

/// `numeric` sign words.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// `NUMERIC_DSCALE_MASK`: bits a display scale may use.
const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;
/// `NBASE`: numeric digits are base 10000.
const NUMERIC_BASE: u16 = 10_000;

/// Parses the binary form of one non-null value of type `ty`.
pub fn parse(ty: &PgType, raw: &[u8]) -> Result<Value, ValueError> {
    Ok(match ty {
        PgType::Bool => match fixed::<1>(ty, raw)? {
            [0] => Value::Bool(false),
            [1] => Value::Bool(true),
            _ => return Err(invalid(ty, "bool byte is neither 0 nor 1")),
        },
        PgType::Int2 => Value::Int2(i16::from_be_bytes(fixed(ty, raw)?)),
        PgType::Int4 => Value::Int4(i32::from_be_bytes(fixed(ty, raw)?)),
        PgType::Int8 => Value::Int8(i64::from_be_bytes(fixed(ty, raw)?)),
        PgType::Oid => Value::Oid(u32::from_be_bytes(fixed(ty, raw)?)),
        PgType::Float4 => Value::Float4(f32::from_be_bytes(fixed(ty, raw)?)),
        PgType::Float8 => Value::Float8(f64::from_be_bytes(fixed(ty, raw)?)),
        PgType::Numeric { .. } => Value::Numeric(numeric(ty, raw)?),
        PgType::Text => Value::Text(text(ty, raw)?),
        PgType::Bytea => Value::Bytea(raw.to_vec()),
        PgType::Uuid => Value::Uuid(fixed(ty, raw)?),
        PgType::Date => Value::Date(match i32::from_be_bytes(fixed(ty, raw)?) {
            i32::MAX => Infinite::PosInfinity,
            i32::MIN => Infinite::NegInfinity,
            days => Infinite::Finite(
                days.checked_add(UNIX_TO_PG_EPOCH_DAYS)
                    .ok_or_else(|| out_of_range(ty, "date beyond the Date32 range"))?,
            ),
        }),
        PgType::Timestamp => Value::Timestamp(timestamp(ty, raw)?),
        PgType::TimestampTz => Value::TimestampTz(timestamp(ty, raw)?),
        PgType::Time => Value::Time(time_of_day(ty, i64::from_be_bytes(fixed(ty, raw)?))?),
        PgType::TimeTz => {
            let [t0, t1, t2, t3, t4, t5, t6, t7, z0, z1, z2, z3] = fixed(ty, raw)?;
            let micros = time_of_day(ty, i64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]))?;
            // Postgres stores the zone in seconds west of UTC; Value wants east positive.
            let zone = i32::from_be_bytes([z0, z1, z2, z3]);
            if !(-TZ_LIMIT_SECONDS..=TZ_LIMIT_SECONDS).contains(&zone) {
                return Err(invalid(ty, "time zone displacement out of range"));
            }
            Value::TimeTz {
                micros,
                offset_seconds: -zone,
            }
        }
        PgType::Interval => {
            let [t0, t1, t2, t3, t4, t5, t6, t7, d0, d1, d2, d3, m0, m1, m2, m3] = fixed(ty, raw)?;
            Value::Interval {
                micros: i64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]),
                days: i32::from_be_bytes([d0, d1, d2, d3]),
                months: i32::from_be_bytes([m0, m1, m2, m3]),
            }
        }
        PgType::Json => Value::Json(utf8(ty, raw)?),
        PgType::Jsonb => match raw.split_first() {
            Some((1, json)) => Value::Json(utf8(ty, json)?),
            Some((_, _)) => return Err(invalid(ty, "unsupported jsonb version")),
            None => return Err(invalid(ty, "missing jsonb version byte")),
        },
        PgType::Enum { .. } => Value::Enum(utf8(ty, raw)?),
        PgType::Array(element) => Value::Array(array(ty, element, raw)?),
        PgType::Unknown { .. } => {
            return Err(ValueError::BinaryUnsupported {
                type_name: ty.name(),
            })
        }
    })
}

fn invalid(ty: &PgType, reason: impl Into<String>) -> ValueError {
    ValueError::Invalid {
        form: "binary",
        type_name: ty.name(),
        reason: reason.into(),
    }
}

fn out_of_range(ty: &PgType, reason: &str) -> ValueError {
    ValueError::OutOfRange {
        type_name: ty.name(),
        reason: reason.into(),
    }
}

/// The value as exactly `N` bytes.
fn fixed<const N: usize>(ty: &PgType, raw: &[u8]) -> Result<[u8; N], ValueError> {
    <[u8; N]>::try_from(raw)
        .map_err(|_| invalid(ty, format!("expected {N} bytes, got {}", raw.len())))
}

fn utf8(ty: &PgType, raw: &[u8]) -> Result<String, ValueError> {
    match std::str::from_utf8(raw) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => Err(invalid(
            ty,
            format!("invalid UTF-8 after {} bytes", e.valid_up_to()),
        )),
    }
}

/// text, varchar, bpchar, name and `"char"`. `"char"` sends one raw byte that need not be
/// UTF-8; its text form prints NUL as the empty string and bytes ≥ 0x80 as `\ooo` octal.
/// Neither can be a whole text value in a UTF-8 database, so they are recognised by shape.
fn text(ty: &PgType, raw: &[u8]) -> Result<String, ValueError> {
    match raw {
        [0] => Ok(String::new()),
        &[b] if b >= 0x80 => Ok(format!("\\{b:03o}")),
        _ => utf8(ty, raw),
    }
}

fn timestamp(ty: &PgType, raw: &[u8]) -> Result<Infinite<i64>, ValueError> {
    Ok(match i64::from_be_bytes(fixed(ty, raw)?) {
        i64::MAX => Infinite::PosInfinity,
        i64::MIN => Infinite::NegInfinity,
        micros => Infinite::Finite(
            micros
                .checked_add(UNIX_TO_PG_EPOCH_MICROS)
                .ok_or_else(|| out_of_range(ty, "timestamp beyond the 64-bit microsecond range"))?,
        ),
    })
}

fn time_of_day(ty: &PgType, micros: i64) -> Result<i64, ValueError> {
    if (0..=MICROS_PER_DAY).contains(&micros) {
        Ok(micros)
    } else {
        Err(invalid(ty, "time of day out of range"))
    }
}

/// `numeric_send`: i16 ndigits, i16 weight, u16 sign, u16 dscale, ndigits × i16 base-10000
/// digits, the first having weight `weight` (value = Σ digit[i] · 10000^(weight − i)).
fn numeric(ty: &PgType, raw: &[u8]) -> Result<Numeric, ValueError> {
    let Some((header, digits)) = raw.split_first_chunk::<8>() else {
        return Err(invalid(
            ty,
            format!("expected at least 8 header bytes, got {}", raw.len()),
        ));
    };
    let [n0, n1, w0, w1, s0, s1, d0, d1] = *header;
    let ndigits = i16::from_be_bytes([n0, n1]);
    let weight = i16::from_be_bytes([w0, w1]);
    let sign = u16::from_be_bytes([s0, s1]);
    let dscale = u16::from_be_bytes([d0, d1]);
    let Ok(ndigits) = usize::try_from(ndigits) else {
        return Err(invalid(ty, "negative digit count"));
    };
    if digits.len() != ndigits * 2 {
        return Err(invalid(
            ty,
            format!(
                "{ndigits} digits need {} bytes after the header, got {}",
                ndigits * 2,
                digits.len()
            ),
        ));
    }
    let negative = match sign {
        NUMERIC_POS => false,
        NUMERIC_NEG => true,
        // numeric_recv ignores the digits of special values.
        NUMERIC_NAN => return Ok(Numeric::NaN),
        NUMERIC_PINF => return Ok(Numeric::PosInfinity),
        NUMERIC_NINF => return Ok(Numeric::NegInfinity),
        _ => return Err(invalid(ty, "invalid sign word")),
    };
    if dscale & NUMERIC_DSCALE_MASK != dscale {
        return Err(invalid(ty, "invalid display scale"));
    }
    let (pairs, _) = digits.as_chunks::<2>();
    if pairs
        .iter()
        .any(|&pair| u16::from_be_bytes(pair) >= NUMERIC_BASE)
    {
        return Err(invalid(ty, "digit outside 0..9999"));
    }
    Ok(Numeric::Finite(numeric_text(
        negative, weight, dscale, pairs,
    )))
}

/// The binary form of a finite numeric as a decimal of `scale` fraction digits and at most
/// `precision` digits in all, the way [`parse`] followed by the decimal column's parser of the
/// printed text would take it (fraction digits past `dscale` dropped, none past `scale`
/// allowed), without printing it. `None` for anything else — malformed, `NaN`, infinite, a
/// display scale above `scale`, too many digits, a negative `scale` — which the caller hands
/// to that slower way for the stand-in or the error.
pub(crate) fn numeric_scaled(raw: &[u8], precision: u8, scale: i8) -> Option<i128> {
    let (header, digits) = raw.split_first_chunk::<8>()?;
    let [n0, n1, w0, w1, s0, s1, d0, d1] = *header;
    let ndigits = usize::try_from(i16::from_be_bytes([n0, n1])).ok()?;
    let weight = i32::from(i16::from_be_bytes([w0, w1]));
    let negative = match u16::from_be_bytes([s0, s1]) {
        NUMERIC_POS => false,
        NUMERIC_NEG => true,
        _ => return None,
    };
    let dscale = u16::from_be_bytes([d0, d1]);
    let scale = u16::try_from(scale).ok()?;
    if digits.len() != ndigits * 2 || dscale & NUMERIC_DSCALE_MASK != dscale || dscale > scale {
        return None;
    }
    // Up to 18 digits, 64-bit arithmetic is enough (and cheaper); an overflow means more digits
    // than `precision` allows, which the typed way reports.
    let pairs = digits.as_chunks::<2>().0;
    let value = if precision <= 18 {
        u128::from(scaled_sum::<u64>(pairs, weight, dscale, scale)?)
    } else {
        scaled_sum::<u128>(pairs, weight, dscale, scale)?
    };
    if value >= POW10_U128.get(usize::from(precision)).copied()? {
        return None;
    }
    let value = i128::try_from(value).ok()?;
    Some(if negative { -value } else { value })
}

/// Unsigned integers [`scaled_sum`] adds digits in.
trait Accumulator: Copy + From<u16> + 'static {
    /// 10^0, 10^1, … as far as the type holds.
    const POW10: &'static [Self];
    const ZERO: Self;
    fn checked_mul(self, other: Self) -> Option<Self>;
    fn checked_add(self, other: Self) -> Option<Self>;
}

impl Accumulator for u64 {
    const POW10: &'static [u64] = &POW10_U64;
    const ZERO: u64 = 0;
    fn checked_mul(self, other: u64) -> Option<u64> {
        u64::checked_mul(self, other)
    }
    fn checked_add(self, other: u64) -> Option<u64> {
        u64::checked_add(self, other)
    }
}

impl Accumulator for u128 {
    const POW10: &'static [u128] = &POW10_U128;
    const ZERO: u128 = 0;
    fn checked_mul(self, other: u128) -> Option<u128> {
        u128::checked_mul(self, other)
    }
    fn checked_add(self, other: u128) -> Option<u128> {
        u128::checked_add(self, other)
    }
}

/// Σ digit[i] · 10^(4·(weight − i) + dscale), each term cut to whole units, then scaled from
/// `dscale` to `scale` fraction digits: only the group straddling the last kept fraction digit
/// loses digits, and what all the groups after it add up to is below one unit, so this is the
/// truncated value. `None` on a digit outside 0..9999 or when `T` overflows.
fn scaled_sum<T: Accumulator>(
    pairs: &[[u8; 2]],
    weight: i32,
    dscale: u16,
    scale: u16,
) -> Option<T> {
    let mut value = T::ZERO;
    let mut exponent = 4 * weight + i32::from(dscale);
    for &pair in pairs {
        let digit = u16::from_be_bytes(pair);
        if digit >= NUMERIC_BASE {
            return None;
        }
        let term = match exponent {
            _ if digit == 0 => T::ZERO,
            0..=i32::MAX => T::from(digit).checked_mul(*T::POW10.get(exponent as usize)?)?,
            -3..=-1 => T::from(digit / POW10_U16[exponent.unsigned_abs() as usize]),
            _ => T::ZERO, // wholly past the kept digits (the rest are still checked)
        };
        value = value.checked_add(term)?;
        exponent -= 4;
    }
    if scale > dscale {
        value = value.checked_mul(*T::POW10.get(usize::from(scale - dscale))?)?;
    }
    Some(value)
}

/// 10^0 ..= 10^19.
const POW10_U64: [u64; 20] = {
    let mut t = [1u64; 20];
    let mut i = 1;
    while i < 20 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};
/// 10^0 ..= 10^38.
const POW10_U128: [u128; 39] = {
    let mut t = [1u128; 39];
    let mut i = 1;
    while i < 39 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};
const POW10_U16: [u16; 4] = [1, 10, 100, 1000];

/// Prints a finite numeric like `numeric_out`: `-` for negative non-zero values, the integer
/// part without leading zeros (`0` when there is none), then — when `dscale` > 0 — a point
/// and exactly `dscale` fraction digits. Digits beyond `dscale` are dropped (numeric_recv
/// truncates them), and a value whose printed digits are all zero is not negative.
fn numeric_text(negative: bool, weight: i16, dscale: u16, digits: &[[u8; 2]]) -> String {
    let weight = i32::from(weight);
    let dscale = usize::from(dscale);
    let digit = |index: i32| -> u16 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i))
            .map_or(0, |&pair| u16::from_be_bytes(pair))
    };
    let integer_groups = usize::try_from(weight.saturating_add(1)).unwrap_or(0);
    let mut out = String::with_capacity(2 + integer_groups * 4 + dscale);
    if negative {
        out.push('-');
    }
    let mut nonzero = false;
    for index in 0..=weight {
        let group = digit(index);
        if nonzero {
            push_group(&mut out, group, 4);
        } else if group != 0 {
            // The first printed group has no leading zeros.
            nonzero = true;
            let width = match group {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                _ => 4,
            };
            push_group_tail(&mut out, group, width);
        }
    }
    if !nonzero {
        out.push('0');
    }
    if dscale > 0 {
        out.push('.');
        let mut remaining = dscale;
        let mut index = weight.saturating_add(1);
        while remaining > 0 {
            let take = remaining.min(4);
            let group = digit(index);
            // Only the printed (leading `take`) decimal digits of the group count.
            let printed = match take {
                1 => group / 1000,
                2 => group / 100,
                3 => group / 10,
                _ => group,
            };
            nonzero |= printed != 0;
            push_group(&mut out, group, take);
            remaining -= take;
            index = index.saturating_add(1);
        }
    }
    if negative && !nonzero {
        out.remove(0);
    }
    out
}

/// Pushes the leading `take` (1..=4) decimal digits of a zero-padded 4-digit group.
fn push_group(out: &mut String, group: u16, take: usize) {
    let decimal = group_digits(group);
    for &d in decimal.iter().take(take) {
        out.push(char::from(b'0' + d));
    }
}

/// Pushes the trailing `width` (1..=4) decimal digits of a 4-digit group.
fn push_group_tail(out: &mut String, group: u16, width: usize) {
    let decimal = group_digits(group);
    for &d in decimal.iter().skip(4 - width) {
        out.push(char::from(b'0' + d));
    }
}

fn group_digits(group: u16) -> [u8; 4] {
    // group < 10000, so every quotient digit is < 10 and fits in u8.
    [
        (group / 1000 % 10) as u8,
        (group / 100 % 10) as u8,
        (group / 10 % 10) as u8,
        (group % 10) as u8,
    ]
}

/// `array_send`: i32 ndim, i32 has-null flag, u32 element OID, ndim × (i32 length, i32 lower
/// bound), then each element as i32 length (-1 = NULL) and its bytes, in row-major order.
fn array(ty: &PgType, element: &PgType, raw: &[u8]) -> Result<ArrayValue, ValueError> {
    let mut r = Cursor { ty, rest: raw };
    let ndim = r.i32("dimension count")?;
    let flags = r.i32("flags")?;
    let _element_oid = r.i32("element type OID")?;
    let ndim = usize::try_from(ndim)
        .ok()
        .filter(|&n| n <= MAX_ARRAY_DIMS)
        .ok_or_else(|| invalid(ty, "dimension count outside 0..6"))?;
    if flags != 0 && flags != 1 {
        return Err(invalid(ty, "invalid array flags"));
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut count: u64 = 1;
    for _ in 0..ndim {
        let len = r.i32("dimension length")?;
        let lower_bound = r.i32("dimension lower bound")?;
        let len = u32::try_from(len).map_err(|_| invalid(ty, "negative dimension length"))?;
        if i64::from(lower_bound) + i64::from(len) > i64::from(i32::MAX) {
            return Err(invalid(ty, "upper bound overflows"));
        }
        count = count.saturating_mul(u64::from(len));
        dims.push(ArrayDim { len, lower_bound });
    }
    if count > MAX_ARRAY_ELEMENTS {
        return Err(invalid(ty, "array has more elements than Postgres allows"));
    }
    if ndim == 0 || count == 0 {
        // array_recv returns the empty array for zero dimensions or any zero-length one.
        r.finish()?;
        return Ok(ArrayValue {
            dims: Vec::new(),
            elements: Vec::new(),
        });
    }
    // Each element needs at least its 4-byte length, so the buffer bounds the allocation.
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let mut elements = Vec::with_capacity(count.min(r.rest.len() / 4));
    for _ in 0..count {
        let len = r.i32("element length")?;
        let value = match len {
            -1 => Value::Null,
            _ => {
                let len =
                    usize::try_from(len).map_err(|_| invalid(ty, "negative element length"))?;
                parse(element, r.take(len, "element")?)?
            }
        };
        elements.push(value);
    }
    r.finish()?;
    Ok(ArrayValue { dims, elements })
}

/// A bounds-checked reader for the array form.
struct Cursor<'a> {
    ty: &'a PgType,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ValueError> {
        match self.rest.split_at_checked(n) {
            Some((taken, rest)) => {
                self.rest = rest;
                Ok(taken)
            }
            None => Err(invalid(
                self.ty,
                format!(
                    "truncated reading {what}: needed {n} bytes, {} remaining",
                    self.rest.len()
                ),
            )),
        }
    }

    fn i32(&mut self, what: &str) -> Result<i32, ValueError> {
        let bytes = self.take(4, what)?;
        Ok(<[u8; 4]>::try_from(bytes).map_or(0, i32::from_be_bytes))
    }

    fn finish(&self) -> Result<(), ValueError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(invalid(
                self.ty,
                format!("{} unexpected trailing bytes", self.rest.len()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numeric_ty() -> PgType {
        PgType::Numeric {
            precision_scale: None,
        }
    }

    /// `numeric_send` header and digits.
    fn numeric_bytes(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    /// Test-only encoder: a decimal string (`-?digits(.digits)?`) to its `numeric_send` form,
    /// normalised the way Postgres stores it (no leading or trailing zero groups).
    fn encode_numeric(text: &str) -> Vec<u8> {
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        let dscale = frac.len() as u16;
        let int_pad = (4 - int.len() % 4) % 4;
        let frac_pad = (4 - frac.len() % 4) % 4;
        let all: String = "0".repeat(int_pad) + int + frac + &"0".repeat(frac_pad);
        let mut groups: Vec<u16> = all
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = ((int.len() + int_pad) / 4) as i16 - 1;
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        let sign = if negative && !groups.is_empty() {
            NUMERIC_NEG
        } else {
            NUMERIC_POS
        };
        if groups.is_empty() {
            weight = 0;
        }
        numeric_bytes(weight, sign, dscale, &groups)
    }

    fn num(text: &str) -> Value {
        Value::Numeric(Numeric::Finite(text.into()))
    }

    /// `array_send` of one-dimensional-or-more arrays; `None` elements are NULL.
    fn array_bytes(dims: &[(i32, i32)], elem_oid: u32, elements: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        let has_null = elements.iter().any(Option::is_none) as i32;
        out.extend_from_slice(&has_null.to_be_bytes());
        out.extend_from_slice(&elem_oid.to_be_bytes());
        for (len, lb) in dims {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&lb.to_be_bytes());
        }
        for e in elements {
            match e {
                Some(b) => {
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out
    }

    #[test]
    fn numeric_known_encodings() {
        let ty = numeric_ty();
        let cases: &[(i16, u16, u16, &[u16], &str)] = &[
            (0, NUMERIC_POS, 3, &[12, 5000], "12.500"),
            (-1, NUMERIC_POS, 4, &[1], "0.0001"),
            (1, NUMERIC_NEG, 2, &[123, 4567, 8900], "-1234567.89"),
            (0, NUMERIC_POS, 0, &[], "0"),
            (0, NUMERIC_POS, 2, &[], "0.00"),
            (2, NUMERIC_POS, 0, &[1], "100000000"),
            (0, NUMERIC_POS, 0, &[7], "7"),
            (-2, NUMERIC_NEG, 9, &[12, 3000], "-0.000000123"),
            (1, NUMERIC_POS, 1, &[1, 0, 5000], "10000.5"),
            (0, NUMERIC_POS, 6, &[9999, 9999, 9900], "9999.999999"),
        ];
        for &(weight, sign, dscale, digits, want) in cases {
            assert_eq!(
                parse(&ty, &numeric_bytes(weight, sign, dscale, digits)),
                Ok(num(want)),
                "{want}"
            );
            assert_eq!(
                encode_numeric(want),
                numeric_bytes(weight, sign, dscale, digits),
                "{want}"
            );
        }
    }

    #[test]
    fn numeric_specials_and_negative_zero() {
        let ty = numeric_ty();
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_NAN, 0, &[])),
            Ok(Value::Numeric(Numeric::NaN))
        );
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_PINF, 0, &[])),
            Ok(Value::Numeric(Numeric::PosInfinity))
        );
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_NINF, 0, &[])),
            Ok(Value::Numeric(Numeric::NegInfinity))
        );
        // Never "-0": a negative sign over zero digits, or over digits the scale hides.
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_NEG, 2, &[])),
            Ok(num("0.00"))
        );
        assert_eq!(
            parse(&ty, &numeric_bytes(-1, NUMERIC_NEG, 2, &[1])),
            Ok(num("0.00"))
        );
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_NEG, 0, &[0, 0])),
            Ok(num("0"))
        );
        // Digits beyond dscale are truncated, not rounded.
        assert_eq!(
            parse(&ty, &numeric_bytes(0, NUMERIC_POS, 1, &[1, 9999])),
            Ok(num("1.9"))
        );
        // Leading zero groups (not sent by Postgres) are not printed.
        assert_eq!(
            parse(&ty, &numeric_bytes(1, NUMERIC_NEG, 0, &[0, 42])),
            Ok(num("-42"))
        );
    }

    #[test]
    fn numeric_thousand_digits() {
        let int: String = "9876543210".repeat(60);
        let frac: String = "0123456789".repeat(40);
        let text = format!("-{int}.{frac}");
        assert_eq!(parse(&numeric_ty(), &encode_numeric(&text)), Ok(num(&text)));
        // A large weight with a single digit: 10000^1000.
        let huge = parse(&numeric_ty(), &numeric_bytes(1000, NUMERIC_POS, 0, &[1]));
        assert_eq!(huge, Ok(num(&format!("1{}", "0".repeat(4000)))));
    }

    #[test]
    fn numeric_malformed() {
        let ty = numeric_ty();
        let err = |raw: &[u8]| match parse(&ty, raw) {
            Err(ValueError::Invalid { reason, .. }) => reason,
            other => panic!("unexpected {other:?}"),
        };
        assert!(err(&[0, 0, 0]).contains("header"));
        assert!(err(&numeric_bytes(0, 0x1234, 0, &[1])).contains("sign"));
        assert!(err(&numeric_bytes(0, NUMERIC_POS, 0x4000, &[1])).contains("scale"));
        assert!(err(&numeric_bytes(0, NUMERIC_POS, 0, &[10_000])).contains("digit"));
        let mut short = numeric_bytes(0, NUMERIC_POS, 0, &[1, 2]);
        short.pop();
        assert!(err(&short).contains("digits need"));
        let mut negative = numeric_bytes(0, NUMERIC_POS, 0, &[]);
        negative[0] = 0xff;
        assert!(err(&negative).contains("negative"));
    }

    #[test]
    fn fixed_width_scalars() {
        assert_eq!(parse(&PgType::Bool, &[1]), Ok(Value::Bool(true)));
        assert_eq!(parse(&PgType::Bool, &[0]), Ok(Value::Bool(false)));
        assert!(parse(&PgType::Bool, &[2]).is_err());
        assert_eq!(parse(&PgType::Int2, &[0xff, 0xfe]), Ok(Value::Int2(-2)));
        assert_eq!(
            parse(&PgType::Int4, &0x1234_5678i32.to_be_bytes()),
            Ok(Value::Int4(0x1234_5678))
        );
        assert_eq!(
            parse(&PgType::Int8, &i64::MIN.to_be_bytes()),
            Ok(Value::Int8(i64::MIN))
        );
        assert_eq!(
            parse(&PgType::Oid, &u32::MAX.to_be_bytes()),
            Ok(Value::Oid(u32::MAX))
        );
        assert_eq!(
            parse(&PgType::Float4, &1.5f32.to_be_bytes()),
            Ok(Value::Float4(1.5))
        );
        assert_eq!(
            parse(&PgType::Float8, &f64::NEG_INFINITY.to_be_bytes()),
            Ok(Value::Float8(f64::NEG_INFINITY))
        );
        match parse(&PgType::Float8, &f64::NAN.to_be_bytes()) {
            Ok(Value::Float8(f)) => assert!(f.is_nan()),
            other => panic!("unexpected {other:?}"),
        }
        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(parse(&PgType::Uuid, &uuid), Ok(Value::Uuid(uuid)));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        for (ty, len) in [
            (PgType::Bool, 1),
            (PgType::Int2, 2),
            (PgType::Int4, 4),
            (PgType::Int8, 8),
            (PgType::Oid, 4),
            (PgType::Float4, 4),
            (PgType::Float8, 8),
            (PgType::Uuid, 16),
            (PgType::Date, 4),
            (PgType::Timestamp, 8),
            (PgType::TimestampTz, 8),
            (PgType::Time, 8),
            (PgType::TimeTz, 12),
            (PgType::Interval, 16),
        ] {
            for wrong in [0, len - 1, len + 1] {
                let raw = vec![0u8; wrong];
                match parse(&ty, &raw) {
                    Err(ValueError::Invalid { form, reason, .. }) => {
                        assert_eq!(form, "binary");
                        assert_eq!(reason, format!("expected {len} bytes, got {wrong}"));
                    }
                    other => panic!("{ty} with {wrong} bytes: {other:?}"),
                }
            }
            assert!(parse(&ty, &vec![0u8; len]).is_ok(), "{ty}");
        }
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(
            parse(&PgType::Date, &0i32.to_be_bytes()),
            Ok(Value::Date(Infinite::Finite(10_957)))
        );
        // 1970-01-01 is 10957 days before 2000-01-01.
        assert_eq!(
            parse(&PgType::Date, &(-10_957i32).to_be_bytes()),
            Ok(Value::Date(Infinite::Finite(0)))
        );
        assert_eq!(
            parse(&PgType::Date, &i32::MAX.to_be_bytes()),
            Ok(Value::Date(Infinite::PosInfinity))
        );
        assert_eq!(
            parse(&PgType::Date, &i32::MIN.to_be_bytes()),
            Ok(Value::Date(Infinite::NegInfinity))
        );
        assert!(matches!(
            parse(&PgType::Date, &(i32::MAX - 1).to_be_bytes()),
            Err(ValueError::OutOfRange { .. })
        ));
        assert_eq!(
            parse(&PgType::Timestamp, &0i64.to_be_bytes()),
            Ok(Value::Timestamp(Infinite::Finite(946_684_800_000_000)))
        );
        assert_eq!(
            parse(
                &PgType::TimestampTz,
                &(-946_684_800_000_000i64).to_be_bytes()
            ),
            Ok(Value::TimestampTz(Infinite::Finite(0)))
        );
        assert_eq!(
            parse(&PgType::TimestampTz, &i64::MAX.to_be_bytes()),
            Ok(Value::TimestampTz(Infinite::PosInfinity))
        );
        assert_eq!(
            parse(&PgType::Timestamp, &i64::MIN.to_be_bytes()),
            Ok(Value::Timestamp(Infinite::NegInfinity))
        );
        assert!(matches!(
            parse(&PgType::Timestamp, &(i64::MAX - 1).to_be_bytes()),
            Err(ValueError::OutOfRange { .. })
        ));
    }

    #[test]
    fn times_and_intervals() {
        assert_eq!(
            parse(&PgType::Time, &86_400_000_000i64.to_be_bytes()),
            Ok(Value::Time(86_400_000_000))
        );
        assert!(parse(&PgType::Time, &86_400_000_001i64.to_be_bytes()).is_err());
        assert!(parse(&PgType::Time, &(-1i64).to_be_bytes()).is_err());
        // 12:00:00+02 is sent as zone -7200 (seconds west of UTC).
        let mut timetz = 43_200_000_000i64.to_be_bytes().to_vec();
        timetz.extend_from_slice(&(-7200i32).to_be_bytes());
        assert_eq!(
            parse(&PgType::TimeTz, &timetz),
            Ok(Value::TimeTz {
                micros: 43_200_000_000,
                offset_seconds: 7200
            })
        );
        let mut bad_zone = 0i64.to_be_bytes().to_vec();
        bad_zone.extend_from_slice(&i32::MIN.to_be_bytes());
        assert!(parse(&PgType::TimeTz, &bad_zone).is_err());
        // 1 year 2 mons 3 days 04:05:06.000007
        let mut interval = 14_706_000_007i64.to_be_bytes().to_vec();
        interval.extend_from_slice(&3i32.to_be_bytes());
        interval.extend_from_slice(&14i32.to_be_bytes());
        assert_eq!(
            parse(&PgType::Interval, &interval),
            Ok(Value::Interval {
                months: 14,
                days: 3,
                micros: 14_706_000_007
            })
        );
    }

    #[test]
    fn text_like_types() {
        assert_eq!(
            parse(&PgType::Text, "héllo".as_bytes()),
            Ok(Value::Text("héllo".into()))
        );
        assert_eq!(parse(&PgType::Text, b""), Ok(Value::Text(String::new())));
        // "char" corner cases, printed as char_out does.
        assert_eq!(parse(&PgType::Text, &[0]), Ok(Value::Text(String::new())));
        assert_eq!(
            parse(&PgType::Text, &[0x80]),
            Ok(Value::Text("\\200".into()))
        );
        match parse(&PgType::Text, b"ok\xffsecret") {
            Err(e) => assert!(!e.to_string().contains("secret"), "{e}"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            parse(&PgType::Bytea, &[0, 0xff]),
            Ok(Value::Bytea(vec![0, 0xff]))
        );
        assert_eq!(
            parse(&PgType::Json, br#"{"a": 1}"#),
            Ok(Value::Json(r#"{"a": 1}"#.into()))
        );
        assert_eq!(
            parse(&PgType::Jsonb, b"\x01{\"a\": 1}"),
            Ok(Value::Json(r#"{"a": 1}"#.into()))
        );
        assert!(parse(&PgType::Jsonb, b"\x02{}").is_err());
        assert!(parse(&PgType::Jsonb, b"").is_err());
        assert_eq!(
            parse(&PgType::Enum { oid: 5 }, b"happy"),
            Ok(Value::Enum("happy".into()))
        );
        assert_eq!(
            parse(&PgType::Unknown { oid: 600 }, b"x"),
            Err(ValueError::BinaryUnsupported {
                type_name: "unknown(600)".into()
            })
        );
    }

    #[test]
    fn arrays() {
        let int4s = PgType::Array(Box::new(PgType::Int4));
        let int = |v: i32| Some(v.to_be_bytes().to_vec());
        // '{1,NULL,3}'
        let raw = array_bytes(&[(3, 1)], 23, &[int(1), None, int(3)]);
        assert_eq!(
            parse(&int4s, &raw),
            Ok(Value::Array(ArrayValue {
                dims: vec![ArrayDim {
                    len: 3,
                    lower_bound: 1
                }],
                elements: vec![Value::Int4(1), Value::Null, Value::Int4(3)],
            }))
        );
        // '[0:1][1:3]={{1,2,3},{4,NULL,6}}'
        let raw = array_bytes(
            &[(2, 0), (3, 1)],
            23,
            &[int(1), int(2), int(3), int(4), None, int(6)],
        );
        assert_eq!(
            parse(&int4s, &raw),
            Ok(Value::Array(ArrayValue {
                dims: vec![
                    ArrayDim {
                        len: 2,
                        lower_bound: 0
                    },
                    ArrayDim {
                        len: 3,
                        lower_bound: 1
                    }
                ],
                elements: vec![
                    Value::Int4(1),
                    Value::Int4(2),
                    Value::Int4(3),
                    Value::Int4(4),
                    Value::Null,
                    Value::Int4(6)
                ],
            }))
        );
        // '{}' and a zero-length dimension both give the empty array.
        let empty = Ok(Value::Array(ArrayValue {
            dims: vec![],
            elements: vec![],
        }));
        assert_eq!(parse(&int4s, &array_bytes(&[], 23, &[])), empty);
        assert_eq!(parse(&int4s, &array_bytes(&[(0, 1)], 23, &[])), empty);
        // Numeric and text elements go through their own parsers.
        let numerics = PgType::Array(Box::new(numeric_ty()));
        let raw = array_bytes(&[(1, 1)], 1700, &[Some(encode_numeric("-1.50"))]);
        assert_eq!(
            parse(&numerics, &raw),
            Ok(Value::Array(ArrayValue {
                dims: vec![ArrayDim {
                    len: 1,
                    lower_bound: 1
                }],
                elements: vec![num("-1.50")],
            }))
        );
    }

    #[test]
    fn malformed_arrays() {
        let int4s = PgType::Array(Box::new(PgType::Int4));
        let int = |v: i32| Some(v.to_be_bytes().to_vec());
        let reason = |raw: &[u8]| match parse(&int4s, raw) {
            Err(ValueError::Invalid { reason, .. }) => reason,
            other => panic!("unexpected {other:?}"),
        };
        // Fewer elements than the dimensions promise.
        assert!(reason(&array_bytes(&[(3, 1)], 23, &[int(1), int(2)])).contains("truncated"));
        // More bytes than the dimensions cover.
        assert!(reason(&array_bytes(&[(1, 1)], 23, &[int(1), int(2)])).contains("trailing"));
        assert!(reason(&array_bytes(&[], 23, &[int(1)])).contains("trailing"));
        // An element of the wrong width fails in the element parser.
        assert!(
            reason(&array_bytes(&[(1, 1)], 23, &[Some(vec![0; 3])])).contains("expected 4 bytes")
        );
        assert!(reason(&array_bytes(&[(1, 1); 7], 23, &[int(1)])).contains("dimension count"));
        assert!(reason(&array_bytes(&[(-1, 1)], 23, &[])).contains("negative dimension"));
        assert!(
            reason(&array_bytes(&[(2, i32::MAX)], 23, &[int(1), int(2)])).contains("upper bound")
        );
        assert!(
            reason(&array_bytes(&[(100_000, 1), (100_000, 1)], 23, &[])).contains("more elements")
        );
        let mut bad_flags = array_bytes(&[(1, 1)], 23, &[int(1)]);
        bad_flags[7] = 2;
        assert!(reason(&bad_flags).contains("flags"));
        let mut bad_len = array_bytes(&[(1, 1)], 23, &[int(1)]);
        bad_len[20..24].copy_from_slice(&(-2i32).to_be_bytes());
        assert!(reason(&bad_len).contains("negative element length"));
        assert!(reason(&[0, 0, 0]).contains("truncated"));
    }

    fn any_type() -> impl Strategy<Value = PgType> {
        let scalar = prop_oneof![
            Just(PgType::Bool),
            Just(PgType::Int2),
            Just(PgType::Int4),
            Just(PgType::Int8),
            Just(PgType::Oid),
            Just(PgType::Float4),
            Just(PgType::Float8),
            Just(numeric_ty()),
            Just(PgType::Text),
            Just(PgType::Bytea),
            Just(PgType::Uuid),
            Just(PgType::Date),
            Just(PgType::Timestamp),
            Just(PgType::TimestampTz),
            Just(PgType::Time),
            Just(PgType::TimeTz),
            Just(PgType::Interval),
            Just(PgType::Json),
            Just(PgType::Jsonb),
            Just(PgType::Enum { oid: 1 }),
            Just(PgType::Unknown { oid: 1 }),
        ];
        scalar.prop_recursive(2, 4, 1, |inner| {
            inner.prop_map(|t| PgType::Array(Box::new(t)))
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(ty in any_type(), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let result = parse(&ty, &raw);
            if let PgType::Unknown { .. } = ty {
                let unsupported = matches!(result, Err(ValueError::BinaryUnsupported { .. }));
                prop_assert!(unsupported);
            }
        }

        #[test]
        fn array_parse_never_panics(
            ty in any_type(),
            ndim in 0i32..3,
            dims in proptest::collection::vec((0i32..4, -2i32..3), 0..3),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // A plausible header followed by arbitrary element bytes reaches the element loop.
            let mut raw = Vec::new();
            raw.extend_from_slice(&ndim.to_be_bytes());
            raw.extend_from_slice(&0i32.to_be_bytes());
            raw.extend_from_slice(&0i32.to_be_bytes());
            for (len, lb) in dims {
                raw.extend_from_slice(&len.to_be_bytes());
                raw.extend_from_slice(&lb.to_be_bytes());
            }
            raw.extend_from_slice(&tail);
            let _ = parse(&PgType::Array(Box::new(ty)), &raw);
        }

        #[test]
        fn numeric_round_trips(
            negative in any::<bool>(),
            int in "[0-9]{0,40}",
            frac in "[0-9]{0,40}",
            with_point in any::<bool>(),
        ) {
            let int = if int.is_empty() && (!with_point || frac.is_empty()) { "0".to_string() } else { int };
            let input = match (with_point && !frac.is_empty(), negative) {
                (true, true) => format!("-{int}.{frac}"),
                (true, false) => format!("{int}.{frac}"),
                (false, true) => format!("-{int}"),
                (false, false) => int.clone(),
            };
            // numeric_out: no leading zeros, "0" for no integer part, no sign on zero.
            let frac_out = if with_point { frac.as_str() } else { "" };
            let int_out = int.trim_start_matches('0');
            let int_out = if int_out.is_empty() { "0" } else { int_out };
            let zero = int_out == "0" && frac_out.bytes().all(|b| b == b'0');
            let mut want = String::new();
            if negative && !zero {
                want.push('-');
            }
            want.push_str(int_out);
            if !frac_out.is_empty() {
                want.push('.');
                want.push_str(frac_out);
            }
            prop_assert_eq!(parse(&numeric_ty(), &encode_numeric(&input)), Ok(num(&want)));
        }

        #[test]
        fn int_arrays_round_trip(values in proptest::collection::vec(proptest::option::of(any::<i64>()), 1..20), lb in -5i32..5) {
            let elements: Vec<Option<Vec<u8>>> =
                values.iter().map(|v| v.map(|v| v.to_be_bytes().to_vec())).collect();
            let raw = array_bytes(&[(values.len() as i32, lb)], 20, &elements);
            let want = ArrayValue {
                dims: vec![ArrayDim { len: values.len() as u32, lower_bound: lb }],
                elements: values.iter().map(|v| v.map_or(Value::Null, Value::Int8)).collect(),
            };
            prop_assert_eq!(parse(&PgType::Array(Box::new(PgType::Int8)), &raw), Ok(Value::Array(want)));
        }
    }
}
