"""Packed training: many DreamBooth runs in one step (``training/pack.py``), jobs files (``jobs.py``), the command line
and accelerate processes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dreambooth_config, free_port, launch_env
from PIL import Image
from safetensors.torch import load_file

from ether_diffusion import registry
from ether_diffusion.cli import main
from ether_diffusion.io import read_adapter_file
from ether_diffusion.jobs import JobsFileError, load_jobs, make_jobs
from ether_diffusion.training.pack import PackedTrainer

ADAPTER = "ether_adapter.safetensors"


@pytest.fixture
def world(training_world):
    return training_world


def settings(count: int, steps: int, **common) -> list[dict]:
    """Jobs that differ in everything a job owns: seed, learning rate, length, prior preservation, schedule."""
    rates = [6e-3, 1e-2, 3e-3, 8e-3]
    schedules = ["constant", "cosine", "linear", "constant"]
    return [
        dict(seed=i, learning_rate=rates[i % 4], max_train_steps=steps + 3 * i, lr_scheduler=schedules[i % 4],
             with_prior_preservation=i % 2 == 1, class_prompt="a star", num_class_images=2, **common)
        for i in range(count)
    ]  # fmt: skip


def jobs_of(world, folder, runs: list[dict]):
    return make_jobs([(f"job{i}", dreambooth_config(world, folder / f"job{i}", **run)) for i, run in enumerate(runs)])


def vectors(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / ADAPTER)


def largest_gap(a: dict, b: dict) -> float:
    """The largest difference of any vector entry, relative to the largest entry of the solo run's file."""
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ether_plus", "ether"])
def test_a_slot_trains_the_adapter_it_trains_alone(world, tmp_path, method):
    """Four jobs of 50-59 steps (own seeds, learning rates, schedules, prior preservation or not) packed 1, 2 and 4
    at a time give each job the adapter its solo run gives: bit for bit at K = 1; at K = 2 and 4 within 5e-5 of the
    largest entry (measured: up to 1.5e-5), because the products of a batch of several runs sum in another order
    than one run's, and 50 AdamW steps carry those float32 roundings on."""
    runs = settings(4, 50, ether_method=method)
    solo = {}
    for i, run in enumerate(runs):
        result = registry.train(dreambooth_config(world, tmp_path / "solo" / f"job{i}", no_final_reload=True, **run))
        solo[f"job{i}"] = vectors(result.output_dir)
    for pack in (1, 2, 4):
        folder = tmp_path / f"pack{pack}"
        runs_here = [{**run, "no_final_reload": True} for run in runs]
        result = PackedTrainer(jobs_of(world, folder, runs_here), pack, folder / "state", quiet=True).train()
        assert sorted(result.results) == sorted(solo) and not result.diverged
        for name, expected in solo.items():
            got = vectors(folder / name)
            if pack == 1:
                assert all(torch.equal(got[k], expected[k]) for k in expected), name
            else:
                assert largest_gap(expected, got) < 5e-5, (pack, name)
            recorded = read_adapter_file(folder / name / ADAPTER)
            assert recorded.adapter_name == "default"  # the job's name for it, not the slot's
            assert recorded.extra["steps"] == str(runs[int(name[-1])]["max_train_steps"])


