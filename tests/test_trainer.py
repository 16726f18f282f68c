"""An Adapted traced with labels trains like the eager model: its loss is the eager loss on
padded batches, it trains in a plain PyTorch loop and under transformers.Trainer, whose
checkpoints carry the adapter (RewriterCallback), and AdaLoRA allocates ranks from the callback."""
import inspect
import warnings

import pytest
import safetensors.torch
import torch

import rewriter
from rewriter.checkpoint import MANIFEST
from rewriter.core.graph import ADAPTERS_ATTR
from rewriter.models import load_model
from rewriter.core.tracing import trace_model
from rewriter.training import RewriterCallback, prepare_for_trainer

QV = '[adapter]\nr = 4\nalpha = 8\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
ADALORA = ('[adapter]\nmethod = "adalora"\ninit_r = 4\ntarget_r = 2\ntinit = 1\ntfinal = 2\ntotal_step = 8\n'
           '[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n')
GEN = torch.Generator().manual_seed(7)
#: four short "documents" the adapter can learn by heart
DOCS = torch.randint(0, 512, (4, 8), generator=GEN)


@pytest.fixture(scope="module")
def llama_with_labels():
    return trace_model(load_model("builtin:tiny-llama"), with_labels=True)


def batch_loss(adapted) -> float:
    with torch.no_grad():
        return adapted(input_ids=DOCS, labels=DOCS).loss.item()


def trainer_for(adapted, out_dir, **args):
    from transformers import Trainer, TrainingArguments
    arguments = TrainingArguments(str(out_dir), **{
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "report_to": [],
        "disable_tqdm": True, "use_cpu": True, "seed": 0, **args})
    data = [{"input_ids": d, "labels": d.clone()} for d in DOCS] * 8
    return Trainer(model=adapted, args=arguments, train_dataset=data, callbacks=[RewriterCallback(adapted)])


def test_graph_loss_is_the_eager_loss_on_padded_batches(llama_with_labels):
    adapted = rewriter.Adapted(llama_with_labels.clone())
    ids = torch.randint(1, 512, (3, 9), generator=GEN)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = llama_with_labels.source(input_ids=ids, attention_mask=mask, labels=labels)
        got = adapted(input_ids=ids, attention_mask=mask, labels=labels)
    assert type(got) is type(expected)
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.logits, expected.logits)


def test_plain_pytorch_loop_trains_only_the_adapter(llama_with_labels):
    adapted = rewriter.apply(llama_with_labels.clone(), QV)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    before = batch_loss(adapted)
    adapted.train()
    for _ in range(5):
        optimizer.zero_grad()
        adapted(input_ids=DOCS, labels=DOCS).loss.backward()
        optimizer.step()
    assert batch_loss(adapted) < before
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith(f"gm.{ADAPTERS_ATTR}.") for n in with_grad)


def test_trainer_trains_and_its_checkpoints_carry_a_loadable_adapter(llama_with_labels, tmp_path):
    adapted = rewriter.apply(llama_with_labels.clone(), QV)
    before = batch_loss(adapted)
    trainer = trainer_for(adapted, tmp_path, max_steps=8, save_steps=4)
    # Trainer keeps the dataset columns the forward names, and passes no num_items_in_batch (the graph has no such input)
    assert list(inspect.signature(adapted.forward).parameters)[:3] == ["input_ids", "attention_mask", "labels"]
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and batch_loss(adapted) < before
    adapted.eval()
    for step in (4, 8):
        assert (tmp_path / f"checkpoint-{step}" / "adapter" / MANIFEST).is_file()
    loaded = rewriter.load_adapter(rewriter.Adapted(llama_with_labels.clone()), tmp_path / "checkpoint-8" / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=DOCS, labels=DOCS).logits, adapted(input_ids=DOCS, labels=DOCS).logits)


def test_adalora_allocates_ranks_from_the_trainer_callback(llama_with_labels, tmp_path):
    adapted = rewriter.apply(llama_with_labels.clone(), ADALORA)
    controller = adapted.adapters["default"].controller
    trainer = trainer_for(adapted, tmp_path, max_steps=8, save_strategy="no")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AdaLoRA")  # warns when update_and_allocate was missed
        trainer.train()
    assert controller.final_ranks is not None
    assert sum(controller.final_ranks.values()) == controller.target_budget
    for site, module in adapted.adapters["default"].modules.items():
        assert int((module.lora_E != 0).sum()) == controller.final_ranks[site]  # masked ranks stay zero


def test_prepared_state_dict_saves_tied_weights_once_and_loads_strictly(traced_models, tmp_path):
    adapted = prepare_for_trainer(rewriter.apply(traced_models("tiny-gpt2"), QV.replace("q_proj", "c_attn")))
    assert adapted.gm.lm_head.weight is adapted.gm.transformer.wte.weight
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(adapted.state_dict(), str(path))  # refuses tensors that share memory
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in safetensors.torch.load_file(str(path)).items()}
    adapted.load_state_dict(changed, strict=True)
    assert torch.equal(adapted.gm.lm_head.weight, changed["gm.transformer.wte.weight"])
    assert adapted.gm.lm_head.weight is adapted.gm.transformer.wte.weight
