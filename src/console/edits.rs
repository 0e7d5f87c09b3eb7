//! The changes the API and the web console make to a workspace's configuration, each a pure
//! function of the current configuration, so both surfaces change it the same way. A refusal
//! names the field; the whole result is then checked by `publish_next` like a file.

use agentmeter_schemas::catalog::{Product, Subscription};
use agentmeter_schemas::metering::{
    Account, AgentInstance, AgentType, Contact, CostAllocation, OutcomeDefinition, Rate,
    RetiredSecret, MAX_RETIRED_SECRETS,
};
use agentmeter_schemas::MeteringConfig;
use rust_decimal::Decimal;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::ApiError;
use crate::config_publish::PublishError;

fn refused(field: &str, message: impl Into<String>) -> PublishError {
    PublishError::Refused {
        field: Some(field.to_string()),
        message: message.into(),
    }
}

/// A UTC date typed as `YYYY-MM-DD` (a usage read's bound, a subscription's first or last day)
/// as the start of that day; refused naming `field`.
pub fn utc_day(field: &str, text: &str) -> Result<OffsetDateTime, ApiError> {
    time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map(|date| date.midnight().assume_utc())
    .map_err(|error| {
        ApiError::invalid(
            field,
            format!("{field} {text:?} is not a date (YYYY-MM-DD): {error}"),
        )
    })
}

pub fn create_account(
    config: &mut MeteringConfig,
    account: Account,
) -> Result<Account, PublishError> {
    if config.accounts.iter().any(|other| other.id == account.id) {
        return Err(refused(
            "id",
            format!("account {:?} already exists; choose another id", account.id),
        ));
    }
    config.accounts.push(account.clone());
    Ok(account)
}

/// The fields of an account a change may set; an empty string clears an optional one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub description: Option<String>,
    pub external_id: Option<String>,
}

fn account_mut<'a>(
    config: &'a mut MeteringConfig,
    id: &str,
) -> Result<&'a mut Account, PublishError> {
    config
        .accounts
        .iter_mut()
        .find(|account| account.id == id)
        .ok_or_else(|| PublishError::NotFound(format!("account {id:?}")))
}

pub fn update_account(
    config: &mut MeteringConfig,
    id: &str,
    patch: AccountPatch,
) -> Result<Account, PublishError> {
    let account = account_mut(config, id)?;
    if let Some(name) = patch.name {
        account.name = name;
    }
    let optional = |value: Option<String>, slot: &mut Option<String>| {
        if let Some(value) = value {
            *slot = (!value.is_empty()).then_some(value);
        }
    };
    optional(patch.email, &mut account.email);
    optional(patch.phone, &mut account.phone);
    optional(patch.address, &mut account.address);
    optional(patch.description, &mut account.description);
    optional(patch.external_id, &mut account.external_id);
    Ok(account.clone())
}

pub fn archive_account(config: &mut MeteringConfig, id: &str) -> Result<Account, PublishError> {
    let account = account_mut(config, id)?;
    account.archived = true;
    Ok(account.clone())
}

pub fn create_contact(
    config: &mut MeteringConfig,
    contact: Contact,
) -> Result<Contact, PublishError> {
    if config.contacts.iter().any(|other| other.id == contact.id) {
        return Err(refused(
            "id",
            format!("contact {:?} already exists", contact.id),
        ));
    }
    if !config
        .accounts
        .iter()
        .any(|account| account.id == contact.account)
    {
        return Err(PublishError::NotFound(format!(
            "account {:?}",
            contact.account
        )));
    }
    config.contacts.push(contact.clone());
    Ok(contact)
}

pub fn create_agent_type(
    config: &mut MeteringConfig,
    agent_type: AgentType,
) -> Result<AgentType, PublishError> {
    if config
        .agent_types
        .iter()
        .any(|other| other.id == agent_type.id)
    {
        return Err(refused(
            "id",
            format!("agent type {:?} already exists", agent_type.id),
        ));
    }
    config.agent_types.push(agent_type.clone());
    Ok(agent_type)
}

/// A new agent instance; its secret is made by the caller, only its hash is stored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewInstance {
    pub id: String,
    pub name: String,
    pub agent_type: String,
    pub account: String,
    #[serde(default)]
    pub contact: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

