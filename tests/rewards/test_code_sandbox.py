"""The code sandbox against adversarial programs, and the code reward on honest ones.

Each attack program prints the expected "ok" only if its attack succeeded, so without the sandbox
it would earn reward 1: reward 0 shows the sandbox stopped it. The attacks are bounded so that a
broken sandbox still cannot harm this machine: the fork bomb forks at most 64 sleeping children
(killed with the process group), the network attempt targets a listener of this test on 127.0.0.1.
"""

import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_archer.rewards.code_reward import AssertCase, IOCase, code_reward, parse_cases, run_cases
from megatron_archer.rewards.code_sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_seconds=4.0, cpu_seconds=1, memory_bytes=512 << 20, output_bytes=1 << 16)
OK_CASE = [IOCase("", "ok\n")]
SLACK_S = 5.0  # generous scheduling slack on 2 shared cores


def attack(program: str, limits: SandboxLimits = LIMITS) -> tuple:
    start = time.monotonic()
    reward = run_cases(program, OK_CASE, limits)
    return reward, time.monotonic() - start


def test_infinite_busy_loop_is_stopped_by_the_cpu_limit():
    # A wall-clock limit far above the CPU limit, so that RLIMIT_CPU is what stops the loop even
    # when other work leaves the program only a small share of the cores.
    limits = dataclasses.replace(LIMITS, wall_seconds=60.0)
    reward, elapsed = attack("while True:\n    pass\nprint('ok')", limits)
    assert reward.value == 0 and "CPU time limit of 1 s exceeded" in reward.reason, reward
    assert elapsed < limits.wall_seconds


def test_sleeping_loop_is_stopped_by_the_wall_clock_limit():
    reward, elapsed = attack("import time\nwhile True:\n    time.sleep(0.1)\nprint('ok')")
    assert reward.value == 0 and "wall-clock limit of 4 s exceeded" in reward.reason, reward
    assert LIMITS.wall_seconds - 0.5 < elapsed < LIMITS.wall_seconds + SLACK_S


@pytest.mark.parametrize(
    "program, blocked",
    [
        (
            "import os, time\nfor _ in range(64):\n"
            "    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)\nprint('ok')",
            "os.fork is not allowed",
        ),
        ("import subprocess\nsubprocess.run(['true'])\nprint('ok')", "importing subprocess is not allowed"),
        ("import os\nos.system('true')\nprint('ok')", "os.system is not allowed"),
        ("import os\nos.execv('/bin/echo', ['echo', 'ok'])", "os.exec is not allowed"),
        ("import multiprocessing\nprint('ok')", "importing multiprocessing is not allowed"),
        ("import ctypes\nctypes.CDLL(None).fork()\nprint('ok')", "importing ctypes is not allowed"),
        ("import _posixsubprocess\nprint('ok')", "importing _posixsubprocess is not allowed"),
        ("import os\nos.kill(os.getppid(), 0)\nprint('ok')", "os.kill is not allowed"),
    ],
)
def test_fork_bomb_and_new_processes_are_refused(program, blocked):
    reward, elapsed = attack(program)
    assert reward.value == 0 and blocked in reward.reason, reward
    assert elapsed < LIMITS.wall_seconds + SLACK_S


def test_native_extensions_from_outside_the_standard_library_are_refused():
    import numpy

    site = str(Path(numpy.__file__).parents[1])
    reward, _ = attack(f"import sys\nsys.path.insert(0, {site!r})\nimport numpy\nprint('ok')")
    assert reward.value == 0 and "(outside the standard library) is not allowed" in reward.reason, reward


def test_ten_gigabyte_allocation_is_stopped_by_the_address_space_limit():
    reward, elapsed = attack("x = bytearray(10 * 1024**3)\nprint('ok')")
    assert reward.value == 0 and "MemoryError" in reward.reason, reward
    assert elapsed < LIMITS.wall_seconds + SLACK_S
    # The largest child this test process ever waited for stayed far below 10 GiB (ru_maxrss in KiB).
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < (2 << 20)


def test_writing_outside_the_sandbox_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by anyone: only the sandbox can stop the writes
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    program = f"""
import os
attempts = [
    lambda: open({str(outside / "a.txt")!r}, "w").write("x"),
    lambda: os.close(os.open({str(outside / "b.txt")!r}, os.O_CREAT | os.O_WRONLY)),
    lambda: os.mkdir({str(outside / "c")!r}),
    lambda: open("local.txt", "w").write("x") and os.rename("local.txt", {str(outside / "d.txt")!r}),
    lambda: os.symlink({str(outside / "e.txt")!r}, "link") or open("link", "w").write("x"),
    lambda: os.close(os.open("f.txt", os.O_CREAT | os.O_WRONLY, dir_fd=os.open({str(outside)!r}, os.O_RDONLY))),
    lambda: os.remove({str(victim)!r}),
    lambda: open({str(victim)!r}, "a").write("tampered"),
]
done = 0
for attempt in attempts:
    try:
        attempt()
        done += 1
    except OSError as error:
        print(error)
print("ok" if done else "all refused")
"""
    result = run_python(program, "", LIMITS)
    assert result.stdout.strip().splitlines()[-1] == "all refused", result
    refusals = result.stdout.splitlines()[:-1]
    assert len(refusals) == 8 and all(line.startswith("sandbox: ") for line in refusals), result.stdout
    assert sum("outside the sandbox directory" in line for line in refusals) >= 6, result.stdout
    assert list(outside.iterdir()) == []
    assert victim.read_text() == "original"
    reward, _ = attack(program)
    assert reward.value == 0 and "wrong output" in reward.reason


