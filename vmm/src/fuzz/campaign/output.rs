//! The output directory in AFL++'s layout, so AFL++'s tools and other
//! instances (ours or afl-fuzz's) can read it:
//!
//! ```text
//! OUT/NAME/queue/id:000000,time:0,execs:0,orig:SEED
//! OUT/NAME/queue/id:000001,src:000000,time:812,execs:20481,op:havoc,rep:4,+cov
//! OUT/NAME/queue/id:000002,sync:OTHER,src:000007
//! OUT/NAME/crashes/id:000000,sig:06,src:000001,time:..,execs:..,op:havoc,rep:2
//! OUT/NAME/crashes/id:000001,sig:11,vec:14,src:...
//! OUT/NAME/crashes/README.txt
//! OUT/NAME/hangs/id:000000,src:...
//! OUT/NAME/fuzzer_stats
//! OUT/NAME/.synced/OTHER        (next id to import from OTHER, 4 bytes)
//! OUT/NAME/is_main_node         (-M instances)
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::CampaignError;
use crate::fuzz::Verdict;
use crate::fuzz::mutate::Mutation;

/// Where an input came from, for the name it is saved under.
#[derive(Clone, Copy, Debug)]
pub enum Origin<'a> {
    /// A file of the seed corpus.
    Seed(&'a str),
    /// A mutant of queue entry `src` (spliced with `other`).
    Mutant {
        /// The entry it was made from.
        src: u32,
        /// The entry spliced in, if any.
        other: Option<u32>,
        /// How it was made.
        how: Mutation,
    },
    /// An entry imported from another instance's queue.
    Sync {
        /// The other instance's name.
        from: &'a str,
        /// Its id there.
        src: u32,
    },
}

/// AFL++'s `describe_op`: the part of a file name after `id:NNNNNN,`.
pub fn describe(origin: Origin<'_>, time_ms: u64, execs: u64) -> String {
    match origin {
        Origin::Seed(name) => format!("time:0,execs:0,orig:{}", clean_name(name)),
        Origin::Mutant { src, other, how } => {
            let mut s = format!("src:{src:06}");
            if let Some(o) = other {
                let _ = write!(s, "+{o:06}");
            }
            let _ = write!(
                s,
                ",time:{time_ms},execs:{execs},op:{},rep:{}",
                how.stage, how.reps
            );
            s
        }
        Origin::Sync { from, src } => format!("sync:{from},src:{src:06}"),
    }
}

/// A seed's file name as it may appear in ours: no separators, bounded.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .take(128)
        .collect()
}

/// The name of a crash: AFL's signal number (06 for the target's own
/// failure verdict, as for `abort()`; 11 for a guest exception, as for a
/// segfault, with the exception vector after it).
pub fn crash_name(id: u32, verdict: &Verdict, desc: &str) -> String {
    match verdict {
        Verdict::Crash(c) => format!("id:{id:06},sig:11,vec:{:02},{desc}", c.vector),
        _ => format!("id:{id:06},sig:06,{desc}"),
    }
}

/// The queue, crash and hang directories of one instance.
#[derive(Debug)]
pub struct OutDir {
    root: PathBuf,
    tmp: AtomicU64,
}

impl OutDir {
    /// Creates `OUT/NAME` and its subdirectories; refuses one that already
    /// holds a campaign's queue, and one inside `input` (the seed corpus
    /// is never written to).
    pub fn create(
        out: &Path,
        name: &str,
        main: bool,
        input: &Path,
        readme: &str,
    ) -> Result<Self, CampaignError> {
        let root = out.join(name);
        let canonical_in = input.canonicalize().map_err(|e| CampaignError::Io {
            what: format!("cannot read the seed corpus {}", input.display()),
            source: e,
        })?;
        if resolved(&root).starts_with(&canonical_in) {
            return Err(CampaignError::Setup(format!(
                "the output directory {} is inside the seed corpus {}; the corpus is never written to",
                root.display(),
                input.display()
            )));
        }
        let queue = root.join("queue");
        if std::fs::read_dir(&queue).is_ok_and(|mut d| d.next().is_some()) {
            return Err(CampaignError::Setup(format!(
                "{} already holds a campaign (its queue is not empty): choose another --out or \
                 instance name, or remove it",
                root.display()
            )));
        }
        for sub in ["queue", "crashes", "hangs", ".synced"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|e| io(format!("cannot create {}", dir.display()), e))?;
        }
        let this = OutDir {
            root,
            tmp: AtomicU64::new(0),
        };
        if main {
            this.write(Path::new("is_main_node"), b"")?;
        }
        this.write(Path::new("crashes/README.txt"), readme.as_bytes())?;
        Ok(this)
    }

    /// `OUT/NAME`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `bytes` to `rel` (under `OUT/NAME`) at once: readers such as
    /// other instances see the whole file or none.
    pub fn write(&self, rel: &Path, bytes: &[u8]) -> Result<PathBuf, CampaignError> {
        let n = self.tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!(".tmp.{}.{n}", std::process::id()));
        let path = self.root.join(rel);
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io(format!("cannot write {}", path.display()), e))?;
        Ok(path)
    }
}

