"""MoE-block mutants for the Domino soundness corpus.

``MutantBlock`` is a small dropless EP block with the structure of
``moe_passes.models.interns1_vl.moe.SparseMoeBlock`` (router -> softmax -> top-k ->
renormalise -> argsort by expert -> gather -> counts -> count exchange ->
dispatch all-to-all -> grouped experts -> combine all-to-all -> un-permute ->
weighted sum over the K copies), with one named mutation that makes some step
cross tokens.  Every mutant must be either chunked and exact, or left alone
with a reason: never chunked and wrong.

``EXPECTED`` maps each mutant to ``("rewritten", None)`` or
``("skipped", substring of the reason)``.  Every future soundness bug adds a
mutant here.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

log = logging.getLogger(__name__)

HIDDEN, FFN, EXPERTS, TOP_K = 8, 8, 4, 2
#: The group-limited router's block: 8 experts in 4 groups of 2, the top 2 groups kept per token (with
#: EXPERTS = 4 the only split, 2 groups of 2 with one kept, would pick a whole group every time). On the
#: corpus' inputs (7 tokens per rank) the group limit changes the experts of 4 of rank 0 and 1's 14 tokens.
DEEPSEEK_EXPERTS, DEEPSEEK_GROUPS, DEEPSEEK_TOPK_GROUPS = 8, 4, 2

EXPECTED: dict[str, tuple[str, str | None]] = {
    "reference": ("rewritten", None),
    "softmax_dim0": ("skipped", "over the token dim"),
    "softmax_dim_neg2": ("skipped", "over the token dim"),
    "cumsum_tokens": ("skipped", "over the token dim"),
    "mean_tokens": ("skipped", "reduces over the token dim 0"),
    "sort_tokens": ("skipped", "over the token dim"),
    # An in-place edit of a value the region computes (each chunk edits its own rows; the loss reads the
    # edited logits, reassembled from the chunks): the functional op's rule decides, layout kept.
    "inplace_logits_after_softmax": ("rewritten", None),
    "cross_token_after_combine": ("rewritten", None),
    "capacity_router": ("skipped", "over the token dim"),
    "capacity_mask_after_combine": ("rewritten", None),
    "topk_second_norm_before_dispatch": ("skipped", "reduces over the token dim 0"),
    "topk_second_norm_after_combine": ("rewritten", None),
    "gather_by_fixed_index": ("skipped", "outside (fixed) index"),
    "layer_norm_router": ("rewritten", None),
    "roll_tokens": ("skipped", "redistributes Shard(0) token rows"),
    "roll_experts": ("rewritten", None),
    "split_sizes_kept_on_self": ("skipped", "leaves the region"),
    # ``dim`` is not the second argument of every reduction: linalg_vector_norm(self, ord, dim, ...).
    "norm_tokens": ("skipped", "reduces over the token dim 0"),
    "norm_experts": ("rewritten", None),
    "var_tokens_correction": ("skipped", "reduces over the token dim 0"),
    # Megatron-style: the combine all-to-all inside a custom torch.autograd.Function. The canonical IR keeps
    # the Function as one opaque node (its own backward survives); Domino does not look inside it.
    "autograd_function_combine": ("skipped", "autograd_function_apply"),
    # torch 2.11's spelling of all_to_all_single_autograd on any torch: the autograd all-to-all op, then
    # its wait inside a Function whose backward is the identity (_FromTorchTensor). Means wait_tensor.
    "wait_in_identity_function": ("rewritten", None),
    # The same Function with a backward that is not the identity: not a wait, left alone.
    "wait_in_scaling_function": ("skipped", "autograd_function_apply"),
    # ---- idioms people write by hand (issue 23): each is the same block computed another way.
    # Per-expert counters built in place into a zero buffer made just before.
    "counts_scatter_add_inplace": ("rewritten", None),
    "counts_index_add_inplace": ("rewritten", None),
    "counts_one_hot_sum": ("rewritten", None),
    # Token copies made with repeat_interleave before the expert sort (x.repeat_interleave(K, dim=0)[order]).
    "token_copies_repeat_interleave": ("rewritten", None),
    "counts_histc": ("rewritten", None),
    # Expert id per received row from the exchanged counts.
    "expert_ids_repeat_interleave": ("rewritten", None),
    # Experts as a per-row weight gather + bmm, as a loop over split(counts.tolist()) + cat, as a
    # boolean-mask loop writing into a zero buffer (transformers 4.x style).
    "experts_weight_gather": ("rewritten", None),
    "experts_split_loop": ("rewritten", None),
    "experts_mask_loop": ("rewritten", None),
    "experts_where_index_add_loop": ("rewritten", None),  # rows_e = torch.where(eid == e)[0]; out.index_add_(0, rows_e, ...)
    # DeepSeek-V3-style router: sigmoid scores, top-k of scores + an expert bias, weights gathered from scores.
    "sigmoid_bias_router": ("rewritten", None),
    # DeepSeek-V3's group-limited router (issue 19): sigmoid scores + expert bias (selection only) viewed
    # [T, G, E/G], group score = sum of the top 2 per group, the top groups kept by a [T, G] mask scattered
    # in place and expanded over the experts (masked_fill), top-k of the masked choice, weights gathered
    # from the unbiased scores and normalised.
    "deepseek_group_limited_router": ("rewritten", None),
    # A shared expert beside the routed ones.
    "shared_expert": ("rewritten", None),
    # Neighbours that must stay refused: a counter buffer read before the region writes it, and a
    # mask loop whose masks come from token data positions (a cumsum over tokens).
    "counts_inplace_buffer_read_twice": ("skipped", "in place"),
    # ... and counts whose added values are read by position from outside the region.
    # (Split sizes and per-row expert ids are layout metadata, trusted once computed from the exchanged
    # counts -- see row_analysis's trust boundary: sizes cut from the counts' total by position, e.g.
    # ``[R // 2, R - R // 2]``, are not told apart from per-expert counts and are not in this corpus.)
    "counts_scatter_add_positional_src": ("skipped", "read by position"),
    # ... and a split loop whose pieces are put back in another order (rows end up at other positions).
    "experts_split_loop_reordered": ("skipped", "not every piece of"),
    "experts_mask_loop_token_positions": ("skipped", "over the token dim"),
    # ---- transformers 5.24's own expert parallelism (distributed/expert_parallel.py AllToAllEP and
    # integrations/moe.py grouped_mm_experts_forward), one idiom at a time, router in the graph:
    # counts exchanged by the c10d in-place all_to_all_single(recv_counts, send_counts) into a fresh
    # empty_like (Dynamo: the functional exchange, then recv_counts.copy_(result)) ...
    "count_exchange_inplace_c10d": ("rewritten", None),
    # ... but into a module buffer: the buffer would keep the last chunk's counts, not the batch's.
    "count_exchange_into_module_buffer": ("skipped", "outside the region"),
    # Received rows sorted by expert (sort(ids)[1]), run, and put back by the inverse permutation
    # built in place (inv = empty_like(p); inv[p] = arange(len(p)); y[inv]) ...
    "received_rows_inverse_gather": ("rewritten", None),
    # ... the whole grouped_mm experts forward on received rows (top-1, unit weights): rows[p // 1],
    # ones[p] weights, sentinel mask ids >= E_local (masked_fill_ before, masked_fill after the GEMMs),
    # ids.clamp_(max=E_local - 1) ...
    "received_rows_sentinel_mask": ("rewritten", None),
    # ... and neighbours that put rows back elsewhere: an "inverse" filled with arange(n).flip(0), the
    # inverse of another permutation (a descending sort) ...
    "received_rows_wrong_inverse": ("skipped", "not a gather by a routing permutation"),
    "received_rows_inverse_of_other_sort": ("skipped", "not a gather by a routing permutation"),
    # ... or masks received rows by position (arange(R) < R // 2), or by expert ids in received order
    # applied to the rows sorted by expert. Both refused: metadata meets received rows only in their own
    # order (row_analysis._row_order); both were rewritten, inexact, before that rule (|dloss| 2.1e-3 / 1.9e-2).
    "received_rows_positional_mask": ("skipped", "mixes values of different layouts"),
    "received_rows_mask_in_other_order": ("skipped", "mixes values of different layouts"),
    # In-place pointwise edits: of a value the region computes, read only in the region (rewritten) ...
    "inplace_edit_of_region_value": ("rewritten", None),
    # ... the same edit after a cross-token op outside the region read the value (it would read the edit) ...
    "inplace_edit_read_before_and_outside": ("skipped", "mutates add in place"),
    # ... and of a view of the token matrix (the router read x before the edit, the experts after it).
    "inplace_edit_of_token_view": ("skipped", "mutated in place"),
    # ---- the router outside the compiled graph (ROUTER_OUTSIDE): the experts module compiled on its own,
    # called with hidden [T, H], top_k_index [T, K], top_k_weights [T, K] (transformers' EP interface).
    "experts_graph_routing_inputs": ("rewritten", None),
    # transformers' AllToAllEP dispatch/combine around its real grouped_mm_experts_forward.
    "transformers_all_to_all_ep": ("rewritten", None),
    # Weights normalised over the tokens inside the graph, before the dispatch: computed from all rows
    # outside the region, then read per row by each chunk (as topk_second_norm_after_combine).
    "routing_inputs_weights_over_tokens": ("rewritten", None),
    # The weights input gathered by the expert sort and scaling the rows before the dispatch (torchtitan's
    # score_before_experts): every per-token graph input is a token-row seed beside top_k_index
    # (``regions._token_inputs``), and the gather by the sort's indices is then row by row.
    "routing_inputs_weights_before_dispatch": ("rewritten", None),
    # The same, with the weights first normalised over all tokens (a sum over the rows of a token-row input
    # before the dispatch): each chunk would normalise by its own tokens' sum.
    "routing_inputs_weights_normalised_before_dispatch": ("skipped", "reduces over the token dim 0"),
    # The weights rolled over the tokens before scaling the rows: token t would be scaled by token t-1's.
    "routing_inputs_weights_rolled_before_dispatch": ("skipped", "redistributes Shard(0) token rows"),
    # The expert ids rolled over the tokens: token t would get token t-1's experts within each chunk.
    "routing_inputs_index_rolled": ("skipped", "redistributes Shard(0) token rows"),
    # top_k_index handed over flat ([T * K]): not provably one row per token.
    "routing_inputs_flat_index": ("skipped", "not a per-token input"),
}

#: Mutants that must be refused but are rewritten by the analysis and then NOT exact: mutant -> the numbers.
#: Their decision test is a strict xfail, so the fix flips it. Empty: the two found this round
#: (``received_rows_positional_mask``, ``received_rows_mask_in_other_order``) are refused since
#: ``row_analysis._row_order`` (metadata meets received rows only in the rows' own order).
KNOWN_UNSOUND: dict[str, str] = {}

#: Mutants whose router runs outside the compiled graph: ``forward`` routes eagerly and calls
#: ``dispatch(hidden, top_k_index, top_k_weights)``, which the tests compile on its own (transformers'
#: experts module compiled alone, or the part after a graph break).
ROUTER_OUTSIDE = {"experts_graph_routing_inputs", "transformers_all_to_all_ep", "routing_inputs_weights_over_tokens",
                  "routing_inputs_weights_before_dispatch", "routing_inputs_weights_normalised_before_dispatch",
                  "routing_inputs_weights_rolled_before_dispatch", "routing_inputs_index_rolled", "routing_inputs_flat_index"}


class IdentityWait(torch.autograd.Function):
    """torch 2.11's ``_FromTorchTensor`` as Dynamo sees it: wait in forward, the gradient unchanged."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return torch.ops._c10d_functional.wait_tensor(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return grad


