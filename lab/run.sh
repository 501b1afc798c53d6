#!/usr/bin/env bash
# `make lab`: the whole appliance against a real signing VM on this machine.
#  1. the signing-VM image (lab/build-image.sh, cached) and the emulated card's NSS
#     database (lab/mk-nssdb.sh);
#  2. vhost-device-vsock for the guest's vsock, QEMU (TCG, q35, UHCI) with Signet's
#     monitor socket, and the guest booting signet-agent on vsock port 7711; the
#     agent's state directory in the guest is the work dir's agent-state, shared
#     over virtio-9p (kept across resets, as a signing VM's disk);
#  3. signetd inside a umockdev testbed (the one stand-in: host-side USB presence),
#     configured for that VM: agent over vsock-uds, the token as an emulated card;
#     then the operator's pairing step: `signet-agent pair` in
#     the guest's root shell (over the console), `signetd pair CODE` on the host;
#  4. the token "plugged in" on the host: signetd hot-plugs the card into the VM over
#     QMP and gives the agent the PIN; then `signet sign` from the build VM's side
#     (the socket vhost-device-vsock delivers guest connections to the host's port
#     7710 on) and `osslsigncode verify` of the result on the host.
# LAB_KEEP=1 leaves everything running until Ctrl-C (the work dir is printed).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SIGNET_BIN_DIR:-$root/target/debug}
vhost=$root/target/lab/vhost/bin/vhost-device-vsock
[[ -x $vhost ]] || { echo "lab: $vhost missing; run scripts/install-deps.sh" >&2; exit 1; }
for b in signet signetd signet-agent; do
  [[ -x $bin/$b ]] || { echo "lab: $bin/$b missing; run 'make lab' (it builds first)" >&2; exit 1; }
