//! The replication protocol on the wire: frames for [`Request`] and
//! [`Reply`] with [`Blocks`] as data.
//!
//! Every frame is a fixed 64-byte little-endian header and a body:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `FREP` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | kind |
//! | 6 | 2 | reserved, zero |
//! | 8 | 8 | volume (its id) |
//! | 16 | 8 | generation |
//! | 24 | 8 | session |
//! | 32 | 8 | op |
//! | 40 | 8 | done_below, or `after` for a flush, or the highest generation for `Fenced` |
//! | 48 | 8 | lba, or region |
//! | 56 | 4 | blocks |
//! | 60 | 4 | body length |
//!
//! A body of blocks is a presence bitmap (one bit per block, rounded up to
//! bytes), then the crc32 of each present block, then the 4 KiB of each
//! present block. A `Digests` body is one u64 per region; a `Verified`
//! body is the lba (u64) of each damaged block, its digest in the
//! done_below word.
//!
//! [`decode_request`] and [`decode_reply`] check every field before they
//! build anything: a frame that is not exactly right is an error that
//! names what is wrong, never a panic and never a partial request.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Header, Reply, Request};

/// Frame magic: `FREP`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FREP");
/// Protocol version.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 4096;
/// Most blocks in one request (4 MiB).
pub const BLOCKS_MAX: u32 = 1024;
/// Most regions a digest list may hold (a 64 TiB volume in 1 MiB regions).
pub const DIGESTS_MAX: u32 = 1 << 26;

const KIND_OPEN: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_FLUSH: u8 = 3;
const KIND_READ: u8 = 4;
const KIND_DIGESTS: u8 = 5;
const KIND_COPY_OUT: u8 = 6;
const KIND_COPY_IN: u8 = 7;
const KIND_VERIFY: u8 = 8;
const KIND_OPENED: u8 = 0x81;
const KIND_FENCED: u8 = 0x82;
const KIND_NOT_OPEN: u8 = 0x83;
const KIND_DONE: u8 = 0x84;
const KIND_DATA: u8 = 0x85;
const KIND_DIGEST_LIST: u8 = 0x86;
const KIND_DAMAGED: u8 = 0x87;
const KIND_VERIFIED: u8 = 0x88;

/// Blocks as they travel: which are present (mapped), their checksums and
/// their bytes. An absent block reads as zeros and takes no space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    present: Vec<bool>,
    crcs: Vec<u32>,
    data: Bytes,
}

impl super::frontend::Payload for Blocks {
    fn blocks(&self) -> u64 {
        self.len() as u64
    }
}

/// A block that fails its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block {index} of the request fails its checksum")]
pub struct BadBlock {
    pub index: usize,
}

impl Blocks {
    /// Present blocks from `data` (a whole number of blocks), checksummed
    /// here.
    pub fn from_data(data: Bytes) -> Blocks {
        assert_eq!(data.len() % BLOCK_BYTES, 0, "whole blocks only");
        let crcs = data
            .chunks(BLOCK_BYTES)
            .map(crc32fast::hash)
            .collect::<Vec<_>>();
        Blocks {
            present: vec![true; crcs.len()],
            crcs,
            data,
        }
    }

    /// Blocks of which only `present` ones carry data, with their
    /// checksums as already known (from a block map).
    pub fn new(present: Vec<bool>, crcs: Vec<u32>, data: Bytes) -> Blocks {
        let count = present.iter().filter(|&&p| p).count();
        assert_eq!(crcs.len(), count);
        assert_eq!(data.len(), count * BLOCK_BYTES);
        Blocks {
            present,
            crcs,
            data,
        }
    }

    /// How many blocks, present or not.
    pub fn len(&self) -> usize {
        self.present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }

    /// Each block: `Some((crc, bytes))` if present.
    pub fn iter(&self) -> impl Iterator<Item = Option<(u32, &[u8])>> + '_ {
        let mut next = 0;
        self.present.iter().map(move |&present| {
            present.then(|| {
                let index = next;
                next += 1;
                (
                    self.crcs[index],
                    &self.data[index * BLOCK_BYTES..(index + 1) * BLOCK_BYTES],
                )
            })
        })
    }

    /// Checks every present block against its checksum.
    pub fn verify(&self) -> Result<(), BadBlock> {
        match self
            .iter()
            .enumerate()
            .find(|(_, block)| block.is_some_and(|(crc, bytes)| crc32fast::hash(bytes) != crc))
        {
            Some((index, _)) => Err(BadBlock { index }),
            None => Ok(()),
        }
    }

    fn body_len(&self) -> usize {
        self.present.len().div_ceil(8) + self.crcs.len() * 4 + self.data.len()
    }

    fn put(&self, out: &mut BytesMut) {
        let mut bitmap = vec![0u8; self.present.len().div_ceil(8)];
        for (index, _) in self.present.iter().enumerate().filter(|(_, &p)| p) {
            bitmap[index / 8] |= 1 << (index % 8);
        }
        out.put_slice(&bitmap);
        for crc in &self.crcs {
            out.put_u32_le(*crc);
        }
        out.put_slice(&self.data);
    }

    fn take(blocks: u32, mut body: Bytes) -> Result<Blocks, WireError> {
        let count = blocks as usize;
        let bitmap_len = count.div_ceil(8);
        if body.len() < bitmap_len {
            return Err(WireError::Body("shorter than its presence bitmap".into()));
        }
        let bitmap = body.split_to(bitmap_len);
        let present: Vec<bool> = (0..count)
            .map(|index| bitmap[index / 8] & (1 << (index % 8)) != 0)
            .collect();
        if count % 8 != 0 && bitmap[bitmap_len - 1] >> (count % 8) != 0 {
            return Err(WireError::Body(
                "presence bits set past the last block".into(),
            ));
        }
        let present_count = present.iter().filter(|&&p| p).count();
        if body.len() != present_count * (4 + BLOCK_BYTES) {
            return Err(WireError::Body(format!(
                "{} bytes for {present_count} present blocks, expected {}",
                body.len(),
                present_count * (4 + BLOCK_BYTES)
            )));
        }
        let crcs = (0..present_count).map(|_| body.get_u32_le()).collect();
        Ok(Blocks {
            present,
            crcs,
            data: body,
        })
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame is {0} bytes, shorter than the {HEADER_BYTES}-byte header")]
    Short(usize),
    #[error("not a replication frame (magic {0:#010x})")]
    Magic(u32),
    #[error("replication protocol version {0} is not spoken here (this is {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0:#04x}")]
    Kind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("frame body is {found} bytes, the header says {declared}")]
    Length { declared: usize, found: usize },
    #[error("{0} blocks is outside 1 to {BLOCKS_MAX}")]
    Blocks(u32),
    #[error("{field} must be zero in a {kind} frame")]
    Unused {
        kind: &'static str,
        field: &'static str,
    },
    #[error("malformed body: {0}")]
    Body(String),
}

/// The fixed header, decoded.
#[derive(Debug, Clone, Copy, Default)]
struct Fixed {
    kind: u8,
    volume: u64,
    generation: u64,
    session: u64,
    op: u64,
    word: u64,
    lba: u64,
    blocks: u32,
}

fn frame(fixed: Fixed, body_len: usize, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_BYTES + body_len);
    out.put_u32_le(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(fixed.kind);
    out.put_u16_le(0);
    out.put_u64_le(fixed.volume);
    out.put_u64_le(fixed.generation);
    out.put_u64_le(fixed.session);
    out.put_u64_le(fixed.op);
    out.put_u64_le(fixed.word);
    out.put_u64_le(fixed.lba);
    out.put_u32_le(fixed.blocks);
    out.put_u32_le(u32::try_from(body_len).expect("bodies are bounded"));
    body(&mut out);
    debug_assert_eq!(out.len(), HEADER_BYTES + body_len);
    out.freeze()
}

