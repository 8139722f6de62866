//! Frames between the switches of two nodes: the encapsulation header and
//! the reassembly of frames split across datagrams.
//!
//! A frame crosses a tunnel untagged, after a [`TUNNEL_HEADER_BYTES`]-byte
//! header naming its segment, VLAN, sending node and a per-sender sequence
//! number. A frame larger than one datagram is split into pieces, each
//! with the frame's total length and the piece's offset; the receiver puts
//! them back together in one of a few slots and drops a frame whose pieces
//! do not all arrive (as a lost packet would be). Nothing here does I/O.

use crate::switch::SegmentId;

/// Version of the header this code writes and reads.
pub const TUNNEL_VERSION: u8 = 1;
/// Bytes of the header in front of every piece.
pub const TUNNEL_HEADER_BYTES: usize = 24;
/// Frames being reassembled at once, per receiver; the oldest is dropped
/// to make room.
pub const REASSEMBLY_SLOTS: usize = 8;
/// Most pieces a frame may come in.
pub const PIECES_MAX: usize = 16;
/// A partly received frame this many frames older than the sender's
/// newest is given up (its pieces were lost).
const STALE_FRAMES: u32 = 1024;

/// The header of one piece of a tunnelled frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelHeader {
    pub segment: SegmentId,
    pub vlan: u16,
    /// The sending node.
    pub sender: u64,
    /// The sender's number for this frame.
    pub sequence: u32,
    /// Where this piece starts in the frame.
    pub offset: u16,
    /// The frame's length.
    pub total: u16,
}

/// Why a datagram was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("datagram shorter than a tunnel header")]
    Short,
    #[error("tunnel header version {0}, not {TUNNEL_VERSION}")]
    Version(u8),
    #[error(
        "piece at {offset} of {len} bytes does not fit a frame of {total} bytes (largest {max})"
    )]
    Bounds {
        offset: u16,
        len: usize,
        total: u16,
        max: usize,
    },
    #[error("piece at {offset} came twice, or a frame came in more than {PIECES_MAX} pieces")]
    Pieces { offset: u16 },
}

impl TunnelHeader {
    pub fn encode(&self) -> [u8; TUNNEL_HEADER_BYTES] {
        let mut out = [0u8; TUNNEL_HEADER_BYTES];
        out[0] = TUNNEL_VERSION;
        out[2..4].copy_from_slice(&self.vlan.to_be_bytes());
        out[4..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.sender.to_be_bytes());
        out[16..20].copy_from_slice(&self.sequence.to_be_bytes());
        out[20..22].copy_from_slice(&self.offset.to_be_bytes());
        out[22..24].copy_from_slice(&self.total.to_be_bytes());
        out
    }

    /// Reads a datagram's header; returns it and the piece after it.
    pub fn decode(datagram: &[u8]) -> Result<(TunnelHeader, &[u8]), TunnelError> {
        if datagram.len() < TUNNEL_HEADER_BYTES {
            return Err(TunnelError::Short);
        }
        if datagram[0] != TUNNEL_VERSION {
            return Err(TunnelError::Version(datagram[0]));
        }
        let u16_at = |at: usize| u16::from_be_bytes([datagram[at], datagram[at + 1]]);
        let mut sender = [0u8; 8];
        sender.copy_from_slice(&datagram[8..16]);
        let mut word = [0u8; 4];
        word.copy_from_slice(&datagram[4..8]);
        let segment = u32::from_be_bytes(word);
        word.copy_from_slice(&datagram[16..20]);
        let header = TunnelHeader {
            segment,
            vlan: u16_at(2),
            sender: u64::from_be_bytes(sender),
            sequence: u32::from_be_bytes(word),
            offset: u16_at(20),
            total: u16_at(22),
        };
        Ok((header, &datagram[TUNNEL_HEADER_BYTES..]))
    }
}

/// The pieces `frame` is sent in when a datagram holds at most
/// `datagram_bytes_max` bytes: (offset, piece). Empty if not even a
/// header and one byte fit.
pub fn pieces(frame: &[u8], datagram_bytes_max: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let room = datagram_bytes_max.saturating_sub(TUNNEL_HEADER_BYTES);
    let chunks = if room == 0 {
        None
    } else {
        Some(frame.chunks(room))
    };
    chunks
        .into_iter()
        .flatten()
        .enumerate()
        .map(move |(index, piece)| ((index * room) as u16, piece))
}

