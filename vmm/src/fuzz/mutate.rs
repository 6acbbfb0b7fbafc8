//! AFL-style input mutations: bit and byte flips, arithmetic, interesting
//! values, block deletion, insertion and overwrite, byte insertion, stacked
//! the way AFL++'s havoc stage stacks them, and splicing with another
//! corpus entry.
//!
//! Everything is deterministic given a seed: the same seed and the same
//! inputs give the same mutants, so a campaign's finds can be replayed.

/// The largest input a mutation produces (AFL's `MAX_FILE`, 1 MiB).
pub const MAX_INPUT: usize = 1 << 20;

/// AFL's interesting 8-bit values.
const INTERESTING_8: [i8; 9] = [-128, -1, 0, 1, 16, 32, 64, 100, 127];
/// AFL's interesting 16-bit values (used with the 8-bit ones).
const INTERESTING_16: [i16; 10] = [-32768, -129, 128, 255, 256, 512, 1000, 1024, 4096, 32767];
/// AFL's interesting 32-bit values (used with the 8- and 16-bit ones).
const INTERESTING_32: [i32; 8] = [
    -2_147_483_648,
    -100_663_046,
    -32769,
    32768,
    65535,
    65536,
    100_663_045,
    2_147_483_647,
];
/// Largest delta of the arithmetic mutations (AFL's `ARITH_MAX`).
const ARITH_MAX: u32 = 35;
/// Havoc stacks at most 2, 4, ... 2^HAVOC_STACK_POW2 mutations on one input.
const HAVOC_STACK_POW2: u32 = 7;

/// A small, fast pseudo-random generator (wyrand). Not for cryptography.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose whole sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A number in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A number in `[lo, hi]` (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True once in `n` calls on average.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// One elementary mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Flip one bit.
    FlipBit,
    /// Set a byte to an interesting 8-bit value.
    Interesting8,
    /// Set two bytes to an interesting 16-bit value, either byte order.
    Interesting16,
    /// Set four bytes to an interesting 32-bit value, either byte order.
    Interesting32,
    /// Add or subtract up to 35 from a byte.
    Arith8,
    /// Add or subtract up to 35 from a 16-bit word, either byte order.
    Arith16,
    /// Add or subtract up to 35 from a 32-bit word, either byte order.
    Arith32,
    /// XOR a byte with a random non-zero value.
    RandomByte,
    /// Delete a block.
    DeleteBlock,
    /// Insert a block: a copy of another part of the input, or one repeated byte.
    InsertBlock,
    /// Insert one random byte (newer AFL++'s havoc has it too).
    InsertByte,
    /// Overwrite a block with another part of the input, or one repeated byte.
    OverwriteBlock,
}

impl Op {
    /// Every mutation, in the order havoc draws from.
    pub const ALL: [Op; 12] = [
        Op::FlipBit,
        Op::Interesting8,
        Op::Interesting16,
        Op::Interesting32,
        Op::Arith8,
        Op::Arith16,
        Op::Arith32,
        Op::RandomByte,
        Op::DeleteBlock,
        Op::InsertBlock,
        Op::InsertByte,
        Op::OverwriteBlock,
    ];

    /// The fewest input bytes the mutation needs.
    fn min_len(self) -> usize {
        match self {
            Op::InsertBlock | Op::InsertByte => 0,
            Op::Interesting16 | Op::Arith16 | Op::DeleteBlock | Op::OverwriteBlock => 2,
            Op::Interesting32 | Op::Arith32 => 4,
            _ => 1,
        }
    }
}

/// What produced a mutant (for the names of the files it is saved in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mutation {
    /// `havoc`, or `splice` when the input was first spliced with another entry.
    pub stage: &'static str,
    /// How many elementary mutations were stacked.
    pub reps: u32,
}

/// Mutates inputs; one per fuzzing thread.
#[derive(Clone, Debug)]
pub struct Mutator {
    rng: Rng,
    max_len: usize,
}

