//! Billing periods of a subscription, and the share of a period it covers.
//!
//! Periods are UTC (docs/billing.md). A `calendar` plan's periods start at 00:00 on the first day
//! of a month (quarters: January, April, July, October; years: January). An `anniversary` plan's
//! periods start at the subscription's start instant and every 1, 3 or 12 months after it, on the
//! same day of the month — or the month's last day when it is shorter (a subscription started on
//! 31 January renews on 28 or 29 February, then on 31 March).

use agentmeter_schemas::catalog::{BillingAnchor, BillingCycle, RatePlan, Subscription};
use rust_decimal::Decimal;
use time::{Date, Month, OffsetDateTime, Time};

/// A billing period: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// What a subscription bills of one period: `[from, to)` and its share of the period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub period: Period,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    /// `(to − from) / (end − start)`, from whole seconds; 1 for a whole period.
    pub share: Decimal,
    /// Whether this is the subscription's first period (its one-time fees are billed here).
    pub first: bool,
}

fn months_per_period(cycle: BillingCycle) -> i32 {
    match cycle {
        BillingCycle::Monthly => 1,
        BillingCycle::Quarterly => 3,
        BillingCycle::Annual => 12,
    }
}

/// `(year, month)` moved by `months` (any sign).
fn add_months(year: i32, month: Month, months: i32) -> (i32, Month) {
    let index = year * 12 + (month as i32 - 1) + months;
    let month = Month::try_from((index.rem_euclid(12) + 1) as u8).expect("1..=12");
    (index.div_euclid(12), month)
}

fn at(year: i32, month: Month, day: u8, time: Time) -> OffsetDateTime {
    let day = day.min(time::util::days_in_month(month, year));
    Date::from_calendar_date(year, month, day)
        .expect("a valid day")
        .with_time(time)
        .assume_utc()
}

/// The period of `plan` that contains `instant`, for a subscription that started at
/// `subscription_start`.
pub fn period_containing(
    plan: &RatePlan,
    subscription_start: OffsetDateTime,
    instant: OffsetDateTime,
) -> Period {
    let months = months_per_period(plan.billing_cycle);
    let instant = instant.to_offset(time::UtcOffset::UTC);
    match plan.anchor {
        BillingAnchor::Calendar => {
            let month_index = instant.month() as i32 - 1;
            let first_month = month_index - month_index.rem_euclid(months);
            let (year, month) = add_months(instant.year(), Month::January, first_month);
            let (next_year, next_month) = add_months(year, month, months);
            Period {
                start: at(year, month, 1, Time::MIDNIGHT),
                end: at(next_year, next_month, 1, Time::MIDNIGHT),
            }
        }
        BillingAnchor::Anniversary => {
            let anchor = subscription_start.to_offset(time::UtcOffset::UTC);
            let start_of = |k: i32| {
                let (year, month) = add_months(anchor.year(), anchor.month(), k * months);
                at(year, month, anchor.day(), anchor.time())
            };
            // The number of whole periods from the anchor, estimated by months, then adjusted.
            let elapsed_months = (instant.year() - anchor.year()) * 12
                + (instant.month() as i32 - anchor.month() as i32);
            let mut k = elapsed_months.div_euclid(months);
            while start_of(k) > instant {
                k -= 1;
            }
            while start_of(k + 1) <= instant {
                k += 1;
            }
            Period {
                start: start_of(k),
                end: start_of(k + 1),
            }
        }
    }
}

/// What `subscription` (on `plan`) bills of the period containing `instant`; `None` when it
/// does not cover any of it.
pub fn coverage(
    plan: &RatePlan,
    subscription: &Subscription,
    instant: OffsetDateTime,
) -> Option<Coverage> {
    let period = period_containing(plan, subscription.start, instant);
    let from = period.start.max(subscription.start);
    let to = match subscription.end {
        Some(end) => period.end.min(end),
        None => period.end,
    };
    if from >= to {
        return None;
    }
    let covered = (to - from).whole_seconds();
    let length = (period.end - period.start).whole_seconds();
    let share = if covered == length {
        Decimal::ONE
    } else {
        Decimal::from(covered) / Decimal::from(length)
    };
    let first_period = period_containing(plan, subscription.start, subscription.start);
    Some(Coverage {
        period,
        from,
        to,
        share,
        first: first_period == period,
    })
}

#[cfg(test)]
mod tests {
    use agentmeter_schemas::catalog::{Charge, ChargeModel};
    use time::macros::datetime;

    use super::*;

