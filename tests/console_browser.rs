//! The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! installed by deploy/local/services.sh), driven over WebDriver, against the real broker and
//! ClickHouse with real ingest, enricher and aggregator processes.
//!
//! A new builder logs in with an admin key, creates an account, an agent type and an agent
//! instance, sends actions with the secret the console showed, sees them arrive in Live Data
//! (which refreshes by itself), tracks the action and gives it a cost, and sees that cost on the
//! next actions and in the account's usage — equal to what ClickHouse stored. Around it: a
//! refused form says what is wrong and changes nothing, a form without the session's CSRF
//! token is refused, the session cookie is HttpOnly and SameSite=Strict, and failed logins
//! are rate limited.
//!
//! Every screen is saved as a PNG in `target/console-screenshots/`; with
//! `AGENTMETER_UPDATE_SCREENSHOTS=1` also in `docs/console/`, which docs/console.md shows.
#![cfg(feature = "integration")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, metering_config, post_status, repo_root, TestEnv};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::blocking::Client as HttpClient;
use serde_json::{json, Value};

const SEED_SECRET: &str = "browser-seed-secret";

/// chromedriver, stopped when the test ends however it ends.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let binary = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .expect(
                "chromedriver is installed by deploy/local/services.sh install (chromium-driver)",
            );
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        // Owned by the guard from here, so a panic below still stops it.
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let status = format!("{}/status", driver.url);
        let http = HttpClient::new();
        for _ in 0..100 {
            if http
                .get(&status)
                .send()
                .is_ok_and(|answer| answer.status().is_success())
            {
                return driver;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("chromedriver did not answer on {}", driver.url);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser, and the blocking runtime its async client runs on.
struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Client,
    console: String,
    shots: Vec<PathBuf>,
}

impl Browser {
    fn open(driver: &Driver, console: &str) -> Browser {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        let client = runtime
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities)
                    .connect(&driver.url),
            )
            .expect("a Chromium session");
        let mut shots = vec![repo_root().join("target/console-screenshots")];
        if std::env::var_os("AGENTMETER_UPDATE_SCREENSHOTS").is_some() {
            shots.push(repo_root().join("docs/console"));
        }
        for dir in &shots {
            std::fs::create_dir_all(dir).unwrap();
        }
        Browser {
            runtime,
            client,
            console: console.to_string(),
            shots,
        }
    }

    fn goto(&self, path: &str) {
        self.runtime
            .block_on(self.client.goto(&format!("{}{path}", self.console)))
            .unwrap_or_else(|error| panic!("open {path}: {error}"));
    }

    fn path(&self) -> String {
        let url = self.runtime.block_on(self.client.current_url()).unwrap();
        url.path().to_string()
    }

    fn text(&self, css: &str) -> String {
        self.runtime.block_on(async {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|error| panic!("no {css}: {error}"))
                .text()
                .await
                .unwrap()
        })
    }

    fn texts(&self, css: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let mut texts = Vec::new();
            for element in self.client.find_all(Locator::Css(css)).await.unwrap() {
                texts.push(element.text().await.unwrap_or_default());
            }
            texts
        })
    }

    fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.runtime.block_on(async {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|error| panic!("no {css}: {error}"))
                .attr(name)
                .await
                .unwrap()
        })
    }

    /// Types `value` into the field `css` (emptied first).
    fn fill(&self, css: &str, value: &str) {
        self.runtime.block_on(async {
            let field = self
                .client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|error| panic!("no field {css}: {error}"));
            field.clear().await.unwrap();
            field.send_keys(value).await.unwrap();
        })
    }

    fn select(&self, css: &str, value: &str) {
        self.runtime.block_on(async {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|error| panic!("no select {css}: {error}"))
                .select_by_value(value)
                .await
                .unwrap_or_else(|error| panic!("no option {value} in {css}: {error}"));
        })
    }

    /// Clicks `css` (a submit button) and waits until the next page has loaded.
    fn click(&self, css: &str) {
        self.runtime.block_on(async {
            self.client
                .execute("window.__previousPage = true;", vec![])
                .await
                .unwrap();
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|error| panic!("nothing to click at {css}: {error}"))
                .click()
                .await
                .unwrap();
            for _ in 0..300 {
                let loaded = self
                    .client
                    .execute(
                        "return window.__previousPage === undefined && document.readyState === 'complete';",
                        vec![],
                    )
                    .await
                    .unwrap_or(Value::Bool(false));
                if loaded == Value::Bool(true) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no page loaded after clicking {css}");
        })
    }

    /// Runs a script in the page (what a person does without loading a page: opening a
    /// disclosure, picking a date).
    fn script(&self, js: &str) {
        self.runtime
            .block_on(self.client.execute(js, vec![]))
            .unwrap_or_else(|error| panic!("script {js}: {error}"));
    }

    fn session_cookie(&self) -> String {
        self.runtime
            .block_on(self.client.get_named_cookie("am_session"))
            .expect("the session cookie")
            .value()
            .to_string()
    }

    fn screenshot(&self, name: &str) {
        let png = self.runtime.block_on(self.client.screenshot()).unwrap();
        for dir in &self.shots {
            std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(client.close());
    }
}

