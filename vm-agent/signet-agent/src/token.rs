//! The PKCS#11 side of the agent: finding the token, logging in once, guarding the
//! PIN retry counter, noticing when the token vanishes, and reporting what the token
//! says about itself.
//!
//! [`PinGuard`] is pure: it decides whether a login may be tried. [`Token`] does the
//! cryptoki calls and keeps one logged-in session for the agent's life. Every failure
//! goes through [`crate::loss::classify`]; on loss the session is closed and the module
//! finalised, so the next [`Token::ensure_ready`] initialises it afresh and finds the
//! token again by label and serial. `Token` queues what happened to it
//! ([`Token::take_events`]); the agent publishes those events.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::AuthPin;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use signet_api::hex::lower as hex;
use signet_api::rfc3339::format as rfc3339;
use signet_api::wire::{AgentEventKind, AgentState, CertificateSummary, PinFlags, TokenSummary};

use crate::config::TokenConfig;
use cryptoki::mechanism::Mechanism;
use signet_authenticode::{HashAlg, KeyKind};

/// CKA_EC_PARAMS of P-256 and P-384: their named-curve OIDs, DER.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
use crate::loss::{classify, Call, Observation, Verdict};
use crate::token_state::{Action, TokenEvent, TokenState};
pub use crate::token_state::{PinSource, TokenError};

/// The token as the agent uses it: one logged-in session for the agent's life, and
/// what the token says about itself. [`Token`] is the PKCS#11 (cryptoki) one; the
/// agent's unit tests use a stand-in. Its calls block: the agent makes them off the
/// async threads, one at a time.
pub trait TokenSession: Send + std::fmt::Debug {
    /// The agent state and what it means.
    fn state(&self) -> (AgentState, String);

    /// Whether opening the token again, unattended, may end the current fault.
    fn retry_worth_it(&self) -> bool;

    /// What happened since the last call, oldest first.
    fn take_events(&mut self) -> Vec<AgentEventKind>;

    /// The token as it is now (asks the token; no login, no PIN try).
    fn health(&mut self) -> TokenHealth;

    /// The token as last seen, without asking it anything.
    fn known_health(&self) -> TokenHealth;

    /// Makes sure there is a logged-in session; answers the key to sign with and the
    /// PIN that logged in. Opens the module, finds the token and logs in as needed.
    fn ensure_ready(&mut self) -> Result<(KeyRef, AuthPin), TokenError>;

    /// Takes the PIN sent by the host and logs in with it, unless the token refused
    /// that PIN before.
    fn login(&mut self, pin: AuthPin) -> Result<(), TokenError>;

    /// The token refused `pin` outside the session's own login (the signer's).
    fn refused(&mut self, pin: &AuthPin);

    /// A job saw the token vanish (the signer said so).
    fn lost(&mut self, detail: String);

    /// Checks the session (logged in, key still there) or the token's presence;
    /// records a loss. True when a logged-in session is usable.
    fn check(&mut self) -> bool;

    /// Drops the session and finalises the module (before a re-initialisation).
    fn close(&mut self);

    /// The logged-in key's kind and the certificate with its id on the token, for
    /// the native engine; read once per session and kept.
    fn raw_key(&mut self) -> Result<RawKey, TokenError> {
        Err(TokenError::Key(NO_RAW.to_owned()))
    }

    /// One signature operation on the resident logged-in session: `data` hashed with
    /// `hash` and signed with the key (CKM_SHA*_RSA_PKCS; ECDSA: hashed here, then
    /// CKM_ECDSA). No login, no new session.
    fn sign_raw(&mut self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        let _ = (hash, data);
        Err(TokenError::Key(NO_RAW.to_owned()))
    }
}

const NO_RAW: &str =
    "this token session cannot sign for the native engine; use signer.backend = \"osslsigncode\"";

/// What the native engine needs of the token's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawKey {
    pub kind: KeyKind,
    /// The DER certificate with the key's id on the token, if there is one.
    pub certificate: Option<Vec<u8>>,
}

impl TokenSession for Token {
    fn state(&self) -> (AgentState, String) {
        Token::state(self)
    }
    fn retry_worth_it(&self) -> bool {
        Token::retry_worth_it(self)
    }
    fn take_events(&mut self) -> Vec<AgentEventKind> {
        Token::take_events(self)
    }
    fn health(&mut self) -> TokenHealth {
        Token::health(self)
    }
    fn known_health(&self) -> TokenHealth {
        Token::known_health(self)
    }
    fn ensure_ready(&mut self) -> Result<(KeyRef, AuthPin), TokenError> {
        Token::ensure_ready(self)
    }
    fn login(&mut self, pin: AuthPin) -> Result<(), TokenError> {
        Token::login(self, pin)
    }
    fn refused(&mut self, pin: &AuthPin) {
        Token::refused(self, pin)
    }
    fn lost(&mut self, detail: String) {
        Token::lost(self, detail)
    }
    fn check(&mut self) -> bool {
        Token::check(self)
    }
    fn close(&mut self) {
        Token::close(self)
    }
    fn raw_key(&mut self) -> Result<RawKey, TokenError> {
        Token::raw_key(self)
    }
    fn sign_raw(&mut self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        Token::sign_raw(self, hash, data)
    }
}

