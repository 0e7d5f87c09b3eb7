//! The change lines of a configuration version ("account acc_x added", "web_search: new rate
//! 0.006 from …"): what `config apply` prints, and what every published version carries as its
//! audit note, whoever published it (`crate::config_publish`).

use agentmeter_schemas::MeteringConfig;

/// Every rate plan as `product/plan`, with its whole content (to tell a changed price).
fn rate_plans(
    config: &MeteringConfig,
) -> std::collections::BTreeMap<String, &agentmeter_schemas::catalog::RatePlan> {
    agentmeter_schemas::catalog::rate_plans(&config.products)
        .map(|(product, plan)| (format!("{}/{}", product.id, plan.id), plan))
        .collect()
}

/// An outcome definition with its condition, so that a changed `when` shows as a change.
fn describe_outcome(outcome: &agentmeter_schemas::metering::OutcomeDefinition) -> String {
    match &outcome.when {
        Some(when) => format!(
            "{} when {}",
            outcome.action,
            serde_json::to_string(when).unwrap_or_default()
        ),
        None => outcome.action.clone(),
    }
}

/// One line per changed part of the configuration.
pub fn describe_changes(before: Option<&MeteringConfig>, after: &MeteringConfig) -> Vec<String> {
    let Some(before) = before else {
        return vec![format!(
            "new workspace: {} accounts, {} agent instances, {} tracked actions, {} cost allocations, {} outcomes, {} rate plans, {} subscriptions",
            after.accounts.len(),
            after.agent_instances.len(),
            after.tagging.tracked.len(),
            after.cost_allocations.len(),
            after.outcomes.len(),
            rate_plans(after).len(),
            after.subscriptions.len()
        )];
    };
    let mut lines = Vec::new();
    let mut compare = |name: &str, before: Vec<String>, after: Vec<String>| {
        let added: Vec<_> = after
            .iter()
            .filter(|item| !before.contains(item))
            .cloned()
            .collect();
        let removed: Vec<_> = before
            .iter()
            .filter(|item| !after.contains(item))
            .cloned()
            .collect();
        if !added.is_empty() {
            lines.push(format!("{name} added: {}", added.join(", ")));
        }
        if !removed.is_empty() {
            lines.push(format!("{name} removed: {}", removed.join(", ")));
        }
    };
    compare(
        "accounts",
        before.accounts.iter().map(|a| a.id.clone()).collect(),
        after.accounts.iter().map(|a| a.id.clone()).collect(),
    );
    // An instance with its secret's fingerprint: a rotation shows as one removed, one added.
    let instances = |config: &MeteringConfig| -> Vec<String> {
        config
            .agent_instances
            .iter()
            .map(|i| {
                format!(
                    "{} (secret {}…)",
                    i.id,
                    &i.secret_sha256[..8.min(i.secret_sha256.len())]
                )
            })
            .collect()
    };
    compare("agent instances", instances(before), instances(after));
    compare(
        "tracked",
        before.tagging.tracked.clone(),
        after.tagging.tracked.clone(),
    );
    let allocation = |config: &MeteringConfig| {
        config
            .cost_allocations
            .iter()
            .map(|allocation| {
                let rates: Vec<String> = allocation
                    .rates
                    .iter()
                    .map(|rate| {
                        format!("{} from {}", rate.cost_per_unit, rate.effective_from.date())
                    })
                    .collect();
                format!(
                    "{} [{}: {}]",
                    allocation.action,
                    allocation.measure,
                    rates.join("; ")
                )
            })
            .collect::<Vec<_>>()
    };
    compare("cost allocation", allocation(before), allocation(after));
    compare(
        "outcomes",
        before.outcomes.iter().map(describe_outcome).collect(),
        after.outcomes.iter().map(describe_outcome).collect(),
    );
    let plans_before = rate_plans(before);
    let plans_after = rate_plans(after);
    compare(
        "rate plans",
        plans_before.keys().cloned().collect(),
        plans_after.keys().cloned().collect(),
    );
    let changed: Vec<&str> = plans_after
        .iter()
        .filter(|(key, plan)| plans_before.get(*key).is_some_and(|old| old != *plan))
        .map(|(key, _)| key.as_str())
        .collect();
    let subscription = |config: &MeteringConfig| {
        config
            .subscriptions
            .iter()
            .map(|s| {
                let end = s.end.map(|end| format!(" to {end}")).unwrap_or_default();
                format!(
                    "{} ({} on {}/{} from {}{end})",
                    s.id, s.account, s.product, s.rate_plan, s.start
                )
            })
            .collect::<Vec<_>>()
    };
    compare("subscriptions", subscription(before), subscription(after));
    let exchange_rates = |config: &MeteringConfig| {
        config
            .exchange_rates
            .iter()
            .map(|rate| {
                format!(
                    "{} → {} {} from {}",
                    rate.from, rate.to, rate.rate, rate.effective_from
                )
            })
            .collect::<Vec<_>>()
    };
    compare(
        "exchange rates",
        exchange_rates(before),
        exchange_rates(after),
    );
    if !changed.is_empty() {
        lines.push(format!("rate plans changed: {}", changed.join(", ")));
    }
    if lines.is_empty() {
        lines.push("descriptive fields changed (names, contacts, descriptions)".into());
    }
    lines
}
