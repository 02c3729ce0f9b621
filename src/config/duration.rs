//! Parsing of human durations ("250ms", "30s", "10m", "1h", "1500us").
//!
//! Pure: no clock. One integer and one unit, no spaces; fractions are written in a smaller unit.

use std::time::Duration;

/// Parses a duration such as "250ms". Returns a message fit for a config error on failure.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a whole number and a unit (us, ms, s, m, h), e.g. \"250ms\""
        ));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
    let micros_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60 * 1_000_000,
        "h" => 3_600 * 1_000_000,
        "" => {
            return Err(format!(
                "invalid duration {text:?}: missing unit (us, ms, s, m, h), e.g. \"{text}s\""
            ));
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use us, ms, s, m or h)"
            ));
        }
    };
    let micros = value
        .checked_mul(micros_per_unit)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
    Ok(Duration::from_micros(micros))
}

/// Formats a duration back into the config syntax, in the largest unit that is exact.
pub fn format_duration(duration: Duration) -> String {
    let micros = duration.as_micros();
    for (unit, size) in [
        ("h", 3_600_000_000u128),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
    ] {
        if micros != 0 && micros.is_multiple_of(size) {
            return format!("{}{unit}", micros / size);
        }
    }
    format!("{micros}us")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "s",
            "10",
            "10 s",
            "1.5s",
            "-1s",
            "10x",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn format_round_trips() {
        for text in ["250ms", "30s", "10m", "1h", "1500us", "90s"] {
            let parsed = parse_duration(text).expect("valid");
            assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
