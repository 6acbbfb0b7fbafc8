//! One fuzzing thread: picks queue entries, mutates and runs them, keeps
//! what is new, calibrates new entries, and (thread 0 of an instance with
//! a role) imports other instances' entries.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::output::{Origin, crash_name, describe};
use super::sync::Syncer;
use super::{CampaignError, Shared, unix_now};
use crate::fuzz::Target;
use crate::fuzz::Verdict;
use crate::fuzz::corpus::{NewBits, Trace, Virgin};
use crate::fuzz::mutate::{MAX_INPUT, Mutator};

/// Runs of a new entry to measure it (AFL's `CAL_CYCLES`).
const CAL_RUNS: u32 = 8;
/// One mutant in this many is spliced with another entry first.
const SPLICE_ONE_IN: usize = 3;
/// Entries offered for splicing with each pick.
const SPLICE_PARTNERS: usize = 8;
/// Trimming (AFL's `trim_case`) first removes blocks of 1/16 of the
/// input's length rounded up to a power of two, halving down to 1/1024,
/// and never blocks under 4 bytes.
const TRIM_START_STEPS: usize = 16;
const TRIM_END_STEPS: usize = 1024;
const TRIM_MIN_BYTES: usize = 4;

/// An entry picked for fuzzing.
struct Pick {
    id: u32,
    data: Arc<[u8]>,
    depth: u32,
    energy: u32,
    partners: Vec<(u32, Arc<[u8]>)>,
}

/// One fuzzing thread.
pub(super) struct Worker<'a> {
    target: Box<dyn Target>,
    mutator: Mutator,
    shared: &'a Shared,
    /// Local copies of the virgin maps: what this thread has seen is a
    /// subset of what all have, so "nothing new here" needs no lock.
    seen: Virgin,
    seen_crash: Virgin,
    seen_hang: Virgin,
    pub(super) syncer: Option<Syncer>,
    next_sync: Instant,
}

impl<'a> Worker<'a> {
    pub(super) fn new(index: usize, target: Box<dyn Target>, shared: &'a Shared) -> Self {
        let seed = shared.options.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Worker {
            target,
            mutator: Mutator::new(seed),
            shared,
            seen: Virgin::default(),
            seen_crash: Virgin::default(),
            seen_hang: Virgin::default(),
            syncer: None,
            next_sync: Instant::now(),
        }
    }

