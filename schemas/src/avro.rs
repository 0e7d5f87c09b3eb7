//! Avro encoding of [`RawAction`] and [`EnrichedAction`] for Kafka values.
//!
//! Framing: **Avro single-object encoding** — the two bytes `C3 01`, the 8-byte little-endian
//! CRC-64-AVRO (Rabin) fingerprint of the writer schema's canonical form, then the binary datum.
//! A reader finds the writer schema by fingerprint among the versions it knows
//! ([`KNOWN_RAW_WRITER_SCHEMAS`]) and resolves it to the current schema, so defaulted fields can be
//! added without breaking older producers. No schema registry is needed.
//!
//! The `.avsc` files in `schemas/avro/` are the source of truth; the tests below prove that what
//! this module writes validates against them and reads back unchanged.
//!
//! Two codecs: records of the *current* schema go through [`binary`], a schema-specific encoder
//! and decoder (the hot path, ~20× faster than the generic one); records of an older writer
//! schema are resolved by apache-avro's generic reader. The tests hold `binary` to apache-avro
//! byte for byte.

mod binary;

use std::sync::LazyLock;

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use rust_decimal::Decimal;

use crate::action::{ActionKind, CostSource, EnrichedAction, RawAction};
use crate::decimal::{from_avro_bytes, DecimalError};

/// The current raw action schema (`schemas/avro/raw_action.avsc`).
pub const RAW_ACTION_AVSC: &str = include_str!("../avro/raw_action.avsc");
/// The current enriched action schema (`schemas/avro/enriched_action.avsc`).
pub const ENRICHED_ACTION_AVSC: &str = include_str!("../avro/enriched_action.avsc");

/// Version 1 of the raw action schema (`schemas/avro/history/raw_action.v1.avsc`): without
/// `outcome_value`.
pub const RAW_ACTION_V1_AVSC: &str = include_str!("../avro/history/raw_action.v1.avsc");
/// Version 1 of the enriched action schema (`schemas/avro/history/enriched_action.v1.avsc`):
/// without `outcome_value`.
pub const ENRICHED_ACTION_V1_AVSC: &str = include_str!("../avro/history/enriched_action.v1.avsc");

/// Writer schemas of raw actions a reader accepts, oldest first. Add older versions here when the
/// schema evolves so records already in Kafka (or from direct publishers) stay readable.
pub const KNOWN_RAW_WRITER_SCHEMAS: &[&str] = &[RAW_ACTION_V1_AVSC, RAW_ACTION_AVSC];
/// Writer schemas of enriched actions a reader accepts, oldest first.
pub const KNOWN_ENRICHED_WRITER_SCHEMAS: &[&str] = &[ENRICHED_ACTION_V1_AVSC, ENRICHED_ACTION_AVSC];

const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LENGTH: usize = 10;

/// Why bytes could not be turned into an action (or an action into bytes).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not Avro single-object encoded: expected C3 01 header, got {0:02x?}")]
    BadMagic(Vec<u8>),
    #[error("record is {0} bytes, shorter than the 10-byte single-object header")]
    Truncated(usize),
    #[error("unknown writer schema fingerprint {0}; known: {1}")]
    UnknownSchema(String, String),
    #[error("Avro datum does not match schema {schema}: {source}")]
    Avro {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("field {field}: {source}")]
    Decimal {
        field: &'static str,
        #[source]
        source: DecimalError,
    },
}

struct KnownSchema {
    schema: Schema,
    header: Vec<u8>,
}

struct SchemaFamily {
    name: &'static str,
    current: KnownSchema,
    writers: Vec<KnownSchema>,
}

impl SchemaFamily {
    fn load(name: &'static str, current: &str, writers: &[&str]) -> SchemaFamily {
        let parse = |text: &str| {
            let schema = Schema::parse_str(text).expect("bundled .avsc files are valid Avro");
            let header = RabinFingerprintHeader::from_schema(&schema).build_header();
            KnownSchema { schema, header }
        };
        SchemaFamily {
            name,
            current: parse(current),
            writers: writers.iter().map(|text| parse(text)).collect(),
        }
    }

