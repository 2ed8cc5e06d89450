# The open-iscsi interoperability flow, in 8 steps (7 without the filesystem):
#   discovery login params disk write readback fs logout
# Environment (support.guest.interop.InteropOptions.env): IO_PORTAL (ADDRESS:PORT as the guest sees it),
# IO_IQN (empty: the first SendTargets answer), IO_LUN (number or auto), IO_CHAP_USER/IO_CHAP_SECRET,
# IO_MCHAP_USER/IO_MCHAP_SECRET (mutual), IO_DISCOVERY_CHAP (1: CHAP on the discovery session too),
# IO_HDIGEST/IO_DDIGEST, IO_SIZE_MIB, IO_FS (1: mkfs.ext4 + fsck), IO_TCP_WINDOW, IO_CHAP_ALGS.
# Exit status 0 only when every step passed.  Data is checked with md5sum: the pattern is random, so a
# cryptographic hash buys nothing, and md5 hashes twice as fast as sha256 in a TCG guest.

STEPS="discovery login params disk write readback"
[ "$IO_FS" = 1 ] && STEPS="$STEPS fs"
STEPS="$STEPS logout"
DONE=/tmp/guest/steps-done
: >$DONE

result() { # NAME STATUS DETAIL...
  echo "$1 $2" >>$DONE
  step "$@"
}
skip_missing() { # REASON [STEP-TO-LEAVE]: every step not reported yet is skipped
  for s in $STEPS; do
    [ "$s" = "$2" ] && continue
    grep -q "^$s " $DONE || result "$s" SKIP "$1"
  done
}
end() {
  grep -q ' FAIL$' $DONE && { iscsi_diagnostics; exit 1; }
  grep -q ' SKIP$' $DONE && exit 1
  exit 0
}

start_iscsid || { begin discovery; result discovery FAIL "iscsid did not start"; skip_missing "an earlier step failed"; end; }
GP=$IO_PORTAL
say "portal as the guest sees it: $GP, initiator $GUEST_INITIATOR"

# ---- 1 discovery
begin discovery
if [ "$IO_DISCOVERY_CHAP" = 1 ]; then
  dbset() { iscsiadm -m discoverydb -t st -p "$GP" -o update -n "$1" -v "$2" >/dev/null; }
  iscsiadm -m discoverydb -t st -p "$GP" -o new >/dev/null 2>&1
  dbset discovery.sendtargets.auth.authmethod CHAP
  dbset discovery.sendtargets.auth.username "$IO_CHAP_USER"
  dbset discovery.sendtargets.auth.password "$IO_CHAP_SECRET"
  if [ -n "$IO_MCHAP_USER" ]; then
    dbset discovery.sendtargets.auth.username_in "$IO_MCHAP_USER"
    dbset discovery.sendtargets.auth.password_in "$IO_MCHAP_SECRET"
  fi
  DOUT=$(timeout 60 iscsiadm -m discoverydb -t st -p "$GP" --discover 2>&1)
else
  DOUT=$(timeout 60 iscsiadm -m discovery -t sendtargets -p "$GP" 2>&1)
