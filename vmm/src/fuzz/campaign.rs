//! The built-in fuzzer (`vmm fuzz`): AFL's loop over [`Target`]s.
//!
//! `jobs` threads each own a target (made by the caller's factory, so any
//! [`Target`] plugs in) and share one queue behind a lock. Each picks an
//! entry, mutates it (havoc, sometimes spliced with another entry) as
//! often as the entry's energy says, runs every mutant, and keeps a mutant
//! that shows new coverage: it is written to the queue and calibrated
//! (re-run to measure its speed and which map bytes vary, AFL's stability).
//! Crashes and hangs are saved when their edges are new. The output
//! directory is AFL++'s (see [`output`]); with a role (`-M`/`-S`) thread 0
//! also imports other instances' finds (see [`sync`]).

mod output;
mod sync;
mod worker;

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::corpus::Corpus;
use super::mutate::MAX_INPUT;
use super::{FuzzError, Target};
use output::OutDir;
pub use output::{Origin, Stats};
use sync::Syncer;
use worker::Worker;

/// `fuzzer_stats` refresh.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Errors that stop a campaign.
#[derive(Debug, Error)]
pub enum CampaignError {
    /// A file or directory could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// Bad options, corpus or output directory.
    #[error("{0}")]
    Setup(String),
    /// The target failed (not a verdict: the VM itself).
    #[error(transparent)]
    Target(#[from] FuzzError),
}

/// An instance's part in a group sharing one output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// On its own, in `OUT/default`; imports nothing.
    Alone,
    /// `-M NAME`: imports from every sibling.
    Main(String),
    /// `-S NAME`: imports from main instances.
    Secondary(String),
}

impl Role {
    /// The instance's directory name in `OUT`.
    pub fn name(&self) -> &str {
        match self {
            Role::Alone => "default",
            Role::Main(n) | Role::Secondary(n) => n,
        }
    }
}

/// Checks an instance name: letters, digits, `-`, `_`, `.` (not first).
pub fn check_name(name: &str) -> Result<(), CampaignError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CampaignError::Setup(format!(
            "`{name}` is not an instance name: use 1-64 letters, digits, `-`, `_` or `.` (not first)"
        )))
    }
}

/// What a campaign does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The seed corpus: every file in it, never written to.
    pub corpus: PathBuf,
    /// The output directory `OUT` (this instance writes `OUT/NAME`).
    pub out: PathBuf,
    /// Alone, or main or secondary of a group.
    pub role: Role,
    /// Fuzzing threads, one target each.
    pub jobs: usize,
    /// Stop after this long (never, if None).
    pub max_time: Option<Duration>,
    /// Import other instances' entries this often (with a role).
    pub sync_every: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Print a live status line on stderr.
    pub status: bool,
    /// The target's timeout, for `fuzzer_stats`.
    pub exec_timeout: Duration,
    /// The command line, for `fuzzer_stats` and `crashes/README.txt`.
    pub command_line: String,
    /// How to re-run a saved input, for `crashes/README.txt`.
    pub reproduce: String,
}

impl Options {
    /// Options with defaults: alone, one job, no time limit, a sync every
    /// minute, a seed from the clock, a status line.
    pub fn new(corpus: &Path, out: &Path) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Options {
            corpus: corpus.to_path_buf(),
            out: out.to_path_buf(),
            role: Role::Alone,
            jobs: 1,
            max_time: None,
            sync_every: Duration::from_secs(60),
            seed: now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32,
            status: true,
            exec_timeout: Duration::ZERO,
            command_line: String::new(),
            reproduce: String::new(),
        }
    }
}

/// How a campaign ended.
#[derive(Clone, Debug)]
pub struct Summary {
    /// `OUT/NAME`.
    pub out_dir: PathBuf,
    /// How long it ran.
    pub elapsed: Duration,
    /// Runs.
    pub execs: u64,
    /// Queue entries.
    pub corpus: usize,
    /// Queue entries found by mutation.
    pub found: u64,
    /// Queue entries imported from other instances.
    pub imported: u64,
    /// Crashes saved.
    pub crashes: u64,
    /// Hangs saved.
    pub hangs: u64,
    /// Stability in percent.
    pub stability: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{}: {:.1} s, {} runs ({:.0}/s), corpus {} ({} found, {} imported), {} crashes and \
             {} hangs saved, stability {:.2}%",
            self.out_dir.display(),
            secs,
            self.execs,
            self.execs as f64 / secs.max(1e-3),
            self.corpus,
            self.found,
            self.imported,
            self.crashes,
            self.hangs,
            self.stability
        )
    }
}

