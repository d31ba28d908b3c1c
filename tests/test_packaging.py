"""Packaging checks that stand in for a `docker build` (no Docker engine on the dev/CI machines).

- Dockerfile / Dockerfile_M1, parsed with dockerfile_parse: labels equal
  ``sam2_refine.worker_info.docker_labels``; exec-form ENTRYPOINT on the COPYed entrypoint.py;
  CUDA *runtime* (not devel) final base; checkpoints from scripts/download_checkpoints.py with
  all four by default; sam2 installed after torch without build isolation; non-root user;
  every COPY source present in the build context.
- requirements/docker.txt: every pyproject dependency pinned (==) inside its pyproject bounds,
  per architecture; torch pins equal the Makefile's; environment.yml lists every dependency
  with the same bounds.
- shellcheck on the shell scripts and hadolint on the Dockerfiles: skipped when the tool is
  missing, except under CI (env CI set), where a missing tool fails the test.
  the dev extras (``pip install -e '.[dev]'``, done by ``make test``) install both.
- build_workers.sh: --help, argument validation, --dry-run, and the "no Docker engine" exit,
  with fake ``docker``/``uname`` commands on PATH.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package under test, when pytest runs from elsewhere
    sys.path.insert(0, str(ROOT))

from dockerfile_parse import DockerfileParser  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

from sam2_refine import worker_info  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ALL_CHECKPOINTS = ["tiny", "small", "base_plus", "large"]
ARCHES = ("x86_64", "aarch64")
DOCKERFILES = {"Dockerfile": True, "Dockerfile_M1": False}  # file -> GPU image?
BUILD_SCRIPT = ROOT / "build_workers.sh"


# --- helpers ------------------------------------------------------------------------------


def _parser(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((ROOT / name).read_bytes()))


def _stages(name: str) -> list[list[dict]]:
    """Instructions grouped by stage (each list starts with its FROM)."""
    stages: list[list[dict]] = []
    for instruction in _parser(name).structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _stage_named(name: str, stage: str) -> list[dict]:
    for instructions in _stages(name):
        if re.search(r"\bAS\s+%s\s*$" % re.escape(stage), instructions[0]["value"], re.IGNORECASE):
            return instructions
    raise AssertionError("%s has no stage named %r" % (name, stage))


def _values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def _copy_parts(value: str) -> tuple[dict[str, str], list[str], str]:
    """COPY value -> (flags, sources, destination)."""
    words = shlex.split(value)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        flags[key] = val
    return flags, words[:-1], words[-1]


def _pyproject_deps() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(d) for d in data["project"]["dependencies"]]


def _docker_pins() -> list[Requirement]:
    pins = []
    for raw in (ROOT / "requirements" / "docker.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            pins.append(Requirement(line))
    return pins


def _marker_env(arch: str) -> dict[str, str]:
    return {"platform_machine": arch, "platform_system": "Linux", "sys_platform": "linux",
            "python_version": "3.12", "python_full_version": "3.12.3"}


def _pins_for(arch: str) -> dict[str, Requirement]:
    """Canonical name -> the pin that applies on ``arch``; fails on duplicates."""
    chosen: dict[str, Requirement] = {}
    for req in _docker_pins():
        if req.marker is not None and not req.marker.evaluate(_marker_env(arch)):
            continue
        key = canonicalize_name(req.name)
        assert key not in chosen, "requirements/docker.txt pins %s twice for %s" % (req.name, arch)
        chosen[key] = req
    return chosen


def _pinned_version(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", "%s is not pinned with ==" % req
    return Version(specs[0].version)


def _makefile_torch_pins() -> dict[str, dict[str, str]]:
    text = (ROOT / "Makefile").read_text()
    match = re.search(
        r"ifeq \(\$\(ARCH\),aarch64\)\s*\n\s*TORCH_PINS\s*:?=\s*(?P<arm>[^\n]+)\n\s*else\s*\n"
        r"\s*TORCH_PINS\s*:?=\s*(?P<x86>[^\n]+)\n\s*endif",
        text,
    )
    assert match, "Makefile: expected an `ifeq ($(ARCH),aarch64) TORCH_PINS := ... else ... endif` block"

    def parse(value: str) -> dict[str, str]:
        return {canonicalize_name(Requirement(w).name): str(Version(w.split("==")[1])) for w in value.split()}

    return {"aarch64": parse(match.group("arm")), "x86_64": parse(match.group("x86"))}


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name  # installed into the test venv by pip
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _require_tool(name: str) -> str:
    path = _find_tool(name)
    if path:
        return path
    message = "%s is not installed (install the dev extras: make venv)" % name
    if os.environ.get("CI"):
        pytest.fail(message + "; CI is set, so a missing linter is a failure, not a skip")
    pytest.skip(message + "; under CI (env CI set) this fails instead")


# --- Dockerfiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, gpu", sorted(DOCKERFILES.items()))
def test_labels_equal_worker_info(name: str, gpu: bool) -> None:
    stages = _stages(name)
    for earlier in stages[:-1]:
        assert not _values(earlier, "LABEL"), "%s: labels belong in the final stage only" % name
    expected = dict(worker_info.docker_labels(gpu=gpu))
    if gpu:
        expected["com.nvidia.volumes.needed"] = "nvidia_driver"
    assert _parser(name).labels == expected


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoint_is_exec_form_on_the_copied_entrypoint(name: str) -> None:
    final = _stages(name)[-1]
    entrypoints = _values(final, "ENTRYPOINT")
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0])  # exec form: a JSON array, no shell in between
    assert isinstance(argv, list) and len(argv) == 2, argv  # interpreter + script, no wrapper
    interpreter, script = argv
    assert re.fullmatch(r"(/opt/venv/bin/)?python3?", interpreter), interpreter
    copied = {}
    for value in _values(final, "COPY"):
        flags, sources, dest = _copy_parts(value)
        if "from" not in flags:
            for source in sources:
                copied[dest if not dest.endswith("/") else dest + Path(source).name] = source
    assert copied.get(script) == "entrypoint.py", "%s must COPY entrypoint.py to %s" % (name, script)
    assert not _values(final, "CMD"), "no CMD: the server's arguments are the whole argument list"
    envs = _parser(name).envs
    assert envs.get("PYTHONUNBUFFERED") == "1"
    assert envs.get(worker_info.CHECKPOINT_DIR_ENV) == worker_info.DEFAULT_CHECKPOINT_DIR


def test_gpu_image_final_base_is_cuda_runtime_and_no_devel_stage() -> None:
    parser = _parser("Dockerfile")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", parser.baseimage), parser.baseimage
    for image in parser.parent_images:
        assert "devel" not in image, "no devel stage: sam2's _C extension is not built"


def test_cpu_image_has_no_cuda_base() -> None:
    parser = _parser("Dockerfile_M1")
    assert all("nvidia" not in image for image in parser.parent_images)
    assert "com.nvidia.volumes.needed" not in parser.labels


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_is_small_and_runs_as_non_root(name: str) -> None:
    final = _stages(name)[-1]
    runs = " ".join(_values(final, "RUN"))
    for forbidden in ("gcc", "g++", "build-essential", "python3-dev", "pip install", "cuda-toolkit"):
        assert forbidden not in runs, "%s final stage installs %r" % (name, forbidden)
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    copies_from = {(_copy_parts(v)[0].get("from"), _copy_parts(v)[2]) for v in _values(final, "COPY")}
    assert ("builder", "/opt/venv") in copies_from
    users = _values(final, "USER")
    assert users, "%s: no USER in the final stage" % name
    assert users[-1].split(":")[0] not in ("root", "0")
    # pip never keeps a cache in the builder either (it is not copied, but keeps layers lean).
    for value in _values(_stage_named(name, "builder"), "RUN"):
        if "pip install" in value:
            assert "--no-cache-dir" in value, value


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_checkpoints_come_from_the_download_script_all_four_by_default(name: str) -> None:
    stage = _stage_named(name, "checkpoints")
    args = dict(v.split("=", 1) for v in _values(stage, "ARG"))
    assert args.get("CHECKPOINTS", "").split(",") == ALL_CHECKPOINTS
    copies = [_copy_parts(v) for v in _values(stage, "COPY")]
    assert any(sources == ["scripts/download_checkpoints.py"] for _f, sources, _d in copies)
    runs = _values(stage, "RUN")
    assert len(runs) == 1
    words = shlex.split(runs[0])
    assert words[1].endswith("download_checkpoints.py")
    assert words[words.index("--dest") + 1] == worker_info.DEFAULT_CHECKPOINT_DIR
    assert words[words.index("--models") + 1] == "${CHECKPOINTS}"
    final = _stages(name)[-1]
    assert ("checkpoints", worker_info.DEFAULT_CHECKPOINT_DIR) in {
        (_copy_parts(v)[0].get("from"), _copy_parts(v)[2]) for v in _values(final, "COPY")
    }
    text = (ROOT / name).read_text()
    assert not re.search(r"\b(wget|curl)\b", text), "downloads go through the verified script only"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_builder_installs_torch_then_sam2_then_the_pins_then_the_package(name: str) -> None:
    runs = [v for v in _values(_stage_named(name, "builder"), "RUN") if "pip install" in v]
    torch_step = next(i for i, v in enumerate(runs) if re.search(r"\btorch\b", v))
    sam2_step = next(i for i, v in enumerate(runs) if re.search(r"\bsam2\s*$", v))
    pins_step = next(i for i, v in enumerate(runs) if "-r requirements/docker.txt" in v)
    package_step = next(i for i, v in enumerate(runs) if re.search(r"--no-deps .*\s\.(\s|$)", v))
    assert torch_step < sam2_step < pins_step < package_step
    assert "-c requirements/docker.txt" in runs[torch_step]
    sam2_run = runs[sam2_step]
    assert "SAM2_BUILD_CUDA=0" in sam2_run and "--no-build-isolation" in sam2_run
    assert "-c requirements/docker.txt" in sam2_run
    assert "pip check" in runs[package_step]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_in_the_build_context(name: str) -> None:
    missing = []
    for instructions in _stages(name):
        for value in _values(instructions, "COPY"):
            flags, sources, _dest = _copy_parts(value)
            if "from" in flags:
                continue
            missing += [s for s in sources if not (ROOT / s).exists()]
    assert not missing, "%s COPYs files the repository lacks (docker build would fail): %s" % (name, missing)


def test_both_images_share_the_pin_file_script_and_entrypoint() -> None:
    def shared(name: str) -> set[str]:
        out = set()
        for instructions in _stages(name):
            for value in _values(instructions, "COPY"):
                flags, sources, dest = _copy_parts(value)
                if "from" not in flags:
                    out.add("%s -> %s" % (" ".join(sources), dest))
        return out

    assert shared("Dockerfile") == shared("Dockerfile_M1")


# --- pins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_every_dependency_is_pinned_inside_pyproject_bounds(arch: str) -> None:
    pins = _pins_for(arch)
    for req in pins.values():
        _pinned_version(req)
    for dep in _pyproject_deps():
        key = canonicalize_name(dep.name)
        assert key in pins, "requirements/docker.txt does not pin %s for %s" % (dep.name, arch)
        version = _pinned_version(pins[key])
        assert dep.specifier.contains(version, prereleases=True), (
            "%s==%s (%s) is outside pyproject's %s" % (dep.name, version, arch, dep.specifier)
        )


def test_torch_pins_agree_with_the_makefile_and_dockerfile_comments() -> None:
    makefile = _makefile_torch_pins()
    for arch in ARCHES:
        pins = _pins_for(arch)
        for name, version in makefile[arch].items():
            assert str(_pinned_version(pins[name])) == version, (name, arch)
    assert makefile["aarch64"] == {"torch": "2.9.1", "torchvision": "0.24.1"}
    for dockerfile, arch in (("Dockerfile", "x86_64"), ("Dockerfile_M1", "aarch64")):
        for name, version in re.findall(r"\b(torch|torchvision)==([\w.+]+)", (ROOT / dockerfile).read_text()):
            assert makefile[arch][name] == version, "%s mentions %s==%s" % (dockerfile, name, version)


def test_environment_yml_lists_every_dependency_with_pyproject_bounds() -> None:
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "sam2-refine-worker"
    assert env["channels"][0] == "conda-forge"
    conda_specs = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "python=3.11" in conda_specs
    assert "-e ." in pip_specs or "." in pip_specs, "the environment installs this worker"

    conda_bounds: dict[str, SpecifierSet] = {}
    for spec in conda_specs:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(\[(?P<br>[^\]]*)\])?\s*(?P<ver>[<>=!~][^ ]*)?", spec)
        assert match, spec
        version = match.group("ver") or ""
        bracket = re.search(r"version\s*=\s*'([^']*)'", match.group("br") or "")
        if bracket:
            version = bracket.group(1)
        # conda's "=3.11" (a prefix match) has no PEP 440 twin; only python uses it here.
        is_prefix_match = re.match(r"=[^=]", version) is not None
        conda_bounds[canonicalize_name(match.group(1))] = (
            SpecifierSet(version) if version and not is_prefix_match else SpecifierSet()
        )
    pip_bounds = {canonicalize_name(Requirement(s).name): Requirement(s).specifier
                  for s in pip_specs if not s.startswith("-") and s != "."}
    conda_name = {"torch": "pytorch", "opencv-python-headless": "py-opencv"}
    for dep in _pyproject_deps():
        key = canonicalize_name(dep.name)
        if key in pip_bounds:
            bounds = pip_bounds[key]
        else:
            cname = conda_name.get(key, key)
            assert cname in conda_bounds, "environment.yml lacks %s" % dep.name
            bounds = conda_bounds[cname]
        assert bounds == dep.specifier, "environment.yml: %s%s, pyproject: %s" % (dep.name, bounds, dep.specifier)


# --- linters --------------------------------------------------------------------------------


def _shell_scripts() -> list[Path]:
    candidates = [BUILD_SCRIPT, ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh")),
                  *sorted(ROOT.glob("*.sh"))]
    seen: list[Path] = []
    for path in candidates:
        if path.is_file() and path not in seen:
            seen.append(path)
    return seen


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path) -> None:
    shellcheck = _require_tool("shellcheck")
    result = subprocess.run([shellcheck, "--external-sources", str(script)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint() -> None:
    hadolint = _require_tool("hadolint")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "Dockerfile", "Dockerfile_M1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_ignores_only_the_justified_rules() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert set(config.get("ignored", [])) <= {"DL3008", "DL3048"}


# --- build_workers.sh -----------------------------------------------------------------------


def _fake_bin(tmp_path: Path, *, arch: str = "x86_64", docker_info_rc: int | None = 1,
              docker_build_rc: int = 0) -> tuple[Path, Path]:
    """A bin directory with a fake ``uname`` and (unless docker_info_rc is None) ``docker``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker.log"
    scripts = {"uname": "#!/bin/sh\necho %s\n" % arch}
    if docker_info_rc is not None:
        scripts["docker"] = (
            '#!/bin/sh\necho "$*" >> "%s"\n'
            'case "$1" in info) exit %d ;; build) exit %d ;; esac\nexit 0\n' % (log, docker_info_rc, docker_build_rc)
        )
    for name, body in scripts.items():
        path = bindir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir, log


