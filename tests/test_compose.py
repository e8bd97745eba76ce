"""docker-compose.yml, docker-compose.cpu.yml, the Dockerfile, and the health-check CLI.

No Docker engine runs on the test machines, so the compose files are checked without
starting them: each file is read with yaml, Compose's variable substitution and
override merging are reproduced for the small subset the files use, and then

  - every tandem service's `command` goes through the real `tandem` argument parser
    (the image's ENTRYPOINT is `tandem`, so `command` is exactly its argv);
  - ports line up: --port with the published/exposed ports and the healthchecks;
  - the wiring is right: --redis-url points at the redis service, --advertise-host is
    the compose service name (the name other containers resolve), dependencies exist
    and are waited for in a way that can succeed;
  - GPU services reserve distinct GPUs and address theirs as cuda:0; the CPU override
    swaps only --device/--kv-transport and drops the reservation.

`protos.health_check`, which the service healthchecks run, is tested for real against an
in-process gRPC server.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
TANDEM_SERVICES = ("make-model", "prefill", "decode", "gateway")  # run the tandem image
ENGINE_SERVICES = ("prefill", "decode")  # run an engine: GPU in the base file
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


# --------------------------------------------------------------------------------------
# Reading compose files the way Compose does (the subset these files use)


class Reset:
    """Compose's `!reset` tag: the override removes the attribute."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
_ComposeLoader.add_constructor("!override", lambda loader, node: (
    loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
    else loader.construct_scalar(node)))

# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, missing: list[str]):
    """Substitute variables as Compose does with an empty environment: each takes its
    default. A variable without a default is recorded in `missing` (`docker compose up`
    without a .env would then pass an empty string)."""
    if isinstance(value, dict):
        return {k: interpolate(v, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, missing) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        if m.group(1):
            return "$"
        if m.group(3) is not None:
            return m.group(4)
        missing.append(m.group(2) or m.group(5))
        return ""

    return _VAR.sub(repl, value)


# Attributes an override replaces instead of merging (Compose's merge rules).
_REPLACED = {"command", "entrypoint"}


def merge(base, override, key: str = ""):
    """Compose's merge of an override file: mappings merge key by key, `command` and
    `entrypoint` (and `healthcheck.test`) are replaced, other sequences are appended,
    `!reset` removes the attribute."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out and k not in _REPLACED and not (key == "healthcheck" and k == "test"):
                out[k] = merge(out[k], v, k)
            else:
                out[k] = v
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def load(*files: Path) -> dict:
    doc: dict = {}
    for f in files:
        doc = merge(doc, yaml.load(f.read_text(), Loader=_ComposeLoader))
    missing: list[str] = []
    doc = interpolate(doc, missing)
    assert not missing, f"{[str(f.name) for f in files]}: variables without a default: {missing} " \
                        "(write ${VAR:-default} so the stack starts without a .env file)"
    return doc


VARIANTS = {"gpu": (COMPOSE,), "cpu": (COMPOSE, COMPOSE_CPU)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> tuple[str, dict]:
    return request.param, load(*VARIANTS[request.param])


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return load(COMPOSE, COMPOSE_CPU)


@pytest.fixture(scope="module")
def parser():
    from launcher.main import build_parser

    return build_parser()


def parse(parser, name: str, svc: dict):
    """The service's command through the real `tandem` parser (ENTRYPOINT ["tandem"])."""
    cmd = svc.get("command")
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), \
        f"service {name}: `command` must be a list of strings (exec form), got {cmd!r}"
    try:
        args = parser.parse_args(cmd)
    except SystemExit:
        pytest.fail(f"service {name}: `tandem {shlex.join(cmd)}` does not parse (see argparse's message above)")
    assert args.command == cmd[0]
    return args


def health_test(name: str, svc: dict) -> list[str]:
    hc = svc.get("healthcheck")
    assert hc and isinstance(hc.get("test"), list), f"service {name}: needs a healthcheck with a `test` list"
    assert hc["test"][0] == "CMD", f"service {name}: healthcheck test should be exec form ['CMD', ...]"
    return hc["test"][1:]


