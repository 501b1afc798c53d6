#!/usr/bin/env bash
# The release binaries as they ship, gathered in one directory (default
# target/shipped/): signetd, signetctl and signet-agent as cargo builds them, and
# signet, the client, linked statically (static-pie) with musl when Rust's musl target
# and musl-gcc are installed (scripts/install-deps.sh adds both), else with glibc; the
# C library it holds is written to signet.libc beside it (debian/rules reads it). The Debian
# packages (debian/rules) and the benchmarks (make bench) take their binaries from
# here, so what is measured is what is installed.
#
#   bash scripts/build-release.sh [--bench] [DIR]
#   --bench   also the benchmark's own tools: signet-bench and the slow token's shim
#             (libsignet_pkcs11_delay.so)
#
# Why the client is static: build systems start `signet sign` once per file, in a
# VM. Started dynamically linked, it loads libgcc_s and libm and binds their symbols,
# and libgcc_s's start-up probes the CPU with cpuid, which traps to the hypervisor:
# about 0.3 ms of each call on the benchmark's machine, a twentieth of signing a
# 15 KiB file (docs/BENCHMARKS.md, "a client that starts statically linked"). The
# daemons run for days and link libudev and libusb; they stay dynamic. For the same
# reason the client's httparse is built without its SIMD path (its build script takes
# `httparse_disable_simd="1"`): that path is chosen at run time by std's CPU feature
# detection, some twenty cpuid at the first response, on every call's path; the client
# parses a few short responses, which the plain path does as fast.
# Why musl rather than glibc: a process linked with glibc, static or not, asks the CPU
# about its caches at start (some sixty cpuid, each a trap to the hypervisor in a VM:
# 6.5 µs each on the benchmark's machine, half a millisecond of every call); musl asks
# nothing (docs/BENCHMARKS.md, "the client linked with musl").
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "build-release: $*" >&2; exit 1; }
bench=0
dir=
for a in "$@"; do
  case $a in
    --bench) bench=1 ;;
    -*) die "unknown option $a; usage: $0 [--bench] [DIR]" ;;
    *) dir=$a ;;
  esac
done
cargo=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-$root/target}
dir=${dir:-$target/shipped}
host=$(rustc -vV | sed -n 's/^host: //p')
[[ $host == *-linux-gnu ]] ||
  die "the release build is made for glibc Linux (a *-linux-gnu host); this toolchain's host is '$host'"
cd "$root"
dynamic=(-p signetd -p signetctl -p signet-agent)
((bench)) && dynamic+=(-p signet-pkcs11-delay)
"$cargo" build --release --locked "${dynamic[@]}"
# An explicit --target keeps RUSTFLAGS off the build scripts and proc-macros, which
# must stay dynamic; the client's own objects land in target/<target>/release/.
musl=${host%-gnu}-musl
musl_std=$(rustc --print target-libdir --target "$musl" 2>/dev/null || true)
if [[ -n $musl_std ]] && compgen -G "$musl_std/libstd-*.rlib" >/dev/null && command -v musl-gcc >/dev/null; then
  libc=musl
  cc_var=CC_${musl//-/_}
  env "$cc_var=musl-gcc" \
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg httparse_disable_simd=\"1\"" \
    "$cargo" build --release --locked -p signet --target "$musl"
  client=$target/$musl/release/signet
else
  echo "build-release: Rust's $musl target or musl-gcc is missing (rustup target add $musl; apt-get install musl-tools); the client is linked with glibc, and starts slower" >&2
  libc=glibc
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg httparse_disable_simd=\"1\"" \
    "$cargo" build --release --locked -p signet --target "$host"
  client=$target/$host/release/signet
fi
ldd "$client" 2>&1 | grep -q 'statically linked' ||
  die "$client came out dynamically linked ($(ldd "$client" 2>&1 | head -1)); a RUSTFLAGS or .cargo/config setting may override crt-static"
mkdir -p "$dir"
bins=(signetd signetctl signet-agent)
((bench)) && bins+=(signet-bench libsignet_pkcs11_delay.so)
for b in "${bins[@]}"; do
  [[ -e $target/release/$b ]] || die "$target/release/$b was not built"
  cp -f "$target/release/$b" "$dir/$b"
done
cp -f "$client" "$dir/signet"
echo "$libc" >"$dir/signet.libc"
echo "$dir"
