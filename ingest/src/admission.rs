//! Admission of actions into the sink: one global in-flight budget, and below it a share per
//! workspace and per agent instance.
//!
//! An action is *in flight* from its admission until Kafka acknowledged it (or the request
//! failed). A batch is admitted whole or refused whole; it is refused when it would take its
//! agent instance over [`AdmissionLimits::per_agent_instance`], its workspace over
//! [`AdmissionLimits::per_workspace`] or ingest over [`AdmissionLimits::global`]. So an agent
//! that floods ingest holds at most its share of the producer's queue: the other workspaces keep
//! the rest of the budget, and their records never wait behind more than that share.
//!
//! Before that, while the request is still unread, [`Admission::begin_request`] bounds how many
//! requests of one agent instance and of one workspace are in progress at once, and refuses a
//! request at once when its share of in-flight actions is already full. A flooding client's
//! surplus requests are so refused before ingest spends CPU reading and parsing their bodies —
//! CPU the other workspaces' requests need as much as the Kafka budget.
//!
//! The same early check refuses an agent instance (or workspace) that is over its sustained
//! rate of actions per second ([`crate::rate_limit`]), counting its requests already in progress
//! at the size of its last batch; admitted batches are charged to it.
//!
//! The counters live in one `std::sync::Mutex` held for a few map operations per request (never
//! across an `.await`). An entry exists only while its workspace or instance has actions in
//! flight: the last release removes it, so idle workspaces take no memory.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agentmeter_schemas::RawAction;

use crate::config::IngestConfig;
use crate::rate_limit::{Rate, RateTable};

/// The in-flight limits, in actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// All actions in flight at most ([`IngestConfig::max_in_flight_actions`]).
    pub global: usize,
    /// Actions of one workspace at most.
    pub per_workspace: usize,
    /// Actions of one agent instance at most.
    pub per_agent_instance: usize,
    /// Requests of one workspace in progress at once at most.
    pub requests_per_workspace: usize,
    /// Requests of one agent instance in progress at once at most.
    pub requests_per_agent_instance: usize,
    /// Sustained rate of admitted actions per workspace (`None`: no limit).
    pub rate_per_workspace: Option<Rate>,
    /// Sustained rate of admitted actions per agent instance (`None`: no limit).
    pub rate_per_agent_instance: Option<Rate>,
}

impl AdmissionLimits {
    /// One global budget and no smaller share (every share is the whole budget).
    pub fn global_only(global: usize) -> AdmissionLimits {
        AdmissionLimits {
            global,
            per_workspace: global,
            per_agent_instance: global,
            requests_per_workspace: usize::MAX,
            requests_per_agent_instance: usize::MAX,
            rate_per_workspace: None,
            rate_per_agent_instance: None,
        }
    }

    /// The limits of `[ingest]` (checked by [`IngestConfig::validate`]).
    pub fn from_config(config: &IngestConfig) -> AdmissionLimits {
        AdmissionLimits {
            global: config.max_in_flight_actions,
            per_workspace: config.max_in_flight_actions_per_workspace,
            per_agent_instance: config.max_in_flight_actions_per_agent_instance,
            requests_per_workspace: config.max_concurrent_requests_per_workspace,
            requests_per_agent_instance: config.max_concurrent_requests_per_agent_instance,
            rate_per_workspace: rate(
                config.max_actions_per_second_per_workspace,
                config.rate_burst_seconds,
            ),
            rate_per_agent_instance: rate(
                config.max_actions_per_second_per_agent_instance,
                config.rate_burst_seconds,
            ),
        }
    }
}

/// A rate of the settings; 0 actions per second is no limit.
fn rate(per_second: u32, burst_seconds: u32) -> Option<Rate> {
    Some(Rate {
        per_second: NonZeroU32::new(per_second)?,
        burst_seconds: NonZeroU32::new(burst_seconds.max(1))?,
    })
}

/// Whose budget was short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionScope {
    /// The global budget of ingest.
    Global,
    /// The share of this workspace.
    Workspace(String),
    /// The share of this agent instance.
    AgentInstance(String),
}

impl AdmissionScope {
    /// The metric label: `global`, `workspace` or `agent_instance`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AdmissionScope::Global => "global",
            AdmissionScope::Workspace(_) => "workspace",
            AdmissionScope::AgentInstance(_) => "agent_instance",
        }
    }
}

