//! `actions.enriched` records: arbitrary bytes → `decode_enriched_action` (the schema-specific
//! decoder the aggregator runs on every record).
//!
//! Invariants: nothing panics; whatever decodes re-encodes, the re-encoded bytes decode to the
//! same action and are a fixed point of decode∘encode; and apache-avro's generic reader of
//! `enriched_action.avsc` agrees (same action, or both refuse), except for the two documented
//! differences (`reference_avro::expected_disagreement`: overlong varints, short decimals).

#![no_main]

use agentmeter_fuzz::{check_enriched_round_trip, reference_avro};
use agentmeter_schemas::{decode_enriched_action, encode_enriched_action, CodecError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fast = decode_enriched_action(data);
    let reference = reference_avro::decode_enriched_action(data);
    match (&fast, &reference) {
        (Ok(fast), Ok(reference)) => assert_eq!(fast, reference, "decoders disagree"),
        (Err(_), Err(_)) => {}
        (Err(CodecError::Field { problem, .. }), Ok(_))
            if reference_avro::expected_disagreement(Some(problem), None) => {}
        (Ok(_), Err(error)) if reference_avro::expected_disagreement(None, Some(error)) => {}
        (fast, reference) => {
            panic!(
                "binary decoder: {fast:?}
apache-avro reference: {reference:?}"
            )
        }
    }
    if let Ok(action) = fast {
        let bytes = check_enriched_round_trip(&action);
        let again = decode_enriched_action(&bytes).expect("checked above");
        assert_eq!(encode_enriched_action(&again).expect("encoded once"), bytes);
    }
});
