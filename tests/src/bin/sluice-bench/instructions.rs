//! `sluice-bench instructions`: machine instructions per request of each filter benchmark case,
//! counted by valgrind's callgrind in the measured Envoy.
//!
//! CPU seconds on a shared 2-core VM move by ±15 % with the neighbours; an instruction count
//! does not, so one run can judge a change to the filter. Each case's Envoy runs under
//! `valgrind --tool=callgrind` (with `--smc-check=all`, since V8 writes and rewrites the
//! machine code it runs, and `--separate-threads=yes`, so the worker is told from the main
//! thread and V8's background compilers). After a warm-up (connections, V8's compilation of
//! the module, tier-up), for each repetition the driver zeroes the counters
//! (`callgrind_control --zero`), sends a fixed number of requests at a low fixed rate (valgrind
//! runs Envoy some 50× slower), dumps the counters, then zeroes again and dumps after the same
//! time with no requests. The idle dump is what the process does per second whatever the
//! traffic (the main thread's stats flush, timers); it is subtracted, scaled to the loaded run's
//! duration, so the figure is per request. Repetitions show how repeatable it is.
//!
//! Beside the total it attributes the instructions by where they ran. The Envoy release binary is
//! stripped, so callgrind sees addresses, not names, inside it; the split is by code region:
//! Envoy's own code (C++, with V8's built-ins compiled into it), tcmalloc (the binary's
//! `google_malloc` section, outside `.text`: callgrind names no object for it), code generated at
//! run time (V8's compiled wasm and its wrappers, LuaJIT's traces), and libc (memcpy, memset,
//! locks). The calls from generated code into Envoy are the filter's host calls (and, for the
//! wasm filters, V8's runtime calls); their count and inclusive cost per request are shown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sluice_tests::{noop_filter_wasm, Envoy, EnvoyConfig, HttpClient};

use super::{open_loop, LoadArgs};

#[derive(Parser)]
pub struct InstructionsArgs {
    /// Cases to count, from: none, noop, lua, sluice, sluice-assign, sluice-outcomes, breaker,
    /// weighted, shadow-off, mirror, shadow (and sluice-b, breaker-b, shadow-b with --wasm-b).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,noop,lua,sluice,shadow-off,mirror,shadow"
    )]
    cases: Vec<String>,
    /// Requests per measured repetition.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Requests per second: low, since valgrind slows Envoy down some 50 times.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Requests sent before the first measurement (connections, V8 compilation and tier-up).
    #[arg(long, default_value_t = 400)]
    warmup: usize,
    /// Measured repetitions per case (each followed by an idle dump of the same length).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// A second build of the Sluice filter, counted as cases `sluice-b`, `breaker-b` and
    /// `shadow-b` (add them to --cases).
    #[arg(long)]
    wasm_b: Option<PathBuf>,
    /// Keep callgrind's files (one directory per case) here instead of a temporary directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Also print, per case, the call tree below each call between generated code and Envoy
    /// (the host calls and the VM's entry points, by address: identify them by their counts).
    #[arg(long)]
    tree: bool,
    /// Seconds to wait for an Envoy under valgrind to become ready.
    #[arg(long, default_value_t = 600)]
    ready_timeout: u64,
}

struct CaseSpec {
    name: &'static str,
    label: &'static str,
    file: &'static str,
    /// Literal replacements in the YAML (each must match).
    replace: &'static [(&'static str, &'static str)],
}

/// Indentation of the experiment's keys in `proxy-sluice.yaml`'s inline JSON.
const OUTCOMES_AND_PREDICTION: &str = "\"header\": \"x-sluice-variant\",
                                \"outcomes\": {\"header\": \"x-sluice-outcome\", \"names\": [\"click\", \"purchase\"]},
                                \"prediction\": {\"header\": \"x-model-score\", \"scale\": 1000}";
const PREDICTION: &str = "\"names\": [\"click\", \"purchase\"]},
                                \"prediction\": {\"header\": \"x-model-score\", \"scale\": 1000}";

