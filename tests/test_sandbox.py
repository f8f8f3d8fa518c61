"""The code sandbox: escape attempts that must fail (checked by their side effects), and normal use.

Each run starts one short-lived interpreter (about 50 ms) with limits of 1-3 s, so the module runs in a
few seconds. Layers the kernel here does not offer are skipped in the layer-specific tests.
"""

from __future__ import annotations

import signal
import socket
import uuid
from pathlib import Path

import pytest

from cso_lib.errors import SandboxError, ToolError
from cso_lib.sandbox import (
    PYTHON_TOOL_SPEC,
    SandboxLimits,
    SandboxResult,
    available_layers,
    execute_action,
    extract_code_actions,
    python_tool,
    run_code,
)

FAST = SandboxLimits(cpu_s=1, wall_s=3, memory_mb=256, max_output_bytes=10_000)
REPO = Path(__file__).resolve().parents[1]


def run(code: str, limits: SandboxLimits = FAST) -> SandboxResult:
    return run_code(code, limits)


def out(r: SandboxResult) -> str:
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    return available_layers()


@pytest.fixture
def outside() -> Path:
    """A path outside any sandbox scratch dir that must not exist after an escape attempt."""
    p = Path("/tmp") / f"cso-escape-{uuid.uuid4().hex}"
    yield p
    if p.exists():
        p.unlink()


# ------------------------------------------------------------------------------------- escape attempts


def test_network_connect_to_loopback_server_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        r = run(
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'ESCAPED'); print('connected')"
        )
        with pytest.raises(TimeoutError):
            conn, _ = server.accept()
            conn.close()
    finally:
        server.close()
    assert "connected" not in r.stdout and r.exit_code != 0