@pytest.mark.slow
def test_control_runs_pack_each_with_its_own_encoder(tmp_path):
    """Control runs (a condition encoder each, drawn from its seed, and ETHER+ adapters) packed 1 and 2 at a time:
    every run's file (encoder and adapter) is its solo run's, bit for bit at K = 1, to float32 rounding at K = 2."""
    from ether_diffusion.control.data import write_world_control_dataset
    from ether_diffusion.control.pipeline import CONTROL_WEIGHT_NAME
    from ether_diffusion.control.train import ControlConfig

    data = write_world_control_dataset(tmp_path / "data", "segmentation", 6, start=20_000_000)
    runs = [dict(seed=1, learning_rate=1e-2, encoder_learning_rate=1e-3, max_train_steps=6),
            dict(seed=2, learning_rate=3e-3, encoder_learning_rate=2e-3, max_train_steps=8, lr_scheduler="cosine",
                 proportion_empty_prompts=0.5)]  # fmt: skip

    def config(folder, run):
        return ControlConfig(train_data_dir=str(data), output_dir=str(folder), train_batch_size=2, report_to="none",
                             quiet=True, **run)  # fmt: skip

    solo = []
    for i, run in enumerate(runs):
        registry.train(config(tmp_path / "solo" / f"run{i}", run))
        solo.append(load_file(tmp_path / "solo" / f"run{i}" / CONTROL_WEIGHT_NAME))
    assert any(k.startswith("condition_encoder.") for k in solo[0])
    for pack in (1, 2):
        folder = tmp_path / f"pack{pack}"
        jobs = make_jobs([(f"run{i}", config(folder / f"run{i}", run)) for i, run in enumerate(runs)])
        result = PackedTrainer(jobs, pack, folder / "state", quiet=True).train()
        assert sorted(result.results) == ["run0", "run1"]
        for i, expected in enumerate(solo):
            got = load_file(folder / f"run{i}" / CONTROL_WEIGHT_NAME)
            if pack == 1:
                assert all(torch.equal(got[k], expected[k]) for k in expected), i
            else:
                assert largest_gap(expected, got) < 5e-5, i


def test_each_slot_keeps_its_own_latent_cache_and_prompt_table(world, tmp_path):
    """--cache_latents and --pre_compute_text_embeddings in a pack: every run looks its rows up in its own cache and
    table (their prompts and images differ), and trains what it trains alone."""
    caches = dict(cache_latents=True, pre_compute_text_embeddings=True, center_crop=True, no_final_reload=True)
    prompts = ["a sks star", "a zwx star"]
    runs = [dict(run, instance_prompt=prompt, **caches) for run, prompt in zip(settings(2, 6), prompts)]
    jobs = jobs_of(world, tmp_path / "pack", runs)
    PackedTrainer(jobs, 2, tmp_path / "state", quiet=True).train()
    assert all(job.task.backend.text_table is not None for job in jobs)
    assert jobs[0].task.backend.latent_cache is not jobs[1].task.backend.latent_cache
    for i, run in enumerate(runs):
        alone = registry.train(dreambooth_config(world, tmp_path / f"alone{i}", **run))
        assert largest_gap(vectors(alone.output_dir), vectors(tmp_path / "pack" / f"job{i}")) < 5e-5, i


class Recorder:
    def __init__(self):
        self.steps, self.ended = [], []

    def on_pack_step(self, step, slots):
        self.steps.append((step, dict(slots)))

    def on_job_end(self, name, result):
        self.ended.append((name, result.global_step))


def test_a_finished_slot_writes_its_folder_and_the_next_job_takes_its_place(world, tmp_path):
    runs = [dict(max_train_steps=n, seed=i) for i, n in enumerate((3, 6, 4))]
    recorder = Recorder()
    jobs = jobs_of(world, tmp_path, [{**run, "validation_prompt": "a sks star", "validation_steps": 2} for run in runs])
    result = PackedTrainer(jobs, 2, tmp_path / "state", callbacks=[recorder], quiet=True).train()
    assert result.pack_steps == 7  # job2 waits 3 steps, then trains 4 in job0's slot
    assert recorder.ended == [("job0", 3), ("job1", 6), ("job2", 4)]
    assert recorder.steps[2][1] == {1: ("job1", 3)}  # job0 done at step 3: its slot is free until the next step
    assert recorder.steps[3][1] == {0: ("job2", 1), 1: ("job1", 4)}
    for i in range(3):
        folder = tmp_path / f"job{i}"
        names = {p.name for p in folder.iterdir()}
        assert {ADAPTER, "README.md", "samples.png", "validation"} <= names, names
        assert "step-000000" in " ".join(p.name for p in (folder / "validation").iterdir())  # the base model
        assert f"for {runs[i]['max_train_steps']} steps" in (folder / "README.md").read_text()
    # job2 trained in job0's slot after it: the same adapter as alone
    alone = registry.train(dreambooth_config(world, tmp_path / "alone", no_final_reload=True, **runs[2]))
    assert largest_gap(vectors(alone.output_dir), vectors(tmp_path / "job2")) < 5e-5


