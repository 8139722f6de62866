//! Frames between two nodes' switches, carried two ways, side by side on
//! loopback in the same run:
//!
//! - `quic`: what the switch uses. QUIC datagrams on a connection between
//!   two cluster endpoints (`fabric::cluster::transport::bind`: the
//!   cluster's transport settings, certificates from a cluster CA, mutual
//!   TLS), each a 24-byte tunnel header and the frame, copied into a new
//!   buffer per frame as the switch's tunnel does.
//! - `udp`: the alternative: plain UDP, one frame per datagram (as Geneve
//!   or VXLAN), each the same header and frame sealed with AES-256-GCM (a
//!   16-byte tag) under a key both ends hold, sent and received 32 at a
//!   time (`sendmmsg`, `recvmmsg`). It leaves out what a real design would
//!   need besides (a key exchange, a replay window, path MTU, congestion
//!   control), so it is the cheapest such a tunnel can be.
//! - `udp-gso`: the same, the 32 datagrams handed to the kernel as one
//!   (UDP segmentation offload) and taken back coalesced (UDP GRO), as
//!   quinn does with its packets. Only datagrams of one size coalesce:
//!   the best case, a run of equal frames.
//!
//! One process holds both ends of each, a sending and a receiving thread
//! (for QUIC, a two-thread runtime, as `fabricd`'s) on the machine's CPUs.
//! The sender sends as fast as the transport takes: QUIC waits for room in
//! its congestion window; UDP has no such thing, so what the receiver
//! cannot keep up with is lost at its socket. Reported per frame size:
//! frames delivered per second, loss, and the process's CPU time (both
//! ends) per delivered frame; median (min–max) over the runs, the two
//! transports alternating.
//!
//! ```text
//! tunnelbench [--runs 3] [--seconds 4] [--frames 64,1500]
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use fabric::cluster::tls::ClusterCa;
use fabric::cluster::transport;
use integration::stats::Spread;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// The switch's tunnel header.
const HEADER_BYTES: usize = 24;
/// AES-GCM's tag.
const TAG_BYTES: usize = 16;
/// Datagrams per `sendmmsg`/`recvmmsg`.
const UDP_BATCH: usize = 32;
/// Most bytes one segmentation-offload send may carry (a UDP datagram's
/// limit over IPv4): large frames go fewer to a send.
const GSO_BYTES_MAX: usize = 65_507;
/// The cluster endpoint's socket buffers (`transport::UDP_BUFFER_BYTES`).
const SOCKET_BUFFER_BYTES: usize = transport::UDP_BUFFER_BYTES;

#[derive(Debug, Parser)]
struct Args {
    /// Measurements per transport and frame size, alternating transports.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Frame sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    frames: Vec<usize>,
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: u64,
    delivered: u64,
    seconds: f64,
    cpu_seconds: f64,
}

