//! The composite matcher (ADR 0005, "The matcher").
//!
//! A context's constituents are visited in `(occurred_at, event_id)` order. A constituent that
//! can complete a firing — of an ordered pattern, an instance of its last step; of a set, an
//! instance of any step — looks back over `[its time − within, its time]` for the earliest
//! unconsumed instances of the other steps (of an ordered pattern, each after the one before,
//! in the order listed). If it finds them all, the firing happens at its time and consumes
//! them: a constituent counts toward at most one firing of a pattern.
//!
//! Whether a constituent at time *t* fires depends only on the constituents visited before it
//! and on which of them earlier firings consumed. So adding a constituent at *t* changes only
//! firings completing at or after *t*, and [`derive_from`] — the firings before *t* kept, the
//! rest derived again — gives exactly what [`derive`] over the whole set gives. The property
//! tests below check both against a brute-force reference and against every arrival order.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

/// What a composite outcome is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The action names of its steps (a name may appear more than once).
    pub steps: Vec<String>,
    /// Whether the steps must occur in the order listed (ties in time are ordered by event id).
    pub ordered: bool,
    /// The longest time from a firing's first constituent to its completing one, in µs.
    pub within_micros: i64,
}

/// One stored action of a context that is an instance of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constituent {
    pub event_id: String,
    pub action_name: String,
    pub occurred_at_micros: i64,
}

/// One firing of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// When it fired: the time of its completing constituent.
    pub at_micros: i64,
    /// The event ids of its constituents in `(occurred_at, event_id)` order; the completing
    /// one is last.
    pub event_ids: Vec<String>,
}

impl Firing {
    /// The completing constituent's event id.
    pub fn completed_by(&self) -> &str {
        self.event_ids.last().map_or("", String::as_str)
    }

