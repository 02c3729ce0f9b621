//! The Prometheus text exposition format (version 0.0.4): `# HELP`, `# TYPE`, samples with
//! escaped label values, histograms with cumulative `_bucket{le=...}`, `_sum` and `_count`.
//!
//! Hand-rolled rather than through `metrics-exporter-prometheus`: every value here is an
//! absolute figure summed from the shards' slots at scrape time, and the histograms are our
//! own fixed-bucket ones (the exporter would keep every sample); a small writer keeps one
//! format for all of them. `promtool check metrics` checks its output in the tests.

use std::fmt::Write as _;

use super::Histogram;

#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// `"` `\` and newline escaped, as label values need.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(ch),
        }
    }
    out
}

fn format_value(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if value.is_nan() {
        "NaN".to_string()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

impl Exposition {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (index, (key, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A histogram's samples (the family must have been started with kind `histogram`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let bucket = format!("{name}_bucket");
        for (bound, count) in histogram.cumulative() {
            let le = format_value(bound);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, count as f64);
        }
        self.sample(&format!("{name}_sum"), labels, histogram.sum_seconds());
        self.sample(&format!("{name}_count"), labels, histogram.count() as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::CONNECT_BUCKETS;
    use std::time::Duration;

    #[test]
    fn text_format_escapes_and_histograms() {
        let mut exposition = Exposition::default();
        exposition.family("x_total", "counter", "Things.");
        exposition.sample("x_total", &[("pool", "a\"b\\c\nd")], 3.0);
        exposition.family("d_seconds", "histogram", "Durations.");
        let mut histogram = Histogram::new(&CONNECT_BUCKETS);
        histogram.record(Duration::from_millis(2));
        exposition.histogram("d_seconds", &[("pool", "p")], &histogram);
        let text = exposition.finish();
        assert!(
            text.contains("x_total{pool=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{pool=\"p\",le=\"0.001\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{pool=\"p\",le=\"0.0025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{pool=\"p\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("d_seconds_count{pool=\"p\"} 1\n"), "{text}");
        assert!(text.contains("d_seconds_sum{pool=\"p\"} 0.002\n"), "{text}");
    }
}
