#!/usr/bin/env bash
# Signet's benchmark: time per signature along the job path, and memory on a 1 GiB input.
#
#   make bench            (or: bash scripts/bench.sh [--quick])
#
# One SoftHSM token (RSA-3072), one 1 MiB PE, three ways side by side with hyperfine:
#   (a) osslsigncode sign, run directly      — the floor: module load, login, hash, sign
#   (b) the agent alone (POST /agent/v1/sign over its unix socket, with curl)
#   (c) the whole path: signet -> signetd -> signet-agent, unix sockets, in digest and
#       whole-file mode
# Then the peak RSS of signet, signetd and signet-agent while a 1 GiB PE goes through
# the whole path. Results go to stdout and target/bench/ (markdown tables).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SIGNET_BIN_DIR:-$root/target/release}
quick=0
[[ ${1:-} == --quick ]] && quick=1
for b in signet signetd signet-agent; do
  [[ -x $bin/$b ]] || { echo "bench: $bin/$b missing; run 'make bench' (it builds first)" >&2; exit 1; }
done
for c in hyperfine curl /usr/bin/time; do
  command -v "$c" >/dev/null || { echo "bench: $c missing (apt-get install hyperfine curl time)" >&2; exit 1; }
done

out=$root/target/bench
mkdir -p "$out"
W=$(mktemp -d "${TMPDIR:-/tmp}/signet-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

bash "$root/tests/fixtures/make-token.sh" "$W/token"
bash "$root/tests/fixtures/make-pe.sh" "$W/in.exe" $((1 << 20))
export SOFTHSM2_CONF=$W/token/softhsm2.conf
MOD=/usr/lib/softhsm/libsofthsm2.so
KEY="pkcs11:token=signet-demo;object=signkey;type=private"

cat > "$W/agent.toml" <<CONF
listen = "unix:$W/agent.sock"
spool_dir = "$W"
state_dir = "$W/agent-state"
[token]
module = "$MOD"
label = "signet-demo"
pin_file = "$W/token/pin"
CONF
cat > "$W/signetd.toml" <<CONF
listen = ["unix:$W/signetd.sock"]
agent = "unix:$W/agent.sock"
dbus = "none"
state_dir = "$W/state"
[[grants]]
callers = ["uid:$(id -u)"]
profiles = ["*"]
CONF
RUST_LOG=warn "$bin/signet-agent" --config "$W/agent.toml" 2>"$W/agent.log" &
agent_pid=$!
pids+=("$agent_pid")
RUST_LOG=warn "$bin/signetd" --config "$W/signetd.toml" 2>"$W/signetd.log" &
daemon_pid=$!
pids+=("$daemon_pid")
export SIGNET_ENDPOINT=unix:$W/signetd.sock
for _ in $(seq 1 100); do test -S "$W/agent.sock" && break; sleep 0.1; done
code=$("$bin/signet-agent" --config "$W/agent.toml" pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
"$bin/signetd" --config "$W/signetd.toml" pair "$code" >/dev/null
for _ in $(seq 1 100); do "$bin/signet" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/signet" status >/dev/null

runs=30
((quick)) && runs=5
echo "== time per signature, 1 MiB PE, $runs runs each"
# (c): each run asks with another description (the shell's pid), so each is a new job
# and really signed: the same request again would get the job's kept result back (the
# client's derived idempotency key). That costs one sh start per run.
hyperfine --warmup 3 --runs "$runs" -N --export-markdown "$out/per-signature.md" \
  --prepare "rm -f $W/a.exe" --prepare true --prepare true --prepare true \
  -n "(a) osslsigncode sign" \
  "osslsigncode sign -pkcs11module $MOD -key $KEY -readpass $W/token/pin -certs $W/token/cert.pem -h sha256 -in $W/in.exe -out $W/a.exe" \
  -n "(b) agent alone" \
  "curl -sfk --unix-socket $W/agent.sock --cert $W/state/link.crt --key $W/state/link.key --data-binary @$W/in.exe -o $W/b.exe https://signet-agent/agent/v1/sign" \
  -n "(c) signet -> signetd -> agent" \
  "sh -c '$bin/signet sign --description run-\$\$ -o $W/c.exe $W/in.exe'" \
  -n "(c) same, digest mode" \
  "sh -c '$bin/signet sign --description run-\$\$ --digest --ca-file $W/token/cert.pem -o $W/d.exe $W/in.exe'"
for f in a b c d; do
  osslsigncode verify -CAfile "$W/token/cert.pem" -in "$W/$f.exe" >/dev/null || { echo "bench: $f.exe does not verify" >&2; exit 1; }
done

echo "== bytes on the wire for a 64 MiB PE, whole file vs digest mode"
bash "$root/tests/fixtures/make-pe.sh" "$W/mid.exe" $((64 << 20))
cp "$W/mid.exe" "$W/mid2.exe"
whole=$("$bin/signet" sign --json -o "$W/mid-w.exe" "$W/mid.exe")
digest=$("$bin/signet" sign --json --digest --ca-file "$W/token/cert.pem" -o "$W/mid-d.exe" "$W/mid2.exe")
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" <<<"$2"; }
{
  echo "| mode | bytes sent | bytes received | seconds |"
  echo "|---|---|---|---|"
  echo "| whole file | $(field bytes_sent "$whole") | $(field bytes_received "$whole") | $(field seconds "$whole") |"
  echo "| digest | $(field bytes_sent "$digest") | $(field bytes_received "$digest") | $(field seconds "$digest") |"
} | tee "$out/bytes.md"

if ((quick)); then
  echo "(--quick: skipping the 1 GiB memory run)"
  exit 0
fi
echo "== memory while a 1 GiB PE goes through the whole path"
bash "$root/tests/fixtures/make-pe.sh" "$W/big.exe" $((1 << 30))
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
agent_before=$(hwm "$agent_pid")
daemon_before=$(hwm "$daemon_pid")
start=$(date +%s%N)
/usr/bin/time -f "%M" -o "$W/client.rss" "$bin/signet" sign -o "$W/big-signed.exe" "$W/big.exe"
ms=$((($(date +%s%N) - start) / 1000000))
osslsigncode verify -CAfile "$W/token/cert.pem" -in "$W/big-signed.exe" >/dev/null
{
  echo "| process | peak RSS before | peak RSS after signing 1 GiB |"
  echo "|---|---|---|"
  echo "| signet-agent | $((agent_before / 1024)) MiB | $(($(hwm "$agent_pid") / 1024)) MiB |"
  echo "| signetd | $((daemon_before / 1024)) MiB | $(($(hwm "$daemon_pid") / 1024)) MiB |"
  echo "| signet (client) | — | $(($(cat "$W/client.rss") / 1024)) MiB |"
  echo
  echo "1 GiB PE signed and verified through the whole path in $ms ms."
} | tee "$out/memory.md"
