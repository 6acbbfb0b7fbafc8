//! Lazy restore from a snapshot memory file: a restored VM reads what was
//! saved, one run at a time on first access, catches a damaged page,
//! shares copy-on-write with its clones, and leaks nothing.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{PAGE, RW, byte, info};
use memory::{
    Config, Context, Entry, Image, ImageError, ImageRun, Layout, LiveSnapshot, MAX_RUN_PAGES,
    MemError, SwapError, VmMemory, audit, index_image,
};

/// Two RAM ranges with a gap, so file offsets (guest-physical) and page
/// numbers differ in the second.
fn layout() -> Layout {
    Layout::new(&[(0, 4 << 20), (8 << 20, 4 << 20)]).unwrap()
}

fn context() -> Arc<Context> {
    Context::new(Config {
        fault_around: 1,
        ..Config::default()
    })
}

/// A page's pattern: its address and a seed in every 8 bytes.
fn pattern(gpa: u64, seed: u64) -> Vec<u8> {
    (0..PAGE / 8)
        .flat_map(|i| (gpa ^ (seed << 40) ^ i).to_le_bytes())
        .collect()
}

/// Pages written in the saved VM: a long stretch (more than one run), two
/// lone pages, a page of zeros, and pages in the second range.
fn written() -> Vec<u64> {
    let mut v: Vec<u64> = (0..100).map(|i| 0x10_0000 + i * PAGE).collect();
    v.extend([0x30_0000, 0x30_2000, 0x80_0000, 0x80_1000, 0xbf_f000]);
    v
}

/// A VM with the pages of [`written`] (and one page of zeros) snapshotted
/// into an unlinked file; returns the file and its index.
fn saved(ctx: &Arc<Context>) -> (File, Vec<ImageRun>) {
    let vm = VmMemory::new(ctx, layout()).unwrap();
    for gpa in written() {
        vm.write(gpa, &pattern(gpa, 1)).unwrap();
    }
    vm.write(0x20_0000, &[0; PAGE as usize]).unwrap();
    let f = memory::open_unlinked(&std::env::temp_dir()).unwrap();
    LiveSnapshot::copy_stopped(&vm, f.try_clone().unwrap(), |_, _| {}).unwrap();
    let runs = index_image(&f, &layout()).unwrap();
    (f, runs)
}

fn restored(ctx: &Arc<Context>) -> (Arc<Image>, Arc<VmMemory>) {
    let (f, runs) = saved(ctx);
    let image = Image::open(f, "test image", layout(), &runs).unwrap();
    let vm = VmMemory::restore(ctx, &image).unwrap();
    (image, vm)
}

fn page(vm: &VmMemory, gpa: u64) -> Vec<u8> {
    let mut b = vec![0; PAGE as usize];
    vm.read(gpa, &mut b).unwrap();
    b
}

#[test]
fn the_index_lists_pages_with_contents_in_runs() {
    let ctx = context();
    let (_, runs) = saved(&ctx);
    let listed: Vec<u64> = runs
        .iter()
        .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * PAGE))
        .collect();
    assert_eq!(listed, written(), "the zero page or a hole was listed");
    assert!(runs.iter().all(|r| (1..=MAX_RUN_PAGES).contains(&r.pages)));
    assert_eq!(runs[0].pages, MAX_RUN_PAGES);
    assert_eq!(runs.len(), 6, "{runs:?}");
}

