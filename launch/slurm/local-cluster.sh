#!/usr/bin/env bash
# A real one-node SLURM cluster (Debian's Slurm 22.05 + munge) on this machine, for the SLURM
# tests and for trying launch/slurm/*.sbatch by hand. Runs as root, without systemd or cgroups:
# proctrack/linuxproc follows job processes through /proc, task/none binds nothing.
#
#   bash launch/slurm/local-cluster.sh start    # install packages if missing, start, wait idle
#   bash launch/slurm/local-cluster.sh status   # daemons, sinfo, squeue
#   bash launch/slurm/local-cluster.sh stop     # kill the daemons by pid file
#   bash launch/slurm/local-cluster.sh check    # can start run here? exit 0 yes, 3 after installing
#                                               # packages, 4 never (not root, not Debian); one line why
#
# Everything (slurm.conf, logs, pid files, spool, controller state) lives in $DISTALEX_SLURM_DIR
# (default /tmp/distalex-slurm). Clients find the config through SLURM_CONF, or through the
# symlink /etc/slurm/slurm.conf that `start` makes when no other config is there; `stop`
# removes it again. Each `start` of a stopped cluster begins with an empty job queue.
#
# Environment: DISTALEX_SLURM_DIR, DISTALEX_SLURM_TIMEOUT (seconds to wait for an idle node,
# default 60), DISTALEX_SLURMCTLD_PORT (6817), DISTALEX_SLURMD_PORT (6818),
# DISTALEX_SLURM_KILLWAIT (seconds from SIGTERM to SIGKILL, default 30),
# DISTALEX_SLURM_CRED_EXPIRE (seconds a requeued job waits before it may start again; default
# 120, as on most clusters; `scontrol update JobId=N StartTime=now` skips the wait).
set -euo pipefail

STATE_DIR=${DISTALEX_SLURM_DIR:-/tmp/distalex-slurm}
CONF=$STATE_DIR/slurm.conf
SYS_CONF=/etc/slurm/slurm.conf
TIMEOUT=${DISTALEX_SLURM_TIMEOUT:-60}
CTLD_PORT=${DISTALEX_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DISTALEX_SLURMD_PORT:-6818}
KILLWAIT=${DISTALEX_SLURM_KILLWAIT:-30}
CRED_EXPIRE=${DISTALEX_SLURM_CRED_EXPIRE:-120}
MUNGE_PID=/run/munge/munged.pid
MUNGE_OURS=$STATE_DIR/munged.started-here
PACKAGES=(munge slurm-client slurmctld slurmd)

say() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

# pid from a pid file, printed only when that process is alive.
live_pid() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

need_root() {
    [[ $(id -u) == 0 ]] || die "run as root (the daemons, munge and apt-get need it)"
}

# The packages of PACKAGES that dpkg does not list as installed, one line.
missing_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    echo "${missing[*]}"
}