const LOCKED: TokenError = TokenError::PinLocked {
    why: "locked",
    fix: "unlock it with the SO PIN (or the vendor's tool), then send the PIN again or restart the agent",
};
const FINAL_TRY: TokenError = TokenError::PinLocked {
    why: "on its final try (one more wrong PIN locks it)",
    fix: "log in once by hand with the right PIN to reset the counter, then send the PIN again or restart the agent",
};

/// Whether `C_GetSlotInfo` or `C_GetTokenInfo` on the token's slot answering `rv`
/// means the token is gone (the agent had it: CKR_GENERAL_ERROR from a token call
/// counts, as [`crate::loss::classify`] says).
fn token_info_says_gone(rv: cryptoki::error::RvError) -> bool {
    classify(Observation::Returned(Call::Token, rv), true) == Verdict::TokenLost
}

/// The PIN counter flags a token reports.
pub fn pin_flags(t: &TokenInfo) -> PinFlags {
    PinFlags {
        count_low: t.user_pin_count_low(),
        final_try: t.user_pin_final_try(),
        locked: t.user_pin_locked(),
        to_be_changed: t.user_pin_to_be_changed(),
    }
}
/// Remembers the PIN the token refused, so automation never spends a second try on it.
#[derive(Debug, Default)]
pub struct PinGuard {
    /// Digests of every PIN the token refused since it last accepted one.
    rejected: Vec<[u8; 32]>,
}

impl PinGuard {
    /// Whether a login with `pin` may be tried, given the token's counter flags.
    pub fn may_try(&self, pin: &[u8], flags: PinFlags) -> Result<(), Refusal> {
        if flags.locked {
            return Err(Refusal::Locked);
        }
        if flags.final_try {
            return Err(Refusal::FinalTry);
        }
        if self.rejected.contains(&digest(pin)) {
            return Err(Refusal::SamePinRejected);
        }
        Ok(())
    }

    /// The token refused `pin`.
    pub fn rejected(&mut self, pin: &[u8]) {
        let d = digest(pin);
        if !self.rejected.contains(&d) {
            self.rejected.push(d);
        }
    }

    /// The token accepted a PIN: the refusal is history.
    pub fn accepted(&mut self) {
        self.rejected.clear();
    }
}

/// Why [`PinGuard::may_try`] said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Locked,
    FinalTry,
    SamePinRejected,
}

fn digest(pin: &[u8]) -> [u8; 32] {
    Sha256::digest(pin).into()
}

/// The key and certificate a signature is made with, as found on the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub token_label: String,
    pub token_serial: String,
    pub id: Vec<u8>,
    pub label: String,
    /// A certificate with the key's id is on the token.
    pub cert_on_token: bool,
}

/// The token as last found: where, what, and its certificates.
#[derive(Debug, Clone)]
struct Found {
    slot: Slot,
    summary: TokenSummary,
    certificates: Vec<CertificateSummary>,
}

/// The logged-in session.
struct Open {
    session: Session,
    key: KeyRef,
    key_handle: ObjectHandle,
    pin: AuthPin,
    /// The key's kind and certificate, once the native engine asked.
    raw: Option<RawKey>,
}

/// What the token looks like now, for the health report.
#[derive(Debug, Clone)]
pub struct TokenHealth {
    pub state: AgentState,
    pub detail: String,
    pub module_loaded: bool,
    pub slot: Option<u64>,
    pub present: bool,
    pub token: Option<TokenSummary>,
    pub logged_in: bool,
    pub pin: Option<PinFlags>,
    pub certificates: Vec<CertificateSummary>,
}

