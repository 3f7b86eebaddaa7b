"""Tests for dynfarm-client.sh, the VM boot hook, run under dash and busybox ash.

Every run gets a PATH of two temporary directories and nothing else:

    bin/   fakes: python3 (a wrapper), openvpn, logger, package managers
    sys/   symlinks to the few real tools the script needs (mkdir, rm, ...)

so no test reaches the machine's own python3, openvpn, syslog or apt-get.

The fake python3 is a wrapper: `python3 SCRIPT client ...` is recorded (argv,
DYNFARM_TOKEN from the environment, the lock's pid file) as one JSON line in
$FAKE_RECORD and exits with $FAKE_CLIENT_EXIT; anything else (the version check,
the inline fetch script) goes to the real interpreter, so fetching dynfarm.py is
tested for real against an HTTPS server on 127.0.0.1 with throwaway certificates
made by the openssl CLI.

Nothing is written outside pytest's tmp directories: the settings point the
state, log and dynfarm.py there, and DYNFARM_LOCK_DIR moves the lock there.
"""

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "dynfarm-client.sh"
REAL_PYTHON = os.path.realpath(sys.executable)

SHELLS = {
    "dash": [shutil.which("dash") or "dash"],
    "busybox": [shutil.which("busybox") or "busybox", "sh"],
}
# The real tools the script may use; everything else must come from bin/.
SYS_TOOLS = ("mkdir", "rm", "rmdir", "date", "sleep", "grep", "mv")

TOKEN = "tok-5ecret-0123456789abcdef"
SERVER = "https://203.0.113.1:8443"
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ dynfarm-client\[\d+\]: ")

FAKE_PYTHON = """\
#!{python}
import json, os, sys
REAL = {python!r}
args = sys.argv[1:]
if len(args) >= 2 and args[1] == "client":
    lock = os.path.join(os.environ.get("DYNFARM_LOCK_DIR", "/nonexistent"), "pid")
    try:
        with open(lock) as f:
            lock_pid = f.read().strip()
    except OSError:
        lock_pid = None
    record = {{"argv": args, "token": os.environ.get("DYNFARM_TOKEN"),
               "ppid": os.getppid(), "lock_pid": lock_pid}}
    with open(os.environ["FAKE_RECORD"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    if os.environ.get("FAKE_CLIENT_ENROLLS"):          # what an enrollment leaves: the certificate
        state = args[args.index("--state-dir") + 1]
        os.makedirs(state, exist_ok=True)
        with open(os.path.join(state, "client.crt"), "w") as f:
            f.write("-----BEGIN CERTIFICATE-----")
    print("fake client says hello on stdout")
    print("fake client says hello on stderr", file=sys.stderr)
    sys.exit(int(os.environ.get("FAKE_CLIENT_EXIT", "0")))
if args[:1] == ["-c"] and os.environ.get("FAKE_PYTHON_TOO_OLD"):
    sys.exit(1)
os.execv(REAL, [REAL] + args)
"""

FAKE_LOGGER = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_SYSLOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_LOGGER_EXIT", "0")))
"""

# A package manager that records its calls and "installs" python3 / openvpn by
# copying the fakes from $FAKE_PM_SOURCE next to itself.
FAKE_PACKAGE_MANAGER = """\
#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PM_RECORD"], "a") as f:
    f.write(json.dumps({{"name": os.path.basename(sys.argv[0]), "argv": args,
                        "DEBIAN_FRONTEND": os.environ.get("DEBIAN_FRONTEND")}}) + "\\n")
code = int(os.environ.get("FAKE_PM_EXIT", "0"))
if code:
    sys.exit(code)
if "install" in args or "add" in args:
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    for package in ("python3", "openvpn", "iptables", "openssl"):
        if package in args:
            shutil.copy2(os.path.join(os.environ["FAKE_PM_SOURCE"], package), here)