    pub(super) fn run(mut self) -> Result<(), CampaignError> {
        let r = self.fuzz();
        if r.is_err() {
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Runs the seeds: the clean ones go into the queue, the others into
    /// `crashes/` or `hangs/`.
    pub(super) fn dry_run(&mut self, seeds: &[(String, Vec<u8>)]) -> Result<(), CampaignError> {
        for (name, data) in seeds {
            let (verdict, us) = self.exec(data)?;
            if verdict.is_crash() || verdict == Verdict::Hang {
                if self.shared.options.status {
                    eprintln!("vmm fuzz: the seed {name} ends in {verdict}; kept out of the queue");
                }
                self.save_fault(data, Origin::Seed(name), &verdict)?;
                continue;
            }
            let trace = Trace::classify(self.target.coverage());
            self.seen.merge(&trace);
            let index = {
                let mut st = self.shared.lock();
                st.corpus.virgin.merge(&trace);
                let index = st.corpus.push(data, 0);
                let desc = describe(Origin::Seed(name), 0, 0);
                self.shared.out.write(
                    &Path::new("queue").join(format!("id:{index:06},{desc}")),
                    data,
                )?;
                index
            };
            self.calibrate(index, data, &trace, us)?;
        }
        if self.shared.lock().corpus.is_empty() {
            return Err(CampaignError::Setup(format!(
                "every seed in {} crashes or hangs (see {}); the fuzzer needs one that runs cleanly",
                self.shared.options.corpus.display(),
                self.shared.out.root().display()
            )));
        }
        Ok(())
    }

    fn fuzz(&mut self) -> Result<(), CampaignError> {
        while !self.shared.stopped() {
            if self.syncer.is_some() && Instant::now() >= self.next_sync {
                self.sync()?;
                self.next_sync = Instant::now() + self.shared.options.sync_every;
            }
            let Some(pick) = self.pick() else {
                return Err(CampaignError::Setup("the queue is empty".into()));
            };
            for _ in 0..pick.energy {
                if self.shared.stopped() {
                    break;
                }
                let rng = self.mutator.rng();
                let partner = (!pick.partners.is_empty() && rng.one_in(SPLICE_ONE_IN))
                    .then(|| &pick.partners[rng.below(pick.partners.len())]);
                let spliced = partner.and_then(|(id, b)| {
                    let (d, how) = self.mutator.splice(&pick.data, b)?;
                    Some((d, how, Some(*id)))
                });
                let (data, how, other) = spliced.unwrap_or_else(|| {
                    let mut d = pick.data.to_vec();
                    let how = self.mutator.havoc(&mut d);
                    (d, how, None)
                });
                let origin = Origin::Mutant {
                    src: pick.id,
                    other,
                    how,
                };
                self.execute(&data, origin, pick.depth + 1)?;
            }
        }
        Ok(())
    }

    fn pick(&mut self) -> Option<Pick> {
        let mut st = self.shared.lock();
        let rng = self.mutator.rng();
        let (index, energy) = st.corpus.next(rng)?;
        let e = st.corpus.get(index)?;
        let (id, data, depth) = (e.id, e.data.clone(), e.depth);
        let n = st.corpus.len();
        let partners = (0..SPLICE_PARTNERS.min(n - 1))
            .filter_map(|_| {
                let j = rng.below(n);
                let p = st.corpus.get(j)?;
                (j != index).then(|| (p.id, p.data.clone()))
            })
            .collect();
        Some(Pick {
            id,
            data,
            depth,
            energy,
            partners,
        })
    }

    /// Imports siblings' new entries that show new coverage here.
    fn sync(&mut self) -> Result<(), CampaignError> {
        let Some(syncer) = self.syncer.take() else {
            return Ok(());
        };
        let r = (|| {
            for p in syncer.pending()? {
                let mut next = syncer.mark(&p.sibling);
                for (id, path) in &p.entries {
                    if self.shared.stopped() {
                        break;
                    }
                    next = id + 1;
                    let Ok(data) = std::fs::read(path) else {
                        continue;
                    };
                    if !data.is_empty() && data.len() <= MAX_INPUT {
                        let origin = Origin::Sync {
                            from: &p.sibling,
                            src: *id,
                        };
                        self.execute(&data, origin, 0)?;
                    }
                }
                syncer.done(&p.sibling, next)?;
            }
            Ok(())
        })();
        self.syncer = Some(syncer);
        r
    }

    /// One run, counted.
    fn exec(&mut self, input: &[u8]) -> Result<(Verdict, u64), CampaignError> {
        let t0 = Instant::now();
        let verdict = self.target.run(input)?;
        let us = t0.elapsed().as_micros() as u64;
        self.shared.execs.fetch_add(1, Ordering::Relaxed);
        Ok((verdict, us))
    }

    /// Runs an input and keeps it if it is new: a queue entry, a crash or a hang.
    fn execute(
        &mut self,
        input: &[u8],
        origin: Origin<'_>,
        depth: u32,
    ) -> Result<(), CampaignError> {
        let (verdict, us) = self.exec(input)?;
        if verdict.is_crash() || verdict == Verdict::Hang {
            return self.save_fault(input, origin, &verdict);
        }
        if self.seen.check_raw(self.target.coverage()) == NewBits::None {
            return Ok(());
        }
        let trace = Trace::classify(self.target.coverage());
        self.seen.merge(&trace);
        let (input, us) = self.trim(input, &trace, us)?;
        let input = &input[..];
        let index = {
            let mut st = self.shared.lock();
            let new = st.corpus.virgin.merge(&trace);
            if new == NewBits::None {
                return Ok(());
            }
            let index = st.corpus.push(input, depth);
            let desc = self.describe(origin);
            let cov = if new == NewBits::Edges { ",+cov" } else { "" };
            let name = format!("id:{index:06},{desc}{cov}");
            self.shared
                .out
                .write(&Path::new("queue").join(name), input)?;
            match origin {
                Origin::Sync { .. } => st.imported += 1,
                _ => st.found += 1,
            }
            st.last_find = unix_now();
            index
        };
        self.calibrate(index, input, &trace, us)
    }

    /// AFL's trimming of a new entry: removes blocks, halving their size,
    /// wherever the input without them takes exactly the same path
    /// (`trace`). Havoc's block insertions make long finds whose tail does
    /// nothing; left long, an entry's mutants rarely touch the bytes that
    /// matter. Returns the trimmed input and the time of its last run.
    fn trim(
        &mut self,
        input: &[u8],
        trace: &Trace,
        us: u64,
    ) -> Result<(Vec<u8>, u64), CampaignError> {
        let (mut data, mut us) = (input.to_vec(), us);
        if data.len() <= TRIM_MIN_BYTES {
            return Ok((data, us));
        }
        let mut remove = (data.len().next_power_of_two() / TRIM_START_STEPS).max(TRIM_MIN_BYTES);
        while remove >= (data.len().next_power_of_two() / TRIM_END_STEPS).max(TRIM_MIN_BYTES) {
            // As AFL, the first block stays: it is where most targets look.
            let mut at = remove;
            while at < data.len() {
                if self.shared.stopped() {
                    return Ok((data, us));
                }
                let n = remove.min(data.len() - at);
                let mut shorter = Vec::with_capacity(data.len() - n);
                shorter.extend_from_slice(&data[..at]);
                shorter.extend_from_slice(&data[at + n..]);
                let (verdict, took) = self.exec(&shorter)?;
                let same = !verdict.is_crash()
                    && verdict != Verdict::Hang
                    && Trace::classify(self.target.coverage()).bytes() == trace.bytes();
                if same {
                    (data, us) = (shorter, took);
                } else {
                    at += remove;
                }
            }
            remove /= 2;
        }
        Ok((data, us))
    }

    fn describe(&self, origin: Origin<'_>) -> String {
        let ms = self.shared.start.elapsed().as_millis() as u64;
        describe(origin, ms, self.shared.execs.load(Ordering::Relaxed))
    }

    /// Saves a crash or hang whose edges no saved one of its kind took.
    fn save_fault(
        &mut self,
        input: &[u8],
        origin: Origin<'_>,
        verdict: &Verdict,
    ) -> Result<(), CampaignError> {
        let hang = *verdict == Verdict::Hang;
        let seen = if hang {
            &mut self.seen_hang
        } else {
            &mut self.seen_crash
        };
        if !seen.check_raw_simplified(self.target.coverage()) {
            return Ok(());
        }
        let trace = Trace::classify(self.target.coverage());
        seen.merge(&trace.simplified());
        let desc = self.describe(origin);
        let mut st = self.shared.lock();
        let (new, id) = if hang {
            (st.corpus.new_hang(&trace), st.saved_hangs)
        } else {
            (st.corpus.new_crash(&trace), st.saved_crashes)
        };
        if !new {
            return Ok(());
        }
        let id = id as u32;
        let rel = if hang {
            Path::new("hangs").join(format!("id:{id:06},{desc}"))
        } else {
            Path::new("crashes").join(crash_name(id, verdict, &desc))
        };
        self.shared.out.write(&rel, input)?;
        let now = unix_now();
        if hang {
            st.saved_hangs += 1;
            st.last_hang = now;
        } else {
            st.saved_crashes += 1;
            st.last_crash = now;
        }
        Ok(())
    }

    /// AFL's calibration: re-runs a new entry to time it and to find the
    /// map bytes that vary between runs of the same input.
    fn calibrate(
        &mut self,
        index: usize,
        input: &[u8],
        first: &Trace,
        first_us: u64,
    ) -> Result<(), CampaignError> {
        let (mut total_us, mut runs) = (first_us, 1u64);
        let mut varied = Vec::new();
        for _ in 1..CAL_RUNS {
            if self.shared.stopped() {
                break;
            }
            let (verdict, us) = self.exec(input)?;
            total_us += us;
            runs += 1;
            if verdict.is_crash() || verdict == Verdict::Hang {
                break;
            }
            let trace = Trace::classify(self.target.coverage());
            for (i, (a, b)) in first.bytes().iter().zip(trace.bytes()).enumerate() {
                if a != b && !varied.contains(&(i as u32)) {
                    varied.push(i as u32);
                }
            }
            if self.seen.merge(&trace) != NewBits::None {
                self.shared.lock().corpus.virgin.merge(&trace);
            }
        }
        self.shared
            .lock()
            .corpus
            .calibrated(index, first, total_us / runs, &varied);
        Ok(())
    }
}