fi
rc=$?
echo "$DOUT" | sed 's/^/guest:   sendtargets> /'
# Lines are "ADDRESS:PORT,TPGT IQN"; the address is the target's own, which the guest may not reach
# (user-mode networking): the node is created on the portal used instead, with the reported TPGT.
LISTED=$(echo "$DOUT" | awk 'NF == 2 && $1 ~ /,[0-9]+$/ {print $2}')
IQN=$IO_IQN
[ -z "$IQN" ] && IQN=$(echo "$LISTED" | head -1)
LINE=$(echo "$DOUT" | awk -v t="$IQN" 'NF == 2 && $2 == t {print $1; exit}')
TPGT=${LINE##*,}
if [ $rc = 0 ] && [ -n "$LINE" ]; then
  data discovery.targets "$(echo "$LISTED" | wc -l)"
  data discovery.address "${LINE%,*}"
  result discovery PASS "$(echo "$LISTED" | wc -l) target(s); using $IQN (reported at $LINE)"
else
  result discovery FAIL "iscsiadm rc=$rc; target ${IQN:-(none)} not listed"
  skip_missing "an earlier step failed"
  end
fi

# ---- 2 login
begin login
nset() {
  iscsiadm -m node -T "$IQN" -p "$GP" -o update -n "$1" -v "$2" >/dev/null 2>>/tmp/guest/node.err \
    || say "note: setting $1 failed: $(tail -1 /tmp/guest/node.err)"
}
iscsiadm -m node -o new -T "$IQN" -p "$GP,$TPGT" >/dev/null 2>&1
nset node.session.initial_login_retry_max 1
nset 'node.conn[0].timeo.login_timeout' 15
nset node.session.timeo.replacement_timeout 15
[ "$IO_TCP_WINDOW" != default ] && nset 'node.conn[0].tcp.window_size' "$IO_TCP_WINDOW"
nset 'node.conn[0].iscsi.HeaderDigest' "$IO_HDIGEST"
nset 'node.conn[0].iscsi.DataDigest' "$IO_DDIGEST"
AUTH=none
if [ -n "$IO_CHAP_USER" ]; then
  nset node.session.auth.authmethod CHAP
  nset node.session.auth.username "$IO_CHAP_USER"
  nset node.session.auth.password "$IO_CHAP_SECRET"
  AUTH="CHAP user=$IO_CHAP_USER"
  if [ -n "$IO_MCHAP_USER" ]; then
    nset node.session.auth.username_in "$IO_MCHAP_USER"
    nset node.session.auth.password_in "$IO_MCHAP_SECRET"
    AUTH="mutual CHAP user=$IO_CHAP_USER target-user=$IO_MCHAP_USER"
  fi
  [ -n "$IO_CHAP_ALGS" ] && nset node.session.auth.chap_algs "$IO_CHAP_ALGS"
fi
LOUT=$(timeout 90 iscsiadm -m node -T "$IQN" -p "$GP" --login 2>&1)
rc=$?
echo "$LOUT" | sed 's/^/guest:   login> /'
SESS=$(iscsi_session "$IQN" "$GP")
if [ $rc = 0 ] && [ -n "$SESS" ]; then
  data login.auth "$AUTH"
  result login PASS "session $SESS, auth: $AUTH"
else
  result login FAIL "iscsiadm rc=$rc (auth: $AUTH)"
  skip_missing "an earlier step failed"
  end
fi

# ---- 3 params
begin params
C=/sys/class/iscsi_connection/connection$SESS:0
S=/sys/class/iscsi_session/session$SESS
rd() { cat "$1" 2>/dev/null || echo '?'; }
digest() { case "$1" in 0 | None) echo None ;; 1 | CRC32C) echo CRC32C ;; *) echo "$1" ;; esac; }
HD=$(digest "$(rd $C/header_digest)")
DD=$(digest "$(rd $C/data_digest)")
for kv in HeaderDigest="$HD" DataDigest="$DD" MaxRecvDataSegmentLength="$(rd $C/max_recv_dlength)" \
  MaxXmitDataSegmentLength="$(rd $C/max_xmit_dlength)" InitialR2T="$(rd $S/initial_r2t)" \
  ImmediateData="$(rd $S/immediate_data)" FirstBurstLength="$(rd $S/first_burst_len)" \
  MaxBurstLength="$(rd $S/max_burst_len)" TPGT="$(rd $S/tpgt)"; do
  data "negotiated.${kv%%=*}" "${kv#*=}"
done
say "connection $(rd $C/address):$(rd $C/port), auth username=$(rd $S/username) username_in=$(rd $S/username_in)"
# A request of "CRC32C,None" accepts either answer.
wanted() { case "$1" in CRC32C | None) [ "$2" = "$1" ] ;; *) [ "$2" = CRC32C ] || [ "$2" = None ] ;; esac; }
if wanted "$IO_HDIGEST" "$HD" && wanted "$IO_DDIGEST" "$DD"; then
  result params PASS "digests header=$HD data=$DD (requested $IO_HDIGEST/$IO_DDIGEST)"
