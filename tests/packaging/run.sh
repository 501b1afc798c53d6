#!/usr/bin/env bash
# make test-packaging: the three packages (target/debian/, from `make deb`) installed
# with apt in a Debian 12 guest booted with systemd under QEMU (TCG), and checked
# there by guest-test.sh: files, owners and modes; the units reach READY; a PE signed
# through the installed signetd and agent and verified; the units' security scores;
# /run/signet kept across `systemctl restart signetd`; reinstall and upgrade keep
# /etc/signet and the state; remove keeps the state, purge removes it.
#
# The guest's system comes from build-image.sh (cached under target/packaging/); the
# packages, the upgrade's packages (the same ones as version +upgrade1), the PE, the
# token script and the stand-in for qm travel on a second disk (ext4 made with mkfs.ext4 -d); the report
# comes back on the second serial port. The root disk is used with snapshot=on: every
# run starts from the same image. Fails (never skips) when QEMU or debootstrap is
# missing. Needs root.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
here=$root/tests/packaging
die() { echo "test-packaging: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap, and the image's files owned by root)"
for c in qemu-system-x86_64 debootstrap mkfs.ext4 dpkg-deb x86_64-w64-mingw32-gcc; do
  command -v $c >/dev/null || die "$c is missing; run scripts/install-deps.sh"
done
timeout_s=${SIGNET_PACKAGING_TIMEOUT:-1500}

version=$(cd "$root" && dpkg-parsechangelog -S Version)
debs=()
for p in signet signet-agent signet-client; do
  f=$(ls "$root"/target/debian/${p}_"$version"_*.deb 2>/dev/null | head -1)
  [[ -n $f ]] || die "target/debian/${p}_${version}_*.deb is missing; run make deb"
  debs+=("$f")
done

# Its last line is the image's directory (anything else it says goes to stderr).
img=$(bash "$here/build-image.sh" | tail -1)
[[ -d $img && -s $img/disk.raw ]] || die "build-image.sh gave no image (${img:-nothing}); see its messages above"

w=$(mktemp -d "$root/target/packaging/run.XXXXXX")
trap 'rm -rf "$w"' EXIT

pl=$w/payload
mkdir -p "$pl/debs" "$pl/upgrade"
cp "${debs[@]}" "$pl/debs/"
echo "$version" >"$pl/version"
# The upgrade: the same packages as a newer version.
up=$version+upgrade1
echo "$up" >"$pl/upgrade-version"
for f in "${debs[@]}"; do
  x=$w/x
  rm -rf "$x"
  dpkg-deb -R "$f" "$x"
  sed -i "s/^Version: .*/Version: $up/" "$x/DEBIAN/control"
  dpkg-deb -b -Zxz "$x" "$pl/upgrade/" >/dev/null
done
cp "$root/tests/fixtures/make-token.sh" "$here/guest-test.sh" "$pl/"
# Enroll in the guest runs the tests' stand-in for Proxmox's qm on a recorded VM.
cp "$root/appliance/signetd/tests/fixtures/fake-qm" \
  "$root/appliance/signetd/tests/data/qm-config/simple1.conf" "$pl/"
bash "$root/tests/fixtures/make-pe.sh" "$pl/hello.exe"
size=$(( $(du -sm "$pl" | cut -f1) + 64 ))
mkfs.ext4 -q -F -L SIGNETTEST -d "$pl" "$w/payload.img" "${size}M" >/dev/null

echo "test-packaging: booting the Debian 12 guest (TCG) with the packages $version" >&2
: >"$w/report.log"
# The guest powers off when its test is done, and QEMU exits then; timeout(1) ends it
# if the guest never gets there.
rc=0
timeout -k 10 "$timeout_s" qemu-system-x86_64 -name signet-packaging -accel tcg \
  -machine q35 -cpu max -smp 2 -m 2048 \
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 systemd.show_status=0 quiet" \
  -drive "file=$img/disk.raw,format=raw,if=virtio,snapshot=on" \
  -drive "file=$w/payload.img,format=raw,if=virtio,readonly=on" \
  -nic none -display none -no-reboot \
  -serial "file:$w/console.log" -serial "file:$w/report.log" || rc=$?
if ((rc == 124 || rc == 137)); then
  tail -40 "$w/console.log" >&2 || true
  tr -d '\r' <"$w/report.log" >&2 || true
  die "the guest did not finish within ${timeout_s}s (console and report above)"
fi
((rc == 0)) || die "qemu-system-x86_64 failed (exit $rc)"
tr -d '\r' <"$w/report.log"
end=$(tr -d '\r' <"$w/report.log" | sed -n 's/^SIGNET-PACKAGING-END \([0-9]*\)$/\1/p')
if [[ -z $end ]]; then
  tail -60 "$w/console.log" >&2 || true
  die "the guest's test did not run to its end (console above)"
fi
[[ $end == 0 ]] || die "checks failed in the guest (report above)"
echo "test-packaging: all checks passed in the guest" >&2
