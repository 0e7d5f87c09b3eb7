//! Durations in settings files: `flush_interval = "300ms"`, `dedupe_horizon = "15m"`,
//! `max_late = "35days"` ([humantime] syntax), under the key without its unit suffix. The keys
//! of earlier releases with a unit suffix (`flush_interval_ms = 300`, `dedupe_horizon_seconds =
//! 900`) keep working: each setting accepts both keys (serde `alias`), and a bare number in
//! either is in the unit of the old key. The value is kept in that unit, checked.
//!
//! Use on a field named after its unit: `#[serde(alias = "flush_interval", deserialize_with =
//! "duration::millis")] pub flush_interval_ms: u64`.

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// A number (in the setting's unit) or a duration text.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(i64),
    Text(String),
}

fn parse_text<E: serde::de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        E::custom(format!(
            "{text:?} is not a duration ({error}); write e.g. \"250ms\", \"30s\", \"15m\", \"2h\", \"35days\""
        ))
    })
}

/// Milliseconds, from a number of milliseconds or a duration text.
pub fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(number) => {
            u64::try_from(number).map_err(|_| D::Error::custom(format!("{number} ms is negative")))
        }
        NumberOrText::Text(text) => {
            let duration = parse_text::<D::Error>(&text)?;
            u64::try_from(duration.as_millis())
                .map_err(|_| D::Error::custom(format!("{text:?} is too long")))
        }
    }
}

/// Whole seconds, from a number of seconds or a duration text (refused when it has a fraction
/// of a second).
fn whole_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(number) => Ok(number),
        NumberOrText::Text(text) => {
            let duration = parse_text::<D::Error>(&text)?;
            if duration.subsec_nanos() != 0 {
                return Err(D::Error::custom(format!(
                    "{text:?} is not a whole number of seconds"
                )));
            }
            i64::try_from(duration.as_secs())
                .map_err(|_| D::Error::custom(format!("{text:?} is too long")))
        }
    }
}

/// Whole seconds as `i64` (range checks are the setting's own).
pub fn seconds_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    whole_seconds(deserializer)
}

/// Whole seconds as `u64`.
pub fn seconds_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let seconds = whole_seconds(deserializer)?;
    u64::try_from(seconds).map_err(|_| D::Error::custom(format!("{seconds} s is negative")))
}

/// Whole seconds as `u32`.
pub fn seconds_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let seconds = whole_seconds(deserializer)?;
    u32::try_from(seconds).map_err(|_| D::Error::custom(format!("{seconds} s is out of range")))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Example {
        #[serde(alias = "flush_interval", deserialize_with = "super::millis")]
        flush_interval_ms: u64,
        #[serde(alias = "dedupe_horizon", deserialize_with = "super::seconds_i64")]
        dedupe_horizon_seconds: i64,
    }

    fn parse(text: &str) -> Result<Example, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    #[test]
    fn new_keys_take_duration_texts_and_old_keys_keep_their_numbers() {
        let expected = Example {
            flush_interval_ms: 300,
            dedupe_horizon_seconds: 900,
        };
        assert_eq!(
            parse("flush_interval = \"300ms\"\ndedupe_horizon = \"15m\""),
            Ok(expected)
        );
        let old = parse("flush_interval_ms = 300\ndedupe_horizon_seconds = 900").unwrap();
        assert_eq!(old.flush_interval_ms, 300);
        assert_eq!(old.dedupe_horizon_seconds, 900);
        let mixed = parse("flush_interval_ms = \"1s\"\ndedupe_horizon = 60").unwrap();
        assert_eq!(
            (mixed.flush_interval_ms, mixed.dedupe_horizon_seconds),
            (1000, 60)
        );
    }

    #[test]
    fn bad_durations_are_refused_with_the_reason() {
        let error = parse("flush_interval = \"soon\"\ndedupe_horizon = \"15m\"").unwrap_err();
        assert!(error.contains("is not a duration"), "{error}");
        let error = parse("flush_interval = \"1s\"\ndedupe_horizon = \"1.5s\"").unwrap_err();
        assert!(error.contains("whole number of seconds"), "{error}");
        let error = parse("flush_interval = -5\ndedupe_horizon = \"1m\"").unwrap_err();
        assert!(error.contains("negative"), "{error}");
        let error = parse("flush_interval = \"1s\"\nflush_interval_ms = 5\ndedupe_horizon = 1")
            .unwrap_err();
        assert!(error.contains("duplicate"), "{error}");
    }
}
