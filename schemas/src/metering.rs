//! The metering configuration of one workspace: who its customers are (accounts, contacts),
//! what it runs (agent types and instances with hashed secrets), and how actions are metered
//! (action tagging, effective-dated cost allocation, outcome definitions).
//!
//! * [`MeteringConfig`] is the file format (TOML, see `docs/metering-config.md`) and, as JSON, the
//!   payload of a [`ConfigRecord`] on the log-compacted config topic.
//! * [`MeteringConfig::validate`] reports *every* problem at once; nothing is published when any
//!   exists.
//! * [`WorkspaceSnapshot`] is the validated configuration compiled into lookup tables. Stages hold
//!   it behind an `Arc` and swap whole snapshots, so a half-applied configuration is never seen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::action::RawAction;
use crate::condition::{CompiledCondition, Condition};
use crate::decimal::to_scaled_i128;
use crate::limits::{MAX_COST_PER_UNIT, MAX_NAME_BYTES};
use crate::text::{check_name, MaxLength, TextProblem};

/// One workspace's whole metering configuration, as written in a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// The workspace (tenant) this file configures.
    pub workspace: Workspace,
    /// The builder's customers.
    #[serde(default)]
    pub accounts: Vec<Account>,
    /// People at accounts who receive invoices.
    #[serde(default)]
    pub contacts: Vec<Contact>,
    /// The catalog of agent products.
    #[serde(default)]
    pub agent_types: Vec<AgentType>,
    /// Deployed agents, one account each; each has a secret (stored only as its SHA-256).
    #[serde(default)]
    pub agent_instances: Vec<AgentInstance>,
    /// Which action names, trace events and auto tags are tracked.
    #[serde(default)]
    pub tagging: Tagging,
    /// Measure and effective-dated cost per unit, per action.
    #[serde(default)]
    pub cost_allocations: Vec<CostAllocation>,
    /// Actions that are business outcomes (`@outcome` besides `@action`).
    #[serde(default)]
    pub outcomes: Vec<OutcomeDefinition>,
    /// What the builder sells: products, their rate plans and charges (docs/billing.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<crate::catalog::Product>,
    /// Which account is on which rate plan, effective-dated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<crate::catalog::Subscription>,
    /// Effective-dated rates from rate plan currencies into the cost currency, for margins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exchange_rates: Vec<crate::catalog::ExchangeRate>,
    /// Outcomes derived from several actions of one context by `agentmeter outcomes`
    /// (ADR 0005, section 3; docs/metering-config.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub composite_outcomes: Vec<CompositeOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    /// Stable id; the config topic key. Letters, digits, `_`, `-`, `.`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// ISO 4217 code every cost of this workspace is in.
    pub currency: String,
    /// IANA time zone of the workspace's billing periods (`Europe/Berlin`); default `UTC`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// The account's id in the builder's CRM or billing system.
    #[serde(default)]
    pub external_id: Option<String>,
    /// Archived: kept for history (its usage and invoices stay), hidden from lists, and — for an
    /// agent instance, or every instance of an archived account — its secret is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub archived: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub id: String,
    /// Id of the account this person belongs to.
    pub account: String,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Archived: kept for history (its usage and invoices stay), hidden from lists, and — for an
    /// agent instance, or every instance of an archived account — its secret is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub archived: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentType {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// custom, langgraph, crewai, ...
    #[serde(default = "default_agent_kind")]
    pub kind: String,
    /// Archived: kept for history (its usage and invoices stay), hidden from lists, and — for an
    /// agent instance, or every instance of an archived account — its secret is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub archived: bool,
}

fn default_agent_kind() -> String {
    "custom".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInstance {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Id of its agent type.
    pub agent_type: String,
    /// Id of the account it works for: every action it sends is that account's.
    pub account: String,
    /// Id of the contact (of the same account) who receives invoices.
    #[serde(default)]
    pub contact: Option<String>,
    /// Lowercase hex SHA-256 of the agent secret (`agentmeter secret new` makes a pair).
    pub secret_sha256: String,
    /// Secrets replaced by a rotation, still accepted until their `valid_until` (the grace
    /// period, so agents can be redeployed with the new secret); refused afterwards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_secrets: Vec<RetiredSecret>,
    /// Archived: kept for history (its usage and invoices stay), hidden from lists, and — for an
    /// agent instance, or every instance of an archived account — its secret is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub archived: bool,
}

impl AgentInstance {
    /// The current secret's hash, then every retired one's.
    pub fn secret_hashes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret_sha256.as_str()).chain(
            self.retired_secrets
                .iter()
                .map(|retired| retired.secret_sha256.as_str()),
        )
    }
}

/// An agent secret a rotation replaced, accepted until `valid_until`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredSecret {
    /// Lowercase hex SHA-256 of the old secret.
    pub secret_sha256: String,
    /// RFC 3339 instant from which the old secret is refused.
    #[serde(with = "time::serde::rfc3339")]
    pub valid_until: OffsetDateTime,
}

/// Most retired secrets one agent instance keeps (older ones are dropped by a rotation).
pub const MAX_RETIRED_SECRETS: usize = 4;

fn is_false(value: &bool) -> bool {
    !*value
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tagging {
    /// Tracked action names, trace events (span names) and auto tags. Anything else is kept for
    /// Live Data and discovery but never billed.
    #[serde(default)]
    pub tracked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostAllocation {
    /// The tracked action name, trace event or auto tag this prices.
    pub action: String,
    /// `unit`, `token`, `input_token`, `output_token`, or a custom measure name.
    pub measure: String,
    /// The attribute that holds the quantity: required for custom measures, optional for `unit`
    /// (default quantity 1); not allowed for token measures.
    #[serde(default)]
    pub quantity_attribute: Option<String>,
    /// Effective-dated rates; the one with the latest `effective_from` not after `occurred_at`
    /// applies.
    pub rates: Vec<Rate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// RFC 3339 instant from which this rate applies (inclusive).
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from: OffsetDateTime,
    /// Cost per unit of the measure, a decimal written as a string ("0.006"): never a float.
    #[serde(
        serialize_with = "rust_decimal::serde::str::serialize",
        deserialize_with = "decimal_from_string_only"
    )]
    pub cost_per_unit: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeDefinition {
    /// The tracked action that is a business outcome.
    pub action: String,
    /// When set, the action is an outcome only when this condition holds
    /// ([`crate::condition`]); otherwise it stays an `@action`. No `when`: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// RFC 3339 instant from which this definition applies, by the action's `occurred_at`.
    /// Several entries of one action are the versions of its definition, by strictly
    /// increasing `effective_from`; only the first may leave it out (always). An action that
    /// happened before the first version's start is no outcome.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub effective_from: Option<OffsetDateTime>,
}

/// An outcome that fires when its steps happened for the same context within a window
/// (ADR 0005, section 3): `research_completed` = `web_search` then `llm_call` then `delivery`
/// of the same user within 15 minutes. Several entries of one name are the versions of one
/// definition, by increasing `effective_from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeOutcome {
    /// The outcome's name, as `actions`, `usage`, Live Data and rate plans show it; it names no
    /// tracked action and no `[[outcomes]]` action.
    pub name: String,
    /// The actions it is made of, 2 to [`MAX_COMPOSITE_STEPS`]; a name may appear more than once.
    pub steps: Vec<CompositeStep>,
    /// Whether the steps must happen in the order listed; default `false` (a set, any order).
    #[serde(default)]
    pub ordered: bool,
    /// The longest time from a firing's first step to its completing one (`"15m"`, `"30days"`).
    pub within: String,
    /// Whose actions go together, always within one agent instance: `"user"` (the user id, or
    /// the anonymous id) or `"attributes.KEY"` (the value of the attribute `KEY`).
    pub context: String,
    /// RFC 3339 instant from which this version applies: firings completing at or after it
    /// follow it, until the next version's. Only the first version may leave it out (always).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub effective_from: Option<OffsetDateTime>,
}

