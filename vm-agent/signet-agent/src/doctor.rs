//! `signet-agent doctor` and `signet-agent tokens`: can this agent sign, and if not,
//! what to fix.
//!
//! The doctor checks, in order: the configuration loads; the PKCS#11 module exists,
//! loads and `C_Initialize` works (otherwise it suggests the known modules present,
//! from [`crate::modules`]); which tokens are present; the configured token is one of
//! them; its PIN counter flags; the PIN file (present, readable, not open to group or
//! others); osslsigncode runs and is recent enough; the signing certificate is found.
//!
//! **It never logs in**: no `C_Login`, so no PIN try is spent whatever state the token
//! is in, and the PIN file is never read — only its metadata. Everything it needs from
//! the token (token info, PIN flags, certificates) is public without login.
//!
//! Probes (`probe_*`) do the I/O and return plain facts; judges (`judge_*`) turn facts
//! into a [`Check`] and are pure and unit-tested.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::slot::Slot;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, TokenConfig};
use crate::modules::{self, Candidate, Platform};
use crate::token::{ck, pin_flags};
use signet_api::hex::upper_joined as hex;
use signet_api::wire::{osslsigncode, PinFlags};

/// The oldest osslsigncode the agent is known to work with (Debian 12's): it signs
/// whole files with a PKCS#11 module and reads the PIN from a file
/// (`-readpass /dev/stdin`).
pub const OSSLSIGNCODE_MIN: osslsigncode::Version = osslsigncode::WHOLE_FILE;
/// The first osslsigncode with `extract-data` (digest mode) and PowerShell.
pub const OSSLSIGNCODE_EXTRACT_DATA: osslsigncode::Version = osslsigncode::DIGEST;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but deserves attention.
    Warn,
    Fail,
    /// Not checked: an earlier check it depends on failed.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One check's outcome: what was found and, when it failed, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name for scripts: `config`, `module`, `tokens`, `token`, `pin_state`,
    /// `pin_file`, `osslsigncode` (`signtool` with that backend), `certificate`, and on
    /// Windows `remote_desktop`.
    pub name: &'static str,
    pub status: Status,
    pub summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, summary: impl Into<String>) -> Self {
        Check {
            name,
            status,
            summary: summary.into(),
            details: Vec::new(),
            fix: None,
        }
    }

    fn ok(name: &'static str, summary: impl Into<String>) -> Self {
        Self::new(name, Status::Ok, summary)
    }

    fn fail(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            fix: Some(fix.into()),
            ..Self::new(name, Status::Fail, summary)
        }
    }

    fn warn(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            fix: Some(fix.into()),
            ..Self::new(name, Status::Warn, summary)
        }
    }

    fn skip(name: &'static str, why: &str) -> Self {
        Self::new(name, Status::Skip, format!("not checked: {why}"))
    }

    fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    /// Ok and Warn pass; Fail and Skip do not.
    pub fn passed(&self) -> bool {
        matches!(self.status, Status::Ok | Status::Warn)
    }
}

/// What the module says about itself (`C_GetInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibraryFacts {
    pub description: String,
    pub manufacturer: String,
    pub version: String,
    pub cryptoki: String,
}

/// The PIN counter flags of a token, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PinFlagsReport {
    pub count_low: bool,
    pub final_try: bool,
    pub locked: bool,
    pub to_be_changed: bool,
}

impl From<PinFlags> for PinFlagsReport {
    fn from(f: PinFlags) -> Self {
        PinFlagsReport {
            count_low: f.count_low,
            final_try: f.final_try,
            locked: f.locked,
            to_be_changed: f.to_be_changed,
        }
    }
}

impl PinFlagsReport {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (set, name) in [
            (self.locked, "LOCKED"),
            (self.final_try, "FINAL_TRY"),
            (self.count_low, "COUNT_LOW"),
            (self.to_be_changed, "TO_BE_CHANGED"),
        ] {
            if set {
                parts.push(name);
            }
        }
        if parts.is_empty() {
            "user PIN ok".to_owned()
        } else {
            format!("user PIN {}", parts.join(", "))
        }
    }
}

/// A token in a slot, as reported without login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenFacts {
    /// For display only: Signet selects tokens by label and serial, never by slot.
    pub slot: u64,
    pub label: String,
    pub serial: String,
    pub model: String,
    pub manufacturer: String,
    pub firmware: String,
    /// False for a blank token (SoftHSM always offers one).
    pub initialized: bool,
    pub pin_flags: PinFlagsReport,
}

impl TokenFacts {
    /// One line: label, serial, model, manufacturer, firmware and the PIN flags.
    pub fn describe(&self) -> String {
        if !self.initialized {
            return format!("uninitialized token (slot {})", self.slot);
        }
        format!(
            "\"{}\" serial {}, model {}, manufacturer {}, firmware {}; {}",
            self.label,
            self.serial,
            self.model,
            self.manufacturer,
            self.firmware,
            self.pin_flags.describe()
        )
    }
}

/// A certificate object on the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertFacts {
    pub label: String,
    /// CKA_ID in hex.
    pub id: String,
    /// SHA-256 of the DER certificate, `AB:CD:…` as `openssl x509 -fingerprint` shows it.
    pub sha256: String,
}

/// A known module found on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresentModule {
    pub path: PathBuf,
    pub middleware: &'static str,
    pub tokens: &'static str,
}

impl From<&Candidate> for PresentModule {
    fn from(c: &Candidate) -> Self {
        PresentModule {
            path: c.path.clone(),
            middleware: c.module.middleware,
            tokens: c.module.tokens,
        }
    }
}

/// Everything the doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: PathBuf,
    /// Every check passed (ok or warn).
    pub ok: bool,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<LibraryFacts>,
    pub tokens: Vec<TokenFacts>,
    pub modules_present: Vec<PresentModule>,
}

