//! The contracts between agentmeter's stages, with no I/O.
//!
//! * [`action`] — [`RawAction`] (on `actions.raw`) and [`EnrichedAction`] (on `actions.enriched`),
//!   and the Kafka message key that sends duplicates of one action to one partition.
//! * [`avro`] — their Avro encoding. The `.avsc` files under `schemas/avro/` are the source of
//!   truth; Kafka values use Avro single-object encoding (`C3 01` + schema fingerprint + datum).
//! * [`decimal`] — exact money and quantity mapping between `rust_decimal`, Avro `decimal` and
//!   ClickHouse `Decimal(38, 12)`; overflow is an error, never a rounding.
//! * [`metering`] — a workspace's metering configuration (file format, validation, the compiled
//!   immutable snapshot the stages share, secret hashing).
//! * [`rest`] — the JSON body of ingest's `POST /v1/actions`.

pub mod action;
pub mod avro;
pub mod decimal;
pub mod metering;
pub mod rest;

pub use action::{message_key, ActionKind, CostSource, EnrichedAction, RawAction};
pub use avro::{
    decode_enriched_action, decode_raw_action, encode_enriched_action, encode_raw_action,
    CodecError,
};
pub use metering::{ConfigRecord, MeteringConfig, WorkspaceSnapshot};
