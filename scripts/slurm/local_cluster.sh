#!/usr/bin/env bash
# local_cluster.sh - a real one-node SLURM cluster on localhost.
#
# Installs Debian's slurm-wlm and munge (only when missing), writes
# /etc/slurm/slurm.conf for a single node "localhost" in one partition
# "debug", and starts munged, slurmctld and slurmd directly as daemons (no
# systemd needed, so it also works in containers and CI).
#
# It is for trying SLURM launches locally and for CI, NOT for production:
# no accounting database (sacct does not work), no cgroups, jobs run as
# whoever submits them, SlurmUser=root.
#
# Needs root (Debian/Ubuntu with apt-get).
#
# Usage: scripts/slurm/local_cluster.sh [start|stop|status]
#   start   (default) install, configure, start; idempotent. Waits until the
#           node is idle (LOCAL_CLUSTER_TIMEOUT seconds, default 60).
#   stop    stop slurmd, slurmctld and munged (running job steps are not
#           killed by this; scancel them first).
#   status  daemon status and sinfo; exit 0 when all three daemons run.
#
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log,
#       /var/log/munge/munged.log
set -euo pipefail

readonly PROG=local_cluster
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly SLURM_LOG_DIR=/var/log/slurm
readonly CTLD_PIDFILE=/run/slurmctld.pid
readonly SLURMD_PIDFILE=/run/slurmd.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PIDFILE=/run/munge/munged.pid
readonly NODE=localhost
readonly WAIT_S=${LOCAL_CLUSTER_TIMEOUT:-60}

log() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# is_daemon PID NAME: PID is a live process called NAME. Zombies do not
# count: daemonizing leaves some behind where PID 1 does not reap (containers).
is_daemon() {
    local pid=$1 name=$2 state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# pid_of NAME PIDFILE: print the pid of the running daemon NAME, or fail.
pid_of() {
    local name=$1 pidfile=$2 pid
    if [[ -r $pidfile ]]; then
        pid=$(<"$pidfile")
        if is_daemon "$pid" "$name"; then
            echo "$pid"
            return 0
        fi
    fi
    command -v pgrep >/dev/null || return 1
    for pid in $(pgrep -x "$name"); do
        if is_daemon "$pid" "$name"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

is_running() { pid_of "$1" "$2" >/dev/null 2>&1; }

# node_state: the node's state as sinfo shows it (idle, mix, down*, ...).
node_state() { timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

node_healthy() {
    case "$(node_state)" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

install_packages() {
    local missing=() pkg
    for pkg in munge slurm-wlm; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian/Ubuntu"
    log "installing ${missing[*]} (apt-get)"
    # Keep the packages' postinst from starting daemons of their own
    # (we start them below); only if the system has no policy yet.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}" >/dev/null
    } || rc=$?
    if ((added_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

start_munge() {
    id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"

    if ! is_running munged "$MUNGE_PIDFILE"; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
    die "munged is not answering (see /var/log/munge/munged.log)"
}

# RealMemory: MemTotal in MB less 5% (and at least 256 MB less), so that
# slurmd never reports less than configured (that would drain the node).
real_memory_mb() {
    local kb mb
    kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mb=$((kb / 1024))
    local margin=$((mb / 20))
    if ((margin < 256)); then margin=256; fi
    if ((mb - margin > 100)); then mb=$((mb - margin)); else mb=100; fi
    echo "$mb"
}

render_slurm_conf() {
    cat <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster on localhost
# for trying SLURM launches locally / in CI. Not for production.
# Rewritten by the script whenever it differs from what it generates.
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job waits cred_expire seconds before it may start again (Slurm's default: 120).
# 15 keeps preemption tests short; production clusters keep the default.
AuthInfo=cred_expire=15
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd / cgroups here: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled/requeued/timed out.
KillWait=10
# Completed jobs stay visible to squeue/scontrol for 10 minutes (tests poll them).
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# write_slurm_conf: write slurm.conf if absent or different; returns 0 when
# it changed the file, 1 when it was already up to date.
write_slurm_conf() {
    local new
    new=$(render_slurm_conf)
    if [[ -f $SLURM_CONF ]] && [[ "$(<"$SLURM_CONF")" == "$new" ]]; then
        return 1
    fi
    install -d -m 0755 "$(dirname "$SLURM_CONF")"
    if [[ -f $SLURM_CONF ]]; then
        cp -p "$SLURM_CONF" "$SLURM_CONF.bak"
        log "updating $SLURM_CONF (previous one saved as $SLURM_CONF.bak)"
    else
        log "writing $SLURM_CONF"
    fi
    printf '%s\n' "$new" >"$SLURM_CONF.tmp"
    chmod 0644 "$SLURM_CONF.tmp"
    mv -f "$SLURM_CONF.tmp" "$SLURM_CONF"
    return 0
}

# stop_daemon NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=$2 pid i
    pid=$(pid_of "$name" "$pidfile" 2>/dev/null) || { log "$name is not running"; return 0; }
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        is_daemon "$pid" "$name" || { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    log "$name did not exit after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

show_logs() {
    local f
    for f in "$SLURM_LOG_DIR/slurmctld.log" "$SLURM_LOG_DIR/slurmd.log"; do
        [[ -r $f ]] || continue
        echo "--- last lines of $f:" >&2
        tail -n 15 "$f" >&2
    done
}

# slurmd_start_epoch: when the slurmd that registered with slurmctld started
# (slurmctld remembers the node as idle from its saved state before a new
# slurmd has registered, so the node state alone is not enough).
slurmd_start_epoch() {
    local t
    t=$(timeout 10 scontrol show node "$NODE" -o 2>/dev/null |
        grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2) || return 1
    [[ -n $t && $t != None ]] || return 1
    date -d "$t" +%s
}

start_slurm() {
    install -d -m 0755 "$SLURM_LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    if ! is_running slurmctld "$CTLD_PIDFILE"; then
        log "starting slurmctld"
        /usr/sbin/slurmctld || { show_logs; die "slurmctld failed to start"; }
    fi
    local since=0
    if ! is_running slurmd "$SLURMD_PIDFILE"; then
        log "starting slurmd"
        since=$(date +%s)
        # -N: the node is "localhost" whatever this machine's hostname is.
        /usr/sbin/slurmd -N "$NODE" || { show_logs; die "slurmd failed to start"; }
    fi
    local deadline=$((SECONDS + WAIT_S)) state="" started
    while ((SECONDS < deadline)); do
        state=$(node_state) || true
        case "$state" in
            idle | mix | alloc | comp)
                started=$(slurmd_start_epoch) || started=0
                ((started >= since)) && return 0
                ;;
            # A node left down/drained by an earlier run: bring it back.
            down* | drain* | drng*)
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                ;;
        esac
        sleep 0.5
    done
    show_logs
    die "node $NODE is not idle after ${WAIT_S}s (sinfo state: '${state:-none}')"
}

all_running() {
    is_running munged "$MUNGE_PIDFILE" &&
        is_running slurmctld "$CTLD_PIDFILE" &&
        is_running slurmd "$SLURMD_PIDFILE"
}

ready_message() {
    log "${1:-cluster is up}: node $NODE ($(nproc) CPUs), partition debug." \
        "Try: sbatch --wrap 'hostname' && squeue; stop with: $0 stop"
}

cmd_start() {
    install_packages
    local conf_changed=0
    write_slurm_conf && conf_changed=1
    if ((conf_changed == 0)) && all_running && node_healthy; then
        ready_message "already running and healthy"
        return 0
    fi
    start_munge
    if ((conf_changed)); then
        # Daemons started with an older slurm.conf: restart them.
        if is_running slurmd "$SLURMD_PIDFILE"; then stop_daemon slurmd "$SLURMD_PIDFILE"; fi
        if is_running slurmctld "$CTLD_PIDFILE"; then stop_daemon slurmctld "$CTLD_PIDFILE"; fi
    fi
    start_slurm
    ready_message
}

cmd_stop() {
    stop_daemon slurmd "$SLURMD_PIDFILE"
    stop_daemon slurmctld "$CTLD_PIDFILE"
    stop_daemon munged "$MUNGE_PIDFILE"
}

cmd_status() {
    local rc=0 name pidfile
    for name in munged:$MUNGE_PIDFILE slurmctld:$CTLD_PIDFILE slurmd:$SLURMD_PIDFILE; do
        pidfile=${name#*:}
        name=${name%%:*}
        if is_running "$name" "$pidfile"; then
            log "$name running (pid $(pid_of "$name" "$pidfile"))"
        else
            log "$name not running"
            rc=3
        fi
    done
    if is_running slurmctld "$CTLD_PIDFILE"; then
        timeout 10 sinfo || rc=3
    fi
    return "$rc"
}

main() {
    local cmd=${1:-start}
    case "$cmd" in
        start | stop | status) ;;
        -h | --help | help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            return 0 ;;
        *) printf '%s: error: unknown command %q (use start, stop or status)\n' "$PROG" "$cmd" >&2
            return 2 ;;
    esac
    if ((EUID != 0)); then
        printf '%s: error: must run as root (try: sudo %s %s)\n' "$PROG" "$0" "$cmd" >&2
        return 2
    fi
    "cmd_$cmd"
}

main "$@"