impl Report {
    /// The report as text for people: one line per check, then its details and fix.
    pub fn render(&self) -> String {
        let mut out = format!(
            "signet-agent doctor: {} (no login, no PIN try spent)\n",
            self.config.display()
        );
        for c in &self.checks {
            out.push_str(&format!(
                "{:<5} {:<13} {}\n",
                c.status.label(),
                c.name,
                c.summary
            ));
            for d in &c.details {
                out.push_str(&format!("{:20}- {d}\n", ""));
            }
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:20}fix: {fix}\n", ""));
            }
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        let (failed, skipped) = (count(Status::Fail), count(Status::Skip));
        if failed + skipped == 0 {
            out.push_str("All checks passed.\n");
        } else {
            out.push_str(&format!(
                "{failed} check{} failed, {skipped} not checked.\n",
                if failed == 1 { "" } else { "s" }
            ));
        }
        out
    }
}

/// Runs every check against the configuration at `config_path`.
pub fn run(config_path: &Path) -> Report {
    let present: Vec<Candidate> = Platform::current()
        .map(|p| modules::candidates(p, Path::exists))
        .unwrap_or_default();
    let mut checks = Vec::new();
    let mut report = Report {
        config: config_path.to_owned(),
        ok: false,
        checks: Vec::new(),
        module: None,
        library: None,
        tokens: Vec::new(),
        modules_present: present.iter().map(PresentModule::from).collect(),
    };

    let cfg = match Config::load(config_path) {
        Ok(cfg) => {
            checks.push(Check::ok(
                "config",
                format!("{} loads", config_path.display()),
            ));
            Some(cfg)
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                "fix the file (packaging/agent.toml is a commented example); the checks below use what could be read",
            ));
            None
        }
    };
    let module_path = cfg
        .as_ref()
        .map(|c| c.token.module.clone())
        .or_else(|| lenient_module(config_path));
    report.module = module_path.clone();

    // The module, the tokens in it, the configured token and its PIN counter.
    let ctx = module_path.as_ref().and_then(|path| {
        let (probe, ctx) = probe_module(path);
        checks.push(judge_module(path, &probe, &present));
        if let ModuleProbe::Loaded(info) = probe {
            report.library = Some(info);
        }
        ctx
    });
    let slots = ctx.as_ref().map(probe_tokens);
    let unchecked = match (&module_path, &slots) {
        (None, _) => Some("no token.module in the configuration"),
        (Some(_), None) => Some("the module does not load"),
        (_, Some(Err(_))) => Some("the module cannot list its tokens"),
        (_, Some(Ok(_))) if cfg.is_none() => Some("the configuration does not load"),
        _ => None,
    };
    if module_path.is_none() {
        checks.push(Check::skip(
            "module",
            "no token.module in the configuration",
        ));
    }
    match &slots {
        Some(Ok(slots)) => {
            report.tokens = slots.iter().map(|(_, t)| t.clone()).collect();
            checks.push(judge_tokens(&report.tokens));
        }
        Some(Err(e)) => checks.push(Check::fail(
            "tokens",
            format!("the module cannot list its slots: {e}"),
            "check the token's middleware and its service (pcscd) are running",
        )),
        None => checks.push(Check::skip("tokens", unchecked.unwrap_or_default())),
    }
    let chosen = match (&cfg, &slots) {
        (Some(cfg), Some(Ok(slots))) => {
            let (check, index) = judge_token_match(&cfg.token, &report.tokens);
            checks.push(check);
            index.map(|i| slots[i].clone())
        }
        _ => {
            checks.push(Check::skip("token", unchecked.unwrap_or_default()));
            None
        }
    };
    checks.push(match &chosen {
        Some((_, token)) => judge_pin_state(&token.pin_flags),
        None => Check::skip("pin_state", unchecked.unwrap_or("no token matches")),
    });

    match &cfg {
        None => {
            for name in ["pin_file", "osslsigncode", "certificate"] {
                checks.push(Check::skip(name, "the configuration does not load"));
            }
        }
        Some(cfg) => {
            checks.push(match &cfg.token.pin_file {
                Some(pin_file) => judge_pin_file(pin_file, &probe_pin_file(pin_file)),
                None => Check::ok(
                    "pin_file",
                    "no PIN file: the PIN comes from the host (POST /agent/v1/login)",
                ),
            });
            checks.push(match cfg.signer.backend {
                crate::config::Backend::Osslsigncode => {
                    let program = &cfg.signer.osslsigncode;
                    judge_osslsigncode(program, &probe_osslsigncode(program))
                }
                // The native engine runs osslsigncode's token-free steps for MSI, CAB,
                // PowerShell and APPX/MSIX files, and signs the rest without it.
                crate::config::Backend::Native => {
                    let program = &cfg.signer.osslsigncode;
                    judge_osslsigncode_for_native(program, &probe_osslsigncode(program))
                }
                crate::config::Backend::Signtool => {
                    let program = &cfg.signer.signtool;
                    judge_signtool(program, &probe_signtool(program))
                }
            });
            checks.push(match (&cfg.signer.certificate, &chosen, &ctx) {
                (Some(file), _, _) => judge_file_cert(file, &probe_file_cert(file)),
                (None, Some((slot, token)), Some(ctx)) => judge_token_certs(
                    &token.label,
                    cfg.token.key_label.as_deref(),
                    &probe_token_certs(ctx, *slot),
                ),
                (None, _, _) => Check::skip("certificate", "the configured token was not found"),
            });
        }
    }
    if let Some(ctx) = ctx {
        let _ = ctx.finalize();
    }
    // Windows signing VMs only: Remote Desktop would hide the token.
    if let Some(sessions) = crate::rdp::probe() {
        checks.push(judge_remote_desktop(&sessions));
    }

    report.ok = checks.iter().all(Check::passed);
    report.checks = checks;
    report
}

/// What `signet-agent tokens` found.
#[derive(Debug, Clone, Serialize)]
pub struct TokenList {
    pub module: PathBuf,
    pub library: LibraryFacts,
    pub tokens: Vec<TokenFacts>,
}

