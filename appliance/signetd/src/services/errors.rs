//! What goes wrong in the services, as they say it: on the signing path, the job
//! service and the callers' door ([`JobError`], [`AuthError`]); for the operator, the
//! audited actions and commands ([`OperatorError`]), the read model ([`ReadError`]) and
//! the token service ([`TokenError`]). Each variant carries the facts of its case. The
//! services return these; the fronts turn them into the wire's [`ErrorBody`] (code,
//! message, retryable) with `ErrorBody::from`, below, as they answer.
//!
//! The mapping lives here, one layer under the fronts, because some services record
//! the words they answer with: a job's error is also recorded in the job database
//! (`GET /v1/jobs/{id}` returns it verbatim, the audit log keeps its code), and an
//! operator's refused action is audited with its code ([`crate::services::operate::record`]).
//! Errors that come from the agent are the wire's already: the worker keeps them as
//! [`ErrorBody`] (after [`crate::services::agent::client_view`]), and a failed job's
//! recorded error comes back as [`JobError::Failed`].

use std::net::IpAddr;
use std::time::Duration;

use signet_api::wire::{ErrorBody, ErrorCode, JobState};

use crate::config::edit::EditError;
use crate::core::passthrough;
use crate::core::policy::Refusal;
use crate::core::roles::RoleRefusal;
use crate::services::tokens::TokenError;

/// The longest idempotency key accepted.
pub const MAX_KEY_LEN: usize = 200;

/// Why the callers' door did not let a caller in ([`crate::services::callers`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no client credentials were sent")]
    NoCredentials,
    #[error("this appliance has no client database")]
    NoClientDatabase,
    /// Unknown name, wrong secret or an expired secret (which one is for the log).
    #[error("the credentials of client {name:?} are not valid")]
    Invalid { name: String },
    /// Too many wrong secrets from this address; the next is checked after `wait`.
    #[error("too many wrong client secrets came from {ip}")]
    Throttled { ip: IpAddr, wait: Duration },
    /// The client database could not be read (why is in the log).
    #[error("the client database could not be read")]
    Database,
}

/// Why a signing request, a job or its result was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The front could not read the request as sent (its query): the front's words.
    #[error("the request was refused as sent: {}", .0.message)]
    Request(ErrorBody),
    #[error("there is no signing profile {name:?}")]
    UnknownProfile {
        name: String,
        known: Vec<String>,
        default: String,
    },
    #[error(transparent)]
    Forbidden(Refusal),
    #[error("the filename is not a bare file name of at most 255 bytes")]
    BadFilename,
    /// The declared size is above the profile's limit.
    #[error("the input is larger than {max} bytes")]
    TooLarge { max: u64 },
    /// The upload ran into a limit as it streamed ([`crate::limits`]): its words.
    #[error("the upload ran into a limit: {}", .0.message)]
    Limit(ErrorBody),
    #[error("a malformed Idempotency-Key")]
    BadIdempotencyKey,
    #[error("a batch that is not multipart/form-data")]
    BadBatch,
    /// The key of job `id` came with another request (`what` it asked for).
    #[error("the Idempotency-Key {key:?} of job {id} came with {what}")]
    KeyReused {
        key: String,
        id: String,
        what: &'static str,
    },
    /// The key's job `id` is still being uploaded.
    #[error("job {id} of this Idempotency-Key is still being uploaded")]
    StillUploading { id: String },
    /// The request's `x-signet-profile` precondition is not profile `name`'s answer
    /// as it is now.
    #[error("profile {name:?} changed since the client asked how it signs")]
    ProfileChanged { name: String },
    /// The spool has no room for the upload (`len` bytes, when declared).
    #[error("the spool has no room ({used} of {quota} bytes in use)")]
    SpoolFull {
        len: Option<u64>,
        used: u64,
        quota: u64,
    },
    /// The disk under the state directory is full (where is in the log).
    #[error("the disk of the state directory is full")]
    DiskFull,
    /// The upload broke off while it was spooled.
    #[error("the upload broke off before the end ({why})")]
    Truncated { why: String },
    /// The upload of a request with a known key broke off while it was compared.
    #[error("the repeated upload broke off before the end ({why})")]
    TruncatedRepeat { why: String },
    /// New work is refused: the host drains for a shutdown.
    #[error("the appliance is stopping")]
    ShuttingDown,
    /// signetd stops and cut the upload short.
    #[error("signetd is stopping and cut the upload short")]
    UploadCut,
    /// signetd stops while job `id` waits; it stays queued.
    #[error("signetd is stopping; job {id} stays queued")]
    StaysQueued { id: String },
    #[error("there is no job {id:?} of this caller")]
    UnknownJob { id: String },
    #[error("job {id} is {} and can no longer be cancelled", .state.as_str())]
    NotCancellable { id: String, state: JobState },
    #[error("job {id} is {} and has no result yet", .state.as_str())]
    NoResultYet { id: String, state: JobState },
    /// Job `id`'s result is no longer kept (`ttl`: the results' lifetime, in seconds).
    #[error("job {id}'s result is no longer kept")]
    ResultExpired { id: String, ttl: u64 },
    /// Job `id`'s result was delivered and the copy kept for a retry is gone.
    #[error("job {id}'s result was delivered and its copy is gone")]
    DeliveredCopyGone { id: String, ttl: u64 },
    /// The job failed or was cancelled: its recorded error (the agent's, after
    /// `client_view`, or the worker's).
    #[error("the job failed: {}", .0.message)]
    Failed(ErrorBody),
    /// signetd failed at `what` (details in the log, keyed by `job`).
    #[error("the appliance failed internally ({what}, job {job})")]
    Internal { job: String, what: &'static str },
}

