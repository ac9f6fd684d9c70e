"""Hub model ids resolved through the Hugging Face cache (HF_HOME layout built here; no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tre_lightning.checks import ConfigError
from tre_lightning.models import PretrainedSource, TinyRandomSource
from tre_lightning.models import hub

REPO = "tiny-org/tiny-qwen"
COMMIT_MAIN = "a" * 40
COMMIT_OLD = "b" * 40


def _save(folder: Path, seed: int) -> None:
    source = TinyRandomSource(hidden_size=32, seed=seed)
    source.causal_lm().save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<HF_HOME>/hub/models--tiny-org--tiny-qwen``: snapshots of two commits, ``refs/main`` and ``refs/v0``."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny-org--tiny-qwen"
    _save(repo / "snapshots" / COMMIT_MAIN, seed=0)
    _save(repo / "snapshots" / COMMIT_OLD, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "v0").write_text(COMMIT_OLD)
    config_only = home / "hub" / "models--tiny-org--config-only" / "snapshots" / COMMIT_MAIN
    config_only.mkdir(parents=True)
    shutil.copy(repo / "snapshots" / COMMIT_MAIN / "config.json", config_only / "config.json")
    (config_only.parent.parent / "refs").mkdir()
    (config_only.parent.parent / "refs" / "main").write_text(COMMIT_MAIN)
    return home


@pytest.fixture
def cache(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hub client's cache folder pointed at ``hf_home`` (it reads HF_HOME at import), offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub, "is_offline", lambda: True)
    return hf_home / "hub"


def test_is_hub_id(tmp_path: Path) -> None:
    assert hub.is_hub_id("Qwen/Qwen2.5-1.5B-Instruct")
    assert hub.is_hub_id("gpt2")
    assert not hub.is_hub_id(str(tmp_path))  # an existing folder
    assert not hub.is_hub_id("~/models/x") and not hub.is_hub_id("./x") and not hub.is_hub_id("a/b/c")


def test_cached_id_resolves_to_the_snapshot_of_main(cache: Path) -> None:
    source = PretrainedSource(REPO, dtype="float32")
    assert source.path == str(cache / "models--tiny-org--tiny-qwen" / "snapshots" / COMMIT_MAIN)
    assert source.tokenizer_path == source.path
    model = source.causal_lm()
    expected = TinyRandomSource(hidden_size=32, seed=0).causal_lm()
    for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    assert source.tokenizer().chat_template is not None
    assert "tiny-org/tiny-qwen" in repr(source)


def test_revision_branch_and_commit(cache: Path) -> None:
    """A branch name follows refs/<name>; a commit hash names the snapshot (a mutation that ignores
    ``revision`` resolves both to main's snapshot and fails here)."""
    by_ref = PretrainedSource(REPO, revision="v0")
    by_commit = PretrainedSource(REPO, revision=COMMIT_OLD)
    assert Path(by_ref.path).name == COMMIT_OLD == Path(by_commit.path).name


def test_uncached_offline_refused_in_one_line_with_the_fetch_command(cache: Path) -> None:
    with pytest.raises(ConfigError) as err:
        PretrainedSource("tiny-org/not-cached", revision="v1")
    message = str(err.value)
    assert message.startswith("path: ") and "\n" not in message
    assert "`hf download tiny-org/not-cached --revision v1`" in message and "HF_HUB_OFFLINE" in message


def test_unknown_revision_of_cached_id_refused(cache: Path) -> None:
    with pytest.raises(ConfigError, match="revision 'nope'"):
        PretrainedSource(REPO, revision="nope")


def test_snapshot_without_weights_refused(cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"path: .*has no weights.*hf download tiny-org/config-only"):
        PretrainedSource("tiny-org/config-only")


def test_local_folder_wins_and_revision_refused_for_it(tmp_path: Path, cache: Path) -> None:
    _save(tmp_path / "m", seed=0)
    assert PretrainedSource(str(tmp_path / "m")).path == str(tmp_path / "m")
    with pytest.raises(ConfigError, match="revision: only for a Hub model id"):
        PretrainedSource(str(tmp_path / "m"), revision="main")


def test_uncached_online_downloads_on_first_use_not_at_construction(cache: Path, monkeypatch) -> None:
    """Online, an uncached id is not fetched when the config is built, only when the model is loaded."""
    calls: list[tuple[str, str | None]] = []
    snapshot = str(cache / "models--tiny-org--tiny-qwen" / "snapshots" / COMMIT_MAIN)
    monkeypatch.setattr(hub, "is_offline", lambda: False)

    def fake_download(repo_id: str, revision: str | None, key: str) -> str:
        calls.append((repo_id, revision))
        return snapshot

    monkeypatch.setattr(hub, "download", fake_download)
    source = PretrainedSource("tiny-org/elsewhere")
    assert source.path is None and calls == []
    source.causal_lm()
    source.tokenizer()
    assert calls == [("tiny-org/elsewhere", None)]  # once: the tokenizer is in the same snapshot
    assert source.path == snapshot == source.tokenizer_path


def _offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_tre_train_with_a_cached_model_id_offline(hf_home: Path, tmp_path: Path) -> None:
    """``tre-train model=pretrained model.policy.path=<org/name>`` with HF_HOME and HF_HUB_OFFLINE=1."""
    cmd = [sys.executable, "-m", "tre_lightning.cli.train", "model=pretrained", f"model.policy.path={REPO}",
           "model.policy.dtype=float32", "model.gradient_checkpointing=false", "task=countdown",
           "task.train_size=16", "task.val_size=2", "rollout=tiny", "rollout.max_prompt_length=512", "ppo=tiny",
           "optim=tiny", "evaluation=tiny", "trainer=cpu", "trainer.max_steps=1", "validate_first=false",
           "trainer.limit_val_batches=0", "callbacks=minimal", "export_hf=null", f"output_dir={tmp_path}",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, env=_offline_env(hf_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "iteration 1/1" in out.stdout
    missing = subprocess.run([*cmd[:4], "model.policy.path=tiny-org/absent", *cmd[5:]], env=_offline_env(hf_home),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert missing.returncode == 2, missing.stdout[-3000:]
    assert "model.policy.path: model 'tiny-org/absent' is not in the Hugging Face cache" in missing.stdout
    assert "hf download tiny-org/absent" in missing.stdout


@pytest.mark.slow
def test_tre_lightning_with_a_cached_model_id_offline(hf_home: Path, tmp_path: Path) -> None:
    """``tre-lightning fit --model.model.policy PretrainedSource --model.model.policy.path <org/name>``."""
    from test_progress import _CLI_TINY

    from tre_lightning.cli.lightning import EXAMPLE_CONFIG

    args = [a for a in _CLI_TINY[4:]]  # without the TinyRandomSource policy
    cmd = [sys.executable, "-m", "tre_lightning.cli.lightning", "fit", "--config", str(EXAMPLE_CONFIG),
           "--model.model.policy", "tre_lightning.models.PretrainedSource", "--model.model.policy.path", REPO,
           "--model.model.policy.dtype", "float32", *args, "--trainer.max_steps", "1",
           "--trainer.limit_val_batches", "0"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_offline_env(hf_home), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "iteration 1/1" in out.stdout
