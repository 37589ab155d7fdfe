"""docker-compose.yml is validated as a file (no Docker engine here): services, ports, health, commands."""

import re
from pathlib import Path

import pytest
import yaml

from adaptwin.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_kafka_service_is_kraft_single_node_on_the_pinned_version():
    kafka = SERVICES["kafka"]
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)[1]
    assert kafka["image"] == f"apache/kafka:{version}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1  # default 3 breaks a single node
    assert int(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 1
    assert "healthcheck" in kafka


def test_published_ports_bind_loopback_only():
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if s.get("image", "").startswith("adaptwin")])
def test_adaptwin_service_commands_are_real_cli_commands(name):
    svc = SERVICES[name]
    args = build_parser().parse_args(svc["command"])
    assert callable(args.func)
    assert svc["environment"]["ADAPTWIN_BOOTSTRAP"] == "kafka:19092"
    assert any(str(v).endswith(":/lake") for v in svc["volumes"])


def test_services_wait_for_topics_and_volumes_are_declared():
    for name, svc in SERVICES.items():
        if name not in {"kafka", "topic-init"} and svc.get("image", "").startswith("adaptwin"):
            assert svc["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    for svc in SERVICES.values():
        for vol in svc.get("volumes", []):
            named = str(vol).split(":")[0]
            assert named in COMPOSE["volumes"] or named.startswith((".", "/"))


def test_dockerfile_copies_every_part():
    text = (ROOT / "Dockerfile").read_text()
    for part in ("adaptwin", "ingest", "twin", "replay", "learner", "dashboard", "profiler"):
        assert f"COPY {part} {part}" in text


def test_optional_vllm_service_is_gpu_profiled_with_lora_flags():
    vllm = SERVICES["vllm"]
    assert vllm["profiles"] == ["gpu"] and vllm["image"].startswith("vllm/vllm-openai")
    flags = vllm["command"]
    for flag in ("--enable-lora", "--max-loras", "--max-cpu-loras", "--max-lora-rank"):
        assert flag in flags
    assert int(flags[flags.index("--max-cpu-loras") + 1]) >= int(flags[flags.index("--max-loras") + 1])
    assert "healthcheck" in vllm