def test_a_diverging_slot_is_stopped_and_the_others_finish(world, tmp_path):
    jobs = jobs_of(world, tmp_path, [dict(max_train_steps=4, seed=i, no_final_reload=True) for i in range(3)])
    backend = jobs[1].task.backend
    score, calls = backend.score, []

    def nan_at_third(*args, **kwargs):  # what an exploding run looks like to the loop
        loss, parts = score(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), {**parts, "loss": loss * float("nan")}) if len(calls) == 3 else (loss, parts)

    backend.score = nan_at_third
    result = PackedTrainer(jobs, 2, tmp_path / "state", quiet=True).train()
    assert list(result.diverged) == ["job1"] and "non-finite at step 3" in result.diverged["job1"]
    assert sorted(result.results) == ["job0", "job2"]
    assert not (tmp_path / "job1" / ADAPTER).exists()
    for name in ("job0", "job2"):
        assert all(bool(torch.isfinite(v).all()) for v in vectors(tmp_path / name).values())
    assert "job1" in result.report() and "STOPPED" in result.report()


def test_jobs_of_another_adapter_layout_train_in_a_pack_of_their_own(world, tmp_path):
    """ETHER and ETHER+ runs (or other blocks, targets, model) cannot share a step: one pack each, one after the
    other; every job is trained and written."""
    runs = [dict(seed=0, ether_method="ether"), dict(seed=1, ether_method="ether_plus"),
            dict(seed=2, ether_method="ether"), dict(seed=3, ether_method="ether", n_blocks=2)]  # fmt: skip
    runs = [{**run, "max_train_steps": 2} for run in runs]
    recorder = Recorder()
    jobs = jobs_of(world, tmp_path, [{**run, "no_final_reload": True} for run in runs])
    result = PackedTrainer(jobs, 4, tmp_path / "state", callbacks=[recorder], quiet=True).train()
    assert sorted(result.results) == ["job0", "job1", "job2", "job3"]
    assert sorted(p.name for p in (tmp_path / "state" / "process-0-of-1").iterdir()) == ["pack-0", "pack-1", "pack-2"]
    assert recorder.steps[0][1] == {0: ("job0", 1), 1: ("job2", 1)}  # the two ETHER n=1 runs share their steps
    assert read_adapter_file(tmp_path / "job1" / ADAPTER).configs["unet"].method == "ether_plus"


KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from conftest import dreambooth_config
    from ether_diffusion.jobs import make_jobs
    from ether_diffusion.training.pack import PackedTrainer

    world, folder, kill_at, runs = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    resume = sys.argv[6] == "resume"

    class Kill:
        def on_pack_step(self, step, slots):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    jobs = make_jobs([(f"job{i}", dreambooth_config(world, folder / f"job{i}", **run)) for i, run in enumerate(runs)])
    result = PackedTrainer(jobs, 2, folder / "state", resume=resume, callbacks=[Kill()], quiet=True).train()
    print(json.dumps({"skipped": result.skipped}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 5])
