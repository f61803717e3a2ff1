"""Jobs files: many DreamBooth runs in one TOML file, trained packed (``training/pack.py``).

The keys are the flags of ``ether-diffusion train`` without their dashes, as in a kohya dataset file or an
accelerate configuration; ``[defaults]`` holds what every job shares, each ``[[job]]`` what is its own::

    output_dir = "runs"                 # each job's folder: runs/<name>, unless the job sets output_dir
    pack = 8                            # jobs per step (the command line's --pack wins)

    [defaults]
    pretrained_model_name_or_path = "models/sd15"
    max_train_steps = 400
    with_prior_preservation = true

    [[job]]
    name = "dog"
    instance_data_dir = "data/dog"
    instance_prompt = "a sks dog"
    class_prompt = "a dog"

Relative paths are read from the current folder, as the flags' are. Everything is checked before any training
starts, and every problem is reported at once, one line per problem naming its job: an unknown key, a flag that does
not pack, a missing folder or an image that does not load, two jobs writing one folder.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from .registry import resolve, task_for
from .training.adapters import EtherAdapters
from .training.config import ConfigError, RunConfig, TaskKind
from .training.pack import PACKED_FAMILIES, Job, pack_refusal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["JobsFile", "JobsFileError", "job_for", "load_jobs", "make_jobs"]

TOP_LEVEL = ("output_dir", "pack", "defaults", "job")
PACK_STATE = "pack-state"


class JobsFileError(ValueError):
    """A jobs file that cannot train: one line per problem, each naming its job."""


@dataclasses.dataclass
class JobsFile:
    """A parsed, checked jobs file: its jobs, the pack size it asks for, and where the packed run keeps its state."""

    path: Path
    jobs: list[Job]
    pack: int | None
    state_dir: Path


def load_jobs(path: str | Path) -> JobsFile:
    """Read and check ``path``; raises ``JobsFileError`` listing every problem, ``FileNotFoundError`` if missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file '{path}' does not exist; see docs/training.md for its format")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise JobsFileError(f"'{path}' is not a TOML jobs file: {err}") from None
    problems = [f"'{path}': unknown top-level key '{key}' (a jobs file has {', '.join(TOP_LEVEL)}; a flag goes in "
                "[defaults] or a [[job]])" for key in data if key not in TOP_LEVEL]  # fmt: skip
    defaults, entries = data.get("defaults", {}), data.get("job", [])
    if not isinstance(defaults, dict):
        problems.append(f"'{path}': [defaults] must be a table of flags")
        defaults = {}
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        problems.append(f"'{path}': no [[job]] tables: give each run as a [[job]] with its name and flags")
        entries = []
    pack = data.get("pack")
    if pack is not None and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
        problems.append(f"'{path}': pack = {pack!r} must be a whole number of at least 1")
        pack = None
    root = data.get("output_dir")
    jobs: list[Job] = []
    for number, entry in enumerate(entries, 1):
        name = str(entry.get("name") or f"job-{number}")
        job, found = _job(name, {**defaults, **{k: v for k, v in entry.items() if k != "name"}}, root)
        problems += found
        if job is not None:
            jobs.append(job)
    problems += _clashes(jobs, [str(e.get("name") or f"job-{n}") for n, e in enumerate(entries, 1)])
    if problems:
        raise JobsFileError("the jobs file cannot run:\n" + "\n".join(f"  {p}" for p in problems))
    state_dir = Path(root) / PACK_STATE if root else path.with_suffix("").parent / f"{path.stem}-{PACK_STATE}"
    return JobsFile(path, jobs, pack, state_dir)


