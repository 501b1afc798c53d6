#!/usr/bin/env bash
# fuzz.sh [SECONDS] [TARGET...]
# Runs each fuzz target (fuzz/fuzz_targets/, docs/FUZZING.md) for SECONDS (default 600)
# with libFuzzer, seeded with real files: a PE, an MSI, a CAB, a catalog, PowerShell
# scripts in UTF-8, UTF-8 with BOM and UTF-16, an APPX package and bundle, digest-mode blobs from
# `osslsigncode extract-data`, QMP lines and `qm config` outputs. Stops at the first
# crash (libFuzzer writes the input to fuzz/artifacts/TARGET/). Needs cargo-fuzz
# (installed here when missing) and the stable toolchain with RUSTC_BOOTSTRAP=1, which
# the sanitizer flags need.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1

seeds=fuzz/seeds
if [[ ! -d $seeds/files ]]; then
  mkdir -p "$seeds/files" "$seeds/queries" "$seeds/qmp" "$seeds/qm"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  bash tests/fixtures/make-pe.sh "$seeds/files/app.exe"
  printf 'payload\n' >"$work/payload.txt"
  bash tests/fixtures/make-msi.sh "$seeds/files/setup.msi" "$work/payload.txt"
  bash tests/fixtures/make-cab.sh "$seeds/files/data.cab" "$work/payload.txt"
  bash tests/fixtures/make-cat.sh "$seeds/files/files.cat" "$work/payload.txt"
  bash tests/fixtures/make-appx.sh "$seeds/files/app.appx" package
  bash tests/fixtures/make-appx.sh "$seeds/files/app.appxbundle" bundle
  printf 'Write-Output "signet"\r\n' >"$seeds/files/utf8.ps1"
  printf '\xef\xbb\xbfWrite-Output "signet"\r\n' >"$seeds/files/bom.ps1"
  printf '\xff\xfeW\0r\0i\0t\0e\0\r\0\n\0' >"$seeds/files/utf16.ps1"
  for f in app.exe setup.msi data.cab app.appx; do
    osslsigncode extract-data -h sha256 -in "$seeds/files/$f" -out "$seeds/files/$f.blob" >/dev/null
  done
  osslsigncode extract-data -h sha256 -ph -in "$seeds/files/app.exe" -out "$seeds/files/app-ph.blob" >/dev/null
  printf 'profile=release&mode=digest&response=pkcs7&filename=a.exe' >"$seeds/queries/v1"
  printf 'signing-profile=release&response-type=complete\nattachment; filename="x.dll"' >"$seeds/queries/ht"
  printf 'hash=sha384&timestamp=http%%3A%%2F%%2F127.0.0.1%%3A1%%2F&page_hashes=true' >"$seeds/queries/agent"
  printf '{"return": {}, "id": 3}' >"$seeds/qmp/return"
  printf '{"id": 4, "error": {"class": "GenericError", "desc": "Duplicate device ID"}}' >"$seeds/qmp/error"
  printf '{"timestamp": {"seconds": 1, "microseconds": 5}, "event": "DEVICE_DELETED", "data": {"device": "signet-0123ABCD", "path": "/machine/peripheral/signet-0123ABCD"}}' >"$seeds/qmp/deleted"
  printf '{"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}}' >"$seeds/qmp/reset"
  printf 'boot: order=scsi0\ncores: 2\nhotplug: disk,network,usb\nmachine: pc-q35-8.1\nostype: win11\nusb0: host=3-2\nargs: -chardev socket,id=x,path=/run/x.sock\n' >"$seeds/qm/win"
  printf 'cores: 1\nostype: l26\n# comment\nmemory: 2048\n' >"$seeds/qm/linux"
fi

seed_dir() {
  case $1 in
    format_detect | engine_*) echo "$seeds/files" ;;
    query_strings) echo "$seeds/queries" ;;
    qmp_line) echo "$seeds/qmp" ;;
    qm_config) echo "$seeds/qm" ;;
    *) echo "$seeds/files" ;;
  esac
}

# Built once, then each target's binary run directly: a source edited meanwhile does
# not rebuild anything under a running fuzzer.
(cd fuzz && cargo fuzz build -O)
bin=fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  echo "== $t: ${secs} s"
  status=0
  "$bin/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$secs" \
    -print_final_stats=1 -rss_limit_mb=2048 "$corpus" "$(seed_dir "$t")" \
    >"fuzz/logs/$t.log" 2>&1 || status=$?
  grep -E '^(stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|Done )' \
    "fuzz/logs/$t.log" || true
  if ((status != 0)) || compgen -G "fuzz/artifacts/$t/crash-*" >/dev/null; then
    tail -30 "fuzz/logs/$t.log" >&2
    echo "fuzz.sh: $t failed (exit $status); its log is fuzz/logs/$t.log, the input in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
