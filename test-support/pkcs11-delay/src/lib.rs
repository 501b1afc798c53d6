//! A PKCS#11 module of the tests' own that stands in front of a real one (SoftHSM)
//! and makes it behave, in time, like a real token: `C_Sign`, `C_SignFinal` and
//! `C_Login` wait a configured number of milliseconds before they are forwarded, and
//! one token operation runs at a time across every process that loads the shim (an
//! `flock` on a lock file), as one USB token signs one thing at a time. Every call
//! of `C_Initialize`, `C_OpenSession`, `C_Login`, `C_SignInit`, `C_Sign` and
//! `C_SignFinal` is appended to a log, one line per call, so a benchmark can count
//! logins per job and measure how busy the token was ([`log`]).
//!
//! Never shipped: no package installs it (debian/rules and packaging/ name their
//! binaries one by one).
//!
//! Settings, from the environment, else from the file `SIGNET_SHIM_CONFIG` names
//! (`key = value` lines, `#` comments; keys in lower case without the prefix, e.g.
//! `sign_ms = 140`):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `SIGNET_SHIM_MODULE` | the real module | `SOFTHSM2_MODULE`, else `/usr/lib/softhsm/libsofthsm2.so` |
//! | `SIGNET_SHIM_SIGN_MS` | wait before each `C_Sign`/`C_SignFinal` that makes a signature | 0 |
//! | `SIGNET_SHIM_LOGIN_MS` | wait before each `C_Login` | 0 |
//! | `SIGNET_SHIM_LOG` | the call log (appended, `O_APPEND`) | none |
//! | `SIGNET_SHIM_LOCK` | the lock file that makes token operations take turns | the log's path + `.lock`; none without a log |

// The shim is a C ABI module: it exports `C_GetFunctionList`, calls through the real
// module's function pointers and reads the C caller's pointers. None of that can be
// written without `unsafe`, so this crate (test-only, never shipped) allows it; the
// workspace denies it everywhere else.
#![allow(unsafe_code)]

pub mod log;

use cryptoki_sys::{
    CKR_GENERAL_ERROR, CK_BYTE, CK_FLAGS, CK_FUNCTION_LIST, CK_MECHANISM, CK_NOTIFY,
    CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_SLOT_ID, CK_ULONG, CK_USER_TYPE, CK_UTF8CHAR,
};
use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// SoftHSM's module, where the project's tests find it.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The shim's settings (see the crate's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub module: PathBuf,
    pub sign_ms: u64,
    pub login_ms: u64,
    pub log: Option<PathBuf>,
    pub lock: Option<PathBuf>,
}

impl Settings {
    /// Reads the settings from `var` (the environment, in the shim), falling back to the
    /// file its `SIGNET_SHIM_CONFIG` names. The error names the setting and the fix.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let file: Vec<(String, String)> = match var("SIGNET_SHIM_CONFIG") {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    format!(
                        "SIGNET_SHIM_CONFIG={path}: {e}; point it at a readable file or unset it"
                    )
                })?
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                })
                .collect(),
            None => Vec::new(),
        };
        let get = |key: &str| {
            var(&format!("SIGNET_SHIM_{}", key.to_uppercase())).or_else(|| {
                file.iter()
                    .rev()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            })
        };
        let ms = |key: &str| -> Result<u64, String> {
            match get(key) {
                None => Ok(0),
                Some(v) => v.parse().map_err(|_| {
                    format!(
                        "SIGNET_SHIM_{}={v:?} is not a number of milliseconds; give e.g. 140",
                        key.to_uppercase()
                    )
                }),
            }
        };
        let module = get("module")
            .or_else(|| var("SOFTHSM2_MODULE"))
            .unwrap_or_else(|| SOFTHSM.to_owned());
        let log = get("log").map(PathBuf::from);
        let lock = get("lock").map(PathBuf::from).or_else(|| {
            log.as_ref()
                .map(|l| PathBuf::from(format!("{}.lock", l.display())))
        });
        Ok(Settings {
            module: PathBuf::from(module),
            sign_ms: ms("sign_ms")?,
            login_ms: ms("login_ms")?,
            log,
            lock,
        })
    }
}

/// The loaded real module and the settings.
struct Shim {
    /// Kept loaded for the life of the process: `real` points into it.
    _library: libloading::Library,
    real: CK_FUNCTION_LIST,
    settings: Settings,
}

static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();
static LIST: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();

fn load() -> Result<Shim, String> {
    let settings = Settings::read(|k| std::env::var(k).ok())?;
    let library = unsafe { libloading::Library::new(&settings.module) }.map_err(|e| {
        format!(
            "cannot load the real PKCS#11 module {}: {e}; set SIGNET_SHIM_MODULE to it",
            settings.module.display()
        )
    })?;
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| {
            format!(
                "{} has no C_GetFunctionList ({e}); SIGNET_SHIM_MODULE must name a PKCS#11 module",
                settings.module.display()
            )
        })?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    let rv = unsafe { get(&mut list) };
    if rv != 0 || list.is_null() {
        return Err(format!(
            "{}'s C_GetFunctionList failed (CKR {rv:#x})",
            settings.module.display()
        ));
    }
    let real = unsafe { *list };
    Ok(Shim {
        _library: library,
        real,
        settings,
    })
}

fn shim() -> &'static Shim {
    match SHIM.get() {
        Some(Ok(s)) => s,
        // C_GetFunctionList returned a list only after loading succeeded.
        _ => unreachable!("the shim's functions are reachable only through its function list"),
    }
}

