//! Static ELF64 x86-64 programs for program mode.
//!
//! Every check happens before a VM exists, so a bad file never starts a
//! guest: the header must describe a little-endian x86-64 `ET_EXEC` file,
//! and every `PT_LOAD` segment must lie inside guest RAM, at or above 1 MiB
//! (the VMM's structures live below), inside the file, and apart from every
//! other segment. Segments load at their physical addresses; the part of a
//! segment past its file size is left untouched, and reads zeros because
//! fresh guest memory does.

use std::ops::Range;

use memory::{Layout, MemError, VmMemory};
use thiserror::Error;

use crate::x86::program::LOW_END;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const MAX_PHNUM: u16 = 256;

/// What is wrong with a program file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF file.
    #[error("not an ELF file (bad magic number)")]
    Magic,
    /// Shorter than its own headers say.
    #[error("the file is truncated: {what} ends at byte {end}, the file has {len}")]
    Truncated {
        /// The part that does not fit.
        what: &'static str,
        /// Where it ends.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// 32-bit or big-endian.
    #[error("not a 64-bit little-endian ELF file")]
    Class,
    /// Another architecture.
    #[error("ELF machine {0} is not x86-64 (62)")]
    Machine(u16),
    /// A position-independent executable.
    #[error("position-independent executables are not supported: link with -static -no-pie")]
    Pie,
    /// Not an executable at all.
    #[error("ELF type {0} is not an executable (ET_EXEC)")]
    Type(u16),
    /// Program headers that cannot be real.
    #[error("malformed program headers: {0}")]
    Headers(&'static str),
    /// Nothing to load.
    #[error("the program has no loadable segment")]
    NoSegments,
    /// A segment whose file part is larger than its memory part.
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSize {
        /// Program header index.
        index: usize,
        /// p_filesz.
        filesz: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// A segment reaching below 1 MiB.
    #[error("segment {index} at {paddr:#x} is below 1 MiB, which the VMM reserves")]
    BelowLowEnd {
        /// Program header index.
        index: usize,
        /// p_paddr.
        paddr: u64,
    },
    /// A segment outside guest RAM.
    #[error(
        "segment {index} at {paddr:#x}+{memsz:#x} is outside guest RAM; give the VM more with --mem"
    )]
    OutsideRam {
        /// Program header index.
        index: usize,
        /// p_paddr.
        paddr: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// Two segments sharing bytes.
    #[error("segments {a} and {b} overlap")]
    Overlap {
        /// One program header index.
        a: usize,
        /// The other.
        b: usize,
    },
    /// An entry point outside every segment.
    #[error("entry point {0:#x} is not inside a loadable segment")]
    Entry(u64),
}

/// One segment to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes in memory (the rest past `file` reads zeros).
    pub memsz: u64,
    /// Where its bytes are in the file.
    pub file: Range<usize>,
}

/// A checked program.
#[derive(Debug)]
pub struct Program {
    /// Entry point (guest-physical = virtual, identity mapped).
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    bytes: Vec<u8>,
}

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N]
        .try_into()
        .expect("bounds checked by the caller")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(field(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(b, at))
}

impl Program {
    /// Checks `bytes` as a program for a VM with RAM `ram`.
    pub fn parse(bytes: Vec<u8>, ram: &Layout) -> Result<Self, ElfError> {
        let len = bytes.len() as u64;
        if bytes.len() < 4 || bytes[..4] != *b"\x7fELF" {
            return Err(ElfError::Magic);
        }
        if bytes.len() < EHDR_SIZE {
            return Err(ElfError::Truncated {
                what: "the ELF header",
                end: EHDR_SIZE as u64,
                len,
            });
        }
        if bytes[4] != 2 || bytes[5] != 1 {
            return Err(ElfError::Class);
        }
        let e_type = u16_at(&bytes, 16);
        let machine = u16_at(&bytes, 18);
        if machine != EM_X86_64 {
            return Err(ElfError::Machine(machine));
        }
        match e_type {
            ET_EXEC => {}
            ET_DYN => return Err(ElfError::Pie),
            t => return Err(ElfError::Type(t)),
        }
        let entry = u64_at(&bytes, 24);
        let phoff = u64_at(&bytes, 32);
        let phentsize = u16_at(&bytes, 54);
        let phnum = u16_at(&bytes, 56);
        if phnum == 0 {
            return Err(ElfError::NoSegments);
        }
        if usize::from(phentsize) != PHDR_SIZE {
            return Err(ElfError::Headers("program header size is not 56"));
        }
        if phnum > MAX_PHNUM {
            return Err(ElfError::Headers("more than 256 program headers"));
        }
        let ph_end = phoff
            .checked_add(u64::from(phnum) * PHDR_SIZE as u64)
            .ok_or(ElfError::Headers("program header table offset overflows"))?;
        if ph_end > len {
            return Err(ElfError::Truncated {
                what: "the program header table",
                end: ph_end,
                len,
            });
        }

        let mut segments: Vec<(usize, Segment)> = Vec::new();
        for index in 0..usize::from(phnum) {
            let at = phoff as usize + index * PHDR_SIZE;
            if u32_at(&bytes, at) != PT_LOAD {
                continue;
            }
            let offset = u64_at(&bytes, at + 8);
            let paddr = u64_at(&bytes, at + 24);
            let filesz = u64_at(&bytes, at + 32);
            let memsz = u64_at(&bytes, at + 40);
            if memsz == 0 {
                continue;
            }
            if filesz > memsz {
                return Err(ElfError::FileSize {
                    index,
                    filesz,
                    memsz,
                });
            }
            let file_end = offset
                .checked_add(filesz)
                .ok_or(ElfError::Headers("segment file range overflows"))?;
            if file_end > len {
                return Err(ElfError::Truncated {
                    what: "a segment's file data",
                    end: file_end,
                    len,
                });
            }
            if paddr < LOW_END {
                return Err(ElfError::BelowLowEnd { index, paddr });
            }
            if !ram.contains(paddr, memsz) {
                return Err(ElfError::OutsideRam {
                    index,
                    paddr,
                    memsz,
                });
            }
            let seg = Segment {
                paddr,
                memsz,
                file: offset as usize..file_end as usize,
            };
            if let Some((other, _)) = segments
                .iter()
                .find(|(_, s)| paddr < s.paddr + s.memsz && s.paddr < paddr + memsz)
            {
                return Err(ElfError::Overlap {
                    a: *other,
                    b: index,
                });
            }
            segments.push((index, seg));
        }
        if segments.is_empty() {
            return Err(ElfError::NoSegments);
        }
        if !segments
            .iter()
            .any(|(_, s)| entry >= s.paddr && entry < s.paddr + s.memsz)
        {
            return Err(ElfError::Entry(entry));
        }
        Ok(Self {
            entry,
            segments: segments.into_iter().map(|(_, s)| s).collect(),
            bytes,
        })
    }

