//! One TLS session with one peer, sans-IO: ciphertext from the peer goes in, plaintext comes
//! out, and the other way round. Toward a client the proxy is the TLS server (termination),
//! toward a server it is the TLS client (origination). The relay owns it and moves the bytes.

use std::io::{self, BufRead, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, Connection, HandshakeKind, ServerConfig, ServerConnection,
};

/// What `read_plaintext` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing decrypted is waiting.
    Empty,
    /// The peer ended its side (close_notify, or its TCP FIN): no more plaintext comes.
    Closed,
}

/// What the handshake settled, for routes, metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    pub server_name: Option<String>,
    pub alpn: Option<String>,
    /// 0x0303 or 0x0304.
    pub version: u16,
    pub cipher: Option<&'static str>,
    pub resumed: bool,
    pub client_certificate: bool,
}

pub struct TlsStream {
    connection: Connection,
    /// Ciphertext received but not yet taken by rustls (it takes more once the plaintext it
    /// holds is read).
    unread: Vec<u8>,
    established_reported: bool,
    close_notify_sent: bool,
    /// The peer sent nothing more to decrypt.
    peer_done: bool,
    tcp_eof: bool,
    failure: Option<rustls::Error>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("handshaking", &self.connection.is_handshaking())
            .field("unread", &self.unread.len())
            .field("failure", &self.failure)
            .finish()
    }
}

