//! Byte streams to and from an [`Endpoint`], and who is on the other end.
//!
//! [`connect`] opens a stream; [`Listener`] accepts streams and implements
//! `axum::serve::Listener`, so the same router serves vsock, unix sockets and TCP.
//! Each accepted stream carries a [`Peer`]: the identity the kernel vouches for
//! (vsock CID, `SO_PEERCRED` uid/gid/pid) or the TCP address.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use crate::endpoint::Endpoint;

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum Peer {
    /// A vsock peer; the CID is assigned by the hypervisor and cannot be forged.
    Vsock { cid: u32, port: u32 },
    /// A local process; uid and gid come from `SO_PEERCRED`.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A TCP peer; its address alone proves nothing.
    Tcp { addr: std::net::SocketAddr },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Vsock { cid, .. } => write!(f, "vsock CID {cid}"),
            Peer::Unix { uid, gid, .. } => write!(f, "local uid {uid} gid {gid}"),
            Peer::Tcp { addr } => write!(f, "tcp {addr}"),
        }
    }
}

/// A connected byte stream of any transport.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Vsock(VsockStream),
    /// A TLS client connection ([`crate::tls`]).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why a connection or a listener could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// The underlying I/O error.
    pub fn io(&self) -> &io::Error {
        match self {
            TransportError::Connect { source, .. } | TransportError::Listen { source, .. } => {
                source
            }
        }
    }
}

/// Opens a stream to `endpoint`.
pub async fn connect(endpoint: &Endpoint) -> Result<Stream, TransportError> {
    let wrap = |source| TransportError::Connect {
        endpoint: endpoint.clone(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => UnixStream::connect(path)
            .await
            .map(Stream::Unix)
            .map_err(wrap),
        Endpoint::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(wrap)?;
            stream.set_nodelay(true).map_err(wrap)?;
            Ok(Stream::Tcp(stream))
        }
        Endpoint::Vsock { cid, port } => VsockStream::connect(vsock_addr(*cid, *port))
            .await
            .map(Stream::Vsock)
            .map_err(wrap),
        Endpoint::Tls { host, port } => {
            let connector = crate::tls::connector().map_err(|e| wrap(io::Error::other(e)))?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| wrap(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let stream = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(wrap)?;
            stream.set_nodelay(true).map_err(wrap)?;
            let tls = connector.connect(name, stream).await.map_err(wrap)?;
            Ok(Stream::Tls(Box::new(tls)))
        }
    }
}

/// A bound listener on any transport.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, std::path::PathBuf),
    Tcp(TcpListener),
    Vsock(VsockListener),
}

impl Listener {
    /// Binds `endpoint`. A stale unix socket file left by a dead process is replaced;
    /// a live one (something accepts on it) is an error.
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let wrap = |source| TransportError::Listen {
            endpoint: endpoint.clone(),
            source,
        };
        match endpoint {
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await.map_err(wrap)?;
                let listener = UnixListener::bind(path).map_err(wrap)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
            Endpoint::Tcp { host, port } | Endpoint::Tls { host, port } => {
                TcpListener::bind((host.as_str(), *port))
                    .await
                    .map(Listener::Tcp)
                    .map_err(wrap)
            }
            Endpoint::Vsock { cid, port } => VsockListener::bind(vsock_addr(*cid, *port))
                .map(Listener::Vsock)
                .map_err(wrap),
        }
    }

    /// The endpoint actually bound (with the real port when TCP port 0 was asked for).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Unix(_, path) => Endpoint::Unix(path.clone()),
            Listener::Tcp(l) => {
                let addr = l.local_addr()?;
                Endpoint::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                }
            }
            Listener::Vsock(l) => {
                let addr = l.local_addr()?;
                Endpoint::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                }
            }
        })
    }

    /// Accepts one connection and learns who the peer is.
    pub async fn accept_peer(&mut self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                let cred = stream.peer_cred()?;
                let peer = Peer::Unix {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                };
                Ok((Stream::Unix(stream), peer))
            }
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), Peer::Tcp { addr }))
            }
            Listener::Vsock(l) => {
                let (stream, addr) = l.accept().await?;
                let peer = Peer::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                };
                Ok((Stream::Vsock(stream), peer))
            }
        }
    }
}