impl JobError {
    /// signetd failed at `what` for job `job` (`-` before it has an id): logs `e`.
    pub(crate) fn internal(job: &str, what: &'static str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(job, error = %e, "{what}");
        JobError::Internal {
            job: job.to_owned(),
            what,
        }
    }

    /// The disk under `state_dir` is full: logs where, for the operator.
    pub(crate) fn disk_full(
        state_dir: &std::path::Path,
        job: &str,
        e: &dyn std::fmt::Display,
    ) -> Self {
        tracing::error!(job, error = %e, state_dir = %state_dir.display(), "the disk of the state directory is full; free space on it (old logs, other files) or move state_dir to a bigger disk");
        JobError::DiskFull
    }
}

impl From<AuthError> for ErrorBody {
    fn from(e: AuthError) -> Self {
        ErrorBody::from(&e)
    }
}

impl From<&AuthError> for ErrorBody {
    fn from(e: &AuthError) -> Self {
        let refused = |why: &str| {
            ErrorBody::new(
                ErrorCode::Forbidden,
                format!("{why}; send the client's name and secret with HTTP Basic authentication (curl -u NAME:SECRET). The appliance's operator adds clients with `signetd client add`"),
            )
        };
        match e {
            AuthError::NoCredentials => refused("no client credentials were sent"),
            AuthError::NoClientDatabase => refused("this appliance has no client database"),
            AuthError::Invalid { name } => refused(&format!(
                "the credentials of client {name:?} are not valid (unknown name, wrong secret, or an expired secret)"
            )),
            AuthError::Throttled { ip, wait } => ErrorBody::new(
                ErrorCode::TooManyAttempts,
                format!(
                    "too many wrong client secrets came from {ip}; the next one is checked in {} s (Retry-After). Check the client's name and SIGNET_SECRET",
                    wait.as_secs().max(1)
                ),
            )
            .retryable(true),
            AuthError::Database => ErrorBody::new(
                ErrorCode::Internal,
                "the appliance could not check client credentials; its operator sees why in signetd's log",
            ),
        }
    }
}

impl From<JobError> for ErrorBody {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Request(b) | JobError::Limit(b) | JobError::Failed(b) => b,
            e => ErrorBody::from(&e),
        }
    }
}

