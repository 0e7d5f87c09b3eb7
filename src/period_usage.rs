//! The billable usage of one workspace over the time ranges that its subscriptions bill, read
//! from ClickHouse in **one** query however many accounts, subscriptions and ranges there are;
//! each subscription's quantities are then summed from its rows in memory.
//!
//! The query groups `usage FINAL` by account, agent instance, user, action, measure and
//! **segment**: the ranges' bounds cut time into consecutive segments, and a subscription's
//! range is a run of them (a calendar month is one; a subscription starting on the 16th adds a
//! bound). Sums add up over segments and instances; distinct users are the union of the rows'
//! users; seats come from each user's active days (kept per row, also for the 30 days before
//! the first range). Rows of no charge's interest are not asked for: without a `@user` or
//! `@seat` charge the query does not group by user.
//!
//! Why one query: on ClickHouse 18.16 reading `usage FINAL` merges the versions of every row it
//! touches on one core — about 6 s for a month of 10 million actions, most of the cost of an
//! invoice run. One scan pays that once; it is split into the month's two halves by day of
//! month (a sorting-key column, so every version of a key lands in the same half and FINAL stays
//! exact: docs/sql.md), which run on two cores. The filters are written inside the `FINAL` scan
//! on its leading key columns (workspace, account, `window_start`), never on a view, which 18.16
//! would read whole (docs/sql.md, "Large data"); `WHERE` on the other columns applies after the
//! versions collapse, so it is exact. bench/README.md, "Invoices", has the figures.

use std::collections::{HashMap, HashSet};

use agentmeter_schemas::catalog::{Metric, RatePlan, Subscription};
use agentmeter_schemas::metering::MeteringConfig;
use anyhow::Context;
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::Settings;

/// Which of the costlier groupings a set of plans needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Needed {
    pub(crate) users: bool,
    pub(crate) seats: bool,
}

impl Needed {
    /// What the charges of `plan` count, added to `self`.
    pub(crate) fn with_plan(self, plan: &RatePlan) -> anyhow::Result<Needed> {
        let mut needed = self;
        for charge in &plan.charges {
            match charge
                .metric()
                .map_err(|problem| anyhow::anyhow!("charge {:?}: {problem}", charge.id))?
            {
                Metric::Users => needed.users = true,
                Metric::Seats => needed.seats = true,
                _ => {}
            }
        }
        Ok(needed)
    }
}

/// One row of the query: the usage of one account's agent instance, user, action and measure
/// in one segment.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
struct UsageRow {
    account_id: String,
    agent_instance_id: String,
    /// `''` when no charge counts users or seats (the query does not group by user then).
    user_key: String,
    action_name: String,
    measure: String,
    /// 0: the 30 days before the first bound (seats only); s ≥ 1: `[bounds[s−1], bounds[s])`.
    segment: u8,
    actions: String,
    quantity: String,
    cost: String,
    outcomes: String,
    /// The UTC days (since 1970-01-01) with usage; empty unless seats are needed.
    days: Vec<u16>,
}

/// [`UsageRow`] with its decimals read.
#[derive(Debug, Clone, PartialEq)]
struct Usage {
    agent_instance_id: String,
    user_key: String,
    action_name: String,
    measure: String,
    segment: u8,
    actions: Decimal,
    quantity: Decimal,
    cost: Decimal,
    outcomes: Decimal,
    days: Vec<u16>,
}

/// The usage of a workspace (or of one of its accounts) over some ranges.
#[derive(Debug, Default)]
pub(crate) struct PeriodUsage {
    /// The ranges' bounds, ascending.
    bounds: Vec<OffsetDateTime>,
    rows_by_account: HashMap<String, Vec<Usage>>,
}

/// At most this many bounds (so segments fit a `u8` and the query stays short).
const MAX_BOUNDS: usize = 200;