/// The module's entry point: the real module's function list with the shim's
/// functions in place of the ones it delays or records.
///
/// # Safety
/// `list` is a pointer the caller gives for the list, as PKCS#11 says.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return cryptoki_sys::CKR_ARGUMENTS_BAD;
    }
    let shim = match SHIM.get_or_init(load) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("signet-pkcs11-delay: {e}");
            return CKR_GENERAL_ERROR;
        }
    };
    let ours = LIST.get_or_init(|| {
        let mut l = shim.real;
        l.C_Initialize = Some(initialize);
        l.C_OpenSession = Some(open_session);
        l.C_Login = Some(login);
        l.C_SignInit = Some(sign_init);
        l.C_Sign = Some(sign);
        l.C_SignFinal = Some(sign_final);
        l.C_GetFunctionList = Some(C_GetFunctionList);
        l
    });
    unsafe { *list = ours as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
    0
}

/// Nanoseconds on `CLOCK_MONOTONIC`, the one clock every process on the machine shares.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Holds the token (an exclusive `flock` on the lock file) until dropped.
struct TokenTurn(Option<File>);

fn take_turn(settings: &Settings) -> TokenTurn {
    let Some(path) = &settings.lock else {
        return TokenTurn(None);
    };
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => {
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            TokenTurn(Some(f))
        }
        Err(e) => {
            eprintln!("signet-pkcs11-delay: lock {}: {e}", path.display());
            TokenTurn(None)
        }
    }
}

impl Drop for TokenTurn {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// Runs `call` as the token operation `name`: takes the token's turn when `delay_ms`
/// applies (`Some`), waits, forwards, and logs the call.
fn run(name: &str, delay_ms: Option<u64>, query: bool, call: impl FnOnce() -> CK_RV) -> CK_RV {
    let s = shim();
    let start = monotonic_ns();
    let turn = delay_ms.map(|_| take_turn(&s.settings));
    let busy = monotonic_ns();
    if let Some(ms) = delay_ms.filter(|ms| *ms > 0) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let rv = call();
    let end = monotonic_ns();
    drop(turn);
    if let Some(path) = &s.settings.log {
        let line = log::Call {
            name: name.to_owned(),
            pid: std::process::id(),
            start,
            busy,
            end,
            rv,
            query,
        }
        .line();
        // One write(2) per line on an O_APPEND file: lines of several processes never mix.
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    rv
}

unsafe extern "C" fn initialize(args: *mut c_void) -> CK_RV {
    let f = shim().real.C_Initialize;
    run("C_Initialize", None, false, || match f {
        Some(f) => unsafe { f(args) },
        None => CKR_GENERAL_ERROR,
    })
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    app: *mut c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    let f = shim().real.C_OpenSession;
    run("C_OpenSession", None, false, || match f {
        Some(f) => unsafe { f(slot, flags, app, notify, session) },
        None => CKR_GENERAL_ERROR,
    })
}

unsafe extern "C" fn login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    let s = shim();
    let f = s.real.C_Login;
    run("C_Login", Some(s.settings.login_ms), false, || match f {
        Some(f) => unsafe { f(session, user, pin, pin_len) },
        None => CKR_GENERAL_ERROR,
    })
}

unsafe extern "C" fn sign_init(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let f = shim().real.C_SignInit;
    run("C_SignInit", None, false, || match f {
        Some(f) => unsafe { f(session, mechanism, key) },
        None => CKR_GENERAL_ERROR,
    })
}

unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    let s = shim();
    let f = s.real.C_Sign;
    // A call without a buffer only asks for the signature's length: no token work.
    let query = signature.is_null();
    let delay = (!query).then_some(s.settings.sign_ms);
    run("C_Sign", delay, query, || match f {
        Some(f) => unsafe { f(session, data, data_len, signature, signature_len) },
        None => CKR_GENERAL_ERROR,
    })
}

unsafe extern "C" fn sign_final(
    session: CK_SESSION_HANDLE,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    let s = shim();
    let f = s.real.C_SignFinal;
    let query = signature.is_null();
    let delay = (!query).then_some(s.settings.sign_ms);
    run("C_SignFinal", delay, query, || match f {
        Some(f) => unsafe { f(session, signature, signature_len) },
        None => CKR_GENERAL_ERROR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_environment_before_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("shim.conf");
        std::fs::write(
            &conf,
            "# a real token\nmodule = \"/x/real.so\"\nsign_ms = 140\nlogin_ms = 200\nlog = /x/calls.log\n",
        )
        .expect("write");
        let conf_s = conf.display().to_string();
        let env = |k: &str| match k {
            "SIGNET_SHIM_CONFIG" => Some(conf_s.clone()),
            "SIGNET_SHIM_SIGN_MS" => Some("7".to_owned()),
            _ => None,
        };
        let s = Settings::read(env).expect("settings");
        assert_eq!(s.module, PathBuf::from("/x/real.so"));
        assert_eq!((s.sign_ms, s.login_ms), (7, 200));
        assert_eq!(s.log, Some(PathBuf::from("/x/calls.log")));
        assert_eq!(s.lock, Some(PathBuf::from("/x/calls.log.lock")));

        let none = Settings::read(|_| None).expect("defaults");
        assert_eq!(none.module, PathBuf::from(SOFTHSM));
        assert_eq!((none.sign_ms, none.login_ms, none.lock), (0, 0, None));

        let bad = Settings::read(|k| (k == "SIGNET_SHIM_LOGIN_MS").then(|| "soon".to_owned()));
        assert!(bad
            .expect_err("not a number")
            .contains("SIGNET_SHIM_LOGIN_MS"));
    }
}
