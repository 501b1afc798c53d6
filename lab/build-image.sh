#!/usr/bin/env bash
# Builds the lab's signing-VM image — a Debian 12 kernel and an initramfs made from
# Debian packages (busybox, udev, pcscd, libccid, OpenSC, the libp11 engine,
# osslsigncode) plus the freshly built signet-agent — and prints the directory that
# holds it (vmlinuz, initrd.cpio, manifest). The initramfs is all in RAM; the agent's
# state directory comes from the host over virtio-9p (lab/guest-init.sh).
#
#   lab/build-image.sh [AGENT_BINARY]      (default: target/debug/signet-agent)
#
# The image is cached under target/lab/image-<key> (older ones are removed), the key being a hash of the
# packages' versions (apt's candidates; bookworm's osslsigncode), the agent binary,
# the host's osslsigncode and the lab scripts. Packages come from Debian's archive
# with `apt-get download` and are unpacked with `dpkg -x` (cached in target/lab/debs).
# The host's osslsigncode replaces Debian 12's 2.5 when its libraries resolve inside
# the image (checked in a chroot, so nothing falls back to the host's libraries).
# Needs root (chroot), apt-get, dpkg, cpio and objcopy.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
lab=$root/lab
out=${SIGNET_LAB_DIR:-$root/target/lab}
agent=${1:-$root/target/debug/signet-agent}
die() { echo "build-image: $*" >&2; exit 1; }
[[ -x $agent ]] || die "$agent is missing; build it first (cargo build -p signet-agent)"
[[ $(id -u) -eq 0 ]] || die "run as root: the ELF check runs in a chroot of the image"
for c in apt-get apt-cache dpkg cpio objcopy sha256sum; do
  command -v $c >/dev/null || die "$c is missing (apt-get install apt dpkg cpio binutils coreutils)"
done

pkgs=(busybox-static libc6 libgcc-s1
  udev libacl1 libkmod2 libcap2 libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1 libsystemd0 libudev1
  pcscd libccid libpcsclite1 libusb-1.0-0
  opensc opensc-pkcs11 libglib2.0-0 libffi8 libmount1 libblkid1 libselinux1 libpcre2-8-0 zlib1g
  libreadline8 libtinfo6 libssl3 libengine-pkcs11-openssl
  osslsigncode libcurl4 libbrotli1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0
  libkeyutils1 libidn2-0 libldap-2.5-0 libnghttp2-14 libpsl5 librtmp1 libsasl2-2 libssh2-1 libgnutls30
  libhogweed6 libnettle8 libgmp10 libp11-kit0 libtasn1-6 libunistring2 libffi8 libdb5.3 libsasl2-modules-db)
modules=(usb-common usbcore uhci-hcd virtio virtio_ring virtio_pci vsock
  vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
  netfs fscache 9pnet 9pnet_virtio 9p)

# The versions apt would install from Debian 12 (osslsigncode: bookworm's own 2.5).
kernel=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
  sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -1)