impl PeriodUsage {
    /// Reads the usage of `config`'s workspace — of `account` only, when given — in each of
    /// `ranges` (`[from, to)` by the start of the usage window).
    pub(crate) async fn read(
        settings: &Settings,
        config: &MeteringConfig,
        account: Option<&str>,
        ranges: &[(OffsetDateTime, OffsetDateTime)],
        needed: Needed,
    ) -> anyhow::Result<PeriodUsage> {
        let mut bounds: Vec<OffsetDateTime> =
            ranges.iter().flat_map(|&(from, to)| [from, to]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let (Some(&first), Some(&last)) = (bounds.first(), bounds.last()) else {
            return Ok(PeriodUsage::default());
        };
        anyhow::ensure!(
            bounds.len() <= MAX_BOUNDS,
            "{} distinct period bounds at once; at most {MAX_BOUNDS}",
            bounds.len()
        );
        let database = &settings.clickhouse.database;
        let by_user = needed.users || needed.seats;
        // Seats of a range's first day count the users of the 29 days before it.
        let scan_from = if needed.seats {
            first - time::Duration::days(30)
        } else {
            first
        };
        // 0 before the first bound, s in [bounds[s−1], bounds[s]).
        let segment = format!(
            "multiIf({}, {})",
            bounds
                .iter()
                .enumerate()
                .map(|(index, bound)| format!(
                    "window_start < toDateTime('{}', 'UTC'), {index}",
                    clickhouse_time(*bound)
                ))
                .collect::<Vec<_>>()
                .join(", "),
            bounds.len()
        );
        let user = if by_user { "user_key" } else { "''" };
        let days = if needed.seats {
            "groupUniqArray(toUInt16(toDate(window_start)))"
        } else {
            "emptyArrayUInt16()"
        };
        let account_clause = if account.is_some() {
            " AND account_id = ?"
        } else {
            ""
        };
        let half = |prewhere: &str| {
            format!(
                "SELECT account_id, agent_instance_id, {user} AS user_of_row, action_name, measure, \
                 toUInt8({segment}) AS segment_of_row, \
                 sum(action_count) AS actions_in, sum(quantity) AS quantity_in, sum(cost) AS cost_in, \
                 sumIf(outcome_count, outcome = 1) AS outcomes_in, {days} AS days_in \
                 FROM {database}.usage FINAL PREWHERE {prewhere} \
                 WHERE workspace_id = ?{account_clause} \
                 AND window_start >= toDateTime('{}', 'UTC') AND window_start < toDateTime('{}', 'UTC') \
                 AND tracked = 1 \
                 GROUP BY account_id, agent_instance_id, user_of_row, action_name, measure, segment_of_row",
                clickhouse_time(scan_from),
                clickhouse_time(last)
            )
        };
        let sql = format!(
            "SELECT account_id, agent_instance_id, user_of_row AS user_key, action_name, measure, \
             segment_of_row AS segment, toString(sum(actions_in)) AS actions, \
             toString(sum(quantity_in)) AS quantity, toString(sum(cost_in)) AS cost, \
             toString(sum(outcomes_in)) AS outcomes, groupUniqArrayArray(days_in) AS days \
             FROM ({} UNION ALL {}) \
             GROUP BY account_id, agent_instance_id, user_key, action_name, measure, segment",
            half("toDayOfMonth(window_start) <= 15"),
            half("toDayOfMonth(window_start) >= 16")
        );
        let mut query = settings.clickhouse.client().query(&sql);
        for _half in 0..2 {
            query = query.bind(&config.workspace.id);
            if let Some(account) = account {
                query = query.bind(account);
            }
        }
        let rows = query
            .fetch_all::<UsageRow>()
            .await
            .context("cannot read the usage of the periods")?;
        let mut rows_by_account: HashMap<String, Vec<Usage>> = HashMap::new();
        for row in rows {
            rows_by_account
                .entry(row.account_id)
                .or_default()
                .push(Usage {
                    agent_instance_id: row.agent_instance_id,
                    user_key: row.user_key,
                    action_name: row.action_name,
                    measure: row.measure,
                    segment: row.segment,
                    actions: exact_decimal(&row.actions)?,
                    quantity: exact_decimal(&row.quantity)?,
                    cost: exact_decimal(&row.cost)?,
                    outcomes: exact_decimal(&row.outcomes)?,
                    days: row.days,
                });
        }
        Ok(PeriodUsage {
            bounds,
            rows_by_account,
        })
    }

    /// The segments that make up `[from, to)`: from the one after `from`'s bound to `to`'s.
    fn segments(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> anyhow::Result<std::ops::RangeInclusive<u8>> {
        let position = |instant: OffsetDateTime| {
            self.bounds
                .binary_search(&instant)
                .ok()
                .and_then(|index| u8::try_from(index).ok())
                .with_context(|| format!("{instant} is not a bound of the usage read"))
        };
        Ok(position(from)? + 1..=position(to)?)
    }

    /// The usage `subscription` bills in `[from, to)`: that of the account's agent instances
    /// of the product's agent type (seats: of the whole account), in the range's segments.
    pub(crate) fn billed_to<'u>(
        &'u self,
        config: &MeteringConfig,
        subscription: &'u Subscription,
        (from, to): (OffsetDateTime, OffsetDateTime),
    ) -> anyhow::Result<BilledUsage<'u>> {
        let instances = billed_instances(config, subscription);
        let segments = self.segments(from, to)?;
        let account_rows: &[Usage] = self
            .rows_by_account
            .get(&subscription.account)
            .map_or(&[], Vec::as_slice);
        let rows = account_rows
            .iter()
            .filter(|row| {
                segments.contains(&row.segment)
                    && instances.contains(&row.agent_instance_id.as_str())
            })
            .collect();
        Ok(BilledUsage {
            account: &subscription.account,
            rows,
            account_rows,
            last_segment: *segments.end(),
            days: utc_day_number(from)..=utc_day_number(to - time::Duration::seconds(1)),
        })
    }
}

