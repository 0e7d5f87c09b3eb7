//! The billing catalog as `config apply` sees it: the shipped example, and every problem of a
//! bad catalog listed (issue 10).

use agentmeter_schemas::catalog::{rate_plans, ChargeModel, Metric, MAX_PRICE, MAX_UNITS};
use agentmeter_schemas::metering::{ConfigFileError, MeteringConfig};
use rust_decimal::Decimal;

const EXAMPLE: &str = include_str!("../../deploy/local/metering.example.toml");

#[test]
fn the_shipped_example_has_a_valid_catalog() {
    let config = MeteringConfig::from_toml(EXAMPLE).unwrap();
    let plans: Vec<(&str, &str, usize)> = rate_plans(&config.products)
        .map(|(product, plan)| (product.id.as_str(), plan.id.as_str(), plan.charges.len()))
        .collect();
    assert_eq!(
        plans,
        vec![("research", "pro", 2), ("support", "outcomes", 2)]
    );
    let pro = &config.products[0].rate_plans[0];
    assert_eq!(pro.minimum_commitment, Some(Decimal::from(150)));
    assert_eq!(
        pro.charges[0].model,
        ChargeModel::Overage {
            fee: Decimal::from(99),
            included: Decimal::from(10_000),
            unit_price: "0.01".parse().unwrap(),
        }
    );
    assert_eq!(pro.charges[1].metric(), Ok(Metric::Seats));
    assert_eq!(config.subscriptions.len(), 2);
}

#[test]
fn a_price_written_as_a_float_is_refused() {
    let text = EXAMPLE.replace("unit_price = \"5\"", "unit_price = 5.0");
    let error = MeteringConfig::from_toml(&text).unwrap_err().to_string();
    assert!(error.contains("quoted decimal strings"), "{error}");
}

