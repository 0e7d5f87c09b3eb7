//! Schema-specific Avro binary encoder and decoder for the *current* `RawAction` and
//! `EnrichedAction` schemas: the hot path of every stage.
//!
//! Why not apache-avro here: its generic `Value` path resolves the schema per record, builds a
//! `Vec<(String, Value)>` with a heap string per field name and validates the tree — about 4 µs to
//! decode and 5 µs to encode one action, 97 % of the enricher's CPU. Reading the fields in schema
//! order straight into the struct costs a few hundred nanoseconds.
//!
//! The field order below must follow `schemas/avro/*.avsc`. The tests in `super::tests` prove it:
//! for generated actions this module writes the same bytes as apache-avro writing the `.avsc`,
//! and reads what apache-avro wrote (and refuses what apache-avro refuses). Records from older
//! writer schemas never reach this module: `super` resolves them with apache-avro.

use rust_decimal::Decimal;

use super::CodecError;
use crate::action::{ActionKind, CostSource, EnrichedAction, RawAction};
use crate::decimal::to_scaled_i128;

/// Bytes of an Avro decimal as this project writes it: the 16-byte big-endian i128.
const DECIMAL_BYTES: usize = 16;

const OVERLONG_VARINT: &str = "varint longer than 64 bits";

/// Appends Avro binary values to a buffer.
pub(super) struct DatumWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> DatumWriter<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> DatumWriter<'a> {
        DatumWriter { out }
    }

    fn long(&mut self, value: i64) {
        // zig-zag, then little-endian base-128 varint
        let mut rest = ((value << 1) ^ (value >> 63)) as u64;
        while rest >= 0x80 {
            self.out.push((rest as u8) | 0x80);
            rest >>= 7;
        }
        self.out.push(rest as u8);
    }

    fn boolean(&mut self, value: bool) {
        self.out.push(u8::from(value));
    }

    fn string(&mut self, text: &str) {
        self.long(text.len() as i64);
        self.out.extend_from_slice(text.as_bytes());
    }

    fn optional_string(&mut self, text: Option<&str>) {
        match text {
            None => self.long(0),
            Some(text) => {
                self.long(1);
                self.string(text);
            }
        }
    }

    fn optional_long(&mut self, value: Option<i64>) {
        match value {
            None => self.long(0),
            Some(number) => {
                self.long(1);
                self.long(number);
            }
        }
    }

    fn decimal(&mut self, field: &'static str, value: Decimal) -> Result<(), CodecError> {
        let scaled =
            to_scaled_i128(value).map_err(|source| CodecError::Decimal { field, source })?;
        self.long(DECIMAL_BYTES as i64);
        self.out.extend_from_slice(&scaled.to_be_bytes());
        Ok(())
    }

    fn optional_decimal(
        &mut self,
        field: &'static str,
        value: Option<Decimal>,
    ) -> Result<(), CodecError> {
        match value {
            None => {
                self.long(0);
                Ok(())
            }
            Some(value) => {
                self.long(1);
                self.decimal(field, value)
            }
        }
    }

    /// The fields of `RawAction`, in `raw_action.avsc` order.
    pub(super) fn raw_action(&mut self, action: &RawAction) -> Result<(), CodecError> {
        self.string(&action.event_id);
        self.string(&action.workspace_id);
        self.string(&action.account_id);
        self.string(&action.agent_instance_id);
        self.string(action.kind.as_str());
        self.string(&action.action_name);
        self.optional_string(action.trace_event.as_deref());
        self.optional_string(action.user_id.as_deref());
        self.optional_string(action.anonymous_id.as_deref());
        self.long(action.occurred_at_micros);
        self.long(action.received_at_micros);
        self.optional_string(action.description.as_deref());
        self.optional_string(action.llm_provider.as_deref());
        self.optional_string(action.llm_model.as_deref());
        self.optional_long(action.input_tokens);
        self.optional_long(action.output_tokens);
        self.optional_long(action.total_tokens);
        self.optional_decimal("reported_cost", action.reported_cost)?;
        self.optional_decimal("outcome_value", action.outcome_value)?;
        self.string(&action.attributes_json);
        self.string(&action.source);
        Ok(())
    }

    /// The fields `enriched_action.avsc` adds after the raw ones, in order.
    pub(super) fn enrichment(&mut self, action: &EnrichedAction) -> Result<(), CodecError> {
        self.boolean(action.tracked);
        self.boolean(action.outcome);
        self.string(&action.measure);
        self.decimal("quantity", action.quantity)?;
        self.decimal("unit_cost", action.unit_cost)?;
        self.decimal("cost", action.cost)?;
        self.string(action.cost_source.as_str());
        self.string(&action.currency);
        self.long(action.config_version);
        self.long(action.enriched_at_micros);
        Ok(())
    }
}

