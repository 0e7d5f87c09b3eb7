//! One workspace cannot take, lock out or even learn of another's agent secret (issue 9):
//! `config apply` refuses a secret hash that another workspace uses without naming it, and if a
//! second claim reaches the config topic anyway (two applies racing), the workspace that had the
//! secret first keeps it — in ingest and in every other reader.
#![cfg(feature = "integration")]

mod common;

use std::time::Duration;

use agentmeter_schemas::{ConfigRecord, MeteringConfig};
use common::{metering_config, metrics_text, write_file, TestEnv};
use serde_json::Value;

const OWNER_SECRET: &str = "tenant-owner-secret";
const OTHER_SECRET: &str = "tenant-other-secret";

fn agent_info(env: &TestEnv, secret: &str) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/agent_instance/info", env.ingest_url()))
        .header("X-Agent-Secret", secret)
        .timeout(Duration::from_secs(10))
        .send()
        .expect("ingest reachable");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn apply_refuses_a_secret_of_another_workspace_without_naming_it() {
    let mut env = TestEnv::new("tenant_apply", "");
    env.apply_config(&metering_config(
        "ws_owner",
        &[("acc_owner", OWNER_SECRET)],
        "",
    ));
    // The copycat's file is valid on its own: only the topic knows the hash is taken.
    let copycat = metering_config(
        "ws_copycat",
        &[("acc_copy", OWNER_SECRET), ("acc_fine", OTHER_SECRET)],
        "",
    );
    let path = write_file(&env.dir, "copycat.toml", &copycat);
    env.tool(&["config", "validate", path.to_str().unwrap()]);
    let refused = env.tool_failing(&["config", "apply", path.to_str().unwrap()]);
    assert!(refused.contains("nothing was applied"), "{refused}");
    assert!(
        refused.contains("\"inst_acc_copy\"") && refused.contains("already in use"),
        "{refused}"
    );
    assert!(!refused.contains("inst_acc_fine"), "{refused}");
    for secret_of_the_owner in ["ws_owner", "acc_owner", "inst_acc_owner"] {
        assert!(
            !refused.contains(secret_of_the_owner),
            "the refusal names the other workspace ({secret_of_the_owner}): {refused}"
        );
    }
    let shown = env.tool(&["config", "show"]);
    assert!(!shown.contains("ws_copycat"), "{shown}");

    env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let (status, info) = agent_info(&env, OWNER_SECRET);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["workspace_id"], "ws_owner");
}

#[test]
fn a_conflicting_claim_on_the_topic_leaves_the_secret_with_its_first_owner() {
    let mut env = TestEnv::new("tenant_runtime", "");
    env.apply_config(&metering_config(
        "ws_owner",
        &[("acc_owner", OWNER_SECRET)],
        "",
    ));
    // A record that never went through `config apply` (e.g. two applies racing): the same secret
    // in another workspace, claimed later.
    let copycat = MeteringConfig::from_toml(&metering_config(
        "ws_copycat",
        &[("acc_copy", OWNER_SECRET), ("acc_fine", OTHER_SECRET)],
        "",
    ))
    .unwrap();
    let later = time::OffsetDateTime::now_utc() + time::Duration::minutes(1);
    let record = ConfigRecord::next(None, copycat, later);
    env.produce(
        "config",
        "ws_copycat",
        &serde_json::to_vec(&record).unwrap(),
    );

    env.spawn("ingest", "ingest");
    env.wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(60),
    );
    let (status, info) = agent_info(&env, OWNER_SECRET);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["workspace_id"], "ws_owner", "{info}");
    assert_eq!(info["id"], "inst_acc_owner", "{info}");
    // The copycat's own, unshared secret works as usual.
    let (status, info) = agent_info(&env, OTHER_SECRET);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["workspace_id"], "ws_copycat");
    let metrics = metrics_text(env.run.ingest_port).expect("ingest /metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line == "agentmeter_config_secret_conflicts 1"),
        "{metrics}"
    );
}