/// One token, one logged-in session.
pub struct Token {
    cfg: TokenConfig,
    guard: PinGuard,
    /// The module, loaded and initialised.
    ctx: Option<Pkcs11>,
    /// `C_WaitForSlotEvent` answered `CKR_FUNCTION_NOT_SUPPORTED` once: not asked again.
    no_slot_events: bool,
    found: Option<Found>,
    /// The PIN counter flags as last read.
    flags: Option<PinFlags>,
    /// The logged-in session; open exactly when `state` says logged in.
    open: Option<Open>,
    /// The PIN the host sent; used before the PIN file. Zeroed when dropped.
    host_pin: Option<AuthPin>,
    /// Present, lost, logged in, the last failure: the pure part.
    state: TokenState,
    events: Vec<AgentEventKind>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.cfg.module)
            .field("open", &self.open.is_some())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn new(cfg: TokenConfig) -> Self {
        Token {
            cfg,
            guard: PinGuard::default(),
            ctx: None,
            no_slot_events: false,
            found: None,
            flags: None,
            open: None,
            host_pin: None,
            state: TokenState::default(),
            events: Vec::new(),
        }
    }

    /// Takes `event` into the state machine and carries out what it answers.
    fn apply(&mut self, event: TokenEvent) {
        for action in self.state.on(event) {
            match action {
                Action::Publish(e) => {
                    match &e {
                        AgentEventKind::LoggedIn { label, serial } => {
                            tracing::info!(token = %serial, %label, "logged in to the token")
                        }
                        AgentEventKind::TokenAppeared { label, .. } => {
                            tracing::info!(%label, "the token is present")
                        }
                        AgentEventKind::TokenLost { serial, detail } => {
                            tracing::warn!(token = %serial, %detail, "the token was lost; re-initialising the module until it returns")
                        }
                        _ => {}
                    }
                    self.events.push(e);
                }
                Action::CloseSession => self.open = None,
                Action::FinaliseModule => {
                    if let Some(ctx) = self.ctx.take() {
                        let _ = ctx.finalize();
                    }
                }
            }
        }
    }

    /// The agent state and what it means.
    pub fn state(&self) -> (AgentState, String) {
        self.state.state()
    }

    /// Whether opening the token again, unattended, may end the current fault.
    pub fn retry_worth_it(&self) -> bool {
        self.state.retry_worth_it()
    }

    /// What happened since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<AgentEventKind> {
        std::mem::take(&mut self.events)
    }

    /// The token as it is now. Reads the token's flags (no login, no PIN try) and, when
    /// logged in, checks that the session and key still answer.
    pub fn health(&mut self) -> TokenHealth {
        self.check();
        if let (Some(ctx), Some(found), true) = (&self.ctx, &self.found, self.state.present()) {
            match ctx.get_token_info(found.slot) {
                Ok(info) => self.flags = Some(pin_flags(&info)),
                Err(e) => self.failed(Call::Token, &e),
            }
        }
        self.known_health()
    }

    /// The token as last seen, without asking it anything.
    pub fn known_health(&self) -> TokenHealth {
        let (state, detail) = self.state();
        TokenHealth {
            state,
            detail,
            module_loaded: self.ctx.is_some(),
            slot: self.found.as_ref().map(|f| f.slot.id()),
            present: self.state.present(),
            token: self.found.as_ref().map(|f| f.summary.clone()),
            logged_in: self.open.is_some(),
            pin: self.flags.filter(|_| self.state.present()),
            certificates: self
                .found
                .as_ref()
                .map(|f| f.certificates.clone())
                .unwrap_or_default(),
        }
    }

    /// Makes sure there is a logged-in session and returns the key to sign with and the
    /// PIN that logged in. Checks a session it has (session and key handle still
    /// valid); opens the module, finds the token and logs in as needed.
    pub fn ensure_ready(&mut self) -> Result<(KeyRef, AuthPin), TokenError> {
        if self.check() {
            if let Some(open) = &self.open {
                return Ok((open.key.clone(), open.pin.clone()));
            }
        }
        let result = self.open_and_login();
        match result {
            Ok(open) => {
                self.apply(TokenEvent::LoggedIn {
                    label: open.key.token_label.clone(),
                    serial: open.key.token_serial.clone(),
                });
                let out = (open.key.clone(), open.pin.clone());
                self.open = Some(open);
                Ok(out)
            }
            Err(e) => {
                self.apply(TokenEvent::OpenFailed(e.clone()));
                Err(e)
            }
        }
    }

    /// Takes the PIN sent by the host and logs in with it, unless the token refused
    /// that PIN before (then no PKCS#11 call is made at all). A token that is not
    /// present keeps the PIN for when it returns.
    pub fn login(&mut self, pin: AuthPin) -> Result<(), TokenError> {
        let secret = pin.expose_secret().as_bytes();
        if self.guard.may_try(secret, PinFlags::default()) == Err(Refusal::SamePinRejected) {
            tracing::warn!("the host sent a PIN the token refused before; not trying it");
            return Err(TokenError::PinRejected {
                from: PinSource::Host,
            });
        }
        if self.check() {
            if let Some(open) = &self.open {
                if open.pin.expose_secret() != pin.expose_secret() {
                    tracing::warn!("the host sent a different PIN while the agent is logged in; the PIN in use stays");
                }
                return Ok(());
            }
        }
        self.host_pin = Some(pin);
        match self.ensure_ready() {
            Ok(_) => Ok(()),
            Err(e) if e.is_pin_problem() => Err(e),
            // The token is not there (or the module is broken): the PIN waits for it.
            Err(_) => Ok(()),
        }
    }

    /// The token refused `pin` outside our own login (the signer's): never again.
    pub fn refused(&mut self, pin: &AuthPin) {
        self.guard.rejected(pin.expose_secret().as_bytes());
        let source = self.forget_host_pin(pin);
        self.apply(TokenEvent::PinRefused(source));
    }

    /// A job saw the token vanish (the signer said so).
    pub fn lost(&mut self, detail: String) {
        self.apply(TokenEvent::Lost(detail));
    }

    /// Checks what the agent holds: with a session, that it is logged in and the key
    /// handle still answers; without one, that the token is still listed. Loss is
    /// recorded (and the module finalised). True when a logged-in session is usable.
    pub fn check(&mut self) -> bool {
        self.poll_slot_event();
        if let Some(open) = &self.open {
            let info = open.session.get_session_info();
            match info {
                Ok(i)
                    if matches!(
                        i.session_state(),
                        SessionState::RoUser | SessionState::RwUser
                    ) => {}
                Ok(_) => {
                    tracing::warn!("the token session is no longer logged in; logging in again");
                    self.apply(TokenEvent::SessionClosed);
                    return false;
                }
                Err(e) => {
                    self.failed(Call::Token, &e);
                    return false;
                }
            }
            let Some(open) = &self.open else { return false };
            if let Err(e) = open
                .session
                .get_attributes(open.key_handle, &[AttributeType::Id])
            {
                self.failed(Call::KnownObject, &e);
                return false;
            }
            return true;
        }
        if let (Some(ctx), Some(found), true) = (&self.ctx, &self.found, self.state.present()) {
            if let Err(e) = ctx.get_token_info(found.slot) {
                self.failed(Call::Token, &e);
            }
        }
        false
    }

    /// Asks the module for a slot event without blocking, where it supports that; an
    /// event for the token's slot is logged (the check that follows tells what changed).
    fn poll_slot_event(&mut self) {
        if self.no_slot_events {
            return;
        }
        let (Some(ctx), Some(found)) = (&self.ctx, &self.found) else {
            return;
        };
        match ctx.get_slot_event() {
            Ok(Some(slot)) if slot == found.slot => {
                tracing::info!(
                    slot = slot.id(),
                    "the module reports an event on the token's slot"
                )
            }
            Ok(_) => {}
            Err(CkError::Pkcs11(RvError::FunctionNotSupported, _)) => self.no_slot_events = true,
            Err(e) => tracing::debug!(error = %ck(&e), "C_WaitForSlotEvent"),
        }
    }

    /// A PKCS#11 call failed outside a login attempt: record a loss if it is one.
    fn failed(&mut self, call: Call, e: &CkError) {
        let verdict = match e {
            CkError::Pkcs11(rv, _) => {
                classify(Observation::Returned(call, *rv), self.state.had_token())
            }
            _ => Verdict::SigningFailed,
        };
        match verdict {
            Verdict::TokenLost => self.apply(TokenEvent::Lost(ck(e))),
            Verdict::LoggedOut => self.apply(TokenEvent::SessionClosed),
            _ => tracing::warn!(error = %ck(e), "PKCS#11 call failed"),
        }
    }

    /// Forgets the session and finalises the module.
    pub fn close(&mut self) {
        self.apply(TokenEvent::ModuleClosed);
    }

    fn forget_host_pin(&mut self, pin: &AuthPin) -> PinSource {
        match &self.host_pin {
            Some(h) if h.expose_secret() == pin.expose_secret() => {
                self.host_pin = None;
                PinSource::Host
            }
            _ => self.file_source(),
        }
    }

    fn file_source(&self) -> PinSource {
        match &self.cfg.pin_file {
            Some(p) => PinSource::File(p.clone()),
            None => PinSource::Host,
        }
    }

    /// Loads and initialises the module if it is not, finds the token, reads its
    /// certificates and logs in. On any failure but a PIN problem the module is
    /// finalised, so the next try initialises it afresh (some modules only see a
    /// returned token after that).
    fn open_and_login(&mut self) -> Result<Open, TokenError> {
        self.apply(TokenEvent::SessionClosed);
        let result = self.try_open();
        if let Err(e) = &result {
            if !e.is_pin_problem() {
                self.close();
            }
        }
        result
    }

    fn try_open(&mut self) -> Result<Open, TokenError> {
        let ctx = match &self.ctx {
            Some(ctx) => ctx.clone(),
            None => {
                let ctx = self.init_module()?;
                self.ctx = Some(ctx.clone());
                ctx
            }
        };
        let had = self.state.had_token();
        let module = self.cfg.module.clone();
        // A failure that is not a loss is the module misbehaving.
        let lost = |call: Call, e: CkError| -> TokenError {
            match e {
                CkError::Pkcs11(rv, _)
                    if classify(Observation::Returned(call, rv), had) == Verdict::TokenLost =>
                {
                    TokenError::Lost(ck(&e))
                }
                _ => TokenError::Module {
                    module: module.clone(),
                    detail: ck(&e),
                },
            }
        };
        let slot_ids = ctx
            .get_slots_with_token()
            .map_err(|e| lost(Call::Token, e))?;
        let mut listed = Vec::new();
        let mut chosen = None;
        for slot in slot_ids {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_owned();
            let serial = info.serial_number().trim_end().to_owned();
            let matches = self.cfg.label.as_ref().is_none_or(|l| *l == label)
                && self.cfg.serial.as_ref().is_none_or(|s| *s == serial);
            listed.push(format!("\"{label}\" (serial {serial})"));
            if matches && chosen.is_none() {
                chosen = Some((slot, info));
            }
        }
        let Some((slot, info)) = chosen else {
            let found = if listed.is_empty() {
                "none".to_owned()
            } else {
                listed.join(", ")
            };
            return Err(match classify(Observation::TokenNotListed, had) {
                Verdict::TokenLost => TokenError::Lost(format!(
                    "no slot holds {} any more; tokens present: {found}",
                    self.wanted()
                )),
                _ => TokenError::NotFound {
                    wanted: self.wanted(),
                    found,
                },
            });
        };
        let token_label = info.label().trim_end().to_owned();
        let token_serial = info.serial_number().trim_end().to_owned();
        let summary = TokenSummary {
            label: token_label.clone(),
            serial: token_serial.clone(),
            model: info.model().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
            firmware: info.firmware_version().to_string(),
        };
        let span = tracing::info_span!("token", token = %token_serial);
        let _g = span.enter();

        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| lost(Call::Token, e))?;
        let certificates = read_certificates(&session).map_err(|e| lost(Call::Token, e))?;
        self.apply(TokenEvent::Found {
            label: token_label.clone(),
            serial: token_serial.clone(),
        });
        self.found = Some(Found {
            slot,
            summary,
            certificates,
        });

        let flags = pin_flags(&info);
        self.flags = Some(flags);
        let (pin, source) = self.pin()?;
        match self.guard.may_try(pin.expose_secret().as_bytes(), flags) {
            Ok(()) => {}
            Err(Refusal::Locked) => {
                tracing::error!("the token's user PIN is locked; not logging in");
                return Err(LOCKED);
            }
            Err(Refusal::FinalTry) => {
                tracing::error!("the token is on its final PIN try; not logging in");
                return Err(FINAL_TRY);
            }
            Err(Refusal::SamePinRejected) => return Err(TokenError::PinRejected { from: source }),
        }
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => self.guard.accepted(),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                self.guard.rejected(pin.expose_secret().as_bytes());
                if source == PinSource::Host {
                    self.host_pin = None;
                }
                let after = ctx
                    .get_token_info(slot)
                    .map(|i| pin_flags(&i))
                    .unwrap_or_default();
                self.flags = Some(after);
                tracing::error!(?after, %source, "the token refused the PIN; it will not be tried again");
                return Err(TokenError::PinRejected { from: source });
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => return Err(LOCKED),
            Err(e) => return Err(lost(Call::Login, e)),
        }
        let (key, key_handle) = self.find_key(&session, token_label, token_serial, had)?;
        Ok(Open {
            session,
            key,
            key_handle,
            pin,
            raw: None,
        })
    }

    fn init_module(&self) -> Result<Pkcs11, TokenError> {
        let module_err = |detail: String| TokenError::Module {
            module: self.cfg.module.clone(),
            detail,
        };
        let ctx = Pkcs11::new(&self.cfg.module).map_err(|e| module_err(ck(&e)))?;
        if let Err(e) = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            return Err(match &e {
                CkError::Pkcs11(rv, _)
                    if classify(
                        Observation::Returned(Call::Initialize, *rv),
                        self.state.had_token(),
                    ) == Verdict::TokenLost =>
                {
                    TokenError::Lost(ck(&e))
                }
                _ => module_err(ck(&e)),
            });
        }
        Ok(ctx)
    }

    /// The PIN to log in with: the host's, else the PIN file's.
    fn pin(&self) -> Result<(AuthPin, PinSource), TokenError> {
        if let Some(p) = &self.host_pin {
            return Ok((p.clone(), PinSource::Host));
        }
        match &self.cfg.pin_file {
            Some(path) => Ok((read_pin(path)?, PinSource::File(path.clone()))),
            None => Err(TokenError::PinNeeded),
        }
    }

    fn wanted(&self) -> String {
        match (&self.cfg.label, &self.cfg.serial) {
            (Some(l), Some(s)) => format!("label \"{l}\" and serial {s}"),
            (Some(l), None) => format!("label \"{l}\""),
            (None, Some(s)) => format!("serial {s}"),
            (None, None) => "any token".to_owned(),
        }
    }

    /// See [`TokenSession::raw_key`].
    pub fn raw_key(&mut self) -> Result<RawKey, TokenError> {
        let Some(open) = self.open.as_mut() else {
            return Err(TokenError::Lost("no logged-in session".into()));
        };
        if let Some(raw) = &open.raw {
            return Ok(raw.clone());
        }
        let ckerr = |e: CkError| match e {
            CkError::Pkcs11(rv, _)
                if classify(Observation::Returned(Call::Other, rv), true) == Verdict::TokenLost =>
            {
                TokenError::Lost(ck(&e))
            }
            _ => TokenError::Key(format!("cannot read the key: {}", ck(&e))),
        };
        let mut kind = None;
        let mut ec_params = Vec::new();
        for a in open
            .session
            .get_attributes(
                open.key_handle,
                &[AttributeType::KeyType, AttributeType::EcParams],
            )
            .map_err(ckerr)?
        {
            match a {
                Attribute::KeyType(k) => kind = Some(k),
                Attribute::EcParams(p) => ec_params = p,
                _ => {}
            }
        }
        let kind = match kind {
            Some(k) if k == cryptoki::object::KeyType::RSA => KeyKind::Rsa,
            Some(k) if k == cryptoki::object::KeyType::EC => match ec_params.as_slice() {
                P256_PARAMS => KeyKind::EcdsaP256,
                P384_PARAMS => KeyKind::EcdsaP384,
                _ => {
                    return Err(TokenError::Key(
                        "the key is on a curve the native engine does not sign with (P-256 and P-384 only); use signer.backend = \"osslsigncode\"".into(),
                    ))
                }
            },
            other => {
                return Err(TokenError::Key(format!(
                    "the key is of type {other:?}, neither RSA nor EC; use signer.backend = \"osslsigncode\""
                )))
            }
        };
        let certs = open
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(open.key.id.clone()),
            ])
            .map_err(ckerr)?;
        let certificate = match certs.first() {
            Some(&h) => open
                .session
                .get_attributes(h, &[AttributeType::Value])
                .map_err(ckerr)?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                }),
            None => None,
        };
        let raw = RawKey { kind, certificate };
        open.raw = Some(raw.clone());
        Ok(raw)
    }

    /// See [`TokenSession::sign_raw`].
    pub fn sign_raw(&mut self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        let first = match self.sign_on_session(hash, data)? {
            Ok(signature) => return Ok(signature),
            Err(e) => e,
        };
        if let Some(lost) = self.loss_after(&first) {
            return Err(lost);
        }
        // A module may say nothing more than CKR_GENERAL_ERROR for a reader pulled a
        // moment ago, before it knows of the removal: log in on a new session (which
        // reaches the token, and fails as a loss when it is gone) and sign once more.
        tracing::warn!(error = %ck(&first), "the signature failed; logging in on a new session to tell a failing token from a lost one, and signing once more");
        self.apply(TokenEvent::SessionClosed);
        match self.ensure_ready() {
            Ok(_) => {}
            Err(e @ TokenError::Lost(_)) => return Err(e),
            Err(e) if e.is_pin_problem() => return Err(e),
            // A token that signed until now, then fails a signature and a new login
            // (OpenSC: CKR_GENERAL_ERROR from C_Login on a reader being pulled) is
            // treated as lost: the job waits, and the agent opens the token afresh.
            Err(e) => {
                return Err(TokenError::Lost(format!(
                    "{}; then a new login failed: {e}",
                    ck(&first)
                )))
            }
        }
        match self.sign_on_session(hash, data)? {
            Ok(signature) => {
                tracing::info!("signed on the new session");
                Ok(signature)
            }
            Err(e) => Err(self.loss_after(&e).unwrap_or_else(|| {
                TokenError::Key(format!(
                    "the token could not sign: {} (and on a new session: {})",
                    ck(&first),
                    ck(&e)
                ))
            })),
        }
    }

    /// One C_Sign on the logged-in session; the outer error is a session or key that
    /// is not there.
    fn sign_on_session(
        &mut self,
        hash: HashAlg,
        data: &[u8],
    ) -> Result<Result<Vec<u8>, CkError>, TokenError> {
        let kind = self.raw_key()?.kind;
        let Some(open) = self.open.as_ref() else {
            return Err(TokenError::Lost("no logged-in session".into()));
        };
        // RSA: the token hashes and signs (CKM_SHA*_RSA_PKCS). ECDSA: hashed here and
        // signed with CKM_ECDSA, which every EC token has (SoftHSM 2.6 and many cards
        // have no CKM_ECDSA_SHA*), as libp11 does for osslsigncode.
        let (mechanism, input) = match (kind, hash) {
            (KeyKind::Rsa, HashAlg::Sha256) => (Mechanism::Sha256RsaPkcs, data.to_vec()),
            (KeyKind::Rsa, HashAlg::Sha384) => (Mechanism::Sha384RsaPkcs, data.to_vec()),
            (KeyKind::Rsa, HashAlg::Sha512) => (Mechanism::Sha512RsaPkcs, data.to_vec()),
            (_, h) => (Mechanism::Ecdsa, h.digest(data)),
        };
        Ok(open.session.sign(&mechanism, open.key_handle, &input))
    }

    /// The loss a failed C_Sign means: its return value says so, or (some modules
    /// answer a signature on a token that went away with a plain failure, OpenSC with
    /// pcscd gone CKR_GENERAL_ERROR, while the session checks answer from the module's
    /// memory) the token itself, asked, says it is gone.
    fn loss_after(&self, e: &CkError) -> Option<TokenError> {
        if let CkError::Pkcs11(rv, _) = e {
            if classify(Observation::Returned(Call::Other, *rv), true) == Verdict::TokenLost {
                return Some(TokenError::Lost(ck(e)));
            }
        }
        let gone = self.token_gone()?;
        tracing::warn!(error = %ck(e), token = %gone, "the signature failed and the token is gone");
        Some(TokenError::Lost(format!("{}; then {gone}", ck(e))))
    }

    /// Asks the module about the token's slot, in the calls that reach the reader
    /// (`C_GetSlotInfo`, which OpenSC answers by asking pcscd, then `C_GetTokenInfo`);
    /// answers what they said when that means the token is gone.
    fn token_gone(&self) -> Option<String> {
        let (ctx, found) = (self.ctx.as_ref()?, self.found.as_ref()?);
        match ctx.get_slot_info(found.slot) {
            Err(e @ CkError::Pkcs11(rv, _)) if token_info_says_gone(rv) => return Some(ck(&e)),
            Ok(info) if !info.token_present() => return Some("the slot holds no token".to_owned()),
            _ => {}
        }
        match ctx.get_token_info(found.slot) {
            Err(e @ CkError::Pkcs11(rv, _)) if token_info_says_gone(rv) => Some(ck(&e)),
            _ => None,
        }
    }

    fn find_key(
        &self,
        session: &Session,
        token_label: String,
        token_serial: String,
        had: bool,
    ) -> Result<(KeyRef, ObjectHandle), TokenError> {
        let ckerr = |e: CkError| match e {
            CkError::Pkcs11(rv, _)
                if classify(Observation::Returned(Call::Other, rv), had) == Verdict::TokenLost =>
            {
                TokenError::Lost(ck(&e))
            }
            _ => TokenError::Key(format!("cannot read the token's keys: {}", ck(&e))),
        };
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(l) = &self.cfg.key_label {
            template.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        let keys = session.find_objects(&template).map_err(ckerr)?;
        let mut described = Vec::new();
        for &k in &keys {
            let attrs = session
                .get_attributes(k, &[AttributeType::Id, AttributeType::Label])
                .map_err(ckerr)?;
            let mut id = Vec::new();
            let mut label = String::new();
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = v,
                    Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                    _ => {}
                }
            }
            described.push((k, id, label));
        }
        let (handle, id, label) = match (described.len(), &self.cfg.key_label) {
            (1, _) => described.remove(0),
            (0, Some(l)) => {
                return Err(TokenError::Key(format!(
                    "the token \"{token_label}\" has no private key labelled \"{l}\"; fix token.key_label in the agent's configuration"
                )))
            }
            (0, None) => {
                return Err(TokenError::Key(format!(
                    "the token \"{token_label}\" holds no private key the PIN can see"
                )))
            }
            (_, _) => {
                let names: Vec<String> = described.iter().map(|(_, _, l)| format!("\"{l}\"")).collect();
                return Err(TokenError::Key(format!(
                    "the token \"{token_label}\" holds several private keys ({}); choose one with token.key_label",
                    names.join(", ")
                )));
            }
        };
        let cert_on_token = !session
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(id.clone()),
            ])
            .map_err(ckerr)?
            .is_empty();
        Ok((
            KeyRef {
                token_label,
                token_serial,
                id,
                label,
                cert_on_token,
            },
            handle,
        ))
    }
}

