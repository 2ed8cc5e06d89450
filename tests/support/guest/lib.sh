# Helpers for guest test scripts (busybox ash), sourced by /init before /guest/test.sh runs.
#
# Reporting (records go to the host at once, so they survive a time-out):
#   begin NAME                    NAME is now the current step (named in a time-out record)
#   step NAME PASS|FAIL|SKIP ...  the result of a step, with its duration when NAME was begun; false on FAIL
#   check NAME EXPECTED ACTUAL .. a data check: PASS when equal; false otherwise
#   data KEY VALUE...             a measured or observed value
#   mark NAME [DETAIL]            an event the host can wait for (Guest.wait_for_mark)
#   wait_host EVENT [SECONDS]     wait until the host sends EVENT (Guest.send); false on time-out
#   say TEXT                      a console line
# iSCSI and block devices:
#   start_iscsid                  iscsid in the background, initiator name $GUEST_INITIATOR
#   iscsi_session IQN PORTAL      the number of the session to IQN through PORTAL (ADDRESS:PORT)
#   iscsi_disk SESSION LUN|auto [SECONDS]  the block device (e.g. sdb) of a LUN of a session
#   start_udev                    systemd-udevd plus a coldplug (needed by multipathd's uevents)
#   iscsi_diagnostics             the iscsid log tail, on the console
# Records are tab-separated: kind, name, status, seconds, guest uptime, detail.  Scratch state lives
# in $GUEST_STATE (/tmp/guest).

GUEST_STATE=${GUEST_STATE:-/tmp/guest}

now() { read -r _up _rest </proc/uptime; echo "$_up"; }

# record KIND NAME STATUS SECONDS DETAIL
record() {
  _line=$(printf '%s' "$5" | tr '\t\r\n' '   ' | cut -c1-2000)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(now)" "$_line" >&7
}

say() { echo "guest: $*"; }

begin() {
  echo "$1" >"$GUEST_STATE/step"
  _step_name=$1
  _step_t0=$(now)
  record begin "$1" "" "" ""
}

step() {
  local name=$1 status=$2 secs=""
  shift 2
  [ "$name" = "$_step_name" ] && secs=$(awk -v a="$_step_t0" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')
  record step "$name" "$status" "$secs" "$*"
  say "STEP $name: $status ${secs:+(${secs}s) }$*"
  [ "$status" != FAIL ]
}

check() {
  local name=$1 expected=$2 actual=$3
  shift 3
  if [ "$expected" = "$actual" ]; then
    record check "$name" PASS "" "$*"
    return 0
  fi
  record check "$name" FAIL "" "expected '$expected', got '$actual' $*"
  say "CHECK $name FAILED: expected '$expected', got '$actual' $*"
  return 1
}

data() {
  local key=$1
  shift
  record data "$key" "" "" "$*"
}

mark() {
  record mark "$1" "" "" "${2:-}"
  say "mark $1"
}

wait_host() {
  local event=$1 limit=$((${2:-60} * 10)) i=0
  while ! grep -qxF "$event" "$GUEST_STATE/host-events" 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt $limit ] && return 1
    sleep 0.1
  done
}

start_iscsid() {
  echo "InitiatorName=$GUEST_INITIATOR" >/etc/iscsi/initiatorname.iscsi
  iscsid -f >"$GUEST_STATE/iscsid.log" 2>&1 &
  local i=0 rc
  while [ $i -lt 100 ]; do
    iscsiadm -m session >/dev/null 2>&1
    rc=$?
    # 21: no active sessions, i.e. iscsid answers.
    [ $rc = 0 ] || [ $rc = 21 ] && return 0
    sleep 0.1
    i=$((i + 1))
  done
  say "iscsid did not answer within 10 s"
  return 1
}

iscsi_session() {
  local iqn=$1 address=${2%:*} port=${2##*:} s c
  for s in /sys/class/iscsi_session/session*; do
    [ -e "$s/targetname" ] && [ "$(cat "$s/targetname")" = "$iqn" ] || continue
    c=/sys/class/iscsi_connection/connection${s##*/session}:0
    [ "$(cat "$c/persistent_address" 2>/dev/null)" = "$address" ] \
      && [ "$(cat "$c/persistent_port" 2>/dev/null)" = "$port" ] && { echo "${s##*/session}"; return 0; }
  done
  return 1
}

# Prints "DEVICE HCTL-path" of the LUN (lowest disk LUN for "auto") once its block device exists.
iscsi_disk() {
  local sess=$1 lun=$2 limit=$((${3:-30} * 10)) i=0 d l b best bl
  while [ $i -lt $limit ]; do
    best="" bl=""
    for d in /sys/class/iscsi_session/session"$sess"/device/target*/*:*:*:*; do
      [ -e "$d/type" ] || continue
      l=${d##*:}
      b=$(ls "$d/block" 2>/dev/null | head -1)
      [ -n "$b" ] && [ -b "/dev/$b" ] || continue
      if [ "$lun" = auto ]; then
        [ "$(cat "$d/type")" = 0 ] || continue
        if [ -z "$bl" ] || [ "$l" -lt "$bl" ]; then bl=$l best="$b $d"; fi
      elif [ "$l" = "$lun" ]; then
        best="$b $d"
      fi
    done
    # With "auto", give the scan a moment to find a lower LUN than the first one seen.
    if [ -n "$best" ] && { [ "$lun" != auto ] || [ $i -ge 10 ]; }; then
      echo "$best"
      return 0
    fi
    sleep 0.1
    i=$((i + 1))
  done
  return 1
}

start_udev() {
  mkdir -p /run/udev
  systemd-udevd --daemon >"$GUEST_STATE/udevd.log" 2>&1 || return 1
  udevadm trigger --action=add --type=subsystems
  udevadm trigger --action=add --type=devices
  udevadm settle --timeout=30
}

iscsi_diagnostics() {
  say "---- iscsid log (tail) ----"
  tail -30 "$GUEST_STATE/iscsid.log" 2>/dev/null | sed 's/^/guest: | /'
}
