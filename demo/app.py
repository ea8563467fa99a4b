"""The Gradio Blocks page: one chat that answers and draws, its controls, and the events wiring them to `session`.

API names (for `gradio_client`): "/chat" (message, draw, controls…), "/regenerate" (draw, controls…), "/undo",
"/clear", "/stop". The conversation itself lives in per-browser-session state on the server.
"""

import inspect
import logging
import os
import threading

import gradio as gr

import llm
from llm.sampling import CFG_SCHEDULES
from unimodal.shapesworld import ShapesPrompts, ShapesWorld

from .model import ModelCard
from .session import MAX_SELF_CHECK, Limits, Settings, Turn, new_turn, run_turn, to_chatbot

logger = logging.getLogger("demo")

HINT = ("Ask about an uploaded image (button, drag-and-drop or paste), or ask for a picture: the model draws when "
        "it decides to, or always when **Draw** is on. Follow-up questions can be about what it drew.")


def example_messages(out_dir: str, count: int = 2) -> list[list]:
    """ShapesWorld test scenes with one of their questions, and test drawing prompts: [[message, draw], ...]."""
    examples = []
    for sample in ShapesWorld("test", size=64, num_samples=count):
        path = os.path.join(out_dir, f"shapesworld-test-{sample.index}.png")
        sample.image.save(path)
        examples.append([{"text": sample.vqa[0].question, "files": [path]}, False])
    prompts = ShapesPrompts("test", num_samples=count + 2)
    examples += [[{"text": f"Draw {prompts.prompt(i).text}.", "files": []}, True] for i in range(2, count + 2)]
    return examples


class ActiveTurns:
    """Counts running turns, for the log line that shows the queue's concurrency limit at work."""

    def __init__(self):
        self.lock, self.running = threading.Lock(), 0

    def __enter__(self):
        with self.lock:
            self.running += 1
            logger.info("turn started (%d running)", self.running)

    def __exit__(self, *exc):
        with self.lock:
            self.running -= 1


class ChatEvents:
    """The page's event handlers. Each browser session's conversation is its `gr.State` list of turns; the running
    turn's stop event is kept here by session, so that the Stop button reaches it."""

    def __init__(self, model: llm.TokenFlowMLLM, out_dir: str, limits: Limits):
        self.model, self.out_dir, self.limits = model, out_dir, limits
        self.stops: dict[str, threading.Event] = {}
        self.active = ActiveTurns()

    def answer(self, turns: list[Turn], draw: bool, settings: Settings, request: gr.Request):
        stop = self.stops[request.session_hash] = threading.Event()
        try:
            with self.active:
                for _ in run_turn(self.model, turns, settings, self.limits, True if draw else None, stop,
                                  self.out_dir):
                    yield to_chatbot(turns), turns
        finally:
            if self.stops.get(request.session_hash) is stop:
                del self.stops[request.session_hash]

    def chat(self, message: dict | None, draw: bool, cfg_scale: float, cfg_schedule: str, top_k: int, top_p: float,
             temperature: float, scale_rounds: int, self_check: int, images_per_prompt: int, seed: int,
             random_seed: bool, max_new_tokens: int, turns: list[Turn], request: gr.Request):
        settings = _settings(cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check,
                             images_per_prompt, seed, random_seed, max_new_tokens)
        message = message or {}
        turns = turns + [new_turn(message.get("text"), list(message.get("files") or []), self.limits,
                                  self.model.config.image_placement)]
        for shown, turns in self.answer(turns, draw, settings, request):
            yield shown, None, False, turns  # the text box is cleared and Draw applies to one message

    def regenerate(self, draw: bool, cfg_scale: float, cfg_schedule: str, top_k: int, top_p: float,
                   temperature: float, scale_rounds: int, self_check: int, images_per_prompt: int, seed: int,
                   random_seed: bool, max_new_tokens: int, turns: list[Turn], request: gr.Request):
        if not turns:
            yield [], turns
            return
        settings = _settings(cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check,
                             images_per_prompt, seed, random_seed, max_new_tokens)
        yield from self.answer(turns[:-1] + [turns[-1].restart()], draw, settings, request)

    def stop(self, request: gr.Request):
        if request.session_hash in self.stops:
            self.stops[request.session_hash].set()

    @staticmethod
    def undo(turns: list[Turn]):
        return to_chatbot(turns[:-1]), turns[:-1]


