//! Campaigns against the simulated target ([`crate::fuzz::mock::Maze`]).

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::*;
use crate::fuzz::Verdict;
use crate::fuzz::mock::{self, Maze, scratch_dir};

/// A factory of simulated targets.
fn mazes(flaky: bool) -> impl FnMut() -> Result<Box<dyn Target>, FuzzError> {
    move || Ok(Box::new(if flaky { Maze::flaky() } else { Maze::new() }) as Box<dyn Target>)
}

fn options(corpus: &Path, out: &Path) -> Options {
    Options {
        status: false,
        seed: 1234,
        command_line: "vmm fuzz --program t.elf".into(),
        reproduce: "vmm fuzz-target --program t.elf FILE".into(),
        ..Options::new(corpus, out)
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `done` every 50 ms until it holds or `limit` passes, then sets
/// `stop`; returns whether it held.
fn wait_for(limit: Duration, stop: &AtomicBool, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < limit {
        if done() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    ok
}

#[test]
fn two_jobs_find_every_planted_bug_in_afl_layout() {
    let dir = scratch_dir("campaign-bugs");
    let (corpus, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(corpus.join("sub")).unwrap();
    // Seeds two bytes short of each bug (each byte matched is an edge, so
    // coverage leads there), and one that crashes by itself.
    for (name, seed) in [
        ("hello", &b"hello"[..]),
        ("magic", b"MAGIC"),
        ("cra", b"CRA"),
        ("ha", b"HA"),
    ] {
        std::fs::write(corpus.join(name), seed).unwrap();
    }
    std::fs::write(corpus.join("sub/crashes"), b"CRASH!").unwrap();
    // A few seconds in release builds, up to a minute or so in debug ones.
    let opts = Options {
        jobs: 2,
        max_time: Some(Duration::from_secs(300)),
        ..options(&corpus, &out)
    };
    let stop = AtomicBool::new(false);
    let crashes = out.join("default/crashes");
    let hangs = out.join("default/hangs");
    let (summary, found) = std::thread::scope(|s| {
        let h = s.spawn(|| run(&opts, &mut mazes(false), &stop));
        let found = wait_for(Duration::from_secs(240), &stop, || {
            let c = names(&crashes);
            c.iter().any(|n| n.contains(",sig:06,src:"))
                && c.iter().any(|n| n.contains(",sig:11,vec:14,src:"))
                && names(&hangs).iter().any(|n| n.contains(",src:"))
        });
        (h.join().unwrap(), found)
    });
    let summary = summary.unwrap();
    assert!(
        found,
        "not every bug was found: {summary}\n{:?}",
        names(&crashes)
    );

    // The seed that crashes is saved as a crash, the other queued.
    let queue = names(&out.join("default/queue"));
    let seeds = ["cra", "ha", "hello", "magic"].map(|s| format!("time:0,execs:0,orig:{s}"));
    for (i, s) in seeds.iter().enumerate() {
        assert_eq!(queue[i], format!("id:{i:06},{s}"), "{queue:?}");
    }
    assert!(
        queue
            .iter()
            .skip(4)
            .all(|n| n.contains(",src:") && n.contains(",op:"))
    );
    assert!(queue.iter().any(|n| n.ends_with(",+cov")));
    let crash_names = names(&crashes);
    assert!(
        crash_names.iter().any(|n| n.ends_with("orig:sub_crashes")),
        "{crash_names:?}"
    );
    assert!(crash_names.contains(&"README.txt".to_string()));
    let readme = std::fs::read_to_string(crashes.join("README.txt")).unwrap();
    assert!(readme.contains("vmm fuzz-target --program t.elf FILE"));

    // Every saved input does what its name says.
    let mut maze = Maze::new();
    for n in crash_names.iter().filter(|n| n.starts_with("id:")) {
        let v = maze.run(&std::fs::read(crashes.join(n)).unwrap()).unwrap();
        match v {
            Verdict::Fail(mock::FAIL_STATUS) => assert!(n.contains(",sig:06,"), "{n}"),
            Verdict::Crash(c) => {
                assert!(n.contains(&format!(",sig:11,vec:{:02},", c.vector)), "{n}")
            }
            other => panic!("{n} gives {other}"),
        }
    }
    for n in names(&hangs) {
        assert_eq!(
            maze.run(&std::fs::read(hangs.join(&n)).unwrap()).unwrap(),
            Verdict::Hang
        );
    }

    // AFL's fuzzer_stats.
    let stats = std::fs::read_to_string(out.join("default/fuzzer_stats")).unwrap();
    for key in [
        "start_time",
        "last_update",
        "fuzzer_pid",
        "execs_done",
        "execs_per_sec",
        "corpus_count",
        "saved_crashes",
        "saved_hangs",
        "stability",
    ] {
        assert!(
            stats.contains(&format!("\n{key:<18}: ")) || stats.starts_with(key),
            "{key}:\n{stats}"
        );
    }
    assert!(stats.contains(&format!("fuzzer_pid        : {}\n", std::process::id())));
    assert!(stats.contains(&format!("saved_crashes     : {}\n", summary.crashes)));
    assert!(stats.contains("stability         : 100.00%\n"), "{stats}");
    assert_eq!(summary.corpus, queue.len());
    // The seed corpus is as it was.
    assert_eq!(names(&corpus), ["cra", "ha", "hello", "magic", "sub"]);
    assert_eq!(names(&corpus.join("sub")), ["crashes"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stops_by_itself_and_measures_stability() {
    let dir = scratch_dir("campaign-flaky");
    let (corpus, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a"), b"abc").unwrap();
    let opts = Options {
        max_time: Some(Duration::from_millis(600)),
        ..options(&corpus, &out)
    };
    let t = Instant::now();
    let summary = run(&opts, &mut mazes(true), &AtomicBool::new(false)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(summary.execs > 0);
    // One byte of the map varies from run to run.
    assert!(
        summary.stability < 100.0 && summary.stability > 50.0,
        "{summary}"
    );
    let stats = std::fs::read_to_string(out.join("default/fuzzer_stats")).unwrap();
    assert!(
        stats.contains(&format!("stability         : {:.2}%\n", summary.stability)),
        "{stats}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_corpus_output_and_names_are_refused() {
    let dir = scratch_dir("campaign-refuse");
    let (corpus, out) = (dir.join("in"), dir.join("out"));
    let stop = AtomicBool::new(false);
    let err = |o: &Options| run(o, &mut mazes(false), &stop).unwrap_err().to_string();

    let e = err(&options(&corpus, &out));
    assert!(
        e.contains("cannot read the seed corpus") && e.contains("in"),
        "{e}"
    );
    std::fs::create_dir_all(&corpus).unwrap();
    let e = err(&options(&corpus, &out));
    assert!(e.contains("holds no files"), "{e}");
    std::fs::write(corpus.join("crash"), b"CRASH").unwrap();
    let e = err(&options(&corpus, &out));
    assert!(e.contains("every seed"), "{e}");

    std::fs::write(corpus.join("ok"), b"ok").unwrap();
    let e = err(&options(&corpus, &corpus.join("out")));
    assert!(e.contains("inside the seed corpus"), "{e}");
    let o = Options {
        role: Role::Main("../x".into()),
        ..options(&corpus, &out)
    };
    assert!(err(&o).contains("not an instance name"));
    let o = Options {
        jobs: 0,
        ..options(&corpus, &out)
    };
    assert!(err(&o).contains("--jobs"));

    // A finished campaign's directory is not reused.
    let o = Options {
        max_time: Some(Duration::from_millis(100)),
        ..options(&corpus, &out)
    };
    run(&o, &mut mazes(false), &stop).unwrap();
    assert!(err(&o).contains("already holds a campaign"));
    assert_eq!(names(&corpus), ["crash", "ok"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_instances_combine_their_finds_through_sync() {
    // The two-part bug needs PREFIX, which only A's seeds hold, and
    // SUFFIX, which only B's seeds hold; neither can be found by mutation.
    let dir = scratch_dir("campaign-sync");
    let out = dir.join("out");
    let seed = |name: &str, at: usize, half: &[u8; 8]| {
        let corpus = dir.join(name);
        std::fs::create_dir_all(&corpus).unwrap();
        let mut data = vec![b'.'; 16];
        data[at..at + 8].copy_from_slice(half);
        std::fs::write(corpus.join("half"), data).unwrap();
        corpus
    };
    let (in_a, in_b) = (
        seed("in-a", 0, &mock::PREFIX),
        seed("in-b", 8, &mock::SUFFIX),
    );
    let instance = |corpus: &Path, role: Role, seed: u64| Options {
        role,
        seed,
        sync_every: Duration::from_millis(200),
        max_time: Some(Duration::from_secs(120)),
        ..options(corpus, &out)
    };
    let a = instance(&in_a, Role::Main("a".into()), 1);
    let b = instance(&in_b, Role::Secondary("b".into()), 2);
    let stop = AtomicBool::new(false);
    let two_part = |n: &String| n.contains(",sig:11,vec:06,");
    let (ra, rb, found) = std::thread::scope(|s| {
        let ha = s.spawn(|| run(&a, &mut mazes(false), &stop));
        let hb = s.spawn(|| run(&b, &mut mazes(false), &stop));
        let found = wait_for(Duration::from_secs(90), &stop, || {
            names(&out.join("a/crashes")).iter().any(two_part)
                || names(&out.join("b/crashes")).iter().any(two_part)
        });
        (ha.join().unwrap(), hb.join().unwrap(), found)
    });
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(found, "no instance found the two-part bug:\n{ra}\n{rb}");
    assert!(ra.imported + rb.imported > 0);

    // What was imported is under AFL's names and marked as looked at.
    let imports = |me: &str, from: &str| {
        let marked = std::fs::read(out.join(me).join(".synced").join(from))
            .map(|m| u32::from_ne_bytes(m.try_into().expect("a 4-byte mark")))
            .unwrap_or(0);
        let names: Vec<_> = names(&out.join(me).join("queue"))
            .into_iter()
            .filter(|n| n.contains(&format!(",sync:{from},src:")))
            .collect();
        (names.len(), marked)
    };
    let (a_from_b, b_from_a) = (imports("a", "b"), imports("b", "a"));
    assert!(
        (a_from_b.0 > 0 && a_from_b.1 >= 1) || (b_from_a.0 > 0 && b_from_a.1 >= 1),
        "imports and marks: a from b {a_from_b:?}, b from a {b_from_a:?}"
    );
    assert!(out.join("a/is_main_node").exists() && !out.join("b/is_main_node").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The planted guest's logic: an edge per byte of "FUZZ" matched in
/// order, one more when the input goes on after it; nothing else counts.
struct Prefix {
    map: Vec<u8>,
}

impl Target for Prefix {
    fn run(&mut self, input: &[u8]) -> Result<Verdict, FuzzError> {
        self.map.fill(0);
        self.map[1] = 1;
        let matched = input
            .iter()
            .zip(b"FUZZ")
            .take_while(|(a, b)| a == b)
            .count();
        for i in 0..matched {
            self.map[10 + i] = 1;
        }
        if matched == 4 && input.len() > 4 {
            self.map[20] = 1;
        }
        Ok(Verdict::Ok)
    }

    fn coverage(&self) -> &[u8] {
        &self.map
    }
}

#[test]
fn new_entries_are_trimmed_to_the_bytes_their_path_needs() {
    let dir = scratch_dir("campaign-trim");
    let (corpus, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&corpus).unwrap();
    // Every mutant of this seed is long; the one that completes "FUZZ"
    // takes a new path that its first five bytes alone take.
    let mut seed = b"FUZ".to_vec();
    seed.resize(3000, b'x');
    std::fs::write(corpus.join("long"), &seed).unwrap();
    let opts = Options {
        max_time: Some(Duration::from_secs(120)),
        ..options(&corpus, &out)
    };
    let stop = AtomicBool::new(false);
    let queue = out.join("default/queue");
    let found = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut prefix = || {
                Ok(Box::new(Prefix {
                    map: vec![0; crate::fuzz::MAP_SIZE],
                }) as Box<dyn Target>)
            };
            run(&opts, &mut prefix, &stop)
        });
        let found = wait_for(Duration::from_secs(90), &stop, || {
            names(&queue).iter().any(|n| n.contains(",src:000000,"))
        });
        h.join().unwrap().unwrap();
        found
    });
    assert!(found, "no find: {:?}", names(&queue));
    for n in names(&queue).iter().filter(|n| n.contains(",src:")) {
        let data = std::fs::read(queue.join(n)).unwrap();
        assert!(
            data.starts_with(b"FUZZ") && data.len() <= 8,
            "{n} kept {} bytes: {:?}",
            data.len(),
            String::from_utf8_lossy(&data[..data.len().min(16)])
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
