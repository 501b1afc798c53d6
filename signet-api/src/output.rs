//! What the binaries print on stdout, and how: `--output-format text|json|json-pretty`
//! ([`OutputArgs`], `--json` its alias for `json`, as `pvesh` and
//! `proxmox-backup-client` have it), and [`out!`](crate::out)/[`outln!`](crate::outln),
//! which print like `print!`/`println!` but never panic when stdout is gone.
//!
//! A program whose stdout is a pipe whose reader has ended (`signetctl jobs | head -1`)
//! stops quietly with [`EXIT_BROKEN_PIPE`] (141, what a shell reports for a program
//! killed by SIGPIPE, as `cat` would be); any other write error on stdout stops it
//! with the error on stderr and [`EXIT_WRITE_FAILED`]. Rust ignores SIGPIPE (so that a
//! daemon's closed socket is an error, not its death), and `println!` panics on that
//! error instead.

use std::io::Write;

/// The exit status when stdout's reader has gone (128 + SIGPIPE).
pub const EXIT_BROKEN_PIPE: u8 = 141;
/// The exit status when writing to stdout failed otherwise (sysexits' `EX_IOERR`).
pub const EXIT_WRITE_FAILED: u8 = 74;

/// The lines every binary's list of exit codes ends with, as a literal for `concat!`.
#[macro_export]
macro_rules! exit_codes_stdout {
    () => {
        "  74  writing to stdout failed (a full disk, ...)
  141 stdout was closed (the reader of a pipe ended, as in `| head -1`); nothing is said"
    };
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: the same words as the web UI.
    #[default]
    Text,
    /// One JSON document on one line (JSON lines where a command prints several).
    Json,
    /// JSON, indented.
    JsonPretty,
}

/// `--output-format FORMAT` and `--json`, for a command that prints a result.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// How to print the result: text, json (one line) or json-pretty. The JSON is the
    /// document the HTTP API answers.
    #[arg(long, value_enum, value_name = "FORMAT")]
    output_format: Option<OutputFormat>,
    /// The same as --output-format json.
    #[arg(long, conflicts_with = "output_format")]
    json: bool,
}

impl OutputArgs {
    /// `format` as if given on the command line.
    pub fn new(format: OutputFormat) -> OutputArgs {
        OutputArgs {
            output_format: Some(format),
            json: false,
        }
    }

    /// The format asked for.
    pub fn format(&self) -> OutputFormat {
        match (self.json, self.output_format) {
            (true, _) => OutputFormat::Json,
            (false, Some(f)) => f,
            (false, None) => OutputFormat::Text,
        }
    }

    /// Whether the result is printed as JSON (either kind).
    pub fn is_json(&self) -> bool {
        self.format() != OutputFormat::Text
    }

    /// `value` as JSON in the chosen layout (compact for `text`, which prints no JSON).
    pub fn to_json<T: serde::Serialize + ?Sized>(&self, value: &T) -> String {
        let text = match self.format() {
            OutputFormat::JsonPretty => serde_json::to_string_pretty(value),
            OutputFormat::Json | OutputFormat::Text => serde_json::to_string(value),
        };
        // Signet's result types are plain data: serializing them cannot fail.
        text.unwrap_or_default()
    }
}

/// Writes `args` to stdout and flushes it; a failed write ends the program (see the
/// module's documentation). Called by [`out!`](crate::out) and
/// [`outln!`](crate::outln).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    if let Err(e) = lock.write_fmt(args).and_then(|()| lock.flush()) {
        stdout_failed(&e)
    }
}

/// Writes `bytes` to stdout as [`write_stdout`] does.
pub fn write_stdout_bytes(bytes: &[u8]) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    if let Err(e) = lock.write_all(bytes).and_then(|()| lock.flush()) {
        stdout_failed(&e)
    }
}

/// Stdout as a `Write` for code that streams (`BufWriter::new(Stdout)`): a write
/// that fails ends the program as [`write_stdout`] does, so it never returns an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stdout().write(buf) {
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => stdout_failed(&e),
            result => result,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush().or_else(|e| stdout_failed(&e))
    }
}

/// Ends the program after writing to stdout failed with `e`: quietly with
/// [`EXIT_BROKEN_PIPE`] when its reader has gone, else saying so with
/// [`EXIT_WRITE_FAILED`].
pub fn stdout_failed(e: &std::io::Error) -> ! {
    let code = exit_code(e);
    if code != EXIT_BROKEN_PIPE {
        eprintln!("{}: cannot write to stdout: {e}", program());
    }
    std::process::exit(code.into())
}

/// The exit status for a failed write to stdout.
pub fn exit_code(e: &std::io::Error) -> u8 {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        EXIT_BROKEN_PIPE
    } else {
        EXIT_WRITE_FAILED
    }
}

/// The program's name, for its messages.
fn program() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "signet".to_owned())
}

/// `print!` to stdout that ends the program quietly when stdout's reader has gone,
/// instead of panicking (`signet_api::output`).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(::std::format_args!($($arg)*))
    };
}

/// `println!` to stdout that ends the program quietly when stdout's reader has gone,
/// instead of panicking (`signet_api::output`).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_stdout(::std::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Demo {
        #[command(flatten)]
        output: OutputArgs,
    }

    fn parse(args: &[&str]) -> Result<OutputFormat, clap::Error> {
        Demo::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))
            .map(|d| d.output.format())
    }

    #[test]
    fn json_is_an_alias_of_output_format_json() {
        assert_eq!(parse(&[]).unwrap(), OutputFormat::Text);
        assert_eq!(parse(&["--json"]).unwrap(), OutputFormat::Json);
        assert_eq!(
            parse(&["--output-format", "json"]).unwrap(),
            OutputFormat::Json
        );
        assert_eq!(
            parse(&["--output-format", "json-pretty"]).unwrap(),
            OutputFormat::JsonPretty
        );
        assert_eq!(
            parse(&["--output-format=text"]).unwrap(),
            OutputFormat::Text
        );
        let both = parse(&["--json", "--output-format", "text"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let bad = parse(&["--output-format", "yaml"]).unwrap_err();
        assert_eq!(bad.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn json_is_one_line_and_json_pretty_is_indented() {
        let v = serde_json::json!({"a": [1, 2]});
        assert_eq!(
            OutputArgs::new(OutputFormat::Json).to_json(&v),
            r#"{"a":[1,2]}"#
        );
        let pretty = OutputArgs::new(OutputFormat::JsonPretty).to_json(&v);
        assert_eq!(pretty, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
        assert!(!OutputArgs::default().is_json());
        assert!(OutputArgs::new(OutputFormat::JsonPretty).is_json());
    }

    #[test]
    fn a_gone_reader_is_141_and_other_errors_74() {
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(exit_code(&pipe), EXIT_BROKEN_PIPE);
        let full = std::io::Error::from_raw_os_error(28); // ENOSPC
        assert_eq!(exit_code(&full), EXIT_WRITE_FAILED);
    }
}
