//! A minimal HTTP/1.1 client for fabricd's API, over a unix socket or TCP.
//!
//! One request per connection (`Connection: close`), JSON bodies. This is
//! all `fabctl` needs, and it keeps the CLI free of an async runtime.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Longest response accepted.
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// How long a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// `host:port` (or `tcp://host:port`) is TCP; anything else a socket path.
    pub fn parse(text: &str) -> Endpoint {
        if let Some(address) = text.strip_prefix("tcp://") {
            return Endpoint::Tcp(address.to_owned());
        }
        // host:port (an IP or a name, and a numeric port) is TCP; a socket
        // path has a '/' or no port.
        let is_host_port = !text.contains('/')
            && text
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if is_host_port {
            return Endpoint::Tcp(text.to_owned());
        }
        Endpoint::Unix(text.into())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(address) => write!(f, "tcp://{address}"),
        }
    }
}

/// Failures talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach fabricd at {endpoint}: {source}. Is fabricd running? Start it, or point fabctl at it with --api or FABRIC_API")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to fabricd at {endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fabricd sent a malformed response: {0}")]
    Malformed(String),
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Sends one request and reads the whole response.
pub fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, HttpError> {
    let name = endpoint.to_string();
    let connect_error = |source| HttpError::Connect {
        endpoint: name.clone(),
        source,
    };
    let mut stream: Box<dyn Stream> = match endpoint {
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(connect_error)?;
            stream
                .set_read_timeout(Some(REQUEST_TIMEOUT))
                .map_err(connect_error)?;
            Box::new(stream)
        }
        Endpoint::Tcp(address) => {
            let stream = TcpStream::connect(address).map_err(connect_error)?;
            stream
                .set_read_timeout(Some(REQUEST_TIMEOUT))
                .map_err(connect_error)?;
            Box::new(stream)
        }
    };
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: fabricd\r\nConnection: close\r\nAccept: application/json\r\n");
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    let io_error = |source| HttpError::Io {
        endpoint: name.clone(),
        source,
    };
    stream.write_all(head.as_bytes()).map_err(io_error)?;
    stream.write_all(payload.as_bytes()).map_err(io_error)?;
    let mut raw = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(io_error)?;
    if raw.len() > RESPONSE_BYTES_MAX {
        return Err(HttpError::Malformed(format!(
            "response larger than {RESPONSE_BYTES_MAX} bytes"
        )));
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Response, HttpError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed("no end of headers".into()))?;
    let head = std::str::from_utf8(&raw[..split])
        .map_err(|_| HttpError::Malformed("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("bad status line {status_line:?}")))?;
    let chunked = lines.any(|line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| HttpError::Malformed("truncated chunk size".into()))?;
        let size_text = std::str::from_utf8(&body[..line_end]).unwrap_or("");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_text:?}")))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err(HttpError::Malformed("truncated chunk".into()));
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((plain.status, plain.body.as_slice()), (201, &b"{}"[..]));
        let chunked =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(chunked.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn endpoints() {
        assert!(matches!(
            Endpoint::parse("/run/fabric/api.sock"),
            Endpoint::Unix(_)
        ));
        assert!(matches!(
            Endpoint::parse("127.0.0.1:7450"),
            Endpoint::Tcp(_)
        ));
        assert!(matches!(
            Endpoint::parse("tcp://localhost:7450"),
            Endpoint::Tcp(_)
        ));
        assert!(matches!(Endpoint::parse("api.sock"), Endpoint::Unix(_)));
        assert!(matches!(Endpoint::parse("node-a:7451"), Endpoint::Tcp(_)));
        assert!(matches!(Endpoint::parse("./x:1"), Endpoint::Unix(_)));
    }
}
