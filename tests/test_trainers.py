"""The backend where users train: transformers' ``Trainer`` (``examples/hf_trainer.py``).

* ``TrainingArguments(torch_compile_backend="domino")`` does not reach the backend: accelerate
  (which Trainer hands the name to) accepts only its own ``DynamoBackend`` names. Pinned here so
  that the day accelerate accepts registered backends, this test says so and the example can
  switch to it.
* The example's route, ``model.compile(backend="domino")`` then ``Trainer``, trains a tiny
  Qwen3-MoE with the aux loss on: the loss of every step equals the same Trainer run without
  compile, the trained weights too, and the backend's reports say what each pass did on one
  process (no all-to-all: Domino's trigger is absent; transformers 5's aux loss is already a
  per-layer loop: nothing stacked to rewrite, skipped with that reason; the router logits the
  forward returns go to the host).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hf_trainer  # noqa: E402


def test_trainer_backend_name_is_rejected_by_accelerate() -> None:
    model = hf_trainer.tiny_qwen3_moe()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, max_steps=1, use_cpu=True, report_to=[],
                                              torch_compile=True, torch_compile_backend="domino")
        with pytest.raises(ValueError, match="'DOMINO' is not a valid DynamoBackend"):
            transformers.Trainer(model=model, args=args, train_dataset=hf_trainer.Synthetic(2))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_hf_trainer_domino_equals_eager() -> None:
    from moe_passes.inductor.backend import domino_backend

    steps = 3
    eager = hf_trainer.train(steps, compile=False)
    torch._dynamo.reset()
    domino_backend.clear_reports()
    compiled = hf_trainer.train(steps, compile=True, backend="domino")

    assert len(eager["losses"]) == len(compiled["losses"]) == steps
    for i, (e, c) in enumerate(zip(eager["losses"], compiled["losses"]), 1):
        assert abs(c - e) <= 1e-5 * abs(e), f"step {i}: compiled loss {c} vs eager {e}"
    ref = dict(eager["model"].named_parameters())
    for name, p in compiled["model"].named_parameters():
        torch.testing.assert_close(p.detach(), ref[name].detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # Trainer really ran the model through the entry point's backend object
    s = domino_backend.summary()
    d = s.as_dict()
    print(s)
    assert d["graphs"] >= 1, "the domino backend compiled nothing: Trainer did not route through it"
    assert not d["canonical_errors"], d["canonical_errors"]
    passes = d["passes"]
    assert all(p["failed"] == 0 for p in passes.values()), passes
    # aux loss: transformers 5's load_balancing_loss_func is a per-layer loop; nothing stacked
    aux = passes["layerwise_aux_loss"]
    assert aux["applied"] == 0 and d["layerwise_aux_loss"]["layers_rewritten"] == 0
    assert any("already per layer" in r for r in aux["skip_reasons"]), aux
    # Domino: one process, no all-to-all
    assert d["domino_ep"]["regions_chunked"] == 0 and passes["domino_ep"]["applied"] == 0
    assert d["schedule_overlap"]["all_to_alls"] == 0
    # offload: the router logits of both layers the forward returns
    assert d["async_offload"]["router_tensors_offloaded"] == hf_trainer.LAYERS
