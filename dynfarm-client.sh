#!/bin/sh
# dynfarm-client.sh: the boot hook of a dynfarm worker VM.
#
# Run it as root at every boot: from rc.local, a cron @reboot line, a systemd
# unit, or the cloud-init user-data that `dynfarm.py bootstrap PROVIDER` prints.
# It
#   1. reads its settings (default /etc/dynfarm/client.conf; see usage below),
#   2. makes sure only one copy of itself runs (lock directory with a pid file),
#   3. makes sure python3, openvpn and openssl are installed, installing them
#      with the distribution's package manager if not,
#   4. fetches dynfarm.py from the enrollment server if it is missing, over TLS
#      pinned to the site CA and checked against the X-Dynfarm-Sha256 header,
#   5. runs `dynfarm.py client`, which enrolls (or re-enrolls) the VM, brings
#      the VPN up and applies the provider's customization,
#   6. once the VM is enrolled, deletes the token from its settings: later
#      boots prove themselves with the certificate,
# and, from the start of every boot, keeps processes other than root's away
# from the cloud's metadata service (169.254.169.254), where the user-data and
# its token can be read; and exits with the client's exit code. Every line it says goes to stderr, to
# the log file (with a timestamp) and to syslog (tag dynfarm-client).
#
# Exit codes: 0 success; 1 a step failed (lock held, install, fetch); 2 usage or
# settings error; otherwise whatever `dynfarm.py client` exited with.
#
# POSIX sh, checked with `dash -n` and `busybox sh -n`. Everything is inside
# functions and the only top-level command is `main "$@"` on the last line, so a
# truncated download of this file runs nothing.

usage() {
    printf '%s\n' \
        'usage: dynfarm-client.sh [-c SETTINGS] [-h]' \
        '' \
        'Boot hook of a dynfarm worker VM: installs python3, openvpn and openssl if missing,' \
        'fetches dynfarm.py from the enrollment server if missing, and runs' \
        '"dynfarm.py client" (enroll, VPN up, customize). Run it as root at boot.' \
        '' \
        'options:' \
        '  -c SETTINGS  settings file (default /etc/dynfarm/client.conf)' \
        '  -h           show this help' \
        '' \
        'The settings file holds KEY=value lines; the value may be wrapped in double' \
        'or single quotes; lines starting with # are comments; blank lines are' \
        'ignored. It is read, never sourced: nothing in it is executed. It holds the' \
        'enrollment token until the VM is enrolled, so keep it readable by root' \
        'only (chmod 600); once enrolled, the token line is deleted from it.' \
        '' \
        '  DYNFARM_SERVER    required: the enrollment server, https://HOST:PORT' \
        '  DYNFARM_CA        required: absolute path of the site CA certificate (PEM);' \
        '                    the only CA trusted for the server' \
        '  DYNFARM_TOKEN     enrollment token; needed for the first enrollment only' \
        '                    (handed to the client in its environment, never argv)' \
        '  DYNFARM_PROVIDER  provider name, passed to the client as --provider' \
        '  DYNFARM_PY        where dynfarm.py lives (default /usr/local/sbin/dynfarm.py)' \
        '  DYNFARM_STATE     the client state directory (default /var/lib/dynfarm)' \
        '  DYNFARM_LOG       the log file (default /var/log/dynfarm-client.log)' \
        '  DYNFARM_WAIT      seconds a first boot keeps trying a server that does not' \
        '                    answer, for dynfarm.py and for the enrollment (default 300;' \
        '                    0 tries once); later boots use what they stored at once' \
        '  DYNFARM_METADATA  closed (default): only root reaches 169.254.169.254, the' \
        '                    metadata service that serves the user-data and its token' \
        '                    (an iptables rule, made at every boot); open: leave it' \
        '' \
        'example:' \
        '  DYNFARM_SERVER=https://203.0.113.1:8443' \
        '  DYNFARM_CA=/etc/dynfarm/ca.pem' \
        '  DYNFARM_TOKEN="4f0c...e1"' \
        '  DYNFARM_PROVIDER=aruba' \
        '' \
        'Environment: DYNFARM_LOCK_DIR overrides the lock directory' \
        '(default /run/dynfarm-client.lock). Run it with a PATH that holds the sbin' \
        'directories (systemd and rc.local do; a crontab needs a PATH= line).' \
        '' \
        'exit codes: 0 success, 1 a step failed, 2 usage or settings error,' \
        'otherwise the exit code of dynfarm.py client.'
}