def test_a_killed_pack_resumes_to_the_adapters_of_the_uninterrupted_run(world, tmp_path, kill_at):
    """kill -9 after job0 finished and wrote its folder (step 3, the last checkpoint at 2) or mid-way (step 5):
    resuming gives every job the bit-identical adapter of the uninterrupted pack."""
    runs = [dict(max_train_steps=n, seed=i, checkpointing_steps=2, no_final_reload=True, **extra)
            for i, (n, extra) in enumerate([(3, {}), (6, {"with_prior_preservation": True, "class_prompt": "a star",
                                            "num_class_images": 2}), (5, {"lr_scheduler": "cosine"})])]  # fmt: skip
    tests = str(Path(__file__).parent)

    def pack(folder, kill_at, resume=False):  # each in a process of its own, with the same threads
        return subprocess.run([sys.executable, "-c", KILLED_RUN, tests, str(world), str(folder), str(kill_at),
                               json.dumps(runs), "resume" if resume else "new"], capture_output=True, text=True,
                              timeout=300, env=launch_env())  # fmt: skip

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert pack(whole, -1).returncode == 0
    run = pack(killed, kill_at)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not (killed / "job2" / ADAPTER).exists()  # it was killed before the end
    resumed = pack(killed, -1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished_before = ["job0"] if kill_at == 5 else []
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["skipped"] == finished_before
    for i in range(3):
        expected, got = vectors(whole / f"job{i}"), vectors(killed / f"job{i}")
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"job{i}"


class StopWhen:
    """Asks the pack to stop at pack step ``at``, or once job ``job`` took a slot (while its class images are drawn);
    records the per-job events a page would show."""

    def __init__(self, at=None, job=None):
        self.at, self.job, self.now, self.started, self.steps = at, job, 0, [], []

    def on_pack_step(self, step, slots):
        self.now = step

    def on_job_start(self, name):
        self.started.append(name)

    def on_job_step(self, name, step, logs):
        self.steps.append((name, step, logs["loss"], logs["lr"]))

    def should_stop(self):
        return (self.at is not None and self.now >= self.at) or self.job in self.started


def test_a_stopped_pack_checkpoints_where_it_stood_and_resumes_exactly(world, tmp_path):
    """``should_stop()`` ends the run after the current packed step (or while a job's class images are drawn: that
    job waits in the queue) with a checkpoint there, whatever --checkpointing_steps says; resuming gives every job
    the bit-identical adapter of the uninterrupted run. The per-job events carry each job's step, loss and rate."""
    prior = {"with_prior_preservation": True, "class_prompt": "a star", "num_class_images": 2}
    runs = [dict(max_train_steps=n, seed=i, checkpointing_steps=100, no_final_reload=True, **extra)
            for i, (n, extra) in enumerate([(3, {}), (6, prior), (5, {"lr_scheduler": "cosine"})])]  # fmt: skip
    whole = StopWhen()
    PackedTrainer(jobs_of(world, tmp_path / "whole", runs), 2, tmp_path / "whole" / "state", callbacks=[whole],
                  quiet=True).train()  # fmt: skip
    assert [(name, step) for name, step, _, _ in whole.steps[:4]] == [("job0", 1), ("job1", 1), ("job0", 2),
                                                                      ("job1", 2)]  # fmt: skip
    assert all(np.isfinite(loss) and lr >= 0 for _, _, loss, lr in whole.steps) and whole.steps[0][3] > 0
    assert whole.started == ["job0", "job1", "job2"]
    for stopper in (StopWhen(at=4), StopWhen(job="job1")):
        folder = tmp_path / f"stopped-{stopper.at}"
        result = PackedTrainer(jobs_of(world, folder, runs), 2, folder / "state", callbacks=[stopper],
                               quiet=True).train()  # fmt: skip
        assert result.stopped
        assert sorted(result.results) == (["job0"] if stopper.at else [])
        assert not (folder / "job2" / ADAPTER).exists()
        checkpoints = sorted((folder / "state").rglob("checkpoint-*"))
        assert [c.name for c in checkpoints] == [f"checkpoint-{stopper.at or 0}"]
        record = json.loads((checkpoints[0] / "pack.json").read_text())
        slots, queue = {k: v["job"] for k, v in record["slots"].items()}, record["queue"]
        # at step 4: job0 done (step 3), job2 in its slot; stopped at job1's class images: job1 waits, not drawn
        assert (slots, queue) == (({"0": "job2", "1": "job1"}, []) if stopper.at else ({"0": "job0"}, ["job1", "job2"]))
        resumed = PackedTrainer(jobs_of(world, folder, runs), 2, folder / "state", resume=True, quiet=True).train()
        assert not resumed.stopped and sorted(resumed.results) == (["job1", "job2"] if stopper.at else
                                                                   ["job0", "job1", "job2"])  # fmt: skip
        for i in range(3):
            expected, got = vectors(tmp_path / "whole" / f"job{i}"), vectors(folder / f"job{i}")
            assert all(torch.equal(got[k], expected[k]) for k in expected), (stopper.at, f"job{i}")


def test_a_pack_refuses_to_resume_with_other_jobs(world, tmp_path):
    runs = [dict(max_train_steps=2, seed=i, checkpointing_steps=1, no_final_reload=True) for i in range(3)]
    PackedTrainer(jobs_of(world, tmp_path, runs), 2, tmp_path / "state", quiet=True).train()
    other = [dict(run, seed=run["seed"] + 10) for run in runs]
    # a finished pack is skipped on resume; an unfinished one checks the jobs it trained
    for marker in (tmp_path / "state").rglob("pack_finished"):
        marker.unlink()
    from ether_diffusion.training import ResumeMismatchError

    with pytest.raises(ResumeMismatchError, match="job 'job0' is not the job.*settings differ: seed"):
        PackedTrainer(jobs_of(world, tmp_path, other), 2, tmp_path / "state", resume=True, quiet=True).train()


# --- jobs files ------------------------------------------------------------------------------------------------------
def write_jobs(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_a_jobs_file_trains_every_job_in_its_folder(world, tmp_path, monkeypatch):
    jobs = write_jobs(tmp_path / "jobs.toml", f"""
        output_dir = "{tmp_path / 'runs'}"
        pack = 2

        [defaults]
        pretrained_model_name_or_path = "{world / 'model'}"
        instance_data_dir = "{world / 'instance'}"
        max_train_steps = 2
        report_to = "none"
        no_final_reload = true
        target_modules = ["unet-attention-image"]

        [[job]]
        name = "star"
        instance_prompt = "a sks star"
        learning_rate = 1e-2

        [[job]]
        name = "star-prior"
        instance_prompt = "a sks star"
        with_prior_preservation = true
        class_prompt = "a star"
        num_class_images = 2
        seed = 3
        output_dir = "{tmp_path / 'elsewhere'}"
    """)  # fmt: skip
    found = load_jobs(jobs)
    assert [job.name for job in found.jobs] == ["star", "star-prior"] and found.pack == 2
    assert found.jobs[0].config.learning_rate == 1e-2 and found.jobs[1].config.seed == 3
    assert main(["train", "--jobs", str(jobs), "--quiet"]) == 0
    for folder in (tmp_path / "runs" / "star", tmp_path / "elsewhere"):
        assert read_adapter_file(folder / ADAPTER).extra["steps"] == "2"
    assert (tmp_path / "runs" / "pack-state" / "process-0-of-1" / "pack-0" / "pack_finished").is_file()
    # run again to the end: resuming a finished pack trains nothing and keeps the files
    before = (tmp_path / "elsewhere" / ADAPTER).read_bytes()
    assert main(["train", "--jobs", str(jobs), "--resume_from_checkpoint", "latest", "--quiet"]) == 0
    assert (tmp_path / "elsewhere" / ADAPTER).read_bytes() == before


def test_a_bad_jobs_file_is_refused_with_one_line_per_problem_and_nothing_written(world, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), "uint8")).save(broken / "0.png")
    (broken / "1.png").write_bytes(b"not a png")
    jobs = write_jobs(tmp_path / "jobs.toml", f"""
        output_dir = "{tmp_path / 'runs'}"

        [defaults]
        pretrained_model_name_or_path = "{world / 'model'}"
        instance_prompt = "a sks star"
        report_to = "none"

        [[job]]
        name = "typo"
        instance_data_dir = "{world / 'instance'}"
        learnin_rate = 1e-3

        [[job]]
        name = "missing"
        instance_data_dir = "{tmp_path / 'nowhere'}"

        [[job]]
        name = "corrupt"
        instance_data_dir = "{broken}"

        [[job]]
        name = "accumulated"
        instance_data_dir = "{world / 'instance'}"
        gradient_accumulation_steps = 2

        [[job]]
        name = "first"
        instance_data_dir = "{world / 'instance'}"
        output_dir = "{tmp_path / 'same'}"

        [[job]]
        name = "second"
        instance_data_dir = "{world / 'instance'}"
        output_dir = "{tmp_path / 'same'}"

        [[job]]
        name = "dora"
        instance_data_dir = "{world / 'instance'}"
        use_dora = true
    """)  # fmt: skip
    assert main(["train", "--jobs", str(jobs)]) == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert len(lines) == 6, err
    assert lines[0].startswith("job 'typo': unknown key 'learnin_rate'")
    assert lines[1].startswith("job 'missing':") and "nowhere" in lines[1]
    assert lines[2].startswith("job 'corrupt':") and "1.png" in lines[2]
    assert lines[3].startswith("job 'accumulated': --gradient_accumulation_steps does not pack")
    assert lines[4].startswith("job 'dora': 'use_dora' is refused")
    assert lines[5].startswith("job 'second': writes") and "as job 'first' does" in lines[5]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "same").exists()  # nothing trained or written


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[job]\nname = 1", "is not a TOML jobs file"),
        ("pak = 2\n[[job]]\nname = 'a'", "unknown top-level key 'pak'"),
        ("output_dir = 'x'", "no [[job]] tables"),
        ("pack = 0\n[[job]]\nname = 'a'\ninstance_prompt = 'a sks star'", "pack = 0 must be a whole number"),
        ("[[job]]\nname = 'a'\ninstance_prompt = 'a sks star'", "job 'a': no output_dir"),
    ],
)
def test_a_malformed_jobs_file_says_what_is_wrong(tmp_path, text, message):
    with pytest.raises(JobsFileError, match=message.replace("[", r"\[")):
        load_jobs(write_jobs(tmp_path / "jobs.toml", text))
    with pytest.raises(FileNotFoundError, match="jobs file .* does not exist"):
        load_jobs(tmp_path / "none.toml")