impl TokenList {
    pub fn render(&self) -> String {
        let l = &self.library;
        let mut out = format!(
            "{}: {} {} ({}), Cryptoki {}\n",
            self.module.display(),
            l.description,
            l.version,
            l.manufacturer,
            l.cryptoki
        );
        if self.tokens.is_empty() {
            out.push_str("no token present\n");
        }
        for t in &self.tokens {
            out.push_str(&t.describe());
            out.push('\n');
        }
        out
    }
}

/// Lists the tokens of `module` without logging in. On failure, the module check
/// (with its fix) says why.
pub fn list_tokens(module: &Path) -> Result<TokenList, Check> {
    let present: Vec<Candidate> = Platform::current()
        .map(|p| modules::candidates(p, Path::exists))
        .unwrap_or_default();
    let (probe, ctx) = probe_module(module);
    let check = judge_module(module, &probe, &present);
    let (ModuleProbe::Loaded(library), Some(ctx)) = (probe, ctx) else {
        return Err(check);
    };
    let tokens = probe_tokens(&ctx);
    let _ = ctx.finalize();
    match tokens {
        Ok(slots) => Ok(TokenList {
            module: module.to_owned(),
            library,
            tokens: slots.into_iter().map(|(_, t)| t).collect(),
        }),
        Err(e) => Err(Check::fail(
            "tokens",
            format!("the module cannot list its slots: {e}"),
            "check the token's middleware and its service (pcscd) are running",
        )),
    }
}

/// `token.module` from a configuration that does not load as a whole (e.g. no label
/// yet), so the module and its tokens can still be shown.
pub fn lenient_module(config_path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config_path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let module = PathBuf::from(table.get("token")?.get("module")?.as_str()?);
    // A root-relative Windows path (`\dir\m.dll`) is not the configuration's to resolve.
    if module.is_relative() && !module.has_root() && module.components().count() > 1 {
        return Some(config_path.parent().unwrap_or(Path::new(".")).join(module));
    }
    Some(module)
}

/// How loading the module went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleProbe {
    Missing,
    LoadFailed(String),
    InitFailed(String),
    Loaded(LibraryFacts),
}

/// Loads and initializes the module; the context is returned when it works.
fn probe_module(path: &Path) -> (ModuleProbe, Option<Pkcs11>) {
    if !path.exists() {
        return (ModuleProbe::Missing, None);
    }
    let ctx = match Pkcs11::new(path) {
        Ok(ctx) => ctx,
        Err(e) => return (ModuleProbe::LoadFailed(ck(&e)), None),
    };
    if let Err(e) = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        return (ModuleProbe::InitFailed(ck(&e)), None);
    }
    match ctx.get_library_info() {
        Ok(info) => {
            let facts = LibraryFacts {
                description: info.library_description().trim_end().to_owned(),
                manufacturer: info.manufacturer_id().trim_end().to_owned(),
                version: info.library_version().to_string(),
                cryptoki: info.cryptoki_version().to_string(),
            };
            (ModuleProbe::Loaded(facts), Some(ctx))
        }
        Err(e) => {
            let _ = ctx.finalize();
            (ModuleProbe::InitFailed(ck(&e)), None)
        }
    }
}

/// Every slot with a token, and what the token says about itself.
fn probe_tokens(ctx: &Pkcs11) -> Result<Vec<(Slot, TokenFacts)>, String> {
    let mut out = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(|e| ck(&e))? {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        out.push((
            slot,
            TokenFacts {
                slot: slot.id(),
                label: info.label().trim_end().to_owned(),
                serial: info.serial_number().trim_end().to_owned(),
                model: info.model().trim_end().to_owned(),
                manufacturer: info.manufacturer_id().trim_end().to_owned(),
                firmware: info.firmware_version().to_string(),
                initialized: info.token_initialized(),
                pin_flags: pin_flags(&info).into(),
            },
        ));
    }
    Ok(out)
}

/// The certificates visible without login in a read-only session.
fn probe_token_certs(ctx: &Pkcs11, slot: Slot) -> Result<Vec<CertFacts>, String> {
    let session = ctx.open_ro_session(slot).map_err(|e| ck(&e))?;
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
        .map_err(|e| ck(&e))?;
    let mut out = Vec::new();
    for h in handles {
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::Value,
                ],
            )
            .map_err(|e| ck(&e))?;
        let mut cert = CertFacts {
            label: String::new(),
            id: String::new(),
            sha256: String::new(),
        };
        for a in attrs {
            match a {
                Attribute::Label(v) => cert.label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::Id(v) => cert.id = hex(&v, ""),
                Attribute::Value(v) => cert.sha256 = hex(&Sha256::digest(&v), ":"),
                _ => {}
            }
        }
        out.push(cert);
    }
    Ok(out)
}

/// The PIN file's metadata; its content is never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinFileProbe {
    Missing,
    NotAFile,
    Unreadable(String),
    /// `mode`: the unix mode bits; `None` where files have none (Windows).
    Present {
        mode: Option<u32>,
        len: u64,
    },
}

fn probe_pin_file(path: &Path) -> PinFileProbe {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return PinFileProbe::Missing,
        Err(e) => return PinFileProbe::Unreadable(e.to_string()),
    };
    if !meta.is_file() {
        return PinFileProbe::NotAFile;
    }
    // Opening proves it is readable; nothing is read from it.
    if let Err(e) = std::fs::File::open(path) {
        return PinFileProbe::Unreadable(e.to_string());
    }
    PinFileProbe::Present {
        mode: crate::token::file_mode(&meta),
        len: meta.len(),
    }
}

fn probe_osslsigncode(program: &Path) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Starts signtool without a command (it prints its usage): does it run at all.
fn probe_signtool(program: &Path) -> Result<(), String> {
    std::process::Command::new(program)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Judges signtool (`signer.backend = "signtool"`) from whether it runs.
pub fn judge_signtool(program: &Path, probe: &Result<(), String>) -> Check {
    match probe {
        Ok(()) => Check::ok("signtool", format!("{} runs", program.display())),
        Err(e) => Check::fail(
            "signtool",
            format!("cannot run {}: {e}", program.display()),
            "install the Windows SDK's signing tools, or set signer.signtool to signtool.exe's path",
        ),
    }
}

/// What the certificate file looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCertProbe {
    Missing,
    Unreadable(String),
    Pem,
    Der,
    NotACertificate,
}

