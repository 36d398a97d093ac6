"""The deployment files: docker-compose.yml validates and keeps its contract; the images keep theirs.

``docker-compose config -q`` runs Debian's docker-compose 1.29 (``apt-get install
docker-compose``) on the root file; there is no Docker engine here, so building
and running the images is out of reach, and the Dockerfiles are checked as text
for the house rules (multi-stage, dependencies before code, non-root,
healthcheck, no weights).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"  # one file, two targets: service and train


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian's 1.29 package) is not installed: apt-get install -y docker-compose")
    # the host variables are left to their defaults, as on a fresh GPU host
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSTAR_")}
    for profiles in ([], ["--profile", "train", "--profile", "histories", "--profile", "loadtest"]):
        out = subprocess.run(
            [binary, "-f", str(COMPOSE), *profiles, "config", "-q"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    return yaml.safe_load(COMPOSE.read_text())


def test_redis_persists_and_has_a_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-data" in compose["volumes"]


def test_redis_healthcheck_fails_on_an_error_reply(compose: dict[str, Any], tmp_path: Path) -> None:
    """While Redis reads its AOF back, PING answers ``LOADING`` (an error reply), and redis-cli exits 0 on error
    replies unless given ``-e``: the api, waiting for a healthy redis, would start against one that cannot serve
    histories yet. A refused PING (NOAUTH) is the same kind of error reply, on a local redis-server."""
    test = compose["services"]["redis"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "redis-cli"] and "-e" in test, test
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server / redis-cli are not installed: apt-get install -y redis-server")
    port = free_port()
    redis = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "pw", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe = [cli, "-h", "127.0.0.1", "-p", str(port), *test[2:]]  # the healthcheck's command, against this server
        for _ in range(100):
            out = subprocess.run(probe, capture_output=True, text=True, timeout=10)
            if "NOAUTH" in out.stdout + out.stderr:
                break
            time.sleep(0.05)  # not listening yet
        assert "NOAUTH" in out.stdout + out.stderr and out.returncode != 0, (out.returncode, out.stdout, out.stderr)
        authed = [cli, "-h", "127.0.0.1", "-p", str(port), "--no-auth-warning", "-a", "pw", *test[2:]]
        assert subprocess.run(authed, capture_output=True, timeout=10).returncode == 0
    finally:
        redis.terminate()
        redis.wait(timeout=10)


def test_api_waits_for_redis_reserves_a_gpu_and_mounts_checkpoints(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert "checkpoints:/checkpoints:ro" in api["volumes"] and "checkpoints" in compose["volumes"]
    env = api["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert env["VSTAR_CHECKPOINT"].startswith("/checkpoints/")
    assert "ports" not in api, "replicas publish no host port; the load balancer does"


def test_published_port_is_loopback_unless_bound_wider(compose: dict[str, Any]) -> None:
    """As the READMEs say: the balancer answers on 127.0.0.1:8080; VSTAR_HTTP_BIND=0.0.0.0 opens it wider."""
    assert compose["services"]["lb"]["ports"] == ["${VSTAR_HTTP_BIND:-127.0.0.1}:${VSTAR_HTTP_PORT:-8080}:80"]
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian's 1.29 package) is not installed: apt-get install -y docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSTAR_")}
    out = subprocess.run([binary, "-f", str(COMPOSE), "config"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "127.0.0.1:8080:80" in out.stdout or re.search(r"host_ip: 127\.0\.0\.1", out.stdout), out.stdout


def test_api_requires_api_keys_in_compose(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    assert env["VSTAR_REQUIRE_API_KEYS"] == "true" and env["VSTAR_API_KEYS"] == "${VSTAR_API_KEYS:-}"
    assert compose["services"]["loadtest"]["environment"]["VSTAR_LT_API_KEY"] == "${VSTAR_LT_API_KEY:-}"


def test_nginx_rate_limits_each_client_and_answers_429_in_the_error_shape() -> None:
    conf = (REPO / "docker" / "nginx.conf").read_text()
    zones = dict(re.findall(r"limit_req_zone \$(?:limit|write)_key zone=(\w+):\d+m rate=(\d+r/s);", conf))
    assert set(zones) == {"requests", "writes"}
    assert re.search(r"location / \{[^}]*limit_req zone=requests burst=\d+ nodelay;", conf)
    events = re.search(r"location ~ \^/users/\[\^/\]\+/\(events\|history\)\$ \{[^}]*\}", conf)
    assert events and "limit_req zone=writes" in events.group(0) and "limit_req zone=requests" in events.group(0)
    assert "limit_req_status 429;" in conf and '"type": "rate_limited"' in conf
    assert re.search(r"geo \$limited \{[^}]*127\.0\.0\.1 0;", conf), "loopback (the loadtest profile) is exempt"
    binary = shutil.which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed: apt-get install -y nginx-light (its -t checks the file)")
    out = subprocess.run(
        [binary, "-t", "-q", "-c", str(REPO / "docker" / "nginx.conf"), "-g", "pid /tmp/vstar-nginx-test.pid;"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_load_balancer_fronts_the_api_replicas(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in lb and lb["ports"]
    conf_mount = next(v for v in lb["volumes"] if v.endswith("nginx.conf:ro"))
    conf = (REPO / conf_mount.split(":")[0]).read_text()
    assert "resolver 127.0.0.11" in conf, "api must be re-resolved so --scale api=N is picked up"
    assert re.search(r"set \$api_upstream http://api:8000;", conf) and "proxy_pass $api_upstream;" in conf


def test_train_profile_runs_sft_then_vstar_rl_into_the_volume(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    script = " ".join(train["command"])
    sft, rl = script.index("vstar sft"), script.index("vstar rl")
    assert sft < rl and "--algo vstar" in script[rl:] and "&&" in script[sft:rl]
    # the README's recipe (SFT on train alone, RL on valid), and a rerun replaces the volume's checkpoints
    assert "--train-splits train --no-refit" in script[sft:rl] and "--train-splits valid --holdout 0" in script[rl:]
    assert "--force" in script[sft:rl] and "--force" in script[rl:]
    assert (
        "--out /checkpoints/sft" in script and "--init /checkpoints/sft" in script and "--out /checkpoints/rl" in script
    )
    assert "checkpoints:/checkpoints" in train["volumes"]
    assert train["deploy"]["resources"]["reservations"]["devices"]
    # the api serves what train writes by default
    assert compose["services"]["api"]["environment"]["VSTAR_CHECKPOINT"] == "/checkpoints/${VSTAR_SERVE_CHECKPOINT:-rl}"


def test_loadtest_profile_runs_locust_against_the_balancer_on_loopback(compose: dict[str, Any]) -> None:
    lt = compose["services"]["loadtest"]
    assert lt["profiles"] == ["loadtest"]
    assert lt["network_mode"] == "service:lb" and lt["depends_on"]["lb"]["condition"] == "service_healthy"
    assert lt["entrypoint"] == ["vstar", "loadtest"] and "--host=http://127.0.0.1:80" in lt["command"]
    # the cap the api applies by default, given so the plot draws it
    api_cap = compose["services"]["api"]["environment"]["VSTAR_VED_DEFAULT_LATENCY_MS"]
    assert f"--latency-ms=${{VSTAR_LT_LATENCY_MS:-{api_cap}}}" in lt["command"]
    # the api's response cache can be turned off from the host while the decoders are compared
    assert compose["services"]["api"]["environment"]["VSTAR_CACHE_TTL_S"] == "${VSTAR_CACHE_TTL_S:-300}"


def test_histories_profile_fills_the_apis_store_from_the_data(compose: dict[str, Any]) -> None:
    histories, api = compose["services"]["histories"], compose["services"]["api"]
    assert histories["profiles"] == ["histories"] and histories["image"] == api["image"]
    assert histories["environment"]["REDIS_URL"] == api["environment"]["REDIS_URL"]  # the store the api reads
    assert histories["depends_on"]["redis"]["condition"] == "service_healthy"
    assert histories["entrypoint"] == ["vstar", "load-histories"] and histories["command"] == ["--data=/data"]
    assert "${VSTAR_DATA_DIR:-./data/amazon-industrial}:/data:ro" in histories["volumes"]
    # the store's settings a load writes under are the api's: none set apart from the defaults
    stored = {
        k for k in api["environment"] if k.startswith(("VSTAR_STORED_HISTORY", "VSTAR_HISTORY_TTL", "VSTAR_IDEM"))
    }
    assert not stored, f"the api sets {sorted(stored)}: the histories profile must set them alike"


def test_only_profiled_services_start_by_default(compose: dict[str, Any]) -> None:
    default = {name for name, svc in compose["services"].items() if "profiles" not in svc}
    assert default == {"redis", "api", "lb"}


def stages(text: str) -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)


def stage(text: str, name: str) -> str:
    """The lines of the Dockerfile stage ``name``, up to the next ``FROM``."""
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{name}$", text, flags=re.MULTILINE | re.IGNORECASE)
    assert start, f"no stage {name}"
    end = re.search(r"^FROM\s", text[start.end() :], flags=re.MULTILINE)
    return text[start.start() : start.end() + (end.start() if end else len(text))]


def test_dockerfile_layers_nonroot() -> None:
    text = DOCKERFILE.read_text()
    assert {"builder", "runtime", "service", "train"} <= set(stages(text)), "builder, runtime and both targets"
    runtime = stage(text, "runtime")
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime and "COPY . " not in runtime
    user = re.findall(r"^USER\s+(\S+)", runtime, flags=re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    assert all(re.search(rf"^FROM runtime AS {t}$", text, flags=re.MULTILINE) for t in ("service", "train"))
    assert not re.search(r"^USER\s", stage(text, "service") + stage(text, "train"), flags=re.MULTILINE)
    # dependencies are installed from pyproject.toml before the code is copied in
    deps, code = text.index("COPY pyproject.toml"), text.index("COPY . /src")
    assert deps < text.index("pip install -r /tmp/requirements.txt") < code
    assert text.index("--index-url") < deps, "torch comes from its own index first"
    assert not re.search(
        r"^(COPY|ADD)\s.*(safetensors|checkpoints|runs|data)", text, flags=re.MULTILINE | re.IGNORECASE
    )
    assert 'VOLUME ["/checkpoints"]' in runtime


def test_service_target_probes_health_and_train_target_runs_vstar() -> None:
    text = DOCKERFILE.read_text()
    service, train = stage(text, "service"), stage(text, "train")
    assert re.search(r"^HEALTHCHECK\s.*\\$", service, flags=re.MULTILINE) and "/healthz" in service
    assert "exec vstar serve" in service and "EXPOSE 8000" in service
    assert re.search(r"^HEALTHCHECK NONE$", train, flags=re.MULTILINE), "a batch job has nothing to probe"
    assert 'ENTRYPOINT ["vstar"]' in train
    assert text.rstrip().endswith(service.rstrip()), "service last: a build without --target gives the service"


def test_service_image_cuda_by_default_cpu_by_build_arg() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, flags=re.MULTILINE)
    assert "FROM os-${VARIANT} AS os" in text and {"os-cuda", "os-cpu"} <= set(stages(text))
    assert "TORCH_CPU_INDEX_URL" in text and "TORCH_CUDA_INDEX_URL" in text
    assert "/healthz" in text


def test_dockerignore_keeps_environments_data_and_weights_out() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".git", ".venv", "runs", "data", "**/*.safetensors", "**/*.npy"} <= patterns
    assert ".env" in patterns, "compose's .env holds the API keys; COPY . /src would put it in the builder's layer"


class _Stub(http.server.BaseHTTPRequestHandler):
    """A replica stand-in: 200 ``{}`` to any GET or POST, keeping each request's path and headers."""

    seen: list[tuple[str, dict[str, str]]] = []
    server: http.server.ThreadingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, dict(self.headers)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.do_GET()

    do_DELETE = do_GET  # noqa: N815 - http.server's name

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def nginx_in_front_of_a_stub(tmp_path: Path) -> Iterator[tuple[int, type[_Stub]]]:
    """The real nginx on docker/nginx.conf (listen port and upstream swapped for local ones) in front of a stub;
    yields nginx's port and the stub's class, whose ``seen`` lists what reached the "replica" and whose ``server`` is
    the stub's server."""
    binary = shutil.which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed: apt-get install -y nginx-light")
    stub = type("Stub", (_Stub,), {"seen": []})
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), stub)
    stub.server = upstream  # a test stops it to take the "replica" away
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    conf = (REPO / "docker" / "nginx.conf").read_text()
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};").replace("access_log /dev/stdout main;", "")
    conf = conf.replace("http://api:8000;", f"http://127.0.0.1:{upstream.server_address[1]};")
    (tmp_path / "nginx.conf").write_text(conf)
    args = f"pid {tmp_path}/nginx.pid; daemon off; error_log {tmp_path}/error.log;"
    nginx = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", args])
    try:
        yield port, stub
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        upstream.shutdown()