fn problems_of(catalog: &str) -> Vec<String> {
    let base = &EXAMPLE[..EXAMPLE.find("[[products]]").unwrap()];
    let text = format!("{base}\n{catalog}");
    match MeteringConfig::from_toml(&text) {
        Ok(_) => Vec::new(),
        Err(ConfigFileError::Invalid(problems)) => problems.0,
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn every_problem_of_a_catalog_is_listed_with_how_to_fix_it() {
    let problems = problems_of(
        r#"
[[products]]
id = "research"
name = "Research"
agent_type = "no_such_type"

[[products.rate_plans]]
id = "bad"
name = "Bad"
currency = "DOLLARS"
billing_cycle = "monthly"
minimum_commitment = "-5"

[[products.rate_plans.charges]]
id = "tiers"
name = "Unordered tiers"
metric = "@outcome"
outcomes = ["not_an_outcome"]
model = { tiered = { tiers = [
  { up_to = "500", unit_price = "40" },
  { up_to = "100", unit_price = "-50" },
  { up_to = "900", unit_price = "30" },
] } }

[[products.rate_plans.charges]]
id = "fee"
name = "A fee with a metric"
metric = "@action"
model = { flat = { fee = "99" } }

[[products.rate_plans.charges]]
id = "unknown"
name = "Unknown metric"
metric = "@tokens"
model = { per_unit = { unit_price = "1" } }
discount = { percent = "150" }

[[products.rate_plans.charges]]
id = "tokens"
name = "Tokens of an action without that measure"
metric = "measure"
action = "web_search"
measure = "token"
model = { package = { package_size = "0", package_price = "5" } }

[[subscriptions]]
id = "one"
account = "acc_acme"
product = "research"
rate_plan = "bad"
start = "2026-01-01T00:00:00Z"

[[subscriptions]]
id = "two"
account = "acc_acme"
product = "research"
rate_plan = "bad"
start = "2026-03-01T00:00:00Z"

[[subscriptions]]
id = "three"
account = "acc_nobody"
product = "research"
rate_plan = "missing"
start = "2026-03-01T00:00:00Z"
end = "2026-02-01T00:00:00Z"
"#,
    );
    let expected = [
        "agent_type \"no_such_type\" is not an agent type",
        "currency \"DOLLARS\" is not an ISO 4217 code",
        "minimum_commitment -5 must be between 0 and",
        "outcome \"not_an_outcome\" is not defined",
        "tier 2 unit_price -50 is negative",
        "tier 2 up_to 100 must be above the previous bound 500",
        "the last tier (up to 900) must have no up_to",
        "a flat fee bills no metric",
        "unknown metric \"@tokens\"",
        "discount percent 150 must be between 0 and 100",
        "no cost allocation measures \"web_search\" in \"token\"",
        "package_size 0 must be above 0",
        "subscriptions \"one\" and \"two\" of account \"acc_acme\" to product \"research\" overlap in time",
        "account \"acc_nobody\" is not an account",
        "product \"research\" has no rate plan \"missing\"",
        "subscription \"three\": end must be after start",
    ];
    for fragment in expected {
        assert!(
            problems.iter().any(|problem| problem.contains(fragment)),
            "no problem says {fragment:?}:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expected.len(), "{}", problems.join("\n"));
}

#[test]
fn a_plan_change_is_two_subscriptions_that_meet() {
    let problems = problems_of(
        r#"
[[products]]
id = "research"
name = "Research"
agent_type = "type_research"

[[products.rate_plans]]
id = "basic"
name = "Basic"
currency = "EUR"
billing_cycle = "quarterly"
anchor = "anniversary"
charges = [{ id = "fee", name = "Fee", model = { flat = { fee = "100" } } }]

[[subscriptions]]
id = "first"
account = "acc_acme"
product = "research"
rate_plan = "basic"
start = "2026-01-01T00:00:00Z"
end = "2026-01-16T00:00:00Z"

[[subscriptions]]
id = "second"
account = "acc_acme"
product = "research"
rate_plan = "basic"
start = "2026-01-16T00:00:00Z"
"#,
    );
    assert_eq!(problems, Vec::<String>::new());
}

#[test]
fn the_bounds_are_what_they_say() {
    assert_eq!(MAX_PRICE, Decimal::from(1_000_000_000u64));
    assert_eq!(MAX_UNITS, Decimal::from(1_000_000_000_000_000_000u64));
}

#[test]
fn the_workspace_time_zone_is_an_iana_name_and_defaults_to_utc() {
    let config = MeteringConfig::from_toml(EXAMPLE).unwrap();
    assert_eq!(config.workspace.time_zone, "UTC");
    let berlin = EXAMPLE.replacen(
        "currency = \"USD\"\n",
        "currency = \"USD\"\ntime_zone = \"Europe/Berlin\"\n",
        1,
    );
    let config = MeteringConfig::from_toml(&berlin).unwrap();
    assert_eq!(config.workspace.time_zone, "Europe/Berlin");
    let nowhere = EXAMPLE.replacen(
        "currency = \"USD\"\n",
        "currency = \"USD\"\ntime_zone = \"Mars/Olympus_Mons\"\n",
        1,
    );
    let error = MeteringConfig::from_toml(&nowhere).unwrap_err().to_string();
    assert!(error.contains("is not an IANA time zone"), "{error}");
}

#[test]
fn exchange_rates_are_effective_dated_into_the_cost_currency() {
    let problems = problems_of(
        r#"
[[exchange_rates]]
from = "EUR"
to = "USD"
rate = "1.0842"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "EUR"
to = "USD"
rate = "1.1"
effective_from = "2026-07-01T00:00:00Z"

[[exchange_rates]]
from = "JPY"
to = "USD"
rate = "0.0067"
effective_from = "2026-01-01T00:00:00Z"
"#,
    );
    assert_eq!(problems, Vec::<String>::new());
    let text = format!(
        "{EXAMPLE}\n[[exchange_rates]]\nfrom = \"EUR\"\nto = \"USD\"\nrate = \"1.0842\"\neffective_from = \"2026-01-01T00:00:00Z\"\n"
    );
    let config = MeteringConfig::from_toml(&text).unwrap();
    assert_eq!(config.exchange_rates.len(), 1);
    assert_eq!(config.exchange_rates[0].rate, "1.0842".parse().unwrap());
    // Without exchange rates, a configuration serializes as it did before they existed.
    let plain = MeteringConfig::from_toml(EXAMPLE).unwrap();
    assert!(!serde_json::to_string(&plain)
        .unwrap()
        .contains("exchange_rates"));
}

#[test]
fn every_problem_of_the_exchange_rates_is_listed_with_how_to_fix_it() {
    let problems = problems_of(
        r#"
[[exchange_rates]]
from = "EURO"
to = "USD"
rate = "1.1"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "EUR"
to = "GBP"
rate = "0.86"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "USD"
to = "USD"
rate = "1"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "EUR"
to = "USD"
rate = "0"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "CHF"
to = "USD"
rate = "-1.1"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "JPY"
to = "USD"
rate = "1000000001"
effective_from = "2026-01-01T00:00:00Z"

[[exchange_rates]]
from = "EUR"
to = "USD"
rate = "1.2"
effective_from = "2026-01-01T00:00:00Z"
"#,
    );
    let expected = [
        "from \"EURO\" is not an ISO 4217 code",
        "to must be the workspace's cost currency \"USD\"",
        "from and to are the same currency",
        "rate 0 must be above 0",
        "rate -1.1 must be above 0",
        "rate 1000000001 is above the largest accepted",
        "is defined twice; keep one",
    ];
    for fragment in expected {
        assert!(
            problems.iter().any(|problem| problem.contains(fragment)),
            "no problem says {fragment:?}:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expected.len(), "{}", problems.join("\n"));

    let float = problems_text(
        "[[exchange_rates]]\nfrom = \"EUR\"\nto = \"USD\"\nrate = 1.1\neffective_from = \"2026-01-01T00:00:00Z\"\n",
    );
    assert!(float.contains("quoted decimal strings"), "{float}");
    let words = problems_text(
        "[[exchange_rates]]\nfrom = \"EUR\"\nto = \"USD\"\nrate = \"a lot\"\neffective_from = \"2026-01-01T00:00:00Z\"\n",
    );
    assert!(words.contains("is not a decimal"), "{words}");
}

/// The whole error of the example with `extra` appended.
fn problems_text(extra: &str) -> String {
    MeteringConfig::from_toml(&format!("{EXAMPLE}\n{extra}"))
        .unwrap_err()
        .to_string()
}