/// One step of a [`CompositeOutcome`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeStep {
    /// A tracked action name, trace event or auto tag.
    pub action: String,
    /// When set, only actions for which it holds are instances of this step
    /// ([`crate::condition`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
}

/// Most steps of one composite outcome.
pub const MAX_COMPOSITE_STEPS: usize = 8;
/// Most `[[composite_outcomes]]` entries (versions included) of one workspace.
pub const MAX_COMPOSITE_OUTCOMES: usize = 64;
/// Longest `within` of a composite outcome.
pub const MAX_COMPOSITE_WITHIN_SECONDS: u64 = 366 * 24 * 3600;

/// Whose actions a composite outcome puts together (always within one agent instance).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CompositeContext {
    /// The user key: the user id, or else the anonymous id. Actions with neither have none.
    User,
    /// The value of a top-level attribute (a string, or the text of a number or boolean).
    /// Actions without it have none.
    Attribute(String),
}

impl CompositeContext {
    /// Parses `"user"` or `"attributes.KEY"`.
    pub fn parse(text: &str) -> Result<CompositeContext, String> {
        if text == "user" {
            return Ok(CompositeContext::User);
        }
        match text.strip_prefix(crate::condition::ATTRIBUTE_PREFIX) {
            Some(key) if !key.is_empty() && key.len() <= MAX_NAME_BYTES => {
                Ok(CompositeContext::Attribute(key.to_string()))
            }
            _ => Err(format!(
                "context {text:?} must be \"user\" or \"attributes.KEY\" (the attribute whose value puts actions together)"
            )),
        }
    }

    /// The text form, as written in the configuration.
    pub fn describe(&self) -> String {
        match self {
            CompositeContext::User => "user".to_string(),
            CompositeContext::Attribute(key) => {
                format!("{}{key}", crate::condition::ATTRIBUTE_PREFIX)
            }
        }
    }
}

impl CompositeOutcome {
    /// `within` in microseconds, or what is wrong with it.
    pub fn within_micros(&self) -> Result<i64, String> {
        let duration = humantime::parse_duration(self.within.trim()).map_err(|error| {
            format!(
                "within {:?} is not a duration such as \"15m\" or \"30days\": {error}",
                self.within
            )
        })?;
        if duration.is_zero() {
            return Err("within is zero: no two actions could ever make a firing".to_string());
        }
        if duration.as_secs() > MAX_COMPOSITE_WITHIN_SECONDS {
            return Err(format!(
                "within {:?} is longer than the longest accepted, 366 days",
                self.within
            ));
        }
        i64::try_from(duration.as_micros()).map_err(|_| "within is too long".to_string())
    }
}

/// A composite outcome version compiled for the `outcomes` stage.
#[derive(Debug, Clone)]
pub struct CompiledComposite {
    pub name: String,
    /// Steps with their compiled conditions.
    pub steps: Vec<(String, Option<CompiledCondition>)>,
    pub ordered: bool,
    pub within_micros: i64,
    pub context: CompositeContext,
    /// This version applies to firings completing in `[effective_from, effective_until)`
    /// (µs since the epoch; `i64::MIN` / `i64::MAX` when open).
    pub effective_from_micros: i64,
    pub effective_until_micros: i64,
}

