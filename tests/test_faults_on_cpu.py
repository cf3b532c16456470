"""Checkpoints that were cut short, edited or never finished, and secrets kept off disk: each fault is one
clear error naming the file, or a recovery, never a traceback from deep inside torch or safetensors."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import dense_irl.runtime.checkpoints as checkpoints
from dense_irl.config import load_config, save_config
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.errors import CheckpointError, MissingFileError
from dense_irl.models.factory import ModelConfig, load_policy
from dense_irl.models.reward_model import HEAD_FILE, RewardModel, RewardModelConfig
from dense_irl.runtime.checkpoints import latest_checkpoint, read_state, write_checkpoint
from dense_irl.runtime.loop_config import LoopConfig


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    demos = generate(SyntheticConfig(n_problems=20, seed=1))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    policy, tok = load_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), texts)
    path = tmp_path_factory.mktemp("rm") / "rm"
    RewardModel(policy, tok, RewardModelConfig()).save_pretrained(path)
    return path


def _copy(good, tmp_path):
    bad = tmp_path / "rm"
    shutil.copytree(good, bad)
    return bad


def _truncate(file, keep=40):
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize(("damage", "error", "names"), [
    (lambda p: (p / "model.safetensors").unlink(), MissingFileError, "has no weights"),
    (lambda p: _truncate(p / "model.safetensors"), CheckpointError, "model.safetensors is not a readable"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64), CheckpointError, "model.safetensors"),
    (lambda p: _truncate(p / HEAD_FILE), CheckpointError, f"{HEAD_FILE} is not a readable"),
    (lambda p: (p / HEAD_FILE).unlink(), MissingFileError, f"missing {HEAD_FILE}"),
    (lambda p: (p / "config.json").write_text("{not json"), CheckpointError, "config.json is not valid JSON"),
    (lambda p: (p / "reward_config.json").write_text("[1, 2"), CheckpointError, "reward_config.json is not a valid"),
    (lambda p: (p / "reward_config.json").write_bytes(b"\xff\xfe"), CheckpointError, "reward_config.json"),
    (lambda p: save_file({"g_head.weight": torch.zeros(1, 7), "g_head.bias": torch.zeros(1),
                          "h_head.weight": torch.zeros(1, 7), "h_head.bias": torch.zeros(1)}, str(p / HEAD_FILE)),
     CheckpointError, f"{HEAD_FILE} does not fit the backbone"),
    (lambda p: save_file({"h_head.weight": torch.zeros(1, 32)}, str(p / HEAD_FILE)), CheckpointError,
     "does not fit the backbone"),
    (lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()),
                                                          "hidden_size": 48})),
     CheckpointError, "reward model checkpoint .* does not load"),
], ids=["no-weights", "truncated-weights", "bad-safetensors-header", "truncated-heads", "no-heads",
        "config-not-json", "reward-config-not-json", "reward-config-not-utf8", "heads-wrong-shape",
        "heads-missing-keys", "config-edited-shapes"])
def test_a_damaged_reward_model_checkpoint_is_one_error_naming_the_file(good, tmp_path, damage, error, names):
    bad = _copy(good, tmp_path)
    damage(bad)
    with pytest.raises(error, match=names) as info:
        RewardModel.from_pretrained(bad)
    assert str(bad) in str(info.value) and "Traceback" not in str(info.value)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, (ValueError, TypeError))


def _saver(files):
    def save(tmp):
        tmp.mkdir(parents=True)
        for name in files:
            (tmp / name).write_text("x")
    return save


def _state(it):
    return {"iteration": it, "cursor": {"epoch": 0, "pos": it}, "rng": [3, [1, 2], None]}


def test_checkpoints_are_written_whole_and_found_again_after_a_crash(tmp_path):
    root = tmp_path / "checkpoints"
    first = write_checkpoint(root, 1, _state(1), _saver(["policy.bin"]))
    assert latest_checkpoint(tmp_path) == first and read_state(first)["iteration"] == 1
    # A process killed mid-write leaves a .tmp folder: never picked, and cleared by the next write.
    (root / ".iter_000002.tmp").mkdir()
    (root / ".iter_000002.tmp" / "policy.bin").write_text("half")
    assert latest_checkpoint(tmp_path) == first
    second = write_checkpoint(root, 2, _state(2), _saver(["policy.bin"]))
    assert latest_checkpoint(tmp_path) == second and not (root / ".iter_000002.tmp").exists()
    # The same iteration again replaces it whole.
    again = write_checkpoint(root, 2, {**_state(2), "cursor": {"epoch": 1, "pos": 0}}, _saver(["other.bin"]))
    assert read_state(again)["cursor"]["epoch"] == 1 and sorted(p.name for p in again.iterdir()) == [
        "other.bin", "state.json"]
    # Killed between moving a checkpoint aside and renaming its successor: `latest` names a folder that is
    # gone, and the newest complete one is used.
    shutil.rmtree(second)
    assert latest_checkpoint(tmp_path) == first


def test_a_full_disk_keeps_the_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = write_checkpoint(root, 1, _state(1), _saver(["policy.bin"]))

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "write_json", disk_full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*iter_000002: OSError.*No space left") as e:
        write_checkpoint(root, 2, _state(2), _saver(["policy.bin"]))
    assert f"the previous checkpoint {first} is intact" in str(e.value)
    assert (root / "latest").read_text() == "iter_000001" and latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]  # no partial folder left
    assert read_state(first)["iteration"] == 1
    # A failure that is not the disk's (an actor died while saving) is left to the caller, as it is.
    monkeypatch.undo()

    def actor_died(tmp):
        tmp.mkdir(parents=True)
        raise RuntimeError("the reward learner died")

    with pytest.raises(RuntimeError, match="the reward learner died"):
        write_checkpoint(root, 2, _state(2), actor_died)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]


@pytest.mark.parametrize(("content", "message"), [
    ("{oops", "is not valid JSON"),
    (json.dumps({"iteration": 3}), r"lacks \['cursor', 'rng'\]"),
    (json.dumps([1, 2]), "lacks"),
])
def test_a_bad_state_json_is_one_error_naming_it(tmp_path, content, message):
    ckpt = tmp_path / "iter_000003"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as e:
        read_state(ckpt)
    assert str(ckpt / "state.json") in str(e.value)
    with pytest.raises(MissingFileError, match="no state.json"):
        read_state(tmp_path)


def test_saved_configs_never_hold_the_token(tmp_path):
    cfg = load_config(LoopConfig, None, ["--serve.publish_url=http://127.0.0.1:8000", "--serve.token=s3cret"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in text and "publish_url: http://127.0.0.1:8000" in text
    assert load_config(LoopConfig, tmp_path / "config.yaml", []).serve.token == ""


KILLED_WRITER = """
import sys, time
from pathlib import Path
from dense_irl.runtime.checkpoints import write_checkpoint

root = Path(sys.argv[1])
state = lambda it: {"iteration": it, "cursor": {"epoch": 0, "pos": it}, "rng": [3, [1, 2], None]}

def save(slow):
    def go(tmp):
        tmp.mkdir(parents=True)
        (tmp / "policy.bin").write_text("weights")
        if slow:
            print("writing", flush=True)
            time.sleep(60)  # killed here
    return go

write_checkpoint(root, 1, state(1), save(False))
write_checkpoint(root, 2, state(2), save(True))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_last_complete_one(tmp_path):
    """A real SIGKILL of the writing process in the middle of a checkpoint: the resume finds the checkpoint
    before it, and the next write of that iteration clears the leftover."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (root / ".iter_000002.tmp" / "policy.bin").is_file()  # the half-written checkpoint is there
    assert latest_checkpoint(tmp_path) == root / "iter_000001" and read_state(root / "iter_000001")["iteration"] == 1
    again = write_checkpoint(root, 2, _state(2), _saver(["policy.bin"]))
    assert latest_checkpoint(tmp_path) == again and not (root / ".iter_000002.tmp").exists()