done
VM=105 BUILD=106 SERIAL=LAB0TOKEN1 PIN=123456
W=$(mktemp -d "${TMPDIR:-/tmp}/signet-lab.XXXXXX")
pids=()
groups=() # process groups of our own (signetd under its testbed's wrapper and driver)
cleanup() {
  local rc=$?
  for g in "${groups[@]}"; do kill -9 -- "-$g" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if ((rc != 0)); then
    echo "lab: FAILED; logs:" >&2
    for f in "$W"/*.log; do [[ -e $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s%N; }
ms() { echo $((($(now) - $1) / 1000000)); }
step() { printf '  %-9s %s\n' "$1" "$2"; }
wait_for() { # WHAT SECONDS COMMAND...: poll until COMMAND succeeds
  local what=$1 limit=$2 t0
  shift 2
  t0=$(now)
  until "$@" >/dev/null 2>&1; do
    (($(ms "$t0") < limit * 1000)) || { echo "lab: no $what within ${limit}s" >&2; exit 1; }
    sleep 0.2
  done
}
guest_sh() { # COMMAND: runs it in the guest's root shell on the console; prints what
  # the console showed (the echo of the command line, then its output) and exits with
  # its status.
  python3 - "$W/console.sock" "$1" <<'PY'
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(120)
tag = f"__END{os.getpid()}__"
s.sendall(f"{sys.argv[2]}\necho {tag}$?\n".encode())
for raw in s.makefile("rb"):
    line = raw.decode(errors="replace").rstrip("\r\n")
    status = line.split(tag, 1)[1] if tag in line else None
    if status is not None and "$?" not in status:
        sys.exit(int(status.strip() or 1))
    print(line)
sys.exit("lab: the guest's console closed")
PY
}
echo "Signet lab (work dir $W)"

t0=$(now)
img=$(bash "$root/lab/build-image.sh" "$bin/signet-agent")
step image "$img ($(ms "$t0") ms): $(sed -n 's/^osslsigncode: //p' "$img/manifest")"
bash "$root/lab/mk-nssdb.sh" "$W/nssdb" "$PIN"
echo "$PIN" >"$W/host.pin"
chmod 600 "$W/host.pin"
bash "$root/tests/fixtures/make-pe.sh" "$W/hello.exe"
mkdir -p "$W/monitors"
mkdir -m 700 "$W/agent-state"

"$vhost" --vm "guest-cid=$VM,socket=$W/vhost.sock,uds-path=$W/vm.vsock" >"$W/vhost.log" 2>&1 &
pids+=($!)
wait_for "vhost-device-vsock socket" 30 test -S "$W/vhost.sock"
t0=$(now)
qemu-system-x86_64 -name signet-lab -accel tcg,tb-size=64 -machine q35 -cpu max -smp 1 \
  -nodefaults -nographic -display none -kernel "$img/vmlinuz" -initrd "$img/initrd.cpio" \
  -append "console=ttyS0 rdinit=/init panic=-1 loglevel=4" \
  -chardev "socket,id=con,path=$W/console.sock,server=on,wait=off,logfile=$W/console.log" -serial chardev:con \
  -chardev "file,id=agentlog,path=$W/agent.log" -serial chardev:agentlog \
  -device piix3-usb-uhci,id=uhci \
  -virtfs "local,path=$W/agent-state,mount_tag=signetstate,security_model=none,id=agentstate" \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem -m 512M \
  -chardev "socket,id=vsk,path=$W/vhost.sock" -device vhost-user-vsock-pci,chardev=vsk \
  -chardev "socket,id=signet,path=$W/monitors/vm-$VM.qmp,server=on,wait=off" -mon chardev=signet,mode=control \
  -qmp "unix:$W/test.qmp,server=on,wait=off" \
  </dev/null >"$W/qemu.log" 2>&1 &
pids+=($!)
wait_for "GUEST-READY on the console" 240 grep -q GUEST-READY "$W/console.log"
step guest "booted under TCG in $(ms "$t0") ms; agent on vsock CID $VM port 7711"

cat >"$W/signetd.toml" <<CONF
listen = ["unix:$W/signetd.sock", "vsock-uds:$W/build.vsock:7710,cid=$BUILD"]
agent = "vsock-uds:$W/vm.vsock:7711,cid=$VM"
dbus = "none"
state_dir = "$W/state"
pin_file = "$W/host.pin"
[shutdown]
logind = "none"
[profiles.release]
description = "Signet lab"
[[grants]]
callers = ["vm:$BUILD"]
profiles = ["release"]
[passthrough]
monitor_dir = "$W/monitors"
usb_bus = "uhci.0"
[[tokens]]
serial = "$SERIAL"
vm = $VM
device = { kind = "emulated-ccid", db = "sql:$W/nssdb", certs = ["lab-id", "lab-codesign", "lab-enc"] }
CONF
# In a process group of its own: killing the wrapper alone would leave signetd running.
RUST_LOG=info setsid umockdev-wrapper /usr/bin/python3 "$root/tests/fixtures/umockdev-driver.py" "$W/testbed.sock" \
  "$bin/signetd" --config "$W/signetd.toml" >"$W/signetd.log" 2>&1 &
pids+=($!)
groups+=($!)
wait_for "signetd" 60 test -S "$W/signetd.sock"
step signetd "agent vsock-uds:$W/vm.vsock:7711, build VM on $W/build.vsock_7710"

{
  wait_for "signet-agent listening in the guest" 120 grep -q listening "$W/agent.log"
  t0=$(now)
  # As the operator: in the signing VM as root, then on the host as root.
  out=$(guest_sh "signet-agent --config /etc/signet/agent.toml pair --json") ||
    { echo "$out" >&2; echo "lab: signet-agent pair in the guest failed" >&2; exit 1; }
  code=$(sed -n 's/.*"code": *"\([0-9A-Za-z-]*\)".*/\1/p' <<<"$out" | head -1)
  [[ -n $code ]] || { echo "$out" >&2; echo "lab: no pairing code from signet-agent pair --json" >&2; exit 1; }
  "$bin/signetd" --config "$W/signetd.toml" pair "$code" >"$W/pair.log" 2>&1 ||
    { cat "$W/pair.log" >&2; echo "lab: signetd pair $code failed" >&2; exit 1; }
  step pair "signetd and the agent paired with code $code: $(ms "$t0") ms"
}

t0=$(now)
python3 - "$W/testbed.sock" "$SERIAL" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(f"add 2 5 {sys.argv[2]}\n".encode())
assert s.makefile().readline().strip() == "ok"
PY
works() { SIGNET_ENDPOINT="unix:$W/signetd.sock" "$bin/signet" status --json | grep -q '"signing_works": *true'; }
wait_for "signing (token in the VM, agent logged in)" 120 works
step token "plugged on the host -> in the VM, agent logged in: $(ms "$t0") ms"

t0=$(now)
SIGNET_ENDPOINT="unix:$W/build.vsock_7710" "$bin/signet" sign -o "$W/hello-signed.exe" "$W/hello.exe" >/dev/null
step sign "hello.exe signed in the guest: $(ms "$t0") ms"
osslsigncode verify -CAfile "$W/nssdb/lab-codesign.pem" -in "$W/hello-signed.exe" >"$W/verify.log" 2>&1 ||
  { cat "$W/verify.log" >&2; exit 1; }
step verify "osslsigncode verify on the host: $(grep -m1 -o 'Signature verification: ok' "$W/verify.log" || echo ok)"
if [[ ${LAB_KEEP:-0} == 1 ]]; then
  echo "lab: running; signetd: SIGNET_ENDPOINT=unix:$W/signetd.sock; a QMP monitor of your own: $W/test.qmp; Ctrl-C stops it all"
  wait "${pids[0]}"
fi
echo "lab: OK"
