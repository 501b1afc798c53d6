//! Known PKCS#11 modules: where each token vendor's middleware installs its module on
//! Debian-style Linux (x86_64) and on Windows, and which tokens it serves.
//!
//! Pure data and lookups: [`candidates`] takes an `exists` predicate, so the caller
//! decides what "present" means (the real file system in `signet-agent doctor`, a fake
//! in tests). Used to suggest a `token.module` when the configured one is missing or
//! does not load, and to name the middleware behind a configured module.

use std::path::{Path, PathBuf};

/// The platforms the table knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Debian and Ubuntu on x86_64 (multiarch paths), plus the paths vendor
    /// installers use there.
    LinuxX86_64,
    Windows,
}

impl Platform {
    /// The platform this binary runs on, when the table covers it.
    pub fn current() -> Option<Platform> {
        if cfg!(windows) {
            Some(Platform::Windows)
        } else if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            Some(Platform::LinuxX86_64)
        } else {
            None
        }
    }
}

/// One PKCS#11 module and where it is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModule {
    /// The middleware that ships the module.
    pub middleware: &'static str,
    /// The tokens it serves.
    pub tokens: &'static str,
    /// Install paths on Linux x86_64, most common first.
    pub linux: &'static [&'static str],
    /// Install paths on Windows, most common first.
    pub windows: &'static [&'static str],
}

impl KnownModule {
    /// The install paths on `platform`.
    pub fn paths(&self, platform: Platform) -> &'static [&'static str] {
        match platform {
            Platform::LinuxX86_64 => self.linux,
            Platform::Windows => self.windows,
        }
    }
}

/// Every module the table knows, in the order suggestions are made (hardware tokens
/// first, the software token last).
pub const KNOWN: &[KnownModule] = &[
    KnownModule {
        middleware: "SafeNet Authentication Client",
        tokens: "SafeNet/Thales eToken 5110, 5110+, 5300 (the usual EV/OV code-signing tokens)",
        linux: &[
            "/usr/lib/libeTPkcs11.so",
            "/usr/lib64/libeTPkcs11.so",
            "/usr/lib/x86_64-linux-gnu/libeTPkcs11.so",
            "/usr/lib/libeToken.so",
        ],
        windows: &[r"C:\Windows\System32\eTPKCS11.dll"],
    },
    KnownModule {
        middleware: "SafeNet Authentication Client (IDPrime)",
        tokens: "Thales/Gemalto IDPrime cards and tokens",
        linux: &[
            "/usr/lib/libIDPrimePKCS11.so",
            "/usr/lib64/libIDPrimePKCS11.so",
        ],
        windows: &[r"C:\Windows\System32\IDPrimePKCS11.dll"],
    },
    KnownModule {
        middleware: "Yubico PIV Tool (ykcs11)",
        tokens: "YubiKey 5 series (PIV applet)",
        linux: &[
            "/usr/lib/x86_64-linux-gnu/libykcs11.so",
            "/usr/lib/x86_64-linux-gnu/libykcs11.so.2",
            "/usr/local/lib/libykcs11.so",
        ],
        windows: &[r"C:\Program Files\Yubico\Yubico PIV Tool\bin\libykcs11.dll"],
    },
    KnownModule {
        middleware: "proCertum SmartSign",
        tokens: "Certum cryptographic cards and tokens",
        linux: &["/opt/proCertumSmartSign/libcryptoCertum3PKCS.so"],
        windows: &[
            r"C:\Windows\System32\cryptoCertum3PKCS.dll",
            r"C:\Program Files\Certum\SimplySign Desktop\proCertum SmartSign\cryptoCertum3PKCS.dll",
        ],
    },
    KnownModule {
        middleware: "Feitian ePass2003 middleware",
        tokens: "Feitian ePass2003 (OpenSC serves it too)",
        linux: &["/usr/lib/libcastle.so.1.0.0", "/usr/lib/libcastle.so"],
        windows: &[r"C:\Windows\System32\eps2003csp11.dll"],
    },
    KnownModule {
        middleware: "OpenSC",
        tokens: "most PIV and PKCS#15 cards: YubiKey PIV, Nitrokey, SmartCard-HSM, ePass2003, CAC",
        linux: &[
            "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
            "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so",
            "/usr/lib64/opensc-pkcs11.so",
        ],
        windows: &[r"C:\Program Files\OpenSC Project\OpenSC\pkcs11\opensc-pkcs11.dll"],
    },
    KnownModule {
        middleware: "SoftHSM2",
        tokens: "SoftHSM software tokens (tests and demos; not a hardware token)",
        linux: &[
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        ],
        windows: &[r"C:\SoftHSM2\lib\softhsm2-x64.dll"],
    },
];