impl From<&JobError> for ErrorBody {
    fn from(e: &JobError) -> Self {
        match e {
            JobError::Auth(a) => a.into(),
            JobError::Request(b) | JobError::Limit(b) | JobError::Failed(b) => b.clone(),
            JobError::UnknownProfile {
                name,
                known,
                default,
            } => ErrorBody::new(
                ErrorCode::UnknownProfile,
                format!(
                    "there is no signing profile {name:?}; profiles: {} (the default is {default:?})",
                    known.join(", "),
                ),
            ),
            JobError::Forbidden(refusal) => ErrorBody::new(ErrorCode::Forbidden, refusal.to_string()),
            JobError::BadFilename => ErrorBody::new(
                ErrorCode::BadRequest,
                "filename must be a bare file name of at most 255 bytes, without directories",
            ),
            JobError::TooLarge { max } => crate::limits::too_large(*max),
            JobError::BadIdempotencyKey => ErrorBody::new(
                ErrorCode::BadRequest,
                format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters, e.g. a UUID"),
            ),
            JobError::BadBatch => ErrorBody::new(
                ErrorCode::BadRequest,
                "a batch is multipart/form-data with one part per file (curl -F file=@a.exe -F file=@b.dll)",
            ),
            JobError::KeyReused { key, id, what } => ErrorBody::new(
                ErrorCode::IdempotencyKeyReused,
                format!("the Idempotency-Key {key:?} was used for job {id}, which asked for {what}; a key names one request: send a new key for another file, profile or options"),
            ),
            JobError::StillUploading { id } => ErrorBody::new(
                ErrorCode::TooManyJobs,
                format!("job {id}, sent with this Idempotency-Key, is still being uploaded; send this request again once that upload has ended"),
            )
            .retryable(true),
            JobError::ProfileChanged { name } => ErrorBody::new(
                ErrorCode::ProfileChanged,
                format!("profile {name:?} changed since this client asked how it signs (x-signet-profile is not its answer now); nothing was uploaded or signed: ask again (GET /v1/profile), make the data as it says and send it again"),
            ),
            JobError::SpoolFull { len, used, quota } => {
                let what = match len {
                    Some(len) => format!("this {len}-byte upload"),
                    None => "this upload".to_owned(),
                };
                ErrorBody::new(
                    ErrorCode::SpoolFull,
                    format!("the appliance's spool has no room for {what} now ({} of {} MiB in use); nothing was uploaded or signed, send it again later", used >> 20, quota >> 20),
                )
            }
            JobError::DiskFull => ErrorBody::new(
                ErrorCode::SpoolFull,
                "the appliance's disk is full, so this upload cannot be spooled; nothing was signed, send it again later. The appliance's operator sees where in signetd's log",
            )
            .retryable(true),
            JobError::Truncated { why } => ErrorBody::new(
                ErrorCode::TruncatedInput,
                format!("the upload broke off before the end ({why}); nothing was signed, send it again"),
            ),
            JobError::TruncatedRepeat { why } => ErrorBody::new(
                ErrorCode::TruncatedInput,
                format!("the upload broke off before the end ({why}); send it again"),
            ),
            JobError::ShuttingDown => ErrorBody::new(
                ErrorCode::ShuttingDown,
                "the appliance is stopping (signetd restarts, or its host shuts down or reboots); nothing was uploaded or signed, send it again in a few minutes",
            )
            .retryable(true),
            JobError::UploadCut => ErrorBody::new(
                ErrorCode::ShuttingDown,
                "signetd is stopping (a restart, or the host's shutdown) and this upload was cut short; nothing was signed, send it again in a few minutes",
            )
            .retryable(true),
            JobError::StaysQueued { id } => ErrorBody::new(
                ErrorCode::ShuttingDown,
                format!("signetd is stopping (a restart, or the host's shutdown); job {id} stays queued and is signed once it is back: collect it then with GET /v1/jobs/{id}/result"),
            )
            .retryable(true),
            JobError::UnknownJob { id } => ErrorBody::new(
                ErrorCode::UnknownJob,
                format!("there is no job {id:?} of yours; job ids are in the x-signet-job header of the answer to the request that sent it"),
            ),
            JobError::NotCancellable { id, state } => ErrorBody::new(
                ErrorCode::BadRequest,
                format!("job {id} is {} and can no longer be cancelled; only a job waiting in the queue can", state.as_str()),
            ),
            JobError::NoResultYet { id, state } => ErrorBody::new(
                ErrorCode::BadRequest,
                format!("job {id} is {} and has no result yet", state.as_str()),
            ),
            JobError::ResultExpired { id, ttl } => ErrorBody::new(
                ErrorCode::ResultExpired,
                format!("job {id} was signed, but its result is no longer kept (at most {ttl} s, less for a result already delivered when the spool needs the room); sign the file again"),
            ),
            JobError::DeliveredCopyGone { id, ttl } => ErrorBody::new(
                ErrorCode::ResultExpired,
                format!("job {id} was signed and its result delivered; the copy kept for a retry is gone (kept at most {ttl} s, and dropped sooner when the spool needs the room); sign the file again"),
            ),
            JobError::Internal { job, what } => ErrorBody::new(
                ErrorCode::Internal,
                format!("the appliance failed internally ({what}); the appliance's operator sees details in signetd's log (job {job})"),
            ),
        }
    }
}