def test_nginx_answers_429_past_a_clients_burst_and_exempts_loopback(tmp_path: Path) -> None:
    """The real nginx on docker/nginx.conf in front of a stub."""
    import httpx

    with nginx_in_front_of_a_stub(tmp_path) as (port, _):
        statuses: dict[str, list[int]] = {}
        for source in ("127.0.0.2", "127.0.0.1"):  # another client address; loopback proper
            transport = httpx.HTTPTransport(local_address=source, retries=20)
            with httpx.Client(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
                answers = [client.post("/users/u/events", json={"items": [1]}) for _ in range(40)]
            statuses[source] = [a.status_code for a in answers]
            limited = [a for a in answers if a.status_code == 429]
            if limited:
                assert limited[0].json()["error"]["type"] == "rate_limited"
                assert limited[0].headers["retry-after"] == "1"
        assert 0 < statuses["127.0.0.2"].count(200) < 40 and set(statuses["127.0.0.2"]) == {200, 429}
        assert statuses["127.0.0.1"] == [200] * 40


def test_nginx_limits_history_deletes_as_writes_and_history_reads_as_reads(tmp_path: Path) -> None:
    """DELETE /users/{id}/history is a write: past the writes' burst a client gets 429; GET on the same path is a
    read, under the requests' limit alone."""
    import httpx

    with nginx_in_front_of_a_stub(tmp_path) as (port, _):
        transport = httpx.HTTPTransport(local_address="127.0.0.2", retries=20)
        with httpx.Client(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
            reads = [client.get("/users/u/history").status_code for _ in range(40)]
            deletes = [client.delete("/users/u/history").status_code for _ in range(40)]
        assert reads == [200] * 40
        assert 0 < deletes.count(200) < 40 and set(deletes) == {200, 429}


def test_nginx_keeps_metrics_off_the_balancer(tmp_path: Path) -> None:
    """Each replica has its own counters: through the round-robin balancer a scrape would read another replica each
    time, and the published port would show them to anyone. nginx answers 404 in the error shape instead."""
    import httpx

    with nginx_in_front_of_a_stub(tmp_path) as (port, stub):
        transport = httpx.HTTPTransport(local_address="127.0.0.2", retries=20)
        with httpx.Client(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
            answers = [client.get(path) for path in ("/metrics", "/metrics?name=x", "/./metrics")]
            assert client.get("/readyz").status_code == 200  # the rest still reaches a replica
        for answer in answers:
            assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found", answer.url
        assert [path for path, _ in stub.seen] == ["/readyz"]


def test_nginx_passes_on_the_request_ids_the_service_keeps(tmp_path: Path) -> None:
    """A client's X-Request-ID reaches the replica when the service would keep it; any other is replaced by nginx's
    own (which the service keeps), so nginx's log line and the replica's name the same id."""
    import httpx

    from service.middleware import _CLIENT_ID_RE

    sent = ["trace-1.a:b_c", "x" * 64, "", "x" * 65, "has space", "semi;colon", "ünï"]
    with nginx_in_front_of_a_stub(tmp_path) as (port, stub):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=httpx.HTTPTransport(retries=20)) as client:
            for rid in sent:
                assert client.get("/readyz", headers={"X-Request-ID": rid.encode()}).status_code == 200
    passed = [{k.lower(): v for k, v in headers.items()}["x-request-id"] for _, headers in stub.seen]
    assert len(passed) == len(sent)
    for rid, got in zip(sent, passed, strict=True):
        assert _CLIENT_ID_RE.fullmatch(got), (rid, got)
        assert (got == rid) == bool(_CLIENT_ID_RE.fullmatch(rid)), (rid, got)


def test_nginx_passes_on_the_hosts_port_for_the_services_redirects(tmp_path: Path) -> None:
    """With $host the port was dropped: /readyz/ through the balancer on 127.0.0.1:8080 redirected to port 80."""
    import httpx

    with nginx_in_front_of_a_stub(tmp_path) as (port, stub):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=httpx.HTTPTransport(retries=20)) as client:
            assert client.get("/readyz").status_code == 200
    assert {k.lower(): v for k, v in stub.seen[0][1].items()}["host"] == f"127.0.0.1:{port}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nginx_own_errors_have_the_services_error_shape(tmp_path: Path) -> None:
    """What nginx answers itself (a body over its limit, no replica to take a request) is JSON in the service's
    error shape, not nginx's HTML page."""
    import httpx

    with nginx_in_front_of_a_stub(tmp_path) as (port, stub):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=httpx.HTTPTransport(retries=20)) as client:
            too_large = client.post("/recommend", content=b"x" * (1024 * 1024 + 1), headers={"content-type": "x"})
            assert client.get("/readyz").status_code == 200  # the stub is up
            stub.server.shutdown()
            stub.server.server_close()  # the port now refuses connections: a replica gone
            refused = client.post("/recommend", json={"history": [1]})
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "payload_too_large"
    assert refused.status_code == 502 and refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["type"] == "no_replica"


