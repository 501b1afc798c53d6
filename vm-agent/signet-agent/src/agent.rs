//! The agent's core: one token, one job at a time, and the commands the HTTP front
//! calls (`sign`, `health`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use signet_protocol::format;
use signet_protocol::wire::{AgentHealth, AgentSignQuery, ErrorBody, ErrorCode, SignMode};
use tokio::io::AsyncReadExt;

use crate::config::Config;
use crate::job;
use crate::signer::{Osslsigncode, SignError, SignSpec};
use crate::token::{Token, TokenError};

/// A job's working directory: the spooled input and, once signed, the output.
/// Everything in it is deleted when it is dropped.
#[derive(Debug)]
pub struct Spool {
    dir: tempfile::TempDir,
}

impl Spool {
    pub fn input(&self) -> PathBuf {
        self.dir.path().join("input")
    }

    pub fn output(&self) -> PathBuf {
        self.dir.path().join("signed")
    }

    /// The input's path once it carries the extension of its format.
    fn input_with_extension(&self, extension: &str) -> PathBuf {
        self.dir.path().join(format!("input.{extension}"))
    }
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    token: Arc<Mutex<Token>>,
    /// One job at a time touches the token.
    jobs: tokio::sync::Mutex<()>,
    signer: Osslsigncode,
    signer_version: String,
    module: PathBuf,
    spool_dir: PathBuf,
}

impl Agent {
    /// Builds the agent from its configuration. Checks the signer is runnable; the
    /// token is opened by [`Agent::open_token`], and its absence is a state, not an error.
    pub async fn new(cfg: Config) -> Result<Self, SignError> {
        let signer = Osslsigncode {
            program: cfg.signer.osslsigncode.clone(),
            module: cfg.token.module.clone(),
            certificate: cfg.signer.certificate.clone(),
            timeout: std::time::Duration::from_secs(cfg.signer.timeout_seconds),
        };
        let signer_version = signer.version().await?;
        Ok(Agent {
            module: cfg.token.module.clone(),
            token: Arc::new(Mutex::new(Token::new(cfg.token))),
            jobs: tokio::sync::Mutex::new(()),
            signer,
            signer_version,
            spool_dir: cfg.spool_dir.unwrap_or_else(std::env::temp_dir),
        })
    }

    /// Tries to open and log in to the token now; returns the resulting state.
    pub async fn open_token(&self) -> AgentHealth {
        let _job = self.jobs.lock().await;
        let _ = self.with_token(|t| t.ensure_ready().map(|_| ())).await;
        self.health_now().await
    }

    /// A fresh working directory for one job.
    pub fn spool(&self) -> Result<Spool, ErrorBody> {
        tempfile::Builder::new()
            .prefix("signet-job-")
            .tempdir_in(&self.spool_dir)
            .map(|dir| Spool { dir })
            .map_err(|e| {
                ErrorBody::new(
                    ErrorCode::Internal,
                    format!(
                        "the agent cannot create a spool directory in {}: {e}; check spool_dir and free space",
                        self.spool_dir.display()
                    ),
                )
            })
    }

    /// Signs the spooled input; on success the signed file is at `spool.output()`.
    pub async fn sign(&self, spool: &Spool, query: &AgentSignQuery) -> Result<(), ErrorBody> {
        let input = self.check_input(spool, query).await?;
        let _job = self.jobs.lock().await;
        self.sign_locked(spool, &input, query).await
    }

