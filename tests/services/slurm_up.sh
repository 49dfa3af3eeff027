#!/usr/bin/env bash
# (started by tests/slurm_fixtures.py or by CI first)
# slurm_up.sh - start a real single-node Slurm cluster on loopback for tests.
#
# Daemons: munged (private key + socket), optionally MariaDB + slurmdbd
# (accounting, so that `sacct` works), slurmctld, slurmd. Everything listens
# on 127.0.0.1 only and keeps its state under $SLURM_TEST_DIR.
#
# Idempotent: if the cluster from $SLURM_TEST_DIR is already up it only prints
# the environment; otherwise it (re)starts whatever is missing.
#
# Settings (environment variables, all optional):
#   SLURM_TEST_DIR          state directory              (default /tmp/slurm-test)
#   SLURM_TEST_PARTITION    partition name               (default debug)
#   SLURM_TEST_CLUSTER      cluster name                 (default testcluster)
#   SLURM_TEST_NODENAME     node name                    (default: short hostname if it
#                                                         resolves to loopback, else localhost)
#   SLURM_TEST_CPUS         CPUs of the node             (default: what `slurmd -C` says)
#   SLURM_TEST_MEMORY_MB    RealMemory of the node       (default: 90% of `slurmd -C`)
#   SLURM_TEST_CTLD_PORT    slurmctld port               (default 6817)
#   SLURM_TEST_SLURMD_PORT  slurmd port                  (default 6818)
#   SLURM_TEST_ACCOUNTING   1 = MariaDB + slurmdbd, sacct works (default 1); 0 = none
#   SLURM_TEST_DBD_PORT     slurmdbd port                (default 6819)
#   SLURM_TEST_MYSQL_PORT   MariaDB port                 (default 3307)
#   SLURM_TEST_CRED_EXPIRE  job credential lifetime in s; also the delay before a
#                           requeued job may start again (default 20, Slurm's is 120)
#   SLURM_TEST_LINK_ETC     1 = point /etc/slurm/slurm.conf at the generated config
#                           when that path is free or already our link (default 1)
#   SLURM_TEST_TIMEOUT      seconds to wait for the node to become idle (default 90)
#
# After it returns:   source "$SLURM_TEST_DIR/env.sh"   (exports SLURM_CONF etc.)
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/slurm-test}
PARTITION=${SLURM_TEST_PARTITION:-debug}
CLUSTER=${SLURM_TEST_CLUSTER:-testcluster}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
ACCOUNTING=${SLURM_TEST_ACCOUNTING:-1}
DBD_PORT=${SLURM_TEST_DBD_PORT:-6819}
MYSQL_PORT=${SLURM_TEST_MYSQL_PORT:-3307}
CRED_EXPIRE=${SLURM_TEST_CRED_EXPIRE:-20}
LINK_ETC=${SLURM_TEST_LINK_ETC:-1}
WAIT_TIMEOUT=${SLURM_TEST_TIMEOUT:-90}

