//! Billing periods of a subscription, and the share of a period it covers.
//!
//! Periods follow the workspace's time zone (`workspace.time_zone`, IANA, default UTC). A
//! `calendar` plan's periods start at local midnight on the first day of a month (quarters:
//! January, April, July, October; years: January). An `anniversary` plan's periods start at the
//! subscription's start, as a local date and time, and every 1, 3 or 12 months after it, on the
//! same day of the month — or the month's last day when it is shorter (a subscription started on
//! 31 January renews on 28 or 29 February, then on 31 March). A local time that does not exist
//! (a daylight-saving gap) is taken as the instant after the gap; one that exists twice, as the
//! first (jiff's "compatible" rule).

use agentmeter_schemas::catalog::{BillingAnchor, BillingCycle, RatePlan, Subscription};
use jiff::civil::{Date, DateTime};
pub use jiff::tz::TimeZone;
use jiff::Timestamp;
use rust_decimal::Decimal;
use time::OffsetDateTime;

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

/// Why a period cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("time zone {0:?} is not an IANA time zone")]
    UnknownTimeZone(String),
    #[error("instant {0} is out of the supported range of dates")]
    OutOfRange(OffsetDateTime),
    #[error("{0:?} is not a date: write YYYY-MM (the month's first day) or YYYY-MM-DD")]
    InvalidDate(String),
}

/// The IANA time zone `name`.
pub fn time_zone(name: &str) -> Result<TimeZone, PeriodError> {
    TimeZone::get(name).map_err(|_| PeriodError::UnknownTimeZone(name.to_string()))
}

/// The first instant of the day `date` (`YYYY-MM-DD`, or `YYYY-MM` for its first day) in `zone`:
/// what `--period` names (the period containing that instant).
pub fn start_of_day(date: &str, zone: &TimeZone) -> Result<OffsetDateTime, PeriodError> {
    let invalid = || PeriodError::InvalidDate(date.to_string());
    let mut parts = date.trim().split('-');
    let mut number = |digits: usize| -> Result<i64, PeriodError> {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != digits || !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(invalid());
        }
        part.parse().map_err(|_| invalid())
    };
    let year = number(4)?;
    let month = number(2)?;
    let day = match parts.next() {
        None => 1,
        Some(part) if part.len() == 2 && part.bytes().all(|byte| byte.is_ascii_digit()) => {
            part.parse().map_err(|_| invalid())?
        }
        Some(_) => return Err(invalid()),
    };
    if parts.next().is_some() {
        return Err(invalid());
    }
    let civil = Date::new(
        i16::try_from(year).map_err(|_| invalid())?,
        i8::try_from(month).map_err(|_| invalid())?,
        i8::try_from(day).map_err(|_| invalid())?,
    )
    .map_err(|_| invalid())?;
    let zoned = civil
        .to_datetime(jiff::civil::Time::midnight())
        .to_zoned_datetime(zone.clone())
        .map_err(|_| invalid())?;
    OffsetDateTime::from_unix_timestamp_nanos(zoned.timestamp().as_nanosecond())
        .map_err(|_| invalid())
}

fn months_per_period(cycle: BillingCycle) -> i32 {
    match cycle {
        BillingCycle::Monthly => 1,
        BillingCycle::Quarterly => 3,
        BillingCycle::Annual => 12,
    }
}

/// `(year, month 1..=12)` moved by `months` (any sign).
fn add_months(year: i32, month: i32, months: i32) -> (i32, i32) {
    let index = year * 12 + (month - 1) + months;
    (index.div_euclid(12), index.rem_euclid(12) + 1)
}

fn local(instant: OffsetDateTime, zone: &TimeZone) -> Result<DateTime, PeriodError> {
    let timestamp = Timestamp::from_nanosecond(instant.unix_timestamp_nanos())
        .map_err(|_| PeriodError::OutOfRange(instant))?;
    Ok(timestamp.to_zoned_datetime(zone.clone()).datetime())
}

