//! Relays a port's vhost-user connection between the frontend and the
//! `vhost` crate's request handler, message by message, with their file
//! descriptors.
//!
//! Why: QEMU's virtio-net sends `SET_VRING_ENABLE` when the device is
//! created, before `SET_FEATURES` has acked `VHOST_USER_F_PROTOCOL_FEATURES`;
//! the `vhost` crate treats that as a protocol error and drops the
//! connection. The relay holds those early messages (the latest per ring),
//! answers them itself when a reply is asked for, and passes them on right
//! after `SET_FEATURES`; every other message goes through unchanged, in
//! order. Only the control channel goes through
//! here; queues and notifications are shared memory and eventfds.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_BYTES: usize = 12;
/// Largest message body the relay takes (a memory table of 8 regions is
/// 328 bytes; the protocol's largest messages are a few KiB).
const BODY_BYTES_MAX: usize = 64 << 10;
/// Most file descriptors on one message.
const FDS_MAX: usize = 32;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const GET_QUEUE_NUM: u32 = 17;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Relays between `frontend` and `backend` until either side closes.
pub fn relay(frontend: UnixStream, backend: UnixStream) -> std::io::Result<()> {
    let replies_to = Arc::new(Mutex::new(frontend.try_clone()?));
    let backward = {
        let mut from = backend.try_clone()?;
        let to = replies_to.clone();
        let frontend = frontend.try_clone()?;
        std::thread::Builder::new()
            .name("vhost-net-relay".into())
            .spawn(move || {
                let mut message = vec![0u8; HEADER_BYTES + BODY_BYTES_MAX];
                while let Ok(len) = read_message(&mut from, &mut message) {
                    let sent = to
                        .lock()
                        .expect("relay writer poisoned")
                        .write_all(&message[..len]);
                    if sent.is_err() {
                        break;
                    }
                }
                let _ = frontend.shutdown(std::net::Shutdown::Both);
            })?
    };
    let result = forward(&frontend, &backend, &replies_to);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backward.join();
    result
}

/// Reads one whole message (header and body) without descriptors.
fn read_message(from: &mut UnixStream, message: &mut [u8]) -> std::io::Result<usize> {
    from.read_exact(&mut message[..HEADER_BYTES])?;
    let size = body_size(message)?;
    from.read_exact(&mut message[HEADER_BYTES..HEADER_BYTES + size])?;
    Ok(HEADER_BYTES + size)
}

fn body_size(header: &[u8]) -> std::io::Result<usize> {
    let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if size > BODY_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "a vhost-user message of {size} bytes is over the {BODY_BYTES_MAX}-byte limit"
        )));
    }
    Ok(size)
}

fn forward(
    frontend: &UnixStream,
    backend: &UnixStream,
    replies_to: &Mutex<UnixStream>,
) -> std::io::Result<()> {
    let mut message = vec![0u8; HEADER_BYTES + BODY_BYTES_MAX];
    let mut protocol_acked = false;
    // SET_VRING_ENABLE messages that came before SET_FEATURES, by ring.
    let mut enables: std::collections::BTreeMap<u32, [u8; HEADER_BYTES + 8]> =
        std::collections::BTreeMap::new();
    loop {
        // The header comes with the message's descriptors.
        let mut raw: [RawFd; FDS_MAX] = [-1; FDS_MAX];
        let mut iovec = [libc::iovec {
            iov_base: message.as_mut_ptr().cast(),
            iov_len: HEADER_BYTES,
        }];
        // SAFETY: the iovec points at the first HEADER_BYTES bytes of
        // `message`, which this function owns and nothing else borrows.
        let (read, count) = unsafe { frontend.recv_with_fds(&mut iovec, &mut raw) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: recvmsg gave this process the first `count` descriptors;
        // each is wrapped once, so it is closed once.
        let fds: Vec<OwnedFd> = raw[..count]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if read == 0 {
            return Ok(());
        }
        let mut reader: &UnixStream = frontend;
        reader.read_exact(&mut message[read..HEADER_BYTES])?;
        let size = body_size(&message)?;
        reader.read_exact(&mut message[HEADER_BYTES..HEADER_BYTES + size])?;
        let request = u32::from_le_bytes(message[0..4].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(message[4..8].try_into().expect("4 bytes"));
        if request == SET_FEATURES && size >= 8 {
            let features = u64::from_le_bytes(message[12..20].try_into().expect("8 bytes"));
            protocol_acked = features & PROTOCOL_FEATURES != 0;
        }
        if request == GET_QUEUE_NUM {
            // For a net device the answer is in queue pairs (QEMU compares
            // it with its `queues=`); the backend library counts rings.
            let mut reply = [0u8; HEADER_BYTES + 8];
            reply[0..4].copy_from_slice(&request.to_le_bytes());
            reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
            reply[8..12].copy_from_slice(&8u32.to_le_bytes());
            reply[12..20].copy_from_slice(&(crate::port::QUEUE_PAIRS_MAX as u64).to_le_bytes());
            replies_to
                .lock()
                .expect("relay writer poisoned")
                .write_all(&reply)?;
            continue;
        }
        if request == SET_VRING_ENABLE && !protocol_acked && size == 8 {
            // Kept, latest per ring, and passed on after SET_FEATURES.
            let index = u32::from_le_bytes(message[12..16].try_into().expect("4 bytes"));
            let mut early = [0u8; HEADER_BYTES + 8];
            early.copy_from_slice(&message[..HEADER_BYTES + 8]);
            early[4..8].copy_from_slice(&(flags & !FLAG_NEED_REPLY).to_le_bytes());
            enables.insert(index, early);
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = [0u8; HEADER_BYTES + 8];
                reply[0..4].copy_from_slice(&request.to_le_bytes());
                reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
                reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                replies_to
                    .lock()
                    .expect("relay writer poisoned")
                    .write_all(&reply)?;
            }
            continue;
        }
        let raw_fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        backend
            .send_with_fds(&[&message[..HEADER_BYTES + size]], &raw_fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if request == SET_FEATURES && protocol_acked {
            let mut writer: &UnixStream = backend;
            for (_, early) in std::mem::take(&mut enables) {
                writer.write_all(&early)?;
            }
        }
    }
}