T0=$(date +%s.%N)
log() { echo "[slurm_up] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "$(id -u)" != 0 ]; then die "must run as root (daemons run as root in this setup)"; fi

# ---------------------------------------------------------------- install ---
need_pkgs=()
for b in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge gcc:gcc; do
  command -v "${b%%:*}" >/dev/null 2>&1 || need_pkgs+=("${b#*:}")
done
[ -e /usr/include/dlfcn.h ] || need_pkgs+=(libc6-dev)
if [ "$ACCOUNTING" = 1 ]; then
  command -v slurmdbd >/dev/null 2>&1 || need_pkgs+=(slurmdbd)
  command -v mariadbd >/dev/null 2>&1 || need_pkgs+=(mariadb-server)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing: ${need_pkgs[*]}"
  # keep package maintainer scripts from starting system-wide daemons
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# ------------------------------------------------------------ layout/conf ---
mkdir -p "$STATE"/{munge,munge/key,ctld,spool,log,run,lib,mysql}
chmod 755 "$STATE" "$STATE/munge"     # munge socket must be reachable
chmod 700 "$STATE/munge/key"
CONF="$STATE/slurm.conf"
DBD_CONF="$STATE/slurmdbd.conf"
MUNGE_SOCK="$STATE/munge/munge.socket"
SHIM="$STATE/lib/bindlo.so"
MYSQL_DATA="$STATE/mysql/data"
MYSQL_SOCK="$STATE/mysql/mysqld.sock"
export SLURM_CONF="$CONF"

pid_alive() {  # pid_alive PIDFILE EXE-NAME
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

port_free() {  # port_free PORT -> 0 when nothing listens on 127.0.0.1:PORT
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { log "timed out waiting for $what"; return 1; }
    sleep 0.2
  done
}

# Job ids start at a per-state-dir random-ish offset, so ids are not reused
# after the state directory is wiped (e.g. submitit folders named by %j).
[ -s "$STATE/first_job_id" ] || echo $(( ($(date +%s) % 100000) * 100 + 1 )) > "$STATE/first_job_id"
FIRST_JOB_ID=$(cat "$STATE/first_job_id")

# node name: the short hostname (as on a real cluster) when it resolves to
# loopback addresses only, else "localhost"; jobs use it as MASTER_ADDR etc.
if [ -z "${SLURM_TEST_NODENAME:-}" ]; then
  h=$(hostname -s 2>/dev/null || hostname)
  addrs=$(getent ahosts "$h" 2>/dev/null | awk '{print $1}' | sort -u)
  if [ -n "$h" ] && [ -n "$addrs" ] && ! printf '%s\n' "$addrs" | grep -qvE '^(127\.|::1$)'; then
    NODE=$h
  else
    NODE=localhost
  fi
else
  NODE=$SLURM_TEST_NODENAME
fi

# hardware as slurmd sees it
hw=$(slurmd -C 2>/dev/null | head -1)
hwval() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS_DETECTED=$(hwval CPUs); CPUS_DETECTED=${CPUS_DETECTED:-$(nproc)}
CPUS=${SLURM_TEST_CPUS:-$CPUS_DETECTED}
SOCKETS=$(hwval SocketsPerBoard); CORES=$(hwval CoresPerSocket); THREADS=$(hwval ThreadsPerCore)
MEM_DETECTED=$(hwval RealMemory); MEM_DETECTED=${MEM_DETECTED:-2048}
MEM=${SLURM_TEST_MEMORY_MB:-$(( MEM_DETECTED * 9 / 10 ))}
TOPO=""
if [ "$CPUS" = "$CPUS_DETECTED" ] && [ -n "$SOCKETS" ] && [ -n "$CORES" ] && [ -n "$THREADS" ]; then
  TOPO="Boards=1 SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS"
fi

if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

new_conf=$(cat <<EOF
# generated by slurm_up.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: they are usually unavailable inside containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT_LINES
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# schedule often (defaults: 60 s / 30 s) so requeued and waiting jobs start quickly
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
FirstJobId=$FIRST_JOB_ID
KillWait=5
Waittime=0
DefMemPerCPU=1024
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS $TOPO RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

# env file for test suites
write_env() {
  cat > "$STATE/env.sh" <<EOF
export SLURM_CONF=$CONF
export SLURM_TEST_DIR=$STATE
export SLURM_TEST_PARTITION=$PARTITION
export SLURM_TEST_CLUSTER=$CLUSTER
export SLURM_TEST_NODENAME=$NODE
export SLURM_TEST_CPUS=$CPUS
export SLURM_TEST_MEMORY_MB=$MEM
export SLURM_TEST_ACCOUNTING=$ACCOUNTING
EOF
}

print_usage() {
  local dt
  dt=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  cat <<EOF
Slurm cluster '$CLUSTER' is up (${dt}s): node $NODE ($CPUS CPUs, ${MEM} MB), partition '$PARTITION'.
  source $STATE/env.sh     # sets SLURM_CONF=$CONF and SLURM_TEST_* variables
  sinfo; sbatch -p $PARTITION job.sh; squeue; $( [ "$ACCOUNTING" = 1 ] && echo "sacct -j JOBID" )
  logs: $STATE/log/   stop: slurm_down.sh (same SLURM_TEST_DIR)
EOF
}

cluster_healthy() {
  pid_alive "$STATE/run/munged.pid" munged || return 1
  pid_alive "$STATE/run/slurmctld.pid" slurmctld || return 1
  pid_alive "$STATE/run/slurmd.pid" slurmd || return 1
  if [ "$ACCOUNTING" = 1 ]; then
    pid_alive "$STATE/run/slurmdbd.pid" slurmdbd || return 1
    pid_alive "$STATE/run/mariadbd.pid" mariadbd || return 1
  fi
  [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] || return 1
  sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'
}

if cluster_healthy; then
  log "already running"
  write_env
  print_usage
  exit 0
fi

# Something is missing or the config changed: restart the Slurm daemons
# (munged and MariaDB are kept when alive).
if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$new_conf" ]; then
  log "configuration changed; restarting slurm daemons"
fi
for d in slurmd slurmctld slurmdbd; do
  if pid_alive "$STATE/run/$d.pid" "$d"; then
    pid=$(cat "$STATE/run/$d.pid"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do pid_alive "$STATE/run/$d.pid" "$d" || break; sleep 0.2; done
    pid_alive "$STATE/run/$d.pid" "$d" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/run/$d.pid"
done
printf '%s\n' "$new_conf" > "$CONF"

# ------------------------------------------- loopback-only bind() shim ---
# Slurm daemons bind to the wildcard address and have no option to change it;
# this LD_PRELOAD shim rewrites such binds to 127.0.0.1 / ::1.
shim_src=$(cat <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
/* bind() to the wildcard address becomes bind() to loopback
   (0.0.0.0 -> 127.0.0.1; :: -> ::1, or ::ffff:127.0.0.1 on dual-stack sockets) */
int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind)
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, addr, sizeof(in));
        if (in.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in, sizeof(in));
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof(in6));
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof(struct in6_addr)) == 0) {
            int v6only = 0;
            socklen_t sl = sizeof(v6only);
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &sl) == 0 && !v6only) {
                /* dual-stack socket: keep IPv4 clients working -> ::ffff:127.0.0.1 */
                static const unsigned char mapped_lo[16] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff,127,0,0,1};
                memcpy(&in6.sin6_addr, mapped_lo, sizeof(mapped_lo));
            } else {
                in6.sin6_addr = in6addr_loopback;
            }
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof(in6));
        }
    }
    return real_bind(fd, addr, len);
}
EOF
)
if [ ! -s "$SHIM" ] || [ "$(cat "$STATE/lib/bindlo.c" 2>/dev/null)" != "$shim_src" ]; then
  printf '%s\n' "$shim_src" > "$STATE/lib/bindlo.c"
  gcc -shared -fPIC -O2 -o "$SHIM.tmp" "$STATE/lib/bindlo.c" -ldl || die "compiling the bind shim failed"
  mv "$SHIM.tmp" "$SHIM"
