#!/usr/bin/env bash
# Before and after in one interleaved run (docs/BENCHMARKS.md): two agent and signetd
# pairs (native backend) on one SoftHSM token, one from each directory of release
# binaries, and direct osslsigncode beside them; 1 MiB and 50 MiB PEs, the agent alone
# (curl over TLS -> POST /agent/v1/sign) and the whole file through signetd.
#
#   bash scripts/bench-ab-large.sh BEFORE_BIN_DIR AFTER_BIN_DIR ROUNDS
#   MD=FILE          where the markdown table goes (default target/bench/ab.md)
#   SETUP_ONLY=SECS  start both pairs, print the work directory, wait SECS, stop
#                    (to profile one agent by hand)
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
before=$1 after=$2 runs=$3
W=$(mktemp -d "${TMPDIR:-/tmp}/signet-bench-ab.XXXXXX")
echo "work dir $W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
bash "$root/tests/fixtures/make-token.sh" "$W/token" >/dev/null
export SOFTHSM2_CONF=$W/token/softhsm2.conf
MOD=/usr/lib/softhsm/libsofthsm2.so
KEY="pkcs11:token=signet-demo;object=signkey;type=private"
bash "$root/tests/fixtures/make-pe.sh" "$W/pe-1M.exe" $((1 << 20))
bash "$root/tests/fixtures/make-pe.sh" "$W/pe-50M.exe" $((50 << 20))
start_pair() {
  local name=$1 bin=$2 d=$W/$1
  mkdir -p "$d"
  cat > "$d/agent.toml" <<CONF
listen = "unix:$d/agent.sock"
spool_dir = "$d"
state_dir = "$d/agent-state"
[token]
module = "$MOD"
label = "signet-demo"
pin_file = "$W/token/pin"
[signer]
backend = "native"
CONF
  cat > "$d/signetd.toml" <<CONF
listen = ["unix:$d/signetd.sock"]
agent = "unix:$d/agent.sock"
dbus = "none"
state_dir = "$d/state"
[[grants]]
callers = ["uid:$(id -u)"]
profiles = ["*"]
CONF
  RUST_LOG=warn "$bin/signet-agent" --config "$d/agent.toml" 2>"$d/agent.log" &
  pids+=($!); echo "$name agent pid $!"
  for _ in $(seq 1 100); do [[ -S $d/agent.sock ]] && break; sleep 0.1; done
  RUST_LOG=warn "$bin/signetd" --config "$d/signetd.toml" 2>"$d/signetd.log" &
  pids+=($!); echo "$name signetd pid $!"
  local code
  code=$("$bin/signet-agent" --config "$d/agent.toml" pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
  "$bin/signetd" --config "$d/signetd.toml" pair "$code" >/dev/null
  for _ in $(seq 1 100); do "$bin/signet" --endpoint "unix:$d/signetd.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
}
start_pair before "$before"
start_pair after "$after"
if [[ -n ${SETUP_ONLY:-} ]]; then echo ready; sleep "${SETUP_ONLY}"; exit 0; fi
spec=()
for g in 1M 50M; do
  in=$W/pe-$g.exe
  spec+=(-c "$g::direct osslsigncode::osslsigncode sign -pkcs11module $MOD -key $KEY -readpass $W/token/pin -certs $W/token/cert.pem -h sha256 -in $in -out {out}")
  for p in before after; do
    d=$W/$p bin=$before; [[ $p == after ]] && bin=$after
    spec+=(-c "$g::agent alone ($p)::curl -sfk --unix-socket $d/agent.sock --cert $d/state/link.crt --key $d/state/link.key --data-binary @$in -o {out} https://signet-agent/agent/v1/sign")
    spec+=(-c "$g::whole file ($p)::$bin/signet --endpoint unix:$d/signetd.sock sign --description run-{n} -o {out} $in")
  done
done
mkdir -p "$root/target/bench"
uptime
"$after/signet-bench" interleave --runs "$runs" --warmup 2 --ref "direct osslsigncode" \
  --verify "osslsigncode verify -CAfile $W/token/cert.pem -in {out}" \
  --md "${MD:-$root/target/bench/ab.md}" "${spec[@]}"
uptime
