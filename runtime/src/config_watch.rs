//! Follows the log-compacted config topic and publishes immutable [`MeteringState`] snapshots.
//!
//! The topic holds one record per workspace (key = workspace id, value = a JSON
//! [`ConfigRecord`]); the latest record of a key wins and an empty value deletes the workspace.
//! A blocking thread reads it from the beginning with a group-less consumer, and after each poll
//! that changed something swaps in a whole new [`MeteringState`] through `arc-swap`: readers on
//! hot paths load an `Arc` without locking and never see a half-applied configuration.
//! A record that fails to parse or validate is logged and counted, and the workspace keeps its
//! previous version.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmeter_schemas::metering::secret_digest;
use agentmeter_schemas::metering::{AdminKey, AgentInstance, CONFIG_RECORD_FORMAT};
use agentmeter_schemas::{ConfigRecord, WorkspaceSnapshot};
use anyhow::Context;

use crate::telemetry::{emit, ConfigRecordRejected, ConfigStatePublished};
use arc_swap::ArcSwap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::kafka::KafkaSettings;
use crate::shutdown::Shutdown;

/// Every workspace's current configuration, compiled; immutable once published.
#[derive(Debug, Default)]
pub struct MeteringState {
    workspaces: HashMap<String, Arc<WorkspaceSnapshot>>,
    /// SHA-256 of a secret → the workspace it authenticates for.
    workspace_by_secret_digest: HashMap<[u8; 32], String>,
    /// Secrets configured in more than one workspace (each kept by its first owner).
    secret_conflicts: usize,
    /// SHA-256 of a control-plane API key → its workspace and the key (active or revoked).
    admin_keys_by_digest: HashMap<[u8; 32], (String, AdminKey)>,
    /// (workspace id, login name) → the password login (active or revoked).
    password_logins: HashMap<(String, String), AdminKey>,
    /// (workspace id, key id) → every key and login above that authenticates for that
    /// workspace: what a console session re-checks on each request.
    admin_keys_by_id: HashMap<(String, String), AdminKey>,
}

