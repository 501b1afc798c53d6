//! `[alerts]` in `signetd.toml`: when an operator is told, and where.
//!
//! ```toml
//! [alerts]
//! pve = "auto"                    # PVE's notification system when PVE::Notify is installed
//! sendmail = "/usr/sbin/sendmail" # and/or a mail to these
//! mail_to = ["root"]
//! webhook = "https://alerts.example/hook"  # and/or a JSON POST
//! webhook_token_file = "/etc/signet/webhook.token"
//! token_lost_seconds = 120
//! agent_unreachable_seconds = 120
//! hold_down_seconds = 600
//! spool_percent = 90
//! ```
//!
//! A reload puts all of it in force at once.

use std::path::PathBuf;

use serde::Deserialize;

use crate::core::alerts::Rules;

/// Where the helper that hands an alert to PVE's notification system is installed.
pub const DEFAULT_PVE_HELPER: &str = "/usr/lib/signet/signet-notify";
/// The Perl module PVE >= 8.1 ships its notification system's entry in.
pub const PVE_NOTIFY_MODULE: &str = "/usr/share/perl5/PVE/Notify.pm";

/// Whether `a` is one plain mail address: no line end, space or list separator that
/// would add a header or a recipient.
pub fn mail_address_ok(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 254
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>,;\"()".contains(c))
}

/// Whether alerts go through PVE's notification system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PveMode {
    /// When `PVE::Notify` is installed (PVE >= 8.1).
    #[default]
    Auto,
    /// Always (a missing `PVE::Notify` is a failed delivery, logged).
    On,
    /// Never.
    Off,
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Alerts are decided and delivered (on by default); off, they are only logged.
    pub enabled: bool,
    /// PVE's notification system: `auto` (default), `on` or `off`.
    pub pve: PveMode,
    /// The helper that hands an alert to `PVE::Notify`.
    pub pve_helper: PathBuf,
    /// A sendmail-compatible program (`sendmail -t`, the message on its stdin).
    pub sendmail: Option<PathBuf>,
    /// Who the mail goes to (with `sendmail`).
    pub mail_to: Vec<String>,
    /// The mail's sender (default: sendmail's own).
    pub mail_from: Option<String>,
    /// An `http://` or `https://` URL a JSON notice is POSTed to.
    pub webhook: Option<String>,
    /// A file (root's, mode 0600) holding a bearer token sent with the webhook.
    pub webhook_token_file: Option<PathBuf>,
    /// How long the token may be lost before it is an alert.
    pub token_lost_seconds: u64,
    /// How long the agent may be unreachable before it is an alert.
    pub agent_unreachable_seconds: u64,
    /// How long a condition must stay clear before it is resolved; coming back within
    /// it continues the same incident.
    pub hold_down_seconds: u64,
    /// How full the spool may get (percent of `queue.spool_quota_mb`) before it is an
    /// alert.
    pub spool_percent: u8,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            pve: PveMode::Auto,
            pve_helper: DEFAULT_PVE_HELPER.into(),
            sendmail: None,
            mail_to: Vec::new(),
            mail_from: None,
            webhook: None,
            webhook_token_file: None,
            token_lost_seconds: 120,
            agent_unreachable_seconds: 120,
            hold_down_seconds: 600,
            spool_percent: 90,
        }
    }
}

/// A webhook's URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path and query, from its `/`.
    pub path: String,
}

impl WebhookUrl {
    /// Reads `http://HOST[:PORT][/PATH]` or `https://...`.
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let fix = "write http://HOST[:PORT]/PATH or https://HOST[:PORT]/PATH, e.g. webhook = \"https://alerts.example/signet\"";
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} is not an http or https URL: {fix}"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err("the URL holds credentials, which would be shown wherever the configuration is: put a bearer token in webhook_token_file instead".to_owned());
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{url:?} holds spaces or control characters: {fix}"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("{p:?} is not a port: {fix}"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} names no host: {fix}"));
        }
        Ok(WebhookUrl {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// Checks the webhook's token file without reading it: a regular file owned by the
/// daemon's user and open to nobody else; the error names the fix.
pub fn check_token_file(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let fix = format!("write the webhook's token into {shown} as root: (umask 077; cat > {shown})");
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("alerts.webhook_token_file {shown}: {e}; {fix}"))?;
    if !meta.is_file() {
        return Err(format!(
            "alerts.webhook_token_file {shown} is not a regular file; {fix}"
        ));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "alerts.webhook_token_file {shown} is open to others (mode {:o}, owner uid {}); make it root's and 0600: chown root: {shown}; chmod 0600 {shown}",
            meta.mode() & 0o7777,
            meta.uid()
        ));
    }
    Ok(())
}

impl AlertsConfig {
    /// The rules of [`crate::core::alerts`] this section makes.
    pub fn rules(&self) -> Rules {
        Rules {
            token_lost_ms: self.token_lost_seconds.saturating_mul(1000),
            agent_unreachable_ms: self.agent_unreachable_seconds.saturating_mul(1000),
            hold_down_ms: self.hold_down_seconds.saturating_mul(1000),
        }
    }

    /// The webhook's URL, when one is set (checked by [`AlertsConfig::check`]).
    pub fn webhook_url(&self) -> Option<WebhookUrl> {
        self.webhook
            .as_deref()
            .and_then(|u| WebhookUrl::parse(u).ok())
    }