else
  result params FAIL "digests header=$HD data=$DD, requested $IO_HDIGEST/$IO_DDIGEST"
fi

# ---- 4 disk
begin disk
DISK=$(iscsi_disk "$SESS" "$IO_LUN" 30)
BDEV=${DISK%% *}
LU=${DISK#* }
for d in $S/device/target*/*:*:*:*; do
  [ -e "$d/type" ] && say "LU ${d##*/}: type=$(cat $d/type) vendor='$(cat $d/vendor)' model='$(cat $d/model)' block=$(ls $d/block 2>/dev/null)"
done
BYTES=0
if [ -n "$BDEV" ]; then
  BYTES=$(($(cat /sys/block/$BDEV/size) * 512))
  LBS=$(cat /sys/block/$BDEV/queue/logical_block_size)
  data disk.device "$BDEV"
  data disk.lun "${LU##*:}"
  data disk.bytes "$BYTES"
  data disk.lbs "$LBS"
  data disk.ro "$(cat /sys/block/$BDEV/ro)"
  data disk.max_sectors_kb "$(cat /sys/block/$BDEV/queue/max_sectors_kb)"
  data disk.vendor "$(sed 's/ *$//' $LU/vendor)"
  data disk.model "$(sed 's/ *$//' $LU/model)"
fi
if [ -n "$BDEV" ] && [ "$BYTES" -gt 0 ]; then
  result disk PASS "/dev/$BDEV (LUN ${LU##*:}) $BYTES bytes, lbs=$LBS"
else
  result disk FAIL "no disk for LUN $IO_LUN appeared within 30 s (or its size is 0)"
  BDEV=""
fi

