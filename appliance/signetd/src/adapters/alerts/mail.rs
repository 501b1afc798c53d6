//! A mail through a sendmail-compatible program: `sendmail -t -oi`, the message on its
//! stdin, the recipients in its `To:` header.

use std::path::Path;

use super::{run_with_stdin, DeliveryError, Message};

/// The mail for `msg` to `to` (from `from`, else sendmail's default sender).
pub fn compose(msg: &Message, to: &[String], from: Option<&str>) -> String {
    // Header values carry no line ends (no header can be smuggled in); the addresses
    // were checked by the configuration.
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    };
    let mut out = String::new();
    if let Some(f) = from {
        out.push_str(&format!("From: {}\n", clean(f)));
    }
    out.push_str(&format!("To: {}\n", clean(&to.join(", "))));
    out.push_str(&format!("Subject: {}\n", clean(&msg.summary())));
    out.push_str("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\nAuto-Submitted: auto-generated\n");
    out.push_str(&format!("X-Signet-Alert: {}\n", clean(&msg.kind)));
    out.push_str(&format!("X-Signet-State: {}\n", clean(&msg.state)));
    out.push_str(&format!("X-Signet-Severity: {}\n\n", clean(&msg.severity)));
    let head = match msg.state.as_str() {
        "resolved" => "Resolved",
        _ => "Alert",
    };
    out.push_str(&format!("{head}: {}\n\n", msg.title));
    out.push_str(&format!(
        "Host:  {}\nSince: {}\nNow:   {}\n",
        msg.hostname, msg.since, msg.at
    ));
    if !msg.subject.is_empty() {
        out.push_str(&format!("About: {}\n", msg.subject));
    }
    out.push_str(&format!(
        "\n{}\n\nsignetctl status shows the appliance's state; signetctl doctor checks the host.\n",
        msg.detail
    ));
    out
}

/// Sends `msg` by `sendmail`.
pub async fn deliver(
    sendmail: &Path,
    to: &[String],
    from: Option<&str>,
    msg: &Message,
) -> Result<(), DeliveryError> {
    run_with_stdin(sendmail, &["-t", "-oi"], compose(msg, to, from).as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_mail_headers_cannot_be_smuggled() {
        let mut m = crate::adapters::alerts::sample();
        m.hostname = "pve1\nBcc: evil@example".into();
        let text = compose(
            &m,
            &["root".into(), "ops@example.org".into()],
            Some("signet@pve1"),
        );
        let (head, body) = text.split_once("\n\n").unwrap();
        assert!(head.starts_with("From: signet@pve1\nTo: root, ops@example.org\nSubject: Signet on pve1 Bcc: evil@example: the signing token is lost\n"), "{head}");
        assert!(!head.lines().any(|l| l.starts_with("Bcc:")), "{head}");
        assert!(head.contains("X-Signet-Alert: token-lost"));
        assert!(
            body.contains("CKR_DEVICE_REMOVED; plug it in again"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn alerts_mail_goes_to_sendmail_stdin() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mail.txt");
        let fake = dir.path().join("sendmail");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" > '{0}.args'\ncat >> '{0}'\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = crate::adapters::alerts::sample();
        deliver(&fake, &["root".into()], None, &m).await.unwrap();
        let mail = std::fs::read_to_string(&out).unwrap();
        assert!(
            mail.starts_with("To: root\nSubject: Signet on pve1: the signing token is lost\n"),
            "{mail}"
        );
        assert_eq!(
            std::fs::read_to_string(format!("{}.args", out.display())).unwrap(),
            "-t -oi\n"
        );
        // A sendmail that fails says so, with its words.
        std::fs::write(&fake, "#!/bin/sh\necho 'no relay' >&2\nexit 75\n").unwrap();
        let e = deliver(&fake, &["root".into()], None, &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no relay") && e.contains("75"), "{e}");
    }
}