def _run_build(bindir: Path, *args: str, isolated: bool = False) -> subprocess.CompletedProcess[str]:
    if isolated:  # only the fake bin dir plus the few tools the script needs
        for tool in ("dirname", "basename", "cat"):
            real = shutil.which(tool)
            assert real
            (bindir / tool).symlink_to(real)
        path = str(bindir)
    else:
        path = "%s%s%s" % (bindir, os.pathsep, os.environ.get("PATH", ""))
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run([bash, str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path}, cwd=bindir.parent)


def test_build_script_is_executable_bash_with_strict_mode() -> None:
    assert os.access(BUILD_SCRIPT, os.X_OK)
    text = BUILD_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_build_script_help(tmp_path: Path) -> None:
    bindir, log = _fake_bin(tmp_path)
    result = _run_build(bindir, "--help")
    assert result.returncode == 0
    for option in ("--no-cache", "--tag", "--checkpoints", "--dry-run", "--help", worker_info.DEFAULT_IMAGE_NAME):
        assert option in result.stdout
    assert not log.exists()


@pytest.mark.parametrize("value", ["huge", "tiny,huge", "", "tiny,", ",tiny", "tiny,,small", "Tiny"])
def test_build_script_rejects_bad_checkpoints(tmp_path: Path, value: str) -> None:
    bindir, log = _fake_bin(tmp_path, docker_info_rc=0)
    result = _run_build(bindir, "--checkpoints", value, "--dry-run")
    assert result.returncode == 2
    assert "error:" in result.stderr and "checkpoint" in result.stderr
    assert result.stdout == ""
    assert not log.exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--tag"], ["--checkpoints"], ["--tag", ""]])
