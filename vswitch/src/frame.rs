//! Ethernet frames as the switch sees them: addresses, the 802.1Q tag, and
//! the checks every frame from a port passes before it is switched.

/// Bytes of an Ethernet header: destination, source, EtherType.
pub const ETHERNET_HEADER_BYTES: usize = 14;
/// Bytes an 802.1Q tag adds (TPID and TCI, after the source address).
pub const VLAN_TAG_BYTES: usize = 4;
/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Largest frame by default: a 1500-byte payload with its header and one
/// tag (no FCS: virtio does not carry it).
pub const FRAME_BYTES_MAX_DEFAULT: usize = ETHERNET_HEADER_BYTES + VLAN_TAG_BYTES + 1500;

/// An Ethernet MAC address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Whether the group bit is set (multicast or broadcast).
    pub fn is_group(self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(text: &str) -> Result<Mac, String> {
        let invalid = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Mac(bytes))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Mac, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the switch reads of a frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub destination: Mac,
    pub source: Mac,
    /// The 802.1Q VLAN id, if the frame carries a tag (0 for a
    /// priority-only tag).
    pub tag: Option<u16>,
}

impl Header {
    /// Reads the header of `frame`; `None` if it is too short to have one
    /// (or its tag).
    pub fn parse(frame: &[u8]) -> Option<Header> {
        if frame.len() < ETHERNET_HEADER_BYTES {
            return None;
        }
        let mac = |at: usize| {
            let mut bytes = [0u8; 6];
            bytes.copy_from_slice(&frame[at..at + 6]);
            Mac(bytes)
        };
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let tag = if ethertype == ETHERTYPE_VLAN {
            if frame.len() < ETHERNET_HEADER_BYTES + VLAN_TAG_BYTES {
                return None;
            }
            Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff)
        } else {
            None
        };
        Some(Header {
            destination: mac(0),
            source: mac(6),
            tag,
        })
    }
}

/// Writes `frame` as it leaves on a port with `egress`: the tag removed,
/// added or kept. Returns the bytes written to `out`, which must hold
/// `frame.len() + VLAN_TAG_BYTES`.
pub fn rewrite(frame: &[u8], tagged_in: bool, egress: Egress, out: &mut [u8]) -> usize {
    let body = if tagged_in {
        &frame[12 + VLAN_TAG_BYTES..]
    } else {
        &frame[12..]
    };
    out[..12].copy_from_slice(&frame[..12]);
    let mut at = 12;
    if let Egress::Tagged(vlan) = egress {
        out[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        out[14..16].copy_from_slice(&(vlan & 0x0fff).to_be_bytes());
        at += VLAN_TAG_BYTES;
    }
    out[at..at + body.len()].copy_from_slice(body);
    at + body.len()
}

/// How a frame leaves a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Untagged,
    Tagged(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let mac: Mac = "52:54:00:0a:bc:01".parse().expect("mac");
        assert_eq!(mac.to_string(), "52:54:00:0a:bc:01");
        assert!(!mac.is_group());
        assert!(Mac::BROADCAST.is_group());
        for bad in [
            "",
            "52:54:00:0a:bc",
            "52:54:00:0a:bc:01:02",
            "52-54-00-0a-bc-01",
            "zz:54:00:0a:bc:01",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers_and_tags() {
        let mut frame = vec![0u8; 60];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let header = Header::parse(&frame).expect("header");
        assert_eq!(header.tag, None);
        assert_eq!(header.destination, Mac::BROADCAST);

        let mut tagged = vec![0u8; 64];
        let len = rewrite(&frame, false, Egress::Tagged(42), &mut tagged);
        assert_eq!(len, 64);
        assert_eq!(Header::parse(&tagged[..len]).expect("tagged").tag, Some(42));
        let mut back = vec![0u8; 68];
        let len = rewrite(&tagged, true, Egress::Untagged, &mut back);
        assert_eq!(&back[..len], &frame[..]);

        assert_eq!(Header::parse(&frame[..13]), None);
        assert_eq!(Header::parse(&tagged[..15]), None);
    }
}
