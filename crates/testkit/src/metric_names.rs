//! Metric names in exported text and in files that use them (dashboards,
//! alert rules, manifests), for tests that check the two agree.

use std::collections::BTreeSet;

/// Names of the metric families in an OpenMetrics text, with the series
/// names each one exports (`_total`, `_bucket`, ...).
pub fn exported_series(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// Metric names (`meridian_...`) a text refers to.
pub fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("meridian_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // the job is named `meridian`; metric names have a second part
        if i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}
