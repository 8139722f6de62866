//! The forwarding decision, as a pure state machine: ports with their
//! segment, VLAN mode, assigned address and rate limit; a MAC table with
//! aging; per-port counters. A frame and the time go in, the ports it
//! leaves on (and how it is tagged there) come out. Nothing here touches a
//! queue, a socket or a clock, so every case is a table-driven test.
//!
//! Other nodes' switches are reached through tunnel ports: one per node,
//! carrying every VLAN of the segments both nodes have ports in. Frames
//! cross a tunnel untagged, with their segment and VLAN beside them. A
//! frame from a tunnel is only delivered to this node's own ports (split
//! horizon), so with every node tunnelled to every other, a flooded frame
//! reaches each node of its segment exactly once.
//!
//! VLANs inside the switch: VLAN 0 is a segment's native (untagged)
//! network. A native port sends and receives untagged frames on VLAN 0; an
//! access port untagged frames on its one VLAN; a trunk port frames tagged
//! with its listed VLANs, and untagged frames on VLAN 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::frame::{Egress, Header, Mac, FRAME_BYTES_MAX_DEFAULT};

/// A port's number in its switch.
pub type PortId = u32;
/// A segment's number (its VNI in the cluster metadata).
pub type SegmentId = u32;

/// Most entries the MAC table holds; learning stops (and is counted)
/// beyond it, so a flood of invented addresses cannot grow memory.
pub const MAC_TABLE_ENTRIES_MAX: usize = 16_384;
/// How long a learned address stays without a frame from it.
pub const MAC_AGING_DEFAULT: Duration = Duration::from_secs(300);
/// Highest 802.1Q VLAN id (0 and 4095 are reserved).
pub const VLAN_ID_MAX: u16 = 4094;

/// How a port treats 802.1Q tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMode {
    Native,
    Access(u16),
    Trunk(Vec<u16>),
}

impl VlanMode {
    /// Whether frames of internal VLAN `vlan` leave on this port.
    fn carries(&self, vlan: u16) -> bool {
        match self {
            VlanMode::Native => vlan == 0,
            VlanMode::Access(access) => vlan == *access,
            VlanMode::Trunk(vlans) => vlan == 0 || vlans.contains(&vlan),
        }
    }

    fn egress(&self, vlan: u16) -> Egress {
        match self {
            VlanMode::Trunk(_) if vlan != 0 => Egress::Tagged(vlan),
            _ => Egress::Untagged,
        }
    }

    /// The internal VLAN of a frame arriving with `tag`.
    fn ingress(&self, tag: Option<u16>) -> Result<u16, DropReason> {
        let tag = tag.filter(|&vlan| vlan != 0);
        match (self, tag) {
            (VlanMode::Native, None) => Ok(0),
            (VlanMode::Access(access), None) => Ok(*access),
            (VlanMode::Native | VlanMode::Access(_), Some(_)) => Err(DropReason::TaggedOnAccess),
            (VlanMode::Trunk(_), None) => Ok(0),
            (VlanMode::Trunk(vlans), Some(vlan)) if vlans.contains(&vlan) => Ok(vlan),
            (VlanMode::Trunk(_), Some(_)) => Err(DropReason::VlanNotAllowed),
        }
    }

    /// The VLANs a station on this port may use.
    fn vlans(&self) -> Vec<u16> {
        match self {
            VlanMode::Native => vec![0],
            VlanMode::Access(vlan) => vec![*vlan],
            VlanMode::Trunk(vlans) => std::iter::once(0).chain(vlans.iter().copied()).collect(),
        }
    }

    fn check(&self) -> Result<(), SwitchError> {
        let valid = |vlan: &u16| (1..=VLAN_ID_MAX).contains(vlan);
        let ok = match self {
            VlanMode::Native => true,
            VlanMode::Access(vlan) => valid(vlan),
            VlanMode::Trunk(vlans) => !vlans.is_empty() && vlans.iter().all(valid),
        };
        if ok {
            Ok(())
        } else {
            Err(SwitchError::Vlan(self.clone()))
        }
    }
}

/// A port's rate limit: token buckets refilled continuously, holding a
/// tenth of a second's worth (at least one largest frame).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub packets_per_second: Option<u64>,
    pub bytes_per_second: Option<u64>,
}

/// What a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub segment: SegmentId,
    /// The port's assigned address: a static entry of the MAC table and,
    /// with `security`, the only source address accepted from the port.
    /// `None` for a port that carries many stations (a host port).
    pub mac: Option<Mac>,
    /// Port security: only `mac` may send (others are dropped as
    /// spoofed). Without it, sources on the port are learned, for a guest
    /// that bridges or routes for others, or a packet generator.
    pub security: bool,
    pub vlan: VlanMode,
    pub rate: RateLimit,
    /// The port's link, as the operator set it: a port whose link is down
    /// sends and receives nothing (its frames are dropped as `LinkDown`).
    /// The guest's own view of its link is its frontend's.
    pub link_up: bool,
}

/// Why a frame was not switched (or not delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an Ethernet header (and its tag).
    Runt,
    /// Longer than the switch's largest frame.
    Oversize,
    /// A source address other than the port's assigned one.
    Spoofed,
    /// A multicast or broadcast source address.
    GroupSource,
    /// A tagged frame on a native or access port.
    TaggedOnAccess,
    /// A tag for a VLAN the trunk does not carry.
    VlanNotAllowed,
    /// Over the port's rate limit.
    RateLimited,
    /// Addressed to a station on the port it came from.
    Hairpin,
    /// The receiving port had no room (no guest buffers, or too small).
    NoRoom,
    /// A frame the port's device could not read (bad descriptors, header).
    Malformed,
    /// From a tunnel, for a segment the two nodes do not share.
    UnknownSegment,
    /// For another node that could not be reached.
    Unreachable,
    /// Sent on, or addressed to, a port whose link is down.
    LinkDown,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::Spoofed,
        DropReason::GroupSource,
        DropReason::TaggedOnAccess,
        DropReason::VlanNotAllowed,
        DropReason::RateLimited,
        DropReason::Hairpin,
        DropReason::NoRoom,
        DropReason::Malformed,
        DropReason::UnknownSegment,
        DropReason::Unreachable,
        DropReason::LinkDown,
    ];

    /// Its name in counters and the API.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::Spoofed => "spoofed",
            DropReason::GroupSource => "group_source",
            DropReason::TaggedOnAccess => "tagged_on_access",
            DropReason::VlanNotAllowed => "vlan_not_allowed",
            DropReason::RateLimited => "rate_limited",
            DropReason::Hairpin => "hairpin",
            DropReason::NoRoom => "no_room",
            DropReason::Malformed => "malformed",
            DropReason::UnknownSegment => "unknown_segment",
            DropReason::Unreachable => "unreachable",
            DropReason::LinkDown => "link_down",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL
            .iter()
            .position(|&reason| reason == self)
            .expect("every reason is listed")
    }
}

