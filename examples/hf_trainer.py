"""Train a tiny transformers MoE model with ``transformers.Trainer`` compiled by the ``domino`` backend.

    python examples/hf_trainer.py                      # Trainer, torch_compile_backend="domino", 4 steps
    python examples/hf_trainer.py --eager --steps 3    # the same Trainer run without torch.compile

``TrainingArguments(torch_compile=True, torch_compile_backend="domino")`` is the documented way to
pick a compile backend in Trainer, but it does not reach this one: Trainer (transformers 5.24)
hands the name to accelerate's ``TorchDynamoPlugin``, and accelerate (1.16) accepts only the
names in its ``DynamoBackend`` enum (inductor, eager, aot_eager, ...): ``Trainer(...)`` raises
``ValueError: 'DOMINO' is not a valid DynamoBackend`` before training. So the model is compiled
in place before it is handed to Trainer: ``model.compile(backend="domino")`` (the module keeps its
class, so Trainer, ``save_pretrained`` and the loss code see the usual model); torch resolves
``"domino"`` through the ``torch_dynamo_backends`` entry point this package installs, i.e. to
``moe_passes.inductor.backend.domino_backend`` (the shared default backend object, whose
``reports`` and ``summary()`` say what each pass did). Trainer needs ``accelerate`` (in the test
extras).

The model is a tiny random Qwen3-MoE (CPU, nothing downloaded), with the router aux loss on
(``output_router_logits=True``, ``router_aux_loss_coef``): its ``load_balancing_loss_func`` runs
inside the compiled forward, so ``layerwise_aux_loss`` sees it. On one process there is no
expert-parallel all-to-all, so ``domino_ep`` has nothing to do (its trigger is absent), and
``async_offload`` only acts on router tensors the compiled graph returns.

The run prints the loss of every step and, with the domino backend, the backend's summary.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset

VOCAB, SEQ, H, E, K, LAYERS = 64, 8, 16, 4, 2, 2


def tiny_qwen3_moe(seed: int = 0) -> transformers.PreTrainedModel:
    """A 2-layer Qwen3-MoE (4 experts, top-2) with the router aux loss on; random weights, CPU."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, moe_intermediate_size=8, num_experts=E, num_experts_per_tok=K,
        decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=0.05,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


class Synthetic(Dataset):
    """``n`` random sequences of ``SEQ`` tokens (labels = inputs: causal LM), fixed by ``seed``."""

    def __init__(self, n: int, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


class RecordingTrainer(transformers.Trainer):
    """``Trainer`` that keeps each step's loss at full precision (the logged one is rounded)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001 (Trainer's signature)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_losses.append(float(loss))
        return loss


def train(steps: int = 4, compile: bool = True, backend: str = "domino", batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Run ``Trainer`` for ``steps`` steps; returns per-step losses, the trained model and the Trainer."""
    model = tiny_qwen3_moe(seed)
    with tempfile.TemporaryDirectory() as out:
        if compile:
            # not TrainingArguments(torch_compile_backend=backend): accelerate rejects names outside its enum
            model.compile(backend=backend)
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-2,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=Synthetic(steps * batch))
        trainer.train()
    return {"losses": trainer.step_losses, "model": model, "trainer": trainer}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (the reference run)")
    ap.add_argument("--backend", default="domino", help="torch.compile backend name (default: domino)")
    a = ap.parse_args(argv)
    if a.backend == "domino":
        from moe_passes.inductor.backend import domino_backend

        domino_backend.clear_reports()
    res = train(a.steps, compile=not a.eager, backend=a.backend)
    for i, loss in enumerate(res["losses"], 1):
        print(f"step {i}/{a.steps}  loss {loss:.6f}  ({'eager' if a.eager else 'backend=' + a.backend})")
    if not a.eager and a.backend == "domino":
        print(domino_backend.summary())


if __name__ == "__main__":
    main()
