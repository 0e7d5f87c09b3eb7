//! Running `agentmeter` the way the tests and the bench do: a tool to completion, or a stage in
//! the background with its output appended to a log file. `launcher` (e.g. `taskset -c 1`)
//! goes in front of the binary when the bench pins stages to a CPU.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The log filter of stage processes.
pub const STAGE_LOG_FILTER: &str = "info,rdkafka=warn";

/// Runs `binary --config settings ARGS` to completion: whether it succeeded, and its stdout
/// followed by its stderr.
pub fn run_tool(
    binary: &Path,
    settings: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::io::Result<(bool, String)> {
    let output = Command::new(binary)
        .arg("--config")
        .arg(settings)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// Starts `[launcher…] binary --config settings STAGE`, its stdout and stderr appended to
/// `log_path`.
pub fn spawn_stage(
    launcher: &[&str],
    binary: &Path,
    settings: &Path,
    stage: &str,
    log_path: &Path,
    env: &[(&str, &str)],
) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut command = match launcher.split_first() {
        Some((program, launcher_args)) => {
            let mut command = Command::new(program);
            command.args(launcher_args).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command
        .arg("--config")
        .arg(settings)
        .arg(stage)
        .env("RUST_LOG", STAGE_LOG_FILTER)
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
}
