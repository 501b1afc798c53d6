//! The world of the end-to-end tests (`signet-tests`): a SoftHSM token per test, the real
//! `signet-agent`, `signetd` and `signet` binaries as child processes, readiness
//! through the systemd notify protocol, and cleanup of every child on drop.
//!
//! The binaries come from the workspace's target directory; `make test` builds them
//! before the tests run.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use signet_protocol::Endpoint;

/// SoftHSM's PKCS#11 module.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// OpenSC's PKCS#11 call logger.
pub const PKCS11_SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";
/// The PIN of the fixture token.
pub const PIN: &str = "123456";
/// The label of the fixture token.
pub const TOKEN_LABEL: &str = "signet-demo";
/// How long a child may take to say it is ready before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Path of a workspace binary in the target directory the tests were built into.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/e2e-<hash>
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        path.display()
    );
    path
}

/// A token made once per test process; each test gets its own copy.
/// The audit log of the signetd configured by `config`, as `signetd audit export`
/// writes it: one JSON record per line.
pub fn audit_export(config: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(bin("signetd"))
        .arg("--config")
        .arg(config)
        .args(["audit", "export"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "signetd audit export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Directories removed when the test process ends: what a `static` holds (the
/// master token, a `World` a file's tests share) is never dropped.
static REMOVE_AT_EXIT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes `dir` (and what is in it) when the process exits, as the test harness ends
/// (a return from `main` or `exit`; not a kill).
pub fn remove_at_exit(dir: PathBuf) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn remove_all() {
        let dirs = std::mem::take(
            &mut *REMOVE_AT_EXIT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    REGISTER.call_once(|| {
        // SAFETY: `remove_all` is a plain `extern "C" fn()` that never unwinds (a
        // poisoned lock is taken as it is, removal errors are ignored); `atexit` only
        // stores the pointer.
        #[allow(unsafe_code)]
        let failed = unsafe { libc::atexit(remove_all) } != 0;
        assert!(!failed, "atexit refused a handler");
    });
    REMOVE_AT_EXIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(dir);
}

fn master_token() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("signet-master-token-")
            .tempdir()
            .unwrap()
            .keep();
        remove_at_exit(dir.clone());
        let out = Command::new("bash")
            .arg(repo_root().join("tests/fixtures/make-token.sh"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-token.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// One test's world: a temp dir with its own copy of the token, and the children it
/// started (stopped on drop).
#[derive(Debug)]
pub struct World {
    pub dir: tempfile::TempDir,
    /// The bus `signetd` serves its D-Bus front on; `None`: no bus (tests never touch
    /// the machine's own buses).
    pub dbus: Option<String>,
    children: Vec<(String, Child)>,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("signet-test-")
            .tempdir()
            .unwrap();
        let master = master_token();
        let status = Command::new("cp")
            .arg("-a")
            .arg(master.join("tokens"))
            .arg(dir.path().join("tokens"))
            .status()
            .unwrap();
        assert!(status.success());
        for f in ["cert.pem", "pin", "hello.exe", "token-serial"] {
            std::fs::copy(master.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().display()
            ),
        )
        .unwrap();
        World {
            dir,
            dbus: None,
            children: Vec::new(),
        }
    }

    /// This world, for a `static` that the tests of one file share (never dropped):
    /// its directory is removed when the process exits. It must start no children
    /// (nothing would stop them).
    pub fn shared_for_the_process(self) -> Self {
        assert!(
            self.children.is_empty(),
            "a shared world starts no children"
        );
        remove_at_exit(self.dir.path().to_owned());
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn softhsm_conf(&self) -> PathBuf {
        self.path("softhsm2.conf")
    }

    /// A fresh copy of the fixture PE under `name`.
    pub fn pe(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::copy(self.path("hello.exe"), &p).unwrap();
        p
    }

    /// Writes the agent's configuration and starts it; returns the endpoint it serves.
    pub fn start_agent(
        &mut self,
        listen: &str,
        module: &str,
        pin_file: &Path,
        envs: &[(&str, &str)],
    ) -> Endpoint {
        self.start_agent_with(listen, module, pin_file, envs, "")
    }

    /// Like [`World::start_agent`], with `extra` appended to the configuration (after
    /// the `[token]` table, so it may open tables of its own).
    pub fn start_agent_with(
        &mut self,
        listen: &str,
        module: &str,
        pin_file: &Path,
        envs: &[(&str, &str)],
        extra: &str,
    ) -> Endpoint {
        self.start_agent_config(listen, module, Some(pin_file), envs, extra)
    }

    /// Like [`World::start_agent_with`]; without a PIN file the agent waits for the
    /// host to send the PIN.
    pub fn start_agent_config(
        &mut self,
        listen: &str,
        module: &str,
        pin_file: Option<&Path>,
        envs: &[(&str, &str)],
        extra: &str,
    ) -> Endpoint {
        self.start_agent_under(&[], listen, module, pin_file, envs, extra)
    }

    /// Like [`World::start_agent_config`], with `signet-agent` started by `wrapper` (a
    /// program and its arguments), which must pass on its environment and stop the
    /// agent when it gets SIGTERM.
    pub fn start_agent_under(
        &mut self,
        wrapper: &[&std::ffi::OsStr],
        listen: &str,
        module: &str,
        pin_file: Option<&Path>,
        envs: &[(&str, &str)],
        extra: &str,
    ) -> Endpoint {
        let cfg = self.path("agent.toml");
        let pin_line = pin_file
            .map(|p| format!("pin_file = \"{}\"\n", p.display()))
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{listen}\"\nspool_dir = \"{}\"\nstate_dir = \"{}\"\n[token]\nmodule = \"{module}\"\nlabel = \"{TOKEN_LABEL}\"\n{pin_line}{extra}",
                self.dir.path().display(),
                self.path("agent-state").display(),
            ),
        )
        .unwrap();
        let agent = bin("signet-agent");
        let mut argv: Vec<&std::ffi::OsStr> = wrapper.to_vec();
        argv.push(agent.as_os_str());
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(&cfg)
            .env("SOFTHSM2_CONF", self.softhsm_conf());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let endpoint = self.spawn_ready("signet-agent", cmd).remove(0);
        self.pair_agent(&endpoint);
        endpoint
    }

    /// Pairs the agent at `agent` with this world's host key (`signetd`'s, in the
    /// `state` directory), the operator's way: `signet-agent pair` shows a one-time
    /// code, which the host's side of pairing (`signetd pair`'s code) proves it knows.
    /// From then on this test process reaches `agent` through the link, as signetd does.
    pub fn pair_agent(&self, agent: &Endpoint) {
        let out = Command::new(bin("signet-agent"))
            .arg("--config")
            .arg(self.path("agent.toml"))
            .args(["pair", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "signet-agent pair: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let link = std::sync::Arc::new(
            signet_protocol::link::HostLink::open(&self.path("state")).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let agent_key = rt
            .block_on(signet_protocol::pairing::pair(
                &link,
                agent,
                shown["code"].as_str().unwrap(),
            ))
            .unwrap();
        assert_eq!(
            agent_key.to_string(),
            shown["fingerprint"].as_str().unwrap()
        );
        signet_protocol::link::register(agent.clone(), link);
    }

    /// Writes the daemon's configuration and starts it; returns the endpoints it serves.
    pub fn start_daemon(&mut self, listen: &[&str], agent: &Endpoint) -> Vec<Endpoint> {
        self.start_daemon_with(
            listen,
            agent,
            "[profiles.release]\ndescription = \"Signet test\"\n",
        )
    }

    /// Like [`World::start_daemon`], with `profiles` (TOML: `default_profile` and
    /// `[profiles.NAME]` tables) instead of the one "release" profile. Local root and
    /// plain loopback TCP callers (taken for client "loopback") may use every profile.
    pub fn start_daemon_with(
        &mut self,
        listen: &[&str],
        agent: &Endpoint,
        profiles: &str,
    ) -> Vec<Endpoint> {
        let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
        self.start_daemon_config(&format!(
            "listen = [{}]\nagent = \"{agent}\"\ndbus = \"{}\"\ninsecure_tcp_as = \"loopback\"\n{profiles}\n\
             [[grants]]\ncallers = [\"uid:0\", \"client:loopback\"]\nprofiles = [\"*\"]\n",
            listen.join(", "),
            self.dbus.as_deref().unwrap_or("none")
        ))
    }

    /// Starts the daemon with `config` as its whole `signetd.toml`; a `state_dir` in
    /// the test's directory is added when the config names none.
    pub fn start_daemon_config(&mut self, config: &str) -> Vec<Endpoint> {
        self.write_daemon_config(config);
        self.restart_daemon()
    }

    /// Writes `config` as `signetd.toml` (with a `state_dir` in the test's directory
    /// unless it names one, and metrics on a free loopback port unless it has a
    /// `[metrics]`: tests running at once do not meet on the default port), for
    /// [`World::restart_daemon`] and [`World::restart_daemon_under`].
    pub fn write_daemon_config(&self, config: &str) {
        let mut config = if config.contains("state_dir") {
            config.to_owned()
        } else {
            format!("state_dir = \"{}\"\n{config}", self.path("state").display())
        };
        if !config.contains("[metrics]") {
            config.push_str("\n[metrics]\nlisten = [\"tcp:127.0.0.1:0\"]\n");
        }
        std::fs::write(self.path("signetd.toml"), config).unwrap();
    }

    /// Starts `signetd` again with the configuration the last `start_daemon*` wrote
    /// (same state directory, same endpoints when they are unix sockets).
    pub fn restart_daemon(&mut self) -> Vec<Endpoint> {
        self.restart_daemon_under(&[])
    }

    /// Like [`World::restart_daemon`], with `signetd` started by `wrapper` (a program
    /// and its arguments, e.g. a umockdev testbed), which must pass on its environment
    /// and stop `signetd` when it gets SIGTERM.
    pub fn restart_daemon_under(&mut self, wrapper: &[&std::ffi::OsStr]) -> Vec<Endpoint> {
        self.carry_link_key();
        let signetd = bin("signetd");
        let mut argv: Vec<&std::ffi::OsStr> = wrapper.to_vec();
        argv.push(signetd.as_os_str());
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(self.path("signetd.toml"));
        self.spawn_ready("signetd", cmd)
    }

    /// A configuration with a `state_dir` of its own gets this world's host key and
    /// pairing there (as if the host's state had moved), so it reaches the agent
    /// [`World::pair_agent`] paired.
    fn carry_link_key(&self) {
        let config = std::fs::read_to_string(self.path("signetd.toml")).unwrap_or_default();
        let Some(dir) = config.lines().find_map(|l| {
            let v = l
                .trim()
                .strip_prefix("state_dir")?
                .trim()
                .strip_prefix('=')?;
            Some(PathBuf::from(v.trim().trim_matches('"')))
        }) else {
            return;
        };
        let home = self.path("state");
        if dir == home || dir.join(signet_protocol::link::KEY_FILE).exists() {
            return;
        }
        for f in [
            signet_protocol::link::KEY_FILE,
            signet_protocol::link::CERT_FILE,
            signet_protocol::link::AGENT_PIN_FILE,
        ] {
            if home.join(f).exists() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::copy(home.join(f), dir.join(f)).unwrap();
            }
        }
    }

    /// Runs `signetd SUBCOMMAND...` against the configuration `start_daemon*` wrote.
    pub fn signetd(&self, args: &[&str]) -> Output {
        Command::new(bin("signetd"))
            .arg("--config")
            .arg(self.path("signetd.toml"))
            .args(args)
            .output()
            .unwrap()
    }

    /// The audit log as `signetd audit export` writes it: one JSON record per line.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        audit_export(&self.path("signetd.toml"))
    }

    /// Kills a child by name with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `cmd` and waits for its systemd readiness notification; returns the
    /// endpoints its `STATUS=listening on ...` line names.
    fn spawn_ready(&mut self, name: &str, mut cmd: Command) -> Vec<Endpoint> {
        let sock_path = self.path(&format!("{name}.notify"));
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        // Logs to the file below, also when the tests run under systemd (a CI
        // runner's unit): a daemon started by systemd logs to the journal.
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .env_remove("INVOCATION_ID")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        self.children.push((name.to_owned(), child));
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if msg.lines().any(|l| l == "READY=1") {
                        let endpoints = msg
                            .lines()
                            .find_map(|l| l.strip_prefix("STATUS=listening on "))
                            .unwrap_or_default()
                            .split(' ')
                            .filter(|s| !s.is_empty())
                            .map(|s| s.parse().unwrap())
                            .collect();
                        return endpoints;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            let (_, child) = self.children.last_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{name} exited before it was ready ({status}); its log:\n{}",
                    self.log(name)
                );
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "{name} not ready after {READY_TIMEOUT:?}; its log:\n{}",
                self.log(name)
            );
        }
    }

    /// The URL of the running daemon's metrics (`http://127.0.0.1:PORT/metrics`), from
    /// the endpoint it logs before it says it is ready.
    pub fn metrics_url(&self) -> String {
        let log = self.log("signetd");
        let ep = log
            .lines()
            .rev()
            .find_map(|l| l.split("serving metrics endpoint=").nth(1))
            .unwrap_or_else(|| panic!("the metrics' endpoint in the log:\n{log}"))
            .trim();
        let Ok(Endpoint::Tcp { host, port }) = ep.parse::<Endpoint>() else {
            panic!("not a TCP endpoint: {ep}")
        };
        format!("http://{host}:{port}/metrics")
    }

    /// The log of a child started by this world.
    pub fn log(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.path(&format!("{name}.log"))) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends SIGTERM to a child by name and waits up to `within` for it to exit;
    /// answers its exit status, or `None` when it had not exited by then (it is killed).
    pub fn sigterm(&mut self, name: &str, within: Duration) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|(n, _)| n == name)?;
        let (_, mut child) = self.children.remove(i);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Sends SIGHUP to a child by name (`systemctl reload`), without waiting.
    pub fn hangup(&self, name: &str) {
        let (_, child) = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no child named {name}"));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// Stops a child by name (SIGTERM, then waits).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            terminate(&mut child);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            terminate(child);
        }
    }
}

