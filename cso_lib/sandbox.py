"""A Python code sandbox for model-generated code actions.

`run_code(code, limits)` runs `code` in a fresh interpreter process and returns a `SandboxResult`. The
process is confined by independent layers, each of which holds on its own:

- process: a new session (its own process group, killed as a whole on timeout), a clean environment
  (no inherited variables, so no API keys), `-I -S` (isolated, no site-packages unless asked), cwd a
  fresh scratch dir that is deleted afterwards, stdin closed after the code is read;
- rlimits (`resource.setrlimit`): CPU seconds, address space, file size, open files, core dumps, processes;
- netns: `unshare -rn` (a user + network namespace holding only a downed loopback) when it works without
  privileges here;
- landlock (Linux >= 5.13, unprivileged): files readable only under the stdlib (+ site-packages if
  allowed) and system library dirs, writable only in the scratch dir; no TCP bind/connect; no signals or
  abstract unix sockets outside the sandbox (ABI >= 6);
- seccomp (unprivileged, with no_new_privs): fork, vfork, exec, non-thread clone, socket, ptrace,
  mount/namespaces, bpf, io_uring, signals to other processes and more fail with EPERM;
- audit: a `sys.addaudithook` hook installed before user code blocks subprocess/os.system/exec/fork/spawn,
  sockets and DNS, ctypes/cffi, signals, gc/frame introspection that could reach the hook, and file
  access (open, listdir, link, symlink, rename, remove, chmod ...) outside the allowed paths.

`SandboxResult.layers` says which layers were active for a run; `available_layers()` probes this
machine. A layer the kernel does not offer is skipped, never faked. Wall time, output size, CPU and
memory overruns are reported in `killed_by`.

>>> r = run_code("print(6 * 7)", SandboxLimits(wall_s=10))
>>> r.stdout, r.exit_code, r.ok
('42\\n', 0, True)
"""

from __future__ import annotations

import functools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from cso_lib.errors import SandboxError, ToolError

KilledBy = Literal["cpu", "memory", "wall", "output"]

_LAYERS_TAG = "\x00cso-sandbox-layers:"
_SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run. Defaults suit a short computation; tests use 1-3 s."""

    cpu_s: int = 5
    """CPU seconds (RLIMIT_CPU): SIGXCPU at the limit, SIGKILL one second later."""
    wall_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed."""
    memory_mb: int = 512
    """Address space in MiB (RLIMIT_AS); allocations beyond it raise MemoryError."""
    max_output_bytes: int = 64_000
    """Bytes kept of stdout and of stderr each; the run is killed when either goes past it."""
    max_file_mb: int = 16
    """Largest file the code may write in its scratch dir (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_processes: int = 32
    """RLIMIT_NPROC (counts threads; not enforced by the kernel for root, seccomp blocks forks anyway)."""
    site_packages: bool = False
    """Let the code import the parent interpreter's site-packages (read-only)."""
    network_namespace: bool = True
    """Run under `unshare -rn` when it works here."""
    kernel_layers: bool = True
    """Install landlock and seccomp filters when the kernel offers them."""
    audit_hook: bool = True
    """Install the Python audit hook. Turn off only to test that the kernel layers hold on their own."""

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_mb", "max_output_bytes", "max_file_mb", "max_open_files"):
            if getattr(self, name) <= 0:
                raise SandboxError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.memory_mb < 64:
            raise SandboxError(f"SandboxLimits.memory_mb must be at least 64, got {self.memory_mb!r}")
        if self.max_open_files < 16:
            raise SandboxError(
                f"SandboxLimits.max_open_files must be at least 16, got {self.max_open_files!r}"
            )


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did. Output is decoded as UTF-8 (errors replaced) and truncated to limits."""

    stdout: str
    stderr: str
    exit_code: int | None
    """The process's exit status; negative = killed by that signal (POSIX convention)."""
    timed_out: bool
    """True when the CPU or the wall-time limit ended the run."""
    killed_by: KilledBy | None
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    layers: tuple[str, ...] = field(default_factory=tuple)
    """Confinement layers active for this run (see the module docstring)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_by is None


# --------------------------------------------------------------------------------------------------
# The bootstrap: runs first in the child (`python -I -S -c _BOOT config`), confines the process, then
# runs the code read from stdin. It keeps nothing reachable from the user's frames but plain data.
_BOOT = r"""
import json, os, resource, sys
_cfg = json.loads(sys.argv[1])
_code = sys.stdin.read()
sys.stdin.close()
sys.argv = ["<sandbox>"]
sys.path[:] = [p for p in sys.path if p] + _cfg["site_paths"]
os.chdir(_cfg["scratch"])