# --------------------------------------------------------------------------------------
# The commands


def test_services_are_all_there(variant):
    name, doc = variant
    expected = {"redis", *TANDEM_SERVICES}
    assert expected <= set(doc["services"]), f"{name}: missing services {expected - set(doc['services'])}"


def test_every_tandem_command_parses(variant, parser):
    _, doc = variant
    for name in TANDEM_SERVICES:
        svc = doc["services"][name]
        assert str(svc.get("image", "")).startswith("tandem:"), f"service {name}: should run the tandem image"
        assert svc.get("build", {}).get("context") == ".", f"service {name}: should build from the repo's Dockerfile"
        args = parse(parser, name, svc)
        expected = {"make-model": "make-model", "gateway": "gateway"}.get(name, name)
        assert args.command == expected, f"service {name}: runs `tandem {args.command}`, expected `{expected}`"


def test_make_model_guard_still_runs_tandem(gpu, parser):
    """make-model wraps `tandem make-model` in a shell guard (skip when the folder is there);
    the guard must hand its command line to tandem untouched."""
    svc = gpu["services"]["make-model"]
    entry = svc["entrypoint"]
    assert entry[:2] == ["sh", "-c"] and len(entry) == 4, \
        "make-model: entrypoint should be ['sh', '-c', SCRIPT, '$0'] so `command` becomes \"$@\""
    script = entry[2]
    assert 'exec tandem "$@"' in script, "make-model: the guard script must end in exec tandem \"$@\""
    args = parse(parser, "make-model", svc)
    from launcher.make_model import PRESETS

    assert args.preset in PRESETS, f"make-model: unknown preset {args.preset!r} (have {sorted(PRESETS)})"
    model = svc["environment"]["MODEL"]
    assert args.out == model, f"make-model: --out {args.out} should be the default MODEL folder {model}"
    assert args.out in script, f"make-model: the guard should only make the default folder {args.out}"
    assert svc.get("restart") == "no", "make-model is one-shot: restart must be \"no\""


def test_all_services_load_the_same_model(variant, parser):
    _, doc = variant
    models = {n: parse(parser, n, doc["services"][n]).model for n in ("prefill", "decode", "gateway")}
    assert len(set(models.values())) == 1, f"services load different models: {models}"
    model = next(iter(models.values()))
    assert model == doc["services"]["make-model"]["environment"]["MODEL"], \
        f"make-model checks {doc['services']['make-model']['environment']['MODEL']}, services load {model}"
    for name in TANDEM_SERVICES:
        mounts = [v.split(":") for v in doc["services"][name].get("volumes", [])]
        assert any(m[1] == "/models" for m in mounts), f"service {name}: needs the models volume at /models"
        assert model.startswith("/models/"), f"MODEL {model} should be a folder in the /models volume"


# --------------------------------------------------------------------------------------
# Ports and healthchecks


def test_gateway_ports_and_healthcheck(variant, parser):
    _, doc = variant
    svc = doc["services"]["gateway"]
    args = parse(parser, "gateway", svc)
    assert args.host == "0.0.0.0", "gateway: --host must be 0.0.0.0 to be reachable through published ports"
    published = {}
    for p in svc.get("ports", []):
        host_port, _, container_port = str(p).rpartition(":")
        published[int(container_port)] = host_port
    assert args.port in published, f"gateway: --port {args.port} is not a published container port {sorted(published)}"
    assert args.grpc_port in published, f"gateway: --grpc-port {args.grpc_port} is not published {sorted(published)}"
    test = health_test("gateway", svc)
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    assert len(urls) == 1, f"gateway: healthcheck should fetch one URL, found {urls}"
    url = urlparse(urls[0])
    assert url.port == args.port and url.path == "/health", \
        f"gateway: healthcheck fetches {urls[0]}, expected port {args.port} and path /health"


