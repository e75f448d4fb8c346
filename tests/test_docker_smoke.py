"""scripts/docker-smoke.sh's own logic, without a Docker daemon: docker, curl and pip are stand-ins.

The stand-ins record every call and answer as a healthy stack would; pip's
stand-in behaves like the real indexes: torch from PyPI is the CUDA build
(it brings nvidia_* wheels), from PyTorch's CPU index `torch-X+cpu`. The
script runs from a copy of the repository's files it reads, so nothing is
written into the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_DOCKER = r"""#!/usr/bin/env bash
echo "docker $*" >> "$CALLS"
case "$*" in
  "compose version"|"buildx version") exit 0 ;;
  "image inspect hearth-base:bookworm") exit 1 ;;
  image\ inspect\ -f*) echo 1270000000 ;;
  "compose exec -T server id -u") echo 10001 ;;
  "compose ps -q server") echo c0ffee ;;
  *State.Health.Status*) echo healthy ;;
  *State.ExitCode*) echo 0 ;;
  "logs c0ffee") printf '%s\n' "INFO hearth.server: loaded default" "$SERVER_LOG_LINE" ;;
esac
exit 0
"""

FAKE_CURL = r"""#!/usr/bin/env bash
case "$*" in
  */health*) echo '{"status": "ok", "models": ["default"]}' ;;
  */v1/chat/completions*) echo '{"choices": [{"message": {"content": "Hi"}}], "usage": {"completion_tokens": 3}}' ;;
  */metrics*) printf 'hearth_http_requests_total{route="/v1/chat/completions"} 1\nhearth_generation_tokens_total 3\n' ;;
esac
"""

# python3 -m pip download ...: a stand-in for the two indexes; any other python3 call is the real one.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ $1 == -m && $2 == pip ]]; then
    echo "pip ${*:3}" >> "$CALLS"
    dest=$(sed -E 's/.*--dest ([^ ]+).*/\1/' <<<"$*")
    mkdir -p "$dest"
    if [[ $* == *"--index-url https://download.pytorch.org/whl/cpu"* ]]; then
        touch "$dest/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    elif ! compgen -G "$dest/torch-2.13.0*" >/dev/null; then
        touch "$dest/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl" "$dest/nvidia_cublas_cu12-12.8-py3-none-manylinux_2_27_x86_64.whl"
    fi
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""

UNAVAILABLE = "WARNING hearth.native: native paged_attention unavailable, using PyTorch's kernel: "


@pytest.fixture
def sandbox(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "docker-smoke.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("curl", FAKE_CURL), ("python3", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return repo, bin_dir, tmp_path / "calls"


def run_smoke(sandbox, cpu_flags: str, server_log_line: str, **env: str) -> subprocess.CompletedProcess:
    repo, bin_dir, calls = sandbox
    cpuinfo = repo / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {cpu_flags}\n")
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                   "REAL_PYTHON": shutil.which("python3") or "python3", "CPUINFO": str(cpuinfo),
                   "SERVER_LOG_LINE": server_log_line, **env}
    return subprocess.run(["bash", str(repo / "scripts" / "docker-smoke.sh")], cwd=repo, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_wheelhouse_takes_torch_from_the_cpu_index_and_the_stage_image_is_removed(sandbox):
    result = run_smoke(sandbox, "avx2 fma", UNAVAILABLE + "the CPU lacks avx512f, avx512_bf16", WHEELHOUSE="1")
    assert result.returncode == 0, result.stdout + result.stderr
    repo, _, calls = sandbox
    wheels = sorted(path.name for path in (repo / "docker" / "wheels").iterdir())
    assert wheels == ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"], wheels  # no CUDA build, no nvidia_*
    recorded = calls.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in recorded
    assert "docker image prune --force --filter label=org.hearth.stage=build" in recorded
    assert "torch wheel: torch-2.13.0+cpu" in result.stdout
    assert "native kernels: check SKIPPED: this build has no kernels for the host ISA (avx2)" in result.stdout


def test_a_cuda_wheel_in_a_cpu_wheelhouse_is_an_error(sandbox):
    repo, _, _ = sandbox
    (repo / "docker" / "wheels").mkdir(parents=True)
    (repo / "docker" / "wheels" / "nvidia_cudnn_cu12-9-py3-none-manylinux_2_27_x86_64.whl").touch()
    result = run_smoke(sandbox, "avx2", "", WHEELHOUSE="1")
    assert result.returncode == 1 and "CUDA packages in the CPU wheelhouse" in result.stderr


def test_kernel_check_on_a_host_the_kernels_are_for(sandbox):
    loaded = run_smoke(sandbox, "avx512f avx512_bf16", "", KEEP_BUILD_STAGE="1")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "native kernels: checked: the server loaded them (host ISA avx512_bf16" in loaded.stdout
    assert "image prune" not in sandbox[2].read_text()  # KEEP_BUILD_STAGE=1 keeps the layer cache
    broken = run_smoke(sandbox, "avx512f avx512_bf16", UNAVAILABLE + "cc failed: no compiler")
    assert broken.returncode == 1 and "could not load the native kernels for this host (ISA avx512_bf16)" in broken.stderr


def test_the_scripts_pass_shellcheck():
    """This one and every other shell script in scripts/ (the model recipes, fetching SmolLM2)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(path) for path in (ROOT / "scripts").glob("*.sh"))
    assert str(ROOT / "scripts" / "docker-smoke.sh") in scripts
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
