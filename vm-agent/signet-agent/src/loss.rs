//! Token loss, decided without I/O: which PKCS#11 answers mean "the token is gone"
//! (as opposed to "this signature failed" or "this input is bad"), what the agent does
//! next in each state, and how long it waits between tries.
//!
//! Tokens vanish in the field (an RDP session grabs the smart card, a driver hangs, a
//! USB hub resets) and each module says so differently: OpenSC and SafeNet answer
//! `CKR_DEVICE_REMOVED` or `CKR_TOKEN_NOT_PRESENT`, a dead session gives
//! `CKR_SESSION_HANDLE_INVALID`, and SoftHSM keeps its slot list but answers
//! `CKR_OBJECT_HANDLE_INVALID` for a key handle that was valid and `CKR_GENERAL_ERROR`
//! when it is initialised again while its store is gone. [`classify`] knows them all.

use std::time::Duration;

use cryptoki::error::RvError;
use signet_api::wire::AgentState;

/// Where a PKCS#11 call failed: some return values mean loss only in some places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `C_Initialize`.
    Initialize,
    /// Slot, token and session calls: `C_GetSlotList`, `C_GetTokenInfo`,
    /// `C_OpenSession`, `C_GetSessionInfo`.
    Token,
    /// `C_Login`.
    Login,
    /// A call on an object handle that was valid before: `C_GetAttributeValue` on the
    /// key found at login, `C_SignInit` with it.
    KnownObject,
    /// Anything else: finding objects, signing data.
    Other,
}

/// What the agent saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A call returned this value.
    Returned(Call, RvError),
    /// `C_GetSlotList(true)` answered, and no slot holds the configured token.
    TokenNotListed,
}

/// What an observation means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The token (or the module's view of it) is gone: recover by re-initialising, and
    /// report the job as retryable, never as a failed signature.
    TokenLost,
    /// The session is no longer logged in (`CKR_USER_NOT_LOGGED_IN`): log in again.
    LoggedOut,
    /// The token refused the PIN.
    PinIncorrect,
    /// The token's PIN is locked.
    PinLocked,
    /// The data given to the token is wrong: the caller's input.
    BadInput,
    /// This operation failed for a reason of its own: the signature failed.
    SigningFailed,
    /// No token matching the configuration was ever seen: a state, not a loss.
    NotFound,
}

/// Classifies one observation. `had_token` says whether the agent had found the token
/// (so a failure now is a disappearance rather than a token that was never there).
pub fn classify(obs: Observation, had_token: bool) -> Verdict {
    let (call, rv) = match obs {
        Observation::TokenNotListed if had_token => return Verdict::TokenLost,
        Observation::TokenNotListed => return Verdict::NotFound,
        Observation::Returned(call, rv) => (call, rv),
    };
    match rv {
        RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::DeviceError
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::SlotIdInvalid => Verdict::TokenLost,
        // After a removal some modules forget they were initialised.
        RvError::CryptokiNotInitialized if had_token => Verdict::TokenLost,
        // SoftHSM: the key handle found at login stops being valid when its store goes.
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid
            if call == Call::KnownObject && had_token =>
        {
            Verdict::TokenLost
        }
        // SoftHSM: re-initialising, or asking for the token, while its store is gone.
        RvError::GeneralError if had_token && matches!(call, Call::Initialize | Call::Token) => {
            Verdict::TokenLost
        }
        RvError::UserNotLoggedIn => Verdict::LoggedOut,
        RvError::PinIncorrect => Verdict::PinIncorrect,
        RvError::PinLocked => Verdict::PinLocked,
        RvError::DataInvalid
        | RvError::DataLenRange
        | RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange => Verdict::BadInput,
        _ => Verdict::SigningFailed,
    }
}

/// What the agent's watcher does in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Check the session (and the token's presence) now and then; nothing else.
    Check,
    /// Try to open the token and log in, with backoff: it is missing or was lost.
    Reopen,
    /// Check presence only: a person must act (PIN refused, locked, none given) or
    /// the configuration is wrong; logging in again by itself would spend PIN tries or
    /// fail the same way.
    Wait,
}