pub fn create_instance(
    config: &mut MeteringConfig,
    new: NewInstance,
    secret_sha256: String,
) -> Result<AgentInstance, PublishError> {
    if config
        .agent_instances
        .iter()
        .any(|other| other.id == new.id)
    {
        return Err(refused(
            "id",
            format!("agent instance {:?} already exists", new.id),
        ));
    }
    if !config
        .accounts
        .iter()
        .any(|account| account.id == new.account)
    {
        return Err(PublishError::NotFound(format!("account {:?}", new.account)));
    }
    if !config
        .agent_types
        .iter()
        .any(|kind| kind.id == new.agent_type)
    {
        return Err(PublishError::NotFound(format!(
            "agent type {:?}",
            new.agent_type
        )));
    }
    let instance = AgentInstance {
        id: new.id,
        name: new.name,
        description: new.description.filter(|text| !text.is_empty()),
        agent_type: new.agent_type,
        account: new.account,
        contact: new.contact.filter(|text| !text.is_empty()),
        secret_sha256,
        retired_secrets: Vec::new(),
        archived: false,
    };
    config.agent_instances.push(instance.clone());
    Ok(instance)
}

fn instance_mut<'a>(
    config: &'a mut MeteringConfig,
    id: &str,
) -> Result<&'a mut AgentInstance, PublishError> {
    config
        .agent_instances
        .iter_mut()
        .find(|instance| instance.id == id)
        .ok_or_else(|| PublishError::NotFound(format!("agent instance {id:?}")))
}

/// Replaces the instance's secret by `new_secret_sha256`; the replaced one keeps working until
/// `valid_until`. Secrets whose grace period is over go; at most [`MAX_RETIRED_SECRETS`] are
/// kept, the newest.
pub fn rotate_secret(
    config: &mut MeteringConfig,
    id: &str,
    new_secret_sha256: String,
    now: OffsetDateTime,
    valid_until: OffsetDateTime,
) -> Result<AgentInstance, PublishError> {
    let instance = instance_mut(config, id)?;
    instance
        .retired_secrets
        .retain(|retired| retired.valid_until > now);
    instance.retired_secrets.push(RetiredSecret {
        secret_sha256: std::mem::replace(&mut instance.secret_sha256, new_secret_sha256),
        valid_until,
    });
    let excess = instance
        .retired_secrets
        .len()
        .saturating_sub(MAX_RETIRED_SECRETS);
    instance.retired_secrets.drain(..excess);
    Ok(instance.clone())
}

pub fn archive_instance(
    config: &mut MeteringConfig,
    id: &str,
) -> Result<AgentInstance, PublishError> {
    let instance = instance_mut(config, id)?;
    instance.archived = true;
    Ok(instance.clone())
}

pub fn set_tracked(
    config: &mut MeteringConfig,
    action: &str,
    tracked: bool,
) -> Result<(), PublishError> {
    let listed = config.tagging.tracked.iter().any(|name| name == action);
    if tracked && !listed {
        config.tagging.tracked.push(action.to_string());
    } else if !tracked && listed {
        if config
            .cost_allocations
            .iter()
            .any(|cost| cost.action == action)
            || config
                .outcomes
                .iter()
                .any(|outcome| outcome.action == action)
        {
            return Err(refused(
                "tracked",
                format!("{action:?} has a cost allocation or an outcome definition; remove those before untracking it"),
            ));
        }
        config.tagging.tracked.retain(|name| name != action);
    }
    Ok(())
}

/// A new rate from a date, as a request gives it (text fields, checked by [`NewRate::rate`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRate {
    /// Needed for the action's first rate.
    #[serde(default)]
    pub measure: Option<String>,
    #[serde(default)]
    pub quantity_attribute: Option<String>,
    /// RFC 3339.
    pub effective_from: String,
    /// A decimal string ("0.006"), never a float.
    pub cost_per_unit: String,
}

impl NewRate {
    pub fn rate(&self) -> Result<Rate, ApiError> {
        let effective_from = OffsetDateTime::parse(self.effective_from.trim(), &Rfc3339).map_err(|error| {
            ApiError::invalid(
                "effective_from",
                format!("effective_from {:?} is not an RFC 3339 instant such as 2026-12-01T00:00:00Z: {error}", self.effective_from),
            )
        })?;
        let cost_per_unit: Decimal = self.cost_per_unit.trim().parse().map_err(|_| {
            ApiError::invalid(
                "cost_per_unit",
                format!(
                    "cost_per_unit {:?} is not a decimal such as \"0.006\"",
                    self.cost_per_unit
                ),
            )
        })?;
        Ok(Rate {
            effective_from,
            cost_per_unit,
        })
    }
}

