"""adaptwin.kafka against the real broker (session fixture): round trips, offsets, topics, lag, errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from kafka import TopicPartition
from kafka.codec import zstd_decode, zstd_encode

from adaptwin.broker import free_port
from adaptwin.cliutil import UserError
from adaptwin.config import TOPIC_PARTITIONS, TOPICS
from adaptwin.kafka import (EXIT_BROKER_STALLED, PRODUCER_DEFAULTS, admin_client, commit_offsets, consumer_lag, ensure_topics,
                            make_consumer, make_producer, wait_for_broker)


def consume(consumer, want: int, timeout_s: float = 20.0) -> list:
    """Poll until `want` records arrived (or the timeout); returns them in arrival order."""
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def produce(bootstrap: str, topic: str, n: int, key_of=lambda i: None) -> dict:
    """Send n records (value = str(i)), wait for every ack; returns the producer's metrics."""
    producer = make_producer(bootstrap)
    try:
        futures = [producer.send(topic, value=f"{i}".encode(), key=key_of(i)) for i in range(n)]
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=1)
        return producer.metrics()
    finally:
        producer.close(timeout=5)


def test_zstd_codec_works_with_installed_zstandard():
    payload = b'{"adapter_id": "lora-7", "prompt_tokens": 812}' * 200
    assert PRODUCER_DEFAULTS["compression_type"] == "zstd"
    packed = zstd_encode(payload)
    assert len(packed) < len(payload) // 10
    assert zstd_decode(packed) == payload


def test_round_trip_keeps_each_keys_order(bootstrap, make_topic):
    topic = make_topic(partitions=4)
    n, keys = 2000, [f"lora-{k}".encode() for k in range(13)]
    metrics = produce(bootstrap, topic, n, key_of=lambda i: keys[i % len(keys)])

    consumer = make_consumer(bootstrap, "g-roundtrip", topic)
    try:
        records = consume(consumer, n)
    finally:
        consumer.close()
    assert len(records) == n
    assert {int(r.value) for r in records} == set(range(n))
    per_key: dict[bytes, list[int]] = defaultdict(list)
    partition_of: dict[bytes, set[int]] = defaultdict(set)
    for r in records:
        per_key[r.key].append(int(r.value))
        partition_of[r.key].add(r.partition)
    assert all(v == sorted(v) for v in per_key.values())        # order kept per key (= per adapter)
    assert all(len(p) == 1 for p in partition_of.values())     # a key sticks to one partition
    assert len({r.partition for r in records}) > 1             # and keys do spread over partitions
    # linger_ms + a large batch_size: many records travel per produce request.
    assert metrics["producer-metrics"]["records-per-request-avg"] > 20


def test_committed_offsets_survive_consumer_restart(bootstrap, make_topic):
    topic = make_topic(partitions=1)
    tp = TopicPartition(topic, 0)
    produce(bootstrap, topic, 100)

    first = make_consumer(bootstrap, "g-restart", topic)
    try:
        got = consume(first, 100)
        assert len(got) == 100
        commit_offsets(first, {tp: got[59].offset})            # processed 0..59 durably
    finally:
        first.close()
    assert consumer_lag(bootstrap, "g-restart") == {(topic, 0): 40}

    second = make_consumer(bootstrap, "g-restart", topic)
    try:
        rest = consume(second, 40)
        assert [int(r.value) for r in rest] == list(range(60, 100))
        assert second.poll(timeout_ms=500) == {}             # nothing beyond what was left
        commit_offsets(second, {tp: rest[-1].offset})
        assert second.committed(tp) == 100
    finally:
        second.close()
    assert consumer_lag(bootstrap, "g-restart") == {(topic, 0): 0}


def test_consumer_lag_counts_partitions_without_commits(bootstrap, make_topic):
    topic = make_topic(partitions=2)
    produce(bootstrap, topic, 10, key_of=lambda i: b"a" if i < 7 else b"b")
    lag = consumer_lag(bootstrap, "g-never-consumed", topics=[topic])
    assert set(lag) == {(topic, 0), (topic, 1)}
    assert sum(lag.values()) == 10
    assert consumer_lag(bootstrap, "g-never-consumed") == {}


def test_ensure_topics_is_idempotent(bootstrap):
    # The session fixture already created every project topic: a second call creates nothing.
    assert ensure_topics(bootstrap) == []
    with admin_client(bootstrap) as admin:
        parts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(TOPICS.all())}
    assert parts[TOPICS.requests] == TOPIC_PARTITIONS[TOPICS.requests]
    assert parts[TOPICS.telemetry] == 1

    name = f"idem-{time.monotonic_ns()}"
    assert ensure_topics(bootstrap, {name: 3}) == [name]
    assert ensure_topics(bootstrap, {name: 3}) == []
    assert ensure_topics(bootstrap, [name, TOPICS.windows]) == []