@pytest.mark.parametrize("name", ENGINE_SERVICES)
def test_service_ports_and_healthchecks(variant, parser, name):
    _, doc = variant
    svc = doc["services"][name]
    args = parse(parser, name, svc)
    assert args.host == "0.0.0.0", f"{name}: --host must be 0.0.0.0 so other containers can connect"
    test = health_test(name, svc)
    assert test[:3] == ["python", "-m", "protos.health_check"], \
        f"{name}: healthcheck should run `python -m protos.health_check HOST:PORT`, got {test}"
    host, _, port = test[3].rpartition(":")
    assert int(port) == args.port, f"{name}: healthcheck asks port {port}, the service listens on --port {args.port}"
    exposed = {int(p) for p in svc.get("expose", [])}
    wanted = {args.port} | ({args.kv_port} if name == "decode" else set())
    assert wanted <= exposed, f"{name}: expose {sorted(exposed)} should list its ports {sorted(wanted)}"
    if name == "decode":
        assert args.kv_port, "decode: give --kv-port a fixed port (an ephemeral one cannot be documented)"
    # The health-check CLI must accept the healthcheck's arguments.
    from protos import health_check

    with pytest.raises(SystemExit) as e:
        health_check.main(["--help"])
    assert e.value.code == 0
    hc_timeout = float(test[test.index("--timeout") + 1]) if "--timeout" in test else 5.0
    limit = _seconds(svc["healthcheck"].get("timeout", "30s"))
    assert hc_timeout + 2 < limit, \
        f"{name}: health_check --timeout {hc_timeout} (+2 s for one attempt) should fit in the healthcheck timeout {limit} s"


def _seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration)):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_graceful_stop_fits(variant):
    """The services drain for up to 30 s on SIGTERM; Docker's default 10 s would SIGKILL them."""
    _, doc = variant
    for name in ("prefill", "decode", "gateway"):
        grace = _seconds(doc["services"][name].get("stop_grace_period", "10s"))
        assert grace > 30, f"{name}: stop_grace_period {grace} s is shorter than the 30 s drain"


# --------------------------------------------------------------------------------------
# Wiring: Redis, advertised names, start order


def test_redis_url_points_at_the_redis_service(variant, parser):
    _, doc = variant
    redis = doc["services"]["redis"]
    assert str(redis.get("image", "")).startswith("redis:"), "redis: use the official redis image"
    assert health_test("redis", redis) == ["redis-cli", "ping"], "redis: healthcheck should be `redis-cli ping`"
    for name in ("prefill", "decode", "gateway"):
        url = urlparse(parse(parser, name, doc["services"][name]).redis_url or "")
        assert url.scheme == "redis" and url.hostname == "redis" and (url.port or 6379) == 6379, \
            f"{name}: --redis-url should be redis://redis:6379/N (the redis service), got {url.geturl()!r}"


def test_advertised_hosts_are_service_names(variant, parser):
    """Gateways and prefill reach an instance at --advertise-host: on the compose network
    that name resolves only if it is the service name."""
    _, doc = variant
    ids = {}
    for name in ENGINE_SERVICES:
        args = parse(parser, name, doc["services"][name])
        assert args.advertise_host == name, f"{name}: --advertise-host {args.advertise_host!r} should be {name!r}"
        ids[name] = args.instance_id
    assert all(ids.values()) and len(set(ids.values())) == len(ids), f"instance ids must be set and distinct: {ids}"