fn probe_file_cert(path: &Path) -> FileCertProbe {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileCertProbe::Missing,
        Err(e) => FileCertProbe::Unreadable(e.to_string()),
        Ok(bytes) => cert_form(&bytes),
    }
}

/// PEM by its armour, DER by its outer SEQUENCE with a long-form length.
fn cert_form(bytes: &[u8]) -> FileCertProbe {
    if bytes
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        FileCertProbe::Pem
    } else if bytes.len() > 4 && bytes[0] == 0x30 && (0x81..=0x84).contains(&bytes[1]) {
        FileCertProbe::Der
    } else {
        FileCertProbe::NotACertificate
    }
}

/// The present known modules other than `configured`, as detail lines.
fn suggestions(configured: &Path, present: &[Candidate]) -> Vec<String> {
    present
        .iter()
        .filter(|c| c.path != configured)
        .map(|c| {
            format!(
                "present: {} ({}: {})",
                c.path.display(),
                c.module.middleware,
                c.module.tokens
            )
        })
        .collect()
}

/// Judges the module: present, loadable, initializable.
/// Remote Desktop on a Windows signing VM: a connected session with smart-card
/// redirection allowed has taken the token (fail); redirection allowed is a token lost
/// at the next connection (warn).
pub fn judge_remote_desktop(s: &signet_api::wire::WindowsSessions) -> Check {
    match s.problem() {
        None if s.remote_desktop_active => Check::ok(
            "remote_desktop",
            "a Remote Desktop session is connected; smart-card redirection is off, so the token stays with the agent",
        ),
        None => Check::ok(
            "remote_desktop",
            "smart-card redirection is off: Remote Desktop leaves the token with the agent",
        ),
        Some((why, fix)) if s.remote_desktop_active => Check::fail("remote_desktop", why, fix),
        Some((why, fix)) => Check::warn("remote_desktop", why, fix),
    }
}

pub fn judge_module(path: &Path, probe: &ModuleProbe, present: &[Candidate]) -> Check {
    let shown = path.display();
    let others = suggestions(path, present);
    let fix = if others.is_empty() {
        "install the PKCS#11 middleware of your token (SafeNet Authentication Client for eTokens, Yubico PIV Tool for YubiKeys, OpenSC for most smart cards) and set token.module to its module; no known module is present on this machine".to_owned()
    } else {
        "set token.module to the module of your token's middleware; the known modules present on this machine are listed above".to_owned()
    };
    let failed =
        |summary: String| Check::fail("module", summary, fix.clone()).with_details(others.clone());
    match probe {
        ModuleProbe::Missing => failed(format!("the PKCS#11 module {shown} does not exist")),
        ModuleProbe::LoadFailed(e) => failed(format!(
            "{shown} cannot be loaded as a PKCS#11 module: {e}"
        )),
        ModuleProbe::InitFailed(e) => failed(format!(
            "{shown} loads but C_Initialize fails: {e}; check the middleware is completely installed and its service (pcscd) runs"
        )),
        ModuleProbe::Loaded(info) => {
            let known = modules::identify(path)
                .map(|m| format!(" [{}]", m.middleware))
                .unwrap_or_default();
            Check::ok(
                "module",
                format!(
                    "{shown}{known}: {} {} ({}), Cryptoki {}",
                    info.description, info.version, info.manufacturer, info.cryptoki
                ),
            )
        }
    }
}

/// Judges the token list: at least one initialized token is present.
pub fn judge_tokens(tokens: &[TokenFacts]) -> Check {
    let details: Vec<String> = tokens.iter().map(TokenFacts::describe).collect();
    let n = tokens.iter().filter(|t| t.initialized).count();
    if n == 0 {
        return Check::fail(
            "tokens",
            "no token is present",
            "plug the token in and pass it through to this VM (Proxmox: qm set VMID -usb0 host=VID:PID); for SoftHSM, check SOFTHSM2_CONF names its token directory",
        )
        .with_details(details);
    }
    Check::ok(
        "tokens",
        format!("{n} token{} present", if n == 1 { "" } else { "s" }),
    )
    .with_details(details)
}

/// Judges whether the configured label and/or serial names one of `tokens`; returns
/// the index of the token the agent would use (the first match, as it does).
pub fn judge_token_match(cfg: &TokenConfig, tokens: &[TokenFacts]) -> (Check, Option<usize>) {
    let wanted = match (&cfg.label, &cfg.serial) {
        (Some(l), Some(s)) => format!("label \"{l}\" and serial {s}"),
        (Some(l), None) => format!("label \"{l}\""),
        (None, Some(s)) => format!("serial {s}"),
        (None, None) => "any token".to_owned(),
    };
    let matching: Vec<usize> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            t.initialized
                && cfg.label.as_ref().is_none_or(|l| *l == t.label)
                && cfg.serial.as_ref().is_none_or(|s| *s == t.serial)
        })
        .map(|(i, _)| i)
        .collect();
    let present: Vec<String> = tokens
        .iter()
        .filter(|t| t.initialized)
        .map(|t| format!("\"{}\" (serial {})", t.label, t.serial))
        .collect();
    match matching.as_slice() {
        [] => (
            Check::fail(
                "token",
                format!(
                    "no token matches {wanted}; tokens present: {}",
                    if present.is_empty() {
                        "none".to_owned()
                    } else {
                        present.join(", ")
                    }
                ),
                "set token.label and/or token.serial in the agent's configuration to one of the tokens present",
            ),
            None,
        ),
        [one] => {
            let t = &tokens[*one];
            (
                Check::ok(
                    "token",
                    format!("\"{}\" (serial {}) matches {wanted}", t.label, t.serial),
                ),
                Some(*one),
            )
        }
        [first, ..] => {
            let t = &tokens[*first];
            (
                Check::warn(
                    "token",
                    format!(
                        "{} tokens match {wanted}; the agent takes the first, \"{}\" (serial {})",
                        matching.len(),
                        t.label,
                        t.serial
                    ),
                    "add token.serial to the configuration so exactly one token matches",
                ),
                Some(*first),
            )
        }
    }
}

