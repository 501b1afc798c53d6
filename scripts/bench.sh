#!/usr/bin/env bash
# Signet's benchmark: every way of signing side by side in one interleaved run, as
# ratios to direct osslsigncode; throughput with concurrent callers; the same against
# a token as slow as a real one; memory on a 1 GiB input. docs/BENCHMARKS.md reads it.
#
#   make bench                              (or: bash scripts/bench.sh [--quick] [--memory])
#   --quick     few runs and jobs, no 1 GiB run (needs the release build: scripts/build-release.sh --bench)
#   --memory    with --quick: the 1 GiB run all the same
#   --slow-only only the slow token's rows (the shim): its latency and throughput
#
# Environment:
#   SIGNET_BENCH_BACKENDS   the agent's [signer] backend values to run, one column each
#                           (default "osslsigncode native"); a value the agent refuses at
#                           start is reported and skipped
#   SIGNET_SHIM_SIGN_MS     the slow token's time per signature (default 140, YubiKey 5
#                           RSA-2048), SIGNET_SHIM_LOGIN_MS its login (default 200)
#   SIGNET_BIN_DIR          where the binaries are (default target/shipped, as
#                           scripts/build-release.sh --bench leaves them)
#   SIGNET_BENCH_SLOW_JOBS  jobs per throughput row with the shim (default 32, --quick 12)
#
# One SoftHSM token (RSA-3072), PEs of 15 KiB, 1 MiB and 50 MiB. Ways:
#   raw C_Sign       one signature on a resident, logged-in session (signet-bench, in process)
#   direct           osslsigncode sign, run directly: module load, login, hash, sign
#   agent alone      curl over TLS -> POST /agent/v1/sign on the agent's unix socket
#   whole file       signet -> signetd -> signet-agent, unix sockets
#   digest           the same in digest mode (signet sign --digest)
# The slow token is test-support/pkcs11-delay, a PKCS#11 shim in front of SoftHSM that
# delays C_Sign and C_Login, lets one token operation run at a time and logs the calls.
# Results go to stdout and target/bench/ (markdown tables).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SIGNET_BIN_DIR:-$root/target/shipped}
quick=0
memory=1
slow_only=0
for a in "$@"; do
  case $a in
    --quick) quick=1; memory=0 ;;
    --memory) memory=2 ;;
    --slow-only) slow_only=1 ;;
    *) echo "usage: $0 [--quick] [--memory] [--slow-only]" >&2; exit 2 ;;
  esac
done
((memory == 2)) && memory=1
for b in signet signetd signet-agent signet-bench libsignet_pkcs11_delay.so; do
  [[ -e $bin/$b ]] || { echo "bench: $bin/$b missing; run 'make bench' (it builds first)" >&2; exit 1; }
done
for c in curl osslsigncode /usr/bin/time; do
  command -v "$c" >/dev/null || { echo "bench: $c missing (apt-get install curl osslsigncode time)" >&2; exit 1; }
done
backends=${SIGNET_BENCH_BACKENDS:-osslsigncode native}
sign_ms=${SIGNET_SHIM_SIGN_MS:-140}
login_ms=${SIGNET_SHIM_LOGIN_MS:-200}

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
B=$bin/signet-bench
SHIM=$bin/libsignet_pkcs11_delay.so

bash "$root/tests/fixtures/make-token.sh" "$W/token"
export SOFTHSM2_CONF=$W/token/softhsm2.conf
# signet keeps digest mode's profile answers here (not in the user's ~/.cache).
export XDG_CACHE_HOME=$W/cache
MOD=/usr/lib/softhsm/libsofthsm2.so
KEY="pkcs11:token=signet-demo;object=signkey;type=private"
sizes=("15 KiB:0" "1 MiB:$((1 << 20))" "50 MiB:$((50 << 20))")
for s in "${sizes[@]}"; do
  bash "$root/tests/fixtures/make-pe.sh" "$W/pe-${s%%:*}.exe" "${s#*:}"