fn terminate(child: &mut Child) {
    // SIGTERM for a clean stop; SIGKILL if it does not stop in time.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The test's token directory going away (as a token does when it is unplugged or an
/// RDP session grabs it) and coming back.
#[derive(Debug)]
pub struct TokenDir {
    here: PathBuf,
    away: PathBuf,
}

impl TokenDir {
    pub fn of(w: &World) -> Self {
        TokenDir {
            here: w.path("tokens"),
            away: w.path("tokens.away"),
        }
    }

    pub fn vanish(&self) {
        std::fs::rename(&self.here, &self.away).unwrap();
    }

    pub fn restore(&self) {
        std::fs::rename(&self.away, &self.here).unwrap();
    }
}

/// An osslsigncode that holds its first signing run until the test releases it, so a
/// job stays at the agent for as long as the test needs: give the agent
/// `[signer] backend = "osslsigncode"`, `osslsigncode = "<program>"`
/// ([`HeldSigner::agent_config`]; the native engine runs no program to hold).
#[derive(Debug)]
pub struct HeldSigner {
    pub program: PathBuf,
    /// Exists once the first run is being held.
    pub held: PathBuf,
    release: PathBuf,
}

impl HeldSigner {
    pub fn new(w: &World) -> Self {
        let (program, held, release) = (
            w.path("osslsigncode-held"),
            w.path("held"),
            w.path("release"),
        );
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\nif [ \"$1\" = sign ] && [ ! -e '{h}' ]; then : > '{h}'; while [ ! -e '{r}' ]; do sleep 0.05; done; fi\nexec osslsigncode \"$@\"\n",
                h = held.display(),
                r = release.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        HeldSigner {
            program,
            held,
            release,
        }
    }

    /// The agent's configuration that uses this signer (the osslsigncode backend).
    pub fn agent_config(&self) -> String {
        format!(
            "[signer]\nbackend = \"osslsigncode\"\nosslsigncode = \"{}\"\n",
            self.program.display()
        )
    }

    /// Lets the held run (and every later one) go on.
    pub fn release(&self) {
        std::fs::write(&self.release, b"").unwrap();
    }
}

/// Runs the `signet` client against `endpoint`.
pub fn signet(endpoint: &Endpoint, args: &[&str]) -> Output {
    Command::new(bin("signet"))
        .env("SIGNET_ENDPOINT", endpoint.to_string())
        .env_remove("SIGNET_CONFIG")
        // Each run asks for the profile: no test reads what another one left in the
        // user's cache (the cache has its own test).
        .env("SIGNET_PROFILE_CACHE", "off")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `osslsigncode verify` of `file` against the fixture certificate; true when it passes.
pub fn verify(world: &World, file: &Path) -> (bool, String) {
    verify_with(world, file, &[])
}

/// [`verify`] with more `osslsigncode verify` arguments (e.g. `-TSA-CAfile`).
pub fn verify_with(world: &World, file: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new("osslsigncode")
        .arg("verify")
        .arg("-CAfile")
        .arg(world.path("cert.pem"))
        .args(extra)
        .arg("-in")
        .arg(file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("Succeeded"), text)
}

/// Runs a script from `tests/fixtures/` with `args`; panics with its stderr when it fails.
pub fn fixture(script: &str, args: &[&Path]) {
    let out = Command::new("bash")
        .arg(repo_root().join("tests/fixtures").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl World {
    /// A Windows Installer package (wixl) holding the fixture PE, under `name`.
    pub fn msi(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fixture("make-msi.sh", &[&p, &self.path("hello.exe")]);
        p
    }

    /// A cabinet archive (gcab) holding the fixture PE and certificate, under `name`.
    pub fn cab(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fixture(
            "make-cab.sh",
            &[&p, &self.path("hello.exe"), &self.path("cert.pem")],
        );
        p
    }

    /// An unsigned security catalog listing the fixture PE and certificate, under `name`.
    pub fn cat(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fixture(
            "make-cat.sh",
            &[&p, &self.path("hello.exe"), &self.path("cert.pem")],
        );
        p
    }

    /// An unsigned APPX/MSIX package (`bundle` false) or bundle, under `name`.
    pub fn appx(&self, name: &str, bundle: bool) -> PathBuf {
        let p = self.path(name);
        let kind = Path::new(if bundle { "bundle" } else { "package" });
        fixture("make-appx.sh", &[&p, kind]);
        p
    }

    /// A file under `name` with `bytes` in it.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// A URL on loopback where nothing listens: connections to it are refused.
pub fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/")
}

/// A server on loopback that accepts connections and never answers.
#[derive(Debug)]
pub struct SilentServer {
    _listener: std::net::TcpListener,
    pub url: String,
}

impl SilentServer {
    pub fn start() -> Self {
        // The kernel completes connections into the backlog; nobody ever reads them.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        );
        SilentServer {
            _listener: listener,
            url,
        }
    }
}

/// A real RFC 3161 time-stamping authority on loopback: an HTTP server in this test
/// process that answers `application/timestamp-query` POSTs with `openssl ts -reply`
/// (key and certificate from `tests/fixtures/make-tsa.sh`). Stopped on drop.
#[derive(Debug)]
pub struct Tsa {
    pub url: String,
    /// The TSA's certificate, the trust anchor for `verify -TSA-CAfile`.
    pub cert: PathBuf,
    replies: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tsa {
    /// Makes a TSA in `dir` and starts serving it on 127.0.0.1, on a free port.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        fixture("make-tsa.sh", &[dir]);
        let replies = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let state = TsaState {
            dir: dir.to_owned(),
            replies: replies.clone(),
            one_at_a_time: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new()
                    .route("/", axum::routing::post(tsa_reply))
                    .with_state(state);
                tokio::select! {
                    r = axum::serve(listener, app) => r.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        let addr = addr_rx.recv().unwrap();
        Tsa {
            url: format!("http://{addr}/"),
            cert: dir.join("tsa.pem"),
            replies,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// How many timestamps it has handed out.
    pub fn replies(&self) -> usize {
        self.replies.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Tsa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TLS listener on loopback in front of an HTTP server (a [`Tsa`]): each connection's
/// TLS is ended here with `cert` and `key` (PEM) and its bytes passed on to `upstream`
/// (`http://HOST:PORT/`). Counts the connections it accepted. Stopped on drop.
#[derive(Debug)]
pub struct TlsFront {
    /// `https://127.0.0.1:PORT/`.
    pub url: String,
    pub port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsFront {
    pub fn start(upstream: &str, cert: &Path, key: &Path) -> Self {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                        tokio::spawn(async move {
                            // A client that refuses the certificate ends it here.
                            let Ok(mut tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        TlsFront {
            url: format!("https://127.0.0.1:{port}/"),
            port,
            connections,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone)]
struct TsaState {
    dir: PathBuf,
    replies: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// `openssl ts -reply` keeps its serial number in a file.
    one_at_a_time: std::sync::Arc<tokio::sync::Mutex<()>>,
}

async fn tsa_reply(
    axum::extract::State(tsa): axum::extract::State<TsaState>,
    headers: http::HeaderMap,
    query: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if headers
        .get(http::header::CONTENT_TYPE)
        .is_none_or(|v| v != "application/timestamp-query")
    {
        return (
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send application/timestamp-query",
        )
            .into_response();
    }
    let _one = tsa.one_at_a_time.lock().await;
    let work = tempfile::tempdir_in(&tsa.dir).unwrap();
    let (q, r) = (work.path().join("q.tsq"), work.path().join("r.tsr"));
    std::fs::write(&q, &query).unwrap();
    let out = tokio::process::Command::new("openssl")
        .args(["ts", "-reply", "-config"])
        .arg(tsa.dir.join("ts.cnf"))
        .arg("-queryfile")
        .arg(&q)
        .arg("-out")
        .arg(&r)
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        return (
            http::StatusCode::BAD_REQUEST,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
            .into_response();
    }
    tsa.replies
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    (
        [(http::header::CONTENT_TYPE, "application/timestamp-reply")],
        std::fs::read(&r).unwrap(),
    )
        .into_response()
}

/// One HTTP call with a JSON (or empty) body; answers the status and the JSON body
/// (`Null` when the body is not JSON).
pub fn call_json(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    call(endpoint, method, path, body)
}

/// One HTTP call with a raw body; answers the status and the JSON body.
pub fn call(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    call_as(endpoint, method, path, None, body)
}

/// [`call`] with a `Content-Type`.
pub fn call_as(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(Full::new(bytes::Bytes::from(body))).unwrap();
        let resp = signet_protocol::client::send(endpoint, req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    })
}

/// How long a test waits for an event the agent should send, before it fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent's event stream (`GET /agent/v1/events`), read on a thread of its own.
#[derive(Debug)]
pub struct Events {
    rx: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every event received so far, for failure messages.
    pub seen: Vec<serde_json::Value>,
}

impl Events {
    /// Subscribes; returns once the agent has answered, so every event after this
    /// call is received.
    pub fn follow(agent: &Endpoint) -> Events {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let agent = agent.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use http_body_util::BodyExt;
                let req = http::Request::get("/agent/v1/events")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let resp = signet_protocol::client::send(&agent, req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = ready_tx.send(());
                let mut body = resp.into_body();
                let mut buf = String::new();
                while let Some(Ok(frame)) = body.frame().await {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buf.push_str(&String::from_utf8_lossy(&data));
                    while let Some(end) = buf.find("\n\n") {
                        let block: String = buf.drain(..end + 2).collect();
                        let data: String = block
                            .lines()
                            .filter_map(|l| l.strip_prefix("data:"))
                            .map(str::trim_start)
                            .collect();
                        if let Ok(v) = serde_json::from_str(&data) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(READY_TIMEOUT)
            .expect("the agent's event stream did not answer");
        Events {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next event of type `kind`, skipping others; fails the test after
    /// [`EVENT_TIMEOUT`].
    pub fn wait_for(&mut self, kind: &str) -> serde_json::Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if e["type"] == kind {
                        return e;
                    }
                }
                Err(_) => panic!(
                    "no {kind} event within {EVENT_TIMEOUT:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// The next event, whatever it is.
    pub fn next_event(&mut self) -> serde_json::Value {
        match self.rx.recv_timeout(EVENT_TIMEOUT) {
            Ok(e) => {
                self.seen.push(e.clone());
                e
            }
            Err(_) => panic!("no event within {EVENT_TIMEOUT:?}; seen: {:#?}", self.seen),
        }
    }
}

/// Counts PKCS#11 `C_Login` calls in a pkcs11-spy log.
pub fn count_logins(spy_log: &Path) -> usize {
    std::fs::read_to_string(spy_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(": C_Login"))
        .count()
}

/// A test CA and a server certificate for 127.0.0.1 it issued (rustls, rightly, does
/// not accept a CA certificate as a server's own), in `dir`: answers the CA's, the
/// certificate's and the key's paths.
pub fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(
            r#"cd "$1"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=Signet Test CA" -keyout tls-ca-key.pem -out tls-ca.pem
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout tls-key.pem -out tls.csr
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > tls.ext
openssl x509 -req -in tls.csr -CA tls-ca.pem -CAkey tls-ca-key.pem -CAcreateserial -days 1 -extfile tls.ext -out tls-cert.pem"#,
        )
        .arg("make-tls")
        .arg(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("tls-ca.pem"),
        dir.join("tls-cert.pem"),
        dir.join("tls-key.pem"),
    )
}

/// `POST /v1/sign?filename=NAME` with `Prefer: respond-async`: the job's id.
pub fn sign_async(ep: &Endpoint, name: &str, pe: &[u8]) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let req = http::Request::post(format!("/v1/sign?filename={name}"))
            .header("prefer", "respond-async")
            .body(http_body_util::Full::new(bytes::Bytes::from(pe.to_vec())))
            .unwrap();
        let resp = signet_protocol::client::send(ep, req).await.unwrap();
        assert_eq!(resp.status(), 202);
        resp.headers()["x-signet-job"].to_str().unwrap().to_owned()
    })
}

/// `GET path` of an answer that is a file or an error: the status and the body.
pub fn fetch(ep: &Endpoint, path: &str) -> (u16, Vec<u8>) {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let req = http::Request::get(path)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = signet_protocol::client::send(ep, req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    })
}

/// How long [`wait_until`] waits before it fails.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Polls `cond` until it holds, or fails naming `what` (a condition, not a timer).
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    wait_until_within(what, WAIT_TIMEOUT, Duration::from_millis(20), cond);
}

/// [`wait_until`] with its own deadline and polling interval (for conditions that cost
/// something to ask, like a guest under TCG); answers how long it took.
pub fn wait_until_within(
    what: &str,
    timeout: Duration,
    every: Duration,
    cond: impl Fn() -> bool,
) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "never happened within {timeout:?}: {what}"
        );
        std::thread::sleep(every);
    }
    started.elapsed()
}

/// The door of a umockdev testbed around `signetd` (`tests/fixtures/umockdev-driver.py`):
/// plugs and unplugs fake SafeNet tokens when the test asks, and can crash `signetd`.
#[derive(Debug)]
pub struct Testbed(std::io::BufReader<std::os::unix::net::UnixStream>);

impl Testbed {
    /// Starts `signetd` (with the configuration `w` holds) inside a fresh testbed whose
    /// door is `w`'s `testbed.sock`; answers its first endpoint and the door.
    pub fn start_daemon(w: &mut World) -> (Endpoint, Testbed) {
        let sock = w.path("testbed.sock");
        let _ = std::fs::remove_file(&sock);
        let driver = repo_root().join("tests/fixtures/umockdev-driver.py");
        let ep = w
            .restart_daemon_under(&[
                "umockdev-wrapper".as_ref(),
                "/usr/bin/python3".as_ref(),
                driver.as_os_str(),
                sock.as_os_str(),
            ])
            .remove(0);
        let door = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        (ep, Testbed(std::io::BufReader::new(door)))
    }

    /// One request (`add PORT DEVNUM SERIAL`, `remove PORT`, `crash`, `hangup`: SIGHUP to
    /// `signetd`), answered "ok".
    pub fn ask(&mut self, line: &str) {
        use std::io::{BufRead, Write};
        let s = self.0.get_mut();
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
        let mut answer = String::new();
        self.0.read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), "ok", "testbed: {line}");
    }
}

/// `signet sign FILE` on a pseudo-terminal (`script`), as a person at a terminal runs
/// it: the progress line shows after 0 ms and the status is asked every 100 ms. The
/// screen is read from `script`'s typescript; the process is killed if still running
/// when this is dropped.
#[derive(Debug)]
pub struct OnTerminal {
    child: Child,
    typescript: PathBuf,
}

impl OnTerminal {
    pub fn sign(w: &World, endpoint: &impl std::fmt::Display, file: &Path) -> Self {
        let typescript = w.path("typescript");
        let cmd = format!("{} sign {}", bin("signet").display(), file.display());
        let child = Command::new("script")
            .args(["-qfec", &cmd])
            .arg(&typescript)
            .env("SIGNET_ENDPOINT", endpoint.to_string())
            .env("SIGNET_PROGRESS_AFTER_MS", "0")
            .env("SIGNET_STATUS_EVERY_MS", "100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("script (bsdutils) runs signet on a pseudo-terminal");
        OnTerminal { child, typescript }
    }

    /// What the terminal showed so far.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.typescript).unwrap_or_default()).into_owned()
    }

    /// Waits for `signet` to end; whether it succeeded.
    pub fn success(&mut self) -> bool {
        let child = std::cell::RefCell::new(&mut self.child);
        wait_until("signet on the terminal is done", || {
            child.borrow_mut().try_wait().unwrap().is_some()
        });
        let ok = child.borrow_mut().wait().unwrap().success();
        ok
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