/// The X.509 certificates on the token: public objects, read without logging in.
fn read_certificates(session: &Session) -> Result<Vec<CertificateSummary>, CkError> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(cryptoki::object::CertificateType::X_509),
    ])?;
    let mut out = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    for h in handles {
        let mut der = Vec::new();
        let mut label = String::new();
        let mut id = Vec::new();
        for a in session.get_attributes(
            h,
            &[
                AttributeType::Value,
                AttributeType::Label,
                AttributeType::Id,
            ],
        )? {
            match a {
                Attribute::Value(v) => der = v,
                Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::Id(v) => id = v,
                _ => {}
            }
        }
        match describe_certificate(&der, &label, &id, now) {
            Ok(c) => out.push(c),
            Err(e) => {
                tracing::warn!(%label, error = %e, "a certificate on the token cannot be parsed")
            }
        }
    }
    Ok(out)
}

/// Subject, issuer, fingerprint and validity of a DER certificate.
pub fn describe_certificate(
    der: &[u8],
    label: &str,
    id: &[u8],
    now: time::OffsetDateTime,
) -> Result<CertificateSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let not_after = cert.validity().not_after.to_datetime();
    Ok(CertificateSummary {
        label: label.to_owned(),
        id: hex(id),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sha256: hex(&Sha256::digest(der)),
        sha1: hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
        not_before: rfc3339(cert.validity().not_before.to_datetime()),
        not_after: rfc3339(not_after),
        days_left: (not_after - now).whole_days(),
    })
}

