//! The scrapes' HTTP/1.1 client: one connection per Envoy admin endpoint, kept alive from
//! tick to tick and read by the task that parses its answers.
//!
//! A scrape is one `GET` per Envoy and tick, so what a request costs besides its bytes is a
//! large share of a big fleet's tick. This client does only what that `GET` needs: the
//! request is written with one `write`; the answer's head is parsed with `httparse` (the
//! parser hyper uses); the body — by `Content-Length`, chunked, or up to the close — is
//! handed to the caller as slices of one fixed read buffer per connection, so an answer
//! costs no allocation, no copy and no task or channel hand-off (docs/benchmarks.md,
//! "Controller cost"). Other admin calls keep using [`crate::source::admin`].
//!
//! A connection is reused only when the last answer was read to its end and nothing
//! followed it; one the Envoy closed while idle is noticed when the next request gets no
//! answer at all, and that request is sent once more on a new connection (a `GET` of
//! counters is safe to repeat).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where an admin endpoint's base URL points.
#[derive(Debug)]
pub struct Target {
    /// `host:port`: what is connected to and sent as `Host`.
    authority: String,
    /// The base URL's path, put before every request's path (`""` for most Envoys).
    prefix: String,
}

impl Target {
    /// The target of `base` (`http://host:port[/prefix]`), or what is wrong with it.
    pub fn parse(base: &str) -> Result<Target, ConnError> {
        let uri: hyper::Uri = base.parse().map_err(ConnError::NotUrl)?;
        if uri.scheme_str() != Some("http") {
            return Err(ConnError::NotHttp);
        }
        let authority = uri.authority().ok_or(ConnError::NoHost)?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(Target {
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// An answer's status line and the one header the caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_type: Option<String>,
}

/// Bytes read from the socket at a time, and the most an answer's head may take. A fixed
/// 16 KiB per connection measured cheaper in CPU and memory over a big fleet than hyper's
/// adaptive buffer, which grows towards hundreds of KiB on a 29 KiB answer
/// (docs/benchmarks.md, "Controller cost").
const READ_BUFFER: usize = 16 << 10;

/// Reads of one body between yields to the runtime (256 KiB; Envoy's answers are far smaller).
const YIELD_EVERY: u32 = 16;

/// Header lines read in an answer's head (Envoy's admin writes about six).
const MAX_HEADERS: usize = 32;

/// How the rest of the current answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// No answer is being read: the last one was read to its end.
    Idle,
    /// A request was sent and its answer not read to the end (yet, or ever: a connection
    /// left so is not reused).
    Unread,
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunked),
    /// Everything up to the close (no length, not chunked).
    UntilClose,
}

/// A kept-alive connection, opened when first needed and again after it broke.
#[derive(Debug)]
pub struct Conn {
    stream: Option<TcpStream>,
    /// Read buffer; `buf[start..end]` is read from the socket and not yet used.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    body: Body,
    /// Whether the connection may carry another request once this answer is read.
    keep_alive: bool,
    /// The request being sent, rebuilt in place for every request.
    request: Vec<u8>,
}

impl Default for Conn {
    fn default() -> Conn {
        Conn {
            stream: None,
            buf: Box::default(),
            start: 0,
            end: 0,
            body: Body::Idle,
            keep_alive: false,
            request: Vec::new(),
        }
    }
}

/// Why a request to an admin endpoint got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("not a URL ({0})")]
    NotUrl(hyper::http::uri::InvalidUri),
    #[error("only http:// admin endpoints can be read")]
    NotHttp,
    #[error("the URL has no host")]
    NoHost,
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no connection")]
    NoConnection,
    #[error("cannot send the request: {0}")]
    Send(std::io::Error),
    #[error("cannot read the answer: {0}")]
    Read(std::io::Error),
    #[error("the connection closed before any answer")]
    ClosedBeforeAnswer,
    #[error("the connection closed inside the answer's head")]
    ClosedInHead,
    #[error("the connection closed inside the answer")]
    ClosedInBody,
    #[error("the answer's head is over {READ_BUFFER} bytes")]
    HeadTooLong,
    #[error("the answer has over {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("not an HTTP/1.1 answer ({0})")]
    NotHttp11(httparse::Error),
    #[error("Content-Length {0:?} is not a length")]
    BadLength(String),
    #[error("the answer has two different Content-Lengths")]
    TwoLengths,
    #[error("no answer's head was read")]
    NoHead,
    #[error("chunked body: expected {what}, got byte {byte:#04x}")]
    ChunkExpected { what: &'static str, byte: u8 },
    #[error("chunked body: bad chunk size byte {0:#04x}")]
    ChunkSizeByte(u8),
    #[error("chunked body: a chunk size over 15 hex digits")]
    ChunkSizeTooLong,
}

/// Why a body could not be read: the connection or its framing, or what the caller's `data`
/// said of the bytes handed to it.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Data(E),
}

