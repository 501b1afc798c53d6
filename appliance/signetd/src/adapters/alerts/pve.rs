//! PVE's notification system: the alert goes to `PVE::Notify` (Proxmox VE >= 8.1)
//! through the helper the package ships (`/usr/lib/signet/signet-notify`, Perl), the
//! message as JSON on its stdin, so the admin's matchers and targets apply.

use std::path::Path;

use super::{run_with_stdin, DeliveryError, Message};

/// Whether PVE's notification system is installed here (`PVE::Notify`, PVE >= 8.1).
pub fn available(module: &Path) -> bool {
    module.is_file()
}

/// Hands `msg` to `PVE::Notify` through `helper`.
pub async fn deliver(helper: &Path, msg: &Message) -> Result<(), DeliveryError> {
    let json = serde_json::to_vec(msg).map_err(|e| DeliveryError::Setup(e.to_string()))?;
    run_with_stdin(helper, &[], &json).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The shipped helper, run by perl with the stand-in `PVE::Notify` of
    /// test-support first on its path, recording into `log`.
    fn helper(dir: &Path, log: &Path, templates: &Path) -> PathBuf {
        let wrapper = dir.join("signet-notify");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport PERL5LIB='{}'\nexport SIGNET_TEST_NOTIFY_LOG='{}'\nexport SIGNET_TEST_TEMPLATES='{}'\nexec perl '{}' \"$@\"\n",
                repo().join("test-support/perl").display(),
                log.display(),
                templates.display(),
                repo().join("packaging/alerts/signet-notify").display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        wrapper
    }

    /// The package's templates where proxmox-notify looks them up.
    fn templates(dir: &Path) -> PathBuf {
        let t = dir.join("templates");
        std::fs::create_dir_all(t.join("default")).unwrap();
        for f in std::fs::read_dir(repo().join("packaging/alerts/templates")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, t.join("default").join(f.file_name().unwrap())).unwrap();
        }
        t
    }

    #[tokio::test]
    async fn alerts_reach_pve_notify_through_the_shipped_helper() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        let h = helper(dir.path(), &log, &templates(dir.path()));
        let mut msg = crate::adapters::alerts::sample();
        deliver(&h, &msg).await.unwrap();
        msg.state = "resolved".into();
        msg.severity = "info".into();
        deliver(&h, &msg).await.unwrap();

        let calls: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let c = &calls[0];
        assert_eq!(c["severity"], "warning");
        assert_eq!(c["template"], "signet-alert");
        assert_eq!(c["fields"]["type"], "signet");
        assert_eq!(c["fields"]["hostname"], "stand-in-node");
        assert_eq!(c["fields"]["signet-alert"], "token-lost");
        assert_eq!(c["fields"]["signet-state"], "raised");
        // PVE's common data and the alert's own.
        assert_eq!(c["data"]["fqdn"], "stand-in-node.stand-in.example");
        assert_eq!(c["data"]["signet-title"], "the signing token is lost");
        assert_eq!(c["data"]["signet-detail"], msg.detail);
        assert_eq!(c["data"]["signet-since"], "2026-12-02T22:00:00Z");
        assert_eq!(c["data"]["signet-resolved"], 0);
        assert_eq!(calls[1]["severity"], "info");
        assert_eq!(calls[1]["fields"]["signet-state"], "resolved");
        assert_eq!(calls[1]["data"]["signet-resolved"], 1);

        // Every variable the templates use is one the helper gives.
        let given: Vec<String> = c["data"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .chain(["hostname".to_owned()])
            .collect();
        for f in std::fs::read_dir(repo().join("packaging/alerts/templates")).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            for var in text
                .split("{{")
                .skip(1)
                .filter_map(|s| s.split("}}").next())
            {
                let name = var
                    .trim_start_matches(['#', '/'])
                    .trim_start_matches("if ")
                    .trim();
                if name == "else" || name == "if" {
                    continue;
                }
                assert!(
                    given.iter().any(|g| g == name),
                    "template variable {name:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_refused_alert_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        // No templates installed: the stand-in refuses, as proxmox-notify would.
        let h = helper(dir.path(), &log, &dir.path().join("none"));
        let e = deliver(&h, &crate::adapters::alerts::sample())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no template") && e.contains("signet-alert-subject.txt.hbs"),
            "{e}"
        );
        // A severity PVE does not know never reaches it.
        let h = helper(dir.path(), &log, &templates(dir.path()));
        let mut bad = crate::adapters::alerts::sample();
        bad.severity = "panic".into();
        let e = deliver(&h, &bad).await.unwrap_err().to_string();
        assert!(e.contains("severity 'panic'"), "{e}");
        assert!(!log.exists(), "nothing was recorded");
        // A helper that is not there.
        let e = deliver(Path::new("/nonexistent/signet-notify"), &bad)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not be started") && e.contains("[alerts]"),
            "{e}"
        );
        assert!(!available(Path::new("/nonexistent/PVE/Notify.pm")));
    }
}
