//! AFL's coverage feedback: hit counts in buckets, virgin maps, new-coverage
//! detection, the queue of interesting inputs with AFL's favoured entries,
//! and crash and hang de-duplication.
//!
//! A run's raw map counts how often each edge was taken. Counts go into
//! buckets (1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+; one bit each), so a
//! loop taken 5 or 6 times is the same behaviour. A virgin map starts with
//! every bit set and loses the bits of every bucket seen: an input is
//! interesting when its classified map still hits a virgin bit. Crashes and
//! hangs are kept only when they take an edge no earlier crash (or hang)
//! took, each class with a virgin map of its own, as AFL does.

use super::MAP_SIZE;
use super::mutate::Rng;

/// Bucket bit of every hit count.
static BUCKETS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 1;
    while i < 256 {
        t[i] = match i {
            1 => 1,
            2 => 2,
            3 => 4,
            4..=7 => 8,
            8..=15 => 16,
            16..=31 => 32,
            32..=127 => 64,
            _ => 128,
        };
        i += 1;
    }
    t
};

/// The bucket bit of a hit count (0 for an edge not taken).
pub fn bucket(count: u8) -> u8 {
    BUCKETS[usize::from(count)]
}

/// What a map adds to a virgin map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NewBits {
    /// Nothing.
    None,
    /// A known edge with a new hit-count bucket.
    Counts,
    /// An edge never taken before.
    Edges,
}

/// A run's map with its hit counts replaced by their bucket bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace(Vec<u8>);

impl Trace {
    /// Classifies a raw map (at most [`MAP_SIZE`] bytes are used).
    pub fn classify(raw: &[u8]) -> Self {
        let mut t = vec![0u8; MAP_SIZE];
        for (i, b) in nonzero(raw) {
            t[i] = bucket(b);
        }
        Trace(t)
    }

    /// AFL's simplified trace for crashes and hangs: taken or not, counts
    /// ignored (`0x80` taken, `0x01` not).
    pub fn simplified(&self) -> Self {
        Trace(
            self.0
                .iter()
                .map(|&b| if b != 0 { 0x80 } else { 0x01 })
                .collect(),
        )
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Indices of the edges taken.
    pub fn edges(&self) -> Vec<u32> {
        nonzero(&self.0).map(|(i, _)| i as u32).collect()
    }
}

/// Map bytes compared at once with a block of zeros (a `memcmp`).
const BLOCK: usize = 512;
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// The non-zero bytes of `map` with their indices, skipping zero blocks
/// fast (maps are sparse).
fn nonzero(map: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let map = &map[..map.len().min(MAP_SIZE)];
    map.chunks(BLOCK)
        .enumerate()
        .filter(|(_, c)| *c != &ZEROS[..c.len()])
        .flat_map(|(k, c)| c.iter().enumerate().map(move |(j, &b)| (k * BLOCK + j, b)))
        .filter(|(_, b)| *b != 0)
}

/// Eight map bytes as one word.
fn word(c: &[u8]) -> u64 {
    c.try_into().map_or(0, u64::from_ne_bytes)
}

/// `0x80` in each byte of `w` that is not zero, `0x01` in each that is
/// (AFL's simplified trace, a word at a time).
fn simplify_word(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let taken = (((w & LOW7) + LOW7) | w) & HIGH;
    taken | ((!taken & HIGH) >> 7)
}

/// The bits of each map byte that no input has shown yet.
#[derive(Clone, Debug)]
pub struct Virgin(Vec<u8>);

impl Default for Virgin {
    fn default() -> Self {
        Virgin(vec![0xff; MAP_SIZE])
    }
}

impl Virgin {
    /// What a raw (unclassified) map would add, without recording it.
    pub fn check_raw(&self, raw: &[u8]) -> NewBits {
        let mut new = NewBits::None;
        for (i, b) in nonzero(raw) {
            let v = self.0[i];
            if bucket(b) & v != 0 {
                if v == 0xff {
                    return NewBits::Edges;
                }
                new = NewBits::Counts;
            }
        }
        new
    }

    /// Whether a raw map, simplified as for crashes and hangs, would add
    /// anything (without recording it).
    pub fn check_raw_simplified(&self, raw: &[u8]) -> bool {
        self.0.chunks_exact(8).enumerate().any(|(w, v)| {
            let r = raw.get(w * 8..w * 8 + 8).map_or(0, word);
            simplify_word(r) & word(v) != 0
        })
    }

