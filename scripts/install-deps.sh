#!/usr/bin/env bash
# Installs what building, the demo and the tests need on Debian 12, and nothing
# that is already there. Safe to run again; quiet when everything is present.
set -euo pipefail

# command-or-file  debian-package
needs=(
  "softhsm2-util softhsm2"
  "pkcs11-tool opensc"
  "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so libengine-pkcs11-openssl"
  "p11tool gnutls-bin"
  "osslsigncode osslsigncode"
  "x86_64-w64-mingw32-gcc gcc-mingw-w64-x86-64"
  # 32-bit PE (PE32) fixtures of signet-authenticode's tests
  "i686-w64-mingw32-gcc gcc-mingw-w64-i686"
  "/usr/include/libudev.h libudev-dev"
  "/usr/include/libusb-1.0/libusb.h libusb-1.0-0-dev"
  "pkg-config pkg-config"
  "openssl openssl"
  "dbus-daemon dbus"
  # the e2e journal tests run a private journald (and unshare, journalctl)
  "/lib/systemd/systemd-journald systemd"
  # tests/fixtures/make-appx.sh writes APPX/MSIX packages with python3's zipfile
  "python3 python3"
  # the e2e ci_kit test builds a mingw-w64 program with CMake (packaging/cmake)
  "cmake cmake"
  "wixl wixl"
  "msiinfo msitools"
  "gcab gcab"
  "umockdev-run umockdev"
  "/usr/lib/x86_64-linux-gnu/girepository-1.0/UMockdev-1.0.typelib gir1.2-umockdev-1.0"
  "/usr/lib/python3/dist-packages/gi/__init__.py python3-gi"
  "lsusb usbutils"
  "qemu-system-x86_64 qemu-system-x86"
  "curl curl"
  "chromium chromium"
  "node nodejs"
  # the lab (lab/build-image.sh, make lab): certutil for the emulated card's NSS
  # database, cpio and objcopy for the signing VM's initramfs
  "certutil libnss3-tools"
  "cpio cpio"
  "objcopy binutils"
  # the release build links the client statically (scripts/build-release.sh): with musl
  # (its C compiler wrapper, for the crates with C in them), else glibc's static libraries
  "musl-gcc musl-tools"
  "/usr/lib/x86_64-linux-gnu/libc.a libc6-dev"
  # make deb (debhelper, lintian) and make test-packaging (a Debian 12 guest made with
  # debootstrap and mkfs.ext4 -d)
  "dh debhelper"
  "dpkg-parsechangelog dpkg-dev"
  "lintian lintian"
  "debootstrap debootstrap"
  "mkfs.ext4 e2fsprogs"
)

missing=()
for pair in "${needs[@]}"; do
  probe=${pair% *}; pkg=${pair#* }
  if [[ $probe == /* ]]; then
    [[ -e $probe ]] || missing+=("$pkg")
  else
    command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing Debian packages: ${missing[*]}" >&2
    echo "install-deps: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  extra=()
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] && dpkg -s qemu-utils >/dev/null 2>&1; then
    # A qemu-utils from elsewhere (newer than Debian 12's) conflicts with Debian's
    # qemu-system-x86; without this pin apt would remove qemu-utils instead.
    utils=$(apt-cache madison qemu-utils | awk -F'|' '/bookworm\/main/{gsub(/ /,"",$2);print $2;exit}')
    [[ -n $utils ]] && extra=(--allow-downgrades "qemu-utils=$utils")
  fi
  apt-get install -y -qq --no-install-recommends "${extra[@]}" "${missing[@]}" >/dev/null
fi

# The tests sign PowerShell files and use digest mode, which need osslsigncode 2.8 or
# later (README.md, "osslsigncode versions"); Debian 12's own is 2.5.
ossl=$(osslsigncode --version 2>/dev/null | sed -n '1s/^osslsigncode \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' || true)
read -r major minor <<<"${ossl:-0 0}"
if ((major < 2 || (major == 2 && minor < 8))); then
  echo "install-deps: osslsigncode $major.$minor is too old for the tests (PowerShell and digest mode need 2.8 or later); on Debian 12: apt-get install -t bookworm-backports osslsigncode" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# The release build links the client with musl (scripts/build-release.sh says why):
# Rust's standard library for it comes with rustup. Without it the client is linked
# with glibc, which works the same and starts slower.
musl_target=x86_64-unknown-linux-musl
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx "$musl_target"; then
  rustup target add "$musl_target" >/dev/null 2>&1 ||
    echo "install-deps: could not add Rust's $musl_target target (rustup target add $musl_target); the release build links the client with glibc instead" >&2
fi

# The lab's vsock backend for the signing VM (vhost-user-vsock over unix sockets, the
# hybrid-vsock handshake on the host side): vhost-device-vsock with a fix for guest
# resets, built once into target/lab/vhost (lab/build-vhost.sh says what and why).
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/lab/build-vhost.sh"

# The "signet" group: the D-Bus policy (packaging/dbus/) lets it use signetctl, and
# the D-Bus tests run signetctl as a member of it. A package creates it the same way.
if ! getent group signet >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: the signet group is missing; run as root, or: sudo groupadd --system signet" >&2
    exit 1
  fi
  groupadd --system signet
fi
# The "signet-admin" group: the appliance's operators (attach, detach, cancel anyone's
# job, the audit log); the D-Bus tests run signetctl as a member of it too.
if ! getent group signet-admin >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: the signet-admin group is missing; run as root, or: sudo groupadd --system signet-admin" >&2
    exit 1
  fi
  groupadd --system signet-admin
fi
