//! Stand-ins for the agent's seams, for unit tests only (compiled under `cfg(test)`):
//! a token session driven by the real [`TokenState`] machine, whose token a test
//! plugs, pulls and gives a PIN to, and a signer that signs by appending to a copy,
//! loses the token or has its PIN refused on request. Both record what was asked of
//! them and log as the real ones do, so a test sees under which span the work ran.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::types::AuthPin;
use futures_util::future::BoxFuture;
use futures_util::TryFutureExt;
use secrecy::ExposeSecret;
use signet_api::wire::{AgentEventKind, AgentState, SignMode, SignResponse, SignerFeatures};
use signet_format::Format;

use crate::backend::{InMemory, Made, SignError, SignSpec, Signer};
use crate::token::{KeyRef, PinSource, TokenError, TokenHealth, TokenSession};
use crate::token_state::{Action, TokenEvent, TokenState};

/// The token behind a [`StandInToken`], as a test sets it.
#[derive(Debug)]
pub struct TokenDesk {
    /// The token is plugged in.
    pub plugged: bool,
    /// The PIN the token accepts.
    pub right_pin: String,
    /// The PIN the agent has (the host's or the file's); `None`: none.
    pub pin: Option<String>,
    /// What the agent asked, in order: "ensure_ready", "refused 1234", "lost", ...
    pub calls: Vec<String>,
}

/// A shared handle on the desk.
#[derive(Debug, Clone)]
pub struct Desk(Arc<Mutex<TokenDesk>>);

impl Desk {
    pub fn get(&self) -> MutexGuard<'_, TokenDesk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calls so far, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.get().calls)
    }
}

/// A token session without PKCS#11.
#[derive(Debug)]
pub struct StandInToken {
    desk: Desk,
    state: TokenState,
    events: Vec<AgentEventKind>,
}

pub const LABEL: &str = "stand-in";
pub const SERIAL: &str = "0001";

impl StandInToken {
    /// A token that is plugged in, with the PIN `1234` known to the agent.
    pub fn new() -> (StandInToken, Desk) {
        let desk = Desk(Arc::new(Mutex::new(TokenDesk {
            plugged: true,
            right_pin: "1234".into(),
            pin: Some("1234".into()),
            calls: Vec::new(),
        })));
        (
            StandInToken {
                desk: desk.clone(),
                state: TokenState::default(),
                events: Vec::new(),
            },
            desk,
        )
    }

    fn apply(&mut self, event: TokenEvent) {
        for a in self.state.on(event) {
            if let Action::Publish(e) = a {
                tracing::info!(event = e.name(), "stand-in token");
                self.events.push(e);
            }
        }
    }

    fn key() -> KeyRef {
        KeyRef {
            token_label: LABEL.into(),
            token_serial: SERIAL.into(),
            id: vec![1],
            label: "signkey".into(),
            cert_on_token: true,
        }
    }

    fn open(&mut self) -> Result<(KeyRef, AuthPin), TokenError> {
        let (plugged, pin, right) = {
            let d = self.desk.get();
            (d.plugged, d.pin.clone(), d.right_pin.clone())
        };
        if !plugged {
            return Err(if self.state.had_token() {
                TokenError::Lost("no slot holds the stand-in any more".into())
            } else {
                TokenError::NotFound {
                    wanted: format!("label \"{LABEL}\""),
                    found: "none".into(),
                }
            });
        }
        self.apply(TokenEvent::Found {
            label: LABEL.into(),
            serial: SERIAL.into(),
        });
        let pin = pin.ok_or(TokenError::PinNeeded)?;
        if pin != right {
            self.desk.get().pin = None;
            return Err(TokenError::PinRejected {
                from: PinSource::Host,
            });
        }
        Ok((StandInToken::key(), AuthPin::new(pin.into())))
    }
}

impl TokenSession for StandInToken {
    fn state(&self) -> (AgentState, String) {
        self.state.state()
    }

    fn retry_worth_it(&self) -> bool {
        self.state.retry_worth_it()
    }

