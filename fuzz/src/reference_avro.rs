//! apache-avro's generic reader as the reference the schema-specific decoder
//! (`schemas/src/avro/binary.rs`) is held to, as in the project's differential proptests
//! (`schemas/src/avro.rs`), whose reference codec is test-only and so not reachable from here.
//!
//! The reader below reads the single-object header, then the datum with apache-avro against the
//! writer schema the header names (the current `.avsc`, or an older version the project still
//! reads, `KNOWN_*_WRITER_SCHEMAS`) resolved to the current one, then turns the generic record
//! into the project's types field by field. It is deliberately written without looking at
//! `binary.rs`, so that the two can disagree.

use std::sync::{LazyLock, Once};

use agentmeter_schemas::avro::{
    ENRICHED_ACTION_AVSC, KNOWN_ENRICHED_WRITER_SCHEMAS, KNOWN_RAW_WRITER_SCHEMAS, RAW_ACTION_AVSC,
};
use agentmeter_schemas::decimal::from_avro_bytes;
use agentmeter_schemas::{ActionKind, CostSource, EnrichedAction, RawAction};
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use rust_decimal::Decimal;

/// The problem `binary.rs` reports for a 10-byte varint whose last byte carries more than the
/// 64th bit. apache-avro silently drops those bits; the project refuses them on purpose, so that
/// disagreement is expected (it is the one exception of the proptests too).
pub const OVERLONG_VARINT_PROBLEM: &str = "varint longer than 64 bits";

/// Whether the two decoders may disagree on `bytes` because of a difference that is documented
/// and deliberate: `binary.rs` accepted the record (`fast_problem` is `None`) or refused it for
/// an overlong varint (which apache-avro silently truncates), while apache-avro refused a decimal
/// shorter than 16 bytes. Avro allows such sign-trimmed decimals and the project reads them
/// (`schemas/src/decimal.rs`, `from_avro_bytes`), apache-avro 0.22 does not ("Precision 38 too
/// small to hold decimal values with N bytes").
pub fn expected_disagreement(fast_problem: Option<&str>, reference_error: Option<&str>) -> bool {
    match (fast_problem, reference_error) {
        (Some(problem), None) => problem == OVERLONG_VARINT_PROBLEM,
        (None, Some(error)) => error.contains("too small to hold decimal values with"),
        _ => false,
    }
}

struct KnownSchema {
    schema: Schema,
    header: Vec<u8>,
}

/// The current schema and every writer schema a record may name.
struct ReferenceSchema {
    current: KnownSchema,
    writers: Vec<KnownSchema>,
}

fn parse(avsc: &str) -> KnownSchema {
    let schema = Schema::parse_str(avsc).expect("the bundled .avsc is valid");
    let header = RabinFingerprintHeader::from_schema(&schema).build_header();
    KnownSchema { schema, header }
}

fn load(current: &str, writers: &[&str]) -> ReferenceSchema {
    ReferenceSchema {
        current: parse(current),
        writers: writers.iter().map(|avsc| parse(avsc)).collect(),
    }
}

static RAW: LazyLock<ReferenceSchema> =
    LazyLock::new(|| load(RAW_ACTION_AVSC, KNOWN_RAW_WRITER_SCHEMAS));
static ENRICHED: LazyLock<ReferenceSchema> =
    LazyLock::new(|| load(ENRICHED_ACTION_AVSC, KNOWN_ENRICHED_WRITER_SCHEMAS));

/// apache-avro allocates a claimed string or bytes length before reading it (up to 512 MiB by
/// default). A fuzz input is at most a few KiB, so a claim above 1 MiB is refused at once
/// instead of costing a 512 MiB allocation per execution. It does not change what is accepted.
fn limit_allocations() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        apache_avro::util::max_allocation_bytes(1 << 20);
    });
}

/// The record apache-avro reads from `bytes`, or why not.
fn generic_record(
    reference: &ReferenceSchema,
    bytes: &[u8],
) -> Result<Vec<(String, Value)>, String> {
    limit_allocations();
    let header_length = reference.current.header.len();
    if bytes.len() < header_length {
        return Err("shorter than the single-object header".into());
    }
    let (header, datum) = bytes.split_at(header_length);
    let writer = reference
        .writers
        .iter()
        .find(|writer| writer.header == header)
        .ok_or("not the single-object header of a known writer schema")?;
    let reader = GenericDatumReader::builder(&writer.schema)
        .reader_schema(&reference.current.schema)
        .build()
        .map_err(|error| error.to_string())?;
    let mut rest = datum;
    let value = reader
        .read_value(&mut rest)
        .map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    match value {
        Value::Record(fields) => Ok(fields),
        other => Err(format!("not a record: {other:?}")),
    }
}

/// A raw action as apache-avro reads it.
pub fn decode_raw_action(bytes: &[u8]) -> Result<RawAction, String> {
    let mut fields = Fields(generic_record(&RAW, bytes)?);
    raw_fields(&mut fields)
}

