//! Remote Desktop on a Windows signing VM: is a Remote Desktop session connected, and
//! is smart-card redirection turned off by policy (`fEnableSmartCard` = 0)? With
//! redirection allowed, a Remote Desktop connection hides the VM's own token from the
//! agent (the field's "token vanishes when someone RDPs in").
//!
//! The facts come from two commands Windows has, `query session` and `reg query`;
//! their outputs are parsed here (pure, tested on any platform against recorded
//! outputs). Only [`probe`] runs them, and only on Windows; elsewhere it answers
//! `None`. What the facts mean is [`WindowsSessions::problem`], shared with the host.

use signet_api::wire::{WindowsSessions, TERMINAL_SERVICES_POLICY_KEY};

/// The policy value that turns smart-card redirection off when 0.
pub const SMART_CARD_VALUE: &str = "fEnableSmartCard";

/// One line of `query session`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `console`, `rdp-tcp#3`, `services`; empty for a disconnected session.
    pub name: String,
    pub user: String,
    pub id: u32,
    /// `Active`, `Conn`, `Disc`, `Listen`, ...
    pub state: String,
}

impl Session {
    /// A Remote Desktop session someone is connected to now.
    pub fn is_remote_desktop(&self) -> bool {
        self.name.to_ascii_lowercase().starts_with("rdp-tcp#") && self.state == "Active"
    }
}

/// Parses the output of `query session` (`qwinsta`): columns are placed under the
/// header's `SESSIONNAME`, `USERNAME`, `ID`, `STATE`; the current session is marked
/// with `>` in the first column. Answers `None` when there is no header.
pub fn parse_query_session(output: &str) -> Option<Vec<Session>> {
    let mut lines = output.lines();
    let header = lines.find(|l| l.contains("SESSIONNAME"))?;
    let user_col = header.find("USERNAME")?;
    let mut sessions = Vec::new();
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let split = line
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| i >= user_col)
            .unwrap_or(line.len());
        let name = line[..split]
            .trim_start_matches(['>', ' '])
            .trim()
            .to_owned();
        let mut rest = line[split..].split_whitespace().peekable();
        let user = match rest.peek() {
            Some(t) if t.parse::<u32>().is_err() => rest.next().unwrap_or_default().to_owned(),
            _ => String::new(),
        };
        let Some(id) = rest.next().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let state = rest.next().unwrap_or_default().to_owned();
        sessions.push(Session {
            name,
            user,
            id,
            state,
        });
    }
    Some(sessions)
}

/// What `reg query KEY /v VALUE` told about a `REG_DWORD` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegValue {
    Dword(u32),
    /// The key or the value does not exist (the policy is not set).
    Absent,
}

/// Parses `reg query`'s output (or its error text) for `value`.
pub fn parse_reg_dword(output: &str, value: &str) -> Option<RegValue> {
    for line in output.lines() {
        let mut t = line.split_whitespace();
        if t.next() == Some(value) && t.next() == Some("REG_DWORD") {
            let n = t.next()?;
            let n = n.strip_prefix("0x").unwrap_or(n);
            return u32::from_str_radix(n, 16).ok().map(RegValue::Dword);
        }
    }
    output
        .contains("unable to find the specified registry key or value")
        .then_some(RegValue::Absent)
}

/// The facts from both outputs (either may be missing: a command that failed).
pub fn facts(query_session: Option<&str>, reg_query: Option<&str>) -> WindowsSessions {
    let remote_desktop_active = query_session
        .and_then(parse_query_session)
        .is_some_and(|s| s.iter().any(Session::is_remote_desktop));
    let smart_card_redirection_disabled = reg_query
        .and_then(|o| parse_reg_dword(o, SMART_CARD_VALUE))
        .map(|v| v == RegValue::Dword(0));
    WindowsSessions {
        remote_desktop_active,
        smart_card_redirection_disabled,
    }
}

/// The `reg query` command line for the policy value.
pub fn reg_query_args() -> [&'static str; 4] {
    [
        "query",
        TERMINAL_SERVICES_POLICY_KEY,
        "/v",
        SMART_CARD_VALUE,
    ]
}

/// Runs both commands on Windows; `None` on other systems.
#[cfg(windows)]
pub fn probe() -> Option<WindowsSessions> {
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                text
            })
    };
    let sessions = run("query", &["session"]);
    let policy = run("reg", &reg_query_args());
    Some(facts(sessions.as_deref(), policy.as_deref()))
}

