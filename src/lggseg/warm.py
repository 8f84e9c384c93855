"""Warm starts for stage processes: import torch, timm and smp once per ``dvc repro``, not once per stage.

``dvc repro`` runs every stage as a fresh ``python stages/<stage>.py`` process. On the 2-core
machines of this project importing torch + timm + segmentation-models-pytorch takes about 8.5 s per
process (measured: ``python -c "import timm, segmentation_models_pytorch"``, quiet machine), and the
demo runs 25 processes that need them (12 x train, 12 x evaluate, figure9): some 3.5 of its minutes
went to imports (issue #13).

A warm server (:func:`serve`) imports those libraries once and then, for every stage that asks,
forks a child that runs the stage script exactly as ``python`` would (same argv, working directory,
environment and standard streams, passed over a Unix socket), and reports its exit status back. The
stage scripts call :func:`delegate` first thing: when ``LGGSEG_WARM_SOCKET`` names a live server whose
import-time environment matches, the script runs in a warm child and the calling process exits with
its status; otherwise (no server, another machine, a ``torchrun`` rank, a different thread or CUDA
setting) nothing happens and the script runs cold as before. Results do not depend on the path:
every child forks from the same freshly-imported server, which never runs training code itself,
and the stages seed all random streams themselves.

``make demo`` starts a server for its ``dvc repro`` (:func:`server`). By hand::

    python -m lggseg.warm --socket /tmp/lggseg.sock &        # prints "ready" when imported
    LGGSEG_WARM_SOCKET=/tmp/lggseg.sock dvc repro

Forking is safe here because importing torch starts no threads and does not initialise CUDA (the
server checks both before it serves; DataLoader workers rely on the same property).
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

ENV_SOCKET = "LGGSEG_WARM_SOCKET"
# Libraries the stages import; loading them is what a warm start saves.
PRELOAD = ("torch", "timm", "segmentation_models_pytorch", "lggseg.training.trainer", "lggseg.evaluation.evaluate",
           "lggseg.inference", "lggseg.models", "lggseg.losses", "lggseg.data.manifest", "lggseg.data.dataset",
           "lggseg.reporting.outlier_study", "lggseg.reporting.report")
# Environment read when those libraries load (OpenMP/MKL thread pools, CUDA, allocator, Python): a
# client whose values differ from the server's runs cold, since a warm child would silently keep the
# server's.
_IMPORT_TIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH", "PYTORCH_",
                         "PYTHON", "LD_", "NCCL_", "CUBLAS_", "CUDNN_", "TIMM_", "HF_", "XDG_CACHE_HOME")
# Set by torchrun for each rank: distributed runs keep their own processes.
_DISTRIBUTED_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_in_child = False  # True inside a warm child: delegate() must not delegate again


def import_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that the preloaded libraries read at import time."""
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_PREFIXES)}


# --------------------------------------------------------------------------- wire format
# Each message is a 4-byte big-endian length followed by that many bytes of JSON.


