//! The PKCS#11 side of the agent: finding the token, logging in once, guarding the
//! PIN retry counter, and reporting what the token says about itself.
//!
//! [`PinGuard`] is pure: it decides whether a login may be tried. [`Token`] does the
//! cryptoki calls and keeps one logged-in session for the agent's life, re-opening it
//! when the token says the session is gone.

use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::TokenInfo;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};
use signet_protocol::wire::{AgentState, ErrorCode, TokenSummary};

use crate::config::TokenConfig;

/// Why the token cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the PKCS#11 module {module} cannot be used: {detail}; check token.module in the agent's configuration")]
    Module { module: PathBuf, detail: String },
    #[error("no token matches {wanted}; tokens present: {found}")]
    NotFound { wanted: String, found: String },
    #[error("cannot read the PIN file {path}: {detail}; write the token's user PIN into it (readable by the agent only)")]
    PinFile { path: PathBuf, detail: String },
    #[error("the token refused the PIN from {path}; Signet will not try that PIN again: put the right PIN in {path}")]
    PinRejected { path: PathBuf },
    #[error(
        "the token's user PIN is {why}; Signet does not log in to it, so no try is spent: {fix}"
    )]
    PinLocked {
        why: &'static str,
        fix: &'static str,
    },
    #[error("{0}")]
    Key(String),
    #[error("the token stopped answering ({0}); it is re-opened on the next job")]
    Lost(String),
}

impl TokenError {
    /// The wire error class of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::PinRejected { .. } | TokenError::PinFile { .. } => ErrorCode::PinRejected,
            TokenError::PinLocked { .. } => ErrorCode::PinLocked,
            TokenError::Module { .. }
            | TokenError::NotFound { .. }
            | TokenError::Lost(_)
            | TokenError::Key(_) => ErrorCode::TokenUnavailable,
        }
    }

    /// The agent state this failure leaves behind.
    pub fn state(&self) -> AgentState {
        match self {
            TokenError::Module { .. } => AgentState::ModuleError,
            TokenError::PinRejected { .. } | TokenError::PinFile { .. } => AgentState::PinRejected,
            TokenError::PinLocked { .. } => AgentState::PinLocked,
            TokenError::NotFound { .. } | TokenError::Lost(_) | TokenError::Key(_) => {
                AgentState::TokenMissing
            }
        }
    }
}

/// What the PIN counter flags of a token allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PinFlags {
    pub count_low: bool,
    pub final_try: bool,
    pub locked: bool,
    pub to_be_changed: bool,
}

impl From<&TokenInfo> for PinFlags {
    fn from(t: &TokenInfo) -> Self {
        PinFlags {
            count_low: t.user_pin_count_low(),
            final_try: t.user_pin_final_try(),
            locked: t.user_pin_locked(),
            to_be_changed: t.user_pin_to_be_changed(),
        }
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

struct Open {
    ctx: Pkcs11,
    session: Session,
    key: KeyRef,
    pin: AuthPin,
}

/// One token, one logged-in session.
pub struct Token {
    cfg: TokenConfig,
    guard: PinGuard,
    open: Option<Open>,
    last_error: Option<TokenError>,
    summary: Option<TokenSummary>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.cfg.module)
            .field("open", &self.open.is_some())
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn new(cfg: TokenConfig) -> Self {
        Token {
            cfg,
            guard: PinGuard::default(),
            open: None,
            last_error: None,
            summary: None,
        }
    }

    /// The agent state and what it means.
    pub fn state(&self) -> (AgentState, String) {
        match (&self.open, &self.last_error) {
            (Some(_), _) => (
                AgentState::Ready,
                "logged in to the token; jobs are signed".to_owned(),
            ),
            (None, Some(e)) => (e.state(), e.to_string()),
            (None, None) => (
                AgentState::TokenMissing,
                "the token has not been opened yet".to_owned(),
            ),
        }
    }

    pub fn summary(&self) -> Option<TokenSummary> {
        self.summary.clone()
    }

    /// Makes sure there is a logged-in session and returns the key to sign with and the
    /// PIN that logged in. Opens the module, finds the token and logs in as needed.
    pub fn ensure_ready(&mut self) -> Result<(KeyRef, AuthPin), TokenError> {
        if let Some(open) = &self.open {
            match open.session.get_session_info() {
                Ok(_) => return Ok((open.key.clone(), open.pin.clone())),
                Err(e) => {
                    tracing::warn!(error = %ck(&e), "the token session is gone; re-opening");
                    self.close();
                }
            }
        }
        let result = self.open();
        match &result {
            Ok(open) => {
                self.last_error = None;
                let out = (open.key.clone(), open.pin.clone());
                tracing::info!(token = %open.key.token_serial, label = %open.key.token_label, "logged in to the token");
                self.open = result.ok();
                Ok(out)
            }
            Err(e) => {
                self.last_error = Some(e.clone());
                Err(e.clone())
            }
        }
    }

    /// Forgets the session (after the token was lost).
    pub fn close(&mut self) {
        if let Some(open) = self.open.take() {
            drop(open.session);
            let _ = open.ctx.finalize();
        }
    }

    /// The token refused `pin` outside our own login (the signer's): never again.
    pub fn refused(&mut self, pin: &AuthPin) {
        use secrecy::ExposeSecret;
        self.guard.rejected(pin.expose_secret().as_bytes());
        self.close();
        self.last_error = Some(TokenError::PinRejected {
            path: self.cfg.pin_file.clone(),
        });
    }

    /// Records that a job saw the token vanish.
    pub fn lost(&mut self, detail: String) {
        self.close();
        self.last_error = Some(TokenError::Lost(detail));
    }

    fn open(&mut self) -> Result<Open, TokenError> {
        let module_err = |detail: String| TokenError::Module {
            module: self.cfg.module.clone(),
            detail,
        };
        let ctx = Pkcs11::new(&self.cfg.module).map_err(|e| module_err(ck(&e)))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| module_err(ck(&e)))?;
        let result = self.open_in(&ctx);
        match result {
            Ok((session, key, pin)) => Ok(Open {
                ctx,
                session,
                key,
                pin,
            }),
            Err(e) => {
                let _ = ctx.finalize();
                Err(e)
            }
        }
    }

