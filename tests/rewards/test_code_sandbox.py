"""The bwrap code sandbox: the attack suite, the kernel layers, attribution, cleanup, refusal;
the in_process opt-in; the code reward on honest programs. The sandbox tests run twice (the
`launcher` fixture): on the warm pool (the default) and with bwrap launched per program.

The attack suite runs in a separate caller process (as this test's user: root in CI) that holds a
secret in its environment and scores every program of `attack_programs` in parallel; each must
score 0 within its limit with the expected reason, the caller must survive and never see its
secret in any output, and afterwards no file, process, SysV segment or network contact of the
attacks may be left.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_archer.rewards import bwrap, cgroups, code_sandbox
from megatron_archer.rewards.code_reward import (
    AssertCase,
    IOCase,
    code_reward,
    parse_cases,
    run_cases,
)
from megatron_archer.rewards.code_sandbox import (
    CPU_LIMIT,
    MEMORY_LIMIT,
    SIGNALED,
    SandboxLimits,
    SandboxUnavailable,
    configure_sandbox,
    run_python,
)
from tests.rewards import attack_programs

LIMITS = SandboxLimits(wall_seconds=4.0, cpu_seconds=1, memory_bytes=256 << 20, output_bytes=1 << 16,
                       workdir_bytes=32 << 20)
SLACK_S = 6.0  # generous scheduling slack on 2 shared cores


needs_bwrap = pytest.mark.usefixtures("sandbox_setup")  # tests/rewards/conftest.py
both_launchers = pytest.mark.usefixtures("launcher")  # once on the warm pool, once per-run bwrap


CALLER = """
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from megatron_archer.rewards.code_reward import IOCase, run_cases
from megatron_archer.rewards.code_sandbox import SandboxLimits, configure_sandbox
from tests.rewards import attack_programs

params, limits = json.loads(sys.argv[1]), SandboxLimits(**json.loads(sys.argv[2]))
params["CALLER_PID"] = os.getpid()
configure_sandbox(sys.argv[3], workers=4)
def score(item):
    name, (program, _) = item
    start = time.monotonic()
    reward = run_cases(program, [IOCase("", "ok\\n")], limits)
    return name, reward.value, reward.reason, time.monotonic() - start
with ThreadPoolExecutor(8) as pool:
    print(json.dumps(list(pool.map(score, attack_programs.programs(**params).items()))))
"""


def test_attack_suite_scores_zero_and_leaves_nothing(tmp_path, launcher):
    secret = "ARCHER_TEST_SECRET_" + uuid.uuid4().hex
    mark = f"{37 + int(uuid.uuid4().int % 1000) / 1000:.3f}"  # a unique `sleep` duration and file name
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    secret_file.chmod(0o644)
    tmp_path.chmod(0o755)
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        params = {"MARK": mark, "PORT": tcp.getsockname()[1], "UDP_PORT": udp.getsockname()[1],
                  "OUTSIDE": str(outside), "SECRET_FILE": str(secret_file), "SHM_KEY": 0x5A5A0000 + os.getpid() % 4096}
        caller = subprocess.Popen(
            [sys.executable, "-c", CALLER, json.dumps(params), json.dumps(dataclasses.asdict(LIMITS)), launcher],
            env={**os.environ, "ARCHER_TEST_SECRET": secret}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=Path(__file__).parents[2],
        )
        out, err = caller.communicate(timeout=240)
        assert caller.returncode == 0, err[-3000:]  # the caller survived every attack
        tcp.settimeout(0.2)
        with pytest.raises(socket.timeout):
            tcp.accept()  # nothing ever connected
        udp.settimeout(0.2)
        with pytest.raises(socket.timeout):
            udp.recvfrom(100)  # nothing was ever sent
    results = {name: (value, reason, elapsed) for name, value, reason, elapsed in json.loads(out)}
    expected = attack_programs.ATTACKS
    assert set(results) == set(expected)
    failures = []
    for name, (value, reason, elapsed) in results.items():
        limit = LIMITS.wall_seconds + SLACK_S
        reasons = expected[name][1] if isinstance(expected[name][1], tuple) else (expected[name][1],)
        if value != 0 or not any(r in reason for r in reasons) or elapsed > limit:
            failures.append((name, value, reason, round(elapsed, 2)))
    assert not failures, "\n".join(map(str, failures))
    assert secret not in out + err
    assert list(outside.iterdir()) == []
    leftovers = [p for d in ("/tmp", "/dev/shm") for p in Path(d).iterdir() if mark in p.name]
    assert leftovers == [] and not list(Path("/tmp").glob("archer-sandbox-*"))
    assert str(params["SHM_KEY"]) not in Path("/proc/sysvipc/shm").read_text().split()
    assert _processes_mentioning(mark) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@both_launchers
def test_the_kernel_layers_are_in_place():
    """Every namespace differs from the caller's, no capabilities, no new privileges, the user
    is 65534 to the kernel when the caller is root, rlimits set, a minimal view and environment."""
    probe = """
