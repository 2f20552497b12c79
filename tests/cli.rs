//! The `sparsekv` command line: bad or extreme arguments end with a clear message and a
//! non-zero exit, never a wrapped number, an abort or a silently wrong table.

mod common;

use std::path::PathBuf;
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

/// With a memory budget, kv-size says whether each cache fits: Llama-3-8B at B = 8, T = 128K
/// on a 141 GiB device with 15 GiB of weights: the dense cache (128 GiB) does not, the
/// compressed one at s = 0.7 does. A bad budget names its flag before anything is printed.
#[test]
fn kv_size_says_whether_each_cache_fits_the_memory() {
    let out = kv_size(&[
        "--batch",
        "8",
        "--tokens",
        "131072",
        "--memory-gib",
        "141",
        "--weights-gib",
        "15",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("leaves 126.00 GiB for the cache: dense cache 128.00 GiB does not fit; compressed cache 46.02 GiB fits"),
        "{stdout}"
    );
    for (args, message) in [
        (&["--memory-gib", "NaN"][..], "--memory-gib NaN"),
        (&["--memory-gib", "-1"][..], "--memory-gib -1"),
        (
            &["--memory-gib", "1", "--weights-gib", "2"][..],
            "--weights-gib 2",
        ),
    ] {
        let out = kv_size(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.is_empty(), "printed before failing: {stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{args:?}: {stderr}"
        );
    }
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

/// The example `name` built beside this test (`cargo test` builds the examples).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|t| Some(t.parent()?.parent()?.join("examples").join(name)))
        .filter(|p| p.exists());
    exe.unwrap_or_else(|| {
        panic!("the {name} example is not built: run `cargo test` (it builds the examples) first")
    })
}

fn chat_example() -> PathBuf {
    example("chat")
}

fn stories260k() -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("SPARSEKV_SHARED").unwrap_or_else(|_| "../shared".into()))
            .join("models/stories260K");
    assert!(
        dir.join("stories260K.bin").exists(),
        "test data not found at {}: set SPARSEKV_SHARED to the folder holding models/",
        dir.display()
    );
    dir
}