def _send(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack(">I", len(data)) + data
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    buf = b""
    while len(buf) < n:
        if fds is not None and not buf:
            chunk, ancdata, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(3 * array.array("i").itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    fds.extend(got)
        else:
            chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("warm server connection closed")
        buf += chunk
    return buf


def _recv(sock: socket.socket, fds: list[int] | None = None) -> object:
    head = _recv_exact(sock, 4, fds)
    (n,) = struct.unpack(">I", head)
    return json.loads(_recv_exact(sock, n))


# --------------------------------------------------------------------------- client


def delegate(script: str | Path) -> None:
    """Run this stage script in a warm child and exit with its status, if a matching server is offered.

    Call it first thing in a stage script's ``main`` (before its heavy imports). Returns without doing
    anything when ``LGGSEG_WARM_SOCKET`` is unset, the server is gone or refuses (its import-time
    environment differs), this is a ``torchrun`` rank, the process was not started as this script
    (``main`` called from a test), or we already are a warm child.
    """
    path = os.environ.get(ENV_SOCKET)
    if _in_child or not path or any(k in os.environ for k in _DISTRIBUTED_KEYS):
        return
    try:
        if Path(sys.argv[0]).resolve() != Path(script).resolve():
            return  # main() called from elsewhere (a test, another module): stay in this process
    except (OSError, IndexError):
        return
    code = run_warm(path, str(Path(script).resolve()), sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_warm(socket_path: str, script: str, args: Sequence[str]) -> int | None:
    """Ask the server at ``socket_path`` to run ``script args``; its exit status, or None to run cold."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        request = {"script": script, "argv": [script, *args], "cwd": os.getcwd(), "env": dict(os.environ)}
        sys.stdout.flush()
        sys.stderr.flush()
        _send(sock, request, fds=(0, 1, 2))
        reply = _recv(sock)
    except (OSError, ConnectionError, ValueError):
        sock.close()
        return None  # no server, or it went away before accepting: the cold path is always correct
    if not isinstance(reply, dict) or "pid" not in reply:
        sock.close()
        return None  # refused (e.g. a different import-time environment)
    pid = int(reply["pid"])

    def forward(signum: int, _frame: object) -> None:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        done = _recv(sock)
        return int(done["exit"]) if isinstance(done, dict) else 1
    except (OSError, ConnectionError, ValueError):
        return 1  # the child died without reporting (killed, crashed)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()


# --------------------------------------------------------------------------- server


def _check_fork_safe() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preloading; forked children could not use it")
    if threading.active_count() > 1:
        raise RuntimeError(f"{threading.active_count()} threads after preloading; forking would copy their locks")


def serve(socket_path: str | Path, preload: Sequence[str] = PRELOAD, ready: bool = True) -> None:
    """Listen on ``socket_path``, import ``preload``, then serve stage runs until SIGTERM/SIGINT (one fork each)."""
    import importlib

    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Listen before the slow imports: stages that start meanwhile (dvc runs fetch and manifest
    # first) queue up and are served once the imports are done, instead of running cold.
    listener.bind(str(socket_path))
    listener.listen(64)
    print(f"[warm] listening: {socket_path}", flush=True)
    # Before the imports: torch sets CUDA_MODULE_LOADING when it loads, a stage's fresh process has not.
    env_at_start = import_env(os.environ)
    try:
        for name in preload:
            importlib.import_module(name)
        _check_fork_safe()
    except BaseException:
        listener.close()  # queued clients see the connection drop and run cold
        socket_path.unlink(missing_ok=True)
        raise
    # Children are reaped by the kernel; each one reports its own exit status to its client.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        listener.close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if ready:
        print(f"[warm] ready: {socket_path} (preloaded {', '.join(preload)})", flush=True)
    try:
        while not stop:
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            _handle(conn, env_at_start)
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


def _handle(conn: socket.socket, env_at_start: Mapping[str, str]) -> None:
    fds: list[int] = []
    try:
        request = _recv(conn, fds)
        if not isinstance(request, dict) or len(fds) != 3:
            raise ValueError("malformed request")
        if import_env(request["env"]) != env_at_start:
            _send(conn, {"refused": "import-time environment differs from the server's"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            _child(conn, request, fds)  # never returns; it sends its pid, then its exit status
    except (OSError, ConnectionError, ValueError, KeyError, TypeError):
        pass  # a broken client must not stop the server
    finally:
        conn.close()
        for fd in fds:
            os.close(fd)


def _child(conn: socket.socket, request: Mapping[str, object], fds: Sequence[int]) -> None:
    """In the forked child: become the stage process, run the script, report the status, exit."""
    global _in_child
    _in_child = True
    code = 1
    try:
        # First message from the child itself, so that the pid always precedes the exit status.
        _send(conn, {"pid": os.getpid()})
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the stage may wait for its own subprocesses
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_std_streams()
        os.chdir(str(request["cwd"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        argv = [str(a) for a in request["argv"]]
        script = str(request["script"])
        sys.argv = argv
        sys.path[0] = str(Path(script).parent)
        code = _run_script(script)
    except BaseException:  # noqa: BLE001 - whatever happens, the client must hear a status
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, {"exit": code})
        except (OSError, ValueError):
            pass
        os._exit(code)


def _reopen_std_streams() -> None:
    """Python objects for the client's standard streams, buffered as a fresh interpreter would
    buffer them (line-buffered on a terminal; stderr always), not as the server's pipes were."""
    import io

    def stream(fd: int, mode: str, line: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedWriter(raw) if "w" in mode else io.BufferedReader(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors="backslashreplace" if fd == 2 else "strict",
                                line_buffering=line)

    sys.stdin = sys.__stdin__ = stream(0, "r", False)
    sys.stdout = sys.__stdout__ = stream(1, "w", os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", True)


def _run_script(script: str) -> int:
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


@contextmanager
def server(socket_path: str | Path, timeout: float = 30.0, preload: Sequence[str] = PRELOAD,
           env: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Run a warm server in a subprocess for the duration of the block; yields the env entries that
    point stage processes at it (empty if it did not come up: everything then runs cold). It yields
    as soon as the server listens; the imports go on while the first stages run.

    ``env`` is the environment of the server and must be the one the stages will get (by default
    this process's), since libraries read parts of it when the server imports them.
    """
    socket_path = Path(socket_path)
    proc = subprocess.Popen([sys.executable, "-m", "lggseg.warm", "--socket", str(socket_path),
                             "--preload", ",".join(preload)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ if env is None else env))
    try:
        yield {ENV_SOCKET: str(socket_path)} if _wait_ready(proc, timeout) else {}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        socket_path.unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    result: list[bool] = []

    def read() -> None:
        line = proc.stdout.readline() if proc.stdout else ""
        result.append(line.startswith("[warm] listening"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return bool(result and result[0])


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lggseg.warm", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, type=Path, help="Unix socket path to serve on")
    ap.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules to import first")
    args = ap.parse_args(argv)
    serve(args.socket, [m for m in args.preload.split(",") if m])
    return 0


if __name__ == "__main__":
    # Serve from the module under its package name: the children's scripts import ``lggseg.warm`` and
    # must see its ``_in_child`` flag, not a second copy of this module living as ``__main__``.
    from lggseg import warm as _warm

    sys.exit(_warm.main())
