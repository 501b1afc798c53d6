#!/usr/bin/env bash
# Runs inside the packaging test's Debian 12 guest, as root, under systemd (the unit
# signet-packaging-test.service starts it from the payload disk at /payload). Installs
# the three packages with apt, checks what they installed and that it works, then
# reinstalls, upgrades, removes and purges them. One "ok"/"not ok" line per check
# (TAP-like); exit status 0 only when every check passed.
set -uo pipefail
P=/payload
fails=0
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
bad() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $*"; }
# check DESCRIPTION COMMAND...: the command's success is the check's.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; printf '#   %s\n' "$@" "${out//$'\n'/$'\n#   '}"; fi
}
# mode OWNER:GROUP PATH: stat's view equals it
mode() { check "$3 is $1 $2" test "$(stat -c '%a %U:%G' "$3" 2>&1)" = "$1 $2"; }
diag() { printf '#   %s\n' "$@"; }
journal() { journalctl -b --no-pager -n 30 -u "$1" | sed 's/^/#   /'; }
# The score systemd-analyze gives a unit (online: as loaded, drop-ins included).
score() { systemd-analyze security "$@" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a + 0 <= b + 0) }'; }

echo "# guest: $(uname -r), $(systemctl --version | head -1)"
export DEBIAN_FRONTEND=noninteractive
mkdir -p /root/debs /root/upgrade
cp "$P"/debs/*.deb /root/debs/
cp "$P"/upgrade/*.deb /root/upgrade/
version=$(cat "$P/version")
upversion=$(cat "$P/upgrade-version")

# --- install, as an admin would: apt with the packages' files (the dependencies are
# already in the image; the guest has no archive to fetch from).
dpkg-query -W -f '${Package}\n' | sort >/root/packages.before
check "apt-get installs the three packages" \
  apt-get install -y --no-install-recommends /root/debs/signet_*.deb /root/debs/signet-agent_*.deb /root/debs/signet-client_*.deb
for p in signet signet-agent signet-client; do
  check "$p $version is installed" test "$(dpkg-query -W -f '${Status} ${Version}' $p)" = "install ok installed $version"
done

# --- files, owners and modes
for b in signetd signetctl signet-agent signet; do
  mode 755 root:root /usr/bin/$b
  check "man page of $b" test -s /usr/share/man/man1/$b.1.gz
  check "bash completion of $b" test -s /usr/share/bash-completion/completions/$b
  check "zsh completion of $b" test -s /usr/share/zsh/vendor-completions/_$b
  check "fish completion of $b" test -s /usr/share/fish/vendor_completions.d/$b.fish
done
check "man signetd-enroll-signing-vm" test -s /usr/share/man/man1/signetd-enroll-signing-vm.1.gz
# The client is linked statically (scripts/build-release.sh: with musl, else glibc)
# and still resolves host names (here through /etc/hosts): refused at that address's
# port 9, not left without one.
check "signet is linked statically" bash -c 'ldd /usr/bin/signet 2>&1 | grep -q "statically linked"'
grep -q signet-resolve-test /etc/hosts 2>/dev/null || echo "127.0.0.1 signet-resolve-test" >>/etc/hosts
check "the static signet resolves a host name" bash -c \
  'out=$(signet --endpoint tcp:signet-resolve-test:9 status 2>&1); echo "$out"; grep -q "Connection refused" <<<"$out"'
mode 700 root:root /var/lib/signet
mode 755 root:root /etc/signet
mode 644 root:root /etc/signet/signetd.toml
mode 700 root:root /etc/signet/private
mode 644 root:root /lib/systemd/system/signetd.service
mode 644 root:root /lib/systemd/system/signet-agent.service
mode 644 root:root /usr/share/dbus-1/system.d/org.signet.Signet1.conf
mode 644 root:root /lib/udev/rules.d/60-signet.rules
mode 755 root:root /usr/share/signet/proxmox-plugin/install.sh
mode 755 root:root /usr/lib/signet/signet-notify
mode 644 root:root /lib/systemd/system/signet-notify.socket
mode 644 root:root /lib/systemd/system/signet-notify@.service
for t in subject.txt body.txt body.html; do
  mode 644 root:root /usr/share/pve-manager/templates/default/signet-alert-$t.hbs
done
check "signet-notify hands alerts to PVE::Notify" grep -q 'PVE::Notify::notify' /usr/lib/signet/signet-notify
mode 644 root:root /usr/share/doc/signet-agent/examples/agent.toml
mode 644 root:root /usr/share/cmake/Signet/SignetConfig.cmake
mode 644 root:root /usr/share/cmake/Signet/SignetSign.cmake
check "/etc/signet/signetd.toml is a conffile of signet" \
  grep -q '^ /etc/signet/signetd.toml ' <(dpkg-query -W -f '${Conffiles}\n' signet)
check "the signet group exists" getent group signet
check "the signet-admin group exists" getent group signet-admin
udev_test=$(udevadm test /sys/class/mem/null 2>&1)
check "udev reads 60-signet.rules" grep -q 60-signet.rules <<<"$udev_test"
check "udev finds nothing wrong in it" bash -c '! grep -Ei "60-signet.rules.*(invalid|error|unknown|fail)" <<<"$1"' _ "$udev_test"
check "signetd, signet-agent and signet-notify.socket are enabled" \
  systemctl is-enabled signetd signet-agent signet-notify.socket
check "apt installed the three packages and nothing else" \
  test "$(comm -13 /root/packages.before <(dpkg-query -W -f '${Package}\n' | sort) | tr '\n' ' ')" = "signet signet-agent signet-client "
check "their dependencies name no test tooling" \
  bash -c '! dpkg-query -W -f "\${Depends} \${Recommends}\n" signet signet-agent signet-client |
    grep -Ei "qemu|mingw|softhsm|umockdev|chromium|wixl|msitools|gcab|nodejs|opensc|certutil|cargo"'

# --- the units with the default configuration: signetd starts (READY), the agent
# waits for /etc/signet/agent.toml.
check "signetd is active with the default configuration" systemctl is-active signetd
[[ $(systemctl is-active signetd) == active ]] || journal signetd
check "signetd told systemd it is listening (sd_notify STATUS, READY)" \
  bash -c 'systemctl show -p StatusText --value signetd | grep -q "^listening on unix:/run/signet/signetd.sock"'
check "the agent waits for its configuration (condition not met, not failed)" \
  bash -c '[ "$(systemctl show -p ConditionResult --value signet-agent)" = no ] && ! systemctl is-failed -q signet-agent'
mode 755 root:root /run/signet
mode 660 root:signet /run/signet/signetd.sock

# --- the alert relay (docs/ALERTS.md): signet-notify.socket listens, root's only; a
# connection starts signet-notify@.service, which delivers outside signetd's sandbox.
# Postfix stands in: /usr/sbin/sendmail records its arguments, its mail and its cgroup,
# and runs a setgid stand-in for postdrop (a copy of id, setgid mail) whose effective
# group shows whether setgid took effect (NoNewPrivileges would keep it root).
check "signet-notify.socket is listening" systemctl is-active signet-notify.socket
mode 600 root:root /run/signet/notify.sock
install -d -m 0755 /var/spool/signet-test-mail
install -m 2755 -g mail /usr/bin/id /usr/local/sbin/signet-test-postdrop
cat >/usr/sbin/sendmail <<'SH'
#!/bin/sh
# The packaging test's stand-in for Postfix's sendmail.
n=/var/spool/signet-test-mail/$(date +%s%N)-$$
echo "$*" >"$n.args"
/usr/local/sbin/signet-test-postdrop -gn >"$n.egid"
cat /proc/self/cgroup >"$n.cgroup"
cat >"$n.mail"
SH
chmod 0755 /usr/sbin/sendmail
# relay JSON: one request to the socket as the user running it; prints the answer.
cat >/usr/local/lib/signet-test-relay.pl <<'PL'
use strict;
use IO::Socket::UNIX;
my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => '/run/signet/notify.sock')
    or die "connect: $!\n";
print $s $ARGV[0];
shutdown($s, 1);
print while <$s>;
PL
relay() { perl /usr/local/lib/signet-test-relay.pl "$1"; }
mails() { ls /var/spool/signet-test-mail/*.mail 2>/dev/null | wc -l; }
req='{"door":"mail","to":["root"],"message":{"kind":"token-lost","state":"raised","severity":"warning","title":"the signing token is lost","detail":"packaging test","subject":"","since":"2026-12-02T22:00:00Z","at":"2026-12-02T22:02:00Z","hostname":"guest"}}'
check "a mail request through the socket is answered ok" test "$(relay "$req")" = ok
m=$(ls /var/spool/signet-test-mail/*.mail 2>/dev/null | head -1)
check "the relay ran sendmail -t -oi" test "$(cat "${m%.mail}.args" 2>&1)" = "-t -oi"
check "sendmail got the composed mail" grep -q '^X-Signet-Alert: token-lost$' "$m"
check "postdrop's setgid took effect in the relay (no NoNewPrivileges)" \
  test "$(cat "${m%.mail}.egid" 2>&1)" = mail
check "sendmail ran in signet-notify@.service" grep -q 'signet-notify@' "${m%.mail}.cgroup"
check "under NoNewPrivileges, as in signetd's sandbox, the same setgid does not take effect" \
  test "$(systemd-run --wait --pipe --quiet -p NoNewPrivileges=yes /usr/local/sbin/signet-test-postdrop -gn 2>&1)" = root
# The PVE door runs the shipped helper; this guest has neither PVE nor Perl's JSON::PP,
# so its error (with the helper's words) is the answer.
check "a PVE request runs /usr/lib/signet/signet-notify and brings back its error" \
  bash -c '[[ $(perl /usr/local/lib/signet-test-relay.pl "${1/"\"door\":\"mail\",\"to\":[\"root\"],"/"\"door\":\"pve\","}") == "failed: /usr/lib/signet/signet-notify failed"*"Can'"'"'t locate"* ]]' \
  _ "$req"
# (the whole journal: a process this short may be gone before journald sees its unit)
check "the relay logged the delivery" \
  bash -c 'for _ in $(seq 100); do
    journalctl -b --no-pager | grep -q "alert handed to sendmail" && exit 0
    sleep 0.1
  done; exit 1'
n0=$(mails)
check "a request naming a program is refused, and nothing runs" \
  bash -c '[[ $(perl /usr/local/lib/signet-test-relay.pl "$1") == "failed: the request is not an alert relay request"* ]]' \
  _ '{"door":"exec","program":"/bin/sh"}'
check "a mail address with a line end is refused" \
  bash -c '[[ $(perl /usr/local/lib/signet-test-relay.pl "$1") == *"is not a mail address"* ]]' \
  _ "${req/'"to":["root"]'/'"to":["root\nBcc: x@y"]'}"
check "nothing was sent for the refused requests" test "$(mails)" = "$n0"
out=$(runuser -u nobody -- perl /usr/local/lib/signet-test-relay.pl "$req" 2>&1)
check "another user cannot connect to the relay" bash -c '[[ $1 == "connect: Permission denied"* ]]' _ "$out"
check "nothing was sent for that user" test "$(mails)" = "$n0"

# --- scores: signetd <= 4.0, signet-agent <= 2.0 (offline, the unit files as shipped)
s=$(score --offline=true /lib/systemd/system/signetd.service)
if le "$s" 4.0; then ok "signetd.service exposure $s <= 4.0"; else bad "signetd.service exposure '$s' <= 4.0"; fi
s=$(score --offline=true /lib/systemd/system/signet-agent.service)
if le "$s" 2.0; then ok "signet-agent.service exposure $s <= 2.0"; else bad "signet-agent.service exposure '$s' <= 2.0"; fi
s=$(score --offline=true /lib/systemd/system/signet-notify@.service)
if le "$s" 3.0; then ok "signet-notify@.service exposure $s <= 3.0"; else bad "signet-notify@.service exposure '$s' <= 3.0"; fi
s=$(score signetd.service)
if le "$s" 4.0; then ok "signetd.service exposure as loaded $s <= 4.0"; else bad "signetd.service exposure as loaded '$s' <= 4.0"; fi

# --- a token (SoftHSM, made here), the agent and signetd configured for it on unix
# sockets, a file signed through the installed units.
tok=/var/lib/signet-test-token
mkdir -p "$tok/bin"
cp "$P/make-token.sh" "$tok/bin/"
printf '#!/bin/sh\ncp %s "$1"\n' "$P/hello.exe" >"$tok/bin/make-pe.sh"
chmod +x "$tok/bin/"*.sh
check "a SoftHSM token with a key and a code-signing certificate" bash "$tok/bin/make-token.sh" "$tok/t"
install -m 0600 "$tok/t/pin" /etc/signet/private/pin
cat >/etc/signet/agent.toml <<CONF
listen = "unix:/run/signet-agent/agent.sock"
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "signet-demo"
pin_file = "/etc/signet/private/pin"
CONF
# SoftHSM keeps its token in files it writes at login: the test's token store, for
# the agent only (a USB token needs none of this).
mkdir -p /etc/systemd/system/signet-agent.service.d
cat >/etc/systemd/system/signet-agent.service.d/softhsm.conf <<CONF
[Service]
Environment=SOFTHSM2_CONF=$tok/t/softhsm2.conf
ReadWritePaths=$tok/t
CONF
# Enroll under the unit's sandbox: a stand-in for Proxmox's qm keeps the VMs'
# configurations in /etc/pve (as qm writes pmxcfs there); signetd runs it and writes
# the grant into /etc/signet/signetd.toml.
mkdir -p /etc/pve/fake-qm
install -m 0755 "$P/fake-qm" /usr/local/sbin/fake-qm
cp "$P/simple1.conf" /etc/pve/fake-qm/104.conf
mkdir -p /etc/systemd/system/signetd.service.d
printf '[Service]\nEnvironment=FAKE_QM_DIR=/etc/pve/fake-qm\n' >/etc/systemd/system/signetd.service.d/fake-qm.conf
cat >/etc/signet/signetd.toml <<CONF
# the packaging test's configuration
listen = ["unix:/run/signet/signetd.sock"]
agent = "unix:/run/signet-agent/agent.sock"
default_profile = "test"
[passthrough]
enabled = false
[doctor]
qm = "/usr/local/sbin/fake-qm"
[profiles.test]
description = "Signet packaging test"
[[grants]]
callers = ["uid:0", "group:signet"]
profiles = ["*"]
[alerts]
pve = "off"
sendmail = "/usr/sbin/sendmail"
mail_to = ["root"]
agent_unreachable_seconds = 0
hold_down_seconds = 0
CONF
systemctl daemon-reload
check "signet-agent starts (READY) with its configuration" systemctl start signet-agent
[[ $(systemctl is-active signet-agent) == active ]] || journal signet-agent
check "signet-agent told systemd it is listening" \
  bash -c 'systemctl show -p StatusText --value signet-agent | grep -q "^listening on unix:/run/signet-agent/agent.sock"'
check "signetd restarts (READY) with the test configuration" systemctl restart signetd
[[ $(systemctl is-active signetd) == active ]] || journal signetd
s=$(score signet-agent.service)
if le "$s" 2.0; then ok "signet-agent.service exposure as loaded $s <= 2.0"; else bad "signet-agent.service exposure as loaded '$s' <= 2.0"; fi
mode 700 root:root /run/signet-agent
mode 700 root:root /var/lib/signet-agent
mode 600 root:root /var/lib/signet-agent/link.key
mode 600 root:root /var/lib/signet/link.key
# Pairing, as the operator does it: `signet-agent pair` in the signing VM shows a
# one-time code, typed into `signetd pair` on the host; the running units take it.
code=$(signet-agent --config /etc/signet/agent.toml pair | sed -n 's/^Pairing code: \([A-Z0-9-]*\).*/\1/p')
check "signet-agent pair shows a one-time code" test -n "$code"
check "signetd pair CODE pins the agent's key" signetd pair "$code"
mode 600 root:root /var/lib/signet/agent.pin
mode 600 root:root /var/lib/signet-agent/host.pin
check "the code works once" bash -c "! signetd pair $code"
export SIGNET_ENDPOINT=unix:/run/signet/signetd.sock
# The agent logs in once signetd's first health poll reaches it: wait (bounded).
for _ in $(seq 1 120); do signet status >/dev/null 2>&1 && break; sleep 1; done
check "signet status: the appliance can sign" signet status
sign_and_verify() { # NAME: a fresh copy of the PE signed through the units, verified
  cp "$P/hello.exe" "/root/$1.exe"
  check "signet sign $1.exe through signetd and the agent" signet sign "/root/$1.exe"
  check "osslsigncode verify $1.exe" osslsigncode verify -CAfile "$tok/t/cert.pem" -in "/root/$1.exe"
}
sign_and_verify first
check "signetctl status over the system bus" signetctl status
check "the audit chain verifies" signetd audit verify
records() { signetd audit export 2>/dev/null | wc -l; }
check "signetctl enroll build-vm 104: qm run by the sandboxed signetd" signetctl enroll build-vm 104 --profile test
check "qm wrote the VM's vsock device into /etc/pve" grep -q "^args: .*vhost-vsock-pci,guest-cid=104" /etc/pve/fake-qm/104.conf
check "signetd wrote the VM's grant into /etc/signet/signetd.toml" grep -q '"vm:104"' /etc/signet/signetd.toml
check "the changed configuration is still valid" signetd check-config
cp /etc/signet/signetd.toml /root/signetd.toml.test
r0=$(records)
check "the audit log has records" test "$r0" -gt 0

