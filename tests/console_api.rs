//! The control-plane API (`agentmeter console`) against the real broker and ClickHouse, with
//! real ingest, enricher and aggregator processes applying what it changes: accounts, agent
//! instances and their secrets (the rotation grace period ending in a real ingest), tagging,
//! cost and outcome changes seen on the next actions, optimistic concurrency (409 on a stale
//! version, configuration-as-code next to the console), the audit log, the read-only role, and
//! one workspace never seeing or touching another's data.
#![cfg(feature = "integration")]

mod common;

use std::time::{Duration, Instant};

use common::{free_port, metering_config, post_status, repo_root, TestEnv};
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

const SECRET_A: &str = "console-secret-a";
const SECRET_B: &str = "console-secret-b";
/// The console's `secret_grace_period` in these tests.
const GRACE: Duration = Duration::from_secs(4);

/// Calls the console with one admin key.
struct Api {
    url: String,
    key: Option<String>,
    client: Client,
}

/// An answer: status, JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn version(&self) -> i64 {
        self.body["version"]
            .as_i64()
            .unwrap_or_else(|| panic!("no version in {self:?}"))
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl Api {
    fn new(url: &str, key: Option<&str>) -> Api {
        Api {
            url: url.to_string(),
            key: key.map(str::to_string),
            client: Client::new(),
        }
    }

    fn call(
        &self,
        method: Method,
        path: &str,
        if_match: Option<i64>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .timeout(Duration::from_secs(30));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(version) = if_match {
            request = request.header("If-Match", format!("\"{version}\""));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().expect("the console answers");
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!("{path} answered {status} with a body that is not JSON: {text}")
        });
        Answer { status, body }
    }

    fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None, None)
    }

    fn version(&self) -> i64 {
        let answer = self.get("/api/v1/workspace");
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.version()
    }

    /// A write against the current version; panics unless it answers `status`.
    fn change(&self, method: Method, path: &str, body: Option<Value>, status: u16) -> Answer {
        let version = self.version();
        let answer = self.call(method, path, Some(version), body);
        assert_eq!(answer.status, status, "{path}: {answer:?}");
        answer
    }
}

/// The admin key `agentmeter admin-key new` printed.
fn new_admin_key(env: &TestEnv, workspace: &str, role: &str) -> String {
    let output = env.tool(&[
        "admin-key",
        "new",
        "--workspace",
        workspace,
        "--name",
        "test",
        "--role",
        role,
    ]);
    output
        .lines()
        .find(|line| line.starts_with("amk_"))
        .unwrap_or_else(|| panic!("no key in {output}"))
        .to_string()
}

fn console_env(name: &str) -> (TestEnv, String) {
    let port = free_port();
    let env = TestEnv::new(
        name,
        &format!(
            "\n[console]\nlisten = \"127.0.0.1:{port}\"\nsecret_grace_period = \"{}ms\"\n",
            GRACE.as_millis()
        ),
    );
    (env, format!("http://127.0.0.1:{port}"))
}

fn web_searches(prefix: &str, count: usize) -> Value {
    let items: Vec<Value> = (0..count)
        .map(|index| json!({"event_id": format!("{prefix}-{index}"), "action_name": "web_search", "user_id": format!("user-{}", index % 3)}))
        .collect();
    json!({ "actions": items })
}

/// Posts until ingest answers `status` (it follows the config topic, so a change reaches it
/// a moment after the console answered).
fn wait_for_ingest_status(env: &TestEnv, secret: &str, body: &Value, status: u16) {
    let client = Client::new();
    let url = format!("{}/v1/actions", env.ingest_url());
    env.wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || match post_status(&client, &url, secret, body) {
            got if got == status => Ok(()),
            got => Err(format!("ingest answered {got}, waiting for {status}")),
        },
    );
}

