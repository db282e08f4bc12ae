#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for `make test-cluster` (tests/test_slurm_real.py):
# munged, slurmctld and slurmd on localhost, as root, every file under one directory.
#
#   scripts/slurm_cluster.sh up       install slurm-wlm + munge if missing (apt-get), start the
#                                     daemons, wait until the node is idle; a no-op when it is up
#   scripts/slurm_cluster.sh down     cancel its jobs, stop exactly the daemons `up` started
#   scripts/slurm_cluster.sh status   exit 0 and print SLURM_CONF=... when the cluster is up
#
# Clients (sbatch, squeue, sacct -c, scancel) need SLURM_CONF=$TAMT_SLURM_DIR/slurm.conf.
# A CPU cluster: SLURM drops a GPU GRES without device files ("Removing file-less GPU"), so
# jobs run as on a cluster without GPUs (docs/cluster.md).  It uses its own munge socket and
# ports, so a SLURM already on the machine is left alone.
set -euo pipefail
DIR=${TAMT_SLURM_DIR:-/tmp/tamt-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${TAMT_SLURM_PORT:-16817}
DAEMONS=(slurmd slurmctld munged)  # the order `down` stops them in

running() { [[ -f $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
client() { SLURM_CONF=$CONF "$@"; }
node_idle() { [[ $(client sinfo -h -N -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) == 0 ]] || { echo "slurm_cluster: installing slurm-wlm and munge needs root (apt-get)" >&2; exit 2; }
  echo "slurm_cluster: apt-get install slurm-wlm munge"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  local host node
  host=$(hostname -s)
  # slurmd -C: this machine's CPUs, sockets, cores and memory as slurmd will see them.
  node=$(slurmd -C | head -n 1)
  cat > "$CONF" <<EOF
ClusterName=tamt
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd: finished jobs are read from the completion file (sacct -c).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
ReturnToService=2
KillWait=10
# A loaded machine answers slowly (munge too): a client gives up after 60 s, not 10.
MessageTimeout=60
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  if running munged && running slurmctld && running slurmd && node_idle; then
    echo "slurm_cluster: up (SLURM_CONF=$CONF)"; return
  fi
  [[ $(id -u) == 0 ]] || { echo "slurm_cluster: the daemons run as root: run as root" >&2; exit 2; }
  install
  mkdir -p "$DIR"/{munge,ctld,slurmd}
  chmod 755 "$DIR" "$DIR/munge"  # clients reach the socket; the key itself is 0600
  [[ -f $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
  running munged || munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed"
  write_config
  # A controller starting anew starts clean: no node drained for a reason of an earlier
  # configuration, job ids from 1 in a new completion file (sacct -c -j ID: one record).
  running slurmctld || { rm -rf "$DIR"/ctld/* "$DIR/jobcomp.txt"; client slurmctld; }
  running slurmd || client slurmd
  for _ in $(seq 60); do
    if node_idle; then echo "slurm_cluster: up (SLURM_CONF=$CONF)"; return; fi
    sleep 1
  done
  echo "slurm_cluster: the node did not become idle in 60 s; logs in $DIR:" >&2
  tail -n 20 "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/munged.log >&2 || true
  exit 1
}

down() {
  if running slurmctld && running slurmd; then  # its jobs end first, so that no rank outlives the cluster
    client scancel --quiet $(client squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 60); do [[ -z $(client squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
  fi
  for d in "${DAEMONS[@]}"; do
    running "$d" || continue
    local pid; pid=$(cat "$DIR/$d.pid")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$DIR/$d.pid"
    echo "slurm_cluster: stopped $d ($pid)"
  done
}

status() {
  for d in munged slurmctld slurmd; do running "$d" || { echo "slurm_cluster: $d is not running" >&2; exit 1; }; done
  node_idle || { echo "slurm_cluster: the node is not up: $(client sinfo -h -N 2>&1)" >&2; exit 1; }
  echo "SLURM_CONF=$CONF"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