/// Runs both commands on Windows; `None` on other systems.
#[cfg(not(windows))]
pub fn probe() -> Option<WindowsSessions> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `query session` on a Windows Server 2022 signing VM, its console in use.
    const CONSOLE: &str = " SESSIONNAME       USERNAME                 ID  STATE   TYPE        DEVICE \n services                                    0  Disc                        \n>console           builder                   1  Active                      \n rdp-tcp                                 65536  Listen                      \n";

    /// The same VM while someone is connected with Remote Desktop, and an older
    /// disconnected session without a name.
    const RDP: &str = " SESSIONNAME       USERNAME                 ID  STATE   TYPE        DEVICE \n services                                    0  Disc                        \n console                                     1  Conn                        \n>rdp-tcp#3         builder                   2  Active                      \n                   olduser                   3  Disc                        \n rdp-tcp                                 65536  Listen                      \n";

    const POLICY_OFF: &str = "\r\nHKEY_LOCAL_MACHINE\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services\r\n    fEnableSmartCard    REG_DWORD    0x0\r\n\r\n";
    const POLICY_ON: &str = "\r\nHKEY_LOCAL_MACHINE\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services\r\n    fEnableSmartCard    REG_DWORD    0x1\r\n\r\n";
    const POLICY_ABSENT: &str =
        "ERROR: The system was unable to find the specified registry key or value.\r\n";

    #[test]
    fn sessions_are_read_by_their_columns() {
        let s = parse_query_session(RDP).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(
            s[2],
            Session {
                name: "rdp-tcp#3".into(),
                user: "builder".into(),
                id: 2,
                state: "Active".into()
            }
        );
        assert_eq!(
            (s[3].name.as_str(), s[3].user.as_str(), s[3].id),
            ("", "olduser", 3)
        );
        assert_eq!(
            (s[4].name.as_str(), s[4].user.as_str(), s[4].id),
            ("rdp-tcp", "", 65536)
        );
        assert!(s[2].is_remote_desktop());
        assert!(!s[4].is_remote_desktop(), "the listener is nobody");
        let s = parse_query_session(CONSOLE).unwrap();
        assert!(s.iter().all(|s| !s.is_remote_desktop()), "{s:?}");
        assert_eq!(parse_query_session("No session exists for *"), None);
    }

    #[test]
    fn the_policy_value_is_read_or_known_absent() {
        assert_eq!(
            parse_reg_dword(POLICY_OFF, SMART_CARD_VALUE),
            Some(RegValue::Dword(0))
        );
        assert_eq!(
            parse_reg_dword(POLICY_ON, SMART_CARD_VALUE),
            Some(RegValue::Dword(1))
        );
        assert_eq!(
            parse_reg_dword(POLICY_ABSENT, SMART_CARD_VALUE),
            Some(RegValue::Absent)
        );
        assert_eq!(parse_reg_dword("Access is denied.", SMART_CARD_VALUE), None);
    }

    #[test]
    fn facts_tell_when_remote_desktop_takes_the_token() {
        let f = facts(Some(RDP), Some(POLICY_ABSENT));
        assert_eq!(
            f,
            WindowsSessions {
                remote_desktop_active: true,
                smart_card_redirection_disabled: Some(false)
            }
        );
        assert!(f.problem().unwrap().0.contains("hides the token"));
        let f = facts(Some(RDP), Some(POLICY_OFF));
        assert_eq!(f.problem(), None, "redirection off: the token stays");
        let f = facts(Some(CONSOLE), Some(POLICY_ON));
        assert!(!f.remote_desktop_active);
        assert!(f.problem().unwrap().0.contains("whenever someone connects"));
        let f = facts(None, None);
        assert_eq!(f.smart_card_redirection_disabled, None);
    }

    #[test]
    fn the_registry_query_names_the_policy_key() {
        assert_eq!(
            reg_query_args(),
            [
                "query",
                r"HKLM\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services",
                "/v",
                "fEnableSmartCard"
            ]
        );
    }

    #[test]
    #[cfg(not(windows))]
    fn other_systems_have_no_windows_sessions() {
        assert_eq!(probe(), None);
    }
}
