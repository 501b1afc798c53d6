#!/usr/bin/env bash
# Builds the lab's vsock backend, vhost-device-vsock 0.3.0 (the newest release), into
# target/lab/vhost, with one fix for guest resets (below). Run by scripts/install-deps.sh;
# does nothing when the build at hand carries the same fix.
#
# The fix: in 0.3.0 a host connection or host data that arrives while the guest's
# virtqueues are not ready — from a guest reset (`system_reset`, a reboot) until the
# guest's driver sets them up again — makes `handle_event` return `QueueNotReady`, and
# vhost-user-backend then ends the device's worker loop for good: the guest's vsock is
# dead until the backend process is restarted, which QEMU 7.2's vhost-user-vsock
# cannot follow without a restart of its own. With the fix such an event is logged and
# the work stays queued; the guest's next queue notification, once its driver is up,
# processes it (a `CONNECT` made during the reset is then refused by the new guest,
# as the kernel's vhost-vsock would). The source comes from crates.io through cargo.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
version=0.3.0
fix=reset-1 # bump when the edits below change
out=$root/target/lab/vhost
stamp="vhost-device-vsock $version + $fix"
if [[ -x $out/bin/vhost-device-vsock && $(cat "$out/BUILD" 2>/dev/null) == "$stamp" ]]; then
  exit 0
fi
echo "install-deps: building $stamp into $out (about a minute)" >&2
# Outside the repo: cargo would take a package under it for a workspace member.
work=$(mktemp -d "${TMPDIR:-/tmp}/signet-vhost-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fetch/src"
# cargo fetches the crate (through whatever registry this machine's cargo uses).
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "signet-lab-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
vhost-device-vsock = "=$version"
[workspace]
EOF
: >"$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet --target x86_64-unknown-linux-gnu)
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/vhost-device-vsock-$version.crate | head -n1)
[[ -f $crate ]] || { echo "lab: cargo fetched no vhost-device-vsock-$version.crate" >&2; exit 1; }
tar -xzf "$crate" -C "$work"
src=$work/vhost-device-vsock-$version
f=$src/src/vhu_vsock.rs
sed -i \
  -e 's/^\(\s*\)thread\.process_tx(vring_tx, evt_idx)?;/\1if let Err(e) = thread.process_tx(vring_tx, evt_idx) { warn!("TX not processed: {e:?}"); }/' \
  -e 's/^\(\s*\)_ => return Err(e\.into()),/\1_ => warn!("TX not processed: {e:?}"),/' \
  -e 's/^\(\s*\)thread\.process_rx(vring_rx, evt_idx)?;/\1if let Err(e) = thread.process_rx(vring_rx, evt_idx) { warn!("RX not processed: {e:?}"); }/' \
  "$f"
edits=$(grep -c 'not processed: {e:?}' "$f" || true)
if [[ $edits != 3 ]]; then
  echo "lab: the reset fix matched $edits of 3 places in $f; lab/build-vhost.sh needs updating" >&2
  exit 1
fi
rm -rf "$out"
nice -n 10 cargo install --path "$src" --locked --root "$out" --quiet
echo "$stamp" >"$out/BUILD"