/// The usage one subscription bills in its range ([`PeriodUsage::billed_to`]).
pub(crate) struct BilledUsage<'u> {
    account: &'u str,
    /// The account's rows of the range's segments and of the instances the subscription bills.
    rows: Vec<&'u Usage>,
    /// Every row of the account (seats count all its agents), of any segment.
    account_rows: &'u [Usage],
    /// The range's last segment: seats count activity before the range's end only.
    last_segment: u8,
    /// The range's UTC days (since 1970-01-01).
    days: std::ops::RangeInclusive<i64>,
}

impl BilledUsage<'_> {
    /// The quantity of every usage charge of `plan`.
    pub(crate) fn quantities(&self, plan: &RatePlan) -> anyhow::Result<HashMap<String, Decimal>> {
        let mut quantities = HashMap::new();
        for charge in &plan.charges {
            let metric = charge
                .metric()
                .map_err(|problem| anyhow::anyhow!("charge {:?}: {problem}", charge.id))?;
            let quantity = match &metric {
                Metric::Fee => continue,
                Metric::Actions { only } => self.sum(|row| {
                    (only.is_empty() || only.contains(&row.action_name)).then_some(row.actions)
                })?,
                Metric::Outcomes { only } => self.sum(|row| {
                    (only.is_empty() || only.contains(&row.action_name)).then_some(row.outcomes)
                })?,
                Metric::Measure { action, measure } => self.sum(|row| {
                    (&row.action_name == action && &row.measure == measure).then_some(row.quantity)
                })?,
                Metric::Users => {
                    let users: HashSet<&str> = self
                        .rows
                        .iter()
                        .filter(|row| !row.user_key.is_empty())
                        .map(|row| row.user_key.as_str())
                        .collect();
                    Decimal::from(users.len())
                }
                // Every agent of the account (docs/billing.md), active before the range's end.
                Metric::Seats => {
                    let mut days_of_user: HashMap<&str, Vec<i64>> = HashMap::new();
                    for row in self
                        .account_rows
                        .iter()
                        .filter(|row| row.segment <= self.last_segment && !row.user_key.is_empty())
                    {
                        days_of_user
                            .entry(row.user_key.as_str())
                            .or_default()
                            .extend(row.days.iter().map(|&day| i64::from(day)));
                    }
                    Decimal::from(peak_seats(days_of_user.into_values(), self.days.clone()))
                }
            };
            quantities.insert(charge.id.clone(), quantity);
        }
        Ok(quantities)
    }

    /// The allocated cost of the usage (exact).
    pub(crate) fn cost(&self) -> anyhow::Result<Decimal> {
        self.sum(|row| Some(row.cost))
    }

    /// The sum of `value` over the rows, normalized: the same number prints alike whichever
    /// segments and rows it was summed from (0.5 + 0.25 and 0.750 + 0).
    fn sum(&self, value: impl Fn(&Usage) -> Option<Decimal>) -> anyhow::Result<Decimal> {
        self.rows
            .iter()
            .filter_map(|row| value(row))
            .try_fold(Decimal::ZERO, |total, value| total.checked_add(value))
            .map(|sum| sum.normalize())
            .with_context(|| format!("the usage of account {:?} overflows", self.account))
    }
}