"""


# iptables that records its calls; -C (is the rule there?) says no unless
# $FAKE_IPTABLES_HAS_RULE, -I succeeds unless $FAKE_IPTABLES_FAILS.
FAKE_IPTABLES = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_IPTABLES_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-C":
    sys.exit(0 if os.environ.get("FAKE_IPTABLES_HAS_RULE") else 1)
sys.exit(1 if os.environ.get("FAKE_IPTABLES_FAILS") else 0)
"""


def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


def lines(text):
    return text.splitlines()


def errors(result):
    return [l for l in lines(result.stderr) if l.startswith("dynfarm-client: error: ")]


class World:
    """One VM as the script sees it: settings, fakes, PATH, lock and log in tmp."""

    def __init__(self, tmp, shell):
        self.tmp = tmp
        self.shell = shell
        self.bin = tmp / "bin"
        self.sys = tmp / "sys"
        self.source = tmp / "packages"  # what a fake package manager installs
        for d in (self.bin, self.sys, self.source):
            d.mkdir()
        for tool in SYS_TOOLS:
            real = shutil.which(tool)
            assert real, f"{tool} is needed to run these tests"
            (self.sys / tool).symlink_to(real)
        write_executable(self.source / "python3", FAKE_PYTHON.format(python=REAL_PYTHON))
        write_executable(self.source / "openvpn", "#!/bin/sh\nexit 0\n")
        write_executable(self.source / "iptables", FAKE_IPTABLES.format(python=REAL_PYTHON))
        write_executable(self.source / "openssl", "#!/bin/sh\nexit 0\n")
        shutil.copy2(self.source / "python3", self.bin / "python3")
        shutil.copy2(self.source / "openvpn", self.bin / "openvpn")
        shutil.copy2(self.source / "iptables", self.bin / "iptables")
        shutil.copy2(self.source / "openssl", self.bin / "openssl")
        write_executable(self.bin / "logger", FAKE_LOGGER.format(python=REAL_PYTHON))

        self.settings = tmp / "etc" / "client.conf"
        self.settings.parent.mkdir()
        self.ca = tmp / "etc" / "ca.pem"
        self.ca.write_text("not used unless dynfarm.py is fetched\n")
        self.py = tmp / "sbin" / "dynfarm.py"
        self.py.parent.mkdir()
        self.py.write_text("# stands for dynfarm.py\n")
        self.state = tmp / "state"
        self.log = tmp / "log" / "dynfarm-client.log"  # log/ does not exist yet
        self.lock = tmp / "run" / "dynfarm-client.lock"
        self.lock.parent.mkdir()
        self.record = tmp / "client-calls.jsonl"
        self.syslog = tmp / "syslog.jsonl"
        self.pm_record = tmp / "package-manager-calls.jsonl"
        self.iptables_record = tmp / "iptables-calls.jsonl"

    def write_settings(self, **overrides):
        values = {
            "DYNFARM_SERVER": SERVER,
            "DYNFARM_CA": str(self.ca),
            "DYNFARM_TOKEN": TOKEN,
            "DYNFARM_PROVIDER": "aruba",
            "DYNFARM_PY": str(self.py),
            "DYNFARM_STATE": str(self.state),
            "DYNFARM_LOG": str(self.log),
        }
        values.update(overrides)
        self.settings.write_text(
            "".join(f"{k}={v}\n" for k, v in values.items() if v is not None))

    def add_package_manager(self, name):
        write_executable(self.bin / name, FAKE_PACKAGE_MANAGER.format(python=REAL_PYTHON))

    def env(self, **extra):
        env = {
            "PATH": f"{self.bin}:{self.sys}",
            "HOME": str(self.tmp),
            "LC_ALL": "C",
            "DYNFARM_LOCK_DIR": str(self.lock),
            "FAKE_RECORD": str(self.record),
            "FAKE_SYSLOG": str(self.syslog),
            "FAKE_IPTABLES_RECORD": str(self.iptables_record),
            "FAKE_PM_RECORD": str(self.pm_record),
            "FAKE_PM_SOURCE": str(self.source),
        }
        env.update(extra)
        return env

    def run(self, *args, script=SCRIPT, timeout=60, **extra_env):
        if not args:
            args = ("-c", str(self.settings))
        return subprocess.run(
            SHELLS[self.shell] + [str(script)] + list(args),
            env=self.env(**extra_env), capture_output=True, text=True,
            timeout=timeout, cwd=self.tmp)

    def client_calls(self):
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def pm_calls(self):
        if not self.pm_record.exists():
            return []
        return [json.loads(line) for line in self.pm_record.read_text().splitlines()]


