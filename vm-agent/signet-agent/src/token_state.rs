//! The token's state as a pure machine: [`TokenState::on`] takes what happened to the
//! token and answers what to do about it ([`Action`]s: events to publish, the session
//! to drop, the module to finalise). No I/O: [`crate::token::Token`] makes the PKCS#11
//! calls, feeds what they said in as [`TokenEvent`]s and carries the actions out.
//!
//! States, as the host sees them ([`TokenState::state`]): not opened yet (token
//! missing), ready (logged in), lost, and the failure the last try to open ended in
//! (token missing, module error, PIN needed, PIN refused, PIN locked): a
//! [`TokenError`], defined here with the rest of the machine's words.

use std::path::PathBuf;

use signet_api::wire::{AgentEventKind, AgentState, ErrorCode};

/// Where the PIN of a login came from; named in messages, never the PIN itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `POST /agent/v1/login`.
    Host,
    /// `token.pin_file`.
    File(PathBuf),
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::Host => f.write_str("the PIN sent by the host"),
            PinSource::File(p) => write!(f, "the PIN in {}", p.display()),
        }
    }
}

/// Why the token cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the PKCS#11 module {module} cannot be used: {detail}; check token.module in the agent's configuration")]
    Module { module: PathBuf, detail: String },
    #[error("no token matches {wanted}; tokens present: {found}")]
    NotFound { wanted: String, found: String },
    #[error("cannot read the PIN file {path}: {detail}; write the token's user PIN into it (readable by the agent only)")]
    PinFile { path: PathBuf, detail: String },
    #[error("the agent has no PIN for the token: the host sends it (POST /agent/v1/login), or name a file with token.pin_file")]
    PinNeeded,
    #[error("the token refused {from}; Signet will not try that PIN again: supply the right PIN (host login or PIN file)")]
    PinRejected { from: PinSource },
    #[error(
        "the token's user PIN is {why}; Signet does not log in to it, so no try is spent: {fix}"
    )]
    PinLocked {
        why: &'static str,
        fix: &'static str,
    },
    #[error("{0}")]
    Key(String),
    #[error("the token was lost ({0}); the agent re-initialises the module and logs in again when it returns: retry the job then")]
    Lost(String),
}

impl TokenError {
    /// The wire error class of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::PinRejected { .. } | TokenError::PinFile { .. } => ErrorCode::PinRejected,
            TokenError::PinNeeded => ErrorCode::PinNeeded,
            TokenError::PinLocked { .. } => ErrorCode::PinLocked,
            TokenError::Module { .. }
            | TokenError::NotFound { .. }
            | TokenError::Lost(_)
            | TokenError::Key(_) => ErrorCode::TokenUnavailable,
        }
    }

    /// Nothing was signed and the same job may succeed later without anyone acting.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            TokenError::Lost(_) | TokenError::NotFound { .. } | TokenError::PinNeeded
        )
    }

    /// Whether trying to open the token again, unattended, can end this fault.
    pub fn retry_worth_it(&self) -> bool {
        matches!(
            self,
            TokenError::Module { .. } | TokenError::NotFound { .. } | TokenError::Lost(_)
        )
    }

    /// The agent state this failure leaves behind.
    pub fn state(&self) -> AgentState {
        match self {
            TokenError::Module { .. } => AgentState::ModuleError,
            TokenError::PinRejected { .. } | TokenError::PinFile { .. } => AgentState::PinRejected,
            TokenError::PinNeeded => AgentState::PinNeeded,
            TokenError::PinLocked { .. } => AgentState::PinLocked,
            TokenError::Lost(_) => AgentState::TokenLost,
            TokenError::NotFound { .. } | TokenError::Key(_) => AgentState::TokenMissing,
        }
    }

    pub(crate) fn is_pin_problem(&self) -> bool {
        matches!(
            self.state(),
            AgentState::PinNeeded | AgentState::PinRejected | AgentState::PinLocked
        )
    }
}

/// What happened to the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEvent {
    /// The configured token was found in a slot.
    Found { label: String, serial: String },
    /// A login succeeded: the session is open and logged in.
    LoggedIn { label: String, serial: String },
    /// A try to open the token and log in failed (the session was dropped before it).
    OpenFailed(TokenError),
    /// The token vanished: a PKCS#11 answer that means loss, or a signer's report.
    Lost(String),
    /// The token refused the PIN outside the agent's own login (the signer's).
    PinRefused(PinSource),
    /// The session is dropped (it is no longer logged in, or a login follows).
    SessionClosed,
    /// Session and module are dropped (a re-initialisation, or a failed open).
    ModuleClosed,
}

/// What the I/O side does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish this event to the host (and log it).
    Publish(AgentEventKind),
    /// Drop the logged-in session.
    CloseSession,
    /// Finalise the PKCS#11 module, so the next open initialises it afresh.
    FinaliseModule,
}

/// The token as far as the agent knows.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    /// A logged-in session is open.
    logged_in: bool,
    /// The configured token is present.
    present: bool,
    /// The serial of the token as last found.
    serial: String,
    /// Why the token, which was there, is gone; cleared when it is found again.
    lost: Option<String>,
    /// How the last try to open the token failed; cleared by a login.
    last_error: Option<TokenError>,
}

