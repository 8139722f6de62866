//! Host ports: a TAP interface on the node, joined to a segment, so the
//! segment reaches the node's own network stack. Addresses, routes and
//! bridges on the interface are the host's business, as with any NIC.
//!
//! The interface is made when the port is (with the port's MAC address,
//! and up) and goes away with it: it is not persistent, so a `fabricd`
//! that stops leaves none behind; an interface of that name that exists
//! already is refused. It may be moved to another network namespace; the
//! port keeps serving it there. If it goes away (deleted, or its namespace
//! was), the port's thread ends and [`HostPort::alive`] says so.
//!
//! The port's thread waits for the interface to have frames, reads up to
//! a batch of them (64) without waiting, and switches the batch as a
//! guest's transmit queue would be switched. Frames to the port are
//! written to the interface one at a time; one the interface does not
//! take (it is down, or its queue is full) is counted `no_room`. The
//! interface carries no offloads: the host's stack checksums and segments
//! what it sends, so every frame is a plain Ethernet frame.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::frame::Mac;
use crate::port::{Batch, Fabric, Sink, NET_HEADER_BYTES, TX_BATCH};
use crate::switch::{DropReason, PortConfig, PortId, SwitchError};

/// Longest interface name Linux takes (IFNAMSIZ less the NUL).
pub const INTERFACE_NAME_BYTES_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid host interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open /dev/net/tun: {0}")]
    Open(std::io::Error),
    #[error("cannot create host interface {name}: {source} (it needs CAP_NET_ADMIN, and no interface of that name may exist)")]
    Create {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot give host interface {name} the address {mac}: {source}")]
    Address {
        name: String,
        mac: Mac,
        source: std::io::Error,
    },
    #[error("cannot bring host interface {name} up: {source}")]
    Up {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot take host interface {name}'s carrier away (its link is set down): {source}")]
    Carrier {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot start host interface {name}'s thread: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Switch(#[from] SwitchError),
}

/// Checks a host interface name as Linux would take it, and a little
/// stricter: 1 to 15 bytes of letters, digits, `-`, `_` and `.`, not `.`
/// or `..`.
pub fn check_interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > INTERFACE_NAME_BYTES_MAX {
        return Err("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is . or ..");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// A TAP interface, open. Closing it removes the interface.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// `struct ifreq` with its name set.
fn request(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of plain data), and
    // all zeroes is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, &from) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *to = from as libc::c_char;
    }
    request
}

/// `ioctl(fd, code, request)`, its error as an `io::Error`.
fn ioctl(fd: libc::c_int, code: libc::c_ulong, request: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: every code used here reads or writes one `struct ifreq`, and
    // `request` is one, alive and exclusively borrowed for the call.
    let result = unsafe { libc::ioctl(fd, code as _, request as *mut libc::ifreq) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Creates TAP interface `name` (refused if an interface of that name
    /// exists), gives it `mac` and brings it up.
    pub fn create(name: &str, mac: Mac) -> Result<Tap, TapError> {
        check_interface_name(name).map_err(|reason| TapError::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut set = request(name);
        // IFF_TUN_EXCL: never attach to a TAP someone else made.
        set.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short;
        ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut set).map_err(|source| {
            TapError::Create {
                name: name.to_owned(),
                source,
            }
        })?;
        let tap = Tap {
            fd,
            name: name.to_owned(),
        };
        let mut address = request(name);
        // SAFETY: writing a plain-data member of the union.
        let hardware = unsafe { &mut address.ifr_ifru.ifru_hwaddr };
        hardware.sa_family = libc::ARPHRD_ETHER;
        for (to, &from) in hardware.sa_data.iter_mut().zip(&mac.0) {
            *to = from as libc::c_char;
        }
        ioctl(tap.fd.as_raw_fd(), libc::SIOCSIFHWADDR, &mut address).map_err(|source| {
            TapError::Address {
                name: name.to_owned(),
                mac,
                source,
            }
        })?;
        tap.up().map_err(|source| TapError::Up {
            name: name.to_owned(),
            source,
        })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the interface's carrier on or off: off, the host sees its
    /// link down (NO-CARRIER), as for a port whose link the operator set
    /// down. Works wherever the interface is (its file descriptor stays
    /// ours).
    pub fn set_carrier(&self, on: bool) -> std::io::Result<()> {
        let carrier = libc::c_int::from(on);
        // SAFETY: TUNSETCARRIER reads one int, which `carrier` is, alive
        // for the call.
        let result = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETCARRIER as _,
                &carrier as *const libc::c_int,
            )
        };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets IFF_UP (through a socket of the namespace the interface is in
    /// now: this one, as it was just made).
    fn up(&self) -> std::io::Result<()> {
        // SAFETY: plain socket(2); the result is checked.
        let socket =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if socket < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `socket` was just opened and is owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(socket) };
        let mut flags = request(&self.name);
        ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut flags)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut flags)
    }

    /// Reads one frame; its full length, which is more than `buffer` if
    /// the frame did not fit (then only its start was read).
    fn read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buffer` is valid for writes of its length.
        let read = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        usize::try_from(read).map_err(|_| std::io::Error::last_os_error())
    }

    /// Writes one frame to the host; `NoRoom` if the interface did not
    /// take it.
    pub(crate) fn write(&self, frame: &[u8]) -> Result<(), DropReason> {
        // SAFETY: `frame` is valid for reads of its length.
        let written =
            unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if usize::try_from(written) == Ok(frame.len()) {
            Ok(())
        } else {
            Err(DropReason::NoRoom)
        }
    }
}

/// A host port being served: its interface and the thread that reads it.
/// Dropping it stops the thread; [`Fabric::remove_port`] then takes the
/// port out of the switch, which closes (and so removes) the interface.
#[derive(Debug)]
pub struct HostPort {
    name: String,
    /// Set to stop: checked after every batch (the eventfd wakes a wait).
    stopping: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    /// Cleared when the thread ends on its own: the interface went away.
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a host port's thread is given.
struct Serving {
    fabric: Arc<Fabric>,
    id: PortId,
    tap: Arc<Tap>,
    stopping: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    alive: Arc<AtomicBool>,
}

impl HostPort {
    /// Adds port `id` to `fabric`, its frames coming from and going to
    /// `tap`.
    pub fn start(
        fabric: &Arc<Fabric>,
        id: PortId,
        config: PortConfig,
        tap: Tap,
    ) -> Result<HostPort, TapError> {
        let name = tap.name.clone();
        let thread_error = |source| TapError::Thread {
            name: name.clone(),
            source,
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(thread_error)?);
        let stopping = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        if !config.link_up {
            tap.set_carrier(false).map_err(|source| TapError::Carrier {
                name: name.clone(),
                source,
            })?;
        }
        let tap = Arc::new(tap);
        fabric.add_sink(id, config, Sink::Host(tap.clone()))?;
        let serving = Serving {
            fabric: fabric.clone(),
            id,
            tap,
            stopping: stopping.clone(),
            stop: stop.clone(),
            alive: alive.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || serving.serve());
        let thread = match thread {
            Ok(thread) => thread,
            Err(source) => {
                let _ = fabric.remove_port(id);
                return Err(thread_error(source));
            }
        };
        Ok(HostPort {
            name,
            stopping,
            stop,
            alive,
            thread: Some(thread),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the port still serves its interface (false once the
    /// interface went away).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(error) = self.stop.write(1) {
            tracing::error!(interface = %self.name, %error, "cannot stop a host port's thread");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Serving {
    /// The port's thread: switches what the host sends until told to
    /// stop, or until the interface goes away.
    fn serve(self) {
        let Serving {
            fabric,
            id,
            tap,
            stopping,
            stop,
            alive,
        } = &self;
        let mut batch = Batch::new(fabric.frame_bytes_max);
        let mut scratch = fabric.scratch();
        let mut failures = 0u64;
        let gone = |why: &dyn std::fmt::Display| {
            tracing::warn!(interface = %tap.name, %why, "a host port's interface went away");
            alive.store(false, Ordering::SeqCst);
        };
        while !stopping.load(Ordering::SeqCst) {
            let mut polled = [
                libc::pollfd {
                    fd: tap.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `polled` is two valid pollfds, borrowed for the call.
            let ready = unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(interface = %tap.name, %error, "a host port cannot wait for frames");
                alive.store(false, Ordering::SeqCst);
                return;
            }
            if polled[1].revents != 0 {
                return;
            }
            // What is there now, a batch at a time; the stop flag is looked
            // at between batches, so a host that keeps sending cannot hold
            // the port up.
            let mut drained = false;
            while !drained && !stopping.load(Ordering::SeqCst) {
                batch.clear();
                for _ in 0..TX_BATCH {
                    let slot = &mut batch.slot()[NET_HEADER_BYTES..];
                    let room = slot.len();
                    match tap.read(slot) {
                        Ok(len) if len > room => batch.refused.push(DropReason::Oversize),
                        Ok(len) => batch.push(len),
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            drained = true;
                            break;
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        // The interface is no more (EBADFD): deleted, or its
                        // namespace was.
                        Err(error) if error.raw_os_error() == Some(libc::EBADFD) => {
                            return gone(&error);
                        }
                        Err(error) => {
                            // The first few say why; a failing interface is
                            // not read in a tight loop.
                            failures += 1;
                            if failures <= 3 {
                                tracing::warn!(interface = %tap.name, %error, "cannot read a host port's interface");
                            }
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            drained = true;
                            break;
                        }
                    }
                }
                if batch.count > 0 || !batch.refused.is_empty() {
                    fabric.forward_batch(*id, &batch, &mut scratch);
                    fabric.signal(&mut scratch);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for good in ["tap0", "fab-lan.1", "a", "abcdefghijklmno"] {
            assert_eq!(check_interface_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "a/b",
            "a b",
            "a:b",
            "tap\n",
            "täp",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
    }
}