    /// The datum after the single-object header: borrowed when the writer schema is the current
    /// one, else resolved from the older writer schema by apache-avro.
    fn datum<'a>(&self, bytes: &'a [u8]) -> Result<Datum<'a>, CodecError> {
        if bytes.len() < HEADER_LENGTH {
            return Err(CodecError::Truncated(bytes.len()));
        }
        if bytes[..2] != SINGLE_OBJECT_MAGIC {
            return Err(CodecError::BadMagic(bytes[..2].to_vec()));
        }
        let (header, datum) = bytes.split_at(HEADER_LENGTH);
        if header == self.current.header.as_slice() {
            return Ok(Datum::Current(datum));
        }
        let writer = self
            .writers
            .iter()
            .find(|known| known.header == header)
            .ok_or_else(|| {
                CodecError::UnknownSchema(
                    hex::encode(&header[2..]),
                    self.writers
                        .iter()
                        .map(|known| hex::encode(&known.header[2..]))
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?;
        self.resolve_generic(&writer.schema, datum)
            .map(Datum::Older)
    }

    /// Reads a datum written with `writer_schema` as a generic value of the current schema.
    fn resolve_generic(&self, writer_schema: &Schema, datum: &[u8]) -> Result<Value, CodecError> {
        let reader = GenericDatumReader::builder(writer_schema)
            .reader_schema(&self.current.schema)
            .build()
            .map_err(|source| self.avro_error(source))?;
        let mut rest = datum;
        let value = reader
            .read_value(&mut rest)
            .map_err(|source| self.avro_error(source))?;
        if !rest.is_empty() {
            return Err(CodecError::Field {
                field: "<datum>",
                problem: format!("{} trailing bytes after the record", rest.len()),
            });
        }
        Ok(value)
    }

    /// A buffer that starts with the current schema's single-object header.
    fn start_record(&self, datum_capacity: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LENGTH + datum_capacity);
        bytes.extend_from_slice(&self.current.header);
        bytes
    }

    fn avro_error(&self, source: apache_avro::Error) -> CodecError {
        CodecError::Avro {
            schema: self.name,
            source: Box::new(source),
        }
    }
}

enum Datum<'a> {
    Current(&'a [u8]),
    Older(Value),
}

static RAW_FAMILY: LazyLock<SchemaFamily> =
    LazyLock::new(|| SchemaFamily::load("RawAction", RAW_ACTION_AVSC, KNOWN_RAW_WRITER_SCHEMAS));
static ENRICHED_FAMILY: LazyLock<SchemaFamily> = LazyLock::new(|| {
    SchemaFamily::load(
        "EnrichedAction",
        ENRICHED_ACTION_AVSC,
        KNOWN_ENRICHED_WRITER_SCHEMAS,
    )
});

/// Encodes a raw action for `actions.raw`.
pub fn encode_raw_action(action: &RawAction) -> Result<Vec<u8>, CodecError> {
    let mut bytes = RAW_FAMILY.start_record(256);
    binary::DatumWriter::new(&mut bytes).raw_action(action)?;
    Ok(bytes)
}

/// Decodes a record of `actions.raw`.
pub fn decode_raw_action(bytes: &[u8]) -> Result<RawAction, CodecError> {
    match RAW_FAMILY.datum(bytes)? {
        Datum::Current(datum) => {
            let mut reader = binary::DatumReader::new(datum);
            let action = reader.raw_action()?;
            reader.finish()?;
            Ok(action)
        }
        Datum::Older(value) => read_raw_fields(&mut RecordFields::new(value)?),
    }
}

/// Encodes an enriched action for `actions.enriched`.
pub fn encode_enriched_action(action: &EnrichedAction) -> Result<Vec<u8>, CodecError> {
    let mut bytes = ENRICHED_FAMILY.start_record(320);
    let mut writer = binary::DatumWriter::new(&mut bytes);
    writer.raw_action(&action.raw)?;
    writer.enrichment(action)?;
    Ok(bytes)
}

/// Decodes a record of `actions.enriched`.
pub fn decode_enriched_action(bytes: &[u8]) -> Result<EnrichedAction, CodecError> {
    match ENRICHED_FAMILY.datum(bytes)? {
        Datum::Current(datum) => {
            let mut reader = binary::DatumReader::new(datum);
            let action = reader.enriched_action()?;
            reader.finish()?;
            Ok(action)
        }
        Datum::Older(value) => read_enriched_fields(&mut RecordFields::new(value)?),
    }
}

