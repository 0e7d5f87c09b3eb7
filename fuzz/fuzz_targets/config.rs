//! The metering configuration: arbitrary text → `MeteringConfig::from_toml` (what
//! `agentmeter config apply/validate FILE` reads), and arbitrary bytes → a JSON `ConfigRecord`
//! → `WorkspaceSnapshot::build` (what every stage does with a record of the config topic).
//!
//! Invariants: nothing panics; a configuration `from_toml` accepts compiles into a snapshot;
//! the JSON record `config apply` publishes for it reads back as the same configuration; and a
//! compiled snapshot answers `rule`, `rule_for`, `rate_at`, `instance` and `authenticate`.

#![no_main]

use agentmeter_schemas::metering::ConfigRecord;
use agentmeter_schemas::{MeteringConfig, WorkspaceSnapshot};
use libfuzzer_sys::fuzz_target;

/// The demo secrets of `deploy/local/demo-secrets.env` (the example's two instances).
const DEMO_SECRETS: [&str; 2] = [
    "am_demo_acme_research_secret",
    "am_demo_globex_support_secret",
];

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = MeteringConfig::from_toml(text) {
            let record = ConfigRecord::next(None, config.clone(), time::OffsetDateTime::UNIX_EPOCH);
            check_record_round_trip(&record);
            let snapshot = WorkspaceSnapshot::build(1, config).unwrap_or_else(|problems| {
                panic!("from_toml accepted it, build refused: {problems}")
            });
            query(&snapshot, text);
        }
    }
    if let Ok(record) = serde_json::from_slice::<ConfigRecord>(data) {
        check_record_round_trip(&record);
        if let Ok(snapshot) = WorkspaceSnapshot::build(record.version, record.config) {
            query(&snapshot, &String::from_utf8_lossy(data));
        }
    }
});

/// What `config apply` publishes must be what the stages read.
fn check_record_round_trip(record: &ConfigRecord) {
    let payload = serde_json::to_vec(record)
        .unwrap_or_else(|error| panic!("a readable config record does not serialize: {error}"));
    let read: ConfigRecord = serde_json::from_slice(&payload)
        .unwrap_or_else(|error| panic!("a published config record does not parse: {error}"));
    assert_eq!(&read, record, "config record changed through JSON");
}

/// Every lookup the stages make on a snapshot.
fn query(snapshot: &WorkspaceSnapshot, input: &str) {
    let config = &snapshot.config;
    for name in &config.tagging.tracked {
        let rule = snapshot.rule(name);
        assert!(rule.tracked, "tracked name {name:?} has an untracked rule");
        assert_eq!(snapshot.rule_for(name, None), rule);
        assert_eq!(snapshot.rule_for("\u{0}never tracked", Some(name)), rule);
        if let Some(pricing) = &rule.pricing {
            let _ = pricing.measure.name();
            let _ = pricing.rate_at(i64::MIN);
            for (index, (effective_from, rate)) in pricing.rates.iter().enumerate() {
                assert_eq!(pricing.rate_at(*effective_from), Some(*rate));
                let before = pricing.rate_at(effective_from.saturating_sub(1));
                match index {
                    0 if *effective_from > i64::MIN => assert_eq!(before, None),
                    0 => {}
                    _ => assert_eq!(before, Some(pricing.rates[index - 1].1)),
                }
            }
            assert_eq!(
                pricing.rate_at(i64::MAX),
                pricing.rates.last().map(|(_, rate)| *rate)
            );
        }
    }
    for outcome in &config.outcomes {
        assert!(snapshot.rule(&outcome.action).outcome);
    }
    // Arbitrary names: untracked unless configured, and no panic either way.
    for name in input.split(['"', '\n', ',']).take(16) {
        let _ = snapshot.rule(name);
        let _ = snapshot.rule_for(name, Some(name));
    }
    for instance in &config.agent_instances {
        assert_eq!(snapshot.instance(&instance.id), Some(instance));
    }
    assert_eq!(
        snapshot.secret_digests().count(),
        config.agent_instances.len()
    );
    assert!(
        snapshot.authenticate("").is_none()
            || config.agent_instances.iter().any(|instance| {
                instance.secret_sha256 == agentmeter_schemas::metering::hash_secret("")
            })
    );
    for secret in DEMO_SECRETS.iter().copied().chain(input.lines().take(4)) {
        if let Some(instance) = snapshot.authenticate(secret) {
            assert_eq!(
                instance.secret_sha256,
                agentmeter_schemas::metering::hash_secret(secret),
                "authenticated by a secret that is not the instance's"
            );
        }
    }
}
