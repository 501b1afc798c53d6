//! Endpoint addresses: `vsock:CID:PORT`, `vsock-uds:PATH:PORT[,cid=CID]`, `unix:PATH`,
//! `tcp:HOST:PORT`, `tls:HOST:PORT`.
//!
//! One syntax for every place an address is written: configuration files, command
//! lines and error messages. `vsock:any:PORT` listens on every CID.
//!
//! `vsock-uds:` is a guest's vsock reached through the unix socket of a hybrid-vsock
//! backend (Firecracker, Cloud Hypervisor, `vhost-device-vsock`): `PATH` is the
//! backend's `uds-path`. Connecting speaks the `CONNECT PORT` handshake to the guest's
//! port; listening binds `PATH_PORT`, where the backend delivers the guest's
//! connections to the host (CID 2) port `PORT`. `cid=` names the guest's CID: a
//! listener needs it (it is the caller's identity), a client may give it for messages.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The CID a vsock listener uses to accept from any peer (`VMADDR_CID_ANY`).
pub const VSOCK_CID_ANY: u32 = u32::MAX;
/// The CID of the host, as seen from a guest (`VMADDR_CID_HOST`).
pub const VSOCK_CID_HOST: u32 = 2;
/// The port `signetd` serves clients on.
pub const DEFAULT_DAEMON_PORT: u32 = 771;
/// The port `signet-agent` serves the host daemon on.
pub const DEFAULT_AGENT_PORT: u32 = 7711;

/// Where to connect to, or listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A virtio-vsock address; `cid` is [`VSOCK_CID_ANY`] for "listen on every CID".
    Vsock { cid: u32, port: u32 },
    /// A guest's vsock port behind a hybrid-vsock backend's unix socket `path`
    /// (its `uds-path`); `cid` is the guest's CID, when known.
    VsockUds {
        path: PathBuf,
        port: u32,
        cid: Option<u32>,
    },
    /// A unix stream socket at a path.
    Unix(PathBuf),
    /// A TCP address; `host` is a name or an IP address (IPv6 without brackets).
    Tcp { host: String, port: u16 },
    /// A TCP address spoken to with TLS; the server's certificate must name `host`.
    /// Listening on it binds plain TCP: the server adds TLS (signetd's `[tls]`).
    Tls { host: String, port: u16 },
}

/// Why an endpoint string was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} has no scheme: write vsock:CID:PORT, vsock-uds:PATH:PORT, unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")]
    NoScheme(String),
    #[error(
        "endpoint {0:?} has an unknown scheme: write vsock:CID:PORT, vsock-uds:PATH:PORT, unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"
    )]
    UnknownScheme(String),
    #[error("endpoint {0:?}: a vsock address is vsock:CID:PORT, e.g. vsock:2:771 (CID may be \"any\" when listening)")]
    Vsock(String),
    #[error("endpoint {0:?}: a hybrid-vsock address is vsock-uds:PATH:PORT or vsock-uds:PATH:PORT,cid=CID with PATH the backend's uds-path, e.g. vsock-uds:/run/signet/vm105.vsock:7711,cid=105")]
    VsockUds(String),
    #[error(
        "endpoint {0:?}: a unix endpoint needs a socket path, e.g. unix:/run/signet/signetd.sock"
    )]
    Unix(String),
    #[error("endpoint {0:?}: a TCP address is tcp:HOST:PORT with a port from 1 to 65535, e.g. tcp:127.0.0.1:7710 or tcp:[::1]:7710")]
    Tcp(String),
    #[error("endpoint {0:?}: a TLS address is tls:HOST:PORT with a port from 1 to 65535, e.g. tls:signet.example:7443")]
    Tls(String),
}

impl Endpoint {
    /// The default endpoint a client in a build VM uses: the host's vsock port.
    pub fn default_client() -> Self {
        Endpoint::Vsock {
            cid: VSOCK_CID_HOST,
            port: DEFAULT_DAEMON_PORT,
        }
    }