/// `path` with its longest existing ancestor resolved (symbolic links,
/// `..`), so two spellings of one directory compare equal.
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut p = path.to_path_buf();
    loop {
        if let Ok(c) = p.canonicalize() {
            return rest.iter().rev().fold(c, |acc, part| acc.join(part));
        }
        match (p.file_name().map(ToOwned::to_owned), p.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                p = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            _ => return path.to_path_buf(),
        }
    }
}

fn io(what: String, source: std::io::Error) -> CampaignError {
    CampaignError::Io { what, source }
}

/// What `fuzzer_stats` reports.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Unix time the campaign started.
    pub start_time: u64,
    /// Unix time of this report.
    pub last_update: u64,
    /// This process.
    pub fuzzer_pid: u32,
    /// Full passes over the queue.
    pub cycles_done: u64,
    /// Runs so far.
    pub execs_done: u64,
    /// Runs per second since the start.
    pub execs_per_sec: f64,
    /// Queue entries.
    pub corpus_count: usize,
    /// Favoured queue entries.
    pub corpus_favored: usize,
    /// Entries found by mutation.
    pub corpus_found: u64,
    /// Entries imported from other instances.
    pub corpus_imported: u64,
    /// Stability in percent.
    pub stability: f64,
    /// Map bytes covered, in percent of the map.
    pub bitmap_cvg: f64,
    /// Crashes saved (unique).
    pub saved_crashes: u64,
    /// Hangs saved (unique).
    pub saved_hangs: u64,
    /// Unix times of the last find, crash and hang (0: none yet).
    pub last_find: u64,
    /// See `last_find`.
    pub last_crash: u64,
    /// See `last_find`.
    pub last_hang: u64,
    /// The target's timeout in milliseconds.
    pub exec_timeout: u64,
    /// Map bytes covered.
    pub edges_found: usize,
    /// The command line.
    pub command_line: String,
}

impl Stats {
    /// AFL's `fuzzer_stats` format: `key<padding>: value` lines.
    pub fn render(&self) -> String {
        let run_time = self.last_update.saturating_sub(self.start_time);
        let rows: [(&str, String); 22] = [
            ("start_time", self.start_time.to_string()),
            ("last_update", self.last_update.to_string()),
            ("run_time", run_time.to_string()),
            ("fuzzer_pid", self.fuzzer_pid.to_string()),
            ("cycles_done", self.cycles_done.to_string()),
            ("execs_done", self.execs_done.to_string()),
            ("execs_per_sec", format!("{:.2}", self.execs_per_sec)),
            ("corpus_count", self.corpus_count.to_string()),
            ("corpus_favored", self.corpus_favored.to_string()),
            ("corpus_found", self.corpus_found.to_string()),
            ("corpus_imported", self.corpus_imported.to_string()),
            ("stability", format!("{:.2}%", self.stability)),
            ("bitmap_cvg", format!("{:.2}%", self.bitmap_cvg)),
            ("saved_crashes", self.saved_crashes.to_string()),
            ("saved_hangs", self.saved_hangs.to_string()),
            ("last_find", self.last_find.to_string()),
            ("last_crash", self.last_crash.to_string()),
            ("last_hang", self.last_hang.to_string()),
            ("exec_timeout", self.exec_timeout.to_string()),
            ("edges_found", self.edges_found.to_string()),
            ("target_mode", "vmm".to_string()),
            ("command_line", self.command_line.clone()),
        ];
        rows.iter().fold(String::new(), |mut s, (k, v)| {
            let _ = writeln!(s, "{k:<18}: {v}");
            s
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::Crash;

    #[test]
    fn names_follow_afl() {
        let how = Mutation {
            stage: "havoc",
            reps: 4,
        };
        let d = describe(
            Origin::Mutant {
                src: 3,
                other: Some(12),
                how,
            },
            812,
            20481,
        );
        assert_eq!(d, "src:000003+000012,time:812,execs:20481,op:havoc,rep:4");
        assert_eq!(
            describe(Origin::Seed("a/b\n"), 5, 5),
            "time:0,execs:0,orig:a_b_"
        );
        assert_eq!(
            describe(Origin::Sync { from: "m1", src: 7 }, 0, 0),
            "sync:m1,src:000007"
        );
        let fault = Verdict::Crash(Crash {
            vector: 14,
            rip: 0,
            error: 0,
            cr2: 0,
        });
        assert_eq!(crash_name(1, &fault, "x"), "id:000001,sig:11,vec:14,x");
        assert_eq!(crash_name(0, &Verdict::Fail(3), "x"), "id:000000,sig:06,x");
    }

    #[test]
    fn stats_are_key_colon_value_lines() {
        let s = Stats {
            start_time: 100,
            last_update: 160,
            execs_done: 7,
            stability: 99.5,
            ..Default::default()
        }
        .render();
        assert!(s.contains("start_time        : 100\n"), "{s}");
        assert!(s.contains("run_time          : 60\n"));
        assert!(s.contains("stability         : 99.50%\n"));
        for line in s.lines() {
            assert_eq!(line.find(": "), Some(18), "{line}");
        }
    }
}
