"""``layerwise_aux_loss`` on MoE code nobody here wrote: transformers 5.24 models and the stacked forms.

* transformers Qwen3-MoE, Mixtral, OLMoE, Qwen3-VL-MoE (text only), tiny random configs,
  ``output_router_logits=True`` so their own ``load_balancing_loss_func`` (a per-layer loop
  since transformers 5) runs inside the compiled forward, fp32 and bf16. In bf16 the loss's
  softmax runs in bf16 and the router's in fp32: the pass cannot reuse the router's and keeps
  the per-layer statistics computed from the logits, placed in their layer.
* The stacked forms other code writes, on a tiny MoE stack of our own: transformers 4.x's
  ``load_balancing_loss_func`` (written here from its public form: ``cat`` of
  ``layer_gate.to(device)``, softmax, top-k, one-hot, attention-mask broadcasts), a
  ``.float()`` loss softmax, ``torch.stack``, a ``torch.square`` z-loss.

Each case: the pass applies (reported), and the loss and every gradient equal the unmodified
model, eagerly for every case (the rewritten canonical graph run as Python, fp32: 1e-5;
bf16: the per-layer fp32-accumulated partial sums may round differently from one stacked
reduction, so the bound is the measured Inductor-vs-eager distance of the same model).
Against plain Inductor: ``tests/test_aux_loss_transformers_inductor.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_passes.pipeline.pass_base import PassResult
from tests.aux_helpers import (
    FORMS,
    LAYERS,
    E,
    H,
    K,
    PassThenEager,
    _stack_inputs,
    _stack_model,
    _tiny,
    distance,
    hf_step,
    loss_and_grads,
    report_row,
    transformers,
)
from tests.aux_models import seeded


def applied(results: list[PassResult]) -> dict[str, Any]:
    changed = [r.as_dict() for r in results if r.changed]
    assert len(changed) == 1, [r.as_dict() for r in results]
    return changed[0]


# -- transformers 5.24 models ---------------------------------------------------------------


# bf16: the loop form is re-emitted op for op (bitwise the same numbers); the bound below is far
# under the Inductor-vs-eager distance measured for these models in bf16 (see test_inductor_*).
EAGER_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "olmoe", "qwen3_vl_moe"])
def test_transformers_models_apply_and_keep_values(kind: str, dtype: torch.dtype) -> None:
    model = _tiny(kind).to(dtype)
    step = hf_step(model, padded=(kind != "mixtral"))
    ref = loss_and_grads(model, lambda: step(model))
    backend = PassThenEager()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        # The training step compiled (how the loss and the routers land in one graph: compiling the
        # model object alone breaks the graph at transformers' output-capturing lock, see below).
        compiled_step = torch.compile(lambda: step(model), backend=backend)
        new = loss_and_grads(model, compiled_step)
    torch._dynamo.reset()
    result = applied(backend.results)
    d = distance(ref, new)
    report_row(f"transformers {kind}", result, d, dtype)
    assert result["stats"]["loop_form_layers"] == LAYERS, result
    if dtype == torch.float32:
        assert result["stats"]["softmax_reused"] == LAYERS and result["stats"]["topk_reused"] == LAYERS, result
    else:  # the loss's bf16 softmax is not the router's fp32 one: statistics computed from the logits
        assert result["stats"]["softmax_reused"] == 0, result
        assert any("other numbers" in m for m in result["matched"]), result
    tol_loss, tol_grad = EAGER_TOL[dtype]
    assert d[0] <= tol_loss and d[1] <= tol_grad, (kind, dtype, d)


# -- stacked forms on a tiny MoE stack of our own ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_stacked_forms_apply_and_keep_values(form: str, dtype: torch.dtype) -> None:
    loss, padded, float_router = FORMS[form]
    model = _stack_model(loss, dtype, float_router)
    x, mask = _stack_inputs(dtype, padded)
    ref = loss_and_grads(model, lambda: model(x, mask))
    backend = PassThenEager()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    new = loss_and_grads(model, lambda: compiled(x, mask))
    torch._dynamo.reset()
    result = applied(backend.results)
    d = distance(ref, new)
    report_row(f"stacked: {form}", result, d, dtype)
    assert result["stats"]["groups_rewritten"] == 1 and result["stats"]["layers"] == LAYERS, result
    tol_loss, tol_grad = EAGER_TOL[dtype]
    assert d[0] <= tol_loss and d[1] <= tol_grad, (form, dtype, d)


def test_a_sigmoid_router_with_a_per_layer_loss_is_recognised_and_exact() -> None:
    """transformers 5.24's MiniMax-M2 routes with sigmoid scores plus an expert bias (top-k of
    ``sigmoid(logits) + e_score_correction_bias``) and accumulates its balancing loss layer by layer
    (``histc`` and sums in a loop). Its router logits are recognised through the sigmoid and the bias, and
    the per-layer loss is re-emitted in its layer (the loop form): reported, loss and every gradient equal.
    On main at 8ffe8f9 the pass said nothing at all for this model."""
    from moe_passes import make_backend

    cfg = transformers.MiniMaxM2Config(vocab_size=64, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8, output_router_logits=True,
                                       router_aux_loss_coef=0.05, intermediate_size=8, num_local_experts=E,
                                       num_experts_per_tok=K, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    model = seeded(transformers.MiniMaxM2ForCausalLM, cfg)
    step = hf_step(model, padded=True)
    ref = loss_and_grads(model, lambda: step(model))
    backend = make_backend(passes=("layerwise_aux_loss",))
    compiled = torch.compile(model, backend=backend)
    new = loss_and_grads(model, lambda: step(compiled))
    d_loss, d_grad = distance(ref, new)
    assert d_loss < 1e-5 and d_grad < 1e-4, (d_loss, d_grad)
    (graph,) = backend.reports
    (aux,) = graph["pre_grad"]
    assert aux["changed"] and aux["stats"]["loop_form_layers"] == LAYERS, aux
    assert any(f"per-layer loss over {LAYERS} layers" in m for m in aux["matched"]), aux["matched"]
