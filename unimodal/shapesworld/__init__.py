"""ShapesWorld: the project's built-in synthetic world of coloured shapes.

    world = ShapesWorld("train", size=64, num_samples=10000)
    sample = world[0]            # .image, .scene, .captions, .vqa, .prompts
    ShapesPrompts("test")[0]     # .prompt (GenEval metadata + target scene), .image
    score_prompt(image, prompt.meta)["correct"];  score_scene(image, scene)["exact"]

See world.py (vocabulary, scenes), render.py (drawing), language.py (captions, questions, prompts),
scorer.py (reading images back and grading), dataset.py (splits), export.py (files on disk), labels.py (what each
cell and each feature-grid slot holds, as tensors).
"""

from .dataset import (
    SPLITS, PromptSample, ShapesPrompts, ShapesSample, ShapesWorld, resolve_held_out, sample_prompt, sample_seed,
    scene_description,
)
from .export import EXPORT_FORMATS, export, export_captions, export_geneval, export_imagefolder, export_llava
from .language import (
    ANSWER_VOCAB, PROMPT_TAGS, QUESTION_TYPES, REASONED_TYPES, Prompt, QAPair, check_prompt_meta, describe_scene,
    final_answer, make_captions, make_prompt, make_questions, make_vqa, prompt_checks,
)
from .render import object_bbox, render_scene
from .scorer import (
    DetectedObject, ScorerConfig, ShapesEval, grade_prompt, grade_scene, read_back, score_prompt, score_scene,
)
from .sheet import contact_sheet
from .world import (
    BACKGROUNDS, CELL_NAMES, COLOR_NAMES, COLORS, HELD_OUT_MODES, HELD_OUT_PAIRS, MAX_OBJECTS, RELATIONS, SHAPES,
    SIZES, Rng, Scene, SceneObject, curriculum_max_objects, relation_holds, sample_scene,
)

__all__ = [
    "ANSWER_VOCAB", "BACKGROUNDS", "CELL_NAMES", "COLORS", "COLOR_NAMES", "DetectedObject", "EXPORT_FORMATS",
    "HELD_OUT_MODES", "HELD_OUT_PAIRS", "MAX_OBJECTS", "PROMPT_TAGS", "Prompt", "PromptSample", "QAPair",
    "QUESTION_TYPES", "REASONED_TYPES", "RELATIONS", "Rng", "SHAPES", "SIZES", "SPLITS", "Scene", "SceneObject",
    "ScorerConfig", "ShapesEval", "ShapesPrompts", "ShapesSample", "ShapesWorld", "check_prompt_meta",
    "contact_sheet", "curriculum_max_objects", "describe_scene", "export", "export_captions", "export_geneval",
    "export_imagefolder", "export_llava", "final_answer", "grade_prompt", "grade_scene", "make_captions",
    "make_prompt", "make_questions", "make_vqa", "object_bbox", "prompt_checks", "read_back", "relation_holds",
    "render_scene", "resolve_held_out", "sample_prompt", "sample_scene", "sample_seed", "scene_description",
    "score_prompt", "score_scene",
]