    /// What is wrong with the section: the key (under `alerts.`) and the fix.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !self.pve_helper.is_absolute() {
            return Err((
                "pve_helper",
                format!("give an absolute path, e.g. pve_helper = \"{DEFAULT_PVE_HELPER}\""),
            ));
        }
        if let Some(s) = &self.sendmail {
            if !s.is_absolute() {
                return Err((
                    "sendmail",
                    "give the program's absolute path, e.g. sendmail = \"/usr/sbin/sendmail\""
                        .to_owned(),
                ));
            }
            if self.mail_to.is_empty() {
                return Err((
                    "mail_to",
                    "say who the mail goes to, e.g. mail_to = [\"root\"] (sendmail is set)"
                        .to_owned(),
                ));
            }
        } else if !self.mail_to.is_empty() {
            return Err((
                "sendmail",
                "mail_to is set, so name the program that sends the mail, e.g. sendmail = \"/usr/sbin/sendmail\"".to_owned(),
            ));
        }
        let address_ok = mail_address_ok;
        if let Some(a) = self.mail_to.iter().find(|a| !address_ok(a)) {
            return Err((
                "mail_to",
                format!("{a:?} is not a mail address: write one address per entry, e.g. \"root\" or \"ops@example.org\""),
            ));
        }
        if let Some(a) = self.mail_from.as_deref().filter(|a| !address_ok(a)) {
            return Err((
                "mail_from",
                format!("{a:?} is not a mail address, e.g. \"signet@pve1.example.org\""),
            ));
        }
        if let Some(url) = &self.webhook {
            WebhookUrl::parse(url).map_err(|m| ("webhook", m))?;
        }
        if let Some(p) = &self.webhook_token_file {
            if self.webhook.is_none() {
                return Err((
                    "webhook_token_file",
                    "the token is sent with the webhook: set webhook = \"https://...\" too, or remove the key".to_owned(),
                ));
            }
            if !p.is_absolute() {
                return Err((
                    "webhook_token_file",
                    "give an absolute path, e.g. webhook_token_file = \"/etc/signet/webhook.token\" (mode 0600)".to_owned(),
                ));
            }
        }
        if !(1..=100).contains(&self.spool_percent) {
            return Err((
                "spool_percent",
                "give a percentage of the spool quota from 1 to 100, e.g. spool_percent = 90"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertsConfig, String> {
        let cfg: AlertsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(cfg)
    }

    #[test]
    fn alerts_defaults_and_full_section() {
        let d = parse("").unwrap();
        assert_eq!(d, AlertsConfig::default());
        assert!(d.enabled);
        assert_eq!(d.pve, PveMode::Auto);
        assert_eq!(d.rules().hold_down_ms, 600_000);
        let c = parse(
            r#"
            pve = "off"
            sendmail = "/usr/sbin/sendmail"
            mail_to = ["root", "ops@example.org"]
            mail_from = "signet@pve1"
            webhook = "https://alerts.example:8443/hook?x=1"
            webhook_token_file = "/etc/signet/webhook.token"
            token_lost_seconds = 0
            agent_unreachable_seconds = 5
            hold_down_seconds = 30
            spool_percent = 80
            "#,
        )
        .unwrap();
        assert_eq!(c.pve, PveMode::Off);
        assert_eq!(
            c.webhook_url().unwrap(),
            WebhookUrl {
                tls: true,
                host: "alerts.example".into(),
                port: 8443,
                path: "/hook?x=1".into()
            }
        );
        assert_eq!(
            c.rules(),
            Rules {
                token_lost_ms: 0,
                agent_unreachable_ms: 5_000,
                hold_down_ms: 30_000
            }
        );
    }

    #[test]
    fn alerts_webhook_urls() {
        let u = WebhookUrl::parse("http://127.0.0.1:9/a").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9, "/a")
        );
        let u = WebhookUrl::parse("https://h").unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, "/"));
        let u = WebhookUrl::parse("http://[::1]:8080/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        for bad in [
            "ftp://h/",
            "h/x",
            "http://:80/",
            "http://h:port/",
            "http://h/a b",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
        let creds = WebhookUrl::parse("https://user:pw@h/").unwrap_err();
        assert!(creds.contains("webhook_token_file"), "{creds}");
    }

    #[test]
    fn alerts_errors_name_the_key_and_fix() {
        for (text, key, fix) in [
            ("pve = \"maybe\"", "pve", "auto"),
            (
                "sendmail = \"sendmail\"\nmail_to = [\"root\"]",
                "sendmail",
                "/usr/sbin/sendmail",
            ),
            (
                "sendmail = \"/usr/sbin/sendmail\"",
                "mail_to",
                "mail_to = [\"root\"]",
            ),
            ("mail_to = [\"root\"]", "sendmail", "sendmail = "),
            (
                "sendmail = \"/s\"\nmail_to = [\"a@b\\nBcc: x@y\"]",
                "mail_to",
                "one address",
            ),
            ("webhook = \"gopher://x\"", "webhook", "https://"),
            (
                "webhook_token_file = \"/t\"",
                "webhook_token_file",
                "webhook = ",
            ),
            (
                "webhook = \"http://h/\"\nwebhook_token_file = \"t\"",
                "webhook_token_file",
                "absolute",
            ),
            ("spool_percent = 0", "spool_percent", "1 to 100"),
            ("pve_helper = \"signet-notify\"", "pve_helper", "absolute"),
            ("colour = \"red\"", "colour", ""),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key) && e.contains(fix), "{text}: {e}");
        }
    }
}