/// Reads Avro binary values from a datum, refusing anything the schema does not allow.
pub(super) struct DatumReader<'a> {
    rest: &'a [u8],
}

impl<'a> DatumReader<'a> {
    pub(super) fn new(datum: &'a [u8]) -> DatumReader<'a> {
        DatumReader { rest: datum }
    }

    /// Fails unless the whole datum was read.
    pub(super) fn finish(self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Field {
                field: "<datum>",
                problem: format!("{} trailing bytes after the record", self.rest.len()),
            })
        }
    }

    fn truncated(field: &'static str) -> CodecError {
        CodecError::Field {
            field,
            problem: "the record ends inside this field (truncated datum)".into(),
        }
    }

    fn long(&mut self, field: &'static str) -> Result<i64, CodecError> {
        let mut value: u64 = 0;
        for (index, &byte) in self.rest.iter().enumerate().take(10) {
            // The 10th byte may only carry the top bit of a 64-bit value.
            if index == 9 && byte > 0x01 {
                break;
            }
            value |= u64::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[index + 1..];
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        if self.rest.len() < 10 && self.rest.iter().all(|byte| byte & 0x80 != 0) {
            Err(Self::truncated(field))
        } else {
            Err(CodecError::Field {
                field,
                problem: OVERLONG_VARINT.into(),
            })
        }
    }

    fn take(&mut self, field: &'static str, length: i64) -> Result<&'a [u8], CodecError> {
        let length = usize::try_from(length).map_err(|_| CodecError::Field {
            field,
            problem: format!("negative length {length}"),
        })?;
        if length > self.rest.len() {
            return Err(Self::truncated(field));
        }
        let (taken, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(taken)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, CodecError> {
        let length = self.long(field)?;
        let bytes = self.take(field, length)?;
        std::str::from_utf8(bytes).map_err(|error| CodecError::Field {
            field,
            problem: format!("not UTF-8: {error}"),
        })
    }

    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        self.str(field).map(str::to_owned)
    }

    fn boolean(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.rest.split_first() {
            None => Err(Self::truncated(field)),
            Some((&byte, rest)) => {
                self.rest = rest;
                match byte {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(CodecError::Field {
                        field,
                        problem: format!("boolean byte {other:#04x}; expected 0 or 1"),
                    }),
                }
            }
        }
    }

    /// The branch of a `["null", T]` union: false for null.
    fn present(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.long(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(CodecError::Field {
                field,
                problem: format!("union branch {other}; the schema has 0 (null) and 1"),
            }),
        }
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, CodecError> {
        if self.present(field)? {
            self.string(field).map(Some)
        } else {
            Ok(None)
        }
    }

    fn optional_long(&mut self, field: &'static str) -> Result<Option<i64>, CodecError> {
        if self.present(field)? {
            self.long(field).map(Some)
        } else {
            Ok(None)
        }
    }

    fn decimal(&mut self, field: &'static str) -> Result<Decimal, CodecError> {
        let length = self.long(field)?;
        let bytes = self.take(field, length)?;
        crate::decimal::from_avro_bytes(bytes)
            .map_err(|source| CodecError::Decimal { field, source })
    }

    fn optional_decimal(&mut self, field: &'static str) -> Result<Option<Decimal>, CodecError> {
        if self.present(field)? {
            self.decimal(field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The fields of `RawAction`, in `raw_action.avsc` order.
    pub(super) fn raw_action(&mut self) -> Result<RawAction, CodecError> {
        let event_id = self.string("event_id")?;
        let workspace_id = self.string("workspace_id")?;
        let account_id = self.string("account_id")?;
        let agent_instance_id = self.string("agent_instance_id")?;
        let kind_text = self.str("kind")?;
        let kind = ActionKind::parse(kind_text).ok_or_else(|| CodecError::Field {
            field: "kind",
            problem: format!(
                "unknown kind {kind_text:?}; expected action, llm, trace_event or outcome"
            ),
        })?;
        Ok(RawAction {
            event_id,
            workspace_id,
            account_id,
            agent_instance_id,
            kind,
            action_name: self.string("action_name")?,
            trace_event: self.optional_string("trace_event")?,
            user_id: self.optional_string("user_id")?,
            anonymous_id: self.optional_string("anonymous_id")?,
            occurred_at_micros: self.long("occurred_at")?,
            received_at_micros: self.long("received_at")?,
            description: self.optional_string("description")?,
            llm_provider: self.optional_string("llm_provider")?,
            llm_model: self.optional_string("llm_model")?,
            input_tokens: self.optional_long("input_tokens")?,
            output_tokens: self.optional_long("output_tokens")?,
            total_tokens: self.optional_long("total_tokens")?,
            reported_cost: self.optional_decimal("reported_cost")?,
            outcome_value: self.optional_decimal("outcome_value")?,
            attributes_json: self.string("attributes_json")?,
            source: self.string("source")?,
        })
    }

    /// An `EnrichedAction`: the raw fields, then the enrichment, in `enriched_action.avsc` order.
    pub(super) fn enriched_action(&mut self) -> Result<EnrichedAction, CodecError> {
        let raw = self.raw_action()?;
        let tracked = self.boolean("tracked")?;
        let outcome = self.boolean("outcome")?;
        let measure = self.string("measure")?;
        let quantity = self.decimal("quantity")?;
        let unit_cost = self.decimal("unit_cost")?;
        let cost = self.decimal("cost")?;
        let cost_source_text = self.str("cost_source")?;
        let cost_source = CostSource::parse(cost_source_text).ok_or_else(|| CodecError::Field {
            field: "cost_source",
            problem: format!("unknown cost source {cost_source_text:?}"),
        })?;
        Ok(EnrichedAction {
            raw,
            tracked,
            outcome,
            measure,
            quantity,
            unit_cost,
            cost,
            cost_source,
            currency: self.string("currency")?,
            config_version: self.long("config_version")?,
            enriched_at_micros: self.long("enriched_at")?,
        })
    }
}

#[cfg(test)]
mod tests {
    //! `binary` against apache-avro's generic codec (`super::super::reference`), which reads and
    //! writes the `.avsc` files themselves: same bytes out, same actions in, same refusals.

    use super::super::{reference, CodecError};
    use super::*;
    use crate::avro::{
        decode_enriched_action, decode_raw_action, encode_enriched_action, encode_raw_action,
    };
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z_0-9]{1,12}", "\\PC{0,24}"]
    }

    fn decimal() -> impl Strategy<Value = Decimal> {
        // Mostly storable values, some with too many digits (both codecs must refuse those).
        prop_oneof![
            4 => (-10i128.pow(26)..10i128.pow(26), 0u32..=12)
                .prop_map(|(mantissa, scale)| Decimal::from_i128_with_scale(mantissa, scale)),
            1 => (any::<i64>(), 0u32..=28)
                .prop_map(|(mantissa, scale)| Decimal::new(mantissa, scale)),
        ]
    }

    prop_compose! {
        fn raw_action()(
            ids in (text(), text(), text(), text(), text()),
            kind in prop_oneof![
                Just(ActionKind::Action), Just(ActionKind::Llm), Just(ActionKind::TraceEvent),
                Just(ActionKind::Outcome),
            ],
            optional_texts in (
                proptest::option::of(text()), proptest::option::of(text()),
                proptest::option::of(text()), proptest::option::of(text()),
                proptest::option::of(text()), proptest::option::of(text()),
            ),
            times in (any::<i64>(), any::<i64>()),
            tokens in (
                proptest::option::of(any::<i64>()), proptest::option::of(any::<i64>()),
                proptest::option::of(0i64..1_000_000),
            ),
            reported_cost in proptest::option::of(decimal()),
            tail in (text(), text(), proptest::option::of(decimal())),
        ) -> RawAction {
            RawAction {
                event_id: ids.0,
                workspace_id: ids.1,
                account_id: ids.2,
                agent_instance_id: ids.3,
                kind,
                action_name: ids.4,
                trace_event: optional_texts.0,
                user_id: optional_texts.1,
                anonymous_id: optional_texts.2,
                occurred_at_micros: times.0,
                received_at_micros: times.1,
                description: optional_texts.3,
                llm_provider: optional_texts.4,
                llm_model: optional_texts.5,
                input_tokens: tokens.0,
                output_tokens: tokens.1,
                total_tokens: tokens.2,
                reported_cost,
                attributes_json: tail.0,
                source: tail.1,
                outcome_value: tail.2,
            }
        }
    }

    prop_compose! {
        fn enriched_action()(
            raw in raw_action(),
            flags in (any::<bool>(), any::<bool>()),
            measure in text(),
            money in (decimal(), decimal(), decimal()),
            cost_source in prop_oneof![Just(CostSource::Allocated), Just(CostSource::Reported), Just(CostSource::None)],
            currency in text(),
            numbers in (any::<i64>(), any::<i64>()),
        ) -> EnrichedAction {
            EnrichedAction {
                raw,
                tracked: flags.0,
                outcome: flags.1,
                measure,
                quantity: money.0,
                unit_cost: money.1,
                cost: money.2,
                cost_source,
                currency,
                config_version: numbers.0,
                enriched_at_micros: numbers.1,
            }
        }
    }

    /// Truncation, an overwritten byte or an inserted byte somewhere in the datum.
    fn damage(mut bytes: Vec<u8>, how: u8, at: usize, byte: u8) -> Vec<u8> {
        let header = 10;
        let at = header + at % (bytes.len() - header);
        match how % 3 {
            0 => bytes.truncate(at),
            1 => bytes[at] = byte,
            _ => bytes.insert(at, byte),
        }
        bytes
    }

    /// Whatever `binary` reads, apache-avro reads the same; whatever it refuses, apache-avro
    /// refuses too — except a 10-byte varint whose last byte carries more than the 64th bit, which
    /// apache-avro accepts by silently dropping the extra bits and `binary` refuses on purpose.
    fn same_outcome<T: PartialEq + std::fmt::Debug>(
        fast: Result<T, CodecError>,
        generic: Result<T, CodecError>,
    ) -> Result<(), TestCaseError> {
        match (fast, generic) {
            (Ok(fast), Ok(generic)) => prop_assert_eq!(fast, generic),
            (Err(_), Err(_)) => {}
            (Err(CodecError::Field { problem, .. }), Ok(_)) if problem == OVERLONG_VARINT => {}
            (fast, generic) => {
                prop_assert!(false, "binary: {fast:?}\napache-avro: {generic:?}")
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn writes_raw_actions_byte_for_byte_like_apache_avro(action in raw_action()) {
            let fast = encode_raw_action(&action);
            let generic = reference::encode_raw_action(&action);
            match (&fast, &generic) {
                (Ok(fast), Ok(generic)) => prop_assert_eq!(fast, generic),
                (Err(CodecError::Decimal { .. }), Err(CodecError::Decimal { .. })) => {}
                _ => prop_assert!(false, "binary: {fast:?}\napache-avro: {generic:?}"),
            }
            if let Ok(bytes) = fast {
                prop_assert_eq!(decode_raw_action(&bytes).unwrap(), action.clone());
                prop_assert_eq!(reference::decode_raw_action(&bytes).unwrap(), action);
            }
        }

        #[test]
        fn writes_enriched_actions_byte_for_byte_like_apache_avro(action in enriched_action()) {
            let fast = encode_enriched_action(&action);
            let generic = reference::encode_enriched_action(&action);
            match (&fast, &generic) {
                (Ok(fast), Ok(generic)) => prop_assert_eq!(fast, generic),
                (Err(CodecError::Decimal { .. }), Err(CodecError::Decimal { .. })) => {}
                _ => prop_assert!(false, "binary: {fast:?}\napache-avro: {generic:?}"),
            }
            if let Ok(bytes) = fast {
                prop_assert_eq!(decode_enriched_action(&bytes).unwrap(), action.clone());
                prop_assert_eq!(reference::decode_enriched_action(&bytes).unwrap(), action);
            }
        }

        #[test]
        fn refuses_damaged_raw_records_exactly_when_apache_avro_does(
            action in raw_action(), how in any::<u8>(), at in any::<usize>(), byte in any::<u8>(),
        ) {
            if let Ok(bytes) = encode_raw_action(&action) {
                let bytes = damage(bytes, how, at, byte);
                same_outcome(decode_raw_action(&bytes), reference::decode_raw_action(&bytes))?;
            }
        }

        #[test]
        fn refuses_damaged_enriched_records_exactly_when_apache_avro_does(
            action in enriched_action(), how in any::<u8>(), at in any::<usize>(), byte in any::<u8>(),
        ) {
            if let Ok(bytes) = encode_enriched_action(&action) {
                let bytes = damage(bytes, how, at, byte);
                same_outcome(
                    decode_enriched_action(&bytes),
                    reference::decode_enriched_action(&bytes),
                )?;
            }
        }
    }

    #[test]
    fn varints_at_the_edges_of_i64_round_trip() {
        for value in [
            0,
            -1,
            1,
            63,
            -64,
            64,
            i64::MAX,
            i64::MIN,
            i64::MAX - 1,
            i64::MIN + 1,
        ] {
            let mut bytes = Vec::new();
            DatumWriter::new(&mut bytes).long(value);
            let mut reader = DatumReader::new(&bytes);
            assert_eq!(reader.long("n").unwrap(), value, "{bytes:02x?}");
            reader.finish().unwrap();
        }
        // 11 continuation bytes and an 10th byte with more than the top bit are refused.
        let mut reader = DatumReader::new(&[0xFF; 11]);
        assert!(reader.long("n").is_err());
        let mut reader =
            DatumReader::new(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02]);
        assert!(reader.long("n").is_err());
        let mut reader = DatumReader::new(&[0x80]);
        let error = reader.long("n").unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
    }
}