#[test]
fn a_builder_runs_the_whole_life_cycle_through_the_api_and_the_stages_apply_it() {
    let (mut env, url) = console_env("console_life");
    env.apply_config(&metering_config(
        "ws_console",
        &[("acc_seed", SECRET_A)],
        "",
    ));
    let key = new_admin_key(&env, "ws_console", "admin");
    let read_only_key = new_admin_key(&env, "ws_console", "read-only");
    env.spawn("console", "console");
    env.spawn("ingest", "ingest");
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");
    env.wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(60));
    let api = Api::new(&url, Some(&key));
    let read_only = Api::new(&url, Some(&read_only_key));

    // Accounts: created, refused without a version, with a stale one, and by the read-only key.
    let start = api.version();
    let account = json!({"id": "acc_new", "name": "New Corp", "email": "billing@new.example"});
    let missing = api.call(
        Method::POST,
        "/api/v1/accounts",
        None,
        Some(account.clone()),
    );
    assert_eq!(missing.status, 428, "{missing:?}");
    let created = api.call(
        Method::POST,
        "/api/v1/accounts",
        Some(start),
        Some(account.clone()),
    );
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.version(), start + 1);
    let stale = api.call(
        Method::POST,
        "/api/v1/accounts",
        Some(start),
        Some(json!({"id": "acc_other", "name": "Other"})),
    );
    assert_eq!(stale.status, 409, "{stale:?}");
    assert!(stale.message().contains("version"), "{stale:?}");
    let denied = read_only.call(
        Method::POST,
        "/api/v1/accounts",
        Some(start + 1),
        Some(json!({"id": "acc_ro", "name": "RO"})),
    );
    assert_eq!(denied.status, 403, "{denied:?}");
    let duplicate = api.change(Method::POST, "/api/v1/accounts", Some(account), 422);
    assert_eq!(duplicate.body["error"]["field"], "id");
    let invalid = api.change(
        Method::POST,
        "/api/v1/accounts",
        Some(json!({"id": "has space", "name": "Bad"})),
        422,
    );
    assert!(invalid.message().contains("has space"), "{invalid:?}");
    let unknown_field = api.change(
        Method::POST,
        "/api/v1/accounts",
        Some(json!({"id": "acc_x", "name": "X", "colour": "red"})),
        400,
    );
    assert!(
        unknown_field.message().contains("colour"),
        "{unknown_field:?}"
    );
    assert_eq!(api.version(), start + 1, "refused writes changed nothing");
    let accounts = read_only.get("/api/v1/accounts");
    assert_eq!(accounts.status, 200);
    let ids: Vec<&str> = accounts.body["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|account| account["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acc_seed", "acc_new"]);
    api.change(
        Method::PATCH,
        "/api/v1/accounts/acc_new",
        Some(json!({"name": "New Corporation", "email": ""})),
        200,
    );
    let detail = api.get("/api/v1/accounts/acc_new");
    assert_eq!(detail.body["account"]["name"], "New Corporation");
    assert_eq!(detail.body["account"]["email"], Value::Null);

    // An agent instance: the secret is shown once, with the environment value-python needs, and
    // a real ingest accepts it.
    let instance = api.change(
        Method::POST,
        "/api/v1/agent-instances",
        Some(json!({"id": "inst_new", "name": "Research agent", "agent_type": "type_test", "account": "acc_new"})),
        201,
    );
    let secret = instance.body["secret"].as_str().unwrap().to_string();
    assert_eq!(
        instance.body["environment"]["OTEL_EXPORTER_OTLP_HEADERS"],
        format!("x-agent-secret={secret}")
    );
    assert_eq!(
        instance.body["environment"]["VALUE_AGENT_SECRET"],
        secret.as_str()
    );
    let listed = api.get("/api/v1/agent-instances");
    assert!(
        !listed.body.to_string().contains(&secret),
        "a list shows the secret"
    );
    wait_for_ingest_status(&env, &secret, &web_searches("first", 5), 202);

    // Live Data shows them, untracked; Action Tagging lists the name with its count.
    env.wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let page = api.get("/api/v1/live-data?account=acc_new&action=web_search");
        match page.body["items"].as_array().map(Vec::len) {
            Some(5) => Ok(()),
            other => Err(format!("live data has {other:?} rows: {page:?}")),
        }
    });
    let seen = api.get("/api/v1/actions");
    let web_search = seen.body["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|action| action["name"] == "web_search")
        .cloned()
        .unwrap_or_else(|| panic!("web_search not discovered: {seen:?}"));
    assert_eq!(web_search["seen"], 5);
    assert_eq!(web_search["tracked"], false);

    // Track it and give it a cost: the next actions carry it, in Live Data and in usage.
    api.change(
        Method::PUT,
        "/api/v1/tagging/web_search",
        Some(json!({"tracked": true})),
        200,
    );
    let bad_rate = api.change(
        Method::POST,
        "/api/v1/cost-allocations/web_search/rates",
        Some(json!({"measure": "unit", "effective_from": "2020-01-01T00:00:00Z", "cost_per_unit": 0.005})),
        400,
    );
    assert!(
        bad_rate.message().contains("cost_per_unit") || bad_rate.message().contains("string"),
        "{bad_rate:?}"
    );
    api.change(
        Method::POST,
        "/api/v1/cost-allocations/web_search/rates",
        Some(json!({"measure": "unit", "effective_from": "2020-01-01T00:00:00Z", "cost_per_unit": "0.005"})),
        200,
    );
    let earlier = api.change(
        Method::POST,
        "/api/v1/cost-allocations/web_search/rates",
        Some(json!({"effective_from": "2019-01-01T00:00:00Z", "cost_per_unit": "0.004"})),
        422,
    );
    assert_eq!(earlier.body["error"]["field"], "effective_from");
    api.change(
        Method::PUT,
        "/api/v1/outcomes/web_search",
        Some(json!({"outcome": true})),
        200,
    );
    // The enricher follows the config topic too: send until an action comes out priced.
    let mut batch = 0;
    env.wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        batch += 1;
        wait_for_ingest_status(
            &env,
            &secret,
            &web_searches(&format!("priced-{batch}"), 4),
            202,
        );
        let page = api.get("/api/v1/live-data?account=acc_new&limit=4&user=user-0");
        let priced = page.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|item| item["cost"] == "0.005" && item["label"] == "@outcome");
        if priced {
            Ok(())
        } else {
            Err(format!("no priced action yet: {page:?}"))
        }
    });
    // Usage through the API equals what the pipeline stored for the tracked actions (some of
    // the first batches may have been enriched before the rate or the outcome was in force).
    // The last batches may still be on their way to ClickHouse, so both sides are read again
    // until they agree.
    env.wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let stored = env.query(
            "SELECT count(), toString(sum(cost)), sum(outcome), countIf(toString(cost) = '0.005000000000') FROM actions FINAL \
             WHERE workspace_id = 'ws_console' AND account_id = 'acc_new' AND tracked = 1",
        );
        let (tracked, cost, outcomes, priced) = (
            stored[0][0].parse::<u64>().unwrap(),
            common::dec(&stored[0][1]),
            stored[0][2].parse::<u64>().unwrap(),
            stored[0][3].parse::<u64>().unwrap(),
        );
        assert!(priced >= 1, "{stored:?}");
        assert!(tracked <= 4 * batch, "{stored:?}");
        let usage = api.get("/api/v1/usage?account=acc_new");
        let row = usage.body["usage"].as_array().and_then(|rows| {
            rows.iter()
                .find(|row| row["action"] == "web_search")
                .cloned()
        });
        let expected = json!({
            "actions": tracked,
            "cost": cost.normalize().to_string(),
            "outcomes": outcomes,
        });
        match row {
            Some(row)
                if row["actions"] == expected["actions"]
                    && row["cost"] == expected["cost"]
                    && row["outcomes"] == expected["outcomes"] =>
            {
                Ok(())
            }
            other => Err(format!("usage of acc_new: {other:?}, expected {expected}")),
        }
    });

    // Rotation: the old secret works during the grace period and is refused after it.
    let rotated = api.change(
        Method::POST,
        "/api/v1/agent-instances/inst_new/rotate-secret",
        None,
        200,
    );
    let rotated_at = Instant::now();
    let new_secret = rotated.body["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    wait_for_ingest_status(&env, &new_secret, &web_searches("rotated-new", 1), 202);
    let client = Client::new();
    let actions_url = format!("{}/v1/actions", env.ingest_url());
    let during = post_status(
        &client,
        &actions_url,
        &secret,
        &web_searches("rotated-old", 1),
    );
    assert!(
        rotated_at.elapsed() < GRACE,
        "the test was too slow to try the grace period"
    );
    assert_eq!(
        during, 202,
        "the old secret is refused during its grace period"
    );
    std::thread::sleep(GRACE.saturating_sub(rotated_at.elapsed()) + Duration::from_millis(300));
    let after = post_status(
        &client,
        &actions_url,
        &secret,
        &web_searches("rotated-late", 1),
    );
    assert_eq!(
        after, 401,
        "the old secret still works after its grace period"
    );
    assert_eq!(
        post_status(
            &client,
            &actions_url,
            &new_secret,
            &web_searches("rotated-new-2", 1)
        ),
        202
    );

    // Archiving the instance refuses its secret.
    api.change(
        Method::POST,
        "/api/v1/agent-instances/inst_new/archive",
        None,
        200,
    );
    wait_for_ingest_status(&env, &new_secret, &web_searches("archived", 1), 401);

    // Configuration as code next to the console: export → apply is unchanged; a file applied by
    // the CLI makes the console's version stale.
    let before_cli = api.version();
    let exported = env.tool(&["config", "export", "ws_console"]);
    assert!(
        exported.contains("acc_new") && exported.contains("retired_secrets"),
        "{exported}"
    );
    let applied = env.apply_config(&exported);
    assert!(applied.contains("unchanged"), "{applied}");
    let changed = exported.replace("New Corporation", "New Corporation GmbH");
    let applied = env.apply_config(&changed);
    assert!(
        applied.contains(&format!("applied version {}", before_cli + 1)),
        "{applied}"
    );
    let stale = api.call(
        Method::PATCH,
        "/api/v1/accounts/acc_new",
        Some(before_cli),
        Some(json!({"name": "Lost update"})),
    );
    assert_eq!(stale.status, 409, "{stale:?}");
    env.wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let name = api.get("/api/v1/accounts/acc_new").body["account"]["name"].clone();
        (name == "New Corporation GmbH")
            .then_some(())
            .ok_or(format!("name {name}"))
    });

    // The audit log: every version, who made it and what changed.
    let final_version = api.version();
    env.wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let audit = api.get("/api/v1/audit");
        let entries = audit.body["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let versions: Vec<i64> = entries
            .iter()
            .filter_map(|entry| entry["version"].as_i64())
            .collect();
        let expected: Vec<i64> = (start + 1..=final_version).rev().collect();
        if !expected.iter().all(|version| versions.contains(version)) {
            return Err(format!(
                "audit versions {versions:?}, expected at least {expected:?}"
            ));
        }
        let by_version = |version: i64| {
            entries
                .iter()
                .find(|entry| entry["version"] == version)
                .unwrap()
        };
        let first = by_version(start + 1);
        let key_id = first["changed_by"].as_str().unwrap_or("");
        assert!(key_id.starts_with("key:key_"), "{first}");
        assert!(first["changes"].to_string().contains("acc_new"), "{first}");
        assert_eq!(by_version(final_version)["changed_by"], "cli");
        Ok(())
    });
}