impl MeteringState {
    /// Compiles the latest record of each workspace.
    ///
    /// `config apply` refuses a secret another workspace uses, but two applies racing (or a
    /// record written by other means) could still put one secret in two workspaces. Then the
    /// workspace that has had it longest keeps it ([`ConfigRecord::secret_since`], carried in
    /// every record, so the answer survives compaction and is the same in every process); the
    /// later claim is refused and logged. Refusing it in both would let any tenant lock another
    /// tenant's agent out by copying its hash.
    pub fn build(
        records: &HashMap<String, (ConfigRecord, Arc<WorkspaceSnapshot>)>,
    ) -> MeteringState {
        let mut workspaces = HashMap::new();
        // digest → (since, workspace id) of its current owner.
        let mut owners: HashMap<[u8; 32], (time::OffsetDateTime, &str)> = HashMap::new();
        let mut conflicts = std::collections::HashSet::new();
        let mut admin_keys_by_digest = HashMap::new();
        let mut password_logins = HashMap::new();
        for (workspace_id, (record, snapshot)) in records {
            workspaces.insert(workspace_id.clone(), snapshot.clone());
            for key in &record.admin_keys {
                if let (Some(login), Some(_)) = (&key.login, &key.password_phc) {
                    // An active login wins over revoked ones of the same name.
                    let slot = (workspace_id.clone(), login.clone());
                    let replace = password_logins
                        .get(&slot)
                        .is_none_or(|kept: &AdminKey| kept.revoked_at.is_some());
                    if replace {
                        password_logins.insert(slot, key.clone());
                    }
                    continue;
                }
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(&key.key_sha256, &mut digest).is_ok() {
                    // A digest is of 32 random bytes, so two workspaces never share one; should a
                    // record claim another's anyway, the key authenticates for neither.
                    if admin_keys_by_digest
                        .insert(digest, (workspace_id.clone(), key.clone()))
                        .is_some_and(|(other, _)| other != *workspace_id)
                    {
                        admin_keys_by_digest.insert(digest, (String::new(), key.clone()));
                    }
                }
            }
            for (digest, instance_id) in snapshot.secret_digests() {
                let since = record.secret_since(&hex::encode(digest));
                let claim = (since, workspace_id.as_str());
                match owners.entry(*digest) {
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        entry.insert(claim);
                    }
                    std::collections::hash_map::Entry::Occupied(mut entry) => {
                        conflicts.insert(*digest);
                        let (kept, refused) = if claim < *entry.get() {
                            (claim, *entry.get())
                        } else {
                            (*entry.get(), claim)
                        };
                        entry.insert(kept);
                        tracing::error!(
                            kept_by = %kept.1, refused_for = %refused.1, instance = %instance_id,
                            "an agent secret is configured in two workspaces; the workspace that had it first keeps it"
                        );
                    }
                }
            }
        }
        let admin_keys_by_id = admin_keys_by_digest
            .values()
            .filter(|(owner, _)| !owner.is_empty())
            .map(|(owner, key)| ((owner.clone(), key.id.clone()), key.clone()))
            .chain(
                password_logins
                    .iter()
                    .map(|((owner, _), key)| ((owner.clone(), key.id.clone()), key.clone())),
            )
            .collect();
        MeteringState {
            workspaces,
            workspace_by_secret_digest: owners
                .into_iter()
                .map(|(digest, (_, workspace_id))| (digest, workspace_id.to_string()))
                .collect(),
            secret_conflicts: conflicts.len(),
            admin_keys_by_digest,
            password_logins,
            admin_keys_by_id,
        }
    }

    /// The workspace and its admin key `key_id`, while the key is not revoked (a console
    /// session re-checks its key with this on every request).
    pub fn admin_key(
        &self,
        workspace_id: &str,
        key_id: &str,
        now: time::OffsetDateTime,
    ) -> Option<(Arc<WorkspaceSnapshot>, AdminKey)> {
        let snapshot = self.workspaces.get(workspace_id)?;
        self.admin_keys_by_id
            .get(&(workspace_id.to_string(), key_id.to_string()))
            .filter(|key| key.is_active(now))
            .map(|key| (snapshot.clone(), key.clone()))
    }

    /// The workspace and the active password login `login` of it — for the caller to check the
    /// password against its `password_phc`.
    pub fn password_login(
        &self,
        workspace_id: &str,
        login: &str,
        now: time::OffsetDateTime,
    ) -> Option<(Arc<WorkspaceSnapshot>, AdminKey)> {
        let snapshot = self.workspaces.get(workspace_id)?;
        self.password_logins
            .get(&(workspace_id.to_string(), login.to_string()))
            .filter(|key| key.is_active(now))
            .map(|key| (snapshot.clone(), key.clone()))
    }

    /// The workspace and key a control-plane API key belongs to, while it is not revoked.
    pub fn authenticate_admin(
        &self,
        key: &str,
        now: time::OffsetDateTime,
    ) -> Option<(Arc<WorkspaceSnapshot>, AdminKey)> {
        use subtle::ConstantTimeEq;
        let digest = secret_digest(key);
        let (workspace_id, admin_key) = self.admin_keys_by_digest.get(&digest)?;
        let mut stored = [0u8; 32];
        hex::decode_to_slice(&admin_key.key_sha256, &mut stored).ok()?;
        if !bool::from(stored.ct_eq(&digest)) || !admin_key.is_active(now) {
            return None;
        }
        let snapshot = self.workspaces.get(workspace_id)?;
        Some((snapshot.clone(), admin_key.clone()))
    }

    /// Secrets configured in more than one workspace.
    pub fn secret_conflicts(&self) -> usize {
        self.secret_conflicts
    }

    /// A state holding exactly these snapshots (tests and tools).
    pub fn from_snapshots(snapshots: impl IntoIterator<Item = WorkspaceSnapshot>) -> MeteringState {
        let records = snapshots
            .into_iter()
            .map(|snapshot| {
                let record = ConfigRecord {
                    format: CONFIG_RECORD_FORMAT,
                    version: snapshot.version,
                    applied_at: time::OffsetDateTime::UNIX_EPOCH,
                    config: snapshot.config.clone(),
                    secrets_since: Default::default(),
                    admin_keys: Vec::new(),
                    change: None,
                };
                (
                    snapshot.workspace_id().to_string(),
                    (record, Arc::new(snapshot)),
                )
            })
            .collect();
        MeteringState::build(&records)
    }

    pub fn workspace(&self, workspace_id: &str) -> Option<&Arc<WorkspaceSnapshot>> {
        self.workspaces.get(workspace_id)
    }

    pub fn workspace_count(&self) -> usize {
        self.workspaces.len()
    }

    /// Every workspace's snapshot, in no particular order.
    pub fn workspaces(&self) -> impl Iterator<Item = &Arc<WorkspaceSnapshot>> {
        self.workspaces.values()
    }

    /// The workspace and agent instance an agent secret belongs to.
    pub fn authenticate(&self, secret: &str) -> Option<(Arc<WorkspaceSnapshot>, AgentInstance)> {
        let workspace_id = self
            .workspace_by_secret_digest
            .get(&secret_digest(secret))?;
        let snapshot = self.workspaces.get(workspace_id)?;
        let instance = snapshot.authenticate(secret)?.clone();
        Some((snapshot.clone(), instance))
    }
}

