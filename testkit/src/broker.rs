//! Whether the running local broker may be asked to delete a topic.
//!
//! tansu 0.6.0 from crates.io deletes *every* topic when asked to delete one (SERVICES.md);
//! `deploy/local/services.sh` builds it with that statement fixed and writes the fixes into a
//! `FIXES` file beside the binary. Nothing of ours deletes a topic unless the broker process
//! answering on the port is such a build.

use std::path::{Path, PathBuf};

/// The fix that makes deleting one topic delete only that topic.
pub const TOPIC_DELETE_FIX: &str = "topic-delete-by-id";

/// `Ok` when the broker that `deploy/local/services.sh` started, listening on `kafka_port`, is
/// built with [`TOPIC_DELETE_FIX`]; otherwise why not (then delete no topic).
pub fn topic_deletion_is_safe(kafka_port: u16) -> Result<(), String> {
    let state = state_dir();
    let pid_file = state.join("tansu/tansu.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .map_err(|error| format!("no broker PID file {} ({error})", pid_file.display()))?;
    let pid = pid.trim();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let command_line = std::fs::read(proc_dir.join("cmdline"))
        .map_err(|error| format!("broker process {pid} is not running ({error})"))?;
    let command_line = String::from_utf8_lossy(&command_line).replace('\0', " ");
    let listener = format!("tcp://127.0.0.1:{kafka_port}");
    if !command_line.contains(&listener) {
        return Err(format!(
            "broker process {pid} does not listen on {listener}: {command_line}"
        ));
    }
    let binary = std::fs::read_link(proc_dir.join("exe"))
        .map_err(|error| format!("cannot read the binary of broker process {pid}: {error}"))?;
    let fixes_file = binary
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("FIXES"))
        .ok_or_else(|| format!("unexpected broker binary path {}", binary.display()))?;
    let fixes = std::fs::read_to_string(&fixes_file).unwrap_or_default();
    if fixes.lines().any(|line| line.trim() == TOPIC_DELETE_FIX) {
        Ok(())
    } else {
        Err(format!(
            "the broker {} is not built with the {TOPIC_DELETE_FIX} fix (no such line in {}): deleting one topic would delete them all",
            binary.display(),
            fixes_file.display()
        ))
    }
}

/// `AGENTMETER_STATE`, else `<repository>/.local`, as in `deploy/local/services.sh`.
fn state_dir() -> PathBuf {
    match std::env::var_os("AGENTMETER_STATE") {
        Some(state) => PathBuf::from(state),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("testkit lives in the repository")
            .join(".local"),
    }
}
