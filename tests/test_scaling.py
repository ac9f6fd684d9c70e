"""Scaling wiring in one process (the 2-process FSDP2 runs are tests/test_fsdp_ppo.py).

- ``FSDPConfig`` and ``PPOModule(fsdp=...)``; ``shard_models`` is a no-op
  without ``ModelParallelStrategy`` and refuses tensor parallelism;
- a 4-bit (NF4) reference model from ``PretrainedSource(load_in_4bit=True)``:
  built, used for the KL, kept out of the module's parameters and state
  dict; refused for the trained policy;
- engine selection from config (``conf/engine``) and the missing-extra
  errors: ``tre-train``, ``tre-lightning`` and ``tre-eval`` print the message
  and exit 1 without a traceback (subprocesses; bitsandbytes is hidden by a
  stub package on ``PYTHONPATH`` whose import fails);
- every ``tre-train`` command in docs/scaling.md composes (Hydra) and is
  consistent (data-parallel size = world size, global batch 512 / 64 for
  the paper presets), and the Lightning CLI run there parses
  (``tre-lightning fit ... --print_config``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_module_support import CharTask, tiny_module, tiny_source, fit, trainer, validate

from tre_lightning.cli.errors import missing_extra
from tre_lightning.models.fsdp import FSDPConfig, has_4bit_layers, is_sharded
from tre_lightning.rollout.vllm import VLLMUnavailableError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
HAVE_BNB = __import__("importlib").util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes>=0.50 (the quant extra)")
# bitsandbytes' CPU 4-bit kernels need rows of >= 64 elements
WIDE = {"hidden_size": 64, "intermediate_size": 128}


# --------------------------------------------------------------------------- FSDPConfig, shard_models


def test_fsdp_config_validates_and_maps_to_shard_model() -> None:
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDPConfig(mixed_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu_offload"):
        FSDPConfig(cpu_offload="yes")  # type: ignore[arg-type]
    assert FSDPConfig().shard_kwargs() == {"mixed_precision": None, "reshard_after_forward": True,
                                           "activation_checkpointing": False, "cpu_offload": False}
    assert FSDPConfig(mixed_precision="bf16").shard_kwargs()["mixed_precision"] == "bf16"


def test_module_takes_fsdp_options_and_stores_them() -> None:
    module = tiny_module(fsdp=FSDPConfig(mixed_precision="bf16", activation_checkpointing=True))
    assert module.model.fsdp == FSDPConfig(mixed_precision="bf16", activation_checkpointing=True)
    assert "mixed_precision='bf16'" in module.hparams["model"]  # the checkpoint records the sharding options
    assert tiny_module().model.fsdp == FSDPConfig()


def test_without_model_parallel_strategy_nothing_is_sharded() -> None:
    module = tiny_module(gradient_checkpointing=True)
    module.configure_model()
    assert module.device_mesh is None
    assert not is_sharded(module.model.actor) and not is_sharded(module.model.critic)
    # gradient checkpointing without FSDP2: HF's own, on every decoder layer
    assert all(layer.gradient_checkpointing for layer in module.model.actor.model.layers)


class _FakeMesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name: str) -> Any:
        return type("Sub", (), {"size": lambda self: 2})()


def test_tensor_parallelism_is_refused() -> None:
    module = tiny_module()
    module._device_mesh = _FakeMesh()
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        module.configure_model()


def test_tre_train_passes_the_fsdp_node_to_the_module(tmp_path: Path) -> None:
    from tre_lightning.cli.train import build

    cfg = _compose(["model=tiny_random", "task=countdown", "task.train_size=8", "task.val_size=2", "ppo=tiny",
                    "rollout=tiny", "strategy=fsdp", "model.fsdp.reshard_after_forward=false"], tmp_path)
    module = build(cfg).module
    assert module.model.fsdp == FSDPConfig(mixed_precision="bf16", reshard_after_forward=False)


@pytest.mark.slow
def test_tre_train_fsdp_two_processes_run_resume_export(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 tre-train strategy=fsdp`` on CPU: fit with distributed checkpoints, resume
    from ``last.ckpt`` (a folder) to one more iteration, export from every rank (rank 0 writes)."""
    import socket

    from transformers import AutoModelForCausalLM

    def torchrun(extra: list[str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                     "127.0.0.1", "--master-port", str(port), "--no-python", _script("tre-train"),
                     "model=tiny_random", "task=countdown", "task.train_size=32", "task.val_size=4",
                     "rollout=tiny", "ppo=tiny", "optim=tiny", "evaluation=tiny", "trainer=cpu", "trainer.devices=2",
                     "trainer.enable_progress_bar=false", "trainer.val_check_interval=2", "validate_first=false",
                     "strategy=fsdp", "model.fsdp.mixed_precision=none",
                     "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
                     f"export_hf={tmp_path / 'run' / 'hf_model'}", *extra], tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    torchrun(["trainer.max_steps=2"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    torchrun(["trainer.max_steps=3", f"ckpt_path={last}"])
    assert (tmp_path / "run" / "checkpoints" / "step000003.ckpt").is_dir()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_model", local_files_only=True)
    assert model.config.architectures == ["Qwen2ForCausalLM"]


# --------------------------------------------------------------------------- 4-bit reference


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wide") / "model"
    source = tiny_source(**WIDE)
    source.causal_lm().save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)
    return folder


@needs_bnb
def test_4bit_reference_is_frozen_unregistered_and_used_for_the_kl(wide_folder: Path) -> None:
    from lightning.pytorch import Callback

    from tre_lightning.models import PretrainedSource

    class Metrics(Callback):
        def __init__(self) -> None:
            self.kl: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.kl.append(outputs["metrics"]["train/ref_kl"])

    reference = PretrainedSource(str(wide_folder), dtype="float32", load_in_4bit=True)
    assert "load_in_4bit=True" in repr(reference)
    module = tiny_module(CharTask(), source=PretrainedSource(str(wide_folder), dtype="float32"),
                         reference=reference, kl_coef=0.1)
    record = Metrics()
    fit(trainer(max_steps=2, callbacks=[record]), module)
    assert has_4bit_layers(module.model.reference)
    assert not any(p.requires_grad for p in module.model.reference.parameters())
    # outside the module tree: not in the state dict (checkpoints), not among the trained parameters
    assert not any(k.startswith("ref.") for k in module.state_dict())
    assert all(m is not module.model.reference for m in module.modules())
    # the KL against the NF4 copy of the initial policy: nonzero (quantization), small, finite
    assert len(record.kl) == 2 and all(0 < abs(v) < 1.0 for v in record.kl)


@needs_bnb
def test_4bit_is_refused_for_the_trained_policy(wide_folder: Path) -> None:
    from tre_lightning.models import PretrainedSource

    from tre_lightning.checks import ArgumentError

    with pytest.raises(ArgumentError, match=r"^policy\.load_in_4bit must be false: 4-bit loading is for frozen models"):
        tiny_module(source=PretrainedSource(str(wide_folder), load_in_4bit=True))  # refused when built


# --------------------------------------------------------------------------- engine group


def _compose(overrides: list[str], tmp_path: Path) -> Any:
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


def test_engine_group_selects_the_engine(tmp_path: Path) -> None:
    from tre_lightning.rollout import HFGenerateEngine

    hf = _compose(["+engine=hf"], tmp_path)
    assert isinstance(instantiate(hf.engine), HFGenerateEngine)
    assert _compose([], tmp_path).engine is None  # the default: HF generate on the actor

    cfg = _compose(["model=pretrained", "model.policy.path=/models/q", "+engine=vllm", "seed=7",
                    "engine.gpu_memory_utilization=0.5"], tmp_path)
    assert cfg.engine._target_ == "tre_lightning.rollout.vllm.VLLMEngine"
    assert (cfg.engine.model, cfg.engine.seed, cfg.engine.gpu_memory_utilization) == ("/models/q", 7, 0.5)
    if torch.cuda.is_available() and __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vLLM is installed here: the missing-vLLM error cannot happen")
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.engine)
    found = missing_extra(info.value)
    assert isinstance(found, VLLMUnavailableError) and "tre-lightning[vllm]" in str(found)


def test_missing_extra_is_found_through_wrapping() -> None:
    from tre_lightning.models.quant import BitsAndBytesUnavailableError

    try:
        try:
            raise BitsAndBytesUnavailableError("needs bitsandbytes")
        except ImportError as inner:
            raise RuntimeError("while building the model") from inner
    except RuntimeError as outer:
        assert isinstance(missing_extra(outer), BitsAndBytesUnavailableError)
    assert missing_extra(ValueError("something else")) is None


# --------------------------------------------------------------------------- missing extras: subprocesses


def _script(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} not installed")
    return found


def _run(args: list[str], tmp_path: Path, hide_bnb: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if hide_bnb:  # a `bitsandbytes` package whose import fails shadows the installed one
        stub = tmp_path / "no_bnb" / "bitsandbytes"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("raise ImportError('bitsandbytes hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), env.get("PYTHONPATH", "")])
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def _assert_clean_exit(proc: subprocess.CompletedProcess[str], prog: str, needle: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"{prog}: " in proc.stderr and needle in proc.stderr, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def _no_vllm() -> None:
    if torch.cuda.is_available() and __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vLLM and a GPU are available here")


TINY_TRAIN = ["task=countdown", "task.train_size=32", "task.val_size=4", "rollout=tiny", "ppo=tiny", "optim=tiny",
              "evaluation=tiny", "trainer=cpu", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
              "validate_first=false", "export_hf=null", "logger=none", "callbacks=minimal"]


def test_tre_train_vllm_missing(tmp_path: Path, wide_folder: Path) -> None:
    _no_vllm()
    proc = _run([_script("tre-train"), "model=pretrained", f"model.policy.path={wide_folder}", "+engine=vllm",
                 *TINY_TRAIN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_exit(proc, "tre-train", "rollout engine 'vllm' cannot be used")


def test_tre_train_bitsandbytes_missing(tmp_path: Path) -> None:
    proc = _run([_script("tre-train"), "model=tiny_random", "optim.eight_bit=true", *TINY_TRAIN,
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, hide_bnb=True)
    _assert_clean_exit(proc, "tre-train", "pip install 'tre-lightning[quant]'")


LIGHTNING_TINY = ["--model.model.policy", "tre_lightning.models.TinyRandomSource", "--model.model.policy.hidden_size", "32",
                  "--model.rollout.max_new_tokens", "8", "--model.evaluation.max_new_tokens", "8",
                  "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]


def test_tre_lightning_vllm_missing(tmp_path: Path) -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG

    _no_vllm()
    proc = _run([_script("tre-lightning"), "fit", "--config", str(EXAMPLE_CONFIG), *LIGHTNING_TINY,
                 "--model.engine", "tre_lightning.rollout.vllm.VLLMEngine", "--model.engine.model", "/models/q",
                 "--trainer.default_root_dir", str(tmp_path)], tmp_path)
    _assert_clean_exit(proc, "tre-lightning", "rollout engine 'vllm' cannot be used")


def test_tre_lightning_bitsandbytes_missing(tmp_path: Path) -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG

    proc = _run([_script("tre-lightning"), "fit", "--config", str(EXAMPLE_CONFIG), *LIGHTNING_TINY,
                 "--model.optim.eight_bit", "true", "--trainer.default_root_dir", str(tmp_path)], tmp_path,
                hide_bnb=True)
    _assert_clean_exit(proc, "tre-lightning", "pip install 'tre-lightning[quant]'")


def test_tre_eval_vllm_missing(tmp_path: Path, wide_folder: Path) -> None:
    _no_vllm()
    proc = _run([_script("tre-eval"), "--model", str(wide_folder), "--task", "countdown", "--engine", "vllm"],
                tmp_path)
    _assert_clean_exit(proc, "tre-eval", "rollout engine 'vllm' cannot be used")


# --------------------------------------------------------------------------- the commands of docs/scaling.md


def _doc_commands(program: str) -> list[list[str]]:
    """Every ``program`` command line in the doc's bash blocks (continuations joined), as argv after it."""
    text = DOC.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if program in line and not line.lstrip().startswith("#"):
                argv = shlex.split(line)
                commands.append(argv[argv.index(program) + 1 :])
    return commands


def _doc_file(name: str) -> str:
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S):
        if block.startswith(f"# file: {name}\n"):
            return block
    raise AssertionError(f"docs/scaling.md has no yaml block '# file: {name}'")


HYDRA_COMMANDS = _doc_commands("tre-train")


def test_the_doc_has_the_expected_commands() -> None:
    assert len(HYDRA_COMMANDS) >= 7
    joined = [" ".join(c) for c in HYDRA_COMMANDS]
    for experiment in ("paper_countdown", "paper_hh", "paper_math"):
        assert any(f"experiment={experiment} strategy=fsdp" in c for c in joined), experiment
    assert any("trainer.num_nodes=2" in c for c in joined)
    text = DOC.read_text()
    assert "torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK" in text and "srun tre-train" in text


@pytest.mark.parametrize("argv", HYDRA_COMMANDS, ids=lambda a: next((x for x in a if x.startswith("hydra.run")), "?"))
def test_doc_hydra_command_composes(argv: list[str], tmp_path: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = _compose(argv, tmp_path)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(instantiate(cfg.ppo), object)
    if "strategy=fsdp" in argv:
        world = trainer_cfg["devices"] * trainer_cfg["num_nodes"]
        strategy = trainer_cfg["strategy"]
        assert strategy["_target_"].endswith("ModelParallelStrategy")
        assert (strategy["data_parallel_size"], strategy["tensor_parallel_size"]) == (world, 1)
        assert isinstance(instantiate(OmegaConf.create(strategy)), ModelParallelStrategy)
        assert trainer_cfg["precision"] == "32-true"
        assert isinstance(instantiate(cfg.model.fsdp), FSDPConfig)
        assert cfg.model.policy.dtype == "float32"  # fp32 master weights, bf16 compute
        if any(a.startswith("experiment=paper_") for a in argv):
            assert cfg.ppo.batch_size * world == 512 and cfg.ppo.mini_batch_size * world == 64
            ppo = instantiate(cfg.ppo)
            ppo.check_micro_batch(cfg.rollout.n)
    if "+engine=vllm" in argv:
        assert cfg.engine._target_ == "tre_lightning.rollout.vllm.VLLMEngine"
        assert cfg.engine.model == cfg.model.policy.path
    if cfg.model.get("reference") is not None:  # the 4-bit reference (its folder exists on the user's machine)
        assert cfg.model.reference._target_.endswith("PretrainedSource") and cfg.model.reference.load_in_4bit is True
    assert any(a.startswith("hydra.run.dir=") for a in argv), "multi-process runs need one run folder"


def test_doc_lightning_cli_command_parses(tmp_path: Path) -> None:
    import yaml

    commands = _doc_commands("tre-lightning")
    assert commands, "docs/scaling.md shows a tre-lightning command"
    argv = commands[0]
    assert argv[0] == "fit"
    args = []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--config":
            path = ROOT / a if a.startswith("conf/") else tmp_path / a
            if not a.startswith("conf/"):
                path.write_text(_doc_file(a))
            args.append(str(path))
        else:
            args.append(a)
    proc = _run([_script("tre-lightning"), *args, "--print_config"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    config = yaml.safe_load(proc.stdout)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("ModelParallelStrategy")
    world = config["trainer"]["devices"] * config["trainer"]["num_nodes"]
    assert strategy["init_args"]["data_parallel_size"] == world and strategy["init_args"]["tensor_parallel_size"] == 1
    model = config["model"]
    actor_critic = model["model"].get("init_args", model["model"])
    assert actor_critic["fsdp"]["mixed_precision"] == "bf16"
    assert model["engine"]["class_path"] == "tre_lightning.rollout.vllm.VLLMEngine"
    assert model["ppo"]["batch_size"] * world == 512 and model["ppo"]["mini_batch_size"] * world == 64
    assert actor_critic["policy"]["init_args"]["dtype"] == "float32"
