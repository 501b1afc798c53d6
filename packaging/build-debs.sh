#!/usr/bin/env bash
# make deb: builds the three Debian packages with debhelper (debian/) into
# target/debian/ and checks them with lintian (packaging/README.md lists the tags
# that remain and why). Prints the packages' paths.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
die() { echo "make deb: $*" >&2; exit 1; }
for c in dh dpkg-deb lintian cargo; do
  command -v $c >/dev/null ||
    die "$c is missing; run scripts/install-deps.sh (or apt-get install debhelper lintian)"
done
version=$(dpkg-parsechangelog -S Version)
cargo_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[[ ${version%%[-+~]*} == "$cargo_version" ]] ||
  die "debian/changelog says $version but Cargo.toml says $cargo_version; add a changelog entry (dch -v $cargo_version)"
# The udev rule names every token of signetd's built-in table.
builtin=appliance/signetd/src/adapters/usb/mod.rs
tokens=$(sed -n '/^pub const BUILTIN/,/^];/s/.*(0x\([0-9a-f]\{4\}\), 0x\([0-9a-f]\{4\}\),.*/\1 \2/p' "$builtin")
[[ -n $tokens ]] || die "found no BUILTIN token table in $builtin; point this check at the table"
while read -r vid pid; do
  grep -q "ATTR{idVendor}==\"$vid\", ATTR{idProduct}==\"$pid\"" debian/signet.udev ||
    die "debian/signet.udev lacks the token $vid:$pid of $builtin's BUILTIN table; add its line"
done <<<"$tokens"
rm -rf target/debian && mkdir -p target/debian
# From scratch every time: dh skips the steps its stamps say are done, and would
# package the binaries of the last build.
rm -rf debian/.debhelper debian/signet debian/signet-agent debian/signet-client debian/tmp \
  debian/files debian/*.substvars debian/*.debhelper debian/*.debhelper.log debian/debhelper-build-stamp
debian/rules binary >target/debian-build.log 2>&1 || {
  tail -40 target/debian-build.log >&2
  die "debian/rules binary failed; the whole log is target/debian-build.log"
}
debs=(target/debian/*_"$version"_*.deb)
[[ -e ${debs[0]} ]] || die "debian/rules binary made no package in target/debian/"
# Errors and warnings fail the build; the tags overridden in debian/*.lintian-overrides
# say why they stay.
lintian --fail-on error,warning \
  "${debs[@]}" >&2 || die "lintian found the problems above"
printf '%s\n' "${debs[@]}"
