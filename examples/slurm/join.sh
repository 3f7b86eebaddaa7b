#!/bin/sh
# dynfarm provider command: join this VM to the site's Slurm cluster as a
# dynamic node (slurmd -Z), named as dynfarm named the host, configless.
#
# Run by the dynfarm client at every boot, once the VPN is up, with the host's
# identity in DYNFARM_* (see site.conf.example). Needs on the VM image: slurmd
# (22.05 or later, not newer than slurmctld) and munge. Needs from the site:
# the cluster's munge key as a 0600 file in the provider's `files` tree
# (etc/munge/munge.key) and a [link:] to the slurmctld host.
#
# Safe to run again: a running munged and slurmd are restarted, so a rebooted
# or re-enrolled VM comes back under the same node name, never as a second node.
# The node's CPUs, sockets and cores are what slurmd detects.
set -eu

# The [link:NAME] of the host that runs slurmctld, as site.conf names it: edit
# this line if yours has another name.
CONTROLLER_LINK=batch-master
# Features the node offers; jobs ask for them with --constraint.
FEATURES="cloud,$DYNFARM_PROVIDER"

say() { echo "slurm join: $*"; }
die() { echo "slurm join: $*" >&2; exit 1; }

controller=
for link in $DYNFARM_LINKS; do
    case $link in "$CONTROLLER_LINK="*) controller=${link#*=} ;; esac
done
[ -n "$controller" ] || die "no link named $CONTROLLER_LINK in DYNFARM_LINKS ('$DYNFARM_LINKS'); set CONTROLLER_LINK to the [link:] of your slurmctld host"
[ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing: put the cluster's key in the provider's files tree"
command -v slurmd >/dev/null || die "slurmd is not installed on this image (Debian: apt-get install slurmd munge)"

# dynfarm lands files as root; munged runs as munge and insists on owning its key.
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# munged and slurmd look up their own name; without an answer each stalls
# ~10 s. (ahosts, as they ask: `getent hosts` also waits for DNS's AAAA.)
getent ahosts "$(hostname)" >/dev/null || printf '127.0.1.1\t%s\n' "$(hostname)" >> /etc/hosts

# Is PID that daemon, and alive? After a crash its pid file outlives it: the pid
# may be another process's by now, or a zombie that init has not reaped yet.
running() {   # PID NAME
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Stop what an earlier run (or the image's own munge service) started.
stop() {   # PIDFILE NAME
    pid=$(cat "$1" 2>/dev/null) || return 0
    running "$pid" "$2" || return 0
    kill "$pid" 2>/dev/null || return 0
    i=0
    while running "$pid" "$2" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}

conf="Feature=$FEATURES"
# RealMemory is what the node offers jobs; without it Slurm counts 1 MB.
[ -z "${DYNFARM_MEMORY_MB:-}" ] || conf="RealMemory=$DYNFARM_MEMORY_MB $conf"

if [ -d /run/systemd/system ]; then
    # Debian's slurmd.service wants /etc/slurm/slurm.conf, which a configless
    # node has not: this drop-in lifts that condition and names the node. Not
    # enabled: started at boot, before the VPN, it would only retry; this
    # script starts it once the tunnel is up.
    mkdir -p /etc/systemd/system/slurmd.service.d
    cat > /etc/systemd/system/slurmd.service.d/dynfarm.conf <<UNIT
[Unit]
ConditionPathExists=
[Service]
ExecStart=
ExecStart=/usr/sbin/slurmd -D -s -Z -N $DYNFARM_NAME --conf-server $controller --conf "$conf"
Restart=on-failure
UNIT
    systemctl daemon-reload
    systemctl disable -q slurmd 2>/dev/null || true
    systemctl restart munge
    systemctl restart slurmd
    sleep 1
    systemctl is-active -q slurmd || die "slurmd did not stay up: journalctl -u slurmd"
else
    # Without systemd (containers, and the tests): the default pid files and
    # spool directory (SlurmdPidFile, SlurmdSpoolDir) are assumed.
    stop /run/munge/munged.pid munged
    # what the packages' units and tmpfiles would make
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    stop /run/slurmd.pid slurmd
    mkdir -p /var/spool/slurmd
    /usr/sbin/slurmd -Z -N "$DYNFARM_NAME" --conf-server "$controller" --conf "$conf" \
        -L /var/log/slurmd.log
fi
say "slurmd -Z -N $DYNFARM_NAME ($conf) started, controller $controller"