/// Runs a campaign until `max_time`, `stop` or an error. `make_target` is
/// called once per job.
pub fn run(
    options: &Options,
    make_target: &mut dyn FnMut() -> Result<Box<dyn Target>, FuzzError>,
    stop: &AtomicBool,
) -> Result<Summary, CampaignError> {
    let name = options.role.name();
    check_name(name)?;
    if options.jobs == 0 {
        return Err(CampaignError::Setup("--jobs must be at least 1".into()));
    }
    let seeds = read_seeds(&options.corpus)?;
    let out = OutDir::create(
        &options.out,
        name,
        matches!(options.role, Role::Main(_)),
        &options.corpus,
        &readme(options),
    )?;
    let mut targets = (0..options.jobs)
        .map(|_| make_target())
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Shared {
        state: Mutex::new(State {
            corpus: Corpus::new(),
            ..State::default()
        }),
        out,
        execs: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        start_unix: unix_now(),
        options: options.clone(),
    };
    let syncer = (options.role != Role::Alone)
        .then(|| Syncer::new(&options.out, name, matches!(options.role, Role::Main(_))));
    let mut workers: Vec<Worker<'_>> = targets
        .drain(..)
        .enumerate()
        .map(|(i, t)| Worker::new(i, t, &shared))
        .collect();
    workers[0].syncer = syncer;
    workers[0].dry_run(&seeds)?;

    let mut failure = None;
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|w| s.spawn(move || w.run()))
            .collect();
        monitor(&shared, stop);
        shared.stop.store(true, Ordering::Relaxed);
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(CampaignError::Setup("a fuzzing thread panicked".into())));
            if let Err(e) = r {
                failure.get_or_insert(e);
            }
        }
    });
    let stats = shared.stats();
    shared.write_stats(&stats);
    if options.status {
        let tty = std::io::stderr().is_terminal();
        let line = shared.status_line(stats.execs_per_sec);
        eprintln!("{}{line}", if tty { "\r" } else { "" });
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Summary {
        out_dir: shared.out.root().to_path_buf(),
        elapsed: shared.start.elapsed(),
        execs: stats.execs_done,
        corpus: stats.corpus_count,
        found: stats.corpus_found,
        imported: stats.corpus_imported,
        crashes: stats.saved_crashes,
        hangs: stats.saved_hangs,
        stability: stats.stability,
    })
}

/// Every file below `dir`, by path, named by its path relative to `dir`.
fn read_seeds(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, CampaignError> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        CampaignError::Setup(format!(
            "cannot read the seed corpus {}: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(CampaignError::Setup(format!(
            "the seed corpus {} is not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let list = std::fs::read_dir(&d).map_err(|e| CampaignError::Io {
            what: format!("cannot list {}", d.display()),
            source: e,
        })?;
        for entry in list.filter_map(Result::ok) {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(_) if path.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(CampaignError::Setup(format!(
            "the seed corpus {} holds no files: put at least one input in it",
            dir.display()
        )));
    }
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).map_err(|e| CampaignError::Io {
                what: format!("cannot read the seed {}", p.display()),
                source: e,
            })?;
            if data.len() > MAX_INPUT {
                return Err(CampaignError::Setup(format!(
                    "the seed {} is {} bytes; inputs are at most {MAX_INPUT}",
                    p.display(),
                    data.len()
                )));
            }
            let name = p
                .strip_prefix(dir)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            Ok((name, data))
        })
        .collect()
}