fn split(mut frame: Bytes) -> Result<(Fixed, Bytes), WireError> {
    if frame.len() < HEADER_BYTES {
        return Err(WireError::Short(frame.len()));
    }
    let magic = frame.get_u32_le();
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = frame.get_u8();
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = frame.get_u8();
    if frame.get_u16_le() != 0 {
        return Err(WireError::Reserved);
    }
    let fixed = Fixed {
        kind,
        volume: frame.get_u64_le(),
        generation: frame.get_u64_le(),
        session: frame.get_u64_le(),
        op: frame.get_u64_le(),
        word: frame.get_u64_le(),
        lba: frame.get_u64_le(),
        blocks: frame.get_u32_le(),
    };
    let declared = frame.get_u32_le() as usize;
    if frame.len() != declared {
        return Err(WireError::Length {
            declared,
            found: frame.len(),
        });
    }
    Ok((fixed, frame))
}

fn head(fixed: &Fixed) -> Header {
    Header {
        generation: fixed.generation,
        session: fixed.session,
        op: fixed.op,
        done_below: fixed.word,
    }
}

fn check_blocks(blocks: u32) -> Result<(), WireError> {
    if (1..=BLOCKS_MAX).contains(&blocks) {
        Ok(())
    } else {
        Err(WireError::Blocks(blocks))
    }
}

fn empty(kind: &'static str, fixed: &Fixed, body: &Bytes) -> Result<(), WireError> {
    if fixed.lba != 0 {
        return Err(WireError::Unused { kind, field: "lba" });
    }
    if fixed.blocks != 0 {
        return Err(WireError::Unused {
            kind,
            field: "blocks",
        });
    }
    if !body.is_empty() {
        return Err(WireError::Unused {
            kind,
            field: "body",
        });
    }
    Ok(())
}

/// Encodes a request for `volume`.
pub fn encode_request(volume: u64, request: &Request<Blocks>) -> Bytes {
    let with = |kind, head: &Header, word, lba, blocks| Fixed {
        kind,
        volume,
        generation: head.generation,
        session: head.session,
        op: head.op,
        word,
        lba,
        blocks,
    };
    match request {
        Request::Open { generation, op } => frame(
            Fixed {
                kind: KIND_OPEN,
                volume,
                generation: *generation,
                op: *op,
                ..Fixed::default()
            },
            0,
            |_| {},
        ),
        Request::Write {
            head,
            lba,
            blocks,
            data,
        } => frame(
            with(KIND_WRITE, head, head.done_below, *lba, *blocks as u32),
            data.body_len(),
            |out| data.put(out),
        ),
        Request::Flush { head, after } => frame(with(KIND_FLUSH, head, *after, 0, 0), 0, |_| {}),
        Request::Read { head, lba, blocks } => frame(
            with(KIND_READ, head, head.done_below, *lba, *blocks as u32),
            0,
            |_| {},
        ),
        Request::Digests { head } => {
            frame(with(KIND_DIGESTS, head, head.done_below, 0, 0), 0, |_| {})
        }
        Request::CopyOut { head, region } => frame(
            with(KIND_COPY_OUT, head, head.done_below, *region, 0),
            0,
            |_| {},
        ),
        Request::CopyIn { head, region, data } => frame(
            with(
                KIND_COPY_IN,
                head,
                head.done_below,
                *region,
                data.len() as u32,
            ),
            data.body_len(),
            |out| data.put(out),
        ),
        Request::Verify { head, region } => frame(
            with(KIND_VERIFY, head, head.done_below, *region, 0),
            0,
            |_| {},
        ),
    }
}