impl fmt::Display for AdmissionScope {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmissionScope::Global => formatter.write_str("ingest"),
            AdmissionScope::Workspace(id) => write!(formatter, "workspace {id}"),
            AdmissionScope::AgentInstance(id) => write!(formatter, "agent instance {id}"),
        }
    }
}

/// A refused batch: whose budget was short, how much of it is in flight, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: AdmissionScope,
    pub in_flight: usize,
    pub limit: usize,
}

/// Why a request was refused before its body was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EarlyRefusal {
    /// Too many requests of this workspace or agent instance in progress.
    #[error(
        "{scope} has {in_progress} requests in progress (at most {limit}); retry after a moment"
    )]
    Requests {
        scope: AdmissionScope,
        in_progress: usize,
        limit: usize,
    },
    /// This workspace or agent instance sent more than its sustained rate (and burst) allows.
    #[error(
        "{scope} is over its rate of {per_second} actions per second; retry in {} ms",
        .wait.as_millis().max(1)
    )]
    Rate {
        scope: AdmissionScope,
        per_second: u32,
        wait: Duration,
    },
    /// This workspace's or agent instance's share of in-flight actions is full.
    #[error("{} is saturated ({} actions waiting for Kafka, at most {}); retry after a moment", .0.scope, .0.in_flight, .0.limit)]
    Actions(Refusal),
}

impl EarlyRefusal {
    /// The metric label of `agentmeter_ingest_admission_refused_total{scope}`.
    pub fn metric_scope(&self) -> &'static str {
        match self {
            EarlyRefusal::Requests {
                scope: AdmissionScope::Workspace(_),
                ..
            } => "workspace_requests",
            EarlyRefusal::Requests { .. } => "agent_instance_requests",
            EarlyRefusal::Rate {
                scope: AdmissionScope::Workspace(_),
                ..
            } => "workspace_rate",
            EarlyRefusal::Rate { .. } => "agent_instance_rate",
            EarlyRefusal::Actions(refusal) => refusal.scope.as_str(),
        }
    }
}

#[derive(Debug)]
struct Counters {
    global: usize,
    workspaces: HashMap<String, usize>,
    /// Keyed by (workspace, agent instance): instance ids are unique only within a workspace.
    agent_instances: HashMap<(String, String), usize>,
    workspace_requests: HashMap<String, usize>,
    agent_instance_requests: HashMap<(String, String), usize>,
    workspace_rates: RateTable<String>,
    agent_instance_rates: RateTable<(String, String)>,
}

/// A request in progress (see [`Admission::begin_request`]); released when dropped.
#[derive(Debug)]
#[must_use = "the request is counted until this is dropped"]
pub struct RequestInProgress<'a> {
    admission: &'a Admission,
    workspace: String,
    agent_instance: String,
}

impl Drop for RequestInProgress<'_> {
    fn drop(&mut self) {
        let mut counters = self.admission.lock();
        release_entry(&mut counters.workspace_requests, self.workspace.clone(), 1);
        release_entry(
            &mut counters.agent_instance_requests,
            (self.workspace.clone(), self.agent_instance.clone()),
            1,
        );
    }
}

/// The in-flight counters.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    counters: Mutex<Counters>,
}

/// Actions of one (workspace, agent instance) in an admitted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Portion {
    workspace: String,
    agent_instance: String,
    actions: usize,
}

