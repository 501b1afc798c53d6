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

# The engine's readers of returned bytes: RFC 3161 replies to the request the
# timestamp_reply target makes (SHA-256 over "signet fuzz signature value", nonce
# "ABCDEFGH"), and PE files with the signature made for them (attach_pe's framing).
if [[ ! -d $seeds/tsa ]]; then
  work=$(mktemp -d)
  mkdir -p "$work/tsa-seeds"
  bash tests/fixtures/make-tsa.sh "$work/tsa"
  python3 - "$work" <<'PY'
import hashlib, sys
def der(tag, body):
    n = len(body)
    if n < 128:
        head = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + head + body
def request(nonce, cert_req):
    sha256 = der(0x06, bytes.fromhex("608648016503040201"))
    alg = der(0x30, sha256 + b"\x05\x00")
    imprint = der(0x30, alg + der(0x04, hashlib.sha256(b"signet fuzz signature value").digest()))
    body = der(0x02, b"\x01") + imprint + der(0x02, nonce)
    if cert_req:
        body += der(0x01, b"\xff")
    return der(0x30, body)
work = sys.argv[1]
open(f"{work}/q-certs.tsq", "wb").write(request(b"ABCDEFGH", True))
open(f"{work}/q-nocerts.tsq", "wb").write(request(b"ABCDEFGH", False))
open(f"{work}/q-other.tsq", "wb").write(request(b"HGFEDCBA", True))
PY
  for q in certs nocerts other; do
    openssl ts -reply -config "$work/tsa/ts.cnf" -queryfile "$work/q-$q.tsq" \
      -out "$work/tsa-seeds/reply-$q.tsr" 2>/dev/null
  done
  mkdir -p "$seeds/tsa"
  mv "$work"/tsa-seeds/* "$seeds/tsa/"
  rm -rf "$work"
fi
# A throw-away code-signing key and its self-signed certificate: DIR/key.pem, DIR/cert.pem.
throwaway_key() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -sha256 -subj "/CN=Signet fuzz" \
    -addext "extendedKeyUsage=codeSigning" -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}
# sign DIR IN OUT [options]: signs IN with DIR's throw-away key.
sign() {
  local dir=$1 in=$2 out=$3
  shift 3
  osslsigncode sign -certs "$dir/cert.pem" -key "$dir/key.pem" "$@" -in "$in" -out "$out" >/dev/null
}
# attach_seed OUT FLAGS PE SIGNED: attach_pe's framing: FLAGS, the PE's length, the PE,
# then SIGNED's signature.
attach_seed() {
  osslsigncode extract-signature -in "$4" -out "$1.p7" >/dev/null
  python3 -c 'import struct,sys; pe=open(sys.argv[3],"rb").read(); sig=open(sys.argv[4],"rb").read(); open(sys.argv[1],"wb").write(bytes([int(sys.argv[2])])+struct.pack("<I",len(pe))+pe+sig)' \
    "$1" "$2" "$3" "$1.p7"
  rm -f "$1.p7"
}
if [[ ! -d $seeds/attach ]]; then
  work=$(mktemp -d)
  throwaway_key "$work"
  bash tests/fixtures/make-pe.sh "$work/app.exe"
  sign "$work" "$work/app.exe" "$work/signed.exe" -h sha256
  sign "$work" "$work/app.exe" "$work/signed-ph.exe" -h sha384 -ph
  sign "$work" "$work/signed.exe" "$work/again.exe" -h sha256
  attach_seed "$work/plain.seed" 0 "$work/app.exe" "$work/signed.exe"
  attach_seed "$work/page-hashes.seed" 0 "$work/app.exe" "$work/signed-ph.exe"
  attach_seed "$work/replace.seed" 0 "$work/signed.exe" "$work/again.exe"
  attach_seed "$work/nested.seed" 1 "$work/signed.exe" "$work/again.exe"
  mkdir -p "$seeds/attach"
  mv "$work"/*.seed "$seeds/attach/"
  rm -rf "$work"
fi

# pe_digester: a PE after the byte that chooses the hash, page hashes, nesting and
# the pieces (SHA-256, SHA-384, SHA-512 with page hashes; a signed PE to nest into).
# patch_answer: patches of a PE's kind (the checksum and the security directory
# written over, a certificate table after the content) as JSON after their length,
# and drawn from bytes, each before its input.
if [[ ! -d $seeds/digester || ! -d $seeds/patch ]]; then
  work=$(mktemp -d)
  throwaway_key "$work"
  bash tests/fixtures/make-pe.sh "$work/app.exe"
  sign "$work" "$work/app.exe" "$work/signed.exe" -h sha256
  mkdir -p "$work/digester" "$work/patch"
  python3 - "$work" <<'PY'
import json, struct, sys
work = sys.argv[1]
app = open(f"{work}/app.exe", "rb").read()
signed = open(f"{work}/signed.exe", "rb").read()
for name, choice, pe in [("sha256", 0, app), ("sha384", 1, app), ("sha512-ph", 6, app),
                         ("nested", 8, signed), ("replace", 4, signed)]:
    open(f"{work}/digester/{name}", "wb").write(bytes([choice]) + pe)
# The signed file as osslsigncode made it, told as a patch to its input.
edits = [i for i in range(len(app)) if app[i] != signed[i]]
runs = []
for i in edits:
    if runs and i <= runs[-1][1] + 1:
        runs[-1][1] = i
    else:
        runs.append([i, i])
patch = {"keep": len(app),
         "edits": [{"at": a, "bytes": signed[a:b + 1].hex()} for a, b in runs],
         "tail": signed[len(app):].hex()}
text = json.dumps(patch).encode()
for name, choice in [("real", 7), ("real-blocks", 200)]:
    open(f"{work}/patch/{name}", "wb").write(
        bytes([choice, 0]) + struct.pack("<H", len(text)) + text + app)
small = json.dumps({"keep": 90, "edits": [{"at": 3, "bytes": "aabb"}, {"at": 9, "bytes": "01020304"}],
                    "tail": "5441494c"}).encode()
open(f"{work}/patch/small", "wb").write(bytes([1, 0]) + struct.pack("<H", len(small)) + small + bytes(range(100)))
drawn = struct.pack("<H", 200) + bytes([2, 16]) + struct.pack("<H", 8) + bytes([3]) + b"EDIT" \
    + struct.pack("<H", 40) + bytes([7]) + b"EDITEDIT" + b"T" * 16 + bytes(range(256))
open(f"{work}/patch/drawn", "wb").write(bytes([3, 1]) + drawn)
PY
  mkdir -p "$seeds/digester" "$seeds/patch"
  mv "$work"/digester/* "$seeds/digester/"
  mv "$work"/patch/* "$seeds/patch/"
  rm -rf "$work"
fi

# attach_pe with roots (flags bit 1): the fixture PE signed by a leaf certificate
# that a CA issued, the signature carrying both, the CA the root.
if [[ ! -f $seeds/attach/chain.seed ]]; then
  work=$(mktemp -d)
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -sha256 -subj "/CN=Signet fuzz CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=Signet fuzz leaf" \
    -keyout "$work/leaf.key" -out "$work/leaf.csr" 2>/dev/null
  printf 'extendedKeyUsage=codeSigning\n' >"$work/leaf.ext"
  openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null
  cat "$work/leaf.pem" "$work/ca.pem" >"$work/chain.pem"
  bash tests/fixtures/make-pe.sh "$work/app.exe"
  osslsigncode sign -certs "$work/chain.pem" -key "$work/leaf.key" -h sha256 \
    -in "$work/app.exe" -out "$work/chain.exe" >/dev/null
  attach_seed "$work/chain.seed" 2 "$work/app.exe" "$work/chain.exe"
  mkdir -p "$seeds/attach"
  mv "$work/chain.seed" "$seeds/attach/"
  rm -rf "$work"
fi

seed_dir() {
  case $1 in
    timestamp_reply) echo "$seeds/tsa" ;;
    attach_pe) echo "$seeds/attach" ;;
    pe_digester) echo "$seeds/digester" ;;
    patch_answer) echo "$seeds/patch" ;;
    format_detect | engine_*) echo "$seeds/files" ;;
    query_strings) echo "$seeds/queries" ;;
    qmp_line) echo "$seeds/qmp" ;;
    qm_config) echo "$seeds/qm" ;;
    *) echo "$seeds/files" ;;
  esac
}

# Built once, then each target's binary run directly: a source edited meanwhile does
# not rebuild anything under a running fuzzer. Targets that need neither daemon
# (FUZZ_NO_DAEMONS=1 and only such targets named) are built without signetd and
# signet-agent, which saves most of the build.
if [[ ${FUZZ_NO_DAEMONS:-} == 1 ]]; then
  (cd fuzz && for t in "${targets[@]}"; do cargo fuzz build -O --no-default-features "$t"; done)
else
  (cd fuzz && cargo fuzz build -O)
fi
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
