//! Instructions KVM's emulator gives up on in a kernel's ring 0.
//!
//! Where ring-0 code is emulated (PVM here), KVM cannot emulate a software
//! interrupt in protected or long mode: `int3` (which Linux executes in
//! its boot-time self test of text patching, and wherever it patches live
//! code) ends `KVM_RUN` with an internal error. The VMM does what the CPU
//! would: it moves RIP past the instruction and injects the interrupt as
//! an exception, so the kernel's own handler runs.
//!
//! `fwait` fails the same way (Linux runs it when a task's FPU state is
//! dropped). It only reports pending unmasked x87 exceptions, which a
//! kernel that never uses the x87 in ring 0 does not have, so the VMM
//! steps over it. `ldmxcsr` and `stmxcsr` (run by `kernel_fpu_begin`) move
//! MXCSR between memory and the vCPU's FPU state, which the VMM does
//! through `KVM_GET_FPU`/`KVM_SET_FPU`.

use iced_x86::{Code, Decoder, DecoderOptions, Register};
use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, kvm_fpu};
use kvm_ioctls::{SyncReg, VcpuFd};
use memory::VmMemory;

use crate::x86::decode::CpuState;
use crate::x86::paging::{self, PagingRegs};

/// `int3`.
const INT3: u8 = 0xcc;
/// `int imm8`.
const INT_N: u8 = 0xcd;
/// `fwait`.
const FWAIT: u8 = 0x9b;
/// The breakpoint vector.
const BP_VECTOR: u8 = 3;
/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;

/// What the VMM does in the CPU's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Raise this vector after the instruction of this length.
    Interrupt(u8, u64),
    /// Step over an instruction of this length.
    Skip(u64),
    /// Load MXCSR from the linear address, then step over this length.
    LoadMxcsr(u64, u64),
    /// Store MXCSR to the linear address, then step over this length.
    StoreMxcsr(u64, u64),
}

/// What to do for the instruction `code` at `rip`, with register values
/// from `reg` for its memory operand.
fn action(code: &[u8], rip: u64, reg: impl Fn(Register) -> Option<u64>) -> Option<Action> {
    match code {
        [INT3, ..] => return Some(Action::Interrupt(BP_VECTOR, 1)),
        [INT_N, vector, ..] => return Some(Action::Interrupt(*vector, 2)),
        [FWAIT, ..] => return Some(Action::Skip(1)),
        _ => {}
    }
    let insn = Decoder::with_ip(64, code, rip, DecoderOptions::NONE).decode();
    let len = insn.len() as u64;
    let va = || insn.virtual_address(0, 0, |r, _, _| reg(r));
    match insn.code() {
        Code::Ldmxcsr_m32 => Some(Action::LoadMxcsr(va()?, len)),
        Code::Stmxcsr_m32 => Some(Action::StoreMxcsr(va()?, len)),
        _ => None,
    }
}