def test_auto_create_is_off(bootstrap):
    """A misspelt topic must fail, not silently appear (the project creates its topics)."""
    producer = make_producer(bootstrap, max_block_ms=1500)
    try:
        with pytest.raises(Exception):
            producer.send("adaptwin.no-such-topic", b"x").get(timeout=5)
    finally:
        producer.close(timeout=2)
    with admin_client(bootstrap) as admin:
        assert "adaptwin.no-such-topic" not in admin.list_topics()


def test_wait_for_broker_on_dead_port_says_what_to_do():
    port = free_port()                                       # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        wait_for_broker(f"127.0.0.1:{port}", timeout_s=1.5)
    assert time.monotonic() - t0 < 8
    assert f"127.0.0.1:{port}" in str(e.value) and "make kafka-up" in str(e.value)


def test_producer_on_dead_port_raises_user_error():
    with pytest.raises(UserError, match="make kafka-up"):
        make_producer(f"127.0.0.1:{free_port()}", bootstrap_timeout_ms=1000)


_STALL = """
import socket, sys, time
from adaptwin.broker import free_port
from adaptwin.kafka import exit_if_stalled
port = free_port()
if sys.argv[1] == "up":  # something answers on the bootstrap port, as a restarted broker does
    server = socket.create_server(("127.0.0.1", port))
with exit_if_stalled("committing a transaction", f"127.0.0.1:{port}", stuck_s=1.0, down_s=float(sys.argv[2])):
    time.sleep(float(sys.argv[3]))
time.sleep(1.5)
print("alive")
"""


def _stall(broker: str, down_s: float, call_s: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _STALL, broker, str(down_s), str(call_s)], capture_output=True,
                         text=True, timeout=120)
    return out, time.monotonic() - t0


def test_a_call_stuck_with_the_broker_up_exits_the_process_so_that_it_can_be_run_again():
    out, wall = _stall("up", down_s=600, call_s=60)
    assert out.returncode == EXIT_BROKER_STALLED and "alive" not in out.stdout
    assert "committing a transaction is stuck" in out.stderr and "run the same command again" in out.stderr
    assert wall < 40  # not the 60 s of the call
    # while the broker is down the call may wait (it goes on when the broker is back), up to down_s in all
    out, wall = _stall("down", down_s=3, call_s=60)
    assert out.returncode == EXIT_BROKER_STALLED and wall < 40
    # a call that returns in time disarms it
    out, _ = _stall("up", down_s=600, call_s=0.2)
    assert out.returncode == 0 and out.stdout.strip() == "alive"


def test_committed_offset_gives_up_when_the_broker_is_gone(broker_factory, monkeypatch):
    import adaptwin.kafka as kafka_module
    from kafka.errors import KafkaError

    broker = broker_factory()
    ensure_topics(broker.bootstrap)
    consumer = make_consumer(broker.bootstrap, "gone-group")
    tp = TopicPartition(TOPICS.requests, 0)
    try:
        assert kafka_module.committed_offset(consumer, tp) is None  # no commit yet, broker up
        broker.stop()
        monkeypatch.setattr(kafka_module, "CALL_TIMEOUT_S", 3.0)
        t0 = time.monotonic()
        with pytest.raises(KafkaError):  # a timeout, or the refused connection: not a wait forever
            kafka_module.committed_offset(consumer, tp)
        assert time.monotonic() - t0 < 30
    finally:
        consumer.close(autocommit=False)


def test_cli_turns_a_kafka_failure_into_a_clear_error_and_the_retry_status(capsys, monkeypatch):
    from kafka.errors import KafkaTimeoutError

    from adaptwin import cli

    real = cli.build_parser

    def stalls(_args):
        raise KafkaTimeoutError("commit took too long")

    def parser():  # the real parser, and a command that meets a broker that stopped answering
        p = real()
        parse = p.parse_args
        p.parse_args = lambda argv=None: argparse.Namespace(**{**vars(parse(argv)), "func": stalls})
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["twin", "run", "--model", "llama-3.1-8b-instruct", "--served", "4", "--max-loras", "2"]) == EXIT_BROKER_STALLED
    err = capsys.readouterr().err
    assert "Kafka broker failed or stopped answering" in err and "commit took too long" in err
    assert "resume from their last commit" in err