# === Saying things ===

# log_line PRIORITY MESSAGE: one line to stderr, appended with a timestamp to the
# log file (once the settings named it) and to syslog when logger exists.
log_line() {
    case "$1" in
        err) ll_prefix='error: ' ;;
        warning) ll_prefix='warning: ' ;;
        *) ll_prefix='' ;;
    esac
    printf 'dynfarm-client: %s%s\n' "$ll_prefix" "$2" >&2
    if [ -n "$log_file" ]; then
        {
            printf '%s dynfarm-client[%s]: %s%s\n' \
                "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$$" "$ll_prefix" "$2" >>"$log_file"
        } 2>/dev/null || :
    fi
    if command -v logger >/dev/null 2>&1; then
        logger -t dynfarm-client -p "user.$1" "$ll_prefix$2" >/dev/null 2>&1 || :
    fi
}

say() {
    log_line info "$1"
}

warn() {
    log_line warning "$1"
}

# err MESSAGE [CODE]: say it and exit with CODE (default 1).
err() {
    log_line err "$1"
    exit "${2:-1}"
}

need_cmd() {
    if ! command -v "$1" >/dev/null 2>&1; then
        err "this script needs '$1', which is not in PATH ($PATH)" 1
    fi
}

# run_logged CMD ARGS...: say the command, run it with its output appended to
# the log file (or on stderr when there is no log file).
run_logged() {
    say "[#] $*"
    if [ -n "$log_file" ]; then
        "$@" >>"$log_file" 2>&1
    else
        "$@" >&2
    fi
}

# === Arguments and settings ===

parse_args() {
    settings_file=/etc/dynfarm/client.conf
    OPTIND=1
    while getopts ':c:h' pa_opt; do
        case "$pa_opt" in
            c) settings_file=$OPTARG ;;
            h)
                usage
                exit 0
                ;;
            :) err "option -$OPTARG needs an argument; see dynfarm-client.sh -h" 2 ;;
            *) err "unknown option -$OPTARG; see dynfarm-client.sh -h" 2 ;;
        esac
    done
    shift "$((OPTIND - 1))"
    if [ "$#" -gt 0 ]; then
        err "unexpected argument '$1'; see dynfarm-client.sh -h" 2
    fi
}

