//! Outcomes derived from several actions (issue 11, [ADR 0005](../../docs/adr/0005-derived-outcomes.md)).
//!
//! * [`composite`] — the matcher: which firings of one composite definition the constituents of
//!   one context (an agent instance and a user or an attribute value) make. A pure function of
//!   the set of constituents, whatever order they arrived in; re-deriving from an instant on,
//!   with the earlier firings kept, gives what deriving everything gives — which is what lets
//!   the `outcomes` stage re-derive only the contexts and times that new actions touch.
//! * [`derivation`] — which contexts a stored action belongs to and touches, and every firing
//!   of one context: what the `outcomes` stage (`src/outcomes_stage.rs`) writes, as a pure
//!   function of the stored actions and the definitions.

pub mod composite;
pub mod derivation;
