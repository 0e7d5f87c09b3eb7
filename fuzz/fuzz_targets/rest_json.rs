//! `POST /v1/actions` and `POST /v1/outcomes`: arbitrary bytes → `RestActionBatch` (serde_json)
//! → `rest_action_to_raw` for each item, or → `RestOutcomeBatch` → `rest_outcome_to_raw`, for
//! Acme's research agent at the fixed clock.
//!
//! Invariants: nothing panics; every accepted action carries the identity of the secret and its
//! Avro record reads back unchanged (ingest encodes only after every item validated, so an
//! encoding failure would turn an accepted batch into a 400 half-way); an accepted outcome event
//! is of kind `outcome` and its value is a storable quantity.

#![no_main]

use agentmeter_fuzz::{check_accepted_raw_action, EXAMPLE_IDENTITY, FIXED_LIMITS};
use agentmeter_ingest::normalize::{rest_action_to_raw, rest_outcome_to_raw};
use agentmeter_schemas::limits::check_quantity;
use agentmeter_schemas::rest::{RestActionBatch, RestOutcomeBatch};
use agentmeter_schemas::ActionKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = serde_json::from_slice::<RestActionBatch>(data) {
        for item in batch.actions {
            let given_event_id = item.event_id.clone();
            let Ok(action) = rest_action_to_raw(item, &EXAMPLE_IDENTITY, &FIXED_LIMITS, "rest")
            else {
                continue;
            };
            if let Some(given) = given_event_id {
                assert_eq!(
                    action.event_id, given,
                    "a client's event_id is kept as given"
                );
            }
            assert_eq!(action.source, "rest");
            check_accepted_raw_action(&action);
        }
    }
    if let Ok(batch) = serde_json::from_slice::<RestOutcomeBatch>(data) {
        for item in batch.outcomes {
            let given_event_id = item.event_id.clone();
            let Ok(event) = rest_outcome_to_raw(item, &EXAMPLE_IDENTITY, &FIXED_LIMITS, "rest")
            else {
                continue;
            };
            if let Some(given) = given_event_id {
                assert_eq!(event.event_id, given, "a client's event_id is kept as given");
            }
            assert_eq!(event.kind, ActionKind::Outcome);
            assert!(check_quantity("value", event.outcome_quantity()).is_ok());
            check_accepted_raw_action(&event);
        }
    }
});
