//! What a client submits (`POST /v1/jobs`), parsed into checked values.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The submit body exactly as the client sent it.
///
/// The envelope is allowlisted: any other top-level field (`reply_to`, `correlation_id`,
/// `user`, ...) is refused, because broker properties are set by the gatekeeper alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub kind: String,
    pub payload: Value,
    /// Any integral JSON number (`6` or `6.0`, as JSON Schema's `integer` allows); the range
    /// is checked by [`Priority::new`].
    #[serde(default, deserialize_with = "integral")]
    pub priority: Option<i64>,
    /// Optional fields are left out when not wanted; `null` is refused like any wrong type.
    #[serde(default, deserialize_with = "present")]
    pub sequence: Option<RawSequence>,
    #[serde(default, deserialize_with = "present")]
    pub idempotency_key: Option<String>,
    /// Run it at this time (RFC 3339), not before. Not with `delay_s`.
    #[serde(default, deserialize_with = "present")]
    pub not_before: Option<String>,
    /// Run it this many seconds from now, not before. Not with `not_before`.
    #[serde(default, deserialize_with = "present_integral_u64")]
    pub delay_s: Option<u64>,
    /// Ids of this client's jobs to wait for (in a workflow's step: names of its steps).
    #[serde(default, deserialize_with = "present")]
    pub after: Option<Vec<String>>,
    /// What to do when a parent did not succeed (default `cancel`).
    #[serde(default, deserialize_with = "present")]
    pub on_parent_failure: Option<crate::envelope::ParentFailure>,
}

fn present_integral_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    integral_u64(d).map(Some)
}

/// When a submitted job may run: `not_before` (RFC 3339) or `delay_s` from `now_ms`, as unix
/// milliseconds; `None` for at once (no time given, or one already past).
///
/// # Errors
/// Both given, or a `not_before` that is not an RFC 3339 date-time.
pub fn not_before_ms(req: &SubmitRequest, now_ms: u64) -> Result<Option<u64>, &'static str> {
    let at = match (&req.not_before, req.delay_s) {
        (Some(_), Some(_)) => return Err("send not_before or delay_s, not both"),
        (None, None) => return Ok(None),
        (None, Some(s)) => now_ms.saturating_add(s.saturating_mul(1000)),
        (Some(t), None) => parse_rfc3339_ms(t).ok_or("not_before must be an RFC 3339 date-time")?,
    };
    Ok((at > now_ms).then_some(at))
}

/// Unix milliseconds of an RFC 3339 date-time (`2026-11-30T09:00:00Z`, any offset, any
/// fraction); a leap second (`:60`) counts as the second before the next minute. Times before
/// 1970 are 0.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    Some(u64::try_from(ms).unwrap_or(0))
}

/// An RFC 3339 UTC date-time of unix milliseconds (`2026-11-30T09:00:00.250Z`).
pub fn format_rfc3339_ms(ms: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// An optional field that, when present, holds a value (not `null`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `sequence` as sent; turned into [`Sequence`] by [`Sequence::parse`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSequence {
    pub key: String,
    #[serde(deserialize_with = "integral_u64")]
    pub number: u64,
}

/// A JSON number with no fractional part (`3` or `3.0`) as an `i64`.
fn whole(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f <= i64::MAX as f64)
            .map(|f| f as i64)
    })
}

fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    whole(&n).map(Some).ok_or_else(|| serde::de::Error::custom("expected an integer"))
}

fn integral_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| whole(&n).and_then(|i| u64::try_from(i).ok()))
        .ok_or_else(|| serde::de::Error::custom("expected a whole number of at least 0"))
}

/// A message priority, 0..=9 (9 highest), as the job queues declare `x-max-priority = 9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    pub const MAX: Priority = Priority(9);

    /// # Errors
    /// When `p` is above 9.
    pub fn new(p: u8) -> Result<Self, &'static str> {
        if p <= Self::MAX.0 { Ok(Self(p)) } else { Err("priority must be between 0 and 9") }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Priority {
    type Error = &'static str;
    fn try_from(p: u8) -> Result<Self, Self::Error> {
        Self::new(p)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

/// A position in a per-key sequence: numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    key: String,
    number: u64,
}

impl Sequence {
    /// Longest sequence key accepted.
    pub const MAX_KEY_LEN: usize = 128;
    /// Highest sequence number: 2^53 - 1, the integers every JSON parser reads exactly (a
    /// JavaScript client could not even write the next one).
    pub const MAX_NUMBER: u64 = (1 << 53) - 1;

    /// # Errors
    /// When the key is empty, too long or not printable ASCII without spaces, or the number is 0.
    pub fn parse(raw: RawSequence) -> Result<Self, &'static str> {
        if raw.key.is_empty() || raw.key.len() > Self::MAX_KEY_LEN {
            return Err("sequence key must be 1 to 128 characters");
        }
        if !raw.key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("sequence key must be printable ASCII without spaces");
        }
        if raw.number == 0 {
            return Err("sequence numbers start at 1");
        }
        if raw.number > Self::MAX_NUMBER {
            return Err("sequence numbers are at most 2^53 - 1 (9007199254740991)");
        }
        Ok(Self { key: raw.key, number: raw.number })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key as storage keeps it: in `client`'s own namespace, so that two clients' keys of
    /// the same name are two sequences (see [`owned_key`]).
    pub fn owned_key(&self, client: &str) -> String {
        owned_key(client, &self.key)
    }

    pub fn number(&self) -> u64 {
        self.number
    }
}

