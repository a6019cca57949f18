"""`convostore ui` driven in a real headless Chromium (Debian's), against a real sidecar
holding sessions made through the real client: a tool call, a branch, usage, a
compaction, labels, and a hostile item. Every view shows what the API returns, the
hostile item shows as text and runs nothing, the keyboard reaches every control, the
page can change nothing, and the sidecar's token stays out of the page."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convostore import AdvancedSidecarSession, SidecarSession
from playwright.async_api import Browser, Page, async_playwright

from tests.compaction_support import compaction_config
from tests.openai_standin import OpenAIStandIn
from tests.servers import free_port, require
from tests.support import SidecarProcess

CHROMIUM = "/usr/bin/chromium"
HOSTILE = ["<script>window.pwned = 1</script>", '<img src="x" onerror="window.pwned = 2">']
WIDTHS = {"laptop": 1280, "phone": 390}
SHOTS = os.environ.get("CONVOSTORE_SCREENSHOTS")
"""Where the screenshots go (the docs' are made so); each run's own folder otherwise."""


@dataclass
class Browsed:
    address: str
    token: str
    token_file: str
    url: str


@pytest.fixture
def sessions(
    tmp_path: Path,
    store_config: Callable[..., dict[str, Any]],
    sidecar_process: Callable[[dict[str, Any]], SidecarProcess],
    openai_api: OpenAIStandIn,
    openai_key_file: Path,
) -> tuple[SidecarProcess, Path]:
    token = tmp_path / "token"
    token.write_text("the-sidecars-own-token-9f2c\n")
    config = store_config("sqlite", compaction=compaction_config(openai_api, openai_key_file))
    sidecar = sidecar_process({"stores": {"chat": config}, "auth": {"tokenFile": str(token)}})
    sidecar.start()
    asyncio.run(converse(sidecar.url, token.read_text().strip(), str(token)))
    return sidecar, token


TURNS = [
    [
        {"role": "user", "content": "Oslo in May?"},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "weather",
            "arguments": '{"city": "Oslo"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "14 C, dry"},
        {"role": "assistant", "content": "Mild and dry: pack a jacket."},
    ],
    [
        {"role": "user", "content": "And the ferry to Kiel?"},
        {"role": "assistant", "content": "It sails nightly at 14:00."},
    ],
]
USAGE = [(120, 30), (200, 45)]
LONG_ANSWER = "Every stop on the way, in order. " * 100
THOUGHT = "Weighing trains"


async def converse(url: str, secret: str, token_file: str) -> None:
    """A trip planned with a tool, with usage per turn, branched and compacted; and a
    hostile session."""
    trip = AdvancedSidecarSession(
        "trip", "chat", url, token_file=token_file, metadata={"user_id": "42", "plan": "free"}
    )
    usage_url = f"{url}/v1/stores/chat/sessions/trip/branches/main/usage"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as http:
        for items, (tokens_in, tokens_out) in zip(TURNS, USAGE, strict=True):
            await trip.add_items(items)
            usage = {"requests": 1, "input_tokens": tokens_in, "output_tokens": tokens_out}
            usage["total_tokens"] = tokens_in + tokens_out
            async with http.post(usage_url, json=usage) as resp:  # the turn just added
                assert resp.status == 200, await resp.text()
    await trip.create_branch_from_turn(2, "by-train")
    await trip.add_items([{"role": "user", "content": "By train instead?"}])
    await trip.switch_to_branch("main")
    compacting = SidecarSession("trip", "chat", url, token_file=token_file)
    await compacting.run_compaction({"force": True})
    assert compacting.last_compaction
    assert compacting.last_compaction["compacted"]
    hostile = SidecarSession("hostile", "chat", url, token_file=token_file)
    await hostile.add_items([{"role": "user", "content": text} for text in HOSTILE])
    musing = SidecarSession("musing", "chat", url, token_file=token_file)
    await musing.add_items(
        [
            {"role": "user", "content": "Think it over."},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Weighing trains"}],
            },
            {"role": "assistant", "content": LONG_ANSWER},
        ]
    )


def words(content: Any) -> str:
    """A message's text, as the page shows it: a string, or its parts' texts."""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content)


@pytest.fixture
def browsed(sessions: tuple[SidecarProcess, Path], tmp_path: Path) -> Iterator[Browsed]:
    """`convostore ui` as a user starts it, and the address it prints."""
    sidecar, token = sessions
    log_path = tmp_path / "ui.log"
    command = [sys.executable, "-m", "convostore", "ui", "--url", sidecar.url]
    command += ["--token-file", str(token), "--port", str(free_port())]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stderr=log)
        try:
            address = asyncio.run(printed_address(process, log_path))
            yield Browsed(address, token.read_text().strip(), str(token), sidecar.url)
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert token.read_text().strip() not in log_path.read_text(), "the token in the log"


async def printed_address(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        said = await asyncio.to_thread(log.read_text)
        found = re.search(r"at (http://127\.0\.0\.1:\d+/#key=\S+)", said)
        if found:
            return found.group(1)
        assert process.poll() is None, said
        assert asyncio.get_running_loop().time() < deadline, "convostore ui never said where"
        await asyncio.sleep(0.05)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        require("Chromium (Debian's chromium package)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()


async def opened(browser: Browser, browsed: Browsed, width: int = 1280) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(browsed.address)
    await page.locator("#sessions button").first.wait_for()
    return page


async def open_session(page: Page, name: str) -> None:
    await page.get_by_role("button", name=re.compile(f"^{name}")).click()
    await page.get_by_role("heading", name=f"Session {name}").wait_for()
    await page.get_by_text(re.compile("^Branch main of session")).wait_for()


async def test_every_view_shows_what_the_api_holds(browser: Browser, browsed: Browsed) -> None:
    page = await opened(browser, browsed)
    assert "key=" not in page.url
    assert await page.locator("#stores button").all_inner_texts() == ["chat\nready"]
    sessions = await page.locator("#sessions button").all_inner_texts()
    assert [s.split("\n")[0] for s in sessions] == ["musing", "hostile", "trip"], "newest first"

    await open_session(page, "trip")
    labels = await page.locator("#labels").inner_text()
    assert "user_id" in labels
    assert "42" in labels
    assert "plan" in labels
    held = await SidecarSession(
        "trip", "chat", browsed.url, token_file=browsed.token_file
    ).get_items()
    said_live = [words(i["content"]) for i in held if i.get("role") in ("user", "assistant")]
    transcript = page.locator("#live")
    rendered = await transcript.locator(".item.user .text, .item.assistant .text").all_inner_texts()
    assert rendered == said_live
    assert await transcript.locator(".turn").count() >= 1
    assert await transcript.locator(".item.summary").count() == 1
    assert "Compaction summary" in (await transcript.locator(".item.summary").text_content() or "")
    archive = page.locator("#archive")
    assert await page.locator("#archive-section").is_visible()
    tool = archive.locator(".item.tool")
    assert await tool.count() == 1, "the call and its output, folded into one"
    told = await tool.text_content() or ""
    assert "Tool call: weather" in told
    assert '{"city": "Oslo"}' in told
    assert "14 C, dry" in told
    said = await archive.locator(".item .text").all_inner_texts()
    assert said[:2] == ["Oslo in May?", "Mild and dry: pack a jacket."]

    tree = page.locator("#branches")
    assert await tree.locator("button").count() == 2
    train = tree.get_by_role("button", name=re.compile("^by-train"))
    assert "from main after turn 1" in await train.inner_text()
    bars = page.locator("#usage svg rect")
    assert await bars.count() == 4
    assert "Turn 2: 200 in, 45 out, 1 request(s)" in await page.locator("#usage").inner_text()
    await train.click()
    await page.get_by_text("Branch by-train of session trip.").wait_for()
    assert "By train instead?" in await transcript.inner_text()
    assert "ferry" not in await transcript.inner_text()
    await page.locator("#live .raw summary").first.click()
    assert '"role": "user"' in await page.locator("#live .raw pre").first.inner_text()
    assert page.errors == []  # type: ignore[attr-defined]
    await page.close()


async def test_a_hostile_item_shows_as_text_and_runs_nothing(
    browser: Browser, browsed: Browsed
) -> None:
    page = await opened(browser, browsed)
    await open_session(page, "hostile")
    shown = await page.locator("#live .item .text").all_inner_texts()
    assert shown == HOSTILE
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#live img, #live script").count() == 0
    await page.close()


async def test_the_keyboard_reaches_and_works_every_control(
    browser: Browser, browsed: Browsed
) -> None:
    page = await opened(browser, browsed)
    await open_session(page, "trip")
    controls = await page.evaluate(
        """() => [...document.querySelectorAll('button, input, summary, a[href]')]
              .filter((e) => e.offsetParent !== null || e.matches('.skip'))
              .map((e, i) => (e.dataset.mark = String(i)))"""
    )
    reached: set[str] = set()
    for _ in range(4 * len(controls) + 10):
        await page.keyboard.press("Tab")
        mark = await page.evaluate("document.activeElement && document.activeElement.dataset.mark")
        if mark is not None:
            reached.add(mark)
    assert set(controls) <= reached, f"{len(set(controls) - reached)} control(s) never reached"
    await page.locator("#sessions button[data-session='hostile']").focus()
    await page.keyboard.press("Enter")
    await page.get_by_role("heading", name="Session hostile").wait_for()
    await page.close()


async def test_screenshots_at_a_laptops_and_a_phones_width(
    browser: Browser, browsed: Browsed, tmp_path: Path
) -> None:
    where = Path(SHOTS) if SHOTS else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    for name, width in WIDTHS.items():
        page = await opened(browser, browsed, width)
        await open_session(page, "trip")
        shot = where / f"session-browser-{name}.png"
        await page.screenshot(path=str(shot), full_page=True)
        header = shot.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == width
        overflow = await page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
        assert not overflow, f"the page is wider than a {name}'s screen"
        await page.close()


async def test_the_page_can_change_nothing_and_answers_only_its_own(browsed: Browsed) -> None:
    origin, _, key = browsed.address.partition("/#key=")
    async with aiohttp.ClientSession() as http:
        api = f"{origin}/api/v1/stores/chat/sessions/trip/items"
        async with http.get(api) as resp:
            assert resp.status == 401, "without the key"
        mine = {"X-Convostore-Ui-Key": key}
        async with http.get(api, headers=mine) as resp:
            assert resp.status == 200
            assert browsed.token not in await resp.text()
        for method in ("POST", "DELETE", "PATCH", "PUT"):
            async with http.request(method, api, headers=mine, json={"items": []}) as resp:
                assert resp.status == 405, method
        for path in (
            "v1/stores/chat/sessions/trip/items:compact",
            "v1/stores/chat/sessions:erase",
            "metrics",
            "v1/stores/chat/keys",
        ):
            async with http.get(f"{origin}/api/{path}", headers=mine) as resp:
                assert resp.status == 403, path
        async with http.get(api, headers={**mine, "Host": "evil.example:80"}) as resp:
            assert resp.status == 421, "a rebound host name"
        async with http.get(origin + "/") as resp:
            policy = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy
            assert "unsafe-inline" not in policy
            assert browsed.token not in await resp.text()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--url", "unix:///run/sidecar.sock"], "--url must be an http:// or https:// address"),
        (["--url", "http://127.0.0.1:1", "--port", "70000"], "--port must be from 0 to 65535"),
        (["--token-file", "/nonexistent/token"], "--token-file: cannot read"),
    ],
)
def test_bad_options_are_refused_with_what_is_wrong(args: list[str], said: str) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "convostore", "ui", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert said in refused.stderr


async def test_other_kinds_show_by_kind_and_long_items_fold(
    browser: Browser, browsed: Browsed
) -> None:
    page = await opened(browser, browsed)
    await open_session(page, "musing")
    kinds = await page.locator("#live .item .kind").all_text_contents()
    assert kinds == ["User", "reasoning", "Assistant"]
    assert THOUGHT in await page.locator("#live .item.other").inner_text()
    folded = page.locator("#live .item.assistant details:not(.raw)")
    assert await folded.count() == 1
    assert await folded.get_attribute("open") is None, "a long item starts collapsed"
    assert f"Long text ({len(LONG_ANSWER)} characters)" in await folded.inner_text()
    await folded.locator("summary").click()
    assert await folded.locator(".text").text_content() == LONG_ANSWER
    await page.close()


async def test_sessions_are_found_by_label_and_prefix_and_paged(
    browser: Browser, browsed: Browsed
) -> None:
    for n in range(55):  # past a page of 50
        extra = SidecarSession(f"extra-{n:02}", "chat", browsed.url, token_file=browsed.token_file)
        await extra.add_items([{"role": "user", "content": str(n)}])
    page = await opened(browser, browsed)
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    listed = page.locator("#sessions button")
    assert await listed.count() == 50
    await page.get_by_role("button", name="More sessions").click()
    await page.get_by_text("58 session(s) in store chat.").wait_for()  # 55 and 3
    assert await page.get_by_role("button", name="More sessions").is_hidden()
    await page.get_by_label("Label (name=value)").fill("user_id=42")
    await page.get_by_role("button", name="Search").click()
    await page.get_by_text("1 session(s) in store chat.").wait_for()
    assert [t.split("\n")[0] for t in await listed.all_inner_texts()] == ["trip"]
    await page.get_by_label("Label (name=value)").fill("")
    await page.get_by_label("Session id starts with").fill("extra-5")
    await page.get_by_role("button", name="Search").click()
    await page.get_by_text("5 session(s) in store chat.").wait_for()
    origin = browsed.address.partition("/#")[0]
    assert fetched
    assert all(url.startswith(origin + "/") for url in fetched), "nothing from elsewhere"
    await page.close()


def test_open_hands_the_address_to_the_default_browser(
    sessions: tuple[SidecarProcess, Path], tmp_path: Path
) -> None:
    """`--open` gives the printed address (key and all) to the browser `$BROWSER` names,
    as `webbrowser` does on a desktop."""
    sidecar, token = sessions
    handed = tmp_path / "handed"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" > {handed}\n')
    browser.chmod(0o755)
    log_path = tmp_path / "ui.log"
    command = [sys.executable, "-m", "convostore", "ui", "--url", sidecar.url, "--open"]
    command += ["--token-file", str(token)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stderr=log, env={**os.environ, "BROWSER": str(browser)})
        try:
            address = asyncio.run(printed_address(process, log_path))
            asyncio.run(until_written(handed))
            assert handed.read_text().strip() == address
        finally:
            process.terminate()
            process.wait(timeout=10)


async def until_written(path: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while not await asyncio.to_thread(lambda: path.exists() and path.stat().st_size > 0):
        assert asyncio.get_running_loop().time() < deadline, f"nothing wrote {path}"
        await asyncio.sleep(0.05)