/// An enriched action as apache-avro reads it.
pub fn decode_enriched_action(bytes: &[u8]) -> Result<EnrichedAction, String> {
    let mut fields = Fields(generic_record(&ENRICHED, bytes)?);
    let raw = raw_fields(&mut fields)?;
    let tracked = fields.boolean("tracked")?;
    let outcome = fields.boolean("outcome")?;
    let measure = fields.string("measure")?;
    let quantity = fields.decimal("quantity")?;
    let unit_cost = fields.decimal("unit_cost")?;
    let cost = fields.decimal("cost")?;
    let cost_source_text = fields.string("cost_source")?;
    let cost_source = CostSource::parse(&cost_source_text)
        .ok_or_else(|| format!("unknown cost_source {cost_source_text:?}"))?;
    Ok(EnrichedAction {
        raw,
        tracked,
        outcome,
        measure,
        quantity,
        unit_cost,
        cost,
        cost_source,
        currency: fields.string("currency")?,
        config_version: fields.long("config_version")?,
        enriched_at_micros: fields.long("enriched_at")?,
    })
}

fn raw_fields(fields: &mut Fields) -> Result<RawAction, String> {
    let event_id = fields.string("event_id")?;
    let workspace_id = fields.string("workspace_id")?;
    let account_id = fields.string("account_id")?;
    let agent_instance_id = fields.string("agent_instance_id")?;
    let kind_text = fields.string("kind")?;
    let kind =
        ActionKind::parse(&kind_text).ok_or_else(|| format!("unknown kind {kind_text:?}"))?;
    Ok(RawAction {
        event_id,
        workspace_id,
        account_id,
        agent_instance_id,
        kind,
        action_name: fields.string("action_name")?,
        trace_event: fields.optional_string("trace_event")?,
        user_id: fields.optional_string("user_id")?,
        anonymous_id: fields.optional_string("anonymous_id")?,
        occurred_at_micros: fields.long("occurred_at")?,
        received_at_micros: fields.long("received_at")?,
        description: fields.optional_string("description")?,
        llm_provider: fields.optional_string("llm_provider")?,
        llm_model: fields.optional_string("llm_model")?,
        input_tokens: fields.optional_long("input_tokens")?,
        output_tokens: fields.optional_long("output_tokens")?,
        total_tokens: fields.optional_long("total_tokens")?,
        reported_cost: fields.optional_decimal("reported_cost")?,
        outcome_value: fields.optional_decimal("outcome_value")?,
        attributes_json: fields.string("attributes_json")?,
        source: fields.string("source")?,
    })
}

/// The fields of a generic record, looked up by name.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn take(&mut self, name: &str) -> Result<Value, String> {
        let slot = self
            .0
            .iter_mut()
            .find(|(field, _)| field == name)
            .ok_or_else(|| format!("field {name} missing"))?;
        Ok(std::mem::replace(&mut slot.1, Value::Null))
    }

    /// The value of a `["null", T]` union field, `None` for null.
    fn optional(&mut self, name: &str) -> Result<Option<Value>, String> {
        Ok(match self.take(name)? {
            Value::Union(_, inner) => match *inner {
                Value::Null => None,
                inner => Some(inner),
            },
            Value::Null => None,
            other => Some(other),
        })
    }

    fn string(&mut self, name: &str) -> Result<String, String> {
        string_of(name, self.take(name)?)
    }

    fn optional_string(&mut self, name: &str) -> Result<Option<String>, String> {
        self.optional(name)?
            .map(|value| string_of(name, value))
            .transpose()
    }

    fn long(&mut self, name: &str) -> Result<i64, String> {
        long_of(name, self.take(name)?)
    }

    fn optional_long(&mut self, name: &str) -> Result<Option<i64>, String> {
        self.optional(name)?
            .map(|value| long_of(name, value))
            .transpose()
    }

    fn boolean(&mut self, name: &str) -> Result<bool, String> {
        match self.take(name)? {
            Value::Boolean(flag) => Ok(flag),
            other => Err(format!("{name}: expected boolean, got {other:?}")),
        }
    }

    fn decimal(&mut self, name: &str) -> Result<Decimal, String> {
        decimal_of(name, self.take(name)?)
    }

    fn optional_decimal(&mut self, name: &str) -> Result<Option<Decimal>, String> {
        self.optional(name)?
            .map(|value| decimal_of(name, value))
            .transpose()
    }
}

fn string_of(name: &str, value: Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(format!("{name}: expected string, got {other:?}")),
    }
}

fn long_of(name: &str, value: Value) -> Result<i64, String> {
    match value {
        Value::Long(number) | Value::TimestampMicros(number) => Ok(number),
        other => Err(format!("{name}: expected long, got {other:?}")),
    }
}

fn decimal_of(name: &str, value: Value) -> Result<Decimal, String> {
    let bytes = match value {
        Value::Decimal(decimal) => {
            <Vec<u8>>::try_from(&decimal).map_err(|error| format!("{name}: {error}"))?
        }
        Value::Bytes(bytes) => bytes,
        other => return Err(format!("{name}: expected decimal, got {other:?}")),
    };
    from_avro_bytes(&bytes).map_err(|error| format!("{name}: {error}"))
}
