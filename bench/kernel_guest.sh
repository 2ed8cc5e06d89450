# The kernel-initiator benchmark inside the guest (bench/kernel.py boots it; lib.sh's helpers).
# Environment:
#   KB_TARGETS  "NAME,ADDRESS:PORT,IQN,LUN ..." the targets, in the order of odd rounds (even rounds reverse it)
#   KB_JOBS     "ID,RW,BS,QD,READ% ..." fio jobs (READ% for randrw only, else -)
#   KB_ROUNDS, KB_SECONDS
# Protocol with the host, per run: mark ready.R.JOB.NAME, wait for the host's go.R.JOB.NAME (it reads the
# target's CPU time first), run fio, mark done.R.JOB.NAME, then send fio's JSON as data records
# fio.R.JOB.NAME.K (K = 0, 1, ...: chunks of at most 1800 characters), and fio.R.JOB.NAME.end.
# Exit status 0 only if every login and every fio run succeeded.

FAIL=0
start_iscsid || { step iscsid FAIL "iscsid did not start"; exit 1; }

# ---- log in to every target, find its disk
begin login
for t in $KB_TARGETS; do
  IFS=, read -r NAME PORTAL IQN LUN <<EOF
$t
EOF
  OUT=$(timeout 60 iscsiadm -m discovery -t sendtargets -p "$PORTAL" 2>&1) \
    || { step login FAIL "$NAME: discovery on $PORTAL failed: $OUT"; exit 1; }
  iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n node.session.timeo.replacement_timeout -v 30 >/dev/null
  OUT=$(timeout 60 iscsiadm -m node -T "$IQN" -p "$PORTAL" --login 2>&1) \
    || { step login FAIL "$NAME: login to $IQN at $PORTAL failed: $OUT"; exit 1; }
  SESS=$(iscsi_session "$IQN" "$PORTAL")
  DISK=$(iscsi_disk "$SESS" "$LUN" 30)
  DEV=${DISK%% *}
  [ -n "$DEV" ] || { step login FAIL "$NAME: no disk for LUN $LUN"; exit 1; }
  eval "DEV_$(echo "$NAME" | tr -c 'A-Za-z0-9\n' _)=\$DEV"
  Q=/sys/block/$DEV/queue
  # No I/O scheduler on either disk: under TCG every guest cycle counts, and both are treated alike.
  echo none >$Q/scheduler 2>/dev/null
  C=/sys/class/iscsi_connection/connection$SESS:0
  S=/sys/class/iscsi_session/session$SESS
  data "disk.$NAME" "dev=$DEV max_sectors_kb=$(cat $Q/max_sectors_kb) max_hw_sectors_kb=$(cat $Q/max_hw_sectors_kb)" \
    "optimal_io_size=$(cat $Q/optimal_io_size) scheduler=$(cat $Q/scheduler | tr -d '[]' | cut -d' ' -f1)" \
    "bytes=$(($(cat /sys/block/$DEV/size) * 512)) max_recv_dlength=$(cat $C/max_recv_dlength)" \
    "max_xmit_dlength=$(cat $C/max_xmit_dlength) first_burst=$(cat $S/first_burst_len)" \
    "max_burst=$(cat $S/max_burst_len) initial_r2t=$(cat $S/initial_r2t) immediate_data=$(cat $S/immediate_data)"
done
step login PASS "$(echo $KB_TARGETS | wc -w) sessions"

NAMES=""
for t in $KB_TARGETS; do NAMES="$NAMES ${t%%,*}"; done
REVERSED=""
for n in $NAMES; do REVERSED="$n $REVERSED"; done

send_json() { # KEY FILE: the file's content in chunks, then an end record
  local key=$1 j k=0 i=0
  j=$(tr -d '\n' <"$2" | tr -s ' ')
  while [ $i -lt ${#j} ]; do
    data "$key.$k" "${j:$i:1800}"
    i=$((i + 1800))
    k=$((k + 1))
  done
  data "$key.end" "$k"
}

r=1
while [ $r -le "$KB_ROUNDS" ]; do
  ORDER=$NAMES
  [ $((r % 2)) = 0 ] && ORDER=$REVERSED
  for job in $KB_JOBS; do
    IFS=, read -r ID RW BS QD MIX <<EOF
$job
EOF
    for NAME in $ORDER; do
      eval "DEV=\$DEV_$(echo "$NAME" | tr -c 'A-Za-z0-9\n' _)"
      KEY=$r.$ID.$NAME
      begin "fio.$KEY"
      mark "ready.$KEY"
      wait_host "go.$KEY" 120 || { step "fio.$KEY" FAIL "no go from the host"; exit 1; }
      EXTRA=""
      [ "$MIX" != - ] && EXTRA="--rwmixread=$MIX"
      fio --name="$ID" --filename="/dev/$DEV" --ioengine=libaio --direct=1 --rw="$RW" --bs="$BS" \
        --iodepth="$QD" --numjobs=1 --time_based --runtime="$KB_SECONDS" --norandommap --randrepeat=1 \
        --percentile_list=50:90:99:99.9 --output-format=json --output=/tmp/fio.json $EXTRA \
        >/tmp/fio.err 2>&1
      rc=$?
      mark "done.$KEY" "rc=$rc"
      if [ $rc = 0 ]; then
        send_json "fio.$KEY" /tmp/fio.json
        step "fio.$KEY" PASS
      else
        FAIL=1
        step "fio.$KEY" FAIL "fio rc=$rc: $(tail -3 /tmp/fio.err | tr '\n' ' ')"
      fi
    done
  done
  r=$((r + 1))
done

begin logout
iscsiadm -m node --logoutall=all >/dev/null 2>&1
step logout PASS
exit $FAIL
