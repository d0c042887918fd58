//! Job identifiers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job id: 32 lowercase hex digits (128 bits).
///
/// The gatekeeper mints them (see its `ids` module); everyone else only parses them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

/// A string that is not a job id.
#[derive(Debug, thiserror::Error)]
#[error("a job id is 32 lowercase hex digits")]
pub struct InvalidJobId;

impl JobId {
    /// Length of the id in hex digits.
    pub const LEN: usize = 32;

    /// Builds an id from its 16 raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(crate::hex::encode(&bytes))
    }

    /// Parses an id.
    ///
    /// # Errors
    /// When `s` is not exactly 32 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, InvalidJobId> {
        let ok = s.len() == Self::LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok { Ok(Self(s.to_owned())) } else { Err(InvalidJobId) }
    }

    /// The raw bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        crate::hex::decode(&self.0).and_then(|b| b.try_into().ok()).unwrap_or([0; 16])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidJobId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 0xab];
        let id = JobId::from_bytes(bytes);
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(JobId::parse(id.as_str()).unwrap().to_bytes(), bytes);
    }

    #[test]
    fn rejects_non_ids() {
        for bad in ["", "abc", &"A".repeat(32), &"g".repeat(32), &"0".repeat(33)] {
            assert!(JobId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