/// A known module found at one of its install paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub module: &'static KnownModule,
    pub path: PathBuf,
}

/// The known modules present on `platform`, in table order, each at the first of its
/// paths for which `exists` holds.
pub fn candidates(platform: Platform, exists: impl Fn(&Path) -> bool) -> Vec<Candidate> {
    KNOWN
        .iter()
        .filter_map(|m| {
            m.paths(platform)
                .iter()
                .map(Path::new)
                .find(|p| exists(p))
                .map(|p| Candidate {
                    module: m,
                    path: p.to_owned(),
                })
        })
        .collect()
}

/// The known module a configured path names, by its file name (case-insensitive, so
/// Windows spellings match), wherever it is installed.
pub fn identify(path: &Path) -> Option<&'static KnownModule> {
    let name = file_name(path.to_str()?)?.to_ascii_lowercase();
    KNOWN.iter().find(|m| {
        m.linux
            .iter()
            .chain(m.windows.iter())
            .filter_map(|p| file_name(p))
            .any(|n| n.eq_ignore_ascii_case(&name))
    })
}

/// The last component of a Linux or Windows path, whatever platform this runs on.
fn file_name(path: &str) -> Option<&str> {
    path.rsplit(['/', '\\']).next().filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_the_present_ones_in_table_order_at_their_first_present_path() {
        let present = [
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so",
            "/usr/lib64/libeTPkcs11.so",
            "/usr/lib/x86_64-linux-gnu/libeTPkcs11.so",
        ];
        let found = candidates(Platform::LinuxX86_64, |p| {
            present.iter().any(|q| Path::new(q) == p)
        });
        let got: Vec<(&str, &Path)> = found
            .iter()
            .map(|c| (c.module.middleware, c.path.as_path()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "SafeNet Authentication Client",
                    Path::new("/usr/lib64/libeTPkcs11.so")
                ),
                (
                    "OpenSC",
                    Path::new("/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so")
                ),
                ("SoftHSM2", Path::new("/usr/lib/softhsm/libsofthsm2.so")),
            ]
        );
        assert!(candidates(Platform::LinuxX86_64, |_| false).is_empty());
    }

    #[test]
    fn windows_paths_are_looked_up_on_windows_only() {
        let found = candidates(Platform::Windows, |p| {
            p == Path::new(r"C:\Windows\System32\eTPKCS11.dll")
                || p == Path::new("/usr/lib/softhsm/libsofthsm2.so")
        });
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].module.middleware, "SafeNet Authentication Client");
        assert_eq!(
            found[0].path,
            PathBuf::from(r"C:\Windows\System32\eTPKCS11.dll")
        );
    }

    #[test]
    fn every_module_has_paths_on_both_platforms_and_names_its_tokens() {
        for m in KNOWN {
            assert!(!m.linux.is_empty() && !m.windows.is_empty(), "{m:?}");
            assert!(!m.tokens.is_empty(), "{m:?}");
            for p in m.linux {
                assert!(p.starts_with('/'), "{p}");
            }
            for p in m.windows {
                assert!(p.starts_with(r"C:\"), "{p}");
            }
        }
    }

    #[test]
    fn a_configured_path_is_identified_by_its_file_name() {
        let id = |p: &str| identify(Path::new(p)).map(|m| m.middleware);
        assert_eq!(
            id("/opt/custom/libeTPkcs11.so"),
            Some("SafeNet Authentication Client")
        );
        assert_eq!(
            id(r"C:\WINDOWS\system32\ETPKCS11.DLL"),
            Some("SafeNet Authentication Client")
        );
        assert_eq!(
            id("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
            Some("SoftHSM2")
        );
        assert_eq!(
            id("/usr/lib/x86_64-linux-gnu/libykcs11.so.2"),
            Some("Yubico PIV Tool (ykcs11)")
        );
        assert_eq!(id("/usr/lib/libunknown-pkcs11.so"), None);
        assert_eq!(id("/"), None);
    }
}