def test_dns_and_http_fail():
    r = run(
        "import socket, urllib.request\n"
        "for f in (lambda: socket.getaddrinfo('localhost', 80), lambda: socket.gethostbyname('example.com'),\n"
        "          lambda: urllib.request.urlopen('http://127.0.0.1:9/', timeout=1)):\n"
        "    try:\n"
        "        print('RESOLVED', f())\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    assert "RESOLVED" not in r.stdout and r.stdout.count("blocked") == 3, out(r)


def test_read_etc_passwd_fails():
    r = run(
        "for p in ('/etc/passwd', '/etc/shadow', '/etc/hostname'):\n"
        "    try:\n"
        "        print(open(p).read())\n"
        "    except OSError as e:\n"
        "        print('blocked', p)\n"
        "import os\n"
        "try:\n"
        "    print(os.listdir('/etc'))\n"
        "except OSError:\n"
        "    print('blocked listdir')\n"
    )
    assert "root:x:" not in out(r) and "passwd" not in r.stdout.replace("blocked /etc/passwd", "")
    assert r.stdout.count("blocked") == 4, out(r)


def test_read_home_repo_and_other_files_fails(tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    (tmp_path / "notes.txt").write_text(secret)
    home = Path.home()
    r = run(
        "import os, pathlib\n"
        f"for p in ({str(tmp_path / 'notes.txt')!r}, {str(REPO / 'pyproject.toml')!r}, {__file__!r}):\n"
        "    try:\n"
        "        print(pathlib.Path(p).read_text())\n"
        "    except OSError:\n"
        "        print('blocked')\n"
        f"for d in ({str(home)!r}, {str(REPO)!r}, {str(tmp_path)!r}, '/'):\n"
        "    try:\n"
        "        print(os.listdir(d))\n"
        "    except OSError:\n"
        "        print('blocked')\n"
    )
    assert secret not in out(r) and "[project]" not in out(r) and "notes.txt" not in out(r)
    assert r.stdout.count("blocked") == 7, out(r)


def test_write_outside_scratch_fails(outside):
    name = outside.name
    r = run(
        "import os\n"
        f"for p in ({str(outside)!r}, '../{name}', '/tmp/../tmp/{name}'):\n"
        "    try:\n"
        "        open(p, 'w').write('pwned'); print('WROTE', p)\n"
        "    except OSError:\n"
        "        print('blocked')\n"
        "try:\n"
        f"    os.close(os.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)); print('WROTE os.open')\n"
        "except OSError:\n"
        "    print('blocked')\n"
    )
    assert not outside.exists() and "WROTE" not in r.stdout and r.stdout.count("blocked") == 4, out(r)


def test_fork_bomb_fails():
    r = run(
        "import os\n"
        "n = 0\n"
        "for _ in range(10000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print('forked', n)\n"
    )
    assert "forked 0" in r.stdout and not r.timed_out, out(r)


def test_memory_bomb_is_stopped():
    r = run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n")
    assert r.killed_by == "memory" and r.exit_code != 0 and "MemoryError" in r.stderr


def test_infinite_loop_hits_cpu_limit():
    # A wall limit far above the CPU limit, so that on a loaded machine (1 s of CPU can take several seconds of
    # wall time) it is still the CPU limit that stops the loop.
    limits = SandboxLimits(cpu_s=1, wall_s=30, memory_mb=256, max_output_bytes=10_000)
    r = run("while True:\n    pass\n", limits)
    assert r.killed_by == "cpu" and r.timed_out and r.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)
    assert r.duration_s < limits.wall_s


def test_sleep_hits_wall_limit():
    r = run("import time\nprint('start', flush=True)\ntime.sleep(60)\nprint('end')\n",
            SandboxLimits(cpu_s=1, wall_s=1))
    assert r.killed_by == "wall" and r.timed_out and r.stdout == "start\n"
    assert 1 <= r.duration_s < 2.5


def test_output_flood_is_cut():
    r = run("while True:\n    print('x' * 1000)\n")
    assert r.killed_by == "output" and r.stdout_truncated and len(r.stdout) <= FAST.max_output_bytes


def test_secret_environment_variables_never_reach_the_code(monkeypatch):
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    r = run(
        "import os\n"
        "print(dict(os.environ))\n"
        "print(os.environ.get('OPENAI_API_KEY'), os.getenv('ANTHROPIC_API_KEY'))\n"
        "for p in ('/proc/self/environ', f'/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
        "    try:\n"
        "        print(open(p, 'rb').read())\n"
        "    except OSError:\n"
        "        print('blocked')\n"
    )
    assert r.exit_code == 0, out(r)
    assert secret not in out(r) and "API_KEY" not in out(r) and r.stdout.count("blocked") == 3


def test_subprocess_and_os_system_fail(outside):
    r = run(
        "import os, subprocess\n"
        "attempts = [\n"
        f"    lambda: subprocess.run(['sh', '-c', 'echo pwned > {outside}']),\n"
        f"    lambda: os.system('echo pwned > {outside}'),\n"
        f"    lambda: os.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned > {outside}'], {{}}),\n"
        f"    lambda: os.execv('/bin/sh', ['sh', '-c', 'echo pwned > {outside}']),\n"
        f"    lambda: os.popen('echo pwned > {outside}').read(),\n"
        "]\n"
        "for f in attempts:\n"
        "    try:\n"
        "        print('RAN', f())\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    assert not outside.exists() and "RAN" not in r.stdout and r.stdout.count("blocked") == 5, out(r)


def test_ctypes_and_cffi_fail(outside):
    r = run(
        "for attempt in ('import ctypes', 'import _ctypes', 'import cffi', \"__import__('ctypes')\",\n"
        "                \"import importlib; importlib.import_module('ctypes.util')\"):\n"
        "    try:\n"
        "        exec(attempt)\n"
        f"        print('LOADED', ctypes.CDLL(None).system(b'touch {outside}'))\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    assert not outside.exists() and "LOADED" not in r.stdout and r.stdout.count("blocked") == 5, out(r)


def test_imports_from_outside_allowed_paths_fail(tmp_path):
    secret = f"module-secret-{uuid.uuid4().hex}"
    (tmp_path / "evilmod.py").write_text(f"print({secret!r})\n")
    r = run(
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "attempts = [\n"
        "    lambda: __import__('evilmod'),\n"
        "    lambda: importlib.import_module('cso_lib.errors'),\n"
        f"    lambda: importlib.util.spec_from_file_location('m', {str(tmp_path / 'evilmod.py')!r})\n"
        "        .loader.exec_module(importlib.util.module_from_spec(importlib.util.spec_from_file_location(\n"
        f"            'm', {str(tmp_path / 'evilmod.py')!r}))),\n"
        f"    lambda: exec(open({str(tmp_path / 'evilmod.py')!r}).read()),\n"
        "    lambda: __import__('numpy'),\n"
        "]\n"
        "for f in attempts:\n"
        "    try:\n"
        "        f(); print('IMPORTED')\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    assert secret not in out(r) and "IMPORTED" not in r.stdout and r.stdout.count("blocked") == 5, out(r)


def test_symlink_hardlink_and_rename_escapes_fail(outside):
    r = run(
        "import os\n"
        "attempts = [\n"
        "    lambda: os.symlink('/etc/passwd', 'p') or open('p').read(),\n"
        "    lambda: os.link('/etc/passwd', 'h') or open('h').read(),\n"
        f"    lambda: os.symlink({str(outside)!r}, 'w') or open('w', 'w').write('pwned'),\n"
        f"    lambda: open('f', 'w').write('pwned') and os.rename('f', {str(outside)!r}),\n"
        "    lambda: os.symlink('../..', 'up') or os.listdir('up/etc'),\n"
        "    lambda: open(os.open('/etc', os.O_RDONLY)).read(),\n"
        "]\n"
        "for f in attempts:\n"
        "    try:\n"
        "        print('ESCAPED', f())\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    assert not outside.exists() and "root:x:" not in out(r) and "ESCAPED" not in r.stdout
    assert r.stdout.count("blocked") == 6, out(r)


def test_signals_to_parent_fail():
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        r = run(
            "import os, signal\n"
            "for f in (lambda: os.kill(os.getppid(), signal.SIGUSR1), lambda: os.killpg(os.getpgid(os.getppid()),\n"
            "          signal.SIGUSR1), lambda: os.kill(1, signal.SIGUSR1), lambda: os.kill(-1, signal.SIGUSR1)):\n"
            "    try:\n"
            "        f(); print('SENT')\n"
            "    except Exception as e:\n"
            "        print('blocked', type(e).__name__)\n"
        )
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not got and "SENT" not in r.stdout and r.stdout.count("blocked") == 4, out(r)


def test_thread_bomb_is_contained():
    r = run(
        "import threading, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(100000):\n"
        "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print('threads', n)\n"
    )
    assert r.duration_s < FAST.wall_s + 1
    n = int(r.stdout.split()[-1]) if r.stdout.startswith("threads") else 0
    assert n < 1000, out(r)


def test_introspection_cannot_reach_the_audit_hook():
    r = run(
        "import gc, sys\n"
        "for f in (gc.get_objects, lambda: gc.get_referrers(sys), lambda: sys.addaudithook(lambda *a: None)):\n"
        "    try:\n"
        "        f(); print('ok')\n"
        "    except Exception as e:\n"
        "        print('blocked', type(e).__name__)\n"
        "print(open('/etc/passwd').read())\n"
    )
    assert "root:x:" not in out(r) and r.stdout.count("blocked") == 2, out(r)


@pytest.mark.parametrize(
    "code, layer",
    [
        ("import os\nprint('FORKED', os.fork())", "seccomp"),
        ("import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=1)\nprint('CONNECTED')",
         "seccomp"),
        ("import subprocess\nprint('RAN', subprocess.run(['true']))", "seccomp"),
        ("print('READ', open('/etc/passwd').read())", "landlock"),
        ("open('/tmp/{name}', 'w').write('x')\nprint('WROTE')", "landlock"),
        ("import ctypes\nprint('RAN', ctypes.CDLL(None).system(b'touch /tmp/{name}'))", "seccomp"),
    ],
)
def test_kernel_layers_hold_without_the_audit_hook(code, layer, layers, outside):
    if layer not in layers:
        pytest.skip(f"the {layer} layer is not available on this machine (layers: {layers})")
    r = run(code.format(name=outside.name), SandboxLimits(cpu_s=1, wall_s=3, audit_hook=False))
    assert "audit" not in r.layers and layer in r.layers
    assert not outside.exists() and "root:x:" not in out(r)
    assert not any(w in r.stdout for w in ("FORKED", "CONNECTED", "READ", "WROTE")), out(r)
    assert "RAN 0" not in r.stdout and "returncode=0" not in r.stdout


# ------------------------------------------------------------------------------------------- normal use


def test_computation_and_stdout_stderr_are_captured():
    r = run("import math, json, collections\nprint(sum(i * i for i in range(10)))\n"
            "print(json.dumps(collections.Counter('abca').most_common(1)))\n"
            "import sys\nprint('warn', file=sys.stderr)\n")
    assert r.ok and r.stdout == '285\n[["a", 2]]\n' and r.stderr == "warn\n" and not r.timed_out


def test_scratch_dir_is_readable_and_writable():
    r = run("import os\nos.mkdir('d')\nopen('d/a.txt', 'w').write('hello')\nprint(open('d/a.txt').read(),"
            " sorted(os.listdir('.')))\nos.remove('d/a.txt')\nos.rmdir('d')\n")
    assert r.ok and r.stdout == "hello ['d']\n", out(r)


def test_exit_codes_and_exceptions_are_reported():
    assert run("import sys\nsys.exit(3)").exit_code == 3
    r = run("def f():\n    return 1 / 0\nf()\n")
    assert r.exit_code == 1 and r.killed_by is None and "ZeroDivisionError" in r.stderr
    assert 'File "<sandbox>", line 3' in r.stderr and "<string>" not in r.stderr


def test_layers_are_reported(layers):
    assert {"process", "rlimits", "audit"} <= set(layers)
    assert set(layers) <= {"process", "rlimits", "netns", "landlock", "seccomp", "audit"}
    assert run("pass").layers == layers


def test_bad_limits_are_rejected():
    with pytest.raises(SandboxError, match="cpu_s"):
        SandboxLimits(cpu_s=0)
    with pytest.raises(SandboxError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


def test_tool_call_adapter():
    assert PYTHON_TOOL_SPEC["function"]["name"] == "python"
    assert python_tool({"code": "print(2 + 2)"}, FAST) == "4"
    assert python_tool('{"code": "import time\\ntime.sleep(5)"}', SandboxLimits(cpu_s=1, wall_s=0.5)) == (
        "[killed: wall-time limit exceeded]"
    )
    with pytest.raises(ToolError, match="code"):
        python_tool({"source": "print(1)"})
    action = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(7)"}'}},
        {"id": "c2", "type": "function", "function": {"name": "bash", "arguments": "{}"}},
    ]}
    obs = execute_action(action, FAST)
    assert obs[0] == {"role": "tool", "tool_call_id": "c1", "content": "7"}
    assert obs[1]["tool_call_id"] == "c2" and obs[1]["content"].startswith("[error] unknown tool 'bash'")


def test_code_action_adapter():
    content = "I will compute it.\n```python\nprint(3 * 3)\n```\nThen check:\n```py\nraise ValueError('no')\n```\n"
    assert extract_code_actions(content) == ["print(3 * 3)\n", "raise ValueError('no')\n"]
    [obs] = execute_action({"role": "assistant", "content": content}, FAST)
    assert obs["role"] == "user" and "[block 1]\n9" in obs["content"]
    assert "ValueError: no" in obs["content"] and "[exit code 1]" in obs["content"]
    assert execute_action({"role": "assistant", "content": "The answer is 9."}, FAST) == []
