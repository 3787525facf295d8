"""Config: defaults <- YAML <- --set; bad input names the key and its origin, exits 2, starts nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

from distalex.config import ConfigError, flatten, load_config
from distalex.parallel.dims import ParallelConfigError, check_layout, read_launch_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_order_defaults_file_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.02\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=7", "model.lrn=false"])
    assert cfg.optim.lr == 0.02 and cfg.train.epochs == 7 and cfg.model.lrn is False
    assert cfg.optim.momentum == 0.9  # default kept
    assert flatten(cfg)["optim.lr"] == 0.02


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: optim.lrr: unknown key, did you mean optim.lr?" in str(e.value)


def test_wrong_type_and_impossible_value(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train.batch_size=abc: train.batch_size: .*integer"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"optim.momentum: .*less than 1"):
        load_config(write(tmp_path, "optim:\n  momentum: 1.5\n"))
    with pytest.raises(ConfigError, match=r"model.towers=3 is not divisible by parallel.tp=2"):
        load_config(None, ["model.towers=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [1, \n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"--set optim.lr.x=1: optim.lr: Input should be a valid number"):
        load_config(None, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="optim.lr is a value, not a section"):
        load_config(None, ["optim.lr=1", "optim.lr.x=1"])


def test_cli_exits_2_with_message_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "distalex.config", "--set", "optim.lrr=0.1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "optim.lrr: unknown key, did you mean optim.lr?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


def test_layout_errors_before_any_collective():
    assert check_layout(world_size=4, tp=2, towers=2) == 2
    with pytest.raises(ParallelConfigError, match="world size 3 is not divisible by parallel.tp=2"):
        check_layout(world_size=3, tp=2, towers=2)
    with pytest.raises(ParallelConfigError, match="model.towers=2 is not divisible by parallel.tp=4"):
        check_layout(world_size=4, tp=4, towers=2)
    with pytest.raises(ParallelConfigError, match="MASTER_ADDR"):
        read_launch_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ParallelConfigError, match="RANK=5 WORLD_SIZE=2"):
        read_launch_env({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_cuda_graphs_is_refused_with_the_reason():
    """CUDA graphs of the step would skip or freeze the dropout draw (docs/training.md): ``true`` is
    an error naming the key and why, wherever it comes from; ``false`` (what saved configs say) loads."""
    for args in (["train.cuda_graphs=true"], ["train.cuda_graphs=true", "train.compile=true", "parallel.device=cuda"]):
        with pytest.raises(ConfigError, match=r"train.cuda_graphs=true is not supported: the dropout stream's state is a "
                                              r"CPU tensor the step mutates, so inductor skips CUDA graphs"):
            load_config(None, args)
    assert load_config(None, ["train.cuda_graphs=false", "train.compile=true"]).train.cuda_graphs is False


def test_ddp_bucket_below_the_first_bucket_is_refused():
    """DDP's first bucket is 1 MiB and the compiled step's split needs every later one at least as big."""
    with pytest.raises(ConfigError, match=r"train.ddp_bucket_mb: Input should be greater than or equal to 1"):
        load_config(None, ["train.ddp_bucket_mb=0.5"])
    assert load_config(None, []).train.ddp_bucket_mb == 25.0
