//! A job sent so that it is never lost and never signed twice: the request carries an
//! idempotency key a re-run of the same command reproduces ([`idempotency_key`]) and
//! `Prefer: respond-async`, so the client knows its job's id as soon as the appliance
//! has queued it; the result is then collected with `GET /v1/jobs/{id}/result`, on the
//! connection the upload went on (HTTP/1.1 keep-alive; a new one when the appliance
//! closed it). A small body held in memory (digest mode's data) is sent without it
//! ([`Collector::answer_at_once`]): the appliance answers the result to the upload
//! itself, one request instead of two, and a request cut off is sent again whole,
//! which costs no more than a `GET`. When
//! the connection drops (the appliance restarts), the request is sent again with the
//! same key, or the result collected again, until the appliance is back or the
//! reconnect time runs out.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::{Body, Incoming};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use signet_api::hex::lower as hex;
use signet_api::wire::{ErrorBody, ErrorCode, SignQuery, IDEMPOTENCY_HEADER, JOB_HEADER};
use signet_protocol::client::{self, ClientError};
use signet_protocol::Endpoint;

/// The first pause before trying a restarting appliance again; it doubles up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// The key of a request: `signet1-` and the SHA-256 (hex) of what is asked — the
/// kind of request, the profile and options as given on the command line, each file's
/// name and what names its content: a whole file's identity ([`file_identity`]) or,
/// after the appliance refused that key, its SHA-256; in digest mode the SHA-256 of
/// the data uploaded and of what that data leaves out of the file (a PE's signature
/// and the header fields Authenticode skips; for other formats, the whole file's
/// SHA-256). Running the same command on the same files gives the same key; the
/// appliance scopes keys per caller and keeps one while it keeps the job's result.
pub fn idempotency_key(kind: &str, query: &SignQuery, files: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update(b"\n");
    h.update(serde_urlencoded::to_string(query).unwrap_or_default());
    for (name, sha) in files {
        h.update(b"\n");
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(sha.as_bytes());
    }
    format!("signet1-{}", hex(&h.finalize()))
}