def _setup(cfg):
    layers = ["process"]
    for name, value in cfg["rlimits"].items():
        res = getattr(resource, name)
        soft, hard = value if isinstance(value, list) else (value, value)
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    layers.append("rlimits")
    if cfg["netns"]:
        layers.append("netns")
    if cfg["kernel"]:
        layers += _kernel_layers(cfg)
    if cfg["audit"]:
        _install_audit_hook(cfg)
        layers.append("audit")
    sys.stderr.write("\x00cso-sandbox-layers:" + ",".join(layers) + "\n")
    sys.stderr.flush()

def _kernel_layers(cfg):
    import ctypes, platform, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    out = []
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return out
    # ---- landlock
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi >= 1:
        fs_all = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
        if abi >= 2: fs_all |= 1 << 13  # REFER
        if abi >= 3: fs_all |= 1 << 14  # TRUNCATE
        if abi >= 5: fs_all |= 1 << 15  # IOCTL_DEV
        net_all = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rules: all denied
        scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
        attr = struct.pack("=QQQ", fs_all, net_all, scoped)
        size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
        buf = ctypes.create_string_buffer(attr[:size], size)
        rfd = libc.syscall(444, buf, size, 0)
        if rfd >= 0:
            read_dir = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE | READ_FILE | READ_DIR
            read_file = (1 << 0) | (1 << 2)
            ok = True
            rules = [(p, read_dir, read_file) for p in cfg["read_roots"] + cfg["system_roots"]]
            rules.append((cfg["scratch"], fs_all, fs_all & ((1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15))))
            rules += [("/dev/null", 0, (1 << 1) | (1 << 2)), ("/dev/zero", 0, 1 << 2), ("/dev/urandom", 0, 1 << 2)]
            for path, dir_access, file_access in rules:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                access = dir_access if os.path.isdir(path) else file_access
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
                if libc.syscall(445, rfd, 1, rule, 0) != 0:  # landlock_add_rule(PATH_BENEATH)
                    ok = False
                os.close(fd)
            if ok and libc.syscall(446, rfd, 0) == 0:  # landlock_restrict_self
                out.append("landlock")
            os.close(rfd)
    # ---- seccomp
    arch = platform.machine()
    if arch == "x86_64":
        audit_arch, nrs = 0xC000003E, dict(
            deny=[57, 58, 59, 322, 41, 53, 101, 310, 311, 200, 272, 308, 165, 166, 155, 161, 321, 323, 298,
                  250, 248, 249, 246, 320, 175, 313, 176, 169, 167, 168, 163, 164, 425, 426, 427, 135, 424,
                  438, 133, 259, 434],
            clone=56, clone3=435, kill=62, tgkill=234)
    elif arch == "aarch64":
        audit_arch, nrs = 0xC00000B7, dict(
            deny=[221, 281, 198, 199, 117, 270, 271, 130, 97, 268, 40, 39, 41, 51, 280, 282, 241, 219, 217,
                  218, 104, 294, 105, 273, 106, 142, 224, 225, 89, 425, 426, 427, 92, 424, 438, 33, 434],
            clone=220, clone3=435, kill=129, tgkill=131)
    else:
        return out
    ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    prog = []  # (code, jt, jf, k); jumps hold label names, resolved below
    def ld(off): prog.append((0x20, 0, 0, off))
    def jeq(k, jt, jf=None): prog.append((0x15, jt, jf, k))
    def ret(k): prog.append((0x06, 0, 0, k))
    labels = {}
    ld(4); jeq(audit_arch, None, "kill")
    ld(0)
    if arch == "x86_64":
        prog.append((0x35, "eperm", None, 0x40000000))  # x32 ABI
    for nr in nrs["deny"]:
        jeq(nr, "eperm")
    jeq(nrs["clone3"], "enosys"); jeq(nrs["clone"], "clone"); jeq(nrs["kill"], "self"); jeq(nrs["tgkill"], "self")
    ret(ALLOW)
    labels["clone"] = len(prog); ld(16); prog.append((0x45, "allow", "eperm", 0x00010000))  # CLONE_THREAD
    labels["self"] = len(prog); ld(16); jeq(os.getpid(), "allow", "eperm")
    labels["allow"] = len(prog); ret(ALLOW)
    labels["eperm"] = len(prog); ret(EPERM)
    labels["enosys"] = len(prog); ret(ENOSYS)
    labels["kill"] = len(prog); ret(KILL)
    raw = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else 0
        jf = labels[jf] - i - 1 if isinstance(jf, str) else 0
        raw += struct.pack("=HBBI", code, jt, jf, k)
    filt = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(filt))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        out.append("seccomp")
    return out

