"""SPEC 12: the broker is chosen by CELERY_BROKER_URL alone (config/broker.py), through the real
settings modules; CACHE_URL moves rate limits and the cache off the broker's Redis."""

import json
import os
import subprocess

import pytest
from celery import Celery
from django.core.exceptions import ImproperlyConfigured

from config.broker import broker_settings
from core.tasks import publish_declares
from tests.e2e.conftest import ROOT, VENV

QUEUES = ("orders", "allocation", "gateway", "callbacks")
SENTINELS = "sentinel://127.0.0.1:29820;sentinel://127.0.0.1:29821"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def app_for(url: str, **kwargs) -> Celery:
    """A Celery app configured as the settings would configure it for `url`."""
    options = {"sentinel_master": "mymaster", "visibility_timeout": 300, "queues": QUEUES, **kwargs}
    conf = {
        key.removeprefix("CELERY_").lower(): value for key, value in broker_settings(url, **options).items()
    }
    app = Celery("probe", broker=url, set_as_current=False)
    app.conf.update(conf)
    return app


def transport_of(app: Celery) -> str:
    cls = type(app.connection_for_write().transport)
    return f"{cls.__module__}.{cls.__name__}"


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/0", "config.broker.Transport"),
        ("rediss://127.0.0.1:6380/0", "config.broker.Transport"),
        (SENTINELS, "kombu.transport.redis.SentinelTransport"),
        (AMQP, "kombu.transport.pyamqp.Transport"),
    ],
)
def test_the_url_alone_chooses_the_transport(url, transport):
    assert transport_of(app_for(url)) == transport


def test_rediss_verifies_the_server_certificate():
    assert app_for("rediss://127.0.0.1:6380/0").connection_for_write().ssl == {"ssl_cert_reqs": 2}


def test_sentinel_names_its_master():
    app = app_for(SENTINELS, sentinel_master="payments")
    assert app.conf.broker_transport_options["master_name"] == "payments"
    assert app.conf.broker_transport_options["visibility_timeout"] == 300
    assert app.conf.broker_transport_options["unacked_restore_throttle"] == 1


def test_rabbitmq_declares_quorum_queues_with_publisher_confirms():
    app = app_for(AMQP)
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert {q.name: q.queue_arguments for q in app.conf.task_queues} == {
        name: {"x-queue-type": "quorum"} for name in QUEUES
    }


def test_redis_queues_are_plain_lists():
    app = app_for("redis://127.0.0.1:6379/0")
    assert {q.queue_arguments for q in app.conf.task_queues} == {None}


@pytest.mark.parametrize(
    ("url", "declares"),
    [("redis://127.0.0.1:6379/0", ()), ("rediss://127.0.0.1:6380/0", ()), (SENTINELS, ()), (AMQP, None)],
)
def test_publishes_declare_their_queue_only_where_an_undeclared_queue_drops_messages(url, declares):
    # None: kombu's default, the target queue declared (once per connection) before publishing
    assert publish_declares(app_for(url)) == declares


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ImproperlyConfigured, match="unsupported scheme 'kafka'"):
        app_for("kafka://127.0.0.1:9092")


_PROBE = """
import json, django
django.setup()
from django.conf import settings
from config.celery_app import app
transport = type(app.connection_for_write().transport)
print(json.dumps({
    "transport": f"{transport.__module__}.{transport.__name__}",
    "master": app.conf.broker_transport_options.get("master_name"),
    "cache": settings.CACHES["default"]["LOCATION"],
    "redis_client": settings.CACHE_URL,
}))
"""


def probe(settings_module: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TEST_CELERY", "CACHE_URL"))}
    result = subprocess.run(
        [str(VENV / "python"), "-c", _PROBE],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": settings_module, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_the_settings_follow_the_url_and_cache_url():
    got = probe(
        "config.settings.local",
        CELERY_BROKER_URL=SENTINELS,
        CELERY_BROKER_SENTINEL_MASTER="payments",
        REDIS_URL="redis://127.0.0.1:6379/0",
        CACHE_URL="redis://10.0.0.9:6379/2",
    )
    assert got == {
        "transport": "kombu.transport.redis.SentinelTransport",
        "master": "payments",
        "cache": "redis://10.0.0.9:6379/2",
        "redis_client": "redis://10.0.0.9:6379/2",
    }


def test_test_settings_take_their_broker_from_test_celery_broker_url():
    got = probe("config.settings.test", TEST_CELERY_BROKER_URL=AMQP)
    assert got["transport"] == "kombu.transport.pyamqp.Transport"
