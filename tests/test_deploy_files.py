"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml, Prometheus config and alerts.

Static checks parse the files (no Docker daemon here). `scripts/check_deploy.sh` adds hadolint,
`docker-compose config` and promtool when those tools are installed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
PACKAGE_DIRS = ("models", "detector", "server", "neuronguard")

# The metric names the server exports (histograms also expose _bucket/_sum/_count).
def _exported_metrics() -> set[str]:
    """The series names the server's registry exports (counters with their `_total`)."""
    from neuronguard.server.metrics import Metrics

    return {f.name + "_total" if f.type == "counter" else f.name for f in Metrics().registry.collect()}


METRICS = _exported_metrics()


# --------------------------------------------------------------------------- helpers


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def stages() -> dict[str, list[tuple[str, str]]]:
    """Build stages by name (`FROM image AS name`), each with its instructions."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = [("FROM", m.group(1))]
            result[m.group(2)] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"  # global build args
        else:
            current.append((keyword, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return list(stages().values())[-1]


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"no {keyword} in the final stage"
    return values[-1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def torch_spec() -> SpecifierSet:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"torch\s*([<>=!~].*)", dep)
        if m:
            return SpecifierSet(m.group(1).replace(" ", ""))
    raise AssertionError("pyproject.toml has no torch dependency")


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: patterns anchored at the context root, `**` spans
    directories, a match on a directory excludes everything below it, `!` re-includes."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        pattern = pattern.strip("/")
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "(?:/.*)?")

    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if to_regex(pattern.lstrip("!")).fullmatch(rel):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------- Dockerfile


def test_image_runs_neuronguard_serve_on_all_interfaces():
    stage = final_stage()
    entrypoint = json.loads(last(stage, "ENTRYPOINT"))
    cmd = json.loads(last(stage, "CMD"))
    assert entrypoint[:2] == ["neuronguard", "serve"]
    assert entrypoint + cmd == ["neuronguard", "serve", "--host", "0.0.0.0"]
    assert "8000" in last(stage, "EXPOSE").split()


def test_healthcheck_probes_ready_without_curl():
    healthcheck = last(final_stage(), "HEALTHCHECK")
    assert "/ready" in healthcheck
    assert "/health" not in healthcheck.replace("/ready", "")
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert re.search(r"--start-period=\d+", healthcheck)
    assert re.search(r'CMD \["python", "-c", ', healthcheck), "exec-form python/urllib probe"
    assert "urllib.request" in healthcheck


def test_container_user_is_non_root_and_numeric():
    user = last(final_stage(), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}"
    gid = user.partition(":")[2]
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    # The user is created in the same stage with that uid.
    runs = " ".join(args for kw, args in final_stage() if kw == "RUN")
    assert f"--uid {uid}" in runs


def test_gpu_default_and_cpu_variant_bases_are_pinned_and_compatible():
    all_stages = stages()
    args = [a for kw, a in dockerfile_instructions() if kw == "ARG"]
    assert "VARIANT=cuda" in args, "GPU image is the default build"
    assert last(final_stage(), "FROM") == "base-${VARIANT}"
    assert {"base-cuda", "base-cpu"} <= set(all_stages)

    cuda_image = all_stages["base-cuda"][0][1]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", cuda_image)
    assert m, f"official PyTorch runtime image with an exact tag: {cuda_image}"
    assert Version(m.group(1)) in torch_spec(), "base torch must satisfy pyproject's torch pin"
    assert dict(a.split("=", 1) for kw, a in all_stages["base-cuda"] if kw == "ENV")[
        "NEURONGUARD_DEVICE"
    ] == "cuda"

    cpu_image = all_stages["base-cpu"][0][1]
    m = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", cpu_image)
    assert m, f"exact Python patch release and Debian suite: {cpu_image}"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert Version(m.group(1)) in requires
    cpu_stage = all_stages["base-cpu"]
    torch_arg = next(a for kw, a in cpu_stage if kw == "ARG" and a.startswith("TORCH_VERSION="))
    assert Version(torch_arg.split("=", 1)[1]) in torch_spec()
    cpu_runs = " ".join(a for kw, a in cpu_stage if kw == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_runs and "torch==${TORCH_VERSION}+cpu" in cpu_runs

    for name, stage in all_stages.items():
        image = stage[0][1]
        if image.startswith("base-"):
            continue
        assert ":" in image and not image.endswith(":latest"), f"stage {name}: unpinned {image}"


def test_package_installed_with_pinned_constraints_and_runtime_settings_from_env():
    stage = final_stage()
    installs = [a for kw, a in stage if kw == "RUN" and "pip install" in a]
    assert installs and all("-c constraints.txt" in a for a in installs)
    # The base image's torch is pinned so pip never swaps it for another build.
    assert all("-c /tmp/torch-pin.txt" in a for a in installs)
    env = " ".join(a for kw, a in stage if kw == "ENV")
    for expected in ("HF_HOME=/data/hf-cache", "NEURONGUARD_HOST=0.0.0.0", "NEURONGUARD_PORT=8000"):
        assert expected in env
    copies = [a for kw, a in stage if kw == "COPY"]
    assert ". ." in copies, "the repo (with the built-in organism) is copied into the image"


def test_dockerignore_keeps_local_state_out_and_the_package_in():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "models/__pycache__/x.pyc", ".pytest_cache/v",
                 "volumes/models/llama/model.safetensors", ".env"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    needed = ["pyproject.toml", "constraints.txt", "README.md"]
    for pkg in PACKAGE_DIRS:
        needed += [
            str(p.relative_to(ROOT))
            for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    leaked = [p for p in needed if dockerignored(p, patterns)]
    assert not leaked, f".dockerignore drops files the image needs: {leaked[:10]}"


def test_organism_files_are_package_data():
    """The image installs the package non-editable, so every data file of the built-in organism
    (weights, tokenizer, bundle) must match a package-data pattern or it is missing at run time."""
    organism = ROOT / "models" / "organism"
    if not organism.is_dir():
        pytest.skip("models/organism/ not in the tree yet")
    patterns = [p for pats in pyproject()["tool"]["setuptools"]["package-data"].values() for p in pats]
    missing = [
        str(p.relative_to(ROOT))
        for p in organism.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(organism).parts)  # git/ignore files, build temp dirs
        and p.suffix not in {".py", ".pyc"}
        and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    ]
    assert not missing, f"not covered by [tool.setuptools.package-data]: {missing[:10]}"


# --------------------------------------------------------------------------- compose


def test_compose_gpu_service_with_healthcheck_volumes_and_env():
    svc = compose()["services"]["neuronguard"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert svc["build"]["args"]["VARIANT"] == "cuda"

    hc = svc["healthcheck"]
    test = hc["test"] if isinstance(hc["test"], str) else " ".join(hc["test"])
    assert "/ready" in test and "curl" not in test
    assert hc.get("start_period") and hc.get("retries")

    env = svc["environment"]
    assert env["NEURONGUARD_DEVICE"] == "cuda" and env["HF_HOME"] == "/data/hf-cache"
    port = str(env["NEURONGUARD_PORT"])
    assert f":{port}/ready" in test
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])
    # Model and bundle paths are set from .env/the shell, not hard-coded.
    for key in ("NEURONGUARD_MODEL", "NEURONGUARD_BUNDLE", "NEURONGUARD_API_KEYS"):
        assert key in env and env[key] is None

    def target(volume: str) -> str:  # SOURCE:TARGET[:MODE]; SOURCE may hold ${VAR:-default}
        parts = volume.rsplit(":", 2)
        return parts[1] if parts[-1] in {"ro", "rw"} else parts[-1]

    targets = {target(v) for v in svc["volumes"]}
    assert {"/models", "/bundles", "/data/hf-cache"} <= targets
    assert "hf-cache" in compose()["volumes"]
    assert svc.get("shm_size") or svc.get("ipc") == "host"


def settings_variables() -> set[str]:
    from neuronguard.server.settings import Settings

    return {f"NEURONGUARD_{name.upper()}" for name in Settings.model_fields}


def test_compose_passes_every_setting_through():
    env = compose()["services"]["neuronguard"]["environment"]
    assert settings_variables() <= set(env), settings_variables() - set(env)
    assert compose()["services"]["neuronguard"]["stop_grace_period"]  # longer than the server's drain


def doc_examples() -> tuple[dict[str, str], dict[str, str]]:
    """(the `.env` example, the real checkpoint's `docker run -e` variables) of docs/deployment.md."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    dotenv_block = re.search(r"```sh\n# \.env\n(.*?)```", text, re.S)
    assert dotenv_block, "docs/deployment.md has no .env example"
    dotenv = dict(line.split("=", 1) for line in dotenv_block.group(1).splitlines() if line.startswith("NEURONGUARD_"))
    run = dict(m.split("=", 1) for m in re.findall(r"-e (NEURONGUARD_[A-Z_]+=\S+)", text))
    return dotenv, run


def test_deployment_examples_set_the_patch_source_and_only_real_settings():
    """The default patch source is the organism's twin: a real model without this variable cannot start."""
    known = settings_variables() | {"NEURONGUARD_MODELS_DIR", "NEURONGUARD_BUNDLES_DIR"}
    for example in doc_examples():
        assert example.get("NEURONGUARD_PATCH_SOURCE") and example.get("NEURONGUARD_MODEL")
        assert set(example) <= known, set(example) - known
    readme_env = re.search(r"cat > \.env <<EOF\n(.*?)\nEOF", (ROOT / "README.md").read_text(), re.S)
    assert readme_env and "NEURONGUARD_PATCH_SOURCE=" in readme_env.group(1)


def test_deployment_settings_table_lists_every_setting():
    text = (ROOT / "docs" / "deployment.md").read_text().split("## Settings", 1)[1]
    documented = set(re.findall(r"^\| `(NEURONGUARD_[A-Z_]+)` \|", text, re.M))
    assert documented == settings_variables()


def test_compose_prometheus_pinned_and_mounts_config():
    prom = compose()["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_prometheus_scrapes_neuronguard_and_loads_alerts():
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "neuronguard")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert ["neuronguard:8000"] == [t for sc in job["static_configs"] for t in sc["targets"]]


def test_alert_rules_cover_block_spike_latency_and_availability():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "NeuronGuardBlockRateSpike",
        "NeuronGuardP99LatencyHigh",
        "NeuronGuardNotReady",
        "NeuronGuardTargetDown",
    } <= set(alerts)
    assert 'up{job="neuronguard"}' in alerts["NeuronGuardTargetDown"]["expr"]
    assert "histogram_quantile(0.99" in alerts["NeuronGuardP99LatencyHigh"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    # Every metric the rules use is one the server exports (catches renames and typos).
    text = (PROM_DIR / "alerts.yml").read_text()
    used = set(re.findall(r"\bneuronguard_[a-z_]+", text))
    unknown = {m for m in used if re.sub(r"_(bucket|sum|count)$", "", m) not in METRICS}
    assert not unknown, f"alert rules use metrics the server does not export: {unknown}"


# --------------------------------------------------------------------------- linters


def test_check_deploy_script():
    tools = {
        "hadolint": shutil.which("hadolint") or (ROOT / ".venv/bin/hadolint").exists(),
        "promtool": shutil.which("promtool"),
        "docker-compose": shutil.which("docker-compose"),
    }
    absent = [name for name, found in tools.items() if not found]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (scripts/install_system_deps.sh)")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_deploy.sh")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- CLI and app


def test_image_command_and_healthcheck_exist_in_cli_and_app():
    """The image runs `neuronguard serve --host 0.0.0.0` and probes GET /ready: both must exist."""
    from neuronguard.cli import build_parser

    parser = build_parser()
    subcommands = {
        name
        for action in parser._subparsers._group_actions  # argparse keeps no public accessor
        for name in action.choices
    }
    assert "serve" in subcommands
    cmd = json.loads(last(final_stage(), "CMD"))
    args = parser.parse_args(["serve", *cmd])
    assert args.command == "serve" and args.host == "0.0.0.0"

    from neuronguard.server.app import create_app
    from neuronguard.server.settings import Settings

    paths = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/ready", "/health", "/metrics"} <= paths
