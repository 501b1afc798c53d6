//! Byte streams to and from an [`Endpoint`], and who is on the other end.
//!
//! [`connect`] opens a stream; [`Listener`] accepts streams and implements
//! `axum::serve::Listener`, so the same router serves vsock, unix sockets and TCP.
//! Each accepted stream carries a [`Peer`]: the identity the kernel vouches for
//! (vsock CID, `SO_PEERCRED` uid/gid/pid) or the TCP address.
//!
//! `vsock-uds:` endpoints reach a guest's vsock through a hybrid-vsock backend's unix
//! socket: [`connect`] sends `CONNECT PORT\n` and waits for `OK …\n`; a [`Listener`]
//! binds `PATH_PORT` and vouches for the guest's CID given in the endpoint, only for
//! connections the backend (a process of our own uid, or root) makes. The hybrid vsock
//! has no half-close — the backend turns a write shutdown into a full vsock shutdown —
//! so [`Stream::VsockUds`] never shuts down its write side: it closes when dropped.
//!
//! Platforms: unix sockets (`unix:`, `vsock-uds:`) exist on unix systems only and vsock
//! (`vsock:`) on Linux only; elsewhere (Windows) those endpoints still parse, but
//! connecting or listening fails with an error that says to use `tcp:` or `tls:`.
//! Hyper-V sockets are not supported.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};
#[cfg(target_os = "linux")]
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
        /// Its supplementary groups when it connected (`SO_PEERGROUPS`): what the
        /// kernel recorded with the connection, not what its pid names later (a pid
        /// can be another process's by the time a request comes).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        groups: Vec<u32>,
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
    #[cfg(unix)]
    Unix(UnixStream),
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Vsock(VsockStream),
    /// A guest's vsock port through a hybrid-vsock backend's unix socket; shutting down
    /// only flushes (no half-close on this transport).
    #[cfg(unix)]
    VsockUds(UnixStream),
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
        #[cfg(unix)]
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
        #[cfg(target_os = "linux")]
        Endpoint::Vsock { cid, port } => VsockStream::connect(vsock_addr(*cid, *port))
            .await
            .map(Stream::Vsock)
            .map_err(wrap),
        #[cfg(unix)]
        Endpoint::VsockUds { path, port, .. } => {
            let stream = UnixStream::connect(path).await.map_err(wrap)?;
            hybrid_connect(stream, *port)
                .await
                .map(Stream::VsockUds)
                .map_err(wrap)
        }
        Endpoint::Tls { host, port } => {
            let connector = crate::tls::connector().map_err(|e| wrap(io::Error::other(e)))?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| wrap(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let stream = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(wrap)?;
            stream.set_nodelay(true).map_err(wrap)?;
            let tls = connector
                .connect(name, stream)
                .await
                .map_err(|e| wrap(explain_tls(e)))?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        #[cfg(not(target_os = "linux"))]
        other => Err(wrap(unavailable(other))),
    }
}

/// Why `endpoint` cannot be used on this system: unix sockets need a unix system,
/// vsock needs Linux. The error says what to use instead.
#[cfg(any(test, not(target_os = "linux")))]
fn unavailable(endpoint: &Endpoint) -> io::Error {
    let what = match endpoint {
        Endpoint::Vsock { .. } => {
            "vsock is available on Linux only (Hyper-V sockets are not supported)"
        }
        Endpoint::Unix(_) | Endpoint::VsockUds { .. } => {
            "unix sockets are available on unix systems only"
        }
        Endpoint::Tcp { .. } | Endpoint::Tls { .. } => {
            "this endpoint is not available on this system"
        }
    };
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what}; use a tcp:HOST:PORT endpoint (the agent's link is TLS with pinned keys on every transport) or, for signetd's client port, tls:HOST:PORT"),
    )
}