impl CompiledComposite {
    /// The step names, in order (the matcher's pattern).
    pub fn step_names(&self) -> Vec<String> {
        self.steps.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Whether `raw` is an instance of the step named `raw.action_name` (some step of that
    /// name whose condition, if any, holds).
    pub fn is_constituent(&self, raw: &RawAction) -> bool {
        self.steps.iter().any(|(name, when)| {
            name == &raw.action_name && when.as_ref().is_none_or(|when| when.holds(raw))
        })
    }
}

fn micros_of(instant: OffsetDateTime) -> i64 {
    i64::try_from(instant.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// Compiles validated `[[composite_outcomes]]`: each version's end is the next version's start.
fn compile_composites(
    composites: &[CompositeOutcome],
) -> Result<Vec<CompiledComposite>, ValidationErrors> {
    let mut compiled = Vec::with_capacity(composites.len());
    for (index, composite) in composites.iter().enumerate() {
        let label = format!("composite outcome {:?}", composite.name);
        let mut steps = Vec::with_capacity(composite.steps.len());
        for (step_index, step) in composite.steps.iter().enumerate() {
            let when = match &step.when {
                Some(when) => Some(
                    when.compile(&format!("{label}: step {step_index}"))
                        .map_err(ValidationErrors)?,
                ),
                None => None,
            };
            steps.push((step.action.clone(), when));
        }
        let invalid = |problem: String| ValidationErrors(vec![format!("{label}: {problem}")]);
        let effective_until_micros = composites[index + 1..]
            .iter()
            .find(|later| later.name == composite.name)
            .and_then(|later| later.effective_from)
            .map_or(i64::MAX, micros_of);
        compiled.push(CompiledComposite {
            name: composite.name.clone(),
            steps,
            ordered: composite.ordered,
            within_micros: composite.within_micros().map_err(invalid)?,
            context: CompositeContext::parse(&composite.context).map_err(invalid)?,
            effective_from_micros: composite.effective_from.map_or(i64::MIN, micros_of),
            effective_until_micros,
        });
    }
    Ok(compiled)
}

/// Money in a configuration is a quoted decimal: a TOML or JSON float would already have been
/// rounded to binary before we see it.
fn decimal_from_string_only<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Decimal, D::Error> {
    let text = String::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom(
            "cost_per_unit must be a quoted decimal string such as \"0.006\", never a float",
        )
    })?;
    text.trim().parse::<Decimal>().map_err(|error| {
        serde::de::Error::custom(format!("cost_per_unit {text:?} is not a decimal: {error}"))
    })
}

/// How the quantity of a priced action is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// 1 per action, or the value of `quantity_attribute`.
    Unit {
        quantity_attribute: Option<String>,
    },
    /// input + output tokens.
    Token,
    InputToken,
    OutputToken,
    /// A named unit whose quantity is the value of an attribute.
    Custom {
        name: String,
        quantity_attribute: String,
    },
}

impl Measure {
    pub fn name(&self) -> &str {
        match self {
            Measure::Unit { .. } => "unit",
            Measure::Token => "token",
            Measure::InputToken => "input_token",
            Measure::OutputToken => "output_token",
            Measure::Custom { name, .. } => name,
        }
    }
}

/// Everything wrong with a configuration file, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<String>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "{} problem(s) in the metering configuration:",
            self.0.len()
        )?;
        for problem in &self.0 {
            writeln!(formatter, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot parse the metering configuration: {0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(ValidationErrors),
}

pub use crate::text::is_valid_identifier;

/// Action names, trace events and auto tags: a name of at most 256 bytes by the rules of
/// [`crate::text`] (no control or invisible characters, no edge or unusual whitespace, NFC).
pub fn is_valid_action_name(text: &str) -> bool {
    check_action_name(text).is_ok()
}

/// Why `text` is not a valid action name.
pub fn check_action_name(text: &str) -> Result<(), TextProblem> {
    check_name(text, MaxLength::Bytes(MAX_NAME_BYTES))
}

impl MeteringConfig {
    /// Parses and validates a TOML configuration file.
    pub fn from_toml(text: &str) -> Result<MeteringConfig, ConfigFileError> {
        let config: MeteringConfig =
            toml::from_str(text).map_err(|error| ConfigFileError::Parse(error.to_string()))?;
        config.validate().map_err(ConfigFileError::Invalid)?;
        Ok(config)
    }

    /// Checks every cross-reference and value; returns all problems found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut problems = Vec::new();
        let workspace = &self.workspace;
        if !is_valid_identifier(&workspace.id) {
            problems.push(format!(
                "workspace.id {:?} must be 1-128 letters, digits, '_', '-', '.', ':'",
                workspace.id
            ));
        }
        if workspace.currency.len() != 3
            || !workspace.currency.chars().all(|c| c.is_ascii_uppercase())
        {
            problems.push(format!(
                "workspace.currency {:?} must be an ISO 4217 code such as \"USD\"",
                workspace.currency
            ));
        }

        if jiff::tz::TimeZone::get(&workspace.time_zone).is_err() {
            problems.push(format!(
                "workspace.time_zone {:?} is not an IANA time zone such as \"UTC\" or \"Europe/Berlin\"",
                workspace.time_zone
            ));
        }

        let account_ids = check_ids(
            &mut problems,
            "accounts",
            self.accounts.iter().map(|a| &a.id),
        );
        let contact_ids = check_ids(
            &mut problems,
            "contacts",
            self.contacts.iter().map(|c| &c.id),
        );
        let type_ids = check_ids(
            &mut problems,
            "agent_types",
            self.agent_types.iter().map(|t| &t.id),
        );
        check_ids(
            &mut problems,
            "agent_instances",
            self.agent_instances.iter().map(|i| &i.id),
        );

        let contact_account: HashMap<&str, &str> = self
            .contacts
            .iter()
            .map(|contact| (contact.id.as_str(), contact.account.as_str()))
            .collect();
        for contact in &self.contacts {
            if !account_ids.contains(contact.account.as_str()) {
                problems.push(format!(
                    "contact {:?} names account {:?}, which is not defined",
                    contact.id, contact.account
                ));
            }
        }
        let mut secret_hashes = HashSet::new();
        for instance in &self.agent_instances {
            if !account_ids.contains(instance.account.as_str()) {
                problems.push(format!(
                    "agent instance {:?} names account {:?}, which is not defined",
                    instance.id, instance.account
                ));
            }
            if !type_ids.contains(instance.agent_type.as_str()) {
                problems.push(format!(
                    "agent instance {:?} names agent type {:?}, which is not defined",
                    instance.id, instance.agent_type
                ));
            }
            if let Some(contact) = &instance.contact {
                if !contact_ids.contains(contact.as_str()) {
                    problems.push(format!(
                        "agent instance {:?} names contact {:?}, which is not defined",
                        instance.id, contact
                    ));
                } else if contact_account.get(contact.as_str()) != Some(&instance.account.as_str())
                {
                    problems.push(format!(
                        "agent instance {:?}: contact {:?} belongs to another account than {:?}",
                        instance.id, contact, instance.account
                    ));
                }
            }
            if parse_secret_hash(&instance.secret_sha256).is_none() {
                problems.push(format!(
                    "agent instance {:?}: secret_sha256 must be 64 lowercase hex characters (the SHA-256 of the secret, never the secret itself)",
                    instance.id
                ));
            } else if !secret_hashes.insert(instance.secret_sha256.as_str()) {
                problems.push(format!(
                    "agent instance {:?}: secret_sha256 is shared with another instance; every instance needs its own secret",
                    instance.id
                ));
            }
            if instance.retired_secrets.len() > MAX_RETIRED_SECRETS {
                problems.push(format!(
                    "agent instance {:?}: {} retired_secrets; at most {MAX_RETIRED_SECRETS} are kept",
                    instance.id,
                    instance.retired_secrets.len()
                ));
            }
            for retired in &instance.retired_secrets {
                if parse_secret_hash(&retired.secret_sha256).is_none() {
                    problems.push(format!(
                        "agent instance {:?}: a retired secret_sha256 must be 64 lowercase hex characters",
                        instance.id
                    ));
                } else if !secret_hashes.insert(retired.secret_sha256.as_str()) {
                    problems.push(format!(
                        "agent instance {:?}: a retired secret_sha256 is also another secret of this workspace; every secret is used once",
                        instance.id
                    ));
                }
            }
        }

        let mut tracked = HashSet::new();
        for name in &self.tagging.tracked {
            if let Err(problem) = check_action_name(name) {
                problems.push(format!(
                    "tagging.tracked: {name:?} is not a valid action name: it {problem}"
                ));
            } else if !tracked.insert(name.as_str()) {
                problems.push(format!("tagging.tracked: {name:?} is listed twice"));
            }
        }

        let mut priced = HashSet::new();
        for allocation in &self.cost_allocations {
            let action = &allocation.action;
            if !tracked.contains(action.as_str()) {
                problems.push(format!(
                    "cost allocation for {action:?}: the action is not tracked (add it to tagging.tracked)"
                ));
            }
            if !priced.insert(action.as_str()) {
                problems.push(format!(
                    "cost allocation for {action:?} is defined twice; put all its rates in one entry"
                ));
            }
            if let Err(problem) = allocation.measure() {
                problems.push(format!("cost allocation for {action:?}: {problem}"));
            }
            if allocation.rates.is_empty() {
                problems.push(format!("cost allocation for {action:?} has no rates"));
            }
            for pair in allocation.rates.windows(2) {
                if pair[1].effective_from <= pair[0].effective_from {
                    problems.push(format!(
                        "cost allocation for {action:?}: rates must be listed by strictly increasing effective_from ({} then {})",
                        pair[0].effective_from, pair[1].effective_from
                    ));
                }
            }
            for rate in &allocation.rates {
                if rate.cost_per_unit < Decimal::ZERO {
                    problems.push(format!(
                        "cost allocation for {action:?}: cost_per_unit {} is negative",
                        rate.cost_per_unit
                    ));
                } else if rate.cost_per_unit > MAX_COST_PER_UNIT {
                    problems.push(format!(
                        "cost allocation for {action:?}: cost_per_unit {} is above the largest accepted, {MAX_COST_PER_UNIT}",
                        rate.cost_per_unit
                    ));
                }
                if let Err(error) = to_scaled_i128(rate.cost_per_unit) {
                    problems.push(format!(
                        "cost allocation for {action:?}: cost_per_unit {error}"
                    ));
                }
            }
        }

        let mut outcome_names = HashSet::new();
        let mut outcome_versions = VersionOrder::default();
        for outcome in &self.outcomes {
            if !tracked.contains(outcome.action.as_str()) {
                problems.push(format!(
                    "outcome {:?}: the action is not tracked (add it to tagging.tracked)",
                    outcome.action
                ));
            }
            outcome_names.insert(outcome.action.as_str());
            match outcome_versions.next(&outcome.action, outcome.effective_from) {
                Ok(()) => {}
                Err(VersionProblem::WithoutEffectiveFrom) => problems.push(format!(
                    "outcome {:?} is defined twice; a later version of its definition needs an effective_from",
                    outcome.action
                )),
                Err(VersionProblem::NotIncreasing { previous, from }) => problems.push(format!(
                    "outcome {:?}: versions must be listed by strictly increasing effective_from ({previous} then {from})",
                    outcome.action
                )),
            }
            if let Some(when) = &outcome.when {
                if let Err(found) = when.compile(&format!("outcome {:?}", outcome.action)) {
                    problems.extend(found);
                }
            }
        }

        check_composite_outcomes(self, &tracked, &outcome_names, &mut problems);

        let known = crate::catalog::KnownNames {
            agent_types: self.agent_types.iter().map(|t| t.id.as_str()).collect(),
            accounts: self.accounts.iter().map(|a| a.id.as_str()).collect(),
            tracked: self
                .tagging
                .tracked
                .iter()
                .map(String::as_str)
                .chain(self.composite_outcomes.iter().map(|c| c.name.as_str()))
                .collect(),
            outcomes: self
                .outcomes
                .iter()
                .map(|o| o.action.as_str())
                .chain(self.composite_outcomes.iter().map(|c| c.name.as_str()))
                .collect(),
            measures: self
                .cost_allocations
                .iter()
                .map(|allocation| (allocation.action.as_str(), allocation.measure.as_str()))
                .collect(),
        };
        crate::catalog::check_catalog(&self.products, &self.subscriptions, &known, &mut problems);
        crate::catalog::check_exchange_rates(
            &self.exchange_rates,
            &workspace.currency,
            &mut problems,
        );

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(problems))
        }
    }
}