    fn take_events(&mut self) -> Vec<AgentEventKind> {
        std::mem::take(&mut self.events)
    }

    fn health(&mut self) -> TokenHealth {
        self.check();
        self.known_health()
    }

    fn known_health(&self) -> TokenHealth {
        let (state, detail) = self.state.state();
        TokenHealth {
            state,
            detail,
            module_loaded: true,
            slot: None,
            present: self.state.present(),
            token: None,
            logged_in: self.state.logged_in(),
            pin: None,
            certificates: Vec::new(),
        }
    }

    fn ensure_ready(&mut self) -> Result<(KeyRef, AuthPin), TokenError> {
        self.desk.get().calls.push("ensure_ready".into());
        tracing::info!("stand-in token: ensure_ready");
        if self.check() {
            let pin = self.desk.get().right_pin.clone();
            return Ok((StandInToken::key(), AuthPin::new(pin.into())));
        }
        self.apply(TokenEvent::SessionClosed);
        match self.open() {
            Ok(ready) => {
                self.apply(TokenEvent::LoggedIn {
                    label: LABEL.into(),
                    serial: SERIAL.into(),
                });
                Ok(ready)
            }
            Err(e) => {
                self.apply(TokenEvent::OpenFailed(e.clone()));
                Err(e)
            }
        }
    }

    fn login(&mut self, pin: AuthPin) -> Result<(), TokenError> {
        self.desk.get().calls.push("login".into());
        self.desk.get().pin = Some(pin.expose_secret().to_owned());
        match self.ensure_ready() {
            Ok(_) => Ok(()),
            Err(e) if e.state() == AgentState::PinRejected => Err(e),
            Err(_) => Ok(()),
        }
    }

    fn refused(&mut self, pin: &AuthPin) {
        tracing::info!("stand-in token: the PIN was refused");
        let mut d = self.desk.get();
        d.calls.push(format!("refused {}", pin.expose_secret()));
        d.pin = None;
        drop(d);
        self.apply(TokenEvent::PinRefused(PinSource::Host));
    }

    fn lost(&mut self, detail: String) {
        self.desk.get().calls.push("lost".into());
        self.apply(TokenEvent::Lost(detail));
    }

    fn check(&mut self) -> bool {
        if self.state.logged_in() && !self.desk.get().plugged {
            self.apply(TokenEvent::Lost("CKR_DEVICE_REMOVED".into()));
        }
        self.state.logged_in()
    }

    fn close(&mut self) {
        self.desk.get().calls.push("close".into());
        self.apply(TokenEvent::ModuleClosed);
    }
}

/// What the stand-in signer does with the next jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Signs: the output is the input with "+signed" appended.
    Sign,
    /// The token is pulled mid-job: the signer reports it lost.
    PullToken,
    /// The token refuses the PIN.
    RefusePin,
    /// Fails as a signature fails.
    Fail,
    /// Never finishes, as osslsigncode waiting on a reader pulled mid-command.
    Hang,
}

/// The signer's script and record.
#[derive(Debug)]
pub struct SignerDesk {
    pub outcome: Outcome,
    /// The input file name of every run, in order (`<memory>` for an input signed in
    /// memory).
    pub signed: Vec<String>,
    /// The formats it signs in memory (none unless a test sets them).
    pub in_memory: Vec<Format>,
}

/// A signer without a program.
#[derive(Debug)]
pub struct StandInSigner {
    desk: Arc<Mutex<SignerDesk>>,
    token: Desk,
}

impl StandInSigner {
    /// A signer that signs; `token` is pulled on [`Outcome::PullToken`].
    pub fn new(token: Desk) -> (StandInSigner, Arc<Mutex<SignerDesk>>) {
        let desk = Arc::new(Mutex::new(SignerDesk {
            outcome: Outcome::Sign,
            signed: Vec::new(),
            in_memory: Vec::new(),
        }));
        (
            StandInSigner {
                desk: desk.clone(),
                token,
            },
            desk,
        )
    }
}