def _install_audit_hook(cfg):
    import posixpath as pp
    realpath, fspath, fsdecode, getcwd = pp.realpath, os.fspath, os.fsdecode, os.getcwd
    scratch = realpath(cfg["scratch"])
    read_roots = tuple(realpath(p) for p in cfg["read_roots"]) + (scratch,)
    read_files = frozenset(("/dev/null", "/dev/zero", "/dev/urandom"))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    class SandboxViolation(PermissionError):
        pass
    class BlockedImport(ImportError):
        pass
    SandboxViolation.__qualname__, BlockedImport.__qualname__ = "SandboxViolation", "BlockedImport"
    SandboxViolation.__module__ = BlockedImport.__module__ = "sandbox"
    blocked_modules = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_testcapi", "_xxsubinterpreters"))
    blocked_events = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
        "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "os.chroot", "os.setuid", "os.setgid", "os.mknod", "os.mkfifo", "webbrowser.open",
    ))
    blocked_prefixes = ("socket.", "ctypes.", "_winapi.", "msvcrt.", "winreg.", "urllib.", "http.", "ftplib.",
                        "smtplib.", "imaplib.", "poplib.", "nntplib.", "telnetlib.", "ssl.")
    fs_events = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,), "os.mkdir": (0,), "os.remove": (0,),
                 "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (0, 1),
                 "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                 "os.setxattr": (0,), "os.removexattr": (0,), "os.listxattr": (0,), "os.getxattr": (0,),
                 "shutil.chown": (0,), "os.lchown": (0,)}
    writing = frozenset(("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate",
                         "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr", "shutil.chown",
                         "os.lchown"))
    def _resolve(path):
        if path is None or isinstance(path, int):
            return None
        p = fsdecode(fspath(path))
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        return realpath(p)
    def _within(p, roots):
        for r in roots:
            if p == r or p.startswith(r + "/"):
                return True
        return False
    def hook(event, args):
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].partition(".")[0] in blocked_modules:
                raise BlockedImport(f"sandbox: import of {args[0]} is not allowed")
            return
        if event == "open":
            path, mode, flags = args
            p = _resolve(path)
            if p is None:
                return
            write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if write:
                if not (p == scratch or p.startswith(scratch + "/")) and p != "/dev/null":
                    raise SandboxViolation(f"sandbox: writing {p} is outside the scratch dir")
            elif not _within(p, read_roots) and p not in read_files:
                raise SandboxViolation(f"sandbox: reading {p} is not allowed")
            return
        idx = fs_events.get(event)
        if idx is not None:
            roots = (scratch,) if event in writing else read_roots
            for i in idx:
                if i >= len(args) or args[i] is None or isinstance(args[i], int):
                    continue
                p = _resolve(args[i])
                if event == "os.symlink" and i == 0:
                    p = realpath(pp.join(pp.dirname(_resolve(args[1]) or scratch), fsdecode(fspath(args[0]))))
                if not _within(p, roots):
                    raise SandboxViolation(f"sandbox: {event} on {p} is not allowed")
    sys.addaudithook(hook)

_setup(_cfg)
for _m in [m for m in sys.modules if m.partition(".")[0] in ("ctypes", "_ctypes")]:
    del sys.modules[_m]
