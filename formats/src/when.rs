//! Times as a person reads them: a UTC date and how long ago it was.

/// `unix` seconds as the UTC day `YYYY-MM-DD`.
pub fn utc_day(unix: u64) -> String {
    let (y, m, d) = civil_from_days((unix / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `unix` seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_date(unix: u64) -> String {
    let secs = unix % 86_400;
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        utc_day(unix),
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// How long before `now` the time `then` was, in its largest whole unit ("3 s ago",
/// "5 min ago", "2 h ago", "4 days ago"); "in the future" for a time after `now`.
pub fn age(then: u64, now: u64) -> String {
    let Some(d) = now.checked_sub(then) else {
        return "in the future".into();
    };
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

/// `unix` as a date with its age: `2026-12-04 20:13:05 UTC (5 min ago)`.
pub fn date_and_age(unix: u64, now: u64) -> String {
    format!("{} ({})", utc_date(unix), age(unix, now))
}

/// The civil date (year, month, day) of `days` since 1970-01-01, proleptic Gregorian.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_proleptic_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_day(1_796_415_185), "2026-12-04");
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(1_796_415_185), "2026-12-04 20:13:05 UTC");
        assert_eq!(utc_date(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        assert_eq!(age(100, 100), "0 s ago");
        assert_eq!(age(100, 159), "59 s ago");
        assert_eq!(age(100, 400), "5 min ago");
        assert_eq!(age(0, 7200), "2 h ago");
        assert_eq!(age(0, 4 * 86_400 + 5), "4 days ago");
        assert_eq!(age(10, 5), "in the future");
        assert_eq!(date_and_age(0, 60), "1970-01-01 00:00:00 UTC (1 min ago)");
    }
}
