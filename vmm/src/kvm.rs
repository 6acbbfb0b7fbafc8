//! The KVM side: the system handle, VMs with their memslots, and vCPUs.

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memory::VmMemory;
use thiserror::Error;

/// Errors talking to KVM.
#[derive(Debug, Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm ({hint})")]
    Open {
        /// What to do about it.
        hint: &'static str,
        /// What the host said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An ioctl on the system, VM or a vCPU failed.
    #[error("KVM refused to {what}")]
    Ioctl {
        /// What was asked.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|source| KvmError::Ioctl { what, source })
}

/// The process's handle on KVM (cheap to clone).
#[derive(Clone, Debug)]
pub struct Hypervisor {
    kvm: Arc<Kvm>,
    cpuid: CpuId,
}

impl Hypervisor {
    /// Opens /dev/kvm.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(|source| KvmError::Open {
            hint: match source.errno() {
                libc::ENOENT => {
                    "this host has no KVM: load the kvm module or use a host with virtualization"
                }
                libc::EACCES | libc::EPERM => {
                    "permission denied: run as root or join the kvm group"
                }
                _ => "see the error below",
            },
            source,
        })?;
        let cpuid = ioctl(
            "report its CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        Ok(Self {
            kvm: Arc::new(kvm),
            cpuid,
        })
    }

    /// The CPUID KVM supports.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// The system handle.
    pub(crate) fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The largest vCPU count KVM allows.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates a VM whose RAM is `mem`'s host mapping.
    pub fn create_vm(&self, mem: &VmMemory) -> Result<VmFd, KvmError> {
        let vm = ioctl("create a VM", self.kvm.create_vm())?;
        add_memslots(&vm, mem, 0)?;
        Ok(vm)
    }
}

/// Gives `vm` one memslot per RAM range of `mem`, with `flags`.
pub(crate) fn add_memslots(vm: &VmFd, mem: &VmMemory, flags: u32) -> Result<(), KvmError> {
    for (slot, (gpa, len, host)) in mem.host_ranges().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: the host range belongs to `mem`'s reservation, which
        // outlives the VM: the VM holds its memory until it is dropped.
        ioctl("add a memory slot", unsafe {
            vm.set_user_memory_region(region)
        })?;
    }
    Ok(())
}

/// Creates vCPU `index` with register syncing through `kvm_run` enabled,
/// so exits carry the registers without extra ioctls (each costs several
/// microseconds on this host).
pub fn create_vcpu(vm: &VmFd, index: u32, cpuid: &CpuId) -> Result<VcpuFd, KvmError> {
    let mut vcpu = ioctl("create a vCPU", vm.create_vcpu(u64::from(index)))?;
    ioctl("set the vCPU's CPUID", vcpu.set_cpuid2(cpuid))?;
    vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
    vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
    Ok(vcpu)
}
