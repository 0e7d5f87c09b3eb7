//! OTLP/JSON: the body of `POST /v1/traces` with `Content-Type: application/json`, decoded the
//! way protobuf's JSON mapping (ProtoJSON) tells *parsers* to read it, with OTLP's exceptions.
//!
//! What is accepted (each rule has a unit test below):
//! * **Field names**: the lowerCamelCase JSON name (`resourceSpans`, `startTimeUnixNano`) and
//!   the original proto field name (`resource_spans`, `start_time_unix_nano`). Both spellings
//!   of one field in the same object are a duplicate and refused.
//! * **Unknown fields** are ignored (OTLP: receivers MUST ignore them), whatever their value.
//! * **`null`** for any field means its default (an empty list for repeated fields); a `null`
//!   *element* of a list is refused.
//! * **Enums** (`kind`, `status.code`): the value's name (`"SPAN_KIND_CLIENT"`,
//!   `"STATUS_CODE_ERROR"`) or its number. A name this version does not know reads as 0
//!   (unspecified), the way ProtoJSON parsers that ignore unknown fields treat it, so a newer
//!   exporter's value does not fail the batch.
//! * **Integers** (64-bit as well as 32-bit): a JSON number or a decimal string, exponent
//!   notation allowed (`"1.7e18"`, `1e3`), as long as the value is an exact integer in the
//!   field's range. Strings are read exactly, not through a float.
//! * **`doubleValue`**: a number, a numeric string, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
//! * **Trace and span ids** (`traceId`, `spanId`, `parentSpanId`, and those of links): hex,
//!   case-insensitive, as OTLP requires, *not* base64 as plain ProtoJSON would have it. An empty
//!   string is an empty id (the mapping then rejects that span).
//! * **`bytesValue`**: base64, standard or URL-safe alphabet, with or without padding.
//! * **`AnyValue`**: `stringValue`, `boolValue`, `intValue`, `doubleValue`, `arrayValue`,
//!   `kvlistValue`, `bytesValue` (and `stringValueStrindex`); `{}` is an empty value, two
//!   variants in one value are refused.
//!
//! The JSON is read into serde structs of this module and converted to the prost types the rest
//! of ingest (and OTLP/protobuf, OTLP/gRPC) uses, so the mapping sees the same request whatever
//! the encoding.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Why an OTLP/JSON body could not be decoded. The message names the problem and where
/// (line and column) it is; it is shown to the exporter.
#[derive(Debug, thiserror::Error)]
#[error("invalid OTLP/JSON ExportTraceServiceRequest: {source}")]
pub struct OtlpJsonError {
    #[from]
    source: serde_json::Error,
}

/// Decodes an OTLP/JSON `ExportTraceServiceRequest` (the rules are in the module header).
pub fn decode_export_request(bytes: &[u8]) -> Result<ExportTraceServiceRequest, OtlpJsonError> {
    let request: JsonExportTraceServiceRequest = serde_json::from_slice(bytes)?;
    Ok(request.into())
}

// ---------------------------------------------------------------------------------------------
// Scalars: the ProtoJSON forms of integers, doubles, enums, hex ids and base64 bytes.
// ---------------------------------------------------------------------------------------------

/// A protobuf integer field (`int32`, `uint32`, `fixed32`, `int64`, `fixed64`, …) read from a
/// JSON number or a decimal string, exponent notation allowed, exact and range-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JsonInteger<T>(T);

impl<'de, T> Deserialize<'de> for JsonInteger<T>
where
    T: TryFrom<i128>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = deserializer.deserialize_any(IntegerVisitor)?;
        T::try_from(value).map(JsonInteger).map_err(|_| {
            de::Error::custom(format!(
                "integer {value} is out of range for a {} field",
                short_type_name::<T>()
            ))
        })
    }
}

fn short_type_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit("::").next().unwrap_or(name)
}

/// Reads any JSON integer form as an `i128`, wide enough for every protobuf integer type.
struct IntegerVisitor;

