//! Measures what KV pruning costs a model in accuracy: perplexity of a text and top-1
//! agreement with the dense model, over a sweep of strategies, targets (K, V, K+V),
//! sparsities and dense windows, teacher-forced one token at a time through the decode path.
//!
//!     cargo run --release --example eval -- --model ../shared/models/tinystories-656K \
//!         --text ../shared/data/tinystories_val.txt --max-tokens 20480 --out eval-656K
//!     cargo run --release --example eval -- --model ../shared/models/stories260K/stories260K.bin \
//!         --tokenizer ../shared/models/stories260K/tok512.bin \
//!         --text ../shared/data/tinystories_val.txt --out eval-260K
//!
//! Writes `OUT/eval.md` (tables), `OUT/eval.csv` (one row per run) and `OUT/perplexity.svg`
//! (perplexity vs sparsity, one line per strategy, one panel per target and window).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use sparsekv::backends::{FloatName, FusionChoice, OnBackend, RuntimeName, run_on};
use sparsekv::cache::{PrefillPolicy, PruneStrategy, SparseKvBackend};
use sparsekv::format::ValueType;
use sparsekv::llama::{
    CacheKind, EvalCase, Llama, LlamaError, Pretrained, PromptPrefill, Scores, Target, evaluate,
    sweep, text_windows,
};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum StrategyName {
    /// Per-token magnitude (sparsekv's format, run on the compressed cache).
    PerTokenMagnitude,
    /// Per-token output-aware (simulated).
    PerTokenOutputAware,
    /// Per-channel magnitude, 32-token groups (simulated).
    PerChannelMagnitude,
    /// Per-channel output-aware, 32-token groups (simulated).
    PerChannelOutputAware,
    /// ThinK structured key-channel pruning (simulated; keys only).
    Think,
}