/// Days since 1970-01-01 of `instant`'s UTC date.
fn utc_day_number(instant: OffsetDateTime) -> i64 {
    instant.unix_timestamp().div_euclid(86_400)
}

/// The most seats on any day of `days`, of one account whose users were active on the given
/// UTC days: a user is a seat on day *d* when active on one of the 30 days ending with *d*
/// (docs/billing.md).
fn peak_seats(
    users: impl IntoIterator<Item = Vec<i64>>,
    days: std::ops::RangeInclusive<i64>,
) -> i64 {
    let (first, last) = (*days.start(), *days.end());
    let Ok(length) = usize::try_from(last - first + 1) else {
        return 0;
    };
    // A difference array over the period's days.
    let mut changes = vec![0i64; length + 1];
    for mut active in users {
        active.sort_unstable();
        // The union of [day, day + 29] over the active days, clipped to the period.
        let mut covered_until = i64::MIN; // exclusive end of what this user already counts on
        for day in active {
            let start = day.max(covered_until).max(first);
            let end = (day + 30).min(last + 1);
            if start < end {
                changes[(start - first) as usize] += 1;
                changes[(end - first) as usize] -= 1;
            }
            covered_until = covered_until.max(day + 30);
        }
    }
    let mut seats = 0i64;
    let mut peak = 0i64;
    for change in &changes[..length] {
        seats += change;
        peak = peak.max(seats);
    }
    peak
}

/// The agent instances whose usage a subscription bills: the account's, of the product's
/// agent type.
fn billed_instances<'c>(config: &'c MeteringConfig, subscription: &Subscription) -> Vec<&'c str> {
    let agent_type = config
        .products
        .iter()
        .find(|product| product.id == subscription.product)
        .map(|product| product.agent_type.as_str());
    config
        .agent_instances
        .iter()
        .filter(|instance| {
            instance.account == subscription.account
                && Some(instance.agent_type.as_str()) == agent_type
        })
        .map(|instance| instance.id.as_str())
        .collect()
}

/// A decimal of ClickHouse's text, exactly, or an error: trailing zeros of the scale-12 text
/// are not digits to keep.
pub(crate) fn exact_decimal(text: &str) -> anyhow::Result<Decimal> {
    let trimmed = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    };
    Decimal::from_str_exact(trimmed)
        .with_context(|| format!("ClickHouse answered {text:?}, not an exact decimal"))
}

