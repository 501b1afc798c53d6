#!/usr/bin/env bash
# Builds the Debian 12 system the packaging test boots: debootstrap (minbase) with
# systemd, the kernel, the packages' runtime dependencies and the test's own tools
# (SoftHSM, OpenSC, the libp11 engine), written into an ext4 image with
# `mkfs.ext4 -d` (no mount), and the kernel and initramfs beside it. Prints the
# directory that holds them (disk.raw, vmlinuz, initrd.img, manifest).
#
#   tests/packaging/build-image.sh
#
# Cached under target/packaging/image-<key> (older ones are removed); the key is a hash
# of this script, the guest's test unit and the package list. Packages come from the
# Debian mirror this host's apt uses (SIGNET_DEBIAN_MIRROR=URL says another).
# Needs root (debootstrap chroots), debootstrap and mkfs.ext4.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
here=$root/tests/packaging
out=${SIGNET_PACKAGING_DIR:-$root/target/packaging}
die() { echo "packaging build-image: $*" >&2; exit 1; }
# The first Debian archive (not its security suite) in apt's sources, deb822 or one-line.
host_mirror() {
  {
    sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null
    sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\).*/\2/p' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
  } | grep -v -e '-security' -e '^$' | head -1 || true
}
mirror=${SIGNET_DEBIAN_MIRROR:-$(host_mirror)}
[[ -n $mirror ]] || die "apt's sources name no Debian archive; set SIGNET_DEBIAN_MIRROR=URL"
[[ $(id -u) -eq 0 ]] || die "run as root: debootstrap needs it"
for c in debootstrap mkfs.ext4 sha256sum; do
  command -v $c >/dev/null ||
    die "$c is missing; run scripts/install-deps.sh (apt-get install debootstrap e2fsprogs)"
done

# The system (systemd, udev, D-Bus, the kernel), what the three packages depend on
# (Depends in debian/control, with their libraries), and the test's tools.
pkgs=(systemd systemd-sysv udev dbus kmod linux-image-amd64 initramfs-tools
  libusb-1.0-0 libudev1 osslsigncode pcscd
  softhsm2 opensc libengine-pkcs11-openssl openssl)
key=$( {
  printf '%s\n' "${pkgs[@]}" "$mirror"
  sha256sum "$here/build-image.sh" "$here/signet-packaging-test.service" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
img=$out/image-$key
if [[ -s $img/disk.raw && -s $img/vmlinuz && -s $img/initrd.img ]]; then
  echo "$img"
  exit 0
fi

mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
r=$work/rootfs
echo "packaging build-image: debootstrap bookworm from $mirror (a few minutes, once)" >&2
include=$(IFS=,; echo "${pkgs[*]}")
debootstrap --variant=minbase --include="$include" bookworm "$r" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || {
  tail -30 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
}
[[ -s $r/vmlinuz || -n $(ls "$r"/boot/vmlinuz-* 2>/dev/null) ]] || die "no kernel in the image"

# The guest: root on the first disk, no password for root on the console, the test
# unit that runs the payload disk's script and powers off.
echo signet-pkg-test >"$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 signet-pkg-test\n' >"$r/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$r/etc/fstab"
sed -i 's/^root:[^:]*:/root::/' "$r/etc/shadow"
install -m 0644 "$here/signet-packaging-test.service" "$r/etc/systemd/system/"
ln -sf /etc/systemd/system/signet-packaging-test.service \
  "$r/etc/systemd/system/multi-user.target.wants/signet-packaging-test.service"
# Nothing in the guest reaches the network; apt must not try.
rm -f "$r"/etc/apt/sources.list
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*_Packages

mkdir -p "$img.tmp"
cp "$(ls "$r"/boot/vmlinuz-* | head -1)" "$img.tmp/vmlinuz"
cp "$(ls "$r"/boot/initrd.img-* | head -1)" "$img.tmp/initrd.img"
mkfs.ext4 -q -F -L signet-root -d "$r" "$img.tmp/disk.raw" 3G >&2 ||
  die "mkfs.ext4 -d failed"
{
  echo "built: $(date -u +%FT%TZ) from $mirror"
  chroot "$r" dpkg-query -W -f '${Package} ${Version}\n'
} >"$img.tmp/manifest"
rm -rf "$img"
mv "$img.tmp" "$img"
find "$out" -maxdepth 1 -name 'image-*' ! -path "$img" -exec rm -rf {} +
echo "packaging build-image: $img" >&2
echo "$img"