def test_dependencies_exist_and_can_be_waited_for(variant):
    _, doc = variant
    services = doc["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on should be a mapping with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name}: depends on {dep!r}, which is not a service"
            cond = spec.get("condition")
            if cond == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck"
            elif cond == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{name}: waits for one-shot {dep}, which must not restart"
            else:
                pytest.fail(f"{name}: depends_on {dep} with condition {cond!r}: wait for healthy (or completed)")

    def healthy(name, dep):
        return services[name]["depends_on"].get(dep, {}).get("condition") == "service_healthy"

    for name in ("prefill", "decode", "gateway"):
        assert healthy(name, "redis"), f"{name}: should wait for redis to be healthy"
        assert services[name]["depends_on"].get("make-model", {}).get("condition") == "service_completed_successfully", \
            f"{name}: should wait for make-model to finish"
    for dep in ENGINE_SERVICES:
        assert healthy("gateway", dep), f"gateway: should wait for {dep} to be healthy"


# --------------------------------------------------------------------------------------
# GPU and CPU variants


def gpu_ids(svc: dict) -> list[str]:
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    ids = []
    for d in devices:
        assert d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []), f"bad GPU reservation {d}"
        ids += [str(i) for i in d.get("device_ids", [])]
    return ids


def test_gpu_services_reserve_distinct_gpus(gpu, parser):
    ids = {}
    for name in ENGINE_SERVICES:
        svc = gpu["services"][name]
        ids[name] = gpu_ids(svc)
        assert len(ids[name]) == 1, f"{name}: should reserve exactly one GPU by id, got {ids[name]}"
        args = parse(parser, name, svc)
        # The container sees only its reserved GPU, renumbered from 0.
        assert args.device == "cuda:0", f"{name}: --device should be cuda:0 (its only visible GPU), got {args.device}"
        assert args.kv_transport == "nccl", f"{name}: GPUs move KV with --kv-transport nccl, got {args.kv_transport}"
    flat = [i for v in ids.values() for i in v]
    assert len(set(flat)) == len(flat), f"prefill and decode must not share a GPU (NCCL cannot pair a GPU with itself): {ids}"
    for name in ("redis", "make-model", "gateway"):
        assert not gpu_ids(gpu["services"][name]), f"{name}: needs no GPU"
    assert gpu["services"]["prefill"]["build"]["args"]["TORCH_INDEX_URL"] != CPU_TORCH_INDEX, \
        "the GPU stack should build CUDA torch"


def test_cpu_override_swaps_only_device_and_transport(gpu, cpu, parser):
    for name in ENGINE_SERVICES:
        c, g = cpu["services"][name], gpu["services"][name]
        assert not gpu_ids(c) and "deploy" not in c, f"{name}: the CPU override must drop the GPU reservation"
        args = parse(parser, name, c)
        assert args.device == "cpu" and args.kv_transport == "tcp", \
            f"{name}: CPU variant should run --device cpu --kv-transport tcp, got {args.device} {args.kv_transport}"
        # Apart from those two values the commands must not drift apart.
        expected = [{"cuda:0": "cpu", "nccl": "tcp"}.get(a, a) for a in g["command"]]
        assert c["command"] == expected, f"{name}: CPU command differs from the GPU one beyond --device/--kv-transport:\n" \
                                         f"  cpu {c['command']}\n  gpu {g['command']}"
        assert c["healthcheck"] == g["healthcheck"] and c["depends_on"] == g["depends_on"]
    for name in TANDEM_SERVICES:
        svc = cpu["services"][name]
        assert svc["build"]["args"]["TORCH_INDEX_URL"] == CPU_TORCH_INDEX, f"{name}: the CPU stack should build CPU torch"
        assert svc["image"] != gpu["services"][name]["image"], f"{name}: the CPU image should not overwrite the GPU tag"