def with_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` read as a fresh host would (no variable set): the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def deployment_commands(compose: dict[str, Any]) -> list[list[str]]:
    """Every ``vstar`` command line the deployment files run: the train profile's script, the loadtest profile's
    entrypoint and command, the service image's CMD and the train image's example in the Dockerfile's header."""
    services = compose["services"]
    train = services["train"]
    assert train["entrypoint"] == ["sh", "-c"] and len(train["command"]) == 1
    script = with_defaults(train["command"][0]).replace("$$", "$")
    commands = [part.split() for part in script.split("&&")]
    for profiled in ("loadtest", "histories"):
        service = services[profiled]
        commands.append([*service["entrypoint"], *(with_defaults(word) for word in service["command"])])
    text = DOCKERFILE.read_text()
    cmd = re.search(r'exec (vstar serve [^"]*(?:\\"[^"]*)*)"\]', stage(text, "service"))
    assert cmd, "the service image's CMD runs vstar serve"
    commands.append(cmd.group(1).replace('\\"', "").split())
    example = re.search(r"vstar-train:cuda (sft .*)$", text, flags=re.MULTILINE)
    assert example, "the Dockerfile's header shows the train image running a command"
    commands.append(["vstar", *example.group(1).split()])
    return commands


def test_deployment_commands_are_real_vstar_commands(compose: dict[str, Any]) -> None:
    """A renamed or removed option would first fail inside a container on a GPU host (no Docker engine here):
    each command must parse against the CLI as the README's commands do (tests/test_readme_commands.py)."""
    from tests.test_readme_commands import problems_of

    commands = deployment_commands(compose)
    assert [c[:2] for c in commands] == [["vstar", "sft"], ["vstar", "rl"], ["vstar", "loadtest"],
                                         ["vstar", "load-histories"], ["vstar", "serve"], ["vstar", "sft"]]  # fmt: skip
    problems = [p for command in commands for p in problems_of(command[1:])]
    assert not problems, "\n".join(problems)


# VSTAR_* names the deployment files use that are no service setting: compose's host variables, the
# image's CMD arguments, the train profile's preset, the locustfile's options (docker/README.md lists each)
NOT_SETTINGS = {"VSTAR_PORT", "VSTAR_WORKERS", "VSTAR_PRESET", "VSTAR_DATA_DIR", "VSTAR_HTTP_BIND", "VSTAR_HTTP_PORT",
                "VSTAR_SERVE_CHECKPOINT"}  # fmt: skip


def test_every_variable_the_deployment_names_is_a_setting_or_documented(compose: dict[str, Any]) -> None:
    from service.settings import Settings

    settings = {f"VSTAR_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    docs = (REPO / "docker" / "README.md").read_text()
    for path in (COMPOSE, DOCKERFILE, REPO / "docker" / "README.md"):
        named = set(re.findall(r"\bVSTAR_[A-Z_]*[A-Z]\b", path.read_text()))
        unknown = {v for v in named - settings if not v.startswith("VSTAR_LT_")} - NOT_SETTINGS
        assert not unknown, f"{path.name}: {sorted(unknown)} are no setting of service/settings.py"
    for variable in NOT_SETTINGS:
        assert f"`{variable}`" in docs, f"docker/README.md does not say what {variable} is"


def test_the_api_environment_is_valid_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The api's variables, defaults resolved, start a service (with a key, as the README says to give one; on
    the CPU, as there is no GPU here to check ``cuda`` against)."""
    from service.settings import Settings

    for name in list(os.environ):
        if name.startswith("VSTAR_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    env = {name: with_defaults(str(value)) for name, value in compose["services"]["api"]["environment"].items()}
    assert env.pop("VSTAR_DEVICE") == "cuda" and env.pop("VSTAR_API_KEYS") == ""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VSTAR_API_KEYS", "k1")
    settings = Settings()
    assert settings.require_api_keys and settings.cache_ttl_s == 300 and settings.ved_default_latency_ms == 200
    assert str(settings.checkpoint) == "/checkpoints/rl" and settings.redis_url is not None
