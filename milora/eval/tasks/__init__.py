"""Evaluation tasks: each module registers its tasks with `milora.eval.registry.register`."""