/// A port's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl PortCounters {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Every reason with its count.
    pub fn all_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|&reason| (reason, self.drops(reason)))
    }
}

/// Errors of port management (never of a frame: frames are dropped and
/// counted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("port {0} already exists")]
    PortExists(PortId),
    #[error("no port {0}")]
    NoSuchPort(PortId),
    #[error("VLAN ids must be 1 to {VLAN_ID_MAX} (a trunk needs at least one): {0:?}")]
    Vlan(VlanMode),
    #[error("a port's address must be a unicast address, not {0}")]
    GroupMac(Mac),
    #[error("address {mac} is already port {port}'s in this segment")]
    MacTaken { mac: Mac, port: PortId },
    #[error("port {0} is not a tunnel")]
    NotATunnel(PortId),
    #[error("port {0} is a tunnel, not a port")]
    NotAPort(PortId),
}

/// Where a switched frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switched {
    /// The frame carried a tag when it arrived.
    pub tagged: bool,
    /// Its VLAN inside the switch.
    pub vlan: u16,
    pub segment: SegmentId,
}

#[derive(Debug)]
struct Bucket {
    rate: u64,
    capacity: f64,
    tokens: f64,
    at: Duration,
}

impl Bucket {
    fn new(rate: u64, at_least: f64, now: Duration) -> Bucket {
        let capacity = (rate as f64 / 10.0).max(at_least);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.capacity);
        self.at = now;
    }
}

#[derive(Debug)]
struct Port {
    config: PortConfig,
    counters: PortCounters,
    packets: Option<Bucket>,
    bytes: Option<Bucket>,
    /// For a tunnel: the segments it carries (`config` is unused).
    tunnel: Option<BTreeSet<SegmentId>>,
}