fn read_enriched_fields(fields: &mut RecordFields) -> Result<EnrichedAction, CodecError> {
    let raw = read_raw_fields(fields)?;
    let cost_source_text = fields.string("cost_source")?;
    Ok(EnrichedAction {
        raw,
        tracked: fields.boolean("tracked")?,
        outcome: fields.boolean("outcome")?,
        measure: fields.string("measure")?,
        quantity: fields.decimal("quantity")?,
        unit_cost: fields.decimal("unit_cost")?,
        cost: fields.decimal("cost")?,
        cost_source: CostSource::parse(&cost_source_text).ok_or_else(|| CodecError::Field {
            field: "cost_source",
            problem: format!("unknown cost source {cost_source_text:?}"),
        })?,
        currency: fields.string("currency")?,
        config_version: fields.long("config_version")?,
        enriched_at_micros: fields.timestamp("enriched_at")?,
    })
}

fn read_raw_fields(fields: &mut RecordFields) -> Result<RawAction, CodecError> {
    let kind_text = fields.string("kind")?;
    Ok(RawAction {
        event_id: fields.string("event_id")?,
        workspace_id: fields.string("workspace_id")?,
        account_id: fields.string("account_id")?,
        agent_instance_id: fields.string("agent_instance_id")?,
        kind: ActionKind::parse(&kind_text).ok_or_else(|| CodecError::Field {
            field: "kind",
            problem: format!(
                "unknown kind {kind_text:?}; expected action, llm, trace_event or outcome"
            ),
        })?,
        action_name: fields.string("action_name")?,
        trace_event: fields.optional_string("trace_event")?,
        user_id: fields.optional_string("user_id")?,
        anonymous_id: fields.optional_string("anonymous_id")?,
        occurred_at_micros: fields.timestamp("occurred_at")?,
        received_at_micros: fields.timestamp("received_at")?,
        description: fields.optional_string("description")?,
        llm_provider: fields.optional_string("llm_provider")?,
        llm_model: fields.optional_string("llm_model")?,
        input_tokens: fields.optional_long("input_tokens")?,
        output_tokens: fields.optional_long("output_tokens")?,
        total_tokens: fields.optional_long("total_tokens")?,
        reported_cost: fields.optional_decimal("reported_cost")?,
        // Absent from version 1 records: resolved to its default, null.
        outcome_value: fields.optional_decimal("outcome_value")?,
        attributes_json: fields.string("attributes_json")?,
        source: fields.string("source")?,
    })
}

/// The fields of a decoded record, taken out by name (each exactly once).
struct RecordFields {
    fields: Vec<(String, Value)>,
}

impl RecordFields {
    fn new(value: Value) -> Result<RecordFields, CodecError> {
        match value {
            Value::Record(fields) => Ok(RecordFields { fields }),
            other => Err(CodecError::Field {
                field: "<record>",
                problem: format!("expected a record, got {other:?}"),
            }),
        }
    }

    fn take(&mut self, field: &'static str) -> Result<Value, CodecError> {
        let slot = self
            .fields
            .iter_mut()
            .find(|(name, _)| name == field)
            .ok_or(CodecError::Field {
                field,
                problem: "missing".into(),
            })?;
        Ok(std::mem::replace(&mut slot.1, Value::Null))
    }

