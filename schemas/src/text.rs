//! Text hygiene: what a name and a free text may contain. The same rules hold at every stage
//! that can see the text first — ingest for REST and OTLP, the enricher for direct Kafka
//! publishers, `config apply` for the names a workspace tracks — so a name that is refused in
//! one place is refused everywhere (`docs/metering.md`, "Accepted values").
//!
//! * A **name** (action names, trace events, models and providers, event, user and anonymous
//!   ids, attribute keys) is what actions are grouped and billed by, so two names that look the
//!   same must be the same string. It may not be empty, may not contain control characters
//!   (Unicode category Cc), invisible format characters (Cf: zero-width spaces and joiners,
//!   bidirectional controls, the byte-order mark, soft hyphens), line or paragraph separators,
//!   or whitespace other than a plain space; it may not begin or end with whitespace; and it must
//!   be in Unicode normalization form C, so that `é` typed as one code point or as `e` + accent is
//!   one name. Nothing is normalised silently: a refused name comes back with the reason.
//! * A **free text** (descriptions, attribute string values) may hold anything printable plus
//!   tab, line feed and carriage return; other control characters are refused.

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Why a text was refused; `Display` is a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextProblem {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} {unit}")]
    TooLong { max: usize, unit: &'static str },
    #[error("contains the control character {} at character {position}", code_point(*.character))]
    Control { character: char, position: usize },
    #[error("contains the invisible character {} at character {position} (zero-width, bidirectional or other format characters are refused in names)", code_point(*.character))]
    Invisible { character: char, position: usize },
    #[error("contains the whitespace {} at character {position}; only a plain space (U+0020) is allowed in names", code_point(*.character))]
    UnusualWhitespace { character: char, position: usize },
    #[error("begins or ends with whitespace")]
    EdgeWhitespace,
    #[error("is not in Unicode normalization form C (NFC); send it NFC-normalized")]
    NotNfc,
}

fn code_point(character: char) -> String {
    format!("U+{:04X}", u32::from(character))
}

/// How the length of a name is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxLength {
    /// At most this many UTF-8 bytes (action names: a ClickHouse key column).
    Bytes(usize),
    /// At most this many characters (ids, descriptions).
    Chars(usize),
}

impl MaxLength {
    fn check(self, text: &str) -> Result<(), TextProblem> {
        match self {
            MaxLength::Bytes(max) if text.len() > max => {
                Err(TextProblem::TooLong { max, unit: "bytes" })
            }
            // A character takes at least one byte: only long texts need counting.
            MaxLength::Chars(max) if text.len() > max && text.chars().count() > max => {
                Err(TextProblem::TooLong {
                    max,
                    unit: "characters",
                })
            }
            _ => Ok(()),
        }
    }
}

/// Checks a name (see the module documentation).
pub fn check_name(text: &str, max: MaxLength) -> Result<(), TextProblem> {
    if text.is_empty() {
        return Err(TextProblem::Empty);
    }
    max.check(text)?;
    if text.is_ascii() {
        // The hot path: every byte is one character, and ASCII is always NFC.
        for (position, byte) in text.bytes().enumerate() {
            if byte.is_ascii_control() {
                return Err(TextProblem::Control {
                    character: char::from(byte),
                    position,
                });
            }
        }
        if text.starts_with(' ') || text.ends_with(' ') {
            return Err(TextProblem::EdgeWhitespace);
        }
        return Ok(());
    }
    for (position, character) in text.chars().enumerate() {
        match character.general_category() {
            GeneralCategory::Control => {
                return Err(TextProblem::Control {
                    character,
                    position,
                })
            }
            GeneralCategory::Format => {
                return Err(TextProblem::Invisible {
                    character,
                    position,
                })
            }
            GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
                return Err(TextProblem::UnusualWhitespace {
                    character,
                    position,
                })
            }
            _ if character.is_whitespace() && character != ' ' => {
                return Err(TextProblem::UnusualWhitespace {
                    character,
                    position,
                })
            }
            _ => {}
        }
    }
    if text.starts_with(char::is_whitespace) || text.ends_with(char::is_whitespace) {
        return Err(TextProblem::EdgeWhitespace);
    }
    let normalized = match is_nfc_quick(text.chars()) {
        IsNormalized::Yes => true,
        IsNormalized::No => false,
        IsNormalized::Maybe => text.chars().nfc().eq(text.chars()),
    };
    if !normalized {
        return Err(TextProblem::NotNfc);
    }
    Ok(())
}

/// Checks a free text: tab, line feed and carriage return are its only control characters.
pub fn check_free_text(text: &str, max: Option<MaxLength>) -> Result<(), TextProblem> {
    if let Some(max) = max {
        max.check(text)?;
    }
    let allowed = |character: char| matches!(character, '\t' | '\n' | '\r');
    for (position, character) in text.chars().enumerate() {
        if character.is_control() && !allowed(character) {
            return Err(TextProblem::Control {
                character,
                position,
            });
        }
    }
    Ok(())
}