/// The shared, swappable metering state and whether it has caught up with the topic.
#[derive(Clone)]
pub struct ConfigHandle {
    state: Arc<ArcSwap<MeteringState>>,
    caught_up: watch::Receiver<bool>,
}

impl ConfigHandle {
    /// A handle over a fixed state (tests).
    pub fn fixed(state: MeteringState) -> ConfigHandle {
        let (_, caught_up) = watch::channel(true);
        ConfigHandle {
            state: Arc::new(ArcSwap::from_pointee(state)),
            caught_up,
        }
    }

    /// The current state; cheap, lock-free.
    pub fn load(&self) -> Arc<MeteringState> {
        self.state.load_full()
    }

    /// True once everything that was on the topic at start has been read.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until caught up however long the broker takes (a broker not there yet is an
    /// outage to wait out), saying so once a minute; false when shutdown came first.
    pub async fn wait_until_loaded(&mut self, mut shutdown: Shutdown) -> bool {
        loop {
            tokio::select! {
                _ = shutdown.requested() => return false,
                loaded = self.wait_caught_up(Duration::from_secs(60)) => match loaded {
                    Ok(()) => return true,
                    Err(error) => tracing::warn!(
                        error = %format!("{error:#}"),
                        "metering configuration not loaded yet; still waiting"
                    ),
                },
            }
        }
    }

    /// Waits until caught up, or fails after `timeout`.
    pub async fn wait_caught_up(&mut self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.caught_up.wait_for(|caught_up| *caught_up))
            .await
            .context("timed out reading the config topic")?
            .context("config watcher stopped")?;
        Ok(())
    }
}