# --- systemctl reload signetd: check-config, then SIGHUP; the same process goes on
pid0=$(systemctl show -p MainPID --value signetd)
reloads() { journalctl -b --no-pager -u signetd | grep -c "configuration reloaded" || true; }
n0=$(reloads)
check "systemctl reload signetd" systemctl reload signetd
# (ExecReload only sends the signal: wait for one more such line, at most 10 s)
check "signetd logged the reload" \
  bash -c 'for _ in $(seq 100); do
    [[ $(journalctl -b --no-pager -u signetd | grep -c "configuration reloaded") -gt $1 ]] && exit 0
    sleep 0.1
  done; exit 1' _ "$n0"
check "signetd is the same process after the reload" \
  test "$(systemctl show -p MainPID --value signetd)" = "$pid0"
check "signetd is active after the reload" systemctl is-active signetd

# --- systemctl restart signetd keeps /run/signet (the signing VM's monitor sockets)
touch /run/signet/vm-999.qmp
ino=$(stat -c %i /run/signet)
check "systemctl restart signetd" systemctl restart signetd
check "/run/signet survives the restart (same directory)" test "$(stat -c %i /run/signet)" = "$ino"
check "a VM's monitor socket in /run/signet survives it" test -e /run/signet/vm-999.qmp
check "signetd is active after the restart" systemctl is-active signetd
# Logged to the journal natively: each line keeps its priority and fields.
check "signetd's lines keep their fields in the journal" \
  bash -c 'journalctl -b --no-pager -u signetd MESSAGE=listening -o json | grep -q "\"ENDPOINT\":\""'
