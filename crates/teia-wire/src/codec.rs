//! The JSON-lines codec: one UTF-8 JSON object per `\n`-terminated line, at most
//! [`MAX_LINE`] bytes including the `\n` (PROTOCOL.md section 1).
//!
//! [`LineDecoder`] is a push decoder with no I/O: the caller hands it whatever bytes a read
//! returned, cut anywhere, and takes complete lines out. Its buffer never holds more than
//! [`MAX_LINE`] bytes: a longer line is reported once as [`DecodeError::LineTooLong`] as soon
//! as it crosses the cap, and its remaining bytes are skipped up to the next `\n`.

use serde::Serialize;
use serde_json::{Map, Value};

/// The largest line allowed on any teia or course link, including its terminating `\n`.
pub const MAX_LINE: usize = 32_768;

/// Why a line could not be decoded into a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The line is longer than the cap; its bytes are being discarded up to the next `\n`.
    #[error("line longer than {limit} bytes")]
    LineTooLong {
        /// The cap that was exceeded, in bytes including the `\n`.
        limit: usize,
    },
    /// The line is not valid UTF-8.
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    /// The line is not valid JSON.
    #[error("line is not valid JSON: {0}")]
    InvalidJson(String),
    /// The line is valid JSON but not an object.
    #[error("line is JSON but not an object")]
    NotAnObject,
}

/// Why a message could not be encoded as a line.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed [`MAX_LINE`].
    #[error("encoded message is {len} bytes, over the {limit}-byte line limit")]
    TooLong {
        /// The encoded length including the `\n`.
        len: usize,
        /// The cap.
        limit: usize,
    },
    /// serde_json refused the value.
    #[error("cannot encode message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Splits a byte stream into lines of at most `limit` bytes (including the `\n`).
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    limit: usize,
    discarding: bool,
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self::new(MAX_LINE)
    }
}

impl LineDecoder {
    /// A decoder for lines of at most `limit` bytes including the `\n` (`limit` >= 1).
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit: limit.max(1),
            discarding: false,
        }
    }

    /// Bytes currently held back waiting for the end of a line; never more than the limit.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True when the bytes held back are only whitespace (or there are none).
    pub fn is_idle(&self) -> bool {
        !self.discarding && self.buf.iter().all(u8::is_ascii_whitespace)
    }

    /// Takes the next complete line out of `input`, advancing `input` past the bytes used.
    ///
    /// Returns `None` once `input` is used up with no further complete line (a partial line
    /// is kept inside the decoder for the next call). The returned line has its `\n` and an
    /// optional `\r` before it removed. Returns `Some(Err(LineTooLong))` once per oversized
    /// line, at the moment it crosses the cap.
    pub fn decode(&mut self, input: &mut &[u8]) -> Option<Result<Vec<u8>, DecodeError>> {
        loop {
            if input.is_empty() {
                return None;
            }
            let newline = input.iter().position(|&b| b == b'\n');
            if self.discarding {
                match newline {
                    Some(pos) => {
                        *input = input.get(pos + 1..).unwrap_or_default();
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        *input = &[];
                        return None;
                    }
                }
            }
            // Content allowed before the `\n`: the cap counts the `\n` itself.
            let room = self.limit - 1 - self.buf.len();
            match newline {
                Some(pos) if pos <= room => {
                    let (head, rest) = input.split_at(pos);
                    *input = rest.get(1..).unwrap_or_default();
                    let mut line = std::mem::take(&mut self.buf);
                    line.extend_from_slice(head);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Some(Ok(line));
                }
                Some(pos) => {
                    self.buf.clear();
                    *input = input.get(pos + 1..).unwrap_or_default();
                    return Some(Err(DecodeError::LineTooLong { limit: self.limit }));
                }
                None if input.len() <= room => {
                    self.buf.extend_from_slice(input);
                    *input = &[];
                    return None;
                }
                None => {
                    self.buf.clear();
                    self.discarding = true;
                    *input = &[];
                    return Some(Err(DecodeError::LineTooLong { limit: self.limit }));
                }
            }
        }
    }

    /// At end of stream: the unterminated bytes held back, if any, as a final line.
    ///
    /// Course clients sometimes send one request without a `\n` and then close their side.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.discarding {
            self.discarding = false;
            return None;
        }
        let line = std::mem::take(&mut self.buf);
        (!line.iter().all(u8::is_ascii_whitespace)).then_some(line)
    }

    /// The held-back bytes as a request, when they already form one whole JSON object.
    ///
    /// Liberal reading for clients that send a request without its `\n` and wait for the
    /// answer with the connection still open. Leaves the decoder empty when it succeeds.
    pub fn take_unterminated_object(&mut self) -> Option<Map<String, Value>> {
        if self.discarding || self.buf.trim_ascii_end().last() != Some(&b'}') {
            return None;
        }
        let object = parse_object(&self.buf).ok()?;
        self.buf.clear();
        Some(object)
    }
}