/// Decodes a request: the volume it is for, and the request.
pub fn decode_request(frame: Bytes) -> Result<(u64, Request<Blocks>), WireError> {
    let (fixed, body) = split(frame)?;
    let request = match fixed.kind {
        KIND_OPEN => {
            empty("open", &fixed, &body)?;
            if fixed.session != 0 || fixed.word != 0 {
                return Err(WireError::Unused {
                    kind: "open",
                    field: "session",
                });
            }
            Request::Open {
                generation: fixed.generation,
                op: fixed.op,
            }
        }
        KIND_WRITE => {
            check_blocks(fixed.blocks)?;
            // Absent blocks unmap (DISCARD, WRITE_ZEROES).
            let data = Blocks::take(fixed.blocks, body)?;
            Request::Write {
                head: head(&fixed),
                lba: fixed.lba,
                blocks: u64::from(fixed.blocks),
                data,
            }
        }
        KIND_FLUSH => {
            empty("flush", &fixed, &body)?;
            Request::Flush {
                head: Header {
                    done_below: 0,
                    ..head(&fixed)
                },
                after: fixed.word,
            }
        }
        KIND_READ => {
            check_blocks(fixed.blocks)?;
            if !body.is_empty() {
                return Err(WireError::Unused {
                    kind: "read",
                    field: "body",
                });
            }
            Request::Read {
                head: head(&fixed),
                lba: fixed.lba,
                blocks: u64::from(fixed.blocks),
            }
        }
        KIND_DIGESTS => {
            empty("digests", &fixed, &body)?;
            Request::Digests { head: head(&fixed) }
        }
        KIND_COPY_OUT => {
            if fixed.blocks != 0 || !body.is_empty() {
                return Err(WireError::Unused {
                    kind: "copy-out",
                    field: "body",
                });
            }
            Request::CopyOut {
                head: head(&fixed),
                region: fixed.lba,
            }
        }
        KIND_COPY_IN => {
            check_blocks(fixed.blocks)?;
            Request::CopyIn {
                head: head(&fixed),
                region: fixed.lba,
                data: Blocks::take(fixed.blocks, body)?,
            }
        }
        KIND_VERIFY => {
            if fixed.blocks != 0 || !body.is_empty() {
                return Err(WireError::Unused {
                    kind: "verify",
                    field: "blocks or body",
                });
            }
            Request::Verify {
                head: head(&fixed),
                region: fixed.lba,
            }
        }
        other => return Err(WireError::Kind(other)),
    };
    Ok((fixed.volume, request))
}

/// Encodes a reply for `volume`.
pub fn encode_reply(volume: u64, reply: &Reply<Blocks>) -> Bytes {
    let fixed = |kind, op, session, word, blocks| Fixed {
        kind,
        volume,
        session,
        op,
        word,
        blocks,
        ..Fixed::default()
    };
    match reply {
        Reply::Opened { op, session } => frame(fixed(KIND_OPENED, *op, *session, 0, 0), 0, |_| {}),
        Reply::Fenced { highest } => frame(fixed(KIND_FENCED, 0, 0, *highest, 0), 0, |_| {}),
        Reply::NotOpen { op } => frame(fixed(KIND_NOT_OPEN, *op, 0, 0, 0), 0, |_| {}),
        Reply::Done { op } => frame(fixed(KIND_DONE, *op, 0, 0, 0), 0, |_| {}),
        Reply::Data { op, data } => frame(
            fixed(KIND_DATA, *op, 0, 0, data.len() as u32),
            data.body_len(),
            |out| data.put(out),
        ),
        Reply::Damaged { op, lba } => frame(
            Fixed {
                kind: KIND_DAMAGED,
                volume,
                op: *op,
                lba: *lba,
                ..Fixed::default()
            },
            0,
            |_| {},
        ),
        Reply::Digests { op, digests } => frame(
            fixed(KIND_DIGEST_LIST, *op, 0, 0, digests.len() as u32),
            digests.len() * 8,
            |out| {
                for digest in digests {
                    out.put_u64_le(*digest);
                }
            },
        ),
        Reply::Verified {
            op,
            digest,
            damaged,
        } => frame(
            fixed(KIND_VERIFIED, *op, 0, *digest, damaged.len() as u32),
            damaged.len() * 8,
            |out| {
                for lba in damaged {
                    out.put_u64_le(*lba);
                }
            },
        ),
    }
}