impl Visitor<'_> for IntegerVisitor {
    type Value = i128;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an integer (a JSON number or a decimal string)")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<i128, E> {
        Ok(i128::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<i128, E> {
        Ok(i128::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<i128, E> {
        // serde_json hands numbers with a fraction or an exponent over as f64: `1e3`, `5.0`.
        // 2^127 and beyond do not fit; every smaller integral f64 converts exactly.
        if value.is_finite() && value.fract() == 0.0 && value.abs() < 2f64.powi(127) {
            Ok(value as i128)
        } else {
            Err(E::custom(format!("{value} is not an integer")))
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<i128, E> {
        parse_decimal_integer(text)
            .ok_or_else(|| E::custom(format!("{text:?} is not an integer in decimal notation")))
    }
}

/// Parses `-?digits(.digits)?([eE][+-]?digits)?` exactly, when it denotes an integer that fits
/// an `i128`. `"1.5e1"` is 15; `"1.5"` and `"1e-1"` are not integers.
fn parse_decimal_integer(text: &str) -> Option<i128> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(position) => {
            let exponent_text = &unsigned[position + 1..];
            let exponent_digits = exponent_text
                .strip_prefix(['+', '-'])
                .unwrap_or(exponent_text);
            if exponent_digits.is_empty() || !exponent_digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // An exponent beyond i32 cannot give an integer that fits, unless the mantissa is 0.
            let exponent = exponent_text
                .parse::<i64>()
                .unwrap_or(i64::MAX)
                .clamp(i64::from(i32::MIN), i64::from(i32::MAX));
            (&unsigned[..position], exponent)
        }
        None => (unsigned, 0),
    };
    let (integer_digits, fraction_digits) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if integer_digits.is_empty()
        || !all_digits(integer_digits)
        || !all_digits(fraction_digits)
        || (mantissa.contains('.') && fraction_digits.is_empty())
    {
        return None;
    }
    let digits = format!("{integer_digits}{fraction_digits}");
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some(0);
    }
    let exponent = exponent - i64::try_from(fraction_digits.len()).ok()?;
    let (significant, zeros_to_append) = if exponent < 0 {
        let cut = usize::try_from(-exponent).ok()?;
        if cut >= significant.len() {
            return None; // a non-zero fraction remains
        }
        let (kept, dropped) = significant.split_at(significant.len() - cut);
        if !dropped.bytes().all(|b| b == b'0') {
            return None;
        }
        (kept, 0)
    } else {
        (significant, usize::try_from(exponent).ok()?)
    };
    // i128 has 39 digits; more cannot fit (and keeps the loop below short).
    if significant.len().saturating_add(zeros_to_append) > 39 {
        return None;
    }
    let mut value: i128 = significant.parse().ok()?;
    for _ in 0..zeros_to_append {
        value = value.checked_mul(10)?;
    }
    Some(if negative { -value } else { value })
}

/// A `double` field: a number, a numeric string, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct JsonDouble(f64);

impl<'de> Deserialize<'de> for JsonDouble {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DoubleVisitor;
        impl Visitor<'_> for DoubleVisitor {
            type Value = f64;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter
                    .write_str("a number, a numeric string, \"NaN\", \"Infinity\" or \"-Infinity\"")
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<f64, E> {
                Ok(value)
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<f64, E> {
                Ok(value as f64)
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<f64, E> {
                Ok(value as f64)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<f64, E> {
                match text {
                    "NaN" => return Ok(f64::NAN),
                    "Infinity" => return Ok(f64::INFINITY),
                    "-Infinity" => return Ok(f64::NEG_INFINITY),
                    _ => {}
                }
                // Only JSON number syntax: Rust's parser would also take "inf", "+1", "nan".
                let looks_numeric = text.starts_with(|c: char| c.is_ascii_digit() || c == '-')
                    && text.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    });
                match text.parse::<f64>() {
                    Ok(value) if looks_numeric && value.is_finite() => Ok(value),
                    _ => Err(E::custom(format!("{text:?} is not a number"))),
                }
            }
        }
        deserializer.deserialize_any(DoubleVisitor).map(JsonDouble)
    }
}

/// An enum field as given: its number, or its name (resolved when converting, per enum).
#[derive(Debug, Clone, PartialEq, Eq)]
enum JsonEnum {
    Number(i32),
    Name(String),
}

impl JsonEnum {
    /// The enum's number; a name this version does not know is 0 (unspecified).
    fn number(self, from_name: impl Fn(&str) -> Option<i32>) -> i32 {
        match self {
            JsonEnum::Number(number) => number,
            JsonEnum::Name(name) => from_name(&name).unwrap_or(0),
        }
    }
}

impl<'de> Deserialize<'de> for JsonEnum {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnumVisitor;
        impl Visitor<'_> for EnumVisitor {
            type Value = JsonEnum;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an enum value's name (e.g. \"SPAN_KIND_CLIENT\") or number")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<JsonEnum, E> {
                self.visit_i128(i128::from(value))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<JsonEnum, E> {
                self.visit_i128(i128::from(value))
            }
            fn visit_i128<E: de::Error>(self, value: i128) -> Result<JsonEnum, E> {
                i32::try_from(value)
                    .map(JsonEnum::Number)
                    .map_err(|_| E::custom(format!("enum number {value} is out of range")))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<JsonEnum, E> {
                self.visit_i128(IntegerVisitor.visit_f64(value)?)
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<JsonEnum, E> {
                Ok(JsonEnum::Name(name.to_string()))
            }
        }
        deserializer.deserialize_any(EnumVisitor)
    }
}

/// A trace or span id: hex in OTLP/JSON (either case), not base64.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HexId(Vec<u8>);

impl<'de> Deserialize<'de> for HexId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        hex::decode(text.as_bytes()).map(HexId).map_err(|error| {
            de::Error::custom(format!(
                "trace and span ids are hex strings in OTLP/JSON (not base64); {text:?}: {error}"
            ))
        })
    }
}

/// A `bytes` field: base64, standard or URL-safe alphabet, padding optional.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base64Bytes(Vec<u8>);

const BASE64_LENIENT_PADDING: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const BASE64_STANDARD: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, BASE64_LENIENT_PADDING);
const BASE64_URL_SAFE: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::URL_SAFE, BASE64_LENIENT_PADDING);

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let engine = if text.contains(['-', '_']) {
            &BASE64_URL_SAFE
        } else {
            &BASE64_STANDARD
        };
        engine
            .decode(text.as_bytes())
            .map(Base64Bytes)
            .map_err(|error| de::Error::custom(format!("bytesValue is not base64: {error}")))
    }
}

