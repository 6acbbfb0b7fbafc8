//! The 8250/16550 UART on COM1 (ports 0x3f8-0x3ff), built on vm-superio.
//!
//! Program-mode guests only write the transmit register; Linux drives the
//! full UART and gets its interrupt (IRQ 4) through an eventfd that the VMM
//! registers with KVM as an irqfd.

use std::io::Write;

pub use vm_superio::serial::SerialState;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORTS: u16 = 8;

/// How the UART raises its interrupt.
#[derive(Debug)]
pub enum Irq {
    /// No interrupt controller (program mode).
    None,
    /// An eventfd registered as an irqfd.
    EventFd(EventFd),
}

impl Trigger for Irq {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            Irq::None => Ok(()),
            Irq::EventFd(fd) => fd.write(1),
        }
    }
}

/// COM1, writing what the guest transmits to `W`.
#[derive(Debug)]
pub struct Serial<W: Write> {
    uart: Uart<Irq, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> Serial<W> {
    /// A UART that transmits to `out`.
    pub fn new(irq: Irq, out: W) -> Self {
        Self {
            uart: Uart::new(irq, out),
        }
    }

    /// A UART in this one's state, transmitting to `out` (for a forked VM).
    pub fn clone_to<W2: Write>(&self, irq: Irq, out: W2) -> Serial<W2> {
        let uart = Uart::from_state(&self.uart.state(), irq, vm_superio::serial::NoEvents, out)
            .expect("a state taken from a live UART is valid");
        Serial { uart }
    }

    /// The UART's registers and receive buffer (for a snapshot).
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// A UART in `state`, transmitting to `out` (for a restored VM); an
    /// error for a state no UART can be in.
    pub fn from_state(state: &SerialState, irq: Irq, out: W) -> Result<Self, String> {
        Uart::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("UART state refused: {e}"))
    }

    /// Whether `port` belongs to the UART.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest write to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write((port - COM1_BASE) as u8, value) {
            log::warn!("serial: {e:?}");
        }
    }

    /// A guest read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    /// Queues bytes for the guest to receive.
    pub fn receive(&mut self, bytes: &[u8]) {
        if let Err(e) = self.uart.enqueue_raw_bytes(bytes) {
            log::warn!("serial input dropped: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_bytes_written_to_thr() {
        let mut s = Serial::new(Irq::None, Vec::new());
        for b in b"hi\n" {
            s.write(COM1_BASE, *b);
        }
        assert_eq!(s.uart.writer(), b"hi\n");
        // Line status: transmitter empty.
        assert_ne!(s.read(COM1_BASE + 5) & 0x20, 0);
        assert!(Serial::<Vec<u8>>::handles(0x3ff) && !Serial::<Vec<u8>>::handles(0x400));
    }

    #[test]
    fn a_state_goes_and_comes_back() {
        let mut s = Serial::new(Irq::None, Vec::new());
        s.write(COM1_BASE + 7, 0x5a);
        let state = s.state();
        let mut t = Serial::from_state(&state, Irq::None, Vec::new()).unwrap();
        assert_eq!(t.read(COM1_BASE + 7), 0x5a);
        let full = SerialState {
            in_buffer: vec![0; 65],
            ..state
        };
        assert!(Serial::from_state(&full, Irq::None, Vec::new()).is_err());
    }
}