const CASES: [CaseSpec; 14] = [
    CaseSpec {
        name: "none",
        label: "(a) no filter",
        file: "bench/envoy/proxy-none.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "noop",
        label: "(b) no-op wasm",
        file: "bench/envoy/proxy-noop.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "lua",
        label: "(d) Lua hash",
        file: "bench/envoy/proxy-lua.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "sluice",
        label: "(c) Sluice",
        file: "bench/envoy/proxy-sluice.yaml",
        replace: &[],
    },
    // Ablations of (c): what outcomes and the prediction add, from the config alone.
    CaseSpec {
        name: "sluice-assign",
        label: "(c) without outcomes, prediction",
        file: "bench/envoy/proxy-sluice.yaml",
        replace: &[(OUTCOMES_AND_PREDICTION, "\"header\": \"x-sluice-variant\"")],
    },
    CaseSpec {
        name: "sluice-outcomes",
        label: "(c) without prediction",
        file: "bench/envoy/proxy-sluice.yaml",
        replace: &[(PREDICTION, "\"names\": [\"click\", \"purchase\"]}")],
    },
    // (c) with the data-plane breaker on: the difference is the breaker's bookkeeping.
    CaseSpec {
        name: "breaker",
        label: "(c') Sluice with the breaker",
        file: "bench/envoy/proxy-breaker.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "weighted",
        label: "(e) weighted_clusters",
        file: "bench/envoy/proxy-weighted.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "shadow-off",
        label: "shadow off (Sluice)",
        file: "bench/envoy/shadow-off.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "mirror",
        label: "native mirror 100 %",
        file: "bench/envoy/shadow-native.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "shadow",
        label: "Sluice shadow 100 %",
        file: "bench/envoy/shadow-sluice.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "sluice-b",
        label: "(c) Sluice, build B",
        file: "bench/envoy/proxy-sluice.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "breaker-b",
        label: "(c') with the breaker, build B",
        file: "bench/envoy/proxy-breaker.yaml",
        replace: &[],
    },
    CaseSpec {
        name: "shadow-b",
        label: "Sluice shadow 100 %, build B",
        file: "bench/envoy/shadow-sluice.yaml",
        replace: &[],
    },
];

/// Where an instruction ran.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Region {
    Envoy,
    Tcmalloc,
    Generated,
    Libc,
    Other,
}

const REGIONS: [(Region, &str); 5] = [
    (Region::Envoy, "Envoy code"),
    (Region::Tcmalloc, "tcmalloc"),
    (Region::Generated, "generated code"),
    (Region::Libc, "libc"),
    (Region::Other, "other"),
];

/// One callgrind dump of one thread, reduced to what the report needs.
#[derive(Default, Debug, Clone)]
struct Dump {
    /// Instructions by region (self cost).
    by_region: BTreeMap<Region, u64>,
    /// Calls from generated code into Envoy's code: count, inclusive instructions.
    out_of_generated: (u64, u64),
    /// Calls from Envoy's code into generated code: count, inclusive instructions.
    into_generated: (u64, u64),
    /// Every call edge, caller function → callee function (callgrind's names: addresses inside
    /// the stripped binary): count, inclusive instructions. Kept only for `--tree`.
    edges: HashMap<(Callee, Callee), (u64, u64)>,
}

/// A function as callgrind names it, with the region it is in.
type Callee = (Region, String);

impl Dump {
    fn total(&self) -> u64 {
        self.by_region.values().sum()
    }

    fn add(&mut self, other: &Dump) {
        for (r, v) in &other.by_region {
            *self.by_region.entry(*r).or_default() += v;
        }
        self.out_of_generated.0 += other.out_of_generated.0;
        self.out_of_generated.1 += other.out_of_generated.1;
        self.into_generated.0 += other.into_generated.0;
        self.into_generated.1 += other.into_generated.1;
        for (k, (n, c)) in &other.edges {
            let e = self.edges.entry(k.clone()).or_default();
            e.0 += n;
            e.1 += c;
        }
    }
}

/// The address ranges of the Envoy binary's mappings, to tell tcmalloc (inside them, but
/// without an object name) from generated code (outside).
struct Layout {
    envoy_path: String,
    ranges: Vec<(u64, u64)>,
}

impl Layout {
    fn of(pid: u32, envoy_path: &str) -> Result<Layout> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        let mut ranges = Vec::new();
        for line in maps.lines() {
            if !line.ends_with(envoy_path) {
                continue;
            }
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            ranges.push((u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?));
        }
        if ranges.is_empty() {
            bail!("{envoy_path} is not mapped in process {pid}");
        }
        Ok(Layout {
            envoy_path: envoy_path.to_string(),
            ranges,
        })
    }

    fn region(&self, object: &str, function: &str) -> Region {
        if object == self.envoy_path {
            return Region::Envoy;
        }
        if object == "???" {
            let address = function
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            return match address {
                Some(a) if self.ranges.iter().any(|&(lo, hi)| lo <= a && a < hi) => {
                    Region::Tcmalloc
                }
                _ => Region::Generated,
            };
        }
        if object.contains("/libc.so") {
            Region::Libc
        } else {
            Region::Other
        }
    }
}