/// The watcher's action for a state; `retry_worth_it` is false for faults that
/// trying again cannot fix (a missing key, a wrong module path).
pub fn watch(state: AgentState, retry_worth_it: bool) -> Watch {
    match state {
        AgentState::Ready => Watch::Check,
        AgentState::TokenLost => Watch::Reopen,
        AgentState::TokenMissing | AgentState::ModuleError if retry_worth_it => Watch::Reopen,
        AgentState::TokenMissing
        | AgentState::ModuleError
        | AgentState::PinNeeded
        | AgentState::PinRejected
        | AgentState::PinLocked => Watch::Wait,
    }
}

/// Exponential backoff between recovery tries: `min`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest wait (the token is back, or a new fault begins).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Call::*;
    use Observation::*;

    #[test]
    fn removal_answers_are_token_loss_wherever_they_come_from() {
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::DeviceError,
            RvError::SessionClosed,
        ] {
            for call in [Token, Login, KnownObject, Other] {
                assert_eq!(
                    classify(Returned(call, rv), true),
                    Verdict::TokenLost,
                    "{rv:?} at {call:?}"
                );
            }
        }
        assert_eq!(
            classify(Returned(Token, RvError::TokenNotPresent), false),
            Verdict::TokenLost,
            "even a token seen for the first time can vanish"
        );
    }

    #[test]
    fn answers_that_mean_loss_only_after_the_token_was_there() {
        let not_init = Returned(Token, RvError::CryptokiNotInitialized);
        assert_eq!(classify(not_init, true), Verdict::TokenLost);
        assert_eq!(classify(not_init, false), Verdict::SigningFailed);

        // SoftHSM with its store moved away.
        let stale_key = Returned(KnownObject, RvError::ObjectHandleInvalid);
        assert_eq!(classify(stale_key, true), Verdict::TokenLost);
        assert_eq!(
            classify(Returned(Other, RvError::ObjectHandleInvalid), true),
            Verdict::SigningFailed,
            "a handle that was never known to be valid is not evidence of loss"
        );
        let reinit = Returned(Initialize, RvError::GeneralError);
        assert_eq!(classify(reinit, true), Verdict::TokenLost);
        assert_eq!(
            classify(reinit, false),
            Verdict::SigningFailed,
            "a module that fails at first start is a module fault"
        );
        assert_eq!(
            classify(Returned(Token, RvError::GeneralError), true),
            Verdict::TokenLost
        );
        assert_eq!(
            classify(Returned(Other, RvError::GeneralError), true),
            Verdict::SigningFailed
        );
    }

    #[test]
    fn an_empty_slot_is_loss_once_the_token_was_seen() {
        assert_eq!(classify(TokenNotListed, true), Verdict::TokenLost);
        assert_eq!(classify(TokenNotListed, false), Verdict::NotFound);
    }

    #[test]
    fn loss_is_distinct_from_failed_signatures_bad_input_and_pins() {
        assert_eq!(
            classify(Returned(Other, RvError::DataLenRange), true),
            Verdict::BadInput
        );
        assert_eq!(
            classify(Returned(Other, RvError::DataInvalid), true),
            Verdict::BadInput
        );
        assert_eq!(
            classify(Returned(Other, RvError::MechanismInvalid), true),
            Verdict::SigningFailed
        );
        assert_eq!(
            classify(Returned(Other, RvError::KeyFunctionNotPermitted), true),
            Verdict::SigningFailed
        );
        assert_eq!(
            classify(Returned(Login, RvError::PinIncorrect), true),
            Verdict::PinIncorrect
        );
        assert_eq!(
            classify(Returned(Login, RvError::PinLocked), true),
            Verdict::PinLocked
        );
        assert_eq!(
            classify(Returned(Other, RvError::UserNotLoggedIn), true),
            Verdict::LoggedOut
        );
    }

    #[test]
    fn the_watcher_reopens_only_what_retrying_can_fix() {
        assert_eq!(watch(AgentState::Ready, true), Watch::Check);
        assert_eq!(watch(AgentState::TokenLost, false), Watch::Reopen);
        assert_eq!(watch(AgentState::TokenMissing, true), Watch::Reopen);
        assert_eq!(
            watch(AgentState::TokenMissing, false),
            Watch::Wait,
            "a token without the configured key stays as it is until someone acts"
        );
        assert_eq!(watch(AgentState::ModuleError, true), Watch::Reopen);
        for s in [
            AgentState::PinNeeded,
            AgentState::PinRejected,
            AgentState::PinLocked,
        ] {
            assert_eq!(watch(s, true), Watch::Wait, "{s:?}: never spend PIN tries");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let got: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(
            got,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }
}