    fn unwrap_union(value: Value) -> Option<Value> {
        match value {
            Value::Union(_, inner) => match *inner {
                Value::Null => None,
                inner => Some(inner),
            },
            Value::Null => None,
            other => Some(other),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        match self.take(field)? {
            Value::String(text) => Ok(text),
            other => Err(type_error(field, "string", &other)),
        }
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, CodecError> {
        match Self::unwrap_union(self.take(field)?) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(type_error(field, "string or null", &other)),
        }
    }

    fn boolean(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.take(field)? {
            Value::Boolean(flag) => Ok(flag),
            other => Err(type_error(field, "boolean", &other)),
        }
    }

    fn long(&mut self, field: &'static str) -> Result<i64, CodecError> {
        match self.take(field)? {
            Value::Long(number) => Ok(number),
            other => Err(type_error(field, "long", &other)),
        }
    }

    fn optional_long(&mut self, field: &'static str) -> Result<Option<i64>, CodecError> {
        match Self::unwrap_union(self.take(field)?) {
            None => Ok(None),
            Some(Value::Long(number)) => Ok(Some(number)),
            Some(other) => Err(type_error(field, "long or null", &other)),
        }
    }

    fn timestamp(&mut self, field: &'static str) -> Result<i64, CodecError> {
        match self.take(field)? {
            Value::TimestampMicros(micros) | Value::Long(micros) => Ok(micros),
            other => Err(type_error(field, "timestamp-micros", &other)),
        }
    }

    fn decimal(&mut self, field: &'static str) -> Result<Decimal, CodecError> {
        let value = self.take(field)?;
        decimal_from_value(field, value)
    }

    fn optional_decimal(&mut self, field: &'static str) -> Result<Option<Decimal>, CodecError> {
        match Self::unwrap_union(self.take(field)?) {
            None => Ok(None),
            Some(value) => decimal_from_value(field, value).map(Some),
        }
    }
}

fn decimal_from_value(field: &'static str, value: Value) -> Result<Decimal, CodecError> {
    let bytes = match value {
        Value::Decimal(decimal) => {
            <Vec<u8>>::try_from(&decimal).map_err(|source| CodecError::Avro {
                schema: "decimal",
                source: Box::new(source),
            })?
        }
        Value::Bytes(bytes) => bytes,
        other => return Err(type_error(field, "decimal", &other)),
    };
    from_avro_bytes(&bytes).map_err(|source| CodecError::Decimal { field, source })
}

fn type_error(field: &'static str, expected: &str, got: &Value) -> CodecError {
    CodecError::Field {
        field,
        problem: format!("expected {expected}, got {got:?}"),
    }
}

/// The generic apache-avro codec: the reference [`binary`] is tested against.
#[cfg(test)]
pub(super) mod reference {
    use super::*;
    use crate::decimal::to_avro_bytes;
    use apache_avro::writer::datum::GenericDatumWriter;

    /// Encodes through apache-avro's generic `Value` writer against the current `.avsc`.
    pub(in crate::avro) fn encode_raw_action(action: &RawAction) -> Result<Vec<u8>, CodecError> {
        let mut fields = Vec::with_capacity(20);
        push_raw_fields(&mut fields, action)?;
        encode_value(&RAW_FAMILY, Value::Record(fields))
    }

    /// Encodes through apache-avro's generic `Value` writer against the current `.avsc`.
    pub(in crate::avro) fn encode_enriched_action(
        action: &EnrichedAction,
    ) -> Result<Vec<u8>, CodecError> {
        let mut fields = Vec::with_capacity(30);
        push_raw_fields(&mut fields, &action.raw)?;
        fields.push(("tracked".into(), Value::Boolean(action.tracked)));
        fields.push(("outcome".into(), Value::Boolean(action.outcome)));
        fields.push(("measure".into(), Value::String(action.measure.clone())));
        fields.push((
            "quantity".into(),
            decimal_value("quantity", action.quantity)?,
        ));
        fields.push((
            "unit_cost".into(),
            decimal_value("unit_cost", action.unit_cost)?,
        ));
        fields.push(("cost".into(), decimal_value("cost", action.cost)?));
        fields.push((
            "cost_source".into(),
            Value::String(action.cost_source.as_str().into()),
        ));
        fields.push(("currency".into(), Value::String(action.currency.clone())));
        fields.push(("config_version".into(), Value::Long(action.config_version)));
        fields.push((
            "enriched_at".into(),
            Value::TimestampMicros(action.enriched_at_micros),
        ));
        encode_value(&ENRICHED_FAMILY, Value::Record(fields))
    }

    /// Decodes with apache-avro's generic reader even when the writer schema is the current one.
    pub(in crate::avro) fn decode_raw_action(bytes: &[u8]) -> Result<RawAction, CodecError> {
        let value = generic_value(&RAW_FAMILY, bytes)?;
        read_raw_fields(&mut RecordFields::new(value)?)
    }

    /// Decodes with apache-avro's generic reader even when the writer schema is the current one.
    pub(in crate::avro) fn decode_enriched_action(
        bytes: &[u8],
    ) -> Result<EnrichedAction, CodecError> {
        let value = generic_value(&ENRICHED_FAMILY, bytes)?;
        read_enriched_fields(&mut RecordFields::new(value)?)
    }

    pub(in crate::avro) fn generic_value(
        family: &SchemaFamily,
        bytes: &[u8],
    ) -> Result<Value, CodecError> {
        match family.datum(bytes)? {
            Datum::Older(value) => Ok(value),
            Datum::Current(datum) => family.resolve_generic(&family.current.schema, datum),
        }
    }