@pytest.mark.slow
def test_two_processes_share_the_jobs_and_train_what_one_process_trains(world, tmp_path):
    """Under `accelerate launch --num_processes 2` process i trains jobs i, i + 2: jobs 0 and 2 in one pack, 1 and 3
    in the other. One process given the jobs in the order 0, 2, 1, 3 packs them the same way, and trains the same
    adapters bit for bit (each job's generator is seeded from its own seed, not from the process). Jobs packed with
    other partners agree to float32 rounding (test_a_slot_trains_the_adapter_it_trains_alone)."""

    def jobs_file(root: Path, order) -> Path:
        head = textwrap.dedent(f"""
            output_dir = "{root}"
            [defaults]
            pretrained_model_name_or_path = "{world / 'model'}"
            instance_data_dir = "{world / 'instance'}"
            instance_prompt = "a sks star"
            report_to = "none"
            no_final_reload = true
            quiet = true
        """)  # fmt: skip
        entries = "".join(f'\n[[job]]\nname = "job{i}"\nseed = {i}\nmax_train_steps = {steps[i]}\n' for i in order)
        path = tmp_path / f"{root.name}.toml"
        path.write_text(head + entries)
        return path

    steps = [3, 5, 3, 5]  # partners end together, so the one process never pairs jobs the two processes do not
    cli = str(Path(sys.executable).parent / "ether-diffusion")
    one, two = tmp_path / "one", tmp_path / "two"
    run = subprocess.run([cli, "train", "--jobs", str(jobs_file(one, [0, 2, 1, 3])), "--pack", "2", "--quiet"],
                         capture_output=True, text=True, timeout=600, env=launch_env())  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), cli, "train", "--jobs", str(jobs_file(two, range(4))), "--pack", "2",
               "--quiet"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (two / "pack-state").iterdir()) == ["process-0-of-2", "process-1-of-2"]
    for i in range(4):
        expected, got = vectors(one / f"job{i}"), vectors(two / f"job{i}")
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"job{i}"
        assert read_adapter_file(two / f"job{i}" / ADAPTER).extra["steps"] == str(steps[i])