def test_network_is_unreachable_even_on_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        reward, elapsed = attack(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('ok')"
        )
        assert reward.value == 0 and "importing socket is not allowed" in reward.reason, reward
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    assert elapsed < LIMITS.wall_seconds + SLACK_S


@pytest.mark.skipif(not os.path.exists("/proc/self/net/dev"), reason="needs Linux /proc")
def test_kernel_layers_are_in_place():
    """Under the audit hook: a network namespace of its own (only lo, never brought up), rlimits set."""
    probe = """
import resource
interfaces = [line.split(":")[0].strip() for line in open("/proc/self/net/dev").read().splitlines()[2:]]
names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE")
limits = {name: resource.getrlimit(getattr(resource, name))[0] for name in names}
print(interfaces, limits)
"""
    result = run_python(probe, "", LIMITS)
    host_lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    host_interfaces = [line.split(":")[0].strip() for line in host_lines]
    assert result.status == "ok", result
    interfaces, limits = result.stdout.split(" ", 1)
    if os.geteuid() == 0:  # root can always unshare; elsewhere it depends on user namespaces
        assert interfaces == "['lo']" and host_interfaces != ["lo"], (interfaces, host_interfaces)
    assert limits.strip() == str(
        {"RLIMIT_CPU": 1, "RLIMIT_AS": 512 << 20, "RLIMIT_NPROC": 0, "RLIMIT_FSIZE": LIMITS.file_bytes}
    )


def test_parent_environment_secrets_do_not_reach_the_program():
    """A parent started with a secret in its environment; the program tries os.environ and /proc/<ppid>/environ."""
    secret = "archer-test-secret-" + os.urandom(8).hex()
    program = (
        "import os\nprint(dict(os.environ))\n"
        "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\nprint('ok')"
    )
    parent = (
        "import json, sys\n"
        "from megatron_archer.rewards.code_sandbox import SandboxLimits, run_python\n"
        f"r = run_python({program!r}, '', SandboxLimits(wall_seconds=4.0, cpu_seconds=1))\n"
        "print(json.dumps([r.status, r.stdout, r.stderr]))\n"
    )
    env = {**os.environ, "ARCHER_TEST_SECRET": secret}
    out = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status, stdout, stderr = json.loads(out.stdout)
    assert secret not in stdout + stderr
    assert status == "error" and "(another process) is not allowed" in stderr, stderr
    assert "'HOME'" in stdout and "ARCHER_TEST_SECRET" not in stdout  # it did print its (empty) environment
    assert "ok" not in stdout.splitlines()


GIGABYTE = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\nprint('ok')"


def test_printing_a_gigabyte_is_cut_at_the_output_cap():
    start = time.monotonic()
    result = run_python(GIGABYTE, "", LIMITS)
    elapsed = time.monotonic() - start
    assert result.status == "output_limit", result.describe()
    assert len(result.stdout) + len(result.stderr) <= LIMITS.output_bytes
    assert elapsed < LIMITS.wall_seconds + SLACK_S
    reward, _ = attack(GIGABYTE)
    assert reward.value == 0 and "output limit of 65536 bytes exceeded" in reward.reason


def test_sandbox_directories_are_removed():
    before = set(Path(tempfile.gettempdir()).glob("archer-sandbox-*"))
    program = "open('scratch.txt', 'w').write('x' * 1000)\nprint(open('scratch.txt').read()[:2])"
    result = run_python(program, "", LIMITS)
    assert result.status == "ok" and result.stdout == "xx\n", result
    assert set(Path(tempfile.gettempdir()).glob("archer-sandbox-*")) == before


def test_honest_programs_score_the_fraction_of_cases_passed():
    response = "Here you go:\n```python\nn = int(input())\nprint(n * n if n != 3 else 0)\n```\n"
    tests = {"inputs": ["2\n", "3\n", "4\n"], "outputs": ["4\n", "9\n", "16  \n\n"]}
    reward = code_reward(response, tests, LIMITS)
    assert reward.value == pytest.approx(2 / 3) and reward.reason == "2/3 cases passed; case 2: wrong output"
    assert code_reward(response, json.dumps(tests), LIMITS).value == pytest.approx(2 / 3)


def test_assert_cases_need_the_test_code_to_finish():
    program = "def add(a, b):\n    return a + b\n"
    cases = [AssertCase("assert add(1, 2) == 3"), AssertCase("assert add(2, 2) == 5")]
    reward = run_cases(program, cases, LIMITS)
    assert reward.value == 0.5 and "case 2: exited with code 1: AssertionError" in reward.reason
    cheat = program + "import sys\nsys.exit(0)\n"
    reward = run_cases(cheat, cases[:1], LIMITS)
    assert reward.value == 0 and "exited before the test code finished" in reward.reason


def test_responses_and_test_specs_are_checked():
    no_code = code_reward("no code here", {"asserts": ["assert True"]}, LIMITS)
    assert no_code.reason == "no fenced code block in the response"
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_cases({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_cases({"input": ["1"]})
    with pytest.raises(TypeError, match="IOCase or AssertCase"):
        parse_cases(["print(1)"])
    with pytest.raises(ValueError, match="no test cases"):
        run_cases("print(1)", [], LIMITS)
    with pytest.raises(ValueError, match="wall_seconds must be positive"):
        SandboxLimits(wall_seconds=0)