/// Schedules `rate` for `action`: a new effective-dated rate of its allocation, or its first
/// allocation (then `measure` is needed, and the action becomes tracked).
pub fn schedule_rate(
    config: &mut MeteringConfig,
    action: &str,
    measure: Option<String>,
    quantity_attribute: Option<String>,
    rate: Rate,
) -> Result<CostAllocation, PublishError> {
    let measure = measure.filter(|measure| !measure.is_empty());
    match config
        .cost_allocations
        .iter_mut()
        .find(|cost| cost.action == action)
    {
        Some(allocation) => {
            if measure
                .as_ref()
                .is_some_and(|measure| *measure != allocation.measure)
            {
                return Err(refused(
                    "measure",
                    format!(
                        "{action:?} is measured in {:?}; a new rate cannot change the measure",
                        allocation.measure
                    ),
                ));
            }
            if let Some(last) = allocation.rates.last() {
                if last.effective_from >= rate.effective_from {
                    return Err(refused(
                        "effective_from",
                        format!(
                            "a new rate must start after the latest one ({}); schedule it from a later date",
                            last.effective_from.format(&Rfc3339).unwrap_or_default()
                        ),
                    ));
                }
            }
            allocation.rates.push(rate);
            Ok(allocation.clone())
        }
        None => {
            let measure = measure.ok_or_else(|| {
                refused("measure", format!("{action:?} has no cost allocation yet: give its measure (unit, token, input_token, output_token or a custom one)"))
            })?;
            if !config.tagging.tracked.iter().any(|name| name == action) {
                config.tagging.tracked.push(action.to_string());
            }
            let allocation = CostAllocation {
                action: action.to_string(),
                measure,
                quantity_attribute: quantity_attribute.filter(|name| !name.is_empty()),
                rates: vec![rate],
            };
            config.cost_allocations.push(allocation.clone());
            Ok(allocation)
        }
    }
}

pub fn set_outcome(
    config: &mut MeteringConfig,
    action: &str,
    outcome: bool,
) -> Result<(), PublishError> {
    let defined = config
        .outcomes
        .iter()
        .any(|definition| definition.action == action);
    if outcome && !defined {
        config.outcomes.push(OutcomeDefinition {
            action: action.to_string(),
            when: None,
            effective_from: None,
        });
    } else if !outcome {
        config
            .outcomes
            .retain(|definition| definition.action != action);
    }
    Ok(())
}

/// Creates the product `id`, or replaces it whole (its rate plans with it). The result is
/// checked like a file: a plan whose finalized invoices would change is refused (ADR 0004).
pub fn put_product(
    config: &mut MeteringConfig,
    id: &str,
    product: Product,
) -> Result<(Product, bool), PublishError> {
    if product.id != id {
        return Err(refused(
            "id",
            format!("the body's id {:?} is not the path's {id:?}", product.id),
        ));
    }
    match config.products.iter_mut().find(|known| known.id == id) {
        Some(known) => {
            *known = product.clone();
            Ok((product, false))
        }
        None => {
            config.products.push(product.clone());
            Ok((product, true))
        }
    }
}

pub fn create_subscription(
    config: &mut MeteringConfig,
    subscription: Subscription,
) -> Result<Subscription, PublishError> {
    if config
        .subscriptions
        .iter()
        .any(|known| known.id == subscription.id)
    {
        return Err(refused(
            "id",
            format!("subscription {:?} already exists", subscription.id),
        ));
    }
    if !config
        .accounts
        .iter()
        .any(|account| account.id == subscription.account)
    {
        return Err(PublishError::NotFound(format!(
            "account {:?}",
            subscription.account
        )));
    }
    config.subscriptions.push(subscription.clone());
    Ok(subscription)
}

/// Ends a subscription at `end` (exclusive): its periods from then on are not billed.
pub fn end_subscription(
    config: &mut MeteringConfig,
    id: &str,
    end: OffsetDateTime,
) -> Result<Subscription, PublishError> {
    let subscription = config
        .subscriptions
        .iter_mut()
        .find(|known| known.id == id)
        .ok_or_else(|| PublishError::NotFound(format!("subscription {id:?}")))?;
    if end <= subscription.start {
        return Err(refused(
            "end",
            format!(
                "end {} is not after the subscription's start {}",
                end.format(&Rfc3339).unwrap_or_default(),
                subscription.start.format(&Rfc3339).unwrap_or_default()
            ),
        ));
    }
    subscription.end = Some(end);
    Ok(subscription.clone())
}