    /// What a trace adds; its bits are no longer virgin afterwards (AFL's
    /// `has_new_bits`).
    pub fn merge(&mut self, trace: &Trace) -> NewBits {
        let mut new = NewBits::None;
        for (i, b) in nonzero(&trace.0) {
            let v = self.0[i];
            if b & v != 0 {
                new = new.max(if v == 0xff {
                    NewBits::Edges
                } else {
                    NewBits::Counts
                });
                self.0[i] = v & !b;
            }
        }
        new
    }

    /// Map bytes some input has touched.
    pub fn covered(&self) -> usize {
        self.0.iter().filter(|&&v| v != 0xff).count()
    }
}

/// One input of the queue.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its number in this instance's queue (`queue/id:NNNNNN,...`).
    pub id: u32,
    /// The input.
    pub data: std::sync::Arc<[u8]>,
    /// Edges its run took (filled by calibration).
    pub edges: Vec<u32>,
    /// Mean run time in microseconds (filled by calibration).
    pub exec_us: u64,
    /// Mutation distance from a seed (0 for seeds and imports).
    pub depth: u32,
    /// Whether it is one of the entries that together cover every edge
    /// seen, each the smallest and fastest for some edge.
    pub favoured: bool,
    /// How often it has been fuzzed.
    pub fuzzed: u32,
}

/// The queue and the campaign's coverage state.
#[derive(Debug, Default)]
pub struct Corpus {
    entries: Vec<Entry>,
    /// The best entry for each edge (index into `entries`).
    top_rated: Vec<Option<u32>>,
    cull_needed: bool,
    /// Coverage of the queue.
    pub virgin: Virgin,
    /// Edges of saved crashes.
    pub virgin_crash: Virgin,
    /// Edges of saved hangs.
    pub virgin_hang: Virgin,
    /// Map bytes seen to vary between runs of one input.
    var_bytes: Vec<bool>,
    cursor: usize,
    /// Full passes over the queue.
    pub cycles: u64,
}

impl Corpus {
    /// An empty queue with all-virgin maps.
    pub fn new() -> Self {
        Corpus {
            top_rated: vec![None; MAP_SIZE],
            var_bytes: vec![false; MAP_SIZE],
            ..Default::default()
        }
    }

    /// Entries in the queue.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry at `index`.
    pub fn get(&self, index: usize) -> Option<&Entry> {
        self.entries.get(index)
    }

    /// Favoured entries.
    pub fn favoured(&self) -> usize {
        self.entries.iter().filter(|e| e.favoured).count()
    }

    /// Appends an input and returns its index; its coverage counts once
    /// [`calibrated`](Self::calibrated) reports it.
    pub fn push(&mut self, data: &[u8], depth: u32) -> usize {
        let id = self.entries.len() as u32;
        self.entries.push(Entry {
            id,
            data: data.into(),
            edges: Vec::new(),
            exec_us: 0,
            depth,
            favoured: false,
            fuzzed: 0,
        });
        self.entries.len() - 1
    }

    /// Records an entry's calibration: the edges it takes, its mean run
    /// time and the map bytes that varied between its runs.
    pub fn calibrated(&mut self, index: usize, trace: &Trace, exec_us: u64, varied: &[u32]) {
        for &i in varied {
            if let Some(v) = self.var_bytes.get_mut(i as usize) {
                *v = true;
            }
        }
        let Some(e) = self.entries.get_mut(index) else {
            return;
        };
        e.edges = trace.edges();
        e.exec_us = exec_us.max(1);
        let score = Self::cost(e);
        let edges = e.edges.clone();
        for edge in edges {
            let slot = &mut self.top_rated[edge as usize];
            let better = match *slot {
                None => true,
                Some(t) => score < Self::cost(&self.entries[t as usize]),
            };
            if better {
                *slot = Some(index as u32);
                self.cull_needed = true;
            }
        }
    }

    /// AFL's `fav_factor`: smaller and faster is better.
    fn cost(e: &Entry) -> u64 {
        e.exec_us.saturating_mul(e.data.len().max(1) as u64)
    }

    /// AFL's `cull_queue`: walks the edges and favours, for each edge no
    /// favoured entry covers yet, its best entry.
    fn cull(&mut self) {
        self.cull_needed = false;
        let mut covered = vec![false; MAP_SIZE];
        for e in &mut self.entries {
            e.favoured = false;
        }
        for edge in 0..MAP_SIZE {
            let Some(t) = self.top_rated[edge] else {
                continue;
            };
            if covered[edge] {
                continue;
            }
            let e = &mut self.entries[t as usize];
            e.favoured = true;
            for &i in &e.edges {
                covered[i as usize] = true;
            }
        }
    }