[[ -n $kernel ]] || die "apt knows no linux-image-amd64; run apt-get update"
kver=${kernel#linux-image-}
# One apt-cache call for all of them (one per package takes a minute).
declare -A ver=()
while read -r p v; do [[ -n ${ver[$p]:-} ]] || ver[$p]=$v; done < <(
  apt-cache show --no-all-versions "${pkgs[@]}" "$kernel" 2>/dev/null |
    awk '/^Package: /{p=$2} /^Version: /{print p, $2}')
ver[osslsigncode]=$(apt-cache madison osslsigncode | awk -F'|' '/bookworm\/main/{gsub(/ /,"",$2);print $2;exit}')
want=()
for p in "${pkgs[@]}" "$kernel"; do
  [[ -n ${ver[$p]:-} ]] || die "apt knows no package $p; run apt-get update"
  want+=("$p=${ver[$p]}")
done
mapfile -t want < <(printf '%s\n' "${want[@]}" | sort -u)

host_ossl=$(command -v osslsigncode || true)
key=$( {
  printf '%s\n' "${want[@]}" "${modules[@]}"
  sha256sum "$agent" "$lab/build-image.sh" "$lab/guest-init.sh" "$lab/agent.toml" | cut -d' ' -f1
  [[ -n $host_ossl ]] && sha256sum "$host_ossl" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
img=$out/image-$key
if [[ -s $img/initrd.cpio && -s $img/vmlinuz ]]; then
  echo "$img"
  exit 0
fi

debs=$out/debs
mkdir -p "$debs"
deb_of() { # NAME=VERSION -> the cached .deb's path (epochs are %3a in file names)
  local n=${1%%=*} v=${1#*=}
  ls "$debs/${n}_${v/:/%3a}_"*.deb 2>/dev/null | head -1
}
need=()
for pv in "${want[@]}"; do [[ -n $(deb_of "$pv") ]] || need+=("$pv"); done
if ((${#need[@]})); then
  echo "build-image: downloading ${#need[@]} Debian packages" >&2
  (cd "$debs" && apt-get download "${need[@]}" 2>&1 | grep -v 'unsandboxed' >&2) || true
  for pv in "${need[@]}"; do [[ -n $(deb_of "$pv") ]] || die "apt-get download $pv failed"; done
fi

work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
r=$work/rootfs
mkdir -p "$r"
for pv in "${want[@]}"; do
  [[ ${pv%%=*} == "$kernel" ]] && continue
  dpkg -x "$(deb_of "$pv")" "$r"
done
# Kernel and the modules the guest needs, with their dependencies read from each
# module's .modinfo (the .deb has no modules.dep and the host may have no depmod).
k=$work/kernel
dpkg -x "$(deb_of "$kernel=$(printf '%s\n' "${want[@]}" | sed -n "s/^$kernel=//p")")" "$k"
md=$k/lib/modules/$kver
mkdir -p "$r/lib/mod"
: >"$r/lib/mod/order"
add_mod() {
  local f b dep
  f=$(find "$md/kernel" \( -name "$1.ko" -o -name "${1//_/-}.ko" -o -name "${1//-/_}.ko" \) | head -1)
  [[ -n $f ]] || die "kernel module $1 not found in $kernel"
  b=$(basename "$f" .ko)
  grep -qx "$b" "$r/lib/mod/order" && return 0
  for dep in $(objcopy -O binary --only-section=.modinfo "$f" /dev/stdout | tr '\0' '\n' |
    sed -n 's/^depends=//p' | tr ',' ' '); do add_mod "$dep"; done
  cp "$f" "$r/lib/mod/"
  echo "$b" >>"$r/lib/mod/order"
}
for m in "${modules[@]}"; do add_mod "$m"; done

rm -rf "$r"/usr/share/{doc,man,locale,info,lintian,zsh,bash-completion,i18n} \
  "$r"/lib/systemd/system "$r"/usr/lib/systemd/system "$r"/usr/lib/x86_64-linux-gnu/gconv \
  "$r"/lib/udev/hwdb.d "$r"/bin/systemd-hwdb
mkdir -p "$r"/{proc,sys,dev,run,tmp,root,etc/signet,usr/local/bin,var/lib/signet-agent}
echo "root:x:0:0:root:/root:/bin/sh" >"$r/etc/passwd"
echo "root:x:0:" >"$r/etc/group"
install -m 755 "$lab/guest-init.sh" "$r/init"
objcopy --strip-debug "$agent" "$r/usr/local/bin/signet-agent"
chmod 755 "$r/usr/local/bin/signet-agent"
install -m 644 "$lab/agent.toml" "$r/etc/signet/agent.toml"

elf_missing() { # every ELF file's unresolved libraries, resolved by the image's own loader
  find "$r" -type f \( -name '*.so*' -o -perm -u+x \) | while read -r f; do
    head -c4 "$f" | grep -q ELF || continue
    chroot "$r" /lib64/ld-linux-x86-64.so.2 --list "${f#"$r"}" 2>&1 |
      grep -E 'not found|error while' | sed "s|^|${f#"$r"}: |" || true
  done | sort -u
}
ossl="osslsigncode 2.5 (Debian 12)"
if [[ -n $host_ossl ]] && ! "$r/usr/bin/osslsigncode" --version 2>/dev/null | cmp -s - <("$host_ossl" --version 2>/dev/null); then
  cp "$r/usr/bin/osslsigncode" "$work/osslsigncode-debian"
  install -m 755 "$host_ossl" "$r/usr/bin/osslsigncode"
  if chroot "$r" /lib64/ld-linux-x86-64.so.2 --list /usr/bin/osslsigncode 2>&1 | grep -q 'not found'; then
    echo "build-image: the host's osslsigncode needs libraries the image lacks; keeping Debian's 2.5" >&2
    install -m 755 "$work/osslsigncode-debian" "$r/usr/bin/osslsigncode"
  else
    ossl="$("$host_ossl" --version | head -1 | sed 's/, using:.*//') (the host's)"
  fi
fi
missing=$(elf_missing)
[[ -z $missing ]] || die "libraries missing in the image:"$'\n'"$missing"

mkdir -p "$img.tmp"
cp "$k/boot/vmlinuz-$kver" "$img.tmp/vmlinuz"
(cd "$r" && find . | cpio -o -H newc --quiet) >"$img.tmp/initrd.cpio"
{
  echo "kernel: $kver"
  echo "osslsigncode: $ossl"
  echo "agent: $(sha256sum "$agent" | cut -d' ' -f1)"
  echo "modules: $(tr '\n' ' ' <"$r/lib/mod/order")"
  printf 'package: %s\n' "${want[@]}"
} >"$img.tmp/manifest"
rm -rf "$img"
mv "$img.tmp" "$img"
# Older images are of no use any more (each is ~60 MB).
find "$out" -maxdepth 1 -name 'image-*' ! -path "$img" -exec rm -rf {} +
echo "build-image: $img ($(du -sh "$img/initrd.cpio" | cut -f1) initramfs, $ossl)" >&2
echo "$img"
