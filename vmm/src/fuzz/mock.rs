//! A simulated target for testing fuzzer front ends without a VM: a small
//! program over the input that marks map bytes per edge as instrumented
//! code would, with bugs planted behind byte-by-byte comparisons.
//!
//! - `MAGIC` (compared a byte at a time, each match a new edge) ends in
//!   [`Verdict::Fail`].
//! - `CRASH_KEY` the same way ends in a page fault (vector 14).
//! - `HANG_KEY` the same way ends in [`Verdict::Hang`].
//! - [`PREFIX`] at offset 0 and [`SUFFIX`] at offset 8, each compared as a
//!   whole word (no edge rewards a partial match, so mutation alone will not
//!   find either), each give an edge; both together an invalid-opcode
//!   exception (vector 6). Inputs that hold one of them must come from
//!   outside, such as a seed corpus or another fuzzer instance.
//! - Hit counts vary with the input's bytes, so buckets matter.

use super::{Crash, FuzzError, MAP_SIZE, Target, Verdict};

/// Input prefix that makes the target report failure.
pub const MAGIC: &[u8] = b"MAGIC!7";
/// Input prefix that makes the target fault.
pub const CRASH_KEY: &[u8] = b"CRASH";
/// Input prefix that makes the target hang.
pub const HANG_KEY: &[u8] = b"HANG";
/// First half of the two-part bug (bytes 0-7, compared at once).
pub const PREFIX: [u8; 8] = *b"\x8d\x1f<pre>\x00";
/// Second half of the two-part bug (bytes 8-15, compared at once).
pub const SUFFIX: [u8; 8] = *b"\xc3<suf>\x07\x01";
/// The `Fail` status the target reports for [`MAGIC`].
pub const FAIL_STATUS: u64 = 0x42;

/// Where the page fault of the [`CRASH_KEY`] path happens.
const CRASH_RIP: u64 = 0x20_1234;

/// The simulated program (see the module documentation).
#[derive(Debug)]
pub struct Maze {
    map: Vec<u8>,
    touched: Vec<usize>,
    runs: u64,
    flaky: bool,
}

impl Default for Maze {
    fn default() -> Self {
        Maze {
            map: vec![0; MAP_SIZE],
            touched: Vec::new(),
            runs: 0,
            flaky: false,
        }
    }
}

impl Maze {
    /// The program.
    pub fn new() -> Self {
        Self::default()
    }

    /// The program with one edge taken only on every other run, so that
    /// calibration sees it vary (stability below 100%).
    pub fn flaky() -> Self {
        Maze {
            flaky: true,
            ..Self::default()
        }
    }

    /// Takes the edge `(block, arm)` once.
    fn edge(&mut self, block: u32, arm: u32) {
        let h = (block.wrapping_mul(0x9e37_79b1) ^ arm.wrapping_mul(0x85eb_ca6b)) as usize;
        let i = h % MAP_SIZE;
        if self.map[i] == 0 {
            self.touched.push(i);
        }
        self.map[i] = self.map[i].saturating_add(1);
    }

    /// Follows `key` byte by byte; true when all of it matched.
    fn follow(&mut self, block: u32, input: &[u8], key: &[u8]) -> bool {
        for (i, &k) in key.iter().enumerate() {
            if input.get(i) != Some(&k) {
                return false;
            }
            self.edge(block, i as u32 + 1);
        }
        true
    }

