//! Snapshot state files: what a restore needs besides guest memory.
//!
//! A snapshot is two files: the *memory file* (the live snapshot's image:
//! guest-physical byte A at offset A, holes for pages never touched or of
//! zeros) and this *state file*. All integers are little-endian:
//!
//! ```text
//!  magic    8 bytes   "VMMSNAP\0"
//!  version  u32       1
//!  length   u64       bytes of the payload
//!  payload:
//!    mode       u32   1 = program mode (the only one so far)
//!    RAM        u32 n, then n × (gpa u64, length u64)
//!    vCPUs      u32 n, then per vCPU: u8 0 (never started: it waits for
//!               VCPU_START again) or 1 and its registers: kvm_regs,
//!               kvm_sregs, kvm_xsave, kvm_xcrs, each as u32 length + the
//!               structure's bytes
//!    UART       9 × u8 (DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR),
//!               u32 n, n bytes of its receive buffer (n ≤ 64)
//!    memory     u32 n, then n runs × (gpa u64, pages u32, CRC-32 u32):
//!               the memory file's pages with contents (see
//!               `memory::ImageRun`)
//!  crc      u64       CRC-64/XZ of everything before it
//! ```
//!
//! A file that is empty, shorter or longer than its header says, has
//! another magic, another version or a bad checksum is refused, each with
//! its own error, before anything in it is used; so is a payload that does
//! not parse (a file made to pass the checksum).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use devices::serial::SerialState;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave};
use memory::{ImageRun, MAX_RUN_PAGES};
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::vcpu::VcpuState;

/// The first eight bytes of a state file.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The mode code of a program-mode guest.
const MODE_PROGRAM: u32 = 1;
/// Bytes before the payload.
const HEADER: usize = 8 + 4 + 8;
/// Most RAM ranges, vCPUs and UART buffer bytes a file may list.
const MAX_RANGES: u32 = 16;
const MAX_VCPUS: u32 = crate::x86::program::MAX_VCPUS;
const UART_FIFO: u32 = 64;

/// Why a state file cannot be written or used.
#[derive(Debug, Error)]
pub enum SnapfileError {
    /// The file could not be opened, read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("the snapshot state file {0} is empty")]
    Empty(PathBuf),
    /// The file ends before its header says it does.
    #[error("the snapshot state file {path} is truncated: {len} bytes, {needed} expected")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What its header (or the smallest header) needs.
        needed: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{path} is not a snapshot state file (it starts with {found:02x?}, not \"VMMSNAP\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        found: Vec<u8>,
    },
    /// The file has a version this build does not read.
    #[error(
        "the snapshot state file {path} has format version {found}; this vmm reads version \
         {VERSION} only"
    )]
    BadVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The checksum does not match the contents.
    #[error(
        "the snapshot state file {path} fails its checksum (stored {stored:#018x}, computed \
         {computed:#018x}): it was changed or damaged"
    )]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// The CRC-64 in the file.
        stored: u64,
        /// The CRC-64 of its contents.
        computed: u64,
    },
    /// The payload does not parse, or says something this build refuses.
    #[error("the snapshot state file {path} is malformed: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The VM cannot be saved to (or restored from) snapshot files.
    #[error("{0}")]
    Unsupported(String),
}

/// A program-mode VM's state at the instant of a snapshot.
#[derive(Debug)]
pub(crate) struct SnapState {
    /// RAM ranges, (guest-physical address, length).
    pub(crate) ram: Vec<(u64, u64)>,
    /// Each vCPU's registers; None for one that never started.
    pub(crate) vcpus: Vec<Option<VcpuState>>,
    /// The UART.
    pub(crate) uart: SerialState,
    /// The memory file's index.
    pub(crate) runs: Vec<ImageRun>,
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected, initial and final value
/// all ones), table-driven.
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0xc96c_5795_d787_0f42;
    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u64, |c, b| {
        TABLE[((c ^ u64::from(*b)) & 0xff) as usize] ^ (c >> 8)
    })
}

