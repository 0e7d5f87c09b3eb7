//! The metrics catalogue in docs/settings.md names exactly the metrics the stages register, so
//! that neither can drift from the other (issue 15, point 3). Needs no services.

use std::collections::BTreeSet;
use std::path::Path;

/// Source directories of the crates that register metrics.
const SOURCES: [&str; 6] = [
    "src",
    "schemas/src",
    "runtime/src",
    "ingest/src",
    "enricher/src",
    "aggregator/src",
];

fn rust_files(directory: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

/// Metric names: the string literal right after `counter!(`, `gauge!(` or `histogram!(`. A
/// macro call whose name is not a literal fails the test (the catalogue could not be checked).
fn registered_metrics(root: &Path) -> BTreeSet<String> {
    let mut files = Vec::new();
    for source in SOURCES {
        rust_files(&root.join(source), &mut files);
    }
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = text[at + macro_name.len()..].trim_start();
                let name = rest
                    .strip_prefix('"')
                    .and_then(|rest| rest.split_once('"'))
                    .map(|(name, _)| name.to_string())
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: a {macro_name}…) whose name is not a string literal",
                            file.display()
                        )
                    });
                names.insert(name);
            }
        }
    }
    names
}

/// Every `agentmeter_…` name in backticks in docs/settings.md.
fn documented_metrics(root: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root.join("docs/settings.md")).unwrap();
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|quoted| {
            let name: String = quoted
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            (name.starts_with("agentmeter_") && name.len() > "agentmeter_".len()).then_some(name)
        })
        .collect()
}

#[test]
fn the_settings_catalogue_names_exactly_the_registered_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let registered = registered_metrics(root);
    let documented = documented_metrics(root);
    assert!(registered.len() >= 30, "found only {registered:?}");
    let undocumented: Vec<&String> = registered.difference(&documented).collect();
    let stale: Vec<&String> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/settings.md must list every metric the code registers and no other:\n  registered, not documented: {undocumented:?}\n  documented, not registered: {stale:?}"
    );
}
