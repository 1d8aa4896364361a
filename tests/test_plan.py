"""`--plan` for every shipped config at 1 to 1024 GPUs, the slurm scripts' defaults and the docs' examples.

The plan is run in-process through the real entry points (``launch/train.py``, ``launch/finetune_detr.py``):
no process group, no data (the ImageNet / COCO paths of the recipes do not exist here), no GPU.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = sorted(glob.glob(str(ROOT / "configs" / "pretrain" / "[!_]*.yaml")))
DETR = sorted(glob.glob(str(ROOT / "configs" / "detr" / "*.yaml")))
WORLDS = [1, 2, 8, 16, 32, 64, 128, 256, 1024]
IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 1024  # the authors' epoch: every image once at batch 1024
COCO_STEPS_PER_EPOCH = -(-118_287 // 16)  # train2017 at DETR batch 16 (last batch short)


def _entry(script: str):
    spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRIES = {
    "launch/train.py": _entry("launch/train.py"),
    "launch/finetune_detr.py": _entry("launch/finetune_detr.py"),
}


def plan(script: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``script --plan ...`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ENTRIES[script].main([*argv, "--plan"])
    return rc, out.getvalue(), err.getvalue()


def parse(out: str) -> dict:
    m = re.search(r"batch (\d+) x (\d+) x (\d+) = (\d+) \(micro x accum x world\)", out)
    assert m, out
    spe = re.search(r"schedule: ([\d,]+) steps, ([\d,]+) per epoch", out)
    lr = re.search(r"(?:peak lr|\| lr) ([\d.e+-]+)", out)
    micro, accum, world, global_batch = map(int, m.groups())
    return dict(micro=micro, accum=accum, world=world, global_batch=global_batch,
                total=int(spe[1].replace(",", "")), steps_per_epoch=int(spe[2].replace(",", "")),
                lr=float(lr[1]))  # fmt: skip


def labelme_overrides() -> list[str]:
    from detection_helpers import labelme_example

    root = labelme_example()
    ann = root / "annotations.json"
    return [f"data.{k}={v}" for k, v in
            (("train_ann", ann), ("val_ann", ann), ("train_images", root), ("val_images", root))]  # fmt: skip


@pytest.mark.parametrize("path", PRETRAIN + DETR, ids=lambda p: f"{Path(p).parent.name}/{Path(p).stem}")
def test_every_recipe_plans_at_every_world_size(path):
    detr = "/detr/" in path
    script = "launch/finetune_detr.py" if detr else "launch/train.py"
    overrides = labelme_overrides() if "labelme" in path else []
    loaded = ENTRIES[script].STAGE.load(path, overrides)
    g, cap = loaded.deepspeed.global_batch, loaded.deepspeed.micro_batch
    plans = {}
    for world in WORLDS:
        rc, out, err = plan(script, ["--config", path, "--world-size", str(world), *overrides])
        if g is not None and (g < world or g % world):
            # The one documented impossible case: the global batch cannot be split evenly over the ranks.
            assert rc == 2 and f"deepspeed.global_batch: {g} cannot be split over world size {world}" in err
            continue
        assert rc == 0, f"world {world}: {err}"
        p = plans[world] = parse(out)
        assert p["world"] == world and p["micro"] * p["accum"] * world == p["global_batch"]
        assert p["micro"] <= cap
        assert p["global_batch"] == (g if g is not None else cap * world)
    assert plans, "no world size resolved"
    if g is not None:
        # The recipe's global batch and therefore its lr and epoch length hold at every world size.
        assert len({p["lr"] for p in plans.values()}) == 1
        assert len({p["steps_per_epoch"] for p in plans.values()}) == 1, plans
    if "/pretrain/pvt" in path:
        assert set(plans) == set(WORLDS)  # 1024 divides by every size
        assert all(p["lr"] == pytest.approx(1e-3) for p in plans.values())  # 5e-4 x 1024 / 512
        assert all(p["steps_per_epoch"] == IMAGENET_STEPS_PER_EPOCH for p in plans.values())
        assert all(p["total"] == 300 * IMAGENET_STEPS_PER_EPOCH for p in plans.values())
        assert plans[1]["micro"] == 128 and plans[1]["accum"] == 8 and plans[16]["micro"] == 64
    if path.endswith("pvt_small_coco.yaml"):
        assert set(plans) == {1, 2, 8, 16}  # global 16: one image per GPU at most 16 GPUs
        assert all(p["steps_per_epoch"] == COCO_STEPS_PER_EPOCH for p in plans.values())
        assert all(p["lr"] == pytest.approx(1e-4) for p in plans.values())


def test_plan_without_data_says_where_the_epoch_length_comes_from():
    rc, out, _ = plan(
        "launch/train.py", ["--config", "configs/pretrain/pvt_large.yaml", "--world-size", "128"]
    )
    assert rc == 0
    assert "1,281,167 training samples (data.nominal_train_samples" in out
    assert "model pvt_large: 61,369,320 parameters" in out  # REFERENCE.md: the paper's count
    # ZeRO-2 bf16 on 128 ranks: weights 2 B/param whole, gradients 2 B and master+Adam 12 B split 128 ways.
    n = 61_369_320
    expect = f"params {n * 2 / 2**20:.1f} MiB, grads {n * 2 / 128 / 2**20:.1f} MiB"
    assert expect in out, out


def test_plan_takes_the_world_from_the_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "64")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    rc, out, _ = plan("launch/train.py", ["--config", "configs/pretrain/pvt_small.yaml"])
    assert rc == 0 and "world 64 = 8 nodes x 8 | batch 16 x 1 x 64 = 1024" in out, out


def test_plan_refuses_a_warmup_as_long_as_the_run():
    rc, _, err = plan(
        "launch/train.py", ["--config", "configs/pretrain/demo_fashion_mnist.yaml", "--world-size", "2",
                            "schedule.epochs=0.1"]
    )  # fmt: skip
    assert rc == 2 and "schedule.warmup_epochs: warmup (47 steps) must be shorter than training (47" in err


def sbatch_defaults(script: Path) -> tuple[dict[str, str], str]:
    """The script's own ``#SBATCH --key=value`` lines and its default CONFIG."""
    text = script.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)[= ](\S+)", text, re.M))
    config = re.search(r"^CONFIG=\$\{CONFIG:-([^}]+)\}", text, re.M)[1]
    return flags, config