    fn encode_value(family: &SchemaFamily, value: Value) -> Result<Vec<u8>, CodecError> {
        let writer = GenericDatumWriter::builder(&family.current.schema)
            .build()
            .map_err(|source| family.avro_error(source))?;
        let mut bytes = family.start_record(256);
        let datum = writer
            .write_value_to_vec(value)
            .map_err(|source| family.avro_error(source))?;
        bytes.extend_from_slice(&datum);
        Ok(bytes)
    }

    fn push_raw_fields(
        fields: &mut Vec<(String, Value)>,
        action: &RawAction,
    ) -> Result<(), CodecError> {
        fields.push(("event_id".into(), Value::String(action.event_id.clone())));
        fields.push((
            "workspace_id".into(),
            Value::String(action.workspace_id.clone()),
        ));
        fields.push((
            "account_id".into(),
            Value::String(action.account_id.clone()),
        ));
        fields.push((
            "agent_instance_id".into(),
            Value::String(action.agent_instance_id.clone()),
        ));
        fields.push(("kind".into(), Value::String(action.kind.as_str().into())));
        fields.push((
            "action_name".into(),
            Value::String(action.action_name.clone()),
        ));
        fields.push(("trace_event".into(), optional_string(&action.trace_event)));
        fields.push(("user_id".into(), optional_string(&action.user_id)));
        fields.push(("anonymous_id".into(), optional_string(&action.anonymous_id)));
        fields.push((
            "occurred_at".into(),
            Value::TimestampMicros(action.occurred_at_micros),
        ));
        fields.push((
            "received_at".into(),
            Value::TimestampMicros(action.received_at_micros),
        ));
        fields.push(("description".into(), optional_string(&action.description)));
        fields.push(("llm_provider".into(), optional_string(&action.llm_provider)));
        fields.push(("llm_model".into(), optional_string(&action.llm_model)));
        fields.push(("input_tokens".into(), optional_long(action.input_tokens)));
        fields.push(("output_tokens".into(), optional_long(action.output_tokens)));
        fields.push(("total_tokens".into(), optional_long(action.total_tokens)));
        let reported_cost = match action.reported_cost {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(cost) => Value::Union(1, Box::new(decimal_value("reported_cost", cost)?)),
        };
        fields.push(("reported_cost".into(), reported_cost));
        let outcome_value = match action.outcome_value {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(value) => Value::Union(1, Box::new(decimal_value("outcome_value", value)?)),
        };
        fields.push(("outcome_value".into(), outcome_value));
        fields.push((
            "attributes_json".into(),
            Value::String(action.attributes_json.clone()),
        ));
        fields.push(("source".into(), Value::String(action.source.clone())));
        Ok(())
    }

    fn optional_string(value: &Option<String>) -> Value {
        match value {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(text) => Value::Union(1, Box::new(Value::String(text.clone()))),
        }
    }

    fn optional_long(value: Option<i64>) -> Value {
        match value {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(number) => Value::Union(1, Box::new(Value::Long(number))),
        }
    }