/// A TLS handshake's failure with what is wrong with the server's certificate and
/// how to make a right one, when that is the cause (kind `InvalidData`).
fn explain_tls(e: io::Error) -> io::Error {
    use tokio_rustls::rustls::{CertificateError, Error as TlsError};
    let Some(TlsError::InvalidCertificate(cert)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return e;
    };
    let make = "make a CA and a server certificate it issues on the appliance with `signetd tls init DIR --host HOST`, set the [tls] lines it prints, and pass its ca.pem here with --tls-ca";
    let what = match cert {
        CertificateError::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            format!("the server's certificate is a CA certificate (CA:TRUE) used as the server's own, which TLS clients refuse; {make}")
        }
        CertificateError::UnknownIssuer => format!(
            "the server's certificate is not issued by a CA this client trusts; pass the CA that issued it with --tls-ca (SIGNET_TLS_CA), or {make}"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("the server's certificate is not made for the host name or address in the endpoint; connect with a name it holds, or {make}")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("the server's certificate has expired; {make}")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
            "the server's certificate is not valid yet (check both clocks); or {make}"
        ),
        other => format!("the server's certificate cannot be used ({other:?}); {make}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Sends `CONNECT port` on a fresh connection to a hybrid-vsock backend and waits up to
/// [`HANDSHAKE_LIMIT`] for its answer.
///
/// Once `CONNECT` is sent, the connection is not closed before the backend answers,
/// even when the caller stops waiting (its time limit, or a dropped future): the
/// handshake runs in a task of its own that holds the connection until `OK`, a
/// refusal or [`PENDING_CONNECT_HOLD`]. A guest may accept long after the request
/// (a booting or busy TCG guest); `vhost-device-vsock` 0.3.0 then writes `OK` to our
/// socket and panics if it is closed, which kills the guest's vsock until the
/// backend restarts. An answered connection nobody waits for any more is closed,
/// which the backend handles like any other close.
#[cfg(unix)]
async fn hybrid_connect(stream: UnixStream, port: u32) -> io::Result<UnixStream> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut stream = stream;
        if let Ok(result) =
            tokio::time::timeout(PENDING_CONNECT_HOLD, hybrid_handshake(&mut stream, port)).await
        {
            // A caller that stopped waiting drops the stream here, after the answer.
            let _ = answer.send(result.map(|()| stream));
        }
    });
    match tokio::time::timeout(HANDSHAKE_LIMIT, answered).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) | Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the hybrid-vsock backend did not answer CONNECT {port} within {} s; check that its process (vhost-device-vsock, Firecracker, Cloud Hypervisor) serves this socket and that the guest is running",
                HANDSHAKE_LIMIT.as_secs()
            ),
        )),
    }
}

/// How long a `CONNECT` nobody waits for any more is held open for the backend's
/// late answer before it is closed after all.
#[cfg(unix)]
const PENDING_CONNECT_HOLD: std::time::Duration = std::time::Duration::from_secs(300);
/// How long a hybrid-vsock backend may take to answer `CONNECT`.
#[cfg(unix)]
const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest handshake answer line read (`OK 4294967295\n` is 14 bytes).
#[cfg(unix)]
const MAX_HANDSHAKE_LINE: usize = 64;

/// The hybrid-vsock handshake: `CONNECT PORT\n`, answered `OK <n>\n`. The answer is
/// read a byte at a time so that nothing of the stream after it is consumed.
#[cfg(unix)]
async fn hybrid_handshake<S>(stream: &mut S, port: u32) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                if line.is_empty() {
                    format!("no listener on port {port} in the guest (the backend closed the connection after CONNECT {port}); start the service in the VM, or check the port")
                } else {
                    format!(
                        "the hybrid-vsock backend closed the connection in the middle of its answer {:?}; check that the socket is a hybrid-vsock backend's uds-path",
                        String::from_utf8_lossy(&line)
                    )
                },
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the socket answered {:?} to CONNECT {port} instead of \"OK <port>\"; the path must be a hybrid-vsock backend's uds-path (vhost-device-vsock, Firecracker, Cloud Hypervisor)",
                text.chars().take(MAX_HANDSHAKE_LINE).collect::<String>()
            ),
        )),
    }
}