# read_settings: parse $settings_file into cfg_* without executing any of it.
read_settings() {
    if [ ! -f "$settings_file" ]; then
        err "settings file $settings_file not found; write it (see dynfarm-client.sh -h) or pass -c FILE" 2
    fi
    if [ ! -r "$settings_file" ]; then
        err "cannot read settings file $settings_file" 2
    fi
    cfg_server=''
    cfg_ca=''
    cfg_token=''
    cfg_provider=''
    cfg_py=''
    cfg_state=''
    cfg_log=''
    cfg_wait=''
    cfg_metadata=''
    rs_unknown=''
    rs_lineno=0
    while IFS= read -r rs_line || [ -n "$rs_line" ]; do
        rs_lineno=$((rs_lineno + 1))
        # Trim surrounding white space (this also drops the \r of CRLF files).
        rs_line=${rs_line#"${rs_line%%[![:space:]]*}"}
        rs_line=${rs_line%"${rs_line##*[![:space:]]}"}
        case "$rs_line" in
            '' | '#'*) continue ;;
        esac
        rs_key=${rs_line%%=*}
        rs_key=${rs_key%"${rs_key##*[![:space:]]}"}
        case "$rs_line" in
            *=*) ;;
            *) rs_key='' ;;
        esac
        case "$rs_key" in
            '' | [0-9]* | *[!A-Za-z0-9_]*)
                warn "$settings_file line $rs_lineno is not KEY=value; ignored"
                continue
                ;;
        esac
        rs_value=${rs_line#*=}
        rs_value=${rs_value#"${rs_value%%[![:space:]]*}"}
        case "$rs_value" in
            \"*\" | \'*\')
                rs_value=${rs_value#?}
                rs_value=${rs_value%?}
                ;;
        esac
        case "$rs_key" in
            DYNFARM_SERVER) cfg_server=$rs_value ;;
            DYNFARM_CA) cfg_ca=$rs_value ;;
            DYNFARM_TOKEN) cfg_token=$rs_value ;;
            DYNFARM_PROVIDER) cfg_provider=$rs_value ;;
            DYNFARM_PY) cfg_py=$rs_value ;;
            DYNFARM_STATE) cfg_state=$rs_value ;;
            DYNFARM_LOG) cfg_log=$rs_value ;;
            DYNFARM_WAIT) cfg_wait=$rs_value ;;
            DYNFARM_METADATA) cfg_metadata=$rs_value ;;
            *)
                case " $rs_unknown " in
                    *" $rs_key "*) ;;
                    *) rs_unknown="${rs_unknown:+$rs_unknown }$rs_key" ;;
                esac
                ;;
        esac
    done <"$settings_file"
    if [ -n "$rs_unknown" ]; then
        warn "$settings_file: ignoring unknown settings: $rs_unknown"
    fi
    : "${cfg_py:=/usr/local/sbin/dynfarm.py}"
    : "${cfg_state:=/var/lib/dynfarm}"
    : "${cfg_log:=/var/log/dynfarm-client.log}"
    : "${cfg_wait:=300}"
    : "${cfg_metadata:=closed}"
    check_settings
}