def test_build_script_rejects_bad_usage(tmp_path: Path, args: list[str]) -> None:
    bindir, log = _fake_bin(tmp_path, docker_info_rc=0)
    result = _run_build(bindir, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:")
    assert not log.exists()


def test_build_script_dry_run_defaults(tmp_path: Path) -> None:
    bindir, log = _fake_bin(tmp_path)  # an engine that is down: --dry-run does not need it
    result = _run_build(bindir, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "docker", "build", "--file", str(ROOT / "Dockerfile"), "--tag", worker_info.DEFAULT_IMAGE_NAME, str(ROOT),
    ]
    assert not log.exists()


@pytest.mark.parametrize("arch, dockerfile", [("x86_64", "Dockerfile"), ("amd64", "Dockerfile"),
                                              ("arm64", "Dockerfile_M1"), ("aarch64", "Dockerfile_M1")])
def test_build_script_dry_run_options(tmp_path: Path, arch: str, dockerfile: str) -> None:
    bindir, _log = _fake_bin(tmp_path, arch=arch)
    result = _run_build(bindir, "--no-cache", "--tag", "me/sam2:dev", "--checkpoints", "tiny,small", "--dry-run")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:2] == ["docker", "build"]
    assert argv[argv.index("--file") + 1] == str(ROOT / dockerfile)
    assert argv[argv.index("--tag") + 1] == "me/sam2:dev"
    assert "--no-cache" in argv
    assert argv[argv.index("--build-arg") + 1] == "CHECKPOINTS=tiny,small"
    assert argv[-1] == str(ROOT)
    result = _run_build(bindir, "--checkpoints=large", "--tag=x:y", "--dry-run")
    argv = shlex.split(result.stdout)
    assert argv[argv.index("--build-arg") + 1] == "CHECKPOINTS=large"
    assert argv[argv.index("--tag") + 1] == "x:y"