# --------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_and_runs_tandem():
    import json

    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.12-slim"), f"Dockerfile should start FROM python:3.12-slim, got {ins[0]}"
    args = dict(a[1].split("=", 1) for a in ins if a[0] == "ARG" and "=" in a[1])
    assert args.get("TORCH_INDEX_URL") == CPU_TORCH_INDEX, f"ARG TORCH_INDEX_URL should default to {CPU_TORCH_INDEX}"
    runs = [r for op, r in ins if op == "RUN"]
    torch_at = next((i for i, r in enumerate(runs) if "--index-url" in r and "TORCH_INDEX_URL" in r and "torch" in r), None)
    assert torch_at is not None, "Dockerfile: install torch with --index-url ${TORCH_INDEX_URL}"
    project_at = next((i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*[\"']?\.(\[[^\]]*\])?[\"']?(\s|$)", r)), None)
    assert project_at is not None, "Dockerfile: should `pip install .` (the project)"
    assert torch_at < project_at, "Dockerfile: torch must be installed before the project (else pip pulls CUDA torch)"
    # The --no-deps packages: the same pins as the Makefile, so `make` and the image agree.
    make_pins = set(re.search(r"install --no-deps (.+)", (ROOT / "Makefile").read_text()).group(1).split())
    no_deps = [m.group(1) for r in runs for m in [re.search(r"install --no-deps ([^&;]+)", r)] if m]
    assert len(no_deps) == 1, f"Dockerfile: expected one `pip install --no-deps ...`, found {no_deps}"
    docker_pins = set(no_deps[0].split())
    assert make_pins == docker_pins, f"--no-deps packages differ: Makefile {make_pins}, Dockerfile {docker_pins}"
    entry = [r for op, r in ins if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["tandem"], f"Dockerfile: ENTRYPOINT should be [\"tandem\"], got {entry}"


def test_dockerignore_keeps_local_state_out():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for pattern, what in ((".venv", "the virtualenv"), ("models", "model weights"), (".git", "git history"),
                          ("__pycache__", "bytecode caches"), ("whl", "wheels")):
        assert any(pattern in ln for ln in lines), f".dockerignore should exclude {what} ({pattern})"


# --------------------------------------------------------------------------------------
# python -m protos.health_check, for real


def health_check(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protos.health_check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_health_check_cli_against_a_real_server():
    from grpc_health.v1 import health_pb2

    from protos.grpc_server import make_server

    server, port, hs = make_server("127.0.0.1", 0, lambda s: None, "tandem.test.Nothing")
    server.start()
    try:
        r = health_check(f"127.0.0.1:{port}", "--timeout", "10")
        assert r.returncode == 0, f"SERVING server: exit {r.returncode}\n{r.stderr}"
        r = health_check(f"127.0.0.1:{port}", "--service", "tandem.test.Nothing", "--timeout", "10")
        assert r.returncode == 0, f"SERVING service: exit {r.returncode}\n{r.stderr}"
        hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining server says
        r = health_check(f"127.0.0.1:{port}", "--timeout", "0.5")
        assert r.returncode == 1, f"NOT_SERVING server: exit {r.returncode}, expected 1\n{r.stderr}"
    finally:
        server.stop(0).wait()


def test_health_check_cli_on_a_closed_port_fails_fast():
    with socket.socket() as s:  # a port that was free a moment ago and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = health_check(f"127.0.0.1:{port}", "--timeout", "0.5")
    took = time.monotonic() - t0
    assert r.returncode == 1, f"closed port: exit {r.returncode}, expected 1\n{r.stderr}"
    assert "unhealthy" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert took < 8, f"closed port: took {took:.1f} s with --timeout 0.5"


def test_gateway_healthcheck_command_runs(gpu):
    """The gateway's healthcheck, as written in the compose file, exits 0 on a 200 from
    /health and non-zero on 503 (no decode instance yet). Run against a stand-in HTTP
    server on a free port, since the gateway itself needs Redis and services."""
    import http.server
    import threading

    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cmd = [re.sub(r"//localhost:\d+/", f"//127.0.0.1:{srv.server_address[1]}/", a)
               for a in health_test("gateway", gpu["services"]["gateway"])]
        assert cmd[0] == "python"
        run = lambda: subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=30)
        r = run()
        assert r.returncode == 0, f"gateway healthcheck on a 200: exit {r.returncode}\n{r.stderr}"
        status["code"] = 503
        r = run()
        assert r.returncode != 0, "gateway healthcheck on a 503 should fail"
    finally:
        srv.shutdown()
        srv.server_close()
