//! docker-compose.yml's settings exercised without Docker: every agentmeter service of the compose
//! file runs as a local process with exactly the command, settings file and `AGENTMETER__…`
//! environment the compose file gives it, the compose network's addresses mapped to the local
//! services — `kafka:29092` (a listener the kafka service advertises) → the local broker,
//! `http://clickhouse:8123` → the local ClickHouse, `0.0.0.0:PORT` listeners → free loopback
//! ports, container paths → what the service mounts there (a bind mount's file of this
//! repository, a named volume's directory in the test's directory). Added on top, and only for
//! keys the compose file does not set: this test's own topic prefix, database and consumer
//! groups, and loopback ports for the listeners the compose file leaves at the settings file's
//! fixed ports. Any other compose-network address or container path in a variable fails the test,
//! so a new variable cannot slip through unmapped. Inherited `AGENTMETER__…` variables of the test
//! process are removed from the stages' environment.
//!
//! The one-shots (`restart: "no"`: migrate, topics, config-apply) run to completion in their
//! `depends_on` order, then the long-running stages start; each must answer `/readyz`, and the
//! actions sent through ingest with the example's demo secret must be counted in ClickHouse with
//! the example's prices, their composite outcome derived by the outcomes stage.
//!
//! A second test feeds the Kubernetes settings file (deploy/kubernetes/base/agentmeter.toml) and
//! every literal `AGENTMETER__…` variable of every container in deploy/kubernetes/ to the binary,
//! which refuses unknown keys and malformed values (deploy/kubernetes/check.sh cannot know them).
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    brokers, clickhouse_query, dec, ensure_services, free_port, post_until_accepted, repo_root,
    BINARY,
};
use serde::Deserialize;
use serde_json::json;
use serde_yaml::Value;

/// ClickHouse's HTTP port inside the compose network (the clickhouse image's default).
const CLICKHOUSE_HTTP: &str = "http://clickhouse:8123";

fn local_clickhouse() -> String {
    let port = std::env::var("AGENTMETER_CLICKHOUSE_HTTP_PORT").unwrap_or_else(|_| "8123".into());
    format!("http://127.0.0.1:{port}")
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value.apply_merge().expect("merge keys");
    value
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// `environment:` as a mapping or as a list of `KEY=VALUE`.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(map) => map.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Value::Sequence(list) => list
            .iter()
            .map(|item| {
                let item = text(item);
                let (key, value) = item.split_once('=').unwrap_or((&item, ""));
                (key.to_string(), value.to_string())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
}

/// One agentmeter service of the compose file, translated to this machine.
struct LocalService {
    name: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    one_shot: bool,
    depends_on: Vec<String>,
}

/// Translates compose-network values to local ones.
struct Mapper {
    advertised_kafka: BTreeSet<String>,
    service_names: Vec<String>,
    volumes_dir: PathBuf,
}

impl Mapper {
    fn path(&self, service: &Value, service_name: &str, container_path: &str) -> String {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = text(volume);
            let mut parts = volume.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            let rest = match container_path.strip_prefix(target) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                _ => continue,
            };
            let base = if source.starts_with("./") || source.starts_with('/') {
                repo_root().join(source)
            } else {
                let dir = self.volumes_dir.join(source);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            };
            return format!("{}{rest}", base.display());
        }
        panic!("{service_name}: {container_path} is a container path no volume of the service provides");
    }

    fn value(&self, service: &Value, service_name: &str, key: &str, value: &str) -> String {
        if self.advertised_kafka.contains(value) {
            return brokers();
        }
        if let Some(rest) = value.strip_prefix(CLICKHOUSE_HTTP) {
            return format!("{}{rest}", local_clickhouse());
        }
        if value
            .strip_prefix("0.0.0.0:")
            .is_some_and(|port| port.parse::<u16>().is_ok())
        {
            return format!("127.0.0.1:{}", free_port());
        }
        if value.starts_with('/') {
            return self.path(service, service_name, value);
        }
        for host in &self.service_names {
            assert!(
                !value.contains(&format!("{host}:")) && !value.contains(&format!("//{host}")),
                "{service_name}: {key}={value} names the compose service {host}, which this test does not map"
            );
        }
        value.to_string()
    }
}

