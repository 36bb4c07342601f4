//! A streaming `multipart/form-data` parser (RFC 7578 over RFC 2046's framing) that does not copy
//! a part's body: the bytes of a part come out as slices ([`Bytes::slice`]) of the chunks the
//! HTTP body arrived in, so an upload's file goes from hyper's read buffer to the file write
//! untouched. Only the small things are copied: each part's header block (at most
//! [`MAX_HEADER_BYTES`]) and, when a chunk edge cuts through what might be a boundary, the
//! fewer than `boundary + 4` bytes on either side of the edge that are compared against it.
//!
//! Memory: the parser holds one chunk of the body (a slice of it) plus at most a header block,
//! and the body it reads is bounded as a whole (`limit`, every byte counted: framing,
//! preamble, parts, epilogue) and in parts ([`MAX_PARTS`]). `multer` (used before) appended
//! every chunk to its own growing buffer and handed out pieces of that: a copy of every byte
//! into freshly allocated pages (docs/benchmarks.md, session 24).
//!
//! Framing (RFC 2046 § 5.1.1): an optional preamble, then `--boundary`, transport padding
//! (spaces and tabs), CRLF, a part's header lines, an empty line, its body; each later part
//! starts with `CRLF--boundary`; the last boundary is followed by `--` (the epilogue after it
//! is not read). Lines end in CRLF: a body framed with bare LFs is refused (never guessed at:
//! a bare LF is a file's own byte). A body that ends before the closing boundary is an error,
//! so a cut-off upload is never stored.
//!
//! Cancel safety: [`Multipart::next_part`] and [`Multipart::chunk`] keep all their state in
//! the parser between polls, so a future of either may be dropped and the call made again
//! (the upload races the bucket lookup against the next chunk).

use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// Longest boundary accepted (RFC 2046 allows 70; some clients use a little more).
pub const MAX_BOUNDARY: usize = 200;
/// Largest header block of one part (its header lines with their CRLFs, and the padding after
/// its boundary).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most header lines in one part.
pub const MAX_HEADERS: usize = 32;
/// Most parts in one body (the upload form has five fields).
pub const MAX_PARTS: usize = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// What is wrong with a multipart body.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the body ended before the closing boundary")]
    Incomplete,
    #[error("no boundary where one was expected")]
    NoBoundary,
    #[error("a boundary line has more than padding after it")]
    BadBoundaryLine,
    #[error("a part's headers are longer than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    #[error("a part has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("more than {MAX_PARTS} parts")]
    TooManyParts,
    #[error("malformed part header {0:?}")]
    BadHeader(String),
    /// Every byte of the body counts, whatever part it is in.
    #[error("the body is longer than {0} bytes")]
    TooLarge(u64),
    #[error("reading the body: {0}")]
    Body(BoxError),
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let mime: mime_guess::mime::Mime = content_type.parse().ok()?;
    if mime.type_() != mime_guess::mime::MULTIPART || mime.subtype() != "form-data" {
        return None;
    }
    let b = mime.get_param(mime_guess::mime::BOUNDARY)?.as_str();
    // RFC 2046's bchars (and printable ASCII beyond them, as clients send): never CR or LF.
    (!b.is_empty() && b.len() <= MAX_BOUNDARY && b.bytes().all(|c| (0x20..0x7f).contains(&c)))
        .then(|| b.to_string())
}

/// A part's headers: the form field's name, the file name and the declared type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub name: Option<String>,
    pub filename: Option<String>,
    /// The `Content-Type` header as sent (trimmed), if any.
    pub content_type: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the first boundary: bytes are discarded.
    Preamble,
    /// Right after a boundary: its padding and line end, or `--`, then the part's headers.
    Head,
    /// In a part's body.
    Body,
    /// The closing boundary was read.
    Done,
}

