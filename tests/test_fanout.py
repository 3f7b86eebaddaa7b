"""remote_control's machinery without ssh: the fan-out runs local commands.

FanOut only starts argv lists, so `sh -c` stands in for ssh here; what is
checked is the bounded parallelism, streaming, timeouts and the verdicts.
"""

import shutil
import tempfile
import time

import pytest

import dynfarm


def jobs_for(scripts):
    return [dynfarm.Job(host, ["sh", "-c", script]) for host, script in scripts.items()]


def test_lines_stream_with_their_host_and_stream():
    seen = []
    jobs = jobs_for({"a-1": "echo one; echo two >&2; printf tail", "a-2": "echo three"})
    dynfarm.FanOut(jobs, 4, 0, on_line=lambda h, s, t: seen.append((h, s, t))).run()
    assert sorted(seen) == [("a-1", "err", "two"), ("a-1", "out", "one"), ("a-1", "out", "tail"),
                            ("a-2", "out", "three")]
    assert [j.status for j in jobs] == ["ok", "ok"]


def test_fanout_bounds_how_many_run_at_once(tmp_path):
    """Each job records the others running beside it; never more than the fan-out."""
    counter = tmp_path / "running"
    counter.mkdir()
    script = (f"touch {counter}/$$; ls {counter} | wc -l >> {tmp_path}/seen; sleep 0.3; rm {counter}/$$")
    dynfarm.FanOut(jobs_for({f"h-{i}": script for i in range(9)}), 3, 0).run()
    seen = [int(x) for x in (tmp_path / "seen").read_text().split()]
    assert len(seen) == 9 and max(seen) <= 3 and max(seen) >= 2


def test_exit_codes_become_verdicts():
    jobs = jobs_for({"ok": "true", "bad": "exit 3", "gone": "echo 'ssh: connect to host x: No route' >&2; exit 255",
                     "key": "echo 'Host key verification failed.' >&2; exit 255"})
    dynfarm.FanOut(jobs, 8, 0).run()
    assert {j.host: (j.status, j.rc) for j in jobs} == {
        "ok": ("ok", 0), "bad": ("failed", 3), "gone": ("unreachable", 255), "key": ("hostkey", 255)}
    assert dynfarm.summary_line(jobs) == "1 ok, 1 failed, 1 unreachable, 0 timed out, 1 host key refused"


def test_a_host_that_did_not_succeed_gets_its_status_word_and_why():
    jobs = jobs_for({"bad": "exit 3", "gone": "echo 'ssh: connect to host x: No route' >&2; exit 255",
                     "key": "echo 'Host key verification failed.' >&2; exit 255", "slow": "sleep 5"})
    dynfarm.FanOut(jobs, 8, 0.5).run()
    assert [dynfarm.host_verdict(j) for j in jobs] == [
        "bad: failed (exit 3)", "gone: unreachable (ssh: connect to host x: No route)",
        "key: host key refused (Host key verification failed.)", "slow: timed out (killed)"]


def test_a_job_past_its_timeout_is_killed_with_its_children():
    started = time.monotonic()
    jobs = jobs_for({"slow": "sleep 30 & sleep 30; echo never", "fast": "echo quick"})
    dynfarm.FanOut(jobs, 2, 0.5).run()
    assert time.monotonic() - started < 5
    assert {j.host: j.status for j in jobs} == {"slow": "timeout", "fast": "ok"}
    assert b"never" not in jobs[0].out


def test_output_kept_for_gathering_is_bounded():
    jobs = jobs_for({"big": "head -c 3000000 /dev/zero"})
    dynfarm.FanOut(jobs, 1, 0).run()
    assert len(jobs[0].out) == dynfarm.FanOut.KEEP and jobs[0].status == "ok"


def test_a_command_that_cannot_start_is_a_failure():
    jobs = [dynfarm.Job("x", ["/nonexistent/ssh"])]
    dynfarm.FanOut(jobs, 1, 0).run()
    assert jobs[0].status == "failed" and b"No such file" in jobs[0].err
    assert dynfarm.host_verdict(jobs[0]) == "x: failed (/nonexistent/ssh: No such file or directory)"


def test_verbose_echoes_each_command_it_starts(monkeypatch, capsys):
    monkeypatch.setattr(dynfarm, "ECHO_COMMANDS", True)
    dynfarm.FanOut(jobs_for({"a-1": "true"}), 1, 0).run()
    assert "dynfarm: [#] sh -c true\n" in capsys.readouterr().err


def test_summary_always_names_the_four_main_verdicts():
    assert dynfarm.summary_line([]) == "0 ok, 0 failed, 0 unreachable, 0 timed out"


def test_ssh_options_never_prompt_nor_trust_on_first_use(site, monkeypatch, request):
    config, _, _ = site
    short = tempfile.mkdtemp(prefix="dfcm")            # --reuse makes its socket dir here, not in /tmp
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", short)
    options = dynfarm.ssh_options(config, dynfarm.Reach(connect_timeout=3.0), "/tmp/kh")
    pairs = {options[i + 1] for i, o in enumerate(options) if o == "-o"}
    for wanted in ("BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/tmp/kh",
                   "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=3"):
        assert wanted in pairs
    assert not any(p.startswith("ControlMaster") for p in pairs)
    reuse = dynfarm.ssh_options(config, dynfarm.Reach(connect_timeout=3.0, reuse=True), "/tmp/kh")
    assert "ControlMaster=auto" in reuse and "ControlPersist=600" in reuse
    path = next(o for o in reuse if o.startswith("ControlPath="))
    assert len(path) - len("ControlPath=%C") + 40 + 20 < 108          # fits a unix socket name


@pytest.mark.parametrize("stamp, text", [(None, "-"), (100, "40s ago"), (0, "2m ago")])
def test_ago(stamp, text):
    assert dynfarm.ago(stamp, now=140) == text


def test_a_child_that_closes_its_output_and_lingers_still_meets_its_timeout():
    started = time.monotonic()
    jobs = jobs_for({"lingers": "exec >&- 2>&-; sleep 5", "quick": "sleep 0.2; echo hi"})
    dynfarm.FanOut(jobs, 2, 1.0).run()
    assert {j.host: j.status for j in jobs} == {"lingers": "timeout", "quick": "ok"}
    assert time.monotonic() - started < 4