    /// The default endpoint of an agent in the signing VM with the given CID.
    pub fn default_agent(signing_vm_cid: u32) -> Self {
        Endpoint::Vsock {
            cid: signing_vm_cid,
            port: DEFAULT_AGENT_PORT,
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| EndpointError::NoScheme(s.to_owned()))?;
        match scheme {
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| EndpointError::Vsock(s.to_owned()))?;
                let cid = match cid {
                    "any" => VSOCK_CID_ANY,
                    c => c.parse().map_err(|_| EndpointError::Vsock(s.to_owned()))?,
                };
                let port = port
                    .parse()
                    .map_err(|_| EndpointError::Vsock(s.to_owned()))?;
                Ok(Endpoint::Vsock { cid, port })
            }
            "vsock-uds" => vsock_uds(rest).ok_or_else(|| EndpointError::VsockUds(s.to_owned())),
            "unix" => {
                if rest.is_empty() {
                    return Err(EndpointError::Unix(s.to_owned()));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "tcp" => {
                let (host, port) =
                    host_port(rest).ok_or_else(|| EndpointError::Tcp(s.to_owned()))?;
                Ok(Endpoint::Tcp { host, port })
            }
            "tls" => {
                let (host, port) =
                    host_port(rest).ok_or_else(|| EndpointError::Tls(s.to_owned()))?;
                Ok(Endpoint::Tls { host, port })
            }
            _ if scheme.contains('/') => Err(EndpointError::NoScheme(s.to_owned())),
            _ => Err(EndpointError::UnknownScheme(s.to_owned())),
        }
    }
}

/// `PATH:PORT` or `PATH:PORT,cid=CID`; the port is after the last `:`.
fn vsock_uds(rest: &str) -> Option<Endpoint> {
    let (path, tail) = rest.rsplit_once(':')?;
    let (port, cid) = match tail.split_once(',') {
        Some((port, opt)) => (port, Some(opt.strip_prefix("cid=")?.parse().ok()?)),
        None => (tail, None),
    };
    if path.is_empty() || cid == Some(VSOCK_CID_ANY) {
        return None;
    }
    Some(Endpoint::VsockUds {
        path: PathBuf::from(path),
        port: port.parse().ok()?,
        cid,
    })
}

impl Endpoint {
    /// The vsock CID of the VM this endpoint reaches, when it names one.
    pub fn vsock_cid(&self) -> Option<u32> {
        match self {
            Endpoint::Vsock { cid, .. } if *cid != VSOCK_CID_ANY => Some(*cid),
            Endpoint::VsockUds { cid, .. } => *cid,
            _ => None,
        }
    }
}