/// Reads the instruction bytes at the linear address `rip` into `buf`, as
/// many as are mapped; returns how many.
fn fetch(mem: &VmMemory, regs: &PagingRegs, rip: u64, buf: &mut [u8]) -> usize {
    let read_u64 = |gpa: u64| {
        let mut b = [0u8; 8];
        mem.read(gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    // Byte by byte: the instruction may cross a page.
    for (i, byte) in buf.iter_mut().enumerate() {
        let Ok(t) = paging::translate(regs, rip.wrapping_add(i as u64), false, read_u64) else {
            return i;
        };
        if mem.read(t.gpa, std::slice::from_mut(byte)).is_err() {
            return i;
        }
    }
    buf.len()
}

/// Runs `access` on the guest-physical address of the 4 bytes at linear
/// address `va` (which must not cross a page).
fn linear(
    mem: &VmMemory,
    regs: &PagingRegs,
    va: u64,
    write: bool,
    access: impl FnOnce(u64) -> bool,
) -> bool {
    if va % 4096 > 4092 {
        return false;
    }
    let read_u64 = |gpa: u64| {
        let mut b = [0u8; 8];
        mem.read(gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    match paging::translate(regs, va, write, read_u64) {
        Ok(t) => access(t.gpa),
        Err(_) => false,
    }
}

/// Reads the vCPU's FPU state, lets `change` see or change it, writes it
/// back.
fn with_fpu(fd: &VcpuFd, change: impl FnOnce(&mut kvm_fpu)) -> bool {
    let mut fpu = match fd.get_fpu() {
        Ok(f) => f,
        Err(e) => {
            log::warn!("cannot read the FPU state: {e}");
            return false;
        }
    };
    change(&mut fpu);
    if let Err(e) = fd.set_fpu(&fpu) {
        log::warn!("cannot set the FPU state: {e}");
        return false;
    }
    true
}

/// Injects `vector` as an exception without an error code.
fn inject(fd: &VcpuFd, vector: u8) -> bool {
    let mut events = match fd.get_vcpu_events() {
        Ok(e) => e,
        Err(e) => {
            log::warn!("cannot read vCPU events: {e}");
            return false;
        }
    };
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    if let Err(e) = fd.set_vcpu_events(&events) {
        log::warn!("cannot inject vector {vector}: {e}");
        return false;
    }
    true
}

/// Handles an emulation failure on a kernel's vCPU; true if the vCPU can
/// run on.
pub(crate) fn emulation_failure(fd: &mut VcpuFd, mem: &VmMemory) -> bool {
    let run = fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return false;
    }
    // SAFETY: for KVM_EXIT_INTERNAL_ERROR, `internal` is the member of the
    // exit union that KVM filled in; reading its suberror is a plain load.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return false;
    }
    let s = fd.sync_regs();
    let regs = PagingRegs {
        cr0: s.sregs.cr0,
        cr3: s.sregs.cr3,
        cr4: s.sregs.cr4,
        efer: s.sregs.efer,
    };
    let rip = s.regs.rip;
    let mut code = [0u8; 15];
    let n = fetch(mem, &regs, rip, &mut code);
    let long = s.sregs.efer & EFER_LMA != 0 && s.sregs.cs.l == 1;
    let act = if long {
        let cpu = CpuState {
            regs: &s.regs,
            sregs: &s.sregs,
        };
        action(&code[..n], rip, |r| cpu.reg(r))
    } else {
        // Outside 64-bit code only the one-byte forms are recognised.
        action(&code[..n.min(2)], rip, |_| None)
            .filter(|a| matches!(a, Action::Interrupt(..) | Action::Skip(_)))
    };
    let len = match act {
        Some(Action::Skip(len)) => len,
        Some(Action::Interrupt(vector, len)) => {
            if !inject(fd, vector) {
                return false;
            }
            len
        }
        Some(Action::LoadMxcsr(va, len)) => {
            let mut b = [0u8; 4];
            if !linear(mem, &regs, va, false, |gpa| mem.read(gpa, &mut b).is_ok()) {
                return false;
            }
            if !with_fpu(fd, |fpu| fpu.mxcsr = u32::from_le_bytes(b)) {
                return false;
            }
            len
        }
        Some(Action::StoreMxcsr(va, len)) => {
            let mut mxcsr = 0;
            if !with_fpu(fd, |fpu| mxcsr = fpu.mxcsr) {
                return false;
            }
            let b = mxcsr.to_le_bytes();
            if !linear(mem, &regs, va, true, |gpa| mem.write(gpa, &b).is_ok()) {
                return false;
            }
            len
        }
        None => {
            log::debug!("cannot emulate {:02x?} at {rip:#x}", &code[..n]);
            return false;
        }
    };
    fd.sync_regs_mut().regs.rip = rip.wrapping_add(len);
    fd.set_sync_dirty_reg(SyncReg::Register);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_vmm_emulates() {
        let none = |_| None;
        assert_eq!(
            action(&[0xcc, 0x90], 0, none),
            Some(Action::Interrupt(3, 1))
        );
        assert_eq!(
            action(&[0xcd, 0x80], 0, none),
            Some(Action::Interrupt(0x80, 2))
        );
        assert_eq!(action(&[0x9b, 0x65], 0, none), Some(Action::Skip(1)));
        assert_eq!(action(&[0x0f, 0x0b], 0, none), None);
        assert_eq!(action(&[], 0, none), None);
    }

    #[test]
    fn mxcsr_operands_are_computed() {
        let rsp = |r: Register| match r {
            Register::RSP => Some(0x1000),
            r if r.is_segment_register() => Some(0),
            _ => None,
        };
        // ldmxcsr 0x4(%rsp)
        assert_eq!(
            action(&[0x0f, 0xae, 0x54, 0x24, 0x04], 0, rsp),
            Some(Action::LoadMxcsr(0x1004, 5))
        );
        // stmxcsr 0x8(%rsp)
        assert_eq!(
            action(&[0x0f, 0xae, 0x5c, 0x24, 0x08], 0, rsp),
            Some(Action::StoreMxcsr(0x1008, 5))
        );
        // Without the register's value there is no address.
        assert_eq!(action(&[0x0f, 0xae, 0x54, 0x24, 0x04], 0, |_| None), None);
    }
}