/// `YYYY-MM-DD hh:mm:ss` in UTC, as ClickHouse's `toDateTime` reads it.
pub(crate) fn clickhouse_time(instant: OffsetDateTime) -> String {
    let utc = instant.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        utc.year(),
        utc.month() as u8,
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn row(instance: &str, user: &str, action: &str, segment: u8, actions: i64) -> Usage {
        Usage {
            agent_instance_id: instance.to_string(),
            user_key: user.to_string(),
            action_name: action.to_string(),
            measure: String::new(),
            segment,
            actions: Decimal::from(actions),
            quantity: Decimal::from(actions * 10),
            cost: Decimal::new(actions, 2),
            outcomes: Decimal::from(actions / 2),
            days: Vec::new(),
        }
    }

    #[test]
    fn a_subscription_sums_only_its_accounts_instances_of_its_agent_type_in_its_segments() {
        let config =
            MeteringConfig::from_toml(include_str!("../deploy/local/metering.example.toml"))
                .unwrap();
        let subscription = &config.subscriptions[0];
        let plan = agentmeter_billing::invoice::plan_of(&config, subscription).unwrap();
        let own = billed_instances(&config, subscription)[0];
        let (november, mid, december) = (
            datetime!(2026-11-01 0:00 UTC),
            datetime!(2026-11-16 0:00 UTC),
            datetime!(2026-12-01 0:00 UTC),
        );
        let mut usage = PeriodUsage {
            bounds: vec![november, mid, december],
            rows_by_account: HashMap::new(),
        };
        usage.rows_by_account.insert(
            subscription.account.clone(),
            vec![
                row(own, "u1", "web_search", 1, 4),
                row(own, "u2", "llm_call", 2, 6),
                // Before the range (read for seats only), another instance of the account.
                row(own, "u3", "web_search", 0, 500),
                row("not_an_instance_of_it", "u4", "web_search", 1, 1000),
            ],
        );
        usage.rows_by_account.insert(
            "another_account".to_string(),
            vec![row(own, "u5", "web_search", 1, 7000)],
        );
        assert_eq!(
            usage
                .billed_to(&config, subscription, (november, december))
                .unwrap()
                .cost()
                .unwrap(),
            Decimal::new(10, 2)
        );
        assert_eq!(
            usage
                .billed_to(&config, subscription, (mid, december))
                .unwrap()
                .cost()
                .unwrap(),
            Decimal::new(6, 2)
        );
        let quantities = usage
            .billed_to(&config, subscription, (november, december))
            .unwrap()
            .quantities(plan)
            .unwrap();
        for charge in &plan.charges {
            let expected = match charge.metric().unwrap() {
                Metric::Fee => continue,
                Metric::Actions { only } if only.is_empty() => Decimal::from(10),
                Metric::Outcomes { only } if only.is_empty() => Decimal::from(5),
                Metric::Users => Decimal::from(2),
                // No active days in the rows.
                Metric::Seats => Decimal::ZERO,
                _ => continue,
            };
            assert_eq!(quantities[&charge.id], expected, "charge {}", charge.id);
        }
        assert!(
            usage
                .billed_to(
                    &config,
                    subscription,
                    (november, mid + time::Duration::days(1))
                )
                .is_err(),
            "a range that is not made of segments is an error, not a guess"
        );
    }

    /// The seats of a day by their definition: users with an active day among the 30 ending
    /// with it.
    fn seats_by_definition(users: &[&[i64]], day: i64) -> i64 {
        users
            .iter()
            .filter(|days| {
                days.iter()
                    .any(|&active| active <= day && day - active < 30)
            })
            .count() as i64
    }

    #[test]
    fn peak_seats_are_the_most_users_active_in_the_30_days_ending_on_a_day_of_the_period() {
        let users: [&[i64]; 4] = [&[140, 100, 101], &[75], &[130, 131], &[160]];
        for (first, last) in [(100, 129), (90, 120), (131, 160), (161, 170), (50, 60)] {
            let expected = (first..=last)
                .map(|day| seats_by_definition(&users, day))
                .max()
                .unwrap();
            let peak = peak_seats(users.iter().map(|days| days.to_vec()), first..=last);
            assert_eq!(peak, expected, "days {first}..={last}");
        }
    }

    #[test]
    fn clickhouse_text_is_read_exactly_or_refused() {
        assert_eq!(
            exact_decimal("12.340000000000").unwrap(),
            Decimal::new(1234, 2)
        );
        assert_eq!(exact_decimal("100").unwrap(), Decimal::from(100));
        assert!(exact_decimal("1e5").is_err());
    }
}