impl Sample {
    fn delivered_per_second(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    fn loss(&self) -> f64 {
        1.0 - self.delivered as f64 / self.sent.max(1) as f64
    }

    fn cpu_us_per_frame(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.delivered.max(1) as f64
    }
}

/// User and system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; all zeroes is a
    // valid value of it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage, borrowed for the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Two cluster endpoints on loopback, connected; frames of `frame` bytes
/// from one to the other for `seconds`.
async fn quic(frame: usize, seconds: f64) -> Result<Sample> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let ca = ClusterCa::generate("tunnelbench")?;
    let a = ca.issue("a", &[localhost])?;
    let b = ca.issue("b", &[localhost])?;
    let near = transport::bind(SocketAddr::new(localhost, 0), &a)?;
    let far = transport::bind(SocketAddr::new(localhost, 0), &b)?;
    let to = far.local_addr()?;
    let accepting = tokio::spawn(async move {
        let incoming = far.accept().await.context("the endpoint closed")?;
        anyhow::Ok((incoming.await?, far))
    });
    let sender = near.connect(to, "b")?.await?;
    let (receiver, _far) = accepting.await??;
    // MTU discovery raises the datagram size past a 1,500-byte frame's
    // within moments of the handshake.
    let datagram = HEADER_BYTES + frame;
    let settling = Instant::now();
    while sender.max_datagram_size().unwrap_or(0) < datagram {
        if settling.elapsed() > Duration::from_secs(5) {
            bail!(
                "the path's datagrams stayed at {:?} bytes, below {datagram}",
                sender.max_datagram_size()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let delivered = delivered.clone();
        async move {
            while let Ok(datagram) = receiver.read_datagram().await {
                if datagram.len() >= HEADER_BYTES {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let template = vec![0x5a; datagram];
    let cpu = cpu_seconds();
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            let mut buffer = bytes::BytesMut::with_capacity(datagram);
            buffer.extend_from_slice(&template);
            sender.send_datagram_wait(buffer.freeze()).await?;
            sent += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // What is in flight arrives (or is lost) within a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu_seconds = cpu_seconds() - cpu;
    sender.close(0u32.into(), b"done");
    let _ = reader.await;
    near.wait_idle().await;
    Ok(Sample {
        sent,
        delivered: delivered.load(Ordering::Relaxed),
        seconds: elapsed,
        cpu_seconds,
    })
}

/// `UDP_BATCH` buffers of `slot` bytes and the message headers pointing
/// into them, for `sendmmsg` and `recvmmsg`.
struct Messages {
    buffers: Vec<u8>,
    slot: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Messages {
    fn new(slot: usize) -> Messages {
        let mut messages = Messages {
            buffers: vec![0; UDP_BATCH * slot],
            slot,
            iovecs: Vec::with_capacity(UDP_BATCH),
            headers: Vec::with_capacity(UDP_BATCH),
        };
        for chunk in messages.buffers.chunks_mut(slot) {
            messages.iovecs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: slot,
            });
        }
        for iovec in &mut messages.iovecs {
            // SAFETY: all zeroes is a valid mmsghdr (no name, no control).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            messages.headers.push(header);
        }
        messages
    }

    fn slot(&mut self, index: usize) -> &mut [u8] {
        &mut self.buffers[index * self.slot..(index + 1) * self.slot]
    }
}

/// A nonce from a datagram's sequence number (unique per key).
fn nonce(sequence: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&sequence.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// How the UDP tunnel hands datagrams to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batching {
    /// `sendmmsg` and `recvmmsg`: one call, a datagram each.
    Mmsg,
    /// Segmentation offload and GRO: one call, one buffer.
    Gso,
}

/// Sets a socket option of type int at `level`.
fn set_option(
    socket: &UdpSocket,
    level: libc::c_int,
    option: libc::c_int,
    value: usize,
) -> Result<()> {
    let value = libc::c_int::try_from(value)?;
    // SAFETY: `value` is an int, alive for the call, and its size is given.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Control-message room for one int.
const CONTROL_BYTES: usize = 64;

/// Sends `datagrams` of `size` bytes each, back to back in `buffer`, in
/// one call with segmentation offload; how many went.
fn send_segmented(socket: &UdpSocket, buffer: &mut [u8], size: usize, datagrams: usize) -> usize {
    let mut iovec = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: size * datagrams,
    };
    let mut control = [0u64; CONTROL_BYTES / 8];
    // SAFETY: all zeroes is a valid msghdr (no name).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iovec;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    message.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: the control buffer has room for one header and a u16 (checked
    // by CMSG_SPACE above against CONTROL_BYTES), and is aligned for it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_UDP;
        (*header).cmsg_type = libc::UDP_SEGMENT;
        (*header).cmsg_len = libc::CMSG_LEN(2) as usize;
        libc::CMSG_DATA(header)
            .cast::<u16>()
            .write_unaligned(size as u16);
    }
    // SAFETY: `message` points at `iovec` and `control`, alive for the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, 0) };
    usize::try_from(sent).map_or(0, |bytes| bytes / size)
}

/// Receives one (possibly coalesced) buffer into `buffer`: its length and
/// the size of the datagrams in it.
fn receive_coalesced(socket: &UdpSocket, buffer: &mut [u8]) -> Option<(usize, usize)> {
    let mut iovec = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control = [0u64; CONTROL_BYTES / 8];
    // SAFETY: all zeroes is a valid msghdr (no name).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iovec;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = CONTROL_BYTES;
    // SAFETY: `message` points at `iovec` and `control`, alive for the call.
    let read = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, 0) };
    let len = usize::try_from(read).ok()?;
    let mut size = len;
    // SAFETY: walking the control messages the kernel wrote, within
    // msg_controllen.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_UDP && (*header).cmsg_type == libc::UDP_GRO {
                size = libc::CMSG_DATA(header)
                    .cast::<libc::c_int>()
                    .read_unaligned() as usize;
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Some((len, size.max(1)))
}

/// Opens one sealed datagram; whether it was whole.
fn open(key: &LessSafeKey, datagram: &mut [u8]) -> bool {
    if datagram.len() < HEADER_BYTES + TAG_BYTES {
        return false;
    }
    let (header, sealed) = datagram.split_at_mut(HEADER_BYTES);
    let sequence = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    key.open_in_place(nonce(sequence), Aad::from(&*header), sealed)
        .is_ok()
}

/// Plain UDP on loopback, each datagram sealed; frames of `frame` bytes
/// from one socket to the other for `seconds`.
fn udp(frame: usize, seconds: f64, batching: Batching) -> Result<Sample> {
    let localhost = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let inbound = UdpSocket::bind(localhost)?;
    set_option(
        &inbound,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        SOCKET_BUFFER_BYTES,
    )?;
    inbound.set_read_timeout(Some(Duration::from_millis(50)))?;
    if batching == Batching::Gso {
        set_option(&inbound, libc::SOL_UDP, libc::UDP_GRO, 1)?;
    }
    let outbound = UdpSocket::bind(localhost)?;
    set_option(
        &outbound,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        SOCKET_BUFFER_BYTES,
    )?;
    outbound.connect(inbound.local_addr()?)?;
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("no random key"))?;
    let make_key = || {
        UnboundKey::new(&AES_256_GCM, &key)
            .map(LessSafeKey::new)
            .map_err(|_| anyhow::anyhow!("bad key"))
    };
    let (sealing, opening) = (make_key()?, make_key()?);
    let datagram = HEADER_BYTES + frame + TAG_BYTES;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || -> (u64, u64) {
            let mut messages = Messages::new(datagram + 64);
            let (mut delivered, mut refused) = (0u64, 0u64);
            let mut coalesced = vec![0u8; 1 << 16];
            while batching == Batching::Gso && !stop.load(Ordering::Relaxed) {
                let Some((len, size)) = receive_coalesced(&inbound, &mut coalesced) else {
                    continue;
                };
                for datagram in coalesced[..len].chunks_mut(size) {
                    if open(&opening, datagram) {
                        delivered += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the headers point into `messages`' buffers, alive
                // and not otherwise borrowed for the call.
                let count = unsafe {
                    libc::recvmmsg(
                        inbound.as_raw_fd(),
                        messages.headers.as_mut_ptr(),
                        UDP_BATCH as libc::c_uint,
                        libc::MSG_WAITFORONE,
                        std::ptr::null_mut(),
                    )
                };
                let Ok(count) = usize::try_from(count) else {
                    continue;
                };
                for index in 0..count {
                    let len = messages.headers[index].msg_len as usize;
                    if open(&opening, &mut messages.slot(index)[..len]) {
                        delivered += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
            (delivered, refused)
        }
    });
    let template = vec![0x5a; frame];
    let mut messages = Messages::new(datagram);
    let mut sequence = 0u64;
    let mut sent = 0u64;
    let cpu = cpu_seconds();
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    while start.elapsed() < duration {
        for index in 0..UDP_BATCH {
            let slot = messages.slot(index);
            let (header, rest) = slot.split_at_mut(HEADER_BYTES);
            header[8..16].copy_from_slice(&sequence.to_le_bytes());
            let (body, tag_space) = rest.split_at_mut(frame);
            body.copy_from_slice(&template);
            let tag = sealing
                .seal_in_place_separate_tag(nonce(sequence), Aad::from(&*header), body)
                .map_err(|_| anyhow::anyhow!("sealing failed"))?;
            tag_space.copy_from_slice(tag.as_ref());
            sequence += 1;
        }
        if batching == Batching::Gso {
            let per_send = (GSO_BYTES_MAX / datagram).clamp(1, UDP_BATCH);
            sent += send_segmented(&outbound, &mut messages.buffers, datagram, per_send) as u64;
            continue;
        }
        // SAFETY: the headers point into `messages`' buffers, alive and not
        // otherwise borrowed for the call.
        let count = unsafe {
            libc::sendmmsg(
                outbound.as_raw_fd(),
                messages.headers.as_mut_ptr(),
                UDP_BATCH as libc::c_uint,
                0,
            )
        };
        if let Ok(count) = u64::try_from(count) {
            sent += count;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (delivered, refused) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
    let cpu_seconds = cpu_seconds() - cpu;
    if refused > 0 {
        bail!("{refused} datagrams failed to open");
    }
    Ok(Sample {
        sent,
        delivered,
        seconds: elapsed,
        cpu_seconds,
    })
}

fn row(frame: usize, name: &str, samples: &[Sample]) -> Result<(String, f64)> {
    let of = |f: &dyn Fn(&Sample) -> f64| {
        Spread::of(samples.iter().map(f).collect()).context("no measurements")
    };
    let rate = of(&|s| s.delivered_per_second() / 1e3)?;
    let gbits = of(&|s| s.delivered_per_second() * frame as f64 * 8.0 / 1e9)?;
    let loss = of(&|s| s.loss() * 100.0)?;
    let cpu = of(&Sample::cpu_us_per_frame)?;
    Ok((
        format!(
            "| {frame} B | {name} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.1} ({:.1}–{:.1}) | {:.2} ({:.2}–{:.2}) |\n",
            rate.median, rate.min, rate.max, gbits.median, loss.median, loss.min, loss.max, cpu.median, cpu.min, cpu.max
        ),
        rate.median,
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.seconds <= 0.0 || args.frames.is_empty() {
        bail!("--runs, --seconds and --frames must be above 0");
    }
    // The largest frame one datagram of the cluster's 6,500-byte packets
    // carries with the tunnel header (larger ones the switch splits).
    if let Some(&frame) = args.frames.iter().find(|&&f| !(14..=6400).contains(&f)) {
        bail!("a frame of {frame} bytes: frames are 14 to 6400 bytes (one QUIC datagram)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut table = String::from(
        "| frame | transport | delivered, thousand frames/s | Gbit/s (frames) | lost, % | CPU µs per delivered frame (both ends) |\n|---|---|---|---|---|---|\n",
    );
    let mut ratios = Vec::new();
    for &frame in &args.frames {
        let (mut quics, mut udps, mut gsos) = (Vec::new(), Vec::new(), Vec::new());
        let say = |name: &str, run: usize, s: &Sample| {
            eprintln!(
                "frame {frame} run {run} {name}: {:.0} k/s, lost {:.1}%, {:.2} µs CPU per frame",
                s.delivered_per_second() / 1e3,
                s.loss() * 100.0,
                s.cpu_us_per_frame(),
            );
        };
        for run in 0..args.runs {
            let q = runtime.block_on(quic(frame, args.seconds))?;
            say("quic", run, &q);
            quics.push(q);
            let u = udp(frame, args.seconds, Batching::Mmsg)?;
            say("udp", run, &u);
            udps.push(u);
            let g = udp(frame, args.seconds, Batching::Gso)?;
            say("udp-gso", run, &g);
            gsos.push(g);
        }
        let (line, quic_rate) = row(frame, "QUIC datagrams (mutual TLS)", &quics)?;
        table.push_str(&line);
        let (line, udp_rate) = row(frame, "UDP + AES-256-GCM, sendmmsg/recvmmsg", &udps)?;
        table.push_str(&line);
        let (line, gso_rate) = row(frame, "UDP + AES-256-GCM, GSO/GRO", &gsos)?;
        table.push_str(&line);
        ratios.push(format!(
            "{frame} B: QUIC delivers {:.2}x the frames of UDP with sendmmsg, {:.2}x with GSO",
            quic_rate / udp_rate,
            quic_rate / gso_rate
        ));
    }
    println!(
        "{table}\nMedian (min–max) of {} runs of {} s each, the transports alternating. {}.",
        args.runs,
        args.seconds,
        ratios.join("; ")
    );
    Ok(())
}
