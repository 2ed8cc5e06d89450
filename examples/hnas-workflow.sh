#!/bin/sh
# Drive an existing target through the Hitachi NAS v9 API and watch the initiator side:
#   1. PATCH accessConfig to exclude 127.0.0.1 -> the next login is refused (status 0x0202)
#   2. PATCH accessConfig back to blank (everyone, read-write) -> login works again
#   3. PATCH regenerateGUN -> discovery shows the target under a new IQN
#
# Usage: API=http://127.0.0.1:8080 PASSWORD=... PORTAL=127.0.0.1:3261 ALIAS=wf examples/hnas-workflow.sh
# ALIAS is the target's /v9 alias (the freenas-workflow.sh target is "wf").  CHAP_USER and
# CHAP_SECRET are used for the logins when the target requires CHAP.
set -eu

API=${API:-http://127.0.0.1:8080}
USER_NAME=${USER_NAME:-admin}
PASSWORD=${PASSWORD:-${PYSCSI_TARGET_ADMIN_PASSWORD:-$(cat "${STATE_DIR:-/var/lib/pyscsi-target}/admin-password")}}
PORTAL=${PORTAL:-127.0.0.1:3261}
ALIAS=${ALIAS:-wf}
CHAP_USER=${CHAP_USER:-wf-user}
CHAP_SECRET=${CHAP_SECRET:-wf-secret-123}
BASE="$API/v9/storage/iscsi-targets"

# api METHOD URL [JSON]: prints the body; 2xx and 303 (the PATCH answer) are success.
api() {
    out=$(curl -sS -u "$USER_NAME:$PASSWORD" -H 'Content-Type: application/json' -X "$1" \
        -w '\n%{http_code}' ${3:+--data "$3"} "$2")
    code=$(printf '%s' "$out" | tail -n 1)
    body=$(printf '%s' "$out" | sed '$d')
    echo "$1 $2 -> $code $body" >&2
    case $code in 2??|303) printf '%s' "$body" ;; *) return 1 ;; esac
}
gun() { python3 -c "import json,sys; print(json.load(sys.stdin)['iscsiTarget']['globalUniqueName'])"; }
# A normal-session login to LUN 0 (CHAP credentials are ignored by a target without CHAP).
login() { iscsi-inq "iscsi://$CHAP_USER%$CHAP_SECRET@$PORTAL/$1/0" | grep 'Peripheral Device Type'; }
# Discovery (SendTargets) on the portal; the workflow's portal has no discovery authentication.
discover() { iscsi-ls "iscsi://$PORTAL"; }

oid=$(api GET "$BASE" | python3 -c "
import json, sys
hits = [t['objectId'] for t in json.load(sys.stdin)['iscsiTargets'] if t['alias'] == '$ALIAS']
print(hits[0] if hits else '')")
[ -n "$oid" ] || { echo "no /v9 target with alias $ALIAS" >&2; exit 1; }
iqn=$(api GET "$BASE/$oid" | gun)

echo "--- 1. accessConfig excludes 127.0.0.1: login must be refused"
api PATCH "$BASE/$oid" '{"accessConfig": "192.0.2.0/24(rw)"}' >/dev/null
if login "$iqn" 2>&1; then echo "ERROR: login allowed" >&2; exit 1; fi

echo "--- 2. accessConfig restored: login works"
api PATCH "$BASE/$oid" '{"accessConfig": ""}' >/dev/null
login "$iqn"

echo "--- 3. regenerateGUN: discovery shows the new IQN"
new_iqn=$(api PATCH "$BASE/$oid" '{"regenerateGUN": true}' | gun)
discover | grep -F "Target:$new_iqn "
if discover | grep -qF "Target:$iqn "; then
    echo "ERROR: the old IQN is still listed" >&2; exit 1
fi
echo "OK: $iqn is now $new_iqn"
