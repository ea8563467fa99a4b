"""The chat-and-draw demo: `python -m demo` on a tiny random checkpoint, driven by gradio_client and a real browser.

A random model answers gibberish, so these tests check structure (a text answer, a drawing with its metadata,
errors as chat messages, a server that keeps answering), not what the model says.

Screenshot for the README (headless Chromium): DEMO_SCREENSHOT=demo/screenshot.png python -m pytest tests/test_demo.py -k browser
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import llm
from demo.__main__ import main as demo_main
from demo.checkpoint import MODEL_TYPE, CheckpointError, check_checkpoint
from demo.session import Drawing, Limits, Settings, UserError, history, load_upload, new_turn, run_turn, to_chatbot
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld

gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = "/usr/bin/chromium"
MAX_CONCURRENCY = 2
CONTROLS = dict(cfg_scale=2.0, cfg_schedule="linear", top_k=100, top_p=0.9, temperature=1.0, scale_rounds=1,
                self_check=2, images_per_prompt=1, seed=0, random_seed=True, max_new_tokens=6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = llm.build_tiny(seed=0)
    directory = tmp_path_factory.mktemp("tiny-demo-model")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    ShapesWorld("test", size=64, num_samples=1)[0].image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m demo` in a subprocess, in an empty working folder, logging to a file."""

    def __init__(self, checkpoint: Path, workdir: Path):
        self.port, self.workdir, self.log = free_port(), workdir, workdir.parent / "server.log"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "demo", "--model", str(checkpoint), "--port", str(self.port),
                 "--max-concurrency", str(MAX_CONCURRENCY)],
                cwd=workdir, env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "Running on local URL" not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the demo server did not start:\n{self.text()}")
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.temporary = Path(re.search(r"temporary files: (\S+)", self.text()).group(1))

    def text(self) -> str:
        return self.log.read_text()

    def turns_running(self) -> list[int]:
        return [int(n) for n in re.findall(r"turn started \((\d+) running\)", self.text())]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo-server") / "cwd"
    workdir.mkdir()
    server = Server(checkpoint, workdir)
    yield server
    server.stop()
    # Everything the session wrote lived in its one temporary folder, now removed; the working folder stays empty.
    assert not server.temporary.exists()
    assert list(server.workdir.iterdir()) == []


@pytest.fixture
def client(server, tmp_path):
    return gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path))


