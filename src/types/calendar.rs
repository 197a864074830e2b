//! Calendar arithmetic for Postgres dates and times, and their ISO 8601 text forms.
//!
//! Data flow: the text parser ([`super::text`]) turns `YYYY-MM-DD` fields into day numbers with
//! [`days_from_civil`]; the binary parser shifts Postgres' 2000-based epoch to 1970 with
//! [`UNIX_EPOCH_PG_DAYS`] / [`UNIX_EPOCH_PG_MICROS`]; `slotlake tail` ([`super::json`]) prints
//! values with the `format_*` functions.
//!
//! Everything is pure integer arithmetic on the proleptic Gregorian calendar with astronomical
//! year numbering (year 0 is 1 BC, year -1 is 2 BC), like Postgres. There is no time zone
//! database: slotlake runs its sessions with `TimeZone=UTC`, so every offset it sees is explicit.
//! The day/civil conversions are Howard Hinnant's era-based algorithms, computed in `i128` so they
//! are total (no overflow, no panic) for every input.

use std::fmt::Write as _;

use super::Infinite;

/// Days from 1970-01-01 (Unix epoch) to 2000-01-01 (Postgres epoch).
pub const UNIX_EPOCH_PG_DAYS: i32 = 10957;
/// Microseconds from 1970-01-01 00:00:00 to 2000-01-01 00:00:00.
pub const UNIX_EPOCH_PG_MICROS: i64 = 946_684_800_000_000;

pub const MICROS_PER_SECOND: i64 = 1_000_000;
pub const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
pub const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
pub const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// The first date Postgres accepts, 4714-11-24 BC (Julian day 0), in days since 1970-01-01.
pub const MIN_DATE_DAYS: i32 = -2_440_588;
/// The last date Postgres accepts, 5874897-12-31, in days since 1970-01-01.
pub const MAX_DATE_DAYS: i32 = 2_145_042_905;
/// The first timestamp Postgres accepts, 4714-11-24 00:00:00 BC, in µs since 1970-01-01.
///
/// Postgres' last timestamp, 294276-12-31 23:59:59.999999, does not fit in `i64` µs since 1970
/// (the 1970 epoch is 30 years before Postgres' own); the largest representable one is
/// `i64::MAX` µs, 294247-01-10 04:00:54.775807. Later timestamps are out of range for slotlake.
pub const MIN_TIMESTAMP_MICROS: i64 = MIN_DATE_DAYS as i64 * MICROS_PER_DAY;

/// Whether an astronomical year is a leap year (year 0 = 1 BC is one).
pub fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// The number of days in `month` (1..=12) of `year`; 0 for a month outside 1..=12.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `year-month-day` (astronomical year).
///
/// Meant for valid dates (month 1..=12, day 1..=`days_in_month`); other fields are not rejected
/// but give an unspecified day. Results beyond `i64` saturate; it never panics.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    if year.unsigned_abs() < 1 << 40 && month <= 12 && day <= 31 {
        // In 64 bits: no step can overflow for such years, and 128-bit divisions (library
        // calls) were two fifths of parsing a timestamp's text.
        let (m, d) = (i64::from(month), i64::from(day));
        let y = year - i64::from(month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return era * 146_097 + doe - 719_468;
    }
    days_from_civil_wide(year, month, day)
}

/// [`days_from_civil`] in 128 bits, for any fields.
fn days_from_civil_wide(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i128::from(month), i128::from(day));
    // Count years from March so the leap day is the last day of the year.
    let y = i128::from(year) - i128::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    let days = era * 146_097 + doe - 719_468;
    i64::try_from(days).unwrap_or(if days < 0 { i64::MIN } else { i64::MAX })
}

/// The proleptic Gregorian `(year, month, day)` (astronomical year) of a day number counted
/// from 1970-01-01. Total over `i64`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = i128::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i128::from(month <= 2);
    // |year| < 2^63 / 365, and month/day are small: the conversions cannot fail.
    (
        i64::try_from(year).unwrap_or_default(),
        u32::try_from(month).unwrap_or_default(),
        u32::try_from(day).unwrap_or_default(),
    )
}

/// `date` as `YYYY-MM-DD` (at least 4 year digits), BC dates as Postgres prints them
/// (`0044-03-15 BC`), and `infinity` / `-infinity`.
pub fn format_date(date: Infinite<i32>) -> String {
    match date {
        Infinite::NegInfinity => "-infinity".to_owned(),
        Infinite::PosInfinity => "infinity".to_owned(),
        Infinite::Finite(days) => {
            let mut out = String::with_capacity(16);
            let bc = push_ymd(&mut out, i64::from(days));
            if bc {
                out.push_str(" BC");
            }
            out
        }
    }
}