/// Reads the PIN file: the first line, without its line ending.
fn read_pin(path: &Path) -> Result<AuthPin, TokenError> {
    let err = |detail: String| TokenError::PinFile {
        path: path.to_owned(),
        detail,
    };
    check_pin_file(path).map_err(err)?;
    let text = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(err("the file is empty".to_owned()));
    }
    let pin = std::str::from_utf8(line)
        .map(AuthPin::from)
        .map_err(|_| err("the PIN is not UTF-8 text".to_owned()))?;
    Ok(pin)
}

/// Refuses a PIN file that group or others may read or change (it is used only when
/// mode is 0600 or 0400); the error says how to fix it. Nothing is read from it.
/// Windows has no mode bits: there the file's ACL is the operator's to restrict
/// (`icacls FILE /inheritance:r /grant:r ACCOUNT:R`), and only its presence is checked.
pub fn check_pin_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    match file_mode(&meta) {
        Some(mode) if mode & 0o077 != 0 => Err(pin_file_open(path, mode)),
        _ => Ok(()),
    }
}

/// A file's unix mode bits; `None` where files have none (Windows).
pub fn file_mode(meta: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(meta.permissions().mode() & 0o7777)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// The refusal of a PIN file open to group or others.
pub fn pin_file_open(path: &Path, mode: u32) -> String {
    format!(
        "it is open to group or others (mode {:04o}), so the agent does not use it; `chmod 600 {}` (owned by the agent's user)",
        mode & 0o7777,
        path.display()
    )
}

/// A cryptoki error as the PKCS#11 name people search for.
pub fn ck(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, func) => format!("{func} returned {}", ckr_name(rv)),
        other => other.to_string(),
    }
}