impl TokenState {
    /// Takes `event` in; answers what to do.
    pub fn on(&mut self, event: TokenEvent) -> Vec<Action> {
        match event {
            TokenEvent::Found { label, serial } => {
                let mut actions = Vec::new();
                if !self.present {
                    actions.push(Action::Publish(AgentEventKind::TokenAppeared {
                        label,
                        serial: serial.clone(),
                    }));
                }
                self.present = true;
                self.lost = None;
                self.serial = serial;
                actions
            }
            TokenEvent::LoggedIn { label, serial } => {
                self.last_error = None;
                self.logged_in = true;
                vec![Action::Publish(AgentEventKind::LoggedIn { label, serial })]
            }
            TokenEvent::OpenFailed(e) => {
                let mut actions = Vec::new();
                if e.is_pin_problem() && self.last_error.as_ref() != Some(&e) {
                    actions.push(Action::Publish(AgentEventKind::PinProblem {
                        state: e.state(),
                        detail: e.to_string(),
                    }));
                }
                self.logged_in = false;
                if let TokenError::Lost(why) = &e {
                    actions.extend(self.lose(why.clone()));
                }
                self.last_error = Some(e);
                actions
            }
            TokenEvent::Lost(detail) => self.lose(detail),
            TokenEvent::PinRefused(from) => {
                let e = TokenError::PinRejected { from };
                self.logged_in = false;
                let actions = vec![
                    Action::CloseSession,
                    Action::Publish(AgentEventKind::PinProblem {
                        state: e.state(),
                        detail: e.to_string(),
                    }),
                ];
                self.last_error = Some(e);
                actions
            }
            TokenEvent::SessionClosed => {
                self.logged_in = false;
                vec![Action::CloseSession]
            }
            TokenEvent::ModuleClosed => {
                self.logged_in = false;
                vec![Action::CloseSession, Action::FinaliseModule]
            }
        }
    }