# --- what else packs ------------------------------------------------------------------------------------------------
def test_text_encoder_adapters_train_in_their_slots_too(world, tmp_path):
    """--train_text_encoder: the text encoder's adapters are routed per sample as the UNet's are; each run trains the
    text-encoder vectors it trains alone."""
    runs = [dict(run, train_text_encoder=True, no_final_reload=True) for run in settings(2, 5)]
    PackedTrainer(jobs_of(world, tmp_path / "pack", runs), 2, tmp_path / "state", quiet=True).train()
    for i, run in enumerate(runs):
        alone = registry.train(dreambooth_config(world, tmp_path / f"alone{i}", **run))
        expected, got = vectors(alone.output_dir), vectors(tmp_path / "pack" / f"job{i}")
        assert any(k.startswith("text_encoder.") for k in got)
        assert largest_gap(expected, got) < 5e-5, i


def test_bf16_packs_train_under_autocast(world, tmp_path):
    runs = [dict(seed=i, max_train_steps=3, mixed_precision="bf16", no_final_reload=True) for i in range(2)]
    result = PackedTrainer(jobs_of(world, tmp_path, runs), 2, tmp_path / "state", quiet=True).train()
    assert sorted(result.results) == ["job0", "job1"]
    for i in range(2):
        assert vectors(tmp_path / f"job{i}")  # written, finite (the loader refuses non-finite vectors)
        assert "mixed precision bf16" in (tmp_path / f"job{i}" / "README.md").read_text()


