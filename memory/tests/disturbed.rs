//! MEMORY-MODEL.md's acceptance scenarios 1-9 and 11 again, with the
//! frames involved swapped out, or migrated, right before the decisive
//! step (and undisturbed, for reference), each on small and on huge
//! mappings. What each VM and each pin reads
//! must not change; the audit checks R1, R4 and every count after each.

mod common;

use std::sync::Arc;

use common::{A, PAGE, RO, RW, byte, setup, setup_huge};
use memory::{Context, Entry, Pin, VmMemory, audit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disturb {
    Nothing,
    Swap,
    Migrate,
}

/// One run of a scenario: the disturbance, and whether the VM maps its
/// memory with huge entries (then a swap-out or a migration of page A
/// splits the block holding it first, keeping exclusivity and protection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Case {
    disturb: Disturb,
    huge: bool,
}

/// Every disturbance, on small and on huge mappings.
fn cases() -> impl Iterator<Item = Case> {
    [false, true].into_iter().flat_map(|huge| {
        [Disturb::Nothing, Disturb::Swap, Disturb::Migrate]
            .into_iter()
            .map(move |disturb| Case { disturb, huge })
    })
}

/// The context and VM of [`common::setup`], on huge mappings if asked.
fn setup_for(c: Case) -> (Arc<Context>, Arc<VmMemory>) {
    if c.huge { setup_huge() } else { setup() }
}

/// Swaps out or migrates page A of each VM; returns how many pages were
/// skipped as pinned.
fn disturb(d: Case, vms: &[&Arc<VmMemory>]) -> u64 {
    vms.iter()
        .map(|vm| match d.disturb {
            Disturb::Nothing => 0,
            Disturb::Swap => vm.swap_out(A, PAGE).unwrap().pinned,
            Disturb::Migrate => vm.migrate(A, PAGE).unwrap().pinned,
        })
        .sum()
}

fn pin_byte(pin: &Pin) -> u8 {
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    b[0]
}

fn check(ctx: &Context, vms: &[&Arc<VmMemory>], d: Case) {
    let vms: Vec<&VmMemory> = vms.iter().map(|v| &***v).collect();
    audit(ctx, &vms).unwrap_or_else(|e| panic!("{d:?}: {e}"));
}

#[test]
fn s1_basic_cow_after_fork() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        assert_eq!(p.frame_info(A).unwrap().huge, d.huge, "{d:?}");
        let c = p.fork().unwrap();
        disturb(d, &[&p, &c]);
        check(&ctx, &[&p, &c], d);
        p.write(A, &[2]).unwrap();
        assert_eq!((byte(&p, A), byte(&c, A)), (2, 1), "{d:?}");
        disturb(d, &[&p, &c]);
        c.write(A, &[3]).unwrap();
        assert_eq!((byte(&p, A), byte(&c, A)), (2, 3), "{d:?}");
        check(&ctx, &[&p, &c], d);
    }
}

#[test]
fn s2_read_only_then_writable_again() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        let c = p.fork().unwrap();
        disturb(d, &[&p, &c]);
        p.write_protect(A, PAGE).unwrap();
        p.unprotect(A, PAGE).unwrap();
        // R1 is in the audit: a writable entry maps an exclusive frame.
        check(&ctx, &[&p, &c], d);
        p.write(A, &[2]).unwrap();
        assert_eq!((byte(&p, A), byte(&c, A)), (2, 1), "{d:?}");
        check(&ctx, &[&p, &c], d);
    }
}

#[test]
fn s3_child_read_pin_then_parent_write() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        let c = p.fork().unwrap();
        let pin = c.pin(A, 1, RO).unwrap();
        c.discard(A, PAGE).unwrap();
        disturb(d, &[&p, &c]);
        p.write(A, &[2]).unwrap();
        assert_eq!(
            pin_byte(&pin),
            1,
            "{d:?}: the child's pin saw the parent's write"
        );
        check(&ctx, &[&p, &c], d);
    }
}

#[test]
fn s4_parent_read_pin_then_child_write() {
    for d in cases() {
        for pin_before in [true, false] {
            let (ctx, p) = setup_for(d);
            p.write(A, &[1]).unwrap();
            let (pin, c) = if pin_before {
                let pin = p.pin(A, 1, RO).unwrap();
                (pin, p.fork().unwrap())
            } else {
                let c = p.fork().unwrap();
                disturb(d, &[&p, &c]);
                (p.pin(A, 1, RO).unwrap(), c)
            };
            p.discard(A, PAGE).unwrap();
            disturb(d, &[&p, &c]);
            c.write(A, &[9]).unwrap();
            assert_eq!(pin_byte(&pin), 1, "{d:?}, pin before fork: {pin_before}");
            check(&ctx, &[&p, &c], d);
        }
    }
}