/// The agentmeter services of docker-compose.yml (image `agentmeter:…`), translated.
fn compose_services(volumes_dir: &Path) -> Vec<LocalService> {
    let compose = read_yaml(&repo_root().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    let kafka_env = environment(&compose["services"]["kafka"]);
    let advertised_kafka: BTreeSet<String> = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .map(|listener| {
            listener
                .split_once("://")
                .map_or(listener, |(_, address)| address)
                .to_string()
        })
        .collect();
    let mapper = Mapper {
        advertised_kafka,
        service_names: services.keys().map(text).collect(),
        volumes_dir: volumes_dir.to_path_buf(),
    };
    let mut local = Vec::new();
    for (name, service) in services {
        let name = text(name);
        let image = service["image"].as_str().unwrap_or_default();
        if image.split(':').next() != Some("agentmeter") {
            continue;
        }
        let args: Vec<String> = service["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: command is not a list"))
            .iter()
            .map(|arg| {
                let arg = text(arg);
                if arg.starts_with('/') {
                    mapper.path(service, &name, &arg)
                } else {
                    arg
                }
            })
            .collect();
        assert_eq!(
            args[0], "--config",
            "{name}: the command starts with --config FILE"
        );
        let env: BTreeMap<String, String> = environment(service)
            .into_iter()
            .map(|(key, value)| {
                let mapped = mapper.value(service, &name, &key, &value);
                (key, mapped)
            })
            .collect();
        assert!(
            env.keys().all(|key| key.starts_with("AGENTMETER__")),
            "{name}: a variable the stages do not read: {:?}",
            env.keys().collect::<Vec<_>>()
        );
        let depends_on = match &service["depends_on"] {
            Value::Mapping(map) => map.keys().map(text).collect(),
            Value::Sequence(list) => list.iter().map(text).collect(),
            _ => Vec::new(),
        };
        local.push(LocalService {
            one_shot: service["restart"].as_str() == Some("no"),
            name,
            args,
            env,
            depends_on,
        });
    }
    local
}

/// What only isolates this test: set for keys the compose file leaves alone, refused for keys it
/// sets (the test would then share the real names or ports).
fn isolate(service: &mut LocalService, run: &agentmeter_testkit::settings::RunSettings) {
    let mut extra = vec![
        (
            "AGENTMETER__KAFKA__TOPIC_PREFIX".to_string(),
            run.topic_prefix.clone(),
        ),
        (
            "AGENTMETER__CLICKHOUSE__DATABASE".to_string(),
            run.database.clone(),
        ),
        (
            "AGENTMETER__ENRICHER__GROUP_ID".to_string(),
            format!("{}enricher", run.topic_prefix),
        ),
        (
            "AGENTMETER__AGGREGATOR__GROUP_ID".to_string(),
            format!("{}aggregator", run.topic_prefix),
        ),
    ];
    for (name, value) in &extra {
        assert!(
            !service.env.contains_key(name),
            "{}: the compose file sets {name}, which this test needs for its isolation ({value})",
            service.name
        );
    }
    // Listeners the compose file does not set stay at the settings file's (or the default)
    // fixed loopback ports: give them free ones.
    for key in [
        "INGEST__HTTP_LISTEN",
        "INGEST__OTLP_GRPC_LISTEN",
        "INGEST__OTLP_HTTP_LISTEN",
        "ENRICHER__METRICS_LISTEN",
        "AGGREGATOR__METRICS_LISTEN",
        "BILLING__METRICS_LISTEN",
        "OUTCOMES__METRICS_LISTEN",
    ] {
        let name = format!("AGENTMETER__{key}");
        if !service.env.contains_key(&name) {
            extra.push((name, format!("127.0.0.1:{}", free_port())));
        }
    }
    service.env.extend(extra);
}