/// Starts following the config topic on a blocking thread.
pub fn spawn_config_watcher(
    kafka: &KafkaSettings,
    shutdown: Shutdown,
) -> anyhow::Result<ConfigHandle> {
    let topic = kafka.topics().config;
    let consumer: BaseConsumer = kafka
        .standalone_consumer_config()
        .create()
        .context("cannot create the config topic consumer")?;
    let state = Arc::new(ArcSwap::from_pointee(MeteringState::default()));
    let (caught_up_sender, caught_up) = watch::channel(false);
    let published = state.clone();
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut reader = ConfigTopicReader::new(consumer, topic);
            let mut announced = false;
            while !shutdown.is_requested() {
                match reader.poll_once(Duration::from_millis(200)) {
                    Ok(changed) => {
                        if changed {
                            let next = MeteringState::build(&reader.records);
                            emit(ConfigStatePublished {
                                workspaces: next.workspace_count(),
                                secret_conflicts: next.secret_conflicts(),
                            });
                            published.store(Arc::new(next));
                        }
                        if !announced && reader.caught_up {
                            announced = true;
                            tracing::info!(workspaces = reader.records.len(), "metering configuration loaded");
                            let _ = caught_up_sender.send(true);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "config topic not readable yet; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .context("cannot start the config watcher thread")?;
    Ok(ConfigHandle { state, caught_up })
}

/// Reads the whole config topic once, up to its end at call time (`config apply`, `config show`).
pub fn read_config_topic(
    kafka: &KafkaSettings,
    timeout: Duration,
) -> anyhow::Result<HashMap<String, (ConfigRecord, Arc<WorkspaceSnapshot>)>> {
    let consumer: BaseConsumer = kafka
        .standalone_consumer_config()
        .create()
        .context("cannot create the config topic consumer")?;
    let mut reader = ConfigTopicReader::new(consumer, kafka.topics().config);
    let deadline = Instant::now() + timeout;
    while !reader.caught_up {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out reading config topic {} at {}",
            kafka.topics().config,
            kafka.brokers
        );
        reader.poll_once(Duration::from_millis(200))?;
    }
    Ok(reader.records)
}

struct ConfigTopicReader {
    consumer: BaseConsumer,
    topic: String,
    /// High watermark per partition when reading started; `None` until assigned.
    end_at_start: Option<HashMap<i32, i64>>,
    caught_up: bool,
    records: HashMap<String, (ConfigRecord, Arc<WorkspaceSnapshot>)>,
}

impl ConfigTopicReader {
    fn new(consumer: BaseConsumer, topic: String) -> ConfigTopicReader {
        ConfigTopicReader {
            consumer,
            topic,
            end_at_start: None,
            caught_up: false,
            records: HashMap::new(),
        }
    }

    fn assign(&mut self) -> anyhow::Result<()> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(5))
            .with_context(|| format!("cannot read metadata of {}", self.topic))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|topic| topic.name() == self.topic && topic.error().is_none())
            .flat_map(|topic| topic.partitions().iter().map(|partition| partition.id()))
            .collect();
        anyhow::ensure!(
            !partitions.is_empty(),
            "config topic {} does not exist (run `agentmeter topics`)",
            self.topic
        );
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for partition in partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
                .with_context(|| format!("cannot read watermarks of {}/{partition}", self.topic))?;
            ends.insert(partition, high);
            assignment.add_partition_offset(&self.topic, partition, Offset::Beginning)?;
        }
        self.consumer.assign(&assignment)?;
        self.end_at_start = Some(ends);
        Ok(())
    }

    /// Reads what is available; true when the set of configurations changed.
    fn poll_once(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        if self.end_at_start.is_none() {
            self.assign()?;
        }
        let mut changed = false;
        let mut next_offsets: HashMap<i32, i64> = HashMap::new();
        let mut wait = timeout;
        while let Some(result) = self.consumer.poll(wait) {
            wait = Duration::ZERO;
            let message = result.context("config topic read failed")?;
            next_offsets.insert(message.partition(), message.offset() + 1);
            let Some(key) = message.key().and_then(|key| std::str::from_utf8(key).ok()) else {
                emit(ConfigRecordRejected {
                    workspace: None,
                    offset: message.offset(),
                    error: String::new(),
                });
                continue;
            };
            match message.payload() {
                None | Some([]) => {
                    changed |= self.records.remove(key).is_some();
                }
                Some(payload) => match parse_config_record(key, payload) {
                    Ok(entry) => {
                        self.records.insert(key.to_string(), entry);
                        changed = true;
                    }
                    Err(error) => {
                        emit(ConfigRecordRejected {
                            workspace: Some(key),
                            offset: message.offset(),
                            error: format!("{error:#}"),
                        });
                    }
                },
            }
        }
        if !self.caught_up {
            let ends = self.end_at_start.as_ref().expect("assigned above");
            let positions = self.consumer.position()?;
            self.caught_up = ends.iter().all(|(partition, end)| {
                *end == 0
                    || next_offsets.get(partition).is_some_and(|next| next >= end)
                    || positions
                        .find_partition(&self.topic, *partition)
                        .and_then(|element| match element.offset() {
                            Offset::Offset(offset) => Some(offset >= *end),
                            _ => None,
                        })
                        .unwrap_or(false)
            });
        }
        Ok(changed)
    }
}

