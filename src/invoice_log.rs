//! The finalization log's I/O (ADR 0004): reading `<prefix>billing.finalizations` to its end,
//! appending records with an idempotent producer, and projecting the log into the `invoices`
//! table. What the log means is `agentmeter_billing::finalization`.

use std::time::{Duration, Instant};

use agentmeter_aggregator::ClickHouseSettings;
use agentmeter_billing::finalization::{project, FinalizedInvoice, LogRecord};
use agentmeter_runtime::kafka::KafkaSettings;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Every record of the log, in order, with its offset. A record that does not decode is an
/// error: the log is written only by this program, and numbering must not skip a record.
pub fn read_log(kafka: &KafkaSettings, timeout: Duration) -> anyhow::Result<Vec<(i64, LogRecord)>> {
    let topic = kafka.topics().finalizations;
    let consumer: BaseConsumer = kafka
        .standalone_consumer_config()
        .create()
        .context("cannot create the finalization log consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .with_context(|| format!("cannot read the end of {topic} (run `agentmeter topics`)"))?;
    let mut records = Vec::new();
    if high <= low {
        return Ok(records);
    }
    anyhow::ensure!(
        low == 0,
        "{topic} starts at offset {low}: its first records were deleted, and invoice numbers are positions in it"
    );
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut next = low;
    while next < high {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out reading {topic} at offset {next} of {high}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.with_context(|| format!("cannot read {topic}"))?;
        let offset = message.offset();
        if offset < next {
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        let record: LogRecord = serde_json::from_slice(payload)
            .with_context(|| format!("{topic} offset {offset} is not a finalization record"))?;
        records.push((offset, record));
        next = offset + 1;
    }
    Ok(records)
}

/// [`read_log`], or no records when the topic does not exist (no invoice was ever finalized:
/// `agentmeter topics` creates it, and finalizing needs it).
pub fn read_log_if_exists(
    kafka: &KafkaSettings,
    timeout: Duration,
) -> anyhow::Result<Vec<(i64, LogRecord)>> {
    let topic = kafka.topics().finalizations;
    let consumer: BaseConsumer = kafka
        .standalone_consumer_config()
        .create()
        .context("cannot create the finalization log consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let exists = metadata.topics().iter().any(|found| {
        found.name() == topic && found.error().is_none() && !found.partitions().is_empty()
    });
    if !exists {
        return Ok(Vec::new());
    }
    read_log(kafka, timeout)
}

/// Appends `records` (keyed by invoice id) and waits until the broker has every one.
pub async fn append(kafka: &KafkaSettings, records: &[LogRecord]) -> anyhow::Result<()> {
    let topic = kafka.topics().finalizations;
    let producer: FutureProducer = kafka
        .producer_config(Duration::from_secs(30))
        .create()
        .context("cannot create the finalization log producer")?;
    for record in records {
        let payload = serde_json::to_vec(record)?;
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(record.invoice_id())
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .with_context(|| format!("cannot append to {topic}"))?;
    }
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ProjectedUpTo {
    version: i64,
    rows: u64,
}

/// One row of the `invoices` table (`aggregator/migrations/0006_invoices.sql`, re-created with
/// the revenue columns by `0007_invoice_revenue.sql`).
#[derive(Debug, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct InvoiceRow {
    pub workspace_id: String,
    pub invoice_id: String,
    pub number: u64,
    pub status: String,
    pub account_id: String,
    pub subscription_id: String,
    pub product: String,
    pub rate_plan: String,
    pub agent_type: String,
    pub period_start: u32,
    pub period_end: u32,
    pub currency: String,
    /// Decimal(38, 12), scaled by 10^12.
    pub total: i128,
    /// The allocated cost of the invoice's usage when it was finalized, Decimal(38, 12).
    pub cost: i128,
    pub cost_currency: String,
    /// `total − cost` when the plan bills in the cost currency; else the total converted with
    /// the exchange rate frozen at finalization (rounded to the cost currency's minor unit)
    /// less the cost; NULL when no rate was configured then.
    pub margin: Option<i128>,
    pub config_version: u64,
    pub finalized_at: u32,
    pub void_reason: String,
    pub content: String,
    pub log_offset: u64,
    pub version: u64,
}

fn seconds(instant: time::OffsetDateTime) -> anyhow::Result<u32> {
    u32::try_from(instant.unix_timestamp()).context("an instant outside ClickHouse's DateTime")
}

impl InvoiceRow {
    pub fn of(finalized: &FinalizedInvoice) -> anyhow::Result<InvoiceRow> {
        let invoice = &finalized.invoice;
        let scaled = |amount: rust_decimal::Decimal| {
            agentmeter_schemas::decimal::to_scaled_i128(amount)
                .context("an invoice amount outside Decimal(38, 12)")
        };
        // The rate frozen in the log, never the configuration's: a rate changed later does not
        // change a finalized invoice's row.
        let margin = agentmeter_billing::exchange::margin(
            invoice.total,
            &invoice.currency,
            finalized.cost.cost,
            &finalized.cost.cost_currency,
            finalized.cost.exchange_rate,
        )
        .context("an invoice margin")?
        .map(scaled)
        .transpose()?;
        Ok(InvoiceRow {
            workspace_id: invoice.workspace_id.clone(),
            invoice_id: finalized.invoice_id.clone(),
            number: invoice.number.unwrap_or(0),
            status: invoice.status.clone(),
            account_id: invoice.bill_to.account_id.clone(),
            subscription_id: invoice.subscription_id.clone(),
            product: invoice.product.clone(),
            rate_plan: invoice.rate_plan.clone(),
            agent_type: finalized.cost.agent_type.clone(),
            period_start: seconds(invoice.period_start)?,
            period_end: seconds(invoice.period_end)?,
            currency: invoice.currency.clone(),
            total: scaled(invoice.total)?,
            cost: scaled(finalized.cost.cost)?,
            cost_currency: finalized.cost.cost_currency.clone(),
            margin,
            config_version: finalized.config_version,
            finalized_at: seconds(finalized.finalized_at)?,
            void_reason: finalized.void_reason.clone().unwrap_or_default(),
            content: serde_json::to_string(invoice)?,
            log_offset: u64::try_from(finalized.log_offset)?,
            version: u64::try_from(finalized.version)?,
        })
    }
}

/// Reads the whole log and writes the invoices it makes into `invoices`: those whose version
/// (the offset of the last record that changed them) is above the highest version the table
/// already holds. Each projection is one INSERT of every row above a durable version, so the
/// table always holds every row up to its highest version; and rows are a function of the log,
/// so writing one again (a second projector, a replay) changes nothing.
pub async fn project_log(
    kafka: &KafkaSettings,
    clickhouse: &ClickHouseSettings,
) -> anyhow::Result<Vec<FinalizedInvoice>> {
    let kafka_settings = kafka.clone();
    let records =
        tokio::task::spawn_blocking(move || read_log(&kafka_settings, Duration::from_secs(60)))
            .await??;
    let invoices = project(records);
    if invoices.is_empty() {
        return Ok(invoices);
    }
    let client = clickhouse.client().with_database(&clickhouse.database);
    let projected = client
        .query("SELECT toInt64(max(version)) AS version, count() AS rows FROM invoices")
        .fetch_one::<ProjectedUpTo>()
        .await
        .context("cannot read the invoices table")?;
    let above = if projected.rows == 0 {
        -1
    } else {
        projected.version
    };
    let new_rows: Vec<&FinalizedInvoice> = invoices
        .iter()
        .filter(|finalized| finalized.version > above)
        .collect();
    if new_rows.is_empty() {
        return Ok(invoices);
    }
    let mut insert = client.insert::<InvoiceRow>("invoices").await?;
    for finalized in new_rows {
        insert.write(&InvoiceRow::of(finalized)?).await?;
    }
    insert
        .end()
        .await
        .context("cannot write the invoices table")?;
    Ok(invoices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmeter_billing::exchange::rate_at;
    use agentmeter_billing::finalization::{invoice_id, CostAtFinalization};
    use agentmeter_billing::invoice::{draft, plan_of};
    use agentmeter_billing::period::coverage;
    use agentmeter_schemas::catalog::ExchangeRate;
    use agentmeter_schemas::metering::MeteringConfig;
    use rust_decimal::Decimal;
    use time::macros::datetime;

    const EXAMPLE: &str = include_str!("../deploy/local/metering.example.toml");

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    /// The example with its first rate plan billing in EUR and one EUR → USD rate.
    fn in_euros(rate: &str) -> MeteringConfig {
        let mut config = MeteringConfig::from_toml(EXAMPLE).unwrap();
        config.products[0].rate_plans[0].currency = "EUR".into();
        config.exchange_rates = vec![ExchangeRate {
            from: "EUR".into(),
            to: "USD".into(),
            rate: d(rate),
            effective_from: datetime!(2026-01-01 0:00 UTC),
        }];
        config.validate().unwrap();
        config
    }

    /// What finalizing November of the first subscription with `config` appends.
    fn finalize_november(config: &MeteringConfig) -> LogRecord {
        let subscription = &config.subscriptions[0];
        let plan = plan_of(config, subscription).unwrap();
        let november = coverage(
            plan,
            subscription,
            datetime!(2026-11-15 0:00 UTC),
            &agentmeter_billing::period::time_zone("UTC").unwrap(),
        )
        .unwrap()
        .unwrap();
        let quantities = [("platform", "12345"), ("seats", "4")]
            .into_iter()
            .map(|(charge, quantity)| (charge.to_string(), d(quantity)))
            .collect();
        let invoice = draft(config, subscription, &november, &quantities).unwrap();
        let exchange_rate = rate_at(
            &config.exchange_rates,
            &invoice.currency,
            &config.workspace.currency,
            invoice.period_end,
        );
        LogRecord::Finalize {
            invoice_id: invoice_id(
                &config.workspace.id,
                &subscription.account,
                &subscription.id,
                invoice.period_start,
            ),
            config_version: 1,
            finalized_at: datetime!(2026-12-04 0:00 UTC),
            invoice: Box::new(invoice),
            cost: CostAtFinalization {
                agent_type: "type_research".into(),
                cost: d("20.5"),
                cost_currency: config.workspace.currency.clone(),
                exchange_rate,
            },
            reissues: None,
        }
    }

    #[test]
    fn the_margin_of_a_row_uses_the_rate_frozen_at_finalization() {
        let before = in_euros("1.0842");
        let log = vec![(0, finalize_november(&before))];
        let row = InvoiceRow::of(&project(log.clone())[0]).unwrap();
        // 154.45 EUR × 1.0842 = 167.454690 → 167.45 USD, less 20.5 USD of cost.
        let scaled = |text: &str| agentmeter_schemas::decimal::to_scaled_i128(d(text)).unwrap();
        assert_eq!(row.total, scaled("154.45"));
        assert_eq!(row.margin, Some(scaled("146.95")));

        // The rate changes afterwards: a new draft would use it, the finalized row does not.
        let after = in_euros("1.5");
        let LogRecord::Finalize { cost, .. } = finalize_november(&after) else {
            unreachable!()
        };
        assert_eq!(cost.exchange_rate, Some(d("1.5")));
        let again = InvoiceRow::of(&project(log)[0]).unwrap();
        assert_eq!(again.margin, row.margin);
        assert_eq!(again.content, row.content);
        assert_eq!(again.version, row.version);

        // No rate configured when it was finalized: no margin, whatever is configured since.
        let mut without = in_euros("1.0842");
        without.exchange_rates.clear();
        let row = InvoiceRow::of(&project(vec![(0, finalize_november(&without))])[0]).unwrap();
        assert_eq!(row.margin, None);
        // In the cost currency: total − cost, no rate.
        let usd = MeteringConfig::from_toml(EXAMPLE).unwrap();
        let row = InvoiceRow::of(&project(vec![(0, finalize_november(&usd))])[0]).unwrap();
        assert_eq!(row.margin, Some(scaled("133.95")));
    }
}
