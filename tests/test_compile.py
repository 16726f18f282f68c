"""torch.compile of the rewritten graph: one graph, no graph breaks, the same outputs (backend "eager":
what is checked is dynamo's capture, not a code generator's speed)."""
import torch

import rewriter

LORA = '[adapter]\nr = 4\nalpha = 8\ninit = false\n[[rule]]\nname = "all"\nsuffix = ["q_proj", "v_proj", "up_proj"]\n'


def test_a_lora_model_compiles_without_graph_breaks_and_computes_the_same(traced_models):
    import torch._dynamo

    adapted = rewriter.apply(traced_models("tiny-llama"), LORA)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            report = torch._dynamo.explain(adapted)(input_ids=ids)
            assert report.graph_break_count == 0, report.break_reasons
            assert report.graph_count == 1
            expected = adapted(input_ids=ids).logits
            compiled = torch.compile(adapted, backend="eager", fullgraph=True)
            assert torch.equal(compiled(input_ids=ids).logits, expected)
        adapted.train()  # and the training step: gradients reach the adapter through the compiled graph
        compiled(input_ids=ids).logits.float().square().mean().backward()
        grads = [p.grad for p in adapted.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        torch._dynamo.reset()