check_settings() {
    if [ -z "$cfg_server" ]; then
        err "$settings_file: DYNFARM_SERVER is not set (the enrollment server, https://HOST:PORT)" 2
    fi
    case "$cfg_server" in
        *[[:space:]]*)
            err "$settings_file: DYNFARM_SERVER '$cfg_server' contains white space (comments go on their own line)" 2
            ;;
        https://?*) cfg_server=${cfg_server%/} ;;
        *) err "$settings_file: DYNFARM_SERVER must be an https:// URL, not '$cfg_server'" 2 ;;
    esac
    if [ -z "$cfg_ca" ]; then
        err "$settings_file: DYNFARM_CA is not set (the site CA certificate, PEM)" 2
    fi
    for cs_pair in "DYNFARM_CA=$cfg_ca" "DYNFARM_PY=$cfg_py" \
        "DYNFARM_STATE=$cfg_state" "DYNFARM_LOG=$cfg_log"; do
        case "${cs_pair#*=}" in
            /*) ;;
            *) err "$settings_file: ${cs_pair%%=*} must be an absolute path, not '${cs_pair#*=}'" 2 ;;
        esac
    done
    if [ ! -f "$cfg_ca" ]; then
        err "$settings_file: DYNFARM_CA $cfg_ca does not exist; copy the site CA certificate there" 2
    fi
    case "$cfg_metadata" in
        closed | open) ;;
        *) err "$settings_file: DYNFARM_METADATA must be closed or open, not '$cfg_metadata'" 2 ;;
    esac
    case "$cfg_wait" in
        # No leading zero: shell arithmetic would read the number as octal.
        '' | *[!0-9]* | 0?*)
            err "$settings_file: DYNFARM_WAIT must be a whole number of seconds, not '$cfg_wait'" 2
            ;;
    esac
}

open_log() {
    ol_dir=${cfg_log%/*}
    if { mkdir -p "${ol_dir:-/}" && : >>"$cfg_log"; } 2>/dev/null; then
        log_file=$cfg_log
    else
        warn "cannot write the log file $cfg_log; logging to stderr and syslog only"
    fi
}

# === One instance at a time ===

# take_lock: mkdir is atomic, so whoever makes $lock_dir holds the lock and
# writes its pid inside. A lock whose pid is dead is stale and taken over.
take_lock() {
    lock_dir=${DYNFARM_LOCK_DIR:-/run/dynfarm-client.lock}
    tl_tries=0
    while ! mkdir "$lock_dir" 2>/dev/null; do
        if [ ! -d "$lock_dir" ]; then
            err "cannot create the lock directory $lock_dir" 1
        fi
        tl_pid=''
        { read -r tl_pid <"$lock_dir/pid"; } 2>/dev/null || :
        case "$tl_pid" in
            '' | *[!0-9]*) tl_pid='' ;;
        esac
        if [ -n "$tl_pid" ] && [ "$tl_pid" != "$$" ] && kill -0 "$tl_pid" 2>/dev/null; then
            err "another dynfarm-client.sh is running (pid $tl_pid holds $lock_dir); not starting a second one" 1
        fi
        tl_tries=$((tl_tries + 1))
        if [ "$tl_tries" -gt 3 ]; then
            err "cannot take the lock $lock_dir; remove it if no dynfarm-client.sh is running" 1
        fi
        if [ -z "$tl_pid" ] && [ "$tl_tries" -eq 1 ]; then
            # Its owner may be between its mkdir and writing its pid.
            sleep 1
            continue
        fi
        warn "taking over the stale lock $lock_dir (pid ${tl_pid:-unknown} is gone)"
        rm -f "$lock_dir/pid"
        rmdir "$lock_dir" 2>/dev/null || :
    done
    lock_held=1
    if ! { printf '%s\n' "$$" >"$lock_dir/pid"; } 2>/dev/null; then
        err "cannot write $lock_dir/pid" 1
    fi
}

# release_lock: the EXIT trap; removes the lock only if this process holds it.
release_lock() {
    if [ "$lock_held" = 1 ]; then
        rm -f "$lock_dir/pid"
        rmdir "$lock_dir" 2>/dev/null || :
        lock_held=0
    fi
}

# === The metadata service ===

# Any process of the VM can ask the cloud's metadata service for the
# user-data, and with it the enrollment token. A batch job runs strangers'
# code: with a token of several uses it could enroll machines of its own. So
# only root may reach it; the rule does not survive a reboot, so every boot
# makes it, before anything else runs.
METADATA=169.254.169.254

close_metadata() {
    if [ "$cfg_metadata" = open ]; then
        return 0
    fi
    if ! command -v iptables >/dev/null 2>&1; then
        (install_packages iptables) || :     # said why; the warning below says what it means
    fi
    set -- OUTPUT -d "$METADATA" -m owner ! --uid-owner 0 -j REJECT
    if iptables -C "$@" 2>/dev/null || iptables -I "$@" 2>/dev/null; then
        return 0
    fi
    warn "could not close $METADATA to non-root processes (iptables -I $*); its user-data holds the token"
}

# === python3, openvpn, openssl ===

ensure_tools() {
    set --
    if ! command -v python3 >/dev/null 2>&1; then
        set -- "$@" python3
    fi
    if ! command -v openvpn >/dev/null 2>&1; then
        set -- "$@" openvpn
    fi
    # The client makes its key and certificate request with it; slim images lack it.
    if ! command -v openssl >/dev/null 2>&1; then
        set -- "$@" openssl
    fi
    if [ "$#" -gt 0 ]; then
        install_packages "$@"
        for et_cmd in "$@"; do
            if ! command -v "$et_cmd" >/dev/null 2>&1; then
                err "$et_cmd is still not in PATH ($PATH) after installing it; install it by hand" 1
            fi
        done
    fi
    if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
        warn "no sshd on this VM: remote_control cannot reach it (install openssh-server)"
    fi
    # dynfarm.py needs Python 3.9; say so here rather than let it fail obscurely.
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' >/dev/null 2>&1; then
        err "$(command -v python3) is older than Python 3.9 or does not run; dynfarm needs 3.9 or newer" 1
    fi
}

# install_packages PACKAGE...: with whichever package manager this system has.
install_packages() {
    if command -v apt-get >/dev/null 2>&1; then
        ip_manager=apt-get
        DEBIAN_FRONTEND=noninteractive
        export DEBIAN_FRONTEND
        if ! run_logged apt-get update -q; then
            warn "apt-get update failed; trying to install from what it knows"
        fi
        set -- apt-get install -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
    elif command -v dnf >/dev/null 2>&1; then
        ip_manager=dnf
        set -- dnf install -y "$@"
    elif command -v yum >/dev/null 2>&1; then
        ip_manager=yum
        set -- yum install -y "$@"
    elif command -v zypper >/dev/null 2>&1; then
        ip_manager=zypper
        set -- zypper --non-interactive install "$@"
    elif command -v apk >/dev/null 2>&1; then
        ip_manager=apk
        set -- apk add "$@"
    else
        err "$* needed and no package manager was found (apt-get, dnf, yum, zypper, apk); install them by hand" 1
    fi
    if ! run_logged "$@"; then
        err "$ip_manager could not install the packages ($*); see ${log_file:-the output above}" 1
    fi
}

# === dynfarm.py ===

# A server that does not answer (exit 3 of fetch_client_py) is tried again
# for up to DYNFARM_WAIT seconds, as dynfarm.py client does for enrolling: it
# may be restarting, or turning away a boot storm past its connection cap.
ensure_client_py() {
    if [ -f "$cfg_py" ]; then
        return 0
    fi
    say "fetching $cfg_server/v1/client into $cfg_py"
    ecp_deadline=$(($(date +%s) + cfg_wait))
    ecp_step=2
    while :; do
        # A try that hangs may not outlast the wait (by more than a second).
        ecp_left=$((ecp_deadline - $(date +%s)))
        ecp_timeout=60
        if [ "$cfg_wait" -gt 0 ] && [ "$ecp_left" -lt "$ecp_timeout" ]; then
            ecp_timeout=$ecp_left
        fi
        if [ "$ecp_timeout" -lt 1 ]; then
            ecp_timeout=1
        fi
        ecp_rc=0
        ecp_out=$(fetch_client_py "$ecp_timeout" 2>&1) || ecp_rc=$?
        if [ "$ecp_rc" -eq 0 ]; then
            break
        fi
        ecp_left=$((ecp_deadline - $(date +%s)))
        if [ "$ecp_rc" -ne 3 ] || [ "$ecp_left" -le 0 ]; then
            err "cannot fetch dynfarm.py: ${ecp_out:-unknown error}" 1
        fi
        ecp_pause=$(jittered_pause "$ecp_step" "$ecp_left")
        say "$ecp_out; trying again in ${ecp_pause}s"
        sleep "$ecp_pause"
        ecp_step=$((ecp_step * 2))
        if [ "$ecp_step" -gt 30 ]; then
            ecp_step=30
        fi
    done
    say "installed $cfg_py (sha256 $ecp_out)"
}

# jittered_pause STEP LEFT: whole seconds between STEP/2 and 3*STEP/2, at most
# LEFT, at least 1: VMs turned away together must not all come back together
# (POSIX sh has no random numbers; python3 is there by now).
jittered_pause() {
    python3 -c 'import random, sys
step, left = int(sys.argv[1]), int(sys.argv[2])
print(max(1, min(left, round(random.uniform(step / 2, step * 1.5)))))' "$1" "$2"
}

# fetch_client_py TIMEOUT: GET $cfg_server/v1/client trusting only $cfg_ca,
# waiting at most TIMEOUT seconds for each step of the exchange, with the
# hostname checked against the certificate's subjectAltName and redirects
# refused; the body must hash to the X-Dynfarm-Sha256 header. It lands in a
# temporary file beside $cfg_py, mode 0755, renamed over it atomically. Prints
# the sha256 on success, one line saying why on failure.
fetch_client_py() {
    python3 - "$cfg_server/v1/client" "$cfg_ca" "$cfg_py" "$1" <<'EOF'
import hashlib
import os
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.request

MAX_BYTES = 64 << 20


class RefuseRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a 3xx then surfaces as an HTTPError


def fetch(url, cafile, timeout):
    context = ssl.create_default_context(cafile=cafile)  # the site CA only
    context.check_hostname = True
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), RefuseRedirect())
    with opener.open(url, timeout=timeout) as response:
        want = (response.headers.get("X-Dynfarm-Sha256") or "").strip().lower()
        body = response.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise ValueError(f"{url} sent more than {MAX_BYTES} bytes")
    if not want:
        raise ValueError(f"{url} sent no X-Dynfarm-Sha256 header")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise ValueError(f"{url} sent a body with sha256 {got}, "
                         f"but its X-Dynfarm-Sha256 header says {want}")
    return body, got


def install(body, dest):
    directory = os.path.dirname(dest)
    os.makedirs(directory, 0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dynfarm.py.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError:
        pass


def main():
    url, cafile, dest, timeout = sys.argv[1:5]
    try:
        body, digest = fetch(url, cafile, float(timeout))
        install(body, dest)
    except urllib.error.HTTPError as e:
        print(f"{url} answered HTTP {e.code} {e.reason}")
        return 1
    except urllib.error.URLError as e:
        print(f"cannot reach {url}: {e.reason}")
        # 3: nobody answered, or the connection was dropped (a server at its
        # connection cap closes it at once); a certificate refused is final.
        return 1 if isinstance(e.reason, ssl.SSLCertVerificationError) else 3
    except (ConnectionError, socket.timeout) as e:     # socket.timeout: TimeoutError from 3.10
        print(f"{url}: {e}")
        return 3
    except (OSError, ValueError) as e:
        print(f"{url}: {e}")
        return 1
    except Exception as e:  # one line, never a traceback
        print(f"{url}: {type(e).__name__}: {e}")
        return 1
    print(digest)
    return 0


sys.exit(main())
EOF
}

# run_client: the token travels in the environment, where ps cannot see it.
run_client() {
    set -- "$cfg_py" client --server "$cfg_server" --ca "$cfg_ca" --state-dir "$cfg_state" --wait "$cfg_wait"
    if [ -n "$cfg_provider" ]; then
        set -- "$@" --provider "$cfg_provider"
    fi
    if [ -n "$cfg_token" ]; then
        DYNFARM_TOKEN=$cfg_token
        export DYNFARM_TOKEN
    fi
    rc_status=0
    run_logged python3 "$@" || rc_status=$?
    forget_token
    if [ "$rc_status" -ne 0 ]; then
        err "dynfarm.py client failed (exit $rc_status); see ${log_file:-its output above}" "$rc_status"
    fi
    say "dynfarm.py client done"
}

# forget_token: enrolled (its certificate stored), the VM needs the token no
# more; one left in the settings is one a job could find. Even if a later step
# failed: the enrollment is what spent it.
forget_token() {
    if [ -z "$cfg_token" ] || [ ! -s "$cfg_state/client.crt" ]; then
        return 0
    fi
    ft_tmp="$settings_file.new"
    ft_status=0
    (umask 077 && grep -v '^[[:space:]]*DYNFARM_TOKEN[[:space:]]*=' "$settings_file" >"$ft_tmp") || ft_status=$?
    if [ "$ft_status" -gt 1 ] || ! mv -f "$ft_tmp" "$settings_file"; then
        rm -f "$ft_tmp"
        warn "could not delete the token from $settings_file; delete its DYNFARM_TOKEN line by hand"
        return 0
    fi
    cfg_token=''
    say "enrolled: the token is deleted from $settings_file (later boots use the certificate)"
}

main() {
    set -u
    log_file=''
    lock_dir=''
    lock_held=0
    # The token comes from the settings file only, never from whoever started us.
    unset DYNFARM_TOKEN
    trap release_lock EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    parse_args "$@"
    need_cmd mkdir
    need_cmd rm
    need_cmd rmdir
    need_cmd date
    need_cmd sleep
    need_cmd grep
    need_cmd mv
    read_settings
    open_log
    take_lock
    say "starting (settings $settings_file, pid $$)"
    close_metadata
    ensure_tools
    ensure_client_py
    run_client
}

main "$@"