impl Port {
    /// Whether frames of `segment` and `vlan` leave on this port, and how.
    fn egress(&self, segment: SegmentId, vlan: u16) -> Option<Egress> {
        match &self.tunnel {
            Some(segments) => segments.contains(&segment).then_some(Egress::Untagged),
            None => (self.config.segment == segment && self.config.vlan.carries(vlan))
                .then(|| self.config.vlan.egress(vlan)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MacKey {
    segment: SegmentId,
    vlan: u16,
    mac: Mac,
}

#[derive(Debug, Clone, Copy)]
struct MacEntry {
    port: PortId,
    seen: Duration,
    fixed: bool,
}

/// Hashes MAC table keys: a multiply-rotate hash (a tenth of SipHash's
/// cost per frame), keyed with a random seed per switch so that a guest
/// cannot choose addresses that collide.
#[derive(Debug, Clone, Copy)]
struct MacHashing {
    seed: u64,
}

impl MacHashing {
    fn new() -> MacHashing {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0u64);
        MacHashing { seed }
    }
}

impl std::hash::BuildHasher for MacHashing {
    type Hasher = MacHasher;

    fn build_hasher(&self) -> MacHasher {
        MacHasher(self.seed)
    }
}

#[derive(Debug)]
struct MacHasher(u64);

impl MacHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl std::hash::Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u16(&mut self, value: u16) {
        self.add(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    fn finish(&self) -> u64 {
        // A last mix so the high bits (hashbrown's control bytes) depend on
        // every input bit.
        let mut x = self.0;
        x ^= x >> 32;
        x = x.wrapping_mul(Self::K);
        x ^ (x >> 29)
    }
}

/// One node's switch: every port of every segment here.
#[derive(Debug)]
pub struct Switch {
    ports: BTreeMap<PortId, Port>,
    macs: HashMap<MacKey, MacEntry, MacHashing>,
    aging: Duration,
    frame_bytes_max: usize,
    /// When aged entries were last removed (lookups skip them meanwhile).
    expired_at: Duration,
    /// Sources not learned because the table was full.
    pub learn_refused: u64,
    /// Bumped by every change to `macs`: what [`Recent`] remembers holds
    /// only while it is unchanged.
    macs_version: u64,
    recent: Recent,
}

/// The MAC table's answers for the frame switched last, kept for the
/// frames after it: a guest's batch of frames (switched at one `now`)
/// mostly has one source and one destination, and each lookup is a hash
/// of the key and a probe of a large table. An answer is reused only for
/// the same key, at the same `now`, and while the table has not changed
/// since, so it is exactly what the lookup would give.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    /// A source learned on a port: learning it again changes nothing.
    learned: Option<(MacKey, PortId, Duration, u64)>,
    /// A destination looked up: the port it is on, if known and not aged.
    found: Option<(MacKey, Duration, u64, Option<PortId>)>,
}

impl Default for Switch {
    fn default() -> Self {
        Switch::new(MAC_AGING_DEFAULT, FRAME_BYTES_MAX_DEFAULT)
    }
}

impl Switch {
    pub fn new(aging: Duration, frame_bytes_max: usize) -> Switch {
        Switch {
            ports: BTreeMap::new(),
            macs: HashMap::with_capacity_and_hasher(MAC_TABLE_ENTRIES_MAX, MacHashing::new()),
            aging,
            frame_bytes_max,
            expired_at: Duration::ZERO,
            learn_refused: 0,
            macs_version: 0,
            recent: Recent::default(),
        }
    }

    /// Adds a port; its assigned address becomes a static entry.
    pub fn add_port(
        &mut self,
        id: PortId,
        config: PortConfig,
        now: Duration,
    ) -> Result<(), SwitchError> {
        if self.ports.contains_key(&id) {
            return Err(SwitchError::PortExists(id));
        }
        config.vlan.check()?;
        if let Some(mac) = config.mac {
            if mac.is_group() || mac.is_zero() {
                return Err(SwitchError::GroupMac(mac));
            }
            for vlan in config.vlan.vlans() {
                let key = MacKey {
                    segment: config.segment,
                    vlan,
                    mac,
                };
                if let Some(entry) = self.macs.get(&key).filter(|entry| entry.fixed) {
                    return Err(SwitchError::MacTaken {
                        mac,
                        port: entry.port,
                    });
                }
            }
            for vlan in config.vlan.vlans() {
                let key = MacKey {
                    segment: config.segment,
                    vlan,
                    mac,
                };
                self.macs_mut().insert(
                    key,
                    MacEntry {
                        port: id,
                        seen: now,
                        fixed: true,
                    },
                );
            }
        }
        let largest = self.frame_bytes_max as f64;
        let port = Port {
            packets: config
                .rate
                .packets_per_second
                .map(|rate| Bucket::new(rate, 1.0, now)),
            bytes: config
                .rate
                .bytes_per_second
                .map(|rate| Bucket::new(rate, largest, now)),
            config,
            counters: PortCounters::default(),
            tunnel: None,
        };
        self.ports.insert(id, port);
        Ok(())
    }

    /// Adds a tunnel to another node's switch, carrying no segment yet.
    pub fn add_tunnel(&mut self, id: PortId) -> Result<(), SwitchError> {
        if self.ports.contains_key(&id) {
            return Err(SwitchError::PortExists(id));
        }
        let port = Port {
            config: PortConfig {
                segment: 0,
                mac: None,
                security: false,
                vlan: VlanMode::Native,
                rate: RateLimit::default(),
                link_up: true,
            },
            counters: PortCounters::default(),
            packets: None,
            bytes: None,
            tunnel: Some(BTreeSet::new()),
        };
        self.ports.insert(id, port);
        Ok(())
    }

    /// Sets the segments a tunnel carries; addresses learned on it in
    /// other segments are forgotten.
    pub fn set_tunnel_segments(
        &mut self,
        id: PortId,
        segments: BTreeSet<SegmentId>,
    ) -> Result<(), SwitchError> {
        let port = self.ports.get_mut(&id).ok_or(SwitchError::NoSuchPort(id))?;
        let carried = port.tunnel.as_mut().ok_or(SwitchError::NotATunnel(id))?;
        *carried = segments;
        let carried = carried.clone();
        self.macs_mut()
            .retain(|key, entry| entry.port != id || carried.contains(&key.segment));
        Ok(())
    }

    /// Sets a port's link up or down (see [`PortConfig::link_up`]).
    pub fn set_link(&mut self, id: PortId, up: bool) -> Result<(), SwitchError> {
        let port = self.ports.get_mut(&id).ok_or(SwitchError::NoSuchPort(id))?;
        if port.tunnel.is_some() {
            return Err(SwitchError::NotAPort(id));
        }
        port.config.link_up = up;
        Ok(())
    }

    /// Removes a port and every address the table has on it.
    pub fn remove_port(&mut self, id: PortId) -> Result<PortCounters, SwitchError> {
        let port = self.ports.remove(&id).ok_or(SwitchError::NoSuchPort(id))?;
        self.macs_mut().retain(|_, entry| entry.port != id);
        Ok(port.counters)
    }

    pub fn counters(&self, id: PortId) -> Option<&PortCounters> {
        self.ports.get(&id).map(|port| &port.counters)
    }

    /// Drops learned addresses not seen for the aging time (also done by
    /// [`Switch::switch`] now and then).
    pub fn expire(&mut self, now: Duration) {
        self.expired_at = now;
        let aging = self.aging;
        self.macs_mut()
            .retain(|_, entry| entry.fixed || now.saturating_sub(entry.seen) < aging);
    }

    /// Decides where `frame`, arriving on port `from`, goes: the ports and
    /// their tagging are appended to `out` (cleared first). A frame that
    /// is dropped is counted on `from`.
    pub fn switch(
        &mut self,
        now: Duration,
        from: PortId,
        frame: &[u8],
        out: &mut Vec<(PortId, Egress)>,
    ) -> Result<Switched, DropReason> {
        out.clear();
        // Aged entries are skipped by lookups; sweeping them (which walks
        // the whole table) happens at most ten times per aging time.
        if now.saturating_sub(self.expired_at) >= self.aging / 10 {
            self.expire(now);
        }
        let frame_bytes_max = self.frame_bytes_max;
        let Some(port) = self.ports.get_mut(&from) else {
            // A port being removed: nothing to count on.
            return Err(DropReason::Malformed);
        };
        if port.tunnel.is_some() {
            // Frames from a tunnel come in through switch_from_tunnel.
            port.counters.drops[DropReason::Malformed.index()] += 1;
            return Err(DropReason::Malformed);
        }
        let decided = Switch::admit(port, now, frame, frame_bytes_max);
        let (header, vlan) = match decided {
            Ok(admitted) => admitted,
            Err(reason) => {
                port.counters.drops[reason.index()] += 1;
                return Err(reason);
            }
        };
        port.counters.rx_packets += 1;
        port.counters.rx_bytes += frame.len() as u64;
        let segment = port.config.segment;
        let secured = port.config.security && port.config.mac.is_some();
        if !secured {
            self.learn(segment, vlan, header.source, from, now);
        }
        self.destinations(now, from, false, segment, vlan, header.destination, out)?;
        Ok(Switched {
            tagged: header.tag.is_some(),
            vlan,
            segment,
        })
    }

    /// Decides where `frame`, arriving untagged through tunnel `from` with
    /// its `segment` and `vlan`, goes: only to this node's own ports. Its
    /// source is learned as being behind the tunnel, unless it is the
    /// assigned address of a port here (then the frame is dropped).
    pub fn switch_from_tunnel(
        &mut self,
        now: Duration,
        from: PortId,
        segment: SegmentId,
        vlan: u16,
        frame: &[u8],
        out: &mut Vec<(PortId, Egress)>,
    ) -> Result<Switched, DropReason> {
        out.clear();
        let frame_bytes_max = self.frame_bytes_max;
        let Some(port) = self.ports.get_mut(&from) else {
            return Err(DropReason::Malformed);
        };
        let checked = match &port.tunnel {
            None => Err(DropReason::Malformed),
            Some(segments) => {
                Switch::admit_tunnelled(segments, segment, vlan, frame, frame_bytes_max)
            }
        };
        let header = match checked {
            Ok(header) => header,
            Err(reason) => {
                port.counters.drops[reason.index()] += 1;
                return Err(reason);
            }
        };
        let key = MacKey {
            segment,
            vlan,
            mac: header.source,
        };
        if self.macs.get(&key).is_some_and(|entry| entry.fixed) {
            self.count_drop(from, DropReason::Spoofed);
            return Err(DropReason::Spoofed);
        }
        if let Some(port) = self.ports.get_mut(&from) {
            port.counters.rx_packets += 1;
            port.counters.rx_bytes += frame.len() as u64;
        }
        self.learn(segment, vlan, header.source, from, now);
        self.destinations(now, from, true, segment, vlan, header.destination, out)?;
        Ok(Switched {
            tagged: false,
            vlan,
            segment,
        })
    }

    fn admit_tunnelled(
        segments: &BTreeSet<SegmentId>,
        segment: SegmentId,
        vlan: u16,
        frame: &[u8],
        frame_bytes_max: usize,
    ) -> Result<Header, DropReason> {
        let header = Header::parse(frame).ok_or(DropReason::Runt)?;
        if frame.len() > frame_bytes_max {
            return Err(DropReason::Oversize);
        }
        if header.source.is_group() {
            return Err(DropReason::GroupSource);
        }
        // Tunnelled frames are untagged: the VLAN travels beside them.
        if header.tag.is_some() || vlan > VLAN_ID_MAX {
            return Err(DropReason::Malformed);
        }
        if !segments.contains(&segment) {
            return Err(DropReason::UnknownSegment);
        }
        Ok(header)
    }

    /// The ports a frame for `destination` goes to: the port its address
    /// is on, or every port of the segment and VLAN but `from`. A frame
    /// from a tunnel never leaves on a tunnel.
    #[allow(clippy::too_many_arguments)]
    fn destinations(
        &mut self,
        now: Duration,
        from: PortId,
        from_tunnel: bool,
        segment: SegmentId,
        vlan: u16,
        destination: Mac,
        out: &mut Vec<(PortId, Egress)>,
    ) -> Result<(), DropReason> {
        let target = if destination.is_group() {
            None
        } else {
            self.find(segment, vlan, destination, now)
        };
        match target {
            Some(to) => {
                let port = self.ports.get(&to);
                let onward = from_tunnel && port.is_some_and(|port| port.tunnel.is_some());
                if to == from || onward {
                    self.count_drop(from, DropReason::Hairpin);
                    return Err(DropReason::Hairpin);
                }
                let egress = port.and_then(|port| Some((port.egress(segment, vlan)?, port)));
                match egress {
                    Some((egress, port)) if port.config.link_up => out.push((to, egress)),
                    Some(_) => self.count_drop(to, DropReason::LinkDown),
                    None => {}
                }
            }
            None => {
                for (&id, port) in &self.ports {
                    // A port whose link is down is left out of floods
                    // (not counted: it was not addressed).
                    if id == from || (from_tunnel && port.tunnel.is_some()) || !port.config.link_up
                    {
                        continue;
                    }
                    if let Some(egress) = port.egress(segment, vlan) {
                        out.push((id, egress));
                    }
                }
            }
        }
        Ok(())
    }

    /// The checks a frame passes on its way in: length, source, VLAN,
    /// rate. Returns its header and internal VLAN.
    fn admit(
        port: &mut Port,
        now: Duration,
        frame: &[u8],
        frame_bytes_max: usize,
    ) -> Result<(Header, u16), DropReason> {
        if !port.config.link_up {
            return Err(DropReason::LinkDown);
        }
        let header = Header::parse(frame).ok_or(DropReason::Runt)?;
        if frame.len() > frame_bytes_max {
            return Err(DropReason::Oversize);
        }
        if header.source.is_group() {
            return Err(DropReason::GroupSource);
        }
        let secured = port.config.security;
        if secured && port.config.mac.is_some_and(|mac| mac != header.source) {
            return Err(DropReason::Spoofed);
        }
        let vlan = port.config.vlan.ingress(header.tag)?;
        let bytes = frame.len() as f64;
        if let Some(bucket) = &mut port.packets {
            bucket.refill(now);
        }
        if let Some(bucket) = &mut port.bytes {
            bucket.refill(now);
        }
        let packet_ok = port.packets.as_ref().is_none_or(|b| b.tokens >= 1.0);
        let bytes_ok = port.bytes.as_ref().is_none_or(|b| b.tokens >= bytes);
        if !(packet_ok && bytes_ok) {
            return Err(DropReason::RateLimited);
        }
        if let Some(bucket) = &mut port.packets {
            bucket.tokens -= 1.0;
        }
        if let Some(bucket) = &mut port.bytes {
            bucket.tokens -= bytes;
        }
        Ok((header, vlan))
    }

    /// The port `mac` was learned on (or is assigned to), unless aged.
    fn find(&mut self, segment: SegmentId, vlan: u16, mac: Mac, now: Duration) -> Option<PortId> {
        let key = MacKey { segment, vlan, mac };
        if let Some((recent, at, version, port)) = self.recent.found {
            if (recent, at, version) == (key, now, self.macs_version) {
                return port;
            }
        }
        let port = self
            .macs
            .get(&key)
            .filter(|entry| entry.fixed || now.saturating_sub(entry.seen) < self.aging)
            .map(|entry| entry.port);
        self.recent.found = Some((key, now, self.macs_version, port));
        port
    }

    /// The MAC table, to change it: what [`Recent`] remembers no longer
    /// holds.
    fn macs_mut(&mut self) -> &mut HashMap<MacKey, MacEntry, MacHashing> {
        self.macs_version = self.macs_version.wrapping_add(1);
        &mut self.macs
    }

    fn learn(&mut self, segment: SegmentId, vlan: u16, mac: Mac, port: PortId, now: Duration) {
        let key = MacKey { segment, vlan, mac };
        if self.recent.learned == Some((key, port, now, self.macs_version)) {
            return;
        }
        let room = self.macs.len() < MAC_TABLE_ENTRIES_MAX;
        match self.macs.get_mut(&key) {
            // Another port's assigned address is never moved by a frame.
            Some(entry) if entry.fixed => {}
            Some(entry) => {
                if (entry.port, entry.seen) != (port, now) {
                    entry.port = port;
                    entry.seen = now;
                    // As `macs_mut` does (the entry borrows the table).
                    self.macs_version = self.macs_version.wrapping_add(1);
                }
            }
            None if room => {
                self.macs_mut().insert(
                    key,
                    MacEntry {
                        port,
                        seen: now,
                        fixed: false,
                    },
                );
            }
            // Counted per frame: not remembered.
            None => {
                self.learn_refused += 1;
                return;
            }
        }
        self.recent.learned = Some((key, port, now, self.macs_version));
    }

    /// Counts a frame delivered on `port`.
    pub fn count_tx(&mut self, port: PortId, bytes: usize) {
        if let Some(port) = self.ports.get_mut(&port) {
            port.counters.tx_packets += 1;
            port.counters.tx_bytes += bytes as u64;
        }
    }

    /// Counts a frame dropped on `port` for `reason`.
    pub fn count_drop(&mut self, port: PortId, reason: DropReason) {
        if let Some(port) = self.ports.get_mut(&port) {
            port.counters.drops[reason.index()] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([0x52, 0x54, 0, 0, 0, 0xa]);
    const B: Mac = Mac([0x52, 0x54, 0, 0, 0, 0xb]);
    const C: Mac = Mac([0x52, 0x54, 0, 0, 0, 0xc]);
    const R: Mac = Mac([0x52, 0x54, 0, 0, 1, 0x1]);
    const MULTICAST: Mac = Mac([0x01, 0x00, 0x5e, 0, 0, 1]);

    fn frame(destination: Mac, source: Mac, tag: Option<u16>, len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; len.max(18)];
        frame[..6].copy_from_slice(&destination.0);
        frame[6..12].copy_from_slice(&source.0);
        match tag {
            Some(vlan) => {
                frame[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
                frame[14..16].copy_from_slice(&vlan.to_be_bytes());
                frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
            }
            None => frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes()),
        }
        frame.truncate(len);
        frame
    }

    fn port(segment: SegmentId, mac: Option<Mac>, vlan: VlanMode) -> PortConfig {
        PortConfig {
            segment,
            mac,
            security: mac.is_some(),
            vlan,
            rate: RateLimit::default(),
            link_up: true,
        }
    }

    /// Ports: 1 = A native, 2 = B native, 3 = C access 10, 4 = trunk
    /// [10, 20] without an address (a tunnel), 5 = A's twin on segment 2.
    fn switch() -> Switch {
        let mut switch = Switch::default();
        let now = Duration::ZERO;
        switch
            .add_port(1, port(1, Some(A), VlanMode::Native), now)
            .expect("1");
        switch
            .add_port(2, port(1, Some(B), VlanMode::Native), now)
            .expect("2");
        switch
            .add_port(3, port(1, Some(C), VlanMode::Access(10)), now)
            .expect("3");
        switch
            .add_port(4, port(1, None, VlanMode::Trunk(vec![10, 20])), now)
            .expect("4");
        switch
            .add_port(5, port(2, Some(A), VlanMode::Native), now)
            .expect("5");
        switch
    }

    /// Where a frame goes, or why it is dropped.
    type Outcome = Result<Vec<(PortId, Egress)>, DropReason>;

    fn check(switch: &mut Switch, at_ms: u64, from: PortId, frame: &[u8], expected: Outcome) {
        let mut out = Vec::new();
        let got = switch
            .switch(Duration::from_millis(at_ms), from, frame, &mut out)
            .map(|_| out);
        assert_eq!(got, expected, "frame from port {from}");
    }

    use Egress::{Tagged, Untagged};

    #[test]
    fn forwarding_decisions() {
        let mut s = switch();
        let cases: Vec<(PortId, Vec<u8>, Outcome)> = vec![
            // Known unicast on the native network: straight to its port.
            (1, frame(B, A, None, 60), Ok(vec![(2, Untagged)])),
            // Broadcast floods the segment's native network: the other
            // native port and the trunk, untagged; never the access port
            // (VLAN 10) or segment 2.
            (
                1,
                frame(Mac::BROADCAST, A, None, 60),
                Ok(vec![(2, Untagged), (4, Untagged)]),
            ),
            (
                1,
                frame(MULTICAST, A, None, 60),
                Ok(vec![(2, Untagged), (4, Untagged)]),
            ),
            // Unknown unicast floods too.
            (
                1,
                frame(R, A, None, 60),
                Ok(vec![(2, Untagged), (4, Untagged)]),
            ),
            // The access port's frames are VLAN 10 inside: they reach the
            // trunk tagged, and nothing on the native network.
            (
                3,
                frame(Mac::BROADCAST, C, None, 60),
                Ok(vec![(4, Tagged(10))]),
            ),
            (3, frame(B, C, None, 60), Ok(vec![(4, Tagged(10))])),
            // From the trunk: VLAN 10 reaches the access port untagged;
            // VLAN 20 has no port here but the trunk; untagged is native.
            (4, frame(C, R, Some(10), 64), Ok(vec![(3, Untagged)])),
            (4, frame(Mac::BROADCAST, R, Some(20), 64), Ok(vec![])),
            (4, frame(A, R, None, 60), Ok(vec![(1, Untagged)])),
            // R was learned on the trunk, per VLAN.
            (3, frame(R, C, None, 60), Ok(vec![(4, Tagged(10))])),
            (1, frame(R, A, None, 60), Ok(vec![(4, Untagged)])),
            // Segments do not meet: A's twin on segment 2 floods alone.
            (5, frame(Mac::BROADCAST, A, None, 60), Ok(vec![])),
            // Port security: a source other than the port's address.
            (1, frame(B, C, None, 60), Err(DropReason::Spoofed)),
            (
                1,
                frame(B, MULTICAST, None, 60),
                Err(DropReason::GroupSource),
            ),
            // Tags where they do not belong.
            (
                1,
                frame(B, A, Some(10), 64),
                Err(DropReason::TaggedOnAccess),
            ),
            (
                3,
                frame(B, C, Some(10), 64),
                Err(DropReason::TaggedOnAccess),
            ),
            (
                4,
                frame(C, R, Some(30), 64),
                Err(DropReason::VlanNotAllowed),
            ),
            // A priority tag (VLAN 0) on a native port is untagged.
            (1, frame(B, A, Some(0), 64), Ok(vec![(2, Untagged)])),
            // Lengths.
            (1, frame(B, A, None, 13), Err(DropReason::Runt)),
            (4, frame(B, R, Some(10), 17), Err(DropReason::Runt)),
            (
                1,
                frame(B, A, None, FRAME_BYTES_MAX_DEFAULT + 1),
                Err(DropReason::Oversize),
            ),
            (
                1,
                frame(B, A, None, FRAME_BYTES_MAX_DEFAULT),
                Ok(vec![(2, Untagged)]),
            ),
            // To a station on the port it came from.
            (4, frame(R, R, None, 60), Err(DropReason::Hairpin)),
            // A frame on the trunk claiming port 1's address does not move
            // it.
            (4, frame(B, A, None, 60), Ok(vec![(2, Untagged)])),
            (2, frame(A, B, None, 60), Ok(vec![(1, Untagged)])),
        ];
        for (from, frame, expected) in cases {
            check(&mut s, 1, from, &frame, expected);
        }
        let one = s.counters(1).expect("port 1");
        assert_eq!(one.drops(DropReason::Spoofed), 1);
        assert_eq!(one.drops(DropReason::Runt), 1);
        assert_eq!(one.drops(DropReason::Oversize), 1);
        assert_eq!(one.drops(DropReason::TaggedOnAccess), 1);
        assert_eq!(one.drops(DropReason::GroupSource), 1);
        assert_eq!(one.rx_packets, 7);
        assert_eq!(s.counters(4).expect("4").drops(DropReason::Hairpin), 1);
    }

    #[test]
    fn learned_addresses_age_and_go_with_their_port() {
        let mut s = switch();
        check(
            &mut s,
            0,
            4,
            &frame(A, R, None, 60),
            Ok(vec![(1, Untagged)]),
        );
        check(
            &mut s,
            1_000,
            1,
            &frame(R, A, None, 60),
            Ok(vec![(4, Untagged)]),
        );
        // Past the aging time, R is unknown again: flooded.
        let later = MAC_AGING_DEFAULT.as_millis() as u64 + 1;
        s.expire(Duration::from_millis(later));
        check(
            &mut s,
            later,
            1,
            &frame(R, A, None, 60),
            Ok(vec![(2, Untagged), (4, Untagged)]),
        );
        // Removing a port removes its static address: frames to it flood.
        s.remove_port(2).expect("remove");
        check(
            &mut s,
            later,
            1,
            &frame(B, A, None, 60),
            Ok(vec![(4, Untagged)]),
        );
        assert_eq!(s.remove_port(2), Err(SwitchError::NoSuchPort(2)));
    }

    #[test]
    fn ports_are_checked_when_added() {
        let mut s = switch();
        let now = Duration::ZERO;
        assert_eq!(
            s.add_port(1, port(1, None, VlanMode::Native), now),
            Err(SwitchError::PortExists(1))
        );
        assert_eq!(
            s.add_port(9, port(1, Some(B), VlanMode::Native), now),
            Err(SwitchError::MacTaken { mac: B, port: 2 })
        );
        assert!(matches!(
            s.add_port(9, port(1, None, VlanMode::Access(0)), now),
            Err(SwitchError::Vlan(_))
        ));
        assert!(matches!(
            s.add_port(9, port(1, None, VlanMode::Trunk(vec![])), now),
            Err(SwitchError::Vlan(_))
        ));
        assert!(matches!(
            s.add_port(9, port(1, Some(MULTICAST), VlanMode::Native), now),
            Err(SwitchError::GroupMac(_))
        ));
        // The same address on another VLAN of the segment is another
        // station.
        s.add_port(9, port(1, Some(B), VlanMode::Access(20)), now)
            .expect("B on VLAN 20");
    }

    #[test]
    fn rate_limits_drop_and_refill() {
        let mut s = Switch::default();
        let limited = PortConfig {
            rate: RateLimit {
                packets_per_second: Some(100),
                bytes_per_second: None,
            },
            ..port(1, Some(A), VlanMode::Native)
        };
        s.add_port(1, limited, Duration::ZERO).expect("1");
        s.add_port(2, port(1, Some(B), VlanMode::Native), Duration::ZERO)
            .expect("2");
        let ab = frame(B, A, None, 60);
        // A burst of a tenth of a second's worth passes, then drops.
        for _ in 0..10 {
            check(&mut s, 0, 1, &ab, Ok(vec![(2, Untagged)]));
        }
        check(&mut s, 0, 1, &ab, Err(DropReason::RateLimited));
        // 10 ms later one more token.
        check(&mut s, 10, 1, &ab, Ok(vec![(2, Untagged)]));
        check(&mut s, 10, 1, &ab, Err(DropReason::RateLimited));
        assert_eq!(s.counters(1).expect("1").drops(DropReason::RateLimited), 2);

        let mut s = Switch::default();
        let bytes = PortConfig {
            rate: RateLimit {
                packets_per_second: None,
                bytes_per_second: Some(100_000),
            },
            ..port(1, Some(A), VlanMode::Native)
        };
        s.add_port(1, bytes, Duration::ZERO).expect("1");
        s.add_port(2, port(1, Some(B), VlanMode::Native), Duration::ZERO)
            .expect("2");
        let big = frame(B, A, None, 1000);
        for _ in 0..10 {
            check(&mut s, 0, 1, &big, Ok(vec![(2, Untagged)]));
        }
        check(&mut s, 0, 1, &big, Err(DropReason::RateLimited));
    }

    #[test]
    fn the_table_stops_learning_when_full() {
        let mut s = Switch::default();
        s.add_port(1, port(1, None, VlanMode::Native), Duration::ZERO)
            .expect("1");
        s.add_port(2, port(1, None, VlanMode::Native), Duration::ZERO)
            .expect("2");
        let mut out = Vec::new();
        for i in 0..(MAC_TABLE_ENTRIES_MAX as u32 + 10) {
            let [a, b, c, d] = i.to_be_bytes();
            let source = Mac([0x02, 0, a, b, c, d]);
            s.switch(
                Duration::ZERO,
                1,
                &frame(Mac::BROADCAST, source, None, 60),
                &mut out,
            )
            .expect("switched");
        }
        assert_eq!(s.learn_refused, 10);
    }

    #[test]
    fn a_port_whose_link_is_down_sends_and_receives_nothing() {
        let mut s = switch();
        s.set_link(2, false).expect("down");
        // Its own frames are dropped and counted on it.
        check(
            &mut s,
            0,
            2,
            &frame(A, B, None, 60),
            Err(DropReason::LinkDown),
        );
        // Frames to it: dropped and counted on it; floods leave it out.
        check(&mut s, 0, 1, &frame(B, A, None, 60), Ok(vec![]));
        check(
            &mut s,
            0,
            1,
            &frame(Mac::BROADCAST, A, None, 60),
            Ok(vec![(4, Untagged)]),
        );
        let counters = s.counters(2).expect("2");
        assert_eq!(counters.drops(DropReason::LinkDown), 2);
        assert_eq!((counters.rx_packets, counters.tx_packets), (0, 0));
        // Up again: as before.
        s.set_link(2, true).expect("up");
        check(
            &mut s,
            0,
            2,
            &frame(A, B, None, 60),
            Ok(vec![(1, Untagged)]),
        );
        check(
            &mut s,
            0,
            1,
            &frame(B, A, None, 60),
            Ok(vec![(2, Untagged)]),
        );
        assert_eq!(s.set_link(9, false), Err(SwitchError::NoSuchPort(9)));
        s.add_tunnel(10).expect("10");
        assert_eq!(s.set_link(10, false), Err(SwitchError::NotAPort(10)));
    }

    #[test]
    fn a_port_whose_link_is_down_gets_nothing_from_tunnels_or_vlans() {
        let mut s = tunnelled();
        let remote = Mac([0x52, 0x54, 0, 0, 9, 9]);
        s.set_link(1, false).expect("A down");
        s.set_link(3, false).expect("C down");
        // From another node to A: dropped for A; a flood leaves A out.
        from_tunnel(&mut s, 10, 1, 0, &frame(A, remote, None, 60), Ok(vec![]));
        from_tunnel(
            &mut s,
            10,
            1,
            0,
            &frame(Mac::BROADCAST, remote, None, 60),
            Ok(vec![(2, Untagged), (4, Untagged)]),
        );
        // To C on VLAN 10 from the trunk: dropped for C; a flood of VLAN 10
        // reaches only the tunnels.
        check(&mut s, 0, 4, &frame(C, remote, Some(10), 60), Ok(vec![]));
        check(
            &mut s,
            0,
            4,
            &frame(Mac::BROADCAST, remote, Some(10), 60),
            Ok(vec![(10, Untagged), (11, Untagged)]),
        );
        for port in [1, 3] {
            let counters = s.counters(port).expect("port");
            assert_eq!(counters.drops(DropReason::LinkDown), 1, "port {port}");
            assert_eq!(counters.tx_packets, 0, "port {port}");
        }
    }

    #[test]
    fn answers_kept_for_the_next_frame_are_what_the_table_says() {
        // Frames at one instant, as a batch is switched: each answer a
        // frame reuses must be the one a fresh lookup gives.
        let mut s = switch();
        let to_r = frame(R, A, None, 60);
        // R unknown: flooded, twice.
        check(&mut s, 5, 1, &to_r, Ok(vec![(2, Untagged), (4, Untagged)]));
        check(&mut s, 5, 1, &to_r, Ok(vec![(2, Untagged), (4, Untagged)]));
        // R learned on 4 at the same instant: the next frame to R goes
        // there only.
        check(
            &mut s,
            5,
            4,
            &frame(A, R, None, 60),
            Ok(vec![(1, Untagged)]),
        );
        check(&mut s, 5, 1, &to_r, Ok(vec![(4, Untagged)]));
        // R moves to port 2 (which has no port security here), still at
        // the same instant, with a broadcast (no lookup in between): frames
        // to R follow it.
        s.ports.get_mut(&2).expect("2").config.security = false;
        check(
            &mut s,
            5,
            2,
            &frame(Mac::BROADCAST, R, None, 60),
            Ok(vec![(1, Untagged), (4, Untagged)]),
        );
        check(&mut s, 5, 1, &to_r, Ok(vec![(2, Untagged)]));
        check(
            &mut s,
            5,
            2,
            &frame(A, R, None, 60),
            Ok(vec![(1, Untagged)]),
        );
        check(&mut s, 5, 1, &to_r, Ok(vec![(2, Untagged)]));
        // Its port removed at the same instant: R is unknown, flooded.
        s.add_port(6, port(1, None, VlanMode::Native), Duration::ZERO)
            .expect("6");
        s.remove_port(2).expect("remove");
        check(&mut s, 5, 1, &to_r, Ok(vec![(4, Untagged), (6, Untagged)]));
        // Aged between two frames with the same addresses: flooded.
        check(
            &mut s,
            6,
            4,
            &frame(A, R, None, 60),
            Ok(vec![(1, Untagged)]),
        );
        check(&mut s, 6, 1, &to_r, Ok(vec![(4, Untagged)]));
        let aged = 6 + MAC_AGING_DEFAULT.as_millis() as u64;
        check(
            &mut s,
            aged,
            1,
            &to_r,
            Ok(vec![(4, Untagged), (6, Untagged)]),
        );
    }

    #[test]
    fn a_full_table_refuses_every_frame_of_a_run_and_counts_each() {
        let mut s = Switch::default();
        s.add_port(1, port(1, None, VlanMode::Native), Duration::ZERO)
            .expect("1");
        let mut out = Vec::new();
        for i in 0..MAC_TABLE_ENTRIES_MAX as u32 {
            let [a, b, c, d] = i.to_be_bytes();
            s.learn(1, 0, Mac([0x02, 0, a, b, c, d]), 1, Duration::ZERO);
        }
        let unlearned = frame(Mac::BROADCAST, Mac([0x06, 0, 0, 0, 0, 1]), None, 60);
        for _ in 0..3 {
            s.switch(Duration::ZERO, 1, &unlearned, &mut out)
                .expect("switched");
        }
        assert_eq!(s.learn_refused, 3);
    }

    /// Ports 1 = A native and 3 = C access 10 of `switch()`, plus tunnels
    /// 10 (segment 1) and 11 (segments 1 and 2).
    fn tunnelled() -> Switch {
        let mut s = switch();
        s.add_tunnel(10).expect("10");
        s.add_tunnel(11).expect("11");
        s.set_tunnel_segments(10, [1].into()).expect("segments 10");
        s.set_tunnel_segments(11, [1, 2].into())
            .expect("segments 11");
        s
    }

    fn from_tunnel(
        s: &mut Switch,
        from: PortId,
        segment: SegmentId,
        vlan: u16,
        frame: &[u8],
        expected: Outcome,
    ) {
        let mut out = Vec::new();
        let got = s
            .switch_from_tunnel(Duration::ZERO, from, segment, vlan, frame, &mut out)
            .map(|_| out);
        assert_eq!(got, expected, "frame from tunnel {from}");
    }

    #[test]
    fn tunnels_carry_their_segments_untagged_and_never_forward_to_each_other() {
        use Egress::*;
        let mut s = tunnelled();
        let remote = Mac([0x52, 0x54, 0, 0, 9, 9]);
        // Broadcast from A (segment 1, VLAN 0) reaches B, the trunk and
        // both tunnels, once each, untagged.
        check(
            &mut s,
            0,
            1,
            &frame(Mac::BROADCAST, A, None, 60),
            Ok(vec![
                (2, Untagged),
                (4, Untagged),
                (10, Untagged),
                (11, Untagged),
            ]),
        );
        // Segment 2 reaches only the tunnel carrying it.
        check(
            &mut s,
            0,
            5,
            &frame(Mac::BROADCAST, A, None, 60),
            Ok(vec![(11, Untagged)]),
        );
        // A broadcast from a tunnel goes to local ports only (split
        // horizon), on its VLAN: VLAN 10 reaches C and the trunk, tagged.
        from_tunnel(
            &mut s,
            10,
            1,
            10,
            &frame(Mac::BROADCAST, remote, None, 60),
            Ok(vec![(3, Untagged), (4, Tagged(10))]),
        );
        // The remote source was learned behind tunnel 10: C's reply is
        // unicast there.
        check(
            &mut s,
            0,
            3,
            &frame(remote, C, None, 60),
            Ok(vec![(10, Untagged)]),
        );
        // A frame from tunnel 11 for a station behind tunnel 10 is not
        // passed on: the sending node reaches that node itself.
        from_tunnel(
            &mut s,
            11,
            1,
            10,
            &frame(remote, Mac([0x52, 0x54, 0, 0, 9, 8]), None, 60),
            Err(DropReason::Hairpin),
        );
        // Unicast from a tunnel to a local port.
        from_tunnel(
            &mut s,
            10,
            1,
            0,
            &frame(A, remote, None, 60),
            Ok(vec![(1, Untagged)]),
        );
    }

    #[test]
    fn bad_tunnelled_frames_are_dropped_and_counted() {
        let mut s = tunnelled();
        let remote = Mac([0x52, 0x54, 0, 0, 9, 9]);
        let cases = [
            // A segment this tunnel does not carry.
            (
                2,
                0,
                frame(Mac::BROADCAST, remote, None, 60),
                DropReason::UnknownSegment,
            ),
            // Tags never cross a tunnel; VLAN ids are checked.
            (
                1,
                10,
                frame(Mac::BROADCAST, remote, Some(10), 60),
                DropReason::Malformed,
            ),
            (
                1,
                4095,
                frame(Mac::BROADCAST, remote, None, 60),
                DropReason::Malformed,
            ),
            (
                1,
                0,
                frame(Mac::BROADCAST, remote, None, 13),
                DropReason::Runt,
            ),
            (
                1,
                0,
                frame(Mac::BROADCAST, remote, None, 2000),
                DropReason::Oversize,
            ),
            (
                1,
                0,
                frame(Mac::BROADCAST, MULTICAST, None, 60),
                DropReason::GroupSource,
            ),
            // A remote frame claiming a local port's assigned address.
            (
                1,
                0,
                frame(Mac::BROADCAST, A, None, 60),
                DropReason::Spoofed,
            ),
        ];
        for (segment, vlan, frame, reason) in cases {
            let before = s.counters(10).expect("tunnel").drops(reason);
            from_tunnel(&mut s, 10, segment, vlan, &frame, Err(reason));
            let after = s.counters(10).expect("tunnel").drops(reason);
            assert_eq!(after, before + 1, "{reason:?}");
        }
        // A tunnel is not a local source, nor a local port a tunnel.
        check(
            &mut s,
            0,
            10,
            &frame(Mac::BROADCAST, remote, None, 60),
            Err(DropReason::Malformed),
        );
        from_tunnel(
            &mut s,
            1,
            1,
            0,
            &frame(Mac::BROADCAST, remote, None, 60),
            Err(DropReason::Malformed),
        );
        assert_eq!(
            s.set_tunnel_segments(1, [1].into()),
            Err(SwitchError::NotATunnel(1))
        );
    }

    #[test]
    fn a_tunnel_leaving_a_segment_forgets_its_stations_there() {
        let mut s = tunnelled();
        let remote = Mac([0x52, 0x54, 0, 0, 9, 9]);
        from_tunnel(
            &mut s,
            10,
            1,
            0,
            &frame(Mac::BROADCAST, remote, None, 60),
            Ok(vec![
                (1, Egress::Untagged),
                (2, Egress::Untagged),
                (4, Egress::Untagged),
            ]),
        );
        check(
            &mut s,
            0,
            1,
            &frame(remote, A, None, 60),
            Ok(vec![(10, Egress::Untagged)]),
        );
        s.set_tunnel_segments(10, BTreeSet::new())
            .expect("segments");
        // Unknown again: flooded to what still carries segment 1.
        check(
            &mut s,
            0,
            1,
            &frame(remote, A, None, 60),
            Ok(vec![
                (2, Egress::Untagged),
                (4, Egress::Untagged),
                (11, Egress::Untagged),
            ]),
        );
    }

    #[test]
    fn a_port_without_security_learns_its_sources() {
        let mut s = Switch::default();
        let open = PortConfig {
            security: false,
            ..port(1, Some(A), VlanMode::Native)
        };
        s.add_port(1, open, Duration::ZERO).expect("1");
        s.add_port(2, port(1, Some(B), VlanMode::Native), Duration::ZERO)
            .expect("2");
        // Another source is switched, and learned on port 1.
        check(
            &mut s,
            0,
            1,
            &frame(B, R, None, 60),
            Ok(vec![(2, Egress::Untagged)]),
        );
        check(
            &mut s,
            0,
            2,
            &frame(R, B, None, 60),
            Ok(vec![(1, Egress::Untagged)]),
        );
        // The port's own address is still its static entry.
        check(
            &mut s,
            0,
            2,
            &frame(A, B, None, 60),
            Ok(vec![(1, Egress::Untagged)]),
        );
        assert_eq!(s.counters(1).expect("1").drops(DropReason::Spoofed), 0);
    }
}
