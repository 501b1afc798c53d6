#!/usr/bin/env bash
# Creates the NSS database that QEMU's ccid-card-emulated (backend=certificates) turns
# into the lab's smart card: three self-signed RSA-2048 certificates with their keys,
# nicknames lab-id, lab-codesign (extended key usage codeSigning: the card's key 0002)
# and lab-enc. The database's password is the card's PIN.
#   lab/mk-nssdb.sh DIR [PIN]      (PIN default 123456; writes DIR/lab-codesign.pem too)
set -euo pipefail
db=${1:?usage: mk-nssdb.sh DIR [PIN]}
pin=${2:-123456}
command -v certutil >/dev/null || { echo "mk-nssdb: certutil missing (apt-get install libnss3-tools)" >&2; exit 1; }
rm -rf "$db"
mkdir -p "$db"
db=$(cd "$db" && pwd)
printf '%s\n' "$pin" >"$db/pw.txt"
certutil -N -d "sql:$db" -f "$db/pw.txt"
head -c 2048 /dev/urandom >"$db/noise"
mk() { # nickname serial subject extra-args...
  local n=$1 m=$2 s=$3
  shift 3
  certutil -S -d "sql:$db" -f "$db/pw.txt" -z "$db/noise" -k rsa -g 2048 -Z SHA256 -v 24 -x \
    -t ",,P" -n "$n" -m "$m" -s "$s" "$@" >/dev/null 2>&1 ||
    { echo "mk-nssdb: certutil -S -n $n failed" >&2; exit 1; }
}
mk lab-id 1001 "CN=Lab Token ID,O=Signet Lab" --keyUsage critical,digitalSignature --extKeyUsage clientAuth
mk lab-codesign 1002 "CN=Lab Code Signing,O=Signet Lab" --keyUsage critical,digitalSignature --extKeyUsage codeSigning
mk lab-enc 1003 "CN=Lab Token Encryption,O=Signet Lab" --keyUsage critical,keyEncipherment
certutil -L -d "sql:$db" -n lab-codesign -a >"$db/lab-codesign.pem"
rm -f "$db/noise" "$db/pw.txt"