/// A bound listener on any transport.
#[derive(Debug)]
pub enum Listener {
    #[cfg(unix)]
    Unix(UnixListener, std::path::PathBuf),
    Tcp(TcpListener),
    #[cfg(target_os = "linux")]
    Vsock(VsockListener),
    /// `PATH_PORT` of a hybrid-vsock backend: the guest `cid`'s connections to the
    /// host's port `port`.
    #[cfg(unix)]
    VsockUds {
        listener: UnixListener,
        uds: std::path::PathBuf,
        port: u32,
        cid: u32,
    },
}

/// The unix socket a hybrid-vsock backend connects to for the guest's connections to
/// the host's `port`: `PATH_PORT`.
pub fn hybrid_listen_path(uds_path: &Path, port: u32) -> std::path::PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    s.into()
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
            #[cfg(unix)]
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
            #[cfg(target_os = "linux")]
            Endpoint::Vsock { cid, port } => VsockListener::bind(vsock_addr(*cid, *port))
                .map(Listener::Vsock)
                .map_err(wrap),
            #[cfg(unix)]
            Endpoint::VsockUds { path, port, cid } => {
                let cid = cid.ok_or_else(|| {
                    wrap(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "a vsock-uds listener vouches for one guest: add its CID (the backend's guest-cid), e.g. vsock-uds:{}:{port},cid=105",
                            path.display()
                        ),
                    ))
                })?;
                let uds = hybrid_listen_path(path, *port);
                remove_stale_socket(&uds).await.map_err(wrap)?;
                let listener = UnixListener::bind(&uds).map_err(wrap)?;
                Ok(Listener::VsockUds {
                    listener,
                    uds,
                    port: *port,
                    cid,
                })
            }
            #[cfg(not(target_os = "linux"))]
            other => Err(wrap(unavailable(other))),
        }
    }

    /// The endpoint actually bound (with the real port when TCP port 0 was asked for).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            #[cfg(unix)]
            Listener::Unix(_, path) => Endpoint::Unix(path.clone()),
            Listener::Tcp(l) => {
                let addr = l.local_addr()?;
                Endpoint::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                }
            }
            #[cfg(target_os = "linux")]
            Listener::Vsock(l) => {
                let addr = l.local_addr()?;
                Endpoint::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                }
            }
            #[cfg(unix)]
            Listener::VsockUds { uds, port, cid, .. } => {
                let base = uds.to_string_lossy();
                let path = base
                    .strip_suffix(&format!("_{port}"))
                    .unwrap_or(&base)
                    .to_owned();
                Endpoint::VsockUds {
                    path: path.into(),
                    port: *port,
                    cid: Some(*cid),
                }
            }
        })
    }

    /// Accepts one connection and learns who the peer is.
    pub async fn accept_peer(&mut self) -> io::Result<(Stream, Peer)> {
        match self {
            #[cfg(unix)]
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                let cred = stream.peer_cred()?;
                // Unknown groups count as none: only the uid and primary group grant.
                let groups = peer_groups(&stream).unwrap_or_else(|e| {
                    tracing::warn!(uid = cred.uid(), error = %e, "the peer's supplementary groups cannot be read (SO_PEERGROUPS, Linux 4.13 or later); only its uid and primary group count");
                    Vec::new()
                });
                let peer = Peer::Unix {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                    groups,
                };
                Ok((Stream::Unix(stream), peer))
            }
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), Peer::Tcp { addr }))
            }
            #[cfg(target_os = "linux")]
            Listener::Vsock(l) => {
                let (stream, addr) = l.accept().await?;
                let peer = Peer::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                };
                Ok((Stream::Vsock(stream), peer))
            }
            #[cfg(unix)]
            Listener::VsockUds {
                listener, uds, cid, ..
            } => {
                let (stream, _) = listener.accept().await?;
                // Only the backend speaks for the guest: a process of our own uid or root.
                let cred = stream.peer_cred()?;
                if cred.uid() != 0 && cred.uid() != nix_uid() {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "uid {} connected to {} but only the hybrid-vsock backend (uid {} or root) speaks for guest CID {cid}; make the socket's directory private to that user",
                            cred.uid(),
                            uds.display(),
                            nix_uid()
                        ),
                    ));
                }
                // The backend does not tell the guest's source port.
                let peer = Peer::Vsock { cid: *cid, port: 0 };
                Ok((Stream::VsockUds(stream), peer))
            }
        }
    }
}

