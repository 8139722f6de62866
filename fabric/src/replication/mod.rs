//! Replication between nodes: the protocol core of
//! `blockstore::replication` carried over the cluster's QUIC connections.
//!
//! - [`service`]: the replica side. A frontend opens one bidirectional
//!   stream per volume; the service applies its frames to the local
//!   `ReplicaVolume` and answers on the same stream.
//! - [`driver`]: the frontend side. It runs a volume's
//!   [`blockstore::replication::frontend::Frontend`]: guest requests in,
//!   requests out to local and remote replicas, replies and metadata
//!   outcomes back in, completions out.
//!
//! Frames (`blockstore::replication::wire`) travel length-prefixed: a u32
//! little-endian length, then the frame.

pub mod driver;
pub mod service;

use bytes::Bytes;

/// Largest frame accepted: a 4 MiB write with its checksums and header.
pub const FRAME_BYTES_MAX: usize = (4 << 20) + (64 << 10);

/// Reads one length-prefixed frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> std::io::Result<Option<Bytes>> {
    let mut length = [0u8; 4];
    match recv.read_exact(&mut length).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(std::io::Error::other(error)),
    }
    let length = u32::from_le_bytes(length) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "a replication frame of {length} bytes is over the {FRAME_BYTES_MAX}-byte limit"
        )));
    }
    let mut frame = vec![0u8; length];
    recv.read_exact(&mut frame)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Some(Bytes::from(frame)))
}

/// Writes one length-prefixed frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &Bytes) -> std::io::Result<()> {
    let length = u32::try_from(frame.len()).expect("frames are bounded");
    send.write_all(&length.to_le_bytes())
        .await
        .map_err(std::io::Error::other)?;
    send.write_all(frame).await.map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests;
