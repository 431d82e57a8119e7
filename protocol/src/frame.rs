//! Framing: every message is one JSON object followed by a NUL byte.
//!
//! The decoder is sans-IO so that the blocking client and the async helper share it: feed it the
//! bytes you read, take complete frames out. It never holds more than the limit plus one read.

use thiserror::Error;

/// Default limit of one message, NUL excluded (DESIGN.md §6: 64 KiB).
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// A framing failure. After one of these the stream is out of step and must be closed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A message (or the unterminated rest of the stream) is longer than the limit.
    #[error("message larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The peer closed the stream in the middle of a message (no NUL after it).
    #[error("stream ended inside a message ({pending} bytes without a terminating NUL)")]
    Truncated { pending: usize },
}

/// Splits a byte stream into NUL-terminated frames of at most `max` bytes each.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already known to contain no NUL.
    scanned: usize,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// The limit of one message.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether part of a message is buffered (bytes after the last complete frame).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete frame (without its NUL), `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.buf[self.scanned..].iter().position(|&b| b == 0) {
            Some(offset) => {
                let end = self.scanned + offset;
                if end > self.max {
                    return Err(FrameError::TooLarge { limit: self.max });
                }
                let mut frame: Vec<u8> = self.buf.drain(..=end).collect();
                frame.pop(); // the NUL
                self.scanned = 0;
                Ok(Some(frame))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    Err(FrameError::TooLarge { limit: self.max })
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Call at end of stream: an error if part of a message is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                pending: self.buf.len(),
            })
        }
    }
}

/// Encodes one message: the JSON text followed by a NUL. JSON text never contains a raw NUL
/// (serde_json escapes it inside strings), so the terminator is unambiguous.
pub fn encode(value: &serde_json::Value) -> Vec<u8> {
    // Serializing a `Value` to a Vec cannot fail (no I/O, keys are strings).
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut d = FrameDecoder::new(16);
        d.feed(b"{\"a\":1}\0{\"b\"");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(d.has_partial());
        d.feed(b":2}\0");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(d.finish().is_ok());
    }

    #[test]
    fn refuses_oversized_with_or_without_nul() {
        let mut d = FrameDecoder::new(4);
        d.feed(b"12345");
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 4 }));
        let mut d = FrameDecoder::new(4);
        d.feed(b"12345\0");
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 4 }));
        let mut d = FrameDecoder::new(4);
        d.feed(b"1234\0");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"1234");
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut d = FrameDecoder::new(64);
        d.feed(b"{\"method\":");
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated { pending: 10 }));
    }

    #[test]
    fn encode_escapes_nul_in_strings() {
        let v = serde_json::json!({"s": "a\u{0}b"});
        let bytes = encode(&v);
        assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 1);
        assert_eq!(bytes.last(), Some(&0));
    }
}