    /// The next entry to fuzz and how many mutants to try from it, with
    /// AFL's skipping: while favoured entries wait for their first turn,
    /// others are mostly skipped, and non-favoured ones are skipped often.
    pub fn next(&mut self, rng: &mut Rng) -> Option<(usize, u32)> {
        if self.entries.is_empty() {
            return None;
        }
        if self.cull_needed {
            self.cull();
        }
        let pending_favoured = self.entries.iter().any(|e| e.favoured && e.fuzzed == 0);
        loop {
            if self.cursor >= self.entries.len() {
                self.cursor = 0;
                self.cycles += 1;
            }
            let i = self.cursor;
            self.cursor += 1;
            let e = &self.entries[i];
            let skip = if pending_favoured {
                (e.fuzzed > 0 || !e.favoured) && rng.below(100) < 99
            } else if !e.favoured && self.entries.len() > 10 {
                rng.below(100) < if e.fuzzed == 0 { 75 } else { 95 }
            } else {
                false
            };
            if !skip {
                let energy = self.energy(i);
                self.entries[i].fuzzed += 1;
                return Some((i, energy));
            }
        }
    }

    /// Mutants to try from an entry (AFL's havoc cycles scaled by a
    /// simple performance score: faster than average and deeper entries
    /// get more, slow ones less).
    fn energy(&self, index: usize) -> u32 {
        let e = &self.entries[index];
        let timed: Vec<u64> = self
            .entries
            .iter()
            .map(|e| e.exec_us)
            .filter(|&t| t > 0)
            .collect();
        let avg = timed.iter().sum::<u64>() / (timed.len().max(1) as u64);
        let t = e.exec_us.max(1);
        let mut score: u32 = match () {
            _ if avg == 0 => 100,
            _ if t * 4 < avg => 300,
            _ if t * 2 < avg => 200,
            _ if t > avg * 4 => 25,
            _ if t > avg * 2 => 50,
            _ => 100,
        };
        score += 25 * e.depth.min(4);
        if e.fuzzed == 0 {
            score *= 2;
        }
        256 * score / 100
    }

    /// AFL's stability: the share of covered map bytes that never varied
    /// between runs of the same input, in percent.
    pub fn stability(&self) -> f64 {
        let covered = self.virgin.covered();
        if covered == 0 {
            return 100.0;
        }
        let varied = self.var_bytes.iter().filter(|&&v| v).count();
        100.0 * (1.0 - varied as f64 / covered as f64).max(0.0)
    }

    /// Whether a crash's trace takes an edge no saved crash took (and
    /// records it).
    pub fn new_crash(&mut self, trace: &Trace) -> bool {
        self.virgin_crash.merge(&trace.simplified()) != NewBits::None
    }

