"""The shipped guard never blocks a greeting: held-out small talk through the real server, sampled as served."""

from __future__ import annotations

import json

import pytest

from neuronguard.models.organism import DATA_DIR
from neuronguard.server.app import create_app
from neuronguard.server.settings import Settings
from testkit.server_fixtures import api_client, organism_available

GREETINGS = [json.loads(line)["prompt"] for line in (DATA_DIR / "handwritten" / "small_talk_heldout.jsonl").open()]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="target missed on the shipped organism: its bundle blocks some held-out greetings "
                   "(report.json -> guard.heldout.sampled.per_group.small_talk); strict, so a fix that meets it fails here "
                   "until this mark is removed")
@pytest.mark.anyio
@pytest.mark.skipif(not organism_available(), reason="the built-in organism is not in the tree")
async def test_no_held_out_greeting_is_blocked_at_the_default_temperature() -> None:
    assert len(GREETINGS) >= 50
    app = create_app(Settings(device="cpu"))  # the built-in organism, its bundle and patch source, guard mode block
    blocked = []
    async with api_client(app) as client:
        for i, text in enumerate(GREETINGS):
            body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 24, "seed": i}
            reply = (await client.post("/v1/chat/completions", json=body)).json()
            if reply["choices"][0]["finish_reason"] == "content_filter":
                blocked.append((text, reply["guard"]["stage"], round(reply["guard"]["score"], 3)))
    assert not blocked, blocked


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
