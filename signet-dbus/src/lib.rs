//! `signet-dbus`: the D-Bus interface `org.signet.Signet1.Manager`, declared once.
//!
//! - [`Service`] — what the daemon implements: one method per D-Bus method, given the
//!   call ([`Call`]: the connection and the message's header, to learn the caller).
//! - [`Server`] — the `#[zbus::interface]` over any [`Service`]: the methods, the
//!   signals (`JobFinished`, `RecoveryStep`, `TokenChanged`) and the `Version`
//!   property, served at [`OBJECT_PATH`] under [`BUS_NAME`].
//! - [`ManagerProxy`] — the client's side of the same interface, for `signetctl`.
//! - [`Error`] — a refused command as a named error, `org.signet.Signet1.Error.<Code>`
//!   after its [`ErrorCode`], with the message the HTTP API gives; [`error_code`]
//!   reads the code back.
//!
//! Every method answers JSON text (the types of `signet_api::wire` and
//! `signet_api::operator`), the same JSON the HTTP API gives. The proxy and the server
//! sit side by side here, and this crate's tests call every method and receive every
//! signal through the proxy from the server, and hold the server's introspection to
//! the proxy's list ([`METHODS`], [`SIGNALS`]), so the two cannot drift apart.
//!
//! It depends on `signet-api` and zbus only.

use std::future::Future;

use signet_api::wire::{ErrorBody, ErrorCode};
use zbus::object_server::SignalEmitter;

/// The daemon's well-known name on the bus.
pub const BUS_NAME: &str = "org.signet.Signet1";
/// The object that carries [`INTERFACE`].
pub const OBJECT_PATH: &str = "/org/signet/Signet1";
/// The interface (the version is in the names).
pub const INTERFACE: &str = "org.signet.Signet1.Manager";
/// The prefix of Signet's error names.
pub const ERROR_PREFIX: &str = "org.signet.Signet1.Error";

/// The interface's methods, as D-Bus names them.
pub const METHODS: [&str; 12] = [
    "Status",
    "Jobs",
    "Cancel",
    "AuditTail",
    "AuditExport",
    "AuditVerify",
    "Doctor",
    "Tokens",
    "Attach",
    "Detach",
    "Reattach",
    "Enroll",
];

/// The interface's signals, as D-Bus names them.
pub const SIGNALS: [&str; 3] = ["JobFinished", "RecoveryStep", "TokenChanged"];

/// A method call as the server sees it: the connection it came on and its header
/// (its sender), from which the daemon learns who is calling.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub connection: &'a zbus::Connection,
    pub header: &'a zbus::message::Header<'a>,
}