fn web_searches(prefix: &str, count: usize) -> Value {
    let items: Vec<Value> = (0..count)
        .map(|index| json!({"event_id": format!("{prefix}-{index}"), "action_name": "web_search", "user_id": format!("user-{}", index % 2)}))
        .collect();
    json!({ "actions": items })
}

#[test]
fn a_new_builder_meters_an_agent_from_the_browser_and_sees_its_cost() {
    let console_port = free_port();
    let mut env = TestEnv::new(
        "console_browser",
        &format!("\n[console]\nlisten = \"127.0.0.1:{console_port}\"\n"),
    );
    let console = format!("http://127.0.0.1:{console_port}");
    env.apply_config(&metering_config(
        "ws_browser",
        &[("acc_seed", SEED_SECRET)],
        "",
    ));
    let output = env.tool(&[
        "admin-key",
        "new",
        "--workspace",
        "ws_browser",
        "--name",
        "builder",
    ]);
    let key = output
        .lines()
        .find(|line| line.starts_with("amk_"))
        .unwrap_or_else(|| panic!("no key in {output}"))
        .to_string();
    env.spawn("console", "console");
    env.spawn("ingest", "ingest");
    env.spawn("enrich", "enrich");
    env.spawn("aggregate", "aggregate");
    env.wait_http_ok(&format!("{console}/readyz"), Duration::from_secs(60));
    let driver = Driver::start();
    let browser = Browser::open(&driver, &console);

    // Logged out: every page leads to the login.
    browser.goto("/accounts");
    assert_eq!(browser.path(), "/login");
    browser.fill("#key", "amk_not-a-key");
    browser.click("main form button[type=submit]");
    assert!(
        browser
            .text(".notice.error")
            .contains("Unknown or revoked admin key"),
        "a wrong key says so"
    );
    browser.screenshot("01-login");
    browser.fill("#key", &key);
    browser.click("main form button[type=submit]");
    assert_eq!(
        browser.path(),
        "/metering/live-data",
        "{}",
        browser.text("body")
    );
    assert_eq!(
        browser.texts("nav.tabs a"),
        [
            "Live Data",
            "Action Tagging",
            "Cost Allocation",
            "Outcome Definitions"
        ]
    );
    assert!(browser.text("#live-data tbody").contains("No actions yet"));
    browser.screenshot("02-live-data-empty");

    // An account.
    browser.goto("/accounts");
    browser.fill("#account-form input[name=id]", "acc web");
    browser.fill("#account-form input[name=name]", "Web Corp");
    browser.click("#account-form button");
    let refused = browser.text(".notice.error");
    assert!(
        refused.contains("acc web"),
        "the refusal names the bad id: {refused}"
    );
    browser.screenshot("03-accounts-refused");
    browser.fill("#account-form input[name=id]", "acc_web");
    browser.fill("#account-form input[name=name]", "Web Corp");
    browser.fill("#account-form input[name=email]", "billing@web.example");
    browser.click("#account-form button");
    assert_eq!(browser.path(), "/accounts/acc_web");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    browser.screenshot("04-account-created");

    // An agent type and an instance: the secret is shown once, with the environment.
    browser.goto("/agents");
    browser.fill("#agent-type-form input[name=id]", "type_research");
    browser.fill("#agent-type-form input[name=name]", "Research Agent");
    browser.click("#agent-type-form button");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    browser.fill("#instance-form input[name=id]", "inst_web");
    browser.fill(
        "#instance-form input[name=name]",
        "Research agent of Web Corp",
    );
    browser.select("#instance-form select[name=agent_type]", "type_research");
    browser.select("#instance-form select[name=account]", "acc_web");
    browser.click("#instance-form button");
    let environment = browser.text("#agent-env");
    let secret = environment
        .lines()
        .find_map(|line| line.strip_prefix("export VALUE_AGENT_SECRET="))
        .unwrap_or_else(|| panic!("no secret in {environment}"))
        .to_string();
    assert!(
        environment.contains(&format!(
            "OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret={secret}"
        )),
        "{environment}"
    );
    browser.screenshot("05-agent-secret-shown-once");
    browser.goto("/agents");
    assert!(
        !browser.text("main").contains(&secret),
        "the secret is shown once, never again"
    );

    // Actions sent with the secret the console showed arrive in Live Data by themselves.
    browser.goto("/metering/live-data?account=acc_web");
    let http = HttpClient::new();
    let actions_url = format!("{}/v1/actions", env.ingest_url());
    env.wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || match post_status(&http, &actions_url, &secret, &web_searches("first", 4)) {
            202 => Ok(()),
            other => Err(format!("ingest answered {other} for the new secret")),
        },
    );
    env.wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let rows = browser.texts("#live-data tbody tr[data-event]");
        if rows.len() == 4
            && rows
                .iter()
                .all(|row| row.contains("web_search") && row.contains("inst_web"))
        {
            Ok(())
        } else {
            Err(format!("Live Data shows {rows:?}"))
        }
    });
    browser.screenshot("06-live-data");

    // Track web_search.
    browser.goto("/metering/tagging");
    assert_eq!(
        browser.attr("#track-web_search", "aria-pressed").as_deref(),
        Some("false")
    );
    browser.click("#track-web_search");
    assert_eq!(browser.path(), "/metering/tagging");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    assert_eq!(
        browser.attr("#track-web_search", "aria-pressed").as_deref(),
        Some("true")
    );
    browser.screenshot("07-action-tagging");

    // Give it a cost: a wrong amount is refused naming the field, then 0.005 per search.
    browser.goto("/metering/costs");
    browser.fill("#cost-form input[name=action]", "web_search");
    browser.select("#cost-form select[name=measure]", "unit");
    browser.fill("#cost-form input[name=cost_per_unit]", "half a cent");
    browser.click("#cost-form button");
    assert!(browser.text(".notice.error").contains("cost_per_unit"));
    assert!(
        browser.text("main").contains("No costs yet"),
        "a refused form changes nothing"
    );
    assert_eq!(
        browser
            .attr("#cost-form input[name=cost_per_unit]", "value")
            .as_deref(),
        Some("half a cent"),
        "the refused form keeps what was typed"
    );
    browser.fill("#cost-form input[name=cost_per_unit]", "0.005");
    browser.click("#cost-form button");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    assert!(browser.text("#costs").contains("0.005"));
    browser.screenshot("08-cost-allocation");
    browser.goto("/metering/outcomes");
    browser.screenshot("09-outcome-definitions");

    // The next actions carry the cost, in Live Data…
    browser.goto("/metering/live-data?account=acc_web");
    let mut batch = 0;
    env.wait_until(Duration::from_secs(60), Duration::from_millis(1000), || {
        batch += 1;
        assert_eq!(
            post_status(
                &http,
                &actions_url,
                &secret,
                &web_searches(&format!("priced-{batch}"), 2)
            ),
            202
        );
        let costs = browser.texts("#live-data tbody td.cost");
        if costs.iter().any(|cost| cost == "0.005 USD") {
            Ok(())
        } else {
            Err(format!("no priced action in Live Data yet: {costs:?}"))
        }
    });
    browser.screenshot("10-live-data-priced");

    // …and in the account's usage, equal to what ClickHouse stored.
    env.wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let stored = env.query(
            "SELECT count(), toString(sum(cost)) FROM actions FINAL \
             WHERE workspace_id = 'ws_browser' AND account_id = 'acc_web' AND tracked = 1",
        );
        let (count, cost) = (&stored[0][0], common::dec(&stored[0][1]).normalize());
        browser.goto("/accounts/acc_web");
        let usage = browser.texts("#usage tbody tr td");
        let total = browser.texts("#usage-total");
        let expected_total = format!("{cost} USD");
        if cost > rust_decimal::Decimal::ZERO
            && usage.len() == 6
            && usage[0] == "web_search"
            && usage[1] == "unit"
            && usage[2] == *count
            && usage[5] == expected_total
            && total == [expected_total.clone()]
        {
            Ok(())
        } else {
            Err(format!(
                "usage {usage:?} total {total:?}; stored {count} actions costing {expected_total}"
            ))
        }
    });
    assert_eq!(browser.text("#users-this-month"), "2", "user-0 and user-1");
    assert!(browser.text("#seats-today").starts_with('2'));
    browser.screenshot("11-account-usage");
    // Billing from the browser: a product (a fee typed as a number refused, naming the field,
    // with what was typed kept), a subscription of the account, and its end.
    browser.goto("/billing");
    browser.script("document.querySelector('#product-editor').open = true;");
    let product = |fee: &str| {
        format!(
            r#"{{"id": "prod_web", "name": "Web Agent", "agent_type": "type_research", "rate_plans": [{{"id": "basic", "name": "Basic", "currency": "USD", "billing_cycle": "monthly", "charges": [{{"id": "platform", "name": "Platform fee", "model": {{"flat": {{"fee": {fee}}}}}}}]}}]}}"#
        )
    };
    browser.fill("#product-form textarea[name=product]", &product("49.5"));
    browser.click("#product-form button");
    let refused = browser.text(".notice.error");
    assert!(refused.contains("product"), "{refused}");
    assert!(
        browser.text("#product-form textarea").contains("49.5"),
        "what was typed is kept"
    );
    browser.fill("#product-form textarea[name=product]", &product("\"49\""));
    browser.click("#product-form button");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    assert!(browser.text("#plans").contains("Web Agent"));
    browser.fill("#subscription-form input[name=id]", "sub_web");
    browser.select("#subscription-form select[name=account]", "acc_web");
    browser.select("#subscription-form select[name=plan]", "prod_web/basic");
    browser.script(
        "document.querySelector('#subscription-form input[name=start]').value = '2026-11-01';",
    );
    browser.click("#subscription-form button");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    let subscriptions = browser.text("#subscriptions");
    assert!(
        subscriptions.contains("sub_web")
            && subscriptions.contains("2026-11-01")
            && subscriptions.contains("open"),
        "{subscriptions}"
    );
    // An end before the start is refused, naming the field; a later one is kept.
    browser
        .script("document.querySelector('#subscriptions input[name=end]').value = '2026-10-01';");
    browser.click("#subscriptions form button");
    assert!(browser.text(".notice.error").contains("end"));
    browser
        .script("document.querySelector('#subscriptions input[name=end]').value = '2027-01-01';");
    browser.click("#subscriptions form button");
    assert_eq!(browser.text(".notice.saved"), "Saved");
    assert!(browser.text("#subscriptions").contains("2027-01-01"));
    let stored = env.tool(&["config", "export", "ws_browser"]);
    assert!(
        stored.contains("sub_web") && stored.contains("prod_web"),
        "the published configuration has them: {stored}"
    );
    for (path, name) in [
        ("/billing", "12-billing"),
        ("/profitability", "13-profitability"),
        ("/audit", "14-audit-log"),
    ] {
        browser.goto(path);
        assert_eq!(browser.path(), path);
        browser.screenshot(name);
    }
    assert!(
        browser.text("#audit").contains("key:"),
        "the audit log names the key"
    );

    // A form without the session's CSRF token is refused and changes nothing.
    let session = browser.session_cookie();
    let forged = http
        .post(format!("{console}/accounts"))
        .header("Cookie", format!("am_session={session}"))
        .form(&[
            ("csrf", "forged"),
            ("version", "1000"),
            ("id", "acc_forged"),
            ("name", "Forged"),
        ])
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);
    browser.goto("/accounts");
    assert!(!browser.text("main").contains("acc_forged"));

    // A login by password (made with the CLI, stored as an Argon2id hash): a wrong password is
    // refused like a wrong key, the right one opens the same workspace.
    const PASSWORD: &str = "correct horse battery staple";
    let made_login = env.run_tool_with_env(
        &[
            "admin-key",
            "new",
            "--workspace",
            "ws_browser",
            "--name",
            "Alice",
            "--login",
            "Alice@Web.example",
        ],
        &[("AGENTMETER_CONSOLE_PASSWORD", PASSWORD)],
    );
    assert!(
        made_login.0 && made_login.1.contains("console login alice@web.example"),
        "{made_login:?}"
    );
    let again = env.run_tool_with_env(
        &[
            "admin-key",
            "new",
            "--workspace",
            "ws_browser",
            "--name",
            "Alice 2",
            "--login",
            "alice@web.example",
        ],
        &[("AGENTMETER_CONSOLE_PASSWORD", PASSWORD)],
    );
    assert!(!again.0 && again.1.contains("already logs in"), "{again:?}");
    let short = env.run_tool_with_env(
        &[
            "admin-key",
            "new",
            "--workspace",
            "ws_browser",
            "--name",
            "Bob",
            "--login",
            "bob@web.example",
        ],
        &[("AGENTMETER_CONSOLE_PASSWORD", "short")],
    );
    assert!(!short.0 && short.1.contains("at least 12"), "{short:?}");
    browser.click("header form button");
    assert_eq!(browser.path(), "/login");
    browser.goto("/accounts");
    assert_eq!(browser.path(), "/login", "logged out");
    browser.fill("#workspace", "ws_browser");
    browser.fill("#login", "alice@web.example");
    browser.fill("#password", "correct horse battery stapler");
    browser.click("#password-form button");
    assert!(browser
        .text(".notice.error")
        .contains("wrong workspace, login or password"));
    browser.fill("#workspace", "ws_browser");
    browser.fill("#login", "alice@web.example");
    browser.fill("#password", PASSWORD);
    browser.screenshot("15-login-with-password");
    browser.click("#password-form button");
    assert_eq!(
        browser.path(),
        "/metering/live-data",
        "{}",
        browser.text("body")
    );
    assert!(browser.text("header .key").starts_with("Alice"));
    browser.goto("/accounts");
    assert!(
        browser.text("#accounts").contains("Web Corp"),
        "the same workspace"
    );

    // The cookie is HttpOnly and SameSite=Strict; failed logins are limited.
    let no_redirects = HttpClient::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = no_redirects
        .post(format!("{console}/login"))
        .form(&[("key", key.as_str())])
        .send()
        .unwrap();
    assert_eq!(login.status().as_u16(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let answer = no_redirects
            .post(format!("{console}/login"))
            .form(&[("key", "amk_guess")])
            .send()
            .unwrap();
        statuses.push(answer.status().as_u16());
    }
    // The browser's wrong key and wrong password above may still count in this minute: a few
    // 401s, then 429s.
    let refused_logins = statuses.iter().take_while(|status| **status == 401).count();
    assert!(
        (3..=5).contains(&refused_logins)
            && statuses[refused_logins..]
                .iter()
                .all(|status| *status == 429),
        "{statuses:?}"
    );
    let right_key_too_soon = no_redirects
        .post(format!("{console}/login"))
        .form(&[("key", key.as_str())])
        .send()
        .unwrap();
    assert_eq!(right_key_too_soon.status().as_u16(), 429);
    drop(browser);
    drop(driver);
}
