//! Tests of the state file format: a round trip, and every refusal.

use std::path::Path;

use super::*;

fn state() -> SnapState {
    let mut regs = kvm_regs {
        rip: 0x40_1234,
        rsp: 0x7f_fff0,
        r12: 42,
        ..Default::default()
    };
    regs.rflags = 0x3202;
    let mut xsave = kvm_xsave::default();
    xsave.region[40] = 0xdead_beef;
    let vcpu = VcpuState {
        regs,
        sregs: kvm_sregs {
            cr0: 0x8005_0033,
            ..Default::default()
        },
        xsave,
        xcrs: kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        },
        tsc: None,
    };
    SnapState {
        ram: vec![(0, 3 << 30), (4 << 30, 1 << 30)],
        vcpus: vec![Some(vcpu), None],
        uart: SerialState {
            line_control: 3,
            scratch: 0x5a,
            in_buffer: b"in".to_vec(),
            ..SerialState::default()
        },
        runs: vec![
            ImageRun {
                gpa: 0x10_0000,
                pages: 64,
                crc: 7,
            },
            ImageRun {
                gpa: 1 << 32,
                pages: 1,
                crc: 8,
            },
        ],
    }
}

fn decode(bytes: &[u8]) -> Result<SnapState, SnapfileError> {
    SnapState::decode(bytes, Path::new("/x/state"))
}

/// `bytes` with its checksum recomputed (a file crafted to pass it).
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - 8;
    let crc = crc64(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn crc64_is_xz() {
    assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
    assert_eq!(crc64(b""), 0);
}

#[test]
fn a_state_comes_back_as_it_was_written() {
    let s = state();
    let back = decode(&s.encode()).unwrap();
    assert_eq!(back.ram, s.ram);
    assert_eq!(back.runs, s.runs);
    assert_eq!(back.uart, s.uart);
    let (a, b) = (
        s.vcpus[0].as_ref().unwrap(),
        back.vcpus[0].as_ref().unwrap(),
    );
    assert_eq!(a.regs.as_bytes(), b.regs.as_bytes());
    assert_eq!(a.sregs.as_bytes(), b.sregs.as_bytes());
    assert_eq!(a.xsave.as_bytes(), b.xsave.as_bytes());
    assert_eq!(a.xcrs.as_bytes(), b.xcrs.as_bytes());
    assert!(back.vcpus[1].is_none());
}

#[test]
fn an_empty_file_is_refused() {
    let e = decode(&[]).unwrap_err();
    assert!(matches!(e, SnapfileError::Empty(_)), "{e:?}");
    assert_eq!(e.to_string(), "the snapshot state file /x/state is empty");
}

#[test]
fn a_truncated_file_is_refused_at_any_length() {
    let bytes = state().encode();
    for n in 1..bytes.len() {
        match decode(&bytes[..n]) {
            Err(SnapfileError::Truncated { len, needed, .. }) => {
                assert_eq!(len, n as u64);
                assert!(needed > len);
            }
            other => panic!("{n} bytes: {other:?}"),
        }
    }
    let e = decode(&bytes[..100]).unwrap_err().to_string();
    assert!(e.contains("is truncated: 100 bytes"), "{e}");
}

#[test]
fn a_file_with_another_magic_is_refused() {
    let mut bytes = state().encode();
    bytes[0] = b'X';
    let e = decode(&bytes).unwrap_err();
    assert!(matches!(e, SnapfileError::BadMagic { .. }), "{e:?}");
    assert!(
        e.to_string().contains("is not a snapshot state file"),
        "{e}"
    );
    // A memory file given as the state file.
    let e = decode(&[0; 4096]).unwrap_err();
    assert!(matches!(e, SnapfileError::BadMagic { .. }), "{e:?}");
}

#[test]
fn an_unknown_version_is_refused_naming_the_supported_one() {
    let mut bytes = state().encode();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = decode(&resealed(bytes)).unwrap_err();
    assert!(
        matches!(e, SnapfileError::BadVersion { found: 2, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("version 2; this vmm reads version 1"),
        "{e}"
    );
}

#[test]
fn a_changed_byte_fails_the_checksum() {
    let bytes = state().encode();
    for at in (HEADER..bytes.len()).step_by(13) {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        match decode(&b) {
            Err(SnapfileError::BadChecksum {
                stored, computed, ..
            }) => {
                assert_ne!(stored, computed)
            }
            other => panic!("byte {at} changed: {other:?}"),
        }
    }
    let mut b = bytes;
    b[30] ^= 1;
    let e = decode(&b).unwrap_err().to_string();
    assert!(e.contains("fails its checksum"), "{e}");
}

#[test]
fn bytes_after_the_checksum_are_refused() {
    let mut bytes = state().encode();
    bytes.push(0);
    let e = decode(&bytes).unwrap_err();
    assert!(matches!(e, SnapfileError::Malformed { .. }), "{e:?}");
}

#[test]
fn a_payload_that_passes_the_checksum_but_not_the_parser_is_refused() {
    let good = state().encode();
    let at = |bytes: &mut Vec<u8>, off: usize, v: &[u8]| {
        bytes[HEADER + off..HEADER + off + v.len()].copy_from_slice(v);
    };
    let why = |bytes: Vec<u8>| match decode(&resealed(bytes)) {
        Err(SnapfileError::Malformed { why, .. }) => why,
        other => panic!("accepted: {other:?}"),
    };
    let mut b = good.clone();
    at(&mut b, 0, &7u32.to_le_bytes());
    assert!(why(b).contains("only program-mode"));
    let mut b = good.clone();
    at(&mut b, 4, &1000u32.to_le_bytes());
    assert!(why(b).contains("1000 RAM ranges"));
    // vCPU count, after two ranges.
    let mut b = good.clone();
    at(&mut b, 8 + 32, &0u32.to_le_bytes());
    assert!(why(b).contains("no vCPU"));
    let mut b = good.clone();
    at(&mut b, 8 + 32 + 4, &[9]);
    assert!(why(b).contains("unknown kind 9"));
    let mut b = good.clone();
    at(&mut b, 8 + 32 + 5, &12u32.to_le_bytes());
    assert!(why(b).contains("the registers is 12 bytes"));
    // Every random change, resealed, is an error or a state: never a panic.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = good.clone();
        let off = HEADER + (seed as usize >> 8) % (good.len() - HEADER - 8);
        b[off] = seed as u8;
        let _ = decode(&resealed(b));
    }
}