/// The kernel address of a vsock endpoint.
#[cfg(target_os = "linux")]
fn vsock_addr(cid: u32, port: u32) -> VsockAddr {
    VsockAddr::new(cid, port)
}

#[cfg(unix)]
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
                            | io::ErrorKind::PermissionDenied
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
            #[cfg(unix)]
            Listener::Unix(..) => Peer::Unix {
                uid: nix_uid(),
                gid: nix_gid(),
                pid: Some(std::process::id() as i32),
                groups: Vec::new(),
            },
            #[cfg(target_os = "linux")]
            Listener::Vsock(l) => {
                let a = l.local_addr()?;
                Peer::Vsock {
                    cid: a.cid(),
                    port: a.port(),
                }
            }
            #[cfg(unix)]
            Listener::VsockUds { port, .. } => Peer::Vsock {
                cid: crate::endpoint::VSOCK_CID_HOST,
                port: *port,
            },
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The supplementary groups the peer of `stream` had when it connected
/// (`SO_PEERGROUPS`), as the kernel recorded them with the connection.
#[cfg(target_os = "linux")]
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // Neither nix nor rustix wraps SO_PEERGROUPS.
        // SAFETY: the kernel writes at most `len` bytes into `groups`, which holds
        // that many, and `len` itself; the descriptor is borrowed from `stream`, open
        // for the whole call.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / GID;
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // Too small: the kernel said how large.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
fn peer_groups(_: &UnixStream) -> io::Result<Vec<u32>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_PEERGROUPS is Linux's",
    ))
}