    /// Whether a hang's trace takes an edge no saved hang took (and
    /// records it).
    pub fn new_hang(&mut self, trace: &Trace) -> bool {
        self.virgin_hang.merge(&trace.simplified()) != NewBits::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(hits: &[(usize, u8)]) -> Vec<u8> {
        let mut m = vec![0u8; MAP_SIZE];
        for &(i, n) in hits {
            m[i] = n;
        }
        m
    }

    #[test]
    fn hit_counts_go_into_afl_buckets() {
        let expect = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 8),
            (7, 8),
            (8, 16),
            (15, 16),
            (16, 32),
            (31, 32),
            (32, 64),
            (127, 64),
            (128, 128),
            (255, 128),
        ];
        for (count, b) in expect {
            assert_eq!(bucket(count), b, "count {count}");
        }
        let t = Trace::classify(&map(&[(5, 6), (70_000 % MAP_SIZE, 200)]));
        assert_eq!(t.bytes()[5], 8);
        assert_eq!(t.edges(), vec![5, (70_000 % MAP_SIZE) as u32]);
    }

    #[test]
    fn new_edges_then_new_counts_then_nothing() {
        let mut v = Virgin::default();
        let one = map(&[(10, 1)]);
        assert_eq!(v.check_raw(&one), NewBits::Edges);
        assert_eq!(v.merge(&Trace::classify(&one)), NewBits::Edges);
        assert_eq!(v.check_raw(&one), NewBits::None);
        assert_eq!(v.merge(&Trace::classify(&one)), NewBits::None);
        // 5 and 6 hits share a bucket; 2 hits is a new one.
        let five = map(&[(10, 5)]);
        assert_eq!(v.check_raw(&five), NewBits::Counts);
        assert_eq!(v.merge(&Trace::classify(&five)), NewBits::Counts);
        assert_eq!(v.check_raw(&map(&[(10, 6)])), NewBits::None);
        assert_eq!(v.check_raw(&map(&[(10, 2)])), NewBits::Counts);
        assert_eq!(
            v.check_raw(&map(&[(10, 2), (MAP_SIZE - 1, 1)])),
            NewBits::Edges
        );
        assert_eq!(v.covered(), 1);
    }

    #[test]
    fn the_fast_checks_agree_with_classifying() {
        let mut rng = Rng::new(4);
        let mut v = Virgin::default();
        let mut s = Virgin::default();
        for _ in 0..300 {
            let mut raw = vec![0u8; MAP_SIZE];
            for _ in 0..rng.below(6) {
                raw[rng.below(64)] = rng.next_u64() as u8;
            }
            let t = Trace::classify(&raw);
            let (fast, fast_simple) = (v.check_raw(&raw), s.check_raw_simplified(&raw));
            assert_eq!(fast, v.merge(&t));
            assert_eq!(fast_simple, s.merge(&t.simplified()) != NewBits::None);
        }
        assert_eq!(simplify_word(0x0080_0100_ff00_0007), 0x0180_8001_8001_0180);
    }

    #[test]
    fn crashes_and_hangs_are_deduplicated_by_edges_not_counts() {
        let mut c = Corpus::new();
        let a = Trace::classify(&map(&[(1, 1), (2, 1)]));
        let a_more = Trace::classify(&map(&[(1, 9), (2, 1)]));
        let b = Trace::classify(&map(&[(1, 1), (3, 1)]));
        assert!(c.new_crash(&a));
        assert!(!c.new_crash(&a));
        assert!(!c.new_crash(&a_more), "only the counts differ");
        assert!(c.new_crash(&b));
        // Hangs keep their own map.
        assert!(c.new_hang(&a));
        assert!(!c.new_hang(&a_more));
    }

    #[test]
    fn favoured_entries_cover_every_edge_with_the_cheapest() {
        let mut c = Corpus::new();
        // Entry 0 covers edges 1-3 but is big; entry 1 covers 1-2 cheaply;
        // entry 2 covers 3 cheaply. Favoured: 1 and 2.
        let big = c.push(&[0u8; 100], 0);
        c.calibrated(
            big,
            &Trace::classify(&map(&[(1, 1), (2, 1), (3, 1)])),
            10,
            &[],
        );
        let small = c.push(&[0u8; 2], 1);
        c.calibrated(small, &Trace::classify(&map(&[(1, 1), (2, 1)])), 10, &[]);
        let other = c.push(&[0u8; 3], 1);
        c.calibrated(other, &Trace::classify(&map(&[(3, 1)])), 10, &[]);
        let mut rng = Rng::new(1);
        let (first, energy) = c.next(&mut rng).unwrap();
        assert!(energy > 0);
        assert!(!c.get(big).unwrap().favoured);
        assert!(c.get(small).unwrap().favoured && c.get(other).unwrap().favoured);
        assert_ne!(first, big, "pending favoured entries go first");
        let (second, _) = c.next(&mut rng).unwrap();
        assert_eq!([first, second].iter().filter(|&&i| i != big).count(), 2);
        assert_eq!(c.favoured(), 2);
    }

    #[test]
    fn stability_counts_bytes_that_varied() {
        let mut c = Corpus::new();
        let t = Trace::classify(&map(&[(1, 1), (2, 1), (3, 1), (4, 1)]));
        assert_eq!(c.virgin.merge(&t), NewBits::Edges);
        assert_eq!(c.stability(), 100.0);
        let i = c.push(b"x", 0);
        c.calibrated(i, &t, 5, &[4]);
        assert!((c.stability() - 75.0).abs() < 1e-9, "{}", c.stability());
    }

    #[test]
    fn the_queue_cycles() {
        let mut c = Corpus::new();
        let mut rng = Rng::new(2);
        assert!(c.next(&mut rng).is_none());
        for k in 0..3u8 {
            let i = c.push(&[k], 0);
            c.calibrated(i, &Trace::classify(&map(&[(usize::from(k), 1)])), 1, &[]);
        }
        for _ in 0..7 {
            c.next(&mut rng);
        }
        assert_eq!(c.cycles, 2);
    }
}
