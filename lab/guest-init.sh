#!/bin/busybox sh
# /init of Signet's lab signing VM (lab/build-image.sh): mounts, kernel modules,
# the agent's state directory, udevd (pcscd learns about hot-plugged readers only
# through udev), pcscd, then signet-agent on the guest's vsock, restarted whenever it
# exits. The state directory, /var/lib/signet-agent, is the host's RUN/agent-state
# shared over virtio-9p (tag signetstate): the initramfs is unpacked afresh at every
# reset, the share keeps the agent's key and pairing as a signing VM's disk would. The agent logs to
# the second serial port (the host's RUN/agent.log); a root shell serves ttyS0.
# Kernel command line knobs: lab.udev=0, lab.pcscd=0, lab.agent=0.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/lib/systemd
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# What systemd would make: osslsigncode reads the PIN from /dev/stdin.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=755 run /run
mount -t tmpfs tmp /tmp
ip link set lo up 2>/dev/null
cmd=$(cat /proc/cmdline)
for m in $(cat /lib/mod/order); do insmod /lib/mod/$m.ko || echo "LAB: insmod $m failed"; done
mkdir -p /var/lib/signet-agent
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none signetstate /var/lib/signet-agent ||
  echo "LAB: the agent's state share (9p tag signetstate) is missing: its state is lost at the next reset"
chmod 700 /var/lib/signet-agent
case "$cmd" in *lab.udev=0*) ;; *)
  mkdir -p /run/udev
  /lib/systemd/systemd-udevd --daemon 2>/tmp/udevd.log
  udevadm trigger --action=add --type=subsystems
  udevadm trigger --action=add --type=devices
  udevadm settle --timeout=20 ;;
esac
case "$cmd" in *lab.pcscd=0*) ;; *)
  mkdir -p /run/pcscd
  pcscd --foreground >/tmp/pcscd.log 2>&1 &
  echo "LAB: pcscd pid $!" ;;
esac
case "$cmd" in *lab.agent=0*) ;; *)
  (
    exec >/dev/ttyS1 2>&1
    while true; do
      echo "LAB: starting signet-agent t=$(cut -d' ' -f1 /proc/uptime)"
      # Through a pipe: the serial port is a terminal, and the log is read as text.
      RUST_LOG=info signet-agent --config /etc/signet/agent.toml 2>&1 | cat
      echo "LAB: signet-agent exited"
      sleep 1
    done
  ) &
  ;;
esac
echo "GUEST-READY $(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
while true; do
  setsid sh -c 'exec /bin/sh </dev/ttyS0 >/dev/ttyS0 2>&1'
done