/// Judges the configured token's PIN counter flags.
pub fn judge_pin_state(flags: &PinFlagsReport) -> Check {
    if flags.locked {
        return Check::fail(
            "pin_state",
            "the user PIN is locked (CKF_USER_PIN_LOCKED); the agent will not log in",
            "unlock it with the SO PIN or the vendor's tool (SafeNet: the administrator password), then restart the agent",
        );
    }
    if flags.final_try {
        return Check::fail(
            "pin_state",
            "one more wrong PIN locks the token (CKF_USER_PIN_FINAL_TRY); the agent will not log in",
            "log in once by hand with the right PIN to reset the counter, make sure the PIN file holds that PIN, then restart the agent",
        );
    }
    if flags.count_low {
        return Check::warn(
            "pin_state",
            "a wrong PIN was presented since the last good login (CKF_USER_PIN_COUNT_LOW)",
            "make sure the PIN file holds the right PIN before the agent logs in",
        );
    }
    if flags.to_be_changed {
        return Check::warn(
            "pin_state",
            "the token asks for its user PIN to be changed (CKF_USER_PIN_TO_BE_CHANGED)",
            "change the PIN with the vendor's tool and write the new one into the PIN file",
        );
    }
    Check::ok(
        "pin_state",
        "the user PIN counter is clean: no failed tries, not locked",
    )
}

/// Judges the PIN file from its metadata.
pub fn judge_pin_file(path: &Path, probe: &PinFileProbe) -> Check {
    let shown = path.display();
    let write =
        format!("write the token's user PIN into {shown}, owned by the agent's user, mode 600");
    match probe {
        PinFileProbe::Missing => Check::fail("pin_file", format!("{shown} does not exist"), write),
        PinFileProbe::NotAFile => {
            Check::fail("pin_file", format!("{shown} is not a regular file"), write)
        }
        PinFileProbe::Unreadable(e) => Check::fail(
            "pin_file",
            format!("cannot read {shown}: {e}"),
            "make it readable by the agent's user, and by no one else",
        ),
        PinFileProbe::Present { len: 0, .. } => {
            Check::fail("pin_file", format!("{shown} is empty"), write)
        }
        PinFileProbe::Present {
            mode: Some(mode), ..
        } if mode & 0o077 != 0 => Check::fail(
            "pin_file",
            format!("{shown} is open to group or others (mode {mode:04o})"),
            format!("chmod 600 {shown}"),
        ),
        PinFileProbe::Present {
            mode: Some(mode), ..
        } => Check::ok(
            "pin_file",
            format!("{shown}: readable, mode {mode:04o} (its content is not read here)"),
        ),
        PinFileProbe::Present { mode: None, .. } => Check::ok(
            "pin_file",
            format!("{shown}: readable (its content is not read here; who else may read it is its ACL's matter: let only the agent's account read it)"),
        ),
    }
}

