//! ZeroMQ multipart framing of requests and replies.
//!
//! The server's ROUTER socket receives `[identity, uid, op, payload_1, ..., payload_n]`:
//! - `identity`: the peer routing id added by ROUTER (opaque; also the affinity key);
//! - `uid`: msgpack int from a per-client counter starting at 0 (`00`, `01`, ..., `cd 01 00`
//!   for 256), used by the client to match out-of-order replies;
//! - `op`: msgpack int (legacy id) or str (operation name), see [`crate::decode_op`];
//! - one frame per payload parameter, each its own msgpack document.
//!
//! Replies are `[identity, uid, op]` when the result is `None`, otherwise
//! `[identity, uid, op, response]`. `uid` and `op` are echoed **byte-for-byte** as received
//! (never re-encoded), so [`RequestFrames::reply_prefix`] returns the received slices.
//!
//! Stream control (only `subscribe_kv_events`): the client sends `[uid, b"", b"ack"]` to grant
//! one more batch or `[uid, b"", b"cancel"]` to cancel; through ROUTER that is
//! `[identity, uid, b"", body]`. An **empty op frame marks a control frame**
//! ([`RequestFrames::is_control`]); a stream ends with a bare `[identity, uid, op]` reply.
//!
//! Invariants: parsing never copies frame contents and never panics; a message with fewer
//! than three frames is [`ProtoError::TooFewFrames`].

use crate::error::ProtoError;
use crate::reader::{Path, Reader};

/// A stream control message sent by a client on an open stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamControl {
    /// `b"ack"`: the client grants one more batch.
    Ack,
    /// `b"cancel"`: the client cancels the stream.
    Cancel,
}

/// The frames of one message received on the ROUTER socket, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFrames<'a> {
    /// Peer routing id.
    pub identity: &'a [u8],
    /// Request uid frame (msgpack int), to echo verbatim.
    pub uid: &'a [u8],
    /// Op frame (msgpack int or str), to echo verbatim; empty for a control frame.
    pub op_frame: &'a [u8],
    /// Payload frames (for a control frame: the control body).
    pub payloads: &'a [&'a [u8]],
}

impl<'a> RequestFrames<'a> {
    /// Splits a received multipart message into its parts.
    ///
    /// # Errors
    /// [`ProtoError::TooFewFrames`] with fewer than three frames.
    pub fn parse(frames: &'a [&'a [u8]]) -> Result<Self, ProtoError> {
        match frames {
            [identity, uid, op_frame, payloads @ ..] => Ok(Self {
                identity,
                uid,
                op_frame,
                payloads,
            }),
            _ => Err(ProtoError::TooFewFrames { got: frames.len() }),
        }
    }

    /// Whether this is a stream control frame (empty op frame).
    #[must_use]
    pub fn is_control(&self) -> bool {
        self.op_frame.is_empty()
    }

    /// The control message of a control frame: `Ok(None)` for an ordinary request.
    ///
    /// # Errors
    /// A decode error for a control frame whose body is not exactly one `ack` / `cancel` frame.
    pub fn stream_control(&self) -> Result<Option<StreamControl>, ProtoError> {
        if !self.is_control() {
            return Ok(None);
        }
        match self.payloads {
            [b"ack"] => Ok(Some(StreamControl::Ack)),
            [b"cancel"] => Ok(Some(StreamControl::Cancel)),
            _ => Err(ProtoError::Decode {
                path: "control".to_owned(),
                reason: "expected a single frame b\"ack\" or b\"cancel\"".to_owned(),
            }),
        }
    }

    /// The first three reply frames `[identity, uid, op]`, echoed verbatim. Send them alone for
    /// a `None` result, or followed by one response frame.
    #[must_use]
    pub fn reply_prefix(&self) -> [&'a [u8]; 3] {
        [self.identity, self.uid, self.op_frame]
    }
}

/// Decodes a uid frame (for logging; replies echo the raw frame instead).
///
/// # Errors
/// A decode error unless the frame is exactly one non-negative msgpack int.
pub fn decode_uid(frame: &[u8]) -> Result<u64, ProtoError> {
    let path = Path::Root("uid");
    let mut r = Reader::new(frame);
    let uid = r.read_u64(&path)?;
    r.finish(&path)?;
    Ok(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_control() {
        let msg: [&[u8]; 4] = [b"id", &[0x00], &[0x15], b"x"];
        let f = RequestFrames::parse(&msg).expect("must succeed");
        assert_eq!(f.payloads, &[&b"x"[..]]);
        assert!(!f.is_control());
        assert_eq!(f.stream_control(), Ok(None));
        assert_eq!(f.reply_prefix(), [&b"id"[..], &[0x00], &[0x15]]);

        let ack: [&[u8]; 4] = [b"id", &[0x01], b"", b"ack"];
        let f = RequestFrames::parse(&ack).expect("must succeed");
        assert!(f.is_control());
        assert_eq!(f.stream_control(), Ok(Some(StreamControl::Ack)));
        let cancel: [&[u8]; 4] = [b"id", &[0x01], b"", b"cancel"];
        assert_eq!(
            RequestFrames::parse(&cancel)
                .expect("must succeed")
                .stream_control(),
            Ok(Some(StreamControl::Cancel))
        );
        let bad: [&[u8]; 3] = [b"id", &[0x01], b""];
        assert!(
            RequestFrames::parse(&bad)
                .expect("must succeed")
                .stream_control()
                .is_err()
        );

        let short: [&[u8]; 2] = [b"id", &[0x00]];
        assert_eq!(
            RequestFrames::parse(&short),
            Err(ProtoError::TooFewFrames { got: 2 })
        );
    }

    #[test]
    fn uid_golden() {
        assert_eq!(decode_uid(&[0xcd, 0x01, 0x00]), Ok(256));
        assert_eq!(decode_uid(&[0x00]), Ok(0));
        assert!(decode_uid(&[0xff]).is_err());
        assert!(decode_uid(&[0x00, 0x00]).is_err());
    }
}
