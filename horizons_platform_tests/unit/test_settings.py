"""Settings from the environment: any librdkafka property passes through, secrets never
show."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from confluent_kafka import KafkaException, Producer

from horizons_platform.settings import Settings


def test_any_librdkafka_property_passes_through_and_reaches_a_real_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HORIZONS_KAFKA__SOCKET_KEEPALIVE_ENABLE", "true")
    monkeypatch.setenv("HORIZONS_KAFKA__SASL_OAUTHBEARER_CLIENT_ID", "horizons")
    monkeypatch.setenv("HORIZONS_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    conf = Settings().kafka_config()
    assert conf["socket.keepalive.enable"] == "true"
    assert conf["sasl.oauthbearer.client.id"] == "horizons"
    assert conf["bootstrap.servers"] == "127.0.0.1:1"
    conf.pop("sasl.oauthbearer.client.id")  # needs an OAUTHBEARER mechanism to be accepted
    Producer(conf).flush(0)  # librdkafka accepts every name (it refuses unknown ones)
    monkeypatch.setenv("HORIZONS_KAFKA__NO_SUCH_PROPERTY", "1")
    with pytest.raises(KafkaException, match="No such configuration property"):
        Producer(Settings().kafka_config())


def test_librdkafka_debug_logs_to_stderr_not_through_python_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # confluent-kafka 2.16 aborted a host started with HORIZONS_KAFKA__DEBUG while its
    # logger callback served debug volume; without debug the logger stays.
    assert "logger" in Settings().kafka_config()
    monkeypatch.setenv("HORIZONS_KAFKA__DEBUG", "cgrp,consumer")
    conf = Settings().kafka_config()
    assert conf["debug"] == "cgrp,consumer" and "logger" not in conf


def test_config_show_masks_passwords_and_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORIZONS_")}
    env.update(
        {
            "HORIZONS_KAFKA_SASL_USERNAME": "ada",
            "HORIZONS_KAFKA_SASL_PASSWORD": "hunter2-sasl",
            "HORIZONS_KAFKA__SSL_KEY_PASSWORD": "hunter2-key",
            "HORIZONS_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET": "hunter2-oauth",
            "HORIZONS_SMTP_PASSWORD": "hunter2-smtp",
            "HORIZONS_KAFKA__SOCKET_KEEPALIVE_ENABLE": "true",
        }
    )
    shown = subprocess.run(
        [sys.executable, "-m", "horizons_platform.cli", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "hunter2" not in shown
    for name in ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret"):
        assert any(name in line and "********" in line for line in shown.splitlines()), name
    assert any("sasl.username" in line and "ada" in line for line in shown.splitlines())
    assert any("socket.keepalive.enable" in line and "true" in line for line in shown.splitlines())