fn command(service: &LocalService, log: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command.args(&service.args);
    for (name, _) in std::env::vars() {
        if name.starts_with("AGENTMETER__") {
            command.env_remove(name);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    command
        .envs(&service.env)
        .env("RUST_LOG", agentmeter_testkit::process::STAGE_LOG_FILTER)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    command
}

/// The test's processes and database, cleaned up when it ends (its topics stay: nothing of ours
/// deletes topics on a broker that may delete them all).
struct Run {
    dir: PathBuf,
    database: String,
    children: Vec<(String, Child)>,
}

impl Run {
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let log = self.dir.join(format!("{name}.log"));
                format!(
                    "--- {name} (last lines) ---\n{}",
                    agentmeter_testkit::settings::tail(&log, 30)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<(), String>,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            match check() {
                Ok(()) => return,
                Err(last) if Instant::now() >= deadline => {
                    panic!("{what}: {last} after {timeout:?}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn count(&self, sql: &str) -> String {
        clickhouse_query(&self.database, sql)
            .first()
            .map(|row| row[0].clone())
            .unwrap_or_default()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("compose_env failed; logs kept in {}", self.dir.display());
        } else {
            let _ = clickhouse_query(
                "default",
                &format!("DROP DATABASE IF EXISTS {}", self.database),
            );
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The demo secret of the example configuration's Acme agent (deploy/local/demo-secrets.env).
fn demo_secret() -> String {
    let text = std::fs::read_to_string(repo_root().join("deploy/local/demo-secrets.env")).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("ACME_AGENT_SECRET="))
        .expect("ACME_AGENT_SECRET in deploy/local/demo-secrets.env")
        .trim()
        .to_string()
}

#[test]
fn the_compose_services_run_with_the_compose_environment_and_count_actions() {
    ensure_services();
    let started = Instant::now();
    let isolated = agentmeter_testkit::settings::IsolatedRun::new(
        "test",
        "compose_env",
        brokers(),
        local_clickhouse(),
    )
    .expect("the test's directory");
    let mut run = Run {
        dir: isolated.dir.clone(),
        database: isolated.settings.database.clone(),
        children: Vec::new(),
    };
    let mut services = compose_services(&isolated.dir.join("volumes"));
    for service in &mut services {
        isolate(service, &isolated.settings);
    }
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "migrate",
        "topics",
        "config-apply",
        "ingest",
        "enrich",
        "aggregate",
        "billing",
        "outcomes",
    ] {
        assert!(
            names.contains(expected),
            "docker-compose.yml has no agentmeter service {expected}: {names:?}"
        );
    }

    // The one-shots, each after the one-shots it depends on.
    let mut done: BTreeSet<String> = BTreeSet::new();
    while let Some(service) = services.iter().find(|s| {
        s.one_shot
            && !done.contains(&s.name)
            && s.depends_on
                .iter()
                .all(|d| done.contains(d) || !names.contains(d.as_str()))
    }) {
        let log = run.dir.join(format!("{}.log", service.name));
        let status = command(service, &log).status().expect("run agentmeter");
        assert!(
            status.success(),
            "compose one-shot {} ({:?}) failed:\n{}",
            service.name,
            service.args,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        done.insert(service.name.clone());
    }
    let one_shots = services.iter().filter(|s| s.one_shot).count();
    assert_eq!(
        done.len(),
        one_shots,
        "one-shots whose depends_on never completes: {done:?}"
    );

    // The stages, then each one's /readyz on the listener the compose environment gave it.
    let mut readyz = Vec::new();
    for service in services.iter().filter(|s| !s.one_shot) {
        let log = run.dir.join(format!("{}.log", service.name));
        let child = command(service, &log).spawn().expect("spawn agentmeter");
        run.children.push((service.name.clone(), child));
        let section = match service.args.last().map(String::as_str) {
            Some("ingest")
                if service
                    .env
                    .contains_key("AGENTMETER__INGEST__OPERATIONS_LISTEN") =>
            {
                "INGEST__OPERATIONS_LISTEN"
            }
            Some("ingest") => "INGEST__HTTP_LISTEN",
            Some("enrich") => "ENRICHER__METRICS_LISTEN",
            Some("aggregate") => "AGGREGATOR__METRICS_LISTEN",
            Some("billing") => "BILLING__METRICS_LISTEN",
            Some("outcomes") => "OUTCOMES__METRICS_LISTEN",
            other => panic!("{}: unknown stage {other:?}", service.name),
        };
        let listen = &service.env[&format!("AGENTMETER__{section}")];
        readyz.push((service.name.clone(), format!("http://{listen}/readyz")));
    }
    let client = reqwest::blocking::Client::new();
    // Ready, each on the listener the compose environment gave it; a stage that exits (a setting
    // it refuses, say) fails the test at once with its log.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut waiting: Vec<(String, String)> = readyz;
    while !waiting.is_empty() {
        for (name, child) in &mut run.children {
            if let Some(status) = child.try_wait().unwrap() {
                let log = run.dir.join(format!("{name}.log"));
                panic!(
                    "compose service {name} exited ({status}) with the compose environment:\n{}",
                    agentmeter_testkit::settings::tail(&log, 30)
                );
            }
        }
        waiting.retain(|(_, url)| {
            !client
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .is_ok_and(|response| response.status().is_success())
        });
        assert!(
            Instant::now() < deadline || waiting.is_empty(),
            "not ready after 40 s: {waiting:?}\n{}",
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Two research sessions of one user (web_search, llm_call, delivery, in order): six actions,
    // and two firings of the example's composite outcome research_completed.
    let ingest = services.iter().find(|s| s.name == "ingest").unwrap();
    let url = format!(
        "http://{}/v1/actions",
        ingest.env["AGENTMETER__INGEST__HTTP_LISTEN"]
    );
    let now = time::OffsetDateTime::now_utc();
    let actions: Vec<serde_json::Value> = (0..6)
        .map(|index| {
            let occurred_at = (now - time::Duration::seconds(60 - index * 5))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let (name, attributes) = match index % 3 {
                0 => ("web_search", json!({"query": "compose"})),
                1 => ("llm_call", json!({"model": "gpt-4", "input_tokens": 700, "output_tokens": 300})),
                _ => ("delivery", json!({"delivery_method": "email"})),
            };
            json!({"event_id": format!("compose-{index}"), "action_name": name, "user_id": "user_compose",
                   "occurred_at": occurred_at, "attributes": attributes})
        })
        .collect();
    post_until_accepted(
        &client,
        &url,
        &demo_secret(),
        &json!({ "actions": actions }),
        Duration::from_secs(30),
        Duration::from_millis(200),
    );

    run.wait_until("the actions in ClickHouse", Duration::from_secs(30), || {
        let stored = run.count("SELECT count() FROM actions FINAL WHERE kind = 'action'");
        let counted = run.count("SELECT sum(action_count) FROM usage_exact WHERE action_name IN ('web_search', 'llm_call', 'delivery')");
        if stored == "6" && counted == "6" {
            Ok(())
        } else {
            Err(format!("actions {stored}, usage {counted}, expected 6 and 6"))
        }
    });
    // The example's prices: web_search 0.005 per unit; llm_call 0.00003 per token since 2026.
    let costs: BTreeMap<String, (String, String)> = clickhouse_query(
        &run.database,
        "SELECT action_name, toString(sum(quantity)), toString(sum(cost)) FROM usage_exact \
         WHERE action_name IN ('web_search', 'llm_call') GROUP BY action_name",
    )
    .into_iter()
    .map(|row| (row[0].clone(), (row[1].clone(), row[2].clone())))
    .collect();
    assert_eq!(dec(&costs["web_search"].1), dec("0.01"), "{costs:?}");
    assert_eq!(dec(&costs["llm_call"].0), dec("2000"), "{costs:?}");
    assert_eq!(dec(&costs["llm_call"].1), dec("0.06"), "{costs:?}");
    run.wait_until("the composite outcomes derived", Duration::from_secs(30), || {
        let firings = run.count(
            "SELECT count() FROM actions FINAL WHERE kind = 'derived_outcome' AND action_name = 'research_completed'",
        );
        (firings == "2").then_some(()).ok_or(format!("{firings} firings of research_completed, expected 2"))
    });
    for (name, child) in &mut run.children {
        assert!(child.try_wait().unwrap().is_none(), "{name} exited\n");
    }
    eprintln!(
        "compose_env: {} services from docker-compose.yml, all checks in {:.1?}",
        services.len(),
        started.elapsed()
    );
}

/// Every container's literal `AGENTMETER__…` variables in a YAML tree (manifests and patches).
fn container_envs(node: &Value, found: &mut Vec<(String, Vec<(String, String)>)>) {
    match node {
        Value::Mapping(map) => {
            for key in ["containers", "initContainers"] {
                for container in node[key].as_sequence().into_iter().flatten() {
                    let env = container["env"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .filter_map(|entry| {
                            Some((text(&entry["name"]), entry["value"].as_str()?.to_string()))
                        })
                        .collect();
                    found.push((text(&container["name"]), env));
                }
            }
            for value in map.values() {
                container_envs(value, found);
            }
        }
        Value::Sequence(list) => list.iter().for_each(|value| container_envs(value, found)),
        _ => {}
    }
}

#[test]
fn the_kubernetes_settings_file_and_every_manifest_variable_are_accepted_by_the_binary() {
    let kubernetes = repo_root().join("deploy/kubernetes");
    let settings = kubernetes.join("base/agentmeter.toml");
    let mut files = Vec::new();
    let mut pending = vec![kubernetes.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && !path.ends_with("kustomization.yaml")
            {
                files.push(path);
            }
        }
    }
    let mut containers = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let mut found = Vec::new();
            container_envs(&value, &mut found);
            containers.extend(
                found
                    .into_iter()
                    .map(|(name, env)| (file.clone(), name, env)),
            );
        }
    }
    assert!(
        containers.len() >= 8,
        "too few containers found in {}: {}",
        kubernetes.display(),
        containers.len()
    );
    for (file, container, env) in &containers {
        let mut command = Command::new(BINARY);
        for (name, _) in std::env::vars() {
            if name.starts_with("AGENTMETER__") {
                command.env_remove(name);
            }
        }
        // `secret new` needs no service: the settings are loaded (and checked) first.
        let output = command
            .arg("--config")
            .arg(&settings)
            .args(["secret", "new"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} container {container}: the settings file with {env:?} is refused:\n{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
