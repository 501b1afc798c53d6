#!/usr/bin/env bash
# The main job on an embedded default: a SoftHSM token with an RSA-3072 key and a
# self-signed code-signing certificate, a small Windows PE, signet-agent and signetd on
# unix sockets, `signet sign` through the whole path, `osslsigncode verify` at the end.
# Everything lives in a temp dir and every process it starts is stopped on exit.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SIGNET_BIN_DIR:-$root/target/debug}
for b in signet signetd signet-agent; do
  [[ -x $bin/$b ]] || { echo "demo: $bin/$b missing; run 'make demo' (it builds first)" >&2; exit 1; }
done

W=$(mktemp -d "${TMPDIR:-/tmp}/signet-demo.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if ((rc != 0)); then
    echo "demo: FAILED; logs:" >&2
    for f in "$W"/*.log; do [[ -e $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "$W"
}
trap cleanup EXIT

step() { printf '  %-9s %s\n' "$1" "$2"; }
echo "Signet demo (work dir $W)"

t0=$(date +%s%N)
bash "$root/tests/fixtures/make-token.sh" "$W/token"
step token "SoftHSM token \"signet-demo\" (serial $(cat "$W/token/token-serial")): RSA-3072 key + self-signed code-signing certificate, $((($(date +%s%N) - t0) / 1000000)) ms"

cat > "$W/agent.toml" <<CONF
listen = "unix:$W/agent.sock"
spool_dir = "$W"
state_dir = "$W/agent-state"
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "signet-demo"
pin_file = "$W/token/pin"
CONF
cat > "$W/signetd.toml" <<CONF
listen = ["unix:$W/signetd.sock"]
agent = "unix:$W/agent.sock"
dbus = "none"
state_dir = "$W/state"
[profiles.release]
description = "Signet demo"
[[grants]]
callers = ["uid:$(id -u)"]
profiles = ["*"]
CONF

SOFTHSM2_CONF=$W/token/softhsm2.conf "$bin/signet-agent" --config "$W/agent.toml" >"$W/agent.log" 2>&1 &
pids+=($!)
"$bin/signetd" --config "$W/signetd.toml" >"$W/signetd.log" 2>&1 &
pids+=($!)
export SIGNET_ENDPOINT=unix:$W/signetd.sock

# Pair them, as the operator does once: `signet-agent pair` in the signing VM shows a
# one-time code, `signetd pair CODE` on the host proves it; from then on they answer
# only each other (TLS with both keys pinned).
for _ in $(seq 1 100); do test -S "$W/agent.sock" && break; sleep 0.1; done
code=$("$bin/signet-agent" --config "$W/agent.toml" pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
"$bin/signetd" --config "$W/signetd.toml" pair "$code" >"$W/pair.txt" 2>&1 || { cat "$W/pair.txt" >&2; exit 1; }
step pair "signetd and signet-agent paired with the one-time code $code"

# Wait (bounded) until the daemon answers and the agent reports the token ready.
for _ in $(seq 1 100); do
  "$bin/signet" status >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin/signet" status >"$W/status.txt" 2>&1 || { cat "$W/status.txt" >&2; exit 1; }
step agent "signet-agent on unix:$W/agent.sock, logged in to the token"
step daemon "signetd on $SIGNET_ENDPOINT, relaying to the agent"

cp "$W/token/hello.exe" "$W/app.exe"
size=$(stat -c %s "$W/app.exe")
t0=$(date +%s%N)
"$bin/signet" sign --description "Signet demo app" "$W/app.exe" 2>"$W/sign.txt" || { cat "$W/sign.txt" >&2; exit 1; }
ms=$((($(date +%s%N) - t0) / 1000000))
step sign "signet sign app.exe: $size -> $(stat -c %s "$W/app.exe") bytes in $ms ms (client -> signetd -> agent -> osslsigncode -> token)"

osslsigncode verify -CAfile "$W/token/cert.pem" -in "$W/app.exe" >"$W/verify.txt" 2>&1 || { cat "$W/verify.txt" >&2; exit 1; }
subject=$(grep -m1 -o 'Subject: .*' "$W/verify.txt" || true)
step verify "osslsigncode verify: $(tail -n1 "$W/verify.txt") — ${subject:-signature checked}"
echo "Signed and verified. Stopping the agent and the daemon."
