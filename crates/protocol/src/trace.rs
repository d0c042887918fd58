//! W3C trace context (`traceparent`), so that one request can be followed from the client's
//! log through the gatekeeper's to the worker's: the trace id travels inside the vouched job.

use ring::rand::{SecureRandom, SystemRandom};

use crate::hex;

/// A trace id and this hop's span id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// 32 lowercase hex digits, never all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits: the span this hop starts.
    pub span_id: String,
    /// The client's span this hop continues (from its `traceparent`), if it sent one.
    pub parent_id: Option<String>,
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    // Without randomness a fixed non-zero id still keeps the header valid.
    if SystemRandom::new().fill(&mut raw).is_err() || raw.iter().all(|b| *b == 0) {
        raw[0] = 1;
    }
    hex::encode(&raw)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

impl Trace {
    /// The client's trace, continued with a new span of ours: from a `traceparent` header
    /// (`00-<trace id>-<parent id>-<flags>`), or `None` when it is not a valid one.
    pub fn continue_from(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (Some(version), Some(trace_id), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let valid = is_hex(version, 2) || version == "00";
        (valid && version != "ff" && is_hex(trace_id, 32) && is_hex(parent, 16) && flags.len() == 2).then(
            || Self {
                trace_id: trace_id.to_owned(),
                span_id: random_hex(8),
                parent_id: Some(parent.to_owned()),
            },
        )
    }

    /// A new trace (the client sent none).
    pub fn fresh() -> Self {
        Self { trace_id: random_hex(16), span_id: random_hex(8), parent_id: None }
    }

    /// The `traceparent` header for this hop (sampled).
    pub fn header(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_continued_and_anything_else_starts_afresh() {
        let t = Trace::continue_from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert!(t.header().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Trace::continue_from(bad), None, "{bad}");
        }
        let fresh = Trace::fresh();
        assert!(is_hex(&fresh.trace_id, 32) && is_hex(&fresh.span_id, 16));
    }
}