/// An admitted batch; its actions stay in flight until this is dropped.
#[derive(Debug)]
#[must_use = "the actions are released when this is dropped"]
pub struct Admitted<'a> {
    admission: &'a Admission,
    portions: Vec<Portion>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Admission {
        Admission {
            limits,
            counters: Mutex::new(Counters {
                global: 0,
                workspaces: HashMap::new(),
                agent_instances: HashMap::new(),
                workspace_requests: HashMap::new(),
                agent_instance_requests: HashMap::new(),
                workspace_rates: RateTable::new(limits.rate_per_workspace),
                agent_instance_rates: RateTable::new(limits.rate_per_agent_instance),
            }),
        }
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// All actions in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().global
    }

    /// Actions of `workspace` in flight.
    pub fn workspace_in_flight(&self, workspace: &str) -> usize {
        self.lock().workspaces.get(workspace).copied().unwrap_or(0)
    }

    /// How many workspaces and agent instances have an entry (those with actions in flight).
    pub fn tracked_entries(&self) -> usize {
        let counters = self.lock();
        counters.workspaces.len()
            + counters.agent_instances.len()
            + counters.workspace_requests.len()
            + counters.agent_instance_requests.len()
            + counters.workspace_rates.entries()
            + counters.agent_instance_rates.entries()
    }

    /// Counts a request of `agent_instance` (of `workspace`) as in progress, before its body is
    /// read; refuses it when too many of theirs are in progress or their share of in-flight
    /// actions is already full.
    pub fn begin_request(
        &self,
        workspace: &str,
        agent_instance: &str,
    ) -> Result<RequestInProgress<'_>, EarlyRefusal> {
        self.begin_request_at(workspace, agent_instance, Instant::now())
    }

    /// [`Admission::begin_request`] at `now` (the rates' clock).
    pub fn begin_request_at(
        &self,
        workspace: &str,
        agent_instance: &str,
        now: Instant,
    ) -> Result<RequestInProgress<'_>, EarlyRefusal> {
        let key = (workspace.to_string(), agent_instance.to_string());
        let mut counters = self.lock();
        let agent_requests = counters
            .agent_instance_requests
            .get(&key)
            .copied()
            .unwrap_or(0);
        let workspace_requests = counters
            .workspace_requests
            .get(workspace)
            .copied()
            .unwrap_or(0);
        if let Err(over) = counters
            .agent_instance_rates
            .check(&key, now, agent_requests)
        {
            return Err(EarlyRefusal::Rate {
                scope: AdmissionScope::AgentInstance(key.1),
                per_second: over.per_second,
                wait: over.wait,
            });
        }
        if let Err(over) = counters
            .workspace_rates
            .check(&key.0, now, workspace_requests)
        {
            return Err(EarlyRefusal::Rate {
                scope: AdmissionScope::Workspace(key.0),
                per_second: over.per_second,
                wait: over.wait,
            });
        }
        if agent_requests >= self.limits.requests_per_agent_instance {
            return Err(EarlyRefusal::Requests {
                scope: AdmissionScope::AgentInstance(key.1),
                in_progress: agent_requests,
                limit: self.limits.requests_per_agent_instance,
            });
        }
        if workspace_requests >= self.limits.requests_per_workspace {
            return Err(EarlyRefusal::Requests {
                scope: AdmissionScope::Workspace(key.0),
                in_progress: workspace_requests,
                limit: self.limits.requests_per_workspace,
            });
        }
        let agent_actions = counters.agent_instances.get(&key).copied().unwrap_or(0);
        if agent_actions >= self.limits.per_agent_instance {
            return Err(EarlyRefusal::Actions(Refusal {
                scope: AdmissionScope::AgentInstance(key.1),
                in_flight: agent_actions,
                limit: self.limits.per_agent_instance,
            }));
        }
        let workspace_actions = counters.workspaces.get(workspace).copied().unwrap_or(0);
        if workspace_actions >= self.limits.per_workspace {
            return Err(EarlyRefusal::Actions(Refusal {
                scope: AdmissionScope::Workspace(key.0),
                in_flight: workspace_actions,
                limit: self.limits.per_workspace,
            }));
        }
        *counters
            .workspace_requests
            .entry(key.0.clone())
            .or_insert(0) += 1;
        *counters
            .agent_instance_requests
            .entry(key.clone())
            .or_insert(0) += 1;
        drop(counters);
        Ok(RequestInProgress {
            admission: self,
            workspace: key.0,
            agent_instance: key.1,
        })
    }

    /// Admits a batch of actions whole, or refuses it whole without counting anything.
    pub fn admit(&self, actions: &[RawAction]) -> Result<Admitted<'_>, Refusal> {
        self.admit_keys(actions.iter().map(|action| {
            (
                action.workspace_id.as_str(),
                action.agent_instance_id.as_str(),
            )
        }))
    }

    /// [`Admission::admit`] by the (workspace, agent instance) of each action.
    pub fn admit_keys<'k>(
        &self,
        actions: impl IntoIterator<Item = (&'k str, &'k str)>,
    ) -> Result<Admitted<'_>, Refusal> {
        let portions = portions(actions);
        let total: usize = portions.iter().map(|portion| portion.actions).sum();
        let mut counters = self.lock();
        for portion in &portions {
            let key = (portion.workspace.clone(), portion.agent_instance.clone());
            let in_flight = counters.agent_instances.get(&key).copied().unwrap_or(0);
            // A batch larger than the share is admitted alone, so every valid request fits.
            if in_flight > 0 && in_flight + portion.actions > self.limits.per_agent_instance {
                return Err(Refusal {
                    scope: AdmissionScope::AgentInstance(portion.agent_instance.clone()),
                    in_flight,
                    limit: self.limits.per_agent_instance,
                });
            }
        }
        for (workspace, actions) in workspace_totals(&portions) {
            let in_flight = counters.workspaces.get(workspace).copied().unwrap_or(0);
            if in_flight > 0 && in_flight + actions > self.limits.per_workspace {
                return Err(Refusal {
                    scope: AdmissionScope::Workspace(workspace.to_string()),
                    in_flight,
                    limit: self.limits.per_workspace,
                });
            }
        }
        if counters.global + total > self.limits.global {
            return Err(Refusal {
                scope: AdmissionScope::Global,
                in_flight: counters.global,
                limit: self.limits.global,
            });
        }
        counters.global += total;
        let now = Instant::now();
        for portion in &portions {
            let key = (portion.workspace.clone(), portion.agent_instance.clone());
            counters
                .agent_instance_rates
                .charge(&key, portion.actions, now);
            counters
                .workspace_rates
                .charge(&key.0, portion.actions, now);
            *counters
                .workspaces
                .entry(portion.workspace.clone())
                .or_insert(0) += portion.actions;
            *counters.agent_instances.entry(key).or_insert(0) += portion.actions;
        }
        drop(counters);
        Ok(Admitted {
            admission: self,
            portions,
        })
    }

    fn release(&self, portions: &[Portion]) {
        let mut counters = self.lock();
        for portion in portions {
            counters.global = counters.global.saturating_sub(portion.actions);
            release_entry(
                &mut counters.workspaces,
                portion.workspace.clone(),
                portion.actions,
            );
            release_entry(
                &mut counters.agent_instances,
                (portion.workspace.clone(), portion.agent_instance.clone()),
                portion.actions,
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.admission.release(&self.portions);
    }
}

/// Subtracts `actions` from an entry and removes it when nothing is left.
fn release_entry<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K, actions: usize) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(actions);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