install_packages() {
    local missing=()
    read -ra missing <<<"$(missing_packages)"
    if ((${#missing[@]} == 0)); then
        say "packages present: ${PACKAGES[*]}"
        return
    fi
    say "installing ${missing[*]} with apt-get"
    # Without systemd the packages' postinst would try the init.d scripts; a policy-rc.d that
    # denies (exit 101) keeps apt from starting daemons that have no config yet.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        say "install failed; running apt-get update and retrying"
        apt-get update -q && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        say "munged already answers on its socket; using it"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge
    install -d -o munge -g munge -m 711 /var/lib/munge
    say "starting munged as user munge"
    setsid runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    touch "$MUNGE_OURS"
    local i
    for i in $(seq 50); do
        munge_works && { say "munged is up (pid $(live_pid $MUNGE_PID || echo ?))"; return; }
        sleep 0.1
    done
    tail -n 20 /var/log/munge/munged.log >&2 || true
    die "munged did not come up"
}

write_conf() {
    local host cpus mem hw
    host=$(hostname -s)
    cpus=$(nproc)
    # slurmd -C reports the board/socket/core layout and memory it will register with; a node
    # configured with more than it registers is drained, so take the layout from it.
    hw=$(slurmd -C | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $mem ]] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    local layout
    layout=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)
    say "writing $CONF (node $host, CPUs=$cpus, RealMemory=${mem}M${layout:+, $layout})"
    mkdir -p "$STATE_DIR"/{log,state,spool}
    cat >"$CONF" <<EOF
# Written by launch/slurm/local-cluster.sh: a one-node cluster without systemd or cgroups.
ClusterName=distalex
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits (BeginTime = requeue + cred_expire + 1).
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups here: track job processes through /proc, bind no tasks, no cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Scan pending jobs every 5 s (defaults 30 s / 60 s): a requeued job whose BeginTime has passed
# starts within seconds instead of a minute. One node, a handful of jobs: the scans cost nothing.
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Preemption: batch jobs are requeue-able by default (scontrol requeue, preemption, node
# failure); a node that was down comes back by itself once slurmd registers.
JobRequeue=1
ReturnToService=2
KillWait=$KILLWAIT
# A job in partition "urgent" preempts jobs in "debug" by requeueing them. Their --signal
# (e.g. B:USR1@90) is sent at once, and they have GraceTime seconds before SIGTERM/SIGKILL.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# Keep finished jobs visible to scontrol/squeue for 5 minutes.
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus ${layout} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=$host Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

link_sys_conf() {
    if [[ -L $SYS_CONF && $(readlink "$SYS_CONF") == "$CONF" ]]; then
        return
    fi
    if [[ -e $SYS_CONF || -L $SYS_CONF ]]; then
        say "$SYS_CONF belongs to another setup; leaving it alone (clients need SLURM_CONF=$CONF)"
        return
    fi
    say "linking $SYS_CONF -> $CONF so that clients find it without SLURM_CONF"
    mkdir -p "$(dirname "$SYS_CONF")"
    ln -s "$CONF" "$SYS_CONF"
}

log_tails() {
    local f
    for f in "$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd.log \
        "$STATE_DIR"/log/slurmctld.out "$STATE_DIR"/log/slurmd.out /var/log/munge/munged.log; do
        [[ -s $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$(hostname -s)" -o '%T' 2>/dev/null | head -n 1; }

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state=""
    say "waiting up to ${TIMEOUT}s for node $(hostname -s) to be idle in sinfo"
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated)
                say "node $(hostname -s) is $state"
                return
                ;;
        esac
        live_pid "$STATE_DIR/slurmctld.pid" >/dev/null || { log_tails; die "slurmctld exited"; }
        live_pid "$STATE_DIR/slurmd.pid" >/dev/null || { log_tails; die "slurmd exited"; }
        sleep 0.5
    done
    SLURM_CONF=$CONF sinfo -N -l >&2 || true
    log_tails
    die "node not idle after ${TIMEOUT}s (last state: '${state:-no answer}'); '$0 stop' ends the daemons"
}

start_daemon() { # name, then the command line
    local name=$1 pid
    shift
    if pid=$(live_pid "$STATE_DIR/$name.pid"); then
        say "$name already running (pid $pid)"
        return
    fi
    say "starting $name: $*"
    # setsid and closed stdio: the daemon must not hold a caller's pipe open or share its
    # process group (pytest waits on both).
    setsid "$@" </dev/null >>"$STATE_DIR/log/$name.out" 2>&1
    local i
    for i in $(seq 50); do
        pid=$(live_pid "$STATE_DIR/$name.pid") && { say "$name is up (pid $pid)"; return; }
        sleep 0.1
    done
    log_tails
    die "$name exited during start (its log is above); '$0 stop' ends what did start"
}

print_usage_hint() {
    say "cluster up; in other shells: export SLURM_CONF=$CONF"
    say "partitions: debug (default), urgent (preempts debug by requeue); logs in $STATE_DIR/log"
}

cmd_start() {
    need_root
    local ctld slurmd
    ctld=$(live_pid "$STATE_DIR/slurmctld.pid" || true)
    slurmd=$(live_pid "$STATE_DIR/slurmd.pid" || true)
    if [[ -n $ctld && -n $slurmd ]] && [[ $(node_state || true) =~ ^(idle|mixed|allocated)$ ]]; then
        say "already up: slurmctld pid $ctld, slurmd pid $slurmd, node $(node_state)"
        print_usage_hint
        return
    fi
    install_packages
    mkdir -p "$STATE_DIR"/log
    start_munge
    if [[ -z $ctld ]]; then
        # A stopped cluster restarts empty: old controller state and job spool go.
        if [[ -n $slurmd ]]; then
            say "slurmd (pid $slurmd) runs without a controller; stopping it first"
            stop_pid slurmd "$slurmd"
        fi
        rm -rf "$STATE_DIR"/state "$STATE_DIR"/spool
        # Logs of the previous cluster go to *.prev, so that errors shown are this start's.
        local f
        for f in "$STATE_DIR"/log/*.log "$STATE_DIR"/log/*.out; do
            [[ -e $f ]] && mv -f "$f" "$f.prev"
        done
        write_conf
    else
        say "slurmctld already running (pid $ctld); keeping $CONF"
    fi
    mkdir -p "$STATE_DIR"/{log,state,spool}
    link_sys_conf
    # -i: ignore leftover job state errors on a fresh state directory.
    start_daemon slurmctld /usr/sbin/slurmctld -f "$CONF" -i
    start_daemon slurmd /usr/sbin/slurmd -f "$CONF"
    wait_idle
    print_usage_hint
}

stop_pid() { # name pid: SIGTERM, up to 15 s, then SIGKILL
    local name=$1 pid=$2 i
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { say "$name stopped"; return 0; }
        sleep 0.1
    done
    say "$name still alive after 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# slurmstepd processes of this cluster: they log to its slurmd.log (slurmd starts them with an
# empty environment and they are reparented to init, so that open file is what marks them).
our_stepds() {
    local pid f
    for pid in $(pgrep -x slurmstepd || true); do
        for f in /proc/"$pid"/fd/*; do
            if [[ $(readlink "$f" 2>/dev/null) == "$STATE_DIR/log/slurmd.log" ]]; then
                echo "$pid"
                break
            fi
        done
    done
}

cancel_jobs() {
    local jobs i
    jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
    [[ -n $jobs ]] || return 0
    say "cancelling jobs: $(echo $jobs)"
    SLURM_CONF=$CONF scancel $jobs || true
    # Steps that ignore SIGTERM get SIGKILL after KillWait.
    for i in $(seq $(((KILLWAIT + 15) * 2))); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %A 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    say "jobs still running or completing after $((KILLWAIT + 15)) s"
}

cmd_stop() {
    need_root
    local name pid
    if live_pid "$STATE_DIR/slurmctld.pid" >/dev/null && live_pid "$STATE_DIR/slurmd.pid" >/dev/null; then
        cancel_jobs
    fi
    for name in slurmd slurmctld; do
        if pid=$(live_pid "$STATE_DIR/$name.pid"); then
            stop_pid "$name" "$pid"
        else
            say "$name not running"
        fi
        rm -f "$STATE_DIR/$name.pid"
    done
    local steps
    steps=$(our_stepds)
    if [[ -n $steps ]]; then
        say "killing leftover slurmstepd processes of this cluster: $(echo $steps)"
        kill -KILL $steps 2>/dev/null || true
    fi
    if [[ -e $MUNGE_OURS ]]; then
        if pid=$(live_pid $MUNGE_PID); then
            stop_pid munged "$pid"
        fi
        rm -f "$MUNGE_OURS"
    else
        say "munged was not started by this script; leaving it"
    fi
    if [[ -L $SYS_CONF && $(readlink "$SYS_CONF") == "$CONF" ]]; then
        say "removing $SYS_CONF symlink"
        rm -f "$SYS_CONF"
    fi
    say "stopped (config and logs kept in $STATE_DIR)"
}

cmd_status() {
    local name pid rc=0
    for name in slurmctld slurmd; do
        if pid=$(live_pid "$STATE_DIR/$name.pid"); then
            say "$name running (pid $pid)"
        else
            say "$name not running"
            rc=1
        fi
    done
    if munge_works; then say "munged answers"; else say "munged does not answer"; rc=1; fi
    if ((rc == 0)); then
        SLURM_CONF=$CONF sinfo -N -l || rc=1
        SLURM_CONF=$CONF squeue || rc=1
    fi
    return $rc
}

# What start needs, without changing anything: for tests that must say why they cannot run.
cmd_check() {
    if [[ $(id -u) != 0 ]]; then
        echo "needs root (munge, the Slurm daemons and apt-get run as root)"
        return 4
    fi
    if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
        echo "needs Debian's Slurm packages (${PACKAGES[*]}): no dpkg-query or apt-get on this machine"
        return 4
    fi
    local missing
    missing=$(missing_packages)
    if [[ -n $missing ]]; then
        echo "Debian's packages $missing are not installed (start installs them with apt-get)"
        return 3
    fi
    echo "root, and the packages ${PACKAGES[*]} are installed"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    check) cmd_check ;;
    *)
        echo "usage: $0 start|stop|status|check" >&2
        exit 2
        ;;
esac
