//! A minimal blocking HTTPS/1.1 GET with rustls, for requests kubectl cannot make: talking
//! to an extension server as the front proxy, with chosen `X-Remote-*` headers.
//!
//! One request per connection (`Connection: close`), loopback only, deadlines on connect,
//! read and write.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::pki::CertKey;

/// Connect, read and write deadline of [`https_get`].
pub const HTTPS_TIMEOUT: Duration = Duration::from_secs(30);

/// Status and body of a response.
#[derive(Debug)]
pub struct HttpsResponse {
    pub status: u16,
    pub body: String,
}

impl HttpsResponse {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("not JSON ({e}): {}", self.body))
    }
}

/// `GET <base_url><path>` (base like `https://127.0.0.1:8443`), verifying the server against
/// `ca_pem` (by IP or name, as in `base_url`), presenting `client` if given, with extra
/// request `headers`.
pub fn https_get(
    base_url: &str,
    path: &str,
    ca_pem: &str,
    client: Option<&CertKey>,
    headers: &[(&str, &str)],
) -> Result<HttpsResponse, String> {
    let authority =
        base_url.strip_prefix("https://").ok_or_else(|| format!("not an https URL: {base_url}"))?.trim_end_matches('/');
    let (host, _port) = authority.rsplit_once(':').ok_or_else(|| format!("no port in {base_url}"))?;
    let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| format!("server name {host}: {e}"))?;
    let config = client_config(ca_pem, client)?;
    let connection = ClientConnection::new(Arc::new(config), server_name).map_err(|e| format!("TLS: {e}"))?;
    let address = authority
        .to_socket_addrs()
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to nothing"))?;
    let socket =
        TcpStream::connect_timeout(&address, HTTPS_TIMEOUT).map_err(|e| format!("connecting to {authority}: {e}"))?;
    socket
        .set_read_timeout(Some(HTTPS_TIMEOUT))
        .and_then(|()| socket.set_write_timeout(Some(HTTPS_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut stream = StreamOwned::new(connection, socket);

    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("sending the request to {authority}: {e}"))?;

    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers may close without close_notify after a complete response.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("reading the response from {authority}: {e}")),
    }
    parse_response(&raw)
}

fn client_config(ca_pem: &str, client: Option<&CertKey>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("CA PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("CA: {e}"))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .map_err(|e| format!("client key PEM: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("client certificate: {e}"))
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<HttpsResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = lines.any(|line| line.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(HttpsResponse { status, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".to_owned());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