impl StandInSigner {
    /// One run: recorded as `name`, then as the desk's outcome says; signing appends
    /// "+signed" to what `read` answers.
    async fn run(
        &self,
        name: &str,
        read: impl FnOnce() -> Result<Vec<u8>, SignError>,
    ) -> Result<Vec<u8>, SignError> {
        let outcome = {
            let mut d = self.desk.lock().unwrap_or_else(|p| p.into_inner());
            d.signed.push(name.to_owned());
            d.outcome
        };
        tracing::info!(?outcome, "stand-in signer");
        match outcome {
            Outcome::Sign => {
                let mut data = read()?;
                data.extend_from_slice(b"+signed");
                Ok(data)
            }
            Outcome::PullToken => {
                self.token.get().plugged = false;
                Err(SignError::TokenLost("Failed to enumerate slots".into()))
            }
            Outcome::RefusePin => Err(SignError::PinRejected),
            Outcome::Fail => Err(SignError::Failed("the stand-in failed".into())),
            Outcome::Hang => std::future::pending().await,
        }
    }
}

impl Signer for StandInSigner {
    fn program(&self) -> &Path {
        Path::new("stand-in")
    }

    fn certificate_file(&self) -> Option<&Path> {
        None
    }

    fn version(&self) -> BoxFuture<'_, Result<(String, SignerFeatures), SignError>> {
        Box::pin(async {
            Ok((
                "stand-in 1.0".to_owned(),
                SignerFeatures {
                    version: "1.0".into(),
                    modes: vec![SignMode::Whole],
                    extract_data: false,
                    attach_signature: false,
                    powershell: true,
                },
            ))
        })
    }

    fn refuses(
        &self,
        _features: &SignerFeatures,
        mode: SignMode,
        _format: Option<Format>,
        _response: SignResponse,
    ) -> Option<String> {
        (mode == SignMode::Digest).then(|| "the stand-in has no digest mode".to_owned())
    }

    fn sign<'a>(
        &'a self,
        _key: &'a KeyRef,
        _pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
    ) -> BoxFuture<'a, Result<Made, SignError>> {
        Box::pin(
            async move {
                let name = spec.input.file_name().unwrap_or_default();
                let name = name.to_string_lossy().into_owned();
                let data = self
                    .run(&name, || {
                        std::fs::read(spec.input).map_err(|e| SignError::Failed(e.to_string()))
                    })
                    .await?;
                std::fs::write(spec.output, data).map_err(|e| SignError::Failed(e.to_string()))
            }
            .map_ok(|()| Made::default()),
        )
    }

    fn signs_in_memory(&self, format: Option<Format>) -> bool {
        let d = self.desk.lock().unwrap_or_else(|p| p.into_inner());
        format.is_some_and(|f| d.in_memory.contains(&f))
    }

    fn sign_in_memory<'a>(
        &'a self,
        _key: &'a KeyRef,
        _pin: &'a AuthPin,
        _spec: &'a SignSpec<'a>,
        input: bytes::Bytes,
    ) -> BoxFuture<'a, Result<InMemory, SignError>> {
        Box::pin(
            self.run("<memory>", move || Ok(input.to_vec()))
                .map_ok(InMemory::Signed),
        )
    }

    fn extract_signature<'a>(
        &'a self,
        _signed: &'a Path,
        _out: &'a Path,
    ) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(async { Err(SignError::Failed("no signature alone".into())) })
    }
}

/// A stand-in agent: signs with [`StandInSigner`], holds a [`StandInToken`], spools
/// into `spool`.
pub async fn agent(spool: &Path) -> (crate::agent::Agent, Desk, Arc<Mutex<SignerDesk>>) {
    let (token, desk) = StandInToken::new();
    let (signer, signer_desk) = StandInSigner::new(desk.clone());
    let agent = crate::agent::Agent::with_parts(
        Box::new(signer),
        Box::new(token),
        PathBuf::from("/stand-in/module.so"),
        spool.to_owned(),
        None,
    )
    .await
    .unwrap();
    (agent, desk, signer_desk)
}