/// The checks of `[[composite_outcomes]]`: names, steps that can fire, windows, contexts and
/// the order of versions.
fn check_composite_outcomes(
    config: &MeteringConfig,
    tracked: &HashSet<&str>,
    outcome_actions: &HashSet<&str>,
    problems: &mut Vec<String>,
) {
    if config.composite_outcomes.len() > MAX_COMPOSITE_OUTCOMES {
        problems.push(format!(
            "composite_outcomes: {} entries; at most {MAX_COMPOSITE_OUTCOMES} are accepted",
            config.composite_outcomes.len()
        ));
    }
    let mut versions = VersionOrder::default();
    for composite in &config.composite_outcomes {
        let name = composite.name.as_str();
        let label = format!("composite outcome {name:?}");
        if let Err(problem) = check_action_name(name) {
            problems.push(format!(
                "{label}: the name is not a valid action name: it {problem}"
            ));
        }
        if tracked.contains(name) || outcome_actions.contains(name) {
            problems.push(format!(
                "{label}: the name is a tracked action's; a composite outcome needs a name of its own"
            ));
        }
        match versions.next(name, composite.effective_from) {
            Ok(()) => {}
            Err(VersionProblem::WithoutEffectiveFrom) => problems.push(format!(
                "{label} is defined again without effective_from; every version after the first needs one"
            )),
            Err(VersionProblem::NotIncreasing { previous, from }) => problems.push(format!(
                "{label}: versions must be listed by strictly increasing effective_from ({previous} then {from})"
            )),
        }
        if !(2..=MAX_COMPOSITE_STEPS).contains(&composite.steps.len()) {
            problems.push(format!(
                "{label} has {} steps; a composite outcome needs 2 to {MAX_COMPOSITE_STEPS} (one action is an [[outcomes]] entry)",
                composite.steps.len()
            ));
        }
        for (index, step) in composite.steps.iter().enumerate() {
            if !tracked.contains(step.action.as_str()) {
                problems.push(format!(
                    "{label}: step {index} {:?} is not tracked, so the outcome could never fire (add it to tagging.tracked)",
                    step.action
                ));
            }
            if let Some(when) = &step.when {
                if let Err(found) = when.compile(&format!("{label}: step {index}")) {
                    problems.extend(found);
                }
            }
        }
        if let Err(problem) = composite.within_micros() {
            problems.push(format!("{label}: {problem}"));
        }
        if let Err(problem) = CompositeContext::parse(&composite.context) {
            problems.push(format!("{label}: {problem}"));
        }
    }
}

impl CostAllocation {
    /// The measure this allocation names, or what is wrong with it.
    pub fn measure(&self) -> Result<Measure, String> {
        let attribute = self.quantity_attribute.clone();
        match (self.measure.as_str(), attribute) {
            ("unit", quantity_attribute) => Ok(Measure::Unit { quantity_attribute }),
            ("token" | "input_token" | "output_token", Some(_)) => Err(format!(
                "measure {:?} takes its quantity from the token counts; remove quantity_attribute",
                self.measure
            )),
            ("token", None) => Ok(Measure::Token),
            ("input_token", None) => Ok(Measure::InputToken),
            ("output_token", None) => Ok(Measure::OutputToken),
            (name, Some(quantity_attribute)) if is_valid_identifier(name) => Ok(Measure::Custom {
                name: name.to_string(),
                quantity_attribute,
            }),
            (name, None) if is_valid_identifier(name) => Err(format!(
                "custom measure {name:?} needs quantity_attribute: the attribute that holds the quantity"
            )),
            (name, _) => Err(format!("measure {name:?} is not a valid name")),
        }
    }
}

/// Lowercase hex SHA-256 of a secret, as stored in `secret_sha256`.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(secret_digest(secret))
}

/// SHA-256 of a secret. Secrets are random tokens (not passwords), so one SHA-256 suffices.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn parse_secret_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || text.chars().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text, &mut digest).ok()?;
    Some(digest)
}

fn check_ids<'a>(
    problems: &mut Vec<String>,
    section: &str,
    ids: impl Iterator<Item = &'a String>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for id in ids {
        if !is_valid_identifier(id) {
            problems.push(format!(
                "{section}: id {id:?} must be 1-128 letters, digits, '_', '-', '.', ':'"
            ));
        }
        if !seen.insert(id.as_str()) {
            problems.push(format!("{section}: id {id:?} is used twice"));
        }
    }
    seen
}

/// The rule for entries that are versions of one definition (`[[outcomes]]`,
/// `[[composite_outcomes]]`): the first may omit `effective_from` (in force always), every later
/// one needs it, strictly after the one before. [`VersionOrder::next`] takes the entries in file
/// order.
#[derive(Default)]
struct VersionOrder<'a> {
    latest: HashMap<&'a str, Option<OffsetDateTime>>,
}

/// Why an entry is not a valid next version of its definition.
enum VersionProblem {
    WithoutEffectiveFrom,
    NotIncreasing {
        previous: OffsetDateTime,
        from: OffsetDateTime,
    },
}

impl<'a> VersionOrder<'a> {
    fn next(
        &mut self,
        name: &'a str,
        effective_from: Option<OffsetDateTime>,
    ) -> Result<(), VersionProblem> {
        let previous = self.latest.insert(name, effective_from);
        match (previous, effective_from) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(VersionProblem::WithoutEffectiveFrom),
            (Some(Some(previous)), Some(from)) if from <= previous => {
                Err(VersionProblem::NotIncreasing { previous, from })
            }
            (Some(_), Some(_)) => Ok(()),
        }
    }
}

/// One version of a workspace's configuration, as it travels on the config topic
/// (key = workspace id, value = this as JSON). A tombstone (empty value) deletes the workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRecord {
    /// Format of this record; readers refuse formats they do not know.
    pub format: u32,
    /// Increases by one with every apply of this workspace.
    pub version: i64,
    /// When `config apply` published it.
    #[serde(with = "time::serde::rfc3339")]
    pub applied_at: OffsetDateTime,
    pub config: MeteringConfig,
    /// When each agent secret of this workspace (by its `secret_sha256`) was first published in
    /// it, carried from version to version by `config apply`. Should two workspaces ever
    /// configure one secret, the one that had it first keeps it ([`ConfigRecord::secret_since`]).
    /// Missing entries (records written before this field) count from `applied_at`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets_since: BTreeMap<String, Rfc3339>,
    /// The control plane's API keys of this workspace (`agentmeter admin-key new`), only as their
    /// SHA-256; carried from version to version like `secrets_since`, so `config apply` of a
    /// file keeps them. A tombstone of the workspace removes them with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_keys: Vec<AdminKey>,
    /// Who published this version and what it changed: the audit entry travels with the
    /// version it describes. Absent in records written before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<ChangeNote>,
}

/// Who made a configuration version and what changed from the one before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeNote {
    /// `cli` (`config apply`, `admin-key`), or the console's `key:<admin key id>`.
    pub by: String,
    /// One line per change ("account acc_x added", "web_search: rate 0.005 from …").
    pub summary: Vec<String>,
}

