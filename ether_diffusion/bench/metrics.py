"""The metrics of the benchmarks behind one interface, so that the same command scores real data with the field's
models and the tiny world with its own evaluator, offline.

Subject-driven generation (``SubjectMetrics``), per (subject, run):

| backend       | metric          | definition                                                                       |
|---------------|-----------------|----------------------------------------------------------------------------------|
| ``dino-clip`` | DINO            | mean cosine of DINO ViT-S/16 CLS embeddings, every generated vs every real image |
|               | CLIP-I          | the same with CLIP (ViT-L/14) image embeddings                                   |
|               | CLIP-T          | mean cosine of each generated image's CLIP embedding and its prompt's text       |
|               |                 | embedding, the identifier removed ("a dog in the jungle")                        |
| ``world``     | subject fid.    | the world evaluator's embedding cosine, generated vs real (its DINO / CLIP-I)    |
|               | prompt fid.     | fraction of the prompt's attributes read in the image (its CLIP-T)               |
|               | diversity       | mean pairwise embedding distance of the generated images (its LPIPS diversity)   |

Controllable generation (``Segmenter``): mIoU and pixel accuracy between the segmenter's reading of each generated
image and the reference mask, accumulated over the whole evaluation set (classes present in either, pixels labelled
``IGNORE_INDEX`` skipped). The world's segmenter stands in offline; ``TransformersSegmenter`` loads any
``AutoModelForSemanticSegmentation`` (SegFormer, UperNet, ...).

The models load through transformers (``ViTModel``, ``CLIPModel``) from a Hub id or a local folder; preprocessing is
done here with PIL and numpy (resize the short side, centre crop, normalise), the transforms of the DINO and CLIP
papers' evaluation code, so no torchvision is needed and every transformers version gives the same numbers.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..evaluation import diversity, instance_self_similarity, load_evaluator, prompt_fidelity, segment, subject_fidelity

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "IGNORE_INDEX",
    "ClipEncoder",
    "DinoClipMetrics",
    "DinoEncoder",
    "Metric",
    "MetricModelError",
    "Segmenter",
    "SubjectMetrics",
    "TransformersSegmenter",
    "WorldMetrics",
    "WorldSegmenter",
    "frechet_distance",
    "segmentation_scores",
]

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = 255


class MetricModelError(RuntimeError):
    """A metric model that cannot be loaded; the message says which flag to change."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # the column header
    stands_for: str = ""  # the field's metric a stand-in replaces ("" for the field's own metrics)
    higher_is_better: bool | None = True  # None: neither (diversity)

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return f"{self.label}{arrow}"


def _as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def preprocess(images, size: int, mean, std, resize_to: int | None = None) -> torch.Tensor:
    """(N, 3, size, size): the short side resized to ``resize_to`` (default ``size``, bicubic), the centre
    ``size`` × ``size`` cropped, scaled to [0, 1] and normalised."""
    resize_to = resize_to or size
    batch = []
    for image in images:
        image = _as_rgb(image)
        short, long = sorted(image.size)
        new_long = max(size, int(resize_to * long / short))  # truncated, as torchvision's Resize(int) computes it
        width, height = (resize_to, new_long) if image.width <= image.height else (new_long, resize_to)
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        batch.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _normalisation(source: str, default_mean, default_std):
    """``image_mean``/``image_std`` of a local folder's ``preprocessor_config.json``, else the defaults."""
    config = Path(source) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", default_mean)), tuple(data.get("image_std", default_std))
    return default_mean, default_std


def _load(loader, source: str, what: str, flag: str):
    try:
        return loader(source)
    except (OSError, ValueError) as err:
        raise MetricModelError(
            f"cannot load the {what} '{source}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pass "
            f"{flag} a local folder (a copy of the model, e.g. from `huggingface-cli download {source}`), or score "
            "with the tiny world's evaluator (--metrics world) offline"
        ) from err