#[test]
fn one_workspace_never_sees_or_touches_another_and_every_route_needs_a_key() {
    let (mut env, url) = console_env("console_isolation");
    env.apply_config(&metering_config("ws_iso_a", &[("acc_a", SECRET_A)], ""));
    env.apply_config(&metering_config("ws_iso_b", &[("acc_b", SECRET_B)], ""));
    let key_a = new_admin_key(&env, "ws_iso_a", "admin");
    let key_b = new_admin_key(&env, "ws_iso_b", "admin");
    env.spawn("console", "console");
    env.wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(60));
    let a = Api::new(&url, Some(&key_a));
    let b = Api::new(&url, Some(&key_b));

    // B cannot read, change or use A's account, nor tell it exists: the same 404 as for an id
    // that exists nowhere.
    for id in ["acc_a", "acc_nowhere"] {
        let read = b.get(&format!("/api/v1/accounts/{id}"));
        assert_eq!(read.status, 404, "{read:?}");
        assert_eq!(read.message(), format!("account \"{id}\" not found"));
        let patched = b.change(
            Method::PATCH,
            &format!("/api/v1/accounts/{id}"),
            Some(json!({"name": "taken over"})),
            404,
        );
        assert_eq!(patched.message(), format!("account \"{id}\" not found"));
        b.change(
            Method::POST,
            &format!("/api/v1/accounts/{id}/archive"),
            None,
            404,
        );
        let usage = b.get(&format!("/api/v1/usage?account={id}"));
        assert_eq!(usage.status, 404);
    }
    b.change(
        Method::POST,
        "/api/v1/agent-instances",
        Some(
            json!({"id": "inst_steal", "name": "x", "agent_type": "type_test", "account": "acc_a"}),
        ),
        404,
    );
    b.change(
        Method::POST,
        "/api/v1/agent-instances/inst_acc_a/rotate-secret",
        None,
        404,
    );
    assert_eq!(a.get("/api/v1/accounts/acc_a").status, 200);
    assert_eq!(
        a.get("/api/v1/workspace").body["workspace"]["id"],
        "ws_iso_a"
    );
    assert_eq!(
        b.get("/api/v1/workspace").body["workspace"]["id"],
        "ws_iso_b"
    );
    let b_accounts = b.get("/api/v1/accounts").body.to_string();
    assert!(!b_accounts.contains("acc_a"), "{b_accounts}");
    // A version of B is never accepted as A's and the other way round: each write is checked
    // against the caller's own workspace.
    let a_version = a.version();
    let written = b.call(
        Method::POST,
        "/api/v1/accounts",
        Some(b.version()),
        Some(json!({"id": "acc_b2", "name": "B2"})),
    );
    assert_eq!(written.status, 201);
    assert_eq!(a.version(), a_version, "a write of B changed A's version");

    // Every documented route refuses a caller without a key (so each exists and is guarded),
    // with a JSON error; an unknown route is a JSON 404.
    let anonymous = Api::new(&url, None);
    let document: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for (path, operations) in document["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", "acc_a")
            .replace("{action}", "web_search");
        for method in operations.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let answer = anonymous.call(method.clone(), &concrete, Some(1), Some(json!({})));
            if path == "/api/v1/openapi.json" {
                assert_eq!(answer.status, 200);
            } else {
                assert_eq!(answer.status, 401, "{method} {path}: {answer:?}");
                assert!(answer.message().contains("admin key"), "{answer:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} operations documented");
    let unknown = Api::new(&url, Some("amk_not_a_key")).get("/api/v1/workspace");
    assert_eq!(unknown.status, 401);
    let no_route = a.get("/api/v1/nothing-here");
    assert_eq!(no_route.status, 404);

    // A revoked key and a deleted workspace are refused at once.
    let listed = env.tool(&["admin-key", "list", "--workspace", "ws_iso_a"]);
    let key_id = listed
        .lines()
        .find_map(|line| {
            line.split_whitespace()
                .next()
                .filter(|id| id.starts_with("key_"))
        })
        .unwrap()
        .to_string();
    env.tool(&["admin-key", "revoke", "--workspace", "ws_iso_a", &key_id]);
    env.wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match a.get("/api/v1/workspace").status {
            401 => Ok(()),
            other => Err(format!("revoked key answered {other}")),
        },
    );
    env.tool(&["config", "delete", "ws_iso_b", "--yes"]);
    env.wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match b.get("/api/v1/workspace").status {
            401 => Ok(()),
            other => Err(format!("key of a deleted workspace answered {other}")),
        },
    );
}