def _job(name: str, flags: dict, root: str | None) -> tuple[Job | None, list[str]]:
    """The job ``name`` of ``flags`` (a checked configuration and its task, its inputs read), or its problems."""
    label = f"job '{name}'"
    if "output_dir" not in flags:
        if not root:
            return None, [f"{label}: no output_dir (give it one, or a top-level output_dir for every job's folder)"]
        flags["output_dir"] = str(Path(root) / name)
    try:
        _, entry = resolve(TaskKind.DREAMBOOTH, flags.get("pretrained_model_name_or_path"), flags.get("revision"),
                           flags.get("config"))  # fmt: skip
    except (ValueError, OSError) as err:
        return None, [f"{label}: {err}"]
    config_class = entry.config
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True)}
    by_flag = {(f.metadata.get("flag") or f.name): f.name for f in fields.values()}
    hints = typing.get_type_hints(config_class)
    problems, values = [], {}
    for key, value in flags.items():
        if key in config_class.foreign_flags:
            answer = config_class.foreign_flags[key]
            if not answer.accepted:
                problems.append(f"{label}: '{key}' is refused: {answer.reason}")
            continue
        if key not in by_flag:
            problems.append(f"{label}: unknown key '{key}' (not a flag of `ether-diffusion train`; see its --help)")
            continue
        values[by_flag[key]] = _coerce(value, hints[by_flag[key]])
    if problems:
        return None, problems
    try:
        config = config_class(**values)
    except TypeError as err:  # a required flag not given
        missing = str(err).rpartition(":")[2].strip() or str(err)
        return None, [f"{label}: missing {missing} (required)"]
    return job_for(name, config)


def make_jobs(named: list[tuple[str, RunConfig]]) -> list[Job]:
    """Jobs from ``(name, configuration)`` pairs (the benchmarks', the studio's), checked as a jobs file's are."""
    jobs, problems = [], []
    for name, config in named:
        job, found = job_for(name, config)
        problems += found
        if job is not None:
            jobs.append(job)
    problems += _clashes(jobs, [name for name, _ in named])
    if problems:
        raise JobsFileError("the jobs cannot run:\n" + "\n".join(f"  {p}" for p in problems))
    return jobs


def job_for(name: str, config: RunConfig) -> tuple[Job | None, list[str]]:
    """The job ``name`` of ``config`` (validated, packable, its inputs read), or its problems."""
    label = f"job '{name}'"
    try:
        config.validate()
    except ConfigError as err:
        return None, [f"{label}: {err}"]
    refusal = pack_refusal(config)
    if refusal:
        return None, [f"{label}: {refusal}"]
    family, _ = resolve(config.kind, config.pretrained_model_name_or_path, config.revision,
                        config.model_config)  # fmt: skip
    if family.name not in PACKED_FAMILIES:
        return None, [f"{label}: {family.label} runs do not pack yet (the UNet models do: SD 1.x/2.x, SDXL); train it "
                      "alone with `ether-diffusion train`"]  # fmt: skip
    try:
        task = task_for(config, EtherAdapters("pack", family.name, recorded_name=config.adapter_name))
        task.check_inputs()
    except (OSError, ValueError) as err:
        return None, [f"{label}: {err}"]
    return Job(name, task.config, task), []


def _coerce(value, annotation):
    """A TOML value as the field holds it: a list for a many-valued flag (``target_modules``), floats for floats."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is tuple or (args and typing.get_origin(args[0]) is tuple):
        return tuple(value) if isinstance(value, list) else value
    if float in (args or [annotation]) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _clashes(jobs: list[Job], names: list[str]) -> list[str]:
    """Two jobs with one name, or writing one folder."""
    problems = []
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    problems += [f"job '{name}': {count} jobs have this name; give each a name of its own"
                 for name, count in seen.items() if count > 1]  # fmt: skip
    folders: dict[Path, str] = {}
    for job in jobs:
        folder = Path(job.config.output_dir).resolve()
        if folder in folders:
            problems.append(f"job '{job.name}': writes '{job.config.output_dir}', as job '{folders[folder]}' does; "
                            "give each job its own output_dir")  # fmt: skip
        else:
            folders[folder] = job.name
    return problems