/// The instant of local `(year, month, day)` (clamped to the month's length) at `clock`.
fn instant_at(
    zone: &TimeZone,
    (year, month): (i32, i32),
    day: i8,
    clock: jiff::civil::Time,
    or: OffsetDateTime,
) -> Result<OffsetDateTime, PeriodError> {
    let out_of_range = || PeriodError::OutOfRange(or);
    let year = i16::try_from(year).map_err(|_| out_of_range())?;
    let month = i8::try_from(month).map_err(|_| out_of_range())?;
    let first = Date::new(year, month, 1).map_err(|_| out_of_range())?;
    let day = day.min(first.days_in_month());
    let civil = Date::new(year, month, day)
        .map_err(|_| out_of_range())?
        .to_datetime(clock);
    let zoned = civil
        .to_zoned_datetime(zone.clone())
        .map_err(|_| out_of_range())?;
    OffsetDateTime::from_unix_timestamp_nanos(zoned.timestamp().as_nanosecond())
        .map_err(|_| out_of_range())
}

/// The period of `plan` that contains `instant`, for a subscription that started at
/// `subscription_start`, in `zone`.
pub fn period_containing(
    plan: &RatePlan,
    subscription_start: OffsetDateTime,
    instant: OffsetDateTime,
    zone: &TimeZone,
) -> Result<Period, PeriodError> {
    let months = months_per_period(plan.billing_cycle);
    let here = local(instant, zone)?;
    match plan.anchor {
        BillingAnchor::Calendar => {
            // The period's first month (1-based), e.g. October for a quarter holding November.
            let month_index = i32::from(here.month()) - 1;
            let first_month = (
                i32::from(here.year()),
                month_index - month_index.rem_euclid(months) + 1,
            );
            let next = add_months(first_month.0, first_month.1, months);
            let midnight = jiff::civil::Time::midnight();
            Ok(Period {
                start: instant_at(zone, first_month, 1, midnight, instant)?,
                end: instant_at(zone, next, 1, midnight, instant)?,
            })
        }
        BillingAnchor::Anniversary => {
            let anchor = local(subscription_start, zone)?;
            let start_of = |k: i32| {
                let month = add_months(
                    i32::from(anchor.year()),
                    i32::from(anchor.month()),
                    k * months,
                );
                instant_at(zone, month, anchor.day(), anchor.time(), instant)
            };
            // The number of whole periods from the anchor, estimated by months, then adjusted.
            let elapsed_months = (i32::from(here.year()) - i32::from(anchor.year())) * 12
                + (i32::from(here.month()) - i32::from(anchor.month()));
            let mut k = elapsed_months.div_euclid(months);
            while start_of(k)? > instant {
                k -= 1;
            }
            while start_of(k + 1)? <= instant {
                k += 1;
            }
            Ok(Period {
                start: start_of(k)?,
                end: start_of(k + 1)?,
            })
        }
    }
}

/// What `subscription` (on `plan`) bills of the period containing `instant`, in `zone`; `None`
/// when it does not cover any of it.
pub fn coverage(
    plan: &RatePlan,
    subscription: &Subscription,
    instant: OffsetDateTime,
    zone: &TimeZone,
) -> Result<Option<Coverage>, PeriodError> {
    let period = period_containing(plan, subscription.start, instant, zone)?;
    let from = period.start.max(subscription.start);
    let to = match subscription.end {
        Some(end) => period.end.min(end),
        None => period.end,
    };
    if from >= to {
        return Ok(None);
    }
    let covered = (to - from).whole_seconds();
    let length = (period.end - period.start).whole_seconds();
    let share = if covered == length {
        Decimal::ONE
    } else {
        Decimal::from(covered) / Decimal::from(length)
    };
    let first_period = period_containing(plan, subscription.start, subscription.start, zone)?;
    Ok(Some(Coverage {
        period,
        from,
        to,
        share,
        first: first_period == period,
    }))
}

#[cfg(test)]
mod tests {
    use agentmeter_schemas::catalog::{Charge, ChargeModel};
    use time::macros::datetime;

    use jiff::tz::TimeZone;

    use super::*;