def send(client, text, files=(), draw=False, **controls):
    message = {"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}
    shown, box, draw_after = client.predict(message, draw, *{**CONTROLS, **controls}.values(), api_name="/chat")
    assert box in (None, {"text": "", "files": []}) and draw_after is False  # Draw applies to one message
    return shown


def parts(message: dict, kind: str) -> list:
    return [item["text" if kind == "text" else "file"] for item in message["content"] if item["type"] == kind]


def assert_answered(shown, question: str) -> dict:
    """The last two messages are the user's question and an assistant reply without an error note."""
    user, reply = shown[-2:]
    assert user["role"] == "user" and question in parts(user, "text")
    assert reply["role"] == "assistant" and not any(t.startswith("⚠️") for t in parts(reply, "text"))
    return reply


# ---------------------------------------------------------------------------------------------------- start-up


def test_missing_or_wrong_model_exits_at_once_naming_what_is_missing(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(demo_main, ["--model", str(tmp_path / "nowhere")])
    out, err = capsys.readouterr()
    assert exit.value.code == 1 and "does not exist" in err and "deepspeed train/sft.py" in err
    assert "loading" not in out  # it stopped before loading anything
    assert MODEL_TYPE == llm.TokenFlowMLLMConfig.model_type

    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lacks the weights \(model.safetensors"):
        check_checkpoint(partial)
    (partial / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shutil.copy(checkpoint / "model.safetensors", partial)
    with pytest.raises(CheckpointError, match="holds a 'llama' model"):
        check_checkpoint(partial)
    assert check_checkpoint(checkpoint) == checkpoint


def test_startup_warms_up_and_binds_localhost(server):
    text = server.text()
    assert re.search(r"warm-up: time to first token \d+\.\d+ s, time to a full drawing \d+\.\d+ s", text)
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in text


# ---------------------------------------------------------------------------------------------------- gradio_client


def test_question_about_an_uploaded_image_gets_a_text_answer(client, scene):
    shown = send(client, "What colour is the circle?", files=[scene])
    reply = assert_answered(shown, "What colour is the circle?")
    assert len(parts(shown[-2], "file")) == 1 and parts(reply, "text") and not parts(reply, "file")
    follow_up = send(client, "And its shape?")
    assert len(follow_up) == 4  # the whole conversation is shown, the first turn included
    assert_answered(follow_up, "And its shape?")


def test_drawing_returns_pngs_with_metadata_and_follow_ups_work(client):
    shown = send(client, "Draw a red circle.", draw=True, seed=11, random_seed=False, images_per_prompt=2)
    reply = assert_answered(shown, "Draw a red circle.")
    files = parts(reply, "file")
    assert len(files) == 2
    for path, seed in zip(files, (11, 12)):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
            assert "Draw a red circle." in image.info["prompt"] and image.info["seed"] == str(seed)
            assert json.loads(image.info["settings"]) == {key: CONTROLS[key] for key in
                                                          ("cfg_scale", "cfg_schedule", "top_k", "top_p", "temperature",
                                                           "scale_rounds", "self_check")}
        assert any(text.startswith(f"seed {seed} ·") for text in parts(reply, "text"))
    # The drawing goes back into the context as indices; asking about it works.
    assert_answered(send(client, "What did you draw?"), "What did you draw?")

    regenerated = client.predict(False, *CONTROLS.values(), api_name="/regenerate")
    assert len(regenerated) == 4
    assert_answered(regenerated, "What did you draw?")
    after_undo = client.predict(api_name="/undo")
    assert len(after_undo) == 2 and parts(after_undo[-2], "text") == ["Draw a red circle."]
    assert client.predict(api_name="/clear") == []


def test_stop_button_ends_a_running_turn(client):
    message = {"text": "Tell me a long story.", "files": []}
    job = client.submit(message, False, *{**CONTROLS, "max_new_tokens": 512}.values(), api_name="/chat")
    deadline = time.monotonic() + 60
    while not job.outputs() and not job.done() and time.monotonic() < deadline:  # wait for the first streamed text
        time.sleep(0.05)
    client.predict(api_name="/stop")
    shown = job.result(timeout=60)[0]
    assert parts(shown[-1], "text")[-1] == "⏹ stopped"
    assert_answered(send(client, "Still there?"), "Still there?")


def test_uploads_and_drawings_live_in_the_one_temporary_folder(server, scene):
    client = gradio_client.Client(server.url, verbose=False, download_files=False)  # paths as the server has them
    shown = send(client, "What is this?", files=[scene], draw=True, max_new_tokens=2)
    paths = [Path(item["path"]) for message in shown for item in parts(message, "file")]
    assert len(paths) == 2 and all(path.is_relative_to(server.temporary) for path in paths), paths


def _bad_uploads(folder: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what the chat message must say)."""
    valid = folder / "valid.png"
    ShapesWorld("test", size=64, num_samples=1)[0].image.save(valid)
    data = valid.read_bytes()
    files = {
        "corrupt": (b"this is not an image", "not a recognised image format"),
        "empty": (b"", "empty (0 bytes)"),
        "truncated": (data[: len(data) // 2], "truncated"),
        "text": (b"hello, world\n", "not a recognised image format"),
    }
    uploads = {}
    for name, (content, reason) in files.items():
        path = folder / (f"{name}.txt" if name == "text" else f"{name}.png")
        path.write_bytes(content)
        uploads[name] = (path, reason)
    bomb = folder / "bomb.png"
    Image.new("1", (4200, 4200)).save(bomb)  # a few KB on disk, 17.6 M pixels
    uploads["bomb"] = (bomb, "decompression bomb")
    return uploads


def test_bad_input_becomes_a_chat_message_and_the_server_keeps_answering(client, tmp_path):
    limits = Limits()
    for name, (path, reason) in _bad_uploads(tmp_path).items():
        shown = send(client, f"look at {name}", files=[path])
        note = parts(shown[-1], "text")[-1]
        assert note.startswith("⚠️") and path.name in note and reason in note, (name, note)
    cases = [
        (dict(text=""), "the message is empty"),
        (dict(text="x" * (limits.max_prompt_chars + 1)), f"at most {limits.max_prompt_chars} are allowed"),
        (dict(text="hi", seed=-5, random_seed=False), "seed must be an int in [0, 2**64)"),
    ]
    for arguments, reason in cases:
        shown = send(client, **arguments)
        assert reason in parts(shown[-1], "text")[-1]
    # Gradio itself refuses values outside its sliders' bounds, naming the bound, before the turn starts.
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum"):
        send(client, "hi", top_k=10**9)
    with pytest.raises(gradio_client.exceptions.AppError, match="less than minimum"):
        send(client, "hi", top_p=0.0)
    shown = send(client, "Still there?")
    assert_answered(shown, "Still there?")
    # Failed turns are shown but never sent to the model: only the last turn is in its context.
    assert sum(m["role"] == "assistant" and not parts(m, "text")[-1].startswith("⚠️") for m in shown) == 1


def test_twenty_concurrent_requests_all_complete_under_the_concurrency_limit(server, tmp_path):
    started = len(server.turns_running())
    clients = [gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path)) for _ in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: send(clients[i], f"request {i}", max_new_tokens=3), range(20)))
    for number, shown in enumerate(results):
        assert len(shown) == 2
        assert_answered(shown, f"request {number}")
    running = server.turns_running()[started:]
    assert len(running) == 20 and max(running) <= MAX_CONCURRENCY


# ---------------------------------------------------------------------------------------------------- session


def test_session_streams_text_previews_and_stops(checkpoint, scene, tmp_path):
    model = llm.TokenFlowMLLM.from_pretrained(checkpoint)
    limits = Limits()
    settings = Settings(**{key: value for key, value in CONTROLS.items() if key != "random_seed"}
                        | {"seed": None, "max_new_tokens": 24})
    refused = new_turn("", [], limits)
    assert refused.refused and "empty" in refused.note and refused.restart().refused
    assert new_turn("many", [str(scene)] * 5, limits).refused
    with pytest.raises(UserError, match="at most 10 bytes"):
        load_upload(str(scene), Limits(max_upload_bytes=10))

    turns = [refused, new_turn("What is this?", [str(scene)], limits)]
    assert not turns[1].refused and turns[1].user["content"][0]["image"].size == (64, 64)
    streamed = [turns[1].text for _ in run_turn(model, turns, settings, limits, None, threading.Event(), str(tmp_path))]
    answer = "".join(part for part in turns[1].parts if isinstance(part, str))
    pieces = [text for text in streamed if text]
    assert len(set(pieces)) >= 2 and all(answer.startswith(text) for text in pieces)  # streamed piece by piece
    assert history(turns) == [turns[1].user, turns[1].assistant]  # the refused turn is not in the context

    turns.append(new_turn("Draw a red circle.", [], limits))
    two = Settings(**{**vars(settings), "images_per_prompt": 2, "max_new_tokens": 2})
    previews = {turns[-1].preview for _ in run_turn(model, turns, two, limits, True, threading.Event(), str(tmp_path))}
    # After every scale, of the drawing and the alternative (self-checked: of their first candidates).
    assert len(previews - {None}) == 2 * len(model.scales)
    drawings = [part for part in turns[-1].parts if isinstance(part, Drawing)]
    assert len(drawings) == 2 and drawings[1].caption.endswith("(alternative)")
    assert sum(item["type"] == "image" for item in history(turns)[-1]["content"]) == 1  # alternatives stay out

    stop = threading.Event()
    stop.set()  # pressed before the turn got to run
    turns.append(new_turn("Draw it again.", [], limits))
    list(run_turn(model, turns, settings, limits, True, stop, str(tmp_path)))
    assert turns[-1].note == "⏹ stopped" and turns[-1].parts == []
    shown = to_chatbot(turns)
    assert [m["role"] for m in shown] == ["user", "assistant"] * 4
    assert shown[2]["content"][0] == {"path": str(scene)}


# ---------------------------------------------------------------------------------------------------- browser


def test_browser_loads_the_page_chats_and_draws(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install the Debian package chromium (apt-get install chromium)")
    screenshot = Path(os.environ.get("DEMO_SCREENSHOT", tmp_path / "demo.png"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(server.url)
            header = page.locator("#header")
            header.wait_for()
            assert "M parameters" in header.inner_text() and "cpu" in header.inner_text()
            example = ShapesWorld("test", size=64, num_samples=1)[0].vqa[0].question
            page.get_by_text(example).first.wait_for()  # the clickable ShapesWorld examples
            settings = page.locator("#settings > button.label-wrap")
            settings.click()
            tokens = page.locator("#max-new-tokens input[type=number]")  # the slider's number box
            tokens.fill("6")
            tokens.press("Enter")
            page.locator("#draw input").check()
            box = page.locator("#message textarea")
            box.fill("Draw a red circle.")
            box.press("Enter")
            page.locator("#chat img").first.wait_for()
            page.get_by_text(re.compile(r"^seed \d+ ·")).first.wait_for()
            assert not page.locator("#draw input").is_checked()  # Draw applied to that one message
            chat = page.locator("#chat").inner_text()
            assert "Draw a red circle." in chat and "cfg_scale 7.5" in chat  # the checkpoint's defaults
            settings.click()  # closed again, so the screenshot shows the header and the conversation
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    with Image.open(screenshot) as image:
        assert image.size == (1000, 1000)