check "signet-agent's lines keep their fields in the journal" \
  bash -c 'journalctl -b --no-pager -u signet-agent MESSAGE=listening -o json | grep -q "\"ENDPOINT\":\""'
rm -f /run/signet/vm-999.qmp

# --- an alert from signetd itself: its sandbox cannot run postdrop, so the mail of
# an agent that is gone, and of its return, leaves through the relay.
rm -f /var/spool/signet-test-mail/*
# mailed KIND STATE: a mail of it was sent (wait for it, at most 120 s)
mailed() {
  for _ in $(seq 240); do
    for m in /var/spool/signet-test-mail/*.mail; do
      grep -q "^X-Signet-Alert: $1$" "$m" 2>/dev/null && grep -q "^X-Signet-State: $2$" "$m" &&
        grep -q '^To: root$' "$m" && test "$(cat "${m%.mail}.egid")" = mail &&
        grep -q 'signet-notify@' "${m%.mail}.cgroup" && return 0
    done
    sleep 0.5
  done
  ls -l /var/spool/signet-test-mail/
  journalctl -b --no-pager -n 20 -u signetd -u "signet-notify@*"
  return 1
}
check "systemctl stop signet-agent" systemctl stop signet-agent
check "signetd's alert of the agent's outage is mailed through the relay" mailed agent-unreachable raised
check "systemctl start signet-agent" systemctl start signet-agent
check "its resolution is mailed through the relay" mailed agent-unreachable resolved
check "signetd logged no failed delivery" \
  bash -c '! journalctl -b --no-pager -u signetd | grep -q "alert.*not delivered\|could not be reached"'

# --- check-config before each start: a PIN file open to others stops the agent's start
check "signetd check-config passes the test configuration" signetd check-config
check "signet-agent check-config passes its configuration" signet-agent check-config
chmod 640 /etc/signet/private/pin
check "a PIN file open to the group fails the agent's start" bash -c '! systemctl restart signet-agent'
check "the journal says why and the fix" \
  bash -c 'journalctl -b --no-pager -u signet-agent |
    grep -q "mode 0640); .chown root:root /etc/signet/private/pin && chmod 600 /etc/signet/private/pin."'
chmod 600 /etc/signet/private/pin
check "signet-agent starts again once it is fixed" systemctl start signet-agent

# --- reinstall, then upgrade: the configuration and the state stay
check "apt-get reinstalls the packages" apt-get install -y --reinstall /root/debs/*.deb
check "reinstall kept /etc/signet/signetd.toml" cmp /etc/signet/signetd.toml /root/signetd.toml.test
check "reinstall kept the PIN file" test -s /etc/signet/private/pin
check "reinstall kept the state" test "$(records)" -ge "$r0"
check "apt-get upgrades to $upversion" apt-get install -y /root/upgrade/*.deb
for p in signet signet-agent signet-client; do
  check "$p $upversion is installed" test "$(dpkg-query -W -f '${Version}' $p)" = "$upversion"
done
check "upgrade kept /etc/signet/signetd.toml" cmp /etc/signet/signetd.toml /root/signetd.toml.test
check "upgrade kept /etc/signet/agent.toml" grep -q signet-demo /etc/signet/agent.toml
check "upgrade kept the state" test "$(records)" -ge "$r0"
mode 700 root:root /var/lib/signet
check "signetd is active after the upgrade" systemctl is-active signetd
check "signet-agent is active after the upgrade" systemctl is-active signet-agent
for _ in $(seq 1 120); do signet status >/dev/null 2>&1 && break; sleep 1; done
sign_and_verify upgraded
check "the audit chain still verifies" signetd audit verify

# --- remove keeps the state and the configuration; purge removes them
check "apt-get remove" apt-get remove -y signet signet-agent signet-client
check "the binaries are gone" bash -c '! test -e /usr/bin/signetd && ! test -e /usr/bin/signet'
check "signetd is stopped" bash -c '! systemctl is-active -q signetd'
check "remove kept /var/lib/signet" test -s /var/lib/signet/signet.db
check "remove kept /etc/signet/signetd.toml" cmp /etc/signet/signetd.toml /root/signetd.toml.test
check "apt-get purge" apt-get purge -y signet signet-agent signet-client
check "purge removed /var/lib/signet" test ! -e /var/lib/signet
check "purge removed /var/lib/signet-agent" test ! -e /var/lib/signet-agent
check "purge removed /etc/signet/signetd.toml" test ! -e /etc/signet/signetd.toml
check "purge removed the PIN directory" test ! -e /etc/signet/private
check "purge removed the units" test ! -e /lib/systemd/system/signetd.service
check "the relay's socket is gone" bash -c '! systemctl is-active -q signet-notify.socket && test ! -e /run/signet/notify.sock'

echo "1..$n"
if ((fails)); then
  echo "# $fails of $n checks failed"
  exit 1
fi
echo "# all $n checks passed"