/// Checks an attributes object given as JSON text: it must be a JSON object (or empty text);
/// every key, at any depth, is a name of at most [`MAX_ATTRIBUTE_KEY_BYTES`] bytes and every
/// string value a free text. The walk builds nothing, so it costs about a parse.
pub fn check_attributes_json(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Ok(());
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde::de::Deserializer::deserialize_any(&mut deserializer, TopLevel)
        .and_then(|()| deserializer.end())
        .map_err(|error| error.to_string())
}

/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;

/// The top level: an object and nothing else.
struct TopLevel;

impl<'de> serde::de::Visitor<'de> for TopLevel {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON object of attributes")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyValue.visit_map(map)
    }
}

/// Any JSON value below the top level.
#[derive(Clone, Copy)]
struct AnyValue;

impl<'de> serde::de::DeserializeSeed<'de> for AnyValue {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// An object key.
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an attribute name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<(), E> {
        check_name(key, MaxLength::Bytes(MAX_ATTRIBUTE_KEY_BYTES))
            .map_err(|problem| E::custom(format!("attribute name {:?} {problem}", shorten(key))))
    }
}

impl<'de> serde::de::Visitor<'de> for AnyValue {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<(), E> {
        check_free_text(value, None)
            .map_err(|problem| E::custom(format!("attribute value {:?} {problem}", shorten(value))))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(AnyValue)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Key)?.is_some() {
            map.next_value_seed(AnyValue)?;
        }
        Ok(())
    }
}

/// A text cut to 64 characters, for messages.
pub fn shorten(text: &str) -> String {
    if text.chars().count() <= 64 {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(64).collect::<String>())
    }
}

/// Ids and names: what a user can type and a ClickHouse column or Kafka key holds safely.
pub fn is_valid_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 128
        && text
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "_-.:".contains(character))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: MaxLength = MaxLength::Bytes(256);

    #[test]
    fn accepts_ordinary_names_in_any_script() {
        for name in [
            "llm_call",
            "gemini_llm_gemini-2.5-flash",
            "generate_content gemini-2.5-flash",
            "résumé_écrit",
            "検索",
            "user@example.com",
        ] {
            assert_eq!(check_name(name, NAME), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_look_alike_names_with_the_reason() {
        let cases = [
            ("web\u{200B}search", "U+200B"),
            ("web_search\u{202E}", "U+202E"),
            ("\u{FEFF}web_search", "U+FEFF"),
            ("web_search ", "whitespace"),
            (" web_search", "whitespace"),
            ("web\u{00A0}search", "U+00A0"),
            ("web\u{2028}search", "U+2028"),
            ("web\tsearch", "U+0009"),
            ("web\u{0085}search", "U+0085"),
            ("cafe\u{0301}", "NFC"),
            ("", "empty"),
        ];
        for (name, expected) in cases {
            let problem = check_name(name, NAME).unwrap_err().to_string();
            assert!(problem.contains(expected), "{name:?}: {problem}");
        }
        assert_eq!(check_name("café", NAME), Ok(()));
    }

    #[test]
    fn length_limits_count_bytes_or_characters() {
        assert!(check_name(&"é".repeat(200), MaxLength::Bytes(256)).is_err());
        assert!(check_name(&"é".repeat(200), MaxLength::Chars(256)).is_ok());
        assert!(check_name(&"a".repeat(257), MaxLength::Chars(256)).is_err());
    }

    #[test]
    fn free_text_keeps_line_breaks_and_refuses_other_controls() {
        assert_eq!(check_free_text("line 1\nline 2\r\n\tend", None), Ok(()));
        assert!(check_free_text("bell\u{7}", None)
            .unwrap_err()
            .to_string()
            .contains("U+0007"));
        assert!(check_free_text("nul\0", None).is_err());
        // Invisible characters are allowed in free text: only names are compared.
        assert_eq!(check_free_text("a\u{200B}b", None), Ok(()));
    }

    #[test]
    fn attributes_json_is_checked_at_every_depth_without_building_it() {
        assert_eq!(check_attributes_json(""), Ok(()));
        assert_eq!(
            check_attributes_json(
                r#"{"model":"gpt-4","n":1,"nested":{"list":["a\nb",2.5,null,true]}}"#
            ),
            Ok(())
        );
        let bad_key = check_attributes_json(r#"{"nested":{"ke\u200By":1}}"#).unwrap_err();
        assert!(bad_key.contains("U+200B"), "{bad_key}");
        let bad_value = check_attributes_json(r#"{"list":["ok","\u0000"]}"#).unwrap_err();
        assert!(bad_value.contains("U+0000"), "{bad_value}");
        assert!(check_attributes_json("[1,2]").is_err());
        assert!(check_attributes_json("{} {}").is_err());
        assert!(check_attributes_json("{\"a\":").is_err());
    }
}
