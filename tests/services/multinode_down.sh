#!/usr/bin/env bash
# multinode_down.sh - stop the 2-node Slurm cluster of multinode_up.sh: every process inside its
# node namespaces (slurmd, job steps, tasks), slurmctld and munged (by their pid files); then
# the namespaces, veths and bridge. Job state is removed, so the next start has no old jobs.
#   MN_TEST_DIR, MN_TEST_BRIDGE   as for multinode_up.sh
#   --purge                       also delete the state directory (logs)
set -uo pipefail
STATE=${MN_TEST_DIR:-/tmp/ddpm-multinode-test}
BRIDGE=${MN_TEST_BRIDGE:-ddpmmn0}
NS_PREFIX=$BRIDGE-
log() { echo "[multinode_down] $*" >&2; }

alive() { [ -d "/proc/$1" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; }
stop_pid() {  # TERM, up to 10 s, then KILL
  alive "$1" || return 0
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 50); do alive "$1" || return 0; sleep 0.2; done
  kill -KILL "$1" 2>/dev/null
}

pids=()
for n in node1 node2; do
  [ -e "/run/netns/$NS_PREFIX$n" ] && pids+=($(ip netns pids "$NS_PREFIX$n" 2>/dev/null))
done
for d in slurmctld munged; do
  f=$STATE/run/$d.pid
  if [ -s "$f" ] && p=$(cat "$f") && alive "$p" && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q -- "$d"; then
    pids+=("$p")
  fi
done
for p in "${pids[@]}"; do stop_pid "$p" & done   # in parallel: slurmctld takes ~5 s on TERM
wait
for n in node1 node2; do ip netns del "$NS_PREFIX$n" 2>/dev/null; done   # also deletes its veth end
for i in 1 2; do ip link del "${BRIDGE}v$i" 2>/dev/null; done
ip link del "$BRIDGE" 2>/dev/null
rm -rf "$STATE"/{ctld,spool,run,munge} "$STATE/env.sh"
if [ "${1:-}" = "--purge" ]; then rm -rf "$STATE"; fi
log "stopped ${#pids[@]} process(es); namespaces and bridge removed"
exit 0