fn put_blob<T: IntoBytes + Immutable>(out: &mut Vec<u8>, v: &T) {
    let bytes = v.as_bytes();
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl SnapState {
    /// The whole file: header, payload, checksum.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&MODE_PROGRAM.to_le_bytes());
        p.extend_from_slice(&(self.ram.len() as u32).to_le_bytes());
        for (gpa, len) in &self.ram {
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(&len.to_le_bytes());
        }
        p.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        for v in &self.vcpus {
            match v {
                None => p.push(0),
                Some(s) => {
                    p.push(1);
                    put_blob(&mut p, &s.regs);
                    put_blob(&mut p, &s.sregs);
                    put_blob(&mut p, &s.xsave);
                    put_blob(&mut p, &s.xcrs);
                }
            }
        }
        let u = &self.uart;
        p.extend_from_slice(&[
            u.baud_divisor_low,
            u.baud_divisor_high,
            u.interrupt_enable,
            u.interrupt_identification,
            u.line_control,
            u.line_status,
            u.modem_control,
            u.modem_status,
            u.scratch,
        ]);
        p.extend_from_slice(&(u.in_buffer.len() as u32).to_le_bytes());
        p.extend_from_slice(&u.in_buffer);
        p.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for r in &self.runs {
            p.extend_from_slice(&r.gpa.to_le_bytes());
            p.extend_from_slice(&r.pages.to_le_bytes());
            p.extend_from_slice(&r.crc.to_le_bytes());
        }
        let mut out = Vec::with_capacity(HEADER + p.len() + 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(&p);
        out.extend_from_slice(&crc64(&out).to_le_bytes());
        out
    }

    /// Writes the state to the new file `path` and makes it durable.
    pub(crate) fn write(&self, path: &Path) -> Result<(), SnapfileError> {
        let io = |what| {
            move |source| SnapfileError::Io {
                what,
                path: path.into(),
                source,
            }
        };
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io("cannot create the snapshot state file"))?;
        f.write_all(&self.encode())
            .and_then(|()| f.sync_all())
            .map_err(|e| {
                // No half-written state file is left behind.
                let _ = std::fs::remove_file(path);
                io("cannot write the snapshot state file")(e)
            })
    }

    /// Reads and checks the state file `path`.
    pub(crate) fn read(path: &Path) -> Result<Self, SnapfileError> {
        let bytes = std::fs::read(path).map_err(|source| SnapfileError::Io {
            what: "cannot read the snapshot state file",
            path: path.into(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    /// Checks and parses a whole state file (`path` names it in errors).
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Self, SnapfileError> {
        let len = bytes.len() as u64;
        let truncated = |needed| SnapfileError::Truncated {
            path: path.into(),
            len,
            needed,
        };
        if bytes.is_empty() {
            return Err(SnapfileError::Empty(path.into()));
        }
        let magic = &bytes[..bytes.len().min(MAGIC.len())];
        if magic != &MAGIC[..magic.len()] {
            return Err(SnapfileError::BadMagic {
                path: path.into(),
                found: magic.to_vec(),
            });
        }
        if bytes.len() < HEADER {
            return Err(truncated(HEADER as u64 + 8));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(SnapfileError::BadVersion {
                path: path.into(),
                found: version,
            });
        }
        let payload = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let needed = payload
            .checked_add(HEADER as u64 + 8)
            .ok_or_else(|| truncated(u64::MAX))?;
        if len < needed {
            return Err(truncated(needed));
        }
        let malformed = |why: String| SnapfileError::Malformed {
            path: path.into(),
            why,
        };
        if len > needed {
            return Err(malformed(format!(
                "{} bytes follow its checksum",
                len - needed
            )));
        }
        let body = bytes.len() - 8;
        let stored = u64::from_le_bytes(bytes[body..].try_into().expect("8 bytes"));
        let computed = crc64(&bytes[..body]);
        if stored != computed {
            return Err(SnapfileError::BadChecksum {
                path: path.into(),
                stored,
                computed,
            });
        }
        parse(&bytes[HEADER..body]).map_err(malformed)
    }
}

/// Reads the payload's fields in order.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!("the payload ends inside {what}"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A count of at most `max` items.
    fn count(&mut self, what: &str, max: u32) -> Result<usize, String> {
        let n = self.u32(what)?;
        if n > max {
            return Err(format!("{n} {what}, at most {max} are allowed"));
        }
        Ok(n as usize)
    }

    /// A structure saved as its length and bytes; its size must match.
    fn blob<T: FromBytes>(&mut self, what: &str) -> Result<T, String> {
        let n = self.u32(what)? as usize;
        if n != size_of::<T>() {
            return Err(format!(
                "{what} is {n} bytes, {} expected (saved by another build?)",
                size_of::<T>()
            ));
        }
        T::read_from_bytes(self.take(n, what)?).map_err(|_| format!("{what} does not parse"))
    }
}

fn parse(payload: &[u8]) -> Result<SnapState, String> {
    let mut r = Reader { rest: payload };
    let mode = r.u32("the mode")?;
    if mode != MODE_PROGRAM {
        return Err(format!(
            "mode {mode}: only program-mode snapshots (mode {MODE_PROGRAM}) are restored"
        ));
    }
    let ranges = r.count("RAM ranges", MAX_RANGES)?;
    let mut ram = Vec::with_capacity(ranges);
    for _ in 0..ranges {
        ram.push((r.u64("a RAM range")?, r.u64("a RAM range")?));
    }
    let n = r.count("vCPUs", MAX_VCPUS)?;
    if n == 0 {
        return Err("no vCPU".into());
    }
    let mut vcpus = Vec::with_capacity(n);
    for i in 0..n {
        vcpus.push(match r.u8("a vCPU")? {
            0 => None,
            1 => Some(VcpuState {
                regs: r.blob::<kvm_regs>("the registers")?,
                sregs: r.blob::<kvm_sregs>("the system registers")?,
                xsave: r.blob::<kvm_xsave>("the vector registers")?,
                xcrs: r.blob::<kvm_xcrs>("XCR0")?,
                tsc: None,
            }),
            other => return Err(format!("vCPU {i} has the unknown kind {other}")),
        });
    }
    if vcpus[0].is_none() {
        return Err("vCPU 0 has no saved state".into());
    }
    let regs = r.take(9, "the UART")?;
    let buffered = r.count("bytes in the UART's receive buffer", UART_FIFO)?;
    let uart = SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: r.take(buffered, "the UART's receive buffer")?.to_vec(),
    };
    let max_runs = (r.rest.len() / 16).min(u32::MAX as usize) as u32;
    let n = r.count("memory runs", max_runs)?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let run = ImageRun {
            gpa: r.u64("a memory run")?,
            pages: r.u32("a memory run")?,
            crc: r.u32("a memory run")?,
        };
        if run.pages == 0 || run.pages > MAX_RUN_PAGES {
            return Err(format!(
                "a memory run at {:#x} has {} pages (1 to {MAX_RUN_PAGES})",
                run.gpa, run.pages
            ));
        }
        runs.push(run);
    }
    if !r.rest.is_empty() {
        return Err(format!("{} bytes follow the memory runs", r.rest.len()));
    }
    Ok(SnapState {
        ram,
        vcpus,
        uart,
        runs,
    })
}

#[cfg(test)]
#[path = "snapfile_tests.rs"]
mod tests;