/// A streaming `multipart/form-data` parser over a body's chunks (see the module docs).
pub struct Multipart {
    body: Body,
    /// `CRLF--boundary`: what ends a part's body.
    delimiter: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
    /// Received bytes not yet parsed: a slice of a received chunk, or (`joint`) a small copy of
    /// the bytes on both sides of a chunk edge.
    buf: Bytes,
    /// When `buf` is such a copy: how many of its bytes came from before the edge, the chunk
    /// after the edge and how long the copy was. Once parsing is past the edge, `buf` is made
    /// a slice of that chunk again.
    joint: Option<(usize, Bytes, usize)>,
    /// A part's header block as it is gathered.
    head: Vec<u8>,
    state: State,
    /// The body ended (`None` from the stream).
    ended: bool,
    read: u64,
    limit: u64,
    parts: usize,
}

/// What one synchronous parsing step found.
enum Step {
    /// A part's headers (`Head` → `Body`).
    Part(Part),
    /// Bytes of the current part's body.
    Data(Bytes),
    /// The current part's body ended.
    PartEnd,
    /// The closing boundary.
    End,
    /// More of the body is needed.
    More,
}

impl Multipart {
    /// A parser of `body` framed by `boundary`, reading at most `limit` bytes of it.
    pub fn new<S, E>(body: S, boundary: &str, limit: u64) -> Multipart
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        let finder = memchr::memmem::Finder::new(&delimiter).into_owned();
        Multipart {
            body: Box::pin(body.map(|r| r.map_err(Into::into))),
            delimiter,
            finder,
            // The first boundary has no line end before it: one is supplied, so that the
            // preamble is scanned like a body.
            buf: Bytes::from_static(b"\r\n"),
            joint: None,
            head: Vec::new(),
            state: State::Preamble,
            ended: false,
            read: 0,
            limit,
            parts: 0,
        }
    }

    /// The next part's headers (the rest of the current part is skipped), or `None` after the
    /// closing boundary.
    pub async fn next_part(&mut self) -> Result<Option<Part>, Error> {
        loop {
            match self.step()? {
                Step::Part(p) => return Ok(Some(p)),
                Step::End => return Ok(None),
                Step::Data(_) | Step::PartEnd => {}
                Step::More => self.more().await?,
            }
        }
    }

    /// The next bytes of the current part's body (a slice of a received chunk), or `None` at
    /// its end (and before the first part, and after the last).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if self.state != State::Body {
                return Ok(None);
            }
            match self.step()? {
                Step::Data(d) => return Ok(Some(d)),
                Step::PartEnd => return Ok(None),
                Step::More => self.more().await?,
                Step::Part(_) | Step::End => unreachable!("a body step ends in the body"),
            }
        }
    }

    /// Reads and discards the rest of the body, at most `max` bytes (so that a refused
    /// client reads the answer rather than a reset connection).
    pub async fn drain(&mut self, max: u64) {
        let mut drained = 0u64;
        while drained <= max {
            match self.body.next().await {
                Some(Ok(c)) => drained += c.len() as u64,
                _ => break,
            }
        }
        self.ended = true;
        self.state = State::Done;
    }

    /// Waits for the body's next chunk and adds it to what is to be parsed.
    async fn more(&mut self) -> Result<(), Error> {
        if self.ended {
            return Err(Error::Incomplete);
        }
        match self.body.next().await {
            None => {
                self.ended = true;
                Ok(())
            }
            Some(Err(e)) => Err(Error::Body(e)),
            Some(Ok(chunk)) => {
                self.read += chunk.len() as u64;
                if self.read > self.limit {
                    return Err(Error::TooLarge(self.limit));
                }
                self.feed(chunk);
                Ok(())
            }
        }
    }

    /// Adds a chunk. Parsing asks for more only when `buf` is empty or (in a body) when all of
    /// it might be the start of the delimiter: then that remnant (shorter than the delimiter)
    /// and the chunk's first bytes are copied together, and the rest of the chunk is used in
    /// place once parsing is past the copy's remnant ([`Multipart::unjoin`]).
    fn feed(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if self.buf.is_empty() {
            self.buf = chunk;
            self.joint = None;
            return;
        }
        let before = self.buf.len();
        let take = chunk.len().min(self.delimiter.len());
        let mut joint = BytesMut::with_capacity(before + take);
        joint.extend_from_slice(&self.buf);
        joint.extend_from_slice(&chunk[..take]);
        self.buf = joint.freeze();
        self.joint = (take < chunk.len()).then(|| (before, chunk, before + take));
    }

    /// When parsing has passed the bytes of a joint copy that came from before the chunk
    /// edge, `buf` becomes a slice of the chunk again; and when the copy is used up, the rest
    /// of the chunk follows it.
    fn unjoin(&mut self) {
        if let Some((before, chunk, len)) = &self.joint {
            let at = len - self.buf.len();
            if at >= *before {
                self.buf = chunk.slice(at - before..);
                self.joint = None;
            }
        }
    }

    /// One parsing step on the bytes at hand (no waiting: a caller's future may be dropped at
    /// any `More`).
    fn step(&mut self) -> Result<Step, Error> {
        loop {
            self.unjoin();
            match self.state {
                State::Done => return Ok(Step::End),
                State::Head => return self.head_step(),
                State::Preamble | State::Body => {}
            }
            let in_body = self.state == State::Body;
            if self.buf.is_empty() {
                return self.need_more(in_body);
            }
            let data = match self.finder.find(&self.buf) {
                Some(0) => {
                    self.buf.advance(self.delimiter.len());
                    self.state = State::Head;
                    self.head.clear();
                    return Ok(Step::PartEnd);
                }
                // The bytes before it now, the delimiter at the next step.
                Some(at) => self.buf.split_to(at),
                None => {
                    let keep = partial_suffix(&self.buf, &self.delimiter);
                    if keep == self.buf.len() {
                        return self.need_more(in_body);
                    }
                    self.buf.split_to(self.buf.len() - keep)
                }
            };
            if in_body {
                return Ok(Step::Data(data));
            }
        }
    }

    /// `More`, or the error of a body that ended here.
    fn need_more(&self, in_body: bool) -> Result<Step, Error> {
        debug_assert!(
            self.joint.is_none(),
            "a joint copy is used up before more is read"
        );
        if !self.ended {
            Ok(Step::More)
        } else if in_body {
            Err(Error::Incomplete)
        } else {
            Err(Error::NoBoundary)
        }
    }

    /// After a boundary: `--` (the end), or padding, CRLF, header lines and an empty line. The
    /// bytes are gathered into `head` (bounded) and the part's body then starts in `buf`.
    fn head_step(&mut self) -> Result<Step, Error> {
        loop {
            self.unjoin();
            if self.buf.is_empty() {
                if self.ended {
                    return Err(Error::Incomplete);
                }
                return Ok(Step::More);
            }
            let old = self.head.len();
            let take = self.buf.len().min(MAX_HEADER_BYTES + 4 - old);
            self.head.extend_from_slice(&self.buf[..take]);
            if self.head.starts_with(b"--") {
                // The closing boundary: what follows (padding, the epilogue) is not read.
                self.buf.clear();
                self.joint = None;
                self.state = State::Done;
                return Ok(Step::End);
            }
            let Some(line) = memchr::memmem::find(&self.head, b"\r\n") else {
                let padding = self.head.strip_suffix(b"\r").unwrap_or(&self.head);
                if !padding.iter().all(|&b| b == b' ' || b == b'\t') && self.head.as_slice() != b"-"
                {
                    return Err(Error::BadBoundaryLine);
                }
                if self.head.len() > MAX_HEADER_BYTES {
                    return Err(Error::HeadersTooLarge);
                }
                self.buf.advance(take);
                continue;
            };
            if !self.head[..line].iter().all(|&b| b == b' ' || b == b'\t') {
                return Err(Error::BadBoundaryLine);
            }
            let Some(end) = memchr::memmem::find(&self.head[line..], b"\r\n\r\n") else {
                if self.head.len() > MAX_HEADER_BYTES {
                    return Err(Error::HeadersTooLarge);
                }
                self.buf.advance(take);
                continue;
            };
            let end = line + end + 4;
            if end > MAX_HEADER_BYTES {
                return Err(Error::HeadersTooLarge);
            }
            // `end > old`: an earlier step would have found it otherwise.
            self.buf.advance(end - old);
            // The header lines without their last CRLF and the empty line (none when the
            // boundary line's CRLF is the empty line's start).
            let block = self.head.get(line + 2..end - 4).unwrap_or_default();
            let part = parse_headers(block)?;
            self.head.clear();
            self.parts += 1;
            if self.parts > MAX_PARTS {
                return Err(Error::TooManyParts);
            }
            self.state = State::Body;
            return Ok(Step::Part(part));
        }
    }
}