fn parse_config_record(
    key: &str,
    payload: &[u8],
) -> anyhow::Result<(ConfigRecord, Arc<WorkspaceSnapshot>)> {
    let record: ConfigRecord =
        serde_json::from_slice(payload).context("not a JSON config record")?;
    anyhow::ensure!(
        record.format == CONFIG_RECORD_FORMAT,
        "config record format {} is not supported (this build reads {CONFIG_RECORD_FORMAT})",
        record.format
    );
    anyhow::ensure!(
        record.config.workspace.id == key,
        "record key {key:?} differs from workspace.id {:?}",
        record.config.workspace.id
    );
    let mut snapshot = WorkspaceSnapshot::build(record.version, record.config.clone())?;
    snapshot.applied_at = record.applied_at;
    snapshot.change = record.change.clone();
    Ok((record, Arc::new(snapshot)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmeter_schemas::metering::{hash_secret, AdminKey};
    use agentmeter_schemas::MeteringConfig;

    fn config(workspace: &str, secret: &str) -> MeteringConfig {
        MeteringConfig::from_toml(&format!(
            r#"
            [workspace]
            id = "{workspace}"
            name = "{workspace}"
            currency = "USD"
            [[accounts]]
            id = "acc"
            name = "Account"
            [[agent_types]]
            id = "type"
            name = "Type"
            [[agent_instances]]
            id = "agent_of_{workspace}"
            name = "Agent"
            agent_type = "type"
            account = "acc"
            secret_sha256 = "{}"
            "#,
            hash_secret(secret)
        ))
        .unwrap()
    }

    fn records(
        entries: &[(&str, &str, i64)],
    ) -> HashMap<String, (ConfigRecord, Arc<WorkspaceSnapshot>)> {
        entries
            .iter()
            .map(|(workspace, secret, day)| {
                let applied_at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(*day);
                let record = ConfigRecord::next(None, config(workspace, secret), applied_at);
                let snapshot = WorkspaceSnapshot::build(1, record.config.clone()).unwrap();
                (workspace.to_string(), (record, Arc::new(snapshot)))
            })
            .collect()
    }

    #[test]
    fn a_copied_secret_stays_with_the_workspace_that_had_it_first() {
        // The victim had the secret on day 100; the copy appears on day 200. Whatever the order
        // of the map, the victim's agent keeps working and the copy authenticates nothing.
        for entries in [
            [("victim", "s3cret", 100), ("copycat", "s3cret", 200)],
            [("copycat", "s3cret", 200), ("victim", "s3cret", 100)],
        ] {
            let state = MeteringState::build(&records(&entries));
            let (workspace, instance) = state.authenticate("s3cret").unwrap();
            assert_eq!(workspace.workspace_id(), "victim");
            assert_eq!(instance.id, "agent_of_victim");
            assert_eq!(state.secret_conflicts(), 1);
        }
        let state = MeteringState::build(&records(&[("a", "one", 1), ("b", "two", 1)]));
        assert_eq!(state.secret_conflicts(), 0);
        assert_eq!(state.authenticate("two").unwrap().0.workspace_id(), "b");
    }

    #[test]
    fn a_tie_is_broken_the_same_way_in_every_process() {
        let state = MeteringState::build(&records(&[("zeta", "same", 5), ("alpha", "same", 5)]));
        assert_eq!(
            state.authenticate("same").unwrap().0.workspace_id(),
            "alpha"
        );
    }

    fn login(id: &str, login: &str, revoked_at: Option<time::OffsetDateTime>) -> AdminKey {
        AdminKey {
            id: id.to_string(),
            name: id.to_string(),
            role: agentmeter_schemas::metering::AdminRole::Admin,
            key_sha256: String::new(),
            login: Some(login.to_string()),
            password_phc: Some(format!("$argon2id$stand-in-for-{id}")),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            revoked_at,
        }
    }

    #[test]
    fn a_password_login_is_found_in_its_own_workspace_only_and_not_once_revoked() {
        let mut entries = records(&[("alpha", "one", 1), ("beta", "two", 1)]);
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(10);
        let revoked = Some(time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(5));
        let alpha = &mut entries.get_mut("alpha").unwrap().0;
        // The revoked login of the same name comes after the active one: the active one wins.
        alpha.admin_keys = vec![
            login("key_new", "ann@example.com", None),
            login("key_old", "ann@example.com", revoked),
        ];
        let state = MeteringState::build(&entries);
        let (workspace, found) = state
            .password_login("alpha", "ann@example.com", now)
            .unwrap();
        assert_eq!(
            (workspace.workspace_id(), found.id.as_str()),
            ("alpha", "key_new")
        );
        assert!(state
            .password_login("beta", "ann@example.com", now)
            .is_none());
        assert!(state
            .password_login("alpha", "bob@example.com", now)
            .is_none());
        // A session re-checks its login by id; a login is never an API key.
        assert!(state.admin_key("alpha", "key_new", now).is_some());
        assert!(state.admin_key("alpha", "key_old", now).is_none());
        assert!(state.admin_key("beta", "key_new", now).is_none());
        assert!(state.authenticate_admin("", now).is_none());

        let alpha = &mut entries.get_mut("alpha").unwrap().0;
        alpha.admin_keys = vec![login("key_new", "ann@example.com", revoked)];
        let state = MeteringState::build(&entries);
        assert!(state
            .password_login("alpha", "ann@example.com", now)
            .is_none());
        assert!(state.admin_key("alpha", "key_new", now).is_none());
    }
}