    /// Copies the segments into guest memory.
    pub fn load(&self, mem: &VmMemory) -> Result<(), MemError> {
        for s in &self.segments {
            mem.write(s.paddr, &self.bytes[s.file.clone()])?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid program: one PT_LOAD of `code` at `paddr`.
    pub(crate) fn tiny(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x100).to_le_bytes());
        b[0x800..0x800 + code.len()].copy_from_slice(code);
        b
    }

    fn ram() -> Layout {
        Layout::new(&[(0, 16 << 20)]).unwrap()
    }

    fn set_ph(b: &mut [u8], off: usize, v: u64) {
        b[64 + off..64 + off + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn valid_program() {
        let p = Program::parse(tiny(0x20_0000, &[0xf4]), &ram()).unwrap();
        assert_eq!(p.entry, 0x20_0000);
        assert_eq!(
            p.segments,
            vec![Segment {
                paddr: 0x20_0000,
                memsz: 0x101,
                file: 0x800..0x801
            }]
        );
    }

    #[test]
    fn bad_files() {
        let good = tiny(0x20_0000, &[0xf4]);
        assert_eq!(
            Program::parse(b"MZ".to_vec(), &ram()).unwrap_err(),
            ElfError::Magic
        );
        assert!(matches!(
            Program::parse(good[..40].to_vec(), &ram()),
            Err(ElfError::Truncated { .. })
        ));
        assert!(matches!(
            Program::parse(good[..0x700].to_vec(), &ram()),
            Err(ElfError::Truncated {
                what: "a segment's file data",
                ..
            })
        ));
        let mut b = good.clone();
        b[18] = 40; // EM_ARM
        assert_eq!(
            Program::parse(b, &ram()).unwrap_err(),
            ElfError::Machine(40)
        );
        let mut b = good.clone();
        b[16] = ET_DYN as u8;
        assert_eq!(Program::parse(b, &ram()).unwrap_err(), ElfError::Pie);
        let mut b = good.clone();
        b[4] = 1;
        assert_eq!(Program::parse(b, &ram()).unwrap_err(), ElfError::Class);
    }

    #[test]
    fn bad_placement() {
        assert!(matches!(
            Program::parse(tiny(0x8_0000, &[0xf4]), &ram()),
            Err(ElfError::BelowLowEnd { .. })
        ));
        assert!(matches!(
            Program::parse(tiny(16 << 20, &[0xf4]), &ram()),
            Err(ElfError::OutsideRam { .. })
        ));
        let mut b = tiny(0x20_0000, &[0xf4]);
        set_ph(&mut b, 40, u64::MAX); // p_memsz
        assert!(matches!(
            Program::parse(b, &ram()),
            Err(ElfError::OutsideRam { .. })
        ));
        let mut b = tiny(0x20_0000, &[0xf4]);
        set_ph(&mut b, 32, 0x1000); // p_filesz > p_memsz
        assert!(matches!(
            Program::parse(b, &ram()),
            Err(ElfError::FileSize { .. })
        ));
        let mut b = tiny(0x20_0000, &[0xf4]);
        b[24..32].copy_from_slice(&0x30_0000u64.to_le_bytes());
        assert_eq!(
            Program::parse(b, &ram()).unwrap_err(),
            ElfError::Entry(0x30_0000)
        );
    }

    #[test]
    fn overlapping_segments() {
        let mut b = tiny(0x20_0000, &[0xf4]);
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let (first, second) = b.split_at_mut(64 + PHDR_SIZE);
        second[..PHDR_SIZE].copy_from_slice(&first[64..64 + PHDR_SIZE]);
        set_ph(&mut b, PHDR_SIZE + 24, 0x20_0080);
        assert_eq!(
            Program::parse(b, &ram()).unwrap_err(),
            ElfError::Overlap { a: 0, b: 1 }
        );
    }
}