def build_app(model: llm.TokenFlowMLLM, card: ModelCard, out_dir: str, limits: Limits = Limits()) -> gr.Blocks:
    """The page for `model`; drawings, previews and examples are written under `out_dir`."""
    defaults = llm.generation.sampler_defaults(model)
    max_new_tokens = min(limits.max_new_tokens, model.generation_config.max_new_tokens
                         or inspect.signature(llm.chat).parameters["max_new_tokens"].default)
    codebook_size = model.config.tokenizer_config.codebook_size
    events = ChatEvents(model, out_dir, limits)
    with gr.Blocks(title="TokenFlow chat-and-draw") as app:
        gr.Markdown(f"### TokenFlow chat-and-draw\n{card.header()}  \n{HINT}", elem_id="header")
        chatbot = gr.Chatbot(label="Conversation", height=520, elem_id="chat", allow_file_downloads=True)
        # No file_types filter: gradio would refuse other files with a pop-up; load_upload explains in the chat.
        textbox = gr.MultimodalTextbox(file_count="multiple", sources=["upload"],
                                       placeholder="Ask about an image, or ask for a drawing…", show_label=False,
                                       elem_id="message")
        with gr.Row():
            draw = gr.Checkbox(label="Draw", info="draw an image for the next message", value=False,
                               elem_id="draw")
            stop_button = gr.Button("Stop", variant="stop")
            regenerate_button = gr.Button("Regenerate")
            undo_button = gr.Button("Undo")
            clear_button = gr.Button("Clear")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            with gr.Row():
                cfg_scale = gr.Slider(0, 20, value=defaults["cfg_scale"], step=0.5, label="CFG scale")
                cfg_schedule = gr.Radio(list(CFG_SCHEDULES), value=defaults["cfg_schedule"], label="CFG schedule")
                top_k = gr.Slider(0, codebook_size, value=defaults["top_k"], step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.01, 1, value=defaults["top_p"], step=0.01, label="Top-p (1 = off)")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=defaults["temperature"], step=0.05, label="Temperature")
                # Rounds need a model trained with revealed codes; others keep 1.
                scale_rounds = gr.Slider(1, 8, value=defaults["scale_rounds"], step=1, label="Scale rounds",
                                         interactive=model.reveal_projector is not None, elem_id="scale-rounds")
                self_check = gr.Slider(1, MAX_SELF_CHECK, value=defaults["self_check"], step=1,
                                       label="Self-check candidates", elem_id="self-check",
                                       info="draw this many and keep the one the model's own answers support best")
                images_per_prompt = gr.Slider(1, limits.max_images_per_prompt, value=1, step=1,
                                              label="Images per prompt")
                seed = gr.Number(value=0, precision=0, label="Seed")
                random_seed = gr.Checkbox(value=True, label="Random seed")
                new_tokens = gr.Slider(1, limits.max_new_tokens, value=max_new_tokens, step=1, label="Max new tokens",
                                       elem_id="max-new-tokens")
        gr.Markdown(f"Limits: {limits.describe()}.", elem_id="limits")
        gr.Examples(example_messages(out_dir), inputs=[textbox, draw], label="Examples")
        state = gr.State([])

        controls = [cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check, images_per_prompt,
                    seed, random_seed, new_tokens]
        textbox.submit(events.chat, [textbox, draw, *controls, state], [chatbot, textbox, draw, state],
                       api_name="chat")
        regenerate_button.click(events.regenerate, [draw, *controls, state], [chatbot, state], api_name="regenerate")
        undo_button.click(events.undo, [state], [chatbot, state], api_name="undo", concurrency_limit=None)
        clear_button.click(lambda: ([], []), None, [chatbot, state], api_name="clear", concurrency_limit=None)
        stop_button.click(events.stop, None, None, api_name="stop", concurrency_limit=None)
    return app


def _settings(cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check, images_per_prompt, seed,
              random_seed, max_new_tokens) -> Settings:
    """The page's controls as `Settings` (checked later, so that out-of-range values become a chat message)."""
    return Settings(cfg_scale, cfg_schedule, _int(top_k), top_p, temperature, _int(scale_rounds), _int(self_check),
                    _int(images_per_prompt), None if random_seed else _int(seed), _int(max_new_tokens))


def _int(value) -> int:
    """Gradio numbers arrive as floats; whole ones become ints, others stay as they are for the range checks."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


__all__ = ["HINT", "build_app", "example_messages"]