/// What a whole-file request's key names of a file before anything of it is read: its
/// identity — device, inode, size, and modification and change times in ns —
/// `id:DEV:INO:SIZE:MTIME:CTIME`. A file written again has another change time (which
/// no one can set back), another file another inode: the same identity is the same
/// content, but where times are coarser than two writes of the same size (or an inode
/// is reused within one tick). The appliance binds a key to the SHA-256 of the body it
/// was sent with and refuses another body under it (`idempotency_key_reused`); the
/// request is then sent once more keyed by [`file_sha256`]. None where the system
/// tells no inode (the content's SHA-256 is the key's from the start).
pub fn file_identity(meta: &std::fs::Metadata) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(format!(
            "id:{}:{}:{}:{}:{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            ns(meta.mtime(), meta.mtime_nsec()),
            ns(meta.ctime(), meta.ctime_nsec())
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// The SHA-256 (hex) of a file's content.
pub async fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; signet_protocol::IO_BLOCK];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// How one job's exchange ended.
#[derive(Debug)]
pub enum Answer {
    /// The job's result, its body still streaming.
    Result(Response<Incoming>),
    /// The appliance's error answer.
    Error(ErrorBody),
}

/// One job's way through a restarting appliance.
#[derive(Debug)]
pub struct Collector<'a> {
    pub endpoint: &'a Endpoint,
    pub key: String,
    /// What the lines on stderr name: the file, or "N files".
    pub shown_as: String,
    pub bar: ProgressBar,
    /// How long the appliance may be away before the client gives up.
    pub reconnect_for: Duration,
    /// The job's id, once the appliance has it.
    pub job: Option<String>,
    /// The last time the appliance answered (or the start).
    last_contact: Instant,
    /// The appliance was reached at least once.
    reached: bool,
    /// A line was printed for the outage now going on.
    said: bool,
    pause: Duration,
    /// The connection the job was uploaded on, kept to collect its result.
    conn: client::Connection,
    /// The upload asks for the result in its own answer (no `Prefer: respond-async`).
    at_once: bool,
    /// The `Accept` of the result's `GET`, when not any.
    accept: Option<&'static str>,
    /// Told once the job is queued (its upload answered `202`).
    pub on_queued: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<'a> Collector<'a> {
    pub fn new(
        endpoint: &'a Endpoint,
        key: String,
        shown_as: String,
        bar: ProgressBar,
        reconnect_for: Duration,
    ) -> Self {
        Collector {
            endpoint,
            key,
            shown_as,
            bar,
            reconnect_for,
            job: None,
            last_contact: Instant::now(),
            reached: false,
            said: false,
            pause: FIRST_PAUSE,
            conn: client::Connection::new(endpoint),
            at_once: false,
            accept: None,
            on_queued: None,
        }
    }

    /// Collects the result with `Accept: accept`.
    pub fn accepting(mut self, accept: &'static str) -> Self {
        self.accept = Some(accept);
        self
    }

    /// Has the upload answered with the result itself: for a small body held in
    /// memory, which is cheap to send again if the connection drops meanwhile. The
    /// job's id then comes with the result (or its error).
    pub fn answer_at_once(mut self) -> Self {
        self.at_once = true;
        self
    }

    /// Sends the request `make` builds (again, with the same key, while the appliance
    /// restarts) and collects the job's result.
    pub async fn run<B, F>(&mut self, make: F) -> Result<Answer, ClientError>
    where
        F: Fn() -> Request<B>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        loop {
            let mut req = make();
            // Answered with the job at once, or with its result: then that comes
            // before its end, as the result's `GET` does.
            let prefer = if self.at_once {
                signet_api::wire::EARLY_RESULT
            } else {
                "respond-async"
            };
            req.headers_mut()
                .insert("prefer", http::HeaderValue::from_static(prefer));
            if let Ok(v) = http::HeaderValue::from_str(&self.key) {
                req.headers_mut().insert(IDEMPOTENCY_HEADER, v);
            }
            match self.conn.send(req).await {
                Ok(resp) => {
                    self.contact();
                    if let Some(id) = job_id(&resp) {
                        self.job = Some(id);
                    }
                    if resp.status() == StatusCode::ACCEPTED {
                        if let Some(tell) = self.on_queued.take() {
                            let _ = tell.send(());
                        }
                        // Read to its end, so the connection takes the `GET` next; a
                        // connection that broke here is replaced by a new one.
                        if client::read_answer(self.endpoint, resp).await.is_err() {
                            self.conn.close();
                        }
                        break;
                    }
                    if resp.status().is_success() {
                        // A daemon that does not answer early: this is the result.
                        return Ok(Answer::Result(resp));
                    }
                    let e = client::error_body(self.endpoint, resp).await;
                    if e.code == ErrorCode::ShuttingDown {
                        self.away(&ClientError::Protocol {
                            endpoint: self.endpoint.clone(),
                            detail: e.message,
                        })
                        .await?;
                        continue;
                    }
                    return Ok(Answer::Error(e));
                }
                Err(e) => {
                    // Nothing listening at all on the first try: a wrong endpoint or a
                    // daemon that is not running, said at once.
                    if !self.reached && matches!(e, ClientError::Connect(_)) {
                        return Err(e);
                    }
                    // Connected, then cut off: the daemon was there.
                    self.reached = true;
                    self.away(&e).await?;
                }
            }
        }
        self.collect().await
    }

    /// `GET /v1/jobs/{id}/result`, again while the appliance restarts.
    pub async fn collect(&mut self) -> Result<Answer, ClientError> {
        let Some(id) = self.job.clone() else {
            return Err(ClientError::Protocol {
                endpoint: self.endpoint.clone(),
                detail: "the appliance queued the job without naming it".to_owned(),
            });
        };
        loop {
            // Its bytes as soon as the appliance has them, a small result's with its
            // length: it is written while the appliance commits the job.
            let mut req = Request::get(format!("/v1/jobs/{id}/result"))
                .header("prefer", signet_api::wire::EARLY_RESULT);
            if let Some(accept) = self.accept {
                req = req.header(http::header::ACCEPT, accept);
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| ClientError::Protocol {
                    endpoint: self.endpoint.clone(),
                    detail: e.to_string(),
                })?;
            match self.conn.send(req).await {
                Ok(resp) if resp.status().is_success() => {
                    self.contact();
                    return Ok(Answer::Result(resp));
                }
                Ok(resp) => {
                    self.contact();
                    let e = client::error_body(self.endpoint, resp).await;
                    if e.code != ErrorCode::ShuttingDown {
                        return Ok(Answer::Error(e));
                    }
                    self.away(&ClientError::Protocol {
                        endpoint: self.endpoint.clone(),
                        detail: e.message,
                    })
                    .await?;
                }
                Err(e) => self.away(&e).await?,
            }
        }
    }

    /// Whether the result may be collected again after its download broke off.
    pub fn may_retry(&self) -> bool {
        self.job.is_some() && self.last_contact.elapsed() < self.reconnect_for
    }

    fn contact(&mut self) {
        self.reached = true;
        self.last_contact = Instant::now();
        self.pause = FIRST_PAUSE;
        if self.said {
            self.said = false;
            self.bar.set_message("signing on the token");
        }
    }

    /// The appliance is away: waits a little, or gives up with `e` once it has been
    /// away longer than the reconnect time.
    pub async fn away(&mut self, e: &ClientError) -> Result<(), ClientError> {
        let msg = match &self.job {
            Some(id) => format!("appliance restarting; job {id} stays queued"),
            None => "appliance restarting; sending again".to_owned(),
        };
        self.pause_then(msg, e).await
    }

    /// The signed file broke off before its end (the job did not end signed with it,
    /// or the connection broke): nothing of it is kept; waits a little before the job's
    /// result is collected again, as [`Self::away`] does.
    pub async fn broke_off(&mut self, e: &ClientError) -> Result<(), ClientError> {
        let msg = match &self.job {
            Some(id) => format!("the signed file broke off; collecting job {id} again"),
            None => "the signed file broke off; sending again".to_owned(),
        };
        self.pause_then(msg, e).await
    }

    async fn pause_then(&mut self, msg: String, e: &ClientError) -> Result<(), ClientError> {
        // The next try connects anew.
        self.conn.close();
        if self.last_contact.elapsed() >= self.reconnect_for {
            return Err(clone_error(self.endpoint, e));
        }
        if !self.said {
            self.said = true;
            self.bar.set_message(msg.clone());
            if self.bar.is_hidden() || !std::io::stderr().is_terminal() {
                eprintln!(
                    "signet: {}: {msg}, waiting up to {} s for it ({e})",
                    self.shown_as,
                    self.reconnect_for.as_secs()
                );
            }
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        Ok(())
    }
}

fn job_id(resp: &Response<Incoming>) -> Option<String> {
    resp.headers()
        .get(JOB_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `ClientError` holds sources that cannot be cloned; the error given up on is told
/// as the connection's failure.
fn clone_error(endpoint: &Endpoint, e: &ClientError) -> ClientError {
    ClientError::Protocol {
        endpoint: endpoint.clone(),
        detail: format!("the appliance stayed away: {e}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_key_follows_what_is_asked_and_nothing_else() {
        let q = SignQuery {
            profile: Some("release".into()),
            ..SignQuery::default()
        };
        let files = [("a.exe".to_owned(), "aa".to_owned())];
        let k = idempotency_key("sign", &q, &files);
        assert_eq!(k, idempotency_key("sign", &q, &files), "a re-run finds it");
        assert!(k.starts_with("signet1-") && k.len() == 8 + 64, "{k}");
        assert!(k.bytes().all(|b| b.is_ascii_graphic()));
        let other = SignQuery {
            profile: Some("nested".into()),
            ..SignQuery::default()
        };
        assert_ne!(k, idempotency_key("sign", &other, &files));
        assert_ne!(k, idempotency_key("batch", &q, &files));
        assert_ne!(
            k,
            idempotency_key("sign", &q, &[("a.exe".to_owned(), "ab".to_owned())])
        );
        assert_ne!(
            k,
            idempotency_key("sign", &q, &[("b.exe".to_owned(), "aa".to_owned())])
        );
    }

    /// A fake appliance on a unix socket: answers each request as `answers` says, in
    /// turn, and hands back each request's head (lower-cased) as it was read.
    pub(crate) fn appliance(
        dir: &std::path::Path,
        answers: &'static [&'static str],
    ) -> (Endpoint, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let path = dir.join("signetd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let accept = || {
                let (conn, _) = listener.accept().unwrap();
                (BufReader::new(conn.try_clone().unwrap()), conn)
            };
            let (mut reader, mut out) = accept();
            let mut heads = Vec::new();
            for answer in answers {
                let mut head = String::new();
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 {
                        // The client closed this connection: the request comes on a new one.
                        (reader, out) = accept();
                        continue;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    head.push_str(&lower);
                }
                let mut body = vec![0u8; len];
                std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                if head.contains("transfer-encoding: chunked") {
                    // Chunks up to the last (empty) one and the blank line after it.
                    let mut line = String::new();
                    while line != "0\r\n" {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                    }
                    reader.read_line(&mut line).unwrap();
                }
                heads.push(head);
                out.write_all(answer.as_bytes()).unwrap();
            }
            heads
        });
        (Endpoint::Unix(path), server)
    }

    fn upload() -> Request<http_body_util::Full<Bytes>> {
        let mut req = Request::new(http_body_util::Full::new(Bytes::from_static(b"data")));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = "/v1/sign?profile=release".parse().unwrap();
        req
    }

    async fn body_of(answer: Answer) -> Vec<u8> {
        use http_body_util::BodyExt;
        match answer {
            Answer::Result(r) => r.into_body().collect().await.unwrap().to_bytes().to_vec(),
            Answer::Error(e) => panic!("an error: {e:?}"),
        }
    }

    /// A small body in memory is answered with its result in one request; any other
    /// upload asks to be answered early and collects the result with a `GET` on the
    /// same connection.
    #[tokio::test]
    async fn a_small_body_is_answered_at_once_and_a_file_collected_after_its_upload() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, server) = appliance(
            dir.path(),
            &["HTTP/1.1 200 OK\r\nx-signet-job: 7\r\ncontent-length: 3\r\n\r\nsig"],
        );
        let bar = ProgressBar::hidden();
        let mut c = Collector::new(&ep, "k".into(), "a.exe".into(), bar.clone(), Duration::ZERO)
            .answer_at_once();
        let answer = c.run(upload).await.unwrap();
        assert_eq!(body_of(answer).await, b"sig");
        assert_eq!(
            c.job.as_deref(),
            Some("7"),
            "the job's id comes with the result"
        );
        let heads = server.join().unwrap();
        assert_eq!(heads.len(), 1);
        assert!(heads[0].starts_with("post /v1/sign"), "{}", heads[0]);
        assert!(heads[0].contains("prefer: early-result"), "{}", heads[0]);
        assert!(!heads[0].contains("respond-async"), "{}", heads[0]);
        assert!(heads[0].contains("idempotency-key: k"), "{}", heads[0]);

        let dir = tempfile::tempdir().unwrap();
        let (ep, server) = appliance(
            dir.path(),
            &[
                "HTTP/1.1 202 Accepted\r\nx-signet-job: 8\r\ncontent-length: 2\r\n\r\n{}",
                "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfile",
            ],
        );
        let mut c = Collector::new(&ep, "k".into(), "a.exe".into(), bar, Duration::ZERO);
        let answer = c.run(upload).await.unwrap();
        assert_eq!(body_of(answer).await, b"file");
        let heads = server.join().unwrap();
        assert!(heads[0].contains("prefer: respond-async"), "{}", heads[0]);
        assert!(
            heads[1].starts_with("get /v1/jobs/8/result"),
            "{}",
            heads[1]
        );
        assert!(heads[1].contains("prefer: early-result"), "{}", heads[1]);
    }

    #[cfg(unix)]
    #[test]
    fn a_files_identity_changes_with_every_write_and_not_with_reading() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.exe");
        std::fs::write(&path, b"MZ first").unwrap();
        let id = |p: &std::path::Path| file_identity(&std::fs::metadata(p).unwrap()).unwrap();
        let first = id(&path);
        assert!(first.starts_with("id:"), "{first}");
        let _ = std::fs::read(&path).unwrap();
        assert_eq!(first, id(&path), "reading changes nothing");
        // Written again, same size, its times set back: the change time still moves.
        let times = std::fs::metadata(&path).unwrap();
        let (atime, mtime) = (times.accessed().unwrap(), times.modified().unwrap());
        // The file system's clock ticks coarser than a write: past its tick first.
        use std::os::unix::fs::MetadataExt;
        let ctime = |p: &std::path::Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.ctime(), m.ctime_nsec())
        };
        let probe = dir.path().join("probe");
        loop {
            std::fs::write(&probe, b"").unwrap();
            if ctime(&probe) != ctime(&path) {
                break;
            }
            std::thread::yield_now();
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"MZ other").unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_accessed(atime)
                .set_modified(mtime),
        )
        .unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_ne!(first, id(&path), "the change time is not set back");
        // Another file of the same content and times: another inode.
        let copy = dir.path().join("b.exe");
        std::fs::copy(&path, &copy).unwrap();
        assert_ne!(id(&path), id(&copy));
    }
}
