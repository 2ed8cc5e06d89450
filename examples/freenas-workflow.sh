#!/bin/sh
# Export a CHAP-protected LUN through the FreeNAS v1.0 API, then check it with iscsi-ls.
#
#   portal -> authorized initiator -> auth credential -> target -> target group (CHAP)
#   -> extent (sparse file) -> target-to-extent (LUN)
#
# Usage: API=http://127.0.0.1:8080 PASSWORD=... PORTAL=127.0.0.1:3261 examples/freenas-workflow.sh
# The admin password is $PYSCSI_TARGET_ADMIN_PASSWORD, or the file the daemon logged at start
# (STATE_DIR/admin-password).  Needs curl, python3 (to read JSON) and libiscsi-bin (iscsi-ls).
set -eu

API=${API:-http://127.0.0.1:8080}
USER_NAME=${USER_NAME:-admin}
PASSWORD=${PASSWORD:-${PYSCSI_TARGET_ADMIN_PASSWORD:-$(cat "${STATE_DIR:-/var/lib/pyscsi-target}/admin-password")}}
PORTAL=${PORTAL:-127.0.0.1:3261}      # a new portal: IP:PORT, the IP configured on this host
NAME=${NAME:-wf}                     # target and extent name
CHAP_USER=${CHAP_USER:-wf-user}
CHAP_SECRET=${CHAP_SECRET:-wf-secret-123}   # FreeNAS rule: 12 to 16 characters
SIZE=${SIZE:-64MB}
BASE="$API/api/v1.0/services/iscsi"

# api METHOD URL [JSON] -> prints the response body; fails on an HTTP error status.
api() {
    out=$(curl -sS -u "$USER_NAME:$PASSWORD" -H 'Content-Type: application/json' -X "$1" \
        -w '\n%{http_code}' ${3:+--data "$3"} "$2")
    code=$(printf '%s' "$out" | tail -n 1)
    body=$(printf '%s' "$out" | sed '$d')
    echo "$1 $2 -> $code $body" >&2
    case $code in 2??) printf '%s' "$body" ;; *) return 1 ;; esac
}
# field NAME: read one field of the JSON object on stdin.
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

portal=$(api POST "$BASE/portal/" "{\"iscsi_target_portal_ips\": [\"$PORTAL\"], \"iscsi_target_portal_comment\": \"$NAME\"}" | field id)
initiator=$(api POST "$BASE/authorizedinitiator/" \
    '{"iscsi_target_initiator_initiators": "ALL", "iscsi_target_initiator_auth_network": "127.0.0.0/8 ::1/128"}' | field id)
# Auth groups are numbered by tag: take the next free one.
tag=$(api GET "$BASE/authcredential/?limit=0" | python3 -c \
    "import json,sys; print(max([c['iscsi_target_auth_tag'] for c in json.load(sys.stdin)] + [0]) + 1)")
api POST "$BASE/authcredential/" "{\"iscsi_target_auth_tag\": $tag, \"iscsi_target_auth_user\": \"$CHAP_USER\",
    \"iscsi_target_auth_secret\": \"$CHAP_SECRET\"}" >/dev/null
target=$(api POST "$BASE/target/" "{\"iscsi_target_name\": \"$NAME\", \"iscsi_target_alias\": \"$NAME\"}" | field id)
api POST "$BASE/targetgroup/" "{\"iscsi_target\": $target, \"iscsi_target_portalgroup\": $portal,
    \"iscsi_target_initiatorgroup\": $initiator, \"iscsi_target_authtype\": \"CHAP\",
    \"iscsi_target_authgroup\": $tag}" >/dev/null
extent=$(api POST "$BASE/extent/" "{\"iscsi_target_extent_type\": \"File\", \"iscsi_target_extent_name\": \"$NAME\",
    \"iscsi_target_extent_path\": \"$NAME.img\", \"iscsi_target_extent_filesize\": \"$SIZE\"}" | field id)
api POST "$BASE/targettoextent/" "{\"iscsi_target\": $target, \"iscsi_extent\": $extent}" >/dev/null

iqn="$(api GET "$BASE/globalconfiguration/" | field iscsi_basename):$NAME"
echo "--- iscsi-ls with the right CHAP secret:"
iscsi-ls -s "iscsi://$CHAP_USER%$CHAP_SECRET@$PORTAL" | grep -A3 "$iqn"
echo "--- a login with a wrong secret must be refused:"
if iscsi-inq "iscsi://$CHAP_USER%wrong-secret-0@$PORTAL/$iqn/0" 2>&1; then
    echo "ERROR: a wrong CHAP secret was accepted" >&2
    exit 1
fi
echo "OK: $iqn exports LUN 0 on $PORTAL with CHAP"