class ScalingWait(IdentityWait):
    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return grad * 2


class AllToAllFunction(torch.autograd.Function):
    """An all-to-all with a hand-written backward (the reverse exchange), as Megatron-style MoE code has."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # type: ignore[no-untyped-def, override]
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return all_to_all_single(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        output_splits, input_splits = ctx.splits
        return all_to_all_single(grad.contiguous(), input_splits, output_splits, ctx.group), None, None, None


class MutantBlock(nn.Module):
    def __init__(self, mutation: str, group: dist.ProcessGroup, seed: int = 0) -> None:
        super().__init__()
        assert mutation in EXPECTED, mutation
        self.mutation = mutation
        self.group = group
        self.ep = dist.get_world_size(group)
        self.experts = DEEPSEEK_EXPERTS if mutation == "deepseek_group_limited_router" else EXPERTS
        self.local = self.experts // self.ep
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Parameter(torch.randn(self.experts, HIDDEN, generator=g) * 0.5)
        rank = dist.get_rank(group)
        w1 = torch.randn(self.experts, HIDDEN, FFN, generator=g) * 0.3
        w2 = torch.randn(self.experts, FFN, HIDDEN, generator=g) * 0.3
        if mutation != "transformers_all_to_all_ep":  # (its experts are HFExperts')
            self.w1 = nn.Parameter(w1[rank * self.local:(rank + 1) * self.local].clone())
            self.w2 = nn.Parameter(w2[rank * self.local:(rank + 1) * self.local].clone())
        if mutation in ("sigmoid_bias_router", "deepseek_group_limited_router"):
            # DeepSeek-V3's e_score_correction_bias: a buffer (it only picks experts; no gradient reaches it)
            self.register_buffer("bias", torch.randn(self.experts, generator=g) * 0.1)
        if mutation == "shared_expert":
            self.ws1 = nn.Parameter(torch.randn(HIDDEN, FFN, generator=g) * 0.3)
            self.ws2 = nn.Parameter(torch.randn(FFN, HIDDEN, generator=g) * 0.3)
        if mutation == "count_exchange_into_module_buffer":
            self.register_buffer("recv_counts_buffer", torch.zeros(self.ep, self.local, dtype=torch.int64))
        if mutation == "transformers_all_to_all_ep":
            gate_up = torch.randn(self.experts, 2 * FFN, HIDDEN, generator=g) * 0.3
            down = torch.randn(self.experts, HIDDEN, FFN, generator=g) * 0.3
            self.hf_experts = HFExperts(gate_up[rank * self.local:(rank + 1) * self.local].clone(),
                                        down[rank * self.local:(rank + 1) * self.local].clone())

    def _experts(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from moe_passes.models.interns1_vl.grouped_mm import grouped_mm

        return grouped_mm(F.silu(grouped_mm(x, self.w1, offsets)), self.w2, offsets)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """ROUTER_OUTSIDE: (logits, top_k_index, the arguments of ``dispatch``), computed eagerly."""
        x = h.reshape(-1, HIDDEN)
        logits = F.linear(x, self.gate)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        index = selected.reshape(-1) if self.mutation == "routing_inputs_flat_index" else selected
        return logits, selected, (x, index, weights)

    def dispatch(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """ROUTER_OUTSIDE: the expert-parallel part alone, from the routing decided outside (the graph the
        tests compile): dispatch, experts, combine, weighted sum over the K copies."""
        mut = self.mutation
        if mut == "transformers_all_to_all_ep":
            return self._transformers_all_to_all(x, top_k_index, top_k_weights)
        T = x.shape[0]
        if mut == "routing_inputs_weights_over_tokens":
            top_k_weights = top_k_weights / top_k_weights.sum(dim=0, keepdim=True) * T
        if mut == "routing_inputs_index_rolled":
            top_k_index = torch.roll(top_k_index, 1, 0)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        permuted = x[order // TOP_K]
        if mut == "routing_inputs_weights_normalised_before_dispatch":
            top_k_weights = top_k_weights / top_k_weights.sum(dim=0, keepdim=True) * T
        if mut == "routing_inputs_weights_rolled_before_dispatch":
            top_k_weights = torch.roll(top_k_weights, 1, 0)
        if mut.startswith("routing_inputs_weights_") and mut.endswith("before_dispatch"):  # torchtitan's score_before_experts
            permuted = permuted * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        counts = torch.zeros(self.experts, dtype=torch.int64).scatter_add(0, flat, torch.ones_like(flat))
        recv_counts = all_to_all_single(counts, [self.local] * self.ep, [self.local] * self.ep, self.group)
        input_splits = counts.view(self.ep, self.local).sum(dim=1).tolist()
        recv = recv_counts.view(self.ep, self.local)
        output_splits = recv.sum(dim=1).tolist()
        for s in input_splits + output_splits:
            torch._check(s >= 0)
        torch._check(sum(input_splits) == permuted.shape[0])
        received = all_to_all_single_autograd(permuted, output_splits, input_splits, self.group)
        offsets = recv.sum(dim=0).cumsum(0)
        block_ends = recv_counts.reshape(-1).cumsum(0)
        expert_of_row = torch.searchsorted(block_ends, torch.arange(received.shape[0]), right=True) % self.local
        sort_rows = torch.argsort(expert_of_row, stable=True)
        results = self._experts(received[sort_rows], offsets)
        back = torch.zeros_like(results).index_copy(0, sort_rows, results)
        combined = all_to_all_single_autograd(back, input_splits, output_splits, self.group)
        unpermuted = torch.zeros_like(combined).index_copy(0, order, combined)
        if mut.startswith("routing_inputs_weights_") and mut.endswith("before_dispatch"):  # weights applied already
            return unpermuted.view(T, TOP_K, HIDDEN).sum(dim=1)
        return (unpermuted.view(T, TOP_K, HIDDEN) * top_k_weights.unsqueeze(-1)).sum(dim=1)

    def _transformers_all_to_all(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                 top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers 5.24 ``AllToAllEP`` (``_dispatch_tokens`` / ``_combine_tokens``, TP size 1, as written
        there) around its real ``grouped_mm_experts_forward``. Its ``__call__``'s ``tokens.shape[0] == 0``
        branch is left out (an unbacked test that breaks the graph: moe_passes.integrations.transformers_ep)."""
        from transformers.distributed.parallel_utils import _WaitTensor
        from transformers.integrations.moe import grouped_mm_experts_forward

        ep_group, ep_size = self.group, self.ep
        num_top_k = top_k_index.size(-1)
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids)
        send_tokens = hidden_states[order // num_top_k]
        send_counts = torch.zeros(self.local * ep_size, dtype=torch.long, device=hidden_states.device)
        send_counts = send_counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
        send_counts = send_counts.view(ep_size, self.local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=ep_group)
        send_sizes, recv_sizes = torch.stack([send_counts.sum(dim=1), recv_counts.sum(dim=1)]).tolist()
        recv_tokens = all_to_all_single_autograd(send_tokens, recv_sizes, send_sizes, ep_group)
        recv_tokens = _WaitTensor.apply(recv_tokens)
        recv_expert_ids = torch.arange(self.local, device=hidden_states.device).repeat(ep_size)
        recv_expert_ids = recv_expert_ids.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_sizes))
        recv_expert_ids = recv_expert_ids.unsqueeze(-1)
        recv_weights = torch.ones_like(recv_expert_ids, dtype=recv_tokens.dtype)
        expert_output = grouped_mm_experts_forward(self.hf_experts, recv_tokens, recv_expert_ids, recv_weights)
        hidden_dim = expert_output.size(-1)
        recv_out = all_to_all_single_autograd(expert_output, send_sizes, recv_sizes, ep_group)
        token_outputs = torch.empty_like(recv_out)
        token_outputs[order] = recv_out
        token_outputs = token_outputs.view(*top_k_weights.shape, hidden_dim)
        return (token_outputs * top_k_weights.unsqueeze(-1)).sum(dim=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mut = self.mutation
        if mut in ROUTER_OUTSIDE:
            logits, selected, args = self.route(h)
            out = self.dispatch(*args)
            return out.square().mean() + 0.01 * logits.square().mean(), selected
        x = h.reshape(-1, HIDDEN)
        if mut == "inplace_edit_of_token_view":
            x = x * 1.0  # not a view of the (leaf) input, so that the in-place edit below is legal eagerly
        T = x.shape[0]
        E = self.experts
        logits = F.linear(x, self.gate)
        if mut == "cumsum_tokens":
            logits = logits.cumsum(0)
        if mut == "mean_tokens":
            logits = logits - logits.mean(0, keepdim=True)
        if mut == "layer_norm_router":
            logits = F.layer_norm(logits, (E,))
        if mut == "roll_tokens":  # DTensor's sharding rule decides (no explicit rule for roll)
            logits = torch.roll(logits, 1, 0)
        if mut == "roll_experts":
            logits = torch.roll(logits, 1, 1)
        if mut == "norm_tokens":  # aten.linalg_vector_norm(logits, 2, [0], True): dim is argument 2
            logits = logits / logits.norm(dim=0, keepdim=True)
        if mut == "norm_experts":
            logits = logits / logits.norm(dim=-1, keepdim=True)
        if mut == "var_tokens_correction":  # aten.var.correction(logits, [0], correction=0, keepdim=True)
            logits = logits - torch.var(logits, dim=0, correction=0, keepdim=True)
        if mut == "sort_tokens":
            logits = logits.sort(dim=0).values
        scores_mean = None
        if mut in ("inplace_edit_read_before_and_outside", "inplace_edit_of_region_value"):
            logits = logits + 0.0
            if mut != "inplace_edit_of_region_value":
                scores_mean = logits.mean(dim=0)  # outside the region (over the tokens), reads the values before the edit
            logits.mul_(0.5)
        dim = {"softmax_dim0": 0, "softmax_dim_neg2": -2}.get(mut, -1)
        probs = F.softmax(logits, dim=dim, dtype=torch.float)
        if mut == "inplace_logits_after_softmax":
            logits.mul_(0.5)
        weights, selected = torch.topk(probs, TOP_K, dim=-1)
        if mut == "sigmoid_bias_router":
            scores = torch.sigmoid(logits)
            _, selected = torch.topk(scores + self.bias, TOP_K, dim=-1)
            weights = scores.gather(1, selected)
        if mut == "deepseek_group_limited_router":  # transformers' DeepseekV3TopkRouter / MoE.route_tokens_to_experts
            scores = torch.sigmoid(logits)
            choice = scores + self.bias  # the bias only picks experts
            group_scores = choice.view(T, DEEPSEEK_GROUPS, -1).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            group_idx = torch.topk(group_scores, k=DEEPSEEK_TOPK_GROUPS, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(T, DEEPSEEK_GROUPS, E // DEEPSEEK_GROUPS).reshape(T, -1)
            choice = choice.masked_fill(~score_mask.bool(), 0.0)
            selected = torch.topk(choice, k=TOP_K, dim=-1, sorted=False)[1]
            weights = scores.gather(1, selected)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if mut in ("topk_second_norm_before_dispatch", "topk_second_norm_after_combine"):
            weights = weights / weights.sum(dim=0, keepdim=True) * T
        mask = None
        if mut in ("capacity_router", "capacity_mask_after_combine"):
            one_hot = F.one_hot(selected, E).sum(1)  # [T, E]
            position = one_hot.cumsum(0)  # position of each token in its expert's queue: crosses tokens
            capacity = max(1, (T * TOP_K) // E)
            keep = (position <= capacity).gather(1, selected)  # [T, K]
            mask = keep.to(weights.dtype)
        flat = selected.reshape(-1)
        order = torch.argsort(flat, stable=True)
        if mut == "inplace_edit_of_token_view":  # after the router read x, before the experts do
            x.view(T, 2, HIDDEN // 2).mul_(0.5)
        if mut == "gather_by_fixed_index":
            permuted = x[torch.arange(T).repeat_interleave(TOP_K)][order]
        elif mut == "token_copies_repeat_interleave":
            permuted = x.repeat_interleave(TOP_K, dim=0)[order]
        else:
            permuted = x[order // TOP_K]
        if mut in ("capacity_router", "topk_second_norm_before_dispatch"):
            scale = weights * mask if mask is not None else weights
            permuted = permuted * scale.reshape(-1)[order].unsqueeze(-1)
        if mut == "counts_scatter_add_inplace":
            counts = torch.zeros(E, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
        elif mut == "counts_index_add_inplace":
            counts = torch.zeros(E, dtype=torch.int64).index_add_(0, flat, torch.ones_like(flat))
        elif mut == "counts_inplace_buffer_read_twice":
            buffer = torch.zeros(E, dtype=torch.int64)
            before = buffer.sum()  # read before the in-place write: not a fresh counter
            counts = buffer.scatter_add_(0, flat, torch.ones_like(flat)) + before
        elif mut == "counts_scatter_add_positional_src":
            positional = torch.arange(flat.shape[0]) % 2 + 1  # fixed per position: chunk rows read other entries
            counts = torch.zeros(E, dtype=torch.int64).scatter_add(0, flat, positional) // positional.max()
        elif mut == "counts_one_hot_sum":
            counts = F.one_hot(flat, E).sum(0)
        elif mut == "counts_histc":
            counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1).long()
        else:
            counts = torch.zeros(E, dtype=torch.int64).scatter_add(0, flat, torch.ones_like(flat))
        if mut in ("count_exchange_inplace_c10d", "count_exchange_into_module_buffer"):
            # transformers' AllToAllEP: the c10d in-place exchange (Dynamo: functional op, then a copy_ into the buffer)
            send_counts = counts.view(self.ep, self.local)
            recv_buffer = torch.empty_like(send_counts) if mut == "count_exchange_inplace_c10d" else self.recv_counts_buffer
            dist.all_to_all_single(recv_buffer, send_counts, group=self.group)
            recv_counts = recv_buffer.reshape(-1)
        else:
            recv_counts = all_to_all_single(counts, [self.local] * self.ep, [self.local] * self.ep, self.group)
        input_splits = counts.view(self.ep, self.local).sum(dim=1).tolist()
        recv = recv_counts.view(self.ep, self.local)
        output_splits = recv.sum(dim=1).tolist()
        for s in input_splits + output_splits:
            torch._check(s >= 0)
        torch._check(sum(input_splits) == permuted.shape[0])
        if mut == "split_sizes_kept_on_self":  # an older torchtitan layout: split sizes become graph outputs
            self.input_splits = input_splits
        if mut in ("wait_in_identity_function", "wait_in_scaling_function"):
            wait = IdentityWait if mut == "wait_in_identity_function" else ScalingWait
            sent = torch.ops._c10d_functional_autograd.all_to_all_single(permuted, output_splits, input_splits,
                                                                          self.group.group_name)
            received = wait.apply(sent)
        else:
            received = all_to_all_single_autograd(permuted, output_splits, input_splits, self.group)
        offsets = recv.sum(dim=0).cumsum(0)
        block_ends = recv_counts.reshape(-1).cumsum(0)
        rows = torch.arange(received.shape[0])
        if mut == "expert_ids_repeat_interleave":
            expert_of_row = torch.repeat_interleave(torch.arange(self.local).repeat(self.ep), recv_counts,
                                                    output_size=received.shape[0])
        else:
            expert_of_row = torch.searchsorted(block_ends, rows, right=True) % self.local
        if mut == "experts_where_index_add_loop":
            back = torch.zeros_like(received)
            for e in range(self.local):
                rows_e = torch.where(expert_of_row == e)[0]
                back.index_add_(0, rows_e, F.silu(received[rows_e] @ self.w1[e]) @ self.w2[e])
        elif mut in INVERSE_GATHER:
            back = self._sorted_experts_inverse_gather(received, expert_of_row, offsets)
        elif mut in ("experts_mask_loop", "experts_mask_loop_token_positions"):
            back = torch.zeros_like(received)
            for e in range(self.local):
                mine = expert_of_row == e
                if mut == "experts_mask_loop_token_positions":
                    mine = mine & (received.sum(-1).cumsum(0) > 0)
                back[mine] = F.silu(received[mine] @ self.w1[e]) @ self.w2[e]
        else:
            sort_rows = torch.argsort(expert_of_row, stable=True)
            xs = received[sort_rows]
            if mut == "experts_weight_gather":
                eid = expert_of_row[sort_rows]
                results = torch.bmm(F.silu(torch.bmm(xs.unsqueeze(1), self.w1[eid])), self.w2[eid]).squeeze(1)
            elif mut in ("experts_split_loop", "experts_split_loop_reordered"):
                pieces = torch.split(xs, recv.sum(dim=0).tolist())
                outs = [F.silu(piece @ self.w1[e]) @ self.w2[e] for e, piece in enumerate(pieces)]
                results = torch.cat(outs[::-1] if mut == "experts_split_loop_reordered" else outs)
            else:
                results = self._experts(xs, offsets)
            back = torch.zeros_like(results).index_copy(0, sort_rows, results)
        if mut == "autograd_function_combine":
            combined = AllToAllFunction.apply(back, input_splits, output_splits, self.group)
        elif mut == "wait_in_identity_function":
            combined = IdentityWait.apply(torch.ops._c10d_functional_autograd.all_to_all_single(
                back, input_splits, output_splits, self.group.group_name))
        else:
            combined = all_to_all_single_autograd(back, input_splits, output_splits, self.group)
        unpermuted = torch.zeros_like(combined).index_copy(0, order, combined)
        if mut in ("capacity_router", "topk_second_norm_before_dispatch"):
            out = unpermuted.view(T, TOP_K, HIDDEN).sum(dim=1)
        else:
            w = weights * mask if mask is not None else weights
            out = (unpermuted.view(T, TOP_K, HIDDEN) * w.unsqueeze(-1)).sum(dim=1)
        if mut == "cross_token_after_combine":
            out = out - out.mean(dim=0, keepdim=True)
        if mut == "shared_expert":
            out = out + F.silu(x @ self.ws1) @ self.ws2
        loss = out.square().mean() + 0.01 * logits.square().mean()
        if scores_mean is not None:
            loss = loss + 0.01 * scores_mean.square().mean()
        return loss, selected

    def _sorted_experts_inverse_gather(self, received: torch.Tensor, expert_of_row: torch.Tensor,
                                       offsets: torch.Tensor) -> torch.Tensor:
        """INVERSE_GATHER: the received rows sorted by their local expert, the experts, and the rows put back in
        received order by gathering with the inverse permutation (transformers' grouped_mm_experts_forward)."""
        mut = self.mutation
        if mut == "received_rows_positional_mask":  # the first half of the received rows, by position
            R = received.shape[0]
            received = received.masked_fill((torch.arange(R) < R // 2).unsqueeze(-1), 0.0)
        ids_sorted, perm = torch.sort(expert_of_row, stable=True)
        if mut == "received_rows_sentinel_mask":  # the top-1 experts forward of transformers, as it reads
            xs = received[perm // 1]
            unit_weights = torch.ones_like(expert_of_row, dtype=received.dtype)[perm]
            sentinel = (ids_sorted >= self.local).unsqueeze(-1)
            ids_sorted.clamp_(max=self.local - 1)
            xs.masked_fill_(sentinel, 0.0)
            y = self._experts(xs, offsets).masked_fill(sentinel, 0.0) * unit_weights.unsqueeze(-1)
        else:
            y = self._experts(received[perm], offsets)
        if mut == "received_rows_mask_in_other_order":  # sorted rows, ids in received order: rows of other experts
            y = y.masked_fill((expert_of_row >= self.local - 1).unsqueeze(-1), 0.0)
        applied = perm
        if mut == "received_rows_inverse_of_other_sort":
            applied = torch.sort(expert_of_row, stable=True, descending=True)[1]
        inv = torch.empty_like(applied)
        n = applied.numel()
        inv[applied] = torch.arange(n).flip(0) if mut == "received_rows_wrong_inverse" else torch.arange(n)
        return y[inv]


#: Mutants whose experts run on sorted received rows put back by an inverse permutation gather.
INVERSE_GATHER = {"received_rows_inverse_gather", "received_rows_sentinel_mask", "received_rows_wrong_inverse",
                  "received_rows_inverse_of_other_sort", "received_rows_positional_mask", "received_rows_mask_in_other_order"}


class HFExperts(nn.Module):
    """The attributes transformers' ``grouped_mm_experts_forward`` reads from an experts module (gated,
    concatenated [gate; up], not transposed, no bias), with this rank's experts only, as ``MoEParamShard``
    leaves them (``num_experts`` local, ``_is_expert_parallel``: the sentinel masks are traced)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.num_experts = gate_up_proj.shape[0]
        self._is_expert_parallel = True
        self.has_gate, self.has_bias, self.is_transposed, self.has_post_expert_norm = True, False, False, False
        self.act_fn = F.silu

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def make_input(seed: int, rank: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(1, tokens, HIDDEN, generator=g)