/// The kernel address of a vsock endpoint.
fn vsock_addr(cid: u32, port: u32) -> VsockAddr {
    VsockAddr::new(cid, port)
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = tokio::fs::symlink_metadata(path).await else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way; remove it or choose another path",
        ));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is serving this socket; stop it first",
        )),
        Err(_) => tokio::fs::remove_file(path).await,
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accept_peer().await {
                Ok(pair) => return pair,
                Err(e) => {
                    // Per-connection failures (reset before accept, peer gone before
                    // SO_PEERCRED) are the peer's problem; resource exhaustion is ours.
                    tracing::warn!(error = %e, "accept failed");
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::NotConnected
                    ) {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        // axum only uses this for logging; report our own identity in the peer's terms.
        Ok(match self {
            Listener::Tcp(l) => Peer::Tcp {
                addr: l.local_addr()?,
            },
            Listener::Unix(..) => Peer::Unix {
                uid: nix_uid(),
                gid: nix_gid(),
                pid: Some(std::process::id() as i32),
            },
            Listener::Vsock(l) => {
                let a = l.local_addr()?;
                Peer::Vsock {
                    cid: a.cid(),
                    port: a.port(),
                }
            }
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

fn nix_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn nix_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
            Stream::Vsock($s) => $e,
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Vsock(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn vsock_endpoints_map_to_the_kernel_addresses() {
        // Address handling only: nothing here opens an AF_VSOCK socket.
        use crate::endpoint::{VSOCK_CID_ANY, VSOCK_CID_HOST};
        assert_eq!(VSOCK_CID_ANY, tokio_vsock::VMADDR_CID_ANY);
        assert_eq!(VSOCK_CID_HOST, tokio_vsock::VMADDR_CID_HOST);
        for (text, cid, port) in [
            ("vsock:2:7710", 2, 7710),
            ("vsock:any:7711", u32::MAX, 7711),
            ("vsock:105:7711", 105, 7711),
        ] {
            let Ok(Endpoint::Vsock { cid: c, port: p }) = text.parse::<Endpoint>() else {
                panic!("{text}")
            };
            let addr = vsock_addr(c, p);
            assert_eq!((addr.cid(), addr.port()), (cid, port), "{text}");
        }
        assert_eq!(
            Endpoint::default_client(),
            Endpoint::Vsock {
                cid: tokio_vsock::VMADDR_CID_HOST,
                port: 7710
            }
        );
    }

    #[tokio::test]
    async fn unix_listener_reports_peer_credentials_and_replaces_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint::Unix(dir.path().join("s.sock"));
        // A stale socket file from a dead process.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).unwrap());
        let mut listener = Listener::bind(&ep).await.unwrap();
        // A live one cannot be taken over.
        let err = Listener::bind(&ep).await.unwrap_err();
        assert!(
            err.to_string().contains("another process is serving"),
            "{err}"
        );
        // That probe was a connection; the live server sees it end without a byte.
        let (mut probe, _) = listener.accept_peer().await.unwrap();
        assert_eq!(probe.read(&mut [0u8; 1]).await.unwrap(), 0);

        let client = tokio::spawn({
            let ep = ep.clone();
            async move {
                let mut s = connect(&ep).await.unwrap();
                s.write_all(b"ping").await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        let (mut stream, peer) = listener.accept_peer().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        client.await.unwrap();
        assert_eq!(got, b"ping");
        assert_eq!(
            peer,
            Peer::Unix {
                uid: nix_uid(),
                gid: nix_gid(),
                pid: Some(std::process::id() as i32)
            }
        );
    }

    #[tokio::test]
    async fn tcp_listener_on_port_zero_reports_the_real_port() {
        let mut listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let ep = listener.local_endpoint().unwrap();
        let Endpoint::Tcp { port, .. } = ep else {
            panic!("{ep}")
        };
        assert_ne!(port, 0);
        let c = tokio::spawn(async move { connect(&ep).await.unwrap() });
        let (_s, peer) = listener.accept_peer().await.unwrap();
        let local = c.await.unwrap();
        let Stream::Tcp(local) = local else { panic!() };
        assert_eq!(
            peer,
            Peer::Tcp {
                addr: local.local_addr().unwrap()
            }
        );
    }

    #[tokio::test]
    async fn connect_errors_name_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint::Unix(dir.path().join("nobody.sock"));
        let err = connect(&ep).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot connect to {ep}: ")),
            "{err}"
        );
        assert_eq!(err.io().kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_plain_file_in_the_way_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        std::fs::write(&path, b"data").unwrap();
        let err = Listener::bind(&Endpoint::Unix(path.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
