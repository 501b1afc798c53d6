//! The command-line arguments `signetctl` and `signetd` share, defined once so the two
//! CLIs ask the same things the same way.

/// `enroll signing-vm`: the VM that holds the token.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SigningVmArgs {
    /// The signing VM's VMID.
    pub vmid: u32,
    /// Serial number of the token, plugged in now (`signetctl tokens` or `signetd tokens`
    /// lists them), to give this VM.
    #[arg(long)]
    pub token: String,
    /// Show the exact change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `enroll build-vm`: a VM that asks for signatures.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BuildVmArgs {
    /// The build VM's VMID.
    pub vmid: u32,
    /// A profile the VM may use (repeat for more; "*" for all); default: the default
    /// profile.
    #[arg(long = "profile", short)]
    pub profiles: Vec<String>,
    /// Show the exact change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    enum Cli {
        SigningVm(SigningVmArgs),
        BuildVm(BuildVmArgs),
    }

    /// Flattened into subcommands named like them, as both CLIs do.
    #[derive(Debug, Parser)]
    enum Flattened {
        SigningVm {
            #[command(flatten)]
            vm: SigningVmArgs,
            #[arg(long)]
            json: bool,
        },
        BuildVm {
            #[command(flatten)]
            vm: BuildVmArgs,
        },
    }

    #[test]
    fn they_flatten_into_subcommands_of_the_same_name() {
        use clap::CommandFactory;
        Flattened::command().debug_assert();
        let f = Flattened::try_parse_from(["x", "signing-vm", "105", "--token", "A", "--json"])
            .unwrap();
        assert!(matches!(
            f,
            Flattened::SigningVm {
                vm: SigningVmArgs { vmid: 105, .. },
                json: true
            }
        ));
        assert!(matches!(
            Flattened::try_parse_from(["x", "build-vm", "7"]).unwrap(),
            Flattened::BuildVm {
                vm: BuildVmArgs { vmid: 7, .. }
            }
        ));
    }

    #[test]
    fn both_clis_read_the_same_words() {
        let s = Cli::try_parse_from(["x", "signing-vm", "105", "--token", "0123ABCD", "--dry-run"])
            .unwrap();
        assert!(
            matches!(s, Cli::SigningVm(SigningVmArgs { vmid: 105, ref token, dry_run: true }) if token == "0123ABCD")
        );
        let b = Cli::try_parse_from(["x", "build-vm", "120", "-p", "release", "--profile", "*"])
            .unwrap();
        assert!(
            matches!(b, Cli::BuildVm(BuildVmArgs { vmid: 120, ref profiles, dry_run: false }) if profiles == &["release", "*"])
        );
        assert!(
            Cli::try_parse_from(["x", "signing-vm", "105"]).is_err(),
            "the token is required"
        );
    }
}
