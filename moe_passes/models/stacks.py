"""One residual stack of MoE blocks: the passes' smallest real input, for the preset, the benches and the tests.

``MoEStack`` is ``layers`` residual blocks ``x = x + block(norm(x)).hidden_states``
(the reference ``SparseMoeBlock`` as written, or any block returning its
``MoEOutput``), an optional pre-norm, a main loss on the last hidden state plus
the stacked router losses of ``moe_passes/models/interns1_vl/losses.py`` (balancing loss
and z-loss; a coefficient of 0 leaves the term out of the graph), and a choice
of what ``forward`` returns.

Every option that changes the traced graph is explicit, because passes,
goldens and benches read it: the attribute names (``blocks_name``) name the
parameters (``layers.0.gate.weight`` vs ``blocks.0.gate.weight``), and the
order in which the loss terms are computed is the order of the Dynamo graph's
nodes (``loss_order``).

Named constructors below give the configurations the package runs
(``preset_stack``: the ``moe_stack`` preset; ``speed_stack``; ``router_stack``:
the offload bench); the tests configure ``MoEStack`` directly.

``DecoderStack`` (``decoder_stack``) is the other shape the speed bench runs: the
reference model's own decoder layers (attention + MoE), on ``[B, S, H]`` inputs of
B independent sequences, for the modes that split along the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moe_passes.models.interns1_vl.config import InternS1VLConfig
from moe_passes.models.interns1_vl.losses import load_balancing_loss, router_z_loss
from moe_passes.models.interns1_vl.model import causal_attention_bias
from moe_passes.models.interns1_vl.moe import SparseMoeBlock
from moe_passes.models.interns1_vl.text import DecoderLayer, RMSNorm, TextRotaryEmbedding

#: Main loss on the last hidden state ``h``: ``mse`` = ``mse_loss(h, target)``, ``square_mean`` =
#: ``h.square().mean()``, ``pow2_mean`` = ``h.pow(2).mean()`` (same value, different graph op).
MAIN_LOSSES = ("mse", "square_mean", "pow2_mean")
#: When the loss terms are computed (the Dynamo graph's node order, which goldens and the static estimates
#: see): ``accumulate``: main loss, then each router loss added as it is computed; ``main_then_router``:
#: main loss, balancing loss, z-loss, then ``main + aux_coef * aux + z_coef * z``; ``router_then_main``:
#: balancing loss, z-loss, main loss, then the same sum.
LOSS_ORDERS = ("accumulate", "main_then_router", "router_then_main")
#: What ``forward`` returns: ``loss``; ``selected``: (loss, stacked selected experts [L, T, K]);
#: ``router``: (loss, router logits per layer, selected experts per layer);
#: ``logits_cat``: (loss, every layer's logits concatenated [L*T, E]).
RETURNS = ("loss", "selected", "router", "logits_cat")


class MoEStack(nn.Module):
    """Residual stack of MoE blocks with the stacked router losses; see the module docstring.

    ``block``: factory of one block (default: ``SparseMoeBlock(hidden, ffn, experts, top_k, group_routing=...,
    ep_group=...)``); it is called with no argument and must return a module whose output has
    ``hidden_states``, ``router_logits`` and ``selected_experts``. ``norm``: factory of the pre-norm applied
    before each block (``norm(hidden)``; None: no norm); the norms are registered as ``norms`` before the blocks.
    ``flatten_tokens``: reshape the input to ``[tokens, hidden]`` before the first block.
    ``balancing``: the balancing-loss function, called as ``balancing(logits, experts, top_k, mask)`` (plus
    ``global_group``, the global-statistics group, when there is one). ``z_loss``: the z-loss function, called
    as ``z_loss(logits, mask)``. ``loss_order``: see ``LOSS_ORDERS``. ``detach_logits``: the logits are
    detached as each block returns them (logging; only without router losses). ``init_std``: after
    construction, every block parameter is drawn from N(0, std), block by block in parameter order (the
    norms keep their own initialisation); a pair is (std of the block's ``gate.*``, std of the others);
    None: the blocks' own initialisation.
    """

    def __init__(
        self,
        layers: int = 2,
        hidden: int = 16,
        ffn: int = 32,
        experts: int = 4,
        top_k: int = 2,
        *,
        ep_group: dist.ProcessGroup | None = None,
        group_routing: bool = False,
        block: Callable[[], nn.Module] | None = None,
        norm: Callable[[int], nn.Module] | None = None,
        blocks_name: str = "layers",
        flatten_tokens: bool = False,
        main_loss: str = "square_mean",
        aux_coef: float = 0.0,
        z_coef: float = 0.0,
        z_loss: Callable[..., torch.Tensor] = router_z_loss,
        balancing: Callable[..., torch.Tensor] = load_balancing_loss,
        global_group: dist.ProcessGroup | None = None,
        loss_order: str = "accumulate",
        returns: str = "loss",
        detach_logits: bool = False,
        init_std: float | tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if main_loss not in MAIN_LOSSES:
            raise ValueError(f"main_loss={main_loss!r}; choose one of {MAIN_LOSSES}")
        if loss_order not in LOSS_ORDERS:
            raise ValueError(f"loss_order={loss_order!r}; choose one of {LOSS_ORDERS}")
        if returns not in RETURNS:
            raise ValueError(f"returns={returns!r}; choose one of {RETURNS}")
        if detach_logits and (aux_coef or z_coef):
            raise ValueError("detach_logits cuts the router losses' gradient: use it without aux_coef/z_coef")
        if block is None:
            def block() -> nn.Module:
                return SparseMoeBlock(hidden, ffn, experts, top_k, group_routing=group_routing, ep_group=ep_group)
        self.norms = nn.ModuleList(norm(hidden) for _ in range(layers)) if norm is not None else None
        self.blocks_name = blocks_name
        self.add_module(blocks_name, nn.ModuleList(block() for _ in range(layers)))
        self.num_experts, self.top_k = experts, top_k
        self.flatten_tokens, self.main_loss, self.returns, self.detach_logits = flatten_tokens, main_loss, returns, detach_logits
        self.aux_coef, self.z_coef, self.z_loss, self.balancing = aux_coef, z_coef, z_loss, balancing
        self.global_group, self.loss_order = global_group, loss_order
        if init_std is not None:
            router_std, other_std = init_std if isinstance(init_std, tuple) else (init_std, init_std)
            with torch.no_grad():
                for b in self.moe_blocks():
                    for name, p in b.named_parameters():
                        p.normal_(0.0, router_std if name.startswith("gate.") else other_std)

    def moe_blocks(self) -> nn.ModuleList:
        """The blocks, whatever attribute name they are registered under."""
        return getattr(self, self.blocks_name)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> Any:
        """``other``: the target with ``main_loss="mse"``, else the attention mask ([B, S], 1 = real token; None: all count)."""
        target, mask = (other, None) if self.main_loss == "mse" else (None, other)
        if self.flatten_tokens:
            x = x.reshape(-1, x.shape[-1])  # [tokens, hidden], as the MoE block sees it
        logits, selected = [], []
        for i, block in enumerate(self.moe_blocks()):
            out = block(x if self.norms is None else self.norms[i](x))
            x = x + out.hidden_states
            logits.append(out.router_logits.detach() if self.detach_logits else out.router_logits)
            selected.append(out.selected_experts)
        loss = self._loss(x, target, tuple(logits), mask)
        if self.returns == "selected":
            return loss, torch.stack(selected)
        if self.returns == "router":
            return loss, tuple(logits), tuple(selected)
        if self.returns == "logits_cat":
            return loss, torch.cat(logits, dim=0)
        return loss

    def _main(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if self.main_loss == "mse":
            return torch.nn.functional.mse_loss(x, target)
        if self.main_loss == "square_mean":
            return x.square().mean()
        return x.pow(2).mean()

    def _balancing(self, logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
        if self.global_group is None:
            return self.balancing(logits, self.num_experts, self.top_k, mask)
        return self.balancing(logits, self.num_experts, self.top_k, mask, self.global_group)

    def _loss(self, x: torch.Tensor, target: torch.Tensor | None, logits: tuple[torch.Tensor, ...],
              mask: torch.Tensor | None) -> torch.Tensor:
        if self.loss_order == "accumulate":
            loss = self._main(x, target)
            if self.aux_coef:
                loss = loss + self.aux_coef * self._balancing(logits, mask)
            if self.z_coef:
                loss = loss + self.z_coef * self.z_loss(logits, mask)
            return loss
        main = self._main(x, target) if self.loss_order == "main_then_router" else None
        aux = self._balancing(logits, mask) if self.aux_coef else None
        z = self.z_loss(logits, mask) if self.z_coef else None
        loss = self._main(x, target) if main is None else main
        if aux is not None:
            loss = loss + self.aux_coef * aux
        if z is not None:
            loss = loss + self.z_coef * z
        return loss


def preset_stack(
    num_layers: int = 2, hidden_size: int = 16, intermediate_size: int = 32, num_experts: int = 4, top_k: int = 2,
    group_routing: bool = False, ep_group: dist.ProcessGroup | None = None, aux_coef: float = 0.01, z_coef: float = 0.001,
) -> MoEStack:
    """The ``moe_stack`` preset's model: ``forward(x, target)`` = mse + aux_coef * balancing + z_coef * z-loss, N(0, 0.2) weights."""
    return MoEStack(num_layers, hidden_size, intermediate_size, num_experts, top_k, ep_group=ep_group,
                    group_routing=group_routing, main_loss="mse", aux_coef=aux_coef, z_coef=z_coef,
                    loss_order="main_then_router", init_std=0.2)


def speed_stack(layers: int, hidden: int, ffn: int, experts: int, top_k: int, ep_group: Any = None) -> MoEStack:
    """The speed bench's decoder: LayerNorm -> block -> residual, loss ``h.square().mean()``, blocks N(0, 0.02)."""
    return MoEStack(layers, hidden, ffn, experts, top_k, ep_group=ep_group, norm=nn.LayerNorm, blocks_name="blocks",
                    init_std=0.02)


def router_stack(layers: int = 2, hidden: int = 16, experts: int = 4, top_k: int = 2, ep_group: Any = None,
                 detach_logits: bool = True) -> MoEStack:
    """Returns (loss ``x.pow(2).mean()``, logits per layer (detached unless ``detach_logits=False``), selected per layer)."""
    return MoEStack(layers, hidden, 2 * hidden, experts, top_k, ep_group=ep_group, blocks_name="blocks",
                    main_loss="pow2_mean", returns="router", detach_logits=detach_logits, init_std=(0.5, 0.2))


class DecoderStack(nn.Module):
    """The reference model's decoder layers as written (``text.DecoderLayer``: RMSNorm -> GQA attention with q/k
    RMSNorm and M-RoPE -> residual -> RMSNorm -> ``SparseMoeBlock`` -> residual), then the final RMSNorm; loss
    ``h.square().mean()``.

    ``forward(x)``: ``x`` is ``[B, S, H]``, B independent sequences of S text tokens each: positions
    ``0..S-1`` in all three M-RoPE streams and a causal mask per sequence are computed in the graph from
    the shape, so every per-sequence tensor (cos/sin ``[B, S, D]``, the bias ``[B, 1, S, S]``) has the batch
    dim in front. No embedding and no LM head: the bench times the layers.
    """

    def __init__(self, config: InternS1VLConfig, ep_group: dist.ProcessGroup | None = None,
                 init_std: float | None = 0.02) -> None:
        super().__init__()
        text = config.text
        self.layers = nn.ModuleList(DecoderLayer(config, i, ep_group) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = TextRotaryEmbedding(text)
        if init_std is not None:  # the experts are allocated with torch.empty, the router with zeros
            with torch.no_grad():
                for layer in self.layers:
                    for p in layer.mlp.parameters():
                        p.normal_(0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        positions = torch.arange(seq_len, device=x.device).expand(3, batch, seq_len)
        cos, sin = self.rotary_emb(positions, x.dtype)
        attn_bias = causal_attention_bias(None, batch, seq_len, x.dtype, x.device)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, attn_bias)
        return self.norm(x).square().mean()


def decoder_config(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, experts: int,
                   top_k: int) -> InternS1VLConfig:
    """The ``bench`` preset with these text sizes (every layer MoE; M-RoPE sections in the preset's 2:1:1
    proportion, so ``head_dim`` must be a multiple of 8)."""
    if head_dim % 8:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 8 (M-RoPE sections 2:1:1 of head_dim/2)")
    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, moe_intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k,
                mrope_section=(head_dim // 4, head_dim // 8, head_dim // 8))
    return InternS1VLConfig.bench(text=text, vision={"out_hidden_size": hidden})


def decoder_stack(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, experts: int,
                  top_k: int, ep_group: Any = None) -> DecoderStack:
    """The speed bench's decoder-layer model: ``decoder_config(...)``'s layers, MoE parameters N(0, 0.02)."""
    return DecoderStack(decoder_config(layers, hidden, heads, kv_heads, head_dim, ffn, experts, top_k), ep_group)