/// `timestamp` / `timestamptz` (µs since 1970-01-01 [UTC]) as ISO 8601
/// `YYYY-MM-DDTHH:MM:SS[.ffffff]`, the fraction only when non-zero and without trailing zeros;
/// `Z` after the time when `tz`; ` BC` last for BC dates (`0044-03-15T12:00:00Z BC`);
/// `infinity` / `-infinity`.
pub fn format_timestamp(ts: Infinite<i64>, tz: bool) -> String {
    match ts {
        Infinite::NegInfinity => "-infinity".to_owned(),
        Infinite::PosInfinity => "infinity".to_owned(),
        Infinite::Finite(micros) => {
            let mut out = String::with_capacity(32);
            let days = micros.div_euclid(MICROS_PER_DAY);
            let time = micros.rem_euclid(MICROS_PER_DAY);
            let bc = push_ymd(&mut out, days);
            out.push('T');
            push_time(&mut out, time.unsigned_abs());
            if tz {
                out.push('Z');
            }
            if bc {
                out.push_str(" BC");
            }
            out
        }
    }
}

/// `time` (µs since midnight) as `HH:MM:SS[.ffffff]`; 24:00:00 prints as such. Values outside
/// a day (which Postgres never produces) print with more hours or a leading `-`.
pub fn format_time(micros: i64) -> String {
    let mut out = String::with_capacity(16);
    if micros < 0 {
        out.push('-');
    }
    push_time(&mut out, micros.unsigned_abs());
    out
}

/// `timetz` as `HH:MM:SS[.ffffff]±HH:MM[:SS]` (`offset_seconds` east-positive; seconds only when
/// non-zero; `+00:00` for UTC).
pub fn format_timetz(micros: i64, offset_seconds: i32) -> String {
    let mut out = format_time(micros);
    let sign = if offset_seconds < 0 { '-' } else { '+' };
    let abs = offset_seconds.unsigned_abs();
    let (h, m, s) = (abs / 3600, abs / 60 % 60, abs % 60);
    let _ = write!(out, "{sign}{h:02}:{m:02}");
    if s != 0 {
        let _ = write!(out, ":{s:02}");
    }
    out
}

/// `interval` exactly as Postgres prints it with `IntervalStyle = iso_8601`: `PT0S` for zero,
/// otherwise `P[nY][nM][nD][T[nH][nM][n[.f]S]]` with each non-zero field carrying its own sign
/// (`P-1Y-2M3DT-4H-5M-6.5S`). Postgres 17's infinite intervals (all fields at their maximum or
/// minimum) print as `infinity` / `-infinity`.
pub fn format_interval(months: i32, days: i32, micros: i64) -> String {
    if (months, days, micros) == (i32::MAX, i32::MAX, i64::MAX) {
        return "infinity".to_owned();
    }
    if (months, days, micros) == (i32::MIN, i32::MIN, i64::MIN) {
        return "-infinity".to_owned();
    }
    // Postgres' interval2itm: C division truncates toward zero, as Rust's does.
    let (year, month) = (months / 12, months % 12);
    let hour = micros / MICROS_PER_HOUR;
    let rest = micros % MICROS_PER_HOUR;
    let minute = rest / MICROS_PER_MINUTE;
    let rest = rest % MICROS_PER_MINUTE;
    let second = rest / MICROS_PER_SECOND;
    let fraction = rest % MICROS_PER_SECOND;

    if year == 0 && month == 0 && days == 0 && micros == 0 {
        return "PT0S".to_owned();
    }
    let mut out = String::with_capacity(24);
    out.push('P');
    let part = |out: &mut String, value: i64, unit: char| {
        if value != 0 {
            let _ = write!(out, "{value}{unit}");
        }
    };
    part(&mut out, year.into(), 'Y');
    part(&mut out, month.into(), 'M');
    part(&mut out, days.into(), 'D');
    if micros != 0 {
        out.push('T');
    }
    part(&mut out, hour, 'H');
    part(&mut out, minute, 'M');
    if second != 0 || fraction != 0 {
        if second < 0 || fraction < 0 {
            out.push('-');
        }
        let _ = write!(out, "{}", second.unsigned_abs());
        push_fraction(&mut out, fraction.unsigned_abs());
        out.push('S');
    }
    out
}

/// Appends `YYYY-MM-DD` (year of at least 4 digits, BC years as `1 - year`); returns whether the
/// date is BC.
fn push_ymd(out: &mut String, days: i64) -> bool {
    let (year, month, day) = civil_from_days(days);
    let bc = year <= 0;
    let shown = if bc {
        1i128 - i128::from(year)
    } else {
        year.into()
    };
    let _ = write!(out, "{shown:04}-{month:02}-{day:02}");
    bc
}

