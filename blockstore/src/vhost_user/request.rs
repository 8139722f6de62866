//! The virtio-blk request format, and validation of what a guest sends.
//!
//! Everything here is pure: it decodes bytes that came from guest memory and
//! decides whether the request is acceptable, without doing any I/O. The
//! fuzz and property tests drive these functions directly.

use vm_memory::ByteValued;

/// Sector size of the virtio-blk protocol, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;

/// Request types (virtio 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the device id returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// The WRITE_ZEROES flag that allows the device to deallocate.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The fixed header that opens every request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    pub ioprio: u32,
    pub sector: u64,
}

// SAFETY: RequestHeader is repr(C), has no padding (4 + 4 + 8 bytes) and
// every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One range of a DISCARD or WRITE_ZEROES request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

// SAFETY: repr(C), 8 + 4 + 4 bytes without padding, any bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Block size in bytes; every data transfer is a multiple of it.
    pub block_size: u64,
    /// Largest data transfer of one request, in bytes.
    pub request_bytes_max: u64,
    /// Most segments in one DISCARD or WRITE_ZEROES request.
    pub discard_segments_max: u32,
    /// Largest range of one DISCARD or WRITE_ZEROES segment, in sectors.
    pub discard_sectors_max: u32,
}

/// What a request asks for, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    GetId,
    /// DISCARD or WRITE_ZEROES: the payload holds `segments` ranges.
    Unmap {
        segments: u32,
        write_zeroes: bool,
    },
}

/// Why a request was refused. The guest sees IOERR or UNSUPP; the message
/// goes to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data length {len} is not a multiple of the {block_size}-byte block size")]
    UnalignedLength { len: u64, block_size: u64 },
    #[error("data length {len} exceeds the {max}-byte request limit")]
    TooLong { len: u64, max: u64 },
    #[error("sector {sector} plus {len} bytes lies outside the {capacity}-byte volume")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("sector {sector} is not aligned to the block size")]
    UnalignedSector { sector: u64 },
    #[error("a {request} request carries {len} bytes of device-{direction} data it must not have")]
    UnexpectedData {
        request: &'static str,
        len: u64,
        direction: &'static str,
    },
    #[error("the request has no data")]
    Empty,
    #[error("discard payload of {len} bytes is not a whole number of 16-byte segments, or holds more than {max} segments")]
    BadSegments { len: u64, max: u32 },
    #[error("discard segment at sector {sector} for {num_sectors} sectors with flags {flags:#x} is invalid")]
    BadSegment {
        sector: u64,
        num_sectors: u32,
        flags: u32,
    },
}