fi

# ------------------------------------------------------------------ munge ---
if ! pid_alive "$STATE/run/munged.pid" munged; then
  [ -s "$STATE/munge/key/munge.key" ] || mungekey -c -k "$STATE/munge/key/munge.key"
  chmod 600 "$STATE/munge/key/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --force --socket="$MUNGE_SOCK" --key-file="$STATE/munge/key/munge.key" \
    --log-file="$STATE/log/munged.log" --pid-file="$STATE/run/munged.pid" \
    --seed-file="$STATE/munge/munged.seed"
fi
wait_for 20 munged sh -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'"

# ------------------------------------------------------ MariaDB + slurmdbd ---
if [ "$ACCOUNTING" = 1 ]; then
  if ! pid_alive "$STATE/run/mariadbd.pid" mariadbd; then
    port_free "$MYSQL_PORT" || die "port $MYSQL_PORT is in use (set SLURM_TEST_MYSQL_PORT)"
    if [ ! -d "$MYSQL_DATA/mysql" ]; then
      rm -rf "$MYSQL_DATA"
      mariadb-install-db --no-defaults --datadir="$MYSQL_DATA" --user=root \
        --auth-root-authentication-method=normal --skip-test-db \
        > "$STATE/log/mariadb-install.log" 2>&1 || { cat "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    rm -f "$MYSQL_SOCK"
    nohup mariadbd --no-defaults --user=root --datadir="$MYSQL_DATA" \
      --socket="$MYSQL_SOCK" --pid-file="$STATE/run/mariadbd.pid" \
      --bind-address=127.0.0.1 --port="$MYSQL_PORT" --skip-name-resolve \
      --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=64M \
      --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --performance-schema=OFF \
      > /dev/null 2>&1 < /dev/null &
    wait_for 60 mariadb mariadb --no-defaults -S "$MYSQL_SOCK" -u root -e 'SELECT 1' \
      || { tail -20 "$STATE/log/mariadbd.log" >&2; die "mariadb did not start"; }
    mariadb --no-defaults -S "$MYSQL_SOCK" -u root -e "
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
      CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
  fi
  cat > "$DBD_CONF" <<EOF
# generated by slurm_up.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBD_CONF"
  port_free "$DBD_PORT" || die "port $DBD_PORT is in use (set SLURM_TEST_DBD_PORT)"
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
  SLURM_CONF="$CONF" LD_PRELOAD="$SHIM" slurmdbd \
    || { tail -20 "$STATE/log/slurmdbd.log" >&2; die "slurmdbd failed"; }
  wait_for 60 slurmdbd sacctmgr -n list cluster \
    || { tail -20 "$STATE/log/slurmdbd.log" >&2; die "slurmdbd not answering"; }
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
fi

# ------------------------------------------------------ slurmctld + slurmd ---
port_free "$CTLD_PORT" || die "port $CTLD_PORT is in use (set SLURM_TEST_CTLD_PORT)"
port_free "$SLURMD_PORT" || die "port $SLURMD_PORT is in use (set SLURM_TEST_SLURMD_PORT)"
LD_PRELOAD="$SHIM" slurmctld -f "$CONF" \
  || { tail -20 "$STATE/log/slurmctld.log" >&2; die "slurmctld failed"; }
wait_for 60 slurmctld scontrol ping \
  || { tail -20 "$STATE/log/slurmctld.log" >&2; die "slurmctld not answering"; }
LD_PRELOAD="$SHIM" slurmd -f "$CONF" -N "$NODE" \
  || { tail -20 "$STATE/log/slurmd.log" >&2; die "slurmd failed"; }

node_ready() {
  local st
  st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null)
  case "$st" in
    idle|mix|alloc|comp) return 0 ;;
    down*|drain*|drng*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true; return 1 ;;
    *) return 1 ;;
  esac
}
wait_for "$WAIT_TIMEOUT" "node $NODE to become idle" node_ready \
  || { sinfo -N -l >&2 || true; tail -20 "$STATE/log/slurmd.log" >&2; die "node not ready"; }

# ------------------------------------------------------- /etc/slurm link ---
if [ "$LINK_ETC" = 1 ]; then
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  elif [ "$(readlink -f /etc/slurm/slurm.conf)" != "$CONF" ]; then
    log "note: /etc/slurm/slurm.conf is a real file; left alone (export SLURM_CONF=$CONF)"
  fi
fi

write_env
print_usage