#[test]
fn a_restored_vm_reads_what_was_saved_one_run_at_a_time() {
    let ctx = context();
    let (image, vm) = restored(&ctx);
    let before = ctx.stats();
    assert_eq!(before.image_pages, written().len() as u64);
    assert_eq!(before.resident, 0, "restore read pages eagerly");
    assert!(matches!(
        vm.entry(0x10_0000),
        Some(Entry::Swap {
            exclusive: true,
            ..
        })
    ));
    assert_eq!(vm.entry(0x20_0000), Some(Entry::None));
    audit(&ctx, &[&vm]).unwrap();

    // One read loads its run (read and checked once), nothing more.
    assert_eq!(page(&vm, 0x10_5000), pattern(0x10_5000, 1));
    let s = ctx.stats();
    assert_eq!((s.image_loads, s.swap_ins, s.swapped), (64, 0, 0));
    assert_eq!(s.image_pages, before.image_pages - 64);
    assert_eq!(s.resident, 64);
    assert!(matches!(
        vm.entry(0x13_f000),
        Some(Entry::Present { writable: true, .. })
    ));
    image_entry(&vm, 0x14_0000);
    audit(&ctx, &[&vm]).unwrap();
    for gpa in written() {
        assert_eq!(page(&vm, gpa), pattern(gpa, 1), "page {gpa:#x}");
    }
    assert_eq!(page(&vm, 0x20_0000), vec![0; PAGE as usize]);
    assert_eq!(page(&vm, 0x90_0000), vec![0; PAGE as usize]);
    let s = ctx.stats();
    assert_eq!((s.image_loads, s.image_pages), (written().len() as u64, 0));
    // A loaded page is an ordinary exclusive page of this VM.
    assert!(info(&vm, 0x10_0000).exclusive);
    vm.write(0x10_0000, &[7]).unwrap();
    assert_eq!(byte(&vm, 0x10_0000), 7);
    audit(&ctx, &[&vm]).unwrap();
    drop(vm);
    assert_eq!(Arc::strong_count(&image), 1, "the context kept the image");
}

fn image_entry(vm: &VmMemory, gpa: u64) {
    match vm.entry(gpa) {
        Some(Entry::Swap { .. }) => {}
        other => panic!("{gpa:#x} is {other:?}, not an image entry"),
    }
}

#[test]
fn under_a_resident_limit_one_page_comes_in_at_a_time() {
    let ctx = context();
    let (_image, vm) = restored(&ctx);
    vm.set_resident_limit(Some(1000));
    assert_eq!(page(&vm, 0x10_5000), pattern(0x10_5000, 1));
    assert_eq!(page(&vm, 0x10_6000), pattern(0x10_6000, 1));
    let s = ctx.stats();
    assert_eq!((s.image_loads, s.resident), (2, 2));
    image_entry(&vm, 0x10_4000);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_damaged_page_is_caught_on_first_access() {
    let ctx = context();
    let (f, runs) = saved(&ctx);
    let image = Image::open(f.try_clone().unwrap(), "damaged.mem", layout(), &runs).unwrap();
    let vm = VmMemory::restore(&ctx, &image).unwrap();
    let child = vm.fork().unwrap();
    // Run 0 is checked and loaded; then a page of run 1 is damaged.
    assert_eq!(page(&vm, 0x10_0000), pattern(0x10_0000, 1));
    f.write_all_at(&[0xee], 0x15_0000 + 17).unwrap();
    let mut b = [0u8; 1];
    match vm.read(0x14_0000 + 3 * PAGE, &mut b) {
        Err(MemError::Swap {
            gpa,
            source: SwapError::ImageCorrupt {
                run, pages, path, ..
            },
        }) => {
            assert_eq!((gpa, run, pages), (0x14_3000, 1, 36));
            assert_eq!(path, "damaged.mem");
        }
        other => panic!("a damaged run was read: {other:?}"),
    }
    image_entry(&vm, 0x14_3000);
    // The message names the run and the file.
    let e = vm.read(0x15_0000, &mut b).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains("run 1 of the snapshot memory file damaged.mem"),
        "{chain}"
    );
    // A page of a verified run changed later is caught too (the clone
    // still reads run 0 from the file).
    f.write_all_at(&[0xee], 0x10_1000).unwrap();
    assert!(matches!(
        child.read(0x10_2000, &mut b),
        Err(MemError::Swap {
            source: SwapError::ImageCorrupt { run: 0, .. },
            ..
        })
    ));
    assert_eq!(page(&vm, 0x10_1000), pattern(0x10_1000, 1));
    audit(&ctx, &[&vm, &child]).unwrap();
}

