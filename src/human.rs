//! Numbers for people, the same on the page and in the terminal: two or
//! three significant figures with SI (counts) or IEC (bytes) prefixes, and
//! durations as `850 ms`, `3.2 s`, `4m12s`, `2h05m`.

/// `161 B`, `1.2 KiB`, `19.2 MiB`.
pub(crate) fn bytes(n: f64) -> String {
    scaled(n, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB", "PiB"], " ")
}

/// `161`, `8.4k`, `1.2M`.
pub(crate) fn count(n: f64) -> String {
    scaled(n, 1000.0, &["", "k", "M", "G", "T", "P"], "")
}

fn scaled(mut n: f64, step: f64, units: &[&str], gap: &str) -> String {
    if !n.is_finite() {
        return "-".to_owned();
    }
    let mut i = 0;
    while n.abs() >= step && i < units.len() - 1 {
        n /= step;
        i += 1;
    }
    // 999.5 rounds to 1000: show the next unit instead
    if n.abs() >= 99.95 && n.abs().round() >= step && i < units.len() - 1 {
        n /= step;
        i += 1;
    }
    // rounded here, half away from zero, so the page (JS) shows the same
    let number = match (i, n.abs()) {
        (0, _) if n.fract() == 0.0 => format!("{n:.0}"),
        (_, a) if a < 99.95 => format!("{:.1}", (n * 10.0).round() / 10.0),
        _ => format!("{:.0}", n.round()),
    };
    let number = number.strip_suffix(".0").unwrap_or(&number).to_owned();
    match units[i] {
        "" => number,
        unit => format!("{number}{gap}{unit}"),
    }
}

/// `850 ms`, `3.2 s`, `4m12s`, `2h05m`.
pub(crate) fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_owned();
    }
    if seconds < 0.9995 {
        return format!("{:.0} ms", (seconds * 1000.0).round());
    }
    if seconds < 59.95 {
        let s = format!("{:.1}", (seconds * 10.0).round() / 10.0);
        return format!("{} s", s.strip_suffix(".0").unwrap_or(&s));
    }
    let s = seconds.round() as u64;
    match s {
        0..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_the_issue_asks() {
        assert_eq!(bytes(161.27738127403595), "161 B");
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1.2 * 1024.0 * 1024.0), "1.2 MiB");
        assert_eq!(bytes(19.6 * 1024.0), "19.6 KiB");
        assert_eq!(bytes(1023.9), "1 KiB");
        assert_eq!(count(8_400.0), "8.4k");
        assert_eq!(count(161.0), "161");
        assert_eq!(count(999_960.0), "1M");
        assert_eq!(count(12.5), "12.5");
        assert_eq!(count(3.0), "3");
        assert_eq!(duration(0.85), "850 ms");
        assert_eq!(duration(3.21), "3.2 s");
        assert_eq!(duration(3.0), "3 s");
        assert_eq!(duration(252.0), "4m12s");
        assert_eq!(duration(7_500.0), "2h05m");
        assert_eq!(duration(f64::NAN), "-");
        // ties round away from zero, as the page's JavaScript does
        assert_eq!(bytes(1280.0), "1.3 KiB");
        assert_eq!(duration(2.25), "2.3 s");
        assert_eq!(count(100.5), "101");
        assert_eq!(duration(0.9996), "1 s");
    }

    /// However large or small, a number never shows more than three
    /// significant figures, and never a long fraction.
    #[test]
    fn never_a_raw_float() {
        let mut n = 0.000_123_456_789_f64;
        while n < 1e15 {
            let mut shown = vec![bytes(n), count(n)];
            if n < 360_000.0 {
                shown.push(duration(n));
            }
            for shown in shown {
                let digits = shown.chars().filter(char::is_ascii_digit).count();
                assert!(digits <= 4, "{n} -> {shown}");
            }
            n *= 1.37;
        }
    }
}