/// Why the read model ([`crate::services::reads`]) could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The read `what` ("reading the jobs") failed (why is in the log).
    #[error("signetd failed {what}")]
    Failed { what: &'static str },
    /// The request asked for something the read cannot take (a malformed time): why.
    #[error("{why}")]
    BadRequest { why: String },
}

impl ReadError {
    /// The read `what` failed: logs `e`.
    pub(crate) fn failed(what: &'static str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        ReadError::Failed { what }
    }
}

/// A local user's role does not allow it: `forbidden`, in the refusal's words.
impl From<RoleRefusal> for ErrorBody {
    fn from(e: RoleRefusal) -> Self {
        ErrorBody::from(&e)
    }
}

impl From<&RoleRefusal> for ErrorBody {
    fn from(e: &RoleRefusal) -> Self {
        ErrorBody::new(ErrorCode::Forbidden, e.to_string())
    }
}

impl From<ReadError> for ErrorBody {
    fn from(e: ReadError) -> Self {
        ErrorBody::from(&e)
    }
}

impl From<&ReadError> for ErrorBody {
    fn from(e: &ReadError) -> Self {
        match e {
            ReadError::Failed { what } => internal(what),
            ReadError::BadRequest { why } => ErrorBody::new(ErrorCode::BadRequest, why.clone()),
        }
    }
}

/// signetd failed at `what`: the words every operator's command answers with.
fn internal(what: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        format!("signetd failed {what}; its log says why"),
    )
}

impl From<TokenError> for ErrorBody {
    fn from(e: TokenError) -> Self {
        ErrorBody::from(&e)
    }
}

impl From<&TokenError> for ErrorBody {
    fn from(e: &TokenError) -> Self {
        let code = match e {
            TokenError::Unknown { .. } => ErrorCode::UnknownToken,
            TokenError::Refused(
                passthrough::Refusal::NotAssigned { .. } | passthrough::Refusal::OtherVm { .. },
            ) => ErrorCode::Forbidden,
            TokenError::Refused(_)
            | TokenError::NotRunning(_)
            | TokenError::NotOnHost { .. }
            | TokenError::NoVm { .. }
            | TokenError::VmNotConnected { .. } => ErrorCode::TokenUnavailable,
            TokenError::NoAnswer | TokenError::PortReset { .. } | TokenError::VmReset { .. } => {
                ErrorCode::Internal
            }
        };
        ErrorBody::new(code, e.to_string())
    }
}

/// Why an operator's command or action ([`crate::services::ops`],
/// [`crate::services::operate`]) was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// `caller` may not use the operator's commands over HTTP.
    #[error("{caller} may not use the operator's commands")]
    NotOperator { caller: String },
    #[error("there is no job {id:?}")]
    UnknownJob { id: String },
    /// The job service refused or failed the command.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The token service refused or failed the command.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A read the command needed failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// signetd failed at `what` (why is in the log).
    #[error("signetd failed {what}")]
    Internal { what: &'static str },
    /// An enrolment named no VM.
    #[error("no VM id was given")]
    NoVmid,
    /// `signetd.toml` cannot take the enrolment's change.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The VM's configuration cannot take the enrolment's change: why.
    #[error("{why}")]
    EnrollRefused { why: String },
    /// Proxmox VE (`qm`) failed: why.
    #[error("{why}")]
    Pve { why: String },
    /// `signetd.toml` does not load: why.
    #[error("{why}")]
    BadConfig { why: String },
    /// The signing VM's token is not plugged into this host (`detail`: the token
    /// service's own words, when it has them).
    #[error("token {serial} is not plugged into this host")]
    NotPlugged {
        serial: String,
        detail: Option<String>,
    },
}

impl OperatorError {
    /// signetd failed at `what`: logs `e`.
    pub(crate) fn internal(what: &'static str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        OperatorError::Internal { what }
    }
}

impl From<OperatorError> for ErrorBody {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::Job(j) => j.into(),
            e => ErrorBody::from(&e),
        }
    }
}

