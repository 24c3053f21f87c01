#!/usr/bin/env bash
# Two "hosts" on one box: two network namespaces joined by a veth pair, for multi-node tests.
#
#   scripts/twohost.sh run 'CMD_A' 'CMD_B'     # up, run CMD_A in host a and CMD_B in host b, wait, down
#   scripts/twohost.sh up ID | down ID         # manual set-up / tear-down (run does both, with a trap)
#   scripts/twohost.sh exec ID a|b CMD...      # one command inside host a or b of an existing pair
#
# Each host has only `lo` and its end of the veth (10.77.0.1 = a, 10.77.0.2 = b by default, TWOHOST_NET
# to change the /24): addresses exist only inside the namespaces, so traffic between the hosts never
# leaves them and two pairs running at once (same addresses, different namespaces) cannot see each
# other. The filesystem is shared, like a cluster's shared disk. Names are unique per run (TWOHOST_ID,
# default: pid + random), so concurrent or aborted runs do not collide; `run` tears everything down on
# exit, error or signal. Needs root (ip netns).
#
# Every command gets, besides the caller's environment:
#   TWOHOST_ID, TWOHOST_HOST (a|b), NODE_INDEX (0|1), HOST_ADDR, PEER_ADDR, ADDR_A, ADDR_B, HOST_IF,
#   GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = HOST_IF, so that gloo binds to the
#   veth address instead of resolving the machine's hostname (whose address is not in the namespace).
# torchrun additionally needs --local-addr=$HOST_ADDR (scripts/train.sh passes LOCAL_ADDR) and a
# rendezvous endpoint on host a: RDZV_ENDPOINT=$ADDR_A:29400.
#
# run: output lines are prefixed [a] / [b]; the exit status is a's if non-zero, else b's. With
# TWOHOST_MAIN=a, host b is stopped as soon as a's command ends (for servers such as a dask worker)
# and the exit status is a's.
set -euo pipefail

NET=${TWOHOST_NET:-10.77.0}
ADDR_A=$NET.1
ADDR_B=$NET.2

names() {  # ID -> NS_A NS_B IF_A IF_B (interface names must stay <= 15 characters: ID <= 12)
  [ ${#1} -le 12 ] || { echo "twohost.sh: ID '$1' is longer than 12 characters" >&2; exit 2; }
  NS_A="mva-$1-a"; NS_B="mva-$1-b"; IF_A="mv$1a"; IF_B="mv$1b"
}

up() {
  names "$1"
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  ip link add "$IF_A" type veth peer name "$IF_B"
  ip link set "$IF_A" netns "$NS_A"
  ip link set "$IF_B" netns "$NS_B"
  ip -n "$NS_A" addr add "$ADDR_A/24" dev "$IF_A"
  ip -n "$NS_B" addr add "$ADDR_B/24" dev "$IF_B"
  for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
  ip -n "$NS_A" link set "$IF_A" up
  ip -n "$NS_B" link set "$IF_B" up
}

kill_ns() {  # SIGKILL every process still inside namespace $1 (all of them were started by this script)
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}

down() {
  names "$1"
  for ns in "$NS_A" "$NS_B"; do kill_ns "$ns"; done
  # Deleting a namespace destroys its veth end, and with it the peer.
  for ns in "$NS_A" "$NS_B"; do ip netns del "$ns" 2>/dev/null || true; done
  ip link del "$IF_A" 2>/dev/null || true  # only exists if up() failed before moving it
}

in_host() {  # ID a|b CMD... : run CMD inside the host with its environment
  names "$1"
  local host=$2; shift 2
  local ns=$NS_A ifn=$IF_A addr=$ADDR_A peer=$ADDR_B idx=0
  if [ "$host" = b ]; then ns=$NS_B; ifn=$IF_B; addr=$ADDR_B; peer=$ADDR_A; idx=1; fi
  exec ip netns exec "$ns" env TWOHOST_ID="$1" TWOHOST_HOST="$host" NODE_INDEX="$idx" HOST_ADDR="$addr" \
    PEER_ADDR="$peer" ADDR_A="$ADDR_A" ADDR_B="$ADDR_B" HOST_IF="$ifn" GLOO_SOCKET_IFNAME="$ifn" \
    TP_SOCKET_IFNAME="$ifn" NCCL_SOCKET_IFNAME="$ifn" "$@"
}

run() {
  RUN_ID=${TWOHOST_ID:-$(printf '%x%04x' $$ $((RANDOM % 65536)))}
  local id=$RUN_ID cmd_a=$1 cmd_b=$2 pid_a pid_b rc_a=0 rc_b=0
  trap 'down "$RUN_ID"' EXIT
  trap 'exit 130' INT TERM  # -> EXIT trap
  up "$id"
  echo "[twohost] $id: a=$ADDR_A ($NS_A) b=$ADDR_B ($NS_B)"
  ( in_host "$id" a bash -c "$cmd_a" ) > >(sed -u 's/^/[a] /') 2>&1 &
  pid_a=$!
  ( in_host "$id" b bash -c "$cmd_b" ) > >(sed -u 's/^/[b] /') 2>&1 &
  pid_b=$!
  wait "$pid_a" || rc_a=$?
  if [ "${TWOHOST_MAIN:-}" = a ]; then names "$id"; kill_ns "$NS_B"; fi
  wait "$pid_b" || rc_b=$?
  echo "[twohost] $id: exit a=$rc_a b=$rc_b"
  [ "$rc_a" -ne 0 ] || [ "${TWOHOST_MAIN:-}" = a ] && return "$rc_a"
  return "$rc_b"
}

[ "$(id -u)" -eq 0 ] || { echo "twohost.sh: needs root (ip netns)" >&2; exit 2; }
cmd=${1:-}; shift || true
case "$cmd" in
  run) [ $# -eq 2 ] || { echo "usage: $0 run 'CMD_A' 'CMD_B'" >&2; exit 2; }; run "$1" "$2" ;;
  up) up "${1:?usage: $0 up ID}"; names "$1"; echo "$NS_A $NS_B $ADDR_A $ADDR_B" ;;
  down) down "${1:?usage: $0 down ID}" ;;
  exec) in_host "${1:?ID}" "${2:?a|b}" "${@:3}" ;;
  *) echo "usage: $0 run 'CMD_A' 'CMD_B' | up ID | down ID | exec ID a|b CMD..." >&2; exit 2 ;;
esac