del _setup, _kernel_layers, _install_audit_hook, _cfg, json, resource
_main = type(sys)("__main__")
sys.modules["__main__"] = _main
try:
    _c = compile(_code, "<sandbox>", "exec")
    del _code
    exec(_c, _main.__dict__)
except SystemExit:
    raise
except BaseException as _e:
    import traceback
    _te = traceback.TracebackException(type(_e), _e, _e.__traceback__)
    _te.stack = traceback.StackSummary.from_list([f for f in _te.stack if f.filename != "<string>"])
    sys.stderr.write("".join(_te.format()))
    raise SystemExit(1)
"""


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """The command prefix that puts a process in a fresh network namespace here, or () if none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-rn", "--"), (unshare, "-n", "--")):
        try:
            done = subprocess.run([*prefix, "/bin/true"], capture_output=True, timeout=10, env={})
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def _read_roots(site_packages: bool) -> tuple[list[str], list[str]]:
    """(readable dirs for the code, extra sys.path entries): the stdlib, plus site-packages if allowed."""
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    roots = [stdlib, os.path.realpath(os.path.dirname(os.__file__))]
    site: list[str] = []
    if site_packages:
        for key in ("purelib", "platlib"):
            p = os.path.realpath(sysconfig.get_path(key))
            if os.path.isdir(p) and p not in site:
                site.append(p)
        roots += site
    return sorted(set(roots)), site


def available_layers() -> tuple[str, ...]:
    """The layers a default run gets on this machine (probes by running an empty program once)."""
    return run_code("", SandboxLimits(wall_s=30)).layers


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_code(code: str, limits: SandboxLimits | None = None, python: str | None = None) -> SandboxResult:
    """Run `code` in a confined interpreter (`python`, default this one) and report what happened."""
    limits = limits or SandboxLimits()
    python = python or sys.executable
    if not os.path.exists(python):
        raise SandboxError(f"python interpreter {python!r} does not exist")
    scratch = tempfile.mkdtemp(prefix="cso-sandbox-")
    read_roots, site_paths = _read_roots(limits.site_packages)
    netns = _netns_prefix() if limits.network_namespace else ()
    cfg: dict[str, Any] = {
        "scratch": scratch,
        "read_roots": read_roots,
        "system_roots": [d for d in _SYSTEM_LIB_DIRS if os.path.isdir(d)],
        "site_paths": site_paths,
        "netns": bool(netns),
        "kernel": limits.kernel_layers,
        "audit": limits.audit_hook,
        "rlimits": {
            "RLIMIT_CPU": [limits.cpu_s, limits.cpu_s + 1],
            "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": limits.max_file_mb * 1024 * 1024,
            "RLIMIT_NOFILE": limits.max_open_files,
            "RLIMIT_CORE": 0,
            "RLIMIT_NPROC": limits.max_processes,
        },
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "PYTHONUTF8": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HOME": scratch,
        "TMPDIR": scratch,
    }
    argv = [*netns, python, "-I", "-S", "-B", "-c", _BOOT, json.dumps(cfg)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SandboxError(f"cannot start the sandbox interpreter {python!r}: {e}") from e
    try:
        return _supervise(proc, code, limits, start)
    finally:
        _kill_group(proc)
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _supervise(
    proc: subprocess.Popen[bytes], code: str, limits: SandboxLimits, start: float
) -> SandboxResult:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(code.encode("utf-8", "surrogatepass"))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    cap = limits.max_output_bytes + len(_LAYERS_TAG) + 200  # stderr also carries the layers line
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    killed_by: KilledBy | None = None
    deadline = start + limits.wall_s
    open_streams = 2
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            killed_by = "wall"
            break
        for key, _ in sel.select(timeout=min(left, 0.25)):
            chunk = os.read(key.fd, 65536)
            name = key.data
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            limit = cap if name == "stderr" else limits.max_output_bytes
            room = limit - len(bufs[name])
            bufs[name] += chunk[: max(room, 0)]
            if len(chunk) > room:
                truncated[name] = True
                killed_by = "output"
        if killed_by:
            break
    if killed_by:
        _kill_group(proc)
    sel.close()
    try:
        exit_code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        killed_by = "wall"
        _kill_group(proc)
        exit_code = proc.wait()
    duration = time.monotonic() - start
    stdout = bufs["stdout"].decode("utf-8", "replace")
    stderr = bufs["stderr"].decode("utf-8", "replace")
    layers: tuple[str, ...] = ()
    if stderr.startswith(_LAYERS_TAG):
        line, _, stderr = stderr.partition("\n")
        layers = tuple(line[len(_LAYERS_TAG) :].split(","))
    if len(stderr) > limits.max_output_bytes:
        stderr, truncated["stderr"] = stderr[: limits.max_output_bytes], True
    if killed_by is None:
        if exit_code in (-signal.SIGXCPU, -signal.SIGKILL):
            killed_by = "cpu"
        elif exit_code != 0 and re.search(r"^MemoryError\b", stderr, re.MULTILINE):
            killed_by = "memory"
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=exit_code,
        timed_out=killed_by in ("cpu", "wall"),
        killed_by=killed_by,
        duration_s=round(duration, 4),
        stdout_truncated=truncated["stdout"],
        stderr_truncated=truncated["stderr"],
        layers=layers,
    )