/// Runs the chat example on stories260K with `args` after the model flags (plain completion
/// unless `args` choose a template), `stdin` as its standard input.
fn chat_with_input(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let dir = stories260k();
    let template: &[&str] = if args.contains(&"--chat-template") {
        &[]
    } else {
        &["--chat-template", "none"]
    };
    let mut child = Command::new(chat_example())
        .arg("--model")
        .arg(dir.join("stories260K.bin"))
        .arg("--tokenizer")
        .arg(dir.join("tok512.bin"))
        .args(template)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the chat example: {e}"));
    if let Some(mut input) = child.stdin.take() {
        // A prompt flag makes the example ignore standard input: a failed write is fine then.
        let _ = input.write_all(stdin.as_bytes());
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for the chat example: {e}"))
}

fn chat(args: &[&str]) -> Output {
    chat_with_input(args, "")
}

/// An over-long prompt, an out-of-range sparsity and a missing model end with a non-zero exit
/// and a message that names the problem, never a silent `[0 tokens ...]`.
#[test]
fn chat_refuses_bad_input_with_a_message_and_a_non_zero_exit() {
    let long = "Once upon a time there was a cat. ".repeat(100);
    let out = chat(&["--prompt", &long, "--max-tokens", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an over-long prompt succeeded: {stderr}"
    );
    assert!(
        stderr.contains("but the model's context is 512 tokens"),
        "{stderr}"
    );
    // The example quiets the Vulkan loader's complaint about an unset XDG_RUNTIME_DIR.
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    for (flag, value) in [
        ("--k-sparsity", "-0.1"),
        ("--chunk", "0"),
        ("--streaming-prefill", "0"),
    ] {
        let out = chat(&["--prompt", "Hi", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(flag), "{stderr}");
    }
    let out = Command::new(chat_example())
        .args([
            "--model",
            "no/such/model.bin",
            "--tokenizer",
            "no/such/tok.bin",
            "--prompt",
            "Hi",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the chat example: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no/such/model.bin"),
        "{stderr}"
    );
}

/// A panic on a thread other than `main` (as when a GPU runtime's device thread fails) ends
/// the process with a non-zero exit once `exit_on_any_thread_panic` is installed: this test
/// runs itself again as a child that panics on a worker thread and then would exit 0.
#[test]
fn a_panic_on_another_thread_ends_the_process() {
    if std::env::var_os("SPARSEKV_PANIC_CHILD").is_some() {
        sparsekv::exit_on_any_thread_panic();
        let worker = std::thread::Builder::new()
            .name("worker".into())
            .spawn(|| panic!("simulated device-thread failure"));
        // The hook exits the process from the worker; were it not installed, the join would
        // return the panic as an error and this child would exit 0.
        let _ = worker.map(|w| w.join());
        return;
    }
    let out = common::rerun_as_child(
        "a_panic_on_another_thread_ends_the_process",
        "SPARSEKV_PANIC_CHILD",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stderr}");
    assert!(stderr.contains("thread worker failed"), "{stderr}");
}

/// Extreme numbers behave as documented: a NaN temperature is refused naming the flag;
/// `--max-tokens` near `usize::MAX` is capped at the context with a notice, and generates; a
/// window of `usize::MAX` keeps everything dense (capped at the context), so its greedy text
/// is the dense cache's.
#[test]
fn chat_caps_or_refuses_extreme_numbers() {
    let text = |out: &Output| {
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout.lines().next().unwrap_or_default().to_string()
    };
    let out = chat(&["--prompt", "Hi", "--temperature", "NaN"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--temperature"),
        "{stderr}"
    );
    let prompt = "Once upon a time";
    let out = chat(&["--prompt", prompt, "--max-tokens", "18446744073709551615"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("capped at"), "{stderr}");
    assert!(text(&out).len() > prompt.len(), "nothing generated");
    let huge_window = chat(&[
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--window",
        "18446744073709551615",
    ]);
    let dense = chat(&[
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--k-sparsity",
        "0",
        "--v-sparsity",
        "0",
    ]);
    assert!(huge_window.status.success() && dense.status.success());
    assert_eq!(text(&huge_window), text(&dense));
    assert!(text(&dense).len() > prompt.len(), "nothing generated");
}

/// The eval example checks its arguments as chat does, before loading anything: a missing
/// model or text file is named as missing, a negative sparsity reaches the range check.
#[test]
fn eval_refuses_bad_input_before_loading() {
    let eval = |args: &[&str]| {
        Command::new(example("eval"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the eval example: {e}"))
    };
    let dir = stories260k();
    let model = dir.join("stories260K.bin");
    let tokenizer = dir.join("tok512.bin");
    let (model, tokenizer) = (model.to_string_lossy(), tokenizer.to_string_lossy());
    for (args, message) in [
        (
            vec!["--model", "no/such/model.bin", "--text", "no/such/text.txt"],
            "--model no/such/model.bin: no such file or directory",
        ),
        (
            vec![
                "--model",
                &model,
                "--tokenizer",
                &tokenizer,
                "--text",
                "no/such/text.txt",
            ],
            "--text no/such/text.txt: no such file or directory",
        ),
        (
            vec!["--model", &model, "--text", "x", "--sparsities", "0.5,-0.1"],
            "--sparsities",
        ),
        (
            vec![
                "--model",
                &model,
                "--tokenizer",
                &tokenizer,
                "--text",
                &model,
                "--seq-len",
                "64",
                "--prefill-study",
                "64",
            ],
            "--prefill-study 64 must leave tokens to score",
        ),
    ] {
        let out = eval(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr}"
        );
    }
}

/// The REPL keeps a conversation under a chat template; when the turns outgrow the model's
/// context it drops the oldest ones, says so on standard error, and goes on answering.
#[test]
fn chat_repl_drops_the_oldest_turns_with_a_notice() {
    let turn =
        "Once upon a time there was a little cat who liked to play in the garden. ".repeat(6);
    let input = format!("{turn}\n").repeat(6);
    let out = chat_with_input(&["--chat-template", "zephyr", "--max-tokens", "4"], &input);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[dropped the oldest turn to fit the model's context of 512 tokens]"),
        "{stderr}"
    );
}

/// The adoption example: an attention layer written the usual Burn way and the same layer on
/// the sparse cache, on Burn's own (fused) backend type; at sparsity 0 they must agree (the
/// example exits non-zero otherwise).
#[test]
fn burn_attention_example_matches_the_usual_burn_layer() {
    let out = Command::new(example("burn_attention"))
        .output()
        .expect("run the burn_attention example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("at sparsity 0 the sparse cache matches the usual Burn layer"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sparsity 0.7: 64 of 160 tokens compressed"),
        "{stdout}"
    );
}
