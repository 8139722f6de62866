//! The devices every VM has, on the I/O port bus: the 16550 serial port
//! at 0x3f8 (the console), the power-management control port and ACPI's
//! sleep registers (a guest's power-off), and the reset ports.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::{Serial, Trigger};

use crate::acpi;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// PM1a control, where a guest writes SLP_TYP | SLP_EN to power off
/// (the address QEMU's machines use).
pub const POWER_PORT: u16 = 0x604;
const SLP_EN: u16 = 1 << 13;
/// The reset control register (write with bit 2 set: reset).
pub const RESET_PORT: u16 = 0xcf9;
/// The i8042 command port (0xfe: pulse the reset line).
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// What a guest asked for through a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    PowerOff,
    Reset,
}

/// The serial port's interrupt line: an eventfd KVM turns into IRQ 4
/// (irqfd) when the VM has an interrupt controller; otherwise none, and
/// guests poll the line status register.
#[derive(Debug, Default)]
pub struct IrqLine(pub Option<vmm_sys_util::eventfd::EventFd>);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

pub type Console = Box<dyn Write + Send>;

/// A console log that stops growing at `limit` bytes, so a guest cannot
/// fill its host's disk: once full, one line says so and the rest of the
/// guest's output is dropped.
#[derive(Debug)]
pub struct CappedLog<W: Write> {
    out: W,
    written: u64,
    limit: u64,
}

/// How much console a VM keeps in its log.
pub const CONSOLE_LOG_BYTES_MAX: u64 = 64 << 20;

impl<W: Write> CappedLog<W> {
    /// `already` bytes are in the log (it is appended to).
    pub fn new(out: W, already: u64, limit: u64) -> CappedLog<W> {
        CappedLog {
            out,
            written: already,
            limit,
        }
    }
}

impl<W: Write> Write for CappedLog<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written < self.limit {
            let room = (self.limit - self.written) as usize;
            let take = buf.len().min(room);
            self.out.write_all(&buf[..take])?;
            self.written += take as u64;
            if self.written >= self.limit {
                self.out
                    .write_all(b"\n[vmrun: console log full; later output dropped]\n")?;
            }
        }
        // The guest's bytes are taken either way: a full log never stalls it.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The port-I/O devices, shared by the vCPU threads.
pub struct PortBus {
    serial: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, Console>>,
}

impl std::fmt::Debug for PortBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortBus").finish_non_exhaustive()
    }
}

impl PortBus {
    pub fn new(console: Console, serial_irq: IrqLine) -> PortBus {
        PortBus {
            serial: Mutex::new(Serial::new(serial_irq, console)),
        }
    }

    /// A guest's write to `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        match port {
            SERIAL_PORT..=0x3ff => {
                // String output (`rep outsb`) brings several bytes.
                let mut serial = self.serial.lock().expect("serial poisoned");
                for &byte in data {
                    let _ = serial.write((port - SERIAL_PORT) as u8, byte);
                }
                let _ = serial.writer_mut().flush();
                None
            }
            POWER_PORT => {
                let value = match data {
                    [low, high, ..] => u16::from_le_bytes([*low, *high]),
                    [low] => u16::from(*low),
                    [] => 0,
                };
                (value & SLP_EN != 0).then_some(GuestRequest::PowerOff)
            }
            RESET_PORT => data
                .first()
                .filter(|&&value| value & 0x4 != 0)
                .map(|_| GuestRequest::Reset),
            I8042_COMMAND_PORT => (data.first() == Some(&0xfe)).then_some(GuestRequest::Reset),
            // ACPI's sleep control register: S5 is soft off.
            acpi::SLEEP_CONTROL_PORT => data
                .first()
                .filter(|&&value| {
                    value & acpi::SLEEP_CONTROL_SLP_EN != 0
                        && (value >> 2) & 0x7 == acpi::SLP_TYP_S5
                })
                .map(|_| GuestRequest::PowerOff),
            // Ports nothing is behind: ignored, as on real hardware.
            _ => None,
        }
    }

    /// A guest's read of `port`; nothing behind a port reads as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_PORT..=0x3ff => {
                // Byte registers; string input (`rep insb`) reads each.
                let mut serial = self.serial.lock().expect("serial poisoned");
                for byte in data.iter_mut() {
                    *byte = serial.read((port - SERIAL_PORT) as u8);
                }
            }
            // ACPI's sleep status register: never woken.
            acpi::SLEEP_STATUS_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_capped_log_stops_at_its_limit_and_says_so() {
        let out = Shared::default();
        let mut log = CappedLog::new(out.clone(), 2, 8);
        log.write_all(b"abcd").expect("write");
        log.write_all(b"efgh")
            .expect("write past the limit is taken");
        log.write_all(b"ijkl").expect("and dropped");
        let text = String::from_utf8(out.0.lock().expect("out").clone()).expect("utf8");
        assert_eq!(
            text,
            "abcdef\n[vmrun: console log full; later output dropped]\n"
        );
    }

    #[test]
    fn the_serial_port_prints_and_the_power_port_powers_off() {
        let out = Shared::default();
        let bus = PortBus::new(Box::new(out.clone()), IrqLine::default());
        for byte in b"hi\n" {
            assert_eq!(bus.write(SERIAL_PORT, &[*byte]), None);
        }
        assert_eq!(&out.0.lock().expect("out")[..], b"hi\n");
        // The line status register says the transmitter is empty.
        let mut lsr = [0u8];
        bus.read(SERIAL_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(
            bus.write(POWER_PORT, &[0, 0x20]),
            Some(GuestRequest::PowerOff)
        );
        assert_eq!(bus.write(POWER_PORT, &[0, 0]), None);
        assert_eq!(bus.write(RESET_PORT, &[0x6]), Some(GuestRequest::Reset));
        assert_eq!(
            bus.write(I8042_COMMAND_PORT, &[0xfe]),
            Some(GuestRequest::Reset)
        );
        // ACPI S5 (SLP_TYP 5, SLP_EN) powers off; S1 does nothing.
        assert_eq!(
            bus.write(acpi::SLEEP_CONTROL_PORT, &[0x34]),
            Some(GuestRequest::PowerOff)
        );
        assert_eq!(bus.write(acpi::SLEEP_CONTROL_PORT, &[0x24]), None);
        let mut status = [0xffu8];
        bus.read(acpi::SLEEP_STATUS_PORT, &mut status);
        assert_eq!(status, [0]);
        let mut unknown = [0u8; 2];
        bus.read(0x80, &mut unknown);
        assert_eq!(unknown, [0xff, 0xff]);
    }
}