#[test]
fn products_subscriptions_invoices_and_revenue_through_the_api() {
    let (mut env, url) = console_env("console_billing");
    env.apply_config(&metering_config("ws_bill", &[("acc_bill", SECRET_A)], ""));
    let key = new_admin_key(&env, "ws_bill", "admin");
    let read_only_key = new_admin_key(&env, "ws_bill", "read-only");
    env.spawn("console", "console");
    env.wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(60));
    let api = Api::new(&url, Some(&key));
    let read_only = Api::new(&url, Some(&read_only_key));

    let product = |fee: &str| {
        json!({
            "id": "prod_bill", "name": "Billing Agent", "agent_type": "type_test",
            "rate_plans": [{
                "id": "basic", "name": "Basic", "currency": "USD", "billing_cycle": "monthly",
                "charges": [{"id": "platform", "name": "Platform fee", "model": {"flat": {"fee": fee}}}],
            }],
        })
    };
    let created = api.change(
        Method::PUT,
        "/api/v1/products/prod_bill",
        Some(product("49")),
        201,
    );
    assert_eq!(created.body["product"]["rate_plans"][0]["id"], "basic");
    let refused = read_only.call(
        Method::PUT,
        "/api/v1/products/prod_bill",
        Some(read_only.version()),
        Some(product("1")),
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    let wrong_id = api.change(
        Method::PUT,
        "/api/v1/products/other",
        Some(product("49")),
        422,
    );
    assert_eq!(wrong_id.body["error"]["field"], "id");
    let mut unknown_type = product("49");
    unknown_type["agent_type"] = json!("type_nowhere");
    let invalid = api.change(
        Method::PUT,
        "/api/v1/products/prod_bill",
        Some(unknown_type),
        422,
    );
    assert!(invalid.message().contains("type_nowhere"), "{invalid:?}");
    let float_fee = api.change(
        Method::PUT,
        "/api/v1/products/prod_bill",
        Some(product("49")).map(|mut p| {
            p["rate_plans"][0]["charges"][0]["model"]["flat"]["fee"] = json!(49.5);
            p
        }),
        400,
    );
    assert!(
        float_fee.message().contains("fee") || float_fee.message().contains("string"),
        "{float_fee:?}"
    );

    let subscription = json!({"id": "sub_bill", "account": "acc_bill", "product": "prod_bill",
                              "rate_plan": "basic", "start": "2026-09-01T00:00:00Z"});
    api.change(
        Method::POST,
        "/api/v1/subscriptions",
        Some(subscription.clone()),
        201,
    );
    let twice = api.change(
        Method::POST,
        "/api/v1/subscriptions",
        Some(subscription),
        422,
    );
    assert_eq!(twice.body["error"]["field"], "id");
    let elsewhere = api.change(
        Method::POST,
        "/api/v1/subscriptions",
        Some(json!({"id": "sub_x", "account": "acc_nowhere", "product": "prod_bill", "rate_plan": "basic", "start": "2026-09-01T00:00:00Z"})),
        404,
    );
    assert!(elsewhere.message().contains("acc_nowhere"), "{elsewhere:?}");
    assert_eq!(
        api.get("/api/v1/subscriptions").body["subscriptions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // October 2026 finalized by the billing CLI; the API lists it, shows it and sums it.
    env.wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let (finalized, output) = env.run_tool_with_env(
            &[
                "invoices",
                "finalize",
                "--workspace",
                "ws_bill",
                "--all",
                "--at",
                "2026-10-15T00:00:00Z",
            ],
            &[],
        );
        if finalized
            && env.query("SELECT count() FROM invoices FINAL WHERE workspace_id = 'ws_bill'")[0][0]
                == "1"
        {
            Ok(())
        } else {
            Err(format!("not finalized yet: {output}"))
        }
    });
    let invoices = api.get("/api/v1/invoices?account=acc_bill");
    let listed = &invoices.body["invoices"][0];
    assert_eq!(
        (
            listed["number"].as_u64(),
            listed["status"].as_str(),
            listed["total"].as_str()
        ),
        (Some(1), Some("finalized"), Some("49")),
        "{invoices:?}"
    );
    let id = listed["id"].as_str().unwrap();
    let invoice = api.get(&format!("/api/v1/invoices/{id}"));
    assert_eq!(invoice.status, 200, "{invoice:?}");
    assert_eq!(
        common::dec(invoice.body["invoice"]["total"].as_str().unwrap()),
        common::dec("49")
    );
    let printable = Client::new()
        .get(format!("{url}/api/v1/invoices/{id}?format=html"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert!(printable.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(printable.text().unwrap().contains("Platform fee"));
    assert_eq!(
        api.get(&format!("/api/v1/invoices/{id}?format=pdf")).body["error"]["field"],
        "format"
    );
    assert_eq!(api.get("/api/v1/invoices/inv_nowhere").status, 404);

    let stored = env.query(
        "SELECT toString(sum(total)), toString(sum(cost)) FROM invoices FINAL WHERE workspace_id = 'ws_bill' AND status = 'finalized'",
    );
    for group in ["account", "agent_type", "rate_plan", "month"] {
        let revenue = api.get(&format!("/api/v1/revenue?group_by={group}"));
        let groups = revenue.body["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 1, "{revenue:?}");
        assert_eq!(
            common::dec(groups[0]["revenue"].as_str().unwrap()),
            common::dec(&stored[0][0])
        );
        assert_eq!(
            common::dec(groups[0]["cost"].as_str().unwrap()),
            common::dec(&stored[0][1])
        );
    }
    assert_eq!(
        api.get("/api/v1/revenue?group_by=month").body["groups"][0]["key"],
        "2026-10"
    );
    assert_eq!(
        api.get("/api/v1/revenue?group_by=account").body["groups"][0]["key"],
        "acc_bill"
    );
    // The Profitability page shows the same figures (a web session made with the same key).
    let web = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = web
        .post(format!("{url}/login"))
        .form(&[("key", key.as_str())])
        .send()
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    let session = cookie.split(';').next().unwrap().to_string();
    let page = web
        .get(format!("{url}/profitability"))
        .header("Cookie", &session)
        .send()
        .unwrap()
        .text()
        .unwrap();
    for expected in [
        "Margin per month",
        "<td>acc_bill</td>",
        "<td>2026-10</td>",
        "<td>basic</td>",
    ] {
        assert!(
            page.contains(expected),
            "{expected} not on the Profitability page:\n{page}"
        );
    }
    let bad_group = api.get("/api/v1/revenue?group_by=planet");
    assert_eq!(
        (bad_group.status, bad_group.body["error"]["field"].as_str()),
        (422, Some("group_by"))
    );

    // A change that would alter the finalized October is refused; one after it is not.
    let alters_october = api.change(
        Method::POST,
        "/api/v1/subscriptions/sub_bill/end",
        Some(json!({"end": "2026-10-20T00:00:00Z"})),
        409,
    );
    assert!(
        alters_october.message().contains("finalized"),
        "{alters_october:?}"
    );
    let repriced = api.change(
        Method::PUT,
        "/api/v1/products/prod_bill",
        Some(product("59")),
        409,
    );
    assert!(repriced.message().contains("finalized"), "{repriced:?}");
    let ended = api.change(
        Method::POST,
        "/api/v1/subscriptions/sub_bill/end",
        Some(json!({"end": "2027-01-01T00:00:00Z"})),
        200,
    );
    assert_eq!(ended.body["subscription"]["end"], "2027-01-01T00:00:00Z");
    let before_start = api.change(
        Method::POST,
        "/api/v1/subscriptions/sub_bill/end",
        Some(json!({"end": "2026-08-01T00:00:00Z"})),
        422,
    );
    assert_eq!(before_start.body["error"]["field"], "end");
}