/// Groups a batch by (workspace, agent instance); a batch normally has one identity.
fn portions<'k>(actions: impl IntoIterator<Item = (&'k str, &'k str)>) -> Vec<Portion> {
    let mut portions: Vec<Portion> = Vec::with_capacity(1);
    for (workspace, agent_instance) in actions {
        match portions.iter_mut().find(|portion| {
            portion.workspace == workspace && portion.agent_instance == agent_instance
        }) {
            Some(portion) => portion.actions += 1,
            None => portions.push(Portion {
                workspace: workspace.to_string(),
                agent_instance: agent_instance.to_string(),
                actions: 1,
            }),
        }
    }
    portions
}

fn workspace_totals(portions: &[Portion]) -> Vec<(&str, usize)> {
    let mut totals: Vec<(&str, usize)> = Vec::with_capacity(1);
    for portion in portions {
        match totals
            .iter_mut()
            .find(|(workspace, _)| *workspace == portion.workspace)
        {
            Some((_, actions)) => *actions += portion.actions,
            None => totals.push((&portion.workspace, portion.actions)),
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch<'k>(
        workspace: &'k str,
        agent_instance: &'k str,
        actions: usize,
    ) -> Vec<(&'k str, &'k str)> {
        vec![(workspace, agent_instance); actions]
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            global: 100,
            per_workspace: 40,
            per_agent_instance: 25,
            requests_per_workspace: 3,
            requests_per_agent_instance: 2,
            rate_per_workspace: None,
            rate_per_agent_instance: None,
        }
    }

    #[test]
    fn admitted_actions_stay_counted_until_the_batch_is_dropped() {
        let admission = Admission::new(limits());
        let first = admission.admit_keys(batch("ws_a", "inst_1", 10)).unwrap();
        let second = admission.admit_keys(batch("ws_a", "inst_2", 5)).unwrap();
        assert_eq!(admission.in_flight(), 15);
        assert_eq!(admission.workspace_in_flight("ws_a"), 15);
        drop(first);
        assert_eq!(admission.in_flight(), 5);
        assert_eq!(admission.workspace_in_flight("ws_a"), 5);
        drop(second);
        assert_eq!(admission.in_flight(), 0);
    }

    #[test]
    fn a_flooding_agent_is_refused_at_its_share_while_another_workspace_is_admitted() {
        let admission = Admission::new(limits());
        let _flood = admission.admit_keys(batch("ws_a", "inst_a", 25)).unwrap();
        let refusal = admission
            .admit_keys(batch("ws_a", "inst_a", 1))
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal {
                scope: AdmissionScope::AgentInstance("inst_a".into()),
                in_flight: 25,
                limit: 25,
            }
        );
        let other = admission.admit_keys(batch("ws_b", "inst_b", 25));
        assert!(other.is_ok(), "{other:?}");
    }

    #[test]
    fn the_workspace_share_caps_the_sum_of_its_agents() {
        let admission = Admission::new(limits());
        let _one = admission.admit_keys(batch("ws_a", "inst_1", 25)).unwrap();
        let refusal = admission
            .admit_keys(batch("ws_a", "inst_2", 16))
            .unwrap_err();
        assert_eq!(refusal.scope, AdmissionScope::Workspace("ws_a".into()));
        assert_eq!((refusal.in_flight, refusal.limit), (25, 40));
        let _fits = admission.admit_keys(batch("ws_a", "inst_2", 15)).unwrap();
        assert_eq!(admission.workspace_in_flight("ws_a"), 40);
    }

    #[test]
    fn the_global_budget_caps_the_sum_of_all_workspaces() {
        let admission = Admission::new(limits());
        let _held: Vec<_> = ["ws_1", "ws_2", "ws_3", "ws_4"]
            .iter()
            .map(|workspace| admission.admit_keys(batch(workspace, "inst", 25)).unwrap())
            .collect();
        let refusal = admission.admit_keys(batch("ws_5", "inst", 1)).unwrap_err();
        assert_eq!(refusal.scope, AdmissionScope::Global);
        assert_eq!((refusal.in_flight, refusal.limit), (100, 100));
    }

    #[test]
    fn a_refused_batch_counts_nothing() {
        let admission = Admission::new(limits());
        let _held = admission.admit_keys(batch("ws_a", "inst_1", 20)).unwrap();
        // inst_2 fits its own share but not the workspace's: nothing of it may stay counted.
        assert!(admission.admit_keys(batch("ws_a", "inst_2", 21)).is_err());
        assert_eq!(admission.in_flight(), 20);
        assert_eq!(admission.workspace_in_flight("ws_a"), 20);
        assert_eq!(admission.tracked_entries(), 2);
    }

    #[test]
    fn a_batch_of_several_identities_is_counted_against_each() {
        let admission = Admission::new(limits());
        let mut mixed = batch("ws_a", "inst_1", 20);
        mixed.extend(batch("ws_b", "inst_1", 20));
        let admitted = admission.admit_keys(mixed).unwrap();
        assert_eq!(admission.workspace_in_flight("ws_a"), 20);
        assert_eq!(admission.workspace_in_flight("ws_b"), 20);
        // Same instance id in another workspace is another instance.
        let _other = admission.admit_keys(batch("ws_b", "inst_1", 5)).unwrap();
        drop(admitted);
        assert_eq!(admission.in_flight(), 5);
    }

    #[test]
    fn idle_workspaces_leave_no_entries() {
        let admission = Admission::new(limits());
        for index in 0..10_000 {
            let workspace = format!("ws_{index}");
            let admitted = admission.admit_keys(batch(&workspace, "inst", 3)).unwrap();
            drop(admitted);
        }
        assert_eq!(admission.tracked_entries(), 0);
        assert_eq!(admission.in_flight(), 0);
    }

    #[test]
    fn an_agent_instance_over_its_rate_is_refused_before_its_body_while_others_are_not() {
        let admission = Admission::new(AdmissionLimits {
            rate_per_agent_instance: rate(100, 1),
            ..limits()
        });
        let start = Instant::now();
        // 250 actions at 100/s: 2.5 s of the rate, 1.5 s beyond the burst of 1 s.
        for _ in 0..25 {
            drop(admission.admit_keys(batch("ws_a", "inst_1", 10)).unwrap());
        }
        let refusal = admission
            .begin_request_at("ws_a", "inst_1", start)
            .unwrap_err();
        match &refusal {
            EarlyRefusal::Rate {
                scope, per_second, ..
            } => {
                assert_eq!(scope, &AdmissionScope::AgentInstance("inst_1".to_string()));
                assert_eq!(*per_second, 100);
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        assert_eq!(refusal.metric_scope(), "agent_instance_rate");
        assert!(refusal.to_string().contains("100 actions per second"));
        // The same workspace's other instance, and another workspace, are admitted.
        drop(admission.begin_request_at("ws_a", "inst_2", start).unwrap());
        drop(admission.begin_request_at("ws_b", "inst_1", start).unwrap());
        // Once the debt beyond the burst has drained, inst_1 is admitted again.
        drop(
            admission
                .begin_request_at("ws_a", "inst_1", start + Duration::from_millis(1600))
                .unwrap(),
        );
    }

    #[test]
    fn a_workspace_over_its_rate_is_refused_for_every_instance() {
        let admission = Admission::new(AdmissionLimits {
            rate_per_workspace: rate(100, 1),
            ..limits()
        });
        let start = Instant::now();
        for index in 0..25 {
            let instance = format!("inst_{index}");
            drop(admission.admit_keys(batch("ws_a", &instance, 10)).unwrap());
        }
        let refusal = admission
            .begin_request_at("ws_a", "inst_new", start)
            .unwrap_err();
        assert_eq!(refusal.metric_scope(), "workspace_rate");
        drop(
            admission
                .begin_request_at("ws_b", "inst_new", start)
                .unwrap(),
        );
    }

    #[test]
    fn global_only_limits_behave_like_one_budget() {
        let admission = Admission::new(AdmissionLimits::global_only(10));
        let _all = admission.admit_keys(batch("ws_a", "inst", 10)).unwrap();
        let refusal = admission.admit_keys(batch("ws_b", "inst", 1)).unwrap_err();
        assert_eq!(refusal.scope, AdmissionScope::Global);
    }

    #[test]
    fn a_batch_larger_than_the_share_is_admitted_alone() {
        let admission = Admission::new(limits());
        let alone = admission.admit_keys(batch("ws_a", "inst_1", 30)).unwrap();
        let refusal = admission
            .admit_keys(batch("ws_a", "inst_1", 1))
            .unwrap_err();
        assert_eq!(
            refusal.scope,
            AdmissionScope::AgentInstance("inst_1".into())
        );
        drop(alone);
        assert!(admission.admit_keys(batch("ws_a", "inst_1", 30)).is_ok());
        // Never beyond the global budget.
        assert!(admission.admit_keys(batch("ws_b", "inst_1", 101)).is_err());
    }

    #[test]
    fn requests_beyond_the_concurrency_of_an_agent_or_workspace_are_refused_early() {
        let admission = Admission::new(limits());
        let first = admission.begin_request("ws_a", "inst_1").unwrap();
        let _second = admission.begin_request("ws_a", "inst_1").unwrap();
        let refusal = admission.begin_request("ws_a", "inst_1").unwrap_err();
        assert_eq!(refusal.metric_scope(), "agent_instance_requests");
        assert!(
            refusal.to_string().contains("2 requests in progress"),
            "{refusal}"
        );
        let _third = admission.begin_request("ws_a", "inst_2").unwrap();
        let refusal = admission.begin_request("ws_a", "inst_3").unwrap_err();
        assert_eq!(refusal.metric_scope(), "workspace_requests");
        // Another workspace is not affected; a finished request frees its place.
        let _other = admission.begin_request("ws_b", "inst_1").unwrap();
        drop(first);
        let _again = admission.begin_request("ws_a", "inst_1").unwrap();
    }

    #[test]
    fn a_request_is_refused_early_when_its_share_of_actions_is_full() {
        let admission = Admission::new(limits());
        let _full = admission.admit_keys(batch("ws_a", "inst_1", 25)).unwrap();
        let refusal = admission.begin_request("ws_a", "inst_1").unwrap_err();
        assert_eq!(refusal.metric_scope(), "agent_instance");
        assert!(refusal.to_string().contains("is saturated"), "{refusal}");
        let _fits = admission.begin_request("ws_a", "inst_2").unwrap();
    }

    #[test]
    fn finished_requests_leave_no_entries() {
        let admission = Admission::new(limits());
        for index in 0..1000 {
            let workspace = format!("ws_{index}");
            drop(admission.begin_request(&workspace, "inst").unwrap());
        }
        assert_eq!(admission.tracked_entries(), 0);
    }
}