#[derive(Debug)]
struct Slot {
    sender: u64,
    sequence: u32,
    segment: SegmentId,
    vlan: u16,
    total: u16,
    /// The pieces in so far: (offset, length).
    pieces: [(u16, u16); PIECES_MAX],
    count: usize,
    used: bool,
    /// When it was last started (to pick the oldest).
    started: u64,
    buffer: Vec<u8>,
}

/// Frames of one connection being put back together.
#[derive(Debug)]
pub struct Reassembly {
    slots: Vec<Slot>,
    frame_bytes_max: usize,
    clock: u64,
    /// Frames dropped before all their pieces came.
    pub incomplete: u64,
}

impl Reassembly {
    pub fn new(frame_bytes_max: usize) -> Reassembly {
        let slots = (0..REASSEMBLY_SLOTS)
            .map(|_| Slot {
                sender: 0,
                sequence: 0,
                segment: 0,
                vlan: 0,
                total: 0,
                pieces: [(0, 0); PIECES_MAX],
                count: 0,
                used: false,
                started: 0,
                buffer: vec![0; frame_bytes_max],
            })
            .collect();
        Reassembly {
            slots,
            frame_bytes_max,
            clock: 0,
            incomplete: 0,
        }
    }

    /// Takes one piece. Returns the whole frame once its last piece is in
    /// (at once for a frame sent whole).
    pub fn accept<'a>(
        &'a mut self,
        header: &TunnelHeader,
        piece: &'a [u8],
    ) -> Result<Option<&'a [u8]>, TunnelError> {
        let total = usize::from(header.total);
        let offset = usize::from(header.offset);
        if total > self.frame_bytes_max || offset + piece.len() > total || piece.is_empty() {
            return Err(TunnelError::Bounds {
                offset: header.offset,
                len: piece.len(),
                total: header.total,
                max: self.frame_bytes_max,
            });
        }
        if offset == 0 && piece.len() == total {
            return Ok(Some(piece));
        }
        self.clock += 1;
        // Frames of this sender far older than this one lost a piece.
        for slot in &mut self.slots {
            if slot.used
                && slot.sender == header.sender
                && header.sequence.wrapping_sub(slot.sequence) > STALE_FRAMES
                && slot.sequence.wrapping_sub(header.sequence) > STALE_FRAMES
            {
                slot.used = false;
                self.incomplete += 1;
            }
        }
        let found = self.slots.iter().position(|slot| {
            slot.used
                && slot.sender == header.sender
                && slot.sequence == header.sequence
                && slot.segment == header.segment
                && slot.vlan == header.vlan
                && slot.total == header.total
        });
        let index = match found {
            Some(index) => index,
            None => {
                let index = self
                    .slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, slot)| (slot.used, slot.started))
                    .map(|(index, _)| index)
                    .expect("there are slots");
                let slot = &mut self.slots[index];
                if slot.used {
                    self.incomplete += 1;
                }
                slot.sender = header.sender;
                slot.sequence = header.sequence;
                slot.segment = header.segment;
                slot.vlan = header.vlan;
                slot.total = header.total;
                slot.count = 0;
                slot.used = true;
                slot.started = self.clock;
                index
            }
        };
        let slot = &mut self.slots[index];
        let seen = slot.pieces[..slot.count]
            .iter()
            .any(|&(at, _)| at == header.offset);
        if seen || slot.count == PIECES_MAX {
            // A peer that sends a piece twice, or too many: the frame is
            // not trusted.
            slot.used = false;
            return Err(TunnelError::Pieces {
                offset: header.offset,
            });
        }
        slot.buffer[offset..offset + piece.len()].copy_from_slice(piece);
        slot.pieces[slot.count] = (header.offset, piece.len() as u16);
        slot.count += 1;
        if !covers(&mut slot.pieces[..slot.count], header.total) {
            return Ok(None);
        }
        slot.used = false;
        Ok(Some(&slot.buffer[..total]))
    }
}