/// Decodes a reply: the volume it is about, and the reply.
pub fn decode_reply(frame: Bytes) -> Result<(u64, Reply<Blocks>), WireError> {
    let (fixed, mut body) = split(frame)?;
    let bare = |kind| -> Result<(), WireError> {
        if fixed.generation != 0 || fixed.lba != 0 || fixed.blocks != 0 || !body.is_empty() {
            return Err(WireError::Unused {
                kind,
                field: "generation, lba, blocks or body",
            });
        }
        Ok(())
    };
    let reply = match fixed.kind {
        KIND_OPENED => {
            bare("opened")?;
            Reply::Opened {
                op: fixed.op,
                session: fixed.session,
            }
        }
        KIND_FENCED => {
            bare("fenced")?;
            Reply::Fenced {
                highest: fixed.word,
            }
        }
        KIND_NOT_OPEN => {
            bare("not-open")?;
            Reply::NotOpen { op: fixed.op }
        }
        KIND_DONE => {
            bare("done")?;
            Reply::Done { op: fixed.op }
        }
        KIND_DATA => {
            check_blocks(fixed.blocks)?;
            Reply::Data {
                op: fixed.op,
                data: Blocks::take(fixed.blocks, body)?,
            }
        }
        KIND_DIGEST_LIST => {
            if fixed.blocks > DIGESTS_MAX || body.len() != fixed.blocks as usize * 8 {
                return Err(WireError::Body(format!(
                    "{} bytes for {} digests",
                    body.len(),
                    fixed.blocks
                )));
            }
            let digests = (0..fixed.blocks).map(|_| body.get_u64_le()).collect();
            Reply::Digests {
                op: fixed.op,
                digests,
            }
        }
        KIND_DAMAGED => {
            if fixed.generation != 0 || fixed.blocks != 0 || !body.is_empty() {
                return Err(WireError::Unused {
                    kind: "damaged",
                    field: "generation, blocks or body",
                });
            }
            Reply::Damaged {
                op: fixed.op,
                lba: fixed.lba,
            }
        }
        KIND_VERIFIED => {
            if fixed.generation != 0 || fixed.lba != 0 {
                return Err(WireError::Unused {
                    kind: "verified",
                    field: "generation or lba",
                });
            }
            if fixed.blocks > BLOCKS_MAX || body.len() != fixed.blocks as usize * 8 {
                return Err(WireError::Body(format!(
                    "{} bytes for {} damaged blocks",
                    body.len(),
                    fixed.blocks
                )));
            }
            let damaged = (0..fixed.blocks).map(|_| body.get_u64_le()).collect();
            Reply::Verified {
                op: fixed.op,
                digest: fixed.word,
                damaged,
            }
        }
        other => return Err(WireError::Kind(other)),
    };
    Ok((fixed.volume, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blocks(count: usize, present_mask: u64, seed: u8) -> Blocks {
        let present: Vec<bool> = (0..count)
            .map(|i| present_mask & (1 << (i % 64)) != 0)
            .collect();
        let mut data = Vec::new();
        let mut crcs = Vec::new();
        for (i, _) in present.iter().enumerate().filter(|(_, &p)| p) {
            let block = vec![seed.wrapping_add(i as u8); BLOCK_BYTES];
            crcs.push(crc32fast::hash(&block));
            data.extend_from_slice(&block);
        }
        Blocks::new(present, crcs, Bytes::from(data))
    }

    fn head(op: u64) -> Header {
        Header {
            generation: 7,
            session: 0x0000_0003_0000_0002,
            op,
            done_below: op.saturating_sub(3),
        }
    }

    fn requests() -> Vec<Request<Blocks>> {
        vec![
            Request::Open {
                generation: 9,
                op: 1,
            },
            Request::Write {
                head: head(2),
                lba: 100,
                blocks: 3,
                data: blocks(3, u64::MAX, 1),
            },
            Request::Flush {
                head: Header {
                    done_below: 0,
                    ..head(3)
                },
                after: 12,
            },
            Request::Read {
                head: head(4),
                lba: 5,
                blocks: 256,
            },
            Request::Digests { head: head(5) },
            Request::CopyOut {
                head: head(6),
                region: 17,
            },
            Request::CopyIn {
                head: head(7),
                region: 17,
                data: blocks(256, 0b1011, 2),
            },
            Request::Verify {
                head: head(8),
                region: 3,
            },
        ]
    }

    fn replies() -> Vec<Reply<Blocks>> {
        vec![
            Reply::Opened { op: 1, session: 42 },
            Reply::Fenced { highest: 8 },
            Reply::NotOpen { op: 3 },
            Reply::Done { op: 4 },
            Reply::Data {
                op: 5,
                data: blocks(9, 0b1_0101_0101, 3),
            },
            Reply::Digests {
                op: 6,
                digests: vec![1, 2, u64::MAX],
            },
            Reply::Damaged { op: 7, lba: 12345 },
            Reply::Verified {
                op: 8,
                digest: u64::MAX - 1,
                damaged: vec![],
            },
            Reply::Verified {
                op: 9,
                digest: 3,
                damaged: vec![256, 300],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for request in requests() {
            let frame = encode_request(0xabc, &request);
            assert_eq!(
                decode_request(frame).expect("decodes"),
                (0xabc, request.clone())
            );
        }
        for reply in replies() {
            let frame = encode_reply(0xabc, &reply);
            assert_eq!(
                decode_reply(frame).expect("decodes"),
                (0xabc, reply.clone())
            );
        }
    }

    #[test]
    fn checksums_are_verified_and_absent_blocks_take_no_bytes() {
        let mut sparse = blocks(16, 0b1000_0001, 5);
        assert_eq!(sparse.data.len(), 2 * BLOCK_BYTES);
        assert!(sparse.verify().is_ok());
        let mut damaged = sparse.data.to_vec();
        damaged[BLOCK_BYTES + 7] ^= 1;
        sparse.data = Bytes::from(damaged);
        assert_eq!(sparse.verify(), Err(BadBlock { index: 7 }));
        assert_eq!(
            Blocks::from_data(Bytes::from(vec![0u8; 2 * BLOCK_BYTES])).crcs,
            vec![crc32fast::hash(&[0u8; BLOCK_BYTES]); 2]
        );
    }

    #[test]
    fn bad_frames_name_what_is_wrong() {
        let good = encode_request(1, &requests()[1]).to_vec();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "shorter than"),
            (
                {
                    let mut f = good.clone();
                    f[0] = b'X';
                    f
                },
                "not a replication frame",
            ),
            (
                {
                    let mut f = good.clone();
                    f[4] = 2;
                    f
                },
                "version 2",
            ),
            (
                {
                    let mut f = good.clone();
                    f[5] = 0x40;
                    f
                },
                "unknown frame kind",
            ),
            (
                {
                    let mut f = good.clone();
                    f.push(0);
                    f
                },
                "the header says",
            ),
            (
                {
                    let mut f = good.clone();
                    f[56..60].copy_from_slice(&5000u32.to_le_bytes());
                    f
                },
                "outside 1 to 1024",
            ),
            (
                {
                    let mut f = good.clone();
                    f[64] = 0b011; // drops the third block's presence bit
                    f
                },
                "malformed body",
            ),
        ];
        for (frame, message) in cases {
            let error = decode_request(Bytes::from(frame)).expect_err(message);
            assert!(error.to_string().contains(message), "{error} / {message}");
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(Bytes::from(bytes.clone()));
            let _ = decode_reply(Bytes::from(bytes));
        }

        /// A valid header with a random body and random fields decodes to
        /// what it says or to an error, never a panic; a request that
        /// decodes encodes back to the same frame.
        #[test]
        fn mutated_frames_decode_exactly_or_fail(
            which in 0usize..7,
            position in 0usize..200,
            value in any::<u8>(),
        ) {
            let mut frame = encode_request(3, &requests()[which]).to_vec();
            let index = position % frame.len();
            frame[index] = value;
            if let Ok((volume, request)) = decode_request(Bytes::from(frame.clone())) {
                prop_assert_eq!(encode_request(volume, &request).to_vec(), frame);
            }
        }
    }
}
