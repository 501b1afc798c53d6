#!/bin/sh
# Signet's "Signing" tab in the Proxmox VE web UI: install, re-apply, uninstall.
#
#   install.sh install     copy signet-panel.js next to pve-manager's scripts, add its
#                          <script> line to index.html.tpl, and add an apt hook that
#                          re-applies the line after every dpkg run (a pve-manager
#                          upgrade replaces index.html.tpl)
#   install.sh reapply     add the line again if an upgrade removed it (what the hook runs)
#   install.sh uninstall   remove the line, the script and the hook: index.html.tpl is
#                          exactly as pve-manager shipped it
#   install.sh status      say whether the line is in place (exit 0) or not (exit 1)
#
# Every step is idempotent. The only change to index.html.tpl is one line, inserted
# after pvemanagerlib.js's <script> line and ending in the marker below; uninstalling
# removes exactly that line, so the file is restored byte for byte.
#
# Paths (override for tests or other layouts):
#   PVE_INDEX_TPL     /usr/share/pve-manager/index.html.tpl
#   PVE_JS_DIR        /usr/share/pve-manager/js            (served as /pve2/js/)
#   SIGNET_APT_HOOK   /etc/apt/apt.conf.d/80signet-pve-plugin
#   SIGNET_PLUGIN_DIR where this script and signet-panel.js are (default: its own directory)
#   SIGNET_WEB_PORT   the port signetd's web UI listens on ([web] listen), default 7720
set -eu

PVE_INDEX_TPL=${PVE_INDEX_TPL:-/usr/share/pve-manager/index.html.tpl}
PVE_JS_DIR=${PVE_JS_DIR:-/usr/share/pve-manager/js}
SIGNET_APT_HOOK=${SIGNET_APT_HOOK:-/etc/apt/apt.conf.d/80signet-pve-plugin}
SIGNET_PLUGIN_DIR=${SIGNET_PLUGIN_DIR:-$(cd "$(dirname "$0")" && pwd)}
SIGNET_WEB_PORT=${SIGNET_WEB_PORT:-7720}

MARKER='<!-- signet-pve-plugin -->'
LINE="    <script type=\"text/javascript\" src=\"/pve2/js/signet-panel.js\"></script>$MARKER"
ANCHOR='/pve2/js/pvemanagerlib.js'

die() { echo "signet-pve-plugin: $*" >&2; exit 1; }

has_line() { grep -qF -- "$MARKER" "$PVE_INDEX_TPL"; }

# Rewrites index.html.tpl with the perl program $1 (reading the file on stdin), through
# a temporary file in the same directory: the file is whole at every moment, keeps its
# mode, and is left alone when the program fails.
rewrite() {
  tmp=$(mktemp "$PVE_INDEX_TPL.signet.XXXXXX")
  if perl -e "$1" < "$PVE_INDEX_TPL" > "$tmp"; then
    chmod --reference="$PVE_INDEX_TPL" "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$PVE_INDEX_TPL"
  else
    rm -f "$tmp"
    die "could not rewrite $PVE_INDEX_TPL; it was left as it was"
  fi
}

add_line() {
  [ -f "$PVE_INDEX_TPL" ] || die "$PVE_INDEX_TPL does not exist; is pve-manager installed? (set PVE_INDEX_TPL)"
  if has_line; then
    return 0
  fi
  grep -qF -- "$ANCHOR" "$PVE_INDEX_TPL" ||
    die "$PVE_INDEX_TPL has no <script> line for pvemanagerlib.js to put the Signing tab after; this pve-manager is not supported, nothing was changed"
  # After the first line naming pvemanagerlib.js, byte for byte otherwise.
  export LINE ANCHOR
  rewrite '
    local $/; my $t = <STDIN>; my ($anchor, $l) = ($ENV{ANCHOR}, $ENV{LINE});
    my $i = index($t, $anchor); my $eol = index($t, "\n", $i);
    die "the pvemanagerlib.js line does not end\n" if $eol < 0;
    print substr($t, 0, $eol + 1), $l, "\n", substr($t, $eol + 1);
  '
}

remove_line() {
  [ -f "$PVE_INDEX_TPL" ] || return 0
  has_line || return 0
  export MARKER
  rewrite '
    local $/; my $t = <STDIN>; my $m = quotemeta($ENV{MARKER});
    $t =~ s/^[^\n]*$m\n//mg; print $t;
  '
}

install_script() {
  [ -f "$SIGNET_PLUGIN_DIR/signet-panel.js" ] || die "$SIGNET_PLUGIN_DIR/signet-panel.js is missing"
  mkdir -p "$PVE_JS_DIR"
  sed "s/@SIGNET_WEB_PORT@/$SIGNET_WEB_PORT/" "$SIGNET_PLUGIN_DIR/signet-panel.js" > "$PVE_JS_DIR/signet-panel.js.new"
  mv -f "$PVE_JS_DIR/signet-panel.js.new" "$PVE_JS_DIR/signet-panel.js"
}

install_hook() {
  mkdir -p "$(dirname "$SIGNET_APT_HOOK")"
  cat > "$SIGNET_APT_HOOK" <<EOF
// Signet: put the "Signing" tab back into the Proxmox VE web UI after pve-manager
// upgrades (they replace index.html.tpl). Removed by: $SIGNET_PLUGIN_DIR/install.sh uninstall
DPkg::Post-Invoke { "if [ -x '$SIGNET_PLUGIN_DIR/install.sh' ]; then PVE_INDEX_TPL='$PVE_INDEX_TPL' PVE_JS_DIR='$PVE_JS_DIR' SIGNET_WEB_PORT='$SIGNET_WEB_PORT' '$SIGNET_PLUGIN_DIR/install.sh' reapply || true; fi"; };
EOF
}

case "${1:-}" in
  install)
    install_script
    add_line
    install_hook
    echo "signet-pve-plugin: installed; reload the Proxmox VE web UI to see the node's Signing tab"
    ;;
  reapply)
    # Quiet and harmless when pve-manager is not (or no longer) installed.
    [ -f "$PVE_INDEX_TPL" ] || exit 0
    install_script
    add_line
    ;;
  uninstall)
    remove_line
    rm -f "$PVE_JS_DIR/signet-panel.js" "$SIGNET_APT_HOOK"
    echo "signet-pve-plugin: removed; $PVE_INDEX_TPL is as pve-manager shipped it"
    ;;
  status)
    if [ -f "$PVE_INDEX_TPL" ] && has_line; then
      echo "signet-pve-plugin: installed in $PVE_INDEX_TPL"
    else
      echo "signet-pve-plugin: not installed in $PVE_INDEX_TPL"
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 install|reapply|uninstall|status" >&2
    exit 2
    ;;
esac