impl From<&OperatorError> for ErrorBody {
    fn from(e: &OperatorError) -> Self {
        match e {
            OperatorError::NotOperator { caller } => ErrorBody::new(
                ErrorCode::Forbidden,
                format!("{caller} may not use the operator's commands; over HTTP they are for root on the host's unix socket, and members of the signet-admin group use signetctl"),
            ),
            OperatorError::UnknownJob { id } => ErrorBody::new(
                ErrorCode::UnknownJob,
                format!("there is no job {id:?}; `signetctl jobs` lists the jobs"),
            ),
            OperatorError::Job(j) => j.into(),
            OperatorError::Token(t) => t.into(),
            OperatorError::Read(r) => r.into(),
            OperatorError::Internal { what } => internal(what),
            OperatorError::NoVmid => ErrorBody::new(
                ErrorCode::BadRequest,
                "give the VM's id (qm list shows them)".to_owned(),
            ),
            OperatorError::Edit(e) => {
                let code = match e {
                    EditError::UnknownProfile { .. } => ErrorCode::UnknownProfile,
                    EditError::OtherVm { .. } => ErrorCode::BadRequest,
                    EditError::Write { .. } | EditError::Invalid { .. } => ErrorCode::Internal,
                };
                ErrorBody::new(code, e.to_string())
            }
            OperatorError::EnrollRefused { why } => {
                ErrorBody::new(ErrorCode::BadRequest, why.clone())
            }
            OperatorError::Pve { why } => ErrorBody::new(ErrorCode::Internal, why.clone()),
            OperatorError::BadConfig { why } => ErrorBody::new(
                ErrorCode::Internal,
                format!("{why}; fix signetd.toml before enrolling"),
            ),
            OperatorError::NotPlugged { serial, detail } => ErrorBody::new(
                ErrorCode::UnknownToken,
                format!(
                    "token {serial} is not plugged into this host{}; plug it in, then enroll its signing VM",
                    detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_refusal_is_forbidden_in_its_own_words() {
        let b = ErrorBody::from(RoleRefusal::NotRoot { uid: 1000 });
        assert_eq!(b.code, ErrorCode::Forbidden);
        assert!(!b.retryable);
        assert_eq!(
            b.message,
            "uid 1000 may not enroll a VM: enrolling sets the VM's args (which Proxmox VE allows only root@pam) and adds grants, so it is root's alone; run it as root (sudo signetctl enroll ...)"
        );
        let b = ErrorBody::from(RoleRefusal::NotOperator {
            uid: 5,
            what: "detach a token".into(),
            admin: "signet-admin".into(),
            signer: "signet".into(),
        });
        assert_eq!(b.code, ErrorCode::Forbidden);
        assert!(b.message.starts_with(
            "uid 5 may not detach a token: that is for root and the signet-admin group"
        ));
    }

    fn told(e: JobError) -> (ErrorCode, bool, String) {
        let b = ErrorBody::from(e);
        (b.code, b.retryable, b.message)
    }

    #[test]
    fn the_callers_are_told_what_they_were_told_before() {
        assert_eq!(
            told(JobError::UnknownProfile {
                name: "nope".into(),
                known: vec!["default".into(), "release".into()],
                default: "default".into(),
            }),
            (
                ErrorCode::UnknownProfile,
                false,
                r#"there is no signing profile "nope"; profiles: default, release (the default is "default")"#.into()
            )
        );
        assert_eq!(
            told(JobError::SpoolFull {
                len: Some(4096),
                used: 3 << 20,
                quota: 8 << 20
            }),
            (
                ErrorCode::SpoolFull,
                false,
                "the appliance's spool has no room for this 4096-byte upload now (3 of 8 MiB in use); nothing was uploaded or signed, send it again later".into()
            )
        );
        let (code, retryable, _) = told(JobError::DiskFull);
        assert_eq!((code, retryable), (ErrorCode::SpoolFull, true));
        assert_eq!(
            told(JobError::TooLarge { max: 10 }),
            (
                ErrorCode::InputTooLarge,
                false,
                "the input is larger than this profile's limit of 10 bytes; nothing was signed"
                    .into()
            )
        );
        assert_eq!(
            told(JobError::UnknownJob { id: "7".into() }),
            (
                ErrorCode::UnknownJob,
                false,
                r#"there is no job "7" of yours; job ids are in the x-signet-job header of the answer to the request that sent it"#.into()
            )
        );
        assert_eq!(
            told(JobError::Internal {
                job: "9".into(),
                what: "reading the job"
            }),
            (
                ErrorCode::Internal,
                false,
                "the appliance failed internally (reading the job); the appliance's operator sees details in signetd's log (job 9)".into()
            )
        );
        let (code, retryable, message) = told(JobError::StaysQueued { id: "3".into() });
        assert_eq!((code, retryable), (ErrorCode::ShuttingDown, true));
        assert!(message.ends_with("collect it then with GET /v1/jobs/3/result"));
    }

    #[test]
    fn the_credentials_refused_are_told_as_before() {
        let (code, retryable, message) = told(
            AuthError::Throttled {
                ip: "10.0.0.5".parse().unwrap(),
                wait: Duration::from_millis(300),
            }
            .into(),
        );
        assert_eq!((code, retryable), (ErrorCode::TooManyAttempts, true));
        assert_eq!(message, "too many wrong client secrets came from 10.0.0.5; the next one is checked in 1 s (Retry-After). Check the client's name and SIGNET_SECRET");
        assert_eq!(
            told(AuthError::Invalid { name: "ci".into() }.into()),
            (
                ErrorCode::Forbidden,
                false,
                r#"the credentials of client "ci" are not valid (unknown name, wrong secret, or an expired secret); send the client's name and secret with HTTP Basic authentication (curl -u NAME:SECRET). The appliance's operator adds clients with `signetd client add`"#.into()
            )
        );
        let (code, _, _) = told(AuthError::Database.into());
        assert_eq!(code, ErrorCode::Internal);
    }

    #[test]
    fn errors_that_are_the_wires_already_pass_through_untouched() {
        let agent = ErrorBody::new(ErrorCode::PinLocked, "the PIN is locked").retryable(true);
        assert_eq!(ErrorBody::from(JobError::Failed(agent.clone())), agent);
        assert_eq!(ErrorBody::from(&JobError::Limit(agent.clone())), agent);
    }

    #[test]
    fn the_operator_is_told_what_it_was_told_before() {
        let told = |e: OperatorError| {
            let b = ErrorBody::from(e);
            (b.code, b.retryable, b.message)
        };
        assert_eq!(
            told(OperatorError::UnknownJob { id: "7".into() }),
            (
                ErrorCode::UnknownJob,
                false,
                r#"there is no job "7"; `signetctl jobs` lists the jobs"#.into()
            )
        );
        assert_eq!(
            told(OperatorError::NotPlugged {
                serial: "0A1B".into(),
                detail: Some("udev is not there".into()),
            }),
            (
                ErrorCode::UnknownToken,
                false,
                "token 0A1B is not plugged into this host (udev is not there); plug it in, then enroll its signing VM".into()
            )
        );
        assert_eq!(
            told(OperatorError::NoVmid),
            (
                ErrorCode::BadRequest,
                false,
                "give the VM's id (qm list shows them)".into()
            )
        );
        assert_eq!(
            told(OperatorError::Internal { what: "running qm" }),
            (
                ErrorCode::Internal,
                false,
                "signetd failed running qm; its log says why".into()
            )
        );
        // The job service's and the token service's refusals keep their own words.
        let (code, _, message) = told(
            JobError::NotCancellable {
                id: "3".into(),
                state: JobState::Signed,
            }
            .into(),
        );
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.starts_with("job 3 is signed and can no longer be cancelled"));
        let (code, _, message) = told(TokenError::NoVm { serial: "X".into() }.into());
        assert_eq!(code, ErrorCode::TokenUnavailable);
        assert_eq!(
            message,
            "token X has no signing VM in signetd.toml ([[tokens]] vm = ...)"
        );
    }

    #[test]
    fn the_read_models_errors_are_told_as_before() {
        let b = ErrorBody::from(ReadError::Failed {
            what: "reading the audit log",
        });
        assert_eq!(
            (b.code, b.message.as_str()),
            (
                ErrorCode::Internal,
                "signetd failed reading the audit log; its log says why"
            )
        );
        let b = ErrorBody::from(ReadError::BadRequest {
            why: "not a time".into(),
        });
        assert_eq!(
            (b.code, b.message.as_str()),
            (ErrorCode::BadRequest, "not a time")
        );
    }
}
