//! Guest-physical memory that behaves like Linux anonymous memory.
//!
//! A VM's memory ([`VmMemory`]) is a stage-2 table from guest page to
//! [`Entry`], the frames those entries name, and a host mapping derived
//! from the table that KVM's memslots point at. Faults that KVM reports
//! (a write to a read-only page, an access to an absent one) are resolved
//! here, following MEMORY-MODEL.md.
//!
//! # Lock order
//! Outermost first; debug builds assert it on every acquisition
//! (see `lock.rs`):
//!
//! 1. a VM's memory-map lock (`map_lock`, Linux's `mmap_lock`);
//! 2. the memory-map lock of the second VM of a two-VM operation: a VM
//!    being created by fork, or the origin a VM is reset to;
//! 3. a leaf-table lock (Linux's page-table lock);
//! 4. the second VM's leaf-table lock (fork's child, reset's origin);
//! 5. a VM's store list;
//! 6. a store's reverse map;
//! 7. the context's registry of live VMs;
//! 8. a VM's record of write-protect events;
//! 9. the swap file's slot allocator;
//! 10. the context's table of snapshot image areas;
//! 11. a VM's record of pages the VMM wrote;
//! 12. a table's record of changed entries (a live snapshot's, see
//!     `table.rs`);
//! 13. a VM's host mapping handle (std's lock: readers hold it around one
//!     host call; a fork that moves the VM to a spare's mapping writes the
//!     VM's and then the spare's, under the VM's memory-map lock held for
//!     writing).
//!
//! Frame counts and the anon-exclusive bit are atomics, changed under the
//! table lock of an entry that maps the frame, or by the holder of a
//! reference (pins). The write-protect sequence count is not a lock: fork
//! and a live snapshot hold it odd while they write-protect the VM (under
//! the memory-map lock, which keeps them apart), and the lockless pin path
//! gives up when it saw it odd or changed. A collapse retracts a leaf's
//! small table under the memory-map lock held for writing and the leaf's
//! lock, and waits for the lockless walkers inside the leaf (`table.rs`).
//!
//! `memory` knows nothing of KVM: it hands the VMM host ranges to register
//! as memslots and changes the protection of host pages itself; KVM follows
//! through its MMU notifiers. A fork may instead move the VM to new host
//! ranges ([`VmMemory::fork_rehosted`]); the VMM then moves it to a KVM VM
//! over them.

mod audit;
mod collapse;
mod context;
mod dirty;
mod entry;
mod fault;
mod fork;
mod frame;
mod host_reap;
mod huge;
mod image;
mod layout;
mod lock;
mod migrate;
mod periodic;
mod pin;
mod reclaim;
mod reset;
mod restore;
mod slots;
mod snapshot;
mod store;
mod swap;
mod sync;
mod sys;
mod table;
mod view;
mod vm;
mod wp;

pub use audit::audit;
pub use collapse::{Collapse, CollapseRefusal, Collapser, HUGE_SIZE};
pub use context::{Config, Context, HugeCow, StatsSnapshot};
pub use entry::{Entry, MigrationKind};
pub use fork::ForkPhases;
pub use huge::{SHMEM_THP_2M_KNOB, SHMEM_THP_KNOB, huge_pages_available};
pub use image::{Image, ImageError, ImageRun, MAX_RUN_PAGES, index_image};
pub use layout::{Layout, LayoutError, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_LEAF, RamRange, Runs};
pub use migrate::{Compactor, MigrateReport};
pub use pin::{Pin, PinError, PinFlags, Slices};
pub use reclaim::{RECENT as RECENT_FAULTS, SwapOutReport};
pub use reset::ResetReport;
pub use snapshot::{LiveSnapshot, SnapshotError, SnapshotReport};
pub use swap::{MAX_SLOTS as MAX_SWAP_SLOTS, SwapError, open_unlinked};
pub use view::GuestView;
pub use vm::{Access, FrameInfo, MemError, VmMemory, max_map_count};
pub use wp::WriteListener;