fn ckr_name(rv: &RvError) -> String {
    // RvError's Debug is the CKR_ name in CamelCase: PinIncorrect -> CKR_PIN_INCORRECT.
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_signature_is_a_loss_when_the_token_info_says_the_token_is_gone() {
        use cryptoki::error::RvError;
        // OpenSC with pcscd gone, a pulled reader, a module that forgot the token.
        for rv in [
            RvError::GeneralError,
            RvError::TokenNotPresent,
            RvError::DeviceRemoved,
            RvError::DeviceError,
            RvError::SlotIdInvalid,
            RvError::CryptokiNotInitialized,
        ] {
            assert!(token_info_says_gone(rv), "{rv:?}");
        }
        // The token still answers about itself: the signature failed on its own.
        for rv in [
            RvError::FunctionFailed,
            RvError::HostMemory,
            RvError::ArgumentsBad,
        ] {
            assert!(!token_info_says_gone(rv), "{rv:?}");
        }
    }

    #[test]
    fn guard_never_allows_the_same_rejected_pin_twice() {
        let mut g = PinGuard::default();
        let ok = PinFlags::default();
        assert_eq!(g.may_try(b"1111", ok), Ok(()));
        g.rejected(b"1111");
        assert_eq!(g.may_try(b"1111", ok), Err(Refusal::SamePinRejected));
        assert_eq!(
            g.may_try(b"2222", ok),
            Ok(()),
            "a different PIN may be tried"
        );
        g.rejected(b"2222");
        assert_eq!(
            g.may_try(b"1111", ok),
            Err(Refusal::SamePinRejected),
            "every refused PIN is remembered"
        );
        assert_eq!(g.may_try(b"2222", ok), Err(Refusal::SamePinRejected));
        g.accepted();
        assert_eq!(
            g.may_try(b"1111", ok),
            Ok(()),
            "an accepted login clears the history"
        );
    }

    #[test]
    fn guard_refuses_final_try_and_locked_whatever_the_pin() {
        let g = PinGuard::default();
        let final_try = PinFlags {
            final_try: true,
            ..Default::default()
        };
        let locked = PinFlags {
            locked: true,
            ..Default::default()
        };
        assert_eq!(g.may_try(b"1", final_try), Err(Refusal::FinalTry));
        assert_eq!(g.may_try(b"1", locked), Err(Refusal::Locked));
        let low = PinFlags {
            count_low: true,
            ..Default::default()
        };
        assert_eq!(
            g.may_try(b"1", low),
            Ok(()),
            "count low alone still allows one supplied PIN"
        );
    }

    #[test]
    fn ckr_names_read_like_the_standard() {
        assert_eq!(ckr_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(&RvError::TokenNotPresent), "CKR_TOKEN_NOT_PRESENT");
    }

    #[cfg(unix)]
    #[test]
    fn a_pin_file_others_can_read_is_refused_unread() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123456\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_pin(&p).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("mode 0644") && text.contains(&format!("chmod 600 {}", p.display())),
            "{text}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_pin(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "123456");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_pin(&p).is_ok());
    }

    #[test]
    fn pin_file_first_line_without_line_ending() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123456\r\nignored").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "123456");
        std::fs::write(&p, "").unwrap();
        assert!(read_pin(&p).unwrap_err().to_string().contains("empty"));
        let missing = read_pin(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(
            missing.contains("nope") && missing.contains("write the token's user PIN"),
            "{missing}"
        );
    }

    /// A self-signed P-256 certificate made with `openssl req -x509 -subj
    /// "/CN=Signet Unit Test/O=Signet" -days 1000`, as DER in hex.
    const TEST_CERT: [&str; 9] = [
        "308201ac30820153a003020102021418978cabca6ea4ff0700b6ffa2ee2d1bdad5720b300a06082a8648ce3d04030230",
        "2c3119301706035504030c105369676e657420556e69742054657374310f300d060355040a0c065369676e6574301e17",
        "0d3236313132333139343633335a170d3239303831393139343633335a302c3119301706035504030c105369676e6574",
        "20556e69742054657374310f300d060355040a0c065369676e65743059301306072a8648ce3d020106082a8648ce3d03",
        "0107034200049fa659a7290865534024b2c3ebee6ad820f40b56d0dd4286d8ce9ac41840bd52e34dfb10b6c164767321",
        "b7e5d5548aa04f3717e3d222a748c5df4969e0baae09a3533051301d0603551d0e04160414df3d369ebd98198fe82340",
        "4a8b7b0c397554f0cf301f0603551d23041830168014df3d369ebd98198fe823404a8b7b0c397554f0cf300f0603551d",
        "130101ff040530030101ff300a06082a8648ce3d0403020347003044022048a7ad8c54446111eac19bb17a5d3352491e",
        "6f0171effd0fbd68f1cc57b9da7902200f477a0c4fe138fec1c7702d8c38af753e96af7c93200be7bef00b8ba10ad3de",
    ];

    #[test]
    fn certificates_are_described_by_subject_issuer_fingerprint_and_expiry() {
        let hexed: String = TEST_CERT.concat();
        let der: Vec<u8> = (0..hexed.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hexed[i..i + 2], 16).unwrap())
            .collect();
        // 2029-08-09T19:46:33Z, ten days before notAfter.
        let now = time::OffsetDateTime::from_unix_timestamp(1_880_999_193).unwrap();
        let c = describe_certificate(&der, "signkey", &[0x01], now).unwrap();
        assert_eq!(c.subject, "CN=Signet Unit Test, O=Signet");
        assert_eq!(c.issuer, c.subject, "self-signed");
        assert_eq!(
            c.sha256, "f538a807783556d934fe4f387a502571f3acd633b704dabaf063ce2934899f99",
            "the same as `openssl x509 -fingerprint -sha256`"
        );
        assert_eq!(c.not_before, "2026-11-23T19:46:33Z");
        assert_eq!(c.not_after, "2029-08-19T19:46:33Z");
        assert_eq!(c.days_left, 10);
        assert_eq!((c.label.as_str(), c.id.as_str()), ("signkey", "01"));
        // 2029-08-21T19:46:34Z.
        let later = time::OffsetDateTime::from_unix_timestamp(1_882_035_994).unwrap();
        assert_eq!(
            describe_certificate(&der, "", &[], later)
                .unwrap()
                .days_left,
            -2,
            "an expired certificate counts down below zero"
        );
        assert!(describe_certificate(b"not a certificate", "", &[], now).is_err());
    }
}