/// The length of the longest end of `buf` that the delimiter starts with (shorter than the
/// delimiter: a whole one would have been found).
fn partial_suffix(buf: &[u8], delimiter: &[u8]) -> usize {
    let longest = (delimiter.len() - 1).min(buf.len());
    let tail = &buf[buf.len() - longest..];
    // Candidates start at a CR (the delimiter's first byte).
    for (i, _) in tail.iter().enumerate().filter(|(_, &b)| b == delimiter[0]) {
        if delimiter.starts_with(&tail[i..]) {
            return longest - i;
        }
    }
    0
}

/// A part's header lines (CRLF-separated, without the empty line).
fn parse_headers(block: &[u8]) -> Result<Part, Error> {
    let mut part = Part::default();
    if block.is_empty() {
        return Ok(part);
    }
    let bad = |line: &[u8]| Error::BadHeader(String::from_utf8_lossy(line).into_owned());
    let mut count = 0;
    for line in block.split(|&b| b == b'\n') {
        // Every line but the last ended in CRLF; the last had its CRLF cut off.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        count += 1;
        if count > MAX_HEADERS {
            return Err(Error::TooManyHeaders);
        }
        if line.contains(&b'\r') || line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // A bare CR, or an obsolete folded line.
            return Err(bad(line));
        }
        let colon = memchr::memchr(b':', line).ok_or_else(|| bad(line))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_token(*b)) {
            return Err(bad(line));
        }
        let value = std::str::from_utf8(&line[colon + 1..])
            .map_err(|_| bad(line))?
            .trim_matches(|c| c == ' ' || c == '\t');
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(bad(line));
        }
        if name.eq_ignore_ascii_case(b"content-disposition") {
            let (n, f) = disposition(value).ok_or_else(|| bad(line))?;
            part.name = n;
            part.filename = f;
        } else if name.eq_ignore_ascii_case(b"content-type") {
            part.content_type = Some(value.to_string());
        }
    }
    // A bare LF in the block splits a line without a CR before it.
    if block.split(|&b| b == b'\n').count() != memchr::memmem::find_iter(block, b"\r\n").count() + 1
    {
        return Err(bad(block));
    }
    Ok(part)
}