/// Why an exchange failed: `Stale` if a reused connection gave no answer at all (the Envoy
/// closed it while idle), so the request may be sent again on a new one.
enum Failure {
    Stale,
    Error(ConnError),
}

impl From<ConnError> for Failure {
    fn from(e: ConnError) -> Failure {
        Failure::Error(e)
    }
}

impl Conn {
    /// Sends `GET <prefix><path_and_query>` asking for `accept` and reads the answer's head;
    /// the caller then reads the body with [`Conn::read_body`]. `connect_within` bounds
    /// opening a connection.
    pub async fn get(
        &mut self,
        target: &Target,
        path_and_query: &str,
        accept: &str,
        connect_within: Duration,
    ) -> Result<Head, ConnError> {
        if self.body != Body::Idle || !self.keep_alive || self.start != self.end {
            self.drop_connection();
        }
        self.request.clear();
        for part in [
            "GET ",
            &target.prefix,
            path_and_query,
            " HTTP/1.1\r\nHost: ",
            &target.authority,
            "\r\nAccept: ",
            accept,
            "\r\nUser-Agent: sluice\r\n\r\n",
        ] {
            self.request.extend_from_slice(part.as_bytes());
        }
        loop {
            let reused = self.stream.is_some();
            if !reused {
                self.stream = Some(connect(target, connect_within).await?);
                if self.buf.is_empty() {
                    self.buf = vec![0; READ_BUFFER].into_boxed_slice();
                }
            }
            self.body = Body::Unread;
            match self.exchange().await {
                Ok(head) => return Ok(head),
                Err(Failure::Stale) if reused => self.drop_connection(),
                Err(Failure::Stale) => {
                    self.drop_connection();
                    return Err(ConnError::ClosedBeforeAnswer);
                }
                Err(Failure::Error(e)) => {
                    self.drop_connection();
                    return Err(e);
                }
            }
        }
    }

    /// Forgets the connection (after a failed or abandoned answer: what is left on it is
    /// unknown).
    pub fn drop_connection(&mut self) {
        self.stream = None;
        self.start = 0;
        self.end = 0;
        self.body = Body::Idle;
        self.keep_alive = false;
    }