@pytest.fixture(params=sorted(SHELLS))
def shell(request):
    if not shutil.which(SHELLS[request.param][0]):
        pytest.skip(f"{request.param} is not installed")
    return request.param


@pytest.fixture
def world(tmp_path, shell):
    w = World(tmp_path, shell)
    w.write_settings()
    return w


def expected_argv(w, provider="aruba", server=SERVER, py=None, ca=None, wait="300"):
    argv = [str(py or w.py), "client", "--server", server, "--ca", str(ca or w.ca),
            "--state-dir", str(w.state), "--wait", wait]
    if provider:
        argv += ["--provider", provider]
    return argv


# --- the file itself ---

def test_syntax(shell):
    result = subprocess.run(SHELLS[shell] + ["-n", str(SCRIPT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_script_is_executable_and_ends_with_main():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().rstrip("\n").splitlines()[-1] == 'main "$@"'


def test_truncated_script_runs_nothing(world):
    """Cut at any line, the script defines functions at most: no client run,
    no log, no lock, nothing said."""
    full = SCRIPT.read_text().splitlines(keepends=True)
    truncated = world.tmp / "truncated.sh"
    for cut in range(len(full)):
        truncated.write_text("".join(full[:cut]))
        result = world.run("-c", str(world.settings), script=truncated)
        assert "dynfarm-client:" not in result.stderr, (cut, result.stderr)
        assert not world.record.exists(), cut
        assert not world.log.exists(), cut
        assert not world.lock.exists(), cut
    # and the whole script does run (so the loop above could have failed)
    assert world.run().returncode == 0
    assert len(world.client_calls()) == 1


# --- arguments and settings ---

def test_help_explains_every_setting(world):
    result = world.run("-h")
    assert result.returncode == 0
    assert result.stderr == ""
    for key in ("DYNFARM_SERVER", "DYNFARM_CA", "DYNFARM_TOKEN", "DYNFARM_PROVIDER",
                "DYNFARM_PY", "DYNFARM_STATE", "DYNFARM_LOG", "DYNFARM_WAIT", "/etc/dynfarm/client.conf"):
        assert key in result.stdout
    assert world.client_calls() == []


@pytest.mark.parametrize("args", [("-x",), ("-c",), ("extra",)])
def test_usage_errors_exit_2(world, args):
    result = world.run(*args)
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert world.client_calls() == []


def test_missing_settings_file_is_one_line_exit_2(world):
    missing = world.tmp / "etc" / "nope.conf"
    result = world.run("-c", str(missing))
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert str(missing) in result.stderr
    assert world.client_calls() == []
    assert not world.lock.exists()


@pytest.mark.parametrize("key", ["DYNFARM_SERVER", "DYNFARM_CA"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_required_key_exit_2(world, key, how):
    world.write_settings(**{key: None if how == "absent" else ""})
    result = world.run()
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert key in result.stderr
    assert world.client_calls() == []


@pytest.mark.parametrize("settings, needle", [
    ({"DYNFARM_SERVER": "http://203.0.113.1:8443"}, "https://"),
    ({"DYNFARM_SERVER": "https://203.0.113.1:8443 # the server"}, "white space"),
    ({"DYNFARM_CA": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem"),
    ({"DYNFARM_CA": "etc/ca.pem"}, "absolute"),
    ({"DYNFARM_LOG": "dynfarm.log"}, "DYNFARM_LOG"),
    ({"DYNFARM_WAIT": "5m"}, "DYNFARM_WAIT must be a whole number of seconds, not '5m'"),
    ({"DYNFARM_WAIT": "-1"}, "DYNFARM_WAIT"),
    ({"DYNFARM_WAIT": "08"}, "DYNFARM_WAIT must be a whole number of seconds, not '08'"),
])
def test_bad_settings_exit_2(world, settings, needle):
    world.write_settings(**settings)
    result = world.run()
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert needle in result.stderr
    assert world.client_calls() == []


def test_settings_format_is_parsed_not_sourced(world):
    canary = world.tmp / "pwned"
    world.settings.write_text(
        "# dynfarm client settings\r\n"
        "\n"
        "   # an indented comment\n"
        f'DYNFARM_SERVER="{SERVER}/"\r\n'
        f"DYNFARM_CA = '{world.ca}'\n"
        f"  DYNFARM_TOKEN=\"{TOKEN}\"\n"
        f'DYNFARM_PROVIDER=$(mkdir {canary})\n'
        f"DYNFARM_PY={world.py}\n"
        f"DYNFARM_STATE='{world.state}'\n"
        f"DYNFARM_LOG={world.log}\n"
        "FROBNICATE=1\n"
        "COLOUR=blue\n"
        "FROBNICATE=2\n"
        f"DYNFARM_EXTRA=`mkdir {canary}`")  # no final newline
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert not canary.exists()
    [call] = world.client_calls()
    assert call["argv"] == expected_argv(world, provider=f"$(mkdir {canary})")
    assert call["token"] == TOKEN
    warnings = [l for l in lines(result.stderr) if l.startswith("dynfarm-client: warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "unknown settings: FROBNICATE COLOUR DYNFARM_EXTRA" in warnings[0]


def test_malformed_line_is_warned_and_skipped(world):
    world.settings.write_text(world.settings.read_text() + "this is not a setting\n")
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert any("line 8" in l and "not KEY=value" in l for l in lines(result.stderr))
    assert len(world.client_calls()) == 1


def test_state_dir_defaults_to_var_lib_dynfarm(world):
    world.write_settings(DYNFARM_STATE=None)
    result = world.run()
    assert result.returncode == 0, result.stderr
    [call] = world.client_calls()
    assert call["argv"][call["argv"].index("--state-dir") + 1] == "/var/lib/dynfarm"


def test_dynfarm_py_defaults_to_usr_local_sbin(world):
    """Seen through the fetch it attempts (from a closed port: nothing is written)."""
    if Path("/usr/local/sbin/dynfarm.py").exists():
        pytest.skip("a real /usr/local/sbin/dynfarm.py exists here")
    world.write_settings(DYNFARM_PY=None, DYNFARM_SERVER="https://127.0.0.1:1")
    result = world.run()
    assert result.returncode == 1
    assert "into /usr/local/sbin/dynfarm.py" in result.stderr
    assert not Path("/usr/local/sbin/dynfarm.py").exists()


# --- running the client ---

def test_client_invocation_token_only_in_environment(world):
    result = world.run(DYNFARM_TOKEN="inherited-must-not-win")
    assert result.returncode == 0, result.stderr
    [call] = world.client_calls()
    assert call["argv"] == expected_argv(world)
    assert call["token"] == TOKEN
    assert not any(TOKEN in a for a in call["argv"])
    assert TOKEN not in result.stderr
    assert TOKEN not in world.log.read_text()


def test_client_without_token_or_provider(world):
    world.write_settings(DYNFARM_TOKEN=None, DYNFARM_PROVIDER="")
    result = world.run(DYNFARM_TOKEN="inherited-must-not-leak")
    assert result.returncode == 0, result.stderr
    [call] = world.client_calls()
    assert call["argv"] == expected_argv(world, provider=None)
    assert call["token"] is None


@pytest.mark.parametrize("code", [1, 3])
def test_client_failure_exits_with_its_code_and_names_the_log(world, code):
    result = world.run(FAKE_CLIENT_EXIT=str(code))
    assert result.returncode == code
    [error] = errors(result)
    assert str(world.log) in error
    assert f"exit {code}" in error
    assert not world.lock.exists()


def test_log_gets_every_line_and_the_client_output(world):
    result = world.run(FAKE_CLIENT_EXIT="4")
    assert result.returncode == 4
    log = world.log.read_text()
    said = lines(result.stderr)
    assert said
    logged = [l for l in lines(log) if TIMESTAMPED.match(l)]
    assert [TIMESTAMPED.sub("", l) for l in logged] == \
        [l[len("dynfarm-client: "):] for l in said]
    # the client's own output goes to the log only
    assert "fake client says hello on stdout" in log
    assert "fake client says hello on stderr" in log
    assert "fake client says hello" not in result.stdout + result.stderr
    # and every line went to syslog too, tagged
    syslog = [json.loads(l) for l in world.syslog.read_text().splitlines()]
    assert len(syslog) == len(said)
    assert all(call[:2] == ["-t", "dynfarm-client"] for call in syslog)
    assert any(call[-1].startswith("error: ") and call[3] == "user.err" for call in syslog)


def test_log_is_appended(world):
    assert world.run().returncode == 0
    first = world.log.read_text()
    assert world.run().returncode == 0
    second = world.log.read_text()
    assert second.startswith(first) and len(second) > len(first)


def test_logger_failure_and_absence_are_ignored(world):
    result = world.run(FAKE_LOGGER_EXIT="1")
    assert result.returncode == 0, result.stderr
    (world.bin / "logger").unlink()
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert len(world.client_calls()) == 2


def test_unwritable_log_falls_back_to_stderr(world):
    blocker = world.tmp / "blocker"
    blocker.write_text("a file where the log directory should be\n")
    world.write_settings(DYNFARM_LOG=str(blocker / "dynfarm-client.log"))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "cannot write the log file" in result.stderr
    assert "fake client says hello on stdout" in result.stderr
    assert len(world.client_calls()) == 1


# --- one instance at a time ---

def test_lock_is_held_while_the_client_runs_and_released(world):
    result = world.run()
    assert result.returncode == 0, result.stderr
    [call] = world.client_calls()
    assert call["lock_pid"] == str(call["ppid"])
    assert not world.lock.exists()


def test_lock_held_by_a_live_process_exits_1(world):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        world.lock.mkdir()
        (world.lock / "pid").write_text(f"{holder.pid}\n")
        result = world.run()
        assert result.returncode == 1
        assert len(lines(result.stderr)) == 1, result.stderr
        assert str(holder.pid) in result.stderr
        assert world.client_calls() == []
        # the holder's lock is left alone
        assert (world.lock / "pid").read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(world):
    dead = subprocess.Popen(["true"])
    dead.wait()
    world.lock.mkdir()
    (world.lock / "pid").write_text(f"{dead.pid}\n")
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "stale" in result.stderr
    [call] = world.client_calls()
    assert call["lock_pid"] == str(call["ppid"])
    assert not world.lock.exists()


def test_lock_without_pid_is_taken_over_after_a_wait(world):
    world.lock.mkdir()
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "stale" in result.stderr
    assert len(world.client_calls()) == 1
    assert not world.lock.exists()


# --- python3 and openvpn ---

APT_INSTALL = ["install", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
               "-o", "Dpkg::Options::=--force-confold"]


def test_apt_get_installs_missing_python3_and_openvpn(world):
    (world.bin / "python3").unlink()
    (world.bin / "openvpn").unlink()
    world.add_package_manager("apt-get")
    world.add_package_manager("dnf")  # apt-get comes first
    result = world.run()
    assert result.returncode == 0, result.stderr
    calls = world.pm_calls()
    assert [c["name"] for c in calls] == ["apt-get", "apt-get"]
    assert calls[0]["argv"] == ["update", "-q"]
    assert calls[1]["argv"] == APT_INSTALL + ["python3", "openvpn"]
    assert all(c["DEBIAN_FRONTEND"] == "noninteractive" for c in calls)
    assert len(world.client_calls()) == 1


def test_only_the_missing_package_is_installed(world):
    (world.bin / "openvpn").unlink()
    world.add_package_manager("apt-get")
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert world.pm_calls()[-1]["argv"] == APT_INSTALL + ["openvpn"]


def test_nothing_installed_when_both_are_there(world):
    world.add_package_manager("apt-get")
    assert world.run().returncode == 0
    assert world.pm_calls() == []


@pytest.mark.parametrize("manager, argv", [
    ("dnf", ["install", "-y", "python3", "openvpn"]),
    ("yum", ["install", "-y", "python3", "openvpn"]),
    ("zypper", ["--non-interactive", "install", "python3", "openvpn"]),
    ("apk", ["add", "python3", "openvpn"]),
])
def test_other_package_managers(world, manager, argv):
    (world.bin / "python3").unlink()
    (world.bin / "openvpn").unlink()
    world.add_package_manager(manager)
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert [(c["name"], c["argv"]) for c in world.pm_calls()] == [(manager, argv)]
    assert len(world.client_calls()) == 1


def test_install_failure_exits_1(world):
    (world.bin / "openvpn").unlink()
    world.add_package_manager("apt-get")
    result = world.run(FAKE_PM_EXIT="100")
    assert result.returncode == 1
    [error] = errors(result)
    assert "apt-get" in error
    assert world.client_calls() == []
    assert not world.lock.exists()


def test_no_package_manager_exits_1(world):
    (world.bin / "openvpn").unlink()
    result = world.run()
    assert result.returncode == 1
    [error] = errors(result)
    assert "no package manager" in error
    assert world.client_calls() == []


def test_python_older_than_3_9_exits_1(world):
    result = world.run(FAKE_PYTHON_TOO_OLD="1")
    assert result.returncode == 1
    assert "3.9" in result.stderr
    assert world.client_calls() == []


# --- fetching dynfarm.py ---

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_server_cert(d, name, ca, san):
    (d / f"{name}.ext").write_text(textwrap.dedent(f"""\
        subjectAltName = {san}
        basicConstraints = critical,CA:FALSE
        keyUsage = critical,digitalSignature
        extendedKeyUsage = serverAuth
        subjectKeyIdentifier = hash
        authorityKeyIdentifier = keyid,issuer
        """))
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(abs(hash(name)) % 10**12 + 1), "-days", "2",
            "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "site-ca")
    make_ca(d, "rogue-ca")
    return {
        "ca": d / "site-ca.pem",
        "good": make_server_cert(d, "server", "site-ca", "IP:127.0.0.1"),
        "rogue": make_server_cert(d, "rogue", "rogue-ca", "IP:127.0.0.1"),
        "wrong-name": make_server_cert(d, "elsewhere", "site-ca",
                                       "DNS:elsewhere.example,IP:127.0.0.2"),
    }


CLIENT_BODY = b"#!/usr/bin/env python3\n# dynfarm.py as served\nprint('hi')\n"


class ClientSource(http.server.BaseHTTPRequestHandler):
    """Serves /v1/client the way the enrollment server does (or wrongly, on demand)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        mode = self.server.mode
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/v1/client")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/v1/client":
            self.send_error(404)
            return
        body = CLIENT_BODY
        self.send_response(200)
        self.send_header("Content-Type", "text/x-python")
        self.send_header("Content-Length", str(len(body)))
        if mode == "good":
            self.send_header("X-Dynfarm-Sha256", hashlib.sha256(body).hexdigest())
        elif mode == "wrong-hash":
            self.send_header("X-Dynfarm-Sha256", hashlib.sha256(body + b"x").hexdigest())
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(pki):
    servers = []

    def start(cert="good", mode="good", port=0):
        certfile, keyfile = pki[cert]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), ClientSource)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.mode = mode
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server, f"https://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def fetch_world(world, pki, url, make_dir=False, **settings):
    py = world.tmp / "fresh" / "sbin" / "dynfarm.py"
    if make_dir:
        py.parent.mkdir(parents=True)
    world.write_settings(DYNFARM_SERVER=url, DYNFARM_CA=str(pki["ca"]), DYNFARM_PY=str(py), **settings)
    return py


def test_fetch_writes_dynfarm_py_0755_and_runs_it(world, pki, https_server):
    server, url = https_server()
    py = fetch_world(world, pki, url)
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert server.requests == ["/v1/client"]
    assert py.read_bytes() == CLIENT_BODY
    assert stat.S_IMODE(py.stat().st_mode) == 0o755
    assert sorted(p.name for p in py.parent.iterdir()) == ["dynfarm.py"]
    [call] = world.client_calls()
    assert call["argv"] == expected_argv(world, server=url, py=py, ca=pki["ca"])


def test_present_dynfarm_py_is_not_fetched(world, pki, https_server):
    server, url = https_server()
    world.write_settings(DYNFARM_SERVER=url, DYNFARM_CA=str(pki["ca"]))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert server.requests == []
    assert world.py.read_text() == "# stands for dynfarm.py\n"


@pytest.mark.parametrize("cert, mode, needle", [
    ("good", "wrong-hash", "sha256"),
    ("good", "no-hash", "X-Dynfarm-Sha256"),
    ("good", "redirect", "302"),
    ("rogue", "good", "CERTIFICATE_VERIFY_FAILED"),
    ("wrong-name", "good", "mismatch"),
])
def test_fetch_failure_exits_1_and_writes_nothing(world, pki, https_server, cert, mode, needle):
    server, url = https_server(cert=cert, mode=mode)
    py = fetch_world(world, pki, url, make_dir=True)
    result = world.run()
    assert result.returncode == 1
    [error] = errors(result)
    assert needle in error
    assert list(py.parent.iterdir()) == []  # neither dynfarm.py nor a temporary file
    assert world.client_calls() == []
    assert not world.lock.exists()
    if cert == "good":
        assert server.requests  # it did talk to the server: the failure is the check's


def test_fetch_from_unreachable_server_exits_1(world, pki):
    py = fetch_world(world, pki, "https://127.0.0.1:1", DYNFARM_WAIT="0")
    result = world.run()
    assert result.returncode == 1
    assert "cannot reach https://127.0.0.1:1/v1/client" in result.stderr
    assert "trying again" not in result.stderr
    assert not py.exists()
    assert world.client_calls() == []


def test_fetch_keeps_trying_an_unreachable_server_for_its_wait(world, pki):
    py = fetch_world(world, pki, "https://127.0.0.1:1", DYNFARM_WAIT="3")
    result = world.run()
    assert result.returncode == 1
    assert re.search(r"Connection refused; trying again in [1-3]s", result.stderr)
    assert "cannot fetch dynfarm.py: cannot reach https://127.0.0.1:1/v1/client" in errors(result)[0]
    assert not py.exists()


def test_fetch_tries_again_when_the_server_drops_the_connection(world, pki):
    """As a server at its connection cap does: accepted, then closed at once."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        stop = threading.Event()

        def drop():
            while not stop.is_set():
                try:
                    listener.accept()[0].close()
                except OSError:
                    pass
        dropper = threading.Thread(target=drop)
        dropper.start()
        try:
            py = fetch_world(world, pki, f"https://127.0.0.1:{listener.getsockname()[1]}", DYNFARM_WAIT="2")
            result = world.run()
        finally:
            stop.set()
            dropper.join()
    assert result.returncode == 1
    assert "trying again in" in result.stderr
    assert not py.exists()


def test_fetch_from_a_server_that_never_speaks_ends_with_its_wait(world, pki):
    """Accepted and then left hanging: each try waits no longer than the time
    left, so the boot does not hang for a minute per try."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        py = fetch_world(world, pki, f"https://127.0.0.1:{listener.getsockname()[1]}", DYNFARM_WAIT="3")
        result = world.run(timeout=40)       # a try's own timeout is 60 s
    assert result.returncode == 1
    assert "timed out" in errors(result)[0]
    assert not py.exists()


def test_fetch_waits_for_a_server_that_comes_up(world, pki, https_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    py = fetch_world(world, pki, f"https://127.0.0.1:{port}", DYNFARM_WAIT="60")
    timer = threading.Timer(2.5, https_server, kwargs={"port": port})
    timer.start()
    try:
        result = world.run()
    finally:
        timer.join()
    assert result.returncode == 0, result.stderr
    assert "trying again in" in result.stderr
    assert py.read_bytes() == CLIENT_BODY
    [call] = world.client_calls()
    assert call["argv"] == expected_argv(world, server=f"https://127.0.0.1:{port}", py=py, ca=pki["ca"],
                                         wait="60")


# --- no token left where a job can read it ---

RULE = ["OUTPUT", "-d", "169.254.169.254", "-m", "owner", "!", "--uid-owner", "0", "-j", "REJECT"]


def iptables_calls(w):
    if not w.iptables_record.exists():
        return []
    return [json.loads(line) for line in w.iptables_record.read_text().splitlines()]


def test_once_enrolled_the_token_is_deleted_from_the_settings(world):
    world.settings.write_text(world.settings.read_text() + "# a comment stays\n")
    result = world.run(FAKE_CLIENT_ENROLLS="1")
    assert result.returncode == 0, result.stderr
    assert world.client_calls()[0]["token"] == TOKEN          # it was used for the enrollment ...
    text = world.settings.read_text()
    assert TOKEN not in text and "DYNFARM_TOKEN" not in text    # ... and is gone
    assert "DYNFARM_SERVER=" in text and "# a comment stays" in text
    assert stat.S_IMODE(world.settings.stat().st_mode) == 0o600
    assert "the token is deleted from" in result.stderr
    world.run(FAKE_CLIENT_ENROLLS="1")                          # the next boot: no token, still fine
    assert world.client_calls()[1]["token"] is None


def test_the_token_is_deleted_even_if_a_later_step_failed(world):
    result = world.run(FAKE_CLIENT_ENROLLS="1", FAKE_CLIENT_EXIT="1")
    assert result.returncode == 1
    assert TOKEN not in world.settings.read_text()


def test_a_boot_that_did_not_enroll_keeps_the_token(world):
    result = world.run(FAKE_CLIENT_EXIT="1")
    assert result.returncode == 1
    assert TOKEN in world.settings.read_text()


def test_only_root_may_reach_the_metadata_service(world):
    assert world.run().returncode == 0
    assert iptables_calls(world) == [["-C"] + RULE, ["-I"] + RULE]
    world.run(FAKE_IPTABLES_HAS_RULE="1")                       # a second run adds no second rule
    assert iptables_calls(world)[2:] == [["-C"] + RULE]


def test_the_metadata_service_can_be_left_open(world):
    world.write_settings(DYNFARM_METADATA="open")
    assert world.run().returncode == 0
    assert iptables_calls(world) == []
    world.write_settings(DYNFARM_METADATA="shut")
    result = world.run()
    assert result.returncode == 2 and "DYNFARM_METADATA must be closed or open" in result.stderr


def test_a_metadata_rule_that_cannot_be_made_is_a_warning_not_a_failed_boot(world):
    result = world.run(FAKE_IPTABLES_FAILS="1")
    assert result.returncode == 0
    assert "could not close 169.254.169.254 to non-root processes" in result.stderr
    assert len(world.client_calls()) == 1


def test_iptables_is_installed_when_missing(world):
    (world.bin / "iptables").unlink()
    world.add_package_manager("apt-get")
    assert world.run().returncode == 0
    assert any("iptables" in call["argv"] for call in world.pm_calls())
    assert iptables_calls(world) == [["-C"] + RULE, ["-I"] + RULE]


def test_a_slim_image_gets_openssl_or_one_line_naming_it(world):
    (world.bin / "openssl").unlink()
    result = world.run()
    assert result.returncode == 1
    assert errors(result) == ["dynfarm-client: error: openssl needed and no package manager was found "
                              "(apt-get, dnf, yum, zypper, apk); install them by hand"]
    assert world.client_calls() == []
    world.add_package_manager("apk")
    assert world.run().returncode == 0
    assert any(call["argv"] == ["add", "openssl"] for call in world.pm_calls())
    assert len(world.client_calls()) == 1
