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
#   iscsi_login IQN PORTAL [TPGT [REPLACEMENT_TIMEOUT]]  a node on PORTAL (as the guest reaches it) and a
#                                 login; the default replacement timeout (120 s) outlasts a target restart
#   iscsi_session IQN PORTAL      the number of the session to IQN through PORTAL (ADDRESS:PORT)
#   iscsi_disk SESSION LUN|auto [SECONDS]  the block device (e.g. sdb) of a LUN of a session
#   start_udev                    systemd-udevd plus a coldplug (needed by multipathd's uevents)
#   start_multipath               dm-multipath over every iSCSI path: udev, multipathd, the maps (a
#                                 default /etc/multipath.conf unless the run supplied one)
#   iscsi_diagnostics             the iscsid log tail, on the console
# Records are tab-separated: kind, name, status, seconds, guest uptime, detail.  Scratch state lives
# in $GUEST_STATE (/tmp/guest).

GUEST_STATE=${GUEST_STATE:-/tmp/guest}

now() { read -r _up _rest </proc/uptime; echo "$_up"; }

# Guest uptime in centiseconds, in $_cs (no subshell: under TCG every fork costs).
_centis() {
  read -r _up _rest </proc/uptime
  _cs=${_up%.*}${_up#*.}
  _cs=${_cs#"${_cs%%[!0]*}"}
  _cs=${_cs:-0}
}

# record KIND NAME STATUS SECONDS DETAIL: one line, however many lines or tabs DETAIL has.
record() {
  local d=$5
  read -r _up _rest </proc/uptime
  d=${d//$'\t'/ }
  d=${d//$'\n'/ }
  d=${d//$'\r'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%.2000s\n' "$1" "$2" "$3" "$4" "$_up" "$d" >&7
}

say() { echo "guest: $*"; }

begin() {
  echo "$1" >"$GUEST_STATE/step"
  _step_name=$1
  _centis
  _step_t0=$_cs
  record begin "$1" "" "" ""
}

step() {
  local name=$1 status=$2 secs=""
  # The duration in seconds with two decimals, computed without a subshell.
  shift 2
  if [ "$name" = "$_step_name" ]; then
    _centis
    secs=$(((_cs - _step_t0) % 100))
    [ "$secs" -lt 10 ] && secs=0$secs
    secs=$(((_cs - _step_t0) / 100)).$secs
  fi
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

iscsi_login() {
  local iqn=$1 portal=$2 tpgt=${3:-1} replacement=${4:-120}
  iscsiadm -m node -o new -T "$iqn" -p "$portal,$tpgt" >/dev/null 2>&1
  iscsiadm -m node -T "$iqn" -p "$portal" -o update -n node.session.timeo.replacement_timeout -v "$replacement" \
    >/dev/null || return 1
  iscsiadm -m node -T "$iqn" -p "$portal" --login
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

# Prints "DEVICE LU-sysfs-dir" of the LUN (for "auto": the lowest-numbered disk) once its block
# device exists.  "auto" first rescans the session: the write to the host's scan file returns when
# every LU is known, so the lowest disk LUN is not mistaken for one that merely appeared first.
iscsi_disk() {
  local sess=$1 lun=$2 limit=$((${3:-30} * 10)) i=0 d l b want
  [ "$lun" = auto ] && iscsiadm -m session -r "$sess" --rescan >/dev/null 2>&1
  while [ $i -lt $limit ]; do
    want=$lun
    if [ "$lun" = auto ]; then
      want=""
      for d in /sys/class/iscsi_session/session"$sess"/device/target*/*:*:*:*; do
        [ -e "$d/type" ] && [ "$(cat "$d/type")" = 0 ] || continue
        l=${d##*:}
        if [ -z "$want" ] || [ "$l" -lt "$want" ]; then want=$l; fi
      done
    fi
    for d in /sys/class/iscsi_session/session"$sess"/device/target*/*:*:*:"$want"; do
      b=$(ls "$d/block" 2>/dev/null | head -1)
      [ -n "$want" ] && [ -n "$b" ] && [ -b "/dev/$b" ] && { echo "$b $d"; return 0; }
    done
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

start_multipath() {
  modprobe dm_multipath && modprobe dm_round_robin || return 1
  [ -e /etc/multipath.conf ] || printf 'defaults {\n  user_friendly_names yes\n  find_multipaths no\n}\n' \
    >/etc/multipath.conf
  start_udev || return 1
  multipathd -s >"$GUEST_STATE/multipathd.log" 2>&1 &
  local i=0
  until multipathd show daemon >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -gt 100 ] && return 1
    sleep 0.1
  done
  multipath -v2 >"$GUEST_STATE/multipath.log" 2>&1
}

iscsi_diagnostics() {
  say "---- iscsid log (tail) ----"
  tail -30 "$GUEST_STATE/iscsid.log" 2>/dev/null | sed 's/^/guest: | /'
}