/// Parses one callgrind output file (format version 1, event `Ir` only, as this driver asks).
fn parse(text: &str, layout: &Layout, edges: bool) -> Result<(Option<u32>, Dump)> {
    // Callgrind compresses repeated names to `(id)`; objects and functions have a table each,
    // shared by the caller (`ob`, `fn`) and callee (`cob`, `cfn`) forms.
    let mut objects: HashMap<String, String> = HashMap::new();
    let mut functions: HashMap<String, String> = HashMap::new();
    fn resolve(table: &mut HashMap<String, String>, value: &str) -> String {
        let value = value.trim();
        if let Some(rest) = value.strip_prefix('(') {
            if let Some((id, name)) = rest.split_once(')') {
                let name = name.trim();
                if name.is_empty() {
                    return table.get(id).cloned().unwrap_or_default();
                }
                table.insert(id.to_string(), name.to_string());
                return name.to_string();
            }
        }
        value.to_string()
    }
    let mut thread = None;
    let mut dump = Dump::default();
    let (mut ob, mut func) = (String::new(), String::new());
    let (mut cob, mut cfn): (Option<String>, String) = (None, String::new());
    let mut pending_call: Option<u64> = None;
    let mut region = Region::Other;
    for line in text.lines() {
        let Some(first) = line.chars().next() else {
            continue;
        };
        if first.is_ascii_digit() || first == '+' || first == '-' || first == '*' {
            let cost: u64 = line
                .split_whitespace()
                .nth(1)
                .map(str::parse)
                .transpose()
                .with_context(|| format!("cost line {line:?}"))?
                .unwrap_or(0);
            if let Some(count) = pending_call.take() {
                let callee_ob = cob.take().unwrap_or_else(|| ob.clone());
                let callee = layout.region(&callee_ob, &cfn);
                if edges {
                    let e = dump
                        .edges
                        .entry(((region, func.clone()), (callee, cfn.clone())))
                        .or_default();
                    e.0 += count;
                    e.1 += cost;
                }
                match (region, callee) {
                    (Region::Generated, Region::Envoy) => {
                        dump.out_of_generated.0 += count;
                        dump.out_of_generated.1 += cost;
                    }
                    (Region::Envoy, Region::Generated) => {
                        dump.into_generated.0 += count;
                        dump.into_generated.1 += cost;
                    }
                    _ => {}
                }
            } else {
                *dump.by_region.entry(region).or_default() += cost;
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("thread:") {
            thread = rest.trim().parse().ok();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "ob" => {
                ob = resolve(&mut objects, value);
                region = layout.region(&ob, &func);
            }
            "fn" => {
                func = resolve(&mut functions, value);
                region = layout.region(&ob, &func);
                cob = None;
            }
            "cob" => cob = Some(resolve(&mut objects, value)),
            "cfn" => cfn = resolve(&mut functions, value),
            "calls" => {
                let count = value
                    .split_whitespace()
                    .next()
                    .map(str::parse)
                    .transpose()
                    .with_context(|| format!("calls line {line:?}"))?
                    .unwrap_or(0);
                pending_call = Some(count);
            }
            _ => {}
        }
    }
    Ok((thread, dump))
}

/// The per-thread dumps callgrind wrote since `seen` was taken, parsed.
fn read_new_dumps(
    dir: &Path,
    seen: &mut HashSet<PathBuf>,
    layout: &Layout,
    edges: bool,
) -> Result<BTreeMap<u32, Dump>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_dump = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("cg.out."));
        if !is_dump || seen.contains(&path) {
            continue;
        }
        seen.insert(path.clone());
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let (thread, dump) = parse(&text, layout, edges)?;
        out.entry(thread.unwrap_or(0))
            .or_insert_with(Dump::default)
            .add(&dump);
    }
    Ok(out)
}