def _features(output) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` give a tensor (transformers 4) or an output whose
    ``pooler_output`` is the projected embedding (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _mean_pair_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b.T).mean())


def _mean_distinct_similarity(e: torch.Tensor) -> float:
    n = e.shape[0]
    if n < 2:
        return float("nan")
    sims = e @ e.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


class DinoEncoder:
    """CLS embeddings of a DINO ViT (``ViTModel``), with DINO's evaluation transform: short side to 256/224 of the
    input size (bicubic), centre crop, ImageNet normalisation."""

    def __init__(self, source: str = DEFAULT_DINO_MODEL, device="cpu", batch_size: int = 32):
        from transformers import ViTModel

        self.source, self.device, self.batch_size = source, torch.device(device), batch_size
        self.model = _load(lambda s: ViTModel.from_pretrained(s, add_pooling_layer=False), source, "DINO model",
                           "--dino_model").eval().to(self.device)  # fmt: skip
        self.size = int(self.model.config.image_size)
        self.mean, self.std = _normalisation(source, IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """(N, D) unit-norm CLS embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = preprocess(images[i : i + self.batch_size], self.size, self.mean, self.std,
                                resize_to=round(self.size * 256 / 224))  # fmt: skip
            hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
            out.append(_unit(hidden[:, 0]).cpu())  # (B, D): the CLS token
        return torch.cat(out)


class ClipEncoder:
    """CLIP image and text embeddings (``CLIPModel``), with CLIP's transform: short side to the input size
    (bicubic), centre crop, CLIP's normalisation; texts truncated to the model's context (77 tokens)."""

    def __init__(self, source: str = DEFAULT_CLIP_MODEL, device="cpu", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.source, self.device, self.batch_size = source, torch.device(device), batch_size
        self.model = _load(CLIPModel.from_pretrained, source, "CLIP model", "--clip_model").eval().to(self.device)
        self.tokenizer = _load(AutoTokenizer.from_pretrained, source, "CLIP tokenizer", "--clip_model")
        self.size = int(self.model.config.vision_config.image_size)
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = _normalisation(source, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = preprocess(images[i : i + self.batch_size], self.size, self.mean, self.std)
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            out.append(_unit(_features(features)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.context, return_tensors="pt")  # fmt: skip
            features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                    attention_mask=tokens.attention_mask.to(self.device))  # fmt: skip
            out.append(_unit(_features(features)).cpu())
        return torch.cat(out)


# --- subject-driven ---------------------------------------------------------------------------------------------


class SubjectMetrics(ABC):
    """Scores the images a run generated for one subject. ``texts[i]`` is the prompt of ``generated[i]`` with the
    identifier removed; ``real`` are the subject's dataset images."""

    name: str = "metrics"
    metrics: tuple[Metric, ...] = ()
    description: str = ""
    #: the keys (of ``metrics``) of the trade-off plot's axes: subject fidelity (x) and prompt fidelity (y); None: the
    #: backend has no such pair and the benchmark draws no trade-off plot
    subject_metric: str | None = None
    prompt_metric: str | None = None

    def identity(self) -> dict:
        """What makes two runs' numbers comparable (recorded with the benchmark; a resume must match it)."""
        return {"metrics": self.name}

    @abstractmethod
    def score(self, generated: list, texts: list[str], real: list) -> dict[str, float]: ...

    @abstractmethod
    def real_ceiling(self, real: list) -> dict[str, float]:
        """The image metrics of the real images against each other (distinct pairs): what a model that draws the
        subject perfectly would reach."""


class DinoClipMetrics(SubjectMetrics):
    """The field's DINO, CLIP-I and CLIP-T (DreamBooth, Ruiz et al. 2023; the ETHER and OFT papers' Table 2)."""

    name = "dino-clip"
    metrics = (Metric("dino", "DINO"), Metric("clip_i", "CLIP-I"), Metric("clip_t", "CLIP-T"))
    subject_metric, prompt_metric = "dino", "clip_t"  # DINO tells instances apart; CLIP-I also rewards the class

    def __init__(self, dino_model: str = DEFAULT_DINO_MODEL, clip_model: str = DEFAULT_CLIP_MODEL, device="cpu"):
        self.dino = DinoEncoder(dino_model, device)
        self.clip = ClipEncoder(clip_model, device)
        self.description = f"DINO: `{dino_model}` CLS cosine; CLIP-I / CLIP-T: `{clip_model}` embedding cosine"

    def identity(self) -> dict:
        return {"metrics": self.name, "dino_model": self.dino.source, "clip_model": self.clip.source}

    def score(self, generated, texts, real) -> dict[str, float]:
        if len(generated) != len(texts):
            raise ValueError(f"{len(generated)} images but {len(texts)} prompts")
        clip_generated = self.clip.embed_images(generated)
        return {
            "dino": _mean_pair_similarity(self.dino.embed(generated), self.dino.embed(real)),
            "clip_i": _mean_pair_similarity(clip_generated, self.clip.embed_images(real)),
            "clip_t": float((clip_generated * self.clip.embed_texts(texts)).sum(-1).mean()),
        }

    def real_ceiling(self, real) -> dict[str, float]:
        return {
            "dino": _mean_distinct_similarity(self.dino.embed(real)),
            "clip_i": _mean_distinct_similarity(self.clip.embed_images(real)),
        }


class WorldMetrics(SubjectMetrics):
    """The tiny world's evaluator standing in for DINO / CLIP-I, CLIP-T and LPIPS diversity (offline, CPU)."""

    name = "world"
    metrics = (
        Metric("subject_fidelity", "subject fidelity", "DINO / CLIP-I"),
        Metric("prompt_fidelity", "prompt fidelity", "CLIP-T"),
        Metric("diversity", "diversity", "LPIPS diversity", None),
    )
    subject_metric, prompt_metric = "subject_fidelity", "prompt_fidelity"
    description = (
        "the tiny world's evaluator (`assets/evaluator`): subject fidelity = embedding cosine to the real images "
        "(stands for DINO / CLIP-I), prompt fidelity = share of the prompt's attributes read in the image (CLIP-T), "
        "diversity = mean pairwise embedding distance (LPIPS diversity)"
    )

    def __init__(self, evaluator=None):
        self.evaluator = evaluator if evaluator is not None else load_evaluator()

    def score(self, generated, texts, real) -> dict[str, float]:
        return {
            "subject_fidelity": subject_fidelity(generated, real, self.evaluator),
            "prompt_fidelity": prompt_fidelity(generated, texts, self.evaluator)["overall"],
            "diversity": diversity(generated, self.evaluator) if len(generated) > 1 else float("nan"),
        }

    def real_ceiling(self, real) -> dict[str, float]:
        return {"subject_fidelity": instance_self_similarity(real, self.evaluator)}


# --- controllable: segmentation ---------------------------------------------------------------------------------


class Segmenter(ABC):
    """Reads class masks out of images, in the label space of the reference masks."""

    name: str = "segmenter"

    def identity(self) -> dict:
        return {"segmenter": self.name}

    @abstractmethod
    def segment(self, images: list, size: tuple[int, int]) -> np.ndarray:
        """(N, H, W) int64 class ids at ``size`` = (H, W)."""


class WorldSegmenter(Segmenter):
    """The world evaluator's segmentation head: 0 background, 1 + the index of each shape."""

    name = "world"

    def __init__(self, evaluator=None):
        self.evaluator = evaluator if evaluator is not None else load_evaluator()

    def segment(self, images, size):
        masks = segment(images, self.evaluator).astype(np.int64)  # (N, 64, 64)
        if masks.shape[1:] != tuple(size):
            resized = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=tuple(size), mode="nearest")
            masks = resized[:, 0].long().numpy()
        return masks


class TransformersSegmenter(Segmenter):
    """Any ``AutoModelForSemanticSegmentation`` (e.g. ``nvidia/segformer-b4-finetuned-ade-512-512`` for ADE20K):
    images resized to the model's input size, ImageNet-normalised (or its folder's ``preprocessor_config.json``),
    logits upsampled to the mask size, arg-max."""

    def __init__(self, source: str, device="cpu", batch_size: int = 8, size: int | None = None):
        from transformers import AutoModelForSemanticSegmentation

        self.name, self.device, self.batch_size = source, torch.device(device), batch_size
        self.model = _load(AutoModelForSemanticSegmentation.from_pretrained, source, "segmenter",
                           "--segmenter").eval().to(self.device)  # fmt: skip
        self.mean, self.std = _normalisation(source, IMAGENET_MEAN, IMAGENET_STD)
        self.size = size or _input_size(source, self.model)

    @torch.no_grad()
    def segment(self, images, size):
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [_as_rgb(im).resize((self.size, self.size), Image.BILINEAR)
                     for im in images[i : i + self.batch_size]]  # fmt: skip
            pixels = preprocess(chunk, self.size, self.mean, self.std).to(self.device, self.model.dtype)
            logits = self.model(pixel_values=pixels).logits.float()  # (B, classes, h, w)
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            out.append(logits.argmax(1).cpu().numpy().astype(np.int64))
        return np.concatenate(out)


def _input_size(source: str, model) -> int:
    config = Path(source) / "preprocessor_config.json"
    if config.is_file():
        size = json.loads(config.read_text()).get("size")
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        if isinstance(size, int):
            return size
    return int(getattr(model.config, "image_size", 512) or 512)


def segmentation_scores(predicted: np.ndarray, reference: np.ndarray, ignore_index: int = IGNORE_INDEX) -> dict:
    """mIoU and pixel accuracy over a whole set of masks (N, H, W): intersections and unions summed over every
    image, then the IoU averaged over the classes present in either (the usual semantic-segmentation protocol)."""
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.shape != reference.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {reference.shape}")
    valid = reference != ignore_index
    p, t = predicted[valid], reference[valid]
    if t.size == 0:
        raise ValueError(f"every reference pixel is {ignore_index} (ignored): nothing to score")
    classes = np.union1d(np.unique(p), np.unique(t))
    ious = [np.logical_and(p == c, t == c).sum() / np.logical_or(p == c, t == c).sum() for c in classes]
    return {"miou": float(np.mean(ious)), "pixel_accuracy": float((p == t).mean())}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula on any features: |mu_a - mu_b|² + tr(C_a + C_b - 2 (C_a C_b)^½), with tr((C_a C_b)^½) the sum
    of the square roots of the eigenvalues of C_a^½ C_b C_a^½ (symmetric: no general matrix square root needed)."""
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