    fn plan(cycle: BillingCycle, anchor: BillingAnchor) -> RatePlan {
        RatePlan {
            id: "p".into(),
            name: "P".into(),
            currency: "USD".into(),
            billing_cycle: cycle,
            anchor,
            charges: vec![Charge {
                id: "fee".into(),
                name: "Fee".into(),
                metric: None,
                actions: Vec::new(),
                outcomes: Vec::new(),
                action: None,
                measure: None,
                model: ChargeModel::Flat {
                    fee: Decimal::from(100),
                },
                discount: None,
            }],
            discounts: Vec::new(),
            minimum_commitment: None,
        }
    }

    fn subscription(start: OffsetDateTime, end: Option<OffsetDateTime>) -> Subscription {
        Subscription {
            id: "s".into(),
            account: "a".into(),
            product: "x".into(),
            rate_plan: "p".into(),
            start,
            end,
        }
    }

    #[test]
    fn calendar_periods_start_on_month_quarter_and_year_boundaries() {
        let started = datetime!(2025-06-10 12:00 UTC);
        let instant = datetime!(2026-11-15 08:30 UTC);
        let monthly = period_containing(
            &plan(BillingCycle::Monthly, BillingAnchor::Calendar),
            started,
            instant,
        );
        assert_eq!(
            (monthly.start, monthly.end),
            (
                datetime!(2026-11-01 0:00 UTC),
                datetime!(2026-12-01 0:00 UTC)
            )
        );
        let quarterly = period_containing(
            &plan(BillingCycle::Quarterly, BillingAnchor::Calendar),
            started,
            instant,
        );
        assert_eq!(
            (quarterly.start, quarterly.end),
            (
                datetime!(2026-10-01 0:00 UTC),
                datetime!(2027-01-01 0:00 UTC)
            )
        );
        let annual = period_containing(
            &plan(BillingCycle::Annual, BillingAnchor::Calendar),
            started,
            instant,
        );
        assert_eq!(
            (annual.start, annual.end),
            (
                datetime!(2026-01-01 0:00 UTC),
                datetime!(2027-01-01 0:00 UTC)
            )
        );
    }

    #[test]
    fn anniversary_periods_keep_the_day_or_take_the_last_day_of_a_shorter_month() {
        let monthly = plan(BillingCycle::Monthly, BillingAnchor::Anniversary);
        let started = datetime!(2026-01-31 09:00 UTC);
        let february = period_containing(&monthly, started, datetime!(2026-02-15 0:00 UTC));
        assert_eq!(
            (february.start, february.end),
            (
                datetime!(2026-01-31 9:00 UTC),
                datetime!(2026-02-28 9:00 UTC)
            )
        );
        let march = period_containing(&monthly, started, datetime!(2026-03-01 0:00 UTC));
        assert_eq!(
            (march.start, march.end),
            (
                datetime!(2026-02-28 9:00 UTC),
                datetime!(2026-03-31 9:00 UTC)
            )
        );
        // The boundary instant belongs to the period it starts.
        let boundary = period_containing(&monthly, started, datetime!(2026-03-31 9:00 UTC));
        assert_eq!(boundary.start, datetime!(2026-03-31 9:00 UTC));
        let quarterly = plan(BillingCycle::Quarterly, BillingAnchor::Anniversary);
        let period = period_containing(
            &quarterly,
            datetime!(2025-11-30 0:00 UTC),
            datetime!(2026-03-01 0:00 UTC),
        );
        assert_eq!(
            (period.start, period.end),
            (
                datetime!(2026-02-28 0:00 UTC),
                datetime!(2026-05-30 0:00 UTC)
            )
        );
    }

    #[test]
    fn a_subscription_changed_halfway_covers_half_of_the_period() {
        let monthly = plan(BillingCycle::Monthly, BillingAnchor::Calendar);
        let change = datetime!(2026-04-16 0:00 UTC);
        let basic = subscription(datetime!(2026-01-01 0:00 UTC), Some(change));
        let pro = subscription(change, None);
        let april = datetime!(2026-04-20 0:00 UTC);
        let basic_april = coverage(&monthly, &basic, datetime!(2026-04-01 0:00 UTC)).unwrap();
        assert_eq!(
            (basic_april.from, basic_april.to),
            (datetime!(2026-04-01 0:00 UTC), change)
        );
        assert_eq!(basic_april.share, Decimal::new(5, 1));
        assert!(!basic_april.first);
        let pro_april = coverage(&monthly, &pro, april).unwrap();
        assert_eq!(pro_april.share, Decimal::new(5, 1));
        assert!(pro_april.first);
        assert_eq!(
            coverage(&monthly, &basic, datetime!(2026-05-02 0:00 UTC)),
            None
        );
        assert_eq!(
            coverage(&monthly, &pro, datetime!(2026-05-02 0:00 UTC))
                .unwrap()
                .share,
            Decimal::ONE
        );
    }
}