/// Whether the pieces cover `0..total` with no gap (sorts them).
fn covers(pieces: &mut [(u16, u16)], total: u16) -> bool {
    pieces.sort_unstable();
    let mut end = 0u32;
    for &(offset, len) in pieces.iter() {
        if u32::from(offset) > end {
            return false;
        }
        end = end.max(u32::from(offset) + u32::from(len));
    }
    end >= u32::from(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sequence: u32, offset: u16, total: u16) -> TunnelHeader {
        TunnelHeader {
            segment: 7,
            vlan: 10,
            sender: 3,
            sequence,
            offset,
            total,
        }
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let h = header(0xdead_beef, 1200, 1514);
        let mut datagram = h.encode().to_vec();
        datagram.extend_from_slice(b"piece");
        let (back, piece) = TunnelHeader::decode(&datagram).expect("decode");
        assert_eq!(back, h);
        assert_eq!(piece, b"piece");
        assert_eq!(
            TunnelHeader::decode(&datagram[..23]),
            Err(TunnelError::Short)
        );
        datagram[0] = 9;
        assert_eq!(
            TunnelHeader::decode(&datagram),
            Err(TunnelError::Version(9))
        );
    }

    #[test]
    fn frames_split_and_come_back_in_any_order() {
        let frame: Vec<u8> = (0..1514u32).map(|i| (i % 251) as u8).collect();
        let split: Vec<(u16, &[u8])> = pieces(&frame, 600).collect();
        assert_eq!(split.len(), 3);
        assert!(split
            .iter()
            .all(|(_, piece)| piece.len() + TUNNEL_HEADER_BYTES <= 600));
        let mut reassembly = Reassembly::new(1518);
        for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
            for (n, &index) in order.iter().enumerate() {
                let (offset, piece) = split[index];
                let got = reassembly
                    .accept(&header(5, offset, 1514), piece)
                    .expect("piece")
                    .map(<[u8]>::to_vec);
                if n == 2 {
                    assert_eq!(got.as_deref(), Some(&frame[..]));
                } else {
                    assert_eq!(got, None);
                }
            }
        }
        // A frame that fits is passed through as it is.
        let whole: Vec<(u16, &[u8])> = pieces(&frame, 2000).collect();
        assert_eq!(whole.len(), 1);
        assert_eq!(
            reassembly.accept(&header(6, 0, 1514), whole[0].1),
            Ok(Some(&frame[..]))
        );
        assert_eq!(reassembly.incomplete, 0);
        assert_eq!(pieces(&frame, TUNNEL_HEADER_BYTES).count(), 0);
    }

    #[test]
    fn lost_pieces_free_their_slot_and_bad_pieces_are_refused() {
        let frame = vec![7u8; 1000];
        let mut reassembly = Reassembly::new(1518);
        // Only the first piece of many frames: the oldest are dropped.
        for sequence in 0..(REASSEMBLY_SLOTS as u32 + 3) {
            assert_eq!(
                reassembly.accept(&header(sequence, 0, 1000), &frame[..500]),
                Ok(None)
            );
        }
        assert_eq!(reassembly.incomplete, 3);
        // The newest can still complete.
        let last = REASSEMBLY_SLOTS as u32 + 2;
        assert_eq!(
            reassembly.accept(&header(last, 500, 1000), &frame[500..]),
            Ok(Some(&frame[..]))
        );
        // A piece sent twice, and overlapping pieces that leave a gap, do
        // not make a frame.
        assert_eq!(
            reassembly.accept(&header(200, 0, 1000), &frame[..400]),
            Ok(None)
        );
        assert!(matches!(
            reassembly.accept(&header(200, 0, 1000), &frame[..400]),
            Err(TunnelError::Pieces { offset: 0 })
        ));
        assert_eq!(
            reassembly.accept(&header(201, 0, 1000), &frame[..600]),
            Ok(None)
        );
        assert_eq!(
            reassembly.accept(&header(201, 200, 1000), &frame[..600]),
            Ok(None),
            "1,200 bytes in, but 800..1000 missing"
        );
        assert_eq!(
            reassembly.accept(&header(201, 800, 1000), &frame[..200]),
            Ok(Some(&frame[..]))
        );
        for (offset, len, total) in [(0, 10, 2000), (900, 200, 1000), (0, 0, 10)] {
            let got = reassembly.accept(&header(99, offset, total), &frame[..len]);
            assert!(
                matches!(got, Err(TunnelError::Bounds { .. })),
                "{offset} {len} {total}"
            );
        }
    }
}