import os, resource
ns = {n: os.readlink(f'/proc/self/ns/{n}') for n in ('user', 'pid', 'net', 'ipc', 'uts', 'mnt', 'cgroup')}
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
names = ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE')
print(repr({'ns': ns, 'caps': [status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')],
            'nnp': status['NoNewPrivs'].strip(),
            'limits': {n: resource.getrlimit(getattr(resource, n)) for n in names}, 'env': dict(os.environ),
            'init_env': open('/proc/1/environ').read(), 'root': sorted(os.listdir('/')), 'cwd': os.getcwd(),
            'interfaces': [l.split(':')[0].strip() for l in open('/proc/self/net/dev').read().splitlines()[2:]],
            'pids': sorted(p for p in os.listdir('/proc') if p.isdigit())}))
"""
    result = run_python(probe, "", LIMITS)
    assert result.status == "ok", result
    seen = eval(result.stdout)  # our own probe's repr
    for name, inode in seen["ns"].items():
        assert inode != os.readlink(f"/proc/self/ns/{name}"), name
    assert seen["caps"] == ["0000000000000000"] * 5
    assert seen["nnp"] == "1"
    assert seen["limits"]["RLIMIT_NPROC"] == (0, 0) and seen["limits"]["RLIMIT_CORE"] == (0, 0)
    assert seen["limits"]["RLIMIT_CPU"] == (1, 2) and seen["limits"]["RLIMIT_AS"] == (256 << 20, 256 << 20)
    assert seen["env"] == {**bwrap.SANDBOX_ENV, "PWD": "/tmp"}
    assert "ARCHER" not in seen["init_env"] and seen["pids"] == ["1"]  # the program is alone, as pid 1
    assert set(seen["root"]) <= {"usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin", "etc", "root",
                                 "opt", "home", "dev", "proc", "tmp"}, seen["root"]
    assert seen["cwd"] == "/tmp" and seen["interfaces"] == ["lo"]


@both_launchers
def test_the_program_runs_as_an_unprivileged_user_seen_from_the_host():
    """Seen from here (not from inside, where bwrap's nested user namespaces renumber ids): the
    sandbox's process has real uid 65534 when the caller is root (the caller's uid otherwise),
    the condition for the kernel to apply RLIMIT_NPROC."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run_python, "pass", "", LIMITS).result()  # a pool server's first run is its probe
        run = pool.submit(run_python, "import time\ntime.sleep(3)", "", LIMITS)
        deadline = time.monotonic() + 20
        inits = []
        while not inits and time.monotonic() < deadline:
            inits = code_sandbox._namespace_inits(os.getpid())
            time.sleep(0.05)
        assert inits, "the sandboxed program never appeared"
        status = dict(line.split(":", 1) for line in Path(f"/proc/{inits[0]}/status").read_text().splitlines())
        expected = bwrap.NOBODY if os.geteuid() == 0 else os.geteuid()
        assert status["Uid"].split() == [str(expected)] * 4 and status["Gid"].split()[0] != "0"
        assert status["Groups"].strip() == ""
        assert run.result().status == "ok"


@both_launchers
def test_only_tmp_and_dev_shm_are_writable_and_sized():
    program = """
import os
for path in ['/x', '/usr/x', '/dev/x', '/proc/x', '/etc/x']:
    try:
        open(path, 'w').write('x')
        print('wrote', path)
    except OSError as error:
        print('refused', path, error.errno)
for path in ['/tmp/a', '/dev/shm/a']:
    open(path, 'w').write('x')
try:
    for i in range(100):
        open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))
except OSError as error:
    print('full after', i, 'MiB', error.errno)
"""
    result = run_python(program, "", dataclasses.replace(LIMITS, workdir_bytes=8 << 20))
    assert result.status == "ok", result
    assert "wrote" not in result.stdout
    full = [line for line in result.stdout.splitlines() if line.startswith("full after")]
    assert full and int(full[0].split()[2]) <= 8 and full[0].endswith(" 28"), result.stdout  # ENOSPC


@both_launchers
def test_nothing_is_written_to_the_hosts_tmp_or_dev_shm():
    name = "archer-leftover-" + uuid.uuid4().hex
    before = {d: set(os.listdir(d)) for d in ("/tmp", "/dev/shm")}
    result = run_python(f"open('/tmp/{name}', 'w').write('x')\nopen('/dev/shm/{name}', 'w').write('x')\n"
                        "print(open('/dev/stdin').read())", "from stdin", LIMITS)
    assert result.status == "ok" and result.stdout == "from stdin\n", result
    for directory, names in before.items():
        assert not [n for n in set(os.listdir(directory)) - names if name in n or n.startswith("archer-")]


@both_launchers
def test_stdin_cannot_be_written_by_the_program():
    result = run_python("import os\ntry:\n    os.write(0, b'x')\nexcept OSError as e:\n    print(e.errno)\n"
                        "print(input())", "line\n", LIMITS)
    assert result.stdout == "9\nline\n", result  # EBADF: stdin is opened read-only


@both_launchers
def test_cpu_limit_is_attributed_even_when_the_program_handles_sigxcpu():
    handled = "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True:\n    pass\n"
    result = run_python(handled, "", dataclasses.replace(LIMITS, wall_seconds=60.0))
    # past the soft limit to the hard one (precise time, which trails the kernel's tick-sampled
    # time under load: code_sandbox.CPU_LIMIT_SHARE)
    assert result.status == CPU_LIMIT and result.signal == 9 and result.cpu_seconds > 1.0, result
    plain = run_python("while True:\n    pass\n", "", dataclasses.replace(LIMITS, wall_seconds=60.0))
    assert plain.status == CPU_LIMIT and plain.describe() == "CPU time limit of 1 s exceeded", plain


@both_launchers
def test_a_self_inflicted_kill_is_not_a_cpu_limit():
    result = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\nprint('after')", "", LIMITS)
    assert result.status == SIGNALED and result.describe() == "killed by SIGXCPU", result


@both_launchers
def test_the_memory_cgroup_kill_is_attributed_to_memory():
    layout, why = cgroups.machine_layout()
    if layout is None:
        pytest.skip(f"no per-run cgroup on this machine: {why}")
    # tmpfs pages count against the run's memory cgroup but not its address space: the OOM killer ends it.
    limits = dataclasses.replace(LIMITS, memory_bytes=96 << 20, workdir_bytes=512 << 20, wall_seconds=30.0)
    program = "for i in range(64):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (8 << 20))\nprint('ok')"
    result = run_python(program, "", limits)
    assert result.status == MEMORY_LIMIT, result
    assert result.describe() == "memory limit of 100663296 bytes exceeded (killed by the OOM killer)"


def test_attribution_rules():
    def status(signum, cpu, oom, returncode=137, limit=SandboxLimits(cpu_seconds=2)):
        return code_sandbox._result(None, returncode, signum, cpu, oom, b"", b"", 0.1, limit).status

    assert status(9, 0.1, oom=True) == MEMORY_LIMIT  # the OOM killer's SIGKILL
    assert status(9, 0.1, oom=False) == SIGNALED  # a SIGKILL below the CPU limit is not cpu_limit
    assert status(9, 3.0, oom=False) == CPU_LIMIT  # RLIMIT_CPU's hard limit
    assert status(24, 1.95, oom=False, returncode=152) == CPU_LIMIT  # its soft limit
    assert status(24, 1.62, oom=False, returncode=152) == CPU_LIMIT  # precise time trailing tick-sampled
    assert status(24, 0.2, oom=False, returncode=152) == SIGNALED
    assert status(9, 3.0, oom=True) == MEMORY_LIMIT
    assert status(None, 0.0, oom=False, returncode=0) == "ok"
    assert status(None, 0.0, oom=False, returncode=3) == "error"


def test_refusal_when_bubblewrap_is_missing(tmp_path):
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap.*reward.sandbox: in_process"):
        bwrap.require(str(tmp_path))


def test_refusal_when_namespaces_cannot_be_created(tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    (tmp_path / "setpriv").symlink_to("/usr/bin/setpriv")
    with pytest.raises(SandboxUnavailable) as error:
        bwrap.require(str(tmp_path))
    message = str(error.value)
    assert "No permissions to creating new namespace" in message
    assert "kernel.unprivileged_userns_clone=1" in message and "reward.sandbox: in_process" in message


def test_in_process_opt_in_warns_and_still_runs(monkeypatch):
    monkeypatch.setattr(code_sandbox._settings, "warned", False)
    with pytest.warns(RuntimeWarning, match="not a security boundary"):
        result = run_python("print(input())", "hi", LIMITS, sandbox="in_process")
    assert result.status == "ok" and result.stdout == "hi\n"
    blocked = run_python("import os\nos.fork()\nprint('ok')", "", LIMITS, sandbox="in_process")
    assert blocked.status == "error" and "os.fork is not allowed" in blocked.stderr


def test_configure_sandbox_validates():
    with pytest.raises(ValueError, match="sandbox must be one of bwrap, bwrap_per_run, in_process; got 'docker'"):
        configure_sandbox("docker")
    with pytest.raises(ValueError, match="workers must be an integer >= 1; got 0"):
        configure_sandbox("bwrap", workers=0)
    with pytest.raises(ValueError, match="sandbox must be one of"):
        run_python("print(1)", "", LIMITS, sandbox="nope")


@needs_bwrap
def test_honest_programs_score_the_fraction_of_cases_passed():
    response = "Here you go:\n```python\nn = int(input())\nprint(n * n if n != 3 else 0)\n```\n"
    tests = {"inputs": ["2\n", "3\n", "4\n"], "outputs": ["4\n", "9\n", "16  \n\n"]}
    reward = code_reward(response, tests, LIMITS)
    assert reward.value == pytest.approx(2 / 3) and reward.reason == "2/3 cases passed; case 2: wrong output"
    assert code_reward(response, json.dumps(tests), LIMITS).value == pytest.approx(2 / 3)


@needs_bwrap
def test_assert_cases_need_the_test_code_to_finish():
    program = "def add(a, b):\n    return a + b\n"
    cases = [AssertCase("assert add(1, 2) == 3"), AssertCase("assert add(2, 2) == 5")]
    reward = run_cases(program, cases, LIMITS)
    assert reward.value == 0.5 and "case 2: exited with code 1: AssertionError" in reward.reason
    cheat = program + "import sys\nsys.exit(0)\n"
    reward = run_cases(cheat, cases[:1], LIMITS)
    assert reward.value == 0 and "exited before the test code finished" in reward.reason


def test_cases_run_in_parallel_on_the_pool(launcher):
    """Four cases on a pool of two: two sandboxes at a time, never more (sampled from /proc)."""
    configure_sandbox(launcher, workers=2)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_cases, "import time\ntime.sleep(1.5)\nprint('ok')", [IOCase("", "ok\n")] * 4, LIMITS)
        most = 0
        while not run.done():
            inits = code_sandbox._namespace_inits(os.getpid())
            most = max(most, len(inits))
            time.sleep(0.05)
        assert run.result().value == 1.0
    assert most == 2


def test_responses_and_test_specs_are_checked():
    no_code = code_reward("no code here", {"asserts": ["assert True"], "trusted": True}, LIMITS)
    assert no_code.reason == "no fenced code block in the response"
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_cases({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_cases({"input": ["1"]})
    with pytest.raises(TypeError, match="IOCase, FunctionCase or AssertCase"):
        parse_cases(["print(1)"])
    with pytest.raises(ValueError, match="no test cases"):
        run_cases("print(1)", [], LIMITS)
    with pytest.raises(ValueError, match="wall_seconds must be positive"):
        SandboxLimits(wall_seconds=0)


def test_reward_sandbox_config_is_validated_and_reaches_the_sandbox(monkeypatch):
    from megatron_archer.config_fields import from_dict
    from megatron_archer.trainer.config import RewardConfig
    from megatron_archer.trainer.reward_scoring import RewardScorer

    with pytest.raises(ValueError, match="reward.sandbox must be one of bwrap, bwrap_per_run, in_process; got 'dock"):
        from_dict(RewardConfig, {"sandbox": "docker"}, "reward.")
    monkeypatch.setattr(code_sandbox._settings, "warned", False)
    monkeypatch.setattr(code_sandbox._settings, "sandbox", "bwrap")
    with pytest.warns(RuntimeWarning, match="not a security boundary"):
        RewardScorer(RewardConfig(function="code", sandbox="in_process"), tokenizer=None)
    assert code_sandbox._settings.sandbox == "in_process"
    RewardScorer(RewardConfig(function="code"), tokenizer=None)
    assert code_sandbox._settings.sandbox == "bwrap"
    # with the code reward configured, a machine without bubblewrap fails at start, not mid-run
    monkeypatch.setenv("PATH", "/nonexistent")
    bwrap.require.cache_clear()  # the probe is cached per process
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            RewardScorer(RewardConfig(function="math", by_data_source={"apps": "code"}), tokenizer=None)
    finally:
        bwrap.require.cache_clear()
    RewardScorer(RewardConfig(function="math"), tokenizer=None)  # math only: no sandbox needed


def test_in_process_cleanup_survives_a_very_deep_tree(monkeypatch):
    """1200 levels: deeper than shutil.rmtree's recursion (RecursionError in Python 3.11)."""
    monkeypatch.setattr(code_sandbox._settings, "warned", True)
    before = set(Path("/tmp").glob("archer-sandbox-*"))
    deep = ("import os\nfor _ in range(1200):\n    os.mkdir('d')\n    os.chdir('d')\n"
            "open('f', 'w').write('x')\nprint('built')")
    result = run_python(deep, "", dataclasses.replace(LIMITS, wall_seconds=30.0, cpu_seconds=20), sandbox="in_process")
    assert result.status == "ok" and result.stdout == "built\n", result
    assert set(Path("/tmp").glob("archer-sandbox-*")) == before