def test_build_script_unsupported_architecture(tmp_path: Path) -> None:
    bindir, _log = _fake_bin(tmp_path, arch="ppc64le")
    result = _run_build(bindir, "--dry-run")
    assert result.returncode == 1
    assert "unsupported architecture 'ppc64le'" in result.stderr


def test_build_script_without_a_docker_engine(tmp_path: Path) -> None:
    bindir, log = _fake_bin(tmp_path, docker_info_rc=1)
    result = _run_build(bindir)
    assert result.returncode == 1
    assert "no Docker engine is reachable" in result.stderr
    assert log.read_text().split("\n")[0] == "info"
    assert "build" not in log.read_text()


def test_build_script_without_the_docker_command(tmp_path: Path) -> None:
    bindir, _log = _fake_bin(tmp_path, docker_info_rc=None)
    result = _run_build(bindir, isolated=True)
    assert result.returncode == 1
    assert "docker command is not installed" in result.stderr


def test_build_script_runs_docker_build(tmp_path: Path) -> None:
    bindir, log = _fake_bin(tmp_path, docker_info_rc=0)
    result = _run_build(bindir, "--checkpoints", "small")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "info"
    assert calls[1] == "build --file %s --tag %s --build-arg CHECKPOINTS=small %s" % (
        ROOT / "Dockerfile", worker_info.DEFAULT_IMAGE_NAME, ROOT)


def test_build_script_reports_a_failed_build(tmp_path: Path) -> None:
    bindir, _log = _fake_bin(tmp_path, docker_info_rc=0, docker_build_rc=3)
    result = _run_build(bindir)
    assert result.returncode == 1
    assert "docker build failed" in result.stderr


def test_build_script_checkpoint_names_match_the_download_script() -> None:
    text = BUILD_SCRIPT.read_text()
    match = re.search(r"ALL_CHECKPOINTS=\(([^)]*)\)", text)
    assert match and match.group(1).split() == ALL_CHECKPOINTS
    script = (ROOT / "scripts" / "download_checkpoints.py").read_text()
    assert 'MODELS: Tuple[str, ...] = ("tiny", "small", "base_plus", "large")' in script