    /// The token is gone: session and module start afresh; the host hears of it when
    /// the token was there.
    fn lose(&mut self, detail: String) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.present || self.logged_in {
            actions.push(Action::Publish(AgentEventKind::TokenLost {
                serial: self.serial.clone(),
                detail: detail.clone(),
            }));
        }
        self.present = false;
        self.logged_in = false;
        self.lost = Some(detail);
        actions.extend([Action::CloseSession, Action::FinaliseModule]);
        actions
    }

    /// The agent state and what it means.
    pub fn state(&self) -> (AgentState, String) {
        if self.logged_in {
            return (
                AgentState::Ready,
                "logged in to the token; jobs are signed".to_owned(),
            );
        }
        if let Some(why) = &self.lost {
            let e = TokenError::Lost(why.clone());
            return (e.state(), e.to_string());
        }
        match &self.last_error {
            Some(e) => (e.state(), e.to_string()),
            None => (
                AgentState::TokenMissing,
                "the token has not been opened yet".to_owned(),
            ),
        }
    }

    /// Whether opening the token again, unattended, may end the current fault.
    pub fn retry_worth_it(&self) -> bool {
        self.lost.is_some() || self.last_error.as_ref().is_none_or(|e| e.retry_worth_it())
    }

    /// Whether the token was seen (so a failure now is a disappearance rather than a
    /// token that was never there).
    pub fn had_token(&self) -> bool {
        self.present || self.lost.is_some() || self.logged_in
    }

    /// The configured token is present, as far as the agent knows.
    pub fn present(&self) -> bool {
        self.present
    }

    /// A logged-in session is open.
    pub fn logged_in(&self) -> bool {
        self.logged_in
    }

    /// Why the token is gone, when it is.
    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// How the last try to open the token failed.
    pub fn last_error(&self) -> Option<&TokenError> {
        self.last_error.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{watch, Watch};

    fn found() -> TokenEvent {
        TokenEvent::Found {
            label: "t".into(),
            serial: "42".into(),
        }
    }

    fn logged_in() -> TokenEvent {
        TokenEvent::LoggedIn {
            label: "t".into(),
            serial: "42".into(),
        }
    }

    fn published(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(e) => Some(e.name()),
                _ => None,
            })
            .collect()
    }

    /// The state and what the watcher does in it.
    fn plan(s: &TokenState) -> (AgentState, Watch) {
        let state = s.state().0;
        (state, watch(state, s.retry_worth_it()))
    }

    #[test]
    fn a_new_token_is_missing_until_found_and_logged_in() {
        let mut s = TokenState::default();
        assert_eq!(plan(&s), (AgentState::TokenMissing, Watch::Reopen));
        assert!(s.state().1.contains("not been opened"));
        assert!(!s.had_token());
        let a = s.on(found());
        assert_eq!(published(&a), ["token_appeared"]);
        assert!(s.present() && s.had_token() && !s.logged_in());
        assert_eq!(s.on(found()), [], "a token already present appears once");
        let a = s.on(logged_in());
        assert_eq!(published(&a), ["logged_in"]);
        assert_eq!(plan(&s), (AgentState::Ready, Watch::Check));
    }

    #[test]
    fn loss_of_a_ready_token_is_published_and_everything_starts_afresh() {
        let mut s = TokenState::default();
        s.on(found());
        s.on(logged_in());
        let a = s.on(TokenEvent::Lost("CKR_DEVICE_REMOVED".into()));
        assert_eq!(
            a,
            [
                Action::Publish(AgentEventKind::TokenLost {
                    serial: "42".into(),
                    detail: "CKR_DEVICE_REMOVED".into()
                }),
                Action::CloseSession,
                Action::FinaliseModule
            ]
        );
        assert_eq!(plan(&s), (AgentState::TokenLost, Watch::Reopen));
        assert!(s.state().1.contains("CKR_DEVICE_REMOVED"));
        assert!(!s.present() && !s.logged_in() && s.had_token());
        // Losing it again while it is gone tells nobody twice.
        let a = s.on(TokenEvent::OpenFailed(TokenError::Lost("again".into())));
        assert_eq!(published(&a), Vec::<&str>::new());
        assert_eq!(a, [Action::CloseSession, Action::FinaliseModule]);
        // Back: appears, logs in, ready; the loss is history.
        assert_eq!(published(&s.on(found())), ["token_appeared"]);
        assert_eq!(s.lost(), None);
        s.on(logged_in());
        assert_eq!(plan(&s), (AgentState::Ready, Watch::Check));
    }

    #[test]
    fn a_token_never_seen_is_not_lost_when_it_is_not_there() {
        let mut s = TokenState::default();
        let a = s.on(TokenEvent::OpenFailed(TokenError::NotFound {
            wanted: "label \"t\"".into(),
            found: "none".into(),
        }));
        assert_eq!(a, []);
        assert_eq!(plan(&s), (AgentState::TokenMissing, Watch::Reopen));
        let a = s.on(TokenEvent::OpenFailed(TokenError::Key("no key".into())));
        assert_eq!(a, []);
        assert_eq!(
            plan(&s),
            (AgentState::TokenMissing, Watch::Wait),
            "a missing key waits for a person"
        );
    }

    #[test]
    fn a_refused_pin_is_published_once_and_the_watcher_waits() {
        let mut s = TokenState::default();
        s.on(found());
        let refused = TokenError::PinRejected {
            from: PinSource::File(PathBuf::from("/etc/signet/pin")),
        };
        let a = s.on(TokenEvent::OpenFailed(refused.clone()));
        assert_eq!(published(&a), ["pin_problem"]);
        assert_eq!(plan(&s), (AgentState::PinRejected, Watch::Wait));
        assert!(s.state().1.contains("/etc/signet/pin"));
        assert_eq!(
            s.on(TokenEvent::OpenFailed(refused)),
            [],
            "the same problem again is not news"
        );
        let a = s.on(TokenEvent::OpenFailed(TokenError::PinNeeded));
        assert_eq!(published(&a), ["pin_problem"], "a different one is");
        assert_eq!(plan(&s), (AgentState::PinNeeded, Watch::Wait));
    }

    #[test]
    fn the_signers_pin_refusal_drops_the_session_and_waits_for_a_person() {
        let mut s = TokenState::default();
        s.on(found());
        s.on(logged_in());
        let a = s.on(TokenEvent::PinRefused(PinSource::Host));
        assert_eq!(a[0], Action::CloseSession);
        assert_eq!(published(&a), ["pin_problem"]);
        assert_eq!(plan(&s), (AgentState::PinRejected, Watch::Wait));
        assert!(s.present(), "the token is still there");
        // A later login clears the refusal.
        s.on(logged_in());
        assert_eq!(s.last_error(), None);
        assert_eq!(plan(&s), (AgentState::Ready, Watch::Check));
    }

    #[test]
    fn closing_drops_the_session_and_keeps_what_is_known() {
        let mut s = TokenState::default();
        s.on(found());
        s.on(logged_in());
        assert_eq!(s.on(TokenEvent::SessionClosed), [Action::CloseSession]);
        assert!(!s.logged_in() && s.present());
        s.on(logged_in());
        assert_eq!(
            s.on(TokenEvent::ModuleClosed),
            [Action::CloseSession, Action::FinaliseModule]
        );
        assert!(s.present(), "a re-initialisation is not a loss");
        assert_eq!(
            plan(&s),
            (AgentState::TokenMissing, Watch::Reopen),
            "closed, not yet opened again"
        );
    }

    #[test]
    fn pin_problems_are_locked_out_of_unattended_retries() {
        let mut s = TokenState::default();
        s.on(found());
        let locked = TokenError::PinLocked {
            why: "locked",
            fix: "unlock it",
        };
        assert_eq!(
            published(&s.on(TokenEvent::OpenFailed(locked))),
            ["pin_problem"]
        );
        assert_eq!(plan(&s), (AgentState::PinLocked, Watch::Wait));
        let module = TokenError::Module {
            module: PathBuf::from("/m.so"),
            detail: "gone".into(),
        };
        assert_eq!(s.on(TokenEvent::OpenFailed(module)), []);
        assert_eq!(plan(&s), (AgentState::ModuleError, Watch::Reopen));
    }
}