    /// Writes the request and reads the answer's head.
    async fn exchange(&mut self) -> Result<Head, Failure> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Failure::Error(ConnError::NoConnection));
        };
        if let Err(e) = stream.write_all(&self.request).await {
            return Err(if is_reset(&e) {
                Failure::Stale
            } else {
                Failure::Error(ConnError::Send(e))
            });
        }
        let mut received = false;
        loop {
            if let Some(head) = self.parse_head()? {
                return Ok(head);
            }
            if self.end == self.buf.len() {
                if self.start == 0 {
                    return Err(Failure::Error(ConnError::HeadTooLong));
                }
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Failure::Error(ConnError::NoConnection));
            };
            match stream.read(&mut self.buf[self.end..]).await {
                Ok(0) if !received => return Err(Failure::Stale),
                Ok(0) => return Err(Failure::Error(ConnError::ClosedInHead)),
                Ok(n) => {
                    received = true;
                    self.end += n;
                }
                Err(e) if !received && is_reset(&e) => return Err(Failure::Stale),
                Err(e) => return Err(Failure::Error(ConnError::Read(e))),
            }
        }
    }

    /// Parses the head at `buf[start..end]` if it is complete, setting how the body is
    /// delimited and consuming the head; interim (1xx) heads are skipped.
    fn parse_head(&mut self) -> Result<Option<Head>, ConnError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut answer = httparse::Response::new(&mut headers);
            let used = match answer.parse(&self.buf[self.start..self.end]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(ConnError::TooManyHeaders),
                Err(e) => return Err(ConnError::NotHttp11(e)),
            };
            let status = answer.code.unwrap_or(0);
            let mut length: Option<u64> = None;
            let mut chunked = false;
            let mut close = answer.version != Some(1);
            let mut content_type = None;
            for h in answer.headers.iter() {
                let value = || String::from_utf8_lossy(h.value);
                if h.name.eq_ignore_ascii_case("content-length") {
                    let n = value()
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| ConnError::BadLength(value().into_owned()))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(ConnError::TwoLengths);
                    }
                    length = Some(n);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    // Only the last coding delimits the body.
                    chunked = value()
                        .rsplit(',')
                        .next()
                        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
                    if !chunked {
                        close = true;
                    }
                } else if h.name.eq_ignore_ascii_case("connection") {
                    let v = value();
                    if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                        close = true;
                    } else if v
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
                    {
                        close = false;
                    }
                } else if h.name.eq_ignore_ascii_case("content-type") {
                    content_type = Some(value().into_owned());
                }
            }
            self.start += used;
            if (100..200).contains(&status) {
                continue;
            }
            self.body = if status == 204 || status == 304 {
                Body::Length(0)
            } else if chunked {
                Body::Chunked(Chunked::START)
            } else if let Some(n) = length {
                Body::Length(n)
            } else {
                close = true;
                Body::UntilClose
            };
            self.keep_alive = !close;
            return Ok(Some(Head {
                status,
                content_type,
            }));
        }
    }

    /// Reads the body of the answer whose head [`Conn::get`] returned, handing each run of
    /// its bytes to `data` as it arrives.
    pub async fn read_body<E>(
        &mut self,
        data: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), BodyError<E>> {
        let mut reads = 0u32;
        loop {
            let input = &self.buf[self.start..self.end];
            let (used, done) = match &mut self.body {
                Body::Idle => return Ok(()),
                Body::Unread => return Err(ConnError::NoHead.into()),
                Body::Length(left) => {
                    let take = input
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    data(&input[..take]).map_err(BodyError::Data)?;
                    *left -= take as u64;
                    (take, *left == 0)
                }
                Body::Chunked(state) => {
                    let used = state.decode(input, data)?;
                    (used, *state == Chunked::Done)
                }
                Body::UntilClose => {
                    data(input).map_err(BodyError::Data)?;
                    (input.len(), false)
                }
            };
            self.start += used;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if done {
                self.body = Body::Idle;
                if !self.keep_alive || self.start != self.end {
                    // Nothing may follow an answer on a connection this client reuses.
                    self.drop_connection();
                }
                return Ok(());
            }
            // A big answer whose bytes keep arriving is parsed a few hundred KiB at a time,
            // letting the other tasks of the daemon's one thread (the HTTP endpoint, signals)
            // run in between: a socket that is always ready yields only after 128 reads.
            reads += 1;
            if reads.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
            // Every byte buffered was used (a body never leaves a partial run), so the
            // whole buffer is free.
            let Some(stream) = self.stream.as_mut() else {
                return Err(ConnError::NoConnection.into());
            };
            match stream.read(&mut self.buf[self.end..]).await {
                Ok(0) if self.body == Body::UntilClose => {
                    self.drop_connection();
                    return Ok(());
                }
                Ok(0) => return Err(ConnError::ClosedInBody.into()),
                Ok(n) => self.end += n,
                Err(e) => return Err(ConnError::Read(e).into()),
            }
        }
    }
}