/// `HOST:PORT` or `[IPV6]:PORT`.
fn host_port(rest: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, tail) = v6.split_once(']')?;
        (host, tail.strip_prefix(':')?)
    } else {
        rest.rsplit_once(':')?
    };
    if host.is_empty()
        || host.contains(['[', ']'])
        || (host.contains(':') && !rest.starts_with('['))
    {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } if *cid == VSOCK_CID_ANY => write!(f, "vsock:any:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::VsockUds { path, port, cid } => {
                write!(f, "vsock-uds:{}:{port}", path.display())?;
                match cid {
                    Some(cid) => write!(f, ",cid={cid}"),
                    None => Ok(()),
                }
            }
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Tls { host, port } if host.contains(':') => write!(f, "tls:[{host}]:{port}"),
            Endpoint::Tls { host, port } => write!(f, "tls:{host}:{port}"),
        }
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Endpoint {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_each_scheme_and_prints_it_back() {
        for (text, want) in [
            ("vsock:2:7710", Endpoint::Vsock { cid: 2, port: 7710 }),
            (
                "vsock:any:7711",
                Endpoint::Vsock {
                    cid: VSOCK_CID_ANY,
                    port: 7711,
                },
            ),
            (
                "vsock:4294967295:1",
                Endpoint::Vsock {
                    cid: VSOCK_CID_ANY,
                    port: 1,
                },
            ),
            (
                "vsock-uds:/run/lab/vm3.vsock:7711",
                Endpoint::VsockUds {
                    path: "/run/lab/vm3.vsock".into(),
                    port: 7711,
                    cid: None,
                },
            ),
            (
                "vsock-uds:/run/a:b/vm3.vsock:7710,cid=3",
                Endpoint::VsockUds {
                    path: "/run/a:b/vm3.vsock".into(),
                    port: 7710,
                    cid: Some(3),
                },
            ),
            (
                "unix:/run/signet/signetd.sock",
                Endpoint::Unix("/run/signet/signetd.sock".into()),
            ),
            ("unix:rel/a:b.sock", Endpoint::Unix("rel/a:b.sock".into())),
            (
                "tcp:127.0.0.1:7710",
                Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 7710,
                },
            ),
            (
                "tcp:localhost:0",
                Endpoint::Tcp {
                    host: "localhost".into(),
                    port: 0,
                },
            ),
            (
                "tls:signet.example:7443",
                Endpoint::Tls {
                    host: "signet.example".into(),
                    port: 7443,
                },
            ),
            (
                "tls:[::1]:7443",
                Endpoint::Tls {
                    host: "::1".into(),
                    port: 7443,
                },
            ),
            (
                "tcp:[::1]:7710",
                Endpoint::Tcp {
                    host: "::1".into(),
                    port: 7710,
                },
            ),
        ] {
            assert_eq!(ok(text), want, "{text}");
            let printed = want.to_string();
            assert_eq!(ok(&printed), want, "round trip of {printed}");
        }
        assert_eq!(ok("vsock:4294967295:1").to_string(), "vsock:any:1");
    }

    #[test]
    fn the_vm_cid_an_endpoint_names() {
        assert_eq!(ok("vsock:105:7711").vsock_cid(), Some(105));
        assert_eq!(ok("vsock:any:7710").vsock_cid(), None);
        assert_eq!(ok("vsock-uds:/v.vsock:7711,cid=3").vsock_cid(), Some(3));
        assert_eq!(ok("vsock-uds:/v.vsock:7711").vsock_cid(), None);
        assert_eq!(ok("unix:/a").vsock_cid(), None);
    }

    #[test]
    fn defaults_are_the_documented_ports() {
        assert_eq!(Endpoint::default_client().to_string(), "vsock:2:771");
        assert_eq!(Endpoint::default_agent(105).to_string(), "vsock:105:7711");
    }

    #[test]
    fn rejects_bad_addresses_with_the_syntax_in_the_message() {
        for (text, variant) in [
            ("/run/x.sock", "NoScheme"),
            ("7710", "NoScheme"),
            ("http://x", "UnknownScheme"),
            ("vsok:2:7710", "UnknownScheme"),
            ("vsock:2", "Vsock"),
            ("vsock:two:7710", "Vsock"),
            ("vsock:2:port", "Vsock"),
            ("vsock:-1:7710", "Vsock"),
            ("vsock:2:99999999999", "Vsock"),
            ("unix:", "Unix"),
            ("vsock-uds:/x.vsock", "VsockUds"),
            ("vsock-uds::7711", "VsockUds"),
            ("vsock-uds:/x.vsock:port", "VsockUds"),
            ("vsock-uds:/x.vsock:7711,cid=", "VsockUds"),
            ("vsock-uds:/x.vsock:7711,guest=3", "VsockUds"),
            ("vsock-uds:/x.vsock:7711,cid=4294967295", "VsockUds"),
            ("tcp:127.0.0.1", "Tcp"),
            ("tcp::7710", "Tcp"),
            ("tcp:127.0.0.1:65536", "Tcp"),
            ("tcp:::1:7710", "Tcp"),
            ("tcp:[::1]7710", "Tcp"),
            ("tcp:[::1:7710", "Tcp"),
            ("tls:host", "Tls"),
            ("tls:host:x", "Tls"),
        ] {
            let err = text.parse::<Endpoint>().expect_err(text);
            assert!(format!("{err:?}").starts_with(variant), "{text}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(text), "{msg} names the input");
            assert!(
                msg.contains("e.g.") || msg.contains("write "),
                "{msg} shows the syntax"
            );
        }
    }

    #[test]
    fn deserializes_from_config_strings() {
        #[derive(serde::Deserialize)]
        struct C {
            e: Endpoint,
        }
        let c: C = serde_json::from_str(r#"{"e":"tcp:127.0.0.1:1"}"#).unwrap();
        assert_eq!(c.e.to_string(), "tcp:127.0.0.1:1");
        let err = serde_json::from_str::<C>(r#"{"e":"nope"}"#).err().unwrap();
        assert!(err.to_string().contains("vsock:CID:PORT"));
    }
}