/// An API key of a workspace's control plane (docs/console.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    /// Public id (`key_…`): named in the audit log and by `admin-key revoke`.
    pub id: String,
    /// What the key is for ("ci", "alice").
    pub name: String,
    pub role: AdminRole,
    /// Lowercase hex SHA-256 of the key; the key itself is shown once, when made. Empty for a
    /// password login.
    pub key_sha256: String,
    /// A console login by password instead of a key: its login name (an email, lowercase),
    /// unique among the workspace's active logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// The login's password as an Argon2id hash in PHC form (a slow hash: passwords are
    /// guessable where 256-bit keys are not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_phc: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// From this instant the key is refused.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<OffsetDateTime>,
}

/// What an admin key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Read and change the workspace.
    Admin,
    /// Read only; every write is refused with 403.
    ReadOnly,
}

impl AdminKey {
    /// Whether the key is in force at `now`.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none_or(|revoked| now < revoked)
    }
}

/// An instant written as RFC 3339 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rfc3339(#[serde(with = "time::serde::rfc3339")] pub OffsetDateTime);

impl ConfigRecord {
    /// A record of `config` as version `version`, published at `applied_at`, following
    /// `previous` (the workspace's current record, if any): secrets it already had keep their
    /// first-published instant, new ones start now.
    pub fn next(
        previous: Option<&ConfigRecord>,
        config: MeteringConfig,
        applied_at: OffsetDateTime,
    ) -> ConfigRecord {
        let secrets_since = config
            .agent_instances
            .iter()
            .flat_map(AgentInstance::secret_hashes)
            .map(|hash| {
                let since = previous
                    .filter(|previous| previous.has_secret(hash))
                    .map(|previous| previous.secret_since(hash))
                    .unwrap_or(applied_at);
                (hash.to_string(), Rfc3339(since))
            })
            .collect();
        ConfigRecord {
            format: CONFIG_RECORD_FORMAT,
            version: previous.map(|previous| previous.version + 1).unwrap_or(1),
            applied_at,
            config,
            secrets_since,
            admin_keys: previous
                .map(|previous| previous.admin_keys.clone())
                .unwrap_or_default(),
            change: None,
        }
    }

    fn has_secret(&self, secret_sha256: &str) -> bool {
        self.config
            .agent_instances
            .iter()
            .flat_map(AgentInstance::secret_hashes)
            .any(|hash| hash == secret_sha256)
    }

    /// Since when this workspace has had the secret whose hash this is.
    pub fn secret_since(&self, secret_sha256: &str) -> OffsetDateTime {
        self.secrets_since
            .get(secret_sha256)
            .map(|since| since.0)
            .unwrap_or(self.applied_at)
    }
}

/// The only [`ConfigRecord::format`] this build reads and writes.
pub const CONFIG_RECORD_FORMAT: u32 = 1;

impl MeteringConfig {
    /// Problems with secrets this configuration shares with *other* workspaces (`others`: their
    /// current configurations). One line per instance; the other workspace is not named, so a
    /// tenant learns nothing about another.
    pub fn secrets_used_elsewhere<'a>(
        &self,
        others: impl IntoIterator<Item = &'a MeteringConfig>,
    ) -> Vec<String> {
        let elsewhere: HashSet<&str> = others
            .into_iter()
            .filter(|other| other.workspace.id != self.workspace.id)
            .flat_map(|other| other.agent_instances.iter())
            .flat_map(AgentInstance::secret_hashes)
            .collect();
        self.agent_instances
            .iter()
            .filter(|instance| {
                instance
                    .secret_hashes()
                    .any(|hash| elsewhere.contains(hash))
            })
            .map(|instance| {
                format!(
                    "agent instance {:?}: its secret_sha256 is already in use; every agent instance needs a secret of its own (make one with `agentmeter secret new`)",
                    instance.id
                )
            })
            .collect()
    }
}

/// The rule for one action name in a workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRule {
    pub tracked: bool,
    /// An `[[outcomes]]` definition names it (in some version).
    pub outcome: bool,
    /// The versions of its definition: (effective from, µs since the epoch, `i64::MIN` for
    /// always; its `when`, compiled once with the snapshot), ascending.
    pub outcome_versions: Vec<(i64, Option<CompiledCondition>)>,
    pub pricing: Option<Pricing>,
}

impl ActionRule {
    /// Whether `raw`, an action this rule applies to, is an outcome (`@outcome`): tracked, a
    /// version of an outcome definition is in force at its `occurred_at`, and that version's
    /// condition holds. Never panics on any action.
    pub fn is_outcome(&self, raw: &RawAction) -> bool {
        if !(self.tracked && self.outcome) {
            return false;
        }
        let index = self
            .outcome_versions
            .partition_point(|(from, _)| *from <= raw.occurred_at_micros);
        index
            .checked_sub(1)
            .map(|index| &self.outcome_versions[index].1)
            .is_some_and(|when| when.as_ref().is_none_or(|when| when.holds(raw)))
    }
}

/// A measure with its rates, sorted by `effective_from`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub measure: Measure,
    /// (effective_from in µs since the epoch, cost per unit), ascending.
    pub rates: Vec<(i64, Decimal)>,
}

impl Pricing {
    /// The cost per unit in force at `occurred_at_micros`, if any rate had started by then.
    pub fn rate_at(&self, occurred_at_micros: i64) -> Option<Decimal> {
        let index = self
            .rates
            .partition_point(|(effective_from, _)| *effective_from <= occurred_at_micros);
        index.checked_sub(1).map(|index| self.rates[index].1)
    }
}

/// The agent instance a secret belongs to, and until when a retired one is accepted.
#[derive(Debug, Clone)]
struct SecretOwner {
    instance: String,
    valid_until: Option<OffsetDateTime>,
}

/// A validated configuration compiled into lookup tables; immutable once built.
#[derive(Debug, Clone)]
pub struct WorkspaceSnapshot {
    pub version: i64,
    pub config: MeteringConfig,
    /// When this version was published and by whom (from its [`ConfigRecord`]; the epoch and
    /// `None` for snapshots built without one).
    pub applied_at: OffsetDateTime,
    pub change: Option<ChangeNote>,
    instances_by_id: HashMap<String, AgentInstance>,
    /// Every secret that authenticates (current and retired, of instances neither archived nor
    /// of an archived account) → its instance and, for a retired one, when it stops.
    instances_by_secret_hash: HashMap<[u8; 32], SecretOwner>,
    rules: HashMap<String, ActionRule>,
    composites: Vec<CompiledComposite>,
}

static UNTRACKED: ActionRule = ActionRule {
    tracked: false,
    outcome: false,
    outcome_versions: Vec::new(),
    pricing: None,
};

