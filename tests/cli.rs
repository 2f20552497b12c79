//! The `sparsekv` command line: bad or extreme arguments end with a clear message and a
//! non-zero exit, never a wrapped number, an abort or a silently wrong table.

use std::process::{Command, Output};

fn kv_size(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparsekv"))
        .arg("kv-size")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the sparsekv binary: {e}"))
}

fn assert_fails_with(args: &[&str], message: &str) {
    let out = kv_size(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr:?}"
    );
}

#[test]
fn kv_size_prints_the_worked_example() {
    let out = kv_size(&["--preset", "llama3-8b", "--batch", "8", "--tokens", "32768"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| total | 12369526784 |"), "{stdout}");
    assert!(
        stdout.contains("compressed cache = 36.0% of dense"),
        "{stdout}"
    );
}

#[test]
fn kv_size_reports_overflow_instead_of_aborting_or_wrapping() {
    assert_fails_with(&["--batch", "1000000000000"], "does not fit in 64 bits");
    assert_fails_with(
        &["--tokens", "4611686018427387904"],
        "does not fit in 64 bits",
    );
}

#[test]
fn kv_size_names_the_flag_of_a_bad_sparsity() {
    assert_fails_with(
        &["--k-sparsity", "-0.1"],
        "--k-sparsity: sparsity -0.1 is out of range",
    );
    assert_fails_with(
        &["--v-sparsity", "NaN"],
        "--v-sparsity: sparsity NaN is out of range",
    );
    assert_fails_with(&["--k-sparsity", "1"], "--k-sparsity");
}