fn callgrind_control(args: &[&str], pid: u32) -> Result<()> {
    // Always with the pid: without one, callgrind_control acts on every callgrind process.
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control (is valgrind installed?)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {args:?} {pid}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Dumps the counters and waits until the files are there.
fn dump(
    pid: u32,
    reason: &str,
    dir: &Path,
    seen: &mut HashSet<PathBuf>,
    layout: &Layout,
    edges: bool,
) -> Result<BTreeMap<u32, Dump>> {
    callgrind_control(&[&format!("--dump={reason}")], pid)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dumps = read_new_dumps(dir, seen, layout, edges)?;
        if !dumps.is_empty() {
            return Ok(dumps);
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no dump into {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One repetition: per-thread counts under load and when idle for as long.
struct Repetition {
    requests: usize,
    load: BTreeMap<u32, Dump>,
    idle: BTreeMap<u32, Dump>,
    /// Loaded run's length over the idle run's.
    scale: f64,
    failed: usize,
}

impl Repetition {
    /// Instructions per request: the loaded dump less the idle one (scaled), over the answered
    /// requests; `threads` picks which threads count.
    fn per_request(&self, f: impl Fn(&Dump) -> f64, threads: Option<u32>) -> f64 {
        let sum = |m: &BTreeMap<u32, Dump>| -> f64 {
            m.iter()
                .filter(|(t, _)| threads.is_none_or(|w| **t == w))
                .map(|(_, d)| f(d))
                .sum()
        };
        (sum(&self.load) - self.scale * sum(&self.idle)) / self.requests.max(1) as f64
    }

    /// The thread that ran the most instructions under load: Envoy's worker.
    fn worker(&self) -> Option<u32> {
        self.load
            .iter()
            .max_by_key(|(_, d)| d.total())
            .map(|(t, _)| *t)
    }
}

struct Counted {
    label: &'static str,
    name: &'static str,
    repetitions: Vec<Repetition>,
}

pub async fn run(args: InstructionsArgs) -> Result<()> {
    let real_envoy = sluice_tests::paths::envoy_bin()?;
    let real_envoy = std::fs::canonicalize(&real_envoy)?;
    // `.venv/bin/envoy` may be a launcher script; valgrind must run the binary itself.
    let binary = resolve_envoy_binary(&real_envoy)?;
    let binary_str = binary.to_string_lossy().to_string();
    eprintln!("[instructions] Envoy binary {binary_str}");

    let tmp = tempfile::Builder::new()
        .prefix("sluice-instructions-")
        .tempdir()?;
    let base = args
        .keep
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&base)?;

    let upstream = EnvoyConfig::new("bench/envoy/shadow-upstream.yaml")
        .start()
        .await?;
    super::pin(upstream.pid(), 0);
    let (primary, shadow) = (upstream.port(18000), upstream.port(18001));

    let mut counted = Vec::new();
    for name in &args.cases {
        let Some(spec) = CASES.iter().find(|c| c.name == name) else {
            bail!(
                "unknown case {name:?} (one of {})",
                CASES.map(|c| c.name).join(", ")
            );
        };
        let build_b = spec.name.ends_with("-b");
        if build_b && args.wasm_b.is_none() {
            bail!("case {} needs --wasm-b", spec.name);
        }
        if spec.name == "noop" {
            noop_filter_wasm()?;
        }
        let dir = base.join(spec.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let wrapper = dir.join("envoy-under-callgrind.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec valgrind --tool=callgrind --smc-check=all --separate-threads=yes \
                 --dump-instr=no --dump-line=no --callgrind-out-file={out} --log-file={log} {bin} \"$@\"\n",
                out = dir.join("cg.out").display(),
                log = dir.join("valgrind.log").display(),
                bin = binary_str,
            ),
        )?;
        make_executable(&wrapper)?;

        let mut config = EnvoyConfig::new(spec.file)
            .port_to(18000, primary)
            .port_to(18001, shadow)
            .ready_timeout(Duration::from_secs(args.ready_timeout));
        for (from, to) in spec.replace {
            config = config.replace(from, to);
        }
        if build_b {
            if let Some(w) = &args.wasm_b {
                config = config.wasm(w);
            }
        }
        eprintln!(
            "[instructions] {}: starting Envoy under callgrind",
            spec.label
        );
        // The harness starts $ENVOY_BIN; point it at the wrapper for this one start.
        let previous = std::env::var_os("ENVOY_BIN");
        std::env::set_var("ENVOY_BIN", &wrapper);
        let started = config.start().await;
        match previous {
            Some(p) => std::env::set_var("ENVOY_BIN", p),
            None => std::env::remove_var("ENVOY_BIN"),
        }
        let envoy = started?;
        let repetitions = measure(&args, &envoy, &dir, &binary_str, spec).await?;
        drop(envoy);
        counted.push(Counted {
            label: spec.label,
            name: spec.name,
            repetitions,
        });
    }
    drop(upstream);
    print_report(&counted, &args);
    if args.keep.is_some() {
        eprintln!("[instructions] callgrind files kept in {}", base.display());
    }
    Ok(())
}

async fn measure(
    args: &InstructionsArgs,
    envoy: &Envoy,
    dir: &Path,
    binary: &str,
    spec: &CaseSpec,
) -> Result<Vec<Repetition>> {
    let pid = envoy.pid();
    let layout = Layout::of(pid, binary)?;
    // Generous: the first requests wait for V8 to compile the module under valgrind.
    let client = HttpClient::new().with_timeout(Duration::from_secs(60));
    let load = |requests: usize, tag: String| {
        let client = client.clone();
        let url = envoy.url(10000, "/predict");
        let rate = args.rate;
        async move {
            open_loop(
                &client,
                &LoadArgs {
                    url,
                    rate,
                    duration: requests as f64 / rate.max(1) as f64,
                    user_header: "x-user-id".into(),
                },
                &tag,
            )
            .await
        }
    };
    let warm = load(args.warmup, format!("{}-warm", spec.name)).await?;
    eprintln!(
        "[instructions] {}: warm-up {} ok, {} failed",
        spec.label, warm.ok, warm.failed
    );
    let mut seen = HashSet::new();
    // Whatever was dumped so far (nothing, normally) is not part of any repetition.
    read_new_dumps(dir, &mut seen, &layout, false)?;
    let mut repetitions = Vec::new();
    for r in 0..args.repeats {
        callgrind_control(&["--zero"], pid)?;
        let t0 = Instant::now();
        let run = load(args.requests, format!("{}-r{r}", spec.name)).await?;
        let loaded_for = t0.elapsed();
        let load_dumps = dump(pid, &format!("load{r}"), dir, &mut seen, &layout, args.tree)?;
        callgrind_control(&["--zero"], pid)?;
        let t1 = Instant::now();
        tokio::time::sleep(loaded_for).await;
        let idle_dumps = dump(pid, &format!("idle{r}"), dir, &mut seen, &layout, false)?;
        let idle_for = t1.elapsed();
        let rep = Repetition {
            requests: run.ok,
            load: load_dumps,
            idle: idle_dumps,
            scale: loaded_for.as_secs_f64() / idle_for.as_secs_f64(),
            failed: run.failed,
        };
        eprintln!(
            "[instructions] {} repetition {}: {} ok, {} failed, {:.0} instructions/request ({:.0} on the worker thread)",
            spec.label,
            r + 1,
            run.ok,
            run.failed,
            rep.per_request(|d| d.total() as f64, None),
            rep.per_request(|d| d.total() as f64, rep.worker()),
        );
        repetitions.push(rep);
    }
    Ok(repetitions)
}

fn resolve_envoy_binary(path: &Path) -> Result<PathBuf> {
    let head = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if head.starts_with(b"\x7fELF") {
        return Ok(path.to_path_buf());
    }
    // The pip package's launcher: the binary sits in the package, `envoy/_bin/envoy`.
    let venv = path
        .parent()
        .and_then(Path::parent)
        .context("envoy launcher outside a virtualenv")?;
    for entry in std::fs::read_dir(venv.join("lib"))? {
        let candidate = entry?.path().join("site-packages/envoy/_bin/envoy");
        if candidate.is_file() {
            return Ok(std::fs::canonicalize(candidate)?);
        }
    }
    bail!(
        "{} is not an ELF binary and no envoy/_bin/envoy was found beside it",
        path.display()
    )
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path)?.permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms)?;
    Ok(())
}

fn median(v: Vec<f64>) -> f64 {
    super::median(v)
}

fn print_report(cases: &[Counted], args: &InstructionsArgs) {
    let per = |c: &Counted, f: &dyn Fn(&Repetition) -> f64| -> Vec<f64> {
        c.repetitions.iter().map(f).collect()
    };
    let total = |r: &Repetition| r.per_request(|d| d.total() as f64, None);
    let worker = |r: &Repetition| r.per_request(|d| d.total() as f64, r.worker());
    let baseline = cases
        .iter()
        .find(|c| c.name == "none")
        .map(|c| median(per(c, &total)));
    let floor = cases
        .iter()
        .find(|c| c.name == "noop")
        .map(|c| median(per(c, &total)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nInstructions per request (callgrind Ir, all threads, idle subtracted), {} repetitions × {} requests at {} req/s after {} warm-up requests; median and minimum of repetitions, and their spread ((max − min) / median). Noise here only adds work (a timer, a collection, the allocator returning memory), so compare builds by the minimum as well:\n",
        args.repeats, args.requests, args.rate, args.warmup
    );
    let _ = writeln!(
        out,
        "| case | instructions/request | minimum | spread | vs (a) | over (b) | worker thread | failed |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        let t = per(c, &total);
        let m = median(t.clone());
        let lo = t.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.1} % | {} | {} | {:.0} | {} |",
            c.label,
            m,
            lo,
            100.0 * (hi - lo) / m.abs().max(1.0),
            baseline.map_or("-".into(), |b| format!("{:.3}x", m / b)),
            floor.map_or("-".into(), |f| format!("{:+.0}", m - f)),
            median(per(c, &worker)),
            c.repetitions.iter().map(|r| r.failed).sum::<usize>(),
        );
    }
    let _ = writeln!(
        out,
        "\nWhere they ran (instructions/request, median of repetitions; Envoy's binary is stripped, so by code region):\n"
    );
    let mut header = String::from("| case |");
    for (_, name) in REGIONS {
        let _ = write!(header, " {name} |");
    }
    header.push_str(" calls generated → Envoy | their instructions | calls Envoy → generated | their instructions |");
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "|---|{}", "---:|".repeat(REGIONS.len() + 4));
    for c in cases {
        let mut row = format!("| {} |", c.label);
        for (region, _) in REGIONS {
            let v = median(per(c, &|r: &Repetition| {
                r.per_request(
                    |d| d.by_region.get(&region).copied().unwrap_or(0) as f64,
                    None,
                )
            }));
            let _ = write!(row, " {v:.0} |");
        }
        let cols: [&dyn Fn(&Dump) -> f64; 4] = [
            &|d| d.out_of_generated.0 as f64,
            &|d| d.out_of_generated.1 as f64,
            &|d| d.into_generated.0 as f64,
            &|d| d.into_generated.1 as f64,
        ];
        for f in cols {
            let v = median(per(c, &|r: &Repetition| r.per_request(f, None)));
            let _ = write!(row, " {v:.1} |");
        }
        let _ = writeln!(out, "{row}");
    }
    if args.tree {
        for c in cases {
            if let Some(r) = c.repetitions.last() {
                let _ = writeln!(
                    out,
                    "\nCall tree of {} (last repetition, per request):\n",
                    c.label
                );
                print_tree(&mut out, r);
            }
        }
    }
    println!("{out}");
}