# --------------------------------------------------------------------------------------------------
# Tool adapter: OpenAI tool calls `python(code=...)` and code actions (```python fenced blocks).

PYTHON_TOOL_SPEC: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python 3 code in a sandbox (no network, no files outside a scratch dir, time and "
        "memory limits) and return its stdout and stderr. Print what you want to see.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python source to run."}},
            "required": ["code"],
        },
    },
}

_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code_actions(content: str) -> list[str]:
    """The ```python fenced blocks of an assistant message, in order.

    >>> extract_code_actions("Let me compute.\\n```python\\nprint(1)\\n```\\nand ```py\\nx = 2\\n```")
    ['print(1)\\n', 'x = 2\\n']
    """
    return _FENCE.findall(content or "")


def format_observation(result: SandboxResult) -> str:
    """The observation text an agent sees for one run."""
    parts = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n") + ("\n[stdout truncated]" if result.stdout_truncated else ""))
    if result.stderr:
        parts.append(
            "[stderr]\n"
            + result.stderr.rstrip("\n")
            + ("\n[stderr truncated]" if result.stderr_truncated else "")
        )
    if result.killed_by:
        reason = {
            "cpu": "CPU time limit",
            "memory": "memory limit",
            "wall": "wall-time limit",
            "output": "output size limit",
        }[result.killed_by]
        parts.append(f"[killed: {reason} exceeded]")
    elif result.exit_code != 0:
        parts.append(f"[exit code {result.exit_code}]")
    return "\n".join(parts) if parts else "[no output]"


def python_tool(arguments: dict[str, Any] | str, limits: SandboxLimits | None = None) -> str:
    """Execute an OpenAI tool call `python(code=...)` (arguments as a dict or JSON text); the observation."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ToolError(f"python: arguments are not JSON: {arguments[:200]!r}") from e
    code = arguments.get("code") if isinstance(arguments, dict) else None
    if not isinstance(code, str):
        raise ToolError(f"python: expected a string argument 'code', got {arguments!r:.200}")
    return format_observation(run_code(code, limits))


def execute_action(action: dict[str, Any], limits: SandboxLimits | None = None) -> list[dict[str, Any]]:
    """Run an assistant message's python tool calls or, if it has none, its ```python code actions.

    Returns the observation messages: one `tool` message per tool call (other tools are answered with an
    error), or one `user` message with the outputs of the code blocks. No code, no messages.
    """
    calls = action.get("tool_calls") or []
    if calls:
        out = []
        for c in calls:
            fn = c.get("function") or {}
            try:
                if fn.get("name") != "python":
                    raise ToolError(f"unknown tool {fn.get('name')!r}; the available tool is 'python'")
                text = python_tool(fn.get("arguments") or {}, limits)
            except ToolError as e:
                text = f"[error] {e}"
            out.append({"role": "tool", "tool_call_id": c.get("id"), "content": text})
        return out
    blocks = extract_code_actions(action.get("content") or "")
    if not blocks:
        return []
    texts = [format_observation(run_code(b, limits)) for b in blocks]
    body = texts[0] if len(texts) == 1 else "\n\n".join(f"[block {i + 1}]\n{t}" for i, t in enumerate(texts))
    return [{"role": "user", "content": "Observation:\n" + body}]
