"""Splits and indexable datasets of ShapesWorld, generated on the fly from (seed, split, index).

Every sample has its own integer seed, built so that no two (seed, split, index) triples share one: splits can
never overlap, and sample i is the same whatever else is read. Each part of a sample (scene, captions, questions,
each prompt) draws from its own stream of that seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from .language import PROMPT_TAGS, Prompt, QAPair, make_captions, make_prompt, make_vqa
from .render import check_image_size, object_bbox, render_scene
from .world import MAX_OBJECTS, Rng, Scene, check_held_out_mode, sample_scene

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_INDEX_BITS = 32


def sample_seed(split: str, index: int, seed: int = 0) -> int:
    """The seed of sample `index` of `split`; distinct for every (seed, split, index) by construction."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if not 0 <= index < 2**_INDEX_BITS:
        raise ValueError(f"sample index must be in [0, 2**{_INDEX_BITS}), got {index}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return (seed * len(SPLITS) + SPLITS.index(split)) << _INDEX_BITS | index


def resolve_held_out(split: str, held_out: str | None) -> str:
    """None means "exclude" for train and "include" otherwise; train only ever excludes."""
    if held_out is None:
        return "exclude" if split == "train" else "include"
    check_held_out_mode(held_out)
    if split == "train" and held_out != "exclude":
        raise ValueError(f"the train split never contains held-out pairs; held_out must be 'exclude', got {held_out!r}")
    return held_out


def scene_description(scene: Scene, image_size: int) -> dict:
    """`scene.to_dict()` with each object's pixel bounding box (x0, y0, x1, y1, end-exclusive) at this size."""
    record = scene.to_dict()
    for entry, obj in zip(record["objects"], scene.objects):
        entry["bbox"] = list(object_bbox(obj, image_size))
    return record


@dataclass
class ShapesSample:
    index: int
    seed: int
    image: Image.Image
    scene: Scene
    captions: list[str]
    vqa: list[QAPair]
    prompts: list[Prompt]  # one per PROMPT_TAGS entry, each with its own target scene

    @property
    def description(self) -> dict:
        return scene_description(self.scene, self.image.width)


@dataclass
class PromptSample:
    index: int
    seed: int
    prompt: Prompt
    image: Image.Image  # the target scene, rendered


class _Indexed:
    """Shared bookkeeping of the two datasets: split, size, length, seed and held-out policy."""

    def __init__(self, split: str, size: int, num_samples: int, seed: int, held_out: str | None) -> None:
        check_image_size(size)
        if not isinstance(num_samples, int) or not 0 <= num_samples <= 2**_INDEX_BITS:
            raise ValueError(f"num_samples must be an int in [0, 2**{_INDEX_BITS}], got {num_samples!r}")
        sample_seed(split, 0, seed)  # validates split and seed
        self.split, self.size, self.num_samples, self.seed = split, size, num_samples, seed
        self.held_out = resolve_held_out(split, held_out)

    def __len__(self) -> int:
        return self.num_samples

    def sample_seed(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {self.num_samples} samples")
        return sample_seed(self.split, index, self.seed)


class ShapesWorld(_Indexed):
    """`world[i]` is sample i of `split`: a rendered scene with its captions, questions and drawing prompts."""

    def __init__(self, split: str = "train", size: int = 64, num_samples: int = 10000, seed: int = 0,
                 held_out: str | None = None) -> None:
        super().__init__(split, size, num_samples, seed, held_out)

    def __getitem__(self, index: int) -> ShapesSample:
        return self.sample(index)

    def sample(self, index: int, max_objects: int = MAX_OBJECTS) -> ShapesSample:
        """Sample `index` (`world[index]`), or with `max_objects` below `MAX_OBJECTS` the scene of that seed drawn
        with at most that many objects (a curriculum's early scenes)."""
        seed = self.sample_seed(index)
        scene = sample_scene(Rng(seed, "scene"), self.held_out, max_objects=max_objects)
        return ShapesSample(
            index=index,
            seed=seed,
            image=render_scene(scene, self.size),
            scene=scene,
            captions=make_captions(scene, Rng(seed, "captions")),
            vqa=make_vqa(scene, Rng(seed, "vqa"), self.held_out),
            prompts=[sample_prompt(seed, tag, self.held_out) for tag in PROMPT_TAGS],
        )


def sample_prompt(seed: int, tag: str, held_out: str) -> Prompt:
    """The prompt of category `tag` belonging to the sample with this seed."""
    return make_prompt(tag, Rng(seed, f"prompt/{tag}"), held_out)


class ShapesPrompts(_Indexed):
    """`prompts[i]` is a drawing prompt with its rendered target scene, tags taken in turn (i % len(tags)), so
    any length-multiple of len(tags) is balanced across categories. It is the prompt of that tag in ShapesWorld
    sample i of the same split and seed."""

    def __init__(self, split: str = "test", size: int = 64, num_samples: int = 600, seed: int = 0,
                 held_out: str | None = None, tags: Sequence[str] = PROMPT_TAGS) -> None:
        super().__init__(split, size, num_samples, seed, held_out)
        if not tags:
            raise ValueError(f"tags must name at least one of {', '.join(PROMPT_TAGS)}")
        for tag in tags:
            if tag not in PROMPT_TAGS:
                raise ValueError(f"unknown prompt tag {tag!r}; allowed: {', '.join(PROMPT_TAGS)}")
        self.tags = tuple(tags)

    def prompt(self, index: int) -> Prompt:
        """The prompt of item `index` without rendering its target scene."""
        return sample_prompt(self.sample_seed(index), self.tags[index % len(self.tags)], self.held_out)

    def __getitem__(self, index: int) -> PromptSample:
        prompt = self.prompt(index)
        return PromptSample(index, self.sample_seed(index), prompt, render_scene(prompt.scene, self.size))