# ---- 5 write, 6 readback
if [ -n "$BDEV" ]; then
  N=$IO_SIZE_MIB
  MAXN=$((BYTES / 1048576))
  [ "$N" -le "$MAXN" ] || { say "disk smaller than $N MiB: testing $MAXN MiB"; N=$MAXN; }
  begin write
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=$N 2>/dev/null
  PSUM=$(md5sum /tmp/pattern | cut -d' ' -f1)
  TAIL=$((BYTES - 1048576))
  dd if=/dev/urandom of=/tmp/tail bs=1M count=1 2>/dev/null
  TSUM=$(md5sum /tmp/tail | cut -d' ' -f1)
  t0=$(now)
  dd if=/tmp/pattern of=/dev/$BDEV bs=1M oflag=direct conv=fsync 2>/tmp/guest/dd.err
  rc=$?
  WT=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')
  if [ $rc = 0 ] && [ $TAIL -ge $((N * 1048576)) ]; then
    dd if=/tmp/tail of=/dev/$BDEV bs=64k oflag=direct,seek_bytes seek=$TAIL conv=fsync 2>>/tmp/guest/dd.err
    rc=$?
  fi
  data write.mib_per_s "$(awk -v n=$N -v t=$WT 'BEGIN {printf "%.1f", (t > 0) ? n / t : 0}')"
  if [ $rc = 0 ]; then
    result write PASS "$N MiB O_DIRECT in ${WT}s, and 1 MiB at offset $TAIL (the disk's end)"
  else
    result write FAIL "dd rc=$rc: $(tail -2 /tmp/guest/dd.err | tr '\n' ' ')"
  fi
  if [ $rc = 0 ]; then
    begin readback
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    R1=$(dd if=/dev/$BDEV bs=1M count=$N iflag=direct 2>/tmp/guest/dd.err | md5sum | cut -d' ' -f1)
    t1=$(now)
    echo 3 >/proc/sys/vm/drop_caches
    R2=$(dd if=/dev/$BDEV bs=1M count=$N 2>>/tmp/guest/dd.err | md5sum | cut -d' ' -f1)
    t2=$(now)
    data readback.seconds "direct $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') buffered $(awk -v a="$t1" -v b="$t2" 'BEGIN {printf "%.2f", b - a}')"
    R3=$TSUM
    [ $TAIL -ge $((N * 1048576)) ] \
      && R3=$(dd if=/dev/$BDEV bs=64k count=16 iflag=direct,skip_bytes skip=$TAIL 2>>/tmp/guest/dd.err \
        | md5sum | cut -d' ' -f1)
    ok=1
    check readback.direct "$PSUM" "$R1" "O_DIRECT read of $N MiB" || ok=0
    check readback.buffered "$PSUM" "$R2" "buffered read after drop_caches" || ok=0
    check readback.tail "$TSUM" "$R3" "the last MiB" || ok=0
    if [ $ok = 1 ]; then
      result readback PASS "O_DIRECT and buffered reads and the last MiB match what was written"
    else
      result readback FAIL "checksum mismatch $(tail -2 /tmp/guest/dd.err | tr '\n' ' ')"
    fi
  else
    result readback SKIP "the write failed"
  fi
  rm -f /tmp/tail

  # ---- 7 fs
  if [ "$IO_FS" = 1 ]; then
    begin fs
    F=8
    [ $N -lt $F ] && F=$N
    err=""
    mkfs.ext4 -F -q -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 /dev/$BDEV >/tmp/guest/fs.log 2>&1 \
      || err="mkfs.ext4 failed"
    [ -z "$err" ] && { mount -t ext4 /dev/$BDEV /mnt >>/tmp/guest/fs.log 2>&1 || err="mount failed"; }
    if [ -z "$err" ]; then
      { dd if=/tmp/pattern of=/mnt/testfile bs=1M count=$F 2>/dev/null && mkdir -p /mnt/d \
        && echo hello >/mnt/d/small && sync; } || err="file write failed"
      FSUM=$(dd if=/tmp/pattern bs=1M count=$F 2>/dev/null | md5sum | cut -d' ' -f1)
      umount /mnt || err=${err:-"umount failed"}
    fi
    [ -z "$err" ] && { e2fsck -f -n /dev/$BDEV >>/tmp/guest/fs.log 2>&1 || err="e2fsck found problems (rc=$?)"; }
    if [ -z "$err" ]; then
      echo 3 >/proc/sys/vm/drop_caches
      if mount -t ext4 -o ro /dev/$BDEV /mnt >>/tmp/guest/fs.log 2>&1; then
        check fs.file "$FSUM" "$(md5sum /mnt/testfile | cut -d' ' -f1)" "file content after a read-only remount" \
          || err="file content differs after remount"
        check fs.small hello "$(cat /mnt/d/small)" || err="small file differs after remount"
        umount /mnt
      else
        err="read-only remount failed"
      fi
    fi
    if [ -z "$err" ]; then
      result fs PASS "mkfs.ext4, ${F} MiB file, e2fsck -f clean, read-only remount verified"
    else
      result fs FAIL "$err"
      tail -8 /tmp/guest/fs.log | sed 's/^/guest:   fs> /'
    fi
  fi
  rm -f /tmp/pattern
fi
skip_missing "no disk" logout

# ---- 8 logout
begin logout
OOUT=$(timeout 40 iscsiadm -m node -T "$IQN" -p "$GP" --logout 2>&1)
rc=$?
echo "$OOUT" | sed 's/^/guest:   logout> /'
i=0
while [ -e /sys/class/iscsi_session/session$SESS ] && [ $i -lt 50 ]; do
  sleep 0.2
  i=$((i + 1))
done
if [ $rc = 0 ] && [ ! -e /sys/class/iscsi_session/session$SESS ]; then
  result logout PASS "session $SESS gone"
else
  result logout FAIL "iscsiadm rc=$rc; session $SESS still present: $([ -e /sys/class/iscsi_session/session$SESS ] && echo yes || echo no)"
fi
iscsiadm -m node -T "$IQN" -p "$GP" -o delete >/dev/null 2>&1
end