    #[test]
    fn a_period_is_named_by_a_month_or_a_day_in_the_workspace_zone() {
        use time::macros::datetime;
        let paris = time_zone("Europe/Paris").unwrap();
        assert_eq!(
            start_of_day("2026-11", &paris).unwrap(),
            datetime!(2026-10-31 23:00 UTC)
        );
        assert_eq!(
            start_of_day("2026-07-15", &TimeZone::UTC).unwrap(),
            datetime!(2026-07-15 0:00 UTC)
        );
        for bad in [
            "2026",
            "2026-13",
            "2026-02-30",
            "26-11",
            "2026-11-01-02",
            "2026-1",
            "x",
        ] {
            assert!(start_of_day(bad, &TimeZone::UTC).is_err(), "{bad}");
        }
    }

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
            &TimeZone::UTC,
        )
        .unwrap();
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
            &TimeZone::UTC,
        )
        .unwrap();
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
            &TimeZone::UTC,
        )
        .unwrap();
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
        let february = period_containing(
            &monthly,
            started,
            datetime!(2026-02-15 0:00 UTC),
            &TimeZone::UTC,
        )
        .unwrap();
        assert_eq!(
            (february.start, february.end),
            (
                datetime!(2026-01-31 9:00 UTC),
                datetime!(2026-02-28 9:00 UTC)
            )
        );
        let march = period_containing(
            &monthly,
            started,
            datetime!(2026-03-01 0:00 UTC),
            &TimeZone::UTC,
        )
        .unwrap();
        assert_eq!(
            (march.start, march.end),
            (
                datetime!(2026-02-28 9:00 UTC),
                datetime!(2026-03-31 9:00 UTC)
            )
        );
        // The boundary instant belongs to the period it starts.
        let boundary = period_containing(
            &monthly,
            started,
            datetime!(2026-03-31 9:00 UTC),
            &TimeZone::UTC,
        )
        .unwrap();
        assert_eq!(boundary.start, datetime!(2026-03-31 9:00 UTC));
        let quarterly = plan(BillingCycle::Quarterly, BillingAnchor::Anniversary);
        let period = period_containing(
            &quarterly,
            datetime!(2025-11-30 0:00 UTC),
            datetime!(2026-03-01 0:00 UTC),
            &TimeZone::UTC,
        )
        .unwrap();
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
        let basic_april = coverage(
            &monthly,
            &basic,
            datetime!(2026-04-01 0:00 UTC),
            &TimeZone::UTC,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (basic_april.from, basic_april.to),
            (datetime!(2026-04-01 0:00 UTC), change)
        );
        assert_eq!(basic_april.share, Decimal::new(5, 1));
        assert!(!basic_april.first);
        let pro_april = coverage(&monthly, &pro, april, &TimeZone::UTC)
            .unwrap()
            .unwrap();
        assert_eq!(pro_april.share, Decimal::new(5, 1));
        assert!(pro_april.first);
        assert_eq!(
            coverage(
                &monthly,
                &basic,
                datetime!(2026-05-02 0:00 UTC),
                &TimeZone::UTC
            )
            .unwrap(),
            None
        );
        assert_eq!(
            coverage(
                &monthly,
                &pro,
                datetime!(2026-05-02 0:00 UTC),
                &TimeZone::UTC
            )
            .unwrap()
            .unwrap()
            .share,
            Decimal::ONE
        );
    }

    #[test]
    fn periods_follow_the_workspace_time_zone_through_daylight_saving() {
        let berlin = time_zone("Europe/Berlin").unwrap();
        let monthly = plan(BillingCycle::Monthly, BillingAnchor::Calendar);
        let started = datetime!(2025-01-01 0:00 UTC);
        // Berlin is UTC+1 in winter, UTC+2 in summer (from 29 March 2026, 02:00).
        let march =
            period_containing(&monthly, started, datetime!(2026-03-15 12:00 UTC), &berlin).unwrap();
        assert_eq!(
            (march.start, march.end),
            (
                datetime!(2026-02-28 23:00 UTC),
                datetime!(2026-03-31 22:00 UTC)
            )
        );
        // 23:30 UTC on 31 March is already April in Berlin.
        let april =
            period_containing(&monthly, started, datetime!(2026-03-31 22:30 UTC), &berlin).unwrap();
        assert_eq!(april.start, datetime!(2026-03-31 22:00 UTC));
        assert!(time_zone("Mars/Olympus_Mons").is_err());
    }
}