    /// Signs a batch in order under one hold of the token: no other job runs between
    /// its files. Each file gets its own result; a bad file does not stop the others.
    pub async fn sign_batch(
        &self,
        items: &[(Spool, AgentSignQuery)],
    ) -> Vec<Result<(), ErrorBody>> {
        let mut checked = Vec::with_capacity(items.len());
        for (spool, query) in items {
            checked.push(self.check_input(spool, query).await);
        }
        let _job = self.jobs.lock().await;
        let mut results = Vec::with_capacity(items.len());
        for ((spool, query), input) in items.iter().zip(checked) {
            results.push(match input {
                Ok(input) => self.sign_locked(spool, &input, query).await,
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Checks the spooled input is something this request may sign, and names it
    /// the way osslsigncode needs.
    async fn check_input(
        &self,
        spool: &Spool,
        query: &AgentSignQuery,
    ) -> Result<Checked, ErrorBody> {
        job::check_query(query)?;
        match query.mode {
            SignMode::Whole => {
                let detected =
                    job::admit(query, detect(spool.input(), query.filename.clone()).await?)?;
                // osslsigncode may go by the extension (it does for PowerShell files).
                let input = spool.input_with_extension(detected.extension);
                tokio::fs::rename(spool.input(), &input)
                    .await
                    .map_err(|e| {
                        ErrorBody::new(
                            ErrorCode::Internal,
                            format!("the agent cannot rename its spooled input: {e}"),
                        )
                    })?;
                tracing::info!(format = %detected.format, profile = query.profile.as_deref().unwrap_or("-"), "input accepted");
                Ok(Checked {
                    input,
                    format: Some(detected.format),
                })
            }
            SignMode::Digest => {
                let head = read_head(&spool.input()).await?;
                format::detect_digest_blob(&head)
                    .map_err(|e| ErrorBody::new(ErrorCode::UnsupportedFormat, e.to_string()))?;
                tracing::info!(
                    profile = query.profile.as_deref().unwrap_or("-"),
                    "digest-mode input accepted"
                );
                Ok(Checked {
                    input: spool.input(),
                    format: None,
                })
            }
        }
    }

    /// Signs one checked input; the caller holds the job lock.
    async fn sign_locked(
        &self,
        spool: &Spool,
        checked: &Checked,
        query: &AgentSignQuery,
    ) -> Result<(), ErrorBody> {
        let input = &checked.input;
        let (key, pin) = self
            .with_token(|t| t.ensure_ready())
            .await
            .map_err(|e| ErrorBody::new(e.code(), e.to_string()))?;
        if self.signer.certificate.is_none() && !key.cert_on_token {
            return Err(ErrorBody::new(
                ErrorCode::SigningFailed,
                format!(
                    "the token \"{}\" holds no certificate with the key's id; write the certificate to the token or set signer.certificate in the agent's configuration",
                    key.token_label
                ),
            ));
        }
        let output = spool.output();
        let spec = SignSpec {
            input,
            output: &output,
            format: checked.format,
            hash: query.hash,
            description: query.description.as_deref(),
            url: query.url.as_deref(),
            page_hashes: query.page_hashes,
            nested: query.nested,
            timestamp: &query.timestamp,
        };
        let started = std::time::Instant::now();
        let result = self.signer.sign(&key, &pin, &spec).await;
        match result {
            Ok(()) => {
                tracing::info!(
                    file = query.filename.as_deref().unwrap_or("-"),
                    token = %key.token_serial,
                    ms = started.elapsed().as_millis() as u64,
                    "signed"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(token = %key.token_serial, error = %e, "signing failed");
                let code = e.code();
                match &e {
                    SignError::PinRejected => self.with_token_quiet(move |t| t.refused(&pin)).await,
                    SignError::TokenLost(d) => {
                        let d = d.clone();
                        self.with_token_quiet(move |t| t.lost(d)).await
                    }
                    _ => {}
                }
                // The spool's paths mean nothing to the caller.
                let spool_path = spool.dir.path().to_string_lossy().into_owned();
                Err(ErrorBody::new(
                    code,
                    e.to_string().replace(&spool_path, "<job>"),
                ))
            }
        }
    }

    /// The agent's health, without waiting for a running job.
    pub async fn health(&self) -> AgentHealth {
        match self.jobs.try_lock() {
            // Idle: a token that is not open yet gets a try (the PIN guard still rules).
            Ok(_idle) => {
                let _ = self.with_token(|t| t.ensure_ready().map(|_| ())).await;
                self.health_now().await
            }
            Err(_) => self.health_now().await,
        }
    }

    async fn health_now(&self) -> AgentHealth {
        let (state, detail, token) = self
            .with_token_quiet(|t| {
                let (s, d) = t.state();
                (s, d, t.summary())
            })
            .await;
        AgentHealth {
            version: signet_protocol::VERSION.to_owned(),
            state,
            detail,
            module: self.module.display().to_string(),
            token,
            signer: self.signer_version.clone(),
        }
    }

    /// Runs blocking PKCS#11 work on the token off the async threads.
    async fn with_token<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Token) -> Result<T, TokenError> + Send + 'static,
    ) -> Result<T, TokenError> {
        self.with_token_quiet(f).await
    }

    async fn with_token_quiet<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Token) -> T + Send + 'static,
    ) -> T {
        let token = self.token.clone();
        tokio::task::spawn_blocking(move || {
            let mut t = token.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut t)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

/// Detects the spooled input's format from its content (and, for text, its name).
async fn detect(
    input: PathBuf,
    filename: Option<String>,
) -> Result<Result<format::Detected, format::FormatError>, ErrorBody> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&input).map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("the spooled input is gone: {e}"),
            )
        })?;
        Ok(format::detect(&file, filename.as_deref()))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Reads the first bytes of the spooled input.
async fn read_head(input: &Path) -> Result<Vec<u8>, ErrorBody> {
    let mut head = Vec::with_capacity(format::HEAD_LEN);
    let file = tokio::fs::File::open(input).await.map_err(|e| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the spooled input is gone: {e}"),
        )
    })?;
    file.take(format::HEAD_LEN as u64)
        .read_to_end(&mut head)
        .await
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("cannot read the spooled input: {e}"),
            )
        })?;
    Ok(head)
}

/// A spooled input that passed its checks: where it is, and what it is (`None` for
/// digest mode's Authenticode data).
#[derive(Debug)]
pub struct Checked {
    input: PathBuf,
    format: Option<signet_protocol::format::Format>,
}