/// `(major, minor)` from `osslsigncode --version`'s output ("osslsigncode 2.9, using:").
pub fn osslsigncode_version(output: &str) -> Option<(u32, u32)> {
    let rest = output.split("osslsigncode ").nth(1)?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Judges osslsigncode from its `--version` run.
pub fn judge_osslsigncode(program: &Path, probe: &Result<String, String>) -> Check {
    let install = &format!(
        "install osslsigncode {} or later for digest mode and PowerShell (Debian 12 has 2.5; bookworm-backports has 2.9), or set signer.osslsigncode to it",
        osslsigncode::shown(osslsigncode::DIGEST)
    );
    let output = match probe {
        Err(e) => {
            return Check::fail(
                "osslsigncode",
                format!("cannot run {}: {e}", program.display()),
                install,
            )
        }
        Ok(o) => o,
    };
    let Some((major, minor)) = osslsigncode_version(output) else {
        return Check::fail(
            "osslsigncode",
            format!(
                "cannot tell the version of {} from: {}",
                program.display(),
                output.lines().next().unwrap_or("(no output)")
            ),
            install,
        );
    };
    let v = (major, minor);
    if v < OSSLSIGNCODE_MIN {
        return Check::fail(
            "osslsigncode",
            format!("osslsigncode {major}.{minor} is older than {}, the oldest the agent is known to work with", osslsigncode::shown(OSSLSIGNCODE_MIN)),
            install,
        );
    }
    if v < OSSLSIGNCODE_EXTRACT_DATA {
        return Check::warn(
            "osslsigncode",
            format!("osslsigncode {major}.{minor} signs whole PE, MSI, CAB and CAT files, but not PowerShell files nor the detached data digest mode needs ({})", osslsigncode::shown(OSSLSIGNCODE_EXTRACT_DATA)),
            install,
        );
    }
    Check::ok(
        "osslsigncode",
        format!("osslsigncode {major}.{minor}: whole files, PowerShell files, and digest mode (extract-data, attach-signature)"),
    )
}

/// Judges osslsigncode for the native engine, which needs it only for MSI, CAB,
/// PowerShell and APPX/MSIX files (`extract-data` and `attach-signature`): without it,
/// or too old for them, PE files, catalogs and digest mode are still signed (a warning).
pub fn judge_osslsigncode_for_native(program: &Path, probe: &Result<String, String>) -> Check {
    let install = &format!(
        "install osslsigncode {} or later in the signing VM (Debian 12 has 2.5; bookworm-backports has 2.9), or set signer.osslsigncode to it",
        osslsigncode::shown(OSSLSIGNCODE_EXTRACT_DATA)
    );
    let native = "the native engine signs PE files, catalogs and digest mode without it";
    let output = match probe {
        Err(e) => {
            return Check::warn(
                "osslsigncode",
                format!(
                    "cannot run {}: {e}; {native}, and refuses MSI, CAB, PowerShell and APPX/MSIX files",
                    program.display()
                ),
                install,
            )
        }
        Ok(o) => o,
    };
    match osslsigncode_version(output) {
        Some((major, minor)) if (major, minor) >= OSSLSIGNCODE_EXTRACT_DATA => Check::ok(
            "osslsigncode",
            format!("osslsigncode {major}.{minor}: the native engine's extract-data and attach-signature for MSI, CAB, PowerShell and APPX/MSIX files"),
        ),
        Some((major, minor)) => Check::warn(
            "osslsigncode",
            format!("osslsigncode {major}.{minor} has no extract-data: {native}, and refuses MSI, CAB, PowerShell and APPX/MSIX files"),
            install,
        ),
        None => Check::warn(
            "osslsigncode",
            format!(
                "cannot tell the version of {} from: {}; {native}",
                program.display(),
                output.lines().next().unwrap_or("(no output)")
            ),
            install,
        ),
    }
}

/// Judges a certificate given as a file (`signer.certificate`).
pub fn judge_file_cert(path: &Path, probe: &FileCertProbe) -> Check {
    let shown = path.display();
    let fix = "set signer.certificate to the signing certificate (PEM or DER), or remove it to use the certificate on the token";
    match probe {
        FileCertProbe::Missing => {
            Check::fail("certificate", format!("{shown} does not exist"), fix)
        }
        FileCertProbe::Unreadable(e) => {
            Check::fail("certificate", format!("cannot read {shown}: {e}"), fix)
        }
        FileCertProbe::NotACertificate => Check::fail(
            "certificate",
            format!("{shown} is neither a PEM nor a DER certificate"),
            fix,
        ),
        FileCertProbe::Pem | FileCertProbe::Der => Check::ok(
            "certificate",
            format!(
                "{shown} ({} certificate file)",
                if *probe == FileCertProbe::Pem {
                    "PEM"
                } else {
                    "DER"
                }
            ),
        ),
    }
}

/// Judges the certificates on the token (`signer.certificate` unset).
pub fn judge_token_certs(
    token: &str,
    key_label: Option<&str>,
    probe: &Result<Vec<CertFacts>, String>,
) -> Check {
    let certs = match probe {
        Err(e) => return Check::fail(
            "certificate",
            format!("cannot list the certificates on \"{token}\": {e}"),
            "check the token is still present, or set signer.certificate to the certificate file",
        ),
        Ok(c) => c,
    };
    let details: Vec<String> = certs
        .iter()
        .map(|c| format!("\"{}\" id {} SHA-256 {}", c.label, c.id, c.sha256))
        .collect();
    if certs.is_empty() {
        return Check::fail(
            "certificate",
            format!("\"{token}\" shows no certificate without login"),
            "write the signing certificate to the token with the key's id (pkcs11-tool --login --write-object cert.der --type cert --id ID), or set signer.certificate to the certificate file",
        );
    }
    let labelled = key_label.and_then(|l| certs.iter().find(|c| c.label == l));
    let summary = match (key_label, labelled) {
        (Some(_), Some(c)) => format!(
            "\"{}\" on \"{token}\" (id {}); the agent signs with the one whose id is the key's",
            c.label, c.id
        ),
        _ => format!(
            "{} certificate{} on \"{token}\"; the agent signs with the one whose id is the key's",
            certs.len(),
            if certs.len() == 1 { "" } else { "s" }
        ),
    };
    Check::ok("certificate", summary).with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::KNOWN;

    fn token(label: &str, serial: &str) -> TokenFacts {
        TokenFacts {
            slot: 7,
            label: label.into(),
            serial: serial.into(),
            model: "SoftHSM v2".into(),
            manufacturer: "SoftHSM project".into(),
            firmware: "2.6".into(),
            initialized: true,
            pin_flags: PinFlagsReport::default(),
        }
    }

    fn token_cfg(label: Option<&str>, serial: Option<&str>) -> TokenConfig {
        TokenConfig {
            module: "/m.so".into(),
            label: label.map(Into::into),
            serial: serial.map(Into::into),
            key_label: None,
            pin_file: Some("/p".into()),
            reinit_command: None,
        }
    }

    #[test]
    fn module_failures_suggest_the_known_modules_present_but_not_the_broken_one() {
        let softhsm = KNOWN.iter().find(|m| m.middleware == "SoftHSM2").unwrap();
        let opensc = KNOWN.iter().find(|m| m.middleware == "OpenSC").unwrap();
        let present = vec![
            Candidate {
                module: opensc,
                path: "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so".into(),
            },
            Candidate {
                module: softhsm,
                path: "/usr/lib/softhsm/libsofthsm2.so".into(),
            },
        ];
        let c = judge_module(
            Path::new("/usr/lib/libeTPkcs11.so"),
            &ModuleProbe::Missing,
            &present,
        );
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.summary.contains("/usr/lib/libeTPkcs11.so") && c.summary.contains("does not exist"),
            "{c:?}"
        );
        assert_eq!(c.details.len(), 2, "{c:?}");
        assert!(
            c.details[1].contains("/usr/lib/softhsm/libsofthsm2.so")
                && c.details[1].contains("SoftHSM2"),
            "{c:?}"
        );
        assert!(c.fix.as_deref().unwrap().contains("token.module"), "{c:?}");

        let c = judge_module(
            Path::new("/usr/lib/softhsm/libsofthsm2.so"),
            &ModuleProbe::InitFailed("C_Initialize returned CKR_GENERAL_ERROR".into()),
            &present,
        );
        assert!(c.summary.contains("CKR_GENERAL_ERROR"), "{c:?}");
        assert_eq!(
            c.details.len(),
            1,
            "the broken module is not suggested: {c:?}"
        );

        let c = judge_module(
            Path::new("/x.so"),
            &ModuleProbe::LoadFailed("bad ELF".into()),
            &[],
        );
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .contains("SafeNet Authentication Client"),
            "{c:?}"
        );

        let info = LibraryFacts {
            description: "Implementation of PKCS11".into(),
            manufacturer: "SoftHSM".into(),
            version: "2.6".into(),
            cryptoki: "2.40".into(),
        };
        let c = judge_module(
            Path::new("/usr/lib/softhsm/libsofthsm2.so"),
            &ModuleProbe::Loaded(info),
            &present,
        );
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.summary.contains("[SoftHSM2]") && c.summary.contains("Cryptoki 2.40"),
            "{c:?}"
        );
    }

    #[test]
    fn tokens_are_listed_and_none_present_fails() {
        let mut blank = token("", "");
        blank.initialized = false;
        let c = judge_tokens(&[blank.clone()]);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.details, vec!["uninitialized token (slot 7)"]);
        let mut low = token("signet-demo", "1a2b");
        low.pin_flags.count_low = true;
        let c = judge_tokens(&[low, blank]);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.summary, "1 token present");
        assert_eq!(
            c.details[0],
            "\"signet-demo\" serial 1a2b, model SoftHSM v2, manufacturer SoftHSM project, firmware 2.6; user PIN COUNT_LOW"
        );
    }

    #[test]
    fn the_configured_token_is_matched_by_label_and_serial_and_misses_name_what_is_there() {
        let tokens = [
            token("build", "111"),
            token("release", "222"),
            token("release", "333"),
        ];
        let (c, i) = judge_token_match(&token_cfg(Some("release"), Some("333")), &tokens);
        assert_eq!((c.status, i), (Status::Ok, Some(2)), "{c:?}");
        let (c, i) = judge_token_match(&token_cfg(None, Some("111")), &tokens);
        assert_eq!((c.status, i), (Status::Ok, Some(0)), "{c:?}");
        let (c, i) = judge_token_match(&token_cfg(Some("release"), None), &tokens);
        assert_eq!((c.status, i), (Status::Warn, Some(1)), "{c:?}");
        assert!(c.fix.as_deref().unwrap().contains("token.serial"), "{c:?}");
        let (c, i) = judge_token_match(&token_cfg(Some("nope"), None), &tokens);
        assert_eq!((c.status, i), (Status::Fail, None));
        assert_eq!(
            c.summary,
            "no token matches label \"nope\"; tokens present: \"build\" (serial 111), \"release\" (serial 222), \"release\" (serial 333)"
        );
        let (c, _) = judge_token_match(&token_cfg(Some("x"), None), &[]);
        assert!(c.summary.ends_with("tokens present: none"), "{c:?}");
    }

    #[test]
    fn pin_flags_that_stop_the_agent_fail_and_the_others_warn() {
        let f = |count_low, final_try, locked, to_be_changed| PinFlagsReport {
            count_low,
            final_try,
            locked,
            to_be_changed,
        };
        assert_eq!(
            judge_pin_state(&f(false, false, false, false)).status,
            Status::Ok
        );
        assert_eq!(
            judge_pin_state(&f(true, false, false, false)).status,
            Status::Warn
        );
        assert_eq!(
            judge_pin_state(&f(false, false, false, true)).status,
            Status::Warn
        );
        let c = judge_pin_state(&f(true, true, false, false));
        assert_eq!(c.status, Status::Fail);
        assert!(c.summary.contains("FINAL_TRY"), "{c:?}");
        let c = judge_pin_state(&f(true, true, true, false));
        assert!(c.summary.contains("LOCKED"), "{c:?}");
    }

    #[test]
    fn the_pin_file_must_exist_hold_something_and_be_private() {
        let p = Path::new("/etc/signet/pin");
        let st = |probe| judge_pin_file(p, &probe);
        assert_eq!(
            st(PinFileProbe::Present {
                mode: Some(0o600),
                len: 6
            })
            .status,
            Status::Ok
        );
        assert_eq!(
            st(PinFileProbe::Present {
                mode: Some(0o400),
                len: 6
            })
            .status,
            Status::Ok
        );
        for mode in [0o644, 0o640, 0o604, 0o620, 0o666] {
            let c = st(PinFileProbe::Present {
                mode: Some(mode),
                len: 6,
            });
            assert_eq!(c.status, Status::Fail, "{mode:o}");
            assert!(c.summary.contains(&format!("{mode:04o}")), "{c:?}");
            assert_eq!(c.fix.as_deref(), Some("chmod 600 /etc/signet/pin"));
        }
        let c = st(PinFileProbe::Present {
            mode: Some(0o600),
            len: 0,
        });
        assert!(c.summary.contains("empty"), "{c:?}");
        let c = st(PinFileProbe::Present { mode: None, len: 6 });
        assert_eq!(
            c.status,
            Status::Ok,
            "no mode bits (Windows): its ACL is not judged"
        );
        assert!(c.summary.contains("ACL"), "{c:?}");
        assert_eq!(st(PinFileProbe::Missing).status, Status::Fail);
        assert_eq!(st(PinFileProbe::NotAFile).status, Status::Fail);
        let c = st(PinFileProbe::Unreadable("Permission denied".into()));
        assert!(c.summary.contains("Permission denied"), "{c:?}");
    }

    #[test]
    fn signtool_passes_when_it_runs_and_names_the_fix_when_not() {
        let p = Path::new("signtool.exe");
        assert_eq!(judge_signtool(p, &Ok(())).status, Status::Ok);
        let c = judge_signtool(p, &Err("program not found".into()));
        assert_eq!(c.status, Status::Fail);
        assert!(c.summary.contains("program not found"), "{c:?}");
        assert!(
            c.fix.as_deref().unwrap().contains("signer.signtool"),
            "{c:?}"
        );
        assert_eq!(
            judge_signtool(p, &probe_signtool(Path::new("/nonexistent/signtool.exe"))).status,
            Status::Fail
        );
    }

    #[test]
    fn osslsigncode_versions_decide_what_works() {
        assert_eq!(
            osslsigncode_version("osslsigncode 2.9, using:\n\tOpenSSL 3.0.13"),
            Some((2, 9))
        );
        assert_eq!(
            osslsigncode_version("osslsigncode 2.10, using:"),
            Some((2, 10))
        );
        assert_eq!(osslsigncode_version("osslsigncode 2.5.1"), Some((2, 5)));
        assert_eq!(osslsigncode_version("something else"), None);
        let p = Path::new("osslsigncode");
        let c = judge_osslsigncode(p, &Ok("osslsigncode 2.9, using:".into()));
        assert_eq!(c.status, Status::Ok);
        assert!(c.summary.contains("extract-data"), "{c:?}");
        assert_eq!(
            judge_osslsigncode(p, &Ok("osslsigncode 3.0, using:".into())).status,
            Status::Ok
        );
        let c = judge_osslsigncode(p, &Ok("osslsigncode 2.8, using:".into()));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let c = judge_osslsigncode(p, &Ok("osslsigncode 2.5, using:".into()));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.summary.contains("digest mode"), "{c:?}");
        let c = judge_osslsigncode(p, &Ok("osslsigncode 2.4, using:".into()));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        let c = judge_osslsigncode(p, &Err("No such file or directory".into()));
        assert!(c.summary.contains("cannot run osslsigncode"), "{c:?}");
        assert!(
            c.fix.as_deref().unwrap().contains("signer.osslsigncode"),
            "{c:?}"
        );
    }

    #[test]
    fn the_native_engine_needs_osslsigncode_only_for_the_formats_it_embeds() {
        let p = Path::new("osslsigncode");
        let c = judge_osslsigncode_for_native(p, &Ok("osslsigncode 2.9, using:".into()));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.summary.contains("extract-data"), "{c:?}");
        for probe in [
            Ok("osslsigncode 2.5, using:".to_owned()),
            Ok("osslsigncode 2.4".to_owned()),
            Ok("something else".to_owned()),
            Err("No such file or directory".to_owned()),
        ] {
            let c = judge_osslsigncode_for_native(p, &probe);
            assert_eq!(c.status, Status::Warn, "{c:?}");
            assert!(
                c.summary.contains("PE files, catalogs and digest mode"),
                "{c:?}"
            );
            assert!(c.fix.as_deref().unwrap().contains("2.8 or later"), "{c:?}");
        }
    }

    #[test]
    fn certificates_are_found_on_the_token_or_in_the_file() {
        assert_eq!(
            cert_form(b"junk\n-----BEGIN CERTIFICATE-----\nMII"),
            FileCertProbe::Pem
        );
        assert_eq!(
            cert_form(&[0x30, 0x82, 0x04, 0x10, 0x30]),
            FileCertProbe::Der
        );
        assert_eq!(cert_form(b"hello"), FileCertProbe::NotACertificate);
        let f = Path::new("/etc/signet/cs.pem");
        assert_eq!(judge_file_cert(f, &FileCertProbe::Pem).status, Status::Ok);
        assert_eq!(
            judge_file_cert(f, &FileCertProbe::Missing).status,
            Status::Fail
        );

        let cert = CertFacts {
            label: "signkey".into(),
            id: "01".into(),
            sha256: "AB:CD".into(),
        };
        let c = judge_token_certs("signet-demo", Some("signkey"), &Ok(vec![cert.clone()]));
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.summary
                .starts_with("\"signkey\" on \"signet-demo\" (id 01)"),
            "{c:?}"
        );
        assert_eq!(c.details, vec!["\"signkey\" id 01 SHA-256 AB:CD"]);
        let c = judge_token_certs("signet-demo", None, &Ok(vec![cert.clone(), cert]));
        assert!(c.summary.starts_with("2 certificates"), "{c:?}");
        let c = judge_token_certs("signet-demo", None, &Ok(vec![]));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.fix.as_deref().unwrap().contains("signer.certificate"),
            "{c:?}"
        );
    }

    #[test]
    fn the_module_is_read_from_a_configuration_that_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "[token]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\npin_file = \"pin\"\n",
        )
        .unwrap();
        assert!(Config::load(&p).is_err(), "no label nor serial");
        assert_eq!(
            lenient_module(&p),
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
        std::fs::write(&p, "[token]\nmodule = \"lib/m.so\"\n").unwrap();
        assert_eq!(lenient_module(&p), Some(dir.path().join("lib/m.so")));
        std::fs::write(&p, "not toml [").unwrap();
        assert_eq!(lenient_module(&p), None);
    }

    #[test]
    fn the_text_report_shows_status_name_summary_details_and_fix() {
        let report = Report {
            config: "/etc/signet/agent.toml".into(),
            ok: false,
            checks: vec![
                Check::ok("config", "/etc/signet/agent.toml loads"),
                Check::fail(
                    "pin_file",
                    "/p is open to group or others (mode 0644)",
                    "chmod 600 /p",
                )
                .with_details(vec!["a detail".into()]),
                Check::skip("certificate", "the configured token was not found"),
            ],
            module: None,
            library: None,
            tokens: vec![],
            modules_present: vec![],
        };
        let text = report.render();
        assert_eq!(
            text,
            "signet-agent doctor: /etc/signet/agent.toml (no login, no PIN try spent)\n\
             ok    config        /etc/signet/agent.toml loads\n\
             FAIL  pin_file      /p is open to group or others (mode 0644)\n\
             \x20                   - a detail\n\
             \x20                   fix: chmod 600 /p\n\
             skip  certificate   not checked: the configured token was not found\n\
             1 check failed, 1 not checked.\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "chmod 600 /p");
        assert!(json["checks"][0].get("fix").is_none());
    }

    #[test]
    fn remote_desktop_fails_when_it_holds_the_token_and_warns_before() {
        use signet_api::wire::WindowsSessions;
        let c = judge_remote_desktop(&WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(false),
        });
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("fEnableSmartCard"));
        let c = judge_remote_desktop(&WindowsSessions {
            remote_desktop_active: false,
            smart_card_redirection_disabled: None,
        });
        assert_eq!(c.status, Status::Warn);
        let c = judge_remote_desktop(&WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(true),
        });
        assert_eq!(c.status, Status::Ok);
        assert!(c.summary.contains("stays with the agent"), "{}", c.summary);
    }
}