/// A client's name for something it owns (a sequence key, a ledger account) as the worker
/// stores it: `<client> U+001F <name>`. Neither part can contain U+001F (client identities and
/// sequence keys refuse control characters), so every pair maps to its own key, and nothing a
/// client names can reach another client's data.
pub fn owned_key(client: &str, name: &str) -> String {
    format!("{client}\u{1f}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_numbers_are_integers_as_json_schema_says() {
        let r: SubmitRequest = serde_json::from_str(
            r#"{"kind":"k","payload":{},"priority":6.0,"sequence":{"key":"a","number":3.0}}"#,
        )
        .unwrap();
        assert_eq!((r.priority, r.sequence.unwrap().number), (Some(6), 3));
        assert!(
            serde_json::from_str::<SubmitRequest>(r#"{"kind":"k","payload":{},"priority":6.5}"#).is_err()
        );
        let r: SubmitRequest = serde_json::from_str(r#"{"kind":"k","payload":{},"priority":300}"#).unwrap();
        assert_eq!(r.priority, Some(300), "out of range is the gatekeeper's 422, not a parse error");
    }

    #[test]
    fn optional_fields_are_left_out_not_null() {
        let r: SubmitRequest = serde_json::from_str(r#"{"kind":"k","payload":{}}"#).unwrap();
        assert_eq!((r.priority, r.sequence.is_none(), r.idempotency_key), (None, true, None));
        for field in ["priority", "sequence", "idempotency_key"] {
            let body = format!(r#"{{"kind":"k","payload":{{}},"{field}":null}}"#);
            assert!(serde_json::from_str::<SubmitRequest>(&body).is_err(), "{field}: null accepted");
        }
    }

    #[test]
    fn a_job_runs_at_not_before_or_after_delay_s_and_at_once_when_that_is_past() {
        let req = |body: &str| serde_json::from_str::<SubmitRequest>(body).unwrap();
        let now = parse_rfc3339_ms("2026-11-30T09:00:00Z").unwrap();
        let at = |b: &str| not_before_ms(&req(b), now);
        assert_eq!(at(r#"{"kind":"k","payload":{}}"#), Ok(None));
        assert_eq!(at(r#"{"kind":"k","payload":{},"delay_s":90}"#), Ok(Some(now + 90_000)));
        assert_eq!(at(r#"{"kind":"k","payload":{},"delay_s":0}"#), Ok(None));
        // 09:00:00.5 UTC: half a second from now.
        assert_eq!(
            at(r#"{"kind":"k","payload":{},"not_before":"2026-11-30T10:00:00.5+01:00"}"#),
            Ok(Some(now + 500))
        );
        assert_eq!(
            at(r#"{"kind":"k","payload":{},"not_before":"2026-11-30T08:59:59Z"}"#),
            Ok(None),
            "past: at once"
        );
        assert!(at(r#"{"kind":"k","payload":{},"not_before":"tomorrow"}"#).is_err());
        assert!(at(r#"{"kind":"k","payload":{},"not_before":"2026-11-30T09:00:01Z","delay_s":1}"#).is_err());
        assert_eq!(format_rfc3339_ms(now + 250), "2026-11-30T09:00:00.25Z");
    }

    #[test]
    fn envelope_fields_are_allowlisted() {
        let err =
            serde_json::from_str::<SubmitRequest>(r#"{"kind":"vault.put","payload":{},"reply_to":"evil"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("reply_to"), "{err}");
    }

    #[test]
    fn sequence_rules() {
        let raw = |key: &str, number| RawSequence { key: key.into(), number };
        assert!(Sequence::parse(raw("acct-1", 1)).is_ok());
        assert!(Sequence::parse(raw("acct-1", 0)).is_err());
        assert!(Sequence::parse(raw("", 1)).is_err());
        assert!(Sequence::parse(raw("a b", 1)).is_err());
        assert!(Sequence::parse(raw(&"k".repeat(129), 1)).is_err());
        assert!(Sequence::parse(raw("k", Sequence::MAX_NUMBER)).is_ok());
        assert!(
            Sequence::parse(raw("k", Sequence::MAX_NUMBER + 1)).is_err(),
            "storage and JSON clients stop at 2^53 - 1"
        );
    }

    #[test]
    fn priority_bounds() {
        assert_eq!(Priority::new(9).unwrap().get(), 9);
        assert!(Priority::new(10).is_err());
    }
}