done
pe() { echo "$W/pe-$1.exe" | tr ' ' _; }
for s in "${sizes[@]}"; do mv "$W/pe-${s%%:*}.exe" "$(pe "${s%%:*}")"; done

# start_pair NAME BACKEND MODULE [VAR=VALUE...]: an agent with that backend and module,
# and a signetd paired with it. Fails (after saying why) when the agent refuses to start.
declare -A agent_pid daemon_pid
start_pair() {
  local name=$1 backend=$2 module=$3 d=$W/$1
  shift 3
  mkdir -p "$d"
  cat > "$d/agent.toml" <<CONF
listen = "unix:$d/agent.sock"
spool_dir = "$d"
state_dir = "$d/agent-state"
[token]
module = "$module"
label = "signet-demo"
pin_file = "$W/token/pin"
[signer]
backend = "$backend"
CONF
  cat > "$d/signetd.toml" <<CONF
listen = ["unix:$d/signetd.sock"]
agent = "unix:$d/agent.sock"
dbus = "none"
state_dir = "$d/state"
[[grants]]
callers = ["uid:$(id -u)"]
profiles = ["*"]
# The concurrent callers below stand for as many VMs or users; here they are all this
# uid, whose default limit (4 jobs at once) would refuse the 5th to 8th.
[limits]
max_jobs_per_caller = 16
CONF
  env "$@" RUST_LOG=warn "$bin/signet-agent" --config "$d/agent.toml" 2>"$d/agent.log" &
  local a=$!
  pids+=("$a")
  for _ in $(seq 1 100); do
    [[ -S $d/agent.sock ]] && break
    kill -0 "$a" 2>/dev/null || break
    sleep 0.1
  done
  if [[ ! -S $d/agent.sock ]]; then
    echo "bench: skipping backend '$backend': the agent does not start with it: $(tr -s '\n ' '  ' <"$d/agent.log" | cut -c1-400)" >&2
    return 1
  fi
  RUST_LOG=warn "$bin/signetd" --config "$d/signetd.toml" 2>"$d/signetd.log" &
  local s=$!
  pids+=("$s")
  local code
  code=$("$bin/signet-agent" --config "$d/agent.toml" pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
  "$bin/signetd" --config "$d/signetd.toml" pair "$code" >/dev/null
  for _ in $(seq 1 100); do "$bin/signet" --endpoint "unix:$d/signetd.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin/signet" --endpoint "unix:$d/signetd.sock" status >/dev/null
  agent_pid[$name]=$a
  daemon_pid[$name]=$s
}

# The ways of one pair at one size, as signet-bench way specs (GROUP::NAME::COMMAND).
ways_of() {
  local group=$1 name=$2 backend=$3 in=$4 d=$W/$2
  echo "$group::agent alone ($backend)::curl -sfk --unix-socket $d/agent.sock --cert $d/state/link.crt --key $d/state/link.key --data-binary @$in -o {out} https://signet-agent/agent/v1/sign"
  echo "$group::whole file ($backend)::$bin/signet --endpoint unix:$d/signetd.sock sign --description run-{n} -o {out} $in"
  echo "$group::digest ($backend)::$bin/signet --endpoint unix:$d/signetd.sock sign --description run-{n} --digest --ca-file $W/token/cert.pem -o {out} $in"
}
direct() { echo "osslsigncode sign -pkcs11module $1 -key $KEY -readpass $W/token/pin -certs $W/token/cert.pem -h sha256 -in $2 -out {out}"; }

ran=()
for be in $backends; do
  start_pair "softhsm-$be" "$be" "$MOD" && ran+=("$be")
done
((${#ran[@]})) || { echo "bench: no backend could start; see the messages above" >&2; exit 1; }

runs=20 warmup=3 jobs=64 slow_runs=10 slow_jobs=32
((quick)) && { runs=5; warmup=1; jobs=24; slow_runs=3; slow_jobs=12; }
slow_jobs=${SIGNET_BENCH_SLOW_JOBS:-$slow_jobs}

if ((!slow_only)); then
echo "== SoftHSM: all ways interleaved, $runs rounds ($warmup warm-up), median ms and × direct osslsigncode"
spec=()
for s in "${sizes[@]}"; do
  g=${s%%:*}
  spec+=(-c "$g::direct osslsigncode::$(direct "$MOD" "$(pe "$g")")")
  for be in "${ran[@]}"; do
    while IFS= read -r w; do spec+=(-c "$w"); done < <(ways_of "$g" "softhsm-$be" "$be" "$(pe "$g")")
  done
done
"$B" interleave --runs "$runs" --warmup "$warmup" --ref "direct osslsigncode" \
  --module "$MOD" --pin-file "$W/token/pin" \
  --verify "osslsigncode verify -CAfile $W/token/cert.pem -in {out}" \
  --md "$out/latency.md" "${spec[@]}"
fi

# throughput_rows LOG RATE NAME COMMAND...: a table row each for 1, 4 and 8 callers. With
# the shim's LOG (emptied before each) and its C_Sign RATE, also what the log says.
throughput_rows() {
  local log=$1 rate=$2 name=$3 n
  shift 3
  for callers in 1 4 8; do
    n=$jobs
    [[ -n $log ]] && { n=$slow_jobs; : > "$log"; }
    local r
    r=$("$B" throughput --callers "$callers" --jobs "$n" ${log:+--log "$log"} -- "$@")
    local jps failed
    jps=$(sed -n 's/.*jobs_per_s=\([0-9.]*\).*/\1/p' <<<"$r")
    failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$r")
    if [[ -n $log ]]; then
      local f
      f=$("$B" report --fields "$log")
      field() { sed -n "s/.*\<$1=\([0-9.]*\).*/\1/p" <<<"$f"; }
      echo "| $name | $callers | $n | $jps | $failed | $(awk -v a="$jps" -v b="$rate" 'BEGIN { printf "%.2f", a / b }') | $(field busy_pct)% | $(field logins_per_job) | $(field initializes_per_job) |"
    else
      echo "| $name | $callers | $n | $jps | $failed |"
    fi
  done
}

small=$(pe "15 KiB")
if ((!slow_only)); then
echo "== SoftHSM: throughput, 15 KiB PE, 1/4/8 concurrent callers"
{
  echo "| way | callers | jobs | jobs/s | failed |"
  echo "|---|---|---|---|---|"
  # shellcheck disable=SC2046
  throughput_rows "" "" "direct osslsigncode" $(direct "$MOD" "$small")
  for be in "${ran[@]}"; do
    d=$W/softhsm-$be
    throughput_rows "" "" "whole file ($be)" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign --description "tp-{n}" -o "{out}" "$small"
    throughput_rows "" "" "digest ($be)" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign --description "tp-{n}" --digest --ca-file "$W/token/cert.pem" -o "{out}" "$small"
  done
} | tee "$out/throughput.md"

fi

echo "== a token as slow as a real one: the shim, ${sign_ms} ms per signature, ${login_ms} ms per login"
export SIGNET_SHIM_MODULE=$MOD SIGNET_SHIM_SIGN_MS=$sign_ms SIGNET_SHIM_LOGIN_MS=$login_ms
export SIGNET_SHIM_LOG=$W/shim.log SIGNET_SHIM_LOCK=$W/token.lock
slow=()
for be in "${ran[@]}"; do
  start_pair "shim-$be" "$be" "$SHIM" && slow+=("$be")
done
rate=$(SIGNET_SHIM_LOG=$W/raw.log "$B" raw-sign --module "$SHIM" --pin-file "$W/token/pin" --runs 10 |
  sed -n 's/.*sign_per_s=\([0-9.]*\).*/\1/p')
echo "the shim's C_Sign rate on a resident session: $rate/s"
spec=(-c "15 KiB::direct osslsigncode::$(direct "$SHIM" "$small")")
for be in "${slow[@]}"; do
  while IFS= read -r w; do spec+=(-c "$w"); done < <(ways_of "15 KiB" "shim-$be" "$be" "$small")
done
"$B" interleave --runs "$slow_runs" --warmup 1 --ref "direct osslsigncode" \
  --module "$SHIM" --pin-file "$W/token/pin" \
  --verify "osslsigncode verify -CAfile $W/token/cert.pem -in {out}" \
  --md "$out/slow-latency.md" "${spec[@]}"
{
  echo "The shim's C_Sign rate on a resident session: $rate/s."
  echo
  echo "| way | callers | jobs | jobs/s | failed | × C_Sign rate | token busy | C_Login per job | C_Initialize per job |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for be in "${slow[@]}"; do
    d=$W/shim-$be
    throughput_rows "$W/shim.log" "$rate" "whole file ($be)" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign --description "slow-{n}" -o "{out}" "$small"
    throughput_rows "$W/shim.log" "$rate" "digest ($be)" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign --description "slow-{n}" --digest --ca-file "$W/token/cert.pem" -o "{out}" "$small"
  done
} | tee "$out/slow-throughput.md"
unset SIGNET_SHIM_MODULE SIGNET_SHIM_SIGN_MS SIGNET_SHIM_LOGIN_MS SIGNET_SHIM_LOG SIGNET_SHIM_LOCK

if ((!memory || slow_only)); then
  ((slow_only)) || echo "(--quick: skipping the 1 GiB memory run; add --memory for it)"
  exit 0
fi
echo "== memory while a 1 GiB PE goes through the whole path (whole file)"
bash "$root/tests/fixtures/make-pe.sh" "$W/big.exe" $((1 << 30))
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
{
  echo "| backend | signet-agent | signetd | signet (client) | seconds |"
  echo "|---|---|---|---|---|"
  for be in "${ran[@]}"; do
    d=$W/softhsm-$be
    start=$(date +%s%N)
    /usr/bin/time -f "%M" -o "$W/client.rss" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign -o "$W/big-signed.exe" "$W/big.exe"
    ms=$((($(date +%s%N) - start) / 1000000))
    osslsigncode verify -CAfile "$W/token/cert.pem" -in "$W/big-signed.exe" >/dev/null
    rm -f "$W/big-signed.exe"
    echo "| $be | $(($(hwm "${agent_pid[softhsm-$be]}") / 1024)) MiB | $(($(hwm "${daemon_pid[softhsm-$be]}") / 1024)) MiB | $(($(cat "$W/client.rss") / 1024)) MiB | $((ms / 1000)).$(printf %03d $((ms % 1000))) |"
  done
  echo
  echo "Peak RSS (VmHWM) of the agent and signetd since they started (every run above"
  echo "included); the client's maximum RSS."
  echo
  echo "Digest mode, the same 1 GiB PE: the client extracts and attaches"
  echo "natively (no osslsigncode); its maximum RSS and time."
  echo
  echo "| way | signet (client) | seconds |"
  echo "|---|---|---|"
  d=$W/softhsm-${ran[0]}
  start=$(date +%s%N)
  /usr/bin/time -f "%M" -o "$W/client.rss" "$bin/signet" --endpoint "unix:$d/signetd.sock" sign --digest --ca-file "$W/token/cert.pem" -o "$W/big-signed.exe" "$W/big.exe"
  ms=$((($(date +%s%N) - start) / 1000000))
  osslsigncode verify -CAfile "$W/token/cert.pem" -in "$W/big-signed.exe" >/dev/null
  rm -f "$W/big-signed.exe"
  echo "| digest (native PE) | $(($(cat "$W/client.rss") / 1024)) MiB | $((ms / 1000)).$(printf %03d $((ms % 1000))) |"
} | tee "$out/memory.md"
