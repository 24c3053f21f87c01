"""``dist.device`` (mva-train) and ``device`` (mva-infer): auto | cpu | cuda.

"auto" was the only behaviour before: a GPU node used its GPUs, and a job sent to a node without a usable GPU
trained on that node's CPU without a word. ``cuda`` refuses that at start-up in one line; ``cpu`` keeps a job
off the GPUs of a GPU node (gloo; DeepSpeed's CPU accelerator). No GPU here: the CUDA side of ``pick_device``
runs in the device check (scripts/device/check.sh).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_device_choice.py -q
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.train_utils import PY, ROOT, as_cli, env, tiny_config, tiny_overrides, tiny_store
from trainer import dist
from trainer.config import ConfigError, config_to_json
from trainer.infer_config import InferConfig
from trainer.resume_settings import check_same_settings
from trainer.train import train

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def test_device_values_are_checked_when_the_config_is_read(store, tmp_path):
    with pytest.raises(ConfigError, match=r"dist.device must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"):
        tiny_config(store, tmp_path / "run", **{"dist.device": "gpu"})
    with pytest.raises(ConfigError, match=r"^device must be one of .* got 'cuda:1'"):
        InferConfig(model_dir="m", store="s", output="o", device="cuda:1")
    with pytest.raises(dist.DeviceError, match="device must be one of"):
        dist.pick_device("tpu", 0)


@NO_GPU
def test_auto_and_cpu_are_the_cpu_here_and_cuda_is_refused():
    assert dist.pick_device("auto", 0) == torch.device("cpu")
    assert dist.pick_device("cpu", 0) == torch.device("cpu")
    with pytest.raises(dist.DeviceError, match=r"device=cuda but torch sees no GPU here .*CUDA_VISIBLE_DEVICES="):
        dist.pick_device("cuda", 0)


def test_deepspeed_must_run_on_the_ranks_device():
    """DeepSpeed picks its accelerator by itself and moves the model there: a mismatch is refused by name."""
    acc = "cuda" if torch.cuda.is_available() else "cpu"
    dist.check_deepspeed_accelerator(torch.device(acc))
    other = torch.device("cpu" if acc == "cuda" else "cuda")
    with pytest.raises(dist.DeviceError, match=rf"DeepSpeed's accelerator is '{acc}' but this rank runs on "
                                               rf"{other.type}.*set DS_ACCELERATOR={other.type}"):
        dist.check_deepspeed_accelerator(other)


@NO_GPU
def test_cuda_without_a_gpu_is_one_line_from_both_commands(store, tmp_path):
    ov = tiny_overrides(store, tmp_path / "run", **{"dist.device": "cuda"})
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(ov)], cwd=ROOT, env=env(), check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # the setting named as mva-train spells it (it said "use device=auto", an unknown key there)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mva-train: error: dist.device=cuda but torch sees no GPU here"), last
    assert last.endswith("run on a GPU node, or use dist.device=auto"), last
    assert not (tmp_path / "run").exists()
    # mva-infer refuses before it reads the model or the store (neither exists here)
    r = subprocess.run([PY, "-m", "trainer.infer", f"model_dir={tmp_path / 'none'}", f"store={tmp_path / 'none'}",
                        f"output={tmp_path / 'e.zarr'}", "device=cuda"], cwd=ROOT, env=env(), check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("mva-infer: error: device=cuda but torch sees no GPU here")
    assert r.stderr.strip().endswith("or use device=auto")
    assert not (tmp_path / "e.zarr").exists()


def test_a_run_on_the_cpu_resumes_under_another_device_setting(store, tmp_path):
    """dist.device says where a run goes, not its arithmetic: resuming under another value is accepted (a
    changed dist.precision is still refused by name)."""
    first = train(tiny_config(store, tmp_path / "run", **{"dist.device": "cpu", "run.epochs": 1}))
    assert first.epochs == 1
    cfg = tiny_config(store, tmp_path / "run", **{"dist.device": "auto", "run.epochs": 2, "run.resume": "auto"})
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "device: cpu" in saved
    assert train(cfg).epochs == 2
    old = json.loads(config_to_json(tiny_config(store, tmp_path / "run", **{"dist.device": "cpu"})))
    check_same_settings(json.dumps(old), cfg, "ckpt")
    with pytest.raises(ConfigError, match=r"dist.precision \('fp32' -> 'bf16'\)"):
        check_same_settings(json.dumps(old), tiny_config(store, tmp_path / "run", **{"dist.precision": "bf16"}),
                            "ckpt")
