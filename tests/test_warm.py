"""lggseg.warm: a stage script run by a warm server behaves exactly as when run cold."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from lggseg import warm

REPO = Path(__file__).resolve().parents[1]

# A stand-in stage script: delegates first, then reports where it ran and what it saw.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    from lggseg import warm
    warm.delegate(__file__)
    print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "probe", os.environ.get("PROBE"))
    print("warm child", warm._in_child, flush=True)
    print("to stderr", file=sys.stderr)
    sys.exit(int(os.environ.get("EXIT", "0")))
    """
)


@pytest.fixture
def sock_dir():
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="lgw-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def running_server(sock_dir):
    """A warm server preloading only light modules (the mechanism does not depend on what is preloaded)."""
    env = {k: v for k, v in os.environ.items() if k != warm.ENV_SOCKET}
    with warm.server(sock_dir / "s.sock", timeout=60, preload=("json", "lggseg.config"), env=env) as extra:
        assert extra == {warm.ENV_SOCKET: str(sock_dir / "s.sock")}
        yield {**env, **extra}
    assert not (sock_dir / "s.sock").exists()  # removed when the block ends


def _run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=60)


def _script(tmp_path: Path) -> Path:
    folder = tmp_path / "stagedir"
    folder.mkdir()
    path = folder / "stage.py"
    path.write_text(SCRIPT)
    return path


def test_warm_run_equals_cold_run(tmp_path, running_server):
    script = _script(tmp_path)
    cold_env = {k: v for k, v in running_server.items() if k != warm.ENV_SOCKET}
    for exit_code in ("0", "3"):
        env = {"PROBE": "x y", "EXIT": exit_code}
        cold = _run(script, {**cold_env, **env}, "a", "--b=1")
        hot = _run(script, {**running_server, **env}, "a", "--b=1")
        assert "warm child False" in cold.stdout and "warm child True" in hot.stdout
        assert cold.stdout.replace("False", "?") == hot.stdout.replace("True", "?")
        assert "argv ['a', '--b=1'] cwd stagedir probe x y" in hot.stdout
        assert hot.stderr == cold.stderr == "to stderr\n"
        assert hot.returncode == cold.returncode == int(exit_code)


def test_different_import_time_environment_runs_cold(tmp_path, running_server):
    script = _script(tmp_path)
    # OpenMP reads this when torch loads: a warm child would keep the server's value, so it must not be used
    hot = _run(script, {**running_server, "OMP_NUM_THREADS": "7"})
    assert "warm child False" in hot.stdout and hot.returncode == 0


def test_no_server_runs_cold(tmp_path, sock_dir):
    script = _script(tmp_path)
    env = {**os.environ, warm.ENV_SOCKET: str(sock_dir / "missing.sock")}
    out = _run(script, env)
    assert "warm child False" in out.stdout and out.returncode == 0


def test_a_torchrun_rank_is_never_delegated(tmp_path, running_server):
    out = _run(_script(tmp_path), {**running_server, "RANK": "0", "WORLD_SIZE": "1"})
    assert "warm child False" in out.stdout


def test_stage_script_warm_equals_cold(running_server):
    """A real stage script: the usage error (one line, exit 2) is the same warm and cold."""
    cold_env = {k: v for k, v in running_server.items() if k != warm.ENV_SOCKET}
    args = [sys.executable, str(REPO / "stages" / "evaluate.py"), "--variant", "v"]
    cold = subprocess.run(args, cwd=REPO, env=cold_env, capture_output=True, text=True, timeout=120)
    hot = subprocess.run(args, cwd=REPO, env=running_server, capture_output=True, text=True, timeout=120)
    assert cold.returncode == hot.returncode == 2
    assert cold.stderr == hot.stderr and "required" in hot.stderr


def test_import_env_keeps_only_what_libraries_read_at_import():
    env = {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root", "PROBE": "1", "PYTHONPATH": "/x"}
    assert warm.import_env(env) == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": "/x"}


def test_server_whose_imports_fail_leaves_everything_cold(tmp_path, sock_dir):
    env = {k: v for k, v in os.environ.items() if k != warm.ENV_SOCKET}
    with warm.server(sock_dir / "s.sock", timeout=30, preload=("no_such_module_xyz",), env=env) as extra:
        out = _run(_script(tmp_path), {**env, **extra})
    assert "warm child False" in out.stdout and out.returncode == 0


def test_a_stage_started_during_the_imports_waits_and_runs_warm(tmp_path, sock_dir):
    env = {k: v for k, v in os.environ.items() if k != warm.ENV_SOCKET}
    # the server listens at once and imports torch afterwards: the client must queue, not go cold
    with warm.server(sock_dir / "s.sock", timeout=30, preload=("torch",), env=env) as extra:
        out = _run(_script(tmp_path), {**env, **extra})
    assert "warm child True" in out.stdout and out.returncode == 0


def test_environment_set_by_a_preloaded_library_does_not_refuse_clients(tmp_path, sock_dir):
    """Libraries set variables when they load (torch's inductor sets TORCHINDUCTOR_CACHE_DIR): clients are
    compared with the environment the server started with, which is what a fresh stage process has."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "sets_env_at_import.py").write_text("import os\nos.environ['OMP_SET_BY_IMPORT'] = '1'\n")
    env = {k: v for k, v in os.environ.items() if k != warm.ENV_SOCKET}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lib), env.get("PYTHONPATH")]))
    with warm.server(sock_dir / "s.sock", timeout=30, preload=("sets_env_at_import",), env=env) as extra:
        out = _run(_script(tmp_path), {**env, **extra})
    assert "warm child True" in out.stdout and out.returncode == 0