/// Whether a failed write or read means the peer had closed the connection.
fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
}

async fn connect(target: &Target, within: Duration) -> Result<TcpStream, ConnError> {
    let stream = tokio::time::timeout(within, TcpStream::connect(&target.authority))
        .await
        .map_err(|_| ConnError::ConnectTimeout(within))?
        .map_err(ConnError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Where a chunked body's decoder is (RFC 9112, section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In a chunk's size line: the size so far and its digits; `ext` once past them (an
    /// extension follows, skipped).
    Size {
        size: u64,
        digits: u8,
        ext: bool,
    },
    /// The `\n` ending a size line.
    SizeLf {
        size: u64,
    },
    /// Bytes left of the current chunk's data.
    Data(u64),
    /// The `\r\n` after a chunk's data.
    DataCr,
    DataLf,
    /// In the trailer section after the last chunk; `empty` while the current line is.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Chunked {
    const START: Chunked = Chunked::Size {
        size: 0,
        digits: 0,
        ext: false,
    };

    /// Decodes `input`, handing each run of data to `data`; returns the bytes used, which are
    /// all of `input` unless the body ends inside it.
    fn decode<E>(
        &mut self,
        input: &[u8],
        data: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<usize, BodyError<E>> {
        let mut i = 0;
        while i < input.len() {
            if let Chunked::Data(left) = *self {
                let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                data(&input[i..i + take]).map_err(BodyError::Data)?;
                i += take;
                *self = if left == take as u64 {
                    Chunked::DataCr
                } else {
                    Chunked::Data(left - take as u64)
                };
                continue;
            }
            let b = input[i];
            i += 1;
            let expect = |want: u8, what: &'static str| {
                if b == want {
                    Ok(())
                } else {
                    Err(ConnError::ChunkExpected { what, byte: b })
                }
            };
            *self = match *self {
                Chunked::Size { size, digits, ext } => match b {
                    b'\r' if digits > 0 => Chunked::SizeLf { size },
                    _ if ext => Chunked::Size { size, digits, ext },
                    b';' | b' ' | b'\t' if digits > 0 => Chunked::Size {
                        size,
                        digits,
                        ext: true,
                    },
                    _ => {
                        let v = (b as char)
                            .to_digit(16)
                            .ok_or(ConnError::ChunkSizeByte(b))?;
                        if digits >= 15 {
                            return Err(ConnError::ChunkSizeTooLong.into());
                        }
                        Chunked::Size {
                            size: size << 4 | u64::from(v),
                            digits: digits + 1,
                            ext,
                        }
                    }
                },
                Chunked::SizeLf { size } => {
                    expect(b'\n', "the end of a chunk size line")?;
                    if size == 0 {
                        Chunked::Trailer { empty: true }
                    } else {
                        Chunked::Data(size)
                    }
                }
                Chunked::DataCr => {
                    expect(b'\r', "the end of a chunk")?;
                    Chunked::DataLf
                }
                Chunked::DataLf => {
                    expect(b'\n', "the end of a chunk")?;
                    Chunked::START
                }
                Chunked::Trailer { empty } => {
                    if b == b'\r' {
                        Chunked::TrailerLf { empty }
                    } else {
                        Chunked::Trailer { empty: false }
                    }
                }
                Chunked::TrailerLf { empty } => {
                    expect(b'\n', "the end of a trailer line")?;
                    if empty {
                        *self = Chunked::Done;
                        return Ok(i);
                    }
                    Chunked::Trailer { empty: true }
                }
                Chunked::Data(_) | Chunked::Done => return Ok(i - 1),
            };
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests;