SCRIPTS = {p.name: p for p in sorted((ROOT / "slurm").glob("*.sh")) if "TRAIN_SCRIPT=" in p.read_text()}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_slurm_script_defaults_resolve(name):
    flags, config = sbatch_defaults(SCRIPTS[name])
    entry = re.search(r"^TRAIN_SCRIPT=(\S+)", SCRIPTS[name].read_text(), re.M)[1]
    nodes, tasks = int(flags["nodes"]), int(flags["ntasks-per-node"])
    rc, out, err = plan(
        entry, ["--config", config, "--world-size", str(nodes * tasks), "--nodes", str(nodes)]
    )
    assert rc == 0, err
    assert f"world {nodes * tasks} = {nodes} node{'s' if nodes > 1 else ''} x {tasks} |" in out


def doc_commands() -> list[str]:
    """Shell commands in the fenced blocks of README.md and slurm/README.md and the scripts' usage lines."""
    blocks = []
    for doc in ("README.md", "slurm/README.md"):
        lang = None  # inside a fence: its language ("" when none)
        for line in (ROOT / doc).read_text().splitlines():
            if line.startswith("```"):
                if lang is None:
                    lang = line[3:].strip()
                    blocks.append([])
                else:
                    lang = None
            elif lang in ("", "bash", "sh"):
                blocks[-1].append(line)
    blocks = ["\n".join(b) for b in blocks]
    for script in SCRIPTS.values():
        blocks.append(
            "\n".join(line[3:] for line in script.read_text().splitlines() if line.startswith("#   "))
        )
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def cluster_example(cmd: str) -> tuple[str, list[str]] | None:
    """(entry point, plan arguments) of a cluster launch command, None for other commands."""
    if not re.search(r"\bsbatch\b|launch/submit\.py|--num_gpus|--nproc_per_node|--plan\b", cmd):
        return None
    words = shlex.split(cmd)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if any("..." in w for w in words) or not words:
        return None
    if words[0] == "sbatch":
        script = ROOT / words[-1]
        flags, config = sbatch_defaults(script)
        opts = dict(re.findall(r"--([\w-]+)[= ](\S+)", " ".join(words[1:-1])))
        nodes = int(opts.get("nodes", flags["nodes"]))
        tasks = int(opts.get("ntasks-per-node", flags["ntasks-per-node"]))
        entry = re.search(r"^TRAIN_SCRIPT=(\S+)", script.read_text(), re.M)[1]
        overrides = env.get("OVERRIDES", "").split()
        return entry, ["--config", env.get("CONFIG", config), "--world-size", str(nodes * tasks),
                       "--nodes", str(nodes), *overrides]  # fmt: skip
    if "launch/submit.py" in words:
        from pvt_dist.cluster.submitit_job import parse_args

        args = parse_args(words[words.index("launch/submit.py") + 1 :])
        tasks = args.tasks_per_node or max(args.gpus_per_node, 1)  # as build_executor
        return args.script, ["--config", args.config, "--world-size", str(args.nodes * tasks),
                             "--nodes", str(args.nodes), *args.overrides]  # fmt: skip
    if words[0].startswith("python") and "--plan" in words:
        return words[1], words[2:]
    for launcher, flag in (("deepspeed", "--num_gpus"), ("torchrun", "--nproc_per_node")):
        if words[0] == launcher and flag in words:
            entry = next(w for w in words if w.startswith("launch/"))
            if entry not in ENTRIES:  # e.g. launch/evaluate.py: not a training run, nothing to plan
                return None
            rest = words[words.index(entry) + 1 :]
            return entry, [*rest, "--world-size", words[words.index(flag) + 1]]
    return None


def test_every_cluster_example_in_the_docs_resolves():
    examples = [(cmd, cluster_example(cmd)) for cmd in doc_commands()]
    examples = [(cmd, ex) for cmd, ex in examples if ex is not None]
    # README (2 cluster + 2 single-node), slurm/README (3 + the plan line), the scripts' usage lines (4).
    assert len(examples) >= 9, [cmd for cmd, _ in examples]
    for cmd, (entry, argv) in examples:
        rc, out, err = plan(entry, [a for a in argv if a != "--plan"])
        assert rc == 0, f"{cmd}\n{err}"
        assert "plan: world" in out
