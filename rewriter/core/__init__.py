"""The core: the adapter contract, sites, the graph pass, tracing and file helpers.

torch and torch.fx only: nothing here knows rules, methods, adapter state or checkpoint formats."""