#[cfg(unix)]
fn nix_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(unix)]
fn nix_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            #[cfg(unix)]
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
            #[cfg(target_os = "linux")]
            Stream::Vsock($s) => $e,
            #[cfg(unix)]
            Stream::VsockUds($s) => $e,
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
        match self.get_mut() {
            // No half-close over a hybrid vsock: the backend would shut the whole vsock
            // connection down and the peer's answer would be lost. Close by dropping.
            #[cfg(unix)]
            Stream::VsockUds(s) => Pin::new(s).poll_flush(cx),
            s => Pin::new(s).poll_shutdown_inner(cx),
        }
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
            #[cfg(unix)]
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tcp(s) => s.is_write_vectored(),
            #[cfg(target_os = "linux")]
            Stream::Vsock(s) => s.is_write_vectored(),
            #[cfg(unix)]
            Stream::VsockUds(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl Stream {
    fn poll_shutdown_inner(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn endpoints_this_system_lacks_name_tcp_or_tls_instead() {
        for (text, names) in [
            ("vsock:2:771", "vsock is available on Linux only"),
            ("unix:/run/signet/signetd.sock", "unix sockets"),
            ("vsock-uds:/run/vm.vsock:771", "unix sockets"),
        ] {
            let err = unavailable(&text.parse().unwrap());
            assert_eq!(err.kind(), io::ErrorKind::Unsupported);
            let msg = err.to_string();
            assert!(
                msg.contains(names)
                    && msg.contains("tcp:HOST:PORT")
                    && msg.contains("tls:HOST:PORT"),
                "{msg}"
            );
        }
    }

    /// Where unix sockets or vsock do not exist (Windows), those endpoints fail to
    /// connect and to listen with the error that names the fix.
    #[cfg(not(target_os = "linux"))]
    #[tokio::test]
    async fn endpoints_this_system_lacks_fail_with_the_fix() {
        let mut lacking = vec!["vsock:2:771"];
        if cfg!(not(unix)) {
            lacking.extend(["unix:signetd.sock", "vsock-uds:vm.vsock:771,cid=3"]);
        }
        for text in lacking {
            let ep: Endpoint = text.parse().unwrap();
            let err = connect(&ep).await.unwrap_err();
            assert_eq!(err.io().kind(), io::ErrorKind::Unsupported, "{err}");
            assert!(err.to_string().contains("tcp:HOST:PORT"), "{err}");
            let err = Listener::bind(&ep).await.unwrap_err();
            assert_eq!(err.io().kind(), io::ErrorKind::Unsupported, "{err}");
        }
    }

    #[cfg(target_os = "linux")]
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
                port: 771
            }
        );
    }

    #[cfg(unix)]
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
                pid: Some(std::process::id() as i32),
                // This process's supplementary groups, as getgroups(2) tells them.
                groups: nix::unistd::getgroups()
                    .unwrap()
                    .into_iter()
                    .map(|g| g.as_raw())
                    .collect(),
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

    #[cfg(unix)]
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

    #[cfg(unix)]
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

    /// A stand-in for a hybrid-vsock backend (the host side of `vhost-device-vsock`):
    /// answers `CONNECT 7711` with `OK 7711` and relays to `guest`, closes the
    /// connection for any other port, and — like the real one, which has no half-close
    /// — ends the whole connection as soon as the host side stops writing.
    #[cfg(unix)]
    async fn fake_backend(uds: std::path::PathBuf, guest: Endpoint) {
        let listener = UnixListener::bind(&uds).unwrap();
        loop {
            let (mut host, _) = listener.accept().await.unwrap();
            let guest = guest.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                match line.as_slice() {
                    b"CONNECT 7711" => host.write_all(b"OK 7711\n").await.unwrap(),
                    b"CONNECT 7799" => {
                        return host.write_all(b"HTTP/1.1 400 Bad\r\n\r\n").await.unwrap()
                    }
                    _ => return,
                }
                let inner = connect(&guest).await.unwrap();
                let (mut hr, mut hw) = tokio::io::split(host);
                let (mut gr, mut gw) = tokio::io::split(inner);
                tokio::select! {
                    // The host side's EOF ends the whole connection.
                    _ = tokio::io::copy(&mut hr, &mut gw) => {}
                    _ = tokio::io::copy(&mut gr, &mut hw) => {}
                }
            });
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn vsock_uds_speaks_the_handshake_and_carries_http() {
        use axum::{routing::post, Router};
        let dir = tempfile::tempdir().unwrap();
        let guest_ep = Endpoint::Unix(dir.path().join("guest.sock"));
        let guest = Listener::bind(&guest_ep).await.unwrap();
        let app = Router::new().route("/echo", post(|body: String| async move { body }));
        let server = tokio::spawn(async move { axum::serve(guest, app).await });
        let uds = dir.path().join("vm3.vsock");
        let backend = tokio::spawn(fake_backend(uds.clone(), guest_ep));
        while !uds.exists() {
            tokio::task::yield_now().await;
        }

        let ep: Endpoint = format!("vsock-uds:{}:7711,cid=3", uds.display())
            .parse()
            .unwrap();
        for size in [5usize, 1 << 20] {
            let body = "x".repeat(size);
            let req = http::Request::post("/echo")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                .unwrap();
            let resp = crate::client::send(&ep, req).await.unwrap();
            assert_eq!(resp.status(), 200);
            use http_body_util::BodyExt;
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), size, "the whole answer arrived");
        }

        // No listener on the guest's port: the backend closes; the error says so.
        let none: Endpoint = format!("vsock-uds:{}:7712", uds.display()).parse().unwrap();
        let err = connect(&none).await.unwrap_err().to_string();
        assert!(
            err.contains("no listener on port 7712 in the guest"),
            "{err}"
        );
        // Something that is not a hybrid-vsock backend.
        let other: Endpoint = format!("vsock-uds:{}:7799", uds.display()).parse().unwrap();
        let err = connect(&other).await.unwrap_err().to_string();
        assert!(err.contains("instead of \"OK <port>\""), "{err}");
        // No backend at all.
        let gone: Endpoint = format!("vsock-uds:{}:7711", dir.path().join("no.vsock").display())
            .parse()
            .unwrap();
        let err = connect(&gone).await.unwrap_err();
        assert_eq!(err.io().kind(), io::ErrorKind::NotFound);
        backend.abort();
        server.abort();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn vsock_uds_streams_never_half_close() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("b.vsock");
        let listener = UnixListener::bind(&uds).unwrap();
        let ep: Endpoint = format!("vsock-uds:{}:5", uds.display()).parse().unwrap();
        let client = tokio::spawn(async move {
            let mut s = connect(&ep).await.unwrap();
            s.write_all(b"x").await.unwrap();
            s.shutdown().await.unwrap();
            s
        });
        let (mut backend, _) = listener.accept().await.unwrap();
        let mut line = [0u8; 10];
        backend.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"CONNECT 5\n");
        backend.write_all(b"OK 5\n").await.unwrap();
        let s = client.await.unwrap();
        let mut b = [0u8; 1];
        backend.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x", "nothing of the stream went to the handshake");
        // The client's shutdown() has returned: a write shutdown would be an EOF now.
        match backend.try_read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("the backend saw {other:?}: a half-close"),
        }
        drop(s);
        assert_eq!(backend.read(&mut b).await.unwrap(), 0, "dropping closes");
    }

    /// A caller that gives up while `CONNECT` is unanswered (its own time limit, a
    /// dropped future) leaves the connection open until the backend answers: a late
    /// `OK` is written without error, and only then is the connection closed.
    #[cfg(unix)]
    #[tokio::test]
    async fn an_abandoned_connect_stays_open_until_the_backend_answers() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("slow.vsock");
        let listener = UnixListener::bind(&uds).unwrap();
        let ep: Endpoint = format!("vsock-uds:{}:7711", uds.display()).parse().unwrap();
        let caller = tokio::spawn(async move { connect(&ep).await.map(drop) });
        let (mut backend, _) = listener.accept().await.unwrap();
        let mut line = [0u8; 13];
        backend.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"CONNECT 7711\n");
        // The caller stops waiting before the guest has accepted.
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The guest accepts late: the answer still has a reader...
        backend.write_all(b"OK 7711\n").await.unwrap();
        // ...which then closes the connection nobody wants any more.
        let mut b = [0u8; 1];
        assert_eq!(backend.read(&mut b).await.unwrap(), 0);
        // Nobody waiting for a refusal either: the close follows the backend's own.
        let ep: Endpoint = format!("vsock-uds:{}:7712", uds.display()).parse().unwrap();
        let caller = tokio::spawn(async move { connect(&ep).await.map(drop) });
        let (mut backend, _) = listener.accept().await.unwrap();
        backend.read_exact(&mut line).await.unwrap();
        caller.abort();
        let _ = caller.await;
        match backend.try_read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("the abandoned CONNECT was closed unanswered: {other:?}"),
        }
        drop(backend);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn vsock_uds_listener_binds_path_port_and_vouches_for_the_guest_cid() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm3.vsock");
        let no_cid: Endpoint = format!("vsock-uds:{}:7710", uds.display()).parse().unwrap();
        let err = Listener::bind(&no_cid).await.unwrap_err().to_string();
        assert!(err.contains("add its CID"), "{err}");

        let ep: Endpoint = format!("vsock-uds:{}:7710,cid=3", uds.display())
            .parse()
            .unwrap();
        let mut listener = Listener::bind(&ep).await.unwrap();
        assert_eq!(listener.local_endpoint().unwrap(), ep);
        let path = hybrid_listen_path(&uds, 7710);
        assert_eq!(path, dir.path().join("vm3.vsock_7710"));
        // What the backend does for a guest connecting to CID 2 port 7710.
        let c = tokio::spawn(async move {
            let mut s = UnixStream::connect(path).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            s
        });
        let (mut stream, peer) = listener.accept_peer().await.unwrap();
        assert_eq!(peer, Peer::Vsock { cid: 3, port: 0 });
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        drop(c.await.unwrap());
    }
}
