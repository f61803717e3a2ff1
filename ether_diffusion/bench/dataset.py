"""The DreamBooth dataset layout (google/dreambooth), read strictly, and the tiny world written in it.

    dataset/
      prompts_and_classes.txt          the subject → class list and two lists of 25 prompt templates
      backpack/00.jpg 01.jpg ...       4-6 images per subject
      dog/00.jpg ...

``prompts_and_classes.txt`` as the dataset ships it::

    Classes

    subject_name,class
    backpack,backpack
    dog,dog
    ...

    Prompts

    Object Prompts

    prompt_list = [
    'a {0} {1} in the jungle'.format(unique_token, class_token),
    ...
    ]

    Live Subject Prompts

    prompt_list = [
    'a {0} {1} wearing a red hat'.format(unique_token, class_token),
    ...
    ]

``{0}`` is the identifier (``sks``) and ``{1}`` the class noun. Which subjects are "live" the file does not say; the
DreamBooth paper's live subjects are its cats and dogs, so ``live_classes`` defaults to ``("cat", "dog")``. The
prompt the model is given keeps the identifier ("a sks dog in the jungle"); the text CLIP-T compares the image with
replaces it by nothing, as the field does ("a dog in the jungle").

    data = load_subject_dataset("dreambooth/dataset")
    for subject in data.subjects:
        prompts = data.prompts(subject)                  # [BenchPrompt(text, class_text), ...] 25 of them
    export_world_dataset("outputs/tiny-dreambooth")     # the shipped subjects in this layout
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_folder
from ..images import IMAGE_EXTENSIONS
from ..training.text import MAX_PROMPT_CHARS, check_prompt, read_text_file
from ..world.subjects import load_subjects

__all__ = [
    "DEFAULT_IDENTIFIER",
    "LIVE_CLASSES",
    "PROMPTS_FILE",
    "WORLD_TEMPLATES",
    "BenchPrompt",
    "BenchSubject",
    "MAX_PROMPTS_FILE_BYTES",
    "DatasetError",
    "SubjectDataset",
    "export_world_dataset",
    "fill_template",
    "load_subject_dataset",
    "parse_prompts_and_classes",
    "write_prompts_and_classes",
]

PROMPTS_FILE = "prompts_and_classes.txt"
#: the largest prompts file read: google/dreambooth's is 4 KB; a file of this size holds thousands of templates
MAX_PROMPTS_FILE_BYTES = 1 << 20
DEFAULT_IDENTIFIER = "sks"
LIVE_CLASSES = ("cat", "dog")
_TEMPLATE_LINE = re.compile(r"""^(['"])(.*)\1\s*(\.format\(\s*unique_token\s*,\s*class_token\s*\))?\s*,?$""")
_SECTIONS = {"object prompts": "object", "live subject prompts": "live", "live prompts": "live"}

# The tiny world's prompt templates, in the dataset's format: the kinds of change of each shipped subject's own
# evaluation prompts (new backgrounds, positions and sizes, a second object, a changed colour or texture), worded
# so that every template is valid for every shipped subject (no background, colour or texture of a subject).
WORLD_TEMPLATES: tuple[str, ...] = (
    "a {0} {1} on a white background",
    "a {0} {1} on a black background",
    "a {0} {1} on a gray background",
    "a {0} {1} on a blue background",
    "a {0} {1} at top left",
    "a {0} {1} at top right",
    "a {0} {1} at bottom left",
    "a {0} {1} at bottom right",
    "a {0} {1} at center",
    "a small {0} {1}",
    "a large {0} {1}",
    "a small {0} {1} on a black background",
    "a large {0} {1} on a white background",
    "a {0} {1} at top left on a gray background",
    "a {0} {1} at bottom right on a blue background",
    "a small {0} {1} at top right",
    "a large {0} {1} at center",
    "a {0} {1} at top left and a red solid circle at bottom right",
    "a blue solid cross at top right and a {0} {1} at bottom left",
    "a white striped circle at top left and a {0} {1} at bottom right",
    "a {0} {1} at bottom left and a black dotted cross at top right",
    "a red {0} {1}",
    "a blue {0} {1}",
    "a white {0} {1}",
    "a solid {0} {1}",
)


class DatasetError(ValueError):
    """A dataset folder or prompts file that cannot be used; the message says where and what to do."""


@dataclass(frozen=True)
class BenchPrompt:
    """One evaluation prompt of a subject: ``text`` (with the identifier) is sampled, ``class_text`` (identifier
    removed, "a dog in the jungle") is what CLIP-T scores the image against."""

    template: str
    text: str
    class_text: str


@dataclass(frozen=True)
class BenchSubject:
    name: str
    class_noun: str
    live: bool
    folder: Path
    image_paths: tuple[Path, ...]

    def instance_prompt(self, identifier: str = DEFAULT_IDENTIFIER) -> str:
        return f"a {identifier} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun}"


@dataclass(frozen=True)
class SubjectDataset:
    root: Path
    subjects: tuple[BenchSubject, ...]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def subject(self, name: str) -> BenchSubject:
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise DatasetError(f"no subject '{name}' in '{self.root}'; it has {', '.join(s.name for s in self.subjects)}")

    def select(self, names: list[str] | None) -> list[BenchSubject]:
        """The subjects named (in the order given), or all of them."""
        if not names:
            return list(self.subjects)
        return [self.subject(name) for name in names]

    def templates(self, subject: BenchSubject) -> tuple[str, ...]:
        return self.live_templates if subject.live else self.object_templates

    def prompts(self, subject: BenchSubject, identifier: str = DEFAULT_IDENTIFIER, count: int | None = None):
        """The subject's evaluation prompts (the first ``count`` templates of its kind)."""
        templates = self.templates(subject)[:count]
        noun = subject.class_noun
        return [
            BenchPrompt(t, fill_template(t, identifier, noun), " ".join(fill_template(t, "", noun).split()))
            for t in templates
        ]

    def fingerprint(self) -> str:
        """A digest of what the benchmark reads (classes, templates, image file names and sizes): a resumed run
        must see the same data, wherever the folder now lives."""
        record = {
            "subjects": [
                [s.name, s.class_noun, s.live, [(p.name, p.stat().st_size) for p in s.image_paths]]
                for s in self.subjects
            ],
            "object": self.object_templates,
            "live": self.live_templates,
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _check_template(template: str, where: str) -> str:
    """``template`` if it is a prompt template: at most ``MAX_PROMPT_CHARS`` characters, plain ``{0}`` and ``{1}``
    fields only. Format specs and conversions are refused before anything is formatted: a width such as
    ``{0:>300000000}`` would build a string of that many characters."""
    try:
        check_prompt(template, f"{where}: the template")
    except ValueError as err:
        raise DatasetError(str(err)) from None
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        message = f"{where}: the template {template[:80]!r} is not a format string of {{0}} and {{1}} ({err})"
        raise DatasetError(message) from None
    for _, field, spec, conversion in pieces:
        if field is None:
            continue
        if spec or conversion:
            shown = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            raise DatasetError(
                f"{where}: the template {template[:80]!r} has the field {shown[:40]!r}; templates take plain {{0}} "
                "(the identifier) and {1} (the class), without format specs or conversions"
            )
        if field not in ("", "0", "1"):
            raise DatasetError(
                f"{where}: the template {template!r} is not a format string of {{0}} and {{1}} (it names {{{field}}})"
            )
    try:
        filled = template.format("<identifier>", "<class>")  # plain fields only: no longer than the template allows
    except (IndexError, KeyError, ValueError) as err:
        message = f"{where}: the template {template!r} is not a format string of {{0}} and {{1}} ({err})"
        raise DatasetError(message) from None
    if "<identifier>" not in filled or "<class>" not in filled:
        raise DatasetError(f"{where}: the template {template!r} must name the identifier {{0}} and the class {{1}}")
    return template


def fill_template(template: str, identifier: str, noun: str, where: str = PROMPTS_FILE) -> str:
    """``template`` filled with the identifier and class noun; its length is counted from its fields first, so a
    prompt over ``MAX_PROMPT_CHARS`` is refused (``DatasetError`` naming the template) before it is built."""
    pieces = list(string.Formatter().parse(template))
    values = {"": None, "0": identifier, "1": noun}
    auto = iter((identifier, noun))
    length = sum(len(literal) for literal, _, _, _ in pieces)
    for _, field, _, _ in pieces:
        if field is not None:
            length += len(values[field] if field else next(auto, ""))
    if length > MAX_PROMPT_CHARS:
        raise DatasetError(
            f"{where}: the template {template[:80]!r} filled with {identifier[:40]!r} and {noun[:40]!r} is {length:,} "
            f"characters, over the limit of {MAX_PROMPT_CHARS:,}; shorten the template or the class noun"
        )
    return template.format(identifier, noun)


def parse_prompts_and_classes(text: str, where: str = PROMPTS_FILE) -> tuple[dict[str, str], list[str], list[str]]:
    """``(subject → class, object templates, live templates)`` of a ``prompts_and_classes.txt`` (see the module
    docstring). Anything the format does not allow is a ``DatasetError`` with its line number."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    section, current = None, None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        at = f"{where}, line {number}"
        if not line:
            continue
        if current is not None:  # inside a prompt_list = [ ... ]
            if line.startswith("]"):
                lists[section], current = current, None
                continue
            match = _TEMPLATE_LINE.match(line)
            if not match:
                raise DatasetError(
                    f"{at}: expected a quoted template such as 'a {{0}} {{1}} in the snow'.format(unique_token, "
                    f"class_token), found {line!r}"
                )
            current.append(_check_template(match.group(2), at))
            continue
        lowered = " ".join(line.lower().split())
        if lowered == "classes":
            section = "classes"
        elif lowered == "prompts":
            section = None
        elif lowered in _SECTIONS:
            section = _SECTIONS[lowered]
            if section in lists:
                raise DatasetError(f"{at}: a second '{line}' section")
        elif section == "classes":
            if lowered.replace(" ", "") == "subject_name,class":
                continue
            name, comma, noun = (part.strip() for part in line.partition(","))
            if not comma or not name or not noun or "/" in name or name.startswith("."):
                raise DatasetError(f"{at}: expected 'subject_folder,class noun', found {line[:200]!r}")
            try:
                check_prompt(line, f"{at}: the class row")
            except ValueError as err:
                raise DatasetError(str(err)) from None
            if name in classes:
                raise DatasetError(f"{at}: subject '{name}' is listed twice")
            classes[name] = noun
        elif section in ("object", "live") and line.endswith("["):
            current = []
        else:
            raise DatasetError(
                f"{at}: unexpected {line!r} (sections: 'Classes' with 'subject_name,class' rows, then 'Object "
                "Prompts' and 'Live Subject Prompts', each a prompt_list = [ ... ])"
            )
    if current is not None:
        raise DatasetError(f"{where}: the '{section}' prompt list is not closed with ']'")
    if not classes:
        raise DatasetError(f"{where}: no subjects (a 'Classes' section with 'subject_name,class' rows)")
    if not lists.get("object"):
        raise DatasetError(f"{where}: no object prompt templates (an 'Object Prompts' section with a prompt_list)")
    return classes, lists["object"], lists.get("live", [])


def write_prompts_and_classes(path: str | Path, classes: dict[str, str], object_templates, live_templates=()) -> Path:
    """Write the file ``parse_prompts_and_classes`` reads, in the dataset's own format."""

    def block(title: str, templates) -> list[str]:
        rows = [f"'{t}'.format(unique_token, class_token)," for t in templates]
        rows[-1] = rows[-1].rstrip(",")
        return [title, "", "prompt_list = [", *rows, "]", ""]

    lines = ["Classes", "", "subject_name,class", *(f"{name},{noun}" for name, noun in classes.items()), "", "",
             "Prompts", "", *block("Object Prompts", object_templates)]  # fmt: skip
    if live_templates:
        lines += ["", *block("Live Subject Prompts", live_templates)]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _dataset_root(path: Path) -> Path:
    if (path / PROMPTS_FILE).is_file():
        return path
    if (path / "dataset" / PROMPTS_FILE).is_file():  # a clone of the google/dreambooth repository
        return path / "dataset"
    if not path.is_dir():
        raise DatasetError(f"the dataset folder '{path}' does not exist")
    raise DatasetError(
        f"'{path}' is not a DreamBooth-layout dataset: it has no {PROMPTS_FILE}. Pass the dataset/ folder of "
        "https://github.com/google/dreambooth, or write the tiny world in this layout with "
        "`ether-diffusion bench export-world --output DIR`"
    )


def load_subject_dataset(path: str | Path, live_classes=LIVE_CLASSES) -> SubjectDataset:
    """Read a DreamBooth-layout dataset (its folder, or a clone of the repository holding ``dataset/``): every
    subject listed must have a folder with images, and every kind of subject present must have its prompts."""
    root = _dataset_root(Path(path))
    limit = "the dataset's own is 4 KB: 30 classes and 50 templates"
    try:
        text = read_text_file(root / PROMPTS_FILE, MAX_PROMPTS_FILE_BYTES, "prompts file", limit)
    except ValueError as err:
        raise DatasetError(str(err)) from None
    classes, object_templates, live_templates = parse_prompts_and_classes(text, str(root / PROMPTS_FILE))
    subjects, problems = [], []
    for name, noun in classes.items():
        folder = root / name
        images = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.startswith("."))  # fmt: skip
        if not folder.is_dir():
            problems.append(f"'{name}' has no folder")
        elif not images:
            problems.append(f"'{name}/' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        else:
            subjects.append(BenchSubject(name, noun, noun in live_classes, folder, tuple(images)))
    if problems:
        raise DatasetError(
            f"{len(problems)} subject(s) of {root / PROMPTS_FILE} cannot be used: {'; '.join(problems[:5])}"
            f"{' …' if len(problems) > 5 else ''}. Add their images or remove their rows from the Classes list"
        )
    live = [s.name for s in subjects if s.live]
    if live and not live_templates:
        raise DatasetError(
            f"{root / PROMPTS_FILE} has live subjects ({', '.join(live[:3])}: classes {', '.join(live_classes)}) but "
            "no 'Live Subject Prompts' list; add it, or pass other live classes"
        )
    return SubjectDataset(root, tuple(subjects), tuple(object_templates), tuple(live_templates))


def export_world_dataset(output: str | Path, subjects_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the tiny world's shipped subjects as a DreamBooth-layout dataset at ``output``: each subject's five
    instance images (lossless PNG: the evaluator reads colours and textures) and a ``prompts_and_classes.txt``
    with the class nouns and ``WORLD_TEMPLATES``. The folder appears complete or not at all."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise DatasetError(f"'{output}' exists and is not empty; pass --overwrite to replace it")
    subjects = load_subjects(subjects_root)
    with atomic_folder(output) as staging:
        for subject in subjects:
            folder = staging / subject.name
            folder.mkdir()
            for index, source in enumerate(subject.image_paths):
                shutil.copyfile(source, folder / f"{index:02d}{source.suffix}")
        write_prompts_and_classes(staging / PROMPTS_FILE, {s.name: s.class_noun for s in subjects}, WORLD_TEMPLATES)
        (staging / "README.md").write_text(
            "# The tiny world's subjects in the DreamBooth dataset layout\n\n"
            "Written by `ether-diffusion bench export-world` from `assets/subjects/`: every subject's instance "
            "images and a `prompts_and_classes.txt` in the format of google/dreambooth (object subjects only; the "
            "templates are `ether_diffusion.bench.dataset.WORLD_TEMPLATES`). Benchmark it with\n\n"
            f"    ether-diffusion bench dreambooth --dataset {output}\n"
        )
    return output
