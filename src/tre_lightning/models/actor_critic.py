"""The actor-critic container: actor, critic (or a value head shared on the actor), reference.

:class:`ActorCritic` is built from model sources (cheap: nothing is loaded at
construction) and creates the models in :meth:`ActorCritic.build`, which
``PPOModule.configure_model`` calls so that a sharding strategy can wrap them
right after they exist. It owns what is specific to the models: which
parameters each optimizer steps, how values are computed, FSDP2 sharding and
gathering the actor's weights for generation.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from tre_lightning.checks import ArgumentError, boolean
from tre_lightning.models.critic import ValueHead, ValueModel
from tre_lightning.models.forward import policy_forward
from tre_lightning.models.fsdp import FSDPConfig, gathered_for_generation, has_4bit_layers, is_sharded
from tre_lightning.models.lora import AdaptersDisabled, LoraSettings, apply_lora, keep_4bit_out_of_state_dict
from tre_lightning.models.source import ModelSource, freeze

__all__ = ["ActorCritic"]


class ActorCritic(nn.Module):
    """Actor, critic and reference model of PPO, built from their sources.

    Args:
        policy: where the actor comes from (a local or Hub HF model via
            ``PretrainedSource``, a random tiny model via ``TinyRandomSource``,
            the quickstart's ``WarmStartSource``); its tokenizer (with chat
            template) renders the prompts.
        critic: where the critic's backbone comes from; None = a fresh copy of
            ``policy`` (the paper: a value head on a copy of the base model).
        reference: the frozen reference model for a KL in the reward (built
            only when the PPO config asks for one); None = a frozen copy of the
            initial actor.
        share_backbone: put the value head on the actor's last hidden state
            instead of a separate critic (one backward drives both; the critic
            optimizer holds the head only).
        gradient_checkpointing: recompute activations in backward for actor and
            critic (HF gradient checkpointing; under FSDP2 the non-reentrant
            per-layer activation checkpointing of ``fsdp``).
        fsdp: sharding options under Lightning's ``ModelParallelStrategy``
            (FSDP2, data parallel); None = the defaults; ignored without it.
        lora: LoRA adapters (``peft``, the ``lora`` extra) on the actor, and on
            the critic's backbone when ``lora.critic``; the base weights are
            frozen. Without a ``reference`` source the reference model is the
            actor with its adapters disabled (no second copy). With ``lora``
            the policy (and, with ``lora.critic``, the critic) source may set
            ``load_in_4bit`` (QLoRA: a frozen NF4 base under the adapters).
            None = full fine-tuning.

    Attributes (after :meth:`build`): ``actor``, ``critic`` (None when
    ``share_backbone``), ``value_head`` (only when ``share_backbone``),
    ``ref`` (None without a KL).
    """

    def __init__(
        self,
        policy: ModelSource,
        critic: ModelSource | None = None,
        reference: ModelSource | None = None,
        share_backbone: bool = False,
        gradient_checkpointing: bool = False,
        fsdp: FSDPConfig | None = None,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        for name, src in (("policy", policy), ("critic", critic), ("reference", reference)):
            if src is not None and not isinstance(src, ModelSource):
                raise ArgumentError(name, "a model source (tokenizer() and causal_lm())", src)
        if lora is not None and not isinstance(lora, LoraSettings):
            raise ArgumentError("lora", "a LoraSettings or null", lora)
        for name, src in (("policy", policy), ("critic", critic)):
            adapted = lora is not None and (name == "policy" or lora.critic)
            if getattr(src, "load_in_4bit", False) and not adapted:
                raise ArgumentError(f"{name}.load_in_4bit", "false: 4-bit loading is for frozen models (the "
                                    "reference, or a QLoRA base under LoRA adapters: set lora"
                                    + (".critic=true" if name == "critic" and lora is not None else "")
                                    + "); a fully trained model is kept in full precision", True)
        if (getattr(policy, "load_in_4bit", False) and critic is None and not share_backbone
                and lora is not None and not lora.critic):
            raise ArgumentError("lora.critic", "true when the policy is 4-bit and the critic is its copy (a 4-bit "
                                "backbone is frozen: only adapters can train it), or give a full-precision critic "
                                "source or share_backbone=true", False)
        boolean("share_backbone", share_backbone)
        boolean("gradient_checkpointing", gradient_checkpointing)
        if share_backbone and critic is not None:
            raise ArgumentError("critic", "null when share_backbone is true (the value head sits on the actor)",
                                critic)
        if fsdp is not None and not isinstance(fsdp, FSDPConfig):
            raise ArgumentError("fsdp", "an FSDPConfig or null", fsdp)
        if fsdp is not None and any(getattr(src, "load_in_4bit", False) for src in (policy, critic)):
            raise ArgumentError("fsdp", "null for a 4-bit (QLoRA) policy or critic: FSDP2 cannot shard bitsandbytes "
                                "4-bit layers (fully_shard drops their quant_state; docs/scaling.md, LoRA and "
                                "QLoRA under FSDP2); train QLoRA on one device, or LoRA on a full-precision base",
                                "FSDPConfig(...)")
        self.policy_source = policy
        self.critic_source = critic
        self.reference_source = reference
        self.share_backbone = share_backbone
        self.gradient_checkpointing = gradient_checkpointing
        self.fsdp = fsdp if fsdp is not None else FSDPConfig()
        self.lora = lora
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.actor: nn.Module | None = None
        self.critic: ValueModel | None = None
        self.value_head: ValueHead | None = None
        self.ref: nn.Module | None = None
        # a 4-bit reference, or the adapters-disabled view of a LoRA actor, lives outside the module tree
        self._outside: dict[str, nn.Module] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (read on first use: building the container reads no file)."""
        if self._tokenizer is None:
            self._tokenizer = self.policy_source.tokenizer()
        return self._tokenizer

    def bind_task(self, task: Any) -> None:
        """Give the task to the sources that learn from it (a source with ``bind_task``, such as the
        quickstart's warm start); their refusals name the source's key (``policy.task``)."""
        from tre_lightning.checks import ConfigError

        for name, source in (("policy", self.policy_source), ("critic", self.critic_source),
                             ("reference", self.reference_source)):
            bind = getattr(source, "bind_task", None)
            if callable(bind):
                try:
                    bind(task)
                except ConfigError as err:
                    raise err.under(name) from None

    @property
    def built(self) -> bool:
        return self.actor is not None

    def build(self, *, with_reference: bool, seed: int, device_mesh: Any = None) -> None:
        """Create the models (idempotent); shard them when a device mesh is given.

        The value head's initial weights depend on ``seed`` only.
        """
        if self.actor is not None:
            return
        lora = self.lora
        actor = self.policy_source.causal_lm()
        self.actor = (apply_lora(actor, lora) if lora is not None else actor).train()
        source = self.critic_source if self.critic_source is not None else self.policy_source
        backbone = None if self.share_backbone else source.causal_lm()
        if backbone is not None and lora is not None and lora.critic:
            backbone = apply_lora(backbone, lora).get_base_model()  # the HF model, adapters injected in place
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.share_backbone:
                self.value_head = ValueHead(int(self.actor.config.hidden_size))
            else:
                self.critic = ValueModel.from_causal_lm(backbone).train()
        if with_reference and lora is not None and self.reference_source is None:
            self._outside["ref"] = AdaptersDisabled(self.actor)  # the base model: the same weights, adapters off
        elif with_reference:
            ref = freeze(self.reference_source.causal_lm() if self.reference_source is not None
                         else copy.deepcopy(self.actor))
            if has_4bit_layers(ref):
                # rebuilt from its source, so not checkpointed; not moved by Lightning (loaded on this
                # process's device); not sharded (FSDP2 cannot shard bitsandbytes' Params4bit)
                self._outside["ref"] = ref
            else:
                self.ref = ref
        if lora is not None:
            keep_4bit_out_of_state_dict(self)  # a QLoRA base is rebuilt from its source, not checkpointed
        self.use_fp32_masters()  # after LoRA froze the base: only trainable weights are cast
        if self.gradient_checkpointing and device_mesh is None:  # under FSDP2: shard's non-reentrant AC
            # non-reentrant under LoRA (transformers 5's default; 4.x defaults to reentrant, which needs inputs
            # that require grad, and a LoRA model's frozen embeddings give none)
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if lora is not None else {}
            self.actor.gradient_checkpointing_enable(**kwargs)
            if self.critic is not None:
                self.critic.backbone.gradient_checkpointing_enable(**kwargs)
        if device_mesh is not None:
            self.shard(device_mesh)

    def use_fp32_masters(self) -> None:
        """Cast the trainable 16-bit parameters of actor, critic and value head to float32.

        Whatever dtype a source loads in (``PretrainedSource(dtype=bfloat16)`` reads half the
        bytes), the optimizers step float32 master weights: AdamW on bf16 weights rounds
        updates below the weights' resolution away (at lr 1e-6, ~2 % of std-0.02 weights
        changed in 20 steps, against all of them in float32). bf16 compute comes from
        ``trainer.precision=bf16-mixed`` (autocast) or, under FSDP2, from
        ``FSDPConfig(mixed_precision="bf16")`` (bf16 all-gathers over fp32 shards, fp32
        gradient reduction). Frozen parameters and the reference model keep their dtype.
        Lightning's ``bf16-true`` casts everything back to bf16 afterwards; the optimizer
        refuses that unless ``OptimConfig(low_precision_params=True)``.
        """
        for module in (self.actor, self.critic, self.value_head):
            if module is None:
                continue
            for param in module.parameters():  # tied weights are one Parameter: cast once
                if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                    param.data = param.data.float()

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model (a 4-bit one, or the LoRA actor with adapters disabled, included), or None."""
        return self.ref if self.ref is not None else self._outside.get("ref")

    def shard(self, mesh: Any) -> None:
        """FSDP2 data-parallel sharding over ``mesh``'s ``data_parallel`` dimension.

        Actor and critic get one ``fully_shard`` per decoder layer (the layer
        class read from the HF model) and one for the root, with the options
        of ``fsdp`` (mixed precision, non-reentrant activation checkpointing
        when ``fsdp.activation_checkpointing`` or ``gradient_checkpointing``
        is set, resharding, CPU offload). A shared value head is sharded as
        one group; the reference model is sharded too (without activation
        checkpointing) unless it is 4-bit. Tensor parallelism is refused.
        """
        from torch.distributed.fsdp import fully_shard

        from tre_lightning.models.fsdp import mixed_precision_policy, shard_model

        names = tuple(mesh.mesh_dim_names or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "PPOModule shards data-parallel only (FSDP2); tensor parallelism is not supported: use "
                "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        kwargs = self.fsdp.shard_kwargs()
        kwargs["activation_checkpointing"] = kwargs["activation_checkpointing"] or self.gradient_checkpointing
        assert self.actor is not None
        shard_model(self.actor, dp_mesh, **kwargs)
        if self.critic is not None:
            shard_model(self.critic, dp_mesh, **kwargs)
            # ValueModel returns a slice of the head's output; nothing modifies it in place
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPValueModel\) returned a view")
        if self.value_head is not None:  # a plain module: shard it whole so that its gradients are reduced
            fully_shard(self.value_head, mesh=dp_mesh, mp_policy=mixed_precision_policy(kwargs["mixed_precision"]),
                        reshard_after_forward=False)
        if self.ref is not None:
            shard_model(self.ref, dp_mesh, **{**kwargs, "activation_checkpointing": False})

    def generation_context(self, engine: Any) -> Any:
        """Around HF-engine generation with a sharded actor: keep its full weights gathered for the call."""
        from tre_lightning.rollout.hf import HFGenerateEngine

        if (self.actor is not None and self.fsdp.gather_for_generation and isinstance(engine, HFGenerateEngine)
                and is_sharded(self.actor)):
            return gathered_for_generation(self.actor)
        return contextlib.nullcontext()

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters the critic optimizer updates (the separate critic, or the shared head)."""
        module = self.value_head if self.share_backbone else self.critic
        assert module is not None, "build() must run first"
        return list(module.parameters())

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, num_response: int,
                      temperature: float) -> tuple[Tensor, Tensor | None]:
        """(B, R, V) actor logits / temperature at the response positions, and the hidden states
        the shared value head reads (None with a separate critic)."""
        assert self.actor is not None, "build() must run first"
        return policy_forward(self.actor, input_ids, attention_mask, num_response, temperature,
                              return_hidden=self.share_backbone)

    def values(self, input_ids: Tensor, attention_mask: Tensor, num_response: int,
               hidden: Tensor | None) -> Tensor:
        """(B, R) values: from the shared head on ``hidden``, or from the separate critic."""
        if self.share_backbone:
            assert self.value_head is not None and hidden is not None
            return self.value_head(hidden)
        assert self.critic is not None, "build() must run first"
        return self.critic(input_ids, attention_mask, num_response)

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, num_response: int,
                         temperature: float) -> Tensor:
        """(B, R, V) reference-model logits / temperature at the response positions."""
        ref = self.reference
        assert ref is not None, "no reference model was built"
        return policy_forward(ref, input_ids, attention_mask, num_response, temperature)[0]

    def extra_repr(self) -> str:
        return (f"policy={self.policy_source!r}, critic={self.critic_source!r}, reference={self.reference_source!r}, "
                f"share_backbone={self.share_backbone}, gradient_checkpointing={self.gradient_checkpointing}, "
                f"fsdp={self.fsdp!r}, lora={self.lora!r}")
