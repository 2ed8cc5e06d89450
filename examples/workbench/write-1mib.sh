# Worked example 1 (README): the target drops the connection during a 1 MiB write; open-iscsi logs
# in again, replays the write, and the data reads back intact.
#   PYTHONPATH=tests python3 -m support.guest run examples/workbench/write-1mib.sh --portal HOST:PORT
IQN=${IQN:-iqn.2026-11.org.pyscsi-target:demo}
start_iscsid && iscsi_login "$IQN" "$PORTAL0" >/dev/null || { step login FAIL "iscsiadm --login"; exit 1; }
DISK=$(iscsi_disk "$(iscsi_session "$IQN" "$PORTAL0")" 0) || { step login FAIL "no disk for LUN 0"; exit 1; }
DISK=${DISK%% *}
step login PASS "/dev/$DISK"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=1 2>/dev/null
begin write
dd if=/tmp/pattern of="/dev/$DISK" bs=1M count=1 seek=8 oflag=direct 2>/tmp/dd.err \
  || { step write FAIL "$(cat /tmp/dd.err)"; exit 1; }
step write PASS "1 MiB written at offset 8 MiB"
begin readback
echo 3 >/proc/sys/vm/drop_caches
check data "$(sha256sum </tmp/pattern)" \
  "$(dd if="/dev/$DISK" bs=1M count=1 skip=8 iflag=direct 2>/dev/null | sha256sum)" || exit 1
step readback PASS "the 1 MiB read back is what was written"
data conn_errors "$(dmesg | grep -c 'detected conn error')"
dmesg | grep -E 'detected conn error|is operational after recovery' | sed 's/^/guest: kernel: /'
iscsiadm -m node -T "$IQN" -p "$PORTAL0" --logout >/dev/null