impl RequestError {
    /// The status the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            RequestError::BadSegment { flags, .. }
                if *flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 =>
            {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Validates a request from its header and the sizes of its two halves:
/// `readable` bytes the device may read after the header, and `writable`
/// bytes it may write before the status byte.
pub fn classify(
    header: &RequestHeader,
    readable: u64,
    writable: u64,
    limits: &Limits,
) -> Result<Operation, RequestError> {
    let data_range = |len: u64| -> Result<u64, RequestError> {
        if len == 0 {
            return Err(RequestError::Empty);
        }
        if len > limits.request_bytes_max {
            return Err(RequestError::TooLong {
                len,
                max: limits.request_bytes_max,
            });
        }
        if len % limits.block_size != 0 {
            return Err(RequestError::UnalignedLength {
                len,
                block_size: limits.block_size,
            });
        }
        let offset = header
            .sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange {
                sector: header.sector,
                len,
                capacity: limits.capacity,
            })?;
        if offset % limits.block_size != 0 {
            return Err(RequestError::UnalignedSector {
                sector: header.sector,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > limits.capacity)
        {
            return Err(RequestError::OutOfRange {
                sector: header.sector,
                len,
                capacity: limits.capacity,
            });
        }
        Ok(offset)
    };
    let no_data = |request: &'static str, len: u64, direction: &'static str| {
        if len == 0 {
            Ok(())
        } else {
            Err(RequestError::UnexpectedData {
                request,
                len,
                direction,
            })
        }
    };
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            no_data("read", readable, "readable")?;
            Ok(Operation::Read {
                offset: data_range(writable)?,
                len: writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            no_data("write", writable, "writable")?;
            Ok(Operation::Write {
                offset: data_range(readable)?,
                len: readable,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            no_data("flush", readable, "readable")?;
            no_data("flush", writable, "writable")?;
            Ok(Operation::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            no_data("get-id", readable, "readable")?;
            if writable == 0 {
                return Err(RequestError::Empty);
            }
            Ok(Operation::GetId)
        }
        request_type @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            no_data("discard", writable, "writable")?;
            let segment = std::mem::size_of::<DiscardSegment>() as u64;
            let segments = readable / segment;
            if readable == 0
                || readable % segment != 0
                || segments > u64::from(limits.discard_segments_max)
            {
                return Err(RequestError::BadSegments {
                    len: readable,
                    max: limits.discard_segments_max,
                });
            }
            Ok(Operation::Unmap {
                segments: segments as u32,
                write_zeroes: request_type == VIRTIO_BLK_T_WRITE_ZEROES,
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Validates one DISCARD or WRITE_ZEROES segment and returns its byte range.
pub fn check_segment(
    segment: &DiscardSegment,
    write_zeroes: bool,
    limits: &Limits,
) -> Result<(u64, u64), RequestError> {
    let bad = RequestError::BadSegment {
        sector: segment.sector,
        num_sectors: segment.num_sectors,
        flags: segment.flags,
    };
    let allowed_flags = if write_zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    if segment.flags & !allowed_flags != 0
        || segment.num_sectors == 0
        || segment.num_sectors > limits.discard_sectors_max
    {
        return Err(bad);
    }
    let offset = segment.sector.checked_mul(SECTOR_SIZE).ok_or(bad)?;
    let len = u64::from(segment.num_sectors) * SECTOR_SIZE;
    if offset % limits.block_size != 0
        || len % limits.block_size != 0
        || offset
            .checked_add(len)
            .is_none_or(|end| end > limits.capacity)
    {
        return Err(bad);
    }
    Ok((offset, len))
}

/// The device id for GET_ID: the serial, NUL-padded to 20 bytes (a serial
/// of exactly 20 bytes has no terminator, as the specification allows).
pub fn device_id(serial: &str) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    let bytes = serial.as_bytes();
    let len = bytes.len().min(VIRTIO_BLK_ID_BYTES);
    id[..len].copy_from_slice(&bytes[..len]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        capacity: 1 << 30,
        block_size: 4096,
        request_bytes_max: 4 << 20,
        discard_segments_max: 16,
        discard_sectors_max: 1 << 21,
    };

    fn header(request_type: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            request_type,
            ioprio: 0,
            sector,
        }
    }

    /// Table of (request, readable, writable) and the expected verdict.
    #[test]
    fn classification_table() {
        let cases: &[(RequestHeader, u64, u64, Result<Operation, RequestError>)] = &[
            (
                header(VIRTIO_BLK_T_IN, 8),
                0,
                4096,
                Ok(Operation::Read {
                    offset: 4096,
                    len: 4096,
                }),
            ),
            (
                header(VIRTIO_BLK_T_OUT, 0),
                8192,
                0,
                Ok(Operation::Write {
                    offset: 0,
                    len: 8192,
                }),
            ),
            (header(VIRTIO_BLK_T_FLUSH, 0), 0, 0, Ok(Operation::Flush)),
            (header(VIRTIO_BLK_T_GET_ID, 0), 0, 20, Ok(Operation::GetId)),
            (
                header(VIRTIO_BLK_T_DISCARD, 0),
                32,
                0,
                Ok(Operation::Unmap {
                    segments: 2,
                    write_zeroes: false,
                }),
            ),
            (header(99, 0), 0, 0, Err(RequestError::Unsupported(99))),
            (header(VIRTIO_BLK_T_IN, 0), 0, 0, Err(RequestError::Empty)),
            (
                header(VIRTIO_BLK_T_IN, 0),
                0,
                512,
                Err(RequestError::UnalignedLength {
                    len: 512,
                    block_size: 4096,
                }),
            ),
            (
                header(VIRTIO_BLK_T_IN, 1),
                0,
                4096,
                Err(RequestError::UnalignedSector { sector: 1 }),
            ),
            (
                header(VIRTIO_BLK_T_OUT, (1 << 30) / 512),
                4096,
                0,
                Err(RequestError::OutOfRange {
                    sector: (1 << 30) / 512,
                    len: 4096,
                    capacity: 1 << 30,
                }),
            ),
            (
                header(VIRTIO_BLK_T_OUT, u64::MAX),
                4096,
                0,
                Err(RequestError::OutOfRange {
                    sector: u64::MAX,
                    len: 4096,
                    capacity: 1 << 30,
                }),
            ),
            (
                header(VIRTIO_BLK_T_OUT, 0),
                8 << 20,
                0,
                Err(RequestError::TooLong {
                    len: 8 << 20,
                    max: 4 << 20,
                }),
            ),
            (
                header(VIRTIO_BLK_T_OUT, 0),
                4096,
                4096,
                Err(RequestError::UnexpectedData {
                    request: "write",
                    len: 4096,
                    direction: "writable",
                }),
            ),
            (
                header(VIRTIO_BLK_T_DISCARD, 0),
                17,
                0,
                Err(RequestError::BadSegments { len: 17, max: 16 }),
            ),
        ];
        for (header, readable, writable, expected) in cases {
            assert_eq!(
                &classify(header, *readable, *writable, &LIMITS),
                expected,
                "{header:?} r={readable} w={writable}"
            );
        }
    }

    #[test]
    fn unsupported_gets_unsupp_status() {
        assert_eq!(RequestError::Unsupported(3).status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(RequestError::Empty.status(), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn segments() {
        let ok = DiscardSegment {
            sector: 8,
            num_sectors: 16,
            flags: 0,
        };
        assert_eq!(check_segment(&ok, false, &LIMITS), Ok((4096, 8192)));
        let unmap = DiscardSegment {
            flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ..ok
        };
        assert!(check_segment(&unmap, true, &LIMITS).is_ok());
        assert!(check_segment(&unmap, false, &LIMITS).is_err());
        let unaligned = DiscardSegment { sector: 1, ..ok };
        assert!(check_segment(&unaligned, false, &LIMITS).is_err());
        let past_end = DiscardSegment {
            sector: (1 << 30) / 512,
            ..ok
        };
        assert!(check_segment(&past_end, false, &LIMITS).is_err());
    }

    #[test]
    fn device_id_is_padded() {
        assert_eq!(&device_id("abc")[..4], b"abc\0");
        assert_eq!(
            device_id("0123456789abcdef0123456789"),
            *b"0123456789abcdef0123"
        );
    }

    proptest! {
        /// Whatever the guest sends, an accepted data request lies inside the
        /// volume, is block aligned and within the size limit.
        #[test]
        fn accepted_requests_are_in_bounds(
            request_type in 0u32..16,
            sector in any::<u64>(),
            readable in any::<u32>(),
            writable in any::<u32>(),
        ) {
            let header = header(request_type, sector);
            match classify(&header, u64::from(readable), u64::from(writable), &LIMITS) {
                Ok(Operation::Read { offset, len }) | Ok(Operation::Write { offset, len }) => {
                    prop_assert!(len > 0 && len <= LIMITS.request_bytes_max);
                    prop_assert_eq!(offset % 4096, 0);
                    prop_assert_eq!(len % 4096, 0);
                    prop_assert!(offset + len <= LIMITS.capacity);
                }
                Ok(Operation::Unmap { segments, .. }) => prop_assert!((1..=16).contains(&segments)),
                Ok(_) | Err(_) => {}
            }
        }

        #[test]
        fn accepted_segments_are_in_bounds(sector in any::<u64>(), num_sectors in any::<u32>(), flags in 0u32..4, wz in any::<bool>()) {
            let segment = DiscardSegment { sector, num_sectors, flags };
            if let Ok((offset, len)) = check_segment(&segment, wz, &LIMITS) {
                prop_assert!(len > 0 && offset + len <= LIMITS.capacity);
                prop_assert_eq!(offset % 4096, 0);
            }
        }
    }
}