/// Unwraps an optional scalar wrapper, `None` (absent or `null`) being the default.
fn integer_or_default<T: Default>(value: Option<JsonInteger<T>>) -> T {
    value.map(|JsonInteger(value)| value).unwrap_or_default()
}

fn hex_or_empty(value: Option<HexId>) -> Vec<u8> {
    value.map(|HexId(bytes)| bytes).unwrap_or_default()
}

/// A list of messages: `null` or absent is empty.
fn list<J, P: From<J>>(values: Option<Vec<J>>) -> Vec<P> {
    values
        .unwrap_or_default()
        .into_iter()
        .map(P::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Messages: every field optional (absent and `null` are the default), unknown fields ignored.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct JsonExportTraceServiceRequest {
    #[serde(rename = "resourceSpans", alias = "resource_spans")]
    resource_spans: Option<Vec<JsonResourceSpans>>,
}

impl From<JsonExportTraceServiceRequest> for ExportTraceServiceRequest {
    fn from(json: JsonExportTraceServiceRequest) -> Self {
        ExportTraceServiceRequest {
            resource_spans: list(json.resource_spans),
        }
    }
}

#[derive(Deserialize)]
struct JsonResourceSpans {
    resource: Option<JsonResource>,
    #[serde(rename = "scopeSpans", alias = "scope_spans")]
    scope_spans: Option<Vec<JsonScopeSpans>>,
    #[serde(rename = "schemaUrl", alias = "schema_url")]
    schema_url: Option<String>,
}

impl From<JsonResourceSpans> for ResourceSpans {
    fn from(json: JsonResourceSpans) -> Self {
        ResourceSpans {
            resource: json.resource.map(Resource::from),
            scope_spans: list(json.scope_spans),
            schema_url: json.schema_url.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct JsonResource {
    attributes: Option<Vec<JsonKeyValue>>,
    #[serde(rename = "droppedAttributesCount", alias = "dropped_attributes_count")]
    dropped_attributes_count: Option<JsonInteger<u32>>,
    #[serde(rename = "entityRefs", alias = "entity_refs")]
    entity_refs: Option<Vec<JsonEntityRef>>,
}

impl From<JsonResource> for Resource {
    fn from(json: JsonResource) -> Self {
        Resource {
            attributes: list(json.attributes),
            dropped_attributes_count: integer_or_default(json.dropped_attributes_count),
            entity_refs: list(json.entity_refs),
        }
    }
}

#[derive(Deserialize)]
struct JsonEntityRef {
    #[serde(rename = "schemaUrl", alias = "schema_url")]
    schema_url: Option<String>,
    #[serde(rename = "type")]
    entity_type: Option<String>,
    #[serde(rename = "idKeys", alias = "id_keys")]
    id_keys: Option<Vec<String>>,
    #[serde(rename = "descriptionKeys", alias = "description_keys")]
    description_keys: Option<Vec<String>>,
}

impl From<JsonEntityRef> for EntityRef {
    fn from(json: JsonEntityRef) -> Self {
        EntityRef {
            schema_url: json.schema_url.unwrap_or_default(),
            r#type: json.entity_type.unwrap_or_default(),
            id_keys: json.id_keys.unwrap_or_default(),
            description_keys: json.description_keys.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct JsonScopeSpans {
    scope: Option<JsonInstrumentationScope>,
    spans: Option<Vec<JsonSpan>>,
    #[serde(rename = "schemaUrl", alias = "schema_url")]
    schema_url: Option<String>,
}

impl From<JsonScopeSpans> for ScopeSpans {
    fn from(json: JsonScopeSpans) -> Self {
        ScopeSpans {
            scope: json.scope.map(InstrumentationScope::from),
            spans: list(json.spans),
            schema_url: json.schema_url.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct JsonInstrumentationScope {
    name: Option<String>,
    version: Option<String>,
    attributes: Option<Vec<JsonKeyValue>>,
    #[serde(rename = "droppedAttributesCount", alias = "dropped_attributes_count")]
    dropped_attributes_count: Option<JsonInteger<u32>>,
}

impl From<JsonInstrumentationScope> for InstrumentationScope {
    fn from(json: JsonInstrumentationScope) -> Self {
        InstrumentationScope {
            name: json.name.unwrap_or_default(),
            version: json.version.unwrap_or_default(),
            attributes: list(json.attributes),
            dropped_attributes_count: integer_or_default(json.dropped_attributes_count),
        }
    }
}

#[derive(Deserialize)]
struct JsonSpan {
    #[serde(rename = "traceId", alias = "trace_id")]
    trace_id: Option<HexId>,
    #[serde(rename = "spanId", alias = "span_id")]
    span_id: Option<HexId>,
    #[serde(rename = "traceState", alias = "trace_state")]
    trace_state: Option<String>,
    #[serde(rename = "parentSpanId", alias = "parent_span_id")]
    parent_span_id: Option<HexId>,
    flags: Option<JsonInteger<u32>>,
    name: Option<String>,
    kind: Option<JsonEnum>,
    #[serde(rename = "startTimeUnixNano", alias = "start_time_unix_nano")]
    start_time_unix_nano: Option<JsonInteger<u64>>,
    #[serde(rename = "endTimeUnixNano", alias = "end_time_unix_nano")]
    end_time_unix_nano: Option<JsonInteger<u64>>,
    attributes: Option<Vec<JsonKeyValue>>,
    #[serde(rename = "droppedAttributesCount", alias = "dropped_attributes_count")]
    dropped_attributes_count: Option<JsonInteger<u32>>,
    events: Option<Vec<JsonEvent>>,
    #[serde(rename = "droppedEventsCount", alias = "dropped_events_count")]
    dropped_events_count: Option<JsonInteger<u32>>,
    links: Option<Vec<JsonLink>>,
    #[serde(rename = "droppedLinksCount", alias = "dropped_links_count")]
    dropped_links_count: Option<JsonInteger<u32>>,
    status: Option<JsonStatus>,
}

impl From<JsonSpan> for Span {
    fn from(json: JsonSpan) -> Self {
        Span {
            trace_id: hex_or_empty(json.trace_id),
            span_id: hex_or_empty(json.span_id),
            trace_state: json.trace_state.unwrap_or_default(),
            parent_span_id: hex_or_empty(json.parent_span_id),
            flags: integer_or_default(json.flags),
            name: json.name.unwrap_or_default(),
            kind: json.kind.map_or(0, |kind| {
                kind.number(|name| span::SpanKind::from_str_name(name).map(|kind| kind as i32))
            }),
            start_time_unix_nano: integer_or_default(json.start_time_unix_nano),
            end_time_unix_nano: integer_or_default(json.end_time_unix_nano),
            attributes: list(json.attributes),
            dropped_attributes_count: integer_or_default(json.dropped_attributes_count),
            events: list(json.events),
            dropped_events_count: integer_or_default(json.dropped_events_count),
            links: list(json.links),
            dropped_links_count: integer_or_default(json.dropped_links_count),
            status: json.status.map(Status::from),
        }
    }
}

#[derive(Deserialize)]
struct JsonEvent {
    #[serde(rename = "timeUnixNano", alias = "time_unix_nano")]
    time_unix_nano: Option<JsonInteger<u64>>,
    name: Option<String>,
    attributes: Option<Vec<JsonKeyValue>>,
    #[serde(rename = "droppedAttributesCount", alias = "dropped_attributes_count")]
    dropped_attributes_count: Option<JsonInteger<u32>>,
}

impl From<JsonEvent> for span::Event {
    fn from(json: JsonEvent) -> Self {
        span::Event {
            time_unix_nano: integer_or_default(json.time_unix_nano),
            name: json.name.unwrap_or_default(),
            attributes: list(json.attributes),
            dropped_attributes_count: integer_or_default(json.dropped_attributes_count),
        }
    }
}

#[derive(Deserialize)]
struct JsonLink {
    #[serde(rename = "traceId", alias = "trace_id")]
    trace_id: Option<HexId>,
    #[serde(rename = "spanId", alias = "span_id")]
    span_id: Option<HexId>,
    #[serde(rename = "traceState", alias = "trace_state")]
    trace_state: Option<String>,
    attributes: Option<Vec<JsonKeyValue>>,
    #[serde(rename = "droppedAttributesCount", alias = "dropped_attributes_count")]
    dropped_attributes_count: Option<JsonInteger<u32>>,
    flags: Option<JsonInteger<u32>>,
}

impl From<JsonLink> for span::Link {
    fn from(json: JsonLink) -> Self {
        span::Link {
            trace_id: hex_or_empty(json.trace_id),
            span_id: hex_or_empty(json.span_id),
            trace_state: json.trace_state.unwrap_or_default(),
            attributes: list(json.attributes),
            dropped_attributes_count: integer_or_default(json.dropped_attributes_count),
            flags: integer_or_default(json.flags),
        }
    }
}

#[derive(Deserialize)]
struct JsonStatus {
    message: Option<String>,
    code: Option<JsonEnum>,
}

impl From<JsonStatus> for Status {
    fn from(json: JsonStatus) -> Self {
        Status {
            message: json.message.unwrap_or_default(),
            code: json.code.map_or(0, |code| {
                code.number(|name| status::StatusCode::from_str_name(name).map(|code| code as i32))
            }),
        }
    }
}

#[derive(Deserialize)]
struct JsonKeyValue {
    key: Option<String>,
    value: Option<JsonAnyValue>,
    #[serde(rename = "keyStrindex", alias = "key_strindex")]
    key_strindex: Option<JsonInteger<i32>>,
}

impl From<JsonKeyValue> for KeyValue {
    fn from(json: JsonKeyValue) -> Self {
        KeyValue {
            key: json.key.unwrap_or_default(),
            value: json.value.map(AnyValue::from),
            key_strindex: integer_or_default(json.key_strindex),
        }
    }
}

/// `AnyValue`: a oneof, so at most one of its fields may be set (a `null` one counts as unset).
struct JsonAnyValue(Option<any_value::Value>);

#[derive(Deserialize)]
struct JsonAnyValueFields {
    #[serde(rename = "stringValue", alias = "string_value")]
    string_value: Option<String>,
    #[serde(rename = "boolValue", alias = "bool_value")]
    bool_value: Option<bool>,
    #[serde(rename = "intValue", alias = "int_value")]
    int_value: Option<JsonInteger<i64>>,
    #[serde(rename = "doubleValue", alias = "double_value")]
    double_value: Option<JsonDouble>,
    #[serde(rename = "arrayValue", alias = "array_value")]
    array_value: Option<JsonValues<JsonAnyValue>>,
    #[serde(rename = "kvlistValue", alias = "kvlist_value")]
    kvlist_value: Option<JsonValues<JsonKeyValue>>,
    #[serde(rename = "bytesValue", alias = "bytes_value")]
    bytes_value: Option<Base64Bytes>,
    #[serde(rename = "stringValueStrindex", alias = "string_value_strindex")]
    string_value_strindex: Option<JsonInteger<i32>>,
}

/// `ArrayValue` and `KeyValueList`: `{"values": [...]}`.
#[derive(Deserialize)]
struct JsonValues<T> {
    values: Option<Vec<T>>,
}

impl<'de> Deserialize<'de> for JsonAnyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use any_value::Value;
        let fields = JsonAnyValueFields::deserialize(deserializer)?;
        let mut variants = Vec::new();
        if let Some(text) = fields.string_value {
            variants.push(("stringValue", Value::StringValue(text)));
        }
        if let Some(flag) = fields.bool_value {
            variants.push(("boolValue", Value::BoolValue(flag)));
        }
        if let Some(JsonInteger(number)) = fields.int_value {
            variants.push(("intValue", Value::IntValue(number)));
        }
        if let Some(JsonDouble(number)) = fields.double_value {
            variants.push(("doubleValue", Value::DoubleValue(number)));
        }
        if let Some(array) = fields.array_value {
            variants.push((
                "arrayValue",
                Value::ArrayValue(ArrayValue {
                    values: list(array.values),
                }),
            ));
        }
        if let Some(kvlist) = fields.kvlist_value {
            variants.push((
                "kvlistValue",
                Value::KvlistValue(KeyValueList {
                    values: list(kvlist.values),
                }),
            ));
        }
        if let Some(Base64Bytes(bytes)) = fields.bytes_value {
            variants.push(("bytesValue", Value::BytesValue(bytes)));
        }
        if let Some(JsonInteger(index)) = fields.string_value_strindex {
            variants.push(("stringValueStrindex", Value::StringValueStrindex(index)));
        }
        if variants.len() > 1 {
            let names: Vec<&str> = variants.iter().map(|(name, _)| *name).collect();
            return Err(de::Error::custom(format!(
                "an AnyValue holds one value, this one sets {}",
                names.join(" and ")
            )));
        }
        Ok(JsonAnyValue(variants.pop().map(|(_, value)| value)))
    }
}

impl From<JsonAnyValue> for AnyValue {
    fn from(json: JsonAnyValue) -> Self {
        AnyValue { value: json.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use any_value::Value;

    fn decode(text: &str) -> Result<ExportTraceServiceRequest, String> {
        decode_export_request(text.as_bytes()).map_err(|error| error.to_string())
    }

    /// The single span of a request of one resource and one scope.
    fn only_span(text: &str) -> Span {
        let request = decode(text).unwrap_or_else(|error| panic!("{error}: {text}"));
        assert_eq!(request.resource_spans.len(), 1);
        assert_eq!(request.resource_spans[0].scope_spans.len(), 1);
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 1);
        spans[0].clone()
    }

    fn span_json(span: &str) -> String {
        format!(r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{span}]}}]}}]}}"#)
    }

    fn attribute_value(value: &str) -> Result<Option<Value>, String> {
        let request = decode(&span_json(&format!(
            r#"{{"attributes":[{{"key":"k","value":{value}}}]}}"#
        )))?;
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        Ok(span.attributes[0]
            .value
            .as_ref()
            .and_then(|any| any.value.clone()))
    }

    #[test]
    fn reads_lower_camel_case_field_names() {
        let span = only_span(
            r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"agent"}}],"droppedAttributesCount":1},
               "schemaUrl":"s","scopeSpans":[{"scope":{"name":"manual","version":"1"},"schemaUrl":"t","spans":[{
               "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
               "parentSpanId":"eee19b7ec3c1b175","traceState":"a=b","name":"chat","kind":3,
               "startTimeUnixNano":"1765815103000000000","endTimeUnixNano":"1765815104000000000",
               "droppedAttributesCount":2,"droppedEventsCount":3,"droppedLinksCount":4,"flags":257,
               "events":[{"timeUnixNano":"5","name":"e"}],
               "links":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b176"}],
               "status":{"code":2,"message":"boom"}}]}]}]}"#,
        );
        assert_eq!(
            hex::encode(&span.trace_id),
            "5b8efff798038103d269b633813fc60c"
        );
        assert_eq!(hex::encode(&span.span_id), "eee19b7ec3c1b174");
        assert_eq!(hex::encode(&span.parent_span_id), "eee19b7ec3c1b175");
        assert_eq!(span.trace_state, "a=b");
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        assert_eq!(span.start_time_unix_nano, 1_765_815_103_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_765_815_104_000_000_000);
        assert_eq!(
            (
                span.dropped_attributes_count,
                span.dropped_events_count,
                span.dropped_links_count
            ),
            (2, 3, 4)
        );
        assert_eq!(span.flags, 257);
        assert_eq!(span.events[0].time_unix_nano, 5);
        assert_eq!(hex::encode(&span.links[0].span_id), "eee19b7ec3c1b176");
        let status = span.status.unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "boom"));
    }

    #[test]
    fn reads_original_proto_field_names_like_the_camel_case_ones() {
        let camel = decode(
            r#"{"resourceSpans":[{"resource":{"droppedAttributesCount":1},"schemaUrl":"s","scopeSpans":[{"schemaUrl":"t","spans":[{
               "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","parentSpanId":"eee19b7ec3c1b175",
               "traceState":"a=b","startTimeUnixNano":"1","endTimeUnixNano":"2","droppedAttributesCount":3,
               "droppedEventsCount":4,"droppedLinksCount":5,
               "events":[{"timeUnixNano":"6","droppedAttributesCount":7}],
               "links":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b176","traceState":"c=d","droppedAttributesCount":8}],
               "attributes":[{"key":"k","keyStrindex":9,"value":{"intValue":"10"}},{"key":"b","value":{"boolValue":true}},
                 {"key":"d","value":{"doubleValue":1.5}},{"key":"a","value":{"arrayValue":{"values":[{"stringValue":"x"}]}}},
                 {"key":"l","value":{"kvlistValue":{"values":[{"key":"y","value":{"bytesValue":"AQI="}}]}}},
                 {"key":"s","value":{"stringValueStrindex":11}}]}]}]}]}"#,
        )
        .unwrap();
        let snake = decode(
            r#"{"resource_spans":[{"resource":{"dropped_attributes_count":1},"schema_url":"s","scope_spans":[{"schema_url":"t","spans":[{
               "trace_id":"5b8efff798038103d269b633813fc60c","span_id":"eee19b7ec3c1b174","parent_span_id":"eee19b7ec3c1b175",
               "trace_state":"a=b","start_time_unix_nano":"1","end_time_unix_nano":"2","dropped_attributes_count":3,
               "dropped_events_count":4,"dropped_links_count":5,
               "events":[{"time_unix_nano":"6","dropped_attributes_count":7}],
               "links":[{"trace_id":"5b8efff798038103d269b633813fc60c","span_id":"eee19b7ec3c1b176","trace_state":"c=d","dropped_attributes_count":8}],
               "attributes":[{"key":"k","key_strindex":9,"value":{"int_value":"10"}},{"key":"b","value":{"bool_value":true}},
                 {"key":"d","value":{"double_value":1.5}},{"key":"a","value":{"array_value":{"values":[{"string_value":"x"}]}}},
                 {"key":"l","value":{"kvlist_value":{"values":[{"key":"y","value":{"bytes_value":"AQI="}}]}}},
                 {"key":"s","value":{"string_value_strindex":11}}]}]}]}]}"#,
        )
        .unwrap();
        assert_eq!(camel, snake);
        let span = &snake.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.start_time_unix_nano, 1);
        assert_eq!(span.links[0].dropped_attributes_count, 8);
        assert_eq!(span.attributes[0].key_strindex, 9);
        assert_eq!(span.attributes.len(), 6);
    }

    #[test]
    fn refuses_a_field_given_under_both_names() {
        let error = decode(&span_json(
            r#"{"traceId":"5b8efff798038103d269b633813fc60c","trace_id":"5b8efff798038103d269b633813fc60c"}"#,
        ))
        .unwrap_err();
        assert!(error.contains("duplicate field"), "{error}");
    }

    #[test]
    fn ignores_unknown_fields_at_every_level() {
        let span = only_span(
            r#"{"future":{"deep":[1,{"x":null}]},"resourceSpans":[{"unknownA":1,"scopeSpans":[{"unknownB":"x",
               "spans":[{"name":"n","unknownC":[true],"status":{"code":1,"unknownD":{}},
               "attributes":[{"key":"k","unknownE":2,"value":{"stringValue":"v","unknownF":3}}]}]}]}]}"#,
        );
        assert_eq!(span.name, "n");
        assert_eq!(
            span.attributes[0].value.as_ref().unwrap().value,
            Some(Value::StringValue("v".to_string()))
        );
    }

    #[test]
    fn reads_enum_values_by_name_or_number() {
        let by_name = only_span(&span_json(
            r#"{"kind":"SPAN_KIND_CLIENT","status":{"code":"STATUS_CODE_ERROR"}}"#,
        ));
        assert_eq!(by_name.kind, span::SpanKind::Client as i32);
        assert_eq!(
            by_name.status.unwrap().code,
            status::StatusCode::Error as i32
        );
        let by_number = only_span(&span_json(r#"{"kind":5,"status":{"code":"2"}}"#));
        assert_eq!(by_number.kind, span::SpanKind::Consumer as i32);
        // A numeric string is not a name: read as an unknown name, i.e. unset.
        assert_eq!(by_number.status.unwrap().code, 0);
        for (kind, expected) in [
            ("SPAN_KIND_INTERNAL", 1),
            ("SPAN_KIND_SERVER", 2),
            ("SPAN_KIND_PRODUCER", 4),
            ("SPAN_KIND_UNSPECIFIED", 0),
        ] {
            let span = only_span(&span_json(&format!(r#"{{"kind":"{kind}"}}"#)));
            assert_eq!(span.kind, expected, "{kind}");
        }
    }

    #[test]
    fn reads_an_unknown_enum_name_as_unspecified_and_refuses_an_out_of_range_number() {
        let span = only_span(&span_json(
            r#"{"kind":"SPAN_KIND_FROM_THE_FUTURE","status":{"code":"STATUS_CODE_MAYBE"}}"#,
        ));
        assert_eq!((span.kind, span.status.unwrap().code), (0, 0));
        // Unknown numbers are kept, as proto3 enums are open.
        assert_eq!(only_span(&span_json(r#"{"kind":9}"#)).kind, 9);
        let error = decode(&span_json(r#"{"kind":2147483648}"#)).unwrap_err();
        assert!(error.contains("out of range"), "{error}");
        assert!(decode(&span_json(r#"{"kind":true}"#)).is_err());
    }

    #[test]
    fn reads_64_bit_integers_as_strings_or_numbers_exactly() {
        let cases = [
            (r#""1765815103123456789""#, 1_765_815_103_123_456_789_u64),
            ("1765815103123456789", 1_765_815_103_123_456_789),
            (r#""18446744073709551615""#, u64::MAX),
            ("18446744073709551615", u64::MAX),
            (r#""1.765815103123456789e18""#, 1_765_815_103_123_456_789),
            (r#""17658151031234567890e-1""#, 1_765_815_103_123_456_789),
            ("1e3", 1000),
            (r#""1E3""#, 1000),
            ("5.0", 5),
            (r#""-0""#, 0),
            ("0", 0),
        ];
        for (given, expected) in cases {
            let span = only_span(&span_json(&format!(r#"{{"startTimeUnixNano":{given}}}"#)));
            assert_eq!(span.start_time_unix_nano, expected, "{given}");
        }
        assert_eq!(
            attribute_value(r#"{"intValue":"-9223372036854775808"}"#).unwrap(),
            Some(Value::IntValue(i64::MIN))
        );
        assert_eq!(
            attribute_value(r#"{"intValue":-42}"#).unwrap(),
            Some(Value::IntValue(-42))
        );
    }

    #[test]
    fn refuses_integers_that_are_fractional_out_of_range_or_not_numbers() {
        for given in [
            r#""18446744073709551616""#,
            "18446744073709551616",
            r#""-1""#,
            "-1",
            "1.5",
            r#""1.5""#,
            r#""1e-1""#,
            r#""""#,
            r#"" 1""#,
            r#""0x10""#,
            r#""1.""#,
            r#""e5""#,
            r#""1e""#,
            r#""1e99999999999""#,
            "true",
            "[1]",
        ] {
            let result = decode(&span_json(&format!(r#"{{"startTimeUnixNano":{given}}}"#)));
            assert!(result.is_err(), "{given} accepted: {result:?}");
        }
        let error = decode(&span_json(r#"{"droppedAttributesCount":4294967296}"#)).unwrap_err();
        assert!(error.contains("out of range for a u32"), "{error}");
        assert_eq!(parse_decimal_integer("0e99999999999"), Some(0));
    }

    #[test]
    fn reads_hex_ids_in_either_case_and_refuses_base64_ones() {
        let span = only_span(&span_json(
            r#"{"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19b7ec3c1b174","parentSpanId":""}"#,
        ));
        assert_eq!(
            hex::encode(&span.trace_id),
            "5b8efff798038103d269b633813fc60c"
        );
        assert_eq!(hex::encode(&span.span_id), "eee19b7ec3c1b174");
        assert!(span.parent_span_id.is_empty());
        // The same trace id in base64, as plain ProtoJSON would encode it.
        let error = decode(&span_json(r#"{"traceId":"W47/95gDgQPSabYzgT/GDA=="}"#)).unwrap_err();
        assert!(
            error.contains("hex strings in OTLP/JSON (not base64)"),
            "{error}"
        );
        assert!(decode(&span_json(r#"{"spanId":"abc"}"#)).is_err());
        assert!(decode(&span_json(r#"{"spanId":12}"#)).is_err());
    }

    #[test]
    fn reads_every_any_value_variant() {
        assert_eq!(
            attribute_value(r#"{"stringValue":"text"}"#).unwrap(),
            Some(Value::StringValue("text".to_string()))
        );
        assert_eq!(
            attribute_value(r#"{"boolValue":true}"#).unwrap(),
            Some(Value::BoolValue(true))
        );
        assert_eq!(
            attribute_value(r#"{"intValue":"12"}"#).unwrap(),
            Some(Value::IntValue(12))
        );
        assert_eq!(
            attribute_value(r#"{"doubleValue":0.25}"#).unwrap(),
            Some(Value::DoubleValue(0.25))
        );
        assert_eq!(
            attribute_value(r#"{"doubleValue":3}"#).unwrap(),
            Some(Value::DoubleValue(3.0))
        );
        assert_eq!(
            attribute_value(r#"{"doubleValue":"2.5e1"}"#).unwrap(),
            Some(Value::DoubleValue(25.0))
        );
        assert_eq!(
            attribute_value(r#"{"doubleValue":"-Infinity"}"#).unwrap(),
            Some(Value::DoubleValue(f64::NEG_INFINITY))
        );
        assert!(matches!(
            attribute_value(r#"{"doubleValue":"NaN"}"#).unwrap(),
            Some(Value::DoubleValue(number)) if number.is_nan()
        ));
        assert!(attribute_value(r#"{"doubleValue":"inf"}"#).is_err());
        assert_eq!(
            attribute_value(r#"{"arrayValue":{"values":[{"intValue":1},{"stringValue":"b"}]}}"#)
                .unwrap(),
            Some(Value::ArrayValue(ArrayValue {
                values: vec![
                    AnyValue {
                        value: Some(Value::IntValue(1))
                    },
                    AnyValue {
                        value: Some(Value::StringValue("b".to_string()))
                    },
                ]
            }))
        );
        assert_eq!(
            attribute_value(
                r#"{"kvlistValue":{"values":[{"key":"inner","value":{"boolValue":false}}]}}"#
            )
            .unwrap(),
            Some(Value::KvlistValue(KeyValueList {
                values: vec![KeyValue {
                    key: "inner".to_string(),
                    value: Some(AnyValue {
                        value: Some(Value::BoolValue(false))
                    }),
                    key_strindex: 0,
                }]
            }))
        );
        assert_eq!(attribute_value("{}").unwrap(), None);
        assert_eq!(
            attribute_value(r#"{"arrayValue":{}}"#).unwrap(),
            Some(Value::ArrayValue(ArrayValue { values: vec![] }))
        );
    }

    #[test]
    fn reads_bytes_values_as_base64_in_both_alphabets_with_or_without_padding() {
        for given in ["+/8=", "+/8", "-_8=", "-_8"] {
            assert_eq!(
                attribute_value(&format!(r#"{{"bytesValue":"{given}"}}"#)).unwrap(),
                Some(Value::BytesValue(vec![0xfb, 0xff])),
                "{given}"
            );
        }
        let error = attribute_value(r#"{"bytesValue":"not base64!"}"#).unwrap_err();
        assert!(error.contains("bytesValue is not base64"), "{error}");
    }

    #[test]
    fn refuses_an_any_value_with_two_variants() {
        let error = attribute_value(r#"{"stringValue":"a","intValue":"1"}"#).unwrap_err();
        assert!(error.contains("sets stringValue and intValue"), "{error}");
        // A null variant is unset, so the other one is the value.
        assert_eq!(
            attribute_value(r#"{"stringValue":null,"intValue":"1"}"#).unwrap(),
            Some(Value::IntValue(1))
        );
    }

    #[test]
    fn reads_null_as_the_default_but_refuses_null_list_elements() {
        let span = only_span(
            r#"{"resourceSpans":[{"resource":null,"schemaUrl":null,"scopeSpans":[{"scope":null,"spans":[{
               "traceId":null,"name":null,"kind":null,"startTimeUnixNano":null,"attributes":null,
               "events":null,"links":null,"status":null,"flags":null}]}]}]}"#,
        );
        assert_eq!(span, Span::default());
        assert_eq!(
            decode(r#"{"resourceSpans":null}"#).unwrap(),
            ExportTraceServiceRequest::default()
        );
        assert_eq!(decode("{}").unwrap(), ExportTraceServiceRequest::default());
        assert!(decode(r#"{"resourceSpans":[null]}"#).is_err());
    }

    #[test]
    fn refuses_what_is_not_an_export_request() {
        for given in [
            "",
            "[]",
            "null",
            r#"{"resourceSpans":1}"#,
            r#"{"resourceSpans":[{"scopeSpans":{}}]}"#,
            r#"{"resourceSpans":[]} trailing"#,
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":7}]}]}]}"#,
        ] {
            let error = decode(given).unwrap_err();
            assert!(
                error.starts_with("invalid OTLP/JSON ExportTraceServiceRequest: "),
                "{error}"
            );
        }
    }

    #[test]
    fn decodes_what_the_opentelemetry_proto_serializer_writes() {
        // OTLP/JSON as opentelemetry-proto's serde encodes it (what Rust exporters send).
        let span = Span {
            trace_id: vec![0x5b; 16],
            span_id: vec![0xee; 8],
            name: "value.action".to_string(),
            kind: 3,
            start_time_unix_nano: 1_765_815_103_000_000_001,
            attributes: vec![KeyValue {
                key: "n".to_string(),
                value: Some(AnyValue {
                    value: Some(Value::IntValue(i64::MAX)),
                }),
                key_strindex: 0,
            }],
            status: Some(Status {
                message: String::new(),
                code: 2,
            }),
            ..Span::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource::default()),
                scope_spans: vec![ScopeSpans {
                    scope: None,
                    spans: vec![span],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let encoded = serde_json::to_vec(&request).unwrap();
        assert_eq!(decode_export_request(&encoded).unwrap(), request);
    }
}