    /// The firing's id: the same for the same constituents of the same definition, whoever
    /// derives it and however often (ADR 0005, "Rows").
    pub fn id(&self, workspace: &str, definition: &str) -> String {
        let mut ids: Vec<&str> = self.event_ids.iter().map(String::as_str).collect();
        ids.sort_unstable();
        let mut hasher = Sha256::new();
        for part in [workspace, definition].into_iter().chain(ids) {
            hasher.update(part.as_bytes());
            hasher.update([0x1f]);
        }
        hasher.finalize()[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

/// Every firing `constituents` make, in order. Constituents of other names are ignored, and a
/// re-sent event id counts once.
pub fn derive(pattern: &Pattern, constituents: &[Constituent]) -> Vec<Firing> {
    derive_from(pattern, constituents, &[], i64::MIN)
}

/// The firings completing at or after `from_micros`, given `kept`: the firings completing before
/// it, as an earlier derivation found them (their constituents stay consumed). With `kept` =
/// the firings of [`derive`] before `from_micros`, the answer is the rest of [`derive`]'s.
pub fn derive_from(
    pattern: &Pattern,
    constituents: &[Constituent],
    kept: &[Firing],
    from_micros: i64,
) -> Vec<Firing> {
    let Some(last_step) = pattern.steps.last() else {
        return Vec::new();
    };
    let mut sorted: Vec<&Constituent> = constituents
        .iter()
        .filter(|constituent| pattern.steps.contains(&constituent.action_name))
        .collect();
    sorted.sort_by(|a, b| {
        (a.occurred_at_micros, &a.event_id).cmp(&(b.occurred_at_micros, &b.event_id))
    });
    // A re-sent action is one constituent.
    let mut seen = HashSet::new();
    sorted.retain(|constituent| seen.insert(constituent.event_id.as_str()));

    let mut consumed: Vec<bool> = {
        let kept_ids: HashSet<&str> = kept
            .iter()
            .flat_map(|firing| firing.event_ids.iter().map(String::as_str))
            .collect();
        sorted
            .iter()
            .map(|constituent| kept_ids.contains(constituent.event_id.as_str()))
            .collect()
    };
    let mut firings = Vec::new();
    for index in 0..sorted.len() {
        let completing = sorted[index];
        if completing.occurred_at_micros < from_micros || consumed[index] {
            continue;
        }
        let can_complete = !pattern.ordered || &completing.action_name == last_step;
        if !can_complete {
            continue;
        }
        let earliest = completing
            .occurred_at_micros
            .saturating_sub(pattern.within_micros);
        let window_start = sorted[..index].partition_point(|c| c.occurred_at_micros < earliest);
        let Some(chosen) = (if pattern.ordered {
            earliest_sequence(
                &pattern.steps[..pattern.steps.len() - 1],
                &sorted,
                &consumed,
                window_start..index,
            )
        } else {
            let mut others = pattern.steps.clone();
            let own = others
                .iter()
                .position(|step| step == &completing.action_name)
                .expect("constituents are instances of a step");
            others.remove(own);
            earliest_set(&others, &sorted, &consumed, window_start..index)
        }) else {
            continue;
        };
        let mut members = chosen;
        members.sort_unstable();
        members.push(index);
        for &member in &members {
            consumed[member] = true;
        }
        firings.push(Firing {
            at_micros: completing.occurred_at_micros,
            event_ids: members
                .iter()
                .map(|&member| sorted[member].event_id.clone())
                .collect(),
        });
    }
    firings
}

/// The earliest unconsumed instances of `steps`, in that order, at positions in `range`.
fn earliest_sequence(
    steps: &[String],
    sorted: &[&Constituent],
    consumed: &[bool],
    range: std::ops::Range<usize>,
) -> Option<Vec<usize>> {
    let mut chosen = Vec::with_capacity(steps.len());
    let mut next = range.start;
    for step in steps {
        let found = (next..range.end)
            .find(|&position| !consumed[position] && &sorted[position].action_name == step)?;
        chosen.push(found);
        next = found + 1;
    }
    Some(chosen)
}

/// The earliest unconsumed instances of `steps` in any order (distinct), at positions in
/// `range`.
fn earliest_set(
    steps: &[String],
    sorted: &[&Constituent],
    consumed: &[bool],
    range: std::ops::Range<usize>,
) -> Option<Vec<usize>> {
    let mut chosen: Vec<usize> = Vec::with_capacity(steps.len());
    for step in steps {
        let found = range.clone().find(|&position| {
            !consumed[position]
                && &sorted[position].action_name == step
                && !chosen.contains(&position)
        })?;
        chosen.push(found);
    }
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn constituent(event_id: &str, action_name: &str, at: i64) -> Constituent {
        Constituent {
            event_id: event_id.to_string(),
            action_name: action_name.to_string(),
            occurred_at_micros: at,
        }
    }

    fn pattern(steps: &[&str], ordered: bool, within: i64) -> Pattern {
        Pattern {
            steps: steps.iter().map(|step| step.to_string()).collect(),
            ordered,
            within_micros: within,
        }
    }

    fn ids(firings: &[Firing]) -> Vec<Vec<&str>> {
        firings
            .iter()
            .map(|firing| firing.event_ids.iter().map(String::as_str).collect())
            .collect()
    }

    #[test]
    fn research_completed_is_a_search_then_a_call_then_a_delivery_within_the_window() {
        let research = pattern(&["web_search", "llm_call", "delivery"], true, 15);
        let actions = [
            constituent("s1", "web_search", 0),
            constituent("d0", "delivery", 1), // before any call: not a completion
            constituent("c1", "llm_call", 2),
            constituent("s2", "web_search", 3),
            constituent("d1", "delivery", 4), // s1 c1 d1
            constituent("c2", "llm_call", 30),
            constituent("d2", "delivery", 31), // s2 is 28 old: too late
        ];
        let firings = derive(&research, &actions);
        assert_eq!(ids(&firings), vec![vec!["s1", "c1", "d1"]]);
        assert_eq!(firings[0].at_micros, 4);
        assert_eq!(firings[0].completed_by(), "d1");
    }

    #[test]
    fn a_set_fires_whatever_order_its_members_came_in_and_each_counts_once() {
        let lead = pattern(&["lead_qualified", "contract_signed"], false, 100);
        let actions = [
            constituent("sign1", "contract_signed", 10),
            constituent("qual1", "lead_qualified", 20),
            constituent("qual2", "lead_qualified", 30),
            constituent("qual3", "lead_qualified", 40),
            constituent("sign2", "contract_signed", 50),
        ];
        let firings = derive(&lead, &actions);
        assert_eq!(
            ids(&firings),
            vec![vec!["sign1", "qual1"], vec!["qual2", "sign2"]]
        );
    }

    #[test]
    fn a_resent_action_is_one_constituent() {
        let two_searches = pattern(&["web_search", "web_search"], true, 100);
        let actions = [
            constituent("s1", "web_search", 0),
            constituent("s1", "web_search", 0),
            constituent("s2", "web_search", 5),
            constituent("s2", "web_search", 5),
        ];
        assert_eq!(
            ids(&derive(&two_searches, &actions)),
            vec![vec!["s1", "s2"]]
        );
    }

    #[test]
    fn a_firing_id_depends_on_the_definition_and_the_constituents_only() {
        let firing = Firing {
            at_micros: 4,
            event_ids: vec!["a".into(), "b".into()],
        };
        let reordered = Firing {
            at_micros: 9,
            event_ids: vec!["b".into(), "a".into()],
        };
        assert_eq!(firing.id("ws", "def"), reordered.id("ws", "def"));
        assert_ne!(firing.id("ws", "def"), firing.id("ws", "other"));
        assert_ne!(firing.id("ws", "def"), firing.id("ws2", "def"));
    }

    /// The rule of the module doc, computed by brute force: at each possible completion, every
    /// combination of earlier unconsumed constituents in the window is tried, and the
    /// lexicographically smallest valid one (by position) wins.
    fn reference(pattern: &Pattern, constituents: &[Constituent]) -> Vec<Firing> {
        let mut sorted: Vec<Constituent> = Vec::new();
        let mut all = constituents.to_vec();
        all.sort_by(|a, b| {
            (a.occurred_at_micros, &a.event_id).cmp(&(b.occurred_at_micros, &b.event_id))
        });
        for constituent in all {
            if pattern.steps.contains(&constituent.action_name)
                && !sorted
                    .iter()
                    .any(|seen| seen.event_id == constituent.event_id)
            {
                sorted.push(constituent);
            }
        }
        let k = pattern.steps.len();
        let mut consumed = vec![false; sorted.len()];
        let mut firings = Vec::new();
        for index in 0..sorted.len() {
            if consumed[index] {
                continue;
            }
            let completing = &sorted[index];
            let candidates: Vec<usize> = (0..index)
                .filter(|&position| {
                    !consumed[position]
                        && completing.occurred_at_micros - sorted[position].occurred_at_micros
                            <= pattern.within_micros
                })
                .collect();
            let mut best: Option<Vec<usize>> = None;
            for mask in 0u32..(1 << candidates.len()) {
                if mask.count_ones() as usize != k - 1 {
                    continue;
                }
                let mut chosen: Vec<usize> = (0..candidates.len())
                    .filter(|bit| mask & (1 << bit) != 0)
                    .map(|bit| candidates[bit])
                    .collect();
                chosen.push(index);
                let names: Vec<&str> = chosen
                    .iter()
                    .map(|&position| sorted[position].action_name.as_str())
                    .collect();
                let valid = if pattern.ordered {
                    names
                        .iter()
                        .zip(&pattern.steps)
                        .all(|(name, step)| name == step)
                } else {
                    let mut have = names.clone();
                    let mut want: Vec<&str> = pattern.steps.iter().map(String::as_str).collect();
                    have.sort_unstable();
                    want.sort_unstable();
                    have == want
                };
                if valid && best.as_ref().is_none_or(|best| chosen < *best) {
                    best = Some(chosen);
                }
            }
            if let Some(chosen) = best {
                for &position in &chosen {
                    consumed[position] = true;
                }
                firings.push(Firing {
                    at_micros: completing.occurred_at_micros,
                    event_ids: chosen
                        .iter()
                        .map(|&position| sorted[position].event_id.clone())
                        .collect(),
                });
            }
        }
        firings
    }

    fn arbitrary_pattern() -> impl Strategy<Value = Pattern> {
        (
            proptest::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3),
            any::<bool>(),
            1i64..12,
        )
            .prop_map(|(steps, ordered, within)| pattern(&steps, ordered, within))
    }

    fn arbitrary_constituents() -> impl Strategy<Value = Vec<Constituent>> {
        // Few ids, so some are re-sent (a copy has the same name and time); times tie.
        proptest::collection::vec(0u8..10, 0..9).prop_map(|ids| {
            ids.into_iter()
                .map(|id| {
                    let name = ["a", "b", "c", "x"][usize::from(id) % 4];
                    constituent(&format!("e{id}"), name, i64::from(id) * 7 % 20)
                })
                .collect()
        })
    }

    fn arbitrary_distinct_constituents() -> impl Strategy<Value = Vec<Constituent>> {
        proptest::collection::vec(
            (prop::sample::select(vec!["a", "b", "c", "x"]), 0i64..20),
            0..9,
        )
        .prop_map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(index, (name, at))| constituent(&format!("e{index}"), name, at))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn the_matcher_agrees_with_the_brute_force_reference(
            pattern in arbitrary_pattern(),
            constituents in prop_oneof![arbitrary_constituents(), arbitrary_distinct_constituents()],
        ) {
            prop_assert_eq!(derive(&pattern, &constituents), reference(&pattern, &constituents));
        }

        #[test]
        fn each_constituent_counts_toward_at_most_one_firing_within_the_window(
            pattern in arbitrary_pattern(),
            constituents in arbitrary_distinct_constituents(),
        ) {
            let firings = derive(&pattern, &constituents);
            let mut used = HashSet::new();
            for firing in &firings {
                prop_assert_eq!(firing.event_ids.len(), pattern.steps.len());
                let times: Vec<i64> = firing.event_ids.iter().map(|id| {
                    constituents.iter().find(|c| &c.event_id == id).unwrap().occurred_at_micros
                }).collect();
                prop_assert!(times.iter().all(|&t| firing.at_micros - t <= pattern.within_micros && t <= firing.at_micros));
                for id in &firing.event_ids {
                    prop_assert!(used.insert(id.clone()), "{} in two firings", id);
                }
            }
        }

        /// What the `outcomes` stage does: after each arrival, in any order, re-derive from the
        /// new constituent's time with the earlier firings kept. The end state is the
        /// derivation of the whole set.
        #[test]
        fn deriving_again_after_each_arrival_in_any_order_ends_where_deriving_everything_does(
            pattern in arbitrary_pattern(),
            (constituents, order) in arbitrary_distinct_constituents().prop_flat_map(|constituents| {
                let count = constituents.len();
                (Just(constituents), Just((0..count).collect::<Vec<_>>()).prop_shuffle())
            }),
        ) {
            let mut present: Vec<Constituent> = Vec::new();
            let mut state: Vec<Firing> = Vec::new();
            for &index in &order {
                let arrived = constituents[index].clone();
                let from = arrived.occurred_at_micros;
                present.push(arrived);
                let kept: Vec<Firing> =
                    state.into_iter().filter(|firing| firing.at_micros < from).collect();
                let again = derive_from(&pattern, &present, &kept, from);
                state = kept.into_iter().chain(again).collect();
                state.sort_by(|a, b| (a.at_micros, a.completed_by()).cmp(&(b.at_micros, b.completed_by())));
            }
            let mut whole = derive(&pattern, &constituents);
            whole.sort_by(|a, b| (a.at_micros, a.completed_by()).cmp(&(b.at_micros, b.completed_by())));
            prop_assert_eq!(state, whole);
        }
    }
}
