# Worked example 2 (README): LBAs 2048-2055 of the LUN answer MEDIUM ERROR / UNRECOVERED READ ERROR;
# the kernel logs the sense, and the blocks around them still read.
#   PYTHONPATH=tests python3 -m support.guest run examples/workbench/read-bad-sector.sh --portal HOST:PORT
IQN=${IQN:-iqn.2026-11.org.pyscsi-target:demo}
start_iscsid && iscsi_login "$IQN" "$PORTAL0" >/dev/null || { step login FAIL "iscsiadm --login"; exit 1; }
DISK=$(iscsi_disk "$(iscsi_session "$IQN" "$PORTAL0")" 0) || { step login FAIL "no disk for LUN 0"; exit 1; }
DISK=${DISK%% *}
step login PASS "/dev/$DISK"
begin bad-read
if dd if="/dev/$DISK" of=/dev/null bs=512 skip=2048 count=8 iflag=direct 2>/tmp/dd.err; then
  step bad-read FAIL "reading LBA 2048 succeeded"
  exit 1
fi
step bad-read PASS "$(head -1 /tmp/dd.err)"
data medium_error "$(dmesg | grep -c 'Sense Key : Medium Error')"
data unrecovered_read_error "$(dmesg | grep -c 'Add. Sense: Unrecovered read error')"
data critical_sector "$(dmesg | sed -n 's/.*critical medium error, dev [a-z]*, sector \([0-9]*\).*/\1/p' | head -1)"
dmesg | grep -iE 'medium error|unrecovered read error' | sed 's/^/guest: kernel: /'
begin good-read
dd if="/dev/$DISK" of=/dev/null bs=512 skip=2056 count=8 iflag=direct 2>/dev/null \
  && step good-read PASS "LBA 2056 reads" || { step good-read FAIL "LBA 2056 does not read"; exit 1; }
iscsiadm -m node -T "$IQN" -p "$PORTAL0" --logout >/dev/null
