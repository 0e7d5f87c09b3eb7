//! Runtime settings: a TOML file plus `AGENTMETER__SECTION__KEY` environment overrides.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Environment variables starting with this prefix (then `__`) override file settings:
/// `AGENTMETER__KAFKA__BROKERS=host:9092` sets `[kafka] brokers`.
pub const ENV_PREFIX: &str = "AGENTMETER";

/// Loads settings of type `T` from an optional TOML file and the environment.
pub fn load_settings<T: DeserializeOwned>(file: Option<&Path>) -> anyhow::Result<T> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read settings file {}", path.display()))?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    let source = match file {
        Some(path) => format!("{} and AGENTMETER__* environment variables", path.display()),
        None => "AGENTMETER__* environment variables".to_string(),
    };
    builder
        .build()
        .and_then(|config| config.try_deserialize())
        .with_context(|| format!("invalid settings in {source}"))
}