/// True when a line has nothing but whitespace.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Parses one line as a JSON object.
pub fn parse_object(line: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::InvalidUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DecodeError::NotAnObject),
        Err(e) => Err(DecodeError::InvalidJson(e.to_string())),
    }
}

/// Encodes a message as one line, `\n` included, refusing anything over [`MAX_LINE`].
pub fn encode_line<T: Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = serde_json::to_vec(message)?;
    out.push(b'\n');
    if out.len() > MAX_LINE {
        return Err(EncodeError::TooLong {
            len: out.len(),
            limit: MAX_LINE,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(
        decoder: &mut LineDecoder,
        mut input: &[u8],
    ) -> Vec<Result<Vec<u8>, DecodeError>> {
        let mut out = Vec::new();
        while let Some(frame) = decoder.decode(&mut input) {
            out.push(frame);
        }
        out
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let mut d = LineDecoder::default();
        let frames = decode_all(&mut d, b"{\"a\":1}\r\n{\"b\":2}\n{\"c\"");
        assert_eq!(
            frames,
            vec![Ok(b"{\"a\":1}".to_vec()), Ok(b"{\"b\":2}".to_vec())]
        );
        assert_eq!(d.buffered(), 4);
        let frames = decode_all(&mut d, b":3}\n");
        assert_eq!(frames, vec![Ok(b"{\"c\":3}".to_vec())]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn line_of_exactly_the_limit_is_accepted() {
        let mut d = LineDecoder::new(8);
        assert_eq!(
            decode_all(&mut d, b"1234567\n"),
            vec![Ok(b"1234567".to_vec())]
        );
        assert_eq!(
            decode_all(&mut d, b"12345678\nok\n"),
            vec![
                Err(DecodeError::LineTooLong { limit: 8 }),
                Ok(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_line_is_reported_once_and_decoding_resumes() {
        let mut d = LineDecoder::new(16);
        let mut frames = decode_all(&mut d, &[b'x'; 40]);
        assert_eq!(frames, vec![Err(DecodeError::LineTooLong { limit: 16 })]);
        assert_eq!(d.buffered(), 0);
        frames = decode_all(&mut d, &[b'x'; 40]);
        assert!(frames.is_empty());
        frames = decode_all(&mut d, b"xx\n{}\n");
        assert_eq!(frames, vec![Ok(b"{}".to_vec())]);
    }

    #[test]
    fn typed_errors_for_bad_content() {
        assert_eq!(parse_object(b"\xff\xfe"), Err(DecodeError::InvalidUtf8));
        assert_eq!(parse_object(b"[1,2]"), Err(DecodeError::NotAnObject));
        assert_eq!(parse_object(b"\"str\""), Err(DecodeError::NotAnObject));
        assert!(matches!(
            parse_object(b"{\"a\":"),
            Err(DecodeError::InvalidJson(_))
        ));
        assert!(parse_object(b" {\"a\":1} ").is_ok());
    }

    #[test]
    fn finish_returns_unterminated_request() {
        let mut d = LineDecoder::default();
        assert!(decode_all(&mut d, b"{\"type\":\"DISCOVER\"}").is_empty());
        assert_eq!(d.finish(), Some(b"{\"type\":\"DISCOVER\"}".to_vec()));
        assert_eq!(d.finish(), None);
    }

    #[test]
    fn unterminated_object_is_taken_only_when_complete() {
        let mut d = LineDecoder::default();
        decode_all(&mut d, b"{\"type\":\"DISC");
        assert!(d.take_unterminated_object().is_none());
        decode_all(&mut d, b"OVER\"}  ");
        assert!(d.take_unterminated_object().is_some());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn encode_refuses_oversized() {
        let big = "x".repeat(MAX_LINE);
        assert!(matches!(
            encode_line(&big),
            Err(EncodeError::TooLong { .. })
        ));
        assert_eq!(
            encode_line(&serde_json::json!({"a":1})).unwrap(),
            b"{\"a\":1}\n"
        );
    }

    fn line_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40),
            1 => proptest::collection::vec(Just(b'y'), 60..200),
        ]
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_the_same(
            lines in proptest::collection::vec(line_strategy(), 0..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            const LIMIT: usize = 64;
            let mut stream = Vec::new();
            for line in &lines {
                stream.extend_from_slice(line);
                stream.push(b'\n');
            }
            let mut whole = LineDecoder::new(LIMIT);
            let expected = decode_all(&mut whole, &stream);

            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut chunked = LineDecoder::new(LIMIT);
            let mut got = Vec::new();
            for pair in points.windows(2) {
                got.extend(decode_all(&mut chunked, &stream[pair[0]..pair[1]]));
                prop_assert!(chunked.buffered() < LIMIT);
            }
            prop_assert_eq!(&got, &expected);

            let oversized = lines.iter().filter(|l| l.len() + 1 > LIMIT).count();
            let too_long = expected.iter().filter(|f| f.is_err()).count();
            prop_assert_eq!(oversized, too_long);
            for (line, frame) in lines.iter().filter(|l| l.len() < LIMIT).zip(expected.iter().filter(|f| f.is_ok())) {
                let mut want = line.clone();
                if want.last() == Some(&b'\r') { want.pop(); }
                prop_assert_eq!(frame.as_ref().ok(), Some(&want));
            }
        }
    }
}

/// Why a stream of JSON values with no delimiters could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// A value grew past the reader's limit.
    #[error("message longer than {limit} bytes")]
    TooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The bytes are not JSON.
    #[error("not a JSON object: {0}")]
    Malformed(String),
}

/// Finds whole JSON values in a byte stream with no delimiters between them, as the seeds'
/// programs write them (seeds 003 and 004): cut anywhere, whitespace between values allowed.
/// It holds at most its limit plus one read of bytes: a value still incomplete past the limit
/// is [`ObjectError::TooLong`]. An object or array is scanned once, byte by byte, for its end
/// (however its bytes are cut) and parsed when whole, its syntax checked on the way each time
/// it doubles (so bytes arriving one at a time cost linear time, and garbage is refused as
/// soon as it comes); a bare value (a number, a string) of more than [`MAX_BARE_VALUE`] bytes
/// is refused as malformed.
#[derive(Debug)]
pub struct ObjectReader {
    buffer: Vec<u8>,
    limit: usize,
    /// Bytes of the current object or array already scanned.
    scanned: usize,
    /// Brackets open at `scanned`.
    depth: usize,
    /// `scanned` is inside a string.
    in_string: bool,
    /// The byte before `scanned` was a backslash in a string.
    escaped: bool,
    /// Bytes of the current object when its syntax was last checked.
    checked: usize,
}

/// Bytes of a value that is not an object or an array, at most.
pub const MAX_BARE_VALUE: usize = 64;

impl ObjectReader {
    /// A reader of values of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buffer: Vec::new(),
            limit,
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            checked: 0,
        }
    }

    /// Where the object or array at the start of the buffer ends, scanning only what was not
    /// scanned before.
    fn scan(&mut self) -> Option<usize> {
        while let Some(&byte) = self.buffer.get(self.scanned) {
            self.scanned += 1;
            if self.in_string {
                match (self.escaped, byte) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(self.scanned);
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn restart(&mut self) {
        self.scanned = 0;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.checked = 0;
    }

    /// Adds bytes read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Takes the bytes after the values read (raw file bytes after a seed's answer).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// The next whole value, if one arrived.
    pub fn next_object(&mut self) -> Option<Result<Value, ObjectError>> {
        if self.scanned == 0 {
            let start = self
                .buffer
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buffer.len());
            self.buffer.drain(..start);
        }
        let first = *self.buffer.first()?;
        if matches!(first, b'{' | b'[') {
            let Some(end) = self.scan() else {
                if self.buffer.len() > self.limit {
                    return Some(Err(ObjectError::TooLong { limit: self.limit }));
                }
                // Bytes that can no longer be JSON are said at once, not when the object would
                // end: checked each time the object has doubled, so at most twice its length.
                if self.buffer.len() >= 2 * self.checked {
                    self.checked = self.buffer.len();
                    let mut stream =
                        serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
                    if let Some(Err(e)) = stream.next() {
                        if !e.is_eof() {
                            self.buffer.clear();
                            self.restart();
                            return Some(Err(ObjectError::Malformed(e.to_string())));
                        }
                    }
                }
                return None;
            };
            self.restart();
            let value = serde_json::from_slice::<Value>(self.buffer.get(..end).unwrap_or_default());
            return Some(match value {
                Ok(value) => {
                    self.buffer.drain(..end);
                    Ok(value)
                }
                Err(e) => {
                    self.buffer.clear();
                    Err(ObjectError::Malformed(e.to_string()))
                }
            });
        }
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                let used = stream.byte_offset();
                self.buffer.drain(..used);
                Some(Ok(value))
            }
            Some(Err(e)) if e.is_eof() => (self.buffer.len() > MAX_BARE_VALUE).then(|| {
                self.buffer.clear();
                Err(ObjectError::Malformed("not an object".to_owned()))
            }),
            Some(Err(e)) => {
                self.buffer.clear();
                Some(Err(ObjectError::Malformed(e.to_string())))
            }
            None => None,
        }
    }
}
