//! The contracts between agentmeter's stages, with no I/O.
//!
//! * [`action`] — [`RawAction`] (on `actions.raw`) and [`EnrichedAction`] (on `actions.enriched`),
//!   and the Kafka message key that sends duplicates of one action to one partition.
//! * [`avro`] — their Avro encoding. The `.avsc` files under `schemas/avro/` are the source of
//!   truth; Kafka values use Avro single-object encoding (`C3 01` + schema fingerprint + datum).
//! * [`decimal`] — exact money and quantity mapping between `rust_decimal`, Avro `decimal` and
//!   ClickHouse `Decimal(38, 12)`; overflow is an error, never a rounding.
//! * [`limits`] — the accepted range of every value an action carries, checked by the first
//!   stage that sees it, and why no accepted action can make a total leave its column type.
//! * [`text`] — what names (grouped and billed by) and free texts may contain.
//! * [`metering`] — a workspace's metering configuration (file format, validation, the compiled
//!   immutable snapshot the stages share, secret hashing).
//! * [`condition`] — the `when` of an outcome definition: a typed condition tree over an
//!   action's fields and attributes, checked at `config apply` and evaluated by the enricher.
//! * [`catalog`] — the billing catalog in the same configuration: products, rate plans,
//!   charges and their models, subscriptions, and their validation.
//! * [`rest`] — the JSON bodies of ingest's `POST /v1/actions` and `POST /v1/outcomes`.

pub mod action;
pub mod avro;
pub mod catalog;
pub mod condition;
pub mod decimal;
pub mod limits;
pub mod metering;
pub mod rest;
pub mod text;

pub use action::{message_key, ActionKind, CostSource, EnrichedAction, RawAction};
pub use avro::{
    decode_enriched_action, decode_raw_action, encode_enriched_action, encode_raw_action,
    CodecError,
};
pub use metering::{ConfigRecord, MeteringConfig, WorkspaceSnapshot};
