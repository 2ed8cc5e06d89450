#!/bin/sh
# The guest's /init (busybox ash, PID 1).  It brings up the kernel modules, the host channels, the
# tools disk and the network described by /guest/conf, runs /guest/test.sh under a time limit, reports
# its exit status and powers the machine off.  Host channels are virtio-serial ports found by name:
#   results  records of the test (lib.sh writes them on fd 7), one tab-separated line each
#   kmsg     the kernel log, streamed from /dev/kmsg as it is written (so it survives a hang)
#   control  lines the host sends (Guest.send), appended to /tmp/guest/host-events
export PATH=/usr/sbin:/usr/bin:/bin HOME=/
/bin/mount -t proc proc /proc
/bin/mount -t sysfs sysfs /sys
/bin/mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp/guest /run/lock /run/multipath /var/lock /var/lib/iscsi /etc/iscsi/nodes \
  /etc/iscsi/send_targets /etc/iscsi/ifaces
mount -t devpts devpts /dev/pts
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/mounts /etc/mtab
. /guest/conf

# The boot modules, in the dependency order computed when the image was built (built-in, or unusable
# on this CPU as crc32c-intel without SSE4.2, is not an error); the kernel loads the others on demand.
KV=$(uname -r)
while read -r m; do
  insmod "/lib/modules/$KV/$m" 2>/tmp/guest/insmod.err || grep -q 'File exists' /tmp/guest/insmod.err \
    || echo "guest: insmod ${m##*/}: $(cat /tmp/guest/insmod.err)"
done < /guest/modules
echo /bin/modprobe >/proc/sys/kernel/modprobe
[ -n "$GUEST_NIC_MODULE" ] && modprobe "$GUEST_NIC_MODULE"

port() {
  for p in /sys/class/virtio-ports/vport*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && [ -c "/dev/${p##*/}" ] && { echo "/dev/${p##*/}"; return 0; }
  done
  return 1
}
i=0
until RESULTS=$(port results) && KMSG=$(port kmsg) && CONTROL=$(port control); do
  i=$((i + 1)); [ $i -gt 200 ] && { echo "guest: virtio ports missing"; poweroff -f; }
  sleep 0.05
done
# One open of each port: a virtio port refuses a second concurrent open (EBUSY).
exec 7>"$RESULTS"
(while :; do cat /dev/kmsg; sleep 0.2; done) >"$KMSG" 2>/dev/null &
cat "$CONTROL" >>/tmp/guest/host-events 2>/dev/null &
. /guest/lib.sh
record boot "" "" "" "kernel $KV, $(nproc) cpu, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"

finish() {
  sync
  poweroff -f
  echo o >/proc/sysrq-trigger
  sleep 10
}

i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if ! mount -t ext4 -o ro /dev/vda /usr; then
  record exit "" "" "" "the tools disk did not mount"
  finish
fi

ip link set lo up
if [ -n "$GUEST_ADDRESS" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
  if ! { ip addr add "$GUEST_ADDRESS" dev eth0 && ip link set eth0 up; }; then
    record exit "" "" "" "network setup failed: eth0 $GUEST_ADDRESS"
    finish
  fi
  # Bulk reads through qemu's user-mode TCP stall 5 s whenever the guest advertises a zero window
  # (slirp misses the window update); large buffers avoid that, and cost nothing on a tap link.
  echo 8388608 >/proc/sys/net/core/rmem_max
  echo 8388608 >/proc/sys/net/core/wmem_max
  echo "4096 1048576 8388608" >/proc/sys/net/ipv4/tcp_rmem
  echo "4096 1048576 8388608" >/proc/sys/net/ipv4/tcp_wmem
fi
record ready "" "" "" "tools disk on /usr, eth0 ${GUEST_ADDRESS:-none}"

cd /tmp
(
  set -a
  . /guest/env
  set +a
  . /guest/test.sh
) </dev/null >/dev/console 2>&1 &
SCRIPT=$!
(
  sleep "$GUEST_TIMEOUT"
  record timeout "$(cat /tmp/guest/step 2>/dev/null)" "" "" "guest time limit ${GUEST_TIMEOUT}s"
  echo "guest: time limit ${GUEST_TIMEOUT}s hit in step '$(cat /tmp/guest/step 2>/dev/null)'; processes:"
  ps
  finish
) &
WATCHDOG=$!
wait $SCRIPT
rc=$?
kill $WATCHDOG 2>/dev/null
record exit "" "$rc" "" ""
finish
