//! Every integration test (a file under `tests/` that uses the harness of `tests/common`, which
//! starts the real services) is compiled only
//! with the `integration` feature, so that a plain `cargo test` needs no broker and no
//! ClickHouse, while `deploy/local/test.sh` and CI, which turn the feature on, never skip one.

#[test]
fn every_integration_test_is_behind_the_integration_feature() {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut checked = 0;
    for entry in std::fs::read_dir(&tests).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.lines().any(|line| line.trim() == "mod common;") {
            continue;
        }
        assert!(
            text.lines()
                .any(|line| line.trim() == r#"#![cfg(feature = "integration")]"#),
            "{} uses the real services but is not behind the `integration` feature: add #![cfg(feature = \"integration\")] after its //! header",
            path.display()
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "no integration tests found in {}",
        tests.display()
    );
}