/// Appends `HH:MM:SS[.ffffff]` for a non-negative count of µs.
fn push_time(out: &mut String, micros: u64) {
    const US_PER_SEC: u64 = MICROS_PER_SECOND.unsigned_abs();
    let secs = micros / US_PER_SEC;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let _ = write!(out, "{h:02}:{m:02}:{s:02}");
    push_fraction(out, micros % US_PER_SEC);
}

/// Appends `.ffffff` without trailing zeros for a non-zero fraction of a second (µs), like
/// Postgres' `AppendSeconds`; nothing for zero.
fn push_fraction(out: &mut String, micros: u64) {
    if micros == 0 {
        return;
    }
    let mut value = micros;
    let mut width = 6;
    while value.is_multiple_of(10) {
        value /= 10;
        width -= 1;
    }
    let _ = write!(out, ".{value:0width$}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epochs_agree_with_the_calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), i64::from(UNIX_EPOCH_PG_DAYS));
        assert_eq!(
            i64::from(UNIX_EPOCH_PG_DAYS) * MICROS_PER_DAY,
            UNIX_EPOCH_PG_MICROS
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn postgres_range_limits() {
        // Julian day 0 is 4714-11-24 BC = astronomical -4713-11-24.
        assert_eq!(days_from_civil(-4713, 11, 24), i64::from(MIN_DATE_DAYS));
        assert_eq!(days_from_civil(5_874_897, 12, 31), i64::from(MAX_DATE_DAYS));
        // Postgres: END_DATE = 2147483494 Julian days (exclusive), epoch J2451545.
        assert_eq!(
            i64::from(MAX_DATE_DAYS) + 1,
            2_147_483_494 - 2_451_545 + i64::from(UNIX_EPOCH_PG_DAYS)
        );
        // Postgres' MIN_TIMESTAMP is -211813488000000000 µs from 2000.
        assert_eq!(
            MIN_TIMESTAMP_MICROS,
            -211_813_488_000_000_000 + UNIX_EPOCH_PG_MICROS
        );
        let max_day = i64::MAX.div_euclid(MICROS_PER_DAY);
        assert_eq!(civil_from_days(max_day), (294_247, 1, 10));
    }

    #[test]
    fn leap_years_follow_the_gregorian_rule() {
        assert!(is_leap_year(2000));
        assert!(!is_leap_year(1900));
        assert!(is_leap_year(2024));
        assert!(is_leap_year(0)); // 1 BC
        assert!(is_leap_year(-4)); // 5 BC
        assert!(!is_leap_year(-1));
        assert_eq!(days_in_month(2023, 2), 28);
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2024, 13), 0);
    }

    #[test]
    fn extremes_do_not_panic() {
        let _ = civil_from_days(i64::MIN);
        let _ = civil_from_days(i64::MAX);
        assert_eq!(days_from_civil(i64::MAX, 12, 31), i64::MAX);
        assert_eq!(days_from_civil(i64::MIN, 1, 1), i64::MIN);
        let _ = days_from_civil(0, 0, 0);
        let _ = format_timestamp(Infinite::Finite(i64::MIN), true);
        let _ = format_timestamp(Infinite::Finite(i64::MAX), true);
        let _ = format_time(i64::MIN);
        let _ = format_timetz(i64::MAX, i32::MIN);
        let _ = format_interval(i32::MIN, 0, i64::MIN);
    }

    #[test]
    fn formats_dates_like_postgres() {
        assert_eq!(format_date(Infinite::Finite(0)), "1970-01-01");
        let ides = days_from_civil(-43, 3, 15) as i32; // 44 BC
        assert_eq!(format_date(Infinite::Finite(ides)), "0044-03-15 BC");
        let y1bc = days_from_civil(0, 12, 31) as i32;
        assert_eq!(format_date(Infinite::Finite(y1bc)), "0001-12-31 BC");
        assert_eq!(format_date(Infinite::Finite(y1bc + 1)), "0001-01-01");
        let y10k = days_from_civil(10_000, 1, 1) as i32;
        assert_eq!(format_date(Infinite::Finite(y10k)), "10000-01-01");
        assert_eq!(
            format_date(Infinite::Finite(MIN_DATE_DAYS)),
            "4714-11-24 BC"
        );
        assert_eq!(
            format_date(Infinite::Finite(MAX_DATE_DAYS)),
            "5874897-12-31"
        );
        assert_eq!(format_date(Infinite::PosInfinity), "infinity");
        assert_eq!(format_date(Infinite::NegInfinity), "-infinity");
    }

    #[test]
    fn formats_timestamps_as_iso_8601() {
        assert_eq!(
            format_timestamp(Infinite::Finite(0), false),
            "1970-01-01T00:00:00"
        );
        assert_eq!(
            format_timestamp(Infinite::Finite(UNIX_EPOCH_PG_MICROS + 500_000), true),
            "2000-01-01T00:00:00.5Z"
        );
        assert_eq!(
            format_timestamp(Infinite::Finite(-1), false),
            "1969-12-31T23:59:59.999999"
        );
        let bc = days_from_civil(-43, 3, 15) * MICROS_PER_DAY + 12 * MICROS_PER_HOUR + 1_230;
        assert_eq!(
            format_timestamp(Infinite::Finite(bc), true),
            "0044-03-15T12:00:00.00123Z BC"
        );
        assert_eq!(
            format_timestamp(Infinite::Finite(i64::MAX), false),
            "294247-01-10T04:00:54.775807"
        );
        assert_eq!(format_timestamp(Infinite::PosInfinity, true), "infinity");
        assert_eq!(format_timestamp(Infinite::NegInfinity, false), "-infinity");
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_time(0), "00:00:00");
        assert_eq!(format_time(MICROS_PER_DAY), "24:00:00");
        assert_eq!(
            format_time(13 * MICROS_PER_HOUR + 5 * MICROS_PER_MINUTE + 7_000_010),
            "13:05:07.00001"
        );
        assert_eq!(format_timetz(12 * MICROS_PER_HOUR, 7200), "12:00:00+02:00");
        assert_eq!(format_timetz(0, 0), "00:00:00+00:00");
        assert_eq!(
            format_timetz(1, -(5 * 3600 + 30 * 60)),
            "00:00:00.000001-05:30"
        );
        assert_eq!(
            format_timetz(0, 5 * 3600 + 17 * 60 + 32),
            "00:00:00+05:17:32"
        );
    }

    #[test]
    fn formats_intervals_like_postgres_iso_8601() {
        let t = |h: i64, m: i64, s: i64, us: i64| {
            h * MICROS_PER_HOUR + m * MICROS_PER_MINUTE + s * MICROS_PER_SECOND + us
        };
        assert_eq!(format_interval(0, 0, 0), "PT0S");
        assert_eq!(
            format_interval(14, 3, t(4, 5, 6, 789_000)),
            "P1Y2M3DT4H5M6.789S"
        );
        assert_eq!(
            format_interval(-14, 3, -t(4, 5, 6, 500_000)),
            "P-1Y-2M3DT-4H-5M-6.5S"
        );
        assert_eq!(format_interval(0, 0, -500_000), "PT-0.5S");
        assert_eq!(format_interval(12, 0, 0), "P1Y");
        assert_eq!(format_interval(1, 0, 0), "P1M");
        assert_eq!(format_interval(0, -7, 0), "P-7D");
        assert_eq!(format_interval(0, 0, t(0, 1, 0, 0)), "PT1M");
        assert_eq!(format_interval(0, 0, t(100, 0, 0, 1)), "PT100H0.000001S");
        assert_eq!(
            format_interval(0, 0, i64::MIN + 1),
            "PT-2562047788H-54.775807S"
        );
        assert_eq!(format_interval(i32::MAX, i32::MAX, i64::MAX), "infinity");
        assert_eq!(format_interval(i32::MIN, i32::MIN, i64::MIN), "-infinity");
    }

    proptest! {
        #[test]
        fn the_64_bit_day_count_is_the_128_bit_one(
            year in -(1i64 << 40) + 1..(1i64 << 40),
            month in 0u32..=12,
            day in 0u32..=31,
        ) {
            prop_assert_eq!(days_from_civil(year, month, day), days_from_civil_wide(year, month, day));
        }

        #[test]
        fn civil_round_trips(year in -5_000_000i64..=6_000_000, month in 1u32..=12, day in 1u32..=31) {
            let day = day.min(days_in_month(year, month));
            prop_assert_eq!(civil_from_days(days_from_civil(year, month, day)), (year, month, day));
        }

        #[test]
        fn days_round_trip(days in proptest::num::i64::ANY) {
            let (y, m, d) = civil_from_days(days / 512);
            prop_assert!((1..=12).contains(&m));
            prop_assert!(d >= 1 && d <= days_in_month(y, m));
            prop_assert_eq!(days_from_civil(y, m, d), days / 512);
        }

        #[test]
        fn consecutive_days_are_consecutive_dates(days in -3_000_000i64..3_000_000_000) {
            let (y, m, d) = civil_from_days(days);
            let next = civil_from_days(days + 1);
            let expected = if d < days_in_month(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            prop_assert_eq!(next, expected);
        }
    }
}