#[test]
fn a_fork_of_a_restored_vm_shares_and_copies_on_write() {
    let ctx = context();
    let (_image, p) = restored(&ctx);
    assert_eq!(page(&p, 0x10_0000), pattern(0x10_0000, 1));
    let c = p.fork().unwrap();
    // R6: the child's image entries are not exclusive, nor the parent's.
    for vm in [&p, &c] {
        assert!(matches!(
            vm.entry(0x30_0000),
            Some(Entry::Swap {
                exclusive: false,
                ..
            })
        ));
    }
    assert_eq!(ctx.stats().image_pages, 2 * (written().len() as u64 - 64));
    audit(&ctx, &[&p, &c]).unwrap();
    // A page loaded before the fork is shared; a write copies it.
    c.write(0x10_0000, &[9]).unwrap();
    assert_eq!((byte(&p, 0x10_0000), byte(&c, 0x10_0000)), (0, 9));
    // Each VM loads its own copy of an image page.
    p.write(0x30_0000, &[5]).unwrap();
    assert_eq!(page(&c, 0x30_0000), pattern(0x30_0000, 1));
    assert_eq!(byte(&p, 0x30_0000), 5);
    let pin = c.pin(0x80_1000, PAGE, RW).unwrap();
    let mut b = [0u8; 8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b[..], pattern(0x80_1000, 1)[..8]);
    drop(pin);
    audit(&ctx, &[&p, &c]).unwrap();
    // Discarded image pages read zeros and drop their entries.
    c.discard(0x80_0000, 2 * PAGE).unwrap();
    assert_eq!(page(&c, 0x80_0000), vec![0; PAGE as usize]);
    audit(&ctx, &[&p, &c]).unwrap();
    drop(p);
    audit(&ctx, &[&c]).unwrap();
    drop(c);
    let s = ctx.stats();
    assert_eq!((s.resident, s.image_pages), (0, 0), "{s:?}");
    audit(&ctx, &[]).unwrap();
}

#[test]
fn an_image_is_released_with_its_last_entry_and_areas_are_reused() {
    let ctx = context();
    let (f, runs) = saved(&ctx);
    let image = Image::open(f, "img", layout(), &runs).unwrap();
    // The same image twice shares an area; fourteen distinct ones fill
    // every area.
    let a = VmMemory::restore(&ctx, &image).unwrap();
    let b = VmMemory::restore(&ctx, &image).unwrap();
    assert_eq!(ctx.stats().image_pages, 2 * image.pages());
    let mut others = Vec::new();
    for _ in 0..13 {
        let (f, runs) = saved(&ctx);
        let img = Image::open(f, "other", layout(), &runs).unwrap();
        others.push(VmMemory::restore(&ctx, &img).unwrap());
    }
    let (f, runs) = saved(&ctx);
    let img = Image::open(f, "one too many", layout(), &runs).unwrap();
    assert!(matches!(
        VmMemory::restore(&ctx, &img),
        Err(ImageError::TooMany)
    ));
    let all: Vec<&VmMemory> = others.iter().map(|v| &**v).chain([&*a, &*b]).collect();
    audit(&ctx, &all).unwrap();
    drop(others.pop());
    VmMemory::restore(&ctx, &img).expect("a released area is reused");
    drop((a, b));
    assert_eq!(Arc::strong_count(&image), 1, "area not released");
}

#[test]
fn bad_indexes_and_short_files_are_refused() {
    let ctx = context();
    let (f, runs) = saved(&ctx);
    let open = |runs: &[ImageRun]| Image::open(f.try_clone().unwrap(), "m", layout(), runs);
    let why = |runs: &[ImageRun]| match open(runs) {
        Err(ImageError::BadRun { why, .. }) => why,
        other => panic!("accepted: {other:?}"),
    };
    let run = |gpa, pages| ImageRun { gpa, pages, crc: 0 };
    assert_eq!(why(&[run(0x1000, 0)]), "has not 1 to 64 pages");
    assert_eq!(why(&[run(0x1000, 65)]), "has not 1 to 64 pages");
    assert_eq!(why(&[run(0x1001, 1)]), "is not page-aligned");
    assert_eq!(why(&[run(0x3f_f000, 2)]), "is not inside one RAM range");
    assert_eq!(why(&[run(0x40_0000, 1)]), "is not inside one RAM range");
    assert_eq!(
        why(&[run(0x2000, 2), run(0x3000, 1)]),
        "overlaps or precedes the run before it"
    );
    assert_eq!(
        why(&[run(0x5000, 1), run(0x3000, 1)]),
        "overlaps or precedes the run before it"
    );
    f.set_len(0x80_0000).unwrap();
    match open(&runs) {
        Err(e @ ImageError::Short { len, needed, .. }) => {
            assert_eq!((len, needed), (0x80_0000, 0xc0_0000));
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        other => panic!("a short file was accepted: {other:?}"),
    }
    assert!(open(&[]).is_ok());
}
