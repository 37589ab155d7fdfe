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


def test_every_pipeline_service_is_there():
    for name in ("kafka", "topic-init", "ingest", "replay", "sink", "learner", "dashboard", "vllm", "lake-compact",
                 "lake-retention"):
        assert name in SERVICES, f"docker-compose.yml has no {name} service"
    for name in ("lake-compact", "lake-retention"):  # maintenance runs as a service: repeated, never one-shot
        assert "--every" in SERVICES[name]["command"]


def test_learner_service_streams_from_kafka_and_checkpoints_to_a_volume():
    learner = SERVICES["learner"]
    cmd = learner["command"]
    assert cmd[0] == "learn" and cmd[cmd.index("--bootstrap") + 1] == "kafka:19092"
    checkpoint = cmd[cmd.index("--checkpoint") + 1]
    mounts = {str(v).split(":", 1)[1]: str(v).split(":", 1)[0] for v in learner["volumes"]}
    assert checkpoint in mounts and mounts[checkpoint] in COMPOSE["volumes"]  # survives a container restart
    assert learner["restart"] == "on-failure"
    # the image creates the mount points owned by its non-root user, so the volumes are writable
    docker = (ROOT / "Dockerfile").read_text()
    assert checkpoint in docker and "/lake" in docker and "chown adaptwin" in docker


def test_replay_can_target_the_vllm_service():
    vllm, replay = SERVICES["vllm"], SERVICES["replay-vllm"]
    cmd = replay["command"]
    assert cmd[cmd.index("--backend") + 1] == "vllm"
    port = str(vllm["ports"][0]).rsplit(":", 1)[1]
    assert cmd[cmd.index("--url") + 1] == f"http://vllm:{port}"
    assert replay["profiles"] == vllm["profiles"] == ["gpu"]
    assert replay["depends_on"]["vllm"]["condition"] == "service_healthy"
    # the replay's configuration is the server's: served adapters = --max-cpu-loras, slots = --max-loras
    flags = vllm["command"]
    for ours, theirs in (("--served", "--max-cpu-loras"), ("--max-loras", "--max-loras")):
        assert cmd[cmd.index(ours) + 1] == flags[flags.index(theirs) + 1]
    assert callable(build_parser().parse_args(cmd).func)