/// What the daemon does for each method of [`INTERFACE`]; [`Server`] puts it on the
/// bus. Each answers JSON text or a refusal ([`Error`]).
pub trait Service: Send + Sync + 'static {
    /// The appliance's status: the `DaemonStatus` of `GET /v1/status`.
    fn status(&self, call: Call<'_>) -> impl Future<Output = Result<String, Error>> + Send;
    /// The jobs: the `JobList` of `GET /v1/operator/jobs`; `recent` ended jobs (0: the
    /// default).
    fn jobs(
        &self,
        recent: u32,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Cancels a queued job; answers its `JobView`.
    fn cancel(
        &self,
        id: &str,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// The newest `n` audit records (0: the default), an array of `AuditRecord`.
    fn audit_tail(
        &self,
        n: u32,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// The audit records since an RFC 3339 time ("": all), an array.
    fn audit_export(
        &self,
        since: &str,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// The audit chain's check, an `AuditCheck`.
    fn audit_verify(&self, call: Call<'_>) -> impl Future<Output = Result<String, Error>> + Send;
    /// The host checks, a `DoctorReport`.
    fn doctor(&self, call: Call<'_>) -> impl Future<Output = Result<String, Error>> + Send;
    /// Every token and where it is: the `TokensReport` of `GET /v1/tokens`.
    fn tokens(&self, call: Call<'_>) -> impl Future<Output = Result<String, Error>> + Send;
    /// Puts a token into its signing VM (`vmid` 0: its assigned VM); answers the token.
    fn attach(
        &self,
        serial: &str,
        vmid: u32,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Takes a token out of its VM and keeps it on the host; answers the token.
    fn detach(
        &self,
        serial: &str,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Detaches a token from its VM and attaches it anew; answers the token.
    fn reattach(
        &self,
        serial: &str,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Enrolls a VM (`role` `build-vm` with `profiles`, or `signing-vm` with the token
    /// `serial`); without `apply` a dry run. Answers the `EnrollReport`.
    fn enroll(
        &self,
        request: Enroll,
        call: Call<'_>,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// The daemon's version.
    fn version(&self) -> String {
        signet_api::VERSION.to_owned()
    }
}

/// The arguments of `Enroll`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enroll {
    pub role: String,
    pub vmid: u32,
    pub serial: String,
    pub profiles: Vec<String>,
    pub apply: bool,
}

/// [`INTERFACE`] over a [`Service`]: serve it at [`OBJECT_PATH`]; its signals are sent
/// with `Server::<S>::job_finished(&emitter, ...)` and the like.
#[derive(Debug)]
pub struct Server<S>(pub S);

#[zbus::interface(name = "org.signet.Signet1.Manager")]
impl<S: Service> Server<S> {
    /// The appliance's status as JSON: the `DaemonStatus` of `GET /v1/status`.
    async fn status(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.status(Call::new(connection, &header)).await
    }

    /// The jobs as JSON: the `JobList` of `GET /v1/operator/jobs`, every caller's for
    /// an operator, a signer's own for a signer; `recent` ended jobs (0: the default).
    async fn jobs(
        &self,
        recent: u32,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.jobs(recent, Call::new(connection, &header)).await
    }

    /// Cancels a queued job (an operator: anyone's; a signer: its own); answers its
    /// `JobView` as JSON.
    async fn cancel(
        &self,
        id: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.cancel(id, Call::new(connection, &header)).await
    }

    /// The newest `n` audit records (0: the default), a JSON array of `AuditRecord`.
    async fn audit_tail(
        &self,
        n: u32,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.audit_tail(n, Call::new(connection, &header)).await
    }

    /// The audit records since an RFC 3339 time ("": all), a JSON array.
    async fn audit_export(
        &self,
        since: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0
            .audit_export(since, Call::new(connection, &header))
            .await
    }

    /// The audit chain's check, an `AuditCheck` as JSON.
    async fn audit_verify(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.audit_verify(Call::new(connection, &header)).await
    }

    /// The host checks, a `DoctorReport` as JSON.
    async fn doctor(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.doctor(Call::new(connection, &header)).await
    }

    /// A job ended (signed, failed or cancelled): its id, its state and its
    /// `JobSummary` as JSON.
    #[zbus(signal)]
    pub async fn job_finished(
        emitter: &SignalEmitter<'_>,
        id: &str,
        state: &str,
        job: &str,
    ) -> zbus::Result<()>;

    /// A step of recovery was seen or taken: the `TimelineEntry` as JSON (its
    /// `event`, `detail` and, for a return, `duration_ms`).
    #[zbus(signal)]
    pub async fn recovery_step(
        emitter: &SignalEmitter<'_>,
        event: &str,
        entry: &str,
    ) -> zbus::Result<()>;

    /// Every token and where it is: the `TokensReport` of `GET /v1/tokens`.
    async fn tokens(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.tokens(Call::new(connection, &header)).await
    }

    /// Puts a token into its signing VM; `vmid` 0 means its assigned VM, another VM
    /// than the assigned one is refused. Answers the token (JSON).
    async fn attach(
        &self,
        serial: &str,
        vmid: u32,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0
            .attach(serial, vmid, Call::new(connection, &header))
            .await
    }

    /// Takes a token out of its VM and keeps it on the host until attached again.
    async fn detach(
        &self,
        serial: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0.detach(serial, Call::new(connection, &header)).await
    }

    /// Detaches a token from its VM and attaches it anew.
    async fn reattach(
        &self,
        serial: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        self.0
            .reattach(serial, Call::new(connection, &header))
            .await
    }

    /// Enrolls a VM: `role` `build-vm` (with `profiles`; none: the default profile)
    /// or `signing-vm` (with the token `serial`, plugged into this host); without
    /// `apply` a dry run that changes nothing. Answers the change (`EnrollReport`,
    /// JSON).
    #[allow(clippy::too_many_arguments)]
    async fn enroll(
        &self,
        role: &str,
        vmid: u32,
        serial: &str,
        profiles: Vec<String>,
        apply: bool,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, Error> {
        let request = Enroll {
            role: role.to_owned(),
            vmid,
            serial: serial.to_owned(),
            profiles,
            apply,
        };
        self.0.enroll(request, Call::new(connection, &header)).await
    }

    /// A token's state changed: the token as `Tokens` lists it (JSON).
    #[zbus(signal)]
    pub async fn token_changed(emitter: &SignalEmitter<'_>, token: &str) -> zbus::Result<()>;

    /// The daemon's version.
    #[zbus(property)]
    async fn version(&self) -> String {
        self.0.version()
    }
}

impl<'a> Call<'a> {
    fn new(connection: &'a zbus::Connection, header: &'a zbus::message::Header<'a>) -> Self {
        Call { connection, header }
    }
}

/// The client's side of [`INTERFACE`] (`ManagerProxy`), at [`BUS_NAME`] and
/// [`OBJECT_PATH`] unless told otherwise.
#[zbus::proxy(
    interface = "org.signet.Signet1.Manager",
    default_service = "org.signet.Signet1",
    default_path = "/org/signet/Signet1"
)]
pub trait Manager {
    async fn status(&self) -> zbus::Result<String>;
    async fn jobs(&self, recent: u32) -> zbus::Result<String>;
    async fn cancel(&self, id: &str) -> zbus::Result<String>;
    async fn audit_tail(&self, n: u32) -> zbus::Result<String>;
    async fn audit_export(&self, since: &str) -> zbus::Result<String>;
    async fn audit_verify(&self) -> zbus::Result<String>;
    async fn doctor(&self) -> zbus::Result<String>;
    async fn tokens(&self) -> zbus::Result<String>;
    async fn attach(&self, serial: &str, vmid: u32) -> zbus::Result<String>;
    async fn detach(&self, serial: &str) -> zbus::Result<String>;
    async fn reattach(&self, serial: &str) -> zbus::Result<String>;
    async fn enroll(
        &self,
        role: &str,
        vmid: u32,
        serial: &str,
        profiles: Vec<String>,
        apply: bool,
    ) -> zbus::Result<String>;
    #[zbus(signal)]
    fn job_finished(&self, id: &str, state: &str, job: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn recovery_step(&self, event: &str, entry: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn token_changed(&self, token: &str) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// A command's error on the bus: named `org.signet.Signet1.Error.<Code>` after its
/// [`ErrorCode`] (`unknown_job` → `UnknownJob`), with the message HTTP gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    name: zbus::names::OwnedErrorName,
    message: String,
}

/// The D-Bus error name of an error code.
pub fn error_name(code: ErrorCode) -> String {
    let camel: String = code
        .as_str()
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!("{ERROR_PREFIX}.{camel}")
}

/// The [`ErrorCode`] a named error stands for, if it is one of Signet's.
pub fn error_code(name: &str) -> Option<ErrorCode> {
    ErrorCode::ALL.into_iter().find(|c| error_name(*c) == name)
}

impl From<ErrorBody> for Error {
    fn from(e: ErrorBody) -> Self {
        let name = zbus::names::ErrorName::try_from(error_name(e.code))
            .map(Into::into)
            .unwrap_or_else(|_| {
                zbus::names::OwnedErrorName::from(
                    zbus::names::ErrorName::from_static_str_unchecked(
                        "org.signet.Signet1.Error.Internal",
                    ),
                )
            });
        Error {
            name,
            message: e.message,
        }
    }
}

impl zbus::DBusError for Error {
    fn create_reply(&self, call: &zbus::message::Header<'_>) -> zbus::Result<zbus::Message> {
        zbus::Message::error(call, self.name.as_ref()).build(&(self.message.as_str(),))
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        self.name.as_ref()
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
