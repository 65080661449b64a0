#!/usr/bin/env bash
# A single-node Slurm cluster without systemd: munged (own socket), slurmctld and slurmd, with every
# key, state, spool, log and pid file under one folder, ${SLURM_HOME:-<repo>/.slurm}.
#
#   infra/slurm/cluster.sh start    render slurm.conf, start the daemons, wait until the node is idle
#   infra/slurm/cluster.sh stop     cancel this cluster's jobs, stop the daemons (by pid file)
#   infra/slurm/cluster.sh status   daemons and sinfo; exits 1 unless all three daemons run
#   infra/slurm/cluster.sh env      `export SLURM_CONF=...` for Slurm's clients: eval "$(... env)"
#
# Several clusters can run on one machine (a developer's and a test session's): each has its own
# folder, munge socket and ports. Needs root (slurmd starts jobs as their users) and the Debian
# packages slurm-wlm and munge (infra/system-packages.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
H="${SLURM_HOME:-$root/.slurm}"
mkdir -p "$H"
H="$(cd "$H" && pwd)"
conf="$H/etc/slurm.conf"
export SLURM_CONF="$conf"
node="$(hostname -s)"
min_job_age="${SLURM_MIN_JOB_AGE:-3600}"
kill_wait="${SLURM_KILL_WAIT:-15}"

