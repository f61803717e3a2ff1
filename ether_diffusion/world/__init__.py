"""The tiny world: a procedural set of captioned images, its DreamBooth subjects, and the tiny Stable Diffusion
trained on it (see docs/tiny_world.md)."""

from ..assets import AssetError, default_model_path, default_subjects_path
from ..models import load_tiny_pipeline
from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SEGMENTATION_CLASSES, SHAPES, SIZE_NAMES, TEXTURES
from .render import Rendering, edge_map, render
from .scene import PromptAttributes, PromptObject, Scene, WorldObject, caption, parse_prompt, scene_for_seed

__all__ = [
    "AssetError",
    "default_model_path",
    "default_subjects_path",
    "load_tiny_pipeline",
    "BACKGROUND_NAMES",
    "COLOUR_NAMES",
    "POSITIONS",
    "SEGMENTATION_CLASSES",
    "SHAPES",
    "SIZE_NAMES",
    "TEXTURES",
    "PromptAttributes",
    "PromptObject",
    "Rendering",
    "Scene",
    "WorldObject",
    "caption",
    "edge_map",
    "parse_prompt",
    "render",
    "scene_for_seed",
]
