#!/usr/bin/env bash
# Before and after in one interleaved run (docs/BENCHMARKS.md, "A/B"): two agent and
# signetd pairs on one SoftHSM token, one with the binaries in BEFORE, one with those in
# AFTER (each pair signed through its own `signet`), every way interleaved round by
# round by `signet-bench interleave` (AFTER's), so the machine's load falls on both alike.
#
#   bash scripts/bench-ab.sh BEFORE_DIR AFTER_DIR [ROUNDS] [WARMUP]
#
# BEFORE_DIR and AFTER_DIR hold release builds of signet, signetd and signet-agent
# (AFTER_DIR also signet-bench): e.g. `git archive OLD | tar -x -C /tmp/old`, then
# `bash scripts/build-release.sh --bench` there, which leaves them in target/shipped/
# (older checkouts: `cargo build --release -p signetd -p signet-agent -p signet
# -p signet-pkcs11-delay`, in target/release/). Ways, on the 15 KiB PE (and
# SIGNET_AB_SIZES, bytes, e.g. "1048576"): direct osslsigncode (the reference), whole
# file and digest mode before and after; raw C_Sign on a resident session. The markdown table goes to target/bench/ab.md.
# SIGNET_AB_SYSTEM_ROOTS=1: digest mode without --ca-file (checked against this
# machine's trusted roots, as `signet sign --digest` does by default).
# SIGNET_AB_SETTLE=1: `sync` before each run, untimed (signet-bench --settle), so that
# what one way left unflushed is not written back during the next one's run.
# SIGNET_AB_SEED=N: the seed of the rounds' shuffled order (printed by each run).
# The same directory as BEFORE and AFTER (an A/A run) shows what the noise alone gives.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
(($# >= 2)) || { echo "usage: $0 BEFORE_DIR AFTER_DIR [ROUNDS] [WARMUP]" >&2; exit 2; }
before=$(cd -- "$1" && pwd)
after=$(cd -- "$2" && pwd)
runs=${3:-21}
warmup=${4:-2}
for d in "$before" "$after"; do
  for b in signet signetd signet-agent; do
    [[ -x $d/$b ]] || { echo "bench-ab: $d/$b missing" >&2; exit 1; }
  done
done
[[ -x $after/signet-bench ]] || { echo "bench-ab: $after/signet-bench missing" >&2; exit 1; }
out=$root/target/bench
mkdir -p "$out"
W=$(mktemp -d "${TMPDIR:-/tmp}/signet-ab.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

bash "$root/tests/fixtures/make-token.sh" "$W/token"
export SOFTHSM2_CONF=$W/token/softhsm2.conf
# signet keeps digest mode's profile answers here (not in the user's ~/.cache).
export XDG_CACHE_HOME=$W/cache
MOD=/usr/lib/softhsm/libsofthsm2.so
KEY="pkcs11:token=signet-demo;object=signkey;type=private"
sizes=("15_KiB:0")
for n in ${SIGNET_AB_SIZES:-}; do sizes+=("${n}_B:$n"); done
for s in "${sizes[@]}"; do
  bash "$root/tests/fixtures/make-pe.sh" "$W/pe-${s%%:*}.exe" "${s#*:}"
done

# start_pair NAME BIN: an agent (native backend) and a signetd paired with it.
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
  pids+=("$!")
  for _ in $(seq 1 100); do [[ -S $d/agent.sock ]] && break; sleep 0.1; done
  RUST_LOG=warn "$bin/signetd" --config "$d/signetd.toml" 2>"$d/signetd.log" &
  pids+=("$!")
  local code
  code=$("$bin/signet-agent" --config "$d/agent.toml" pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
  "$bin/signetd" --config "$d/signetd.toml" pair "$code" >/dev/null
  for _ in $(seq 1 100); do "$bin/signet" --endpoint "unix:$d/signetd.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin/signet" --endpoint "unix:$d/signetd.sock" status >/dev/null
}
start_pair before "$before"
start_pair after "$after"

spec=()
# Digest mode checks the signature's chain against the CA given, or with
# SIGNET_AB_SYSTEM_ROOTS=1 against this machine's trusted roots (the default of
# `signet sign --digest`; the test CA is not among them, so each run warns).
ca="--ca-file $W/token/cert.pem"
[[ -n ${SIGNET_AB_SYSTEM_ROOTS:-} ]] && ca=""
for s in "${sizes[@]}"; do
  g=${s%%:*}
  in=$W/pe-$g.exe
  spec+=(-c "$g::direct osslsigncode::osslsigncode sign -pkcs11module $MOD -key $KEY -readpass $W/token/pin -certs $W/token/cert.pem -h sha256 -in $in -out {out}")
  for side in before after; do
    bin=$before
    [[ $side == after ]] && bin=$after
    sock=unix:$W/$side/signetd.sock
    spec+=(-c "$g::whole file $side::$bin/signet --endpoint $sock sign --description run-{n} -o {out} $in")
    spec+=(-c "$g::digest $side::$bin/signet --endpoint $sock sign --description run-{n} --digest $ca -o {out} $in")
  done
done
echo "== A/B: $runs rounds ($warmup warm-up); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$after/signet-bench" interleave --runs "$runs" --warmup "$warmup" --ref "direct osslsigncode" \
  --module "$MOD" --pin-file "$W/token/pin" \
  --verify "osslsigncode verify -CAfile $W/token/cert.pem -in {out}" \
  --md "$out/ab.md" ${SIGNET_AB_SETTLE:+--settle} ${SIGNET_AB_SEED:+--seed "$SIGNET_AB_SEED"} "${spec[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