log() { echo "slurm-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# pid from a pid file, only if that process is alive and is the daemon named (pids get reused)
daemon_pid() {
    local pidfile="$1" name="$2" pid
    [ -s "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] && echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {  # a port nothing listens on; the default first, so a lone cluster gets Slurm's usual ports
    local p="$1" tries=0
    while port_busy "$p" || grep -qx "$p" "$H/etc/ports.tmp" 2>/dev/null; do
        p=$((20000 + RANDOM % 20000))
        tries=$((tries + 1))
        [ "$tries" -lt 200 ] || die "no free port found"
    done
    echo "$p" >>"$H/etc/ports.tmp"
    echo "$p"
}

render_conf() {
    local hw cpus mem
    command -v slurmd >/dev/null || die "slurmd not found: run infra/system-packages.sh (Debian packages slurm-wlm, munge)"
    hw="$(slurmd -C | head -n1)"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from 'slurmd -C': $hw"
    # at least 4 schedulable CPUs (SlurmdParameters=config_overrides lets the node claim more than it
    # has): single-CPU jobs side by side, as on a real node, even on a 2-core test machine
    [ "$cpus" -ge "${SLURM_MIN_CPUS:-4}" ] || cpus="${SLURM_MIN_CPUS:-4}"
    rm -f "$H/etc/ports.tmp"
    local ctld_port slurmd_port
    ctld_port="$(pick_port 6817)"
    slurmd_port="$(pick_port 6818)"
    rm -f "$H/etc/ports.tmp"
    # CPUs only (no socket/core/thread layout): each CPU is a schedulable core, so small jobs share the node
    sed -e "s|@CLUSTER@|prolong|g" -e "s|@HOST@|$node|g" -e "s|@HOME@|$H|g" -e "s|@USER@|$(id -un)|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
        -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY@|$mem|g" -e "s|@DEF_MEM_PER_CPU@|$((mem / cpus))|g" \
        -e "s|@MIN_JOB_AGE@|$min_job_age|g" -e "s|@KILL_WAIT@|$kill_wait|g" \
        "$here/slurm.conf.in" >"$conf.new"
    mv "$conf.new" "$conf"
}

start_munged() {
    if daemon_pid "$H/munge/munged.pid" munged >/dev/null; then return; fi
    command -v munged >/dev/null || die "munged not found: run infra/system-packages.sh"
    if [ ! -s "$H/munge/munge.key" ]; then
        dd if=/dev/urandom of="$H/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$H/munge/munge.key"
    fi
    rm -f "$H/munge/munge.socket" "$H/munge/munge.socket.lock"
    # --force: munged refuses to run as root otherwise
    munged --force --socket="$H/munge/munge.socket" --key-file="$H/munge/munge.key" \
        --pid-file="$H/munge/munged.pid" --log-file="$H/munge/munged.log" --seed-file="$H/munge/munged.seed" \
        || die "munged did not start: $(tail -n3 "$H/munge/munged.log" 2>/dev/null)"
    for _ in $(seq 50); do
        if munge -n -S "$H/munge/munge.socket" 2>/dev/null | unmunge -S "$H/munge/munge.socket" >/dev/null 2>&1; then
            return
        fi
        sleep 0.1
    done
    die "munged does not answer on $H/munge/munge.socket: $(tail -n3 "$H/munge/munged.log" 2>/dev/null)"
}

start_daemon() {  # name, pid file, log file, command...
    local name="$1" pidfile="$2" logfile="$3"
    shift 3
    if daemon_pid "$pidfile" "$name" >/dev/null; then return; fi
    "$@" || die "$name did not start: $(tail -n5 "$logfile" 2>/dev/null)"
    for _ in $(seq 100); do
        daemon_pid "$pidfile" "$name" >/dev/null && return
        sleep 0.1
    done
    die "$name exited at start: $(tail -n5 "$logfile" 2>/dev/null)"
}

node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n1; }

wait_idle() {
    local state="" resumed=0
    for _ in $(seq 300); do
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated | completing) return ;;
            down* | drain* | drained*)
                # a node left down by an earlier stop, or one registered before its config changed
                if [ "$resumed" = 0 ]; then scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true; resumed=1; fi ;;
        esac
        sleep 0.2
    done
    die "node $node is '${state:-unknown}', not idle, after 60 s: $(scontrol show node "$node" 2>/dev/null | grep -o 'Reason=.*' || true); see $H/log/"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as their submitting users)"
    mkdir -p "$H/etc" "$H/state" "$H/spool" "$H/log" "$H/run" "$H/munge"
    chmod 700 "$H/munge"  # munged refuses a key or socket in a folder others can write to
    start_munged
    if ! daemon_pid "$H/run/slurmctld.pid" slurmctld >/dev/null; then
        # slurmd would keep talking to old ports: render only when neither Slurm daemon runs
        daemon_pid "$H/run/slurmd.pid" slurmd >/dev/null || render_conf
    fi
    start_daemon slurmctld "$H/run/slurmctld.pid" "$H/log/slurmctld.log" slurmctld
    start_daemon slurmd "$H/run/slurmd.pid" "$H/log/slurmd.log" slurmd -N "$node"
    wait_idle
    log "up: $node idle ($H); clients need: export SLURM_CONF=$conf"
}

stop_pid() {  # name, pid file
    local pid
    pid="$(daemon_pid "$2" "$1")" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        [ -e "/proc/$pid" ] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    if daemon_pid "$H/run/slurmctld.pid" slurmctld >/dev/null && [ -f "$conf" ]; then
        # jobs' slurmstepd processes outlive slurmd: end the jobs first, so none keeps running unowned
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq $(((kill_wait + 10) * 5))); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    stop_pid slurmd "$H/run/slurmd.pid"
    stop_pid slurmctld "$H/run/slurmctld.pid"
    stop_pid munged "$H/munge/munged.pid"
    log "stopped ($H)"
}

status() {
    local ok=0 pid
    for d in "munged $H/munge/munged.pid" "slurmctld $H/run/slurmctld.pid" "slurmd $H/run/slurmd.pid"; do
        set -- $d
        if pid="$(daemon_pid "$2" "$1")"; then echo "$1: running (pid $pid)"; else echo "$1: stopped"; ok=1; fi
    done
    if [ "$ok" = 0 ]; then sinfo; fi
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) echo "usage: $0 start|stop|status|env   (folder: \${SLURM_HOME:-$root/.slurm})" >&2; exit 2 ;;
esac