/// The calls crossing between generated code and Envoy, and below each, three levels of callees
/// (calls per request, inclusive instructions per call). Callgrind keeps caller → callee edges,
/// not paths: below the first level a function's callees are those of all its callers.
fn print_tree(out: &mut String, r: &Repetition) {
    let mut edges: HashMap<&(Callee, Callee), (u64, u64)> = HashMap::new();
    for d in r.load.values() {
        for (k, (n, c)) in &d.edges {
            let e = edges.entry(k).or_default();
            e.0 += n;
            e.1 += c;
        }
    }
    let per = r.requests.max(1) as f64;
    let crossing = |from: Region, to: Region| {
        let mut v: Vec<(&Callee, u64, u64)> = Vec::new();
        for ((caller, callee), (n, c)) in &edges {
            if caller.0 == from && callee.0 == to {
                match v.iter_mut().find(|(k, _, _)| *k == callee) {
                    Some(e) => {
                        e.1 += n;
                        e.2 += c;
                    }
                    None => v.push((callee, *n, *c)),
                }
            }
        }
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v
    };
    fn below(
        out: &mut String,
        edges: &HashMap<&(Callee, Callee), (u64, u64)>,
        f: &Callee,
        depth: usize,
        per: f64,
    ) {
        if depth == 0 {
            return;
        }
        let mut kids: Vec<(&Callee, u64, u64)> = edges
            .iter()
            .filter(|((caller, _), _)| caller == f)
            .map(|((_, callee), (n, c))| (callee, *n, *c))
            .collect();
        kids.sort_by_key(|e| std::cmp::Reverse(e.2));
        for (callee, n, c) in kids.into_iter().take(8) {
            if (c as f64 / per) < 100.0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{:indent$}- {} [{:?}] {:.2}/request, {:.0} per call",
                "",
                callee.1,
                callee.0,
                n as f64 / per,
                c as f64 / n.max(1) as f64,
                indent = 2 * (4 - depth)
            );
            below(out, edges, callee, depth - 1, per);
        }
    }
    for (title, from, to) in [
        (
            "generated code → Envoy (host calls)",
            Region::Generated,
            Region::Envoy,
        ),
        (
            "Envoy → generated code (entries into the VM)",
            Region::Envoy,
            Region::Generated,
        ),
    ] {
        let _ = writeln!(out, "{title}:");
        for (callee, n, c) in crossing(from, to).into_iter().take(12) {
            let _ = writeln!(
                out,
                "- {} {:.2}/request, {:.0} per call, {:.0} per request",
                callee.1,
                n as f64 / per,
                c as f64 / n.max(1) as f64,
                c as f64 / per
            );
            if from == Region::Generated {
                below(out, &edges, callee, 3, per);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            envoy_path: "/opt/envoy".into(),
            ranges: vec![(0x1000, 0x2000)],
        }
    }

    // A dump shaped like callgrind's: compressed names, a call into generated code, a call out
    // of it back into Envoy, and a call without `cob=` right after one with it.
    const DUMP: &str = "# callgrind format
version: 1
thread: 3
positions: line
events: Ir
summary: 960

ob=(1) /opt/envoy
fl=(1) ???
fn=(1) 0x0000000000001000
0 100
cob=(2) ???
cfi=(1)
cfn=(2) 0x0000000000900000
calls=2 0
0 5000
fn=(3) 0x0000000000001100
0 50
cfn=(4) 0x0000000000001200
calls=1 0
0 30

ob=(2)
fl=(1)
fn=(2)
0 700
cob=(1)
cfn=(3)
calls=3 0
0 150
cfn=(5) 0x0000000000900100
calls=4 0
0 80
fn=(6) 0x0000000000001800
0 40

ob=(3) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(2) memcpy.S
fn=(7) memcpy
0 20
";

    #[test]
    fn regions_of_self_cost() {
        let (thread, dump) = parse(DUMP, &layout(), true).unwrap();
        assert_eq!(thread, Some(3));
        assert_eq!(dump.by_region.get(&Region::Envoy), Some(&150));
        assert_eq!(dump.by_region.get(&Region::Generated), Some(&700));
        // `???` inside the binary's mapping: tcmalloc's section.
        assert_eq!(dump.by_region.get(&Region::Tcmalloc), Some(&40));
        assert_eq!(dump.by_region.get(&Region::Libc), Some(&20));
        // Inclusive costs of calls are not self costs.
        assert_eq!(dump.total(), 910);
    }

    #[test]
    fn crossings_and_callee_object_per_call() {
        let (_, dump) = parse(DUMP, &layout(), true).unwrap();
        assert_eq!(dump.into_generated, (2, 5000));
        // The call to 0x900100 has no `cob=`: its object is the caller's (generated), not the
        // previous call's (Envoy), so it is not a host call.
        assert_eq!(dump.out_of_generated, (3, 150));
        let own = dump.edges.get(&(
            (Region::Generated, "0x0000000000900000".into()),
            (Region::Generated, "0x0000000000900100".into()),
        ));
        assert_eq!(own, Some(&(4, 80)));
    }

    #[test]
    fn idle_is_subtracted_scaled_to_the_loaded_run() {
        let (_, d) = parse(DUMP, &layout(), false).unwrap();
        let mut small = Dump::default();
        small.by_region.insert(Region::Envoy, 91);
        let rep = Repetition {
            requests: 10,
            load: BTreeMap::from([(1, d.clone()), (2, small.clone())]),
            idle: BTreeMap::from([(1, small.clone())]),
            scale: 2.0,
            failed: 0,
        };
        assert!(d.edges.is_empty());
        // (910 + 91 − 2 × 91) / 10
        assert!((rep.per_request(|x| x.total() as f64, None) - 81.9).abs() < 1e-9);
        assert_eq!(rep.worker(), Some(1));
        // Thread 1 alone: (910 − 182) / 10.
        assert!((rep.per_request(|x| x.total() as f64, Some(1)) - 72.8).abs() < 1e-9);
    }
}