fn readme(options: &Options) -> String {
    format!(
        "Command line used to find these crashes:\n\n  {}\n\n\
         Each file here is an input that made the target fail. The name says how:\n\
         \x20 sig:06        the target reported failure (DONE with a non-zero status)\n\
         \x20 sig:11,vec:N  the guest took exception vector N (14 page fault, 13 general\n\
         \x20               protection, 6 invalid opcode, 0 divide error, ...)\n\
         then the queue entry it came from (src:), when (time: in ms, execs:) and how\n\
         (op:, rep:). Only crashes that took an edge no earlier crash took are kept.\n\n\
         To run one again:\n\n  {}\n",
        options.command_line, options.reproduce
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The queue and counters, behind the lock.
#[derive(Debug, Default)]
struct State {
    corpus: Corpus,
    found: u64,
    imported: u64,
    saved_crashes: u64,
    saved_hangs: u64,
    last_find: u64,
    last_crash: u64,
    last_hang: u64,
}

/// What the threads share.
struct Shared {
    state: Mutex<State>,
    out: OutDir,
    execs: AtomicU64,
    stop: AtomicBool,
    start: Instant,
    start_unix: u64,
    options: Options,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn stats(&self) -> Stats {
        let execs = self.execs.load(Ordering::Relaxed);
        let st = self.lock();
        let edges = st.corpus.virgin.covered();
        Stats {
            start_time: self.start_unix,
            last_update: unix_now(),
            fuzzer_pid: std::process::id(),
            cycles_done: st.corpus.cycles,
            execs_done: execs,
            execs_per_sec: execs as f64 / self.start.elapsed().as_secs_f64().max(1e-3),
            corpus_count: st.corpus.len(),
            corpus_favored: st.corpus.favoured(),
            corpus_found: st.found,
            corpus_imported: st.imported,
            stability: st.corpus.stability(),
            bitmap_cvg: 100.0 * edges as f64 / super::MAP_SIZE as f64,
            saved_crashes: st.saved_crashes,
            saved_hangs: st.saved_hangs,
            last_find: st.last_find,
            last_crash: st.last_crash,
            last_hang: st.last_hang,
            exec_timeout: self.options.exec_timeout.as_millis() as u64,
            edges_found: edges,
            command_line: self.options.command_line.clone(),
        }
    }

    fn write_stats(&self, stats: &Stats) {
        if let Err(e) = self
            .out
            .write(Path::new("fuzzer_stats"), stats.render().as_bytes())
        {
            log::warn!("{}", crate::error_chain(&e));
        }
    }

    fn status_line(&self, rate: f64) -> String {
        let s = self.stats();
        format!(
            "[{}] {:>6.0} s | {:>8.0} execs/s | corpus {} ({} favoured, {} imported) | crashes {} \
             | hangs {} | stability {:.2}%",
            self.options.role.name(),
            self.start.elapsed().as_secs_f64(),
            rate,
            s.corpus_count,
            s.corpus_favored,
            s.corpus_imported,
            s.saved_crashes,
            s.saved_hangs,
            s.stability
        )
    }
}

/// Waits for the end (time, `stop`, or a thread's error), refreshing the
/// status line and `fuzzer_stats` meanwhile.
fn monitor(shared: &Shared, stop: &AtomicBool) {
    let options = &shared.options;
    let deadline = options.max_time.map(|t| shared.start + t);
    let tty = std::io::stderr().is_terminal();
    let status_every = Duration::from_millis(if tty { 250 } else { 10_000 });
    let (mut last_status, mut last_stats) = (Instant::now(), Instant::now());
    let (mut sample_at, mut sample_execs, mut rate) = (Instant::now(), 0u64, 0.0);
    while !shared.stopped()
        && !stop.load(Ordering::Relaxed)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        std::thread::sleep(Duration::from_millis(50));
        if sample_at.elapsed() >= Duration::from_secs(1) {
            let execs = shared.execs.load(Ordering::Relaxed);
            rate = (execs - sample_execs) as f64 / sample_at.elapsed().as_secs_f64();
            (sample_at, sample_execs) = (Instant::now(), execs);
        }
        if options.status && last_status.elapsed() >= status_every {
            last_status = Instant::now();
            let line = shared.status_line(rate);
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
        }
        if last_stats.elapsed() >= STATS_EVERY {
            last_stats = Instant::now();
            shared.write_stats(&shared.stats());
        }
    }
}

#[cfg(test)]
mod tests;
