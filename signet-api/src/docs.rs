//! The `man` and `completions` subcommands every Signet binary has (listed in its
//! `--help`), so the packages generate man pages and shell completions from the
//! command-line definitions at build time (`debian/rules`), and an admin can make them
//! for a binary installed otherwise. A binary flattens [`DocsCommand`] into its own
//! subcommands and hands [`DocsCommand::run`] its whole `clap::Command`.

use std::io::Write;
use std::path::PathBuf;

/// `man [--dir DIR]` and `completions SHELL`.
#[derive(Debug, clap::Subcommand)]
pub enum DocsCommand {
    /// Print the man page (roff) to stdout, or write every page (NAME.1,
    /// NAME-SUBCOMMAND.1, ...) to --dir.
    Man {
        /// Write all pages into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the shell completions to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

impl DocsCommand {
    /// Writes what was asked for the program `cmd` describes (its name names the pages
    /// and the completed command) to stdout or the directory. A failed write to stdout
    /// ends the program as [`crate::output`] says (quietly, 141, when a pipe's reader
    /// has gone); the error returned is the directory's.
    pub fn run(&self, cmd: clap::Command) -> std::io::Result<()> {
        let to_stdout = !matches!(self, DocsCommand::Man { dir: Some(_) });
        match self.write_to(cmd, &mut std::io::stdout().lock()) {
            Err(e) if to_stdout => crate::output::stdout_failed(&e),
            other => other,
        }
    }

    fn write_to(&self, mut cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
        match self {
            DocsCommand::Man { dir: Some(dir) } => {
                std::fs::create_dir_all(dir)?;
                clap_mangen::generate_to(cmd, dir)
            }
            DocsCommand::Man { dir: None } => {
                clap_mangen::Man::new(cmd).render(out)?;
                out.flush()
            }
            DocsCommand::Completions { shell } => {
                // Into memory first: clap_complete panics when its writer fails (a
                // closed pipe); this way the error is returned.
                let name = cmd.get_name().to_string();
                let mut script = Vec::new();
                clap_complete::generate(*shell, &mut cmd, name, &mut script);
                out.write_all(&script)?;
                out.flush()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .about("A demo program")
            .subcommand(clap::Command::new("sign").about("Sign things"))
    }

    #[test]
    fn man_pages_name_the_program_and_its_subcommands() {
        let mut page = Vec::new();
        DocsCommand::Man { dir: None }
            .write_to(demo(), &mut page)
            .expect("render");
        let page = String::from_utf8(page).expect("utf-8");
        assert!(page.starts_with(".ie"), "{page}");
        assert!(page.contains(".TH demo 1"), "{page}");
        let dir = tempfile::tempdir().expect("tempdir");
        DocsCommand::Man {
            dir: Some(dir.path().join("man1")),
        }
        .run(demo())
        .expect("write");
        assert!(dir.path().join("man1/demo.1").is_file());
        assert!(dir.path().join("man1/demo-sign.1").is_file());
    }

    #[test]
    fn completions_complete_the_subcommands() {
        let mut script = Vec::new();
        DocsCommand::Completions {
            shell: clap_complete::Shell::Bash,
        }
        .write_to(demo(), &mut script)
        .expect("generate");
        let script = String::from_utf8(script).expect("utf-8");
        assert!(script.contains("complete -F _demo"), "{script}");
        assert!(script.contains("sign"), "{script}");
    }
}