/// An HTTP token character (RFC 9110 § 5.6.2).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `name` and `filename` of a `Content-Disposition: form-data; name="…"; filename="…"` value
/// (quoted strings with `\` escapes, or bare tokens); `None` if a quoted string is not closed.
fn disposition(value: &str) -> Option<(Option<String>, Option<String>)> {
    let (mut name, mut filename) = (None, None);
    let mut rest = match value.find(';') {
        Some(i) => &value[i + 1..],
        None => "",
    };
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return Some((name, filename));
        }
        let key_end = rest.find(['=', ';']).unwrap_or(rest.len());
        let key = rest[..key_end].trim();
        rest = &rest[key_end..];
        let Some(after) = rest.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start_matches([' ', '\t']);
        let val = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut closed = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => val.push(chars.next()?.1),
                    '"' => {
                        closed = Some(i);
                        break;
                    }
                    c => val.push(c),
                }
            }
            rest = &quoted[closed? + 1..];
            // Anything up to the next `;` after a quoted string is ignored.
            rest = &rest[rest.find(';').unwrap_or(rest.len())..];
            val
        } else {
            let end = after.find(';').unwrap_or(after.len());
            rest = &after[end..];
            after[..end].trim().to_string()
        };
        if key.eq_ignore_ascii_case("name") {
            name = Some(val);
        } else if key.eq_ignore_ascii_case("filename") {
            filename = Some(val);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "XyZ-boundary";

    /// Parses `body` delivered as `chunks` (lengths, cycled); every part's headers and body.
    async fn parse_chunked(
        body: &[u8],
        sizes: &[usize],
        limit: u64,
    ) -> Result<Vec<(Part, Vec<u8>)>, Error> {
        let mut chunks = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < body.len() {
            let n = sizes[i % sizes.len()].max(1).min(body.len() - at);
            chunks.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
                &body[at..at + n],
            )));
            at += n;
            i += 1;
        }
        let mut m = Multipart::new(futures_util::stream::iter(chunks), B, limit);
        let mut out = Vec::new();
        while let Some(part) = m.next_part().await? {
            let mut data = Vec::new();
            while let Some(c) = m.chunk().await? {
                assert!(!c.is_empty(), "no empty chunks are handed out");
                data.extend_from_slice(&c);
            }
            out.push((part, data));
        }
        Ok(out)
    }

    fn form(file: &[u8]) -> Vec<u8> {
        let mut body = format!(
            "preamble, ignored\r\n--{B}\r\nContent-Disposition: form-data; name=\"projectId\"\r\n\r\n\
             p1\r\n--{B}  \t\r\ncontent-disposition: form-data; name=bucketId\r\n\r\ndocs\r\n\
             --{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a \\\"b\\\"; c.bin\"\r\n\
             Content-Type: application/x-test\r\nX-Other: 1\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(file);
        body.extend_from_slice(format!("\r\n--{B}\r\n\r\nno headers\r\n--{B}--").as_bytes());
        body
    }

    /// Bytes that look like the delimiter's beginnings, CRs, LFs and dashes, around a
    /// pseudo-random middle.
    fn tricky_file() -> Vec<u8> {
        let mut f = format!("\r\n--{}\r\r\n-\n--{B}", &B[..B.len() - 1]).into_bytes();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f.push(b"\r\n-XyZ"[(x % 6) as usize]);
        }
        f.extend_from_slice(format!("\r\n--{}", &B[..5]).as_bytes());
        f
    }

    fn check(parts: &[(Part, Vec<u8>)], file: &[u8]) {
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].0.name.as_deref(), Some("projectId"));
        assert_eq!(parts[0].1, b"p1");
        assert_eq!(parts[1].0.name.as_deref(), Some("bucketId"));
        assert_eq!(parts[1].1, b"docs");
        assert_eq!(
            parts[2].0,
            Part {
                name: Some("file".into()),
                filename: Some("a \"b\"; c.bin".into()),
                content_type: Some("application/x-test".into()),
            }
        );
        assert_eq!(parts[2].1, file);
        assert_eq!(parts[3].0, Part::default());
        assert_eq!(parts[3].1, b"no headers");
    }

    #[tokio::test]
    async fn a_body_split_in_two_at_every_position_parses_the_same() {
        let file = tricky_file();
        let body = form(&file);
        for cut in 0..=body.len() {
            let sizes = [cut.max(1), body.len()];
            let parts = parse_chunked(&body, &sizes, u64::MAX)
                .await
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            check(&parts, &file);
        }
    }

    #[tokio::test]
    async fn a_body_in_small_chunks_of_every_size_parses_the_same() {
        let file = tricky_file();
        let body = form(&file);
        for size in 1..=40 {
            check(
                &parse_chunked(&body, &[size], u64::MAX).await.unwrap(),
                &file,
            );
        }
        check(
            &parse_chunked(&body, &[1, 7, 2, 30, 3, 64], u64::MAX)
                .await
                .unwrap(),
            &file,
        );
    }

    /// The file's bytes are the received chunk's own memory, not a copy.
    #[tokio::test]
    async fn a_files_bytes_are_slices_of_the_received_chunks() {
        let file = vec![7u8; 256 * 1024];
        let body = Bytes::from(form(&file));
        let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        let halves = [body.slice(..body.len() / 2), body.slice(body.len() / 2..)];
        let stream = futures_util::stream::iter(halves.map(Ok::<_, std::io::Error>));
        let mut m = Multipart::new(stream, B, u64::MAX);
        let mut seen = 0;
        while let Some(part) = m.next_part().await.unwrap() {
            while let Some(c) = m.chunk().await.unwrap() {
                if part.name.as_deref() == Some("file") {
                    seen += c.len();
                    assert!(range.contains(&(c.as_ptr() as usize)), "a copy");
                }
            }
        }
        assert_eq!(seen, file.len());
    }

    async fn error_of(body: &[u8], limit: u64) -> Error {
        for size in [1, 3, body.len().max(1)] {
            if parse_chunked(body, &[size], limit).await.is_ok() {
                panic!(
                    "accepted in chunks of {size}: {:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        parse_chunked(body, &[body.len().max(1)], limit)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn broken_framing_is_an_error_never_a_short_file() {
        let file = tricky_file();
        let whole = form(&file);
        // No closing boundary, or cut anywhere before it: never a complete parse.
        for cut in 0..whole.len() - 2 {
            let e = error_of(&whole[..cut], u64::MAX).await;
            assert!(
                matches!(e, Error::Incomplete | Error::NoBoundary),
                "cut at {cut}: {e}"
            );
        }
        let e = error_of(b"", u64::MAX).await;
        assert!(matches!(e, Error::NoBoundary), "{e}");
        // Bare LFs framing the parts.
        let lf = format!("--{B}\nContent-Disposition: form-data; name=\"a\"\n\nx\n--{B}--\n");
        assert!(matches!(
            error_of(lf.as_bytes(), u64::MAX).await,
            Error::BadBoundaryLine
        ));
        let lf =
            format!("--{B}\r\nContent-Disposition: form-data; name=\"a\"\n\r\n\r\nx\r\n--{B}--");
        assert!(matches!(
            error_of(lf.as_bytes(), u64::MAX).await,
            Error::BadHeader(_)
        ));
        // The boundary inside the data, with more after it than padding.
        let inside = format!("--{B}\r\n\r\nab\r\n--{B}cd\r\n--{B}--");
        assert!(matches!(
            error_of(inside.as_bytes(), u64::MAX).await,
            Error::BadBoundaryLine
        ));
        // A folded header line, a header without a colon, a bad name, an open quote.
        for h in [
            "Content-Disposition: form-data;\r\n name=\"a\"",
            "Content-Disposition form-data",
            "Cont ent: x",
            "Content-Disposition: form-data; name=\"a",
        ] {
            let b = format!("--{B}\r\n{h}\r\n\r\nx\r\n--{B}--");
            assert!(
                matches!(error_of(b.as_bytes(), u64::MAX).await, Error::BadHeader(_)),
                "{h}"
            );
        }
    }

    #[tokio::test]
    async fn headers_parts_and_bytes_are_bounded() {
        let long = format!(
            "--{B}\r\nX-Long: {}\r\n\r\nx\r\n--{B}--",
            "a".repeat(MAX_HEADER_BYTES)
        );
        assert!(matches!(
            error_of(long.as_bytes(), u64::MAX).await,
            Error::HeadersTooLarge
        ));
        // Header lines that never end in an empty line.
        let endless = format!("--{B}\r\n{}", "X-A: b\r\n".repeat(2000));
        assert!(matches!(
            error_of(endless.as_bytes(), u64::MAX).await,
            Error::HeadersTooLarge
        ));
        let padding = format!("--{B}{}", " ".repeat(MAX_HEADER_BYTES + 10));
        assert!(matches!(
            error_of(padding.as_bytes(), u64::MAX).await,
            Error::HeadersTooLarge
        ));
        let many = format!(
            "--{B}\r\n{}\r\nx\r\n--{B}--",
            "X-A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            error_of(many.as_bytes(), u64::MAX).await,
            Error::TooManyHeaders
        ));
        let fine = format!(
            "--{B}\r\n{}\r\nx\r\n--{B}--",
            "X-A: b\r\n".repeat(MAX_HEADERS)
        );
        assert_eq!(
            parse_chunked(fine.as_bytes(), &[5], u64::MAX)
                .await
                .unwrap()
                .len(),
            1
        );
        let parts = format!(
            "--{B}\r\n\r\n{}--",
            format!("x\r\n--{B}\r\n\r\n").repeat(MAX_PARTS)
        );
        assert!(matches!(
            error_of(parts.as_bytes(), u64::MAX).await,
            Error::TooManyParts
        ));
        // The limit counts every byte: hit in the middle of a part.
        let body = form(&vec![1u8; 10_000]);
        let limit = body.len() as u64 - 5_000;
        assert!(matches!(error_of(&body, limit).await, Error::TooLarge(l) if l == limit));
        assert_eq!(
            parse_chunked(&body, &[999], body.len() as u64)
                .await
                .unwrap()
                .len(),
            4
        );
    }

    #[tokio::test]
    async fn closing_boundary_variants() {
        for end in ["--", "--\r\n", "--  \r\nepilogue --XyZ", "--\r\n--junk"] {
            let b =
                format!("--{B}\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--{B}{end}");
            let parts = parse_chunked(b.as_bytes(), &[2], u64::MAX).await.unwrap();
            assert_eq!(parts.len(), 1, "{end:?}");
            assert_eq!(parts[0].1, b"v");
        }
        // No parts at all.
        let b = format!("--{B}--\r\n");
        assert!(parse_chunked(b.as_bytes(), &[1], u64::MAX)
            .await
            .unwrap()
            .is_empty());
        // An empty part body.
        let b = format!("--{B}\r\n\r\n\r\n--{B}--");
        let parts = parse_chunked(b.as_bytes(), &[1], u64::MAX).await.unwrap();
        assert_eq!(parts.len(), 1);
        assert!(parts[0].1.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_call_loses_nothing() {
        use futures_util::FutureExt;
        let file = tricky_file();
        let body = form(&file);
        // Chunks handed over by the test; `Pending` while there are none (no waker is needed:
        // every poll is the test's own), the end once `closed`.
        type Queue = std::sync::Arc<std::sync::Mutex<(std::collections::VecDeque<Bytes>, bool)>>;
        let queue: Queue = Default::default();
        let q = queue.clone();
        let rx = futures_util::stream::poll_fn(move |_| {
            let mut q = q.lock().unwrap();
            match q.0.pop_front() {
                Some(c) => std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(c))),
                None if q.1 => std::task::Poll::Ready(None),
                None => std::task::Poll::Pending,
            }
        });
        let mut m = Multipart::new(rx, B, u64::MAX);
        let mut parts: Vec<(Part, Vec<u8>)> = Vec::new();
        let mut fed = 0;
        loop {
            // Each call is polled once with nothing new to read, dropped, then fed 3 bytes.
            let in_part = !parts.is_empty() && m.state == State::Body;
            let ready = if in_part {
                m.chunk()
                    .now_or_never()
                    .map(|r| r.unwrap().map(|c| (None, Some(c))))
            } else {
                m.next_part()
                    .now_or_never()
                    .map(|r| r.unwrap().map(|p| (Some(p), None)))
            };
            match ready {
                Some(Some((Some(p), _))) => parts.push((p, Vec::new())),
                Some(Some((None, Some(c)))) => parts.last_mut().unwrap().1.extend_from_slice(&c),
                Some(None) if in_part => {}
                Some(_) => break,
                None => {
                    let n = 3.min(body.len() - fed);
                    if n == 0 {
                        queue.lock().unwrap().1 = true;
                        let rest = m.next_part().now_or_never();
                        assert!(matches!(rest, Some(Ok(None))), "ended");
                        break;
                    }
                    queue
                        .lock()
                        .unwrap()
                        .0
                        .push_back(Bytes::copy_from_slice(&body[fed..fed + n]));
                    fed += n;
                }
            }
        }
        check(&parts, &file);
    }

    #[test]
    fn boundaries_come_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=utf-8; boundary=\"a b:c\"").as_deref(),
            Some("a b:c")
        );
        for bad in [
            "multipart/form-data",
            "multipart/mixed; boundary=abc",
            "application/json",
            "multipart/form-data; boundary=\"\"",
            &format!(
                "multipart/form-data; boundary={}",
                "a".repeat(MAX_BOUNDARY + 1)
            ),
        ] {
            assert_eq!(boundary(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_partial_suffix_is_the_longest_start_of_the_delimiter() {
        let d = b"\r\n--ab";
        assert_eq!(partial_suffix(b"xyz", d), 0);
        assert_eq!(partial_suffix(b"xyz\r", d), 1);
        assert_eq!(partial_suffix(b"xyz\r\n-", d), 3);
        assert_eq!(partial_suffix(b"\r\n--a", d), 5);
        assert_eq!(partial_suffix(b"\r\r\n--", d), 4);
        assert_eq!(partial_suffix(b"\r\n--ax", d), 0);
        assert_eq!(partial_suffix(b"", d), 0);
    }
}
