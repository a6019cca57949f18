"""Every example in `examples/` runs, as a user would run it, against a real sidecar
started with `examples/sidecar.yaml`; a scripted model stands in for OpenAI's (and the
OpenAI stand-in for the compaction model). `06_kubernetes/` goes through the operator's
own spec parsing and the webhook's injection."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from convostore import SidecarSession
from convostore_operator.inject import SIDECAR, StoreMount, inject
from convostore_operator.spec import parse

from tests.openai_standin import OpenAIStandIn
from tests.support import SidecarProcess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sidecar(
    tmp_path: Path, openai_api: OpenAIStandIn, openai_key_file: Path, monkeypatch: Any
) -> Iterator[SidecarProcess]:
    """The examples' sidecar config as shipped, run from a working directory of its own;
    only the compaction model is pointed at the stand-in."""
    config = yaml.safe_load((EXAMPLES / "sidecar.yaml").read_text())
    compaction = config["stores"]["compacting"]["compaction"]
    compaction.update(baseURL=openai_api.base_url, maxRetries=0)
    (tmp_path / "openai-api-key").write_text(openai_key_file.read_text())
    process = SidecarProcess(config, tmp_path)
    process.start()
    monkeypatch.setenv("CONVOSTORE_URL", process.url)
    monkeypatch.delenv("CONVOSTORE_TOKEN_FILE", raising=False)
    yield process
    process.stop()


def answers(*texts: str) -> ScriptedModel:
    return ScriptedModel([[assistant_message(text)] for text in texts])


def texts(items: list[Any]) -> list[str]:
    return [str(item.get("content")) for item in items if item.get("role") == "user"]


async def test_a_first_agent_remembers_its_first_run(sidecar: SidecarProcess, capsys: Any) -> None:
    model = answers("Hello, Ada.", "Your name is Ada.")
    await example("01_first_agent").main(model)
    assert capsys.readouterr().out == "Your name is Ada.\n4 items remembered\n"
    assert texts(model.calls[1].input) == ["My name is Ada.", "What is my name?"]
    assert (sidecar.workdir / "examples.db").exists()


async def test_tools_and_whole_turns(sidecar: SidecarProcess, capsys: Any) -> None:
    steps: list[Any] = []
    for turn, city in enumerate(("Oslo", "Bergen")):
        call = function_call("weather", {"city": city}, call_id=f"call-{turn}")
        steps += [[call], [assistant_message(f"Yes, sunny in {city}.")]]
    steps.append([assistant_message("Both were sunny.")])
    model = ScriptedModel(steps)
    await example("02_tools_and_whole_turns").main(model)
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == "Which was warmer? Both were sunny."
    assert printed[3] == "10 items stored in all"
    last = model.calls[-1].input
    assert texts(last) == ["And in Bergen?", "Which was warmer?"]
    kinds = [item.get("type") for item in last]
    assert kinds.count("function_call") == kinds.count("function_call_output") == 1


async def test_branches_and_usage(sidecar: SidecarProcess, capsys: Any) -> None:
    used = Usage(requests=1, input_tokens=10, output_tokens=5, total_tokens=15)
    model = ScriptedModel(
        [
            ModelStep(output=[assistant_message(text)], usage=used)
            for text in ("Walk the harbour.", "Then the Munch museum.", "Then a fjord cruise.")
        ]
    )
    await example("03_branches_and_usage").main(model)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith(": Then a fjord cruise.")
    branch = printed[0].removeprefix("on ").split(":")[0]
    assert printed[1:3] == ["branch main: 2 user turns", f"branch {branch}: 2 user turns"]
    assert printed[3] == "3 model requests in all"
    assert texts(model.calls[-1].input) == ["Plan a day in Oslo.", "Add a fjord cruise."]


async def test_encryption_keeps_the_text_out_of_the_store(
    sidecar: SidecarProcess, capsys: Any
) -> None:
    await example("04_encryption").main(os.urandom(32))
    assert capsys.readouterr().out.splitlines() == [
        "the agent reads: my card ends in 4242",
        "the store holds the text: False",
    ]
    stored = await SidecarSession("example-04", url=sidecar.url).get_items()
    assert len(stored) == 1
    assert "4242" not in str(stored)


async def test_compaction_in_the_store(
    sidecar: SidecarProcess, openai_api: OpenAIStandIn, capsys: Any
) -> None:
    model = answers(*(f"Noted, {n}." for n in range(6)))
    await example("05_compaction").main(model)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "compacted: True, 10 items replaced"
    # the summary, with the user messages it covers, then the kept turn verbatim
    assert printed[1] == "the agent now reads 8 items"
    assert printed[2] == "the conversation as said: 12 items"
    assert openai_api.compact_bodies, "the sidecar called the compaction model"


def test_the_kubernetes_example_is_a_valid_store_and_its_pods_get_the_sidecar() -> None:
    store = yaml.safe_load((EXAMPLES / "06_kubernetes" / "store.yaml").read_text())
    parsed = parse(store["metadata"]["name"], store["spec"])
    assert parsed.backend == "redis"
    assert set(parsed.refs) == {"passwordSecretRef"}
    deployment = yaml.safe_load((EXAMPLES / "06_kubernetes" / "agent.yaml").read_text())
    pod = deployment["spec"]["template"]
    inject(pod, [StoreMount(name="chat", config_hash="h")], "convostore-sidecar:test")
    [sidecar] = pod["spec"]["initContainers"]
    assert sidecar["name"] == SIDECAR
    assert "--config" in sidecar["args"]
    [agent] = pod["spec"]["containers"]
    assert {e["name"] for e in agent["env"]} == {"CONVOSTORE_URL", "CONVOSTORE_TOKEN_FILE"}
