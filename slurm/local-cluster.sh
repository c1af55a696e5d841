#!/usr/bin/env bash
# A real SLURM on this one machine, for the e2e tests and for trying the cluster path:
# munge + MariaDB (private, 127.0.0.1) + slurmdbd + slurmctld + two slurmd emulating nodes n1, n2.
#
#   slurm/local-cluster.sh start    install Debian's packages if missing, write configs, start daemons
#   slurm/local-cluster.sh status   which daemons run, and sinfo
#   slurm/local-cluster.sh stop     stop every daemon this script started
#
# Runs as root without systemd (no cgroups: proctrack/linuxproc, task/none). Idempotent: `start`
# only starts what is not running. State lives in $SORA_SLURM_STATE (default /var/lib/sora-slurm);
# configs go to /etc/slurm (a slurm.conf not written by this script is never overwritten).
set -euo pipefail

STATE=${SORA_SLURM_STATE:-/var/lib/sora-slurm}
CLUSTER=sora-local
PARTITION=${SORA_SLURM_PARTITION:-debug}
CPUS_PER_NODE=${SORA_SLURM_CPUS_PER_NODE:-2}
DB_PORT=${SORA_SLURM_DB_PORT:-3307}
DB_PASS=sora-local-slurm
MARKER="# written by sora_lightning slurm/local-cluster.sh"
NODES=(n1 n2)
declare -A NODE_PORT=([n1]=17001 [n2]=17002)
HOST=$(hostname -s)
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

log() { echo "[local-cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the pid in the file is a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "timed out after ${limit}s waiting for $what (logs: $STATE/log)"
}

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} (about 40-60 s)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$STATE/log/apt.log" 2>&1 \
        || die "apt-get install failed; see $STATE/log/apt.log"
}

add_hosts_entry() {  # the emulated node names must resolve, e.g. for MASTER_ADDR inside a job
    grep -qE "^127\.0\.0\.1[[:space:]]+n1[[:space:]]+n2([[:space:]]|$)" /etc/hosts \
        || echo "127.0.0.1 n1 n2" >>/etc/hosts
}

write_slurm_conf() {
    local conf=/etc/slurm/slurm.conf
    if [[ -f $conf ]] && ! grep -qF "$MARKER" "$conf"; then
        die "$conf exists and was not written by this script; refusing to overwrite it"
    fi
    mkdir -p /etc/slurm
    {
        echo "$MARKER"
        cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after its credential expires (default 120 s).
AuthInfo=cred_expire=10
SlurmctldPort=6817
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/d/%n
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
# No cgroups without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
EOF
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORT[$node]} CPUs=$CPUS_PER_NODE State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$conf"
    cat >/etc/slurm/slurmdbd.conf <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
    alive /run/munge/munged.pid && return 0
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munge munge -n
}

mysql_root() { mariadb --no-defaults --socket="$STATE/mysql/mysql.sock" -uroot "$@"; }

start_mariadb() {
    if ! alive "$STATE/run/mariadb.pid"; then
        if [[ ! -d $STATE/mysql/data/mysql ]]; then
            log "initialising a private MariaDB in $STATE/mysql"
            mkdir -p "$STATE/mysql/data"
            mariadb-install-db --no-defaults --datadir="$STATE/mysql/data" --user=root \
                --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
        fi
        log "starting mariadbd on 127.0.0.1:$DB_PORT"
        nohup /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql/data" \
            --socket="$STATE/mysql/mysql.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
            --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
        wait_for 60 mariadb mysql_root -e "SELECT 1"
    fi
    mysql_root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
    if ! alive "$STATE/run/slurmdbd.pid"; then
        log "starting slurmdbd"
        /usr/sbin/slurmdbd
        wait_for 60 slurmdbd sacctmgr -n show cluster
    fi
    if ! alive "$STATE/run/slurmctld.pid"; then
        log "starting slurmctld"
        /usr/sbin/slurmctld
        wait_for 30 slurmctld scontrol ping
    fi
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE/d/$node"
        alive "$STATE/run/slurmd-$node.pid" && continue
        log "starting slurmd -N $node"
        /usr/sbin/slurmd -N "$node"
    done
    wait_for 60 "nodes n1 n2 to be up" nodes_up
}

nodes_up() {  # every node is idle/mixed/allocated (not down, not unknown)
    local states
    states=$(sinfo -h -N -o "%N %t" 2>/dev/null) || return 1
    [[ $(grep -cE " (idle|mix|alloc)$" <<<"$states") -eq ${#NODES[@]} ]]
}

start() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons)"
    mkdir -p "$STATE"/{ctld,d,log,run,mysql}
    install_packages
    add_hosts_entry
    write_slurm_conf
    start_munge
    start_mariadb
    start_slurm
    log "cluster $CLUSTER up: partition $PARTITION, nodes ${NODES[*]}"
    sinfo
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, then KILL after 10 s
    local name=$1 file=$2 pid
    alive "$file" || return 0
    pid=$(cat "$file")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    for node in "${NODES[@]}"; do stop_pidfile "slurmd $node" "$STATE/run/slurmd-$node.pid"; done
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
    stop_pidfile mariadbd "$STATE/run/mariadb.pid"
    stop_pidfile munged /run/munge/munged.pid
}

status() {
    local running=0 file name
    for name in munged mariadb slurmdbd slurmctld slurmd-n1 slurmd-n2; do
        file=$STATE/run/$name.pid
        [[ $name == munged ]] && file=/run/munge/munged.pid
        if alive "$file"; then echo "$name: running (pid $(cat "$file"))"; running=$((running + 1));
        else echo "$name: stopped"; fi
    done
    [[ $running -eq 6 ]] && sinfo && return 0
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