def test_sdxl_runs_pack(tmp_path):
    """An SDXL model packs: both text encoders' conditions, pooled embeddings and size/crop ids per run."""
    from conftest import build_tiny_sdxl_components
    from diffusers import StableDiffusionXLPipeline

    (tmp_path / "tokenizer").mkdir()
    StableDiffusionXLPipeline(**build_tiny_sdxl_components(tmp_path / "tokenizer")).save_pretrained(tmp_path / "sdxl")
    images = tmp_path / "instance"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
    common = dict(pretrained_model_name_or_path=str(tmp_path / "sdxl"), instance_data_dir=str(images),
                  instance_prompt="a sks star", report_to="none", quiet=True, no_final_reload=True)  # fmt: skip
    runs = [dict(common, seed=i, max_train_steps=4, random_flip=True) for i in range(2)]
    configs = [registry.DreamBoothXLConfig(output_dir=str(tmp_path / f"job{i}"), **run) for i, run in enumerate(runs)]
    jobs = make_jobs([(f"job{i}", config) for i, config in enumerate(configs)])
    PackedTrainer(jobs, 2, tmp_path / "state", quiet=True).train()
    for i, run in enumerate(runs):
        alone = registry.train(registry.DreamBoothXLConfig(output_dir=str(tmp_path / f"alone{i}"), **run))
        expected, got = vectors(alone.output_dir), vectors(tmp_path / f"job{i}")
        # after one step 6-8 of the 18,432 entries differ by more than 1e-6 (up to 9e-5): entries whose gradient is
        # near zero, where AdamW's first steps (about lr · g / |g|) turn float32 rounding into a visible move; the
        # rest agree, and the gap does not grow with the steps (measured to 20)
        off = torch.cat([(expected[k] - got[k]).abs().flatten() for k in expected])
        assert largest_gap(expected, got) < 1e-3 and float((off > 1e-6).float().mean()) < 0.01, i


def test_flow_matching_models_are_refused_naming_the_job(tmp_path):
    from conftest import build_tiny_flux_components
    from diffusers import FluxPipeline

    FluxPipeline(**build_tiny_flux_components(tmp_path)).save_pretrained(tmp_path / "flux")
    images = tmp_path / "instance"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), "uint8")).save(images / "0.png")
    config = registry.DreamBoothFluxConfig(pretrained_model_name_or_path=str(tmp_path / "flux"), report_to="none",
                                           instance_data_dir=str(images), instance_prompt="a sks star",
                                           output_dir=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(JobsFileError, match="job 'flux': Flux runs do not pack yet"):
        make_jobs([("flux", config)])


def test_the_training_script_takes_a_jobs_file_too(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_dreambooth_ether.py"
    run = subprocess.run([sys.executable, str(script), "--jobs", str(tmp_path / "none.toml")], capture_output=True,
                         text=True, timeout=120, env=launch_env())  # fmt: skip
    assert run.returncode == 2 and f"jobs file '{tmp_path / 'none.toml'}' does not exist" in run.stderr


def test_every_per_job_flag_is_a_flag_and_the_rest_make_the_pack_key():
    import dataclasses

    from ether_diffusion.training.dreambooth import DreamBoothConfig
    from ether_diffusion.training.pack import PER_JOB, pack_key

    fields = {f.name for f in dataclasses.fields(DreamBoothConfig)}
    assert PER_JOB <= fields, sorted(PER_JOB - fields)
    base = DreamBoothConfig(instance_prompt="a sks star", instance_data_dir="x")
    assert pack_key(base) == pack_key(base.replace(seed=3, learning_rate=1e-3, instance_prompt="a zwx dog"))
    assert pack_key(base) != pack_key(base.replace(ether_method="ether"))
    assert pack_key(base) != pack_key(base.replace(resolution=32))