#[test]
fn s5_rw_pin_read_only_mapping_then_guest_write() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        let pin = p.pin(A, PAGE, RW).unwrap();
        p.write_protect(A, PAGE).unwrap();
        let skipped = disturb(d, &[&p]);
        assert_eq!(
            skipped,
            u64::from(d.disturb != Disturb::Nothing),
            "{d:?}: a pinned frame moved"
        );
        p.write(A, &[7]).unwrap();
        assert_eq!(
            pin_byte(&pin),
            7,
            "{d:?}: the device missed the guest's write"
        );
        check(&ctx, &[&p], d);
    }
}

#[test]
fn s6_rw_pin_then_fork() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        let pin = p.pin(A, PAGE, RW).unwrap();
        let c = p.fork().unwrap();
        disturb(d, &[&p, &c]);
        p.write(A, &[5]).unwrap();
        assert_eq!(pin_byte(&pin), 5, "{d:?}");
        pin.write(1, &[6]).unwrap();
        assert_eq!(byte(&p, A + 1), 6, "{d:?}");
        assert_eq!(
            (byte(&c, A), byte(&c, A + 1)),
            (1, 0),
            "{d:?}: the child saw it"
        );
        check(&ctx, &[&p, &c], d);
    }
}

#[test]
fn s7_read_pin_on_a_shared_frame() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        let c = p.fork().unwrap();
        disturb(d, &[&p, &c]);
        let pin = p.pin(A, 1, RO).unwrap();
        p.write(A, &[3]).unwrap();
        assert_eq!(
            pin_byte(&pin),
            3,
            "{d:?}: the pin missed the parent's write"
        );
        assert_eq!(byte(&c, A), 1, "{d:?}");
        check(&ctx, &[&p, &c], d);
    }
}

#[test]
fn s8_read_pin_on_a_frame_whose_sharer_is_gone() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        drop(p.fork().unwrap());
        disturb(d, &[&p]);
        let pin = p.pin(A, 1, RO).unwrap();
        p.write(A, &[4]).unwrap();
        assert_eq!(pin_byte(&pin), 4, "{d:?}");
        check(&ctx, &[&p], d);
    }
}

#[test]
fn s9_read_pin_on_an_exclusive_frame() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        disturb(d, &[&p]);
        let pin = p.pin(A, 1, RO).unwrap();
        p.write(A, &[8]).unwrap();
        assert_eq!(pin_byte(&pin), 8, "{d:?}");
        check(&ctx, &[&p], d);
    }
}

#[test]
fn s11_protection_survives_swap_migration_and_zap_and_fork_only_where_asked() {
    for d in cases() {
        let (ctx, p) = setup_for(d);
        p.write(A, &[1]).unwrap();
        assert_eq!(p.frame_info(A).unwrap().huge, d.huge, "{d:?}");
        p.protect_for_listener(A, PAGE, true).unwrap();
        disturb(d, &[&p]);
        assert!(p.entry(A).unwrap().wp(), "{d:?}: protection lost");
        let c = p.fork().unwrap();
        assert!(
            !c.entry(A).unwrap().wp(),
            "{d:?}: the child inherited protection"
        );
        disturb(d, &[&p, &c]);
        c.write(A, &[2]).unwrap();
        assert!(p.take_write_events(8).is_empty() && c.take_write_events(8).is_empty());
        p.write(A, &[3]).unwrap();
        assert_eq!(
            p.take_write_events(8),
            vec![A],
            "{d:?}: the write was not reported"
        );
        // Protected again, zapped, touched: still reported.
        p.protect_for_listener(A, PAGE, true).unwrap();
        disturb(d, &[&p]);
        p.discard(A, PAGE).unwrap();
        assert_eq!(p.entry(A), Some(Entry::Marker { wp: true }), "{d:?}");
        p.write(A, &[4]).unwrap();
        assert_eq!(p.take_write_events(8), vec![A], "{d:?}: lost after the zap");
        assert_eq!((byte(&p, A), byte(&c, A)), (4, 2));
        check(&ctx, &[&p, &c], d);
    }
}