    fn decimal_value(field: &'static str, value: Decimal) -> Result<Value, CodecError> {
        let bytes = to_avro_bytes(value).map_err(|source| CodecError::Decimal { field, source })?;
        Ok(Value::Decimal(apache_avro::Decimal::from(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::writer::datum::GenericDatumWriter;
    use std::collections::BTreeSet;
    use std::str::FromStr;

    pub(crate) fn sample_raw_action() -> RawAction {
        RawAction {
            event_id: "evt-1".into(),
            workspace_id: "ws_demo".into(),
            account_id: "acc_acme".into(),
            agent_instance_id: "inst_acme_research".into(),
            kind: ActionKind::Llm,
            action_name: "gemini_llm_gemini-2.5-flash".into(),
            trace_event: Some("generate_content gemini-2.5-flash".into()),
            user_id: Some("user_acme_123".into()),
            anonymous_id: None,
            occurred_at_micros: 1_765_815_103_000_123,
            received_at_micros: 1_765_815_103_500_000,
            description: Some("Summarized search results".into()),
            llm_provider: Some("gemini".into()),
            llm_model: Some("gemini-2.5-flash".into()),
            input_tokens: Some(2500),
            output_tokens: Some(800),
            total_tokens: Some(3300),
            reported_cost: Some(Decimal::from_str("0.12").unwrap()),
            attributes_json: r#"{"model":"gpt-4","input_tokens":2500}"#.into(),
            source: "otlp_grpc".into(),
            outcome_value: None,
        }
    }

    fn sample_outcome_event() -> RawAction {
        RawAction {
            event_id: "lead-42".into(),
            kind: ActionKind::Outcome,
            action_name: "lead_converted".into(),
            user_id: Some("user_acme_123".into()),
            occurred_at_micros: 1_765_815_103_000_123,
            received_at_micros: 1_765_815_103_500_000,
            attributes_json: r#"{"lead_id":"L-42","plan":"pro"}"#.into(),
            source: "rest".into(),
            outcome_value: Some(Decimal::from_str("1234.567890123456").unwrap()),
            ..RawAction::minimal(
                "ws_demo",
                "acc_acme",
                "inst_acme_research",
                "lead-42",
                "lead_converted",
            )
        }
    }

    fn sample_enriched_action() -> EnrichedAction {
        EnrichedAction {
            raw: sample_raw_action(),
            tracked: true,
            outcome: true,
            measure: "token".into(),
            quantity: Decimal::from(3300),
            unit_cost: Decimal::from_str("0.006").unwrap(),
            cost: Decimal::from_str("19.8").unwrap(),
            cost_source: CostSource::Allocated,
            currency: "USD".into(),
            config_version: 7,
            enriched_at_micros: 1_765_815_104_000_000,
        }
    }

    fn avsc_field_names(avsc: &str) -> BTreeSet<String> {
        let json: serde_json::Value = serde_json::from_str(avsc).unwrap();
        json["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|field| field["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn written_field_names(bytes: &[u8], family: &SchemaFamily) -> BTreeSet<String> {
        match reference::generic_value(family, bytes).unwrap() {
            Value::Record(fields) => fields.into_iter().map(|(name, _)| name).collect(),
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn raw_action_round_trips_through_the_avsc() {
        let action = sample_raw_action();
        let bytes = encode_raw_action(&action).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(decode_raw_action(&bytes).unwrap(), action);
        assert_eq!(
            written_field_names(&bytes, &RAW_FAMILY),
            avsc_field_names(RAW_ACTION_AVSC)
        );
    }

    #[test]
    fn raw_action_with_every_optional_empty_round_trips() {
        let action = RawAction {
            trace_event: None,
            user_id: None,
            anonymous_id: Some("anon".into()),
            description: None,
            llm_provider: None,
            llm_model: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: None,
            reported_cost: None,
            kind: ActionKind::Action,
            ..sample_raw_action()
        };
        let bytes = encode_raw_action(&action).unwrap();
        assert_eq!(decode_raw_action(&bytes).unwrap(), action);
    }

    #[test]
    fn enriched_action_round_trips_through_the_avsc() {
        let action = sample_enriched_action();
        let bytes = encode_enriched_action(&action).unwrap();
        assert_eq!(decode_enriched_action(&bytes).unwrap(), action);
        assert_eq!(
            written_field_names(&bytes, &ENRICHED_FAMILY),
            avsc_field_names(ENRICHED_ACTION_AVSC)
        );
    }

    #[test]
    fn enriched_schema_repeats_the_raw_schema_field_for_field() {
        let raw: serde_json::Value = serde_json::from_str(RAW_ACTION_AVSC).unwrap();
        let enriched: serde_json::Value = serde_json::from_str(ENRICHED_ACTION_AVSC).unwrap();
        let strip_doc = |field: &serde_json::Value| {
            let mut field = field.clone();
            field.as_object_mut().unwrap().remove("doc");
            field
        };
        let raw_fields: Vec<_> = raw["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(strip_doc)
            .collect();
        let enriched_prefix: Vec<_> = enriched["fields"].as_array().unwrap()[..raw_fields.len()]
            .iter()
            .map(strip_doc)
            .collect();
        assert_eq!(raw_fields, enriched_prefix);
    }

    #[test]
    fn rejects_bytes_without_the_single_object_header() {
        let error = decode_raw_action(b"{\"json\": true}").unwrap_err();
        assert!(matches!(error, CodecError::BadMagic(_)), "{error}");
        let error = decode_raw_action(&[0xC3]).unwrap_err();
        assert!(matches!(error, CodecError::Truncated(1)), "{error}");
    }

    #[test]
    fn rejects_an_unknown_writer_schema() {
        let mut bytes = encode_raw_action(&sample_raw_action()).unwrap();
        bytes[5] ^= 0xFF;
        let error = decode_raw_action(&bytes).unwrap_err();
        assert!(matches!(error, CodecError::UnknownSchema(..)), "{error}");
    }

    #[test]
    fn rejects_a_truncated_datum() {
        let bytes = encode_raw_action(&sample_raw_action()).unwrap();
        assert!(decode_raw_action(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn refuses_to_encode_a_cost_it_would_have_to_round() {
        let action = EnrichedAction {
            cost: Decimal::from_str("0.0000000000001").unwrap(),
            ..sample_enriched_action()
        };
        let error = encode_enriched_action(&action).unwrap_err();
        assert!(
            matches!(error, CodecError::Decimal { field: "cost", .. }),
            "{error}"
        );
    }

    #[test]
    fn an_outcome_event_round_trips_with_its_exact_value() {
        let event = sample_outcome_event();
        let bytes = encode_raw_action(&event).unwrap();
        let decoded = decode_raw_action(&bytes).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(decoded.kind.as_str(), "outcome");
        assert_eq!(
            decoded.outcome_value.unwrap().to_string(),
            "1234.567890123456"
        );
        assert_eq!(reference::decode_raw_action(&bytes).unwrap(), event);
        assert_eq!(reference::encode_raw_action(&event).unwrap(), bytes);
        // The value is a decimal union exactly like reported_cost: the 16-byte scaled integer.
        match reference::generic_value(&RAW_FAMILY, &bytes).unwrap() {
            Value::Record(fields) => {
                let (_, value) = fields
                    .iter()
                    .find(|(name, _)| name == "outcome_value")
                    .unwrap();
                let Value::Union(1, inner) = value else {
                    panic!("{value:?}")
                };
                let Value::Decimal(decimal) = inner.as_ref() else {
                    panic!("{inner:?}")
                };
                let bytes = <Vec<u8>>::try_from(decimal).unwrap();
                assert_eq!(
                    i128::from_be_bytes(bytes.try_into().unwrap()),
                    1_234_567_890_123_456
                );
            }
            other => panic!("{other:?}"),
        }
        let enriched = EnrichedAction {
            raw: event,
            measure: "value".into(),
            quantity: Decimal::from_str("1234.567890123456").unwrap(),
            unit_cost: Decimal::ZERO,
            cost: Decimal::ZERO,
            cost_source: CostSource::None,
            ..sample_enriched_action()
        };
        let bytes = encode_enriched_action(&enriched).unwrap();
        assert_eq!(decode_enriched_action(&bytes).unwrap(), enriched);
        assert_eq!(reference::encode_enriched_action(&enriched).unwrap(), bytes);
    }

    #[test]
    fn an_outcome_value_that_would_need_rounding_is_not_encoded() {
        let event = RawAction {
            outcome_value: Some(Decimal::from_str("0.0000000000001").unwrap()),
            ..sample_outcome_event()
        };
        let error = encode_raw_action(&event).unwrap_err();
        assert!(
            matches!(
                error,
                CodecError::Decimal {
                    field: "outcome_value",
                    ..
                }
            ),
            "{error}"
        );
    }

    /// The fields of a schema without their docs.
    fn fields_without_docs(avsc: &str) -> Vec<serde_json::Value> {
        let json: serde_json::Value = serde_json::from_str(avsc).unwrap();
        json["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|field| {
                let mut field = field.clone();
                field.as_object_mut().unwrap().remove("doc");
                field
            })
            .collect()
    }

    #[test]
    fn version_1_is_the_current_schema_without_outcome_value() {
        for (v1, current) in [
            (RAW_ACTION_V1_AVSC, RAW_ACTION_AVSC),
            (ENRICHED_ACTION_V1_AVSC, ENRICHED_ACTION_AVSC),
        ] {
            let mut expected = fields_without_docs(current);
            expected.retain(|field| field["name"] != "outcome_value");
            assert_eq!(fields_without_docs(v1), expected);
            let added: Vec<_> = fields_without_docs(current)
                .into_iter()
                .filter(|field| field["name"] == "outcome_value")
                .collect();
            assert_eq!(added.len(), 1);
            // A defaulted union with null: what lets version 1 records resolve.
            assert_eq!(added[0]["default"], serde_json::Value::Null);
            assert_eq!(added[0]["type"][0], "null");
            let header = |text: &str| {
                RabinFingerprintHeader::from_schema(&Schema::parse_str(text).unwrap())
                    .build_header()
            };
            assert_ne!(header(v1), header(current));
        }
    }

    /// A record as a producer of an older schema wrote it: `fields` (by name) written with
    /// `writer_avsc`, framed with that schema's single-object header.
    fn encode_with_older_schema(writer_avsc: &str, fields: Vec<(String, Value)>) -> Vec<u8> {
        let schema = Schema::parse_str(writer_avsc).unwrap();
        let mut record = apache_avro::types::Record::new(&schema).unwrap();
        for (name, value) in fields {
            if schema_has_field(writer_avsc, &name) {
                record.put(&name, value);
            }
        }
        let mut bytes = RabinFingerprintHeader::from_schema(&schema).build_header();
        bytes.extend(
            GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_value_to_vec(record)
                .unwrap(),
        );
        bytes
    }

    fn schema_has_field(avsc: &str, name: &str) -> bool {
        avsc_field_names(avsc).contains(name)
    }

    fn record_fields(bytes: &[u8], family: &SchemaFamily) -> Vec<(String, Value)> {
        match reference::generic_value(family, bytes).unwrap() {
            Value::Record(fields) => fields,
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn decodes_records_written_with_version_1_of_the_schemas() {
        // What ingest and the enricher wrote before outcome_value existed, and what a direct
        // publisher with the old .avsc still writes: read with outcome_value absent.
        let action = sample_raw_action();
        let fields = record_fields(&encode_raw_action(&action).unwrap(), &RAW_FAMILY);
        let old = encode_with_older_schema(RAW_ACTION_V1_AVSC, fields);
        assert_ne!(&old[..HEADER_LENGTH], RAW_FAMILY.current.header.as_slice());
        let decoded = decode_raw_action(&old).unwrap();
        assert_eq!(decoded, action);
        assert_eq!(decoded.outcome_value, None);
        // Re-encoded, it is a current record.
        let current = encode_raw_action(&decoded).unwrap();
        assert_eq!(
            &current[..HEADER_LENGTH],
            RAW_FAMILY.current.header.as_slice()
        );

        let enriched = sample_enriched_action();
        let fields = record_fields(
            &encode_enriched_action(&enriched).unwrap(),
            &ENRICHED_FAMILY,
        );
        let old = encode_with_older_schema(ENRICHED_ACTION_V1_AVSC, fields);
        assert_eq!(decode_enriched_action(&old).unwrap(), enriched);
        // A damaged old record is refused, not misread.
        assert!(decode_enriched_action(&old[..old.len() - 2]).is_err());
    }

    #[test]
    fn reads_a_record_written_by_an_older_schema_without_new_fields() {
        // An older producer that did not know `source` and `total_tokens`: the reader fills
        // defaults only for fields that have one, so schema evolution must add defaulted fields.
        let mut old: serde_json::Value = serde_json::from_str(RAW_ACTION_AVSC).unwrap();
        let fields = old["fields"].as_array_mut().unwrap();
        fields.retain(|field| field["name"] != "total_tokens");
        let old_schema = Schema::parse_str(&old.to_string()).unwrap();
        let new_schema = Schema::parse_str(RAW_ACTION_AVSC).unwrap();
        let mut record = apache_avro::types::Record::new(&old_schema).unwrap();
        let full = match reference::generic_value(
            &RAW_FAMILY,
            &encode_raw_action(&sample_raw_action()).unwrap(),
        )
        .unwrap()
        {
            Value::Record(fields) => fields,
            _ => unreachable!(),
        };
        for (name, value) in full {
            if name != "total_tokens" {
                record.put(&name, value);
            }
        }
        let datum = GenericDatumWriter::builder(&old_schema)
            .build()
            .unwrap()
            .write_value_to_vec(record)
            .unwrap();
        let resolved = GenericDatumReader::builder(&old_schema)
            .reader_schema(&new_schema)
            .build()
            .unwrap()
            .read_value(&mut datum.as_slice())
            .unwrap();
        let mut fields = RecordFields::new(resolved).unwrap();
        let action = read_raw_fields(&mut fields).unwrap();
        assert_eq!(action.total_tokens, None);
        assert_eq!(action.input_tokens, Some(2500));
    }
}