impl WorkspaceSnapshot {
    /// Compiles a configuration; it must have passed [`MeteringConfig::validate`].
    pub fn build(
        version: i64,
        config: MeteringConfig,
    ) -> Result<WorkspaceSnapshot, ValidationErrors> {
        config.validate()?;
        let instances_by_id = config
            .agent_instances
            .iter()
            .map(|instance| (instance.id.clone(), instance.clone()))
            .collect();
        let archived_accounts: HashSet<&str> = config
            .accounts
            .iter()
            .filter(|account| account.archived)
            .map(|account| account.id.as_str())
            .collect();
        let mut instances_by_secret_hash = HashMap::new();
        for instance in &config.agent_instances {
            if instance.archived || archived_accounts.contains(instance.account.as_str()) {
                continue;
            }
            let owner = |valid_until| SecretOwner {
                instance: instance.id.clone(),
                valid_until,
            };
            if let Some(digest) = parse_secret_hash(&instance.secret_sha256) {
                instances_by_secret_hash.insert(digest, owner(None));
            }
            for retired in &instance.retired_secrets {
                if let Some(digest) = parse_secret_hash(&retired.secret_sha256) {
                    instances_by_secret_hash.insert(digest, owner(Some(retired.valid_until)));
                }
            }
        }
        let mut outcomes: HashMap<&str, Vec<(i64, Option<CompiledCondition>)>> = HashMap::new();
        for outcome in &config.outcomes {
            let when = match &outcome.when {
                Some(when) => Some(
                    when.compile(&format!("outcome {:?}", outcome.action))
                        .map_err(ValidationErrors)?,
                ),
                None => None,
            };
            let from = outcome.effective_from.map_or(i64::MIN, micros_of);
            outcomes
                .entry(outcome.action.as_str())
                .or_default()
                .push((from, when));
        }
        let mut rules: HashMap<String, ActionRule> = config
            .tagging
            .tracked
            .iter()
            .map(|name| {
                let versions = outcomes.remove(name.as_str()).unwrap_or_default();
                let rule = ActionRule {
                    tracked: true,
                    outcome: !versions.is_empty(),
                    outcome_versions: versions,
                    pricing: None,
                };
                (name.clone(), rule)
            })
            .collect();
        for allocation in &config.cost_allocations {
            let measure = allocation.measure().expect("validated above");
            let rates = allocation
                .rates
                .iter()
                .map(|rate| {
                    let micros = (rate.effective_from.unix_timestamp_nanos() / 1000) as i64;
                    (micros, rate.cost_per_unit)
                })
                .collect();
            if let Some(rule) = rules.get_mut(&allocation.action) {
                rule.pricing = Some(Pricing { measure, rates });
            }
        }
        let composites = compile_composites(&config.composite_outcomes)?;
        Ok(WorkspaceSnapshot {
            version,
            config,
            applied_at: OffsetDateTime::UNIX_EPOCH,
            change: None,
            instances_by_id,
            instances_by_secret_hash,
            rules,
            composites,
        })
    }

    /// The composite outcome versions, in the order of the configuration.
    pub fn composite_outcomes(&self) -> &[CompiledComposite] {
        &self.composites
    }

    pub fn workspace_id(&self) -> &str {
        &self.config.workspace.id
    }

    pub fn currency(&self) -> &str {
        &self.config.workspace.currency
    }

    pub fn instance(&self, instance_id: &str) -> Option<&AgentInstance> {
        self.instances_by_id.get(instance_id)
    }

    /// The instance whose secret this is. The lookup is by SHA-256 digest, so its timing says
    /// nothing about the secret; the final comparison is constant-time all the same.
    pub fn authenticate(&self, secret: &str) -> Option<&AgentInstance> {
        self.authenticate_at(secret, OffsetDateTime::now_utc())
    }

    /// The agent instance `secret` authenticates at `now`: its current secret, or a retired one
    /// before its `valid_until`.
    pub fn authenticate_at(&self, secret: &str, now: OffsetDateTime) -> Option<&AgentInstance> {
        let digest = secret_digest(secret);
        let owner = self.instances_by_secret_hash.get(&digest)?;
        let instance = self.instances_by_id.get(&owner.instance)?;
        let stored = instance
            .secret_hashes()
            .filter_map(parse_secret_hash)
            .find(|stored| bool::from(stored.ct_eq(&digest)))?;
        let in_force = owner.valid_until.is_none_or(|until| now < until);
        (in_force && stored == digest).then_some(instance)
    }

    /// The rule for an action name, trace event or auto tag; untracked when not configured.
    pub fn rule(&self, action_name: &str) -> &ActionRule {
        self.rules.get(action_name).unwrap_or(&UNTRACKED)
    }

    /// The rule for an action that may also carry a trace event (the span name of an LLM call):
    /// its own name's rule when that is configured, else the trace event's — so tracking either
    /// `gemini_llm_gemini-2.5-flash` or `gemini.generate_content` meters the call.
    pub fn rule_for(&self, action_name: &str, trace_event: Option<&str>) -> &ActionRule {
        match (self.rules.get(action_name), trace_event) {
            (Some(rule), _) => rule,
            (None, Some(trace_event)) => self.rule(trace_event),
            (None, None) => &UNTRACKED,
        }
    }