impl Mutator {
    /// A mutator whose choices are fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: Rng::new(seed),
            max_len: MAX_INPUT,
        }
    }

    /// Never grows an input beyond `max_len` bytes (at least 1).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len.clamp(1, MAX_INPUT);
        self
    }

    /// The generator behind the choices (for the scheduler's coin flips).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// AFL++'s havoc: 1 to 128 random mutations stacked on `data`, small
    /// stacks the most likely (a bound of 2, 4, ... 128 is drawn first,
    /// then a count up to it).
    pub fn havoc(&mut self, data: &mut Vec<u8>) -> Mutation {
        let max = 1usize << (1 + self.rng.below(HAVOC_STACK_POW2 as usize));
        let reps = 1 + self.rng.below(max) as u32;
        for _ in 0..reps {
            let op = self.pick(data.len());
            self.apply(op, data);
        }
        Mutation {
            stage: "havoc",
            reps,
        }
    }

    /// AFL's splice: the head of `a` and the tail of `b`, cut somewhere
    /// between the first and the last byte where they differ, then havoc.
    /// Unlike AFL, half of the splices are left without havoc, so two
    /// entries that each hold half of what a path needs can meet intact.
    /// None when the two are too alike to give anything new.
    pub fn splice(&mut self, a: &[u8], b: &[u8]) -> Option<(Vec<u8>, Mutation)> {
        let n = a.len().min(b.len());
        let first = (0..n).find(|&i| a[i] != b[i])?;
        let last = (0..n).rev().find(|&i| a[i] != b[i])?;
        if last < first + 2 {
            return None;
        }
        let cut = self.rng.between(first + 1, last);
        let mut out = Vec::with_capacity(b.len());
        out.extend_from_slice(&a[..cut]);
        out.extend_from_slice(&b[cut..]);
        out.truncate(self.max_len);
        let reps = if self.rng.one_in(2) {
            0
        } else {
            self.havoc(&mut out).reps
        };
        Some((
            out,
            Mutation {
                stage: "splice",
                reps,
            },
        ))
    }

    /// A mutation that applies to an input of `len` bytes.
    fn pick(&mut self, len: usize) -> Op {
        loop {
            let op = Op::ALL[self.rng.below(Op::ALL.len())];
            let grows = matches!(op, Op::InsertBlock | Op::InsertByte);
            if len >= op.min_len() && (!grows || len < self.max_len) {
                return op;
            }
        }
    }

    /// Applies `op` to `data` at random positions; inputs too short for
    /// it are left alone.
    pub fn apply(&mut self, op: Op, data: &mut Vec<u8>) {
        let len = data.len();
        if len < op.min_len() {
            if len == 0 {
                self.insert(data);
            }
            return;
        }
        match op {
            Op::FlipBit => {
                let bit = self.rng.below(len * 8);
                data[bit / 8] ^= 0x80 >> (bit % 8);
            }
            Op::Interesting8 => {
                let v = INTERESTING_8[self.rng.below(INTERESTING_8.len())];
                let at = self.rng.below(len);
                data[at] = v as u8;
            }
            Op::Interesting16 => {
                let all = INTERESTING_8.len() + INTERESTING_16.len();
                let i = self.rng.below(all);
                let v = INTERESTING_8.get(i).map_or_else(
                    || INTERESTING_16[i - INTERESTING_8.len()],
                    |&v| i16::from(v),
                );
                self.put(data, &(v as u16).to_le_bytes());
            }
            Op::Interesting32 => {
                let all = INTERESTING_8.len() + INTERESTING_16.len() + INTERESTING_32.len();
                let i = self.rng.below(all);
                let v = if i < INTERESTING_8.len() {
                    i32::from(INTERESTING_8[i])
                } else if i < INTERESTING_8.len() + INTERESTING_16.len() {
                    i32::from(INTERESTING_16[i - INTERESTING_8.len()])
                } else {
                    INTERESTING_32[i - INTERESTING_8.len() - INTERESTING_16.len()]
                };
                self.put(data, &(v as u32).to_le_bytes());
            }
            Op::Arith8 => {
                let at = self.rng.below(len);
                data[at] = data[at].wrapping_add(self.delta() as u8);
            }
            Op::Arith16 => self.arith::<2>(data),
            Op::Arith32 => self.arith::<4>(data),
            Op::RandomByte => {
                let at = self.rng.below(len);
                data[at] ^= self.rng.between(1, 255) as u8;
            }
            Op::DeleteBlock => {
                let n = self.block_len(len - 1);
                let at = self.rng.below(len - n + 1);
                data.drain(at..at + n);
            }
            Op::InsertBlock => self.insert(data),
            Op::InsertByte => {
                if len < self.max_len {
                    let at = self.rng.below(len + 1);
                    data.insert(at, self.rng.next_u64() as u8);
                }
            }
            Op::OverwriteBlock => {
                let n = self.block_len(len - 1);
                let to = self.rng.below(len - n + 1);
                if self.rng.one_in(4) {
                    let b = self.byte_for(data);
                    data[to..to + n].fill(b);
                } else {
                    let from = self.rng.below(len - n + 1);
                    data.copy_within(from..from + n, to);
                }
            }
        }
    }

    /// Inserts a block (a copy of part of `data`, or one byte repeated).
    fn insert(&mut self, data: &mut Vec<u8>) {
        let len = data.len();
        let room = self.max_len.saturating_sub(len);
        if room == 0 {
            return;
        }
        let copy = len > 0 && !self.rng.one_in(4);
        let n = self.block_len(if copy { len.min(room) } else { room });
        let at = self.rng.below(len + 1);
        let block: Vec<u8> = if copy {
            let from = self.rng.below(len - n + 1);
            data[from..from + n].to_vec()
        } else {
            vec![self.byte_for(data); n]
        };
        data.splice(at..at, block);
    }

    /// A random value, or a byte of the input itself (as AFL does).
    fn byte_for(&mut self, data: &[u8]) -> u8 {
        if data.is_empty() || self.rng.one_in(2) {
            self.rng.next_u64() as u8
        } else {
            data[self.rng.below(data.len())]
        }
    }

    /// Writes `bytes` (little-endian) or their reverse at a random offset.
    fn put(&mut self, data: &mut [u8], bytes: &[u8]) {
        let at = self.rng.below(data.len() - bytes.len() + 1);
        let dst = &mut data[at..at + bytes.len()];
        dst.copy_from_slice(bytes);
        if self.rng.one_in(2) {
            dst.reverse();
        }
    }

    /// Adds a small delta to an N-byte word, little- or big-endian.
    fn arith<const N: usize>(&mut self, data: &mut [u8]) {
        let at = self.rng.below(data.len() - N + 1);
        let big = self.rng.one_in(2);
        let mut word = [0u8; 8];
        word[..N].copy_from_slice(&data[at..at + N]);
        if big {
            word[..N].reverse();
        }
        let v = u64::from_le_bytes(word).wrapping_add(self.delta());
        word = v.to_le_bytes();
        if big {
            word[..N].reverse();
        }
        data[at..at + N].copy_from_slice(&word[..N]);
    }

    /// A delta in `[-35, -1] ∪ [1, 35]`, as a two's-complement u64.
    fn delta(&mut self) -> u64 {
        let d = u64::from(self.rng.between(1, ARITH_MAX as usize) as u32);
        if self.rng.one_in(2) {
            d
        } else {
            d.wrapping_neg()
        }
    }

    /// A block length of at most `limit` (at least 1), mostly small (AFL's
    /// `choose_block_len`).
    fn block_len(&mut self, limit: usize) -> usize {
        let (lo, hi) = match self.rng.below(4) {
            0 | 1 => (1, 32),
            2 => (32, 128),
            _ if !self.rng.one_in(10) => (128, 1500),
            _ => (1500, 32768),
        };
        let limit = limit.max(1);
        self.rng.between(lo.min(limit), hi.min(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutants() {
        let run = |seed| {
            let mut m = Mutator::new(seed);
            (0..200)
                .map(|_| {
                    let mut d = b"the quick brown fox".to_vec();
                    m.havoc(&mut d);
                    d
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn rng_ranges_hold() {
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let b = r.between(3, 5);
            assert!((3..=5).contains(&b));
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(r.between(5, 2), 5);
        let hits = (0..10_000).filter(|_| r.one_in(4)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }

    #[test]
    fn each_op_does_what_it_says() {
        let mut m = Mutator::new(3);
        let base: Vec<u8> = (0..64).collect();
        for _ in 0..500 {
            let mut d = base.clone();
            m.apply(Op::FlipBit, &mut d);
            let bits: u32 = d.iter().zip(&base).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(bits, 1);

            let mut d = base.clone();
            m.apply(Op::RandomByte, &mut d);
            assert_eq!(d.iter().zip(&base).filter(|(a, b)| a != b).count(), 1);

            let mut d = base.clone();
            m.apply(Op::Arith8, &mut d);
            let changed: Vec<_> = (0..64).filter(|&i| d[i] != base[i]).collect();
            assert_eq!(changed.len(), 1);
            let i = changed[0];
            let delta = d[i].wrapping_sub(base[i]);
            assert!(delta <= 35 || delta >= 221, "{delta}");

            let mut d = base.clone();
            m.apply(Op::Interesting32, &mut d);
            assert_eq!(d.len(), 64);
            assert!(d.iter().zip(&base).filter(|(a, b)| a != b).count() <= 4);

            let mut d = base.clone();
            m.apply(Op::DeleteBlock, &mut d);
            assert!(!d.is_empty() && d.len() < 64);

            let mut d = base.clone();
            m.apply(Op::InsertBlock, &mut d);
            assert!(d.len() > 64);

            let mut d = base.clone();
            m.apply(Op::InsertByte, &mut d);
            assert_eq!(d.len(), 65);

            let mut d = base.clone();
            m.apply(Op::OverwriteBlock, &mut d);
            assert_eq!(d.len(), 64);
        }
    }

    #[test]
    fn arithmetic_on_words_carries() {
        let mut m = Mutator::new(11);
        let mut seen_carry = false;
        for _ in 0..5000 {
            let mut d = vec![0xff, 0xff];
            m.apply(Op::Arith16, &mut d);
            let v = u16::from_le_bytes([d[0], d[1]]);
            let w = u16::from_be_bytes([d[0], d[1]]);
            let ok = |x: u16| x.wrapping_add(1) <= 35 || x >= 0xffff - 35;
            assert!(ok(v) || ok(w), "{d:?}");
            seen_carry |= d == [0, 0] || d[0] != 0xff && d[1] != 0xff;
        }
        assert!(seen_carry);
    }

    #[test]
    fn short_and_empty_inputs_grow_and_lengths_stay_bounded() {
        let mut m = Mutator::new(5).with_max_len(100);
        for _ in 0..2000 {
            let mut d = Vec::new();
            m.havoc(&mut d);
            assert!(d.len() <= 100);
            let mut d = vec![1u8];
            m.havoc(&mut d);
            assert!(d.len() <= 100);
        }
        let mut d = Vec::new();
        m.apply(Op::FlipBit, &mut d);
        assert!(!d.is_empty(), "an empty input gets bytes");
    }

    #[test]
    fn splice_takes_a_head_and_a_tail() {
        let a = vec![b'a'; 64];
        let b = vec![b'b'; 64];
        let mut m = Mutator::new(9);
        let mut both = 0;
        for _ in 0..200 {
            let (out, how) = m.splice(&a, &b).unwrap();
            assert_eq!(how.stage, "splice");
            both += usize::from(out.contains(&b'a') && out.contains(&b'b'));
        }
        assert!(both > 100, "{both}");
        assert!(m.splice(&a, &a).is_none());
        assert!(m.splice(b"ab", b"ac").is_none());
    }

    #[test]
    fn havoc_finds_a_byte_by_byte_magic() {
        // A corpus of one entry that is replaced whenever a mutant matches
        // more of the magic: the loop a fuzzer runs, in miniature.
        let magic = b"MAGIC";
        let score = |d: &[u8]| d.iter().zip(magic).take_while(|(a, b)| a == b).count();
        let mut best = b"xxxxxxxx".to_vec();
        let mut m = Mutator::new(42).with_max_len(64);
        for _ in 0..2_000_000 {
            let mut d = best.clone();
            m.havoc(&mut d);
            if score(&d) > score(&best) {
                best = d;
                if score(&best) == magic.len() {
                    return;
                }
            }
        }
        panic!("havoc got only {:?} of the magic", &best[..score(&best)]);
    }
}