impl StrategyName {
    fn strategy(self) -> PruneStrategy {
        match self {
            StrategyName::PerTokenMagnitude => PruneStrategy::PerTokenMagnitude,
            StrategyName::PerTokenOutputAware => PruneStrategy::PerTokenOutputAware,
            StrategyName::PerChannelMagnitude => PruneStrategy::PerChannelMagnitude,
            StrategyName::PerChannelOutputAware => PruneStrategy::PerChannelOutputAware,
            StrategyName::Think => PruneStrategy::ThinkKeys,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Perplexity and top-1 agreement of a Llama model under KV cache pruning")]
struct Args {
    /// A Hugging Face model directory or a llama2.c checkpoint (.bin, with --tokenizer).
    #[arg(long, required_unless_present = "replot")]
    model: Option<PathBuf>,
    /// llama2.c tokenizer (tokenizer.bin), for a .bin checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The text to score (plain UTF-8; paragraphs on their own lines).
    #[arg(long, required_unless_present = "replot")]
    text: Option<PathBuf>,
    /// Tokens scored per run, at most (whole windows; fewer if the text is shorter).
    #[arg(long, default_value_t = 20480)]
    max_tokens: usize,
    /// Tokens per window, BOS included (at most the model's context).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sparsities to sweep.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.3,0.5,0.7,0.8",
        allow_negative_numbers = true
    )]
    sparsities: Vec<f64>,
    /// Dense windows to sweep.
    #[arg(long, value_delimiter = ',', default_value = "0,32")]
    windows: Vec<usize>,
    /// Strategies to sweep (default: all five).
    #[arg(long, value_enum, value_delimiter = ',')]
    strategies: Vec<StrategyName>,
    /// Tokens pruned at once when the window overflows (also the per-channel group); the
    /// caches' default, as in the chat example.
    #[arg(long, default_value_t = sparsekv::cache::cache::DEFAULT_CHUNK)]
    chunk: usize,
    /// Also run per-token magnitude as a mask simulation and report how far it is from the
    /// compressed cache.
    #[arg(long)]
    check_simulation: bool,
    /// Backend (default: cuda when built with the `cuda` feature, else wgpu).
    #[arg(long, value_enum)]
    backend: Option<RuntimeName>,
    /// Burn's operation fusion: on (Burn's own `Wgpu`/`Cuda` as its default features make
    /// them) or off (the bare `CubeBackend`).
    #[arg(long, value_enum, default_value = "on")]
    fusion: FusionChoice,
    /// Instead of the sweep, the prefill-policy study: the first N tokens of every window go in
    /// as a prompt, exact (dense attention over the prompt, then compression) vs streaming
    /// (chunk by chunk through the compressed cache), on the compressed cache at each
    /// sparsity and the first window size; the tokens after the prompt are scored against
    /// the dense cache with the same prompt. Writes prefill.md.
    #[arg(long)]
    prefill_study: Option<usize>,
    /// Prompt tokens per chunk of the streaming prefill in the prefill study.
    #[arg(long, default_value_t = 16)]
    prefill_chunk: usize,
    /// Folder for eval.md, eval.csv and perplexity.svg.
    #[arg(long, default_value = "eval-out")]
    out: PathBuf,
    /// Redraw OUT/perplexity.svg from an earlier run's eval.csv instead of evaluating (the
    /// model and text arguments are then not read).
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// One finished run.
struct Row {
    case: EvalCase,
    scores: Scores,
    seconds: f64,
}

fn case_label(case: &EvalCase) -> String {
    match case.cache {
        CacheKind::Dense => "dense".into(),
        CacheKind::Compressed => "per-token magnitude".into(),
        CacheKind::Masked(s) => format!("{} (mask)", s.name()),
    }
}

fn strategy_name(case: &EvalCase) -> &'static str {
    case.strategy().map(PruneStrategy::name).unwrap_or("dense")
}

fn io_error(path: &Path, source: std::io::Error) -> LlamaError {
    LlamaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run<B: SparseKvBackend>(
    args: &Args,
    pre: &Pretrained,
    device: B::Device,
) -> Result<(), LlamaError> {
    let model = Llama::<B>::new(&pre.weights, &device)?;
    let text_path = args.text.clone().unwrap_or_default();
    let text = std::fs::read_to_string(&text_path).map_err(|e| io_error(&text_path, e))?;
    let windows = text_windows(&pre.tokenizer, &text, args.seq_len, args.max_tokens)?;
    if let Some(prompt) = args.prefill_study {
        return prefill_study(args, &model, &windows, prompt, &device);
    }
    let steps = args.seq_len - 1;
    let strategies: Vec<PruneStrategy> = if args.strategies.is_empty() {
        PruneStrategy::ALL.to_vec()
    } else {
        args.strategies.iter().map(|s| s.strategy()).collect()
    };
    let mut cases = vec![EvalCase {
        cache: CacheKind::Dense,
        target: Target::Both,
        sparsity: 0.0,
        window: 0,
        prompt: None,
    }];
    cases.extend(sweep(&args.sparsities, &args.windows, &strategies));
    if args.check_simulation {
        let checks: Vec<EvalCase> = cases
            .iter()
            .filter(|c| c.cache == CacheKind::Compressed)
            .map(|c| EvalCase {
                cache: CacheKind::Masked(PruneStrategy::PerTokenMagnitude),
                ..*c
            })
            .collect();
        cases.extend(checks);
    }
    let c = model.config();
    eprintln!(
        "{}: {} layers, {}/{} heads, head_dim {}; {} windows of {} tokens ({} scored per run); {} runs",
        args.model.clone().unwrap_or_default().display(),
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim(),
        windows.len(),
        args.seq_len,
        windows.len() * steps,
        cases.len()
    );
    let bar = ProgressBar::new((cases.len() * steps) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}, ETA {eta_precise}] {msg}",
        )
        .map_err(|e| LlamaError::Invalid(format!("progress bar template: {e}")))?,
    );
    let mut rows: Vec<Row> = Vec::new();
    for case in &cases {
        bar.set_message(format!(
            "{} {} s={} w={}",
            case_label(case),
            case.target.name(),
            case.sparsity,
            case.window
        ));
        let start = Instant::now();
        let scores = evaluate(
            &model,
            &windows,
            case,
            args.chunk,
            ValueType::F32,
            &device,
            || bar.inc(1),
        )?;
        rows.push(Row {
            case: *case,
            scores,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    bar.finish_and_clear();
    report(args, c.head_dim(), windows.len() * steps, &rows)
}

/// The prefill-policy study (`--prefill-study N`): exact vs streaming prompts of `prompt`
/// tokens on the compressed cache, scored on the tokens after the prompt against the dense
/// cache with the same prompt.
fn prefill_study<B: SparseKvBackend>(
    args: &Args,
    model: &Llama<B>,
    windows: &[Vec<u32>],
    prompt: usize,
    device: &B::Device,
) -> Result<(), LlamaError> {
    let window = args.windows.first().copied().unwrap_or(32);
    let case = |cache, sparsity, policy| EvalCase {
        cache,
        target: Target::Both,
        sparsity,
        window,
        prompt: Some(PromptPrefill {
            tokens: prompt,
            policy,
        }),
    };
    let score = |case: &EvalCase| {
        evaluate(
            model,
            windows,
            case,
            args.chunk,
            ValueType::F32,
            device,
            || {},
        )
    };
    let dense = score(&case(CacheKind::Dense, 0.0, PrefillPolicy::Exact))?;
    let streaming = PrefillPolicy::Streaming {
        chunk: args.prefill_chunk,
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Model `{}`, text `{}`: windows of {} tokens, the first {prompt} a prompt, {} tokens \
         after the prompts scored per run; window {window}, chunk {}, streaming chunk {}. \
         Dense cache (exact prompt) perplexity {:.4}.\n\n\
         | s | prefill | perplexity | top-1 agreement with dense (%) |\n|---|---|---|---|",
        args.model.clone().unwrap_or_default().display(),
        args.text.clone().unwrap_or_default().display(),
        args.seq_len,
        dense.tokens(),
        args.chunk,
        args.prefill_chunk,
        dense.perplexity()
    );
    for &sparsity in &args.sparsities {
        for (name, policy) in [("exact", PrefillPolicy::Exact), ("streaming", streaming)] {
            let scores = score(&case(CacheKind::Compressed, sparsity, policy))?;
            let _ = writeln!(
                md,
                "| {sparsity} | {name} | {:.4} | {:.2} |",
                scores.perplexity(),
                100.0 * scores.agreement(&dense)?
            );
            eprintln!("done s={sparsity} {name}");
        }
    }
    print!("{md}");
    std::fs::create_dir_all(&args.out).map_err(|e| io_error(&args.out, e))?;
    let path = args.out.join("prefill.md");
    std::fs::write(&path, &md).map_err(|e| io_error(&path, e))
}

fn report(args: &Args, head_dim: usize, tokens: usize, rows: &[Row]) -> Result<(), LlamaError> {
    let dense = &rows[0].scores;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Model `{}`, text `{}`: {tokens} tokens scored per run (windows of {} tokens from BOS), \
         head_dim {head_dim}, chunk {}. Dense perplexity {:.4} (mean NLL {:.5} nats).\n",
        args.model.clone().unwrap_or_default().display(),
        args.text.clone().unwrap_or_default().display(),
        args.seq_len,
        args.chunk,
        dense.perplexity(),
        dense.mean_nll()
    );
    // Pivot tables: perplexity and agreement by sparsity.
    let main_rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.case.cache != CacheKind::Dense)
        .filter(|r| {
            !(args.check_simulation
                && r.case.cache == CacheKind::Masked(PruneStrategy::PerTokenMagnitude))
        })
        .collect();
    for (title, metric) in [
        ("Perplexity", 0usize),
        ("Top-1 agreement with dense (%)", 1usize),
    ] {
        for &window in &args.windows {
            let _ = writeln!(md, "### {title}, window {window}\n");
            let mut header = "| strategy | target |".to_string();
            let mut rule = "|---|---|".to_string();
            for s in &args.sparsities {
                let _ = write!(header, " s = {s} |");
                rule.push_str("---|");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            let mut seen: Vec<(&'static str, Target)> = Vec::new();
            for r in main_rows.iter().filter(|r| r.case.window == window) {
                let key = (strategy_name(&r.case), r.case.target);
                if r.case.sparsity == 0.0 || seen.contains(&key) {
                    continue;
                }
                seen.push(key);
                let mut line = format!("| {} | {} |", key.0, key.1.name());
                for &s in &args.sparsities {
                    let found = main_rows.iter().find(|x| {
                        x.case.window == window
                            && strategy_name(&x.case) == key.0
                            && (x.case.target == key.1 || s == 0.0)
                            && x.case.sparsity == s
                    });
                    let cell = match found {
                        Some(x) if metric == 0 => format!("{:.4}", x.scores.perplexity()),
                        Some(x) => format!("{:.2}", 100.0 * x.scores.agreement(dense)?),
                        None => "-".into(),
                    };
                    let _ = write!(line, " {cell} |");
                }
                let _ = writeln!(md, "{line}");
            }
            let _ = writeln!(md);
        }
    }
    if args.check_simulation {
        let _ = writeln!(
            md,
            "### Per-token magnitude: compressed cache vs mask simulation\n\n\
             | target | window | s | perplexity, compressed | perplexity, mask | relative difference | same top-1 (%) |\n|---|---|---|---|---|---|---|"
        );
        for r in rows
            .iter()
            .filter(|r| r.case.cache == CacheKind::Compressed)
        {
            let twin = rows.iter().find(|x| {
                x.case
                    == EvalCase {
                        cache: CacheKind::Masked(PruneStrategy::PerTokenMagnitude),
                        ..r.case
                    }
            });
            if let Some(t) = twin {
                let (a, b) = (r.scores.perplexity(), t.scores.perplexity());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {a:.6} | {b:.6} | {:.2e} | {:.2} |",
                    r.case.target.name(),
                    r.case.window,
                    r.case.sparsity,
                    (a - b).abs() / b,
                    100.0 * r.scores.agreement(&t.scores)?
                );
            }
        }
        let _ = writeln!(md);
    }
    print!("{md}");
    std::fs::create_dir_all(&args.out).map_err(|e| io_error(&args.out, e))?;
    let md_path = args.out.join("eval.md");
    std::fs::write(&md_path, &md).map_err(|e| io_error(&md_path, e))?;
    let mut csv = String::from(
        "cache,strategy,target,window,sparsity,tokens,mean_nll,perplexity,top1_agreement,seconds\n",
    );
    for r in rows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{:.8},{:.6},{:.6},{:.2}",
            match r.case.cache {
                CacheKind::Dense => "dense",
                CacheKind::Compressed => "compressed",
                CacheKind::Masked(_) => "mask",
            },
            strategy_name(&r.case),
            r.case.target.name(),
            r.case.window,
            r.case.sparsity,
            r.scores.tokens(),
            r.scores.mean_nll(),
            r.scores.perplexity(),
            r.scores.agreement(dense)?,
            r.seconds
        );
    }
    let csv_path = args.out.join("eval.csv");
    std::fs::write(&csv_path, csv).map_err(|e| io_error(&csv_path, e))?;
    let svg_path = args.out.join("perplexity.svg");
    let points: Vec<(EvalCase, f64)> = main_rows
        .iter()
        .map(|r| (r.case, r.scores.perplexity()))
        .collect();
    plot(&svg_path, args, &points, dense.perplexity())
        .map_err(|e| LlamaError::Invalid(format!("drawing {}: {e}", svg_path.display())))?;
    eprintln!(
        "wrote {}, {} and {}",
        md_path.display(),
        csv_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// Perplexity vs sparsity: one panel per (window, target), one line per strategy.
fn plot(
    path: &Path,
    args: &Args,
    rows: &[(EvalCase, f64)],
    dense: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1500, 450 * args.windows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((args.windows.len(), Target::ALL.len()));
    let max_s = args.sparsities.iter().copied().fold(0.0, f64::max);
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    for (i, panel) in panels.iter().enumerate() {
        let window = args.windows[i / Target::ALL.len()];
        let target = Target::ALL[i % Target::ALL.len()];
        let series: Vec<(&'static str, Vec<(f64, f64)>)> = PruneStrategy::ALL
            .iter()
            .map(|&st| {
                let mut points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|(case, _)| {
                        case.window == window
                            && case.strategy() == Some(st)
                            && (case.target == target || case.sparsity == 0.0)
                    })
                    .map(|(case, ppl)| (case.sparsity, *ppl))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                (st.name(), points)
            })
            .filter(|(_, p)| p.len() > 1)
            .collect();
        let values = || series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1));
        let y_max = values().fold(dense, f64::max);
        let y_min = values().fold(dense, f64::min);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{}, window {window}", target.name()),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_s.max(0.1), (y_min * 0.98)..(y_max * 1.02))?;
        chart
            .configure_mesh()
            .x_desc("sparsity")
            .y_desc("perplexity")
            .draw()?;
        for (k, (name, points)) in series.iter().enumerate() {
            let color = colors[k % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Reads an earlier run's eval.csv and draws its plot again.
fn replot(args: &Args, csv: &Path) -> Result<(), LlamaError> {
    let text = std::fs::read_to_string(csv).map_err(|e| io_error(csv, e))?;
    let bad = |line: &str| LlamaError::Malformed {
        path: csv.to_path_buf(),
        problem: format!("unexpected row {line:?}"),
    };
    let mut dense = None;
    let mut points = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 10 {
            return Err(bad(line));
        }
        let number = |s: &str| s.parse::<f64>().map_err(|_| bad(line));
        let strategy = PruneStrategy::ALL.into_iter().find(|s| s.name() == f[1]);
        let target = Target::ALL.into_iter().find(|t| t.name() == f[2]);
        let cache = match (f[0], strategy) {
            ("dense", _) => {
                dense = Some(number(f[7])?);
                continue;
            }
            ("compressed", Some(_)) => CacheKind::Compressed,
            // The mask twin of per-token magnitude only checks the compressed cache.
            ("mask", Some(PruneStrategy::PerTokenMagnitude)) => continue,
            ("mask", Some(s)) => CacheKind::Masked(s),
            _ => return Err(bad(line)),
        };
        let case = EvalCase {
            cache,
            target: target.ok_or_else(|| bad(line))?,
            window: f[3].parse().map_err(|_| bad(line))?,
            sparsity: number(f[4])?,
            prompt: None,
        };
        points.push((case, number(f[7])?));
    }
    let dense = dense.ok_or_else(|| bad("(no dense row)"))?;
    std::fs::create_dir_all(&args.out).map_err(|e| io_error(&args.out, e))?;
    let svg_path = args.out.join("perplexity.svg");
    plot(&svg_path, args, &points, dense)
        .map_err(|e| LlamaError::Invalid(format!("drawing {}: {e}", svg_path.display())))?;
    eprintln!("wrote {}", svg_path.display());
    Ok(())
}

fn load(args: &Args) -> Result<Pretrained, LlamaError> {
    Pretrained::load(
        args.model.clone().unwrap_or_default(),
        args.tokenizer.as_deref(),
    )
}

fn check(args: &Args) -> Result<(), LlamaError> {
    for &s in &args.sparsities {
        sparsekv::llama::args::sparsity("--sparsities", s)?;
    }
    for (flag, path) in [
        ("--model", &args.model),
        ("--tokenizer", &args.tokenizer),
        ("--text", &args.text),
    ] {
        if let Some(p) = path {
            sparsekv::llama::args::existing_path(flag, p)?;
        }
    }
    if args.sparsities.is_empty() || args.windows.is_empty() || args.chunk == 0 {
        return Err(LlamaError::Invalid(
            "--sparsities and --windows need at least one value and --chunk at least 1".into(),
        ));
    }
    if args.seq_len < 2 || args.max_tokens == 0 {
        return Err(LlamaError::Invalid(
            "--seq-len must be at least 2 and --max-tokens at least 1".into(),
        ));
    }
    if let Some(prompt) = args.prefill_study
        && (prompt == 0 || prompt >= args.seq_len || args.prefill_chunk == 0)
    {
        return Err(LlamaError::Invalid(format!(
            "--prefill-study {prompt} must leave tokens to score: 1..{} prompt tokens for \
             --seq-len {}, and --prefill-chunk at least 1",
            args.seq_len, args.seq_len
        )));
    }
    Ok(())
}

/// The evaluation, generic over the backend type the options pick (f32 throughout: the
/// scores are compared across sparsities).
struct Evaluation<'a> {
    args: &'a Args,
    pre: &'a Pretrained,
}

impl OnBackend for Evaluation<'_> {
    type Output = Result<(), LlamaError>;
    fn run<B: SparseKvBackend>(self, device: B::Device, _: ValueType) -> Self::Output {
        run::<B>(self.args, self.pre, device)
    }
}

fn dispatch(args: &Args, pre: &Pretrained) -> Result<(), LlamaError> {
    let runtime = args.backend.unwrap_or_else(RuntimeName::build_default);
    run_on(
        runtime,
        FloatName::F32,
        args.fusion,
        Evaluation { args, pre },
    )
    .map_err(|e| LlamaError::Invalid(e.to_string()))?
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { sparsekv::quiet_vulkan_loader() };
    sparsekv::exit_on_any_thread_panic();
    let args = Args::parse();
    if let Some(csv) = &args.replot {
        return match replot(&args, csv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match check(&args)
        .and_then(|()| load(&args))
        .and_then(|pre| dispatch(&args, &pre))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
