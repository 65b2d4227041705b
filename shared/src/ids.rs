//! Identifiers that cross role boundaries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Number of agent partitions. Agents hash into a fixed partition; a partition is owned by one
/// coordinator at a time, which keeps per-agent message order without global locks.
pub const PARTITIONS: u16 = 256;

/// An OpAMP `instance_uid`: exactly 16 bytes, shown as a canonical UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceUid(pub [u8; 16]);

impl InstanceUid {
    /// A fresh UUID v7, as the spec recommends for server-assigned UIDs.
    pub fn new_v7() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// A fresh UUID v7 in `partition`, so a UID the server assigns stays with the coordinator
    /// that owns the agent's current partition. Only the last (random) byte is chosen: FNV-1a's
    /// last step multiplies by an odd number, a bijection modulo 256, so exactly one of the
    /// 256 values of that byte lands in each partition.
    pub fn new_v7_in(partition: u16) -> Self {
        let mut uid = Self::new_v7();
        for b in 0..=u8::MAX {
            uid.0[15] = b;
            if uid.partition() == partition {
                break;
            }
        }
        uid
    }

    /// `None` unless `bytes` is exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The partition this agent belongs to (FNV-1a over the bytes; stable across versions).
    pub fn partition(&self) -> u16 {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.0 {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h % u32::from(PARTITIONS)) as u16
    }
}

impl fmt::Display for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceUid({self})")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid instance uid: expected a UUID")]
pub struct InvalidUid;

impl FromStr for InstanceUid {
    type Err = InvalidUid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim())
            .map(|u| Self(*u.as_bytes()))
            .map_err(|_| InvalidUid)
    }
}

impl Serialize for InstanceUid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstanceUid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Names a gateway process (unique per process start).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct GatewayId(pub String);

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_round_trips_through_text() {
        let uid = InstanceUid::new_v7();
        let back: InstanceUid = uid.to_string().parse().expect("parses");
        assert_eq!(uid, back);
        assert!(InstanceUid::from_slice(&[1; 15]).is_none());
    }

    #[test]
    fn new_uids_land_in_the_asked_partition() {
        for p in [0, 1, 17, 255] {
            for _ in 0..20 {
                assert_eq!(InstanceUid::new_v7_in(p).partition(), p);
            }
        }
    }

    #[test]
    fn partitions_spread() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            seen.insert(InstanceUid::new_v7().partition());
        }
        assert!(seen.len() > 200, "only {} partitions used", seen.len());
        assert!(seen.iter().all(|p| *p < PARTITIONS));
    }
}