    fn open_in(&mut self, ctx: &Pkcs11) -> Result<(Session, KeyRef, AuthPin), TokenError> {
        let lost = |e: CkError| TokenError::Lost(ck(&e));
        let mut found = Vec::new();
        let mut chosen = None;
        for slot in ctx.get_slots_with_token().map_err(lost)? {
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
            found.push(format!("\"{label}\" (serial {serial})"));
            if matches && chosen.is_none() {
                chosen = Some((slot, info));
            }
        }
        let Some((slot, info)) = chosen else {
            return Err(TokenError::NotFound {
                wanted: self.wanted(),
                found: if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join(", ")
                },
            });
        };
        let token_label = info.label().trim_end().to_owned();
        let token_serial = info.serial_number().trim_end().to_owned();
        self.summary = Some(TokenSummary {
            label: token_label.clone(),
            serial: token_serial.clone(),
            model: info.model().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
        });
        let span = tracing::info_span!("token", token = %token_serial);
        let _g = span.enter();

        let pin = read_pin(&self.cfg.pin_file)?;
        let flags = PinFlags::from(&info);
        match self.guard.may_try(pin.as_bytes(), flags) {
            Ok(()) => {}
            Err(Refusal::Locked) => {
                tracing::error!("the token's user PIN is locked; not logging in");
                return Err(TokenError::PinLocked {
                    why: "locked",
                    fix: "unlock it with the SO PIN (or the vendor's tool), then restart the agent",
                });
            }
            Err(Refusal::FinalTry) => {
                tracing::error!("the token is on its final PIN try; not logging in");
                return Err(TokenError::PinLocked {
                    why: "on its final try (one more wrong PIN locks it)",
                    fix: "log in once by hand with the right PIN to reset the counter, then restart the agent",
                });
            }
            Err(Refusal::SamePinRejected) => {
                return Err(TokenError::PinRejected {
                    path: self.cfg.pin_file.clone(),
                });
            }
        }
        let session = ctx.open_ro_session(slot).map_err(lost)?;
        let auth = AuthPin::new(pin.clone().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => self.guard.accepted(),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                self.guard.rejected(pin.as_bytes());
                let after = ctx
                    .get_token_info(slot)
                    .map(|i| PinFlags::from(&i))
                    .unwrap_or_default();
                tracing::error!(
                    ?after,
                    "the token refused the PIN; it will not be tried again"
                );
                return Err(TokenError::PinRejected {
                    path: self.cfg.pin_file.clone(),
                });
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(TokenError::PinLocked {
                    why: "locked",
                    fix: "unlock it with the SO PIN (or the vendor's tool), then restart the agent",
                });
            }
            Err(e) => return Err(lost(e)),
        }
        drop(pin);
        let key = self.find_key(&session, token_label, token_serial)?;
        Ok((session, key, auth))
    }

    fn wanted(&self) -> String {
        match (&self.cfg.label, &self.cfg.serial) {
            (Some(l), Some(s)) => format!("label \"{l}\" and serial {s}"),
            (Some(l), None) => format!("label \"{l}\""),
            (None, Some(s)) => format!("serial {s}"),
            (None, None) => "any token".to_owned(),
        }
    }

    fn find_key(
        &self,
        session: &Session,
        token_label: String,
        token_serial: String,
    ) -> Result<KeyRef, TokenError> {
        let ckerr = |e: CkError| TokenError::Lost(ck(&e));
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
            described.push((id, label));
        }
        let (id, label) = match (described.len(), &self.cfg.key_label) {
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
                let names: Vec<String> = described.iter().map(|(_, l)| format!("\"{l}\"")).collect();
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
        Ok(KeyRef {
            token_label,
            token_serial,
            id,
            label,
            cert_on_token,
        })
    }
}

/// Reads the PIN file: the first line, without its line ending.
fn read_pin(path: &Path) -> Result<String, TokenError> {
    let err = |detail: String| TokenError::PinFile {
        path: path.to_owned(),
        detail,
    };
    let text = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(err("the file is empty".to_owned()));
    }
    let pin = String::from_utf8(line.to_vec())
        .map_err(|_| err("the PIN is not UTF-8 text".to_owned()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the PIN file is readable by others; chmod 600 it");
            }
        }
    }
    Ok(pin)
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

    #[test]
    fn pin_file_first_line_without_line_ending() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123456\r\nignored").unwrap();
        assert_eq!(read_pin(&p).unwrap(), "123456");
        std::fs::write(&p, "").unwrap();
        assert!(read_pin(&p).unwrap_err().to_string().contains("empty"));
        let missing = read_pin(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(
            missing.contains("nope") && missing.contains("write the token's user PIN"),
            "{missing}"
        );
    }
}