impl TlsStream {
    /// Termination: the proxy is the TLS server of a client.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream::with(ServerConnection::new(config)?.into()))
    }

    /// Origination: the proxy is the TLS client of a server known as `name`.
    pub fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream::with(ClientConnection::new(config, name)?.into()))
    }

    fn with(mut connection: Connection) -> TlsStream {
        // The relay bounds what waits: it reads the other side only when rustls has no
        // ciphertext left to hand out.
        connection.set_buffer_limit(None);
        TlsStream {
            connection,
            unread: Vec::new(),
            established_reported: false,
            close_notify_sent: false,
            peer_done: false,
            tcp_eof: false,
            failure: None,
        }
    }

    /// Ciphertext from the peer. What rustls does not take now waits in the stream.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.failure.is_some() || self.peer_done {
            return;
        }
        if !self.unread.is_empty() {
            self.unread.extend_from_slice(bytes);
            return;
        }
        let mut rest = bytes;
        self.take(&mut rest);
        if !rest.is_empty() {
            self.unread.extend_from_slice(rest);
        }
    }

    /// The peer's TCP stream ended.
    pub fn receive_eof(&mut self) {
        self.tcp_eof = true;
        if !self.unread.is_empty() {
            // rustls learns of the end once it has taken what came before it.
            return;
        }
        let mut nothing: &[u8] = &[];
        let _ = self.connection.read_tls(&mut nothing);
    }

    /// Feeds rustls until it refuses more or fails.
    fn take(&mut self, rest: &mut &[u8]) -> usize {
        let mut taken = 0;
        while !rest.is_empty() && self.failure.is_none() {
            match self.connection.read_tls(rest) {
                Ok(0) => break,
                Ok(count) => {
                    taken += count;
                    if let Err(error) = self.connection.process_new_packets() {
                        self.failure = Some(error);
                    }
                }
                // Its plaintext buffer is full: that has to be read first.
                Err(error) if error.kind() == io::ErrorKind::Other => break,
                // Anything else (a handshake message past rustls's limit): the session fails.
                Err(error) => {
                    self.failure = Some(rustls::Error::General(error.to_string()));
                    break;
                }
            }
        }
        taken
    }

    /// Appends decrypted bytes to `into` (`append` takes what fits and says how much).
    pub fn read_plaintext(&mut self, mut append: impl FnMut(&[u8]) -> usize) -> Plain {
        if self.peer_done {
            return Plain::Closed;
        }
        loop {
            let mut reader = self.connection.reader();
            match reader.fill_buf() {
                Ok([]) => {
                    self.peer_done = true;
                    return Plain::Closed;
                }
                Ok(chunk) => {
                    let count = append(chunk);
                    reader.consume(count);
                    return if count == 0 {
                        Plain::Empty
                    } else {
                        Plain::Data(count)
                    };
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if self.unread.is_empty() || self.failure.is_some() {
                        return Plain::Empty;
                    }
                    let unread = std::mem::take(&mut self.unread);
                    let mut rest = &unread[..];
                    let taken = self.take(&mut rest);
                    self.unread = rest.to_vec();
                    if self.unread.is_empty() && self.tcp_eof {
                        let mut nothing: &[u8] = &[];
                        let _ = self.connection.read_tls(&mut nothing);
                    }
                    if taken == 0 {
                        return Plain::Empty;
                    }
                }
                // The TCP stream ended without close_notify.
                Err(_) => {
                    self.peer_done = true;
                    return Plain::Closed;
                }
            }
        }
    }

    /// Plaintext for the peer, to be encrypted; takes all of it.
    pub fn write_plaintext(&mut self, bytes: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        let _ = self.connection.writer().write_all(bytes);
    }

    /// Ciphertext waits to go to the peer.
    pub fn wants_write(&self) -> bool {
        self.connection.wants_write()
    }

    /// Writes ciphertext for the peer into `into` until it takes no more; returns how much.
    pub fn write_ciphertext(&mut self, into: &mut dyn Write) -> usize {
        let mut written = 0;
        while self.connection.wants_write() {
            match self.connection.write_tls(into) {
                Ok(0) | Err(_) => break,
                Ok(count) => written += count,
            }
        }
        written
    }

    /// Queues close_notify (once): the other side ended.
    pub fn close_notify(&mut self) {
        if !self.close_notify_sent && self.failure.is_none() {
            self.close_notify_sent = true;
            self.connection.send_close_notify();
        }
    }

    pub fn close_notify_sent(&self) -> bool {
        self.close_notify_sent
    }

    /// The peer sent nothing more to decrypt, and nothing is left in the stream for it.
    pub fn peer_done(&self) -> bool {
        self.peer_done
    }

    /// The peer's TCP stream ended.
    pub fn tcp_ended(&self) -> bool {
        self.tcp_eof
    }

    /// Ciphertext from the peer is waiting in the stream.
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    pub fn is_handshaking(&self) -> bool {
        self.connection.is_handshaking()
    }

    /// True once, when the handshake has just completed.
    pub fn newly_established(&mut self) -> bool {
        if self.established_reported || self.failure.is_some() || self.is_handshaking() {
            return false;
        }
        self.established_reported = true;
        true
    }

    pub fn failure(&self) -> Option<&rustls::Error> {
        self.failure.as_ref()
    }

    pub fn facts(&self) -> TlsFacts {
        let connection = &self.connection;
        TlsFacts {
            server_name: match connection {
                Connection::Server(server) => {
                    server.server_name().map(|name| name.to_ascii_lowercase())
                }
                Connection::Client(_) => None,
            },
            alpn: connection
                .alpn_protocol()
                .map(|alpn| String::from_utf8_lossy(alpn).into_owned()),
            version: connection.protocol_version().map_or(0, u16::from),
            cipher: connection
                .negotiated_cipher_suite()
                .and_then(|suite| suite.suite().as_str()),
            resumed: connection.handshake_kind() == Some(HandshakeKind::Resumed),
            client_certificate: connection
                .peer_certificates()
                .is_some_and(|certificates| !certificates.is_empty()),
        }
    }

    /// The client certificate's subject CN (mTLS), parsed only when asked (PROXY TLVs).
    pub fn client_cn(&self) -> Option<String> {
        self.connection
            .peer_certificates()
            .and_then(|certificates| certificates.first())
            .and_then(|leaf| super::subject_cn(leaf))
    }
}