    fn program(&mut self, input: &[u8]) -> Verdict {
        self.edge(1, 0);
        // A loop over the input: hit counts per class of byte.
        for &b in input.iter().take(64) {
            self.edge(2, u32::from(b >> 5));
        }
        if self.flaky && self.runs % 2 == 1 {
            self.edge(3, 0);
        }
        if input.len() >= 16 {
            let pre = input[..8] == PREFIX;
            let suf = input[8..16] == SUFFIX;
            if pre {
                self.edge(4, 1);
            }
            if suf {
                self.edge(4, 2);
            }
            if pre && suf {
                return Verdict::Crash(Crash {
                    vector: 6,
                    rip: CRASH_RIP + 0x40,
                    error: 0,
                    cr2: 0,
                });
            }
        }
        match input.first() {
            Some(b'M') if self.follow(5, input, MAGIC) => Verdict::Fail(FAIL_STATUS),
            Some(b'C') if self.follow(6, input, CRASH_KEY) => Verdict::Crash(Crash {
                vector: 14,
                rip: CRASH_RIP,
                error: 6,
                cr2: 0xdead_0000 + u64::from(*input.get(CRASH_KEY.len()).unwrap_or(&0)),
            }),
            Some(b'H') if self.follow(7, input, HANG_KEY) => Verdict::Hang,
            _ => Verdict::Ok,
        }
    }
}

impl Target for Maze {
    fn run(&mut self, input: &[u8]) -> Result<Verdict, FuzzError> {
        for i in self.touched.drain(..) {
            self.map[i] = 0;
        }
        let v = self.program(input);
        self.runs += 1;
        Ok(v)
    }

    fn coverage(&self) -> &[u8] {
        &self.map
    }
}

/// A fresh, empty scratch directory for a test.
#[cfg(test)]
pub(crate) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-fuzz-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a scratch directory");
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(m: &Maze) -> usize {
        m.coverage().iter().filter(|&&b| b != 0).count()
    }

    #[test]
    fn the_planted_bugs_are_where_the_docs_say() {
        let mut m = Maze::new();
        assert_eq!(m.run(b"hello").unwrap(), Verdict::Ok);
        let base = edges(&m);
        assert_eq!(m.run(b"MAGIC!").unwrap(), Verdict::Ok);
        assert!(edges(&m) > base, "each matched byte is an edge");
        assert_eq!(
            m.run(b"MAGIC!7 and more").unwrap(),
            Verdict::Fail(FAIL_STATUS)
        );
        assert!(matches!(m.run(b"CRASH").unwrap(), Verdict::Crash(c) if c.vector == 14));
        assert_eq!(m.run(b"HANG").unwrap(), Verdict::Hang);
        assert_eq!(m.run(b"HAN").unwrap(), Verdict::Ok);

        let mut both = PREFIX.to_vec();
        both.extend_from_slice(&SUFFIX);
        assert!(matches!(m.run(&both).unwrap(), Verdict::Crash(c) if c.vector == 6));
        let mut half = PREFIX.to_vec();
        half.extend_from_slice(&[0; 8]);
        assert_eq!(m.run(&half).unwrap(), Verdict::Ok);
        let with_prefix = m.coverage().to_vec();
        half[..8].fill(0);
        half[8..].copy_from_slice(&SUFFIX);
        assert_eq!(m.run(&half).unwrap(), Verdict::Ok);
        assert_ne!(
            m.coverage(),
            &with_prefix[..],
            "each half is an edge of its own"
        );
    }

    #[test]
    fn runs_are_independent_and_counts_follow_the_input() {
        let mut m = Maze::new();
        m.run(b"MAGIC!7").unwrap();
        m.run(b"a").unwrap();
        let once = m.coverage().to_vec();
        m.run(b"aaaa").unwrap();
        assert_eq!(
            once.iter().filter(|&&b| b != 0).count(),
            m.coverage().iter().filter(|&&b| b != 0).count()
        );
        assert_ne!(once, m.coverage(), "four hits instead of one");
        m.run(b"a").unwrap();
        assert_eq!(once, m.coverage());
    }

    #[test]
    fn the_flaky_program_varies() {
        let mut m = Maze::flaky();
        m.run(b"x").unwrap();
        let first = m.coverage().to_vec();
        m.run(b"x").unwrap();
        assert_ne!(first, m.coverage());
        let mut steady = Maze::new();
        steady.run(b"x").unwrap();
        let a = steady.coverage().to_vec();
        steady.run(b"x").unwrap();
        assert_eq!(a, steady.coverage());
    }
}
