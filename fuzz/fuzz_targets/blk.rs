//! virtio-blk under a hostile driver: random queues over guest memory of
//! random contents, every choice read off the fuzzer's input.

#![no_main]

use devices::virtio::fuzz::{Kind, run};

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(Kind::Blk, data));