    /// SHA-256 digests of this workspace's secrets with their instance ids.
    pub fn secret_digests(&self) -> impl Iterator<Item = (&[u8; 32], &str)> {
        self.instances_by_secret_hash
            .iter()
            .map(|(digest, owner)| (digest, owner.instance.as_str()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const EXAMPLE: &str = include_str!("../../deploy/local/metering.example.toml");

    #[test]
    fn the_shipped_example_is_valid() {
        let config = MeteringConfig::from_toml(EXAMPLE).unwrap();
        assert_eq!(config.accounts[0].name, "Acme Corp");
        assert_eq!(
            config.accounts[0].email.as_deref(),
            Some("billing@acme.com")
        );
        let snapshot = WorkspaceSnapshot::build(1, config).unwrap();
        let gemini = snapshot.rule("gemini_llm_gemini-2.5-flash");
        assert!(gemini.tracked);
        let pricing = gemini.pricing.as_ref().unwrap();
        assert_eq!(pricing.measure, Measure::Token);
        assert_eq!(pricing.rate_at(i64::MAX), Some("0.006".parse().unwrap()));
        let detection = snapshot.rule("object_detection");
        assert!(detection.outcome && detection.outcome_versions[0].1.is_some());
        let detected = |attributes: &str| RawAction {
            attributes_json: attributes.into(),
            ..RawAction::minimal(
                "ws_demo",
                "acc_acme",
                "inst_acme_research",
                "e1",
                "object_detection",
            )
        };
        // What the demo and the bench send is an outcome; zero boxes is not.
        assert!(detection.is_outcome(&detected(
            r#"{"detected_boxes": 4, "model": "yolov8-invoice"}"#
        )));
        assert!(detection.is_outcome(&detected("{}")));
        assert!(!detection.is_outcome(&detected(r#"{"detected_boxes": 0}"#)));
        assert!(!snapshot.rule("never_configured").tracked);
    }

    fn minimal() -> MeteringConfig {
        toml::from_str(MINIMAL).unwrap()
    }

    const MINIMAL: &str = r#"
            [workspace]
            id = "ws"
            name = "W"
            currency = "USD"
            [[accounts]]
            id = "a1"
            name = "A1"
            [[agent_types]]
            id = "t1"
            name = "T1"
            [[agent_instances]]
            id = "i1"
            name = "I1"
            agent_type = "t1"
            account = "a1"
            secret_sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
            [tagging]
            tracked = ["llm_call"]
            [[cost_allocations]]
            action = "llm_call"
            measure = "token"
            rates = [
              { effective_from = "2025-01-01T00:00:00Z", cost_per_unit = "0.001" },
              { effective_from = "2025-06-01T00:00:00Z", cost_per_unit = "0.002" },
            ]
            "#;

    #[test]
    fn picks_the_rate_in_force_at_the_action_time() {
        let snapshot = WorkspaceSnapshot::build(1, minimal()).unwrap();
        let pricing = snapshot.rule("llm_call").pricing.clone().unwrap();
        let micros = |text: &str| {
            let instant =
                OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .unwrap();
            (instant.unix_timestamp_nanos() / 1000) as i64
        };
        assert_eq!(pricing.rate_at(micros("2024-12-31T23:59:59Z")), None);
        assert_eq!(
            pricing.rate_at(micros("2025-01-01T00:00:00Z")),
            Some("0.001".parse().unwrap())
        );
        assert_eq!(
            pricing.rate_at(micros("2025-05-31T23:59:59Z")),
            Some("0.001".parse().unwrap())
        );
        assert_eq!(
            pricing.rate_at(micros("2025-06-01T00:00:00Z")),
            Some("0.002".parse().unwrap())
        );
    }

    #[test]
    fn authenticates_by_secret_and_rejects_others() {
        let snapshot = WorkspaceSnapshot::build(1, minimal()).unwrap();
        assert_eq!(
            hash_secret("secret"),
            minimal().agent_instances[0].secret_sha256
        );
        assert_eq!(snapshot.authenticate("secret").unwrap().id, "i1");
        assert!(snapshot.authenticate("Secret").is_none());
        assert!(snapshot.authenticate("").is_none());
    }

    #[test]
    fn reports_every_problem_at_once() {
        let mut config = minimal();
        config.workspace.currency = "usd".into();
        config.agent_instances[0].account = "missing".into();
        config.agent_instances[0].secret_sha256 = "plaintext-secret".into();
        config.cost_allocations[0].rates.reverse();
        config.outcomes.push(OutcomeDefinition {
            action: "not_tracked".into(),
            when: None,
            effective_from: None,
        });
        let problems = config.validate().unwrap_err().0;
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("currency")));
        assert!(problems.iter().any(|p| p.contains("account \"missing\"")));
        assert!(problems.iter().any(|p| p.contains("secret_sha256")));
        assert!(problems.iter().any(|p| p.contains("strictly increasing")));
        assert!(problems.iter().any(|p| p.contains("not_tracked")));
    }

    fn with_outcome(when: &str) -> String {
        format!("{MINIMAL}\n[[outcomes]]\naction = \"llm_call\"\n{when}\n")
    }

    #[test]
    fn an_outcome_condition_is_read_compiled_and_evaluated() {
        let text = with_outcome(
            r#"when = { all = [
              { field = "attributes.status", eq = "success" },
              { field = "attributes.confidence_score", ge = "0.9" },
              { any = [
                { field = "llm_model", in = ["gpt-4o", "gemini-2.5-flash"] },
                { not = { field = "attributes.draft", exists = true } },
              ] },
            ] }"#,
        );
        let config = MeteringConfig::from_toml(&text).unwrap();
        let snapshot = WorkspaceSnapshot::build(1, config.clone()).unwrap();
        let rule = snapshot.rule("llm_call");
        assert!(rule.outcome && rule.outcome_versions[0].1.is_some());
        let call = |attributes: &str| RawAction {
            attributes_json: attributes.into(),
            ..RawAction::minimal("ws", "a1", "i1", "e1", "llm_call")
        };
        assert!(rule.is_outcome(&call(r#"{"status":"success","confidence_score":"0.93"}"#)));
        assert!(!rule.is_outcome(&call(r#"{"status":"success","confidence_score":"0.89"}"#)));
        assert!(!snapshot.rule("untracked").is_outcome(&call("{}")));
        // The same table form, and through the config topic's JSON.
        let table = with_outcome(
            "[outcomes.when]\nany = [ { field = \"attributes.status\", eq = \"success\" } ]",
        );
        MeteringConfig::from_toml(&table).unwrap();
        let record = ConfigRecord::next(None, config, OffsetDateTime::UNIX_EPOCH);
        let read: ConfigRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(read, record);
    }

    #[test]
    fn outcome_condition_problems_are_listed_with_the_others() {
        let text = with_outcome(
            r#"when = { all = [
              { field = "user_id", lt = "5" },
              { field = "attributes.score", ge = "high" },
              { field = "llm_modle", eq = "gpt-4o" },
              { field = "attributes.model", in = [] },
              { field = "attributes.model", in = ["gpt-4o", true] },
              { field = "description", matches = "(unclosed" },
            ] }"#,
        )
        .replace("currency = \"USD\"", "currency = \"usd\"");
        let Err(ConfigFileError::Invalid(ValidationErrors(problems))) =
            MeteringConfig::from_toml(&text)
        else {
            panic!("accepted: {text}");
        };
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(problems[0].contains("currency"), "{problems:#?}");
        for (problem, expected) in problems[1..].iter().zip([
            "outcome \"llm_call\": when.all[0]: `lt` compares decimals, but \"user_id\" is a text field",
            "outcome \"llm_call\": when.all[1]: `ge` compares decimals, but its literal \"high\" is text",
            "outcome \"llm_call\": when.all[2]: unknown field \"llm_modle\"",
            "outcome \"llm_call\": when.all[3]: `in` on \"attributes.model\" is an empty list",
            "outcome \"llm_call\": when.all[4]: `in` on \"attributes.model\" mixes boolean and text values",
            "outcome \"llm_call\": when.all[5]: the regex \"(unclosed\" of `matches` on \"description\" does not compile",
        ]) {
            assert!(problem.starts_with(expected), "{problem}\n expected {expected}");
        }
        // A misspelt operator is refused when the file is read.
        let misspelt =
            with_outcome(r#"when = { field = "attributes.status", equals = "success" }"#);
        let Err(ConfigFileError::Parse(error)) = MeteringConfig::from_toml(&misspelt) else {
            panic!("accepted: {misspelt}");
        };
        assert!(error.contains("unknown field `equals`"), "{error}");
    }

    #[test]
    fn rejects_a_float_cost_and_an_unknown_field() {
        let float_cost = EXAMPLE.replace("cost_per_unit = \"0.006\"", "cost_per_unit = 0.006");
        assert!(matches!(
            MeteringConfig::from_toml(&float_cost),
            Err(ConfigFileError::Parse(_))
        ));
        let unknown = format!("{EXAMPLE}\n[extra]\nx = 1\n");
        assert!(matches!(
            MeteringConfig::from_toml(&unknown),
            Err(ConfigFileError::Parse(_))
        ));
    }

    #[test]
    fn custom_measures_need_a_quantity_attribute() {
        let mut config = minimal();
        config.cost_allocations[0].measure = "pages".into();
        assert!(config.validate().unwrap_err().0[0].contains("quantity_attribute"));
        config.cost_allocations[0].quantity_attribute = Some("page_count".into());
        config.validate().unwrap();
    }

    #[test]
    fn a_record_keeps_when_each_secret_was_first_published() {
        let first_at = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let later = first_at + time::Duration::days(3);
        let first = ConfigRecord::next(None, minimal(), first_at);
        assert_eq!(first.version, 1);
        let hash = minimal().agent_instances[0].secret_sha256.clone();
        assert_eq!(first.secret_since(&hash), first_at);

        let mut rotated = minimal();
        rotated.agent_instances.push(AgentInstance {
            id: "i2".into(),
            secret_sha256: hash_secret("another"),
            ..rotated.agent_instances[0].clone()
        });
        let second = ConfigRecord::next(Some(&first), rotated.clone(), later);
        assert_eq!(second.version, 2);
        assert_eq!(second.secret_since(&hash), first_at, "kept across versions");
        assert_eq!(second.secret_since(&hash_secret("another")), later);

        // A secret removed and added back starts again.
        let without = ConfigRecord::next(Some(&second), minimal(), later);
        let back = ConfigRecord::next(Some(&without), rotated, later + time::Duration::days(1));
        assert_eq!(
            back.secret_since(&hash_secret("another")),
            later + time::Duration::days(1)
        );

        // Round trip through the topic's JSON, and records without the field still read.
        let text = serde_json::to_string(&second).unwrap();
        assert_eq!(serde_json::from_str::<ConfigRecord>(&text).unwrap(), second);
        let old = r#"{"format":1,"version":1,"applied_at":"2025-01-01T00:00:00Z","config":{"workspace":{"id":"ws","name":"W","currency":"USD"}}}"#;
        let old: ConfigRecord = serde_json::from_str(old).unwrap();
        assert_eq!(old.secret_since("any"), old.applied_at);
    }

    #[test]
    fn a_secret_of_another_workspace_is_refused_without_naming_it() {
        let mine = minimal();
        let mut theirs = minimal();
        theirs.workspace.id = "other_tenant".into();
        let problems = mine.secrets_used_elsewhere([&theirs]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"i1\"") && problems[0].contains("already in use"));
        assert!(!problems[0].contains("other_tenant"), "{}", problems[0]);
        // The workspace's own previous version is no conflict.
        assert!(mine.secrets_used_elsewhere([&minimal()]).is_empty());
        theirs.agent_instances[0].secret_sha256 = hash_secret("different");
        assert!(mine.secrets_used_elsewhere([&theirs]).is_empty());
    }

    #[test]
    fn tracked_names_follow_the_text_rules() {
        let mut config = minimal();
        config.tagging.tracked.push("web\u{200B}search".into());
        config.tagging.tracked.push("web_search ".into());
        let problems = config.validate().unwrap_err().0;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("U+200B"), "{problems:?}");
        assert!(problems[1].contains("whitespace"), "{problems:?}");
    }

    #[test]
    fn a_cost_per_unit_above_the_bound_is_refused() {
        let mut config = minimal();
        config.cost_allocations[0].rates[1].cost_per_unit = "1000000000.5".parse().unwrap();
        let problems = config.validate().unwrap_err().0;
        assert!(
            problems[0].contains("above the largest accepted"),
            "{problems:?}"
        );
    }

    fn with_composites(composites: &str) -> MeteringConfig {
        let text = MINIMAL.replace(
            "tracked = [\"llm_call\"]",
            "tracked = [\"llm_call\", \"web_search\", \"delivery\"]",
        );
        toml::from_str(&format!("{text}\n{composites}")).unwrap()
    }

    #[test]
    fn a_composite_outcome_compiles_with_its_steps_window_context_and_versions() {
        let config = with_composites(
            r#"
            [[composite_outcomes]]
            name = "research_completed"
            steps = [{ action = "web_search" }, { action = "llm_call" }, { action = "delivery", when = { field = "attributes.status", eq = "success" } }]
            ordered = true
            within = "15m"
            context = "user"

            [[composite_outcomes]]
            name = "research_completed"
            steps = [{ action = "web_search" }, { action = "delivery" }]
            within = "1h"
            context = "attributes.lead_id"
            effective_from = "2026-01-01T00:00:00Z"
            "#,
        );
        let snapshot = WorkspaceSnapshot::build(1, config).unwrap();
        let [first, second] = snapshot.composite_outcomes() else {
            panic!("two versions");
        };
        assert_eq!(first.within_micros, 15 * 60 * 1_000_000);
        assert!(first.ordered && !second.ordered);
        assert_eq!(first.context, CompositeContext::User);
        assert_eq!(
            second.context,
            CompositeContext::Attribute("lead_id".into())
        );
        assert_eq!(first.effective_from_micros, i64::MIN);
        assert_eq!(first.effective_until_micros, 1_767_225_600_000_000);
        assert_eq!(second.effective_from_micros, first.effective_until_micros);
        assert_eq!(second.effective_until_micros, i64::MAX);
        assert!(first.steps[2].1.is_some() && first.steps[0].1.is_none());
    }

    #[test]
    fn composite_outcomes_that_could_never_fire_or_are_ambiguous_are_listed_errors() {
        let config = with_composites(
            r#"
            [[composite_outcomes]]
            name = "llm_call"
            steps = [{ action = "web_search" }, { action = "not_tracked" }]
            within = "0s"
            context = "session"

            [[composite_outcomes]]
            name = "single"
            steps = [{ action = "web_search" }]
            within = "400days"
            context = "attributes."

            [[composite_outcomes]]
            name = "bad_condition"
            steps = [{ action = "web_search", when = { field = "attributes.x", matches = "(" } }, { action = "delivery" }]
            within = "soon"
            context = "user"

            [[composite_outcomes]]
            name = "bad_condition"
            steps = [{ action = "web_search" }, { action = "delivery" }]
            within = "1h"
            context = "user"
            "#,
        );
        let problems = config.validate().unwrap_err().0;
        for expected in [
            "composite outcome \"llm_call\": the name is a tracked action's",
            "step 1 \"not_tracked\" is not tracked, so the outcome could never fire",
            "within is zero",
            "context \"session\" must be \"user\" or \"attributes.KEY\"",
            "\"single\" has 1 steps",
            "longer than the longest accepted",
            "context \"attributes.\" must be",
            "composite outcome \"bad_condition\": step 0: when",
            "within \"soon\" is not a duration",
            "\"bad_condition\" is defined again without effective_from",
        ] {
            assert!(
                problems.iter().any(|problem| problem.contains(expected)),
                "{expected:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn a_composite_outcome_round_trips_through_json_and_needs_two_steps() {
        let mut config = with_composites(
            r#"
            [[composite_outcomes]]
            name = "research_completed"
            steps = [{ action = "web_search" }, { action = "delivery" }]
            within = "15m"
            context = "user"
            "#,
        );
        assert!(config.validate().is_ok());
        let text = serde_json::to_string(&config).unwrap();
        let back: MeteringConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, config);
        config.composite_outcomes[0].steps.truncate(1);
        assert!(config.validate().is_err());
    }

    #[test]
    fn an_outcome_definition_applies_from_its_effective_from_by_the_actions_time() {
        let text = format!(
            "{MINIMAL}
            [[outcomes]]
            action = \"llm_call\"
            effective_from = \"2026-01-01T00:00:00Z\"
            [[outcomes]]
            action = \"llm_call\"
            when = {{ field = \"attributes.status\", eq = \"success\" }}
            effective_from = \"2026-06-01T00:00:00Z\"
            "
        );
        let snapshot =
            WorkspaceSnapshot::build(1, MeteringConfig::from_toml(&text).unwrap()).unwrap();
        let rule = snapshot.rule("llm_call");
        let at = |instant: &str, status: &str| RawAction {
            occurred_at_micros: (OffsetDateTime::parse(
                instant,
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp_nanos()
                / 1000) as i64,
            attributes_json: format!(r#"{{"status": "{status}"}}"#),
            ..RawAction::minimal("ws", "a1", "i1", "e1", "llm_call")
        };
        assert!(
            !rule.is_outcome(&at("2025-12-31T23:59:59Z", "success")),
            "before the first version"
        );
        assert!(
            rule.is_outcome(&at("2026-01-01T00:00:00Z", "failed")),
            "the first version: always"
        );
        assert!(rule.is_outcome(&at("2026-06-01T00:00:00Z", "success")));
        assert!(
            !rule.is_outcome(&at("2026-06-01T00:00:00Z", "failed")),
            "the second version's condition"
        );

        let twice = format!(
            "{MINIMAL}\n[[outcomes]]\naction = \"llm_call\"\n[[outcomes]]\naction = \"llm_call\"\n"
        );
        let problems = toml::from_str::<MeteringConfig>(&twice)
            .unwrap()
            .validate()
            .unwrap_err()
            .0;
        assert!(
            problems[0].contains("later version of its definition needs an effective_from"),
            "{problems:?}"
        );
        let backwards = format!(
            "{MINIMAL}\n[[outcomes]]\naction = \"llm_call\"\neffective_from = \"2026-02-01T00:00:00Z\"\n[[outcomes]]\naction = \"llm_call\"\neffective_from = \"2026-01-01T00:00:00Z\"\n"
        );
        let problems = toml::from_str::<MeteringConfig>(&backwards)
            .unwrap()
            .validate()
            .unwrap_err()
            .0;
        assert!(
            problems[0].contains("strictly increasing effective_from"),
            "{problems:?}"
        );
    }
}
