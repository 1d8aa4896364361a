"""Safe loading of files a user can be handed: a checkpoint file that pickles code is refused before any of
it runs, by torch.load(weights_only=True) where we load, and by a scan of its pickled globals before
DeepSpeed's own full unpickling (export). The hostile files are made on the spot with torch.save."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pvt_dist.engine.checkpoint import check_pickles, safe_load
from pvt_dist.export import main as export_main


class Payload:
    """Unpickling this runs `open(marker, "w")`: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_file(path, marker) -> None:
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(str(marker))}, path)


def test_safe_load_refuses_a_pickled_callable(tmp_path):
    marker = tmp_path / "pwned"
    hostile_file(tmp_path / "rank_00000.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: GLOBAL io\.open"):
        safe_load(str(tmp_path / "rank_00000.pt"))
    assert not marker.exists()


def test_safe_load_reads_a_rank_state_with_numpy_rng(tmp_path):
    import numpy as np

    state = {"rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}, "step": 3}
    torch.save(state, tmp_path / "rank_00000.pt")
    back = safe_load(str(tmp_path / "rank_00000.pt"))
    assert back["step"] == 3 and np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])


def test_export_refuses_a_hostile_checkpoint_before_unpickling(tmp_path, capsys):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text(json.dumps({"step": 2, "zero_stage": 1, "world_size": 1}))
    (run / "checkpoints" / "latest").write_text("step_00000002")
    marker = tmp_path / "pwned"
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    hostile_file(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(
        ValueError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt pickles \['io\.open'\]"
    ):
        check_pickles(str(tag))
    assert export_main([str(run), str(tmp_path / "w.pth")]) == 1
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "w.pth").exists()


# ----------------------------------------------------------------------- names read from files stay inside


def test_example_archive_with_escaping_members_is_refused(tmp_path):
    import io
    import tarfile

    from pvt_dist.detection.fetch_example_data import EXAMPLE_DIR, extract

    for bad in (f"{EXAMPLE_DIR}JPEGImages/../../../../escaped.jpg", "/tmp/absolute-escape.jpg"):
        sdist = tmp_path / "labelme.tar.gz"
        with tarfile.open(sdist, "w:gz") as tar:
            for name in (f"{EXAMPLE_DIR}annotations.json", bad):
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
        out = tmp_path / "out"
        with pytest.raises(RuntimeError, match=f"refusing tar member {bad!r}"):
            extract(sdist, out)
        assert not (tmp_path / "escaped.jpg").exists() and not list(tmp_path.rglob("escaped.jpg"))


def test_manifest_shard_outside_its_folder_is_refused(tmp_path):
    from pvt_dist.data.index import resolve_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {
        "splits": {"train": {"shards": [{"name": "../elsewhere/train-000000.tar", "num_samples": 4}]}}
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"manifest\.json names shard '\.\./elsewhere/train-000000\.tar' outside"
    ):
        resolve_shards(str(shards), "data.train_shards", "train")


def test_coco_file_name_outside_the_image_folder_is_refused(tmp_path):
    from pvt_dist.detection.targets import validate_coco_dataset

    for name in ("../secret.jpg", "/etc/hostname"):
        dataset = {
            "images": [{"id": 1, "file_name": name, "width": 10, "height": 10}],
            "annotations": [],
            "categories": [{"id": 1, "name": "a"}],
        }
        with pytest.raises(ValueError, match=f"image id 1: file_name {name!r} leaves the image folder"):
            validate_coco_dataset(dataset, "ann.json", image_root=tmp_path)


def test_s3_url_is_one_shell_argument(tmp_path):
    """webdataset runs `pipe:` commands through the shell: a hostile shard name must not run a command."""
    import subprocess

    from pvt_dist.data.index import stream_url

    marker = tmp_path / "pwned"
    cmd = stream_url(f"s3://bucket/train-0.tar; touch {marker}; echo ")
    assert cmd.startswith("pipe:aws s3 cp --quiet '")
    subprocess.run(cmd[len("pipe:") :], shell=True, capture_output=True, check=False)
    assert not marker.exists()
